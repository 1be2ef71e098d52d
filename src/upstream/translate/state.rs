//! The response object kept current from its event stream, whichever upstream made it: one that has the
//! Responses API sends the events itself, [`super::ChatToResponses`] makes them from chat chunks.
//!
//! `response.created`, `response.queued`, `response.in_progress` and the terminal events (`response.completed`,
//! `response.failed`, `response.incomplete`) replace the object with theirs; `response.output_item.added` / `.done`
//! set an output item; `response.content_part.added` / `.done` set a part; `response.output_text.delta`,
//! `response.refusal.delta` and `response.function_call_arguments.delta` append to the text, refusal or
//! arguments, and their `.done` events set them whole. Other events (reasoning summaries, built-in tools) change
//! nothing here: their items are set whole by `response.output_item.done`. Events are applied as given: a caller
//! that rewrites ids (the upstream's response id for its own) does so before.
//!
//! [`ResponseState::end`] ends a stream the upstream did not end (a cancel, a failure, a restart after a crash):
//! the `.done` events of what is still open, then the terminal event, numbered after the last event seen.

use super::End;
use serde_json::{Value, json};

#[derive(Clone)]
pub struct ResponseState {
    response: Value,
    /// When the response completed (Unix seconds), shown as `completed_at` by a `Completed` end.
    completed_at: Option<i64>,
    next_sequence: u64,
    /// Items added and not yet done, by output index.
    open_items: Vec<usize>,
    /// Parts added and not yet done: (output index, content index).
    open_parts: Vec<(usize, usize)>,
    ended: bool,
}

impl ResponseState {
    /// `base`: the response object before any event (what a poll shows until `response.created`).
    pub fn new(base: Value) -> Self {
        Self {
            response: base,
            completed_at: None,
            next_sequence: 0,
            open_items: Vec::new(),
            open_parts: Vec::new(),
            ended: false,
        }
    }

    /// `response.created` (the object as it stands: `queued` or `in_progress`) and `response.in_progress`: the
    /// start of a stream this server numbers itself.
    pub fn start(&mut self) -> Vec<Value> {
        let created = self.emit("response.created", json!({"response": self.response.clone()}));
        let mut response = self.response.clone();
        response["status"] = json!("in_progress");
        let in_progress = self.emit("response.in_progress", json!({"response": response}));
        vec![created, in_progress]
    }

    /// The time the response completed (Unix seconds), shown as `completed_at` if [`Self::end`] completes it.
    pub fn completed_at(&mut self, at: i64) {
        self.completed_at = Some(at);
    }

    /// The response object as it stands.
    pub fn response(&self) -> &Value {
        &self.response
    }

    /// The sequence number after the last event applied (0 before any).
    pub fn next_sequence_number(&self) -> u64 {
        self.next_sequence
    }

    /// Whether a terminal event was applied or [`Self::end`] was called.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// Applies one event of the stream.
    pub fn apply(&mut self, event: &Value) {
        if let Some(sequence) = event.get("sequence_number").and_then(Value::as_u64) {
            self.next_sequence = self.next_sequence.max(sequence + 1);
        }
        let index = |key: &str| event.get(key).and_then(Value::as_u64).map(|i| i as usize);
        let (output, content) = (index("output_index"), index("content_index"));
        let text = |key: &str| event.get(key).and_then(Value::as_str).unwrap_or("");
        match event.get("type").and_then(Value::as_str).unwrap_or("") {
            kind @ ("response.created"
            | "response.queued"
            | "response.in_progress"
            | "response.completed"
            | "response.failed"
            | "response.incomplete") => {
                if let Some(response) = event.get("response").filter(|r| r.is_object()) {
                    self.response = response.clone();
                }
                if matches!(kind, "response.completed" | "response.failed" | "response.incomplete") {
                    self.ended = true;
                    self.open_items.clear();
                    self.open_parts.clear();
                }
            }
            "response.output_item.added" | "response.output_item.done" => {
                let (Some(output), Some(item)) = (output, event.get("item")) else { return };
                if let Some(Value::Array(items)) = self.response.get_mut("output") {
                    set(items, output, item.clone());
                }
                self.open_items.retain(|open| *open != output);
                self.open_parts.retain(|(open, _)| *open != output);
                if event.get("type").and_then(Value::as_str) == Some("response.output_item.added") {
                    self.open_items.push(output);
                }
            }
            "response.content_part.added" | "response.content_part.done" => {
                let (Some(output), Some(content), Some(part)) = (output, content, event.get("part")) else { return };
                if let Some(Value::Array(parts)) = self.item(output).and_then(|item| item.get_mut("content")) {
                    set(parts, content, part.clone());
                }
                self.open_parts.retain(|open| *open != (output, content));
                if event.get("type").and_then(Value::as_str) == Some("response.content_part.added") {
                    self.open_parts.push((output, content));
                }
            }
            "response.output_text.delta" => self.append(output, content, "text", text("delta")),
            "response.refusal.delta" => self.append(output, content, "refusal", text("delta")),
            "response.output_text.done" => self.replace(output, content, "text", text("text")),
            "response.refusal.done" => self.replace(output, content, "refusal", text("refusal")),
            "response.function_call_arguments.delta" => self.append(output, None, "arguments", text("delta")),
            "response.function_call_arguments.done" => self.replace(output, None, "arguments", text("arguments")),
            _ => {}
        }
    }

    /// Ends the stream with `end`: the `.done` events of every part and item still open (items `incomplete`
    /// unless `end` is `Completed`), then the terminal event (none for `Cancelled`, which has no stream event;
    /// the object's status becomes `cancelled`). The events are applied too. Nothing once ended.
    pub fn end(&mut self, end: End) -> Vec<Value> {
        let mut events = Vec::new();
        if self.ended {
            return events;
        }
        let status = if end == End::Completed { "completed" } else { "incomplete" };
        for output in self.open_items.clone() {
            let Some(item) = self.item(output).map(|item| item.clone()) else { continue };
            let item_id = item.get("id").cloned().unwrap_or(Value::Null);
            for (_, content) in self.open_parts.clone().into_iter().filter(|(open, _)| *open == output) {
                let Some(part) = item.pointer(&format!("/content/{content}")).cloned() else { continue };
                let at = json!({"item_id": item_id, "output_index": output, "content_index": content});
                let done = match part.get("type").and_then(Value::as_str) {
                    Some("output_text") => Some(("response.output_text.done", "text", json!([]))),
                    Some("refusal") => Some(("response.refusal.done", "refusal", Value::Null)),
                    _ => None,
                };
                if let Some((kind, key, logprobs)) = done {
                    let mut fields = at.clone();
                    fields[key] = part.get(key).cloned().unwrap_or(json!(""));
                    if !logprobs.is_null() {
                        fields["logprobs"] = logprobs;
                    }
                    events.push(self.emit(kind, fields));
                }
                let mut fields = at;
                fields["part"] = part;
                events.push(self.emit("response.content_part.done", fields));
            }
            if item.get("type").and_then(Value::as_str) == Some("function_call") {
                let done = json!({"item_id": item_id, "output_index": output, "name": item.get("name"),
                    "arguments": item.get("arguments")});
                events.push(self.emit("response.function_call_arguments.done", done));
            }
            let mut item = self.item(output).map(|item| item.clone()).unwrap_or(item);
            if item.get("status").is_some() {
                item["status"] = json!(status);
            }
            events.push(self.emit("response.output_item.done", json!({"output_index": output, "item": item})));
        }
        let mut response = self.response.clone();
        let (terminal, status) = match &end {
            End::Completed => (Some("response.completed"), "completed"),
            End::Incomplete { .. } => (Some("response.incomplete"), "incomplete"),
            End::Failed { .. } => (Some("response.failed"), "failed"),
            End::Cancelled => (None, "cancelled"),
        };
        if let Value::Object(fields) = &mut response {
            fields.insert("status".into(), json!(status));
            if let End::Failed { code, message } = &end {
                fields.insert("error".into(), json!({"code": code, "message": message}));
            }
            if let End::Incomplete { reason } = &end {
                fields.insert("incomplete_details".into(), json!({"reason": reason}));
            }
            if let (End::Completed, Some(at)) = (&end, self.completed_at) {
                fields.insert("completed_at".into(), json!(at));
            }
        }
        match terminal {
            Some(kind) => events.push(self.emit(kind, json!({"response": response}))),
            None => self.response = response,
        }
        self.ended = true;
        events
    }

    /// Numbers an event, applies it and answers it.
    fn emit(&mut self, kind: &str, fields: Value) -> Value {
        let mut event = serde_json::Map::new();
        event.insert("type".into(), json!(kind));
        event.insert("sequence_number".into(), json!(self.next_sequence));
        if let Value::Object(fields) = fields {
            event.extend(fields);
        }
        let event = Value::Object(event);
        self.apply(&event);
        event
    }

    fn item(&mut self, output: usize) -> Option<&mut Value> {
        self.response.get_mut("output").and_then(|items| items.get_mut(output))
    }

    /// The field `key` of output item `output` (of its part `content` if given).
    fn field(&mut self, output: Option<usize>, content: Option<usize>, key: &str) -> Option<&mut Value> {
        let item = self.item(output?)?;
        let target = match content {
            Some(content) => item.get_mut("content")?.get_mut(content)?,
            None => item,
        };
        target.as_object_mut().map(|target| target.entry(key).or_insert(json!("")))
    }

    fn append(&mut self, output: Option<usize>, content: Option<usize>, key: &str, delta: &str) {
        if let Some(Value::String(text)) = self.field(output, content, key) {
            text.push_str(delta);
        }
    }

    fn replace(&mut self, output: Option<usize>, content: Option<usize>, key: &str, whole: &str) {
        if let Some(value) = self.field(output, content, key) {
            *value = json!(whole);
        }
    }
}

/// Sets `values[index]`, growing the list by one if `index` is its length (an index further on is appended).
fn set(values: &mut Vec<Value>, index: usize, value: Value) {
    match values.get_mut(index) {
        Some(slot) => *slot = value,
        None => values.push(value),
    }
}
