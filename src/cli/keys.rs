//! `offload keys create | list | revoke`: manage service keys in the same store the server uses, also while it
//! runs.

use crate::domain::service_key::new_key_id;
use crate::domain::{ApiKey, KeyLimits, ServiceKey};
use crate::settings::{ServeArgs, Settings};
use crate::store::{Conflict, KeyStore, StoreError};
use clap::{Args, Subcommand};
use std::io::Write;
use std::path::PathBuf;

/// Where the store is: the same flags, environment and config file as `offload serve`.
#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// TOML config file (only its store settings are used here).
    #[arg(long, env = "OFFLOAD_CONFIG")]
    config: Option<PathBuf>,
    /// Directory of the SQLite store [default: ./offload-data].
    #[arg(long, env = "OFFLOAD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The shared PostgreSQL store (`postgres://...`), as given to `offload serve --store`.
    #[arg(long, env = "OFFLOAD_STORE", hide_env_values = true)]
    store: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Create a key and print it (the only time it is shown).
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        requests_per_day: Option<u64>,
        #[arg(long)]
        requests_per_month: Option<u64>,
        /// Requests per second.
        #[arg(long)]
        rate: Option<f64>,
        /// Requests of this key running at once.
        #[arg(long)]
        max_in_flight: Option<u32>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List keys with their limits and usage today and this month.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Revoke a key by name or id; it stops working within a second.
    Revoke {
        name_or_id: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

async fn open(args: StoreArgs) -> Result<std::sync::Arc<dyn KeyStore>, String> {
    let settings = Settings::resolve(ServeArgs {
        config: args.config,
        data_dir: args.data_dir,
        store: args.store,
        ..ServeArgs::default()
    })
    .map_err(|e| e.to_string())?;
    Ok(settings.store.location.open().await.map_err(|e| e.to_string())?.keys)
}

fn limit(value: Option<u64>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}

pub async fn run(command: KeysCommand) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let io = |e: std::io::Error| e.to_string();
    match command {
        KeysCommand::Create { name, requests_per_day, requests_per_month, rate, max_in_flight, store } => {
            if name.trim().is_empty() {
                return Err("--name must not be empty".into());
            }
            if rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
                return Err("--rate must be a positive number of requests per second".into());
            }
            let store = open(store).await?;
            let secret = ApiKey::generate().map_err(|e| e.to_string())?;
            let key = ServiceKey {
                id: new_key_id().map_err(|e| e.to_string())?,
                name: name.trim().to_owned(),
                created_at: now,
                revoked_at: None,
                limits: KeyLimits { requests_per_day, requests_per_month, rate, max_in_flight },
            };
            store.create_key(&key, secret.hash()).await.map_err(|e| match e {
                StoreError::Conflict(Conflict::KeyNameTaken) => {
                    format!("a key named {:?} already exists; choose another --name", key.name)
                }
                e => e.to_string(),
            })?;
            writeln!(out, "created key {:?} ({}); this is the only time it is shown:", key.name, key.id).map_err(io)?;
            writeln!(out, "{}", secret.as_str()).map_err(io)?;
        }
        KeysCommand::List { store } => {
            let store = open(store).await?;
            let (periods, _, _) = crate::keys::periods_now();
            let keys = store.keys(&periods).await.map_err(|e| e.to_string())?;
            writeln!(
                out,
                "{:<13} {:<20} {:<8} {:>9} {:>11} {:>6} {:>9} {:>7} {:>10}",
                "ID", "NAME", "STATUS", "PER DAY", "PER MONTH", "RATE", "IN FLIGHT", "TODAY", "THIS MONTH"
            )
            .map_err(io)?;
            for (key, usage) in keys {
                let l = &key.limits;
                writeln!(
                    out,
                    "{:<13} {:<20} {:<8} {:>9} {:>11} {:>6} {:>9} {:>7} {:>10}",
                    key.id,
                    key.name,
                    if key.revoked_at.is_some() { "revoked" } else { "active" },
                    limit(l.requests_per_day),
                    limit(l.requests_per_month),
                    l.rate.map_or_else(|| "-".into(), |r| r.to_string()),
                    limit(l.max_in_flight.map(u64::from)),
                    usage.today,
                    usage.this_month
                )
                .map_err(io)?;
            }
        }
        KeysCommand::Revoke { name_or_id, store } => {
            let store = open(store).await?;
            if !store.revoke_key(&name_or_id, now).await.map_err(|e| e.to_string())? {
                return Err(format!("no active key named {name_or_id:?}"));
            }
            writeln!(out, "revoked {name_or_id}").map_err(io)?;
        }
    }
    Ok(())
}
