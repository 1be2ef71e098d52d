//! Scenario `profile`: what one request lifecycle and one relayed chunk cost the server in instructions and heap
//! allocations, counted by valgrind, so that machine noise does not move the figures.
//!
//! The mock runs natively; offload runs under valgrind with the flags every scenario gives it (fresh data
//! directory, the mock as upstream, flush interval 50 ms, the default).
//!
//! - Instructions (callgrind): one server; after a warm-up of async lifecycles, each workload runs in its own
//!   window, opened with `callgrind_control --zero` and closed with `callgrind_control --dump`; the window's
//!   `totals:` line is its cost. The window of the lifecycles is also annotated (top functions, exclusive and
//!   inclusive), and an idle window says what the server's timers cost per second while nothing happens.
//! - Allocations (dhat, which reports only at exit): one server per run, stopped with SIGTERM after the workload;
//!   two runs differing only in size, and the difference of their `Total:` lines divided by the difference in
//!   size, so that startup, warm-up and shutdown cancel out.

mod callgrind;
mod dhat;
mod workload;

pub use callgrind::Window;
pub use dhat::DhatRun;

use super::Ctx;
use crate::load::h1_client;
use crate::procs::Proc;
use anyhow::{Context, Result, anyhow, bail};
use callgrind::callgrind;
use dhat::{dhat, links_jemalloc};
use serde::Serialize;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::Command;
use workload::Workload;

/// The flush interval of the profiled server (`serve`'s default).
const FLUSH_MS: u64 = 50;
/// Startup under valgrind is slow: how long the server may take to listen and answer `/healthz`.
const STARTUP: Duration = Duration::from_secs(180);

pub struct Plan {
    /// Lifecycles before any window or dhat workload.
    pub warmup: usize,
    /// Lifecycles in the callgrind window.
    pub lifecycles: usize,
    /// Lifecycles of the two dhat runs.
    pub dhat_lifecycles: (usize, usize),
    /// Words of the two streams (callgrind windows and dhat runs alike).
    pub words: (usize, usize),
}

impl Default for Plan {
    fn default() -> Self {
        Self { warmup: 10, lifecycles: 100, dhat_lifecycles: (50, 150), words: (20, 1_020) }
    }
}

#[derive(Debug, Serialize)]
pub struct Profile {
    pub binary: String,
    pub valgrind: String,
    pub flush_interval_ms: u64,
    pub warmup_lifecycles: usize,
    /// Everything in the lifecycle window, its status polls included (`windows[0].reads` of them).
    pub instructions_per_lifecycle: f64,
    /// The same with exactly one status read per lifecycle: the polls beyond it at `instructions_per_status_read`.
    pub instructions_per_lifecycle_one_read: f64,
    pub status_reads_per_lifecycle: f64,
    pub instructions_per_status_read: f64,
    pub instructions_per_chunk: f64,
    /// The allocation figures: `None` when the build counted links jemalloc, which dhat cannot see.
    pub allocations_per_lifecycle: Option<f64>,
    pub bytes_per_lifecycle: Option<f64>,
    pub allocations_per_chunk: Option<f64>,
    pub bytes_per_chunk: Option<f64>,
    /// The build whose allocations were counted, or why none were.
    pub allocations_binary: String,
    pub allocations_note: Option<String>,
    /// Instructions per second of the idle window: the background cost inside every window's wall time.
    pub idle_instructions_per_sec: f64,
    pub windows: Vec<Window>,
    pub dhat_runs: Vec<DhatRun>,
    /// Self cost per function in the lifecycle window, read from the dump itself (cost lines not under a
    /// `calls=` line): callgrind_annotate 3.19's `--inclusive=no` credits whole threads to `clone` and
    /// `start_thread` on these dumps, so its lines are kept apart, in `annotate_exclusive`.
    pub top_exclusive: Vec<String>,
    /// `callgrind_annotate --inclusive=no` of the lifecycle window, its first lines.
    pub annotate_exclusive: Vec<String>,
    /// `callgrind_annotate --inclusive=yes` of the lifecycle window, its first lines.
    pub top_inclusive: Vec<String>,
    pub wall_secs: f64,
}

/// valgrind's version when `valgrind`, `callgrind_control` and `callgrind_annotate` can run.
pub async fn available() -> Result<String> {
    let version = tool_output("valgrind", &["--version".into()]).await?;
    for tool in ["callgrind_control", "callgrind_annotate"] {
        // Their `--version` prints it but exits non-zero (3.19): only that they start is checked.
        let status = Command::new(tool)
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .status();
        tokio::time::timeout(Duration::from_secs(30), status)
            .await
            .map_err(|_| anyhow!("{tool} --version took over 30 s"))?
            .with_context(|| format!("starting {tool} (part of valgrind)"))?;
    }
    Ok(version.trim().to_owned())
}

pub async fn run(ctx: &Ctx, plan: &Plan) -> Result<Profile> {
    let started = Instant::now();
    let valgrind = available().await.context("the profile scenario needs valgrind")?;
    let dir = ctx.work_dir.join("profile");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mock = Proc::mock(&ctx.exe).await?;
    let upstream = format!("{}/v1", mock.base_url());
    let client = h1_client()?;
    ctx.quiet().await?;

    let (windows, tops) = callgrind(ctx, plan, &dir, &upstream, &client).await?;
    let mut dhat_runs = Vec::new();
    let allocations_note = links_jemalloc(&ctx.alloc_exe)?.then(|| {
        format!(
            "allocations not counted: {} allocates with jemalloc, which dhat cannot see; build one without it \
             (`cargo build --release --no-default-features --target-dir target/system-alloc`) and pass it as \
             --alloc-binary",
            ctx.alloc_exe.display()
        )
    });
    if let Some(note) = &allocations_note {
        tracing::warn!("profile: {note}");
    }
    for workload in allocations_note
        .is_none()
        .then_some([
            Workload::Lifecycles(plan.dhat_lifecycles.0),
            Workload::Lifecycles(plan.dhat_lifecycles.1),
            Workload::Stream(plan.words.0),
            Workload::Stream(plan.words.1),
        ])
        .into_iter()
        .flatten()
    {
        tracing::info!("profile: dhat, {} {}", workload.name(), workload.size());
        dhat_runs.push(dhat(ctx, plan, &dir, &upstream, &client, workload).await?);
    }
    mock.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);

    let window =
        |label: &str| windows.iter().find(|w| w.label == label).ok_or_else(|| anyhow!("no callgrind window {label}"));
    let lifecycles = window("lifecycles")?;
    let (short, long) = (window(&stream_label(plan.words.0))?, window(&stream_label(plan.words.1))?);
    let idle = window("idle")?;
    let status_reads = window("status-reads")?;
    let n = plan.lifecycles.max(1) as f64;
    let per_read = status_reads.instructions as f64 / status_reads.size.max(1) as f64;
    let extra_reads = lifecycles.reads as f64 - n;
    let words = per_unit_divisor(plan.words.0, plan.words.1)?;
    let runs = per_unit_divisor(plan.dhat_lifecycles.0, plan.dhat_lifecycles.1)?;
    let counted = match &dhat_runs[..] {
        [l1, l2, s1, s2] => Some((l1, l2, s1, s2)),
        [] => None,
        _ => bail!("expected 4 dhat runs, got {}", dhat_runs.len()),
    };
    Ok(Profile {
        binary: ctx.exe.display().to_string(),
        valgrind,
        flush_interval_ms: FLUSH_MS,
        warmup_lifecycles: plan.warmup,
        instructions_per_lifecycle: lifecycles.instructions as f64 / n,
        instructions_per_lifecycle_one_read: (lifecycles.instructions as f64 - extra_reads * per_read) / n,
        status_reads_per_lifecycle: lifecycles.reads as f64 / n,
        instructions_per_status_read: per_read,
        instructions_per_chunk: diff(long.instructions, short.instructions) / words,
        allocations_per_lifecycle: counted.map(|(l1, l2, _, _)| diff(l2.blocks, l1.blocks) / runs),
        bytes_per_lifecycle: counted.map(|(l1, l2, _, _)| diff(l2.bytes, l1.bytes) / runs),
        allocations_per_chunk: counted.map(|(_, _, s1, s2)| diff(s2.blocks, s1.blocks) / words),
        bytes_per_chunk: counted.map(|(_, _, s1, s2)| diff(s2.bytes, s1.bytes) / words),
        allocations_binary: ctx.alloc_exe.display().to_string(),
        allocations_note,
        idle_instructions_per_sec: idle.instructions as f64 / idle.wall_secs.max(1e-9),
        windows,
        dhat_runs,
        top_exclusive: tops.exclusive,
        annotate_exclusive: tops.annotate_exclusive,
        top_inclusive: tops.inclusive,
        wall_secs: started.elapsed().as_secs_f64(),
    })
}

fn stream_label(words: usize) -> String {
    format!("stream-{words}-words")
}

fn per_unit_divisor(small: usize, large: usize) -> Result<f64> {
    if large <= small {
        bail!("the second size ({large}) must be larger than the first ({small})");
    }
    Ok((large - small) as f64)
}

fn diff(large: u64, small: u64) -> f64 {
    large as f64 - small as f64
}

/// Runs a valgrind tool (bounded to 120 s) and returns its stdout; an error carries its stderr.
async fn tool_output(program: &str, args: &[String]) -> Result<String> {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    let output = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .map_err(|_| anyhow!("{program} {} took over 120 s", args.join(" ")))?
        .with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_size_must_be_larger() {
        assert!(per_unit_divisor(20, 20).is_err());
        assert_eq!(per_unit_divisor(20, 1_020).ok(), Some(1_000.0));
    }
}
