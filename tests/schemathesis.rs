//! Schemathesis (property-based API testing, from PyPI) against the real `offload` binary, driven by the
//! server's own `GET /openapi.json`: every operation, every check (`--checks all`: no 5xx, status codes,
//! content types, headers and bodies as documented, invalid input refused, valid input accepted, 405 with
//! `Allow` for undocumented methods, ...), bounded in examples and time.
//!
//! The request endpoints are pinned to real requests created first (a random id would only ever reach the 404),
//! so that documents, event streams, raw bodies, stops and deletes are exercised for real; in the stateful phase,
//! schemathesis also follows the document's links from a create's answer to the operations on that request.
//!
//! Needs the schemathesis CLI: `$OFFLOAD_SCHEMATHESIS`, else `.venv-schemathesis/bin/schemathesis` in the
//! repository (`python3 -m venv .venv-schemathesis && .venv-schemathesis/bin/pip install schemathesis==4.32.5`;
//! `.ci/run` does it). Without it the test is reported ignored with the reason (`harness = false`:
//! `support::harness`), except under CI (`CI` set), where it fails.
//! `OFFLOAD_SCHEMATHESIS_SEED` replaces the fixed seed (to explore further than CI does).

#![expect(clippy::unwrap_used, clippy::panic, reason = "a test fails loudly on anything unexpected")]

use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Test cases per operation and phase: a run takes under a minute on 2 cores.
const MAX_EXAMPLES: &str = "100";
/// The whole run is killed (and the test fails) past this.
const TIME_LIMIT: Duration = Duration::from_secs(300);
const SEED: &str = "20261122";

fn schemathesis() -> Result<PathBuf, Missing> {
    let path = std::env::var_os("OFFLOAD_SCHEMATHESIS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv-schemathesis/bin/schemathesis")));
    path.exists().then_some(path).ok_or_else(|| {
        Missing(
            "needs the schemathesis CLI: python3 -m venv .venv-schemathesis && .venv-schemathesis/bin/pip install \
             schemathesis==4.32.5 (or set OFFLOAD_SCHEMATHESIS)"
                .to_owned(),
        )
    })
}

mod support;

use support::Offload as Server;
use support::harness::{self, Flavor, Missing};

/// Starts `offload serve --mock-upstream` on port 0.
fn start(data_dir: &std::path::Path) -> Server {
    let mut command = Server::command();
    command.args(["serve", "--mock-upstream", "--listen", "127.0.0.1:0"]).arg("--data-dir").arg(data_dir);
    Server::spawn(command)
}

/// Creates a finished public request with `endpoint` and returns the TOML `parameters` that pin its URL.
async fn pinned(client: &reqwest::Client, base: &str, endpoint: &str) -> String {
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "mock": {"words": 5}});
    let created: Value =
        client.post(format!("{base}{endpoint}")).json(&body).send().await.unwrap().json().await.unwrap();
    let status_url = created["endpoints"]["status_url"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let doc: Value = client.get(&status_url).send().await.unwrap().json().await.unwrap();
        if doc["status"] == "done" {
            break;
        }
        assert!(Instant::now() < deadline, "not done in time: {doc}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // .../{kind}/r/{access}/{yyyy}/{mm}/{dd}/{hh}/{mi}/{ss}/{id}.json
    let segments: Vec<&str> = status_url.split('/').collect();
    let r = segments.iter().position(|s| *s == "r").unwrap();
    let names = ["access", "yyyy", "mm", "dd", "hh", "mi", "ss"];
    let mut pairs = vec![format!("kind = \"{}\"", segments[r - 1])];
    pairs.extend(names.iter().zip(&segments[r + 1..r + 8]).map(|(n, v)| format!("{n} = \"{v}\"")));
    pairs.push(format!("id = \"{}\"", segments[r + 8].trim_end_matches(".json")));
    format!("parameters = {{ {} }}", pairs.join(", "))
}

async fn schemathesis_finds_no_fault_in_any_operation_of_the_openapi_document() {
    let cli = schemathesis().unwrap_or_else(|missing| unreachable!("checked first: {missing:?}"));
    let data = tempfile::tempdir().unwrap();
    let server = start(&data.path().join("store"));
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let stream = pinned(&client, &base, "/v1/stream-chatgpt").await;
    let to_delete = pinned(&client, &base, "/v1/async-chatgpt").await;

    // Valid create bodies can still be refused with 400 for what a schema cannot say: a `messages` string that
    // does not hold a JSON array of messages, a `webhook_url` whose host does not resolve to a public address,
    // a `from_bearer_token` without `from_status_url`. A stop after the request finished is 405 by contract.
    let config = format!(
        r#"
[[operations]]
include-tag = "create"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429"]

[[operations]]
include-tag = "openai"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429"]

[[operations]]
include-operation-id = ["getStatus", "getEvents", "getRaw"]
{stream}

[[operations]]
include-operation-id = ["stop", "stopByGet"]
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "405"]
{stream}

[[operations]]
include-operation-id = "deleteRequest"
{to_delete}
"#
    );
    let config_file = data.path().join("schemathesis.toml");
    std::fs::write(&config_file, config).unwrap();
    let seed = std::env::var("OFFLOAD_SCHEMATHESIS_SEED").unwrap_or_else(|_| SEED.to_owned());

    let mut command = tokio::process::Command::new(&cli);
    command
        .arg("--config-file")
        .arg(&config_file)
        .args(["run", &format!("{base}/openapi.json"), "--checks", "all", "--max-examples", MAX_EXAMPLES])
        // One worker: hypothesis parses lambdas' source with `ast` while generating, and CPython 3.11.7's `ast`
        // is not safe across threads ("AST constructor recursion depth mismatch").
        .args(["--workers", "1", "--seed", &seed, "--generation-database", "none", "--request-timeout", "30"])
        .arg("--no-color")
        .current_dir(data.path())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let run = tokio::time::timeout(TIME_LIMIT, command.output()).await;
    let output = run.unwrap_or_else(|_| panic!("schemathesis did not finish within {TIME_LIMIT:?}")).unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "schemathesis found faults (seed {seed}):\n{report}");
    // The stateful phase runs only when the document's links lead somewhere: from a create to its request.
    assert!(
        report.lines().any(|line| line.contains("Stateful") && line.contains('✅')),
        "the stateful phase did not run:\n{report}"
    );
    eprintln!("{report}");
    drop(server);
}

fn main() -> std::process::ExitCode {
    harness::run(vec![harness::test(
        "schemathesis_finds_no_fault_in_any_operation_of_the_openapi_document",
        Flavor::CurrentThread,
        || schemathesis().map(|_| ()),
        schemathesis_finds_no_fault_in_any_operation_of_the_openapi_document,
    )])
}
