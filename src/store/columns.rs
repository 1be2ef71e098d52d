//! How a request is laid out in columns, shared by every implementation: each stores the same text in the same
//! columns, so the decoding (and its checks for corrupt data) is written once.

use super::{StoreError, StoredRequest};
use crate::document::model::Options;
use crate::document::{Progress, RequestMeta};
use crate::domain::{Access, Format, Kind, Locator, NodeId, RequestId, TokenHash};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The parts of [`RequestMeta`] kept as one JSON column.
#[derive(Serialize, Deserialize)]
struct MetaColumn {
    created: f64,
    conversation_id: String,
    options: Options,
    #[serde(default)]
    from_status_url: Option<String>,
    #[serde(default, skip_serializing_if = "Format::is_chat")]
    format: Format,
    #[serde(default, skip_serializing_if = "is_zero")]
    history_items: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    traceparent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

pub(super) fn json_err(e: serde_json::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// The `meta` column of a request.
pub(super) fn encode_meta(meta: &RequestMeta) -> Result<String, StoreError> {
    serde_json::to_string(&MetaColumn {
        created: meta.created,
        conversation_id: meta.conversation_id.clone(),
        options: meta.options.clone(),
        from_status_url: meta.from_status_url.clone(),
        format: meta.format,
        history_items: meta.history_items,
        traceparent: meta.traceparent.clone(),
        key: meta.key.clone(),
    })
    .map_err(json_err)
}

/// The `progress` column of a request.
pub(super) fn encode_progress(progress: &Progress) -> Result<String, StoreError> {
    serde_json::to_string(progress).map_err(json_err)
}

/// A request's columns as read back, before they are checked.
pub(super) struct RequestRow {
    pub id: Vec<u8>,
    pub kind: u8,
    pub access: u8,
    pub created_at: i64,
    pub bearer: Option<Vec<u8>>,
    pub stream_token: Option<Vec<u8>>,
    pub meta: String,
    /// The request body's parameters, byte for byte as received.
    pub parameters: String,
    pub progress: String,
    pub body: Option<String>,
    /// The highest stored event seq (0 without events).
    pub event_count: i64,
    /// The node that runs (or ran) the request.
    pub owner: Option<Vec<u8>>,
}

impl RequestRow {
    pub fn decode(self) -> Result<StoredRequest, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(what.to_owned());
        let id = RequestId::from_bytes(self.id.try_into().map_err(|_| corrupt("request id"))?);
        let column: MetaColumn = serde_json::from_str(&self.meta).map_err(json_err)?;
        let hash =
            |b: Option<Vec<u8>>| b.map(|b| TokenHash::from_bytes(&b).ok_or_else(|| corrupt("token hash"))).transpose();
        Ok(StoredRequest {
            meta: RequestMeta {
                locator: Locator {
                    kind: Kind::from_code(self.kind).ok_or_else(|| corrupt("kind"))?,
                    access: Access::from_code(self.access).ok_or_else(|| corrupt("access"))?,
                    created_at: self.created_at,
                    id,
                },
                created: column.created,
                conversation_id: column.conversation_id,
                bearer: hash(self.bearer)?,
                stream_token: hash(self.stream_token)?,
                options: column.options,
                from_status_url: column.from_status_url,
                parameters: RawValue::from_string(self.parameters).map_err(json_err)?,
                owner: self
                    .owner
                    .map(|b| b.try_into().map(NodeId::from_bytes).map_err(|_| corrupt("owner")))
                    .transpose()?,
                format: column.format,
                history_items: column.history_items,
                traceparent: column.traceparent,
                key: column.key,
            },
            progress: serde_json::from_str(&self.progress).map_err(json_err)?,
            body: self.body,
            event_count: u64::try_from(self.event_count).unwrap_or(0),
        })
    }
}

/// An event's data as stored (bytes, from text received as UTF-8) back as text; the lossy path cannot lose anything.
pub(super) fn event_text(data: Vec<u8>) -> String {
    String::from_utf8(data).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}
