//! Scenario 3, per-chunk relay: how much later a reader of offload gets each chunk than a reader of the mock.
//!
//! Both paths go through the tap (see `tap.rs`), which notes when it hands each labelled chunk on: offload's
//! upstream URL is the tap, and the direct reader calls the mock through the tap too. Per chunk, the delay is
//! `receive instant - tap instant` on one clock; the floor's delay is the loopback hop and the client's own
//! parsing, offload's adds the server's relay. Streams of both kinds run at the same time, staggered across
//! the 20 ms pacing so that chunks of different streams do not arrive in lockstep.
//!
//! The second pass repeats the measurement with stalled readers attached: one per measured stream (never
//! reads) and several on a large finished request whose replay (about 15 MB) cannot fit in a loopback socket's
//! buffers, so the server's writes to them block. The target is that this does not raise the others' latency.

use super::{Ctx, create_body, create_stream, direct_body, get, open, post_mock, read_stream, wait_final};
use crate::load::{Hist, Summary, h1_client, labels};
use crate::procs::{DataDir, Proc, Usage};
use crate::tap::Tap;
use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub const WORDS: u32 = 62;
pub const DELAY_MS: u64 = 20;

pub struct Plan {
    /// Streams of each kind per round.
    pub streams: usize,
    pub rounds: usize,
    /// Stalled readers on the large finished request in the second pass.
    pub stalled: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Relay {
    pub flush_interval_ms: u64,
    /// Stalled readers attached during this pass (0 for the plain pass).
    pub stalled_readers: usize,
    pub floor: Summary,
    pub offload: Summary,
    pub added_p50_us: f64,
    pub added_p99_us: f64,
    pub added_p999_us: f64,
    /// Chunks received whose tap instant was not found (should be 0).
    pub unmatched: u64,
    pub errors: u64,
    /// CPU used by other processes on the machine meanwhile.
    pub foreign_cores: f64,
}

pub async fn run(ctx: &Ctx, plan: &Plan, flush: u64) -> Result<Vec<Relay>> {
    let mock = Proc::mock(&ctx.exe).await?;
    let tap = Arc::new(Tap::start(mock.addr).await?);
    let dir = DataDir::new(&ctx.work_dir, &format!("relay-{flush}"))?;
    let offload = Proc::offload(&ctx.exe, dir.path(), &tap.api_base(), flush).await?;
    let base = offload.base_url();
    let client = h1_client()?;
    let next_id = Arc::new(AtomicU32::new(1));

    // Warm-up round, not reported: connections on every path.
    measure(&client, &base, &tap, &next_id, &Plan { streams: plan.streams.min(4), rounds: 1, stalled: 0 }, flush, 0)
        .await?;
    ctx.quiet().await?;
    let usage = Usage::start(&[offload.pid, mock.pid, std::process::id()])?;
    let mut plain = measure(&client, &base, &tap, &next_id, plan, flush, 0).await?;
    plain.foreign_cores = usage.report()?.foreign_cores;

    // A large finished request to stall readers on.
    let big = create_body(json!({"words": 60_000}));
    let big_url = create_stream(&client, &base, big).await?;
    let status_url = big_url.trim_end_matches(".txt").to_owned() + ".json";
    wait_final(&client, &status_url, Duration::from_secs(120)).await.context("the large request")?;
    let stall_client = h1_client()?;
    let mut stalled = Vec::new();
    for _ in 0..plan.stalled {
        stalled.push(open(get(&stall_client, &big_url), Duration::from_secs(600)).await?);
    }
    // Let the server fill their sockets until its writes block.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let usage = Usage::start(&[offload.pid, mock.pid, std::process::id()])?;
    let mut with_stalled = measure(&client, &base, &tap, &next_id, plan, flush, plan.stalled).await?;
    with_stalled.foreign_cores = usage.report()?.foreign_cores;
    drop(stalled);

    offload.stop().await?;
    mock.stop().await?;
    Ok(vec![plain, with_stalled])
}

async fn measure(
    client: &reqwest::Client,
    base: &str,
    tap: &Arc<Tap>,
    next_id: &Arc<AtomicU32>,
    plan: &Plan,
    flush: u64,
    stalled_on_big: usize,
) -> Result<Relay> {
    let (mut floor, mut through) = (Hist::new()?, Hist::new()?);
    let (mut unmatched, mut errors) = (0u64, 0u64);
    let stall_client = h1_client()?;
    for _ in 0..plan.rounds {
        let mut tasks = Vec::new();
        for j in 0..plan.streams {
            let stagger = Duration::from_micros((j as u64 * DELAY_MS * 1000) / plan.streams.max(1) as u64);
            for via_offload in [true, false] {
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                let controls = json!({"content": labels(id, WORDS), "delay_ms": DELAY_MS});
                let (client, base, api) = (client.clone(), base.to_owned(), tap.api_base());
                let stall_client = stall_client.clone();
                let stall = stalled_on_big > 0;
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep(stagger).await;
                    let response = if via_offload {
                        let url = create_stream(&client, &base, create_body(controls)).await?;
                        // The stalled reader attaches first and never reads.
                        let stalled = if stall {
                            Some(open(get(&stall_client, &url), Duration::from_secs(120)).await?)
                        } else {
                            None
                        };
                        let response = open(get(&client, &url), Duration::from_secs(60)).await?;
                        (response, stalled)
                    } else {
                        (
                            open(post_mock(&client, &api, direct_body(controls, true)), Duration::from_secs(60))
                                .await?,
                            None,
                        )
                    };
                    let read = read_stream(response.0, true).await;
                    drop(response.1);
                    anyhow::Ok((via_offload, read))
                }));
            }
        }
        for task in tasks {
            match task.await.context("a relay stream task")? {
                Ok((via_offload, read)) => {
                    if read.error.is_some() || !read.done || read.labels.len() != WORDS as usize {
                        errors += 1;
                    }
                    let hist = if via_offload { &mut through } else { &mut floor };
                    for (stream, index, received) in read.labels {
                        match tap.mark(stream, index) {
                            Some(sent) => hist.record(received.saturating_duration_since(sent)),
                            None => unmatched += 1,
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!("relay stream failed: {e:#}");
                    errors += 1;
                }
            }
        }
    }
    let (floor, offload) = (floor.summary(), through.summary());
    Ok(Relay {
        flush_interval_ms: flush,
        stalled_readers: stalled_on_big + if stalled_on_big > 0 { plan.streams } else { 0 },
        added_p50_us: offload.p50_us - floor.p50_us,
        added_p99_us: offload.p99_us - floor.p99_us,
        added_p999_us: offload.p999_us - floor.p999_us,
        floor,
        offload,
        unmatched,
        errors,
        foreign_cores: 0.0,
    })
}
