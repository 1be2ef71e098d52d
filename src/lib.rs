//! offload: a self-hosted, OffloadGPT-compatible server that takes OpenAI Chat Completions calls off its
//! callers' hands, stores everything as it arrives and serves it back.
//!
//! Layout (one job per module):
//! - [`backoff`]: the waits between tries of something that failed, for every retry loop.
//! - [`cluster`]: several nodes on one shared store: leases, taking over from dead nodes, reaching peers.
//! - [`cli`]: the command line (`serve`, `keys`, `mock-upstream`, the client); `main.rs` only calls it.
//! - [`client`]: the command-line client of a running server (`offload chat | follow | status | stop`).
//! - [`settings`]: settings from flags, `OFFLOAD_*` environment variables and an optional TOML file, layered by
//!   figment and nested per concern (server, store, upstream, webhooks, limits, telemetry, web).
//! - [`startup`]: [`startup::Application`] binds a listener (port 0 allowed), opens the store, recovers what a
//!   crash cut off, serves until a shutdown signal and then drains.
//! - [`domain`]: types parsed once at the edge: ids, access, status, tokens, the upstream key, the create body,
//!   the URL locator.
//! - [`document`]: the status document: assembling a `chat.completion` from stream chunks and rendering the JSON.
//! - [`engine`]: the request core: admission, the running requests (each owned by its `live` module, changed only
//!   through intents), the worker that performs an upstream call, the one reader loop of every API, the persister
//!   that batches writes to the store, crash recovery, cluster membership and shutdown. It knows no API's format.
//! - [`upstream`]: the HTTP client for the OpenAI-compatible upstream (no redirects, bounded replies), the
//!   linear-time parser of its event stream, and each upstream protocol in a folder of its own (`upstream::chat`).
//! - [`store`]: the [`store::Store`] trait and its implementations (SQLite, PostgreSQL).
//! - [`http`]: the HTTP surface: each API in a folder of its own (`http::offloadgpt`, `http::chat_completions`),
//!   what they share (`intake`, the JSON error format, the origin guard, relays to other nodes), the accept loop
//!   and its connection limits.
//! - [`keys`]: service keys: authentication, rates, quotas (the `offload keys` commands are in `cli::keys`).
//! - [`mock`]: the built-in OpenAI-compatible mock upstream used by tests, benchmarks and new users.
//! - [`webhook`]: webhook delivery (signing, retries, SSRF guard).
//! - [`retention`]: deletes finished requests older than the retention period.
//! - [`telemetry`]: logging: text or JSON lines, the span and access line of every HTTP request.
//! - [`metrics`]: Prometheus metrics: one helper per event, and `/metrics` on its own listener.
//!
//! docs/ARCHITECTURE.md draws the layers and the life of a request.
//!
//! The benchmark is its own crate, `offload-bench` (crates/offload-bench, BENCHMARKS.md): it runs this binary.

pub mod backoff;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod document;
pub mod domain;
pub mod engine;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod mock;
pub mod retention;
pub mod settings;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod upstream;
pub mod webhook;
