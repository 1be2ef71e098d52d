//! The request family: requests, their events and raw responses.

use super::{PostgresStore, int, pg_err};
use crate::document::Progress;
use crate::domain::RequestId;
use crate::store::columns::{RequestRow, encode_meta, encode_progress, event_text, json_err};
use crate::store::{RawCursor, RawPage, RawPiece, Store, StoreError, StoredRequest, WebhookStatus, WriteOp};
use async_trait::async_trait;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

/// A whole write batch as one statement. Each `WITH` clause applies one kind of op to arrays of rows:
///
/// - `ins` inserts the new requests (a duplicate id fails the statement, so the whole batch);
/// - `lk` locks the other requests the batch writes to, and drops those deleted meanwhile (a delete that commits
///   first makes the lock find nothing; one that comes later waits for this statement) and those already final:
///   nothing of a final request ever changes, whichever node writes;
/// - `rk` maps every request the batch may write to its internal key: the new ones and the locked ones;
/// - `upd` sets status and progress (and, for a final status, body and `final_at`) of locked requests that are
///   still not final when the update runs (two nodes ending one request at once: the second finds it final);
/// - `ev` and `raw` write events and raw pieces of requests in `rk`; `hook` queues the webhook deliveries of
///   requests this statement inserted or updated, so a delivery is queued once, by the write that ended it.
///
/// `upd` joins `lk`, so a row is locked before it is updated in the same statement (locking a row this statement
/// already updated would skip it).
const WRITE: &str = "
WITH ins AS (
    INSERT INTO requests
        (id, kind, access, created_at, bearer, stream_token, meta, parameters, status, progress, body, final_at, owner)
    SELECT * FROM UNNEST($1::uuid[], $2::smallint[], $3::smallint[], $4::bigint[], $5::bytea[], $6::bytea[],
        $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::bigint[], $31::uuid[])
    RETURNING id, rkey
), lk AS (
    SELECT id, rkey FROM requests WHERE id = ANY($13::uuid[]) AND status NOT IN ('done', 'error', 'stop')
    FOR KEY SHARE
), rk AS (
    SELECT id, rkey FROM ins UNION ALL SELECT id, rkey FROM lk
), upd AS (
    UPDATE requests r SET status = u.status, progress = u.progress,
        body = CASE WHEN u.finished THEN u.body ELSE r.body END,
        final_at = CASE WHEN u.finished THEN u.final_at ELSE r.final_at END
    FROM UNNEST($14::uuid[], $15::text[], $16::text[], $17::bool[], $18::text[], $19::bigint[])
        AS u (id, status, progress, finished, body, final_at)
    JOIN lk ON lk.id = u.id
    WHERE r.rkey = lk.rkey AND r.status NOT IN ('done', 'error', 'stop')
    RETURNING r.id
), ev AS (
    INSERT INTO events (rkey, seq, data)
    SELECT rk.rkey, u.seq, u.data FROM UNNEST($20::uuid[], $21::bigint[], $22::bytea[]) AS u (id, seq, data)
    JOIN rk ON rk.id = u.id
    ON CONFLICT (rkey, seq) DO UPDATE SET data = EXCLUDED.data
), raw AS (
    INSERT INTO raw_parts (rkey, seq, bytes, events_through)
    SELECT rk.rkey, u.seq, u.bytes, u.through
    FROM UNNEST($23::uuid[], $24::bigint[], $25::bytea[], $26::bigint[]) AS u (id, seq, bytes, through)
    JOIN rk ON rk.id = u.id
    ON CONFLICT (rkey, seq) DO UPDATE SET bytes = EXCLUDED.bytes, events_through = EXCLUDED.events_through
), hook AS (
    INSERT INTO webhooks (request_id, url, state, next_attempt_at, status)
    SELECT u.id, u.url, 'pending', u.due, $30 FROM UNNEST($27::uuid[], $28::text[], $29::float8[]) AS u (id, url, due)
    JOIN (SELECT id FROM ins UNION ALL SELECT id FROM upd) w ON w.id = u.id
    ON CONFLICT (request_id) DO NOTHING
)
SELECT 1";

const SELECT_REQUEST: &str = "SELECT id, kind, access, created_at, bearer, stream_token, meta, parameters, progress,
    body, (SELECT COALESCE(MAX(seq), 0) FROM events e WHERE e.rkey = r.rkey), owner FROM requests r";

/// [`SELECT_REQUEST`] without the body.
const SELECT_HEAD: &str = "SELECT id, kind, access, created_at, bearer, stream_token, meta, parameters, progress,
    NULL::text, (SELECT COALESCE(MAX(seq), 0) FROM events e WHERE e.rkey = r.rkey), owner FROM requests r";

/// Requests not final whose node is gone (or that predate nodes).
const ORPHANS: &str = "WHERE status NOT IN ('done', 'error', 'stop')
    AND (owner IS NULL OR NOT EXISTS (SELECT 1 FROM nodes n WHERE n.id = r.owner))";

fn uuid(id: RequestId) -> Uuid {
    Uuid::from_bytes(*id.as_bytes())
}

/// Where one request stands after the batch's ops on it, folded in order.
#[derive(Default)]
struct Folded<'a> {
    /// The last status and progress written; `None` when the batch sets none.
    progress: Option<&'a Progress>,
    /// From the last final status: its body and `final_at`. A later progress keeps them, as an update would.
    finish: Option<(Option<&'a str>, Option<i64>)>,
    /// The first webhook queued (queuing again keeps the first): its URL and due time.
    hook: Option<(&'a str, f64)>,
}

/// A batch grouped by kind, with the same effect as its ops applied one by one:
///
/// - an op on a request that comes before the request's `Insert` is dropped (one by one, it would find no
///   request, or the insert would fail the batch);
/// - status and progress ops on one request fold into one update (or into its insert), see [`Folded`];
/// - nothing after a request's first final status is kept (a final status never changes);
/// - an event or raw piece written twice keeps the last.
#[derive(Default)]
struct Batch<'a> {
    inserts: Vec<&'a crate::document::RequestMeta>,
    folded: HashMap<RequestId, Folded<'a>>,
    /// Requests written to but not inserted by the batch, in first-seen order.
    locked: Vec<RequestId>,
    events: Vec<(RequestId, u64, &'a [u8])>,
    raws: Vec<(RequestId, u64, &'a RawPiece)>,
}

impl<'a> Batch<'a> {
    fn of(ops: &'a [WriteOp]) -> Self {
        let mut inserted_at = HashMap::new();
        for (at, op) in ops.iter().enumerate() {
            if let WriteOp::Insert(meta) = op {
                inserted_at.entry(meta.locator.id).or_insert(at);
            }
        }
        let mut batch = Batch::default();
        let mut event_at: HashMap<(RequestId, u64), usize> = HashMap::new();
        let mut raw_at: HashMap<(RequestId, u64), usize> = HashMap::new();
        let mut ended = std::collections::HashSet::new();
        for (at, op) in ops.iter().enumerate() {
            let id = match op {
                WriteOp::Insert(meta) => {
                    batch.inserts.push(meta);
                    batch.folded.entry(meta.locator.id).or_default();
                    continue;
                }
                WriteOp::Event { id, .. }
                | WriteOp::Raw { id, .. }
                | WriteOp::Progress { id, .. }
                | WriteOp::Finish { id, .. } => *id,
            };
            if ended.contains(&id) {
                continue;
            }
            match inserted_at.get(&id) {
                Some(insert) if *insert > at => continue,
                Some(_) => {}
                None => {
                    if let Entry::Vacant(entry) = batch.folded.entry(id) {
                        entry.insert(Folded::default());
                        batch.locked.push(id);
                    }
                }
            }
            match op {
                WriteOp::Insert(_) => {}
                WriteOp::Event { seq, data, .. } => match event_at.entry((id, *seq)) {
                    Entry::Occupied(e) => batch.events[*e.get()].2 = &data[..],
                    Entry::Vacant(e) => {
                        e.insert(batch.events.len());
                        batch.events.push((id, *seq, &data[..]));
                    }
                },
                WriteOp::Raw { seq, piece, .. } => match raw_at.entry((id, *seq)) {
                    Entry::Occupied(e) => batch.raws[*e.get()].2 = piece,
                    Entry::Vacant(e) => {
                        e.insert(batch.raws.len());
                        batch.raws.push((id, *seq, piece));
                    }
                },
                WriteOp::Progress { progress, .. } => {
                    if let Some(state) = batch.folded.get_mut(&id) {
                        state.progress = Some(progress);
                    }
                }
                WriteOp::Finish { progress, body, webhook_url, .. } => {
                    ended.insert(id);
                    if let Some(state) = batch.folded.get_mut(&id) {
                        state.progress = Some(progress);
                        state.finish = Some((body.as_deref(), progress.processed_at.map(|t| t as i64)));
                        if state.hook.is_none()
                            && let Some(url) = webhook_url
                        {
                            state.hook = Some((url, progress.processed_at.unwrap_or(0.0)));
                        }
                    }
                }
            }
        }
        batch
    }
}

/// The parameters of [`WRITE`] for one batch.
struct WriteParams<'a> {
    ins_id: Vec<Uuid>,
    ins_kind: Vec<i16>,
    ins_access: Vec<i16>,
    ins_created_at: Vec<i64>,
    ins_bearer: Vec<Option<&'a [u8]>>,
    ins_stream_token: Vec<Option<&'a [u8]>>,
    ins_meta: Vec<String>,
    ins_parameters: Vec<&'a str>,
    ins_status: Vec<&'static str>,
    ins_progress: Vec<String>,
    ins_body: Vec<Option<&'a str>>,
    ins_final_at: Vec<Option<i64>>,
    ins_owner: Vec<Option<Uuid>>,
    lock_id: Vec<Uuid>,
    upd_id: Vec<Uuid>,
    upd_status: Vec<&'static str>,
    upd_progress: Vec<String>,
    upd_finished: Vec<bool>,
    upd_body: Vec<Option<&'a str>>,
    upd_final_at: Vec<Option<i64>>,
    ev_id: Vec<Uuid>,
    ev_seq: Vec<i64>,
    ev_data: Vec<&'a [u8]>,
    raw_id: Vec<Uuid>,
    raw_seq: Vec<i64>,
    raw_bytes: Vec<Option<&'a [u8]>>,
    raw_through: Vec<Option<i64>>,
    hook_id: Vec<Uuid>,
    hook_url: Vec<&'a str>,
    hook_due: Vec<f64>,
    hook_status: String,
}

impl<'a> WriteParams<'a> {
    fn of(batch: &Batch<'a>) -> Result<Self, StoreError> {
        let pending = Progress::pending();
        let n = batch.inserts.len();
        let mut p = WriteParams {
            ins_id: Vec::with_capacity(n),
            ins_kind: Vec::with_capacity(n),
            ins_access: Vec::with_capacity(n),
            ins_created_at: Vec::with_capacity(n),
            ins_bearer: Vec::with_capacity(n),
            ins_stream_token: Vec::with_capacity(n),
            ins_meta: Vec::with_capacity(n),
            ins_parameters: Vec::with_capacity(n),
            ins_status: Vec::with_capacity(n),
            ins_progress: Vec::with_capacity(n),
            ins_body: Vec::with_capacity(n),
            ins_final_at: Vec::with_capacity(n),
            ins_owner: Vec::with_capacity(n),
            lock_id: batch.locked.iter().map(|id| uuid(*id)).collect(),
            upd_id: Vec::new(),
            upd_status: Vec::new(),
            upd_progress: Vec::new(),
            upd_finished: Vec::new(),
            upd_body: Vec::new(),
            upd_final_at: Vec::new(),
            ev_id: batch.events.iter().map(|e| uuid(e.0)).collect(),
            ev_seq: batch.events.iter().map(|e| int(e.1)).collect(),
            ev_data: batch.events.iter().map(|e| e.2).collect(),
            raw_id: batch.raws.iter().map(|r| uuid(r.0)).collect(),
            raw_seq: batch.raws.iter().map(|r| int(r.1)).collect(),
            raw_bytes: batch
                .raws
                .iter()
                .map(|r| match r.2 {
                    RawPiece::Bytes(bytes) => Some(&bytes[..]),
                    RawPiece::Events { .. } => None,
                })
                .collect(),
            raw_through: batch
                .raws
                .iter()
                .map(|r| match r.2 {
                    RawPiece::Bytes(_) => None,
                    RawPiece::Events { through } => through.map(int),
                })
                .collect(),
            hook_id: Vec::new(),
            hook_url: Vec::new(),
            hook_due: Vec::new(),
            hook_status: serde_json::to_string(&WebhookStatus::pending()).map_err(json_err)?,
        };
        for meta in &batch.inserts {
            let id = meta.locator.id;
            let state = batch.folded.get(&id);
            let progress = state.and_then(|s| s.progress).unwrap_or(&pending);
            let (body, final_at) = state.and_then(|s| s.finish).unwrap_or((None, None));
            p.ins_id.push(uuid(id));
            p.ins_kind.push(i16::from(meta.locator.kind.code()));
            p.ins_access.push(i16::from(meta.locator.access.code()));
            p.ins_created_at.push(meta.locator.created_at);
            p.ins_bearer.push(meta.bearer.as_ref().map(|h| &h.as_bytes()[..]));
            p.ins_stream_token.push(meta.stream_token.as_ref().map(|h| &h.as_bytes()[..]));
            p.ins_meta.push(encode_meta(meta)?);
            p.ins_parameters.push(meta.parameters.get());
            p.ins_status.push(progress.status.as_str());
            p.ins_progress.push(encode_progress(progress)?);
            p.ins_body.push(body);
            p.ins_final_at.push(final_at);
            p.ins_owner.push(meta.owner.map(|n| n.as_uuid()));
        }
        for id in &batch.locked {
            let Some(state) = batch.folded.get(id) else { continue };
            let Some(progress) = state.progress else { continue };
            let (body, final_at) = state.finish.unwrap_or((None, None));
            p.upd_id.push(uuid(*id));
            p.upd_status.push(progress.status.as_str());
            p.upd_progress.push(encode_progress(progress)?);
            p.upd_finished.push(state.finish.is_some());
            p.upd_body.push(body);
            p.upd_final_at.push(final_at);
        }
        let queued = batch.inserts.iter().map(|m| m.locator.id).chain(batch.locked.iter().copied());
        for id in queued {
            if let Some((url, due)) = batch.folded.get(&id).and_then(|s| s.hook) {
                p.hook_id.push(uuid(id));
                p.hook_url.push(url);
                p.hook_due.push(due);
            }
        }
        Ok(p)
    }

    fn as_params(&self) -> [&(dyn ToSql + Sync); 31] {
        [
            &self.ins_id,
            &self.ins_kind,
            &self.ins_access,
            &self.ins_created_at,
            &self.ins_bearer,
            &self.ins_stream_token,
            &self.ins_meta,
            &self.ins_parameters,
            &self.ins_status,
            &self.ins_progress,
            &self.ins_body,
            &self.ins_final_at,
            &self.lock_id,
            &self.upd_id,
            &self.upd_status,
            &self.upd_progress,
            &self.upd_finished,
            &self.upd_body,
            &self.upd_final_at,
            &self.ev_id,
            &self.ev_seq,
            &self.ev_data,
            &self.raw_id,
            &self.raw_seq,
            &self.raw_bytes,
            &self.raw_through,
            &self.hook_id,
            &self.hook_url,
            &self.hook_due,
            &self.hook_status,
            &self.ins_owner,
        ]
    }
}

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
        if ops.is_empty() {
            return Ok(());
        }
        let batch = Batch::of(&ops);
        let params = WriteParams::of(&batch)?;
        let client = self.client().await?;
        let stmt = client.prepare_cached(WRITE).await.map_err(pg_err)?;
        client.execute(&stmt, &params.as_params()).await.map_err(pg_err)?;
        Ok(())
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
