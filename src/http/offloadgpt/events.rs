//! The OffloadGPT event stream's end (`.txt`), after the events the core relays as they are.

use crate::document::ErrorInfo;
use crate::domain::Status;
use crate::engine::live::End;
use bytes::Bytes;
use serde_json::json;

/// [`tail`] of how a request ended: the reader loop's ending for this API.
pub fn ending(end: &End) -> Bytes {
    tail(end.status, end.error.as_ref(), end.events)
}

/// The end of every stream: for `error` and `stop` a named event first (clients that only listen to
/// `onmessage` never see it), then `data: [DONE]`. When there were no events at all, `[DONE]` carries `id: 0`
/// so that a reconnecting `EventSource` sends `Last-Event-ID: 0` and is told 204 instead of replaying forever.
pub fn tail(status: Status, error: Option<&ErrorInfo>, event_count: u64) -> Bytes {
    let mut out = String::new();
    let named = match status {
        Status::Error => Some(("error", json!({"status": "error", "error": error}))),
        Status::Stop => Some((
            "stop",
            json!({"status": "stop", "error": {"code": "stopped", "message": "The request was stopped through its stop_url."}}),
        )),
        _ => None,
    };
    if let Some((name, data)) = named {
        out.push_str("event: ");
        out.push_str(name);
        out.push_str("\ndata: ");
        out.push_str(&data.to_string());
        out.push_str("\n\n");
    }
    if event_count == 0 {
        out.push_str("id: 0\n");
    }
    out.push_str("data: [DONE]\n\n");
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_tail_names_the_event_before_done() {
        let t = tail(Status::Error, Some(&ErrorInfo::new("timeout", "slow")), 2);
        let text = std::str::from_utf8(&t).unwrap();
        assert!(text.starts_with("event: error\ndata: {"));
        assert!(text.ends_with("\n\ndata: [DONE]\n\n"));
        assert_eq!(&tail(Status::Done, None, 0)[..], b"id: 0\ndata: [DONE]\n\n");
    }
}
