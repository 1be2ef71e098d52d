//! Webhook delivery: once a request is final, its document is POSTed to its `webhook_url` as the form field
//! `response` (a Responses API request: an event in OpenAI's webhook shape, as JSON), signed per Standard
//! Webhooks when a secret is configured.
//!
//! Deliveries are rows in the store, queued in the same transaction as the final status, so they survive a
//! restart. The deliverer claims due rows with a lease (a crash mid-attempt means a retry, never a loss: delivery
//! is at least once, and `webhook-id` is the same on every attempt so receivers can deduplicate). 2xx ends a
//! delivery; 5xx, 429 (honouring `Retry-After`), timeouts and connection errors are retried with exponential
//! backoff and jitter until `retry_for` has passed since the first attempt; any other status ends it as failed.

pub mod signature;
pub mod ssrf;

use crate::document::{BodyView, Urls, render};
use crate::domain::{Format, unix_now};
use crate::store::{Store, WebhookJob, WebhookState, WebhookStatus, WebhookStore};
use rand::Rng;
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use serde_json::value::RawValue;
use signature::WebhookSecret;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// How deliveries are made and retried.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub secret: Option<WebhookSecret>,
    /// Send to loopback and private addresses too (local development).
    pub allow_private: bool,
    /// Give up this long after the first attempt.
    pub retry_for: Duration,
    /// The first retry waits about this long; each further one twice as long (capped at an hour).
    pub backoff: Duration,
    /// One attempt's time limit.
    pub timeout: Duration,
}

pub struct Deliverer {
    webhooks: Arc<dyn WebhookStore>,
    requests: Arc<dyn Store>,
    urls: Urls,
    config: WebhookConfig,
    client: reqwest::Client,
    /// Woken when a delivery is queued, so the first attempt does not wait for the next poll.
    pub wake: Arc<Notify>,
}

const LEASE_SECONDS: f64 = 120.0;
const POLL: Duration = Duration::from_millis(500);
const CONCURRENCY: usize = 32;

impl Deliverer {
    pub fn new(
        webhooks: Arc<dyn WebhookStore>,
        requests: Arc<dyn Store>,
        urls: Urls,
        config: WebhookConfig,
    ) -> Result<Self, reqwest::Error> {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.timeout)
            .user_agent(concat!("offload-webhooks/", env!("CARGO_PKG_VERSION")));
        if !config.allow_private {
            builder = builder.dns_resolver(Arc::new(ssrf::GuardedResolver));
        }
        Ok(Self { webhooks, requests, urls, config, client: builder.build()?, wake: Arc::new(Notify::new()) })
    }

    /// Delivers until `closing` is cancelled; attempts under way are awaited.
    pub async fn run(self: Arc<Self>, closing: CancellationToken) {
        let tasks = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(CONCURRENCY));
        while !closing.is_cancelled() {
            let free = slots.available_permits();
            let jobs = if free == 0 {
                Vec::new()
            } else {
                match self.webhooks.claim_webhooks(unix_now(), LEASE_SECONDS, free).await {
                    Ok(jobs) => jobs,
                    Err(e) => {
                        tracing::error!(error = %e, "could not read due webhooks");
                        Vec::new()
                    }
                }
            };
            let claimed_all = jobs.len() == free && free > 0;
            for job in jobs {
                let Ok(permit) = slots.clone().acquire_owned().await else { break };
                let me = self.clone();
                tasks.spawn(crate::telemetry::within_request(job.id, async move {
                    me.attempt(job).await;
                    drop(permit);
                }));
            }
            if claimed_all {
                continue;
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(POLL) => {}
                _ = closing.cancelled() => {}
            }
        }
        tasks.close();
        tasks.wait().await;
    }

    async fn attempt(&self, job: WebhookJob) {
        let request = match self.requests.get(job.id).await {
            Ok(Some(request)) => request,
            // Deleted meanwhile: its delivery row went with it.
            Ok(None) => return,
            Err(e) => {
                tracing::error!(request = %job.id, error = %e, "could not load a request for its webhook");
                return;
            }
        };
        let (message_id, content_type, payload) = match request.meta.format {
            Format::Responses => openai_event(&request),
            Format::Chat => {
                let body = request.body.as_deref().and_then(|b| serde_json::from_str::<&RawValue>(b).ok());
                let view = body.map_or(BodyView::None, BodyView::Json);
                let doc = render(&request.meta, &request.progress, view, &self.urls, None);
                let form = url::form_urlencoded::Serializer::new(String::new())
                    .append_pair("response", &String::from_utf8_lossy(&doc))
                    .finish();
                (format!("msg_{}", hex::encode(job.id.as_bytes())), "application/x-www-form-urlencoded", form)
            }
        };
        let now = unix_now();
        let timestamp = now as i64;

        let span = url::Url::parse(&job.url)
            .map(|url| crate::telemetry::otel::http_span("webhook", &url, request.meta.traceparent.as_deref()))
            .unwrap_or_else(|_| tracing::Span::none());
        let traceparent = crate::telemetry::otel::traceparent(&span);
        let outcome = self
            .send(&job.url, &message_id, timestamp, (content_type, payload), traceparent)
            .instrument(span.clone())
            .await;
        match &outcome {
            Outcome::Answered { code, .. } => crate::telemetry::otel::http_outcome(&span, Some(*code), None),
            Outcome::Failed(_) => crate::telemetry::otel::http_outcome(&span, None, Some("unreachable")),
        }
        drop(span);
        let mut status = job.status;
        status.attempts += 1;
        let first = *status.first_attempt_at.get_or_insert(now);
        status.last_attempt_at = Some(now);
        let retry_after = match outcome {
            Outcome::Answered { code, retry_after } => {
                status.last_status_code = Some(code);
                status.last_error = None;
                match code {
                    200..=299 => None,
                    429 => Some(retry_after.unwrap_or_default()),
                    500..=599 => Some(Duration::ZERO),
                    _ => {
                        status.state = WebhookState::Failed;
                        status.next_attempt_at = None;
                        return self.record(job.id, status).await;
                    }
                }
            }
            Outcome::Failed(error) => {
                status.last_status_code = None;
                status.last_error = Some(error);
                Some(Duration::ZERO)
            }
        };
        match retry_after {
            None => {
                status.state = WebhookState::Delivered;
                status.next_attempt_at = None;
            }
            Some(at_least) => {
                let delay = self.backoff(status.attempts).max(at_least);
                let next = unix_now() + delay.as_secs_f64();
                if next > first + self.config.retry_for.as_secs_f64() {
                    status.state = WebhookState::Failed;
                    status.next_attempt_at = None;
                } else {
                    status.state = WebhookState::Retrying;
                    status.next_attempt_at = Some(next);
                }
            }
        }
        self.record(job.id, status).await;
    }

    async fn record(&self, id: crate::domain::RequestId, status: WebhookStatus) {
        tracing::info!(request = %id, state = status.state.as_str(), attempts = status.attempts, "webhook attempt");
        crate::metrics::webhook_attempt(status.state.as_str());
        if let Err(e) = self.webhooks.record_webhook(id, status).await {
            tracing::error!(request = %id, error = %e, "could not record a webhook attempt");
        }
    }

    /// Exponential backoff with jitter: about `backoff * 2^(attempts-1)`, between half and all of it.
    fn backoff(&self, attempts: u32) -> Duration {
        let full =
            self.config.backoff.saturating_mul(1 << attempts.saturating_sub(1).min(20)).min(Duration::from_secs(3600));
        full.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    async fn send(
        &self,
        url: &str,
        message_id: &str,
        timestamp: i64,
        (content_type, body): (&str, String),
        traceparent: Option<String>,
    ) -> Outcome {
        let Ok(parsed) = url::Url::parse(url) else {
            return Outcome::Failed("the webhook URL is not valid".into());
        };
        if !self.config.allow_private
            && let Some(ip) = match parsed.host() {
                Some(url::Host::Ipv4(ip)) => Some(std::net::IpAddr::V4(ip)),
                Some(url::Host::Ipv6(ip)) => Some(std::net::IpAddr::V6(ip)),
                _ => None,
            }
            && ssrf::is_forbidden(ip)
        {
            return Outcome::Failed(format!("{ip} is an address webhooks may not reach"));
        }
        let mut request = self
            .client
            .post(parsed)
            .header(CONTENT_TYPE, content_type)
            .header("webhook-id", message_id)
            .header("webhook-timestamp", timestamp.to_string());
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        if let Some(secret) = &self.config.secret {
            request = request.header("webhook-signature", secret.sign(message_id, timestamp, &body));
        }
        match request.body(body).send().await {
            Ok(response) => {
                let retry_after = response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                Outcome::Answered { code: response.status().as_u16(), retry_after }
            }
            Err(e) => Outcome::Failed(crate::upstream::describe(&e)),
        }
    }
}

/// A Responses API request's webhook, in OpenAI's shape: an `event` of type `response.completed`,
/// `response.failed`, `response.cancelled` or `response.incomplete` naming the response, as JSON. Its id (also
/// the `webhook-id`) and time are the same on every attempt.
fn openai_event(request: &crate::store::StoredRequest) -> (String, &'static str, String) {
    let id = request.meta.locator.id;
    let status = request
        .body
        .as_deref()
        .and_then(|b| serde_json::from_str::<serde_json::Value>(b).ok())
        .and_then(|body| body.get("status").and_then(serde_json::Value::as_str).map(str::to_owned));
    let kind = match (request.progress.status, status.as_deref()) {
        (_, Some("incomplete")) => "response.incomplete",
        (crate::domain::Status::Done, _) => "response.completed",
        (crate::domain::Status::Stop, _) => "response.cancelled",
        _ => "response.failed",
    };
    let event_id = format!("evt_{}", hex::encode(id.as_bytes()));
    let created_at = request.progress.processed_at.unwrap_or(request.meta.created) as i64;
    let event = serde_json::json!({
        "id": event_id,
        "object": "event",
        "created_at": created_at,
        "type": kind,
        "data": {"id": id.response_id()},
    });
    (event_id, "application/json", event.to_string())
}

enum Outcome {
    Answered { code: u16, retry_after: Option<Duration> },
    Failed(String),
}
