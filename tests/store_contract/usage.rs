//! The contract of the usage rows (requests and tokens per key, model and day) and of changing a key's limits.

use super::*;
use offload::store::usage::{Tally, UsageOf, UsageRow};

fn keyed(key: Option<&str>) -> Arc<RequestMeta> {
    let mut m = (*meta(Access::Public)).clone();
    m.key = key.map(str::to_owned);
    Arc::new(m)
}

fn tally(key: Option<&str>, model: &str, day: &str, input: u64, output: u64) -> Option<Box<Tally>> {
    Some(Box::new(Tally { key: key.map(str::to_owned), model: model.into(), day: day.into(), input, output }))
}

fn finish_counting(id: RequestId, usage: Option<Box<Tally>>) -> WriteOp {
    WriteOp::Finish { id, progress: Box::new(progress(Status::Done)), body: None, webhook_url: None, usage }
}

fn row(key: Option<&str>, model: &str, day: &str, requests: u64, input: u64, output: u64) -> UsageRow {
    UsageRow {
        key: key.map(str::to_owned),
        model: model.into(),
        day: day.into(),
        requests,
        input_tokens: input,
        output_tokens: output,
    }
}

pub async fn final_statuses_add_their_tokens_to_their_key_model_and_day_once(stores: Stores) {
    let store = &stores.requests;
    let (a1, a2, a3, none) = (keyed(Some("key_a")), keyed(Some("key_a")), keyed(Some("key_a")), keyed(None));
    let (id1, id2, id3, id0) = (a1.locator.id, a2.locator.id, a3.locator.id, none.locator.id);
    write(store, vec![WriteOp::Insert(a1), WriteOp::Insert(a2), WriteOp::Insert(none)]).await;
    write(
        store,
        vec![
            finish_counting(id1, tally(Some("key_a"), "m", "2026-11-21", 10, 20)),
            // A second final status is dropped, and what it would add with it.
            finish_counting(id1, tally(Some("key_a"), "m", "2026-11-21", 1000, 1000)),
            finish_counting(id2, tally(Some("key_a"), "m", "2026-11-22", 1, 2)),
            finish_counting(id0, tally(None, "other", "2026-11-22", 3, 4)),
        ],
    )
    .await;
    // Inserted and ended in one batch; then ended again in a later one (dropped).
    write(store, vec![WriteOp::Insert(a3), finish_counting(id3, tally(Some("key_a"), "m", "2026-11-22", 5, 6))]).await;
    write(store, vec![finish_counting(id3, tally(Some("key_a"), "m", "2026-11-22", 5, 6))]).await;
    write(store, vec![finish_counting(id2, tally(Some("key_a"), "m", "2026-11-22", 7, 7))]).await;
    // A final status without a tally, and one of a request that does not exist, count nothing.
    let plain = keyed(Some("key_a"));
    write(store, vec![WriteOp::Insert(plain.clone()), finish_counting(plain.locator.id, None)]).await;
    write(store, vec![finish_counting(RequestId::generate(), tally(Some("key_a"), "m", "2026-11-22", 9, 9))]).await;

    let all = stores.keys.usage(UsageOf::All, "2026-11-01").await.unwrap();
    assert_eq!(
        all,
        [
            row(Some("key_a"), "m", "2026-11-21", 1, 10, 20),
            row(None, "other", "2026-11-22", 1, 3, 4),
            row(Some("key_a"), "m", "2026-11-22", 2, 6, 8),
        ]
    );
    let a_today = stores.keys.usage(UsageOf::Key(Some("key_a")), "2026-11-22").await.unwrap();
    assert_eq!(a_today, [row(Some("key_a"), "m", "2026-11-22", 2, 6, 8)]);
    let keyless = stores.keys.usage(UsageOf::Key(None), "2026-11").await.unwrap();
    assert_eq!(keyless, [row(None, "other", "2026-11-22", 1, 3, 4)]);
    assert!(stores.keys.usage(UsageOf::Key(Some("key_b")), "2026-11").await.unwrap().is_empty());
    assert!(stores.keys.usage(UsageOf::All, "2026-11-23").await.unwrap().is_empty());
}

pub async fn key_limits_are_replaced_by_name_or_id_and_not_on_revoked_keys(stores: Stores) {
    let k = key("budgeted", KeyLimits { requests_per_day: Some(3), ..KeyLimits::default() });
    stores.keys.create_key(&k, TokenHash::of("budgeted")).await.unwrap();
    let limits = KeyLimits { tokens_per_day: Some(1000), tokens_per_month: Some(20_000), ..KeyLimits::default() };
    assert!(stores.keys.set_limits("budgeted", &limits).await.unwrap());
    assert_eq!(stores.keys.key_by_hash(TokenHash::of("budgeted")).await.unwrap().unwrap().limits, limits);
    let again = KeyLimits { rate: Some(2.5), ..limits.clone() };
    assert!(stores.keys.set_limits(&k.id, &again).await.unwrap());
    assert_eq!(stores.keys.key_by_hash(TokenHash::of("budgeted")).await.unwrap().unwrap().limits, again);
    assert!(!stores.keys.set_limits("nobody", &limits).await.unwrap());
    assert!(stores.keys.revoke_key("budgeted", 1_700_000_001).await.unwrap());
    assert!(!stores.keys.set_limits("budgeted", &limits).await.unwrap());
}

pub async fn usage_adds_up_exactly_across_handles(a: Stores, b: Stores) {
    const N: u64 = 40;
    let metas: Vec<_> = (0..N).map(|_| keyed(Some("key_busy"))).collect();
    write(&a.requests, metas.iter().cloned().map(WriteOp::Insert).collect()).await;
    let ends = metas.iter().enumerate().map(|(i, m)| {
        let store = if i % 2 == 0 { a.requests.clone() } else { b.requests.clone() };
        let id = m.locator.id;
        async move {
            // Both handles end every request: each is counted once, by the one whose final status applies.
            let op = || finish_counting(id, tally(Some("key_busy"), "m", "2026-11-22", 3, 5));
            write(&store, vec![op()]).await;
            write(&store, vec![op()]).await;
        }
    });
    let others = metas.iter().map(|m| {
        let id = m.locator.id;
        let store = b.requests.clone();
        async move { write(&store, vec![finish_counting(id, tally(Some("key_busy"), "m", "2026-11-22", 3, 5))]).await }
    });
    futures_util::future::join(futures_util::future::join_all(ends), futures_util::future::join_all(others)).await;
    for handle in [&a, &b] {
        let rows = handle.keys.usage(UsageOf::Key(Some("key_busy")), "2026-11-22").await.unwrap();
        assert_eq!(rows, [row(Some("key_busy"), "m", "2026-11-22", N, 3 * N, 5 * N)]);
    }
}
