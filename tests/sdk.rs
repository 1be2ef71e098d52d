//! The official OpenAI Python SDK (`openai` from PyPI) against the real `offload` binary, with its base URL set to
//! offload's `/v1` (sections 10 and 11): small Python scripts, each run with the SDK's own venv, that assert what an
//! application sees and print what the test checks further.
//!
//! Needs the SDK: `$OFFLOAD_OPENAI_PYTHON`, else `.venv-openai/bin/python` in the repository (`python3 -m venv
//! .venv-openai && .venv-openai/bin/pip install openai==3.54.0`; `.ci/run` does it). Without it every test is
//! reported ignored with the reason (`harness = false`: `support::harness`), except under CI (`CI` set), where it
//! fails.

#![expect(clippy::unwrap_used, clippy::panic, reason = "a test fails loudly on anything unexpected")]

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// What every script starts with: the client, pointed at the server named by the first argument, and helpers for
/// plain HTTP (the standard library's, so that nothing but the SDK is installed).
const PRELUDE: &str = r#"
import json, sys, urllib.request, urllib.error
import openai

BASE = sys.argv[1]
# The SDK's own retries are off: the retries under test are offload's.
client = openai.OpenAI(base_url=BASE + "/v1", api_key="any key while the server runs open", max_retries=0)
MESSAGES = [{"role": "user", "content": "hi"}]

def get(url, headers=None):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()

def wait_final(url, headers=None):
    import time
    for _ in range(1000):
        status, body = get(url, headers)
        doc = json.loads(body)
        if doc["status"] in ("done", "error", "stop"):
            return doc
        time.sleep(0.02)
    raise AssertionError("not final in time: " + body)

def events(body):
    """(id, data) of every event of an event-stream body."""
    out = []
    for block in body.split("\n\n"):
        event_id, data = None, []
        for line in block.split("\n"):
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                data.append(line[6:])
        if data:
            out.append((event_id, "\n".join(data)))
    return out

def content(datas):
    text = ""
    for data in datas:
        if data != "[DONE]":
            text += json.loads(data)["choices"][0]["delta"].get("content") or ""
    return text
"#;

fn python() -> Result<PathBuf, Missing> {
    let path = std::env::var_os("OFFLOAD_OPENAI_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv-openai/bin/python")));
    path.exists().then_some(path).ok_or_else(|| {
        Missing(
            "needs the OpenAI SDK: python3 -m venv .venv-openai && .venv-openai/bin/pip install openai==3.54.0 \
             (or set OFFLOAD_OPENAI_PYTHON)"
                .to_owned(),
        )
    })
}

mod support;

use support::harness::{self, Missing};

/// `offload serve --mock-upstream` on port 0, on a data directory of its own.
struct Server {
    _process: support::Offload,
    base: String,
    _data: tempfile::TempDir,
}

/// Starts `offload serve --mock-upstream` on port 0.
fn start() -> Server {
    let data = tempfile::tempdir().unwrap();
    let mut command = support::Offload::command();
    command
        .args(["serve", "--mock-upstream", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(data.path().join("store"));
    let process = support::Offload::spawn(command);
    let base = format!("http://{}", process.addr);
    Server { _process: process, base, _data: data }
}

/// Runs `script` (after the prelude) against a fresh server; it must exit 0 and print one JSON line last.
fn run(script: &str) -> Value {
    let python = python().unwrap_or_else(|missing| unreachable!("checked first: {missing:?}"));
    let server = start();
    let output = Command::new(python)
        .arg("-c")
        .arg(format!("{PRELUDE}\n{script}"))
        .arg(&server.base)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the script failed:\n{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap_or_else(|| panic!("the script printed nothing:\n{stderr}"));
    serde_json::from_str(last).unwrap_or_else(|e| panic!("not JSON ({e}): {last}"))
}

fn sdk_completion_without_stream_is_the_upstreams_and_is_recorded() {
    let script = r#"
raw = client.chat.completions.with_raw_response.create(
    model="gpt-4o-mini", messages=MESSAGES, extra_body={"mock": {"content": "Hello from the SDK"}})
completion = raw.parse()
assert completion.object == "chat.completion", completion
doc = wait_final(raw.headers["x-offload-status-url"])
print(json.dumps({"content": completion.choices[0].message.content, "doc": doc,
                  "stream_url": raw.headers.get("x-offload-stream-url")}))
"#;
    let out = run(script);
    assert_eq!(out["content"], "Hello from the SDK");
    assert_eq!(out["doc"]["status"], "done");
    assert_eq!(out["doc"]["parameters"]["model"], "gpt-4o-mini");
    assert_eq!(out["doc"]["response"]["body"]["choices"][0]["message"]["content"], "Hello from the SDK");
    assert!(out["stream_url"].is_null());
}

fn sdk_stream_yields_every_chunk_live_and_ends() {
    let script = r#"
stream = client.chat.completions.create(
    model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True},
    extra_body={"mock": {"content": "one two three four", "delay_ms": 20}})
text, usage = "", None
for chunk in stream:
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
    if chunk.usage:
        usage = chunk.usage.total_tokens
print(json.dumps({"text": text, "usage": usage}))
"#;
    let out = run(script);
    assert_eq!(out["text"], "one two three four");
    assert!(out["usage"].as_u64().unwrap() > 0, "{out}");
}

fn sdk_raises_its_exception_for_an_upstream_error_with_its_status_and_message() {
    let script = r#"
result = {}
for stream in (False, True):
    try:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=stream,
            extra_body={"mock": {"status": 429, "error_message": "Rate limit reached for requests"}})
        raise AssertionError("no exception")
    except openai.RateLimitError as e:
        result[str(stream)] = {"status": e.status_code, "message": e.message,
                               "status_url": e.response.headers.get("x-offload-status-url")}
try:
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
        extra_body={"mock": {"status": 400, "error_message": "Bad model"}})
    raise AssertionError("no exception")
except openai.BadRequestError as e:
    result["400"] = {"status": e.status_code, "message": e.message}
print(json.dumps(result))
"#;
    let out = run(script);
    for stream in ["False", "True"] {
        assert_eq!(out[stream]["status"], 429, "{out}");
        assert!(out[stream]["message"].as_str().unwrap().contains("Rate limit reached for requests"), "{out}");
        assert!(out[stream]["status_url"].is_string(), "{out}");
    }
    assert_eq!(out["400"]["status"], 400);
    assert!(out["400"]["message"].as_str().unwrap().contains("Bad model"));
}

fn sdk_caller_that_disconnects_mid_stream_resumes_the_full_reply_from_the_stream_url() {
    let script = r#"
WORDS = " ".join("word%d" % i for i in range(30))
with client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True,
        extra_body={"mock": {"content": WORDS, "delay_ms": 30}}) as response:
    stream_url = response.headers["x-offload-stream-url"]
    status_url = response.headers["x-offload-status-url"]
    got, read = "", 0
    for chunk in response.parse():
        read += 1
        got += chunk.choices[0].delta.content or ""
        if read == 5:
            break
# The connection is closed here, mid-stream. The call goes on: resume after the chunks read.
status, body = get(stream_url, {"Last-Event-ID": str(read)})
assert status == 200, (status, body)
rest = events(body)
assert rest[0][0] == str(read + 1), rest[0]
doc = wait_final(status_url)
print(json.dumps({"expected": WORDS, "resumed": got + content(d for _, d in rest), "doc_status": doc["status"],
                  "doc_text": doc["response"]["body"]["choices"][0]["message"]["content"]}))
"#;
    let out = run(script);
    assert_eq!(out["resumed"], out["expected"]);
    assert_eq!(out["doc_status"], "done");
    assert_eq!(out["doc_text"], out["expected"]);
}

fn sdk_private_access_by_header_answers_a_bearer_token_the_urls_need() {
    let script = r#"
raw = client.chat.completions.with_raw_response.create(
    model="gpt-4o-mini", messages=MESSAGES, extra_headers={"X-Offload-Access": "private"},
    extra_body={"mock": {"words": 3}})
raw.parse()
status_url, token = raw.headers["x-offload-status-url"], raw.headers["x-offload-bearer-token"]
without, _ = get(status_url)
doc = wait_final(status_url, {"Authorization": "Bearer " + token})
print(json.dumps({"url": status_url, "without": without, "status": doc["status"], "access": doc["authorization"]["access"]}))
"#;
    let out = run(script);
    assert!(out["url"].as_str().unwrap().contains("/priv/"));
    assert_eq!(out["without"], 401);
    assert_eq!(out["status"], "done");
    assert_eq!(out["access"], "private");
}

fn sdk_gets_the_answer_of_an_upstream_that_fails_the_first_attempts_and_the_document_shows_them() {
    let script = r#"
result = {}
for stream in (False, True):
    mock = {"fail_first": 2, "status": 503, "content": "after two failures", "key": "retry-%s" % stream}
    with client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=stream, extra_body={"mock": mock}) as response:
        status_url = response.headers["x-offload-status-url"]
        parsed = response.parse()
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in parsed if c.choices)
        else:
            text = parsed.choices[0].message.content
    doc = wait_final(status_url)
    result[str(stream)] = {"text": text, "status": doc["status"], "attempts": doc.get("attempts")}
print(json.dumps(result))
"#;
    let out = run(script);
    for stream in ["False", "True"] {
        let r = &out[stream];
        assert_eq!(r["text"], "after two failures", "{out}");
        assert_eq!(r["status"], "done", "{out}");
        let attempts = r["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 2, "{out}");
        assert!(attempts.iter().all(|a| a["status_code"] == 503 && a["error"]["code"] == "upstream_error"), "{out}");
    }
}

fn sdk_stream_that_fails_after_its_first_chunk_is_not_retried_and_raises() {
    let script = r#"
stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True,
    extra_headers={"X-Offload-On-Disconnect": "continue"},
    extra_body={"mock": {"content": "a b c d e", "drop_after": 3}})
text, raised = "", None
try:
    for chunk in stream:
        text += chunk.choices[0].delta.content or ""
except openai.APIError as e:
    raised = type(e).__name__
status_url = stream.response.headers["x-offload-status-url"]
doc = wait_final(status_url)
print(json.dumps({"text": text, "raised": raised, "doc": doc}))
"#;
    let out = run(script);
    assert_eq!(out["raised"], "APIError", "{out}");
    assert_eq!(out["text"], "a b ", "{out}");
    assert_eq!(out["doc"]["status"], "error");
    assert!(out["doc"].get("attempts").is_none(), "{out}");
}

fn sdk_lists_the_upstreams_models() {
    let script = r#"
print(json.dumps({"models": [m.id for m in client.models.list()]}))
"#;
    let out = run(script);
    assert_eq!(out["models"][0], "gpt-3.5-turbo");
}

fn main() -> std::process::ExitCode {
    let needs_sdk = || python().map(|_| ());
    harness::run(vec![
        harness::sync_test(
            "sdk_completion_without_stream_is_the_upstreams_and_is_recorded",
            needs_sdk,
            sdk_completion_without_stream_is_the_upstreams_and_is_recorded,
        ),
        harness::sync_test(
            "sdk_stream_yields_every_chunk_live_and_ends",
            needs_sdk,
            sdk_stream_yields_every_chunk_live_and_ends,
        ),
        harness::sync_test(
            "sdk_raises_its_exception_for_an_upstream_error_with_its_status_and_message",
            needs_sdk,
            sdk_raises_its_exception_for_an_upstream_error_with_its_status_and_message,
        ),
        harness::sync_test(
            "sdk_caller_that_disconnects_mid_stream_resumes_the_full_reply_from_the_stream_url",
            needs_sdk,
            sdk_caller_that_disconnects_mid_stream_resumes_the_full_reply_from_the_stream_url,
        ),
        harness::sync_test(
            "sdk_private_access_by_header_answers_a_bearer_token_the_urls_need",
            needs_sdk,
            sdk_private_access_by_header_answers_a_bearer_token_the_urls_need,
        ),
        harness::sync_test(
            "sdk_gets_the_answer_of_an_upstream_that_fails_the_first_attempts_and_the_document_shows_them",
            needs_sdk,
            sdk_gets_the_answer_of_an_upstream_that_fails_the_first_attempts_and_the_document_shows_them,
        ),
        harness::sync_test(
            "sdk_stream_that_fails_after_its_first_chunk_is_not_retried_and_raises",
            needs_sdk,
            sdk_stream_that_fails_after_its_first_chunk_is_not_retried_and_raises,
        ),
        harness::sync_test("sdk_lists_the_upstreams_models", needs_sdk, sdk_lists_the_upstreams_models),
    ])
}
