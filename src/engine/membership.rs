//! Membership of a cluster: renewing this node's lease, ending the requests of nodes that are gone, and
//! giving back their service keys' in-flight slots.

use super::live::CancelReason;
use super::{Engine, SHUTDOWN_STORE_WAIT};
use crate::domain::unix_now;
use crate::store::nodes::NodeStore;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

impl Engine {
    /// On a shared store, until `closing`: renews this node's lease, removes dead peers and ends their requests.
    /// A round runs every fifth of the lease, so a dead node's requests end at most about 1.2 leases (plus a
    /// one-second probe) after its last renewal.
    pub async fn run_membership(&self, nodes: Arc<dyn NodeStore>, lease: Duration, closing: CancellationToken) {
        let Some(peers) = self.inner.peers.clone() else { return };
        let every = lease / 5;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = closing.cancelled() => return,
            }
            match crate::cluster::round(&peers, &*nodes, lease).await {
                Ok(round) if round.lost => {
                    tracing::error!(
                        node = %peers.me.id,
                        "this node was taken for dead (its lease ran out while it could not be reached); ending its running requests and joining again"
                    );
                    self.end_all_running().await;
                    if let Err(e) = nodes.join(&peers.me, lease).await {
                        tracing::error!(error = %e, "could not join the cluster again; retrying");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "could not renew this node's lease; retrying"),
            }
            match self.take_over_orphans().await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(count = n, "ended requests of a node that is gone as interrupted"),
                Err(e) => {
                    tracing::error!(error = %e, "could not end the requests of a node that is gone; retrying");
                    // Its in-flight slots are given back only once its requests have ended.
                    continue;
                }
            }
            match self.inner.stores.keys.release_orphaned_slots().await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(count = n, "gave back in-flight slots of service keys held by a node that is gone")
                }
                Err(e) => tracing::error!(error = %e, "could not give back the in-flight slots of a node that is gone"),
            }
        }
    }

    /// Ends every running request as interrupted and waits (bounded) until each is settled.
    async fn end_all_running(&self) {
        let running: Vec<_> = self.inner.hub.lock().values().cloned().collect();
        for live in &running {
            live.cancel_with(CancelReason::Shutdown, unix_now());
        }
        for live in running {
            let _ = tokio::time::timeout(SHUTDOWN_STORE_WAIT, live.settled.cancelled()).await;
        }
    }
}
