//! Batches writes to the store in two lanes.
//!
//! - **Creates** (`commit`): the create answer waits for its insert, so pending inserts are committed at once,
//!   together (group commit), ahead of everything else.
//! - **Everything else** (`push`, `push_durable`): chunks, raw pieces, progress and final statuses are written at
//!   most one flush interval after they arrive, in slices of at most [`SLICE`] writes, so that a create never
//!   waits behind more than one slice.
//!
//! Jumping the queue is safe: a request's other writes are only ever queued after its insert was acknowledged.

use crate::store::{Store, StoreError, WriteOp};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Writes per transaction in the bulk lane.
const SLICE: usize = 1024;

type Ack = oneshot::Sender<Result<(), StoreError>>;

enum Cmd {
    /// A create's insert: written at once, ahead of the bulk lane.
    Urgent(WriteOp, Ack),
    /// A bulk write, acknowledged once durable when `ack` is given.
    Bulk(WriteOp, Option<Ack>),
    /// Write the whole bulk lane now; acknowledge when it is durable.
    Flush(Ack),
}

#[derive(Clone)]
pub struct Persister {
    tx: mpsc::Sender<Cmd>,
}

impl Persister {
    /// Starts the flushing task; it ends once every `Persister` handle is dropped and the queue is written.
    pub fn start(store: Arc<dyn Store>, interval: Duration) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(65_536);
        let task = tokio::spawn(run(store, interval, rx));
        (Self { tx }, task)
    }

    /// Queues a write; it is durable within the flush interval.
    pub async fn push(&self, op: WriteOp) {
        if self.tx.send(Cmd::Bulk(op, None)).await.is_err() {
            tracing::error!("a write was queued after the persister stopped");
        }
    }

    /// Writes at once (ahead of the bulk lane) and waits until it is durable: for a create's insert.
    pub async fn commit(&self, op: WriteOp) -> Result<(), StoreError> {
        let (ack, done) = oneshot::channel();
        self.send(Cmd::Urgent(op, ack), done).await
    }

    /// Queues a write and waits until it is durable, which is at the next regular flush: for a caller that must
    /// know the write is stored but need not hurry it (and so shares a transaction with others).
    pub async fn push_durable(&self, op: WriteOp) -> Result<(), StoreError> {
        let (ack, done) = oneshot::channel();
        self.send(Cmd::Bulk(op, Some(ack)), done).await
    }

    /// Waits until everything queued before now is durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (ack, done) = oneshot::channel();
        self.send(Cmd::Flush(ack), done).await
    }

    async fn send(&self, cmd: Cmd, done: oneshot::Receiver<Result<(), StoreError>>) -> Result<(), StoreError> {
        self.tx.send(cmd).await.map_err(|_| StoreError::Closed)?;
        done.await.map_err(|_| StoreError::Closed)?
    }
}

/// What is waiting to be written.
#[derive(Default)]
struct Lanes {
    urgent: Vec<WriteOp>,
    urgent_acks: Vec<Ack>,
    bulk: Vec<WriteOp>,
    /// Each ack with the number of bulk writes that must be durable before it is sent.
    bulk_acks: Vec<(usize, Ack)>,
    /// When the oldest bulk write arrived.
    bulk_since: Option<Instant>,
    flush_now: bool,
}

impl Lanes {
    fn take(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Urgent(op, ack) => {
                self.urgent.push(op);
                self.urgent_acks.push(ack);
            }
            Cmd::Bulk(op, ack) => {
                self.bulk_since.get_or_insert_with(Instant::now);
                self.bulk.push(op);
                if let Some(ack) = ack {
                    self.bulk_acks.push((self.bulk.len(), ack));
                }
            }
            Cmd::Flush(ack) => {
                self.bulk_acks.push((self.bulk.len(), ack));
                self.flush_now = true;
            }
        }
    }

    fn bulk_due(&self, interval: Duration) -> bool {
        self.flush_now
            || self.bulk.len() >= SLICE
            || self.bulk_since.is_some_and(|since| since.elapsed() >= interval)
            || (self.bulk.is_empty() && !self.bulk_acks.is_empty())
    }

    fn is_empty(&self) -> bool {
        self.urgent.is_empty() && self.bulk.is_empty() && self.bulk_acks.is_empty()
    }
}

fn answer(acks: impl IntoIterator<Item = Ack>, result: &Result<(), StoreError>) {
    for ack in acks {
        let _ = ack.send(result.as_ref().map(|_| ()).map_err(|e| StoreError::Database(e.to_string())));
    }
}

async fn run(store: Arc<dyn Store>, interval: Duration, mut rx: mpsc::Receiver<Cmd>) {
    let mut lanes = Lanes::default();
    let mut open = true;
    while open || !lanes.is_empty() {
        // Wait for work, or for the bulk lane to come due.
        if open && lanes.urgent.is_empty() && !lanes.bulk_due(interval) {
            let next = match lanes.bulk_since {
                None if lanes.is_empty() => rx.recv().await.ok_or(()),
                Some(since) => match tokio::time::timeout_at(since + interval, rx.recv()).await {
                    Ok(cmd) => cmd.ok_or(()),
                    Err(_) => Err(()),
                },
                None => Err(()),
            };
            match next {
                Ok(cmd) => lanes.take(cmd),
                Err(()) if lanes.bulk_since.is_none() && lanes.is_empty() => open = false,
                Err(()) => {}
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

        if !lanes.urgent.is_empty() {
            let ops: Arc<[WriteOp]> = std::mem::take(&mut lanes.urgent).into();
            let result = write_with_retry(&*store, ops).await;
            answer(std::mem::take(&mut lanes.urgent_acks), &result);
            continue;
        }
        if lanes.bulk_due(interval) {
            let n = lanes.bulk.len().min(SLICE);
            let ops: Arc<[WriteOp]> = lanes.bulk.drain(..n).collect::<Vec<_>>().into();
            let result = write_with_retry(&*store, ops).await;
            let (done, waiting): (Vec<_>, Vec<_>) = lanes.bulk_acks.drain(..).partition(|(upto, _)| *upto <= n);
            answer(done.into_iter().map(|(_, ack)| ack), &result);
            lanes.bulk_acks = waiting.into_iter().map(|(upto, ack)| (upto - n, ack)).collect();
            if lanes.bulk.is_empty() {
                lanes.bulk_since = None;
                lanes.flush_now = !lanes.bulk_acks.is_empty();
            }
        }
    }
}

/// A failed batch is retried a few times (a busy or briefly full disk). If it still fails, its writes are tried
/// one by one, so that one bad write costs only itself and not the other requests of the batch.
async fn write_with_retry(store: &dyn Store, ops: Arc<[WriteOp]>) -> Result<(), StoreError> {
    if ops.is_empty() {
        return Ok(());
    }
    let mut delay = Duration::from_millis(20);
    for attempt in 1..=4 {
        match store.write(ops.clone()).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, attempt, writes = ops.len(), "writing to the store failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 4;
            }
        }
    }
    let mut last_error = None;
    for op in ops.iter() {
        if let Err(e) = store.write(Arc::from([op.clone()])).await {
            tracing::error!(error = %e, "a write could not be stored and is lost");
            last_error = Some(e);
        }
    }
    last_error.map_or(Ok(()), Err)
}
