//! The webhook family: one delivery row per request that asked for a webhook.

use super::{SqliteStore, db_err, json_err};
use crate::domain::RequestId;
use crate::store::{StoreError, WebhookJob, WebhookStatus, WebhookStore};
use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

/// Queues a delivery (inside the transaction that stores the final status). Queuing twice keeps the first.
pub(super) fn queue(conn: &Connection, id: RequestId, url: &str, due: f64) -> Result<(), StoreError> {
    let json = serde_json::to_string(&WebhookStatus::pending()).map_err(json_err)?;
    conn.prepare_cached(
        "INSERT OR IGNORE INTO webhooks (request_id, url, state, next_attempt_at, status) VALUES (?1, ?2, 'pending', ?3, ?4)",
    )
    .and_then(|mut s| s.execute(params![id.as_bytes(), url, due, json]))
    .map_err(db_err)?;
    Ok(())
}

fn decode(id: Vec<u8>, url: String, status: &str) -> Result<WebhookJob, StoreError> {
    let id = RequestId::from_bytes(id.try_into().map_err(|_| StoreError::Corrupt("request id".into()))?);
    Ok(WebhookJob { id, url, status: serde_json::from_str(status).map_err(json_err)? })
}

#[async_trait]
impl WebhookStore for SqliteStore {
    async fn claim_webhooks(&self, now: f64, lease: f64, limit: usize) -> Result<Vec<WebhookJob>, StoreError> {
        self.write_with(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
            let rows: Vec<(Vec<u8>, String, String)> = tx
                .prepare_cached(
                    "UPDATE webhooks SET next_attempt_at = ?1 + ?2 WHERE request_id IN (
                         SELECT request_id FROM webhooks WHERE state IN ('pending', 'retrying') AND next_attempt_at <= ?1
                         ORDER BY next_attempt_at LIMIT ?3)
                     RETURNING request_id, url, status",
                )
                .and_then(|mut s| {
                    s.query_map(params![now, lease, limit as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                        .collect()
                })
                .map_err(db_err)?;
            tx.commit().map_err(db_err)?;
            rows.into_iter().map(|(id, url, status)| decode(id, url, &status)).collect()
        })
        .await
    }

    async fn record_webhook(&self, id: RequestId, status: WebhookStatus) -> Result<(), StoreError> {
        self.write_with(move |conn| {
            let json = serde_json::to_string(&status).map_err(json_err)?;
            let due = status.next_attempt_at.unwrap_or(f64::MAX);
            conn.prepare_cached(
                "UPDATE webhooks SET state = ?2, next_attempt_at = ?3, status = ?4 WHERE request_id = ?1",
            )
            .and_then(|mut s| s.execute(params![id.as_bytes(), status.state.as_str(), due, json]))
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn webhook(&self, id: RequestId) -> Result<Option<WebhookStatus>, StoreError> {
        self.read(move |conn| {
            let status: Option<String> = conn
                .prepare_cached("SELECT status FROM webhooks WHERE request_id = ?1")
                .and_then(|mut s| s.query_row([id.as_bytes()], |r| r.get(0)).optional())
                .map_err(db_err)?;
            status.map(|s| serde_json::from_str(&s).map_err(json_err)).transpose()
        })
        .await
    }
}
