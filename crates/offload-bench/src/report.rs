//! The report: what machine and command, a table per scenario, the targets with how far each is, and the
//! JSON file.

use super::scenarios::cluster::Cluster;
use super::scenarios::profile::Profile;
use super::scenarios::{concurrency::Concurrency, create::Sweep, fanout::Fanout, relay::Relay, ttft::Ttft};
use anyhow::{Context, Result};
use serde::Serialize;
use std::io::Write;

#[derive(Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub mem_total_gib: f64,
    pub kernel: String,
    pub open_files_limit: String,
}

impl Machine {
    fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        Self {
            nproc: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
                .unwrap_or_default(),
            mem_total_gib: meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
                .map(|kib| kib / 1024.0 / 1024.0)
                .unwrap_or(0.0),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned(),
            open_files_limit: limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .map(|l| l.split_whitespace().skip(3).take(2).collect::<Vec<_>>().join(" soft/hard "))
                .unwrap_or_default(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Results {
    pub date: String,
    pub command: String,
    pub quick: bool,
    pub machine: Machine,
    pub wall_secs: f64,
    pub create: Vec<Sweep>,
    pub ttft: Vec<Ttft>,
    pub relay: Vec<Relay>,
    pub concurrency: Vec<Concurrency>,
    pub fanout: Vec<Fanout>,
    pub cluster: Option<Cluster>,
    pub profile: Option<Profile>,
    pub targets: Vec<Target>,
    /// What was skipped and why.
    pub notes: Vec<String>,
}

impl Results {
    pub fn new(quick: bool) -> Self {
        Self {
            date: time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            command: std::env::args().map(|a| super::postgres::redact(&a)).collect::<Vec<_>>().join(" "),
            quick,
            machine: Machine::read(),
            wall_secs: 0.0,
            create: Vec::new(),
            ttft: Vec::new(),
            relay: Vec::new(),
            concurrency: Vec::new(),
            fanout: Vec::new(),
            cluster: None,
            profile: None,
            targets: Vec::new(),
            notes: Vec::new(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Target {
    pub target: String,
    pub scope: String,
    pub measured: String,
    pub met: bool,
}

fn target(list: &mut Vec<Target>, target: &str, scope: String, measured: String, met: bool) {
    list.push(Target { target: target.into(), scope, measured, met });
}

fn flush(ms: Option<u64>) -> String {
    ms.map_or_else(|| "-".into(), |m| format!("{m} ms"))
}

/// Each target against what this run measured.
pub fn targets(r: &Results) -> Vec<Target> {
    let mut t = Vec::new();
    for s in r.create.iter().filter(|s| s.target != "floor") {
        let scope = format!("{} create, flush {}", s.target, flush(s.flush_interval_ms));
        let step = s.steps.iter().find(|st| st.result.rate == 2_000);
        let (measured, met) = match step {
            Some(st) => (
                format!(
                    "p99 {:.3} ms{}",
                    st.result.latency.p99_us / 1000.0,
                    if st.result.clean() { String::new() } else { " (errors or shed)".into() }
                ),
                st.result.clean() && st.result.latency.p99_us < 1_000.0,
            ),
            None => ("not measured at 2,000 req/s".into(), false),
        };
        target(&mut t, "create p99 < 1 ms at 2,000 req/s", scope.clone(), measured, met);
        let held = s.held_rps.map_or("none".into(), |r| format!("{r} req/s"));
        target(
            &mut t,
            "create saturation > 10,000 req/s (highest rate with p99 < 5 ms)",
            scope,
            held,
            s.held_rps.is_some_and(|r| r > 10_000),
        );
    }
    for x in &r.ttft {
        target(
            &mut t,
            "TTFT added p99 < 0.5 ms",
            format!("flush {} ms", x.flush_interval_ms),
            added_p99(x.added_p99_us, x.offload.p99_us, x.floor.p99_us),
            x.added_p99_us < 500.0 && x.errors == 0,
        );
    }
    for x in r.relay.iter().filter(|x| x.stalled_readers == 0) {
        target(
            &mut t,
            "per-chunk relay added p99 < 0.2 ms",
            format!("flush {} ms", x.flush_interval_ms),
            added_p99(x.added_p99_us, x.offload.p99_us, x.floor.p99_us),
            x.added_p99_us < 200.0 && x.errors == 0,
        );
    }
    for pair in r.relay.chunks(2) {
        if let [plain, stalled] = pair {
            let allowed = plain.offload.p99_us + (plain.offload.p99_us * 0.25).max(100.0);
            target(
                &mut t,
                "a stalled reader never raises another reader's latency (relay p99 within max(25%, 0.1 ms))",
                format!("flush {} ms, {} stalled readers", stalled.flush_interval_ms, stalled.stalled_readers),
                format!("p99 {:.3} ms vs {:.3} ms without", stalled.offload.p99_us / 1e3, plain.offload.p99_us / 1e3),
                stalled.offload.p99_us <= allowed && stalled.errors == 0,
            );
        }
    }
    for c in r.concurrency.iter().filter(|c| c.target == "offload") {
        let scope = format!("{} streams, flush {}", c.streams, flush(c.flush_interval_ms));
        if c.streams >= 10_000 {
            target(
                &mut t,
                "10,000 concurrent streaming requests with no errors",
                scope.clone(),
                format!("{} errors {:?}", c.errors, c.error_kinds),
                c.errors == 0,
            );
        }
        let worst = c.rss_per_request_hold_kib.max(c.rss_per_request_peak_kib);
        target(
            &mut t,
            "<= 32 KiB RSS per in-flight request",
            scope,
            format!("{:.1} KiB at hold, {:.1} KiB at peak", c.rss_per_request_hold_kib, c.rss_per_request_peak_kib),
            worst <= 32.0,
        );
    }
    for f in &r.fanout {
        target(
            &mut t,
            "<= 4 KiB RSS per idle reader",
            format!("{} readers over {}", f.readers, f.http),
            format!("{:.2} KiB", f.rss_per_idle_reader_bytes / 1024.0),
            f.rss_per_idle_reader_bytes <= 4096.0 && f.idle_when_measured,
        );
    }
    if let Some(c) = &r.cluster {
        for f in &c.follow {
            if let (Some(added), Some(remote)) = (&f.added, &f.remote) {
                target(
                    &mut t,
                    "cross-node follow added p99 < 20 ms (reader on another node vs on the owner)",
                    format!("{}, flush {} ms", f.setup, c.flush_interval_ms),
                    format!(
                        "{:.3} ms per chunk (remote p99 {:.3}, local p99 {:.3})",
                        added.p99_us / 1e3,
                        remote.p99_us / 1e3,
                        f.local.p99_us / 1e3
                    ),
                    added.p99_us < 20_000.0 && f.errors == 0 && f.unmatched == 0,
                );
            }
        }
        for x in c.throughput.iter().filter(|x| x.nodes > 1) {
            target(
                &mut t,
                "cluster: every event of every stream arrives (readers on other nodes)",
                format!("{}, {} streams", x.setup, x.streams),
                format!("{} of {} events, {} errors {:?}", x.events, x.expected_events, x.errors, x.error_kinds),
                x.complete,
            );
        }
    }
    t
}

struct Table {
    title: String,
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn render(&self, out: &mut impl Write) -> std::io::Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.len()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        writeln!(out, "\n{}", self.title)?;
        let line = |cells: Vec<&str>| {
            cells.iter().zip(&widths).map(|(c, w)| format!("{c:>w$}")).collect::<Vec<_>>().join("  ")
        };
        writeln!(out, "{}", line(self.header.clone()))?;
        for row in &self.rows {
            writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
        }
        Ok(())
    }
}

fn ms(us: f64) -> String {
    format!("{:.3}", us / 1000.0)
}

pub fn print(r: &Results) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "\noffload-bench, {} ({}), {} x {}, {:.0} GiB, {:.0} s",
        r.date,
        if r.quick { "quick" } else { "full" },
        r.machine.nproc,
        r.machine.cpu_model,
        r.machine.mem_total_gib,
        r.wall_secs
    )
    .context("writing the report")?;
    let mut tables = Vec::new();
    tables.push(Table {
        title: "create (open loop; latency from the scheduled send, ms; floor = POST to the mock)".into(),
        header: vec![
            "target", "flush", "req/s", "p50", "p99", "p99.9", "ok", "err", "shed", "got/s", "srv cpu", "mock cpu",
            "gen cpu", "foreign",
        ],
        rows: r
            .create
            .iter()
            .flat_map(|s| {
                s.steps.iter().map(|st| {
                    let x = &st.result;
                    vec![
                        s.target.clone(),
                        flush(s.flush_interval_ms),
                        x.rate.to_string(),
                        ms(x.latency.p50_us),
                        ms(x.latency.p99_us),
                        ms(x.latency.p999_us),
                        x.ok.to_string(),
                        x.errors.to_string(),
                        x.shed.to_string(),
                        format!("{:.0}", x.achieved_rps),
                        format!("{:.2}", st.server_cores),
                        format!("{:.2}", st.mock_cores),
                        format!("{:.2}", st.bench_cores),
                        format!("{:.2}", st.foreign_cores),
                    ]
                })
            })
            .collect(),
    });
    tables.push(Table {
        title: "create: highest rate held with p99 < 5 ms".into(),
        header: vec!["target", "flush", "held req/s", "p99 at 2000/s"],
        rows: r
            .create
            .iter()
            .map(|s| {
                vec![
                    s.target.clone(),
                    flush(s.flush_interval_ms),
                    s.held_rps.map_or("none".into(), |v| v.to_string()),
                    s.p99_at(2_000).map_or("-".into(), ms),
                ]
            })
            .collect(),
    });
    tables.push(Table {
        title: "time to first token (ms; floor = the mock's own streaming call)".into(),
        header: vec![
            "flush",
            "n",
            "floor p50",
            "floor p99",
            "offload p50",
            "offload p99",
            "added p50",
            "added p99",
            "err",
            "foreign",
        ],
        rows: r
            .ttft
            .iter()
            .map(|x| {
                vec![
                    format!("{} ms", x.flush_interval_ms),
                    x.offload.count.to_string(),
                    ms(x.floor.p50_us),
                    ms(x.floor.p99_us),
                    ms(x.offload.p50_us),
                    ms(x.offload.p99_us),
                    ms(x.added_p50_us),
                    ms(x.added_p99_us),
                    x.errors.to_string(),
                    format!("{:.2}", x.foreign_cores),
                ]
            })
            .collect(),
    });
    tables.push(Table {
        title: "per-chunk relay (ms from the tap handing a chunk on to the reader receiving it)".into(),
        header: vec![
            "flush",
            "stalled",
            "chunks",
            "floor p50",
            "floor p99",
            "offload p50",
            "offload p99",
            "off p99.9",
            "added p50",
            "added p99",
            "err",
            "foreign",
        ],
        rows: r
            .relay
            .iter()
            .map(|x| {
                vec![
                    format!("{} ms", x.flush_interval_ms),
                    x.stalled_readers.to_string(),
                    x.offload.count.to_string(),
                    ms(x.floor.p50_us),
                    ms(x.floor.p99_us),
                    ms(x.offload.p50_us),
                    ms(x.offload.p99_us),
                    ms(x.offload.p999_us),
                    ms(x.added_p50_us),
                    ms(x.added_p99_us),
                    (x.errors + x.unmatched).to_string(),
                    format!("{:.2}", x.foreign_cores),
                ]
            })
            .collect(),
    });
    tables.push(Table {
        title: "concurrency (64 chunks at 20 ms per stream, one reader each over h2c)".into(),
        header: vec![
            "target",
            "flush",
            "N",
            "in flight",
            "chunks/s",
            "offered/s",
            "persisted/s",
            "lag ms",
            "srv cpu",
            "mock cpu",
            "gen cpu",
            "foreign",
            "KiB/req hold",
            "KiB/req peak",
            "fds",
            "err",
        ],
        rows: r
            .concurrency
            .iter()
            .map(|c| {
                vec![
                    c.target.clone(),
                    flush(c.flush_interval_ms),
                    c.streams.to_string(),
                    c.in_flight_at_hold.map_or_else(|| c.attached.to_string(), |v| v.to_string()),
                    format!("{:.0}", c.chunks_per_sec),
                    format!("{:.0}", c.offered_chunks_per_sec),
                    c.persisted_per_sec.map_or("-".into(), |v| format!("{v:.0}")),
                    c.persist_lag_ms.map_or("-".into(), |v| format!("{v:.0}")),
                    format!("{:.2}", c.server_cores),
                    format!("{:.2}", c.mock_cores),
                    format!("{:.2}", c.bench_cores),
                    format!("{:.2}", c.foreign_cores),
                    format!("{:.1}", c.rss_per_request_hold_kib),
                    format!("{:.1}", c.rss_per_request_peak_kib),
                    c.open_fds_at_hold.to_string(),
                    c.errors.to_string(),
                ]
            })
            .collect(),
    });
    tables.push(Table {
        title: "fan-out (one request, N readers; 32 chunks at 100 ms; delivery ms from the tap)".into(),
        header: vec![
            "http",
            "N",
            "idle",
            "B/reader",
            "delivery p50",
            "delivery p99",
            "p99.9",
            "floor p99",
            "all done s",
            "srv cpu",
            "gen cpu",
            "foreign",
            "fds",
            "err",
        ],
        rows: r
            .fanout
            .iter()
            .map(|f| {
                vec![
                    f.http.clone(),
                    f.readers.to_string(),
                    f.idle_when_measured.to_string(),
                    format!("{:.0}", f.rss_per_idle_reader_bytes),
                    ms(f.delivery.p50_us),
                    ms(f.delivery.p99_us),
                    ms(f.delivery.p999_us),
                    ms(f.floor.p99_us),
                    format!("{:.2}", f.all_done_secs),
                    format!("{:.2}", f.server_cores),
                    format!("{:.2}", f.bench_cores),
                    format!("{:.2}", f.foreign_cores),
                    f.open_fds_at_hold.to_string(),
                    (f.errors + f.unmatched).to_string(),
                ]
            })
            .collect(),
    });
    if let Some(p) = &r.profile {
        tables.push(profile_table(p));
    }
    if let Some(c) = &r.cluster {
        tables.extend(cluster_tables(c));
    }
    tables.push(Table {
        title: "targets".into(),
        header: vec!["met", "target", "scope", "measured"],
        rows: r
            .targets
            .iter()
            .map(|t| {
                vec![if t.met { "yes" } else { "NO" }.into(), t.target.clone(), t.scope.clone(), t.measured.clone()]
            })
            .collect(),
    });
    for table in &tables {
        table.render(&mut out).context("writing the report")?;
    }
    if let Some(p) = &r.profile {
        for (title, lines) in [
            ("self cost (from the dump)", &p.top_exclusive),
            ("inclusive (callgrind_annotate --inclusive=yes)", &p.top_inclusive),
        ] {
            writeln!(out, "\nprofile: top functions of the lifecycle window, {title}").context("writing the report")?;
            for line in lines.iter().take(10) {
                writeln!(out, "  {line}").context("writing the report")?;
            }
        }
    }
    for note in &r.notes {
        writeln!(out, "\nnote: {note}").context("writing the report")?;
    }
    Ok(())
}

fn cores(v: f64) -> String {
    format!("{v:.2}")
}

fn profile_table(p: &Profile) -> Table {
    let count = |v: f64| format!("{v:.0}");
    Table {
        title: format!(
            "profile (offload under valgrind: {}; instructions by callgrind windows, {})",
            p.valgrind,
            match &p.allocations_note {
                Some(_) => "allocations not counted: a jemalloc build, invisible to dhat (see --alloc-binary)".into(),
                None => format!("allocations by dhat runs of {}", p.allocations_binary),
            }
        ),
        header: vec!["unit", "instructions", "allocations", "bytes allocated"],
        rows: vec![
            vec![
                format!("lifecycle (async, 4 words, {:.1} status reads)", p.status_reads_per_lifecycle),
                count(p.instructions_per_lifecycle),
                p.allocations_per_lifecycle.map_or("-".into(), |v| format!("{v:.1}")),
                p.bytes_per_lifecycle.map_or("-".into(), count),
            ],
            vec![
                "relayed chunk (stream, 1 reader)".into(),
                count(p.instructions_per_chunk),
                p.allocations_per_chunk.map_or("-".into(), |v| format!("{v:.2}")),
                p.bytes_per_chunk.map_or("-".into(), count),
            ],
            vec![
                "lifecycle, one status read".into(),
                count(p.instructions_per_lifecycle_one_read),
                "-".into(),
                "-".into(),
            ],
            vec!["status read (done request)".into(), count(p.instructions_per_status_read), "-".into(), "-".into()],
            vec!["idle second (timers)".into(), count(p.idle_instructions_per_sec), "-".into(), "-".into()],
        ],
    }
}

fn cluster_tables(c: &Cluster) -> Vec<Table> {
    let create = Table {
        title: format!(
            "cluster: create (stream-chatgpt, open loop, round-robin over the nodes; ms from the scheduled send; flush {} ms)",
            c.flush_interval_ms
        ),
        header: vec![
            "setup", "req/s", "p50", "p99", "max", "ok", "err", "shed", "got/s", "srv cpu", "db cpu", "mock cpu",
            "gen cpu", "foreign",
        ],
        rows: c
            .create
            .iter()
            .flat_map(|s| {
                s.steps.iter().map(|st| {
                    let x = &st.result;
                    vec![
                        s.target.clone(),
                        x.rate.to_string(),
                        ms(x.latency.p50_us),
                        ms(x.latency.p99_us),
                        ms(x.latency.max_us),
                        x.ok.to_string(),
                        x.errors.to_string(),
                        x.shed.to_string(),
                        format!("{:.0}", x.achieved_rps),
                        cores(st.server_cores),
                        cores(st.db_cores),
                        cores(st.mock_cores),
                        cores(st.bench_cores),
                        cores(st.foreign_cores),
                    ]
                })
            })
            .collect(),
    };
    let dash = || "-".to_owned();
    let follow = Table {
        title: "cluster: follow (ms from the tap handing a chunk on; local = reader on the node running the stream, \
                remote = reader on another node; added = remote - local per chunk)"
            .into(),
        header: vec![
            "setup",
            "chunks",
            "floor p50",
            "floor p99",
            "local p50",
            "local p99",
            "remote p50",
            "remote p99",
            "added p50",
            "added p99",
            "added max",
            "err",
            "srv cpu",
            "db cpu",
            "foreign",
        ],
        rows: c
            .follow
            .iter()
            .map(|f| {
                let remote = f.remote.as_ref();
                let added = f.added.as_ref();
                vec![
                    f.setup.clone(),
                    f.local.count.to_string(),
                    ms(f.floor.p50_us),
                    ms(f.floor.p99_us),
                    ms(f.local.p50_us),
                    ms(f.local.p99_us),
                    remote.map_or_else(dash, |x| ms(x.p50_us)),
                    remote.map_or_else(dash, |x| ms(x.p99_us)),
                    added.map_or_else(dash, |x| ms(x.p50_us)),
                    added.map_or_else(dash, |x| ms(x.p99_us)),
                    added.map_or_else(dash, |x| ms(x.max_us)),
                    (f.errors + f.unmatched).to_string(),
                    cores(f.server_cores),
                    cores(f.db_cores),
                    cores(f.foreign_cores),
                ]
            })
            .collect(),
    };
    let throughput = Table {
        title:
            "cluster: throughput (64 chunks at 20 ms per stream, created round-robin, read on the next node over h2c)"
                .into(),
        header: vec![
            "setup",
            "N",
            "remote",
            "chunks/s",
            "offered/s",
            "events",
            "expected",
            "complete",
            "persisted",
            "srv cpu",
            "db cpu",
            "mock cpu",
            "gen cpu",
            "foreign",
            "err",
        ],
        rows: c
            .throughput
            .iter()
            .map(|x| {
                vec![
                    x.setup.clone(),
                    x.streams.to_string(),
                    x.remote_readers.to_string(),
                    format!("{:.0}", x.chunks_per_sec),
                    format!("{:.0}", x.offered_chunks_per_sec),
                    x.events.to_string(),
                    x.expected_events.to_string(),
                    x.complete.to_string(),
                    x.persisted.map_or_else(dash, |v| v.to_string()),
                    cores(x.server_cores),
                    cores(x.db_cores),
                    cores(x.mock_cores),
                    cores(x.bench_cores),
                    cores(x.foreign_cores),
                    x.errors.to_string(),
                ]
            })
            .collect(),
    };
    vec![create, follow, throughput]
}

/// "added p99 (offload p99, floor p99)" in ms, as the TTFT and relay target rows show it.
fn added_p99(added_us: f64, offload_us: f64, floor_us: f64) -> String {
    format!("{:.3} ms (offload {:.3}, floor {:.3})", added_us / 1e3, offload_us / 1e3, floor_us / 1e3)
}
