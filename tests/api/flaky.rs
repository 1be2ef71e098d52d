//! A store that fails on demand, caused for real: the server runs on its SQLite store wrapped so that a switch
//! makes every read, write or key lookup fail as a full disk or a lost database would. The engine, the persister
//! and the HTTP layer above it are the real ones.

use super::helpers::*;
use async_trait::async_trait;
use offload::domain::{KeyLimits, NodeId, RequestId, ServiceKey, TokenHash};
use offload::store::nodes::{NodeRecord, NodeStore, Renewal};
use offload::store::sqlite::{SqliteStore, Synchronous};
use offload::store::usage::{UsageOf, UsageRow};
use offload::store::{
    Admit, Charge, KeyStore, Periods, RawCursor, RawPage, SlotId, Store, StoreError, StoredRequest, Stores, Usage,
    WebhookJob, WebhookStatus, WebhookStore, WriteOp,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The real SQLite store, with switches that make its writes or its key lookups fail.
pub struct Flaky {
    inner: SqliteStore,
    /// Reading requests (documents, events, raw responses) fails.
    pub fail_reads: AtomicBool,
    /// Reading requests fails as a database that does not answer does (a failure that passes by itself).
    pub reads_unreachable: AtomicBool,
    /// Writing fails: requests, webhook deliveries.
    pub fail_writes: AtomicBool,
    /// Key lookups and quota charges fail.
    pub fail_keys: AtomicBool,
    /// Creates' inserts fail (the rest of the writes pass).
    pub fail_inserts: AtomicBool,
}

fn broken() -> StoreError {
    StoreError::Database("disk I/O error (caused by the test)".into())
}

impl Flaky {
    fn writes(&self) -> Result<(), StoreError> {
        if self.fail_writes.load(Ordering::SeqCst) { Err(broken()) } else { Ok(()) }
    }

    fn reads(&self) -> Result<(), StoreError> {
        if self.reads_unreachable.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("connection timed out (caused by the test)".into()));
        }
        if self.fail_reads.load(Ordering::SeqCst) { Err(broken()) } else { Ok(()) }
    }

    fn keys(&self) -> Result<(), StoreError> {
        if self.fail_keys.load(Ordering::SeqCst) { Err(broken()) } else { Ok(()) }
    }
}

#[async_trait]
impl Store for Flaky {
    async fn write(&self, ops: Arc<[WriteOp]>) -> Result<(), StoreError> {
        self.writes()?;
        self.inner.write(ops).await
    }
    async fn write_urgent(&self, ops: Arc<[WriteOp]>) -> Result<(), StoreError> {
        self.writes()?;
        if self.fail_inserts.load(Ordering::SeqCst) {
            return Err(broken());
        }
        self.inner.write_urgent(ops).await
    }
    async fn ping(&self, within: std::time::Duration) -> Result<(), StoreError> {
        self.writes()?;
        self.inner.ping(within).await
    }
    async fn get(&self, id: RequestId) -> Result<Option<StoredRequest>, StoreError> {
        self.reads()?;
        self.inner.get(id).await
    }
    async fn head(&self, id: RequestId) -> Result<Option<StoredRequest>, StoreError> {
        self.reads()?;
        self.inner.head(id).await
    }
    async fn events(&self, id: RequestId, after: u64, limit: usize) -> Result<Vec<(u64, String)>, StoreError> {
        self.reads()?;
        self.inner.events(id, after, limit).await
    }
    async fn raw_page(&self, id: RequestId, from: RawCursor, max_bytes: usize) -> Result<RawPage, StoreError> {
        self.reads()?;
        self.inner.raw_page(id, from, max_bytes).await
    }
    async fn delete(&self, id: RequestId) -> Result<bool, StoreError> {
        self.writes()?;
        self.inner.delete(id).await
    }
    async fn unfinished(&self) -> Result<Vec<StoredRequest>, StoreError> {
        self.inner.unfinished().await
    }
    async fn orphans(&self) -> Result<Vec<StoredRequest>, StoreError> {
        self.inner.orphans().await
    }
    async fn purge_finished(&self, before: i64, limit: usize) -> Result<usize, StoreError> {
        self.writes()?;
        self.inner.purge_finished(before, limit).await
    }
}

#[async_trait]
impl WebhookStore for Flaky {
    async fn claim_webhooks(&self, now: f64, lease: f64, limit: usize) -> Result<Vec<WebhookJob>, StoreError> {
        self.writes()?;
        self.inner.claim_webhooks(now, lease, limit).await
    }
    async fn record_webhook(&self, id: RequestId, status: WebhookStatus) -> Result<(), StoreError> {
        self.writes()?;
        self.inner.record_webhook(id, status).await
    }
    async fn webhook(&self, id: RequestId) -> Result<Option<WebhookStatus>, StoreError> {
        self.inner.webhook(id).await
    }
}

#[async_trait]
impl KeyStore for Flaky {
    async fn create_key(&self, key: &ServiceKey, hash: TokenHash) -> Result<(), StoreError> {
        self.inner.create_key(key, hash).await
    }
    async fn key_by_hash(&self, hash: TokenHash) -> Result<Option<ServiceKey>, StoreError> {
        self.keys()?;
        self.inner.key_by_hash(hash).await
    }
    async fn keys(&self, periods: &Periods) -> Result<Vec<(ServiceKey, Usage)>, StoreError> {
        self.inner.keys(periods).await
    }
    async fn revoke_key(&self, name_or_id: &str, at: i64) -> Result<bool, StoreError> {
        self.inner.revoke_key(name_or_id, at).await
    }
    async fn set_limits(&self, name_or_id: &str, limits: &KeyLimits) -> Result<bool, StoreError> {
        self.inner.set_limits(name_or_id, limits).await
    }
    async fn usage(&self, of: UsageOf<'_>, since: &str) -> Result<Vec<UsageRow>, StoreError> {
        self.reads()?;
        self.inner.usage(of, since).await
    }
    async fn active_keys_exist(&self) -> Result<bool, StoreError> {
        self.inner.active_keys_exist().await
    }
    async fn charge(&self, key: &ServiceKey, periods: &Periods) -> Result<Charge, StoreError> {
        self.keys()?;
        self.inner.charge(key, periods).await
    }
    async fn refund(&self, key_id: &str, periods: &Periods) -> Result<(), StoreError> {
        self.inner.refund(key_id, periods).await
    }
    async fn admit(
        &self,
        key: &ServiceKey,
        periods: &Periods,
        node: NodeId,
        slot: SlotId,
    ) -> Result<Admit, StoreError> {
        self.keys()?;
        self.inner.admit(key, periods, node, slot).await
    }
    async fn release_slot(&self, slot: SlotId) -> Result<(), StoreError> {
        self.inner.release_slot(slot).await
    }
    async fn return_token(&self, key: &ServiceKey) -> Result<(), StoreError> {
        self.inner.return_token(key).await
    }
    async fn take_token(&self, key: &ServiceKey) -> Result<Result<(), f64>, StoreError> {
        self.keys()?;
        self.inner.take_token(key).await
    }
    async fn release_orphaned_slots(&self) -> Result<usize, StoreError> {
        self.inner.release_orphaned_slots().await
    }
}

#[async_trait]
impl NodeStore for Flaky {
    fn shared(&self) -> bool {
        self.inner.shared()
    }
    async fn join(&self, node: &NodeRecord, lease: Duration) -> Result<(), StoreError> {
        self.inner.join(node, lease).await
    }
    async fn renew(&self, id: NodeId, lease: Duration) -> Result<Renewal, StoreError> {
        self.inner.renew(id, lease).await
    }
    async fn leave(&self, id: NodeId) -> Result<(), StoreError> {
        self.inner.leave(id).await
    }
    async fn node(&self, id: NodeId) -> Result<Option<NodeRecord>, StoreError> {
        self.inner.node(id).await
    }
    async fn expired_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.inner.expired_nodes().await
    }
    async fn remove_expired(&self, id: NodeId) -> Result<bool, StoreError> {
        self.inner.remove_expired(id).await
    }
    async fn cluster_secret(&self, candidate: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.inner.cluster_secret(candidate).await
    }
}

pub async fn spawn_flaky() -> (TestApp, Arc<Flaky>) {
    let data_dir = tempfile::tempdir().unwrap();
    let flaky = Arc::new(Flaky {
        inner: SqliteStore::open(data_dir.path(), Synchronous::Normal).unwrap(),
        fail_reads: AtomicBool::new(false),
        reads_unreachable: AtomicBool::new(false),
        fail_writes: AtomicBool::new(false),
        fail_keys: AtomicBool::new(false),
        fail_inserts: AtomicBool::new(false),
    });
    let app = spawn_on(Stores::of(flaky.clone()), data_dir, |_| {}).await;
    (app, flaky)
}
