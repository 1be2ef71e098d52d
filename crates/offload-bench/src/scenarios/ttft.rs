//! Scenario 2, time to first token: from sending the create to the first chunk received on
//! `stream_events_url`, against the mock's own streaming call (time to its first chunk). One request at a time,
//! offload and direct samples alternating so that both see the same machine.
//!
//! The same loop times two more paths to the first chunk, for the comparison with a plain proxy hop: the mock
//! through nginx (an unbuffered `proxy_pass` with keep-alive, [`super::nginx`]; left out with a note when nginx
//! is not installed) and offload's OpenAI entry (`POST /v1/chat/completions` with `stream: true`, one round
//! trip).

use super::{Ctx, create_body, create_stream, direct_body, get, open, post_mock, read_stream};
use crate::load::{Hist, Summary, h1_client};
use crate::procs::{DataDir, Proc, Usage};
use anyhow::{Result, anyhow};
use serde::Serialize;
use serde_json::json;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Serialize)]
pub struct Ttft {
    pub flush_interval_ms: u64,
    pub floor: Summary,
    pub offload: Summary,
    pub added_p50_us: f64,
    pub added_p99_us: f64,
    pub errors: u64,
    /// CPU used by other processes on the machine meanwhile.
    pub foreign_cores: f64,
    /// Every path timed, the mock's own first.
    pub paths: Vec<PathTtft>,
    /// Why a path is missing (nginx not installed, say).
    pub notes: Vec<String>,
}

/// Time to the first chunk along one path.
#[derive(Clone, Debug, Serialize)]
pub struct PathTtft {
    pub path: &'static str,
    pub summary: Summary,
    /// Added to the mock's own p50 and p99.
    pub added_p50_us: f64,
    pub added_p99_us: f64,
}

/// The names of the paths, as the table and the targets know them.
pub const NGINX: &str = "through nginx (one proxy hop)";
pub const ENTRY: &str = "offload POST /v1/chat/completions, stream (one round trip)";
pub const TWO_STEP: &str = "offload POST /v1/stream-chatgpt, then the stream URL (two)";

impl Ttft {
    /// The summary of one path, if it was timed.
    pub fn path(&self, name: &str) -> Option<&Summary> {
        self.paths.iter().find(|p| p.path == name).map(|p| &p.summary)
    }
}

fn mock_controls() -> serde_json::Value {
    json!({"words": 8})
}

pub async fn run(ctx: &Ctx, samples: usize, flush: u64) -> Result<Ttft> {
    let mock = Proc::mock(&ctx.exe).await?;
    let dir = DataDir::new(&ctx.work_dir, &format!("ttft-{flush}"))?;
    let api = format!("{}/v1", mock.base_url());
    let offload = Proc::offload(&ctx.exe, dir.path(), &api, flush).await?;
    let base = offload.base_url();
    let client = h1_client()?;
    let (mut floor, mut through) = (Hist::new()?, Hist::new()?);
    let (mut hop, mut entry) = (Hist::new()?, Hist::new()?);
    let mut notes = Vec::new();
    let nginx = match super::nginx::start_if_installed(&dir.path().join("nginx"), mock.addr).await {
        Ok(nginx) => Some(nginx),
        Err(note) => {
            tracing::warn!("ttft: {note}");
            notes.push(note);
            None
        }
    };
    let first_chunk = |request: reqwest::RequestBuilder| async {
        let t0 = Instant::now();
        let response = open(request, Duration::from_secs(10)).await?;
        let read = read_stream(response, false).await;
        read.first.map(|t| t - t0).ok_or_else(|| anyhow!("no chunk: {:?}", read.error))
    };
    let mut errors = 0;
    let warmup = 20;
    ctx.quiet().await?;
    let usage = Usage::start(&[offload.pid, mock.pid, std::process::id()])?;
    for i in 0..samples + warmup {
        let direct = async {
            let t0 = Instant::now();
            let response =
                open(post_mock(&client, &api, direct_body(mock_controls(), true)), Duration::from_secs(10)).await?;
            let read = read_stream(response, false).await;
            read.first.map(|t| t - t0).ok_or_else(|| anyhow!("no chunk: {:?}", read.error))
        };
        let d = direct.await;
        let via = async {
            let t0 = Instant::now();
            let url = create_stream(&client, &base, create_body(mock_controls())).await?;
            let response = open(get(&client, &url), Duration::from_secs(10)).await?;
            let read = read_stream(response, false).await;
            read.first.map(|t| t - t0).ok_or_else(|| anyhow!("no chunk: {:?}", read.error))
        };
        let o = via.await;
        let n = match &nginx {
            Some(nginx) => {
                Some(first_chunk(post_mock(&client, &nginx.api_base(), direct_body(mock_controls(), true))).await)
            }
            None => None,
        };
        let e = first_chunk(post_mock(&client, &format!("{base}/v1"), direct_body(mock_controls(), true))).await;
        if i < warmup {
            continue;
        }
        match (n, e) {
            (Some(Ok(n)), Ok(e)) => {
                hop.record(n);
                entry.record(e);
            }
            (None, Ok(e)) => entry.record(e),
            (n, e) => {
                errors += 1;
                if let Some(err) = n.and_then(Result::err).or(e.err()) {
                    tracing::warn!("ttft sample failed: {err:#}");
                }
            }
        }
        match (d, o) {
            (Ok(d), Ok(o)) => {
                floor.record(d);
                through.record(o);
            }
            (d, o) => {
                errors += 1;
                if let Some(e) = d.err().or(o.err()) {
                    tracing::warn!("ttft sample failed: {e:#}");
                }
            }
        }
    }
    let foreign_cores = usage.report()?.foreign_cores;
    offload.stop().await?;
    mock.stop().await?;
    let (floor, offload) = (floor.summary(), through.summary());
    let row = |path: &'static str, summary: Summary| PathTtft {
        path,
        added_p50_us: summary.p50_us - floor.p50_us,
        added_p99_us: summary.p99_us - floor.p99_us,
        summary,
    };
    let mut paths = vec![row("mock directly", floor.clone())];
    if nginx.is_some() {
        paths.push(row(NGINX, hop.summary()));
    }
    paths.push(row(ENTRY, entry.summary()));
    paths.push(row(TWO_STEP, offload.clone()));
    drop(nginx);
    Ok(Ttft {
        paths,
        notes,
        flush_interval_ms: flush,
        added_p50_us: offload.p50_us - floor.p50_us,
        added_p99_us: offload.p99_us - floor.p99_us,
        floor,
        offload,
        errors,
        foreign_cores,
    })
}
