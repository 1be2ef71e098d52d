//! The request family: requests, their events and raw responses.

use super::writer::Handover;
use super::{SqliteStore, Writer, db_err, write};
use crate::domain::RequestId;
use crate::store::columns::{RequestRow, event_text};
use crate::store::{RawCursor, RawPage, Store, StoreError, StoredRequest, WriteOp};
use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use std::sync::Arc;

/// The internal key of a request, final or not.
fn any_rkey(conn: &Connection, id: RequestId) -> Result<Option<i64>, StoreError> {
    conn.prepare_cached("SELECT rkey FROM requests WHERE id = ?1")
        .and_then(|mut s| s.query_row([id.as_bytes()], |r| r.get(0)).optional())
        .map_err(db_err)
}

/// Deletes one request and everything of it; whether it existed.
fn delete_rows(conn: &Connection, rkey: i64, id: &[u8]) -> rusqlite::Result<bool> {
    for sql in ["DELETE FROM events WHERE rkey = ?1", "DELETE FROM raw_parts WHERE rkey = ?1"] {
        conn.prepare_cached(sql)?.execute([rkey])?;
    }
    conn.prepare_cached("DELETE FROM webhooks WHERE request_id = ?1")?.execute([id])?;
    Ok(conn.prepare_cached("DELETE FROM requests WHERE rkey = ?1")?.execute([rkey])? > 0)
}

fn delete(w: &mut Writer, id: RequestId) -> Result<bool, StoreError> {
    let Writer { conn, rkeys, .. } = w;
    // IMMEDIATE: take the write lock before reading, so that a writer of another process (the `keys` command)
    // makes this one wait its turn instead of failing on a snapshot gone stale.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
    let Some(key) = any_rkey(&tx, id)? else {
        return Ok(false);
    };
    let deleted = delete_rows(&tx, key, id.as_bytes()).map_err(db_err)?;
    tx.commit().map_err(db_err)?;
    rkeys.remove(&id);
    Ok(deleted)
}

const SELECT_REQUEST: &str =
    "SELECT id, kind, access, created_at, bearer, stream_token, meta, parameters, progress, body,
    (SELECT COALESCE(MAX(seq), 0) FROM events WHERE events.rkey = requests.rkey), owner FROM requests";

/// [`SELECT_REQUEST`] without the body.
const SELECT_HEAD: &str = "SELECT id, kind, access, created_at, bearer, stream_token, meta, parameters, progress, NULL,
    (SELECT COALESCE(MAX(seq), 0) FROM events WHERE events.rkey = requests.rkey), owner FROM requests";

fn row_to_request(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<StoredRequest, StoreError>> {
    Ok(RequestRow {
        id: row.get(0)?,
        kind: row.get(1)?,
        access: row.get(2)?,
        created_at: row.get(3)?,
        bearer: row.get(4)?,
        stream_token: row.get(5)?,
        meta: row.get(6)?,
        parameters: row.get(7)?,
        progress: row.get(8)?,
        body: row.get(9)?,
        event_count: row.get(10)?,
        owner: row.get(11)?,
    }
    .decode())
}

impl SqliteStore {
    /// A create's insert committed by the writer thread (with the next inserts waiting, in one transaction), for
    /// `why`.
    async fn hand_over(&self, ops: Arc<[WriteOp]>, why: Handover) -> Result<(), StoreError> {
        crate::metrics::create_insert(why.as_str());
        let (done, wait) = tokio::sync::oneshot::channel();
        self.queue.push_urgent((ops, done))?;
        wait.await.map_err(|_| StoreError::Closed)?
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn write(&self, ops: Arc<[WriteOp]>) -> Result<(), StoreError> {
        // Inserts are not split from the rest of their batch (their keys are handed out in it).
        let may_yield = !ops.iter().any(|op| matches!(op, WriteOp::Insert(_)));
        self.write_with(move |w| write::apply(w, &ops, may_yield)).await
    }

    fn wants_own_thread(&self) -> bool {
        true
    }

    async fn write_urgent_here(&self, ops: Arc<[WriteOp]>) -> Result<(), StoreError> {
        match self.shared.insert_here(&ops) {
            Ok(result) => {
                crate::metrics::create_insert("caller");
                result
            }
            Err(why) => self.hand_over(ops, why).await,
        }
    }

    async fn write_urgent(&self, ops: Arc<[WriteOp]>) -> Result<(), StoreError> {
        self.hand_over(ops, Handover::WithUpstream).await
    }

    async fn ping(&self, within: std::time::Duration) -> Result<(), StoreError> {
        let read = self.read(|conn| conn.query_row("SELECT count(*) FROM nodes", [], |_| Ok(())).map_err(db_err));
        tokio::time::timeout(within, read)
            .await
            .map_err(|_| StoreError::Unavailable(format!("the store did not answer within {within:?}")))?
    }

    async fn get(&self, id: RequestId) -> Result<Option<StoredRequest>, StoreError> {
        self.read(move |conn| {
            conn.prepare_cached(&format!("{SELECT_REQUEST} WHERE id = ?1"))
                .and_then(|mut s| s.query_row([id.as_bytes()], row_to_request).optional())
                .map_err(db_err)?
                .transpose()
        })
        .await
    }

    async fn head(&self, id: RequestId) -> Result<Option<StoredRequest>, StoreError> {
        self.read(move |conn| {
            conn.prepare_cached(&format!("{SELECT_HEAD} WHERE id = ?1"))
                .and_then(|mut s| s.query_row([id.as_bytes()], row_to_request).optional())
                .map_err(db_err)?
                .transpose()
        })
        .await
    }

    async fn events(&self, id: RequestId, after: u64, limit: usize) -> Result<Vec<(u64, String)>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT seq, data FROM events WHERE rkey = (SELECT rkey FROM requests WHERE id = ?1) AND seq > ?2
                     ORDER BY seq LIMIT ?3",
                )
                .map_err(db_err)?;
            let rows = stmt
                .query_map(params![id.as_bytes(), after, limit as i64], |r| {
                    Ok((r.get::<_, u64>(0)?, event_text(r.get(1)?)))
                })
                .map_err(db_err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db_err)
        })
        .await
    }

    async fn raw_page(&self, id: RequestId, from: RawCursor, max_bytes: usize) -> Result<RawPage, StoreError> {
        self.read(move |conn| {
            let Some(key): Option<i64> = conn
                .prepare_cached("SELECT rkey FROM requests WHERE id = ?1")
                .and_then(|mut s| s.query_row([id.as_bytes()], |r| r.get(0)).optional())
                .map_err(db_err)?
            else {
                return Ok(RawPage::default());
            };
            let mut out = Vec::new();
            // Rows are stepped one at a time and a blob is read only when it is used: a page reads what it
            // returns and nothing more.
            let mut pieces = conn
                .prepare_cached(
                    "SELECT seq, bytes, events_through FROM raw_parts WHERE rkey = ?1 AND seq >= ?2 ORDER BY seq",
                )
                .map_err(db_err)?;
            let mut rows = pieces.query(params![key, from.piece]).map_err(db_err)?;
            while let Some(row) = rows.next().map_err(db_err)? {
                let seq: u64 = row.get(0).map_err(db_err)?;
                let mut last = if seq == from.piece { from.event } else { 0 };
                if out.len() >= max_bytes {
                    return Ok(RawPage { bytes: out, next: Some(RawCursor { piece: seq, event: last }) });
                }
                let bytes = row
                    .get_ref(1)
                    .map_err(db_err)?
                    .as_blob_or_null()
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                if let Some(bytes) = bytes {
                    out.extend_from_slice(bytes);
                    continue;
                }
                let through: Option<i64> = row.get(2).map_err(db_err)?;
                let mut events = conn
                    .prepare_cached(
                        "SELECT seq, data FROM events WHERE rkey = ?1 AND seq > ?2 AND seq <= ?3 ORDER BY seq",
                    )
                    .map_err(db_err)?;
                let mut data = events.query(params![key, last, through.unwrap_or(i64::MAX)]).map_err(db_err)?;
                while let Some(event) = data.next().map_err(db_err)? {
                    if out.len() >= max_bytes {
                        return Ok(RawPage { bytes: out, next: Some(RawCursor { piece: seq, event: last }) });
                    }
                    last = event.get(0).map_err(db_err)?;
                    out.extend_from_slice(b"data: ");
                    out.extend_from_slice(
                        event.get_ref(1).map_err(db_err)?.as_blob().map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    );
                    out.extend_from_slice(b"\n\n");
                }
            }
            Ok(RawPage { bytes: out, next: None })
        })
        .await
    }

    async fn delete(&self, id: RequestId) -> Result<bool, StoreError> {
        self.write_with(move |w| delete(w, id)).await
    }

    async fn purge_finished(&self, before: i64, limit: usize) -> Result<usize, StoreError> {
        self.write_with(move |w| {
            let rows: Vec<(i64, Vec<u8>)> = w
                .prepare_cached("SELECT rkey, id FROM requests WHERE final_at IS NOT NULL AND final_at < ?1 LIMIT ?2")
                .and_then(|mut s| s.query_map(params![before, limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
                .map_err(db_err)?;
            let tx = w.transaction().map_err(db_err)?;
            for (rkey, id) in &rows {
                delete_rows(&tx, *rkey, id).map_err(db_err)?;
            }
            tx.commit().map_err(db_err)?;
            Ok(rows.len())
        })
        .await
    }

    async fn orphans(&self) -> Result<Vec<StoredRequest>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare(&format!(
                    "{SELECT_REQUEST} WHERE {}
                     AND (owner IS NULL OR NOT EXISTS (SELECT 1 FROM nodes n WHERE n.id = requests.owner))",
                    super::unfinished!()
                ))
                .map_err(db_err)?;
            let rows = stmt.query_map([], row_to_request).map_err(db_err)?;
            rows.map(|r| r.map_err(db_err)?).collect()
        })
        .await
    }

    async fn unfinished(&self) -> Result<Vec<StoredRequest>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare(&format!("{SELECT_REQUEST} WHERE {}", super::unfinished!())).map_err(db_err)?;
            let rows = stmt.query_map([], row_to_request).map_err(db_err)?;
            rows.map(|r| r.map_err(db_err)?).collect()
        })
        .await
    }
}
