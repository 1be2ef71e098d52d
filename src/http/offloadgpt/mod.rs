//! The OffloadGPT API (the contract's sections 1-9): `POST /v1/stream-chatgpt` and `POST /v1/async-chatgpt`
//! ([`create`]), the four URLs of every request and `DELETE` ([`requests`]), and the end of its event stream
//! ([`events`]). An adapter at the edge: it parses its calls into the engine's and renders what the engine
//! records as the status document and named SSE events.

pub mod create;
pub mod events;
pub mod requests;
