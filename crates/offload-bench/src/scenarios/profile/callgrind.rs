//! The callgrind side of the profile: one server under callgrind, a window per workload, the instruction total
//! of each window's dump, and the top functions of the lifecycle window.

use super::workload::{Workload, lifecycle, lifecycles, run_workload, wait_healthy};
use super::{Ctx, FLUSH_MS, Plan, STARTUP, stream_label, tool_output};
use crate::procs::{DataDir, Proc};
use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};

/// The idle window: how long the server is left alone between a zero and a dump.
const IDLE: Duration = Duration::from_secs(2);

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

/// The callgrind server: warm-up, then one window per workload, then the annotations of the lifecycle window.
pub(super) async fn callgrind(
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

pub(super) struct Tops {
    pub(super) exclusive: Vec<String>,
    pub(super) annotate_exclusive: Vec<String>,
    pub(super) inclusive: Vec<String>,
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

/// `callgrind_control ARGS`, bounded in time.
async fn control(args: &[String]) -> Result<()> {
    tool_output("callgrind_control", args).await.map(drop)
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
}
