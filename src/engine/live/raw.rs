//! Records the raw upstream response (`.raw`) without storing a stream's body twice.
//!
//! An OpenAI-shaped stream body is exactly `data: <chunk>\n\n` per event, then `data: [DONE]\n\n`: the events,
//! which are stored anyway. While what arrives matches that framing byte for byte, the recorder stores only a
//! placeholder ("the events go here") and `.raw` is rebuilt from the events. At the first byte that differs (a
//! comment, `data:` without a space, CRLF, multi-line data), it cuts the placeholder to the events before that
//! point and records every piece verbatim from there on, so `.raw` is exact either way.
//!
//! The parser gets the same bytes minus any byte order mark at the start ([`SkipBom`]); the recorder keeps it.

use crate::store::{RawCursor, RawPiece};
use bytes::{Buf, Bytes, BytesMut};

/// A piece to store: its sequence number (from 1) and the piece.
pub type Stored = (u64, RawPiece);

#[derive(Debug)]
enum Mode {
    /// Pieces are kept as they come.
    Verbatim,
    /// Everything so far matched the canonical framing; `pending` holds bytes not yet matched to an event (at
    /// most a partial event); `placeholder` is the index of the events placeholder once written.
    Canonical { pending: BytesMut, placeholder: Option<usize> },
}

#[derive(Debug)]
pub struct RawRecorder {
    pieces: Vec<RawPiece>,
    mode: Mode,
}

impl Default for RawRecorder {
    fn default() -> Self {
        Self { pieces: Vec::new(), mode: Mode::Verbatim }
    }
}

/// Whether `pending` starts with the event as a canonical upstream frames it (`data: <data>\n\n`), and that
/// frame's length.
fn starts_with_canonical(pending: &[u8], data: &str) -> (bool, usize) {
    let len = "data: ".len() + data.len() + 2;
    let matches = pending.len() >= len
        && pending.starts_with(b"data: ")
        && &pending[6..6 + data.len()] == data.as_bytes()
        && &pending[6 + data.len()..len] == b"\n\n";
    (matches, len)
}

/// How much of a stored event frame (`id: n\ndata: ...\n\n`) is its `id:` line: the rest is the event as the
/// upstream sent it.
fn id_line_len(frame: &[u8]) -> usize {
    match frame.iter().position(|b| *b == b'\n') {
        Some(end) if frame.starts_with(b"id: ") => end + 1,
        _ => 0,
    }
}

impl RawRecorder {
    fn push(&mut self, piece: RawPiece) -> Stored {
        self.pieces.push(piece.clone());
        (self.pieces.len() as u64, piece)
    }

    /// Any piece before the body (the status line and headers), and every piece of a non-stream body.
    pub fn verbatim(&mut self, bytes: Bytes) -> Stored {
        self.push(RawPiece::Bytes(bytes))
    }

    /// The body that follows is an event stream: try the canonical framing.
    pub fn start_stream(&mut self) {
        self.mode = Mode::Canonical { pending: BytesMut::new(), placeholder: None };
    }

    /// Bytes of the stream body as received.
    pub fn received(&mut self, bytes: Bytes) -> Option<Stored> {
        match &mut self.mode {
            Mode::Verbatim => Some(self.push(RawPiece::Bytes(bytes))),
            Mode::Canonical { pending, .. } => {
                pending.extend_from_slice(&bytes);
                None
            }
        }
    }

    /// The parser yielded an event with `data`, after `events_before` events: what to store now.
    pub fn event(&mut self, data: &str, events_before: u64) -> Vec<Stored> {
        let Mode::Canonical { pending, placeholder } = &mut self.mode else { return Vec::new() };
        let (canonical, len) = starts_with_canonical(pending, data);
        if !canonical {
            return self.diverge(events_before);
        }
        pending.advance(len);
        if placeholder.is_some() {
            return Vec::new();
        }
        *placeholder = Some(self.pieces.len());
        vec![self.push(RawPiece::Events { through: None })]
    }

    /// The parser yielded `data: [DONE]`, after `events` events.
    pub fn done(&mut self, events: u64) -> Vec<Stored> {
        const DONE: &[u8] = b"data: [DONE]\n\n";
        let Mode::Canonical { pending, .. } = &mut self.mode else { return Vec::new() };
        if !pending.starts_with(DONE) {
            return self.diverge(events);
        }
        pending.advance(DONE.len());
        vec![self.push(RawPiece::Bytes(Bytes::from_static(DONE)))]
    }

    /// The parser yielded an event that is kept out of the events (a usage-only chunk the caller did not ask
    /// for), after `events_before` events: the raw response keeps it, as it came, like everything after it.
    pub fn not_an_event(&mut self, events_before: u64) -> Vec<Stored> {
        self.diverge(events_before)
    }

    /// The framing differs from here on: the placeholder covers only the events before, and the bytes not yet
    /// matched (this event's among them) are stored as they came, like everything after them.
    fn diverge(&mut self, events_before: u64) -> Vec<Stored> {
        let Mode::Canonical { pending, placeholder } = std::mem::replace(&mut self.mode, Mode::Verbatim) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if let Some(index) = placeholder {
            let cut = RawPiece::Events { through: Some(events_before) };
            self.pieces[index] = cut.clone();
            out.push((index as u64 + 1, cut));
        }
        if !pending.is_empty() {
            out.push(self.push(RawPiece::Bytes(pending.freeze())));
        }
        out
    }

    /// The response ended (or was cut off): bytes received but never matched to an event are stored as they are.
    pub fn finish(&mut self) -> Option<Stored> {
        match &mut self.mode {
            Mode::Canonical { pending, .. } if !pending.is_empty() => {
                let rest = pending.split().freeze();
                Some(self.push(RawPiece::Bytes(rest)))
            }
            _ => None,
        }
    }

    /// A page of the raw response so far, given the event frames received, from `from`: handles to the bytes
    /// (nothing is copied but a partial event not yet matched), added while the page holds less than
    /// `max_bytes`; and where the next page starts, `None` once the end was reached. Pages are cut between
    /// pieces and between events, so that what is appended between two pages (events, a placeholder cut by a
    /// divergence, which only ever covers events already there) reads as if it had been there from the start.
    pub fn page(&self, frames: &[Bytes], from: RawCursor, max_bytes: usize) -> (Vec<Bytes>, Option<RawCursor>) {
        let mut out = Vec::new();
        let mut len = 0;
        let mut index = usize::try_from(from.piece.max(1) - 1).unwrap_or(usize::MAX);
        let mut after = usize::try_from(from.event).unwrap_or(usize::MAX);
        while let Some(piece) = self.pieces.get(index) {
            let here = |after: usize| RawCursor { piece: index as u64 + 1, event: after as u64 };
            if len >= max_bytes {
                return (out, Some(here(after)));
            }
            match piece {
                RawPiece::Bytes(bytes) => {
                    len += bytes.len();
                    out.push(bytes.clone());
                }
                RawPiece::Events { through } => {
                    let n = through.map_or(frames.len(), |t| (t as usize).min(frames.len()));
                    for frame in frames.get(after..n).unwrap_or_default() {
                        if len >= max_bytes {
                            return (out, Some(here(after)));
                        }
                        let event = frame.slice(id_line_len(frame)..);
                        len += event.len();
                        out.push(event);
                        after += 1;
                    }
                }
            }
            index += 1;
            after = 0;
        }
        if let Mode::Canonical { pending, .. } = &self.mode
            && !pending.is_empty()
        {
            out.push(Bytes::copy_from_slice(pending));
        }
        (out, None)
    }

    /// The whole raw response so far, given the event frames received.
    pub fn render(&self, frames: &[Bytes]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut cursor = Some(RawCursor::default());
        while let Some(from) = cursor {
            let (pieces, next) = self.page(frames, from, 64 * 1024);
            pieces.iter().for_each(|p| out.extend_from_slice(p));
            cursor = next;
        }
        out
    }
}

/// The UTF-8 byte order mark.
const BOM: &[u8] = b"\xef\xbb\xbf";

/// Takes the byte order marks off the start of a stream body on its way into the SSE parser.
///
/// The event stream format allows one there (the parser, `upstream::events`, takes none off itself; the crate
/// used before it panicked on one). Bytes that may still be the start of a mark are held back until the next
/// piece tells.
#[derive(Debug, Default)]
pub struct SkipBom {
    held: Vec<u8>,
    past: bool,
}

impl SkipBom {
    /// What the parser gets of the next piece received (possibly nothing yet).
    pub fn feed(&mut self, bytes: Bytes) -> Bytes {
        if self.past {
            return bytes;
        }
        let mut rest = if self.held.is_empty() {
            bytes
        } else {
            let mut held = std::mem::take(&mut self.held);
            held.extend_from_slice(&bytes);
            Bytes::from(held)
        };
        while rest.starts_with(BOM) {
            rest.advance(BOM.len());
        }
        if rest.len() < BOM.len() && BOM.starts_with(&rest) {
            self.held = rest.to_vec();
            return Bytes::new();
        }
        self.past = true;
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::sse::frame;

    /// Feeds a body in the given network pieces, the way the worker does, and returns what was stored and
    /// what `.raw` shows.
    fn record(pieces: &[&str], events: &[&str], saw_done: bool) -> (Vec<Stored>, Vec<u8>) {
        let mut r = RawRecorder::default();
        let mut stored = vec![r.verbatim(Bytes::from_static(b"HTTP/1.1 200 OK\r\n\r\n"))];
        r.start_stream();
        for piece in pieces {
            stored.extend(r.received(Bytes::copy_from_slice(piece.as_bytes())));
        }
        let mut frames = Vec::new();
        for (i, data) in events.iter().enumerate() {
            stored.extend(r.event(data, i as u64));
            frames.push(frame(i as u64 + 1, data));
        }
        if saw_done {
            stored.extend(r.done(events.len() as u64));
        }
        stored.extend(r.finish());
        let rendered = r.render(&frames);
        (stored, rendered)
    }

    #[test]
    fn a_canonical_stream_stores_only_a_placeholder_and_renders_exactly() {
        let body = "data: {\"a\":1}\n\ndata: {\"a\":2}\n\ndata: [DONE]\n\n";
        let (stored, raw) = record(&[&body[..10], &body[10..]], &["{\"a\":1}", "{\"a\":2}"], true);
        assert_eq!(raw, format!("HTTP/1.1 200 OK\r\n\r\n{body}").into_bytes());
        let pieces: Vec<_> = stored.into_iter().map(|(_, p)| p).collect();
        assert!(matches!(pieces[1], RawPiece::Events { through: None }));
        assert!(matches!(&pieces[2], RawPiece::Bytes(b) if &b[..] == b"data: [DONE]\n\n"));
        assert_eq!(pieces.len(), 3, "the head, the placeholder and [DONE]");
    }

    #[test]
    fn a_different_framing_switches_to_verbatim_and_stays_exact() {
        let body = "data: {\"a\":1}\n\n: keep-alive\n\ndata:{\"a\":2}\r\n\r\ndata: [DONE]\n\n";
        let (stored, raw) = record(&[body], &["{\"a\":1}", "{\"a\":2}"], true);
        assert_eq!(raw, format!("HTTP/1.1 200 OK\r\n\r\n{body}").into_bytes());
        assert!(stored.iter().any(|(seq, p)| *seq == 2 && matches!(p, RawPiece::Events { through: Some(1) })));
    }

    #[test]
    fn a_stream_cut_off_mid_event_keeps_the_partial_bytes() {
        let (stored, raw) = record(&["data: {\"a\":1}\n\ndata: {\"a\""], &["{\"a\":1}"], false);
        assert_eq!(raw, b"HTTP/1.1 200 OK\r\n\r\ndata: {\"a\":1}\n\ndata: {\"a\"".to_vec());
        assert!(matches!(&stored.last().unwrap().1, RawPiece::Bytes(b) if &b[..] == b"data: {\"a\""));
    }

    #[test]
    fn byte_order_marks_at_the_start_are_skipped_however_the_body_is_split() {
        let body = b"\xef\xbb\xbf\xef\xbb\xbfdata: \xef\xbb\xbf\n\n";
        for cut in 0..=body.len() {
            let mut skip = SkipBom::default();
            let mut out = skip.feed(Bytes::copy_from_slice(&body[..cut])).to_vec();
            out.extend_from_slice(&skip.feed(Bytes::copy_from_slice(&body[cut..])));
            assert_eq!(out, b"data: \xef\xbb\xbf\n\n", "cut at {cut}");
        }
        let mut skip = SkipBom::default();
        assert!(skip.feed(Bytes::from_static(b"\xef\xbb")).is_empty(), "maybe a mark: held");
        assert_eq!(&skip.feed(Bytes::from_static(b"!"))[..], b"\xef\xbb!", "not a mark after all");
    }

    #[test]
    fn pages_of_any_size_add_up_to_the_whole_and_copy_no_event() {
        let body = "data: {\"a\":1}\n\ndata: {\"a\":2}\n\ndata: {\"a\":3}\n\ndata: [DO";
        let mut r = RawRecorder::default();
        r.verbatim(Bytes::from_static(b"HTTP/1.1 200 OK\r\n\r\n"));
        r.start_stream();
        r.received(Bytes::copy_from_slice(body.as_bytes()));
        let mut frames = Vec::new();
        for (i, data) in ["{\"a\":1}", "{\"a\":2}", "{\"a\":3}"].iter().enumerate() {
            r.event(data, i as u64);
            frames.push(frame(i as u64 + 1, data));
        }
        let whole = format!("HTTP/1.1 200 OK\r\n\r\n{body}").into_bytes();
        for max in 1..=whole.len() + 1 {
            let (mut out, mut cursor, mut pages) = (Vec::new(), Some(RawCursor::default()), 0);
            while let Some(from) = cursor {
                let (pieces, next) = r.page(&frames, from, max);
                pieces.iter().for_each(|p| out.extend_from_slice(p));
                cursor = next;
                pages += 1;
            }
            assert_eq!(out, whole, "pages of {max} bytes");
            assert!(pages <= 6, "{pages} pages of {max} bytes");
        }
        let (pieces, _) = r.page(&frames, RawCursor::default(), usize::MAX);
        assert_eq!(pieces[1].as_ptr(), frames[0][id_line_len(&frames[0])..].as_ptr(), "an event is not copied");
    }

    #[test]
    fn a_non_stream_body_is_verbatim() {
        let mut r = RawRecorder::default();
        r.verbatim(Bytes::from_static(b"H\r\n\r\n"));
        assert!(r.received(Bytes::from_static(b"{\"x\":")).is_some());
        assert!(r.received(Bytes::from_static(b"1}")).is_some());
        assert_eq!(r.render(&[]), b"H\r\n\r\n{\"x\":1}".to_vec());
    }
}
