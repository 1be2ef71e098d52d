//! The built-in OpenAI-compatible mock upstream: `POST /v1/chat/completions` and `POST /v1/responses`, streaming
//! and not, shaped like OpenAI's answers, with controls for length, pace and faults.
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
//! Both APIs read the same controls the same way (`controls.rs`); an error (`status`, `fail_first`) is OpenAI's
//! error body, `{"error": {"message", "type", "param", "code"}}`.
//!
//! ## Failing on command (`fail.rs`)
//!
//! `POST /_mock/fail` sets faults of the whole mock process, for every following call of either API whatever its
//! body, so that a test can make one of several upstreams fail while the others answer; each call replaces the
//! setting, and answers it as `GET /_mock/fail` does: `{"status": 503}` makes every call answer that status (400
//! to 599) at once with OpenAI's error body (and `Retry-After: 0` for 429), `"message"` its message;
//! `{"hang_headers": true}` makes every call send no headers until a setting without it arrives (then the call
//! answers `status` if it was set, else normally; at most 600 s); `"times": n` fails (or hangs) only the next n
//! calls, then the switch is off; `{}` (or `{"status": null}`) turns it off. Anything else is a 400. Such calls are
//! counted and kept like any other (`/_mock/stats`, `/_mock/requests`); a switched-off `/v1/responses` still
//! answers its 404.
//!
//! ## Chat Completions (`chat.rs`)
//!
//! `POST /v1/chat/completions` (`messages` required, `n` choices, `stream`, `stream_options.include_usage`):
//! the `chat.completion` object, or `data: <chat.completion.chunk>` events and `data: [DONE]`; `tool_calls`
//! answer tool calls (`call_0`, `call_1`, ...) instead of text, their arguments streamed 4 characters a chunk.
//!
//! ## Responses (`responses.rs`)
//!
//! `POST /v1/responses` (`model`, `input` as a string or items, `instructions`, `tools`, `metadata`, `stream`,
//! ...; nothing is required): the response object (`object: "response"`, `status: "completed"`, `output`,
//! `usage`; `output_text` is not on the wire, the SDKs compute it), which echoes the request's `model`,
//! `instructions`, `metadata`, `tools`, `tool_choice`, `temperature`, `top_p`, `max_output_tokens`,
//! `previous_response_id`, `parallel_tool_calls`, `store`, `text`, `reasoning`, `truncation`, `user` and
//! `background` (the mock itself never runs in the background: it answers at once). Ids are `resp_`, `msg_`,
//! `fc_` and `call_` followed by random hex. With `stream: true`, `event: <type>` + `data: <json>` frames (no
//! `[DONE]`), each with its `sequence_number` from 0:
//! `response.created`, `response.in_progress` (both with the response `in_progress`, `output: []`, `usage:
//! null`), then for the text: `response.output_item.added` (a `message`, `in_progress`),
//! `response.content_part.added` (an empty `output_text`), one `response.output_text.delta` per word,
//! `response.output_text.done`, `response.content_part.done`, `response.output_item.done`; or, with
//! `tool_calls`, for each call: `response.output_item.added` (a `function_call`),
//! `response.function_call_arguments.delta` per 4 characters, `response.function_call_arguments.done`,
//! `response.output_item.done`; last `response.completed`, whose response is the non-streamed object.
//! `stall_after`, `drop_after`, `comment_after` and `bom` count and treat these frames as they do chat chunks.
//! `offload mock-upstream --no-responses-api` (or `OFFLOAD_MOCK_NO_RESPONSES_API=true`, or
//! [`MockConfig::no_responses_api`]) makes it an upstream with only Chat Completions: `POST /v1/responses`
//! answers 404 with OpenAI's body for an unknown URL (`"Invalid URL (POST /v1/responses)"`).
//!
//! ## Inspection
//!
//! `GET /v1/models` lists [`MockConfig::models`] (default `gpt-3.5-turbo`) as OpenAI's model objects.
//! `GET /_mock/stats` counts calls of either API (`requests`, and per API `chat` and `responses`), completed
//! responses and responses the client abandoned (the connection was dropped mid-way), and the calls to a
//! switched-off `/v1/responses` (`not_found`) and to `/v1/models` (`models`, and `models_authorized` of them
//! with `Bearer <expected_key>`), counted nowhere else; `GET /_mock/requests` shows the last calls
//! received, of either API: the `path` called, the body, whether an `Authorization`
//! header came (`"authorization": true`), the W3C `traceparent` it carried (or `null`), and, when the mock was started with an [`MockConfig::expected_key`],
//! whether it was `Bearer <that key>` (`"authorization_expected"`, else `null`). The header's value itself is
//! never shown: it is the caller's upstream key.

mod chat;
mod controls;
mod fail;
mod responses;
#[cfg(test)]
mod tests;

use crate::domain::UpstreamKey;
use axum::extract::State;
use axum::http::{HeaderMap, header};
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
    /// Answer 404 to `POST /v1/responses`, like an upstream that has only Chat Completions.
    #[arg(long, env = "OFFLOAD_MOCK_NO_RESPONSES_API")]
    #[serde(default)]
    pub no_responses_api: bool,
    /// The ids `GET /v1/models` lists [default: `gpt-3.5-turbo`].
    #[arg(skip)]
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// The key a test expects calls to carry; `/_mock/requests` tells whether each did, never what came.
    #[arg(skip)]
    #[serde(skip)]
    pub expected_key: Option<UpstreamKey>,
}

#[derive(Default)]
pub struct MockStats {
    /// Calls of either API.
    pub requests: AtomicU64,
    /// Calls of `/v1/chat/completions`.
    pub chat: AtomicU64,
    /// Calls of `/v1/responses`.
    pub responses: AtomicU64,
    /// Calls of `/v1/responses` answered 404 because the API is switched off; not in `requests`.
    pub not_found: AtomicU64,
    /// Calls of `GET /v1/models`; not in `requests`.
    pub models: AtomicU64,
    /// Of those, the calls that carried `Bearer <expected_key>`.
    pub models_authorized: AtomicU64,
    pub completed: AtomicU64,
    pub disconnected: AtomicU64,
}

/// The API a call is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Chat,
    Responses,
}

impl Api {
    fn path(self) -> &'static str {
        match self {
            Api::Chat => "/v1/chat/completions",
            Api::Responses => "/v1/responses",
        }
    }
}

struct MockState {
    defaults: MockConfig,
    stats: MockStats,
    recent: Mutex<VecDeque<Value>>,
    /// Calls seen per body (or `key`), for `fail_first`.
    seen: Mutex<std::collections::HashMap<String, u32>>,
    /// The faults of the whole process, set by `POST /_mock/fail`.
    switch: fail::Switch,
}

impl MockState {
    /// Counts a call, and what becomes of its answer.
    fn begin(self: &Arc<Self>, api: Api) -> Completion {
        self.stats.requests.fetch_add(1, Ordering::SeqCst);
        let counter = match api {
            Api::Chat => &self.stats.chat,
            Api::Responses => &self.stats.responses,
        };
        counter.fetch_add(1, Ordering::SeqCst);
        Completion { state: self.clone(), done: false }
    }

    /// Whether the call's `Authorization` is `Bearer <expected_key>`; `None` without an expected key.
    fn expected(&self, headers: &HeaderMap) -> Option<bool> {
        let authorization = headers.get(header::AUTHORIZATION);
        self.defaults.expected_key.as_ref().map(|key| {
            let wanted = format!("Bearer {}", key.expose());
            authorization.is_some_and(|v| bool::from(v.as_bytes().ct_eq(wanted.as_bytes())))
        })
    }

    /// Keeps the call for `/_mock/requests` (the last 32).
    fn record(&self, api: Api, headers: &HeaderMap, request: &Value) {
        let expected = self.expected(headers);
        let mut recent = self.recent.lock();
        recent.push_back(json!({
            "path": api.path(),
            "body": request,
            "authorization": headers.contains_key(header::AUTHORIZATION),
            "traceparent": headers.get("traceparent").and_then(|v| v.to_str().ok()),
            "authorization_expected": expected,
        }));
        while recent.len() > 32 {
            recent.pop_front();
        }
    }
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
        switch: fail::Switch::default(),
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
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/responses", post(responses::create))
        .route("/v1/models", get(models))
        .route("/_mock/stats", get(stats))
        .route("/_mock/requests", get(recent))
        .route("/_mock/fail", post(fail::set).get(fail::get))
        .with_state(state)
}

async fn stats(State(state): State<Arc<MockState>>) -> Json<Value> {
    let s = &state.stats;
    Json(json!({
        "requests": s.requests.load(Ordering::SeqCst),
        "chat": s.chat.load(Ordering::SeqCst),
        "responses": s.responses.load(Ordering::SeqCst),
        "not_found": s.not_found.load(Ordering::SeqCst),
        "models": s.models.load(Ordering::SeqCst),
        "models_authorized": s.models_authorized.load(Ordering::SeqCst),
        "completed": s.completed.load(Ordering::SeqCst),
        "disconnected": s.disconnected.load(Ordering::SeqCst),
    }))
}

/// `GET /v1/models`: OpenAI's list of model objects, of [`MockConfig::models`].
async fn models(State(state): State<Arc<MockState>>, headers: HeaderMap) -> Json<Value> {
    state.stats.models.fetch_add(1, Ordering::SeqCst);
    if state.expected(&headers) == Some(true) {
        state.stats.models_authorized.fetch_add(1, Ordering::SeqCst);
    }
    let ids = state.defaults.models.clone().unwrap_or_else(|| vec!["gpt-3.5-turbo".to_owned()]);
    let data: Vec<Value> = ids
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 1_700_000_000, "owned_by": "mock"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn recent(State(state): State<Arc<MockState>>) -> Json<Value> {
    Json(Value::Array(state.recent.lock().iter().cloned().collect()))
}

/// Seconds since the Unix epoch.
fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
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
