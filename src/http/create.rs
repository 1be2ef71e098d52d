//! `POST /v1/stream-chatgpt` and `POST /v1/async-chatgpt`.

use super::AppState;
use super::error::ApiError;
use crate::domain::{CreateRequest, Kind, UpstreamKey};
use crate::engine::Created;
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use serde_json::{Value, json};

pub async fn stream(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    create(app, Kind::Stream, headers, body).await
}

pub async fn asynchronous(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    create(app, Kind::Async, headers, body).await
}

/// The service key, from `Authorization: Bearer`, `X-API-Key` or `X-RapidAPI-Key` (OffloadGPT clients send the
/// last one).
fn service_key(headers: &HeaderMap) -> Option<&str> {
    super::bearer(headers)
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .or_else(|| headers.get("x-rapidapi-key").and_then(|v| v.to_str().ok()))
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

async fn create(
    app: AppState,
    kind: Kind,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let key = app.gate.authenticate(service_key(&headers)).await?;
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
        ));
    }
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "The request body is larger than this server accepts (its --max-body-bytes setting).",
            )
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", "The request body could not be read.")
        }
    })?;
    let request = CreateRequest::parse(&body, app.engine.limits()).map_err(|e| {
        let code = if e.param.is_some() { "invalid_field" } else { "invalid_json" };
        ApiError::new(StatusCode::BAD_REQUEST, code, e.message).with_param(e.param)
    })?;
    let upstream_key = headers.get("x-openai-api-key").and_then(|v| v.to_str().ok()).and_then(UpstreamKey::new);
    let mut admission = match &key {
        Some(key) => Some(app.gate.admit(key).await?),
        None => None,
    };
    let held = admission.as_mut().and_then(|a| a.slot.take()).map(|slot| Box::new(slot) as _);
    match app.engine.create(kind, request, upstream_key, held).await {
        Ok(created) => Ok(Json(created_response(&app, &created))),
        Err(e) => {
            if let (Some(admission), Some(key)) = (admission, &key) {
                app.gate.refund(admission, key).await;
            }
            Err(e.into())
        }
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
