//! The built-in OpenAI-compatible mock upstream: `POST /v1/chat/completions`, streaming and not, shaped like
//! OpenAI's answers, with controls for length, pace and faults.
//!
//! Controls come from the process defaults (`offload mock-upstream --words ... --delay-ms ...`) and, per call,
//! from a `mock` object in the request body, which offload passes upstream unchanged like any unknown field:
//! `{"mock": {"words": 64, "delay_ms": 20, "ttft_ms": 100, "status": 500, "stall_after": 3, "drop_after": 5,
//! "stall_headers": true, "comment_after": 3, "bom": true, "content": "exact reply",
//! "tool_calls": [{"name": "f", "arguments": "{}"}]}}`.
//! `"fail_first": n` makes only the first n calls with the same body (or the same `"key"` in `mock`) fail with
//! `status` (default 503), with a `Retry-After` header when `retry_after` (seconds) is given; later calls
//! succeed: a failing upstream that recovers, for retries.
//! A non-streaming answer is paced too: headers after `ttft_ms`, then the JSON body in `words` pieces
//! `delay_ms` apart; `stall_after` and `drop_after` count those pieces (for streams: events).
//!
//! `GET /_mock/stats` counts calls, completed responses and responses the client abandoned (the connection was
//! dropped mid-way); `GET /_mock/requests` shows the last calls received: the body, whether an `Authorization`
//! header came (`"authorization": true`), and, when the mock was started with an [`MockConfig::expected_key`],
//! whether it was `Bearer <that key>` (`"authorization_expected"`, else `null`). The header's value itself is
//! never shown: it is the caller's upstream key.

use crate::domain::UpstreamKey;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use clap::Args;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use subtle::ConstantTimeEq;

/// Defaults for every call; a call's `mock` object overrides them.
#[derive(Args, Debug, Clone, Deserialize, Default)]
pub struct MockConfig {
    /// Content chunks (one word each) per choice.
    #[arg(long)]
    #[serde(default)]
    pub words: Option<usize>,
    /// Milliseconds before the first chunk (or before the whole answer when not streaming).
    #[arg(long)]
    #[serde(default)]
    pub ttft_ms: Option<u64>,
    /// Milliseconds between chunks.
    #[arg(long)]
    #[serde(default)]
    pub delay_ms: Option<u64>,
    /// The key a test expects calls to carry; `/_mock/requests` tells whether each did, never what came.
    #[arg(skip)]
    #[serde(skip)]
    pub expected_key: Option<UpstreamKey>,
}

/// The per-call controls.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
struct Controls {
    words: Option<usize>,
    content: Option<String>,
    ttft_ms: Option<u64>,
    delay_ms: Option<u64>,
    status: Option<u16>,
    error_message: Option<String>,
    stall_after: Option<usize>,
    stall_headers: bool,
    drop_after: Option<usize>,
    /// Stream: an SSE comment line (`: ping`) after this many events, as some OpenAI-compatible servers send.
    comment_after: Option<usize>,
    /// Stream: a byte order mark before the first event, which the event stream format allows.
    bom: bool,
    tool_calls: Option<Vec<MockToolCall>>,
    /// Only the first this many calls with the same body (or `key`) fail with `status` (default 503).
    fail_first: Option<u32>,
    /// Like `fail_first`, but the first n calls send no headers at all (they stall).
    stall_first: Option<u32>,
    /// Tells calls apart for `fail_first` instead of their whole body.
    key: Option<String>,
    /// `Retry-After` (seconds) on a failure of `fail_first`.
    retry_after: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
struct MockToolCall {
    name: String,
    #[serde(default)]
    arguments: String,
}

#[derive(Default)]
pub struct MockStats {
    pub requests: AtomicU64,
    pub completed: AtomicU64,
    pub disconnected: AtomicU64,
}

struct MockState {
    defaults: MockConfig,
    stats: MockStats,
    recent: Mutex<VecDeque<Value>>,
    /// Calls seen per body (or `key`), for `fail_first`.
    seen: Mutex<std::collections::HashMap<String, u32>>,
}

/// A running mock; it stops when dropped.
pub struct MockServer {
    addr: SocketAddr,
    state: Arc<MockState>,
    task: tokio::task::JoinHandle<()>,
}

impl MockServer {
    /// The API base to give offload as `--upstream-url`, e.g. `http://127.0.0.1:8081/v1`.
    #[expect(
        clippy::expect_used,
        reason = "`http://` followed by a formatted SocketAddr and `/v1` is always a valid URL"
    )]
    pub fn api_base(&self) -> url::Url {
        url::Url::parse(&format!("http://{}/v1", self.addr)).expect("a socket address forms a valid URL")
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> &MockStats {
        &self.state.stats
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn spawn(addr: SocketAddr, defaults: MockConfig) -> std::io::Result<MockServer> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(MockState {
        defaults,
        stats: MockStats::default(),
        recent: Mutex::new(VecDeque::new()),
        seen: Mutex::default(),
    });
    let app = router(state.clone());
    // Like offload's own listener, so that the floor it gives benchmarks is not slowed by Nagle's algorithm.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "mock upstream stopped");
        }
    });
    Ok(MockServer { addr, state, task })
}

fn router(state: Arc<MockState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(completions))
        .route(
            "/v1/models",
            get(|| async { Json(json!({"object": "list", "data": [{"id": "gpt-3.5-turbo", "object": "model"}]})) }),
        )
        .route("/_mock/stats", get(stats))
        .route("/_mock/requests", get(recent))
        .with_state(state)
}

async fn stats(State(state): State<Arc<MockState>>) -> Json<Value> {
    let s = &state.stats;
    Json(json!({
        "requests": s.requests.load(Ordering::SeqCst),
        "completed": s.completed.load(Ordering::SeqCst),
        "disconnected": s.disconnected.load(Ordering::SeqCst),
    }))
}

async fn recent(State(state): State<Arc<MockState>>) -> Json<Value> {
    Json(Value::Array(state.recent.lock().iter().cloned().collect()))
}

fn openai_error(status: StatusCode, message: &str) -> Response {
    let kind = if status.is_server_error() { "server_error" } else { "invalid_request_error" };
    (status, Json(json!({"error": {"message": message, "type": kind, "param": null, "code": null}}))).into_response()
}

const WORDS: &[&str] = &[
    "Hello",
    "from",
    "the",
    "offload",
    "mock",
    "upstream.",
    "This",
    "reply",
    "is",
    "generated",
    "one",
    "word",
    "per",
    "chunk",
    "so",
    "that",
    "streams",
    "can",
    "be",
    "followed",
    "and",
    "measured.",
];

fn random_id() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("chatcmpl-{}", &id[..24])
}

/// Counts a response as completed, or as disconnected when it is dropped before the end.
struct Completion {
    state: Arc<MockState>,
    done: bool,
}

impl Completion {
    fn finish(mut self) {
        self.done = true;
        self.state.stats.completed.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if !self.done {
            self.state.stats.disconnected.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn completions(State(state): State<Arc<MockState>>, headers: HeaderMap, body: Bytes) -> Response {
    state.stats.requests.fetch_add(1, Ordering::SeqCst);
    let guard = Completion { state: state.clone(), done: false };
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return openai_error(StatusCode::BAD_REQUEST, "We could not parse the JSON body of your request.");
    };
    {
        let mut recent = state.recent.lock();
        let authorization = headers.get(header::AUTHORIZATION);
        let expected = state.defaults.expected_key.as_ref().map(|key| {
            let wanted = format!("Bearer {}", key.expose());
            authorization.is_some_and(|v| bool::from(v.as_bytes().ct_eq(wanted.as_bytes())))
        });
        recent.push_back(json!({
            "body": request,
            "authorization": authorization.is_some(),
            "authorization_expected": expected,
        }));
        while recent.len() > 32 {
            recent.pop_front();
        }
    }
    let controls: Controls =
        request.get("mock").cloned().and_then(|m| serde_json::from_value(m).ok()).unwrap_or_default();
    let Some(messages) = request.get("messages").and_then(Value::as_array) else {
        return openai_error(StatusCode::BAD_REQUEST, "'messages' is a required property");
    };
    if controls.stall_headers {
        tokio::time::sleep(Duration::from_secs(600)).await;
    }
    // Calls seen with this body (or `key`), counted for `fail_first` and `stall_first`.
    let seen = (controls.fail_first.is_some() || controls.stall_first.is_some()).then(|| {
        let key = controls.key.clone().unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        let mut seen = state.seen.lock();
        let count = seen.entry(key).or_insert(0);
        *count += 1;
        *count
    });
    if let (Some(first), Some(seen)) = (controls.stall_first, seen)
        && seen <= first
    {
        tokio::time::sleep(Duration::from_secs(600)).await;
    }
    if let (Some(first), Some(seen)) = (controls.fail_first, seen) {
        if seen <= first {
            let status = controls.status.and_then(|s| StatusCode::from_u16(s).ok());
            let status = status.unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            let message = controls.error_message.clone().unwrap_or_else(|| format!("Mock failure {seen} of {first}."));
            guard.finish();
            let mut response = openai_error(status, &message);
            if let Some(after) = controls.retry_after
                && let Ok(value) = header::HeaderValue::from_str(&after.to_string())
            {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            return response;
        }
    } else if let Some(status) = controls.status.and_then(|s| StatusCode::from_u16(s).ok()) {
        let message = controls.error_message.clone().unwrap_or_else(|| format!("Mock error with status {status}."));
        guard.finish();
        return openai_error(status, &message);
    }
    let plan = Plan::new(&state.defaults, &controls, &request, messages.len());
    let stream = request.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let pieces = if stream {
        let mut pieces: Vec<String> = plan.events().into_iter().map(|e| format!("data: {e}\n\n")).collect();
        if let Some(at) = controls.comment_after.filter(|at| *at <= pieces.len()) {
            pieces.insert(at, ": ping\n\n".to_owned());
        }
        pieces.push("data: [DONE]\n\n".to_owned());
        if controls.bom {
            pieces[0].insert(0, '\u{feff}');
        }
        pieces
    } else {
        // The JSON body is sent in as many pieces as there are words, paced like a stream, so that a slow
        // answer shows as `waiting` and stalls and drops work the same way.
        let body = plan.completion().to_string();
        split_evenly(&body, plan.words.len().max(1))
    };
    let content_type = if stream { "text/event-stream; charset=utf-8" } else { "application/json" };
    paced_response(plan, controls, guard, pieces, content_type)
}

fn split_evenly(text: &str, parts: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let size = chars.len().div_ceil(parts).max(1);
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}

/// What the mock will answer.
struct Plan {
    id: String,
    created: u64,
    model: String,
    n: usize,
    words: Vec<String>,
    tool_calls: Vec<MockToolCall>,
    include_usage: bool,
    prompt_tokens: usize,
    ttft: Duration,
    delay: Duration,
}

impl Plan {
    fn new(defaults: &MockConfig, c: &Controls, request: &Value, message_count: usize) -> Self {
        let words = match &c.content {
            Some(text) => {
                let mut pieces: Vec<String> = text.split_inclusive(' ').map(str::to_owned).collect();
                if pieces.is_empty() {
                    pieces.push(String::new());
                }
                pieces
            }
            None => {
                let count = c.words.or(defaults.words).unwrap_or(12);
                (0..count).map(|i| format!("{} ", WORDS[i % WORDS.len()])).collect()
            }
        };
        Self {
            id: random_id(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            model: request.get("model").and_then(Value::as_str).unwrap_or("gpt-3.5-turbo").to_owned(),
            n: request.get("n").and_then(Value::as_u64).unwrap_or(1).clamp(1, 16) as usize,
            words,
            tool_calls: c.tool_calls.clone().unwrap_or_default(),
            include_usage: request.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false),
            prompt_tokens: message_count * 8,
            ttft: Duration::from_millis(c.ttft_ms.or(defaults.ttft_ms).unwrap_or(0)),
            delay: Duration::from_millis(c.delay_ms.or(defaults.delay_ms).unwrap_or(0)),
        }
    }

    fn finish_reason(&self) -> &'static str {
        if self.tool_calls.is_empty() { "stop" } else { "tool_calls" }
    }

    fn usage(&self) -> Value {
        let completion = self.words.len() * self.n;
        json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": completion, "total_tokens": self.prompt_tokens + completion})
    }

    fn text(&self) -> String {
        self.words.concat()
    }

    fn completion(&self) -> Value {
        let choices: Vec<Value> = (0..self.n)
            .map(|i| {
                let mut message = json!({"role": "assistant", "content": self.text(), "refusal": null});
                if !self.tool_calls.is_empty() {
                    message["content"] = Value::Null;
                    message["tool_calls"] = Value::Array(
                        self.tool_calls
                            .iter()
                            .enumerate()
                            .map(|(k, t)| json!({"id": format!("call_{k}"), "type": "function", "function": {"name": t.name, "arguments": t.arguments}}))
                            .collect(),
                    );
                }
                json!({"index": i, "message": message, "logprobs": null, "finish_reason": self.finish_reason()})
            })
            .collect();
        json!({"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
               "choices": choices, "usage": self.usage(), "system_fingerprint": "fp_mock"})
    }

    fn chunk(&self, index: usize, delta: Value, finish_reason: Option<&str>) -> String {
        let mut chunk = json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "system_fingerprint": "fp_mock",
            "choices": [{"index": index, "delta": delta, "logprobs": null, "finish_reason": finish_reason}]});
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk.to_string()
    }

    /// Every event of the stream, in order, without `[DONE]`.
    fn events(&self) -> Vec<String> {
        let mut events = Vec::new();
        for i in 0..self.n {
            // Like OpenAI: the role chunk has `content: ""`, or `null` when the answer is tool calls.
            let content = if self.tool_calls.is_empty() { json!("") } else { Value::Null };
            events.push(self.chunk(i, json!({"role": "assistant", "content": content, "refusal": null}), None));
        }
        if self.tool_calls.is_empty() {
            for word in &self.words {
                for i in 0..self.n {
                    events.push(self.chunk(i, json!({"content": word}), None));
                }
            }
        } else {
            for (k, call) in self.tool_calls.iter().enumerate() {
                for i in 0..self.n {
                    events.push(self.chunk(
                        i,
                        json!({"tool_calls": [{"index": k, "id": format!("call_{k}"), "type": "function",
                        "function": {"name": call.name, "arguments": ""}}]}),
                        None,
                    ));
                    let args: Vec<char> = call.arguments.chars().collect();
                    for piece in args.chunks(4) {
                        let piece: String = piece.iter().collect();
                        events.push(self.chunk(
                            i,
                            json!({"tool_calls": [{"index": k, "function": {"arguments": piece}}]}),
                            None,
                        ));
                    }
                }
            }
        }
        for i in 0..self.n {
            events.push(self.chunk(i, json!({}), Some(self.finish_reason())));
        }
        if self.include_usage {
            events.push(
                json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "system_fingerprint": "fp_mock", "choices": [], "usage": self.usage()})
                .to_string(),
            );
        }
        events
    }
}

fn paced_response(
    plan: Plan,
    controls: Controls,
    guard: Completion,
    pieces: Vec<String>,
    content_type: &'static str,
) -> Response {
    let body = async_stream::stream! {
        let guard = guard;
        // A zero sleep still waits for the next timer tick (1 ms): the floor must not pay it.
        if !plan.ttft.is_zero() {
            tokio::time::sleep(plan.ttft).await;
        }
        for (i, piece) in pieces.into_iter().enumerate() {
            if controls.drop_after == Some(i) {
                // Let what was sent reach the client first, then cut the connection mid-body.
                tokio::time::sleep(Duration::from_millis(50)).await;
                yield Err(std::io::Error::other("mock: dropping the connection"));
                return;
            }
            if controls.stall_after == Some(i) {
                tokio::time::sleep(Duration::from_secs(600)).await;
                return;
            }
            if i > 0 && !plan.delay.is_zero() {
                tokio::time::sleep(plan.delay).await;
            }
            yield Ok::<_, std::io::Error>(Bytes::from(piece));
        }
        guard.finish();
    };
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-request-id"), "req_mock"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}
