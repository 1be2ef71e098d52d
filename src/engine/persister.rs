//! Batches writes to the store, and sends creates' inserts ahead of them.
//!
//! - **Creates** (`commit_soon`): the create answer waits for its insert, so it goes to the store at once, not
//!   through the batching task, with [`Store::write_urgent`]: the SQLite store commits waiting inserts together
//!   (group commit) ahead of other writes, and lets them in between the writes of a long batch.
//! - **Everything else** (`push`, `push_durable`): chunks, raw pieces, progress and final statuses are written at
//!   most one flush interval after they arrive, in slices of at most [`SLICE`] writes.
//!
//! Jumping the queue is safe: a request's other writes are only ever queued after its insert was acknowledged
//! (its upstream call starts at once, but its worker waits for the insert's [`Receipt`] before it writes).
//!
//! A failing store loses nothing that was accepted. A bulk slice that fails stays at the head of its lane and is
//! tried again with a growing delay (at most [`MAX_BACKOFF`]) for as long as the store fails; meanwhile the store
//! counts as unhealthy ([`Persister::healthy`]: `/healthz` answers 503 and creates are refused), and a create's
//! insert is tried a few times and then refused, so that callers hear of it at once instead of waiting. Only a
//! write that fails while the others of its slice succeed, written one by one, is given up (it can never be
//! stored), loudly.
//!
//! Through a database outage the writes wait here, in memory: [`Persister::held_bytes`] says how much they hold
//! (the engine bounds it, see `engine::outage`), and while the store fails the queue is drained into the lanes as
//! writes arrive, so that a worker never waits on a full queue. [`Persister::retry_now`] cuts the backoff short
//! when the store is seen to answer again.

use crate::store::{Store, StoreError, WriteOp};
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Writes per transaction in the bulk lane.
const SLICE: usize = 1024;

/// The longest wait between two tries of a slice the store refused.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How often an idle persister tries a store whose last write failed.
const PROBE_EVERY: Duration = Duration::from_millis(500);

/// Failed tries of a slice before its writes are tried one by one to find one that can never be stored.
const TRIES_BEFORE_SPLIT: u32 = 3;

type Ack = oneshot::Sender<Result<(), StoreError>>;

enum Cmd {
    /// A bulk write, acknowledged once durable when `ack` is given.
    Bulk(WriteOp, Option<Ack>),
    /// Write the whole bulk lane now; acknowledge when it is durable.
    Flush(Ack),
}

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
    pub fn commit_soon(&self, op: WriteOp) -> Receipt {
        let (store, healthy, wake) = (self.store.clone(), self.healthy.clone(), self.wake.clone());
        let write = async move {
            let result = write_urgent(&*store, Arc::from([op])).await;
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

/// What is waiting to be written.
#[derive(Default)]
struct Lanes {
    /// A deque: slices leave from the front of a backlog that may hold many thousands of writes.
    bulk: std::collections::VecDeque<WriteOp>,
    /// Each ack with the number of bulk writes that must be durable before it is sent.
    bulk_acks: Vec<(usize, Ack)>,
    /// When the oldest bulk write arrived.
    bulk_since: Option<Instant>,
    flush_now: bool,
    /// The slice being written, taken off the front of `bulk` (acks count it as bulk's first writes); it stays
    /// here while the store refuses it.
    head: Option<Arc<[WriteOp]>>,
    /// Consecutive failed tries of the head slice, and when to try it again.
    failures: u32,
    retry_at: Option<Instant>,
}

impl Lanes {
    fn take(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Bulk(op, ack) => {
                self.bulk_since.get_or_insert_with(Instant::now);
                self.bulk.push_back(op);
                if let Some(ack) = ack {
                    self.bulk_acks.push((self.queued(), ack));
                }
            }
            Cmd::Flush(ack) => {
                self.bulk_acks.push((self.queued(), ack));
                self.flush_now = true;
            }
        }
    }

    fn bulk_due(&self, interval: Duration) -> bool {
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return false;
        }
        self.flush_now
            || self.head.is_some()
            || self.bulk.len() >= SLICE
            || self.bulk_since.is_some_and(|since| since.elapsed() >= interval)
            || (self.bulk.is_empty() && !self.bulk_acks.is_empty())
    }

    fn is_empty(&self) -> bool {
        self.head.is_none() && self.bulk.is_empty() && self.bulk_acks.is_empty()
    }

    /// Bulk writes not yet durable, the head slice included.
    fn queued(&self) -> usize {
        self.head.as_ref().map_or(0, |h| h.len()) + self.bulk.len()
    }

    /// When the bulk lane comes due if nothing arrives: the flush deadline, or the retry time after a failure.
    fn next_due(&self, interval: Duration) -> Option<Instant> {
        match (self.retry_at, self.bulk_since) {
            (Some(at), _) => Some(at),
            (None, Some(since)) => Some(since + interval),
            (None, None) => None,
        }
    }
}

fn answer(acks: impl IntoIterator<Item = Ack>, result: &Result<(), StoreError>) {
    for ack in acks {
        let _ = ack.send(result.clone());
    }
}

/// What ended the wait for work.
enum Woke {
    Cmd(Cmd),
    /// The queue is closed: every handle is gone.
    Closed,
    /// The bulk lane's deadline passed, a flush was asked for, or the store's health is to be looked at again.
    Due,
}

/// The persister's state that its handles see too.
struct Handles {
    healthy: Arc<AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
    held: Arc<AtomicUsize>,
    retry_soon: Arc<AtomicBool>,
}

async fn run(store: Arc<dyn Store>, interval: Duration, mut rx: mpsc::Receiver<Cmd>, handles: Handles) {
    let Handles { healthy, wake, held, retry_soon } = handles;
    let mut lanes = Lanes::default();
    let mut open = true;
    while open || !lanes.is_empty() {
        crate::metrics::store_queue(lanes.queued() + rx.len());
        crate::metrics::store_held_bytes(held.load(Ordering::Relaxed));
        if retry_soon.swap(false, Ordering::SeqCst) {
            lanes.retry_at = None;
        }
        // Wait for work, or for the bulk lane to come due.
        if open && !lanes.bulk_due(interval) {
            let woke = match lanes.next_due(interval) {
                // Idle after a failed write (a create's insert, say): nothing else would find out that the store
                // is back, and creates are refused meanwhile, so try it with an empty transaction now and then.
                None if lanes.is_empty() && !healthy.load(Ordering::SeqCst) => {
                    match tokio::time::timeout(PROBE_EVERY, rx.recv()).await {
                        Ok(Some(cmd)) => Woke::Cmd(cmd),
                        Ok(None) => Woke::Closed,
                        Err(_) => {
                            let probe = store.write(Arc::from([])).await;
                            healthy.store(probe.is_ok(), Ordering::SeqCst);
                            continue;
                        }
                    }
                }
                None if lanes.is_empty() => tokio::select! {
                    cmd = rx.recv() => cmd.map_or(Woke::Closed, Woke::Cmd),
                    _ = wake.notified() => Woke::Due,
                },
                // The store failed: writes wait for the retry, and what arrives meanwhile is taken into the lanes, so
                // that the queue never fills up and blocks the workers through a long outage.
                Some(due) if lanes.retry_at.is_some() => tokio::select! {
                    _ = tokio::time::sleep_until(due) => Woke::Due,
                    _ = wake.notified() => Woke::Due,
                    cmd = rx.recv() => cmd.map_or(Woke::Closed, Woke::Cmd),
                },
                // Writes are waiting for the deadline: sleep until then (what arrives meanwhile waits in the queue).
                Some(due) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due) => {}
                        _ = wake.notified() => {}
                    }
                    Woke::Due
                }
                None => Woke::Due,
            };
            match woke {
                Woke::Cmd(cmd) => lanes.take(cmd),
                Woke::Closed => open = false,
                Woke::Due => {}
            }
        }
        loop {
            match rx.try_recv() {
                Ok(cmd) => lanes.take(cmd),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        if !open {
            lanes.flush_now = true;
        }

        if retry_soon.swap(false, Ordering::SeqCst) {
            lanes.retry_at = None;
        }
        if lanes.bulk_due(interval) {
            write_head_slice(&*store, &mut lanes, &healthy, &held).await;
        } else if !open && lanes.retry_at.is_some() {
            // Closing with a store that fails: wait for the next try rather than spin.
            if let Some(at) = lanes.retry_at {
                tokio::time::sleep_until(at).await;
            }
        }
    }
}

/// Tries the head slice of the bulk lane once. On success its writes leave the lane and their acks are sent; on
/// failure it stays for a later try, unless splitting it finds writes that can never be stored.
async fn write_head_slice(store: &dyn Store, lanes: &mut Lanes, healthy: &AtomicBool, held: &AtomicUsize) {
    let ops = match lanes.head.take() {
        Some(head) => head,
        None => {
            let n = lanes.bulk.len().min(SLICE);
            lanes.bulk.drain(..n).collect::<Vec<_>>().into()
        }
    };
    let n = ops.len();
    if n == 0 {
        let result = Ok(());
        answer(lanes.bulk_acks.drain(..).map(|(_, ack)| ack), &result);
        lanes.bulk_since = None;
        lanes.flush_now = false;
        return;
    }
    let result = match crate::metrics::store_write("bulk", n, store.write(ops.clone())).await {
        Ok(()) => Ok(()),
        Err(e) => {
            lanes.failures += 1;
            healthy.store(false, Ordering::SeqCst);
            if lanes.failures < TRIES_BEFORE_SPLIT || ops.len() == 1 {
                tracing::error!(error = %e, writes = n, tries = lanes.failures, "writing to the store failed; keeping the writes and retrying");
                lanes.retry_at = Some(Instant::now() + backoff(lanes.failures));
                lanes.head = Some(ops);
                return;
            }
            match write_one_by_one(store, &ops).await {
                // Nothing went in: the store itself fails. Keep everything and try again later.
                None => {
                    tracing::error!(error = %e, writes = n, tries = lanes.failures, "the store refuses every write; keeping the writes and retrying");
                    lanes.retry_at = Some(Instant::now() + backoff(lanes.failures));
                    lanes.head = Some(ops);
                    return;
                }
                Some(outcome) => outcome,
            }
        }
    };
    healthy.store(true, Ordering::SeqCst);
    held.fetch_sub(ops.iter().map(WriteOp::held_bytes).sum(), Ordering::Relaxed);
    lanes.failures = 0;
    lanes.retry_at = None;
    let (done, waiting): (Vec<_>, Vec<_>) = lanes.bulk_acks.drain(..).partition(|(upto, _)| *upto <= n);
    answer(done.into_iter().map(|(_, ack)| ack), &result);
    lanes.bulk_acks = waiting.into_iter().map(|(upto, ack)| (upto - n, ack)).collect();
    if lanes.bulk.is_empty() {
        lanes.bulk_since = None;
        lanes.flush_now = !lanes.bulk_acks.is_empty();
    }
}

/// Writes each op on its own. `None` when none could be written (the store is down); otherwise the writes that
/// failed while others succeeded can never be stored: they are given up, loudly.
async fn write_one_by_one(store: &dyn Store, ops: &[WriteOp]) -> Option<Result<(), StoreError>> {
    let mut failed = Vec::new();
    let mut written = 0usize;
    for op in ops {
        match store.write(Arc::from([op.clone()])).await {
            Ok(()) => written += 1,
            Err(e) => failed.push((op.clone(), e)),
        }
    }
    if written == 0 {
        return None;
    }
    let mut last = None;
    for (op, e) in failed {
        tracing::error!(error = %e, write = %describe(&op), "a write the store refuses while it accepts others is given up");
        last = Some(e);
    }
    Some(last.map_or(Ok(()), Err))
}

/// Names a write for the log, without its data.
fn describe(op: &WriteOp) -> String {
    match op {
        WriteOp::Insert(meta) => format!("insert of {}", meta.locator.id),
        WriteOp::Event { id, seq, .. } => format!("event {seq} of {id}"),
        WriteOp::Raw { id, seq, .. } => format!("raw piece {seq} of {id}"),
        WriteOp::Progress { id, .. } => format!("progress of {id}"),
        WriteOp::Finish { id, .. } => format!("final status of {id}"),
    }
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis(50).saturating_mul(1 << failures.min(10)).min(MAX_BACKOFF)
}

/// A create's insert: a few quick tries, then the failure goes back to the caller (who answers 503), so that
/// nobody waits on a store that is down.
async fn write_urgent(store: &dyn Store, ops: Arc<[WriteOp]>) -> Result<(), StoreError> {
    let mut delay = Duration::from_millis(20);
    let mut tries = 0;
    loop {
        tries += 1;
        match crate::metrics::store_write("create", ops.len(), store.write_urgent(ops.clone())).await {
            Ok(()) => return Ok(()),
            Err(e) if tries >= 3 => {
                tracing::error!(error = %e, writes = ops.len(), "could not store new requests; they are refused");
                return Err(e);
            }
            Err(e) => {
                tracing::warn!(error = %e, tries, "storing new requests failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 4;
            }
        }
    }
}
