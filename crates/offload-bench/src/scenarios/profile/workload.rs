//! The workloads the profiled server runs, over HTTP: async lifecycles, status reads of a done request, and
//! streams.

use super::STARTUP;
use crate::scenarios::{create_body, create_stream, get, open, read_stream};
use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Words of the mock's answer in a lifecycle.
const LIFECYCLE_WORDS: usize = 4;
/// Pause between two status reads of a lifecycle.
const POLL: Duration = Duration::from_millis(10);
/// How long one lifecycle, or one stream, may take under valgrind.
const UNIT_LIMIT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy)]
pub(super) enum Workload {
    Lifecycles(usize),
    Stream(usize),
    /// Reads of the status of a request that is done: what one more poll of a lifecycle costs.
    StatusReads(usize),
}

impl Workload {
    pub(super) fn name(self) -> &'static str {
        match self {
            Workload::Lifecycles(_) => "lifecycles",
            Workload::Stream(_) => "stream",
            Workload::StatusReads(_) => "status reads",
        }
    }

    pub(super) fn size(self) -> usize {
        match self {
            Workload::Lifecycles(n) | Workload::Stream(n) | Workload::StatusReads(n) => n,
        }
    }
}

/// Runs a workload; `done_url` is the status URL of a request that is done (for the status reads).
pub(super) async fn run_workload(
    client: &reqwest::Client,
    base: &str,
    workload: Workload,
    done_url: &str,
) -> Result<u64> {
    match workload {
        Workload::Lifecycles(n) => lifecycles(client, base, n).await,
        Workload::Stream(words) => stream(client, base, words).await,
        Workload::StatusReads(n) => {
            for _ in 0..n {
                let doc = read_status(client, done_url).await?;
                if doc.get("status").and_then(Value::as_str) != Some("done") {
                    bail!("the status of a done request changed: {doc}");
                }
            }
            Ok(n as u64)
        }
    }
}

async fn read_status(client: &reqwest::Client, status_url: &str) -> Result<Value> {
    client
        .get(status_url)
        .timeout(UNIT_LIMIT)
        .send()
        .await
        .context("GET status")?
        .error_for_status()
        .context("GET status")?
        .json()
        .await
        .context("reading the status")
}

/// `n` async lifecycles, one at a time. Returns how many status reads they took.
pub(super) async fn lifecycles(client: &reqwest::Client, base: &str, n: usize) -> Result<u64> {
    let mut reads = 0;
    for _ in 0..n {
        reads += lifecycle(client, base).await?.0;
    }
    Ok(reads)
}

/// One async lifecycle: create (4 words, no delay), then read the status until `done`. Returns how many status
/// reads it took and the status URL.
pub(super) async fn lifecycle(client: &reqwest::Client, base: &str) -> Result<(u64, String)> {
    let body = create_body(json!({"words": LIFECYCLE_WORDS, "ttft_ms": 0, "delay_ms": 0}));
    let answer: Value = client
        .post(format!("{base}/v1/async-chatgpt"))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .timeout(UNIT_LIMIT)
        .send()
        .await
        .context("POST /v1/async-chatgpt")?
        .error_for_status()
        .context("POST /v1/async-chatgpt")?
        .json()
        .await
        .context("reading the create answer")?;
    let status_url = answer
        .pointer("/endpoints/status_url")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("the create answer has no status_url: {answer}"))?
        .to_owned();
    let deadline = Instant::now() + UNIT_LIMIT;
    let mut reads = 0;
    loop {
        let doc = read_status(client, &status_url).await?;
        reads += 1;
        match doc.get("status").and_then(Value::as_str).unwrap_or("") {
            "done" => return Ok((reads, status_url)),
            final_status @ ("error" | "stop") => bail!("a lifecycle ended {final_status}: {doc}"),
            _ if Instant::now() >= deadline => bail!("a lifecycle was not done within {UNIT_LIMIT:?}"),
            _ => tokio::time::sleep(POLL).await,
        }
    }
}

/// One stream of `words` words (no delay), read to its end by one reader. Returns the events read.
async fn stream(client: &reqwest::Client, base: &str, words: usize) -> Result<u64> {
    let body = create_body(json!({"words": words, "ttft_ms": 0, "delay_ms": 0}));
    let url = create_stream(client, base, body).await?;
    let read = read_stream(open(get(client, &url), UNIT_LIMIT).await?, false).await;
    if let Some(e) = read.error {
        bail!("the stream failed: {e}");
    }
    if !read.done || (read.events as usize) < words {
        bail!("the stream of {words} words ended after {} events (done: {})", read.events, read.done);
    }
    Ok(u64::from(read.events))
}

pub(super) async fn wait_healthy(client: &reqwest::Client, base: &str) -> Result<()> {
    let deadline = Instant::now() + STARTUP;
    loop {
        let ok = client
            .get(format!("{base}/healthz"))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("offload under valgrind did not answer /healthz within {STARTUP:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
