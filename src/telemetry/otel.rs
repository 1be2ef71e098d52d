//! OpenTelemetry traces (`--otlp-endpoint`, off by default): OTLP over HTTP with protobuf to `URL/v1/traces`,
//! batched on a thread of the SDK's own, never blocking a request.
//!
//! Per request one span following the GenAI semantic conventions (`chat {model}`: the operation, provider, request
//! and response models, response id, finish reasons, token usage, time to the first chunk, offload's request id
//! and final status), with a child span per upstream attempt (HTTP client conventions) and one per webhook
//! attempt. A create call's W3C `traceparent` is the request span's parent; the upstream call and the webhook
//! carry the `traceparent` of their own spans. No prompt, reply, URL query, key or token is ever an attribute.
//!
//! The spans are `tracing` spans of the target [`TARGET`], turned into OpenTelemetry spans by
//! `tracing-opentelemetry` (the layer sees only that target, and the log lines never show those spans).
//! Crates: `opentelemetry`/`opentelemetry_sdk`/`opentelemetry-otlp` 0.33 with `tracing-opentelemetry` 0.34, the
//! pair the latter is built against; the OTLP exporter's HTTP client is this server's own `reqwest` (blocking, on
//! the exporter's thread), so no second HTTP stack is built.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The target of every span that becomes an OpenTelemetry span.
pub const TARGET: &str = "offload::otel";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether traces are sent.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The exporter's HTTP client: this server's `reqwest`, blocking (the batch processor runs on a thread of its own).
#[derive(Debug)]
struct Client(reqwest::blocking::Client);

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Client {
    async fn send_bytes(
        &self,
        request: axum::http::Request<bytes::Bytes>,
    ) -> Result<axum::http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let mut call = self.0.request(parts.method, parts.uri.to_string()).body(body.to_vec());
        for (name, value) in &parts.headers {
            call = call.header(name, value);
        }
        let answer = call.send()?;
        let mut response = axum::http::Response::builder().status(answer.status());
        if let Some(headers) = response.headers_mut() {
            headers.extend(answer.headers().clone());
        }
        Ok(response.body(answer.bytes()?)?)
    }
}

/// The tracer provider sending to `endpoint` (a base URL) as `service`, built on a thread of its own (the
/// blocking client may not be built on the async runtime).
pub fn provider(endpoint: &url::Url, service: &str) -> Result<SdkTracerProvider, String> {
    use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
    let traces = format!("{}/v1/traces", endpoint.as_str().trim_end_matches('/'));
    let service = service.to_owned();
    let build = move || -> Result<SdkTracerProvider, String> {
        let client = reqwest::blocking::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(Client(client))
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(traces)
            .build()
            .map_err(|e| e.to_string())?;
        let resource = opentelemetry_sdk::Resource::builder().with_service_name(service).build();
        Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
    };
    let provider = std::thread::spawn(build).join().map_err(|_| "the tracer could not be built".to_owned())??;
    ENABLED.store(true, Ordering::Relaxed);
    Ok(provider)
}

/// Sends what is left and stops, off the async runtime (the exporter's client blocks).
pub async fn shutdown(provider: SdkTracerProvider) {
    let _ = tokio::task::spawn_blocking(move || {
        if let Err(e) = provider.shutdown() {
            tracing::warn!(error = %e, "the last traces could not be sent");
        }
    })
    .await;
}

/// A W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`) as a remote span context; anything else is none.
fn remote(traceparent: &str) -> Option<SpanContext> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || parts.next().is_some() || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok().filter(|t| *t != TraceId::INVALID)?;
    let span = SpanId::from_hex(span).ok().filter(|s| *s != SpanId::INVALID)?;
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()?);
    Some(SpanContext::new(trace, span, flags, true, TraceState::default()))
}

/// Whether `traceparent` is one this server continues.
pub fn valid(traceparent: &str) -> bool {
    remote(traceparent).is_some()
}

/// The `traceparent` of `span` (what a call made within it carries), when traces are sent.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    if !enabled() {
        return None;
    }
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then(|| {
        format!("00-{}-{}-{:02x}", span_context.trace_id(), span_context.span_id(), span_context.trace_flags().to_u8())
    })
}

/// The trace id of `span`, for the log lines.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    traceparent(span).and_then(|t| t.split('-').nth(1).map(str::to_owned))
}

fn continue_from(span: &tracing::Span, parent: Option<&str>) {
    if let Some(parent) = parent.and_then(remote) {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
    }
}

/// The span of one request (`chat {model}`), continuing `parent` (the create call's `traceparent`).
pub fn request_span(id: &str, model: &str, provider: &str, parent: Option<&str>) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        target: TARGET,
        parent: None,
        "chat",
        otel.name = %format!("chat {model}"),
        otel.kind = "client",
        otel.status_code = Empty,
        gen_ai.operation.name = "chat",
        gen_ai.provider.name = %provider,
        gen_ai.request.model = %model,
        gen_ai.response.model = Empty,
        gen_ai.response.id = Empty,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
        offload.request_id = %id,
        offload.status = Empty,
        offload.error_code = Empty,
        offload.time_to_first_chunk = Empty,
    );
    continue_from(&span, parent);
    span
}

/// The current request's first chunk came `seconds` after it was accepted.
pub fn first_chunk(seconds: f64) {
    if enabled() {
        tracing::Span::current().record("offload.time_to_first_chunk", seconds);
    }
}

/// What the current request's span says of its end.
pub struct Ended<'a> {
    pub status: &'a str,
    pub error_code: Option<&'a str>,
    pub response_model: Option<&'a str>,
    pub response_id: Option<&'a str>,
    pub finish_reasons: Vec<String>,
    pub tokens: Option<(u64, u64)>,
}

/// Records the end of the current request on its span.
pub fn request_ended(end: Ended<'_>) {
    if !enabled() {
        return;
    }
    let span = tracing::Span::current();
    span.record("offload.status", end.status);
    if let Some(code) = end.error_code {
        span.record("offload.error_code", code);
        span.record("otel.status_code", "ERROR");
    }
    if let Some(model) = end.response_model {
        span.record("gen_ai.response.model", model);
    }
    if let Some(id) = end.response_id {
        span.record("gen_ai.response.id", id);
    }
    if let Some((input, output)) = end.tokens {
        span.record("gen_ai.usage.input_tokens", input);
        span.record("gen_ai.usage.output_tokens", output);
    }
    if !end.finish_reasons.is_empty() {
        let reasons: Vec<opentelemetry::StringValue> = end.finish_reasons.into_iter().map(Into::into).collect();
        span.set_attribute(
            "gen_ai.response.finish_reasons",
            opentelemetry::Value::Array(opentelemetry::Array::String(reasons)),
        );
    }
}

/// The span of one HTTP call this server makes (an upstream attempt, a webhook attempt): `POST`, with the
/// server's address and port; the URL's path only (a query may carry a token).
pub fn http_span(kind: &'static str, url: &url::Url, parent: Option<&str>) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        target: TARGET,
        "POST",
        otel.name = "POST",
        otel.kind = "client",
        otel.status_code = Empty,
        http.request.method = "POST",
        server.address = url.host_str().unwrap_or(""),
        server.port = url.port_or_known_default().unwrap_or(0),
        url.path = url.path(),
        http.response.status_code = Empty,
        error.type = Empty,
        offload.call = kind,
    );
    continue_from(&span, parent);
    span
}

/// What an HTTP call's span says of its outcome: the status it got, or why it got none.
pub fn http_outcome(span: &tracing::Span, status: Option<u16>, error: Option<&str>) {
    if !enabled() {
        return;
    }
    if let Some(status) = status {
        span.record("http.response.status_code", status);
        if status >= 400 {
            span.record("error.type", status.to_string());
            span.record("otel.status_code", "ERROR");
        }
    }
    if let Some(error) = error {
        span.record("error.type", error);
        span.record("otel.status_code", "ERROR");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_w3c_traceparents_are_continued() {
        assert!(valid("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));
        for bad in [
            "",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x",
            "00-xyz7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert!(!valid(bad), "{bad}");
        }
    }
}
