//! The request core: accepts requests, runs their upstream calls, records everything, and serves their state.
//! It knows an upstream exchange (a call goes out, events come in, a final state is reached, everything is
//! recorded) and nothing of any API's wire format: the APIs (`http::offloadgpt`, `http::chat_completions`) render
//! its records and events in theirs.
//!
//! - [`admission`]: one operation lets a call in: the key's limits and quotas, the create, the refund on failure.
//! - [`create`]: a request's record (and the conversation it continues), its insert, its worker.
//! - [`live`]: a running request in memory, owned there and changed only through its intents.
//! - [`worker`]: performs the upstream call (the I/O) and hands the writes to the store's write pipeline
//!   (`store::pipeline`).
//! - [`reader`]: the one reader loop: the event stream of a request, live or replayed, for every API.
//! - [`reads`]: finding a request by its URL; its document, raw response, stream; stop and delete.
//! - [`settle`]: the end of a request (durable, then shown) and of the server.
//! - [`recovery`], [`membership`]: what a crash or a dead node cut off; the cluster's leases.
//! - [`health`]: whether the store answers, and what is held through an outage.
//! - [`sse`]: chunks framed once as server-sent events, shared by every reader.
//! - [`continuation`]: building a continued conversation.

mod admission;
mod attempts;
pub mod continuation;
mod conversation;
mod create;
pub mod health;
pub mod live;
mod membership;
pub mod reader;
mod reads;
mod recovery;
mod settle;
pub mod sse;
mod worker;

pub use admission::AdmitError;

use crate::cluster::Peers;
use crate::document::{RequestMeta, Urls};
use crate::domain::{AccessToken, Limits, NodeId, RequestId, Status};
use crate::keys::Gatekeeper;
use crate::store::pipeline::Persister;
use crate::store::{StoreError, StoredRequest, Stores};
use crate::upstream::Upstreams;
use live::LiveRequest;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long shutdown waits for a failing store before it gives up (what is unstored is recovered on the next
/// start).
const SHUTDOWN_STORE_WAIT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub limits: Limits,
    pub urls: Urls,
    /// Requests running at once before new ones get 503.
    pub max_in_flight: usize,
    /// Longest time a received chunk waits before it is written to the store.
    pub flush_interval: Duration,
    /// How often an idle event stream gets a comment line.
    pub keep_alive: Duration,
    /// How often a reader of a request running elsewhere (another node) looks for new events.
    pub poll_interval: Duration,
    /// Whether `webhook_url` may point at loopback and private addresses.
    pub allow_private_webhooks: bool,
    /// This node: the owner recorded on every request it accepts.
    pub node: NodeId,
    /// What this node holds for the store through an outage.
    pub outage: health::OutagePolicy,
}

/// The bytes of a `.raw` response, page after page.
pub type RawStream = futures_util::stream::BoxStream<'static, Result<bytes::Bytes, StoreError>>;

#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    config: EngineConfig,
    stores: Stores,
    persister: Persister,
    /// One permit per running request, taken before anything is awaited on create, so that `max_in_flight`
    /// holds exactly under any burst.
    slots: Arc<tokio::sync::Semaphore>,
    /// Set when the persister's task ended while the engine still runs: nothing can be stored any more.
    persister_died: Arc<AtomicBool>,
    /// Woken when a webhook delivery is queued.
    webhook_wake: Arc<tokio::sync::Notify>,
    upstreams: Upstreams,
    /// Service keys: their limits and quotas, counted at admission.
    gate: Arc<Gatekeeper>,
    hub: Mutex<HashMap<RequestId, Arc<LiveRequest>>>,
    tasks: TaskTracker,
    accepting: AtomicBool,
    /// Cancelled at the very end of shutdown: open event streams end.
    closing: CancellationToken,
    /// The other nodes on a shared store (`None` on a store of one node).
    peers: Option<Arc<Peers>>,
    /// Whether the store answers ([`health`]).
    health: health::StoreHealth,
}

/// A request found by its URL.
pub enum Found {
    /// Running on this node.
    Live(Arc<LiveRequest>),
    /// Finished, or running on a node that is gone (it is about to be ended as interrupted): the store's view.
    Stored(Box<StoredRequest>),
    /// Running on another node, reachable at `address`: that node serves it.
    Elsewhere { stored: Box<StoredRequest>, address: String },
}

impl Found {
    pub fn meta(&self) -> &RequestMeta {
        match self {
            Found::Live(live) => &live.meta,
            Found::Stored(stored) | Found::Elsewhere { stored, .. } => &stored.meta,
        }
    }

    pub fn status(&self) -> Status {
        match self {
            Found::Live(live) => live.status(),
            Found::Stored(stored) | Found::Elsewhere { stored, .. } => stored.progress.status,
        }
    }

    /// The address of the node that runs the request, when it is another one.
    pub fn elsewhere(&self) -> Option<&str> {
        match self {
            Found::Elsewhere { address, .. } => Some(address),
            _ => None,
        }
    }

    /// `(is_final, event_count)`: whether a reader who has `event_count` events has everything.
    pub fn position(&self) -> (bool, u64) {
        match self {
            Found::Live(live) => live.position(),
            Found::Stored(stored) | Found::Elsewhere { stored, .. } => {
                (stored.progress.status.is_final(), stored.event_count)
            }
        }
    }

    /// The request's parameters and its body (as it stands; `Null` without one), as JSON values.
    pub fn parameters_and_body(&self) -> (serde_json::Value, serde_json::Value) {
        let body = match self {
            Found::Live(live) => live.snapshot().1,
            Found::Stored(stored) | Found::Elsewhere { stored, .. } => stored.body.clone(),
        };
        let parse = |text: &str| serde_json::from_str(text).unwrap_or(serde_json::Value::Null);
        (parse(self.meta().parameters.get()), body.as_deref().map_or(serde_json::Value::Null, parse))
    }

    /// The store's view, for a request whose node could not be reached.
    pub fn into_stored(self) -> Self {
        match self {
            Found::Elsewhere { stored, .. } => Found::Stored(stored),
            other => other,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("the server is shutting down and accepts no new requests; retry against another instance or later")]
    ShuttingDown,
    #[error("the server is running {0} requests, its limit; retry shortly")]
    Overloaded(usize),
    #[error("the X-OpenAI-API-Key header is required: this server has no upstream key of its own")]
    MissingKey,
    #[error(
        "no upstream serves the model {0:?}: name a model one of this server's upstreams serves, or one of its routes (GET /v1/models lists them)"
    )]
    NoUpstream(String),
    #[error("`from_status_url` names no request of this server (it may have been deleted)")]
    FromNotFound,
    #[error("`from_bearer_token` is missing or wrong for the private request named by `from_status_url`")]
    FromForbidden,
    #[error("the request named by `from_status_url` has not finished yet (status `{0}`); continue once it is final")]
    FromNotFinished(&'static str),
    #[error("{0}")]
    WebhookRefused(String),
    #[error(
        "no response with id '{0}' is found (`previous_response_id`): it may have been deleted, or made with another key"
    )]
    PreviousNotFound(String),
    #[error("the previous response '{0}' has not finished yet (status `{1}`); continue from it once it has")]
    PreviousNotFinished(String, &'static str),
    /// A Responses request that the upstream (which has only Chat Completions) cannot be given.
    #[error("this upstream has only Chat Completions, and the request cannot be put as one: {message}")]
    Untranslatable { param: &'static str, message: String },
    #[error("the request could not be stored")]
    Store(#[from] StoreError),
    #[error("the server cannot store requests right now (its store is failing); nothing was created, retry shortly")]
    StoreFailing,
    #[error("the request could not be prepared: {0}")]
    Internal(String),
}

impl CreateError {
    /// Why, as the `reason` label of `offload_create_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            CreateError::ShuttingDown => "shutting_down",
            CreateError::Overloaded(_) => "overload",
            CreateError::MissingKey => "upstream_key",
            CreateError::NoUpstream(_) => "invalid",
            CreateError::WebhookRefused(_) => "webhook",
            CreateError::FromNotFound
            | CreateError::FromForbidden
            | CreateError::FromNotFinished(_)
            | CreateError::PreviousNotFound(_)
            | CreateError::PreviousNotFinished(..) => "continuation",
            CreateError::Untranslatable { .. } => "invalid",
            CreateError::Store(_) | CreateError::StoreFailing => "store",
            CreateError::Internal(_) => "internal",
        }
    }
}

/// What a stop did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// Stopped; the final status `stop` is stored.
    Stopped,
    /// The request had already finished (or was finishing) with this status.
    AlreadyFinal(Status),
    /// Stopped, but the store has not taken the final status yet (it is failing); it will once it can.
    NotYetDurable,
    /// The request runs on another node that cannot be reached.
    Unreachable,
}

/// What the create endpoint answers with.
pub struct Created {
    pub meta: Arc<RequestMeta>,
    /// Private requests: the tokens, shown this once.
    pub bearer: Option<AccessToken>,
    pub stream_token: Option<AccessToken>,
    /// The running request, for an answer that follows it (`POST /v1/chat/completions`).
    pub live: Arc<LiveRequest>,
}

impl crate::metrics::RunningRequests for Engine {
    fn running(&self) -> usize {
        self.in_flight()
    }
}

impl Engine {
    pub fn new(
        config: EngineConfig,
        stores: Stores,
        upstreams: Upstreams,
        gate: Arc<Gatekeeper>,
        webhook_wake: Arc<tokio::sync::Notify>,
        peers: Option<Arc<Peers>>,
    ) -> Self {
        let (persister, task) = Persister::start(stores.requests.clone(), config.flush_interval);
        let persister_died = Arc::new(AtomicBool::new(false));
        let died = persister_died.clone();
        // The persister only ends once every handle is gone, i.e. with the engine; ending earlier is a bug
        // (a panic), and it must not go unnoticed: health turns bad and creates are refused.
        tokio::spawn(async move {
            let outcome = task.await;
            died.store(true, Ordering::SeqCst);
            match outcome {
                Ok(()) => tracing::debug!("the persister stopped"),
                Err(e) => tracing::error!(error = %e, "the persister died: nothing more can be stored"),
            }
        });
        let engine = Self {
            inner: Arc::new(Inner {
                slots: Arc::new(tokio::sync::Semaphore::new(config.max_in_flight)),
                persister_died,
                config,
                stores,
                persister,
                webhook_wake,
                upstreams,
                gate,
                hub: Mutex::new(HashMap::new()),
                tasks: TaskTracker::new(),
                accepting: AtomicBool::new(true),
                closing: CancellationToken::new(),
                peers,
                health: health::StoreHealth::default(),
            }),
        };
        tokio::spawn(health::watch(Arc::downgrade(&engine.inner), engine.inner.closing.clone()));
        engine
    }

    pub fn urls(&self) -> &Urls {
        &self.inner.config.urls
    }

    /// The upstreams and their routes, for calls that are not requests (`GET /v1/models`).
    pub fn upstreams(&self) -> &Upstreams {
        &self.inner.upstreams
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.config.limits
    }

    pub fn in_flight(&self) -> usize {
        self.inner.config.max_in_flight.saturating_sub(self.inner.slots.available_permits())
    }

    /// Whether the store takes writes: `None` when it does, else why not (for `/healthz` and the log).
    pub fn store_problem(&self) -> Option<&'static str> {
        if self.inner.persister_died.load(Ordering::SeqCst) || !self.inner.persister.running() {
            Some("the writer to the store has stopped")
        } else if !self.inner.health.reachable() {
            Some("the store does not answer")
        } else if !self.inner.persister.healthy() {
            Some("the store refuses writes")
        } else {
            None
        }
    }

    /// Whether the store answered its last health round trip ([`health`]).
    pub fn store_answers(&self) -> bool {
        self.inner.health.reachable()
    }

    pub fn accepting(&self) -> bool {
        self.inner.accepting.load(Ordering::SeqCst)
    }

    /// The other nodes, on a shared store.
    pub fn peers(&self) -> Option<&Peers> {
        self.inner.peers.as_deref()
    }

    /// This node's id.
    pub fn node(&self) -> NodeId {
        self.inner.config.node
    }
}
