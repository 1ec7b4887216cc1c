//! Presence frames, bounded: the client totals and the busiest rooms, never
//! more than a fixed number of bytes however many rooms exist.
//!
//! A presence frame goes to every session that asked for one, once per
//! `presence_interval` when something changed. Listing every room made its
//! size grow with the room table — 10,000 rooms, and the rooms other nodes
//! report, made a frame of hundreds of KiB for each subscriber, each second,
//! charged against each one's `max_outbound_bytes`. So the frame lists at
//! most [`PresenceLimits::max_rooms`] rooms, the ones with the most members
//! (ties by name), and stops earlier if the next room would take the frame
//! past [`PresenceLimits::max_bytes`]. How many rooms it left out is in
//! `more`:
//!
//! ```text
//! {"type":"presence","clients":1234,"rooms":{"lobby":900,"news":51},"more":9812}
//! ```
//!
//! `clients` and `more` always count everything: `rooms` listed plus `more`
//! is the number of rooms there are (cluster-wide when clustered).
//!
//! The code here is plain: it takes the occupancy and returns the frame.

use crate::rooms::RoomName;
use bytestring::ByteString;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt::Write;

/// The most rooms a presence frame lists.
pub const PRESENCE_MAX_ROOMS: usize = 100;

/// The most bytes a presence frame takes (also never more than
/// `max_message_bytes`, see [`PresenceLimits::new`]). 100 rooms with the
/// longest names fit.
pub const PRESENCE_MAX_BYTES: usize = 16 * 1024;

/// A frame with no room listed is at most this long: the fixed text plus
/// two 20-digit counts. It always goes out, whatever the byte bound.
pub const PRESENCE_MIN_BYTES: usize = 96;

/// How big a presence frame may get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceLimits {
    /// The most rooms listed.
    pub max_rooms: usize,
    /// The most bytes in the frame (at least [`PRESENCE_MIN_BYTES`] are
    /// always allowed, for the totals).
    pub max_bytes: usize,
}

impl PresenceLimits {
    /// The limits for a server whose largest message is `max_message_bytes`:
    /// [`PRESENCE_MAX_ROOMS`] rooms in at most [`PRESENCE_MAX_BYTES`], or
    /// in `max_message_bytes` if that is smaller. A presence frame is then
    /// never bigger than the largest message, so the headroom that
    /// `max_outbound_bytes` keeps for those covers presence too.
    pub fn new(max_message_bytes: usize) -> Self {
        PresenceLimits {
            max_rooms: PRESENCE_MAX_ROOMS,
            max_bytes: PRESENCE_MAX_BYTES.min(max_message_bytes),
        }
    }
}

impl Default for PresenceLimits {
    fn default() -> Self {
        PresenceLimits {
            max_rooms: PRESENCE_MAX_ROOMS,
            max_bytes: PRESENCE_MAX_BYTES,
        }
    }
}

/// This node's rooms with the other nodes' added: rooms both have get the
/// sum of their counts (saturating), rooms only one side has come as they
/// are.
pub fn merge<'a>(
    local: impl Iterator<Item = (&'a RoomName, usize)>,
    remote: &'a HashMap<RoomName, usize>,
) -> Vec<(&'a RoomName, usize)> {
    let mut all: HashMap<&RoomName, usize> = HashMap::with_capacity(remote.len());
    for (room, n) in local.chain(remote.iter().map(|(r, &n)| (r, n))) {
        let count = all.entry(room).or_insert(0);
        *count = count.saturating_add(n);
    }
    all.into_iter().collect()
}

/// Busiest first; equal counts by name, so the frame is deterministic.
fn busiest_first(a: &(&RoomName, usize), b: &(&RoomName, usize)) -> Ordering {
    b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0))
}

/// `s` as a JSON string, appended to `out`.
fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            // Room names hold no control characters (RoomName); escaped
            // anyway so that the frame is valid JSON whatever it is given.
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The presence frame for `clients` sessions and `rooms` (each room once,
/// with its member count), within `limits` (see the module docs).
pub fn presence_frame(
    clients: usize,
    mut rooms: Vec<(&RoomName, usize)>,
    limits: &PresenceLimits,
) -> ByteString {
    let total = rooms.len();
    let keep = limits.max_rooms.min(total);
    // Only the rooms that can be listed are sorted: O(rooms) to pick them,
    // O(keep log keep) to order them.
    if keep < total {
        if keep > 0 {
            rooms.select_nth_unstable_by(keep - 1, busiest_first);
        }
        rooms.truncate(keep);
    }
    rooms.sort_unstable_by(busiest_first);

    let mut out = String::with_capacity(limits.max_bytes.min(1024));
    let _ = write!(out, r#"{{"type":"presence","clients":{clients},"rooms":{{"#);
    // What must still fit after the last room: `},"more":N}`.
    let tail = 10 + total.to_string().len();
    let budget = limits.max_bytes.max(PRESENCE_MIN_BYTES);
    let mut listed = 0;
    let mut entry = String::new();
    for (room, n) in rooms {
        entry.clear();
        if listed > 0 {
            entry.push(',');
        }
        push_json_string(&mut entry, room.as_str());
        let _ = write!(entry, ":{n}");
        if out.len() + entry.len() + tail > budget {
            break;
        }
        out.push_str(&entry);
        listed += 1;
    }
    let _ = write!(out, r#"}},"more":{}}}"#, total - listed);
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn room(name: &str) -> RoomName {
        RoomName::new(name).unwrap()
    }

    fn parse(frame: &ByteString) -> Value {
        serde_json::from_str(frame).unwrap()
    }

    #[test]
    fn a_small_table_is_listed_whole() {
        let (a, b) = (room("a"), room("b \"q\""));
        let frame = presence_frame(5, vec![(&a, 2), (&b, 3)], &PresenceLimits::default());
        let v = parse(&frame);
        assert_eq!(v["type"], "presence");
        assert_eq!(v["clients"], 5);
        assert_eq!(v["rooms"]["a"], 2);
        assert_eq!(v["rooms"]["b \"q\""], 3);
        assert_eq!(v["more"], 0);
        assert!(frame.starts_with(r#"{"type":"presence""#));
        let empty = parse(&presence_frame(0, vec![], &PresenceLimits::default()));
        assert_eq!(empty["rooms"], serde_json::json!({}));
        assert_eq!(empty["more"], 0);
    }

    #[test]
    fn ten_thousand_rooms_make_a_bounded_frame_of_the_busiest() {
        // Room i has i % 997 members, plus the five big ones.
        let names: Vec<RoomName> = (0..10_000).map(|i| room(&format!("r{i:05}"))).collect();
        let big: Vec<RoomName> = (0..5).map(|i| room(&format!("big{i}"))).collect();
        let mut rooms: Vec<(&RoomName, usize)> = names
            .iter()
            .enumerate()
            .map(|(i, r)| (r, i % 997))
            .collect();
        rooms.extend(big.iter().enumerate().map(|(i, r)| (r, 10_000 + i)));
        let limits = PresenceLimits::default();
        let frame = presence_frame(123_456, rooms.clone(), &limits);
        assert!(frame.len() <= PRESENCE_MAX_BYTES, "{} bytes", frame.len());
        let v = parse(&frame);
        let listed = v["rooms"].as_object().unwrap();
        assert_eq!(listed.len(), PRESENCE_MAX_ROOMS);
        assert_eq!(v["more"], 10_005 - PRESENCE_MAX_ROOMS);
        assert_eq!(v["clients"], 123_456);
        // The listed rooms are exactly the busiest ones.
        rooms.sort_by(busiest_first);
        for (r, n) in &rooms[..PRESENCE_MAX_ROOMS] {
            assert_eq!(listed[r.as_str()], *n, "{r}");
        }
        for b in &big {
            assert!(listed.contains_key(b.as_str()));
        }
        // Busiest first in the text, too.
        assert!(frame.find("big4").unwrap() < frame.find("big0").unwrap());
    }

    #[test]
    fn the_byte_bound_holds_for_the_longest_names_and_tiny_limits() {
        // 64-byte names of quotes escape to 128 bytes each.
        let names: Vec<RoomName> = (0..300)
            .map(|i| room(&format!("{i:03}{}", "\"".repeat(61))))
            .collect();
        let rooms: Vec<(&RoomName, usize)> = names.iter().map(|r| (r, usize::MAX - 1)).collect();
        for max_bytes in [0, 1, 96, 97, 200, 1000, 4096, PRESENCE_MAX_BYTES] {
            let limits = PresenceLimits {
                max_rooms: 1000,
                max_bytes,
            };
            let frame = presence_frame(usize::MAX, rooms.clone(), &limits);
            assert!(
                frame.len() <= max_bytes.max(PRESENCE_MIN_BYTES),
                "{} bytes for a bound of {max_bytes}",
                frame.len()
            );
            let v = parse(&frame);
            let listed = v["rooms"].as_object().unwrap().len();
            assert_eq!(v["more"].as_u64().unwrap() as usize, 300 - listed);
        }
        // A bound of max_message_bytes below the constant wins.
        assert_eq!(PresenceLimits::new(1000).max_bytes, 1000);
        assert_eq!(PresenceLimits::new(1 << 20).max_bytes, PRESENCE_MAX_BYTES);
    }

    #[test]
    fn no_room_listed_means_all_in_more() {
        let a = room("a");
        let limits = PresenceLimits {
            max_rooms: 0,
            max_bytes: PRESENCE_MAX_BYTES,
        };
        let v = parse(&presence_frame(1, vec![(&a, 1)], &limits));
        assert_eq!(v["rooms"], serde_json::json!({}));
        assert_eq!(v["more"], 1);
    }

    #[test]
    fn merging_adds_counts_of_rooms_both_sides_have() {
        let (x, far, here) = (room("x"), room("far"), room("here"));
        let remote: HashMap<RoomName, usize> =
            [(x.clone(), 2), (far.clone(), 3)].into_iter().collect();
        let local = [(&x, 1usize), (&here, 4)];
        let mut merged = merge(local.into_iter(), &remote);
        merged.sort_by(busiest_first);
        assert_eq!(merged, vec![(&here, 4), (&far, 3), (&x, 3)]);
        let huge: HashMap<RoomName, usize> = [(x.clone(), usize::MAX)].into_iter().collect();
        assert_eq!(merge([(&x, 5)].into_iter(), &huge), vec![(&x, usize::MAX)]);
    }
}
