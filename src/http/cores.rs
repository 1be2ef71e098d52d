//! The threads that serve HTTP/1.1 connections: one single-threaded runtime per worker thread of the shared
//! runtime, each connection served whole on one of them.
//!
//! On the shared (work-stealing) runtime the tasks of one call (the connection, the request's worker, its upstream
//! connection) ran on whichever thread was free, so each event of a call could wake the other thread: at 2,000
//! creates a second on 2 cores, 6.9 context switches per create against 2.2 on one thread, and a quarter more CPU
//! (BENCHMARKS.md, "Issue 21, tenth round"). A connection accepted here stays on one thread, and so does every
//! task it spawns (a request's worker, hyper's tasks) and the upstream connections they open (the upstream
//! client is per thread, see `Upstream::client`). Connections go to the thread with the fewest open ones.
//!
//! HTTP/2 connections are not kept here: one of them can carry every request of a busy proxy, which one thread
//! would then serve alone; they go back to the shared runtime once the protocol is known (see `server.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::runtime::{Builder, Handle};
use tokio_util::sync::CancellationToken;

/// The threads and their runtimes, which run until this is dropped (their tasks are then dropped with them).
pub(super) struct Cores {
    cores: Vec<Core>,
    /// Where the search for the least busy thread starts, so that ties rotate.
    turn: AtomicUsize,
    stop: CancellationToken,
}

struct Core {
    handle: Handle,
    open: Arc<AtomicUsize>,
}

/// A connection's place on a thread; counted there until dropped.
pub(super) struct Placed {
    pub(super) handle: Handle,
    _open: Open,
}

struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where a connection is served.
pub(super) enum Home {
    /// On the shared runtime.
    Shared,
    /// On a connection thread; an HTTP/2 connection moves to the `shared` runtime.
    Core { shared: Handle, _placed: Placed },
}

impl Cores {
    /// Starts `n` threads (at least one), each running a single-threaded runtime.
    pub(super) fn start(n: usize) -> std::io::Result<Self> {
        let stop = CancellationToken::new();
        let mut cores = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            cores.push(Core { handle: runtime.handle().clone(), open: Arc::new(AtomicUsize::new(0)) });
            let stopped = stop.clone();
            let started = std::thread::Builder::new().name(format!("offload-http-{i}")).spawn(move || {
                runtime.block_on(stopped.cancelled());
            });
            if let Err(e) = started {
                // The threads already started end with this value.
                stop.cancel();
                return Err(e);
            }
        }
        Ok(Self { cores, turn: AtomicUsize::new(0), stop })
    }

    /// As many threads as the current (shared) runtime has workers: one per core, or `TOKIO_WORKER_THREADS`.
    pub(super) fn for_current_runtime() -> std::io::Result<Self> {
        Self::start(Handle::current().metrics().num_workers())
    }

    /// The thread for a new connection: the one with the fewest open connections.
    pub(super) fn place(&self) -> Placed {
        let n = self.cores.len();
        let first = self.turn.fetch_add(1, Ordering::Relaxed) % n;
        let mut best = &self.cores[first];
        for i in 1..n {
            let core = &self.cores[(first + i) % n];
            if core.open.load(Ordering::Relaxed) < best.open.load(Ordering::Relaxed) {
                best = core;
            }
        }
        best.open.fetch_add(1, Ordering::Relaxed);
        Placed { handle: best.handle.clone(), _open: Open(best.open.clone()) }
    }
}

impl Drop for Cores {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_go_to_the_thread_with_the_fewest() {
        let cores = Cores::start(3).unwrap();
        let a = cores.place();
        let b = cores.place();
        let c = cores.place();
        let threads = |p: &Placed| p.handle.spawn(async { std::thread::current().name().map(str::to_owned) });
        let mut names = vec![threads(&a).await.unwrap(), threads(&b).await.unwrap(), threads(&c).await.unwrap()];
        names.sort();
        assert_eq!(
            names,
            [Some("offload-http-0".into()), Some("offload-http-1".into()), Some("offload-http-2".into())]
        );
        // The thread that lost its connection gets the next one, whichever turn it is.
        let freed = threads(&b).await.unwrap();
        drop(b);
        for _ in 0..3 {
            let next = cores.place();
            assert_eq!(threads(&next).await.unwrap(), freed);
        }
    }

    #[tokio::test]
    async fn the_threads_end_when_dropped() {
        let cores = Cores::start(2).unwrap();
        let placed = cores.place();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = placed.handle.spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await;
        });
        drop(cores);
        // The runtime dropped its task: the sender is gone and the task reports cancelled.
        assert!(rx.await.is_err());
        assert!(task.await.unwrap_err().is_cancelled());
    }
}
