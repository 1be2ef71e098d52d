//! The persister's task: the bulk lane of writes waiting for their flush, written a slice at a time, kept and
//! retried with a growing delay while the store fails.

use crate::backoff::Backoff;
use crate::store::{Store, StoreError, WriteOp};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Writes per transaction in the bulk lane.
pub(super) const SLICE: usize = 1024;

/// The longest wait between two tries of a slice the store refused.
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How often an idle persister tries a store whose last write failed.
const PROBE_EVERY: Duration = Duration::from_millis(500);

/// Failed tries of a slice before its writes are tried one by one to find one that can never be stored.
const TRIES_BEFORE_SPLIT: u32 = 3;

/// For how many flush intervals after its last write to the store an emptied persister keeps looking at its queue
/// once per interval (a timer it sets itself) rather than sleeping until a write wakes it. Under a steady flow of
/// calls, the first write after each flush would otherwise wake this thread from the call's own path, in the middle
/// of the call (BENCHMARKS.md, "Issue 21, fifth round"); a server that goes idle makes at most this many idle ticks
/// and then sleeps until woken.
const TICK_FOR: u32 = 4;

/// The shortest flush interval ticked at: below it, a tick would cost more than the wake it saves.
const TICK_MIN: Duration = Duration::from_millis(5);

pub(super) type Ack = oneshot::Sender<Result<(), StoreError>>;

pub(super) enum Cmd {
    /// A bulk write, acknowledged once durable when `ack` is given.
    Bulk(WriteOp, Option<Ack>),
    /// Write the whole bulk lane now; acknowledge when it is durable.
    Flush(Ack),
}

/// The waits between tries of a slice the store refused: from 0.1 s, doubling, up to [`MAX_BACKOFF`].
const RETRIES: Backoff = Backoff::new(Duration::from_millis(100), MAX_BACKOFF);

/// What is waiting to be written.
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
    retries: Backoff,
    retry_at: Option<Instant>,
    /// When a write to the store last left the bulk lane empty.
    emptied: Option<Instant>,
}

impl Lanes {
    fn new() -> Self {
        Self {
            bulk: Default::default(),
            bulk_acks: Vec::new(),
            bulk_since: None,
            flush_now: false,
            head: None,
            retries: RETRIES,
            retry_at: None,
            emptied: None,
        }
    }

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

    /// Whether an emptied lane looks at the queue on a timer rather than waiting to be woken: it was written lately.
    fn ticks(&self, interval: Duration) -> bool {
        interval >= TICK_MIN && self.emptied.is_some_and(|at| at.elapsed() < interval * TICK_FOR)
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
pub(super) struct Handles {
    pub(super) healthy: Arc<AtomicBool>,
    pub(super) wake: Arc<tokio::sync::Notify>,
    pub(super) held: Arc<AtomicUsize>,
    pub(super) retry_soon: Arc<AtomicBool>,
}

pub(super) async fn run(store: Arc<dyn Store>, interval: Duration, mut rx: mpsc::Receiver<Cmd>, handles: Handles) {
    let Handles { healthy, wake, held, retry_soon } = handles;
    let mut lanes = Lanes::new();
    let mut open = true;
    // When the tick that just ended began: the writes it finds waiting arrived after that.
    let mut ticked_from = None;
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
                // Writes came lately: look again in one interval, without being woken for the next one. Whatever
                // arrived meanwhile has waited at most that long and is written at once (`ticked_from`).
                None if lanes.is_empty() && rx.is_empty() && lanes.ticks(interval) => {
                    ticked_from = Some(Instant::now());
                    tokio::select! {
                        _ = tokio::time::sleep(interval) => {}
                        _ = wake.notified() => {}
                    }
                    Woke::Due
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
        if let Some(from) = ticked_from.take() {
            // The lane was empty when the tick began, so its writes all arrived since.
            lanes.bulk_since = lanes.bulk_since.map(|_| from);
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
            let wait = lanes.retries.next_delay();
            let tries = lanes.retries.failures();
            healthy.store(false, Ordering::SeqCst);
            if tries < TRIES_BEFORE_SPLIT || ops.len() == 1 {
                tracing::error!(error = %e, writes = n, tries, "writing to the store failed; keeping the writes and retrying");
                lanes.retry_at = Some(Instant::now() + wait);
                lanes.head = Some(ops);
                return;
            }
            match write_one_by_one(store, &ops).await {
                // Nothing went in: the store itself fails. Keep everything and try again later.
                None => {
                    tracing::error!(error = %e, writes = n, tries, "the store refuses every write; keeping the writes and retrying");
                    lanes.retry_at = Some(Instant::now() + wait);
                    lanes.head = Some(ops);
                    return;
                }
                Some(outcome) => outcome,
            }
        }
    };
    healthy.store(true, Ordering::SeqCst);
    held.fetch_sub(ops.iter().map(WriteOp::held_bytes).sum(), Ordering::Relaxed);
    lanes.retries.reset();
    lanes.retry_at = None;
    let (done, waiting): (Vec<_>, Vec<_>) = lanes.bulk_acks.drain(..).partition(|(upto, _)| *upto <= n);
    answer(done.into_iter().map(|(_, ack)| ack), &result);
    lanes.bulk_acks = waiting.into_iter().map(|(upto, ack)| (upto - n, ack)).collect();
    if lanes.bulk.is_empty() {
        lanes.bulk_since = None;
        lanes.flush_now = !lanes.bulk_acks.is_empty();
        lanes.emptied = Some(Instant::now());
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

#[cfg(test)]
mod tests {
    //! The persister's schedule, on a store that records when each write reached it (tokio's clock paused, so the
    //! times are exact).
    use super::*;
    use crate::domain::RequestId;
    use crate::store::{RawCursor, RawPage, StoredRequest};
    use async_trait::async_trait;
    use bytes::Bytes;
    use std::sync::Mutex;

    /// Records the time of every write; knows nothing else.
    #[derive(Default)]
    struct Clock(Mutex<Vec<(u64, Instant)>>);

    #[async_trait]
    impl Store for Clock {
        async fn write(&self, ops: Arc<[WriteOp]>) -> Result<(), StoreError> {
            let now = Instant::now();
            for op in ops.iter() {
                if let WriteOp::Event { seq, .. } = op {
                    self.0.lock().unwrap().push((*seq, now));
                }
            }
            Ok(())
        }
        async fn ping(&self, _: Duration) -> Result<(), StoreError> {
            Ok(())
        }
        async fn get(&self, _: RequestId) -> Result<Option<StoredRequest>, StoreError> {
            Err(StoreError::Closed)
        }
        async fn head(&self, _: RequestId) -> Result<Option<StoredRequest>, StoreError> {
            Err(StoreError::Closed)
        }
        async fn events(&self, _: RequestId, _: u64, _: usize) -> Result<Vec<(u64, String)>, StoreError> {
            Err(StoreError::Closed)
        }
        async fn raw_page(&self, _: RequestId, _: RawCursor, _: usize) -> Result<RawPage, StoreError> {
            Err(StoreError::Closed)
        }
        async fn delete(&self, _: RequestId) -> Result<bool, StoreError> {
            Err(StoreError::Closed)
        }
        async fn unfinished(&self) -> Result<Vec<StoredRequest>, StoreError> {
            Err(StoreError::Closed)
        }
        async fn orphans(&self) -> Result<Vec<StoredRequest>, StoreError> {
            Err(StoreError::Closed)
        }
        async fn purge_finished(&self, _: i64, _: usize) -> Result<usize, StoreError> {
            Err(StoreError::Closed)
        }
    }

    const INTERVAL: Duration = Duration::from_millis(50);

    /// Sends event `seq` and returns when it was sent.
    async fn send(tx: &mpsc::Sender<Cmd>, seq: u64) -> Instant {
        let op = WriteOp::Event { id: RequestId::generate(), seq, data: Bytes::from_static(b"{}") };
        tx.send(Cmd::Bulk(op, None)).await.unwrap();
        Instant::now()
    }

    #[tokio::test(start_paused = true)]
    async fn every_write_is_stored_within_one_interval_whether_the_persister_sleeps_or_ticks() {
        let store = Arc::new(Clock::default());
        let (tx, rx) = mpsc::channel(16);
        let handles = Handles {
            healthy: Arc::new(AtomicBool::new(true)),
            wake: Arc::new(tokio::sync::Notify::new()),
            held: Arc::new(AtomicUsize::new(0)),
            retry_soon: Arc::new(AtomicBool::new(false)),
        };
        let task = tokio::spawn(run(store.clone(), INTERVAL, rx, handles));
        let mut sent = Vec::new();
        // An idle persister, woken by the write.
        sent.push(send(&tx, 1).await);
        // Just after the first flush: the persister now ticks, and this write arrives in the middle of a tick.
        tokio::time::sleep(INTERVAL + INTERVAL / 5).await;
        sent.push(send(&tx, 2).await);
        // Long after: the persister sleeps again until woken.
        tokio::time::sleep(INTERVAL * TICK_FOR * 2).await;
        sent.push(send(&tx, 3).await);
        tokio::time::sleep(INTERVAL * 3).await;
        drop(tx);
        task.await.unwrap();
        let written = store.0.lock().unwrap().clone();
        assert_eq!(written.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), [1, 2, 3]);
        // The second write was found by the tick that was running when it came, not by a wake of its own (which
        // would have started a full interval's wait).
        assert!(written[1].1 - sent[1] < INTERVAL, "write 2 was not found by a tick");
        // The third came long after the persister stopped ticking: it woke the persister, and waited the interval.
        assert_eq!(written[2].1 - sent[2], INTERVAL, "write 3 was found by a tick: the idle persister kept ticking");
        for ((seq, at), sent) in written.into_iter().zip(sent) {
            let waited = at - sent;
            assert!(waited <= INTERVAL, "write {seq} waited {waited:?}, more than the flush interval");
        }
    }
}
