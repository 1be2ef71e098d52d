//! The config file's upstreams and routes (`[[upstreams]]`, `[[routes]]`), read from the file's own text so that
//! every mistake is reported with the line it is on, at start, never at the first request: an unknown key, a
//! duplicate name, a route naming no upstream, a pattern that is not a glob, a key variable that is not set.
//!
//! ```toml
//! [[upstreams]]
//! name = "openai"
//! url = "https://api.openai.com/v1"
//! key_env = "OPENAI_API_KEY"        # or key = "..."
//! models = ["gpt-*", "o*"]          # left out: every model
//! api = "auto"                      # auto | responses | chat
//! h2c = false
//! caller_keys = false               # whether callers' own X-OpenAI-API-Key may be sent to it
//!
//! [[routes]]
//! model = "fast"
//! targets = [{ upstream = "openai", model = "gpt-4o-mini" }, { upstream = "local", model = "llama3.1:8b" }]
//! ```

use super::parse::ConfigError;
use crate::domain::UpstreamKey;
use crate::upstream::{RouteSpec, UpstreamApi};
use serde::Deserialize;
use toml::Spanned;
use url::Url;

/// One upstream of the config file, checked.
#[derive(Debug, Clone)]
pub struct NamedUpstream {
    pub name: String,
    pub url: Url,
    pub key: Option<UpstreamKey>,
    /// The models it serves (`None`: every model).
    pub models: Option<globset::GlobSet>,
    pub api: UpstreamApi,
    pub h2c: bool,
    pub caller_keys: bool,
}

#[derive(Deserialize)]
struct File {
    #[serde(default)]
    upstreams: Vec<Spanned<UpstreamEntry>>,
    #[serde(default)]
    routes: Vec<Spanned<RouteEntry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamEntry {
    name: Spanned<String>,
    url: Spanned<String>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    key_env: Option<Spanned<String>>,
    #[serde(default)]
    models: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    api: Option<Spanned<String>>,
    #[serde(default)]
    h2c: bool,
    #[serde(default)]
    caller_keys: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteEntry {
    model: Spanned<String>,
    targets: Vec<Spanned<TargetEntry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetEntry {
    upstream: Spanned<String>,
    model: String,
}

/// The upstreams and routes of the config file at `path` (its text `text`); both empty when it names none.
/// `env` reads a key variable (the process's environment, or a test's).
pub fn read(
    path: &str,
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(Vec<NamedUpstream>, Vec<RouteSpec>), ConfigError> {
    let at = |offset: usize, reason: String| {
        let line = text[..offset.min(text.len())].matches('\n').count() + 1;
        ConfigError::File { path: path.to_owned(), reason: format!("line {line}: {reason}") }
    };
    let file: File = toml::from_str(text).map_err(|e| match e.span() {
        Some(span) => at(span.start, e.message().to_owned()),
        None => ConfigError::File { path: path.to_owned(), reason: e.to_string() },
    })?;
    let mut upstreams: Vec<NamedUpstream> = Vec::new();
    for entry in &file.upstreams {
        let entry = entry.get_ref();
        let name = entry.name.get_ref().trim();
        if name.is_empty() {
            return Err(at(entry.name.span().start, "an upstream's `name` must not be empty".into()));
        }
        if upstreams.iter().any(|u| u.name == name) {
            return Err(at(entry.name.span().start, format!("the upstream name {name:?} is used twice")));
        }
        let url = Url::parse(entry.url.get_ref())
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| {
                at(
                    entry.url.span().start,
                    format!("{:?} is not an http or https URL such as https://api.openai.com/v1", entry.url.get_ref()),
                )
            })?;
        let key = match (&entry.key, &entry.key_env) {
            (Some(_), Some(var)) => {
                return Err(at(var.span().start, "give `key` or `key_env`, not both".into()));
            }
            (Some(key), None) => UpstreamKey::new(key),
            (None, Some(var)) => match env(var.get_ref()).filter(|v| !v.trim().is_empty()) {
                Some(value) => UpstreamKey::new(&value),
                None => {
                    let var_name = var.get_ref();
                    return Err(at(
                        var.span().start,
                        format!("the environment variable {var_name} (the key of upstream {name:?}) is not set"),
                    ));
                }
            },
            (None, None) => None,
        };
        let models = match &entry.models {
            None => None,
            Some(patterns) => {
                let mut set = globset::GlobSetBuilder::new();
                for pattern in patterns {
                    let glob = globset::Glob::new(pattern.get_ref()).map_err(|e| {
                        at(pattern.span().start, format!("{:?} is not a glob pattern: {e}", pattern.get_ref()))
                    })?;
                    set.add(glob);
                }
                Some(set.build().map_err(|e| at(entry.name.span().start, e.to_string()))?)
            }
        };
        let api = match entry.api.as_ref().map(|a| (a.get_ref().as_str(), a.span().start)) {
            None | Some(("auto", _)) => UpstreamApi::Auto,
            Some(("responses", _)) => UpstreamApi::Responses,
            Some(("chat", _)) => UpstreamApi::Chat,
            Some((other, offset)) => {
                return Err(at(offset, format!("`api` must be `auto`, `responses` or `chat`, not {other:?}")));
            }
        };
        upstreams.push(NamedUpstream {
            name: name.to_owned(),
            url,
            key,
            models,
            api,
            h2c: entry.h2c,
            caller_keys: entry.caller_keys,
        });
    }
    let mut routes: Vec<RouteSpec> = Vec::new();
    for entry in &file.routes {
        let entry = entry.get_ref();
        let model = entry.model.get_ref().trim();
        if model.is_empty() || routes.iter().any(|r| r.model == model) {
            let reason = if model.is_empty() {
                "a route's `model` must not be empty".into()
            } else {
                format!("the route {model:?} is given twice")
            };
            return Err(at(entry.model.span().start, reason));
        }
        if entry.targets.is_empty() {
            return Err(at(entry.model.span().start, format!("the route {model:?} has no targets")));
        }
        let mut targets = Vec::new();
        for target in &entry.targets {
            let upstream = target.get_ref().upstream.get_ref();
            if !upstreams.iter().any(|u| &u.name == upstream) {
                let known: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
                return Err(at(
                    target.get_ref().upstream.span().start,
                    format!("the route {model:?} names the upstream {upstream:?}, which is not one of {known:?}"),
                ));
            }
            targets.push((upstream.clone(), target.get_ref().model.clone()));
        }
        routes.push(RouteSpec { model: model.to_owned(), targets });
    }
    Ok((upstreams, routes))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen = "127.0.0.1:0"

[[upstreams]]
name = "openai"
url = "https://api.openai.com/v1"
key_env = "TEST_OPENAI_KEY"
models = ["gpt-*", "o*"]

[[upstreams]]
name = "local"
url = "http://127.0.0.1:11434/v1"
api = "chat"
caller_keys = true

[[routes]]
model = "fast"
targets = [{ upstream = "openai", model = "gpt-4o-mini" }, { upstream = "local", model = "llama3.1:8b" }]
"#;

    fn env(name: &str) -> Option<String> {
        (name == "TEST_OPENAI_KEY").then(|| "sk-test".to_owned())
    }

    fn error(text: &str) -> String {
        match read("offload.toml", text, env) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_good_file_gives_its_upstreams_and_routes() {
        let (upstreams, routes) = read("offload.toml", GOOD, env).unwrap();
        assert_eq!(upstreams.len(), 2);
        assert_eq!(upstreams[0].key.as_ref().map(|k| k.expose().to_owned()), Some("sk-test".into()));
        assert!(upstreams[0].models.as_ref().unwrap().is_match("gpt-4o"));
        assert!(!upstreams[0].models.as_ref().unwrap().is_match("llama3"));
        assert_eq!(
            (upstreams[1].api, upstreams[1].caller_keys, upstreams[1].models.is_none()),
            (UpstreamApi::Chat, true, true)
        );
        assert_eq!(routes[0].targets[1], ("local".into(), "llama3.1:8b".into()));
        assert_eq!(read("offload.toml", "listen = \"127.0.0.1:0\"\n", env).unwrap().0.len(), 0);
    }

    #[test]
    fn each_mistake_names_its_line() {
        let unknown_upstream = GOOD.replace("{ upstream = \"local\"", "{ upstream = \"nowhere\"");
        assert!(
            error(&unknown_upstream).contains("line 18: the route \"fast\" names the upstream \"nowhere\""),
            "{}",
            error(&unknown_upstream)
        );
        let duplicate = GOOD.replace("name = \"local\"", "name = \"openai\"");
        assert!(
            error(&duplicate).contains("line 11: the upstream name \"openai\" is used twice"),
            "{}",
            error(&duplicate)
        );
        let pattern = GOOD.replace("\"o*\"", "\"o[\"");
        assert!(error(&pattern).contains("line 8: \"o[\" is not a glob pattern"), "{}", error(&pattern));
        let missing = GOOD.replace("TEST_OPENAI_KEY", "TEST_NOT_SET");
        assert!(error(&missing).contains("line 7: the environment variable TEST_NOT_SET"), "{}", error(&missing));
        let unknown_key = GOOD.replace("caller_keys = true", "callers = true");
        assert!(error(&unknown_key).contains("line 14"), "{}", error(&unknown_key));
        let bad_url = GOOD.replace("http://127.0.0.1:11434/v1", "localhost:11434");
        assert!(error(&bad_url).contains("line 12"), "{}", error(&bad_url));
    }
}
