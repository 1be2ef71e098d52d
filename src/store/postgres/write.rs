//! Writing a batch: its [`Plan`] as one statement, so one round trip and one implicit transaction whatever its
//! size.

use super::{PostgresStore, int, pg_err};
use crate::document::Progress;
use crate::domain::RequestId;
use crate::store::columns::{encode_meta, encode_progress, json_err};
use crate::store::pipeline::plan::{Finish, Plan};
use crate::store::usage::key_column;
use crate::store::{RawPiece, StoreError, WebhookStatus, WriteOp};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

/// A whole write batch as one statement: its [`Plan`], each `WITH` clause applying one kind of write to arrays of
/// rows:
///
/// - `ins` inserts the new requests (a duplicate id fails the statement, so the whole batch);
/// - `lk` locks the other requests the batch writes to, and drops those deleted meanwhile (a delete that commits
///   first makes the lock find nothing; one that comes later waits for this statement) and those already final:
///   nothing of a final request ever changes, whichever node writes;
/// - `rk` maps every request the batch may write to its internal key: the new ones and the locked ones;
/// - `upd` sets status and progress (and, for a final status, body and `final_at`) of locked requests that are
///   still not final when the update runs (two nodes ending one request at once: the second finds it final);
/// - `ev` and `raw` write events and raw pieces of requests in `rk`; `hook` queues the webhook deliveries of
///   requests this statement inserted or updated, so a delivery is queued once, by the write that ended it;
/// - `tally` adds the finished requests to their (key, model, day) usage rows, likewise once (in a fixed order of
///   rows, so that two nodes' batches lock them in the same order).
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
), tally AS (
    INSERT INTO token_usage (key_id, model, day, requests, input_tokens, output_tokens)
    SELECT u.key_id, u.model, u.day, count(*), sum(u.input), sum(u.output)
    FROM UNNEST($32::uuid[], $33::text[], $34::text[], $35::text[], $36::bigint[], $37::bigint[])
        AS u (id, key_id, model, day, input, output)
    JOIN (SELECT id FROM ins UNION ALL SELECT id FROM upd) w ON w.id = u.id
    GROUP BY u.key_id, u.model, u.day
    ORDER BY u.key_id, u.day, u.model
    ON CONFLICT (key_id, day, model) DO UPDATE SET requests = token_usage.requests + EXCLUDED.requests,
        input_tokens = token_usage.input_tokens + EXCLUDED.input_tokens,
        output_tokens = token_usage.output_tokens + EXCLUDED.output_tokens
)
SELECT 1";

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
    tally_id: Vec<Uuid>,
    tally_key: Vec<&'a str>,
    tally_model: Vec<&'a str>,
    tally_day: Vec<&'a str>,
    tally_input: Vec<i64>,
    tally_output: Vec<i64>,
}

impl<'a> WriteParams<'a> {
    fn of(plan: &Plan<'a>) -> Result<Self, StoreError> {
        let pending = Progress::pending();
        let n = plan.inserts.len();
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
            lock_id: plan.existing.iter().map(|e| uuid(e.id)).collect(),
            upd_id: Vec::new(),
            upd_status: Vec::new(),
            upd_progress: Vec::new(),
            upd_finished: Vec::new(),
            upd_body: Vec::new(),
            upd_final_at: Vec::new(),
            ev_id: plan.events.iter().map(|e| uuid(e.id)).collect(),
            ev_seq: plan.events.iter().map(|e| int(e.seq)).collect(),
            ev_data: plan.events.iter().map(|e| e.data).collect(),
            raw_id: plan.raws.iter().map(|r| uuid(r.id)).collect(),
            raw_seq: plan.raws.iter().map(|r| int(r.seq)).collect(),
            raw_bytes: plan
                .raws
                .iter()
                .map(|r| match r.piece {
                    RawPiece::Bytes(bytes) => Some(&bytes[..]),
                    RawPiece::Events { .. } => None,
                })
                .collect(),
            raw_through: plan
                .raws
                .iter()
                .map(|r| match r.piece {
                    RawPiece::Bytes(_) => None,
                    RawPiece::Events { through } => through.map(int),
                })
                .collect(),
            hook_id: Vec::new(),
            hook_url: Vec::new(),
            hook_due: Vec::new(),
            hook_status: serde_json::to_string(&WebhookStatus::pending()).map_err(json_err)?,
            tally_id: Vec::new(),
            tally_key: Vec::new(),
            tally_model: Vec::new(),
            tally_day: Vec::new(),
            tally_input: Vec::new(),
            tally_output: Vec::new(),
        };
        for insert in &plan.inserts {
            let (meta, outcome) = (insert.meta, insert.outcome);
            let progress = outcome.progress.unwrap_or(&pending);
            let finish = outcome.finish.unwrap_or(Finish { body: None, final_at: None });
            p.ins_id.push(uuid(insert.id()));
            p.ins_kind.push(i16::from(meta.locator.kind.code()));
            p.ins_access.push(i16::from(meta.locator.access.code()));
            p.ins_created_at.push(meta.locator.created_at);
            p.ins_bearer.push(meta.bearer.as_ref().map(|h| &h.as_bytes()[..]));
            p.ins_stream_token.push(meta.stream_token.as_ref().map(|h| &h.as_bytes()[..]));
            p.ins_meta.push(encode_meta(meta)?);
            p.ins_parameters.push(meta.parameters.get());
            p.ins_status.push(progress.status.as_str());
            p.ins_progress.push(encode_progress(progress)?);
            p.ins_body.push(finish.body);
            p.ins_final_at.push(finish.final_at);
            p.ins_owner.push(meta.owner.map(|n| n.as_uuid()));
        }
        for existing in &plan.existing {
            let Some(progress) = existing.outcome.progress else { continue };
            let finish = existing.outcome.finish;
            let Finish { body, final_at } = finish.unwrap_or(Finish { body: None, final_at: None });
            p.upd_id.push(uuid(existing.id));
            p.upd_status.push(progress.status.as_str());
            p.upd_progress.push(encode_progress(progress)?);
            p.upd_finished.push(finish.is_some());
            p.upd_body.push(body);
            p.upd_final_at.push(final_at);
        }
        let outcomes = plan.inserts.iter().map(|i| (i.id(), i.outcome));
        for (id, outcome) in outcomes.chain(plan.existing.iter().map(|e| (e.id, e.outcome))) {
            if let Some(hook) = outcome.hook {
                p.hook_id.push(uuid(id));
                p.hook_url.push(hook.url);
                p.hook_due.push(hook.due);
            }
            if let Some(tally) = outcome.usage.filter(|_| outcome.finish.is_some()) {
                p.tally_id.push(uuid(id));
                p.tally_key.push(key_column(tally.key.as_deref()));
                p.tally_model.push(&tally.model);
                p.tally_day.push(&tally.day);
                p.tally_input.push(int(tally.input));
                p.tally_output.push(int(tally.output));
            }
        }
        Ok(p)
    }

    fn as_params(&self) -> [&(dyn ToSql + Sync); 37] {
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
            &self.tally_id,
            &self.tally_key,
            &self.tally_model,
            &self.tally_day,
            &self.tally_input,
            &self.tally_output,
        ]
    }
}

pub(super) fn uuid(id: RequestId) -> Uuid {
    Uuid::from_bytes(*id.as_bytes())
}

impl PostgresStore {
    /// Applies a batch ([`crate::store::Store::write`]).
    pub(super) async fn write_batch(&self, ops: &[WriteOp]) -> Result<(), StoreError> {
        let plan = Plan::of(ops);
        if plan.is_empty() {
            return Ok(());
        }
        let params = WriteParams::of(&plan)?;
        let client = self.client().await?;
        let stmt = client.prepare_cached(WRITE).await.map_err(pg_err)?;
        client.execute(&stmt, &params.as_params()).await.map_err(pg_err)?;
        Ok(())
    }
}
