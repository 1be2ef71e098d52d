//! Section 1: creating a request.

use crate::helpers::*;
use serde_json::{Value, json};

#[tokio::test]
async fn stream_create_answers_with_absolute_urls_of_kind_1() {
    let app = spawn_app().await;
    let created = app.stream(json!({"messages": user("hi")})).await;
    assert_eq!(created["status"], "success");
    assert_eq!(created["authorization"], json!({"access": "public"}));
    assert!(created["README"].as_str().unwrap().contains("stream_events_url"));
    let status_url = endpoint(&created, "status_url");
    let id = id_of(&status_url);
    assert_eq!(created["conversation_id"], id.as_str(), "a new conversation's id is the request id");
    assert!(status_url.starts_with(&format!("{}/1/r/pub/", app.base)));
    assert!(status_url.ends_with(".json"));
    assert_eq!(endpoint(&created, "stream_events_url"), status_url.replace(".json", ".txt"));
    assert_eq!(endpoint(&created, "stop_url"), status_url.replace(".json", "/stop"));
    // The date in the URL is created_at in UTC.
    let created_at = created["created_at"].as_i64().unwrap();
    let path: Vec<&str> = status_url.trim_start_matches(&app.base).split('/').collect();
    let (y, mo, d, h, mi, s) = (path[4], path[5], path[6], path[7], path[8], path[9]);
    let secs_of_day = created_at.rem_euclid(86_400);
    assert_eq!(h.parse::<i64>().unwrap(), secs_of_day / 3600);
    assert_eq!(mi.parse::<i64>().unwrap(), secs_of_day % 3600 / 60);
    assert_eq!(s.parse::<i64>().unwrap(), secs_of_day % 60);
    assert_eq!((y.len(), mo.len(), d.len()), (4, 2, 2));
}

#[tokio::test]
async fn async_create_has_kind_2_and_no_stream_url() {
    let app = spawn_app().await;
    let created = app.create_ok("async-chatgpt", &json!({"messages": user("hi")})).await;
    assert!(created["endpoints"].get("stream_events_url").is_none());
    assert!(endpoint(&created, "status_url").starts_with(&format!("{}/2/r/pub/", app.base)));
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    assert_eq!(doc["status"], "done");
    assert_eq!(doc["request"]["endpoint"], "/v1/async-chatgpt");
    assert_eq!(doc["response"]["body"]["object"], "chat.completion");
}

#[tokio::test]
async fn messages_sent_as_a_json_string_are_stored_as_an_array() {
    let app = spawn_app().await;
    let messages = r#"[{"role":"user","content":"from php"}]"#;
    let created = app.stream(json!({"messages": messages})).await;
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    assert_eq!(doc["parameters"]["messages"], json!([{"role": "user", "content": "from php"}]));
}

#[tokio::test]
async fn unknown_parameters_and_the_key_go_upstream_and_options_do_not() {
    let app = spawn_with_mock(mock_expecting("sk-caller-key"), |_| {}).await;
    let body = json!({
        "messages": user("hi"), "seed": 7, "brand_new_parameter": {"x": [1, 2]}, "stream": false,
        "timeout": 30, "access": "public", "model": "gpt-4o-mini"
    });
    let response = app
        .client
        .post(app.url("/v1/stream-chatgpt"))
        .header("X-OpenAI-API-Key", "sk-caller-key")
        .header("X-RapidAPI-Host", "offloadgpt.p.rapidapi.com")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let created: Value = response.json().await.unwrap();
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    let sent = app.mock_requests().await.pop().unwrap();
    assert_eq!(sent["authorization_expected"], true, "the caller's key reached the upstream");
    assert_eq!(sent["body"]["seed"], 7);
    assert_eq!(sent["body"]["brand_new_parameter"], json!({"x": [1, 2]}));
    assert_eq!(sent["body"]["stream"], true, "the endpoint decides `stream`");
    assert_eq!(sent["body"]["model"], "gpt-4o-mini");
    for option in ["timeout", "access"] {
        assert!(sent["body"].get(option).is_none(), "{option} must not go upstream");
    }
    assert_eq!(doc["options"], json!({"timeout": 30, "connect_timeout": 5}));
    assert_eq!(doc["parameters"]["seed"], 7);
    assert!(doc["parameters"].get("stream").is_none());
    assert!(!doc.to_string().contains("sk-caller-key"), "the key is never in a document");
}

#[tokio::test]
async fn model_defaults_to_the_server_setting() {
    let app = spawn_with(|a| a.default_model = Some("gpt-test-default".into())).await;
    let created = app.create_ok("async-chatgpt", &json!({"messages": user("hi")})).await;
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    assert_eq!(doc["parameters"]["model"], "gpt-test-default");
}

async fn assert_rejected(app: &TestApp, body: Value, status: u16, param: Option<&str>) {
    for endpoint in ["stream-chatgpt", "async-chatgpt"] {
        let response = app.create(endpoint, &body).await;
        assert_eq!(response.status(), status, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["status"], "error");
        assert!(error["error"]["message"].as_str().unwrap().len() > 10, "{error}");
        assert_eq!(error["error"]["param"].as_str(), param, "{error}");
    }
}

#[tokio::test]
async fn every_invalid_field_is_a_400_naming_it_and_leaves_nothing_behind() {
    let app = spawn_app().await;
    let ok = user("hi");
    let cases = [
        (json!({}), "messages"),
        (json!({"messages": []}), "messages"),
        (json!({"messages": "not json"}), "messages"),
        (json!({"messages": [{"content": "no role"}]}), "messages"),
        (json!({"messages": ok, "access": "secret"}), "access"),
        (json!({"messages": ok, "timeout": 0}), "timeout"),
        (json!({"messages": ok, "timeout": 90.5}), "timeout"),
        (json!({"messages": ok, "timeout": "soon"}), "timeout"),
        (json!({"messages": ok, "connect_timeout": 10.5}), "connect_timeout"),
        (json!({"messages": ok, "connect_timeout": -1}), "connect_timeout"),
        (json!({"messages": ok, "model": ["x"]}), "model"),
        (json!({"messages": ok, "webhook_url": "ftp://example.com/hook"}), "webhook_url"),
        (json!({"messages": ok, "webhook_url": "not a url"}), "webhook_url"),
        (json!({"messages": ok, "from_status_url": "https://example.com/other"}), "from_status_url"),
        (json!({"messages": ok, "from_bearer_token": "abc"}), "from_bearer_token"),
        (json!({"messages": ok, "from_max_length": 10}), "from_max_length"),
        (json!({"messages": ok, "conversation_id": 12}), "conversation_id"),
    ];
    for (body, param) in cases {
        assert_rejected(&app, body, 400, Some(param)).await;
    }
    assert_eq!(app.total_requests(), 0);
    assert_eq!(app.mock_stats().await["requests"], 0);
}

#[tokio::test]
async fn a_body_that_is_not_json_is_a_400_and_not_json_content_type_a_415() {
    let app = spawn_app().await;
    let response = app
        .client
        .post(app.url("/v1/stream-chatgpt"))
        .header("content-type", "application/json")
        .body("{\"messages\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "invalid_json");
    let response = app
        .client
        .post(app.url("/v1/async-chatgpt"))
        .header("content-type", "text/plain")
        .body(json!({"messages": user("hi")}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["status"], "error");
    assert_eq!(app.total_requests(), 0);
}

#[tokio::test]
async fn a_body_over_the_limit_is_a_413() {
    let app = spawn_with(|a| a.max_body_bytes = Some(1024)).await;
    let response = app.create("stream-chatgpt", &json!({"messages": user(&"x".repeat(2000))})).await;
    assert_eq!(response.status(), 413);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "payload_too_large");
    assert_eq!(app.total_requests(), 0);
}

#[tokio::test]
async fn without_any_key_for_openai_itself_the_create_is_a_400() {
    let app = spawn_with(|a| a.upstream_url = Some("https://api.openai.com/v1".parse().unwrap())).await;
    let response = app.create("stream-chatgpt", &json!({"messages": user("hi")})).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["param"], "X-OpenAI-API-Key");
    assert_eq!(app.total_requests(), 0);
}

#[tokio::test]
async fn the_server_key_is_used_when_the_caller_sends_none() {
    let app =
        spawn_with_mock(mock_expecting("sk-server-side"), |a| a.upstream_key = Some("sk-server-side".into())).await;
    let created = app.stream(json!({"messages": user("hi")})).await;
    app.wait_final(&endpoint(&created, "status_url"), None).await;
    assert_eq!(app.mock_requests().await.pop().unwrap()["authorization_expected"], true);
}

#[tokio::test]
async fn the_index_names_the_service() {
    let app = spawn_app().await;
    let index = app.get_json(&app.url("/"), None).await;
    assert_eq!(index["service"], "offload");
    assert!(index["version"].is_string());
    let response = app.get(&app.url("/no/such/thing"), None).await;
    assert_eq!(response.status(), 404);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["status"], "error");
}
