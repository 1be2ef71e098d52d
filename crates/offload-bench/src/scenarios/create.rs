//! Scenario 1, create: `POST /v1/async-chatgpt` and `/v1/stream-chatgpt` at fixed arrival rates (open loop),
//! stepping the rate up until the server saturates. Floor: the same POST, non-streaming and without delay, to
//! the mock directly.

use super::{Ctx, create_body, direct_body};
use crate::load::{StepResult, h1_client, open_loop};
use crate::procs::{DataDir, Proc, Usage, thread_cpu, wait_idle};
use anyhow::Result;
use bytes::Bytes;
use serde::Serialize;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// The p99 latency a step must stay under to count as held.
pub const HELD_P99_US: f64 = 5_000.0;

/// Past this p99 the server is taken as saturated and the sweep stops.
const COLLAPSED_P99_US: f64 = 250_000.0;

pub struct Plan {
    pub rates: Vec<u64>,
    pub step: Duration,
    pub flush_intervals: Vec<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Step {
    #[serde(flatten)]
    pub result: StepResult,
    /// CPU of the server under test (offload and all its nodes, or the mock for the floor) over the step, in
    /// cores.
    pub server_cores: f64,
    /// CPU of the load generator (this process) over the step, in cores.
    pub bench_cores: f64,
    /// CPU of the mock when it is not the server under test.
    pub mock_cores: f64,
    /// CPU of the PostgreSQL backends serving the nodes (0 on SQLite).
    pub db_cores: f64,
    /// CPU used by other processes on the machine over the step.
    pub foreign_cores: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Sweep {
    /// `floor` (the mock directly), `async` or `stream`.
    pub target: String,
    pub flush_interval_ms: Option<u64>,
    pub steps: Vec<Step>,
    /// The highest rate answered without errors or shedding with p99 under 5 ms.
    pub held_rps: Option<u64>,
    /// CPU seconds of the server's threads (summed over its nodes) over its life, by thread name.
    pub server_threads: std::collections::BTreeMap<String, f64>,
}

impl Sweep {
    pub fn p99_at(&self, rate: u64) -> Option<f64> {
        self.steps.iter().find(|s| s.result.rate == rate).map(|s| s.result.latency.p99_us)
    }
}

/// Small: the background upstream call each create starts stays cheap, so the create path is what is measured.
pub fn mock_controls() -> serde_json::Value {
    json!({"words": 4})
}

pub async fn run(ctx: &Ctx, plan: &Plan) -> Result<Vec<Sweep>> {
    let mock = Proc::mock(&ctx.exe).await?;
    let client = h1_client()?;
    let mut sweeps = Vec::new();

    tracing::info!("create: floor (mock directly)");
    let floor = Target::floor(&mock);
    sweeps.push(sweep(ctx, &client, &floor, &plan.rates, plan.step).await?);

    for &flush in &plan.flush_intervals {
        for endpoint in ["async", "stream"] {
            let dir = DataDir::new(&ctx.work_dir, &format!("create-{endpoint}-{flush}"))?;
            let offload = Proc::offload(&ctx.exe, dir.path(), &format!("{}/v1", mock.base_url()), flush).await?;
            tracing::info!("create: {endpoint}, flush {flush} ms");
            let target = Target {
                label: endpoint.to_owned(),
                flush: Some(flush),
                urls: vec![format!("{}/v1/{endpoint}-chatgpt", offload.base_url())],
                body: create_body(mock_controls()),
                servers: vec![&offload],
                mock: Some(&mock),
                db: None,
            };
            let result = sweep(ctx, &client, &target, &plan.rates, plan.step).await;
            offload.stop().await?;
            sweeps.push(result?);
        }
    }
    mock.stop().await?;
    Ok(sweeps)
}

/// What one sweep sends creates to and watches.
pub struct Target<'a> {
    /// `floor`, `async`, `stream`, or a cluster setup.
    pub label: String,
    pub flush: Option<u64>,
    /// Where to POST, in turn (one URL per node of a cluster).
    pub urls: Vec<String>,
    pub body: String,
    /// The servers under test: offload's nodes, or the mock for the floor.
    pub servers: Vec<&'a Proc>,
    /// The mock behind offload; `None` when the mock is the server under test.
    pub mock: Option<&'a Proc>,
    /// The PostgreSQL database of the nodes, whose backends' CPU is reported apart.
    pub db: Option<&'a str>,
}

impl<'a> Target<'a> {
    /// The same POST, non-streaming and without delay, to the mock directly.
    pub fn floor(mock: &'a Proc) -> Self {
        Self {
            label: "floor".into(),
            flush: None,
            urls: vec![format!("{}/v1/chat/completions", mock.base_url())],
            body: direct_body(mock_controls(), false),
            servers: vec![mock],
            mock: None,
            db: None,
        }
    }
}

/// Steps through `rates` (open loop, `step` each) until the server no longer keeps up.
pub async fn sweep(
    ctx: &Ctx,
    client: &reqwest::Client,
    target: &Target<'_>,
    rates: &[u64],
    step: Duration,
) -> Result<Sweep> {
    let urls: Arc<[String]> = target.urls.clone().into();
    let body = Bytes::from(target.body.clone());
    let send = {
        let client = client.clone();
        move |i: u64| {
            let (client, body) = (client.clone(), body.clone());
            let url = urls.get((i % urls.len().max(1) as u64) as usize).cloned();
            async move {
                let Some(url) = url else { return false };
                let response = client
                    .post(url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                match response {
                    Ok(r) => {
                        let ok = r.status().is_success();
                        r.bytes().await.is_ok() && ok
                    }
                    Err(_) => false,
                }
            }
        }
    };
    let send = Arc::new(send);
    let settle = || async {
        if target.mock.is_some() {
            // The creates' background upstream calls must not spill into the next step.
            for server in &target.servers {
                let _ = wait_idle(client, &server.base_url(), Duration::from_secs(20)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };

    // Warm-up: connections, the store's caches; not reported.
    let warm = send.clone();
    open_loop(200, Duration::from_secs(1), 2_000, Duration::from_secs(10), move |i| warm(i)).await?;
    settle().await;

    let servers = target.servers.len();
    let mut steps: Vec<Step> = Vec::new();
    let mut collapses_in_a_row = 0;
    for &rate in rates {
        ctx.quiet().await?;
        let mut pids: Vec<u32> = target.servers.iter().map(|s| s.pid).collect();
        pids.push(std::process::id());
        pids.extend(target.mock.map(|m| m.pid));
        let usage = Usage::start_with_db(&pids, target.db)?;
        let s = send.clone();
        let result = open_loop(rate, step, 4_000, Duration::from_secs(12), move |i| s(i)).await?;
        let usage = usage.report()?;
        let step = Step {
            server_cores: usage.cores[..servers].iter().sum(),
            bench_cores: usage.cores[servers],
            mock_cores: usage.cores.get(servers + 1).copied().unwrap_or(0.0),
            db_cores: usage.db_cores,
            foreign_cores: usage.foreign_cores,
            result,
        };
        tracing::info!(
            "  {} {rate:>6}/s: p50 {:.0} us, p99 {:.0} us, p99.9 {:.0} us, ok {}, errors {}, shed {}, foreign cpu {:.2}",
            target.label,
            step.result.latency.p50_us,
            step.result.latency.p99_us,
            step.result.latency.p999_us,
            step.result.ok,
            step.result.errors,
            step.result.shed,
            step.foreign_cores
        );
        // Stepping goes on past the 5 ms mark, to show the whole curve, until the server no longer keeps up:
        // requests shed or failed, or p99 beyond COLLAPSED_P99_US, twice in a row (once may be noise).
        let collapsed = !step.result.clean() || step.result.latency.p99_us > COLLAPSED_P99_US;
        steps.push(step);
        settle().await;
        collapses_in_a_row = if collapsed { collapses_in_a_row + 1 } else { 0 };
        if collapses_in_a_row >= 2 {
            break;
        }
    }
    let held_rps =
        steps.iter().filter(|s| s.result.clean() && s.result.latency.p99_us < HELD_P99_US).map(|s| s.result.rate).max();
    let mut server_threads = std::collections::BTreeMap::new();
    for server in &target.servers {
        for (name, secs) in thread_cpu(server.pid) {
            *server_threads.entry(name).or_insert(0.0) += secs;
        }
    }
    Ok(Sweep { target: target.label.clone(), flush_interval_ms: target.flush, steps, held_rps, server_threads })
}
