//! `GET /v1/usage`: a service key's own usage (requests, input and output tokens) per model and UTC day, as the
//! store keeps it for every node of a cluster. `by` (`key`, `model`, `day`; repeated or comma-separated; all three
//! when absent) groups it, `since` (`7d` by default, or a day `YYYY-MM-DD`) says from which UTC day on.
//!
//! With keys in use the caller's service key is required (401 without a valid one) and only its own usage is
//! shown; on an open server (no keys) the answer is the usage of the requests made without a key.

use super::AppState;
use super::error::ApiError;
use super::intake;
use crate::store::usage::{By, UsageOf, group, since_day};
use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

/// The period shown when the call names none.
pub const DEFAULT_SINCE: &str = "7d";

fn invalid(param: &'static str, message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", message).with_param(Some(param))
}

pub async fn get(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let key = intake::caller(&app, &headers, false).await?;
    let (mut by, mut since) = (Vec::new(), None);
    for (name, value) in url::form_urlencoded::parse(query.as_deref().unwrap_or_default().as_bytes()) {
        match &*name {
            "by" => by.push(value.into_owned()),
            "since" if since.is_none() => since = Some(value.into_owned()),
            "since" => return Err(invalid("since", "Give `since` once.".into())),
            _ => {}
        }
    }
    let by = By::parse(by.iter().map(String::as_str)).map_err(|e| invalid("by", format!("{e}.")))?;
    let today = time::OffsetDateTime::now_utc().date();
    let since =
        since_day(since.as_deref().unwrap_or(DEFAULT_SINCE), today).map_err(|e| invalid("since", format!("{e}.")))?;
    let of = UsageOf::Key(key.as_ref().map(|k| k.id.as_str()));
    let rows = app.gate.usage(of, &since).await.map_err(|e| ApiError::from_store(&e))?;
    Ok(Json(json!({"object": "list", "since": since, "data": group(&rows, &by)})))
}
