//! The report: what machine and command, a table per scenario, the targets with how far each is, and the
//! JSON file.

mod cluster;
mod machine;
mod profile;
mod single_node;
mod table;
mod targets;

pub use machine::Machine;
pub use targets::{Target, targets};

use super::scenarios::profile::Profile;
use super::scenarios::{
    cluster::Cluster, concurrency::Concurrency, create::Sweep, fanout::Fanout, relay::Relay, ttft::Ttft,
};
use anyhow::{Context, Result};
use serde::Serialize;
use std::io::Write;

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
    let mut tables = single_node::tables(r);
    if let Some(p) = &r.profile {
        tables.push(profile::profile_table(p));
    }
    if let Some(c) = &r.cluster {
        tables.extend(cluster::cluster_tables(c));
    }
    tables.push(targets::table(r));
    for table in &tables {
        table.render(&mut out).context("writing the report")?;
    }
    if let Some(p) = &r.profile {
        profile::print_top(&mut out, p)?;
    }
    for note in &r.notes {
        writeln!(out, "\nnote: {note}").context("writing the report")?;
    }
    Ok(())
}
