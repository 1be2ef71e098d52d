//! Section 2: endpoint URLs, private access, CORS.

use crate::helpers::*;
use serde_json::{Value, json};

async fn private_request(app: &TestApp) -> (Value, String, String) {
    let created = app.stream(json!({"messages": user("secret"), "access": "private"})).await;
    let auth = &created["authorization"];
    assert_eq!(auth["access"], "private");
    let bearer = auth["bearer_token"].as_str().unwrap().to_owned();
    let arg = auth["stream_url_arg"].as_str().unwrap().to_owned();
    let stream_token = arg.strip_prefix("stream_token=").unwrap().to_owned();
    for token in [&bearer, &stream_token] {
        assert!(token.len() >= 32 && token.chars().all(|c| c.is_ascii_hexdigit()), "{token}");
    }
    assert_ne!(bearer, stream_token);
    assert!(endpoint(&created, "status_url").contains("/1/r/priv/"));
    (created, bearer, stream_token)
}

#[tokio::test]
async fn private_endpoints_need_the_bearer_token() {
    let app = spawn_app().await;
    let (created, bearer, _) = private_request(&app).await;
    let status_url = endpoint(&created, "status_url");
    let doc = app.wait_final(&status_url, Some(&bearer)).await;
    assert_eq!(doc["authorization"], json!({"access": "private"}), "tokens never appear in the document");
    let raw = status_url.replace(".json", ".raw");
    let events = endpoint(&created, "stream_events_url");
    for url in [&status_url, &raw, &events, &endpoint(&created, "stop_url")] {
        for token in [None, Some("0123456789abcdef0123456789abcdef")] {
            let response = app.get(url, token).await;
            assert_eq!(response.status(), 401, "{url} with {token:?}");
            assert!(response.headers().contains_key("www-authenticate"));
            let error: Value = response.json().await.unwrap();
            assert_eq!(error["status"], "error");
        }
    }
    assert_eq!(app.get(&raw, Some(&bearer)).await.status(), 200);
    assert_eq!(app.get(&events, Some(&bearer)).await.status(), 200);
    let response = app.client.delete(&status_url).send().await.unwrap();
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn private_stream_accepts_stream_token_only_on_the_stream() {
    let app = spawn_app().await;
    let (created, bearer, stream_token) = private_request(&app).await;
    let status_url = endpoint(&created, "status_url");
    app.wait_final(&status_url, Some(&bearer)).await;
    let events_url = format!("{}?stream_token={stream_token}", endpoint(&created, "stream_events_url"));
    let events = app.events(&events_url, &[]).await;
    assert_eq!(events.last().unwrap().data, "[DONE]");
    assert!(!content_of(&events).is_empty());
    for url in [
        format!("{status_url}?stream_token={stream_token}"),
        status_url.replace(".json", ".raw?stream_token=") + &stream_token,
    ] {
        assert_eq!(app.get(&url, None).await.status(), 401, "{url}");
    }
    let wrong = format!("{}?stream_token={bearer}", endpoint(&created, "stream_events_url"));
    assert_eq!(app.get(&wrong, None).await.status(), 401, "the bearer token is not a stream token");
    // The stream token is not a bearer token either.
    assert_eq!(app.get(&status_url, Some(&stream_token)).await.status(), 401);
}

#[tokio::test]
async fn a_url_whose_kind_access_or_date_does_not_match_is_404() {
    let app = spawn_app().await;
    let created = app.stream(json!({"messages": user("hi")})).await;
    let status_url = endpoint(&created, "status_url");
    app.wait_final(&status_url, None).await;
    let path = status_url.trim_start_matches(&app.base).to_owned();
    let parts: Vec<&str> = path.split('/').collect();
    let mut wrong_second = parts.clone();
    let second = (parts[9].parse::<u32>().unwrap() + 1) % 60;
    let second = format!("{second:02}");
    wrong_second[9] = &second;
    let wrong = [
        path.replacen("/1/r/", "/2/r/", 1),
        path.replacen("/pub/", "/priv/", 1),
        wrong_second.join("/"),
        path.replace(&id_of(&status_url), "00000000-0000-4000-8000-000000000000"),
        path.replace(".json", ".xml"),
    ];
    for path in wrong {
        let response = app.get(&app.url(&path), None).await;
        assert_eq!(response.status(), 404, "{path}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "not_found");
    }
}

#[tokio::test]
async fn browsers_get_cors_on_every_endpoint_including_the_authorization_preflight() {
    let app = spawn_app().await;
    let created = app.stream(json!({"messages": user("hi"), "access": "private"})).await;
    let status_url = endpoint(&created, "status_url");
    let preflight = app
        .client
        .request(reqwest::Method::OPTIONS, &status_url)
        .header("Origin", "https://app.example")
        .header("Access-Control-Request-Method", "GET")
        .header("Access-Control-Request-Headers", "authorization")
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success());
    let h = preflight.headers();
    assert_eq!(h["access-control-allow-origin"], "*");
    assert!(h["access-control-allow-headers"].to_str().unwrap().to_ascii_lowercase().contains("authorization"));
    assert!(h["access-control-allow-methods"].to_str().is_ok());
    for url in [status_url.clone(), endpoint(&created, "stream_events_url"), endpoint(&created, "stop_url")] {
        let response = app.client.get(&url).header("Origin", "https://app.example").send().await.unwrap();
        assert_eq!(response.headers()["access-control-allow-origin"], "*", "{url}");
    }
}
