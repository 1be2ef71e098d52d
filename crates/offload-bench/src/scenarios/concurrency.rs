//! Scenario 4, concurrency: N streaming requests in flight at once, each with one reader; the mock paces 64
//! chunks 20 ms apart (`"words": 62`: a role chunk, 62 words, a finish chunk).
//!
//! The mock holds the first chunk back (`ttft_ms`) long enough for all N requests to be created and attached,
//! so the memory reading at that moment is N requests in flight with a reader each, and the streaming phase
//! then runs all of them together. Readers use HTTP/2 (h2c) over a few connections: over HTTP/1.1, N readers
//! plus N upstream connections would not fit offload's open-file limit of 20,000 at N = 10,000. Floor: the same
//! N streams read from the mock directly with the same client code.

use super::{Ctx, create_body, create_stream, direct_body, get, open, post_mock, read_stream};
use crate::load::{H2Pool, bounded, h1_client};
use crate::procs::{DataDir, Proc, RssPeak, Usage, in_flight, persisted_events, thread_cpu, wait_idle};
use anyhow::Result;
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub const EVENTS_PER_STREAM: u64 = 64;
const ATTACH_CONCURRENCY: usize = 256;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Concurrency {
    /// `floor` (the mock directly) or `offload`.
    pub target: String,
    pub flush_interval_ms: Option<u64>,
    pub streams: usize,
    /// How long the mock held the first chunk back.
    pub hold_ms: u64,
    /// Streams created and attached (reader got its headers).
    pub attached: usize,
    pub attach_secs: f64,
    /// offload's own count of running requests when all were attached.
    pub in_flight_at_hold: Option<u64>,
    /// Whether every stream was attached before the first chunk arrived anywhere.
    pub all_attached_before_streaming: bool,
    pub events: u64,
    pub expected_events: u64,
    pub errors: u64,
    pub error_kinds: BTreeMap<String, u64>,
    /// From the first chunk received to the last.
    pub stream_secs: f64,
    pub chunks_per_sec: f64,
    /// What the mock's pacing offers: N x 50 chunks/s.
    pub offered_chunks_per_sec: f64,
    pub persisted: Option<u64>,
    /// Persisted events over the time from the first chunk received until all were stored.
    pub persisted_per_sec: Option<f64>,
    /// How long after the last chunk was received the last one was stored.
    pub persist_lag_ms: Option<f64>,
    /// CPU over the whole run (attach and streaming), in cores.
    pub server_cores: f64,
    pub mock_cores: f64,
    pub bench_cores: f64,
    /// CPU used by other processes on the machine meanwhile.
    pub foreign_cores: f64,
    pub rss_base_kib: u64,
    pub rss_hold_kib: u64,
    pub rss_peak_kib: u64,
    /// (RSS when all N are in flight, before streaming - baseline) / N.
    pub rss_per_request_hold_kib: f64,
    /// (peak RSS during the run - baseline) / N.
    pub rss_per_request_peak_kib: f64,
    pub open_fds_at_hold: usize,
    pub h2_connections: usize,
    /// CPU seconds of the server's threads over its life, by thread name.
    pub server_threads: BTreeMap<String, f64>,
    pub server_log_warnings: u64,
    pub server_log_errors: u64,
}

/// Long enough to create and attach N streams before the first chunk (measured: a few thousand per second).
pub fn hold_ms(streams: usize) -> u64 {
    3_000 + streams as u64
}

pub async fn run(ctx: &Ctx, streams: usize, flush: Option<u64>) -> Result<Concurrency> {
    let mock = Proc::mock(&ctx.exe).await?;
    let api = format!("{}/v1", mock.base_url());
    let dir = DataDir::new(&ctx.work_dir, &format!("concurrency-{streams}-{}", flush.unwrap_or(0)))?;
    let offload = match flush {
        Some(flush) => Some(Proc::offload(&ctx.exe, dir.path(), &api, flush).await?),
        None => None,
    };
    let server = offload.as_ref().unwrap_or(&mock);
    let creates = h1_client()?;
    let readers = H2Pool::new(streams)?;
    // Open every HTTP/2 connection (and warm the create path) before the baseline.
    for i in 0..readers.connections() {
        let _ = readers.get(i).get(format!("{}/healthz", server.base_url())).send().await;
    }
    if let Some(offload) = &offload {
        bounded(20, 8, |_| async {
            let url = create_stream(&creates, &offload.base_url(), create_body(json!({"words": 2}))).await?;
            let response = open(get(&creates, &url), Duration::from_secs(10)).await?;
            anyhow::Ok(read_stream(response, false).await)
        })
        .await;
        wait_idle(&creates, &offload.base_url(), Duration::from_secs(10)).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    ctx.quiet().await?;

    let hold = hold_ms(streams);
    let mut result = Concurrency {
        target: if offload.is_some() { "offload" } else { "floor" }.into(),
        flush_interval_ms: flush,
        streams,
        hold_ms: hold,
        expected_events: streams as u64 * EVENTS_PER_STREAM,
        offered_chunks_per_sec: streams as f64 * 1000.0 / 20.0,
        h2_connections: readers.connections(),
        rss_base_kib: server.rss_kib()?,
        ..Default::default()
    };
    let controls = json!({"words": 62, "delay_ms": 20, "ttft_ms": hold});
    let mut pids = vec![server.pid, std::process::id()];
    if offload.is_some() {
        pids.push(mock.pid);
    }
    let usage = Usage::start(&pids)?;
    let peak = RssPeak::start(server.pid, Duration::from_millis(100));
    let started = Instant::now();
    let read_limit = Duration::from_millis(hold) + Duration::from_secs(150);

    let attached = bounded(streams, ATTACH_CONCURRENCY, |i| {
        let (creates, reader, controls) = (&creates, readers.get(i), controls.clone());
        let (offload, api) = (offload.as_ref(), api.as_str());
        async move {
            let response = match offload {
                Some(offload) => {
                    let url = create_stream(creates, &offload.base_url(), create_body(controls))
                        .await
                        .map_err(|e| ("create", e))?;
                    open(get(reader, &url), read_limit).await.map_err(|e| ("open", e))?
                }
                None => open(post_mock(reader, api, direct_body(controls, true)), read_limit)
                    .await
                    .map_err(|e| ("open", e))?,
            };
            Ok::<_, (&'static str, anyhow::Error)>(tokio::spawn(read_stream(response, false)))
        }
    })
    .await;
    result.attach_secs = started.elapsed().as_secs_f64();
    result.rss_hold_kib = server.rss_kib()?;
    result.open_fds_at_hold = server.open_fds();
    if let Some(offload) = &offload {
        result.in_flight_at_hold = in_flight(&creates, &offload.base_url()).await.ok();
    }

    let tally = super::tally_readers(attached, started, read_limit, EVENTS_PER_STREAM, &mut result.error_kinds).await;
    result.attached = tally.attached;
    result.events = tally.events;
    let (first, last) = (tally.first, tally.last);
    result.all_attached_before_streaming = first.is_some_and(|f| f >= tally.attached_at);
    result.errors = result.error_kinds.values().sum();
    if let (Some(first), Some(last)) = (first, last) {
        result.stream_secs = (last - first).as_secs_f64();
        result.chunks_per_sec = result.events as f64 / result.stream_secs.max(1e-9);
    }
    if offload.is_some() {
        // Bounded wait for the flushes of the last chunks.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut stored = persisted_events(&dir.db())?;
        while stored < result.events && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            stored = persisted_events(&dir.db())?;
        }
        let stored_at = Instant::now();
        result.persisted = Some(stored);
        if let (Some(first), Some(last)) = (first, last) {
            result.persisted_per_sec = Some(stored as f64 / (stored_at - first).as_secs_f64().max(1e-9));
            result.persist_lag_ms = Some(stored_at.saturating_duration_since(last).as_secs_f64() * 1000.0);
        }
    }
    let usage = usage.report()?;
    result.server_cores = usage.cores[0];
    result.bench_cores = usage.cores[1];
    result.mock_cores = usage.cores.get(2).copied().unwrap_or(result.server_cores);
    result.foreign_cores = usage.foreign_cores;
    result.rss_peak_kib = peak.stop().max(result.rss_hold_kib);
    let n = streams.max(1) as f64;
    result.rss_per_request_hold_kib = result.rss_hold_kib.saturating_sub(result.rss_base_kib) as f64 / n;
    result.rss_per_request_peak_kib = result.rss_peak_kib.saturating_sub(result.rss_base_kib) as f64 / n;
    (result.server_log_warnings, result.server_log_errors) = server.log_counts();
    result.server_threads = thread_cpu(server.pid);
    if result.errors > 0 {
        tracing::warn!("concurrency errors: {:?}; server log tail: {:?}", result.error_kinds, server.log_tail(5));
    }
    if let Some(offload) = offload {
        offload.stop().await?;
    }
    mock.stop().await?;
    Ok(result)
}
