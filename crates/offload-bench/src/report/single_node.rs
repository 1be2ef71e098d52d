//! The tables of the single-node scenarios: create, time to first token, relay, concurrency, fan-out.

use super::Results;
use super::table::{Table, flush, ms};

/// One table per single-node scenario (two for create), in the order the report prints them.
pub(super) fn tables(r: &Results) -> Vec<Table> {
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
    let notes: Vec<&str> = r.ttft.iter().flat_map(|x| x.notes.iter().map(String::as_str)).collect();
    tables.push(Table {
        title: format!(
            "time to first chunk by path (ms; added = to the mock's own){}",
            if notes.is_empty() { String::new() } else { format!(": {}", notes.join("; ")) }
        ),
        header: vec!["flush", "path", "n", "p50", "p99", "added p50", "added p99"],
        rows: r
            .ttft
            .iter()
            .flat_map(|x| {
                x.paths.iter().map(|p| {
                    vec![
                        format!("{} ms", x.flush_interval_ms),
                        p.path.to_owned(),
                        p.summary.count.to_string(),
                        ms(p.summary.p50_us),
                        ms(p.summary.p99_us),
                        ms(p.added_p50_us),
                        ms(p.added_p99_us),
                    ]
                })
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
    tables
}
