//! The wire format of the event stream (`.txt`).

use crate::document::ErrorInfo;
use crate::domain::Status;
use bytes::{Bytes, BytesMut};
use serde_json::json;

/// One event: `id: n`, the chunk as `data:` lines (one per line of the chunk), a blank line.
pub fn frame(seq: u64, data: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(frame_len(seq, data));
    write_frame(&mut out, seq, data);
    out.freeze()
}

/// The length of [`frame`]'s output.
fn frame_len(seq: u64, data: &str) -> usize {
    let lines = data.bytes().filter(|b| *b == b'\n').count() + 1;
    "id: ".len()
        + seq.checked_ilog10().map_or(1, |log| log as usize + 1)
        + 1
        + lines * ("data: ".len() + 1)
        + (data.len() + 1 - lines)
        + 1
}

/// Appends the frame to `out`; returns where the chunk starts in what was appended.
fn write_frame(out: &mut BytesMut, seq: u64, data: &str) -> usize {
    let at = out.len();
    out.extend_from_slice(b"id: ");
    out.extend_from_slice(itoa(seq).as_bytes());
    out.extend_from_slice(b"\n");
    let start = out.len() - at + "data: ".len();
    for line in data.split('\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\n");
    }
    out.extend_from_slice(b"\n");
    start
}

/// The smallest and largest block [`Frames`] writes frames into.
const BLOCK_MIN: usize = 1024;
const BLOCK_MAX: usize = 4096;

/// Frames written one after another into shared blocks: each frame is a slice of its block, so a request's
/// events cost one allocation per block instead of two per event (the frame and, once sliced for the store, its
/// shared header). A block is as large as what was framed so far, between [`BLOCK_MIN`] and [`BLOCK_MAX`]
/// (larger for a larger frame), so a short stream does not hold a large block.
#[derive(Default)]
pub struct Frames {
    block: BytesMut,
    framed: usize,
}

impl Frames {
    /// The frame of event `seq` (as [`frame`]), and the chunk as a slice of it when it is one line (the usual
    /// case), so that the store gets the chunk without another copy. Written into the current block, or a new one
    /// when the frame does not fit.
    pub fn framed(&mut self, seq: u64, data: &str) -> (Bytes, Option<Bytes>) {
        let len = frame_len(seq, data);
        if self.block.capacity() - self.block.len() < len {
            self.block = BytesMut::with_capacity(self.framed.clamp(BLOCK_MIN, BLOCK_MAX).max(len));
        }
        let start = write_frame(&mut self.block, seq, data);
        self.framed += len;
        // Only the bytes written so far move out; the block keeps its spare capacity for the next frames.
        let frame = self.block.split().freeze();
        let slice = (!data.contains('\n')).then(|| frame.slice(start..start + data.len()));
        (frame, slice)
    }
}

fn itoa(n: u64) -> String {
    n.to_string()
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
        let (frame, data) = Frames::default().framed(12, "{\"a\":1}");
        assert_eq!(&frame[..], b"id: 12\ndata: {\"a\":1}\n\n");
        assert_eq!(&data.unwrap()[..], b"{\"a\":1}");
        assert!(Frames::default().framed(1, "a\nb").1.is_none());
    }

    #[test]
    fn frames_share_blocks_and_match_single_frames() {
        let mut frames = Frames::default();
        let long = "x".repeat(5000);
        let chunks = ["{\"a\":1}", "a\nb", "", long.as_str(), "{\"b\":2}", "last"];
        let mut previous: Option<Bytes> = None;
        for (i, chunk) in chunks.iter().enumerate() {
            let seq = i as u64 + 9;
            let (frame, data) = frames.framed(seq, chunk);
            assert_eq!(frame, super::frame(seq, chunk));
            assert_eq!(frame.len(), frame_len(seq, chunk));
            assert_eq!(data.as_deref(), (!chunk.contains('\n')).then_some(chunk.as_bytes()));
            // Frames follow one another in a block; the long frame got a block of its own, full at once.
            let same_block = matches!(i, 1 | 2 | 5);
            if let Some(previous) = previous.take() {
                assert_eq!(previous.as_ptr_range().end == frame.as_ptr(), same_block, "frame {i}");
            }
            previous = Some(frame);
        }
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
