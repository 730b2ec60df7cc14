//! `memvp serve`: an OpenAI-compatible vision chat server over trained runs, with continuous
//! batching ([`engine`]), a per-image visual-memory cache, adapter hot-swap, Prometheus
//! metrics and a web page. HTTP on tokio + axum; the models live on one scheduler thread.

pub mod api;
pub mod engine;
pub mod metrics;

use anyhow::{Context, Result, bail};
use api::{App, Limits};
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};
use engine::{Cache, Msg, Registry, Served, Shared};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// A trained run to serve, as RUN_DIR or NAME=RUN_DIR (NAME defaults to the folder's name);
    /// repeat for several adapters (those on the same base models share them).
    #[arg(long = "run", required = true)]
    pub runs: Vec<String>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Rows of one adapter's decoding batch.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Memory for cached visual memories (per adapter and image).
    #[arg(long, default_value_t = 512)]
    pub cache_mb: usize,
    /// Requests waiting for a batch slot before new ones get 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Seconds a request may take from arrival to its last token.
    #[arg(long, default_value_t = 300.0)]
    pub request_timeout: f64,
    /// Require `Authorization: Bearer KEY` on /v1/*.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Allow image URLs that are local paths inside this folder.
    #[arg(long)]
    pub allow_files: Option<PathBuf>,
    #[arg(long, default_value_t = 16_777_216)]
    pub max_image_pixels: u64,
    #[arg(long, default_value_t = 20)]
    pub max_body_mb: usize,
    /// Images in one conversation.
    #[arg(long, default_value_t = 8)]
    pub max_images: usize,
    /// The largest `max_tokens` a request may ask for.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub precision: crate::app::cli::PrecisionArgs,
}

/// Loads run `run` as adapter `name`, sharing base models already loaded, and registers it.
pub fn load(shared: &Shared, name: &str, run: &Path) -> Result<Arc<Served>> {
    let cfg = crate::adapters::file::AdapterConfig::read(run)?;
    let base = shared.registry.read().expect("registry lock").base_for(&cfg);
    let vlm = match base {
        Some(b) => crate::vlm::Vlm::from_run_on(run, b)?,
        None => crate::vlm::Vlm::from_run(run, None, None, shared.precision)?,
    };
    if vlm.lm().model.decoder_start().is_some() {
        bail!(
            "{}: serve batches decoder-only LMs (LLaMA family); this adapter's LM is {}",
            run.display(),
            vlm.lm().family()
        )
    }
    let preprocess = vlm.preprocess();
    let s = Arc::new(Served { name: name.to_string(), run: run.to_path_buf(), vlm, preprocess });
    let mut reg = shared.registry.write().expect("registry lock");
    if reg.adapters.contains_key(name) {
        bail!("`{name}` is already loaded")
    }
    reg.adapters.insert(name.to_string(), s.clone());
    Ok(s)
}

fn check(a: &ServeArgs) -> Result<()> {
    if a.max_batch == 0 || a.max_queue == 0 || a.max_images == 0 || a.max_tokens == 0 || a.max_body_mb == 0 {
        bail!("--max-batch, --max-queue, --max-images, --max-tokens and --max-body-mb must be at least 1")
    }
    if !(a.request_timeout.is_finite() && a.request_timeout > 0.0) {
        bail!("--request-timeout {}: must be a positive number of seconds", a.request_timeout)
    }
    Ok(())
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
unsafe extern "C" {
    fn mallopt(param: i32, value: i32) -> i32;
}

/// A server allocates and frees tensors of many sizes from several threads for hours. glibc's
/// default raises its mmap threshold each time a large block is freed, after which such blocks
/// come from the heap and fragment it: measured, the RSS of a server under load grew from 1.4
/// to 7.6 GB in ten minutes. A fixed threshold keeps large blocks in their own mappings, which
/// go back to the system when freed (the RSS then stays flat).
fn fix_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: mallopt only changes a tuning parameter of glibc's allocator; it is called
        // before the server starts its threads, and any value is valid for this parameter.
        unsafe { mallopt(M_MMAP_THRESHOLD, 128 * 1024) };
    }
}

pub fn run(a: ServeArgs) -> Result<()> {
    check(&a)?;
    fix_mmap_threshold();
    let shared = Arc::new(Shared {
        registry: RwLock::new(Registry::default()),
        metrics: Default::default(),
        queued: AtomicUsize::new(0),
        running: AtomicUsize::new(0),
        cache: Mutex::new(Cache::new(a.cache_mb << 20)),
        precision: a.precision.precision(),
    });
    for spec in &a.runs {
        let (name, dir) = match spec.split_once('=') {
            Some((n, d)) => (n.to_string(), PathBuf::from(d)),
            None => {
                let d = PathBuf::from(spec);
                let n = d.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "default".into());
                (n, d)
            }
        };
        load(&shared, &name, &dir).with_context(|| format!("--run {spec}"))?;
        eprintln!("loaded adapter `{name}` from {}", dir.display());
    }
    let allow_files = match &a.allow_files {
        Some(d) => Some(d.canonicalize().with_context(|| format!("--allow-files {}: no such folder", d.display()))?),
        None => None,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let scheduler = engine::spawn(shared.clone(), rx, a.max_batch);
    let app = Arc::new(App {
        shared: shared.clone(),
        tx: Mutex::new(tx),
        limits: Limits {
            api_key: a.api_key.clone(),
            max_queue: a.max_queue,
            request_timeout: Duration::from_secs_f64(a.request_timeout),
            max_image_pixels: a.max_image_pixels,
            max_images: a.max_images,
            max_tokens: a.max_tokens,
            allow_files,
        },
        draining: AtomicBool::new(false),
        next_id: AtomicU64::new(1),
    });
    let router = Router::new()
        .route("/", get(api::page))
        .route("/health", get(api::health))
        .route("/metrics", get(api::metrics))
        .route("/v1/models", get(api::models))
        .route("/v1/chat/completions", post(api::chat))
        .route("/v1/adapters", post(api::load_adapter))
        .route("/v1/adapters/{name}", delete(api::unload_adapter))
        .fallback(api::not_found)
        .layer(DefaultBodyLimit::max(a.max_body_mb << 20))
        .with_state(app.clone());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        println!("listening on http://{addr}");
        eprintln!("memvp serve: {} adapter(s) on http://{addr} (page at /, API at /v1)", app.shared.registry.read().expect("lock").adapters.len());
        let app2 = app.clone();
        let shutdown = async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {},
            }
            eprintln!("draining: no new requests; waiting for the running ones");
            app2.draining.store(true, Ordering::SeqCst);
        };
        axum::serve(listener, router).with_graceful_shutdown(shutdown).await?;
        anyhow::Ok(())
    })?;
    let _ = app.tx.lock().expect("sender lock").send(Msg::Drain);
    scheduler.join().map_err(|_| anyhow::anyhow!("the scheduler thread panicked"))?;
    eprintln!("memvp serve: stopped");
    Ok(())
}
