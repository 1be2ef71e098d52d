//! Sections 10 and 11: `POST /v1/chat/completions` and `GET /v1/models` spoken to as an OpenAI SDK would, and
//! upstream retries. (The official Python SDK drives the same endpoints in tests/sdk.rs.)

use crate::helpers::*;
use serde_json::{Value, json};
use std::time::Duration;

async fn chat(app: &TestApp, body: &Value, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = app.client.post(app.url("/v1/chat/completions")).bearer_auth("anything").json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response.headers().get(name).map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn chat_completion_without_stream_answers_the_upstream_body_and_records_a_request() {
    let app = spawn_app().await;
    let body = json!({"model": "gpt-4o-mini", "messages": user("hi"), "mock": {"content": "Hello there"}});
    let response = chat(&app, &body, &[]).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "content-type").as_deref(), Some("application/json"));
    let status_url = header(&response, "x-offload-status-url").unwrap();
    assert!(header(&response, "x-offload-stream-url").is_none());
    assert!(header(&response, "x-offload-bearer-token").is_none());
    let completion: Value = response.json().await.unwrap();
    assert_eq!(completion["object"], "chat.completion");
    assert_eq!(completion["choices"][0]["message"]["content"], "Hello there");
    let doc = app.get_json(&status_url, None).await;
    assert_eq!(doc["status"], "done");
    assert_eq!(doc["response"]["body"], completion);
    assert_eq!(doc["parameters"]["model"], "gpt-4o-mini");
    // The upstream was called without streaming.
    assert_eq!(app.mock_requests().await.last().unwrap()["body"]["stream"], false);
}

#[tokio::test]
async fn chat_completion_stream_relays_the_chunks_and_ends_with_done() {
    let app = spawn_app().await;
    let body = json!({"messages": user("hi"), "stream": true, "mock": {"content": "one two three"}});
    let response = chat(&app, &body, &[]).await;
    assert_eq!(response.status(), 200);
    assert!(header(&response, "content-type").unwrap().starts_with("text/event-stream"));
    let stream_url = header(&response, "x-offload-stream-url").unwrap();
    let status_url = header(&response, "x-offload-status-url").unwrap();
    let events = read_events(response).await;
    assert_eq!(events.last().unwrap().data, "[DONE]");
    assert_eq!(content_of(&events), "one two three");
    // The same events, with the same ids, from the request's own event stream.
    let replay = app.events(&stream_url, &[]).await;
    assert_eq!(
        replay.iter().map(|e| (&e.id, &e.data)).collect::<Vec<_>>(),
        events.iter().map(|e| (&e.id, &e.data)).collect::<Vec<_>>()
    );
    assert_eq!(
        app.wait_final(&status_url, None).await["response"]["body"]["choices"][0]["message"]["content"],
        "one two three"
    );
}

#[tokio::test]
async fn an_upstream_error_keeps_its_status_and_body_streaming_or_not() {
    let app = spawn_with(|a| a.upstream_retries = Some(0)).await;
    for stream in [false, true] {
        let body =
            json!({"messages": user("hi"), "stream": stream, "mock": {"status": 429, "error_message": "Slow down"}});
        let response = chat(&app, &body, &[]).await;
        assert_eq!(response.status(), 429, "stream: {stream}");
        assert!(header(&response, "x-offload-status-url").is_some());
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["message"], "Slow down");
        assert_eq!(error["error"]["type"], "invalid_request_error");
    }
}

#[tokio::test]
async fn private_access_by_header_answers_the_bearer_token_of_a_private_request() {
    let app = spawn_app().await;
    let body = json!({"messages": user("hi"), "stream": true, "mock": {"words": 3}});
    let response = chat(&app, &body, &[("X-Offload-Access", "private")]).await;
    assert_eq!(response.status(), 200);
    let status_url = header(&response, "x-offload-status-url").unwrap();
    let bearer = header(&response, "x-offload-bearer-token").unwrap();
    assert!(status_url.contains("/priv/"));
    read_events(response).await;
    assert_eq!(app.get(&status_url, None).await.status(), 401);
    assert_eq!(app.wait_final(&status_url, Some(&bearer)).await["status"], "done");
}

#[tokio::test]
async fn bad_offload_headers_and_a_bad_stream_flag_are_400() {
    let app = spawn_app().await;
    let body = json!({"messages": user("hi")});
    for (name, value) in [("X-Offload-Access", "secret"), ("X-Offload-On-Disconnect", "later")] {
        let response = chat(&app, &body, &[(name, value)]).await;
        assert_eq!(response.status(), 400);
        assert_eq!(response.json::<Value>().await.unwrap()["error"]["param"], name);
    }
    let response = chat(&app, &json!({"messages": user("hi"), "stream": "yes"}), &[]).await;
    assert_eq!(response.status(), 400);
    assert_eq!(response.json::<Value>().await.unwrap()["error"]["param"], "stream");
    assert_eq!(app.total_requests(), 0);
}

#[tokio::test]
async fn a_caller_that_disconnects_does_not_end_the_call_unless_it_asked_to_stop() {
    let app = spawn_app().await;
    for (on_disconnect, expected) in [("continue", "done"), ("stop", "stop")] {
        let body = json!({"messages": user("hi"), "stream": true, "mock": {"words": 40, "delay_ms": 20}});
        let response = chat(&app, &body, &[("X-Offload-On-Disconnect", on_disconnect)]).await;
        let status_url = header(&response, "x-offload-status-url").unwrap();
        drop(response);
        let doc = app.wait_final(&status_url, None).await;
        assert_eq!(doc["status"], expected, "{on_disconnect}: {doc}");
    }
}

#[tokio::test]
async fn failing_first_attempts_are_retried_and_the_document_lists_them() {
    let app = spawn_app().await;
    for stream in [false, true] {
        let body = json!({"messages": user(&format!("retry {stream}")), "stream": stream,
            "mock": {"fail_first": 2, "status": 503, "content": "at last"}});
        let response = chat(&app, &body, &[]).await;
        assert_eq!(response.status(), 200, "stream: {stream}");
        let status_url = header(&response, "x-offload-status-url").unwrap();
        let doc = app.wait_final(&status_url, None).await;
        assert_eq!(doc["status"], "done", "{doc}");
        let attempts = doc["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 2, "{doc}");
        for attempt in attempts {
            assert_eq!(attempt["status_code"], 503);
            assert_eq!(attempt["error"]["code"], "upstream_error");
            assert!(attempt["error"]["message"].as_str().unwrap().contains("503"), "{attempt}");
            assert!(attempt["at"].as_f64().unwrap() >= doc["created_at"].as_f64().unwrap());
        }
    }
}

#[tokio::test]
async fn retries_are_bounded_by_the_setting_and_the_final_error_is_the_last_attempts() {
    let app = spawn_with(|a| a.upstream_retries = Some(1)).await;
    let body = json!({"messages": user("hi"), "mock": {"fail_first": 5, "status": 502}});
    let created = app.create_ok("async-chatgpt", &body).await;
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    assert_eq!(doc["status"], "error");
    assert_eq!(doc["attempts"].as_array().unwrap().len(), 1, "{doc}");
    assert_eq!(doc["response"]["status_code"], 502);
    assert_eq!(doc["error"]["code"], "upstream_error");
    assert_eq!(app.mock_stats().await["requests"], 2);
}

#[tokio::test]
async fn an_attempt_without_headers_in_time_is_retried_when_a_header_timeout_is_set() {
    let app = spawn_with(|a| a.upstream_header_timeout = Some("1s".into())).await;
    for stream in ["stream-chatgpt", "async-chatgpt"] {
        // The first attempt sends no headers at all; the second answers.
        let body = json!({"messages": user(stream), "mock": {"stall_first": 1, "key": stream, "content": "at last"}});
        let created = app.create_ok(stream, &body).await;
        let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
        assert_eq!(doc["status"], "done", "{doc}");
        let attempts = doc["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 1, "{doc}");
        assert_eq!(attempts[0]["error"]["code"], "timeout");
        assert!(attempts[0].get("status_code").is_none());
    }
    // Without the setting an attempt waits for its headers as long as the request's timeout allows: no retry.
    let app = spawn_app().await;
    let body = json!({"messages": user("hi"), "timeout": 2, "mock": {"stall_first": 1, "key": "off"}});
    let created = app.create_ok("async-chatgpt", &body).await;
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    assert_eq!(doc["error"]["code"], "timeout", "{doc}");
    assert!(doc.get("attempts").is_none(), "{doc}");
}

#[tokio::test]
async fn a_connect_error_is_retried_and_each_attempt_is_in_the_document() {
    let app = spawn_with(|a| a.upstream_url = Some("http://127.0.0.1:9/v1".parse().unwrap())).await;
    let created = app.create_ok("async-chatgpt", &json!({"messages": user("hi")})).await;
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    assert_eq!(doc["status"], "error");
    assert_eq!(doc["error"]["code"], "upstream_unreachable", "{doc}");
    let attempts = doc["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{doc}");
    assert!(attempts.iter().all(|a| a["error"]["code"] == "upstream_unreachable" && a.get("status_code").is_none()));
}

#[tokio::test]
async fn retry_after_is_honoured_and_retries_stay_within_the_timeout() {
    let app = spawn_app().await;
    // Retry-After of 1.5 s: the one retry comes after it.
    let body = json!({"messages": user("hi"), "mock": {"fail_first": 1, "status": 429, "retry_after": 1.5}});
    let started = std::time::Instant::now();
    let created = app.create_ok("async-chatgpt", &body).await;
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    assert_eq!(doc["status"], "done", "{doc}");
    assert!(started.elapsed() >= Duration::from_millis(1500));
    // A Retry-After beyond the request's timeout: no retry, the 429 is the answer.
    let body =
        json!({"messages": user("hi"), "timeout": 2, "mock": {"fail_first": 1, "status": 429, "retry_after": 5}});
    let created = app.create_ok("async-chatgpt", &body).await;
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    assert_eq!(doc["status"], "error", "{doc}");
    assert_eq!(doc["response"]["status_code"], 429);
    assert!(doc.get("attempts").is_none(), "{doc}");
}

#[tokio::test]
async fn a_failure_after_the_first_chunk_is_not_retried() {
    let app = spawn_app().await;
    let body = json!({"messages": user("hi"), "mock": {"words": 5, "drop_after": 2}});
    let created = app.stream(body).await;
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    assert_eq!(doc["status"], "error", "{doc}");
    assert!(doc.get("attempts").is_none(), "{doc}");
    assert_eq!(app.mock_stats().await["requests"], 1);
}

#[tokio::test]
async fn models_are_passed_through_from_the_upstream() {
    let app = spawn_app().await;
    let response = app.client.get(app.url("/v1/models")).bearer_auth("anything").send().await.unwrap();
    assert_eq!(response.status(), 200);
    let models: Value = response.json().await.unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "gpt-3.5-turbo");
}

/// Calls that between them get every status the document lists for `POST /v1/chat/completions` and
/// `GET /v1/models` (for tests/api/openapi.rs): `app` an open server, `keyed` one whose keys are required (none is
/// sent), `public` one that takes no calls. The app returned (with an unreachable upstream) must outlive the calls.
pub async fn documented_calls(
    app: &TestApp,
    keyed: &TestApp,
    public: &TestApp,
) -> (Vec<reqwest::RequestBuilder>, TestApp) {
    let unreachable = spawn_with(|a| a.upstream_url = Some("http://127.0.0.1:9/v1".parse().unwrap())).await;
    let chat = |app: &TestApp, body: Value| app.client.post(app.url("/v1/chat/completions")).json(&body);
    let models = |app: &TestApp| app.client.get(app.url("/v1/models"));
    let mut calls = vec![
        chat(app, json!({"messages": user("hi"), "mock": {"words": 2}})),
        chat(app, json!({"messages": user("hi"), "stream": true, "mock": {"words": 2}})),
        chat(app, json!({"messages": user("hi"), "stream": "yes"})),
        chat(keyed, json!({"messages": user("hi")})),
        chat(public, json!({"messages": user("hi")})),
        models(app),
        models(app).header("X-OpenAI-API-Key", reqwest::header::HeaderValue::from_bytes(b"sk-\xff").unwrap()),
        models(keyed),
        models(public),
        models(&unreachable),
        models(app).header("Origin", "https://elsewhere.example"),
    ];
    // A key allowed one call per 100 s: its second call is refused.
    let out = keys_cli(keyed.data_dir.path(), &["create", "--name", "paced", "--rate", "0.01"]);
    let paced = out.lines().last().unwrap().trim().to_owned();
    calls.extend([models(keyed).bearer_auth(&paced), models(keyed).bearer_auth(&paced)]);
    // Every other status is the upstream's, passed on.
    for status in [403, 404, 408, 409, 413, 415, 422, 429, 500, 502, 503, 504] {
        calls.push(chat(app, json!({"messages": user("hi"), "mock": {"status": status}})));
    }
    (calls, unreachable)
}

#[tokio::test]
async fn a_webhook_asked_for_by_header_gets_the_final_document() {
    let app = spawn_with(|a| a.allow_private_webhooks = Some(true)).await;
    let hook = receiver(vec![]).await;
    let body = json!({"messages": user("hi"), "mock": {"content": "hooked"}});
    let response = chat(&app, &body, &[("X-Offload-Webhook-Url", &hook.url)]).await;
    assert_eq!(response.status(), 200);
    let status_url = header(&response, "x-offload-status-url").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while hook.hits.lock().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no webhook");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let document = hook.hits.lock()[0].document();
    assert_eq!(document["status"], "done");
    assert_eq!(document["endpoints"]["status_url"], status_url);
    assert_eq!(document["options"]["webhook_url"], hook.url);
}

#[tokio::test]
async fn a_caller_that_leaves_before_a_non_stream_answer_stops_it_only_when_asked() {
    for on_disconnect in ["continue", "stop"] {
        let app = spawn_app().await;
        let body = json!({"messages": user("hi"), "mock": {"words": 40, "delay_ms": 25}});
        let request = app
            .client
            .post(app.url("/v1/chat/completions"))
            .header("X-Offload-On-Disconnect", on_disconnect)
            .timeout(Duration::from_millis(300))
            .json(&body);
        assert!(request.send().await.unwrap_err().is_timeout());
        // The upstream sees the call end: completed (the call went on), or abandoned (stopped).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let stats = loop {
            let stats = app.mock_stats().await;
            if stats["completed"] == 1 || stats["disconnected"] == 1 {
                break stats;
            }
            assert!(tokio::time::Instant::now() < deadline, "{on_disconnect}: the call never ended: {stats}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let (completed, disconnected) = if on_disconnect == "stop" { (0, 1) } else { (1, 0) };
        assert_eq!(stats["completed"], completed, "{on_disconnect}: {stats}");
        assert_eq!(stats["disconnected"], disconnected, "{on_disconnect}: {stats}");
    }
}
