//! Renders the status document. One function serves live requests (from memory) and stored ones.

use super::Assembler;
use super::model::{Attempt, ErrorInfo, Options, Progress, RequestMeta, ResponseMeta, Served};
use crate::domain::{Kind, Status, Suffix};
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use serde_json::value::RawValue;

/// Where the server's URLs start: the `--public-url` setting, without a trailing slash.
#[derive(Clone, Debug)]
pub struct Urls {
    pub base: String,
}

/// The response body as the document shows it.
#[derive(Clone, Copy)]
pub enum BodyView<'a> {
    /// No body yet, or none at all.
    None,
    /// Stream request: the `chat.completion` assembled so far.
    Assembled(&'a Assembler),
    /// Async request (or any finished one): the body as stored JSON.
    Json(&'a RawValue),
    /// A body that is not JSON, shown as a string.
    Text(&'a str),
    /// A body kept as a JSON value (a Responses request's response object).
    Value(&'a serde_json::Value),
}

impl Serialize for BodyView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            BodyView::None => s.serialize_none(),
            BodyView::Assembled(a) => a.serialize(s),
            BodyView::Json(raw) => raw.serialize(s),
            BodyView::Text(text) => s.serialize_str(text),
            BodyView::Value(value) => value.serialize(s),
        }
    }
}

/// The README sentence that fits the status.
pub fn readme(kind: Kind, status: Status) -> &'static str {
    match (status, kind) {
        (Status::Pending, _) => {
            "The request was accepted and is queued; it has not been sent to the ChatGPT API yet. Load this `status_url` again to follow it."
        }
        (Status::Posting, _) => {
            "The request was sent to the ChatGPT API and no response has arrived yet. Load this `status_url` again to check for new data."
        }
        (Status::Waiting, _) | (Status::Streaming, Kind::Async) => {
            "The ChatGPT API is answering and the response is in progress. Load this `status_url` again to check for new data."
        }
        (Status::Streaming, Kind::Stream) => {
            "The ChatGPT API is streaming its response; `response.body` holds the text so far. Load this `status_url` again, or open `stream_events_url`, to follow it."
        }
        (Status::Done, _) => {
            "This endpoint has completed the collection of data sent by the ChatGPT API and will not receive any further updates."
        }
        (Status::Error, _) => {
            "The request ended with an error, described in `error`, and will not receive any further updates."
        }
        (Status::Stop, _) => {
            "The request was stopped through its `stop_url`; what was received until then is kept, and it will not receive any further updates."
        }
    }
}

fn seconds(t: Option<f64>) -> Option<i64> {
    t.map(|t| t.floor() as i64)
}

fn duration(from: Option<f64>, to: Option<f64>) -> Option<f64> {
    Some(((to? - from?).max(0.0) * 1000.0).round() / 1000.0)
}

#[derive(Serialize)]
struct Doc<'a> {
    status: Status,
    created_at: i64,
    conversation_id: &'a str,
    #[serde(rename = "README")]
    readme: &'static str,
    authorization: Authorization,
    endpoints: Endpoints,
    request: Times,
    options: &'a Options,
    parameters: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    response: Option<Response<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a ErrorInfo>,
    #[serde(skip_serializing_if = "<[Attempt]>::is_empty")]
    attempts: &'a [Attempt],
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<&'a Served>,
    #[serde(skip_serializing_if = "Option::is_none")]
    webhook: Option<&'a RawValue>,
}

#[derive(Serialize)]
struct Authorization {
    access: &'static str,
}

#[derive(Serialize)]
struct Endpoints {
    status_url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_events_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_raw_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    from_status_url: Option<String>,
}

#[derive(Serialize)]
struct Times {
    endpoint: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    finished_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    processed_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_time: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total_time: Option<f64>,
}

#[derive(Serialize)]
struct Response<'a> {
    status_code: u16,
    protocol: &'a str,
    headers: Headers<'a>,
    body: BodyView<'a>,
}

struct Headers<'a>(&'a [(String, String)]);

impl Serialize for Headers<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (name, value) in self.0 {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

/// The endpoint URLs of the create response and the document.
pub struct EndpointUrls {
    pub status_url: String,
    pub stream_events_url: Option<String>,
    pub stop_url: String,
}

impl Urls {
    pub fn endpoints(&self, meta: &RequestMeta) -> EndpointUrls {
        let loc = &meta.locator;
        EndpointUrls {
            status_url: loc.url(&self.base, Suffix::Status),
            stream_events_url: (loc.kind == Kind::Stream).then(|| loc.url(&self.base, Suffix::Events)),
            stop_url: loc.url(&self.base, Suffix::Stop),
        }
    }
}

/// The status document as JSON bytes.
pub fn render(
    meta: &RequestMeta,
    progress: &Progress,
    body: BodyView<'_>,
    urls: &Urls,
    webhook: Option<&RawValue>,
) -> Vec<u8> {
    let loc = &meta.locator;
    let urls_of = urls.endpoints(meta);
    let doc = Doc {
        status: progress.status,
        created_at: loc.created_at,
        conversation_id: &meta.conversation_id,
        readme: readme(loc.kind, progress.status),
        authorization: Authorization { access: loc.access.as_str() },
        endpoints: Endpoints {
            status_url: urls_of.status_url,
            stream_events_url: urls_of.stream_events_url,
            stop_url: (!progress.status.is_final()).then_some(urls_of.stop_url),
            response_raw_url: progress.response.as_ref().map(|_| loc.url(&urls.base, Suffix::Raw)),
            from_status_url: meta.from_status_url.clone(),
        },
        request: Times {
            endpoint: match meta.format {
                crate::domain::Format::Responses => "/v1/responses",
                crate::domain::Format::Chat => loc.kind.endpoint(),
            },
            request_at: seconds(progress.request_at),
            finished_at: seconds(progress.finished_at),
            processed_at: seconds(progress.processed_at),
            request_time: duration(progress.request_at, progress.finished_at),
            total_time: duration(Some(meta.created), progress.processed_at),
        },
        options: &meta.options,
        parameters: &meta.parameters,
        response: progress.response.as_ref().map(|r: &ResponseMeta| Response {
            status_code: r.status_code,
            protocol: &r.protocol,
            headers: Headers(&r.headers),
            body,
        }),
        error: progress.error.as_ref().filter(|_| progress.status == Status::Error),
        attempts: &progress.attempts,
        upstream: progress.upstream.as_ref(),
        webhook,
    };
    // Serialising plain structs, strings and already-valid JSON into a Vec cannot fail; an empty document
    // would still be answered as JSON-less 200, so fall back to a minimal valid object.
    // A document is about 1.5 KiB before its body: reserved at once rather than grown by doubling from nothing.
    let mut out = Vec::with_capacity(DOCUMENT_CAPACITY);
    match serde_json::to_writer(&mut out, &doc) {
        Ok(()) => out,
        Err(_) => b"{}".to_vec(),
    }
}

/// What [`render`] reserves for a document.
const DOCUMENT_CAPACITY: usize = 2048;
