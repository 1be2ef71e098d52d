//! The request family: requests, their events and raw responses.

use super::{SqliteStore, Writer, db_err, json_err};
use crate::document::model::Options;
use crate::document::{Progress, RequestMeta};
use crate::domain::{Access, Kind, Locator, RequestId, TokenHash};
use crate::store::{RawPiece, Store, StoreError, StoredRequest, WriteOp};
use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::Arc;

/// The parts of [`RequestMeta`] kept as one JSON column.
#[derive(Serialize, Deserialize)]
struct MetaColumn {
    created: f64,
    conversation_id: String,
    options: Options,
    #[serde(default)]
    from_status_url: Option<String>,
}

/// The internal key of a request: from the map of live requests, else from the table. `None` when the request
/// is gone (deleted while a write for it was queued): such writes are dropped, never left orphaned.
fn rkey(conn: &Connection, rkeys: &mut HashMap<RequestId, i64>, id: RequestId) -> Result<Option<i64>, StoreError> {
    if let Some(key) = rkeys.get(&id) {
        return Ok(Some(*key));
    }
    let key: Option<i64> = conn
        .prepare_cached("SELECT rkey FROM requests WHERE id = ?1")
        .and_then(|mut s| s.query_row([id.as_bytes()], |r| r.get(0)).optional())
        .map_err(db_err)?;
    if let Some(key) = key {
        rkeys.insert(id, key);
    }
    Ok(key)
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
    let Writer { conn, rkeys } = w;
    let tx = conn.transaction().map_err(db_err)?;
    let Some(key) = rkey(&tx, rkeys, id)? else {
        return Ok(false);
    };
    let deleted = delete_rows(&tx, key, id.as_bytes()).map_err(db_err)?;
    tx.commit().map_err(db_err)?;
    rkeys.remove(&id);
    Ok(deleted)
}

fn apply(w: &mut Writer, ops: &[WriteOp]) -> Result<(), StoreError> {
    let mut inserted = Vec::new();
    let result = apply_in_transaction(w, ops, &mut inserted);
    match &result {
        Ok(()) => {
            for op in ops {
                if let WriteOp::Finish { id, .. } = op {
                    w.rkeys.remove(id);
                }
            }
        }
        // Rolled back: the keys handed out in this batch do not exist.
        Err(_) => inserted.iter().for_each(|id| {
            w.rkeys.remove(id);
        }),
    }
    result
}

fn apply_in_transaction(w: &mut Writer, ops: &[WriteOp], inserted: &mut Vec<RequestId>) -> Result<(), StoreError> {
    let Writer { conn, rkeys } = w;
    let tx = conn.transaction().map_err(db_err)?;
    for op in ops {
        match op {
            WriteOp::Insert(meta) => {
                let column = MetaColumn {
                    created: meta.created,
                    conversation_id: meta.conversation_id.clone(),
                    options: meta.options.clone(),
                    from_status_url: meta.from_status_url.clone(),
                };
                let meta_json = serde_json::to_string(&column).map_err(json_err)?;
                let progress = serde_json::to_string(&Progress::pending()).map_err(json_err)?;
                tx.prepare_cached(
                    "INSERT INTO requests (id, kind, access, created_at, bearer, stream_token, meta, parameters, status, progress)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'pending', ?9)",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        meta.locator.id.as_bytes(),
                        meta.locator.kind.code(),
                        meta.locator.access.code(),
                        meta.locator.created_at,
                        meta.bearer.as_ref().map(|h| h.as_bytes().to_vec()),
                        meta.stream_token.as_ref().map(|h| h.as_bytes().to_vec()),
                        meta_json,
                        meta.parameters.get(),
                        progress,
                    ])
                })
                .map_err(db_err)?;
                rkeys.insert(meta.locator.id, tx.last_insert_rowid());
                inserted.push(meta.locator.id);
            }
            WriteOp::Event { id, seq, data } => {
                let Some(key) = rkey(&tx, rkeys, *id)? else { continue };
                tx.prepare_cached("INSERT OR REPLACE INTO events (rkey, seq, data) VALUES (?1, ?2, ?3)")
                    .and_then(|mut s| s.execute(params![key, seq, &data[..]]))
                    .map_err(db_err)?;
            }
            WriteOp::Raw { id, seq, piece } => {
                let Some(key) = rkey(&tx, rkeys, *id)? else { continue };
                let (bytes, through) = match piece {
                    RawPiece::Bytes(bytes) => (Some(&bytes[..]), None),
                    RawPiece::Events { through } => (None, *through),
                };
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO raw_parts (rkey, seq, bytes, events_through) VALUES (?1, ?2, ?3, ?4)",
                )
                .and_then(|mut s| s.execute(params![key, seq, bytes, through]))
                .map_err(db_err)?;
            }
            WriteOp::Progress { id, progress } => {
                let Some(key) = rkey(&tx, rkeys, *id)? else { continue };
                let json = serde_json::to_string(progress).map_err(json_err)?;
                tx.prepare_cached("UPDATE requests SET status = ?2, progress = ?3 WHERE rkey = ?1")
                    .and_then(|mut s| s.execute(params![key, progress.status.as_str(), json]))
                    .map_err(db_err)?;
            }
            WriteOp::Finish { id, progress, body, webhook_url } => {
                let Some(key) = rkey(&tx, rkeys, *id)? else { continue };
                let json = serde_json::to_string(progress).map_err(json_err)?;
                let final_at = progress.processed_at.map(|t| t as i64);
                tx.prepare_cached(
                    "UPDATE requests SET status = ?2, progress = ?3, body = ?4, final_at = ?5 WHERE rkey = ?1",
                )
                .and_then(|mut s| s.execute(params![key, progress.status.as_str(), json, body, final_at]))
                .map_err(db_err)?;
                if let Some(url) = webhook_url {
                    super::webhooks::queue(&tx, *id, url, progress.processed_at.unwrap_or(0.0))?;
                }
            }
        }
    }
    tx.commit().map_err(db_err)
}

const SELECT_REQUEST: &str =
    "SELECT id, kind, access, created_at, bearer, stream_token, meta, parameters, progress, body,
    (SELECT COALESCE(MAX(seq), 0) FROM events WHERE events.rkey = requests.rkey) FROM requests";

fn row_to_request(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<StoredRequest, StoreError>> {
    let id: Vec<u8> = row.get(0)?;
    let kind: u8 = row.get(1)?;
    let access: u8 = row.get(2)?;
    let created_at: i64 = row.get(3)?;
    let bearer: Option<Vec<u8>> = row.get(4)?;
    let stream_token: Option<Vec<u8>> = row.get(5)?;
    let meta: String = row.get(6)?;
    let parameters: String = row.get(7)?;
    let progress: String = row.get(8)?;
    let body: Option<String> = row.get(9)?;
    let event_count: i64 = row.get(10)?;
    Ok(decode(id, kind, access, created_at, bearer, stream_token, &meta, parameters, &progress, body, event_count))
}

#[expect(clippy::too_many_arguments, reason = "one argument per stored column")]
fn decode(
    id: Vec<u8>,
    kind: u8,
    access: u8,
    created_at: i64,
    bearer: Option<Vec<u8>>,
    stream_token: Option<Vec<u8>>,
    meta: &str,
    parameters: String,
    progress: &str,
    body: Option<String>,
    event_count: i64,
) -> Result<StoredRequest, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(what.to_owned());
    let id = RequestId::from_bytes(id.try_into().map_err(|_| corrupt("request id"))?);
    let column: MetaColumn = serde_json::from_str(meta).map_err(json_err)?;
    let hash =
        |b: Option<Vec<u8>>| b.map(|b| TokenHash::from_bytes(&b).ok_or_else(|| corrupt("token hash"))).transpose();
    Ok(StoredRequest {
        meta: RequestMeta {
            locator: Locator {
                kind: Kind::from_code(kind).ok_or_else(|| corrupt("kind"))?,
                access: Access::from_code(access).ok_or_else(|| corrupt("access"))?,
                created_at,
                id,
            },
            created: column.created,
            conversation_id: column.conversation_id,
            bearer: hash(bearer)?,
            stream_token: hash(stream_token)?,
            options: column.options,
            from_status_url: column.from_status_url,
            parameters: RawValue::from_string(parameters).map_err(json_err)?,
        },
        progress: serde_json::from_str(progress).map_err(json_err)?,
        body,
        event_count: u64::try_from(event_count).unwrap_or(0),
    })
}

#[async_trait]
impl Store for SqliteStore {
    async fn write(&self, ops: Arc<[WriteOp]>) -> Result<(), StoreError> {
        self.write_with(move |w| apply(w, &ops)).await
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
                    let data: Vec<u8> = r.get(1)?;
                    // Stored from text received as UTF-8; the lossy path cannot lose anything.
                    let data =
                        String::from_utf8(data).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
                    Ok((r.get::<_, u64>(0)?, data))
                })
                .map_err(db_err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db_err)
        })
        .await
    }

    async fn raw(&self, id: RequestId) -> Result<Vec<u8>, StoreError> {
        self.read(move |conn| {
            let Some(key): Option<i64> = conn
                .prepare_cached("SELECT rkey FROM requests WHERE id = ?1")
                .and_then(|mut s| s.query_row([id.as_bytes()], |r| r.get(0)).optional())
                .map_err(db_err)?
            else {
                return Ok(Vec::new());
            };
            let mut pieces = conn
                .prepare_cached("SELECT bytes, events_through FROM raw_parts WHERE rkey = ?1 ORDER BY seq")
                .map_err(db_err)?;
            let mut rows = pieces.query([key]).map_err(db_err)?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().map_err(db_err)? {
                match row
                    .get_ref(0)
                    .map_err(db_err)?
                    .as_blob_or_null()
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?
                {
                    Some(bytes) => out.extend_from_slice(bytes),
                    None => {
                        let through: Option<i64> = row.get(1).map_err(db_err)?;
                        let mut events = conn
                            .prepare_cached("SELECT data FROM events WHERE rkey = ?1 AND seq <= ?2 ORDER BY seq")
                            .map_err(db_err)?;
                        let mut data = events.query(params![key, through.unwrap_or(i64::MAX)]).map_err(db_err)?;
                        while let Some(event) = data.next().map_err(db_err)? {
                            out.extend_from_slice(b"data: ");
                            out.extend_from_slice(
                                event
                                    .get_ref(0)
                                    .map_err(db_err)?
                                    .as_blob()
                                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                            );
                            out.extend_from_slice(b"\n\n");
                        }
                    }
                }
            }
            Ok(out)
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

    async fn unfinished(&self) -> Result<Vec<StoredRequest>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare(&format!("{SELECT_REQUEST} WHERE status NOT IN ('done', 'error', 'stop')"))
                .map_err(db_err)?;
            let rows = stmt.query_map([], row_to_request).map_err(db_err)?;
            rows.map(|r| r.map_err(db_err)?).collect()
        })
        .await
    }
}
