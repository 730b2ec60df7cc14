//! `memvp loadtest`: drives a `memvp serve` (or any OpenAI-style chat endpoint) with streaming
//! requests from several client threads and reports throughput, latency and time-to-first-token
//! percentiles and every error by kind, accounting for every request sent. It only talks to the
//! URL it is given.

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct LoadtestArgs {
    /// The server's base URL, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    pub url: String,
    /// Requests to send (ignored with --duration).
    #[arg(long, default_value_t = 100)]
    pub requests: usize,
    /// Client threads, each with one request in flight.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Send requests for this many seconds instead of a fixed number (a soak test).
    #[arg(long)]
    pub duration: Option<f64>,
    /// A folder of PNG/JPEG images to ask about (otherwise text-only questions).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Consecutive questions about each image (the later ones can hit the server's cache).
    #[arg(long, default_value_t = 1)]
    pub questions_per_image: usize,
    /// The adapter to ask (default: the server's only one).
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    /// Ask for exactly --max-tokens tokens per answer (the server's ignore_eos extension).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Percent of requests sent as malformed JSON (they must get a 400).
    #[arg(long, default_value_t = 0.0)]
    pub malformed_percent: f64,
    #[arg(long)]
    pub api_key: Option<String>,
    #[arg(long)]
    pub json: bool,
}

const QUESTIONS: &[&str] = &[
    "What color is the shape?",
    "What shape is in the image?",
    "Is there a circle in the image?",
    "Does the image contain a rectangle?",
];

#[derive(Default)]
struct Tally {
    ok: usize,
    errors: BTreeMap<String, usize>,
    malformed_sent: usize,
    malformed_rejected: usize,
    tokens: usize,
    cache_hits: usize,
    latency: Vec<f64>,
    ttft: Vec<f64>,
    ttft_hit: Vec<f64>,
    ttft_miss: Vec<f64>,
}

fn percentiles(v: &mut [f64]) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    json!({"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "mean": mean, "max": v[v.len() - 1]})
}

/// One streaming request; `Ok((tokens, ttft_ms, cache_hit))` or the error kind.
fn one(agent: &ureq::Agent, a: &LoadtestArgs, body: &str) -> std::result::Result<(usize, f64, bool), String> {
    let t0 = Instant::now();
    let mut req = agent
        .post(format!("{}/v1/chat/completions", a.url.trim_end_matches('/')))
        .header("content-type", "application/json");
    if let Some(k) = &a.api_key {
        req = req.header("authorization", &format!("Bearer {k}"));
    }
    let resp = req.send(body).map_err(|e| format!("transport: {e}"))?;
    let status = resp.status().as_u16();
    if status != 200 {
        return Err(format!("status_{status}"));
    }
    let mut reader = BufReader::new(resp.into_body().into_reader());
    let (mut ttft, mut tokens, mut hit, mut done) = (None, 0usize, false, false);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).map_err(|e| format!("transport: {e}"))?;
        if n == 0 {
            break;
        }
        let Some(data) = line.trim_end().strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            done = true;
            break;
        }
        let v: Value = serde_json::from_str(data).map_err(|_| "bad_stream".to_string())?;
        if v.get("error").is_some() {
            return Err(format!("stream_error_{}", v["error"]["type"].as_str().unwrap_or("unknown")));
        }
        if v["memvp"]["cache_hit"] == true {
            hit = true;
        }
        if v["choices"][0]["delta"]["content"].as_str().is_some_and(|c| !c.is_empty()) && ttft.is_none() {
            ttft = Some(t0.elapsed().as_secs_f64() * 1e3);
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n as usize;
        }
    }
    if !done {
        return Err("stream_cut".into());
    }
    Ok((tokens, ttft.unwrap_or_else(|| t0.elapsed().as_secs_f64() * 1e3), hit))
}

pub fn run(a: &LoadtestArgs) -> Result<Value> {
    if a.concurrency == 0
        || (a.duration.is_none() && a.requests == 0)
        || a.questions_per_image == 0
        || a.max_tokens == 0
    {
        bail!("--requests, --concurrency, --questions-per-image and --max-tokens must be at least 1")
    }
    if !(0.0..=100.0).contains(&a.malformed_percent) {
        bail!("--malformed-percent {}: must be in [0, 100]", a.malformed_percent)
    }
    if !a.url.starts_with("http://") {
        bail!("--url {}: give an http:// URL of the server", a.url)
    }
    let images: Vec<String> = match &a.images {
        Some(dir) => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_context(|| format!("{}: cannot read the image folder", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| matches!(x.to_str(), Some("png" | "jpg" | "jpeg"))))
                .collect();
            files.sort();
            if files.is_empty() {
                bail!("{}: no .png or .jpg images", dir.display())
            }
            files
                .iter()
                .map(|p| {
                    let mime = if p.extension().is_some_and(|x| x == "png") { "image/png" } else { "image/jpeg" };
                    let b = std::fs::read(p).with_context(|| format!("{}: cannot read", p.display()))?;
                    Ok(format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(b)))
                })
                .collect::<Result<_>>()?
        }
        None => vec![],
    };
    let body = |i: usize| -> String {
        let q = QUESTIONS[i % QUESTIONS.len()];
        let mut content = vec![json!({"type": "text", "text": q})];
        if !images.is_empty() {
            let img = &images[(i / a.questions_per_image) % images.len()];
            content.push(json!({"type": "image_url", "image_url": {"url": img}}));
        }
        let mut v = json!({"messages": [{"role": "user", "content": content}], "max_tokens": a.max_tokens,
            "temperature": 0, "stream": true});
        if let Some(m) = &a.model {
            v["model"] = json!(m);
        }
        if a.ignore_eos {
            v["ignore_eos"] = json!(true);
        }
        v.to_string()
    };
    let next = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let start = Instant::now();
    let deadline = a.duration.map(|d| start + Duration::from_secs_f64(d));
    std::thread::scope(|scope| {
        for _ in 0..a.concurrency {
            let (next, tally, body) = (next.clone(), tally.clone(), &body);
            scope.spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(600)))
                    .build()
                    .into();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    match deadline {
                        Some(d) if Instant::now() >= d => break,
                        None if i >= a.requests => break,
                        _ => {}
                    }
                    // Every k-th request is malformed, spread evenly.
                    let malformed = a.malformed_percent > 0.0
                        && ((i + 1) as f64 * a.malformed_percent / 100.0).floor()
                            > (i as f64 * a.malformed_percent / 100.0).floor();
                    let t0 = Instant::now();
                    if malformed {
                        let r = one(&agent, a, "{\"messages\": [{\"role\": \"user\", \"content\": ");
                        let mut t = tally.lock().expect("tally lock");
                        t.malformed_sent += 1;
                        match r {
                            Err(k) if k == "status_400" => t.malformed_rejected += 1,
                            Err(k) => *t.errors.entry(format!("malformed_got_{k}")).or_default() += 1,
                            Ok(_) => *t.errors.entry("malformed_accepted".into()).or_default() += 1,
                        }
                        continue;
                    }
                    let r = one(&agent, a, &body(i));
                    let ms = t0.elapsed().as_secs_f64() * 1e3;
                    let mut t = tally.lock().expect("tally lock");
                    match r {
                        Ok((tokens, ttft, hit)) => {
                            t.ok += 1;
                            t.tokens += tokens;
                            t.cache_hits += hit as usize;
                            t.latency.push(ms);
                            t.ttft.push(ttft);
                            if hit { t.ttft_hit.push(ttft) } else { t.ttft_miss.push(ttft) }
                        }
                        Err(kind) => *t.errors.entry(kind).or_default() += 1,
                    }
                }
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    let mut t = std::mem::take(&mut *tally.lock().expect("tally lock"));
    let failed: usize = t.errors.iter().filter(|(k, _)| !k.starts_with("malformed")).map(|(_, n)| n).sum();
    let sent = t.ok + failed + t.malformed_sent;
    // Requests that got no HTTP answer at all.
    let lost: usize =
        t.errors.iter().filter(|(k, _)| k.contains("transport") || k.contains("stream_cut")).map(|(_, n)| n).sum();
    Ok(json!({
        "url": a.url,
        "concurrency": a.concurrency,
        "requests": sent,
        "ok": t.ok,
        "failed": failed,
        "errors": t.errors,
        "malformed_sent": t.malformed_sent,
        "malformed_rejected": t.malformed_rejected,
        "lost": lost,
        "seconds": secs,
        "requests_per_s": t.ok as f64 / secs,
        "completion_tokens": t.tokens,
        "tokens_per_s": t.tokens as f64 / secs,
        "cache_hits": t.cache_hits,
        "latency_ms": percentiles(&mut t.latency),
        "time_to_first_token_ms": percentiles(&mut t.ttft),
        "time_to_first_token_ms_cache_hit": percentiles(&mut t.ttft_hit),
        "time_to_first_token_ms_cache_miss": percentiles(&mut t.ttft_miss),
    }))
}

pub fn print(v: &Value) {
    println!(
        "{} requests to {} at concurrency {}: {} ok, {} failed {}, {} malformed rejected, {} lost",
        v["requests"],
        v["url"],
        v["concurrency"],
        v["ok"],
        v["failed"],
        v["errors"],
        v["malformed_rejected"],
        v["lost"]
    );
    println!(
        "{:.2} requests/s, {:.1} tokens/s over {:.1} s; cache hits {}",
        v["requests_per_s"].as_f64().unwrap_or(0.0),
        v["tokens_per_s"].as_f64().unwrap_or(0.0),
        v["seconds"].as_f64().unwrap_or(0.0),
        v["cache_hits"]
    );
    for k in ["latency_ms", "time_to_first_token_ms"] {
        let p = &v[k];
        println!(
            "{k:<24} p50 {:.1}  p90 {:.1}  p99 {:.1}",
            p["p50"].as_f64().unwrap_or(f64::NAN),
            p["p90"].as_f64().unwrap_or(f64::NAN),
            p["p99"].as_f64().unwrap_or(f64::NAN)
        );
    }
}
