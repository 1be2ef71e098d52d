//! Cluster faults, caused for real, as an operator's bad day and an attacker would cause them: three real
//! `offload serve` nodes, each reaching the machine's PostgreSQL through a TCP proxy of its own that the test cuts
//! (connections dropped, and new ones refused or left unanswered) and restores; a node frozen with SIGSTOP; calls
//! carrying a forged `X-Offload-Forwarded`.
//!
//! Each test makes a database of its own on the suite's PostgreSQL (`support::postgres`: the machine's, or a
//! throwaway one) and drops it afterwards. Where there is none the tests are reported ignored with the reason
//! (`harness = false`: `support::harness`), except under CI.

#![expect(clippy::unwrap_used, reason = "a test fails loudly on anything unexpected")]

mod support;

use serde_json::{Value, json};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};
use support::Offload as Node;
use support::cluster::{PUBLIC, content, create_key, endpoint, local};
use support::postgres::Database;
use tokio::net::{TcpListener, TcpStream};

/// A TCP proxy in front of PostgreSQL that the test can cut.
struct Proxy {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    /// Bumped to end every connection open now.
    generation: tokio::sync::watch::Sender<u64>,
}

const OPEN: u8 = 0;
/// New connections are closed at once (a server that is down).
const REFUSE: u8 = 1;
/// New connections are accepted and never answered (a network that drops packets).
const BLACKHOLE: u8 = 2;

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(OPEN));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let (accept_mode, accept_generation) = (mode.clone(), generation.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut ended = accept_generation.subscribe();
                match accept_mode.load(Ordering::SeqCst) {
                    REFUSE => drop(inbound),
                    BLACKHOLE => {
                        tokio::spawn(async move {
                            let _ = ended.changed().await;
                            drop(inbound);
                        });
                    }
                    _ => {
                        tokio::spawn(async move {
                            let Ok(mut outbound) = TcpStream::connect(target).await else { return };
                            tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                                _ = ended.changed() => {}
                            }
                        });
                    }
                }
            }
        });
        Proxy { addr, mode, generation }
    }

    /// Ends every connection and refuses (or leaves unanswered) new ones.
    fn cut(&self, how: u8) {
        self.mode.store(how, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    fn restore(&self) {
        self.mode.store(OPEN, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }
}

struct Cluster {
    nodes: Vec<Node>,
    proxies: Vec<Proxy>,
    mock: offload::mock::MockServer,
    db: Database,
    client: reqwest::Client,
}

/// Three nodes, each reaching the database through a proxy of its own.
async fn cluster(lease: &str) -> Cluster {
    cluster_with(lease, [&[], &[], &[]]).await
}

/// As [`cluster`], with settings of its own for each node.
async fn cluster_with(lease: &str, extra: [&[&str]; 3]) -> Cluster {
    let db = support::postgres::database("offload_faults").await;
    let db_url = url::Url::parse(&db.url).unwrap();
    let target: SocketAddr = {
        let host = db_url.host_str().unwrap().to_owned();
        let port = db_url.port().unwrap_or(5432);
        tokio::net::lookup_host((host, port)).await.unwrap().next().unwrap()
    };
    let mock = offload::mock::spawn("127.0.0.1:0".parse().unwrap(), Default::default()).await.unwrap();
    let mut proxies = Vec::new();
    let mut nodes = Vec::new();
    for extra in extra {
        let proxy = Proxy::start(target).await;
        let mut through = db_url.clone();
        through.set_host(Some("127.0.0.1")).unwrap();
        through.set_port(Some(proxy.addr.port())).unwrap();
        let mut command = Node::command();
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--public-url", PUBLIC])
            .args(["--upstream-url", mock.api_base().as_ref(), "--store", through.as_str()])
            .args(["--node-lease", lease, "--flush-interval-ms", "10"])
            .args(extra)
            .env("OFFLOAD_LOG", "info");
        nodes.push(Node::spawn(command));
        proxies.push(proxy);
    }
    let client = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
    Cluster { nodes, proxies, mock, db, client }
}

/// A stream of `words` words, one every `delay_ms`.
fn paced(words: usize, delay_ms: u64) -> Value {
    json!({"messages": [{"role": "user", "content": "hi"}], "mock": {"words": words, "delay_ms": delay_ms}})
}

/// The events of a stream body, keep-alive comments left out (a relayed stream gets more of them).
fn events(body: &str) -> Vec<&str> {
    body.split_inclusive("\n\n").filter(|frame| !frame.starts_with(':')).collect()
}

impl Cluster {
    async fn create(&self, node: usize, body: Value) -> Value {
        let url = self.nodes[node].url("/v1/stream-chatgpt");
        let response = self.client.post(url).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    async fn document(&self, node: usize, status_url: &str) -> Value {
        support::cluster::document(&self.client, &self.nodes[node], status_url).await
    }

    async fn wait_final(&self, node: usize, status_url: &str, within: Duration) -> Value {
        support::cluster::wait_final(&self.client, &self.nodes[node], status_url, within).await
    }

    /// Waits until the request streams with some text, seen from `node`.
    async fn wait_streaming(&self, node: usize, status_url: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let doc = self.document(node, status_url).await;
            if doc["status"] == "streaming" && content(&doc).split_whitespace().count() >= 5 {
                return;
            }
            assert!(Instant::now() < deadline, "never streaming: {}", doc["status"]);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Follows a stream on `node` to its end, in a task of its own.
    fn reader(&self, node: usize, events_url: &str) -> tokio::task::JoinHandle<String> {
        let (client, url) = (self.client.clone(), local(&self.nodes[node], events_url));
        tokio::spawn(async move {
            let response = client.get(url).send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.text().await.unwrap()
        })
    }

    async fn replay(&self, node: usize, events_url: &str) -> String {
        self.client.get(local(&self.nodes[node], events_url)).send().await.unwrap().text().await.unwrap()
    }

    async fn health(&self, node: usize) -> u16 {
        match self.client.get(self.nodes[node].url("/healthz")).timeout(Duration::from_secs(5)).send().await {
            Ok(response) => response.status().as_u16(),
            Err(_) => 0,
        }
    }

    /// Waits until `/healthz` of `node` answers `status`; how long that took.
    async fn wait_health(&self, node: usize, status: u16, within: Duration) -> Duration {
        let started = Instant::now();
        loop {
            if self.health(node).await == status {
                return started.elapsed();
            }
            assert!(started.elapsed() < within, "/healthz of node {node} never answered {status}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn mock_stats(&self) -> Value {
        let url = format!("http://{}/_mock/stats", self.mock.addr());
        self.client.get(url).send().await.unwrap().json().await.unwrap()
    }
}

/// Every reader saw the same events as the stream replayed once final, and it ended with `[DONE]`.
async fn assert_replay_equals(c: &Cluster, events_url: &str, seen: &str) {
    assert!(seen.ends_with("data: [DONE]\n\n"), "the reader got the end: …{}", &seen[seen.len().saturating_sub(200)..]);
    for node in 0..3 {
        let replay = c.replay(node, events_url).await;
        assert_eq!(events(seen), events(&replay), "what a reader saw = the replay on node {node}");
    }
}

async fn a_database_outage_longer_than_a_lease_ends_no_stream_and_loses_nothing_a_reader_saw() {
    let c = cluster("3s").await;
    // Each node runs a stream of about 24 s; each is read on its owner and, relayed, on the next node.
    let mut streams = Vec::new();
    for node in 0..3 {
        let created = c.create(node, paced(600, 40)).await;
        let (status_url, events_url) = (endpoint(&created, "status_url"), endpoint(&created, "stream_events_url"));
        let readers = [c.reader(node, &events_url), c.reader((node + 1) % 3, &events_url)];
        streams.push((status_url, events_url, readers));
    }
    for (status_url, _, _) in &streams {
        c.wait_streaming(0, status_url).await;
    }

    // The database goes away for 15 s (five leases): existing connections drop, new ones are never answered.
    let cut = Instant::now();
    for proxy in &c.proxies {
        proxy.cut(BLACKHOLE);
    }
    for node in 0..3 {
        c.wait_health(node, 503, Duration::from_secs(10)).await;
        let took = cut.elapsed();
        eprintln!("node {node}: /healthz said 503 {took:?} after the cut");
        assert!(took < Duration::from_secs(5), "/healthz of node {node} said 503 only after {took:?}");
    }
    // New requests are refused at once while the store cannot take them.
    let started = Instant::now();
    let refused = c.client.post(c.nodes[0].url("/v1/stream-chatgpt")).json(&paced(3, 1)).send().await.unwrap();
    assert_eq!(refused.status(), 503);
    eprintln!("a create was refused in {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(2), "a create waited {:?} to be refused", started.elapsed());
    // Running requests are served from memory meanwhile by their owners: their documents keep growing. (Another
    // node cannot look up where a request runs without the store: it answers 503 soon, never hangs.)
    let during = content(&c.document(0, &streams[0].0).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(content(&c.document(0, &streams[0].0).await).len() > during.len(), "the text grows through the outage");
    let started = Instant::now();
    let elsewhere = c.client.get(local(&c.nodes[1], &streams[0].0)).send().await.unwrap();
    assert_eq!(elsewhere.status(), 503, "a lookup without the store");
    let error: Value = elsewhere.json().await.unwrap();
    assert_eq!(error["error"]["code"], "store_unavailable", "{error}");
    assert!(started.elapsed() < Duration::from_secs(7), "a lookup on another node took {:?}", started.elapsed());

    tokio::time::sleep(Duration::from_secs(15).saturating_sub(cut.elapsed())).await;
    for proxy in &c.proxies {
        proxy.restore();
    }
    let restored = Instant::now();
    for node in 0..3 {
        c.wait_health(node, 200, Duration::from_secs(15)).await;
        eprintln!("node {node}: /healthz said 200 {:?} after the database came back", restored.elapsed());
    }

    for (status_url, events_url, readers) in streams {
        let doc = c.wait_final(1, &status_url, Duration::from_secs(90)).await;
        assert_eq!(doc["status"], "done", "{}", doc["error"]);
        for reader in readers {
            let seen = reader.await.unwrap();
            assert_replay_equals(&c, &events_url, &seen).await;
        }
    }
}

async fn a_node_cut_off_from_the_database_for_four_leases_keeps_its_request_and_its_key_slot() {
    let c = cluster("2s").await;
    let key = create_key(&c.db.url, "one-at-a-time", &["--max-in-flight", "1"]);
    let body = paced(400, 40);
    let response =
        c.client.post(c.nodes[0].url("/v1/stream-chatgpt")).bearer_auth(&key).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let created: Value = response.json().await.unwrap();
    let (status_url, events_url) = (endpoint(&created, "status_url"), endpoint(&created, "stream_events_url"));
    let readers = [c.reader(0, &events_url), c.reader(1, &events_url)];
    c.wait_streaming(2, &status_url).await;

    // Node 0 loses the database (its connections drop, new ones are refused) for 9 s: four and a half leases.
    let cut = Instant::now();
    c.proxies[0].cut(REFUSE);
    let took = c.wait_health(0, 503, Duration::from_secs(10)).await;
    assert!(took < Duration::from_secs(5), "/healthz said 503 only after {took:?}");
    assert_eq!(c.health(1).await, 200, "the other nodes are healthy");
    tokio::time::sleep(Duration::from_secs(9).saturating_sub(cut.elapsed())).await;

    // The others still see it alive: its request runs (relayed status), and its key's slot is still held.
    assert_eq!(c.document(2, &status_url).await["status"], "streaming");
    let again = c.client.post(c.nodes[1].url("/v1/stream-chatgpt")).bearer_auth(&key).json(&body).send().await.unwrap();
    assert_eq!(again.status(), 429, "the key's one in-flight slot is still held by the running request");
    c.proxies[0].restore();
    c.wait_health(0, 200, Duration::from_secs(15)).await;

    let doc = c.wait_final(2, &status_url, Duration::from_secs(60)).await;
    assert_eq!(doc["status"], "done", "nobody ended it: {}", doc["error"]);
    for reader in readers {
        let seen = reader.await.unwrap();
        assert_replay_equals(&c, &events_url, &seen).await;
    }
}

async fn a_frozen_owner_never_hangs_a_status_stop_delete_or_stream_through_another_node() {
    let c = cluster("15s").await;
    let created = c.create(0, paced(300, 40)).await;
    let (status_url, events_url) = (endpoint(&created, "status_url"), endpoint(&created, "stream_events_url"));
    let relayed = c.reader(1, &events_url);
    c.wait_streaming(2, &status_url).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The owner freezes for 6 s: less than a lease, so it is not taken for dead.
    let owner = c.nodes[0].child.id().to_string();
    Command::new("kill").args(["-STOP", &owner]).status().unwrap();
    let frozen = Instant::now();

    // Status, stop and DELETE through the other nodes, at once: each answers within a few seconds.
    let timed = |request: reqwest::RequestBuilder| async move {
        let started = Instant::now();
        let response = request.send().await.unwrap();
        let took = started.elapsed();
        (response.status().as_u16(), response.text().await.unwrap(), took)
    };
    let ((status, doc, status_took), (stop, _, stop_took), (delete, _, delete_took)) = tokio::join!(
        timed(c.client.get(local(&c.nodes[1], &status_url))),
        timed(c.client.post(local(&c.nodes[2], &endpoint(&created, "stop_url")))),
        timed(c.client.delete(local(&c.nodes[1], &status_url))),
    );
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&doc).unwrap();
    assert!(["posting", "streaming"].contains(&doc["status"].as_str().unwrap()), "the store's view: {}", doc["status"]);
    assert_eq!(stop, 503, "only the owner can stop it");
    assert_eq!(delete, 503, "never deleted while it runs");
    for took in [status_took, stop_took, delete_took] {
        assert!(took < Duration::from_secs(5), "a call through another node took {took:?}");
    }

    tokio::time::sleep(Duration::from_secs(6).saturating_sub(frozen.elapsed())).await;
    Command::new("kill").args(["-CONT", &owner]).status().unwrap();

    // On waking, the owner reads the stop and DELETE that were waiting for it, and refuses them: they were answered
    // 503 already. Its request runs to its end, and the reader that followed it through node 1 got every event.
    let doc = c.wait_final(2, &status_url, Duration::from_secs(60)).await;
    assert_eq!(doc["status"], "done", "{}", doc["error"]);
    let seen = relayed.await.unwrap();
    assert_replay_equals(&c, &events_url, &seen).await;
}

async fn a_forged_forwarded_header_never_makes_a_node_skip_the_owner() {
    let c = cluster("10s").await;
    let running = c.create(0, paced(2000, 25)).await;
    let status_url = endpoint(&running, "status_url");
    c.wait_streaming(1, &status_url).await;

    // A plain `1`, and a mark shaped like a real one: both are ignored, and node 1 relays to the owner as usual.
    let mark = format!("v1.{}.{}.{}", uuid::Uuid::new_v4(), 1_700_000_000_000u64, "ab".repeat(32));
    for forged in ["1", mark.as_str()] {
        let doc = c.client.get(local(&c.nodes[1], &status_url)).header("X-Offload-Forwarded", forged);
        let doc: Value = doc.send().await.unwrap().json().await.unwrap();
        assert_eq!(doc["status"], "streaming", "the owner's live view");
    }
    let before = c.mock_stats().await["disconnected"].as_u64().unwrap();
    let response =
        c.client.delete(local(&c.nodes[1], &status_url)).header("X-Offload-Forwarded", "1").send().await.unwrap();
    assert_eq!(response.status(), 200);
    // The owner ended the request and dropped its upstream call before anything was deleted: no node knows it any
    // more, the owner included, and nothing streams on.
    for node in 0..3 {
        let status = c.client.get(local(&c.nodes[node], &status_url)).send().await.unwrap().status();
        assert_eq!(status, 404, "node {node}");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.mock_stats().await["disconnected"].as_u64().unwrap() <= before {
        assert!(Instant::now() < deadline, "the owner still calls the upstream");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn past_the_outage_bounds_running_requests_end_as_store_unavailable_once_the_database_is_back() {
    // Node 0 may hold 1 MB of writes; node 1 may ride out 2 s of outage.
    let c = cluster_with("10s", [&["--outage-buffer-mb", "1"], &["--outage-limit", "2s"], &[]]).await;
    // On node 0, 30 chunks of 60 kB, one every 200 ms; on node 1, small chunks for about 20 s.
    let big = format!("{} ", "x".repeat(60_000)).repeat(30);
    let heavy = json!({"messages": [{"role": "user", "content": "hi"}], "mock": {"content": big, "delay_ms": 200}});
    let created = [c.create(0, heavy).await, c.create(1, paced(500, 40)).await];
    let mut streams = Vec::new();
    for (node, created) in created.iter().enumerate() {
        let (status_url, events_url) = (endpoint(created, "status_url"), endpoint(created, "stream_events_url"));
        let reader = c.reader(node, &events_url);
        c.wait_streaming(node, &status_url).await;
        streams.push((node, status_url, events_url, reader));
    }
    let before = c.mock_stats().await["disconnected"].as_u64().unwrap();
    c.proxies[0].cut(REFUSE);
    c.proxies[1].cut(REFUSE);

    // Past its bound, each node drops its upstream call (no more memory, no more tokens)...
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.mock_stats().await["disconnected"].as_u64().unwrap() < before + 2 {
        assert!(Instant::now() < deadline, "the upstream calls were not dropped: {}", c.mock_stats().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...but shows nothing final while that end cannot be stored.
    for (node, status_url, _, _) in &streams {
        let doc = c.document(*node, status_url).await;
        assert_eq!(doc["status"], "streaming", "nothing final before it is durable");
    }
    c.proxies[0].restore();
    c.proxies[1].restore();

    for (node, status_url, events_url, reader) in streams {
        let doc = c.wait_final(2, &status_url, Duration::from_secs(30)).await;
        assert_eq!(doc["status"], "error", "node {node}");
        assert_eq!(doc["error"]["code"], "store_unavailable", "node {node}");
        assert!(!content(&doc).is_empty(), "the text received is kept");
        let seen = reader.await.unwrap();
        assert!(seen.contains("event: error\n"), "the reader was told how it ended");
        assert_replay_equals(&c, &events_url, &seen).await;
    }
}

fn main() -> std::process::ExitCode {
    use support::harness::{Flavor, test};
    support::harness::run(vec![
        test(
            "a_database_outage_longer_than_a_lease_ends_no_stream_and_loses_nothing_a_reader_saw",
            Flavor::MultiThread,
            support::postgres::needed,
            a_database_outage_longer_than_a_lease_ends_no_stream_and_loses_nothing_a_reader_saw,
        ),
        test(
            "a_node_cut_off_from_the_database_for_four_leases_keeps_its_request_and_its_key_slot",
            Flavor::MultiThread,
            support::postgres::needed,
            a_node_cut_off_from_the_database_for_four_leases_keeps_its_request_and_its_key_slot,
        ),
        test(
            "a_frozen_owner_never_hangs_a_status_stop_delete_or_stream_through_another_node",
            Flavor::MultiThread,
            support::postgres::needed,
            a_frozen_owner_never_hangs_a_status_stop_delete_or_stream_through_another_node,
        ),
        test(
            "a_forged_forwarded_header_never_makes_a_node_skip_the_owner",
            Flavor::MultiThread,
            support::postgres::needed,
            a_forged_forwarded_header_never_makes_a_node_skip_the_owner,
        ),
        test(
            "past_the_outage_bounds_running_requests_end_as_store_unavailable_once_the_database_is_back",
            Flavor::MultiThread,
            support::postgres::needed,
            past_the_outage_bounds_running_requests_end_as_store_unavailable_once_the_database_is_back,
        ),
    ])
}
