//! The persister: the one queue of writes to the store, the engine's handle on it.
//!
//! - **Creates** (`commit_soon`): the create answer waits for its insert, so it goes to the store at once, not
//!   through the batching task, with [`Store::write_urgent`]: a store that writes serially commits waiting
//!   inserts together (group commit) ahead of other writes, and lets them in between the writes of a long batch
//!   (the schedule of [`super::serial`]).
//! - **Everything else** (`push`, `push_durable`): chunks, raw pieces, progress and final statuses are written at
//!   most one flush interval after they arrive, in slices of at most [`SLICE`](super::lanes::SLICE) writes (the lanes of
//!   [`super::lanes`]).
//!
//! Jumping the queue is safe: a request's other writes are only ever queued after its insert was acknowledged
//! (its upstream call starts at once, but its worker waits for the insert's [`Receipt`] before it writes).
//!
//! A failing store loses nothing that was accepted. A bulk slice that fails stays at the head of its lane and is
//! tried again with a growing delay (at most [`MAX_BACKOFF`](super::lanes::MAX_BACKOFF)) for as long as the store fails; meanwhile the store
//! counts as unhealthy ([`Persister::healthy`]: `/healthz` answers 503 and creates are refused), and a create's
//! insert is tried a few times and then refused, so that callers hear of it at once instead of waiting. Only a
//! write that fails while the others of its slice succeed, written one by one, is given up (it can never be
//! stored), loudly.
//!
//! Through a database outage the writes wait here, in memory: [`Persister::held_bytes`] says how much they hold
//! (the engine bounds it, see `engine::outage`), and while the store fails the queue is drained into the lanes as
//! writes arrive, so that a worker never waits on a full queue. [`Persister::retry_now`] cuts the backoff short
//! when the store is seen to answer again.

use super::lanes::{Cmd, Handles, run};
use crate::backoff::Backoff;
use crate::store::{Store, StoreError, WriteOp};
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

#[derive(Clone)]
pub struct Persister {
    tx: mpsc::Sender<Cmd>,
    store: Arc<dyn Store>,
    /// False from a failed commit until the next successful one.
    healthy: Arc<AtomicBool>,
    /// Wakes the task: before the flush deadline (a flush asked for), or when idle (an insert failed: the
    /// store's health is to be probed). Writes queued while the bulk lane waits for
    /// its deadline do not wake it: the task sleeps until then, instead of being woken for every chunk.
    wake: Arc<tokio::sync::Notify>,
    /// Bytes held by bulk writes queued and not yet durable ([`WriteOp::held_bytes`]).
    held: Arc<AtomicUsize>,
    /// Set to try a failed slice again now rather than after its backoff.
    retry_soon: Arc<AtomicBool>,
}

impl Persister {
    /// Starts the flushing task; it ends once every `Persister` handle is dropped and the queue is written.
    ///
    /// The returned future ends with the task: `Err` says why it ended early (a panic). On a store that asks for
    /// it ([`Store::wants_own_thread`]) the task runs on a thread of its own: on the shared runtime, the wake-up
    /// after each commit comes from the store's thread and waits in the runtime's queue behind every task that is
    /// ready, and with 10,000 streams starting at once that was over half a second per batch while the store sat
    /// idle (BENCHMARKS.md, "Issue 10").
    pub fn start(store: Arc<dyn Store>, interval: Duration) -> (Self, BoxFuture<'static, Result<(), String>>) {
        let (tx, rx) = mpsc::channel(65_536);
        let healthy = Arc::new(AtomicBool::new(true));
        let wake = Arc::new(tokio::sync::Notify::new());
        let held = Arc::new(AtomicUsize::new(0));
        let retry_soon = Arc::new(AtomicBool::new(false));
        let handles = Handles {
            healthy: healthy.clone(),
            wake: wake.clone(),
            held: held.clone(),
            retry_soon: retry_soon.clone(),
        };
        let task = run(store.clone(), interval, rx, handles);
        let ended = if store.wants_own_thread() {
            let (finished, ended) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new().name("offload-persist".into()).spawn(move || {
                match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => {
                        runtime.block_on(task);
                        let _ = finished.send(());
                    }
                    Err(e) => tracing::error!(error = %e, "cannot start the persister's runtime"),
                }
            });
            async move {
                thread.map_err(|e| format!("cannot start the persister's thread: {e}"))?;
                ended.await.map_err(|_| "the persister's thread ended early (a panic)".to_owned())
            }
            .boxed()
        } else {
            let task = tokio::spawn(task);
            async move { task.await.map_err(|e| e.to_string()) }.boxed()
        };
        (Self { tx, store, healthy, wake, held, retry_soon }, ended)
    }

    /// Whether the last commit succeeded.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    /// Bytes held by writes waiting for the store.
    pub fn held_bytes(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Tries writes the store refused again now, instead of at the end of their backoff (the store answers again).
    pub fn retry_now(&self) {
        self.retry_soon.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Whether the flushing task still runs.
    pub fn running(&self) -> bool {
        !self.tx.is_closed()
    }

    /// Queues a write; it is durable within the flush interval.
    pub async fn push(&self, op: WriteOp) {
        self.held.fetch_add(op.held_bytes(), Ordering::Relaxed);
        if self.tx.send(Cmd::Bulk(op, None)).await.is_err() {
            tracing::error!("a write was queued after the persister stopped");
        }
    }

    /// Queues a write to be made at once (ahead of the bulk lane) and returns its receipt, which resolves once
    /// it is durable: for a create's insert, whose upstream call starts while the insert commits.
    pub fn commit_soon(&self, op: WriteOp, waited_for_alone: bool) -> Receipt {
        let (store, healthy, wake) = (self.store.clone(), self.healthy.clone(), self.wake.clone());
        let write = async move {
            let result = write_urgent(&*store, Arc::from([op]), waited_for_alone).await;
            healthy.store(result.is_ok(), Ordering::SeqCst);
            if result.is_err() {
                // An idle persister then looks at the store's health again, and probes it.
                wake.notify_one();
            }
            result
        };
        Receipt(write.boxed().shared())
    }

    /// Queues a write and waits until it is durable, which is at the next regular flush: for a caller that must
    /// know the write is stored but need not hurry it (and so shares a transaction with others).
    pub async fn push_durable(&self, op: WriteOp) -> Result<(), StoreError> {
        self.held.fetch_add(op.held_bytes(), Ordering::Relaxed);
        let (ack, done) = oneshot::channel();
        self.send(Cmd::Bulk(op, Some(ack)), done).await
    }

    /// Waits until everything queued before now is durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (ack, done) = oneshot::channel();
        self.tx.send(Cmd::Flush(ack)).await.map_err(|_| StoreError::Closed)?;
        self.wake.notify_one();
        done.await.map_err(|_| StoreError::Closed)?
    }

    async fn send(&self, cmd: Cmd, done: oneshot::Receiver<Result<(), StoreError>>) -> Result<(), StoreError> {
        self.tx.send(cmd).await.map_err(|_| StoreError::Closed)?;
        done.await.map_err(|_| StoreError::Closed)?
    }
}

/// The outcome of a write queued with [`Persister::commit_soon`]; every clone resolves to the same outcome, so the
/// create that answers the caller and the worker that must not store anything of a request never inserted can
/// both wait for it (either may be dropped first).
#[derive(Clone)]
pub struct Receipt(Shared<BoxFuture<'static, Result<(), StoreError>>>);

impl Receipt {
    /// Waits until the write is durable, or failed. The write is sent when the receipt is first awaited.
    pub async fn durable(&self) -> Result<(), StoreError> {
        self.0.clone().await
    }
}

/// A create's insert: a few quick tries, then the failure goes back to the caller (who answers 503), so that
/// nobody waits on a store that is down.
/// `waited_for_alone`: the insert is all its caller waits for ([`Store::write_urgent_here`]).
async fn write_urgent(store: &dyn Store, ops: Arc<[WriteOp]>, waited_for_alone: bool) -> Result<(), StoreError> {
    // Three tries within about 0.1 s.
    let mut backoff = Backoff::new(Duration::from_millis(30), Duration::from_millis(60));
    loop {
        let tries = backoff.failures() + 1;
        let write =
            if waited_for_alone { store.write_urgent_here(ops.clone()) } else { store.write_urgent(ops.clone()) };
        match crate::metrics::store_write("create", ops.len(), write).await {
            Ok(()) => return Ok(()),
            Err(e) if tries >= 3 => {
                tracing::error!(error = %e, writes = ops.len(), "could not store new requests; they are refused");
                return Err(e);
            }
            Err(e) => {
                tracing::warn!(error = %e, tries, "storing new requests failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}
