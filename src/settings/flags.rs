//! `offload serve`'s flags, each with its `OFFLOAD_<NAME>` environment variable: clap reads a flag, else its
//! variable. What neither gives stays `None` and is left to the config file and the defaults (see [`super::layers`]).

use crate::telemetry::LogFormat;
use clap::Args;
use serde::Serialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use url::Url;

/// `offload serve` flags; the same names (with underscores) are the keys of the config file.
#[derive(Args, Debug, Default, Serialize, Clone)]
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
    /// Which API of the upstream gets Responses API requests: `auto` tries its Responses API and, if it answers
    /// 404 or 405, translates to Chat Completions from then on (remembered per upstream); `responses` always sends
    /// them as they are; `chat` always translates [default: auto].
    #[arg(long, env = "OFFLOAD_UPSTREAM_API", value_parser = ["auto", "responses", "chat"])]
    pub upstream_api: Option<String>,
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
    /// Failed attempts in a row (connect error, timeout before the headers, 429, 500, 502, 503, 504) after which
    /// an upstream is skipped for `--breaker-cool-down`, then tried again with one call [default: 5].
    #[arg(long, env = "OFFLOAD_BREAKER_FAILURES")]
    pub breaker_failures: Option<u32>,
    /// How long an upstream that failed `--breaker-failures` times in a row is skipped, e.g. `30s` [default: 30s].
    #[arg(long, env = "OFFLOAD_BREAKER_COOL_DOWN")]
    pub breaker_cool_down: Option<String>,
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
    /// Send OpenTelemetry traces (OTLP over HTTP, protobuf) to this base URL, e.g. `http://127.0.0.1:4318`; spans
    /// go to `URL/v1/traces`. Also read from the standard `OTEL_EXPORTER_OTLP_ENDPOINT`; the service name from
    /// `OTEL_SERVICE_NAME` (default `offload`) [default: off].
    #[arg(long, env = "OFFLOAD_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<url::Url>,
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
