//! The translation between the OpenAI Responses API and Chat Completions, in one place and tested on its own.
//!
//! An upstream that has only Chat Completions is given the Responses request as a chat request
//! ([`chat_request`]), and its chunks are turned into a well-formed Responses event stream ([`ChatToResponses`]).
//! An upstream that has the Responses API sends those events itself; [`ResponseState`] keeps the response object
//! current from either kind of stream, so a running response can be polled whatever its upstream.
//!
//! Everything here is `serde_json::Value` in, `Value` out, and deterministic: no clock, no randomness. The same
//! inputs give byte-identical events, so a replay of a recorded run is the run.
//!
//! The shapes follow the official SDK's types (`openai-python`, `src/openai/types/responses/`): every event has
//! `type` and `sequence_number`; text deltas and `response.output_text.done` carry `logprobs: []`; an
//! `output_text` part carries `annotations: []` and `logprobs: []`; usage carries
//! `input_tokens_details.{cached_tokens, cache_write_tokens}` and `output_tokens_details.reasoning_tokens`.

mod events;
pub mod record;
mod request;
mod state;

#[cfg(test)]
mod tests_events;
#[cfg(test)]
mod tests_properties;
#[cfg(test)]
mod tests_request;

pub use events::{ChatToResponses, End};
pub use record::{Record, Signal, Source};
pub use request::chat_request;
pub use state::ResponseState;

use serde_json::{Map, Value, json};

/// A Responses request that cannot be put as a Chat Completions request: the caller answers 400 with the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TranslateError {
    /// What cannot be translated, naming the item, tool or field (`input[2]`, `tools[0]`...).
    pub message: String,
    /// The request field at fault, as OpenAI's errors name it in `param` (`input`, `tools`, `tool_choice`...).
    pub param: &'static str,
}

impl TranslateError {
    pub(crate) fn new(param: &'static str, message: impl Into<String>) -> Self {
        Self { message: message.into(), param }
    }
}

/// The response object as OpenAI first shows it for `request`: every field the SDK requires, and the request's
/// settings echoed as OpenAI echoes them (defaults where the request has none). `status` is `queued` for a
/// background request, `in_progress` otherwise; `output` is empty, `usage`, `error` and `incomplete_details` null.
///
/// The base for [`ChatToResponses::new`], and what a create call answers before any event.
pub fn response_skeleton(request: &Value, id: &str, created_at: i64) -> Value {
    let get = |key: &str, default: Value| match request.get(key) {
        Some(value) if !value.is_null() => value.clone(),
        _ => default,
    };
    let background = request.get("background").and_then(Value::as_bool).unwrap_or(false);
    let text_default = json!({"format": {"type": "text"}});
    let mut response = Map::new();
    response.insert("id".into(), json!(id));
    response.insert("object".into(), json!("response"));
    response.insert("created_at".into(), json!(created_at));
    response.insert("status".into(), json!(if background { "queued" } else { "in_progress" }));
    response.insert("background".into(), json!(background));
    response.insert("error".into(), Value::Null);
    response.insert("incomplete_details".into(), Value::Null);
    response.insert("instructions".into(), get("instructions", Value::Null));
    response.insert("max_output_tokens".into(), get("max_output_tokens", Value::Null));
    response.insert("model".into(), get("model", json!("")));
    response.insert("output".into(), json!([]));
    response.insert("parallel_tool_calls".into(), get("parallel_tool_calls", json!(true)));
    response.insert("previous_response_id".into(), get("previous_response_id", Value::Null));
    response.insert("reasoning".into(), get("reasoning", json!({"effort": null, "summary": null})));
    response.insert("store".into(), get("store", json!(true)));
    response.insert("temperature".into(), get("temperature", json!(1.0)));
    response.insert("text".into(), get("text", text_default));
    response.insert("tool_choice".into(), get("tool_choice", json!("auto")));
    response.insert("tools".into(), get("tools", json!([])));
    response.insert("top_p".into(), get("top_p", json!(1.0)));
    response.insert("truncation".into(), get("truncation", json!("disabled")));
    response.insert("usage".into(), Value::Null);
    response.insert("user".into(), get("user", Value::Null));
    response.insert("metadata".into(), get("metadata", json!({})));
    Value::Object(response)
}

/// A chat `usage` object as the Responses API's: `prompt_tokens` → `input_tokens`, `completion_tokens` →
/// `output_tokens`, `total_tokens`, and the details (`cached_tokens`, `cache_write_tokens`, `reasoning_tokens`;
/// 0 when the upstream does not say).
pub fn usage(chat: &Value) -> Value {
    let count = |pointer: &str| chat.pointer(pointer).and_then(Value::as_u64).unwrap_or(0);
    let input = count("/prompt_tokens");
    let output = count("/completion_tokens");
    let total = chat.get("total_tokens").and_then(Value::as_u64).unwrap_or(input + output);
    json!({
        "input_tokens": input,
        "input_tokens_details": {
            "cached_tokens": count("/prompt_tokens_details/cached_tokens"),
            "cache_write_tokens": count("/prompt_tokens_details/cache_write_tokens"),
        },
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": count("/completion_tokens_details/reasoning_tokens")},
        "total_tokens": total,
    })
}
