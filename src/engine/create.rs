//! Accepting a request: building its record (with the history of the conversation it continues), inserting it,
//! and starting its upstream call while the insert commits.

use super::live::{CancelReason, LiveRequest};
use super::{CreateError, Created, Engine, Found, continuation, worker};
use crate::document::RequestMeta;
use crate::document::model::Options;
use crate::domain::{
    Access, AccessToken, Continuation, CreateRequest, Kind, Locator, RequestId, UpstreamKey, unix_now,
};
use crate::keys::InFlightSlot;
use crate::store::WriteOp;
use serde_json::Value;
use serde_json::value::RawValue;
use std::sync::Arc;

impl Engine {
    /// Accepts a request and starts its upstream call. `held` (a service key's in-flight slot) is kept until the
    /// request is final.
    pub(super) async fn create(
        &self,
        kind: Kind,
        req: CreateRequest,
        caller_key: Option<UpstreamKey>,
        held: Option<InFlightSlot>,
    ) -> Result<Created, CreateError> {
        let inner = &self.inner;
        if !self.accepting() {
            return Err(CreateError::ShuttingDown);
        }
        if self.store_problem().is_some() {
            return Err(CreateError::StoreFailing);
        }
        let slot =
            inner.slots.clone().try_acquire_owned().map_err(|_| CreateError::Overloaded(inner.config.max_in_flight))?;
        let key = inner.upstream.key_for(caller_key);
        if key.is_none() && inner.upstream.requires_key() {
            return Err(CreateError::MissingKey);
        }

        if let Some(url) = &req.webhook_url
            && !inner.config.allow_private_webhooks
        {
            crate::webhook::ssrf::check_target(url).await.map_err(|e| CreateError::WebhookRefused(e.to_string()))?;
        }

        let mut parameters = req.parameters;
        let mut conversation_id = req.conversation_id;
        if let Some(c) = &req.continuation {
            let (previous_conversation, history) = self.history(c).await?;
            if let Some(Value::Array(messages)) = parameters.get_mut("messages") {
                let new = std::mem::replace(messages, history);
                messages.extend(new);
            }
            conversation_id.get_or_insert(previous_conversation);
        }

        let id = RequestId::generate();
        crate::telemetry::record_request_id(id);
        let created = unix_now();
        let tokens = match req.access {
            Access::Private => {
                let token = || AccessToken::generate().map_err(|e| CreateError::Internal(e.to_string()));
                Some((token()?, token()?))
            }
            Access::Public => None,
        };
        let hide_usage = kind == Kind::Stream && crate::upstream::chat::ask_for_usage(&mut parameters);
        let parameters_json = serde_json::to_string(&parameters).map_err(|e| CreateError::Internal(e.to_string()))?;
        let upstream_body = crate::upstream::chat::body(&parameters_json, kind == Kind::Stream);
        let meta = Arc::new(RequestMeta {
            locator: Locator { kind, access: req.access, created_at: created.floor() as i64, id },
            created,
            conversation_id: conversation_id.unwrap_or_else(|| id.to_string()),
            bearer: tokens.as_ref().map(|(b, _)| b.hash()),
            stream_token: tokens.as_ref().map(|(_, s)| s.hash()),
            options: Options {
                timeout: req.timeout,
                connect_timeout: req.connect_timeout,
                webhook_url: req.webhook_url.map(String::from),
                from_max_length: req.continuation.as_ref().and_then(|c| c.max_length),
            },
            from_status_url: req.continuation.map(|c| c.from_status_url),
            parameters: RawValue::from_string(parameters_json).map_err(|e| CreateError::Internal(e.to_string()))?,
            owner: Some(inner.config.node),
        });

        // The upstream call starts while the insert commits; the answer waits for the insert, and the worker writes
        // nothing (and drops the call) if it fails.
        let inserted = inner.persister.commit_soon(WriteOp::Insert(meta.clone()));
        let live = LiveRequest::new(meta.clone(), hide_usage);
        inner.hub.lock().insert(id, live.clone());
        inner.tasks.spawn(crate::telemetry::within_request(
            id,
            worker::run(inner.clone(), live.clone(), key, upstream_body, (held, slot), inserted.clone()),
        ));
        inserted.durable().await?;
        if !self.accepting() {
            // Shutdown began while this one was being accepted: it ends as interrupted like the others.
            live.cancel_with(CancelReason::Shutdown, unix_now());
        }
        let (bearer, stream_token) = tokens.unzip();
        Ok(Created { meta, bearer, stream_token, live })
    }

    /// The previous request's conversation id and its messages followed by its assistant answer.
    async fn history(&self, c: &Continuation) -> Result<(String, Vec<Value>), CreateError> {
        let found = self.find_with(&c.target, true).await?.ok_or(CreateError::FromNotFound)?;
        let meta = found.meta();
        if let Some(hash) = &meta.bearer
            && !c.bearer_token.as_deref().is_some_and(|t| hash.verify(t))
        {
            return Err(CreateError::FromForbidden);
        }
        let status = found.status();
        if !status.is_final() {
            return Err(CreateError::FromNotFinished(status.as_str()));
        }
        let body = match &found {
            Found::Live(live) => live.snapshot().1,
            Found::Stored(stored) | Found::Elsewhere { stored, .. } => stored.body.clone(),
        };
        let body: Value = body.and_then(|b| serde_json::from_str(&b).ok()).unwrap_or(Value::Null);
        let parameters: Value = serde_json::from_str(meta.parameters.get()).unwrap_or(Value::Null);
        let mut messages = match parameters.get("messages") {
            Some(Value::Array(m)) => m.clone(),
            _ => Vec::new(),
        };
        messages.extend(continuation::assistant_message(&body, c.max_length));
        Ok((meta.conversation_id.clone(), messages))
    }
}
