//! For the cluster suites (`tests/cluster.rs`, `tests/cluster_faults.rs`): nodes that share one public URL, each
//! reached on its own port, and what both suites ask of them.

use super::Offload;
use serde_json::Value;
use std::time::{Duration, Instant};

/// The public URL every node of a test cluster hands out.
pub const PUBLIC: &str = "http://offload.test";

/// The URL of `node` for a public URL handed out by any node.
pub fn local(node: &Offload, public_url: &str) -> String {
    public_url.replacen(PUBLIC, &format!("http://{}", node.addr), 1)
}

pub fn endpoint(created: &Value, name: &str) -> String {
    created["endpoints"][name].as_str().unwrap().to_owned()
}

/// The reply's text so far, from a status document.
pub fn content(doc: &Value) -> String {
    doc["response"]["body"]["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_owned()
}

/// The status document, read from `node`.
pub async fn document(client: &reqwest::Client, node: &Offload, status_url: &str) -> Value {
    let response = client.get(local(node, status_url)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// The status document once final, polled on `node` for at most `within`.
pub async fn wait_final(client: &reqwest::Client, node: &Offload, status_url: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let doc = document(client, node, status_url).await;
        if matches!(doc["status"].as_str(), Some("done" | "error" | "stop")) {
            return doc;
        }
        assert!(Instant::now() < deadline, "not final in time: {}", doc["status"]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A service key made with `offload keys create` on the store at `store_url`; returns it.
pub fn create_key(store_url: &str, name: &str, limits: &[&str]) -> String {
    let out = Offload::command()
        .args(["keys", "create", "--name", name, "--store", store_url])
        .args(limits)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().split_whitespace().find(|w| w.starts_with("ofk_")).unwrap().to_owned()
}
