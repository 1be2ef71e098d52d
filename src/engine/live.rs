//! A request that is running: its state in memory, shared by the worker that fills it and every reader.
//!
//! Readers never hold the lock while writing to their sockets: they copy out `Bytes` handles (cheap) and go.
//! So a slow reader costs only its own cursor, never the worker's or another reader's time.
//!
//! Nothing final is visible before it is durable. Ending a request is two steps: [`LiveRequest::stage_final`]
//! fixes the final state (from then on no chunk is accepted, so a stop wins every race with a late chunk) but
//! readers still see the request as running; once the store has committed it, [`LiveRequest::publish_final`]
//! makes it visible: the document's final status, the stream's named event and `[DONE]`, the 204 at the end.
//! Whoever saw a final status therefore finds exactly the same after a crash.

use super::raw::{RawRecorder, Stored};
use super::sse;
use crate::document::{Assembler, BodyView, ChunkKind, ErrorInfo, Progress, RequestMeta, Urls, render};
use crate::domain::Status;
use crate::store::RawCursor;
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
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

/// The response body while the request runs.
pub enum LiveBody {
    None,
    /// Stream request: the `chat.completion` assembled from the chunks so far.
    Assembling(Box<Assembler>),
    /// The whole body as valid JSON text (async requests, error responses).
    Complete(Box<RawValue>),
}

impl LiveBody {
    pub fn view(&self) -> BodyView<'_> {
        match self {
            LiveBody::None => BodyView::None,
            LiveBody::Assembling(a) => BodyView::Assembled(a),
            LiveBody::Complete(raw) => BodyView::Json(raw),
        }
    }

    /// The body as JSON text, for the store.
    pub fn to_json(&self) -> Option<String> {
        match self {
            LiveBody::None => None,
            LiveBody::Assembling(a) => serde_json::to_string(&**a).ok(),
            LiveBody::Complete(raw) => Some(raw.get().to_owned()),
        }
    }
}

/// Wraps any bytes as valid JSON: the JSON itself when it is JSON, else a JSON string of the text.
pub fn json_body(bytes: &[u8]) -> Box<RawValue> {
    let text = String::from_utf8_lossy(bytes);
    if serde_json::from_str::<serde::de::IgnoredAny>(&text).is_ok()
        && let Ok(raw) = RawValue::from_string(text.trim().to_owned())
    {
        return raw;
    }
    serde_json::value::to_raw_value(&text).unwrap_or_else(|_| Box::<RawValue>::default())
}

pub struct LiveState {
    pub progress: Progress,
    pub body: LiveBody,
    /// Every event so far, already framed for the wire.
    pub events: Vec<Bytes>,
    /// The raw response so far.
    raw: RawRecorder,
    pub cancel_reason: Option<CancelReason>,
    /// The final state, fixed but not yet durable: readers do not see it until it is published.
    staged: Option<Progress>,
    version: u64,
    doc_cache: Option<(u64, Bytes)>,
}

impl LiveState {
    /// Whether the request is ending or ended: no chunk or transition is accepted any more.
    pub fn closed(&self) -> bool {
        self.staged.is_some() || self.progress.status.is_final()
    }

    fn stage(&mut self, status: Status, error: Option<ErrorInfo>, now: f64) {
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
    /// Nothing new and the request is final: the tail to send before closing.
    End(Bytes),
    /// Nothing new yet.
    Wait,
}

impl LiveRequest {
    pub fn new(meta: Arc<RequestMeta>) -> Arc<Self> {
        let body = match meta.locator.kind {
            crate::domain::Kind::Stream => LiveBody::Assembling(Box::default()),
            crate::domain::Kind::Async => LiveBody::None,
        };
        Arc::new(Self {
            meta,
            state: Mutex::new(LiveState {
                progress: Progress::pending(),
                body,
                events: Vec::new(),
                raw: RawRecorder::default(),
                cancel_reason: None,
                staged: None,
                version: 0,
                doc_cache: None,
            }),
            changed: watch::channel(0).0,
            cancel: CancellationToken::new(),
            settled: CancellationToken::new(),
        })
    }

    /// Runs `f` on the state and, when it reports a change, wakes every reader.
    pub fn update<R>(&self, f: impl FnOnce(&mut LiveState) -> (bool, R)) -> R {
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

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn status(&self) -> Status {
        self.state.lock().progress.status
    }

    /// Appends one chunk. Returns its sequence number, what it was, and the chunk's bytes to store (shared with
    /// the frame when possible); `None` once the request is final (a stop won the race: nothing after it is kept).
    pub fn push_event(&self, data: &str) -> Option<(u64, ChunkKind, Bytes)> {
        self.update(|st| {
            if st.closed() {
                return (false, None);
            }
            let kind = match &mut st.body {
                LiveBody::Assembling(a) => a.apply(data),
                _ => ChunkKind::Other,
            };
            let seq = st.events.len() as u64 + 1;
            crate::metrics::chunk(seq, self.meta.created);
            let (frame, slice) = sse::framed(seq, data);
            st.events.push(frame);
            if st.progress.status < Status::Streaming {
                st.progress.status = Status::Streaming;
            }
            let stored = slice.unwrap_or_else(|| Bytes::copy_from_slice(data.as_bytes()));
            (true, Some((seq, kind, stored)))
        })
    }

    /// Records a piece of the raw response as it is (the head; a non-stream body); returns what to store.
    pub fn raw_verbatim(&self, bytes: Bytes) -> Stored {
        self.update(|st| (false, st.raw.verbatim(bytes)))
    }

    /// The body that follows is an event stream.
    pub fn raw_start_stream(&self) {
        self.update(|st| (false, st.raw.start_stream()))
    }

    /// Records bytes of a stream body as received; what to store now, if anything.
    pub fn raw_received(&self, bytes: Bytes) -> Option<Stored> {
        self.update(|st| (false, st.raw.received(bytes)))
    }

    /// Records that the parser yielded an event (call before [`Self::push_event`]).
    pub fn raw_event(&self, data: &str) -> Vec<Stored> {
        self.update(|st| {
            let before = st.events.len() as u64;
            (false, st.raw.event(data, before))
        })
    }

    /// Records that the parser yielded `[DONE]`.
    pub fn raw_done(&self) -> Vec<Stored> {
        self.update(|st| {
            let events = st.events.len() as u64;
            (false, st.raw.done(events))
        })
    }

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
            return Read::End(sse::tail(st.progress.status, st.progress.error.as_ref(), total));
        }
        Read::Wait
    }

    /// `(is_final, event_count)`.
    pub fn position(&self) -> (bool, u64) {
        let st = self.state.lock();
        (st.progress.status.is_final(), st.events.len() as u64)
    }

    /// The status document, rendered at most once per change. `webhook` is the same for every render of a
    /// running request (`waiting`), so it is not part of the cache key.
    pub fn document(&self, urls: &Urls, webhook: Option<&RawValue>) -> Bytes {
        let mut st = self.state.lock();
        if let Some((version, doc)) = &st.doc_cache
            && *version == st.version
        {
            return doc.clone();
        }
        let doc = Bytes::from(render(&self.meta, &st.progress, st.body.view(), urls, webhook));
        st.doc_cache = Some((st.version, doc.clone()));
        doc
    }

    /// Tells the worker to end the call for `reason`, unless the request is already ending. `true` if it was
    /// running. A stop fixes the final state (`stop`) at once, so that no chunk received later is kept; it
    /// becomes visible once durable, like every final state.
    pub fn cancel_with(&self, reason: CancelReason, now: f64) -> bool {
        let cancelled = self.update(|st| {
            if st.closed() || st.cancel_reason.is_some() {
                return (false, false);
            }
            st.cancel_reason = Some(reason);
            if reason == CancelReason::Stop {
                st.stage(Status::Stop, None, now);
            }
            (false, true)
        });
        if cancelled {
            self.cancel.cancel();
        }
        cancelled
    }

    /// Fixes the final state (unless a stop already did) without showing it, and returns what to store: the
    /// progress, the body, and the last piece of the raw response if one is still unstored.
    pub fn stage_final(
        &self,
        status: Status,
        error: Option<ErrorInfo>,
        now: f64,
    ) -> (Progress, Option<String>, Option<Stored>) {
        self.update(|st| {
            if st.staged.is_none() && !st.progress.status.is_final() {
                st.stage(status, error, now);
            }
            let progress = st.staged.clone().unwrap_or_else(|| st.progress.clone());
            let leftover = st.raw.finish();
            (false, (progress, st.body.to_json(), leftover))
        })
    }

    /// Shows the staged final state to readers: call once it is durable.
    pub fn publish_final(&self) {
        self.update(|st| match st.staged.take() {
            Some(progress) => {
                st.progress = progress;
                (true, ())
            }
            None => (false, ()),
        })
    }

    pub fn cancel_reason(&self) -> Option<CancelReason> {
        self.state.lock().cancel_reason
    }
}
