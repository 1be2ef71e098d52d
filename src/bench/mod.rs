//! `offload bench`: measures offload against the direct-to-upstream floor in the same run, prints a table and
//! writes a JSON file. See BENCHMARKS.md for the method and the figures.
//!
//! - [`load`]: histograms, HTTP clients, the open-loop scheduler.
//! - [`procs`]: offload and the mock as child processes, `/proc` readings.
//! - [`tap`]: the timestamping proxy between a client and the mock.
//! - [`scenarios`]: create, time to first token, relay, concurrency, fan-out.
//! - [`report`]: the table, the targets, the JSON file.

pub mod load;
pub mod procs;
pub mod report;
pub mod scenarios;
pub mod tap;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    Create,
    Ttft,
    Relay,
    Concurrency,
    Fanout,
}

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

/// `offload bench` flags.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Scenarios to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "create,ttft,relay,concurrency,fanout")]
    pub scenarios: Vec<Scenario>,
    /// Smaller sizes and shorter steps: every scenario in about two minutes.
    #[arg(long)]
    pub quick: bool,
    /// `--flush-interval-ms` values of the server for create, ttft, relay and concurrency.
    #[arg(long, value_delimiter = ',', default_value = "50,0")]
    pub flush_intervals: Vec<u64>,
    /// Create arrival rates in requests per second [default: 1000..16000 quick, 500..20000 full].
    #[arg(long, value_delimiter = ',')]
    pub rates: Option<Vec<u64>>,
    /// Seconds per create rate step [default: 1.5 quick, 3 full].
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
    /// Relay: streams of each kind (offload, direct) per round, and rounds [default: 10x2 quick, 25x4 full].
    #[arg(long)]
    pub relay_streams: Option<usize>,
    #[arg(long)]
    pub relay_rounds: Option<usize>,
    /// Seconds to wait, before each measurement, for other processes on the machine to go quiet (0: never).
    #[arg(long, default_value = "60")]
    pub quiet_wait_secs: f64,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-results.json")]
    pub out: PathBuf,
    /// Scratch directory for the servers' data [default: a new directory under the system temp dir].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// The offload binary to measure [default: this executable].
    #[arg(long)]
    pub binary: Option<PathBuf>,
}

pub async fn run(args: BenchArgs) -> Result<()> {
    let started = Instant::now();
    let exe = match &args.binary {
        Some(path) => path.clone(),
        None => std::env::current_exe().context("finding this executable")?,
    };
    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("offload-bench-{}", std::process::id())));
    std::fs::create_dir_all(&work_dir).with_context(|| format!("creating {}", work_dir.display()))?;
    let ctx = scenarios::Ctx {
        exe,
        work_dir: work_dir.clone(),
        quiet_wait: Duration::from_secs_f64(args.quiet_wait_secs.max(0.0)),
    };
    let result = run_scenarios(&ctx, &args).await;
    let _ = std::fs::remove_dir_all(&work_dir);
    let mut results = result?;
    results.wall_secs = started.elapsed().as_secs_f64();
    results.targets = report::targets(&results);
    report::print(&results)?;
    let json = serde_json::to_string_pretty(&results).context("encoding the results")?;
    std::fs::write(&args.out, json).with_context(|| format!("writing {}", args.out.display()))?;
    tracing::info!("results written to {} ({:.0} s)", args.out.display(), results.wall_secs);
    Ok(())
}

async fn run_scenarios(ctx: &scenarios::Ctx, args: &BenchArgs) -> Result<report::Results> {
    let quick = args.quick;
    let mut results = report::Results::new(quick);
    let wants = |s: Scenario| args.scenarios.contains(&s);
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
    Ok(results)
}
