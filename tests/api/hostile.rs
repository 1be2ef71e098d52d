//! Hostile clients: slow and half-sent requests, bodies nobody asked for, bytes that are not text, floods of
//! connections, and a public listener without service keys. Spoken to over raw TCP where reqwest would be too
//! polite.

use crate::helpers::*;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn addr(app: &TestApp) -> String {
    app.base.trim_start_matches("http://").to_owned()
}

/// Creates a service key with the CLI; the server requires keys from then on (within a second).
fn create_key(app: &TestApp) -> String {
    let out = keys_cli(app.data_dir.path(), &["create", "--name", "hostile"]);
    out.lines().last().unwrap().trim().to_owned()
}

/// A parsed HTTP/1.1 response read off a raw socket.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    head: String,
    body: String,
}

impl RawResponse {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

/// Reads one response (head and a Content-Length body) within `within`.
async fn read_response(stream: &mut TcpStream, within: Duration) -> RawResponse {
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before a response: {:?}", String::from_utf8_lossy(&buf));
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let length: usize = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed mid-body");
            buf.extend_from_slice(&chunk[..n]);
        }
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        RawResponse { status, head, body: String::from_utf8_lossy(&buf[head_end..head_end + length]).to_string() }
    };
    tokio::time::timeout(within, read).await.unwrap_or_else(|_| panic!("no response within {within:?}"))
}

/// Waits until the server closes the socket (EOF or reset) and returns how long that took.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Duration {
    let started = Instant::now();
    let mut sink = [0u8; 1024];
    let wait = async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, wait)
        .await
        .unwrap_or_else(|_| panic!("the connection was still open after {within:?}"));
    started.elapsed()
}

async fn healthz_answers(app: &TestApp) {
    let response = tokio::time::timeout(Duration::from_secs(3), app.client.get(app.url("/healthz")).send())
        .await
        .unwrap_or_else(|_| panic!("/healthz did not answer within 3 s"))
        .unwrap();
    assert_eq!(response.status(), 200);
}

fn assert_json_error(status: u16, content_type: &str, body: &str, what: &str) {
    assert!(
        content_type.starts_with("application/json"),
        "{what}: {status} with content-type {content_type:?}: {body}"
    );
    let error: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {body}"));
    assert_eq!(error["status"], "error", "{what}: {body}");
    assert!(error["error"]["code"].as_str().is_some_and(|c| !c.is_empty()), "{what}: {body}");
    assert!(error["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {body}");
    assert!(error["error"].get("param").is_some(), "{what}: {body}");
}

#[tokio::test]
async fn a_half_sent_request_head_is_closed_after_the_header_timeout_while_healthz_keeps_answering() {
    let app = spawn_with(|a| a.header_timeout = Some("1s".into())).await;
    let mut slow = TcpStream::connect(addr(&app)).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ").await.unwrap();
    healthz_answers(&app).await;
    let took = closed_within(&mut slow, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(500), "closed after {took:?}, before the header timeout");
    healthz_answers(&app).await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let app = spawn_with(|a| a.idle_timeout = Some("1s".into())).await;
    let mut conn = TcpStream::connect(addr(&app)).await.unwrap();
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    assert_eq!(read_response(&mut conn, Duration::from_secs(3)).await.status, 200);
    // Still usable before the timeout...
    tokio::time::sleep(Duration::from_millis(300)).await;
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    assert_eq!(read_response(&mut conn, Duration::from_secs(3)).await.status, 200);
    // ...then closed once idle that long.
    closed_within(&mut conn, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_trickling_create_body_gets_a_json_408_after_the_body_timeout() {
    let app = spawn_with(|a| a.body_timeout = Some("1s".into())).await;
    let mut conn = TcpStream::connect(addr(&app)).await.unwrap();
    let head = "POST /v1/async-chatgpt HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n";
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(br#"{"messages": "#).await.unwrap();
    let started = Instant::now();
    let response = read_response(&mut conn, Duration::from_secs(5)).await;
    assert_eq!(response.status, 408, "{response:?}");
    assert!(started.elapsed() >= Duration::from_millis(800), "{:?}", started.elapsed());
    let error = response.json();
    assert_eq!(error["error"]["code"], "body_timeout");
    assert_eq!(app.total_requests(), 0);
}

#[tokio::test]
async fn an_unauthenticated_create_is_refused_with_401_before_its_body_is_read() {
    let app = spawn_app().await;
    create_key(&app);
    let mut conn = TcpStream::connect(addr(&app)).await.unwrap();
    let head = "POST /v1/stream-chatgpt HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 4194304\r\n\r\n";
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(b"{\"messages\"").await.unwrap();
    let response = read_response(&mut conn, Duration::from_secs(2)).await;
    assert_eq!(response.status, 401, "{response:?}");
    assert!(response.head.to_ascii_lowercase().contains("www-authenticate: bearer"));
    assert_eq!(response.json()["error"]["code"], "unauthorized");
    // The server does not wait for the 4 MiB nobody will send.
    closed_within(&mut conn, Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_content_length_over_the_limit_is_413_before_the_body_is_read() {
    let app = spawn_with(|a| a.max_body_bytes = Some(1000)).await;
    let mut conn = TcpStream::connect(addr(&app)).await.unwrap();
    let head = "POST /v1/async-chatgpt HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 1001\r\n\r\n";
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(b"{\"messages\"").await.unwrap();
    let response = read_response(&mut conn, Duration::from_secs(2)).await;
    assert_eq!(response.status, 413, "{response:?}");
    let error = response.json();
    assert_eq!(error["error"]["code"], "payload_too_large");
    assert!(error["error"]["message"].as_str().unwrap().contains("1000"), "{error}");
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_413() {
    let app = spawn_with(|a| a.max_body_bytes = Some(1000)).await;
    let body = json!({"messages": user(&"x".repeat(2000))});
    let stream = futures_util::stream::iter([Ok::<_, std::io::Error>(body.to_string())]);
    let response = app
        .client
        .post(app.url("/v1/async-chatgpt"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(response.json::<Value>().await.unwrap()["error"]["code"], "payload_too_large");
}

/// The issue's attack: far more half-sent requests than the process may open files, on the real binary run under
/// `ulimit -n 256`. The server keeps below its file limit and sheds the idle connections to serve new ones.
#[tokio::test]
async fn a_flood_of_half_sent_requests_beyond_the_file_limit_does_not_stop_healthz_or_creates() {
    let data = tempfile::tempdir().unwrap();
    let server = LimitedServer::start(data.path(), 256);
    let mut flood = Vec::new();
    for _ in 0..400 {
        let Ok(Ok(mut conn)) = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&server.addr)).await
        else {
            continue;
        };
        let _ = conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n").await;
        flood.push(conn);
    }
    assert!(flood.len() > 300, "only {} connections opened", flood.len());
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let base = format!("http://{}", server.addr);
    for _ in 0..3 {
        let health =
            client.get(format!("{base}/healthz")).send().await.unwrap_or_else(|e| panic!("/healthz within 5 s: {e}"));
        assert_eq!(health.status(), 200);
        let created = client
            .post(format!("{base}/v1/async-chatgpt"))
            .json(&json!({"messages": user("hi")}))
            .send()
            .await
            .unwrap_or_else(|e| panic!("a create within 5 s: {e}"));
        assert_eq!(created.status(), 200);
    }
    drop(flood);
}

/// `offload serve` with the mock upstream, run under `ulimit -n <files>`.
struct LimitedServer;

impl LimitedServer {
    fn start(data_dir: &std::path::Path, files: u32) -> crate::support::Offload {
        let mut command = std::process::Command::new("sh");
        command
            .arg("-c")
            .arg(format!("ulimit -n {files} && exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_offload"))
            .args(["serve", "--listen", "127.0.0.1:0", "--mock-upstream"])
            .arg("--data-dir")
            .arg(data_dir)
            .env("OFFLOAD_LOG", "info");
        crate::support::Offload::spawn(command)
    }
}

#[tokio::test]
async fn an_event_stream_outlives_the_header_body_and_idle_timeouts() {
    let app = spawn_with(|a| {
        a.header_timeout = Some("1s".into());
        a.body_timeout = Some("1s".into());
        a.idle_timeout = Some("1s".into());
    })
    .await;
    // Nothing at all is sent for 2.5 s (no keep-alive comment either), then chunks for 1.5 s more.
    let created =
        app.stream(json!({"messages": user("hi"), "mock": {"words": 5, "ttft_ms": 2500, "delay_ms": 300}})).await;
    let started = Instant::now();
    let events = app.events(&endpoint(&created, "stream_events_url"), &[]).await;
    assert!(started.elapsed() >= Duration::from_secs(3), "{:?}", started.elapsed());
    assert_eq!(events.last().unwrap().data, "[DONE]");
    assert_eq!(content_of(&events).split_whitespace().count(), 5, "{events:?}");
}

#[tokio::test]
async fn every_error_a_framework_would_answer_in_text_is_json() {
    let app = spawn_app().await;
    let created = app.stream(json!({"messages": user("hi")})).await;
    let status_url = endpoint(&created, "status_url");
    let events_url = endpoint(&created, "stream_events_url");
    app.wait_final(&status_url, None).await;
    let status_path = status_url.trim_start_matches(&app.base).to_owned();
    let cases: Vec<(&str, reqwest::RequestBuilder)> = vec![
        ("repeated stream_token", app.client.get(format!("{events_url}?stream_token=a&stream_token=b"))),
        ("repeated last_event_id", app.client.get(format!("{events_url}?last_event_id=1&last_event_id=2"))),
        ("query not UTF-8", app.client.get(format!("{events_url}?stream_token=%ff"))),
        ("path not UTF-8", app.client.get(app.url("/1/r/pub/%ff/x.json"))),
        ("path not UTF-8 on a status URL", app.client.get(app.url(&status_path.replace(".json", "%ff.json")))),
        ("DELETE path not UTF-8", app.client.delete(app.url("/2/r/pub/%ff"))),
        ("unknown path", app.client.get(app.url("/nothing/here"))),
        ("unknown path not UTF-8", app.client.get(app.url("/%ff"))),
        ("wrong method on create", app.client.get(app.url("/v1/async-chatgpt"))),
        ("wrong method on a request", app.client.put(&status_url)),
        ("create not JSON", app.client.post(app.url("/v1/async-chatgpt")).body("hello")),
        (
            "create with broken JSON",
            app.client.post(app.url("/v1/async-chatgpt")).header("content-type", "application/json").body("{"),
        ),
    ];
    for (what, request) in cases {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        assert!((400..500).contains(&status), "{what}: {status}");
        let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
        let body = response.text().await.unwrap();
        assert_json_error(status, &content_type.unwrap_or_default(), &body, what);
    }
}

#[tokio::test]
async fn repeated_stream_token_is_json_400_naming_it() {
    let app = spawn_app().await;
    let created = app.stream(json!({"messages": user("hi"), "access": "private"})).await;
    let url = format!("{}?stream_token=a&stream_token=b", endpoint(&created, "stream_events_url"));
    let response = app.get(&url, None).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "invalid_query", "{error}");
    assert!(error["error"]["message"].as_str().unwrap().contains("stream_token"), "{error}");
}

#[tokio::test]
async fn an_upstream_key_that_is_not_text_is_400_naming_the_header() {
    let app = spawn_with(|a| a.upstream_key = Some("sk-server-side".into())).await;
    let response = app
        .client
        .post(app.url("/v1/async-chatgpt"))
        .header("X-OpenAI-API-Key", reqwest::header::HeaderValue::from_bytes(b"sk-\xff\xfe").unwrap())
        .json(&json!({"messages": user("hi")}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400, "the server-side key must not be used instead");
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["param"], "X-OpenAI-API-Key", "{error}");
    assert_eq!(app.total_requests(), 0);
    assert!(app.mock_requests().await.is_empty());
}

#[tokio::test]
async fn a_service_key_header_that_is_not_text_is_401_naming_the_header() {
    let app = spawn_app().await;
    let key = create_key(&app);
    for header in ["X-API-Key", "X-RapidAPI-Key", "Authorization"] {
        let response = app
            .client
            .post(app.url("/v1/async-chatgpt"))
            .header(header, reqwest::header::HeaderValue::from_bytes(b"ofk_\xff").unwrap())
            .json(&json!({"messages": user("hi")}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{header}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["param"], header, "{error}");
        assert!(error["error"]["message"].as_str().unwrap().contains(header), "{error}");
    }
    // A key that is text still works.
    let response = app
        .client
        .post(app.url("/v1/async-chatgpt"))
        .header("X-API-Key", key)
        .json(&json!({"messages": user("hi")}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_public_listener_without_service_keys_refuses_to_start_unless_allow_open() {
    use offload::settings::{ServeArgs, Settings};
    use offload::startup::Application;
    let data = tempfile::tempdir().unwrap();
    let args = |allow_open: Option<bool>| ServeArgs {
        listen: Some("0.0.0.0:0".parse().unwrap()),
        data_dir: Some(data.path().to_path_buf()),
        mock_upstream: Some(true),
        allow_open,
        ..ServeArgs::default()
    };
    let refused =
        Application::build(Settings::resolve(args(None)).unwrap()).await.err().unwrap_or_else(|| panic!("must refuse"));
    let message = refused.to_string();
    assert!(message.contains("--allow-open") && message.contains("offload keys create"), "{message}");
    assert!(Application::build(Settings::resolve(args(Some(true))).unwrap()).await.is_ok());
    // With a key in the store it starts without being told.
    keys_cli(data.path(), &["create", "--name", "site"]);
    assert!(Application::build(Settings::resolve(args(None)).unwrap()).await.is_ok());
    // A loopback listener stays open for development.
    let local = ServeArgs { listen: Some("127.0.0.1:0".parse().unwrap()), ..args(None) };
    let fresh = tempfile::tempdir().unwrap();
    assert!(
        Application::build(
            Settings::resolve(ServeArgs { data_dir: Some(fresh.path().to_path_buf()), ..local }).unwrap()
        )
        .await
        .is_ok()
    );
}

#[tokio::test]
async fn revoking_the_last_key_of_a_public_server_closes_it_instead_of_opening_it() {
    let data = tempfile::tempdir().unwrap();
    let key = keys_cli(data.path(), &["create", "--name", "only"]).lines().last().unwrap().trim().to_owned();
    let dir = data.path().to_path_buf();
    let app = spawn_with(|a| {
        a.listen = Some("0.0.0.0:0".parse().unwrap());
        a.data_dir = Some(dir);
    })
    .await;
    let body = json!({"messages": user("hi")});
    let with_key = app.client.post(app.url("/v1/async-chatgpt")).header("X-API-Key", &key).json(&body).send().await;
    assert_eq!(with_key.unwrap().status(), 200);
    keys_cli(data.path(), &["revoke", "only"]);
    let response = app.create("async-chatgpt", &body).await;
    assert_eq!(response.status(), 503);
    let error: Value = response.json().await.unwrap();
    assert!(error["error"]["message"].as_str().unwrap().contains("offload keys create"), "{error}");
}

#[tokio::test]
async fn http2_with_prior_knowledge_is_served_with_json_errors() {
    let app = spawn_app().await;
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let health = h2.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.version(), reqwest::Version::HTTP_2);
    assert_eq!(health.status(), 200);
    let created: Value = h2
        .post(app.url("/v1/async-chatgpt"))
        .json(&json!({"messages": user("hi")}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(created["status"], "success", "{created}");
    let missing = h2.get(app.url("/1/r/pub/%ff")).send().await.unwrap();
    assert_eq!(missing.status(), 400);
    assert_eq!(missing.json::<Value>().await.unwrap()["error"]["code"], "invalid_url");
}
