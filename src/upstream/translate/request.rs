//! A Responses request (`POST /v1/responses` body) as a Chat Completions request body.
//!
//! Messages, in order: `instructions` as a `system` message; then the items of `previous` (earlier turns); then
//! `input` (a string is one `user` message). Items:
//! - a message (`type: message` optional) with role `user`, `assistant`, `system` or `developer` (sent as `system`,
//!   which every chat upstream knows); its content a string, or parts `input_text` / `output_text` / `text`
//!   (one part becomes a string, several an array of chat `text` parts) and, for an assistant, `refusal`;
//! - `function_call` → an assistant message's `tool_calls` (joining the assistant message just before it, so
//!   a turn's text and its calls, and consecutive calls, make one message);
//! - `function_call_output` → a `tool` message (an output given as parts: their texts joined);
//! - `reasoning` items (a previous turn's, from an upstream that has the Responses API) are left out: chat has no
//!   place for them and they carry nothing the model needs to read again.
//!
//! Anything else (images, files, audio, item references, built-in tool calls) is a [`TranslateError`] naming it.
//!
//! Fields: `model`, `temperature`, `top_p`, `user`, `parallel_tool_calls`, `service_tier`, `prompt_cache_key`,
//! `safety_identifier` pass; `max_output_tokens` → `max_completion_tokens`; `reasoning.effort` →
//! `reasoning_effort`; `tools` (functions only) and `tool_choice` are put in chat's shape; `text.format`
//! `json_schema` / `json_object` → `response_format` (best effort; `text.verbosity` is dropped). Dropped, as
//! offload's own business or as chat has no equivalent: `background`, `store`, `stream`, `stream_options`,
//! `previous_response_id` (resolved by the caller into `previous`), `include`, `truncation`, `metadata` (chat
//! keeps it only with `store`), `top_logprobs`, `max_tool_calls`, `reasoning.summary`, and any field not named
//! here. `conversation` and `prompt` (state kept by OpenAI) are errors: dropping them would change the answer.

use super::TranslateError;
use serde_json::{Map, Value, json};

/// The Responses request `request` as a Chat Completions request body (without `stream`), the conversation's
/// earlier items `previous` (input and output items of the previous turns, in order) before its input.
pub fn chat_request(request: &Value, previous: &[Value]) -> Result<Value, TranslateError> {
    let fields = request.as_object().ok_or_else(|| TranslateError::new("body", "the request must be an object"))?;
    for key in ["conversation", "prompt"] {
        if fields.get(key).is_some_and(|v| !v.is_null()) {
            return Err(TranslateError::new(
                if key == "prompt" { "prompt" } else { "conversation" },
                format!("`{key}` is not supported by an upstream that has only Chat Completions"),
            ));
        }
    }
    let mut messages = Messages::default();
    match fields.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(text)) => messages.push(json!({"role": "system", "content": text})),
        Some(_) => return Err(TranslateError::new("instructions", "`instructions` must be a string")),
    }
    for (index, item) in previous.iter().enumerate() {
        messages.item(item, &format!("previous_response_id (item {index})"))?;
    }
    match fields.get("input") {
        None | Some(Value::Null) => {}
        Some(Value::String(text)) => messages.push(json!({"role": "user", "content": text})),
        Some(Value::Array(items)) => {
            for (index, item) in items.iter().enumerate() {
                messages.item(item, &format!("input[{index}]"))?;
            }
        }
        Some(_) => return Err(TranslateError::new("input", "`input` must be a string or a list of items")),
    }
    if messages.0.is_empty() {
        return Err(TranslateError::new("input", "the request has no input"));
    }

    let mut body = Map::new();
    for key in ["model", "temperature", "top_p", "user", "parallel_tool_calls"] {
        copy(fields, key, key, &mut body);
    }
    body.insert("messages".into(), Value::Array(messages.0));
    copy(fields, "max_output_tokens", "max_completion_tokens", &mut body);
    for key in ["service_tier", "prompt_cache_key", "safety_identifier"] {
        copy(fields, key, key, &mut body);
    }
    if let Some(effort) = fields.get("reasoning").and_then(|r| r.get("effort")).filter(|e| !e.is_null()) {
        body.insert("reasoning_effort".into(), effort.clone());
    }
    if let Some(tools) = fields.get("tools").filter(|t| !t.is_null()) {
        body.insert("tools".into(), chat_tools(tools)?);
    }
    if let Some(choice) = fields.get("tool_choice").filter(|c| !c.is_null()) {
        body.insert("tool_choice".into(), tool_choice(choice)?);
    }
    if let Some(format) = fields.get("text").and_then(|t| t.get("format")).filter(|f| !f.is_null())
        && let Some(format) = response_format(format)?
    {
        body.insert("response_format".into(), format);
    }
    Ok(Value::Object(body))
}

fn copy(fields: &Map<String, Value>, from: &str, to: &str, body: &mut Map<String, Value>) {
    if let Some(value) = fields.get(from).filter(|v| !v.is_null()) {
        body.insert(to.into(), value.clone());
    }
}

/// The chat messages being built.
#[derive(Default)]
struct Messages(Vec<Value>);

impl Messages {
    fn push(&mut self, message: Value) {
        self.0.push(message);
    }

    /// One Responses item, `at` naming it for errors.
    fn item(&mut self, item: &Value, at: &str) -> Result<(), TranslateError> {
        let kind = item.get("type").and_then(Value::as_str);
        match kind {
            None | Some("message") => self.message(item, at),
            Some("function_call") => {
                let text = |key: &str| {
                    item.get(key).and_then(Value::as_str).ok_or_else(|| {
                        TranslateError::new("input", format!("{at}: a `function_call` item needs a string `{key}`"))
                    })
                };
                let call = json!({
                    "id": text("call_id")?,
                    "type": "function",
                    "function": {"name": text("name")?, "arguments": text("arguments")?},
                });
                self.tool_call(call);
                Ok(())
            }
            Some("function_call_output") => {
                let call_id = item.get("call_id").and_then(Value::as_str).ok_or_else(|| {
                    TranslateError::new("input", format!("{at}: a `function_call_output` item needs a `call_id`"))
                })?;
                let output = match item.get("output") {
                    Some(Value::String(text)) => text.clone(),
                    Some(Value::Array(parts)) => texts(parts, at, false)?.concat(),
                    _ => {
                        return Err(TranslateError::new(
                            "input",
                            format!("{at}: a `function_call_output` item needs an `output`"),
                        ));
                    }
                };
                self.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
                Ok(())
            }
            Some("reasoning") => Ok(()),
            Some(other) => Err(TranslateError::new(
                "input",
                format!("{at}: an item of type `{other}` cannot be sent to an upstream that has only Chat Completions"),
            )),
        }
    }

    fn message(&mut self, item: &Value, at: &str) -> Result<(), TranslateError> {
        let role = match item.get("role").and_then(Value::as_str) {
            Some(role @ ("user" | "assistant" | "system")) => role,
            Some("developer") => "system",
            Some(other) => return Err(TranslateError::new("input", format!("{at}: unknown role `{other}`"))),
            None => return Err(TranslateError::new("input", format!("{at}: a message needs a `role`"))),
        };
        let mut message = Map::new();
        message.insert("role".into(), json!(role));
        match item.get("content") {
            Some(Value::String(text)) => {
                message.insert("content".into(), json!(text));
            }
            Some(Value::Array(parts)) => {
                let texts = texts(parts, at, role == "assistant")?;
                let content = match texts.as_slice() {
                    [] => Value::Null,
                    [one] => json!(one),
                    many => many.iter().map(|text| json!({"type": "text", "text": text})).collect(),
                };
                message.insert("content".into(), content);
                let refusal: String =
                    parts.iter().filter_map(|p| p.get("refusal").and_then(Value::as_str)).collect::<Vec<_>>().concat();
                if !refusal.is_empty() {
                    message.insert("refusal".into(), json!(refusal));
                }
            }
            _ => return Err(TranslateError::new("input", format!("{at}: a message needs a `content`"))),
        }
        self.push(Value::Object(message));
        Ok(())
    }

    /// A tool call joins the assistant message just before it, or starts one.
    fn tool_call(&mut self, call: Value) {
        if let Some(Value::Object(last)) = self.0.last_mut()
            && last.get("role").and_then(Value::as_str) == Some("assistant")
        {
            match last.get_mut("tool_calls") {
                Some(Value::Array(calls)) => calls.push(call),
                _ => {
                    last.insert("tool_calls".into(), json!([call]));
                }
            }
            return;
        }
        self.push(json!({"role": "assistant", "content": null, "tool_calls": [call]}));
    }
}

/// The texts of a message's content parts; a part that is not text (an image, a file, audio) is an error, a
/// `refusal` part is skipped where `refusals` allows it (the caller reads it).
fn texts<'a>(parts: &'a [Value], at: &str, refusals: bool) -> Result<Vec<&'a str>, TranslateError> {
    let mut texts = Vec::new();
    for (index, part) in parts.iter().enumerate() {
        match part.get("type").and_then(Value::as_str) {
            Some("input_text" | "output_text" | "text") => match part.get("text").and_then(Value::as_str) {
                Some(text) => texts.push(text),
                None => {
                    return Err(TranslateError::new("input", format!("{at}: content[{index}] has no `text`")));
                }
            },
            Some("refusal") if refusals => {}
            Some(other) => {
                return Err(TranslateError::new(
                    "input",
                    format!(
                        "{at}: content[{index}] of type `{other}` cannot be sent to an upstream that has only Chat Completions"
                    ),
                ));
            }
            None => return Err(TranslateError::new("input", format!("{at}: content[{index}] has no `type`"))),
        }
    }
    Ok(texts)
}

/// Function tools in chat's shape; any other tool type is an error.
fn chat_tools(tools: &Value) -> Result<Value, TranslateError> {
    let tools = tools.as_array().ok_or_else(|| TranslateError::new("tools", "`tools` must be a list"))?;
    let mut chat = Vec::with_capacity(tools.len());
    for (index, tool) in tools.iter().enumerate() {
        match tool.get("type").and_then(Value::as_str) {
            Some("function") => {
                let mut function = Map::new();
                for key in ["name", "description", "parameters", "strict"] {
                    copy(tool.as_object().unwrap_or(&Map::new()), key, key, &mut function);
                }
                if !function.contains_key("name") {
                    return Err(TranslateError::new("tools", format!("tools[{index}]: a function needs a `name`")));
                }
                chat.push(json!({"type": "function", "function": function}));
            }
            other => {
                return Err(TranslateError::new(
                    "tools",
                    format!(
                        "tools[{index}]: tools of type `{}` cannot be used with an upstream that has only Chat Completions",
                        other.unwrap_or("(none)")
                    ),
                ));
            }
        }
    }
    Ok(Value::Array(chat))
}

fn tool_choice(choice: &Value) -> Result<Value, TranslateError> {
    match choice {
        Value::String(mode) if matches!(mode.as_str(), "auto" | "none" | "required") => Ok(choice.clone()),
        Value::Object(object) if object.get("type").and_then(Value::as_str) == Some("function") => {
            match object.get("name").and_then(Value::as_str) {
                Some(name) => Ok(json!({"type": "function", "function": {"name": name}})),
                None => Err(TranslateError::new("tool_choice", "a function `tool_choice` needs a `name`")),
            }
        }
        _ => Err(TranslateError::new(
            "tool_choice",
            "only `auto`, `none`, `required` and a function can be chosen with an upstream that has only Chat Completions",
        )),
    }
}

/// `text.format` as chat's `response_format` (`None` for plain text).
fn response_format(format: &Value) -> Result<Option<Value>, TranslateError> {
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let mut schema = Map::new();
            for key in ["name", "description", "schema", "strict"] {
                copy(format.as_object().unwrap_or(&Map::new()), key, key, &mut schema);
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": schema})))
        }
        _ => Err(TranslateError::new("text", "`text.format` must be `text`, `json_object` or `json_schema`")),
    }
}
