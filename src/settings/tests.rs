use super::*;
use clap::Parser;

/// `offload serve`'s flags alone, as clap reads them.
#[derive(Parser)]
struct Serve {
    #[command(flatten)]
    args: ServeArgs,
}

fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("offload.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

#[test]
fn flags_win_over_the_file_and_the_file_over_defaults() {
    let (_dir, path) = file("default_model = \"from-file\"\nmax_timeout = 30\nlisten = \"127.0.0.1:9000\"\n");
    let args = ServeArgs { config: Some(path), max_timeout: Some(60.0), ..ServeArgs::default() };
    let s = Settings::resolve(args).unwrap();
    assert_eq!(s.limits.request.default_model, "from-file");
    assert_eq!(s.limits.request.max_timeout, 60.0);
    assert_eq!(s.server.listen.port(), 9000);
    assert_eq!(s.limits.request.max_connect_timeout, 10.0);
}

#[test]
fn flags_parsed_by_clap_layer_over_the_file() {
    let (_dir, path) = file("max_in_flight = 7\nupstream_h2c = true\ncors_origins = [\"https://a.example\"]\n");
    let config = path.to_str().unwrap();
    let Serve { args } =
        Serve::try_parse_from(["serve", "--config", config, "--cors-origins", "https://b.example,", "--mock-upstream"])
            .unwrap();
    let s = Settings::resolve(args).unwrap();
    assert_eq!(s.limits.max_in_flight, 7);
    assert!(s.upstream.h2c && s.upstream.mock);
    assert_eq!(s.web.cors_origins, ["https://b.example"]);
    let Serve { args } = Serve::try_parse_from(["serve", "--config", config, "--upstream-h2c", "false"]).unwrap();
    assert!(!Settings::resolve(args).unwrap().upstream.h2c);
}

#[test]
fn the_defaults_are_the_documented_ones() {
    let s = Settings::resolve(ServeArgs::default()).unwrap();
    assert_eq!(s.server.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
    assert_eq!(s.server.public_url, None);
    assert_eq!(s.server.max_body_bytes, 4 * 1024 * 1024);
    assert_eq!(s.server.keep_alive, Duration::from_secs(15));
    assert_eq!(s.server.shutdown_grace, Duration::from_secs(10));
    assert_eq!(s.store.data_dir, PathBuf::from("offload-data"));
    assert!(matches!(s.store.location, StoreLocation::Sqlite { synchronous: Synchronous::Normal, .. }));
    assert_eq!(s.store.flush_interval, Duration::from_millis(50));
    assert_eq!(s.store.node_lease, Duration::from_secs(10));
    assert!(s.store.cluster_secret.is_none() && s.store.advertise_url.is_none());
    assert_eq!(s.upstream.url.as_str(), "https://api.openai.com/v1");
    assert_eq!((s.upstream.retries, s.upstream.header_timeout, s.upstream.h2c), (2, None, false));
    assert_eq!(s.upstream.api, UpstreamApi::Auto);
    assert!(s.upstream.key.is_none() && !s.upstream.mock);
    assert_eq!(s.upstream.models_cache, Duration::from_secs(60));
    assert_eq!(s.limits.request.default_model, "gpt-3.5-turbo");
    assert_eq!((s.limits.request.max_timeout, s.limits.max_in_flight), (90.0, 20_000));
    assert_eq!(s.limits.outage.buffer, 256 * 1024 * 1024);
    assert_eq!(s.limits.outage.limit, Duration::from_secs(600));
    assert!(s.webhooks.secret.is_none() && !s.webhooks.allow_private);
    assert_eq!(s.webhooks.retry_for, Duration::from_secs(24 * 3600));
    assert_eq!((s.webhooks.backoff, s.webhooks.timeout), (Duration::from_secs(5), Duration::from_secs(10)));
}

#[test]
fn the_key_cache_ttl_is_a_duration_of_one_second_unless_set() {
    assert_eq!(Settings::resolve(ServeArgs::default()).unwrap().store.key_cache_ttl, Duration::from_secs(1));
    let (_dir, path) = file("key_cache_ttl = \"250ms\"\n");
    let s = Settings::resolve(ServeArgs { config: Some(path), ..ServeArgs::default() }).unwrap();
    assert_eq!(s.store.key_cache_ttl, Duration::from_millis(250));
    let s = Settings::resolve(ServeArgs { key_cache_ttl: Some("0".into()), ..ServeArgs::default() }).unwrap();
    assert_eq!(s.store.key_cache_ttl, Duration::ZERO);
}

#[test]
fn unknown_keys_in_the_file_are_refused() {
    let (_dir, path) = file("max_timeot = 30\n");
    let err = Settings::resolve(ServeArgs { config: Some(path), ..ServeArgs::default() }).unwrap_err();
    assert!(err.to_string().contains("max_timeot"));
    assert!(err.to_string().starts_with("cannot read the config file "), "{err}");
}

#[test]
fn what_is_wrong_with_the_file_is_reported_as_the_files() {
    for text in ["upstream_retries = \"many\"\n", "listen = \"nowhere\"\n", "max_timeout = \n", "config = \"x\"\n"] {
        let (_dir, path) = file(text);
        let err = Settings::resolve(ServeArgs { config: Some(path), ..ServeArgs::default() }).unwrap_err();
        assert!(matches!(err, ConfigError::File { .. }), "{text}: {err}");
    }
    let (_dir, path) = file("upstream_retries = \"many\"\n");
    let err = Settings::resolve(ServeArgs { config: Some(path), ..ServeArgs::default() }).unwrap_err();
    assert!(err.to_string().contains("upstream_retries"), "{err}");
    let missing = ServeArgs { config: Some("/nonexistent/offload.toml".into()), ..ServeArgs::default() };
    assert!(matches!(Settings::resolve(missing), Err(ConfigError::File { .. })));
}

#[test]
fn durations_take_units_or_seconds() {
    let s = Settings::resolve(ServeArgs { retention: Some("12h".into()), ..ServeArgs::default() }).unwrap();
    assert_eq!(s.store.retention, Some(Duration::from_secs(12 * 3600)));
    let s = Settings::resolve(ServeArgs { retention: Some("0".into()), ..ServeArgs::default() }).unwrap();
    assert_eq!(s.store.retention, None);
    let s = Settings::resolve(ServeArgs::default()).unwrap();
    assert_eq!(s.store.retention, Some(Duration::from_secs(30 * 86_400)));
    assert!(Settings::resolve(ServeArgs { retention: Some("soon".into()), ..ServeArgs::default() }).is_err());
    assert!(Settings::resolve(ServeArgs { webhook_secret: Some("plain".into()), ..ServeArgs::default() }).is_err());
}

#[test]
fn connection_limits_have_public_defaults_and_refuse_zero() {
    let s = Settings::resolve(ServeArgs::default()).unwrap();
    assert_eq!(s.server.connections.header_timeout, Duration::from_secs(10));
    assert_eq!(s.server.connections.idle_timeout, Duration::from_secs(60));
    assert_eq!(s.server.connections.max_connections, 10_000);
    assert_eq!(s.server.body_timeout, Duration::from_secs(30));
    assert!(!s.server.allow_open);
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
    let (_dir, path) = file("metrics_listen = \"127.0.0.1:9100\"\nlog_format = \"json\"\n");
    let args = ServeArgs { config: Some(path), ..ServeArgs::default() };
    assert_eq!(args.log_format(), LogFormat::Json);
    let s = Settings::resolve(args).unwrap();
    assert_eq!(s.telemetry.metrics_listen, Some("127.0.0.1:9100".parse().unwrap()));
    assert_eq!(s.telemetry.log_format, LogFormat::Json);
    let s = Settings::resolve(ServeArgs::default()).unwrap();
    assert_eq!((s.telemetry.metrics_listen, s.telemetry.log_format), (None, LogFormat::Text));
    let (_dir, path) = file("log_format = \"json\"\nnot_a_key = 1\n");
    assert_eq!(ServeArgs { config: Some(path), ..ServeArgs::default() }.log_format(), LogFormat::Text);
}

#[test]
fn hosts_and_origins_are_lists_checked_at_start() {
    let (_dir, path) = file("cors_origins = [\"https://App.example.com\"]\nallowed_hosts = [\"box.lan\"]\n");
    let s = Settings::resolve(ServeArgs { config: Some(path), ..ServeArgs::default() }).unwrap();
    assert_eq!(s.web.cors_origins, ["https://app.example.com"]);
    assert_eq!(s.web.allowed_hosts, ["box.lan"]);
    let err =
        Settings::resolve(ServeArgs { cors_origins: Some(vec!["app.example.com".into()]), ..ServeArgs::default() })
            .unwrap_err();
    assert!(err.to_string().contains("cors_origins"), "{err}");
    let s = Settings::resolve(ServeArgs::default()).unwrap();
    assert!(s.web.cors_origins.is_empty() && s.web.allowed_hosts.is_empty());
}

#[test]
fn upstream_body_limits_have_defaults_and_refuse_tiny_values() {
    let s = Settings::resolve(ServeArgs::default()).unwrap();
    assert_eq!(s.upstream.reply_limits, ReplyLimits::default());
    let s = Settings::resolve(ServeArgs { max_upstream_event_bytes: Some(4096), ..ServeArgs::default() }).unwrap();
    assert_eq!(s.upstream.reply_limits.max_event_bytes, 4096);
    let err = Settings::resolve(ServeArgs { max_upstream_reply_bytes: Some(0), ..ServeArgs::default() }).unwrap_err();
    assert!(err.to_string().contains("max_upstream_reply_bytes"));
}

#[test]
fn bounds_below_one_second_are_refused() {
    let err = Settings::resolve(ServeArgs { max_timeout: Some(0.5), ..ServeArgs::default() }).unwrap_err();
    assert!(err.to_string().contains("max_timeout"));
    let err = Settings::resolve(ServeArgs { max_connect_timeout: Some(1e20), ..ServeArgs::default() }).unwrap_err();
    assert!(err.to_string().contains("max_connect_timeout"));
}

#[test]
fn the_upstream_api_is_auto_unless_a_flag_or_the_file_says_otherwise() {
    assert_eq!(Settings::resolve(ServeArgs::default()).unwrap().upstream.api, UpstreamApi::Auto);
    let (_dir, path) = file("upstream_api = \"chat\"\n");
    let config = path.to_str().unwrap();
    let s = Settings::resolve(ServeArgs { config: Some(path.clone()), ..ServeArgs::default() }).unwrap();
    assert_eq!(s.upstream.api, UpstreamApi::Chat);
    let Serve { args } = Serve::try_parse_from(["serve", "--config", config, "--upstream-api", "responses"]).unwrap();
    assert_eq!(Settings::resolve(args).unwrap().upstream.api, UpstreamApi::Responses);
    let Serve { args } = Serve::try_parse_from(["serve", "--upstream-api", "auto"]).unwrap();
    assert_eq!(Settings::resolve(args).unwrap().upstream.api, UpstreamApi::Auto);
}

#[test]
fn a_bad_upstream_api_is_refused_with_the_values_allowed() {
    let err = Serve::try_parse_from(["serve", "--upstream-api", "both"]).err().unwrap().to_string();
    assert!(err.contains("--upstream-api") && err.contains("auto, responses, chat"), "{err}");
    let err = Settings::resolve(ServeArgs { upstream_api: Some("Chat".into()), ..ServeArgs::default() }).unwrap_err();
    assert_eq!(err.to_string(), "invalid setting upstream_api: must be `auto`, `responses` or `chat`, not \"Chat\"");
    let (_dir, path) = file("upstream_api = \"both\"\n");
    let err = Settings::resolve(ServeArgs { config: Some(path), ..ServeArgs::default() }).unwrap_err();
    assert!(err.to_string().contains("upstream_api") && err.to_string().contains("`auto`, `responses` or `chat`"));
    let (_dir, path) = file("upstream_api = true\n");
    let err = Settings::resolve(ServeArgs { config: Some(path), ..ServeArgs::default() }).unwrap_err();
    assert!(matches!(err, ConfigError::File { .. }) && err.to_string().contains("upstream_api"), "{err}");
}

/// Set by [`the_upstream_api_comes_from_its_environment_variable`] for the copy of this test binary it runs:
/// `OFFLOAD_UPSTREAM_API` is read there, where setting it cannot disturb other tests (nor needs `unsafe`).
const ENV_CHILD: &str = "OFFLOAD_TEST_UPSTREAM_API_CHILD";

#[test]
fn the_upstream_api_comes_from_its_environment_variable() {
    for (value, expect) in [("chat", "chat"), ("responses", "responses"), ("both", "refused")] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "settings::tests::upstream_api_environment_child", "--test-threads=1"])
            .env("OFFLOAD_UPSTREAM_API", value)
            .env(ENV_CHILD, expect)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("1 passed"), "{value}: {text}");
    }
}

#[test]
fn upstream_api_environment_child() {
    let Ok(expect) = std::env::var(ENV_CHILD) else { return };
    let parsed = Serve::try_parse_from(["serve"]);
    match expect.as_str() {
        "refused" => {
            let err = parsed.err().unwrap().to_string();
            assert!(err.contains("--upstream-api") && err.contains("auto, responses, chat"), "{err}");
        }
        api => {
            let Serve { args } = parsed.unwrap();
            let s = Settings::resolve(args).unwrap();
            assert_eq!(serde_json::to_value(s.upstream.api).unwrap(), api);
            // A flag wins over the environment.
            let Serve { args } = Serve::try_parse_from(["serve", "--upstream-api", "auto"]).unwrap();
            assert_eq!(Settings::resolve(args).unwrap().upstream.api, UpstreamApi::Auto);
        }
    }
}
