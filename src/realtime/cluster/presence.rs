//! Presence across the cluster: this node's occupancy as the fields of its
//! hash `{prefix}:presence:{node}`, and the other nodes' hashes added up
//! into the [`ClusterPresence`] the hub folds into its presence frames.
//! Another node's numbers are untrusted input: capped, and added
//! saturating.

use happynet_actors::{ClusterPresence, Occupancy, RoomName};
use std::collections::HashMap;

/// The most other nodes whose presence is read per interval.
pub const MAX_PRESENCE_NODES: usize = 256;

/// The largest count read from another node's presence hash; larger ones
/// are taken as this.
pub const MAX_PRESENCE_COUNT: usize = 1 << 24;

/// A node's presence hash expires after this many intervals without an
/// update.
pub const PRESENCE_TTL_INTERVALS: u32 = 3;

/// The hash field of a room's member count (prefixed, so that a room may be
/// called `sessions`).
const ROOM_FIELD: &str = "r:";

/// This node's occupancy as the fields of its presence hash.
pub fn presence_fields(occupancy: &Occupancy) -> Vec<(String, usize)> {
    let mut fields = Vec::with_capacity(occupancy.rooms.len() + 1);
    fields.push(("sessions".to_owned(), occupancy.sessions));
    fields.extend(
        occupancy
            .rooms
            .iter()
            .map(|(room, n)| (format!("{ROOM_FIELD}{room}"), *n)),
    );
    fields
}

/// Adds up the other nodes' presence hashes. Returns the totals and the
/// names whose hash is gone (expired: the node is dead), to be removed from
/// the node set.
pub fn sum_presence(
    nodes: &[String],
    hashes: &[HashMap<String, String>],
) -> (ClusterPresence, Vec<String>) {
    let mut total = ClusterPresence::default();
    let mut dead = Vec::new();
    for (node, hash) in nodes.iter().zip(hashes) {
        if hash.is_empty() {
            dead.push(node.clone());
            continue;
        }
        for (field, value) in hash {
            // Another node's numbers are capped and added saturating: a
            // corrupt hash must not overflow (or dwarf) the totals.
            let Ok(n) = value.parse::<usize>() else {
                continue;
            };
            let n = n.min(MAX_PRESENCE_COUNT);
            if field == "sessions" {
                total.sessions = total.sessions.saturating_add(n);
            } else if let Some(room) = field.strip_prefix(ROOM_FIELD) {
                if let Ok(room) = RoomName::new(room) {
                    let count = total.rooms.entry(room).or_insert(0);
                    *count = count.saturating_add(n);
                }
            }
        }
    }
    (total, dead)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(name: &str) -> RoomName {
        RoomName::new(name).expect("valid room")
    }

    #[test]
    fn presence_adds_up_the_other_nodes_and_finds_the_dead() {
        let fields = presence_fields(&Occupancy {
            sessions: 3,
            rooms: vec![(room("lobby"), 2), (room("sessions"), 1)],
        });
        assert_eq!(fields[0], ("sessions".to_owned(), 3));
        let as_hash = |f: &[(String, usize)]| {
            f.iter()
                .map(|(k, v)| (k.clone(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        let other = as_hash(&presence_fields(&Occupancy {
            sessions: 1,
            rooms: vec![(room("lobby"), 1)],
        }));
        let nodes = vec!["a".to_owned(), "b".to_owned(), "gone".to_owned()];
        let (total, dead) = sum_presence(&nodes, &[as_hash(&fields), other, HashMap::new()]);
        assert_eq!(total.sessions, 4);
        assert_eq!(total.rooms[&room("lobby")], 3);
        assert_eq!(total.rooms[&room("sessions")], 1);
        assert_eq!(dead, vec!["gone".to_owned()]);
    }

    #[test]
    fn remote_presence_counts_cannot_overflow() {
        let huge = |n: &str| {
            [("sessions", n), ("r:lobby", n)]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        let max = usize::MAX.to_string();
        let nodes = vec!["a".to_owned(), "b".to_owned()];
        let (total, _) = sum_presence(&nodes, &[huge(&max), huge(&max)]);
        assert_eq!(total.sessions, 2 * MAX_PRESENCE_COUNT);
        assert_eq!(total.rooms[&room("lobby")], 2 * MAX_PRESENCE_COUNT);
    }
}
