//! A Responses request before it is recorded: the conversation it continues (`previous_response_id`, from this
//! server's own record, so that it works with any upstream and after the upstream has forgotten), and the two
//! bodies it may be sent as (the Responses request itself, or translated to Chat Completions).

use super::attempts::Bodies;
use super::{CreateError, Engine};
use crate::domain::{RequestId, TokenHash};
use crate::upstream::translate::chat_request;
use serde_json::{Map, Value, json};

/// A Responses request ready to record and send.
pub(super) struct Prepared {
    /// The conversation it continues, when it continues one.
    pub conversation_id: Option<String>,
    /// How many items at the start of `input` are the conversation before it.
    pub history_items: usize,
    pub bodies: Bodies,
}

impl Engine {
    /// Resolves `previous` into `parameters.input` (the conversation's items, then the caller's own) and builds
    /// the upstream bodies. `key` is the caller's service key hash: a previous response made with another key is
    /// not found. `has_responses_api`: what is known of the first upstream it goes to (a request that cannot be
    /// translated is refused at once for one known to have only Chat Completions).
    pub(super) async fn prepare_response(
        &self,
        parameters: &mut Map<String, Value>,
        previous: Option<RequestId>,
        key: Option<&TokenHash>,
        has_responses_api: Option<bool>,
    ) -> Result<Prepared, CreateError> {
        let (conversation_id, history) = match previous {
            Some(id) => {
                let (conversation, items) = self.previous_items(id, key).await?;
                (Some(conversation), items)
            }
            None => (None, Vec::new()),
        };
        let own = match parameters.get("input") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(text)) => vec![json!({"role": "user", "content": text})],
            Some(Value::Array(items)) => items.clone(),
            Some(_) => {
                return Err(CreateError::Untranslatable {
                    param: "input",
                    message: "`input` must be a string or a list of items".into(),
                });
            }
        };

        // Translated for an upstream with only Chat Completions: the caller's own request, after the history.
        let mut own_request = parameters.clone();
        own_request.insert("input".into(), Value::Array(own.clone()));
        let chat = chat_request(&Value::Object(own_request), &history).map(|mut chat| {
            chat["stream"] = json!(true);
            chat["stream_options"] = json!({"include_usage": true});
            // The built-in mock's controls travel with the call, so that one test drives both kinds of upstream.
            if let Some(mock) = parameters.get("mock") {
                chat["mock"] = mock.clone();
            }
            chat.to_string()
        });
        if let (Err(e), Some(false)) = (&chat, has_responses_api) {
            return Err(CreateError::Untranslatable { param: e.param, message: e.message.clone() });
        }

        // As it is for an upstream with the Responses API: this server runs the background part and holds the
        // conversation, so `background` and `previous_response_id` stay here; the earlier items go along without
        // their ids (which name items of this server's record, not the upstream's).
        let mut upstream = parameters.clone();
        upstream.shift_remove("background");
        upstream.shift_remove("previous_response_id");
        upstream.insert("stream".into(), json!(true));
        // Reasoning items are left out: without their ids they name nothing the upstream can use.
        let earlier = history.iter().filter(|item| item.get("type").and_then(Value::as_str) != Some("reasoning"));
        let mut input: Vec<Value> = earlier.cloned().map(without_id).collect();
        input.extend(own.iter().cloned());
        upstream.insert("input".into(), Value::Array(input));
        let responses = Value::Object(upstream).to_string();

        let history_items = history.len();
        let mut all = history;
        all.extend(own);
        parameters.insert("input".into(), Value::Array(all));
        Ok(Prepared {
            conversation_id,
            history_items,
            bodies: Bodies::Responses { responses, chat: chat.map_err(|e| e.message) },
        })
    }

    /// The previous response's conversation id and items: its input (its own history included), then its output.
    async fn previous_items(
        &self,
        id: RequestId,
        key: Option<&TokenHash>,
    ) -> Result<(String, Vec<Value>), CreateError> {
        let not_found = || CreateError::PreviousNotFound(id.response_id());
        let found = self.find_response(id, true).await?.ok_or_else(not_found)?;
        let meta = found.meta();
        if meta.bearer.is_some() && meta.bearer.as_ref() != key {
            return Err(not_found());
        }
        let status = found.status();
        if !status.is_final() {
            // As this API names a running response's status.
            let shown = if status == crate::domain::Status::Pending { "queued" } else { "in_progress" };
            return Err(CreateError::PreviousNotFinished(id.response_id(), shown));
        }
        let (parameters, body) = found.parameters_and_body();
        let mut items = match parameters.get("input") {
            Some(Value::Array(items)) => items.clone(),
            _ => Vec::new(),
        };
        if let Some(Value::Array(output)) = body.get("output") {
            items.extend(output.iter().cloned());
        }
        Ok((meta.conversation_id.clone(), items))
    }
}

fn without_id(mut item: Value) -> Value {
    if let Value::Object(fields) = &mut item {
        fields.shift_remove("id");
    }
    item
}
