//! Scenario 6, cluster (issue 8): offload as several `offload serve` nodes on one PostgreSQL database, each
//! measure beside the same measure on one node on PostgreSQL, on one node on SQLite (how the other scenarios run
//! it) and, where the measure has one, the direct-to-mock floor, all in the same run.
//!
//! Every setup is started fresh for each measure: a new scratch database (see `postgres.rs`) or data directory,
//! the release binary started once per node as the other scenarios start it, all nodes calling the same mock
//! process and sharing one `--public-url` that nothing resolves ([`PUBLIC_URL`]). The bench turns each URL handed
//! out into the address of the node it means to reach, as a load balancer without stickiness may send any call to
//! any node. The nodes run at the server's default flush interval, 50 ms.
//!
//! - **Create**: `POST /v1/stream-chatgpt` in an open loop at a few rates, request `i` to node `i mod N` (the
//!   create scenario's own sweep, `create::sweep`).
//! - **Follow**: stream requests created on node A, each read at once on A (local) and on B = A + 1 (remote: B
//!   relays the owner's stream over HTTP), beside as many direct streams of the mock (the floor); the tap of the
//!   relay scenario timestamps every chunk as the upstream hands it on. The mock holds the first chunk back until
//!   both readers are attached. Added delay per chunk = remote receive - local receive of the same chunk.
//! - **Throughput**: M stream requests (64 chunks 20 ms apart, held back until all are attached) created round
//!   robin, each read on the next node, all streaming together: chunks/s delivered, whether every event arrived,
//!   and how many the store holds afterwards.

use super::concurrency::{EVENTS_PER_STREAM, hold_ms};
use super::create::{self, Sweep, Target};
use super::{Ctx, Read, create_body, create_stream, direct_body, get, open, post_mock, read_stream};
use crate::load::{H2Pool, Hist, Summary, bounded, h1_client, labels};
use crate::postgres::{self, ScratchDb};
use crate::procs::{DataDir, Proc, Usage, persisted_events, wait_idle};
use crate::tap::Tap;
use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The public URL every node hands out; `.invalid` never resolves, so nothing can leave the machine by it.
pub const PUBLIC_URL: &str = "http://offload.invalid";

/// The server's default flush interval: the latency goal is stated at default settings.
pub const FLUSH_MS: u64 = 50;

/// Follow: labelled words per stream and their pace (as in the relay scenario).
const WORDS: u32 = 62;
const DELAY_MS: u64 = 20;
/// Follow: how long the mock holds the first chunk back, so that both readers are attached before it.
const FOLLOW_HOLD_MS: u64 = 300;
const ATTACH_CONCURRENCY: usize = 256;

pub struct Plan {
    /// `--postgres-url`: used to create and drop the scratch databases.
    pub admin_url: String,
    pub nodes: usize,
    pub rates: Vec<u64>,
    pub step: Duration,
    /// Follow: streams per round (each with a local and a remote reader, plus as many floor streams), rounds.
    pub follow_streams: usize,
    pub follow_rounds: usize,
    /// Throughput: streams at once.
    pub streams: usize,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Cluster {
    pub nodes: usize,
    pub flush_interval_ms: u64,
    /// `floor`, `sqlite x1`, `pg x1`, `pg xN`.
    pub create: Vec<Sweep>,
    pub follow: Vec<Follow>,
    pub throughput: Vec<Throughput>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Follow {
    pub setup: String,
    pub nodes: usize,
    /// Direct readers of the mock through the tap, streaming at the same time.
    pub floor: Summary,
    /// Readers on the node that runs the stream.
    pub local: Summary,
    /// Readers on another node (the owner's stream relayed over HTTP); only with several nodes.
    pub remote: Option<Summary>,
    /// Per chunk, remote receive - local receive of the same chunk (a chunk the remote reader got first counts 0).
    pub added: Option<Summary>,
    /// Chunks the remote reader received before the local one.
    pub remote_first: u64,
    /// Chunks received whose tap instant was not found (should be 0).
    pub unmatched: u64,
    /// Streams that failed or did not deliver every labelled chunk and `[DONE]` to every reader.
    pub errors: u64,
    pub server_cores: f64,
    pub db_cores: f64,
    pub foreign_cores: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Throughput {
    /// `floor` (the mock directly) or a setup.
    pub setup: String,
    pub nodes: usize,
    pub streams: usize,
    /// Streams read on another node than the one running them.
    pub remote_readers: usize,
    pub hold_ms: u64,
    pub attached: usize,
    pub attach_secs: f64,
    pub events: u64,
    pub expected_events: u64,
    /// Every stream delivered all its events and `[DONE]`.
    pub complete: bool,
    pub errors: u64,
    pub error_kinds: BTreeMap<String, u64>,
    /// From the first chunk received to the last.
    pub stream_secs: f64,
    pub chunks_per_sec: f64,
    /// What the mock's pacing offers: M x 50 chunks/s.
    pub offered_chunks_per_sec: f64,
    /// Rows the measured streams left in the store's `events` table (waited for, at most 30 s).
    pub persisted: Option<u64>,
    /// CPU over attach and streaming, in cores (server: all nodes together).
    pub server_cores: f64,
    pub mock_cores: f64,
    pub bench_cores: f64,
    pub db_cores: f64,
    pub foreign_cores: f64,
    pub server_log_warnings: u64,
    pub server_log_errors: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    /// One node on the embedded SQLite store.
    Sqlite,
    /// This many nodes on one PostgreSQL database.
    Postgres(usize),
}

impl Setup {
    fn label(self) -> String {
        match self {
            Setup::Sqlite => "sqlite x1".into(),
            Setup::Postgres(n) => format!("pg x{n}"),
        }
    }

    fn nodes(self) -> usize {
        match self {
            Setup::Sqlite => 1,
            Setup::Postgres(n) => n.max(1),
        }
    }

    fn all(plan: &Plan) -> [Setup; 3] {
        [Setup::Sqlite, Setup::Postgres(1), Setup::Postgres(plan.nodes)]
    }
}

/// The running nodes of one setup.
struct Deployment {
    setup: Setup,
    nodes: Vec<Proc>,
    /// Dropped after the nodes (fields drop in order): the database goes once its users are killed.
    db: Option<ScratchDb>,
    dirs: Vec<DataDir>,
}

impl Deployment {
    async fn start(ctx: &Ctx, plan: &Plan, setup: Setup, upstream: &str, measure: &str) -> Result<Self> {
        let db = match setup {
            Setup::Sqlite => None,
            Setup::Postgres(_) => Some(ScratchDb::create(&plan.admin_url).await?),
        };
        let mut deployment = Self { setup, nodes: Vec::new(), db, dirs: Vec::new() };
        for i in 0..setup.nodes() {
            let dir = DataDir::new(&ctx.work_dir, &format!("cluster-{measure}-{i}"))?;
            let mut extra = vec!["--public-url", PUBLIC_URL];
            if let Some(db) = &deployment.db {
                extra.extend(["--store", db.url()]);
            }
            let node = Proc::offload_with(&ctx.exe, dir.path(), upstream, FLUSH_MS, &extra)
                .await
                .with_context(|| format!("starting node {i} of {}", setup.label()))?;
            deployment.nodes.push(node);
            deployment.dirs.push(dir);
        }
        Ok(deployment)
    }

    fn n(&self) -> usize {
        self.nodes.len()
    }

    fn base(&self, node: usize) -> String {
        self.nodes[node % self.n()].base_url()
    }

    /// A URL handed out (on the shared public URL), as reached on `node`.
    fn on(&self, url: &str, node: usize) -> String {
        url.replacen(PUBLIC_URL, &self.base(node), 1)
    }

    /// The node that reads a stream running on `owner`: the next one, or the owner itself when alone.
    fn reader_of(&self, owner: usize) -> usize {
        (owner + 1) % self.n()
    }

    fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|n| n.pid).collect()
    }

    fn db_name(&self) -> Option<&str> {
        self.db.as_ref().map(ScratchDb::name)
    }

    async fn wait_idle(&self, client: &reqwest::Client, limit: Duration) -> Result<()> {
        for node in &self.nodes {
            wait_idle(client, &node.base_url(), limit).await?;
        }
        Ok(())
    }

    async fn persisted(&self) -> Result<u64> {
        match (&self.db, self.dirs.first()) {
            (Some(db), _) => postgres::persisted_events(db.url()).await,
            (None, Some(dir)) => persisted_events(&dir.db()),
            (None, None) => Ok(0),
        }
    }

    fn log_counts(&self) -> (u64, u64) {
        self.nodes.iter().map(Proc::log_counts).fold((0, 0), |(w, e), (a, b)| (w + a, e + b))
    }

    fn log_tail(&self) -> Vec<String> {
        self.nodes.iter().flat_map(|n| n.log_tail(3)).collect()
    }

    /// Stops the nodes, then drops the database.
    async fn stop(mut self) -> Result<()> {
        for node in std::mem::take(&mut self.nodes) {
            node.stop().await?;
        }
        if let Some(db) = self.db.take() {
            db.drop_now().await?;
        }
        Ok(())
    }
}

pub async fn run(ctx: &Ctx, plan: &Plan) -> Result<Cluster> {
    let mock = Proc::mock(&ctx.exe).await?;
    let api = format!("{}/v1", mock.base_url());
    let mut result = Cluster { nodes: plan.nodes, flush_interval_ms: FLUSH_MS, ..Default::default() };

    let client = h1_client()?;
    tracing::info!("cluster create: floor (mock directly)");
    result.create.push(create::sweep(ctx, &client, &Target::floor(&mock), &plan.rates, plan.step).await?);
    for setup in Setup::all(plan) {
        tracing::info!("cluster create: {}", setup.label());
        let deployment = Deployment::start(ctx, plan, setup, &api, "create").await?;
        let target = Target {
            label: setup.label(),
            flush: Some(FLUSH_MS),
            urls: (0..deployment.n()).map(|i| format!("{}/v1/stream-chatgpt", deployment.base(i))).collect(),
            body: create_body(create::mock_controls()),
            servers: deployment.nodes.iter().collect(),
            mock: Some(&mock),
            db: deployment.db_name(),
        };
        let sweep = create::sweep(ctx, &client, &target, &plan.rates, plan.step).await;
        drop(target);
        deployment.stop().await?;
        result.create.push(sweep?);
    }

    for setup in Setup::all(plan) {
        tracing::info!("cluster follow: {}, {} x {} streams", setup.label(), plan.follow_rounds, plan.follow_streams);
        result
            .follow
            .push(follow(ctx, plan, &mock, setup).await.with_context(|| format!("follow, {}", setup.label()))?);
    }

    tracing::info!("cluster throughput: floor, {} streams", plan.streams);
    result.throughput.push(throughput(ctx, plan, &mock, None).await.context("throughput, floor")?);
    for setup in Setup::all(plan) {
        tracing::info!("cluster throughput: {}, {} streams", setup.label(), plan.streams);
        let measured = throughput(ctx, plan, &mock, Some(setup))
            .await
            .with_context(|| format!("throughput, {}", setup.label()))?;
        result.throughput.push(measured);
    }
    mock.stop().await?;
    Ok(result)
}

async fn follow(ctx: &Ctx, plan: &Plan, mock: &Proc, setup: Setup) -> Result<Follow> {
    let tap = Arc::new(Tap::start(mock.addr).await?);
    let deployment = Arc::new(Deployment::start(ctx, plan, setup, &tap.api_base(), "follow").await?);
    let client = h1_client()?;
    let next_id = Arc::new(AtomicU32::new(1));
    // Warm-up round, not reported: connections on every path, node to node included.
    let warm = plan.follow_streams.clamp(1, 4).max(deployment.n());
    follow_rounds(&deployment, &client, &tap, &next_id, warm, 1).await?;
    deployment.wait_idle(&client, Duration::from_secs(10)).await?;
    ctx.quiet().await?;

    let mut pids = deployment.pids();
    pids.extend([mock.pid, std::process::id()]);
    let usage = Usage::start_with_db(&pids, deployment.db_name())?;
    let mut result =
        follow_rounds(&deployment, &client, &tap, &next_id, plan.follow_streams, plan.follow_rounds).await?;
    let usage = usage.report()?;
    result.server_cores = usage.cores[..deployment.n()].iter().sum();
    result.db_cores = usage.db_cores;
    result.foreign_cores = usage.foreign_cores;
    if result.errors > 0 {
        tracing::warn!("cluster follow errors: {}; nodes' log tails: {:?}", result.errors, deployment.log_tail());
    }
    let deployment = Arc::try_unwrap(deployment).map_err(|_| anyhow::anyhow!("a follow task outlived its round"))?;
    deployment.stop().await?;
    Ok(result)
}

/// What one task of a follow round brings back.
enum Streamed {
    Offload { local: Read, remote: Option<Read> },
    Direct(Read),
}

async fn follow_rounds(
    deployment: &Arc<Deployment>,
    client: &reqwest::Client,
    tap: &Arc<Tap>,
    next_id: &Arc<AtomicU32>,
    streams: usize,
    rounds: usize,
) -> Result<Follow> {
    let (mut floor, mut local, mut remote, mut added) = (Hist::new()?, Hist::new()?, Hist::new()?, Hist::new()?);
    let mut result = Follow { setup: deployment.setup.label(), nodes: deployment.n(), ..Default::default() };
    let several = deployment.n() > 1;
    for _ in 0..rounds {
        let mut tasks = Vec::new();
        for j in 0..streams {
            // Staggered across the pacing, so that chunks of different streams do not arrive in lockstep.
            let stagger = Duration::from_micros((j as u64 * DELAY_MS * 1000) / streams.max(1) as u64);
            for via_offload in [true, false] {
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                let controls = json!({"content": labels(id, WORDS), "delay_ms": DELAY_MS, "ttft_ms": FOLLOW_HOLD_MS});
                let (client, deployment, api) = (client.clone(), deployment.clone(), tap.api_base());
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep(stagger).await;
                    let limit = Duration::from_secs(60);
                    if !via_offload {
                        let response = open(post_mock(&client, &api, direct_body(controls, true)), limit).await?;
                        return anyhow::Ok(Streamed::Direct(read_stream(response, true).await));
                    }
                    let owner = j % deployment.n();
                    let url = create_stream(&client, &deployment.base(owner), create_body(controls)).await?;
                    let local = open(get(&client, &deployment.on(&url, owner)), limit).await?;
                    let remote = if several {
                        Some(open(get(&client, &deployment.on(&url, deployment.reader_of(owner))), limit).await?)
                    } else {
                        None
                    };
                    let (local, remote) = tokio::join!(read_stream(local, true), async move {
                        match remote {
                            Some(r) => Some(read_stream(r, true).await),
                            None => None,
                        }
                    });
                    Ok(Streamed::Offload { local, remote })
                }));
            }
        }
        for task in tasks {
            match task.await.context("a follow stream task")? {
                Ok(Streamed::Direct(read)) => {
                    result.errors += u64::from(!complete(&read));
                    record(tap, &read, &mut floor, &mut result.unmatched);
                }
                Ok(Streamed::Offload { local: l, remote: r }) => {
                    let bad = !complete(&l) || r.as_ref().is_some_and(|r| !complete(r));
                    result.errors += u64::from(bad);
                    record(tap, &l, &mut local, &mut result.unmatched);
                    if let Some(r) = r {
                        record(tap, &r, &mut remote, &mut result.unmatched);
                        let local_at: HashMap<(u32, u32), Instant> =
                            l.labels.iter().map(|&(s, k, at)| ((s, k), at)).collect();
                        for (s, k, at) in &r.labels {
                            if let Some(local_at) = local_at.get(&(*s, *k)) {
                                if at < local_at {
                                    result.remote_first += 1;
                                }
                                added.record(at.saturating_duration_since(*local_at));
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!("cluster follow stream failed: {e:#}");
                    result.errors += 1;
                }
            }
        }
    }
    result.floor = floor.summary();
    result.local = local.summary();
    if several {
        result.remote = Some(remote.summary());
        result.added = Some(added.summary());
    }
    Ok(result)
}

/// Every labelled chunk and `[DONE]`, without a body error.
fn complete(read: &Read) -> bool {
    read.error.is_none() && read.done && read.labels.len() == WORDS as usize
}

/// Records, per chunk, receive instant - tap instant.
fn record(tap: &Tap, read: &Read, hist: &mut Hist, unmatched: &mut u64) {
    for &(stream, index, received) in &read.labels {
        match tap.mark(stream, index) {
            Some(sent) => hist.record(received.saturating_duration_since(sent)),
            None => *unmatched += 1,
        }
    }
}

/// `setup` `None`: the floor, the same streams read from the mock directly.
async fn throughput(ctx: &Ctx, plan: &Plan, mock: &Proc, setup: Option<Setup>) -> Result<Throughput> {
    let api = format!("{}/v1", mock.base_url());
    let deployment = match setup {
        Some(setup) => Some(Deployment::start(ctx, plan, setup, &api, "throughput").await?),
        None => None,
    };
    let streams = plan.streams;
    let creates = h1_client()?;
    let readers = H2Pool::new(streams)?;
    // Open every HTTP/2 connection (to every node) and warm the create and relay paths before measuring.
    let hosts: Vec<String> = match &deployment {
        Some(d) => (0..d.n()).map(|i| d.base(i)).collect(),
        None => vec![mock.base_url()],
    };
    for i in 0..readers.connections() {
        for host in &hosts {
            let _ = readers.get(i).get(format!("{host}/healthz")).send().await;
        }
    }
    if let Some(d) = &deployment {
        let creates = &creates;
        bounded(20, 8, |i| async move {
            let url = create_stream(creates, &d.base(i), create_body(json!({"words": 2}))).await?;
            let response = open(get(creates, &d.on(&url, d.reader_of(i))), Duration::from_secs(10)).await?;
            anyhow::Ok(read_stream(response, false).await)
        })
        .await;
        d.wait_idle(creates, Duration::from_secs(10)).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The warm-up's events, not counted as the measured streams'.
    let persisted_before = match &deployment {
        Some(d) => d.persisted().await?,
        None => 0,
    };
    ctx.quiet().await?;

    let hold = hold_ms(streams);
    let nodes = deployment.as_ref().map_or(0, Deployment::n);
    let mut result = Throughput {
        setup: setup.map_or_else(|| "floor".into(), Setup::label),
        nodes,
        streams,
        remote_readers: if nodes > 1 { streams } else { 0 },
        hold_ms: hold,
        expected_events: streams as u64 * EVENTS_PER_STREAM,
        offered_chunks_per_sec: streams as f64 * 1000.0 / 20.0,
        ..Default::default()
    };
    let controls = json!({"words": 62, "delay_ms": 20, "ttft_ms": hold});
    let mut pids = deployment.as_ref().map_or_else(|| vec![mock.pid], Deployment::pids);
    let servers = pids.len();
    pids.push(std::process::id());
    if deployment.is_some() {
        pids.push(mock.pid);
    }
    let usage = Usage::start_with_db(&pids, deployment.as_ref().and_then(Deployment::db_name))?;
    let started = Instant::now();
    let read_limit = Duration::from_millis(hold) + Duration::from_secs(150);

    let attached = bounded(streams, ATTACH_CONCURRENCY, |i| {
        let (creates, reader, controls) = (&creates, readers.get(i), controls.clone());
        let (deployment, api) = (deployment.as_ref(), api.as_str());
        async move {
            let response = match deployment {
                Some(d) => {
                    let url =
                        create_stream(creates, &d.base(i), create_body(controls)).await.map_err(|e| ("create", e))?;
                    open(get(reader, &d.on(&url, d.reader_of(i))), read_limit).await.map_err(|e| ("open", e))?
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

    let tally = super::tally_readers(attached, started, read_limit, EVENTS_PER_STREAM, &mut result.error_kinds).await;
    result.attached = tally.attached;
    result.events = tally.events;
    let (first, last) = (tally.first, tally.last);
    result.errors = result.error_kinds.values().sum();
    result.complete = result.errors == 0 && result.events == result.expected_events;
    if let (Some(first), Some(last)) = (first, last) {
        result.stream_secs = (last - first).as_secs_f64();
        result.chunks_per_sec = result.events as f64 / result.stream_secs.max(1e-9);
    }
    let usage = usage.report()?;
    result.server_cores = usage.cores[..servers].iter().sum();
    result.bench_cores = usage.cores[servers];
    result.mock_cores = usage.cores.get(servers + 1).copied().unwrap_or(result.server_cores);
    result.db_cores = usage.db_cores;
    result.foreign_cores = usage.foreign_cores;

    if let Some(d) = deployment {
        // Bounded wait for the flushes of the last chunks.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut stored = d.persisted().await?.saturating_sub(persisted_before);
        while stored < result.events && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            stored = d.persisted().await?.saturating_sub(persisted_before);
        }
        result.persisted = Some(stored);
        (result.server_log_warnings, result.server_log_errors) = d.log_counts();
        if result.errors > 0 || result.server_log_errors > 0 {
            tracing::warn!(
                "cluster throughput ({}): errors {:?}, {} error lines in the nodes' logs; log tails: {:?}",
                result.setup,
                result.error_kinds,
                result.server_log_errors,
                d.log_tail()
            );
        }
        d.stop().await?;
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_setup_is_compared_with_one_node_on_each_store() {
        let plan = Plan {
            admin_url: String::new(),
            nodes: 3,
            rates: vec![],
            step: Duration::ZERO,
            follow_streams: 1,
            follow_rounds: 1,
            streams: 1,
        };
        let labels: Vec<String> = Setup::all(&plan).iter().map(|s| s.label()).collect();
        assert_eq!(labels, ["sqlite x1", "pg x1", "pg x3"]);
        assert_eq!(Setup::all(&plan).map(Setup::nodes), [1, 1, 3]);
    }
}
