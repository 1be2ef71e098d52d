//! `POST /v1/stream-chatgpt` and `POST /v1/async-chatgpt`.

use super::error::ApiError;
use super::{AppState, BodyLimits};
use crate::domain::{CreateRequest, Kind, ServiceKey, UpstreamKey};
use crate::engine::{Created, Held};
use crate::keys::Refusal;
use axum::Json;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, Version, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::{Value, json};

pub async fn stream(State(app): State<AppState>, request: Request) -> Result<Json<Value>, ApiError> {
    create(app, Kind::Stream, request).await
}

pub async fn asynchronous(State(app): State<AppState>, request: Request) -> Result<Json<Value>, ApiError> {
    create(app, Kind::Async, request).await
}

/// The service key, from the first of `Authorization: Bearer`, `X-API-Key` and `X-RapidAPI-Key` present
/// (OffloadGPT clients send the last one). `Err` names a header that is present but not plain text, so cannot
/// hold a key.
fn service_key(headers: &HeaderMap) -> Result<Option<&str>, &'static str> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        value.to_str().map_err(|_| "Authorization")?;
        if let Some(token) = super::bearer(headers) {
            return Ok(Some(token).filter(|k| !k.is_empty()));
        }
    }
    for name in ["X-API-Key", "X-RapidAPI-Key"] {
        if let Some(value) = headers.get(name) {
            let key = value.to_str().map_err(|_| name)?.trim();
            return Ok(Some(key).filter(|k| !k.is_empty()));
        }
    }
    Ok(None)
}

/// The caller's upstream key; a header that is not plain text is refused rather than taken as absent (which
/// would quietly spend the server's own key).
pub(super) fn upstream_key(headers: &HeaderMap) -> Result<Option<UpstreamKey>, ApiError> {
    let Some(value) = headers.get("x-openai-api-key") else { return Ok(None) };
    let text = value.to_str().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_header",
            "The X-OpenAI-API-Key header is not plain ASCII text; send the OpenAI key as is (`sk-...`).",
        )
        .with_param(Some("X-OpenAI-API-Key"))
    })?;
    Ok(UpstreamKey::new(text))
}

/// Checks in the order that costs a refused caller the least: the service key, the headers, the declared size,
/// and only then the body itself (bounded in size and time).
async fn create(app: AppState, kind: Kind, request: Request) -> Result<Json<Value>, ApiError> {
    let incoming = receive(&app, request).await?;
    let request = CreateRequest::parse(&incoming.body, app.engine.limits()).map_err(|e| {
        let code = if e.param.is_some() { "invalid_field" } else { "invalid_json" };
        ApiError::new(StatusCode::BAD_REQUEST, code, e.message).with_param(e.param)
    })?;
    let created = start(&app, kind, &incoming, request).await?;
    Ok(Json(created_response(&app, &created)))
}

/// A create call whose caller was let in and whose body was read.
pub(super) struct Incoming {
    pub key: Option<ServiceKey>,
    pub upstream_key: Option<UpstreamKey>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Lets the caller in (service key), checks the headers, and reads the body: everything a create needs before
/// its body is parsed. Every refusal closes an HTTP/1.1 connection instead of reading the rest.
pub(super) async fn receive(app: &AppState, request: Request) -> Result<Incoming, ApiError> {
    let (parts, body) = request.into_parts();
    let headers = &parts.headers;
    // Every refusal before the body is read closes an HTTP/1.1 connection instead of reading the rest.
    let http1 = parts.version < Version::HTTP_2;
    // Before anything that reads the store (the service key): a store that does not answer would hold the caller
    // for as long as it takes to give up on it.
    if app.engine.store_problem().is_some() {
        return Err(ApiError::from(crate::engine::CreateError::StoreFailing).closing(http1));
    }
    let key = caller(app, headers, http1).await?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Send the request body as JSON with the header `Content-Type: application/json`.",
        )
        .closing(http1));
    }
    let upstream_key = upstream_key(headers).map_err(|e| e.closing(http1))?;
    let body = read_body(body, app.body).await.map_err(|e| e.closing(http1))?;
    Ok(Incoming { key, upstream_key, headers: parts.headers, body })
}

/// The caller's service key (`None` while the server runs open), or why the caller is refused.
pub(super) async fn caller(app: &AppState, headers: &HeaderMap, http1: bool) -> Result<Option<ServiceKey>, ApiError> {
    let presented = match service_key(headers) {
        Ok(presented) => presented,
        // Only matters when keys are required: an open server checks no key at all.
        Err(header) => match app.gate.authenticate(None).await {
            Ok(_) => None,
            Err(Refusal::Missing) => {
                return Err(ApiError::unauthorized(format!(
                    "The {header} header is not plain ASCII text, so it cannot hold a service key (`ofk_...`)."
                ))
                .with_param(Some(header))
                .closing(http1));
            }
            Err(refusal) => return Err(ApiError::from(refusal).closing(http1)),
        },
    };
    let key = app.gate.authenticate(presented).await.map_err(|r| ApiError::from(r).closing(http1))?;
    if key.is_none() && !app.open_allowed {
        let mut refused = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "This server takes no requests: it has no service key, and it does not run open on a public address. \
             Its operator must create one (`offload keys create`).",
        );
        refused.retry_after = Some(60);
        return Err(refused.closing(http1));
    }
    Ok(key)
}

/// Admits the request against its service key's quotas and starts it; a refusal by the engine gives the quota
/// back.
pub(super) async fn start(
    app: &AppState,
    kind: Kind,
    incoming: &Incoming,
    request: CreateRequest,
) -> Result<Created, ApiError> {
    let key = &incoming.key;
    let mut admission = match key {
        Some(key) => Some(app.gate.admit(key).await?),
        None => None,
    };
    let held = admission.as_mut().and_then(|a| a.slot.take()).map(|slot| Box::new(slot) as Box<dyn Held>);
    match app.engine.create(kind, request, incoming.upstream_key.clone(), held).await {
        Ok(created) => Ok(created),
        Err(e) => {
            if let (Some(admission), Some(key)) = (admission, key) {
                app.gate.refund(admission, key).await;
            }
            Err(e.into())
        }
    }
}

/// Reads the whole body: at most `max_bytes` (a larger `Content-Length` is refused before reading anything) and
/// within `timeout`.
async fn read_body(body: Body, limits: BodyLimits) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "The request body is larger than this server accepts: at most {} bytes (its --max-body-bytes setting).",
                limits.max_bytes
            ),
        )
    };
    if body.size_hint().lower() > limits.max_bytes as u64 {
        return Err(too_large());
    }
    match tokio::time::timeout(limits.timeout, Limited::new(body, limits.max_bytes).collect()).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "The request body did not arrive within {} (the server's --body-timeout setting); send it without pauses.",
                humantime::format_duration(limits.timeout)
            ),
        )),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(_)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "The request body could not be read (it broke off).",
        )),
    }
}

fn created_response(app: &AppState, created: &Created) -> Value {
    let meta = &created.meta;
    let urls = app.engine.urls().endpoints(meta);
    let authorization = match (&created.bearer, &created.stream_token) {
        (Some(bearer), Some(stream)) => json!({
            "access": "private",
            "bearer_token": bearer.as_str(),
            "stream_url_arg": format!("stream_token={}", stream.as_str()),
        }),
        _ => json!({"access": "public"}),
    };
    let readme = match meta.locator.kind {
        Kind::Stream => {
            "The `stream_events_url` endpoint below streams data sent by the ChatGPT API. Open it to receive incoming messages."
        }
        Kind::Async => {
            "The `status_url` endpoint below continuously updates with data sent by the ChatGPT API. Load it to check for new data."
        }
    };
    let mut endpoints = serde_json::Map::new();
    endpoints.insert("status_url".into(), urls.status_url.into());
    if let Some(stream) = urls.stream_events_url {
        endpoints.insert("stream_events_url".into(), stream.into());
    }
    endpoints.insert("stop_url".into(), urls.stop_url.into());
    json!({
        "status": "success",
        "created_at": meta.locator.created_at,
        "conversation_id": meta.conversation_id,
        "README": readme,
        "authorization": authorization,
        "endpoints": endpoints,
    })
}
