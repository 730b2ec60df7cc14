//! The `memvp` command: parse, call the library, print.

use anyhow::Result;
use clap::{Parser, Subcommand};
use memvp::app::cli;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "memvp", version, about = "Memory-space visual prompting: efficient vision-language fine-tuning")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Where models run: cpu (memvp's kernels), cuda, cuda:N or metal (the device-generic path;
    /// needs a binary built with that cargo feature). Default: $MEMVP_DEVICE, else cpu.
    #[arg(long, global = true)]
    device: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt with a language model (Hugging Face directory, .gguf or Meta's
    /// LLaMA directory).
    Generate(cli::GenerateArgs),
    /// Fine-tune (MemVP by default) on a data set; writes a run directory.
    Train(Box<cli::TrainArgs>),
    /// Evaluate a run on a data set split; writes preds.json and eval.json.
    Eval(cli::EvalArgs),
    /// Score a predictions file against official ground truth (VQA v2, GQA, COCO captions) as
    /// the official tools do; prints the scores as one JSON object.
    Score(cli::ScoreArgs),
    /// The built-in demo, no downloads: renders a shapes VQA set, builds and pre-trains a tiny
    /// LM, trains MemVP and an image-blind control, and compares their test accuracy.
    Quickstart {
        #[arg(long, default_value = "quickstart-out")]
        out: PathBuf,
        #[command(flatten)]
        settings: memvp::app::quickstart::QuickstartSettings,
        #[arg(long)]
        json: bool,
    },
    /// MemVP against the input-space baseline on the same backbones and batch, interleaved.
    Bench(Box<memvp::app::bench::BenchArgs>),
    /// Serve trained runs over HTTP: OpenAI-style chat completions with images, continuous
    /// batching, a visual-memory cache, adapter hot-swap, metrics and a web page.
    Serve(Box<memvp::app::serve::ServeArgs>),
    /// Load-test a server: streaming requests from several clients; throughput, latency and
    /// time-to-first-token percentiles, errors by kind.
    Loadtest(Box<memvp::app::loadtest::LoadtestArgs>),
    /// Train several methods on the same data with the same budget, evaluate them as they
    /// train, and report accuracy against training time (compare.json, compare.md, compare.png).
    Compare(Box<memvp::app::compare::CompareArgs>),
    /// Turn the authors' released MemVP checkpoint (`checkpoint-19.pth`) into a run directory
    /// with the released settings, ready for `memvp eval --run`.
    ImportOfficial(Box<memvp::app::import_official::ImportArgs>),
    /// The device path (--device) against memvp's CPU kernels on the committed tiny fixtures:
    /// logits, gradients, a short training's losses, greedy generations, with tolerances.
    DeviceCheck(Box<memvp::app::device_check::DeviceCheckArgs>),
    /// Write the patch features of an image as the vision tower produces them for MemVP.
    EncodeImage {
        /// CLIP checkpoint directory or random:<preset>[@seed].
        #[arg(long)]
        vision: String,
        #[arg(long)]
        image: PathBuf,
        /// Hidden-state index as transformers counts them; -2 = penultimate block (MemVP).
        #[arg(long, default_value_t = -2, allow_hyphen_values = true)]
        layer: isize,
        #[arg(long, default_value = "imagenet", value_parser = cli::serde_enum::<memvp::data::image::Norm>)]
        norm: memvp::data::image::Norm,
        #[arg(long)]
        out: PathBuf,
    },
}

fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Generate(a) => cli::generate(a),
        Cmd::Train(a) => {
            memvp::dist::init()?;
            cli::train(*a)
        }
        Cmd::Eval(a) => {
            memvp::dist::init()?;
            cli::eval(a)
        }
        Cmd::Bench(a) => {
            let v = memvp::app::bench::run(&a)?;
            if a.json {
                println!("{v}");
            } else {
                memvp::app::bench::print_table(&v);
            }
            Ok(())
        }
        Cmd::Serve(a) => memvp::app::serve::run(*a),
        Cmd::Loadtest(a) => {
            let v = memvp::app::loadtest::run(&a)?;
            if a.json {
                println!("{v}");
            } else {
                memvp::app::loadtest::print(&v);
            }
            Ok(())
        }
        Cmd::Compare(a) => {
            let r = memvp::app::compare::run(&a)?;
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                print!("{}", memvp::app::compare::markdown(&r));
                println!("wrote compare.json, compare.md and compare.png in {}", a.out.display());
            }
            Ok(())
        }
        Cmd::ImportOfficial(a) => {
            let r = memvp::app::import_official::run(&a)?;
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "imported {} tensors from {} ({} skipped: frozen base weights, the unused modality embedding) into {}; settings {}",
                    r.imported.len(),
                    r.checkpoint.display(),
                    r.skipped.len(),
                    r.run.display(),
                    r.settings
                );
            }
            Ok(())
        }
        Cmd::DeviceCheck(a) => {
            let r = memvp::app::device_check::run(&a)?;
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                memvp::app::device_check::print(&r);
            }
            if !r.pass {
                anyhow::bail!("device-check: some checks are outside their tolerance");
            }
            Ok(())
        }
        Cmd::Score(a) => cli::score(a.task, &a.gt, &a.preds, a.questions),
        Cmd::Quickstart { out, settings, json } => cli::quickstart(&out, &settings, json),
        Cmd::EncodeImage { vision, image, layer, norm, out } => cli::encode_image(&vision, &image, layer, norm, &out),
    }
}

fn main() {
    let cli = Cli::parse();
    let mut threads = candle_core::utils::get_num_threads();
    // Ranks of an MPI job on one machine share its cores (unless the user set the count).
    if std::env::var_os("RAYON_NUM_THREADS").is_none()
        && let Some(local) = std::env::var("OMPI_COMM_WORLD_LOCAL_SIZE").ok().and_then(|v| v.parse::<usize>().ok())
        && local > 1
    {
        threads = (threads / local).max(1);
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // candle asks for the thread count on every matmul and, without this variable, reads
        // /proc/cpuinfo each time. Set before any thread exists.
        // SAFETY: set_var is unsound only while another thread may read or write the
        // environment. This is the start of main: no thread has been spawned yet (Rust runs no
        // code before main; argument parsing and get_num_threads above spawn no thread,
        // and the rayon pool is built below), so the process is single-threaded here.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // candle's elementwise ops have their own spinning thread pool; beside rayon's on the
        // same cores it oversubscribes them (measured: MemVP training steps ~15% slower).
        // memvp's heavy elementwise work is in its own rayon kernels.
        // SAFETY: as above: still single-threaded, before the rayon pool or any other thread
        // exists.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    let device = cli.device.clone().or_else(|| std::env::var("MEMVP_DEVICE").ok()).unwrap_or_else(|| "cpu".into());
    if std::env::var("MEMVP_DEVICE").ok().as_deref() != Some(device.as_str()) {
        // Processes this one starts (`memvp compare`'s training runs) use the same device.
        // SAFETY: as above: still single-threaded, before the rayon pool or any other thread
        // exists.
        unsafe { std::env::set_var("MEMVP_DEVICE", &device) };
    }
    let _ = rayon::ThreadPoolBuilder::new().num_threads(threads).build_global();
    if let Err(e) = memvp::util::set_device(&device) {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
    let result = if matches!(cli.cmd, Cmd::Serve(_) | Cmd::Loadtest(_)) {
        // An HTTP runtime blocks the thread it runs on for the server's whole life: on a pool
        // worker it would take one of the compute threads (measured: the server decoded on
        // one of the two cores). The server's scheduler enters the pool itself.
        run(cli.cmd)
    } else {
        // Run on a worker of the compute pool: parallel kernels called from a pool worker
        // start inline instead of handing every small job to another thread and sleeping
        // until it ends.
        rayon::join(|| run(cli.cmd), || ()).0
    };
    let world = memvp::dist::world();
    if let Err(e) = result {
        if let Some(i) = e.downcast_ref::<memvp::train::Interrupted>() {
            // Every rank of a job stops at the same step (they agree on the signal).
            if world.is_root() {
                eprintln!("{i}");
            }
            memvp::dist::finish();
            std::process::exit(i.exit_code());
        }
        eprintln!("{}error: {e:#}", memvp::dist::who());
        if world.size() > 1 {
            // The other ranks may be waiting for this one in a collective: end them all now.
            world.abort(1);
        }
        std::process::exit(1);
    }
    memvp::dist::finish();
}
