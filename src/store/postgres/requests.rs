//! The request family: requests, their events and raw responses.

use super::write::uuid;
use super::{PostgresStore, int, pg_err};
use crate::domain::RequestId;
use crate::store::columns::{RequestRow, event_text};
use crate::store::{RawCursor, RawPage, Store, StoreError, StoredRequest, WriteOp};
use async_trait::async_trait;
use std::sync::Arc;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

const SELECT_REQUEST: &str = "SELECT id, kind, access, created_at, bearer, stream_token, meta, parameters, progress,
    body, (SELECT COALESCE(MAX(seq), 0) FROM events e WHERE e.rkey = r.rkey), owner FROM requests r";

/// [`SELECT_REQUEST`] without the body.
const SELECT_HEAD: &str = "SELECT id, kind, access, created_at, bearer, stream_token, meta, parameters, progress,
    NULL::text, (SELECT COALESCE(MAX(seq), 0) FROM events e WHERE e.rkey = r.rkey), owner FROM requests r";

/// Requests not final whose node is gone (or that predate nodes).
const ORPHANS: &str = "WHERE status NOT IN ('done', 'error', 'stop')
    AND (owner IS NULL OR NOT EXISTS (SELECT 1 FROM nodes n WHERE n.id = r.owner))";

fn row_to_request(row: &tokio_postgres::Row) -> Result<StoredRequest, StoreError> {
    let id: Uuid = row.try_get(0).map_err(pg_err)?;
    let small = |i: usize| -> Result<u8, StoreError> {
        let v: i16 = row.try_get(i).map_err(pg_err)?;
        u8::try_from(v).map_err(|_| StoreError::Corrupt(format!("column {i} out of range")))
    };
    RequestRow {
        id: id.as_bytes().to_vec(),
        kind: small(1)?,
        access: small(2)?,
        created_at: row.try_get(3).map_err(pg_err)?,
        bearer: row.try_get(4).map_err(pg_err)?,
        stream_token: row.try_get(5).map_err(pg_err)?,
        meta: row.try_get(6).map_err(pg_err)?,
        parameters: row.try_get(7).map_err(pg_err)?,
        progress: row.try_get(8).map_err(pg_err)?,
        body: row.try_get(9).map_err(pg_err)?,
        event_count: row.try_get(10).map_err(pg_err)?,
        owner: row.try_get::<_, Option<Uuid>>(11).map_err(pg_err)?.map(|u| u.as_bytes().to_vec()),
    }
    .decode()
}

impl PostgresStore {
    /// Deletes the requests the `select` statement deletes (it returns `rkey, id`) with everything of them, in
    /// one transaction; returns how many. Their events, raw pieces and webhooks go in a later statement: it sees
    /// what a batch that held one of these requests locked committed before the delete could take the row.
    async fn delete_where(&self, select: &str, params: &[&(dyn ToSql + Sync)]) -> Result<usize, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        let stmt = tx.prepare_cached(select).await.map_err(pg_err)?;
        let rows = tx.query(&stmt, params).await.map_err(pg_err)?;
        if rows.is_empty() {
            tx.rollback().await.map_err(pg_err)?;
            return Ok(0);
        }
        let rkeys = rows.iter().map(|r| r.try_get(0)).collect::<Result<Vec<i64>, _>>().map_err(pg_err)?;
        let ids = rows.iter().map(|r| r.try_get(1)).collect::<Result<Vec<Uuid>, _>>().map_err(pg_err)?;
        let children = tx
            .prepare_cached(
                "WITH e AS (DELETE FROM events WHERE rkey = ANY($1)), p AS (DELETE FROM raw_parts WHERE rkey = ANY($1))
                 DELETE FROM webhooks WHERE request_id = ANY($2)",
            )
            .await
            .map_err(pg_err)?;
        tx.execute(&children, &[&rkeys, &ids]).await.map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)?;
        Ok(rows.len())
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn write(&self, ops: Arc<[WriteOp]>) -> Result<(), StoreError> {
        self.write_batch(&ops).await
    }

    async fn ping(&self, within: std::time::Duration) -> Result<(), StoreError> {
        self.ping_within(within).await
    }

    async fn get(&self, id: RequestId) -> Result<Option<StoredRequest>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(&format!("{SELECT_REQUEST} WHERE id = $1")).await.map_err(pg_err)?;
        let row = client.query_opt(&stmt, &[&uuid(id)]).await.map_err(pg_err)?;
        row.as_ref().map(row_to_request).transpose()
    }

    async fn head(&self, id: RequestId) -> Result<Option<StoredRequest>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(&format!("{SELECT_HEAD} WHERE id = $1")).await.map_err(pg_err)?;
        let row = client.query_opt(&stmt, &[&uuid(id)]).await.map_err(pg_err)?;
        row.as_ref().map(row_to_request).transpose()
    }

    async fn events(&self, id: RequestId, after: u64, limit: usize) -> Result<Vec<(u64, String)>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT seq, data FROM events WHERE rkey = (SELECT rkey FROM requests WHERE id = $1) AND seq > $2
                 ORDER BY seq LIMIT $3",
            )
            .await
            .map_err(pg_err)?;
        let rows = client.query(&stmt, &[&uuid(id), &int(after), &int(limit as u64)]).await.map_err(pg_err)?;
        rows.iter()
            .map(|row| {
                let seq: i64 = row.try_get(0).map_err(pg_err)?;
                let data: Vec<u8> = row.try_get(1).map_err(pg_err)?;
                Ok((u64::try_from(seq).unwrap_or(0), event_text(data)))
            })
            .collect()
    }

    async fn raw_page(&self, id: RequestId, from: RawCursor, max_bytes: usize) -> Result<RawPage, StoreError> {
        let client = self.client().await?;
        // The pieces from `from.piece` that start before `max_bytes`: the lengths are summed without reading the
        // bytes (a toasted value knows its length), and only the pieces of this page are read. An events piece
        // counts 0 here; its events are read apart.
        let pieces = client
            .prepare_cached(
                "WITH r AS (SELECT rkey FROM requests WHERE id = $1),
                 m AS (SELECT p.seq, SUM(COALESCE(octet_length(p.bytes), 0)) OVER (ORDER BY p.seq)
                                     - COALESCE(octet_length(p.bytes), 0) AS before
                       FROM raw_parts p JOIN r ON p.rkey = r.rkey WHERE p.seq >= $2 ORDER BY p.seq LIMIT 1000)
                 SELECT p.seq, p.bytes, p.events_through FROM raw_parts p JOIN r ON p.rkey = r.rkey
                 JOIN m ON m.seq = p.seq WHERE m.before < $3 ORDER BY p.seq",
            )
            .await
            .map_err(pg_err)?;
        let rows =
            client.query(&pieces, &[&uuid(id), &int(from.piece), &int(max_bytes as u64)]).await.map_err(pg_err)?;
        let mut out = Vec::new();
        let mut next = None;
        for row in &rows {
            let seq = u64::try_from(row.try_get::<_, i64>(0).map_err(pg_err)?).unwrap_or(0);
            let after = if seq == from.piece { from.event } else { 0 };
            if out.len() >= max_bytes {
                return Ok(RawPage { bytes: out, next: Some(RawCursor { piece: seq, event: after }) });
            }
            next = Some(RawCursor { piece: seq + 1, event: 0 });
            if let Some(bytes) = row.try_get::<_, Option<&[u8]>>(1).map_err(pg_err)? {
                out.extend_from_slice(bytes);
                continue;
            }
            let through: Option<i64> = row.try_get(2).map_err(pg_err)?;
            let events = client
                .prepare_cached(
                    "WITH r AS (SELECT rkey FROM requests WHERE id = $1),
                     m AS (SELECT e.seq, SUM(octet_length(e.data) + 8) OVER (ORDER BY e.seq)
                                         - (octet_length(e.data) + 8) AS before
                           FROM events e JOIN r ON e.rkey = r.rkey WHERE e.seq > $2 AND e.seq <= $3
                           ORDER BY e.seq LIMIT 10000)
                     SELECT e.seq, e.data FROM events e JOIN r ON e.rkey = r.rkey
                     JOIN m ON m.seq = e.seq WHERE m.before < $4 ORDER BY e.seq",
                )
                .await
                .map_err(pg_err)?;
            let remaining = max_bytes - out.len();
            let params: [&(dyn ToSql + Sync); 4] =
                [&uuid(id), &int(after), &through.unwrap_or(i64::MAX), &int(remaining as u64)];
            let found = client.query(&events, &params).await.map_err(pg_err)?;
            // Events left in this piece: the page ends with them, and the next one goes on after the last.
            if let Some(last) = found.last() {
                for event in &found {
                    out.extend_from_slice(b"data: ");
                    out.extend_from_slice(event.try_get::<_, &[u8]>(1).map_err(pg_err)?);
                    out.extend_from_slice(b"\n\n");
                }
                let last = u64::try_from(last.try_get::<_, i64>(0).map_err(pg_err)?).unwrap_or(0);
                return Ok(RawPage { bytes: out, next: Some(RawCursor { piece: seq, event: last }) });
            }
        }
        Ok(RawPage { bytes: out, next })
    }

    async fn delete(&self, id: RequestId) -> Result<bool, StoreError> {
        let deleted = self.delete_where("DELETE FROM requests WHERE id = $1 RETURNING rkey, id", &[&uuid(id)]).await?;
        Ok(deleted > 0)
    }

    async fn unfinished(&self) -> Result<Vec<StoredRequest>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!("{SELECT_REQUEST} WHERE status NOT IN ('done', 'error', 'stop')"))
            .await
            .map_err(pg_err)?;
        let rows = client.query(&stmt, &[]).await.map_err(pg_err)?;
        rows.iter().map(row_to_request).collect()
    }

    async fn orphans(&self) -> Result<Vec<StoredRequest>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(&format!("{SELECT_REQUEST} {ORPHANS}")).await.map_err(pg_err)?;
        let rows = client.query(&stmt, &[]).await.map_err(pg_err)?;
        rows.iter().map(row_to_request).collect()
    }

    async fn purge_finished(&self, before: i64, limit: usize) -> Result<usize, StoreError> {
        // Requests another node is purging right now are skipped, not waited for.
        self.delete_where(
            "DELETE FROM requests WHERE rkey IN (
                 SELECT rkey FROM requests WHERE final_at IS NOT NULL AND final_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)
             RETURNING rkey, id",
            &[&before, &int(limit as u64)],
        )
        .await
    }
}
