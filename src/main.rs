//! The `memvp` command: parse, call the library, print.

use anyhow::Result;
use clap::{Parser, Subcommand};
use memvp::cli;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "memvp",
    version,
    about = "Memory-space visual prompting: efficient vision-language fine-tuning"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt with a language model (Hugging Face directory or .gguf).
    Generate(cli::GenerateArgs),
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
        #[arg(long, value_enum, default_value = "imagenet")]
        norm: memvp::image::Norm,
        #[arg(long)]
        out: PathBuf,
    },
}

fn run() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Generate(a) => cli::generate(a),
        Cmd::EncodeImage {
            vision,
            image,
            layer,
            norm,
            out,
        } => cli::encode_image(&vision, &image, layer, norm, &out),
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
