//! `GET /v1/models` against an upstream of the test's own: JSON only (with `nosniff`) whatever the upstream
//! answers, reused per upstream key, and paced by the service key's rate.

use crate::helpers::*;
use crate::keys::create_key;
use axum::http::{HeaderMap, StatusCode, header};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// An upstream on loopback whose `/v1/models` answers `answer(key)` (the caller's `Authorization` token, or ""),
/// counting its calls. Returns its API base.
async fn upstream(calls: Arc<AtomicUsize>, answer: fn(&str) -> (&'static str, String)) -> String {
    let site = axum::Router::new().route(
        "/v1/models",
        axum::routing::get(move |headers: HeaderMap| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let key = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .unwrap_or_default()
                    .to_owned();
                let (content_type, body) = answer(&key);
                (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], body)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, site).await.unwrap() });
    base
}

async fn burst_of_models(app: &TestApp, n: usize, headers: &[(&str, &str)]) -> Vec<reqwest::Response> {
    let calls = (0..n).map(|_| {
        let mut request = app.client.get(app.url("/v1/models"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send()
    });
    futures_util::future::join_all(calls).await.into_iter().map(Result::unwrap).collect()
}

#[tokio::test]
async fn models_from_an_upstream_answering_html_is_a_json_error_with_nosniff_and_one_upstream_call() {
    let calls = Arc::new(AtomicUsize::new(0));
    let base = upstream(calls.clone(), |_| ("text/html", "<script>alert(document.domain)</script>".into())).await;
    let app = spawn_with(|a| a.upstream_url = Some(base.parse().unwrap())).await;

    let responses = burst_of_models(&app, 20, &[]).await;
    for response in responses {
        assert_eq!(response.status(), 502);
        assert_eq!(response.headers()["content-type"], "application/json");
        assert_eq!(response.headers()["x-content-type-options"], "nosniff");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["status"], "error");
        assert_eq!(body["error"]["code"], "upstream_error");
        assert!(body["error"]["message"].as_str().unwrap().contains("not JSON"), "{body}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "a burst of 20 makes one upstream call");
}

#[tokio::test]
async fn models_is_json_with_nosniff_and_reused_per_upstream_key_only() {
    let calls = Arc::new(AtomicUsize::new(0));
    // The upstream's Content-Type is not trusted either way: offload answers application/json.
    let base =
        upstream(calls.clone(), |key| ("text/html", json!({"object": "list", "data": [{"id": key}]}).to_string()))
            .await;
    let app = spawn_with(|a| {
        a.upstream_url = Some(base.parse().unwrap());
        a.upstream_key = Some("sk-server".into());
    })
    .await;

    for (key, seen) in [(None, "sk-server"), (Some("sk-alice"), "sk-alice"), (Some("sk-bob"), "sk-bob")] {
        let headers: Vec<(&str, &str)> = key.map(|k| ("X-OpenAI-API-Key", k)).into_iter().collect();
        for response in burst_of_models(&app, 10, &headers).await {
            assert_eq!(response.status(), 200);
            assert_eq!(response.headers()["content-type"], "application/json");
            assert_eq!(response.headers()["x-content-type-options"], "nosniff");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["data"][0]["id"], seen, "each key sees its own upstream answer");
        }
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3, "one upstream call per upstream key");

    // With the cache turned off, every call goes to the upstream.
    let uncached = spawn_with(|a| {
        a.upstream_url = Some(base.parse().unwrap());
        a.models_cache = Some("0".into());
    })
    .await;
    let before = calls.load(Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(uncached.client.get(uncached.url("/v1/models")).send().await.unwrap().status(), 200);
    }
    assert_eq!(calls.load(Ordering::SeqCst) - before, 3);
}

#[tokio::test]
async fn models_counts_against_the_service_keys_rate() {
    let calls = Arc::new(AtomicUsize::new(0));
    let base =
        upstream(calls.clone(), |_| ("application/json", json!({"object": "list", "data": []}).to_string())).await;
    let app = spawn_with(|a| a.upstream_url = Some(base.parse().unwrap())).await;
    let key = create_key(&app, "rated", &["--rate", "0.2"]);

    let bearer = format!("Bearer {key}");
    let responses = burst_of_models(&app, 20, &[("Authorization", &bearer)]).await;
    let statuses: Vec<u16> = responses.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 19, "{statuses:?}");
    let refused = responses.into_iter().find(|r| r.status() == 429).unwrap();
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    assert!(calls.load(Ordering::SeqCst) <= 1);

    // The bucket is the creates' own: it is empty for them too.
    let create = app
        .client
        .post(app.url("/v1/async-chatgpt"))
        .bearer_auth(&key)
        .json(&json!({"messages": user("hi")}))
        .send()
        .await
        .unwrap();
    assert_eq!(create.status(), 429);
}
