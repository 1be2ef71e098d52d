//! The body of a running request, in its record's format: a `chat.completion` assembled from chunks, a whole
//! answer, or (a Responses API request) the record of Responses events and the response object
//! ([`crate::upstream::translate::Record`]).

use super::{Kept, LiveState, Taken, Took, sse};
use crate::document::usage::Tokens;
use crate::document::{Assembler, BodyView, ErrorInfo, RequestMeta};
use crate::domain::{Format, Kind, RequestId, Status};
use crate::store::WriteOp;
use crate::upstream::translate::{End, Record, Signal, response_skeleton};
use bytes::Bytes;
use serde_json::Value;
use serde_json::value::RawValue;

/// The response body while the request runs.
pub(super) enum LiveBody {
    None,
    /// Stream request: the `chat.completion` assembled from the chunks so far.
    Assembling(Box<Assembler>),
    /// The whole body as valid JSON text (async requests, error responses).
    Complete(Box<RawValue>),
    /// A Responses API request: its events and its response object.
    Response(Box<Record>),
}

impl LiveBody {
    pub(super) fn for_request(meta: &RequestMeta) -> Self {
        match (meta.format, meta.locator.kind) {
            (Format::Responses, _) => LiveBody::Response(Box::new(Record::new(base_response(meta)))),
            (Format::Chat, Kind::Stream) => LiveBody::Assembling(Box::default()),
            (Format::Chat, Kind::Async) => LiveBody::None,
        }
    }

    pub(super) fn view(&self) -> BodyView<'_> {
        match self {
            LiveBody::None => BodyView::None,
            LiveBody::Assembling(a) => BodyView::Assembled(a),
            LiveBody::Complete(raw) => BodyView::Json(raw),
            LiveBody::Response(record) => BodyView::Value(record.response()),
        }
    }

    /// The body as JSON text, for the store.
    pub(super) fn to_json(&self) -> Option<String> {
        match self {
            LiveBody::None => None,
            LiveBody::Assembling(a) => serde_json::to_string(&**a).ok(),
            LiveBody::Complete(raw) => Some(raw.get().to_owned()),
            LiveBody::Response(record) => serde_json::to_string(record.response()).ok(),
        }
    }

    /// The tokens the body reports so far; `whole` is what a whole answer reported.
    pub(super) fn tokens(&self, whole: Option<&Tokens>) -> Option<Tokens> {
        match self {
            LiveBody::Assembling(a) => a.tokens(),
            LiveBody::Response(record) => record_tokens(record),
            _ => whole.cloned(),
        }
    }
}

fn record_tokens(record: &Record) -> Option<Tokens> {
    let response = record.response();
    let model = response.get("model").and_then(Value::as_str);
    Tokens::of_usage(model, response.get("usage")?)
}

impl LiveState {
    /// The tokens of the final state as it is staged (a Responses request's staged response, when there is one).
    pub(super) fn final_tokens(&self) -> Option<Tokens> {
        match &self.staged_response {
            Some((record, _)) => record_tokens(record),
            None => self.body.tokens(self.tokens.as_ref()),
        }
    }

    /// Frames Responses events numbered after the events so far; their writes go to the outbox. The frames are
    /// not added to the events: the caller does that (now, or when it shows the final state).
    fn frame_events(&mut self, id: RequestId, events: Vec<serde_json::Value>) -> Vec<Bytes> {
        let first = self.events.len() as u64 + self.staged_response.as_ref().map_or(0, |(_, f)| f.len() as u64) + 1;
        let mut frames = Vec::with_capacity(events.len());
        for (offset, event) in events.into_iter().enumerate() {
            let seq = first + offset as u64;
            let kind = event.get("type").and_then(serde_json::Value::as_str).unwrap_or("").to_owned();
            let data = event.to_string();
            let (frame, slice) = sse::named(seq, &kind, &data);
            frames.push(frame);
            self.outbox.push(WriteOp::Event { id, seq, data: slice });
        }
        frames
    }

    /// Responses events that are shown now: framed, added to the events, and their writes answered.
    pub(super) fn push_events(&mut self, id: RequestId, events: Vec<serde_json::Value>) -> Vec<WriteOp> {
        if events.is_empty() {
            return Vec::new();
        }
        let frames = self.frame_events(id, events);
        self.events.extend(frames);
        if self.progress.status < Status::Streaming {
            self.progress.status = Status::Streaming;
        }
        std::mem::take(&mut self.outbox)
    }

    /// A Responses request ending with `status`: its record as it ends and the events that close it, fixed now and
    /// shown with the final state (the writes of the events go to the outbox).
    pub(super) fn stage_response(&mut self, id: RequestId, status: Status, error: Option<&ErrorInfo>, now: f64) {
        if let LiveBody::Response(record) = &self.body {
            let mut last = record.clone();
            let events = last.finish(end_of(status, error), now as i64);
            let frames = self.frame_events(id, events);
            self.staged_response = Some((last, frames));
        }
    }

    /// One event of a Responses request's upstream stream, given to its record (`created`: when the request was).
    pub(super) fn take_response(&mut self, id: RequestId, data: &str, created: f64) -> Taken {
        let LiveBody::Response(record) = &mut self.body else {
            return Taken { raw: Vec::new(), kept: Kept::None, took: Took::More };
        };
        let (events, signal) = record.take(data);
        let took = match signal {
            Signal::More => Took::More,
            Signal::Error { code, message } => Took::Failed(ErrorInfo::new(&code, message)),
            Signal::Ended(End::Failed { code, message }) => Took::Ended(Some(ErrorInfo::new(&code, message))),
            Signal::Ended(_) => Took::Ended(None),
        };
        if !self.output_seen && !events.is_empty() {
            // Time to the first output, not to the events that open the stream.
            self.output_seen = true;
            crate::metrics::first_chunk(crate::domain::unix_now() - created);
            crate::telemetry::otel::first_chunk(crate::domain::unix_now() - created);
        }
        let writes = self.push_events(id, events);
        Taken { raw: Vec::new(), kept: Kept::Writes(writes), took }
    }
}

/// The response object of a Responses request before any event: the request as OpenAI echoes it, with this
/// server's id and creation time.
pub fn base_response(meta: &RequestMeta) -> Value {
    let request: Value = serde_json::from_str(meta.parameters.get()).unwrap_or(Value::Null);
    response_skeleton(&request, &meta.locator.id.response_id(), meta.locator.created_at)
}

/// How a Responses stream ends for a request that ends with `status` (and `error`).
pub(super) fn end_of(status: Status, error: Option<&ErrorInfo>) -> End {
    match (status, error) {
        (Status::Done, _) => End::Completed,
        (Status::Stop, _) => End::Cancelled,
        (_, Some(error)) => End::Failed { code: error.code.clone(), message: error.message.clone() },
        (_, None) => End::Failed { code: "upstream_error".into(), message: "The response did not complete.".into() },
    }
}

/// Wraps any bytes as valid JSON: the JSON itself when it is JSON, else a JSON string of the text.
pub fn json_body(bytes: &[u8]) -> Box<RawValue> {
    let text = String::from_utf8_lossy(bytes);
    // `from_string` checks that the text is JSON as it takes it (one pass over a body that may be large).
    if let Ok(raw) = RawValue::from_string(text.trim().to_owned()) {
        return raw;
    }
    serde_json::value::to_raw_value(&text).unwrap_or_else(|_| Box::<RawValue>::default())
}
