//! Section 4: the event stream.

use crate::helpers::*;
use serde_json::{Value, json};
use std::time::Duration;

#[tokio::test]
async fn every_reader_gets_every_chunk_with_ids_then_done() {
    let app = spawn_app().await;
    let created = app.stream(json!({"messages": user("hi"), "mock": {"words": 20, "delay_ms": 10}})).await;
    let url = endpoint(&created, "stream_events_url");
    let (a, b) = tokio::join!(app.events(&url, &[]), app.events(&url, &[]));
    assert_eq!(a, b);
    let chunks: Vec<_> = a.iter().filter(|e| e.data != "[DONE]").collect();
    assert_eq!(chunks.len(), 22, "role chunk, 20 words, finish chunk");
    for (i, e) in chunks.iter().enumerate() {
        assert_eq!(e.id, (i + 1).to_string());
        assert_eq!(e.event, "message");
        let chunk: Value = serde_json::from_str(&e.data).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk");
    }
    assert_eq!(a.last().unwrap().data, "[DONE]");
    // A reader that comes after the end gets the same replay.
    let late = app.events(&url, &[]).await;
    assert_eq!(late, a);
    // The raw response holds exactly these chunks.
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    assert_eq!(doc["response"]["body"]["choices"][0]["message"]["content"], content_of(&a).as_str());
}

#[tokio::test]
async fn last_event_id_resumes_after_that_event() {
    let app = spawn_app().await;
    let created = app.stream(json!({"messages": user("hi"), "mock": {"words": 10}})).await;
    let url = endpoint(&created, "stream_events_url");
    let all = app.events(&url, &[]).await;
    let by_header = app.events(&url, &[("Last-Event-ID", "5")]).await;
    assert_eq!(by_header[0].id, "6");
    assert_eq!(&by_header[..], &all[5..]);
    let by_query = app.events(&format!("{url}?last_event_id=5"), &[]).await;
    assert_eq!(by_query, by_header);
    let bad = app.client.get(&url).header("Last-Event-ID", "five").send().await.unwrap();
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn a_reader_that_has_everything_of_a_finished_request_gets_204() {
    let app = spawn_app().await;
    let created = app.stream(json!({"messages": user("hi"), "mock": {"words": 3}})).await;
    let url = endpoint(&created, "stream_events_url");
    let all = app.events(&url, &[]).await;
    let last_id = all.iter().rev().find(|e| !e.id.is_empty() && e.data != "[DONE]").unwrap().id.clone();
    let response = app.client.get(&url).header("Last-Event-ID", &last_id).send().await.unwrap();
    assert_eq!(response.status(), 204);
}

#[tokio::test]
async fn a_reader_opened_before_the_upstream_answers_is_held_until_events_flow() {
    let app = spawn_app().await;
    let created = app.stream(json!({"messages": user("hi"), "mock": {"words": 5, "ttft_ms": 500}})).await;
    let url = endpoint(&created, "stream_events_url");
    let status = app.get_json(&endpoint(&created, "status_url"), None).await;
    assert!(matches!(status["status"].as_str(), Some("pending" | "posting")));
    let events = app.events(&url, &[]).await;
    assert_eq!(events.len(), 8);
    assert_eq!(events[0].id, "1");
}

#[tokio::test]
async fn a_stream_cut_by_the_upstream_ends_with_a_named_error_event_before_done() {
    let app = spawn_app().await;
    let created = app.stream(json!({"messages": user("hi"), "mock": {"words": 10, "drop_after": 4}})).await;
    let events = app.events(&endpoint(&created, "stream_events_url"), &[]).await;
    let n = events.len();
    assert_eq!(events[n - 1].data, "[DONE]");
    assert_eq!(events[n - 2].event, "error");
    let error: Value = serde_json::from_str(&events[n - 2].data).unwrap();
    assert_eq!(error["status"], "error");
    assert_eq!(error["error"]["code"], "upstream_error");
    assert_eq!(n - 2, 4, "the four chunks before the drop are kept");
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    assert_eq!(doc["status"], "error");
    assert_eq!(doc["response"]["body"]["choices"][0]["message"]["content"], content_of(&events).as_str());
}

#[tokio::test]
async fn an_idle_stream_gets_keep_alive_comments() {
    let app = spawn_with(|a| a.keep_alive = Some(0.1)).await;
    let created = app.stream(json!({"messages": user("hi"), "mock": {"words": 2, "ttft_ms": 600}})).await;
    let body = app.get(&endpoint(&created, "stream_events_url"), None).await.text().await.unwrap();
    assert!(body.starts_with(": keep-alive\n\n"), "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn a_stalled_reader_holds_up_neither_the_upstream_call_nor_other_readers() {
    let app = spawn_app().await;
    let created = app.stream(json!({"messages": user("hi"), "mock": {"words": 3000}})).await;
    let url = endpoint(&created, "stream_events_url");
    // This reader opens the stream and never reads from it.
    let stalled = app.get(&url, None).await;
    assert_eq!(stalled.status(), 200);
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    assert_eq!(doc["status"], "done");
    let events = tokio::time::timeout(Duration::from_secs(20), app.events(&url, &[])).await.unwrap();
    assert_eq!(events.len(), 3003);
    drop(stalled);
}

#[tokio::test]
async fn async_requests_have_no_event_stream() {
    let app = spawn_app().await;
    let created = app.create_ok("async-chatgpt", &json!({"messages": user("hi")})).await;
    let url = endpoint(&created, "status_url").replace(".json", ".txt");
    assert_eq!(app.get(&url, None).await.status(), 404);
}

#[tokio::test]
async fn a_stream_that_ended_before_its_first_chunk_replays_its_error_and_done_to_a_new_reader() {
    let app = spawn_app().await;
    let created = app.stream(json!({"messages": user("hi"), "mock": {"status": 401}})).await;
    let events_url = endpoint(&created, "stream_events_url");
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    assert_eq!(doc["status"], "error");
    // A reader with nothing yet (a browser's first EventSource connection) gets the replay, not a bare 204.
    let events = app.events(&events_url, &[]).await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].event, "error");
    let error: Value = serde_json::from_str(&events[0].data).unwrap();
    assert_eq!(error["error"]["code"], "upstream_error");
    assert_eq!(events[1].data, "[DONE]");
    // Its reconnect says it has everything (the `[DONE]` carried id 0): 204 ends it.
    let again = app.client.get(&events_url).header("Last-Event-ID", "0").send().await.unwrap();
    assert_eq!(again.status(), 204);
}
