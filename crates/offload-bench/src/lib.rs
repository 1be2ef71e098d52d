//! `offload-bench`: measures offload against the direct-to-upstream floor in the same run, prints a table and
//! writes a JSON file. See BENCHMARKS.md for the method and the figures. It uses none of the server's internals:
//! it starts the `offload` binary (`serve`, `mock-upstream`) as child processes.
//!
//! - [`load`]: histograms, HTTP clients, the open-loop scheduler.
//! - [`procs`]: offload and the mock as child processes, `/proc` readings.
//! - [`tap`]: the timestamping proxy between a client and the mock.
//! - [`scenarios`]: create, time to first token, relay, concurrency, fan-out, cluster, and the cost profile under
//!   valgrind.
//! - [`postgres`]: scratch databases on the machine's PostgreSQL for the cluster scenario.
//! - [`report`]: the table, the targets, the JSON file.

pub mod load;
pub mod postgres;
pub mod procs;
pub mod report;
pub mod scenarios;
pub mod tap;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, ValueEnum};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    Create,
    Ttft,
    Relay,
    Concurrency,
    Fanout,
    /// Several nodes on one PostgreSQL database (needs a PostgreSQL server, `--postgres-url`).
    Cluster,
    /// Instructions and allocations per lifecycle and per relayed chunk, with offload under valgrind.
    Profile,
}

/// What runs when `--scenarios` is not given (plus `cluster` when PostgreSQL answers, `profile` when valgrind runs).
const DEFAULT_SCENARIOS: [Scenario; 5] =
    [Scenario::Create, Scenario::Ttft, Scenario::Relay, Scenario::Concurrency, Scenario::Fanout];

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Http {
    H1,
    H2,
}

impl std::fmt::Display for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Http::H1 => "h1",
            Http::H2 => "h2",
        })
    }
}

/// `offload-bench` flags.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "offload-bench",
    version,
    about = "Benchmark offload against the mock upstream called directly (see BENCHMARKS.md)"
)]
pub struct BenchArgs {
    /// Scenarios to run, comma-separated [default: create,ttft,relay,concurrency,fanout, cluster when a
    /// PostgreSQL server answers at --postgres-url, and profile when valgrind is installed].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub scenarios: Option<Vec<Scenario>>,
    /// Smaller sizes and shorter steps: every scenario in about two minutes.
    #[arg(long)]
    pub quick: bool,
    /// `--flush-interval-ms` values of the server for create, ttft, relay and concurrency.
    #[arg(long, value_delimiter = ',', default_value = "50,0")]
    pub flush_intervals: Vec<u64>,
    /// Create arrival rates in requests per second [default: 1000..16000 quick, 500..20000 full].
    #[arg(long, value_delimiter = ',')]
    pub rates: Option<Vec<u64>>,
    /// Seconds per create rate step, in the create and cluster scenarios [default: 1.5 quick, 3 full].
    #[arg(long)]
    pub step_secs: Option<f64>,
    /// In-flight streaming requests for the concurrency scenario [default: 1000 quick, 1000,5000,10000 full].
    #[arg(long, value_delimiter = ',')]
    pub concurrency: Option<Vec<usize>>,
    /// Readers for the fan-out scenario [default: 1000 quick, 1000,10000 full].
    #[arg(long, value_delimiter = ',')]
    pub fanout: Option<Vec<usize>>,
    /// HTTP versions of the fan-out readers [default: h2 quick, h2,h1 full].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub fanout_http: Option<Vec<Http>>,
    /// Time-to-first-token samples per flush interval [default: 200 quick, 1000 full].
    #[arg(long)]
    pub ttft_samples: Option<usize>,
    /// Relay and cluster follow: streams of each kind (offload, direct) per round, and rounds [default: 10x2
    /// quick, 25x4 full].
    #[arg(long)]
    pub relay_streams: Option<usize>,
    #[arg(long)]
    pub relay_rounds: Option<usize>,
    /// Cluster: PostgreSQL URL used as admin to create (and drop) a scratch database per setup.
    #[arg(
        long,
        env = "OFFLOAD_BENCH_POSTGRES_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    pub postgres_url: String,
    /// Cluster: nodes on the shared database (each measure also runs on one node).
    #[arg(long, default_value = "3", value_parser = clap::value_parser!(u16).range(2..=16))]
    pub cluster_nodes: u16,
    /// Cluster: create arrival rates, spread round-robin over the nodes [default: 250,500,1000 quick,
    /// 250,500,1000,2000 full]. Each step lasts --step-secs.
    #[arg(long, value_delimiter = ',')]
    pub cluster_rates: Option<Vec<u64>>,
    /// Cluster: streams at once in the throughput measure [default: 500 quick, 1000 full].
    #[arg(long)]
    pub cluster_streams: Option<usize>,
    /// Seconds to wait, before each measurement, for other processes on the machine to go quiet (0: never).
    #[arg(long, default_value = "60")]
    pub quiet_wait_secs: f64,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-results.json")]
    pub out: PathBuf,
    /// Scratch directory for the servers' data [default: a new directory under the system temp dir].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// The offload binary to measure [default: `offload` in the directory of this executable].
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// The offload build whose heap allocations the profile scenario counts [default: --binary]. dhat sees only
    /// the C library's malloc, so this must be a build without jemalloc:
    /// `cargo build --release --no-default-features --target-dir target/system-alloc`.
    #[arg(long)]
    pub alloc_binary: Option<PathBuf>,
}

pub async fn run(args: BenchArgs) -> Result<()> {
    let started = Instant::now();
    let exe = match &args.binary {
        Some(path) => path.clone(),
        None => beside_this_exe()?,
    };
    let mut results = report::Results::new(args.quick);
    let scenarios = choose(&args, &mut results.notes).await?;
    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("offload-bench-{}", std::process::id())));
    std::fs::create_dir_all(&work_dir).with_context(|| format!("creating {}", work_dir.display()))?;
    let ctx = scenarios::Ctx {
        alloc_exe: args.alloc_binary.clone().unwrap_or_else(|| exe.clone()),
        exe,
        work_dir: work_dir.clone(),
        quiet_wait: Duration::from_secs_f64(args.quiet_wait_secs.max(0.0)),
    };
    // On ctrl-c the scenario is dropped where it stands: child processes are killed (`kill_on_drop`) and scratch
    // databases dropped (`ScratchDb`'s Drop).
    let result = tokio::select! {
        result = run_scenarios(&ctx, &args, &scenarios, &mut results) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    let _ = std::fs::remove_dir_all(&work_dir);
    result?;
    results.wall_secs = started.elapsed().as_secs_f64();
    results.targets = report::targets(&results);
    report::print(&results)?;
    let json = serde_json::to_string_pretty(&results).context("encoding the results")?;
    std::fs::write(&args.out, json).with_context(|| format!("writing {}", args.out.display()))?;
    tracing::info!("results written to {} ({:.0} s)", args.out.display(), results.wall_secs);
    Ok(())
}

/// The `offload` binary built beside this one (`cargo build --release` builds both into target/release).
fn beside_this_exe() -> Result<PathBuf> {
    let this = std::env::current_exe().context("finding this executable")?;
    let dir = this.parent().ok_or_else(|| anyhow!("{} has no parent directory", this.display()))?;
    let offload = dir.join(format!("offload{}", std::env::consts::EXE_SUFFIX));
    if !offload.is_file() {
        bail!(
            "no offload binary at {}: run `cargo build --release` (it builds offload beside offload-bench), \
             or pass --binary",
            offload.display()
        );
    }
    Ok(offload)
}

/// The scenarios to run: those asked for, else the default list, with `cluster` only when PostgreSQL answers
/// (else a note says why it was skipped). Asking for `cluster` without a reachable PostgreSQL is an error.
async fn choose(args: &BenchArgs, notes: &mut Vec<String>) -> Result<Vec<Scenario>> {
    let shown = postgres::redact(&args.postgres_url);
    match &args.scenarios {
        Some(list) => {
            if list.contains(&Scenario::Profile) {
                scenarios::profile::available().await.context("the profile scenario needs valgrind")?;
            }
            if list.contains(&Scenario::Cluster) {
                postgres::reachable(&args.postgres_url).await.with_context(|| {
                    format!("the cluster scenario needs PostgreSQL at {shown} (set --postgres-url)")
                })?;
            }
            Ok(list.clone())
        }
        None => {
            let mut list = DEFAULT_SCENARIOS.to_vec();
            match postgres::reachable(&args.postgres_url).await {
                Ok(()) => list.push(Scenario::Cluster),
                Err(e) => {
                    let note = format!(
                        "cluster scenario skipped: no PostgreSQL at {shown} ({e:#}); start one or set --postgres-url"
                    );
                    tracing::warn!("{note}");
                    notes.push(note);
                }
            }
            match scenarios::profile::available().await {
                Ok(_) => list.push(Scenario::Profile),
                Err(e) => {
                    let note = format!("profile scenario skipped: valgrind cannot run ({e:#}); install valgrind");
                    tracing::warn!("{note}");
                    notes.push(note);
                }
            }
            Ok(list)
        }
    }
}

async fn run_scenarios(
    ctx: &scenarios::Ctx,
    args: &BenchArgs,
    chosen: &[Scenario],
    results: &mut report::Results,
) -> Result<()> {
    let quick = args.quick;
    let wants = |s: Scenario| chosen.contains(&s);
    let flushes = &args.flush_intervals;

    if wants(Scenario::Create) {
        let plan = scenarios::create::Plan {
            rates: args.rates.clone().unwrap_or_else(|| {
                if quick {
                    vec![1_000, 2_000, 4_000, 8_000, 12_000, 16_000]
                } else {
                    vec![500, 1_000, 2_000, 3_000, 4_000, 6_000, 8_000, 10_000, 12_000, 15_000, 20_000]
                }
            }),
            step: Duration::from_secs_f64(args.step_secs.unwrap_or(if quick { 1.5 } else { 3.0 })),
            flush_intervals: flushes.clone(),
        };
        results.create = scenarios::create::run(ctx, &plan).await.context("scenario create")?;
    }
    if wants(Scenario::Ttft) {
        let samples = args.ttft_samples.unwrap_or(if quick { 200 } else { 1_000 });
        for &flush in flushes {
            tracing::info!("ttft: {samples} samples, flush {flush} ms");
            results.ttft.push(scenarios::ttft::run(ctx, samples, flush).await.context("scenario ttft")?);
        }
    }
    if wants(Scenario::Relay) {
        let plan = scenarios::relay::Plan {
            streams: args.relay_streams.unwrap_or(if quick { 10 } else { 25 }),
            rounds: args.relay_rounds.unwrap_or(if quick { 2 } else { 4 }),
            stalled: if quick { 10 } else { 20 },
        };
        for &flush in flushes {
            tracing::info!("relay: {} x {} streams, flush {flush} ms", plan.rounds, plan.streams);
            results.relay.extend(scenarios::relay::run(ctx, &plan, flush).await.context("scenario relay")?);
        }
    }
    if wants(Scenario::Concurrency) {
        let sizes =
            args.concurrency.clone().unwrap_or_else(|| if quick { vec![1_000] } else { vec![1_000, 5_000, 10_000] });
        for &n in &sizes {
            tracing::info!("concurrency: {n} streams, floor");
            results.concurrency.push(scenarios::concurrency::run(ctx, n, None).await.context("scenario concurrency")?);
            for &flush in flushes {
                tracing::info!("concurrency: {n} streams, flush {flush} ms");
                let r = scenarios::concurrency::run(ctx, n, Some(flush)).await.context("scenario concurrency")?;
                results.concurrency.push(r);
            }
        }
    }
    if wants(Scenario::Fanout) {
        let sizes = args.fanout.clone().unwrap_or_else(|| if quick { vec![1_000] } else { vec![1_000, 10_000] });
        let https =
            args.fanout_http.clone().unwrap_or_else(|| if quick { vec![Http::H2] } else { vec![Http::H2, Http::H1] });
        for &http in &https {
            for &n in &sizes {
                tracing::info!("fan-out: {n} readers over {http}");
                results.fanout.push(scenarios::fanout::run(ctx, n, http).await.context("scenario fanout")?);
            }
        }
    }
    if wants(Scenario::Cluster) {
        let plan = scenarios::cluster::Plan {
            admin_url: args.postgres_url.clone(),
            nodes: usize::from(args.cluster_nodes),
            rates: args
                .cluster_rates
                .clone()
                .unwrap_or_else(|| if quick { vec![250, 500, 1_000] } else { vec![250, 500, 1_000, 2_000] }),
            step: Duration::from_secs_f64(args.step_secs.unwrap_or(if quick { 1.5 } else { 3.0 })),
            follow_streams: args.relay_streams.unwrap_or(if quick { 10 } else { 25 }),
            follow_rounds: args.relay_rounds.unwrap_or(if quick { 2 } else { 4 }),
            streams: args.cluster_streams.unwrap_or(if quick { 500 } else { 1_000 }),
        };
        tracing::info!("cluster: {} nodes on PostgreSQL, beside one node on PostgreSQL and on SQLite", plan.nodes);
        results.cluster = Some(scenarios::cluster::run(ctx, &plan).await.context("scenario cluster")?);
    }
    if wants(Scenario::Profile) {
        tracing::info!("profile: offload under valgrind (callgrind, then dhat), a few minutes");
        let plan = scenarios::profile::Plan::default();
        results.profile = Some(scenarios::profile::run(ctx, &plan).await.context("scenario profile")?);
    }
    Ok(())
}
