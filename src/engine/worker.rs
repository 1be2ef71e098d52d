//! Performs one upstream call and feeds what arrives into the live request and the persister.

use super::Inner;
use super::live::{CancelReason, LiveBody, LiveRequest, json_body};
use super::persister::Receipt;
use super::raw::{SkipBom, Stored};
use crate::document::Attempt;
use crate::document::{ChunkKind, ErrorInfo};
use crate::domain::{Kind, Status, UpstreamKey};
use crate::store::WriteOp;
use crate::upstream::{CallError, Retries, describe, raw_head, response_meta, retry_after};
use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;

/// How a call ended, before a stop or shutdown is taken into account.
enum Outcome {
    Done,
    Failed(ErrorInfo),
    Cancelled,
}

pub(super) async fn run(
    inner: Arc<Inner>,
    live: Arc<LiveRequest>,
    key: Option<UpstreamKey>,
    body: String,
    held: (Option<Box<dyn super::Held>>, tokio::sync::OwnedSemaphorePermit),
    inserted: Receipt,
) {
    let timeout = live.meta.options.timeout;
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(timeout);
    let outcome = tokio::select! {
        biased;
        _ = live.cancel.cancelled() => Outcome::Cancelled,
        // An insert that failed drops the call at once (the create answered an error).
        _ = async {
            if inserted.durable().await.is_ok() {
                std::future::pending::<()>().await;
            }
        } => Outcome::Cancelled,
        _ = tokio::time::sleep_until(deadline) => Outcome::Failed(ErrorInfo::new(
            "timeout",
            format!("The upstream did not finish within the timeout of {timeout} seconds."),
        )),
        outcome = call(&inner, &live, key, body, deadline, &inserted) => outcome,
    };
    if inserted.durable().await.is_err() {
        // Never stored, so its create answered an error and nobody knows its URLs: nothing of it is written.
        inner.hub.lock().remove(&live.meta.locator.id);
        live.settled.cancel();
        release(held).await;
        return;
    }
    // The call future is dropped here, and with it the upstream connection: no more tokens are paid for.
    let (status, error) = match outcome {
        Outcome::Done => (Status::Done, None),
        Outcome::Failed(e) => (Status::Error, Some(e)),
        Outcome::Cancelled => match live.cancel_reason() {
            Some(CancelReason::Stop) => (Status::Stop, None),
            Some(CancelReason::StoreOutage) => (Status::Error, Some(store_unavailable())),
            _ => (Status::Error, Some(interrupted())),
        },
    };
    inner.settle(&live, status, error).await;
    release(held).await;
}

/// Gives back what the request held until it was final: the service key's slot, then the server's.
async fn release((held, slot): (Option<Box<dyn super::Held>>, tokio::sync::OwnedSemaphorePermit)) {
    if let Some(held) = held {
        held.release().await;
    }
    drop(slot);
}

fn store_unavailable() -> ErrorInfo {
    ErrorInfo::new(
        "store_unavailable",
        "The server could not reach its database for too long (or held too much for it), so it ended this request; what was received until then is kept.",
    )
}

pub fn interrupted() -> ErrorInfo {
    ErrorInfo::new(
        "interrupted",
        "The server stopped before this request finished; what was received until then is kept.",
    )
}

async fn transition(inner: &Inner, live: &LiveRequest, apply: impl FnOnce(&mut crate::document::Progress)) {
    let progress = live.update(|st| {
        if st.closed() {
            return (false, None);
        }
        apply(&mut st.progress);
        (true, Some(st.progress.clone()))
    });
    if let Some(progress) = progress {
        inner.persister.push(WriteOp::Progress { id: live.meta.locator.id, progress: Box::new(progress) }).await;
    }
}

async fn store_raw(inner: &Inner, live: &LiveRequest, stored: impl IntoIterator<Item = Stored>) {
    for (seq, piece) in stored {
        inner.persister.push(WriteOp::Raw { id: live.meta.locator.id, seq, piece }).await;
    }
}

async fn call(
    inner: &Inner,
    live: &LiveRequest,
    key: Option<UpstreamKey>,
    body: String,
    deadline: tokio::time::Instant,
    inserted: &Receipt,
) -> Outcome {
    // Not written to the store on its own: after a crash `posting` and `pending` end alike (interrupted), and
    // `request_at` is stored with the next transition.
    let now = super::unix_now();
    live.update(|st| {
        if !st.closed() && st.progress.status.can_become(Status::Posting) {
            st.progress.status = Status::Posting;
            st.progress.request_at = Some(now);
        }
        (true, ())
    });
    let response = match attempts(inner, live, key, body, deadline, inserted).await {
        Ok(response) => response,
        Err(e) => return Outcome::Failed(e),
    };
    // Nothing is written before the request's insert is durable.
    if inserted.durable().await.is_err() {
        return Outcome::Cancelled;
    }

    let meta = response_meta(&response);
    store_raw(inner, live, [live.raw_verbatim(raw_head(&response, &meta))]).await;
    let success = response.status().is_success();
    let is_event_stream = meta
        .headers
        .iter()
        .any(|(n, v)| n == "content-type" && v.to_ascii_lowercase().starts_with("text/event-stream"));
    let kind = live.meta.locator.kind;
    transition(inner, live, |p| {
        p.response = Some(meta);
        if kind == Kind::Async {
            p.status = Status::Waiting;
        }
    })
    .await;

    if success && kind == Kind::Stream && is_event_stream {
        return stream_body(inner, live, response).await;
    }
    let bytes = match read_body(inner, live, response).await {
        Ok(bytes) => bytes,
        Err(e) => return Outcome::Failed(e),
    };
    let json = json_body(&bytes);
    let error = (!success).then(|| upstream_error_info(&json));
    live.update(|st| {
        st.body = LiveBody::Complete(json);
        (true, ())
    });
    match error {
        Some(e) => Outcome::Failed(e),
        None => Outcome::Done,
    }
}

/// Sends the call until an attempt gets an answer that is not retried (section 11): a connect error or a 429,
/// 500, 502, 503 or 504 is retried while retries are left and the wait before the next attempt ends before the
/// request's deadline. Each retried attempt is recorded in the document's `attempts`. Nothing of a body is read
/// here except a retried error answer's, so a call is never retried once a chunk of its body arrived.
async fn attempts(
    inner: &Inner,
    live: &LiveRequest,
    key: Option<UpstreamKey>,
    body: String,
    deadline: tokio::time::Instant,
    inserted: &Receipt,
) -> Result<reqwest::Response, ErrorInfo> {
    let retries = inner.upstream.retries().clone();
    let connect_timeout = live.meta.options.connect_timeout;
    let mut failed = 0u32;
    loop {
        let at = super::unix_now();
        let sent = inner.upstream.send(body.clone(), key.clone(), connect_timeout);
        let answered = match retries.header_timeout {
            Some(limit) => tokio::time::timeout(limit, sent).await.ok(),
            None => Some(sent.await),
        };
        let (error, status_code, delay) = match answered {
            // A timeout before the headers: the attempt is dropped (its connection closed) and tried again.
            None => {
                let limit = retries.header_timeout.unwrap_or_default().as_secs_f64();
                let info = ErrorInfo::new(
                    "timeout",
                    format!(
                        "The upstream sent no response headers within {limit} seconds (--upstream-header-timeout)."
                    ),
                );
                let delay = retries.delay(failed + 1, None);
                if failed >= retries.max || tokio::time::Instant::now() + delay >= deadline {
                    return Err(info);
                }
                (info, None, delay)
            }
            Some(Ok(response)) => {
                let status = response.status().as_u16();
                let delay = retries.delay(failed + 1, retry_after(&response));
                if failed >= retries.max
                    || !Retries::retryable_status(status)
                    || tokio::time::Instant::now() + delay >= deadline
                {
                    return Ok(response);
                }
                (ErrorInfo::new("upstream_error", error_answer(response).await), Some(status), delay)
            }
            Some(Err(e)) => {
                let info = call_error_info(&e);
                let delay = retries.delay(failed + 1, None);
                if failed >= retries.max
                    || !Retries::retryable_error(&e)
                    || tokio::time::Instant::now() + delay >= deadline
                {
                    return Err(info);
                }
                (info, None, delay)
            }
        };
        failed += 1;
        if inserted.durable().await.is_err() {
            return Err(error);
        }
        tracing::info!(request = %live.meta.locator.id, attempt = failed, error = %error.message, "upstream attempt failed; retrying");
        transition(inner, live, |p| p.attempts.push(Attempt { at, status_code, error })).await;
        tokio::time::sleep(delay).await;
    }
}

fn call_error_info(e: &CallError) -> ErrorInfo {
    let code = match e {
        CallError::ConnectTimeout(_) => "connect_timeout",
        CallError::Unreachable(_) => "upstream_unreachable",
        CallError::Failed(_) => "upstream_error",
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
    let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    match value.pointer("/error/message").and_then(|m| m.as_str()) {
        Some(message) => format!("The upstream answered {status}: {message}"),
        None => format!("The upstream answered {status}."),
    }
}

fn upstream_error_info(body: &serde_json::value::RawValue) -> ErrorInfo {
    let value: serde_json::Value = serde_json::from_str(body.get()).unwrap_or_default();
    let message = value
        .pointer("/error/message")
        .and_then(|m| m.as_str())
        .map(|m| format!("The upstream answered with an error: {m}"))
        .unwrap_or_else(|| "The upstream answered with an error status; see `response`.".into());
    ErrorInfo::new("upstream_error", message)
}

async fn read_body(inner: &Inner, live: &LiveRequest, response: reqwest::Response) -> Result<Vec<u8>, ErrorInfo> {
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| {
            ErrorInfo::new("upstream_error", format!("The connection to the upstream broke: {}", describe(&e)))
        })?;
        body.extend_from_slice(&piece);
        store_raw(inner, live, [live.raw_verbatim(piece)]).await;
    }
    Ok(body)
}

async fn stream_body(inner: &Inner, live: &LiveRequest, response: reqwest::Response) -> Outcome {
    // The raw bytes are tapped on their way into the SSE parser and recorded after each event it yields.
    live.raw_start_stream();
    let tap: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    // Swapped with the tap after each event, so that neither allocates again once both have grown.
    let mut tapped = Vec::new();
    let tap_in = tap.clone();
    let mut skip_bom = SkipBom::default();
    let mut events = response
        .bytes_stream()
        .inspect(move |piece| {
            if let Ok(bytes) = piece {
                tap_in.lock().push(bytes.clone());
            }
        })
        .map(move |piece| piece.map(|bytes| skip_bom.feed(bytes)))
        .eventsource();
    let mut saw_done = false;
    let mut failure = None;
    while let Some(event) = events.next().await {
        record_tapped(inner, live, &tap, &mut tapped).await;
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                failure = Some(ErrorInfo::new("upstream_error", format!("The upstream stream broke: {e}")));
                break;
            }
        };
        if event.data.trim() == "[DONE]" {
            store_raw(inner, live, live.raw_done()).await;
            saw_done = true;
            break;
        }
        store_raw(inner, live, live.raw_event(&event.data)).await;
        let Some((seq, kind, data)) = live.push_event(&event.data) else {
            return Outcome::Cancelled;
        };
        inner.persister.push(WriteOp::Event { id: live.meta.locator.id, seq, data }).await;
        if let ChunkKind::Error(error) = kind {
            let message = error.get("message").and_then(|m| m.as_str()).unwrap_or("no message");
            failure =
                Some(ErrorInfo::new("upstream_error", format!("The upstream reported an error mid-stream: {message}")));
            break;
        }
    }
    record_tapped(inner, live, &tap, &mut tapped).await;
    if let Some(e) = failure {
        return Outcome::Failed(e);
    }
    let complete = live.update(|st| (false, matches!(&st.body, LiveBody::Assembling(a) if a.is_complete())));
    if saw_done || complete {
        Outcome::Done
    } else {
        Outcome::Failed(ErrorInfo::new(
            "upstream_error",
            "The upstream closed the stream before it was complete (no [DONE]); what was received is kept.",
        ))
    }
}

/// Records the raw bytes the SSE parser took in since the last event.
async fn record_tapped(inner: &Inner, live: &LiveRequest, tap: &Mutex<Vec<Bytes>>, tapped: &mut Vec<Bytes>) {
    std::mem::swap(&mut *tap.lock(), tapped);
    for bytes in tapped.drain(..) {
        if let Some(stored) = live.raw_received(bytes) {
            store_raw(inner, live, [stored]).await;
        }
    }
}
