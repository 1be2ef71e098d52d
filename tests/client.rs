//! The command-line client, tested black-box: the real binary runs `serve --mock-upstream` on port 0, and its
//! client commands (`chat`, `follow`, `status`, `stop`, `completions`) run as child processes against it.

#![expect(clippy::unwrap_used, clippy::panic, reason = "a test fails loudly on anything unexpected")]

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_offload");
const REPLY: &str = "Hello from the mock, in six words.";

mod support;

/// `offload serve --mock-upstream` on port 0, with its data directory when the test did not give one.
struct Server {
    process: support::Offload,
    base: String,
    _data: Option<tempfile::TempDir>,
}

/// Starts `offload serve --mock-upstream` on port 0 on `data_dir`.
fn start_in(data_dir: &Path) -> Server {
    let mut command = support::Offload::command();
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--mock-upstream"])
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("OFFLOAD_URL")
        .env_remove("OFFLOAD_API_KEY");
    let process = support::Offload::spawn(command);
    let base = format!("http://{}", process.addr);
    Server { process, base, _data: None }
}

fn start() -> Server {
    let data = tempfile::tempdir().unwrap();
    let mut server = start_in(data.path());
    server._data = Some(data);
    server
}

impl Server {
    /// `offload ARGS` as a client of this server.
    fn offload(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command.args(args).env("OFFLOAD_URL", &self.base).env_remove("OFFLOAD_API_KEY");
        command
    }

    fn run(&self, args: &[&str]) -> Run {
        run(self.offload(args))
    }
}

/// The result of one client command, stdout and stderr as text.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self) -> Self {
        assert_eq!(self.code, Some(0), "stdout: {}\nstderr: {}", self.stdout, self.stderr);
        self
    }

    /// The status URL the client reported on stderr.
    fn status_url(&self) -> String {
        let line = self.stderr.lines().find_map(|l| l.strip_prefix("offload: status ")).unwrap_or_else(|| {
            panic!("no status URL on stderr: {}", self.stderr);
        });
        line.trim().to_owned()
    }

    fn token(&self) -> String {
        let line = self.stderr.lines().find(|l| l.contains("bearer token")).unwrap();
        line.rsplit(' ').next().unwrap().to_owned()
    }
}

/// Runs a command to its end (failing the test after a minute instead of hanging).
fn run(mut command: Command) -> Run {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(command.output());
    });
    let Output { status, stdout, stderr } = rx.recv_timeout(Duration::from_secs(60)).unwrap().unwrap();
    Run { code: status.code(), stdout: String::from_utf8(stdout).unwrap(), stderr: String::from_utf8(stderr).unwrap() }
}

fn mock(controls: &str) -> String {
    format!("mock={controls}")
}

fn content(reply: &str) -> String {
    mock(&serde_json::json!({"content": reply}).to_string())
}

fn status_document(server: &Server, url: &str, token: Option<&str>) -> Value {
    let mut args = vec!["status", url];
    if let Some(token) = token {
        args.extend(["--token", token]);
    }
    serde_json::from_str(&server.run(&args).ok().stdout).unwrap()
}

fn wait_for_status(server: &Server, url: &str, wanted: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let document = status_document(server, url, None);
        if document["status"] == wanted {
            return document;
        }
        assert!(Instant::now() < deadline, "status stayed {}", document["status"]);
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn chat_streams_the_reply_to_stdout_and_tells_the_status_url_on_stderr() {
    let server = start();
    let run = server.run(&["chat", "--param", &content(REPLY), "hi"]).ok();
    assert_eq!(run.stdout, format!("{REPLY}\n"));
    let url = run.status_url();
    assert!(url.starts_with(&format!("{}/1/r/pub/", server.base)) && url.ends_with(".json"), "{url}");
    let document = status_document(&server, &url, None);
    assert_eq!(document["status"], "done");
    assert_eq!(document["parameters"]["messages"][0]["content"], "hi");
}

#[test]
fn chat_json_prints_every_event_as_a_json_line() {
    let server = start();
    let run = server.run(&["chat", "--json", "--param", &content(REPLY), "hi"]).ok();
    let events: Vec<Value> = run.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events[0]["id"], 1);
    assert_eq!(events[0]["data"]["object"], "chat.completion.chunk");
    assert_eq!(events.last().unwrap()["data"], "[DONE]");
    let text: String =
        events.iter().filter_map(|e| e["data"]["choices"][0]["delta"]["content"].as_str()).collect::<String>();
    assert_eq!(text, REPLY);
}

#[test]
fn chat_async_prints_the_reply_when_done_and_no_progress_when_piped() {
    let server = start();
    let run = server
        .run(&["chat", "--async", "--param", &mock(r#"{"content": "An async reply.", "ttft_ms": 600}"#), "hi"])
        .ok();
    assert_eq!(run.stdout, "An async reply.\n");
    assert!(run.status_url().contains("/2/r/pub/"), "{}", run.stderr);
    assert_eq!(
        run.stderr.lines().count(),
        1,
        "only the status URL on stderr when it is not a terminal: {}",
        run.stderr
    );
    // An async request has no stream: `follow` waits on its status document instead.
    let followed = server.run(&["follow", &run.status_url()]).ok();
    assert_eq!(followed.stdout, "An async reply.\n");
}

#[test]
fn private_chat_prints_a_token_and_follow_with_the_token_replays_it() {
    let server = start();
    let run = server.run(&["chat", "--private", "--param", &content(REPLY), "hi"]).ok();
    assert_eq!(run.stdout, format!("{REPLY}\n"));
    let (url, token) = (run.status_url(), run.token());
    assert!(url.contains("/1/r/priv/"), "{url}");
    assert_eq!(token.len(), 32, "{}", run.stderr);

    let refused = server.run(&["follow", &url]);
    assert_eq!(refused.code, Some(1));
    assert!(refused.stderr.contains("This request is private"), "{}", refused.stderr);
    let replay = server.run(&["follow", "--token", &token, &url]).ok();
    assert_eq!(replay.stdout, format!("{REPLY}\n"));
    // The stream URL with its stream_token opens the stream too.
    let stream_url = format!("{}?stream_token=", url.replace(".json", ".txt"));
    assert_eq!(status_document(&server, &url, Some(&token))["authorization"]["access"], "private");
    let wrong = server.run(&["follow", &format!("{stream_url}{}", "0".repeat(32))]);
    assert_eq!(wrong.code, Some(1));
    assert!(wrong.stderr.contains("stream_token is wrong"), "{}", wrong.stderr);
}

#[test]
fn continue_sends_the_previous_messages_and_reply() {
    let server = start();
    let first =
        server.run(&["chat", "--private", "--system", "Be brief.", "--param", &content("First answer."), "one"]).ok();
    let (first_url, token) = (first.status_url(), first.token());
    let second = server
        .run(&["chat", "--continue", &first_url, "--token", &token, "--param", &content("Second answer."), "two"])
        .ok();
    assert_eq!(second.stdout, "Second answer.\n");
    let document = status_document(&server, &second.status_url(), None);
    let roles_and_texts: Vec<(String, String)> = document["parameters"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["role"].as_str().unwrap().to_owned(), m["content"].as_str().unwrap().to_owned()))
        .collect();
    let expected = [("system", "Be brief."), ("user", "one"), ("assistant", "First answer."), ("user", "two")];
    assert_eq!(roles_and_texts, expected.map(|(r, t)| (r.to_owned(), t.to_owned())));
    assert_eq!(document["endpoints"]["from_status_url"], first_url.as_str());

    let without_token = server.run(&["chat", "--continue", &first_url, "three"]);
    assert_eq!(without_token.code, Some(1));
    assert!(without_token.stderr.contains("from_bearer_token"), "{}", without_token.stderr);
}

/// A TCP proxy to the server that cuts its first connection after `cut_after`, passes the others whole, and
/// keeps the head of every request it forwarded.
struct Proxy {
    base: String,
    heads: Arc<Mutex<Vec<String>>>,
}

fn proxy(server: &Server, cut_after: Duration) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let target = server.base.trim_start_matches("http://").to_owned();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    std::thread::spawn(move || {
        for (n, client) in listener.incoming().enumerate() {
            let Ok(client) = client else { return };
            let upstream = TcpStream::connect(&target).unwrap();
            let (mut c_read, mut u_write) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
            let (mut u_read, mut c_write) = (upstream.try_clone().unwrap(), client.try_clone().unwrap());
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                let mut first = true;
                while let Ok(n) = c_read.read(&mut buf) {
                    if n == 0 || u_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    if std::mem::take(&mut first) {
                        seen.lock().unwrap().push(String::from_utf8_lossy(&buf[..n]).to_lowercase());
                    }
                }
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut u_read, &mut c_write);
                let _ = c_write.shutdown(Shutdown::Both);
            });
            if n == 0 {
                std::thread::spawn(move || {
                    std::thread::sleep(cut_after);
                    let _ = client.shutdown(Shutdown::Both);
                    let _ = upstream.shutdown(Shutdown::Both);
                });
            }
        }
    });
    Proxy { base, heads }
}

#[test]
fn follow_reconnects_with_last_event_id_after_the_connection_drops_and_misses_nothing() {
    let server = start();
    // A stream request that takes about three seconds, followed through a proxy that cuts the first connection.
    let mut chat = server
        .offload(&["chat", "--param", &mock(r#"{"words": 100, "delay_ms": 30}"#), "slow"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(chat.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("offload: status ").unwrap().to_owned();

    // Replayed at once to the follower: it has events before the cut, so the reconnect must name the last one.
    wait_for_status(&server, &url, "streaming");
    let proxy = proxy(&server, Duration::from_millis(400));
    let through_proxy = url.replace(&server.base, &proxy.base).replace(".json", ".txt");
    let followed = server.run(&["follow", &through_proxy]).ok();
    assert!(chat.wait().unwrap().success());

    let document = status_document(&server, &url, None);
    let whole = document["response"]["body"]["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(followed.stdout, format!("{whole}\n"), "no gap and no repeat; stderr: {}", followed.stderr);
    assert!(followed.stderr.contains("connection lost after event"), "{}", followed.stderr);
    let heads = proxy.heads.lock().unwrap();
    assert!(heads.len() >= 2, "{heads:?}");
    assert!(!heads[0].contains("last-event-id:"), "{}", heads[0]);
    assert!(heads[1].contains("last-event-id:"), "{}", heads[1]);
}

#[test]
fn follow_with_last_event_id_starts_after_that_event() {
    let server = start();
    let run = server.run(&["chat", "--param", &content(REPLY), "hi"]).ok();
    let url = run.status_url();
    let after = server.run(&["follow", "--json", "--last-event-id", "5", &url]).ok();
    let first: Value = serde_json::from_str(after.stdout.lines().next().unwrap()).unwrap();
    assert_eq!(first["id"], 6);
    // Everything already seen: the stream is complete, nothing to print.
    let all = server.run(&["follow", "--last-event-id", "100", &url]).ok();
    assert_eq!(all.stdout, "");
}

#[test]
fn status_and_stop_work_and_a_second_stop_shows_the_servers_message() {
    let server = start();
    let mut chat = server
        .offload(&["chat", "--param", &mock(r#"{"words": 2000, "delay_ms": 20}"#), "long"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    // Its stderr is closed after the first line: the client must still end as it should (no panic on a note).
    BufReader::new(chat.stderr.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("offload: status ").unwrap().to_owned();
    wait_for_status(&server, &url, "streaming");

    let stopped = server.run(&["stop", &url]).ok();
    assert!(stopped.stderr.contains("stopped"), "{}", stopped.stderr);
    let chat_end = chat.wait().unwrap();
    assert_eq!(chat_end.code(), Some(1), "a stopped reply is not a done one");
    assert_eq!(status_document(&server, &url, None)["status"], "stop");

    let again = server.run(&["stop", &url]);
    assert_eq!(again.code, Some(1));
    assert!(again.stderr.contains("already finished"), "{}", again.stderr);
    let followed = server.run(&["follow", &url]);
    assert_eq!(followed.code, Some(1));
    assert!(followed.stderr.contains("ended with status `stop`"), "{}", followed.stderr);
}

#[test]
fn server_errors_print_the_servers_message_and_exit_non_zero() {
    let server = start();
    let bad = server.run(&["chat", "--param", "timeout=500", "hi"]);
    assert_eq!(bad.code, Some(1));
    assert!(bad.stderr.contains("`timeout` must be between 1 and 90"), "{}", bad.stderr);
    assert_eq!(bad.stdout, "");

    let unknown = format!("{}/1/r/pub/2026/01/01/00/00/00/00000000-0000-4000-8000-000000000000.json", server.base);
    let missing = server.run(&["status", &unknown]);
    assert_eq!(missing.code, Some(1));
    assert!(missing.stderr.contains("(HTTP 404)"), "{}", missing.stderr);

    let failed = server.run(&["chat", "--param", &mock(r#"{"status": 500, "error_message": "the mock failed"}"#), "x"]);
    assert_eq!(failed.code, Some(1));
    assert!(failed.stderr.contains("ended with status `error`"), "{}", failed.stderr);

    let not_a_url = server.run(&["follow", "http://127.0.0.1:1/elsewhere"]);
    assert_eq!(not_a_url.code, Some(1));
    assert!(not_a_url.stderr.contains("is not a request URL"), "{}", not_a_url.stderr);
}

#[test]
fn ctrl_c_stops_following_not_the_request_and_the_printed_command_resumes_it() {
    let server = start();
    let mut chat = server
        .offload(&["chat", "--param", &mock(r#"{"words": 80, "delay_ms": 30}"#), "long"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = chat.stdout.take().unwrap();
    let mut before = vec![0u8; 16];
    stdout.read_exact(&mut before).unwrap();
    let status = Command::new("kill").args(["-INT", &chat.id().to_string()]).status().unwrap();
    assert!(status.success());
    let end = chat.wait().unwrap();
    assert_eq!(end.code(), Some(130));
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    before.extend(rest);
    let printed = String::from_utf8(before).unwrap();
    let mut stderr = String::new();
    chat.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let url = stderr.lines().find_map(|l| l.strip_prefix("offload: status ")).unwrap().to_owned();
    let hint = stderr.lines().find(|l| l.trim_start().starts_with("offload follow")).unwrap_or_else(|| {
        panic!("no resume hint: {stderr}");
    });
    assert!(stderr.contains("the request goes on"), "{stderr}");

    let document = wait_for_status(&server, &url, "done");
    let whole = document["response"]["body"]["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(printed.len() < whole.len(), "it stopped following early: {printed:?}");

    // The hint, run as printed (its URL quoted for the shell), prints exactly the rest.
    let words: Vec<String> = hint.split_whitespace().skip(1).map(|w| w.trim_matches('\'').to_owned()).collect();
    let args: Vec<&str> = words.iter().map(String::as_str).collect();
    let resumed = server.run(&args).ok();
    assert_eq!(format!("{}{}", printed.trim_end_matches('\n'), resumed.stdout), format!("{whole}\n"));
}

#[test]
fn the_service_key_comes_from_offload_api_key() {
    let data = tempfile::tempdir().unwrap();
    let created = run({
        let mut c = Command::new(BIN);
        c.args(["keys", "create", "--name", "cli"]).arg("--data-dir").arg(data.path());
        c
    })
    .ok();
    let key = created.stdout.lines().nth(1).unwrap().trim().to_owned();
    let server = start_in(data.path());

    let refused = server.run(&["chat", "hi"]);
    assert_eq!(refused.code, Some(1));
    assert!(refused.stderr.contains("(HTTP 401)"), "{}", refused.stderr);
    let mut with_key = server.offload(&["chat", "--param", &content(REPLY), "hi"]);
    with_key.env("OFFLOAD_API_KEY", &key);
    assert_eq!(run(with_key).ok().stdout, format!("{REPLY}\n"));
    let by_flag = server.run(&["chat", "--key", &key, "--param", &content(REPLY), "hi"]).ok();
    assert_eq!(by_flag.stdout, format!("{REPLY}\n"));
}

#[test]
fn completions_print_a_script_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let run = run({
            let mut c = Command::new(BIN);
            c.args(["completions", shell]);
            c
        })
        .ok();
        assert!(run.stdout.contains("offload") && run.stdout.contains("follow"), "{shell}: {}", run.stdout);
    }
}

#[test]
fn following_gives_up_after_bounded_retries_when_the_server_is_gone_and_says_how_to_resume() {
    let mut server = start();
    let mut chat = server
        .offload(&["chat", "--param", &mock(r#"{"words": 2000, "delay_ms": 20}"#), "long"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut some = [0u8; 16];
    let mut stdout = chat.stdout.take().unwrap();
    stdout.read_exact(&mut some).unwrap();
    server.process.kill();
    let started = Instant::now();
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    let end = chat.wait().unwrap();
    assert_eq!(end.code(), Some(1));
    assert!(started.elapsed() < Duration::from_secs(30), "retries are bounded");
    let mut stderr = String::new();
    chat.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(stderr.matches("reconnecting in").count() >= 3, "{stderr}");
    assert!(stderr.contains("gave up after"), "{stderr}");
    assert!(stderr.contains("offload follow --last-event-id "), "{stderr}");
}
