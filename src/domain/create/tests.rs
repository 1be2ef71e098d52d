//! The create body's parser: examples, then properties over generated bodies.

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
