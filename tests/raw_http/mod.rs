//! A raw HTTP/1.1 client and server on plain TCP, for what a real HTTP
//! library would hide from a test: the exact request target sent (no
//! normalisation), the exact bytes and headers that come back (no
//! decompression, no dechunking we did not ask for), a response head that
//! no actix server would write (a `Connection` header naming other headers),
//! and a reader that stops reading.
//!
//! Every wait is bounded by [`WAIT`].

#![allow(dead_code, unreachable_pub, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The longest any single step may take.
pub const WAIT: Duration = Duration::from_secs(20);

/// The most bytes a response may have before the client gives up reading
/// it: tests read small answers, so more is a bug, not a load to carry.
const MAX_RESPONSE: usize = 64 << 20;

/// A response as it came off the wire, with the transfer coding (chunked)
/// removed and everything else left as it was.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// In arrival order, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The payload bytes: after dechunking, before any content decoding.
    pub body: Vec<u8>,
    /// Whether a chunked body ended with its terminating zero-size chunk.
    pub chunked_complete: Option<bool>,
}

impl RawResponse {
    /// The first value of `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn has_header(&self, name: &str) -> bool {
        self.header(name).is_some()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

/// Sends `head` (request line and headers, without the blank line; a
/// `Connection: close` is added) and `body` to `addr`, and reads the whole
/// response until the server closes.
pub async fn request(addr: SocketAddr, head: &str, body: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut bytes = format!("{head}\r\nConnection: close\r\n");
    if !body.is_empty() {
        bytes.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    bytes.push_str("\r\n");
    stream
        .write_all(bytes.as_bytes())
        .await
        .expect("write head");
    stream.write_all(body).await.expect("write body");
    let raw = read_to_end(&mut stream).await;
    let bodiless = head.starts_with("HEAD ");
    parse_response(&raw, bodiless)
        .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&raw)))
}

/// `GET target` to `addr` with `headers` (`"Name: value"` lines).
pub async fn get(addr: SocketAddr, target: &str, headers: &[&str]) -> RawResponse {
    let mut head = format!("GET {target} HTTP/1.1\r\nHost: {addr}");
    for h in headers {
        head.push_str("\r\n");
        head.push_str(h);
    }
    request(addr, &head, b"").await
}

/// Reads until EOF (or a reset after some bytes), bounded by [`WAIT`].
pub async fn read_to_end(stream: &mut TcpStream) -> Vec<u8> {
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
            Ok(Ok(n)) => n,
            // A reset ends the response as surely as a close does.
            Ok(Err(_)) => 0,
            Err(_) => panic!("no EOF within {WAIT:?} ({} bytes read)", raw.len()),
        };
        if n == 0 {
            return raw;
        }
        raw.extend_from_slice(&buf[..n]);
        assert!(
            raw.len() <= MAX_RESPONSE,
            "response over {MAX_RESPONSE} bytes"
        );
    }
}

/// Reads until the bytes read so far contain `needle`, bounded by [`WAIT`];
/// returns what was read.
pub async fn read_until(stream: &mut TcpStream, needle: &[u8]) -> Vec<u8> {
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 4096];
    while !raw.windows(needle.len()).any(|w| w == needle) {
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{needle:?} not seen within {WAIT:?}"))
            .expect("read");
        assert!(n > 0, "EOF before {needle:?}");
        raw.extend_from_slice(&buf[..n]);
        assert!(
            raw.len() <= MAX_RESPONSE,
            "response over {MAX_RESPONSE} bytes"
        );
    }
    raw
}

/// Parses a complete response (head and body as far as it arrived); the
/// answer to a HEAD request (`bodiless`) has no body whatever its length
/// headers say.
pub fn parse_response(raw: &[u8], bodiless: bool) -> Result<RawResponse, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of head")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "head is not UTF-8")?;
    let rest = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or("no status line")?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("bad status line")?;
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line.split_once(':').ok_or("bad header line")?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let mut response = RawResponse {
        status,
        headers,
        body: Vec::new(),
        chunked_complete: None,
    };
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|te| te.eq_ignore_ascii_case("chunked"));
    if bodiless {
        response.body = rest.to_vec();
    } else if chunked {
        let (body, complete) = dechunk(rest)?;
        response.body = body;
        response.chunked_complete = Some(complete);
    } else if let Some(len) = response.header("content-length") {
        let len: usize = len.parse().map_err(|_| "bad content-length")?;
        if rest.len() < len {
            return Err(format!(
                "body of {} bytes, content-length {len}",
                rest.len()
            ));
        }
        response.body = rest[..len].to_vec();
    } else {
        response.body = rest.to_vec();
    }
    Ok(response)
}

/// Removes the chunked transfer coding; says whether the last chunk arrived.
fn dechunk(mut rest: &[u8]) -> Result<(Vec<u8>, bool), String> {
    let mut body = Vec::new();
    // Each round consumes at least a size line, so it ends.
    loop {
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            return Ok((body, false));
        };
        let line = std::str::from_utf8(&rest[..eol]).map_err(|_| "bad chunk size")?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "bad chunk size")?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok((body, true));
        }
        if rest.len() < size + 2 {
            body.extend_from_slice(&rest[..rest.len().min(size)]);
            return Ok((body, false));
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// A one-trick upstream: answers every request on every connection with
/// `response` (the whole raw bytes, head and body), then closes. For heads
/// that a real server library would not write. Serves at most
/// `connections` connections, then stops accepting.
pub async fn canned_upstream(response: Vec<u8>, connections: usize) -> SocketAddr {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    actix_web::rt::spawn(async move {
        for _ in 0..connections {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let response = response.clone();
            actix_web::rt::spawn(async move {
                // The request head; its body (if any) is not needed.
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                    if head.len() > 1 << 20 {
                        return;
                    }
                }
                let _ = stream.write_all(&response).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}
