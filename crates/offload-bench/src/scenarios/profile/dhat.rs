//! The dhat side of the profile: one server under dhat per run, its `Total:` line at exit; and whether a build
//! can be counted at all.

use super::workload::{Workload, lifecycles, run_workload, wait_healthy};
use super::{Ctx, FLUSH_MS, Plan, STARTUP};
use crate::procs::{DataDir, Proc};
use anyhow::{Context, Result, anyhow};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};

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

/// One dhat server: start, warm-up, the workload, SIGTERM, then dhat's `Total:` line.
pub(super) async fn dhat(
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

/// Whether the binary allocates with jemalloc (tikv-jemallocator's symbols are prefixed `_rjem_`).
pub(super) fn links_jemalloc(exe: &Path) -> Result<bool> {
    let bytes = std::fs::read(exe).with_context(|| format!("reading {}", exe.display()))?;
    Ok(bytes.windows(6).any(|w| w == b"_rjem_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_dhat_total_line() {
        let log = "==4242== DHAT, a dynamic heap analysis tool\n==4242== \n\
                   ==4242== Total:     12,345,678 bytes in 98,765 blocks\n\
                   ==4242== At t-gmax: 1,000 bytes in 10 blocks\n";
        assert_eq!(dhat_total(log), Some((12_345_678, 98_765)));
        assert_eq!(dhat_total("==1== At t-gmax: 1 bytes in 1 blocks\n"), None);
    }
}
