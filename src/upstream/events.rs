//! Parses the upstream's event stream (`text/event-stream`) in time linear in the bytes received, with a bound on
//! the size of one event.
//!
//! Why not the `eventsource-stream` crate, which this replaced: it appends each piece received to one `String`
//! and parses that buffer from its start again for every piece, moving what is left to a new `String` after
//! each line, so one long event costs time quadratic in its length. Measured on a release build (BENCHMARKS.md,
//! "Hostile upstreams"): one 8 MB event arriving in 4 KiB pieces took 12 s of CPU, and a 200 MB line without a
//! newline held a core until the request's timeout. Here every byte is looked at once: the bytes of a piece
//! are searched for a line end (`memchr`), whole lines are handled straight from the piece, and only the start of
//! a line that the piece cuts off is kept, to be completed by the next one.
//!
//! The worker keeps only each event's data (an OpenAI chunk), so `event`, `id` and `retry` fields are read and
//! dropped, as are comments. The rules otherwise follow the HTML standard's event stream interpretation: lines
//! end with CRLF, LF or CR; `data` lines are joined with `\n`; an event is dispatched at a blank line when it has
//! data; one space after the colon is dropped; a final event without its blank line is not dispatched (nor one
//! whose blank line is a lone CR at the very end: it might have been the start of a CRLF). A byte order mark at
//! the start is taken off before the parser (`engine::live::raw::SkipBom`).

/// Why the stream cannot be parsed further.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// One event (its data so far and the line being read) grew past the bound.
    #[error("the upstream sent an event larger than {0} bytes (--max-upstream-event-bytes)")]
    TooLarge(usize),
    #[error("the upstream sent an event whose data is not UTF-8")]
    NotUtf8,
}

#[derive(Debug)]
pub struct EventParser {
    /// The start of a line that the last piece cut off (no line end in it yet).
    line: Vec<u8>,
    /// The data lines of the event being read, each followed by `\n`.
    data: Vec<u8>,
    /// The last piece ended with `\r`, ending the line in `line`, which is handled with the next piece (a `\n` at
    /// its start belongs to the same line end).
    after_cr: bool,
    max_event: usize,
}

impl EventParser {
    pub fn new(max_event_bytes: usize) -> Self {
        Self { line: Vec::new(), data: Vec::new(), after_cr: false, max_event: max_event_bytes }
    }

    /// Parses the next piece of the body: the data of every event it completes goes to `out`, in order. At an
    /// error, the events completed before it are in `out` and the parser must not be fed again.
    pub fn feed(&mut self, piece: &[u8], out: &mut Vec<String>) -> Result<(), ParseError> {
        let mut rest = piece;
        if self.after_cr {
            let Some(first) = rest.first() else { return Ok(()) };
            self.after_cr = false;
            if *first == b'\n' {
                rest = &rest[1..];
            }
            self.held_line_done(out)?;
        }
        while let Some(end) = memchr::memchr2(b'\n', b'\r', rest) {
            self.check(end)?;
            let mut next = end + 1;
            if rest[end] == b'\r' {
                match rest.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    // Maybe the first half of a CRLF: the line is handled with the next piece, so that the event
                    // it may complete (`[DONE]`, after which the worker reads no more) comes only once the line
                    // end is whole, and `.raw` holds all of it.
                    None => {
                        self.line.extend_from_slice(&rest[..end]);
                        self.after_cr = true;
                        return Ok(());
                    }
                }
            }
            if self.line.is_empty() {
                self.line_done(&rest[..end], out)?;
            } else {
                self.line.extend_from_slice(&rest[..end]);
                self.held_line_done(out)?;
            }
            rest = &rest[next..];
        }
        self.check(rest.len())?;
        self.line.extend_from_slice(rest);
        Ok(())
    }

    /// The line held in `line` has ended.
    fn held_line_done(&mut self, out: &mut Vec<String>) -> Result<(), ParseError> {
        let mut line = std::mem::take(&mut self.line);
        let done = self.line_done(&line, out);
        // The buffer is kept for the next cut-off line.
        line.clear();
        self.line = line;
        done
    }

    /// The event would hold `more` bytes more than it does: refused past the bound.
    fn check(&self, more: usize) -> Result<(), ParseError> {
        if self.data.len() + self.line.len() + more > self.max_event {
            return Err(ParseError::TooLarge(self.max_event));
        }
        Ok(())
    }

    fn line_done(&mut self, line: &[u8], out: &mut Vec<String>) -> Result<(), ParseError> {
        if line.is_empty() {
            return self.dispatch(out);
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(0) => return Ok(()),
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        if field == b"data" {
            self.data.extend_from_slice(value);
            self.data.push(b'\n');
        }
        Ok(())
    }

    fn dispatch(&mut self, out: &mut Vec<String>) -> Result<(), ParseError> {
        if self.data.is_empty() {
            return Ok(());
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop();
        out.push(String::from_utf8(data).map_err(|_| ParseError::NotUtf8)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pieces: &[&[u8]], max: usize) -> (Vec<String>, Result<(), ParseError>) {
        let mut parser = EventParser::new(max);
        let mut out = Vec::new();
        for piece in pieces {
            if let Err(e) = parser.feed(piece, &mut out) {
                return (out, Err(e));
            }
        }
        (out, Ok(()))
    }

    #[test]
    fn every_line_ending_and_field_form_is_understood() {
        let body =
            b"data: a\n\ndata:b\r\n\r\ndata: c\r\rdata: d\ndata: e\n\n: comment\nevent: x\nid: 1\nretry: 5\ndata\n\n";
        for cut in 0..=body.len() {
            let (events, result) = parse(&[&body[..cut], &body[cut..]], 1000);
            assert_eq!(result, Ok(()));
            assert_eq!(events, ["a", "b", "c", "d\ne", ""], "cut at {cut}");
        }
    }

    #[test]
    fn an_event_without_its_blank_line_is_not_dispatched() {
        assert_eq!(parse(&[b"data: a\n\ndata: b\n"], 1000).0, ["a"]);
        assert_eq!(parse(&[b"\n\n\nevent: x\n\n"], 1000).0, Vec::<String>::new());
    }

    #[test]
    fn a_cr_at_the_end_of_a_piece_and_a_lf_at_the_start_of_the_next_are_one_line_end() {
        assert_eq!(parse(&[b"data: a\r", b"\n", b"\r", b"\ndata: b\r", b"\r", b"x"], 1000).0, ["a", "b"]);
        // The blank line of `b` might be the start of a CRLF until the next byte tells.
        assert_eq!(parse(&[b"data: a\r\r", b"data: b\r", b"\r"], 1000).0, ["a"]);
        assert_eq!(parse(&[b"data: a\r", b"", b"\r", b""], 1000).0, Vec::<String>::new());
    }

    #[test]
    fn a_line_that_never_ends_is_refused_at_the_bound_keeping_the_events_before() {
        let mut pieces: Vec<&[u8]> = vec![b"data: 1\n\n"];
        let long = [b'x'; 100];
        pieces.extend(std::iter::repeat_n(&long[..], 20));
        let (events, result) = parse(&pieces, 1000);
        assert_eq!(events, ["1"]);
        assert_eq!(result, Err(ParseError::TooLarge(1000)));
    }

    #[test]
    fn many_data_lines_count_toward_one_event() {
        let line = b"data: 0123456789\n";
        let pieces: Vec<&[u8]> = std::iter::repeat_n(&line[..], 100).collect();
        assert_eq!(parse(&pieces, 1000).1, Err(ParseError::TooLarge(1000)));
        assert_eq!(parse(&pieces, 2000).1, Ok(()));
        // Comments and blank lines do not add up.
        let ping = b": ping\n\n";
        let pieces: Vec<&[u8]> = std::iter::repeat_n(&ping[..], 1000).collect();
        assert_eq!(parse(&pieces, 100).1, Ok(()));
    }

    #[test]
    fn data_that_is_not_utf8_is_an_error() {
        assert_eq!(parse(&[b"data: \xff\n\n"], 1000).1, Err(ParseError::NotUtf8));
        assert_eq!(parse(&[b"data: \xc3", b"\xa9\n\n"], 1000).0, ["é"]);
    }
}
