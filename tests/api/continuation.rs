//! Section 6: continuing a conversation.

use crate::helpers::*;
use serde_json::{Value, json};

#[tokio::test]
async fn a_continued_request_sends_the_history_and_the_previous_answer() {
    let app = spawn_app().await;
    let first = app
        .stream(json!({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one"}],
            "mock": {"content": "first answer here"}}))
        .await;
    let first_url = endpoint(&first, "status_url");
    app.wait_final(&first_url, None).await;

    let second = app.create_ok("async-chatgpt", &json!({"messages": user("two"), "from_status_url": first_url})).await;
    assert_eq!(second["conversation_id"], first["conversation_id"], "the conversation id carries over");
    let second_url = endpoint(&second, "status_url");
    assert_ne!(id_of(&second_url), id_of(&first_url), "a new request gets a new id");
    let doc = app.wait_final(&second_url, None).await;
    assert_eq!(
        doc["parameters"]["messages"],
        json!([
            {"role": "system", "content": "be brief"}, {"role": "user", "content": "one"},
            {"role": "assistant", "content": "first answer here"}, {"role": "user", "content": "two"}
        ])
    );
    assert_eq!(doc["endpoints"]["from_status_url"], first_url.as_str());
    assert_eq!(doc["conversation_id"], first["conversation_id"]);
    let sent = app.mock_requests().await.pop().unwrap();
    assert_eq!(sent["body"]["messages"], doc["parameters"]["messages"]);

    // A third request continues from the second; from_max_length cuts the previous answer.
    let answer = doc["response"]["body"]["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    let third = app
        .stream(json!({"messages": user("three"), "from_status_url": second_url, "from_max_length": 5,
            "conversation_id": "my-own-thread"}))
        .await;
    assert_eq!(third["conversation_id"], "my-own-thread", "a caller-named conversation keeps its name");
    let doc = app.wait_final(&endpoint(&third, "status_url"), None).await;
    let messages = doc["parameters"]["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 6);
    assert_eq!(messages[4]["content"], answer.chars().take(5).collect::<String>().as_str());
    assert_eq!(doc["options"]["from_max_length"], 5);
}

#[tokio::test]
async fn continuing_from_a_stopped_request_uses_its_partial_text() {
    let app = spawn_app().await;
    let first = app.stream(json!({"messages": user("one"), "mock": {"words": 500, "delay_ms": 10}})).await;
    let first_url = endpoint(&first, "status_url");
    app.wait_status(&first_url, "streaming").await;
    tokio::time::sleep(std::time::Duration::from_millis(60)).await;
    assert_eq!(app.get(&endpoint(&first, "stop_url"), None).await.status(), 200);
    let stopped = app.wait_final(&first_url, None).await;
    let partial = stopped["response"]["body"]["choices"][0]["message"]["content"].clone();
    let second = app.stream(json!({"messages": user("two"), "from_status_url": first_url})).await;
    let doc = app.wait_final(&endpoint(&second, "status_url"), None).await;
    assert_eq!(doc["parameters"]["messages"][1]["content"], partial);
}

#[tokio::test]
async fn continuing_from_a_private_request_needs_its_bearer_token() {
    let app = spawn_app().await;
    let first = app.stream(json!({"messages": user("one"), "access": "private"})).await;
    let bearer = first["authorization"]["bearer_token"].as_str().unwrap().to_owned();
    let first_url = endpoint(&first, "status_url");
    app.wait_final(&first_url, Some(&bearer)).await;
    for token in [None, Some("00000000000000000000000000000000")] {
        let mut body = json!({"messages": user("two"), "from_status_url": first_url});
        if let Some(t) = token {
            body["from_bearer_token"] = t.into();
        }
        let response = app.create("stream-chatgpt", &body).await;
        assert_eq!(response.status(), 403);
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["param"], "from_bearer_token");
    }
    let ok =
        app.stream(json!({"messages": user("two"), "from_status_url": first_url, "from_bearer_token": bearer})).await;
    assert_eq!(ok["authorization"]["access"], "public", "the new request has its own access");
    assert_eq!(app.total_requests(), 2);
}

#[tokio::test]
async fn continuing_from_an_unknown_or_unfinished_request_is_refused() {
    let app = spawn_app().await;
    let running = app.stream(json!({"messages": user("one"), "mock": {"words": 100, "delay_ms": 50}})).await;
    let running_url = endpoint(&running, "status_url");
    let response =
        app.create("stream-chatgpt", &json!({"messages": user("two"), "from_status_url": running_url})).await;
    assert_eq!(response.status(), 409);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["param"], "from_status_url");

    let unknown = running_url.replace(&id_of(&running_url), "00000000-0000-4000-8000-000000000000");
    let response = app.create("async-chatgpt", &json!({"messages": user("two"), "from_status_url": unknown})).await;
    assert_eq!(response.status(), 404);
    assert_eq!(app.total_requests(), 1, "refused continuations leave nothing behind");
}
