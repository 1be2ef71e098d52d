//! The Chat Completions protocol, the upstream side's adapter: what the request core sends to an upstream that
//! speaks `POST /chat/completions`, and how it reads what comes back (the end of a stream, an error's message).
//! The events themselves are server-sent events ([`super::events`]); the chunks are assembled into the record's
//! body by `document::Assembler`.

use serde_json::Value;

/// The upstream body: the stored parameters with `"stream"` added (the object always has `messages`).
pub fn body(parameters: &str, stream: bool) -> String {
    let body = parameters.trim_end().strip_suffix('}').unwrap_or(parameters);
    format!("{body},\"stream\":{stream}}}")
}

/// Makes a stream's parameters ask the upstream for its usage (`stream_options.include_usage`), so that every
/// request records its tokens. Returns whether the caller had not asked for it: then the usage-only chunk the
/// upstream sends last is the server's, kept out of the caller's events. `stream_options` given as something other
/// than an object (or `null`) is left as it is, for the upstream to judge.
pub fn ask_for_usage(parameters: &mut serde_json::Map<String, Value>) -> bool {
    let options = parameters.entry("stream_options").or_insert(Value::Null);
    if options.is_null() {
        *options = Value::Object(serde_json::Map::new());
    }
    let Value::Object(options) = options else { return false };
    match options.get("include_usage") {
        Some(Value::Bool(true)) => false,
        _ => {
            options.insert("include_usage".into(), Value::Bool(true));
            true
        }
    }
}

/// Whether an event's data is the end of the stream (`[DONE]`).
pub fn is_done(data: &str) -> bool {
    data.trim() == "[DONE]"
}

/// The `error.message` of an error answer's body, if it has one.
pub fn error_message(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    value.pointer("/error/message").and_then(|m| m.as_str()).map(str::to_owned)
}

/// The `error.code` of an error answer's body, if it has one.
pub fn error_code(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    value.pointer("/error/code").and_then(|m| m.as_str()).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_flag_is_added_to_the_parameters() {
        let body = body(r#"{"model":"m","messages":[]}"#, true);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["stream"], true);
        assert_eq!(v["model"], "m");
    }

    #[test]
    fn usage_is_asked_for_unless_the_caller_did() {
        let ask = |v: Value| {
            let mut map = v.as_object().unwrap().clone();
            let hidden = ask_for_usage(&mut map);
            (hidden, Value::Object(map))
        };
        let (hidden, p) = ask(serde_json::json!({"model": "m"}));
        assert!(hidden);
        assert_eq!(p["stream_options"], serde_json::json!({"include_usage": true}));
        let (hidden, p) = ask(serde_json::json!({"stream_options": {"include_usage": false, "x": 1}}));
        assert!(hidden);
        assert_eq!(p["stream_options"], serde_json::json!({"include_usage": true, "x": 1}));
        let (hidden, p) = ask(serde_json::json!({"stream_options": {"include_usage": true}}));
        assert!(!hidden);
        assert_eq!(p["stream_options"], serde_json::json!({"include_usage": true}));
        let (hidden, p) = ask(serde_json::json!({"stream_options": "odd"}));
        assert!(!hidden);
        assert_eq!(p["stream_options"], "odd");
        let (hidden, _) = ask(serde_json::json!({"stream_options": null}));
        assert!(hidden);
    }

    #[test]
    fn the_end_and_error_messages_are_read() {
        assert!(is_done(" [DONE]\n"));
        assert!(!is_done("{}"));
        assert_eq!(error_message(br#"{"error":{"message":"no"}}"#).as_deref(), Some("no"));
        assert_eq!(error_message(b"<html>"), None);
    }
}
