//! The OffloadGPT API (the contract's sections 1-9): `POST /v1/stream-chatgpt` and `POST /v1/async-chatgpt`
//! ([`create`]), the four URLs of every request and `DELETE` ([`requests`]), and the end of its event stream
//! ([`events`]). An adapter at the edge: it parses its calls into the engine's and renders what the engine
//! records as the status document and named SSE events.

pub mod create;
pub mod events;
pub mod requests;

use crate::document::{BodyView, Urls, render};
use crate::engine::Found;
use bytes::Bytes;
use serde_json::value::RawValue;

/// The status document's bytes: rendered once per change for a live request (its `webhook` object is `waiting`
/// for every render while it runs, so it is not part of what is cached), from the store otherwise.
pub fn document(found: &Found, urls: &Urls, webhook: Option<&RawValue>) -> Bytes {
    match found {
        Found::Live(live) => {
            live.rendered("offloadgpt", |meta, progress, body| Bytes::from(render(meta, progress, body, urls, webhook)))
        }
        Found::Stored(stored) | Found::Elsewhere { stored, .. } => {
            let body = stored.body.as_deref().and_then(|b| serde_json::from_str::<&RawValue>(b).ok());
            let view = body.map_or(BodyView::None, BodyView::Json);
            render(&stored.meta, &stored.progress, view, urls, webhook).into()
        }
    }
}
