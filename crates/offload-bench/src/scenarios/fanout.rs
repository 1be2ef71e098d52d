//! Scenario 5, fan-out: one streaming request followed by N readers.
//!
//! The mock holds the first chunk back until all N readers are attached, so the memory reading then is N idle
//! readers; after that it sends 32 labelled chunks 100 ms apart, and every reader's delivery delay per chunk is
//! measured from the tap's instant (as in the relay scenario). Floor: one direct reader of the mock through the
//! tap, streaming at the same time.

use super::{Ctx, Read, create_body, create_stream, direct_body, get, open, post_mock, read_stream};
use crate::Http;
use crate::load::{Clients, Hist, Summary, bounded, h1_client, labels};
use crate::procs::{DataDir, Proc, Usage, wait_idle};
use crate::tap::Tap;
use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::json;
use std::time::{Duration, Instant};

const WORDS: u32 = 32;
const DELAY_MS: u64 = 100;
const ATTACH_CONCURRENCY: usize = 256;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Fanout {
    pub http: String,
    pub readers: usize,
    pub hold_ms: u64,
    pub attached: usize,
    pub attach_secs: f64,
    /// Whether the first chunk was sent only after every reader was attached (the RSS reading is of idle
    /// readers).
    pub idle_when_measured: bool,
    pub rss_before_readers_kib: u64,
    pub rss_idle_kib: u64,
    /// (RSS with N idle readers - RSS before them) / N, in bytes.
    pub rss_per_idle_reader_bytes: f64,
    pub delivery: Summary,
    pub floor: Summary,
    pub added_p99_us: f64,
    /// From the first chunk sent to the last reader's `[DONE]`.
    pub all_done_secs: f64,
    pub errors: u64,
    pub unmatched: u64,
    pub server_cores: f64,
    pub bench_cores: f64,
    /// CPU used by other processes on the machine meanwhile.
    pub foreign_cores: f64,
    pub open_fds_at_hold: usize,
}

pub fn hold_ms(readers: usize) -> u64 {
    3_000 + readers as u64
}

pub async fn run(ctx: &Ctx, readers: usize, http: Http) -> Result<Fanout> {
    let mock = Proc::mock(&ctx.exe).await?;
    let tap = Tap::start(mock.addr).await?;
    let dir = DataDir::new(&ctx.work_dir, &format!("fanout-{readers}-{http}"))?;
    let offload = Proc::offload(&ctx.exe, dir.path(), &tap.api_base(), 50).await?;
    let base = offload.base_url();
    let creates = h1_client()?;
    let clients = crate::load::Clients::new(http, readers)?;
    if let Clients::H2(pool) = &clients {
        for i in 0..pool.connections() {
            let _ = pool.get(i).get(format!("{base}/healthz")).send().await;
        }
    }
    // Warm the whole path once.
    let url = create_stream(&creates, &base, create_body(json!({"words": 2}))).await?;
    read_stream(open(get(clients.get(0), &url), Duration::from_secs(10)).await?, false).await;
    wait_idle(&creates, &base, Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ctx.quiet().await?;

    let hold = hold_ms(readers);
    let (id, direct_id) = (1, 2);
    let mut result = Fanout { http: http.to_string(), readers, hold_ms: hold, ..Default::default() };
    let usage = Usage::start(&[offload.pid, std::process::id(), mock.pid])?;
    let url = create_stream(
        &creates,
        &base,
        create_body(json!({"content": labels(id, WORDS), "delay_ms": DELAY_MS, "ttft_ms": hold})),
    )
    .await?;
    let floor_controls = json!({"content": labels(direct_id, WORDS), "delay_ms": DELAY_MS, "ttft_ms": hold});
    let floor_response =
        open(post_mock(clients.get(0), &tap.api_base(), direct_body(floor_controls, true)), Duration::from_secs(120))
            .await?;
    let floor_task = tokio::spawn(read_stream(floor_response, true));
    tokio::time::sleep(Duration::from_millis(200)).await;
    result.rss_before_readers_kib = offload.rss_kib()?;

    let started = Instant::now();
    let read_limit = Duration::from_millis(hold) + Duration::from_secs(120);
    let attached = bounded(readers, ATTACH_CONCURRENCY, |i| {
        let (client, url) = (clients.get(i), url.as_str());
        async move { open(get(client, url), read_limit).await.map(|r| tokio::spawn(read_stream(r, true))) }
    })
    .await;
    result.attach_secs = started.elapsed().as_secs_f64();
    // Let the server finish the work of the last attaches before reading its memory.
    tokio::time::sleep(Duration::from_millis(300)).await;
    result.idle_when_measured = tap.mark(id, 0).is_none();
    result.rss_idle_kib = offload.rss_kib()?;
    result.open_fds_at_hold = offload.open_fds();
    result.rss_per_idle_reader_bytes =
        result.rss_idle_kib.saturating_sub(result.rss_before_readers_kib) as f64 * 1024.0 / readers.max(1) as f64;

    let mut tasks = Vec::new();
    for outcome in attached {
        match outcome {
            Ok(task) => tasks.push(task),
            Err(e) => {
                tracing::debug!("reader failed to attach: {e:#}");
                result.errors += 1;
            }
        }
    }
    result.attached = tasks.len();
    let mut delivery = Hist::new()?;
    let mut last_done: Option<Instant> = None;
    for task in tasks {
        let read: Read = match tokio::time::timeout(read_limit.saturating_sub(started.elapsed()), task).await {
            Ok(Ok(read)) => read,
            _ => {
                result.errors += 1;
                continue;
            }
        };
        if read.error.is_some() || !read.done || read.labels.len() != WORDS as usize {
            result.errors += 1;
        }
        last_done = last_done.max(read.last);
        for (stream, index, received) in read.labels {
            match tap.mark(stream, index) {
                Some(sent) => delivery.record(received.saturating_duration_since(sent)),
                None => result.unmatched += 1,
            }
        }
    }
    let floor_read = floor_task.await.context("the floor reader")?;
    let mut floor = Hist::new()?;
    for (stream, index, received) in floor_read.labels {
        if let Some(sent) = tap.mark(stream, index) {
            floor.record(received.saturating_duration_since(sent));
        }
    }
    if let (Some(first_sent), Some(last)) = (tap.mark(id, 0), last_done) {
        result.all_done_secs = last.saturating_duration_since(first_sent).as_secs_f64();
    }
    let usage = usage.report()?;
    result.server_cores = usage.cores[0];
    result.bench_cores = usage.cores[1];
    result.foreign_cores = usage.foreign_cores;
    result.delivery = delivery.summary();
    result.floor = floor.summary();
    result.added_p99_us = result.delivery.p99_us - result.floor.p99_us;
    offload.stop().await?;
    mock.stop().await?;
    Ok(result)
}
