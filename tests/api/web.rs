//! An open server (no service keys) and the web pages its operator visits: another site's page cannot create
//! requests on it (checked here by the headers a browser sends; `tests/browser/cross_origin.rs` does it with a real
//! browser), nor reach it under a DNS name of its own, while the URLs of a request keep answering pages of any
//! origin.

use crate::helpers::*;
use crate::keys::create_key;
use serde_json::{Value, json};

/// A create as a browser would send it from a page at `origin`, with `extra` headers.
async fn create_from(app: &TestApp, origin: Option<&str>, extra: &[(&str, &str)]) -> reqwest::Response {
    let mut request = app
        .client
        .post(app.url("/v1/async-chatgpt"))
        .header("Content-Type", "text/plain;charset=UTF-8")
        .body(json!({"messages": user("hi")}).to_string());
    if let Some(origin) = origin {
        request = request.header("Origin", origin);
    }
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn an_open_server_refuses_a_simple_cross_origin_create_by_its_origin_naming_cors_origins() {
    let app = spawn_with(|a| a.cors_origins = Some(vec!["https://app.example.com".into()])).await;
    for (origin, extra) in [
        (Some("https://evil.example"), vec![]),
        (Some("null"), vec![]),
        (None, vec![("Sec-Fetch-Site", "cross-site")]),
        (Some("https://evil.example"), vec![("Sec-Fetch-Site", "same-origin")]),
    ] {
        let response = create_from(&app, origin, &extra).await;
        assert_eq!(response.status(), 403, "{origin:?} {extra:?}");
        assert!(!response.headers().contains_key("access-control-allow-origin"));
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["status"], "error");
        assert_eq!(body["error"]["code"], "cross_origin");
        assert_eq!(body["error"]["param"], "Origin");
        assert!(body["error"]["message"].as_str().unwrap().contains("--cors-origins"), "{body}");
    }
    // Past the origin check, a text/plain body is what it always was: not JSON (415).
    assert_eq!(create_from(&app, Some("https://app.example.com"), &[]).await.status(), 415);
    assert_eq!(create_from(&app, Some(&app.base), &[("Sec-Fetch-Site", "same-origin")]).await.status(), 415);
    assert_eq!(create_from(&app, None, &[]).await.status(), 415);
    // A listed origin creates, and its page reads the answer.
    let listed = app
        .client
        .post(app.url("/v1/async-chatgpt"))
        .header("Origin", "https://app.example.com")
        .json(&json!({"messages": user("hi")}))
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);
    assert_eq!(listed.headers()["access-control-allow-origin"], "*");
}

#[tokio::test]
async fn an_open_server_answers_only_its_own_names_and_those_of_allowed_hosts() {
    let app = spawn_with(|a| a.allowed_hosts = Some(vec!["offload.lan".into()])).await;
    let port = app.base.rsplit(':').next().unwrap().to_owned();
    let health = |host: String| app.client.get(app.url("/healthz")).header("Host", host).send();
    for host in ["localhost", "127.0.0.1", "[::1]", "offload.lan"] {
        assert_eq!(health(format!("{host}:{port}")).await.unwrap().status(), 200, "{host}");
    }
    // A DNS name of someone else's that resolves to this server (rebinding): no answer, on any route.
    for path in ["/healthz", "/v1/models", "/"] {
        let response = app.client.get(app.url(path)).header("Host", format!("rebind.attacker.example:{port}")).send();
        let response = response.await.unwrap();
        assert_eq!(response.status(), 421, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unknown_host");
        assert_eq!(body["error"]["param"], "Host");
        assert!(body["error"]["message"].as_str().unwrap().contains("--allowed-hosts"), "{body}");
    }
    let post = app
        .client
        .post(app.url("/v1/stream-chatgpt"))
        .header("Host", "rebind.attacker.example")
        .json(&json!({"messages": user("hi")}))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 421);

    // With a service key, a create needs the key whatever the page: names and origins are not checked.
    let key = create_key(&app, "site", &[]);
    assert_eq!(health(format!("proxy.internal:{port}")).await.unwrap().status(), 200);
    let keyed = app
        .client
        .post(app.url("/v1/async-chatgpt"))
        .header("Origin", "https://elsewhere.example")
        .bearer_auth(&key)
        .json(&json!({"messages": user("hi")}))
        .send()
        .await
        .unwrap();
    assert_eq!(keyed.status(), 200);
}
