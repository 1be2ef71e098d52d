//! Settings. Each comes from a flag, else its `OFFLOAD_<NAME>` environment variable, else a key of the TOML file
//! named by `--config`, else its default: figment layers them ([`layers`]), then [`Settings::resolve`] checks
//! each value and nests them per concern (the server, the store, the upstream, webhooks, limits, telemetry, the
//! web guard). The flags and the file's keys stay flat, as documented (README, "Settings").
//!
//! This module names types of the layers it configures (store, upstream, webhook, engine) but never the HTTP
//! layer: the connection limits are defined here and `http::server` takes them from here.

mod flags;
mod layers;
mod parse;
#[cfg(test)]
mod tests;
pub mod upstreams;

pub use flags::ServeArgs;
pub use parse::ConfigError;

use crate::cluster::ClusterSecret;
use crate::domain::host::{host_setting, origin_setting};
use crate::domain::{Limits, UpstreamKey};
use crate::engine::health::OutagePolicy;
use crate::store::sqlite::Synchronous;
use crate::store::{DatabaseUrl, StoreLocation};
use crate::telemetry::LogFormat;
use crate::upstream::{ReplyLimits, UpstreamApi};
use crate::webhook::WebhookConfig;
use crate::webhook::signature::WebhookSecret;
use layers::Layered;
use parse::{base_url, duration, invalid, list, optional_duration, positive, seconds};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use url::Url;

/// Settings after layering and checking, one part per concern.
#[derive(Debug, Clone)]
pub struct Settings {
    pub server: ServerSettings,
    pub store: StoreSettings,
    pub upstream: UpstreamSettings,
    pub webhooks: WebhookConfig,
    pub limits: LimitSettings,
    pub telemetry: TelemetrySettings,
    pub web: WebSettings,
}

/// The listener, its connections and the HTTP requests on them.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    /// Base of the URLs handed out (`None`: from the listen address); without a final slash.
    pub public_url: Option<String>,
    /// Connection limits: header and idle timeouts, the connection cap.
    pub connections: ServerLimits,
    pub max_body_bytes: usize,
    /// Longest wait for a create body after its head.
    pub body_timeout: Duration,
    /// Serve open (no service key) on a non-loopback address.
    pub allow_open: bool,
    /// Seconds between keep-alive comments on an idle event stream.
    pub keep_alive: Duration,
    pub shutdown_grace: Duration,
}

/// The connection-level limits of the accept loop (`http::server`).
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// A request head must arrive whole within this time of its first byte.
    pub header_timeout: Duration,
    /// A connection with no request in progress is closed this long after its last response.
    pub idle_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

/// Where requests are kept, how writes reach the store, and, on a shared store, this node among the others.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub location: StoreLocation,
    pub data_dir: PathBuf,
    pub sqlite_synchronous: Synchronous,
    pub flush_interval: Duration,
    /// `None` keeps finished requests forever.
    pub retention: Option<Duration>,
    /// How long whether any service key exists is reused (`0`: not at all).
    pub key_cache_ttl: Duration,
    /// With a shared store: how peers reach this node (`None`: from the listen address).
    pub advertise_url: Option<String>,
    pub node_lease: Duration,
    /// The secret that signs calls between nodes (`None`: the one kept in the shared store).
    pub cluster_secret: Option<ClusterSecret>,
}

/// The OpenAI-compatible upstream and how it is called.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub url: Url,
    pub h2c: bool,
    /// Which API of the upstream gets Responses API requests.
    pub api: UpstreamApi,
    pub key: Option<UpstreamKey>,
    pub retries: u32,
    /// `None`: an attempt waits for its headers as long as the request's timeout allows.
    pub header_timeout: Option<Duration>,
    /// How much of an upstream reply is read: one event, the whole body.
    pub reply_limits: ReplyLimits,
    /// Run the built-in mock upstream in-process and call it instead of `url`.
    pub mock: bool,
    /// How long `GET /v1/models` answers are reused, per upstream key (`ZERO`: not at all).
    pub models_cache: Duration,
    /// The config file's `[[upstreams]]`: when it names any, they replace the one upstream of `url` and `key`.
    pub named: Vec<upstreams::NamedUpstream>,
    /// The config file's `[[routes]]`.
    pub routes: Vec<crate::upstream::RouteSpec>,
    /// When an upstream is skipped after failures.
    pub breaker: crate::upstream::breaker::BreakerPolicy,
}

/// What callers may ask for and how much the node takes on.
#[derive(Debug, Clone)]
pub struct LimitSettings {
    /// The bounds of a request's timeouts and its default model.
    pub request: Limits,
    pub max_in_flight: usize,
    /// What a node holds for its store through an outage.
    pub outage: OutagePolicy,
}

#[derive(Debug, Clone)]
pub struct TelemetrySettings {
    pub log_format: LogFormat,
    /// Where `/metrics` is served (`None`: no metrics).
    pub metrics_listen: Option<SocketAddr>,
}

/// What an open server (no service key) answers to.
#[derive(Debug, Clone)]
pub struct WebSettings {
    /// Names an open server answers to besides its own (normalized; `*` for any).
    pub allowed_hosts: Vec<String>,
    /// Origins whose pages may create on an open server (normalized; `*` for any).
    pub cors_origins: Vec<String>,
}

impl ServeArgs {
    /// The log format, known before the other settings are checked (logging starts first, so that what is wrong
    /// with them is logged in the format asked for). A config file that cannot be read counts as text here; the
    /// error is reported when the settings are resolved.
    pub fn log_format(&self) -> LogFormat {
        self.log_format.unwrap_or_else(|| layers::file_log_format(self))
    }

    /// Where traces go, known before the other settings (tracing starts with logging): the flag or
    /// `OFFLOAD_OTLP_ENDPOINT`, else the file's `otlp_endpoint`, else the standard `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn otlp_endpoint(&self) -> Option<url::Url> {
        self.otlp_endpoint.clone().or_else(|| layers::file_otlp_endpoint(self)).or_else(|| {
            let standard = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok()?;
            url::Url::parse(standard.trim()).ok()
        })
    }
}

impl Settings {
    /// Flags and environment first, then the config file, then defaults; each value checked.
    pub fn resolve(args: ServeArgs) -> Result<Self, ConfigError> {
        let a = layers::layered(&args)?;
        let limits = LimitSettings::from(&a)?;
        let store = StoreSettings::from(&a)?;
        let upstream = UpstreamSettings::from(&a, args.config.as_deref())?;
        let server = ServerSettings::from(&a)?;
        let webhooks = WebhookConfig {
            secret: a
                .webhook_secret
                .as_deref()
                .map(WebhookSecret::parse)
                .transpose()
                .map_err(|reason| invalid("webhook_secret", reason))?,
            allow_private: a.allow_private_webhooks,
            retry_for: duration("webhook_retry_for", &a.webhook_retry_for)?,
            backoff: duration("webhook_backoff", &a.webhook_backoff)?,
            timeout: duration("webhook_timeout", &a.webhook_timeout)?,
        };
        let telemetry = TelemetrySettings { log_format: a.log_format, metrics_listen: a.metrics_listen };
        let web = WebSettings {
            allowed_hosts: list("allowed_hosts", &a.allowed_hosts, host_setting)?,
            cors_origins: list("cors_origins", &a.cors_origins, origin_setting)?,
        };
        Ok(Settings { server, store, upstream, webhooks, limits, telemetry, web })
    }
}

impl LimitSettings {
    fn from(a: &Layered) -> Result<Self, ConfigError> {
        // Bounded above too: a request may ask for up to this, and it becomes a Duration.
        for (name, value) in [("max_timeout", a.max_timeout), ("max_connect_timeout", a.max_connect_timeout)] {
            if !(value.is_finite() && (1.0..=86_400.0).contains(&value)) {
                return Err(invalid(name, format!("must be between 1 and 86400 seconds, not {value}")));
            }
        }
        Ok(Self {
            request: Limits {
                max_timeout: a.max_timeout,
                max_connect_timeout: a.max_connect_timeout,
                default_model: a.default_model.clone(),
            },
            max_in_flight: a.max_in_flight,
            outage: OutagePolicy {
                buffer: a.outage_buffer_mb.saturating_mul(1024 * 1024),
                limit: positive("outage_limit", &a.outage_limit)?,
            },
        })
    }
}

impl StoreSettings {
    fn from(a: &Layered) -> Result<Self, ConfigError> {
        let sqlite_synchronous = match a.sqlite_synchronous.as_str() {
            "normal" => Synchronous::Normal,
            "full" => Synchronous::Full,
            other => return Err(invalid("sqlite_synchronous", format!("must be `normal` or `full`, not {other:?}"))),
        };
        let location = match a.store.as_deref().map(str::trim) {
            None | Some("") => StoreLocation::Sqlite { data_dir: a.data_dir.clone(), synchronous: sqlite_synchronous },
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                StoreLocation::Postgres(DatabaseUrl::new(url))
            }
            Some(_) => {
                return Err(invalid(
                    "store",
                    "must be a PostgreSQL URL (postgres://user:password@host:5432/database); leave it out for the embedded SQLite store in --data-dir",
                ));
            }
        };
        let node_lease = positive("node_lease", &a.node_lease)?;
        if node_lease < Duration::from_secs(1) {
            return Err(invalid("node_lease", "must be at least 1s"));
        }
        let cluster_secret = match a.cluster_secret.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(text) if text.len() >= 32 => Some(ClusterSecret::new(text.as_bytes())),
            Some(_) => {
                return Err(invalid(
                    "cluster_secret",
                    "must be at least 32 characters (e.g. `openssl rand -hex 32`), the same on every node",
                ));
            }
        };
        Ok(Self {
            location,
            data_dir: a.data_dir.clone(),
            sqlite_synchronous,
            flush_interval: Duration::from_millis(a.flush_interval_ms),
            retention: optional_duration("retention", &a.retention)?,
            key_cache_ttl: duration("key_cache_ttl", &a.key_cache_ttl)?,
            advertise_url: a.advertise_url.as_ref().map(base_url),
            node_lease,
            cluster_secret,
        })
    }
}

impl UpstreamSettings {
    fn from(a: &Layered, config: Option<&std::path::Path>) -> Result<Self, ConfigError> {
        let (named, routes) = match config {
            Some(path) => {
                let shown = path.display().to_string();
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError::File { path: shown.clone(), reason: e.to_string() })?;
                upstreams::read(&shown, &text, |name| std::env::var(name).ok())?
            }
            None => (Vec::new(), Vec::new()),
        };
        if !routes.is_empty() && named.is_empty() {
            return Err(invalid("routes", "routes need `[[upstreams]]` in the config file to name their targets"));
        }
        if a.breaker_failures == 0 {
            return Err(invalid("breaker_failures", "must be at least 1"));
        }
        let breaker = crate::upstream::breaker::BreakerPolicy {
            failures: a.breaker_failures,
            cool_down: duration("breaker_cool_down", &a.breaker_cool_down)?,
        };
        let reply_limits =
            ReplyLimits { max_event_bytes: a.max_upstream_event_bytes, max_reply_bytes: a.max_upstream_reply_bytes };
        for (name, value) in [
            ("max_upstream_event_bytes", reply_limits.max_event_bytes),
            ("max_upstream_reply_bytes", reply_limits.max_reply_bytes),
        ] {
            if value < 1024 {
                return Err(invalid(name, format!("must be at least 1024 bytes, not {value}")));
            }
        }
        let api = match a.upstream_api.as_str() {
            "auto" => UpstreamApi::Auto,
            "responses" => UpstreamApi::Responses,
            "chat" => UpstreamApi::Chat,
            other => {
                return Err(invalid("upstream_api", format!("must be `auto`, `responses` or `chat`, not {other:?}")));
            }
        };
        Ok(Self {
            url: a.upstream_url.clone(),
            h2c: a.upstream_h2c,
            api,
            key: a.upstream_key.as_deref().and_then(UpstreamKey::new),
            retries: a.upstream_retries,
            header_timeout: optional_duration("upstream_header_timeout", &a.upstream_header_timeout)?,
            reply_limits,
            mock: a.mock_upstream,
            models_cache: duration("models_cache", &a.models_cache)?,
            named,
            routes,
            breaker,
        })
    }
}

impl ServerSettings {
    fn from(a: &Layered) -> Result<Self, ConfigError> {
        if a.max_connections == 0 {
            return Err(invalid("max_connections", "must be at least 1"));
        }
        Ok(Self {
            listen: a.listen,
            public_url: a.public_url.as_ref().map(base_url),
            connections: ServerLimits {
                header_timeout: positive("header_timeout", &a.header_timeout)?,
                idle_timeout: positive("idle_timeout", &a.idle_timeout)?,
                max_connections: a.max_connections,
            },
            max_body_bytes: a.max_body_bytes,
            body_timeout: positive("body_timeout", &a.body_timeout)?,
            allow_open: a.allow_open,
            keep_alive: seconds("keep_alive", a.keep_alive)?,
            shutdown_grace: seconds("shutdown_grace", a.shutdown_grace)?,
        })
    }
}
