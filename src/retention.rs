//! Deletes finished requests older than the retention period, in bounded batches so that serving never stalls.

use crate::domain::unix_now;
use crate::store::Store;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Requests deleted per transaction; small enough that a batch never holds the writer for long.
const BATCH: usize = 500;

/// Sweeps every tenth of the retention period (between 100 ms and a minute) until `closing`.
pub async fn sweep(store: Arc<dyn Store>, retention: Duration, closing: CancellationToken) {
    let every = (retention / 10).clamp(Duration::from_millis(100), Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = closing.cancelled() => return,
        }
        let cutoff = (unix_now() - retention.as_secs_f64()).floor() as i64;
        let mut deleted = 0;
        loop {
            match store.purge_finished(cutoff, BATCH).await {
                Ok(n) => {
                    deleted += n;
                    if n < BATCH || closing.is_cancelled() {
                        break;
                    }
                    // Let other writes in between batches.
                    tokio::task::yield_now().await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "retention sweep failed; retrying at the next sweep");
                    break;
                }
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, "deleted finished requests older than the retention period");
        }
    }
}
