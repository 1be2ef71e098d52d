//! The upstream client: its URLs and what it remembers of an `auto` upstream's Responses API.

use super::*;

#[test]
fn retry_after_takes_seconds_or_an_http_date() {
    let now = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    assert_eq!(parse_retry_after(" 1.5 ", now), Some(Duration::from_millis(1500)));
    let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
    assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(30)));
    let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
    assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
    assert_eq!(parse_retry_after("soon", now), None);
    assert_eq!(parse_retry_after("-1", now), None);
}

#[test]
fn backoff_doubles_with_jitter_and_retry_after_wins_when_longer() {
    let retries = Retries { max: 3, backoff: Duration::from_millis(100), header_timeout: None };
    for _ in 0..100 {
        let first = retries.delay(1, None);
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100), "{first:?}");
        let third = retries.delay(3, None);
        assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400), "{third:?}");
        assert_eq!(retries.delay(1, Some(Duration::from_secs(2))), Duration::from_secs(2));
        assert!(retries.delay(3, Some(Duration::from_millis(1))) >= Duration::from_millis(200));
    }
}

#[test]
fn only_the_documented_statuses_and_connect_failures_are_retried() {
    for status in [429, 500, 502, 503, 504] {
        assert!(Retries::retryable_status(status));
    }
    for status in [200, 400, 401, 404, 408, 409, 422, 501, 505] {
        assert!(!Retries::retryable_status(status));
    }
    assert!(Retries::retryable_error(&CallError::ConnectTimeout(5.0)));
    assert!(Retries::retryable_error(&CallError::Unreachable("refused".into())));
    assert!(!Retries::retryable_error(&CallError::Failed("reset after the headers".into())));
}

fn upstream(base: &str, api: UpstreamApi) -> Upstream {
    Upstream::new(&Url::parse(base).unwrap(), None, false).with_api(api)
}

#[test]
fn calls_go_under_the_base() {
    let up = upstream("http://up.example/v1/", UpstreamApi::Auto);
    assert_eq!(up.chat_url.as_str(), "http://up.example/v1/chat/completions");
    assert_eq!(up.responses_url.as_str(), "http://up.example/v1/responses");
    assert_eq!(up.models_url.as_str(), "http://up.example/v1/models");
}

#[test]
fn auto_tries_the_responses_api_and_remembers_the_answer() {
    assert_eq!(Upstream::new(&Url::parse("http://up.example/v1").unwrap(), None, false).has_responses_api(), None);
    let up = upstream("http://up.example/v1", UpstreamApi::Auto);
    assert_eq!(up.has_responses_api(), None);
    up.found_responses_api(false);
    assert_eq!(up.has_responses_api(), Some(false));
    let up = upstream("http://up.example/v1", UpstreamApi::Auto);
    up.found_responses_api(true);
    assert_eq!(up.has_responses_api(), Some(true));
}

#[test]
fn responses_and_chat_are_fixed_whatever_is_found() {
    for (api, has) in [(UpstreamApi::Responses, true), (UpstreamApi::Chat, false)] {
        let up = upstream("http://up.example/v1", api);
        assert_eq!(up.has_responses_api(), Some(has));
        up.found_responses_api(!has);
        assert_eq!(up.has_responses_api(), Some(has), "{api:?}");
        up.found_responses_api(has);
        assert_eq!(up.has_responses_api(), Some(has), "{api:?}");
    }
}

#[test]
fn the_setting_reads_and_writes_in_lowercase() {
    for (api, text) in [(UpstreamApi::Auto, "auto"), (UpstreamApi::Responses, "responses"), (UpstreamApi::Chat, "chat")]
    {
        assert_eq!(serde_json::to_string(&api).unwrap(), format!("\"{text}\""));
        assert_eq!(serde_json::from_str::<UpstreamApi>(&format!("\"{text}\"")).unwrap(), api);
    }
    assert!(serde_json::from_str::<UpstreamApi>("\"Chat\"").is_err());
    assert_eq!(UpstreamApi::default(), UpstreamApi::Auto);
}
