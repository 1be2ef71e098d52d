//! An open server (no service keys) and the web pages its operator visits: another site's page cannot create
//! requests on it (a JSON `fetch` with its preflight, a `text/plain` simple POST, `GET /v1/models`), nor reach it
//! under a DNS name of its own, while the URLs of a request keep answering pages of any origin.

use crate::browser::{HEADLESS, chromium};
use crate::helpers::*;
use crate::keys::{create_key, settle};
use serde_json::{Value, json};
use std::sync::atomic::Ordering;
use std::time::Duration;

const PAGE: &str = r#"<!doctype html><html><body><script>
const OFFLOAD = "__OFFLOAD__";
const GIVEN = __GIVEN__;
const report = (r) => fetch("/report", {method: "POST", body: JSON.stringify(r)});
const outcome = (p) => p.then((r) => "answered " + r.status, (e) => "failed: " + e.name);
const body = JSON.stringify({messages: [{role: "user", content: "hi"}]});

function follow(url) {
  return new Promise((resolve) => {
    const es = new EventSource(url);
    const seen = {chunks: 0, done: false};
    es.onmessage = (e) => {
      if (e.data === "[DONE]") { seen.done = true; es.close(); resolve(seen); return; }
      seen.chunks += 1;
    };
    setTimeout(() => { es.close(); resolve(seen); }, 15000);
  });
}

function xhrStop(url, token) {
  return new Promise((resolve) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url);
    xhr.setRequestHeader("Authorization", "Bearer " + token);
    xhr.onload = () => resolve(xhr.status);
    xhr.onerror = () => resolve("failed");
    xhr.send();
  });
}

async function main() {
  const r = {};
  // Creates: JSON (preflighted), a JSON body sent as text/plain (no preflight), and the OpenAI entry.
  r.json_create = await outcome(fetch(OFFLOAD + "/v1/stream-chatgpt",
    {method: "POST", headers: {"Content-Type": "application/json"}, body}));
  r.plain_create = await outcome(fetch(OFFLOAD + "/v1/async-chatgpt",
    {method: "POST", headers: {"Content-Type": "text/plain"}, body}));
  r.no_cors_create = await outcome(fetch(OFFLOAD + "/v1/chat/completions",
    {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"}, body}));
  r.chat_create = await outcome(fetch(OFFLOAD + "/v1/chat/completions",
    {method: "POST", headers: {"Content-Type": "application/json"}, body}));
  r.models = await outcome(fetch(OFFLOAD + "/v1/models"));

  // The URLs of a request the page was given: they answer any origin.
  const auth = {headers: {Authorization: "Bearer " + GIVEN.bearer}};
  const status = await fetch(GIVEN.status_url, auth);
  r.status = status.status;
  r.status_doc = (await status.json()).status;
  r.raw = (await fetch(GIVEN.status_url.replace(/\.json$/, ".raw"), auth)).status;
  const following = follow(GIVEN.stream_url + "?" + GIVEN.stream_arg);
  await new Promise((ok) => setTimeout(ok, 300));
  r.stop = await xhrStop(GIVEN.stop_url, GIVEN.bearer);
  r.stream = await following;
  r.stopped = (await (await fetch(GIVEN.status_url, auth)).json()).status;
  await report(r);
}
main().catch((e) => report({failure: String(e && e.stack || e)}));
</script></body></html>"#;

#[tokio::test]
async fn a_page_on_another_origin_cannot_create_on_an_open_server_but_uses_the_request_urls_it_is_given() {
    let Some(browser) = chromium() else {
        assert!(std::env::var("CI").is_err(), "CI must install chromium for the browser test");
        eprintln!("WARNING: chromium is not installed; the browser test was skipped (apt-get install chromium)");
        return;
    };
    let app = spawn_app().await;
    // A request the page is given (as an OffloadGPT client hands its URLs to a browser): private and long.
    let created =
        app.stream(json!({"messages": user("hi"), "access": "private", "mock": {"words": 400, "delay_ms": 20}})).await;
    let bearer = created["authorization"]["bearer_token"].as_str().unwrap().to_owned();
    let given = json!({
        "status_url": created["endpoints"]["status_url"],
        "stream_url": created["endpoints"]["stream_events_url"],
        "stop_url": created["endpoints"]["stop_url"],
        "stream_arg": created["authorization"]["stream_url_arg"],
        "bearer": bearer,
    });
    // Its upstream call starts just after the create is answered.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.mock.stats().requests.load(Ordering::SeqCst) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the upstream was never called");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let upstream_calls = app.mock.stats().requests.load(Ordering::SeqCst);

    let (report_tx, mut report_rx) = tokio::sync::mpsc::channel::<String>(1);
    let page = PAGE.replace("__OFFLOAD__", &app.base).replace("__GIVEN__", &given.to_string());
    let site =
        axum::Router::new().route("/", axum::routing::get(move || async move { axum::response::Html(page) })).route(
            "/report",
            axum::routing::post(move |body: String| {
                let tx = report_tx.clone();
                async move {
                    let _ = tx.send(body).await;
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let site_url = format!("http://{}/", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, site).await.unwrap() });

    let profile = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(browser)
        .args(HEADLESS)
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(&site_url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let report = tokio::time::timeout(Duration::from_secs(60), report_rx.recv()).await;
    let _ = child.kill().await;
    let report = report.unwrap_or_else(|_| panic!("the page never reported")).unwrap();
    let report: Value = serde_json::from_str(&report).unwrap();
    assert!(report.get("failure").is_none(), "{report}");

    // Refused before anything happened: the page reads nothing (no CORS headers), and no upstream call was made.
    for create in ["json_create", "plain_create", "chat_create", "models"] {
        assert_eq!(report[create], "failed: TypeError", "{create}: {report}");
    }
    // `no-cors` hides the answer from the page whatever it is; what matters is that nothing was created.
    assert_eq!(report["no_cors_create"], "answered 0", "{report}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(app.mock.stats().requests.load(Ordering::SeqCst), upstream_calls, "a create went through: {report}");

    assert_eq!(report["status"], 200, "{report}");
    assert_eq!(report["raw"], 200, "{report}");
    assert_eq!(report["stop"], 200, "{report}");
    assert_eq!(report["stream"]["done"], true, "{report}");
    assert!(report["stream"]["chunks"].as_u64().unwrap() < 400, "{report}");
    assert_eq!(report["stopped"], "stop", "{report}");
}

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
    settle().await;
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
