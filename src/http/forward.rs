//! Relays a call for a request that runs on another node to that node, and its answer back, byte for byte.
//!
//! The owner holds the live state (events as they arrive, the growing body), so it answers exactly as if the
//! caller had reached it: the same events and ids, resume and 204, ETag and 304, stop and DELETE at once. The
//! caller's own credentials go along (the owner checks them again) and the call is signed with
//! [`FORWARDED`](crate::cluster::FORWARDED) ([`crate::cluster::auth`]), so that the owner serves it itself and never
//! relays it a second time.
//!
//! Every relay is time-limited: the owner's response head must come within
//! [`RELAY_HEAD_WITHIN`](crate::cluster::RELAY_HEAD_WITHIN), and its body may not pause for longer than
//! [`RELAY_IDLE_WITHIN`](crate::cluster::RELAY_IDLE_WITHIN). A relayed event stream whose owner goes quiet goes on
//! from the store ([`EventRelay`]), so that a reader never hangs on a frozen node.

use crate::cluster::{FORWARDED, Peers, RELAY_HEAD_WITHIN};
use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, Method, Response, Uri, header};
use bytes::{Bytes, BytesMut};

/// Request headers that carry meaning for the endpoints of a request.
const PASSED_ON: [HeaderName; 4] =
    [header::AUTHORIZATION, header::IF_NONE_MATCH, header::ACCEPT, HeaderName::from_static("last-event-id")];

/// Response headers that describe the connection between the two nodes, not the answer.
const HOP_BY_HOP: [HeaderName; 4] =
    [header::CONNECTION, header::TRANSFER_ENCODING, HeaderName::from_static("keep-alive"), header::CONTENT_LENGTH];

fn path_and_query(uri: &Uri) -> &str {
    uri.path_and_query().map_or("/", |p| p.as_str())
}

/// How long ago a node of this cluster relayed this call, when it did (then it is answered here, whatever this node
/// knows). A mark that does not verify counts for nothing: the call is served as any outside call.
pub fn relayed_by_peer(
    peers: Option<&Peers>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Option<std::time::Duration> {
    let mark = headers.get(FORWARDED)?;
    let age = peers.and_then(|peers| {
        let mark = mark.to_str().ok()?;
        peers.relayed_by_peer(mark, method.as_str(), path_and_query(uri))
    });
    if age.is_none() {
        tracing::warn!(
            "a call carried an X-Offload-Forwarded mark that does not verify; it is served as an outside call"
        );
    }
    age
}

/// A request found for a call, once the caller may see it: here, or relayed to the node that runs it.
pub enum Located {
    Here(crate::engine::Found),
    /// The node that runs the request answered; its answer's head has come.
    Relayed(reqwest::Response),
    /// Another node runs the request and did not answer in time (or relayed the call here, where it does not
    /// run): the store's view. Reads are served from it; a stop or DELETE of a request not final is refused, since
    /// only its owner can end it.
    Unreached(crate::engine::Found),
}

/// A call on a request, as it came, for relaying it.
pub struct Call<'a> {
    pub method: Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    /// Relayed here by a node of this cluster (a verified mark), this long ago: served here, never relayed again.
    pub from_peer: Option<std::time::Duration>,
}

impl<'a> Call<'a> {
    pub fn new(peers: Option<&Peers>, method: Method, uri: &'a Uri, headers: &'a HeaderMap) -> Self {
        let from_peer = relayed_by_peer(peers, &method, uri, headers);
        Self { method, uri, headers, from_peer }
    }

    /// A stop, cancel or DELETE relayed by a peer is carried out only while that peer still waits for the answer:
    /// one that arrives later (this node was frozen, and reads it on waking) was already answered 503, and must
    /// not happen now. `false`: too late.
    pub fn in_time(&self) -> bool {
        match self.from_peer {
            Some(age) if age > crate::cluster::RELAY_ACT_WITHIN => {
                tracing::warn!(age = ?age, "refusing a relayed stop or delete that arrived after its sender gave up");
                false
            }
            _ => true,
        }
    }

    /// Where `found` (which the caller may see) is served: here, or by the node that runs it, to which the call is
    /// relayed. If that node cannot be reached in time (it may have just died, or be frozen), the store's view.
    pub async fn locate(&self, peers: Option<&Peers>, found: crate::engine::Found) -> Located {
        let (Some(address), Some(peers)) = (found.elsewhere(), peers) else {
            return Located::Here(found);
        };
        if self.from_peer.is_some() {
            // Relayed once already: this node answers with what it knows, so a call never goes round in circles.
            return Located::Unreached(found.into_stored());
        }
        match send(peers, address, self.method.clone(), self.uri, self.headers).await {
            Ok(answer) => Located::Relayed(answer),
            Err(e) => {
                tracing::warn!(error = %e, "answering from the store instead");
                Located::Unreached(found.into_stored())
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("the node running this request could not be reached: {0}")]
    Unreachable(#[from] reqwest::Error),
    #[error("the node running this request did not answer within {0:?}")]
    Late(std::time::Duration),
    #[error("the answer of the node running this request could not be relayed: {0}")]
    Invalid(#[from] axum::http::Error),
}

/// Sends the call to the node at `address` and returns its answer once its head has come. An error means the node
/// could not be reached in time (it may have just died, or be frozen); the caller then answers from the store.
pub async fn send(
    peers: &Peers,
    address: &str,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<reqwest::Response, ForwardError> {
    let path = path_and_query(uri);
    let mark = peers.sign(method.as_str(), path);
    let mut request =
        peers.client().request(method, format!("{}{path}", address.trim_end_matches('/'))).header(FORWARDED, mark);
    for name in &PASSED_ON {
        for value in headers.get_all(name) {
            request = request.header(name, value);
        }
    }
    match tokio::time::timeout(RELAY_HEAD_WITHIN, request.send()).await {
        Ok(answer) => Ok(answer?),
        Err(_) => Err(ForwardError::Late(RELAY_HEAD_WITHIN)),
    }
}

/// The owner's answer as ours: its status and headers, and its body as it comes (cut if the owner pauses longer
/// than [`RELAY_IDLE_WITHIN`](crate::cluster::RELAY_IDLE_WITHIN): the peers' client has that read timeout).
pub fn relay(answer: reqwest::Response) -> Result<Response<Body>, ForwardError> {
    let response = head(&answer);
    Ok(response.body(Body::from_stream(answer.bytes_stream()))?)
}

/// The response head of the owner's answer, less what describes the connection between the nodes.
pub fn head(answer: &reqwest::Response) -> axum::http::response::Builder {
    let mut response = Response::builder().status(answer.status());
    if let Some(out) = response.headers_mut() {
        for (name, value) in answer.headers() {
            if !HOP_BY_HOP.contains(name) {
                out.append(name, value.clone());
            }
        }
    }
    response
}

/// What a relayed event stream passed on so far, read from its frames (each ends with a blank line; an event's
/// `data:` lines never hold one).
#[derive(Default)]
pub struct EventRelay {
    /// Bytes of a frame not yet complete, held back so that the reader only ever gets whole frames.
    partial: BytesMut,
    /// The id of the last event passed on.
    pub last_id: u64,
    /// A named end (`event: error` or `event: stop`) was passed on: only `[DONE]` may follow.
    pub named_end: bool,
    /// `data: [DONE]` was passed on: the stream is complete.
    pub done: bool,
}

impl EventRelay {
    pub fn new(after: u64) -> Self {
        Self { last_id: after, ..Self::default() }
    }

    /// Takes bytes from the owner and returns the whole frames among them (possibly none). Linear: each byte is
    /// looked at once by the search for frame ends, and once when its frame is read.
    pub fn take(&mut self, bytes: &[u8]) -> Bytes {
        // A frame end may straddle the previous piece and this one.
        let from = self.partial.len().saturating_sub(1);
        self.partial.extend_from_slice(bytes);
        let Some(end) = self.partial[from..].windows(2).rposition(|w| w == b"\n\n").map(|i| from + i + 2) else {
            return Bytes::new();
        };
        let whole = self.partial.split_to(end).freeze();
        for frame in whole.split(|b| *b == b'\n').collect::<Vec<_>>().split(|line| line.is_empty()) {
            self.read_frame(frame);
        }
        whole
    }

    fn read_frame(&mut self, lines: &[&[u8]]) {
        for line in lines {
            if let Some(id) = line.strip_prefix(b"id: ") {
                if let Some(id) = std::str::from_utf8(id).ok().and_then(|id| id.parse().ok()) {
                    self.last_id = id;
                }
            } else if line.starts_with(b"event: ") {
                self.named_end = true;
            } else if *line == b"data: [DONE]" {
                self.done = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_frames_pass_and_the_last_id_and_end_are_read() {
        let mut relay = EventRelay::new(0);
        assert_eq!(relay.take(b"id: 1\ndata: {\"a\"}\n\nid: 2\nda"), &b"id: 1\ndata: {\"a\"}\n\n"[..]);
        assert_eq!(relay.last_id, 1);
        assert_eq!(relay.take(b"ta: x\n"), Bytes::new());
        assert_eq!(relay.take(b"\n: keep-alive\n\n"), &b"id: 2\ndata: x\n\n: keep-alive\n\n"[..]);
        assert_eq!(relay.last_id, 2);
        assert!(!relay.named_end && !relay.done);
        relay.take(b"event: error\ndata: {}\n\ndata: [DONE]\n\n");
        assert!(relay.named_end && relay.done);
    }

    #[test]
    fn a_frame_end_split_between_two_pieces_is_found() {
        let mut relay = EventRelay::new(5);
        assert_eq!(relay.take(b"id: 6\ndata: y\n"), Bytes::new());
        assert_eq!(relay.take(b"\n"), &b"id: 6\ndata: y\n\n"[..]);
        assert_eq!(relay.last_id, 6);
    }
}
