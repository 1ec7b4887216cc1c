//! A server-sent events parser, as a plain state machine: bytes in (in
//! whatever chunks the network delivers), complete events out.
//!
//! It follows the WHATWG event-stream rules that matter for API streams:
//! lines end in `\n`, `\r\n` or `\r`; a blank line dispatches the event;
//! `data:` lines accumulate (joined by `\n`); one space after the colon is
//! dropped; lines starting with `:` are comments; `event:` names the event.
//! A line may be split across any number of chunks, including between `\r`
//! and `\n`. The buffered partial line is bounded: a stream that never ends
//! a line is an error, not unbounded memory.
//!
//! # Why not `eventsource-stream`
//!
//! `eventsource-stream` is the field's parser, and it was weighed for this
//! job. We keep these ~100 lines for one reason that is not speed: its
//! `EventStream` appends every chunk to an unbounded `String` and re-parses
//! that buffer from its start on each chunk until a line ends, with no
//! limit on a line or an event. An upstream (or anything between us and it)
//! that sends one endless line would grow that buffer without bound, and the
//! re-scan makes each chunk cost the whole line so far. This parser refuses
//! a line or event over [`MAX_EVENT_BYTES`] and looks at each byte once. It
//! is also a plain state machine (`push` bytes, get events, no I/O), which
//! is how `openai.rs` drives it from the body chunks it already has.

/// The longest line (or event) the parser buffers.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
}

/// Why the stream could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SseError {
    /// A line or event grew past [`MAX_EVENT_BYTES`].
    TooLong,
    /// The stream was not UTF-8.
    NotUtf8,
}

impl std::fmt::Display for SseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SseError::TooLong => write!(f, "event stream line over {MAX_EVENT_BYTES} bytes"),
            SseError::NotUtf8 => f.write_str("event stream is not UTF-8"),
        }
    }
}

impl std::error::Error for SseError {}

/// Incremental parser; feed it chunks with [`SseParser::push`].
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: Option<String>,
    event: Option<String>,
    /// The previous chunk ended in `\r`: a leading `\n` belongs to it.
    after_cr: bool,
}

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one chunk; returns the events it completed, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        let mut out = Vec::new();
        for &b in chunk {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    if let Some(event) = self.line_done(&line)? {
                        out.push(event);
                    }
                }
                _ => {
                    if self.line.len() >= MAX_EVENT_BYTES {
                        return Err(SseError::TooLong);
                    }
                    self.line.push(b);
                }
            }
        }
        Ok(out)
    }

    fn line_done(&mut self, line: &[u8]) -> Result<Option<SseEvent>, SseError> {
        if line.is_empty() {
            return Ok(self.data.take().map(|data| SseEvent {
                event: self.event.take(),
                data,
            }));
        }
        let line = std::str::from_utf8(line).map_err(|_| SseError::NotUtf8)?;
        if line.starts_with(':') {
            return Ok(None);
        }
        let (field, value) = match line.find(':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (line, ""),
        };
        match field {
            "data" => {
                let data = self.data.get_or_insert_with(String::new);
                if data.len() + value.len() + 1 > MAX_EVENT_BYTES {
                    return Err(SseError::TooLong);
                }
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(value);
            }
            "event" => self.event = Some(value.to_owned()),
            // `id` and `retry` matter for reconnecting browsers, not here.
            _ => {}
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(events: &[SseEvent]) -> Vec<&str> {
        events.iter().map(|e| e.data.as_str()).collect()
    }

    #[test]
    fn parses_events_split_anywhere() {
        let stream = b"data: {\"a\":1}\n\n: comment\n\ndata: two\ndata: lines\n\nevent: end\ndata: [DONE]\n\n";
        let whole = SseParser::new().push(stream).unwrap();
        assert_eq!(data(&whole), vec!["{\"a\":1}", "two\nlines", "[DONE]"]);
        assert_eq!(whole[2].event.as_deref(), Some("end"));
        // Every possible split into two chunks gives the same events.
        for cut in 0..stream.len() {
            let mut p = SseParser::new();
            let mut got = p.push(&stream[..cut]).unwrap();
            got.extend(p.push(&stream[cut..]).unwrap());
            assert_eq!(got, whole, "cut at {cut}");
        }
        // And byte by byte.
        let mut p = SseParser::new();
        let mut got = Vec::new();
        for b in stream.iter() {
            got.extend(p.push(std::slice::from_ref(b)).unwrap());
        }
        assert_eq!(got, whole);
    }

    #[test]
    fn accepts_crlf_and_cr_line_endings() {
        let mut p = SseParser::new();
        let mut got = p.push(b"data: a\r").unwrap();
        got.extend(p.push(b"\n\r\ndata:b\r\r").unwrap());
        assert_eq!(data(&got), vec!["a", "b"]);
    }

    #[test]
    fn a_line_that_never_ends_is_an_error_not_memory() {
        let mut p = SseParser::new();
        let chunk = vec![b'x'; 64 * 1024];
        let mut result = Ok(Vec::new());
        for _ in 0..(MAX_EVENT_BYTES / chunk.len() + 2) {
            result = p.push(&chunk);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(SseError::TooLong));
    }

    #[test]
    fn data_without_a_blank_line_is_not_dispatched() {
        let mut p = SseParser::new();
        assert!(p.push(b"data: half").unwrap().is_empty());
        assert!(p.push(b"\n").unwrap().is_empty());
        assert_eq!(data(&p.push(b"\n").unwrap()), vec!["half"]);
    }
}
