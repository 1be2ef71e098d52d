//! The schedule of a store that executes its writes one at a time on a thread of its own (SQLite's writer, which
//! owns the write connection). The thread takes what [`SerialQueue::next`] hands it and runs it; which job comes
//! next, how creates' inserts are grouped, and when a long batch lets them in are decided here:
//!
//! - **Creates' inserts first, together** ([`Next::Urgent`]): every insert waiting is handed over at once, to be
//!   committed in one transaction (group commit), ahead of any other job.
//! - **Other jobs in arrival order** ([`Next::Job`]): the persister's batches and the store's other writes (keys,
//!   webhooks, nodes, deletes), which must not run concurrently with a batch.
//! - **A long batch lets inserts in** ([`SerialQueue::urgent_due`]): between two writes of a batch, once its
//!   transaction has been open for [`YIELD_AFTER`] while inserts wait, the inserts are handed to it; it writes
//!   them in its transaction, commits, and goes on in a new one. So a create waits for about a tenth of a
//!   millisecond of someone else's writes, not for a whole batch, and a steady stream of creates cannot split a
//!   batch into a commit per write (at most one commit per [`YIELD_AFTER`] of the batch's own work).

use crate::store::{StoreError, WriteOp};
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How long a batch keeps its transaction open while creates wait. A bulk batch at 2,000 creates a second takes
/// about a millisecond; at 1 ms here most batches ended before letting inserts in, and a create that came during
/// one waited for all of it (BENCHMARKS.md, "Issue 21, sixth round").
pub const YIELD_AFTER: Duration = Duration::from_micros(100);

/// A create's insert waiting for the thread, with whom to tell the outcome.
pub type Urgent = (std::sync::Arc<[WriteOp]>, oneshot::Sender<Result<(), StoreError>>);

/// What the thread runs next.
pub enum Next<J> {
    /// Every insert waiting: to be written in one transaction, each told the outcome.
    Urgent(Vec<Urgent>),
    Job(J),
}

pub struct SerialQueue<J> {
    jobs: Mutex<Jobs<J>>,
    ready: Condvar,
    /// Whether `jobs.urgent` has something: read between the writes of a batch without taking the lock.
    urgent_waiting: AtomicBool,
}

struct Jobs<J> {
    urgent: Vec<Urgent>,
    normal: std::collections::VecDeque<J>,
    /// The store was dropped: the thread ends once the lanes are empty.
    closed: bool,
}

impl<J> Default for SerialQueue<J> {
    fn default() -> Self {
        Self {
            jobs: Mutex::new(Jobs { urgent: Vec::new(), normal: Default::default(), closed: false }),
            ready: Condvar::new(),
            urgent_waiting: AtomicBool::new(false),
        }
    }
}

impl<J> SerialQueue<J> {
    /// Queues a job after every other one.
    pub fn push(&self, job: J) -> Result<(), StoreError> {
        let mut jobs = self.jobs.lock();
        if jobs.closed {
            return Err(StoreError::Closed);
        }
        jobs.normal.push_back(job);
        drop(jobs);
        self.ready.notify_one();
        Ok(())
    }

    /// Queues a create's insert ahead of every other job.
    pub fn push_urgent(&self, job: Urgent) -> Result<(), StoreError> {
        let mut jobs = self.jobs.lock();
        if jobs.closed {
            return Err(StoreError::Closed);
        }
        jobs.urgent.push(job);
        self.urgent_waiting.store(true, Ordering::Release);
        drop(jobs);
        self.ready.notify_one();
        Ok(())
    }

    /// For a batch whose transaction opened at `opened`, between two of its writes: the inserts to take into it
    /// now (then commit), or `None` to go on.
    pub fn urgent_due(&self, opened: Instant) -> Option<Vec<Urgent>> {
        if !self.urgent_waiting.load(Ordering::Acquire) || opened.elapsed() < YIELD_AFTER {
            return None;
        }
        let mut jobs = self.jobs.lock();
        self.urgent_waiting.store(false, Ordering::Release);
        let waiting = std::mem::take(&mut jobs.urgent);
        (!waiting.is_empty()).then_some(waiting)
    }

    /// The next job, inserts first; waits for one. `None` once the queue is closed and nothing is left.
    pub fn next(&self) -> Option<Next<J>> {
        let mut jobs = self.jobs.lock();
        loop {
            if !jobs.urgent.is_empty() {
                self.urgent_waiting.store(false, Ordering::Release);
                return Some(Next::Urgent(std::mem::take(&mut jobs.urgent)));
            }
            if let Some(job) = jobs.normal.pop_front() {
                return Some(Next::Job(job));
            }
            if jobs.closed {
                return None;
            }
            self.ready.wait(&mut jobs);
        }
    }

    /// Takes no more jobs; [`Self::next`] ends once those queued are handed out.
    pub fn close(&self) {
        self.jobs.lock().closed = true;
        self.ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn urgent() -> (Urgent, oneshot::Receiver<Result<(), StoreError>>) {
        let (done, wait) = oneshot::channel();
        ((Arc::from([]), done), wait)
    }

    #[test]
    fn inserts_go_first_together_and_jobs_in_order() {
        let queue = SerialQueue::default();
        queue.push(1).unwrap();
        queue.push(2).unwrap();
        let (a, _wa) = urgent();
        let (b, _wb) = urgent();
        queue.push_urgent(a).unwrap();
        queue.push_urgent(b).unwrap();
        assert!(matches!(queue.next(), Some(Next::Urgent(group)) if group.len() == 2));
        assert!(matches!(queue.next(), Some(Next::Job(1))));
        queue.close();
        assert!(queue.push(3).is_err());
        assert!(matches!(queue.next(), Some(Next::Job(2))), "what was queued is still handed out");
        assert!(queue.next().is_none());
    }

    #[test]
    fn a_batch_takes_waiting_inserts_only_after_it_held_its_transaction_a_while() {
        let queue = SerialQueue::<()>::default();
        assert!(queue.urgent_due(Instant::now() - YIELD_AFTER).is_none(), "nothing waits");
        let (a, _wa) = urgent();
        queue.push_urgent(a).unwrap();
        assert!(queue.urgent_due(Instant::now()).is_none(), "the transaction just opened");
        let taken = queue.urgent_due(Instant::now() - YIELD_AFTER);
        assert_eq!(taken.map(|t| t.len()), Some(1));
        assert!(queue.urgent_due(Instant::now() - YIELD_AFTER).is_none(), "taken once");
    }
}
