//! The command-line client: `offload chat | follow | status | stop`, speaking the server's HTTP API like any other
//! client would, so it works against any offload (or OffloadGPT-compatible) server.
//!
//! Output discipline: stdout carries only what was asked for (the reply, or a document), so that
//! `offload chat "..." > answer.txt` keeps just the answer; where the request lives, progress, the resume hint and
//! errors go to stderr. Exit codes: 0 when the request is done, 1 for an error (the server's own message is shown,
//! also for a request that ended in `error` or `stop`), 130 when Ctrl-C stopped the following (never the request).
//!
//! Layout: one file per command ([`chat`], [`follow`], [`status`], [`stop`]); [`target`] turns any URL the server
//! handed out into the others; [`stream`] reads an event stream, reconnecting with `Last-Event-ID`; [`poll`] waits
//! on a status document (async requests).

/// A line on stderr; a closed stderr is ignored (unlike `eprintln!`, which panics), so the client still ends
/// as it should when nobody reads its notes.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

pub mod chat;
pub mod follow;
mod poll;
pub mod status;
pub mod stop;
mod stream;
mod target;

use clap::Subcommand;
use serde_json::Value;
use std::io::Write;
use std::process::ExitCode;

/// The client's commands, flattened into the top-level command line.
#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Send a prompt to a running server and print the reply as it arrives.
    Chat(Box<chat::ChatArgs>),
    /// Replay and follow a request's reply (stream URL or status URL), reconnecting when the connection drops.
    Follow(follow::FollowArgs),
    /// Print a request's status document.
    Status(status::StatusArgs),
    /// Stop a running request (what was received so far is kept).
    Stop(stop::StopArgs),
}

/// Everything that ends a command early. The server's own error message is shown as it is.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{message}")]
    Server { status: u16, message: String },
    #[error("cannot reach {url}: {cause}")]
    Unreachable { url: String, cause: String },
    #[error("unexpected answer from {url}: {detail}")]
    Protocol { url: String, detail: String },
    #[error("{0}")]
    Usage(String),
    #[error("the connection to {url} kept dropping; gave up after {attempts} attempts (last event {last_event_id})")]
    GaveUp { url: String, attempts: u32, last_event_id: u64 },
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
    #[error("cannot listen for Ctrl-C: {0}")]
    Signal(std::io::Error),
}

/// How a followed request ended, as far as this client saw it.
#[derive(Debug)]
pub enum Outcome {
    Done,
    /// The request ended in `error` or `stop`; the message is the server's.
    Failed {
        status: String,
        message: String,
    },
    /// Ctrl-C: this client stopped following after the event it last received.
    Interrupted {
        last_event_id: u64,
    },
}

/// Runs a client command and turns its result into the process exit code.
pub async fn run(command: ClientCommand) -> ExitCode {
    let result = match command {
        ClientCommand::Chat(args) => chat::run(*args).await,
        ClientCommand::Follow(args) => follow::run(args).await,
        ClientCommand::Status(args) => status::run(args).await.map(|()| Outcome::Done),
        ClientCommand::Stop(args) => stop::run(args).await.map(|()| Outcome::Done),
    };
    match result {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Failed { status, message }) => {
            note!("offload: the request ended with status `{status}`: {message}");
            ExitCode::FAILURE
        }
        Ok(Outcome::Interrupted { .. }) => ExitCode::from(130),
        // The reader of stdout is gone (`| head`): nothing more is wanted; the request itself goes on.
        Err(ClientError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            note!("offload: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The HTTP client of every command: a connect timeout, no overall timeout (a stream may run for minutes).
fn http() -> Result<reqwest::Client, ClientError> {
    reqwest::Client::builder()
        .user_agent(concat!("offload-cli/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| ClientError::Usage(format!("cannot set up the HTTP client: {}", cause(&e))))
}

/// An error with its causes, `a: b: c` (reqwest's own text alone says little: "error sending request").
fn cause(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

fn unreachable(url: &str, e: &reqwest::Error) -> ClientError {
    ClientError::Unreachable { url: url.to_owned(), cause: cause(e) }
}

/// Sends a request; a connection failure names the URL.
async fn send(request: reqwest::RequestBuilder, url: &str) -> Result<reqwest::Response, ClientError> {
    request.send().await.map_err(|e| unreachable(url, &e))
}

/// A non-2xx answer as the server's own `error.message`, or the status and the start of the body when the answer
/// is not the server's JSON error (a proxy in between, say).
async fn server_error(response: reqwest::Response) -> ClientError {
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    let parsed: Option<Value> = serde_json::from_str(&body).ok();
    let message = match parsed.as_ref().and_then(|v| v.pointer("/error/message")).and_then(Value::as_str) {
        Some(message) => format!("{message} (HTTP {})", status.as_u16()),
        None => format!("HTTP {status}: {}", body.chars().take(200).collect::<String>().trim()),
    };
    ClientError::Server { status: status.as_u16(), message }
}

/// The body of a 2xx answer as JSON.
async fn json_body(response: reqwest::Response, url: &str) -> Result<Value, ClientError> {
    if !response.status().is_success() {
        return Err(server_error(response).await);
    }
    response.json().await.map_err(|e| ClientError::Protocol {
        url: url.to_owned(),
        detail: format!("not a JSON answer ({})", cause(&e)),
    })
}

/// Writes to stdout and flushes at once, so that text shows as it arrives.
fn out(text: &str) -> Result<(), ClientError> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// Ctrl-C, listened for from the start of a command so that the first one never kills the process.
pub struct Interrupt {
    #[cfg(unix)]
    signal: tokio::signal::unix::Signal,
}

impl Interrupt {
    pub fn listen() -> Result<Self, ClientError> {
        #[cfg(unix)]
        {
            let signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .map_err(ClientError::Signal)?;
            Ok(Self { signal })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    pub async fn recv(&mut self) {
        #[cfg(unix)]
        self.signal.recv().await;
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Tells on stderr how to pick up where following ended (Ctrl-C, or a server gone for too long); the request
/// itself goes on on the server.
fn resume_hint(url: &target::RequestUrl, token: Option<&str>, last_event_id: u64, why: &str) {
    let mut command = String::from("offload follow");
    if url.is_stream() && last_event_id > 0 {
        command.push_str(&format!(" --last-event-id {last_event_id}"));
    }
    if let Some(token) = token {
        command.push_str(&format!(" --token {token}"));
    }
    let shown = if url.is_stream() { url.events() } else { url.status() };
    command.push_str(&format!(" '{shown}'"));
    note!("\noffload: {why}; resume with:");
    note!("  {command}");
}
