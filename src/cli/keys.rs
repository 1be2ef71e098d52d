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
        budgets: Budgets,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Change limits of a key by name or id (the others stay); `none` lifts a limit. Takes effect within a second.
    Update {
        name_or_id: String,
        #[arg(long, value_name = "N|none")]
        requests_per_day: Option<Limit>,
        #[arg(long, value_name = "N|none")]
        requests_per_month: Option<Limit>,
        /// Requests per second.
        #[arg(long, value_name = "RATE|none")]
        rate: Option<Limit<f64>>,
        #[arg(long, value_name = "N|none")]
        max_in_flight: Option<Limit<u32>>,
        /// Tokens (input plus output) per UTC day.
        #[arg(long, value_name = "N|none")]
        tokens_per_day: Option<Limit>,
        /// Tokens (input plus output) per calendar month (UTC).
        #[arg(long, value_name = "N|none")]
        tokens_per_month: Option<Limit>,
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

/// Token budgets of a new key.
#[derive(Args, Debug, Clone, Default)]
pub struct Budgets {
    /// Tokens (input plus output) per UTC day; past it, creates get 429 `token_quota_exceeded` until midnight UTC.
    #[arg(long)]
    tokens_per_day: Option<u64>,
    /// Tokens (input plus output) per calendar month (UTC).
    #[arg(long)]
    tokens_per_month: Option<u64>,
}

/// A limit given to `keys update`: a value, or `none` to lift it.
#[derive(Debug, Clone, Copy)]
pub struct Limit<T = u64>(Option<T>);

impl<T: std::str::FromStr> std::str::FromStr for Limit<T> {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("none") {
            return Ok(Self(None));
        }
        s.parse().map(|v| Self(Some(v))).map_err(|_| format!("{s:?} is not a number (or `none`)"))
    }
}

/// Sets `limit` to what was given, if anything was.
fn apply<T>(limit: &mut Option<T>, given: Option<Limit<T>>) {
    if let Some(Limit(value)) = given {
        *limit = value;
    }
}

pub(crate) async fn open(args: StoreArgs) -> Result<std::sync::Arc<dyn KeyStore>, String> {
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
        KeysCommand::Create { name, requests_per_day, requests_per_month, rate, max_in_flight, budgets, store } => {
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
                limits: KeyLimits {
                    requests_per_day,
                    requests_per_month,
                    rate,
                    max_in_flight,
                    tokens_per_day: budgets.tokens_per_day,
                    tokens_per_month: budgets.tokens_per_month,
                },
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
                "{:<13} {:<20} {:<8} {:>9} {:>11} {:>6} {:>9} {:>12} {:>14} {:>7} {:>10}",
                "ID",
                "NAME",
                "STATUS",
                "PER DAY",
                "PER MONTH",
                "RATE",
                "IN FLIGHT",
                "TOKENS/DAY",
                "TOKENS/MONTH",
                "TODAY",
                "THIS MONTH"
            )
            .map_err(io)?;
            for (key, usage) in keys {
                let l = &key.limits;
                writeln!(
                    out,
                    "{:<13} {:<20} {:<8} {:>9} {:>11} {:>6} {:>9} {:>12} {:>14} {:>7} {:>10}",
                    key.id,
                    key.name,
                    if key.revoked_at.is_some() { "revoked" } else { "active" },
                    limit(l.requests_per_day),
                    limit(l.requests_per_month),
                    l.rate.map_or_else(|| "-".into(), |r| r.to_string()),
                    limit(l.max_in_flight.map(u64::from)),
                    limit(l.tokens_per_day),
                    limit(l.tokens_per_month),
                    usage.today,
                    usage.this_month
                )
                .map_err(io)?;
            }
        }
        KeysCommand::Update {
            name_or_id,
            requests_per_day,
            requests_per_month,
            rate,
            max_in_flight,
            tokens_per_day,
            tokens_per_month,
            store,
        } => {
            if rate.is_some_and(|Limit(r)| r.is_some_and(|r| !(r.is_finite() && r > 0.0))) {
                return Err("--rate must be a positive number of requests per second (or none)".into());
            }
            let store = open(store).await?;
            let (periods, _, _) = crate::keys::periods_now();
            let keys = store.keys(&periods).await.map_err(|e| e.to_string())?;
            let found = keys
                .into_iter()
                .map(|(key, _)| key)
                .find(|key| key.revoked_at.is_none() && (key.name == name_or_id || key.id == name_or_id));
            let Some(key) = found else { return Err(format!("no active key named {name_or_id:?}")) };
            let mut limits = key.limits;
            apply(&mut limits.requests_per_day, requests_per_day);
            apply(&mut limits.requests_per_month, requests_per_month);
            apply(&mut limits.rate, rate);
            apply(&mut limits.max_in_flight, max_in_flight);
            apply(&mut limits.tokens_per_day, tokens_per_day);
            apply(&mut limits.tokens_per_month, tokens_per_month);
            if !store.set_limits(&key.id, &limits).await.map_err(|e| e.to_string())? {
                return Err(format!("no active key named {name_or_id:?}"));
            }
            writeln!(out, "updated {name_or_id}").map_err(io)?;
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
