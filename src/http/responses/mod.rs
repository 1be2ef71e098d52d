//! The OpenAI Responses API (issue 18): `POST /v1/responses` with background mode, and the endpoints of a
//! response (`reads`), so that code written for OpenAI's background mode runs unchanged against this server.
//!
//! A response is a request like any other (created by the engine, stored, with its status document, event
//! stream and raw response), whose record holds Responses events and a `response` object whatever its upstream
//! speaks (the engine's `translate::Record`). Its id is `resp_` and the request id's hex digits. The answer to a
//! create: `background` answers the object at once (`queued`); `stream` relays its events live; neither waits for
//! the end and answers the final object (or the upstream's error status and body). As on `/v1/chat/completions`,
//! a caller that leaves does not end the call unless it sent `X-Offload-On-Disconnect: stop`, and every answer
//! names the request's URLs in `X-Offload-*` headers.
//!
//! Errors are in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`), which the SDKs raise.

pub mod reads;

use crate::document::{BodyView, Progress, RequestMeta};
use crate::domain::{Access, CreateRequest, Format, Kind, RequestId, Status, TokenHash};
use crate::engine::Found;
use crate::engine::live::{End, LiveRequest, base_response};
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::http::intake;
use crate::http::offload_headers::{OffloadHeaders, OnDisconnect, created_headers, live_answer};
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use std::sync::Arc;

/// An error of this API, in OpenAI's shape.
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let e = self.0;
        let body =
            json!({"error": {"message": e.message, "type": error_type(e.status), "param": e.param, "code": e.code}});
        let (mut parts, _) = e.into_response().into_parts();
        parts.headers.remove(header::CONTENT_LENGTH);
        Response::from_parts(parts, Body::from(body.to_string()))
    }
}

/// OpenAI's error `type` for an answer's status.
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_error",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    }
}

fn invalid(param: &'static str, message: impl Into<String>) -> OpenAiError {
    OpenAiError(ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message).with_param(Some(param)))
}

/// A Responses create body, parsed: what the engine records, and how the caller wants its answer.
struct Parsed {
    parameters: Map<String, Value>,
    stream: bool,
    background: bool,
    previous: Option<RequestId>,
}

fn parse(body: &[u8], default_model: &str) -> Result<Parsed, OpenAiError> {
    let mut fields: Map<String, Value> = serde_json::from_slice(body).map_err(|e| {
        OpenAiError(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("The body must be a JSON object, a Responses API request ({e})."),
        ))
    })?;
    let flag = |fields: &Map<String, Value>, name: &'static str| match fields.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(flag)) => Ok(*flag),
        Some(other) => Err(invalid(name, format!("`{name}` must be true or false, not {other}."))),
    };
    let stream = flag(&fields, "stream")?;
    let background = flag(&fields, "background")?;
    fields.shift_remove("stream");
    match fields.get("model") {
        None | Some(Value::Null) => {
            fields.insert("model".into(), json!(default_model));
        }
        Some(Value::String(model)) if !model.trim().is_empty() => {}
        Some(_) => return Err(invalid("model", "`model` must be the name of a model, such as \"gpt-4o-mini\".")),
    }
    let previous = match fields.get("previous_response_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) => Some(RequestId::parse_response_id(id).ok_or_else(|| {
            OpenAiError(
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "previous_response_not_found",
                    format!("No response with id '{id}' is found (`previous_response_id`): ids of this server look like resp_ and 32 hex digits."),
                )
                .with_param(Some("previous_response_id")),
            )
        })?),
        Some(_) => return Err(invalid("previous_response_id", "`previous_response_id` must be a response id (a string).")),
    };
    match fields.get("input") {
        Some(Value::String(_)) => {}
        Some(Value::Array(items)) => {
            for (index, item) in items.iter().enumerate() {
                let id_ok = item.get("id").is_none_or(Value::is_string);
                if !item.is_object() || !id_ok {
                    return Err(invalid(
                        "input",
                        format!(
                            "`input[{index}]` must be an input item: an object (whose `id`, if given, is a string)."
                        ),
                    ));
                }
            }
        }
        None | Some(Value::Null) if previous.is_some() => {}
        None | Some(Value::Null) => {
            return Err(invalid("input", "`input` is required: a string, or a list of input items."));
        }
        Some(_) => return Err(invalid("input", "`input` must be a string or a list of input items.")),
    }
    for (name, is_valid) in [
        ("instructions", fields.get("instructions").is_none_or(|v| v.is_null() || v.is_string())),
        ("metadata", fields.get("metadata").is_none_or(|v| v.is_null() || v.is_object())),
        ("tools", fields.get("tools").is_none_or(|v| v.is_null() || v.is_array())),
    ] {
        if !is_valid {
            let shape = match name {
                "instructions" => "a string",
                "metadata" => "an object of strings",
                _ => "a list of tools",
            };
            return Err(invalid(name, format!("`{name}` must be {shape}.")));
        }
    }
    Ok(Parsed { parameters: fields, stream, background, previous })
}

/// `POST /v1/responses`.
pub async fn create(State(app): State<AppState>, request: Request) -> Result<Response, OpenAiError> {
    let incoming = intake::receive(&app, request).await?;
    let offload = OffloadHeaders::parse(&incoming.headers)?;
    if offload.access.is_some() {
        return Err(OpenAiError(
            crate::http::offload_headers::invalid_header(
                "X-Offload-Access",
                "A response is private to the service key that creates it (or, on a server without keys, read by whoever holds its id); X-Offload-Access does not apply to /v1/responses.".into(),
            ),
        ));
    }
    let limits = app.engine.limits();
    let parsed = parse(&incoming.body, &limits.default_model)?;
    let webhook_url =
        offload.webhook_url.as_deref().map(crate::domain::create::parse_webhook_url).transpose().map_err(|e| {
            OpenAiError(
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_header",
                    e.message.replace("`webhook_url`", "X-Offload-Webhook-Url"),
                )
                .with_param(Some("X-Offload-Webhook-Url")),
            )
        })?;
    // The key's own secret, hashed as the key store hashes it: the response is read with the same key.
    let key_hash =
        incoming.key.as_ref().and_then(|_| intake::service_key(&incoming.headers).ok().flatten()).map(TokenHash::of);
    let request = CreateRequest {
        access: if key_hash.is_some() { Access::Private } else { Access::Public },
        timeout: limits.max_timeout,
        connect_timeout: 5.0_f64.min(limits.max_connect_timeout),
        continuation: None,
        conversation_id: None,
        webhook_url,
        parameters: parsed.parameters,
        format: Format::Responses,
        previous_response: parsed.previous,
        key_hash,
        traceparent: None,
        // Only a background request without a stream is answered before the upstream's first event.
        answer_waits_for_upstream: !parsed.background || parsed.stream,
    };
    let created = intake::admit(&app, Kind::Stream, &incoming, request).await?;
    let live = created.live.clone();
    let headers = created_headers(&app, &created);
    let guard = OnDisconnect { live: live.clone(), stop: offload.stop_on_disconnect };

    if parsed.background && !parsed.stream {
        guard.answered();
        return Ok(json_answer(StatusCode::OK, headers, object(&Found::Live(live))));
    }
    if parsed.background {
        return Ok(stream_answer(&app, live, guard, headers));
    }
    // As OpenAI answers without background: the stream once the upstream answered it, else the end.
    let mut changes = live.subscribe();
    loop {
        changes.borrow_and_update();
        let now = live.answering();
        let answered_ok = now.upstream_status.is_some_and(|code| (200..300).contains(&code));
        if parsed.stream && now.events > 0 && answered_ok {
            return Ok(stream_answer(&app, live, guard, headers));
        }
        if now.status.is_final() {
            guard.answered();
            if let Some(upstream) = live.upstream_name().filter(|_| app.engine.upstreams().all().len() > 1) {
                crate::telemetry::record_upstream(&upstream);
            }
            return Ok(final_answer(&live, headers));
        }
        if changes.changed().await.is_err() {
            // The sender lives in `live`, which this holds: it cannot be gone.
            return Err(OpenAiError(ApiError::internal(&"the request's state is gone")));
        }
    }
}

fn json_answer(status: StatusCode, mut headers: HeaderMap, body: Bytes) -> Response {
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    (status, headers, body).into_response()
}

/// The answer of a response that is final, without background or stream: the object, or (failed) the
/// upstream's error status with its code and message, as OpenAI answers.
fn final_answer(live: &LiveRequest, headers: HeaderMap) -> Response {
    let now = live.answering();
    let object_bytes = live.rendered(FORMAT, render);
    if now.status != Status::Error {
        return json_answer(StatusCode::OK, headers, object_bytes);
    }
    let response: Value = serde_json::from_slice(&object_bytes).unwrap_or(Value::Null);
    let error = response.get("error").cloned().unwrap_or(Value::Null);
    let text = |key: &str| error.get(key).and_then(Value::as_str).unwrap_or("").to_owned();
    let code = text("code");
    let upstream = now.upstream_status.filter(|c| !(200..300).contains(c));
    let status = match (upstream, code.as_str()) {
        (Some(code), _) => StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY),
        (None, "timeout" | "connect_timeout") => StatusCode::GATEWAY_TIMEOUT,
        (None, "interrupted" | "store_unavailable") => StatusCode::SERVICE_UNAVAILABLE,
        (None, _) => StatusCode::BAD_GATEWAY,
    };
    let body = json!({"error": {"message": text("message"), "type": error_type(status), "param": null, "code": code}});
    json_answer(status, headers, Bytes::from(body.to_string()))
}

/// The live event stream of a response, from its first event, ended by its terminal event.
fn stream_answer(app: &AppState, live: Arc<LiveRequest>, guard: OnDisconnect, headers: HeaderMap) -> Response {
    live_answer(app, live, guard, headers, ending, "text/event-stream; charset=utf-8")
}

/// The name of this API's rendering of a live request ([`LiveRequest::rendered`]).
const FORMAT: &str = "responses";

/// The response object as it stands.
pub(crate) fn object(found: &Found) -> Bytes {
    match found {
        Found::Live(live) => live.rendered(FORMAT, render),
        Found::Stored(stored) | Found::Elsewhere { stored, .. } => {
            let body = stored.body.as_deref().and_then(|b| serde_json::from_str::<&RawValue>(b).ok());
            render(&stored.meta, &stored.progress, body.map_or(BodyView::None, BodyView::Json))
        }
    }
}

fn render(meta: &RequestMeta, progress: &Progress, body: BodyView<'_>) -> Bytes {
    match body {
        BodyView::Value(_) | BodyView::Json(_) => serde_json::to_vec(&body).map(Bytes::from).unwrap_or_default(),
        // Running on a node that cannot be reached, before its end is stored: what its request says.
        _ => {
            let mut response = base_response(meta);
            if progress.status > Status::Pending {
                response["status"] = json!("in_progress");
            }
            Bytes::from(response.to_string())
        }
    }
}

/// This API's end of a response's event stream: its terminal event (`response.completed`, `.incomplete` or
/// `.failed`), rendered from the final object once it is stored; a cancelled response has none (the SDK's
/// events have no `response.cancelled`: the stream ends there).
pub(crate) fn ending(end: &End) -> Bytes {
    let Some(body) = end.body.as_deref() else { return Bytes::new() };
    #[derive(serde::Deserialize)]
    struct Status<'a> {
        #[serde(borrow)]
        status: Option<&'a str>,
    }
    let status = serde_json::from_str::<Status<'_>>(body).ok().and_then(|s| s.status).unwrap_or("failed");
    let kind = match status {
        "completed" => "response.completed",
        "incomplete" => "response.incomplete",
        "cancelled" => return Bytes::new(),
        _ => "response.failed",
    };
    let data = format!(r#"{{"type":"{kind}","sequence_number":{},"response":{body}}}"#, end.events);
    crate::engine::sse::named(end.events + 1, kind, &data).0
}
