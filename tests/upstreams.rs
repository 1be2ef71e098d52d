//! Issue 19, black-box: several upstreams named in the config file, against the real `offload` binary and two or
//! three in-process mocks on loopback, each with its own key and each made to fail on command (`POST /_mock/fail`):
//! routing by route name and by model pattern, a 400 for a model nothing serves, fallback across a route's targets
//! (503, 429, a refused connection, no headers in time; never after a chunk), the breaker, the merged model list,
//! config mistakes stopping the server at start, the same routing through `/v1/chat/completions` and
//! `/v1/responses`, and callers' keys kept from upstreams that do not take them.
//!
//! What each upstream received is read from its mock (`/_mock/requests`: the model sent and whether the call
//! carried that upstream's own key; `/_mock/stats`: how many calls it got).

#![expect(clippy::unwrap_used, clippy::panic, reason = "a test fails loudly on anything unexpected")]

mod support;

use offload::domain::UpstreamKey;
use offload::mock::{MockConfig, MockServer};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::Offload;

const KEY_A: &str = "sk-A-upstreams-test-0123456789-SECRET";
const KEY_B: &str = "sk-B-upstreams-test-0123456789-SECRET";
const KEY_C: &str = "sk-C-upstreams-test-0123456789-SECRET";
/// A caller's own upstream key (`X-OpenAI-API-Key`).
const CALLER_KEY: &str = "sk-caller-upstreams-test-0123456789-SECRET";
/// The environment variable upstream `b` takes its key from (`key_env`); the others have `key` in the file.
const KEY_B_ENV: &str = "OFFLOAD_TEST_UPSTREAMS_KEY_B";

// ---------------------------------------------------------------------------------------------------------------
// The mocks

/// A mock upstream expecting `key`, listing `models` on `GET /v1/models`.
async fn mock_with(key: &str, models: &[&str], no_responses_api: bool) -> MockServer {
    let config = MockConfig {
        expected_key: UpstreamKey::new(key),
        models: (!models.is_empty()).then(|| models.iter().map(|m| (*m).to_owned()).collect()),
        no_responses_api,
        ..MockConfig::default()
    };
    offload::mock::spawn("127.0.0.1:0".parse().unwrap(), config).await.unwrap()
}

async fn mock(key: &str) -> MockServer {
    mock_with(key, &[], false).await
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap()
}

async fn get_json(url: &str) -> Value {
    let response = http().get(url).send().await.unwrap();
    assert_eq!(response.status(), 200, "{url}");
    response.json().await.unwrap()
}

/// The calls `mock` received (of either API).
async fn calls(mock: &MockServer) -> u64 {
    get_json(&format!("http://{}/_mock/stats", mock.addr())).await["requests"].as_u64().unwrap()
}

/// What `mock` received, oldest first: each call's `path`, `body` and `authorization_expected`.
async fn received(mock: &MockServer) -> Vec<Value> {
    get_json(&format!("http://{}/_mock/requests", mock.addr())).await.as_array().unwrap().clone()
}

/// The `model` of each call `mock` received, oldest first.
async fn models_sent(mock: &MockServer) -> Vec<String> {
    received(mock).await.iter().map(|c| c["body"]["model"].as_str().unwrap_or("<none>").to_owned()).collect()
}

/// Every call `mock` received carried that upstream's own key.
async fn assert_own_key(mock: &MockServer, name: &str) {
    for call in received(mock).await {
        assert_eq!(call["authorization_expected"], true, "upstream {name} got a call without its own key: {call}");
    }
}

/// Sets the fail switch of `mock` (`{"status": 503}`, `{"hang_headers": true}`, `{}` for off).
async fn fail(mock: &MockServer, setting: Value) {
    let url = format!("http://{}/_mock/fail", mock.addr());
    let response = http().post(url).json(&setting).send().await.unwrap();
    assert_eq!(response.status(), 200, "{setting}");
}

/// A loopback address with nothing listening: connections are refused.
fn refused_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}/v1")
}

// ---------------------------------------------------------------------------------------------------------------
// The server

struct Server {
    offload: Offload,
    /// `http://host:port/metrics`, when started with `--metrics-listen`.
    metrics: Option<String>,
    /// The log lines read while starting.
    start_log: Vec<String>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl Server {
    fn url(&self, path: &str) -> String {
        self.offload.url(path)
    }

    /// Every log line so far (those of the start, then the rest).
    fn log(&self) -> Vec<String> {
        let mut lines = self.start_log.clone();
        lines.extend(self.offload.log_lines());
        lines
    }
}

/// The `offload serve` command for `config` (written to a file of its own), with `args` after it and `b`'s key in
/// the environment; `dirs`: the config's directory and the data directory.
fn command(config: &str, args: &[&str]) -> (Command, std::path::PathBuf, (tempfile::TempDir, tempfile::TempDir)) {
    let (etc, data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let file = etc.path().join("offload.toml");
    std::fs::write(&file, config).unwrap();
    let mut command = Offload::command();
    command
        .arg("serve")
        .arg("--config")
        .arg(&file)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .args(args)
        .env(KEY_B_ENV, KEY_B)
        .env("OFFLOAD_LOG", "info")
        .env_remove("OFFLOAD_UPSTREAM_URL")
        .env_remove("OFFLOAD_UPSTREAM_KEY");
    (command, file, (etc, data))
}

/// Starts `offload serve` on `config` and waits until it listens (and, with `--metrics-listen` among `args`, until
/// it said where its metrics are).
fn serve(config: &str, args: &[&str]) -> Server {
    let (mut command, _, dirs) = command(config, args);
    let wants_metrics = args.contains(&"--metrics-listen");
    let mut child = command.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut addr, mut metrics, mut start_log) = (None, None, Vec::new());
    while addr.is_none() || (wants_metrics && metrics.is_none()) {
        let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            let _ = child.kill();
            let status = child.wait().unwrap();
            panic!("offload did not start within 30 s ({status}):\n{}", start_log.join("\n"));
        };
        if let Some(rest) = line.split(" listening on ").nth(1) {
            addr = rest.split_whitespace().next().map(str::to_owned);
        }
        if let Some(rest) = line.split("metrics at ").nth(1) {
            metrics = rest.split(['"', ' ']).next().map(str::to_owned);
        }
        start_log.push(line);
    }
    let offload = Offload { child, addr: addr.unwrap(), log: rx };
    Server { offload, metrics, start_log, _dirs: dirs }
}

/// `[[upstreams]]` for `mock`, with its key in the file (or, for `b`, from the environment).
fn upstream(name: &str, url: &str, extra: &str) -> String {
    let key = match name {
        "a" => format!("key = \"{KEY_A}\""),
        "b" => format!("key_env = \"{KEY_B_ENV}\""),
        "c" => format!("key = \"{KEY_C}\""),
        _ => "key = \"sk-other-upstream\"".to_owned(),
    };
    format!("\n[[upstreams]]\nname = \"{name}\"\nurl = \"{url}\"\n{key}\n{extra}\n")
}

/// The `fast` route: `a` with `gpt-4o-mini`, then `b` with `llama3.1:8b`.
/// The two upstreams most tests use: `a` serves `gpt-*`, `b` serves `llama*`.
fn gpt_and_llama(a: &MockServer, b: &MockServer) -> String {
    [
        upstream("a", a.api_base().as_str(), r#"models = ["gpt-*"]"#),
        upstream("b", b.api_base().as_str(), r#"models = ["llama*"]"#),
    ]
    .concat()
}

const FAST: &str = r#"
[[routes]]
model = "fast"
targets = [{ upstream = "a", model = "gpt-4o-mini" }, { upstream = "b", model = "llama3.1:8b" }]
"#;

// ---------------------------------------------------------------------------------------------------------------
// Requests

/// `path` of `url`, on `server` (the URLs handed out name its public URL).
fn local(server: &Server, url: &str) -> String {
    let parsed = url::Url::parse(url).unwrap();
    let query = parsed.query().map(|q| format!("?{q}")).unwrap_or_default();
    server.url(&format!("{}{query}", parsed.path()))
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// `POST /v1/<endpoint>` (an OffloadGPT create) for `model`, with `extra` fields; the answer's status and body.
async fn create(server: &Server, endpoint: &str, model: &str, extra: Value, caller_key: Option<&str>) -> (u16, Value) {
    let mut body = json!({"model": model, "messages": user("hi")});
    if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    let mut request = http().post(server.url(&format!("/v1/{endpoint}"))).json(&body);
    if let Some(key) = caller_key {
        request = request.header("X-OpenAI-API-Key", key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Runs an OffloadGPT request (`/v1/stream-chatgpt`) for `model` to its end: its final status document.
async fn run(server: &Server, model: &str, extra: Value) -> Value {
    run_with(server, "stream-chatgpt", model, extra, None).await
}

async fn run_with(server: &Server, endpoint: &str, model: &str, extra: Value, caller_key: Option<&str>) -> Value {
    let (status, created) = create(server, endpoint, model, extra, caller_key).await;
    assert_eq!(status, 200, "create {model}: {created}");
    let status_url = local(server, created["endpoints"]["status_url"].as_str().unwrap());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let doc = get_json(&status_url).await;
        if matches!(doc["status"].as_str(), Some("done" | "error" | "stop")) {
            return doc;
        }
        assert!(Instant::now() < deadline, "{model}: not finished in time: {doc}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The failed attempts listed by a status document.
fn attempts(doc: &Value) -> Vec<Value> {
    doc.get("attempts").and_then(Value::as_array).cloned().unwrap_or_default()
}

/// The document says `name` served the request with `model`, after exactly `failed` failed attempts.
fn assert_served(doc: &Value, name: &str, model: &str, failed: usize) {
    assert_eq!(doc["status"], "done", "{doc}");
    assert_eq!(doc["upstream"], json!({"name": name, "model": model}), "{doc}");
    assert_eq!(attempts(doc).len(), failed, "{doc}");
}

/// The failed attempt says where it went, what it was sent, and why it failed.
fn assert_attempt(attempt: &Value, name: &str, model: &str, status_code: Option<u16>) {
    assert_eq!(attempt["upstream"], name, "{attempt}");
    assert_eq!(attempt["model"], model, "{attempt}");
    assert_eq!(attempt.get("status_code").and_then(Value::as_u64), status_code.map(u64::from), "{attempt}");
    assert!(attempt["at"].as_f64().is_some_and(|at| at > 1.6e9), "{attempt}");
    assert!(attempt["error"]["code"].as_str().is_some_and(|c| !c.is_empty()), "{attempt}");
    assert!(attempt["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{attempt}");
}

/// `POST /v1/chat/completions` (not streamed) for `model`: the status and the body.
async fn chat(server: &Server, model: &str) -> (u16, Value) {
    let body = json!({"model": model, "messages": user("hi")});
    let response = http().post(server.url("/v1/chat/completions")).json(&body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// The value of the series of `family` whose labels include every one of `labels` (`0` when it is not there).
async fn metric(server: &Server, family: &str, labels: &[(&str, &str)]) -> f64 {
    let text = http().get(server.metrics.as_deref().unwrap()).send().await.unwrap().text().await.unwrap();
    let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    text.lines()
        .filter(|line| line.starts_with(&format!("{family}{{")))
        .filter(|line| wanted.iter().all(|w| line.contains(w.as_str())))
        .map(|line| line.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

// ---------------------------------------------------------------------------------------------------------------
// Routing

#[tokio::test]
async fn a_route_and_model_patterns_pick_the_upstream_the_model_sent_and_its_own_key() {
    let (a, b, c) = (mock(KEY_A).await, mock(KEY_B).await, mock(KEY_C).await);
    let config = [
        upstream("a", a.api_base().as_str(), r#"models = ["gpt-*", "o*"]"#),
        upstream("b", b.api_base().as_str(), r#"models = ["llama*"]"#),
        // No patterns: every model the others do not serve.
        upstream("c", c.api_base().as_str(), "h2c = false\napi = \"auto\""),
        FAST.to_owned(),
        "\n[[routes]]\nmodel = \"local\"\ntargets = [{ upstream = \"b\", model = \"llama3.1:70b\" }]\n".to_owned(),
    ]
    .concat();
    let server = serve(&config, &[]);

    assert_served(&run(&server, "fast", json!({})).await, "a", "gpt-4o-mini", 0);
    assert_served(&run(&server, "o3-mini", json!({})).await, "a", "o3-mini", 0);
    assert_served(&run(&server, "llama3.2", json!({})).await, "b", "llama3.2", 0);
    assert_served(&run(&server, "local", json!({})).await, "b", "llama3.1:70b", 0);
    assert_served(&run(&server, "mistral-large", json!({})).await, "c", "mistral-large", 0);
    // The first upstream in file order whose patterns match: `c` serves every model, but `a` comes first.
    assert_served(&run_with(&server, "async-chatgpt", "gpt-4o", json!({}), None).await, "a", "gpt-4o", 0);

    assert_eq!(models_sent(&a).await, ["gpt-4o-mini", "o3-mini", "gpt-4o"]);
    assert_eq!(models_sent(&b).await, ["llama3.2", "llama3.1:70b"]);
    assert_eq!(models_sent(&c).await, ["mistral-large"]);
    assert_eq!((calls(&a).await, calls(&b).await, calls(&c).await), (3, 2, 1));
    for (mock, name) in [(&a, "a"), (&b, "b"), (&c, "c")] {
        assert_own_key(mock, name).await;
    }
    let log = server.log().join("\n");
    for key in [KEY_A, KEY_B, KEY_C] {
        assert!(!log.contains(key), "an upstream key is in the log");
    }
}

#[tokio::test]
async fn a_model_nothing_serves_is_a_400_naming_model_on_every_api() {
    let (a, b) = (mock(KEY_A).await, mock(KEY_B).await);
    let config = [gpt_and_llama(&a, &b), FAST.to_owned()].concat();
    let server = serve(&config, &[]);
    for endpoint in ["stream-chatgpt", "async-chatgpt"] {
        let (status, body) = create(&server, endpoint, "claude-3-opus", json!({}), None).await;
        assert_eq!(status, 400, "{endpoint}: {body}");
        assert_eq!(body["error"]["param"], "model", "{endpoint}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("claude-3-opus"), "{endpoint}: {body}");
    }
    let (status, body) = chat(&server, "claude-3-opus").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "model", "{body}");
    let response = http()
        .post(server.url("/v1/responses"))
        .json(&json!({"model": "claude-3-opus", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["param"], "model", "{body}");
    assert_eq!((calls(&a).await, calls(&b).await), (0, 0), "no upstream was called");
    // A route's name and a pattern are served, of course.
    assert_served(&run(&server, "fast", json!({})).await, "a", "gpt-4o-mini", 0);
}

// ---------------------------------------------------------------------------------------------------------------
// Fallback

#[tokio::test]
async fn a_target_that_fails_before_its_body_passes_the_call_to_the_next_at_once() {
    let (a, b) = (mock(KEY_A).await, mock(KEY_B).await);
    let config = [
        "breaker_failures = 100\n".to_owned(),
        gpt_and_llama(&a, &b),
        upstream("dead", &refused_url(), r#"models = ["never-*"]"#),
        FAST.to_owned(),
        "\n[[routes]]\nmodel = \"far\"\ntargets = [{ upstream = \"dead\", model = \"never-1\" }, { upstream = \"b\", model = \"llama3.1:8b\" }]\n"
            .to_owned(),
    ]
    .concat();
    let server = serve(&config, &["--upstream-header-timeout", "300ms"]);

    // 429, 500, 502, 503, 504: the next target answers; the failing one is called once (no retries before the
    // last target).
    let statuses = [429u16, 500, 502, 503, 504];
    for (round, status) in statuses.into_iter().enumerate() {
        fail(&a, json!({"status": status})).await;
        let doc = run(&server, "fast", json!({})).await;
        assert_served(&doc, "b", "llama3.1:8b", 1);
        assert_attempt(&attempts(&doc)[0], "a", "gpt-4o-mini", Some(status));
        assert_eq!(calls(&a).await, round as u64 + 1, "{status}: `a` was called once, not retried");
        assert_eq!(calls(&b).await, round as u64 + 1);
    }
    // What a reader of the stream sees is the answer of `b` only.
    let (status, created) = create(&server, "stream-chatgpt", "fast", json!({}), None).await;
    assert_eq!(status, 200, "{created}");
    let events_url = local(&server, created["endpoints"]["stream_events_url"].as_str().unwrap());
    let events = http().get(&events_url).send().await.unwrap().text().await.unwrap();
    assert!(events.ends_with("data: [DONE]\n\n"), "{events}");
    assert!(!events.contains("event: error") && !events.contains("Mock failure"), "{events}");
    assert!(events.contains("\"model\":\"llama3.1:8b\"") && events.contains("Hello"), "{events}");
    fail(&a, json!({})).await;

    // A refused connection.
    let doc = run(&server, "far", json!({})).await;
    assert_served(&doc, "b", "llama3.1:8b", 1);
    assert_attempt(&attempts(&doc)[0], "dead", "never-1", None);

    // No headers within --upstream-header-timeout.
    fail(&a, json!({"hang_headers": true})).await;
    let started = Instant::now();
    let doc = run(&server, "fast", json!({})).await;
    assert_served(&doc, "b", "llama3.1:8b", 1);
    assert_attempt(&attempts(&doc)[0], "a", "gpt-4o-mini", None);
    assert!(started.elapsed() < Duration::from_secs(5), "the header timeout passed the call on");
    fail(&a, json!({})).await;

    // `a` answers again: no failed attempt.
    assert_served(&run(&server, "fast", json!({})).await, "a", "gpt-4o-mini", 0);
    assert_eq!(models_sent(&b).await, vec!["llama3.1:8b"; statuses.len() + 3]);
    assert_own_key(&a, "a").await;
    assert_own_key(&b, "b").await;

    // The retries of --upstream-retries (2) apply at the last target: `b` fails once, then answers.
    fail(&a, json!({"status": 502})).await;
    fail(&b, json!({"status": 500, "times": 1})).await;
    let (a_before, b_before) = (calls(&a).await, calls(&b).await);
    let doc = run(&server, "fast", json!({})).await;
    assert_served(&doc, "b", "llama3.1:8b", 2);
    assert_attempt(&attempts(&doc)[0], "a", "gpt-4o-mini", Some(502));
    assert_attempt(&attempts(&doc)[1], "b", "llama3.1:8b", Some(500));
    assert_eq!((calls(&a).await - a_before, calls(&b).await - b_before), (1, 2));

    // When the last target fails too (past its retries), the request ends in error, every attempt listed.
    fail(&b, json!({"status": 503})).await;
    let doc = run(&server, "fast", json!({})).await;
    assert_eq!(doc["status"], "error", "{doc}");
    let listed = attempts(&doc);
    assert!(!listed.is_empty(), "{doc}");
    assert_attempt(&listed[0], "a", "gpt-4o-mini", Some(502));
    assert!(listed[1..].iter().all(|attempt| attempt["upstream"] == "b"), "{doc}");
    assert_eq!(doc["upstream"], json!({"name": "b", "model": "llama3.1:8b"}), "the last attempt's: {doc}");

    // A status that is an answer (here a 400) is the request's answer: no fallback.
    fail(&a, json!({"status": 400})).await;
    fail(&b, json!({})).await;
    let (a_before, b_before) = (calls(&a).await, calls(&b).await);
    let doc = run(&server, "fast", json!({})).await;
    assert_eq!(doc["status"], "error", "{doc}");
    assert_eq!(doc["upstream"]["name"], "a", "{doc}");
    assert_eq!((calls(&a).await - a_before, calls(&b).await - b_before), (1, 0), "{doc}");
}

#[tokio::test]
async fn the_retries_apply_at_the_last_target_tried_when_the_later_ones_are_skipped() {
    let (a, b) = (mock(KEY_A).await, mock(KEY_B).await);
    let config = [
        "breaker_failures = 1\nbreaker_cool_down = \"60s\"\n".to_owned(),
        gpt_and_llama(&a, &b),
        FAST.to_owned(),
        "\n[[routes]]\nmodel = \"back\"\ntargets = [{ upstream = \"b\", model = \"llama3.1:8b\" }, { upstream = \"a\", model = \"gpt-4o\" }]\n"
            .to_owned(),
    ]
    .concat();
    let server = serve(&config, &["--upstream-retries", "1"]);
    // `b` fails as the first target of `back`: its breaker opens (1 failure); `a` answers.
    fail(&b, json!({"status": 503})).await;
    let doc = run(&server, "back", json!({})).await;
    assert_served(&doc, "a", "gpt-4o", 1);
    assert_eq!(calls(&b).await, 1);
    // `fast`: `a` fails once; `b` after it is skipped, so `a` is the last target tried and is retried.
    fail(&a, json!({"status": 503, "times": 1})).await;
    let doc = run(&server, "fast", json!({})).await;
    assert_served(&doc, "a", "gpt-4o-mini", 1);
    assert_attempt(&attempts(&doc)[0], "a", "gpt-4o-mini", Some(503));
    assert_eq!(calls(&a).await, 3, "the first answer, the failure, the retry");
    assert_eq!(calls(&b).await, 1, "skipped while its breaker is open");
}

#[tokio::test]
async fn once_a_chunk_arrived_there_is_no_fallback() {
    let (a, b) = (mock(KEY_A).await, mock(KEY_B).await);
    let config = [gpt_and_llama(&a, &b), FAST.to_owned()].concat();
    let server = serve(&config, &[]);
    let doc = run(&server, "fast", json!({"mock": {"words": 10, "drop_after": 2}})).await;
    assert_eq!(doc["status"], "error", "{doc}");
    assert_eq!(doc["upstream"]["name"], "a", "{doc}");
    assert_eq!(calls(&a).await, 1, "not retried once a chunk arrived");
    assert_eq!(calls(&b).await, 0, "the next target is never called once a chunk arrived");
    assert!(attempts(&doc).is_empty(), "{doc}");
}

// ---------------------------------------------------------------------------------------------------------------
// The breaker

#[tokio::test]
async fn the_breaker_skips_a_failing_upstream_then_tries_it_again_after_the_cool_down() {
    let (a, b) = (mock(KEY_A).await, mock(KEY_B).await);
    let cool_down = Duration::from_millis(1000);
    let config =
        ["breaker_failures = 2\nbreaker_cool_down = \"1s\"\n".to_owned(), gpt_and_llama(&a, &b), FAST.to_owned()]
            .concat();
    let server = serve(&config, &["--upstream-retries", "0", "--metrics-listen", "127.0.0.1:0"]);
    let answered_by = async |server: &Server| {
        let (status, body) = chat(server, "fast").await;
        assert_eq!(status, 200, "{body}");
        body["model"].as_str().unwrap().to_owned()
    };
    let breaker = async |server: &Server| metric(server, "offload_upstream_breaker_open", &[("upstream", "a")]).await;
    let attempts_of = async |server: &Server, outcome: &str| {
        metric(server, "offload_upstream_attempts_total", &[("upstream", "a"), ("outcome", outcome)]).await
    };
    assert_eq!(breaker(&server).await, 0.0);

    fail(&a, json!({"status": 503})).await;
    for n in 1..=2 {
        assert_eq!(answered_by(&server).await, "llama3.1:8b");
        assert_eq!(calls(&a).await, n);
    }
    assert_eq!(breaker(&server).await, 1.0, "open after 2 failures in a row");
    assert_eq!(attempts_of(&server, "failed").await, 2.0);
    // Open: `a` is skipped, its call count stops growing; `b` answers.
    for _ in 0..3 {
        assert_eq!(answered_by(&server).await, "llama3.1:8b");
    }
    assert_eq!(calls(&a).await, 2, "skipped while open");
    assert!(attempts_of(&server, "skipped").await >= 3.0);

    // After the cool-down, one call tries it again; it still fails: skipped for another cool-down.
    tokio::time::sleep(cool_down + Duration::from_millis(300)).await;
    assert_eq!(answered_by(&server).await, "llama3.1:8b");
    assert_eq!(calls(&a).await, 3, "one trial");
    assert_eq!(answered_by(&server).await, "llama3.1:8b");
    assert_eq!(calls(&a).await, 3, "open again after a failed trial");
    assert_eq!(breaker(&server).await, 1.0);

    // It recovers: the next trial is answered, and the breaker closes.
    fail(&a, json!({})).await;
    tokio::time::sleep(cool_down + Duration::from_millis(300)).await;
    assert_eq!(answered_by(&server).await, "gpt-4o-mini");
    assert_eq!(calls(&a).await, 4);
    assert_eq!(breaker(&server).await, 0.0, "closed once answered");
    assert_eq!(answered_by(&server).await, "gpt-4o-mini");
    assert_eq!(calls(&a).await, 5);
    assert!(attempts_of(&server, "answered").await >= 2.0);
    assert_eq!(metric(&server, "offload_upstream_breaker_open", &[("upstream", "b")]).await, 0.0);
    assert_own_key(&a, "a").await;
}

#[tokio::test]
async fn after_the_cool_down_one_call_only_tries_the_upstream_again() {
    let (a, b) = (mock(KEY_A).await, mock(KEY_B).await);
    let config =
        ["breaker_failures = 1\nbreaker_cool_down = \"1s\"\n".to_owned(), gpt_and_llama(&a, &b), FAST.to_owned()]
            .concat();
    let server = serve(&config, &["--upstream-retries", "0", "--upstream-header-timeout", "700ms"]);
    fail(&a, json!({"status": 503})).await;
    let (status, body) = chat(&server, "fast").await;
    assert_eq!((status, &body["model"]), (200, &json!("llama3.1:8b")), "{body}");
    assert_eq!(calls(&a).await, 1);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    // The trial hangs before its headers; the calls that arrive meanwhile skip `a`.
    fail(&a, json!({"hang_headers": true})).await;
    let together: Vec<_> = (0..4)
        .map(|_| {
            let url = server.url("/v1/chat/completions");
            tokio::spawn(async move {
                let body = json!({"model": "fast", "messages": user("hi")});
                let response = http().post(url).json(&body).send().await.unwrap();
                (response.status().as_u16(), response.json::<Value>().await.unwrap())
            })
        })
        .collect();
    for call in together {
        let (status, body) = call.await.unwrap();
        assert_eq!((status, &body["model"]), (200, &json!("llama3.1:8b")), "{body}");
    }
    assert_eq!(calls(&a).await, 2, "one trial, however many calls came");
    fail(&a, json!({})).await;
}

#[tokio::test]
async fn when_every_target_is_skipped_the_call_is_tried_anyway() {
    let (a, b) = (mock(KEY_A).await, mock(KEY_B).await);
    let config = [gpt_and_llama(&a, &b), FAST.to_owned()].concat();
    // The breaker's settings as flags this time.
    let server = serve(&config, &["--upstream-retries", "0", "--breaker-failures", "2", "--breaker-cool-down", "60s"]);
    fail(&a, json!({"status": 503})).await;
    fail(&b, json!({"status": 503})).await;
    for n in 1..=2 {
        let (status, body) = chat(&server, "fast").await;
        assert_ne!(status, 200, "{body}");
        assert_eq!((calls(&a).await, calls(&b).await), (n, n));
    }
    // Both breakers are open: the call is tried anyway rather than refused, and `b` now answers.
    fail(&b, json!({})).await;
    let (status, body) = chat(&server, "fast").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "llama3.1:8b");
    assert_eq!(calls(&b).await, 3, "tried although its breaker was open");
    // A model of one upstream whose breaker is open is tried anyway too.
    let (status, body) = chat(&server, "gpt-4o").await;
    assert_ne!(status, 200, "{body}");
    assert!(calls(&a).await > 2, "tried although its breaker was open");
}

// ---------------------------------------------------------------------------------------------------------------
// Models

#[tokio::test]
async fn models_lists_every_upstream_s_models_and_the_routes_once_each() {
    let a = mock_with(KEY_A, &["gpt-4o", "gpt-4o-mini", "text-embedding-3-small", "o3"], false).await;
    let b = mock_with(KEY_B, &["llama3.1:8b", "gpt-4o"], false).await;
    let config = [
        upstream("a", a.api_base().as_str(), r#"models = ["gpt-*"]"#),
        upstream("b", b.api_base().as_str(), ""),
        FAST.to_owned(),
        // A route named like a model an upstream lists: still listed once.
        "\n[[routes]]\nmodel = \"gpt-4o\"\ntargets = [{ upstream = \"b\", model = \"gpt-4o\" }]\n".to_owned(),
    ]
    .concat();
    let server = serve(&config, &["--models-cache", "0"]);
    let list = get_json(&server.url("/v1/models")).await;
    assert_eq!(list["object"], "list", "{list}");
    let data = list["data"].as_array().unwrap();
    let mut ids: Vec<&str> = data.iter().map(|m| m["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["fast", "gpt-4o", "gpt-4o-mini", "llama3.1:8b"], "{list}");
    let fast = data.iter().find(|m| m["id"] == "fast").unwrap();
    assert_eq!(fast["owned_by"], "offload", "{fast}");
    assert!(data.iter().all(|m| m["object"] == "model"), "{list}");
    for mock in [&a, &b] {
        let stats = get_json(&format!("http://{}/_mock/stats", mock.addr())).await;
        assert!(stats["models"].as_u64().unwrap() >= 1, "each upstream's own /models was asked: {stats}");
        assert_eq!(stats["models_authorized"], stats["models"], "with that upstream's own key: {stats}");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Config mistakes

/// Runs `offload serve` on `config` (with `env_removed` unset) and expects it to stop at start: non-zero exit,
/// never listening, and a message that names one of `lines` (1-based) of the file and `names`.
fn assert_refused_at_start(config: &str, env_removed: &[&str], lines: &[usize], names: &str) {
    let (mut command, file, _dirs) = command(config, &[]);
    for var in env_removed {
        command.env_remove(var);
    }
    let mut child = command.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("offload did not stop at start on a config mistake ({names})");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = reader.join().unwrap();
    assert!(!status.success(), "exit status {status} for {names}: {stderr}");
    assert!(!stderr.contains(" listening on "), "it listened before refusing: {stderr}");
    assert!(stderr.contains(names), "the message names {names:?}: {stderr}");
    let names_line = |n: usize| {
        [format!("line {n}"), format!(":{n}:"), format!(":{n} "), format!("line: {n}")]
            .iter()
            .any(|p| stderr.contains(p))
    };
    assert!(lines.iter().any(|&n| names_line(n)), "the message names line {lines:?} of {}: {stderr}", file.display());
}

/// The 1-based number of the line of `config` that contains `marker`.
fn line_of(config: &str, marker: &str) -> usize {
    config.lines().position(|line| line.contains(marker)).unwrap() + 1
}

#[test]
fn a_config_mistake_stops_the_server_at_start_naming_the_line() {
    let (a, b) = ("http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1");
    let base = [upstream("a", a, r#"models = ["gpt-*"]"#), upstream("b", b, r#"models = ["llama*"]"#)].concat();

    // An unknown upstream in a route.
    let config = format!(
        "{base}\n[[routes]]\nmodel = \"fast\"\ntargets = [{{ upstream = \"a\", model = \"gpt-4o-mini\" }}, {{ upstream = \"nowhere\", model = \"x\" }}]\n"
    );
    let lines = [line_of(&config, "nowhere"), line_of(&config, "[[routes]]")];
    assert_refused_at_start(&config, &[], &lines, "nowhere");

    // Two upstreams of the same name.
    let config = format!("{base}{}", upstream("a", "http://127.0.0.1:11/v1", ""));
    let second = config.lines().enumerate().filter(|(_, l)| *l == "name = \"a\"").nth(1).unwrap().0 + 1;
    assert_refused_at_start(&config, &[], &[second, second - 1], "\"a\"");

    // A pattern that is not a glob.
    let config = [upstream("a", a, r#"models = ["gpt-[4"]"#), upstream("b", b, "")].concat();
    assert_refused_at_start(&config, &[], &[line_of(&config, "gpt-[4")], "gpt-[4");

    // A key variable that is not set.
    let unset = "OFFLOAD_TEST_UPSTREAMS_UNSET_KEY";
    let config =
        [upstream("a", a, ""), format!("\n[[upstreams]]\nname = \"z\"\nurl = \"{b}\"\nkey_env = \"{unset}\"\n")]
            .concat();
    assert_refused_at_start(&config, &[unset], &[line_of(&config, unset)], unset);
}

// ---------------------------------------------------------------------------------------------------------------
// The other APIs

#[tokio::test]
async fn chat_completions_and_responses_route_and_fall_back_alike() {
    let a = mock(KEY_A).await;
    // `b` has only Chat Completions, and says so in the config (`api = "chat"`).
    let b = mock_with(KEY_B, &[], true).await;
    let config = [
        upstream("a", a.api_base().as_str(), r#"models = ["gpt-*"]"#),
        upstream("b", b.api_base().as_str(), "models = [\"llama*\"]\napi = \"chat\""),
        FAST.to_owned(),
    ]
    .concat();
    let server = serve(&config, &[]);
    let last = async |mock: &MockServer| received(mock).await.last().cloned().unwrap();

    // /v1/chat/completions: by route, by pattern, streamed or not.
    let (status, body) = chat(&server, "fast").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "gpt-4o-mini");
    let call = last(&a).await;
    assert_eq!((&call["path"], &call["body"]["model"]), (&json!("/v1/chat/completions"), &json!("gpt-4o-mini")));
    let stream = http()
        .post(server.url("/v1/chat/completions"))
        .json(&json!({"model": "llama3.1:70b", "messages": user("hi"), "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let text = stream.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!(last(&b).await["body"]["model"], "llama3.1:70b");

    // /v1/responses: by route, to a's Responses API.
    let respond = async |model: &str| {
        let response = http()
            .post(server.url("/v1/responses"))
            .json(&json!({"model": model, "input": "hi"}))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let object: Value = response.json().await.unwrap();
        assert_eq!(status, 200, "{object}");
        assert_eq!(object["status"], "completed", "{object}");
        object
    };
    respond("fast").await;
    let call = last(&a).await;
    assert_eq!((&call["path"], &call["body"]["model"]), (&json!("/v1/responses"), &json!("gpt-4o-mini")));

    // `a` fails: both APIs fall back to `b` (a Responses request translated to Chat Completions there).
    fail(&a, json!({"status": 503})).await;
    let a_before = calls(&a).await;
    let (status, body) = chat(&server, "fast").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "llama3.1:8b");
    respond("fast").await;
    let call = last(&b).await;
    assert_eq!((&call["path"], &call["body"]["model"]), (&json!("/v1/chat/completions"), &json!("llama3.1:8b")));
    assert_eq!(calls(&a).await - a_before, 2, "one failed attempt at `a` per request");
    let stats = get_json(&format!("http://{}/_mock/stats", b.addr())).await;
    assert_eq!(stats["not_found"], 0, "`api = \"chat\"`: b's Responses API is never tried: {stats}");
    assert_own_key(&a, "a").await;
    assert_own_key(&b, "b").await;
}

// ---------------------------------------------------------------------------------------------------------------
// Callers' keys

#[tokio::test]
async fn a_caller_s_key_goes_only_to_upstreams_that_take_callers_keys() {
    let a = mock(KEY_A).await;
    // `b` takes callers' keys: its mock expects the caller's key.
    let b = mock(CALLER_KEY).await;
    let config = [
        upstream("a", a.api_base().as_str(), r#"models = ["gpt-*"]"#),
        upstream("b", b.api_base().as_str(), "models = [\"llama*\"]\ncaller_keys = true"),
        FAST.to_owned(),
    ]
    .concat();
    let server = serve(&config, &[]);
    let expected = async |mock: &MockServer| received(mock).await.last().unwrap()["authorization_expected"].clone();
    let models_stats = async |mock: &MockServer| {
        let stats = get_json(&format!("http://{}/_mock/stats", mock.addr())).await;
        (stats["models"].as_u64().unwrap(), stats["models_authorized"].as_u64().unwrap())
    };

    let doc = run_with(&server, "stream-chatgpt", "gpt-4o", json!({}), Some(CALLER_KEY)).await;
    assert_served(&doc, "a", "gpt-4o", 0);
    assert_eq!(expected(&a).await, true, "`a` got its own key, not the caller's");
    let doc = run_with(&server, "stream-chatgpt", "llama3.2", json!({}), Some(CALLER_KEY)).await;
    assert_served(&doc, "b", "llama3.2", 0);
    assert_eq!(expected(&b).await, true, "`b` takes callers' keys");
    // Without a caller's key, `b` gets its own.
    let doc = run_with(&server, "stream-chatgpt", "llama3.2", json!({}), None).await;
    assert_served(&doc, "b", "llama3.2", 0);
    let call = received(&b).await.last().unwrap().clone();
    assert_eq!((&call["authorization"], &call["authorization_expected"]), (&json!(true), &json!(false)));

    // Through a fallback too: `a` gets its own key, then `b` the caller's.
    fail(&a, json!({"status": 503})).await;
    let doc = run_with(&server, "stream-chatgpt", "fast", json!({}), Some(CALLER_KEY)).await;
    assert_served(&doc, "b", "llama3.1:8b", 1);
    assert_eq!(expected(&b).await, true);
    assert_own_key(&a, "a").await;
    assert_eq!(calls(&a).await, 2);

    // GET /v1/models with a caller's key: `a` is asked with its own key, `b` with the caller's.
    let response = http().get(server.url("/v1/models")).header("X-OpenAI-API-Key", CALLER_KEY).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(models_stats(&a).await, (1, 1), "`a` was asked for its models with its own key");
    assert_eq!(models_stats(&b).await, (1, 1), "`b` was asked for its models with the caller's key");
    assert!(!server.log().join("\n").contains(CALLER_KEY), "the caller's key is in the log");
}
