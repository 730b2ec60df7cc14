//! `memvp serve` end to end on the tiny fixtures: the API's shape (JSON and streaming), replies
//! equal to `memvp generate --run`, batching invariance, the visual-memory cache, adapter
//! hot-swap, every bad input, client disconnects, timeouts, the API key and the drain on
//! SIGTERM. Servers listen on 127.0.0.1 with a free port.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn s(x: impl AsRef<std::ffi::OsStr>) -> String {
    x.as_ref().to_string_lossy().to_string()
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_memvp"));
    c.env_remove("RUST_BACKTRACE");
    c
}

/// A trained tiny run and its data (made once for all tests of this file).
struct Setup {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    run: PathBuf,
    run2: PathBuf,
    images: Vec<PathBuf>,
}

fn setup() -> &'static Setup {
    static S: OnceLock<Setup> = OnceLock::new();
    S.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let data = memvp::data::synthetic::write_shapes(&tmp.path().join("data"), 8, 2, 32, 3).unwrap();
        // The tiny LM with room for long answers (its 256 positions end a generation within
        // milliseconds, before a client's disconnect can be noticed).
        let lm = tmp.path().join("lm");
        std::fs::create_dir_all(&lm).unwrap();
        for e in std::fs::read_dir(fixtures().join("llama_gqa_tied")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), lm.join(e.file_name())).unwrap();
        }
        let cfg_path = lm.join("config.json");
        let mut cfg: Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
        cfg["max_position_embeddings"] = json!(16384);
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let train = |out: &Path, seed: &str| {
            let o = bin()
                .args(["train", "--vision", "random:tiny", "--lm", &s(&lm)])
                .args(["--data", &format!("jsonl:{}", data.display()), "--out", &s(out), "--max-len", "64"])
                .args(["--slots", "16", "--hidden-proj", "8", "--vision-adapter-dim", "4", "--batch-size", "4"])
                .args(["--max-steps", "6", "--blr", "0.5", "--seed", seed])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        };
        let (run, run2) = (tmp.path().join("run"), tmp.path().join("run2"));
        train(&run, "1");
        train(&run2, "2");
        let mut images: Vec<PathBuf> =
            std::fs::read_dir(data.parent().unwrap().join("images")).unwrap().map(|e| e.unwrap().path()).collect();
        images.sort();
        Setup { _tmp: tmp, data, run, run2, images }
    })
}

struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let st = setup();
        let mut child = bin()
            .args(["serve", "--run", &format!("tiny={}", st.run.display()), "--port", "0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url =
            line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("no address: {line:?}")).to_string();
        Server { child, url }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// (status, body as JSON, Retry-After) of a POST.
fn post(url: &str, body: &str, key: Option<&str>) -> (u16, Value, Option<String>) {
    let mut r = agent().post(url).header("content-type", "application/json");
    if let Some(k) = key {
        r = r.header("authorization", &format!("Bearer {k}"));
    }
    let mut resp = r.send(body).unwrap();
    let status = resp.status().as_u16();
    let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    let text = resp.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)), retry)
}

fn get(url: &str) -> (u16, String) {
    let mut resp = agent().get(url).call().unwrap();
    (resp.status().as_u16(), resp.body_mut().read_to_string().unwrap())
}

fn data_url(p: &Path) -> String {
    use base64::Engine as _;
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(std::fs::read(p).unwrap()))
}

fn chat(model: &str, question: &str, image: Option<&Path>, extra: Value) -> String {
    let mut content = vec![json!({"type": "text", "text": question})];
    if let Some(p) = image {
        content.push(json!({"type": "image_url", "image_url": {"url": data_url(p)}}));
    }
    let mut v =
        json!({"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0});
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v.to_string()
}

fn error_of(v: &Value) -> (&str, &str) {
    (v["error"]["type"].as_str().unwrap_or(""), v["error"]["message"].as_str().unwrap_or(""))
}

#[test]
fn replies_have_the_openai_shape_and_equal_generate() {
    let st = setup();
    let srv = Server::start(&[]);
    let q = "What colour is the shape?";
    let (status, v, _) =
        post(&format!("{}/v1/chat/completions", srv.url), &chat("tiny", q, Some(&st.images[0]), json!({})), None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(v["created"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(v["model"], "tiny");
    let c = &v["choices"][0];
    assert_eq!(c["message"]["role"], "assistant");
    assert!(c["finish_reason"] == "stop" || c["finish_reason"] == "length");
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(v["memvp"]["cache_hit"], false);
    // The same as `memvp generate --run`.
    let o = bin()
        .args(["generate", "--run", &s(&st.run), "--image", &s(&st.images[0]), "--prompt", q])
        .args(["--max-new-tokens", "8", "--temperature", "0", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let g: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(c["message"]["content"], g["text"], "server and generate differ");
    assert_eq!(u["completion_tokens"].as_u64().unwrap() as usize, g["generated_ids"].as_array().unwrap().len());
    // The same image again: its visual memory comes from the cache, the answer is the same.
    let (_, v2, _) =
        post(&format!("{}/v1/chat/completions", srv.url), &chat("tiny", q, Some(&st.images[0]), json!({})), None);
    assert_eq!(v2["memvp"]["cache_hit"], true);
    assert_eq!(v2["choices"][0]["message"]["content"], c["message"]["content"]);
    // Streaming: chunks whose contents concatenate to the same text, then [DONE].
    let mut resp = agent()
        .post(&format!("{}/v1/chat/completions", srv.url))
        .send(chat("tiny", q, Some(&st.images[0]), json!({"stream": true})))
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.headers().get("content-type").unwrap().to_str().unwrap().starts_with("text/event-stream"));
    let body = resp.body_mut().read_to_string().unwrap();
    let datas: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(*datas.last().unwrap(), "[DONE]");
    let mut text = String::new();
    let mut finish = None;
    for d in &datas[..datas.len() - 1] {
        let j: Value = serde_json::from_str(d).unwrap();
        assert_eq!(j["object"], "chat.completion.chunk");
        if let Some(t) = j["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if let Some(f) = j["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_string());
            assert!(j["usage"]["completion_tokens"].as_u64().is_some());
        }
    }
    assert_eq!(text, c["message"]["content"].as_str().unwrap());
    assert_eq!(finish.as_deref(), c["finish_reason"].as_str());
    // Multi-turn: the last user message is the question, the last image of the conversation the
    // image (here from the first turn), assistant turns are not shown to the model.
    let multi = json!({"model": "tiny", "temperature": 0, "max_tokens": 8, "messages": [
        {"role": "system", "content": "You answer questions about images."},
        {"role": "user", "content": [{"type": "text", "text": "Describe it."}, {"type": "image_url", "image_url": {"url": data_url(&st.images[0])}}]},
        {"role": "assistant", "content": "A shape."},
        {"role": "user", "content": q}]});
    let (status, v3, _) = post(&format!("{}/v1/chat/completions", srv.url), &multi.to_string(), None);
    assert_eq!(status, 200, "{v3}");
    assert_eq!(v3["choices"][0]["message"]["content"], c["message"]["content"]);
    assert_eq!(v3["memvp"]["cache_hit"], true);
    // Metrics and health.
    let (_, m) = get(&format!("{}/metrics", srv.url));
    assert!(m.contains("memvp_requests_total{status=\"200\"}") && m.contains("memvp_cache_hits_total 3"), "{m}");
    assert!(m.contains("memvp_time_to_first_token_seconds_bucket"));
    let (hs, h) = get(&format!("{}/health", srv.url));
    assert_eq!(hs, 200, "{h}");
    let (_, page) = get(&format!("{}/", srv.url));
    assert!(page.contains("<html") && page.contains("/v1/chat/completions"));
}

#[test]
fn outputs_do_not_depend_on_the_batch() {
    let st = setup();
    let srv = Server::start(&["--max-batch", "8"]);
    let questions = ["What colour is the shape?", "What shape is it?", "Is it red?", "What is shown?"];
    let bodies: Vec<String> = (0..32)
        .map(|i| {
            let img = (i % 3 != 2).then(|| st.images[i % st.images.len()].as_path());
            let sampled = if i % 4 == 3 { json!({"temperature": 0.8, "seed": i}) } else { json!({}) };
            let mut b: Value = serde_json::from_str(&chat("tiny", questions[i % 4], img, sampled)).unwrap();
            b["max_tokens"] = json!(3 + i % 9);
            b.to_string()
        })
        .collect();
    let url = format!("{}/v1/chat/completions", srv.url);
    let one_by_one: Vec<Value> = bodies.iter().map(|b| post(&url, b, None).1).collect();
    let handles: Vec<_> = bodies
        .iter()
        .cloned()
        .map(|b| {
            let url = url.clone();
            std::thread::spawn(move || post(&url, &b, None).1)
        })
        .collect();
    let together: Vec<Value> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (i, (a, b)) in one_by_one.iter().zip(&together).enumerate() {
        assert_eq!(
            a["choices"][0]["message"]["content"], b["choices"][0]["message"]["content"],
            "request {i}: {a} vs {b}"
        );
        assert_eq!(a["choices"][0]["finish_reason"], b["choices"][0]["finish_reason"]);
    }
    // They were really batched.
    let (_, m) = get(&format!("{}/metrics", srv.url));
    let value = |prefix: &str| -> u64 {
        m.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.split_whitespace().last()).unwrap().parse().unwrap()
    };
    let big = value("memvp_batch_size_count") - value("memvp_batch_size_bucket{le=\"2\"}");
    assert!(big > 0, "no step ran more than two rows:\n{m}");
}

#[test]
fn adapters_load_and_unload_while_serving() {
    let st = setup();
    let srv = Server::start(&[]);
    let url = format!("{}/v1/adapters", srv.url);
    let (status, v, _) = post(&url, &json!({"name": "second", "run": st.run2}).to_string(), None);
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["id"], "second");
    let (_, models) = get(&format!("{}/v1/models", srv.url));
    let models: Value = serde_json::from_str(&models).unwrap();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["second", "tiny"]);
    let chat_url = format!("{}/v1/chat/completions", srv.url);
    let (s1, a, _) = post(&chat_url, &chat("second", "What shape is it?", Some(&st.images[1]), json!({})), None);
    let (s2, b, _) = post(&chat_url, &chat("tiny", "What shape is it?", Some(&st.images[1]), json!({})), None);
    assert_eq!((s1, s2), (200, 200), "{a} {b}");
    // Loading it twice, or a directory that is not a run.
    assert_eq!(post(&url, &json!({"name": "second", "run": st.run2}).to_string(), None).0, 409);
    let (st400, e, _) = post(&url, &json!({"name": "third", "run": st.data}).to_string(), None);
    assert_eq!(st400, 400, "{e}");
    assert!(error_of(&e).1.contains("adapter_config.json"), "{e}");
    // Unloaded: its requests get 404, the other adapter still answers.
    let mut resp = agent().delete(&format!("{url}/second")).call().unwrap();
    assert_eq!(resp.status().as_u16(), 200, "{}", resp.body_mut().read_to_string().unwrap());
    let (s3, e, _) = post(&chat_url, &chat("second", "What shape is it?", None, json!({})), None);
    assert_eq!(s3, 404, "{e}");
    assert_eq!(e["error"]["code"], "model_not_found");
    assert_eq!(post(&chat_url, &chat("tiny", "What shape is it?", None, json!({})), None).0, 200);
}

#[test]
fn bad_input_gets_a_4xx_with_an_error_object() {
    let st = setup();
    let srv = Server::start(&["--max-image-pixels", "1100", "--max-body-mb", "1", "--max-images", "2"]);
    let url = format!("{}/v1/chat/completions", srv.url);
    let img = data_url(&st.images[0]);
    let big = {
        use base64::Engine as _;
        let mut buf = Vec::new();
        image::RgbImage::new(40, 40).write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png).unwrap();
        format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(buf))
    };
    let user =
        |content: Value| json!({"model": "tiny", "messages": [{"role": "user", "content": content}]}).to_string();
    let part = |u: &str| json!({"type": "image_url", "image_url": {"url": u}});
    let text = json!({"type": "text", "text": "What shape?"});
    let cases: Vec<(String, u16, &str)> = vec![
        ("{not json".into(), 400, "malformed JSON"),
        ("[1, 2]".into(), 400, "JSON object"),
        (json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}).to_string(), 404, "not loaded"),
        (json!({"model": "tiny", "messages": []}).to_string(), 400, "empty"),
        (json!({"model": "tiny"}).to_string(), 400, "messages"),
        (user(json!([text, part("data:image/png;base64,@@@")])), 400, "base64"),
        (user(json!([text, part("data:image/png;base64,aGVsbG8gd29ybGQ=")])), 400, "not an image"),
        (user(json!([text, part("data:text/plain;base64,aGk=")])), 400, "unsupported image type"),
        (user(json!([text, part("https://example.com/x.png")])), 400, "remote"),
        (user(json!([text, part("/etc/passwd")])), 400, "--allow-files"),
        (user(json!([text, part(&big)])), 400, "over the server's limit"),
        (user(json!([text, part(&img), part(&img), part(&img)])), 400, "at most 2"),
        (user(json!([{"type": "audio"}])), 400, "unknown content part"),
        (user(json!("   ")), 400, "empty"),
        (json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}).to_string(), 400, "temperature"),
        (json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).to_string(), 400, "temperature"),
        (json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}).to_string(), 400, "top_p"),
        (json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).to_string(), 400, "max_tokens"),
        (json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e9}).to_string(), 400, "max_tokens"),
        (json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2}).to_string(), 400, "n = 1"),
        (json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": [1]}).to_string(), 400, "stop"),
        (json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}).to_string(), 400, "last message"),
        (json!({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}).to_string(), 400, "role"),
        (json!({"model": "tiny", "messages": [{"role": "user", "content": "hi ".repeat(12000)}]}).to_string(), 400, "too long"),
    ];
    for (body, status, needle) in &cases {
        let (got, v, _) = post(&url, body, None);
        assert_eq!(got, *status, "{body:.200}: {v}");
        let (kind, msg) = error_of(&v);
        assert!(!kind.is_empty() && msg.contains(needle), "{body:.200}: {v}");
        assert!(v["error"].get("param").is_some() && v["error"].get("code").is_some(), "{v}");
    }
    // A body over --max-body-mb.
    let huge =
        json!({"model": "tiny", "messages": [{"role": "user", "content": "x".repeat((1 << 20) + 50_000)}]}).to_string();
    let (got, v, _) = post(&url, &huge, None);
    assert_eq!(got, 413, "{v}");
    assert_eq!(v["error"]["code"], "body_too_large");
    // Unknown endpoints.
    assert_eq!(get(&format!("{}/v2/nothing", srv.url)).0, 404);
    // The server still answers.
    assert_eq!(post(&url, &chat("tiny", "What shape?", Some(&st.images[0]), json!({})), None).0, 200);
}

#[test]
fn the_api_key_is_required_when_set() {
    let srv = Server::start(&["--api-key", "sesame"]);
    let url = format!("{}/v1/chat/completions", srv.url);
    let body = chat("tiny", "What shape?", None, json!({}));
    let (st, v, _) = post(&url, &body, None);
    assert_eq!(st, 401, "{v}");
    assert_eq!(v["error"]["type"], "authentication_error");
    assert_eq!(post(&url, &body, Some("wrong")).0, 401);
    assert_eq!(post(&url, &body, Some("sesame")).0, 200);
    assert_eq!(get(&format!("{}/health", srv.url)).0, 200);
}

#[test]
fn a_full_queue_gets_429_with_retry_after_and_nothing_is_lost() {
    let st = setup();
    let srv = Server::start(&["--max-batch", "1", "--max-queue", "1"]);
    let url = format!("{}/v1/chat/completions", srv.url);
    let body = chat("tiny", "What shape?", Some(&st.images[0]), json!({"max_tokens": 200}));
    let handles: Vec<_> = (0..24)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            std::thread::spawn(move || post(&url, &body, None))
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let full: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert!(!full.is_empty(), "no request was refused with a queue of 1");
    for r in &full {
        assert_eq!(r.2.as_deref(), Some("1"), "429 without Retry-After");
        assert_eq!(r.1["error"]["code"], "queue_full");
    }
    assert!(results.iter().all(|r| r.0 == 200 || r.0 == 429), "{:?}", results.iter().map(|r| r.0).collect::<Vec<_>>());
    assert!(results.iter().any(|r| r.0 == 200));
}

#[test]
fn disconnects_free_their_slot_and_timeouts_end_with_an_error() {
    let st = setup();
    let srv = Server::start(&["--max-batch", "2"]);
    let url = format!("{}/v1/chat/completions", srv.url);
    // A streaming client that goes away after the first chunk.
    let body = chat(
        "tiny",
        "What shape?",
        Some(&st.images[0]),
        json!({"stream": true, "max_tokens": 4000, "ignore_eos": true}),
    );
    {
        let resp = agent().post(&url).send(&body).unwrap();
        let mut r = resp.into_body().into_reader();
        let mut first = [0u8; 64];
        r.read_exact(&mut first).unwrap();
    }
    let start = Instant::now();
    loop {
        let (_, m) = get(&format!("{}/metrics", srv.url));
        if m.contains("memvp_running_requests 0") && m.contains("status=\"499\"") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "the abandoned request still holds its slot:\n{m}");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(srv);
    // A request over --request-timeout ends with an error, not a hang.
    let srv = Server::start(&["--request-timeout", "0.005"]);
    let url = format!("{}/v1/chat/completions", srv.url);
    let (status, v, _) = post(
        &url,
        &chat("tiny", "What shape?", Some(&st.images[1]), json!({"max_tokens": 4000, "ignore_eos": true})),
        None,
    );
    assert_eq!(status, 504, "{v}");
    assert_eq!(v["error"]["type"], "timeout");
}

#[test]
fn sigterm_drains_running_requests_and_exits_0() {
    let st = setup();
    let mut srv = Server::start(&[]);
    let url = format!("{}/v1/chat/completions", srv.url);
    let body = chat("tiny", "What shape?", Some(&st.images[0]), json!({"stream": true, "max_tokens": 200}));
    let resp = agent().post(&url).send(&body).unwrap();
    let mut r = BufReader::new(resp.into_body().into_reader());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("data: "), "{line}");
    let k = Command::new("kill").args(["-TERM", &srv.child.id().to_string()]).status().unwrap();
    assert!(k.success());
    let mut rest = String::new();
    r.read_to_string(&mut rest).unwrap();
    assert!(rest.trim_end().ends_with("data: [DONE]"), "the running stream was cut:\n{rest}");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = srv.child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "the server did not exit after draining");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    assert!(agent().get(&format!("{}/health", srv.url)).call().is_err(), "still accepting connections");
}

#[test]
fn loadtest_accounts_for_every_request() {
    let st = setup();
    let srv = Server::start(&["--max-batch", "8"]);
    let dir = st.images[0].parent().unwrap();
    let o = bin()
        .args(["loadtest", "--url", &srv.url, "--requests", "40", "--concurrency", "6", "--images", &s(dir)])
        .args(["--questions-per-image", "2", "--max-tokens", "6", "--malformed-percent", "10", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["requests"], 40, "{v}");
    assert_eq!(v["malformed_sent"], 4, "{v}");
    assert_eq!(v["malformed_rejected"], 4, "{v}");
    assert_eq!(v["ok"], 36, "{v}");
    assert_eq!(v["failed"], 0, "{v}");
    assert_eq!(v["lost"], 0, "{v}");
    assert!(v["cache_hits"].as_u64().unwrap() > 0, "{v}");
    assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0);
    // Each request's latency is at least its time to first token, so every percentile is too.
    for k in ["p50", "p90", "p99"] {
        assert!(v["latency_ms"][k].as_f64().unwrap() >= v["time_to_first_token_ms"][k].as_f64().unwrap(), "{v}");
    }
}

#[test]
fn adem_runs_are_served_as_generate_answers() {
    // ADEM-VL: its "Image: " words and CLS slot go into the server's prompts as into generate's.
    let st = setup();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("adem");
    let lm = st.run.join("..").join("lm");
    let o = bin()
        .args(["train", "--method", "adem", "--vision", "random:tiny", "--lm", &s(&lm)])
        .args(["--data", &format!("jsonl:{}", st.data.display()), "--out", &s(&run), "--max-len", "64"])
        .args(["--hidden-proj", "8", "--vision-adapter-dim", "4", "--batch-size", "4", "--max-steps", "6"])
        .args(["--blr", "0.5", "--seed", "1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut child = bin()
        .args(["serve", "--run", &format!("adem={}", run.display()), "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let srv = Server { child, url: line.trim().strip_prefix("listening on ").unwrap().to_string() };
    let q = "What shape is in the image?";
    for image in [Some(&st.images[1]), None] {
        let (status, v, _) = post(
            &format!("{}/v1/chat/completions", srv.url),
            &chat("adem", q, image.map(|p| p.as_path()), json!({})),
            None,
        );
        assert_eq!(status, 200, "{v}");
        let mut g = bin();
        g.args(["generate", "--run", &s(&run), "--prompt", q, "--max-new-tokens", "8", "--temperature", "0", "--json"]);
        if let Some(p) = image {
            g.args(["--image", &s(p)]);
        }
        let o = g.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let gj: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], gj["text"], "image {image:?}: server and generate differ");
        assert_eq!(v["usage"]["prompt_tokens"], gj["prompt_ids"].as_array().map(|a| a.len()).unwrap_or(0), "{gj}");
    }
}
