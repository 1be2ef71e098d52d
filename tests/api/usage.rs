//! Section 14, the usage of every request: a stream asks its upstream for its usage even when the caller did not;
//! then the usage-only chunk is recorded (the document's body, the raw response) but never reaches that caller.

use crate::helpers::*;
use serde_json::{Value, json};

/// Whether an event is a usage-only chunk (no choices, a usage).
fn usage_only(event: &Event) -> bool {
    let Ok(chunk) = serde_json::from_str::<Value>(&event.data) else { return false };
    chunk["choices"].as_array().is_some_and(Vec::is_empty) && chunk["usage"].is_object()
}

/// The usage the mock reports for an answer of `words` words to the message "hi".
fn expected_usage(doc: &Value, words: u64) {
    let usage = &doc["response"]["body"]["usage"];
    assert_eq!(usage["completion_tokens"], words, "{usage}");
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 0, "{usage}");
    assert_eq!(usage["total_tokens"], prompt + words, "{usage}");
}

#[tokio::test]
async fn a_stream_records_its_usage_without_sending_the_usage_chunk_to_a_caller_who_did_not_ask() {
    let app = spawn_app().await;
    let created = app.stream(json!({"messages": user("hi"), "mock": {"words": 5}})).await;
    let events = app.events(&endpoint(&created, "stream_events_url"), &[]).await;
    assert!(!events.iter().any(usage_only), "a usage chunk reached the caller: {events:?}");
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let status_url = endpoint(&created, "status_url");
    let doc = app.wait_final(&status_url, None).await;
    assert_eq!(doc["status"], "done");
    expected_usage(&doc, 5);
    // What was sent upstream, as the document shows it: the server asked for the usage.
    assert_eq!(doc["parameters"]["stream_options"], json!({"include_usage": true}));
    // The raw response keeps the chunk, exactly where the upstream sent it: after the events, before [DONE].
    let raw = app.get(&status_url.replace(".json", ".raw"), None).await.text().await.unwrap();
    let (_, body) = raw.split_once("\r\n\r\n").unwrap();
    let sent: Vec<&str> = body.split("\n\n").filter(|frame| !frame.is_empty()).collect();
    let relayed: Vec<String> = events.iter().map(|e| format!("data: {}", e.data)).collect();
    assert_eq!(sent.len(), relayed.len() + 1, "{body}");
    assert_eq!(sent[..relayed.len() - 1], relayed[..relayed.len() - 1]);
    let usage: Value = serde_json::from_str(sent[relayed.len() - 1].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(usage["usage"], doc["response"]["body"]["usage"]);
    assert_eq!(*sent.last().unwrap(), "data: [DONE]");
    // A replay from the store is the same as the live run: no usage chunk either.
    let replay = app.events(&endpoint(&created, "stream_events_url"), &[]).await;
    assert_eq!(replay, events);
}

#[tokio::test]
async fn a_caller_who_asked_for_the_usage_gets_its_chunk_as_an_event() {
    let app = spawn_app().await;
    let body = json!({"messages": user("hi"), "mock": {"words": 3}, "stream_options": {"include_usage": true}});
    let created = app.stream(body).await;
    let events = app.events(&endpoint(&created, "stream_events_url"), &[]).await;
    let usage_events: Vec<&Event> = events.iter().filter(|e| usage_only(e)).collect();
    assert_eq!(usage_events.len(), 1, "{events:?}");
    assert_eq!(events[events.len() - 2], *usage_events[0], "the usage chunk comes last, before [DONE]");
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    expected_usage(&doc, 3);
}

#[tokio::test]
async fn the_openai_entry_streams_no_usage_chunk_unless_asked_and_records_the_usage_either_way() {
    let app = spawn_app().await;
    for asked in [false, true] {
        let mut body = json!({"model": "m", "messages": user("hi"), "stream": true, "mock": {"words": 4}});
        if asked {
            body["stream_options"] = json!({"include_usage": true});
        }
        let response = app.client.post(app.url("/v1/chat/completions")).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let status_url = response.headers()["x-offload-status-url"].to_str().unwrap().to_owned();
        let events = read_events(response).await;
        assert_eq!(events.iter().filter(|e| usage_only(e)).count(), usize::from(asked), "asked: {asked}: {events:?}");
        let doc = app.wait_final(&status_url, None).await;
        expected_usage(&doc, 4);
    }
}

#[tokio::test]
async fn an_async_request_keeps_the_usage_of_the_upstreams_answer() {
    let app = spawn_app().await;
    let created = app.create_ok("async-chatgpt", &json!({"messages": user("hi"), "mock": {"words": 2}})).await;
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    expected_usage(&doc, 2);
    assert!(doc["parameters"].get("stream_options").is_none(), "{}", doc["parameters"]);
}
