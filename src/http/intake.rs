//! What every API does with a create call before its body is parsed: let the caller in (the service key), check
//! the headers, and read the body within its bounds. Each refusal costs a refused caller as little as possible,
//! and closes an HTTP/1.1 connection instead of reading the rest.

use super::error::ApiError;
use super::{AppState, BodyLimits};
use crate::domain::{CreateRequest, Kind, ServiceKey, UpstreamKey};
use crate::engine::Created;
use crate::keys::Refusal;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode, Version, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};

/// The service key, from the first of `Authorization: Bearer`, `X-API-Key` and `X-RapidAPI-Key` present
/// (OffloadGPT clients send the last one). `Err` names a header that is present but not plain text, so cannot
/// hold a key.
pub fn service_key(headers: &HeaderMap) -> Result<Option<&str>, &'static str> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        value.to_str().map_err(|_| "Authorization")?;
        if let Some(token) = crate::http::bearer(headers) {
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
pub fn upstream_key(headers: &HeaderMap) -> Result<Option<UpstreamKey>, ApiError> {
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

/// A create call whose caller was let in and whose body was read.
pub struct Incoming {
    pub key: Option<ServiceKey>,
    /// The call's W3C `traceparent`, when traces are sent and it is valid.
    pub traceparent: Option<String>,
    pub upstream_key: Option<UpstreamKey>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Lets the caller in (service key), checks the headers, and reads the body: everything a create needs before
/// its body is parsed. Every refusal closes an HTTP/1.1 connection instead of reading the rest.
pub async fn receive(app: &AppState, request: Request) -> Result<Incoming, ApiError> {
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
    let traceparent = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|t| crate::telemetry::otel::enabled() && crate::telemetry::otel::valid(t))
        .map(str::to_owned);
    Ok(Incoming { key, traceparent, upstream_key, headers: parts.headers, body })
}

/// The caller's service key (`None` while the server runs open), or why the caller is refused.
pub async fn caller(app: &AppState, headers: &HeaderMap, http1: bool) -> Result<Option<ServiceKey>, ApiError> {
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

/// The create body, parsed once (`CreateRequest`), or a 400 naming the field.
pub fn parse(body: &[u8], app: &AppState) -> Result<CreateRequest, ApiError> {
    CreateRequest::parse(body, app.engine.limits()).map_err(|e| {
        let code = if e.param.is_some() { "invalid_field" } else { "invalid_json" };
        ApiError::new(StatusCode::BAD_REQUEST, code, e.message).with_param(e.param)
    })
}

/// Lets the call in through the engine's admission (the key's limits, the create, the refund on failure).
pub async fn admit(
    app: &AppState,
    kind: Kind,
    incoming: &Incoming,
    mut request: CreateRequest,
) -> Result<Created, ApiError> {
    request.traceparent = incoming.traceparent.clone();
    Ok(app.engine.admit(incoming.key.as_ref(), kind, request, incoming.upstream_key.clone()).await?)
}
