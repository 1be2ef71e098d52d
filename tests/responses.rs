//! The OpenAI Responses API (`/v1/responses`) driven by the official OpenAI Python SDK (`openai` from PyPI)
//! against the real `offload` binary: background mode, streams resumed with `starting_after`, cancel, delete,
//! input items, `previous_response_id`, function tools, errors, service keys and webhooks. Every test runs twice:
//! over the in-process mock (`serve --mock-upstream`, which has the Responses API) and over a separate
//! `offload mock-upstream --no-responses-api` (Chat Completions only: offload finds the 404 and translates).
//! What the upstream received is read from the mock's own record (`GET /_mock/requests`).
//!
//! Needs the SDK: `$OFFLOAD_OPENAI_PYTHON`, else `.venv-openai/bin/python` in the repository (`python3 -m venv
//! .venv-openai && .venv-openai/bin/pip install openai==3.54.0`; `.ci/run` does it). Without it every test is
//! reported ignored with the reason (`harness = false`: `support::harness`), except under CI (`CI` set), where it
//! fails.

#![expect(clippy::unwrap_used, clippy::panic, reason = "a test fails loudly on anything unexpected")]

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod support;

use support::harness::{self, Missing};

/// The webhook secret of the servers that send webhooks (Standard Webhooks: `whsec_` and base64).
const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// What every script starts with: the client pointed at the server, the mock's record, and helpers. Arguments:
/// the server's base URL, the mock's base URL, the service keys (JSON list), the upstream's kind, the webhook
/// secret.
const PRELUDE: &str = r#"
import base64, hashlib, hmac, json, signal, sys, threading, time, urllib.request, urllib.error
import http.server as httpserver
import openai

BASE, MOCK, KEYS, UPSTREAM, SECRET = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4], sys.argv[5]
UPSTREAM_PATH = "/v1/responses" if UPSTREAM == "responses" else "/v1/chat/completions"
MODEL = "gpt-4o-mini"
FINAL = ("completed", "failed", "incomplete", "cancelled")
TERMINAL_EVENTS = ("response.completed", "response.failed", "response.incomplete")

def _too_long(*_):
    raise TimeoutError("the script ran for more than 90 s")
signal.signal(signal.SIGALRM, _too_long)
signal.alarm(90)

def make_client(key=None):
    # The SDK's own retries are off: what is under test is offload's answer.
    return openai.OpenAI(base_url=BASE + "/v1", api_key=key or "any key while the server runs open",
                         max_retries=0, timeout=30)

client = make_client(KEYS[0] if KEYS else None)

def plain(method, url, body=None, headers=None):
    """(status, body bytes) of a plain HTTP call (the standard library's: nothing but the SDK is installed)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()

def wait_final(response_id, c=None, timeout=20):
    c = c or client
    deadline = time.time() + timeout
    while True:
        response = c.responses.retrieve(response_id)
        if response.status in FINAL:
            return response
        assert time.time() < deadline, "not final in %s s: %s" % (timeout, response.model_dump_json())
        time.sleep(0.02)

def wait_output(response_id, c=None, timeout=10):
    """The response once some text arrived (it still runs)."""
    c = c or client
    deadline = time.time() + timeout
    while True:
        response = c.responses.retrieve(response_id)
        if response.output_text:
            assert response.status == "in_progress", response.model_dump_json()
            return response
        assert time.time() < deadline, "no output in %s s: %s" % (timeout, response.model_dump_json())
        time.sleep(0.01)

def sse(raw):
    """The frames of an event-stream body: dicts of id, event, data."""
    frames = []
    for block in raw.decode().split("\n\n"):
        frame = {}
        for line in block.split("\n"):
            for field in ("id", "event", "data"):
                if line.startswith(field + ": "):
                    frame[field] = line[len(field) + 2:]
        if "data" in frame:
            frames.append(frame)
    return frames

def upstream_calls():
    status, body = plain("GET", MOCK + "/_mock/requests")
    assert status == 200, (status, body)
    return json.loads(body)

def upstream_call(content):
    """The last call the upstream received whose `mock.content` is `content`."""
    calls = [c for c in upstream_calls() if (c["body"].get("mock") or {}).get("content") == content]
    assert calls, "the upstream received no call with mock content %r: %s" % (content, upstream_calls())
    call = calls[-1]
    assert call["path"] == UPSTREAM_PATH, "upstream %s called at %s" % (UPSTREAM, call["path"])
    return call

def text_of(content):
    if isinstance(content, list):
        return "".join(part.get("text") or "" for part in content)
    return content

def conversation(call):
    """(role, text) of every message the upstream received, in order (instructions aside)."""
    body = call["body"]
    if call["path"] == "/v1/chat/completions":
        items = body["messages"]
    else:
        items = body["input"] if isinstance(body["input"], list) else [{"role": "user", "content": body["input"]}]
    return [(item["role"], text_of(item.get("content"))) for item in items
            if item.get("role") is not None and item.get("type", "message") == "message"
            and item["role"] in ("user", "assistant")]

def not_found(call):
    try:
        result = call()
        if isinstance(result, openai.Stream):
            list(result)
    except openai.NotFoundError as e:
        assert e.status_code == 404, e
        body = e.body if isinstance(e.body, dict) else {}
        return {"status": e.status_code, "type": body.get("type"), "message": e.message}
    raise AssertionError("no NotFoundError: %r" % (result,))

class Receiver:
    """A webhook receiver on loopback: answers 200 and keeps every POST (headers in lower case, body as text)."""
    def __init__(self):
        self.hits, self.lock = [], threading.Lock()
        outer = self
        class Handler(httpserver.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with outer.lock:
                    outer.hits.append({"headers": {k.lower(): v for k, v in self.headers.items()},
                                       "body": body.decode(), "path": self.path})
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
            def log_message(self, *_):
                pass
        self.server = httpserver.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = "http://127.0.0.1:%d/hooks/responses" % self.server.server_address[1]

    def wait(self, n, timeout=15):
        deadline = time.time() + timeout
        while True:
            with self.lock:
                if len(self.hits) >= n:
                    return list(self.hits)
                got = list(self.hits)
            assert time.time() < deadline, "%d of %d webhooks arrived in %s s: %s" % (len(got), n, timeout, got)
            time.sleep(0.02)

def verify(hit):
    """A Standard Webhooks signature, checked independently of the server's code."""
    key = base64.b64decode(SECRET[len("whsec_"):])
    h = hit["headers"]
    signed = "%s.%s.%s" % (h["webhook-id"], h["webhook-timestamp"], hit["body"])
    expected = base64.b64encode(hmac.new(key, signed.encode(), hashlib.sha256).digest()).decode()
    return ("v1," + expected) in h["webhook-signature"].split(" ")
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

/// The upstream a test runs over.
#[derive(Clone, Copy, Debug)]
enum Upstream {
    /// `serve --mock-upstream`: the in-process mock, with the Responses API.
    Responses,
    /// A separate `offload mock-upstream --no-responses-api`: Chat Completions only.
    ChatOnly,
}

impl Upstream {
    fn name(self) -> &'static str {
        match self {
            Upstream::Responses => "responses",
            Upstream::ChatOnly => "chat",
        }
    }
}

/// What a test's server needs besides its upstream.
#[derive(Clone, Copy, Default)]
struct Options {
    /// Service keys created with `offload keys create` on the data directory before the server starts.
    keys: &'static [&'static str],
    /// Webhooks to loopback, signed with [`WEBHOOK_SECRET`], retried soon.
    webhooks: bool,
}

/// Starts `command` and reads its log until each of `wanted` has appeared in a line; answers the process, with
/// the word after each.
fn spawn_and_read(mut command: Command, wanted: &[&str]) -> (support::Offload, Vec<String>) {
    let mut child = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut found: Vec<Option<String>> = vec![None; wanted.len()];
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while found.iter().any(Option::is_none) {
        let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the process did not log {wanted:?} within 30 s:\n{}", seen.join("\n"));
        };
        for (i, pattern) in wanted.iter().enumerate() {
            if found[i].is_none()
                && let Some(rest) = line.split(pattern).nth(1)
            {
                found[i] = Some(rest.split_whitespace().next().unwrap_or_default().to_owned());
            }
        }
        seen.push(line);
    }
    let found: Vec<String> = found.into_iter().map(Option::unwrap).collect();
    let process = support::Offload { child, addr: String::new(), log: rx };
    (process, found)
}

/// A server and its upstream, on a data directory of their own; both are killed when it is dropped.
struct Setup {
    _server: support::Offload,
    _mock: Option<support::Offload>,
    /// `http://host:port` of the server.
    base: String,
    /// `http://host:port` of the mock upstream (its `/_mock/requests` is the record of what it received).
    mock: String,
    keys: Vec<String>,
    _data: tempfile::TempDir,
}

fn start(upstream: Upstream, options: Options) -> Setup {
    let data = tempfile::tempdir().unwrap();
    let store = data.path().join("store");
    let keys = options
        .keys
        .iter()
        .map(|name| {
            let output = support::Offload::command()
                .args(["keys", "create", "--name", name, "--data-dir"])
                .arg(&store)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert!(output.status.success(), "keys create: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
            let key = stdout.lines().last().unwrap().trim().to_owned();
            assert!(key.starts_with("ofk_"), "{stdout}");
            key
        })
        .collect();
    let mut command = support::Offload::command();
    command.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"]).arg(&store);
    if options.webhooks {
        command.args(["--allow-private-webhooks", "--webhook-secret", WEBHOOK_SECRET, "--webhook-backoff", "50ms"]);
    }
    let (server, mock_process, base, mock_api) = match upstream {
        Upstream::Responses => {
            command.arg("--mock-upstream");
            let (server, found) =
                spawn_and_read(command, &["using the built-in mock upstream at ", " listening on 127.0.0.1:"]);
            let base = format!("http://127.0.0.1:{}", found[1]);
            (server, None, base, found[0].clone())
        }
        Upstream::ChatOnly => {
            let mut mock = support::Offload::command();
            mock.args(["mock-upstream", "--listen", "127.0.0.1:0", "--no-responses-api"]);
            let (mock, found) = spawn_and_read(mock, &["mock upstream listening on "]);
            let mock_api = found[0].clone();
            command.args(["--upstream-url", &mock_api]);
            let (server, found) = spawn_and_read(command, &[" listening on 127.0.0.1:"]);
            let base = format!("http://127.0.0.1:{}", found[0]);
            (server, Some(mock), base, mock_api)
        }
    };
    let mock = mock_api.strip_suffix("/v1").unwrap_or_else(|| panic!("not an API base: {mock_api}")).to_owned();
    Setup { _server: server, _mock: mock_process, base, mock, keys, _data: data }
}

/// Runs `script` (after the prelude) against a fresh server over `upstream`; it must exit 0 and print one JSON
/// line last.
fn run(upstream: Upstream, options: Options, script: &str) -> Value {
    let python = python().unwrap_or_else(|missing| unreachable!("checked first: {missing:?}"));
    let setup = start(upstream, options);
    let output = Command::new(python)
        .arg("-c")
        .arg(format!("{PRELUDE}\n{script}"))
        .arg(&setup.base)
        .arg(&setup.mock)
        .arg(serde_json::to_string(&setup.keys).unwrap())
        .arg(upstream.name())
        .arg(WEBHOOK_SECRET)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the script failed over the {upstream:?} upstream:\n{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap_or_else(|| panic!("the script printed nothing:\n{stderr}"));
    serde_json::from_str(last).unwrap_or_else(|e| panic!("not JSON ({e}): {last}"))
}

/// Case 1: `background=True` answers at once; polling `retrieve` sees it end `completed` with the mock's text and
/// usage.
fn background_create_then_poll_until_completed(upstream: Upstream) {
    let script = r#"
CONTENT = "Background mode works through offload"
raw = client.responses.with_raw_response.create(model=MODEL, input="Say something.", background=True,
    extra_body={"mock": {"content": CONTENT, "delay_ms": 20}})
created = raw.parse()
assert created.object == "response", created
assert created.id.startswith("resp_"), created.id
assert created.status in ("queued", "in_progress"), created.model_dump_json()
assert created.background is True, created.model_dump_json()
assert raw.headers.get("x-offload-status-url"), dict(raw.headers)
final = wait_final(created.id)
assert final.id == created.id
assert final.status == "completed", final.model_dump_json()
assert final.output_text == CONTENT, final.model_dump_json()
assert final.usage is not None, final.model_dump_json()
assert final.usage.output_tokens > 0 and final.usage.input_tokens > 0, final.usage
assert final.usage.total_tokens == final.usage.input_tokens + final.usage.output_tokens, final.usage
call = upstream_call(CONTENT)
print(json.dumps({"created_status": created.status, "status": final.status, "text": final.output_text,
                  "total_tokens": final.usage.total_tokens, "upstream_path": call["path"]}))
"#;
    let out = run(upstream, Options::default(), script);
    assert_eq!(out["status"], "completed", "{out}");
    assert_eq!(out["text"], "Background mode works through offload", "{out}");
    assert!(out["total_tokens"].as_u64().unwrap() > 0, "{out}");
}

/// Case 2: A background stream dropped after a few events and resumed with `starting_after` has every event once, in
/// order, and the whole text; a full replay read twice is the same bytes.
fn stream_dropped_then_resumed_with_starting_after(upstream: Upstream) {
    let script = r#"
WORDS = " ".join("word%d" % i for i in range(30))
stream = client.responses.create(model=MODEL, input="Count.", background=True, stream=True,
    extra_body={"mock": {"content": WORDS, "delay_ms": 20}})
first = []
for event in stream:
    first.append(event)
    if len(first) == 6:
        break
stream.close()
assert first[0].type == "response.created", first[0]
response_id = first[0].response.id
last_seq = first[-1].sequence_number
running = client.responses.retrieve(response_id)
assert running.status in ("queued", "in_progress"), "the drop must happen while it runs: " + running.status
rest = list(client.responses.retrieve(response_id, stream=True, starting_after=last_seq))
events = first + rest
seqs = [e.sequence_number for e in events]
assert seqs == list(range(len(events))), "gap or duplicate at the resume (after %d): %s" % (last_seq, seqs)
assert rest[0].sequence_number == last_seq + 1, rest[0]
assert events[-1].type == "response.completed", [e.type for e in events]
assert sum(e.type in TERMINAL_EVENTS for e in events) == 1, [e.type for e in events]
text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
assert text == WORDS, text
done = [e.text for e in events if e.type == "response.output_text.done"]
assert done == [WORDS], done
assert events[-1].response.output_text == WORDS, events[-1].response.model_dump_json()
assert events[-1].response.status == "completed"

# The whole stream again over plain HTTP, twice: the same bytes, SSE id N+1 for sequence number N.
url = BASE + "/v1/responses/" + response_id + "?stream=true"
status1, body1 = plain("GET", url)
status2, body2 = plain("GET", url)
assert status1 == 200 and status2 == 200, (status1, status2, body1)
assert body1 == body2, "two replays differ:\n%s\n----\n%s" % (body1, body2)
frames = sse(body1)
datas = [json.loads(f["data"]) for f in frames]
assert [d["sequence_number"] for d in datas] == list(range(len(frames))), [d["sequence_number"] for d in datas]
assert [f.get("id") for f in frames] == [str(n + 1) for n in range(len(frames))], [f.get("id") for f in frames]
assert [f.get("event") for f in frames] == [d["type"] for d in datas], frames
assert [d["type"] for d in datas] == [e.type for e in events], ([d["type"] for d in datas], [e.type for e in events])
# A resume over plain HTTP is the tail of the full replay, byte for byte.
status3, body3 = plain("GET", url + "&starting_after=%d" % last_seq)
assert status3 == 200, (status3, body3)
assert [f["data"] for f in sse(body3)] == [f["data"] for f in frames[last_seq + 1:]], body3
print(json.dumps({"events": len(events), "resumed_after": last_seq, "text": text, "expected": WORDS}))
"#;
    let out = run(upstream, Options::default(), script);
    assert_eq!(out["text"], out["expected"], "{out}");
    assert!(out["events"].as_u64().unwrap() > 30, "{out}");
}

/// Case 3: Cancelling a running background response twice answers `cancelled` both times; it stays cancelled, keeps
/// the text that had arrived, its stream ends without a terminal event, and the upstream call is dropped.
fn cancel_a_running_background_response_twice(upstream: Upstream) {
    let script = r#"
WORDS = " ".join("w%d" % i for i in range(100))
created = client.responses.create(model=MODEL, input="Talk slowly.", background=True,
    extra_body={"mock": {"content": WORDS, "delay_ms": 30}})
wait_output(created.id)
first = client.responses.cancel(created.id)
second = client.responses.cancel(created.id)
assert first.status == "cancelled", first.model_dump_json()
assert second.status == "cancelled", second.model_dump_json()
kept = first.output_text
assert kept and WORDS.startswith(kept) and len(kept) < len(WORDS), kept
assert second.output_text == kept, (second.output_text, kept)
time.sleep(1)
later = client.responses.retrieve(created.id)
assert later.status == "cancelled", later.model_dump_json()
assert later.output_text == kept, "text changed after the cancel: %r then %r" % (kept, later.output_text)
# Its stream replays what arrived and ends, with no terminal event.
events = list(client.responses.retrieve(created.id, stream=True))
types = [e.type for e in events]
assert not any(t in TERMINAL_EVENTS for t in types), types
assert [e.sequence_number for e in events] == list(range(len(events))), [e.sequence_number for e in events]
assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == kept
# The upstream call was dropped.
deadline = time.time() + 5
while True:
    stats = json.loads(plain("GET", MOCK + "/_mock/stats")[1])
    if stats["disconnected"] >= 1:
        break
    assert time.time() < deadline, "the upstream call was not dropped: %s" % stats
    time.sleep(0.05)
print(json.dumps({"statuses": [first.status, second.status, later.status], "kept": kept}))
"#;
    let out = run(upstream, Options::default(), script);
    assert_eq!(out["statuses"], serde_json::json!(["cancelled", "cancelled", "cancelled"]), "{out}");
}

/// Case 4: `previous_response_id` continues a conversation: the upstream receives the earlier turns, in order.
fn previous_response_id_continues_the_conversation(upstream: Upstream) {
    let script = r#"
def continue_from(previous_id, **kwargs):
    """A turn that continues `previous_id`, whose `retrieve` has already shown it final."""
    try:
        return client.responses.create(model=MODEL, previous_response_id=previous_id, **kwargs)
    except openai.BadRequestError as e:
        raise AssertionError("continuing %s, which retrieve had shown `completed`, was refused: %s"
                             % (previous_id, e.message))

first = client.responses.create(model=MODEL, input="My name is Ada.",
    extra_body={"mock": {"content": "Nice to meet you, Ada."}})
assert first.status == "completed" and first.output_text == "Nice to meet you, Ada.", first.model_dump_json()
second = continue_from(first.id, input="What is my name?", background=True,
    extra_body={"mock": {"content": "Your name is Ada."}})
second = wait_final(second.id)
assert second.status == "completed", second.model_dump_json()
assert second.output_text == "Your name is Ada.", second.model_dump_json()
assert second.previous_response_id == first.id, second.model_dump_json()
third = continue_from(second.id, input=[{"role": "user", "content": "And once more?"}], instructions="Be brief.",
    extra_body={"mock": {"content": "Still Ada."}})
assert third.status == "completed" and third.output_text == "Still Ada.", third.model_dump_json()

expected_second = [["user", "My name is Ada."], ["assistant", "Nice to meet you, Ada."], ["user", "What is my name?"]]
expected_third = expected_second + [["assistant", "Your name is Ada."], ["user", "And once more?"]]
got_second = [list(m) for m in conversation(upstream_call("Your name is Ada."))]
got_third = [list(m) for m in conversation(upstream_call("Still Ada."))]
assert got_second == expected_second, "second turn, the upstream received: %s" % got_second
assert got_third == expected_third, "third turn, the upstream received: %s" % got_third
# Each response lists only its own input.
items = client.responses.input_items.list(third.id, order="asc").data
assert [text_of([c.model_dump() for c in i.content]) for i in items] == ["And once more?"], items

# A chain of background turns, each continued as soon as polling shows the one before it completed.
previous = third.id
for turn in range(5):
    created = continue_from(previous, input="Turn %d." % turn, background=True,
        extra_body={"mock": {"content": "Answer %d." % turn}})
    previous = wait_final(created.id).id
history = [list(m) for m in conversation(upstream_call("Answer 4."))]
assert history[-2:] == [["assistant", "Answer 3."], ["user", "Turn 4."]] and len(history) == 15, history
print(json.dumps({"second": got_second, "third": got_third}))
"#;
    let out = run(upstream, Options::default(), script);
    assert_eq!(out["third"].as_array().unwrap().len(), 5, "{out}");
}

/// Case 5: Function tools: the mock's tool call is a `function_call` item; its output sent back with
/// `previous_response_id` completes the next turn, and the upstream receives both the call and its output.
fn function_tool_round_trip(upstream: Upstream) {
    let script = r#"
TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather in a city.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
first = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=TOOLS,
    extra_body={"mock": {"tool_calls": [{"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}]}})
assert first.status == "completed", first.model_dump_json()
calls = [item for item in first.output if item.type == "function_call"]
assert len(calls) == 1, first.model_dump_json()
call = calls[0]
assert call.name == "get_weather", call
assert json.loads(call.arguments) == {"city": "Paris"}, call
assert call.call_id, call
OUTPUT = "{\"temperature_c\": 21}"
second = client.responses.create(model=MODEL, previous_response_id=first.id, tools=TOOLS, background=True,
    input=[{"type": "function_call_output", "call_id": call.call_id, "output": OUTPUT}],
    extra_body={"mock": {"content": "It is 21 degrees in Paris."}})
second = wait_final(second.id)
assert second.status == "completed", second.model_dump_json()
assert second.output_text == "It is 21 degrees in Paris.", second.model_dump_json()

body = upstream_call("It is 21 degrees in Paris.")["body"]
if UPSTREAM == "chat":
    messages = body["messages"]
    asked = [m for m in messages if m.get("role") == "assistant" and m.get("tool_calls")]
    assert len(asked) == 1, messages
    tool_call = asked[0]["tool_calls"][0]
    assert tool_call["id"] == call.call_id, (tool_call, call.call_id)
    assert tool_call["function"]["name"] == "get_weather", tool_call
    assert json.loads(tool_call["function"]["arguments"]) == {"city": "Paris"}, tool_call
    answers = [m for m in messages if m.get("role") == "tool"]
    assert answers == [{"role": "tool", "tool_call_id": call.call_id, "content": OUTPUT}], messages
    assert body.get("tools") and body["tools"][0]["function"]["name"] == "get_weather", body.get("tools")
else:
    items = body["input"]
    asked = [i for i in items if i.get("type") == "function_call"]
    assert len(asked) == 1 and asked[0]["call_id"] == call.call_id and asked[0]["name"] == "get_weather", items
    answers = [i for i in items if i.get("type") == "function_call_output"]
    assert len(answers) == 1 and answers[0]["call_id"] == call.call_id and answers[0]["output"] == OUTPUT, items
    assert items.index(asked[0]) < items.index(answers[0]), items
    assert body.get("tools") and body["tools"][0]["name"] == "get_weather", body.get("tools")
print(json.dumps({"call_id": call.call_id, "text": second.output_text}))
"#;
    let out = run(upstream, Options::default(), script);
    assert_eq!(out["text"], "It is 21 degrees in Paris.", "{out}");
}

/// Case 6: Errors: a sync call's upstream error is the SDK's exception with the upstream's message; a background
/// response whose upstream failed ends `failed` with the error; an unknown id is `NotFoundError`.
fn errors_are_the_sdks_exceptions(upstream: Upstream) {
    let script = r#"
result = {}
for stream in (False, True):
    try:
        answer = client.responses.create(model=MODEL, input="hi", stream=stream,
            extra_body={"mock": {"status": 429, "error_message": "Rate limit reached for gpt-4o-mini."}})
        if stream:
            list(answer)
        raise AssertionError("no exception (stream=%s)" % stream)
    except openai.RateLimitError as e:
        assert e.status_code == 429, e
        assert "Rate limit reached for gpt-4o-mini." in e.message, e.message
        result["429 stream=%s" % stream] = e.message
try:
    client.responses.create(model=MODEL, input="hi",
        extra_body={"mock": {"status": 401, "error_message": "Incorrect API key provided: sk-mock."}})
    raise AssertionError("no exception")
except openai.AuthenticationError as e:
    assert e.status_code == 401 and "Incorrect API key provided" in e.message, e
    result["401"] = e.message

for status, message in ((400, "Invalid value for 'temperature'."), (500, "The server had an error.")):
    created = client.responses.create(model=MODEL, input="hi", background=True,
        extra_body={"mock": {"status": status, "error_message": message}})
    final = wait_final(created.id, timeout=30)
    assert final.status == "failed", final.model_dump_json()
    assert final.error is not None, final.model_dump_json()
    assert isinstance(final.error.code, str) and final.error.code, final.model_dump_json()
    assert message in final.error.message, final.model_dump_json()
    result["background %d" % status] = {"code": final.error.code, "message": final.error.message}
    # Its stream ends with `response.failed`.
    events = list(client.responses.retrieve(created.id, stream=True))
    assert events and events[-1].type == "response.failed", [e.type for e in events]

UNKNOWN = "resp_" + "0" * 32
result["retrieve"] = not_found(lambda: client.responses.retrieve(UNKNOWN))
result["cancel"] = not_found(lambda: client.responses.cancel(UNKNOWN))
result["delete"] = not_found(lambda: client.responses.delete(UNKNOWN))
result["input_items"] = not_found(lambda: client.responses.input_items.list(UNKNOWN))
result["stream"] = not_found(lambda: client.responses.retrieve(UNKNOWN, stream=True))
print(json.dumps(result))
"#;
    let out = run(upstream, Options::default(), script);
    assert!(out["background 400"]["code"].is_string(), "{out}");
}

/// Case 7: `input_items.list` pages the response's input items, each with an id; after `delete` the response is gone.
fn input_items_then_delete(upstream: Upstream) {
    let script = r#"
INPUT = [{"role": "developer", "content": "Answer briefly."},
         {"role": "user", "content": "first question"},
         {"role": "user", "content": [{"type": "input_text", "text": "second question"}]}]
TEXTS = ["Answer briefly.", "first question", "second question"]
created = client.responses.create(model=MODEL, input=INPUT, background=True, extra_body={"mock": {"words": 3}})
final = wait_final(created.id)
assert final.status == "completed", final.model_dump_json()

def texts(items):
    return [text_of([c.model_dump() for c in item.content]) for item in items]

page = client.responses.input_items.list(created.id)
ids = [item.id for item in page.data]
assert all(ids) and len(set(ids)) == 3, page
assert texts(page.data) == TEXTS[::-1], "desc is the default: %s" % texts(page.data)
assert [i.role for i in page.data] == ["user", "user", "developer"], page
assert page.has_more is False, page
ascending = client.responses.input_items.list(created.id, order="asc")
assert texts(ascending.data) == TEXTS, ascending
one = client.responses.input_items.list(created.id, order="asc", limit=1)
assert texts(one.data) == TEXTS[:1] and one.has_more is True, one
rest = client.responses.input_items.list(created.id, order="asc", after=one.data[0].id)
assert texts(rest.data) == TEXTS[1:] and rest.has_more is False, rest
every = [item.id for item in client.responses.input_items.list(created.id, order="asc", limit=1)]
assert every == [item.id for item in ascending.data], "auto-paging: %s" % every

# A string input is one user message.
plain = client.responses.create(model=MODEL, input="just a string", extra_body={"mock": {"words": 2}})
plain_items = client.responses.input_items.list(plain.id).data
assert texts(plain_items) == ["just a string"] and plain_items[0].role == "user", plain_items

raw = client.responses.with_raw_response.delete(created.id)
deleted = raw.http_response.json()
assert deleted == {"id": created.id, "object": "response.deleted", "deleted": True}, deleted
result = {"deleted": deleted,
          "retrieve": not_found(lambda: client.responses.retrieve(created.id)),
          "input_items": not_found(lambda: client.responses.input_items.list(created.id)),
          "delete again": not_found(lambda: client.responses.delete(created.id)),
          "cancel": not_found(lambda: client.responses.cancel(created.id))}
# The other response is untouched.
assert client.responses.retrieve(plain.id).status == "completed"
print(json.dumps(result))
"#;
    let out = run(upstream, Options::default(), script);
    assert_eq!(out["deleted"]["deleted"], true, "{out}");
}

/// Case 8: With service keys, a response is read, cancelled and deleted only with the key that created it.
fn only_the_creating_key_sees_a_response(upstream: Upstream) {
    let script = r#"
A, B = make_client(KEYS[0]), make_client(KEYS[1])
CONTENT = " ".join("slow%d" % i for i in range(25))
created = A.responses.create(model=MODEL, input="hi", background=True,
    extra_body={"mock": {"content": CONTENT, "delay_ms": 20}})
result = {
    "retrieve": not_found(lambda: B.responses.retrieve(created.id)),
    "stream": not_found(lambda: B.responses.retrieve(created.id, stream=True)),
    "cancel": not_found(lambda: B.responses.cancel(created.id)),
    "input_items": not_found(lambda: B.responses.input_items.list(created.id)),
    "delete": not_found(lambda: B.responses.delete(created.id)),
}
# B's cancel and delete did nothing.
final = wait_final(created.id, A)
assert final.status == "completed" and final.output_text == CONTENT, final.model_dump_json()
assert [i.id for i in A.responses.input_items.list(created.id).data], "key A lists its input items"
events = list(A.responses.retrieve(created.id, stream=True))
assert events[-1].type == "response.completed", [e.type for e in events]
result["after_end"] = not_found(lambda: B.responses.retrieve(created.id))
# The other way round too.
theirs = B.responses.create(model=MODEL, input="hi", extra_body={"mock": {"words": 2}})
result["theirs"] = not_found(lambda: A.responses.retrieve(theirs.id))
assert B.responses.retrieve(theirs.id).status == "completed"
# No valid key: no create.
try:
    make_client("ofk_not_a_key_of_this_server").responses.create(model=MODEL, input="hi")
    raise AssertionError("created without a valid key")
except openai.AuthenticationError as e:
    result["no key"] = e.status_code
A.responses.delete(created.id)
result["deleted"] = not_found(lambda: A.responses.retrieve(created.id))
print(json.dumps(result))
"#;
    let options = Options { keys: &["alice", "bob"], ..Options::default() };
    let out = run(upstream, options, script);
    assert_eq!(out["no key"], 401, "{out}");
}

/// Case 9: `X-Offload-Webhook-Url` delivers a signed event when a response ends: completed, failed, cancelled.
fn webhook_on_the_end_of_a_response(upstream: Upstream) {
    let script = r#"
receiver = Receiver()
HOOK = {"X-Offload-Webhook-Url": receiver.url}
started = int(time.time())
completed = client.responses.create(model=MODEL, input="hi", background=True, extra_headers=HOOK,
    extra_body={"mock": {"words": 3}})
failed = client.responses.create(model=MODEL, input="hi", background=True, extra_headers=HOOK,
    extra_body={"mock": {"status": 400, "error_message": "Invalid value for 'temperature'."}})
slow = client.responses.create(model=MODEL, input="hi", background=True, extra_headers=HOOK,
    extra_body={"mock": {"content": " ".join("w%d" % i for i in range(100)), "delay_ms": 30}})
wait_output(slow.id)
client.responses.cancel(slow.id)
sync = client.responses.create(model=MODEL, input="hi", extra_headers=HOOK, extra_body={"mock": {"words": 2}})
assert sync.status == "completed", sync.model_dump_json()
expected = {completed.id: "response.completed", failed.id: "response.failed",
            slow.id: "response.cancelled", sync.id: "response.completed"}
hits = receiver.wait(len(expected))
time.sleep(0.5)
with receiver.lock:
    hits = list(receiver.hits)
assert len(hits) == len(expected), "one delivery each: %s" % hits
seen = {}
for hit in hits:
    assert hit["headers"].get("content-type", "").startswith("application/json"), hit
    event = json.loads(hit["body"])
    assert set(event) >= {"id", "object", "created_at", "type", "data"}, event
    assert event["id"].startswith("evt_"), event
    assert event["object"] == "event", event
    assert isinstance(event["created_at"], int) and abs(event["created_at"] - started) < 60, event
    assert hit["headers"].get("webhook-id"), hit
    assert abs(int(hit["headers"]["webhook-timestamp"]) - started) < 60, hit
    assert verify(hit), "the signature does not verify: %s" % hit
    seen[event["data"]["id"]] = event["type"]
assert seen == expected, "got %s, expected %s" % (seen, expected)
print(json.dumps({"events": seen}))
"#;
    let options = Options { webhooks: true, ..Options::default() };
    let out = run(upstream, options, script);
    assert_eq!(out["events"].as_object().unwrap().len(), 4, "{out}");
}

/// A test's name and its body, run once per kind of upstream.
type Case = (&'static str, fn(Upstream));

fn main() -> std::process::ExitCode {
    let needs_sdk = || python().map(|_| ());
    let tests: [Case; 9] = [
        ("background_create_then_poll_until_completed", background_create_then_poll_until_completed),
        ("stream_dropped_then_resumed_with_starting_after", stream_dropped_then_resumed_with_starting_after),
        ("cancel_a_running_background_response_twice", cancel_a_running_background_response_twice),
        ("previous_response_id_continues_the_conversation", previous_response_id_continues_the_conversation),
        ("function_tool_round_trip", function_tool_round_trip),
        ("errors_are_the_sdks_exceptions", errors_are_the_sdks_exceptions),
        ("input_items_then_delete", input_items_then_delete),
        ("only_the_creating_key_sees_a_response", only_the_creating_key_sees_a_response),
        ("webhook_on_the_end_of_a_response", webhook_on_the_end_of_a_response),
    ];
    let mut trials = Vec::new();
    for (name, test) in tests {
        for upstream in [Upstream::Responses, Upstream::ChatOnly] {
            let name = format!("{name}_over_{}_upstream", upstream.name());
            trials.push(harness::sync_test(&name, needs_sdk, move || test(upstream)));
        }
    }
    harness::run(trials)
}
