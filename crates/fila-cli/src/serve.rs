//! `fila serve`: an OpenAI-compatible HTTP server for a FILA checkpoint (docs/serve.md).
//!
//! One worker thread owns the model. HTTP handler threads parse and check each request, decode
//! its image, and queue it; the worker takes everything queued (up to `--max-batch`) and answers
//! it in one batch with [`Inference::answer_each`], so every answer equals `fila generate`'s for
//! the same image, prompt and token limit.

use crate::infer::{Answer, Inference, Prompt};
use anyhow::{Context, Result};
use base64::Engine;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tiny_http::{Header, Method, Request, Response};

/// The settings of `fila serve`.
pub struct ServeOptions {
    pub checkpoint: PathBuf,
    /// Run config whose `[data]` table replaces the checkpoint's run.toml.
    pub config: Option<PathBuf>,
    pub host: String,
    pub port: u16,
    /// The model id of `/v1/models` and of every answer (default: the checkpoint folder's name).
    pub model_name: Option<String>,
    /// Most requests per batch.
    pub max_batch: usize,
    /// How long the worker waits for more requests after the first of a batch arrives (0: it
    /// takes what is queued and starts at once).
    pub batch_wait: Duration,
    /// `max_tokens` of requests that give none (capped by the context left after the prompt).
    pub default_max_tokens: usize,
    /// Largest request body, in bytes.
    pub max_body: usize,
}

/// An answer to send: HTTP status and JSON body, and for completions the size of the batch that
/// answered it (the `x-fila-batch-size` header).
struct Reply {
    status: u16,
    body: Value,
    batch: Option<usize>,
    allow: Option<&'static str>,
}

impl Reply {
    fn ok(body: Value) -> Self {
        Self { status: 200, body, batch: None, allow: None }
    }
}

/// An error in OpenAI's format: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
struct ApiError {
    status: u16,
    message: String,
    param: Option<String>,
    code: Option<&'static str>,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> Self {
        Self { status: 400, message: message.into(), param: None, code: None }
    }

    fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    fn status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    fn reply(&self) -> Reply {
        let kind = if self.status >= 500 { "server_error" } else { "invalid_request_error" };
        let body = json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}});
        Reply { status: self.status, body, batch: None, allow: None }
    }
}

/// A checked chat request: the last user message's text and image, and the decoding settings.
struct Chat {
    text: String,
    image: Option<image::RgbImage>,
    max_tokens: Option<usize>,
    stop: Vec<String>,
}

/// A chat request queued for the worker, with where its answer goes.
struct Job {
    chat: Chat,
    reply: mpsc::Sender<Reply>,
}

/// What the HTTP threads share.
struct Shared {
    model: String,
    created: u64,
    max_body: usize,
    max_pixels: u64,
    jobs: mpsc::Sender<Job>,
    next_id: AtomicU64,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Loads the checkpoint, binds the address and answers requests until the process is stopped.
pub fn run(options: ServeOptions) -> Result<()> {
    anyhow::ensure!(options.max_batch >= 1, "--max-batch must be at least 1");
    let model = match &options.model_name {
        Some(name) => name.clone(),
        None => {
            let path = options.checkpoint.canonicalize().with_context(|| format!("checkpoint {}", options.checkpoint.display()))?;
            path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "fila".into())
        }
    };
    // The worker opens the model itself and keeps it: only requests and answers cross threads.
    let (jobs, queue) = mpsc::channel::<Job>();
    let (ready, opened) = mpsc::channel::<Result<(usize, u64)>>();
    let (checkpoint, config) = (options.checkpoint.clone(), options.config.clone());
    let (max_batch, wait, default_max_tokens) = (options.max_batch, options.batch_wait, options.default_max_tokens);
    std::thread::Builder::new().name("fila-serve-model".into()).spawn(move || {
        let inference = match Inference::open(&checkpoint, config.as_deref()) {
            Ok(inference) => inference,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok((inference.context_len(), inference.max_image_pixels())));
        let worker = Worker { inference, max_batch, wait, default_max_tokens };
        worker.run(queue);
    })?;
    let (context, max_pixels) = opened.recv().context("the model thread ended while loading")??;

    let server =
        tiny_http::Server::http((options.host.as_str(), options.port)).map_err(|e| anyhow::anyhow!("binding {}:{}: {e}", options.host, options.port))?;
    let address = server.server_addr().to_ip().context("the server has no IP address")?;
    let shared = Arc::new(Shared { model, created: unix_now(), max_body: options.max_body, max_pixels, jobs, next_id: AtomicU64::new(0) });
    println!("fila serve: model `{}` (context {context} tokens, batches of up to {max_batch}) listening on http://{address}/v1", shared.model);
    std::io::stdout().flush().ok();

    // Enough handler threads to fill a batch while others wait for theirs.
    let server = Arc::new(server);
    let handlers: Vec<_> = (0..(2 * max_batch).max(16))
        .map(|i| {
            let (server, shared) = (server.clone(), shared.clone());
            std::thread::Builder::new().name(format!("fila-serve-http-{i}")).spawn(move || {
                while let Ok(request) = server.recv() {
                    handle(request, &shared);
                }
            })
        })
        .collect::<std::io::Result<_>>()?;
    for handler in handlers {
        let _ = handler.join();
    }
    Ok(())
}

fn handle(mut request: Request, shared: &Shared) {
    let reply = route(&mut request, shared);
    let text = serde_json::to_string(&reply.body).expect("JSON values serialise");
    let mut response = Response::from_string(text).with_status_code(reply.status).with_header(header("Content-Type", "application/json"));
    if let Some(batch) = reply.batch {
        response.add_header(header("x-fila-batch-size", &batch.to_string()));
    }
    if let Some(allow) = reply.allow {
        response.add_header(header("Allow", allow));
    }
    // A client that went away is not the server's problem.
    let _ = request.respond(response);
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("valid header")
}

fn route(request: &mut Request, shared: &Shared) -> Reply {
    let url = request.url().to_string();
    let path = url.split(['?', '#']).next().unwrap_or("");
    let path = if path.len() > 1 { path.trim_end_matches('/') } else { path };
    let method = request.method().clone();
    let wrong_method = |allow: &'static str| {
        let mut reply = ApiError::bad(format!("method {method} is not allowed on {path} (use {allow})")).status(405).reply();
        reply.allow = Some(allow);
        reply
    };
    match path {
        "/v1/chat/completions" => match method {
            Method::Post => match read_body(request, shared.max_body).and_then(|body| chat_completion(&body, shared)) {
                Ok(reply) => reply,
                Err(e) => e.reply(),
            },
            _ => wrong_method("POST"),
        },
        "/v1/models" => match method {
            Method::Get | Method::Head => {
                Reply::ok(json!({"object": "list", "data": [{"id": shared.model, "object": "model", "created": shared.created, "owned_by": "fila"}]}))
            }
            _ => wrong_method("GET"),
        },
        "/health" => match method {
            Method::Get | Method::Head => Reply::ok(json!({"status": "ok"})),
            _ => wrong_method("GET"),
        },
        _ => ApiError::bad(format!("no such endpoint: {method} {path} (this server has POST /v1/chat/completions and GET /v1/models)")).status(404).reply(),
    }
}

/// The request body, refused past `limit` bytes (413).
fn read_body(request: &mut Request, limit: usize) -> Result<Vec<u8>, ApiError> {
    let too_large = || ApiError::bad(format!("the request body is larger than the server's limit of {limit} bytes (--max-body-mb)")).status(413);
    if request.body_length().is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    request.as_reader().take(limit as u64 + 1).read_to_end(&mut body).map_err(|e| ApiError::bad(format!("reading the request body: {e}")))?;
    if body.len() > limit {
        return Err(too_large());
    }
    Ok(body)
}

/// Checks the request, queues it and waits for the worker's answer.
fn chat_completion(body: &[u8], shared: &Shared) -> Result<Reply, ApiError> {
    let request: Value = serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("the request body is not valid JSON: {e}")))?;
    let chat = parse_chat(&request, shared.max_pixels)?;
    let (reply, answer) = mpsc::channel();
    let unavailable = || ApiError::bad("the model worker has stopped; restart the server").status(503);
    shared.jobs.send(Job { chat, reply }).map_err(|_| unavailable())?;
    let mut reply = answer.recv().map_err(|_| unavailable())?;
    if reply.status == 200 {
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let created = unix_now();
        reply.body["id"] = json!(format!("chatcmpl-{created:x}{id:06x}"));
        reply.body["created"] = json!(created);
        reply.body["model"] = json!(shared.model);
    }
    Ok(reply)
}

/// The request's last user message (text parts joined by newlines, at most one image) and its
/// decoding settings. System messages and earlier turns are not part of the prompt.
fn parse_chat(request: &Value, max_pixels: u64) -> Result<Chat, ApiError> {
    let object = request.as_object().ok_or_else(|| ApiError::bad("the request body must be a JSON object"))?;
    let present = |key: &str| object.get(key).filter(|v| !v.is_null());
    if present("stream").and_then(Value::as_bool) == Some(true) {
        return Err(ApiError::bad("streaming is not supported; send `stream`: false").param("stream"));
    }
    if let Some(n) = present("n") {
        if n.as_u64() != Some(1) {
            return Err(ApiError::bad(format!("`n` is {n}: this server returns one choice per request")).param("n"));
        }
    }
    if let Some(t) = present("temperature") {
        let t = t.as_f64().ok_or_else(|| ApiError::bad(format!("`temperature` is {t}, not a number")).param("temperature"))?;
        if t != 0.0 {
            return Err(
                ApiError::bad(format!("`temperature` is {t}: this server decodes greedily only; send 0 or leave `temperature` out")).param("temperature")
            );
        }
    }
    let mut max_tokens = None;
    for key in ["max_tokens", "max_completion_tokens"] {
        if let Some(m) = present(key) {
            let n = m.as_u64().filter(|&n| n >= 1).ok_or_else(|| ApiError::bad(format!("`{key}` is {m}: expected an integer of at least 1")).param(key))?;
            max_tokens = Some(usize::try_from(n).unwrap_or(usize::MAX));
        }
    }
    let stop = match present("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|s| s.as_str().map(str::to_string).ok_or_else(|| ApiError::bad(format!("`stop` holds {s}, not a string")).param("stop")))
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(ApiError::bad(format!("`stop` is {other}: expected a string or a list of strings")).param("stop")),
    };
    let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();

    let messages = match object.get("messages") {
        None | Some(Value::Null) => return Err(ApiError::bad("`messages` is missing").param("messages")),
        Some(Value::Array(m)) if m.is_empty() => return Err(ApiError::bad("`messages` is empty").param("messages")),
        Some(Value::Array(m)) => m,
        Some(other) => return Err(ApiError::bad(format!("`messages` is {}, not a list", kind(other))).param("messages")),
    };
    let mut last_user = None;
    for (i, message) in messages.iter().enumerate() {
        let role = message.get("role").and_then(Value::as_str);
        match role {
            Some("user") => last_user = Some(i),
            Some("system" | "developer" | "assistant" | "tool" | "function") => {}
            Some(other) => return Err(ApiError::bad(format!("messages[{i}]: unknown role `{other}`")).param(format!("messages[{i}].role"))),
            None => return Err(ApiError::bad(format!("messages[{i}] has no `role`")).param(format!("messages[{i}].role"))),
        }
    }
    let i = last_user.ok_or_else(|| ApiError::bad("`messages` holds no user message").param("messages"))?;
    let at = |what: String| format!("messages[{i}].{what}");
    let mut texts = Vec::new();
    let mut image = None;
    match messages[i].get("content") {
        Some(Value::String(s)) => texts.push(s.clone()),
        Some(Value::Array(parts)) => {
            for (j, part) in parts.iter().enumerate() {
                let part_at = |what: &str| at(format!("content[{j}]{what}"));
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        let text = part
                            .get("text")
                            .and_then(Value::as_str)
                            .ok_or_else(|| ApiError::bad(format!("{} has no `text` string", part_at(""))).param(part_at(".text")))?;
                        texts.push(text.to_string());
                    }
                    Some("image_url") => {
                        // `{"image_url": {"url": ...}}`, or the URL string itself as some clients send it.
                        let url = match part.get("image_url") {
                            Some(Value::String(url)) => Some(url.as_str()),
                            Some(object) => object.get("url").and_then(Value::as_str),
                            None => None,
                        };
                        let param = part_at(".image_url.url");
                        let url = url.ok_or_else(|| ApiError::bad(format!("{} has no `image_url.url` string", part_at(""))).param(param.clone()))?;
                        if image.is_some() {
                            return Err(ApiError::bad(format!("{}: one image per request is supported", part_at(""))).param(param));
                        }
                        image = Some(load_image(url, max_pixels).map_err(|e| e.param(param))?);
                    }
                    Some(other) => {
                        return Err(ApiError::bad(format!("{}: content part type `{other}` is not supported (text and image_url are)", part_at("")))
                            .param(part_at(".type")))
                    }
                    None => return Err(ApiError::bad(format!("{} has no `type`", part_at(""))).param(part_at(".type"))),
                }
            }
        }
        other => {
            let what = other.map_or("missing", kind);
            return Err(ApiError::bad(format!("{}: content is {what}; expected a string or a list of parts", at("content".into()))).param(at("content".into())));
        }
    }
    Ok(Chat { text: texts.join("\n"), image, max_tokens, stop })
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// An image from a base64 `data:` URL, a `file://` URL or a path on the server's filesystem,
/// decoded as the data pipeline decodes training images.
fn load_image(url: &str, max_pixels: u64) -> Result<image::RgbImage, ApiError> {
    let invalid = |message: String| ApiError::bad(message).code("invalid_image");
    let bytes = if let Some(data) = url.strip_prefix("data:") {
        let (header, payload) = data.split_once(',').ok_or_else(|| invalid("the data URL has no `,` before its data".into()))?;
        if !header.ends_with(";base64") {
            return Err(invalid(format!("the data URL `data:{header},...` is not base64 (expected `data:image/...;base64,...`)")));
        }
        let engine = base64::engine::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new().with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        );
        let payload: String = payload.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        engine.decode(payload.as_bytes()).map_err(|e| invalid(format!("the image's base64 data does not decode: {e}")))?
    } else if url.starts_with("http://") || url.starts_with("https://") {
        return Err(invalid("image URLs are not fetched; send the image as a base64 data URL or a file path on the server".into()));
    } else {
        let path = Path::new(url.strip_prefix("file://").unwrap_or(url));
        std::fs::read(path).map_err(|e| invalid(format!("cannot read image file {}: {e}", path.display())))?
    };
    fila_data::pixels::decode_rgb(&bytes, max_pixels).map_err(|(reason, detail)| invalid(format!("unreadable image: {} ({detail})", reason.as_str())))
}

/// `text` cut before the first occurrence of any stop string, and whether it was cut.
fn cut_at_stop(text: &str, stop: &[String]) -> (String, bool) {
    match stop.iter().filter_map(|s| text.find(s.as_str())).min() {
        Some(at) => (text[..at].to_string(), true),
        None => (text.to_string(), false),
    }
}

/// The thread that owns the model and answers queued requests in batches.
struct Worker {
    inference: Inference,
    max_batch: usize,
    wait: Duration,
    default_max_tokens: usize,
}

impl Worker {
    fn run(&self, queue: mpsc::Receiver<Job>) {
        while let Ok(first) = queue.recv() {
            let mut batch = vec![first];
            let deadline = Instant::now() + self.wait;
            while batch.len() < self.max_batch {
                match queue.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(mpsc::TryRecvError::Disconnected) => break,
                    Err(mpsc::TryRecvError::Empty) => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        match queue.recv_timeout(left) {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                }
            }
            self.answer(batch);
        }
    }

    /// The prompt of a request and its token limit, or why it cannot be answered.
    fn admit(&self, chat: &Chat) -> Result<(Prompt, usize), ApiError> {
        let prompt = self.inference.prepare(chat.image.as_ref(), &chat.text).map_err(|e| ApiError::bad(format!("{e:#}")).param("messages"))?;
        let (n, context) = (prompt.len(), self.inference.context_len());
        let too_long = |message: String, param: &str| ApiError::bad(message).param(param).code("context_length_exceeded");
        if n >= context {
            return Err(too_long(
                format!("this model's maximum context length is {context} tokens, but the messages take {n} tokens (image tokens included)"),
                "messages",
            ));
        }
        let limit = match chat.max_tokens {
            Some(m) if n.saturating_add(m) > context => {
                return Err(too_long(
                    format!(
                        "this model's maximum context length is {context} tokens, but {n} tokens of messages and {m} of max_tokens make {}; lower max_tokens",
                        n + m
                    ),
                    "max_tokens",
                ))
            }
            Some(m) => m,
            None => self.default_max_tokens.min(context - n),
        };
        Ok((prompt, limit))
    }

    fn answer(&self, batch: Vec<Job>) {
        let mut admitted = Vec::new();
        let (mut prompts, mut limits) = (Vec::new(), Vec::new());
        for job in batch {
            match self.admit(&job.chat) {
                Ok((prompt, limit)) => {
                    prompts.push(prompt);
                    limits.push(limit);
                    admitted.push(job);
                }
                Err(e) => {
                    let _ = job.reply.send(e.reply());
                }
            }
        }
        if admitted.is_empty() {
            return;
        }
        let start = Instant::now();
        // The model is only read: a panic in one batch leaves it usable for the next.
        let answers = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.inference.answer_each(&prompts, &limits)));
        let answers = match answers {
            Ok(Ok(answers)) => answers,
            failed => {
                let why = match failed {
                    Ok(Err(e)) => format!("{e:#}"),
                    Err(panic) => panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default(),
                    Ok(Ok(_)) => unreachable!(),
                };
                eprintln!("fila serve: a batch of {} failed: {why}", admitted.len());
                for job in admitted {
                    let _ = job.reply.send(ApiError::bad(format!("generation failed: {why}")).status(500).reply());
                }
                return;
            }
        };
        let size = admitted.len();
        let tokens: usize = answers.iter().map(|a| a.tokens).sum();
        eprintln!("fila serve: answered a batch of {size} ({tokens} tokens) in {:.2} s", start.elapsed().as_secs_f64());
        for ((job, answer), prompt) in admitted.into_iter().zip(answers).zip(&prompts) {
            let mut reply = Reply::ok(completion(&job.chat, &answer, prompt.len()));
            reply.batch = Some(size);
            let _ = job.reply.send(reply);
        }
    }
}

/// The `chat.completion` object of one answer (`id`, `created` and `model` are set by the caller).
fn completion(chat: &Chat, answer: &Answer, prompt_tokens: usize) -> Value {
    let (content, cut) = cut_at_stop(&answer.text, &chat.stop);
    let finish = if cut || answer.stopped { "stop" } else { "length" };
    json!({
        "id": "",
        "object": "chat.completion",
        "created": 0,
        "model": "",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": null, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": answer.tokens, "total_tokens": prompt_tokens + answer.tokens},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(request: Value) -> Result<Chat, ApiError> {
        parse_chat(&request, 1 << 20)
    }

    #[test]
    fn the_last_user_message_is_the_prompt() {
        let c = chat(json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "What"}, {"type": "text", "text": "is it?"}]},
        ], "max_tokens": 5, "stop": "x", "temperature": 0}))
        .unwrap();
        assert_eq!((c.text.as_str(), c.max_tokens, c.stop.clone(), c.image.is_none()), ("What\nis it?", Some(5), vec!["x".to_string()], true));
        let c = chat(json!({"messages": [{"role": "user", "content": "Hi"}], "stop": ["a", "", "b"], "max_completion_tokens": 3})).unwrap();
        assert_eq!((c.stop, c.max_tokens), (vec!["a".to_string(), "b".to_string()], Some(3)));
    }

    #[test]
    fn bad_requests_name_the_parameter() {
        let param = |request: Value| chat(request).err().map(|e| (e.status, e.param.unwrap_or_default()));
        let user = |content: Value| json!({"messages": [{"role": "user", "content": content}]});
        assert_eq!(param(json!({})), Some((400, "messages".into())));
        assert_eq!(param(json!({"messages": []})), Some((400, "messages".into())));
        assert_eq!(param(json!({"messages": [{"role": "system", "content": "x"}]})), Some((400, "messages".into())));
        assert_eq!(param(json!({"messages": [{"content": "x"}]})), Some((400, "messages[0].role".into())));
        assert_eq!(param(user(json!(3))), Some((400, "messages[0].content".into())));
        assert_eq!(param(user(json!([{"type": "input_audio"}]))), Some((400, "messages[0].content[0].type".into())));
        let image = |url: &str| user(json!([{"type": "image_url", "image_url": {"url": url}}]));
        assert_eq!(param(image("data:image/png;base64,***")), Some((400, "messages[0].content[0].image_url.url".into())));
        assert_eq!(param(image("data:image/png;base64,aGVsbG8=")), Some((400, "messages[0].content[0].image_url.url".into())));
        assert_eq!(param(image("https://example.com/a.png")), Some((400, "messages[0].content[0].image_url.url".into())));
        assert_eq!(param(image("/no/such/file.png")), Some((400, "messages[0].content[0].image_url.url".into())));
        let with = |key: &str, value: Value| {
            let mut r = user(json!("hi"));
            r[key] = value;
            r
        };
        assert_eq!(param(with("temperature", json!(0.7))), Some((400, "temperature".into())));
        assert_eq!(param(with("max_tokens", json!(0))), Some((400, "max_tokens".into())));
        assert_eq!(param(with("stop", json!(3))), Some((400, "stop".into())));
        assert_eq!(param(with("stream", json!(true))), Some((400, "stream".into())));
        assert_eq!(param(with("n", json!(2))), Some((400, "n".into())));
        assert!(chat(with("temperature", json!(0.0))).is_ok() && chat(with("n", json!(1))).is_ok());
    }

    #[test]
    fn stop_strings_cut_at_the_first_match() {
        let stop = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(cut_at_stop("a red square. Done", &stop(&["Done", "."])), ("a red square".to_string(), true));
        assert_eq!(cut_at_stop("a red square", &stop(&["blue"])), ("a red square".to_string(), false));
        assert_eq!(cut_at_stop("stop", &stop(&["stop"])), (String::new(), true));
    }
}
