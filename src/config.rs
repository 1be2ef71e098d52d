//! Settings. Each comes from a flag, else its `OFFLOAD_<NAME>` environment variable, else a key of the TOML file
//! named by `--config`, else its default.

use crate::domain::UpstreamKey;
use crate::http::server::ServerLimits;
use crate::store::sqlite::Synchronous;
use crate::store::{DatabaseUrl, StoreLocation};
use crate::telemetry::LogFormat;
use crate::upstream::ReplyLimits;
use crate::webhook::WebhookConfig;
use crate::webhook::signature::WebhookSecret;
use clap::Args;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use url::Url;

/// `offload serve` flags; the same names (with underscores) are the keys of the config file.
#[derive(Args, Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML file with any of these settings (keys with underscores, e.g. `public_url = "..."`).
    #[arg(long, env = "OFFLOAD_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "OFFLOAD_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Base of every endpoint URL handed out [default: http://<listen address>].
    #[arg(long, env = "OFFLOAD_PUBLIC_URL")]
    pub public_url: Option<Url>,
    /// Directory of the SQLite store [default: ./offload-data].
    #[arg(long, env = "OFFLOAD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// OpenAI-compatible API base [default: https://api.openai.com/v1].
    #[arg(long, env = "OFFLOAD_UPSTREAM_URL")]
    pub upstream_url: Option<Url>,
    /// Speak HTTP/2 without TLS (prior knowledge) to an http:// upstream that supports it, so that all calls
    /// share a few connections; https upstreams negotiate HTTP/2 by themselves.
    #[arg(long, env = "OFFLOAD_UPSTREAM_H2C", num_args = 0..=1, default_missing_value = "true")]
    pub upstream_h2c: Option<bool>,
    /// Server-side upstream key, used when a caller sends no X-OpenAI-API-Key.
    #[arg(long, env = "OFFLOAD_UPSTREAM_KEY", hide_env_values = true)]
    pub upstream_key: Option<String>,
    /// How many times an upstream call that failed before the first chunk of its body (connect error, 429, 500,
    /// 502, 503, 504) is tried again, with exponential backoff and jitter, within the request's timeout; 0 turns
    /// retries off [default: 2].
    #[arg(long, env = "OFFLOAD_UPSTREAM_RETRIES")]
    pub upstream_retries: Option<u32>,
    /// How long one upstream attempt may wait for its response headers before it counts as failed (a timeout
    /// before the headers) and is retried, e.g. `20s`; `0` waits as long as the request's timeout allows. Leave
    /// it off for non-streaming upstreams, which send their headers only with the whole reply [default: 0].
    #[arg(long, env = "OFFLOAD_UPSTREAM_HEADER_TIMEOUT")]
    pub upstream_header_timeout: Option<String>,
    /// Largest single event of an upstream event stream, in bytes; a larger one ends the request as
    /// `event_too_large`, keeping the events before it [default: 16777216].
    #[arg(long, env = "OFFLOAD_MAX_UPSTREAM_EVENT_BYTES")]
    pub max_upstream_event_bytes: Option<usize>,
    /// Largest upstream reply body, in bytes (stream or not); a larger one ends the request as
    /// `reply_too_large`, keeping what arrived within the bound [default: 67108864].
    #[arg(long, env = "OFFLOAD_MAX_UPSTREAM_REPLY_BYTES")]
    pub max_upstream_reply_bytes: Option<usize>,
    /// Model used when a request names none [default: gpt-3.5-turbo].
    #[arg(long, env = "OFFLOAD_DEFAULT_MODEL")]
    pub default_model: Option<String>,
    /// Largest `timeout` a request may ask for, in seconds [default: 90].
    #[arg(long, env = "OFFLOAD_MAX_TIMEOUT")]
    pub max_timeout: Option<f64>,
    /// Largest `connect_timeout` a request may ask for, in seconds [default: 10].
    #[arg(long, env = "OFFLOAD_MAX_CONNECT_TIMEOUT")]
    pub max_connect_timeout: Option<f64>,
    /// Run the built-in mock upstream in-process and call it instead of --upstream-url.
    #[arg(long, env = "OFFLOAD_MOCK_UPSTREAM", num_args = 0..=1, default_missing_value = "true")]
    pub mock_upstream: Option<bool>,
    /// Seconds running requests get to finish on shutdown before they end as interrupted [default: 10].
    #[arg(long, env = "OFFLOAD_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<f64>,
    /// Longest delay, in milliseconds, before a received chunk is written to the store; 0 writes at once
    /// [default: 50].
    #[arg(long, env = "OFFLOAD_FLUSH_INTERVAL_MS")]
    pub flush_interval_ms: Option<u64>,
    /// `normal` (a killed process loses nothing) or `full` (also survives power loss, slower) [default: normal].
    #[arg(long, env = "OFFLOAD_SQLITE_SYNCHRONOUS")]
    pub sqlite_synchronous: Option<String>,
    /// Largest create body in bytes [default: 4194304].
    #[arg(long, env = "OFFLOAD_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Requests running at once before new ones get 503 [default: 20000].
    #[arg(long, env = "OFFLOAD_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<usize>,
    /// Seconds between keep-alive comments on an idle event stream [default: 15].
    #[arg(long, env = "OFFLOAD_KEEP_ALIVE")]
    pub keep_alive: Option<f64>,
    /// Sign webhooks per Standard Webhooks with this secret (`whsec_<base64>`).
    #[arg(long, env = "OFFLOAD_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// Allow webhooks to loopback and private addresses (local development only).
    #[arg(long, env = "OFFLOAD_ALLOW_PRIVATE_WEBHOOKS", num_args = 0..=1, default_missing_value = "true")]
    pub allow_private_webhooks: Option<bool>,
    /// How long failed webhook deliveries are retried, e.g. `24h` [default: 24h].
    #[arg(long, env = "OFFLOAD_WEBHOOK_RETRY_FOR")]
    pub webhook_retry_for: Option<String>,
    /// First webhook retry delay; doubled for each further retry, with jitter [default: 5s].
    #[arg(long, env = "OFFLOAD_WEBHOOK_BACKOFF")]
    pub webhook_backoff: Option<String>,
    /// Time limit of one webhook attempt [default: 10s].
    #[arg(long, env = "OFFLOAD_WEBHOOK_TIMEOUT")]
    pub webhook_timeout: Option<String>,
    /// How long finished requests are kept, e.g. `30d`, `12h`; `0` keeps them forever [default: 30d].
    #[arg(long, env = "OFFLOAD_RETENTION")]
    pub retention: Option<String>,
    /// A request head must arrive whole within this time of its first byte (of the connection, for the first
    /// request) [default: 10s].
    #[arg(long, env = "OFFLOAD_HEADER_TIMEOUT")]
    pub header_timeout: Option<String>,
    /// A create body must arrive whole within this time of its head; 408 otherwise [default: 30s].
    #[arg(long, env = "OFFLOAD_BODY_TIMEOUT")]
    pub body_timeout: Option<String>,
    /// A connection with no request in progress is closed this long after its last response [default: 60s].
    #[arg(long, env = "OFFLOAD_IDLE_TIMEOUT")]
    pub idle_timeout: Option<String>,
    /// Client connections served at once (also kept below the open-file limit); at the cap, the connection idle
    /// the longest makes room for a new one [default: 10000].
    #[arg(long, env = "OFFLOAD_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Serve on a non-loopback address even while no service key exists: anyone who reaches it can create
    /// requests.
    #[arg(long, env = "OFFLOAD_ALLOW_OPEN", num_args = 0..=1, default_missing_value = "true")]
    pub allow_open: Option<bool>,
    /// Where requests are stored: `postgres://user:password@host/database` for a PostgreSQL database shared by
    /// several nodes [default: the embedded SQLite store in --data-dir].
    #[arg(long, env = "OFFLOAD_STORE", hide_env_values = true)]
    pub store: Option<String>,
    /// With a shared store: the base URL at which the other nodes reach this one [default: http://<listen
    /// address>; required when listening on all interfaces].
    #[arg(long, env = "OFFLOAD_ADVERTISE_URL")]
    pub advertise_url: Option<Url>,
    /// With a shared store: how long a node that stopped renewing its lease counts as alive; its unfinished
    /// requests end as interrupted about 1.2 times this after it died [default: 10s].
    #[arg(long, env = "OFFLOAD_NODE_LEASE")]
    pub node_lease: Option<String>,
    /// With a shared store: the secret that signs calls between nodes (at least 32 characters, the same on every
    /// node) [default: one made by the first node and kept in the database].
    #[arg(long, env = "OFFLOAD_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
    /// Megabytes of writes a node holds in memory while its store does not answer; past it, its running requests
    /// end as `store_unavailable` (what their readers saw is kept and written when the store is back)
    /// [default: 256].
    #[arg(long, env = "OFFLOAD_OUTAGE_BUFFER_MB")]
    pub outage_buffer_mb: Option<usize>,
    /// How long running requests go on while the store does not answer, e.g. `10m`; then they end as
    /// `store_unavailable` [default: 10m].
    #[arg(long, env = "OFFLOAD_OUTAGE_LIMIT")]
    pub outage_limit: Option<String>,
    /// Serve Prometheus metrics at `/metrics` on this address (its own listener; keep it private) [default: off].
    #[arg(long, env = "OFFLOAD_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// `text` (human-readable lines) or `json` (one JSON object a line) [default: text].
    #[arg(long, env = "OFFLOAD_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// How long the answer to "does any service key exist?" is reused: the first key created, or the last one
    /// revoked, while the server runs takes effect within this time; `0` asks the store on every create
    /// [default: 1s].
    #[arg(long, env = "OFFLOAD_KEY_CACHE_TTL")]
    pub key_cache_ttl: Option<String>,
    /// How long an answer of `GET /v1/models` is reused for callers with the same upstream key; `0` asks the
    /// upstream each time [default: 60s].
    #[arg(long, env = "OFFLOAD_MODELS_CACHE")]
    pub models_cache: Option<String>,
    /// While the server has no service keys, the host names it answers to besides its public URL's host and
    /// localhost, 127.0.0.1 and [::1] (comma-separated; `*` for any) [default: none].
    #[arg(long, env = "OFFLOAD_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Option<Vec<String>>,
    /// While the server has no service keys, the origins of other sites whose pages may create requests on it,
    /// e.g. `https://app.example.com` (comma-separated; `*` for any page at all) [default: none].
    #[arg(long, env = "OFFLOAD_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Option<Vec<String>>,
}

/// Settings after merging and checking.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub public_url: Option<String>,
    pub data_dir: PathBuf,
    pub upstream_url: Url,
    pub upstream_h2c: bool,
    pub upstream_key: Option<UpstreamKey>,
    pub upstream_retries: u32,
    /// `None`: an attempt waits for its headers as long as the request's timeout allows.
    pub upstream_header_timeout: Option<Duration>,
    /// How much of an upstream reply is read: one event, the whole body.
    pub upstream_limits: ReplyLimits,
    pub default_model: String,
    pub max_timeout: f64,
    pub max_connect_timeout: f64,
    pub mock_upstream: bool,
    pub shutdown_grace: Duration,
    pub flush_interval: Duration,
    pub sqlite_synchronous: Synchronous,
    pub max_body_bytes: usize,
    pub max_in_flight: usize,
    pub keep_alive: Duration,
    pub webhooks: WebhookConfig,
    /// `None` keeps finished requests forever.
    pub retention: Option<Duration>,
    /// Connection limits: header and idle timeouts, the connection cap.
    pub server: ServerLimits,
    /// Longest wait for a create body after its head.
    pub body_timeout: Duration,
    /// Serve open (no service key) on a non-loopback address.
    pub allow_open: bool,
    pub store: StoreLocation,
    /// With a shared store: how peers reach this node (`None`: from the listen address).
    pub advertise_url: Option<String>,
    pub node_lease: Duration,
    /// The secret that signs calls between nodes (`None`: the one kept in the shared store).
    pub cluster_secret: Option<crate::cluster::ClusterSecret>,
    /// What a node holds for its store through an outage.
    pub outage: crate::engine::health::OutagePolicy,
    /// Where `/metrics` is served (`None`: no metrics).
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    /// How long whether any service key exists is reused (`0`: not at all).
    pub key_cache_ttl: Duration,
    /// How long `GET /v1/models` answers are reused, per upstream key (`ZERO`: not at all).
    pub models_cache: Duration,
    /// Names an open server answers to besides its own (normalized; `*` for any).
    pub allowed_hosts: Vec<String>,
    /// Origins whose pages may create on an open server (normalized; `*` for any).
    pub cors_origins: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("invalid setting {name}: {reason}")]
    Invalid { name: &'static str, reason: String },
}

fn seconds(name: &'static str, value: f64) -> Result<Duration, ConfigError> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| ConfigError::Invalid { name, reason: format!("{value} is not a number of seconds") })
}

/// A duration given as seconds (`90`, `1.5`) or with a unit (`30d`, `12h`, `500ms`).
fn duration(name: &'static str, text: &str) -> Result<Duration, ConfigError> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<f64>() {
        return seconds(name, secs);
    }
    humantime::parse_duration(text).map_err(|e| ConfigError::Invalid {
        name,
        reason: format!("{text:?} is not a duration like 30d, 12h or 90s ({e})"),
    })
}

/// A duration that must not be zero (a zero time limit would close every connection at once).
fn positive(name: &'static str, text: &str) -> Result<Duration, ConfigError> {
    let value = duration(name, text)?;
    if value.is_zero() {
        return Err(ConfigError::Invalid { name, reason: "must be more than 0".into() });
    }
    Ok(value)
}

/// A list setting, each entry checked and normalized by `parse`; empty entries (`a,,b`, a trailing comma) are
/// skipped.
fn list(
    name: &'static str,
    entries: Option<Vec<String>>,
    parse: fn(&str) -> Result<String, String>,
) -> Result<Vec<String>, ConfigError> {
    entries
        .unwrap_or_default()
        .iter()
        .filter(|e| !e.trim().is_empty())
        .map(|e| parse(e).map_err(|reason| ConfigError::Invalid { name, reason }))
        .collect()
}

impl ServeArgs {
    /// Fills every unset field from `other`.
    fn or(self, other: ServeArgs) -> ServeArgs {
        ServeArgs {
            config: self.config.or(other.config),
            listen: self.listen.or(other.listen),
            public_url: self.public_url.or(other.public_url),
            data_dir: self.data_dir.or(other.data_dir),
            upstream_url: self.upstream_url.or(other.upstream_url),
            upstream_h2c: self.upstream_h2c.or(other.upstream_h2c),
            upstream_key: self.upstream_key.or(other.upstream_key),
            upstream_retries: self.upstream_retries.or(other.upstream_retries),
            upstream_header_timeout: self.upstream_header_timeout.or(other.upstream_header_timeout),
            max_upstream_event_bytes: self.max_upstream_event_bytes.or(other.max_upstream_event_bytes),
            max_upstream_reply_bytes: self.max_upstream_reply_bytes.or(other.max_upstream_reply_bytes),
            default_model: self.default_model.or(other.default_model),
            max_timeout: self.max_timeout.or(other.max_timeout),
            max_connect_timeout: self.max_connect_timeout.or(other.max_connect_timeout),
            mock_upstream: self.mock_upstream.or(other.mock_upstream),
            shutdown_grace: self.shutdown_grace.or(other.shutdown_grace),
            flush_interval_ms: self.flush_interval_ms.or(other.flush_interval_ms),
            sqlite_synchronous: self.sqlite_synchronous.or(other.sqlite_synchronous),
            max_body_bytes: self.max_body_bytes.or(other.max_body_bytes),
            max_in_flight: self.max_in_flight.or(other.max_in_flight),
            keep_alive: self.keep_alive.or(other.keep_alive),
            webhook_secret: self.webhook_secret.or(other.webhook_secret),
            allow_private_webhooks: self.allow_private_webhooks.or(other.allow_private_webhooks),
            webhook_retry_for: self.webhook_retry_for.or(other.webhook_retry_for),
            webhook_backoff: self.webhook_backoff.or(other.webhook_backoff),
            webhook_timeout: self.webhook_timeout.or(other.webhook_timeout),
            retention: self.retention.or(other.retention),
            header_timeout: self.header_timeout.or(other.header_timeout),
            body_timeout: self.body_timeout.or(other.body_timeout),
            idle_timeout: self.idle_timeout.or(other.idle_timeout),
            max_connections: self.max_connections.or(other.max_connections),
            allow_open: self.allow_open.or(other.allow_open),
            store: self.store.or(other.store),
            advertise_url: self.advertise_url.or(other.advertise_url),
            node_lease: self.node_lease.or(other.node_lease),
            cluster_secret: self.cluster_secret.or(other.cluster_secret),
            outage_buffer_mb: self.outage_buffer_mb.or(other.outage_buffer_mb),
            outage_limit: self.outage_limit.or(other.outage_limit),
            metrics_listen: self.metrics_listen.or(other.metrics_listen),
            log_format: self.log_format.or(other.log_format),
            key_cache_ttl: self.key_cache_ttl.or(other.key_cache_ttl),
            models_cache: self.models_cache.or(other.models_cache),
            allowed_hosts: self.allowed_hosts.or(other.allowed_hosts),
            cors_origins: self.cors_origins.or(other.cors_origins),
        }
    }
}

impl ServeArgs {
    /// The settings of the config file, if one is named.
    fn file(&self) -> Result<ServeArgs, ConfigError> {
        let Some(path) = &self.config else { return Ok(ServeArgs::default()) };
        let file_error = |reason: String| ConfigError::File { path: path.display().to_string(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
        toml::from_str::<ServeArgs>(&text).map_err(|e| file_error(e.to_string()))
    }

    /// The log format, known before the other settings are checked (logging starts first, so that what is wrong
    /// with them is logged in the format asked for). A config file that cannot be read counts as text here; the
    /// error is reported when the settings are resolved.
    pub fn log_format(&self) -> LogFormat {
        self.log_format.or_else(|| self.file().ok().and_then(|f| f.log_format)).unwrap_or_default()
    }
}

impl Settings {
    /// Flags and environment first, then the config file, then defaults.
    pub fn resolve(args: ServeArgs) -> Result<Self, ConfigError> {
        let file = args.file()?;
        let a = args.or(file);
        let max_timeout = a.max_timeout.unwrap_or(90.0);
        let max_connect_timeout = a.max_connect_timeout.unwrap_or(10.0);
        // Bounded above too: a request may ask for up to this, and it becomes a Duration.
        for (name, value) in [("max_timeout", max_timeout), ("max_connect_timeout", max_connect_timeout)] {
            if !(value.is_finite() && (1.0..=86_400.0).contains(&value)) {
                return Err(ConfigError::Invalid {
                    name,
                    reason: format!("must be between 1 and 86400 seconds, not {value}"),
                });
            }
        }
        let sqlite_synchronous = match a.sqlite_synchronous.as_deref() {
            None | Some("normal") => Synchronous::Normal,
            Some("full") => Synchronous::Full,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    name: "sqlite_synchronous",
                    reason: format!("must be `normal` or `full`, not {other:?}"),
                });
            }
        };
        let max_connections = a.max_connections.unwrap_or(10_000);
        if max_connections == 0 {
            return Err(ConfigError::Invalid { name: "max_connections", reason: "must be at least 1".into() });
        }
        let data_dir = a.data_dir.unwrap_or_else(|| PathBuf::from("offload-data"));
        let store = match a.store.as_deref().map(str::trim) {
            None | Some("") => StoreLocation::Sqlite { data_dir: data_dir.clone(), synchronous: sqlite_synchronous },
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                StoreLocation::Postgres(DatabaseUrl::new(url))
            }
            Some(_) => {
                return Err(ConfigError::Invalid {
                    name: "store",
                    reason: "must be a PostgreSQL URL (postgres://user:password@host:5432/database); leave it out for the embedded SQLite store in --data-dir".into(),
                });
            }
        };
        let node_lease = positive("node_lease", a.node_lease.as_deref().unwrap_or("10s"))?;
        if node_lease < Duration::from_secs(1) {
            return Err(ConfigError::Invalid { name: "node_lease", reason: "must be at least 1s".into() });
        }
        let cluster_secret = match a.cluster_secret.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(text) if text.len() >= 32 => Some(crate::cluster::ClusterSecret::new(text.as_bytes())),
            Some(_) => {
                return Err(ConfigError::Invalid {
                    name: "cluster_secret",
                    reason: "must be at least 32 characters (e.g. `openssl rand -hex 32`), the same on every node"
                        .into(),
                });
            }
        };
        let outage = crate::engine::health::OutagePolicy {
            buffer: a.outage_buffer_mb.unwrap_or(256).saturating_mul(1024 * 1024),
            limit: positive("outage_limit", a.outage_limit.as_deref().unwrap_or("10m"))?,
        };
        let defaults = ReplyLimits::default();
        let upstream_limits = ReplyLimits {
            max_event_bytes: a.max_upstream_event_bytes.unwrap_or(defaults.max_event_bytes),
            max_reply_bytes: a.max_upstream_reply_bytes.unwrap_or(defaults.max_reply_bytes),
        };
        for (name, value) in [
            ("max_upstream_event_bytes", upstream_limits.max_event_bytes),
            ("max_upstream_reply_bytes", upstream_limits.max_reply_bytes),
        ] {
            if value < 1024 {
                return Err(ConfigError::Invalid { name, reason: format!("must be at least 1024 bytes, not {value}") });
            }
        }
        let default_upstream = Url::parse("https://api.openai.com/v1")
            .map_err(|e| ConfigError::Invalid { name: "upstream_url", reason: e.to_string() })?;
        Ok(Settings {
            listen: a.listen.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080))),
            public_url: a.public_url.map(|u| u.as_str().trim_end_matches('/').to_owned()),
            data_dir,
            upstream_url: a.upstream_url.unwrap_or(default_upstream),
            upstream_h2c: a.upstream_h2c.unwrap_or(false),
            upstream_key: a.upstream_key.as_deref().and_then(UpstreamKey::new),
            upstream_retries: a.upstream_retries.unwrap_or(2),
            upstream_header_timeout: Some(duration(
                "upstream_header_timeout",
                a.upstream_header_timeout.as_deref().unwrap_or("0"),
            )?)
            .filter(|d| !d.is_zero()),
            upstream_limits,
            default_model: a.default_model.unwrap_or_else(|| "gpt-3.5-turbo".into()),
            max_timeout,
            max_connect_timeout,
            mock_upstream: a.mock_upstream.unwrap_or(false),
            shutdown_grace: seconds("shutdown_grace", a.shutdown_grace.unwrap_or(10.0))?,
            flush_interval: Duration::from_millis(a.flush_interval_ms.unwrap_or(50)),
            sqlite_synchronous,
            max_body_bytes: a.max_body_bytes.unwrap_or(4 * 1024 * 1024),
            max_in_flight: a.max_in_flight.unwrap_or(20_000),
            keep_alive: seconds("keep_alive", a.keep_alive.unwrap_or(15.0))?,
            webhooks: WebhookConfig {
                secret: a
                    .webhook_secret
                    .as_deref()
                    .map(WebhookSecret::parse)
                    .transpose()
                    .map_err(|reason| ConfigError::Invalid { name: "webhook_secret", reason })?,
                allow_private: a.allow_private_webhooks.unwrap_or(false),
                retry_for: duration("webhook_retry_for", a.webhook_retry_for.as_deref().unwrap_or("24h"))?,
                backoff: duration("webhook_backoff", a.webhook_backoff.as_deref().unwrap_or("5s"))?,
                timeout: duration("webhook_timeout", a.webhook_timeout.as_deref().unwrap_or("10s"))?,
            },
            retention: Some(duration("retention", a.retention.as_deref().unwrap_or("30d"))?).filter(|d| !d.is_zero()),
            server: ServerLimits {
                header_timeout: positive("header_timeout", a.header_timeout.as_deref().unwrap_or("10s"))?,
                idle_timeout: positive("idle_timeout", a.idle_timeout.as_deref().unwrap_or("60s"))?,
                max_connections,
            },
            body_timeout: positive("body_timeout", a.body_timeout.as_deref().unwrap_or("30s"))?,
            allow_open: a.allow_open.unwrap_or(false),
            store,
            advertise_url: a.advertise_url.map(|u| u.as_str().trim_end_matches('/').to_owned()),
            node_lease,
            cluster_secret,
            outage,
            metrics_listen: a.metrics_listen,
            log_format: a.log_format.unwrap_or_default(),
            key_cache_ttl: duration("key_cache_ttl", a.key_cache_ttl.as_deref().unwrap_or("1s"))?,
            models_cache: duration("models_cache", a.models_cache.as_deref().unwrap_or("60s"))?,
            allowed_hosts: list("allowed_hosts", a.allowed_hosts, crate::http::origin::host_setting)?,
            cors_origins: list("cors_origins", a.cors_origins, crate::http::origin::origin_setting)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offload.toml");
        std::fs::write(&path, "default_model = \"from-file\"\nmax_timeout = 30\nlisten = \"127.0.0.1:9000\"\n")
            .unwrap();
        let args = ServeArgs { config: Some(path), max_timeout: Some(60.0), ..ServeArgs::default() };
        let s = Settings::resolve(args).unwrap();
        assert_eq!(s.default_model, "from-file");
        assert_eq!(s.max_timeout, 60.0);
        assert_eq!(s.listen.port(), 9000);
        assert_eq!(s.max_connect_timeout, 10.0);
    }

    #[test]
    fn the_key_cache_ttl_is_a_duration_of_one_second_unless_set() {
        assert_eq!(Settings::resolve(ServeArgs::default()).unwrap().key_cache_ttl, Duration::from_secs(1));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offload.toml");
        std::fs::write(&path, "key_cache_ttl = \"250ms\"\n").unwrap();
        let s = Settings::resolve(ServeArgs { config: Some(path), ..ServeArgs::default() }).unwrap();
        assert_eq!(s.key_cache_ttl, Duration::from_millis(250));
        let s = Settings::resolve(ServeArgs { key_cache_ttl: Some("0".into()), ..ServeArgs::default() }).unwrap();
        assert_eq!(s.key_cache_ttl, Duration::ZERO);
    }

    #[test]
    fn unknown_keys_in_the_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offload.toml");
        std::fs::write(&path, "max_timeot = 30\n").unwrap();
        let err = Settings::resolve(ServeArgs { config: Some(path), ..ServeArgs::default() }).unwrap_err();
        assert!(err.to_string().contains("max_timeot"));
    }

    #[test]
    fn durations_take_units_or_seconds() {
        let s = Settings::resolve(ServeArgs { retention: Some("12h".into()), ..ServeArgs::default() }).unwrap();
        assert_eq!(s.retention, Some(Duration::from_secs(12 * 3600)));
        let s = Settings::resolve(ServeArgs { retention: Some("0".into()), ..ServeArgs::default() }).unwrap();
        assert_eq!(s.retention, None);
        let s = Settings::resolve(ServeArgs::default()).unwrap();
        assert_eq!(s.retention, Some(Duration::from_secs(30 * 86_400)));
        assert!(Settings::resolve(ServeArgs { retention: Some("soon".into()), ..ServeArgs::default() }).is_err());
        assert!(Settings::resolve(ServeArgs { webhook_secret: Some("plain".into()), ..ServeArgs::default() }).is_err());
    }

    #[test]
    fn connection_limits_have_public_defaults_and_refuse_zero() {
        let s = Settings::resolve(ServeArgs::default()).unwrap();
        assert_eq!(s.server.header_timeout, Duration::from_secs(10));
        assert_eq!(s.server.idle_timeout, Duration::from_secs(60));
        assert_eq!(s.server.max_connections, 10_000);
        assert_eq!(s.body_timeout, Duration::from_secs(30));
        assert!(!s.allow_open);
        for args in [
            ServeArgs { header_timeout: Some("0".into()), ..ServeArgs::default() },
            ServeArgs { body_timeout: Some("0s".into()), ..ServeArgs::default() },
            ServeArgs { max_connections: Some(0), ..ServeArgs::default() },
        ] {
            assert!(Settings::resolve(args).is_err());
        }
    }

    #[test]
    fn metrics_and_log_format_come_from_the_file_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offload.toml");
        std::fs::write(&path, "metrics_listen = \"127.0.0.1:9100\"\nlog_format = \"json\"\n").unwrap();
        let args = ServeArgs { config: Some(path), ..ServeArgs::default() };
        assert_eq!(args.log_format(), LogFormat::Json);
        let s = Settings::resolve(args).unwrap();
        assert_eq!(s.metrics_listen, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(s.log_format, LogFormat::Json);
        let s = Settings::resolve(ServeArgs::default()).unwrap();
        assert_eq!((s.metrics_listen, s.log_format), (None, LogFormat::Text));
    }

    #[test]
    fn hosts_and_origins_are_lists_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offload.toml");
        std::fs::write(&path, "cors_origins = [\"https://App.example.com\"]\nallowed_hosts = [\"box.lan\"]\n").unwrap();
        let s = Settings::resolve(ServeArgs { config: Some(path), ..ServeArgs::default() }).unwrap();
        assert_eq!(s.cors_origins, ["https://app.example.com"]);
        assert_eq!(s.allowed_hosts, ["box.lan"]);
        let err =
            Settings::resolve(ServeArgs { cors_origins: Some(vec!["app.example.com".into()]), ..ServeArgs::default() })
                .unwrap_err();
        assert!(err.to_string().contains("cors_origins"), "{err}");
        let s = Settings::resolve(ServeArgs::default()).unwrap();
        assert!(s.cors_origins.is_empty() && s.allowed_hosts.is_empty());
    }

    #[test]
    fn upstream_body_limits_have_defaults_and_refuse_tiny_values() {
        let s = Settings::resolve(ServeArgs::default()).unwrap();
        assert_eq!(s.upstream_limits, ReplyLimits::default());
        let s = Settings::resolve(ServeArgs { max_upstream_event_bytes: Some(4096), ..ServeArgs::default() }).unwrap();
        assert_eq!(s.upstream_limits.max_event_bytes, 4096);
        let err =
            Settings::resolve(ServeArgs { max_upstream_reply_bytes: Some(0), ..ServeArgs::default() }).unwrap_err();
        assert!(err.to_string().contains("max_upstream_reply_bytes"));
    }

    #[test]
    fn bounds_below_one_second_are_refused() {
        let err = Settings::resolve(ServeArgs { max_timeout: Some(0.5), ..ServeArgs::default() }).unwrap_err();
        assert!(err.to_string().contains("max_timeout"));
        let err = Settings::resolve(ServeArgs { max_connect_timeout: Some(1e20), ..ServeArgs::default() }).unwrap_err();
        assert!(err.to_string().contains("max_connect_timeout"));
    }
}
