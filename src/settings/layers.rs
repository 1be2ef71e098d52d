//! The layers, merged by figment: flags (clap reads a flag, else its `OFFLOAD_*` variable) over the config file
//! over the defaults, into one record of the keys, [`Layered`], which [`super::Settings::resolve`] checks and
//! nests per concern.
//!
//! The keys are flat, as in the file and the flags (`public_url`, `webhook_retry_for`, ...), except the file's
//! lists of tables (`[[upstreams]]`, `[[routes]]`), which only the file gives: they are let through here and read
//! from the file's text, with their line numbers, by [`super::upstreams`].

use super::flags::ServeArgs;
use super::parse::ConfigError;
use crate::telemetry::LogFormat;
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use url::Url;

/// Every default, written as a config file would say it: the lowest layer. Settings without a default (a public
/// URL, the upstream key, the webhook secret, the shared store, ...) are absent.
const DEFAULTS: &str = r#"
listen = "127.0.0.1:8080"
data_dir = "offload-data"
upstream_url = "https://api.openai.com/v1"
upstream_h2c = false
upstream_api = "auto"
upstream_retries = 2
upstream_header_timeout = "0"
breaker_failures = 5
breaker_cool_down = "30s"
max_upstream_event_bytes = 16777216
max_upstream_reply_bytes = 67108864
default_model = "gpt-3.5-turbo"
max_timeout = 90.0
max_connect_timeout = 10.0
mock_upstream = false
shutdown_grace = 10.0
flush_interval_ms = 50
sqlite_synchronous = "normal"
max_body_bytes = 4194304
max_in_flight = 20000
keep_alive = 15.0
allow_private_webhooks = false
webhook_retry_for = "24h"
webhook_backoff = "5s"
webhook_timeout = "10s"
retention = "30d"
header_timeout = "10s"
body_timeout = "30s"
idle_timeout = "60s"
max_connections = 10000
allow_open = false
node_lease = "10s"
outage_buffer_mb = 256
outage_limit = "10m"
log_format = "text"
key_cache_ttl = "1s"
models_cache = "60s"
allowed_hosts = []
cors_origins = []
"#;

/// The keys after layering, as given (durations still text): see [`ServeArgs`] for what each means.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Layered {
    pub listen: SocketAddr,
    pub public_url: Option<Url>,
    pub data_dir: PathBuf,
    pub upstream_url: Url,
    pub upstream_h2c: bool,
    pub upstream_api: String,
    pub upstream_key: Option<String>,
    pub upstream_retries: u32,
    pub upstream_header_timeout: String,
    pub breaker_failures: u32,
    pub breaker_cool_down: String,
    /// `[[upstreams]]` and `[[routes]]`: let through here, read with their line numbers by
    /// [`super::upstreams`].
    #[serde(default, rename = "upstreams")]
    pub _upstreams: Vec<serde::de::IgnoredAny>,
    #[serde(default, rename = "routes")]
    pub _routes: Vec<serde::de::IgnoredAny>,
    pub max_upstream_event_bytes: usize,
    pub max_upstream_reply_bytes: usize,
    pub default_model: String,
    pub max_timeout: f64,
    pub max_connect_timeout: f64,
    pub mock_upstream: bool,
    pub shutdown_grace: f64,
    pub flush_interval_ms: u64,
    pub sqlite_synchronous: String,
    pub max_body_bytes: usize,
    pub max_in_flight: usize,
    pub keep_alive: f64,
    pub webhook_secret: Option<String>,
    pub allow_private_webhooks: bool,
    pub webhook_retry_for: String,
    pub webhook_backoff: String,
    pub webhook_timeout: String,
    pub retention: String,
    pub header_timeout: String,
    pub body_timeout: String,
    pub idle_timeout: String,
    pub max_connections: usize,
    pub allow_open: bool,
    pub store: Option<String>,
    pub advertise_url: Option<Url>,
    pub node_lease: String,
    pub cluster_secret: Option<String>,
    pub outage_buffer_mb: usize,
    pub outage_limit: String,
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub otlp_endpoint: Option<Url>,
    pub key_cache_ttl: String,
    pub models_cache: String,
    pub allowed_hosts: Vec<String>,
    pub cors_origins: Vec<String>,
}

/// One layer: the keys it sets (a key it leaves unset is absent, so the layer below shows through).
struct Layer {
    name: &'static str,
    keys: Dict,
}

impl Layer {
    fn serialized(name: &'static str, value: impl Serialize) -> Result<Self, String> {
        match Value::serialize(value).map_err(|e| e.to_string())? {
            Value::Dict(_, mut keys) => {
                // An unset flag serializes as `None`, which would hide the file's key: leave it out.
                keys.retain(|_, value| !matches!(value, Value::Empty(..)));
                Ok(Self { name, keys })
            }
            _ => Err("not a table of settings".into()),
        }
    }

    fn toml(name: &'static str, text: &str) -> Result<Self, String> {
        let table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        Self::serialized(name, table)
    }
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        // Keys are named as written in the file (`max_timeout`), without figment's profile.
        Metadata::named(self.name).interpolater(|_, keys| keys.join("."))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.keys.clone()))
    }
}

/// The defaults under the config file named by `--config`, if any. The file is checked here on its own, so that
/// what is wrong with it (syntax, an unknown key, a value of the wrong type) is reported as the file's.
fn file_over_defaults(args: &ServeArgs) -> Result<Figment, ConfigError> {
    let figment = Figment::from(Layer::toml("the defaults", DEFAULTS).map_err(ConfigError::Layers)?);
    let Some(path) = &args.config else { return Ok(figment) };
    let file_error = |reason: String| ConfigError::File { path: path.display().to_string(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
    let figment = figment.merge(Layer::toml("the file", &text).map_err(file_error)?);
    figment.extract::<Layered>().map_err(|e| file_error(e.to_string()))?;
    Ok(figment)
}

/// Flags and environment over the file over the defaults.
pub(super) fn layered(args: &ServeArgs) -> Result<Layered, ConfigError> {
    let flags = Layer::serialized("flags or environment", args).map_err(ConfigError::Layers)?;
    file_over_defaults(args)?.merge(flags).extract().map_err(|e| ConfigError::Layers(e.to_string()))
}

/// Where traces go, from the file (a config file that cannot be read names none here).
pub(super) fn file_otlp_endpoint(args: &ServeArgs) -> Option<Url> {
    file_over_defaults(args)
        .and_then(|figment| figment.extract::<Layered>().map_err(|e| ConfigError::Layers(e.to_string())))
        .ok()
        .and_then(|layered| layered.otlp_endpoint)
}

/// The log format of the file, else the default; a config file that cannot be read counts as text here.
pub(super) fn file_log_format(args: &ServeArgs) -> LogFormat {
    file_over_defaults(args)
        .and_then(|figment| figment.extract::<Layered>().map_err(|e| ConfigError::Layers(e.to_string())))
        .map(|layered| layered.log_format)
        .unwrap_or_default()
}
