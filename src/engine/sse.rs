//! The wire format of the event stream (`.txt`).

use crate::document::ErrorInfo;
use crate::domain::Status;
use bytes::Bytes;
use serde_json::json;

/// One event: `id: n`, the chunk as `data:` lines (one per line of the chunk), a blank line.
pub fn frame(seq: u64, data: &str) -> Bytes {
    framed(seq, data).0
}

/// The frame, and the chunk as a slice of it when it is one line (the usual case), so that the store gets the
/// chunk without another copy.
pub fn framed(seq: u64, data: &str) -> (Bytes, Option<Bytes>) {
    use std::io::Write;
    let lines = data.bytes().filter(|b| *b == b'\n').count() + 1;
    // Exactly the frame's length: one allocation, which `Bytes` then takes over as it is.
    let len = "id: ".len() + digits(seq) + 1 + lines * ("data: ".len() + 1) + (data.len() + 1 - lines) + 1;
    let mut out = Vec::with_capacity(len);
    // Writing to a Vec cannot fail.
    let _ = writeln!(out, "id: {seq}");
    let start = out.len() + "data: ".len();
    for line in data.split('\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
    debug_assert_eq!(out.len(), len);
    let frame = Bytes::from(out);
    let slice = (lines == 1).then(|| frame.slice(start..start + data.len()));
    (frame, slice)
}

/// Decimal digits of `n`.
fn digits(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |d| d as usize + 1)
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

/// Sent every so often while nothing else is, so that proxies keep the connection open.
pub const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_one_line_chunk_is_a_slice_of_its_frame() {
        let (frame, data) = framed(12, "{\"a\":1}");
        assert_eq!(&frame[..], b"id: 12\ndata: {\"a\":1}\n\n");
        assert_eq!(&data.unwrap()[..], b"{\"a\":1}");
        assert!(framed(1, "a\nb").1.is_none());
    }

    #[test]
    fn multi_line_data_becomes_several_data_lines() {
        assert_eq!(&frame(3, "{\"a\":\n1}")[..], b"id: 3\ndata: {\"a\":\ndata: 1}\n\n");
    }

    #[test]
    fn error_tail_names_the_event_before_done() {
        let t = tail(Status::Error, Some(&ErrorInfo::new("timeout", "slow")), 2);
        let text = std::str::from_utf8(&t).unwrap();
        assert!(text.starts_with("event: error\ndata: {"));
        assert!(text.ends_with("\n\ndata: [DONE]\n\n"));
        assert_eq!(&tail(Status::Done, None, 0)[..], b"id: 0\ndata: [DONE]\n\n");
    }
}
