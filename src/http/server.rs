//! The accept loop and the life of one connection: HTTP/1.1 and HTTP/2 (prior knowledge) on hyper, with the
//! limits a public server needs against slow or idle clients.
//!
//! Every connection has a watchdog that only looks at it while no request is in progress on it:
//! - a request head must arrive whole within `header_timeout` of its first byte (of the accept, for the first
//!   request), so a half-sent head (slowloris) cannot hold a socket;
//! - a connection with nothing in progress and nothing arriving is closed `idle_timeout` after its last response
//!   (on HTTP/2 this is the only clock after the first request: bytes between requests are control frames).
//!
//! While a request is in progress (a handler running or a response body being sent) the watchdog stays out of the
//! way: an event stream may stay silent for as long as its request takes. The create body has its own time limit,
//! applied by the handler that reads it (`--body-timeout`, 408).
//!
//! At most `max_connections` connections are served at once, a number kept below the process's open-file limit
//! so that the store and the upstream calls always find a file descriptor. A connection accepted at the cap takes
//! the place of the connection that has been idle the longest (one with no request in progress: a half-sent head
//! or a kept-alive connection): a flood of idle sockets is shed to serve the next real request instead of
//! starving it. When every connection is busy, the accept loop waits for one to end (and closes the newcomer if
//! none ends within a second). Accept errors (out of file descriptors, say) back off instead of spinning.

use super::cores::{Cores, Home};
use axum::Router;
use axum::body::Body;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tower_service::Service;

// The connection-level limits (see the module comment), set by `--header-timeout`, `--idle-timeout` and
// `--max-connections`: defined with the settings, which do not depend on this layer.
pub use crate::settings::ServerLimits;

/// How long a connection accepted while every slot is busy waits for one before it is closed.
const ADMIT_WAIT: Duration = Duration::from_secs(1);
/// Pause after an accept error that is not about one connection (out of file descriptors or memory).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// HTTP/2 pings find a peer that vanished under a silent event stream.
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// "No byte read since the connection went idle."
const NONE: u64 = u64::MAX;

/// Serves `router` on `listener` until `closing` is cancelled; then stops accepting, lets every connection finish
/// the response it is sending (an idle one closes at once) and returns when all have ended. Dropping the future
/// aborts the connections still open.
pub async fn serve(listener: TcpListener, router: Router, limits: ServerLimits, closing: CancellationToken) {
    let mut h2 = auto::Builder::new(TokioExecutor::new()).http2_only();
    h2.http2().timer(TokioTimer::new()).keep_alive_interval(Some(H2_PING_INTERVAL)).keep_alive_timeout(H2_PING_TIMEOUT);
    let builders = Arc::new(Builders { h1: auto::Builder::new(TokioExecutor::new()).http1_only(), h2 });
    let registry = Arc::new(Registry::new(limits.max_connections));
    let mut connections = JoinSet::new();
    let shared = Handle::current();
    let cores = match Cores::for_current_runtime() {
        Ok(cores) => Some(cores),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the connection threads; serving on the shared runtime");
            None
        }
    };
    let mut last_warning: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            biased;
            () = closing.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let tcp = match accepted {
            Ok((tcp, _peer)) => tcp,
            Err(e) if is_about_one_connection(&e) => continue,
            Err(e) => {
                if last_warning.is_none_or(|at| at.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!(error = %e, "cannot accept connections; shedding an idle one and retrying");
                    last_warning = Some(Instant::now());
                }
                registry.shed_one();
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        // Events are small writes that must leave at once: without TCP_NODELAY, Nagle's algorithm can hold one
        // back until the previous write is acknowledged.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY on a connection");
        }
        let Some(tcp) = unregistered(tcp) else { continue };
        let Some(slot) = registry.admit().await else {
            tracing::debug!("every connection is busy; closing a new one");
            continue;
        };
        let (builders, router, limits, closing) = (builders.clone(), router.clone(), limits.clone(), closing.clone());
        match &cores {
            Some(cores) => {
                let placed = cores.place();
                let handle = placed.handle.clone();
                let home = Home::Core { shared: shared.clone(), _placed: placed };
                connections.spawn_on(connection(builders, tcp, router, slot, limits, closing, home), &handle)
            }
            None => connections.spawn(connection(builders, tcp, router, slot, limits, closing, Home::Shared)),
        };
    }
    while connections.join_next().await.is_some() {}
}

/// Errors of `accept` that concern only the connection being accepted; the next accept may succeed at once.
fn is_about_one_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock)
}

/// One builder per protocol: the protocol is told from the first bytes ([`speaks_http2`]) before a builder gets
/// the socket. (hyper-util's own detection reads the first 24 bytes itself and hands them back to hyper's HTTP/1.1
/// reader, whose 8 KiB read buffer then grows to 16 KiB for every connection.)
struct Builders {
    h1: auto::Builder<TokioExecutor>,
    h2: auto::Builder<TokioExecutor>,
}

/// What an HTTP/2 client with prior knowledge sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How often the first bytes are looked at again while they are a strict prefix of [`H2_PREFACE`].
const PREFACE_RECHECK: Duration = Duration::from_millis(10);

/// Whether the connection starts with the HTTP/2 preface, seen without consuming it (`peek`). Anything else, an
/// end of stream or an error is left to the HTTP/1.1 reader, which answers or closes as it always did. The
/// caller bounds the wait (the header timeout).
async fn speaks_http2(tcp: &TcpStream) -> bool {
    let mut first = [0u8; H2_PREFACE.len()];
    loop {
        let n = match tcp.peek(&mut first).await {
            Ok(n) => n,
            Err(_) => return false,
        };
        if n == 0 || first[..n] != H2_PREFACE[..n] {
            return false;
        }
        if n == H2_PREFACE.len() {
            return true;
        }
        // A strict prefix of the preface: the same bytes would be peeked again at once, so wait for the rest.
        tokio::time::sleep(PREFACE_RECHECK).await;
    }
}

/// The socket taken off the runtime that accepted it, for the one that will serve it.
fn unregistered(tcp: TcpStream) -> Option<std::net::TcpStream> {
    tcp.into_std().map_err(|e| tracing::debug!(error = %e, "could not hand a connection over")).ok()
}

/// Serves one connection under its watchdog, once its protocol is known.
async fn connection(
    builders: Arc<Builders>,
    tcp: std::net::TcpStream,
    router: Router,
    slot: Slot,
    limits: ServerLimits,
    closing: CancellationToken,
    home: Home,
) {
    let Ok(tcp) = TcpStream::from_std(tcp).map_err(|e| tracing::debug!(error = %e, "could not take a connection"))
    else {
        return;
    };
    let state = slot.state.clone();
    // Nothing is in progress until the protocol is known: the first head's clock (from the accept), a shed or a
    // shutdown end the connection as they would end one that sent half a head.
    let http2 = tokio::select! {
        http2 = speaks_http2(&tcp) => http2,
        () = sleep_until(state.deadline(&limits)) => {
            tracing::debug!("closing a connection that sent no complete request in time");
            return;
        }
        () = state.shed.cancelled() => return,
        () = closing.cancelled() => return,
    };
    let _home = match home {
        // Its requests are the shared runtime's to spread over the cores (see `cores.rs`).
        Home::Core { shared, _placed: placed } if http2 => {
            drop(placed);
            let Some(tcp) = unregistered(tcp) else { return };
            let moved = shared.spawn(async move {
                if let Ok(tcp) = TcpStream::from_std(tcp) {
                    serve_http(&builders, tcp, true, router, slot, limits, closing).await;
                }
            });
            // Aborted with this task (the server's end).
            let _ = AbortOnDropHandle::new(moved).await;
            return;
        }
        home => home,
    };
    serve_http(&builders, tcp, http2, router, slot, limits, closing).await;
}

/// Serves the connection's requests in `http2` or HTTP/1.1 until it ends, sheds or the server closes.
async fn serve_http(
    builders: &Builders,
    tcp: TcpStream,
    http2: bool,
    router: Router,
    slot: Slot,
    limits: ServerLimits,
    closing: CancellationToken,
) {
    let state = slot.state.clone();
    let builder = if http2 { &builders.h2 } else { &builders.h1 };
    let io = TokioIo::new(Watched { inner: tcp, state: state.clone() });
    let service_state = state.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        if request.version() == hyper::Version::HTTP_2 {
            service_state.http2.store(true, Ordering::Relaxed);
        }
        let guard = Busy::begin(service_state.clone());
        let mut router = router.clone();
        async move {
            let response = router.call(request.map(Body::new)).await?;
            Ok::<_, std::convert::Infallible>(response.map(|body| Tracked { body, _guard: guard }))
        }
    });
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut graceful = false;
    loop {
        let deadline = state.deadline(&limits);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                break;
            }
            () = state.changed.notified() => {}
            () = sleep_until(deadline) => {
                if state.deadline(&limits).is_some_and(|d| d <= Instant::now()) {
                    tracing::debug!("closing a connection that sent no complete request in time");
                    break;
                }
            }
            () = state.shed.cancelled() => {
                tracing::debug!("shedding an idle connection to make room");
                break;
            }
            () = closing.cancelled(), if !graceful => {
                conn.as_mut().graceful_shutdown();
                graceful = true;
            }
        }
    }
    drop(slot);
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What the watchdog knows about one connection. Times are milliseconds since `opened`.
struct ConnState {
    opened: Instant,
    /// Requests in progress (HTTP/2 may have many).
    busy: AtomicUsize,
    /// HTTP/2 was spoken: bytes arriving while idle are control frames (pings, window updates), not the start of
    /// a request head, so only the idle timeout applies.
    http2: AtomicBool,
    /// When the last request in progress ended (or the connection opened).
    idle_since: AtomicU64,
    /// When the first byte arrived after `idle_since`, or [`NONE`]. Starts at 0: the clock of the first request
    /// head runs from the accept.
    first_byte: AtomicU64,
    /// Wakes the watchdog when its deadline may have moved earlier.
    changed: Notify,
    /// Cancelled to close this connection to make room for a new one.
    shed: CancellationToken,
}

impl ConnState {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            busy: AtomicUsize::new(0),
            http2: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            first_byte: AtomicU64::new(0),
            changed: Notify::new(),
            shed: CancellationToken::new(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    fn is_idle(&self) -> bool {
        self.busy.load(Ordering::Acquire) == 0
    }

    /// When the watchdog closes this connection if nothing changes; `None` while a request is in progress.
    fn deadline(&self, limits: &ServerLimits) -> Option<Instant> {
        if !self.is_idle() {
            return None;
        }
        let at = |millis: u64, limit: Duration| self.opened + Duration::from_millis(millis) + limit;
        match self.first_byte.load(Ordering::Acquire) {
            NONE => Some(at(self.idle_since.load(Ordering::Acquire), limits.idle_timeout)),
            first => Some(at(first, limits.header_timeout)),
        }
    }

    /// Bytes arrived: if the connection was idle and waiting, the head's clock starts now.
    fn on_read(&self) {
        if self.is_idle()
            && !self.http2.load(Ordering::Relaxed)
            && self.first_byte.load(Ordering::Relaxed) == NONE
            && self.first_byte.compare_exchange(NONE, self.now(), Ordering::AcqRel, Ordering::Relaxed).is_ok()
        {
            self.changed.notify_one();
        }
    }
}

/// Marks a request in progress until dropped (with the response body, or with the handler if it never answered).
struct Busy(Arc<ConnState>);

impl Busy {
    fn begin(state: Arc<ConnState>) -> Self {
        state.busy.fetch_add(1, Ordering::AcqRel);
        Self(state)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let state = &self.0;
        if state.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            state.idle_since.store(state.now(), Ordering::Release);
            state.first_byte.store(NONE, Ordering::Release);
            state.changed.notify_one();
        }
    }
}

/// A response body that keeps its request marked in progress until it is sent (or dropped).
struct Tracked {
    body: Body,
    _guard: Busy,
}

impl hyper::body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The socket, telling the watchdog when bytes arrive.
struct Watched {
    inner: TcpStream,
    state: Arc<ConnState>,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.on_read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The open connections, in the order they were accepted.
struct Registry {
    cap: usize,
    next_id: AtomicU64,
    open: Mutex<BTreeMap<u64, Arc<ConnState>>>,
    /// A connection ended: a slot may be free.
    freed: Notify,
}

/// A connection's place in the registry; freed on drop.
struct Slot {
    registry: Arc<Registry>,
    id: u64,
    state: Arc<ConnState>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.registry.open.lock().remove(&self.id);
        self.registry.freed.notify_one();
    }
}

impl Registry {
    fn new(cap: usize) -> Self {
        Self { cap: cap.max(1), next_id: AtomicU64::new(0), open: Mutex::new(BTreeMap::new()), freed: Notify::new() }
    }

    /// A slot for a new connection: a free one, else the slot of the connection idle the longest (shed), else the
    /// first one freed within [`ADMIT_WAIT`].
    async fn admit(self: &Arc<Self>) -> Option<Slot> {
        let deadline = Instant::now() + ADMIT_WAIT;
        loop {
            {
                let mut open = self.open.lock();
                if open.len() < self.cap {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    let state = Arc::new(ConnState::new());
                    open.insert(id, state.clone());
                    return Some(Slot { registry: self.clone(), id, state });
                }
                Self::shed_oldest_idle(&open);
            }
            if tokio::time::timeout_at(deadline, self.freed.notified()).await.is_err() {
                return None;
            }
        }
    }

    /// Sheds the connection idle the longest, to free a file descriptor or a slot.
    fn shed_one(&self) {
        Self::shed_oldest_idle(&self.open.lock());
    }

    /// Unless a shed connection is still closing (its slot is about to be freed), sheds the oldest idle one.
    fn shed_oldest_idle(open: &BTreeMap<u64, Arc<ConnState>>) {
        if open.values().any(|c| c.shed.is_cancelled()) {
            return;
        }
        let idle_from = |c: &ConnState| c.opened + Duration::from_millis(c.idle_since.load(Ordering::Acquire));
        if let Some(victim) = open.values().filter(|c| c.is_idle()).min_by_key(|c| idle_from(c)) {
            victim.shed.cancel();
        }
    }
}
