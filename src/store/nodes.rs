//! The node family: which `offload serve` processes are alive, for how long, and how their peers reach them.
//!
//! A node joins with a lease and renews it well before it runs out; times are the database's own clock, so
//! that nodes with skewed clocks agree on who expired. A node whose lease ran out may be removed by any other
//! node, and the requests it owned, now owned by no node, are ended as `interrupted` by whoever finds them.

use super::StoreError;
use crate::domain::NodeId;
use async_trait::async_trait;
use std::time::Duration;

/// A node as its peers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRecord {
    pub id: NodeId,
    /// Base URL at which peers reach this node's HTTP listener (`--advertise-url`).
    pub address: String,
}

/// The outcome of renewing a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    Renewed,
    /// The node's record is gone: its lease ran out and a peer removed it. Its requests are (being) ended by
    /// others; it must not write for them any more.
    Lost,
}

#[async_trait]
pub trait NodeStore: Send + Sync + 'static {
    /// Whether several server processes may run requests on this store at once (PostgreSQL); an embedded store
    /// has one, so on start every request not final was cut off by its previous run.
    fn shared(&self) -> bool;

    /// Registers a node with a lease of `lease` from now.
    async fn join(&self, node: &NodeRecord, lease: Duration) -> Result<(), StoreError>;

    /// Extends the node's lease to `lease` from now.
    async fn renew(&self, id: NodeId, lease: Duration) -> Result<Renewal, StoreError>;

    /// Removes the node's record (on a clean shutdown, once its requests are final).
    async fn leave(&self, id: NodeId) -> Result<(), StoreError>;

    /// The node with this id, if its record exists (expired or not).
    async fn node(&self, id: NodeId) -> Result<Option<NodeRecord>, StoreError>;

    /// Nodes whose lease has run out.
    async fn expired_nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;

    /// Removes the node's record if its lease has still run out; `true` for the one caller that removed it.
    async fn remove_expired(&self, id: NodeId) -> Result<bool, StoreError>;

    /// The secret the nodes of this store share to sign their calls to each other: the one already stored, or
    /// `candidate` when none is (the first node to ask stores its own). Every caller gets the same bytes.
    async fn cluster_secret(&self, candidate: &[u8]) -> Result<Vec<u8>, StoreError>;
}
