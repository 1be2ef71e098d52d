//! The OpenAI-compatible entry (section 10 of the contract): `POST /v1/chat/completions` (and `GET /v1/models`, in
//! `models.rs`), so that an official OpenAI SDK works with its base URL set to this server's `/v1`.
//!
//! A chat completion is a request like any other (created by the engine, stored, with its status document, event
//! stream and raw response); the answer follows it: `stream: true` relays its events live and ends with
//! `data: [DONE]`, `stream: false` waits for its end and answers the upstream's status and body. The caller's
//! connection is not the request's: when it drops, the request runs to its end (unless
//! `X-Offload-On-Disconnect: stop`), to be read from its URLs, named in the `X-Offload-*` headers of the answer.

use crate::document::ErrorInfo;
use crate::domain::{Kind, Status};
use crate::engine::live::{End, LiveRequest};
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::http::intake::{self, Incoming};
use crate::http::offload_headers::{OffloadHeaders, OnDisconnect, created_headers, live_answer};
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use std::sync::Arc;

/// The Chat Completions body as a create body: `stream` taken out (it picks the kind), the `X-Offload-*` options
/// put in.
fn create_body(body: &[u8], offload: &OffloadHeaders) -> Result<(Kind, Vec<u8>), ApiError> {
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

/// `POST /v1/chat/completions`.
pub async fn chat_completions(State(app): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let incoming: Incoming = intake::receive(&app, request).await?;
    let offload = OffloadHeaders::parse(&incoming.headers)?;
    let (kind, body) = create_body(&incoming.body, &offload)?;
    let mut request = intake::parse(&body, &app)?;
    request.answer_waits_for_upstream = true;
    let created = intake::admit(&app, kind, &incoming, request).await?;
    let live = created.live.clone();
    let guard = OnDisconnect { live: live.clone(), stop: offload.stop_on_disconnect };
    let headers = created_headers(&app, &created);

    // Wait for the first chunk of a stream, or the end (durable) of anything else.
    let mut changes = live.subscribe();
    loop {
        changes.borrow_and_update();
        let now = live.answering();
        if now.status.is_final() || (kind == Kind::Stream && now.status == Status::Streaming) {
            if let Some(upstream) = live.upstream_name().filter(|_| app.engine.upstreams().all().len() > 1) {
                crate::telemetry::record_upstream(&upstream);
            }
            let answered_ok = now.upstream_status.is_some_and(|code| (200..300).contains(&code));
            if kind == Kind::Stream && now.events > 0 && answered_ok {
                return Ok(stream_answer(&app, live, guard, headers));
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

/// The answer of a request that is final: the upstream's status and body when it answered (an error status, or
/// a non-stream success), else an error saying why there is no answer.
fn final_answer(live: &LiveRequest, mut headers: HeaderMap) -> Response {
    let (progress, body) = live.snapshot();
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
/// `error` sends `event: error` with `{"error": {...}}` before it, which the SDKs raise. The engine's one reader
/// loop sends it; this API gives only its end.
fn stream_answer(app: &AppState, live: Arc<LiveRequest>, guard: OnDisconnect, headers: HeaderMap) -> Response {
    live_answer(app, live, guard, headers, ending, "text/event-stream")
}

/// This API's end of a stream.
fn ending(end: &End) -> Bytes {
    end_of_stream((end.status == Status::Error).then_some(end.error.as_ref()).flatten())
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
