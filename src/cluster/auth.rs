//! How nodes know each other: calls between nodes are signed with a secret only the nodes hold.
//!
//! - **Relayed calls.** A node that relays a call to the node running its request adds [`FORWARDED`]:
//!   `v1.<sender node id>.<unix milliseconds>.<hex HMAC-SHA256>` over the method, the path and query, the sender
//!   and the time. The owner serves a call so marked itself, whatever it knows, and never relays it again. A mark
//!   that does not verify (a caller that made it up, an old one replayed after [`MAX_SKEW`]) is ignored: the call
//!   is served as any outside call, so nothing a caller sends makes a node skip the owner. The mark's time also
//!   tells the owner how long the call took to reach it: a stop or DELETE that arrives after its sender gave up
//!   (a frozen owner reads it when it wakes) is refused, so that a 503 told to a caller never turns into a stop
//!   later.
//! - **Liveness.** A node probed by a peer answers with its id and an HMAC over the id and the prober's fresh
//!   random nonce ([`ClusterSecret::alive_proof`]). Only a node of this cluster can answer, and only the node with
//!   that id, so another process on a reused address (a new node of the same cluster included) is never taken for
//!   the node that was there.
//!
//! The secret comes from `--cluster-secret`, else from the shared store, where the first node to start keeps a
//! random one for all (docs/DECISIONS.md, "Cluster faults").

use crate::domain::NodeId;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;

/// The header that marks a call relayed by a peer.
pub const FORWARDED: &str = "x-offload-forwarded";

/// How far, in milliseconds, the time in a relay mark may be from this node's clock (nodes' clocks may differ a
/// little).
pub const MAX_SKEW: u64 = 120_000;

/// The secret shared by the nodes of one cluster. No `Display`; `Debug` prints a placeholder.
#[derive(Clone)]
pub struct ClusterSecret(Vec<u8>);

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(<redacted>)")
    }
}

impl ClusterSecret {
    pub fn new(bytes: &[u8]) -> Self {
        Self(bytes.to_vec())
    }

    /// A fresh random secret of 32 bytes, for the first node of a cluster to offer.
    pub fn generate() -> Self {
        Self(rand::random::<[u8; 32]>().to_vec())
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// The MAC over `parts`, each followed by a newline. `None` never happens: HMAC takes a key of any length, so
    /// `new_from_slice` cannot fail for it (and a `None` would only make every check fail).
    fn mac(&self, parts: &[&[u8]]) -> Option<Hmac<Sha256>> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).ok()?;
        for part in parts {
            mac.update(part);
            mac.update(b"\n");
        }
        Some(mac)
    }

    fn tag(&self, parts: &[&[u8]]) -> String {
        self.mac(parts).map(|mac| hex::encode(mac.finalize().into_bytes())).unwrap_or_default()
    }

    fn check(&self, parts: &[&[u8]], tag: &str) -> bool {
        let Ok(tag) = hex::decode(tag) else { return false };
        self.mac(parts).is_some_and(|mac| mac.verify_slice(&tag).is_ok())
    }

    /// The [`FORWARDED`] value for a call from `node` at `now` (unix milliseconds).
    pub fn sign_relay(&self, node: NodeId, method: &str, path_and_query: &str, now: u64) -> String {
        let (node, time) = (node.to_string(), now.to_string());
        let tag = self.tag(&[
            b"offload-relay",
            method.as_bytes(),
            path_and_query.as_bytes(),
            node.as_bytes(),
            time.as_bytes(),
        ]);
        format!("v1.{node}.{time}.{tag}")
    }

    /// How long ago (milliseconds, 0 if in the future) `mark` was made, when it is a valid [`FORWARDED`] value for
    /// this call at `now` (unix milliseconds).
    pub fn verify_relay(&self, mark: &str, method: &str, path_and_query: &str, now: u64) -> Option<u64> {
        let mut parts = mark.trim().splitn(4, '.');
        let (Some("v1"), Some(node), Some(time), Some(signature)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let (Some(_), Ok(at)) = (NodeId::parse(node), time.parse::<u64>()) else {
            return None;
        };
        if now.abs_diff(at) > MAX_SKEW {
            return None;
        }
        let parts: [&[u8]; 5] =
            [b"offload-relay", method.as_bytes(), path_and_query.as_bytes(), node.as_bytes(), time.as_bytes()];
        self.check(&parts, signature).then(|| now.saturating_sub(at))
    }

    /// What a node answers a liveness probe that sent `nonce`.
    pub fn alive_proof(&self, node: NodeId, nonce: &str) -> String {
        let node = node.to_string();
        self.tag(&[b"offload-alive", node.as_bytes(), nonce.as_bytes()])
    }

    /// Whether `proof` is what node `node` answers to `nonce`.
    pub fn verify_alive(&self, node: NodeId, nonce: &str, proof: &str) -> bool {
        let node = node.to_string();
        self.check(&[b"offload-alive", node.as_bytes(), nonce.as_bytes()], proof)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_mark_verifies_for_its_call_only_and_not_for_long() {
        let secret = ClusterSecret::new(b"0123456789abcdef0123456789abcdef");
        let node = NodeId::generate();
        let at = 1_700_000_000_000;
        let mark = secret.sign_relay(node, "GET", "/1/r/pub/x.json", at);
        assert_eq!(secret.verify_relay(&mark, "GET", "/1/r/pub/x.json", at), Some(0));
        assert_eq!(secret.verify_relay(&mark, "GET", "/1/r/pub/x.json", at + 2_500), Some(2_500), "its age");
        assert_eq!(secret.verify_relay(&mark, "GET", "/1/r/pub/x.json", at - 10), Some(0), "a clock behind");
        assert!(secret.verify_relay(&mark, "GET", "/1/r/pub/x.json", at + MAX_SKEW).is_some());
        assert!(secret.verify_relay(&mark, "GET", "/1/r/pub/x.json", at + MAX_SKEW + 1).is_none(), "too old");
        assert!(secret.verify_relay(&mark, "DELETE", "/1/r/pub/x.json", at).is_none(), "another method");
        assert!(secret.verify_relay(&mark, "GET", "/1/r/pub/y.json", at).is_none(), "another path");
        let other = ClusterSecret::new(b"another secret of thirty-two bytes!!");
        assert!(other.verify_relay(&mark, "GET", "/1/r/pub/x.json", at).is_none(), "another cluster");
        for forged in ["1", "", "v1", "v1.x.1000.00", &mark.replace("v1.", "v2.")] {
            assert!(secret.verify_relay(forged, "GET", "/1/r/pub/x.json", at).is_none(), "{forged}");
        }
    }

    #[test]
    fn an_alive_proof_names_one_node_and_one_nonce() {
        let secret = ClusterSecret::generate();
        let (node, other) = (NodeId::generate(), NodeId::generate());
        let proof = secret.alive_proof(node, "n1");
        assert!(secret.verify_alive(node, "n1", &proof));
        assert!(!secret.verify_alive(other, "n1", &proof));
        assert!(!secret.verify_alive(node, "n2", &proof));
        assert!(!ClusterSecret::generate().verify_alive(node, "n1", &proof));
        assert!(!format!("{secret:?}").contains(&hex::encode(secret.bytes())));
    }
}
