//! The room table: which sessions are in which rooms, as a plain state machine.
//!
//! The `BroadcastHub` owns one `RoomTable` and consults it for every room
//! broadcast. It is bounded on every axis a client can push on: the length and
//! characters of a room name, how many rooms one session may be in, how many
//! rooms one client address may have created, and how many rooms exist at
//! all. A room disappears with its last member, so the table never holds more
//! than `sessions × max_rooms_per_session` entries.
//!
//! **Rooms per address.** The per-session quota alone lets one address fill
//! the table for everyone: open many sessions, join many new rooms from each.
//! So a room is charged to the address (the per-IP key: an IPv4 address or
//! an IPv6 /64) of the session whose join created it, and stays charged until
//! it disappears, whoever else joins it later. An address with
//! `max_rooms_per_ip` rooms charged to it may still join existing rooms, but
//! not create new ones. Charging the creator, rather than "rooms only that
//! address is in", cannot be dodged by two addresses joining each other's
//! rooms. Its one cost: a room another address keeps alive after its creator
//! left stays charged to the creator. Sessions without a key (exempt
//! addresses, see `network.security.exempt_ips`) create rooms uncharged.

use crate::capacity;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
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
    /// The session's address has already created `max_rooms_per_ip` rooms
    /// that still exist, and this one would be new.
    TooManyRoomsForAddress {
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
            JoinError::TooManyRoomsForAddress { limit } => write!(
                f,
                "your address has created its maximum of {limit} rooms; join an existing room \
                 or leave one you created"
            ),
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
    /// 0: no per-address quota.
    max_rooms_per_ip: usize,
    /// The address each charged room is charged to (rooms created by a
    /// session without a key are not here).
    creators: HashMap<RoomName, IpAddr>,
    /// Rooms charged to each address; an address leaves the map at zero, so
    /// it holds at most one entry per existing room.
    created_by: HashMap<IpAddr, usize>,
}

impl RoomTable {
    /// An empty table that lets a session be in up to `max_rooms_per_session`
    /// rooms and holds at most `max_rooms` rooms in all, with no quota per
    /// address (see [`RoomTable::with_max_rooms_per_ip`]).
    pub fn new(max_rooms_per_session: usize, max_rooms: usize) -> Self {
        RoomTable {
            rooms: HashMap::new(),
            memberships: HashMap::new(),
            max_rooms_per_session,
            max_rooms,
            max_rooms_per_ip: 0,
            creators: HashMap::new(),
            created_by: HashMap::new(),
        }
    }

    /// Lets each address have created at most `max` rooms that still exist
    /// (see the module docs); 0 turns the quota off.
    pub fn with_max_rooms_per_ip(mut self, max: usize) -> Self {
        self.max_rooms_per_ip = max;
        self
    }

    /// Puts `session` in `room`, creating the room if needed, with no
    /// address to charge a new room to.
    pub fn join(&mut self, session: SessionId, room: &RoomName) -> Result<Joined, JoinError> {
        self.join_from(session, room, None)
    }

    /// Puts `session`, whose client's per-IP key is `ip` (`None`: exempt or
    /// unknown), in `room`. A room this creates is charged to `ip`.
    pub fn join_from(
        &mut self,
        session: SessionId,
        room: &RoomName,
        ip: Option<IpAddr>,
    ) -> Result<Joined, JoinError> {
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
        let creates = !self.rooms.contains_key(room);
        // A charged key, when this join would create a room under a quota.
        let charge = ip.filter(|_| creates && self.max_rooms_per_ip > 0);
        if let Some(ip) = charge {
            // Checked before the table-wide limit: leaving its own rooms is
            // what this client can do about it.
            if self.rooms_created_by(ip) >= self.max_rooms_per_ip {
                return Err(JoinError::TooManyRoomsForAddress {
                    limit: self.max_rooms_per_ip,
                });
            }
        }
        if creates && self.rooms.len() >= self.max_rooms {
            return Err(JoinError::TooManyRooms {
                limit: self.max_rooms,
            });
        }
        if let Some(ip) = charge {
            self.creators.insert(room.clone(), ip);
            *self.created_by.entry(ip).or_insert(0) += 1;
        }
        self.rooms.entry(room.clone()).or_default().insert(session);
        self.memberships
            .entry(session)
            // Most sessions are in one room for life: room for one, not
            // the four a first push would make (memory per connection).
            .or_insert_with(|| Vec::with_capacity(1))
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
            capacity::shrink_map(&mut self.memberships);
        }
        self.remove_member(room, session);
        true
    }

    /// Takes `session` out of every room (it disconnected). Tables left
    /// mostly empty shrink (see [`crate::capacity`]): a crowd that came and
    /// went leaves no room for itself behind.
    pub fn remove_session(&mut self, session: SessionId) {
        if let Some(mine) = self.memberships.remove(&session) {
            capacity::shrink_map(&mut self.memberships);
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
                capacity::shrink_map(&mut self.rooms);
                self.uncharge(room);
            } else {
                capacity::shrink_set(members);
            }
        }
    }

    /// The most room any of the table's maps has, and how many entries the
    /// largest holds: what [`crate::capacity::ceiling`] bounds.
    #[cfg(test)]
    fn room_kept(&self) -> Vec<(usize, usize)> {
        let mut kept = vec![
            (self.rooms.len(), self.rooms.capacity()),
            (self.memberships.len(), self.memberships.capacity()),
            (self.creators.len(), self.creators.capacity()),
            (self.created_by.len(), self.created_by.capacity()),
        ];
        kept.extend(self.rooms.values().map(|m| (m.len(), m.capacity())));
        kept
    }

    /// A room disappeared: its creator's address may create another.
    fn uncharge(&mut self, room: &RoomName) {
        let Some(ip) = self.creators.remove(room) else {
            return;
        };
        capacity::shrink_map(&mut self.creators);
        if let Some(n) = self.created_by.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.created_by.remove(&ip);
                capacity::shrink_map(&mut self.created_by);
            }
        }
    }

    /// How many existing rooms are charged to the address `ip`.
    pub fn rooms_created_by(&self, ip: IpAddr) -> usize {
        self.created_by.get(&ip).copied().unwrap_or(0)
    }

    /// How many addresses have rooms charged to them.
    pub fn creator_count(&self) -> usize {
        self.created_by.len()
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
    fn after_a_crowd_leaves_every_map_of_the_table_is_back_under_its_ceiling() {
        let mut t = RoomTable::new(4, 10_000).with_max_rooms_per_ip(10_000);
        let lobby = room("lobby");
        for s in 0..3000u64 {
            t.join(s, &lobby).unwrap();
            let ip = IpAddr::from([10, 0, (s >> 8) as u8, s as u8]);
            t.join_from(s, &room(&format!("own-{s}")), Some(ip))
                .unwrap();
        }
        assert!(t.room_kept().iter().any(|&(_, cap)| cap >= 3000));
        for s in 0..3000u64 {
            if s % 2 == 0 {
                t.remove_session(s);
            } else {
                assert!(t.leave(s, &room(&format!("own-{s}"))));
                assert!(t.leave(s, &lobby));
            }
            for (len, cap) in t.room_kept() {
                assert!(
                    cap <= capacity::ceiling(len),
                    "{len} entries, room for {cap}"
                );
            }
        }
        assert_eq!(t.room_count(), 0);
        assert_eq!(t.creator_count(), 0);
        // One session in one room holds room for one room name.
        t.join(1, &lobby).unwrap();
        assert_eq!(t.rooms_of(1).len(), 1);
        assert_eq!(t.memberships[&1].capacity(), 1);
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

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_address_cannot_fill_the_table_for_everyone() {
        // Eight sessions from one address, each allowed 16 rooms: without a
        // per-address quota they could create 128 of the table's 100.
        let mut t = RoomTable::new(16, 100).with_max_rooms_per_ip(10);
        let flooder = ip("203.0.113.7");
        let mut created = 0;
        let mut refused = 0;
        for s in 0..8u64 {
            for r in 0..16 {
                match t.join_from(s, &room(&format!("flood-{s}-{r}")), Some(flooder)) {
                    Ok(Joined::Added) => created += 1,
                    Err(JoinError::TooManyRoomsForAddress { limit: 10 }) => refused += 1,
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert_eq!((created, refused), (10, 118));
        assert_eq!(t.rooms_created_by(flooder), 10);
        assert_eq!(t.room_count(), 10);
        // Another address still creates rooms, up to its own quota.
        let other = ip("198.51.100.9");
        for r in 0..10 {
            assert_eq!(
                t.join_from(100, &room(&format!("mine-{r}")), Some(other)),
                Ok(Joined::Added)
            );
        }
        // The flooder may still join rooms that exist: it creates nothing.
        assert_eq!(
            t.join_from(7, &room("mine-0"), Some(flooder)),
            Ok(Joined::Added)
        );
        assert_eq!(t.rooms_created_by(flooder), 10);
        assert_eq!(t.rooms_created_by(other), 10);
    }

    #[test]
    fn a_room_stays_charged_to_its_creator_until_it_disappears() {
        let mut t = RoomTable::new(4, 100).with_max_rooms_per_ip(1);
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        t.join_from(1, &room("r"), Some(a)).unwrap();
        // b joining does not move the charge, and a's creator leaving does
        // not free it while b keeps the room alive.
        t.join_from(2, &room("r"), Some(b)).unwrap();
        t.leave(1, &room("r"));
        assert_eq!(
            t.join_from(1, &room("s"), Some(a)),
            Err(JoinError::TooManyRoomsForAddress { limit: 1 })
        );
        assert_eq!(t.rooms_created_by(b), 0);
        // The room goes with its last member, and so does the charge.
        t.remove_session(2);
        assert_eq!(t.room_count(), 0);
        assert_eq!(t.rooms_created_by(a), 0);
        assert_eq!(
            t.creator_count(),
            0,
            "no entry is kept for an address at zero"
        );
        assert_eq!(t.join_from(1, &room("s"), Some(a)), Ok(Joined::Added));
    }

    #[test]
    fn uncharged_sessions_and_a_zero_quota_are_not_limited_per_address() {
        // No key (an exempt address): rooms are created uncharged.
        let mut t = RoomTable::new(64, 100).with_max_rooms_per_ip(2);
        for r in 0..50 {
            t.join_from(1, &room(&format!("r{r}")), None).unwrap();
        }
        assert_eq!(t.creator_count(), 0);
        // Quota 0: off.
        let mut t = RoomTable::new(64, 50);
        for r in 0..50 {
            t.join_from(1, &room(&format!("r{r}")), Some(ip("192.0.2.1")))
                .unwrap();
        }
        assert_eq!(t.rooms_created_by(ip("192.0.2.1")), 0);
        // The table-wide limit still holds for everyone.
        assert_eq!(
            t.join_from(2, &room("one-too-many"), None),
            Err(JoinError::TooManyRooms { limit: 50 })
        );
    }

    #[test]
    fn the_address_quota_is_checked_before_the_table_limit() {
        let mut t = RoomTable::new(8, 2).with_max_rooms_per_ip(2);
        let a = ip("192.0.2.1");
        t.join_from(1, &room("x"), Some(a)).unwrap();
        t.join_from(1, &room("y"), Some(a)).unwrap();
        // Full table and a at its quota: a is told about its own quota.
        assert_eq!(
            t.join_from(1, &room("z"), Some(a)),
            Err(JoinError::TooManyRoomsForAddress { limit: 2 })
        );
        assert_eq!(
            t.join_from(2, &room("z"), Some(ip("192.0.2.2"))),
            Err(JoinError::TooManyRooms { limit: 2 })
        );
    }

    /// Property: after any interleaving of joins, leaves and disconnects,
    /// each address's charge is exactly the rooms that exist and were
    /// created by it, and never over the quota.
    #[test]
    fn charges_match_the_rooms_that_exist() {
        let mut rng = crate::backoff::Jitter::with_seed(0x9E37_79B9_7F4A_7C15);
        let mut next = move |n: u64| rng.next_u64() % n;
        let addrs = [ip("192.0.2.1"), ip("192.0.2.2"), ip("2001:db8::")];
        let mut t = RoomTable::new(4, 40).with_max_rooms_per_ip(6);
        let mut creator_of: HashMap<RoomName, Option<IpAddr>> = HashMap::new();
        for _ in 0..20_000 {
            let s = next(30);
            let key = match s % 4 {
                3 => None,
                k => Some(addrs[k as usize]),
            };
            let r = room(&format!("r{}", next(60)));
            match next(10) {
                0..=5 => {
                    let existed = t.member_count(&r) > 0;
                    if t.join_from(s, &r, key) == Ok(Joined::Added) && !existed {
                        creator_of.insert(r, key);
                    }
                }
                6..=8 => {
                    t.leave(s, &r);
                }
                _ => t.remove_session(s),
            }
            creator_of.retain(|r, _| t.member_count(r) > 0);
        }
        for a in addrs {
            let expected = creator_of.values().filter(|k| **k == Some(a)).count();
            assert_eq!(t.rooms_created_by(a), expected);
            assert!(expected <= 6);
        }
        for s in 0..30 {
            t.remove_session(s);
        }
        assert_eq!(t.creator_count(), 0);
        assert!(t.creators.is_empty());
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
