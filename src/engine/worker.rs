//! Performs one upstream call: the I/O. What arrives goes to the live request as an intent ([`LiveRequest`]),
//! which answers with the writes that make it durable; the worker hands those to the persister.

use super::Inner;
use super::attempts::{Answered, UpstreamCall, attempts};
use super::live::raw::SkipBom;
use super::live::{CancelReason, LiveRequest, Took, json_body};
use crate::document::ErrorInfo;
use crate::domain::{Kind, Status};
use crate::keys::InFlightSlot;
use crate::store::WriteOp;
use crate::store::pipeline::Receipt;
use crate::upstream::chat;
use crate::upstream::events::{EventParser, ParseError};
use crate::upstream::translate::Source;
use crate::upstream::{Endpoint, ReplyLimits, describe, raw_head, response_meta};
use bytes::Bytes;
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
    upstream: UpstreamCall,
    held: (Option<InFlightSlot>, tokio::sync::OwnedSemaphorePermit),
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
        outcome = call(&inner, &live, &upstream, deadline, &inserted) => outcome,
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
async fn release((held, slot): (Option<InFlightSlot>, tokio::sync::OwnedSemaphorePermit)) {
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

/// Hands writes to the persister, in order.
async fn store(inner: &Inner, writes: impl IntoIterator<Item = WriteOp>) {
    for op in writes {
        inner.persister.push(op).await;
    }
}

async fn call(
    inner: &Inner,
    live: &LiveRequest,
    upstream: &UpstreamCall,
    deadline: tokio::time::Instant,
    inserted: &Receipt,
) -> Outcome {
    live.posting(crate::domain::unix_now());
    let Answered { response, endpoint, served, limits } =
        match attempts(inner, live, upstream, deadline, inserted).await {
            Ok(answered) => answered,
            Err(e) => return Outcome::Failed(e),
        };
    crate::telemetry::record_upstream(&served.name);
    // Nothing is written before the request's insert is durable.
    if inserted.durable().await.is_err() {
        return Outcome::Cancelled;
    }

    let meta = response_meta(&response);
    let head = raw_head(&response, &meta);
    let success = response.status().is_success();
    let is_event_stream = meta
        .headers
        .iter()
        .any(|(n, v)| n == "content-type" && v.to_ascii_lowercase().starts_with("text/event-stream"));
    let kind = live.meta.locator.kind;
    store(inner, live.answered(meta, head, served).into_iter().flatten()).await;

    if success && kind == Kind::Stream && is_event_stream {
        let source = match endpoint {
            Endpoint::Responses => Source::Responses,
            Endpoint::ChatCompletions => Source::Chat,
        };
        return stream_body(inner, live, response, source, limits).await;
    }
    let status = response.status();
    let bytes = match read_body(inner, live, response, limits.max_reply_bytes).await {
        Ok(bytes) => bytes,
        Err(e) => return Outcome::Failed(e),
    };
    let json = json_body(&bytes);
    let error = if status.is_redirection() {
        Some(redirect_info(status))
    } else {
        (!success).then(|| upstream_error_info(&json))
    };
    live.complete_body(json);
    match error {
        Some(e) => Outcome::Failed(e),
        // A Responses request is always streamed: a whole answer is not one it can record.
        None if live.meta.format == crate::domain::Format::Responses => Outcome::Failed(ErrorInfo::new(
            "upstream_error",
            "The upstream answered without an event stream; see `response`.",
        )),
        None => Outcome::Done,
    }
}

/// A redirect is never followed (it may name an internal address): the request ends with the 3xx answer, its
/// `Location` among the headers, in `response`.
fn redirect_info(status: reqwest::StatusCode) -> ErrorInfo {
    ErrorInfo::new(
        "upstream_error",
        format!("The upstream answered {status}, a redirect; redirects are not followed (see `response`)."),
    )
}

fn reply_too_large(max: usize) -> ErrorInfo {
    ErrorInfo::new(
        "reply_too_large",
        format!(
            "The upstream's reply is larger than {max} bytes (--max-upstream-reply-bytes); what arrived within that is kept."
        ),
    )
}

/// Counts a piece of the reply body against the bound: the part of it within the bound, and whether the bound
/// was passed (nothing past it is kept).
fn within_bound(received: &mut usize, mut piece: Bytes, max: usize) -> (Bytes, bool) {
    let room = max.saturating_sub(*received);
    let over = piece.len() > room;
    if over {
        piece.truncate(room);
    }
    *received += piece.len();
    (piece, over)
}

fn upstream_error_info(body: &serde_json::value::RawValue) -> ErrorInfo {
    let message = chat::error_message(body.get().as_bytes())
        .map(|m| format!("The upstream answered with an error: {m}"))
        .unwrap_or_else(|| "The upstream answered with an error status; see `response`.".into());
    ErrorInfo::new("upstream_error", message)
}

/// Reads a body that is not an event stream, storing each piece as it comes, up to `--max-upstream-reply-bytes`.
async fn read_body(
    inner: &Inner,
    live: &LiveRequest,
    mut response: reqwest::Response,
    max: usize,
) -> Result<Vec<u8>, ErrorInfo> {
    let mut body = Vec::new();
    let mut received = 0;
    while let Some(piece) = response.chunk().await.map_err(|e| {
        ErrorInfo::new("upstream_error", format!("The connection to the upstream broke: {}", describe(&e)))
    })? {
        let (piece, over) = within_bound(&mut received, piece, max);
        body.extend_from_slice(&piece);
        store(inner, [live.body_piece(piece)]).await;
        if over {
            return Err(reply_too_large(max));
        }
    }
    Ok(body)
}

/// Reads an event stream: each piece goes to the raw recorder as it arrives (so that `.raw` holds it even when
/// the request ends in the middle of an event), then to the parser, whose events are kept one by one.
async fn stream_body(
    inner: &Inner,
    live: &LiveRequest,
    mut response: reqwest::Response,
    source: Source,
    limits: ReplyLimits,
) -> Outcome {
    store(inner, live.stream_started(source)).await;
    let mut parser = EventParser::new(limits.max_event_bytes);
    let mut skip_bom = SkipBom::default();
    let mut received = 0;
    let mut events = Vec::new();
    let mut saw_done = false;
    let mut failure = None;
    'read: loop {
        let piece = match response.chunk().await {
            Ok(Some(piece)) => piece,
            Ok(None) => break,
            Err(e) => {
                failure =
                    Some(ErrorInfo::new("upstream_error", format!("The upstream stream broke: {}", describe(&e))));
                break;
            }
        };
        let (piece, over) = within_bound(&mut received, piece, limits.max_reply_bytes);
        store(inner, live.stream_bytes(piece.clone())).await;
        let parsed = parser.feed(&skip_bom.feed(piece), &mut events);
        for data in events.drain(..) {
            if chat::is_done(&data) {
                store(inner, live.take_done()).await;
                saw_done = true;
                break 'read;
            }
            let mut taken = live.take_event(&data);
            let took = std::mem::replace(&mut taken.took, Took::More);
            store(inner, taken.writes(live.meta.locator.id)).await;
            match took {
                Took::More => {}
                Took::Closed => return Outcome::Cancelled,
                Took::Failed(error) => {
                    failure = Some(error);
                    break 'read;
                }
                Took::Ended(None) => {
                    saw_done = true;
                    break 'read;
                }
                Took::Ended(Some(error)) => return Outcome::Failed(error),
            }
        }
        if let Err(e) = parsed {
            let code = match e {
                ParseError::TooLarge(_) => "event_too_large",
                ParseError::NotUtf8 => "upstream_error",
            };
            failure = Some(ErrorInfo::new(code, format!("The upstream stream broke: {e}; what arrived is kept.")));
            break;
        }
        if over {
            failure = Some(reply_too_large(limits.max_reply_bytes));
            break;
        }
    }
    if let Some(e) = failure {
        return Outcome::Failed(e);
    }
    if saw_done || live.assembled_complete() {
        Outcome::Done
    } else {
        Outcome::Failed(ErrorInfo::new(
            "upstream_error",
            "The upstream closed the stream before it was complete (no [DONE]); what was received is kept.",
        ))
    }
}
