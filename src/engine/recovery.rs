//! Ending what a crash or a dead node cut off: every request that is not final becomes `error`/`interrupted`,
//! keeping what was received (a stream's body is assembled again from its stored events).

use super::live::base_response;
use super::{Engine, worker};
use crate::document::usage::Tokens;
use crate::document::{Assembler, RequestMeta};
use crate::domain::{Format, Kind, RequestId, Status, unix_now};
use crate::store::usage::Tally;
use crate::store::{StoreError, StoredRequest, WriteOp};
use std::sync::Arc;

impl Engine {
    /// On a store of one node: ends every request a crash cut off as `error`/`interrupted`, keeping what was
    /// received. (On a shared store the requests of other nodes may be running: see [`Self::take_over_orphans`].)
    pub async fn recover(&self) -> Result<usize, StoreError> {
        let cut_off = self.inner.stores.requests.unfinished().await?;
        self.end_cut_off(cut_off).await
    }

    /// On a shared store: ends the requests whose node is gone, as `error`/`interrupted`. Several nodes may do this
    /// at once; the store's final write applies to a request once, so each ends (and its webhook is queued) once.
    pub async fn take_over_orphans(&self) -> Result<usize, StoreError> {
        let orphans = self.inner.stores.requests.orphans().await?;
        self.end_cut_off(orphans).await
    }

    async fn end_cut_off(&self, cut_off: Vec<StoredRequest>) -> Result<usize, StoreError> {
        let store = &self.inner.stores.requests;
        let count = cut_off.len();
        for request in cut_off {
            let id = request.meta.locator.id;
            let body = match (request.meta.format, request.meta.locator.kind) {
                (Format::Responses, _) => Some(self.response_of(&request.meta).await?),
                (Format::Chat, Kind::Stream) => Some(self.reassemble(id).await?),
                (Format::Chat, Kind::Async) => None,
            };
            let now = unix_now();
            let mut progress = request.progress;
            progress.status = Status::Error;
            progress.error = Some(worker::interrupted());
            if progress.request_at.is_some() {
                progress.finished_at.get_or_insert(now);
            }
            progress.processed_at = Some(now);
            let webhook_url = request.meta.options.webhook_url.clone();
            let tokens = body.as_deref().and_then(Tokens::of_json);
            let usage = Some(Box::new(Tally::of(&request.meta, tokens.as_ref(), now)));
            let finish = WriteOp::Finish { id, progress: Box::new(progress), body, webhook_url, usage };
            store.write(Arc::from([finish])).await?;
            tracing::warn!(request = %id, "request cut off by a previous crash ended as interrupted");
        }
        Ok(count)
    }

    async fn reassemble(&self, id: RequestId) -> Result<String, StoreError> {
        let mut assembler = Assembler::default();
        self.each_event(id, |data| {
            assembler.apply(data);
        })
        .await?;
        serde_json::to_string(&assembler).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// A Responses request's object as its stored events leave it, ended as failed (`interrupted`); the stream's
    /// terminal event is rendered from it.
    async fn response_of(&self, meta: &RequestMeta) -> Result<String, StoreError> {
        let mut events = Vec::new();
        self.each_event(meta.locator.id, |data| events.push(data.to_owned())).await?;
        let error = worker::interrupted();
        let response = crate::upstream::translate::record::recovered(
            base_response(meta),
            events.iter().map(String::as_str),
            &error.code,
            &error.message,
        );
        serde_json::to_string(&response).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    async fn each_event(&self, id: RequestId, mut each: impl FnMut(&str)) -> Result<(), StoreError> {
        let mut cursor = 0;
        loop {
            let page = self.inner.stores.requests.events(id, cursor, 1000).await?;
            let Some((last, _)) = page.last() else { return Ok(()) };
            cursor = *last;
            for (_, data) in &page {
                each(data);
            }
        }
    }
}
