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

use super::{Ctx, create_body, create_stream, get, open, read_stream};
use crate::load::h1_client;
use crate::procs::{DataDir, Proc};
use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use serde_json::{Value, json};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::Command;

/// The flush interval of the profiled server (`serve`'s default).
const FLUSH_MS: u64 = 50;
/// Startup under valgrind is slow: how long the server may take to listen and answer `/healthz`.
const STARTUP: Duration = Duration::from_secs(180);
/// Words of the mock's answer in a lifecycle.
const LIFECYCLE_WORDS: usize = 4;
/// Pause between two status reads of a lifecycle.
const POLL: Duration = Duration::from_millis(10);
/// How long one lifecycle, or one stream, may take under valgrind.
const UNIT_LIMIT: Duration = Duration::from_secs(60);
/// The idle window: how long the server is left alone between a zero and a dump.
const IDLE: Duration = Duration::from_secs(2);

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

/// One callgrind window.
#[derive(Debug, Serialize)]
pub struct Window {
    pub label: String,
    /// `lifecycles`, `stream` or `idle`.
    pub workload: &'static str,
    /// Lifecycles, or words of the stream (0 when idle).
    pub size: usize,
    pub instructions: u64,
    /// Status reads of the lifecycles (several per lifecycle: until `done`), or events read from the stream.
    pub reads: u64,
    pub wall_secs: f64,
}

/// One dhat run: its whole process.
#[derive(Debug, Serialize)]
pub struct DhatRun {
    pub workload: &'static str,
    pub size: usize,
    pub bytes: u64,
    pub blocks: u64,
    pub reads: u64,
    pub wall_secs: f64,
}

#[derive(Clone, Copy)]
enum Workload {
    Lifecycles(usize),
    Stream(usize),
    /// Reads of the status of a request that is done: what one more poll of a lifecycle costs.
    StatusReads(usize),
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Lifecycles(_) => "lifecycles",
            Workload::Stream(_) => "stream",
            Workload::StatusReads(_) => "status reads",
        }
    }

    fn size(self) -> usize {
        match self {
            Workload::Lifecycles(n) | Workload::Stream(n) | Workload::StatusReads(n) => n,
        }
    }
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

/// The callgrind server: warm-up, then one window per workload, then the annotations of the lifecycle window.
async fn callgrind(
    ctx: &Ctx,
    plan: &Plan,
    dir: &Path,
    upstream: &str,
    client: &reqwest::Client,
) -> Result<(Vec<Window>, Tops)> {
    let out = dir.join("cg.%p");
    let wrapper = vec![
        "valgrind".to_owned(),
        "--tool=callgrind".to_owned(),
        format!("--callgrind-out-file={}", out.display()),
        "--dump-instr=no".to_owned(),
        format!("--log-file={}", dir.join("cg.%p.log").display()),
    ];
    let data = DataDir::new(dir, "callgrind-data")?;
    tracing::info!("profile: starting offload under callgrind");
    let server = Proc::offload_wrapped(&wrapper, &ctx.exe, data.path(), upstream, FLUSH_MS, STARTUP).await?;
    let base = server.base_url();
    wait_healthy(client, &base).await?;
    lifecycles(client, &base, plan.warmup).await.context("warm-up")?;
    let (_, done_url) = lifecycle(client, &base).await.context("warm-up")?;

    let mut windows = Vec::new();
    let mut dumps = Vec::new();
    let steps = [
        ("lifecycles".to_owned(), Some(Workload::Lifecycles(plan.lifecycles))),
        ("status-reads".to_owned(), Some(Workload::StatusReads(plan.lifecycles))),
        (stream_label(plan.words.0), Some(Workload::Stream(plan.words.0))),
        (stream_label(plan.words.1), Some(Workload::Stream(plan.words.1))),
        ("idle".to_owned(), None),
    ];
    for (label, workload) in steps {
        tracing::info!("profile: callgrind window {label}");
        control(&["--zero".into(), server.pid.to_string()]).await?;
        let window_started = Instant::now();
        let reads = match workload {
            Some(w) => run_workload(client, &base, w, &done_url).await.with_context(|| format!("window {label}"))?,
            None => {
                tokio::time::sleep(IDLE).await;
                0
            }
        };
        control(&[format!("--dump={label}"), server.pid.to_string()]).await?;
        let wall_secs = window_started.elapsed().as_secs_f64();
        let file = dir.join(format!("cg.{}.{}", server.pid, dumps.len() + 1));
        let instructions = wait_dump(&file).await.with_context(|| format!("window {label}"))?;
        windows.push(Window {
            label,
            workload: workload.map_or("idle", Workload::name),
            size: workload.map_or(0, Workload::size),
            instructions,
            reads,
            wall_secs,
        });
        dumps.push(file);
    }
    server.stop().await?;
    let lifecycle_dump = dumps.first().ok_or_else(|| anyhow!("no callgrind dump"))?;
    let dump_text =
        std::fs::read_to_string(lifecycle_dump).with_context(|| format!("reading {}", lifecycle_dump.display()))?;
    let exclusive = self_cost_top(&dump_text, TOP);
    let mut tops = Vec::new();
    for inclusive in ["--inclusive=no", "--inclusive=yes"] {
        let args = [inclusive.into(), "--auto=no".into(), lifecycle_dump.display().to_string()];
        let text = tool_output("callgrind_annotate", &args).await?;
        tops.push(top_lines(&text, TOP));
    }
    let inclusive = tops.pop().unwrap_or_default();
    let annotate_exclusive = tops.pop().unwrap_or_default();
    Ok((windows, Tops { exclusive, annotate_exclusive, inclusive }))
}

/// Lines kept of each list of top functions.
const TOP: usize = 15;

struct Tops {
    exclusive: Vec<String>,
    annotate_exclusive: Vec<String>,
    inclusive: Vec<String>,
}

/// The `n` functions of a callgrind dump (one event, `Ir`) with the largest self cost: the cost lines of each
/// `fn=`, leaving out those that follow a `calls=` line (the inclusive cost of a call). As
/// `Ir (share%)  function [object]`, the share of the `totals:` line.
fn self_cost_top(text: &str, n: usize) -> Vec<String> {
    use std::collections::HashMap;
    // Compressed names: `fn=(12) name` the first time, `fn=(12)` afterwards; likewise `ob=`.
    fn name(rest: &str, names: &mut HashMap<String, String>) -> String {
        let rest = rest.trim();
        match rest.strip_prefix('(').and_then(|r| r.split_once(')')) {
            Some((id, "")) => names.get(id).cloned().unwrap_or_else(|| format!("({id})")),
            Some((id, given)) => {
                let given = given.trim().to_owned();
                names.insert(id.to_owned(), given.clone());
                given
            }
            None => rest.to_owned(),
        }
    }
    let (mut fns, mut objects) = (HashMap::new(), HashMap::new());
    let mut costs: HashMap<(String, String), u64> = HashMap::new();
    let (mut object, mut function) = (String::new(), String::new());
    let mut after_calls = false;
    let total = callgrind_total(text).unwrap_or(0);
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("ob=") {
            object = name(rest, &mut objects);
        } else if let Some(rest) = line.strip_prefix("fn=") {
            function = name(rest, &mut fns);
        } else if let Some(rest) = line.strip_prefix("cfn=") {
            // Defines a compressed name too, used later by `fn=(id)`.
            name(rest, &mut fns);
        } else if let Some(rest) = line.strip_prefix("cob=") {
            name(rest, &mut objects);
        } else if line.starts_with("calls=") {
            after_calls = true;
        } else if line.starts_with(|c: char| c.is_ascii_digit() || matches!(c, '+' | '-' | '*')) {
            if after_calls {
                after_calls = false;
                continue;
            }
            let ir = line.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            *costs.entry((function.clone(), object.clone())).or_default() += ir;
        }
    }
    let mut costs: Vec<_> = costs.into_iter().collect();
    costs.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    costs
        .into_iter()
        .take(n)
        .map(|((function, object), ir)| {
            let share = if total == 0 { 0.0 } else { 100.0 * ir as f64 / total as f64 };
            let object = object.rsplit('/').next().unwrap_or(&object).to_owned();
            format!("{ir:>13} ({share:5.2}%)  {function} [{object}]")
        })
        .collect()
}

/// One dhat server: start, warm-up, the workload, SIGTERM, then dhat's `Total:` line.
async fn dhat(
    ctx: &Ctx,
    plan: &Plan,
    dir: &Path,
    upstream: &str,
    client: &reqwest::Client,
    workload: Workload,
) -> Result<DhatRun> {
    let started = Instant::now();
    let wrapper = vec![
        "valgrind".to_owned(),
        "--tool=dhat".to_owned(),
        format!("--dhat-out-file={}", dir.join("dhat.%p.json").display()),
        format!("--log-file={}", dir.join("dhat.%p.log").display()),
    ];
    let data = DataDir::new(dir, "dhat-data")?;
    let server = Proc::offload_wrapped(&wrapper, &ctx.alloc_exe, data.path(), upstream, FLUSH_MS, STARTUP).await?;
    let pid = server.pid;
    let base = server.base_url();
    wait_healthy(client, &base).await?;
    lifecycles(client, &base, plan.warmup).await.context("warm-up")?;
    let reads = run_workload(client, &base, workload, "").await?;
    server.terminate(Duration::from_secs(120)).await?;
    let log = dir.join(format!("dhat.{pid}.log"));
    let text = std::fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
    let (bytes, blocks) = dhat_total(&text).ok_or_else(|| anyhow!("no `Total:` line in {}", log.display()))?;
    Ok(DhatRun {
        workload: workload.name(),
        size: workload.size(),
        bytes,
        blocks,
        reads,
        wall_secs: started.elapsed().as_secs_f64(),
    })
}

/// Runs a workload; `done_url` is the status URL of a request that is done (for the status reads).
async fn run_workload(client: &reqwest::Client, base: &str, workload: Workload, done_url: &str) -> Result<u64> {
    match workload {
        Workload::Lifecycles(n) => lifecycles(client, base, n).await,
        Workload::Stream(words) => stream(client, base, words).await,
        Workload::StatusReads(n) => {
            for _ in 0..n {
                let doc = read_status(client, done_url).await?;
                if doc.get("status").and_then(Value::as_str) != Some("done") {
                    bail!("the status of a done request changed: {doc}");
                }
            }
            Ok(n as u64)
        }
    }
}

async fn read_status(client: &reqwest::Client, status_url: &str) -> Result<Value> {
    client
        .get(status_url)
        .timeout(UNIT_LIMIT)
        .send()
        .await
        .context("GET status")?
        .error_for_status()
        .context("GET status")?
        .json()
        .await
        .context("reading the status")
}

/// `n` async lifecycles, one at a time. Returns how many status reads they took.
async fn lifecycles(client: &reqwest::Client, base: &str, n: usize) -> Result<u64> {
    let mut reads = 0;
    for _ in 0..n {
        reads += lifecycle(client, base).await?.0;
    }
    Ok(reads)
}

/// One async lifecycle: create (4 words, no delay), then read the status until `done`. Returns how many status
/// reads it took and the status URL.
async fn lifecycle(client: &reqwest::Client, base: &str) -> Result<(u64, String)> {
    let body = create_body(json!({"words": LIFECYCLE_WORDS, "ttft_ms": 0, "delay_ms": 0}));
    let answer: Value = client
        .post(format!("{base}/v1/async-chatgpt"))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .timeout(UNIT_LIMIT)
        .send()
        .await
        .context("POST /v1/async-chatgpt")?
        .error_for_status()
        .context("POST /v1/async-chatgpt")?
        .json()
        .await
        .context("reading the create answer")?;
    let status_url = answer
        .pointer("/endpoints/status_url")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("the create answer has no status_url: {answer}"))?
        .to_owned();
    let deadline = Instant::now() + UNIT_LIMIT;
    let mut reads = 0;
    loop {
        let doc = read_status(client, &status_url).await?;
        reads += 1;
        match doc.get("status").and_then(Value::as_str).unwrap_or("") {
            "done" => return Ok((reads, status_url)),
            final_status @ ("error" | "stop") => bail!("a lifecycle ended {final_status}: {doc}"),
            _ if Instant::now() >= deadline => bail!("a lifecycle was not done within {UNIT_LIMIT:?}"),
            _ => tokio::time::sleep(POLL).await,
        }
    }
}

/// One stream of `words` words (no delay), read to its end by one reader. Returns the events read.
async fn stream(client: &reqwest::Client, base: &str, words: usize) -> Result<u64> {
    let body = create_body(json!({"words": words, "ttft_ms": 0, "delay_ms": 0}));
    let url = create_stream(client, base, body).await?;
    let read = read_stream(open(get(client, &url), UNIT_LIMIT).await?, false).await;
    if let Some(e) = read.error {
        bail!("the stream failed: {e}");
    }
    if !read.done || (read.events as usize) < words {
        bail!("the stream of {words} words ended after {} events (done: {})", read.events, read.done);
    }
    Ok(u64::from(read.events))
}

async fn wait_healthy(client: &reqwest::Client, base: &str) -> Result<()> {
    let deadline = Instant::now() + STARTUP;
    loop {
        let ok = client
            .get(format!("{base}/healthz"))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("offload under valgrind did not answer /healthz within {STARTUP:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `callgrind_control ARGS`, bounded in time.
async fn control(args: &[String]) -> Result<()> {
    tool_output("callgrind_control", args).await.map(drop)
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

/// Waits (bounded) for a callgrind dump file to be complete and returns its instruction total.
async fn wait_dump(file: &Path) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = std::fs::read_to_string(file)
            && let Some(total) = callgrind_total(&text)
        {
            return Ok(total);
        }
        if Instant::now() >= deadline {
            bail!("no complete callgrind dump at {} after 60 s", file.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The instruction total of a callgrind dump: its `totals:` line (written last), else its `summary:` line.
fn callgrind_total(text: &str) -> Option<u64> {
    let first_number = |prefix: &str| {
        text.lines().find_map(|l| l.strip_prefix(prefix)).and_then(|rest| rest.split_whitespace().next()?.parse().ok())
    };
    first_number("totals:").or_else(|| first_number("summary:"))
}

/// `Total: 1,234 bytes in 56 blocks` of dhat's log.
fn dhat_total(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find_map(|l| l.split_once("Total:").map(|(_, rest)| rest))?;
    let number = |s: &str| s.replace(',', "").parse::<u64>().ok();
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        [bytes, "bytes", "in", blocks, "blocks", ..] => Some((number(bytes)?, number(blocks)?)),
        _ => None,
    }
}

/// The first `n` function lines of `callgrind_annotate`'s output (those after its `file:function` header).
fn top_lines(text: &str, n: usize) -> Vec<String> {
    text.lines()
        .skip_while(|l| !l.contains("file:function"))
        .skip(1)
        .skip_while(|l| l.starts_with("--"))
        .map(str::trim_end)
        .take_while(|l| !l.trim().is_empty())
        .take(n)
        .map(str::to_owned)
        .collect()
}

/// Whether the binary allocates with jemalloc (tikv-jemallocator's symbols are prefixed `_rjem_`).
fn links_jemalloc(exe: &Path) -> Result<bool> {
    let bytes = std::fs::read(exe).with_context(|| format!("reading {}", exe.display()))?;
    Ok(bytes.windows(6).any(|w| w == b"_rjem_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_callgrind_totals_line() {
        let dump = "version: 1\ncreator: callgrind-3.19.0\npid: 7\ncmd: offload serve\npart: 1\n\ndesc: I1 cache:\n\
                    events: Ir\nsummary: 0\n\nfn=(1) main\n3 100\n\ntotals: 123456789\n";
        assert_eq!(callgrind_total(dump), Some(123_456_789));
        assert_eq!(callgrind_total("events: Ir\nsummary: 42\n"), Some(42));
        assert_eq!(callgrind_total("events: Ir\n"), None);
    }

    #[test]
    fn reads_the_dhat_total_line() {
        let log = "==4242== DHAT, a dynamic heap analysis tool\n==4242== \n\
                   ==4242== Total:     12,345,678 bytes in 98,765 blocks\n\
                   ==4242== At t-gmax: 1,000 bytes in 10 blocks\n";
        assert_eq!(dhat_total(log), Some((12_345_678, 98_765)));
        assert_eq!(dhat_total("==1== At t-gmax: 1 bytes in 1 blocks\n"), None);
    }

    #[test]
    fn keeps_the_function_lines_of_an_annotation() {
        let text = "--------\nIr\n--------\n1,000 (100.0%)  PROGRAM TOTALS\n\n--------\n\
                    Ir                 file:function\n--------\n\
                    600 (60.00%)  ???:memcpy [/lib/libc.so]\n300 (30.00%)  src/a.rs:offload::a\n\
                    100 (10.00%)  src/b.rs:offload::b\n\n--------\n-- Auto-annotated source: src/a.rs\n--------\nIr\n";
        let top = top_lines(text, 2);
        assert_eq!(top, vec!["600 (60.00%)  ???:memcpy [/lib/libc.so]", "300 (30.00%)  src/a.rs:offload::a"]);
        assert_eq!(top_lines(text, 15).len(), 3, "the auto-annotated sources are not function lines");
    }

    #[test]
    fn self_cost_leaves_out_the_cost_of_calls() {
        let dump = "events: Ir\nsummary: 100\n\nob=(1) /usr/lib/libc.so.6\nfl=(1) clone.S\nfn=(1) clone\n\
                    10 2\ncob=(2) /bin/offload\ncfi=(2) worker.rs\ncfn=(2) run\ncalls=1 5\n10 98\n\n\
                    ob=(2)\nfl=(2)\nfn=(2)\n5 60\n+1 30\ncfn=(3) memcpy\ncalls=2 0\n* 8\n\n\
                    ob=(1)\nfl=(3) memcpy.S\nfn=(3)\n0 8\n\ntotals: 100\n";
        let top = self_cost_top(dump, 2);
        assert_eq!(top, vec!["           90 (90.00%)  run [offload]", "            8 ( 8.00%)  memcpy [libc.so.6]"]);
        assert_eq!(self_cost_top(dump, 5).len(), 3);
    }

    #[test]
    fn a_second_size_must_be_larger() {
        assert!(per_unit_divisor(20, 20).is_err());
        assert_eq!(per_unit_divisor(20, 1_020).ok(), Some(1_000.0));
    }
}
