//! `POST /v1/stream-chatgpt` and `POST /v1/async-chatgpt`.

use crate::domain::Kind;
use crate::engine::Created;
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::http::intake;
use axum::Json;
use axum::extract::{Request, State};
use serde_json::{Value, json};

pub async fn stream(State(app): State<AppState>, request: Request) -> Result<Json<Value>, ApiError> {
    create(app, Kind::Stream, request).await
}

pub async fn asynchronous(State(app): State<AppState>, request: Request) -> Result<Json<Value>, ApiError> {
    create(app, Kind::Async, request).await
}

/// Checks in the order that costs a refused caller the least: the service key, the headers, the declared size,
/// and only then the body itself (bounded in size and time).
async fn create(app: AppState, kind: Kind, request: Request) -> Result<Json<Value>, ApiError> {
    let incoming = intake::receive(&app, request).await?;
    let request = intake::parse(&incoming.body, &app)?;
    let created = intake::admit(&app, kind, &incoming, request).await?;
    Ok(Json(created_response(&app, &created)))
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
