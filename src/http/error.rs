//! The one error format of the API: `{"status":"error","error":{"code","message","param"}}`.

use crate::engine::CreateError;
use crate::keys::Refusal;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub param: Option<&'static str>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), param: None, retry_after: None }
    }

    pub fn with_param(mut self, param: Option<&'static str>) -> Self {
        self.param = param;
        self
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
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
        response
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
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
            Refusal::Store(e) => CreateError::Store(e).into(),
        }
    }
}

impl From<CreateError> for ApiError {
    fn from(e: CreateError) -> Self {
        let message = e.to_string();
        match e {
            CreateError::ShuttingDown | CreateError::Overloaded(_) | CreateError::StoreFailing => {
                let mut err = Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message);
                err.retry_after = Some(1);
                err
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
            CreateError::Store(store) => {
                tracing::error!(error = %store, "could not store a new request");
                let mut err = Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "The request could not be stored; nothing was created. Try again shortly.",
                );
                err.retry_after = Some(1);
                err
            }
            CreateError::Internal(cause) => Self::internal(&cause),
        }
    }
}
