//! The scenarios, one module each (`profile` runs offload under valgrind instead of timing it), and what they share: creating a request, reading an event stream.
//!
//! Every scenario starts its own mock and offload processes (fresh data directory or scratch database, chosen
//! flush interval) and measures its floor, the same mock called directly with the same client code, in the same
//! run.

pub mod cluster;
pub mod concurrency;
pub mod create;
pub mod fanout;
pub mod nginx;
pub mod profile;
pub mod relay;
pub mod ttft;

use super::load::LabelScanner;
use anyhow::{Context, Result, anyhow, bail};
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What every scenario needs to start processes.
pub struct Ctx {
    pub exe: PathBuf,
    /// The build the profile's allocation counts run (`--alloc-binary`).
    pub alloc_exe: PathBuf,
    pub work_dir: PathBuf,
    /// How long to wait for other processes to leave the cores alone before each measurement.
    pub quiet_wait: Duration,
}

impl Ctx {
    /// Waits (bounded) for a quiet machine; call while our own processes are idle.
    pub async fn quiet(&self) -> Result<()> {
        if !self.quiet_wait.is_zero() {
            crate::procs::wait_quiet(self.quiet_wait).await?;
        }
        Ok(())
    }
}

/// A create body for offload with the given mock controls.
pub fn create_body(mock: Value) -> String {
    json!({"messages": [{"role": "user", "content": "benchmark"}], "mock": mock}).to_string()
}

/// The same body as a direct call to the mock (`stream` is what offload would add).
pub fn direct_body(mock: Value, stream: bool) -> String {
    json!({"messages": [{"role": "user", "content": "benchmark"}], "mock": mock, "stream": stream}).to_string()
}

/// POSTs a stream create to offload and returns its `stream_events_url`.
pub async fn create_stream(client: &reqwest::Client, base: &str, body: String) -> Result<String> {
    let response = client
        .post(format!("{base}/v1/stream-chatgpt"))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .context("POST /v1/stream-chatgpt")?;
    let status = response.status();
    let body: Value = response.json().await.context("reading the create answer")?;
    if !status.is_success() {
        bail!("create answered {status}: {body}");
    }
    body.pointer("/endpoints/stream_events_url")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("the create answer has no stream_events_url: {body}"))
}

/// Opens an event stream (offload's `.txt` or the mock's streaming answer): returns once the headers arrived.
pub async fn open(request: reqwest::RequestBuilder, timeout: Duration) -> Result<reqwest::Response> {
    let response = request.timeout(timeout).send().await.context("opening the stream")?;
    if !response.status().is_success() {
        bail!("the stream answered {}", response.status());
    }
    Ok(response)
}

/// A GET of an event stream URL.
pub fn get(client: &reqwest::Client, url: &str) -> reqwest::RequestBuilder {
    client.get(url)
}

/// A direct streaming POST to the mock (`api_base` like `http://127.0.0.1:9/v1`).
pub fn post_mock(client: &reqwest::Client, api_base: &str, body: String) -> reqwest::RequestBuilder {
    client
        .post(format!("{api_base}/chat/completions"))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
}

/// What a reader saw on one stream.
#[derive(Default)]
pub struct Read {
    /// `data: {...}` events (chunks), not counting `[DONE]`.
    pub events: u32,
    pub done: bool,
    pub first: Option<Instant>,
    pub last: Option<Instant>,
    /// Labelled chunks and when each arrived (only when asked for).
    pub labels: Vec<(u32, u32, Instant)>,
    pub error: Option<String>,
}

/// The readers of a scenario, awaited and counted.
pub struct Tally {
    /// Readers that started.
    pub attached: usize,
    /// When the last of them had started (before any was awaited).
    pub attached_at: Instant,
    /// Events delivered to all of them.
    pub events: u64,
    /// The first and the last event any of them received.
    pub first: Option<Instant>,
    pub last: Option<Instant>,
}

/// Awaits every reader that started (all within `limit` of `started`), and counts into `error_kinds` the streams
/// that failed to start, or came up short of `expected` events and `[DONE]`.
pub async fn tally_readers(
    attached: Vec<Result<tokio::task::JoinHandle<Read>, (&'static str, anyhow::Error)>>,
    started: Instant,
    limit: Duration,
    expected: u64,
    error_kinds: &mut std::collections::BTreeMap<String, u64>,
) -> Tally {
    let mut count = |kind: &str| *error_kinds.entry(kind.into()).or_default() += 1;
    let mut tasks = Vec::new();
    for outcome in attached {
        match outcome {
            Ok(task) => tasks.push(task),
            Err((kind, e)) => {
                tracing::debug!("stream failed to start: {e:#}");
                count(kind);
            }
        }
    }
    let attached = tasks.len();
    let attached_at = Instant::now();
    let mut reads: Vec<Read> = Vec::with_capacity(tasks.len());
    for task in tasks {
        match tokio::time::timeout(limit.saturating_sub(started.elapsed()), task).await {
            Ok(Ok(read)) => reads.push(read),
            Ok(Err(_)) => count("reader task"),
            Err(_) => count("timeout"),
        }
    }
    let mut events = 0;
    for read in &reads {
        events += u64::from(read.events);
        if read.error.is_some() {
            count("body");
        } else if !read.done {
            count("no [DONE]");
        } else if u64::from(read.events) != expected {
            count("wrong event count");
        }
    }
    Tally {
        attached,
        attached_at,
        events,
        first: reads.iter().filter_map(|r| r.first).min(),
        last: reads.iter().filter_map(|r| r.last).max(),
    }
}

const EVENT: &[u8] = b"data: {";
const DONE: &[u8] = b"data: [DONE]";

/// Reads a stream to its end, counting events and, with `labels`, noting when each labelled chunk arrived.
pub async fn read_stream(response: reqwest::Response, labels: bool) -> Read {
    let mut read = Read::default();
    let mut body = response.bytes_stream();
    let mut scanner = LabelScanner::default();
    let events = memchr::memmem::Finder::new(EVENT);
    // The last few bytes of the previous piece, so that a marker split across pieces is still seen once.
    let mut carry: Vec<u8> = Vec::with_capacity(64);
    while let Some(piece) = body.next().await {
        let now = Instant::now();
        let piece = match piece {
            Ok(p) => p,
            Err(e) => {
                read.error = Some(format!("body: {e}"));
                break;
            }
        };
        let mut window = std::mem::take(&mut carry);
        let seen_before = window.len();
        window.extend_from_slice(&piece);
        // Count markers that end inside the new bytes only.
        let new_events = events.find_iter(&window).filter(|&at| at + EVENT.len() > seen_before).count() as u32;
        if new_events > 0 {
            read.first.get_or_insert(now);
            read.last = Some(now);
            read.events += new_events;
        }
        if memchr::memmem::find(&window, DONE).is_some_and(|at| at + DONE.len() > seen_before) {
            read.done = true;
        }
        if labels {
            scanner.feed(&piece, |s, k| read.labels.push((s, k, now)));
        }
        let keep = window.len().saturating_sub(DONE.len());
        carry = window.split_off(keep);
    }
    read
}

/// Waits (bounded) for a status URL to report a final status.
pub async fn wait_final(client: &reqwest::Client, status_url: &str, limit: Duration) -> Result<String> {
    let deadline = Instant::now() + limit;
    loop {
        let doc: Value = client.get(status_url).send().await.context("GET status")?.json().await.context("status")?;
        let status = doc.get("status").and_then(Value::as_str).unwrap_or("").to_owned();
        if matches!(status.as_str(), "done" | "error" | "stop") {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            bail!("still {status} after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
