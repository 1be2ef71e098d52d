//! A real browser as the client: headless Chromium runs a page from another origin that uses `fetch` and the
//! browser's own `EventSource` against offload, as a web app written for OffloadGPT would.

use crate::helpers::*;

const PAGE: &str = r#"<!doctype html><html><body><script>
const OFFLOAD = "__OFFLOAD__";
const report = (r) => fetch("/report", {method: "POST", body: JSON.stringify(r)});

function follow(url, closeOnDone) {
  return new Promise((resolve) => {
    const es = new EventSource(url);
    const seen = {text: "", ids: [], done: false, named: []};
    es.addEventListener("stop", (e) => seen.named.push(["stop", JSON.parse(e.data).status]));
    es.onmessage = (e) => {
      if (e.data === "[DONE]") {
        seen.done = true;
        if (closeOnDone) { es.close(); resolve(seen); }
        return;
      }
      seen.ids.push(e.lastEventId);
      const choice = JSON.parse(e.data).choices[0];
      if (choice && choice.delta && choice.delta.content) seen.text += choice.delta.content;
    };
    // After [DONE] the server closes the stream and the browser reconnects (after its retry delay, 3 s in
    // Chromium) with Last-Event-ID; the 204 it gets closes the EventSource for good (readyState CLOSED).
    const finish = () => { seen.readyState = es.readyState; es.close(); resolve(seen); };
    const giveUp = setTimeout(finish, 10000);
    es.onerror = () => {
      if (es.readyState === EventSource.CLOSED) { clearTimeout(giveUp); finish(); }
    };
  });
}

async function create(body) {
  const r = await fetch(OFFLOAD + "/v1/stream-chatgpt", {
    method: "POST",
    headers: {"Content-Type": "application/json", "X-RapidAPI-Key": "any", "X-RapidAPI-Host": "offloadgpt.p.rapidapi.com"},
    body: JSON.stringify(body),
  });
  return r.json();
}

async function main() {
  const r = {};
  const created = await create({messages: [{role: "user", content: "hi"}], access: "private", mock: {words: 20, delay_ms: 10}});
  const auth = created.authorization;
  const streamed = await follow(created.endpoints.stream_events_url + "?" + auth.stream_url_arg, true);
  r.text = streamed.text; r.ids = streamed.ids; r.done = streamed.done;
  const status = await fetch(created.endpoints.status_url, {headers: {Authorization: "Bearer " + auth.bearer_token}});
  r.etag = status.headers.get("ETag");
  const doc = await status.json();
  r.status = doc.status; r.doc_text = doc.response.body.choices[0].message.content;
  r.unauthorized = (await fetch(created.endpoints.status_url)).status;

  const left_open = await follow(created.endpoints.stream_events_url + "?" + auth.stream_url_arg, false);
  r.left_open = {done: left_open.done, readyState: left_open.readyState, count: left_open.ids.length};

  const long = await create({messages: [{role: "user", content: "hi"}], mock: {words: 400, delay_ms: 20}});
  const following = follow(long.endpoints.stream_events_url, true);
  await new Promise((ok) => setTimeout(ok, 300));
  const stop = await fetch(long.endpoints.stop_url, {method: "POST"});
  r.stop = stop.status;
  const stopped = await following;
  r.stopped = {done: stopped.done, named: stopped.named, words: stopped.text.split(" ").filter(Boolean).length};
  await report(r);
}
main().catch((e) => report({failure: String(e && e.stack || e)}));
</script></body></html>"#;

pub async fn a_browser_page_on_another_origin_follows_reads_and_stops_requests() {
    let browser = crate::chromium().unwrap();
    // The page's own origin: another port, so every call to offload is cross-origin. The server has no service
    // keys, so it takes creates from this page only because its operator listed the page's origin.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let site_origin = format!("http://{}", listener.local_addr().unwrap());
    let app = spawn_with(|a| a.cors_origins = Some(vec![site_origin.clone()])).await;
    let (report_tx, mut report_rx) = tokio::sync::mpsc::channel::<String>(1);
    let page = PAGE.replace("__OFFLOAD__", &app.base);
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
    let site_url = format!("{site_origin}/");
    tokio::spawn(async move { axum::serve(listener, site).await.unwrap() });

    let report = crate::page_report(&browser, &site_url, &mut report_rx).await;

    assert_eq!(report["done"], true);
    let ids: Vec<String> = serde_json::from_value(report["ids"].clone()).unwrap();
    assert_eq!(ids, (1..=22).map(|i| i.to_string()).collect::<Vec<_>>());
    assert_eq!(report["text"].as_str().unwrap().split_whitespace().count(), 20);
    assert_eq!(report["status"], "done");
    assert_eq!(report["doc_text"], report["text"]);
    assert!(report["etag"].is_string(), "ETag is exposed to scripts: {report}");
    assert_eq!(report["unauthorized"], 401);
    // EventSource.CLOSED is 2: told to stop by the 204, not reconnecting forever.
    assert_eq!(report["left_open"]["done"], true);
    assert_eq!(report["left_open"]["readyState"], 2, "{report}");
    assert_eq!(report["left_open"]["count"], 22, "no replay after the reconnect");
    assert_eq!(report["stop"], 200);
    assert_eq!(report["stopped"]["done"], true);
    assert_eq!(report["stopped"]["named"], serde_json::json!([["stop", "stop"]]));
    assert!(report["stopped"]["words"].as_u64().unwrap() < 400);
}
