//! Server-sent events as every API relays a request's chunks: each chunk framed once, with its sequence number
//! as the event's `id`, and shared by every reader. How a stream ends is each API's own (`http::offloadgpt`,
//! `http::chat_completions`).

use crate::domain::Format;
use bytes::Bytes;

/// One event: `id: n`, the chunk as `data:` lines (one per line of the chunk), a blank line.
pub fn frame(seq: u64, data: &str) -> Bytes {
    framed(seq, data).0
}

/// The frame, and the chunk as a slice of it when it is one line (the usual case), so that the store gets the
/// chunk without another copy.
pub fn framed(seq: u64, data: &str) -> (Bytes, Option<Bytes>) {
    // Once per relayed chunk: the line breaks are found with `memchr` and the number written by `itoa`, not `fmt`
    // (together a tenth of a chunk's instructions before; measured, docs/DECISIONS.md).
    let lines = memchr::memchr_iter(b'\n', data.as_bytes()).count() + 1;
    let mut number = itoa::Buffer::new();
    let id = number.format(seq);
    // Exactly the frame's length: one allocation, which `Bytes` then takes over as it is.
    let len = "id: ".len() + id.len() + 1 + lines * ("data: ".len() + 1) + (data.len() + 1 - lines) + 1;
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(b"id: ");
    out.extend_from_slice(id.as_bytes());
    out.push(b'\n');
    let start = out.len() + "data: ".len();
    if lines == 1 {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(data.as_bytes());
        out.push(b'\n');
    } else {
        for line in data.split('\n') {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
        }
    }
    out.push(b'\n');
    debug_assert_eq!(out.len(), len);
    let frame = Bytes::from(out);
    let slice = (lines == 1).then(|| frame.slice(start..start + data.len()));
    (frame, slice)
}

/// One Responses API event: `id: n`, `event: <type>`, the event's JSON as one `data:` line, a blank line; and
/// the JSON as a slice of the frame, for the store. `data` is compact JSON, which has no line break.
pub fn named(seq: u64, kind: &str, data: &str) -> (Bytes, Bytes) {
    let mut number = itoa::Buffer::new();
    let id = number.format(seq);
    let mut out = Vec::with_capacity("id: \nevent: \ndata: \n\n".len() + id.len() + kind.len() + data.len());
    for part in [b"id: ", id.as_bytes(), b"\nevent: ", kind.as_bytes(), b"\ndata: "] {
        out.extend_from_slice(part);
    }
    let start = out.len();
    out.extend_from_slice(data.as_bytes());
    out.extend_from_slice(b"\n\n");
    let frame = Bytes::from(out);
    let slice = frame.slice(start..start + data.len());
    (frame, slice)
}

/// The frame of a stored event of a request whose record is in `format`: the same bytes as when it was live.
pub fn frame_as(format: Format, seq: u64, data: &str) -> Bytes {
    match format {
        Format::Chat => frame(seq, data),
        Format::Responses => named(seq, &event_type(data), data).0,
    }
}

/// The `type` of a Responses event.
fn event_type(data: &str) -> String {
    #[derive(serde::Deserialize)]
    struct Typed {
        #[serde(rename = "type", default)]
        kind: String,
    }
    serde_json::from_str::<Typed>(data).map(|t| t.kind).unwrap_or_default()
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
    fn a_responses_event_is_named_and_framed_alike_live_and_stored() {
        let data = r#"{"type":"response.output_text.delta","sequence_number":4,"delta":"hi"}"#;
        let (frame, slice) = named(5, "response.output_text.delta", data);
        assert_eq!(&frame[..], format!("id: 5\nevent: response.output_text.delta\ndata: {data}\n\n").as_bytes());
        assert_eq!(&slice[..], data.as_bytes());
        assert_eq!(frame_as(Format::Responses, 5, data), frame);
    }

    #[test]
    fn every_number_of_digits_is_written_as_format_would() {
        for seq in [0, 1, 9, 10, 99, 100, 12345, u64::from(u32::MAX), u64::MAX] {
            assert_eq!(&frame(seq, "x")[..], format!("id: {seq}\ndata: x\n\n").as_bytes());
        }
    }

    #[test]
    fn multi_line_data_becomes_several_data_lines() {
        assert_eq!(&frame(3, "{\"a\":\n1}")[..], b"id: 3\ndata: {\"a\":\ndata: 1}\n\n");
    }
}
