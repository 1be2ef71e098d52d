//! Relays a call for a request that runs on another node to that node, and its answer back, byte for byte.
//!
//! The owner holds the live state (events as they arrive, the growing body), so it answers exactly as if the
//! caller had reached it: the same events and ids, resume and 204, ETag and 304, stop and DELETE at once. The
//! caller's own credentials go along (the owner checks them again) and the call is marked with
//! [`FORWARDED`](crate::cluster::FORWARDED), so that it is never relayed a second time.

use crate::cluster::FORWARDED;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, Method, Response, Uri, header};

/// Request headers that carry meaning for the endpoints of a request.
const PASSED_ON: [HeaderName; 4] =
    [header::AUTHORIZATION, header::IF_NONE_MATCH, header::ACCEPT, HeaderName::from_static("last-event-id")];

/// Response headers that describe the connection between the two nodes, not the answer.
const HOP_BY_HOP: [HeaderName; 4] =
    [header::CONNECTION, header::TRANSFER_ENCODING, HeaderName::from_static("keep-alive"), header::CONTENT_LENGTH];

/// Whether this call was already relayed by a peer (then it is answered here, whatever this node knows).
pub fn was_forwarded(headers: &HeaderMap) -> bool {
    headers.contains_key(FORWARDED)
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("the node running this request could not be reached: {0}")]
    Unreachable(#[from] reqwest::Error),
    #[error("the answer of the node running this request could not be relayed: {0}")]
    Invalid(#[from] axum::http::Error),
}

/// Sends the call to the node at `address` and streams its answer back. An error means the node could not be
/// reached (it may have just died); the caller then answers from the store.
pub async fn forward(
    client: &reqwest::Client,
    address: &str,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Response<Body>, ForwardError> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = client.request(method, format!("{}{path}", address.trim_end_matches('/'))).header(FORWARDED, "1");
    for name in &PASSED_ON {
        for value in headers.get_all(name) {
            request = request.header(name, value);
        }
    }
    let answer = request.send().await?;
    let mut response = Response::builder().status(answer.status());
    if let Some(out) = response.headers_mut() {
        for (name, value) in answer.headers() {
            if !HOP_BY_HOP.contains(name) {
                out.append(name, value.clone());
            }
        }
    }
    Ok(response.body(Body::from_stream(answer.bytes_stream()))?)
}
