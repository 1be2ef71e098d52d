//! Batches writes to the store: chunks are written as they arrive, grouped into one transaction per flush.
//!
//! A batch is flushed when the flush interval since its first write has passed, when it is full, or at once
//! when a caller is waiting on it (a create, whose answer waits for it). Writes that arrive while a batch commits
//! form the next one, so a busy server commits many requests per transaction (group commit).

use crate::store::{Store, StoreError, WriteOp};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

const MAX_BATCH: usize = 4096;

struct Cmd {
    op: Option<WriteOp>,
    ack: Option<Ack>,
    /// Flush at once rather than at the end of the interval.
    urgent: bool,
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
        if self.tx.send(Cmd { op: Some(op), ack: None, urgent: false }).await.is_err() {
            tracing::error!("a write was queued after the persister stopped");
        }
    }

    /// Queues a write, flushes at once, and waits until it is durable.
    pub async fn commit(&self, op: WriteOp) -> Result<(), StoreError> {
        self.send_with_ack(Some(op), true).await
    }

    /// Queues a write and waits until it is durable, which is at the next regular flush: for a caller that must
    /// know the write is stored but need not hurry it (and so shares a transaction with others).
    pub async fn push_durable(&self, op: WriteOp) -> Result<(), StoreError> {
        self.send_with_ack(Some(op), false).await
    }

    /// Waits until everything queued before now is durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.send_with_ack(None, true).await
    }

    async fn send_with_ack(&self, op: Option<WriteOp>, urgent: bool) -> Result<(), StoreError> {
        let (ack, done) = oneshot::channel();
        self.tx.send(Cmd { op, ack: Some(ack), urgent }).await.map_err(|_| StoreError::Closed)?;
        done.await.map_err(|_| StoreError::Closed)?
    }
}

type Ack = oneshot::Sender<Result<(), StoreError>>;

/// Adds a command to the batch; whether it asks for an immediate flush.
fn take(cmd: Cmd, ops: &mut Vec<WriteOp>, acks: &mut Vec<Ack>) -> bool {
    ops.extend(cmd.op);
    acks.extend(cmd.ack);
    cmd.urgent
}

async fn run(store: Arc<dyn Store>, interval: Duration, mut rx: mpsc::Receiver<Cmd>) {
    let mut ops = Vec::new();
    let mut acks = Vec::new();
    while let Some(first) = rx.recv().await {
        let deadline = Instant::now() + interval;
        let mut urgent = take(first, &mut ops, &mut acks);
        while !urgent && ops.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(cmd)) => urgent |= take(cmd, &mut ops, &mut acks),
                Ok(None) | Err(_) => break,
            }
        }
        while ops.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(cmd) => {
                    take(cmd, &mut ops, &mut acks);
                }
                Err(_) => break,
            }
        }
        let result = write_with_retry(&*store, std::mem::take(&mut ops).into()).await;
        for ack in acks.drain(..) {
            let _ = ack.send(result.as_ref().map(|_| ()).map_err(|e| StoreError::Database(e.to_string())));
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
