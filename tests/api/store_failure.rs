//! A store that fails, caused for real (see [`super::flaky`]): loud, refusing creates, losing nothing accepted.

use super::flaky::spawn_flaky;
use super::helpers::*;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[tokio::test]
async fn a_failing_store_is_loud_refuses_creates_and_loses_no_accepted_request() {
    let (app, flaky) = spawn_flaky().await;
    assert_eq!(app.get(&app.url("/healthz"), None).await.status(), 200);
    let created = app.stream(json!({"messages": user("hi"), "mock": {"words": 40, "delay_ms": 15}})).await;
    let status_url = endpoint(&created, "status_url");
    app.wait_status(&status_url, "streaming").await;

    flaky.fail_writes.store(true, Ordering::SeqCst);
    // The upstream finishes while nothing can be stored.
    app.wait_mock_stat("completed", 1).await;
    let health = app.get(&app.url("/healthz"), None).await;
    assert_eq!(health.status(), 503);
    let health: serde_json::Value = health.json().await.unwrap();
    assert_eq!(health["error"]["code"], "store_failing", "{health}");
    let refused = app.create("stream-chatgpt", &json!({"messages": user("more")})).await;
    assert_eq!(refused.status(), 503);
    let refused: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(refused["status"], "error");
    // Nothing final is shown while it cannot be stored.
    let doc = app.get_json(&status_url, None).await;
    assert_eq!(doc["status"], "streaming", "{doc}");

    flaky.fail_writes.store(false, Ordering::SeqCst);
    let doc = app.wait_final(&status_url, None).await;
    assert_eq!(doc["status"], "done", "{doc}");
    let events = app.events(&endpoint(&created, "stream_events_url"), &[]).await;
    assert_eq!(events.iter().filter(|e| !e.id.is_empty() && e.data != "[DONE]").count(), 42, "every chunk kept");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.get(&app.url("/healthz"), None).await.status() != 200 {
        assert!(tokio::time::Instant::now() < deadline, "health never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.create("stream-chatgpt", &json!({"messages": user("again")})).await.status(), 200);
}

#[tokio::test]
async fn a_failing_quota_lookup_refuses_the_create_instead_of_admitting_it() {
    let (app, flaky) = spawn_flaky().await;
    let key = keys_cli(app.data_dir.path(), &["create", "--name", "k", "--requests-per-day", "1000"]);
    let key = key.split_whitespace().find(|w| w.starts_with("ofk_")).unwrap().to_owned();
    let create = |key: String| {
        app.client.post(app.url("/v1/stream-chatgpt")).bearer_auth(key).json(&json!({"messages": user("hi")})).send()
    };
    assert_eq!(create(key.clone()).await.unwrap().status(), 200);
    flaky.fail_keys.store(true, Ordering::SeqCst);
    let refused = create(key.clone()).await.unwrap();
    assert_eq!(refused.status(), 503);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["status"], "error", "{body}");
    assert_eq!(app.total_requests(), 1, "the refused create left nothing behind");
}

#[tokio::test]
async fn an_unreadable_quota_count_refuses_the_create_instead_of_counting_it_as_under_quota() {
    let app = spawn_app().await;
    let key = keys_cli(app.data_dir.path(), &["create", "--name", "k", "--requests-per-day", "2"]);
    let key = key.split_whitespace().find(|w| w.starts_with("ofk_")).unwrap().to_owned();
    let create = || {
        app.client.post(app.url("/v1/stream-chatgpt")).bearer_auth(&key).json(&json!({"messages": user("hi")})).send()
    };
    assert_eq!(create().await.unwrap().status(), 200);
    // The stored count becomes unreadable (damaged data), as a failing read would leave it.
    let conn = rusqlite::Connection::open(app.data_dir.path().join("offload.db")).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute("UPDATE key_usage SET count = 'unreadable'", []).unwrap();
    let refused = create().await.unwrap();
    assert_eq!(refused.status(), 503, "a quota that cannot be read must not admit");
    assert_eq!(app.total_requests(), 1);
}

#[tokio::test]
async fn delete_of_a_running_request_while_the_store_fails_answers_503_in_bounded_time_and_deletes_nothing() {
    let (app, flaky) = spawn_flaky().await;
    let created = app.stream(json!({"messages": user("hi"), "mock": {"words": 400, "delay_ms": 20}})).await;
    let status_url = endpoint(&created, "status_url");
    app.wait_status(&status_url, "streaming").await;
    flaky.fail_writes.store(true, Ordering::SeqCst);
    let started = tokio::time::Instant::now();
    let response = app.client.delete(&status_url).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert!(started.elapsed() < Duration::from_secs(20), "answered in bounded time");
    flaky.fail_writes.store(false, Ordering::SeqCst);
    // The call was dropped and the request ends once the store takes it; it was not deleted.
    let doc = app.wait_final(&status_url, None).await;
    assert_eq!(doc["status"], "error", "{doc}");
}

/// The upstream call starts while the insert commits (it need not wait for it); when the insert fails, the create
/// answers 503 and the call is dropped at once, not when the upstream answers.
#[tokio::test]
async fn a_create_whose_insert_fails_answers_503_and_drops_its_upstream_call_at_once() {
    let (app, flaky) = spawn_flaky().await;
    flaky.fail_inserts.store(true, Ordering::SeqCst);
    // The upstream would answer only after 20 s.
    let started = tokio::time::Instant::now();
    let refused = app.create("async-chatgpt", &json!({"messages": user("hi"), "mock": {"ttft_ms": 20000}})).await;
    assert_eq!(refused.status(), 503);
    let refused: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(refused["status"], "error", "{refused}");
    let deadline = started + Duration::from_secs(5);
    loop {
        // 503 (`store_failing`) until the idle persister finds the store takes writes again.
        let health: serde_json::Value = app.get(&app.url("/healthz"), None).await.json().await.unwrap();
        if health["in_flight"] == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the call was not dropped: {health}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    flaky.fail_inserts.store(false, Ordering::SeqCst);
    let created = app.create("async-chatgpt", &json!({"messages": user("again")})).await;
    assert_eq!(created.status(), 200);
    let created: serde_json::Value = created.json().await.unwrap();
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    assert_eq!(doc["status"], "done", "{doc}");
}
