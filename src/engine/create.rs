//! Accepting a request: building its record (with the history of the conversation it continues), inserting it,
//! and starting its upstream call while the insert commits.

use super::attempts::{Bodies, UpstreamCall};
use super::live::{CancelReason, LiveRequest};
use super::{CreateError, Created, Engine, continuation, worker};
use crate::document::RequestMeta;
use crate::document::model::Options;
use crate::domain::{
    Access, AccessToken, Continuation, CreateRequest, Format, Kind, Locator, RequestId, UpstreamKey, unix_now,
};
use crate::keys::InFlightSlot;
use crate::store::WriteOp;
use serde_json::Value;
use serde_json::value::RawValue;
use std::sync::Arc;
use tracing::Instrument;

impl Engine {
    /// Accepts a request and starts its upstream call. `held` (a service key's in-flight slot) is kept until the
    /// request is final; `key` is the id of that service key, whose usage the request counts in.
    pub(super) async fn create(
        &self,
        kind: Kind,
        req: CreateRequest,
        caller_key: Option<UpstreamKey>,
        (held, key): (Option<InFlightSlot>, Option<String>),
    ) -> Result<Created, CreateError> {
        let inner = &self.inner;
        let waited_for_alone = !req.answer_waits_for_upstream;
        if !self.accepting() {
            return Err(CreateError::ShuttingDown);
        }
        if self.store_problem().is_some() {
            return Err(CreateError::StoreFailing);
        }
        let slot =
            inner.slots.clone().try_acquire_owned().map_err(|_| CreateError::Overloaded(inner.config.max_in_flight))?;
        // The one routing step of every API: where the call may go, in order.
        let model = req.parameters.get("model").and_then(Value::as_str).unwrap_or_default().to_owned();
        let targets = inner.upstreams.route(&model);
        let Some(first) = targets.first() else { return Err(CreateError::NoUpstream(model)) };
        if targets.len() == 1 {
            // The create call's access line names the upstream when there is no choice to make.
            crate::telemetry::record_upstream(first.upstream.name());
        }
        if first.upstream.key_for(caller_key.clone()).is_none() && first.upstream.requires_key() {
            return Err(CreateError::MissingKey);
        }

        if let Some(url) = &req.webhook_url
            && !inner.config.allow_private_webhooks
        {
            crate::webhook::ssrf::check_target(url).await.map_err(|e| CreateError::WebhookRefused(e.to_string()))?;
        }

        let mut parameters = req.parameters;
        let mut conversation_id = req.conversation_id;
        let prepared = match req.format {
            Format::Responses => {
                let has_responses_api = first.upstream.has_responses_api();
                let key_hash = req.key_hash.as_ref();
                Some(self.prepare_response(&mut parameters, req.previous_response, key_hash, has_responses_api).await?)
            }
            Format::Chat => None,
        };
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
        // The request's span, continuing the caller's trace (a no-op while traces are not sent).
        let provider = first.upstream.provider_name().to_owned();
        let traced =
            crate::telemetry::otel::request_span(&id.to_string(), &model, &provider, req.traceparent.as_deref());
        let traceparent = crate::telemetry::otel::traceparent(&traced);
        let log_span = crate::telemetry::request_log_span(id);
        if let Some(trace_id) = crate::telemetry::otel::trace_id(&traced) {
            crate::telemetry::record_trace_id(&trace_id);
            log_span.record("trace_id", trace_id);
        }
        // A request private to its service key is read with the key: it has no tokens of its own.
        let tokens = match (req.access, &req.key_hash) {
            (Access::Private, None) => {
                let token = || AccessToken::generate().map_err(|e| CreateError::Internal(e.to_string()));
                Some((token()?, token()?))
            }
            _ => None,
        };
        let hide_usage =
            prepared.is_none() && kind == Kind::Stream && crate::upstream::chat::ask_for_usage(&mut parameters);
        let parameters_json = serde_json::to_string(&parameters).map_err(|e| CreateError::Internal(e.to_string()))?;
        let (history_items, upstream_body) = match prepared {
            Some(prepared) => {
                if conversation_id.is_none() {
                    conversation_id = prepared.conversation_id;
                }
                (prepared.history_items, prepared.bodies)
            }
            None => (0, Bodies::Chat(crate::upstream::chat::body(&parameters_json, kind == Kind::Stream))),
        };
        let meta = Arc::new(RequestMeta {
            locator: Locator { kind, access: req.access, created_at: created.floor() as i64, id },
            created,
            conversation_id: conversation_id.unwrap_or_else(|| id.to_string()),
            bearer: tokens.as_ref().map(|(b, _)| b.hash()).or(req.key_hash),
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
            format: req.format,
            history_items,
            traceparent,
            key,
        });

        // The upstream call starts while the insert commits; the answer waits for the insert, and the worker writes
        // nothing (and drops the call) if it fails.
        let inserted = inner.persister.commit_soon(WriteOp::Insert(meta.clone()), waited_for_alone);
        let live = LiveRequest::new(meta.clone(), hide_usage);
        inner.hub.lock().insert(id, live.clone());
        let work = worker::run(
            inner.clone(),
            live.clone(),
            UpstreamCall { targets, caller_key, bodies: upstream_body, model },
            (held, slot),
            inserted.clone(),
        );
        inner.tasks.spawn(work.instrument(traced).instrument(log_span));
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
        let (parameters, body) = found.parameters_and_body();
        let mut messages = match parameters.get("messages") {
            Some(Value::Array(m)) => m.clone(),
            _ => Vec::new(),
        };
        messages.extend(continuation::assistant_message(&body, c.max_length));
        Ok((meta.conversation_id.clone(), messages))
    }
}
