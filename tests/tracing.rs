//! OpenTelemetry traces (issue 20, item 4), tested as an operator runs them: the real binary with
//! `--otlp-endpoint` pointing at a small OTLP receiver in this test, which decodes what arrives with OpenTelemetry's
//! own protobuf types. A call that carries a W3C `traceparent` must give a `chat {model}` span in the caller's trace
//! with the GenAI attributes, a child span for its upstream attempt and one for its webhook, the upstream and the
//! webhook receiving the `traceparent` of those spans, and no prompt, reply, key or token anywhere in a span.

#![expect(clippy::unwrap_used, reason = "a test fails loudly on anything unexpected")]

mod support;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use parking_lot::Mutex;
use prost::Message;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SECRET_KEY: &str = "sk-tracing-test-SECRET-0123456789";
const PROMPT: &str = "a prompt that must never reach a span";
const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// What a receiver was sent: each call's headers and body.
type Received = Arc<Mutex<Vec<(HeaderMap, Bytes)>>>;

/// Listens on port 0 and keeps what is POSTed to it, with the headers.
async fn receiver() -> (String, Received) {
    let got: Received = Arc::default();
    async fn keep(State(got): State<Received>, headers: HeaderMap, body: Bytes) {
        got.lock().push((headers, body));
    }
    let app = axum::Router::new().fallback(axum::routing::post(keep)).with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), got)
}

fn text(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::ArrayValue(array)) => {
            let items: Vec<String> = array.values.iter().map(|v| text(&Some(v.clone()))).collect();
            format!("[{}]", items.join(","))
        }
        other => format!("{other:?}"),
    }
}

fn attributes(span: &Span) -> Vec<(String, String)> {
    span.attributes.iter().map(|KeyValue { key, value, .. }| (key.clone(), text(value))).collect()
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    attributes(span).into_iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

#[tokio::test]
async fn a_request_is_one_genai_span_in_the_callers_trace_with_its_upstream_and_webhook_attempts() {
    let (collector, exported) = receiver().await;
    let (hook_base, hooks) = receiver().await;
    let expecting =
        offload::mock::MockConfig { expected_key: offload::domain::UpstreamKey::new(SECRET_KEY), ..Default::default() };
    let mock = offload::mock::spawn("127.0.0.1:0".parse().unwrap(), expecting).await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut command = support::Offload::command();
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--allow-private-webhooks", "--upstream-url"])
        .arg(mock.api_base().as_str())
        .args(["--otlp-endpoint", &collector, "--data-dir"])
        .arg(data.path())
        .env("OTEL_SERVICE_NAME", "offload-under-test")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100");
    let server = support::Offload::spawn(command);

    let client = reqwest::Client::new();
    let answer = client
        .post(server.url("/v1/chat/completions"))
        .header("traceparent", format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01"))
        .header("X-OpenAI-API-Key", SECRET_KEY)
        .header("X-Offload-Webhook-Url", format!("{hook_base}/hook"))
        .json(&json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": PROMPT}],
            "mock": {"words": 4}}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let reply = answer.text().await.unwrap();
    assert!(reply.ends_with("data: [DONE]\n\n"), "{reply}");

    // Spans are sent in batches: wait for the request's, its attempt's and its webhook's.
    let deadline = Instant::now() + Duration::from_secs(20);
    let spans: Vec<(String, Span)> = loop {
        let mut spans = Vec::new();
        for (_, body) in exported.lock().iter() {
            let request = ExportTraceServiceRequest::decode(body.as_ref()).unwrap();
            for resource in request.resource_spans {
                let service = resource
                    .resource
                    .as_ref()
                    .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                    .map(|a| text(&a.value))
                    .unwrap_or_default();
                for scope in resource.scope_spans {
                    spans.extend(scope.spans.into_iter().map(|span| (service.clone(), span)));
                }
            }
        }
        let webhook_sent = spans.iter().any(|(_, s)| attribute(s, "offload.call").as_deref() == Some("webhook"));
        if webhook_sent && spans.iter().any(|(_, s)| s.name.starts_with("chat")) {
            break spans;
        }
        assert!(
            Instant::now() < deadline,
            "spans did not arrive: {:?}",
            spans.iter().map(|(_, s)| &s.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(spans.iter().all(|(service, _)| service == "offload-under-test"), "OTEL_SERVICE_NAME names the service");
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();

    let (_, chat) = spans.iter().find(|(_, s)| s.name == "chat gpt-4o-mini").unwrap();
    assert_eq!(hex(&chat.trace_id), CALLER_TRACE, "the request's span continues the caller's trace");
    assert_eq!(hex(&chat.parent_span_id), CALLER_SPAN);
    for (key, value) in [
        ("gen_ai.operation.name", "chat"),
        ("gen_ai.request.model", "gpt-4o-mini"),
        ("gen_ai.response.finish_reasons", "[stop]"),
        ("gen_ai.usage.output_tokens", "4"),
        ("offload.status", "done"),
    ] {
        assert_eq!(attribute(chat, key).as_deref(), Some(value), "{key}: {:?}", attributes(chat));
    }
    for key in [
        "gen_ai.provider.name",
        "gen_ai.response.model",
        "gen_ai.response.id",
        "gen_ai.usage.input_tokens",
        "offload.request_id",
        "offload.time_to_first_chunk",
    ] {
        assert!(attribute(chat, key).is_some_and(|v| !v.is_empty()), "{key} missing: {:?}", attributes(chat));
    }

    let (_, attempt) = spans.iter().find(|(_, s)| attribute(s, "offload.call").as_deref() == Some("upstream")).unwrap();
    assert_eq!((attempt.name.as_str(), attempt.parent_span_id.clone()), ("POST", chat.span_id.clone()));
    assert_eq!(attribute(attempt, "http.request.method").as_deref(), Some("POST"));
    assert_eq!(attribute(attempt, "http.response.status_code").as_deref(), Some("200"));
    assert_eq!(attribute(attempt, "server.address").as_deref(), Some("127.0.0.1"));
    let received: Value =
        client.get(format!("http://{}/_mock/requests", mock.addr())).send().await.unwrap().json().await.unwrap();
    let upstream_traceparent = received[0]["traceparent"].as_str().unwrap().to_owned();
    assert_eq!(
        upstream_traceparent,
        format!("00-{CALLER_TRACE}-{}-01", hex(&attempt.span_id)),
        "the upstream call carries its attempt span's traceparent"
    );

    let (_, webhook) = spans.iter().find(|(_, s)| attribute(s, "offload.call").as_deref() == Some("webhook")).unwrap();
    assert_eq!(
        (hex(&webhook.trace_id), webhook.parent_span_id.clone()),
        (CALLER_TRACE.to_owned(), chat.span_id.clone())
    );
    let hook_headers = &hooks.lock()[0].0;
    assert_eq!(
        hook_headers["traceparent"].to_str().unwrap(),
        format!("00-{CALLER_TRACE}-{}-01", hex(&webhook.span_id)),
        "the webhook carries its span's traceparent"
    );

    // No prompt, reply, key or token in any span.
    for (_, span) in &spans {
        for (key, value) in attributes(span) {
            for secret in [SECRET_KEY, PROMPT, "Hello from the"] {
                assert!(!value.contains(secret), "{key} of span {} holds {secret:?}", span.name);
            }
        }
    }
    // The log lines of the request carry the trace id.
    let log = server.log_lines().join("\n");
    assert!(log.contains(CALLER_TRACE), "the log lines name the trace id:\n{log}");
}
