//! What every mocked API shares: the per-call controls of the `mock` object, the faults they ask for before any
//! answer (`stall_headers`, `stall_first`, `fail_first`, `status`), the words generator, and the paced body.

use super::{Completion, MockConfig, MockState};
use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;
use std::time::Duration;

/// The per-call controls.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub(super) struct Controls {
    pub words: Option<usize>,
    pub content: Option<String>,
    pub ttft_ms: Option<u64>,
    pub delay_ms: Option<u64>,
    pub status: Option<u16>,
    pub error_message: Option<String>,
    pub stall_after: Option<usize>,
    pub stall_headers: bool,
    pub drop_after: Option<usize>,
    /// Stream: an SSE comment line (`: ping`) after this many events, as some OpenAI-compatible servers send.
    pub comment_after: Option<usize>,
    /// Stream: a byte order mark before the first event, which the event stream format allows.
    pub bom: bool,
    pub tool_calls: Option<Vec<MockToolCall>>,
    /// Only the first this many calls with the same body (or `key`) fail with `status` (default 503).
    pub fail_first: Option<u32>,
    /// Like `fail_first`, but the first n calls send no headers at all (they stall).
    pub stall_first: Option<u32>,
    /// Tells calls apart for `fail_first` instead of their whole body.
    pub key: Option<String>,
    /// `Retry-After` (seconds) on a failure of `fail_first`.
    pub retry_after: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct MockToolCall {
    pub name: String,
    #[serde(default)]
    pub arguments: String,
}

impl Controls {
    /// The request's `mock` object; none, or one that does not parse, is no control at all.
    pub fn of(request: &Value) -> Self {
        request.get("mock").cloned().and_then(|m| serde_json::from_value(m).ok()).unwrap_or_default()
    }

    /// The words of the answer, each with its trailing space: `content` split at spaces, else `words` (call,
    /// then process default, then 12) taken in turn from [`WORDS`].
    pub fn words(&self, defaults: &MockConfig) -> Vec<String> {
        match &self.content {
            Some(text) => {
                let mut pieces: Vec<String> = text.split_inclusive(' ').map(str::to_owned).collect();
                if pieces.is_empty() {
                    pieces.push(String::new());
                }
                pieces
            }
            None => {
                let count = self.words.or(defaults.words).unwrap_or(12);
                (0..count).map(|i| format!("{} ", WORDS[i % WORDS.len()])).collect()
            }
        }
    }

    pub fn tool_calls(&self) -> Vec<MockToolCall> {
        self.tool_calls.clone().unwrap_or_default()
    }

    pub fn pace(&self, defaults: &MockConfig) -> Pace {
        Pace {
            ttft: Duration::from_millis(self.ttft_ms.or(defaults.ttft_ms).unwrap_or(0)),
            delay: Duration::from_millis(self.delay_ms.or(defaults.delay_ms).unwrap_or(0)),
        }
    }

    /// The faults asked for before any answer: stalls the headers (`stall_headers`, `stall_first`), or answers
    /// the error of `fail_first` or `status`. `None`: the call goes on to its answer.
    pub async fn fault(&self, state: &MockState, body: &Bytes) -> Option<Response> {
        if self.stall_headers {
            tokio::time::sleep(Duration::from_secs(600)).await;
        }
        // Calls seen with this body (or `key`), counted for `fail_first` and `stall_first`.
        let seen = (self.fail_first.is_some() || self.stall_first.is_some()).then(|| {
            let key = self.key.clone().unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
            let mut seen = state.seen.lock();
            let count = seen.entry(key).or_insert(0);
            *count += 1;
            *count
        });
        if let (Some(first), Some(seen)) = (self.stall_first, seen)
            && seen <= first
        {
            tokio::time::sleep(Duration::from_secs(600)).await;
        }
        if let (Some(first), Some(seen)) = (self.fail_first, seen) {
            if seen <= first {
                let status = self.status.and_then(|s| StatusCode::from_u16(s).ok());
                let status = status.unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                let message = self.error_message.clone().unwrap_or_else(|| format!("Mock failure {seen} of {first}."));
                let mut response = openai_error(status, &message);
                if let Some(after) = self.retry_after
                    && let Ok(value) = header::HeaderValue::from_str(&after.to_string())
                {
                    response.headers_mut().insert(header::RETRY_AFTER, value);
                }
                return Some(response);
            }
        } else if let Some(status) = self.status.and_then(|s| StatusCode::from_u16(s).ok()) {
            let message = self.error_message.clone().unwrap_or_else(|| format!("Mock error with status {status}."));
            return Some(openai_error(status, &message));
        }
        None
    }

    /// A stream's pieces from its frames: the `: ping` comment of `comment_after`, `last` (e.g. `data: [DONE]`),
    /// and the byte order mark of `bom`.
    pub fn stream_pieces(&self, frames: Vec<String>, last: Option<&str>) -> Vec<String> {
        let mut pieces = frames;
        if let Some(at) = self.comment_after.filter(|at| *at <= pieces.len()) {
            pieces.insert(at, ": ping\n\n".to_owned());
        }
        pieces.extend(last.map(str::to_owned));
        if self.bom
            && let Some(first) = pieces.first_mut()
        {
            first.insert(0, '\u{feff}');
        }
        pieces
    }
}

/// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.
pub(super) fn openai_error(status: StatusCode, message: &str) -> Response {
    let kind = if status.is_server_error() { "server_error" } else { "invalid_request_error" };
    let body = serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": null}});
    (status, axum::Json(body)).into_response()
}

pub(super) const WORDS: &[&str] = &[
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

/// When the pieces of an answer are sent: the first after `ttft`, the next ones `delay` apart.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pace {
    pub ttft: Duration,
    pub delay: Duration,
}

/// A JSON body sent in `parts` pieces, paced like a stream, so that a slow answer shows as `waiting` and stalls
/// and drops work the same way.
pub(super) fn split_evenly(text: &str, parts: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let size = chars.len().div_ceil(parts).max(1);
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}

/// Sends `pieces` at `pace`, dropping or stalling where `controls` say, and counts the end in `guard`.
pub(super) fn paced_response(
    pace: Pace,
    controls: &Controls,
    guard: Completion,
    pieces: Vec<String>,
    content_type: &'static str,
) -> Response {
    let (drop_after, stall_after) = (controls.drop_after, controls.stall_after);
    let body = async_stream::stream! {
        let guard = guard;
        // A zero sleep still waits for the next timer tick (1 ms): the floor must not pay it.
        if !pace.ttft.is_zero() {
            tokio::time::sleep(pace.ttft).await;
        }
        for (i, piece) in pieces.into_iter().enumerate() {
            if drop_after == Some(i) {
                // Let what was sent reach the client first, then cut the connection mid-body.
                tokio::time::sleep(Duration::from_millis(50)).await;
                yield Err(std::io::Error::other("mock: dropping the connection"));
                return;
            }
            if stall_after == Some(i) {
                tokio::time::sleep(Duration::from_secs(600)).await;
                return;
            }
            if i > 0 && !pace.delay.is_zero() {
                tokio::time::sleep(pace.delay).await;
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
