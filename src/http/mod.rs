//! The HTTP surface: each API in a folder of its own (`offloadgpt`: the two create endpoints, the four endpoints of
//! every request, `DELETE`; `chat_completions`: `POST /v1/chat/completions`), what every create shares
//! (`intake`), `GET /v1/models`, CORS (and, while the server is open, the host names and origins it answers:
//! `origin`), relays to other nodes (`forward`), and the JSON error format of the contract for everything that
//! goes wrong.

pub mod chat_completions;
mod cores;
pub mod error;
pub mod forward;
pub mod intake;
pub mod models;
pub mod offload_headers;
pub mod offloadgpt;
pub mod openapi;
pub mod origin;
pub mod playground;
pub mod responses;
pub mod server;
pub mod usage;

use crate::engine::Engine;
use crate::keys::Gatekeeper;
use axum::routing::{get, post};
use axum::{Json, Router};
use error::ApiError;
use offloadgpt::requests;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tower_http::cors::{AllowHeaders, Any, CorsLayer};

#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub gate: Arc<Gatekeeper>,
    pub body: BodyLimits,
    /// Whether creates are taken without a service key while none exists: on a loopback listener, or when told
    /// `--allow-open`. Otherwise revoking the last key closes the server instead of opening it to anyone.
    pub open_allowed: bool,
    /// `GET /v1/models` answers, per upstream key.
    pub models: Arc<models::ModelsCache>,
    /// The hosts an open server answers to, and the other origins that may create on it.
    pub web: Arc<origin::WebPolicy>,
}

/// How much of a create body is read, and for how long.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimits {
    pub max_bytes: usize,
    pub timeout: Duration,
}

pub fn router(state: AppState) -> Router {
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods(Any)
        // Mirrors what the preflight asks for: `Access-Control-Allow-Headers: *` would not cover Authorization.
        .allow_headers(AllowHeaders::mirror_request())
        .expose_headers([
            axum::http::header::ETAG,
            offload_headers::STATUS_URL,
            offload_headers::STREAM_URL,
            offload_headers::BEARER_TOKEN,
        ])
        .max_age(std::time::Duration::from_secs(86_400));
    Router::new()
        .route("/", get(index))
        .route("/playground/app.js", get(playground::script))
        .route("/playground/style.css", get(playground::style))
        .route("/healthz", get(health))
        .route("/_offload/alive", get(alive))
        .route("/openapi.json", get(openapi::document))
        .route("/v1/stream-chatgpt", post(offloadgpt::create::stream))
        .route("/v1/async-chatgpt", post(offloadgpt::create::asynchronous))
        .route("/v1/chat/completions", post(chat_completions::chat_completions))
        .route("/v1/models", get(models::list))
        .route("/v1/usage", get(usage::get))
        .route("/v1/responses", post(responses::create))
        .route("/v1/responses/{id}", get(responses::reads::get).delete(responses::reads::delete))
        .route("/v1/responses/{id}/cancel", post(responses::reads::cancel))
        .route("/v1/responses/{id}/input_items", get(responses::reads::input_items))
        .route("/{kind}/r/{*rest}", get(requests::get).post(requests::post).delete(requests::delete))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(cors)
        .layer(axum::middleware::from_fn_with_state(state.clone(), edge))
        .with_state(state)
}

/// What every route's answer passes through, outermost first: the span, access line and metrics
/// ([`crate::telemetry::observe`]); `X-Content-Type-Options: nosniff` on every answer, so that a browser takes each
/// body for what its `Content-Type` says and nothing else (never a stylesheet or a script guessed from its bytes);
/// the JSON error format, whatever layer or extractor answered the error ([`error::json_errors`]); the `Allow`
/// header of request URLs; and, outside CORS (a refused preflight gets no CORS headers), the host and origin checks
/// of an open server ([`origin::refusal`]).
///
/// One middleware, not one layer each: axum clones and boxes the service under a layer on every call, so five
/// nested layers cost a status read about a tenth of its instructions (measured; docs/DECISIONS.md).
async fn edge(
    axum::extract::State(app): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    crate::telemetry::observe(request, |request| async move {
        let allow = requests::allow_of(&request);
        let refused = if origin::is_open(&app).await { origin::refusal(&app, &request) } else { None };
        let response = match refused {
            Some(refused) => refused,
            None => next.run(request).await,
        };
        let mut response = error::json_errors(match allow {
            Some(allow) => allow.answer(response),
            None => response,
        });
        let nosniff = axum::http::HeaderValue::from_static("nosniff");
        response.headers_mut().insert(axum::http::header::X_CONTENT_TYPE_OPTIONS, nosniff);
        response
    })
    .await
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
}

/// The service description, or the playground page for a browser.
async fn index(
    axum::extract::State(app): axum::extract::State<AppState>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if playground::wants_html(&headers) {
        return playground::page(&app).await;
    }
    let base = &app.engine.urls().base;
    let vary = [(axum::http::header::VARY, "Accept")];
    (vary, Json(json!({
        "service": "offload",
        "version": env!("CARGO_PKG_VERSION"),
        "description": "Self-hosted OffloadGPT-compatible server: POST a chat completion request, get back URLs for its status, event stream, raw response and stop switch.",
        "endpoints": {
            "stream": format!("{base}/v1/stream-chatgpt"),
            "async": format!("{base}/v1/async-chatgpt"),
        },
        "accepting": app.engine.accepting(),
    })))
        .into_response()
}

/// 200 while the server can take requests; 503 (the error format, naming the problem) while its store fails.
async fn health(axum::extract::State(app): axum::extract::State<AppState>) -> axum::response::Response {
    use axum::response::IntoResponse;
    match app.engine.store_problem() {
        None => Json(json!({
            "status": "ok",
            "in_flight": app.engine.in_flight(),
            "accepting": app.engine.accepting(),
            // Peers check it to tell this process from another one at the same address.
            "node": app.engine.node().to_string(),
        }))
        .into_response(),
        Some(problem) => ApiError::unavailable(
            "store_failing",
            format!(
                "Not healthy: {problem}. Requests already accepted are kept in memory and retried; see the server log."
            ),
        )
        .into_response(),
    }
}

/// `?nonce=` of a liveness probe: 16 to 128 hex digits.
#[derive(serde::Deserialize)]
struct Probe {
    nonce: Option<String>,
}

/// The liveness probe of the nodes of a cluster ([`crate::cluster::Peers::answers`]): this process answers, with its
/// node id and, on a shared store, the proof that it holds the cluster's secret, whatever its store says.
async fn alive(
    axum::extract::State(app): axum::extract::State<AppState>,
    axum::extract::Query(probe): axum::extract::Query<Probe>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let nonce = probe.nonce.unwrap_or_default();
    if !(16..=128).contains(&nonce.len()) || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "invalid_query",
            "`nonce` must be 16 to 128 hex digits, fresh for each probe.",
        )
        .with_param(Some("nonce")));
    }
    let proof = app.engine.peers().map(|peers| peers.alive_proof(&nonce));
    Ok(Json(json!({"node": app.engine.node().to_string(), "proof": proof})))
}

async fn not_found() -> ApiError {
    ApiError::not_found(
        "There is nothing at this URL. Create requests with POST /v1/stream-chatgpt or /v1/async-chatgpt.",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "This method is not allowed here: create with POST, read with GET, stop with GET or POST, delete a status URL with DELETE.",
    )
}
