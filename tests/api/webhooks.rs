//! Section 7: webhooks.

use crate::helpers::*;
use base64::Engine as _;
use hmac::Mac;
use serde_json::{Value, json};
use std::time::Duration;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Verifies a Standard Webhooks signature independently of the server's code.
fn verify(hit: &Hit) -> bool {
    let key = base64::engine::general_purpose::STANDARD.decode(SECRET.trim_start_matches("whsec_")).unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.{}", hit.header("webhook-id"), hit.header("webhook-timestamp"), hit.body).as_bytes());
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    hit.header("webhook-signature").split(' ').any(|s| s == format!("v1,{expected}"))
}

async fn webhook_app(backoff: &str) -> TestApp {
    let backoff = backoff.to_owned();
    spawn_with(move |a| {
        a.allow_private_webhooks = Some(true);
        a.webhook_secret = Some(SECRET.into());
        a.webhook_backoff = Some(backoff);
    })
    .await
}

#[tokio::test]
async fn a_final_request_is_posted_as_a_signed_form_with_its_document() {
    let receiver = receiver(vec![]).await;
    let app = webhook_app("50ms").await;
    let created = app.stream(json!({"messages": user("hi"), "webhook_url": receiver.url, "mock": {"words": 3}})).await;
    let status_url = endpoint(&created, "status_url");
    let hit = receiver.wait_hits(1).await.remove(0);
    assert_eq!(hit.header("content-type"), "application/x-www-form-urlencoded");
    assert!(hit.header("webhook-id").starts_with("msg_"));
    let timestamp: i64 = hit.header("webhook-timestamp").parse().unwrap();
    assert!((timestamp - created["created_at"].as_i64().unwrap()).abs() < 30);
    assert!(verify(&hit), "the signature verifies");
    let sent = hit.document();
    assert_eq!(sent["status"], "done");
    assert_eq!(sent["endpoints"]["status_url"], status_url.as_str());
    assert_eq!(sent["options"]["webhook_url"], receiver.url.as_str());
    assert!(sent["response"]["body"]["choices"][0]["message"]["content"].is_string());

    let doc = wait_webhook(&app, &status_url).await;
    assert_eq!(doc["webhook"]["state"], "delivered");
    assert_eq!(doc["webhook"]["attempts"], 1);
    assert_eq!(doc["webhook"]["last_status_code"], 200);
    // The document posted is the final document (without the webhook's own progress).
    let mut without_webhook = doc.clone();
    without_webhook.as_object_mut().unwrap().remove("webhook");
    assert_eq!(sent, without_webhook);
}

#[tokio::test]
async fn a_running_request_shows_its_webhook_as_waiting() {
    let receiver = receiver(vec![]).await;
    let app = webhook_app("50ms").await;
    let created = app
        .stream(json!({"messages": user("hi"), "webhook_url": receiver.url, "mock": {"words": 50, "delay_ms": 20}}))
        .await;
    let doc = app.get_json(&endpoint(&created, "status_url"), None).await;
    assert_eq!(doc["webhook"], json!({"state": "waiting", "attempts": 0}));
}

#[tokio::test]
async fn a_receiver_that_fails_twice_gets_three_attempts_with_the_same_id() {
    let receiver = receiver(vec![(500, None), (503, None)]).await;
    let app = webhook_app("100ms").await;
    let created = app.create_ok("async-chatgpt", &json!({"messages": user("hi"), "webhook_url": receiver.url})).await;
    let doc = wait_webhook(&app, &endpoint(&created, "status_url")).await;
    assert_eq!(doc["webhook"]["state"], "delivered");
    assert_eq!(doc["webhook"]["attempts"], 3);
    let hits = receiver.wait_hits(3).await;
    assert_eq!(hits.len(), 3);
    assert!(hits.iter().all(|h| h.header("webhook-id") == hits[0].header("webhook-id")));
    assert!(hits.iter().all(verify));
    // Backoff: the second retry waits longer than the first (100 ms, then 200 ms, each with jitter of up to half).
    assert!(hits[1].at - hits[0].at >= Duration::from_millis(50));
    assert!(hits[2].at - hits[1].at >= Duration::from_millis(100));
}

#[tokio::test]
async fn retry_after_of_a_429_is_honoured_and_other_4xx_end_the_delivery() {
    let receiver = receiver(vec![(429, Some(1))]).await;
    let app = webhook_app("10ms").await;
    let created = app.create_ok("async-chatgpt", &json!({"messages": user("hi"), "webhook_url": receiver.url})).await;
    let doc = wait_webhook(&app, &endpoint(&created, "status_url")).await;
    assert_eq!(doc["webhook"]["state"], "delivered");
    let hits = receiver.wait_hits(2).await;
    assert!(hits[1].at - hits[0].at >= Duration::from_millis(950), "Retry-After: 1 was not honoured");

    let refusing = crate::helpers::receiver(vec![(410, None)]).await;
    let created = app.create_ok("async-chatgpt", &json!({"messages": user("hi"), "webhook_url": refusing.url})).await;
    let doc = wait_webhook(&app, &endpoint(&created, "status_url")).await;
    assert_eq!(doc["webhook"]["state"], "failed");
    assert_eq!(doc["webhook"]["attempts"], 1);
    assert_eq!(doc["webhook"]["last_status_code"], 410);
}

#[tokio::test]
async fn retries_stop_when_the_retry_time_is_over() {
    let receiver = receiver(vec![(500, None); 100]).await;
    let app = spawn_with(|a| {
        a.allow_private_webhooks = Some(true);
        a.webhook_backoff = Some("50ms".into());
        a.webhook_retry_for = Some("400ms".into());
    })
    .await;
    let created = app.create_ok("async-chatgpt", &json!({"messages": user("hi"), "webhook_url": receiver.url})).await;
    let doc = wait_webhook(&app, &endpoint(&created, "status_url")).await;
    assert_eq!(doc["webhook"]["state"], "failed");
    let attempts = doc["webhook"]["attempts"].as_u64().unwrap();
    assert!((2..=8).contains(&attempts), "{attempts} attempts in 400 ms of retries");
    assert_eq!(receiver.hits.lock().len() as u64, attempts);
}

#[tokio::test]
async fn a_delivery_survives_a_restart_of_the_server() {
    let receiver = receiver(vec![(503, None)]).await;
    let mut app = webhook_app("1s").await;
    let created = app.create_ok("async-chatgpt", &json!({"messages": user("hi"), "webhook_url": receiver.url})).await;
    receiver.wait_hits(1).await;
    app.shutdown().await;
    assert_eq!(receiver.hits.lock().len(), 1);

    let data_dir = app.data_dir.path().to_path_buf();
    let again = spawn_with(move |a| {
        a.data_dir = Some(data_dir);
        a.allow_private_webhooks = Some(true);
        a.webhook_secret = Some(SECRET.into());
    })
    .await;
    let status_url = endpoint(&created, "status_url").replacen(&app.base, &again.base, 1);
    let doc = wait_webhook(&again, &status_url).await;
    assert_eq!(doc["webhook"]["state"], "delivered");
    assert_eq!(doc["webhook"]["attempts"], 2);
    let hits = receiver.wait_hits(2).await;
    assert_eq!(hits[0].header("webhook-id"), hits[1].header("webhook-id"));
    assert!(verify(&hits[1]));
}

#[tokio::test]
async fn a_request_interrupted_by_shutdown_still_sends_its_webhook() {
    let receiver = receiver(vec![]).await;
    let mut app = spawn_with(|a| {
        a.allow_private_webhooks = Some(true);
        a.shutdown_grace = Some(0.2);
    })
    .await;
    let created = app
        .stream(json!({"messages": user("hi"), "webhook_url": receiver.url, "mock": {"words": 500, "delay_ms": 20}}))
        .await;
    app.wait_status(&endpoint(&created, "status_url"), "streaming").await;
    app.shutdown().await;
    let data_dir = app.data_dir.path().to_path_buf();
    let _again = spawn_with(move |a| {
        a.data_dir = Some(data_dir);
        a.allow_private_webhooks = Some(true);
    })
    .await;
    let hit = receiver.wait_hits(1).await.remove(0);
    let sent = hit.document();
    assert_eq!(sent["status"], "error");
    assert_eq!(sent["error"]["code"], "interrupted");
}

#[tokio::test]
async fn webhook_urls_into_private_networks_are_refused_at_creation() {
    let app = spawn_app().await;
    for url in [
        "http://127.0.0.1:9/hook",
        "http://localhost:9/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.8/hook",
        "http://[::1]:9/hook",
        "http://100.100.100.200/",
    ] {
        let response = app.create("stream-chatgpt", &json!({"messages": user("hi"), "webhook_url": url})).await;
        assert_eq!(response.status(), 400, "{url}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["param"], "webhook_url", "{url}");
    }
    assert_eq!(app.total_requests(), 0);
}
