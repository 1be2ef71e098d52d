//! The webhook family: one delivery row per request that asked for a webhook (queued by the batch that stores the
//! final status, see `requests`).

use super::{PostgresStore, int, pg_err};
use crate::domain::RequestId;
use crate::store::columns::json_err;
use crate::store::{StoreError, WebhookJob, WebhookStatus, WebhookStore};
use async_trait::async_trait;
use uuid::Uuid;

#[async_trait]
impl WebhookStore for PostgresStore {
    async fn claim_webhooks(&self, now: f64, lease: f64, limit: usize) -> Result<Vec<WebhookJob>, StoreError> {
        let client = self.client().await?;
        // The rows are locked as they are picked, and ones another node is claiming are skipped: a delivery is
        // handed to one claimer. A row claimed and committed meanwhile is read again, no longer due, and left.
        let stmt = client
            .prepare_cached(
                "UPDATE webhooks SET next_attempt_at = $1 + $2 WHERE request_id IN (
                     SELECT request_id FROM webhooks WHERE state IN ('pending', 'retrying') AND next_attempt_at <= $1
                     ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED)
                 RETURNING request_id, url, status",
            )
            .await
            .map_err(pg_err)?;
        let rows = client.query(&stmt, &[&now, &lease, &int(limit as u64)]).await.map_err(pg_err)?;
        rows.iter()
            .map(|row| {
                let id: Uuid = row.try_get(0).map_err(pg_err)?;
                let status: &str = row.try_get(2).map_err(pg_err)?;
                Ok(WebhookJob {
                    id: RequestId::from_bytes(id.into_bytes()),
                    url: row.try_get(1).map_err(pg_err)?,
                    status: serde_json::from_str(status).map_err(json_err)?,
                })
            })
            .collect()
    }

    async fn record_webhook(&self, id: RequestId, status: WebhookStatus) -> Result<(), StoreError> {
        let json = serde_json::to_string(&status).map_err(json_err)?;
        let due = status.next_attempt_at.unwrap_or(f64::MAX);
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("UPDATE webhooks SET state = $2, next_attempt_at = $3, status = $4 WHERE request_id = $1")
            .await
            .map_err(pg_err)?;
        client
            .execute(&stmt, &[&Uuid::from_bytes(*id.as_bytes()), &status.state.as_str(), &due, &json])
            .await
            .map_err(pg_err)?;
        Ok(())
    }

    async fn webhook(&self, id: RequestId) -> Result<Option<WebhookStatus>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("SELECT status FROM webhooks WHERE request_id = $1").await.map_err(pg_err)?;
        let row = client.query_opt(&stmt, &[&Uuid::from_bytes(*id.as_bytes())]).await.map_err(pg_err)?;
        row.map(|row| {
            let status: &str = row.try_get(0).map_err(pg_err)?;
            serde_json::from_str(status).map_err(json_err)
        })
        .transpose()
    }
}
