//! Logging: lines on stderr, filtered by `OFFLOAD_LOG` (or `RUST_LOG`), `info` by default; human-readable text,
//! or one JSON object a line with `--log-format json`.
//!
//! Every HTTP request runs in a span (`http`, with its method and route template) and gets one access line when
//! its response head is sent; once the handler knows which offloaded request the call is about, the span carries
//! its id (`request_id`). A request's worker runs in a span of its own (`request`, with `request_id`), so every
//! line about a request names it. Nothing here logs a URL, a query string or a header: tokens travel in them.

pub mod otel;

use axum::extract::{MatchedPath, Request};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::io::IsTerminal;
use std::time::Instant;
use tracing::Instrument;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (colored on a terminal).
    #[default]
    Text,
    /// One JSON object a line, with the fields of the current span under `span`.
    Json,
}

impl LogFormat {
    /// From `OFFLOAD_LOG_FORMAT`, for the commands that have no settings of their own.
    pub fn from_env() -> Self {
        match std::env::var("OFFLOAD_LOG_FORMAT").ok().as_deref().map(str::trim) {
            Some(f) if f.eq_ignore_ascii_case("json") => LogFormat::Json,
            _ => LogFormat::Text,
        }
    }
}

/// What logging and tracing hold until the command ends.
pub struct Started {
    /// With an OTLP endpoint: the tracer provider, to be shut down at the end so that the last spans are sent.
    pub tracer: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    /// The thread writing the server's log lines: dropping it writes what is left.
    _lines: Option<tracing_appender::non_blocking::WorkerGuard>,
}

/// Starts logging (and, with an OTLP endpoint, tracing). `off_the_request_path`: the lines are written to stderr by a
/// thread of their own (the server: a write to a pipe costs a call tens of microseconds of its time to the first
/// chunk, BENCHMARKS.md "Issue 21"); none is dropped, a full buffer makes the caller wait, and the last lines are
/// written when the returned [`Started`] is dropped. A process killed outright may lose the last lines written
/// before it.
pub fn init(format: LogFormat, otlp: Option<url::Url>, off_the_request_path: bool) -> Started {
    use tracing_subscriber::filter::{FilterExt, filter_fn};
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{Layer, fmt};
    let filter = std::env::var("OFFLOAD_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    // The log lines never show the spans made for traces.
    let logged = filter.and(filter_fn(|meta| meta.target() != otel::TARGET));
    let (writer, guard) = if off_the_request_path {
        let (writer, guard) =
            tracing_appender::non_blocking::NonBlockingBuilder::default().lossy(false).finish(std::io::stderr());
        (BoxMakeWriter::new(writer), Some(guard))
    } else {
        (BoxMakeWriter::new(std::io::stderr), None)
    };
    let lines = match format {
        LogFormat::Text => fmt::layer().with_writer(writer).with_ansi(std::io::stderr().is_terminal()).boxed(),
        LogFormat::Json => fmt::layer()
            .with_writer(writer)
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };
    let service = std::env::var("OTEL_SERVICE_NAME").ok().filter(|s| !s.trim().is_empty());
    let provider = otlp.and_then(|endpoint| match otel::provider(&endpoint, service.as_deref().unwrap_or("offload")) {
        Ok(provider) => Some(provider),
        Err(e) => {
            eprintln!("offload: traces are off: the OTLP exporter could not be built ({e})");
            None
        }
    });
    let traces = provider.as_ref().map(|provider| {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("offload"))
            .with_filter(filter_fn(|meta| meta.target() == otel::TARGET))
    });
    let _ = tracing_subscriber::registry().with(lines.with_filter(logged)).with(traces).try_init();
    Started { tracer: provider, _lines: guard }
}

/// Names the offloaded request the current HTTP call is about, on its span (and so on its access line).
pub fn record_request_id(id: impl std::fmt::Display) {
    tracing::Span::current().record("request_id", tracing::field::display(id));
}

/// Names the trace the current call or request is part of, on its span.
pub fn record_trace_id(trace_id: &str) {
    tracing::Span::current().record("trace_id", trace_id);
}

/// Names the upstream (its name in the config) the current call or request goes to, on its span.
pub fn record_upstream(name: &str) {
    tracing::Span::current().record("upstream", name);
}

/// Runs a request's background work (its worker, a webhook attempt) in a span naming it. The span has no parent: the work outlives
/// the HTTP call that started it.
pub fn within_request<F: Future>(id: impl std::fmt::Display, work: F) -> tracing::instrument::Instrumented<F> {
    work.instrument(request_log_span(id))
}

/// The span of a request's log lines: its id, the upstream it went to, and (when traces are sent) its trace id.
pub fn request_log_span(id: impl std::fmt::Display) -> tracing::Span {
    tracing::info_span!(
        parent: None,
        "request",
        request_id = %id,
        upstream = tracing::field::Empty,
        trace_id = tracing::field::Empty
    )
}

/// Around every route (the outermost part of the HTTP edge, `http::edge`): the span, the access line and the
/// HTTP metrics of `inner`'s answer.
pub async fn observe<F, Fut>(request: Request, inner: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let started = Instant::now();
    let method = request.method().clone();
    let route = route_of(&request);
    let span = tracing::info_span!(
        "http",
        method = %method,
        route = %route,
        request_id = tracing::field::Empty,
        upstream = tracing::field::Empty,
        trace_id = tracing::field::Empty
    );
    let in_flight = crate::metrics::http_in_flight();
    let response = inner(request).instrument(span.clone()).await;
    drop(in_flight);
    let elapsed = started.elapsed();
    let status = response.status();
    crate::metrics::http_request(&route, status, elapsed);
    span.in_scope(|| {
        tracing::info!(
            target: "offload::access",
            method = %method,
            route = %route,
            status = status.as_u16(),
            latency_ms = elapsed.as_micros() as f64 / 1000.0,
            "http request"
        );
    });
    response
}

/// The route template that matched; `unmatched` when none did (a 404): never the path, which may carry an id or a
/// token.
fn route_of(request: &Request) -> String {
    request.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned())
}
