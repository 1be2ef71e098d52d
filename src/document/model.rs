//! What the status document is made of: the request's fixed facts ([`RequestMeta`]) and its progress
//! ([`Progress`]). Both are stored; the response body is kept apart because it is large and grows.

use crate::domain::{Locator, Status, TokenHash};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// Facts fixed when the request is accepted.
#[derive(Debug, Clone)]
pub struct RequestMeta {
    pub locator: Locator,
    /// Creation time with sub-second precision (unix seconds), the origin of `total_time`.
    pub created: f64,
    pub conversation_id: String,
    /// Hash of the bearer token (private requests).
    pub bearer: Option<TokenHash>,
    /// Hash of the stream token (private requests; accepted on `.txt` only).
    pub stream_token: Option<TokenHash>,
    pub options: Options,
    /// The status URL this request continues from, as the caller gave it.
    pub from_status_url: Option<String>,
    /// A JSON object: exactly what is sent upstream, minus `stream` (set by the endpoint).
    pub parameters: Box<RawValue>,
    /// The node that runs the request (not part of the document). `None` in stores written before nodes were
    /// recorded.
    pub owner: Option<crate::domain::NodeId>,
    /// What the record holds: Chat Completions chunks, or Responses events (a Responses API request).
    pub format: crate::domain::Format,
    /// A Responses request: how many items at the start of its `input` are the conversation before it (resolved
    /// from `previous_response_id`), not the caller's own input.
    pub history_items: usize,
    /// The W3C `traceparent` of the request's span, when traces are sent: its webhook attempts continue it.
    pub traceparent: Option<String>,
    /// The id of the service key that created the request (`None` on an open server): whose usage it counts in.
    pub key: Option<String>,
}

/// The `options` object of the document.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Options {
    #[serde(serialize_with = "compact_number")]
    pub timeout: f64,
    #[serde(serialize_with = "compact_number")]
    pub connect_timeout: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_max_length: Option<usize>,
}

/// Writes whole numbers without a fraction (`90`, not `90.0`), as the seed documents show them.
pub fn compact_number<S: Serializer>(value: &f64, s: S) -> Result<S::Ok, S::Error> {
    if value.fract() == 0.0 && value.abs() < 1e15 { s.serialize_i64(*value as i64) } else { s.serialize_f64(*value) }
}

/// Everything about a request that changes while it runs, except the body and the events.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    pub status: Status,
    /// When the upstream call was sent (unix seconds).
    #[serde(default)]
    pub request_at: Option<f64>,
    /// When the upstream response ended.
    #[serde(default)]
    pub finished_at: Option<f64>,
    /// When the request reached its final status.
    #[serde(default)]
    pub processed_at: Option<f64>,
    #[serde(default)]
    pub response: Option<ResponseMeta>,
    #[serde(default)]
    pub error: Option<ErrorInfo>,
    /// The upstream attempts that failed and were retried, oldest first (section 11); the last attempt's own
    /// outcome is the request's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<Attempt>,
    /// The upstream that the call (its last attempt) went to, and the model name it was sent, once it is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<Served>,
}

/// An upstream by its name in the config (`default` for the single-upstream settings), and the model name it was
/// sent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Served {
    pub name: String,
    pub model: String,
}

/// One upstream attempt that failed before the first chunk of its body and was retried.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Attempt {
    /// When it was sent (unix seconds, decimals).
    pub at: f64,
    /// The upstream's status code, when it answered (429, 500, 502, 503, 504).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    /// Why it failed: `connect_timeout`, `upstream_unreachable` or `upstream_error`, and a message.
    pub error: ErrorInfo,
    /// The upstream it went to, and the model name it was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

impl Progress {
    pub fn pending() -> Self {
        Self {
            status: Status::Pending,
            request_at: None,
            finished_at: None,
            processed_at: None,
            response: None,
            error: None,
            attempts: Vec::new(),
            upstream: None,
        }
    }
}

/// The upstream's status line and headers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResponseMeta {
    pub status_code: u16,
    /// `HTTP/1.1`, `HTTP/2`.
    pub protocol: String,
    /// In the upstream's order; repeated headers joined with ", ".
    pub headers: Vec<(String, String)>,
}

/// Why a request ended in `error`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorInfo {
    /// `timeout`, `connect_timeout`, `upstream_error`, `upstream_unreachable`, `interrupted`.
    pub code: String,
    pub message: String,
}

impl ErrorInfo {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self { code: code.to_owned(), message: message.into() }
    }
}

impl Serialize for Status {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Status {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Status::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("unknown status {s:?}")))
    }
}
