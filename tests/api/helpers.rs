//! Starts the real server on port 0 against the built-in mock upstream, and speaks HTTP and SSE to it.

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use offload::mock::{MockConfig, MockServer};
use offload::settings::{ServeArgs, Settings};
use offload::startup::Application;
use serde_json::{Value, json};
use std::time::Duration;
use tempfile::TempDir;
use tokio::sync::oneshot;

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub mock: MockServer,
    pub data_dir: TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    pub server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// One event as an SSE client sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub event: String,
    pub id: String,
    pub data: String,
}

pub async fn spawn_app() -> TestApp {
    spawn_with(|_| {}).await
}

/// Starts the app with settings adjusted by `adjust` (they start from the defaults, port 0, a fresh data
/// directory and the mock upstream).
pub async fn spawn_with(adjust: impl FnOnce(&mut ServeArgs)) -> TestApp {
    spawn_with_mock(MockConfig::default(), adjust).await
}

/// Like [`spawn_with`], with the mock upstream started from `mock` (e.g. the key it expects calls to carry).
pub async fn spawn_with_mock(mock: MockConfig, adjust: impl FnOnce(&mut ServeArgs)) -> TestApp {
    let mock = offload::mock::spawn("127.0.0.1:0".parse().unwrap(), mock).await.unwrap();
    let data_dir = tempfile::tempdir().unwrap();
    let mut args = test_args(&mock, &data_dir);
    adjust(&mut args);
    start_on(args, mock, data_dir, None).await
}

/// As [`spawn_with`], on a store the test made (over `data_dir`, which the app then owns).
pub async fn spawn_on(
    stores: offload::store::Stores,
    data_dir: TempDir,
    adjust: impl FnOnce(&mut ServeArgs),
) -> TestApp {
    let mock = offload::mock::spawn("127.0.0.1:0".parse().unwrap(), MockConfig::default()).await.unwrap();
    let mut args = test_args(&mock, &data_dir);
    adjust(&mut args);
    start_on(args, mock, data_dir, Some(stores)).await
}

/// The settings every test starts from: port 0, the data directory, the mock upstream, quick flushes, and keys
/// created or revoked while a test runs taking effect at once (the next create sees them).
fn test_args(mock: &MockServer, data_dir: &TempDir) -> ServeArgs {
    ServeArgs {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        data_dir: Some(data_dir.path().to_path_buf()),
        upstream_url: Some(mock.api_base()),
        flush_interval_ms: Some(10),
        key_cache_ttl: Some("0".into()),
        ..ServeArgs::default()
    }
}

/// A mock that reports whether each call carried `Authorization: Bearer <key>` (it never shows the value).
pub fn mock_expecting(key: &str) -> MockConfig {
    MockConfig { expected_key: offload::domain::UpstreamKey::new(key), ..MockConfig::default() }
}

async fn start_on(
    args: ServeArgs,
    mock: MockServer,
    data_dir: TempDir,
    stores: Option<offload::store::Stores>,
) -> TestApp {
    let settings = Settings::resolve(args).unwrap();
    let app = match stores {
        Some(stores) => Application::build_on(settings, stores).await.unwrap(),
        None => Application::build(settings).await.unwrap(),
    };
    let base = app.base_url().to_owned();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = rx.await;
    }));
    TestApp {
        base,
        client: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap(),
        mock,
        data_dir,
        shutdown: Some(tx),
        server: Some(server),
    }
}

pub fn user(content: &str) -> Value {
    json!([{"role": "user", "content": content}])
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// POSTs a create body to `/v1/{endpoint}` (`stream-chatgpt` or `async-chatgpt`).
    pub async fn create(&self, endpoint: &str, body: &Value) -> reqwest::Response {
        self.client.post(self.url(&format!("/v1/{endpoint}"))).json(body).send().await.unwrap()
    }

    /// Creates and asserts 200; returns the response JSON.
    pub async fn create_ok(&self, endpoint: &str, body: &Value) -> Value {
        let response = self.create(endpoint, body).await;
        let status = response.status();
        let json: Value = response.json().await.unwrap();
        assert_eq!(status, 200, "{json}");
        json
    }

    pub async fn stream(&self, body: Value) -> Value {
        self.create_ok("stream-chatgpt", &body).await
    }

    pub async fn get(&self, url: &str, bearer: Option<&str>) -> reqwest::Response {
        let mut request = self.client.get(url);
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap()
    }

    pub async fn get_json(&self, url: &str, bearer: Option<&str>) -> Value {
        let response = self.get(url, bearer).await;
        assert_eq!(response.status(), 200, "GET {url}");
        response.json().await.unwrap()
    }

    /// Polls a status URL until it is final (or 20 s pass).
    pub async fn wait_final(&self, status_url: &str, bearer: Option<&str>) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let doc = self.get_json(status_url, bearer).await;
            if matches!(doc["status"].as_str(), Some("done" | "error" | "stop")) {
                return doc;
            }
            assert!(tokio::time::Instant::now() < deadline, "not final in time: {doc}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls until the status is `status` (or 20 s pass).
    pub async fn wait_status(&self, status_url: &str, status: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let doc = self.get_json(status_url, None).await;
            if doc["status"] == status {
                return doc;
            }
            assert!(tokio::time::Instant::now() < deadline, "never {status}: {doc}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Reads a whole event stream with an SSE client.
    pub async fn events(&self, url: &str, headers: &[(&str, &str)]) -> Vec<Event> {
        let mut request = self.client.get(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200, "GET {url}");
        assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        read_events(response).await
    }

    pub async fn mock_stats(&self) -> Value {
        self.get_json(&format!("http://{}/_mock/stats", self.mock.addr()), None).await
    }

    /// Waits (20 s at most) until the mock upstream's counter `stat` (`completed`, `disconnected`, ...) is `n`.
    pub async fn wait_mock_stat(&self, stat: &str, n: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let stats = self.mock_stats().await;
            if stats[stat] == n {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "the mock's {stat} never reached {n}: {stats}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn mock_requests(&self) -> Vec<Value> {
        let v = self.get_json(&format!("http://{}/_mock/requests", self.mock.addr()), None).await;
        v.as_array().unwrap().clone()
    }

    /// Rows of the store's tables that belong to request `id`: (requests, events, raw parts). Once the request
    /// row is gone, the events and raw parts counted are every orphan in the store (rows of no request).
    pub fn rows_of(&self, id: &str) -> (i64, i64, i64) {
        let conn = rusqlite::Connection::open(self.data_dir.path().join("offload.db")).unwrap();
        let rkey: Option<i64> =
            conn.query_row("SELECT rkey FROM requests WHERE id = ?1", [uuid_bytes(id)], |r| r.get(0)).ok();
        let count = |sql: &str| conn.query_row(sql, [rkey], |r| r.get::<_, i64>(0)).unwrap();
        match rkey {
            Some(_) => (
                1,
                count("SELECT COUNT(*) FROM events WHERE rkey = ?1"),
                count("SELECT COUNT(*) FROM raw_parts WHERE rkey = ?1"),
            ),
            None => (
                0,
                count("SELECT COUNT(*) FROM events WHERE ?1 IS NULL AND rkey NOT IN (SELECT rkey FROM requests)"),
                count("SELECT COUNT(*) FROM raw_parts WHERE ?1 IS NULL AND rkey NOT IN (SELECT rkey FROM requests)"),
            ),
        }
    }

    pub fn total_requests(&self) -> i64 {
        let conn = rusqlite::Connection::open(self.data_dir.path().join("offload.db")).unwrap();
        conn.query_row("SELECT COUNT(*) FROM requests", [], |r| r.get(0)).unwrap()
    }

    /// Sends the shutdown signal and waits for the server to finish draining.
    pub async fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(30), server).await.unwrap().unwrap().unwrap();
        }
    }

    /// Signals shutdown without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub fn uuid_bytes(id: &str) -> Vec<u8> {
    let hex: String = id.chars().filter(|c| *c != '-').collect();
    (0..16).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect()
}

/// The id at the end of a request URL.
pub fn id_of(url: &str) -> String {
    let last = url.rsplit('/').next().unwrap();
    last.split('.').next().unwrap().to_owned()
}

pub async fn read_events(response: reqwest::Response) -> Vec<Event> {
    let mut stream = response.bytes_stream().eventsource();
    let mut events = Vec::new();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(30), stream.next()).await.unwrap() {
        let event = event.unwrap();
        let done = event.data == "[DONE]";
        events.push(Event { event: event.event, id: event.id, data: event.data });
        if done {
            break;
        }
    }
    events
}

/// The concatenated content of every chunk event (choice 0).
pub fn content_of(events: &[Event]) -> String {
    events
        .iter()
        .filter(|e| e.event == "message" && e.data != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(&e.data).ok())
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect()
}

pub fn endpoint(created: &Value, name: &str) -> String {
    created["endpoints"][name].as_str().unwrap_or_else(|| panic!("no {name} in {created}")).to_owned()
}

/// A webhook receiver on loopback that answers each POST with the next scripted status (then 200).
pub struct Receiver {
    pub url: String,
    pub hits: std::sync::Arc<parking_lot::Mutex<Vec<Hit>>>,
    _task: tokio::task::JoinHandle<()>,
}

#[derive(Clone, Debug)]
pub struct Hit {
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
    pub at: std::time::Instant,
}

impl Hit {
    pub fn header(&self, name: &str) -> String {
        self.headers.get(name).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
    }

    /// The `response` form field, parsed.
    pub fn document(&self) -> Value {
        let (_, json) = url::form_urlencoded::parse(self.body.as_bytes()).find(|(k, _)| k == "response").unwrap();
        serde_json::from_str(&json).unwrap()
    }
}

/// `script` holds (status, Retry-After seconds) answers for the first POSTs.
pub async fn receiver(script: Vec<(u16, Option<u64>)>) -> Receiver {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    let hits: std::sync::Arc<parking_lot::Mutex<Vec<Hit>>> = Default::default();
    let script = std::sync::Arc::new(parking_lot::Mutex::new(std::collections::VecDeque::from(script)));
    let recorded = hits.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let recorded = recorded.clone();
            let script = script.clone();
            async move {
                recorded.lock().push(Hit { headers, body, at: std::time::Instant::now() });
                let (status, retry_after) = script.lock().pop_front().unwrap_or((200, None));
                let mut response = StatusCode::from_u16(status).unwrap().into_response();
                if let Some(seconds) = retry_after {
                    response.headers_mut().insert("retry-after", seconds.into());
                }
                response
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Receiver { url, hits, _task: task }
}

impl Receiver {
    /// Waits until `n` POSTs arrived (or 20 s pass).
    pub async fn wait_hits(&self, n: usize) -> Vec<Hit> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let hits = self.hits.lock().clone();
            if hits.len() >= n {
                return hits;
            }
            assert!(tokio::time::Instant::now() < deadline, "only {} webhook POSTs arrived", hits.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Polls the document until its `webhook.state` is final (delivered or failed).
pub async fn wait_webhook(app: &TestApp, status_url: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let doc = app.get_json(status_url, None).await;
        if matches!(doc["webhook"]["state"].as_str(), Some("delivered" | "failed")) {
            return doc;
        }
        assert!(tokio::time::Instant::now() < deadline, "webhook never settled: {doc}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `offload keys ...` on a data directory and returns its standard output.
pub fn keys_cli(data_dir: &std::path::Path, args: &[&str]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_offload"))
        .arg("keys")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .unwrap();
    assert!(output.status.success(), "offload keys {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}
