//! `GET /openapi.json` checked against the code, so that the document cannot drift from it:
//! - the router's routes (read from `src/http/mod.rs`) and the document's paths are the same, method for method;
//! - every status the document lists for an operation is produced here by a real call (the 500s and 503s of a
//!   failing store with a store made to fail; all but a create's 500), and every answer of those calls has a
//!   documented status, content type, required headers and a body that validates against the documented schema;
//! - a method the document does not list for a path is 405, with an `Allow` header naming the ones it does, and
//!   `OPTIONS` on a request URL names them too.

use crate::flaky::spawn_flaky;
use crate::helpers::*;
use reqwest::Method;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn document() -> Value {
    serde_json::from_str(offload::http::openapi::DOCUMENT).unwrap()
}

/// Follows a local `$ref` (`#/components/...`) once, or returns the value itself.
fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(reference) => doc
            .pointer(reference.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("dangling $ref {reference} in openapi.json")),
        None => value,
    }
}

/// A validator for a schema of the document, with the document's components in reach of its `$ref`s.
fn validator(doc: &Value, schema: &Value) -> jsonschema::Validator {
    let root = json!({"allOf": [schema], "components": doc["components"]});
    jsonschema::options().with_draft(jsonschema::Draft::Draft202012).build(&root).unwrap()
}

fn assert_valid(doc: &Value, schema: &Value, instance: &Value, what: &str) {
    let validator = validator(doc, schema);
    let errors: Vec<String> =
        validator.iter_errors(instance).map(|e| format!("{e} at {}", e.instance_path())).collect();
    assert!(errors.is_empty(), "{what} does not match the document: {errors:?}\n{instance}");
}

/// The documented path template a concrete path belongs to: same segments, each `{param}` (with any literal
/// suffix such as `{id}.json`) matching a non-empty text.
fn template_of(doc: &Value, path: &str) -> String {
    let segments: Vec<&str> = path.split('/').collect();
    let matches = |template: &str| {
        let parts: Vec<&str> = template.split('/').collect();
        parts.len() == segments.len()
            && parts.iter().zip(&segments).all(|(t, s)| match (t.find('{'), t.find('}')) {
                (Some(open), Some(close)) => {
                    let (prefix, suffix) = (&t[..open], &t[close + 1..]);
                    s.len() > prefix.len() + suffix.len() && s.starts_with(prefix) && s.ends_with(suffix)
                }
                _ => t == s,
            })
    };
    let found: Vec<&String> = doc["paths"].as_object().unwrap().keys().filter(|t| matches(t)).collect();
    assert_eq!(found.len(), 1, "{path} matches {found:?} in openapi.json");
    found[0].clone()
}

/// One answer of the server, read whole.
struct Answer {
    method: Method,
    path: String,
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("{} {}: not JSON ({e}): {}", self.method, self.path, self.body))
    }
}

async fn call(app: &TestApp, request: reqwest::RequestBuilder) -> Answer {
    let request = request.build().unwrap();
    let (method, path) = (request.method().clone(), request.url().path().to_owned());
    let response = app.client.execute(request).await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = String::from_utf8_lossy(&response.bytes().await.unwrap()).into_owned();
    Answer { method, path, status, headers, body }
}

/// The events of an event-stream body, as an SSE client (and schemathesis) reads them.
fn sse_events(body: &str) -> Vec<Value> {
    let mut events = Vec::new();
    let mut last_id: Option<String> = None;
    for block in body.split("\n\n") {
        let (mut event, mut data) = (None, Vec::new());
        for line in block.lines().filter(|l| !l.starts_with(':')) {
            let (field, value) =
                line.split_once(':').map_or((line, ""), |(f, v)| (f, v.strip_prefix(' ').unwrap_or(v)));
            match field {
                "data" => data.push(value),
                "event" => event = Some(value.to_owned()),
                "id" => last_id = Some(value.to_owned()),
                _ => {}
            }
        }
        if !data.is_empty() {
            let mut e = json!({"event": event.unwrap_or_else(|| "message".into()), "data": data.join("\n")});
            if let Some(id) = &last_id {
                e["id"] = json!(id);
            }
            events.push(e);
        }
    }
    events
}

/// Checks an answer against the document; returns the (template, method, status) it exercised.
fn conforms(doc: &Value, answer: &Answer) -> (String, String, String) {
    let template = template_of(doc, &answer.path);
    let method = answer.method.as_str().to_lowercase();
    let what = format!("{} {} -> {}", answer.method, answer.path, answer.status);
    let operation = doc["paths"][&template]
        .get(&method)
        .unwrap_or_else(|| panic!("{what}: {} {template} is not in openapi.json", answer.method));
    let status = answer.status.to_string();
    let documented = operation["responses"]
        .get(&status)
        .unwrap_or_else(|| panic!("{what}: status not documented for {} {template}: {}", answer.method, answer.body));
    let documented = resolve(doc, documented);
    match documented.get("content").and_then(Value::as_object) {
        None => assert!(answer.body.is_empty(), "{what}: documented without a body, got {}", answer.body),
        Some(content) => {
            let content_type = answer.headers.get("content-type").map(|v| v.to_str().unwrap()).unwrap_or_default();
            let media = content_type.split(';').next().unwrap().trim();
            let schema = &content
                .get(media)
                .unwrap_or_else(|| panic!("{what}: content type {content_type:?} not documented: {}", answer.body))["schema"];
            match media {
                "application/json" => assert_valid(doc, schema, &answer.json(), &what),
                "text/event-stream" => {
                    let events = sse_events(&answer.body);
                    // A response's events after a `starting_after` past its end are none at all.
                    let may_be_empty = template == "/v1/responses/{id}";
                    assert!(may_be_empty || !events.is_empty(), "{what}: no events");
                    for event in &events {
                        assert_valid(doc, schema, event, &what);
                    }
                }
                _ => assert_valid(doc, schema, &json!(answer.body), &what),
            }
        }
    }
    for (name, header) in documented.get("headers").and_then(Value::as_object).into_iter().flatten() {
        let header = resolve(doc, header);
        let Some(value) = answer.headers.get(name.as_str()) else {
            assert!(header["required"] != true, "{what}: required header {name} missing");
            continue;
        };
        let value = value.to_str().unwrap();
        let typed =
            if header["schema"]["type"] == "integer" { json!(value.parse::<i64>().unwrap()) } else { json!(value) };
        assert_valid(doc, &header["schema"], &typed, &format!("{what}: header {name}"));
    }
    (template, method, status)
}

/// Every (template, method, status) the document lists.
fn documented_responses(doc: &Value) -> BTreeSet<(String, String, String)> {
    let mut all = BTreeSet::new();
    for (template, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap().iter().filter(|(k, _)| *k != "parameters") {
            for status in operation["responses"].as_object().unwrap().keys() {
                all.insert((template.clone(), method.clone(), status.clone()));
            }
        }
    }
    all
}

#[tokio::test]
async fn openapi_json_serves_the_embedded_openapi_3_1_document_of_this_version() {
    let app = spawn_app().await;
    let response = app.get(&app.url("/openapi.json"), None).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let served: Value = response.json().await.unwrap();
    assert_eq!(served, document());
    assert!(served["openapi"].as_str().unwrap().starts_with("3.1."));
    assert_eq!(served["info"]["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn the_router_and_the_document_have_the_same_paths_and_methods() {
    let doc = document();
    let source = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/http/mod.rs")).unwrap();
    let methods_in = |code: &str| -> BTreeSet<String> {
        ["get", "post", "put", "patch", "delete"]
            .into_iter()
            .filter(|m| {
                code.match_indices(&format!("{m}("))
                    .any(|(i, _)| i == 0 || !code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':'))
            })
            .map(str::to_owned)
            .collect()
    };
    let documented_methods = |template: &str| -> BTreeSet<String> {
        doc["paths"][template].as_object().unwrap().keys().filter(|k| *k != "parameters").cloned().collect()
    };
    let templates: BTreeSet<String> = doc["paths"].as_object().unwrap().keys().cloned().collect();
    let mut covered = BTreeSet::new();
    let routes: Vec<&str> = source.split(".route(\"").skip(1).collect();
    assert!(routes.len() >= 6, "could not read the routes of src/http/mod.rs");
    for route in routes {
        let (path, rest) = route.split_once('"').unwrap();
        let methods = methods_in(rest.split("\n").next().unwrap());
        match path.split_once("{*") {
            // A catch-all route serves every documented path under its prefix: together, the same methods.
            Some((prefix, _)) => {
                let prefix_pattern: Vec<&str> = prefix.trim_end_matches('/').split('/').collect();
                let under: Vec<&String> = templates
                    .iter()
                    .filter(|t| {
                        let segments: Vec<&str> = t.split('/').collect();
                        segments.len() > prefix_pattern.len()
                            && prefix_pattern
                                .iter()
                                .zip(&segments)
                                .all(|(p, s)| p == s || (p.starts_with('{') && !s.is_empty()))
                    })
                    .collect();
                assert!(!under.is_empty(), "route {path} is not in openapi.json");
                let union: BTreeSet<String> = under.iter().flat_map(|t| documented_methods(t)).collect();
                assert_eq!(union, methods, "methods of route {path} vs the document's paths under it");
                covered.extend(under.into_iter().cloned());
            }
            None => {
                assert!(templates.contains(path), "route {path} is not in openapi.json");
                assert_eq!(documented_methods(path), methods, "methods of route {path}");
                covered.insert(path.to_owned());
            }
        }
    }
    let unrouted: Vec<&String> = templates.difference(&covered).collect();
    assert!(unrouted.is_empty(), "documented but not routed: {unrouted:?}");
}

/// A stream request that has finished, with its URLs.
async fn finished_stream(app: &TestApp, extra: Value) -> Value {
    let mut body = json!({"messages": user("hi"), "mock": {"words": 3, "delay_ms": 1}});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let created = app.stream(body).await;
    let bearer = created["authorization"]["bearer_token"].as_str().map(str::to_owned);
    app.wait_final(&endpoint(&created, "status_url"), bearer.as_deref()).await;
    created
}

fn urls_of(created: &Value) -> (String, String, String, String) {
    let status = endpoint(created, "status_url");
    let base = status.trim_end_matches(".json").to_owned();
    (status, format!("{base}.txt"), format!("{base}.raw"), format!("{base}/stop"))
}

const CREATES: [&str; 2] = ["/v1/stream-chatgpt", "/v1/async-chatgpt"];

/// Sends a request over a raw HTTP/1.1 connection, for what reqwest will not send: a body that stops short of
/// its `Content-Length`. `headers` are header lines, each ending in CRLF.
async fn raw_call(app: &TestApp, method: Method, path: &str, headers: &str, body: &[u8]) -> Answer {
    let mut conn = TcpStream::connect(app.base.trim_start_matches("http://")).await.unwrap();
    conn.write_all(format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n").as_bytes()).await.unwrap();
    conn.write_all(body).await.unwrap();
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let complete = |buf: &[u8]| {
            let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length =
                head.lines().find_map(|l| l.strip_prefix("content-length:")).map_or(0, |v| v.trim().parse().unwrap());
            (buf.len() >= end + length).then_some((end, length))
        };
        loop {
            if let Some(done) = complete(&buf) {
                return (buf, done);
            }
            let n = conn.read(&mut chunk).await.unwrap();
            assert!(n > 0, "{method} {path}: closed before a whole response: {:?}", String::from_utf8_lossy(&buf));
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    let (buf, (end, length)) = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no response within 10 s"));
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut headers = reqwest::header::HeaderMap::new();
    for (name, value) in lines.filter_map(|l| l.split_once(':')) {
        headers.append(
            reqwest::header::HeaderName::from_bytes(name.trim().as_bytes()).unwrap(),
            value.trim().parse().unwrap(),
        );
    }
    let body = String::from_utf8_lossy(&buf[end..end + length]).into_owned();
    Answer { method, path: path.to_owned(), status, headers, body }
}

/// An answer given before the body was read whole: it closes the (HTTP/1.1) connection, as documented.
fn closing(answer: Answer) -> Answer {
    let connection = answer.headers.get("connection").map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(connection.as_deref(), Some("close"), "{} {} -> {}", answer.method, answer.path, answer.status);
    answer
}

/// A create body whose request runs for about ten seconds.
fn long_running() -> Value {
    json!({"messages": user("hi"), "mock": {"words": 500, "delay_ms": 20}})
}

const RESPONSES: &str = "/v1/responses";

/// A Responses create body whose response runs in the background for about ten seconds.
fn long_running_response() -> Value {
    json!({"input": "hi", "background": true, "mock": {"words": 500, "delay_ms": 20}})
}

/// Creates a response (`POST /v1/responses`, 200) and returns its id.
async fn response_id(app: &TestApp, body: Value) -> String {
    let response = app.client.post(app.url(RESPONSES)).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let object: Value = response.json().await.unwrap();
    object["id"].as_str().unwrap_or_else(|| panic!("no id in {object}")).to_owned()
}

/// `GET`, `DELETE`, `POST .../cancel` and `GET .../input_items` of the response `id`.
fn response_reads(app: &TestApp, id: &str) -> [reqwest::RequestBuilder; 4] {
    let (c, url) = (&app.client, app.url(&format!("{RESPONSES}/{id}")));
    [c.get(&url), c.delete(&url), c.post(format!("{url}/cancel")), c.get(format!("{url}/input_items"))]
}

/// The calls of the Responses API on an open server: every answer but those of service keys, limits, the body's
/// bounds and a failing store.
async fn responses_answers(app: &TestApp) -> Vec<Answer> {
    let c = &app.client;
    let post = |body: Value| c.post(app.url(RESPONSES)).json(&body);
    let mut answers = Vec::new();

    // The four kinds of create; a continuation; the URLs of the request a response is recorded as.
    let input = json!([
        {"role": "user", "content": "hi"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "yes"}]},
        {"role": "user", "content": "more"},
    ]);
    let body = json!({"input": input, "instructions": "Be brief.", "metadata": {"k": "v"}, "mock": {"words": 3}});
    let sync = call(app, post(body)).await;
    let id = sync.json()["id"].as_str().unwrap().to_owned();
    let status_url = sync.headers["x-offload-status-url"].to_str().unwrap().to_owned();
    answers.push(sync);
    for body in [
        json!({"input": "hi", "background": true, "mock": {"words": 3}}),
        json!({"input": "hi", "stream": true, "mock": {"words": 3}}),
        json!({"input": "hi", "background": true, "stream": true, "mock": {"words": 3}}),
        json!({"input": "hi", "background": true, "stream": true, "mock": {"status": 400}}),
        json!({"previous_response_id": id, "mock": {"words": 2}}),
    ] {
        answers.push(call(app, post(body)).await);
    }
    let base = status_url.trim_end_matches(".json");
    for url in [status_url.clone(), format!("{base}.txt"), format!("{base}.raw")] {
        answers.push(call(app, c.get(url)).await);
    }

    // The reads of a finished response, and what they refuse.
    let url = |suffix: &str| app.url(&format!("{RESPONSES}/{id}{suffix}"));
    let first_page = call(app, c.get(url("/input_items?limit=1"))).await;
    let after = first_page.json()["last_id"].as_str().unwrap().to_owned();
    answers.push(first_page);
    for suffix in [
        "",
        "?stream=true",
        "?stream=true&starting_after=3",
        "?stream=1&starting_after=1000",
        "/input_items",
        "/input_items?limit=100&order=asc",
        &format!("/input_items?after={after}"),
        "?stream=maybe",
        "?stream=true&starting_after=-1",
        "/input_items?limit=0",
        "/input_items?order=newest",
        "/input_items?after=msg_unknown",
    ] {
        answers.push(call(app, c.get(url(suffix))).await);
    }

    // Cancel a running response (then again), and a finished one; delete both; then nothing of them is found.
    let running = response_id(app, long_running_response()).await;
    let cancel = |id: &str| c.post(app.url(&format!("{RESPONSES}/{id}/cancel")));
    for request in [cancel(&running), cancel(&running), c.get(app.url(&format!("{RESPONSES}/{running}?stream=true")))] {
        answers.push(call(app, request).await);
    }
    for id in [&running, &id] {
        let [_, delete, cancel, _] = response_reads(app, id);
        for request in [cancel, delete].into_iter().chain(response_reads(app, id)) {
            answers.push(call(app, request).await);
        }
    }
    // A path that is not UTF-8 once decoded.
    for request in response_reads(app, "%ff") {
        answers.push(call(app, request).await);
    }

    // The create errors a caller can cause.
    let hi = json!({"input": "hi", "mock": {"words": 1}});
    let unknown_previous = json!({"input": "more", "previous_response_id": format!("resp_{}", "0".repeat(32))});
    for request in [
        post(json!({"input": 5})),
        post(json!(["input"])),
        post(unknown_previous),
        post(hi.clone()).header("X-Offload-Webhook-Url", "ftp://example.com/hook"),
        post(hi.clone()).header("X-Offload-Access", "private"),
        post(hi.clone()).header("X-Offload-On-Disconnect", "later"),
        c.post(app.url(RESPONSES)).header("content-type", "text/plain").body("hi"),
    ] {
        answers.push(call(app, request).await);
    }
    // Every other status is the upstream's, passed on (a call without `background`).
    let upstream = [400, 401, 403, 404, 408, 409, 413, 415, 422, 429, 500, 502, 503, 504].map(|status| {
        let body = json!({"input": "hi", "mock": {"status": status, "error_message": format!("Mock {status}.")}});
        call(app, post(body))
    });
    answers.extend(futures_util::future::join_all(upstream).await);
    answers
}

#[tokio::test]
async fn every_documented_status_is_answered_and_every_answer_matches_the_document() {
    let doc = document();
    let mut seen = BTreeSet::new();
    let app = spawn_app().await;
    let c = &app.client;
    let mut check = |answer: Answer| seen.insert(conforms(&doc, &answer));

    for path in ["/", "/healthz", "/openapi.json", "/playground/app.js", "/playground/style.css"] {
        check(call(&app, c.get(app.url(path))).await);
    }
    check(call(&app, c.get(app.url("/")).header("Accept", "text/html")).await);
    check(call(&app, c.get(app.url("/_offload/alive?nonce=00112233445566778899aabbccddeeff"))).await);
    check(call(&app, c.get(app.url("/_offload/alive?nonce=not-hex"))).await);
    for query in ["", "?by=model&since=1d", "?by=colour"] {
        check(call(&app, c.get(app.url(&format!("/v1/usage{query}")))).await);
    }

    // The endpoints of a finished public stream request.
    let created =
        call(&app, c.post(app.url(CREATES[0])).json(&json!({"messages": user("hi"), "mock": {"words": 3}}))).await;
    let created_json = created.json();
    check(created);
    app.wait_final(&endpoint(&created_json, "status_url"), None).await;
    let (status, txt, raw, stop) = urls_of(&created_json);
    let document = call(&app, c.get(&status)).await;
    let etag = document.headers["etag"].to_str().unwrap().to_owned();
    check(document);
    check(call(&app, c.get(&status).header("If-None-Match", &etag)).await);
    let events = call(&app, c.get(&txt)).await;
    let last = sse_events(&events.body).iter().filter_map(|e| e["id"].as_str().map(str::to_owned)).next_back().unwrap();
    check(events);
    check(call(&app, c.get(&txt).header("Last-Event-ID", &last)).await);
    for query in ["last_event_id=two", "last_event_id=1&last_event_id=2", "stream_token=%ff"] {
        check(call(&app, c.get(format!("{txt}?{query}"))).await);
    }
    check(call(&app, c.get(&raw)).await);
    check(call(&app, c.get(&stop)).await);
    check(call(&app, c.post(&stop)).await);

    // A stream request that ended before its first chunk: a new reader gets the replay of its end, a reader
    // that has everything (the `[DONE]` of no events carries id 0) gets 204.
    let failed = finished_stream(&app, json!({"mock": {"status": 401}})).await;
    let (_, failed_txt, _, _) = urls_of(&failed);
    let replay = call(&app, c.get(&failed_txt)).await;
    let names: Vec<Value> = sse_events(&replay.body).iter().map(|e| e["event"].clone()).collect();
    assert_eq!(names, [json!("error"), json!("message")], "{}", replay.body);
    check(replay);
    check(call(&app, c.get(&failed_txt).header("Last-Event-ID", "0")).await);

    // Async create; stop while running (GET and POST); delete; everything of a deleted request is 404.
    for method in [Method::GET, Method::POST] {
        let created = call(&app, c.post(app.url(CREATES[1])).json(&long_running())).await;
        let created_json = created.json();
        check(created);
        let (status, _, raw, stop) = urls_of(&created_json);
        check(call(&app, c.request(method, &stop)).await);
        check(call(&app, c.delete(&status)).await);
        // The `.txt` of the deleted (async) request's id under the stream URL of the first one.
        let deleted_txt = txt.replace(&id_of(&txt), &id_of(&status));
        for request in
            [c.get(&status), c.delete(&status), c.get(&raw), c.get(&stop), c.post(&stop), c.get(&deleted_txt)]
        {
            check(call(&app, request).await);
        }
    }

    // A private request: every endpoint needs its token.
    let private = finished_stream(&app, json!({"access": "private"})).await;
    let (status, txt, raw, stop) = urls_of(&private);
    for request in [c.get(&status), c.delete(&status), c.get(&txt), c.get(&raw), c.get(&stop), c.post(&stop)] {
        check(call(&app, request).await);
    }

    // A URL that is not valid UTF-8 once decoded.
    let bad = status.replace(&id_of(&status), "%ff");
    let bad_base = bad.trim_end_matches(".json").to_owned();
    for request in [
        c.get(&bad),
        c.delete(&bad),
        c.get(format!("{bad_base}.txt")),
        c.get(format!("{bad_base}.raw")),
        c.get(format!("{bad_base}/stop")),
        c.post(format!("{bad_base}/stop")),
    ] {
        check(call(&app, request).await);
    }

    // The create errors a caller can cause.
    let running = app.stream(long_running()).await;
    let not_text = reqwest::header::HeaderValue::from_bytes(b"sk-\xff").unwrap();
    for create in CREATES {
        let url = app.url(create);
        check(call(&app, c.post(&url).json(&json!({"messages": []}))).await);
        check(
            call(&app, c.post(&url).json(&json!({"messages": user("hi")})).header("X-OpenAI-API-Key", &not_text)).await,
        );
        check(call(&app, c.post(&url).header("content-type", "text/plain").body("hi")).await);
        let unknown = status.replace(&id_of(&status), "00000000-0000-4000-8000-000000000000");
        check(call(&app, c.post(&url).json(&json!({"messages": user("more"), "from_status_url": unknown}))).await);
        let from_running = json!({"messages": user("more"), "from_status_url": endpoint(&running, "status_url")});
        check(call(&app, c.post(&url).json(&from_running)).await);
        let wrong_token =
            json!({"messages": user("more"), "from_status_url": status, "from_bearer_token": "0".repeat(32)});
        check(call(&app, c.post(&url).json(&wrong_token)).await);
    }
    c.post(endpoint(&running, "stop_url")).send().await.unwrap();

    // 413 for a declared size over the limit, before any of the body is sent; 408 for a body that stops short.
    let small = spawn_with(|a| {
        a.max_body_bytes = Some(1024);
        a.body_timeout = Some("1s".into());
    })
    .await;
    let json_of_length = |n: usize| format!("Content-Type: application/json\r\nContent-Length: {n}\r\n");
    for create in CREATES.into_iter().chain([RESPONSES]) {
        check(closing(raw_call(&small, Method::POST, create, &json_of_length(1025), b"").await));
    }
    let trickling = json_of_length(200);
    let trickles = CREATES
        .into_iter()
        .chain([RESPONSES])
        .map(|create| raw_call(&small, Method::POST, create, &trickling, b"{\"messages\": "));
    for answer in futures_util::future::join_all(trickles).await {
        check(closing(answer));
    }

    // 401 and 429 once keys exist: a key allowed one request a day. 503 on a public address whose last key was
    // revoked.
    let keyed = spawn_app().await;
    let out = keys_cli(keyed.data_dir.path(), &["create", "--name", "one", "--requests-per-day", "1"]);
    let key = out.lines().last().unwrap().trim().to_owned();
    let public_dir = tempfile::tempdir().unwrap();
    keys_cli(public_dir.path(), &["create", "--name", "only"]);
    let public = spawn_with(|a| {
        a.listen = Some("0.0.0.0:0".parse().unwrap());
        a.data_dir = Some(public_dir.path().to_path_buf());
    })
    .await;
    keys_cli(public_dir.path(), &["revoke", "only"]);
    let body = json!({"messages": user("hi"), "mock": {"words": 1}});
    assert_eq!(
        keyed.client.post(keyed.url(CREATES[1])).bearer_auth(&key).json(&body).send().await.unwrap().status(),
        200
    );
    for create in CREATES {
        let post = || keyed.client.post(keyed.url(create)).json(&body);
        check(call(&keyed, post()).await);
        check(call(&keyed, post().header("X-API-Key", &not_text)).await);
        check(call(&keyed, post().header("X-API-Key", &key)).await);
        check(call(&public, public.client.post(public.url(create)).json(&body)).await);
    }
    check(call(&keyed, keyed.client.get(keyed.url("/v1/usage"))).await);
    check(call(&keyed, keyed.client.get(keyed.url("/v1/usage")).bearer_auth(&key)).await);
    check(call(&public, public.client.get(public.url("/v1/usage"))).await);
    let (openai_calls, _unreachable) = crate::openai::documented_calls(&app, &keyed, &public).await;
    for request in openai_calls {
        check(call(&app, request).await);
    }
    for answer in responses_answers(&app).await {
        check(answer);
    }
    // The Responses API with keys: 401 without one (creates and reads), 429 for the key that has had its request
    // of the day; 503 on a public address whose last key was revoked.
    let create_response = |app: &TestApp| app.client.post(app.url(RESPONSES)).json(&json!({"input": "hi"}));
    check(call(&keyed, create_response(&keyed)).await);
    check(call(&keyed, create_response(&keyed).header("X-API-Key", &not_text)).await);
    check(call(&keyed, create_response(&keyed).header("X-API-Key", &key)).await);
    check(call(&public, create_response(&public)).await);
    for request in response_reads(&keyed, &format!("resp_{}", "0".repeat(32))) {
        check(call(&keyed, request).await);
    }

    // 503 at capacity.
    let full = spawn_with(|a| a.max_in_flight = Some(1)).await;
    full.stream(long_running()).await;
    for create in CREATES {
        check(call(&full, full.client.post(full.url(create)).json(&json!({"messages": user("hi")}))).await);
    }
    check(call(&full, full.client.post(full.url(RESPONSES)).json(&json!({"input": "hi"}))).await);

    // A store that fails. Reads: 500 from every endpoint of a stored request (a stopped one has left memory).
    let (flaky, store) = spawn_flaky().await;
    let c = &flaky.client;
    let stopped = flaky.stream(long_running()).await;
    assert_eq!(c.post(endpoint(&stopped, "stop_url")).send().await.unwrap().status(), 200);
    let (status, txt, raw, stop) = urls_of(&stopped);
    // A finished response, once it has left memory (its reads go to the store).
    let stored = response_id(&flaky, json!({"input": "hi", "mock": {"words": 2}})).await;
    store.fail_reads.store(true, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while c.get(flaky.url(&format!("{RESPONSES}/{stored}"))).send().await.unwrap().status() != 500 {
        assert!(tokio::time::Instant::now() < deadline, "the finished response never left memory");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for request in [c.get(&status), c.delete(&status), c.get(&txt), c.get(&raw), c.get(&stop), c.post(&stop)] {
        check(call(&flaky, request).await);
    }
    for request in response_reads(&flaky, &stored) {
        check(call(&flaky, request).await);
    }
    check(call(&flaky, c.get(flaky.url("/v1/usage"))).await);
    store.fail_reads.store(false, Ordering::SeqCst);
    // A store that does not answer: 503 from the reads of a stored request (the lookup fails; nothing changes).
    store.reads_unreachable.store(true, Ordering::SeqCst);
    for request in [c.get(&status), c.get(&txt), c.get(&raw)] {
        check(call(&flaky, request).await);
    }
    for request in response_reads(&flaky, &stored) {
        check(call(&flaky, request).await);
    }
    check(call(&flaky, c.get(flaky.url("/v1/usage"))).await);
    store.reads_unreachable.store(false, Ordering::SeqCst);
    // Writes: once the chunks of a running request cannot be stored, /healthz and creates answer 503, and a stop
    // answers 503 once it has waited for its final status to be stored.
    let running =
        [flaky.stream(long_running()).await, flaky.stream(long_running()).await, flaky.stream(long_running()).await];
    let running_responses =
        [response_id(&flaky, long_running_response()).await, response_id(&flaky, long_running_response()).await];
    store.fail_writes.store(true, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let health = loop {
        let health = call(&flaky, c.get(flaky.url("/healthz"))).await;
        if health.status == 503 {
            break health;
        }
        assert!(tokio::time::Instant::now() < deadline, "/healthz still {} with the store failing", health.status);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    check(health);
    for create in CREATES {
        check(call(&flaky, c.post(flaky.url(create)).json(&json!({"messages": user("hi")}))).await);
    }
    check(call(&flaky, c.post(flaky.url(RESPONSES)).json(&json!({"input": "hi"}))).await);
    let stops = [Method::GET, Method::POST]
        .into_iter()
        .zip(&running)
        .map(|(method, created)| call(&flaky, c.request(method, endpoint(created, "stop_url"))));
    // A DELETE of a running request waits for its end to be stored the same way (at the same time as the stops);
    // so do a cancel and a DELETE of a running response.
    let delete = call(&flaky, c.delete(endpoint(&running[2], "status_url")));
    let [_, _, cancel_response, _] = response_reads(&flaky, &running_responses[0]);
    let [_, delete_response, _, _] = response_reads(&flaky, &running_responses[1]);
    let response_calls = [call(&flaky, cancel_response), call(&flaky, delete_response)];
    let (stops, delete, response_calls) =
        tokio::join!(futures_util::future::join_all(stops), delete, futures_util::future::join_all(response_calls));
    for answer in stops.into_iter().chain([delete]).chain(response_calls) {
        check(answer);
    }
    store.fail_writes.store(false, Ordering::SeqCst);

    // A create's 500 (the OS random source failing to make its tokens) is not something a test can cause.
    let missing: Vec<_> = documented_responses(&doc)
        .difference(&seen)
        .filter(|(template, _, status)| !(CREATES.contains(&template.as_str()) && status == "500"))
        .cloned()
        .collect();
    assert!(missing.is_empty(), "documented but never answered: {missing:?}");
}

/// The methods an `Allow` header names, `HEAD` (implied by `GET`) left out.
fn allowed(answer: &Answer) -> BTreeSet<String> {
    let allow = answer.headers.get("allow").map(|v| v.to_str().unwrap()).unwrap_or_default();
    allow.split(',').map(|m| m.trim().to_uppercase()).filter(|m| !m.is_empty() && m != "HEAD").collect()
}

#[tokio::test]
async fn an_undocumented_method_is_405_and_options_on_a_request_url_names_its_methods_in_allow() {
    let doc = document();
    let app = spawn_app().await;
    let stream = finished_stream(&app, json!({})).await;
    let (status, txt, raw, stop) = urls_of(&stream);
    let mut urls = vec![status, txt, raw, stop];
    urls.extend(
        ["/", "/healthz", "/openapi.json", "/playground/app.js"].into_iter().chain(CREATES).map(|p| app.url(p)),
    );
    let response = response_id(&app, json!({"input": "hi", "mock": {"words": 1}})).await;
    urls.extend(["", "/cancel", "/input_items"].map(|suffix| app.url(&format!("{RESPONSES}/{response}{suffix}"))));
    urls.push(app.url(RESPONSES));
    for url in urls {
        let path = reqwest::Url::parse(&url).unwrap().path().to_owned();
        let template = template_of(&doc, &path);
        let documented: BTreeSet<String> = doc["paths"][&template]
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "parameters")
            .map(|k| k.to_uppercase())
            .collect();
        for method in [Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
            if documented.contains(method.as_str()) {
                continue;
            }
            let answer = call(&app, app.client.request(method.clone(), &url)).await;
            assert_eq!(answer.status, 405, "{method} {path}: {}", answer.body);
            assert_eq!(answer.headers["content-type"], "application/json", "{method} {path}");
            assert_eq!(allowed(&answer), documented, "{method} {path}: {:?}", answer.headers.get("allow"));
        }
        // `OPTIONS` is answered for CORS (a browser's preflight or not); on a request URL with the same `Allow`.
        for preflight in [false, true] {
            let mut options = app.client.request(Method::OPTIONS, &url);
            if preflight {
                options =
                    options.header("Origin", "https://example.com").header("Access-Control-Request-Method", "GET");
            }
            let answer = call(&app, options).await;
            if preflight && (CREATES.contains(&path.as_str()) || path == RESPONSES) {
                // An open server refuses creates from other sites' pages, their preflights first (no CORS headers).
                assert_eq!(answer.status, 403, "OPTIONS {path}: {}", answer.body);
                assert!(!answer.headers.contains_key("access-control-allow-origin"), "OPTIONS {path}");
                continue;
            }
            assert_eq!(answer.status, 200, "OPTIONS {path}: {}", answer.body);
            assert_eq!(answer.headers["access-control-allow-origin"], "*", "OPTIONS {path}");
            if path.contains("/r/") {
                assert_eq!(allowed(&answer), documented, "OPTIONS {path}: {:?}", answer.headers.get("allow"));
            }
        }
    }
}

/// The operations on one request's URLs, by the URL each one is reached at (`base` is the status URL without
/// `.json`); the event stream only for stream requests.
fn request_operations(stream: bool) -> Vec<(&'static str, &'static str)> {
    let mut operations = vec![
        ("getStatus", ".json"),
        ("deleteRequest", ".json"),
        ("getRaw", ".raw"),
        ("stop", "/stop"),
        ("stopByGet", "/stop"),
    ];
    if stream {
        operations.push(("getEvents", ".txt"));
    }
    operations
}

/// The value of a link parameter: a runtime expression `$response.body#<pointer>` or `$response.header.<name>`,
/// with or without the `#regex:` extractor (one capturing group) that stateful testers such as schemathesis apply
/// to it.
fn link_parameter(expression: &str, body: &Value, headers: &reqwest::header::HeaderMap) -> String {
    let (source, pattern) = expression.split_once("#regex:").unwrap_or((expression, "^(.*)$"));
    let value = if let Some(pointer) = source.strip_prefix("$response.body#") {
        body.pointer(pointer).and_then(Value::as_str).unwrap_or_else(|| panic!("{pointer} not in {body}")).to_owned()
    } else if let Some(name) = source.strip_prefix("$response.header.") {
        headers.get(name).unwrap_or_else(|| panic!("no {name} header")).to_str().unwrap().to_owned()
    } else {
        panic!("unexpected runtime expression {expression}")
    };
    let regex = regex::Regex::new(pattern).unwrap();
    assert_eq!(regex.captures_len(), 2, "one capturing group in {pattern}");
    regex.captures(&value).unwrap_or_else(|| panic!("{pattern} does not match {value}"))[1].to_owned()
}

/// The path of the operation `operation_id`, with its path parameters filled from `parameters`.
fn fill_path(
    doc: &Value,
    operation_id: &str,
    parameters: &serde_json::Map<String, Value>,
    body: &Value,
    headers: &reqwest::header::HeaderMap,
) -> String {
    let (path, _) = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| item.as_object().unwrap().values().map(move |op| (path, op)))
        .find(|(_, op)| op["operationId"] == operation_id)
        .unwrap_or_else(|| panic!("no operation {operation_id}"));
    let mut filled = path.clone();
    for (name, expression) in parameters {
        filled = filled.replace(&format!("{{{name}}}"), &link_parameter(expression.as_str().unwrap(), body, headers));
    }
    assert!(!filled.contains('{'), "{operation_id}: a path parameter has no link parameter: {filled}");
    filled
}

#[tokio::test]
async fn every_create_answer_links_to_every_operation_on_its_request_and_the_links_give_its_urls() {
    let doc = document();
    let app = spawn_app().await;
    let mut cases = Vec::new();
    for (create, stream) in [("/v1/stream-chatgpt", true), ("/v1/async-chatgpt", false)] {
        let response =
            app.client.post(app.url(create)).json(&json!({"messages": user("hi"), "mock": {"words": 2}})).send().await;
        cases.push((create, stream, response.unwrap()));
    }
    for stream in [true, false] {
        let body = json!({"messages": user("hi"), "stream": stream, "mock": {"words": 2}});
        let response = app.client.post(app.url("/v1/chat/completions")).json(&body).send().await.unwrap();
        cases.push(("/v1/chat/completions", stream, response));
    }
    for (create, stream, response) in cases {
        assert_eq!(response.status(), 200);
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let status_url = match headers.get("X-Offload-Status-Url") {
            Some(url) if create.ends_with("completions") => url.to_str().unwrap().to_owned(),
            _ => endpoint(&body, "status_url"),
        };
        let base = status_url.trim_end_matches(".json");
        let origin = &status_url[..status_url.find("/1/r/").or(status_url.find("/2/r/")).unwrap()];
        let links = resolve(&doc, &doc["paths"][create]["post"]["responses"]["200"])["links"].as_object().unwrap();
        let mut linked = BTreeSet::new();
        for link in links.values() {
            let link = resolve(&doc, link);
            let operation = link["operationId"].as_str().unwrap();
            let Some((_, suffix)) = request_operations(stream).into_iter().find(|(id, _)| *id == operation) else {
                // The event stream link of `/v1/chat/completions` cannot resolve for a non-streaming call.
                assert!(create.ends_with("completions") && !stream && operation == "getEvents", "{create}: {link}");
                continue;
            };
            let path = fill_path(&doc, operation, link["parameters"].as_object().unwrap(), &body, &headers);
            assert_eq!(format!("{origin}{path}"), format!("{base}{suffix}"), "{create} -> {operation}");
            linked.insert(operation);
        }
        let expected: BTreeSet<&str> = request_operations(stream).into_iter().map(|(id, _)| id).collect();
        assert_eq!(linked, expected, "{create} (stream: {stream}) links to every operation on its request");
    }
}

#[tokio::test]
async fn the_responses_create_answer_links_to_every_operation_on_its_response_and_the_links_give_its_urls() {
    let doc = document();
    let app = spawn_app().await;
    let body = json!({"input": "hi", "background": true, "mock": {"words": 2}});
    let response = app.client.post(app.url(RESPONSES)).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    let body: Value = response.json().await.unwrap();
    let id = body["id"].as_str().unwrap();
    // Every operation under `/v1/responses/{id}`, by its path.
    let mut expected = std::collections::BTreeMap::new();
    for (template, item) in doc["paths"].as_object().unwrap() {
        if let Some(suffix) = template.strip_prefix("/v1/responses/{id}") {
            for (_, operation) in item.as_object().unwrap().iter().filter(|(k, _)| *k != "parameters") {
                expected.insert(operation["operationId"].as_str().unwrap().to_owned(), suffix.to_owned());
            }
        }
    }
    assert_eq!(expected.len(), 4, "{expected:?}");
    let links = resolve(&doc, &doc["paths"][RESPONSES]["post"]["responses"]["200"])["links"].as_object().unwrap();
    let mut linked = BTreeSet::new();
    for link in links.values() {
        let link = resolve(&doc, link);
        let operation = link["operationId"].as_str().unwrap();
        let suffix = expected.get(operation).unwrap_or_else(|| panic!("a link to {operation}: {link}"));
        let path = fill_path(&doc, operation, link["parameters"].as_object().unwrap(), &body, &headers);
        assert_eq!(path, format!("{RESPONSES}/{id}{suffix}"), "{operation}");
        linked.insert(operation.to_owned());
    }
    assert_eq!(linked, expected.keys().cloned().collect::<BTreeSet<_>>());
}

/// A `messages` string is accepted when it holds a non-empty JSON array of objects with a string `role`: every
/// string the server accepts matches the document's pattern, and the strings it can tell apart without parsing
/// (empty, not an array, an empty array, an array of non-objects) do not.
#[test]
fn the_messages_string_pattern_admits_every_accepted_string_and_excludes_the_plainly_wrong() {
    let doc = document();
    let schema = &doc["components"]["schemas"]["CreateBody"];
    let validator = validator(&doc, schema);
    let limits = offload::domain::Limits { max_timeout: 90.0, max_connect_timeout: 10.0, default_model: "m".into() };
    let accepted = |messages: &str| {
        let body = serde_json::to_vec(&json!({"messages": messages})).unwrap();
        offload::domain::CreateRequest::parse(&body, &limits).is_ok()
    };
    for good in [
        r#"[{"role":"user","content":"hi"}]"#,
        " \n\t\r[ \n{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"}]\"}]} ,{\"role\":\"x\"}\r\n]\t ",
        r#"[{"content":{"nested":[1,{"a":[]}]},"role":"assistant"}]"#,
    ] {
        assert!(accepted(good), "{good:?} is accepted");
        assert!(validator.is_valid(&json!({"messages": good})), "{good:?} matches the document");
    }
    for bad in [
        "",
        " ",
        "nope",
        "[]",
        " [ ] ",
        "{}",
        "[1]",
        "[\"role\"]",
        "[[{\"role\":\"user\"}]]",
        "\u{a0}[{\"role\":\"u\"}]",
    ] {
        assert!(!accepted(bad), "{bad:?} is refused");
        assert!(!validator.is_valid(&json!({"messages": bad})), "{bad:?} does not match the document");
    }
}
