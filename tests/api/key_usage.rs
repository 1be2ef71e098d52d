//! Usage per service key, model and day (`offload usage`, `GET /v1/usage`) and token budgets per key.

use crate::helpers::*;
use crate::keys::create_key;
use serde_json::{Value, json};

/// `offload usage ARGS --data-dir DIR`, its standard output.
fn usage_cli(app: &TestApp, args: &[&str]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_offload"))
        .arg("usage")
        .args(args)
        .arg("--data-dir")
        .arg(app.data_dir.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "offload usage {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

fn usage_json(app: &TestApp, args: &[&str]) -> Vec<Value> {
    let mut args = args.to_vec();
    args.push("--json");
    let out: Value = serde_json::from_str(&usage_cli(app, &args)).unwrap();
    out["data"].as_array().unwrap().clone()
}

/// The id of the key named `name`, from `offload keys list`.
fn key_id(app: &TestApp, name: &str) -> String {
    let listed = keys_cli(app.data_dir.path(), &["list"]);
    let line = listed.lines().find(|l| l.split_whitespace().nth(1) == Some(name)).unwrap();
    line.split_whitespace().next().unwrap().to_owned()
}

/// An async call of `key` to `model` answered with `words` words (the mock counts 8 input tokens for "hi" and one
/// output token a word), waited for until final.
async fn call(app: &TestApp, key: &str, model: &str, words: u64) -> reqwest::Response {
    let body = json!({"model": model, "messages": user("hi"), "mock": {"words": words}});
    let response = app.client.post(app.url("/v1/async-chatgpt")).bearer_auth(key).json(&body).send().await.unwrap();
    if response.status() == 200 {
        let created: Value = response.json().await.unwrap();
        let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
        assert_eq!(doc["status"], "done", "{doc}");
        return app.client.get(endpoint(&created, "status_url")).send().await.unwrap();
    }
    response
}

async fn usage_http(app: &TestApp, key: Option<&str>, query: &str) -> (u16, Value) {
    let mut request = app.client.get(app.url(&format!("/v1/usage{query}")));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test]
async fn usage_is_counted_per_key_and_model_shown_by_the_cli_and_each_key_reads_only_its_own() {
    let app = spawn_app().await;
    let (alpha, beta) = (create_key(&app, "alpha", &[]), create_key(&app, "beta", &[]));
    let (alpha_id, beta_id) = (key_id(&app, "alpha"), key_id(&app, "beta"));
    for (key, model, words) in [(&alpha, "m-one", 3), (&alpha, "m-one", 4), (&alpha, "m-two", 5), (&beta, "m-one", 6)] {
        assert_eq!(call(&app, key, model, words).await.status(), 200);
    }

    let by_key = usage_json(&app, &["--by", "key"]);
    let row = |id: &str| by_key.iter().find(|r| r["key"] == id).cloned().unwrap();
    assert_eq!(by_key.len(), 2, "{by_key:?}");
    assert_eq!(row(&alpha_id), json!({"key": alpha_id, "requests": 3, "input_tokens": 24, "output_tokens": 12}));
    assert_eq!(row(&beta_id), json!({"key": beta_id, "requests": 1, "input_tokens": 8, "output_tokens": 6}));
    let by_model = usage_json(&app, &["--by", "model"]);
    assert_eq!(
        by_model,
        [
            json!({"model": "m-one", "requests": 3, "input_tokens": 24, "output_tokens": 13}),
            json!({"model": "m-two", "requests": 1, "input_tokens": 8, "output_tokens": 5}),
        ]
    );
    // The default grouping is every row as stored: key, model and UTC day.
    let rows = usage_json(&app, &["--since", "1d"]);
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(rows.iter().all(|r| r["day"].as_str().is_some_and(|d| d.len() == 10)), "{rows:?}");
    let table = usage_cli(&app, &["--by", "key,model"]);
    assert!(table.starts_with("KEY") && table.contains("REQUESTS") && table.contains("OUTPUT TOKENS"), "{table}");
    let line = table.lines().find(|l| l.contains(&alpha_id) && l.contains("m-two")).unwrap();
    assert_eq!(line.split_whitespace().collect::<Vec<_>>(), [&alpha_id, "m-two", "1", "8", "5"], "{table}");

    // Over HTTP each key sees its own usage only.
    let (status, mine) = usage_http(&app, Some(&alpha), "?by=model").await;
    assert_eq!(status, 200, "{mine}");
    let expected = json!([
        {"model": "m-one", "requests": 2, "input_tokens": 16, "output_tokens": 7},
        {"model": "m-two", "requests": 1, "input_tokens": 8, "output_tokens": 5},
    ]);
    assert_eq!(mine["data"], expected);
    let (_, theirs) = usage_http(&app, Some(&beta), "").await;
    let data = theirs["data"].as_array().unwrap();
    assert_eq!(data.len(), 1, "{theirs}");
    assert_eq!(
        (&data[0]["key"], &data[0]["model"], &data[0]["output_tokens"]),
        (&json!(beta_id), &json!("m-one"), &json!(6))
    );
    let (status, refused) = usage_http(&app, None, "").await;
    assert_eq!((status, &refused["error"]["code"]), (401, &json!("unauthorized")));
    let (status, bad) = usage_http(&app, Some(&alpha), "?by=colour").await;
    assert_eq!((status, &bad["error"]["param"]), (400, &json!("by")));
}

#[tokio::test]
async fn an_open_server_counts_its_requests_under_no_key_and_shows_them() {
    let app = spawn_app().await;
    let body = json!({"model": "m-open", "messages": user("hi"), "mock": {"words": 2}});
    let created: Value = app.create("async-chatgpt", &body).await.json().await.unwrap();
    app.wait_final(&endpoint(&created, "status_url"), None).await;
    let (status, usage) = usage_http(&app, None, "?by=key&by=model&since=7d").await;
    assert_eq!(status, 200, "{usage}");
    assert_eq!(
        usage["data"],
        json!([{"key": null, "model": "m-open", "requests": 1, "input_tokens": 8, "output_tokens": 2}])
    );
    assert_eq!(
        usage_json(&app, &["--by", "key"]),
        [json!({"key": null, "requests": 1, "input_tokens": 8, "output_tokens": 2})]
    );
}

#[tokio::test]
async fn a_daily_token_budget_refuses_the_call_after_the_one_that_crossed_it_until_midnight_utc() {
    let app = spawn_app().await;
    let key = create_key(&app, "budgeted", &["--tokens-per-day", "30"]);
    // 8 + 10 = 18 tokens: under the budget. The next call is let in (18 < 30) and crosses it: 18 + 28 = 46.
    assert_eq!(call(&app, &key, "m", 10).await.status(), 200);
    assert_eq!(call(&app, &key, "m", 20).await.status(), 200);
    let refused = call(&app, &key, "m", 1).await;
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry_after), "{retry_after}");
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["code"], "token_quota_exceeded", "{error}");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("30 tokens per day") && message.contains("46 used"), "{message}");
    assert!(message.contains("T00:00:00Z") && message.contains("midnight UTC"), "{message}");
    // The refused call counted nothing; lifting the budget lets the key in again.
    let (_, usage) = usage_http(&app, Some(&key), "?by=key").await;
    assert_eq!(usage["data"][0]["requests"], 2, "{usage}");
    keys_cli(app.data_dir.path(), &["update", "budgeted", "--tokens-per-day", "none", "--tokens-per-month", "1000"]);
    assert_eq!(call(&app, &key, "m", 1).await.status(), 200);
    assert!(keys_cli(app.data_dir.path(), &["list"]).lines().any(|l| l.contains(" budgeted ") && l.contains(" 1000 ")));
}
