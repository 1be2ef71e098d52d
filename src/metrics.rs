//! Prometheus metrics: one helper per event, called in one line where the event happens, and the `/metrics`
//! endpoint on its own listener (`--metrics-listen`).
//!
//! The helpers record through the `metrics` facade into the process's one global recorder. Until a server with a
//! metrics listener installs it they cost a check and record nothing, so the code paths are the same with
//! metrics on or off. Every label value comes from a closed set written in this code (route templates, status
//! classes, error codes, reasons, HTTP status codes): never a URL, an id or anything a caller sent.
//!
//! A leaf: it imports nothing of the server. What it reports gives its own label (`reason()`, `as_str()`), so
//! that a new kind of refusal or status changes the type that has it, not this file.
//!
//! Gauges that the engine already knows (requests running) are read at each scrape; the others move with guards
//! (taken on entry, given back on drop), so that a reader that disconnects or a handler that is cancelled still
//! counts down.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Histogram buckets of durations, in seconds: from a fast store write to a slow first token. A create answers in
/// a few tenths of a millisecond and its insert commits in less, so the buckets below 1 ms tell whether a 1 ms
/// target holds at p99.
const SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0,
];

/// Histogram buckets of store batch sizes, in writes (a slice holds at most 1024).
const WRITES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// How often histograms are compacted between scrapes, so that memory stays bounded when nobody scrapes.
const UPKEEP: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("the metrics recorder cannot be set up: {0}")]
    Recorder(String),
}

/// The process's recorder, installed by the first server that serves metrics (a process has one).
static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

fn install() -> Result<PrometheusHandle, MetricsError> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full("offload_store_batch_writes".into()), WRITES))
                .map_err(|e| e.to_string())?;
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
            describe();
            zero();
            Ok(handle)
        })
        .clone()
        .map_err(MetricsError::Recorder)
}

/// The `# HELP` lines; README's Metrics section says the same.
fn describe() {
    describe_counter!("offload_http_requests_total", "HTTP requests answered, by route template and status class.");
    describe_histogram!(
        "offload_http_request_duration_seconds",
        Unit::Seconds,
        "Time from an HTTP request's arrival to its response head, by route template."
    );
    describe_gauge!("offload_http_requests_in_flight", "HTTP requests being handled (until their response head).");
    describe_gauge!("offload_requests_running", "Offloaded requests running on this node (their upstream call).");
    describe_counter!(
        "offload_requests_finished_total",
        "Offloaded requests that reached a final status, by status and error code (`none` without error)."
    );
    describe_counter!(
        "offload_create_refused_total",
        "Create calls refused before a request existed, by reason (key, in_flight, rate, quota, overload, ...)."
    );
    describe_gauge!("offload_stream_readers", "Event streams (.txt) being read right now.");
    describe_histogram!(
        "offload_time_to_first_token_seconds",
        Unit::Seconds,
        "Time from accepting a stream request to its first chunk from the upstream."
    );
    describe_histogram!(
        "offload_upstream_response_duration_seconds",
        Unit::Seconds,
        "Time from sending an upstream call to its response head."
    );
    describe_counter!("offload_upstream_responses_total", "Upstream responses, by HTTP status code.");
    describe_counter!(
        "offload_upstream_failures_total",
        "Upstream calls that got no response, by reason (connect_timeout, unreachable, failed)."
    );
    describe_counter!(
        "offload_upstream_attempts_total",
        "Upstream attempts, by upstream (its name in the config) and outcome (answered, failed, skipped while its \
         breaker is open)."
    );
    describe_gauge!(
        "offload_upstream_breaker_open",
        "1 while an upstream is skipped after failing too often in a row (its breaker is open), else 0."
    );
    describe_histogram!("offload_store_batch_writes", "Writes per store transaction, by lane (create, bulk).");
    describe_histogram!(
        "offload_store_write_duration_seconds",
        Unit::Seconds,
        "Time of one store transaction, by lane (create, bulk)."
    );
    describe_counter!("offload_store_write_errors_total", "Store transactions that failed, by lane (create, bulk).");
    describe_counter!(
        "offload_store_create_inserts_total",
        "Creates' inserts tried in the embedded SQLite store, by where they were committed: caller (on the create's \
         own thread) or the writer thread, and why (with_upstream, writer_busy, checkpoint, full_sync, try_failed)."
    );
    describe_gauge!("offload_store_queue_writes", "Writes waiting for the store.");
    describe_gauge!(
        "offload_store_held_bytes",
        Unit::Bytes,
        "Bytes held in memory by writes waiting for the store (bounded by --outage-buffer)."
    );
    describe_gauge!("offload_store_reachable", "1 while the store answered the last health round trip, else 0.");
    describe_counter!(
        "offload_webhook_attempts_total",
        "Webhook delivery attempts, by outcome (delivered, retrying, failed)."
    );
    describe_counter!(
        "offload_tokens_total",
        "Tokens of finished requests as their upstream counted them, by kind (input, output), upstream and model \
         (the first 32 models seen, then `other`)."
    );
}

/// Route templates of the API: the values of the `route` label besides `unmatched`. The same as
/// `crate::http::router`'s routes (a test compares the two).
pub const ROUTES: &[&str] = &[
    "/",
    "/playground/app.js",
    "/playground/style.css",
    "/healthz",
    "/_offload/alive",
    "/openapi.json",
    "/v1/stream-chatgpt",
    "/v1/async-chatgpt",
    "/v1/chat/completions",
    "/v1/models",
    "/v1/usage",
    "/v1/responses",
    "/v1/responses/{id}",
    "/v1/responses/{id}/cancel",
    "/v1/responses/{id}/input_items",
    "/{kind}/r/{*rest}",
];

const STATUS_CLASSES: &[&str] = &["1xx", "2xx", "3xx", "4xx", "5xx"];
/// The error codes of a final status (see `ErrorInfo`); anything else counts as `other`, so that the label set
/// stays closed whatever the code grows.
const ERROR_CODES: &[&str] = &[
    "timeout",
    "connect_timeout",
    "upstream_error",
    "upstream_unreachable",
    "interrupted",
    "event_too_large",
    "reply_too_large",
    "store_unavailable",
    "other",
];
const REFUSALS: &[&str] = &[
    "key",
    "in_flight",
    "rate",
    "quota",
    "token_quota",
    "overload",
    "shutting_down",
    "store",
    "upstream_key",
    "webhook",
    "continuation",
    "invalid",
    "internal",
];
/// Upstream statuses shown from the start: success, and those that are retried. Others appear when answered
/// (HTTP status codes are not a set to list in full).
const UPSTREAM_STATUSES: &[&str] = &["200", "429", "500", "502", "503", "504"];
const UPSTREAM_FAILURES: &[&str] = &["connect_timeout", "unreachable", "failed"];
const LANES: &[&str] = &["create", "bulk"];
const WEBHOOK_OUTCOMES: &[&str] = &["delivered", "retrying", "failed"];
/// Where a create's insert was committed in the embedded store (`caller`), or why by its writer thread.
pub(crate) const CREATE_INSERTS: &[&str] =
    &["caller", "with_upstream", "writer_busy", "checkpoint", "full_sync", "try_failed"];
/// Every family, with every value of its closed label sets, at zero from the start: a dashboard or an alert that
/// expects a series finds it before the first event (a counter that is absent until its first webhook reads as
/// "no data", not as 0). Registering a series is enough: the recorder renders it with its current value, 0.
fn zero() {
    for &route in ROUTES.iter().chain(&["unmatched"]) {
        for &class in STATUS_CLASSES {
            counter!("offload_http_requests_total", "route" => route, "status_class" => class).absolute(0);
        }
        let _ = histogram!("offload_http_request_duration_seconds", "route" => route);
    }
    gauge!("offload_http_requests_in_flight").set(0.0);
    gauge!("offload_requests_running").set(0.0);
    for status in ["done", "stop"] {
        counter!("offload_requests_finished_total", "status" => status, "error_code" => "none").absolute(0);
    }
    for &code in ERROR_CODES {
        counter!("offload_requests_finished_total", "status" => "error", "error_code" => code).absolute(0);
    }
    for &reason in REFUSALS {
        counter!("offload_create_refused_total", "reason" => reason).absolute(0);
    }
    gauge!("offload_stream_readers").set(0.0);
    let _ = histogram!("offload_time_to_first_token_seconds");
    let _ = histogram!("offload_upstream_response_duration_seconds");
    for &status in UPSTREAM_STATUSES {
        counter!("offload_upstream_responses_total", "status" => status).absolute(0);
    }
    for &reason in UPSTREAM_FAILURES {
        counter!("offload_upstream_failures_total", "reason" => reason).absolute(0);
    }
    for &lane in LANES {
        let _ = histogram!("offload_store_batch_writes", "lane" => lane);
        let _ = histogram!("offload_store_write_duration_seconds", "lane" => lane);
        counter!("offload_store_write_errors_total", "lane" => lane).absolute(0);
    }
    for &via in CREATE_INSERTS {
        counter!("offload_store_create_inserts_total", "via" => via).absolute(0);
    }
    gauge!("offload_store_queue_writes").set(0.0);
    gauge!("offload_store_held_bytes").set(0.0);
    // Reachable until the first health round trip says otherwise (it runs within a second of the start).
    gauge!("offload_store_reachable").set(1.0);
    for &outcome in WEBHOOK_OUTCOMES {
        counter!("offload_webhook_attempts_total", "outcome" => outcome).absolute(0);
    }
}

/// The `/metrics` listener, bound by [`crate::startup::Application::build`] and served while the application runs.
pub struct Exporter {
    listener: TcpListener,
    handle: PrometheusHandle,
}

impl Exporter {
    /// Installs the recorder (once per process) and binds `addr` (port 0 picks a free port).
    pub async fn bind(addr: SocketAddr) -> Result<Self, MetricsError> {
        let handle = install()?;
        let listener = TcpListener::bind(addr).await.map_err(|source| MetricsError::Bind { addr, source })?;
        Ok(Self { listener, handle })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serves `GET /metrics` until `closing`.
    pub async fn serve(self, engine: impl RunningRequests, closing: CancellationToken) {
        let local = self.listener.local_addr().ok();
        tracing::info!("metrics at http://{}/metrics", local.map_or_else(String::new, |a| a.to_string()));
        let handle = self.handle.clone();
        let router = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let (handle, engine) = (handle.clone(), engine.clone());
                async move { scrape(&handle, &engine) }
            }),
        );
        let upkeep = {
            let (handle, closing) = (self.handle.clone(), closing.clone());
            async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(UPKEEP) => handle.run_upkeep(),
                        _ = closing.cancelled() => return,
                    }
                }
            }
        };
        let serving =
            axum::serve(self.listener, router).with_graceful_shutdown(closing.cancelled_owned()).into_future();
        let (served, ()) = tokio::join!(serving, upkeep);
        if let Err(e) = served {
            tracing::error!(error = %e, "the metrics listener failed");
        }
    }
}

/// What knows how many requests run right now (the engine), read at each scrape.
pub trait RunningRequests: Clone + Send + Sync + 'static {
    fn running(&self) -> usize;
}

fn scrape(handle: &PrometheusHandle, engine: &impl RunningRequests) -> Response {
    gauge!("offload_requests_running").set(engine.running() as f64);
    let mut response = handle.render().into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    response
}

/// Counts up a gauge until dropped.
#[must_use = "the gauge counts down when this is dropped"]
pub struct GaugeGuard(&'static str);

impl GaugeGuard {
    fn new(name: &'static str) -> Self {
        gauge!(name).increment(1.0);
        Self(name)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        gauge!(self.0).decrement(1.0);
    }
}

/// An HTTP request being handled, until its response head.
pub fn http_in_flight() -> GaugeGuard {
    GaugeGuard::new("offload_http_requests_in_flight")
}

/// One HTTP request answered. `route` is a route template (or `unmatched`), never the path.
pub fn http_request(route: &str, status: StatusCode, elapsed: Duration) {
    let class = match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    counter!("offload_http_requests_total", "route" => route.to_owned(), "status_class" => class).increment(1);
    histogram!("offload_http_request_duration_seconds", "route" => route.to_owned()).record(elapsed);
}

/// An event stream being read, until the reader leaves.
pub fn stream_reader() -> GaugeGuard {
    GaugeGuard::new("offload_stream_readers")
}

/// A request reached its final status (`done`, `error`, `stop`), with its error code if it has one.
pub fn request_finished(status: &'static str, error_code: Option<&str>) {
    let code = error_code.map_or("none", known_error_code);
    tracing::info!(target: "offload::requests", status, error_code = code, "request finished");
    counter!("offload_requests_finished_total", "status" => status, "error_code" => code).increment(1);
}

/// The code as a value of the closed set [`ERROR_CODES`].
fn known_error_code(code: &str) -> &'static str {
    ERROR_CODES.iter().find(|known| **known == code).copied().unwrap_or("other")
}

/// The first chunk of a stream request arrived, `waited` seconds after the request was accepted.
pub fn first_chunk(waited: f64) {
    histogram!("offload_time_to_first_token_seconds").record(waited.max(0.0));
}

/// Times one upstream call to its response head and counts its outcome.
pub async fn upstream_call<F>(call: F) -> Result<reqwest::Response, reqwest::Error>
where
    F: Future<Output = Result<reqwest::Response, reqwest::Error>>,
{
    let started = Instant::now();
    let result = call.await;
    match &result {
        Ok(response) => {
            histogram!("offload_upstream_response_duration_seconds").record(started.elapsed());
            counter!("offload_upstream_responses_total", "status" => response.status().as_u16().to_string())
                .increment(1);
        }
        Err(e) => {
            let reason = match (e.is_connect(), e.is_timeout()) {
                (true, true) => "connect_timeout",
                (true, false) => "unreachable",
                _ => "failed",
            };
            counter!("offload_upstream_failures_total", "reason" => reason).increment(1);
        }
    }
    result
}

/// Times one store transaction of `writes` writes in `lane` (`create` or `bulk`).
pub async fn store_write<F, E>(lane: &'static str, writes: usize, write: F) -> Result<(), E>
where
    F: Future<Output = Result<(), E>>,
{
    let started = Instant::now();
    let result = write.await;
    histogram!("offload_store_write_duration_seconds", "lane" => lane).record(started.elapsed());
    histogram!("offload_store_batch_writes", "lane" => lane).record(writes as f64);
    if result.is_err() {
        counter!("offload_store_write_errors_total", "lane" => lane).increment(1);
    }
    result
}

/// A create's insert was committed on its caller's thread (`caller`), or handed to the embedded store's writer
/// thread, for `via` (one of [`CREATE_INSERTS`]: the reason's `as_str()`).
pub fn create_insert(via: &'static str) {
    counter!("offload_store_create_inserts_total", "via" => via).increment(1);
}

/// Writes waiting for the store (read each time the writer looks for work).
pub fn store_queue(writes: usize) {
    gauge!("offload_store_queue_writes").set(writes as f64);
}

/// Bytes held in memory by writes waiting for the store (what `--outage-buffer` bounds).
pub fn store_held_bytes(bytes: usize) {
    gauge!("offload_store_held_bytes").set(bytes as f64);
}

/// Whether the store answered this node's last health round trip (1) or not (0).
pub fn store_reachable(reachable: bool) {
    gauge!("offload_store_reachable").set(if reachable { 1.0 } else { 0.0 });
}

/// How many model names become label values; later ones count as [`OTHER_MODEL`], so that callers naming made-up
/// models cannot grow the label set without bound.
const MAX_MODELS: usize = 32;
const OTHER_MODEL: &str = "other";

/// The model names admitted as label values so far.
static MODELS: OnceLock<parking_lot::Mutex<Vec<String>>> = OnceLock::new();

/// `model` as a label value: itself if it is among the first [`MAX_MODELS`] seen (and short), else `other`.
fn model_label(model: &str) -> String {
    const MAX_LEN: usize = 64;
    if model.is_empty() || model.len() > MAX_LEN {
        return OTHER_MODEL.to_owned();
    }
    let mut models = MODELS.get_or_init(Default::default).lock();
    if models.iter().any(|m| m == model) {
        return model.to_owned();
    }
    if models.len() < MAX_MODELS {
        models.push(model.to_owned());
        return model.to_owned();
    }
    OTHER_MODEL.to_owned()
}

/// A request finished with the usage its upstream reported: `input` and `output` tokens of `model`.
pub fn tokens(upstream: &str, model: &str, input: u64, output: u64) {
    let model = model_label(model);
    let upstream = upstream.to_owned();
    counter!("offload_tokens_total", "kind" => "input", "upstream" => upstream.clone(), "model" => model.clone())
        .increment(input);
    counter!("offload_tokens_total", "kind" => "output", "upstream" => upstream, "model" => model).increment(output);
}

/// The upstreams of the config, by name: their series start at zero. Names are the config's, so the label is
/// bounded by it.
pub fn upstreams<'a>(names: impl IntoIterator<Item = &'a str>) {
    for name in names {
        for outcome in ["answered", "failed", "skipped"] {
            counter!("offload_upstream_attempts_total", "upstream" => name.to_owned(), "outcome" => outcome)
                .absolute(0);
        }
        gauge!("offload_upstream_breaker_open", "upstream" => name.to_owned()).set(0.0);
        for kind in ["input", "output"] {
            let upstream = name.to_owned();
            counter!("offload_tokens_total", "kind" => kind, "upstream" => upstream, "model" => OTHER_MODEL)
                .absolute(0);
        }
    }
}

/// An upstream attempt ended with `outcome` (`answered`, `failed`, or `skipped` while its breaker is open).
pub fn upstream_attempt(upstream: &str, outcome: &'static str) {
    counter!("offload_upstream_attempts_total", "upstream" => upstream.to_owned(), "outcome" => outcome).increment(1);
}

/// Whether `upstream` is being skipped (its breaker is open).
pub fn breaker(upstream: &str, open: bool) {
    gauge!("offload_upstream_breaker_open", "upstream" => upstream.to_owned()).set(if open { 1.0 } else { 0.0 });
}

/// A webhook attempt ended with `outcome` (`delivered`, `retrying`, `failed`).
pub fn webhook_attempt(outcome: &'static str) {
    counter!("offload_webhook_attempts_total", "outcome" => outcome).increment(1);
}

/// A create call was refused, for `reason` (one of [`REFUSALS`]: the refusing type's `reason()`).
pub fn create_refused(reason: &'static str) {
    counter!("offload_create_refused_total", "reason" => reason).increment(1);
}
