//! The room table: which sessions are in which rooms, as a plain state machine.
//!
//! The `BroadcastHub` owns one `RoomTable` and consults it for every room
//! broadcast. It is bounded on every axis a client can push on: the length and
//! characters of a room name, how many rooms one session may be in, and how
//! many rooms exist at all. A room disappears with its last member, so the
//! table never holds more than `sessions × max_rooms_per_session` entries.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

/// A session's identity, unique for the life of the process.
pub type SessionId = u64;

/// A validated room name: 1 to [`MAX_ROOM_NAME_BYTES`] bytes of printable text.
///
/// Cheap to clone (shared), so the hub can hand it to every envelope it builds.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(Arc<str>);

/// The longest room name accepted, in bytes.
pub const MAX_ROOM_NAME_BYTES: usize = 64;

/// Why a room name was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RoomNameError {
    /// The name was empty.
    Empty,
    /// The name was longer than [`MAX_ROOM_NAME_BYTES`].
    TooLong,
    /// The name held a control character.
    ControlCharacter,
}

impl fmt::Display for RoomNameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RoomNameError::Empty => f.write_str("room name is empty"),
            RoomNameError::TooLong => {
                write!(f, "room name is longer than {MAX_ROOM_NAME_BYTES} bytes")
            }
            RoomNameError::ControlCharacter => f.write_str("room name holds a control character"),
        }
    }
}

impl std::error::Error for RoomNameError {}

impl RoomName {
    /// Validates `name` as a room name.
    pub fn new(name: &str) -> Result<Self, RoomNameError> {
        if name.is_empty() {
            return Err(RoomNameError::Empty);
        }
        if name.len() > MAX_ROOM_NAME_BYTES {
            return Err(RoomNameError::TooLong);
        }
        if name.chars().any(char::is_control) {
            return Err(RoomNameError::ControlCharacter);
        }
        Ok(RoomName(name.into()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a join was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JoinError {
    /// The session is already in `max_rooms_per_session` rooms.
    TooManyRoomsForSession {
        /// The configured limit.
        limit: usize,
    },
    /// The table already holds `max_rooms` rooms and this one would be new.
    TooManyRooms {
        /// The configured limit.
        limit: usize,
    },
}

impl fmt::Display for JoinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JoinError::TooManyRoomsForSession { limit } => {
                write!(f, "a session may be in at most {limit} rooms")
            }
            JoinError::TooManyRooms { limit } => {
                write!(f, "the server already has its maximum of {limit} rooms")
            }
        }
    }
}

impl std::error::Error for JoinError {}

/// What a join changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// The session was added to the room.
    Added,
    /// The session was already in the room; nothing changed.
    AlreadyMember,
}

/// Rooms and their members, with limits.
#[derive(Debug)]
pub struct RoomTable {
    rooms: HashMap<RoomName, HashSet<SessionId>>,
    memberships: HashMap<SessionId, Vec<RoomName>>,
    max_rooms_per_session: usize,
    max_rooms: usize,
}

impl RoomTable {
    /// An empty table that lets a session be in up to `max_rooms_per_session`
    /// rooms and holds at most `max_rooms` rooms in all.
    pub fn new(max_rooms_per_session: usize, max_rooms: usize) -> Self {
        RoomTable {
            rooms: HashMap::new(),
            memberships: HashMap::new(),
            max_rooms_per_session,
            max_rooms,
        }
    }

    /// Puts `session` in `room`, creating the room if needed.
    pub fn join(&mut self, session: SessionId, room: &RoomName) -> Result<Joined, JoinError> {
        let mine = self
            .memberships
            .get(&session)
            .map_or(&[][..], Vec::as_slice);
        if mine.contains(room) {
            return Ok(Joined::AlreadyMember);
        }
        if mine.len() >= self.max_rooms_per_session {
            return Err(JoinError::TooManyRoomsForSession {
                limit: self.max_rooms_per_session,
            });
        }
        if !self.rooms.contains_key(room) && self.rooms.len() >= self.max_rooms {
            return Err(JoinError::TooManyRooms {
                limit: self.max_rooms,
            });
        }
        self.rooms.entry(room.clone()).or_default().insert(session);
        self.memberships
            .entry(session)
            .or_default()
            .push(room.clone());
        Ok(Joined::Added)
    }

    /// Takes `session` out of `room`. Returns false if it was not a member.
    pub fn leave(&mut self, session: SessionId, room: &RoomName) -> bool {
        let Some(mine) = self.memberships.get_mut(&session) else {
            return false;
        };
        let Some(pos) = mine.iter().position(|r| r == room) else {
            return false;
        };
        mine.swap_remove(pos);
        if mine.is_empty() {
            self.memberships.remove(&session);
        }
        self.remove_member(room, session);
        true
    }

    /// Takes `session` out of every room (it disconnected).
    pub fn remove_session(&mut self, session: SessionId) {
        if let Some(mine) = self.memberships.remove(&session) {
            for room in mine {
                self.remove_member(&room, session);
            }
        }
    }

    fn remove_member(&mut self, room: &RoomName, session: SessionId) {
        if let Some(members) = self.rooms.get_mut(room) {
            members.remove(&session);
            if members.is_empty() {
                self.rooms.remove(room);
            }
        }
    }

    /// The members of `room` (empty if the room does not exist).
    pub fn members(&self, room: &RoomName) -> impl Iterator<Item = SessionId> + '_ {
        self.rooms.get(room).into_iter().flatten().copied()
    }

    /// How many sessions are in `room`.
    pub fn member_count(&self, room: &RoomName) -> usize {
        self.rooms.get(room).map_or(0, HashSet::len)
    }

    /// The rooms `session` is in.
    pub fn rooms_of(&self, session: SessionId) -> &[RoomName] {
        self.memberships.get(&session).map_or(&[], Vec::as_slice)
    }

    /// True if `session` is in `room`.
    pub fn is_member(&self, session: SessionId, room: &RoomName) -> bool {
        self.rooms_of(session).contains(room)
    }

    /// Every session that shares at least one room with `session`, each once.
    pub fn room_mates(&self, session: SessionId) -> HashSet<SessionId> {
        let mut out = HashSet::new();
        for room in self.rooms_of(session) {
            out.extend(self.members(room));
        }
        out
    }

    /// How many rooms exist.
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// Every room with its member count.
    pub fn occupancy(&self) -> impl Iterator<Item = (&RoomName, usize)> + '_ {
        self.rooms
            .iter()
            .map(|(name, members)| (name, members.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(name: &str) -> RoomName {
        RoomName::new(name).unwrap()
    }

    #[test]
    fn room_names_are_validated() {
        assert_eq!(RoomName::new(""), Err(RoomNameError::Empty));
        assert_eq!(
            RoomName::new(&"x".repeat(MAX_ROOM_NAME_BYTES + 1)),
            Err(RoomNameError::TooLong)
        );
        assert!(RoomName::new(&"x".repeat(MAX_ROOM_NAME_BYTES)).is_ok());
        assert_eq!(RoomName::new("a\nb"), Err(RoomNameError::ControlCharacter));
        assert_eq!(room("café ☕").as_str(), "café ☕");
    }

    #[test]
    fn join_leave_and_members() {
        let mut t = RoomTable::new(4, 100);
        let (a, b) = (room("a"), room("b"));
        assert_eq!(t.join(1, &a), Ok(Joined::Added));
        assert_eq!(t.join(1, &a), Ok(Joined::AlreadyMember));
        assert_eq!(t.join(2, &a), Ok(Joined::Added));
        assert_eq!(t.join(2, &b), Ok(Joined::Added));
        let mut in_a: Vec<_> = t.members(&a).collect();
        in_a.sort();
        assert_eq!(in_a, vec![1, 2]);
        assert_eq!(t.members(&b).collect::<Vec<_>>(), vec![2]);
        assert!(t.is_member(2, &b));
        assert!(!t.is_member(1, &b));

        assert!(t.leave(2, &a));
        assert!(!t.leave(2, &a), "leaving twice is a no-op");
        assert_eq!(t.members(&a).collect::<Vec<_>>(), vec![1]);
        assert_eq!(t.rooms_of(2), std::slice::from_ref(&b));
    }

    #[test]
    fn a_room_disappears_with_its_last_member() {
        let mut t = RoomTable::new(4, 100);
        let a = room("a");
        t.join(1, &a).unwrap();
        t.join(2, &a).unwrap();
        assert_eq!(t.room_count(), 1);
        t.remove_session(1);
        assert_eq!(t.room_count(), 1);
        t.leave(2, &a);
        assert_eq!(t.room_count(), 0);
        assert_eq!(t.member_count(&a), 0);
        assert!(t.rooms_of(2).is_empty());
    }

    #[test]
    fn limits_rooms_per_session_and_in_all() {
        let mut t = RoomTable::new(2, 3);
        t.join(1, &room("a")).unwrap();
        t.join(1, &room("b")).unwrap();
        assert_eq!(
            t.join(1, &room("c")),
            Err(JoinError::TooManyRoomsForSession { limit: 2 })
        );
        t.join(2, &room("c")).unwrap();
        assert_eq!(
            t.join(3, &room("d")),
            Err(JoinError::TooManyRooms { limit: 3 })
        );
        // Joining an existing room is fine at the room limit.
        assert_eq!(t.join(3, &room("a")), Ok(Joined::Added));
        // Leaving frees a slot for the session.
        t.leave(1, &room("a"));
        assert_eq!(t.join(1, &room("c")), Ok(Joined::Added));
    }

    #[test]
    fn room_mates_are_counted_once_across_shared_rooms() {
        let mut t = RoomTable::new(4, 100);
        for s in [1, 2] {
            t.join(s, &room("a")).unwrap();
            t.join(s, &room("b")).unwrap();
        }
        t.join(3, &room("b")).unwrap();
        t.join(4, &room("z")).unwrap();
        let mut mates: Vec<_> = t.room_mates(1).into_iter().collect();
        mates.sort();
        assert_eq!(mates, vec![1, 2, 3]);
    }

    #[test]
    fn removing_every_session_empties_the_table() {
        let mut t = RoomTable::new(8, 10_000);
        for s in 0..1000u64 {
            for r in 0..(s % 8) {
                t.join(s, &room(&format!("r{}", (s + r) % 50))).unwrap();
            }
        }
        for s in 0..1000u64 {
            t.remove_session(s);
        }
        assert_eq!(t.room_count(), 0);
        assert!(t.memberships.is_empty());
    }
}
