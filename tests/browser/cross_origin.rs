//! An open server (no service keys) and a page on another site, in a real browser: the page cannot create
//! requests on it (a JSON `fetch` with its preflight, a `text/plain` simple POST, the OpenAI entry, `GET /v1/models`),
//! while the URLs of a request it was given keep answering it (status, raw, `EventSource`, stop by XHR).

use crate::helpers::*;
use serde_json::json;
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

pub async fn a_page_on_another_origin_cannot_create_on_an_open_server_but_uses_the_request_urls_it_is_given() {
    let browser = crate::chromium().unwrap();
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

    let report = crate::page_report(&browser, &site_url, &mut report_rx).await;

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
