//! Cluster mode, tested as users run it: three real `offload serve` processes on one PostgreSQL database, sharing
//! one public URL, reached each on its own port as a load balancer without stickiness would. Faults are caused for
//! real (kill -9 of a node).
//!
//! Each test makes a database of its own on the machine's PostgreSQL (`OFFLOAD_TEST_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`, used only to create and drop it) or, when nothing answers there, on a
//! throwaway server of this binary's own (`support::postgres`), and drops it afterwards. Where neither is possible
//! the tests are reported ignored with the reason (`harness = false`: `support::harness`), except under CI.

#![expect(clippy::unwrap_used, reason = "a test fails loudly on anything unexpected")]

use axum::extract::State;
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde_json::{Value, json};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Short, so that a dead node is noticed quickly in tests (the default is 10 s).
const LEASE: &str = "2s";

mod support;

use support::Offload as Node;
use support::cluster::{PUBLIC, content, create_key, endpoint, local};
use support::postgres::Database;

/// Starts a node on `db`.
fn start(db: &Database, upstream: &str, extra: &[&str]) -> Node {
    let mut command = Node::command();
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--public-url", PUBLIC, "--upstream-url", upstream])
        .args(["--store", &db.url, "--node-lease", LEASE, "--flush-interval-ms", "10", "--key-cache-ttl", "0"])
        .args(extra)
        .env("OFFLOAD_LOG", "info");
    Node::spawn(command)
}

struct Cluster {
    nodes: Vec<Node>,
    mock: offload::mock::MockServer,
    db: Database,
    client: reqwest::Client,
}

async fn cluster(extra: &[&str]) -> Cluster {
    let db = support::postgres::database("offload_cluster").await;
    let mock = offload::mock::spawn("127.0.0.1:0".parse().unwrap(), Default::default()).await.unwrap();
    let upstream = mock.api_base().to_string();
    let nodes = (0..3).map(|_| start(&db, &upstream, extra)).collect();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    Cluster { nodes, mock, db, client }
}

impl Cluster {
    async fn create(&self, node: usize, endpoint: &str, body: Value) -> Value {
        let response =
            self.client.post(self.nodes[node].url(&format!("/v1/{endpoint}"))).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    async fn document(&self, node: usize, status_url: &str) -> Value {
        support::cluster::document(&self.client, &self.nodes[node], status_url).await
    }

    async fn wait_final(&self, node: usize, status_url: &str, within: Duration) -> Value {
        support::cluster::wait_final(&self.client, &self.nodes[node], status_url, within).await
    }

    async fn stream_bytes(&self, node: usize, events_url: &str, last_event_id: Option<&str>) -> (u16, String) {
        let mut request = self.client.get(local(&self.nodes[node], events_url));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }

    async fn mock_stats(&self) -> Value {
        let url = format!("http://{}/_mock/stats", self.mock.addr());
        self.client.get(url).send().await.unwrap().json().await.unwrap()
    }
}

fn slow(words: usize) -> Value {
    json!({"messages": [{"role": "user", "content": "hi"}], "mock": {"words": words, "delay_ms": 25}})
}

async fn a_request_created_on_one_node_is_followed_on_a_second_and_polled_on_a_third() {
    let c = cluster(&[]).await;
    let created = c.create(0, "stream-chatgpt", slow(60)).await;
    let (status_url, events_url) = (endpoint(&created, "status_url"), endpoint(&created, "stream_events_url"));

    // Node 1 follows the stream live; node 2 sees the body grow while it streams.
    let follower = {
        let (client, url) = (c.client.clone(), local(&c.nodes[1], &events_url));
        tokio::spawn(async move { client.get(url).send().await.unwrap().text().await.unwrap() })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let growing = loop {
        let doc = c.document(2, &status_url).await;
        if doc["status"] == "streaming" && !content(&doc).is_empty() {
            break doc;
        }
        assert!(Instant::now() < deadline, "never seen streaming with text on another node");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let followed = follower.await.unwrap();
    let done = c.wait_final(2, &status_url, Duration::from_secs(20)).await;
    assert_eq!(done["status"], "done");
    assert!(content(&done).starts_with(&content(&growing)), "the text grew");

    // Every node replays the same stream, byte for byte, and serves the same document and raw response.
    let (_, on_owner) = c.stream_bytes(0, &events_url, None).await;
    assert_eq!(followed, on_owner, "followed live on another node = replayed on the owner");
    assert!(followed.ends_with("data: [DONE]\n\n"));
    assert_eq!(followed.matches("\nid: ").count() + usize::from(followed.starts_with("id: ")), 62);
    let mut documents = Vec::new();
    for node in 0..3 {
        let doc = c.client.get(local(&c.nodes[node], &status_url)).send().await.unwrap().text().await.unwrap();
        let raw = c.client.get(local(&c.nodes[node], &status_url.replace(".json", ".raw"))).send().await.unwrap();
        assert_eq!(raw.status(), 200);
        documents.push((doc, raw.text().await.unwrap()));
    }
    assert!(documents.windows(2).all(|w| w[0] == w[1]), "one document and one raw response on every node");
}

async fn a_reader_resumes_on_another_node_with_last_event_id_and_gets_204_at_the_end() {
    let c = cluster(&[]).await;
    let created = c.create(0, "stream-chatgpt", slow(40)).await;
    let events_url = endpoint(&created, "stream_events_url");

    // Read the first five events on node 0, then drop the connection.
    let response = c.client.get(local(&c.nodes[0], &events_url)).send().await.unwrap();
    let mut events = response.bytes_stream().eventsource();
    let mut first = Vec::new();
    while first.len() < 5 {
        first.push(events.next().await.unwrap().unwrap());
    }
    drop(events);
    assert_eq!(first[4].id, "5");

    // Resume on node 1: events 6.. follow live, then [DONE].
    let (status, rest) = c.stream_bytes(1, &events_url, Some("5")).await;
    assert_eq!(status, 200);
    assert!(rest.starts_with("id: 6\n"), "{}", &rest[..rest.len().min(80)]);
    assert!(rest.ends_with("data: [DONE]\n\n"));
    let (_, whole) = c.stream_bytes(2, &events_url, None).await;
    assert!(whole.ends_with(&rest), "the resumed part is the tail of the whole stream");

    // A reader that has everything gets 204 on any node.
    for node in 0..3 {
        assert_eq!(c.stream_bytes(node, &events_url, Some("42")).await.0, 204);
    }
}

async fn stop_and_delete_sent_to_another_node_drop_the_upstream_call_at_once() {
    let c = cluster(&[]).await;
    let stopped = c.create(0, "stream-chatgpt", slow(2000)).await;
    let deleted = c.create(0, "async-chatgpt", slow(2000)).await;
    let status_url = endpoint(&stopped, "status_url");
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.document(1, &status_url).await["status"] != "streaming" {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let started = Instant::now();
    let response = c.client.post(local(&c.nodes[1], &endpoint(&stopped, "stop_url"))).send().await.unwrap();
    let took = started.elapsed();
    assert_eq!(response.status(), 200);
    assert!(took < Duration::from_secs(1), "stop through another node took {took:?}");
    assert_eq!(c.document(2, &status_url).await["status"], "stop", "stopped, on every node at once");

    let deleted_url = endpoint(&deleted, "status_url");
    let started = Instant::now();
    let response = c.client.delete(local(&c.nodes[2], &deleted_url)).send().await.unwrap();
    let took = started.elapsed();
    assert_eq!(response.status(), 200);
    assert!(took < Duration::from_secs(1), "delete through another node took {took:?}");
    for node in 0..3 {
        assert_eq!(c.client.get(local(&c.nodes[node], &deleted_url)).send().await.unwrap().status(), 404);
    }
    // The mock saw both connections dropped by offload.
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.mock_stats().await["disconnected"].as_u64().unwrap() < 2 {
        assert!(Instant::now() < deadline, "the upstream calls were not dropped: {}", c.mock_stats().await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A webhook receiver that records every delivery.
async fn receiver() -> (String, Arc<Mutex<Vec<String>>>) {
    let hits: Arc<Mutex<Vec<String>>> = Arc::default();
    async fn hook(State(hits): State<Arc<Mutex<Vec<String>>>>, body: String) -> axum::http::StatusCode {
        hits.lock().push(body);
        axum::http::StatusCode::NO_CONTENT
    }
    let app = axum::Router::new().route("/hook", axum::routing::post(hook)).with_state(hits.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, hits)
}

async fn a_killed_nodes_requests_end_as_interrupted_on_the_survivors_with_their_webhook_sent_once() {
    let mut c = cluster(&["--allow-private-webhooks"]).await;
    let (hook, hits) = receiver().await;
    let mut body = slow(2000);
    body["webhook_url"] = json!(hook);
    let created = c.create(0, "stream-chatgpt", body).await;
    let status_url = endpoint(&created, "status_url");
    let deadline = Instant::now() + Duration::from_secs(10);
    let seen = loop {
        let doc = c.document(1, &status_url).await;
        if content(&doc).split_whitespace().count() >= 10 {
            break content(&doc);
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Let the chunks seen be flushed (10 ms here), then kill the node doing the work.
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.nodes[0].kill();
    let killed = Instant::now();

    // Ended within about 1.2 leases (2 s here) plus a probe, by a survivor, with the text kept.
    let doc = c.wait_final(1, &status_url, Duration::from_secs(10)).await;
    let took = killed.elapsed();
    assert_eq!(doc["status"], "error");
    assert_eq!(doc["error"]["code"], "interrupted");
    assert!(content(&doc).starts_with(&seen), "the text received before the crash is kept");
    assert!(took < Duration::from_secs(6), "noticed after {took:?}");

    // The webhook is sent once, by one survivor.
    let deadline = Instant::now() + Duration::from_secs(10);
    while hits.lock().is_empty() {
        assert!(Instant::now() < deadline, "no webhook");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(hits.lock().len(), 1, "one delivery");
    // The same on every survivor (compared once the webhook is delivered: its `webhook` object moves on its own,
    // from pending to delivered, and two reads a moment apart could see it at two steps).
    let doc = c.document(1, &status_url).await;
    assert_eq!(c.document(2, &status_url).await, doc, "the same on every survivor");
}

async fn restarting_a_node_never_ends_the_requests_another_node_runs() {
    let mut c = cluster(&[]).await;
    let created: Vec<Value> =
        futures_util::future::join_all((0..3).map(|_| c.create(0, "stream-chatgpt", slow(120)))).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Node 1 dies and comes back (as a new node) while node 0's requests run; so does node 2, gracefully.
    c.nodes[1].kill();
    c.nodes[1] = start(&c.db, c.mock.api_base().as_ref(), &[]);
    let graceful = c.nodes[2].child.id();
    Command::new("kill").args(["-TERM", &graceful.to_string()]).status().unwrap();
    let _ = c.nodes[2].child.wait();
    c.nodes[2] = start(&c.db, c.mock.api_base().as_ref(), &[]);
    for created in &created {
        let doc = c.wait_final(1, &endpoint(created, "status_url"), Duration::from_secs(30)).await;
        assert_eq!(doc["status"], "done", "{}", doc["error"]);
    }
}

/// `n` creates at once with `key`, spread round-robin over the three nodes; the status of each.
async fn spread(c: &Cluster, key: &str, body: &Value, n: usize) -> Vec<u16> {
    let calls =
        (0..n).map(|i| c.client.post(c.nodes[i % 3].url("/v1/stream-chatgpt")).bearer_auth(key).json(body).send());
    futures_util::future::join_all(calls).await.into_iter().map(|r| r.unwrap().status().as_u16()).collect()
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

async fn every_key_limit_is_exact_with_creates_spread_over_three_nodes() {
    let mut c = cluster(&[]).await;
    let daily = create_key(&c.db.url, "daily", &["--requests-per-day", "30"]);
    let parallel = create_key(&c.db.url, "parallel", &["--max-in-flight", "4"]);
    let rated = create_key(&c.db.url, "rated", &["--rate", "0.1"]);
    let quick = json!({"messages": [{"role": "user", "content": "hi"}]});
    let statuses = spread(&c, &daily, &quick, 120).await;
    assert_eq!((count(&statuses, 200), count(&statuses, 429)), (30, 90), "the day quota");
    let statuses = spread(&c, &rated, &quick, 90).await;
    assert_eq!((count(&statuses, 200), count(&statuses, 429)), (1, 89), "the rate: one token in the bucket");
    let statuses = spread(&c, &parallel, &slow(2000), 90).await;
    assert_eq!((count(&statuses, 200), count(&statuses, 429)), (4, 86), "the in-flight limit");

    // The slots of a node that dies are given back once it is noticed: the key can run again. The node that
    // survives is the one running the fewest of the four (call `i` went to node `i % 3`), so that the others hold
    // at least one slot whatever the burst's order.
    let on = |node: usize| statuses.iter().enumerate().filter(|(i, s)| i % 3 == node && **s == 200).count();
    let survivor = (0..3).min_by_key(|node| on(*node)).unwrap();
    for node in (0..3).filter(|node| *node != survivor) {
        c.nodes[node].kill();
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let call = c.client.post(c.nodes[survivor].url("/v1/stream-chatgpt")).bearer_auth(&parallel).json(&slow(2000));
        let status = call.send().await.unwrap().status().as_u16();
        if status == 200 {
            break;
        }
        assert_eq!(status, 429);
        assert!(Instant::now() < deadline, "the dead nodes' slots were never given back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn a_node_frozen_past_its_lease_never_ends_the_requests_of_others_when_it_wakes() {
    let c = cluster(&[]).await;
    // Node 0 runs requests for a few seconds; node 1 freezes for longer than a lease, then wakes.
    let created: Vec<Value> =
        futures_util::future::join_all((0..3).map(|_| c.create(0, "stream-chatgpt", slow(200)))).await;
    let frozen = c.nodes[1].child.id().to_string();
    Command::new("kill").args(["-STOP", &frozen]).status().unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    Command::new("kill").args(["-CONT", &frozen]).status().unwrap();
    // Once awake it serves again (as a node that joined anew if it was taken for dead), and node 0's requests
    // finish `done` as if nothing happened.
    for created in &created {
        let doc = c.wait_final(1, &endpoint(created, "status_url"), Duration::from_secs(30)).await;
        assert_eq!(doc["status"], "done", "{}", doc["error"]);
    }
    let health = c.client.get(c.nodes[1].url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}

/// Issue 18: the Responses API on any node for a response running on another: polled, streamed and resumed with
/// `starting_after`, cancelled (twice), continued with `previous_response_id`, its input items listed.
async fn a_response_running_on_one_node_is_served_cancelled_and_continued_by_the_others() {
    let c = cluster(&[]).await;
    let post = |node: usize, path: String, body: Value| {
        let request = c.client.post(c.nodes[node].url(&path)).json(&body);
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200, "{path}");
            response.json::<Value>().await.unwrap()
        }
    };
    let get = |node: usize, path: String| {
        let request = c.client.get(c.nodes[node].url(&path));
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200, "{path}");
            response.text().await.unwrap()
        }
    };
    let body = json!({"input": "hi", "background": true, "mock": {"words": 2000, "delay_ms": 25}});
    let created = post(0, "/v1/responses".into(), body).await;
    let id = created["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let object: Value = serde_json::from_str(&get(1, format!("/v1/responses/{id}")).await).unwrap();
        let text = object["output"][0]["content"][0]["text"].as_str().unwrap_or("").to_owned();
        if text.split_whitespace().count() >= 3 {
            assert_eq!(object["status"], "in_progress");
            break;
        }
        assert!(Instant::now() < deadline, "no output in time: {object}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Resumed on a third node after sequence number 2: the events from 3 on, contiguous, live.
    let response = c.client.get(c.nodes[2].url(&format!("/v1/responses/{id}?stream=true&starting_after=2"))).send();
    let mut events = response.await.unwrap().bytes_stream().eventsource();
    let mut expected = 3;
    while expected < 8 {
        let event = tokio::time::timeout(Duration::from_secs(5), events.next()).await.unwrap().unwrap().unwrap();
        let data: Value = serde_json::from_str(&event.data).unwrap();
        assert_eq!(data["sequence_number"], expected, "{data}");
        assert_eq!(event.event, data["type"].as_str().unwrap());
        expected += 1;
    }
    drop(events);

    let started = Instant::now();
    let cancelled = post(1, format!("/v1/responses/{id}/cancel"), json!({})).await;
    assert!(started.elapsed() < Duration::from_secs(1), "cancel through another node took {:?}", started.elapsed());
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    let again = post(2, format!("/v1/responses/{id}/cancel"), json!({})).await;
    assert_eq!(again, cancelled, "a second cancel answers the same");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for node in 0..3 {
        let object: Value = serde_json::from_str(&get(node, format!("/v1/responses/{id}")).await).unwrap();
        assert_eq!(object, cancelled, "cancelled, the same on every node");
    }
    let replays: Vec<String> =
        futures_util::future::join_all((0..3).map(|node| get(node, format!("/v1/responses/{id}?stream=true")))).await;
    assert!(replays.iter().all(|r| *r == replays[0]), "a replay is the same bytes on every node");

    let next = post(2, "/v1/responses".into(), json!({"input": "and then?", "previous_response_id": id})).await;
    assert_eq!(next["status"], "completed", "{next}");
    assert_eq!(next["previous_response_id"], id.as_str());
    let received: Value =
        c.client.get(format!("http://{}/_mock/requests", c.mock.addr())).send().await.unwrap().json().await.unwrap();
    let last = received.as_array().unwrap().last().unwrap().clone();
    let input = last["body"]["input"].as_array().cloned().unwrap_or_default();
    assert!(input.len() >= 3, "the upstream got the earlier turn, then the new input: {last}");
    let next_id = next["id"].as_str().unwrap();
    let items: Value = serde_json::from_str(&get(0, format!("/v1/responses/{next_id}/input_items")).await).unwrap();
    assert_eq!(items["data"].as_array().unwrap().len(), 1, "only its own input: {items}");
    assert_eq!(items["data"][0]["content"][0]["text"], "and then?");
}

fn main() -> std::process::ExitCode {
    use support::harness::{Flavor, test};
    let on_postgres = support::postgres::needed;
    support::harness::run(vec![
        test(
            "a_response_running_on_one_node_is_served_cancelled_and_continued_by_the_others",
            Flavor::MultiThread,
            on_postgres,
            a_response_running_on_one_node_is_served_cancelled_and_continued_by_the_others,
        ),
        test(
            "a_request_created_on_one_node_is_followed_on_a_second_and_polled_on_a_third",
            Flavor::MultiThread,
            on_postgres,
            a_request_created_on_one_node_is_followed_on_a_second_and_polled_on_a_third,
        ),
        test(
            "a_reader_resumes_on_another_node_with_last_event_id_and_gets_204_at_the_end",
            Flavor::MultiThread,
            on_postgres,
            a_reader_resumes_on_another_node_with_last_event_id_and_gets_204_at_the_end,
        ),
        test(
            "stop_and_delete_sent_to_another_node_drop_the_upstream_call_at_once",
            Flavor::MultiThread,
            on_postgres,
            stop_and_delete_sent_to_another_node_drop_the_upstream_call_at_once,
        ),
        test(
            "a_killed_nodes_requests_end_as_interrupted_on_the_survivors_with_their_webhook_sent_once",
            Flavor::MultiThread,
            on_postgres,
            a_killed_nodes_requests_end_as_interrupted_on_the_survivors_with_their_webhook_sent_once,
        ),
        test(
            "restarting_a_node_never_ends_the_requests_another_node_runs",
            Flavor::MultiThread,
            on_postgres,
            restarting_a_node_never_ends_the_requests_another_node_runs,
        ),
        test(
            "every_key_limit_is_exact_with_creates_spread_over_three_nodes",
            Flavor::MultiThread,
            on_postgres,
            every_key_limit_is_exact_with_creates_spread_over_three_nodes,
        ),
        test(
            "a_node_frozen_past_its_lease_never_ends_the_requests_of_others_when_it_wakes",
            Flavor::MultiThread,
            on_postgres,
            a_node_frozen_past_its_lease_never_ends_the_requests_of_others_when_it_wakes,
        ),
    ])
}
