//! Hostile upstreams (issue 16): redirects to internal addresses, one huge event in small pieces, a line that
//! never ends, a reply far larger than any chat completion, a timeout in the middle of an event. Each upstream is
//! a small server on loopback that answers exactly as scripted; the server under test is the real one.

use crate::helpers::*;
use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// A call the hostile upstream received.
#[derive(Clone, Debug)]
struct Call {
    path: String,
}

/// A scripted upstream on loopback: every call is recorded and answered by `answer(path, addr)`.
struct Hostile {
    addr: std::net::SocketAddr,
    calls: Arc<parking_lot::Mutex<Vec<Call>>>,
    _task: tokio::task::JoinHandle<()>,
}

impl Hostile {
    async fn start(answer: impl Fn(&str, std::net::SocketAddr) -> Response + Clone + Send + Sync + 'static) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls: Arc<parking_lot::Mutex<Vec<Call>>> = Arc::default();
        let recorded = calls.clone();
        let app = axum::Router::new().fallback(move |uri: Uri, _headers: HeaderMap, _body: Bytes| {
            let recorded = recorded.clone();
            let answer = answer.clone();
            async move {
                recorded.lock().push(Call { path: uri.path().to_owned() });
                answer(uri.path(), addr)
            }
        });
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr, calls, _task: task }
    }

    fn api_base(&self) -> url::Url {
        format!("http://{}/v1", self.addr).parse().unwrap()
    }

    fn calls_to(&self, path: &str) -> Vec<Call> {
        self.calls.lock().iter().filter(|c| c.path == path).cloned().collect()
    }
}

/// A response whose body is `pieces`, sent one by one; when `hold` the connection then stays open, silent.
fn pieces(content_type: &str, pieces: Vec<Bytes>, hold: bool) -> Response {
    let sent = futures_util::stream::iter(pieces.into_iter().map(Ok::<_, std::io::Error>));
    let body =
        if hold { Body::from_stream(sent.chain(futures_util::stream::pending())) } else { Body::from_stream(sent) };
    Response::builder().header("content-type", content_type).body(body).unwrap()
}

/// `bytes` cut into pieces of `size`.
fn cut(bytes: &[u8], size: usize) -> Vec<Bytes> {
    bytes.chunks(size).map(Bytes::copy_from_slice).collect()
}

/// A chat.completion.chunk carrying `content`, as one SSE event.
fn chunk_event(content: &str) -> String {
    let chunk = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]});
    format!("data: {chunk}\n\n")
}

fn completion(content: &str) -> Value {
    json!({"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]})
}

async fn spawn_against(upstream: &Hostile, adjust: impl FnOnce(&mut offload::settings::ServeArgs)) -> TestApp {
    let base = upstream.api_base();
    spawn_with(move |a| {
        a.upstream_url = Some(base);
        adjust(a);
    })
    .await
}

/// `.raw` of a request (named by its status document): its headers and every byte of its body.
async fn raw_of(app: &TestApp, doc: &Value) -> (reqwest::header::HeaderMap, Vec<u8>) {
    let response = app.get(&endpoint(doc, "response_raw_url"), None).await;
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    (headers, response.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn an_upstream_redirect_is_an_upstream_error_and_never_followed() {
    for status in [301u16, 302, 303, 307, 308] {
        let upstream = Hostile::start(move |path, addr| {
            if path == "/internal" {
                let body = serde_json::to_vec(&completion("from the internal address")).unwrap();
                return pieces("application/json", vec![body.into()], false);
            }
            Response::builder()
                .status(status)
                .header("location", format!("http://{addr}/internal"))
                .body(Body::empty())
                .unwrap()
        })
        .await;
        let app = spawn_against(&upstream, |_| {}).await;
        for endpoint_name in ["async-chatgpt", "stream-chatgpt"] {
            let created = app.create_ok(endpoint_name, &json!({"messages": user("hi")})).await;
            let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
            assert_eq!(doc["status"], "error", "{status} on {endpoint_name}: {doc}");
            assert_eq!(doc["error"]["code"], "upstream_error", "{doc}");
            assert!(doc["error"]["message"].as_str().unwrap().contains("redirect"), "{doc}");
            assert_eq!(doc["response"]["status_code"], status, "{doc}");
            assert!(doc["response"]["headers"]["location"].as_str().unwrap().ends_with("/internal"), "{doc}");
        }
        assert!(upstream.calls_to("/internal").is_empty(), "{status}: the redirect was followed");
        assert_eq!(upstream.calls_to("/v1/chat/completions").len(), 2, "a redirect is not retried either");
    }
}

#[tokio::test]
async fn get_v1_models_does_not_follow_a_redirect() {
    let upstream = Hostile::start(|path, addr| {
        if path == "/internal" {
            return pieces("application/json", vec![Bytes::from_static(b"{\"object\":\"list\",\"data\":[]}")], false);
        }
        Response::builder()
            .status(StatusCode::FOUND)
            .header("location", format!("http://{addr}/internal"))
            .body(Body::empty())
            .unwrap()
    })
    .await;
    let app = spawn_against(&upstream, |_| {}).await;
    let response = app.get(&app.url("/v1/models"), None).await;
    assert_eq!(response.status(), 502);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "upstream_error", "{error}");
    assert!(error["error"]["message"].as_str().unwrap().contains("redirect"), "{error}");
    assert_eq!(upstream.calls_to("/v1/models").len(), 1);
    assert!(upstream.calls_to("/internal").is_empty(), "the redirect was followed");
}

#[tokio::test]
async fn one_8_mb_event_in_4_kib_pieces_is_parsed_whole() {
    let big = "x".repeat(8_000_000);
    let body = [chunk_event("a"), chunk_event(&big), chunk_event("b"), "data: [DONE]\n\n".into()].concat();
    let upstream = Hostile::start(move |_, _| pieces("text/event-stream", cut(body.as_bytes(), 4096), false)).await;
    let app = spawn_against(&upstream, |_| {}).await;
    let created = app.stream(json!({"messages": user("hi"), "timeout": 60})).await;
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    assert_eq!(doc["status"], "done", "{}", &doc.to_string()[..500.min(doc.to_string().len())]);
    let content = doc["response"]["body"]["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(content.len(), 8_000_002);
    assert!(content.starts_with("ax") && content.ends_with("xb"));
}

#[tokio::test]
async fn an_event_over_the_bound_ends_as_event_too_large_keeping_the_events_before_it() {
    // Two events, then one line that never ends, and the connection held open.
    let mut body = [chunk_event("one "), chunk_event("two")].concat().into_bytes();
    body.extend_from_slice(b"data: {\"id\":\"");
    body.extend(std::iter::repeat_n(b'x', 4 * 1024 * 1024));
    let upstream = Hostile::start(move |_, _| pieces("text/event-stream", cut(&body, 4096), true)).await;
    let app = spawn_against(&upstream, |a| a.max_upstream_event_bytes = Some(1024 * 1024)).await;
    let created = app.stream(json!({"messages": user("hi"), "timeout": 60})).await;
    let started = std::time::Instant::now();
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    assert!(started.elapsed() < Duration::from_secs(15), "ended only after {:?}", started.elapsed());
    assert_eq!(doc["status"], "error");
    assert_eq!(doc["error"]["code"], "event_too_large", "{doc}");
    assert!(doc["error"]["message"].as_str().unwrap().contains("1048576"), "{doc}");
    assert_eq!(doc["response"]["body"]["choices"][0]["message"]["content"], "one two");
    let events = app.events(&endpoint(&created, "stream_events_url"), &[]).await;
    assert_eq!(content_of(&events), "one two");
    assert_eq!(events[events.len() - 2].event, "error");
}

#[tokio::test]
async fn a_reply_over_the_bound_ends_as_reply_too_large_keeping_what_arrived_within_it() {
    const BOUND: usize = 1024 * 1024;
    let reply = serde_json::to_vec(&completion(&"y".repeat(30_000_000))).unwrap();
    let sent = reply.clone();
    let upstream = Hostile::start(move |_, _| pieces("application/json", cut(&sent, 64 * 1024), false)).await;
    let app = spawn_against(&upstream, |a| a.max_upstream_reply_bytes = Some(BOUND)).await;
    let created = app.create_ok("async-chatgpt", &json!({"messages": user("hi"), "timeout": 60})).await;
    let status_url = endpoint(&created, "status_url");
    let doc = app.wait_final(&status_url, None).await;
    assert_eq!(doc["status"], "error");
    assert_eq!(doc["error"]["code"], "reply_too_large", "{doc}");
    assert!(doc["error"]["message"].as_str().unwrap().contains(&BOUND.to_string()), "{doc}");
    assert_eq!(doc["response"]["status_code"], 200);
    let document = app.get(&status_url, None).await.bytes().await.unwrap();
    assert!(document.len() < 64 * 1024, "the status document has {} bytes", document.len());
    let (_, raw) = raw_of(&app, &doc).await;
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(raw.len() - head_end, BOUND, "what arrived within the bound is kept, and nothing more");
    assert_eq!(&raw[head_end..], &reply[..BOUND]);
}

#[tokio::test]
async fn a_30_mb_reply_is_served_as_raw_in_a_stream_byte_for_byte() {
    // One async reply of 30 MB, and one event stream of 30 MB in 30 000 events.
    let reply = serde_json::to_vec(&completion(&"z".repeat(30_000_000))).unwrap();
    let mut events = String::new();
    for i in 0..30_000 {
        events.push_str(&chunk_event(&format!("{i:0>900}")));
    }
    events.push_str("data: [DONE]\n\n");
    let (sent_reply, sent_events) = (reply.clone(), events.clone());
    let upstream = Hostile::start(move |_, _| {
        // The two calls are told apart by order: the async one is created first and finishes first.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        match CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
            0 => pieces("application/json", cut(&sent_reply, 64 * 1024), false),
            _ => pieces("text/event-stream", cut(sent_events.as_bytes(), 16 * 1024), false),
        }
    })
    .await;
    let app = spawn_against(&upstream, |_| {}).await;
    for (endpoint_name, body) in [("async-chatgpt", reply), ("stream-chatgpt", events.into_bytes())] {
        let created = app.create_ok(endpoint_name, &json!({"messages": user("hi"), "timeout": 60})).await;
        let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
        assert_eq!(doc["status"], "done", "{endpoint_name}: {}", doc["error"]);
        let (headers, raw) = raw_of(&app, &doc).await;
        assert!(
            headers.get("content-length").is_none(),
            "{endpoint_name}: `.raw` is streamed in pieces, not built whole first: {headers:?}"
        );
        assert!(raw.starts_with(b"HTTP/1.1 200 OK\r\n"), "{endpoint_name}");
        let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(raw.len() - head_end, body.len(), "{endpoint_name}");
        assert!(raw[head_end..] == body[..], "{endpoint_name}: `.raw` differs from what the upstream sent");
    }
}

#[tokio::test]
async fn a_timeout_in_the_middle_of_an_event_keeps_every_byte_that_arrived_in_raw() {
    let mut body = chunk_event("first").into_bytes();
    body.extend_from_slice(b"data: {\"choices\":[{\"delta\":{\"content\":\"");
    body.extend(std::iter::repeat_n(b'w', 4 * 1024 * 1024));
    let sent = body.clone();
    let upstream = Hostile::start(move |_, _| pieces("text/event-stream", cut(&sent, 4096), true)).await;
    let app = spawn_against(&upstream, |_| {}).await;
    let created = app.stream(json!({"messages": user("hi"), "timeout": 3})).await;
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    assert_eq!(doc["status"], "error");
    assert_eq!(doc["error"]["code"], "timeout", "{doc}");
    assert_eq!(doc["response"]["body"]["choices"][0]["message"]["content"], "first");
    let (_, raw) = raw_of(&app, &doc).await;
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(raw.len() - head_end, body.len(), "`.raw` holds {} of the {} bytes received", raw.len(), body.len());
    assert!(raw[head_end..] == body[..]);
}
