//! The profile's part of the report: its table of costs per unit, and its top functions.

use super::table::Table;
use crate::scenarios::profile::Profile;
use anyhow::{Context, Result};
use std::io::Write;

pub(super) fn profile_table(p: &Profile) -> Table {
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

/// The top functions of the lifecycle window, self cost and inclusive, after the tables.
pub(super) fn print_top(out: &mut impl Write, p: &Profile) -> Result<()> {
    for (title, lines) in [
        ("self cost (from the dump)", &p.top_exclusive),
        ("inclusive (callgrind_annotate --inclusive=yes)", &p.top_inclusive),
    ] {
        writeln!(out, "\nprofile: top functions of the lifecycle window, {title}").context("writing the report")?;
        for line in lines.iter().take(10) {
            writeln!(out, "  {line}").context("writing the report")?;
        }
    }
    Ok(())
}
