//! The attempts of one upstream call, one loop with one budget (the request's deadline): the routing's targets in
//! order (`upstream::Upstreams::route`), each skipped while its breaker is open (unless every one is, then all are
//! tried anyway); a target that fails before the first chunk of its body (a connect error, no headers within
//! `--upstream-header-timeout`, a 429, 500, 502, 503 or 504) passes the call to the next at once; the retries of
//! `--upstream-retries`, with backoff and `Retry-After`, apply at the last target tried. Every failed attempt is
//! recorded in the document's `attempts` with its upstream and model. Nothing of a body is read here except a
//! failed error answer's, so a call never moves on once a chunk of its body arrived.

use super::Inner;
use super::live::LiveRequest;
use crate::document::{Attempt, ErrorInfo, Served};
use crate::domain::UpstreamKey;
use crate::store::pipeline::Receipt;
use crate::telemetry::otel;
use crate::upstream::{CallError, Endpoint, ReplyLimits, Retries, Target, Upstream, chat, retry_after};
use serde_json::{Map, Value};
use tracing::Instrument;

/// What is sent upstream.
pub(super) enum Bodies {
    /// A Chat Completions request.
    Chat(String),
    /// A Responses request: as it is, for an upstream that has the Responses API, and translated to Chat
    /// Completions for one that has not (or why it cannot be).
    Responses { responses: String, chat: Result<String, String> },
}

impl Bodies {
    /// Where an attempt at `upstream` goes and what it sends (with `model` instead of the request's own, for a
    /// route's target): a Responses request goes to the upstream's Responses API unless it is known to have none.
    fn pick(&self, upstream: &Upstream, model: Option<&str>) -> Result<(Endpoint, String), ErrorInfo> {
        let (endpoint, body) = match self {
            Bodies::Chat(body) => (Endpoint::ChatCompletions, body),
            Bodies::Responses { responses, chat } => match upstream.has_responses_api() {
                Some(true) | None => (Endpoint::Responses, responses),
                Some(false) => match chat {
                    Ok(body) => (Endpoint::ChatCompletions, body),
                    Err(message) => {
                        return Err(ErrorInfo::new(
                            "invalid_request",
                            format!(
                                "The upstream has only Chat Completions, and this request cannot be put as one: {message}"
                            ),
                        ));
                    }
                },
            },
        };
        Ok((endpoint, model.map_or_else(|| body.clone(), |model| with_model(body, model))))
    }
}

/// The body with `model` as its model (field order kept).
fn with_model(body: &str, model: &str) -> String {
    match serde_json::from_str::<Map<String, Value>>(body) {
        Ok(mut fields) => {
            fields.insert("model".into(), Value::String(model.to_owned()));
            Value::Object(fields).to_string()
        }
        // Built by this server as JSON: cannot happen; sent as it is.
        Err(_) => body.to_owned(),
    }
}

/// A request's upstream call: where it may go, with which key, and what it sends.
pub(super) struct UpstreamCall {
    /// The routing's targets, in order (never empty: a request nothing serves is refused at create).
    pub targets: Vec<Target>,
    /// The caller's own upstream key, for the upstreams that take one.
    pub caller_key: Option<UpstreamKey>,
    pub bodies: Bodies,
    /// The request's own model name.
    pub model: String,
}

/// The answer an attempt got, and where.
pub(super) struct Answered {
    pub response: reqwest::Response,
    pub endpoint: Endpoint,
    pub served: Served,
    /// How much of the answer is read.
    pub limits: ReplyLimits,
}

/// The request's call, to its targets, until one answers (see the module's docs).
pub(super) async fn attempts(
    inner: &Inner,
    live: &LiveRequest,
    call: &UpstreamCall,
    deadline: tokio::time::Instant,
    inserted: &Receipt,
) -> Result<Answered, ErrorInfo> {
    let UpstreamCall { targets, caller_key, bodies, model } = call;
    let connect_timeout = live.meta.options.connect_timeout;
    // When every target is being skipped, the call is tried anyway rather than refused.
    let ignore_breakers = targets.iter().all(|t| !t.upstream.breaker().would_allow());
    let mut last_error = None;
    for (index, target) in targets.iter().enumerate() {
        let upstream = &*target.upstream;
        if !ignore_breakers && !upstream.breaker().allows() {
            crate::metrics::upstream_attempt(upstream.name(), "skipped");
            continue;
        }
        let more = targets[index + 1..].iter().any(|t| ignore_breakers || t.upstream.breaker().would_allow());
        let retries = upstream.retries().clone();
        // Retries only where no other target is left.
        let max = if more { 0 } else { retries.max };
        let key = upstream.key_for(caller_key.clone());
        let sent_model = target.model(model).to_owned();
        let mut failed = 0u32;
        loop {
            let at = crate::domain::unix_now();
            let (endpoint, body) = bodies.pick(upstream, target.model.as_deref())?;
            let span = otel::http_span("upstream", upstream.url(endpoint), None);
            let sent = upstream.send(endpoint, body, key.clone(), connect_timeout, otel::traceparent(&span));
            let answered = match retries.header_timeout {
                Some(limit) => tokio::time::timeout(limit, sent).instrument(span.clone()).await.ok(),
                None => Some(sent.instrument(span.clone()).await),
            };
            match &answered {
                Some(Ok(response)) => otel::http_outcome(&span, Some(response.status().as_u16()), None),
                Some(Err(e)) => otel::http_outcome(&span, None, Some(call_error_info(e).code.as_str())),
                None => otel::http_outcome(&span, None, Some("timeout")),
            }
            drop(span);
            // The wait before another attempt here, if one may follow.
            let again = |retry_after| {
                let delay = retries.delay(failed + 1, retry_after);
                (failed < max && tokio::time::Instant::now() + delay < deadline).then_some(delay)
            };
            let (error, status_code, delay) = match answered {
                // A timeout before the headers: the attempt is dropped (its connection closed).
                None => {
                    let limit = retries.header_timeout.unwrap_or_default().as_secs_f64();
                    let info = ErrorInfo::new(
                        "timeout",
                        format!(
                            "The upstream sent no response headers within {limit} seconds (--upstream-header-timeout)."
                        ),
                    );
                    let delay = again(None);
                    if delay.is_none() && !more {
                        failure(upstream);
                        return Err(info);
                    }
                    (info, None, delay)
                }
                Some(Ok(response)) => {
                    let response = if endpoint == Endpoint::Responses && upstream.has_responses_api().is_none() {
                        match learn_responses_api(upstream, response).await {
                            Some(response) => response,
                            // It has none: the same attempt again, translated.
                            None => continue,
                        }
                    } else {
                        response
                    };
                    let status = response.status().as_u16();
                    let served = Served { name: upstream.name().to_owned(), model: sent_model.clone() };
                    if !Retries::retryable_status(status) {
                        answered_by(upstream);
                        return Ok(Answered { response, endpoint, served, limits: upstream.limits() });
                    }
                    let delay = again(retry_after(&response));
                    if delay.is_none() && !more {
                        // The last word: this answer is the request's.
                        failure(upstream);
                        return Ok(Answered { response, endpoint, served, limits: upstream.limits() });
                    }
                    (ErrorInfo::new("upstream_error", error_answer(response).await), Some(status), delay)
                }
                Some(Err(e)) => {
                    let info = call_error_info(&e);
                    let delay = again(None);
                    if !Retries::retryable_error(&e) || (delay.is_none() && !more) {
                        failure(upstream);
                        return Err(info);
                    }
                    (info, None, delay)
                }
            };
            failure(upstream);
            failed += 1;
            if inserted.durable().await.is_err() {
                return Err(error);
            }
            let next = if delay.is_some() { "retrying" } else { "trying the next upstream" };
            tracing::info!(request = %live.meta.locator.id, upstream = upstream.name(), model = %sent_model,
                attempt = failed, error = %error.message, "upstream attempt failed; {next}");
            let attempt = Attempt {
                at,
                status_code,
                error: error.clone(),
                upstream: Some(upstream.name().to_owned()),
                model: Some(sent_model.clone()),
            };
            if let Some(write) = live.attempt_failed(attempt) {
                inner.persister.push(write).await;
            }
            last_error = Some(error);
            match delay {
                Some(delay) => tokio::time::sleep(delay).await,
                None => break,
            }
        }
    }
    Err(last_error.unwrap_or_else(|| {
        ErrorInfo::new("upstream_unreachable", "No upstream could be tried for this request (every one is skipped).")
    }))
}

fn failure(upstream: &Upstream) {
    crate::metrics::upstream_attempt(upstream.name(), "failed");
    if upstream.breaker().failed() {
        tracing::warn!(upstream = upstream.name(), "the upstream failed too often in a row; it is skipped for a while");
    }
    crate::metrics::breaker(upstream.name(), upstream.breaker().is_open());
}

fn answered_by(upstream: &Upstream) {
    crate::metrics::upstream_attempt(upstream.name(), "answered");
    upstream.breaker().answered();
    crate::metrics::breaker(upstream.name(), false);
}

/// What an upstream's first answer to its Responses API says (setting `auto`): a 405, or a 404 that is not about
/// the model (OpenAI answers 404 `model_not_found` for a model it does not know), means it has none, remembered
/// from then on (`None`: try again, translated); any other answer means it has one, and is the attempt's answer.
async fn learn_responses_api(upstream: &Upstream, response: reqwest::Response) -> Option<reqwest::Response> {
    let status = response.status().as_u16();
    if status != 404 && status != 405 {
        upstream.found_responses_api(true);
        return Some(response);
    }
    let body = response.bytes().await.unwrap_or_default();
    let about_model = chat::error_code(&body).is_some_and(|code| code == "model_not_found");
    if about_model {
        // It has one. This answer was read to tell, so the attempt is made again, to record the answer it gets.
        upstream.found_responses_api(true);
    } else {
        tracing::info!(
            status,
            upstream = upstream.name(),
            "the upstream has no Responses API; Responses requests are translated to Chat Completions from now on"
        );
        upstream.found_responses_api(false);
    }
    None
}

fn call_error_info(e: &CallError) -> ErrorInfo {
    let code = match e {
        CallError::ConnectTimeout(_) => "connect_timeout",
        CallError::Unreachable(_) => "upstream_unreachable",
        CallError::Failed(_) | CallError::Redirected(_) => "upstream_error",
        CallError::TooLarge(_) => "reply_too_large",
    };
    ErrorInfo::new(code, e.to_string())
}

/// Why an error answer that is retried failed: its status and the `error.message` of its body (read up to
/// 64 KiB).
async fn error_answer(mut response: reqwest::Response) -> String {
    const MAX: usize = 64 * 1024;
    let status = response.status();
    let mut body = Vec::new();
    while body.len() < MAX {
        match response.chunk().await {
            Ok(Some(piece)) => body.extend_from_slice(&piece),
            _ => break,
        }
    }
    match chat::error_message(&body) {
        Some(message) => format!("The upstream answered {status}: {message}"),
        None => format!("The upstream answered {status}."),
    }
}
