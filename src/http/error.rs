//! The one error format of the API: `{"status":"error","error":{"code","message","param"}}`.

use crate::engine::CreateError;
use crate::keys::Refusal;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub param: Option<&'static str>,
    pub retry_after: Option<u64>,
    /// Answered before the request body was read: `Connection: close` (HTTP/1.1), so that the rest of the body
    /// is not read (or waited for) just to keep the connection.
    pub close: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), param: None, retry_after: None, close: false }
    }

    pub fn with_param(mut self, param: Option<&'static str>) -> Self {
        self.param = param;
        self
    }

    /// Closes an HTTP/1.x connection after this answer (HTTP/2 has no such header; its stream is reset instead).
    pub fn closing(mut self, http1: bool) -> Self {
        self.close = http1;
        self
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 503 with `Retry-After: 1`: the server cannot do it right now, but may in a moment.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        let mut err = Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message);
        err.retry_after = Some(1);
        err
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// A failure of ours: the cause is logged, the caller gets an opaque message.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "The server could not complete this; try again.")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "status": "error",
            "error": {"code": self.code, "message": self.message, "param": self.param},
        });
        let mut response = (self.status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.close {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// The last word on every response: an error status whose body is not JSON (an extractor's or a layer's plain
/// text, an empty 405) gets the JSON format of the contract, keeping its status and headers.
pub fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, _) = response.into_parts();
    let (code, message) = generic(status);
    let (json_parts, body) = ApiError::new(status, code, message).into_response().into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    for (name, value) in &json_parts.headers {
        parts.headers.insert(name, value.clone());
    }
    Response::from_parts(parts, body)
}

/// Code and message for an error status that reached [`json_errors`] without a body of ours.
fn generic(status: StatusCode) -> (&'static str, String) {
    match status {
        StatusCode::BAD_REQUEST => (
            "bad_request",
            "The request could not be understood (its URL, query string or headers are malformed).".into(),
        ),
        StatusCode::NOT_FOUND => ("not_found", "There is nothing at this URL.".into()),
        StatusCode::METHOD_NOT_ALLOWED => ("method_not_allowed", "This method is not allowed on this URL.".into()),
        StatusCode::PAYLOAD_TOO_LARGE => {
            ("payload_too_large", "The request body is larger than this server accepts.".into())
        }
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            ("unsupported_media_type", "This content type is not accepted here.".into())
        }
        s if s.is_server_error() => ("internal_error", "The server could not complete this; try again.".into()),
        s => ("client_error", format!("The request was refused ({}).", s.canonical_reason().unwrap_or("client error"))),
    }
}

/// `Path`, with its rejections in the JSON format.
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state).await.map(|Path(value)| ApiPath(value)).map_err(ApiError::from)
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        if rejection.status().is_server_error() {
            return Self::internal(&rejection.body_text());
        }
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_url",
            "This URL's path is not valid: every percent-escape (`%xx`) must decode to UTF-8 text.",
        )
    }
}

impl ApiError {
    /// A read from the store that failed: 503 while the store is unreachable or busy (it passes by itself;
    /// nothing was changed), else an internal error.
    pub fn from_store(e: &crate::store::StoreError) -> Self {
        if e.is_retryable() || matches!(e, crate::store::StoreError::Closed) {
            tracing::warn!(error = %e, "a read from the store failed");
            return Self::unavailable(
                "store_unavailable",
                "The server cannot reach its database right now, so it cannot look this up; nothing was changed. Retry shortly.",
            );
        }
        Self::internal(e)
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        // Limits are counted where the store answered (`Admit::refusal_reason`), store failures as the create
        // error they become.
        if let Refusal::Missing | Refusal::Unknown = refusal {
            crate::metrics::create_refused(refusal.reason());
        }
        match refusal {
            Refusal::Missing => Self::unauthorized(
                "This server requires a service key: send it as `Authorization: Bearer <key>`, `X-API-Key` or `X-RapidAPI-Key`.",
            ),
            Refusal::Unknown => Self::unauthorized("This service key is not valid (unknown or revoked)."),
            Refusal::Limit { message, retry_after } => {
                let mut err = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message);
                err.retry_after = Some(retry_after.max(1));
                err
            }
            Refusal::Tokens { message, retry_after } => {
                let mut err = Self::new(StatusCode::TOO_MANY_REQUESTS, "token_quota_exceeded", message);
                err.retry_after = Some(retry_after.max(1));
                err
            }
            Refusal::Store(e) => CreateError::Store(e).into(),
        }
    }
}

impl From<crate::engine::AdmitError> for ApiError {
    fn from(e: crate::engine::AdmitError) -> Self {
        match e {
            crate::engine::AdmitError::Refused(refusal) => refusal.into(),
            crate::engine::AdmitError::Create(e) => e.into(),
        }
    }
}

impl From<CreateError> for ApiError {
    fn from(e: CreateError) -> Self {
        crate::metrics::create_refused(e.reason());
        let message = e.to_string();
        match e {
            CreateError::ShuttingDown | CreateError::Overloaded(_) | CreateError::StoreFailing => {
                Self::unavailable("unavailable", message)
            }
            CreateError::MissingKey => {
                Self::new(StatusCode::BAD_REQUEST, "missing_upstream_key", message).with_param(Some("X-OpenAI-API-Key"))
            }
            CreateError::WebhookRefused(_) => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_field", message).with_param(Some("webhook_url"))
            }
            CreateError::FromNotFound => Self::not_found(message).with_param(Some("from_status_url")),
            CreateError::FromForbidden => {
                Self::new(StatusCode::FORBIDDEN, "forbidden", message).with_param(Some("from_bearer_token"))
            }
            CreateError::FromNotFinished(_) => {
                Self::new(StatusCode::CONFLICT, "not_finished", message).with_param(Some("from_status_url"))
            }
            CreateError::NoUpstream(_) => {
                Self::new(StatusCode::BAD_REQUEST, "model_not_served", message).with_param(Some("model"))
            }
            CreateError::PreviousNotFound(_) => {
                Self::new(StatusCode::BAD_REQUEST, "previous_response_not_found", message)
                    .with_param(Some("previous_response_id"))
            }
            CreateError::PreviousNotFinished(..) => {
                Self::new(StatusCode::BAD_REQUEST, "previous_response_not_finished", message)
                    .with_param(Some("previous_response_id"))
            }
            CreateError::Untranslatable { param, .. } => {
                Self::new(StatusCode::BAD_REQUEST, "unsupported_by_upstream", message).with_param(Some(param))
            }
            CreateError::Store(store) => {
                tracing::error!(error = %store, "could not store a new request");
                Self::unavailable(
                    "unavailable",
                    "The request could not be stored; nothing was created. Try again shortly.",
                )
            }
            CreateError::Internal(cause) => Self::internal(&cause),
        }
    }
}
