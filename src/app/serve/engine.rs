//! The scheduler of `memvp serve`: one thread owns the models and runs continuous batching.
//! Requests join a running decoding batch at step boundaries (their prompts prefilled together)
//! and leave it when they finish, each with its own visual memory, sampling settings, seed and
//! stop condition, so no request's output depends on what else is in the batch. Requests for
//! different adapters run in separate batches, stepped in turn. An image's visual part (MemVP:
//! the K, V memory after the vision tower and the projector) is computed once per (adapter,
//! image) and kept in an LRU cache bounded in bytes.

use super::metrics::Metrics;
use crate::adapters::RequestVisual;
use crate::data::image::{Preprocess, decode_rgb};
use crate::generate::{Sampling, pick};
use crate::models::BatchState;
use crate::rng::Rng;
use crate::vlm::{Base, Vlm};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, mpsc};
use std::time::{Duration, Instant};

/// One loaded adapter.
pub struct Served {
    pub name: String,
    pub run: PathBuf,
    pub vlm: Vlm,
    pub preprocess: Preprocess,
}

/// The loaded adapters, shared by the HTTP handlers (to validate and list) and the scheduler.
#[derive(Default)]
pub struct Registry {
    pub adapters: BTreeMap<String, Arc<Served>>,
}

impl Registry {
    /// Loaded base models with the given content, to share with a new adapter.
    pub fn base_for(&self, cfg: &crate::adapters::file::AdapterConfig) -> Option<Arc<Base>> {
        self.adapters.values().map(|s| s.vlm.base.clone()).find(|b| cfg.matches(b))
    }
}

/// An image of a request: its bytes as sent and their SHA-256 (the cache key).
#[derive(Clone)]
pub struct ImageInput {
    pub sha256: [u8; 32],
    pub bytes: Arc<Vec<u8>>,
}

/// What the scheduler tells a request's handler.
#[derive(Debug, Clone)]
pub enum Event {
    Started { cache_hit: bool, prompt_tokens: usize },
    Delta(String),
    Done { finish_reason: &'static str, completion_tokens: usize, text: String },
    Failed { status: u16, kind: &'static str, message: String },
}

pub struct Job {
    pub adapter: Arc<Served>,
    pub prompt: Vec<u32>,
    pub image: Option<ImageInput>,
    pub sampling: Sampling,
    /// Strings that end the answer (not included in it).
    pub stop: Vec<String>,
    /// Generate `max_new_tokens` whatever the end-of-sequence tokens say (load tests).
    pub ignore_eos: bool,
    pub deadline: Instant,
    pub enqueued: Instant,
    pub tx: tokio::sync::mpsc::UnboundedSender<Event>,
}

pub enum Msg {
    Job(Box<Job>),
    /// Finish everything queued and running, then end.
    Drain,
}

/// The visual parts computed so far, by (adapter, image SHA-256); least recently used first
/// out when over the byte bound.
pub struct Cache {
    cap: usize,
    used: usize,
    tick: u64,
    map: HashMap<(String, [u8; 32]), (RequestVisual, u64)>,
}

impl Cache {
    pub fn new(cap_bytes: usize) -> Self {
        Self { cap: cap_bytes, used: 0, tick: 0, map: HashMap::new() }
    }

    fn get(&mut self, key: &(String, [u8; 32])) -> Option<RequestVisual> {
        self.tick += 1;
        let t = self.tick;
        self.map.get_mut(key).map(|e| {
            e.1 = t;
            e.0.clone()
        })
    }

    fn insert(&mut self, key: (String, [u8; 32]), v: RequestVisual) {
        let n = v.bytes();
        if n > self.cap {
            return;
        }
        while self.used + n > self.cap {
            let Some(oldest) = self.map.iter().min_by_key(|e| e.1.1).map(|e| e.0.clone()) else { break };
            if let Some((old, _)) = self.map.remove(&oldest) {
                self.used -= old.bytes();
            }
        }
        self.tick += 1;
        self.used += n;
        if let Some((old, _)) = self.map.insert(key, (v, self.tick)) {
            self.used -= old.bytes();
        }
    }

    /// Drops every entry of an adapter (unloaded).
    pub fn forget(&mut self, adapter: &str) {
        let keys: Vec<_> = self.map.keys().filter(|k| k.0 == adapter).cloned().collect();
        for k in keys {
            if let Some((v, _)) = self.map.remove(&k) {
                self.used -= v.bytes();
            }
        }
    }

    pub fn bytes(&self) -> usize {
        self.used
    }
}

/// What the handlers and the scheduler share.
pub struct Shared {
    pub registry: RwLock<Registry>,
    pub metrics: Metrics,
    /// Requests sent to the scheduler and not yet admitted to a batch.
    pub queued: AtomicUsize,
    /// Rows in running batches.
    pub running: AtomicUsize,
    pub cache: Mutex<Cache>,
    /// The formats base models are loaded in.
    pub precision: crate::models::Precision,
}

/// A request in a running batch.
struct Row {
    job: Job,
    ids: Vec<u32>,
    rng: Rng,
    /// Tokens this row may still generate before its `max_new_tokens` or the LM's positions.
    max_new: usize,
    /// Bytes of the answer text already sent.
    sent: usize,
    last_token: Instant,
}

/// The running batch of one adapter.
struct Batch {
    served: Arc<Served>,
    state: Box<dyn BatchState>,
    rows: Vec<Row>,
    /// Each of the adapter's per-row tensors stacked along the batch.
    visual: Vec<Tensor>,
}

enum Outcome {
    Continue,
    Finished,
}

pub fn spawn(shared: Arc<Shared>, rx: mpsc::Receiver<Msg>, max_batch: usize) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("memvp-scheduler".into())
        .spawn(move || {
            // On a worker of the compute pool, as the command line runs (see main.rs).
            rayon::join(|| Scheduler { shared, rx, max_batch, pending: VecDeque::new(), batches: vec![] }.run(), || ());
        })
        .expect("cannot start the scheduler thread")
}

struct Scheduler {
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Msg>,
    max_batch: usize,
    pending: VecDeque<Job>,
    batches: Vec<Batch>,
}

fn fail(job: &Job, status: u16, kind: &'static str, message: String) {
    let _ = job.tx.send(Event::Failed { status, kind, message });
}

impl Scheduler {
    fn run(mut self) {
        let mut draining = false;
        loop {
            let idle = self.batches.is_empty() && self.pending.is_empty();
            if idle && draining {
                return;
            }
            if idle {
                match self.rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(m) => draining |= self.take(m),
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            while let Ok(m) = self.rx.try_recv() {
                draining |= self.take(m);
            }
            self.admit();
            for i in 0..self.batches.len() {
                if let Err(e) = self.step(i) {
                    let b = &mut self.batches[i];
                    for r in b.rows.drain(..) {
                        fail(&r.job, 500, "server_error", format!("decoding failed: {e:#}"));
                    }
                }
            }
            self.batches.retain(|b| !b.rows.is_empty());
            let rows: usize = self.batches.iter().map(|b| b.rows.len()).sum();
            self.shared.running.store(rows, Ordering::SeqCst);
            let kv: usize = self.batches.iter().map(|b| b.state.bytes()).sum();
            self.shared.metrics.kv_bytes(kv, rows);
        }
    }

    /// Returns whether the message asks to drain.
    fn take(&mut self, m: Msg) -> bool {
        match m {
            Msg::Job(j) => {
                self.pending.push_back(*j);
                false
            }
            Msg::Drain => true,
        }
    }

    /// Moves queued requests into batches (up to `max_batch` rows per adapter), prefilling
    /// each adapter's newcomers together.
    fn admit(&mut self) {
        let mut groups: Vec<(Arc<Served>, Vec<Job>)> = Vec::new();
        let mut keep = VecDeque::new();
        while let Some(job) = self.pending.pop_front() {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            if job.tx.is_closed() {
                self.shared.metrics.request_done(499);
                continue;
            }
            if Instant::now() > job.deadline {
                fail(&job, 504, "timeout", "the request timed out before it was scheduled".into());
                self.shared.metrics.request_done(504);
                continue;
            }
            let name = job.adapter.name.clone();
            let running = self.batches.iter().find(|b| b.served.name == name).map_or(0, |b| b.rows.len());
            let gi = match groups.iter().position(|g| g.0.name == name) {
                Some(i) => i,
                None => {
                    groups.push((job.adapter.clone(), vec![]));
                    groups.len() - 1
                }
            };
            if running + groups[gi].1.len() >= self.max_batch {
                self.shared.queued.fetch_add(1, Ordering::SeqCst);
                keep.push_back(job);
            } else {
                groups[gi].1.push(job);
            }
        }
        self.pending = keep;
        for (served, jobs) in groups {
            if jobs.is_empty() {
                continue;
            }
            if let Err(e) = self.prefill(served, jobs) {
                eprintln!("prefill failed: {e:#}");
            }
        }
    }

    /// The visual part of a request: from the cache, or computed (and cached).
    fn visual(&self, served: &Served, image: Option<&ImageInput>) -> Result<(RequestVisual, bool), String> {
        let vlm = &served.vlm;
        let key = (served.name.clone(), image.map_or([0u8; 32], |i| i.sha256));
        if let Some(v) = self.shared.cache.lock().expect("cache lock").get(&key) {
            self.shared.metrics.cache(true);
            return Ok((v, true));
        }
        self.shared.metrics.cache(false);
        let pixels = match image {
            Some(img) if vlm.uses_images() => {
                let rgb = decode_rgb(&img.bytes).map_err(|e| format!("the image cannot be decoded: {e:#}"))?;
                let s = served.preprocess.size;
                let px = served.preprocess.pixels(&rgb);
                let dev = vlm.lm().model.device();
                Some(Tensor::from_vec(px, (1, 3, s, s), dev).map_err(|e| e.to_string())?)
            }
            _ => None,
        };
        let v = vlm
            .adapter
            .request_visual(&vlm.vision().model, pixels.as_ref())
            .map_err(|e| format!("the vision side failed: {e:#}"))?;
        let mut cache = self.shared.cache.lock().expect("cache lock");
        cache.insert(key, v.clone());
        self.shared.metrics.cache_bytes(cache.bytes());
        Ok((v, false))
    }

    fn prefill(&mut self, served: Arc<Served>, jobs: Vec<Job>) -> Result<()> {
        let mut ok_jobs = Vec::new();
        let mut visuals = Vec::new();
        for job in jobs {
            match self.visual(&served, job.image.as_ref()) {
                Ok((v, hit)) => {
                    let _ = job.tx.send(Event::Started { cache_hit: hit, prompt_tokens: job.prompt.len() });
                    visuals.push(v);
                    ok_jobs.push(job);
                }
                Err(m) => {
                    fail(&job, 400, "invalid_request_error", m);
                    self.shared.metrics.request_done(400);
                }
            }
        }
        if ok_jobs.is_empty() {
            return Ok(());
        }
        let lm = served.vlm.lm();
        let prompts: Vec<Vec<u32>> = ok_jobs.iter().map(|j| j.prompt.clone()).collect();
        let indicator: Vec<f32> =
            ok_jobs.iter().map(|j| if j.image.is_some() && served.vlm.uses_images() { 1.0 } else { 0.0 }).collect();
        let stacked = stack(&visuals)?;
        let prefix = match visuals.iter().map(|v| v.prefix.clone()).collect::<Option<Vec<Tensor>>>() {
            Some(p) if !p.is_empty() => Some(Tensor::cat(&p, 0)?),
            _ => None,
        };
        let rng = RefCell::new(Rng::new(0));
        let result = (|| {
            let hooks = served.vlm.adapter.batch_hooks(&stacked, &rng)?;
            lm.model.start_batch(hooks.as_ref(), &prompts, prefix.as_ref().map(|p| (p, indicator.as_slice())))
        })();
        let (state, first) = match result {
            Ok(x) => x,
            Err(e) => {
                for j in &ok_jobs {
                    fail(j, 500, "server_error", format!("prefill failed: {e:#}"));
                }
                return Err(e);
            }
        };
        let logits = rows_f32(&first)?;
        let prefix_len = served.vlm.adapter.prefix_tokens();
        let now = Instant::now();
        let mut rows: Vec<Row> = ok_jobs
            .into_iter()
            .map(|job| {
                let room = lm.model.max_new_tokens(prefix_len + job.prompt.len()).unwrap_or(usize::MAX);
                let max_new = job.sampling.max_new_tokens.min(room);
                let seed = job.sampling.seed;
                Row { job, ids: vec![], rng: Rng::new(seed), max_new, sent: 0, last_token: now }
            })
            .collect();
        let mut done = vec![false; rows.len()];
        for (i, r) in rows.iter_mut().enumerate() {
            self.shared.metrics.ttft(r.job.enqueued.elapsed().as_secs_f64());
            done[i] = matches!(self.advance(&served, r, &logits[i]), Outcome::Finished);
        }
        let keep_idx: Vec<usize> = (0..rows.len()).filter(|&i| !done[i]).collect();
        if keep_idx.is_empty() {
            return Ok(());
        }
        let mut state = state;
        let mut visual = stacked;
        if keep_idx.len() < rows.len() {
            state.keep(&keep_idx)?;
            visual = select_rows(&visual, &keep_idx)?;
        }
        let rows: Vec<Row> = rows.into_iter().enumerate().filter(|(i, _)| !done[*i]).map(|(_, r)| r).collect();
        match self.batches.iter_mut().find(|b| b.served.name == served.name) {
            Some(b) => {
                b.state.merge(state)?;
                b.visual = concat_rows(&b.visual, &visual)?;
                b.rows.extend(rows);
            }
            None => self.batches.push(Batch { served, state, rows, visual }),
        }
        Ok(())
    }

    /// Picks a row's next token from its logits and tells its handler; whether it finished.
    fn advance(&self, served: &Served, r: &mut Row, logits: &[f32]) -> Outcome {
        let s = &r.job.sampling;
        let t = pick(logits, s, &mut r.rng);
        r.ids.push(t);
        let now = Instant::now();
        if r.ids.len() > 1 {
            self.shared.metrics.per_token(now.duration_since(r.last_token).as_secs_f64());
        }
        r.last_token = now;
        let lm = served.vlm.lm();
        let mut finish = if !r.job.ignore_eos && lm.eos.contains(&t) {
            Some("stop")
        } else if r.ids.len() >= r.max_new {
            Some("length")
        } else {
            None
        };
        let mut text = lm.tok.decode(&r.ids, true).unwrap_or_default();
        if let Some(cut) = r.job.stop.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(cut);
            finish = Some("stop");
        }
        // Send what is settled: not a trailing partial character.
        let settled = if finish.is_some() { text.len() } else { text.trim_end_matches('\u{fffd}').len() };
        if settled > r.sent && text.is_char_boundary(r.sent) {
            let _ = r.job.tx.send(Event::Delta(text[r.sent..settled].to_string()));
            r.sent = settled;
        }
        match finish {
            Some(reason) => {
                let _ = r.job.tx.send(Event::Done { finish_reason: reason, completion_tokens: r.ids.len(), text });
                self.shared.metrics.tokens(r.job.prompt.len(), r.ids.len());
                self.shared.metrics.request_done(200);
                Outcome::Finished
            }
            None => Outcome::Continue,
        }
    }

    /// One decoding step of batch `i`; finished, abandoned and timed-out rows leave it.
    fn step(&mut self, i: usize) -> Result<()> {
        let served = self.batches[i].served.clone();
        let lm = served.vlm.lm();
        let b = &mut self.batches[i];
        let tokens: Vec<u32> = b.rows.iter().map(|r| *r.ids.last().expect("a row has a token")).collect();
        self.shared.metrics.batch_size(tokens.len());
        let rng = RefCell::new(Rng::new(0));
        let logits = {
            let hooks = served.vlm.adapter.batch_hooks(&b.visual, &rng)?;
            lm.model.step_batch(b.state.as_mut(), &tokens, hooks.as_ref())?
        };
        let logits = rows_f32(&logits)?;
        let mut rows = std::mem::take(&mut self.batches[i].rows);
        let mut keep = Vec::with_capacity(rows.len());
        for (j, r) in rows.iter_mut().enumerate() {
            if r.job.tx.is_closed() {
                self.shared.metrics.request_done(499);
                continue;
            }
            if Instant::now() > r.job.deadline {
                fail(&r.job, 504, "timeout", format!("the request timed out after {} tokens", r.ids.len()));
                self.shared.metrics.request_done(504);
                continue;
            }
            if let Outcome::Continue = self.advance(&served, r, &logits[j]) {
                keep.push(j);
            }
        }
        let b = &mut self.batches[i];
        if keep.len() < rows.len() && !keep.is_empty() {
            b.state.keep(&keep)?;
            b.visual = select_rows(&b.visual, &keep)?;
        }
        b.rows = rows.into_iter().enumerate().filter(|(j, _)| keep.contains(j)).map(|(_, r)| r).collect();
        Ok(())
    }
}

fn rows_f32(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

/// Each per-row tensor of the requests stacked along the batch.
fn stack(v: &[RequestVisual]) -> Result<Vec<Tensor>> {
    let n = v.first().map_or(0, |x| x.rows.len());
    (0..n)
        .map(|j| {
            let parts: Vec<&Tensor> = v.iter().map(|x| &x.rows[j]).collect();
            Tensor::cat(&parts, 0).context("stacking the visual memory of a batch")
        })
        .collect()
}

fn concat_rows(a: &[Tensor], b: &[Tensor]) -> Result<Vec<Tensor>> {
    a.iter().zip(b).map(|(x, y)| Ok(Tensor::cat(&[x, y], 0)?)).collect()
}

fn select_rows(v: &[Tensor], keep: &[usize]) -> Result<Vec<Tensor>> {
    let Some(first) = v.first() else { return Ok(vec![]) };
    let idx = Tensor::from_vec(keep.iter().map(|&i| i as u32).collect::<Vec<_>>(), keep.len(), first.device())?;
    v.iter().map(|t| Ok(t.index_select(&idx, 0)?)).collect()
}
