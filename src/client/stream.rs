//! Reading a request's event stream: the reply's text (or every event as a JSON line) printed as it arrives, the
//! connection reopened with `Last-Event-ID` when it drops, until `data: [DONE]`.
//!
//! Reconnecting is safe because the server replays exactly the events after the one named, so the output has no
//! gap and no repeat. Only a connection lost after the stream was first opened is retried (a server that cannot be
//! reached at all, or answers 4xx, is an error at once); 5xx answers to a reconnect count as a drop (a restarting
//! server, a cluster node relaying). Retries are bounded: [`ATTEMPTS`] in a row without a new event, with doubling
//! delays from [`FIRST_DELAY`].

use super::target::RequestUrl;
use super::{ClientError, Interrupt, Outcome, out, server_error};

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::time::Duration;

const ATTEMPTS: u32 = 6;
const FIRST_DELAY: Duration = Duration::from_millis(250);
const MAX_DELAY: Duration = Duration::from_secs(5);

/// What to print and how to reach the stream.
pub struct Reader<'a> {
    pub http: &'a reqwest::Client,
    pub url: &'a RequestUrl,
    /// The bearer token of a private request (else the URL's `stream_token`, if any, is used).
    pub token: Option<&'a str>,
    /// Every event as one JSON line instead of the reply's text.
    pub json: bool,
}

/// Where one connection left off.
enum Connection {
    /// `[DONE]` (or 204: nothing after the event named): the stream is complete.
    Ended,
    /// The connection dropped before `[DONE]`.
    Dropped(String),
}

/// What the reader has seen so far, across connections.
#[derive(Default)]
struct Progress {
    last_event_id: u64,
    /// The named `error`/`stop` event, when one came.
    failed: Option<(String, String)>,
    /// Whether any text was printed and whether it ended a line (so the reply ends with exactly one newline).
    printed: bool,
    at_line_start: bool,
    /// Events received since the last (re)connection: a connection that brought some resets the retry count.
    fresh: u64,
}

impl Reader<'_> {
    /// Follows the stream from after `after` until it ends or Ctrl-C.
    pub async fn follow(&self, after: u64, interrupt: &mut Interrupt) -> Result<Outcome, ClientError> {
        let mut progress = Progress { last_event_id: after, at_line_start: true, ..Progress::default() };
        let mut failures = 0u32;
        let mut opened_once = false;
        loop {
            progress.fresh = 0;
            let attempt = tokio::select! {
                result = self.connection(&mut progress, opened_once) => Some(result),
                () = interrupt.recv() => None,
            };
            let Some(attempt) = attempt else {
                self.finish_line(&progress)?;
                return Ok(Outcome::Interrupted { last_event_id: progress.last_event_id });
            };
            opened_once = true;
            let why = match attempt? {
                Connection::Ended => {
                    self.finish_line(&progress)?;
                    return Ok(match progress.failed {
                        Some((status, message)) => Outcome::Failed { status, message },
                        None => Outcome::Done,
                    });
                }
                Connection::Dropped(why) => why,
            };
            failures = if progress.fresh > 0 { 1 } else { failures + 1 };
            if failures >= ATTEMPTS {
                self.finish_line(&progress)?;
                super::resume_hint(self.url, self.token, progress.last_event_id, "the server cannot be reached");
                return Err(ClientError::GaveUp {
                    url: self.url.events().to_string(),
                    attempts: failures,
                    last_event_id: progress.last_event_id,
                });
            }
            let delay = FIRST_DELAY.saturating_mul(1 << (failures - 1)).min(MAX_DELAY);
            note!(
                "\noffload: connection lost after event {} ({why}); reconnecting in {:.1} s",
                progress.last_event_id,
                delay.as_secs_f64()
            );
            let slept = tokio::select! {
                () = tokio::time::sleep(delay) => true,
                () = interrupt.recv() => false,
            };
            if !slept {
                return Ok(Outcome::Interrupted { last_event_id: progress.last_event_id });
            }
        }
    }

    /// One connection: open the stream after the last event seen and print what comes.
    async fn connection(&self, progress: &mut Progress, reconnecting: bool) -> Result<Connection, ClientError> {
        let url = self.url.events();
        let mut request = self.http.get(url.clone()).header(reqwest::header::ACCEPT, "text/event-stream");
        if progress.last_event_id > 0 {
            request = request.header("Last-Event-ID", progress.last_event_id.to_string());
        }
        if let Some(token) = self.token {
            request = request.bearer_auth(token);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) if reconnecting => return Ok(Connection::Dropped(super::cause(&e))),
            Err(e) => return Err(super::unreachable(url.as_str(), &e)),
        };
        let status = response.status();
        if status == reqwest::StatusCode::NO_CONTENT {
            return Ok(Connection::Ended);
        }
        if status.is_server_error() && reconnecting {
            return Ok(Connection::Dropped(format!("HTTP {status}")));
        }
        if !status.is_success() {
            return Err(server_error(response).await);
        }
        let mut events = response.bytes_stream().eventsource();
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(event) => event,
                Err(e) => return Ok(Connection::Dropped(e.to_string())),
            };
            if let Ok(id) = event.id.trim().parse::<u64>() {
                progress.last_event_id = progress.last_event_id.max(id);
            }
            progress.fresh += 1;
            if self.json {
                let data = serde_json::from_str::<Value>(&event.data).unwrap_or(Value::String(event.data.clone()));
                let id = event.id.trim().parse::<u64>().ok();
                out(&format!("{}\n", json!({"id": id, "event": event.event, "data": data})))?;
            }
            match event.event.as_str() {
                "error" | "stop" => {
                    let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
                    let message = data.pointer("/error/message").and_then(Value::as_str).unwrap_or("(no message)");
                    progress.failed = Some((event.event.clone(), message.to_owned()));
                }
                "message" if event.data == "[DONE]" => return Ok(Connection::Ended),
                "message" if !self.json => self.print_chunk(&event.data, progress)?,
                _ => {}
            }
        }
        Ok(Connection::Dropped("the server closed the stream before its end".into()))
    }

    /// The text a `chat.completion.chunk` adds to the first choice.
    fn print_chunk(&self, data: &str, progress: &mut Progress) -> Result<(), ClientError> {
        let Ok(chunk) = serde_json::from_str::<Value>(data) else { return Ok(()) };
        let delta = chunk.pointer("/choices/0/delta");
        for field in ["content", "refusal"] {
            if let Some(text) = delta.and_then(|d| d.get(field)).and_then(Value::as_str).filter(|t| !t.is_empty()) {
                out(text)?;
                progress.printed = true;
                progress.at_line_start = text.ends_with('\n');
            }
        }
        Ok(())
    }

    /// Ends the reply's last line, so that the shell prompt (or the next message) starts on its own.
    fn finish_line(&self, progress: &Progress) -> Result<(), ClientError> {
        if !self.json && progress.printed && !progress.at_line_start {
            out("\n")?;
        }
        Ok(())
    }
}
