//! `offload chat "prompt"`: create a request on a server, tell where it lives (on stderr), then print the reply as
//! it arrives (stream) or once it is done (`--async`).

use super::poll::Waiter;
use super::stream::Reader;
use super::target::RequestUrl;
use super::{ClientError, Interrupt, Outcome, http, json_body, resume_hint, send};
use clap::Args;
use serde_json::{Map, Value, json};
use url::Url;

#[derive(Args, Debug)]
pub struct ChatArgs {
    /// The message to send.
    prompt: String,
    /// The server's base URL.
    #[arg(long, env = "OFFLOAD_URL", default_value = "http://127.0.0.1:8080")]
    server: Url,
    /// Service key of the server (sent as `X-API-Key`), when it requires one.
    #[arg(long, env = "OFFLOAD_API_KEY", hide_env_values = true)]
    key: Option<String>,
    /// Upstream (OpenAI) key, when the server has none of its own (sent as `X-OpenAI-API-Key`).
    #[arg(long, env = "OFFLOAD_OPENAI_KEY", hide_env_values = true)]
    openai_key: Option<String>,
    /// Model [default: the server's].
    #[arg(long)]
    model: Option<String>,
    /// A system message before the prompt.
    #[arg(long)]
    system: Option<String>,
    /// A private request: it is readable only with the bearer token printed on stderr.
    #[arg(long)]
    private: bool,
    /// Use /v1/async-chatgpt: show progress while waiting, then print the whole reply.
    #[arg(long = "async")]
    asynchronous: bool,
    /// Print every event as one JSON line (with --async: the final status document) instead of the text.
    #[arg(long)]
    json: bool,
    /// Continue the conversation of this status URL (its messages and reply come before the prompt).
    #[arg(long = "continue", value_name = "STATUS_URL")]
    continue_from: Option<String>,
    /// With --continue: the bearer token of that request, when it was private.
    #[arg(long, requires = "continue_from")]
    token: Option<String>,
    /// Any other request parameter, as NAME=VALUE (VALUE is JSON, else a string); repeatable, e.g.
    /// `--param temperature=0.2 --param max_tokens=100`.
    #[arg(long = "param", value_name = "NAME=VALUE", value_parser = parse_param)]
    params: Vec<(String, Value)>,
}

fn parse_param(text: &str) -> Result<(String, Value), String> {
    let (name, value) = text.split_once('=').ok_or("expected NAME=VALUE")?;
    if name.is_empty() {
        return Err("expected NAME=VALUE".into());
    }
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
    Ok((name.to_owned(), value))
}

impl ChatArgs {
    fn body(&self) -> Result<Value, ClientError> {
        let mut body = Map::new();
        for (name, value) in &self.params {
            body.insert(name.clone(), value.clone());
        }
        let mut messages = Vec::new();
        if let Some(system) = &self.system {
            messages.push(json!({"role": "system", "content": system}));
        }
        messages.push(json!({"role": "user", "content": self.prompt}));
        body.insert("messages".into(), Value::Array(messages));
        if let Some(model) = &self.model {
            body.insert("model".into(), json!(model));
        }
        if self.private {
            body.insert("access".into(), json!("private"));
        }
        if let Some(from) = &self.continue_from {
            body.insert("from_status_url".into(), json!(RequestUrl::parse(from)?.status().as_str()));
        }
        if let Some(token) = &self.token {
            body.insert("from_bearer_token".into(), json!(token));
        }
        Ok(Value::Object(body))
    }

    fn endpoint(&self) -> String {
        let path = if self.asynchronous { "v1/async-chatgpt" } else { "v1/stream-chatgpt" };
        format!("{}/{path}", self.server.as_str().trim_end_matches('/'))
    }
}

pub async fn run(args: ChatArgs) -> Result<Outcome, ClientError> {
    let mut interrupt = Interrupt::listen()?;
    let http = http()?;
    let endpoint = args.endpoint();
    let mut request = http.post(&endpoint).json(&args.body()?);
    if let Some(key) = &args.key {
        request = request.header("X-API-Key", key);
    }
    if let Some(key) = &args.openai_key {
        request = request.header("X-OpenAI-API-Key", key);
    }
    let created = json_body(send(request, &endpoint).await?, &endpoint).await?;
    let text = |pointer: &str| created.pointer(pointer).and_then(Value::as_str);
    let status_url = text("/endpoints/status_url").ok_or_else(|| ClientError::Protocol {
        url: endpoint.clone(),
        detail: "the answer has no endpoints.status_url".into(),
    })?;
    let url = RequestUrl::parse(status_url)?;
    let token = text("/authorization/bearer_token");
    note!("offload: status {status_url}");
    if let Some(token) = token {
        note!("offload: private request; its bearer token (shown only now): {token}");
    }
    let outcome = if args.asynchronous {
        Waiter { http: &http, url: &url, token, json: args.json }.wait(&mut interrupt).await?
    } else {
        Reader { http: &http, url: &url, token, json: args.json }.follow(0, &mut interrupt).await?
    };
    if let Outcome::Interrupted { last_event_id } = outcome {
        resume_hint(&url, token, last_event_id, "stopped following; the request goes on");
    }
    Ok(outcome)
}
