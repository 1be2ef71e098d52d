//! Several nodes on one shared store: membership, taking over from dead nodes, and reaching peers.
//!
//! Design (docs/DECISIONS.md, "Cluster"):
//! - Every node joins the store's node table with a lease (`--node-lease`, 10 s by default) and renews it every
//!   third of that. The lease times are the database's clock.
//! - Every request records the node that runs it (its owner). A request is only ever ended by its owner, or,
//!   once the owner's record is gone, by whichever node finds it first; the store's conditional final write
//!   (`WriteOp::Finish` applies only to a request that is not final) makes that exactly once, webhook included.
//! - Liveness and store health are different questions. A node whose lease ran out is removed only if it also
//!   fails a direct liveness probe ([`Peers::answers`]: `GET /_offload/alive` must prove, with the cluster's
//!   secret, that the node with that id answers, within [`PROBE_WITHIN`]), whatever its store says: a node that
//!   cannot reach the database keeps its requests and their in-flight slots. Only a node that neither renews its
//!   lease nor answers is dead. A node that finds its own record removed (it was frozen or cut off from everyone
//!   for a whole lease) stops its running requests without writing for them, and joins again.
//! - Readers and stop/DELETE calls for a request that runs on another node are relayed to that node over HTTP
//!   (its `--advertise-url`): one hop on a local network, no per-chunk database traffic, and the owner's memory is
//!   the one source of live state. Relayed calls are signed ([`auth`]) and time-limited ([`RELAY_HEAD_WITHIN`],
//!   [`RELAY_IDLE_WITHIN`]); see [`Peers`].

pub mod auth;

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

pub use auth::{ClusterSecret, FORWARDED};

/// How long a liveness probe may take.
pub const PROBE_WITHIN: Duration = Duration::from_secs(2);

/// How long a relayed call waits for the owner's response head before it answers from the store (or 503).
pub const RELAY_HEAD_WITHIN: Duration = Duration::from_secs(3);

/// How old a relayed stop or DELETE may be when the owner reads it: past this its sender has given up and answered
/// 503, so the owner refuses it too (a second over [`RELAY_HEAD_WITHIN`], for the nodes' clocks).
pub const RELAY_ACT_WITHIN: Duration = Duration::from_secs(4);

/// How often the owner sends a keep-alive on a relayed event stream, so that the relaying node can tell a quiet
/// stream from a frozen owner.
pub const RELAY_KEEP_ALIVE: Duration = Duration::from_secs(1);

/// How long a relayed response may go without a byte before the relaying node gives up on the owner (and a relayed
/// event stream goes on from the store).
pub const RELAY_IDLE_WITHIN: Duration = Duration::from_secs(4);

/// This node's identity and its view of its peers.
pub struct Peers {
    pub me: NodeRecord,
    nodes: Arc<dyn NodeStore>,
    client: reqwest::Client,
    secret: ClusterSecret,
    /// Addresses of peers, looked up once per node id (a node's address never changes: a restart is a new id).
    addresses: Mutex<HashMap<NodeId, (String, Instant)>>,
}

/// How long an address lookup result is trusted before the record is read again (a record can disappear).
const ADDRESS_TTL: Duration = Duration::from_secs(5);

impl Peers {
    pub fn new(me: NodeRecord, nodes: Arc<dyn NodeStore>, secret: ClusterSecret) -> Self {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .read_timeout(RELAY_IDLE_WITHIN)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            // Building a client without TLS settings or proxies from the environment cannot fail; fall back to
            // the default client, which is equivalent apart from the timeouts.
            .unwrap_or_default();
        Self { me, nodes, client, secret, addresses: Mutex::new(HashMap::new()) }
    }

    /// The [`FORWARDED`] mark for a call this node relays now.
    pub fn sign(&self, method: &str, path_and_query: &str) -> String {
        self.secret.sign_relay(self.me.id, method, path_and_query, unix_millis())
    }

    /// How long ago a node of this cluster relayed this call, when it carries a valid [`FORWARDED`] mark.
    pub fn relayed_by_peer(&self, mark: &str, method: &str, path_and_query: &str) -> Option<Duration> {
        self.secret.verify_relay(mark, method, path_and_query, unix_millis()).map(Duration::from_millis)
    }

    /// This node's answer to a liveness probe.
    pub fn alive_proof(&self, nonce: &str) -> String {
        self.secret.alive_proof(self.me.id, nonce)
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

    /// Whether the node answers a liveness probe as itself within [`PROBE_WITHIN`]: its answer must carry its id
    /// and the proof, made with the cluster's secret, for a nonce drawn now. Its store's health does not matter.
    pub async fn answers(&self, node: &NodeRecord) -> bool {
        let nonce = hex::encode(rand::random::<[u8; 16]>());
        let url = format!("{}/_offload/alive?nonce={nonce}", node.address.trim_end_matches('/'));
        let probe = async {
            let response = self.client.get(url).send().await.ok()?;
            response.json::<serde_json::Value>().await.ok()
        };
        let Ok(Some(body)) = tokio::time::timeout(PROBE_WITHIN, probe).await else { return false };
        let id = body.get("node").and_then(|n| n.as_str()).and_then(NodeId::parse);
        let proof = body.get("proof").and_then(|p| p.as_str()).unwrap_or_default();
        id == Some(node.id) && self.secret.verify_alive(node.id, &nonce, proof)
    }
}

fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
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
