//! Reading requests: finding one by its URL (here, on another node, or in the store), its document, its raw
//! response, its event stream; and the two writes a reader may ask for, stop and delete.

use super::live::{CancelReason, End};
use super::{Engine, Found, RawStream, StopOutcome, reader};
use crate::document::RequestMeta;
use crate::domain::locator::ParsedUrl;
use crate::domain::{Format, RequestId, unix_now};
use crate::store::{RawCursor, StoreError};
use bytes::Bytes;
use serde_json::value::RawValue;
use std::time::Duration;

impl Engine {
    /// The request a URL names, if its kind, access and date match.
    /// A request found in the store comes with its body only for the status URL (the body is what the document
    /// shows; the other endpoints do without it, and it may be many megabytes).
    pub async fn find(&self, url: &ParsedUrl) -> Result<Option<Found>, StoreError> {
        self.find_with(url, url.suffix == crate::domain::Suffix::Status).await
    }

    pub(super) async fn find_with(&self, url: &ParsedUrl, with_body: bool) -> Result<Option<Found>, StoreError> {
        self.find_by(url.id, |meta| url.matches(&meta.locator), with_body).await
    }

    /// The Responses API request with this id (with its body, for its response object, if `with_body`).
    pub async fn find_response(&self, id: RequestId, with_body: bool) -> Result<Option<Found>, StoreError> {
        self.find_by(id, |meta| meta.format == Format::Responses, with_body).await
    }

    /// The request `id`, if it is what `wanted` says: here, on another node, or in the store.
    async fn find_by(
        &self,
        id: RequestId,
        wanted: impl Fn(&RequestMeta) -> bool,
        with_body: bool,
    ) -> Result<Option<Found>, StoreError> {
        let live = self.inner.hub.lock().get(&id).cloned();
        if let Some(live) = live {
            return Ok(wanted(&live.meta).then_some(Found::Live(live)));
        }
        let requests = &self.inner.stores.requests;
        let stored = if with_body { requests.get(id).await? } else { requests.head(id).await? };
        let Some(stored) = stored.filter(|s| wanted(&s.meta)) else {
            return Ok(None);
        };
        let stored = Box::new(stored);
        if stored.progress.status.is_final() {
            return Ok(Some(Found::Stored(stored)));
        }
        let address = match (&self.inner.peers, stored.meta.owner) {
            (Some(peers), Some(owner)) => peers.address(owner).await?,
            _ => None,
        };
        Ok(Some(match address {
            Some(address) => Found::Elsewhere { stored, address },
            None => Found::Stored(stored),
        }))
    }

    /// Stops a running request and waits until its final status is durable (at most `wait`).
    pub async fn stop(&self, found: &Found, wait: Duration) -> StopOutcome {
        match found {
            Found::Live(live) => {
                let stopped = live.cancel_with(CancelReason::Stop, unix_now());
                // Stopped or already ending: either way the answer waits for the final status to be stored, so
                // that whoever is told `stop` (or `already finished`) finds the same in the document.
                if tokio::time::timeout(wait, live.settled.cancelled()).await.is_err() {
                    return StopOutcome::NotYetDurable;
                }
                if stopped { StopOutcome::Stopped } else { StopOutcome::AlreadyFinal(live.status()) }
            }
            Found::Stored(stored) | Found::Elsewhere { stored, .. } if stored.progress.status.is_final() => {
                StopOutcome::AlreadyFinal(stored.progress.status)
            }
            // Running on a node this one cannot reach (or that just died): only that node can stop it.
            Found::Stored(_) | Found::Elsewhere { .. } => StopOutcome::Unreachable,
        }
    }

    /// Deletes a request and everything of it; a running one is ended first.
    /// Deletes a request and everything of it; a running one is ended first (waiting at most `wait` for that:
    /// `Err(StoreError::Unavailable)` when the store is failing, and nothing is deleted).
    pub async fn delete(&self, found: Found, wait: Duration) -> Result<bool, StoreError> {
        let id = found.meta().locator.id;
        if let Found::Live(live) = &found {
            live.cancel_with(CancelReason::Delete, unix_now());
            if tokio::time::timeout(wait, live.settled.cancelled()).await.is_err() {
                return Err(StoreError::Unavailable("the request's end could not be stored in time".into()));
            }
        }
        self.inner.stores.requests.delete(id).await
    }

    /// The raw upstream response so far, read page by page while it is sent (never whole: a reply may be as
    /// large as `--max-upstream-reply-bytes`, and each reader would hold a copy); `None` before the upstream
    /// answered.
    pub async fn raw(&self, found: &Found) -> Result<Option<RawStream>, StoreError> {
        use futures_util::{StreamExt, TryStreamExt};
        /// About what one page of `.raw` holds in memory.
        const PAGE: usize = 256 * 1024;
        match found {
            Found::Live(live) => {
                if live.raw_page(RawCursor::default(), 0).is_none() {
                    return Ok(None);
                }
                let live = live.clone();
                let pages = futures_util::stream::unfold(Some(RawCursor::default()), move |cursor| {
                    let page = cursor.and_then(|from| live.raw_page(from, PAGE));
                    async move {
                        let (pieces, next) = page?;
                        Some((futures_util::stream::iter(pieces.into_iter().map(Ok)), next))
                    }
                });
                Ok(Some(pages.flatten().boxed()))
            }
            Found::Stored(stored) | Found::Elsewhere { stored, .. } => {
                if stored.progress.response.is_none() {
                    return Ok(None);
                }
                let store = self.inner.stores.requests.clone();
                let id = stored.meta.locator.id;
                let pages = futures_util::stream::try_unfold(Some(RawCursor::default()), move |cursor| {
                    let store = store.clone();
                    async move {
                        let Some(from) = cursor else { return Ok(None) };
                        let page = store.raw_page(id, from, PAGE).await?;
                        Ok(Some((bytes::Bytes::from(page.bytes), page.next)))
                    }
                });
                Ok(Some(pages.try_filter(|page| std::future::ready(!page.is_empty())).boxed()))
            }
        }
    }

    /// The `webhook` object of a request's document: `waiting` until it is final, then the delivery state.
    pub async fn webhook_view(&self, found: &Found) -> Result<Option<Box<RawValue>>, StoreError> {
        if found.meta().options.webhook_url.is_none() {
            return Ok(None);
        }
        let stored = match found {
            Found::Stored(stored) if stored.progress.status.is_final() => {
                self.inner.stores.webhooks.webhook(stored.meta.locator.id).await?
            }
            _ => None,
        };
        let view = match stored {
            Some(status) => serde_json::value::to_raw_value(&status),
            None => serde_json::value::to_raw_value(&serde_json::json!({"state": "waiting", "attempts": 0})),
        };
        view.map(Some).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// The event stream of a request, for a reader that has every event up to `after`, ended as the reader's API
    /// ends it (`ending`). A peer
    /// relaying it (`for_peer`) gets keep-alives every [`crate::cluster::RELAY_KEEP_ALIVE`].
    pub fn follow(
        &self,
        found: Found,
        after: u64,
        for_peer: bool,
        ending: fn(&End) -> Bytes,
    ) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static {
        let keep_alive = if for_peer {
            crate::cluster::RELAY_KEEP_ALIVE.min(self.inner.config.keep_alive)
        } else {
            self.inner.config.keep_alive
        };
        reader::follow(self.inner.clone(), found, after, keep_alive, ending)
    }
}
