//! Writing a batch on the writer thread: its [`Plan`] executed with cached statements, in one transaction, or in
//! several when the schedule ([`SerialQueue::urgent_due`]) hands creates' inserts to a long batch.

use super::{Writer, db_err};
use crate::document::Progress;
use crate::domain::RequestId;
use crate::store::columns::{encode_meta, encode_progress};
use crate::store::pipeline::plan::{Event, Existing, Insert, Plan, Raw};
use crate::store::pipeline::serial::{SerialQueue, Urgent};
use crate::store::usage::{Tally, key_column};
use crate::store::{RawPiece, StoreError, WriteOp};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use std::collections::HashMap;

/// The key of a request not final yet.
const LIVE_RKEY: &str = concat!("SELECT rkey FROM requests WHERE id = ?1 AND ", super::unfinished!());
/// A new request.
const INSERT_REQUEST: &str = "INSERT INTO requests (id, kind, access, created_at, bearer, stream_token, meta,
     parameters, status, progress, body, final_at, owner)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)";
/// A running request's progress.
const UPDATE_PROGRESS: &str =
    concat!("UPDATE requests SET status = ?2, progress = ?3 WHERE rkey = ?1 AND ", super::unfinished!());
/// A request's final write.
const SETTLE: &str = concat!(
    "UPDATE requests SET status = ?2, progress = ?3, body = ?4, final_at = ?5 WHERE rkey = ?1 AND ",
    super::unfinished!()
);
/// The statements every request runs, for the test that none builds a temporary B-tree.
#[cfg(test)]
pub(super) const PER_REQUEST: [&str; 4] = [LIVE_RKEY, INSERT_REQUEST, UPDATE_PROGRESS, SETTLE];

/// The internal key of a request that may still be written to: from the map of live requests, else from the
/// table. `None` when the request is gone (deleted while a write for it was queued) or already final: such
/// writes are dropped, so nothing of a final request ever changes and nothing is left orphaned.
fn rkey(conn: &Connection, rkeys: &mut HashMap<RequestId, i64>, id: RequestId) -> Result<Option<i64>, StoreError> {
    if let Some(key) = rkeys.get(&id) {
        return Ok(Some(*key));
    }
    let key: Option<i64> = conn
        .prepare_cached(LIVE_RKEY)
        .and_then(|mut s| s.query_row([id.as_bytes()], |r| r.get(0)).optional())
        .map_err(db_err)?;
    if let Some(key) = key {
        rkeys.insert(id, key);
    }
    Ok(key)
}

/// Applies a batch. `may_yield`: it may commit in parts to let creates' inserts in (never a batch with inserts
/// of its own: their keys are handed out in its transaction).
pub(super) fn apply(w: &mut Writer, ops: &[WriteOp], may_yield: bool) -> Result<(), StoreError> {
    let plan = Plan::of(ops);
    let mut inserted = Vec::new();
    let result = execute(w, &plan, &mut inserted, may_yield);
    match &result {
        Ok(()) => plan.finished().for_each(|id| {
            w.rkeys.remove(&id);
        }),
        // Rolled back: the keys handed out in this batch do not exist.
        Err(_) => inserted.iter().for_each(|id| {
            w.rkeys.remove(id);
        }),
    }
    result
}

/// Creates waiting for the writer: their inserts in one transaction (group commit), each told the outcome.
pub(super) fn run_urgent(w: &mut Writer, jobs: Vec<Urgent>) {
    let ops: Vec<WriteOp> = jobs.iter().flat_map(|(ops, _)| ops.iter().cloned()).collect();
    let result = apply(w, &ops, false);
    for (_, done) in jobs {
        let _ = done.send(result.clone());
    }
}

/// One write of a plan after its inserts.
enum Step<'p, 'a> {
    Event(&'p Event<'a>),
    Raw(&'p Raw<'a>),
    Update(i64, &'p Existing<'a>),
}

/// Executes the plan: inserts, then events, raw pieces and status updates of the requests that may still be
/// written to. Between two writes, inserts handed over by the schedule join the transaction, which commits, and
/// the plan goes on in a new one. On an error the plan may thus be partly stored; the persister tries it again
/// whole, and every write in it can be applied twice without harm (events and raw pieces replace themselves, a
/// final status applies once and goes after everything of its request, nothing is written after it).
fn execute(w: &mut Writer, plan: &Plan<'_>, inserted: &mut Vec<RequestId>, may_yield: bool) -> Result<(), StoreError> {
    let Writer { conn, rkeys, queue, .. } = w;
    // IMMEDIATE: take the write lock before reading, so that a writer of another process (the `keys` command)
    // makes this one wait its turn instead of failing on a snapshot gone stale.
    let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
    let mut opened = std::time::Instant::now();
    let mut keys = HashMap::with_capacity(plan.inserts.len() + plan.existing.len());
    for insert in &plan.inserts {
        let key = insert_one(&tx, insert)?;
        keys.insert(insert.id(), key);
        rkeys.insert(insert.id(), key);
        inserted.push(insert.id());
    }
    let mut updates = Vec::new();
    for existing in &plan.existing {
        if let Some(key) = rkey(&tx, rkeys, existing.id)? {
            keys.insert(existing.id, key);
            updates.push(Step::Update(key, existing));
        }
    }
    let mut steps =
        plan.events.iter().map(Step::Event).chain(plan.raws.iter().map(Step::Raw)).chain(updates).peekable();
    let yield_due = |opened| may_yield.then(|| queue.urgent_due(opened)).flatten();
    while let Some(waiting) = run_steps(&tx, &keys, &mut steps, || yield_due(opened))? {
        join_and_commit(tx, rkeys, waiting)?;
        tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
        opened = std::time::Instant::now();
    }
    tx.commit().map_err(db_err)
}

/// Runs steps in `tx` until there are none left (`None`) or `yield_due` hands over creates waiting for the writer.
fn run_steps<'p, 'a: 'p>(
    tx: &Connection,
    keys: &HashMap<RequestId, i64>,
    steps: &mut std::iter::Peekable<impl Iterator<Item = Step<'p, 'a>>>,
    yield_due: impl Fn() -> Option<Vec<Urgent>>,
) -> Result<Option<Vec<Urgent>>, StoreError> {
    // The events' statement, taken from the cache once per transaction rather than once per event (each take
    // hashes the SQL text).
    let mut insert_event = None;
    while steps.peek().is_some() {
        if let Some(waiting) = yield_due() {
            return Ok(Some(waiting));
        }
        let Some(step) = steps.next() else { break };
        match step {
            Step::Event(event) => {
                let Some(key) = keys.get(&event.id) else { continue };
                let statement = match &mut insert_event {
                    Some(statement) => statement,
                    None => insert_event.insert(
                        tx.prepare_cached("INSERT OR REPLACE INTO events (rkey, seq, data) VALUES (?1, ?2, ?3)")
                            .map_err(db_err)?,
                    ),
                };
                statement.execute(params![key, event.seq, event.data]).map_err(db_err)?;
            }
            Step::Raw(raw) => {
                let Some(key) = keys.get(&raw.id) else { continue };
                let (bytes, through) = match raw.piece {
                    RawPiece::Bytes(bytes) => (Some(&bytes[..]), None),
                    RawPiece::Events { through } => (None, *through),
                };
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO raw_parts (rkey, seq, bytes, events_through) VALUES (?1, ?2, ?3, ?4)",
                )
                .and_then(|mut s| s.execute(params![key, raw.seq, bytes, through]))
                .map_err(db_err)?;
            }
            Step::Update(key, existing) => update(tx, key, existing)?,
        }
    }
    Ok(None)
}

/// The inserts the schedule handed over join the transaction, which commits: one commit lets them in. If that
/// fails, they fail with the batch (rolled back whole, and retried by the persister).
fn join_and_commit(
    tx: rusqlite::Transaction<'_>,
    rkeys: &mut HashMap<RequestId, i64>,
    waiting: Vec<Urgent>,
) -> Result<(), StoreError> {
    let ops: Vec<WriteOp> = waiting.iter().flat_map(|(ops, _)| ops.iter().cloned()).collect();
    let plan = Plan::of(&ops);
    let mut new = Vec::new();
    let mut joined = || -> Result<(), StoreError> {
        for insert in &plan.inserts {
            rkeys.insert(insert.id(), insert_one(&tx, insert)?);
            new.push(insert.id());
        }
        // Creates' writes are inserts (what else they hold applies like any batch's, without yielding).
        for existing in &plan.existing {
            if let Some(key) = rkey(&tx, rkeys, existing.id)? {
                update(&tx, key, existing)?;
            }
        }
        Ok(())
    };
    let result = joined().and_then(|()| tx.commit().map_err(db_err));
    match &result {
        Ok(()) => plan.finished().for_each(|id| {
            rkeys.remove(&id);
        }),
        Err(_) => new.iter().for_each(|id| {
            rkeys.remove(id);
        }),
    }
    for (_, done) in waiting {
        let _ = done.send(result.clone());
    }
    result
}

/// Inserts a new request with what its batch leaves it with (and the webhook of a final status); its key.
fn insert_one(tx: &Connection, insert: &Insert<'_>) -> Result<i64, StoreError> {
    let (meta, outcome) = (insert.meta, insert.outcome);
    let pending = Progress::pending();
    let progress = outcome.progress.unwrap_or(&pending);
    let (body, final_at) = outcome.finish.map_or((None, None), |f| (f.body, f.final_at));
    let (meta_json, progress_json) = (encode_meta(meta)?, encode_progress(progress)?);
    tx.prepare_cached(INSERT_REQUEST)
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
                progress.status.as_str(),
                progress_json,
                body,
                final_at,
                meta.owner.map(|n| n.as_bytes().to_vec()),
            ])
        })
        .map_err(db_err)?;
    let key = tx.last_insert_rowid();
    if let Some(hook) = outcome.hook {
        super::webhooks::queue(tx, insert.id(), hook.url, hook.due)?;
    }
    if let Some(tally) = outcome.usage.filter(|_| outcome.finish.is_some()) {
        add_usage(tx, tally)?;
    }
    Ok(key)
}

/// Sets the status and progress of a request that was not final when its key was found (and, for a final
/// status, body and `final_at`, and queues its webhook): conditional even with the key in hand, since another
/// handle on the file may have ended it first.
fn update(tx: &Connection, key: i64, existing: &Existing<'_>) -> Result<(), StoreError> {
    let outcome = existing.outcome;
    let Some(progress) = outcome.progress else { return Ok(()) };
    let json = encode_progress(progress)?;
    let Some(finish) = outcome.finish else {
        tx.prepare_cached(UPDATE_PROGRESS)
            .and_then(|mut s| s.execute(params![key, progress.status.as_str(), json]))
            .map_err(db_err)?;
        return Ok(());
    };
    let changed = tx
        .prepare_cached(SETTLE)
        .and_then(|mut s| s.execute(params![key, progress.status.as_str(), json, finish.body, finish.final_at]))
        .map_err(db_err)?;
    if changed > 0 {
        if let Some(hook) = outcome.hook {
            super::webhooks::queue(tx, existing.id, hook.url, hook.due)?;
        }
        if let Some(tally) = outcome.usage {
            add_usage(tx, tally)?;
        }
    }
    Ok(())
}

/// Adds a finished request and its tokens to its (key, model, day) row.
fn add_usage(tx: &Connection, tally: &Tally) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO token_usage (key_id, model, day, requests, input_tokens, output_tokens) VALUES (?1, ?2, ?3, 1, ?4, ?5)
         ON CONFLICT (key_id, day, model) DO UPDATE SET requests = requests + 1,
             input_tokens = input_tokens + excluded.input_tokens, output_tokens = output_tokens + excluded.output_tokens",
    )
    .and_then(|mut s| {
        let (input, output) = (i64::try_from(tally.input).unwrap_or(i64::MAX), i64::try_from(tally.output).unwrap_or(i64::MAX));
        s.execute(params![key_column(tally.key.as_deref()), tally.model, tally.day, input, output])
    })
    .map_err(db_err)?;
    Ok(())
}

/// The queue of the writer thread: the pipeline's schedule over the thread's jobs.
pub(super) type Queue = SerialQueue<super::WriteJob>;
