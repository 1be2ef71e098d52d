//! Server-sent events as every API relays a request's chunks: each chunk framed once, with its sequence number
//! as the event's `id`, and shared by every reader. How a stream ends is each API's own (`http::offloadgpt`,
//! `http::chat_completions`).

use bytes::Bytes;

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
}
