//! `POST /v1/responses`: OpenAI's Responses API, the response object or its event stream (see the module docs
//! of [`super`] for the exact sequence), text or function calls, with the same controls as Chat Completions.

use super::controls::{Controls, MockToolCall, Pace, openai_error, paced_response, split_evenly};
use super::{Api, MockConfig, MockState};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use rand::Rng;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;

pub(super) async fn create(State(state): State<Arc<MockState>>, headers: HeaderMap, body: Bytes) -> Response {
    if state.defaults.no_responses_api {
        state.stats.not_found.fetch_add(1, Ordering::SeqCst);
        return openai_error(StatusCode::NOT_FOUND, "Invalid URL (POST /v1/responses)");
    }
    let guard = state.begin(Api::Responses);
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return openai_error(StatusCode::BAD_REQUEST, "We could not parse the JSON body of your request.");
    };
    state.record(Api::Responses, &headers, &request);
    if let Some(response) = state.switch.fault().await {
        guard.finish();
        return response;
    }
    let controls = Controls::of(&request);
    let Some(fields) = request.as_object() else {
        return openai_error(StatusCode::BAD_REQUEST, "The body of your request must be a JSON object.");
    };
    if fields.get("input").is_some_and(|input| !(input.is_string() || input.is_array() || input.is_null())) {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "Invalid type for 'input': expected one of a string or an array of input items.",
        );
    }
    if let Some(response) = controls.fault(&state, &body).await {
        guard.finish();
        return response;
    }
    let plan = Plan::new(&state.defaults, &controls, fields);
    let stream = fields.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let pieces = if stream {
        let frames = plan.events().into_iter().map(|(kind, event)| format!("event: {kind}\ndata: {event}\n\n"));
        controls.stream_pieces(frames.collect(), None)
    } else {
        let body = plan.response("completed", plan.output(), true).to_string();
        split_evenly(&body, plan.words.len().max(1))
    };
    let content_type = if stream { "text/event-stream; charset=utf-8" } else { "application/json" };
    paced_response(plan.pace, &controls, guard, pieces, content_type)
}

/// `prefix` followed by `bytes` random bytes in hex, like OpenAI's ids.
fn random_id(prefix: &str, bytes: usize) -> String {
    let mut rng = rand::rng();
    let mut id = String::with_capacity(prefix.len() + 2 * bytes);
    id.push_str(prefix);
    for _ in 0..bytes {
        let byte: u8 = rng.random();
        id.push_str(&format!("{byte:02x}"));
    }
    id
}

/// A function call to answer, with its ids.
struct Call {
    id: String,
    call_id: String,
    name: String,
    arguments: String,
}

/// What the mock will answer.
struct Plan {
    id: String,
    created: u64,
    /// The request's fields, echoed in the response object.
    request: Map<String, Value>,
    message_id: String,
    words: Vec<String>,
    calls: Vec<Call>,
    input_tokens: usize,
    pace: Pace,
}

impl Plan {
    fn new(defaults: &MockConfig, c: &Controls, request: &Map<String, Value>) -> Self {
        let calls = c
            .tool_calls()
            .into_iter()
            .map(|MockToolCall { name, arguments }| Call {
                id: random_id("fc_", 25),
                call_id: random_id("call_", 12),
                name,
                arguments,
            })
            .collect();
        let items = match request.get("input") {
            Some(Value::Array(items)) => items.len(),
            Some(Value::String(_)) => 1,
            _ => 0,
        };
        let instructions = usize::from(request.get("instructions").is_some_and(|i| !i.is_null()));
        Self {
            id: random_id("resp_", 25),
            created: super::now(),
            request: request.clone(),
            message_id: random_id("msg_", 25),
            words: c.words(defaults),
            calls,
            input_tokens: (items + instructions) * 8,
            pace: c.pace(defaults),
        }
    }

    fn text(&self) -> String {
        self.words.concat()
    }

    fn usage(&self) -> Value {
        let output = self.words.len();
        json!({
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.input_tokens + output,
        })
    }

    /// The request's `key`, or `default` when it has none.
    fn echo(&self, key: &str, default: Value) -> Value {
        self.request.get(key).cloned().unwrap_or(default)
    }

    /// The response object, as `response.created` (`in_progress`) shows it, or as it ends (`completed`).
    fn response(&self, status: &str, output: Vec<Value>, usage: bool) -> Value {
        let completed = status == "completed";
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "background": self.echo("background", json!(false)),
            "completed_at": if completed { json!(super::now()) } else { Value::Null },
            "error": null,
            "incomplete_details": null,
            "instructions": self.echo("instructions", Value::Null),
            "max_output_tokens": self.echo("max_output_tokens", Value::Null),
            "max_tool_calls": self.echo("max_tool_calls", Value::Null),
            "model": self.echo("model", json!("gpt-3.5-turbo")),
            "output": output,
            "parallel_tool_calls": self.echo("parallel_tool_calls", json!(true)),
            "previous_response_id": self.echo("previous_response_id", Value::Null),
            "reasoning": self.echo("reasoning", json!({"effort": null, "summary": null})),
            "service_tier": "default",
            "store": self.echo("store", json!(true)),
            "temperature": self.echo("temperature", json!(1.0)),
            "text": self.echo("text", json!({"format": {"type": "text"}, "verbosity": "medium"})),
            "tool_choice": self.echo("tool_choice", json!("auto")),
            "tools": self.echo("tools", json!([])),
            "top_logprobs": self.echo("top_logprobs", json!(0)),
            "top_p": self.echo("top_p", json!(1.0)),
            "truncation": self.echo("truncation", json!("disabled")),
            "usage": if usage { self.usage() } else { Value::Null },
            "user": self.echo("user", Value::Null),
            "metadata": self.echo("metadata", json!({})),
        })
    }

    fn part(text: &str) -> Value {
        json!({"type": "output_text", "annotations": [], "logprobs": [], "text": text})
    }

    fn message(&self, status: &str, content: Vec<Value>) -> Value {
        json!({"id": self.message_id, "type": "message", "status": status, "content": content, "role": "assistant"})
    }

    fn call(call: &Call, status: &str, arguments: &str) -> Value {
        json!({"id": call.id, "type": "function_call", "status": status, "arguments": arguments,
               "call_id": call.call_id, "name": call.name})
    }

    /// The output items of the finished response: one message, or the function calls.
    fn output(&self) -> Vec<Value> {
        if self.calls.is_empty() {
            vec![self.message("completed", vec![Self::part(&self.text())])]
        } else {
            self.calls.iter().map(|c| Self::call(c, "completed", &c.arguments)).collect()
        }
    }

    /// Every event of the stream, in order: its type and its JSON, `sequence_number` from 0.
    fn events(&self) -> Vec<(&'static str, Value)> {
        let mut events: Vec<(&'static str, Value)> = Vec::new();
        // Like OpenAI's: `type` and `sequence_number` first, then the event's own fields.
        let mut push = |kind: &'static str, fields: Value| {
            let mut event = Map::new();
            event.insert("type".to_owned(), json!(kind));
            event.insert("sequence_number".to_owned(), json!(events.len()));
            if let Value::Object(fields) = fields {
                event.extend(fields);
            }
            events.push((kind, Value::Object(event)));
        };
        let started = self.response("in_progress", Vec::new(), false);
        push("response.created", json!({"response": started}));
        push("response.in_progress", json!({"response": started}));
        if self.calls.is_empty() {
            let (item_id, text) = (&self.message_id, self.text());
            let at = json!({"item_id": item_id, "output_index": 0, "content_index": 0});
            let with = |extra: Value| {
                let mut event = at.clone();
                if let (Some(event), Value::Object(extra)) = (event.as_object_mut(), extra) {
                    event.extend(extra);
                }
                event
            };
            push(
                "response.output_item.added",
                json!({"output_index": 0, "item": self.message("in_progress", Vec::new())}),
            );
            push("response.content_part.added", with(json!({"part": Self::part("")})));
            for word in &self.words {
                push("response.output_text.delta", with(json!({"delta": word, "logprobs": []})));
            }
            push("response.output_text.done", with(json!({"text": text, "logprobs": []})));
            push("response.content_part.done", with(json!({"part": Self::part(&text)})));
            let done = self.message("completed", vec![Self::part(&text)]);
            push("response.output_item.done", json!({"output_index": 0, "item": done}));
        } else {
            for (k, call) in self.calls.iter().enumerate() {
                push(
                    "response.output_item.added",
                    json!({"output_index": k, "item": Self::call(call, "in_progress", "")}),
                );
                let args: Vec<char> = call.arguments.chars().collect();
                for piece in args.chunks(4) {
                    let delta: String = piece.iter().collect();
                    push(
                        "response.function_call_arguments.delta",
                        json!({"item_id": call.id, "output_index": k, "delta": delta}),
                    );
                }
                push(
                    "response.function_call_arguments.done",
                    json!({"item_id": call.id, "output_index": k, "name": call.name, "arguments": call.arguments}),
                );
                let done = Self::call(call, "completed", &call.arguments);
                push("response.output_item.done", json!({"output_index": k, "item": done}));
            }
        }
        push("response.completed", json!({"response": self.response("completed", self.output(), true)}));
        events
    }
}
