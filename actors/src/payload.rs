//! [`Payload`]: the data of one WebSocket message, text or binary, as it
//! travels from a broadcast through the hub to every recipient's socket and
//! to the other nodes.
//!
//! Both variants are reference-counted buffers, so cloning one for each of
//! 5,000 recipients is a counter increment, not a copy. Keeping the kind
//! next to the bytes is also what later work needs to encode a frame once
//! per broadcast: the frame header depends on it.

use actix_web::web::Bytes;
use bytestring::ByteString;

/// One message's data: sent to clients as a text frame or a binary frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// A text frame (always valid UTF-8).
    Text(ByteString),
    /// A binary frame, bytes verbatim.
    Binary(Bytes),
}

impl Payload {
    /// The payload's length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Payload::Text(t) => t.len(),
            Payload::Binary(b) => b.len(),
        }
    }

    /// True for an empty message.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes, whichever the kind.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Payload::Text(t) => t.as_bytes(),
            Payload::Binary(b) => b,
        }
    }

    /// True for a binary message.
    pub fn is_binary(&self) -> bool {
        matches!(self, Payload::Binary(_))
    }
}

impl From<ByteString> for Payload {
    fn from(text: ByteString) -> Self {
        Payload::Text(text)
    }
}

impl From<String> for Payload {
    fn from(text: String) -> Self {
        Payload::Text(text.into())
    }
}

impl From<&str> for Payload {
    fn from(text: &str) -> Self {
        Payload::Text(text.into())
    }
}

impl From<Bytes> for Payload {
    fn from(bytes: Bytes) -> Self {
        Payload::Binary(bytes)
    }
}

impl From<Vec<u8>> for Payload {
    fn from(bytes: Vec<u8>) -> Self {
        Payload::Binary(bytes.into())
    }
}
