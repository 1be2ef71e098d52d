//! Every limit holds exactly under a burst of a thousand simultaneous create calls.

use crate::helpers::*;
use crate::keys::{burst, create_key};
use serde_json::{Value, json};

const BURST: usize = 1000;

/// A request that keeps its slot for a few seconds, longer than any burst takes.
fn slow() -> Value {
    json!({"messages": user("hi"), "mock": {"words": 100, "delay_ms": 50}})
}

async fn statuses(responses: Vec<reqwest::Response>) -> Vec<(u16, Value)> {
    let mut out = Vec::with_capacity(responses.len());
    for r in responses {
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        out.push((status, body));
    }
    out
}

fn count(results: &[(u16, Value)], status: u16) -> usize {
    results.iter().filter(|(s, _)| *s == status).count()
}

#[tokio::test]
async fn the_servers_max_in_flight_holds_exactly_under_a_thousand_simultaneous_creates() {
    let app = spawn_with(|a| a.max_in_flight = Some(5)).await;
    let body = slow();
    let calls = (0..BURST).map(|_| app.create("stream-chatgpt", &body));
    let results = statuses(futures_util::future::join_all(calls).await).await;
    assert_eq!(count(&results, 200), 5, "exactly max-in-flight admitted");
    assert_eq!(count(&results, 503), BURST - 5);
    assert!(results.iter().filter(|(s, _)| *s == 503).all(|(_, b)| b["status"] == "error"));
}

#[tokio::test]
async fn a_keys_max_in_flight_holds_exactly_under_a_thousand_simultaneous_creates() {
    let app = spawn_app().await;
    let key = create_key(&app, "parallel", &["--max-in-flight", "5"]);
    let results = statuses(burst(&app, &key, &slow(), BURST).await).await;
    assert_eq!(count(&results, 200), 5);
    assert_eq!(count(&results, 429), BURST - 5);
}

#[tokio::test]
async fn day_and_month_quotas_hold_exactly_under_a_thousand_simultaneous_creates() {
    let app = spawn_app().await;
    let daily = create_key(&app, "daily", &["--requests-per-day", "7"]);
    let monthly = create_key(&app, "monthly", &["--requests-per-month", "9"]);
    let body = json!({"messages": user("hi")});
    let (day, month) = tokio::join!(burst(&app, &daily, &body, BURST), burst(&app, &monthly, &body, BURST));
    let (day, month) = (statuses(day).await, statuses(month).await);
    assert_eq!(count(&day, 200), 7);
    assert_eq!(count(&day, 429), BURST - 7);
    assert_eq!(count(&month, 200), 9);
    assert_eq!(count(&month, 429), BURST - 9);
}

#[tokio::test]
async fn a_rate_holds_exactly_under_a_thousand_simultaneous_creates() {
    let app = spawn_app().await;
    // One token per ten seconds: the bucket holds one, and none refills while the burst lasts.
    let key = create_key(&app, "rated", &["--rate", "0.1"]);
    let started = std::time::Instant::now();
    let results = statuses(burst(&app, &key, &json!({"messages": user("hi")}), BURST).await).await;
    assert!(started.elapsed().as_secs() < 10, "the burst outlasted a refill; the count below would not be exact");
    assert_eq!(count(&results, 200), 1);
    assert_eq!(count(&results, 429), BURST - 1);
}
