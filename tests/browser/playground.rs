//! The playground at `GET /` driven through its own UI in headless Chromium against the mock upstream: it streams
//! a reply live, stops it, continues the conversation, and replays a request from its status URL.
//!
//! Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages ended by a
//! NUL byte on the browser's file descriptors 3 and 4, which a shell maps to the child's stdin and stdout). The
//! test types into the page's fields and clicks its buttons with `Runtime.evaluate`, then waits for the DOM.

use crate::HEADLESS;
use crate::helpers::*;
use offload::mock::MockConfig;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// Headless Chromium with its DevTools protocol on a pipe, attached to one page.
struct Browser {
    child: Child,
    to_browser: ChildStdin,
    from_browser: BufReader<ChildStdout>,
    next_id: u64,
    session: Option<String>,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn launch(path: &std::path::Path) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        // fd 3 reads what the test writes (the child's stdin), fd 4 writes what the test reads (its stdout).
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>/dev/null"#)
            .arg(path)
            .args(HEADLESS)
            .args(["--remote-debugging-pipe", "--window-size=1280,900"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let to_browser = child.stdin.take().unwrap();
        let from_browser = BufReader::new(child.stdout.take().unwrap());
        Browser { child, to_browser, from_browser, next_id: 0, session: None, _profile: profile }
    }

    /// Sends one command (to the attached page, once there is one) and returns its result.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = &self.session {
            message["sessionId"] = json!(session);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.to_browser.write_all(&bytes).await.unwrap();
        self.to_browser.flush().await.unwrap();
        let answer = async {
            loop {
                let mut buf = Vec::new();
                let n = self.from_browser.read_until(0, &mut buf).await.unwrap();
                assert!(n > 0, "the browser closed its DevTools pipe");
                buf.pop();
                let reply: Value = serde_json::from_slice(&buf).unwrap();
                // Events (no id) and answers to other sessions are not ours.
                if reply["id"] == id {
                    return reply;
                }
            }
        };
        let reply = tokio::time::timeout(Duration::from_secs(30), answer)
            .await
            .unwrap_or_else(|_| panic!("no answer from the browser to {method}"));
        assert!(reply.get("error").is_none(), "{method}: {reply}");
        reply["result"].clone()
    }

    /// Opens `url` in a new page and attaches to it.
    async fn open(&mut self, url: &str) {
        let target = self.call("Target.createTarget", json!({"url": url})).await;
        let attached =
            self.call("Target.attachToTarget", json!({"targetId": target["targetId"], "flatten": true})).await;
        self.session = Some(attached["sessionId"].as_str().unwrap().to_owned());
    }

    /// Runs `expression` in the page (awaiting a promise) and returns its value.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call("Runtime.evaluate", json!({"expression": expression, "awaitPromise": true, "returnByValue": true}))
            .await;
        assert!(result.get("exceptionDetails").is_none(), "{expression}: {}", result["exceptionDetails"]);
        result["result"]["value"].clone()
    }

    /// Waits until `expression` is truthy in the page; returns its value.
    async fn wait_for(&mut self, expression: &str, what: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let value = self.eval(expression).await;
            if !matches!(value, Value::Null | Value::Bool(false)) && value != json!("") && value != json!(0) {
                return value;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "waited 20 s for {what}; the page says {}",
                self.state().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What the page shows: the request's status, the last reply, the message line, the turns.
    async fn state(&mut self) -> Value {
        self.eval(
            r##"({
              status: document.getElementById("request-status").dataset.status,
              reply: (document.querySelector("#transcript .turn.assistant:last-of-type .content") || {}).textContent,
              message: document.getElementById("message").textContent,
              turns: [...document.querySelectorAll("#transcript .turn")].map((t) => [t.classList[1], t.querySelector(".content").textContent]),
            })"##,
        )
        .await
    }

    /// Types `value` into the field `id` as a person would leave it: value set, `input` and `change` fired.
    async fn fill(&mut self, id: &str, value: &str) {
        let script = format!(
            r#"(() => {{ const el = document.getElementById({id}); el.focus(); el.value = {value};
                 el.dispatchEvent(new Event("input", {{bubbles: true}})); el.dispatchEvent(new Event("change", {{bubbles: true}})); }})()"#,
            id = json!(id),
            value = json!(value),
        );
        self.eval(&script).await;
    }

    async fn click(&mut self, selector: &str) {
        let clicked = self
            .eval(&format!(
                "(() => {{ const el = document.querySelector({0}); if (!el || el.disabled) return false; el.click(); return true; }})()",
                json!(selector)
            ))
            .await;
        assert_eq!(clicked, true, "{selector} is not there to click: {}", self.state().await);
    }

    /// The status document the page shows.
    async fn document(&mut self) -> Value {
        let text = self.eval(r#"document.getElementById("doc").textContent"#).await;
        serde_json::from_str(text.as_str().unwrap())
            .unwrap_or_else(|e| panic!("the page shows no document ({e}): {text}"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn words(text: &Value) -> usize {
    text.as_str().unwrap_or_default().split_whitespace().count()
}

pub async fn the_playground_streams_live_stops_continues_and_replays_in_a_real_browser() {
    let path = crate::chromium().unwrap();
    // Replies of 150 words, one every 40 ms: six seconds to watch one arrive and stop it.
    let mock = MockConfig { words: Some(150), delay_ms: Some(40), ..MockConfig::default() };
    let app = spawn_with_mock(mock, |_| {}).await;
    let out = keys_cli(app.data_dir.path(), &["create", "--name", "play"]);
    let key = out.lines().last().unwrap().trim().to_owned();

    let mut browser = Browser::launch(&path).await;
    browser.open(&app.url("/")).await;
    browser
        .wait_for(r#"document.readyState === "complete" && document.getElementById("send") !== null"#, "the page")
        .await;

    // The server requires a key: the page asks for one, and a send without it shows the server's 401 message.
    let asking = browser.eval(r#"!document.getElementById("key-needed").hidden && document.activeElement.id"#).await;
    assert_eq!(asking, "service-key");
    browser.fill("prompt", "Tell me a long story").await;
    browser.click("#send").await;
    let refused = browser.wait_for(r#"document.getElementById("message").classList.contains("error") && document.getElementById("message").textContent"#, "the 401").await;
    assert!(refused.as_str().unwrap().contains("401"), "{refused}");
    assert_eq!(browser.state().await["turns"], json!([]));

    // Stream, public: the reply grows on the page while the request runs, then Stop ends it as `stop`.
    browser.fill("service-key", &key).await;
    browser.click("#send").await;
    let mut lengths = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while lengths.len() < 3 {
        let state = browser.state().await;
        if state["status"] == "streaming" && words(&state["reply"]) > 0 {
            lengths.insert(words(&state["reply"]));
        }
        assert!(tokio::time::Instant::now() < deadline, "the reply never grew live: {state}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    browser.click("#stop").await;
    browser.wait_for(r#"document.getElementById("request-status").dataset.status === "stop""#, "the stop").await;
    browser
        .wait_for(r#"document.getElementById("events").textContent.includes("[DONE]")"#, "the end of the stream")
        .await;
    let first = browser.document().await;
    assert_eq!(first["status"], "stop");
    let first_url = first["endpoints"]["status_url"].as_str().unwrap().to_owned();
    let first_text = first["response"]["body"]["choices"][0]["message"]["content"].clone();
    let state = browser.state().await;
    assert_eq!(state["reply"], first_text, "the page shows the stored reply");
    assert!((1..150).contains(&words(&first_text)), "stopped part-way: {first_text}");
    let log = browser.eval(r#"document.getElementById("events").textContent"#).await;
    assert!(log.as_str().unwrap().contains("event: stop "), "{log}");
    assert!(log.as_str().unwrap().contains("#1 {"), "{log}");

    // Continue, private, short: the page fills the previous status URL in; the new document holds the history.
    let continuing = browser
        .eval(r#"document.getElementById("continue").checked && document.getElementById("from-url").value"#)
        .await;
    assert_eq!(continuing, json!(first_url));
    browser.fill("extra", r#"{"mock": {"words": 4, "delay_ms": 5}}"#).await;
    browser.click(r#"input[name="access"][value="private"]"#).await;
    browser.fill("prompt", "Go on").await;
    browser.click("#send").await;
    browser
        .wait_for(r#"document.getElementById("request-status").dataset.status === "done""#, "the continuation")
        .await;
    let second = browser.document().await;
    assert_eq!(second["authorization"]["access"], "private");
    assert_eq!(second["endpoints"]["from_status_url"], json!(first_url));
    assert_eq!(
        second["parameters"]["messages"],
        json!([
            {"role": "user", "content": "Tell me a long story"},
            {"role": "assistant", "content": first_text},
            {"role": "user", "content": "Go on"},
        ])
    );
    let state = browser.state().await;
    let second_text = second["response"]["body"]["choices"][0]["message"]["content"].clone();
    assert_eq!(words(&second_text), 4);
    assert_eq!(
        state["turns"],
        json!([
            ["user", "Tell me a long story"],
            ["assistant", first_text],
            ["user", "Go on"],
            ["assistant", second_text]
        ])
    );
    // The private stream was followed with its stream token: its events are in the log.
    browser.wait_for(r#"document.getElementById("events").textContent.includes("[DONE]")"#, "the private stream").await;
    let log = browser.eval(r#"document.getElementById("events").textContent"#).await;
    assert!(log.as_str().unwrap().contains("#2 {"), "{log}");

    // Open the first request by its status URL: its events replay, its document and raw response show.
    browser.fill("open-url", &first_url).await;
    browser.click("#open-button").await;
    browser.wait_for(r#"document.getElementById("request-status").dataset.status === "stop""#, "the replay").await;
    browser
        .wait_for(r#"document.getElementById("events").textContent.includes("[DONE]")"#, "the replayed stream")
        .await;
    let state = browser.state().await;
    assert_eq!(state["turns"], json!([["user", "Tell me a long story"], ["assistant", first_text]]));
    assert_eq!(browser.document().await["endpoints"]["status_url"], json!(first_url));
    browser.click("#tab-raw").await;
    let raw = browser
        .wait_for(r#"document.getElementById("raw").textContent.includes("chat.completion.chunk") && document.getElementById("raw").textContent"#, "the raw response")
        .await;
    // The upstream's answer as it came: its status line and headers, then the body.
    assert!(raw.as_str().unwrap().starts_with("HTTP/1.1 200 OK\r\n"), "{raw}");
    assert!(raw.as_str().unwrap().contains("\r\n\r\ndata: {"), "{raw}");

    // Everything the page loaded came from this server.
    let foreign = browser
        .eval(r#"performance.getEntriesByType("resource").map((e) => e.name).filter((n) => !n.startsWith(location.origin + "/"))"#)
        .await;
    assert_eq!(foreign, json!([]));
}
