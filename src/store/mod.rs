//! Durable storage behind one trait. The engine batches every write into [`Store::write`] calls (one
//! transaction each); reads serve requests that are no longer live in memory.
//!
//! Implementations: [`sqlite::SqliteStore`] (embedded, the default). Every implementation must pass the contract
//! suite in `tests/store_contract.rs`.

pub mod sqlite;

use crate::document::{Progress, RequestMeta};
use crate::domain::RequestId;
use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(String),
    #[error("stored data could not be read back: {0}")]
    Corrupt(String),
    #[error("the store is closed")]
    Closed,
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

/// One change to the store. A batch of them is applied in order, in one transaction.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// A newly accepted request, in status `pending`.
    Insert(Arc<RequestMeta>),
    /// One stream event: `seq` counts from 1, `data` is the chunk exactly as received.
    Event { id: RequestId, seq: u64, data: Arc<str> },
    /// A piece of the raw upstream response (status line and headers first, then the body as received).
    Raw { id: RequestId, seq: u64, bytes: Bytes },
    /// A status transition or new response facts.
    Progress { id: RequestId, progress: Progress },
    /// The final status, with the final body.
    Finish { id: RequestId, progress: Progress, body: Option<String> },
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies the operations in order, atomically. Returns once they are durable.
    async fn write(&self, ops: Arc<[WriteOp]>) -> Result<(), StoreError>;

    async fn get(&self, id: RequestId) -> Result<Option<StoredRequest>, StoreError>;

    /// Events with `seq > after`, in order, at most `limit`.
    async fn events(&self, id: RequestId, after: u64, limit: usize) -> Result<Vec<(u64, String)>, StoreError>;

    /// The raw upstream response, all pieces concatenated.
    async fn raw(&self, id: RequestId) -> Result<Vec<u8>, StoreError>;

    /// Deletes the request with its events and raw response. `false` when there was nothing to delete.
    async fn delete(&self, id: RequestId) -> Result<bool, StoreError>;

    /// Requests not in a final status (after a crash: the ones it cut off).
    async fn unfinished(&self) -> Result<Vec<StoredRequest>, StoreError>;
}
