//! Process control: offload and the mock run as child processes of the bench (the real binary, so that each
//! has its own open-file limit and its own CPU and memory figures), and `/proc` readings of them.

use anyhow::{Context, Result, anyhow, bail};
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A running child: `offload serve` or `offload mock-upstream`. Killed when dropped.
pub struct Proc {
    name: &'static str,
    child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
    log: Arc<Mutex<Log>>,
}

#[derive(Default)]
struct Log {
    tail: VecDeque<String>,
    warnings: u64,
    errors: u64,
}

impl Proc {
    /// `offload mock-upstream` on a free port.
    pub async fn mock(exe: &Path) -> Result<Self> {
        let mut cmd = Command::new(exe);
        cmd.args(["mock-upstream", "--listen", "127.0.0.1:0"]);
        Self::start("mock", cmd).await
    }

    /// `offload serve` on a free port, calling `upstream` (an API base such as `http://127.0.0.1:9/v1`).
    pub async fn offload(exe: &Path, data_dir: &Path, upstream: &str, flush_ms: u64) -> Result<Self> {
        Self::offload_with(exe, data_dir, upstream, flush_ms, &[]).await
    }

    /// As [`Self::offload`], with more `serve` flags (`--store`, `--public-url` for a cluster node).
    pub async fn offload_with(
        exe: &Path,
        data_dir: &Path,
        upstream: &str,
        flush_ms: u64,
        extra: &[&str],
    ) -> Result<Self> {
        let mut cmd = Command::new(exe);
        serve_args(&mut cmd, data_dir, upstream, flush_ms).args(extra);
        Self::start("offload", cmd).await
    }

    /// `offload serve` as [`Self::offload`] starts it, run by a wrapper (`valgrind --tool=... `): `wrapper` is the
    /// program and its arguments before `exe`. The wrapper slows startup down, so it may take up to `startup`.
    pub async fn offload_wrapped(
        wrapper: &[String],
        exe: &Path,
        data_dir: &Path,
        upstream: &str,
        flush_ms: u64,
        startup: Duration,
    ) -> Result<Self> {
        let (program, args) = wrapper.split_first().ok_or_else(|| anyhow!("an empty wrapper command"))?;
        let mut cmd = Command::new(program);
        cmd.args(args).arg(exe);
        serve_args(&mut cmd, data_dir, upstream, flush_ms);
        Self::start_within("offload", cmd, startup).await
    }

    async fn start(name: &'static str, cmd: Command) -> Result<Self> {
        Self::start_within(name, cmd, Duration::from_secs(20)).await
    }

    async fn start_within(name: &'static str, mut cmd: Command, startup: Duration) -> Result<Self> {
        // The listening line is logged at info; only our variable decides, not the caller's environment. The lines
        // logged per request (access lines, `request finished`) are off: the benchmark measures the server.
        cmd.env("OFFLOAD_LOG", "info,offload::access=off,offload::requests=off").env_remove("RUST_LOG");
        for var in [
            "OFFLOAD_CONFIG",
            "OFFLOAD_PUBLIC_URL",
            "OFFLOAD_MOCK_UPSTREAM",
            "OFFLOAD_MAX_IN_FLIGHT",
            "OFFLOAD_STORE",
            "OFFLOAD_ADVERTISE_URL",
            "OFFLOAD_NODE_LEASE",
        ] {
            cmd.env_remove(var);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let pid = child.id().ok_or_else(|| anyhow!("{name} exited at once"))?;
        let stderr = child.stderr.take().ok_or_else(|| anyhow!("{name} has no stderr pipe"))?;
        let mut lines = BufReader::new(stderr).lines();
        let log = Arc::new(Mutex::new(Log::default()));
        let deadline = Instant::now() + startup;
        let addr = loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let line = tokio::time::timeout(remaining, lines.next_line())
                .await
                .map_err(|_| anyhow!("{name} did not report its address within {startup:?}"))?
                .with_context(|| format!("reading {name}'s log"))?;
            let Some(line) = line else {
                let tail = log.lock().tail.iter().cloned().collect::<Vec<_>>().join("\n");
                bail!("{name} exited before listening:\n{tail}");
            };
            let addr = listening_addr(&line);
            remember(&log, line);
            if let Some(addr) = addr {
                break addr;
            }
        };
        // The child blocks once its stderr pipe is full, so it is read to the end in the background.
        let drain = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                remember(&drain, line);
            }
        });
        Ok(Self { name, child, pid, addr, log })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Warnings and errors the child logged so far.
    pub fn log_counts(&self) -> (u64, u64) {
        let log = self.log.lock();
        (log.warnings, log.errors)
    }

    pub fn log_tail(&self, n: usize) -> Vec<String> {
        let log = self.log.lock();
        log.tail.iter().rev().take(n).rev().cloned().collect()
    }

    pub fn rss_kib(&self) -> Result<u64> {
        rss_kib(self.pid)
    }

    pub fn cpu_seconds(&self) -> Result<f64> {
        cpu_seconds(self.pid)
    }

    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid)).map(|d| d.count()).unwrap_or(0)
    }

    /// Asks the child to shut down (SIGTERM, through `kill(1)`: this crate has no unsafe code) and waits up to
    /// `limit` for it to exit; kills it if it does not. Returns its log lines from the end, up to 200.
    pub async fn terminate(mut self, limit: Duration) -> Result<Vec<String>> {
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .context("running kill -TERM")?;
        if !sent.success() {
            bail!("kill -TERM {} failed ({sent})", self.pid);
        }
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => {
                status.with_context(|| format!("reaping {}", self.name))?;
            }
            Err(_) => {
                let _ = self.child.start_kill();
                bail!("{} did not exit within {limit:?} of SIGTERM (killed)", self.name);
            }
        }
        Ok(self.log_tail(200))
    }

    /// Kills the child (SIGKILL: everything measured is already in hand) and reaps it.
    pub async fn stop(mut self) -> Result<()> {
        let _ = self.child.start_kill();
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .map_err(|_| anyhow!("{} did not exit after SIGKILL", self.name))?
            .with_context(|| format!("reaping {}", self.name))?;
        Ok(())
    }
}

/// The flags every scenario gives `offload serve`: a free port, the mock, a fresh data directory, the flush interval.
fn serve_args<'a>(cmd: &'a mut Command, data_dir: &Path, upstream: &str, flush_ms: u64) -> &'a mut Command {
    cmd.arg("serve")
        .args(["--listen", "127.0.0.1:0", "--upstream-url", upstream])
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--flush-interval-ms", &flush_ms.to_string()])
}

fn remember(log: &Mutex<Log>, line: String) {
    let mut log = log.lock();
    if line.contains(" WARN ") {
        log.warnings += 1;
    }
    if line.contains(" ERROR ") {
        log.errors += 1;
    }
    log.tail.push_back(line);
    while log.tail.len() > 200 {
        log.tail.pop_front();
    }
}

/// `... listening on 127.0.0.1:PORT (public URL ...)` (offload) or `... listening on http://127.0.0.1:PORT/v1`
/// (the mock).
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let (_, rest) = line.rsplit_once("listening on ")?;
    let token = rest.split_whitespace().next()?;
    let token = token.strip_prefix("http://").unwrap_or(token);
    let token = token.split('/').next()?;
    token.parse().ok()
}

/// Resident set size from `/proc/PID/status` (`VmRSS`), in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("reading /proc/PID/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// User plus system CPU time from `/proc/PID/stat` (fields 14 and 15, in clock ticks), in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).context("reading /proc/PID/stat")?;
    // The command name (field 2) may contain spaces; the fields after it start after the last ')'.
    let after = stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state), so field n is at index n - 3.
    let ticks = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let (utime, stime) = ticks(14).zip(ticks(15)).ok_or_else(|| anyhow!("no utime/stime in /proc/{pid}/stat"))?;
    Ok((utime + stime) as f64 / clock_ticks_per_second())
}

fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU seconds used so far by each thread of a process, summed by thread name (`tokio-runtime-w`, the SQLite
/// writer, the main thread...): shows which part of the server is the bottleneck.
pub fn thread_cpu(pid: u32) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for task in tasks.flatten() {
        let Ok(tid) = task.file_name().to_string_lossy().parse::<u32>() else { continue };
        let name = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap_or_default();
        let name = if tid == pid { "main".to_owned() } else { name.trim().to_owned() };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap_or_default();
        let Some((_, after)) = stat.rsplit_once(')') else { continue };
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        *out.entry(name).or_insert(0.0) += (ticks(14) + ticks(15)) as f64 / clock_ticks_per_second();
    }
    out
}

/// CPU used by a process over a window, as a fraction of one core.
pub struct CpuWindow {
    pid: u32,
    start_cpu: f64,
    start: Instant,
}

impl CpuWindow {
    pub fn start(pid: u32) -> Result<Self> {
        Ok(Self { pid, start_cpu: cpu_seconds(pid)?, start: Instant::now() })
    }

    pub fn cores(&self) -> Result<f64> {
        Ok((cpu_seconds(self.pid)? - self.start_cpu) / self.start.elapsed().as_secs_f64().max(1e-9))
    }
}

/// Busy CPU of the whole machine (all but idle and iowait in `/proc/stat`), in seconds.
fn machine_busy_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat.lines().next().filter(|l| l.starts_with("cpu ")).ok_or_else(|| anyhow!("no cpu line"))?;
    let ticks: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal ...; guest time is already counted in user.
    let busy: u64 = ticks.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum();
    Ok(busy as f64 / clock_ticks_per_second())
}

/// CPU over a window: each of our processes and the machine as a whole. What the machine used beyond our
/// processes ran on the same two cores and is reported beside each figure (`foreign`).
pub struct Usage {
    procs: Vec<CpuWindow>,
    /// The database whose PostgreSQL backends are counted apart (`db_cores`), and their CPU at the start.
    db: Option<(String, HashMap<u32, f64>)>,
    machine_start: f64,
    start: Instant,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct UsageReport {
    /// Cores used by each process given to [`Usage::start`], in that order.
    pub cores: Vec<f64>,
    /// Cores used by the PostgreSQL backends serving the database given to [`Usage::start_with_db`].
    pub db_cores: f64,
    /// Cores used by everything else on the machine (other users' builds, tests, ...).
    pub foreign_cores: f64,
}

impl Usage {
    pub fn start(pids: &[u32]) -> Result<Self> {
        Self::start_with_db(pids, None)
    }

    /// As [`Self::start`], also counting the PostgreSQL backends of database `db` apart from the foreign CPU.
    pub fn start_with_db(pids: &[u32], db: Option<&str>) -> Result<Self> {
        Ok(Self {
            procs: pids.iter().map(|&p| CpuWindow::start(p)).collect::<Result<_>>()?,
            db: db.map(|name| (name.to_owned(), backend_cpu(name))),
            machine_start: machine_busy_seconds()?,
            start: Instant::now(),
        })
    }

    pub fn report(&self) -> Result<UsageReport> {
        let cores = self.procs.iter().map(CpuWindow::cores).collect::<Result<Vec<_>>>()?;
        let wall = self.start.elapsed().as_secs_f64().max(1e-9);
        let machine = (machine_busy_seconds()? - self.machine_start) / wall;
        let db_cores = match &self.db {
            Some((name, before)) => {
                let used: f64 = backend_cpu(name)
                    .iter()
                    .map(|(pid, now)| now - before.get(pid).copied().unwrap_or(0.0))
                    .filter(|d| *d > 0.0)
                    .sum();
                used / wall
            }
            None => 0.0,
        };
        Ok(UsageReport { foreign_cores: (machine - cores.iter().sum::<f64>() - db_cores).max(0.0), cores, db_cores })
    }
}

/// CPU seconds so far of each PostgreSQL backend serving database `db` (PostgreSQL sets a backend's command line
/// to name its database). The shared background processes (WAL writer,
/// checkpointer) are not counted; a backend that exits within a window takes its time with it.
pub fn backend_cpu(db: &str) -> HashMap<u32, f64> {
    let mut out = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return out };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if is_backend_of(&cmdline, db)
            && let Ok(cpu) = cpu_seconds(pid)
        {
            out.insert(pid, cpu);
        }
    }
    out
}

/// `postgres: [CLUSTER: ]USER DATABASE CLIENT STATE`; the scratch database's name is random, so a word equal to it
/// is enough.
fn is_backend_of(cmdline: &str, db: &str) -> bool {
    cmdline.starts_with("postgres:") && cmdline.split(|c: char| c.is_whitespace() || c == '\0').any(|w| w == db)
}

/// Busy cores on the whole machine over `window`.
pub async fn machine_cores(window: Duration) -> Result<f64> {
    let start = machine_busy_seconds()?;
    let t = Instant::now();
    tokio::time::sleep(window).await;
    Ok((machine_busy_seconds()? - start) / t.elapsed().as_secs_f64().max(1e-9))
}

/// Waits (at most `limit`) until the machine is quiet, i.e. something else (a build, a test run) is not
/// taking the cores the measurement needs; call it while our own processes are idle. Returns the busy cores
/// seen last.
pub async fn wait_quiet(limit: Duration) -> Result<f64> {
    let deadline = Instant::now() + limit;
    loop {
        let busy = machine_cores(Duration::from_millis(500)).await?;
        if busy < QUIET_CORES || Instant::now() >= deadline {
            if busy >= QUIET_CORES {
                tracing::warn!("the machine is still busy ({busy:.2} cores used by other processes); measuring anyway");
            }
            return Ok(busy);
        }
        tracing::info!("waiting for the machine to be quiet ({busy:.2} cores busy elsewhere)");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Busy cores below which the machine counts as quiet.
pub const QUIET_CORES: f64 = 0.25;

/// Samples a process's RSS every `every` and keeps the peak, until stopped.
pub struct RssPeak {
    peak: Arc<Mutex<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl RssPeak {
    pub fn start(pid: u32, every: Duration) -> Self {
        let peak = Arc::new(Mutex::new(rss_kib(pid).unwrap_or(0)));
        let shared = peak.clone();
        let task = tokio::spawn(async move {
            loop {
                if let Ok(rss) = rss_kib(pid) {
                    let mut p = shared.lock();
                    *p = (*p).max(rss);
                }
                tokio::time::sleep(every).await;
            }
        });
        Self { peak, task }
    }

    pub fn stop(self) -> u64 {
        self.task.abort();
        *self.peak.lock()
    }
}

/// A fresh data directory for one offload process; removed when dropped.
pub struct DataDir(PathBuf);

impl DataDir {
    pub fn new(root: &Path, name: &str) -> Result<Self> {
        let dir = root.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn db(&self) -> PathBuf {
        self.0.join("offload.db")
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Rows in offload's `events` table: what has been persisted. Read-only, beside the running server (WAL).
pub fn persisted_events(db: &Path) -> Result<u64> {
    let conn = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening {}", db.display()))?;
    conn.busy_timeout(Duration::from_secs(5)).context("setting busy_timeout")?;
    let count: i64 =
        conn.query_row("SELECT count(*) FROM events", [], |r| r.get(0)).context("counting persisted events")?;
    Ok(u64::try_from(count).unwrap_or(0))
}

/// offload's `/healthz`: how many requests are running.
pub async fn in_flight(client: &reqwest::Client, base: &str) -> Result<u64> {
    let v: serde_json::Value = client
        .get(format!("{base}/healthz"))
        .send()
        .await
        .context("GET /healthz")?
        .json()
        .await
        .context("reading /healthz")?;
    v.get("in_flight").and_then(serde_json::Value::as_u64).ok_or_else(|| anyhow!("/healthz has no in_flight"))
}

/// Waits (bounded) until offload runs no request, so one step's background work does not leak into the next.
pub async fn wait_idle(client: &reqwest::Client, base: &str, limit: Duration) -> Result<bool> {
    let deadline = Instant::now() + limit;
    loop {
        if in_flight(client, base).await? == 0 {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_listening_lines_parse() {
        let offload = "2026-01-01T00:00:00Z  INFO offload::startup: offload 0.1.0 listening on 127.0.0.1:41234 (public URL http://127.0.0.1:41234)";
        assert_eq!(listening_addr(offload), Some("127.0.0.1:41234".parse().unwrap()));
        let mock = "2026-01-01T00:00:00Z  INFO offload::cli: mock upstream listening on http://127.0.0.1:40000/v1";
        assert_eq!(listening_addr(mock), Some("127.0.0.1:40000".parse().unwrap()));
    }

    #[test]
    fn backends_are_told_apart_by_database() {
        assert!(is_backend_of("postgres: 15/main: postgres offload_bench_ab 127.0.0.1(5000) idle", "offload_bench_ab"));
        assert!(is_backend_of("postgres: postgres offload_bench_ab 127.0.0.1(5000) idle\0\0", "offload_bench_ab"));
        assert!(!is_backend_of("postgres: postgres offload_bench_abc 127.0.0.1(5000) idle", "offload_bench_ab"));
        assert!(!is_backend_of("postgres: 15/main: walwriter", "offload_bench_ab"));
        assert!(!is_backend_of("rustc --crate-name offload_bench_ab", "offload_bench_ab"));
    }

    #[test]
    fn own_process_can_be_read() {
        let pid = std::process::id();
        assert!(rss_kib(pid).unwrap() > 0);
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
    }
}
