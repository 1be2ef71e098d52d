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
    /// `None` when the insert must go to the writer thread (also after a failed try, which is rolled back).
    pub(super) fn insert_here(&self, ops: &[WriteOp]) -> Option<Result<(), StoreError>> {
        if !self.inline {
            return None;
        }
        let mut writer = self.writer.try_lock()?;
        if !writer.checkpoints.log_settled() {
            return None;
        }
        // Another process holding the write lock fails the try at once rather than blocking this thread.
        writer.conn.busy_timeout(Duration::ZERO).ok()?;
        let result = write::apply(&mut writer, ops, false);
        if let Err(e) = writer.conn.busy_timeout(BUSY_TIMEOUT) {
            tracing::warn!(error = %e, "could not set the write connection's busy timeout back");
        }
        match result {
            Ok(()) => Some(Ok(())),
            Err(e) => {
                tracing::debug!(error = %e, "an insert tried on the caller's thread goes to the writer thread");
                None
            }
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
    use super::Checkpoints;

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
}
