//! Property tests: any chat chunk sequence becomes a valid Responses event sequence whose text is the chat's.

use super::*;
use proptest::prelude::*;
use serde_json::{Value, json};
use std::collections::HashMap;

/// One delta of a chat stream.
#[derive(Debug, Clone)]
enum Op {
    Text(String),
    Refusal(String),
    /// A piece of tool call `slot`'s arguments (its first piece also names it).
    Arguments(u64, String),
}

fn op() -> impl Strategy<Value = Op> {
    let text = "(?s).{0,8}";
    prop_oneof![
        4 => text.prop_map(Op::Text),
        1 => text.prop_map(Op::Refusal),
        3 => (0u64..3, text).prop_map(|(slot, s)| Op::Arguments(slot, s)),
    ]
}

fn end() -> impl Strategy<Value = End> {
    prop_oneof![
        4 => Just(End::Completed),
        1 => Just(End::Incomplete { reason: "max_output_tokens" }),
        1 => Just(End::Failed { code: "server_error".into(), message: "boom".into() }),
        1 => Just(End::Cancelled),
    ]
}

#[derive(Debug, Clone)]
struct Stream {
    role_chunk: bool,
    /// The deltas, each with whether it shares the chunk of the delta before it.
    ops: Vec<(Op, bool)>,
    finish: Option<&'static str>,
    usage: bool,
    end: End,
}

fn stream() -> impl Strategy<Value = Stream> {
    let finish = prop::option::of(prop::sample::select(vec!["stop", "length", "tool_calls", "content_filter"]));
    let ops = prop::collection::vec((op(), any::<bool>()), 0..24);
    (any::<bool>(), ops, finish, any::<bool>(), end()).prop_map(|(role_chunk, ops, finish, usage, end)| Stream {
        role_chunk,
        ops,
        finish,
        usage,
        end,
    })
}

fn chunk(delta: Value, finish: Option<&str>) -> Value {
    json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
}

impl Stream {
    fn chunks(&self) -> Vec<Value> {
        let mut chunks = Vec::new();
        if self.role_chunk {
            chunks.push(chunk(json!({"role": "assistant", "content": ""}), None));
        }
        let mut named = Vec::new();
        let mut deltas: Vec<Value> = Vec::new();
        for (op, join) in &self.ops {
            if !*join || deltas.is_empty() {
                deltas.push(json!({}));
            }
            let Some(Value::Object(delta)) = deltas.last_mut() else { continue };
            let mut add = |key: &str, text: &str| {
                let joined = delta.get(key).and_then(Value::as_str).unwrap_or_default().to_owned() + text;
                delta.insert(key.into(), json!(joined));
            };
            match op {
                Op::Text(text) => add("content", text),
                Op::Refusal(text) => add("refusal", text),
                Op::Arguments(slot, arguments) => {
                    let call = if named.contains(slot) {
                        json!({"index": slot, "function": {"arguments": arguments}})
                    } else {
                        named.push(*slot);
                        json!({"index": slot, "id": format!("call_{slot}"), "type": "function",
                            "function": {"name": format!("f{slot}"), "arguments": arguments}})
                    };
                    match delta.get_mut("tool_calls") {
                        Some(Value::Array(calls)) => calls.push(call),
                        _ => {
                            delta.insert("tool_calls".into(), json!([call]));
                        }
                    }
                }
            }
        }
        chunks.extend(deltas.into_iter().map(|delta| chunk(delta, None)));
        if let Some(finish) = self.finish {
            chunks.push(chunk(json!({}), Some(finish)));
        }
        if self.usage {
            chunks.push(
                json!({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}),
            );
        }
        chunks
    }

    fn text(&self, refusal: bool) -> String {
        self.ops
            .iter()
            .filter_map(|(op, _)| match op {
                Op::Text(t) if !refusal => Some(t.as_str()),
                Op::Refusal(t) if refusal => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }

    fn arguments(&self) -> HashMap<String, String> {
        let mut calls: HashMap<String, String> = HashMap::new();
        for (op, _) in &self.ops {
            if let Op::Arguments(slot, arguments) = op {
                calls.entry(format!("call_{slot}")).or_default().push_str(arguments);
            }
        }
        calls
    }
}

fn base() -> Value {
    response_skeleton(&json!({"model": "m", "input": "x", "background": true}), "resp_p", 5)
}

/// The events of `stream`, the translator's response after each step, and the final response.
fn translate(stream: &Stream) -> (Vec<Value>, Vec<(usize, Value)>, Value) {
    let mut translator = ChatToResponses::new(base());
    let mut events = translator.start();
    let mut snapshots = vec![(events.len(), translator.response().clone())];
    for chunk in stream.chunks() {
        events.extend(translator.chunk(&chunk));
        snapshots.push((events.len(), translator.response().clone()));
    }
    events.extend(translator.finish(stream.end.clone()));
    (events, snapshots, translator.response().clone())
}

type Opened = (String, bool, Vec<bool>);

fn open_item(items: &[Opened], output: Option<usize>) -> Option<&Opened> {
    output.and_then(|o| items.get(o)).filter(|i| i.1)
}

/// Checks the stream's shape: numbering, order, every delta inside an added and not yet done item and part.
fn check_well_formed(events: &[Value], end: &End) -> Result<(), TestCaseError> {
    prop_assert!(events.len() >= 2);
    prop_assert_eq!(&events[0]["type"], "response.created");
    prop_assert_eq!(&events[1]["type"], "response.in_progress");
    // Per output index: (type, open, whether each part is open).
    let mut items: Vec<Opened> = Vec::new();
    let mut terminal = 0;
    for (number, event) in events.iter().enumerate() {
        prop_assert_eq!(event["sequence_number"].as_u64(), Some(number as u64));
        prop_assert!(terminal == 0, "an event after the terminal event: {}", event);
        let kind = event["type"].as_str().unwrap_or_default();
        let output = event["output_index"].as_u64().map(|i| i as usize);
        let content = event["content_index"].as_u64().map(|i| i as usize);
        match kind {
            "response.created" | "response.in_progress" => prop_assert!(number < 2, "{}", event),
            "response.completed" | "response.failed" | "response.incomplete" => {
                terminal += 1;
                prop_assert!(items.iter().all(|item| !item.1), "an item still open at the end");
            }
            "response.output_item.added" => {
                prop_assert_eq!(output, Some(items.len()));
                items.push((event["item"]["type"].as_str().unwrap_or_default().to_owned(), true, Vec::new()));
            }
            "response.output_item.done" => {
                let item = open_item(&items, output);
                prop_assert!(item.is_some_and(|i| i.2.iter().all(|open| !open)), "done: {}", event);
                items[output.unwrap_or_default()].1 = false;
            }
            "response.content_part.added" => {
                let item = open_item(&items, output);
                prop_assert!(item.is_some_and(|i| i.0 == "message" && Some(i.2.len()) == content), "{}", event);
                items[output.unwrap_or_default()].2.push(true);
            }
            "response.content_part.done" => {
                let part = open_item(&items, output).and_then(|i| i.2.get(content.unwrap_or(usize::MAX)));
                prop_assert_eq!(part, Some(&true), "{}", event);
                items[output.unwrap_or_default()].2[content.unwrap_or_default()] = false;
            }
            "response.output_text.delta"
            | "response.output_text.done"
            | "response.refusal.delta"
            | "response.refusal.done" => {
                let part = open_item(&items, output).and_then(|i| i.2.get(content.unwrap_or(usize::MAX)));
                prop_assert_eq!(part, Some(&true), "{}", event);
                if kind.starts_with("response.output_text") {
                    prop_assert_eq!(&event["logprobs"], &json!([]));
                }
            }
            "response.function_call_arguments.delta" | "response.function_call_arguments.done" => {
                prop_assert!(open_item(&items, output).is_some_and(|i| i.0 == "function_call"), "{}", event);
            }
            other => prop_assert!(false, "unexpected event type {}", other),
        }
    }
    prop_assert_eq!(terminal, usize::from(*end != End::Cancelled));
    Ok(())
}

/// The deltas of `kind`, and the `.done` texts (`done_key`), joined in stream order.
fn joined(events: &[Value], kind: &str, key: &str) -> String {
    events.iter().filter(|e| e["type"] == kind).filter_map(|e| e[key].as_str()).collect()
}

fn final_texts(response: &Value, part_type: &str, key: &str) -> String {
    let output = response["output"].as_array().cloned().unwrap_or_default();
    output
        .iter()
        .filter(|item| item["type"] == "message")
        .flat_map(|item| item["content"].as_array().cloned().unwrap_or_default())
        .filter(|part| part["type"] == part_type)
        .filter_map(|part| part[key].as_str().map(str::to_owned))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_chat_stream_is_a_well_formed_responses_stream_with_the_same_text(stream in stream()) {
        let (events, _, response) = translate(&stream);
        check_well_formed(&events, &stream.end)?;

        let (text, refusal) = (stream.text(false), stream.text(true));
        prop_assert_eq!(joined(&events, "response.output_text.delta", "delta"), text.clone());
        prop_assert_eq!(joined(&events, "response.output_text.done", "text"), text.clone());
        prop_assert_eq!(joined(&events, "response.refusal.delta", "delta"), refusal.clone());
        prop_assert_eq!(final_texts(&response, "output_text", "text"), text);
        prop_assert_eq!(final_texts(&response, "refusal", "refusal"), refusal);

        let calls = stream.arguments();
        let output = response["output"].as_array().cloned().unwrap_or_default();
        let items: Vec<&Value> = output.iter().filter(|item| item["type"] == "function_call").collect();
        prop_assert_eq!(items.len(), calls.len());
        for item in items {
            let call_id = item["call_id"].as_str().unwrap_or_default();
            prop_assert_eq!(item["arguments"].as_str(), calls.get(call_id).map(String::as_str));
            let id = &item["id"];
            let deltas: String = events.iter()
                .filter(|e| e["type"] == "response.function_call_arguments.delta" && &e["item_id"] == id)
                .filter_map(|e| e["delta"].as_str()).collect();
            prop_assert_eq!(Some(deltas.as_str()), calls.get(call_id).map(String::as_str));
        }

        let status = match (&stream.end, stream.finish) {
            (End::Completed, Some("length" | "content_filter")) | (End::Incomplete { .. }, _) => "incomplete",
            (End::Completed, _) => "completed",
            (End::Failed { .. }, _) => "failed",
            (End::Cancelled, _) => "cancelled",
        };
        prop_assert_eq!(&response["status"], status);
        if stream.end != End::Cancelled {
            prop_assert_eq!(&events[events.len() - 1]["response"], &response);
        }
        prop_assert_eq!(response["usage"].is_null(), !stream.usage || stream.end == End::Cancelled);
    }

    #[test]
    fn the_state_kept_from_the_events_is_the_translators_response_at_every_step(stream in stream()) {
        let (events, snapshots, response) = translate(&stream);
        let mut state = ResponseState::new(base());
        let mut applied = 0;
        for (upto, snapshot) in &snapshots {
            for event in &events[applied..*upto] {
                state.apply(event);
            }
            applied = *upto;
            prop_assert_eq!(state.response(), snapshot);
        }
        for event in &events[applied..] {
            state.apply(event);
        }
        prop_assert_eq!(state.next_sequence_number(), events.len() as u64);
        if stream.end == End::Cancelled {
            prop_assert!(state.end(End::Cancelled).is_empty());
        }
        prop_assert_eq!(state.response(), &response);
    }

    #[test]
    fn a_translation_is_deterministic(stream in stream()) {
        let (first, _, _) = translate(&stream);
        let (second, _, _) = translate(&stream);
        prop_assert_eq!(serde_json::to_string(&first).ok(), serde_json::to_string(&second).ok());
    }

    #[test]
    fn the_state_ends_any_cut_stream_well_formed(stream in stream(), cut in any::<prop::sample::Index>()) {
        let (events, _, _) = translate(&stream);
        let cut = 2 + cut.index(events.len() - 1);
        let mut state = ResponseState::new(base());
        let mut kept: Vec<Value> = events[..cut.min(events.len())].to_vec();
        for event in &kept {
            state.apply(event);
        }
        let ended = state.end(End::Failed { code: "interrupted".into(), message: "cut".into() });
        let terminal_seen = kept.iter().any(|e| e["type"] == "response.completed" || e["type"] == "response.failed"
            || e["type"] == "response.incomplete");
        kept.extend(ended);
        // Whether the stream had ended or not, it now has exactly one terminal event.
        check_well_formed(&kept, &End::Completed)?;
        if !terminal_seen {
            prop_assert_eq!(&state.response()["status"], "failed");
            prop_assert_eq!(&state.response()["error"]["code"], "interrupted");
        }
    }
}
