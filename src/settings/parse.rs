//! Reading one setting's value: durations, lists, and the error that names the setting.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("invalid setting {name}: {reason}")]
    Invalid { name: &'static str, reason: String },
    /// Flags and environment variables are checked by clap; this is a setting clap let through that the layered
    /// settings refused (it names the setting).
    #[error("invalid settings: {0}")]
    Layers(String),
}

pub(super) fn invalid(name: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { name, reason: reason.into() }
}

pub(super) fn seconds(name: &'static str, value: f64) -> Result<Duration, ConfigError> {
    Duration::try_from_secs_f64(value).map_err(|_| invalid(name, format!("{value} is not a number of seconds")))
}

/// A duration given as seconds (`90`, `1.5`) or with a unit (`30d`, `12h`, `500ms`).
pub(super) fn duration(name: &'static str, text: &str) -> Result<Duration, ConfigError> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<f64>() {
        return seconds(name, secs);
    }
    humantime::parse_duration(text)
        .map_err(|e| invalid(name, format!("{text:?} is not a duration like 30d, 12h or 90s ({e})")))
}

/// A duration where `0` means "none" (keep forever, wait as long as allowed).
pub(super) fn optional_duration(name: &'static str, text: &str) -> Result<Option<Duration>, ConfigError> {
    Ok(Some(duration(name, text)?).filter(|d| !d.is_zero()))
}

/// A duration that must not be zero (a zero time limit would close every connection at once).
pub(super) fn positive(name: &'static str, text: &str) -> Result<Duration, ConfigError> {
    let value = duration(name, text)?;
    if value.is_zero() {
        return Err(invalid(name, "must be more than 0"));
    }
    Ok(value)
}

/// A list setting, each entry checked and normalized by `parse`; empty entries (`a,,b`, a trailing comma) are
/// skipped.
pub(super) fn list(
    name: &'static str,
    entries: &[String],
    parse: fn(&str) -> Result<String, String>,
) -> Result<Vec<String>, ConfigError> {
    entries.iter().filter(|e| !e.trim().is_empty()).map(|e| parse(e).map_err(|reason| invalid(name, reason))).collect()
}

/// A URL as handed out: without its final slash.
pub(super) fn base_url(url: &url::Url) -> String {
    url.as_str().trim_end_matches('/').to_owned()
}
