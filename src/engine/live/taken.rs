//! What a reader is told at the end of a stream, and what one upstream event changed (the writes that make it
//! durable, and what it means for the call).

use super::raw::Stored;
use crate::document::ErrorInfo;
use crate::domain::Status;
use crate::store::WriteOp;
use bytes::Bytes;
use std::sync::Arc;

/// How a request ended, as its event stream's end tells it.
pub struct End {
    pub status: Status,
    pub error: Option<ErrorInfo>,
    /// Events in the stream.
    pub events: u64,
    /// A Responses request: its final response object (JSON), from which its API renders the terminal event.
    pub body: Option<Arc<str>>,
}

/// What one upstream event meant for the call.
#[derive(Debug)]
pub enum Took {
    /// The request is ending or ended: nothing was kept (a stop won the race).
    Closed,
    /// Kept (a usage-only chunk the caller did not ask for is merged into the body only): read on.
    More,
    /// The upstream reported an error in the stream: the request fails with it.
    Failed(ErrorInfo),
    /// The upstream ended the response itself: done, or failed with its error.
    Ended(Option<ErrorInfo>),
}

/// The events one upstream event gave: usually one, none when it is kept out, several from a translated chunk.
pub(super) enum Kept {
    None,
    One(u64, Bytes),
    Writes(Vec<WriteOp>),
}

/// What one upstream event changed, as writes for the store, in order (raw pieces first, then the events).
pub struct Taken {
    pub(super) raw: Vec<Stored>,
    pub(super) kept: Kept,
    pub took: Took,
}

impl Taken {
    /// The writes that make it durable.
    pub fn writes(self, id: crate::domain::RequestId) -> impl Iterator<Item = WriteOp> {
        let raw = self.raw.into_iter().map(move |(seq, piece)| WriteOp::Raw { id, seq, piece });
        let events = match self.kept {
            Kept::None => Vec::new(),
            Kept::One(seq, data) => vec![WriteOp::Event { id, seq, data }],
            Kept::Writes(writes) => writes,
        };
        raw.chain(events)
    }
}
