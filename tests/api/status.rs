//! Section 3: the status document.

use crate::helpers::*;
use serde_json::{Value, json};

#[tokio::test]
async fn a_stream_document_moves_through_its_lifecycle_and_its_text_grows() {
    let app = spawn_app().await;
    let created =
        app.stream(json!({"messages": user("hi"), "mock": {"words": 30, "ttft_ms": 300, "delay_ms": 30}})).await;
    let status_url = endpoint(&created, "status_url");
    let first = app.get_json(&status_url, None).await;
    assert!(matches!(first["status"].as_str(), Some("pending" | "posting")), "{first}");
    assert!(first["endpoints"].get("stop_url").is_some());
    // No chunk yet (the status says so). The upstream's headers may already be in: the call starts while the
    // create's insert commits, so `response` may show them.
    assert!(first["response"].get("body").is_none_or(|b| b["choices"][0]["message"]["content"].is_null()), "{first}");
    let early = app.wait_status(&status_url, "streaming").await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let later = app.get_json(&status_url, None).await;
    let early_text = early["response"]["body"]["choices"][0]["message"]["content"].as_str().unwrap_or("").to_owned();
    let later_text = later["response"]["body"]["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    assert!(
        later_text.len() > early_text.len() && later_text.starts_with(&early_text),
        "{early_text:?} / {later_text:?}"
    );
    assert!(early["endpoints"]["response_raw_url"].is_string());

    let done = app.wait_final(&status_url, None).await;
    assert_eq!(done["status"], "done");
    assert!(done["endpoints"].get("stop_url").is_none(), "no stop_url once final");
    assert!(done.get("error").is_none());
    let r = &done["request"];
    for field in ["request_at", "finished_at", "processed_at"] {
        assert!(r[field].as_i64().unwrap() >= done["created_at"].as_i64().unwrap(), "{field}");
    }
    assert!(r["request_time"].as_f64().unwrap() >= 0.9, "30 chunks at 30 ms: {r}");
    assert!(r["total_time"].as_f64().unwrap() >= r["request_time"].as_f64().unwrap());
    let response = &done["response"];
    assert_eq!(response["status_code"], 200);
    assert_eq!(response["protocol"], "HTTP/1.1");
    assert_eq!(response["headers"]["x-request-id"], "req_mock");
    let body = &response["body"];
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["system_fingerprint"], "fp_mock");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"].as_str().unwrap().split_whitespace().count(), 30);
}

#[tokio::test]
async fn an_async_document_shows_waiting_while_the_body_arrives() {
    let app = spawn_app().await;
    let created =
        app.create_ok("async-chatgpt", &json!({"messages": user("hi"), "mock": {"words": 20, "delay_ms": 40}})).await;
    let status_url = endpoint(&created, "status_url");
    let waiting = app.wait_status(&status_url, "waiting").await;
    assert_eq!(waiting["response"]["status_code"], 200);
    let done = app.wait_final(&status_url, None).await;
    assert_eq!(done["status"], "done");
    assert_eq!(done["response"]["body"]["usage"]["completion_tokens"], 20);
    assert_eq!(done["response"]["headers"]["content-type"], "application/json");
}

#[tokio::test]
async fn n_choices_tool_calls_and_usage_are_assembled() {
    let app = spawn_app().await;
    let created = app
        .stream(
            json!({"messages": user("hi"), "n": 2, "stream_options": {"include_usage": true}, "mock": {"words": 4}}),
        )
        .await;
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    let body = &doc["response"]["body"];
    assert_eq!(body["choices"].as_array().unwrap().len(), 2);
    for i in 0..2 {
        assert_eq!(body["choices"][i]["index"], i);
        assert_eq!(body["choices"][i]["message"]["content"].as_str().unwrap().split_whitespace().count(), 4);
    }
    assert_eq!(body["usage"]["completion_tokens"], 8);

    let tools = json!({"messages": user("weather?"), "tools": [{"type": "function", "function": {"name": "weather"}}],
        "mock": {"tool_calls": [{"name": "weather", "arguments": "{\"city\":\"Paris\"}"}, {"name": "time", "arguments": "{}"}]}});
    let created = app.stream(tools).await;
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    let choice = &doc["response"]["body"]["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], Value::Null);
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["function"], json!({"name": "weather", "arguments": "{\"city\":\"Paris\"}"}));
    assert_eq!(calls[0]["id"], "call_0");
    assert_eq!(calls[1]["function"]["name"], "time");
}

#[tokio::test]
async fn an_upstream_error_keeps_its_status_headers_and_body() {
    let app = spawn_app().await;
    for endpoint_name in ["stream-chatgpt", "async-chatgpt"] {
        let created = app
            .create_ok(
                endpoint_name,
                &json!({"messages": user("hi"), "mock": {"status": 429, "error_message": "Rate limit reached"}}),
            )
            .await;
        let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
        assert_eq!(doc["status"], "error");
        assert_eq!(doc["error"]["code"], "upstream_error");
        assert!(doc["error"]["message"].as_str().unwrap().contains("Rate limit reached"));
        assert_eq!(doc["response"]["status_code"], 429);
        assert_eq!(doc["response"]["body"]["error"]["message"], "Rate limit reached");
        assert!(doc["response"]["headers"]["content-type"].as_str().unwrap().contains("json"));
    }
}

#[tokio::test]
async fn polling_with_the_etag_gets_304_until_something_changes() {
    let app = spawn_app().await;
    let created = app.stream(json!({"messages": user("hi"), "mock": {"words": 3}})).await;
    let status_url = endpoint(&created, "status_url");
    app.wait_final(&status_url, None).await;
    let first = app.get(&status_url, None).await;
    let etag = first.headers()["etag"].to_str().unwrap().to_owned();
    let again = app.client.get(&status_url).header("If-None-Match", &etag).send().await.unwrap();
    assert_eq!(again.status(), 304);
    assert_eq!(again.headers()["etag"].to_str().unwrap(), etag);
    let other = app.client.get(&status_url).header("If-None-Match", "\"something-else\"").send().await.unwrap();
    assert_eq!(other.status(), 200);

    let running = app.stream(json!({"messages": user("hi"), "mock": {"words": 50, "delay_ms": 20}})).await;
    let running_url = endpoint(&running, "status_url");
    let before = app.wait_status(&running_url, "streaming").await;
    let etag = app.get(&running_url, None).await.headers()["etag"].to_str().unwrap().to_owned();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let changed = app.client.get(&running_url).header("If-None-Match", &etag).send().await.unwrap();
    assert_eq!(changed.status(), 200, "new chunks change the document");
    assert_ne!(before, changed.json::<Value>().await.unwrap());
}

#[tokio::test]
async fn the_raw_response_has_the_status_line_headers_and_body() {
    let app = spawn_app().await;
    let created = app.stream(json!({"messages": user("hi"), "mock": {"words": 3}})).await;
    let status_url = endpoint(&created, "status_url");
    let doc = app.wait_final(&status_url, None).await;
    let raw_url = doc["endpoints"]["response_raw_url"].as_str().unwrap();
    assert_eq!(raw_url, status_url.replace(".json", ".raw"));
    let raw = app.get(raw_url, None).await.text().await.unwrap();
    assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw}");
    assert!(raw.contains("\r\nx-request-id: req_mock\r\n"));
    assert!(raw.contains("\r\n\r\ndata: {"));
    assert!(raw.trim_end().ends_with("data: [DONE]"));

    let created = app.create_ok("async-chatgpt", &json!({"messages": user("hi")})).await;
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    let raw = app.get(doc["endpoints"]["response_raw_url"].as_str().unwrap(), None).await.text().await.unwrap();
    let (_, body) = raw.split_once("\r\n\r\n").unwrap();
    assert_eq!(serde_json::from_str::<Value>(body).unwrap(), doc["response"]["body"]);
}

/// `.raw` is exactly what the upstream sent, also when its framing is not the canonical one that lets offload
/// store a stream's body only once (here a comment line arrives after three events). The caller asks for the
/// usage chunk, so that every chunk the upstream sent is an event (see `usage` for one who does not).
#[tokio::test]
async fn the_raw_response_is_exact_whatever_the_upstream_framing() {
    let app = spawn_app().await;
    for comment_after in [None, Some(3), Some(0)] {
        let mut mock = json!({"words": 6});
        if let Some(at) = comment_after {
            mock["comment_after"] = at.into();
        }
        let body = json!({"messages": user("hi"), "mock": mock, "stream_options": {"include_usage": true}});
        let created = app.stream(body).await;
        let events = app.events(&endpoint(&created, "stream_events_url"), &[]).await;
        let status_url = endpoint(&created, "status_url");
        app.wait_final(&status_url, None).await;
        let raw = app.get(&status_url.replace(".json", ".raw"), None).await.text().await.unwrap();
        let (_, body) = raw.split_once("\r\n\r\n").unwrap();
        let mut expected: Vec<String> =
            events.iter().filter(|e| e.data != "[DONE]").map(|e| format!("data: {}\n\n", e.data)).collect();
        if let Some(at) = comment_after {
            expected.insert(at, ": ping\n\n".into());
        }
        expected.push("data: [DONE]\n\n".into());
        assert_eq!(body, expected.concat(), "comment after {comment_after:?}");
    }
}

#[tokio::test]
async fn an_h2c_upstream_is_called_over_http2() {
    let app = spawn_with(|a| a.upstream_h2c = Some(true)).await;
    let created = app.stream(json!({"messages": user("hi"), "mock": {"words": 5}})).await;
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    assert_eq!(doc["status"], "done");
    assert_eq!(doc["response"]["protocol"], "HTTP/2");
    assert_eq!(
        doc["response"]["body"]["choices"][0]["message"]["content"].as_str().unwrap().split_whitespace().count(),
        5
    );
    let raw = app.get(&endpoint(&created, "status_url").replace(".json", ".raw"), None).await.text().await.unwrap();
    assert!(raw.starts_with("HTTP/2 200"), "{raw}");
}
