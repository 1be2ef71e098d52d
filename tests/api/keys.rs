//! Service keys, quotas, rates, and retention.

use crate::helpers::*;
use serde_json::{Value, json};
use std::time::Duration;

/// Creates a key with the CLI (a separate process on the same store) and returns it.
pub(crate) fn create_key(app: &TestApp, name: &str, limits: &[&str]) -> String {
    let mut args = vec!["create", "--name", name];
    args.extend(limits);
    let out = keys_cli(app.data_dir.path(), &args);
    let key = out.lines().last().unwrap().trim().to_owned();
    assert!(key.starts_with("ofk_") && key.len() > 40, "{out}");
    key
}

async fn create_with(app: &TestApp, header: (&str, String), body: &Value) -> reqwest::Response {
    app.client.post(app.url("/v1/async-chatgpt")).header(header.0, header.1).json(body).send().await.unwrap()
}

#[tokio::test]
async fn with_a_key_in_the_store_every_create_needs_one_in_any_of_three_headers() {
    let app = spawn_app().await;
    let open = app.create("async-chatgpt", &json!({"messages": user("hi")})).await;
    assert_eq!(open.status(), 200, "no keys: the server runs open");

    let key = create_key(&app, "site", &[]);
    let body = json!({"messages": user("hi")});
    let missing = app.create("async-chatgpt", &body).await;
    assert_eq!(missing.status(), 401);
    let error: Value = missing.json().await.unwrap();
    assert!(error["error"]["message"].as_str().unwrap().contains("X-API-Key"));
    assert_eq!(create_with(&app, ("X-API-Key", "ofk_wrong".into()), &body).await.status(), 401);
    for header in ["Authorization", "X-API-Key", "X-RapidAPI-Key"] {
        let value = if header == "Authorization" { format!("Bearer {key}") } else { key.clone() };
        let response = create_with(&app, (header, value), &body).await;
        assert_eq!(response.status(), 200, "{header}");
        // The status endpoints stay governed by the request's own access, not by service keys.
        let created: Value = response.json().await.unwrap();
        assert_eq!(app.get(&endpoint(&created, "status_url"), None).await.status(), 200);
    }
    let listed = keys_cli(app.data_dir.path(), &["list"]);
    let row = listed.lines().find(|l| l.contains(" site ")).unwrap();
    assert!(row.contains("active") && row.split_whitespace().rev().take(2).all(|n| n == "3"), "{listed}");

    let other = create_key(&app, "other", &[]);
    keys_cli(app.data_dir.path(), &["revoke", "site"]);
    assert_eq!(create_with(&app, ("X-API-Key", key), &body).await.status(), 401);
    assert_eq!(create_with(&app, ("X-API-Key", other), &body).await.status(), 200);
    assert!(keys_cli(app.data_dir.path(), &["list"]).contains("revoked"));
    // With every key revoked, the server is open again.
    keys_cli(app.data_dir.path(), &["revoke", "other"]);
    assert_eq!(app.create("async-chatgpt", &body).await.status(), 200);
}

pub(crate) async fn burst(app: &TestApp, key: &str, body: &Value, n: usize) -> Vec<reqwest::Response> {
    let calls = (0..n).map(|_| create_with(app, ("X-API-Key", key.to_owned()), body));
    futures_util::future::join_all(calls).await
}

#[tokio::test]
async fn a_daily_quota_is_exact_under_50_concurrent_calls_and_refusals_are_not_counted() {
    let app = spawn_app().await;
    let key = create_key(&app, "daily", &["--requests-per-day", "20"]);
    let body = json!({"messages": user("hi")});
    let responses = burst(&app, &key, &body, 50).await;
    let ok = responses.iter().filter(|r| r.status() == 200).count();
    assert_eq!(ok, 20);
    let refused: Vec<_> = responses.into_iter().filter(|r| r.status() == 429).collect();
    assert_eq!(refused.len(), 30);
    let retry_after: u64 = refused[0].headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry_after));
    let error: Value = refused.into_iter().next().unwrap().json().await.unwrap();
    assert!(error["error"]["message"].as_str().unwrap().contains("20 requests per day"), "{error}");
    let row = keys_cli(app.data_dir.path(), &["list"]);
    assert!(
        row.lines().any(|l| l.contains(" daily ") && l.split_whitespace().rev().take(2).all(|n| n == "20")),
        "{row}"
    );
    assert_eq!(app.total_requests(), 20);
}

#[tokio::test]
async fn a_monthly_quota_counts_only_accepted_calls() {
    let app = spawn_app().await;
    let key = create_key(&app, "monthly", &["--requests-per-month", "3"]);
    // A call refused for a bad body is not counted.
    let bad = create_with(&app, ("X-API-Key", key.clone()), &json!({"messages": []})).await;
    assert_eq!(bad.status(), 400);
    let responses = burst(&app, &key, &json!({"messages": user("hi")}), 50).await;
    assert_eq!(responses.iter().filter(|r| r.status() == 200).count(), 3);
    let refused = responses.into_iter().find(|r| r.status() == 429).unwrap();
    let error: Value = refused.json().await.unwrap();
    assert!(error["error"]["message"].as_str().unwrap().contains("per month"));
}

#[tokio::test]
async fn a_rate_limit_admits_its_bucket_and_no_more_under_50_concurrent_calls() {
    let app = spawn_app().await;
    let key = create_key(&app, "rated", &["--rate", "5"]);
    let started = std::time::Instant::now();
    let responses = burst(&app, &key, &json!({"messages": user("hi")}), 50).await;
    let elapsed = started.elapsed().as_secs_f64();
    let ok = responses.iter().filter(|r| r.status() == 200).count();
    // A bucket of one second's worth (5), plus what refilled at 5/s while the burst lasted.
    assert!(ok >= 5 && ok <= 5 + (elapsed * 5.0).floor() as usize, "{ok} admitted in {elapsed} s");
    let refused = responses.into_iter().find(|r| r.status() == 429).unwrap();
    assert!(refused.headers().contains_key("retry-after"));

    let slow = create_key(&app, "slow", &["--rate", "0.2"]);
    let responses = burst(&app, &slow, &json!({"messages": user("hi")}), 50).await;
    assert_eq!(responses.iter().filter(|r| r.status() == 200).count(), 1);
    assert_eq!(responses.iter().filter(|r| r.status() == 429).count(), 49);
}

#[tokio::test]
async fn max_in_flight_admits_that_many_running_requests_at_once() {
    let app = spawn_app().await;
    let key = create_key(&app, "parallel", &["--max-in-flight", "3", "--requests-per-day", "5"]);
    let slow = json!({"messages": user("hi"), "mock": {"words": 10, "delay_ms": 50}});
    let responses = burst(&app, &key, &slow, 50).await;
    let accepted: Vec<Value> = {
        let mut v = Vec::new();
        for r in responses {
            if r.status() == 200 {
                v.push(r.json().await.unwrap());
            } else {
                assert_eq!(r.status(), 429);
            }
        }
        v
    };
    assert_eq!(accepted.len(), 3);
    for created in &accepted {
        app.wait_final(&endpoint(created, "status_url"), None).await;
    }
    // The slots are free again, and the 47 refusals were not counted: 2 of the 5 a day remain.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let responses = burst(&app, &key, &json!({"messages": user("hi")}), 3).await;
    assert_eq!(responses.iter().filter(|r| r.status() == 200).count(), 2);
}

#[tokio::test]
async fn retention_deletes_finished_requests_and_everything_of_them() {
    let app = spawn_with(|a| a.retention = Some("1s".into())).await;
    let done = app.stream(json!({"messages": user("hi"), "mock": {"words": 3}})).await;
    let running = app.stream(json!({"messages": user("hi"), "mock": {"words": 200, "delay_ms": 20}})).await;
    let done_url = endpoint(&done, "status_url");
    app.wait_final(&done_url, None).await;
    let id = id_of(&done_url);
    assert_eq!(app.rows_of(&id).0, 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.rows_of(&id) != (0, 0, 0) {
        assert!(tokio::time::Instant::now() < deadline, "not deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.get(&done_url, None).await.status(), 404);
    let doc = app.get_json(&endpoint(&running, "status_url"), None).await;
    assert!(!matches!(doc["status"].as_str(), Some("done" | "error" | "stop")), "a running request is kept");
}

#[tokio::test]
async fn whether_any_key_exists_is_reused_for_the_key_cache_ttl() {
    let app = spawn_with(|a| a.key_cache_ttl = Some("1h".into())).await;
    let body = json!({"messages": user("hi")});
    assert_eq!(app.create("async-chatgpt", &body).await.status(), 200, "no keys: the server runs open");
    let key = create_key(&app, "late", &[]);
    assert_eq!(app.create("async-chatgpt", &body).await.status(), 200, "still open until the answer expires");
    assert_eq!(create_with(&app, ("X-API-Key", key), &body).await.status(), 200);
}
