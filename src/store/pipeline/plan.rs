//! The rules of a write batch, one place for both stores: [`Plan::of`] turns a batch of [`WriteOp`]s, in order,
//! into the writes to make grouped by kind, with the same effect as the ops applied one by one. A store only
//! executes the plan in SQL (PostgreSQL as one statement of arrays, SQLite as cached statements in one
//! transaction); what the batch means is decided here.
//!
//! The rules:
//!
//! - an op on a request that comes before the request's `Insert` is dropped (one by one, it would find no
//!   request, or the insert would fail the batch);
//! - nothing after a request's first final status is kept (a final status never changes): not its events or
//!   raw pieces, not a progress, not another final status or its webhook;
//! - the status and progress ops on one request fold into one [`Outcome`]: the last progress, the body and
//!   `final_at` of the final status, its webhook; for a request the batch inserts, the outcome is what it is
//!   inserted with;
//! - an event or raw piece written twice keeps the last data, at the place of the first.
//!
//! What the plan cannot know is left to the store, which checks it in the same transaction: whether a request
//! the batch does not insert still exists and is not final ([`Plan::existing`]: writes to a request deleted or
//! ended meanwhile, on any node, are dropped), and whether an insert's id is new (a duplicate fails the batch).

use crate::document::{Progress, RequestMeta};
use crate::domain::RequestId;
use crate::store::usage::Tally;
use crate::store::{RawPiece, WriteOp};
use std::collections::HashMap;

/// The final status of a request, as the batch leaves it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Finish<'a> {
    pub body: Option<&'a str>,
    /// `processed_at` in whole seconds: when the request may be purged.
    pub final_at: Option<i64>,
}

/// A webhook delivery to queue with a final status.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hook<'a> {
    pub url: &'a str,
    /// When it is due (the final status's `processed_at`).
    pub due: f64,
}

/// What the batch leaves one request with.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Outcome<'a> {
    /// The last status and progress written; `None` when the batch sets none.
    pub progress: Option<&'a Progress>,
    /// Set by the final status. A progress after it cannot happen (it is dropped).
    pub finish: Option<Finish<'a>>,
    /// The webhook of the final status (there is at most one final status per request in a plan).
    pub hook: Option<Hook<'a>>,
    /// What the final status adds to its key's usage (added when the final status applies, as the webhook).
    pub usage: Option<&'a Tally>,
}

/// A new request, with what the batch leaves it with.
#[derive(Debug, Clone, Copy)]
pub struct Insert<'a> {
    pub meta: &'a RequestMeta,
    pub outcome: Outcome<'a>,
}

impl Insert<'_> {
    pub fn id(&self) -> RequestId {
        self.meta.locator.id
    }
}

/// A request the batch writes to but does not insert.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Existing<'a> {
    pub id: RequestId,
    pub outcome: Outcome<'a>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Event<'a> {
    pub id: RequestId,
    pub seq: u64,
    pub data: &'a [u8],
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Raw<'a> {
    pub id: RequestId,
    pub seq: u64,
    pub piece: &'a RawPiece,
}

/// What the plan knows of one request while it reads the batch.
#[derive(Default)]
struct Seen<'a> {
    /// Where the batch inserts it (its first insert).
    inserted_at: Option<usize>,
    /// Its final status was seen: nothing after it is kept.
    ended: bool,
    outcome: Outcome<'a>,
    /// The highest event and raw piece numbers planned so far.
    last_event: u64,
    last_raw: u64,
}

impl Seen<'_> {
    fn inserted_at(at: usize) -> Self {
        Self { inserted_at: Some(at), ..Self::default() }
    }
}

/// A batch grouped by kind. Executing it — inserts, then for the requests of [`Self::existing`] that still
/// exist and are not final: events, raw pieces, then status updates with their webhooks — has the effect of the
/// batch's ops applied one by one. The final status goes last, so that a store that commits a long plan in
/// parts never stores a final status before the events that came before it.
#[derive(Debug, Default)]
pub struct Plan<'a> {
    /// Every insert, in order (a second insert of one id stays, and fails the batch as it would one by one).
    pub inserts: Vec<Insert<'a>>,
    /// Requests written to but not inserted, in first-seen order, with their outcome (which may set nothing:
    /// a request that only gets events).
    pub existing: Vec<Existing<'a>>,
    /// Of requests inserted or in [`Self::existing`].
    pub events: Vec<Event<'a>>,
    pub raws: Vec<Raw<'a>>,
}

impl<'a> Plan<'a> {
    pub fn of(ops: &'a [WriteOp]) -> Self {
        // One map lookup per op (the plan runs for every batch, and a batch is mostly chunks): everything the rules
        // need to know of a request is in its one entry.
        let mut requests: HashMap<RequestId, Seen<'a>> = HashMap::new();
        for (at, op) in ops.iter().enumerate() {
            if let WriteOp::Insert(meta) = op {
                requests.entry(meta.locator.id).or_insert_with(|| Seen::inserted_at(at));
            }
        }
        let mut plan = Plan::default();
        let mut existing = Vec::new();
        for (at, op) in ops.iter().enumerate() {
            let id = match op {
                WriteOp::Insert(meta) => {
                    plan.inserts.push(Insert { meta, outcome: Outcome::default() });
                    continue;
                }
                WriteOp::Event { id, .. }
                | WriteOp::Raw { id, .. }
                | WriteOp::Progress { id, .. }
                | WriteOp::Finish { id, .. } => *id,
            };
            let seen = requests.entry(id).or_insert_with(|| {
                existing.push(id);
                Seen::default()
            });
            if seen.ended || seen.inserted_at.is_some_and(|insert| insert > at) {
                continue;
            }
            match op {
                WriteOp::Insert(_) => {}
                WriteOp::Event { seq, data, .. } => {
                    let data = &data[..];
                    // Sequence numbers of a request only grow within a batch; one seen again (a write repeated)
                    // is looked for among the earlier ones.
                    let again = (*seq <= seen.last_event)
                        .then(|| plan.events.iter_mut().rev().find(|e| e.id == id && e.seq == *seq))
                        .flatten();
                    match again {
                        Some(event) => event.data = data,
                        None => plan.events.push(Event { id, seq: *seq, data }),
                    }
                    seen.last_event = seen.last_event.max(*seq);
                }
                WriteOp::Raw { seq, piece, .. } => {
                    let again = (*seq <= seen.last_raw)
                        .then(|| plan.raws.iter_mut().rev().find(|r| r.id == id && r.seq == *seq))
                        .flatten();
                    match again {
                        Some(raw) => raw.piece = piece,
                        None => plan.raws.push(Raw { id, seq: *seq, piece }),
                    }
                    seen.last_raw = seen.last_raw.max(*seq);
                }
                WriteOp::Progress { progress, .. } => seen.outcome.progress = Some(progress),
                WriteOp::Finish { progress, body, webhook_url, usage, .. } => {
                    seen.ended = true;
                    seen.outcome.usage = usage.as_deref();
                    seen.outcome.progress = Some(progress);
                    seen.outcome.finish =
                        Some(Finish { body: body.as_deref(), final_at: progress.processed_at.map(|t| t as i64) });
                    seen.outcome.hook =
                        webhook_url.as_deref().map(|url| Hook { url, due: progress.processed_at.unwrap_or(0.0) });
                }
            }
        }
        for insert in &mut plan.inserts {
            insert.outcome = requests.get(&insert.id()).map(|seen| seen.outcome).unwrap_or_default();
        }
        plan.existing = existing
            .into_iter()
            .map(|id| Existing { id, outcome: requests.get(&id).map(|seen| seen.outcome).unwrap_or_default() })
            .collect();
        plan
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.inserts.is_empty() && self.existing.is_empty()
    }

    /// The requests the plan gives a final status (when their update applies).
    pub fn finished(&self) -> impl Iterator<Item = RequestId> + '_ {
        let inserted = self.inserts.iter().filter(|i| i.outcome.finish.is_some()).map(Insert::id);
        inserted.chain(self.existing.iter().filter(|e| e.outcome.finish.is_some()).map(|e| e.id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::document::model::Options;
    use crate::domain::{Access, Kind, Locator, Status};
    use bytes::Bytes;
    use serde_json::value::RawValue;
    use std::sync::Arc;

    fn meta() -> Arc<RequestMeta> {
        let id = RequestId::generate();
        Arc::new(RequestMeta {
            locator: Locator { kind: Kind::Stream, access: Access::Public, created_at: 1_700_000_000, id },
            created: 1_700_000_000.0,
            conversation_id: "c".into(),
            bearer: None,
            stream_token: None,
            options: Options { timeout: 1.0, connect_timeout: 1.0, webhook_url: None, from_max_length: None },
            from_status_url: None,
            parameters: RawValue::from_string("{}".into()).unwrap(),
            owner: None,
            format: crate::domain::Format::Chat,
            history_items: 0,
            traceparent: None,
            key: None,
        })
    }

    fn progress(status: Status) -> Box<Progress> {
        let mut p = Progress::pending();
        p.status = status;
        p.processed_at = status.is_final().then_some(1_700_000_002.5);
        Box::new(p)
    }

    fn event(id: RequestId, seq: u64, data: &'static str) -> WriteOp {
        WriteOp::Event { id, seq, data: Bytes::from_static(data.as_bytes()) }
    }

    fn finish(id: RequestId, status: Status, body: &str, hook: Option<&str>) -> WriteOp {
        let webhook_url = hook.map(Into::into);
        WriteOp::Finish { id, progress: progress(status), body: Some(body.into()), webhook_url, usage: None }
    }

    fn events(plan: &Plan<'_>) -> Vec<(RequestId, u64, String)> {
        plan.events.iter().map(|e| (e.id, e.seq, String::from_utf8_lossy(e.data).into_owned())).collect()
    }

    #[test]
    fn nothing_after_a_final_status_is_kept() {
        let a = RequestId::generate();
        let ops = [
            event(a, 1, "one"),
            finish(a, Status::Done, "first", Some("https://h/1")),
            event(a, 2, "late"),
            WriteOp::Raw { id: a, seq: 1, piece: RawPiece::Events { through: None } },
            WriteOp::Progress { id: a, progress: progress(Status::Streaming) },
            finish(a, Status::Error, "second", Some("https://h/2")),
        ];
        let plan = Plan::of(&ops);
        assert_eq!(events(&plan), [(a, 1, "one".to_owned())]);
        assert!(plan.raws.is_empty());
        let [existing] = plan.existing.as_slice() else { panic!("one request: {:?}", plan.existing) };
        assert_eq!(existing.id, a);
        let outcome = existing.outcome;
        assert_eq!(outcome.progress.map(|p| p.status), Some(Status::Done));
        assert_eq!(outcome.finish, Some(Finish { body: Some("first"), final_at: Some(1_700_000_002) }));
        assert_eq!(outcome.hook, Some(Hook { url: "https://h/1", due: 1_700_000_002.5 }));
        assert_eq!(plan.finished().collect::<Vec<_>>(), [a]);
    }

    #[test]
    fn progress_folds_into_the_last_and_into_an_insert() {
        let m = meta();
        let b = RequestId::generate();
        let ops = [
            WriteOp::Progress { id: b, progress: progress(Status::Posting) },
            WriteOp::Insert(m.clone()),
            WriteOp::Progress { id: m.locator.id, progress: progress(Status::Posting) },
            WriteOp::Progress { id: b, progress: progress(Status::Streaming) },
            WriteOp::Progress { id: m.locator.id, progress: progress(Status::Waiting) },
        ];
        let plan = Plan::of(&ops);
        let [insert] = plan.inserts.as_slice() else { panic!("one insert") };
        assert_eq!(insert.id(), m.locator.id);
        assert_eq!(insert.outcome.progress.map(|p| p.status), Some(Status::Waiting));
        assert_eq!(insert.outcome.finish, None);
        let [existing] = plan.existing.as_slice() else { panic!("one request") };
        assert_eq!((existing.id, existing.outcome.progress.map(|p| p.status)), (b, Some(Status::Streaming)));
        assert_eq!(plan.finished().count(), 0);
    }

    #[test]
    fn an_insert_finished_in_its_batch_is_inserted_final_with_its_webhook() {
        let m = meta();
        let id = m.locator.id;
        let ops = [WriteOp::Insert(m.clone()), event(id, 1, "x"), finish(id, Status::Stop, "b", Some("https://h"))];
        let plan = Plan::of(&ops);
        assert!(plan.existing.is_empty());
        let outcome = plan.inserts[0].outcome;
        assert_eq!(outcome.progress.map(|p| p.status), Some(Status::Stop));
        assert_eq!(outcome.finish.and_then(|f| f.body), Some("b"));
        assert_eq!(outcome.hook.map(|h| h.url), Some("https://h"));
        assert_eq!(events(&plan), [(id, 1, "x".to_owned())]);
        assert_eq!(plan.finished().collect::<Vec<_>>(), [id]);
    }

    #[test]
    fn writes_before_their_insert_are_dropped_and_a_second_insert_stays() {
        let m = meta();
        let id = m.locator.id;
        let ops = [
            event(id, 1, "early"),
            finish(id, Status::Done, "early", None),
            WriteOp::Insert(m.clone()),
            event(id, 1, "kept"),
            WriteOp::Insert(m.clone()),
        ];
        let plan = Plan::of(&ops);
        assert_eq!(plan.inserts.len(), 2, "a duplicate insert is the store's to refuse");
        assert!(plan.inserts.iter().all(|i| i.outcome == Outcome::default()));
        assert!(plan.existing.is_empty());
        assert_eq!(events(&plan), [(id, 1, "kept".to_owned())]);
    }

    #[test]
    fn a_piece_written_twice_keeps_the_last_at_the_place_of_the_first() {
        let (a, b) = (RequestId::generate(), RequestId::generate());
        let bytes = |s: &'static str| RawPiece::Bytes(Bytes::from_static(s.as_bytes()));
        let ops = [
            event(a, 1, "a1"),
            event(b, 1, "b1"),
            event(a, 1, "a1 again"),
            WriteOp::Raw { id: a, seq: 0, piece: bytes("head") },
            WriteOp::Raw { id: b, seq: 0, piece: bytes("b head") },
            WriteOp::Raw { id: a, seq: 0, piece: bytes("head again") },
        ];
        let plan = Plan::of(&ops);
        assert_eq!(events(&plan), [(a, 1, "a1 again".to_owned()), (b, 1, "b1".to_owned())]);
        let raws: Vec<_> = plan.raws.iter().map(|r| (r.id, r.seq, r.piece.clone())).collect();
        assert_eq!(raws, [(a, 0, bytes("head again")), (b, 0, bytes("b head"))]);
        let ids: Vec<_> = plan.existing.iter().map(|e| e.id).collect();
        assert_eq!(ids, [a, b], "first-seen order");
        assert!(plan.existing.iter().all(|e| e.outcome == Outcome::default()));
    }

    #[test]
    fn a_final_status_of_an_unknown_request_still_ends_its_writes_in_the_batch() {
        let a = RequestId::generate();
        let ops = [finish(a, Status::Done, "x", None), event(a, 1, "after")];
        let plan = Plan::of(&ops);
        assert!(plan.events.is_empty());
        assert_eq!(plan.existing.len(), 1, "the store finds out whether it exists");
        assert!(Plan::of(&[]).is_empty());
    }
}
