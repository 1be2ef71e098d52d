//! `GET /openapi.json`: the contract as an OpenAPI 3.1 document.
//!
//! The document is written by hand in `openapi.json` beside this file (the API's URL paths, its lenient create
//! body and its event stream are clearer written out than derived from types) and embedded at build time, so
//! the binary serves exactly the file in the repository. What keeps it from drifting from the code is
//! `tests/api/openapi.rs`, which checks it against the running server (routes, methods, status codes, real
//! responses against its schemas), and `tests/schemathesis.rs`, which fuzzes the server with it.

use axum::http::header;
use axum::response::IntoResponse;

/// The document, as served.
pub const DOCUMENT: &str = include_str!("openapi.json");

pub async fn document() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT)
}
