//! Who runs the write connection: the writer thread, which executes what the schedule hands it, and a create's
//! caller, who commits its own insert when the connection is free.
//!
//! A create's insert handed to the writer thread costs two thread hand-offs on the create's way to its answer
//! (waking the writer, and the writer waking the create's task once committed), each a chance to wait for a core.
//! When no job holds the connection, the caller takes it for the insert's commit instead (about 0.04 ms: in WAL
//! mode at `synchronous = NORMAL` a commit writes to the log without syncing the disk), so the create waits for
//! neither (measured in BENCHMARKS.md, "Issue 21, sixth round"). Anything in the way sends the insert to the
//! writer thread as before: a job holding the connection, every commit syncing the disk (`synchronous = FULL`),
//! a log that the next write would start over (a sync, see [`Checkpoints`]), or another process holding the
//! database's write lock (the attempt does not wait for it).

use super::{Writer, write};
use crate::store::pipeline::serial::Next;
use crate::store::{StoreError, WriteOp};
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// How long the write connection waits for another process's write lock before failing (SQLite's busy timeout).
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the write-ahead log may be due to start over: the first write after a checkpoint that copied every
/// frame starts the log over and syncs its header to disk, even at `synchronous = NORMAL`. That write must be the
/// writer thread's (see `checkpoint_loop`), never an insert committed on a runtime thread.
#[derive(Default)]
pub(super) struct Checkpoints {
    /// A checkpoint is running (set before it starts, cleared once `completed` counts it).
    running: AtomicBool,
    /// Checkpoints completed.
    completed: AtomicU64,
    /// `completed` as it was when the writer thread began its last write: every checkpoint up to it has had its
    /// log started over, if it was due, by that write.
    written_after: AtomicU64,
}

impl Checkpoints {
    /// Runs `checkpoint` with the log marked as possibly due to start over until a writer-thread write follows.
    pub(super) fn checkpoint<R>(&self, checkpoint: impl FnOnce() -> R) -> R {
        self.running.store(true, Ordering::SeqCst);
        let result = checkpoint();
        self.completed.fetch_add(1, Ordering::SeqCst);
        self.running.store(false, Ordering::SeqCst);
        result
    }

    /// Runs a write of the writer thread, which starts the log over if a checkpoint left it due.
    pub(super) fn writing<R>(&self, write: impl FnOnce() -> R) -> R {
        let seen = self.completed.load(Ordering::SeqCst);
        let result = write();
        self.written_after.store(seen, Ordering::SeqCst);
        result
    }

    /// Whether a write now cannot be the one that starts the log over.
    fn log_settled(&self) -> bool {
        !self.running.load(Ordering::SeqCst)
            && self.written_after.load(Ordering::SeqCst) == self.completed.load(Ordering::SeqCst)
    }
}

/// The write connection and who may use it.
pub(super) struct Shared {
    writer: Mutex<Writer>,
    /// Whether a create's insert may be committed on its caller's thread: not when every commit syncs the disk.
    inline: bool,
}

impl Shared {
    pub(super) fn new(writer: Writer, inline: bool) -> Self {
        Self { writer: Mutex::new(writer), inline }
    }

    /// The writer thread: runs what the schedule hands it until the queue is closed and empty.
    pub(super) fn run(&self, queue: &write::Queue) {
        while let Some(next) = queue.next() {
            let mut writer = self.writer.lock();
            match next {
                Next::Urgent(jobs) => {
                    let checkpoints = writer.checkpoints.clone();
                    checkpoints.writing(|| write::run_urgent(&mut writer, jobs));
                }
                Next::Job(job) => job(&mut writer),
            }
        }
    }

    /// Commits a create's insert on the caller's thread if the connection is free and nothing makes that slow;
    /// else why it must go to the writer thread (also after a failed try, which is rolled back).
    pub(super) fn insert_here(&self, ops: &[WriteOp]) -> Result<Result<(), StoreError>, Handover> {
        if !self.inline {
            return Err(Handover::FullSync);
        }
        let mut writer = self.writer.try_lock().ok_or(Handover::WriterBusy)?;
        if !writer.checkpoints.log_settled() {
            return Err(Handover::Checkpoint);
        }
        // Another process holding the write lock fails the try at once rather than blocking this thread.
        writer.conn.busy_timeout(Duration::ZERO).map_err(|_| Handover::TryFailed)?;
        let result = write::apply(&mut writer, ops, false);
        if let Err(e) = writer.conn.busy_timeout(BUSY_TIMEOUT) {
            tracing::warn!(error = %e, "could not set the write connection's busy timeout back");
        }
        match result {
            Ok(()) => Ok(Ok(())),
            Err(e) => {
                tracing::debug!(error = %e, "an insert tried on the caller's thread goes to the writer thread");
                Err(Handover::TryFailed)
            }
        }
    }
}

/// Why a create's insert is committed by the writer thread rather than on its caller's thread: a label value of
/// `offload_store_create_inserts_total` (whose `caller` counts those committed there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Handover {
    /// The create's answer waits for the upstream too (the OpenAI entry): its insert is never tried here.
    WithUpstream,
    /// The writer thread held the connection (a batch, another create's insert, or a checkpoint's own write).
    WriterBusy,
    /// A checkpoint ran since the writer thread's last write: the next write may start the log over (a sync).
    Checkpoint,
    /// Every commit syncs the disk (`--sqlite-synchronous full`).
    FullSync,
    /// The try failed (another process held the database's write lock) and was rolled back.
    TryFailed,
}

impl Handover {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::WithUpstream => "with_upstream",
            Self::WriterBusy => "writer_busy",
            Self::Checkpoint => "checkpoint",
            Self::FullSync => "full_sync",
            Self::TryFailed => "try_failed",
        }
    }
}

/// The store's side: the shared connection and the thread that runs it.
pub(super) fn start(shared: Arc<Shared>, queue: Arc<write::Queue>) -> Result<(), StoreError> {
    std::thread::Builder::new()
        .name("offload-sqlite-writer".into())
        .spawn(move || shared.run(&queue))
        .map(|_| ())
        .map_err(|e| StoreError::Database(format!("cannot start the writer thread: {e}")))
}

#[cfg(test)]
mod tests {
    use super::{Checkpoints, Handover};
    use crate::store::sqlite::{SqliteStore, Synchronous};

    /// Marks the log settled (as a write of the writer thread does) and tries an insert of nothing.
    fn try_settled(store: &SqliteStore) -> Result<Result<(), crate::store::StoreError>, Handover> {
        let checkpoints = store.shared.writer.lock().checkpoints.clone();
        checkpoints.writing(|| ());
        store.shared.insert_here(&[])
    }

    #[test]
    fn an_insert_is_committed_on_its_callers_thread_unless_something_sends_it_to_the_writer_thread() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), Synchronous::Normal).unwrap();
        // The checkpoint thread's checkpoint (every 250 ms) may fall between the two steps: a few tries.
        assert!(
            (0..10).any(|_| matches!(try_settled(&store), Ok(Ok(())))),
            "committed here when nothing is in the way"
        );

        let held = store.shared.writer.lock();
        assert_eq!(store.shared.insert_here(&[]).err(), Some(Handover::WriterBusy));
        drop(held);

        let checkpoints = store.shared.writer.lock().checkpoints.clone();
        checkpoints.checkpoint(|| ());
        assert_eq!(store.shared.insert_here(&[]).err(), Some(Handover::Checkpoint));

        // Another process's write transaction: the try fails at once and is rolled back.
        let other = rusqlite::Connection::open(dir.path().join("offload.db")).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        assert!((0..10).any(|_| try_settled(&store).err() == Some(Handover::TryFailed)));
        other.execute_batch("ROLLBACK").unwrap();

        let dir = tempfile::tempdir().unwrap();
        let full = SqliteStore::open(dir.path(), Synchronous::Full).unwrap();
        assert_eq!(try_settled(&full).err(), Some(Handover::FullSync));
    }

    #[test]
    fn the_log_is_settled_only_after_a_writer_thread_write_that_began_after_the_last_checkpoint() {
        let checkpoints = Checkpoints::default();
        assert!(checkpoints.log_settled(), "no checkpoint yet");
        checkpoints.checkpoint(|| assert!(!checkpoints.log_settled(), "during a checkpoint"));
        assert!(!checkpoints.log_settled(), "after a checkpoint, before any write of the writer thread");
        // A write that began during a checkpoint may have come before the checkpoint copied the last frame.
        checkpoints.writing(|| {
            checkpoints.checkpoint(|| ());
        });
        assert!(!checkpoints.log_settled(), "the write began before the checkpoint completed");
        checkpoints.writing(|| ());
        assert!(checkpoints.log_settled(), "a write that began after the checkpoint started the log over");
    }

    #[test]
    fn every_reason_for_a_handover_is_a_value_the_metrics_export_from_the_start() {
        use Handover::*;
        let reasons = [WithUpstream, WriterBusy, Checkpoint, FullSync, TryFailed];
        // Written out as a match too, so that a new reason fails to compile here until it is listed above.
        for reason in reasons {
            match reason {
                WithUpstream | WriterBusy | Checkpoint | FullSync | TryFailed => {}
            }
        }
        let exported: Vec<&str> = std::iter::once("caller").chain(reasons.map(Handover::as_str)).collect();
        assert_eq!(exported, crate::metrics::CREATE_INSERTS);
    }
}
