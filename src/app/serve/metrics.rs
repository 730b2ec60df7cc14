//! `GET /metrics` in the Prometheus text format: requests by status, tokens, queue length and
//! running rows, batch sizes, time to first token and per-token latency, cache hits, misses and
//! bytes.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }
    fn observe(&mut self, x: f64) {
        for (b, c) in self.bounds.iter().zip(&mut self.counts) {
            if x <= *b {
                *c += 1;
            }
        }
        self.sum += x;
        self.count += 1;
    }
    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
            self.count, self.sum, self.count
        );
    }
}

const SECONDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const SIZES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

struct Inner {
    requests: BTreeMap<u16, u64>,
    prompt_tokens: u64,
    completion_tokens: u64,
    cache_hits: u64,
    cache_misses: u64,
    cache_bytes: u64,
    kv_bytes: u64,
    kv_bytes_peak: u64,
    /// Rows running when the KV cache peaked.
    kv_peak_rows: u64,
    ttft: Histogram,
    per_token: Histogram,
    batch: Histogram,
}

pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                requests: BTreeMap::new(),
                prompt_tokens: 0,
                completion_tokens: 0,
                cache_hits: 0,
                cache_misses: 0,
                cache_bytes: 0,
                kv_bytes: 0,
                kv_bytes_peak: 0,
                kv_peak_rows: 0,
                ttft: Histogram::new(SECONDS),
                per_token: Histogram::new(SECONDS),
                batch: Histogram::new(SIZES),
            }),
        }
    }
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Inner)) {
        if let Ok(mut g) = self.inner.lock() {
            f(&mut g)
        }
    }
    /// A request ended with this HTTP status (499: the client went away).
    pub fn request_done(&self, status: u16) {
        self.with(|m| *m.requests.entry(status).or_default() += 1)
    }
    pub fn tokens(&self, prompt: usize, completion: usize) {
        self.with(|m| {
            m.prompt_tokens += prompt as u64;
            m.completion_tokens += completion as u64;
        })
    }
    pub fn cache(&self, hit: bool) {
        self.with(|m| if hit { m.cache_hits += 1 } else { m.cache_misses += 1 })
    }
    pub fn cache_bytes(&self, n: usize) {
        self.with(|m| m.cache_bytes = n as u64)
    }
    /// The KV caches' bytes now, with the rows they hold.
    pub fn kv_bytes(&self, n: usize, rows: usize) {
        self.with(|m| {
            m.kv_bytes = n as u64;
            if n as u64 > m.kv_bytes_peak {
                m.kv_bytes_peak = n as u64;
                m.kv_peak_rows = rows as u64;
            }
        })
    }
    pub fn ttft(&self, s: f64) {
        self.with(|m| m.ttft.observe(s))
    }
    pub fn per_token(&self, s: f64) {
        self.with(|m| m.per_token.observe(s))
    }
    pub fn batch_size(&self, n: usize) {
        self.with(|m| m.batch.observe(n as f64))
    }

    pub fn render(&self, queued: usize, running: usize, adapters: usize) -> String {
        let mut out = String::new();
        let Ok(m) = self.inner.lock() else { return out };
        let _ = writeln!(out, "# HELP memvp_requests_total Requests by final HTTP status (499: client gone).");
        let _ = writeln!(out, "# TYPE memvp_requests_total counter");
        for (s, n) in &m.requests {
            let _ = writeln!(out, "memvp_requests_total{{status=\"{s}\"}} {n}");
        }
        let counters = [
            ("memvp_prompt_tokens_total", "Prompt tokens of finished requests.", m.prompt_tokens),
            ("memvp_completion_tokens_total", "Generated tokens of finished requests.", m.completion_tokens),
            ("memvp_cache_hits_total", "Requests whose visual memory came from the cache.", m.cache_hits),
            ("memvp_cache_misses_total", "Requests whose visual memory was computed.", m.cache_misses),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        let gauges = [
            ("memvp_cache_bytes", "Bytes held by the visual-memory cache.", m.cache_bytes as usize),
            ("memvp_kv_cache_bytes", "Bytes of the running batches' KV caches.", m.kv_bytes as usize),
            ("memvp_kv_cache_bytes_peak", "The largest KV cache bytes seen.", m.kv_bytes_peak as usize),
            ("memvp_kv_cache_peak_rows", "Requests running when the KV cache peaked.", m.kv_peak_rows as usize),
            ("memvp_queue_length", "Requests waiting for a batch slot.", queued),
            ("memvp_running_requests", "Requests in running decoding batches.", running),
            ("memvp_adapters", "Loaded adapters.", adapters),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        m.ttft.render(&mut out, "memvp_time_to_first_token_seconds", "From arrival to the first token.");
        m.per_token.render(&mut out, "memvp_token_latency_seconds", "Between consecutive tokens of a request.");
        m.batch.render(&mut out, "memvp_batch_size", "Rows per decoding step.");
        out
    }
}
