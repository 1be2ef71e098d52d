//! The OpenAI-compatible entry (section 10 of the contract): `POST /v1/chat/completions` and `GET /v1/models`, so
//! that an official OpenAI SDK works with its base URL set to this server's `/v1`.
//!
//! A chat completion is a request like any other (created by the engine, stored, with its status document, event
//! stream and raw response); the answer follows it: `stream: true` relays its events live and ends with
//! `data: [DONE]`, `stream: false` waits for its end and answers the upstream's status and body. The caller's
//! connection is not the request's: when it drops, the request runs to its end (unless
//! `X-Offload-On-Disconnect: stop`), to be read from its URLs, named in the `X-Offload-*` headers of the answer.

use super::AppState;
use super::create::{self, Incoming};
use super::error::ApiError;
use crate::document::ErrorInfo;
use crate::domain::{CreateRequest, Kind, Status};
use crate::engine::live::{CancelReason, LiveRequest, Read};
use crate::engine::{Created, sse};
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::time::Duration;

/// Where the answer's request can be read: its status document.
pub const STATUS_URL: HeaderName = HeaderName::from_static("x-offload-status-url");
/// Its event stream (stream requests), to resume from with `Last-Event-ID`.
pub const STREAM_URL: HeaderName = HeaderName::from_static("x-offload-stream-url");
/// Its bearer token (private requests, asked for with `X-Offload-Access: private`).
pub const BEARER_TOKEN: HeaderName = HeaderName::from_static("x-offload-bearer-token");

/// How many events one read of the live request hands over at most.
const BATCH: usize = 256;
/// Comment lines while nothing else is sent, so that proxies keep the connection open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Time limit of `GET /v1/models` at the upstream.
const MODELS_TIMEOUT: Duration = Duration::from_secs(30);

/// The `X-Offload-*` request headers.
struct Offload {
    access: Option<&'static str>,
    webhook_url: Option<String>,
    stop_on_disconnect: bool,
}

fn header_text<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, ApiError> {
    let Some(value) = headers.get(name) else { return Ok(None) };
    let text =
        value.to_str().map_err(|_| invalid_header(name, format!("The {name} header is not plain ASCII text.")))?;
    Ok(Some(text.trim()))
}

fn invalid_header(name: &'static str, message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_header", message).with_param(Some(name))
}

impl Offload {
    fn parse(headers: &HeaderMap) -> Result<Self, ApiError> {
        let access = match header_text(headers, "X-Offload-Access")? {
            None => None,
            Some(v) if v.eq_ignore_ascii_case("public") => Some("public"),
            Some(v) if v.eq_ignore_ascii_case("private") => Some("private"),
            Some(v) => {
                return Err(invalid_header(
                    "X-Offload-Access",
                    format!("X-Offload-Access must be `public` or `private`, not {v:?}."),
                ));
            }
        };
        let stop_on_disconnect = match header_text(headers, "X-Offload-On-Disconnect")? {
            None => false,
            Some(v) if v.eq_ignore_ascii_case("continue") => false,
            Some(v) if v.eq_ignore_ascii_case("stop") => true,
            Some(v) => {
                return Err(invalid_header(
                    "X-Offload-On-Disconnect",
                    format!(
                        "X-Offload-On-Disconnect must be `continue` (the default: the call runs to its end) or `stop`, not {v:?}."
                    ),
                ));
            }
        };
        let webhook_url = header_text(headers, "X-Offload-Webhook-Url")?.map(str::to_owned);
        Ok(Self { access, webhook_url, stop_on_disconnect })
    }
}

/// The Chat Completions body as a create body: `stream` taken out (it picks the kind), the `X-Offload-*` options
/// put in.
fn create_body(body: &[u8], offload: &Offload) -> Result<(Kind, Vec<u8>), ApiError> {
    let mut fields: Map<String, Value> = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("The body must be a JSON object, a Chat Completions request ({e})."),
        )
    })?;
    let stream = match fields.shift_remove("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(stream)) => stream,
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_field",
                format!("`stream` must be true or false, not {other}."),
            )
            .with_param(Some("stream")));
        }
    };
    if let Some(access) = offload.access {
        fields.insert("access".into(), access.into());
    }
    if let Some(url) = &offload.webhook_url {
        fields.insert("webhook_url".into(), url.clone().into());
    }
    let kind = if stream { Kind::Stream } else { Kind::Async };
    let bytes = serde_json::to_vec(&fields).map_err(|e| ApiError::internal(&e))?;
    Ok((kind, bytes))
}

/// Stops the request when the caller goes away before its answer is complete, if it asked for that.
struct OnDisconnect {
    live: Arc<LiveRequest>,
    stop: bool,
}

impl OnDisconnect {
    fn answered(mut self) {
        self.stop = false;
    }
}

impl Drop for OnDisconnect {
    fn drop(&mut self) {
        if self.stop && self.live.cancel_with(CancelReason::Stop, crate::domain::unix_now()) {
            tracing::info!(request = %self.live.meta.locator.id, "the caller disconnected: stopped (X-Offload-On-Disconnect: stop)");
        }
    }
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(State(app): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let incoming: Incoming = create::receive(&app, request).await?;
    let offload = Offload::parse(&incoming.headers)?;
    let (kind, body) = create_body(&incoming.body, &offload)?;
    let request = CreateRequest::parse(&body, app.engine.limits()).map_err(|e| {
        let code = if e.param.is_some() { "invalid_field" } else { "invalid_json" };
        ApiError::new(StatusCode::BAD_REQUEST, code, e.message).with_param(e.param)
    })?;
    let created = create::start(&app, kind, &incoming, request).await?;
    let live = created.live.clone();
    let guard = OnDisconnect { live: live.clone(), stop: offload.stop_on_disconnect };
    let headers = offload_headers(&app, &created);

    // Wait for the first chunk of a stream, or the end (durable) of anything else.
    let mut changes = live.subscribe();
    loop {
        changes.borrow_and_update();
        let (status, events) = live.update(|st| (false, (st.progress.status, st.events.len())));
        if status.is_final() || (kind == Kind::Stream && status == Status::Streaming) {
            let streamed = kind == Kind::Stream && events > 0 && answered_ok(&live);
            if streamed {
                return Ok(stream_answer(live, guard, headers));
            }
            guard.answered();
            return Ok(final_answer(&live, headers));
        }
        if changes.changed().await.is_err() {
            // The sender lives in `live`, which this holds: it cannot be gone.
            return Err(ApiError::internal(&"the request's state is gone"));
        }
    }
}

/// Whether the upstream answered with a success status.
fn answered_ok(live: &LiveRequest) -> bool {
    live.update(|st| (false, st.progress.response.as_ref().is_some_and(|r| (200..300).contains(&r.status_code))))
}

fn offload_headers(app: &AppState, created: &Created) -> HeaderMap {
    let urls = app.engine.urls().endpoints(&created.meta);
    let mut headers = HeaderMap::new();
    let mut put = |name: HeaderName, value: &str| {
        if let Ok(mut value) = HeaderValue::from_str(value) {
            if name == BEARER_TOKEN {
                value.set_sensitive(true);
            }
            headers.insert(name, value);
        }
    };
    put(STATUS_URL, &urls.status_url);
    if let Some(stream) = &urls.stream_events_url {
        put(STREAM_URL, stream);
    }
    if let Some(bearer) = &created.bearer {
        put(BEARER_TOKEN, bearer.as_str());
    }
    headers
}

/// The answer of a request that is final: the upstream's status and body when it answered (an error status, or
/// a non-stream success), else an error saying why there is no answer.
fn final_answer(live: &LiveRequest, mut headers: HeaderMap) -> Response {
    let (progress, body) = live.update(|st| (false, (st.progress.clone(), st.body.to_json())));
    let upstream = progress.response.as_ref().map(|r| r.status_code);
    let answered = match (upstream, progress.status, &body) {
        (Some(code), _, Some(body)) if !(200..300).contains(&code) => Some((code, body.clone())),
        (Some(code), Status::Done, Some(body)) => Some((code, body.clone())),
        _ => None,
    };
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some((code, body)) = answered {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
        return (status, headers, body).into_response();
    }
    let stopped = ErrorInfo::new("stopped", "The request was stopped through its stop_url before it was answered.");
    let error = match progress.status {
        Status::Stop => stopped,
        _ => progress.error.unwrap_or_else(|| {
            ErrorInfo::new("upstream_error", "The upstream's answer was not complete; see the status document.")
        }),
    };
    let status = match error.code.as_str() {
        "timeout" | "connect_timeout" => StatusCode::GATEWAY_TIMEOUT,
        "interrupted" => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_GATEWAY,
    };
    let body = json!({"status": "error", "error": {"code": error.code, "message": error.message, "param": null}});
    (status, headers, body.to_string()).into_response()
}

/// The live event stream of a stream request, in OpenAI's format: each chunk as it arrived (with its `id`, the
/// same as in the request's own event stream, to resume from there), then `data: [DONE]`. A request that ends in
/// `error` sends `event: error` with `{"error": {...}}` before it, which the SDKs raise.
fn stream_answer(live: Arc<LiveRequest>, guard: OnDisconnect, mut headers: HeaderMap) -> Response {
    let body = async_stream::stream! {
        let guard = guard;
        let mut changes = live.subscribe();
        let mut cursor = 0;
        loop {
            changes.borrow_and_update();
            match live.read(cursor, BATCH) {
                Read::Events(bytes, next) => {
                    cursor = next;
                    yield Ok::<_, std::convert::Infallible>(bytes);
                }
                Read::End(_) => {
                    let error = live.update(|st| (false, (st.progress.status == Status::Error).then(|| st.progress.error.clone()).flatten()));
                    guard.answered();
                    yield Ok(end_of_stream(error.as_ref()));
                    break;
                }
                Read::Wait => {
                    tokio::select! {
                        changed = changes.changed() => if changed.is_err() { break },
                        _ = tokio::time::sleep(KEEP_ALIVE) => yield Ok(Bytes::from_static(sse::KEEP_ALIVE)),
                    }
                }
            }
        }
    };
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    (StatusCode::OK, headers, Body::from_stream(body)).into_response()
}

fn end_of_stream(error: Option<&ErrorInfo>) -> Bytes {
    let mut out = String::new();
    if let Some(error) = error {
        let data = json!({"error": {"message": error.message, "type": "upstream_error", "code": error.code}});
        out.push_str(&format!("event: error\ndata: {data}\n\n"));
    }
    out.push_str("data: [DONE]\n\n");
    Bytes::from(out)
}

/// `GET /v1/models`: the upstream's answer, status and body, with the server's or the caller's upstream key.
pub async fn models(State(app): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    create::caller(&app, &headers, false).await?;
    let caller_key = create::upstream_key(&headers)?;
    let upstream = app.engine.upstream();
    let key = upstream.key_for(caller_key);
    if key.is_none() && upstream.requires_key() {
        return Err(crate::engine::CreateError::MissingKey.into());
    }
    let connect_timeout = app.engine.limits().max_connect_timeout.min(5.0);
    match tokio::time::timeout(MODELS_TIMEOUT, upstream.models(key, connect_timeout)).await {
        Ok(Ok((status, content_type, body))) => {
            let status = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let content_type = content_type.unwrap_or(HeaderValue::from_static("application/json"));
            Ok((status, [(header::CONTENT_TYPE, content_type)], body).into_response())
        }
        Ok(Err(e)) => Err(ApiError::new(StatusCode::BAD_GATEWAY, e.code(), e.to_string())),
        Err(_) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!("The upstream did not answer GET /models within {} seconds.", MODELS_TIMEOUT.as_secs()),
        )),
    }
}
