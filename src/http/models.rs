//! `GET /v1/models`: the upstream's list of models, for the OpenAI SDKs, as JSON only and reused for a while.
//!
//! The answer is served from offload's own origin, so it must never be something a browser would run: whatever
//! the upstream's `Content-Type`, the answer is `application/json` (and, like every answer of the server,
//! `X-Content-Type-Options: nosniff`), and an upstream answer whose body is not JSON becomes a 502
//! `upstream_error`. The upstream's status is kept. (A JSON body is served whatever `Content-Type` the upstream
//! gave it: under offload's own `Content-Type` and `nosniff` it is data, never a page or a script.)
//!
//! Answers are kept for `--models-cache` per upstream key, under the SHA-256 of the key in use (never the key):
//! a list that depends on the key is only ever shown to callers with that same key. Callers with the same key
//! that arrive together wait for one upstream call (a burst of N makes one call, not N). An upstream that gave no
//! answer (unreachable, timeout) is not remembered: the next caller tries again. Every call counts against the
//! service key's rate, like a create, whether or not the cache answers it.

use super::AppState;
use super::error::ApiError;
use super::intake;
use crate::domain::{TokenHash, UpstreamKey};
use crate::upstream::{CallError, Upstream};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Time limit of one upstream call.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Largest upstream answer read: OpenAI's list is tens of KiB.
const MAX_BYTES: usize = 4 * 1024 * 1024;
/// Upstream keys remembered at most; past this, expired answers are dropped, then all.
const MAX_KEYS: usize = 1024;

/// The cache key: the hash of the upstream key in use, or `None` for calls without one.
type KeyHash = Option<[u8; 32]>;

/// One upstream answer.
#[derive(Clone)]
struct Answer {
    at: Instant,
    status: StatusCode,
    body: Bytes,
    /// Whether the body is JSON; if not, it is never served (a 502 says so instead).
    json: bool,
}

impl Answer {
    fn serve(self) -> Result<Response, ApiError> {
        if !self.json {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                format!(
                    "The upstream answered GET /models with status {} and a body that is not JSON; check --upstream-url (it must be an OpenAI-compatible API base such as https://api.openai.com/v1).",
                    self.status.as_u16()
                ),
            ));
        }
        let json = [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))];
        Ok((self.status, json, self.body).into_response())
    }
}

pub struct ModelsCache {
    /// `ZERO`: every call goes to the upstream (callers that arrive together still share one call).
    ttl: Duration,
    /// One slot per upstream key; a caller holds the slot's lock while it calls the upstream, so that the others
    /// with that key wait for its answer instead of calling too.
    slots: Mutex<HashMap<KeyHash, Arc<tokio::sync::Mutex<Option<Answer>>>>>,
}

impl ModelsCache {
    pub fn new(ttl: Duration) -> Self {
        Self { ttl, slots: Mutex::new(HashMap::new()) }
    }

    fn slot(&self, key: KeyHash) -> Arc<tokio::sync::Mutex<Option<Answer>>> {
        let mut slots = self.slots.lock();
        if !slots.contains_key(&key) && slots.len() >= MAX_KEYS {
            // A slot whose lock is free and whose answer is stale serves nobody.
            slots.retain(|_, slot| {
                slot.try_lock().map_or(true, |answer| answer.as_ref().is_some_and(|a| a.at.elapsed() < self.ttl))
            });
            if slots.len() >= MAX_KEYS {
                slots.clear();
            }
        }
        slots.entry(key).or_default().clone()
    }
}

/// `GET /v1/models`.
pub async fn list(State(app): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let key = intake::caller(&app, &headers, false).await?;
    let caller_key = intake::upstream_key(&headers)?;
    if let Some(key) = &key {
        app.gate.pace(key).await?;
    }
    let upstreams = app.engine.upstreams();
    let [upstream] = upstreams.all() else { return merged(&app, caller_key).await };
    if !upstreams.is_single() {
        return merged(&app, caller_key).await;
    }
    let upstream_key = upstream.key_for(caller_key);
    if upstream_key.is_none() && upstream.requires_key() {
        return Err(crate::engine::CreateError::MissingKey.into());
    }
    let slot = app.models.slot(upstream_key.as_ref().map(|k| *TokenHash::of(k.expose()).as_bytes()));
    let mut cached = slot.lock().await;
    let answer = match cached.as_ref().filter(|a| a.at.elapsed() < app.models.ttl) {
        Some(answer) => answer.clone(),
        None => {
            let answer = fetch(&app, upstream, upstream_key).await?;
            *cached = Some(answer.clone());
            answer
        }
    };
    drop(cached);
    answer.serve()
}

/// Several upstreams: the models of each (from its own `GET /models`, those its patterns admit) and the route
/// names, each id once, in that order. An upstream that gives no list is left out (and logged); with none at
/// all, the last one's error. Kept for `--models-cache` under the caller's key, which some upstreams may use.
async fn merged(app: &AppState, caller_key: Option<UpstreamKey>) -> Result<Response, ApiError> {
    let upstreams = app.engine.upstreams();
    let slot = app.models.slot(caller_key.as_ref().map(|k| *TokenHash::of(k.expose()).as_bytes()));
    let mut cached = slot.lock().await;
    if let Some(answer) = cached.as_ref().filter(|a| a.at.elapsed() < app.models.ttl) {
        return answer.clone().serve();
    }
    let mut seen = std::collections::HashSet::new();
    let mut data = Vec::new();
    let mut failure = None;
    // Asked together: one that is slow to answer delays the list by its own time only.
    let answers = futures_util::future::join_all(
        upstreams.all().iter().map(|upstream| fetch(app, upstream, upstream.key_for(caller_key.clone()))),
    )
    .await;
    for (upstream, answer) in upstreams.all().iter().zip(answers) {
        let answer = match answer {
            Ok(answer) if answer.status.is_success() => answer,
            Ok(answer) => {
                tracing::warn!(
                    upstream = upstream.name(),
                    status = answer.status.as_u16(),
                    "an upstream gave no list of models"
                );
                continue;
            }
            Err(e) => {
                tracing::warn!(upstream = upstream.name(), error = %e.message, "an upstream gave no list of models");
                failure = Some(e);
                continue;
            }
        };
        let list: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_default();
        let models = list.get("data").and_then(serde_json::Value::as_array).cloned().unwrap_or_default();
        for model in models {
            let Some(id) = model.get("id").and_then(serde_json::Value::as_str) else { continue };
            if upstream.serves(id) && seen.insert(id.to_owned()) {
                data.push(model);
            }
        }
    }
    for route in upstreams.route_names() {
        if seen.insert(route.to_owned()) {
            data.push(serde_json::json!({"id": route, "object": "model", "created": 0, "owned_by": "offload"}));
        }
    }
    if data.is_empty()
        && let Some(failure) = failure
    {
        return Err(failure);
    }
    let body = serde_json::json!({"object": "list", "data": data}).to_string();
    let answer = Answer { at: Instant::now(), status: StatusCode::OK, body: Bytes::from(body), json: true };
    *cached = Some(answer.clone());
    drop(cached);
    answer.serve()
}

/// One upstream call: its answer, or the error to answer when there is none.
async fn fetch(app: &AppState, upstream: &Upstream, key: Option<UpstreamKey>) -> Result<Answer, ApiError> {
    let connect_timeout = app.engine.limits().max_connect_timeout.min(5.0);
    // The upstream client refuses redirects and bounds the body by `--max-upstream-reply-bytes`; a list of models
    // is bounded further, by MAX_BYTES.
    let call = async {
        let (status, _, body) = upstream.models(key, connect_timeout).await?;
        if body.len() > MAX_BYTES {
            return Err(CallError::TooLarge(MAX_BYTES));
        }
        Ok::<_, CallError>((status.as_u16(), body))
    };
    let (status, body) = match tokio::time::timeout(TIMEOUT, call).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => return Err(ApiError::new(StatusCode::BAD_GATEWAY, e.code(), e.to_string())),
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!("The upstream did not answer GET /models within {} seconds.", TIMEOUT.as_secs()),
            ));
        }
    };
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let json = serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_ok();
    Ok(Answer { at: Instant::now(), status, body, json })
}
