//! Durable storage behind one trait. The write pipeline ([`pipeline`]) batches every write into [`Store::write`]
//! calls (one transaction each), with the rules of a batch shared by both stores ([`pipeline::plan`]); reads
//! serve requests that are no longer live in memory.
//!
//! Storage is split by query family, one trait each: [`Store`] (requests, events, raw responses), [`WebhookStore`]
//! (webhook deliveries) and [`KeyStore`] (service keys and their usage). An implementation provides all three.
//!
//! Implementations: [`sqlite::SqliteStore`] (embedded, the default) and [`postgres::PostgresStore`] (a server
//! shared by several nodes). Every implementation must pass the contract suite in `tests/store_contract.rs`, also
//! with two handles open on one store at once (what two processes, or two nodes, are). Both lay a request out in
//! the same columns ([`columns`]).
//!
//! Errors say what a caller can do about them: [`StoreError::is_retryable`] is true for failures that may pass on
//! a second try (a busy database, a lost race between transactions, a dropped connection), and a [`Conflict`]
//! names the rule a write broke.

mod columns;
pub mod nodes;
pub mod pipeline;
pub mod postgres;
pub mod sqlite;
pub mod usage;

use crate::document::{Progress, RequestMeta};
use crate::domain::{KeyLimits, NodeId, RequestId, ServiceKey, TokenHash};
use async_trait::async_trait;
use bytes::Bytes;
use nodes::NodeStore;
use std::sync::Arc;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A failure that may pass when tried again: the database is busy or locked, a transaction lost a race to
    /// another (serialization failure, deadlock), or the connection to the database is down.
    #[error("the database is unavailable for now: {0}")]
    Unavailable(String),
    /// A failure that will not pass by itself (a bad query, a full disk, a schema from another version).
    #[error("database error: {0}")]
    Database(String),
    #[error("stored data could not be read back: {0}")]
    Corrupt(String),
    #[error("the store is closed")]
    Closed,
    #[error(transparent)]
    Conflict(#[from] Conflict),
}

impl StoreError {
    /// Whether the same call may succeed if made again (after a short wait).
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// A write refused because it breaks a rule of the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    /// Key names are unique (revoked keys keep theirs).
    #[error("a key with this name already exists")]
    KeyNameTaken,
    /// A key with the same id or the same secret exists (a collision of random values: generate the key again).
    #[error("a key with this id or secret already exists")]
    KeyExists,
}

/// Where the store is, as configured: the embedded SQLite file, or a PostgreSQL database shared by nodes.
#[derive(Debug, Clone)]
pub enum StoreLocation {
    Sqlite { data_dir: std::path::PathBuf, synchronous: sqlite::Synchronous },
    Postgres(DatabaseUrl),
}

impl StoreLocation {
    /// Opens the store (creating or upgrading its schema).
    pub async fn open(&self) -> Result<Stores, StoreError> {
        Ok(match self {
            StoreLocation::Sqlite { data_dir, synchronous } => {
                Stores::of(Arc::new(sqlite::SqliteStore::open(data_dir, *synchronous)?))
            }
            StoreLocation::Postgres(url) => {
                Stores::of(Arc::new(postgres::PostgresStore::connect(url.expose(), None).await?))
            }
        })
    }
}

/// A database URL, which may carry a password: shown (in logs, errors, `Debug`) without it.
#[derive(Clone)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn new(url: &str) -> Self {
        Self(url.to_owned())
    }

    /// The URL itself, for the database driver only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match url::Url::parse(&self.0) {
            Ok(mut url) => {
                if url.password().is_some() {
                    let _ = url.set_password(Some("***"));
                }
                f.write_str(url.as_str())
            }
            Err(_) => f.write_str("<a PostgreSQL URL>"),
        }
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DatabaseUrl({self})")
    }
}

/// One store seen through each of its query families; every component gets only the family it needs.
#[derive(Clone)]
pub struct Stores {
    pub requests: Arc<dyn Store>,
    pub webhooks: Arc<dyn WebhookStore>,
    pub keys: Arc<dyn KeyStore>,
    pub nodes: Arc<dyn NodeStore>,
}

impl Stores {
    pub fn of<S: Store + WebhookStore + KeyStore + NodeStore>(store: Arc<S>) -> Self {
        Self { requests: store.clone(), webhooks: store.clone(), keys: store.clone(), nodes: store }
    }
}

/// A request as stored.
#[derive(Debug, Clone)]
pub struct StoredRequest {
    pub meta: RequestMeta,
    pub progress: Progress,
    /// The response body as JSON text, written when the request reaches its final status.
    pub body: Option<String>,
    /// How many events are stored (the highest event id).
    pub event_count: u64,
}

/// A piece of a raw response.
#[derive(Debug, Clone, PartialEq)]
pub enum RawPiece {
    /// Bytes as received.
    Bytes(Bytes),
    /// The request's events `1..=through` (all of them when `None`), each as `data: <chunk>\n\n`: what a
    /// canonical event stream sent, stored once as events rather than twice.
    Events { through: Option<u64> },
}

/// Where a read of a raw response goes on: at the first piece whose seq is `piece` or more, and within that
/// piece, when it stands for events, after event `event`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawCursor {
    pub piece: u64,
    pub event: u64,
}

/// A page of a raw response.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawPage {
    pub bytes: Vec<u8>,
    /// Where the next page starts; `None` once the end was reached (a page before it may be empty).
    pub next: Option<RawCursor>,
}

/// One change to the store. A batch of them is applied in order, in one transaction.
///
/// Once a request is final nothing of it changes: later writes to it (events, raw pieces, progress, another final
/// status and its webhook) are dropped. So when two nodes end the same request at once, the first final status
/// stored is the one everyone sees, and its webhook is queued once.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// A newly accepted request, in status `pending`.
    Insert(Arc<RequestMeta>),
    /// One stream event: `seq` counts from 1, `data` is the chunk exactly as received (UTF-8).
    Event { id: RequestId, seq: u64, data: Bytes },
    /// A piece of the raw upstream response (status line and headers first, then the body). Writing a `seq`
    /// again replaces that piece.
    Raw { id: RequestId, seq: u64, piece: RawPiece },
    /// A status transition or new response facts.
    Progress { id: RequestId, progress: Box<Progress> },
    /// The final status, with the final body. With `webhook_url`, its delivery is queued in the same
    /// transaction, so that no final status is ever stored without its webhook; with `usage`, the request and its
    /// tokens are added to its key's row of the day ([`usage`]), in that transaction too and only when it applies.
    Finish {
        id: RequestId,
        progress: Box<Progress>,
        body: Option<String>,
        webhook_url: Option<String>,
        usage: Option<Box<usage::Tally>>,
    },
}

impl WriteOp {
    /// About how many bytes of memory the write holds while it waits for the store: its data, plus a fixed
    /// allowance for the rest. What bounds the writes a node holds through a database outage.
    pub fn held_bytes(&self) -> usize {
        const FIXED: usize = 256;
        FIXED
            + match self {
                WriteOp::Insert(meta) => meta.parameters.get().len(),
                WriteOp::Event { data, .. } => data.len(),
                WriteOp::Raw { piece: RawPiece::Bytes(bytes), .. } => bytes.len(),
                WriteOp::Raw { .. } | WriteOp::Progress { .. } => 0,
                WriteOp::Finish { body, .. } => body.as_ref().map_or(0, String::len),
            }
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies the operations in order, atomically. Returns once they are durable.
    ///
    /// What the batch means is [`pipeline::plan::Plan::of`]'s; a store executes that plan.
    ///
    /// One exception: a store may commit a long batch in parts to let [`Self::write_urgent`] in between (the SQLite
    /// store does). An error then leaves the parts before it stored; that is harmless because the persister tries
    /// a failed batch again whole, and applying a write twice changes nothing (events and raw pieces replace
    /// themselves, a final status applies once and nothing is written after it). A batch with an insert in it is
    /// never split.
    async fn write(&self, ops: Arc<[WriteOp]>) -> Result<(), StoreError>;

    /// Whether the batching persister should run on a thread of its own rather than on the shared runtime: for a
    /// store whose writes complete on a thread of its own (SQLite's writer).
    fn wants_own_thread(&self) -> bool {
        false
    }

    /// [`Self::write`] for a create's insert, which its caller waits for: a store may run it ahead of writes
    /// queued earlier (none of them can concern a request not yet inserted).
    async fn write_urgent(&self, ops: Arc<[WriteOp]>) -> Result<(), StoreError> {
        self.write(ops).await
    }

    /// [`Self::write_urgent`] for an insert that is all its caller waits for (an OffloadGPT or Responses create,
    /// not the OpenAI entry, whose answer waits for the upstream too): a store may commit it on the caller's
    /// thread when that is quicker than handing it over.
    async fn write_urgent_here(&self, ops: Arc<[WriteOp]>) -> Result<(), StoreError> {
        self.write_urgent(ops).await
    }

    /// One real round trip to the database, bounded by `within`: whether the store answers right now (for
    /// `/healthz` and for refusing creates while it does not). A write of nothing is no such test: a store may
    /// answer it without reaching the database.
    async fn ping(&self, within: std::time::Duration) -> Result<(), StoreError>;

    async fn get(&self, id: RequestId) -> Result<Option<StoredRequest>, StoreError>;

    /// [`Self::get`] without the body (`body` is `None`): for the endpoints that do not show it (the event stream,
    /// the raw response, stop, DELETE), so that opening one never loads a reply of many megabytes.
    async fn head(&self, id: RequestId) -> Result<Option<StoredRequest>, StoreError>;

    /// Events with `seq > after`, in order, at most `limit`.
    async fn events(&self, id: RequestId, after: u64, limit: usize) -> Result<Vec<(u64, String)>, StoreError>;

    /// A page of the raw upstream response, from `from`: the pieces concatenated, events placeholders expanded
    /// (each event as `data: <chunk>\n\n`). Pieces and events are added while the page holds less than
    /// `max_bytes`, so a page is at most `max_bytes` plus one piece or event; `.raw` is served page by page, so
    /// that no read holds a whole response. An unknown request reads as empty.
    async fn raw_page(&self, id: RequestId, from: RawCursor, max_bytes: usize) -> Result<RawPage, StoreError>;

    /// The whole raw upstream response, read page after page.
    async fn raw(&self, id: RequestId) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::new();
        let mut cursor = Some(RawCursor::default());
        while let Some(from) = cursor {
            let page = self.raw_page(id, from, 1 << 20).await?;
            out.extend_from_slice(&page.bytes);
            cursor = page.next;
        }
        Ok(out)
    }

    /// Deletes the request with its events and raw response. `false` when there was nothing to delete.
    async fn delete(&self, id: RequestId) -> Result<bool, StoreError>;

    /// Requests not in a final status (after a crash: the ones it cut off).
    async fn unfinished(&self) -> Result<Vec<StoredRequest>, StoreError>;

    /// Requests not in a final status whose node is gone ([`nodes::NodeStore`]): no one will end them but the
    /// node that finds them.
    async fn orphans(&self) -> Result<Vec<StoredRequest>, StoreError>;

    /// Deletes up to `limit` requests that reached their final status before `before` (unix seconds), with
    /// everything of them. Returns how many were deleted.
    async fn purge_finished(&self, before: i64, limit: usize) -> Result<usize, StoreError>;
}

/// Where a webhook delivery stands; shown as the status document's `webhook` object.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WebhookStatus {
    pub state: WebhookState,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_attempt_at: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt_at: Option<f64>,
    /// The receiver's HTTP status of the last attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_status_code: Option<u16>,
    /// Why the last attempt failed, when it did not get an answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookState {
    /// Queued, not yet attempted.
    Pending,
    /// Attempted and failed in a way worth retrying; `next_attempt_at` says when.
    Retrying,
    Delivered,
    /// Given up: the receiver refused it, or retries ran out.
    Failed,
}

impl WebhookStatus {
    /// A delivery just queued.
    pub fn pending() -> Self {
        Self {
            state: WebhookState::Pending,
            attempts: 0,
            first_attempt_at: None,
            last_attempt_at: None,
            last_status_code: None,
            last_error: None,
            next_attempt_at: None,
        }
    }
}

impl WebhookState {
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookState::Pending => "pending",
            WebhookState::Retrying => "retrying",
            WebhookState::Delivered => "delivered",
            WebhookState::Failed => "failed",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, WebhookState::Delivered | WebhookState::Failed)
    }
}

/// A delivery due now, claimed by one deliverer for a lease.
#[derive(Debug, Clone)]
pub struct WebhookJob {
    pub id: RequestId,
    pub url: String,
    pub status: WebhookStatus,
}

#[async_trait]
pub trait WebhookStore: Send + Sync + 'static {
    /// Claims up to `limit` deliveries due at `now`: they are not handed out again for `lease` seconds, so that a
    /// deliverer that dies mid-attempt is retried by the next one.
    async fn claim_webhooks(&self, now: f64, lease: f64, limit: usize) -> Result<Vec<WebhookJob>, StoreError>;

    /// Records the outcome of an attempt. A delivery in state `retrying` becomes due at `next_attempt_at`.
    async fn record_webhook(&self, id: RequestId, status: WebhookStatus) -> Result<(), StoreError>;

    async fn webhook(&self, id: RequestId) -> Result<Option<WebhookStatus>, StoreError>;
}

/// The calendar periods a quota counts in (UTC), e.g. `2026-11-22` and `2026-11`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Periods {
    pub day: String,
    pub month: String,
}

impl Periods {
    /// The usage counter of the day, as stored (`d:2026-11-22`).
    pub fn day_key(&self) -> String {
        format!("d:{}", self.day)
    }

    /// The usage counter of the month, as stored (`m:2026-11`).
    pub fn month_key(&self) -> String {
        format!("m:{}", self.month)
    }
}

/// A key's usage in the current periods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub today: u64,
    pub this_month: u64,
}

/// Whether a request could be counted against a key's quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    Counted,
    DayFull,
    MonthFull,
}

impl Admit {
    /// Why a create was refused, as the `reason` label of `offload_create_refused_total`; `None` when admitted.
    pub fn refusal_reason(&self) -> Option<&'static str> {
        match self {
            Admit::Admitted { .. } => None,
            Admit::InFlightFull => Some("in_flight"),
            Admit::RateLimited { .. } => Some("rate"),
            Admit::DayFull | Admit::MonthFull => Some("quota"),
        }
    }
}

#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Stores a new key (by its hash). A name already in use is an error.
    async fn create_key(&self, key: &ServiceKey, hash: TokenHash) -> Result<(), StoreError>;

    /// The key with this hash, revoked or not.
    async fn key_by_hash(&self, hash: TokenHash) -> Result<Option<ServiceKey>, StoreError>;

    /// Every key with its usage in `periods`.
    async fn keys(&self, periods: &Periods) -> Result<Vec<(ServiceKey, Usage)>, StoreError>;

    /// Revokes the key with this name or id; `false` when there is none (or it is already revoked).
    async fn revoke_key(&self, name_or_id: &str, at: i64) -> Result<bool, StoreError>;

    /// Replaces the limits of the key with this name or id; `false` when there is none (or it is revoked).
    async fn set_limits(&self, name_or_id: &str, limits: &KeyLimits) -> Result<bool, StoreError>;

    /// The usage rows (requests and tokens per key, model and UTC day) of `of` from the day `since` on
    /// (`YYYY-MM-DD`, or a month `YYYY-MM`), ordered by day, key (no key first) and model.
    async fn usage(&self, of: usage::UsageOf<'_>, since: &str) -> Result<Vec<usage::UsageRow>, StoreError>;

    /// Whether any key that is not revoked exists (then every create needs one).
    async fn active_keys_exist(&self) -> Result<bool, StoreError>;

    /// Counts one request against the key's day and month quotas, atomically: when a quota is full nothing is
    /// counted.
    async fn charge(&self, key: &ServiceKey, periods: &Periods) -> Result<Charge, StoreError>;

    /// Takes back one counted request (the create failed after it was counted).
    async fn refund(&self, key_id: &str, periods: &Periods) -> Result<(), StoreError>;

    /// Admits one create call against all of the key's limits in one atomic step, in this order: its in-flight
    /// slots, its rate (a bucket of `max(rate, 1)` tokens refilled at `rate` per second), its day and month quotas.
    /// When a limit refuses, nothing is taken or counted. Exact across every handle and node: the store holds the
    /// slots, the bucket and the counts.
    async fn admit(&self, key: &ServiceKey, periods: &Periods, node: NodeId, slot: SlotId)
    -> Result<Admit, StoreError>;

    /// Gives back an in-flight slot taken by [`KeyStore::admit`] (its request is final, or its create failed).
    async fn release_slot(&self, slot: SlotId) -> Result<(), StoreError>;

    /// Gives back a rate token taken by [`KeyStore::admit`] (its create failed).
    async fn return_token(&self, key: &ServiceKey) -> Result<(), StoreError>;

    /// Takes one token of the key's rate bucket (the same bucket as [`KeyStore::admit`]'s), for a call that is
    /// paced by the key's rate but is no request (`GET /v1/models`): no slot, no quota count. `Err` of the inner
    /// result: the bucket is empty, the next token comes in this many seconds. A key without a rate always passes.
    async fn take_token(&self, key: &ServiceKey) -> Result<Result<(), f64>, StoreError>;

    /// Gives back the in-flight slots held by nodes that are gone (a node without a record in the node family;
    /// on a store of one node, at its start, that is every slot), once none of that node's requests is running any
    /// more: a slot is returned only when its request has ended. Returns how many.
    async fn release_orphaned_slots(&self) -> Result<usize, StoreError>;
}

/// An in-flight slot of a service key, chosen by the caller of [`KeyStore::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlotId(pub uuid::Uuid);

impl SlotId {
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4())
    }
}

/// The outcome of [`KeyStore::admit`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admit {
    /// Counted; the slot was taken if the key has an in-flight limit, a token if it has a rate.
    Admitted {
        took_slot: bool,
        took_token: bool,
    },
    InFlightFull,
    /// The bucket is empty; the next token comes in this many seconds.
    RateLimited {
        wait: f64,
    },
    DayFull,
    MonthFull,
}
