//! The benchmark's wire format: what a broadcast carries and how the
//! clients recognise it.
//!
//! Every broadcast is one 64-byte text frame `B<run>:<seq>:<sent ns>:....`,
//! so each client can check it got every broadcast of a run exactly once and
//! in order, and compute the latency from the send time stamped in it (parent
//! and child read the same `SystemTime`). Frames that do not have this shape
//! (the servers' JSON control frames) are not counted.

use std::time::{SystemTime, UNIX_EPOCH};

/// Every broadcast's payload is exactly this long.
pub const PAYLOAD_BYTES: usize = 64;
/// How every client recognises the first frame (both servers' welcome).
pub const WELCOME_PREFIX: &[u8] = br#"{"type":"welcome""#;
/// How a stamped room message starts, and the key before its data.
const STAMPED_PREFIX: &[u8] = br#"{"type":"message""#;
const DATA_KEY: &[u8] = br#","data":""#;

/// Run numbers wrap at this (they take four digits in the payload).
pub const RUN_MODULUS: u32 = 10_000;

/// Nanoseconds since the Unix epoch. Parent and child read the same clock.
pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// `B<run:4>:<seq:9>:<sent ns:20>:` padded with dots to 64 bytes. `run`
/// tells one traffic phase's frames from another's.
pub fn bench_payload(run: u32, seq: u32, sent_ns: u64) -> String {
    let head = format!("B{:04}:{seq:09}:{sent_ns:020}:", run % RUN_MODULUS);
    format!("{head:.<width$}", width = PAYLOAD_BYTES)
}

fn digits(bytes: &[u8]) -> Option<u64> {
    bytes.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

/// The run, sequence number and send time of a benchmark payload; `None` for
/// any other frame. A payload inside a stamped room message (happynet with
/// history on: `{"type":"message",…,"data":"<payload>"}`) counts too.
pub fn parse_payload(p: &[u8]) -> Option<(u32, u32, u64)> {
    if p.starts_with(STAMPED_PREFIX) {
        let at = p.windows(DATA_KEY.len()).position(|w| w == DATA_KEY)? + DATA_KEY.len();
        return parse_payload(p.get(at..at + PAYLOAD_BYTES)?);
    }
    if p.len() != PAYLOAD_BYTES || p[0] != b'B' || p[5] != b':' || p[15] != b':' {
        return None;
    }
    let run = digits(&p[1..5])? as u32;
    let seq = digits(&p[6..15])? as u32;
    let sent = digits(&p[16..36])?;
    Some((run, seq, sent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamped_payload_parses_too() {
        let p = bench_payload(7, 42, 1_700_000_000_123_456_789);
        let stamped =
            format!(r#"{{"type":"message","room":"lobby","offset":3,"epoch":"e-1","data":"{p}"}}"#);
        assert_eq!(
            parse_payload(stamped.as_bytes()),
            Some((7, 42, 1_700_000_000_123_456_789))
        );
        assert_eq!(parse_payload(br#"{"type":"message","data":"B00"}"#), None);
    }

    #[test]
    fn payload_is_64_bytes_and_parses_back() {
        let p = bench_payload(12_345, 42, 1_700_000_000_123_456_789);
        assert_eq!(p.len(), PAYLOAD_BYTES);
        assert_eq!(
            parse_payload(p.as_bytes()),
            Some((12_345 % RUN_MODULUS, 42, 1_700_000_000_123_456_789))
        );
        assert_eq!(parse_payload(br#"{"type":"welcome"}"#), None);
    }
}
