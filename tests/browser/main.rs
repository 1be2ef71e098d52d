//! A real browser as the client, against the real server on port 0 and the built-in mock upstream: headless
//! Chromium runs a page from another origin that uses `fetch` and the browser's own `EventSource`
//! (`event_source.rs`, `cross_origin.rs`), and the playground driven through its own UI (`playground.rs`).
//!
//! Needs Chromium (`apt-get install chromium`; `.ci/run` installs it). Without it the tests are reported ignored
//! with the reason (`harness = false`: `support::harness`), except under CI (`CI` set), where they fail.

#![expect(clippy::unwrap_used, clippy::panic, reason = "a test fails loudly on anything unexpected")]

mod cross_origin;
mod event_source;
#[path = "../api/helpers.rs"]
#[allow(dead_code, reason = "the browser tests use part of the API tests' helpers")]
mod helpers;
mod playground;
#[path = "../support/mod.rs"]
mod support;

use support::harness::{self, Flavor, Missing};

/// Headless Chromium as this machine allows it: no sandbox (root), no GPU, and no connection of its own to the
/// network, which is closed here (its background calls would be refused, many at a time).
pub const HEADLESS: [&str; 8] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
];

/// Opens `site_url` in headless Chromium and returns the JSON report its page sends back on `reports` (within
/// 60 s), checked to carry no `failure`.
pub async fn page_report(
    browser: &std::path::Path,
    site_url: &str,
    reports: &mut tokio::sync::mpsc::Receiver<String>,
) -> serde_json::Value {
    let profile = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(browser)
        .args(HEADLESS)
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(site_url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let report = tokio::time::timeout(std::time::Duration::from_secs(60), reports.recv()).await;
    let _ = child.kill().await;
    let report = report.unwrap_or_else(|_| panic!("the page never reported")).unwrap();
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert!(report.get("failure").is_none(), "{report}");
    report
}

/// Where Chromium is installed, if it is.
pub fn chromium() -> Result<std::path::PathBuf, Missing> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| Missing("needs Chromium: apt-get install chromium".to_owned()))
}

fn main() -> std::process::ExitCode {
    let needs_chromium = || chromium().map(|_| ());
    harness::run(vec![
        harness::test(
            "cross_origin::a_page_on_another_origin_cannot_create_on_an_open_server_but_uses_the_request_urls_it_is_given",
            Flavor::CurrentThread,
            needs_chromium,
            cross_origin::a_page_on_another_origin_cannot_create_on_an_open_server_but_uses_the_request_urls_it_is_given,
        ),
        harness::test(
            "event_source::a_browser_page_on_another_origin_follows_reads_and_stops_requests",
            Flavor::CurrentThread,
            needs_chromium,
            event_source::a_browser_page_on_another_origin_follows_reads_and_stops_requests,
        ),
        harness::test(
            "playground::the_playground_streams_live_stops_continues_and_replays_in_a_real_browser",
            Flavor::CurrentThread,
            needs_chromium,
            playground::the_playground_streams_live_stops_continues_and_replays_in_a_real_browser,
        ),
    ])
}
