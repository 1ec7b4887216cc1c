//! Just enough of a WebSocket client to generate load: the opening handshake
//! written by hand, server frames parsed in place from a reusable buffer, and
//! masked control frames for answers.
//!
//! A full client (awc, tungstenite) allocates per message and runs more code
//! per frame; on a 2-core machine every cycle the load generator spends is
//! taken from the server being measured. This one copies nothing: a frame is
//! a range in the receive buffer until it is consumed.
//!
//! Not supported, because the benchmark servers never send them: fragmented
//! messages (continuation frames are skipped) and extensions.

use std::net::SocketAddr;
use std::ops::Range;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Text frame opcode.
pub(crate) const OP_TEXT: u8 = 0x1;
/// Close frame opcode.
pub(crate) const OP_CLOSE: u8 = 0x8;
/// Ping frame opcode.
pub(crate) const OP_PING: u8 = 0x9;
/// Pong frame opcode.
pub(crate) const OP_PONG: u8 = 0xA;

/// What the receive buffer starts at; it grows (doubling) only for a frame
/// that does not fit.
const INITIAL_BUFFER: usize = 4096;
/// The largest frame accepted from a server.
const MAX_FRAME: usize = 1 << 20;
/// The largest HTTP response head accepted during the handshake.
const MAX_RESPONSE_HEAD: usize = 16 << 10;

/// The upgrade request for `path` on `addr`. The key is fixed (the RFC 6455
/// sample); the benchmark does not check `Sec-WebSocket-Accept` because it
/// only ever talks to its own child over 127.0.0.1. It offers happynet's
/// protocol (`happynet.v1`) so that happynet sends the `welcome` frame the
/// clients wait for; the naive hub ignores the offer and sends its own.
pub(crate) fn handshake_request(addr: SocketAddr, path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: happynet.v1\r\n\r\n"
    )
}

/// The length of the HTTP response head at the start of `buf` (through the
/// blank line), once it is all there.
pub(crate) fn response_head_len(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Checks that the response head accepts the upgrade.
pub(crate) fn check_upgrade_response(head: &[u8]) -> Result<(), String> {
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
pub(crate) struct Frame {
    /// The opcode (`OP_*`).
    pub(crate) opcode: u8,
    /// Where the payload is, relative to the start of the buffer.
    pub(crate) payload: Range<usize>,
    /// The whole frame's length: consume this much afterwards.
    pub(crate) len: usize,
}

/// Parses the frame at the start of `buf`: `Ok(None)` while it is
/// incomplete, an error for what a server must not send.
pub(crate) fn parse_frame(buf: &[u8]) -> Result<Option<Frame>, &'static str> {
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
        opcode: b0 & 0x0f,
        payload: header..header + len,
        len: header + len,
    }))
}

/// Appends a masked client frame (FIN set) to `out`. Control frames carry at
/// most 125 bytes, so only the short length form is needed; a longer payload
/// is truncated.
pub(crate) fn push_masked_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    let payload = &payload[..payload.len().min(125)];
    out.push(0x80 | opcode);
    out.push(0x80 | payload.len() as u8);
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
}

/// A receive buffer: bytes read from the socket and not yet consumed.
pub(crate) struct RecvBuf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl RecvBuf {
    /// An empty buffer of the initial size.
    pub(crate) fn new() -> Self {
        RecvBuf {
            data: vec![0; INITIAL_BUFFER],
            start: 0,
            end: 0,
        }
    }

    /// The bytes not yet consumed.
    pub(crate) fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    /// Drops the first `n` unconsumed bytes.
    pub(crate) fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads once from `stream` into the free space, making room first;
    /// returns how many bytes arrived (0 at end of stream).
    pub(crate) async fn read_from(&mut self, stream: &mut TcpStream) -> std::io::Result<usize> {
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
    pub(crate) fn head_too_large(&self) -> bool {
        self.end - self.start > MAX_RESPONSE_HEAD
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
                opcode: OP_TEXT,
                payload: 2..5,
                len: 5
            }))
        );
        f.pop();
        assert_eq!(parse_frame(&f), Ok(None));
        let mut long = vec![0x81, 126, 0, 200];
        long.extend(std::iter::repeat(b'x').take(200));
        assert_eq!(parse_frame(&long).map(|f| f.map(|f| f.len)), Ok(Some(204)));
        assert!(parse_frame(&[0x81, 0x83, 0, 0, 0, 0]).is_err());
    }
}

/// Connects to `addr` with `TCP_NODELAY`, sends the opening handshake for
/// `/ws` and reads the `101` response head. Returns the stream and a buffer
/// holding whatever the server sent after the head.
pub(crate) async fn upgrade(addr: SocketAddr) -> Result<(TcpStream, RecvBuf), String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    stream
        .write_all(handshake_request(addr, "/ws").as_bytes())
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
