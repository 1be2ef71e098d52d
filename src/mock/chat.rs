//! `POST /v1/chat/completions`: a chat completion, streamed (`data: <chunk>` events, then `data: [DONE]`) or not.

use super::controls::openai_error;
use super::controls::{Controls, MockToolCall, Pace, paced_response, split_evenly};
use super::{Api, MockConfig, MockState};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{Value, json};
use std::sync::Arc;

pub(super) async fn completions(State(state): State<Arc<MockState>>, headers: HeaderMap, body: Bytes) -> Response {
    let guard = state.begin(Api::Chat);
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return openai_error(StatusCode::BAD_REQUEST, "We could not parse the JSON body of your request.");
    };
    state.record(Api::Chat, &headers, &request);
    if let Some(response) = state.switch.fault().await {
        guard.finish();
        return response;
    }
    let controls = Controls::of(&request);
    let Some(messages) = request.get("messages").and_then(Value::as_array) else {
        return openai_error(StatusCode::BAD_REQUEST, "'messages' is a required property");
    };
    if let Some(response) = controls.fault(&state, &body).await {
        guard.finish();
        return response;
    }
    let plan = Plan::new(&state.defaults, &controls, &request, messages.len());
    let stream = request.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let pieces = if stream {
        let frames = plan.events().into_iter().map(|e| format!("data: {e}\n\n")).collect();
        controls.stream_pieces(frames, Some("data: [DONE]\n\n"))
    } else {
        let body = plan.completion().to_string();
        split_evenly(&body, plan.words.len().max(1))
    };
    let content_type = if stream { "text/event-stream; charset=utf-8" } else { "application/json" };
    paced_response(plan.pace, &controls, guard, pieces, content_type)
}

fn random_id() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("chatcmpl-{}", &id[..24])
}

/// What the mock will answer.
struct Plan {
    id: String,
    created: u64,
    model: String,
    n: usize,
    words: Vec<String>,
    tool_calls: Vec<MockToolCall>,
    include_usage: bool,
    prompt_tokens: usize,
    pace: Pace,
}

impl Plan {
    fn new(defaults: &MockConfig, c: &Controls, request: &Value, message_count: usize) -> Self {
        Self {
            id: random_id(),
            created: super::now(),
            model: request.get("model").and_then(Value::as_str).unwrap_or("gpt-3.5-turbo").to_owned(),
            n: request.get("n").and_then(Value::as_u64).unwrap_or(1).clamp(1, 16) as usize,
            words: c.words(defaults),
            tool_calls: c.tool_calls(),
            include_usage: request.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false),
            prompt_tokens: message_count * 8,
            pace: c.pace(defaults),
        }
    }
    fn finish_reason(&self) -> &'static str {
        if self.tool_calls.is_empty() { "stop" } else { "tool_calls" }
    }

    fn usage(&self) -> Value {
        let completion = self.words.len() * self.n;
        json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": completion, "total_tokens": self.prompt_tokens + completion})
    }

    fn text(&self) -> String {
        self.words.concat()
    }

    fn completion(&self) -> Value {
        let choices: Vec<Value> = (0..self.n)
            .map(|i| {
                let mut message = json!({"role": "assistant", "content": self.text(), "refusal": null});
                if !self.tool_calls.is_empty() {
                    message["content"] = Value::Null;
                    message["tool_calls"] = Value::Array(
                        self.tool_calls
                            .iter()
                            .enumerate()
                            .map(|(k, t)| json!({"id": format!("call_{k}"), "type": "function", "function": {"name": t.name, "arguments": t.arguments}}))
                            .collect(),
                    );
                }
                json!({"index": i, "message": message, "logprobs": null, "finish_reason": self.finish_reason()})
            })
            .collect();
        json!({"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
               "choices": choices, "usage": self.usage(), "system_fingerprint": "fp_mock"})
    }

    fn chunk(&self, index: usize, delta: Value, finish_reason: Option<&str>) -> String {
        let mut chunk = json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "system_fingerprint": "fp_mock",
            "choices": [{"index": index, "delta": delta, "logprobs": null, "finish_reason": finish_reason}]});
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk.to_string()
    }

    /// Every event of the stream, in order, without `[DONE]`.
    fn events(&self) -> Vec<String> {
        let mut events = Vec::new();
        for i in 0..self.n {
            // Like OpenAI: the role chunk has `content: ""`, or `null` when the answer is tool calls.
            let content = if self.tool_calls.is_empty() { json!("") } else { Value::Null };
            events.push(self.chunk(i, json!({"role": "assistant", "content": content, "refusal": null}), None));
        }
        if self.tool_calls.is_empty() {
            for word in &self.words {
                for i in 0..self.n {
                    events.push(self.chunk(i, json!({"content": word}), None));
                }
            }
        } else {
            for (k, call) in self.tool_calls.iter().enumerate() {
                for i in 0..self.n {
                    events.push(self.chunk(
                        i,
                        json!({"tool_calls": [{"index": k, "id": format!("call_{k}"), "type": "function",
                        "function": {"name": call.name, "arguments": ""}}]}),
                        None,
                    ));
                    let args: Vec<char> = call.arguments.chars().collect();
                    for piece in args.chunks(4) {
                        let piece: String = piece.iter().collect();
                        events.push(self.chunk(
                            i,
                            json!({"tool_calls": [{"index": k, "function": {"arguments": piece}}]}),
                            None,
                        ));
                    }
                }
            }
        }
        for i in 0..self.n {
            events.push(self.chunk(i, json!({}), Some(self.finish_reason())));
        }
        if self.include_usage {
            events.push(
                json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "system_fingerprint": "fp_mock", "choices": [], "usage": self.usage()})
                .to_string(),
            );
        }
        events
    }
}
