//! `timeout` and `connect_timeout`.

use crate::helpers::*;
use serde_json::json;

#[tokio::test]
async fn a_stalled_upstream_ends_as_timeout_within_a_second_of_the_limit_keeping_its_text() {
    let app = spawn_app().await;
    let created =
        app.stream(json!({"messages": user("hi"), "timeout": 1.5, "mock": {"words": 10, "stall_after": 4}})).await;
    let started = std::time::Instant::now();
    let events = app.events(&endpoint(&created, "stream_events_url"), &[]).await;
    let elapsed = started.elapsed().as_secs_f64();
    assert!((1.4..2.5).contains(&elapsed), "ended after {elapsed} s");
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    assert_eq!(doc["status"], "error");
    assert_eq!(doc["error"]["code"], "timeout");
    assert_eq!(doc["options"]["timeout"], 1.5);
    assert_eq!(doc["response"]["body"]["choices"][0]["message"]["content"], content_of(&events).as_str());
    assert!(!content_of(&events).is_empty());
    assert_eq!(events[events.len() - 2].event, "error");
}

#[tokio::test]
async fn an_async_upstream_that_never_answers_ends_as_timeout() {
    let app = spawn_app().await;
    let created = app
        .create_ok("async-chatgpt", &json!({"messages": user("hi"), "timeout": 1, "mock": {"stall_headers": true}}))
        .await;
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    assert_eq!(doc["error"]["code"], "timeout");
    let took = doc["request"]["total_time"].as_f64().unwrap();
    assert!((0.9..2.0).contains(&took), "{took}");
}

#[tokio::test]
async fn an_upstream_that_never_accepts_the_connection_ends_as_connect_timeout() {
    // A listening socket whose accept queue is full: new connections are never accepted.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(200)) {
            Ok(s) => fillers.push(s),
            Err(_) => break,
        }
    }
    let app = spawn_with(|a| a.upstream_url = Some(format!("http://{addr}/v1").parse().unwrap())).await;
    let created = app.stream(json!({"messages": user("hi"), "connect_timeout": 1})).await;
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    assert_eq!(doc["status"], "error");
    assert_eq!(doc["error"]["code"], "connect_timeout", "{doc}");
    assert!(doc.get("response").is_none());
    drop(fillers);
}

#[tokio::test]
async fn an_upstream_that_refuses_the_connection_is_unreachable() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let app = spawn_with(|a| a.upstream_url = Some(format!("http://{addr}/v1").parse().unwrap())).await;
    let created = app.create_ok("async-chatgpt", &json!({"messages": user("hi")})).await;
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    assert_eq!(doc["error"]["code"], "upstream_unreachable");
}
