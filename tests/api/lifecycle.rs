//! DELETE, and shutdown.

use crate::helpers::*;
use serde_json::{Value, json};
use std::time::Duration;

#[tokio::test]
async fn delete_removes_the_request_and_everything_of_it() {
    let app = spawn_app().await;
    let created = app.stream(json!({"messages": user("hi"), "mock": {"words": 5}})).await;
    let status_url = endpoint(&created, "status_url");
    app.wait_final(&status_url, None).await;
    let id = id_of(&status_url);
    let (requests, events, raw) = app.rows_of(&id);
    assert_eq!(requests, 1);
    assert!(events == 7 && raw > 0, "{events} events (role, 5 words, finish), {raw} raw parts");
    let response = app.client.delete(&status_url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["status"], "success");
    assert_eq!(app.rows_of(&id), (0, 0, 0));
    for url in [status_url.clone(), endpoint(&created, "stream_events_url"), status_url.replace(".json", ".raw")] {
        assert_eq!(app.get(&url, None).await.status(), 404, "{url}");
    }
    assert_eq!(app.client.delete(&status_url).send().await.unwrap().status(), 404);
}

#[tokio::test]
async fn deleting_a_running_private_request_needs_its_token_and_ends_the_upstream_call() {
    let app = spawn_app().await;
    let created =
        app.stream(json!({"messages": user("hi"), "access": "private", "mock": {"words": 500, "delay_ms": 10}})).await;
    let bearer = created["authorization"]["bearer_token"].as_str().unwrap();
    let status_url = endpoint(&created, "status_url");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(app.client.delete(&status_url).send().await.unwrap().status(), 401);
    assert_eq!(app.client.delete(&status_url).bearer_auth(bearer).send().await.unwrap().status(), 200);
    assert_eq!(app.rows_of(&id_of(&status_url)), (0, 0, 0));
    // The upstream call ends: the request's tasks are gone, and wrote nothing on their way out.
    app.wait_mock_stat("disconnected", 1).await;
    assert_eq!(app.rows_of(&id_of(&status_url)), (0, 0, 0), "nothing is written after the delete");
}

#[tokio::test]
async fn shutdown_refuses_new_requests_lets_short_ones_finish_and_interrupts_the_rest() {
    let mut app = spawn_with(|a| a.shutdown_grace = Some(0.5)).await;
    let short = app.stream(json!({"messages": user("hi"), "mock": {"words": 5, "delay_ms": 40}})).await;
    let long = app.stream(json!({"messages": user("hi"), "mock": {"words": 500, "delay_ms": 20}})).await;
    app.wait_status(&endpoint(&long, "status_url"), "streaming").await;
    app.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let refused = app.create("stream-chatgpt", &json!({"messages": user("late")})).await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    app.shutdown().await;

    // Read the store back with a new server on the same data directory.
    let data_dir = app.data_dir.path().to_path_buf();
    let again = spawn_with(|a| a.data_dir = Some(data_dir)).await;
    let rebase = |url: String| url.replacen(&app.base, &again.base, 1);
    let short_doc = again.get_json(&rebase(endpoint(&short, "status_url")), None).await;
    assert_eq!(short_doc["status"], "done");
    let long_doc = again.get_json(&rebase(endpoint(&long, "status_url")), None).await;
    assert_eq!(long_doc["status"], "error");
    assert_eq!(long_doc["error"]["code"], "interrupted");
    assert!(!long_doc["response"]["body"]["choices"][0]["message"]["content"].as_str().unwrap().is_empty());
    assert_eq!(app.total_requests(), 2, "the refused request left nothing behind");
}
