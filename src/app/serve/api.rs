//! The HTTP API of `memvp serve`, in OpenAI's chat-completions shape, and its error objects.
//!
//! Conversations: an adapter answers one question about one image, so the server asks it the
//! *last user message* (its text parts joined by newlines) about the *last image* anywhere in
//! the conversation; system and assistant messages are not shown to the model. A follow-up
//! question about an image sent in an earlier turn therefore reuses that image (and its cached
//! visual memory).

use super::engine::{Event, ImageInput, Job, Msg, Served, Shared};
use crate::generate::Sampling;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{Html, IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The limits and switches of a server.
#[derive(Clone, Debug)]
pub struct Limits {
    pub api_key: Option<String>,
    pub max_queue: usize,
    pub request_timeout: Duration,
    pub max_image_pixels: u64,
    pub max_images: usize,
    pub max_tokens: usize,
    /// Local image paths are read only inside this folder.
    pub allow_files: Option<PathBuf>,
}

pub struct App {
    pub shared: Arc<Shared>,
    pub tx: Mutex<mpsc::Sender<Msg>>,
    pub limits: Limits,
    pub draining: AtomicBool,
    pub next_id: AtomicU64,
}

/// An OpenAI-style error response.
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            kind,
            message: message.into(),
            param: None,
            code: None,
        }
    }
    fn bad(message: impl Into<String>, param: &'static str) -> Self {
        Self { param: Some(param), ..Self::new(400, "invalid_request_error", message) }
    }
    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

type ApiResult<T> = std::result::Result<T, ApiError>;

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl App {
    fn authorize(&self, headers: &HeaderMap) -> ApiResult<()> {
        let Some(key) = &self.limits.api_key else { return Ok(()) };
        let got =
            headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if got == Some(key.as_str()) {
            Ok(())
        } else {
            Err(ApiError::new(401, "authentication_error", "missing or wrong API key (Authorization: Bearer KEY)")
                .code("invalid_api_key"))
        }
    }

    fn reject(&self, e: ApiError) -> Response {
        self.shared.metrics.request_done(e.status.as_u16());
        e.into_response()
    }
}

/// The question and the image of a conversation (see the module's doc).
struct Parsed {
    served: Arc<Served>,
    question: String,
    image: Option<ImageInput>,
    sampling: Sampling,
    stop: Vec<String>,
    stream: bool,
    ignore_eos: bool,
}

fn image_bytes(url: &str, limits: &Limits) -> ApiResult<Vec<u8>> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (mime, data) =
            rest.split_once(',').ok_or_else(|| ApiError::bad("malformed data URL (no comma)", "messages"))?;
        let Some(mime) = mime.strip_suffix(";base64") else {
            return Err(ApiError::bad("image data URLs must be base64 (data:image/png;base64,...)", "messages"));
        };
        if !matches!(mime, "image/png" | "image/jpeg" | "image/jpg") {
            return Err(ApiError::bad(
                format!("unsupported image type `{mime}` (image/png or image/jpeg)"),
                "messages",
            ));
        }
        return base64::engine::general_purpose::STANDARD.decode(data.trim()).map_err(|e| {
            ApiError::bad(format!("the image's base64 does not decode: {e}"), "messages").code("bad_base64")
        });
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return Err(ApiError::bad("remote image URLs are not fetched; send the image as a data URL", "messages"));
    }
    let Some(dir) = &limits.allow_files else {
        return Err(ApiError::bad(
            "local image paths need the server to be started with --allow-files DIR",
            "messages",
        ));
    };
    let p = PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
    let p = if p.is_relative() { dir.join(p) } else { p };
    let real = p.canonicalize().map_err(|_| ApiError::bad(format!("{}: no such image", p.display()), "messages"))?;
    if !real.starts_with(dir) {
        return Err(ApiError::bad(format!("{}: outside the allowed folder", p.display()), "messages"));
    }
    std::fs::read(&real).map_err(|e| ApiError::bad(format!("{}: {e}", p.display()), "messages"))
}

/// Checks the image's header and size before anything is decoded.
fn check_image(bytes: &[u8], limits: &Limits) -> ApiResult<()> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ApiError::bad(format!("not an image: {e}"), "messages"))?;
    if reader.format().is_none() {
        return Err(ApiError::bad("not an image (PNG or JPEG expected)", "messages").code("invalid_image"));
    }
    let (w, h) =
        reader.into_dimensions().map_err(|e| ApiError::bad(format!("not a readable image: {e}"), "messages"))?;
    if (w as u64) * (h as u64) > limits.max_image_pixels {
        return Err(ApiError::bad(
            format!("the image has {w}x{h} pixels, over the server's limit of {}", limits.max_image_pixels),
            "messages",
        )
        .code("image_too_large"));
    }
    Ok(())
}

fn num(v: &Value, key: &'static str) -> ApiResult<Option<f64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_f64().map(Some).ok_or_else(|| ApiError::bad(format!("`{key}` must be a number"), key)),
    }
}

fn parse(app: &App, body: &[u8]) -> ApiResult<Parsed> {
    let v: Value = serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("malformed JSON: {e}"), "body"))?;
    if !v.is_object() {
        return Err(ApiError::bad("the request body must be a JSON object", "body"));
    }
    let served = {
        let reg = app.shared.registry.read().expect("registry lock");
        match v.get("model") {
            Some(Value::String(m)) => reg.adapters.get(m).cloned().ok_or_else(|| {
                ApiError::new(
                    404,
                    "invalid_request_error",
                    format!("the model `{m}` is not loaded (GET /v1/models lists them)"),
                )
                .code("model_not_found")
            })?,
            None | Some(Value::Null) if reg.adapters.len() == 1 => {
                reg.adapters.values().next().cloned().expect("one adapter")
            }
            _ => return Err(ApiError::bad("`model` must name a loaded adapter", "model")),
        }
    };
    let msgs = v
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::bad("`messages` must be a list", "messages"))?;
    if msgs.is_empty() {
        return Err(ApiError::bad("`messages` is empty", "messages"));
    }
    let mut question = None;
    let mut images = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad(format!("messages[{i}] has no `role`"), "messages"))?;
        if !matches!(role, "system" | "user" | "assistant" | "developer") {
            return Err(ApiError::bad(format!("messages[{i}]: unknown role `{role}`"), "messages"));
        }
        let mut texts = Vec::new();
        match m.get("content") {
            Some(Value::String(s)) => texts.push(s.clone()),
            Some(Value::Array(parts)) => {
                for p in parts {
                    match p.get("type").and_then(Value::as_str) {
                        Some("text") => texts.push(
                            p.get("text")
                                .and_then(Value::as_str)
                                .ok_or_else(|| ApiError::bad("a text part needs `text`", "messages"))?
                                .to_string(),
                        ),
                        Some("image_url") => {
                            let url = match p.get("image_url") {
                                Some(Value::String(u)) => u.as_str(),
                                Some(o) => o
                                    .get("url")
                                    .and_then(Value::as_str)
                                    .ok_or_else(|| ApiError::bad("an image part needs `image_url.url`", "messages"))?,
                                None => return Err(ApiError::bad("an image part needs `image_url`", "messages")),
                            };
                            if role == "user" {
                                images.push(url.to_string());
                            }
                        }
                        other => return Err(ApiError::bad(format!("unknown content part type {other:?}"), "messages")),
                    }
                }
            }
            Some(Value::Null) | None if role == "assistant" => {}
            _ => {
                return Err(ApiError::bad(
                    format!("messages[{i}]: `content` must be a string or a list of parts"),
                    "messages",
                ));
            }
        }
        if role == "user" {
            question = Some(texts.join("\n"));
        } else if i + 1 == msgs.len() {
            return Err(ApiError::bad("the last message must be the user's question", "messages"));
        }
    }
    let question = question
        .filter(|q| !q.trim().is_empty())
        .ok_or_else(|| ApiError::bad("the user's question is empty", "messages"))?;
    if images.len() > app.limits.max_images {
        return Err(ApiError::bad(
            format!("{} images in the conversation; the server takes at most {}", images.len(), app.limits.max_images),
            "messages",
        )
        .code("too_many_images"));
    }
    let image = match images.last() {
        Some(url) => {
            if !served.vlm.uses_images() {
                return Err(ApiError::bad(format!("the model `{}` does not use images", served.name), "messages"));
            }
            let bytes = image_bytes(url, &app.limits)?;
            check_image(&bytes, &app.limits)?;
            let sha256: [u8; 32] = Sha256::digest(&bytes).into();
            Some(ImageInput { sha256, bytes: Arc::new(bytes) })
        }
        None => None,
    };
    if let Some(n) = v.get("n").filter(|n| !n.is_null())
        && n.as_u64() != Some(1)
    {
        return Err(ApiError::bad("only n = 1 is supported", "n"));
    }
    let max_tokens = match num(&v, "max_tokens")?.or(num(&v, "max_completion_tokens")?) {
        None => 32,
        Some(x) if x >= 1.0 && x.fract() == 0.0 && x <= app.limits.max_tokens as f64 => x as usize,
        Some(x) => {
            return Err(ApiError::bad(
                format!("`max_tokens` {x}: must be an integer in 1..={}", app.limits.max_tokens),
                "max_tokens",
            ));
        }
    };
    let temperature = num(&v, "temperature")?.unwrap_or(0.0);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(ApiError::bad(
            format!("`temperature` {temperature}: must be in [0, 2] (0 = greedy)"),
            "temperature",
        ));
    }
    let top_p = num(&v, "top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad(format!("`top_p` {top_p}: must be in (0, 1]"), "top_p"));
    }
    let seed = match v.get("seed") {
        None | Some(Value::Null) => 0,
        Some(x) => x.as_u64().ok_or_else(|| ApiError::bad("`seed` must be a non-negative integer", "seed"))?,
    };
    let stop = match v.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 => a
            .iter()
            .map(|x| x.as_str().map(str::to_string).ok_or_else(|| ApiError::bad("`stop` must hold strings", "stop")))
            .collect::<ApiResult<_>>()?,
        Some(_) => return Err(ApiError::bad("`stop` must be a string or a list of at most 4 strings", "stop")),
    };
    let stream = match v.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad("`stream` must be true or false", "stream")),
    };
    // An extension (as vLLM's): answers of exactly `max_tokens` tokens, for load tests.
    let ignore_eos = match v.get("ignore_eos") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad("`ignore_eos` must be true or false", "ignore_eos")),
    };
    Ok(Parsed {
        served,
        question,
        image,
        sampling: Sampling { max_new_tokens: max_tokens, temperature, top_p, seed },
        stop,
        stream,
        ignore_eos,
    })
}

/// `POST /v1/chat/completions`.
pub async fn chat(State(app): State<Arc<App>>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    if let Err(e) = app.authorize(&headers) {
        return app.reject(e);
    }
    if app.draining.load(Ordering::SeqCst) {
        return app.reject(ApiError::new(503, "server_error", "the server is shutting down"));
    }
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            let status = e.status().as_u16();
            return app.reject(
                ApiError::new(status, "invalid_request_error", format!("the request body cannot be read: {e}"))
                    .code(if status == 413 { "body_too_large" } else { "bad_body" }),
            );
        }
    };
    let p = {
        let a2 = app.clone();
        match tokio::task::spawn_blocking(move || parse(&a2, &body)).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return app.reject(e),
            Err(e) => return app.reject(ApiError::new(500, "server_error", format!("{e}"))),
        }
    };
    let vlm = &p.served.vlm;
    let prompt_text = crate::data::prompt::open_ended(vlm.cfg.prompt.vqa_template.as_deref(), &p.question);
    let mut prompt = match vlm.lm().tok.encode(&prompt_text, true) {
        Ok(ids) if !ids.is_empty() => ids,
        _ => return app.reject(ApiError::bad("the question encodes to no tokens", "messages")),
    };
    vlm.insert_prompt(&mut prompt, p.image.is_some());
    if vlm.lm().model.max_new_tokens(vlm.adapter.prefix_tokens() + prompt.len()) == Some(0) {
        return app.reject(
            ApiError::bad(
                format!("the question is too long ({} tokens) for the model's positions", prompt.len()),
                "messages",
            )
            .code("context_length_exceeded"),
        );
    }
    if app.shared.queued.load(Ordering::SeqCst) >= app.limits.max_queue {
        return app.reject(ApiError::new(429, "rate_limit_error", "the queue is full; retry later").code("queue_full"));
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let now = Instant::now();
    let model = p.served.name.clone();
    let job = Job {
        adapter: p.served.clone(),
        prompt,
        image: p.image,
        sampling: p.sampling,
        stop: p.stop,
        ignore_eos: p.ignore_eos,
        deadline: now + app.limits.request_timeout,
        enqueued: now,
        tx,
    };
    app.shared.queued.fetch_add(1, Ordering::SeqCst);
    if app.tx.lock().expect("sender lock").send(Msg::Job(Box::new(job))).is_err() {
        app.shared.queued.fetch_sub(1, Ordering::SeqCst);
        return app.reject(ApiError::new(503, "server_error", "the scheduler has stopped"));
    }
    let id = format!("chatcmpl-{}", app.next_id.fetch_add(1, Ordering::SeqCst));
    let created = now_unix();
    let backstop = app.limits.request_timeout + Duration::from_secs(5);
    if !p.stream {
        let mut info = json!({"cache_hit": false});
        let mut prompt_tokens = 0;
        loop {
            let ev = match tokio::time::timeout(backstop, rx.recv()).await {
                Ok(Some(ev)) => ev,
                Ok(None) => return app.reject(ApiError::new(500, "server_error", "the request was dropped")),
                Err(_) => return app.reject(ApiError::new(504, "timeout", "the request timed out").code("timeout")),
            };
            match ev {
                Event::Started { cache_hit, prompt_tokens: n } => {
                    info["cache_hit"] = json!(cache_hit);
                    info["time_to_first_token_ms"] = json!(now.elapsed().as_secs_f64() * 1e3);
                    prompt_tokens = n;
                }
                Event::Delta(_) => {}
                Event::Done { finish_reason, completion_tokens, text } => {
                    info["seconds"] = json!(now.elapsed().as_secs_f64());
                    return axum::Json(json!({
                        "id": id, "object": "chat.completion", "created": created, "model": model,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
                        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
                        "memvp": info,
                    }))
                    .into_response();
                }
                Event::Failed { status, kind, message } => return ApiError::new(status, kind, message).into_response(),
            }
        }
    }
    // Streaming: one chunk per settled piece of text, then the finish reason and usage.
    let chunk = move |delta: Value, finish: Option<&str>, extra: Option<(&str, Value)>| {
        let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        if let Some((k, v)) = extra {
            c[k] = v;
        }
        SseEvent::default().data(c.to_string())
    };
    struct St {
        rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
        prompt_tokens: usize,
        cache_hit: bool,
        done: bool,
        ended: bool,
    }
    let st = St { rx, prompt_tokens: 0, cache_hit: false, done: false, ended: false };
    let stream = futures_util::stream::unfold((st, chunk), move |(mut st, chunk)| async move {
        if st.ended {
            return None;
        }
        if st.done {
            st.ended = true;
            return Some((Ok::<_, std::convert::Infallible>(SseEvent::default().data("[DONE]")), (st, chunk)));
        }
        let ev = match tokio::time::timeout(backstop, st.rx.recv()).await {
            Ok(Some(ev)) => ev,
            Ok(None) | Err(_) => {
                Event::Failed { status: 504, kind: "timeout", message: "the request timed out".into() }
            }
        };
        let out = match ev {
            Event::Started { cache_hit, prompt_tokens } => {
                st.prompt_tokens = prompt_tokens;
                st.cache_hit = cache_hit;
                let info = json!({"cache_hit": cache_hit, "time_to_first_token_ms": now.elapsed().as_secs_f64() * 1e3});
                chunk(json!({"role": "assistant", "content": ""}), None, Some(("memvp", info)))
            }
            Event::Delta(text) => chunk(json!({"content": text}), None, None),
            Event::Done { finish_reason, completion_tokens, .. } => {
                st.done = true;
                let usage = json!({"prompt_tokens": st.prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": st.prompt_tokens + completion_tokens});
                chunk(json!({}), Some(finish_reason), Some(("usage", usage)))
            }
            Event::Failed { status, kind, message } => {
                st.done = true;
                SseEvent::default().data(ApiError::new(status, kind, message).body().to_string())
            }
        };
        Some((Ok(out), (st, chunk)))
    });
    Sse::new(stream).into_response()
}

/// The public description of a loaded adapter.
pub fn model_object(s: &Served) -> Value {
    let c = &s.vlm.cfg;
    json!({
        "id": s.name, "object": "model", "created": 0, "owned_by": "memvp",
        "memvp": {"run": s.run, "method": c.method, "image_blind": c.image_blind,
            "trainable_parameters": c.trainable_parameters,
            "vision": {"source": c.vision.source, "sha256": c.vision.sha256},
            "lm": {"source": c.lm.source, "sha256": c.lm.sha256, "family": c.lm.family},
            "visual_tokens": c.dims.visual_tokens}
    })
}

/// `GET /v1/models`.
pub async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(e) = app.authorize(&headers) {
        return app.reject(e);
    }
    let reg = app.shared.registry.read().expect("registry lock");
    let data: Vec<Value> = reg.adapters.values().map(|s| model_object(s)).collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// `POST /v1/adapters` `{"name", "run"}`: loads a run while serving (base models already loaded
/// are shared).
pub async fn load_adapter(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Err(e) = app.authorize(&headers) {
        return app.reject(e);
    }
    let Ok(body) = body else { return app.reject(ApiError::bad("the request body cannot be read", "body")) };
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return app.reject(ApiError::bad(format!("malformed JSON: {e}"), "body")),
    };
    let (Some(name), Some(run)) = (v.get("name").and_then(Value::as_str), v.get("run").and_then(Value::as_str)) else {
        return app.reject(ApiError::bad("give `name` and `run` (a run directory)", "body"));
    };
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
        return app.reject(ApiError::bad(format!("adapter name `{name}`: use letters, digits, `.`, `_`, `-`"), "name"));
    }
    if app.shared.registry.read().expect("registry lock").adapters.contains_key(name) {
        return app.reject(
            ApiError::new(409, "invalid_request_error", format!("`{name}` is already loaded")).code("conflict"),
        );
    }
    let (name, run) = (name.to_string(), PathBuf::from(run));
    let shared = app.shared.clone();
    let loaded = tokio::task::spawn_blocking(move || super::load(&shared, &name, &run)).await;
    match loaded {
        Ok(Ok(s)) => (StatusCode::CREATED, axum::Json(model_object(&s))).into_response(),
        Ok(Err(e)) => app.reject(ApiError::new(400, "invalid_request_error", format!("{e:#}")).code("load_failed")),
        Err(e) => app.reject(ApiError::new(500, "server_error", format!("{e}"))),
    }
}

/// `DELETE /v1/adapters/{name}`: new requests for it are refused at once; requests already
/// running finish (they hold the adapter until then).
pub async fn unload_adapter(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
) -> Response {
    if let Err(e) = app.authorize(&headers) {
        return app.reject(e);
    }
    let removed = app.shared.registry.write().expect("registry lock").adapters.remove(&name);
    match removed {
        Some(_) => {
            app.shared.cache.lock().expect("cache lock").forget(&name);
            axum::Json(json!({"id": name, "object": "model", "deleted": true})).into_response()
        }
        None => app.reject(
            ApiError::new(404, "invalid_request_error", format!("`{name}` is not loaded")).code("model_not_found"),
        ),
    }
}

/// `GET /health`.
pub async fn health(State(app): State<Arc<App>>) -> Response {
    let draining = app.draining.load(Ordering::SeqCst);
    let n = app.shared.registry.read().expect("registry lock").adapters.len();
    let body = json!({"status": if draining { "draining" } else { "ok" }, "adapters": n,
        "queued": app.shared.queued.load(Ordering::SeqCst), "running": app.shared.running.load(Ordering::SeqCst)});
    let status = if draining { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    (status, axum::Json(body)).into_response()
}

/// `GET /metrics`.
pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    let n = app.shared.registry.read().expect("registry lock").adapters.len();
    let text = app.shared.metrics.render(
        app.shared.queued.load(Ordering::SeqCst),
        app.shared.running.load(Ordering::SeqCst),
        n,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// `GET /`: the web page.
pub async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

/// Unknown paths.
pub async fn not_found() -> Response {
    ApiError::new(404, "invalid_request_error", "no such endpoint").into_response()
}
