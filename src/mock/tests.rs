//! The mock's own tests: it runs on port 0 and is spoken to over HTTP, as offload speaks to it.

use super::{MockConfig, MockServer, spawn};
use serde_json::{Value, json};

async fn mock(config: MockConfig) -> MockServer {
    spawn("127.0.0.1:0".parse().unwrap(), config).await.unwrap()
}

async fn post(server: &MockServer, path: &str, body: &Value) -> reqwest::Response {
    let url = format!("http://{}{path}", server.addr());
    reqwest::Client::new().post(url).json(body).send().await.unwrap()
}

async fn get_json(server: &MockServer, path: &str) -> Value {
    reqwest::get(format!("http://{}{path}", server.addr())).await.unwrap().json().await.unwrap()
}

/// The events of a Responses stream: the `event:` line must name the `type` of the `data:` line.
fn events(text: &str) -> Vec<Value> {
    assert!(!text.contains("[DONE]"), "the Responses API sends no [DONE]: {text}");
    text.split("\n\n")
        .filter(|frame| !frame.is_empty())
        .map(|frame| {
            let (event, data) = frame.split_once('\n').unwrap();
            let kind = event.strip_prefix("event: ").unwrap();
            let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(data["type"], kind, "{frame}");
            data
        })
        .collect()
}

async fn stream(server: &MockServer, body: Value) -> Vec<Value> {
    let response = post(server, "/v1/responses", &body).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    events(&response.text().await.unwrap())
}

fn types(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

fn assert_contiguous(events: &[Value]) {
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event["sequence_number"], i, "{event}");
    }
}

fn id_with(value: &Value, prefix: &str) -> bool {
    value.as_str().is_some_and(|id| id.len() > prefix.len() + 8 && id.starts_with(prefix))
}

#[tokio::test]
async fn a_streamed_response_has_openai_s_event_sequence() {
    let server = mock(MockConfig::default()).await;
    let tools = json!([{"type": "function", "name": "f", "parameters": {"type": "object"}}]);
    let events = stream(
        &server,
        json!({"model": "gpt-test", "input": "hi", "instructions": "Be brief.", "metadata": {"k": "v"},
               "tools": tools, "stream": true, "mock": {"words": 4}}),
    )
    .await;
    let mut expected = vec!["response.created", "response.in_progress", "response.output_item.added"];
    expected.push("response.content_part.added");
    expected.extend(["response.output_text.delta"; 4]);
    expected.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]);
    assert_eq!(types(&events), expected);
    assert_contiguous(&events);
    let created = &events[0]["response"];
    assert_eq!(created["status"], "in_progress");
    assert_eq!(created["output"], json!([]));
    assert!(id_with(&created["id"], "resp_"), "{created}");
    let deltas: String = events.iter().filter_map(|e| e["delta"].as_str()).collect();
    assert_eq!(deltas, "Hello from the offload ");
    let item = &events[2]["item"];
    assert!(id_with(&item["id"], "msg_"), "{item}");
    for event in &events[3..events.len() - 1] {
        assert_eq!(event["output_index"], 0);
        if event.get("item_id").is_some() {
            assert_eq!(event["item_id"], item["id"]);
            assert_eq!(event["content_index"], 0);
        }
    }
    assert_eq!(events[4]["logprobs"], json!([]));
    assert_eq!(events[8]["text"], deltas);
    assert_eq!(events[9]["part"]["text"], deltas);
    let completed = &events[11]["response"];
    assert_eq!(completed["id"], created["id"]);
    assert_eq!(completed["status"], "completed");
    assert_eq!(completed["output"], json!([events[10]["item"]]));
    assert_eq!(completed["output"][0]["content"][0]["text"], deltas);
    assert_eq!(completed["usage"]["output_tokens"], 4);
    assert_eq!(completed["usage"]["total_tokens"], completed["usage"]["input_tokens"].as_u64().unwrap() + 4);
    for (key, value) in [("model", json!("gpt-test")), ("instructions", json!("Be brief.")), ("tools", tools)] {
        assert_eq!(completed[key], value, "{key}");
    }
    assert_eq!(completed["metadata"], json!({"k": "v"}));
}

#[tokio::test]
async fn without_stream_the_answer_is_the_response_object() {
    let server = mock(MockConfig { words: Some(3), ..MockConfig::default() }).await;
    let body = json!({"model": "gpt-test", "input": [{"role": "user", "content": "hi"}], "metadata": {"a": "b"},
                      "mock": {"content": "exact reply"}});
    let response = post(&server, "/v1/responses", &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let object: Value = response.json().await.unwrap();
    assert_eq!(object["object"], "response");
    assert_eq!(object["status"], "completed");
    assert!(object.get("output_text").is_none(), "the SDKs compute output_text: {object}");
    assert!(id_with(&object["id"], "resp_"));
    assert_eq!(object["model"], "gpt-test");
    assert_eq!(object["metadata"], json!({"a": "b"}));
    assert_eq!(object["instructions"], Value::Null);
    assert_eq!(object["tools"], json!([]));
    let message = &object["output"][0];
    assert_eq!(
        (&message["type"], &message["role"], &message["status"]),
        (&json!("message"), &json!("assistant"), &json!("completed"))
    );
    assert_eq!(
        message["content"],
        json!([{"type": "output_text", "annotations": [], "logprobs": [], "text": "exact reply"}])
    );
    assert_eq!(object["usage"]["output_tokens"], 2);
    // The process default applies when the call has no control.
    let object: Value = post(&server, "/v1/responses", &json!({"input": "hi"})).await.json().await.unwrap();
    assert_eq!(object["output"][0]["content"][0]["text"], "Hello from the ");
}

#[tokio::test]
async fn tool_calls_are_function_call_items() {
    let server = mock(MockConfig::default()).await;
    let calls =
        json!([{"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}, {"name": "now", "arguments": "{}"}]);
    let events = stream(&server, json!({"input": "hi", "stream": true, "mock": {"tool_calls": calls}})).await;
    assert_contiguous(&events);
    let args = "response.function_call_arguments";
    let expected: Vec<String> = ["response.created", "response.in_progress"]
        .into_iter()
        .map(str::to_owned)
        .chain([5, 1].into_iter().flat_map(|deltas| {
            std::iter::once("response.output_item.added".to_owned())
                .chain(std::iter::repeat_n(format!("{args}.delta"), deltas))
                .chain([format!("{args}.done"), "response.output_item.done".to_owned()])
        }))
        .chain(["response.completed".to_owned()])
        .collect();
    assert_eq!(types(&events), expected);
    let first = &events[2]["item"];
    assert_eq!(first["type"], "function_call");
    assert_eq!(first["name"], "get_weather");
    assert!(id_with(&first["id"], "fc_") && id_with(&first["call_id"], "call_"), "{first}");
    let deltas: String = events
        .iter()
        .filter(|e| e["type"] == format!("{args}.delta") && e["output_index"] == 0)
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, "{\"city\": \"Paris\"}");
    assert_eq!(events[8]["arguments"], deltas);
    assert_eq!(events[8]["name"], "get_weather");
    let output = &events.last().unwrap()["response"]["output"];
    assert_eq!(output.as_array().unwrap().len(), 2);
    assert_eq!(output[0]["arguments"], deltas);
    assert_eq!(output[0]["call_id"], first["call_id"]);
    assert_eq!(output[1]["name"], "now");
    assert_eq!(output[1]["status"], "completed");
    let object: Value = post(&server, "/v1/responses", &json!({"input": "hi", "mock": {"tool_calls": calls}}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(object["output"][1]["arguments"], "{}");
    assert!(!object.to_string().contains("output_text"), "{object}");
}

#[tokio::test]
async fn errors_are_openai_s_error_body() {
    let server = mock(MockConfig::default()).await;
    let response =
        post(&server, "/v1/responses", &json!({"input": "hi", "stream": true, "mock": {"status": 429}})).await;
    assert_eq!(response.status(), 429);
    let body: Value = response.json().await.unwrap();
    let error = &body["error"];
    assert_eq!(error["type"], "invalid_request_error");
    assert!(error["message"].as_str().unwrap().contains("429"));
    assert!(error.get("code").unwrap().is_null() && error.get("param").unwrap().is_null(), "{body}");
    let failing = json!({"input": "hi", "mock": {"fail_first": 1, "status": 500, "retry_after": 1}});
    let response = post(&server, "/v1/responses", &failing).await;
    assert_eq!(response.status(), 500);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(response.json::<Value>().await.unwrap()["error"]["type"], "server_error");
    assert_eq!(post(&server, "/v1/responses", &failing).await.status(), 200, "the second call succeeds");
    let response = post(&server, "/v1/responses", &json!({"input": 3})).await;
    assert_eq!(response.status(), 400);
}

#[tokio::test]
async fn stream_faults_count_events() {
    let server = mock(MockConfig::default()).await;
    let body = json!({"input": "hi", "stream": true, "mock": {"words": 5, "drop_after": 3, "comment_after": 1}});
    let mut response = post(&server, "/v1/responses", &body).await;
    let mut text = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        text.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(text).unwrap();
    let frames: Vec<&str> = text.split("\n\n").filter(|f| !f.is_empty()).collect();
    assert_eq!(frames.len(), 3, "two events and the comment: {text}");
    assert_eq!(frames[1], ": ping");
    let stats = get_json(&server, "/_mock/stats").await;
    assert_eq!(stats["disconnected"], 1);
}

#[tokio::test]
async fn the_switch_answers_404_like_an_upstream_without_the_api() {
    let server = mock(MockConfig { no_responses_api: true, ..MockConfig::default() }).await;
    let response = post(&server, "/v1/responses", &json!({"model": "m", "input": "hi", "stream": true})).await;
    assert_eq!(response.status(), 404);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"error": {"message": "Invalid URL (POST /v1/responses)", "type": "invalid_request_error",
                         "param": null, "code": null}})
    );
    let chat = post(&server, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(chat.status(), 200);
    chat.bytes().await.unwrap();
    let stats = get_json(&server, "/_mock/stats").await;
    assert_eq!(
        stats,
        json!({"requests": 1, "chat": 1, "responses": 0, "not_found": 1, "models": 0, "models_authorized": 0, "completed": 1, "disconnected": 0})
    );
    assert_eq!(get_json(&server, "/_mock/requests").await.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn stats_and_requests_show_both_apis() {
    let server = mock(MockConfig::default()).await;
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "stream": true});
    let text = post(&server, "/v1/chat/completions", &chat).await.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "the chat stream is unchanged: {text}");
    stream(&server, json!({"input": "hi", "stream": true})).await;
    post(&server, "/v1/responses", &json!({"input": "hi"})).await.bytes().await.unwrap();
    let stats = get_json(&server, "/_mock/stats").await;
    assert_eq!(
        stats,
        json!({"requests": 3, "chat": 1, "responses": 2, "not_found": 0, "models": 0, "models_authorized": 0, "completed": 3, "disconnected": 0})
    );
    let calls = get_json(&server, "/_mock/requests").await;
    let paths: Vec<&Value> = calls.as_array().unwrap().iter().map(|c| &c["path"]).collect();
    assert_eq!(paths, [&json!("/v1/chat/completions"), &json!("/v1/responses"), &json!("/v1/responses")]);
    assert_eq!(calls[2]["body"], json!({"input": "hi"}));
    assert_eq!(calls[2]["authorization"], false);
    assert_eq!(calls[2]["authorization_expected"], Value::Null);
}

async fn set_fail(server: &MockServer, setting: Value) -> reqwest::Response {
    post(server, "/_mock/fail", &setting).await
}

#[tokio::test]
async fn the_switch_fails_every_call_of_both_apis_until_turned_off() {
    let server = mock(MockConfig::default()).await;
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "stream": true});
    let response = set_fail(&server, json!({"status": 503})).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["status"], 503);
    assert_eq!(get_json(&server, "/_mock/fail").await["status"], 503);
    for (path, body) in [("/v1/chat/completions", &chat), ("/v1/responses", &json!({"input": "hi"}))] {
        for _ in 0..2 {
            let response = post(&server, path, body).await;
            assert_eq!(response.status(), 503, "{path}");
            assert!(response.headers().get("retry-after").is_none());
            let error = response.json::<Value>().await.unwrap();
            assert_eq!(error["error"]["type"], "server_error", "{error}");
            assert!(error["error"]["message"].as_str().unwrap().contains("503"), "{error}");
            assert!(error["error"].get("code").unwrap().is_null(), "{error}");
        }
    }
    // A 429 says when to try again: at once.
    set_fail(&server, json!({"status": 429, "message": "Slow down."})).await;
    let response = post(&server, "/v1/chat/completions", &chat).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "0");
    let error = response.json::<Value>().await.unwrap();
    assert_eq!(error["error"]["message"], "Slow down.");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    // `{}` turns it off, and so does `{"status": null}`.
    for off in [json!({}), json!({"status": null})] {
        set_fail(&server, json!({"status": 500})).await;
        let response = set_fail(&server, off).await;
        assert_eq!(response.json::<Value>().await.unwrap()["status"], Value::Null);
        let response = post(&server, "/v1/chat/completions", &chat).await;
        assert_eq!(response.status(), 200);
        assert!(response.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    }
    // The failed calls count and are kept like the others, with their key.
    let stats = get_json(&server, "/_mock/stats").await;
    assert_eq!((&stats["requests"], &stats["chat"], &stats["responses"]), (&json!(7), &json!(5), &json!(2)));
    assert_eq!((&stats["completed"], &stats["disconnected"]), (&json!(7), &json!(0)));
    assert_eq!(get_json(&server, "/_mock/requests").await.as_array().unwrap().len(), 7);
}

#[tokio::test]
async fn times_fails_only_the_next_calls() {
    let server = mock(MockConfig::default()).await;
    let body = json!({"input": "hi"});
    set_fail(&server, json!({"status": 502, "times": 2})).await;
    assert_eq!(post(&server, "/v1/responses", &body).await.status(), 502);
    assert_eq!(get_json(&server, "/_mock/fail").await["times"], 1, "one left");
    let chat = json!({"messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(post(&server, "/v1/chat/completions", &chat).await.status(), 502);
    assert_eq!(
        get_json(&server, "/_mock/fail").await,
        json!({"status": null, "hang_headers": false, "times": null, "message": null})
    );
    assert_eq!(post(&server, "/v1/responses", &body).await.status(), 200);
    // Settings that make no sense are refused, and change nothing.
    for bad in
        [json!({"status": 200}), json!({"status": 503, "times": 0}), json!({"status": "503"}), json!({"fail": 1})]
    {
        let response = set_fail(&server, bad.clone()).await;
        assert_eq!(response.status(), 400, "{bad}");
        assert!(response.json::<Value>().await.unwrap()["error"]["message"].is_string());
    }
    assert_eq!(post(&server, "/v1/responses", &body).await.status(), 200);
}

#[tokio::test]
async fn hang_headers_holds_calls_until_turned_off() {
    let server = mock(MockConfig::default()).await;
    set_fail(&server, json!({"hang_headers": true})).await;
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "mock": {"words": 2}});
    // A call that waited long enough is given up by its client: the mock counts it as abandoned.
    let url = format!("http://{}/v1/chat/completions", server.addr());
    let client = reqwest::Client::new();
    let given_up = client.post(&url).json(&chat).timeout(std::time::Duration::from_millis(200)).send().await;
    assert!(given_up.unwrap_err().is_timeout());
    // A waiting call goes on once the switch is turned off, with the answer it would have had.
    let waiting = tokio::spawn({
        let (client, url, chat) = (client.clone(), url.clone(), chat.clone());
        async move { client.post(&url).json(&chat).send().await.unwrap() }
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "no headers while it hangs");
    set_fail(&server, json!({})).await;
    let response = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["choices"][0]["message"]["content"], "Hello from ");
    // Hanging then failing: the status comes once released; `times` counts the hanging calls.
    set_fail(&server, json!({"hang_headers": true, "status": 504, "times": 1})).await;
    let waiting = tokio::spawn({
        let (client, url, chat) = (client.clone(), url.clone(), chat.clone());
        async move { client.post(&url).json(&chat).send().await.unwrap() }
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(post(&server, "/v1/chat/completions", &chat).await.status(), 200, "only the first call hangs");
    assert!(!waiting.is_finished());
    set_fail(&server, json!({})).await;
    let response = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.unwrap().unwrap();
    assert_eq!(response.status(), 504);
    // The call given up is counted too (as completed or abandoned, depending on when the mock saw it go).
    let stats = get_json(&server, "/_mock/stats").await;
    assert_eq!(stats["requests"], 4);
    assert_eq!(get_json(&server, "/_mock/requests").await.as_array().unwrap().len(), 4);
}

#[tokio::test]
async fn models_lists_the_configured_ids() {
    let server = mock(MockConfig { models: Some(vec!["a-1".into(), "b-2".into()]), ..MockConfig::default() }).await;
    let list = get_json(&server, "/v1/models").await;
    let ids: Vec<&Value> = list["data"].as_array().unwrap().iter().map(|m| &m["id"]).collect();
    assert_eq!(ids, [&json!("a-1"), &json!("b-2")]);
    assert_eq!(list["data"][0]["object"], "model");
    assert_eq!(list["object"], "list");
    let list = get_json(&mock(MockConfig::default()).await, "/v1/models").await;
    assert_eq!(list["data"][0]["id"], "gpt-3.5-turbo");
    assert_eq!(get_json(&server, "/_mock/stats").await["models"], 1);
    // Calls with the expected key are counted apart.
    let key = crate::domain::UpstreamKey::new("sk-mock-models-test").unwrap();
    let server = mock(MockConfig { expected_key: Some(key), ..MockConfig::default() }).await;
    let url = format!("http://{}/v1/models", server.addr());
    for token in ["sk-mock-models-test", "sk-other"] {
        reqwest::Client::new().get(&url).bearer_auth(token).send().await.unwrap();
    }
    reqwest::get(&url).await.unwrap();
    let stats = get_json(&server, "/_mock/stats").await;
    assert_eq!((&stats["models"], &stats["models_authorized"]), (&json!(3), &json!(1)));
}
