//! Chat Completions chunks as a Responses event stream.
//!
//! The stream: `response.created` (the base's status: `queued` or `in_progress`) and `response.in_progress`; then,
//! as chunks come, output items and their deltas; then the `*.done` events of everything still open, and the
//! terminal event. Only choice 0 is read (a Responses request has no `n`).
//!
//! Items, in the order chat sends their first delta, numbered by `output_index` from 0:
//! - text (`delta.content`) goes to an open `message` item, opened at its first non-empty delta with an
//!   `output_text` part; a `delta.refusal` closes the text part and opens a `refusal` part, and back;
//! - each tool call (told apart by its chat `index`) is a `function_call` item, opened at its first delta; opening
//!   one closes the open message (text after a tool call opens a new message item), while function call items
//!   stay open until [`ChatToResponses::finish`], so that a provider that interleaves the argument deltas of
//!   parallel calls loses nothing. A tool call's name and id are taken from its first delta that has one (later
//!   ones, which some providers repeat whole, are ignored); with no id at all, `call_<response>_<index>`.
//!
//! Ids are derived from the response id (`resp_X`): item `n` is `msg_X_n` or `fc_X_n`. No clock and no
//! randomness: the same chunks give the same bytes.
//!
//! The end ([`End`]): `Completed` is `response.completed`, unless the chat stream's `finish_reason` was `length`
//! or `content_filter`, which make it `response.incomplete` with `incomplete_details.reason` `max_output_tokens`
//! or `content_filter` (as `End::Incomplete` does). `Failed` is `response.failed` with `error: {code, message}`.
//! `Cancelled` closes what is open and sends no terminal event: the SDK's event union has no `response.cancelled`,
//! so the caller ends the stream there; the response object has `status: cancelled`. Items closed by anything but
//! completion have `status: incomplete`. A completed stream with no output at all gets one empty message, as
//! OpenAI answers. `usage` comes from the chunk that carries it (null if none did), shown from the terminal event
//! on (a cancelled response has none: no event would carry it).

use super::usage;
use serde_json::{Map, Value, json};
use std::cell::OnceCell;

/// How a response ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    Completed,
    /// `max_output_tokens` or `content_filter`.
    Incomplete {
        reason: &'static str,
    },
    Failed {
        code: String,
        message: String,
    },
    Cancelled,
}

#[derive(Clone)]
struct Part {
    refusal: bool,
    text: String,
    open: bool,
}

#[derive(Clone)]
enum Body {
    Message { parts: Vec<Part> },
    Call { key: u64, call_id: String, name: String, arguments: String },
}

#[derive(Clone)]
struct Item {
    id: String,
    body: Body,
    /// `in_progress` while open, then `completed` or `incomplete`.
    status: &'static str,
}

/// Turns the chunks of one chat stream into the events of one response, and keeps the response object.
#[derive(Clone)]
pub struct ChatToResponses {
    base: Value,
    suffix: String,
    status: &'static str,
    items: Vec<Item>,
    /// The output index of the open message item.
    message: Option<usize>,
    sequence: u64,
    finish_reason: Option<String>,
    usage: Option<Value>,
    completed_at: Option<i64>,
    end: Option<End>,
    rendered: OnceCell<Value>,
}

impl ChatToResponses {
    /// `base`: the response object as first shown (see [`super::response_skeleton`]); its `id` names the items.
    pub fn new(base: Value) -> Self {
        let id = base.get("id").and_then(Value::as_str).unwrap_or("");
        let suffix = id.strip_prefix("resp_").unwrap_or(id).to_owned();
        let status = match base.get("status").and_then(Value::as_str) {
            Some("in_progress") => "in_progress",
            _ => "queued",
        };
        Self {
            base,
            suffix,
            status,
            items: Vec::new(),
            message: None,
            sequence: 0,
            finish_reason: None,
            usage: None,
            completed_at: None,
            end: None,
            rendered: OnceCell::new(),
        }
    }

    /// `response.created` and `response.in_progress` (status `in_progress` from then on).
    pub fn start(&mut self) -> Vec<Value> {
        let created = self.response_event("response.created");
        self.status = "in_progress";
        self.rendered = OnceCell::new();
        vec![created, self.response_event("response.in_progress")]
    }

    /// The time the response completed (Unix seconds), shown as `completed_at` once it has.
    pub fn completed_at(&mut self, at: i64) {
        self.completed_at = Some(at);
        self.rendered = OnceCell::new();
    }

    /// The events of one parsed `chat.completion.chunk`; its `finish_reason` and `usage` are kept for the end.
    pub fn chunk(&mut self, chunk: &Value) -> Vec<Value> {
        let mut events = Vec::new();
        if self.end.is_some() {
            return events;
        }
        self.rendered = OnceCell::new();
        if let Some(chat_usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(usage(chat_usage));
        }
        let choices = chunk.get("choices").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        for choice in choices.iter().filter(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0) {
            let delta = choice.get("delta").unwrap_or(&Value::Null);
            for (key, refusal) in [("content", false), ("refusal", true)] {
                if let Some(text) = delta.get(key).and_then(Value::as_str).filter(|t| !t.is_empty()) {
                    self.text(refusal, text, &mut events);
                }
            }
            for call in delta.get("tool_calls").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default() {
                self.tool_call(call, &mut events);
            }
            if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                self.finish_reason = Some(reason.to_owned());
            }
        }
        events
    }

    /// Closes every open part and item and ends with the terminal event for `end` (none for `Cancelled`).
    /// Nothing after the first call.
    pub fn finish(&mut self, end: End) -> Vec<Value> {
        let mut events = Vec::new();
        if self.end.is_some() {
            return events;
        }
        self.rendered = OnceCell::new();
        let end = match (end, self.finish_reason.as_deref()) {
            (End::Completed, Some("length")) => End::Incomplete { reason: "max_output_tokens" },
            (End::Completed, Some("content_filter")) => End::Incomplete { reason: "content_filter" },
            (end, _) => end,
        };
        if end == End::Completed && self.items.is_empty() {
            let index = self.open_message(&mut events);
            self.open_part(index, false, &mut events);
        }
        let status = if end == End::Completed { "completed" } else { "incomplete" };
        for index in 0..self.items.len() {
            self.close_item(index, status, &mut events);
        }
        let terminal = match &end {
            End::Completed => Some(("completed", "response.completed")),
            End::Incomplete { .. } => Some(("incomplete", "response.incomplete")),
            End::Failed { .. } => Some(("failed", "response.failed")),
            End::Cancelled => None,
        };
        self.status = terminal.map_or("cancelled", |(status, _)| status);
        self.end = Some(end);
        if let Some((_, kind)) = terminal {
            events.push(self.response_event(kind));
        }
        events
    }

    /// The response object as it stands: while it runs, for polling, and at the end, the final body.
    pub fn response(&self) -> &Value {
        self.rendered.get_or_init(|| self.render())
    }

    /// The sequence number the next event will have (the number of events so far).
    pub fn next_sequence_number(&self) -> u64 {
        self.sequence
    }

    fn text(&mut self, refusal: bool, delta: &str, events: &mut Vec<Value>) {
        let index = match self.message {
            Some(index) => index,
            None => self.open_message(events),
        };
        let part = match self.items.get(index).map(|item| &item.body) {
            Some(Body::Message { parts }) => match parts.last() {
                Some(last) if last.open && last.refusal == refusal => parts.len() - 1,
                _ => {
                    self.close_part(index, events);
                    self.open_part(index, refusal, events)
                }
            },
            _ => return,
        };
        if let Some(Body::Message { parts }) = self.items.get_mut(index).map(|item| &mut item.body)
            && let Some(part) = parts.get_mut(part)
        {
            part.text.push_str(delta);
        }
        let item_id = self.item_id(index);
        let event = if refusal {
            json!({"item_id": item_id, "output_index": index, "content_index": part, "delta": delta})
        } else {
            json!({"item_id": item_id, "output_index": index, "content_index": part, "delta": delta, "logprobs": []})
        };
        events.push(self.event(if refusal { "response.refusal.delta" } else { "response.output_text.delta" }, event));
    }

    fn tool_call(&mut self, call: &Value, events: &mut Vec<Value>) {
        let id = call.get("id").and_then(Value::as_str).filter(|id| !id.is_empty());
        let name = call.pointer("/function/name").and_then(Value::as_str).filter(|n| !n.is_empty());
        let calls = || {
            self.items.iter().enumerate().filter_map(|(i, item)| match &item.body {
                Body::Call { key, call_id, .. } => Some((i, *key, call_id.as_str())),
                Body::Message { .. } => None,
            })
        };
        // The chat index tells calls apart; without one, a new id is a new call, and no id the latest call.
        let key = match call.get("index").and_then(Value::as_u64) {
            Some(key) => key,
            None => match id {
                Some(id) => match calls().find(|(_, _, call_id)| *call_id == id) {
                    Some((_, key, _)) => key,
                    None => u64::MAX - calls().count() as u64,
                },
                None => calls().next_back().map_or(0, |(_, key, _)| key),
            },
        };
        let found = calls().find(|(_, k, _)| *k == key).map(|(index, _, _)| index);
        let index = match found {
            Some(index) => index,
            None => {
                if let Some(message) = self.message.take() {
                    self.close_item(message, "completed", events);
                }
                let index = self.items.len();
                self.items.push(Item {
                    id: format!("fc_{}_{index}", self.suffix),
                    body: Body::Call {
                        key,
                        call_id: id.map_or_else(|| format!("call_{}_{index}", self.suffix), str::to_owned),
                        name: name.unwrap_or("").to_owned(),
                        arguments: String::new(),
                    },
                    status: "in_progress",
                });
                let added = json!({"output_index": index, "item": self.item(index)});
                events.push(self.event("response.output_item.added", added));
                index
            }
        };
        let arguments = call.pointer("/function/arguments").and_then(Value::as_str).unwrap_or("");
        if let Some(Body::Call { name: known, arguments: all, .. }) = self.items.get_mut(index).map(|i| &mut i.body) {
            if known.is_empty() {
                *known = name.unwrap_or("").to_owned();
            }
            all.push_str(arguments);
        }
        if !arguments.is_empty() {
            let delta = json!({"item_id": self.item_id(index), "output_index": index, "delta": arguments});
            events.push(self.event("response.function_call_arguments.delta", delta));
        }
    }

    fn open_message(&mut self, events: &mut Vec<Value>) -> usize {
        let index = self.items.len();
        let id = format!("msg_{}_{index}", self.suffix);
        self.items.push(Item { id, body: Body::Message { parts: Vec::new() }, status: "in_progress" });
        self.message = Some(index);
        let added = json!({"output_index": index, "item": self.item(index)});
        events.push(self.event("response.output_item.added", added));
        index
    }

    /// Opens a part in message `index`, answering its content index.
    fn open_part(&mut self, index: usize, refusal: bool, events: &mut Vec<Value>) -> usize {
        let Some(Body::Message { parts }) = self.items.get_mut(index).map(|item| &mut item.body) else {
            return 0;
        };
        parts.push(Part { refusal, text: String::new(), open: true });
        let content_index = parts.len() - 1;
        let part = render_part(refusal, "");
        let added = json!({"item_id": self.item_id(index), "output_index": index, "content_index": content_index,
            "part": part});
        events.push(self.event("response.content_part.added", added));
        content_index
    }

    /// Closes the open part of message `index`, if it has one.
    fn close_part(&mut self, index: usize, events: &mut Vec<Value>) {
        let Some(Body::Message { parts }) = self.items.get_mut(index).map(|item| &mut item.body) else { return };
        let Some((content_index, part)) = parts.iter_mut().enumerate().last().filter(|(_, p)| p.open) else {
            return;
        };
        part.open = false;
        let (refusal, text) = (part.refusal, part.text.clone());
        let item_id = self.item_id(index);
        let done = if refusal {
            let done = json!({"item_id": item_id, "output_index": index, "content_index": content_index,
                "refusal": text});
            self.event("response.refusal.done", done)
        } else {
            let done = json!({"item_id": item_id, "output_index": index, "content_index": content_index,
                "text": text, "logprobs": []});
            self.event("response.output_text.done", done)
        };
        events.push(done);
        let part = render_part(refusal, &text);
        let done = json!({"item_id": item_id, "output_index": index, "content_index": content_index, "part": part});
        events.push(self.event("response.content_part.done", done));
    }

    /// Closes item `index` (its open part, or its arguments) with `status`, if it is open.
    fn close_item(&mut self, index: usize, status: &'static str, events: &mut Vec<Value>) {
        if self.items.get(index).is_none_or(|item| item.status != "in_progress") {
            return;
        }
        if self.message == Some(index) {
            self.message = None;
        }
        self.close_part(index, events);
        if let Some(Body::Call { arguments, name, .. }) = self.items.get(index).map(|item| &item.body) {
            let done = json!({"item_id": self.item_id(index), "output_index": index, "name": name,
                "arguments": arguments});
            events.push(self.event("response.function_call_arguments.done", done));
        }
        if let Some(item) = self.items.get_mut(index) {
            item.status = status;
        }
        let done = json!({"output_index": index, "item": self.item(index)});
        events.push(self.event("response.output_item.done", done));
    }

    fn item_id(&self, index: usize) -> String {
        self.items.get(index).map(|item| item.id.clone()).unwrap_or_default()
    }

    /// Output item `index` as it stands.
    fn item(&self, index: usize) -> Value {
        let Some(item) = self.items.get(index) else { return Value::Null };
        match &item.body {
            Body::Message { parts } => {
                let content: Vec<Value> = parts.iter().map(|p| render_part(p.refusal, &p.text)).collect();
                json!({"id": item.id, "type": "message", "status": item.status, "content": content,
                    "role": "assistant"})
            }
            Body::Call { call_id, name, arguments, .. } => json!({"id": item.id, "type": "function_call",
                "status": item.status, "arguments": arguments, "call_id": call_id, "name": name}),
        }
    }

    fn event(&mut self, kind: &str, fields: Value) -> Value {
        let mut event = Map::new();
        event.insert("type".into(), json!(kind));
        event.insert("sequence_number".into(), json!(self.sequence));
        self.sequence += 1;
        if let Value::Object(fields) = fields {
            event.extend(fields);
        }
        Value::Object(event)
    }

    fn response_event(&mut self, kind: &str) -> Value {
        let response = self.render();
        self.event(kind, json!({"response": response}))
    }

    fn render(&self) -> Value {
        let mut response = match &self.base {
            Value::Object(base) => base.clone(),
            _ => Map::new(),
        };
        response.insert("status".into(), json!(self.status));
        let (error, incomplete) = match &self.end {
            Some(End::Failed { code, message }) => (json!({"code": code, "message": message}), Value::Null),
            Some(End::Incomplete { reason }) => (Value::Null, json!({"reason": reason})),
            _ => (Value::Null, Value::Null),
        };
        response.insert("error".into(), error);
        response.insert("incomplete_details".into(), incomplete);
        let output: Vec<Value> = (0..self.items.len()).map(|index| self.item(index)).collect();
        response.insert("output".into(), Value::Array(output));
        if self.end.as_ref().is_some_and(|end| *end != End::Cancelled) {
            response.insert("usage".into(), self.usage.clone().unwrap_or(Value::Null));
        }
        if let (Some(End::Completed), Some(at)) = (&self.end, self.completed_at) {
            response.insert("completed_at".into(), json!(at));
        }
        Value::Object(response)
    }
}

fn render_part(refusal: bool, text: &str) -> Value {
    if refusal {
        json!({"type": "refusal", "refusal": text})
    } else {
        json!({"type": "output_text", "annotations": [], "logprobs": [], "text": text})
    }
}
