//! Waiting on a status document until its status is final (async requests have no event stream), with a status
//! line on stderr while a person watches, and nothing extra when stderr is not a terminal.
//!
//! Polls send `If-None-Match`, so an unchanged document costs a 304 and no body.

use super::target::RequestUrl;
use super::{ClientError, Interrupt, Outcome, json_body, out, send, server_error};
use serde_json::Value;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

const FINAL: [&str; 3] = ["done", "error", "stop"];
const SPINNER: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
/// Often at first (short replies come back fast), then once a second.
fn interval(elapsed: Duration) -> Duration {
    if elapsed < Duration::from_secs(5) { Duration::from_millis(200) } else { Duration::from_secs(1) }
}

pub struct Waiter<'a> {
    pub http: &'a reqwest::Client,
    pub url: &'a RequestUrl,
    pub token: Option<&'a str>,
    /// Print the final status document instead of the reply's text.
    pub json: bool,
}

impl Waiter<'_> {
    pub async fn wait(&self, interrupt: &mut Interrupt) -> Result<Outcome, ClientError> {
        let mut line = StatusLine::new();
        let result = tokio::select! {
            result = self.until_final(&mut line) => Some(result),
            () = interrupt.recv() => None,
        };
        line.clear();
        let Some(document) = result.transpose()? else { return Ok(Outcome::Interrupted { last_event_id: 0 }) };
        if self.json {
            out(&format!("{}\n", serde_json::to_string_pretty(&document).unwrap_or_default()))?;
        } else if let Some(text) = reply_text(&document).filter(|t| !t.is_empty()) {
            out(text)?;
            if !text.ends_with('\n') {
                out("\n")?;
            }
        }
        let status = document.get("status").and_then(Value::as_str).unwrap_or_default();
        if status == "done" {
            return Ok(Outcome::Done);
        }
        let message = document.pointer("/error/message").and_then(Value::as_str).unwrap_or("(no message)");
        Ok(Outcome::Failed { status: status.to_owned(), message: message.to_owned() })
    }

    async fn until_final(&self, line: &mut StatusLine) -> Result<Value, ClientError> {
        let url = self.url.status();
        let started = Instant::now();
        let mut etag: Option<reqwest::header::HeaderValue> = None;
        let mut status = String::from("pending");
        loop {
            let mut request = self.http.get(url.clone());
            if let Some(token) = self.token {
                request = request.bearer_auth(token);
            }
            if let Some(tag) = &etag {
                request = request.header(reqwest::header::IF_NONE_MATCH, tag.clone());
            }
            let response = send(request, url.as_str()).await?;
            if response.status() != reqwest::StatusCode::NOT_MODIFIED {
                if !response.status().is_success() {
                    return Err(server_error(response).await);
                }
                etag = response.headers().get(reqwest::header::ETAG).cloned();
                let document = json_body(response, url.as_str()).await?;
                status = document.get("status").and_then(Value::as_str).unwrap_or("unknown").to_owned();
                if FINAL.contains(&status.as_str()) {
                    return Ok(document);
                }
            }
            let pause = interval(started.elapsed());
            let until = Instant::now() + pause;
            while Instant::now() < until {
                line.show(&status, started.elapsed());
                tokio::time::sleep(Duration::from_millis(100).min(pause)).await;
            }
        }
    }
}

/// The reply of a finished request: the first choice's message (an async body is the upstream's own JSON; a
/// stream body is assembled in the same shape).
fn reply_text(document: &Value) -> Option<&str> {
    let message = document.pointer("/response/body/choices/0/message")?;
    message.get("content").and_then(Value::as_str).or_else(|| message.get("refusal").and_then(Value::as_str))
}

/// A one-line spinner with the status and the time waited, redrawn in place; only on a terminal.
struct StatusLine {
    enabled: bool,
    frame: usize,
    drawn: bool,
}

impl StatusLine {
    fn new() -> Self {
        Self { enabled: std::io::stderr().is_terminal(), frame: 0, drawn: false }
    }

    fn show(&mut self, status: &str, waited: Duration) {
        if !self.enabled {
            return;
        }
        let spinner = SPINNER[self.frame % SPINNER.len()];
        self.frame += 1;
        let mut stderr = std::io::stderr().lock();
        let _ = write!(stderr, "\r\x1b[2K{spinner} {status} · {:.1} s", waited.as_secs_f64());
        let _ = stderr.flush();
        self.drawn = true;
    }

    fn clear(&mut self) {
        if self.drawn {
            let mut stderr = std::io::stderr().lock();
            let _ = write!(stderr, "\r\x1b[2K");
            let _ = stderr.flush();
            self.drawn = false;
        }
    }
}
