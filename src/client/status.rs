//! `offload status URL`: print a request's status document.

use super::target::RequestUrl;
use super::{ClientError, http, json_body, out, send};
use clap::Args;

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Any URL of the request (status, stream, raw or stop URL).
    url: String,
    /// Bearer token of a private request.
    #[arg(long)]
    token: Option<String>,
}

pub async fn run(args: StatusArgs) -> Result<(), ClientError> {
    let url = RequestUrl::parse(&args.url)?.status();
    let mut request = http()?.get(url.clone());
    if let Some(token) = &args.token {
        request = request.bearer_auth(token);
    }
    let document = json_body(send(request, url.as_str()).await?, url.as_str()).await?;
    out(&format!("{}\n", serde_json::to_string_pretty(&document).unwrap_or_default()))
}
