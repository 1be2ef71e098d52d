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
    /// endpoint decides it).
    pub parameters: Map<String, Value>,
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

        Ok(Self { access, timeout, connect_timeout, continuation, conversation_id, webhook_url, parameters: fields })
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

fn parse_webhook_url(url: &str) -> Result<Url, FieldError> {
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
mod tests {
    use super::*;
    use serde_json::json;

    fn limits() -> Limits {
        Limits { max_timeout: 90.0, max_connect_timeout: 10.0, default_model: "gpt-3.5-turbo".into() }
    }

    fn parse(body: Value) -> Result<CreateRequest, FieldError> {
        CreateRequest::parse(body.to_string().as_bytes(), &limits())
    }

    fn param_of(body: Value) -> Option<&'static str> {
        parse(body).unwrap_err().param
    }

    #[test]
    fn defaults_follow_the_seed() {
        let req = parse(json!({"messages": [{"role": "user", "content": "hi"}]})).unwrap();
        assert_eq!(req.access, Access::Public);
        assert_eq!(req.timeout, 90.0);
        assert_eq!(req.connect_timeout, 5.0);
        assert_eq!(req.parameters["model"], "gpt-3.5-turbo");
    }

    #[test]
    fn messages_may_be_a_string_holding_an_array() {
        let req = parse(json!({"messages": "[{\"role\":\"user\",\"content\":\"hi\"}]"})).unwrap();
        assert!(req.parameters["messages"].is_array());
    }

    #[test]
    fn options_are_taken_out_and_everything_else_passes_through() {
        let req = parse(json!({
            "messages": [{"role": "user", "content": "hi"}], "access": "private", "timeout": 2.5,
            "connect_timeout": "3", "stream": false, "tools": [], "brand_new_param": {"x": 1}
        }))
        .unwrap();
        assert_eq!(req.access, Access::Private);
        assert_eq!(req.timeout, 2.5);
        assert_eq!(req.connect_timeout, 3.0);
        assert!(!req.parameters.contains_key("access"));
        assert!(!req.parameters.contains_key("stream"));
        assert_eq!(req.parameters["brand_new_param"], json!({"x": 1}));
    }

    #[test]
    fn top_level_nulls_are_dropped_and_nested_ones_kept() {
        let req = parse(json!({
            "messages": [{"role": "user", "content": "hi", "name": null}], "temperature": null, "tools": null,
            "user": null, "model": null, "response_format": {"type": "json_object", "schema": null}, "seed": 0
        }))
        .unwrap();
        let keys: Vec<&str> = req.parameters.keys().map(String::as_str).collect();
        assert_eq!(keys, ["model", "messages", "response_format", "seed"]);
        assert_eq!(req.parameters["model"], "gpt-3.5-turbo");
        assert_eq!(req.parameters["messages"][0]["name"], Value::Null);
        assert_eq!(req.parameters["response_format"]["schema"], Value::Null);
    }

    #[test]
    fn every_bad_field_is_named() {
        let ok = json!([{"role": "user", "content": "hi"}]);
        assert_eq!(param_of(json!({})), Some("messages"));
        assert_eq!(param_of(json!({"messages": []})), Some("messages"));
        assert_eq!(param_of(json!({"messages": "nope"})), Some("messages"));
        assert_eq!(param_of(json!({"messages": [{"content": "no role"}]})), Some("messages"));
        assert_eq!(param_of(json!({"messages": ok, "access": "secret"})), Some("access"));
        assert_eq!(param_of(json!({"messages": ok, "timeout": 91})), Some("timeout"));
        assert_eq!(param_of(json!({"messages": ok, "timeout": 0.5})), Some("timeout"));
        assert_eq!(param_of(json!({"messages": ok, "timeout": "soon"})), Some("timeout"));
        assert_eq!(param_of(json!({"messages": ok, "connect_timeout": 11})), Some("connect_timeout"));
        assert_eq!(param_of(json!({"messages": ok, "model": 3})), Some("model"));
        assert_eq!(param_of(json!({"messages": ok, "webhook_url": "ftp://x"})), Some("webhook_url"));
        assert_eq!(param_of(json!({"messages": ok, "from_status_url": "http://x/y"})), Some("from_status_url"));
        assert_eq!(param_of(json!({"messages": ok, "from_bearer_token": "abc"})), Some("from_bearer_token"));
        assert_eq!(param_of(json!({"messages": ok, "from_max_length": 5})), Some("from_max_length"));
        assert_eq!(param_of(json!({"messages": ok, "conversation_id": 7})), Some("conversation_id"));
        assert!(parse(json!([1])).unwrap_err().param.is_none());
        assert!(CreateRequest::parse(b"{", &limits()).unwrap_err().param.is_none());
    }

    #[test]
    fn from_status_url_is_parsed_as_one_of_our_urls() {
        let req = parse(json!({
            "messages": [{"role": "user", "content": "more"}],
            "from_status_url": "http://127.0.0.1:8080/1/r/priv/2023/06/02/06/11/01/633249b8-cee5-4636-ae71-5ed45624ac93.json",
            "from_bearer_token": "718862c1382b2ffbb445f6c1abec79b2", "from_max_length": 100
        }))
        .unwrap();
        let c = req.continuation.unwrap();
        assert_eq!(c.target.access, Access::Private);
        assert_eq!(c.max_length, Some(100));
    }
}
