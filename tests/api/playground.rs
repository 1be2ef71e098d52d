//! The playground at `GET /`: content negotiation, the page's assets and policy. The page itself, driven through
//! its own UI in headless Chromium, is tested in `tests/browser/playground.rs`.

use crate::helpers::*;
use serde_json::Value;

const BROWSER_ACCEPT: &str = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8";

async fn get_accepting(app: &TestApp, path: &str, accept: Option<&str>) -> reqwest::Response {
    let mut request = app.client.get(app.url(path));
    if let Some(accept) = accept {
        request = request.header("Accept", accept);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn get_root_from_a_browser_is_the_playground_page_under_a_policy_of_this_server_only() {
    let app = spawn_app().await;
    let page = get_accepting(&app, "/", Some(BROWSER_ACCEPT)).await;
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    assert_eq!(page.headers()["vary"], "Accept");
    let policy = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
    for directive in ["default-src 'none'", "script-src 'self';", "style-src 'self';", "frame-ancestors 'none'"] {
        assert!(policy.contains(directive), "{directive} missing from {policy}");
    }
    assert!(policy.contains(&format!("connect-src 'self' {};", app.base)), "{policy}");
    assert!(!policy.contains("unsafe"), "{policy}");
    let html = page.text().await.unwrap();
    assert!(html.contains("data-key-required=\"false\""), "an open server asks for no key");
    // Nothing is fetched from elsewhere, and there is no inline script for the policy to block.
    assert!(!html.contains("://"), "the page names another origin");
    assert_eq!(html.matches("<script").count(), html.matches("<script src=\"playground/app.js\"").count());
    let inline_handler = html.match_indices(" on").any(|(i, _)| {
        let name: String = html[i + 3..].chars().take_while(char::is_ascii_alphabetic).collect();
        !name.is_empty() && html[i + 3 + name.len()..].starts_with('=')
    });
    assert!(!inline_handler, "an inline event handler");

    for (path, content_type) in
        [("/playground/app.js", "text/javascript; charset=utf-8"), ("/playground/style.css", "text/css; charset=utf-8")]
    {
        let asset = get_accepting(&app, path, Some("*/*")).await;
        assert_eq!(asset.status(), 200, "{path}");
        assert_eq!(asset.headers()["content-type"], content_type, "{path}");
        assert_eq!(asset.headers()["x-content-type-options"], "nosniff", "{path}");
        let text = asset.text().await.unwrap();
        assert!(!text.contains("://"), "{path} names another origin");
    }
}

#[tokio::test]
async fn get_root_for_api_clients_stays_the_json_description() {
    let app = spawn_app().await;
    for accept in [None, Some("*/*"), Some("application/json"), Some("application/json, text/html;q=0.5")] {
        let response = get_accepting(&app, "/", accept).await;
        assert_eq!(response.status(), 200, "{accept:?}");
        assert_eq!(response.headers()["content-type"], "application/json", "{accept:?}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["service"], "offload", "{accept:?}");
        assert_eq!(body["endpoints"]["stream"], app.url("/v1/stream-chatgpt"), "{accept:?}");
    }
}

#[tokio::test]
async fn the_page_asks_for_a_service_key_when_the_server_requires_one() {
    let app = spawn_app().await;
    keys_cli(app.data_dir.path(), &["create", "--name", "play"]);
    let html = get_accepting(&app, "/", Some(BROWSER_ACCEPT)).await.text().await.unwrap();
    assert!(html.contains("data-key-required=\"true\""));
}
