//! Builds the application from settings and runs it until a shutdown signal.

use crate::backoff::Backoff;
use crate::cluster::{ClusterSecret, Peers};
use crate::document::Urls;
use crate::domain::NodeId;
use crate::engine::{Engine, EngineConfig};
use crate::http::models::ModelsCache;
use crate::http::origin::WebPolicy;
use crate::http::{AppState, BodyLimits};
use crate::keys::Gatekeeper;
use crate::mock::{MockConfig, MockServer};
use crate::settings::{ServerLimits, Settings};
use crate::store::nodes::{NodeRecord, NodeStore};
use crate::store::{Store, Stores};
use crate::upstream::{Retries, Upstream, Upstreams};
use crate::webhook::Deliverer;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The longest wait before a background task that keeps dying is started again.
const RESTART_MAX: Duration = Duration::from_secs(30);

pub struct Application {
    listener: TcpListener,
    engine: Engine,
    router: axum::Router,
    limits: ServerLimits,
    base_url: String,
    shutdown_grace: Duration,
    deliverer: Arc<Deliverer>,
    requests: Arc<dyn Store>,
    nodes: Arc<dyn NodeStore>,
    /// On a shared store: the node lease, renewed by the membership task.
    membership: Option<Duration>,
    retention: Option<Duration>,
    /// `/metrics` on its own listener (`--metrics-listen`).
    metrics: Option<crate::metrics::Exporter>,
    /// The in-process mock upstream (`--mock-upstream`), kept alive as long as the application.
    _mock: Option<MockServer>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot start the mock upstream: {0}")]
    Mock(std::io::Error),
    #[error(
        "listening on {addr} (all interfaces) with a shared store: set --advertise-url to the address at which the other nodes reach this one"
    )]
    NoAdvertiseUrl { addr: SocketAddr },
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("cannot open the store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("cannot build the webhook client: {0}")]
    Webhooks(reqwest::Error),
    #[error(
        "refusing to serve on {addr} with no service key: anyone who can reach this address could create requests \
         (and spend the upstream key). Create a key with `offload keys create --name NAME` and send it as \
         `Authorization: Bearer <key>`, listen on a loopback address, or pass --allow-open (OFFLOAD_ALLOW_OPEN=true, \
         `allow_open = true` in the config file) to serve open anyway"
    )]
    Open { addr: SocketAddr },
}

impl Application {
    /// Binds the listener, opens the store and ends what a previous crash cut off. Port 0 picks a free port.
    pub async fn build(settings: Settings) -> Result<Self, StartError> {
        let stores = settings.store.location.open().await?;
        Self::build_on(settings, stores).await
    }

    /// As [`Self::build`], on a store opened by the caller.
    pub async fn build_on(settings: Settings, stores: Stores) -> Result<Self, StartError> {
        let mock = if settings.upstream.mock {
            let addr = SocketAddr::from(([127, 0, 0, 1], 0));
            Some(crate::mock::spawn(addr, MockConfig::default()).await.map_err(StartError::Mock)?)
        } else {
            None
        };
        let upstream_url = mock.as_ref().map(MockServer::api_base).unwrap_or_else(|| settings.upstream.url.clone());
        let listen = settings.server.listen;
        let open_allowed = listen.ip().is_loopback() || settings.server.allow_open;
        if !stores.keys.active_keys_exist().await? {
            if !open_allowed {
                return Err(StartError::Open { addr: listen });
            }
            tracing::warn!(
                "NO SERVICE KEYS: this server accepts create calls from anyone who can reach it. \
                 Create a key with `offload keys create --name NAME` to require one."
            );
        }
        let listener = TcpListener::bind(listen).await.map_err(|source| StartError::Bind { addr: listen, source })?;
        let local = listener.local_addr().map_err(|source| StartError::Bind { addr: listen, source })?;
        let metrics = match settings.telemetry.metrics_listen {
            Some(addr) => Some(crate::metrics::Exporter::bind(addr).await?),
            None => None,
        };
        let base_url = settings.server.public_url.clone().unwrap_or_else(|| {
            let host = if local.ip().is_unspecified() { "127.0.0.1".to_string() } else { local.ip().to_string() };
            let host = if local.is_ipv6() && !local.ip().is_unspecified() { format!("[{host}]") } else { host };
            format!("http://{host}:{}", local.port())
        });

        // On a shared store this node joins the others: it records itself with a lease, and its peers reach it at
        // its advertised address to follow, stop or delete the requests it runs.
        let node = NodeId::generate();
        let peers = if stores.nodes.shared() {
            let address = match &settings.store.advertise_url {
                Some(url) => url.clone(),
                None if local.ip().is_unspecified() => return Err(StartError::NoAdvertiseUrl { addr: local }),
                None => format!("http://{local}"),
            };
            let me = NodeRecord { id: node, address };
            let secret = match &settings.store.cluster_secret {
                Some(secret) => secret.clone(),
                None => ClusterSecret::new(&stores.nodes.cluster_secret(ClusterSecret::generate().bytes()).await?),
            };
            stores.nodes.join(&me, settings.store.node_lease).await?;
            tracing::info!(node = %node, address = %me.address, "joined the nodes of the shared store");
            Some(Arc::new(Peers::new(me, stores.nodes.clone(), secret)))
        } else {
            None
        };

        let urls = Urls { base: base_url.clone() };
        let deliverer = Arc::new(
            Deliverer::new(stores.webhooks.clone(), stores.requests.clone(), urls.clone(), settings.webhooks.clone())
                .map_err(StartError::Webhooks)?,
        );
        let config = EngineConfig {
            limits: settings.limits.request.clone(),
            urls,
            max_in_flight: settings.limits.max_in_flight,
            flush_interval: settings.store.flush_interval,
            keep_alive: settings.server.keep_alive,
            poll_interval: Duration::from_millis(250),
            allow_private_webhooks: settings.webhooks.allow_private,
            node,
            outage: settings.limits.outage,
        };
        let upstreams = upstreams(&settings.upstream, upstream_url.clone());
        crate::metrics::upstreams(upstreams.all().iter().map(|u| u.name()));
        let gate = Arc::new(Gatekeeper::new(stores.keys.clone(), node, settings.store.key_cache_ttl));
        let engine =
            Engine::new(config, stores.clone(), upstreams, gate.clone(), deliverer.wake.clone(), peers.clone());
        // One node per embedded store: what is not final was cut off by its previous run. On a shared store only
        // the requests of nodes that are gone are (others may be running right now).
        let recovered = match peers {
            None => engine.recover().await?,
            Some(_) => engine.take_over_orphans().await?,
        };
        // The in-flight slots of service keys held by a previous run (or a node that is gone).
        let freed = stores.keys.release_orphaned_slots().await?;
        if freed > 0 {
            tracing::info!(count = freed, "gave back in-flight slots of service keys held by a previous run");
        }
        if recovered > 0 {
            tracing::warn!(count = recovered, "ended requests cut off by a previous stop as interrupted");
        }
        if settings.webhooks.allow_private {
            tracing::warn!("webhooks may target loopback and private addresses (--allow-private-webhooks)");
        }
        let body = BodyLimits { max_bytes: settings.server.max_body_bytes, timeout: settings.server.body_timeout };
        let router = crate::http::router(AppState {
            engine: engine.clone(),
            gate,
            body,
            open_allowed,
            models: Arc::new(ModelsCache::new(settings.upstream.models_cache)),
            web: Arc::new(WebPolicy::new(
                &base_url,
                settings.store.advertise_url.as_deref(),
                &settings.web.allowed_hosts,
                &settings.web.cors_origins,
            )),
        });
        let connections = settings.server.connections;
        let limits = ServerLimits { max_connections: connection_cap(connections.max_connections), ..connections };
        if mock.is_some() {
            tracing::info!("using the built-in mock upstream at {upstream_url}");
        }
        Ok(Self {
            listener,
            engine,
            router,
            limits,
            base_url,
            shutdown_grace: settings.server.shutdown_grace,
            deliverer,
            requests: stores.requests,
            nodes: stores.nodes,
            membership: peers.map(|_| settings.store.node_lease),
            retention: settings.store.retention,
            metrics,
            _mock: mock,
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// The port `/metrics` is served on, when it is.
    pub fn metrics_port(&self) -> Option<u16> {
        self.metrics.as_ref().map(crate::metrics::Exporter::port)
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Serves until `shutdown` resolves; then new creates get 503 while running requests get the grace period,
    /// the rest end as interrupted, everything is flushed, and open connections are closed.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        let local = self.listener.local_addr()?;
        tracing::info!("offload {} listening on {local} (public URL {})", env!("CARGO_PKG_VERSION"), self.base_url);
        let background = CancellationToken::new();
        // Background work is tracked: a task that ends before shutdown is logged as an error and started again,
        // and shutdown waits for each.
        let tasks = TaskTracker::new();
        let deliverer = self.deliverer.clone();
        tasks.spawn(supervise("webhook deliveries", background.clone(), move |closing| deliverer.clone().run(closing)));
        if let Some(lease) = self.membership {
            let (engine, nodes) = (self.engine.clone(), self.nodes.clone());
            tasks.spawn(supervise("node membership", background.clone(), move |closing| {
                let (engine, nodes) = (engine.clone(), nodes.clone());
                async move { engine.run_membership(nodes, lease, closing).await }
            }));
        }
        if let Some(retention) = self.retention {
            let requests = self.requests.clone();
            tasks.spawn(supervise("the retention sweep", background.clone(), move |closing| {
                crate::retention::sweep(requests.clone(), retention, closing)
            }));
        }
        if let Some(metrics) = self.metrics {
            tasks.spawn(metrics.serve(self.engine.clone(), background.clone()));
        }
        tasks.close();
        let closing = CancellationToken::new();
        let serving = crate::http::server::serve(self.listener, self.router, self.limits, closing.clone());
        tokio::pin!(serving);
        let engine = self.engine.clone();
        let grace = self.shutdown_grace;
        let (membership, nodes, node) = (self.membership, self.nodes.clone(), self.engine.node());
        // Connections keep being accepted and served while running requests drain (reads work, creates get 503).
        let drained = async move {
            shutdown.await;
            tracing::info!("shutting down: no new requests; running ones get {grace:?} to finish");
            engine.shutdown(grace).await;
            background.cancel();
            // Attempts under way finish (each is bounded by the webhook timeout); the rest wait in the store.
            tasks.wait().await;
            if membership.is_some() {
                // Every request of this node is final now: leaving tells the others at once.
                if let Err(e) = nodes.leave(node).await {
                    tracing::warn!(error = %e, "could not leave the nodes of the shared store; its lease will run out");
                }
            }
        };
        tokio::select! {
            () = &mut serving => return Ok(()),
            () = drained => {}
        }
        closing.cancel();
        if tokio::time::timeout(Duration::from_secs(5), serving).await.is_err() {
            // Dropping the server future aborts the connections still open.
            tracing::warn!("connections still open 5 s after draining; closing them");
        }
        Ok(())
    }
}

/// Runs a background task until `closing`; if it ends before (a panic, a bug), says so loudly and starts it again
/// after a second, and after twice as long each time it dies again at once (up to [`RESTART_MAX`]); a run that
/// lasted longer than that starts the waits over.
async fn supervise<F, Fut>(name: &'static str, closing: CancellationToken, make: F)
where
    F: Fn(CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = Backoff::new(Duration::from_secs(1), RESTART_MAX);
    loop {
        let started = tokio::time::Instant::now();
        let outcome = tokio::spawn(make(closing.clone())).await;
        if closing.is_cancelled() {
            return;
        }
        match outcome {
            Ok(()) => tracing::error!("{name} stopped unexpectedly; starting it again"),
            Err(e) => tracing::error!(error = %e, "{name} died; starting it again"),
        }
        if started.elapsed() > RESTART_MAX {
            backoff.reset();
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = closing.cancelled() => return,
        }
    }
}

/// How many open files the process may have: the soft limit raised to the hard one, so that a default `ulimit -n`
/// of 1024 does not cap a server that may hold thousands of connections.
fn raise_file_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => Some(limit),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the open-file limit");
            None
        }
    }
}

/// The upstreams the settings name: those of the config file's `[[upstreams]]` with its routes, else the one of
/// `--upstream-url` (`url`: the built-in mock's, with `--mock-upstream`) serving every model. The retries, reply
/// bounds and breaker are every upstream's.
fn upstreams(settings: &crate::settings::UpstreamSettings, url: url::Url) -> Upstreams {
    let common = |upstream: Upstream, api| {
        upstream
            .with_retries(Retries {
                max: settings.retries,
                header_timeout: settings.header_timeout,
                ..Retries::default()
            })
            .with_limits(settings.reply_limits)
            .with_api(api)
            .with_breaker(settings.breaker)
    };
    if settings.named.is_empty() || settings.mock {
        return Upstreams::single(common(Upstream::new(&url, settings.key.clone(), settings.h2c), settings.api));
    }
    let list = settings
        .named
        .iter()
        .map(|n| {
            let upstream = Upstream::new(&n.url, n.key.clone(), n.h2c).named(&n.name, n.models.clone(), n.caller_keys);
            common(upstream, n.api)
        })
        .collect();
    Upstreams::new(list, &settings.routes)
}

/// `max_connections`, lowered if needed to leave a quarter of the open-file limit (at least 64) to the store,
/// the upstream and webhook calls and the runtime: running out of file descriptors must cost new connections,
/// never the requests already accepted.
fn connection_cap(max_connections: usize) -> usize {
    let Some(files) = raise_file_limit() else { return max_connections };
    let reserve = (files / 4).max(64);
    let fits = usize::try_from(files.saturating_sub(reserve)).unwrap_or(usize::MAX).max(1);
    if fits < max_connections {
        tracing::warn!(
            "serving at most {fits} connections at once, not {max_connections} (--max-connections): the open-file \
             limit is {files}; raise it (`ulimit -n`, LimitNOFILE=) to serve more"
        );
        return fits;
    }
    max_connections
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
