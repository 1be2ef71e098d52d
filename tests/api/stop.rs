//! Section 5: the stop switch.

use crate::helpers::*;
use serde_json::{Value, json};
use std::time::Duration;

#[tokio::test]
async fn stop_drops_the_upstream_connection_keeps_the_text_and_ends_readers() {
    let app = spawn_app().await;
    let created = app.stream(json!({"messages": user("hi"), "mock": {"words": 500, "delay_ms": 20}})).await;
    let status_url = endpoint(&created, "status_url");
    let reader = {
        let url = endpoint(&created, "stream_events_url");
        let client = app.client.clone();
        tokio::spawn(async move { read_events(client.get(&url).send().await.unwrap()).await })
    };
    app.wait_status(&status_url, "streaming").await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let response = app.get(&endpoint(&created, "stop_url"), None).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "success");

    let doc = app.get_json(&status_url, None).await;
    assert_eq!(doc["status"], "stop", "stop is final at once");
    let events = tokio::time::timeout(Duration::from_secs(5), reader).await.unwrap().unwrap();
    let n = events.len();
    assert_eq!(events[n - 1].data, "[DONE]");
    assert_eq!(events[n - 2].event, "stop");
    let stop_event: Value = serde_json::from_str(&events[n - 2].data).unwrap();
    assert_eq!(stop_event["status"], "stop");
    let text = content_of(&events);
    assert!(!text.is_empty() && text.split_whitespace().count() < 500);

    let doc = app.wait_final(&status_url, None).await;
    assert_eq!(doc["response"]["body"]["choices"][0]["message"]["content"], text.as_str());
    // The mock saw the connection go away mid-stream.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while app.mock_stats().await["disconnected"] != 1 {
        assert!(tokio::time::Instant::now() < deadline, "upstream connection was not dropped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nothing more arrives after the stop.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(app.get_json(&status_url, None).await, doc);

    let again = app.client.post(endpoint(&created, "stop_url")).send().await.unwrap();
    assert_eq!(again.status(), 405);
}

#[tokio::test]
async fn stop_after_finish_is_405() {
    let app = spawn_app().await;
    let created = app.stream(json!({"messages": user("hi"), "mock": {"words": 2}})).await;
    app.wait_final(&endpoint(&created, "status_url"), None).await;
    for method in [reqwest::Method::GET, reqwest::Method::POST] {
        let response = app.client.request(method, endpoint(&created, "stop_url")).send().await.unwrap();
        assert_eq!(response.status(), 405);
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["status"], "error");
    }
}

#[tokio::test]
async fn stop_by_post_works_on_a_private_async_request_with_its_token() {
    let app = spawn_app().await;
    let created = app
        .create_ok("async-chatgpt", &json!({"messages": user("hi"), "access": "private", "mock": {"ttft_ms": 5000}}))
        .await;
    let bearer = created["authorization"]["bearer_token"].as_str().unwrap();
    let stop_url = endpoint(&created, "stop_url");
    assert_eq!(app.client.post(&stop_url).send().await.unwrap().status(), 401);
    let response = app.client.post(&stop_url).bearer_auth(bearer).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let doc = app.wait_final(&endpoint(&created, "status_url"), Some(bearer)).await;
    assert_eq!(doc["status"], "stop");
}
