//! `offload stop URL`: stop a running request; the server drops the upstream call and keeps what came.

use super::target::RequestUrl;
use super::{ClientError, http, json_body, send};
use clap::Args;
use serde_json::Value;

#[derive(Args, Debug)]
pub struct StopArgs {
    /// Any URL of the request (status, stream or stop URL).
    url: String,
    /// Bearer token of a private request.
    #[arg(long)]
    token: Option<String>,
}

pub async fn run(args: StopArgs) -> Result<(), ClientError> {
    let url = RequestUrl::parse(&args.url)?.stop();
    let mut request = http()?.post(url.clone());
    if let Some(token) = &args.token {
        request = request.bearer_auth(token);
    }
    let answer = json_body(send(request, url.as_str()).await?, url.as_str()).await?;
    let readme = answer.get("README").and_then(Value::as_str).unwrap_or("The request was stopped.");
    note!("offload: {readme}");
    Ok(())
}
