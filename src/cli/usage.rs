//! `offload usage`: requests and tokens per service key, model and UTC day, from the store the server uses (every
//! node's, on a shared store), as a table or as JSON.

use super::keys::{StoreArgs, open};
use crate::store::usage::{By, UsageOf, group, since_day};
use clap::Args;
use std::io::Write;

#[derive(Args, Debug)]
pub struct UsageArgs {
    /// Group by `key`, `model` and/or `day` (repeat it, or give a list such as `key,model`) [default: all three].
    #[arg(long, value_name = "key|model|day")]
    by: Vec<String>,
    /// From which UTC day on: `Nd` for the last N days with today (`1d`: today only), or a day `YYYY-MM-DD`.
    #[arg(long, default_value = "7d")]
    since: String,
    /// Print `{"data": [...]}` instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

pub async fn run(args: UsageArgs) -> Result<(), String> {
    let by = By::parse(args.by.iter().map(String::as_str))?;
    let since = since_day(&args.since, time::OffsetDateTime::now_utc().date())?;
    let store = open(args.store).await?;
    let rows = store.usage(UsageOf::All, &since).await.map_err(|e| e.to_string())?;
    let groups = group(&rows, &by);
    let mut out = std::io::stdout().lock();
    let io = |e: std::io::Error| e.to_string();
    if args.json {
        let json = serde_json::to_string_pretty(&serde_json::json!({ "data": groups })).map_err(|e| e.to_string())?;
        return writeln!(out, "{json}").map_err(io);
    }
    writeln!(out, "{}", line(&by, ["KEY", "MODEL", "DAY"], ["REQUESTS", "INPUT TOKENS", "OUTPUT TOKENS"]))
        .map_err(io)?;
    for g in &groups {
        let key = g.key.as_ref().map(|k| k.as_deref().unwrap_or("(none)"));
        let fields = [key.unwrap_or(""), g.model.as_deref().unwrap_or(""), g.day.as_deref().unwrap_or("")];
        let sums = [g.requests.to_string(), g.input_tokens.to_string(), g.output_tokens.to_string()];
        writeln!(out, "{}", line(&by, fields, sums.each_ref().map(String::as_str))).map_err(io)?;
    }
    if groups.is_empty() {
        writeln!(out, "(no requests since {since})").map_err(io)?;
    }
    Ok(())
}

/// One line of the table: the grouped fields, then the sums.
fn line(by: &[By], [key, model, day]: [&str; 3], [requests, input, output]: [&str; 3]) -> String {
    let mut line = String::new();
    for field in by {
        match field {
            By::Key => line.push_str(&format!("{key:<13} ")),
            By::Model => line.push_str(&format!("{model:<28} ")),
            By::Day => line.push_str(&format!("{day:<10} ")),
        }
    }
    line.push_str(&format!("{requests:>9} {input:>14} {output:>14}"));
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_has_the_grouped_fields_then_the_sums() {
        let line = line(&[By::Key, By::Day], ["key_1", "m", "2026-01-01"], ["1", "2", "3"]);
        assert!(line.starts_with("key_1 ") && line.contains("2026-01-01") && !line.contains(" m "), "{line}");
    }
}
