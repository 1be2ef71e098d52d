//! What the OpenAI-shaped APIs (`/v1/chat/completions`, `/v1/responses`) share: the `X-Offload-*` options a
//! caller sends with a create call, the URLs its answer names, and the answer that follows a request live.

use crate::engine::live::{CancelReason, End, LiveRequest};
use crate::engine::{Created, Found};
use crate::http::AppState;
use crate::http::error::ApiError;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// Where the answer's request can be read: its status document.
pub const STATUS_URL: HeaderName = HeaderName::from_static("x-offload-status-url");
/// Its event stream (stream requests), to resume from with `Last-Event-ID`.
pub const STREAM_URL: HeaderName = HeaderName::from_static("x-offload-stream-url");
/// Its bearer token (private requests, asked for with `X-Offload-Access: private`).
pub const BEARER_TOKEN: HeaderName = HeaderName::from_static("x-offload-bearer-token");

/// The `X-Offload-*` request headers.
pub struct OffloadHeaders {
    pub access: Option<&'static str>,
    pub webhook_url: Option<String>,
    pub stop_on_disconnect: bool,
}

pub fn header_text<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, ApiError> {
    let Some(value) = headers.get(name) else { return Ok(None) };
    let text =
        value.to_str().map_err(|_| invalid_header(name, format!("The {name} header is not plain ASCII text.")))?;
    Ok(Some(text.trim()))
}

pub fn invalid_header(name: &'static str, message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_header", message).with_param(Some(name))
}

impl OffloadHeaders {
    pub fn parse(headers: &HeaderMap) -> Result<Self, ApiError> {
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

/// Stops the request when the caller goes away before its answer is complete, if it asked for that.
pub struct OnDisconnect {
    pub live: Arc<LiveRequest>,
    pub stop: bool,
}

impl OnDisconnect {
    pub fn answered(mut self) {
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

/// The `X-Offload-*` headers of a create's answer: where its request can be read.
pub fn created_headers(app: &AppState, created: &Created) -> HeaderMap {
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

/// The live event stream of a request as an answer: its events from the first, then the API's `ending`. The
/// caller's leaving stops the request only if it asked for that (`guard`), and only before the whole answer went.
pub fn live_answer(
    app: &AppState,
    live: Arc<LiveRequest>,
    guard: OnDisconnect,
    mut headers: HeaderMap,
    ending: fn(&End) -> Bytes,
    content_type: &'static str,
) -> Response {
    let events = app.engine.follow(Found::Live(live), 0, false, ending);
    let body = async_stream::stream! {
        let guard = guard;
        let mut events = std::pin::pin!(events);
        while let Some(bytes) = futures_util::StreamExt::next(&mut events).await {
            yield bytes;
        }
        // The whole answer went out (or the server is closing): leaving now stops nothing.
        guard.answered();
    };
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    (StatusCode::OK, headers, Body::from_stream(body)).into_response()
}
