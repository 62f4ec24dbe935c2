//! `fila serve` end to end over HTTP: answers equal `fila generate`'s for the same image, prompt and
//! token limit; concurrent requests are answered in one batch, each with its own answer; bad
//! requests get OpenAI-format 4xx errors and the server keeps answering.

mod common;

use base64::Engine;
use common::{root, s, temp, tiny_checkpoint};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Barrier;

fn images() -> PathBuf {
    root().join("datasets/tiny/images")
}

/// What `fila generate` prints for the question (without println's newline).
fn generate(checkpoint: &Path, image: Option<&str>, prompt: &str, max_new_tokens: usize) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fila"));
    command.args(["generate", "--checkpoint", s(checkpoint), "--prompt", prompt, "--max-new-tokens", &max_new_tokens.to_string()]);
    if let Some(name) = image {
        command.args(["--image", s(&images().join(name))]);
    }
    let out = command.output().unwrap();
    assert!(out.status.success(), "fila generate failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    text.strip_suffix('\n').unwrap_or(&text).to_string()
}

/// A running `fila serve`, stopped when dropped.
struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT/v1`
    base: String,
    agent: ureq::Agent,
}

impl Server {
    fn start(checkpoint: &Path, dir: &Path, extra: &[&str]) -> Server {
        let log = dir.join("serve.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_fila"))
            .args(["serve", "--checkpoint", s(checkpoint), "--port", "0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = lines.next().and_then(Result::ok).unwrap_or_default();
        let Some(at) = ready.find("http://") else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("fila serve did not start: {ready}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        };
        assert!(ready.contains("listening on http://127.0.0.1:"), "binds to 127.0.0.1 by default: {ready}");
        let base = ready[at..].trim().to_string();
        let agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        Server { child, base, agent }
    }

    /// Status, JSON body and `x-fila-batch-size` of a response.
    fn read(response: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, Value, Option<usize>) {
        let mut response = response.unwrap();
        let status = response.status().as_u16();
        let batch = response.headers().get("x-fila-batch-size").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        let text = response.body_mut().read_to_string().unwrap();
        let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status} {text}: {e}"));
        (status, body, batch)
    }

    fn post_raw(&self, path: &str, body: &str) -> (u16, Value, Option<usize>) {
        Self::read(self.agent.post(format!("{}{path}", self.base)).header("Content-Type", "application/json").send(body))
    }

    fn chat(&self, request: &Value) -> (u16, Value, Option<usize>) {
        self.post_raw("/chat/completions", &request.to_string())
    }

    fn get(&self, path: &str) -> (u16, Value, Option<usize>) {
        Self::read(self.agent.get(format!("{}{path}", self.base)).call())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn data_url(name: &str) -> String {
    let bytes = std::fs::read(images().join(name)).unwrap();
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// An OpenAI chat request: one user message with the question and, when given, the image URL.
fn request(image_url: Option<&str>, prompt: &str, max_tokens: Option<usize>) -> Value {
    let mut content = vec![json!({"type": "text", "text": prompt})];
    if let Some(url) = image_url {
        content.push(json!({"type": "image_url", "image_url": {"url": url}}));
    }
    let mut r = json!({"model": "fila", "messages": [{"role": "user", "content": content}], "temperature": 0});
    if let Some(m) = max_tokens {
        r["max_tokens"] = json!(m);
    }
    r
}

fn content(body: &Value) -> &str {
    body["choices"][0]["message"]["content"].as_str().unwrap_or_else(|| panic!("no content in {body}"))
}

/// `finish_reason` and `usage` agree with the limit: "length" exactly when cut at `max_tokens`.
fn check_usage(body: &Value, max_tokens: usize) {
    let usage = &body["usage"];
    let (prompt, completion) = (usage["prompt_tokens"].as_u64().unwrap(), usage["completion_tokens"].as_u64().unwrap() as usize);
    assert!(prompt > 0 && completion <= max_tokens, "{body}");
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), prompt + completion as u64);
    let finish = body["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(finish == "stop" || (finish == "length" && completion == max_tokens), "{body}");
}

#[test]
fn answers_equal_fila_generate() {
    let dir = temp("serve", "answers");
    let checkpoint = tiny_checkpoint(&dir);
    let server = Server::start(&checkpoint, &dir, &[]);

    let (status, models, _) = server.get("/models");
    assert_eq!(status, 200);
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"].as_array().unwrap().len(), 1);
    assert_eq!(models["data"][0]["id"], "final", "the model id is the checkpoint folder's name");

    let question = "What colour is the image?";
    let expected = generate(&checkpoint, Some("00_red.png"), question, 6);
    assert!(expected.chars().count() >= 2, "the random model's answer `{expected}` is too short for the stop test");
    let (status, body, batch) = server.chat(&request(Some(&data_url("00_red.png")), question, Some(6)));
    assert_eq!(status, 200, "{body}");
    assert_eq!(content(&body), expected);
    assert_eq!((body["object"].as_str(), body["model"].as_str(), batch), (Some("chat.completion"), Some("final"), Some(1)));
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-") && body["created"].as_u64().unwrap() > 0);
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    check_usage(&body, 6);

    // A file path (plain or file://) reads the same image; a system message and earlier turns
    // do not change the prompt.
    let path = images().join("00_red.png");
    for url in [s(&path).to_string(), format!("file://{}", s(&path))] {
        let mut r = request(Some(&url), question, Some(6));
        let user = r["messages"][0].clone();
        r["messages"] =
            json!([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}, user]);
        let (status, body, _) = server.chat(&r);
        assert_eq!((status, content(&body)), (200, expected.as_str()), "{url}");
    }

    // Without an image or max_tokens: the text-only answer with `fila generate`'s default 64.
    let (status, body, _) = server.chat(&json!({"messages": [{"role": "user", "content": "Say something."}]}));
    assert_eq!((status, content(&body)), (200, generate(&checkpoint, None, "Say something.", 64).as_str()));
    check_usage(&body, 64);

    // `stop` cuts the answer before the first stop string, as OpenAI does.
    let second: String = expected.chars().nth(1).unwrap().to_string();
    let cut = &expected[..expected.find(&second).unwrap()];
    let mut r = request(Some(&data_url("00_red.png")), question, Some(6));
    r["stop"] = json!(["never appears", second]);
    let (status, body, _) = server.chat(&r);
    assert_eq!((status, content(&body), body["choices"][0]["finish_reason"].as_str()), (200, cut, Some("stop")));
    drop(server);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn concurrent_requests_are_answered_in_one_batch() {
    let dir = temp("serve", "batch");
    let checkpoint = tiny_checkpoint(&dir);
    // The worker waits up to 30 s for a full batch of 4 once a request arrives; the four requests
    // below fill it at once, so the test does not wait on the window.
    let server = Server::start(&checkpoint, &dir, &["--max-batch", "4", "--batch-wait-ms", "30000"]);
    let questions: [(Option<&str>, &str, usize); 4] = [
        (Some("00_red.png"), "What colour is the image?", 2),
        (Some("01_green.png"), "Colour?", 6),
        (Some("06_white.png"), "Is it wider than it is tall? Answer in a word.", 4),
        (None, "Say something long about nothing at all, please.", 5),
    ];
    let barrier = Barrier::new(questions.len());
    let answers: Vec<(u16, Value, Option<usize>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = questions
            .iter()
            .map(|&(image, prompt, max_tokens)| {
                let (server, barrier) = (&server, &barrier);
                scope.spawn(move || {
                    let r = request(image.map(data_url).as_deref(), prompt, Some(max_tokens));
                    barrier.wait();
                    server.chat(&r)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut sizes = Vec::new();
    for ((status, body, batch), &(image, prompt, max_tokens)) in answers.iter().zip(&questions) {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(content(body), generate(&checkpoint, image, prompt, max_tokens), "{prompt} at max_tokens {max_tokens}");
        check_usage(body, max_tokens);
        sizes.push(batch.unwrap());
    }
    assert!(sizes.iter().any(|&n| n > 1), "no batch held more than one request: {sizes:?}");
    let distinct: std::collections::BTreeSet<&str> = answers.iter().map(|(_, b, _)| content(b)).collect();
    assert!(distinct.len() > 1, "every answer is alike ({distinct:?}); the test would prove little");
    drop(server);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_requests_get_4xx_and_the_server_keeps_answering() {
    let dir = temp("serve", "bad");
    let checkpoint = tiny_checkpoint(&dir);
    let server = Server::start(&checkpoint, &dir, &["--max-body-mb", "1"]);
    let error = |(status, body, _): (u16, Value, Option<usize>), want: u16, what: &str| -> Value {
        assert_eq!(status, want, "{what}: {body}");
        let e = &body["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()) && e["type"] == "invalid_request_error", "{what}: {body}");
        assert!(e.get("param").is_some() && e.get("code").is_some(), "{what}: {body}");
        e.clone()
    };
    let garbage = base64::engine::general_purpose::STANDARD.encode(b"this is not an image");
    let text_only = |prompt: &str| request(None, prompt, Some(4));

    error(server.post_raw("/chat/completions", "{\"messages\": [}"), 400, "invalid JSON");
    assert_eq!(error(server.chat(&json!({"model": "fila"})), 400, "no messages")["param"], "messages");
    let e = error(server.chat(&request(Some("data:image/png;base64,@@not base64@@"), "Q", Some(4))), 400, "bad base64");
    assert_eq!((e["param"].as_str(), e["code"].as_str()), (Some("messages[0].content[1].image_url.url"), Some("invalid_image")));
    let e = error(server.chat(&request(Some(&format!("data:image/png;base64,{garbage}")), "Q", Some(4))), 400, "not an image");
    assert!(e["message"].as_str().unwrap().contains("unreadable image"), "{e}");
    error(server.chat(&request(Some("/no/such/image.png"), "Q", Some(4))), 400, "missing file");
    let long = "word ".repeat(2000);
    let e = error(server.chat(&text_only(&long)), 400, "prompt too long");
    assert_eq!((e["code"].as_str(), e["param"].as_str()), (Some("context_length_exceeded"), Some("messages")));
    let e = error(server.chat(&request(None, "Q", Some(100_000))), 400, "max_tokens past the context");
    assert_eq!((e["code"].as_str(), e["param"].as_str()), (Some("context_length_exceeded"), Some("max_tokens")));
    let audio = json!({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]});
    assert_eq!(error(server.chat(&audio), 400, "unsupported part")["param"], "messages[0].content[0].type");
    let mut sampled = text_only("Q");
    sampled["temperature"] = json!(0.7);
    assert_eq!(error(server.chat(&sampled), 400, "temperature")["param"], "temperature");
    let two_markers = text_only("<image> and <image>");
    error(server.chat(&two_markers), 400, "image markers without an image");

    error(server.get("/nothing"), 404, "wrong path");
    error(server.get("/chat/completions"), 405, "GET on completions");
    error(server.post_raw("/models", "{}"), 405, "POST on models");
    let big = json!({"messages": [{"role": "user", "content": "x".repeat(3 << 19)}]});
    error(server.chat(&big), 413, "body over --max-body-mb");

    let (status, body, _) = server.chat(&request(Some(&data_url("01_green.png")), "Colour?", Some(3)));
    assert_eq!(status, 200, "{body}");
    assert_eq!(content(&body), generate(&checkpoint, Some("01_green.png"), "Colour?", 3));
    drop(server);
    std::fs::remove_dir_all(&dir).ok();
}
