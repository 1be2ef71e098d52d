//! The request mapping, field by field, with exact JSON.

use super::*;
use serde_json::{Value, json};

fn translate(request: Value) -> Value {
    chat_request(&request, &[]).unwrap()
}

#[test]
fn instructions_and_a_string_input_are_a_system_and_a_user_message() {
    let chat = translate(json!({"model": "m", "instructions": "Be brief.", "input": "Hi"}));
    assert_eq!(
        chat,
        json!({"model": "m", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
        ]})
    );
}

#[test]
fn messages_of_every_role_and_content_shape() {
    let chat = translate(json!({"model": "m", "input": [
        {"role": "developer", "content": "Rules."},
        {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "More rules."}]},
        {"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
            "content": [{"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []}]},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
    ]}));
    assert_eq!(
        chat["messages"],
        json!([
            {"role": "system", "content": "Rules."},
            {"role": "system", "content": "More rules."},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "Hello"},
            {"role": "assistant", "content": null, "refusal": "No."},
        ])
    );
}

#[test]
fn function_calls_join_the_assistant_message_and_outputs_are_tool_messages() {
    let chat = translate(json!({"model": "m", "input": [
        {"role": "user", "content": "Weather?"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Looking."}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_a", "name": "weather", "arguments": "{\"c\":\"P\"}"},
        {"type": "function_call", "call_id": "call_b", "name": "time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_a", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_b",
            "output": [{"type": "input_text", "text": "12"}, {"type": "input_text", "text": ":00"}]},
        {"type": "function_call", "call_id": "call_c", "name": "again", "arguments": ""},
    ]}));
    assert_eq!(
        chat["messages"],
        json!([
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "Looking.", "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": "{\"c\":\"P\"}"}},
                {"id": "call_b", "type": "function", "function": {"name": "time", "arguments": "{}"}},
            ]},
            {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
            {"role": "tool", "tool_call_id": "call_b", "content": "12:00"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_c", "type": "function", "function": {"name": "again", "arguments": ""}},
            ]},
        ])
    );
}

#[test]
fn previous_items_come_before_the_input_and_reasoning_items_are_left_out() {
    let previous = [
        json!({"role": "user", "content": "One"}),
        json!({"type": "reasoning", "id": "rs_1", "summary": []}),
        json!({"type": "message", "role": "assistant", "status": "completed", "id": "msg_x",
            "content": [{"type": "output_text", "text": "1", "annotations": []}]}),
    ];
    let request = json!({"model": "m", "instructions": "Count.", "input": "Two", "previous_response_id": "resp_x"});
    let chat = chat_request(&request, &previous).unwrap();
    assert_eq!(
        chat,
        json!({"model": "m", "messages": [
            {"role": "system", "content": "Count."},
            {"role": "user", "content": "One"},
            {"role": "assistant", "content": "1"},
            {"role": "user", "content": "Two"},
        ]})
    );
}

#[test]
fn settings_pass_rename_or_drop() {
    let chat = translate(json!({
        "model": "m", "input": "x", "temperature": 0.5, "top_p": 0.9, "user": "u", "parallel_tool_calls": false,
        "max_output_tokens": 100, "metadata": {"k": "v"}, "background": true, "store": true, "stream": true,
        "previous_response_id": null, "include": ["reasoning.encrypted_content"], "truncation": "auto",
        "reasoning": {"effort": "low", "summary": "auto"}, "service_tier": "flex", "top_logprobs": 2,
        "text": {"format": {"type": "text"}, "verbosity": "low"}, "unknown": 1,
    }));
    assert_eq!(
        chat,
        json!({
            "model": "m", "temperature": 0.5, "top_p": 0.9, "user": "u", "parallel_tool_calls": false,
            "messages": [{"role": "user", "content": "x"}],
            "max_completion_tokens": 100, "service_tier": "flex", "reasoning_effort": "low",
        })
    );
}

#[test]
fn function_tools_and_tool_choice_take_chat_shape() {
    let chat = translate(json!({"model": "m", "input": "x",
        "tools": [
            {"type": "function", "name": "weather", "description": "The weather.",
                "parameters": {"type": "object", "properties": {}}, "strict": true},
            {"type": "function", "name": "bare", "parameters": null, "strict": null},
        ],
        "tool_choice": {"type": "function", "name": "weather"}}));
    assert_eq!(
        chat["tools"],
        json!([
            {"type": "function", "function": {"name": "weather", "description": "The weather.",
                "parameters": {"type": "object", "properties": {}}, "strict": true}},
            {"type": "function", "function": {"name": "bare"}},
        ])
    );
    assert_eq!(chat["tool_choice"], json!({"type": "function", "function": {"name": "weather"}}));
    for mode in ["auto", "none", "required"] {
        assert_eq!(translate(json!({"model": "m", "input": "x", "tool_choice": mode}))["tool_choice"], mode);
    }
}

#[test]
fn text_formats_become_response_formats() {
    let schema = json!({"type": "object", "properties": {"a": {"type": "string"}}});
    let chat = translate(json!({"model": "m", "input": "x", "text": {"format":
        {"type": "json_schema", "name": "thing", "schema": schema, "strict": true}}}));
    assert_eq!(
        chat["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": true}})
    );
    let chat = translate(json!({"model": "m", "input": "x", "text": {"format": {"type": "json_object"}}}));
    assert_eq!(chat["response_format"], json!({"type": "json_object"}));
}

#[test]
fn what_cannot_be_translated_is_an_error_naming_it() {
    let cases = [
        (
            json!({"model": "m", "input": [{"role": "user", "content": [
            {"type": "input_text", "text": "see"},
            {"type": "input_image", "image_url": "https://x/y.png"}]}]}),
            "input",
            "input[0]: content[1] of type `input_image`",
        ),
        (
            json!({"model": "m", "input": [{"role": "user", "content": "a"}, {"type": "item_reference", "id": "x"}]}),
            "input",
            "input[1]: an item of type `item_reference`",
        ),
        (
            json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}),
            "tools",
            "tools[0]: tools of type `web_search`",
        ),
        (json!({"model": "m", "input": "x", "tool_choice": {"type": "file_search"}}), "tool_choice", "only `auto`"),
        (json!({"model": "m", "input": "x", "conversation": "conv_1"}), "conversation", "`conversation`"),
        (json!({"model": "m"}), "input", "no input"),
        (json!({"model": "m", "input": [{"role": "tool", "content": "x"}]}), "input", "unknown role `tool`"),
        (
            json!({"model": "m", "input": [{"type": "function_call_output", "call_id": "c",
            "output": [{"type": "input_file", "file_id": "f"}]}]}),
            "input",
            "`input_file`",
        ),
        (json!({"model": "m", "input": 3}), "input", "string or a list"),
        (json!({"model": "m", "input": "x", "text": {"format": {"type": "yaml"}}}), "text", "`text.format`"),
    ];
    for (request, param, message) in cases {
        let error = chat_request(&request, &[]).unwrap_err();
        assert_eq!(error.param, param, "{request}");
        assert!(error.message.contains(message), "{} does not say {message}", error.message);
    }
    let previous = [json!({"type": "web_search_call", "id": "ws_1"})];
    let error = chat_request(&json!({"model": "m", "input": "x"}), &previous).unwrap_err();
    assert!(error.message.starts_with("previous_response_id (item 0): an item of type `web_search_call`"));
}

#[test]
fn the_response_skeleton_echoes_the_request_with_openai_defaults() {
    let request = json!({"model": "m", "input": "x", "background": true, "instructions": "I", "metadata": {"a": "b"}});
    let skeleton = response_skeleton(&request, "resp_1", 1700);
    assert_eq!(skeleton["status"], "queued");
    assert_eq!(skeleton["object"], "response");
    assert_eq!(skeleton["instructions"], "I");
    assert_eq!(skeleton["tool_choice"], "auto");
    assert_eq!(skeleton["output"], json!([]));
    assert_eq!(skeleton["metadata"], json!({"a": "b"}));
    assert_eq!(skeleton["text"], json!({"format": {"type": "text"}}));
    assert_eq!(response_skeleton(&json!({"model": "m"}), "resp_2", 0)["status"], "in_progress");
}

#[test]
fn chat_usage_is_responses_usage() {
    let chat = json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": 2}});
    assert_eq!(
        usage(&chat),
        json!({"input_tokens": 10, "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
            "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 2}, "total_tokens": 15})
    );
    assert_eq!(usage(&json!({"prompt_tokens": 1, "completion_tokens": 2}))["total_tokens"], 3);
}
