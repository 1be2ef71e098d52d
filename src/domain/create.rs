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
    fn a_number_goes_upstream_exactly_as_given() {
        // Found by `a_valid_body_keeps_every_parameter_it_does_not_own`: without serde_json's exact float parsing
        // this came back one unit in the last place off.
        let number = -1.1233371807628783e36;
        let req = parse(json!({"messages": [{"role": "user", "content": "hi"}], "a": {"b": number}})).unwrap();
        assert_eq!(req.parameters["a"]["b"].as_f64(), Some(number));
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

/// Properties of the parser over generated bodies: it takes any bytes without panicking, keeps every parameter
/// it does not own exactly as given, and names the field of every out-of-range option.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn limits() -> Limits {
        Limits { max_timeout: 90.0, max_connect_timeout: 10.0, default_model: "gpt-3.5-turbo".into() }
    }

    fn parse(body: &Value) -> Result<CreateRequest, FieldError> {
        CreateRequest::parse(body.to_string().as_bytes(), &limits())
    }

    /// Field names, the parser's own among them, so that generated objects hit every branch.
    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select([&OPTION_FIELDS[..], &["messages", "model", "stream", "role", "content"]].concat())
                .prop_map(str::to_owned),
            "[a-z_]{1,10}",
        ]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            ".{0,12}".prop_map(Value::from),
            Just(json!("private")),
            Just(json!("http://127.0.0.1/1/r/pub/2023/06/01/16/47/21/154dff1d-a1b1-4270-bbbc-66b9a5700a12.json")),
        ];
        leaf.prop_recursive(3, 32, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::vec((key(), inner), 0..5).prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    /// A top-level field that is neither an option, `messages`, `model` nor `stream`.
    fn parameter_name() -> impl Strategy<Value = String> {
        "[a-z_]{1,12}".prop_filter("not a field the parser owns", |k| {
            !OPTION_FIELDS.contains(&k.as_str()) && !matches!(k.as_str(), "messages" | "model" | "stream")
        })
    }

    fn messages() -> impl Strategy<Value = Value> {
        let message = (prop::sample::select(&["system", "user", "assistant", "tool"][..]), json_value())
            .prop_map(|(role, content)| json!({"role": role, "content": content}));
        prop::collection::vec(message, 1..4).prop_map(Value::Array)
    }

    /// The OffloadGPT options, each absent, null or valid.
    fn valid_options() -> impl Strategy<Value = Map<String, Value>> {
        (
            prop::option::of(prop_oneof![Just(json!("public")), Just(json!("private")), Just(Value::Null)]),
            prop::option::of(prop_oneof![(1.0..=90.0f64).prop_map(Value::from), (1u8..=90).prop_map(Value::from)]),
            prop::option::of((1.0..=10.0f64).prop_map(|s| Value::from(s.to_string()))),
            prop::option::of("[a-zA-Z0-9 _-]{0,64}".prop_map(Value::from)),
            prop::option::of(Just(json!("https://example.com/hook"))),
        )
            .prop_map(|(access, timeout, connect_timeout, conversation_id, webhook_url)| {
                let mut options = Map::new();
                let given = [
                    ("access", access),
                    ("timeout", timeout),
                    ("connect_timeout", connect_timeout),
                    ("conversation_id", conversation_id),
                    ("webhook_url", webhook_url),
                ];
                for (name, value) in given {
                    if let Some(value) = value {
                        options.insert(name.into(), value);
                    }
                }
                options
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_bytes_give_a_request_or_an_error(body in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = CreateRequest::parse(&body, &limits());
        }

        #[test]
        fn any_json_gives_a_request_or_an_error(value in json_value()) {
            let _ = parse(&value);
        }

        #[test]
        fn any_object_of_known_fields_gives_a_request_or_an_error(
            fields in prop::collection::vec((key(), json_value()), 0..8),
        ) {
            let _ = parse(&Value::Object(fields.into_iter().collect()));
        }

        #[test]
        fn a_valid_body_keeps_every_parameter_it_does_not_own(
            messages in messages(),
            messages_as_string in any::<bool>(),
            model in prop::option::of(prop_oneof!["[a-z0-9.-]{1,20}".prop_map(Value::from), Just(Value::Null)]),
            options in valid_options(),
            extras in prop::collection::vec((parameter_name(), json_value()), 0..6),
            stream in prop::option::of(any::<bool>()),
        ) {
            let mut body = Map::new();
            let sent = if messages_as_string { Value::String(messages.to_string()) } else { messages.clone() };
            body.insert("messages".into(), sent);
            if let Some(model) = &model {
                body.insert("model".into(), model.clone());
            }
            if let Some(stream) = stream {
                body.insert("stream".into(), Value::Bool(stream));
            }
            body.extend(options);
            body.extend(extras);
            let req = parse(&Value::Object(body.clone()));
            prop_assert!(req.is_ok(), "{:?} for {}", req.err(), Value::Object(body.clone()));
            let Ok(req) = req else { return Ok(()) };
            let p = &req.parameters;

            prop_assert_eq!(&p["messages"], &messages);
            match model.as_ref().and_then(Value::as_str) {
                Some(name) => prop_assert_eq!(&p["model"], name),
                None => prop_assert_eq!(&p["model"], "gpt-3.5-turbo"),
            }
            for (name, value) in &body {
                if matches!(name.as_str(), "messages" | "model") {
                    continue;
                }
                let owned = OPTION_FIELDS.contains(&name.as_str()) || name == "stream";
                if owned || value.is_null() {
                    prop_assert!(!p.contains_key(name), "`{}` must not go upstream", name);
                } else {
                    prop_assert_eq!(p.get(name), Some(value), "`{}` changed", name);
                }
            }
            prop_assert!(p.values().all(|v| !v.is_null()), "a top-level null went upstream");
            prop_assert_eq!(p.len(), body.iter().filter(|(k, v)| {
                !v.is_null() && !OPTION_FIELDS.contains(&k.as_str()) && *k != "stream"
            }).count() + usize::from(!body.get("model").is_some_and(Value::is_string)));
        }

        #[test]
        fn an_out_of_range_option_is_named(
            (field, value) in prop_oneof![
                prop_oneof![(-1e6..1.0f64), (90.000001..1e9f64)].prop_map(|v| ("timeout", json!(v))),
                prop_oneof![(-1e6..1.0f64), (10.000001..1e9f64)].prop_map(|v| ("connect_timeout", json!(v))),
                (91u64..).prop_map(|v| ("timeout", json!(v.to_string()))),
                prop_oneof![(i64::MIN..0).prop_map(|v| json!(v)), (0.01..0.99f64).prop_map(|f| json!(5.0 + f))]
                    .prop_map(|v| ("from_max_length", v)),
                "[a-z]{1,8}".prop_filter("not an access", |s| s != "public" && s != "private")
                    .prop_map(|s| ("access", json!(s))),
                "[a-z]{256,300}".prop_map(|s| ("conversation_id", json!(s))),
                "[a-z]{1,10}".prop_filter("not http", |s| s != "http" && s != "https")
                    .prop_map(|s| ("webhook_url", json!(format!("{s}:nothing")))),
                (any::<i64>(), any::<bool>()).prop_map(|(n, b)| ("model", if b { json!(n) } else { json!("  ") })),
            ],
        ) {
            let body = json!({"messages": [{"role": "user", "content": "hi"}], field: value});
            let error = parse(&body).err();
            prop_assert_eq!(error.map(|e| e.param), Some(Some(field)), "{}", body);
        }
    }
}
