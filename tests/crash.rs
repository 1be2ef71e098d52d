//! Crash safety, tested by causing the crash: the real `offload` binary is killed with SIGKILL mid-stream and
//! started again on the same data directory.

#![expect(clippy::unwrap_used, reason = "a test fails loudly on anything unexpected")]

use serde_json::{Value, json};
use std::time::Duration;

const SECRET_KEY: &str = "sk-crash-test-0123456789-SECRET";
const PUBLIC: &str = "http://offload.test";

mod support;

use support::Offload as Server;

/// Starts `offload serve` on port 0 against `upstream`, on `data_dir`.
fn start(data_dir: &std::path::Path, upstream: &str) -> Server {
    let mut command = Server::command();
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--public-url", PUBLIC, "--upstream-url", upstream])
        .arg("--data-dir")
        .arg(data_dir)
        .env("OFFLOAD_LOG", "debug");
    Server::spawn(command)
}

/// The URL of `server` for a public URL it handed out.
fn local(server: &Server, public_url: &str) -> String {
    public_url.replacen(PUBLIC, &format!("http://{}", server.addr), 1)
}

async fn get_json(client: &reqwest::Client, url: &str) -> Value {
    let response = client.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200, "{url}");
    response.json().await.unwrap()
}

#[tokio::test]
async fn kill_9_mid_stream_then_restart_ends_the_request_as_interrupted_and_keeps_the_rest_identical() {
    let expecting =
        offload::mock::MockConfig { expected_key: offload::domain::UpstreamKey::new(SECRET_KEY), ..Default::default() };
    let mock = offload::mock::spawn("127.0.0.1:0".parse().unwrap(), expecting).await.unwrap();
    let upstream = mock.api_base().to_string();
    let data = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let server = start(data.path(), &upstream);
    let base = format!("http://{}", server.addr);
    let create = |endpoint: &'static str, body: Value| {
        let client = client.clone();
        let url = format!("{base}/v1/{endpoint}");
        async move {
            let response = client.post(url).header("X-OpenAI-API-Key", SECRET_KEY).json(&body).send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.unwrap()
        }
    };

    // One request that finishes before the crash, one private one cut off by it.
    let finished =
        create("stream-chatgpt", json!({"messages": [{"role": "user", "content": "a"}], "mock": {"words": 6}})).await;
    let finished_status = local(&server, finished["endpoints"]["status_url"].as_str().unwrap());
    let finished_events = local(&server, finished["endpoints"]["stream_events_url"].as_str().unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while get_json(&client, &finished_status).await["status"] != "done" {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cut = create(
        "stream-chatgpt",
        json!({"messages": [{"role": "user", "content": "b"}], "access": "private", "mock": {"words": 1000, "delay_ms": 10}}),
    )
    .await;
    let bearer = cut["authorization"]["bearer_token"].as_str().unwrap().to_owned();
    let cut_status = local(&server, cut["endpoints"]["status_url"].as_str().unwrap());
    // Streaming, with part of the reply stored.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let seen = loop {
        let doc: Value = client.get(&cut_status).bearer_auth(&bearer).send().await.unwrap().json().await.unwrap();
        let content = doc["response"]["body"]["choices"][0]["message"]["content"].as_str().unwrap_or("").to_owned();
        if doc["status"] == "streaming" && content.split_whitespace().count() >= 5 {
            break content;
        }
        assert!(!matches!(doc["status"].as_str(), Some("done" | "error" | "stop")), "ended early: {doc}");
        assert!(std::time::Instant::now() < deadline, "no part of the reply stored in time: {doc}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    let snapshot = |status: String, events: String| {
        let client = client.clone();
        async move {
            let doc = client.get(&status).send().await.unwrap().bytes().await.unwrap();
            let events = client.get(&events).send().await.unwrap().bytes().await.unwrap();
            let raw = client.get(status.replace(".json", ".raw")).send().await.unwrap().bytes().await.unwrap();
            (doc, events, raw)
        }
    };
    let finished_before = snapshot(finished_status.clone(), finished_events.clone()).await;
    // A crash may lose the last flush interval (50 ms by default) of chunks; what was seen well before it may not.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut server = server;
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();
    let mut log = server.log_lines();

    let restarted = start(data.path(), &upstream);
    let cut_status = local(&restarted, cut["endpoints"]["status_url"].as_str().unwrap());
    let after: Value = client.get(&cut_status).bearer_auth(&bearer).send().await.unwrap().json().await.unwrap();
    assert_eq!(after["status"], "error");
    assert_eq!(after["error"]["code"], "interrupted");
    let kept = after["response"]["body"]["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(kept.starts_with(&seen), "text received before the crash is kept: {kept:?} vs {seen:?}");
    let events_url = format!(
        "{}?stream_token={}",
        local(&restarted, cut["endpoints"]["stream_events_url"].as_str().unwrap()),
        cut["authorization"]["stream_url_arg"].as_str().unwrap().trim_start_matches("stream_token=")
    );
    let events = client.get(&events_url).send().await.unwrap().text().await.unwrap();
    assert!(events.ends_with("data: [DONE]\n\n"));
    assert!(
        events.contains("event: error\ndata: {\"status\":\"error\",\"error\":{\"code\":\"interrupted\""),
        "{events}"
    );

    let finished_after = snapshot(
        local(&restarted, finished["endpoints"]["status_url"].as_str().unwrap()),
        local(&restarted, finished["endpoints"]["stream_events_url"].as_str().unwrap()),
    )
    .await;
    assert_eq!(finished_before, finished_after, "a finished request is identical before and after a restart");

    let mut restarted = restarted;
    restarted.child.kill().unwrap();
    restarted.child.wait().unwrap();
    log.extend(restarted.log_lines());

    // The upstream key reached the mock, and nothing else: not the log, not a single byte of the store.
    assert!(!log.is_empty());
    assert!(log.iter().all(|l| !l.contains(SECRET_KEY)), "the key leaked into the log");
    for entry in std::fs::read_dir(data.path()).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            !bytes.windows(SECRET_KEY.len()).any(|w| w == SECRET_KEY.as_bytes()),
            "the key is in {}",
            path.display()
        );
        assert!(!bytes.windows(bearer.len()).any(|w| w == bearer.as_bytes()), "a token is in {}", path.display());
    }
    let received = get_json(&client, &format!("http://{}/_mock/requests", mock.addr())).await;
    assert_eq!(received[0]["authorization_expected"], true, "the key reached the upstream");
}

/// What a client saw as final, to compare after the crash.
enum Seen {
    /// The status document, once it showed a final status.
    Document(bytes::Bytes),
    /// The whole event stream, up to and including `data: [DONE]`.
    Stream(bytes::Bytes),
}

/// Runs one request to a final status as a client observes it (`outcome` picks how it ends and how it is
/// watched), and returns what the client saw at the first moment it was final.
async fn observe_final(client: &reqwest::Client, server: &Server, round: usize) -> (String, String, Seen) {
    let base = format!("http://{}", server.addr);
    let (body, watch_stream, stop) = match round % 4 {
        // Poll the document until it says `done`.
        0 => (json!({"mock": {"words": 200}}), false, false),
        // Read the stream until `[DONE]`.
        1 => (json!({"mock": {"words": 200}}), true, false),
        // An upstream that breaks mid-stream: `error`, seen on the stream.
        2 => (json!({"mock": {"words": 200, "drop_after": 150}}), true, false),
        // Stopped mid-stream: once stop answered, the document says `stop`.
        _ => (json!({"mock": {"words": 2000, "delay_ms": 1}}), false, true),
    };
    let mut body = body;
    body["messages"] = json!([{"role": "user", "content": format!("round {round}")}]);
    let created: Value = client
        .post(format!("{base}/v1/stream-chatgpt"))
        .header("X-OpenAI-API-Key", SECRET_KEY)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let status_url = created["endpoints"]["status_url"].as_str().unwrap().to_owned();
    let events_url = created["endpoints"]["stream_events_url"].as_str().unwrap().to_owned();
    let local_status = local(server, &status_url);
    if stop {
        tokio::time::sleep(Duration::from_millis(30)).await;
        let response = client.post(local(server, &status_url.replace(".json", "/stop"))).send().await.unwrap();
        assert_eq!(response.status(), 200, "round {round}: stop");
        let doc = client.get(&local_status).send().await.unwrap().bytes().await.unwrap();
        let value: Value = serde_json::from_slice(&doc).unwrap();
        assert_eq!(value["status"], "stop", "round {round}: once stop answered, the document says stop");
        return (status_url, events_url, Seen::Document(doc));
    }
    if watch_stream {
        let stream = client.get(local(server, &events_url)).send().await.unwrap().bytes().await.unwrap();
        assert!(stream.ends_with(b"data: [DONE]\n\n"), "round {round}");
        return (status_url, events_url, Seen::Stream(stream));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let doc = client.get(&local_status).send().await.unwrap().bytes().await.unwrap();
        let value: Value = serde_json::from_slice(&doc).unwrap();
        if matches!(value["status"].as_str(), Some("done" | "error" | "stop")) {
            return (status_url, events_url, Seen::Document(doc));
        }
        assert!(std::time::Instant::now() < deadline, "round {round}: never final");
    }
}

#[tokio::test]
async fn kill_9_right_after_a_final_status_was_seen_changes_nothing_that_was_seen() {
    let mock = offload::mock::spawn("127.0.0.1:0".parse().unwrap(), Default::default()).await.unwrap();
    let upstream = mock.api_base().to_string();
    let data = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let mut server = start(data.path(), &upstream);
    let rounds = 24;
    for round in 0..rounds {
        let (status_url, events_url, seen) = observe_final(&client, &server, round).await;
        // The worst moment: at once, with whatever is still queued for the store.
        server.child.kill().unwrap();
        server.child.wait().unwrap();
        server = start(data.path(), &upstream);
        match seen {
            Seen::Document(before) => {
                let after = client.get(local(&server, &status_url)).send().await.unwrap().bytes().await.unwrap();
                assert_eq!(
                    String::from_utf8_lossy(&before),
                    String::from_utf8_lossy(&after),
                    "round {round}: the document seen as final changed after a crash"
                );
            }
            Seen::Stream(before) => {
                let after = client.get(local(&server, &events_url)).send().await.unwrap().bytes().await.unwrap();
                assert_eq!(
                    String::from_utf8_lossy(&before),
                    String::from_utf8_lossy(&after),
                    "round {round}: the stream seen to its end changed after a crash"
                );
            }
        }
    }
}

/// The events (`id`, `event`, `data`) of a Responses event stream, with the bytes they came in.
fn response_events(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter_map(|frame| frame.lines().find_map(|line| line.strip_prefix("data: ")))
        .map(|data| serde_json::from_str(data).unwrap())
        .collect()
}

async fn read_until_closed(client: &reqwest::Client, url: &str) -> String {
    let response = client.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200, "{url}");
    tokio::time::timeout(Duration::from_secs(20), response.text()).await.unwrap().unwrap()
}

/// Issue 18: a crash keeps every final state of the Responses API as it was shown; a response it cut off ends
/// `failed` with `interrupted` and the output received so far, and its stream ends with `response.failed` after the
/// events seen before the crash, byte for byte. Over both kinds of upstream.
#[tokio::test]
async fn kill_9_keeps_a_finished_response_and_ends_a_running_one_as_failed_interrupted() {
    for no_responses_api in [false, true] {
        let config = offload::mock::MockConfig { no_responses_api, ..Default::default() };
        let mock = offload::mock::spawn("127.0.0.1:0".parse().unwrap(), config).await.unwrap();
        let data = tempfile::tempdir().unwrap();
        let client = reqwest::Client::new();
        let server = start(data.path(), mock.api_base().as_str());
        let base = format!("http://{}", server.addr);
        let create = |body: Value| {
            let client = client.clone();
            let url = format!("{base}/v1/responses");
            async move {
                let response = client.post(url).json(&body).send().await.unwrap();
                assert_eq!(response.status(), 200);
                response.json::<Value>().await.unwrap()
            }
        };

        let done = create(json!({"input": "a", "background": true, "mock": {"words": 6}})).await;
        let done_id = done["id"].as_str().unwrap().to_owned();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while get_json(&client, &format!("{base}/v1/responses/{done_id}")).await["status"] != "completed" {
            assert!(std::time::Instant::now() < deadline, "not completed in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let done_object =
            client.get(format!("{base}/v1/responses/{done_id}")).send().await.unwrap().text().await.unwrap();
        let done_stream = read_until_closed(&client, &format!("{base}/v1/responses/{done_id}?stream=true")).await;

        let cut = create(json!({"input": "b", "background": true, "mock": {"words": 1000, "delay_ms": 10}})).await;
        let cut_id = cut["id"].as_str().unwrap().to_owned();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let seen = loop {
            let object = get_json(&client, &format!("{base}/v1/responses/{cut_id}")).await;
            let text = object["output"][0]["content"][0]["text"].as_str().unwrap_or("").to_owned();
            if text.split_whitespace().count() >= 5 {
                break text;
            }
            assert!(std::time::Instant::now() < deadline, "no output in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // What a reader of the stream saw before the crash: the first events, read live.
        let mut live = client.get(format!("{base}/v1/responses/{cut_id}?stream=true")).send().await.unwrap();
        let mut seen_stream = Vec::new();
        while seen_stream.len() < 2000 {
            seen_stream.extend_from_slice(&live.chunk().await.unwrap().unwrap());
        }
        let seen_stream = String::from_utf8(seen_stream).unwrap();
        let seen_stream = &seen_stream[..seen_stream.rfind("\n\n").unwrap() + 2];
        // A crash may lose the last flush interval (50 ms by default) of events; what was seen well before it may not.
        tokio::time::sleep(Duration::from_millis(500)).await;

        let mut server = server;
        server.kill();
        let server = start(data.path(), mock.api_base().as_str());
        let base = format!("http://{}", server.addr);

        let after = client.get(format!("{base}/v1/responses/{done_id}")).send().await.unwrap().text().await.unwrap();
        assert_eq!(after, done_object, "a completed response is the same after the crash");
        let after_stream = read_until_closed(&client, &format!("{base}/v1/responses/{done_id}?stream=true")).await;
        assert_eq!(after_stream, done_stream, "and so is its stream");

        let object = get_json(&client, &format!("{base}/v1/responses/{cut_id}")).await;
        assert_eq!(object["status"], "failed", "{object}");
        assert_eq!(object["error"]["code"], "interrupted", "{object}");
        let text = object["output"][0]["content"][0]["text"].as_str().unwrap();
        assert!(text.starts_with(&seen), "the output kept everything seen: {text:?} / {seen:?}");
        let stream = read_until_closed(&client, &format!("{base}/v1/responses/{cut_id}?stream=true")).await;
        assert!(stream.starts_with(seen_stream), "the replay begins with what was seen live, byte for byte");
        let events = response_events(&stream);
        let numbers: Vec<u64> = events.iter().map(|e| e["sequence_number"].as_u64().unwrap()).collect();
        assert_eq!(numbers, (0..events.len() as u64).collect::<Vec<_>>(), "contiguous sequence numbers");
        let last = events.last().unwrap();
        assert_eq!(last["type"], "response.failed", "the stream ends with the terminal event");
        assert_eq!(last["response"]["error"]["code"], "interrupted");
        assert_eq!(last["response"], object, "the terminal event carries the final object");
        drop(server);
    }
}
