//! `offload follow URL`: replay a request's reply from the start (or after `--last-event-id`) and follow it live
//! until it ends; an async request (no event stream) is waited on through its status document.

use super::poll::Waiter;
use super::stream::Reader;
use super::target::RequestUrl;
use super::{ClientError, Interrupt, Outcome, http, resume_hint};
use clap::Args;

#[derive(Args, Debug)]
pub struct FollowArgs {
    /// The request's stream URL (`...txt`, with its `?stream_token=` if private) or status URL (`...json`).
    url: String,
    /// Bearer token of a private request.
    #[arg(long)]
    token: Option<String>,
    /// Start after this event (as printed when following was interrupted) instead of from the first.
    #[arg(long)]
    last_event_id: Option<u64>,
    /// Print every event as one JSON line (for an async request: the final status document) instead of the text.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: FollowArgs) -> Result<Outcome, ClientError> {
    let mut interrupt = Interrupt::listen()?;
    let http = http()?;
    let url = RequestUrl::parse(&args.url)?;
    let token = args.token.as_deref();
    let outcome = if url.is_stream() {
        let after = args.last_event_id.or(url.last_event_id()).unwrap_or(0);
        Reader { http: &http, url: &url, token, json: args.json }.follow(after, &mut interrupt).await?
    } else {
        Waiter { http: &http, url: &url, token, json: args.json }.wait(&mut interrupt).await?
    };
    if let Outcome::Interrupted { last_event_id } = outcome {
        resume_hint(&url, token, last_event_id, "stopped following; the request goes on");
    }
    Ok(outcome)
}
