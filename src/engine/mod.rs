//! The running side of the server: accepts requests, runs their upstream calls, and serves their state.
//!
//! - [`live`]: a running request in memory, shared by its worker and its readers.
//! - [`worker`]: performs the upstream call.
//! - [`persister`]: batches every write into store transactions.
//! - [`reader`]: the event stream of a request, live or replayed.
//! - [`sse`]: the event stream's wire format.
//! - [`raw`]: recording the raw upstream response without storing a stream twice.
//! - [`continuation`]: building a continued conversation.

pub mod continuation;
pub mod health;
pub mod live;
pub mod raw;
pub mod reader;
pub mod sse;
mod worker;

use crate::cluster::Peers;
use crate::document::model::Options;
use crate::document::{Assembler, BodyView, ErrorInfo, RequestMeta, Urls, render};
use crate::domain::locator::ParsedUrl;
use crate::domain::{
    Access, AccessToken, Continuation, CreateRequest, Kind, Limits, Locator, NodeId, RequestId, Status, UpstreamKey,
};
use crate::store::nodes::NodeStore;
use crate::store::pipeline::Persister;
use crate::store::{RawCursor, StoreError, StoredRequest, Stores, WriteOp};
use crate::upstream::Upstream;
use live::{CancelReason, LiveRequest};
use parking_lot::Mutex;
use serde_json::Value;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::domain::unix_now;

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
    upstream: Upstream,
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
    #[error("`from_status_url` names no request of this server (it may have been deleted)")]
    FromNotFound,
    #[error("`from_bearer_token` is missing or wrong for the private request named by `from_status_url`")]
    FromForbidden,
    #[error("the request named by `from_status_url` has not finished yet (status `{0}`); continue once it is final")]
    FromNotFinished(&'static str),
    #[error("{0}")]
    WebhookRefused(String),
    #[error("the request could not be stored")]
    Store(#[from] StoreError),
    #[error("the server cannot store requests right now (its store is failing); nothing was created, retry shortly")]
    StoreFailing,
    #[error("the request could not be prepared: {0}")]
    Internal(String),
}

/// Something a request holds until it is final (a service key's in-flight slot), given back then.
#[async_trait::async_trait]
pub trait Held: Send + Sync + 'static {
    async fn release(self: Box<Self>);
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

impl Engine {
    pub fn new(
        config: EngineConfig,
        stores: Stores,
        upstream: Upstream,
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
                upstream,
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

    /// The upstream, for calls that are not requests (`GET /v1/models`).
    pub fn upstream(&self) -> &Upstream {
        &self.inner.upstream
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

    /// Accepts a request and starts its upstream call. `held` is kept until the request is final (a service
    /// key's in-flight slot, say).
    pub async fn create(
        &self,
        kind: Kind,
        req: CreateRequest,
        caller_key: Option<UpstreamKey>,
        held: Option<Box<dyn Held>>,
    ) -> Result<Created, CreateError> {
        let inner = &self.inner;
        if !self.accepting() {
            return Err(CreateError::ShuttingDown);
        }
        if self.store_problem().is_some() {
            return Err(CreateError::StoreFailing);
        }
        let slot =
            inner.slots.clone().try_acquire_owned().map_err(|_| CreateError::Overloaded(inner.config.max_in_flight))?;
        let key = inner.upstream.key_for(caller_key);
        if key.is_none() && inner.upstream.requires_key() {
            return Err(CreateError::MissingKey);
        }

        if let Some(url) = &req.webhook_url
            && !inner.config.allow_private_webhooks
        {
            crate::webhook::ssrf::check_target(url).await.map_err(|e| CreateError::WebhookRefused(e.to_string()))?;
        }

        let mut parameters = req.parameters;
        let mut conversation_id = req.conversation_id;
        if let Some(c) = &req.continuation {
            let (previous_conversation, history) = self.history(c).await?;
            if let Some(Value::Array(messages)) = parameters.get_mut("messages") {
                let new = std::mem::replace(messages, history);
                messages.extend(new);
            }
            conversation_id.get_or_insert(previous_conversation);
        }

        let id = RequestId::generate();
        crate::telemetry::record_request_id(id);
        let created = unix_now();
        let tokens = match req.access {
            Access::Private => {
                let token = || AccessToken::generate().map_err(|e| CreateError::Internal(e.to_string()));
                Some((token()?, token()?))
            }
            Access::Public => None,
        };
        let parameters_json = serde_json::to_string(&parameters).map_err(|e| CreateError::Internal(e.to_string()))?;
        let upstream_body = with_stream_flag(&parameters_json, kind == Kind::Stream);
        let meta = Arc::new(RequestMeta {
            locator: Locator { kind, access: req.access, created_at: created.floor() as i64, id },
            created,
            conversation_id: conversation_id.unwrap_or_else(|| id.to_string()),
            bearer: tokens.as_ref().map(|(b, _)| b.hash()),
            stream_token: tokens.as_ref().map(|(_, s)| s.hash()),
            options: Options {
                timeout: req.timeout,
                connect_timeout: req.connect_timeout,
                webhook_url: req.webhook_url.map(String::from),
                from_max_length: req.continuation.as_ref().and_then(|c| c.max_length),
            },
            from_status_url: req.continuation.map(|c| c.from_status_url),
            parameters: RawValue::from_string(parameters_json).map_err(|e| CreateError::Internal(e.to_string()))?,
            owner: Some(inner.config.node),
        });

        // The upstream call starts while the insert commits; the answer waits for the insert, and the worker writes
        // nothing (and drops the call) if it fails.
        let inserted = inner.persister.commit_soon(WriteOp::Insert(meta.clone()));
        let live = LiveRequest::new(meta.clone());
        inner.hub.lock().insert(id, live.clone());
        inner.tasks.spawn(crate::telemetry::within_request(
            id,
            worker::run(inner.clone(), live.clone(), key, upstream_body, (held, slot), inserted.clone()),
        ));
        inserted.durable().await?;
        if !self.accepting() {
            // Shutdown began while this one was being accepted: it ends as interrupted like the others.
            live.cancel_with(CancelReason::Shutdown, unix_now());
        }
        let (bearer, stream_token) = tokens.unzip();
        Ok(Created { meta, bearer, stream_token, live })
    }

    /// The previous request's conversation id and its messages followed by its assistant answer.
    async fn history(&self, c: &Continuation) -> Result<(String, Vec<Value>), CreateError> {
        let found = self.find_with(&c.target, true).await?.ok_or(CreateError::FromNotFound)?;
        let meta = found.meta();
        if let Some(hash) = &meta.bearer
            && !c.bearer_token.as_deref().is_some_and(|t| hash.verify(t))
        {
            return Err(CreateError::FromForbidden);
        }
        let status = found.status();
        if !status.is_final() {
            return Err(CreateError::FromNotFinished(status.as_str()));
        }
        let body = match &found {
            Found::Live(live) => live.update(|st| (false, st.body.to_json())),
            Found::Stored(stored) | Found::Elsewhere { stored, .. } => stored.body.clone(),
        };
        let body: Value = body.and_then(|b| serde_json::from_str(&b).ok()).unwrap_or(Value::Null);
        let parameters: Value = serde_json::from_str(meta.parameters.get()).unwrap_or(Value::Null);
        let mut messages = match parameters.get("messages") {
            Some(Value::Array(m)) => m.clone(),
            _ => Vec::new(),
        };
        messages.extend(continuation::assistant_message(&body, c.max_length));
        Ok((meta.conversation_id.clone(), messages))
    }

    /// The request a URL names, if its kind, access and date match.
    /// A request found in the store comes with its body only for the status URL (the body is what the document
    /// shows; the other endpoints do without it, and it may be many megabytes).
    pub async fn find(&self, url: &ParsedUrl) -> Result<Option<Found>, StoreError> {
        self.find_with(url, url.suffix == crate::domain::Suffix::Status).await
    }

    async fn find_with(&self, url: &ParsedUrl, with_body: bool) -> Result<Option<Found>, StoreError> {
        let live = self.inner.hub.lock().get(&url.id).cloned();
        if let Some(live) = live {
            return Ok(url.matches(&live.meta.locator).then_some(Found::Live(live)));
        }
        let requests = &self.inner.stores.requests;
        let stored = if with_body { requests.get(url.id).await? } else { requests.head(url.id).await? };
        let Some(stored) = stored.filter(|s| url.matches(&s.meta.locator)) else {
            return Ok(None);
        };
        let stored = Box::new(stored);
        if stored.progress.status.is_final() {
            return Ok(Some(Found::Stored(stored)));
        }
        let address = match (&self.inner.peers, stored.meta.owner) {
            (Some(peers), Some(owner)) => peers.address(owner).await?,
            _ => None,
        };
        Ok(Some(match address {
            Some(address) => Found::Elsewhere { stored, address },
            None => Found::Stored(stored),
        }))
    }

    /// Stops a running request and waits until its final status is durable (at most `wait`).
    pub async fn stop(&self, found: &Found, wait: Duration) -> StopOutcome {
        match found {
            Found::Live(live) => {
                let stopped = live.cancel_with(CancelReason::Stop, unix_now());
                // Stopped or already ending: either way the answer waits for the final status to be stored, so
                // that whoever is told `stop` (or `already finished`) finds the same in the document.
                if tokio::time::timeout(wait, live.settled.cancelled()).await.is_err() {
                    return StopOutcome::NotYetDurable;
                }
                if stopped { StopOutcome::Stopped } else { StopOutcome::AlreadyFinal(live.status()) }
            }
            Found::Stored(stored) | Found::Elsewhere { stored, .. } if stored.progress.status.is_final() => {
                StopOutcome::AlreadyFinal(stored.progress.status)
            }
            // Running on a node this one cannot reach (or that just died): only that node can stop it.
            Found::Stored(_) | Found::Elsewhere { .. } => StopOutcome::Unreachable,
        }
    }

    /// Deletes a request and everything of it; a running one is ended first.
    /// Deletes a request and everything of it; a running one is ended first (waiting at most `wait` for that:
    /// `Err(StoreError::Unavailable)` when the store is failing, and nothing is deleted).
    pub async fn delete(&self, found: Found, wait: Duration) -> Result<bool, StoreError> {
        let id = found.meta().locator.id;
        if let Found::Live(live) = &found {
            live.cancel_with(CancelReason::Delete, unix_now());
            if tokio::time::timeout(wait, live.settled.cancelled()).await.is_err() {
                return Err(StoreError::Unavailable("the request's end could not be stored in time".into()));
            }
        }
        self.inner.stores.requests.delete(id).await
    }

    /// The status document's bytes: rendered once per change for a live request, from the store otherwise.
    pub fn document(&self, found: &Found, webhook: Option<&RawValue>) -> bytes::Bytes {
        match found {
            Found::Live(live) => live.document(&self.inner.config.urls, webhook),
            Found::Stored(stored) | Found::Elsewhere { stored, .. } => {
                let body = stored.body.as_deref().and_then(|b| serde_json::from_str::<&RawValue>(b).ok());
                let view = body.map_or(BodyView::None, BodyView::Json);
                render(&stored.meta, &stored.progress, view, &self.inner.config.urls, webhook).into()
            }
        }
    }

    /// The raw upstream response so far, read page by page while it is sent (never whole: a reply may be as
    /// large as `--max-upstream-reply-bytes`, and each reader would hold a copy); `None` before the upstream
    /// answered.
    pub async fn raw(&self, found: &Found) -> Result<Option<RawStream>, StoreError> {
        use futures_util::{StreamExt, TryStreamExt};
        /// About what one page of `.raw` holds in memory.
        const PAGE: usize = 256 * 1024;
        match found {
            Found::Live(live) => {
                if live.raw_page(RawCursor::default(), 0).is_none() {
                    return Ok(None);
                }
                let live = live.clone();
                let pages = futures_util::stream::unfold(Some(RawCursor::default()), move |cursor| {
                    let page = cursor.and_then(|from| live.raw_page(from, PAGE));
                    async move {
                        let (pieces, next) = page?;
                        Some((futures_util::stream::iter(pieces.into_iter().map(Ok)), next))
                    }
                });
                Ok(Some(pages.flatten().boxed()))
            }
            Found::Stored(stored) | Found::Elsewhere { stored, .. } => {
                if stored.progress.response.is_none() {
                    return Ok(None);
                }
                let store = self.inner.stores.requests.clone();
                let id = stored.meta.locator.id;
                let pages = futures_util::stream::try_unfold(Some(RawCursor::default()), move |cursor| {
                    let store = store.clone();
                    async move {
                        let Some(from) = cursor else { return Ok(None) };
                        let page = store.raw_page(id, from, PAGE).await?;
                        Ok(Some((bytes::Bytes::from(page.bytes), page.next)))
                    }
                });
                Ok(Some(pages.try_filter(|page| std::future::ready(!page.is_empty())).boxed()))
            }
        }
    }

    /// The other nodes, on a shared store.
    pub fn peers(&self) -> Option<&Peers> {
        self.inner.peers.as_deref()
    }

    /// This node's id.
    pub fn node(&self) -> NodeId {
        self.inner.config.node
    }

    /// The `webhook` object of a request's document: `waiting` until it is final, then the delivery state.
    pub async fn webhook_view(&self, found: &Found) -> Result<Option<Box<RawValue>>, StoreError> {
        if found.meta().options.webhook_url.is_none() {
            return Ok(None);
        }
        let stored = match found {
            Found::Stored(stored) if stored.progress.status.is_final() => {
                self.inner.stores.webhooks.webhook(stored.meta.locator.id).await?
            }
            _ => None,
        };
        let view = match stored {
            Some(status) => serde_json::value::to_raw_value(&status),
            None => serde_json::value::to_raw_value(&serde_json::json!({"state": "waiting", "attempts": 0})),
        };
        view.map(Some).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// On a store of one node: ends every request a crash cut off as `error`/`interrupted`, keeping what was
    /// received. (On a shared store the requests of other nodes may be running: see [`Self::take_over_orphans`].)
    pub async fn recover(&self) -> Result<usize, StoreError> {
        let cut_off = self.inner.stores.requests.unfinished().await?;
        self.end_cut_off(cut_off).await
    }

    /// On a shared store: ends the requests whose node is gone, as `error`/`interrupted`. Several nodes may do this
    /// at once; the store's final write applies to a request once, so each ends (and its webhook is queued) once.
    pub async fn take_over_orphans(&self) -> Result<usize, StoreError> {
        let orphans = self.inner.stores.requests.orphans().await?;
        self.end_cut_off(orphans).await
    }

    /// On a shared store, until `closing`: renews this node's lease, removes dead peers and ends their requests.
    /// A round runs every fifth of the lease, so a dead node's requests end at most about 1.2 leases (plus a
    /// one-second probe) after its last renewal.
    pub async fn run_membership(&self, nodes: Arc<dyn NodeStore>, lease: Duration, closing: CancellationToken) {
        let Some(peers) = self.inner.peers.clone() else { return };
        let every = lease / 5;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = closing.cancelled() => return,
            }
            match crate::cluster::round(&peers, &*nodes, lease).await {
                Ok(round) if round.lost => {
                    tracing::error!(
                        node = %peers.me.id,
                        "this node was taken for dead (its lease ran out while it could not be reached); ending its running requests and joining again"
                    );
                    self.end_all_running().await;
                    if let Err(e) = nodes.join(&peers.me, lease).await {
                        tracing::error!(error = %e, "could not join the cluster again; retrying");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "could not renew this node's lease; retrying"),
            }
            match self.take_over_orphans().await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(count = n, "ended requests of a node that is gone as interrupted"),
                Err(e) => {
                    tracing::error!(error = %e, "could not end the requests of a node that is gone; retrying");
                    // Its in-flight slots are given back only once its requests have ended.
                    continue;
                }
            }
            match self.inner.stores.keys.release_orphaned_slots().await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(count = n, "gave back in-flight slots of service keys held by a node that is gone")
                }
                Err(e) => tracing::error!(error = %e, "could not give back the in-flight slots of a node that is gone"),
            }
        }
    }

    /// Ends every running request as interrupted and waits (bounded) until each is settled.
    async fn end_all_running(&self) {
        let running: Vec<_> = self.inner.hub.lock().values().cloned().collect();
        for live in &running {
            live.cancel_with(CancelReason::Shutdown, unix_now());
        }
        for live in running {
            let _ = tokio::time::timeout(SHUTDOWN_STORE_WAIT, live.settled.cancelled()).await;
        }
    }

    async fn end_cut_off(&self, cut_off: Vec<StoredRequest>) -> Result<usize, StoreError> {
        let store = &self.inner.stores.requests;
        let count = cut_off.len();
        for request in cut_off {
            let id = request.meta.locator.id;
            let body = match request.meta.locator.kind {
                Kind::Stream => Some(self.reassemble(id).await?),
                Kind::Async => None,
            };
            let now = unix_now();
            let mut progress = request.progress;
            progress.status = Status::Error;
            progress.error = Some(worker::interrupted());
            if progress.request_at.is_some() {
                progress.finished_at.get_or_insert(now);
            }
            progress.processed_at = Some(now);
            let webhook_url = request.meta.options.webhook_url.clone();
            store.write(Arc::from([WriteOp::Finish { id, progress: Box::new(progress), body, webhook_url }])).await?;
            tracing::warn!(request = %id, "request cut off by a previous crash ended as interrupted");
        }
        Ok(count)
    }

    async fn reassemble(&self, id: RequestId) -> Result<String, StoreError> {
        let mut assembler = Assembler::default();
        let mut cursor = 0;
        loop {
            let page = self.inner.stores.requests.events(id, cursor, 1000).await?;
            let Some((last, _)) = page.last() else { break };
            cursor = *last;
            for (_, data) in &page {
                assembler.apply(data);
            }
        }
        serde_json::to_string(&assembler).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// Stops accepting, lets running requests finish for `grace`, ends the rest as interrupted, and makes
    /// everything durable. Open event streams end afterwards.
    pub async fn shutdown(&self, grace: Duration) {
        let inner = &self.inner;
        inner.accepting.store(false, Ordering::SeqCst);
        inner.tasks.close();
        if tokio::time::timeout(grace, inner.tasks.wait()).await.is_err() {
            let running: Vec<_> = inner.hub.lock().values().cloned().collect();
            tracing::warn!(count = running.len(), "grace period over; ending running requests as interrupted");
            for live in running {
                live.cancel_with(CancelReason::Shutdown, unix_now());
            }
            // Bounded: with a failing store a final status may never be stored; the next start recovers it.
            if tokio::time::timeout(SHUTDOWN_STORE_WAIT, inner.tasks.wait()).await.is_err() {
                tracing::error!("requests could not store their final status; the next start ends them as interrupted");
            }
        }
        match tokio::time::timeout(SHUTDOWN_STORE_WAIT, inner.persister.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "final flush to the store failed"),
            Err(_) => tracing::error!("the store did not take the last writes in time; the next start recovers them"),
        }
        inner.closing.cancel();
    }

    /// The event stream (`.txt` body) of a request, for a reader that has every event up to `after`. A peer
    /// relaying it (`for_peer`) gets keep-alives every [`crate::cluster::RELAY_KEEP_ALIVE`].
    pub fn follow(
        &self,
        found: Found,
        after: u64,
        for_peer: bool,
    ) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::convert::Infallible>> + Send + 'static {
        let keep_alive = if for_peer {
            crate::cluster::RELAY_KEEP_ALIVE.min(self.inner.config.keep_alive)
        } else {
            self.inner.config.keep_alive
        };
        reader::follow(self.inner.clone(), found, after, keep_alive)
    }
}

impl Inner {
    /// Ends a request: fixes its final state, makes it durable, and only then shows it to readers and lets it
    /// leave memory. While the store fails the final write is retried; the request stays running in every
    /// reader's eyes, and if the process dies meanwhile, recovery ends it as interrupted (nothing final was shown).
    async fn settle(&self, live: &LiveRequest, status: Status, error: Option<ErrorInfo>) {
        crate::metrics::request_finished(status, error.as_ref());
        let (progress, body, leftover) = live.stage_final(status, error, unix_now());
        let id = live.meta.locator.id;
        if let Some((seq, piece)) = leftover {
            self.persister.push(WriteOp::Raw { id, seq, piece }).await;
        }
        let webhook_url = live.meta.options.webhook_url.clone();
        let has_webhook = webhook_url.is_some();
        let finish = WriteOp::Finish { id, progress: Box::new(progress), body, webhook_url };
        // Final statuses share the regular flush instead of forcing a commit each.
        let mut backoff = crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        while let Err(e) = self.persister.push_durable(finish.clone()).await {
            tracing::error!(request = %id, error = %e, "could not store the final status; retrying");
            if self.closing.is_cancelled() {
                tracing::error!(request = %id, "shutting down with the final status unstored; the next start ends it as interrupted");
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = self.closing.cancelled() => {}
            }
        }
        live.publish_final();
        if has_webhook {
            self.webhook_wake.notify_one();
        }
        self.hub.lock().remove(&id);
        live.settled.cancel();
    }
}

/// The upstream body: the stored parameters with `"stream"` added (the object always has `messages`).
fn with_stream_flag(parameters: &str, stream: bool) -> String {
    let body = parameters.trim_end().strip_suffix('}').unwrap_or(parameters);
    format!("{body},\"stream\":{stream}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_flag_is_added_to_the_parameters() {
        let body = with_stream_flag(r#"{"model":"m","messages":[]}"#, true);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["stream"], true);
        assert_eq!(v["model"], "m");
    }
}
