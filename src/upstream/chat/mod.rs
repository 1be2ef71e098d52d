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

/// Whether an event's data is the end of the stream (`[DONE]`).
pub fn is_done(data: &str) -> bool {
    data.trim() == "[DONE]"
}

/// The `error.message` of an error answer's body, if it has one.
pub fn error_message(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    value.pointer("/error/message").and_then(|m| m.as_str()).map(str::to_owned)
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
    fn the_end_and_error_messages_are_read() {
        assert!(is_done(" [DONE]\n"));
        assert!(!is_done("{}"));
        assert_eq!(error_message(br#"{"error":{"message":"no"}}"#).as_deref(), Some("no"));
        assert_eq!(error_message(b"<html>"), None);
    }
}
