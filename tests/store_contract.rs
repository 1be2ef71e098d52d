//! The contract every `Store` implementation must meet. Each test is written once against `Arc<dyn Store>` (or
//! the three families, or two handles open on the same store at once); `contract_suite!` instantiates the whole
//! suite for one implementation.
//!
//! The PostgreSQL suite runs against `OFFLOAD_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`)
//! or, when nothing answers there, a throwaway server of its own (`support::postgres`), each test in a schema of
//! its own that is dropped afterwards. Where neither is possible its tests are reported ignored with the reason
//! (`harness = false`: `support::harness`), except under CI (`CI` set), where that is a failure.

#![expect(clippy::unwrap_used, reason = "a test fails loudly on anything unexpected")]

use bytes::Bytes;
use offload::document::model::Options;
use offload::document::{ErrorInfo, Progress, RequestMeta, ResponseMeta};
use offload::domain::{Access, Kind, Locator, NodeId, RequestId, Status, TokenHash};
use offload::domain::{KeyLimits, ServiceKey};
use offload::store::nodes::{NodeRecord, Renewal};
use offload::store::{
    Admit, Charge, Conflict, Periods, RawCursor, RawPiece, SlotId, Store, StoreError, Stores, WebhookState,
    WebhookStatus, WriteOp,
};
use serde_json::value::RawValue;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[path = "store_contract/sqlite_inline.rs"]
mod sqlite_inline;
#[path = "store_contract/sqlite_wal.rs"]
mod sqlite_wal;
mod support;
#[path = "store_contract/usage.rs"]
mod usage;
use usage::*;

use libtest_mimic::Trial;
use support::harness::{self, Flavor};

fn meta(access: Access) -> Arc<RequestMeta> {
    owned_by(access, None)
}

fn owned_by(access: Access, owner: Option<NodeId>) -> Arc<RequestMeta> {
    let id = RequestId::generate();
    Arc::new(RequestMeta {
        locator: Locator { kind: Kind::Stream, access, created_at: 1_700_000_000, id },
        created: 1_700_000_000.25,
        conversation_id: format!("conv-{id}"),
        bearer: (access == Access::Private).then(|| TokenHash::of("bearer")),
        stream_token: (access == Access::Private).then(|| TokenHash::of("stream")),
        options: Options {
            timeout: 12.5,
            connect_timeout: 3.0,
            webhook_url: Some("https://h.example/x".into()),
            from_max_length: Some(9),
        },
        from_status_url: Some("http://x/1/r/pub/2023/01/01/00/00/00/y.json".into()),
        parameters: RawValue::from_string(r#"{"model":"m","messages":[{"role":"user","content":"hé"}]}"#.into())
            .unwrap(),
        owner,
        format: offload::domain::Format::Chat,
        history_items: 0,
        traceparent: None,
        key: None,
    })
}

fn progress(status: Status) -> Progress {
    Progress {
        status,
        request_at: Some(1_700_000_000.5),
        finished_at: status.is_final().then_some(1_700_000_002.0),
        processed_at: status.is_final().then_some(1_700_000_002.5),
        response: Some(ResponseMeta {
            status_code: 200,
            protocol: "HTTP/1.1".into(),
            headers: vec![("content-type".into(), "text/event-stream".into()), ("x-b".into(), "1, 2".into())],
        }),
        error: (status == Status::Error).then(|| ErrorInfo::new("timeout", "slow")),
        attempts: Vec::new(),
        upstream: None,
    }
}

async fn write(store: &Arc<dyn Store>, ops: Vec<WriteOp>) {
    store.write(ops.into()).await.unwrap();
}

fn finish(id: RequestId, webhook_url: Option<&str>) -> WriteOp {
    WriteOp::Finish {
        id,
        progress: Box::new(progress(Status::Done)),
        body: None,
        webhook_url: webhook_url.map(str::to_owned),
        usage: None,
    }
}

pub async fn an_inserted_request_reads_back_exactly(store: Arc<dyn Store>) {
    for access in [Access::Public, Access::Private] {
        let m = meta(access);
        write(&store, vec![WriteOp::Insert(m.clone())]).await;
        let got = store.get(m.locator.id).await.unwrap().unwrap();
        assert_eq!(got.meta.locator, m.locator);
        assert_eq!(got.meta.created, m.created);
        assert_eq!(got.meta.conversation_id, m.conversation_id);
        assert_eq!(got.meta.bearer, m.bearer);
        assert_eq!(got.meta.stream_token, m.stream_token);
        assert_eq!(got.meta.options, m.options);
        assert_eq!(got.meta.from_status_url, m.from_status_url);
        assert_eq!(got.meta.parameters.get(), m.parameters.get());
        assert_eq!(got.progress, Progress::pending());
        assert_eq!(got.body, None);
        assert_eq!(got.event_count, 0);
    }
    assert!(store.get(RequestId::generate()).await.unwrap().is_none());
}

pub async fn events_come_back_in_order_and_in_pages(store: Arc<dyn Store>) {
    let m = meta(Access::Public);
    let id = m.locator.id;
    let mut ops = vec![WriteOp::Insert(m)];
    ops.extend((1..=25u64).map(|seq| WriteOp::Event { id, seq, data: format!("{{\"n\":{seq}}}").into_bytes().into() }));
    write(&store, ops).await;
    assert_eq!(store.get(id).await.unwrap().unwrap().event_count, 25);
    let page = store.events(id, 0, 10).await.unwrap();
    assert_eq!(page.iter().map(|(s, _)| *s).collect::<Vec<_>>(), (1..=10).collect::<Vec<_>>());
    let rest = store.events(id, 20, 100).await.unwrap();
    assert_eq!(rest.len(), 5);
    assert_eq!(rest[0], (21, "{\"n\":21}".to_owned()));
    assert!(store.events(id, 25, 10).await.unwrap().is_empty());
}

pub async fn raw_pieces_are_concatenated_in_order(store: Arc<dyn Store>) {
    let m = meta(Access::Public);
    let id = m.locator.id;
    write(
        &store,
        vec![
            WriteOp::Insert(m),
            WriteOp::Raw { id, seq: 1, piece: RawPiece::Bytes(Bytes::from_static(b"HTTP/1.1 200 OK\r\n\r\n")) },
        ],
    )
    .await;
    write(&store, vec![WriteOp::Raw { id, seq: 2, piece: RawPiece::Bytes(Bytes::from_static(b"\xffbinary")) }]).await;
    assert_eq!(store.raw(id).await.unwrap(), b"HTTP/1.1 200 OK\r\n\r\n\xffbinary");
    assert!(store.raw(RequestId::generate()).await.unwrap().is_empty());
}

pub async fn an_events_piece_expands_to_the_events_as_a_stream_sent_them(store: Arc<dyn Store>) {
    let m = meta(Access::Public);
    let id = m.locator.id;
    let mut ops = vec![
        WriteOp::Insert(m),
        WriteOp::Raw { id, seq: 1, piece: RawPiece::Bytes(Bytes::from_static(b"HEAD\r\n\r\n")) },
        WriteOp::Raw { id, seq: 2, piece: RawPiece::Events { through: None } },
    ];
    ops.extend((1..=3u64).map(|seq| WriteOp::Event { id, seq, data: format!("{{\"n\":{seq}}}").into_bytes().into() }));
    write(&store, ops).await;
    let all = String::from_utf8(store.raw(id).await.unwrap()).unwrap();
    assert_eq!(all, "HEAD\r\n\r\ndata: {\"n\":1}\n\ndata: {\"n\":2}\n\ndata: {\"n\":3}\n\n");
    // Writing a piece's seq again replaces it: the placeholder cut to the first two events, then verbatim bytes.
    write(
        &store,
        vec![
            WriteOp::Raw { id, seq: 2, piece: RawPiece::Events { through: Some(2) } },
            WriteOp::Raw { id, seq: 3, piece: RawPiece::Bytes(Bytes::from_static(b"data:{\"n\":3}\r\n\r\n")) },
        ],
    )
    .await;
    let cut = String::from_utf8(store.raw(id).await.unwrap()).unwrap();
    assert_eq!(cut, "HEAD\r\n\r\ndata: {\"n\":1}\n\ndata: {\"n\":2}\n\ndata:{\"n\":3}\r\n\r\n");
}

pub async fn raw_is_read_in_pages_of_about_the_size_asked_whatever_the_size(store: Arc<dyn Store>) {
    let m = meta(Access::Public);
    let id = m.locator.id;
    let mut ops = vec![
        WriteOp::Insert(m),
        WriteOp::Raw { id, seq: 1, piece: RawPiece::Bytes(Bytes::from_static(b"HTTP/1.1 200 OK\r\n\r\n")) },
        WriteOp::Raw { id, seq: 2, piece: RawPiece::Events { through: Some(5) } },
        WriteOp::Raw { id, seq: 3, piece: RawPiece::Bytes(Bytes::from_static(b"data:{\"n\":6}\r\n\r\n")) },
        WriteOp::Raw { id, seq: 4, piece: RawPiece::Bytes(Bytes::from_static(b"data: [DONE]\n\n")) },
    ];
    ops.extend((1..=6u64).map(|seq| WriteOp::Event { id, seq, data: format!("{{\"n\":{seq}}}").into_bytes().into() }));
    write(&store, ops).await;
    let mut whole = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
    for n in 1..=5 {
        whole.extend_from_slice(format!("data: {{\"n\":{n}}}\n\n").as_bytes());
    }
    whole.extend_from_slice(b"data:{\"n\":6}\r\n\r\ndata: [DONE]\n\n");
    assert_eq!(store.raw(id).await.unwrap(), whole);
    // The largest piece or event: a page holds less than the size asked, plus at most one of them.
    let largest = 19;
    for max in [1, 7, 19, 20, 21, 40, 64, 100, whole.len(), 1 << 20] {
        let (mut read, mut cursor, mut pages) = (Vec::new(), Some(RawCursor::default()), 0);
        while let Some(from) = cursor {
            let page = store.raw_page(id, from, max).await.unwrap();
            assert!(page.bytes.len() < max + largest, "a page of {} bytes for {max}", page.bytes.len());
            read.extend_from_slice(&page.bytes);
            cursor = page.next;
            pages += 1;
            assert!(pages <= 2 * whole.len() / max + 12, "{pages} pages of {max} bytes and more");
        }
        assert_eq!(String::from_utf8_lossy(&read), String::from_utf8_lossy(&whole), "pages of {max} bytes");
    }
    let unknown = store.raw_page(RequestId::generate(), RawCursor::default(), 100).await.unwrap();
    assert!(unknown.bytes.is_empty() && unknown.next.is_none());
}

pub async fn progress_and_finish_are_kept_and_unfinished_lists_only_the_running(store: Arc<dyn Store>) {
    let running = meta(Access::Public);
    let finished = meta(Access::Private);
    let (r, f) = (running.locator.id, finished.locator.id);
    write(
        &store,
        vec![
            WriteOp::Insert(running),
            WriteOp::Insert(finished),
            WriteOp::Progress { id: r, progress: Box::new(progress(Status::Streaming)) },
            WriteOp::Finish {
                id: f,
                progress: Box::new(progress(Status::Error)),
                body: Some("{\"ok\":true}".into()),
                webhook_url: None,
                usage: None,
            },
        ],
    )
    .await;
    let got = store.get(r).await.unwrap().unwrap();
    assert_eq!(got.progress, progress(Status::Streaming));
    let got = store.get(f).await.unwrap().unwrap();
    assert_eq!(got.progress, progress(Status::Error));
    assert_eq!(got.body.as_deref(), Some("{\"ok\":true}"));
    let unfinished: Vec<RequestId> = store.unfinished().await.unwrap().iter().map(|s| s.meta.locator.id).collect();
    assert!(unfinished.contains(&r));
    assert!(!unfinished.contains(&f));
}

pub async fn delete_removes_the_request_its_events_and_raw(store: Arc<dyn Store>) {
    let m = meta(Access::Public);
    let keep = meta(Access::Public);
    let id = m.locator.id;
    write(
        &store,
        vec![
            WriteOp::Insert(m),
            WriteOp::Insert(keep.clone()),
            WriteOp::Event { id, seq: 1, data: Bytes::from_static(b"{}") },
            WriteOp::Raw { id, seq: 1, piece: RawPiece::Bytes(Bytes::from_static(b"x")) },
            WriteOp::Event { id: keep.locator.id, seq: 1, data: Bytes::from_static(b"{}") },
        ],
    )
    .await;
    assert!(store.delete(id).await.unwrap());
    assert!(store.get(id).await.unwrap().is_none());
    assert!(store.events(id, 0, 10).await.unwrap().is_empty());
    assert!(store.raw(id).await.unwrap().is_empty());
    assert!(!store.delete(id).await.unwrap(), "a second delete finds nothing");
    assert_eq!(store.events(keep.locator.id, 0, 10).await.unwrap().len(), 1, "other requests are untouched");
}

pub async fn a_failed_batch_changes_nothing(store: Arc<dyn Store>) {
    let m = meta(Access::Public);
    let id = m.locator.id;
    write(&store, vec![WriteOp::Insert(m.clone())]).await;
    // Inserting the same request again violates its key: the whole batch, event included, must roll back.
    let result = store
        .write(vec![WriteOp::Event { id, seq: 1, data: Bytes::from_static(b"{}") }, WriteOp::Insert(m)].into())
        .await;
    assert!(result.is_err());
    assert!(store.events(id, 0, 10).await.unwrap().is_empty());
}

/// A create's insert is not held up by a long batch of other writes queued before it (the SQLite store lets it
/// in between the batch's writes), and the batch still stores every write once.
pub async fn an_urgent_insert_does_not_wait_for_a_long_batch(store: Arc<dyn Store>) {
    let running = meta(Access::Public);
    let id = running.locator.id;
    write(&store, vec![WriteOp::Insert(running)]).await;
    const EVENTS: u64 = 20_000;
    let batch: Arc<[WriteOp]> = (1..=EVENTS)
        .map(|seq| WriteOp::Event { id, seq, data: format!("{{\"n\":{seq}}}").into_bytes().into() })
        .collect();
    let long = tokio::spawn({
        let store = store.clone();
        async move { store.write(batch).await.map(|()| tokio::time::Instant::now()) }
    });
    tokio::time::sleep(Duration::from_millis(2)).await;
    let new = meta(Access::Public);
    store.write_urgent(vec![WriteOp::Insert(new.clone())].into()).await.unwrap();
    let inserted = tokio::time::Instant::now();
    let long_done = long.await.unwrap().unwrap();
    assert!(inserted < long_done, "the insert waited for the whole batch");
    assert!(store.get(new.locator.id).await.unwrap().is_some());
    let mut count = 0;
    let mut cursor = 0;
    loop {
        let page = store.events(id, cursor, 5000).await.unwrap();
        let Some((last, _)) = page.last() else { break };
        for (i, (seq, _)) in page.iter().enumerate() {
            assert_eq!(*seq, cursor + 1 + i as u64);
        }
        cursor = *last;
        count += page.len() as u64;
    }
    assert_eq!(count, EVENTS);
}

pub async fn a_batch_has_the_effect_of_its_ops_applied_in_order(store: Arc<dyn Store>) {
    let (old, new) = (meta(Access::Public), meta(Access::Private));
    let (o, n, ghost) = (old.locator.id, new.locator.id, RequestId::generate());
    write(&store, vec![WriteOp::Insert(old)]).await;
    let event = |id, seq, data: &'static [u8]| WriteOp::Event { id, seq, data: Bytes::from_static(data) };
    let raw = |id, seq, data: &'static [u8]| WriteOp::Raw { id, seq, piece: RawPiece::Bytes(Bytes::from_static(data)) };
    write(
        &store,
        vec![
            // Before its insert: there is no such request yet, so this changes nothing.
            event(n, 1, b"early"),
            WriteOp::Insert(new),
            event(n, 1, b"\"a\""),
            event(n, 1, b"\"b\""),
            raw(n, 1, b"x"),
            raw(n, 1, b"y"),
            WriteOp::Progress { id: n, progress: Box::new(progress(Status::Streaming)) },
            WriteOp::Finish {
                id: n,
                progress: Box::new(progress(Status::Done)),
                body: Some("{\"n\":1}".into()),
                webhook_url: Some("https://h.example/n".into()),
                usage: None,
            },
            WriteOp::Progress { id: o, progress: Box::new(progress(Status::Streaming)) },
            event(o, 1, b"\"c\""),
            WriteOp::Finish {
                id: o,
                progress: Box::new(progress(Status::Error)),
                body: Some("{}".into()),
                webhook_url: None,
                usage: None,
            },
            // After the final status nothing is kept: a final status never changes.
            WriteOp::Finish {
                id: o,
                progress: Box::new(progress(Status::Done)),
                body: Some("{\"o\":2}".into()),
                webhook_url: Some("https://h.example/o".into()),
                usage: None,
            },
            event(o, 2, b"\"d\""),
            // A request that does not exist: its writes are dropped, the rest of the batch stands.
            event(ghost, 1, b"{}"),
            WriteOp::Progress { id: ghost, progress: Box::new(progress(Status::Streaming)) },
        ],
    )
    .await;
    let got = store.get(n).await.unwrap().unwrap();
    assert_eq!((got.progress, got.body.as_deref(), got.event_count), (progress(Status::Done), Some("{\"n\":1}"), 1));
    assert_eq!(store.events(n, 0, 10).await.unwrap(), vec![(1, "\"b\"".to_owned())], "the last write of a seq");
    assert_eq!(store.raw(n).await.unwrap(), b"y");
    let got = store.get(o).await.unwrap().unwrap();
    assert_eq!((got.progress, got.body.as_deref()), (progress(Status::Error), Some("{}")));
    assert_eq!(store.events(o, 0, 10).await.unwrap(), vec![(1, "\"c\"".to_owned())]);
    assert!(store.get(ghost).await.unwrap().is_none());
    assert!(store.events(ghost, 0, 10).await.unwrap().is_empty());
    let unfinished: Vec<RequestId> = store.unfinished().await.unwrap().iter().map(|s| s.meta.locator.id).collect();
    assert!(!unfinished.contains(&n) && !unfinished.contains(&o));
}

pub async fn writes_to_a_deleted_request_are_dropped(stores: Stores) {
    let m = meta(Access::Public);
    let id = m.locator.id;
    write(&stores.requests, vec![WriteOp::Insert(m)]).await;
    assert!(stores.requests.delete(id).await.unwrap());
    write(
        &stores.requests,
        vec![
            WriteOp::Event { id, seq: 1, data: Bytes::from_static(b"{}") },
            WriteOp::Raw { id, seq: 1, piece: RawPiece::Events { through: None } },
            finish(id, Some("https://h.example/late")),
        ],
    )
    .await;
    assert!(stores.requests.get(id).await.unwrap().is_none());
    assert!(stores.requests.events(id, 0, 10).await.unwrap().is_empty());
    assert!(stores.requests.raw(id).await.unwrap().is_empty());
    assert!(stores.webhooks.webhook(id).await.unwrap().is_none(), "no delivery for a request that is gone");
}

pub async fn concurrent_writers_lose_nothing(store: Arc<dyn Store>) {
    let m = meta(Access::Public);
    let id = m.locator.id;
    write(&store, vec![WriteOp::Insert(m)]).await;
    let tasks: Vec<_> = (0..20u64)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                for k in 0..10u64 {
                    let seq = t * 10 + k + 1;
                    store
                        .write(vec![WriteOp::Event { id, seq, data: seq.to_string().into_bytes().into() }].into())
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(store.events(id, 0, 1000).await.unwrap().len(), 200);
}

pub async fn a_final_status_with_a_webhook_queues_one_claimable_delivery(stores: Stores) {
    let (store, hooks) = (&stores.requests, &stores.webhooks);
    let m = meta(Access::Public);
    let id = m.locator.id;
    write(store, vec![WriteOp::Insert(m), finish(id, Some("https://h.example/a"))]).await;
    write(store, vec![finish(id, Some("https://h.example/other"))]).await;
    assert_eq!(hooks.webhook(id).await.unwrap().unwrap().state, WebhookState::Pending);
    let now = 1_700_000_010.0;
    let jobs = hooks.claim_webhooks(now, 60.0, 10).await.unwrap();
    let job = jobs.iter().find(|j| j.id == id).unwrap();
    assert_eq!(job.url, "https://h.example/a", "queueing twice keeps the first");
    assert!(hooks.claim_webhooks(now + 1.0, 60.0, 10).await.unwrap().iter().all(|j| j.id != id), "leased");
    assert!(hooks.claim_webhooks(now + 61.0, 60.0, 10).await.unwrap().iter().any(|j| j.id == id), "lease over");

    let retrying = WebhookStatus {
        state: WebhookState::Retrying,
        attempts: 1,
        first_attempt_at: Some(now),
        last_attempt_at: Some(now),
        last_status_code: Some(503),
        last_error: None,
        next_attempt_at: Some(now + 500.0),
    };
    hooks.record_webhook(id, retrying.clone()).await.unwrap();
    assert_eq!(hooks.webhook(id).await.unwrap(), Some(retrying.clone()));
    assert!(hooks.claim_webhooks(now + 400.0, 60.0, 10).await.unwrap().iter().all(|j| j.id != id), "not due yet");
    let again = hooks.claim_webhooks(now + 501.0, 60.0, 10).await.unwrap();
    assert_eq!(again.iter().find(|j| j.id == id).unwrap().status, retrying);
    let delivered = WebhookStatus { state: WebhookState::Delivered, next_attempt_at: None, ..retrying };
    hooks.record_webhook(id, delivered).await.unwrap();
    assert!(hooks.claim_webhooks(f64::MAX / 2.0, 60.0, 10).await.unwrap().iter().all(|j| j.id != id));
    assert!(store.delete(id).await.unwrap());
    assert!(hooks.webhook(id).await.unwrap().is_none(), "delete removes the delivery");
}

pub async fn a_final_request_takes_no_more_writes(store: Arc<dyn Store>) {
    let m = owned_by(Access::Public, Some(NodeId::generate()));
    let id = m.locator.id;
    let event = |seq: u64| WriteOp::Event { id, seq, data: Bytes::from(format!("{{\"n\":{seq}}}")) };
    write(&store, vec![WriteOp::Insert(m.clone()), event(1), event(2), finish(id, None)]).await;
    let before = store.get(id).await.unwrap().unwrap();
    assert_eq!(before.meta.owner, m.owner, "the owner reads back");
    let late = WriteOp::Finish {
        id,
        progress: Box::new(progress(Status::Error)),
        body: Some("{\"late\":true}".into()),
        webhook_url: Some("https://h.example/late".into()),
        usage: None,
    };
    write(&store, vec![event(3), WriteOp::Progress { id, progress: Box::new(progress(Status::Streaming)) }, late])
        .await;
    let after = store.get(id).await.unwrap().unwrap();
    assert_eq!(after.progress, before.progress, "a final status never changes");
    assert_eq!(after.body, before.body);
    assert_eq!(after.event_count, 2, "no event is added to a final request");
    assert_eq!(store.events(id, 0, 10).await.unwrap().len(), 2);
}

pub async fn nodes_join_expire_and_are_removed_by_exactly_one_handle(a: Stores, b: Stores) {
    let short = NodeRecord { id: NodeId::generate(), address: "http://127.0.0.1:1".into() };
    let long = NodeRecord { id: NodeId::generate(), address: "http://127.0.0.1:2".into() };
    a.nodes.join(&short, Duration::from_millis(300)).await.unwrap();
    b.nodes.join(&long, Duration::from_secs(60)).await.unwrap();
    assert_eq!(b.nodes.node(short.id).await.unwrap(), Some(short.clone()), "seen through the other handle");
    assert!(a.nodes.expired_nodes().await.unwrap().is_empty());
    assert_eq!(a.nodes.renew(short.id, Duration::from_millis(300)).await.unwrap(), Renewal::Renewed);
    // The short lease runs out (300 ms after its renewal), the long one does not.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let expired = b.nodes.expired_nodes().await.unwrap();
        if !expired.is_empty() {
            assert_eq!(expired, vec![short.clone()]);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the short lease never ran out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!a.nodes.remove_expired(long.id).await.unwrap(), "a live node is never removed");
    let (x, y) = tokio::join!(a.nodes.remove_expired(short.id), b.nodes.remove_expired(short.id));
    assert_eq!([x.unwrap(), y.unwrap()].iter().filter(|removed| **removed).count(), 1, "removed exactly once");
    assert_eq!(a.nodes.renew(short.id, Duration::from_secs(1)).await.unwrap(), Renewal::Lost);
    assert!(b.nodes.node(short.id).await.unwrap().is_none());
    b.nodes.leave(long.id).await.unwrap();
    assert!(a.nodes.node(long.id).await.unwrap().is_none());
}

pub async fn orphans_are_the_unfinished_requests_of_nodes_that_are_gone(stores: Stores) {
    let alive = NodeRecord { id: NodeId::generate(), address: "http://127.0.0.1:1".into() };
    let gone = NodeRecord { id: NodeId::generate(), address: "http://127.0.0.1:2".into() };
    stores.nodes.join(&alive, Duration::from_secs(60)).await.unwrap();
    stores.nodes.join(&gone, Duration::from_secs(60)).await.unwrap();
    let running_alive = owned_by(Access::Public, Some(alive.id));
    let running_gone = owned_by(Access::Public, Some(gone.id));
    let finished_gone = owned_by(Access::Public, Some(gone.id));
    let ownerless = owned_by(Access::Public, None);
    let ids = [&running_alive, &running_gone, &finished_gone, &ownerless].map(|m| m.locator.id);
    write(
        &stores.requests,
        vec![
            WriteOp::Insert(running_alive),
            WriteOp::Insert(running_gone),
            WriteOp::Insert(finished_gone),
            finish(ids[2], None),
            WriteOp::Insert(ownerless),
        ],
    )
    .await;
    let orphans = |s: Stores| async move {
        let mut found: Vec<RequestId> =
            s.requests.orphans().await.unwrap().into_iter().map(|r| r.meta.locator.id).collect();
        found.sort();
        found
    };
    let mut expected = vec![ids[3]];
    assert_eq!(orphans(stores.clone()).await, expected, "a request of no recorded node is an orphan");
    stores.nodes.leave(gone.id).await.unwrap();
    expected.push(ids[1]);
    expected.sort();
    assert_eq!(orphans(stores.clone()).await, expected, "the running requests of a node that is gone");
}

pub async fn two_handles_ending_one_request_at_once_store_one_final_status_and_one_webhook(a: Stores, b: Stores) {
    for _ in 0..20 {
        let m = meta(Access::Public);
        let id = m.locator.id;
        write(&a.requests, vec![WriteOp::Insert(m)]).await;
        let done = WriteOp::Finish {
            id,
            progress: Box::new(progress(Status::Done)),
            body: Some("{\"by\":\"a\"}".into()),
            webhook_url: Some("https://h.example/a".into()),
            usage: None,
        };
        let interrupted = WriteOp::Finish {
            id,
            progress: Box::new(progress(Status::Error)),
            body: Some("{\"by\":\"b\"}".into()),
            webhook_url: Some("https://h.example/b".into()),
            usage: None,
        };
        let (x, y) = tokio::join!(a.requests.write(Arc::from([done])), b.requests.write(Arc::from([interrupted])));
        x.unwrap();
        y.unwrap();
        let stored = a.requests.get(id).await.unwrap().unwrap();
        let jobs = b.webhooks.claim_webhooks(f64::MAX / 4.0, 60.0, 100).await.unwrap();
        let mine: Vec<_> = jobs.iter().filter(|j| j.id == id).collect();
        assert_eq!(mine.len(), 1, "one delivery");
        // Whoever won, the document and its webhook come from the same final write.
        match stored.progress.status {
            Status::Done => assert_eq!(
                (stored.body.as_deref(), mine[0].url.as_str()),
                (Some("{\"by\":\"a\"}"), "https://h.example/a")
            ),
            Status::Error => assert_eq!(
                (stored.body.as_deref(), mine[0].url.as_str()),
                (Some("{\"by\":\"b\"}"), "https://h.example/b")
            ),
            other => unreachable!("not final: {other:?}"),
        }
    }
}

/// Admits `n` calls at once, spread over the handles; returns the outcomes.
async fn admit_at_once(handles: &[&Stores], k: &ServiceKey, node: NodeId, n: usize) -> Vec<(Admit, SlotId)> {
    let p = periods();
    let calls = (0..n).map(|i| {
        let (keys, k, p) = (handles[i % handles.len()].keys.clone(), k.clone(), p.clone());
        async move {
            let slot = SlotId::generate();
            (keys.admit(&k, &p, node, slot).await.unwrap(), slot)
        }
    });
    futures_util::future::join_all(calls).await
}

fn admitted(outcomes: &[(Admit, SlotId)]) -> usize {
    outcomes.iter().filter(|(a, _)| matches!(a, Admit::Admitted { .. })).count()
}

pub async fn in_flight_slots_and_rates_are_exact_across_handles_and_refusals_take_nothing(a: Stores, b: Stores) {
    let node = NodeId::generate();
    a.nodes
        .join(&NodeRecord { id: node, address: "http://127.0.0.1:1".into() }, Duration::from_secs(60))
        .await
        .unwrap();
    let parallel =
        key("parallel", KeyLimits { max_in_flight: Some(5), requests_per_day: Some(7), ..Default::default() });
    a.keys.create_key(&parallel, TokenHash::of("p")).await.unwrap();
    let outcomes = admit_at_once(&[&a, &b], &parallel, node, 200).await;
    assert_eq!(admitted(&outcomes), 5, "exactly the in-flight limit");
    assert!(outcomes.iter().all(|(o, _)| matches!(o, Admit::Admitted { took_slot: true, .. } | Admit::InFlightFull)));
    // Giving back two slots admits two more; the day quota (7) then refuses, and its refusals took no slot.
    let slots: Vec<SlotId> =
        outcomes.iter().filter(|(o, _)| matches!(o, Admit::Admitted { .. })).map(|(_, s)| *s).collect();
    b.keys.release_slot(slots[0]).await.unwrap();
    a.keys.release_slot(slots[1]).await.unwrap();
    assert_eq!(admitted(&admit_at_once(&[&a, &b], &parallel, node, 50).await), 2);
    a.keys.release_slot(slots[2]).await.unwrap();
    assert_eq!(admit_at_once(&[&b], &parallel, node, 1).await[0].0, Admit::DayFull);
    assert_eq!(admitted(&admit_at_once(&[&a], &parallel, node, 1).await), 0, "a refusal took no slot");

    // A rate of one call per ten seconds: the bucket holds one token, and nothing refills during the burst.
    let rated = key("rated", KeyLimits { rate: Some(0.1), ..Default::default() });
    a.keys.create_key(&rated, TokenHash::of("r")).await.unwrap();
    let outcomes = admit_at_once(&[&a, &b], &rated, node, 100).await;
    assert_eq!(admitted(&outcomes), 1);
    let wait = outcomes.iter().find_map(|(o, _)| match o {
        Admit::RateLimited { wait } => Some(*wait),
        _ => None,
    });
    assert!(wait.is_some_and(|w| w > 5.0 && w <= 10.0), "the wait for the next token: {wait:?}");
    b.keys.return_token(&rated).await.unwrap();
    assert_eq!(admitted(&admit_at_once(&[&a], &rated, node, 3).await), 1, "a returned token is taken again");

    // Slots held by a node that is gone are given back; those of a live node are not.
    let gone = NodeId::generate();
    let orphan = admit_at_once(&[&b], &key_with_slots(&a, "orphaned").await, gone, 3).await;
    assert_eq!(admitted(&orphan), 3);
    assert_eq!(b.keys.release_orphaned_slots().await.unwrap(), 3);
    assert_eq!(a.keys.release_orphaned_slots().await.unwrap(), 0, "the live node's slots stay");

    // A node that is gone while one of its requests still runs keeps its slots until that request has ended.
    let busy = NodeId::generate();
    let held = admit_at_once(&[&a], &key_with_slots(&b, "busy").await, busy, 2).await;
    assert_eq!(admitted(&held), 2);
    let running = owned_by(Access::Public, Some(busy));
    let id = running.locator.id;
    write(&a.requests, vec![WriteOp::Insert(running)]).await;
    assert_eq!(b.keys.release_orphaned_slots().await.unwrap(), 0, "its request still runs");
    write(&b.requests, vec![finish(id, None)]).await;
    assert_eq!(a.keys.release_orphaned_slots().await.unwrap(), 2, "its request has ended");
}

pub async fn the_cluster_secret_is_one_for_every_handle_and_the_store_answers_a_ping(a: Stores, b: Stores) {
    let (x, y) = tokio::join!(a.nodes.cluster_secret(b"offered by a"), b.nodes.cluster_secret(b"offered by b"));
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x, y, "one secret for all");
    assert!(x == b"offered by a" || x == b"offered by b", "one of those offered");
    assert_eq!(a.nodes.cluster_secret(b"offered later").await.unwrap(), x, "kept");
    a.requests.ping(Duration::from_secs(5)).await.unwrap();
    b.requests.ping(Duration::from_secs(5)).await.unwrap();
}

/// `take_token` (a call paced by the key's rate that is no request) shares the creates' bucket, exactly across
/// handles, and takes no slot and no quota count.
pub async fn paced_calls_share_the_rate_bucket_and_count_no_request(a: Stores, b: Stores) {
    let node = NodeId::generate();
    let rated = key(
        "paced",
        KeyLimits { rate: Some(0.1), requests_per_day: Some(1), max_in_flight: Some(1), ..Default::default() },
    );
    a.keys.create_key(&rated, TokenHash::of("paced")).await.unwrap();
    let calls = (0..40).map(|i| {
        let (keys, k) = ([&a, &b][i % 2].keys.clone(), rated.clone());
        async move { keys.take_token(&k).await.unwrap() }
    });
    let outcomes = futures_util::future::join_all(calls).await;
    assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 1, "one token in the bucket");
    assert!(outcomes.iter().filter_map(|o| o.err()).all(|wait| wait > 5.0 && wait <= 10.0), "{outcomes:?}");
    assert!(matches!(admit_at_once(&[&b], &rated, node, 1).await[0].0, Admit::RateLimited { .. }), "the same bucket");
    b.keys.return_token(&rated).await.unwrap();
    assert_eq!(admitted(&admit_at_once(&[&a], &rated, node, 1).await), 1, "no slot and no quota count were taken");
    let unlimited = key("unpaced", KeyLimits::default());
    a.keys.create_key(&unlimited, TokenHash::of("unpaced")).await.unwrap();
    for _ in 0..5 {
        assert_eq!(b.keys.take_token(&unlimited).await.unwrap(), Ok(()), "a key without a rate always passes");
    }
    assert_eq!(a.keys.keys(&periods()).await.unwrap().iter().find(|(k, _)| k.id == unlimited.id).unwrap().1.today, 0);
}

async fn key_with_slots(stores: &Stores, name: &str) -> ServiceKey {
    let k = key(name, KeyLimits { max_in_flight: Some(3), ..Default::default() });
    stores.keys.create_key(&k, TokenHash::of(name)).await.unwrap();
    k
}

pub async fn a_final_status_without_a_webhook_queues_nothing(stores: Stores) {
    let m = meta(Access::Public);
    let id = m.locator.id;
    write(&stores.requests, vec![WriteOp::Insert(m), finish(id, None)]).await;
    assert!(stores.webhooks.webhook(id).await.unwrap().is_none());
}

fn key(name: &str, limits: KeyLimits) -> ServiceKey {
    ServiceKey { id: format!("key_{name}"), name: name.into(), created_at: 1_700_000_000, revoked_at: None, limits }
}

fn periods() -> Periods {
    Periods { day: "2026-11-22".into(), month: "2026-11".into() }
}

pub async fn keys_are_found_by_hash_listed_and_revoked(stores: Stores) {
    let keys = &stores.keys;
    assert!(!keys.active_keys_exist().await.unwrap());
    let k = key("a", KeyLimits { requests_per_day: Some(3), rate: Some(2.5), ..KeyLimits::default() });
    keys.create_key(&k, TokenHash::of("secret-a")).await.unwrap();
    assert!(
        matches!(
            keys.create_key(&key("a", KeyLimits::default()), TokenHash::of("secret-b")).await,
            Err(StoreError::Conflict(Conflict::KeyNameTaken))
        ),
        "names are unique"
    );
    assert!(keys.active_keys_exist().await.unwrap());
    assert_eq!(keys.key_by_hash(TokenHash::of("secret-a")).await.unwrap(), Some(k.clone()));
    assert!(keys.key_by_hash(TokenHash::of("secret-x")).await.unwrap().is_none());
    let listed = keys.keys(&periods()).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].1.today, 0);
    assert!(keys.revoke_key("key_a", 1_700_000_100).await.unwrap(), "by id");
    assert!(!keys.revoke_key("a", 1_700_000_200).await.unwrap(), "already revoked");
    assert_eq!(keys.key_by_hash(TokenHash::of("secret-a")).await.unwrap().unwrap().revoked_at, Some(1_700_000_100));
    assert!(!keys.active_keys_exist().await.unwrap());
}

/// Charges `k` `n` times at once, spread over the handles; how many were counted (every other answer must be
/// `DayFull`).
async fn charge_at_once(handles: &[&Stores], k: &ServiceKey, n: usize) -> usize {
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let (keys, k) = (handles[i % handles.len()].keys.clone(), k.clone());
            tokio::spawn(async move { keys.charge(&k, &periods()).await.unwrap() })
        })
        .collect();
    let mut counted = 0;
    for call in calls {
        match call.await.unwrap() {
            Charge::Counted => counted += 1,
            other => assert_eq!(other, Charge::DayFull),
        }
    }
    counted
}

pub async fn charging_is_exact_under_concurrency_and_refunds_give_back(stores: Stores) {
    let keys = stores.keys.clone();
    let k = key("q", KeyLimits { requests_per_day: Some(20), requests_per_month: Some(25), ..KeyLimits::default() });
    keys.create_key(&k, TokenHash::of("secret-q")).await.unwrap();
    assert_eq!(charge_at_once(&[&stores], &k, 50).await, 20);
    let usage = keys.keys(&periods()).await.unwrap()[0].1;
    assert_eq!((usage.today, usage.this_month), (20, 20));
    keys.refund(&k.id, &periods()).await.unwrap();
    assert_eq!(keys.charge(&k, &periods()).await.unwrap(), Charge::Counted);
    // A new day: the month quota (25) is what stops it now.
    let tomorrow = Periods { day: "2026-11-23".into(), month: "2026-11".into() };
    let results: Vec<Charge> = futures_util::future::join_all((0..10).map(|_| keys.charge(&k, &tomorrow)))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(results.iter().filter(|c| **c == Charge::Counted).count(), 5);
    assert!(results.contains(&Charge::MonthFull));
}

pub async fn purging_deletes_only_requests_finished_before_the_cutoff(store: Arc<dyn Store>) {
    let (old, recent, running) = (meta(Access::Public), meta(Access::Public), meta(Access::Public));
    let at = |t: f64| Progress { processed_at: Some(t), ..progress(Status::Done) };
    let (o, r, n) = (old.locator.id, recent.locator.id, running.locator.id);
    write(
        &store,
        vec![
            WriteOp::Insert(old),
            WriteOp::Insert(recent),
            WriteOp::Insert(running),
            WriteOp::Event { id: o, seq: 1, data: Bytes::from_static(b"{}") },
            WriteOp::Raw { id: o, seq: 1, piece: RawPiece::Bytes(Bytes::from_static(b"x")) },
            WriteOp::Finish {
                id: o,
                progress: Box::new(at(1_000.0)),
                body: None,
                webhook_url: Some("https://h.example".into()),
                usage: None,
            },
            WriteOp::Finish { id: r, progress: Box::new(at(5_000.0)), body: None, webhook_url: None, usage: None },
        ],
    )
    .await;
    assert_eq!(store.purge_finished(2_000, 100).await.unwrap(), 1);
    assert!(store.get(o).await.unwrap().is_none());
    assert!(store.events(o, 0, 10).await.unwrap().is_empty());
    assert!(store.raw(o).await.unwrap().is_empty());
    assert!(store.get(r).await.unwrap().is_some());
    assert!(store.get(n).await.unwrap().is_some(), "a request without a final status is never purged");
    assert_eq!(store.purge_finished(2_000, 100).await.unwrap(), 0);
}

// Two handles on one store: what two processes (the server and `offload keys`), or two nodes, are.

pub async fn requests_written_through_one_handle_are_read_through_the_other(a: Stores, b: Stores) {
    let m = meta(Access::Private);
    let id = m.locator.id;
    write(&a.requests, vec![WriteOp::Insert(m.clone()), WriteOp::Event { id, seq: 1, data: Bytes::from_static(b"1") }])
        .await;
    write(&b.requests, vec![WriteOp::Event { id, seq: 2, data: Bytes::from_static(b"2") }, finish(id, None)]).await;
    let got = a.requests.get(id).await.unwrap().unwrap();
    assert_eq!((got.meta.locator, got.progress.status, got.event_count), (m.locator, Status::Done, 2));
    assert_eq!(b.requests.events(id, 0, 10).await.unwrap().len(), 2);
    assert!(b.requests.delete(id).await.unwrap());
    assert!(a.requests.get(id).await.unwrap().is_none());
}

pub async fn webhook_claims_are_exclusive_across_handles(a: Stores, b: Stores) {
    let mut queued = Vec::new();
    for _ in 0..4 {
        let mut ops = Vec::new();
        for _ in 0..10 {
            let m = meta(Access::Public);
            queued.push(m.locator.id);
            ops.push(finish(m.locator.id, Some("https://h.example/hook")));
            ops.insert(0, WriteOp::Insert(m));
        }
        write(&a.requests, ops).await;
    }
    let now = 1_700_000_010.0;
    // Two claimers per handle, each taking a few at a time until nothing is left.
    let claimers: Vec<_> = [&a, &b, &a, &b]
        .into_iter()
        .map(|stores| {
            let hooks = stores.webhooks.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let jobs = hooks.claim_webhooks(now, 600.0, 3).await.unwrap();
                    if jobs.is_empty() {
                        return got;
                    }
                    got.extend(jobs.into_iter().map(|j| j.id));
                }
            })
        })
        .collect();
    let mut claimed = Vec::new();
    for claimer in claimers {
        claimed.extend(claimer.await.unwrap());
    }
    assert!(a.webhooks.claim_webhooks(now, 600.0, 100).await.unwrap().is_empty(), "everything was claimed");
    claimed.sort();
    let handed_out = claimed.len();
    claimed.dedup();
    assert_eq!(handed_out, claimed.len(), "no delivery is handed out twice");
    queued.sort();
    assert_eq!(claimed, queued);
}

pub async fn quota_charges_are_exact_across_handles(a: Stores, b: Stores) {
    let k = key("shared", KeyLimits { requests_per_day: Some(50), ..KeyLimits::default() });
    a.keys.create_key(&k, TokenHash::of("secret-shared")).await.unwrap();
    assert_eq!(charge_at_once(&[&a, &b], &k, 200).await, 50);
    assert_eq!(b.keys.keys(&periods()).await.unwrap()[0].1.today, 50);
    b.keys.refund(&k.id, &periods()).await.unwrap();
    assert_eq!(a.keys.charge(&k, &periods()).await.unwrap(), Charge::Counted, "the refund through the other handle");
    assert_eq!(b.keys.charge(&k, &periods()).await.unwrap(), Charge::DayFull);
}

pub async fn keys_created_through_one_handle_are_seen_by_the_other(a: Stores, b: Stores) {
    let k = key("seen", KeyLimits::default());
    a.keys.create_key(&k, TokenHash::of("secret-seen")).await.unwrap();
    assert!(b.keys.active_keys_exist().await.unwrap());
    assert_eq!(b.keys.key_by_hash(TokenHash::of("secret-seen")).await.unwrap(), Some(k.clone()));
    assert!(matches!(
        b.keys.create_key(&key("seen", KeyLimits::default()), TokenHash::of("secret-other")).await,
        Err(StoreError::Conflict(Conflict::KeyNameTaken))
    ));
    assert!(b.keys.revoke_key("seen", 1_700_000_100).await.unwrap());
    assert_eq!(
        a.keys.key_by_hash(TokenHash::of("secret-seen")).await.unwrap().unwrap().revoked_at,
        Some(1_700_000_100)
    );
}

pub async fn handles_opened_at_once_share_one_store(handles: Vec<Stores>) {
    let m = meta(Access::Public);
    let id = m.locator.id;
    write(&handles[0].requests, vec![WriteOp::Insert(m)]).await;
    for stores in &handles {
        assert!(stores.requests.get(id).await.unwrap().is_some());
    }
}

/// `$module()`: the whole suite as trials named `$module::<test>`, each on a store from `$fixture` (an async
/// expression), run when `$need` is met.
macro_rules! contract_suite {
    ($module:ident, $fixture:expr, $need:expr) => {
        fn $module() -> Vec<Trial> {
            let mut trials = Vec::new();
            contract_suite!(@tests trials, $module, $fixture, $need;
                an_inserted_request_reads_back_exactly,
                events_come_back_in_order_and_in_pages,
                raw_pieces_are_concatenated_in_order,
                an_events_piece_expands_to_the_events_as_a_stream_sent_them,
                raw_is_read_in_pages_of_about_the_size_asked_whatever_the_size,
                progress_and_finish_are_kept_and_unfinished_lists_only_the_running,
                delete_removes_the_request_its_events_and_raw,
                a_failed_batch_changes_nothing,
                a_batch_has_the_effect_of_its_ops_applied_in_order,
                an_urgent_insert_does_not_wait_for_a_long_batch,
                concurrent_writers_lose_nothing,
                purging_deletes_only_requests_finished_before_the_cutoff,
                a_final_request_takes_no_more_writes
            );
            contract_suite!(@families trials, $module, $fixture, $need;
                a_final_status_with_a_webhook_queues_one_claimable_delivery,
                a_final_status_without_a_webhook_queues_nothing,
                writes_to_a_deleted_request_are_dropped,
                keys_are_found_by_hash_listed_and_revoked,
                charging_is_exact_under_concurrency_and_refunds_give_back,
                orphans_are_the_unfinished_requests_of_nodes_that_are_gone,
                final_statuses_add_their_tokens_to_their_key_model_and_day_once,
                key_limits_are_replaced_by_name_or_id_and_not_on_revoked_keys
            );
            // Nodes starting together each bring the schema up to date; they take turns.
            trials.push(harness::test(
                concat!(stringify!($module), "::handles_opened_at_once_share_one_store"),
                Flavor::MultiThread,
                $need,
                || async {
                    let fixture = $fixture.await;
                    let handles = futures_util::future::join_all((0..4).map(|_| fixture.open())).await;
                    fixture.run(handles_opened_at_once_share_one_store(handles)).await;
                },
            ));
            contract_suite!(@pairs trials, $module, $fixture, $need;
                requests_written_through_one_handle_are_read_through_the_other,
                webhook_claims_are_exclusive_across_handles,
                quota_charges_are_exact_across_handles,
                keys_created_through_one_handle_are_seen_by_the_other,
                nodes_join_expire_and_are_removed_by_exactly_one_handle,
                in_flight_slots_and_rates_are_exact_across_handles_and_refusals_take_nothing,
                the_cluster_secret_is_one_for_every_handle_and_the_store_answers_a_ping,
                paced_calls_share_the_rate_bucket_and_count_no_request,
                two_handles_ending_one_request_at_once_store_one_final_status_and_one_webhook,
                usage_adds_up_exactly_across_handles
            );
            trials
        }
    };
    (@tests $trials:ident, $module:ident, $fixture:expr, $need:expr; $($test:ident),*) => {
        $(
            $trials.push(harness::test(
                concat!(stringify!($module), "::", stringify!($test)),
                Flavor::CurrentThread,
                $need,
                || async {
                    let fixture = $fixture.await;
                    let stores = fixture.open().await;
                    fixture.run($test(stores.requests)).await;
                },
            ));
        )*
    };
    (@families $trials:ident, $module:ident, $fixture:expr, $need:expr; $($test:ident),*) => {
        $(
            $trials.push(harness::test(
                concat!(stringify!($module), "::", stringify!($test)),
                Flavor::CurrentThread,
                $need,
                || async {
                    let fixture = $fixture.await;
                    let stores = fixture.open().await;
                    fixture.run($test(stores)).await;
                },
            ));
        )*
    };
    (@pairs $trials:ident, $module:ident, $fixture:expr, $need:expr; $($test:ident),*) => {
        $(
            $trials.push(harness::test(
                concat!(stringify!($module), "::", stringify!($test)),
                Flavor::MultiThread,
                $need,
                || async {
                    let fixture = $fixture.await;
                    let (a, b) = (fixture.open().await, fixture.open().await);
                    fixture.run($test(a, b)).await;
                },
            ));
        )*
    };
}

/// One store made for one test: each call to [`Fixture::open`] opens another handle on it.
enum Fixture {
    Sqlite(tempfile::TempDir),
    /// A schema of its own in the test database, dropped when the test ends.
    Postgres {
        url: String,
        schema: String,
    },
}

impl Fixture {
    async fn open(&self) -> Stores {
        match self {
            Fixture::Sqlite(dir) => {
                let store = offload::store::sqlite::SqliteStore::open(dir.path(), Default::default()).unwrap();
                Stores::of(Arc::new(store))
            }
            Fixture::Postgres { url, schema } => {
                let store = offload::store::postgres::PostgresStore::connect(url, Some(schema)).await.unwrap();
                Stores::of(Arc::new(store))
            }
        }
    }

    /// Runs the test body, then removes the store whether the body passed or panicked (then the panic goes on).
    async fn run(self, body: impl Future<Output = ()> + Send + 'static) {
        let outcome = tokio::spawn(body).await;
        if let Fixture::Postgres { url, schema } = &self {
            match pg_admin(url).await {
                Ok(admin) => {
                    if let Err(e) = admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).await {
                        eprintln!("warning: could not drop the test schema {schema}: {e}");
                    }
                }
                Err(e) => eprintln!("warning: could not drop the test schema {schema}: {e}"),
            }
        }
        if let Err(e) = outcome {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

async fn sqlite() -> Fixture {
    Fixture::Sqlite(tempfile::tempdir().unwrap())
}

/// A plain connection to the test database, for setting up and dropping schemas.
async fn pg_admin(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// A fresh schema in the test database (the tests that use it need [`support::postgres::needed`]).
async fn postgres() -> Fixture {
    let url = support::postgres::admin_url().unwrap_or_else(|missing| unreachable!("checked first: {missing:?}"));
    let schema = format!("offload_test_{}", uuid::Uuid::new_v4().simple());
    Fixture::Postgres { url, schema }
}

/// The schema of version 4, as the release before nodes wrote it (verbatim).
const VERSION_4_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS requests (
    rkey INTEGER PRIMARY KEY,
    id BLOB NOT NULL UNIQUE,
    kind INTEGER NOT NULL,
    access INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    bearer BLOB,
    stream_token BLOB,
    meta TEXT NOT NULL,
    parameters TEXT NOT NULL,
    status TEXT NOT NULL,
    progress TEXT NOT NULL,
    body TEXT,
    final_at INTEGER
);
CREATE INDEX IF NOT EXISTS requests_unfinished ON requests(status) WHERE status NOT IN ('done', 'error', 'stop');
CREATE INDEX IF NOT EXISTS requests_final_at ON requests(final_at) WHERE final_at IS NOT NULL;
-- Rows in arrival order: with thousands of streams appending at once, a commit's chunks sit on a few
-- consecutive pages instead of one page per stream; only the small index entries scatter.
CREATE TABLE IF NOT EXISTS events (
    pos INTEGER PRIMARY KEY,
    rkey INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS events_by_request ON events(rkey, seq);
CREATE TABLE IF NOT EXISTS raw_parts (
    rkey INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    -- NULL: this piece is the request's events (1..=events_through, or all when that is NULL too).
    bytes BLOB,
    events_through INTEGER,
    PRIMARY KEY (rkey, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS webhooks (
    request_id BLOB PRIMARY KEY,
    url TEXT NOT NULL,
    state TEXT NOT NULL,
    next_attempt_at REAL NOT NULL,
    status TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS webhooks_due ON webhooks(next_attempt_at) WHERE state IN ('pending', 'retrying');
CREATE TABLE IF NOT EXISTS service_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    hash BLOB NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER,
    limits TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS key_usage (
    key_id TEXT NOT NULL,
    period TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (key_id, period)
) WITHOUT ROWID;
PRAGMA user_version = 4;
"#;

async fn a_version_4_sqlite_store_is_upgraded_in_place_and_keeps_its_requests() {
    let dir = tempfile::tempdir().unwrap();
    let m = meta(Access::Public);
    let id = m.locator.id;
    {
        // Written by the previous release: its schema, one finished request.
        let conn = rusqlite::Connection::open(dir.path().join("offload.db")).unwrap();
        conn.execute_batch(VERSION_4_SCHEMA).unwrap();
        conn.execute(
            "INSERT INTO requests (id, kind, access, created_at, meta, parameters, status, progress, body, final_at)
             VALUES (?1, 1, 1, 1700000000, ?2, ?3, 'done', ?4, '{}', 1700000002)",
            rusqlite::params![
                &id.as_bytes()[..],
                r#"{"created":1700000000.25,"conversation_id":"c","options":{"timeout":12.5,"connect_timeout":3}}"#,
                m.parameters.get(),
                serde_json::to_string(&progress(Status::Done)).unwrap(),
            ],
        )
        .unwrap();
    }
    let stores =
        Stores::of(Arc::new(offload::store::sqlite::SqliteStore::open(dir.path(), Default::default()).unwrap()));
    let got = stores.requests.get(id).await.unwrap().unwrap();
    assert_eq!(got.progress.status, Status::Done);
    assert_eq!(got.meta.owner, None, "a request from before nodes has no owner");
    // The new tables are there.
    let node = NodeRecord { id: NodeId::generate(), address: "http://127.0.0.1:1".into() };
    stores.nodes.join(&node, Duration::from_secs(5)).await.unwrap();
    assert_eq!(stores.keys.release_orphaned_slots().await.unwrap(), 0);
    let version: i64 = rusqlite::Connection::open(dir.path().join("offload.db"))
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 7);
    assert!(stores.keys.usage(offload::store::usage::UsageOf::All, "2000-01-01").await.unwrap().is_empty());
}

contract_suite!(sqlite_store, sqlite(), harness::nothing);
contract_suite!(postgres_store, postgres(), support::postgres::needed);

fn main() -> ExitCode {
    let mut trials = sqlite_store();
    trials.extend(postgres_store());
    trials.push(harness::test(
        "a_version_4_sqlite_store_is_upgraded_in_place_and_keeps_its_requests",
        Flavor::CurrentThread,
        harness::nothing,
        a_version_4_sqlite_store_is_upgraded_in_place_and_keeps_its_requests,
    ));
    trials.push(harness::test(
        "the_wal_is_started_over_after_a_checkpoint_by_the_store_itself",
        Flavor::CurrentThread,
        harness::nothing,
        sqlite_wal::the_wal_is_started_over_after_a_checkpoint_by_the_store_itself,
    ));
    trials.push(harness::test(
        "an_insert_waiting_for_another_process_lock_does_not_hold_up_its_thread",
        Flavor::CurrentThread,
        harness::nothing,
        sqlite_inline::an_insert_waiting_for_another_process_lock_does_not_hold_up_its_thread,
    ));
    harness::run(trials)
}
