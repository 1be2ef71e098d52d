//! Assembles the `chat.completion` object from `chat.completion.chunk` events, one chunk at a time.
//!
//! Each chunk costs work proportional to the chunk (strings are appended, never rebuilt); the whole object is
//! only serialised when someone reads the status document.

use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// What a received chunk turned out to be.
#[derive(Debug, PartialEq)]
pub enum ChunkKind {
    /// A completion chunk, merged into the body.
    Completion,
    /// `{"error": {...}}` sent inside the stream: the upstream gave up mid-way.
    Error(Value),
    /// Not JSON or not a chunk: kept as an event, ignored for the body.
    Other,
    /// A chunk with no choices that carries the usage (the last one of a stream asked for it with
    /// `stream_options.include_usage`): merged into the body.
    UsageOnly,
}

#[derive(Debug, Default, Clone)]
pub struct Assembler {
    id: Option<String>,
    created: Option<i64>,
    model: Option<String>,
    system_fingerprint: Option<Box<RawValue>>,
    service_tier: Option<Box<RawValue>>,
    /// Ordered by first appearance; `n` is small, so lookup by index is a short scan.
    choices: Vec<Choice>,
    usage: Option<Value>,
}

#[derive(Debug, Default, Clone)]
struct Choice {
    index: u64,
    role: Option<String>,
    content: Option<String>,
    refusal: Option<Option<String>>,
    tool_calls: Vec<ToolCall>,
    function_call: Option<FunctionCall>,
    logprobs: Option<Logprobs>,
    finish_reason: Option<Value>,
}

#[derive(Debug, Default, Clone)]
struct ToolCall {
    index: u64,
    id: Option<String>,
    kind: Option<String>,
    function: FunctionCall,
}

#[derive(Debug, Default, Clone, Serialize)]
struct FunctionCall {
    name: String,
    arguments: String,
}

#[derive(Debug, Default, Clone, Serialize)]
struct Logprobs {
    content: Option<Vec<Value>>,
    refusal: Option<Vec<Value>>,
}

#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(borrow, default)]
    id: Option<Text<'a>>,
    #[serde(default)]
    created: Option<i64>,
    #[serde(borrow, default)]
    model: Option<Text<'a>>,
    #[serde(borrow, default)]
    system_fingerprint: Option<&'a RawValue>,
    #[serde(borrow, default)]
    service_tier: Option<&'a RawValue>,
    #[serde(borrow, default)]
    choices: Option<Vec<ChunkChoice<'a>>>,
    #[serde(default)]
    usage: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct ChunkChoice<'a> {
    #[serde(default)]
    index: u64,
    #[serde(borrow, default)]
    delta: Option<Delta<'a>>,
    #[serde(default)]
    finish_reason: Option<Value>,
    #[serde(default)]
    logprobs: Option<LogprobsDelta>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow, default)]
    role: Option<Text<'a>>,
    #[serde(borrow, default)]
    content: Option<Text<'a>>,
    #[serde(borrow, default, deserialize_with = "present")]
    refusal: Option<Option<Text<'a>>>,
    #[serde(borrow, default)]
    tool_calls: Option<Vec<ToolCallDelta<'a>>>,
    #[serde(borrow, default)]
    function_call: Option<FunctionDelta<'a>>,
}

#[derive(Deserialize)]
struct ToolCallDelta<'a> {
    #[serde(default)]
    index: u64,
    #[serde(borrow, default)]
    id: Option<Text<'a>>,
    #[serde(borrow, default, rename = "type")]
    kind: Option<Text<'a>>,
    #[serde(borrow, default)]
    function: Option<FunctionDelta<'a>>,
}

#[derive(Deserialize)]
struct FunctionDelta<'a> {
    #[serde(borrow, default)]
    name: Option<Text<'a>>,
    #[serde(borrow, default)]
    arguments: Option<Text<'a>>,
}

#[derive(Deserialize)]
struct LogprobsDelta {
    #[serde(default)]
    content: Option<Vec<Value>>,
    #[serde(default)]
    refusal: Option<Vec<Value>>,
}

/// Distinguishes a field that is present with `null` (`Some(None)`) from an absent one (`None`).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// A string of a chunk, borrowed from the chunk's text unless it has escapes. (`Option<Cow<str>>` would always
/// copy: serde borrows a `Cow` only when it is the field's whole type; the newtype makes it so.)
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

impl Text<'_> {
    fn into_owned(self) -> String {
        self.0.into_owned()
    }
}

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// The last non-null value of a field every chunk repeats, copied only when it changes.
fn keep_last(slot: &mut Option<Box<RawValue>>, value: Option<&RawValue>) {
    if let Some(value) = value.filter(|v| v.get() != "null")
        && slot.as_deref().map(RawValue::get) != Some(value.get())
    {
        *slot = Some(value.to_owned());
    }
}

fn append(slot: &mut Option<String>, piece: &str) {
    slot.get_or_insert_with(String::new).push_str(piece);
}

impl Assembler {
    /// The tokens the stream's usage chunk reported, if one came.
    pub fn tokens(&self) -> Option<super::usage::Tokens> {
        super::usage::Tokens::of_usage(self.model.as_deref(), self.usage.as_ref()?)
    }

    /// Merges one chunk (the `data` of one event, exactly as received).
    pub fn apply(&mut self, data: &str) -> ChunkKind {
        let Ok(chunk) = serde_json::from_str::<Chunk<'_>>(data) else {
            return ChunkKind::Other;
        };
        if let Some(error) = chunk.error
            && !error.is_null()
        {
            return ChunkKind::Error(error);
        }
        let Some(choices) = chunk.choices else {
            return ChunkKind::Other;
        };
        if self.id.is_none() {
            self.id = chunk.id.map(Text::into_owned);
        }
        if self.created.is_none() {
            self.created = chunk.created;
        }
        if self.model.is_none() {
            self.model = chunk.model.map(Text::into_owned);
        }
        keep_last(&mut self.system_fingerprint, chunk.system_fingerprint);
        keep_last(&mut self.service_tier, chunk.service_tier);
        let usage_only = choices.is_empty() && chunk.usage.as_ref().is_some_and(|v| !v.is_null());
        if let Some(usage) = chunk.usage.filter(|v| !v.is_null()) {
            self.usage = Some(usage);
        }
        if usage_only {
            return ChunkKind::UsageOnly;
        }
        for c in choices {
            let choice = self.choice(c.index);
            if let Some(delta) = c.delta {
                choice.merge(delta);
            }
            if let Some(lp) = c.logprobs {
                let into = choice.logprobs.get_or_insert_with(Logprobs::default);
                for (from, to) in [(lp.content, &mut into.content), (lp.refusal, &mut into.refusal)] {
                    if let Some(items) = from {
                        to.get_or_insert_with(Vec::new).extend(items);
                    }
                }
            }
            if let Some(reason) = c.finish_reason.filter(|v| !v.is_null()) {
                choice.finish_reason = Some(reason);
            }
        }
        ChunkKind::Completion
    }

    fn choice(&mut self, index: u64) -> &mut Choice {
        let pos = match self.choices.iter().position(|c| c.index == index) {
            Some(pos) => pos,
            None => {
                self.choices.push(Choice { index, ..Choice::default() });
                self.choices.len() - 1
            }
        };
        &mut self.choices[pos]
    }

    /// Whether every choice seen so far has a finish reason (a stream that ends without `[DONE]` but with this
    /// is complete).
    pub fn is_complete(&self) -> bool {
        !self.choices.is_empty() && self.choices.iter().all(|c| c.finish_reason.is_some())
    }
}

impl Choice {
    fn merge(&mut self, delta: Delta<'_>) {
        if let Some(role) = delta.role {
            self.role = Some(role.into_owned());
        }
        if let Some(content) = delta.content {
            append(&mut self.content, &content);
        }
        match delta.refusal {
            Some(Some(text)) => append(self.refusal.get_or_insert(None), &text),
            Some(None) => {
                self.refusal.get_or_insert(None);
            }
            None => {}
        }
        if let Some(f) = delta.function_call {
            let into = self.function_call.get_or_insert_with(FunctionCall::default);
            into.merge(f);
        }
        for t in delta.tool_calls.into_iter().flatten() {
            let pos = match self.tool_calls.iter().position(|c| c.index == t.index) {
                Some(pos) => pos,
                None => {
                    self.tool_calls.push(ToolCall { index: t.index, ..ToolCall::default() });
                    self.tool_calls.len() - 1
                }
            };
            let call = &mut self.tool_calls[pos];
            if let Some(id) = t.id {
                call.id = Some(id.into_owned());
            }
            if let Some(kind) = t.kind {
                call.kind = Some(kind.into_owned());
            }
            if let Some(f) = t.function {
                call.function.merge(f);
            }
        }
    }
}

impl FunctionCall {
    fn merge(&mut self, delta: FunctionDelta<'_>) {
        if let Some(name) = delta.name {
            self.name.push_str(&name);
        }
        if let Some(arguments) = delta.arguments {
            self.arguments.push_str(&arguments);
        }
    }
}

struct ToolCalls<'a>(&'a [ToolCall]);

impl Serialize for ToolCalls<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|call| {
            serde_json::json!({
                "index": call.index,
                "id": call.id,
                "type": call.kind.as_deref().unwrap_or("function"),
                "function": call.function,
            })
        }))
    }
}

impl Serialize for Assembler {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("id", &self.id)?;
        map.serialize_entry("object", "chat.completion")?;
        map.serialize_entry("created", &self.created)?;
        map.serialize_entry("model", &self.model)?;
        if let Some(fp) = &self.system_fingerprint {
            map.serialize_entry("system_fingerprint", fp)?;
        }
        map.serialize_entry("choices", &ChoicesView(&self.choices))?;
        if let Some(usage) = &self.usage {
            map.serialize_entry("usage", usage)?;
        }
        if let Some(tier) = &self.service_tier {
            map.serialize_entry("service_tier", tier)?;
        }
        map.end()
    }
}

struct ChoicesView<'a>(&'a [Choice]);

impl Serialize for ChoicesView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut sorted: Vec<&Choice> = self.0.iter().collect();
        sorted.sort_by_key(|c| c.index);
        s.collect_seq(sorted.into_iter().map(ChoiceView))
    }
}

struct ChoiceView<'a>(&'a Choice);

impl Serialize for ChoiceView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let c = self.0;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("index", &c.index)?;
        map.serialize_entry("message", &MessageView(c))?;
        map.serialize_entry("logprobs", &c.logprobs)?;
        map.serialize_entry("finish_reason", &c.finish_reason)?;
        map.end()
    }
}

struct MessageView<'a>(&'a Choice);

impl Serialize for MessageView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let c = self.0;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("role", c.role.as_deref().unwrap_or("assistant"))?;
        map.serialize_entry("content", &c.content)?;
        if let Some(refusal) = &c.refusal {
            map.serialize_entry("refusal", refusal)?;
        }
        if !c.tool_calls.is_empty() {
            map.serialize_entry("tool_calls", &ToolCalls(&c.tool_calls))?;
        }
        if let Some(f) = &c.function_call {
            map.serialize_entry("function_call", f)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn assemble(chunks: &[Value]) -> Value {
        let mut a = Assembler::default();
        for c in chunks {
            let usage_only = c["choices"].as_array().is_some_and(Vec::is_empty) && c["usage"].is_object();
            let expected = if usage_only { ChunkKind::UsageOnly } else { ChunkKind::Completion };
            assert_eq!(a.apply(&c.to_string()), expected, "{c}");
        }
        serde_json::to_value(&a).unwrap()
    }

    fn chunk(choices: Value) -> Value {
        json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
               "system_fingerprint": "fp_1", "choices": choices})
    }

    #[test]
    fn content_is_concatenated_and_finish_reason_kept() {
        let body = assemble(&[
            chunk(json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}])),
            chunk(json!([{"index": 0, "delta": {"content": "Hel"}, "finish_reason": null}])),
            chunk(json!([{"index": 0, "delta": {"content": "lo"}, "finish_reason": null}])),
            chunk(json!([{"index": 0, "delta": {}, "finish_reason": "stop"}])),
            json!({"id": "chatcmpl-1", "choices": [], "usage": {"total_tokens": 3}}),
        ]);
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["id"], "chatcmpl-1");
        assert_eq!(body["system_fingerprint"], "fp_1");
        assert_eq!(body["choices"][0]["message"], json!({"role": "assistant", "content": "Hello"}));
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(body["usage"]["total_tokens"], 3);
    }

    #[test]
    fn choices_of_n_greater_than_one_are_kept_apart() {
        let body = assemble(&[
            chunk(json!([{"index": 1, "delta": {"content": "b"}}])),
            chunk(json!([{"index": 0, "delta": {"content": "a"}}])),
            chunk(json!([{"index": 1, "delta": {"content": "B"}, "finish_reason": "length"}])),
        ]);
        assert_eq!(body["choices"][0]["message"]["content"], "a");
        assert_eq!(body["choices"][1]["message"]["content"], "bB");
        assert_eq!(body["choices"][1]["finish_reason"], "length");
    }

    #[test]
    fn tool_calls_are_merged_by_index() {
        let body = assemble(&[
            chunk(json!([{"index": 0, "delta": {"role": "assistant", "content": null, "tool_calls": [
                {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get", "arguments": ""}}]}}])),
            chunk(json!([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"q\":"}}]}}])),
            chunk(json!([{"index": 0, "delta": {"tool_calls": [
                {"index": 1, "id": "call_b", "type": "function", "function": {"name": "put", "arguments": "{}"}}]}}])),
            chunk(json!([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}}])),
            chunk(json!([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}])),
        ]);
        let calls = &body["choices"][0]["message"]["tool_calls"];
        assert_eq!(body["choices"][0]["message"]["content"], Value::Null);
        assert_eq!(calls[0]["id"], "call_a");
        assert_eq!(calls[0]["function"]["arguments"], "{\"q\":1}");
        assert_eq!(calls[1]["function"]["name"], "put");
    }

    #[test]
    fn refusal_and_logprobs_are_merged() {
        let body = assemble(&[
            chunk(json!([{"index": 0, "delta": {"refusal": null}}])),
            chunk(json!([{"index": 0, "delta": {"refusal": "No"}, "logprobs": {"content": [{"token": "a"}]}}])),
            chunk(json!([{"index": 0, "delta": {"refusal": "pe"}, "logprobs": {"content": [{"token": "b"}]}}])),
        ]);
        assert_eq!(body["choices"][0]["message"]["refusal"], "Nope");
        assert_eq!(body["choices"][0]["logprobs"]["content"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn an_error_inside_the_stream_is_recognised() {
        let mut a = Assembler::default();
        assert!(matches!(a.apply(r#"{"error":{"message":"overloaded"}}"#), ChunkKind::Error(_)));
        assert_eq!(a.apply("not json"), ChunkKind::Other);
    }
}
