//! Whether the store answers, and what a node does while it does not.
//!
//! Design (docs/DECISIONS.md, "Database outages"):
//! - Every [`CHECK_EVERY`] the node makes one real round trip to the store ([`Store::ping`](crate::store::Store::ping),
//!   bounded by [`PING_WITHIN`]). While it fails, `/healthz` answers 503 and creates are refused with 503 at once,
//!   so that a load balancer moves traffic away within a second or two; when it answers again, writes the
//!   persister holds are tried at once instead of at the end of their backoff.
//! - Running requests go on through an outage: their events reach their readers from memory, and their writes
//!   wait in the persister (final statuses included: nothing is shown final before it is durable).
//! - What they hold is bounded ([`OutagePolicy`]): when the held writes pass `--outage-buffer`, or the store has
//!   been failing for longer than `--outage-limit`, the node ends its running requests: their upstream calls are
//!   dropped (no more memory, no more tokens paid for) and they end `error` with code `store_unavailable`, keeping
//!   every event their readers saw. That end, like everything before it, is written once the store is back, and
//!   shown only then.

use super::Inner;
use super::live::CancelReason;
use crate::domain::unix_now;
use parking_lot::Mutex;
use std::sync::Weak;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often the store's health is checked.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// How long one health round trip may take before the store counts as not answering.
pub const PING_WITHIN: Duration = Duration::from_millis(1500);

/// How much a node holds for the store through an outage before it ends its running requests.
#[derive(Clone, Copy, Debug)]
pub struct OutagePolicy {
    /// Bytes of writes held in memory (`--outage-buffer`).
    pub buffer: usize,
    /// How long the store may fail (`--outage-limit`).
    pub limit: Duration,
}

impl Default for OutagePolicy {
    fn default() -> Self {
        Self { buffer: 256 * 1024 * 1024, limit: Duration::from_secs(600) }
    }
}

/// The store's health as this node last saw it.
pub struct StoreHealth {
    /// The last round trip succeeded.
    reachable: AtomicBool,
    /// Since when the store has been failing (round trips or writes), while it is.
    failing_since: Mutex<Option<Instant>>,
    /// The running requests were ended for this outage (once per outage).
    gave_up: AtomicBool,
}

impl Default for StoreHealth {
    fn default() -> Self {
        Self { reachable: AtomicBool::new(true), failing_since: Mutex::new(None), gave_up: AtomicBool::new(false) }
    }
}

impl StoreHealth {
    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::SeqCst)
    }
}

/// Checks the store until `closing` or until the engine is gone; see the module's comment.
pub(super) async fn watch(engine: Weak<Inner>, closing: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = closing.cancelled() => return,
        }
        let Some(inner) = engine.upgrade() else { return };
        let health = &inner.health;
        let answer = inner.stores.requests.ping(PING_WITHIN).await;
        let ok = answer.is_ok();
        let was = health.reachable.swap(ok, Ordering::SeqCst);
        crate::metrics::store_reachable(ok);
        match (&answer, was) {
            (Err(e), true) => tracing::error!(
                error = %e,
                "the store does not answer: new requests are refused and running ones keep their writes in memory"
            ),
            (Ok(()), false) => {
                tracing::warn!(
                    held_bytes = inner.persister.held_bytes(),
                    "the store answers again; writing what was held"
                );
                inner.persister.retry_now();
            }
            _ => {}
        }
        let failing = !ok || !inner.persister.healthy();
        let since = {
            let mut since = health.failing_since.lock();
            if failing {
                *since.get_or_insert_with(Instant::now)
            } else {
                *since = None;
                health.gave_up.store(false, Ordering::SeqCst);
                continue;
            }
        };
        let held = inner.persister.held_bytes();
        let policy = inner.config.outage;
        let why = if held > policy.buffer {
            format!("the writes held for the store passed --outage-buffer ({held} > {} bytes)", policy.buffer)
        } else if since.elapsed() > policy.limit {
            format!("the store has been failing for longer than --outage-limit ({:?})", policy.limit)
        } else {
            continue;
        };
        if health.gave_up.swap(true, Ordering::SeqCst) {
            continue;
        }
        let running: Vec<_> = inner.hub.lock().values().cloned().collect();
        tracing::error!(
            count = running.len(),
            "{why}: ending the running requests as `store_unavailable` (their upstream calls are dropped; what their readers saw is kept and written when the store is back)"
        );
        let now = unix_now();
        for live in running {
            live.cancel_with(CancelReason::StoreOutage, now);
        }
    }
}
