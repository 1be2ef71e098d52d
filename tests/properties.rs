//! Properties of the path an upstream event stream takes, at the level of its types and without a server: the
//! bytes go through the event parser (as the worker feeds them from reqwest) and the raw recorder, split into
//! chunks the way a network splits them.
//!
//! - The events parsed are the same whatever the split, and the same as `eventsource-stream` (the crate the
//!   parser replaced, for its quadratic time) parses.
//! - The raw response rebuilt by the recorder is byte-identical to what was received, both as the recorder
//!   renders it live and as the store rebuilds it from the pieces it was given (the recorder's promise).

#![expect(clippy::unwrap_used, reason = "a test fails loudly on anything unexpected")]

use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures_util::{FutureExt, StreamExt};
use offload::engine::live::raw::{RawRecorder, SkipBom, Stored};
use offload::engine::sse::frame;
use offload::store::RawPiece;
use offload::upstream::events::EventParser;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::convert::Infallible;

const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n";

/// Far above any event of these tests.
const MAX_EVENT: usize = 1 << 20;

/// The data of the events of a body cut into `chunks`, and whether the parser gave up with an error. Like the
/// worker, the parser gets the body without a leading byte order mark.
fn parse(chunks: &[Bytes]) -> (Vec<String>, bool) {
    let mut skip_bom = SkipBom::default();
    let mut parser = EventParser::new(MAX_EVENT);
    let mut seen = Vec::new();
    for chunk in chunks {
        if parser.feed(&skip_bom.feed(chunk.clone()), &mut seen).is_err() {
            return (seen, true);
        }
    }
    (seen, false)
}

/// The data of the events `eventsource-stream` parses from the same chunks (it panics on a byte order mark, so
/// it gets the body without it too).
fn parse_with_eventsource_stream(chunks: &[Bytes]) -> (Vec<String>, bool) {
    let mut skip_bom = SkipBom::default();
    let mut stream = futures_util::stream::iter(chunks.iter().cloned().map(Ok::<_, Infallible>))
        .map(move |piece| piece.map(|bytes| skip_bom.feed(bytes)))
        .eventsource();
    let mut seen = Vec::new();
    // An in-memory stream is always ready.
    while let Some(next) = stream.next().now_or_never().unwrap() {
        match next {
            Ok(e) => seen.push(e.data),
            Err(_) => return (seen, true),
        }
    }
    (seen, false)
}

/// What the worker records of a stream body received in `chunks`.
struct Recorded {
    /// The data of every event kept (not `[DONE]`).
    events: Vec<String>,
    /// `.raw` while the request is live.
    rendered: Vec<u8>,
    /// `.raw` as the store rebuilds it from the pieces it was sent.
    stored: Vec<u8>,
}

/// The worker's loop (`stream_body`): each piece goes to the recorder as it arrives (with its byte order mark),
/// then to the parser, and each event it completes to the recorder; `[DONE]` ends the reading; what is left
/// over is recorded at the end.
fn record(chunks: &[Bytes]) -> Recorded {
    let mut recorder = RawRecorder::default();
    let mut stored: Vec<Stored> = vec![recorder.verbatim(Bytes::from_static(HEAD))];
    recorder.start_stream();
    let mut skip_bom = SkipBom::default();
    let mut parser = EventParser::new(MAX_EVENT);
    let mut events: Vec<String> = Vec::new();
    let mut parsed = Vec::new();
    'read: for chunk in chunks {
        stored.extend(recorder.received(chunk.clone()));
        let result = parser.feed(&skip_bom.feed(chunk.clone()), &mut parsed);
        for data in parsed.drain(..) {
            if data.trim() == "[DONE]" {
                stored.extend(recorder.done(events.len() as u64));
                break 'read;
            }
            stored.extend(recorder.event(&data, events.len() as u64));
            events.push(data);
        }
        if result.is_err() {
            break;
        }
    }
    stored.extend(recorder.finish());

    let frames: Vec<Bytes> = events.iter().enumerate().map(|(i, data)| frame(i as u64 + 1, data)).collect();
    let rendered = recorder.render(&frames);
    // The store keeps the last version of each piece (a placeholder is rewritten when it is cut) and expands a
    // placeholder as `data: <chunk>\n\n` per stored event.
    let pieces: BTreeMap<u64, RawPiece> = stored.into_iter().collect();
    let mut rebuilt = Vec::new();
    for piece in pieces.values() {
        match piece {
            RawPiece::Bytes(bytes) => rebuilt.extend_from_slice(bytes),
            RawPiece::Events { through } => {
                let n = through.map_or(events.len(), |t| (t as usize).min(events.len()));
                for data in &events[..n] {
                    rebuilt.extend_from_slice(format!("data: {data}\n\n").as_bytes());
                }
            }
        }
    }
    Recorded { events, rendered, stored: rebuilt }
}

/// Chunk text: no line breaks or brackets (so never `[DONE]` by chance), some of it several bytes per character
/// so that splits fall inside characters.
fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 {}\":,.é€😀]{0,16}"
}

/// One block of an event stream: mostly OpenAI's framing, and every departure from it that servers send.
fn block() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => text().prop_map(|d| format!("data: {d}\n\n")),
        1 => text().prop_map(|d| format!("data:{d}\n\n")),
        1 => text().prop_map(|d| format!("data: {d}\r\n\r\n")),
        1 => text().prop_map(|d| format!("data: {d}\r\r")),
        1 => (text(), text()).prop_map(|(a, b)| format!("data: {a}\ndata: {b}\n\n")),
        1 => text().prop_map(|c| format!(":{c}\n\n")),
        1 => Just(": ping\n".to_owned()),
        1 => text().prop_map(|d| format!("event: note\ndata: {d}\n\n")),
        1 => text().prop_map(|d| format!("id: 7\ndata: {d}\n\n")),
        1 => Just("\n".to_owned()),
        1 => Just("retry: 100\n\n".to_owned()),
        1 => Just("data\n\n".to_owned()),
    ]
}

/// How a stream ends: OpenAI's `[DONE]`, another framing of it, nothing, or cut off mid-event.
fn ending() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just("data: [DONE]\n\n".to_owned()),
        1 => Just("data:[DONE]\n\n".to_owned()),
        1 => Just("data: [DONE]\r\n\r\n".to_owned()),
        1 => Just(String::new()),
        1 => text().prop_map(|d| format!("data: {d}")),
        1 => text().prop_map(|d| format!("data: {d}\n")),
    ]
}

/// Blocks and an ending, now and then after a byte order mark (which the SSE format allows at the start).
fn body() -> impl Strategy<Value = Vec<u8>> {
    (prop::bool::weighted(0.1), prop::collection::vec(block(), 0..12), ending()).prop_map(|(bom, blocks, end)| {
        let mut body = if bom { "\u{feff}".to_owned() } else { String::new() };
        body.push_str(&blocks.concat());
        body.push_str(&end);
        body.into_bytes()
    })
}

/// `body` and the same bytes cut at arbitrary places (anywhere, inside a character too).
fn split_body() -> impl Strategy<Value = (Vec<u8>, Vec<Bytes>)> {
    body()
        .prop_flat_map(|body| {
            let len = body.len();
            (Just(body), prop::collection::vec(0..=len, 0..8))
        })
        .prop_map(|(body, mut cuts)| {
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut start = 0;
            for cut in cuts.into_iter().chain([body.len()]) {
                chunks.push(Bytes::copy_from_slice(&body[start..cut]));
                start = cut;
            }
            (body, chunks)
        })
}

fn expected_raw(body: &[u8]) -> Vec<u8> {
    [HEAD, body].concat()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_events_parsed_do_not_depend_on_how_the_body_was_split((body, chunks) in split_body()) {
        let whole = parse(&[Bytes::from(body.clone())]);
        prop_assert_eq!(parse(&chunks), whole.clone(), "split as {:?}", chunks);
        let bytewise: Vec<Bytes> = body.iter().map(|b| Bytes::copy_from_slice(&[*b])).collect();
        prop_assert_eq!(parse(&bytewise), whole);
    }

    #[test]
    fn the_events_parsed_are_the_ones_eventsource_stream_parses((_body, chunks) in split_body()) {
        prop_assert_eq!(parse(&chunks), parse_with_eventsource_stream(&chunks), "split as {:?}", chunks);
    }

    #[test]
    fn the_raw_response_is_exactly_what_was_received((body, chunks) in split_body()) {
        let recorded = record(&chunks);
        let expected = expected_raw(&body);
        prop_assert_eq!(
            String::from_utf8_lossy(&recorded.rendered),
            String::from_utf8_lossy(&expected),
            "rendered live, split as {:?}", chunks
        );
        prop_assert_eq!(
            String::from_utf8_lossy(&recorded.stored),
            String::from_utf8_lossy(&expected),
            "rebuilt by the store, split as {:?}", chunks
        );
        prop_assert_eq!(recorded.rendered, expected);
    }

    #[test]
    fn the_events_recorded_do_not_depend_on_how_the_body_was_split((body, chunks) in split_body()) {
        let whole = record(&[Bytes::from(body)]);
        prop_assert_eq!(record(&chunks).events, whole.events);
    }
}

/// Examples kept from what the properties found, and the shapes they are about.
#[test]
fn a_canonical_stream_is_rebuilt_exactly_whatever_the_split() {
    let body = b"data: {\"a\":1}\n\ndata: {\"a\":2}\n\ndata: [DONE]\n\n";
    for cut in 0..=body.len() {
        let chunks = [Bytes::copy_from_slice(&body[..cut]), Bytes::copy_from_slice(&body[cut..])];
        let recorded = record(&chunks);
        assert_eq!(recorded.events, ["{\"a\":1}", "{\"a\":2}"]);
        assert_eq!(recorded.rendered, expected_raw(body), "cut at {cut}");
        assert_eq!(recorded.stored, expected_raw(body), "cut at {cut}");
    }
}

#[test]
fn a_body_that_starts_with_a_byte_order_mark_is_parsed_and_recorded_with_it() {
    // Found by the properties above: `eventsource-stream`, the parser before, panicked on a body starting with U+FEFF.
    let body = "\u{feff}data: {\"a\":1}\n\ndata: [DONE]\n\n".as_bytes();
    for cut in 0..=body.len() {
        let chunks = [Bytes::copy_from_slice(&body[..cut]), Bytes::copy_from_slice(&body[cut..])];
        let (events, failed) = parse(&chunks);
        assert!(!failed);
        assert_eq!(events, ["{\"a\":1}", "[DONE]"]);
        let recorded = record(&chunks);
        assert_eq!(recorded.events, ["{\"a\":1}"]);
        assert_eq!(recorded.rendered, expected_raw(body), "cut at {cut}");
        assert_eq!(recorded.stored, expected_raw(body), "cut at {cut}");
    }
}
