//! The endpoints of one response: `GET /v1/responses/{id}` (the object, or with `?stream=true` its events after
//! `starting_after`, replayed then followed live), `POST /v1/responses/{id}/cancel`, `DELETE /v1/responses/{id}`
//! and `GET /v1/responses/{id}/input_items`.
//!
//! With service keys in use, a response is served only to the key that created it; any other caller gets the
//! 404 of an unknown id, so that ids cannot be probed. A response running on another node is served by that node
//! (the call relayed, signed, as for the OffloadGPT endpoints); if it cannot be reached in time, reads are served
//! from the store and a cancel or delete is refused with a 503 that changes nothing.

use super::{OpenAiError, ending, object};
use crate::domain::RequestId;
use crate::engine::{Found, StopOutcome};
use crate::http::AppState;
use crate::http::error::{ApiError, ApiPath};
use crate::http::forward::{Call, Located};
use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// How long a cancel or delete waits for the final status to be stored before it answers.
const DURABLE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn not_found(id: &str) -> OpenAiError {
    OpenAiError(
        ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("No response with id '{id}' is found."))
            .with_param(Some("response_id")),
    )
}

/// A cancel or delete relayed by a peer that arrived too late to be carried out (see [`Call::in_time`]).
fn in_time(call: &Call<'_>) -> Result<(), OpenAiError> {
    if call.in_time() {
        return Ok(());
    }
    Err(OpenAiError(ApiError::unavailable(
        "unavailable",
        "This call reached the node running the response too late (its sender had already answered); nothing was done. Retry.",
    )))
}

async fn locate(app: &AppState, id: &str, call: &Call<'_>, with_body: bool) -> Result<Located, OpenAiError> {
    let request_id = RequestId::parse_response_id(id).ok_or_else(|| not_found(id))?;
    crate::telemetry::record_request_id(request_id);
    let presented = crate::http::intake::service_key(call.headers).ok().flatten();
    // With keys in use, the caller must hold a valid one; which one decides what it may see.
    app.gate.authenticate(presented).await.map_err(ApiError::from)?;
    let found = app
        .engine
        .find_response(request_id, with_body)
        .await
        .map_err(|e| ApiError::from_store(&e))?
        .ok_or_else(|| not_found(id))?;
    if let Some(hash) = &found.meta().bearer
        && !presented.is_some_and(|key| hash.verify(key))
    {
        return Err(not_found(id));
    }
    Ok(call.locate(app.engine.peers(), found).await)
}

fn relayed(answer: reqwest::Response) -> Result<Response, OpenAiError> {
    crate::http::forward::relay(answer).map_err(|e| OpenAiError(ApiError::internal(&e)))
}

/// A response's event stream relayed from the node that runs it, frame by frame; if that node goes quiet or the
/// connection breaks before the stream ended, the stream goes on from the store after the last event passed on.
fn relay_stream(app: AppState, id: String, answer: reqwest::Response, after: u64) -> Result<Response, OpenAiError> {
    use futures_util::StreamExt;
    let head = crate::http::forward::head(&answer);
    let stream = async_stream::stream! {
        let mut relay = crate::http::forward::EventRelay::new(after);
        let mut body = answer.bytes_stream();
        loop {
            match tokio::time::timeout(crate::cluster::RELAY_IDLE_WITHIN, body.next()).await {
                Ok(Some(Ok(bytes))) => {
                    let whole = relay.take(&bytes);
                    if !whole.is_empty() {
                        yield Ok::<_, std::convert::Infallible>(whole);
                    }
                }
                // The owner ended the stream: it is complete.
                Ok(None) => return,
                Ok(Some(Err(_))) | Err(_) => break,
            }
        }
        tracing::warn!(last_event = relay.last_id, "the node running this response went quiet; following it from the store");
        let Some(request_id) = RequestId::parse_response_id(&id) else { return };
        match app.engine.find_response(request_id, true).await {
            Ok(Some(found)) => {
                let mut rest = std::pin::pin!(app.engine.follow(found.into_stored(), relay.last_id, false, ending));
                while let Some(item) = rest.next().await {
                    yield item;
                }
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "could not follow a response from the store"),
        }
    };
    head.body(Body::from_stream(stream)).map_err(|e| OpenAiError(ApiError::internal(&e)))
}

fn object_answer(found: &Found) -> Response {
    let mut response = ([(header::CONTENT_TYPE, "application/json")], object(found)).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `?stream=` and `?starting_after=`; other parameters (`include`, `include_obfuscation`) are accepted and
/// change nothing.
struct ReadQuery {
    stream: bool,
    starting_after: Option<u64>,
}

impl ReadQuery {
    fn parse(uri: &Uri) -> Result<Self, OpenAiError> {
        let mut query = ReadQuery { stream: false, starting_after: None };
        for (name, value) in url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
            match name.as_ref() {
                "stream" => {
                    query.stream = match value.as_ref() {
                        "true" | "1" => true,
                        "false" | "0" | "" => false,
                        _ => return Err(super::invalid("stream", "`stream` must be true or false.")),
                    }
                }
                "starting_after" => {
                    let number = value.trim().parse::<u64>().map_err(|_| {
                        super::invalid("starting_after", "`starting_after` must be a sequence number (a whole number).")
                    })?;
                    query.starting_after = Some(number);
                }
                _ => {}
            }
        }
        Ok(query)
    }
}

/// `GET /v1/responses/{id}`.
pub async fn get(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, OpenAiError> {
    let query = ReadQuery::parse(&uri)?;
    let call = Call::new(app.engine.peers(), Method::GET, &uri, &headers);
    let found = match locate(&app, &id, &call, true).await? {
        Located::Here(found) | Located::Unreached(found) => found,
        Located::Relayed(answer) if query.stream && answer.status() == reqwest::StatusCode::OK => {
            let after = query.starting_after.map_or(0, |n| n.saturating_add(1));
            return relay_stream(app.clone(), id, answer, after);
        }
        Located::Relayed(answer) => return relayed(answer),
    };
    if !query.stream {
        return Ok(object_answer(&found));
    }
    // Sequence number N is event N + 1 of the record.
    let after = query.starting_after.map_or(0, |n| n.saturating_add(1));
    let (is_final, count) = found.position();
    let events = if is_final && after > count {
        // The caller has the terminal event already: nothing more will come.
        Body::empty()
    } else {
        Body::from_stream(app.engine.follow(found, after, call.from_peer.is_some(), ending))
    };
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        events,
    )
        .into_response())
}

/// `POST /v1/responses/{id}/cancel`: drops the upstream call, keeps what arrived, and answers the object once
/// `cancelled` is stored. A response that already ended is answered as it is (a cancelled one stays cancelled).
pub async fn cancel(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, OpenAiError> {
    let call = Call::new(app.engine.peers(), Method::POST, &uri, &headers);
    let found = match locate(&app, &id, &call, true).await? {
        Located::Here(found) | Located::Unreached(found) => found,
        Located::Relayed(answer) => return relayed(answer),
    };
    in_time(&call)?;
    match app.engine.stop(&found, DURABLE_WAIT).await {
        StopOutcome::Stopped | StopOutcome::AlreadyFinal(_) => {}
        StopOutcome::Unreachable => {
            return Err(OpenAiError(ApiError::unavailable(
                "unavailable",
                "This response runs on another node of this service that cannot be reached right now; nothing was cancelled. Retry shortly.",
            )));
        }
        StopOutcome::NotYetDurable => {
            return Err(OpenAiError(ApiError::unavailable(
                "unavailable",
                "The upstream call was dropped, but the server cannot store the cancellation right now (its store is failing); the response becomes `cancelled` once it is stored. Check it shortly.",
            )));
        }
    }
    // Read again: the final object, as stored.
    let request_id = found.meta().locator.id;
    let fresh = app.engine.find_response(request_id, true).await.map_err(|e| ApiError::from_store(&e))?;
    Ok(object_answer(&fresh.ok_or_else(|| not_found(&id))?))
}

/// `DELETE /v1/responses/{id}`: the response and everything of it (a running one is cancelled first).
pub async fn delete(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, OpenAiError> {
    let call = Call::new(app.engine.peers(), Method::DELETE, &uri, &headers);
    let found = match locate(&app, &id, &call, false).await? {
        Located::Here(found) => found,
        Located::Unreached(found) if !found.status().is_final() => {
            return Err(OpenAiError(ApiError::unavailable(
                "unavailable",
                "This response runs on another node of this service that did not answer in time; nothing was deleted. Retry shortly.",
            )));
        }
        Located::Unreached(found) => found,
        Located::Relayed(answer) => return relayed(answer),
    };
    in_time(&call)?;
    app.engine.delete(found, DURABLE_WAIT).await.map_err(|e| match e {
        e if e.is_retryable() => ApiError::unavailable(
            "unavailable",
            "The response could not be deleted right now (the server's store is failing); nothing was deleted. Retry shortly.",
        ),
        e => ApiError::internal(&e),
    })?;
    Ok(Json(json!({"id": id, "object": "response.deleted", "deleted": true})).into_response())
}

/// `GET /v1/responses/{id}/input_items`: the items of the response's own input (not those of the conversation
/// before it), each with an id, as a list page (`limit` 1 to 100, default 20; `order` `desc`, the default, or
/// `asc`; `after` an item id).
pub async fn input_items(
    State(app): State<AppState>,
    ApiPath(id): ApiPath<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, OpenAiError> {
    let call = Call::new(app.engine.peers(), Method::GET, &uri, &headers);
    // What a response was asked is in its record, on every node: no relay needed.
    let found = match locate(&app, &id, &Call { from_peer: Some(std::time::Duration::ZERO), ..call }, false).await? {
        Located::Here(found) | Located::Unreached(found) => found,
        Located::Relayed(answer) => return relayed(answer),
    };
    let mut limit = 20usize;
    let mut descending = true;
    let mut after = None;
    for (name, value) in url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        match name.as_ref() {
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .ok_or_else(|| super::invalid("limit", "`limit` must be a whole number from 1 to 100."))?;
            }
            "order" => {
                descending = match value.as_ref() {
                    "desc" => true,
                    "asc" => false,
                    _ => return Err(super::invalid("order", "`order` must be `asc` or `desc`.")),
                }
            }
            "after" => after = Some(value.into_owned()),
            _ => {}
        }
    }
    let meta = found.meta();
    let parameters: Value = serde_json::from_str(meta.parameters.get()).unwrap_or(Value::Null);
    let own = parameters.get("input").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let hex = meta.locator.id.response_id();
    let hex = hex.trim_start_matches("resp_");
    let mut items: Vec<Value> =
        own.iter().skip(meta.history_items).enumerate().map(|(index, item)| input_item(hex, index, item)).collect();
    if descending {
        items.reverse();
    }
    if let Some(after) = after {
        let position = items.iter().position(|item| item.get("id").and_then(Value::as_str) == Some(after.as_str()));
        let position = position
            .ok_or_else(|| super::invalid("after", format!("No input item with id '{after}' in this response.")))?;
        items.drain(..=position);
    }
    let has_more = items.len() > limit;
    items.truncate(limit);
    let first = items.first().and_then(|item| item.get("id")).cloned().unwrap_or(Value::Null);
    let last = items.last().and_then(|item| item.get("id")).cloned().unwrap_or(Value::Null);
    let page = json!({"object": "list", "data": items, "first_id": first, "last_id": last, "has_more": has_more});
    Ok(([(header::CONTENT_TYPE, "application/json")], Bytes::from(page.to_string())).into_response())
}

/// An input item as the API lists it: with an `id` (derived from the response's when the caller gave none), a
/// `type`, and a message's text as content parts.
fn input_item(hex: &str, index: usize, item: &Value) -> Value {
    let mut item = item.clone();
    let Value::Object(fields) = &mut item else { return item };
    let kind = fields.get("type").and_then(Value::as_str).unwrap_or("message").to_owned();
    fields.entry("type").or_insert_with(|| json!("message"));
    if kind == "message" {
        let role = fields.get("role").and_then(Value::as_str).unwrap_or("user");
        let part = if role == "assistant" { "output_text" } else { "input_text" };
        if let Some(Value::String(text)) = fields.get("content") {
            let content = if part == "output_text" {
                json!([{"type": part, "text": text, "annotations": []}])
            } else {
                json!([{"type": part, "text": text}])
            };
            fields.insert("content".into(), content);
        }
        fields.entry("status").or_insert_with(|| json!("completed"));
    }
    if !fields.contains_key("id") {
        let prefix = match kind.as_str() {
            "message" => "msg",
            "function_call" => "fc",
            "function_call_output" => "fco",
            _ => "item",
        };
        fields.insert("id".into(), json!(format!("{prefix}_{hex}_in{index}")));
    }
    item
}
