//! A request that is running: its state in memory, shared by the worker that fills it and every reader.
//!
//! This module owns that state: it is private here, and changes only through a few intents (the call is posted,
//! an attempt failed, the upstream answered, an event arrived, the request ends), each of which returns the
//! writes that make it durable, in order, for the worker to hand to the store. The worker does the I/O; the
//! readers read from a cursor.
//!
//! Readers never hold the lock while writing to their sockets: they copy out `Bytes` handles (cheap) and go.
//! So a slow reader costs only its own cursor, never the worker's or another reader's time.
//!
//! Nothing final is visible before it is durable. Ending a request is two steps: [`LiveRequest::stage_final`]
//! fixes the final state (from then on no chunk is accepted, so a stop wins every race with a late chunk) but
//! readers still see the request as running; once the store has committed it, [`LiveRequest::publish_final`]
//! makes it visible: the document's final status, the stream's named event and `[DONE]`, the 204 at the end.
//! Whoever saw a final status therefore finds exactly the same after a crash.

mod body;
pub mod raw;
mod taken;

pub use body::{base_response, json_body};
use taken::Kept;
pub use taken::{End, Taken, Took};

use super::sse;
use crate::document::usage::Tokens;
use crate::document::{Attempt, BodyView, ChunkKind, ErrorInfo, Progress, RequestMeta, ResponseMeta, Served};
use crate::domain::{Format, Kind, RequestId, Status};
use crate::store::usage::Tally;
use crate::store::{RawCursor, WriteOp};
use crate::upstream::translate::{Record, Source};
use body::LiveBody;
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use raw::RawRecorder;
use serde_json::value::RawValue;
use std::sync::Arc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Why a worker was told to stop before the upstream finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelReason {
    Stop,
    Delete,
    Shutdown,
    /// The store has been failing for too long, or the writes held for it passed their bound (`engine::health`).
    StoreOutage,
}

struct LiveState {
    progress: Progress,
    body: LiveBody,
    /// Every event so far, already framed for the wire.
    events: Vec<Bytes>,
    /// The raw response so far.
    raw: RawRecorder,
    cancel_reason: Option<CancelReason>,
    /// The final state, fixed but not yet durable: readers do not see it until it is published.
    staged: Option<Progress>,
    version: u64,
    /// The usage of a whole (not streamed) answer, read once it arrived.
    tokens: Option<Tokens>,
    /// The last rendering of each API's view of the request, with the version it shows.
    rendered: Vec<(&'static str, u64, Bytes)>,
    /// A Responses request: its record as it ends, and the events that close it, fixed with the final state and
    /// shown with it.
    staged_response: Option<(Box<Record>, Vec<Bytes>)>,
    /// Writes made while staging (the closing events), for the final write to carry.
    outbox: Vec<WriteOp>,
    /// A Responses request: the final body, for the terminal event readers are sent.
    final_body: Option<Arc<str>>,
    /// A Responses request: whether an upstream event gave events yet (the time to the first is measured).
    output_seen: bool,
}

impl LiveState {
    /// Whether the request is ending or ended: no chunk or transition is accepted any more.
    fn closed(&self) -> bool {
        self.staged.is_some() || self.progress.status.is_final()
    }

    fn stage(&mut self, id: RequestId, status: Status, error: Option<ErrorInfo>, now: f64) {
        self.stage_response(id, status, error.as_ref(), now);
        let mut progress = self.progress.clone();
        progress.status = status;
        progress.error = error;
        if progress.request_at.is_some() {
            progress.finished_at.get_or_insert(now);
        }
        progress.processed_at = Some(now);
        self.staged = Some(progress);
    }
}

pub struct LiveRequest {
    pub meta: Arc<RequestMeta>,
    /// The caller did not ask for the stream's usage chunk, which the server asked the upstream for: it is kept
    /// out of the events (the body and the raw response keep it).
    hide_usage: bool,
    state: Mutex<LiveState>,
    changed: watch::Sender<u64>,
    /// Cancelled to end the upstream call early (stop, delete, shutdown); the reason is in the state.
    pub cancel: CancellationToken,
    /// Cancelled once the final state is durable and the request has left the hub.
    pub settled: CancellationToken,
}

/// What a reader gets from one look at the live state.
pub enum Read {
    /// New events, concatenated, and the cursor after them.
    Events(Bytes, u64),
    /// Nothing new and the request is final: how it ended, for the API to render its end of stream.
    End(End),
    /// Nothing new yet.
    Wait,
}

/// What the answer of a call shows so far, for an API that answers once it is known (`/v1/chat/completions`).
#[derive(Clone, Copy, Debug)]
pub struct Answering {
    pub status: Status,
    pub events: u64,
    /// The upstream's HTTP status, once it answered.
    pub upstream_status: Option<u16>,
}

impl LiveRequest {
    /// `hide_usage`: see [`Taken::hidden`].
    pub fn new(meta: Arc<RequestMeta>, hide_usage: bool) -> Arc<Self> {
        let body = LiveBody::for_request(&meta);
        Arc::new(Self {
            meta,
            hide_usage,
            state: Mutex::new(LiveState {
                progress: Progress::pending(),
                body,
                events: Vec::new(),
                raw: RawRecorder::default(),
                cancel_reason: None,
                staged: None,
                version: 0,
                tokens: None,
                rendered: Vec::new(),
                staged_response: None,
                outbox: Vec::new(),
                final_body: None,
                output_seen: false,
            }),
            changed: watch::channel(0).0,
            cancel: CancellationToken::new(),
            settled: CancellationToken::new(),
        })
    }

    fn id(&self) -> crate::domain::RequestId {
        self.meta.locator.id
    }

    /// Runs `f` on the state and, when it reports a change, wakes every reader.
    fn update<R>(&self, f: impl FnOnce(&mut LiveState) -> (bool, R)) -> R {
        let (changed, result, version) = {
            let mut state = self.state.lock();
            let (changed, result) = f(&mut state);
            if changed {
                state.version += 1;
            }
            (changed, result, state.version)
        };
        if changed {
            self.changed.send_replace(version);
        }
        result
    }

    /// A status transition while the request runs (nothing once it is closed); the write that stores it.
    fn transition(&self, apply: impl FnOnce(&mut Progress)) -> Option<WriteOp> {
        let id = self.id();
        self.update(|st| {
            if st.closed() {
                return (false, None);
            }
            apply(&mut st.progress);
            (true, Some(WriteOp::Progress { id, progress: Box::new(st.progress.clone()) }))
        })
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn status(&self) -> Status {
        self.state.lock().progress.status
    }

    // ---- intents of the worker ----

    /// The call goes out. Not written to the store on its own: after a crash `posting` and `pending` end alike
    /// (interrupted), and `request_at` is stored with the next transition.
    pub fn posting(&self, now: f64) {
        self.update(|st| {
            if !st.closed() && st.progress.status.can_become(Status::Posting) {
                st.progress.status = Status::Posting;
                st.progress.request_at = Some(now);
            }
            (true, ())
        })
    }

    /// An attempt failed and the call is tried again: recorded in the document's `attempts`.
    pub fn attempt_failed(&self, attempt: Attempt) -> Option<WriteOp> {
        self.transition(|p| {
            p.upstream =
                attempt.upstream.clone().zip(attempt.model.clone()).map(|(name, model)| Served { name, model });
            p.attempts.push(attempt);
        })
    }

    /// The upstream answered with `meta` (the raw head is `head`): the writes of the head and the new state.
    pub fn answered(&self, meta: ResponseMeta, head: Bytes, served: Served) -> [Option<WriteOp>; 2] {
        let (seq, piece) = self.update(|st| (false, st.raw.verbatim(head)));
        let head = WriteOp::Raw { id: self.id(), seq, piece };
        let kind = self.meta.locator.kind;
        let progress = self.transition(|p| {
            p.response = Some(meta);
            p.upstream = Some(served);
            if kind == Kind::Async {
                p.status = Status::Waiting;
            }
        });
        [Some(head), progress]
    }

    /// A piece of a body that is not an event stream, recorded as it is.
    pub fn body_piece(&self, bytes: Bytes) -> WriteOp {
        let (seq, piece) = self.update(|st| (false, st.raw.verbatim(bytes)));
        WriteOp::Raw { id: self.id(), seq, piece }
    }

    /// The whole body of an answer that is not an event stream, as valid JSON.
    pub fn complete_body(&self, json: Box<RawValue>) {
        // Read before the lock: a whole answer may be large.
        let tokens = Tokens::of_json(json.get());
        self.update(|st| {
            st.tokens = tokens;
            match &mut st.body {
                // The upstream's error answer: the response fails with its code and message, and stays the body.
                LiveBody::Response(record) => {
                    record.error_answer(&serde_json::from_str(json.get()).unwrap_or(serde_json::Value::Null));
                }
                body => *body = LiveBody::Complete(json),
            }
            (true, ())
        })
    }

    /// The body that follows is an event stream in `source`'s protocol: what to store (a Responses request's
    /// first events).
    pub fn stream_started(&self, source: Source) -> Vec<WriteOp> {
        let id = self.id();
        self.update(|st| match &mut st.body {
            // Its events are not the upstream's: the raw response is kept as it came.
            LiveBody::Response(record) => {
                if st.staged.is_some() || st.progress.status.is_final() {
                    return (false, Vec::new());
                }
                let events = record.start(source);
                (true, st.push_events(id, events))
            }
            _ => {
                st.raw.start_stream();
                (false, Vec::new())
            }
        })
    }

    /// Bytes of a stream body as received (before they are parsed); what to store now, if anything.
    pub fn stream_bytes(&self, bytes: Bytes) -> Option<WriteOp> {
        let id = self.id();
        self.update(|st| (false, st.raw.received(bytes))).map(|(seq, piece)| WriteOp::Raw { id, seq, piece })
    }

    /// One event of the stream, as the parser yielded it: recorded in the raw response, then appended to the
    /// events (framed once for every reader) and to the body.
    pub fn take_event(&self, data: &str) -> Taken {
        let created = self.meta.created;
        let hide_usage = self.hide_usage;
        let id = self.id();
        self.update(|st| {
            let before = st.events.len() as u64;
            if st.closed() {
                return (false, Taken { raw: st.raw.event(data, before), kept: Kept::None, took: Took::Closed });
            }
            let kind = match &mut st.body {
                LiveBody::Assembling(a) => a.apply(data),
                LiveBody::Response(_) => return (true, st.take_response(id, data, created)),
                _ => ChunkKind::Other,
            };
            if hide_usage && matches!(kind, ChunkKind::UsageOnly) {
                // The body changed (its usage): readers of the document see it.
                return (true, Taken { raw: st.raw.not_an_event(before), kept: Kept::None, took: Took::More });
            }
            let raw = st.raw.event(data, before);
            let seq = st.events.len() as u64 + 1;
            if seq == 1 {
                crate::metrics::first_chunk(crate::domain::unix_now() - created);
                crate::telemetry::otel::first_chunk(crate::domain::unix_now() - created);
            }
            let (frame, slice) = sse::framed(seq, data);
            st.events.push(frame);
            if st.progress.status < Status::Streaming {
                st.progress.status = Status::Streaming;
            }
            let stored = slice.unwrap_or_else(|| Bytes::copy_from_slice(data.as_bytes()));
            let took = match kind {
                ChunkKind::Error(error) => {
                    let message = error.get("message").and_then(|m| m.as_str()).unwrap_or("no message");
                    Took::Failed(ErrorInfo::new(
                        "upstream_error",
                        format!("The upstream reported an error mid-stream: {message}"),
                    ))
                }
                _ => Took::More,
            };
            (true, Taken { raw, kept: Kept::One(seq, stored), took })
        })
    }

    /// The parser yielded `[DONE]`: what to store of the raw response.
    pub fn take_done(&self) -> impl Iterator<Item = WriteOp> {
        let id = self.id();
        let stored = self.update(|st| {
            let events = st.events.len() as u64;
            (false, st.raw.done(events))
        });
        stored.into_iter().map(move |(seq, piece)| WriteOp::Raw { id, seq, piece })
    }

    /// Whether the assembled body of a stream is complete (every choice has its finish reason).
    pub fn assembled_complete(&self) -> bool {
        matches!(&self.state.lock().body, LiveBody::Assembling(a) if a.is_complete())
    }

    // ---- reads ----

    /// A page of the raw response so far (see [`RawRecorder::page`]), once the upstream has answered.
    pub fn raw_page(&self, from: RawCursor, max_bytes: usize) -> Option<(Vec<Bytes>, Option<RawCursor>)> {
        let st = self.state.lock();
        st.progress.response.as_ref().map(|_| st.raw.page(&st.events, from, max_bytes))
    }

    /// Reads events after `cursor` (at most `max` of them), or the end.
    pub fn read(&self, cursor: u64, max: usize) -> Read {
        let st = self.state.lock();
        let total = st.events.len() as u64;
        if cursor < total {
            let end = (cursor as usize + max).min(st.events.len());
            let frames = &st.events[cursor as usize..end];
            let out = if frames.len() == 1 {
                frames[0].clone()
            } else {
                let mut buf = BytesMut::with_capacity(frames.iter().map(Bytes::len).sum());
                frames.iter().for_each(|f| buf.extend_from_slice(f));
                buf.freeze()
            };
            return Read::Events(out, end as u64);
        }
        if st.progress.status.is_final() {
            return Read::End(End {
                status: st.progress.status,
                error: st.progress.error.clone(),
                events: total,
                body: st.final_body.clone(),
            });
        }
        Read::Wait
    }

    /// `(is_final, event_count)`.
    pub fn position(&self) -> (bool, u64) {
        let st = self.state.lock();
        (st.progress.status.is_final(), st.events.len() as u64)
    }

    /// Where the answer stands: status, events so far, and the upstream's status once it answered.
    pub fn answering(&self) -> Answering {
        let st = self.state.lock();
        Answering {
            status: st.progress.status,
            events: st.events.len() as u64,
            upstream_status: st.progress.response.as_ref().map(|r| r.status_code),
        }
    }

    /// The tokens the upstream reported for this request so far (its usage), if it did.
    pub fn tokens(&self) -> Option<Tokens> {
        let st = self.state.lock();
        st.body.tokens(st.tokens.as_ref())
    }

    /// The upstream the call went to, once it was sent.
    pub fn upstream_name(&self) -> Option<String> {
        self.state.lock().progress.upstream.as_ref().map(|served| served.name.clone())
    }

    /// The state shown to readers and the body as JSON text.
    pub fn snapshot(&self) -> (Progress, Option<String>) {
        let st = self.state.lock();
        (st.progress.clone(), st.body.to_json())
    }

    /// The request as an API shows it (`format` names the API's view), rendered by `render` at most once per
    /// change: every poll of an unchanged request gets the same bytes.
    pub fn rendered(
        &self,
        format: &'static str,
        render: impl FnOnce(&RequestMeta, &Progress, BodyView<'_>) -> Bytes,
    ) -> Bytes {
        let mut st = self.state.lock();
        let version = st.version;
        if let Some((_, _, bytes)) = st.rendered.iter().find(|(f, v, _)| *f == format && *v == version) {
            return bytes.clone();
        }
        let bytes = render(&self.meta, &st.progress, st.body.view());
        st.rendered.retain(|(f, _, _)| *f != format);
        st.rendered.push((format, version, bytes.clone()));
        bytes
    }

    // ---- the end ----

    /// Tells the worker to end the call for `reason`, unless the request is already ending. `true` if it was
    /// running. A stop fixes the final state (`stop`) at once, so that no chunk received later is kept; it
    /// becomes visible once durable, like every final state.
    pub fn cancel_with(&self, reason: CancelReason, now: f64) -> bool {
        let id = self.id();
        let cancelled = self.update(|st| {
            if st.closed() || st.cancel_reason.is_some() {
                return (false, false);
            }
            st.cancel_reason = Some(reason);
            if reason == CancelReason::Stop {
                st.stage(id, Status::Stop, None, now);
            }
            (false, true)
        });
        if cancelled {
            self.cancel.cancel();
        }
        cancelled
    }

    /// Fixes the final state (unless a stop already did) without showing it, and returns what to store: what is
    /// still unstored before it (the last piece of the raw response; a Responses request's closing events), then
    /// the final status with the body.
    pub fn stage_final(&self, status: Status, error: Option<ErrorInfo>, now: f64) -> (Vec<WriteOp>, WriteOp) {
        let id = self.id();
        let webhook_url = self.meta.options.webhook_url.clone();
        self.update(|st| {
            if st.staged.is_none() && !st.progress.status.is_final() {
                st.stage(id, status, error, now);
            }
            let progress = st.staged.clone().unwrap_or_else(|| st.progress.clone());
            let mut before: Vec<WriteOp> =
                st.raw.finish().map(|(seq, piece)| WriteOp::Raw { id, seq, piece }).into_iter().collect();
            before.append(&mut st.outbox);
            let body = match &st.staged_response {
                Some((record, _)) => serde_json::to_string(record.response()).ok(),
                None => st.body.to_json(),
            };
            if self.meta.format == Format::Responses {
                st.final_body = body.as_deref().map(Arc::from);
            }
            let usage = Some(Box::new(Tally::of(&self.meta, st.final_tokens().as_ref(), now)));
            let finish = WriteOp::Finish { id, progress: Box::new(progress), body, webhook_url, usage };
            (false, (before, finish))
        })
    }

    /// Shows the staged final state to readers: call once it is durable.
    pub fn publish_final(&self) {
        self.update(|st| match st.staged.take() {
            Some(progress) => {
                st.progress = progress;
                if let Some((record, frames)) = st.staged_response.take() {
                    st.events.extend(frames);
                    st.body = LiveBody::Response(record);
                }
                (true, ())
            }
            None => (false, ()),
        })
    }

    pub fn cancel_reason(&self) -> Option<CancelReason> {
        self.state.lock().cancel_reason
    }
}
