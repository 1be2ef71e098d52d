//! Continuing a conversation from a previous request (`from_status_url`).

use serde_json::{Map, Value};

/// The assistant message of the previous response's first choice, as a message to send upstream again, its
/// content cut to `max_chars` characters. `None` when the previous response has no assistant message.
pub fn assistant_message(body: &Value, max_chars: Option<usize>) -> Option<Value> {
    let choice = body.get("choices")?.as_array()?.iter().min_by_key(|c| c.get("index").and_then(Value::as_u64))?;
    let message = choice.get("message")?.as_object()?;
    let mut out = Map::new();
    out.insert("role".into(), message.get("role").cloned().unwrap_or_else(|| "assistant".into()));
    let mut content = message.get("content").cloned().unwrap_or(Value::Null);
    if let (Value::String(text), Some(max)) = (&mut content, max_chars)
        && let Some((cut, _)) = text.char_indices().nth(max)
    {
        text.truncate(cut);
    }
    let has_calls = ["tool_calls", "function_call"].iter().any(|k| message.get(*k).is_some_and(|v| !v.is_null()));
    if content.is_null() && !has_calls {
        return None;
    }
    out.insert("content".into(), content);
    for key in ["tool_calls", "function_call"] {
        if let Some(v) = message.get(key).filter(|v| !v.is_null()) {
            out.insert(key.into(), v.clone());
        }
    }
    Some(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_is_cut_by_characters_not_bytes() {
        let body = json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": "héllo wörld"}}]});
        assert_eq!(assistant_message(&body, Some(4)).unwrap(), json!({"role": "assistant", "content": "héll"}));
        assert_eq!(assistant_message(&body, None).unwrap()["content"], "héllo wörld");
    }

    #[test]
    fn the_first_choice_is_used_and_tool_calls_kept() {
        let body = json!({"choices": [
            {"index": 1, "message": {"role": "assistant", "content": "second"}},
            {"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": [{"id": "c"}]}}
        ]});
        let m = assistant_message(&body, None).unwrap();
        assert_eq!(m["tool_calls"][0]["id"], "c");
        assert!(assistant_message(&json!({"choices": []}), None).is_none());
        assert!(assistant_message(&json!(null), None).is_none());
    }
}
