//! The end of a request (its final state made durable, then shown) and of the server (drain, then flush).

use super::live::{CancelReason, LiveRequest};
use super::{Engine, Inner, SHUTDOWN_STORE_WAIT};
use crate::document::ErrorInfo;
use crate::domain::{Status, unix_now};
use std::sync::atomic::Ordering;
use std::time::Duration;

impl Engine {
    /// Stops accepting, lets running requests finish for `grace`, ends the rest as interrupted, and makes
    /// everything durable. Open event streams end afterwards.
    pub async fn shutdown(&self, grace: Duration) {
        let inner = &self.inner;
        inner.accepting.store(false, Ordering::SeqCst);
        inner.tasks.close();
        if tokio::time::timeout(grace, inner.tasks.wait()).await.is_err() {
            let running: Vec<_> = inner.hub.lock().values().cloned().collect();
            tracing::warn!(count = running.len(), "grace period over; ending running requests as interrupted");
            for live in running {
                live.cancel_with(CancelReason::Shutdown, unix_now());
            }
            // Bounded: with a failing store a final status may never be stored; the next start recovers it.
            if tokio::time::timeout(SHUTDOWN_STORE_WAIT, inner.tasks.wait()).await.is_err() {
                tracing::error!("requests could not store their final status; the next start ends them as interrupted");
            }
        }
        match tokio::time::timeout(SHUTDOWN_STORE_WAIT, inner.persister.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "final flush to the store failed"),
            Err(_) => tracing::error!("the store did not take the last writes in time; the next start recovers them"),
        }
        inner.closing.cancel();
    }
}

impl Inner {
    /// Ends a request: fixes its final state, makes it durable, and only then shows it to readers and lets it
    /// leave memory. While the store fails the final write is retried; the request stays running in every
    /// reader's eyes, and if the process dies meanwhile, recovery ends it as interrupted (nothing final was shown).
    pub(super) async fn settle(&self, live: &LiveRequest, status: Status, error: Option<ErrorInfo>) {
        crate::metrics::request_finished(status.as_str(), error.as_ref().map(|e| e.code.as_str()));
        let error_code = error.as_ref().map(|e| e.code.clone());
        let id = live.meta.locator.id;
        let has_webhook = live.meta.options.webhook_url.is_some();
        let (before, finish) = live.stage_final(status, error, unix_now());
        for write in before {
            self.persister.push(write).await;
        }
        // Final statuses share the regular flush instead of forcing a commit each.
        let mut backoff = crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        while let Err(e) = self.persister.push_durable(finish.clone()).await {
            tracing::error!(request = %id, error = %e, "could not store the final status; retrying");
            if self.closing.is_cancelled() {
                tracing::error!(request = %id, "shutting down with the final status unstored; the next start ends it as interrupted");
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = self.closing.cancelled() => {}
            }
        }
        live.publish_final();
        let tokens = live.tokens();
        if let Some(tokens) = &tokens {
            let upstream = live.upstream_name();
            crate::metrics::tokens(upstream.as_deref().unwrap_or("none"), &tokens.model, tokens.input, tokens.output);
        }
        if crate::telemetry::otel::enabled() {
            traced_end(live, status, error_code.as_deref(), tokens.map(|t| (t.input, t.output)));
        }
        if has_webhook {
            self.webhook_wake.notify_one();
        }
        self.hub.lock().remove(&id);
        live.settled.cancel();
    }
}

/// What the request's span says of its end: its status, and of the answer its model, id and finish reasons (read
/// from the body, only when traces are sent).
fn traced_end(live: &LiveRequest, status: Status, error_code: Option<&str>, tokens: Option<(u64, u64)>) {
    use serde_json::Value;
    let body: Value = live.snapshot().1.and_then(|b| serde_json::from_str(&b).ok()).unwrap_or_default();
    let text = |value: &Value| value.as_str().map(str::to_owned);
    let finish_reasons: Vec<String> = match body.get("choices").and_then(Value::as_array) {
        Some(choices) => choices.iter().filter_map(|c| c.get("finish_reason").and_then(text)).collect(),
        // A response object: `stop` when it completed, else why it is incomplete.
        None => match body.get("status").and_then(Value::as_str) {
            Some("completed") => vec!["stop".to_owned()],
            Some("incomplete") => body.pointer("/incomplete_details/reason").and_then(text).into_iter().collect(),
            _ => Vec::new(),
        },
    };
    crate::telemetry::otel::request_ended(crate::telemetry::otel::Ended {
        status: status.as_str(),
        error_code,
        response_model: body.get("model").and_then(Value::as_str),
        response_id: body.get("id").and_then(Value::as_str),
        finish_reasons,
        tokens,
    });
}
