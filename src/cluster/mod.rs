//! Several nodes on one shared store: membership, taking over from dead nodes, and reaching peers.
//!
//! Design (docs/DECISIONS.md, "Cluster"):
//! - Every node joins the store's node table with a lease (`--node-lease`, 10 s by default) and renews it every
//!   third of that. The lease times are the database's clock.
//! - Every request records the node that runs it (its owner). A request is only ever ended by its owner, or,
//!   once the owner's record is gone, by whichever node finds it first; the store's conditional final write
//!   (`WriteOp::Finish` applies only to a request that is not final) makes that exactly once, webhook included.
//! - A node whose lease ran out is removed only if it also fails a direct health probe (its `/healthz` must
//!   answer with its node id within a second): a node that is merely slow to reach the database keeps its
//!   requests. A node that finds its own record removed (it was unreachable and silent for a whole lease) stops
//!   its running requests without writing for them, and joins again under a new id.
//! - Readers and stop/DELETE calls for a request that runs on another node are relayed to that node over HTTP
//!   (its `--advertise-url`): one hop on a local network, no per-chunk database traffic, and the owner's memory is
//!   the one source of live state. See [`Peers`].

use crate::domain::NodeId;
use crate::store::StoreError;
use crate::store::nodes::{NodeRecord, NodeStore, Renewal};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How this node takes part in a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// How long a node counts as alive after its last renewal.
    pub lease: Duration,
    /// Base URL at which peers reach this node.
    pub advertise_url: String,
}

/// The header that marks a call relayed by a peer: it is served here and never relayed again.
pub const FORWARDED: &str = "x-offload-forwarded";

/// This node's identity and its view of its peers.
pub struct Peers {
    pub me: NodeRecord,
    nodes: Arc<dyn NodeStore>,
    client: reqwest::Client,
    /// Addresses of peers, looked up once per node id (a node's address never changes: a restart is a new id).
    addresses: Mutex<HashMap<NodeId, (String, Instant)>>,
}

/// How long an address lookup result is trusted before the record is read again (a record can disappear).
const ADDRESS_TTL: Duration = Duration::from_secs(5);

impl Peers {
    pub fn new(me: NodeRecord, nodes: Arc<dyn NodeStore>) -> Self {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            // Building a client without TLS settings or proxies from the environment cannot fail; fall back to
            // the default client, which is equivalent apart from the timeouts.
            .unwrap_or_default();
        Self { me, nodes, client, addresses: Mutex::new(HashMap::new()) }
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// The address of a live peer, or `None` when the node is gone (or is this node).
    pub async fn address(&self, id: NodeId) -> Result<Option<String>, StoreError> {
        if id == self.me.id {
            return Ok(None);
        }
        if let Some((address, at)) = self.addresses.lock().get(&id)
            && at.elapsed() < ADDRESS_TTL
        {
            return Ok(Some(address.clone()));
        }
        let record = self.nodes.node(id).await?;
        let mut cache = self.addresses.lock();
        match record {
            Some(record) => {
                cache.insert(id, (record.address.clone(), Instant::now()));
                Ok(Some(record.address))
            }
            None => {
                cache.remove(&id);
                Ok(None)
            }
        }
    }

    /// Whether the node answers its health check as itself within a second.
    pub async fn answers(&self, node: &NodeRecord) -> bool {
        let url = format!("{}/healthz", node.address.trim_end_matches('/'));
        let Ok(Ok(response)) = tokio::time::timeout(Duration::from_secs(1), self.client.get(url).send()).await else {
            return false;
        };
        let Ok(Ok(body)) = tokio::time::timeout(Duration::from_secs(1), response.json::<serde_json::Value>()).await
        else {
            return false;
        };
        body.get("node").and_then(|n| n.as_str()).and_then(NodeId::parse) == Some(node.id)
    }
}

/// What one round of membership found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// This node's record was gone: it was taken for dead.
    pub lost: bool,
    /// Expired peers removed in this round.
    pub removed: usize,
}

/// Renews this node's lease and removes peers whose lease ran out and that do not answer.
pub async fn round(peers: &Peers, nodes: &dyn NodeStore, lease: Duration) -> Result<Round, StoreError> {
    let mut round = Round::default();
    if nodes.renew(peers.me.id, lease).await? == Renewal::Lost {
        round.lost = true;
    }
    for node in nodes.expired_nodes().await? {
        if node.id == peers.me.id {
            continue;
        }
        if peers.answers(&node).await {
            tracing::warn!(node = %node.id, address = %node.address, "a peer's lease ran out but it answers; keeping it");
            continue;
        }
        if nodes.remove_expired(node.id).await? {
            tracing::warn!(node = %node.id, address = %node.address, "a peer stopped renewing its lease and does not answer; taking over its requests");
            round.removed += 1;
        }
    }
    Ok(round)
}
