//! The inbound frame checker: RFC 6455 validation of what a client sends,
//! done on the bytes as they arrive, before actix's codec sees them.
//!
//! actix-http's codec parses frames, but it reports several violations as
//! errors that actix-web-actors flattens into `ProtocolError::Io` (text that
//! is not UTF-8 and reserved bits both look like a socket error), it checks
//! UTF-8 only once a whole frame is in, and it does not check close codes.
//! [`FrameChecker`] is a plain state machine that parses frame headers
//! itself, unmasks text and close payloads to validate them, and tracks
//! fragmentation and message sizes. It is fed chunks exactly as they came
//! off the socket, so invalid UTF-8 is caught in the chunk that carries it:
//! inside a fragmented message, and inside one frame sent in pieces.
//!
//! [`CheckedPayload`] wraps the request payload given to actix-web-actors.
//! On a violation it forwards only the bytes before the offending frame,
//! records the [`Violation`] (close code and reason) in a cell the session
//! shares ([`InboundVerdict`]), and ends the stream. Ending it, rather than
//! returning an error, matters: actix-web-actors' `WsStream` returns an
//! error at once and drops the frames still in its buffer, while at the end
//! of the stream it first hands every complete frame to the session. The
//! session then closes with the recorded code from `StreamHandler::finished`.
//! After a client's close frame the checker ends the stream too: RFC 6455
//! §5.5.1 has nothing after it read.
//!
//! | what the client sent | close code |
//! |---|---|
//! | a reserved bit set (no extension is negotiated), an unknown opcode, an unmasked frame, a 64-bit length with its top bit set | 1002 |
//! | a continuation with no message open, a new data frame while one is open | 1002 |
//! | a fragmented control frame, a control frame over 125 bytes | 1002 |
//! | a close payload of one byte, or a close code not allowed on the wire | 1002 |
//! | text (or a close reason) that is not UTF-8 | 1007 |
//! | a message (all its fragments) over `max_message_bytes` | 1009 |

use actix_web::error::PayloadError;
use actix_web::web::Bytes;
use actix_web_actors::ws::CloseCode;
use futures::Stream;
use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

/// Why the checker refused a client's input: the close code to send and a
/// short reason for the close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    /// The close code (1002, 1007 or 1009).
    pub code: CloseCode,
    /// What was wrong, for the close frame's reason.
    pub reason: &'static str,
}

impl Violation {
    const fn protocol(reason: &'static str) -> Violation {
        Violation {
            code: CloseCode::Protocol,
            reason,
        }
    }

    const fn invalid(reason: &'static str) -> Violation {
        Violation {
            code: CloseCode::Invalid,
            reason,
        }
    }
}

/// What to do with one chunk after checking it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// Forward all of it and keep reading.
    Pass,
    /// Forward its first `forward` bytes, then end the stream. `violation`
    /// is why; `None` means the client sent its close frame (which ends at
    /// `forward`).
    End {
        /// How many bytes of the chunk to forward.
        forward: usize,
        /// The refusal, if it was one.
        violation: Option<Violation>,
    },
}

/// The longest frame header: 2 bytes, a 64-bit length, a 4-byte mask.
const MAX_HEADER: usize = 14;

/// The longest control frame payload (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

/// How many payload bytes are unmasked at once for UTF-8 validation: a
/// buffer on the stack, so validation allocates nothing.
const UNMASK_BLOCK: usize = 1024;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// The data message in progress, between its first frame and the frame
/// with FIN set.
#[derive(Debug, Clone, Copy)]
struct OpenMessage {
    is_text: bool,
    /// Payload bytes announced so far, all frames counted.
    len: u64,
}

/// Where the checker is inside the current frame.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// Collecting the header: `have` of its bytes are in `buf`.
    Header { buf: [u8; MAX_HEADER], have: usize },
    /// Inside the payload of a frame whose header passed.
    Payload(Frame),
    /// After a close frame or a violation: nothing more is looked at.
    Done,
}

/// A frame whose header has been read.
#[derive(Debug, Clone, Copy)]
struct Frame {
    opcode: u8,
    fin: bool,
    /// Payload bytes not yet seen.
    remaining: u64,
    mask: [u8; 4],
    /// Payload bytes seen so far (where the mask's cycle is).
    seen: u64,
    /// Whether the payload is text to validate (a text frame, or a
    /// continuation of a text message).
    is_text: bool,
}

/// Validates the frames one client sends; see the module docs. Feed it every
/// chunk, in order, with [`FrameChecker::check`].
#[derive(Debug)]
pub struct FrameChecker {
    max_message_bytes: u64,
    stage: Stage,
    message: Option<OpenMessage>,
    utf8: Utf8Validator,
    /// The close frame being read: its first two payload bytes (the code),
    /// how many payload bytes have arrived, and its reason's UTF-8 state
    /// (its own: a control frame may come between a text message's
    /// fragments). Checked as the bytes arrive, so nothing is buffered.
    close_code: [u8; 2],
    close_len: usize,
    close_reason: Utf8Validator,
}

impl FrameChecker {
    /// A checker that refuses messages over `max_message_bytes` with 1009.
    pub fn new(max_message_bytes: usize) -> FrameChecker {
        FrameChecker {
            max_message_bytes: max_message_bytes as u64,
            stage: Stage::Header {
                buf: [0; MAX_HEADER],
                have: 0,
            },
            message: None,
            utf8: Utf8Validator::default(),
            close_code: [0; 2],
            close_len: 0,
            close_reason: Utf8Validator::default(),
        }
    }

    /// Checks the next chunk of the client's bytes.
    pub fn check(&mut self, chunk: &[u8]) -> Checked {
        let mut pos = 0;
        // Where the frame being read began in this chunk (0 when it began
        // in an earlier one, whose bytes are already forwarded).
        let mut frame_start = 0;
        loop {
            match &mut self.stage {
                Stage::Done => {
                    return Checked::End {
                        forward: 0,
                        violation: None,
                    }
                }
                Stage::Header { buf, have } => {
                    if pos == chunk.len() {
                        return Checked::Pass;
                    }
                    if *have == 0 {
                        frame_start = pos;
                    }
                    buf[*have] = chunk[pos];
                    *have += 1;
                    pos += 1;
                    let (header, have) = (*buf, *have);
                    match self.on_header_byte(&header[..have]) {
                        Ok(None) => {}
                        Ok(Some(frame)) => {
                            self.stage = Stage::Payload(frame);
                            if frame.remaining == 0 {
                                if let Some(end) = self.end_of_frame(pos) {
                                    return end.forwarding(frame_start);
                                }
                            }
                        }
                        Err(v) => return self.refuse(frame_start, v),
                    }
                }
                Stage::Payload(frame) => {
                    if pos == chunk.len() {
                        return Checked::Pass;
                    }
                    let available = (chunk.len() - pos) as u64;
                    let take = frame.remaining.min(available) as usize;
                    let bytes = &chunk[pos..pos + take];
                    let frame_copy = *frame;
                    frame.remaining -= take as u64;
                    frame.seen += take as u64;
                    pos += take;
                    if frame_copy.is_text
                        && !self
                            .utf8
                            .feed_masked(bytes, frame_copy.mask, frame_copy.seen)
                    {
                        return self.refuse(frame_start, Violation::invalid("text is not UTF-8"));
                    }
                    if frame_copy.opcode == OP_CLOSE {
                        for (i, b) in bytes.iter().enumerate() {
                            let at = frame_copy.seen as usize + i;
                            let b = b ^ frame_copy.mask[at % 4];
                            if let Some(code_byte) = self.close_code.get_mut(self.close_len) {
                                *code_byte = b;
                            } else if !self.close_reason.step(b) {
                                return self.refuse(
                                    frame_start,
                                    Violation::invalid("close reason is not UTF-8"),
                                );
                            }
                            self.close_len += 1;
                        }
                    }
                    if frame_copy.remaining == take as u64 {
                        if let Some(end) = self.end_of_frame(pos) {
                            return end.forwarding(frame_start);
                        }
                    }
                }
            }
            if matches!(self.stage, Stage::Header { have: 0, .. }) {
                frame_start = pos;
            }
        }
    }

    /// Marks the stream as refused and says how much to forward.
    fn refuse(&mut self, frame_start: usize, violation: Violation) -> Checked {
        self.stage = Stage::Done;
        Checked::End {
            forward: frame_start,
            violation: Some(violation),
        }
    }

    /// Reads the header collected so far: `Ok(None)` while incomplete,
    /// the frame once complete, or why it is refused (as early as its
    /// bytes allow).
    fn on_header_byte(&mut self, header: &[u8]) -> Result<Option<Frame>, Violation> {
        let b0 = header[0];
        if header.len() == 1 {
            if b0 & 0x70 != 0 {
                return Err(Violation::protocol("reserved bits set"));
            }
            let opcode = b0 & 0x0f;
            let fin = b0 & 0x80 != 0;
            match opcode {
                OP_CONTINUATION if self.message.is_none() => {
                    return Err(Violation::protocol(
                        "continuation frame with no message to continue",
                    ))
                }
                OP_TEXT | OP_BINARY if self.message.is_some() => {
                    return Err(Violation::protocol(
                        "new data frame inside a fragmented message",
                    ))
                }
                OP_CONTINUATION | OP_TEXT | OP_BINARY => {}
                OP_CLOSE | OP_PING | OP_PONG if !fin => {
                    return Err(Violation::protocol("fragmented control frame"))
                }
                OP_CLOSE | OP_PING | OP_PONG => {}
                _ => return Err(Violation::protocol("unknown opcode")),
            }
            return Ok(None);
        }
        let b1 = header[1];
        let opcode = b0 & 0x0f;
        let is_control = opcode >= OP_CLOSE;
        if header.len() == 2 {
            if b1 & 0x80 == 0 {
                return Err(Violation::protocol("client frames must be masked"));
            }
            if is_control && usize::from(b1 & 0x7f) > MAX_CONTROL_PAYLOAD {
                return Err(Violation::protocol("control frame over 125 bytes"));
            }
        }
        let extended = match b1 & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let header_len = 2 + extended + 4;
        if header.len() < header_len {
            return Ok(None);
        }
        let len = match extended {
            2 => u64::from(u16::from_be_bytes([header[2], header[3]])),
            8 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&header[2..10]);
                let n = u64::from_be_bytes(n);
                if n >> 63 != 0 {
                    return Err(Violation::protocol("frame length has its top bit set"));
                }
                n
            }
            _ => u64::from(b1 & 0x7f),
        };
        let mut mask = [0u8; 4];
        mask.copy_from_slice(&header[2 + extended..header_len]);
        let fin = b0 & 0x80 != 0;
        let is_text = match opcode {
            OP_TEXT => true,
            OP_CONTINUATION => self.message.is_some_and(|m| m.is_text),
            _ => false,
        };
        if !is_control {
            let so_far = self.message.map_or(0, |m| m.len);
            let total = so_far.saturating_add(len);
            if total > self.max_message_bytes {
                return Err(Violation {
                    code: CloseCode::Size,
                    reason: "message too big",
                });
            }
            if opcode != OP_CONTINUATION {
                self.utf8 = Utf8Validator::default();
            }
            self.message = Some(OpenMessage {
                is_text: match opcode {
                    OP_CONTINUATION => is_text,
                    other => other == OP_TEXT,
                },
                len: total,
            });
        }
        if opcode == OP_CLOSE {
            self.close_len = 0;
            self.close_reason = Utf8Validator::default();
        }
        Ok(Some(Frame {
            opcode,
            fin,
            remaining: len,
            mask,
            seen: 0,
            is_text,
        }))
    }

    /// A frame's payload is complete at `pos`: returns how the stream ends
    /// if it does, and otherwise starts the next header.
    fn end_of_frame(&mut self, pos: usize) -> Option<EndAt> {
        let Stage::Payload(frame) = self.stage else {
            return None;
        };
        self.stage = Stage::Header {
            buf: [0; MAX_HEADER],
            have: 0,
        };
        match frame.opcode {
            OP_CONTINUATION | OP_TEXT | OP_BINARY if frame.fin => {
                let was_text = self.message.is_some_and(|m| m.is_text);
                self.message = None;
                if was_text && !self.utf8.is_complete() {
                    self.stage = Stage::Done;
                    return Some(EndAt::Refused(Violation::invalid(
                        "text ends inside a UTF-8 sequence",
                    )));
                }
                None
            }
            OP_CLOSE => {
                self.stage = Stage::Done;
                match self.check_close_payload() {
                    Ok(()) => Some(EndAt::Closed(pos)),
                    Err(v) => Some(EndAt::Refused(v)),
                }
            }
            _ => None,
        }
    }
}

impl FrameChecker {
    /// A complete close frame's payload: empty, or a 2-byte allowed code and
    /// a UTF-8 reason (each reason byte was checked as it arrived).
    fn check_close_payload(&self) -> Result<(), Violation> {
        match self.close_len {
            0 => Ok(()),
            1 => Err(Violation::protocol("close payload of one byte")),
            _ if !close_code_allowed(u16::from_be_bytes(self.close_code)) => {
                Err(Violation::protocol("close code not allowed"))
            }
            _ if !self.close_reason.is_complete() => {
                Err(Violation::invalid("close reason is not UTF-8"))
            }
            _ => Ok(()),
        }
    }
}

/// How a completed frame ends the stream.
#[derive(Debug, Clone, Copy)]
enum EndAt {
    /// A valid close frame that ends at this offset in the chunk.
    Closed(usize),
    /// The frame is refused.
    Refused(Violation),
}

impl EndAt {
    fn forwarding(self, frame_start: usize) -> Checked {
        match self {
            EndAt::Closed(end) => Checked::End {
                forward: end,
                violation: None,
            },
            EndAt::Refused(v) => Checked::End {
                forward: frame_start,
                violation: Some(v),
            },
        }
    }
}

/// Whether `code` may be sent in a close frame (RFC 6455 §7.4.1 and §7.4.2,
/// and the IANA registry): 1004–1006 and 1015 are reserved for local use,
/// the rest below 3000 are unassigned, 3000–4999 are for libraries and
/// applications.
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// An incremental UTF-8 validator (RFC 3629): fed a message's bytes in any
/// pieces, it refuses at the first byte that cannot belong to valid UTF-8,
/// so a message is refused while it is still arriving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Utf8Validator {
    /// Continuation bytes still owed by the sequence in progress.
    need: u8,
    /// The range the next continuation byte must be in (the first one is
    /// narrower for some leads: no overlong forms, no surrogates, nothing
    /// past U+10FFFF).
    lo: u8,
    hi: u8,
}

impl Default for Utf8Validator {
    fn default() -> Self {
        Utf8Validator {
            need: 0,
            lo: 0x80,
            hi: 0xBF,
        }
    }
}

impl Utf8Validator {
    /// True when the bytes so far end on a character boundary.
    pub fn is_complete(&self) -> bool {
        self.need == 0
    }

    /// Takes one byte; false if it makes the text invalid.
    fn step(&mut self, b: u8) -> bool {
        if self.need > 0 {
            if !(self.lo..=self.hi).contains(&b) {
                return false;
            }
            self.need -= 1;
            self.lo = 0x80;
            self.hi = 0xBF;
            return true;
        }
        let (need, lo, hi) = match b {
            0x00..=0x7F => return true,
            0xC2..=0xDF => (1, 0x80, 0xBF),
            0xE0 => (2, 0xA0, 0xBF),
            0xED => (2, 0x80, 0x9F),
            0xE1..=0xEC | 0xEE..=0xEF => (2, 0x80, 0xBF),
            0xF0 => (3, 0x90, 0xBF),
            0xF1..=0xF3 => (3, 0x80, 0xBF),
            0xF4 => (3, 0x80, 0x8F),
            _ => return false,
        };
        self.need = need;
        self.lo = lo;
        self.hi = hi;
        true
    }

    /// Takes the next unmasked bytes; false if they make the text invalid.
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        let mut i = 0;
        // Finish the sequence a previous piece left open, byte by byte.
        while self.need > 0 {
            let Some(&b) = bytes.get(i) else {
                return true;
            };
            if !self.step(b) {
                return false;
            }
            i += 1;
        }
        // Then the standard library's fast validator for the rest; only a
        // sequence cut off by the end of the piece is left to `step`.
        match std::str::from_utf8(&bytes[i..]) {
            Ok(_) => true,
            Err(e) if e.error_len().is_some() => false,
            Err(e) => bytes[i + e.valid_up_to()..].iter().all(|&b| self.step(b)),
        }
    }

    /// Takes the next masked payload bytes: `offset` is how many bytes of
    /// the frame's payload came before them (where the mask's cycle is).
    fn feed_masked(&mut self, bytes: &[u8], mask: [u8; 4], offset: u64) -> bool {
        let mut block = [0u8; UNMASK_BLOCK];
        let mut at = (offset % 4) as usize;
        for piece in bytes.chunks(UNMASK_BLOCK) {
            for (out, b) in block.iter_mut().zip(piece) {
                *out = b ^ mask[at];
                at = (at + 1) % 4;
            }
            if !self.feed(&block[..piece.len()]) {
                return false;
            }
        }
        true
    }
}

/// The checker's verdict, shared between the [`CheckedPayload`] that
/// records it and the session that reads it when the stream ends. Both live
/// on the connection's worker thread, so a plain `Rc<Cell>` does.
pub type InboundVerdict = Rc<Cell<Option<Violation>>>;

/// The request payload, checked by a [`FrameChecker`] on its way to
/// actix-web-actors (see the module docs).
pub struct CheckedPayload<S> {
    inner: S,
    checker: FrameChecker,
    verdict: InboundVerdict,
    ended: bool,
}

impl<S> CheckedPayload<S> {
    /// Checks `inner` with a checker for `max_message_bytes`, recording a
    /// violation in `verdict`.
    pub fn new(inner: S, max_message_bytes: usize, verdict: InboundVerdict) -> Self {
        CheckedPayload {
            inner,
            checker: FrameChecker::new(max_message_bytes),
            verdict,
            ended: false,
        }
    }
}

impl<S> Stream for CheckedPayload<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => match this.checker.check(&chunk) {
                Checked::Pass => Poll::Ready(Some(Ok(chunk))),
                Checked::End { forward, violation } => {
                    this.ended = true;
                    if violation.is_some() {
                        this.verdict.set(violation);
                    }
                    if forward > 0 {
                        Poll::Ready(Some(Ok(chunk.slice(..forward))))
                    } else {
                        Poll::Ready(None)
                    }
                }
            },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// A masked client frame: `b0` is FIN/RSV/opcode as sent.
    fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        testkit::ws::push_client_frame(&mut out, b0, payload, MASK);
        out
    }

    fn text(s: &[u8]) -> Vec<u8> {
        frame(0x81, s)
    }

    fn close(code: u16, reason: &[u8]) -> Vec<u8> {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(reason);
        frame(0x88, &p)
    }

    /// Feeds `bytes` in pieces of `piece` bytes and returns the verdict and
    /// how many bytes in all were forwarded.
    fn run(bytes: &[u8], piece: usize, max: usize) -> (Option<Violation>, usize, bool) {
        let mut c = FrameChecker::new(max);
        let mut forwarded = 0;
        for chunk in bytes.chunks(piece.max(1)) {
            match c.check(chunk) {
                Checked::Pass => forwarded += chunk.len(),
                Checked::End { forward, violation } => {
                    return (violation, forwarded + forward, true);
                }
            }
        }
        (None, forwarded, false)
    }

    fn code_of(bytes: &[u8]) -> Option<u16> {
        run(bytes, bytes.len(), 1 << 20).0.map(|v| v.code.into())
    }

    #[test]
    fn valid_traffic_passes_whole_in_any_pieces() {
        let mut stream = text("héllo ✓ 𝄞".as_bytes());
        stream.extend(frame(0x82, &[0xff, 0x00, 0xfe]));
        stream.extend(frame(0x89, b"ping"));
        // A fragmented text message with a ping in the middle, a multibyte
        // character split across the fragments.
        let snowman = "☃".as_bytes();
        stream.extend(frame(0x01, &snowman[..1]));
        stream.extend(frame(0x8A, b""));
        stream.extend(frame(0x80, &snowman[1..]));
        stream.extend(text(&vec![b'x'; 70_000]));
        for piece in [1, 2, 3, 7, 13, 64, 1000, stream.len()] {
            assert_eq!(
                run(&stream, piece, 1 << 20),
                (None, stream.len(), false),
                "piece {piece}"
            );
        }
    }

    #[test]
    fn protocol_errors_are_1002() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("rsv1", frame(0xC1, b"x")),
            ("rsv2", frame(0xA1, b"x")),
            ("rsv3", frame(0x91, b"x")),
            ("opcode 3", frame(0x83, b"")),
            ("opcode 0xB", frame(0x8B, b"")),
            ("stray continuation", frame(0x80, b"x")),
            ("fragmented ping", frame(0x09, b"")),
            ("fragmented close", frame(0x08, b"")),
            ("ping of 126 bytes", frame(0x89, &[0; 126])),
            ("close of one byte", frame(0x88, &[3])),
            ("close code 999", close(999, b"")),
            ("close code 1005", close(1005, b"")),
            ("close code 1016", close(1016, b"")),
            ("close code 2999", close(2999, b"")),
            ("close code 5000", close(5000, b"")),
            ("unmasked", vec![0x81, 0x01, b'x']),
        ];
        for (what, bytes) in cases {
            assert_eq!(code_of(&bytes), Some(1002), "{what}");
        }
        let mut text_in_text = frame(0x01, b"a");
        text_in_text.extend(text(b"b"));
        assert_eq!(code_of(&text_in_text), Some(1002));
        let mut top_bit = vec![0x82, 0x80 | 127];
        top_bit.extend_from_slice(&(1u64 << 63).to_be_bytes());
        top_bit.extend_from_slice(&MASK);
        assert_eq!(code_of(&top_bit), Some(1002));
    }

    #[test]
    fn allowed_close_codes_pass_and_end_the_stream() {
        for code in [1000, 1001, 1003, 1007, 1011, 1014, 3000, 4999] {
            let mut bytes = close(code, "fine ✓".as_bytes());
            let len = bytes.len();
            // Whatever follows the close frame is not forwarded.
            bytes.extend(text(b"after"));
            assert_eq!(run(&bytes, bytes.len(), 100), (None, len, true), "{code}");
            assert_eq!(run(&bytes, 1, 100), (None, len, true), "{code}");
        }
        let empty = frame(0x88, b"");
        assert_eq!(run(&empty, 99, 100), (None, empty.len(), true));
    }

    #[test]
    fn invalid_utf8_is_1007_where_it_appears() {
        assert_eq!(code_of(&text(b"ok \xff")), Some(1007));
        assert_eq!(code_of(&text(b"\xed\xa0\x80")), Some(1007)); // a surrogate
        assert_eq!(code_of(&text(b"\xc0\xaf")), Some(1007)); // overlong
        assert_eq!(code_of(&text(b"\xf4\x90\x80\x80")), Some(1007)); // > U+10FFFF
        assert_eq!(code_of(&text(b"cut \xe2\x98")), Some(1007)); // ends mid-sequence
        assert_eq!(code_of(&close(1000, b"\xff")), Some(1007));
        assert_eq!(
            code_of(&close(1000, "cut \u{2603}".as_bytes()[..6].as_ref())),
            Some(1007)
        );
        assert_eq!(code_of(&close(1000, "whole \u{2603}".as_bytes())), None);

        // Fragmented: refused in the fragment that breaks it, and the
        // fragments before it are forwarded.
        let mut frags = frame(0x01, "κόσμε".as_bytes());
        let first = frags.len();
        frags.extend(frame(0x00, b"\xf4\x90\x80\x80"));
        frags.extend(frame(0x80, b"edited"));
        let (v, forwarded, ended) = run(&frags, frags.len(), 100);
        assert_eq!(v.map(|v| u16::from(v.code)), Some(1007));
        assert_eq!((forwarded, ended), (first, true));

        // One frame sent in pieces: refused in the piece with the bad byte,
        // before the rest of the frame exists.
        let payload = b"valid so far \xf4\x90 and the rest never arrives";
        let whole = text(payload);
        let bad_at = 2 + 4 + payload.iter().position(|&b| b == 0x90).unwrap();
        let mut c = FrameChecker::new(100);
        assert_eq!(c.check(&whole[..bad_at]), Checked::Pass);
        assert_eq!(
            c.check(&whole[bad_at..bad_at + 1]),
            Checked::End {
                forward: 0,
                violation: Some(Violation::invalid("text is not UTF-8"))
            }
        );
    }

    #[test]
    fn a_message_over_the_limit_is_1009_at_its_header() {
        assert_eq!(
            run(&text(&[b'a'; 101]), 1000, 100).0.map(|v| v.code),
            Some(CloseCode::Size)
        );
        // Fragments count together.
        let mut frags = frame(0x02, &[0; 60]);
        frags.extend(frame(0x80, &[0; 41]));
        let (v, forwarded, _) = run(&frags, frags.len(), 100);
        assert_eq!(v.map(|v| v.code), Some(CloseCode::Size));
        assert_eq!(forwarded, 2 + 4 + 60);
        // Refused from the header alone: a 1 GiB frame need not arrive.
        let mut huge = vec![0x82, 0x80 | 127];
        huge.extend_from_slice(&(1u64 << 30).to_be_bytes());
        huge.extend_from_slice(&MASK);
        assert_eq!(code_of(&huge), Some(1009));
        // Exactly the limit is fine.
        assert_eq!(run(&text(&[b'a'; 100]), 7, 100).0, None);
    }

    #[test]
    fn only_the_frames_before_the_bad_one_are_forwarded() {
        let mut bytes = text(b"first");
        let good = bytes.len();
        bytes.extend(frame(0xA1, b"second")); // RSV2
        bytes.extend(frame(0x89, b""));
        for piece in [1, 5, bytes.len()] {
            let (v, forwarded, ended) = run(&bytes, piece, 100);
            assert_eq!(v.map(|v| v.code), Some(CloseCode::Protocol), "{piece}");
            assert_eq!((forwarded, ended), (good, true), "piece {piece}");
        }
    }

    /// The crate's seeded xorshift, for deterministic pseudo-random cases.
    fn rng() -> impl FnMut() -> u64 {
        let mut j = crate::backoff::Jitter::with_seed(0x9E37_79B9_7F4A_7C15);
        move || j.next_u64()
    }

    #[test]
    fn the_validator_agrees_with_std_on_random_bytes_in_random_pieces() {
        let mut next = rng();
        // Bytes drawn mostly from the interesting ranges, so valid and
        // invalid sequences both come up often.
        let alphabet: Vec<u8> = (0x00..=0x7F)
            .step_by(17)
            .chain(0x80..=0xBF)
            .chain(0xC0..=0xFF)
            .collect();
        let mut valid_seen = 0;
        for _ in 0..20_000 {
            let len = (next() % 12) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            let expected = std::str::from_utf8(&bytes).is_ok();
            valid_seen += usize::from(expected);
            let mut v = Utf8Validator::default();
            let mut ok = true;
            let mut rest = &bytes[..];
            while ok && !rest.is_empty() {
                let n = 1 + (next() % rest.len() as u64) as usize;
                ok = v.feed(&rest[..n]);
                rest = &rest[n..];
            }
            assert_eq!(ok && v.is_complete(), expected, "{bytes:x?}");
        }
        assert!(valid_seen > 1000, "only {valid_seen} valid cases");
    }

    #[test]
    fn refusal_is_at_the_first_bad_byte() {
        // Every prefix of valid text passes; the prefix ending at the first
        // impossible byte fails, whatever came before.
        let mut next = rng();
        for _ in 0..2000 {
            let s: String = (0..(next() % 8))
                .map(|_| char::from_u32((next() % 0x11_0000) as u32).unwrap_or('\u{FFFD}'))
                .collect();
            let mut bytes = s.into_bytes();
            let good = bytes.len();
            bytes.push(0xFF);
            let mut v = Utf8Validator::default();
            assert!(v.feed(&bytes[..good]));
            assert!(!v.feed(&bytes[good..]));
        }
    }
}
