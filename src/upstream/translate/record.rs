//! The record of one Responses API request: the events its callers see and its response object, whichever kind
//! of upstream answers it.
//!
//! - From an upstream that has only Chat Completions ([`Source::Chat`]), each chunk is translated
//!   ([`ChatToResponses`]).
//! - From an upstream that has the Responses API ([`Source::Responses`]), its events are relayed, renumbered
//!   after this record's own (`sequence_number` contiguous from 0 across everything a caller sees). Its
//!   `response.created`, `response.queued` and `response.in_progress` are left out: this record's own stand for
//!   them (they carry this server's id, not the upstream's). Its terminal event is not relayed either: its
//!   response object (with this server's id, creation time and `background`) becomes the final body, and the
//!   terminal event a caller sees is rendered from the final body once it is stored.
//!
//! The terminal event is never one of the recorded events: [`Record::finish`] answers the `.done` events of what
//! is still open and makes the response object final; the API renders `response.completed` (`.failed`,
//! `.incomplete`) from that object when the final state is durable, so that no caller sees a response end
//! before it is stored.

use super::{ChatToResponses, End, ResponseState};
use serde_json::{Value, json};

/// Which protocol the upstream answered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Chat,
    Responses,
}

/// What one upstream event meant, beyond the events it gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Signal {
    /// Go on reading.
    More,
    /// The upstream reported an error in the stream: the response fails with it.
    Error { code: String, message: String },
    /// The upstream ended the response itself (a Responses upstream's terminal event): `Failed` with its error.
    Ended(End),
}

#[derive(Clone)]
enum State {
    /// The stream has not begun.
    Waiting,
    Chat(Box<ChatToResponses>),
    Relay(ResponseState),
}

#[derive(Clone)]
pub struct Record {
    /// The response object before any event.
    base: Value,
    state: State,
    /// The upstream's error answer (an HTTP error status): its code and message fail the response.
    upstream_error: Option<(String, String)>,
    /// A Responses upstream's own terminal event, held until [`Record::finish`]: until the end is stored, the
    /// object must not say it ended.
    upstream_end: Option<Value>,
}

impl Record {
    /// `base`: the response object as first shown ([`super::response_skeleton`]).
    pub fn new(base: Value) -> Self {
        Self { base, state: State::Waiting, upstream_error: None, upstream_end: None }
    }

    /// The upstream's stream begins, in `source`'s protocol: `response.created` and `response.in_progress`.
    /// Nothing if it began already.
    pub fn start(&mut self, source: Source) -> Vec<Value> {
        if !matches!(self.state, State::Waiting) {
            return Vec::new();
        }
        match source {
            Source::Chat => {
                let mut chat = Box::new(ChatToResponses::new(self.base.clone()));
                let events = chat.start();
                self.state = State::Chat(chat);
                events
            }
            Source::Responses => {
                let mut relay = ResponseState::new(self.base.clone());
                let events = relay.start();
                self.state = State::Relay(relay);
                events
            }
        }
    }

    /// One event of the upstream's stream (its `data`): the events it gives, and what it meant.
    pub fn take(&mut self, data: &str) -> (Vec<Value>, Signal) {
        let Ok(event) = serde_json::from_str::<Value>(data) else {
            let message = "The upstream sent an event that is not JSON.".to_owned();
            return (Vec::new(), Signal::Error { code: "upstream_error".into(), message });
        };
        match &mut self.state {
            State::Waiting => (Vec::new(), Signal::More),
            State::Chat(chat) => match event.get("error").filter(|e| e.is_object()) {
                Some(error) => (Vec::new(), error_signal(error)),
                None => (chat.chunk(&event), Signal::More),
            },
            State::Relay(relay) => {
                let (events, signal, end) = relay_event(relay, &self.base, event);
                if end.is_some() {
                    self.upstream_end = end;
                }
                (events, signal)
            }
        }
    }

    /// The upstream answered with an error status and this body: the response fails with its code and message.
    pub fn error_answer(&mut self, body: &Value) {
        let error = body.get("error").unwrap_or(body);
        let code =
            ["code", "type"].iter().find_map(|key| error.get(key).and_then(Value::as_str)).unwrap_or("upstream_error");
        let message = error.get("message").and_then(Value::as_str).unwrap_or("The upstream answered with an error.");
        self.upstream_error = Some((code.to_owned(), message.to_owned()));
    }

    /// Ends the response with `end` (at `now`, Unix seconds): the `.done` events of what is still open (the
    /// terminal event is not among them: it is rendered from the final object), after which the object is final.
    /// A `Failed` end takes the upstream's own code and message when it answered with an error. Nothing once
    /// ended, except that a cancel still makes an upstream-ended object `cancelled` (a stop won the race).
    pub fn finish(&mut self, end: End, now: i64) -> Vec<Value> {
        let end = match (end, &self.upstream_error) {
            (End::Failed { code, .. }, Some((upstream_code, message))) if code == "upstream_error" => {
                End::Failed { code: upstream_code.clone(), message: message.clone() }
            }
            (end, _) => end,
        };
        let mut events = self.start(Source::Responses);
        match &mut self.state {
            State::Waiting => {}
            State::Chat(chat) => {
                chat.completed_at(now);
                events.extend(chat.finish(end));
            }
            State::Relay(relay) => match self.upstream_end.take() {
                // The upstream ended it, and no cancel won the race: its own end.
                Some(terminal) if end != End::Cancelled => relay.apply(&terminal),
                _ => {
                    relay.completed_at(now);
                    events.extend(relay.end(end));
                }
            },
        }
        events.retain(|event| !is_terminal(event));
        events
    }

    /// The response object as it stands.
    pub fn response(&self) -> &Value {
        match &self.state {
            State::Waiting => &self.base,
            State::Chat(chat) => chat.response(),
            State::Relay(relay) => relay.response(),
        }
    }
}

/// Whether `event` ends a response stream.
fn is_terminal(event: &Value) -> bool {
    matches!(
        event.get("type").and_then(Value::as_str),
        Some("response.completed" | "response.failed" | "response.incomplete")
    )
}

fn error_signal(error: &Value) -> Signal {
    let code =
        ["code", "type"].iter().find_map(|key| error.get(key).and_then(Value::as_str)).unwrap_or("upstream_error");
    let message = error.get("message").and_then(Value::as_str).unwrap_or("no message");
    Signal::Error { code: code.to_owned(), message: format!("The upstream reported an error mid-stream: {message}") }
}

/// One event of a Responses upstream, relayed after this record's events; its terminal event is answered apart
/// (held until the end is stored).
fn relay_event(relay: &mut ResponseState, base: &Value, mut event: Value) -> (Vec<Value>, Signal, Option<Value>) {
    let kind = event.get("type").and_then(Value::as_str).unwrap_or("").to_owned();
    match kind.as_str() {
        "response.created" | "response.queued" | "response.in_progress" => (Vec::new(), Signal::More, None),
        "response.completed" | "response.incomplete" | "response.failed" => {
            if let Some(response) = event.get_mut("response") {
                adopt(response, base);
            }
            event["sequence_number"] = json!(relay.next_sequence_number());
            let end = match kind.as_str() {
                "response.completed" => End::Completed,
                "response.incomplete" => End::Incomplete { reason: "max_output_tokens" },
                _ => {
                    let error = event.pointer("/response/error").cloned().unwrap_or(Value::Null);
                    let text = |key: &str| error.get(key).and_then(Value::as_str).map(str::to_owned);
                    End::Failed {
                        code: text("code").unwrap_or_else(|| "upstream_error".into()),
                        message: text("message").unwrap_or_else(|| "The upstream's response failed.".into()),
                    }
                }
            };
            (Vec::new(), Signal::Ended(end), Some(event))
        }
        "error" => (Vec::new(), error_signal(&event), None),
        _ => {
            event["sequence_number"] = json!(relay.next_sequence_number());
            relay.apply(&event);
            (vec![event], Signal::More, None)
        }
    }
}

/// The upstream's response object as this server's: its id, creation time, `background` and
/// `previous_response_id` are this server's, as the caller knows them.
fn adopt(response: &mut Value, base: &Value) {
    let Value::Object(fields) = response else { return };
    for key in ["id", "created_at", "background", "previous_response_id", "metadata"] {
        if let Some(value) = base.get(key) {
            fields.insert(key.into(), value.clone());
        }
    }
}

/// The response object of a request that a crash cut off: its recorded events replayed over `base`, ended as
/// `Failed` with `code` and `message` (what was open is closed, as `incomplete`).
pub fn recovered<'a>(base: Value, events: impl IntoIterator<Item = &'a str>, code: &str, message: &str) -> Value {
    let mut state = ResponseState::new(base);
    for data in events {
        if let Ok(event) = serde_json::from_str::<Value>(data) {
            state.apply(&event);
        }
    }
    state.end(End::Failed { code: code.into(), message: message.into() });
    state.response().clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::translate::response_skeleton;

    fn base() -> Value {
        response_skeleton(&json!({"model": "m", "input": "hi", "background": true}), "resp_abc", 7)
    }

    fn types(events: &[Value]) -> Vec<&str> {
        events.iter().map(|e| e["type"].as_str().unwrap_or("")).collect()
    }

    fn numbers(events: &[Value]) -> Vec<u64> {
        events.iter().map(|e| e["sequence_number"].as_u64().unwrap_or(u64::MAX)).collect()
    }

    #[test]
    fn a_chat_stream_gives_events_without_the_terminal_one_and_a_final_object() {
        let mut record = Record::new(base());
        let mut events = record.start(Source::Chat);
        let chunk = r#"{"choices":[{"index":0,"delta":{"content":"Hello"}}]}"#;
        let (more, signal) = record.take(chunk);
        assert_eq!(signal, Signal::More);
        events.extend(more);
        let (_, _) = record.take(r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#);
        events.extend(record.finish(End::Completed, 9));
        assert_eq!(numbers(&events), (0..events.len() as u64).collect::<Vec<_>>());
        assert!(!types(&events).contains(&"response.completed"), "{:?}", types(&events));
        let response = record.response();
        assert_eq!(response["status"], "completed");
        assert_eq!(response["id"], "resp_abc");
        assert_eq!(response["output"][0]["content"][0]["text"], "Hello");
        assert_eq!(response["usage"]["output_tokens"], 2);
    }

    #[test]
    fn a_responses_stream_is_renumbered_and_its_terminal_object_adopted() {
        let mut record = Record::new(base());
        let mut events = record.start(Source::Responses);
        let upstream = [
            json!({"type": "response.created", "sequence_number": 0, "response": {"id": "resp_up"}}),
            json!({"type": "response.output_item.added", "sequence_number": 1, "output_index": 0,
                "item": {"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant", "content": []}}),
            json!({"type": "response.completed", "sequence_number": 2, "response": {"id": "resp_up",
                "object": "response", "status": "completed", "created_at": 99, "background": false,
                "output": [{"id": "msg_1", "type": "message"}], "usage": {"input_tokens": 1, "output_tokens": 1}}}),
        ];
        let mut last = Signal::More;
        for event in &upstream {
            let (more, signal) = record.take(&event.to_string());
            events.extend(more);
            last = signal;
        }
        assert_eq!(last, Signal::Ended(End::Completed));
        assert_eq!(record.response()["status"], "in_progress", "not shown as ended before it is finished");
        assert_eq!(types(&events), ["response.created", "response.in_progress", "response.output_item.added"]);
        assert_eq!(numbers(&events), [0, 1, 2]);
        assert!(record.finish(End::Completed, 10).is_empty());
        let response = record.response();
        assert_eq!((response["id"].as_str(), response["created_at"].as_i64()), (Some("resp_abc"), Some(7)));
        assert_eq!(response["background"], true);
        assert_eq!(response["status"], "completed");
    }

    #[test]
    fn a_cancel_after_the_upstream_ended_still_cancels() {
        let mut record = Record::new(base());
        record.start(Source::Responses);
        let done = json!({"type": "response.completed", "sequence_number": 5, "response": {"status": "completed"}});
        record.take(&done.to_string());
        record.finish(End::Cancelled, 1);
        assert_eq!(record.response()["status"], "cancelled");
    }

    #[test]
    fn an_error_answer_fails_the_response_with_the_upstreams_code() {
        let mut record = Record::new(base());
        record.error_answer(&json!({"error": {"message": "Incorrect API key", "code": "invalid_api_key"}}));
        let events = record.finish(End::Failed { code: "upstream_error".into(), message: "x".into() }, 1);
        assert_eq!(types(&events), ["response.created", "response.in_progress"]);
        let response = record.response();
        assert_eq!(response["status"], "failed");
        assert_eq!(response["error"]["code"], "invalid_api_key");
        assert_eq!(response["error"]["message"], "Incorrect API key");
    }

    #[test]
    fn a_cut_off_response_is_recovered_failed_with_its_output() {
        let mut record = Record::new(base());
        let mut events = record.start(Source::Chat);
        events.extend(record.take(r#"{"choices":[{"index":0,"delta":{"content":"par"}}]}"#).0);
        let texts: Vec<String> = events.iter().map(Value::to_string).collect();
        let response = recovered(base(), texts.iter().map(String::as_str), "interrupted", "cut");
        assert_eq!(response["status"], "failed");
        assert_eq!(response["error"]["code"], "interrupted");
        assert_eq!(response["output"][0]["content"][0]["text"], "par");
        assert_eq!(response["output"][0]["status"], "incomplete");
    }
}
