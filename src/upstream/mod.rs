//! The HTTP client for the OpenAI-compatible upstream.
//!
//! `connect_timeout` is a per-request option, while reqwest sets it per client; so one client is kept per
//! distinct connect timeout (callers use a handful of values), each with its own connection pool.
//!
//! Retries (section 11 of the contract): [`Retries`] says which failures before the first chunk of a body are
//! retried and how long to wait; the worker runs the attempts within the request's own timeout.
//!
//! A hostile or misconfigured upstream changes nothing (issue 16): a redirect is never followed (it could point
//! at an internal address; the answer is an upstream error), and what is read of a reply is bounded by
//! [`ReplyLimits`]. The event stream is parsed in linear time by [`events::EventParser`].
//!
//! Two endpoints take calls ([`Endpoint`]): Chat Completions, and the Responses API for Responses API requests
//! when the upstream has one ([`UpstreamApi`]; with `auto` it is tried and what the upstream answered is
//! remembered, lock-free, for the life of the process).

pub mod breaker;
pub mod chat;
pub mod events;
mod pool;
pub mod translate;

pub use pool::{RouteSpec, Target, Upstreams};

use crate::document::ResponseMeta;
use crate::domain::UpstreamKey;
use bytes::Bytes;
use parking_lot::Mutex;
use rand::Rng;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::thread::ThreadId;
use std::time::Duration;
use url::Url;

/// Which API of the upstream a Responses API request (`POST /v1/responses`) is sent to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamApi {
    /// Try the upstream's Responses API; after a 404 or 405, translate to Chat Completions from then on.
    #[default]
    Auto,
    /// Always send Responses API requests to the upstream's Responses API, as they are.
    Responses,
    /// Always translate Responses API requests to Chat Completions.
    Chat,
}

/// Which endpoint a call goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `{base}/chat/completions`
    ChatCompletions,
    /// `{base}/responses`
    Responses,
}

/// What an `auto` upstream answered to its Responses API, in [`Upstream::found`].
const NOT_TRIED: u8 = 0;
const HAS_RESPONSES: u8 = 1;
const NO_RESPONSES: u8 = 2;

pub struct Upstream {
    /// Its name in the config file (`default` for the one the single-upstream settings describe).
    name: String,
    /// The models it serves (`None`: every model).
    models: Option<globset::GlobSet>,
    /// Whether a caller's own upstream key (`X-OpenAI-API-Key`) may be sent to it.
    caller_keys: bool,
    breaker: breaker::Breaker,
    chat_url: Url,
    responses_url: Url,
    models_url: Url,
    /// Where Responses API requests go.
    api: UpstreamApi,
    /// With `auto`: [`NOT_TRIED`], [`HAS_RESPONSES`] or [`NO_RESPONSES`].
    found: AtomicU8,
    retries: Retries,
    limits: ReplyLimits,
    /// HTTP/2 with prior knowledge (for an `http://` upstream that speaks it).
    h2c: bool,
    server_key: Option<UpstreamKey>,
    /// By connect timeout (milliseconds) and calling thread: see [`Upstream::client`].
    clients: Mutex<HashMap<(u64, ThreadId), reqwest::Client>>,
}

/// Why the call did not get a response.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("the upstream did not accept the connection within {0} seconds")]
    ConnectTimeout(f64),
    #[error("the upstream could not be reached: {0}")]
    Unreachable(String),
    #[error("the upstream call failed: {0}")]
    Failed(String),
    /// A 3xx answer: redirects are never followed, whatever address they name.
    #[error("the upstream answered {0}, a redirect; redirects are not followed")]
    Redirected(reqwest::StatusCode),
    /// The reply went on past `--max-upstream-reply-bytes`.
    #[error("the upstream's reply is larger than {0} bytes (--max-upstream-reply-bytes)")]
    TooLarge(usize),
}

impl CallError {
    /// The error code for a caller: a redirect or an oversized reply is the upstream's error, every other
    /// failure means it could not be reached.
    pub fn code(&self) -> &'static str {
        match self {
            CallError::Redirected(_) => "upstream_error",
            CallError::TooLarge(_) => "reply_too_large",
            _ => "upstream_unreachable",
        }
    }
}

/// How much of an upstream reply is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyLimits {
    /// Largest single event of an event stream (its data and the line being read), in bytes.
    pub max_event_bytes: usize,
    /// Largest reply body, in bytes, stream or not.
    pub max_reply_bytes: usize,
}

impl Default for ReplyLimits {
    /// Far above any chat completion (a chunk is a few hundred bytes, a whole reply rarely a megabyte), and low
    /// enough that one request cannot hold a large part of the server's memory.
    fn default() -> Self {
        Self { max_event_bytes: 16 * 1024 * 1024, max_reply_bytes: 64 * 1024 * 1024 }
    }
}

/// The text of an error and its causes, without URLs (they may hold credentials).
pub fn describe(e: &reqwest::Error) -> String {
    let mut text = String::new();
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(cause) = source {
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    if text.is_empty() { e.without_url_text() } else { text }
}

trait WithoutUrlText {
    fn without_url_text(&self) -> String;
}

impl WithoutUrlText for reqwest::Error {
    fn without_url_text(&self) -> String {
        if self.is_timeout() {
            "timed out".into()
        } else if self.is_connect() {
            "connection failed".into()
        } else if self.is_body() || self.is_decode() {
            "the response body could not be read".into()
        } else {
            "request failed".into()
        }
    }
}

impl Upstream {
    /// `base` is the API base such as `https://api.openai.com/v1`; calls go to `{base}/chat/completions` or
    /// `{base}/responses` (and `{base}/models`).
    pub fn new(base: &Url, server_key: Option<UpstreamKey>, h2c: bool) -> Self {
        let under = |name: &str| {
            let mut url = base.clone();
            url.set_path(&format!("{}/{name}", base.path().trim_end_matches('/')));
            url
        };
        Self {
            name: "default".into(),
            models: None,
            caller_keys: true,
            breaker: breaker::Breaker::new(breaker::BreakerPolicy::default()),
            chat_url: under("chat/completions"),
            responses_url: under("responses"),
            models_url: under("models"),
            api: UpstreamApi::default(),
            found: AtomicU8::new(NOT_TRIED),
            retries: Retries::default(),
            limits: ReplyLimits::default(),
            h2c,
            server_key,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// Names it, says which models it serves (`None`: every model), and whether callers' own upstream keys may be
    /// sent to it.
    pub fn named(mut self, name: &str, models: Option<globset::GlobSet>, caller_keys: bool) -> Self {
        self.name = name.to_owned();
        self.models = models;
        self.caller_keys = caller_keys;
        self
    }

    /// Sets when it is skipped after failures.
    pub fn with_breaker(mut self, policy: breaker::BreakerPolicy) -> Self {
        self.breaker = breaker::Breaker::new(policy);
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its provider as the GenAI conventions name it: `openai` for OpenAI's own API, else its name.
    pub fn provider_name(&self) -> &str {
        if self.chat_url.host_str() == Some("api.openai.com") { "openai" } else { &self.name }
    }

    /// Where `endpoint`'s calls go.
    pub fn url(&self, endpoint: Endpoint) -> &Url {
        match endpoint {
            Endpoint::ChatCompletions => &self.chat_url,
            Endpoint::Responses => &self.responses_url,
        }
    }

    /// Whether it serves `model`.
    pub fn serves(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|set| set.is_match(model))
    }

    pub fn breaker(&self) -> &breaker::Breaker {
        &self.breaker
    }

    /// Sets how failures before the first chunk are retried.
    pub fn with_retries(mut self, retries: Retries) -> Self {
        self.retries = retries;
        self
    }

    /// Sets where Responses API requests go; with `auto`, nothing is known of the upstream yet.
    pub fn with_api(mut self, api: UpstreamApi) -> Self {
        self.api = api;
        self.found = AtomicU8::new(NOT_TRIED);
        self
    }

    /// Whether a Responses request goes to the upstream's Responses API: `Some(true)` yes, `Some(false)` no (it
    /// is translated to Chat Completions), `None`: not known yet (setting `auto`, not yet tried): try it, and
    /// tell the answer with [`Upstream::found_responses_api`].
    pub fn has_responses_api(&self) -> Option<bool> {
        match self.api {
            UpstreamApi::Responses => Some(true),
            UpstreamApi::Chat => Some(false),
            UpstreamApi::Auto => match self.found.load(Ordering::Relaxed) {
                HAS_RESPONSES => Some(true),
                NO_RESPONSES => Some(false),
                _ => None,
            },
        }
    }

    /// Remembers what an `auto` upstream answered to its Responses API: `false` after a 404 or 405, `true` after
    /// any other answer. No effect unless the setting is `auto`.
    pub fn found_responses_api(&self, has: bool) {
        if self.api == UpstreamApi::Auto {
            self.found.store(if has { HAS_RESPONSES } else { NO_RESPONSES }, Ordering::Relaxed);
        }
    }

    pub fn retries(&self) -> &Retries {
        &self.retries
    }

    /// Sets how much of a reply is read.
    pub fn with_limits(mut self, limits: ReplyLimits) -> Self {
        self.limits = limits;
        self
    }

    pub fn limits(&self) -> ReplyLimits {
        self.limits
    }

    /// An upstream that takes callers' keys gets the caller's, else its own; any other, only its own.
    pub fn key_for(&self, caller: Option<UpstreamKey>) -> Option<UpstreamKey> {
        caller.filter(|_| self.caller_keys).or_else(|| self.server_key.clone())
    }

    /// OpenAI itself refuses every call without a key, so a missing key is the caller's error at once.
    pub fn requires_key(&self) -> bool {
        self.chat_url.host_str() == Some("api.openai.com")
    }

    /// The client for calls with this connect timeout from this thread. A client's connections are served by
    /// tasks of the runtime that opened them; HTTP/1.1 connections are served each on a thread of its own runtime
    /// (`http::cores`), so a client per thread keeps a call's upstream connection on the call's thread rather than
    /// waking another for every chunk. One client (and its pool) per thread and connect timeout in use.
    fn client(&self, connect_timeout: Duration) -> Result<reqwest::Client, CallError> {
        let key = (connect_timeout.as_millis() as u64, std::thread::current().id());
        let mut clients = self.clients.lock();
        if let Some(client) = clients.get(&key) {
            return Ok(client.clone());
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            // A redirect could send the call (a POST with its body and key, for 307 and 308) to any address,
            // internal ones included: it is answered as an upstream error instead (see `call` in the worker).
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(60));
        if self.h2c {
            builder = builder.http2_prior_knowledge();
        }
        let client = builder.build().map_err(|e| CallError::Failed(describe(&e)))?;
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// Sends the call to `endpoint`; the key is moved in and dropped as soon as the headers are built.
    pub async fn send(
        &self,
        endpoint: Endpoint,
        body: String,
        key: Option<UpstreamKey>,
        connect_timeout: f64,
        traceparent: Option<String>,
    ) -> Result<reqwest::Response, CallError> {
        let client = self.client(Duration::from_secs_f64(connect_timeout))?;
        let mut request = client
            .post(self.url(endpoint).clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(body);
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        if let Some(key) = key {
            request = request.header(AUTHORIZATION, bearer(&key)?);
        }
        crate::metrics::upstream_call(request.send()).await.map_err(|e| call_error(&e, connect_timeout))
    }

    /// `GET {base}/models` with the key: the upstream's status, content type and body (section 10). A redirect is
    /// an error, and the body is read up to `--max-upstream-reply-bytes`.
    pub async fn models(
        &self,
        key: Option<UpstreamKey>,
        connect_timeout: f64,
    ) -> Result<(reqwest::StatusCode, Option<HeaderValue>, Bytes), CallError> {
        let client = self.client(Duration::from_secs_f64(connect_timeout))?;
        let mut request = client.get(self.models_url.clone());
        if let Some(key) = key {
            request = request.header(AUTHORIZATION, bearer(&key)?);
        }
        let mut response = request.send().await.map_err(|e| call_error(&e, connect_timeout))?;
        let status = response.status();
        if status.is_redirection() {
            return Err(CallError::Redirected(status));
        }
        let content_type = response.headers().get(CONTENT_TYPE).cloned();
        let max = self.limits.max_reply_bytes;
        let mut body = Vec::new();
        while let Some(piece) = response.chunk().await.map_err(|e| CallError::Failed(describe(&e)))? {
            if body.len() + piece.len() > max {
                return Err(CallError::TooLarge(max));
            }
            body.extend_from_slice(&piece);
        }
        Ok((status, content_type, body.into()))
    }
}

/// `Bearer <key>`, marked sensitive so that it never shows in a debug print; the key is dropped by the caller
/// right after.
fn bearer(key: &UpstreamKey) -> Result<HeaderValue, CallError> {
    let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
        .map_err(|_| CallError::Failed("the upstream key contains characters not allowed in a header".into()))?;
    value.set_sensitive(true);
    Ok(value)
}

fn call_error(e: &reqwest::Error, connect_timeout: f64) -> CallError {
    if e.is_connect() && e.is_timeout() {
        CallError::ConnectTimeout(connect_timeout)
    } else if e.is_connect() {
        CallError::Unreachable(describe(e))
    } else {
        CallError::Failed(describe(e))
    }
}

/// How failed upstream attempts are retried: at most `max` more attempts, waiting about `backoff * 2^n` (between
/// half and all of it, the jitter) before retry `n + 1`, or longer when the upstream's `Retry-After` says so.
#[derive(Clone, Debug)]
pub struct Retries {
    pub max: u32,
    pub backoff: Duration,
    /// How long one attempt waits for its response headers before it counts as failed (`None`: as long as the
    /// request's timeout allows).
    pub header_timeout: Option<Duration>,
}

impl Default for Retries {
    fn default() -> Self {
        Self { max: 2, backoff: Duration::from_millis(250), header_timeout: None }
    }
}

impl Retries {
    /// Whether an answer with this status is worth another attempt.
    pub fn retryable_status(status: u16) -> bool {
        matches!(status, 429 | 500 | 502 | 503 | 504)
    }

    /// Whether a failure to get an answer is worth another attempt: the connection could not be made (in time).
    pub fn retryable_error(error: &CallError) -> bool {
        matches!(error, CallError::ConnectTimeout(_) | CallError::Unreachable(_))
    }

    /// The wait before the retry that follows `failed` failed attempts (1 for the first retry).
    pub fn delay(&self, failed: u32, retry_after: Option<Duration>) -> Duration {
        let full = self.backoff.saturating_mul(1 << failed.saturating_sub(1).min(16));
        let jittered = full.mul_f64(rand::rng().random_range(0.5..=1.0));
        retry_after.map_or(jittered, |asked| asked.max(jittered))
    }
}

/// The wait a `Retry-After` header asks for: seconds (the form OpenAI and its kin send) or an HTTP date.
pub fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    parse_retry_after(response.headers().get(RETRY_AFTER)?.to_str().ok()?, std::time::SystemTime::now())
}

fn parse_retry_after(text: &str, now: std::time::SystemTime) -> Option<Duration> {
    let text = text.trim();
    let wait = match text.parse::<f64>() {
        Ok(seconds) => {
            (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds.min(86_400.0)))?
        }
        Err(_) => httpdate::parse_http_date(text).ok()?.duration_since(now).unwrap_or_default(),
    };
    Some(wait.min(Duration::from_secs(86_400)))
}

/// The status line and headers of a response, for the document.
pub fn response_meta(response: &reqwest::Response) -> ResponseMeta {
    let mut headers: Vec<(String, String)> = Vec::with_capacity(response.headers().len());
    for (name, value) in response.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match headers.iter_mut().find(|(n, _)| n == name.as_str()) {
            Some((_, existing)) => {
                existing.push_str(", ");
                existing.push_str(&value);
            }
            None => headers.push((name.as_str().to_owned(), value)),
        }
    }
    let protocol = match response.version() {
        reqwest::Version::HTTP_09 => "HTTP/0.9",
        reqwest::Version::HTTP_10 => "HTTP/1.0",
        reqwest::Version::HTTP_2 => "HTTP/2",
        reqwest::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    };
    ResponseMeta { status_code: response.status().as_u16(), protocol: protocol.into(), headers }
}

/// The head of the raw response (`.raw`): status line and headers as received, then a blank line.
pub fn raw_head(response: &reqwest::Response, meta: &ResponseMeta) -> Bytes {
    let reason = response.status().canonical_reason().unwrap_or("");
    let mut head = format!("{} {} {}\r\n", meta.protocol, meta.status_code, reason);
    for (name, value) in response.headers() {
        head.push_str(name.as_str());
        head.push_str(": ");
        head.push_str(&String::from_utf8_lossy(value.as_bytes()));
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    Bytes::from(head)
}

#[cfg(test)]
mod tests;
