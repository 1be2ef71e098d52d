//! A store that fails, caused for real: the server runs on its SQLite store wrapped so that a switch makes every
//! write (or every key lookup) fail as a full disk or a lost database would. The engine, the persister and the
//! HTTP layer are the real ones.

use super::helpers::*;
use async_trait::async_trait;
use offload::domain::{NodeId, RequestId, ServiceKey, TokenHash};
use offload::store::nodes::{NodeRecord, NodeStore, Renewal};
use offload::store::sqlite::{SqliteStore, Synchronous};
use offload::store::{
    Charge, KeyStore, Periods, Store, StoreError, StoredRequest, Stores, Usage, WebhookJob, WebhookStatus,
    WebhookStore, WriteOp,
};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The real SQLite store, with switches that make its writes or its key lookups fail.
struct Flaky {
    inner: SqliteStore,
    fail_writes: AtomicBool,
    fail_keys: AtomicBool,
}

fn broken() -> StoreError {
    StoreError::Database("disk I/O error (caused by the test)".into())
}

impl Flaky {
    fn writes(&self) -> Result<(), StoreError> {
        if self.fail_writes.load(Ordering::SeqCst) { Err(broken()) } else { Ok(()) }
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
    async fn get(&self, id: RequestId) -> Result<Option<StoredRequest>, StoreError> {
        self.inner.get(id).await
    }
    async fn events(&self, id: RequestId, after: u64, limit: usize) -> Result<Vec<(u64, String)>, StoreError> {
        self.inner.events(id, after, limit).await
    }
    async fn raw(&self, id: RequestId) -> Result<Vec<u8>, StoreError> {
        self.inner.raw(id).await
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
}

async fn spawn_flaky() -> (TestApp, Arc<Flaky>) {
    let data_dir = tempfile::tempdir().unwrap();
    let flaky = Arc::new(Flaky {
        inner: SqliteStore::open(data_dir.path(), Synchronous::Normal).unwrap(),
        fail_writes: AtomicBool::new(false),
        fail_keys: AtomicBool::new(false),
    });
    let app = spawn_on(Stores::of(flaky.clone()), data_dir, |_| {}).await;
    (app, flaky)
}

#[tokio::test]
async fn a_failing_store_is_loud_refuses_creates_and_loses_no_accepted_request() {
    let (app, flaky) = spawn_flaky().await;
    assert_eq!(app.get(&app.url("/healthz"), None).await.status(), 200);
    let created = app.stream(json!({"messages": user("hi"), "mock": {"words": 40, "delay_ms": 15}})).await;
    let status_url = endpoint(&created, "status_url");
    app.wait_status(&status_url, "streaming").await;

    flaky.fail_writes.store(true, Ordering::SeqCst);
    // The upstream finishes within a second, while nothing can be stored.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let health = app.get(&app.url("/healthz"), None).await;
    assert_eq!(health.status(), 503);
    let health: serde_json::Value = health.json().await.unwrap();
    assert_eq!(health["error"]["code"], "store_failing", "{health}");
    let refused = app.create("stream-chatgpt", &json!({"messages": user("more")})).await;
    assert_eq!(refused.status(), 503);
    let refused: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(refused["status"], "error");
    // Nothing final is shown while it cannot be stored.
    let doc = app.get_json(&status_url, None).await;
    assert_eq!(doc["status"], "streaming", "{doc}");

    flaky.fail_writes.store(false, Ordering::SeqCst);
    let doc = app.wait_final(&status_url, None).await;
    assert_eq!(doc["status"], "done", "{doc}");
    let events = app.events(&endpoint(&created, "stream_events_url"), &[]).await;
    assert_eq!(events.iter().filter(|e| !e.id.is_empty() && e.data != "[DONE]").count(), 42, "every chunk kept");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.get(&app.url("/healthz"), None).await.status() != 200 {
        assert!(tokio::time::Instant::now() < deadline, "health never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.create("stream-chatgpt", &json!({"messages": user("again")})).await.status(), 200);
}

#[tokio::test]
async fn a_failing_quota_lookup_refuses_the_create_instead_of_admitting_it() {
    let (app, flaky) = spawn_flaky().await;
    let key = keys_cli(app.data_dir.path(), &["create", "--name", "k", "--requests-per-day", "1000"]);
    let key = key.split_whitespace().find(|w| w.starts_with("ofk_")).unwrap().to_owned();
    // The open/closed answer is cached for a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let create = |key: String| {
        app.client.post(app.url("/v1/stream-chatgpt")).bearer_auth(key).json(&json!({"messages": user("hi")})).send()
    };
    assert_eq!(create(key.clone()).await.unwrap().status(), 200);
    flaky.fail_keys.store(true, Ordering::SeqCst);
    let refused = create(key.clone()).await.unwrap();
    assert_eq!(refused.status(), 503);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["status"], "error", "{body}");
    assert_eq!(app.total_requests(), 1, "the refused create left nothing behind");
}

#[tokio::test]
async fn an_unreadable_quota_count_refuses_the_create_instead_of_counting_it_as_under_quota() {
    let app = spawn_app().await;
    let key = keys_cli(app.data_dir.path(), &["create", "--name", "k", "--requests-per-day", "2"]);
    let key = key.split_whitespace().find(|w| w.starts_with("ofk_")).unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let create = || {
        app.client.post(app.url("/v1/stream-chatgpt")).bearer_auth(&key).json(&json!({"messages": user("hi")})).send()
    };
    assert_eq!(create().await.unwrap().status(), 200);
    // The stored count becomes unreadable (damaged data), as a failing read would leave it.
    let conn = rusqlite::Connection::open(app.data_dir.path().join("offload.db")).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute("UPDATE key_usage SET count = 'unreadable'", []).unwrap();
    let refused = create().await.unwrap();
    assert_eq!(refused.status(), 503, "a quota that cannot be read must not admit");
    assert_eq!(app.total_requests(), 1);
}
