//! The cluster scenario's tables: create, follow and throughput.

use super::table::{Table, cores, ms};
use crate::scenarios::cluster::Cluster;

pub(super) fn cluster_tables(c: &Cluster) -> Vec<Table> {
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
