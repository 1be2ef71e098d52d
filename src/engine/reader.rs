//! The one reader loop: the event stream of one request, for every API. It replays from the first wanted event,
//! then follows live until the end, which each API renders its own way (`ending`); keep-alives while nothing
//! happens, and an end without the tail when the server closes.

use super::live::{End, Read};
use super::{Found, Inner, sse};
use crate::domain::Format;
use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use std::convert::Infallible;
use std::sync::Arc;

/// How many events one read hands over at most (bounds one write to the socket).
const BATCH: usize = 256;

enum Wake {
    Changed,
    KeepAlive,
    Closing,
}

/// The `.txt` body for a reader that has everything up to event `after`.
pub(super) fn follow(
    inner: Arc<Inner>,
    found: Found,
    after: u64,
    keep_alive: std::time::Duration,
    ending: fn(&End) -> Bytes,
) -> impl Stream<Item = Result<Bytes, Infallible>> {
    async_stream::stream! {
        let _reader = crate::metrics::stream_reader();
        match found {
            Found::Live(live) => {
                let mut changes = live.subscribe();
                let mut cursor = after;
                loop {
                    changes.borrow_and_update();
                    match live.read(cursor, BATCH) {
                        Read::Events(bytes, next) => {
                            cursor = next;
                            yield Ok(bytes);
                        }
                        Read::End(end) => {
                            yield Ok(ending(&end));
                            break;
                        }
                        Read::Wait => {
                            let wake = tokio::select! {
                                _ = changes.changed() => Wake::Changed,
                                _ = tokio::time::sleep(keep_alive) => Wake::KeepAlive,
                                _ = inner.closing.cancelled() => Wake::Closing,
                            };
                            match wake {
                                Wake::Changed => {}
                                Wake::KeepAlive => yield Ok(Bytes::from_static(sse::KEEP_ALIVE)),
                                Wake::Closing => break,
                            }
                        }
                    }
                }
            }
            Found::Stored(mut stored) | Found::Elsewhere { mut stored, .. } => {
                let id = stored.meta.locator.id;
                let format = stored.meta.format;
                let mut cursor = after;
                let mut idle = std::time::Duration::ZERO;
                loop {
                    // A store that fails (a database outage) is read again after a while: the reader waits, with
                    // keep-alives, rather than losing its place.
                    let page = match inner.stores.requests.events(id, cursor, BATCH).await {
                        Ok(page) => Some(page),
                        Err(e) => {
                            tracing::warn!(request = %id, error = %e, "could not read events; trying again");
                            None
                        }
                    };
                    let read = page.is_some();
                    let page = page.unwrap_or_default();
                    if let Some((last, _)) = page.last() {
                        cursor = *last;
                        let mut buf = BytesMut::new();
                        for (seq, data) in &page {
                            buf.extend_from_slice(&sse::frame_as(format, *seq, data));
                        }
                        idle = std::time::Duration::ZERO;
                        yield Ok(buf.freeze());
                        continue;
                    }
                    let progress = &stored.progress;
                    // The end only once every event is known to be out: never after a failed read.
                    if read && progress.status.is_final() {
                        // A Responses request's end is rendered from its final body, which a look at the request's
                        // head does not bring.
                        if format == Format::Responses && stored.body.is_none() {
                            match inner.stores.requests.get(id).await {
                                Ok(Some(fresh)) => *stored = fresh,
                                Ok(None) => break,
                                Err(e) => {
                                    tracing::warn!(request = %id, error = %e, "could not read a request; trying again");
                                    tokio::time::sleep(inner.config.poll_interval).await;
                                    continue;
                                }
                            }
                        }
                        let progress = &stored.progress;
                        let body = stored.body.as_deref().filter(|_| format == Format::Responses).map(Arc::from);
                        let end = End { status: progress.status, error: progress.error.clone(), events: cursor, body };
                        yield Ok(ending(&end));
                        break;
                    }
                    // Not final and not running here: another node runs it. Look again shortly.
                    let wake = tokio::select! {
                        _ = tokio::time::sleep(inner.config.poll_interval) => Wake::Changed,
                        _ = inner.closing.cancelled() => Wake::Closing,
                    };
                    if let Wake::Closing = wake {
                        break;
                    }
                    idle += inner.config.poll_interval;
                    if idle >= keep_alive {
                        idle = std::time::Duration::ZERO;
                        yield Ok(Bytes::from_static(sse::KEEP_ALIVE));
                    }
                    match inner.stores.requests.head(id).await {
                        Ok(Some(fresh)) => *stored = fresh,
                        // Deleted: nothing more will come.
                        Ok(None) => break,
                        Err(e) => tracing::warn!(request = %id, error = %e, "could not read a request; trying again"),
                    }
                }
            }
        }
    }
}
