//! A WebSocket client written by hand on a raw TCP socket: the opening
//! handshake, server frames parsed in place from a reusable buffer, and
//! masked client frames built byte by byte.
//!
//! Two kinds of caller need one, for two reasons:
//!
//! - the benchmarks' load generators, because a full client (awc,
//!   tungstenite) allocates per message and runs more code per frame, and on
//!   a 2-core machine every cycle the load generator spends is taken from the
//!   server being measured. Nothing here copies: a [`Frame`] is a range in
//!   the [`RecvBuf`] until it is consumed;
//! - the tests, for what awc will not do: [`RawWsClient`] can stop reading
//!   entirely (with a small receive buffer, so the server's writes back up),
//!   and [`client_frame`] sends what a client must not (reserved bits,
//!   reserved opcodes, bad lengths).
//!
//! Not supported, because no caller needs them: extensions, and reassembly
//! of fragmented server messages (each fragment is its own [`Frame`]).
//!
//! The hot functions are `#[inline]`: the benchmark programs call them from
//! another crate, and a frame parse that is not inlined there would cost the
//! load generator more than it did when this file was compiled into them.

use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Continuation frame opcode.
pub const OP_CONTINUATION: u8 = 0x0;
/// Text frame opcode.
pub const OP_TEXT: u8 = 0x1;
/// Binary frame opcode.
pub const OP_BINARY: u8 = 0x2;
/// Close frame opcode.
pub const OP_CLOSE: u8 = 0x8;
/// Ping frame opcode.
pub const OP_PING: u8 = 0x9;
/// Pong frame opcode.
pub const OP_PONG: u8 = 0xA;
/// The FIN bit of a frame's first byte.
pub const FIN: u8 = 0x80;

/// The subprotocol that makes a happynet client a protocol client (it gets
/// the `welcome` frame and JSON control frames); as a request header.
pub const PROTOCOL_HEADER: (&str, &str) = ("Sec-WebSocket-Protocol", "happynet.v1");

/// The `Sec-WebSocket-Key` of every handshake: the RFC 6455 sample. No
/// caller checks `Sec-WebSocket-Accept`; they talk to their own server over
/// 127.0.0.1.
pub const SAMPLE_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// The mask of [`client_frame`]'s frames.
const CLIENT_MASK: [u8; 4] = [0x1b, 0x9e, 0x4c, 0x07];

/// What the receive buffer starts at; it grows (doubling) only for a frame
/// that does not fit.
const INITIAL_BUFFER: usize = 4096;
/// The largest frame accepted from a server.
pub const MAX_FRAME: usize = 1 << 20;
/// The largest HTTP response head accepted during the handshake.
const MAX_RESPONSE_HEAD: usize = 16 << 10;

/// How long [`RawWsClient`] waits for any one thing before it panics: a test
/// that would hang fails with a message instead.
pub const WAIT: Duration = Duration::from_secs(20);

/// The upgrade request for `target` (e.g. `/ws?room=a`) on `addr`, with
/// `headers` after the standard ones, ending in the blank line.
pub fn upgrade_request(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> String {
    let mut request = format!(
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {SAMPLE_KEY}\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request
}

/// The length of the HTTP response head at the start of `buf` (through the
/// blank line), once it is all there.
pub fn response_head_len(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Checks that the response head accepts the upgrade.
pub fn check_upgrade_response(head: &[u8]) -> Result<(), String> {
    let status_line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    if status_line.starts_with(b"HTTP/1.1 101") {
        Ok(())
    } else {
        Err(format!(
            "upgrade refused: {}",
            String::from_utf8_lossy(status_line)
        ))
    }
}

/// One complete frame at the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The first header byte: FIN, RSV and opcode.
    pub b0: u8,
    /// Where the payload is, relative to the start of the buffer.
    pub payload: Range<usize>,
    /// The whole frame's length: consume this much afterwards.
    pub len: usize,
}

impl Frame {
    /// The opcode (`OP_*`).
    #[inline]
    pub fn opcode(&self) -> u8 {
        self.b0 & 0x0f
    }
}

/// Parses the frame at the start of `buf`: `Ok(None)` while it is
/// incomplete, an error for what a server must not send (a mask, reserved
/// bits without an extension, more than [`MAX_FRAME`] bytes).
#[inline]
pub fn parse_frame(buf: &[u8]) -> Result<Option<Frame>, &'static str> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b1 & 0x80 != 0 {
        return Err("the server sent a masked frame");
    }
    if b0 & 0x70 != 0 {
        return Err("the server set reserved bits (no extension was negotiated)");
    }
    let (header, len) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(b) => (4, usize::from(u16::from_be_bytes([b[0], b[1]]))),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut n = [0u8; 8];
                n.copy_from_slice(b);
                (
                    10,
                    usize::try_from(u64::from_be_bytes(n)).unwrap_or(usize::MAX),
                )
            }
            None => return Ok(None),
        },
        n => (2, usize::from(n)),
    };
    if len > MAX_FRAME {
        return Err("the server sent a frame over 1 MiB");
    }
    if buf.len() < header + len {
        return Ok(None);
    }
    Ok(Some(Frame {
        b0,
        payload: header..header + len,
        len: header + len,
    }))
}

/// Appends a client frame masked with `mask` to `out`: `b0` is FIN, RSV and
/// opcode exactly as given (so tests can set what a client must not), and
/// the length takes whichever form `payload` needs.
#[inline]
pub fn push_client_frame(out: &mut Vec<u8>, b0: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(b0);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
}

/// The answer to a server's ping (`payload` is the ping's; a server's
/// control frame carries at most 125 bytes, and so does the pong), appended
/// to `out`.
#[inline]
pub fn push_pong(out: &mut Vec<u8>, payload: &[u8], mask: [u8; 4]) {
    let payload = &payload[..payload.len().min(125)];
    push_client_frame(out, FIN | OP_PONG, payload, mask);
}

/// A client frame as [`push_client_frame`] builds it, with a fixed mask.
pub fn client_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    push_client_frame(&mut out, b0, payload, CLIENT_MASK);
    out
}

/// A client close frame with `code` and `reason`.
pub fn client_close(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason);
    client_frame(FIN | OP_CLOSE, &payload)
}

/// A receive buffer: bytes read from the socket and not yet consumed.
pub struct RecvBuf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl Default for RecvBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvBuf {
    /// An empty buffer of the initial size.
    pub fn new() -> Self {
        RecvBuf {
            data: vec![0; INITIAL_BUFFER],
            start: 0,
            end: 0,
        }
    }

    /// The bytes not yet consumed.
    #[inline]
    pub fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    /// Drops the first `n` unconsumed bytes.
    #[inline]
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads once from `stream` into the free space, making room first;
    /// returns how many bytes arrived (0 at end of stream).
    pub async fn read_from(&mut self, stream: &mut TcpStream) -> std::io::Result<usize> {
        if self.end == self.data.len() {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.data.len() < MAX_FRAME + 16 {
                self.data.resize(self.data.len() * 2, 0);
            } else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "receive buffer full",
                ));
            }
        }
        let n = stream.read(&mut self.data[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// True when a response head still incomplete has grown too large.
    pub fn head_too_large(&self) -> bool {
        self.end - self.start > MAX_RESPONSE_HEAD
    }
}

/// Connects to `addr` with `TCP_NODELAY`, sends the opening handshake for
/// `/ws` offering happynet's protocol (so that happynet sends the `welcome`
/// frame the load generators wait for; the naive hub ignores the offer and
/// sends its own), and reads the `101` response head. Returns the stream and
/// a buffer holding whatever the server sent after the head.
pub async fn upgrade(addr: SocketAddr) -> Result<(TcpStream, RecvBuf), String> {
    upgrade_to(addr, "/ws").await
}

/// [`upgrade`] to `target` (a path with its query, e.g. `/ws?room=r`).
pub async fn upgrade_to(addr: SocketAddr, target: &str) -> Result<(TcpStream, RecvBuf), String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    stream
        .write_all(upgrade_request(addr, target, &[PROTOCOL_HEADER]).as_bytes())
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let mut buf = RecvBuf::new();
    loop {
        if let Some(len) = response_head_len(buf.filled()) {
            check_upgrade_response(&buf.filled()[..len])?;
            buf.consume(len);
            return Ok((stream, buf));
        }
        if buf.head_too_large() {
            return Err("upgrade response head too large".into());
        }
        if buf
            .read_from(&mut stream)
            .await
            .map_err(|e| e.to_string())?
            == 0
        {
            return Err("closed during the handshake".into());
        }
    }
}

/// A WebSocket client for tests, on a raw TCP socket: it can stop reading
/// entirely, with a small receive buffer, so the server's writes back up.
/// Every wait is bounded by [`WAIT`]; what a test does not expect panics.
pub struct RawWsClient {
    /// The socket, for what a test does to it directly (`TCP_NODELAY`, its
    /// local port).
    pub stream: TcpStream,
    /// Bytes read and not yet parsed into frames.
    pending: RecvBuf,
}

/// One frame a server sent, as [`RawWsClient::read_frame`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// The first header byte: FIN, RSV and opcode.
    pub b0: u8,
    /// The payload, unmasked as a server sends it.
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The opcode (`OP_*`).
    pub fn opcode(&self) -> u8 {
        self.b0 & 0x0f
    }

    /// The code of a close frame (1005, "no status", for an empty one).
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode() == OP_CLOSE).then(|| match self.payload[..] {
            [hi, lo, ..] => u16::from_be_bytes([hi, lo]),
            _ => 1005,
        })
    }
}

impl RawWsClient {
    /// Connects to `/ws{query}` with a receive buffer of `rcvbuf` bytes and
    /// completes the upgrade handshake, reading nothing beyond the response
    /// head.
    pub async fn connect(addr: SocketAddr, query: &str, rcvbuf: u32) -> RawWsClient {
        Self::connect_with(addr, query, rcvbuf, &[]).await
    }

    /// Like [`connect`](Self::connect), with `headers` added to the upgrade
    /// request (e.g. [`PROTOCOL_HEADER`]).
    pub async fn connect_with(
        addr: SocketAddr,
        query: &str,
        rcvbuf: u32,
        headers: &[(&str, &str)],
    ) -> RawWsClient {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
        let mut stream = socket.connect(addr).await.expect("connect");
        let request = upgrade_request(addr, &format!("/ws{query}"), headers);
        stream
            .write_all(request.as_bytes())
            .await
            .expect("handshake");
        // Read the response one byte at a time so that no frame bytes leave
        // the socket: a client that is to back up keeps them in the kernel.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while response_head_len(&head).is_none() {
            let n = tokio::time::timeout(WAIT, stream.read(&mut byte))
                .await
                .expect("handshake response in time")
                .expect("read");
            assert!(n == 1, "connection closed during handshake");
            head.push(byte[0]);
            assert!(head.len() < 4096, "oversized handshake response");
        }
        if let Err(refused) = check_upgrade_response(&head) {
            panic!("{refused}: {}", String::from_utf8_lossy(&head));
        }
        RawWsClient {
            stream,
            pending: RecvBuf::new(),
        }
    }

    /// Writes `bytes` as they are.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Writes `bytes`, returning the error (a server that has closed may
    /// refuse them) rather than panicking.
    pub async fn write_some(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Shuts the client's sending side (a FIN), leaving it reading.
    pub async fn shutdown_write(&mut self) {
        let _ = self.stream.shutdown().await;
    }

    /// The next frame the server sent, or `None` at the end of the stream
    /// (or a reset). Panics after [`WAIT`].
    pub async fn read_frame(&mut self) -> Option<RawFrame> {
        self.try_read_frame().await.unwrap_or(None)
    }

    /// Like [`read_frame`](Self::read_frame), telling a reset (`Err`) from
    /// an orderly end of the stream (`Ok(None)`).
    pub async fn try_read_frame(&mut self) -> std::io::Result<Option<RawFrame>> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match parse_frame(self.pending.filled()) {
                Ok(Some(frame)) => {
                    let raw = RawFrame {
                        b0: frame.b0,
                        payload: self.pending.filled()[frame.payload].to_vec(),
                    };
                    self.pending.consume(frame.len);
                    return Ok(Some(raw));
                }
                Ok(None) => {}
                Err(why) => panic!("{why}"),
            }
            let read = self.pending.read_from(&mut self.stream);
            match tokio::time::timeout_at(deadline, read).await {
                Err(_) => panic!("nothing from the server within {WAIT:?}"),
                Ok(Ok(0)) => {
                    assert!(
                        self.pending.filled().is_empty(),
                        "stream ended inside a frame"
                    );
                    return Ok(None);
                }
                Ok(Err(e)) => return Err(e),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Reads up to the server's close frame and returns it; panics if the
    /// stream ends first.
    pub async fn expect_close(&mut self) -> RawFrame {
        loop {
            match self.read_frame().await {
                Some(f) if f.opcode() == OP_CLOSE => return f,
                Some(_) => {}
                None => panic!("the connection ended without a close frame"),
            }
        }
    }

    /// Asserts that the server ends the connection next (EOF, nothing more
    /// sent) within [`WAIT`], without the client closing its side.
    pub async fn expect_eof(&mut self) {
        if let Some(f) = self.read_frame().await {
            panic!("expected the end of the stream, got {f:?}");
        }
    }

    /// Reads and discards everything until the server closes the connection.
    /// Returns how many bytes were drained; panics if it stays open past
    /// [`WAIT`].
    pub async fn drain_until_closed(&mut self) -> usize {
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Err(_) => panic!("server did not close the connection within {WAIT:?}"),
                Ok(Ok(0)) | Ok(Err(_)) => return total,
                Ok(Ok(n)) => total += n,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_short_and_extended_lengths() {
        let mut f = vec![0x81, 3, b'a', b'b', b'c'];
        assert_eq!(
            parse_frame(&f),
            Ok(Some(Frame {
                b0: 0x81,
                payload: 2..5,
                len: 5
            }))
        );
        f.pop();
        assert_eq!(parse_frame(&f), Ok(None));
        let mut long = vec![0x81, 126, 0, 200];
        long.extend(std::iter::repeat_n(b'x', 200));
        assert_eq!(parse_frame(&long).map(|f| f.map(|f| f.len)), Ok(Some(204)));
        assert!(parse_frame(&[0x81, 0x83, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn client_frames_are_masked_in_every_length_form() {
        for len in [0, 125, 126, 0xffff, 0x1_0000] {
            let payload = vec![b'p'; len];
            let frame = client_frame(FIN | OP_BINARY, &payload);
            let (header, mask_at) = match len {
                0..=125 => (2, 2),
                126..=0xffff => (4, 4),
                _ => (10, 10),
            };
            assert_eq!(frame[0], 0x82);
            assert_eq!(frame[1] & 0x80, 0x80, "masked");
            assert_eq!(frame.len(), header + 4 + len);
            let mask = &frame[mask_at..mask_at + 4];
            let unmasked: Vec<u8> = frame[header + 4..]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(unmasked, payload);
        }
        assert_eq!(&client_close(1000, b"")[..2], &[0x88, 0x82]);
    }
}
