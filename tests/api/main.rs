//! Black-box tests: the real server on port 0 against the built-in mock upstream, spoken to over HTTP and SSE.
//! One module per section of the contract.

#![expect(clippy::unwrap_used, clippy::panic, reason = "a test fails loudly on anything unexpected")]

mod access;
mod continuation;
mod create;
mod events;
mod flaky;
mod hardening;
mod helpers;
mod hostile;
mod hostile_upstream;
mod key_usage;
mod keys;
mod lifecycle;
mod limits;
mod models;
mod openai;
mod openapi;
mod playground;
mod status;
mod stop;
mod store_failure;
#[path = "../support/mod.rs"]
mod support;
mod timeouts;
mod usage;
mod web;
mod webhooks;
