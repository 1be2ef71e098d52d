//! The body of `POST /v1/stream-chatgpt` and `/v1/async-chatgpt`, parsed once into validated types.
//!
//! OffloadGPT's own options are taken out; every other field is a Chat Completions parameter and goes upstream
//! unchanged, known or not, so that new upstream parameters work without a release. A top-level `null` counts as
//! not given: it is neither sent upstream nor kept in `parameters`.

use super::Access;
use super::locator::{ParsedUrl, Suffix};
use serde_json::{Map, Value};
use url::Url;

/// Fields that belong to OffloadGPT and are never sent upstream.
const OPTION_FIELDS: [&str; 8] = [
    "access",
    "timeout",
    "connect_timeout",
    "from_status_url",
    "from_bearer_token",
    "from_max_length",
    "conversation_id",
    "webhook_url",
];

/// The server's bounds for what a caller may ask for.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_timeout: f64,
    pub max_connect_timeout: f64,
    pub default_model: String,
}

/// A valid create request.
#[derive(Debug)]
pub struct CreateRequest {
    pub access: Access,
    /// Seconds for the whole upstream call, 1..=max_timeout.
    pub timeout: f64,
    /// Seconds to establish the upstream connection, 1..=max_connect_timeout.
    pub connect_timeout: f64,
    pub continuation: Option<Continuation>,
    pub conversation_id: Option<String>,
    pub webhook_url: Option<Url>,
    /// The Chat Completions parameters: `messages` always an array, `model` defaulted, `stream` removed (the
    /// endpoint decides it). For a Responses request, the Responses request as given, minus `stream`.
    pub parameters: Map<String, Value>,
    /// What the request's record holds (Chat Completions chunks, or Responses events).
    pub format: super::Format,
    /// A Responses request that continues another (`previous_response_id`).
    pub previous_response: Option<super::RequestId>,
    /// A request private to the service key that made it (a Responses request made with one): the key's hash
    /// reads it, as its bearer token would.
    pub key_hash: Option<super::TokenHash>,
    /// The create call's W3C `traceparent`, when it sent a valid one: the request's trace continues it.
    pub traceparent: Option<String>,
    /// The create's answer waits for the upstream as well as for the insert (the OpenAI entry): the insert then
    /// commits beside the upstream call rather than ahead of it on the caller's thread
    /// ([`crate::store::Store::write_urgent_here`]). Set by the endpoint, never by the body.
    pub answer_waits_for_upstream: bool,
}

/// `from_status_url` and its companions.
#[derive(Debug)]
pub struct Continuation {
    pub from_status_url: String,
    pub target: ParsedUrl,
    pub bearer_token: Option<String>,
    /// Characters of the previous assistant message to keep.
    pub max_length: Option<usize>,
}

/// Why a body was refused: a 400 naming the field.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub param: Option<&'static str>,
    pub message: String,
}

impl FieldError {
    fn field(param: &'static str, message: impl Into<String>) -> Self {
        Self { param: Some(param), message: message.into() }
    }
}

impl CreateRequest {
    pub fn parse(body: &[u8], limits: &Limits) -> Result<Self, FieldError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| FieldError {
            param: None,
            message: format!("The request body is not valid JSON ({e}). Send a JSON object with at least `messages`."),
        })?;
        let Value::Object(mut fields) = value else {
            return Err(FieldError {
                param: None,
                message: "The request body must be a JSON object with at least `messages`.".into(),
            });
        };

        let access = match take_string(&mut fields, "access")?.as_deref() {
            None | Some("public") => Access::Public,
            Some("private") => Access::Private,
            Some(other) => {
                return Err(FieldError::field(
                    "access",
                    format!("`access` must be \"public\" or \"private\", not {other:?}."),
                ));
            }
        };
        let timeout = take_seconds(&mut fields, "timeout", 90.0, limits.max_timeout)?;
        let connect_timeout = take_seconds(&mut fields, "connect_timeout", 5.0, limits.max_connect_timeout)?;

        let from_status_url = take_string(&mut fields, "from_status_url")?;
        let bearer_token = take_string(&mut fields, "from_bearer_token")?;
        let max_length = take_count(&mut fields, "from_max_length")?;
        let continuation = match from_status_url {
            Some(url) => {
                Some(Continuation { target: parse_status_url(&url)?, from_status_url: url, bearer_token, max_length })
            }
            None if bearer_token.is_some() => {
                return Err(FieldError::field(
                    "from_bearer_token",
                    "`from_bearer_token` only applies together with `from_status_url`.",
                ));
            }
            None if max_length.is_some() => {
                return Err(FieldError::field(
                    "from_max_length",
                    "`from_max_length` only applies together with `from_status_url`.",
                ));
            }
            None => None,
        };

        let conversation_id = take_string(&mut fields, "conversation_id")?;
        if let Some(id) = &conversation_id
            && (id.chars().count() > 255 || id.chars().any(char::is_control))
        {
            return Err(FieldError::field(
                "conversation_id",
                "`conversation_id` must be at most 255 characters without control characters.",
            ));
        }

        let webhook_url = take_string(&mut fields, "webhook_url")?.map(|u| parse_webhook_url(&u)).transpose()?;

        debug_assert!(OPTION_FIELDS.iter().all(|f| !fields.contains_key(*f)));
        fields.shift_remove("stream");
        // A parameter given as `null` is not given (the seed: optional parameters "default to null"); only the
        // top level: a `null` inside a value is the upstream's business.
        fields.retain(|_, value| !value.is_null());
        normalize_messages(&mut fields)?;
        match fields.get("model") {
            None => {
                fields.shift_insert(0, "model".into(), Value::String(limits.default_model.clone()));
            }
            Some(Value::String(m)) if !m.trim().is_empty() => {}
            Some(_) => {
                return Err(FieldError::field("model", "`model` must be a non-empty string."));
            }
        }

        Ok(Self {
            access,
            timeout,
            connect_timeout,
            continuation,
            conversation_id,
            webhook_url,
            parameters: fields,
            format: super::Format::Chat,
            previous_response: None,
            key_hash: None,
            traceparent: None,
            answer_waits_for_upstream: false,
        })
    }
}

/// A string option; `null` and `""` mean "not given" (some clients always send every field).
fn take_string(fields: &mut Map<String, Value>, name: &'static str) -> Result<Option<String>, FieldError> {
    match fields.shift_remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim().to_owned())),
        Some(_) => Err(FieldError::field(name, format!("`{name}` must be a string."))),
    }
}

/// A number given as a JSON number or a numeric string (form-minded clients send the latter).
fn take_number(fields: &mut Map<String, Value>, name: &'static str) -> Result<Option<f64>, FieldError> {
    let number = match fields.shift_remove(name) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => return Ok(None),
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
        Some(_) => None,
    };
    match number {
        Some(n) if n.is_finite() => Ok(Some(n)),
        _ => Err(FieldError::field(name, format!("`{name}` must be a number."))),
    }
}

fn take_seconds(
    fields: &mut Map<String, Value>,
    name: &'static str,
    default: f64,
    max: f64,
) -> Result<f64, FieldError> {
    let Some(value) = take_number(fields, name)? else {
        return Ok(default.min(max));
    };
    if !(1.0..=max).contains(&value) {
        return Err(FieldError::field(
            name,
            format!("`{name}` must be between 1 and {max} seconds (decimals allowed), not {value}."),
        ));
    }
    Ok(value)
}

fn take_count(fields: &mut Map<String, Value>, name: &'static str) -> Result<Option<usize>, FieldError> {
    let Some(value) = take_number(fields, name)? else {
        return Ok(None);
    };
    if value < 0.0 || value.fract() != 0.0 || value > u32::MAX as f64 {
        return Err(FieldError::field(name, format!("`{name}` must be a whole number of characters, 0 or more.")));
    }
    Ok(Some(value as usize))
}

fn parse_status_url(url: &str) -> Result<ParsedUrl, FieldError> {
    let path = match Url::parse(url) {
        Ok(parsed) => parsed.path().to_owned(),
        Err(_) if url.starts_with('/') => url.to_owned(),
        Err(_) => {
            return Err(FieldError::field("from_status_url", "`from_status_url` must be a status URL of this server."));
        }
    };
    match ParsedUrl::from_url_path(&path) {
        Some(parsed) if parsed.suffix == Suffix::Status => Ok(parsed),
        _ => Err(FieldError::field(
            "from_status_url",
            "`from_status_url` must be the `status_url` (ending in .json) of a previous request to this server.",
        )),
    }
}

pub fn parse_webhook_url(url: &str) -> Result<Url, FieldError> {
    let parsed = Url::parse(url)
        .map_err(|e| FieldError::field("webhook_url", format!("`webhook_url` is not a valid URL ({e}).")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() || url.len() > 2048 {
        return Err(FieldError::field("webhook_url", "`webhook_url` must be an http or https URL with a host."));
    }
    Ok(parsed)
}

/// `messages` may be an array or a string holding a JSON array; it leaves here as a non-empty array of objects
/// that each have a string `role`.
fn normalize_messages(fields: &mut Map<String, Value>) -> Result<(), FieldError> {
    const HELP: &str = "`messages` is required: a non-empty array of objects like {\"role\": \"user\", \"content\": \"Hello\"} \
         (or a string holding such an array).";
    let messages = match fields.get("messages").cloned() {
        Some(Value::Array(items)) => items,
        Some(Value::String(text)) => match serde_json::from_str::<Value>(&text) {
            Ok(Value::Array(items)) => items,
            _ => return Err(FieldError::field("messages", HELP)),
        },
        _ => return Err(FieldError::field("messages", HELP)),
    };
    if messages.is_empty() {
        return Err(FieldError::field("messages", HELP));
    }
    for (i, message) in messages.iter().enumerate() {
        if !message.get("role").is_some_and(Value::is_string) {
            return Err(FieldError::field(
                "messages",
                format!("`messages[{i}]` must be an object with a string `role` ({HELP})"),
            ));
        }
    }
    fields.insert("messages".into(), Value::Array(messages));
    Ok(())
}

#[cfg(test)]
mod tests;
