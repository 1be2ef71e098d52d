//! Hardening: who may read the store, which webhook addresses are refused, what the mock upstream shows,
//! `null` parameters, and an upstream stream that starts with a byte order mark.

use crate::helpers::*;
use serde_json::{Value, json};

#[cfg(unix)]
fn mode_of(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

#[cfg(unix)]
#[tokio::test]
async fn the_store_is_readable_by_its_owner_only() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("fresh").join("data");
    let app = {
        let dir = dir.clone();
        spawn_with(move |a| a.data_dir = Some(dir)).await
    };
    // A request makes sure the WAL files exist and are written to.
    let created = app.stream(json!({"messages": user("private words")})).await;
    app.wait_final(&endpoint(&created, "status_url"), None).await;

    assert_eq!(mode_of(&dir), 0o700, "the data directory");
    for file in ["offload.db", "offload.db-wal", "offload.db-shm"] {
        assert_eq!(mode_of(&dir.join(file)), 0o600, "{file}");
    }
}

#[cfg(unix)]
#[tokio::test]
async fn a_store_readable_by_others_is_tightened_at_start() {
    use std::os::unix::fs::PermissionsExt;
    // What an older offload left behind: a store with the default modes (an empty file is a new database to
    // SQLite), and WAL files wider still.
    let dir = tempfile::tempdir().unwrap();
    let loosen = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    loosen(dir.path(), 0o755);
    for (file, mode) in [("offload.db", 0o644), ("offload.db-wal", 0o666), ("offload.db-shm", 0o666)] {
        std::fs::write(dir.path().join(file), b"").unwrap();
        loosen(&dir.path().join(file), mode);
    }

    let app = spawn_with(|a| a.data_dir = Some(dir.path().to_path_buf())).await;
    assert_eq!(mode_of(dir.path()), 0o700, "the data directory");
    for file in ["offload.db", "offload.db-wal", "offload.db-shm"] {
        assert_eq!(mode_of(&dir.path().join(file)), 0o600, "{file}");
    }
    let created = app.stream(json!({"messages": user("still works")})).await;
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    assert_eq!(doc["status"], "done");
}

/// IPv6 literals that carry a loopback, private or metadata IPv4 address.
const EMBEDDED_INTERNAL: [&str; 8] = [
    "http://[::127.0.0.1]/hook",                          // IPv4-compatible
    "http://[::ffff:0:7f00:1]/hook",                      // IPv4-translated
    "http://[2002:7f00:1::]/hook",                        // 6to4
    "http://[2002:a9fe:a9fe::1]/latest/meta-data",        // 6to4, cloud metadata
    "http://[64:ff9b::a00:1]/hook",                       // NAT64, 10.0.0.1
    "http://[64:ff9b:1::7f00:1]/hook",                    // local-use NAT64
    "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/hook", // Teredo, client 127.0.0.1
    "http://[2001:0:c0a8:1:8000:63bf:f7f7:f7f7]/hook",    // Teredo, server 192.168.0.1
];

#[tokio::test]
async fn a_webhook_to_an_ipv6_address_embedding_an_internal_ipv4_is_a_400() {
    let app = spawn_app().await;
    for url in EMBEDDED_INTERNAL {
        let response = app.create("stream-chatgpt", &json!({"messages": user("hi"), "webhook_url": url})).await;
        let status = response.status();
        let error: Value = response.json().await.unwrap();
        assert_eq!(status, 400, "{url}: {error}");
        assert_eq!(error["status"], "error");
        assert_eq!(error["error"]["param"], "webhook_url", "{url}");
    }
    assert_eq!(app.total_requests(), 0, "a refused create leaves nothing behind");
}

#[tokio::test]
async fn a_webhook_to_an_ipv6_address_embedding_a_public_ipv4_is_accepted() {
    let app = spawn_app().await;
    for url in ["http://[::ffff:0:808:808]/hook", "http://[2002:808:808::1]/hook", "http://[64:ff9b::808:808]/hook"] {
        // The upstream never answers, so the request never ends and no webhook leaves this machine.
        let body = json!({"messages": user("hi"), "webhook_url": url, "mock": {"stall_headers": true}});
        let created = app.stream(body).await;
        assert_eq!(created["status"], "success", "{url}");
    }
}

#[tokio::test]
async fn the_mock_never_shows_the_authorization_it_received() {
    let app = spawn_with_mock(mock_expecting("sk-secret-caller-key"), |_| {}).await;
    let send = |key: &'static str| {
        app.client
            .post(app.url("/v1/async-chatgpt"))
            .header("X-OpenAI-API-Key", key)
            .json(&json!({"messages": user("hi")}))
            .send()
    };
    for key in ["sk-secret-caller-key", "sk-another-key"] {
        let created: Value = send(key).await.unwrap().json().await.unwrap();
        app.wait_final(&endpoint(&created, "status_url"), None).await;
    }
    let listing =
        reqwest::get(format!("http://{}/_mock/requests", app.mock.addr())).await.unwrap().text().await.unwrap();
    assert!(!listing.contains("sk-secret-caller-key") && !listing.contains("sk-another-key"), "{listing}");
    assert!(!listing.contains("Bearer"), "{listing}");
    let calls = app.mock_requests().await;
    assert_eq!(calls[0]["authorization"], true);
    assert_eq!(calls[0]["authorization_expected"], true);
    assert_eq!(calls[1]["authorization"], true);
    assert_eq!(calls[1]["authorization_expected"], false, "another key than the expected one");
}

#[tokio::test]
async fn the_mock_tells_when_no_authorization_came() {
    let app = spawn_app().await;
    let created = app.stream(json!({"messages": user("hi")})).await;
    app.wait_final(&endpoint(&created, "status_url"), None).await;
    let sent = app.mock_requests().await.pop().unwrap();
    assert_eq!(sent["authorization"], false);
    assert_eq!(sent["authorization_expected"], Value::Null, "no key was expected");
}

#[tokio::test]
async fn null_parameters_are_not_given() {
    let app = spawn_app().await;
    let created = app
        .create_ok(
            "async-chatgpt",
            &json!({
                "messages": [{"role": "user", "content": "hi", "name": null}],
                "temperature": null, "tools": null, "user": null, "seed": 3,
                "response_format": {"type": "text", "json_schema": null}
            }),
        )
        .await;
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    let sent = app.mock_requests().await.pop().unwrap();
    for name in ["temperature", "tools", "user"] {
        assert!(sent["body"].get(name).is_none(), "`{name}: null` went upstream: {}", sent["body"]);
        assert!(doc["parameters"].get(name).is_none(), "`{name}` is in parameters: {}", doc["parameters"]);
    }
    assert_eq!(sent["body"]["seed"], 3);
    assert_eq!(sent["body"]["messages"][0]["name"], Value::Null, "a nested null is passed through");
    assert_eq!(sent["body"]["response_format"], json!({"type": "text", "json_schema": null}));
    assert_eq!(doc["parameters"]["response_format"], json!({"type": "text", "json_schema": null}));
    assert!(sent["body"]["messages"][0].as_object().unwrap().contains_key("name"));
}

#[tokio::test]
async fn a_stream_starting_with_a_byte_order_mark_ends_done_and_raw_keeps_the_mark() {
    let app = spawn_app().await;
    let created = app.stream(json!({"messages": user("hi"), "mock": {"bom": true, "content": "one two"}})).await;
    let doc = app.wait_final(&endpoint(&created, "status_url"), None).await;
    assert_eq!(doc["status"], "done", "{doc}");
    assert_eq!(doc["response"]["body"]["choices"][0]["message"]["content"], "one two");
    let events = app.events(&endpoint(&created, "stream_events_url"), &[]).await;
    assert_eq!(content_of(&events), "one two");
    let raw = app.get(doc["endpoints"]["response_raw_url"].as_str().unwrap(), None).await.bytes().await.unwrap();
    let body_at = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(raw[body_at..].starts_with("\u{feff}data: {".as_bytes()), "{}", String::from_utf8_lossy(&raw));
}
