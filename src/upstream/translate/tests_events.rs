//! Chat chunks as Responses events, and the state kept from events, with exact JSON.

use super::*;
use serde_json::{Value, json};

fn base() -> Value {
    json!({"id": "resp_abc", "object": "response", "created_at": 1, "status": "queued", "model": "m",
        "output": [], "usage": null, "error": null, "incomplete_details": null})
}

fn chunk(delta: Value, finish: Option<&str>) -> Value {
    json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
}

fn usage_chunk() -> Value {
    json!({"id": "c", "object": "chat.completion.chunk", "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
}

/// The events of a whole stream, and the translator after it.
fn run(chunks: &[Value], end: End) -> (Vec<Value>, ChatToResponses) {
    let mut translator = ChatToResponses::new(base());
    let mut events = translator.start();
    for chunk in chunks {
        events.extend(translator.chunk(chunk));
    }
    events.extend(translator.finish(end));
    (events, translator)
}

fn kinds(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

fn text_part(text: &str) -> Value {
    json!({"type": "output_text", "annotations": [], "logprobs": [], "text": text})
}

#[test]
fn a_text_stream_is_the_whole_event_sequence() {
    let chunks = [
        chunk(json!({"role": "assistant", "content": ""}), None),
        chunk(json!({"content": "Hel"}), None),
        chunk(json!({"content": "lo"}), None),
        chunk(json!({}), Some("stop")),
        usage_chunk(),
    ];
    let (events, translator) = run(&chunks, End::Completed);
    let message = |status: &str, content: Value| json!({"id": "msg_abc_0", "type": "message", "status": status, "content": content, "role": "assistant"});
    let at = json!({"item_id": "msg_abc_0", "output_index": 0, "content_index": 0});
    let with = |kind: &str, seq: u64, extra: Value| {
        let mut event = json!({"type": kind, "sequence_number": seq});
        event.as_object_mut().unwrap().extend(at.as_object().unwrap().clone());
        event.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        event
    };
    let usage = json!({"input_tokens": 3, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 2, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 5});
    let mut final_response = base();
    final_response["status"] = json!("completed");
    final_response["output"] = json!([message("completed", json!([text_part("Hello")]))]);
    final_response["usage"] = usage;
    let mut started = base();
    started["status"] = json!("in_progress");
    let expected = vec![
        json!({"type": "response.created", "sequence_number": 0, "response": base()}),
        json!({"type": "response.in_progress", "sequence_number": 1, "response": started}),
        json!({"type": "response.output_item.added", "sequence_number": 2, "output_index": 0,
            "item": message("in_progress", json!([]))}),
        with("response.content_part.added", 3, json!({"part": text_part("")})),
        with("response.output_text.delta", 4, json!({"delta": "Hel", "logprobs": []})),
        with("response.output_text.delta", 5, json!({"delta": "lo", "logprobs": []})),
        with("response.output_text.done", 6, json!({"text": "Hello", "logprobs": []})),
        with("response.content_part.done", 7, json!({"part": text_part("Hello")})),
        json!({"type": "response.output_item.done", "sequence_number": 8, "output_index": 0,
            "item": message("completed", json!([text_part("Hello")]))}),
        json!({"type": "response.completed", "sequence_number": 9, "response": final_response}),
    ];
    assert_eq!(events, expected);
    assert_eq!(translator.response(), &final_response);
    assert_eq!(translator.next_sequence_number(), 10);
}

#[test]
fn tool_calls_are_function_call_items_and_close_the_text() {
    let chunks = [
        chunk(json!({"content": "Let me check."}), None),
        chunk(
            json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
            "function": {"name": "weather", "arguments": "{\"ci"}}]}),
            None,
        ),
        chunk(
            json!({"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
            "function": {"name": "time", "arguments": ""}}]}),
            None,
        ),
        chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "ty\":1}"}}]}), None),
        chunk(json!({}), Some("tool_calls")),
    ];
    let (events, translator) = run(&chunks, End::Completed);
    assert_eq!(
        kinds(&events),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    assert_eq!(
        events[8],
        json!({"type": "response.output_item.added", "sequence_number": 8, "output_index": 1, "item":
            {"id": "fc_abc_1", "type": "function_call", "status": "in_progress", "arguments": "",
                "call_id": "call_1", "name": "weather"}})
    );
    assert_eq!(
        events[11],
        json!({"type": "response.function_call_arguments.delta", "sequence_number": 11, "item_id": "fc_abc_1",
            "output_index": 1, "delta": "ty\":1}"})
    );
    assert_eq!(
        events[12],
        json!({"type": "response.function_call_arguments.done", "sequence_number": 12, "item_id": "fc_abc_1",
            "output_index": 1, "name": "weather", "arguments": "{\"city\":1}"})
    );
    assert_eq!(
        translator.response()["output"][2],
        json!({"id": "fc_abc_2", "type": "function_call", "status": "completed", "arguments": "",
            "call_id": "call_2", "name": "time"})
    );
    assert_eq!(translator.response()["status"], "completed");
    assert_eq!(translator.response()["usage"], Value::Null);
}

#[test]
fn length_and_content_filter_finishes_are_incomplete() {
    for (finish, reason) in [("length", "max_output_tokens"), ("content_filter", "content_filter")] {
        let (events, translator) = run(&[chunk(json!({"content": "Cut"}), Some(finish))], End::Completed);
        let last = events.last().unwrap();
        assert_eq!(last["type"], "response.incomplete");
        assert_eq!(last["response"]["incomplete_details"], json!({"reason": reason}));
        assert_eq!(last["response"]["status"], "incomplete");
        assert_eq!(last["response"]["output"][0]["status"], "incomplete");
        assert_eq!(translator.response(), &last["response"]);
    }
    let (events, _) = run(&[chunk(json!({"content": "x"}), None)], End::Incomplete { reason: "max_output_tokens" });
    assert_eq!(events.last().unwrap()["response"]["incomplete_details"]["reason"], "max_output_tokens");
}

#[test]
fn a_failure_closes_what_is_open_and_fails_with_the_error() {
    let end = End::Failed { code: "server_error".into(), message: "boom".into() };
    let (events, translator) = run(&[chunk(json!({"content": "Part"}), None)], end);
    assert_eq!(
        kinds(&events)[5..],
        ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.failed"]
    );
    let response = translator.response();
    assert_eq!(response["status"], "failed");
    assert_eq!(response["error"], json!({"code": "server_error", "message": "boom"}));
    assert_eq!(response["output"][0]["content"][0]["text"], "Part");
    assert_eq!(response["output"][0]["status"], "incomplete");
}

#[test]
fn a_cancel_closes_what_is_open_with_no_terminal_event() {
    let (events, translator) = run(&[chunk(json!({"content": "Part"}), None)], End::Cancelled);
    assert_eq!(kinds(&events).last(), Some(&"response.output_item.done"));
    assert_eq!(translator.response()["status"], "cancelled");
}

#[test]
fn a_completion_with_no_output_has_one_empty_message() {
    let (events, translator) = run(&[chunk(json!({"role": "assistant"}), Some("stop"))], End::Completed);
    assert_eq!(events.len(), 2 + 5 + 1);
    assert_eq!(translator.response()["output"][0]["content"], json!([text_part("")]));
}

#[test]
fn refusals_are_refusal_parts() {
    let chunks = [chunk(json!({"refusal": "I can"}), None), chunk(json!({"refusal": "not."}), Some("stop"))];
    let (events, translator) = run(&chunks, End::Completed);
    assert_eq!(
        events[4],
        json!({"type": "response.refusal.delta", "sequence_number": 4, "item_id": "msg_abc_0", "output_index": 0,
            "content_index": 0, "delta": "I can"})
    );
    assert_eq!(
        events[6],
        json!({"type": "response.refusal.done", "sequence_number": 6, "item_id": "msg_abc_0", "output_index": 0,
            "content_index": 0, "refusal": "I cannot."})
    );
    assert_eq!(translator.response()["output"][0]["content"], json!([{"type": "refusal", "refusal": "I cannot."}]));
}

#[test]
fn polling_shows_the_output_so_far_and_nothing_follows_the_end() {
    let mut translator = ChatToResponses::new(base());
    assert_eq!(translator.response()["status"], "queued");
    translator.start();
    translator.chunk(&chunk(json!({"content": "So far"}), None));
    let response = translator.response();
    assert_eq!(response["status"], "in_progress");
    assert_eq!(response["output"][0]["status"], "in_progress");
    assert_eq!(response["output"][0]["content"][0]["text"], "So far");
    translator.completed_at(99);
    assert!(!translator.finish(End::Completed).is_empty());
    assert_eq!(translator.response()["completed_at"], 99);
    assert!(translator.finish(End::Cancelled).is_empty());
    assert!(translator.chunk(&chunk(json!({"content": "late"}), None)).is_empty());
    assert_eq!(translator.response()["status"], "completed");
}

#[test]
fn tool_calls_without_index_or_id_are_still_told_apart() {
    let chunks = [
        chunk(json!({"tool_calls": [{"id": "call_x", "function": {"name": "a", "arguments": "{"}}]}), None),
        chunk(json!({"tool_calls": [{"function": {"arguments": "}"}}]}), None),
        chunk(json!({"tool_calls": [{"id": "call_y", "function": {"name": "b", "arguments": "[]"}}]}), None),
        chunk(json!({"tool_calls": [{"index": 5, "function": {"name": "c"}}]}), None),
        chunk(json!({"tool_calls": [{"id": "call_x", "function": {"arguments": " "}}]}), None),
    ];
    let (_, translator) = run(&chunks, End::Completed);
    let output = &translator.response()["output"];
    assert_eq!(output[0]["arguments"], "{} ");
    assert_eq!(output[1]["call_id"], "call_y");
    assert_eq!(output[2]["call_id"], "call_abc_2");
    assert_eq!(output[2]["name"], "c");
}

#[test]
fn the_state_follows_a_stream_and_ends_one_the_upstream_did_not() {
    let (events, _) = run(&[chunk(json!({"content": "Hi"}), None)], End::Completed);
    let mut state = ResponseState::new(base());
    // Up to the first delta: the item and its part are open.
    for event in &events[..5] {
        state.apply(event);
    }
    assert_eq!(state.response()["output"][0]["content"][0]["text"], "Hi");
    assert_eq!(state.next_sequence_number(), 5);
    let ended = state.end(End::Failed { code: "interrupted".into(), message: "restarted".into() });
    assert_eq!(
        kinds(&ended),
        ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.failed"]
    );
    assert_eq!(ended[0]["sequence_number"], 5);
    assert_eq!(ended[0]["text"], "Hi");
    assert_eq!(ended[2]["item"]["status"], "incomplete");
    let response = state.response();
    assert_eq!(response["status"], "failed");
    assert_eq!(response["error"]["code"], "interrupted");
    assert_eq!(response["output"][0]["content"][0]["text"], "Hi");
    assert!(state.is_ended());
    assert!(state.end(End::Cancelled).is_empty());
}

#[test]
fn the_state_ends_a_function_call_and_a_cancel() {
    let call =
        chunk(json!({"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{}"}}]}), None);
    let (events, _) = run(&[call], End::Completed);
    let mut state = ResponseState::new(base());
    for event in &events[..4] {
        state.apply(event);
    }
    let ended = state.end(End::Cancelled);
    assert_eq!(kinds(&ended), ["response.function_call_arguments.done", "response.output_item.done"]);
    assert_eq!(ended[0]["arguments"], "{}");
    assert_eq!(state.response()["status"], "cancelled");
    assert_eq!(state.response()["output"][0]["status"], "incomplete");
}

#[test]
fn only_the_first_choice_is_read() {
    let chunk = json!({"choices": [
        {"index": 1, "delta": {"content": "other"}, "finish_reason": "length"},
        {"index": 0, "delta": {"content": "mine"}, "finish_reason": null},
    ]});
    let (_, translator) = run(&[chunk], End::Completed);
    assert_eq!(translator.response()["status"], "completed");
    assert_eq!(translator.response()["output"][0]["content"][0]["text"], "mine");
}
