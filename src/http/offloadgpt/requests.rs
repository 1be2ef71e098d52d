//! The endpoints of one request: `.json` (and `DELETE`), `.txt`, `.raw`, `/stop`.

use crate::document::RequestMeta;
use crate::domain::locator::ParsedUrl;
use crate::domain::{Access, Kind, Suffix};
use crate::engine::{Found, StopOutcome};
use crate::http::AppState;
use crate::http::error::{ApiError, ApiPath};
use crate::http::forward::{Call, Located};
use axum::Json;
use axum::body::Body;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::hash::{Hash, Hasher};

/// `?stream_token=` and `?last_event_id=`; other parameters are ignored. A parameter given twice, or whose
/// percent-escapes are not UTF-8, is a 400 naming it.
#[derive(Default)]
pub struct StreamQuery {
    stream_token: Option<String>,
    last_event_id: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for StreamQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let mut query = StreamQuery::default();
        let Some(text) = parts.uri.query() else { return Ok(query) };
        for (name, value) in url::form_urlencoded::parse(text.as_bytes()) {
            let (param, slot) = match name.as_ref() {
                "stream_token" => ("stream_token", &mut query.stream_token),
                "last_event_id" => ("last_event_id", &mut query.last_event_id),
                _ => continue,
            };
            let invalid = |message: String| {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", message).with_param(Some(param))
            };
            if slot.is_some() {
                return Err(invalid(format!("`{param}` is given more than once in the query string; give it once.")));
            }
            // The decoder replaces bytes that are not UTF-8 with U+FFFD.
            if value.contains('\u{FFFD}') {
                return Err(invalid(format!("`{param}` is not valid: its percent-escapes must decode to UTF-8 text.")));
            }
            *slot = Some(value.into_owned());
        }
        Ok(query)
    }
}

fn parse_url(kind: &str, rest: &str) -> Result<ParsedUrl, ApiError> {
    let segments: Vec<&str> = rest.split('/').collect();
    ParsedUrl::from_segments(kind, &segments).ok_or_else(|| {
        ApiError::not_found(
            "This is not a request URL of this server (expected /{kind}/r/{access}/YYYY/MM/DD/HH/MM/SS/{id}.json).",
        )
    })
}

async fn find(app: &AppState, url: &ParsedUrl) -> Result<Found, ApiError> {
    crate::telemetry::record_request_id(url.id);
    app.engine.find(url).await.map_err(|e| ApiError::from_store(&e))?.ok_or_else(|| {
        ApiError::not_found("No request exists at this URL (it may have been deleted or never existed).")
    })
}

/// Private requests need `Authorization: Bearer <bearer_token>`; the event stream also takes `?stream_token=`.
fn authorize(meta: &RequestMeta, headers: &HeaderMap, stream_token: Option<&str>) -> Result<(), ApiError> {
    if meta.locator.access == Access::Public {
        return Ok(());
    }
    let by_bearer = crate::http::bearer(headers).zip(meta.bearer.as_ref()).is_some_and(|(t, hash)| hash.verify(t));
    let by_stream_token = stream_token.zip(meta.stream_token.as_ref()).is_some_and(|(t, hash)| hash.verify(t));
    if by_bearer || by_stream_token {
        return Ok(());
    }
    Err(ApiError::unauthorized(if stream_token.is_some() {
        "The stream_token is wrong for this request."
    } else {
        "This request is private: send `Authorization: Bearer <bearer_token>` (the event stream also accepts `?stream_token=...`)."
    }))
}

/// Finds the request, checks the caller's credentials, and, when another node runs it, relays the call to that
/// node. If that node cannot be reached in time (it may have just died, or be frozen), the store's view is used.
async fn locate(
    app: &AppState,
    url: &ParsedUrl,
    call: &Call<'_>,
    stream_token: Option<&str>,
) -> Result<Located, ApiError> {
    let found = find(app, url).await?;
    authorize(found.meta(), call.headers, stream_token)?;
    Ok(call.locate(app.engine.peers(), found).await)
}

/// A stop or DELETE relayed by a peer that arrived too late to be carried out (see [`Call::in_time`]).
fn in_time(call: &Call<'_>) -> Result<(), ApiError> {
    if call.in_time() {
        return Ok(());
    }
    Err(ApiError::unavailable(
        "unavailable",
        "This call reached the node running the request too late (its sender had already answered); nothing was done. Retry.",
    ))
}

fn relayed(answer: reqwest::Response) -> Result<Response, ApiError> {
    crate::http::forward::relay(answer).map_err(|e| ApiError::internal(&e))
}

/// A request's event stream relayed from its owner, frame by frame; if the owner goes quiet or the connection
/// breaks before `[DONE]`, the stream goes on from the store after the last event passed on.
fn relay_events(app: AppState, url: ParsedUrl, answer: reqwest::Response, after: u64) -> Result<Response, ApiError> {
    use futures_util::StreamExt;
    let head = crate::http::forward::head(&answer);
    let stream = async_stream::stream! {
        let mut relay = crate::http::forward::EventRelay::new(after);
        let mut body = answer.bytes_stream();
        while let Ok(Some(Ok(bytes))) = tokio::time::timeout(crate::cluster::RELAY_IDLE_WITHIN, body.next()).await {
            let whole = relay.take(&bytes);
            if !whole.is_empty() {
                yield Ok::<_, std::convert::Infallible>(whole);
            }
            if relay.done {
                return;
            }
        }
        tracing::warn!(last_event = relay.last_id, "the node running this request went quiet; following it from the store");
        if relay.named_end {
            // The named end is only sent once the final status is durable: `[DONE]` is all that is missing.
            yield Ok(bytes::Bytes::from_static(b"data: [DONE]\n\n"));
            return;
        }
        match app.engine.find(&url).await {
            Ok(Some(found)) => {
                let mut rest = std::pin::pin!(app.engine.follow(found.into_stored(), relay.last_id, false, super::events::ending));
                while let Some(item) = rest.next().await {
                    yield item;
                }
            }
            // Deleted meanwhile, or the store fails: the stream ends without `[DONE]`, and an EventSource reconnects.
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "could not follow a request from the store"),
        }
    };
    head.body(Body::from_stream(stream)).map_err(|e| ApiError::internal(&e))
}

pub async fn get(
    State(app): State<AppState>,
    ApiPath((kind, rest)): ApiPath<(String, String)>,
    query: StreamQuery,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let url = parse_url(&kind, &rest)?;
    let stream_token = if url.suffix == Suffix::Events { query.stream_token.as_deref() } else { None };
    let call = Call::new(app.engine.peers(), Method::GET, &uri, &headers);
    let found = match locate(&app, &url, &call, stream_token).await? {
        Located::Here(found) | Located::Unreached(found) => found,
        Located::Relayed(answer) if url.suffix == Suffix::Events && answer.status() == reqwest::StatusCode::OK => {
            let after = last_event_id(&headers, query.last_event_id.as_deref())?.unwrap_or(0);
            return relay_events(app.clone(), url, answer, after);
        }
        Located::Relayed(answer) => return relayed(answer),
    };
    match url.suffix {
        Suffix::Status => status(&app, &found, &headers).await,
        Suffix::Events => events(&app, found, &headers, query.last_event_id.as_deref(), call.from_peer.is_some()),
        Suffix::Raw => raw(&app, &found).await,
        Suffix::Stop => {
            in_time(&call)?;
            Ok(stop(&app, &found).await)
        }
    }
}

pub async fn post(
    State(app): State<AppState>,
    ApiPath((kind, rest)): ApiPath<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let url = parse_url(&kind, &rest)?;
    if url.suffix != Suffix::Stop {
        return Err(only_get());
    }
    let call = Call::new(app.engine.peers(), Method::POST, &uri, &headers);
    match locate(&app, &url, &call, None).await? {
        Located::Here(found) | Located::Unreached(found) => {
            in_time(&call)?;
            Ok(stop(&app, &found).await)
        }
        Located::Relayed(answer) => relayed(answer),
    }
}

pub async fn delete(
    State(app): State<AppState>,
    ApiPath((kind, rest)): ApiPath<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let url = parse_url(&kind, &rest)?;
    if url.suffix != Suffix::Status {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "DELETE applies to a request's status URL (ending in .json).",
        ));
    }
    let call = Call::new(app.engine.peers(), Method::DELETE, &uri, &headers);
    let found = match locate(&app, &url, &call, None).await? {
        Located::Here(found) => found,
        Located::Unreached(found) if !found.status().is_final() => {
            return Err(ApiError::unavailable(
                "unavailable",
                "This request is running on another node of this service that did not answer in time; nothing was deleted. Retry shortly (if that node is gone, the request ends as interrupted within seconds and can then be deleted).",
            ));
        }
        Located::Unreached(found) => found,
        Located::Relayed(answer) => return relayed(answer),
    };
    in_time(&call)?;
    app.engine.delete(found, STOP_DURABLE_WAIT).await.map_err(|e| match e {
        e if e.is_retryable() => {
            tracing::error!(error = %e, "could not delete a request");
            ApiError::unavailable("unavailable", "The request could not be deleted right now (the server's store is failing); nothing was deleted. Retry shortly.")
        }
        e => ApiError::internal(&e),
    })?;
    Ok(Json(json!({
        "status": "success",
        "README": "The request was deleted with its events and raw response; its URLs now answer 404.",
    }))
    .into_response())
}

fn only_get() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "Use GET for this URL (POST only applies to /stop).",
    )
}

fn etag_of(bytes: &[u8]) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    format!("\"{:016x}{:08x}\"", hasher.finish(), bytes.len())
}

async fn status(app: &AppState, found: &Found, headers: &HeaderMap) -> Result<Response, ApiError> {
    let webhook = app.engine.webhook_view(found).await.map_err(|e| ApiError::from_store(&e))?;
    let doc = super::document(found, app.engine.urls(), webhook.as_deref());
    let etag = etag_of(&doc);
    let not_modified = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).is_some_and(|v| {
        v.split(',').any(|t| t.trim() == etag || t.trim() == "*" || t.trim().trim_start_matches("W/") == etag)
    });
    let mut response = if not_modified {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, "application/json")], doc).into_response()
    };
    let h = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, value);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// The event a reader says it has (`Last-Event-ID` header, else `?last_event_id=`). Both are checked, so that a
/// bad `?last_event_id=` is refused whatever the header says; the header wins.
fn last_event_id(headers: &HeaderMap, query_last: Option<&str>) -> Result<Option<u64>, ApiError> {
    let event_number = |text: &str| match text.trim() {
        "" => Ok(None),
        text => text.parse::<u64>().map(Some).map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_last_event_id",
                "Last-Event-ID must be a whole event number.",
            )
            .with_param(Some("last_event_id"))
        }),
    };
    let header = headers.get("last-event-id").map(|v| v.to_str().unwrap_or("-"));
    let from_header = header.map(event_number).transpose()?.flatten();
    let from_query = query_last.map(event_number).transpose()?.flatten();
    Ok(from_header.or(from_query))
}

fn events(
    app: &AppState,
    found: Found,
    headers: &HeaderMap,
    query_last: Option<&str>,
    from_peer: bool,
) -> Result<Response, ApiError> {
    if found.meta().locator.kind == Kind::Async {
        return Err(ApiError::not_found(
            "Requests made with /v1/async-chatgpt have no event stream; poll their status_url instead.",
        ));
    }
    let after = last_event_id(headers, query_last)?;
    let (is_final, count) = found.position();
    // 204 (which tells EventSource to stop reconnecting) only for a reader who says it has everything; a reader
    // with nothing yet gets the replay, even of a request that ended before its first chunk (its named event
    // and `[DONE]`).
    if is_final && after.is_some_and(|after| after >= count) {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    // A peer relaying the stream gets keep-alives often, so that it can tell a quiet stream from a frozen node.
    let body = Body::from_stream(app.engine.follow(found, after.unwrap_or(0), from_peer, super::events::ending));
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        body,
    )
        .into_response())
}

/// Sent as it is read from memory or the store, page by page. The first page is read before answering, so that
/// a store that fails then gets the JSON error; one that fails later cuts the body short (and is logged).
async fn raw(app: &AppState, found: &Found) -> Result<Response, ApiError> {
    use futures_util::StreamExt;
    let mut pages = app.engine.raw(found).await.map_err(|e| ApiError::from_store(&e))?.ok_or_else(|| {
        ApiError::not_found("The upstream has not answered yet; the raw response appears once it does.")
    })?;
    let first = pages.next().await.transpose().map_err(|e| ApiError::from_store(&e))?;
    let rest = pages.inspect(|page| {
        if let Err(e) = page {
            tracing::warn!(error = %e, "reading a raw response failed; its body was cut short");
        }
    });
    let body = Body::from_stream(futures_util::stream::iter(first.map(Ok)).chain(rest));
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], body)
        .into_response())
}

/// How long a stop waits for its final status to be stored before it answers.
const STOP_DURABLE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

async fn stop(app: &AppState, found: &Found) -> Response {
    let status_url = found.meta().locator.url(&app.engine.urls().base, Suffix::Status);
    match app.engine.stop(found, STOP_DURABLE_WAIT).await {
        StopOutcome::Stopped => Json(json!({
            "status": "success",
            "README": "The request was stopped: the upstream call was dropped and what was received is kept at `status_url`.",
            "endpoints": {"status_url": status_url},
        }))
        .into_response(),
        StopOutcome::AlreadyFinal(status) => ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "already_finished",
            format!("This request already finished (status `{}`); stop has no effect.", status.as_str()),
        )
        .into_response(),
        StopOutcome::Unreachable => {
            ApiError::unavailable("unavailable", "This request runs on another node of this service that cannot be reached right now; retry shortly (if that node is gone, the request ends as interrupted within seconds).").into_response()
        }
        StopOutcome::NotYetDurable => {
            ApiError::unavailable("unavailable", "The upstream call was dropped, but the server cannot store the final status right now (its store is failing); it becomes `stop` once stored. Check `status_url` shortly.").into_response()
        }
    }
}

/// The methods a request URL answers, by its ending: what `Allow` says on its 405s and to `OPTIONS` (the one
/// catch-all route serves all four endpoints, so the router alone would list the union of their methods).
fn allowed_methods(path: &str) -> Option<&'static str> {
    let (_, last) = path.rsplit_once('/')?;
    if last == "stop" {
        Some("GET,HEAD,POST")
    } else if last.ends_with(".json") {
        Some("GET,HEAD,DELETE")
    } else if last.ends_with(".txt") || last.ends_with(".raw") {
        Some("GET,HEAD")
    } else {
        None
    }
}

/// What `Allow` the 405s and `OPTIONS` answers of a request URL say (see [`Allow::answer`]).
pub fn allow_of(request: &axum::extract::Request) -> Option<Allow> {
    let path = request.uri().path();
    let methods = if path.contains("/r/") { allowed_methods(path) } else { None }?;
    Some(Allow { methods, options: request.method() == axum::http::Method::OPTIONS })
}

/// The methods a request URL allows, and whether they were asked for (`OPTIONS`).
pub struct Allow {
    methods: &'static str,
    options: bool,
}

impl Allow {
    /// Says the allowed methods in the answer to `OPTIONS` and in a 405.
    pub fn answer(self, mut response: Response) -> Response {
        if self.options || response.status() == StatusCode::METHOD_NOT_ALLOWED {
            response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(self.methods));
        }
        response
    }
}
