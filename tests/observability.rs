//! Metrics and logs, black-box: `/metrics` scraped from its own listener after real traffic, and the JSON log of
//! the real binary read line by line.
//!
//! A test binary of its own: the metrics recorder is one per process, so traffic of other tests must not move
//! the values checked here.

#![expect(clippy::unwrap_used, reason = "a test fails loudly on anything unexpected")]

use offload::mock::MockConfig;
use offload::settings::{ServeArgs, Settings};
use offload::startup::Application;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

/// A scrape: every sample, keyed by its series as written (`name{label="value",...}`).
struct Scrape(HashMap<String, f64>);

impl Scrape {
    fn parse(text: &str) -> Self {
        let mut samples = HashMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let (series, value) = line.rsplit_once(' ').unwrap();
            samples.insert(series.to_owned(), value.parse::<f64>().unwrap());
        }
        Scrape(samples)
    }

    /// The value of the series of `name` whose labels include all of `labels` (summed over the others); 0 when
    /// there is none.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| {
                let (metric, rest) = series.split_once('{').unwrap_or((series.as_str(), ""));
                metric == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
            })
            .map(|(_, v)| v)
            .sum()
    }

    fn has(&self, name: &str) -> bool {
        self.0.keys().any(|s| s.split('{').next() == Some(name))
    }

    /// Every label value of every series.
    fn label_values(&self) -> Vec<String> {
        let mut values = Vec::new();
        for series in self.0.keys() {
            let Some((_, labels)) = series.split_once('{') else { continue };
            for pair in labels.trim_end_matches('}').split("\",") {
                let (_, value) = pair.split_once('=').unwrap();
                values.push(value.trim_matches('"').to_owned());
            }
        }
        values
    }
}

struct App {
    base: String,
    metrics: String,
    client: reqwest::Client,
    _mock: offload::mock::MockServer,
    dir: tempfile::TempDir,
}

/// The tests that start a server in this process take turns: they share its one recorder, and a scrape sets the
/// sampled gauges from the server scraped.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn spawn(adjust: impl FnOnce(&mut ServeArgs)) -> App {
    let mock = offload::mock::spawn("127.0.0.1:0".parse().unwrap(), MockConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut args = ServeArgs {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        data_dir: Some(dir.path().to_path_buf()),
        upstream_url: Some(mock.api_base()),
        flush_interval_ms: Some(10),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        // Keys created while a test runs take effect at once.
        key_cache_ttl: Some("0".into()),
        ..ServeArgs::default()
    };
    adjust(&mut args);
    let app = Application::build(Settings::resolve(args).unwrap()).await.unwrap();
    let metrics = format!("http://127.0.0.1:{}/metrics", app.metrics_port().unwrap());
    let base = app.base_url().to_owned();
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    App { base, metrics, client, _mock: mock, dir }
}

impl App {
    async fn scrape(&self) -> Scrape {
        let response = self.client.get(&self.metrics).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
        Scrape::parse(&response.text().await.unwrap())
    }

    async fn create(&self, endpoint: &str, body: Value) -> (u16, Value) {
        let response = self.client.post(format!("{}/v1/{endpoint}", self.base)).json(&body).send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    /// Scrapes until `check` holds (or 10 s pass).
    async fn scrape_until(&self, what: &str, check: impl Fn(&Scrape) -> bool) -> Scrape {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let scrape = self.scrape().await;
            if check(&scrape) {
                return scrape;
            }
            assert!(tokio::time::Instant::now() < deadline, "never {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn user(content: &str) -> Value {
    json!([{"role": "user", "content": content}])
}

#[tokio::test]
async fn metrics_move_with_traffic_and_labels_carry_no_ids_or_urls() {
    let _turn = SERIAL.lock().await;
    let app = spawn(|a| {
        a.max_in_flight = Some(1);
        a.allow_private_webhooks = Some(true);
    })
    .await;
    let before = app.scrape().await;
    let http = |s: &Scrape, route: &str, class: &str| {
        s.value("offload_http_requests_total", &[("route", route), ("status_class", class)])
    };

    // A slow private stream, read while it runs: a live reader, and the only slot taken.
    let (status, created) = app
        .create(
            "stream-chatgpt",
            json!({"messages": user("hi"), "access": "private", "mock": {"words": 40, "delay_ms": 20},
                   "webhook_url": "http://127.0.0.1:9/hook"}),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let stream_url = created["endpoints"]["stream_events_url"].as_str().unwrap().to_owned();
    let status_url = created["endpoints"]["status_url"].as_str().unwrap().to_owned();
    let token = created["authorization"]["bearer_token"].as_str().unwrap().to_owned();
    let mut reader = app.client.get(&stream_url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(reader.status(), 200);
    let during = app.scrape_until("a stream reader", |s| s.value("offload_stream_readers", &[]) >= 1.0).await;
    assert_eq!(during.value("offload_requests_running", &[]), 1.0);

    // Refused: no slot left (overload).
    let (status, _) = app.create("stream-chatgpt", json!({"messages": user("again")})).await;
    assert_eq!(status, 503);

    while reader.chunk().await.unwrap().is_some() {}
    drop(reader);
    app.scrape_until("the slot given back", |s| s.value("offload_requests_running", &[]) == 0.0).await;
    // Refused: a continuation of nothing.
    let unknown = status_url.replace(&id_of(&status_url), "00000000-0000-4000-8000-000000000000");
    let (status, _) = app.create("async-chatgpt", json!({"messages": user("go on"), "from_status_url": unknown})).await;
    assert_eq!(status, 404);
    // An unknown path and an unknown request.
    assert_eq!(app.client.get(format!("{}/no/such/path", app.base)).send().await.unwrap().status(), 404);
    assert_eq!(app.client.get(&unknown).send().await.unwrap().status(), 404);

    let after = app
        .scrape_until("the request finished, its reader gone and its webhook tried", |s| {
            s.value("offload_requests_finished_total", &[("status", "done")]) >= 1.0
                && s.value("offload_stream_readers", &[]) == 0.0
                && s.value("offload_webhook_attempts_total", &[("outcome", "retrying")]) >= 1.0
        })
        .await;
    let moved = |name: &str, labels: &[(&str, &str)]| after.value(name, labels) - before.value(name, labels);

    assert_eq!(http(&after, "/v1/stream-chatgpt", "2xx") - http(&before, "/v1/stream-chatgpt", "2xx"), 1.0);
    assert_eq!(http(&after, "/v1/stream-chatgpt", "5xx") - http(&before, "/v1/stream-chatgpt", "5xx"), 1.0);
    assert_eq!(http(&after, "/v1/async-chatgpt", "4xx") - http(&before, "/v1/async-chatgpt", "4xx"), 1.0);
    assert!(http(&after, "/{kind}/r/{*rest}", "2xx") > http(&before, "/{kind}/r/{*rest}", "2xx"));
    assert!(http(&after, "/{kind}/r/{*rest}", "4xx") > http(&before, "/{kind}/r/{*rest}", "4xx"));
    assert_eq!(http(&after, "unmatched", "4xx") - http(&before, "unmatched", "4xx"), 1.0);
    assert!(moved("offload_http_request_duration_seconds_count", &[("route", "/v1/stream-chatgpt")]) >= 2.0);
    assert_eq!(after.value("offload_http_requests_in_flight", &[]), 0.0);
    assert_eq!(after.value("offload_requests_running", &[]), 0.0);

    assert_eq!(moved("offload_requests_finished_total", &[("status", "done"), ("error_code", "none")]), 1.0);
    assert_eq!(moved("offload_create_refused_total", &[("reason", "overload")]), 1.0);
    assert_eq!(moved("offload_create_refused_total", &[("reason", "continuation")]), 1.0);
    assert_eq!(moved("offload_upstream_responses_total", &[("status", "200")]), 1.0);
    assert_eq!(moved("offload_upstream_response_duration_seconds_count", &[]), 1.0);
    assert_eq!(moved("offload_time_to_first_token_seconds_count", &[]), 1.0);
    assert!(moved("offload_store_batch_writes_count", &[("lane", "create")]) >= 1.0);
    assert!(moved("offload_store_batch_writes_sum", &[("lane", "bulk")]) >= 40.0, "every chunk is written");
    assert!(moved("offload_store_write_duration_seconds_count", &[("lane", "bulk")]) >= 1.0);
    assert!(after.has("offload_store_queue_writes"));
    // Histograms are histograms (buckets), not summaries.
    assert!(after.value("offload_time_to_first_token_seconds_bucket", &[("le", "+Inf")]) >= 1.0);
    // Durations have buckets below a millisecond, where a create and its insert fall: a 1 ms target is readable.
    for le in ["0.0001", "0.00025", "0.0005", "0.00075", "0.001"] {
        let bucket = format!("le=\"{le}\"");
        assert!(
            after
                .0
                .keys()
                .any(|s| s.starts_with("offload_store_write_duration_seconds_bucket{") && s.contains(&bucket)),
            "no store write bucket at {le} s"
        );
    }

    let id = id_of(&status_url);
    for value in after.label_values() {
        assert!(
            !value.contains(&id) && !value.contains(&token) && !value.contains("://") && !value.contains("/r/p"),
            "a label carries an id, a token or a URL: {value}"
        );
        assert!(value.len() <= 32, "a label value looks unbounded: {value}");
    }
}

#[tokio::test]
async fn metrics_listener_serves_only_metrics() {
    let _turn = SERIAL.lock().await;
    let app = spawn(|_| {}).await;
    let other = app.metrics.replace("/metrics", "/v1/stream-chatgpt");
    assert_eq!(app.client.get(other).send().await.unwrap().status(), 404);
    // The main listener has no /metrics.
    assert_eq!(app.client.get(format!("{}/metrics", app.base)).send().await.unwrap().status(), 404);
    app.scrape().await;
}

/// Creates a service key with `offload keys create` on the app's store and returns it.
fn create_key(app: &App, name: &str, limits: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_offload"))
        .args(["keys", "create", "--name", name])
        .args(limits)
        .arg("--data-dir")
        .arg(app.dir.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap().lines().last().unwrap().trim().to_owned()
}

#[tokio::test]
async fn refused_creates_are_counted_by_reason_key_quota_and_rate() {
    let _turn = SERIAL.lock().await;
    let app = spawn(|_| {}).await;
    let daily = create_key(&app, "daily", &["--requests-per-day", "1"]);
    let rated = create_key(&app, "rated", &["--rate", "0.1"]);
    let before = app.scrape().await;
    let create = |key: Option<&str>| {
        let mut request =
            app.client.post(format!("{}/v1/async-chatgpt", app.base)).json(&json!({"messages": user("hi")}));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(create(None).await, 401);
    assert_eq!(create(Some("ofk_not_a_key_of_this_server_0123456789abcdef")).await, 401);
    assert_eq!(create(Some(&daily)).await, 200);
    assert_eq!(create(Some(&daily)).await, 429);
    assert_eq!(create(Some(&rated)).await, 200);
    assert_eq!(create(Some(&rated)).await, 429);
    let after = app.scrape().await;
    let moved = |reason: &str| {
        after.value("offload_create_refused_total", &[("reason", reason)])
            - before.value("offload_create_refused_total", &[("reason", reason)])
    };
    assert_eq!((moved("key"), moved("quota"), moved("rate")), (2.0, 1.0, 1.0));
}

fn id_of(url: &str) -> String {
    url.rsplit('/').next().unwrap().trim_end_matches(".json").trim_end_matches(".txt").to_owned()
}

const SECRET_UPSTREAM_KEY: &str = "sk-log-test-0123456789-SECRET";

/// The real binary with `--log-format json`: every line is a JSON object; one access line per HTTP request, with
/// the request id on the lines about a request; no secret anywhere.
#[tokio::test]
async fn json_logs_are_one_object_a_line_with_ids_and_no_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_offload"))
        .args(["serve", "--listen", "127.0.0.1:0", "--mock-upstream", "--log-format", "json"])
        .arg("--data-dir")
        .arg(dir.path())
        .env("OFFLOAD_UPSTREAM_KEY", SECRET_UPSTREAM_KEY)
        .env("OFFLOAD_LOG", "debug")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let addr = loop {
        let line = rx
            .recv_timeout(deadline - std::time::Instant::now())
            .unwrap_or_else(|_| panic!("the server did not start: {lines:#?}"));
        lines.push(line.clone());
        let parsed: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if let Some(rest) = parsed["message"].as_str().and_then(|m| m.split("listening on ").nth(1)) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };

    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let created: Value = client
        .post(format!("http://{addr}/v1/stream-chatgpt"))
        .header("X-OpenAI-API-Key", "sk-caller-key-0123456789-SECRET")
        .json(&json!({"messages": user("hi"), "access": "private"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = created["authorization"]["bearer_token"].as_str().unwrap().to_owned();
    let stream_arg = created["authorization"]["stream_url_arg"].as_str().unwrap().to_owned();
    let stream_url = created["endpoints"]["stream_events_url"].as_str().unwrap().to_owned();
    let status_url = created["endpoints"]["status_url"].as_str().unwrap().to_owned();
    let id = id_of(&status_url);
    let body = client.get(format!("{stream_url}?{stream_arg}")).send().await.unwrap().text().await.unwrap();
    assert!(body.contains("[DONE]"));
    let doc: Value = client.get(&status_url).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
    assert_eq!(doc["status"], "done");
    assert_eq!(client.get(&status_url).send().await.unwrap().status(), 401);

    // The access line of the last call is written once its response is sent; give the log a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = child.kill();
    let _ = child.wait();
    lines.extend(rx.try_iter());

    let objects: Vec<Value> = lines
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}")))
        .collect();
    for line in &lines {
        for secret in [SECRET_UPSTREAM_KEY, "sk-caller-key-0123456789-SECRET", &token, &stream_arg[13..]] {
            assert!(!line.contains(secret), "a secret reached the log: {line}");
        }
    }
    let access: Vec<&Value> = objects.iter().filter(|o| o["target"] == "offload::access").collect();
    let about_request = |o: &&&Value| o["span"]["request_id"].as_str() == Some(id.as_str());
    for (route, method, status) in
        [("/v1/stream-chatgpt", "POST", 200), ("/{kind}/r/{*rest}", "GET", 200), ("/{kind}/r/{*rest}", "GET", 401)]
    {
        let line = access
            .iter()
            .find(|o| o["route"] == route && o["method"] == method && o["status"] == status && about_request(o))
            .unwrap_or_else(|| panic!("no access line for {method} {route} {status} naming {id}: {access:#?}"));
        assert!(line["latency_ms"].as_f64().unwrap() >= 0.0);
        assert!(line["timestamp"].is_string() && line["level"] == "INFO");
    }
    assert_eq!(access.len(), 4, "one access line per HTTP request: {access:#?}");
    // The worker's lines name the request too.
    let finished = objects.iter().find(|o| o["message"] == "request finished").unwrap();
    assert_eq!(finished["span"]["request_id"], id.as_str());
    assert_eq!(finished["status"], "done");
}

/// The real binary, in a process of its own (so that no other test has moved its recorder), scraped before any
/// traffic: every family of README's table is there, each label value of its closed set at zero.
#[tokio::test]
async fn every_family_is_exported_at_zero_before_any_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_offload"))
        .args(["serve", "--listen", "127.0.0.1:0", "--mock-upstream", "--log-format", "json"])
        .args(["--metrics-listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) else {
            let _ = child.kill();
            panic!("the server never said where its metrics are");
        };
        let parsed: Value = serde_json::from_str(&line).unwrap_or_default();
        if let Some(url) = parsed["message"].as_str().and_then(|m| m.strip_prefix("metrics at ")) {
            break url.to_owned();
        }
    };
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let text = client.get(&metrics).send().await.unwrap().text().await.unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let scrape = Scrape::parse(&text);

    for family in [
        "offload_http_requests_total",
        "offload_http_request_duration_seconds_count",
        "offload_http_requests_in_flight",
        "offload_requests_running",
        "offload_requests_finished_total",
        "offload_create_refused_total",
        "offload_stream_readers",
        "offload_time_to_first_token_seconds_count",
        "offload_upstream_response_duration_seconds_count",
        "offload_upstream_responses_total",
        "offload_upstream_failures_total",
        "offload_store_batch_writes_count",
        "offload_store_write_duration_seconds_count",
        "offload_store_write_errors_total",
        "offload_store_queue_writes",
        "offload_store_held_bytes",
        "offload_store_reachable",
        "offload_store_create_inserts_total",
        "offload_webhook_attempts_total",
        "offload_tokens_total",
    ] {
        assert!(scrape.has(family), "{family} is missing before any traffic:\n{text}");
    }
    let series = |name: &str, labels: &[(&str, &str)]| {
        scrape.0.iter().any(|(series, _)| {
            let (metric, rest) = series.split_once('{').unwrap_or((series.as_str(), ""));
            metric == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
    };
    let closed: &[(&str, &str, &[&str])] = &[
        ("offload_webhook_attempts_total", "outcome", &["delivered", "retrying", "failed"]),
        ("offload_upstream_failures_total", "reason", &["connect_timeout", "unreachable", "failed"]),
        ("offload_store_write_errors_total", "lane", &["create", "bulk"]),
        ("offload_store_batch_writes_count", "lane", &["create", "bulk"]),
        (
            "offload_store_create_inserts_total",
            "via",
            &["caller", "with_upstream", "writer_busy", "checkpoint", "full_sync", "try_failed"],
        ),
        ("offload_requests_finished_total", "status", &["done", "error", "stop"]),
        ("offload_requests_finished_total", "error_code", &["none", "timeout", "interrupted", "other"]),
        ("offload_http_requests_total", "route", &["/v1/stream-chatgpt", "/{kind}/r/{*rest}", "unmatched"]),
        ("offload_http_requests_total", "status_class", &["2xx", "4xx", "5xx"]),
        (
            "offload_create_refused_total",
            "reason",
            &[
                "key",
                "in_flight",
                "rate",
                "quota",
                "overload",
                "shutting_down",
                "store",
                "upstream_key",
                "webhook",
                "continuation",
                "internal",
            ],
        ),
    ];
    for (name, label, values) in closed {
        for value in *values {
            assert!(series(name, &[(label, value)]), "{name}{{{label}=\"{value}\"}} is missing:\n{text}");
        }
    }
    // Nothing happened yet: every counter and gauge reads 0 (the scrape itself is not counted before it ends), but
    // the store's health, which reads 1 while the store answers.
    for (series, value) in &scrape.0 {
        let expected = if series == "offload_store_reachable" { 1.0 } else { 0.0 };
        assert_eq!(*value, expected, "{series} before any traffic");
    }
}

/// The routes whose series are exported at zero from the start (`metrics::ROUTES`) are the router's routes: a
/// route added to `src/http/mod.rs` without its series would show up only after its first call.
#[test]
fn the_routes_of_the_metrics_are_the_routers() {
    let source = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/http/mod.rs")).unwrap();
    let routed: std::collections::BTreeSet<&str> =
        source.split(".route(\"").skip(1).map(|route| route.split_once('"').unwrap().0).collect();
    assert!(routed.len() >= 6, "could not read the routes of src/http/mod.rs");
    let labelled: std::collections::BTreeSet<&str> = offload::metrics::ROUTES.iter().copied().collect();
    assert_eq!(labelled, routed, "metrics::ROUTES vs the router's routes");
}

/// Tokens are counted from each finished request's usage (streams too), by kind and model; callers naming dozens
/// of made-up models get at most 32 model labels, the rest counting as `other`.
#[tokio::test]
async fn tokens_are_counted_by_model_with_a_bounded_label_set() {
    let _turn = SERIAL.lock().await;
    let app = spawn(|_| {}).await;
    const MODELS: usize = 40;
    const WORDS: u64 = 3;
    let before = app.scrape().await;
    let other_before = before.value("offload_tokens_total", &[("kind", "output"), ("model", "other")]);
    for i in 0..MODELS {
        let endpoint = if i % 2 == 0 { "async-chatgpt" } else { "stream-chatgpt" };
        let body = json!({"model": format!("made-up-{i}"), "messages": user("hi"), "mock": {"words": WORDS}});
        let (status, _) = app.create(endpoint, body).await;
        assert_eq!(status, 200);
    }
    let mine = |s: &Scrape| -> f64 {
        let labelled: f64 = (0..MODELS)
            .map(|i| s.value("offload_tokens_total", &[("kind", "output"), ("model", &format!("made-up-{i}"))]))
            .sum();
        labelled + s.value("offload_tokens_total", &[("kind", "output"), ("model", "other")]) - other_before
    };
    let expected = (MODELS as u64 * WORDS) as f64;
    let scrape = app.scrape_until("every request's tokens counted", |s| mine(s) >= expected).await;
    assert_eq!(mine(&scrape), expected);
    for i in 0..MODELS {
        let labelled = scrape.value("offload_tokens_total", &[("kind", "output"), ("model", &format!("made-up-{i}"))]);
        assert!(labelled == 0.0 || labelled == WORDS as f64, "made-up-{i}: {labelled}");
        let input = scrape.value("offload_tokens_total", &[("kind", "input"), ("model", &format!("made-up-{i}"))]);
        assert_eq!(input > 0.0, labelled > 0.0, "made-up-{i}: input {input}");
    }
    let labels: std::collections::BTreeSet<&str> = scrape
        .0
        .keys()
        .filter(|series| series.starts_with("offload_tokens_total{"))
        .filter_map(|series| series.split("model=\"").nth(1)?.split('"').next())
        .collect();
    assert!(labels.len() <= 33, "{} model labels: {labels:?}", labels.len());
    assert!(labels.contains("other"));
    assert!(
        scrape.value("offload_tokens_total", &[("kind", "output"), ("model", "other")]) - other_before
            >= ((MODELS - 32) as u64 * WORDS) as f64,
        "the models past the first 32 count as other"
    );
}

/// Every create's insert is counted once, by where the embedded store committed it: its caller's thread, or the
/// writer thread and why.
#[tokio::test]
async fn creates_inserts_are_counted_by_where_they_were_committed() {
    let _turn = SERIAL.lock().await;
    const VIA: [&str; 6] = ["caller", "with_upstream", "writer_busy", "checkpoint", "full_sync", "try_failed"];
    let inserts = |s: &Scrape| VIA.map(|via| s.value("offload_store_create_inserts_total", &[("via", via)]));
    let moved = |before: &[f64; 6], after: &[f64; 6], via: &str| {
        let i = VIA.iter().position(|v| *v == via).unwrap();
        after[i] - before[i]
    };

    let app = spawn(|_| {}).await;
    let before = inserts(&app.scrape().await);
    for i in 0..20 {
        let endpoint = if i % 2 == 0 { "async-chatgpt" } else { "stream-chatgpt" };
        let (status, created) = app.create(endpoint, json!({"messages": user("hi")})).await;
        assert_eq!(status, 200, "{created}");
    }
    for _ in 0..3 {
        let body = json!({"model": "gpt-4o-mini", "messages": user("hi")});
        let response = app.client.post(format!("{}/v1/chat/completions", app.base)).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    let after = inserts(&app.scrape().await);
    let total: f64 = VIA.iter().map(|via| moved(&before, &after, via)).sum();
    assert_eq!(total, 23.0, "each insert counted once: {VIA:?} {before:?} -> {after:?}");
    assert_eq!(moved(&before, &after, "with_upstream"), 3.0, "the OpenAI entry's inserts go to the writer thread");
    assert!(moved(&before, &after, "caller") >= 1.0, "one create at a time finds the connection free at times");
    assert_eq!(moved(&before, &after, "full_sync"), 0.0);

    let full = spawn(|a| a.sqlite_synchronous = Some("full".into())).await;
    let before = inserts(&full.scrape().await);
    for _ in 0..3 {
        let (status, created) = full.create("async-chatgpt", json!({"messages": user("hi")})).await;
        assert_eq!(status, 200, "{created}");
    }
    let after = inserts(&full.scrape().await);
    assert_eq!(moved(&before, &after, "full_sync"), 3.0, "every commit syncs: none is tried on the caller's thread");
    assert_eq!(moved(&before, &after, "caller"), 0.0);
}
