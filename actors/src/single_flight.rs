//! Single-flight bookkeeping for a response cache, as a plain state
//! machine: which keys have an upstream call in the air, who leads each
//! call, and who waits for its outcome.
//!
//! When identical requests miss the cache at once, one of them (the
//! *leader*) calls the upstream and the others (*followers*) wait for its
//! outcome. The hard part is not the happy path but the owners going away:
//! a leader whose caller hangs up or whose deadline fires must not leave its
//! key "in flight" for ever (every later identical call would wait for an
//! outcome that never comes), and a follower that gives up must not keep
//! its place in the waiter list. So every transition has an owner-gone
//! twin, meant to be called from a drop guard:
//!
//! ```text
//!                      join (no flight)                  finish: every waiter gets the outcome
//!   no flight for key ─────────────────► Flight{leader} ───────────────────────────────► no flight
//!        ▲                                │  │  ▲                                           (key free)
//!        │  abandon: the leader went away │  │  │ join: follower queued (≤ max_waiters;
//!        │  (cancelled, deadline fired);  │  │  │ beyond it the caller is Refused)
//!        └─ every waiter is released ─────┘  │  │
//!           (to look again and lead)         └──┘ leave: a follower went away
//! ```
//!
//! Released followers are handed back to the caller, who drops them: in
//! `happynet` a waiter is a oneshot sender, so its follower sees the channel
//! close and tries again (the first to try leads a new flight, the others
//! follow it). The key is free the moment [`SingleFlight::abandon`] returns.
//!
//! Everything is bounded: at most `max_flights` keys are tracked (a caller
//! that finds the table full calls alone, untracked: [`Joined::Alone`]) and
//! at most `max_waiters` followers wait on one flight (the next is
//! [`Joined::Refused`], which the caller answers as "overloaded" rather than
//! adding to the very herd single-flight exists to stop).
//!
//! No clock is needed: a flight ends when its leader ends, and a leader's
//! deadline is the leader's business (its drop guard reports the abandon).
//! Nothing here does I/O; the waiter type `W` is whatever the caller wakes
//! followers with.

use crate::cache::CacheKey;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// Default for [`SingleFlight::new`]'s `max_waiters`: followers waiting on
/// one flight. 1,024 identical requests in the air at once is a herd; past
/// that, refusing is kinder to the upstream than piling on.
pub const DEFAULT_MAX_WAITERS: usize = 1024;

/// Default for [`SingleFlight::new`]'s `max_flights`: distinct keys with a
/// call in the air. Keys come from request targets, which callers choose, so
/// the table must not grow with them; beyond it calls simply are not
/// coalesced.
pub const DEFAULT_MAX_FLIGHTS: usize = 10_000;

/// Names one flight (one leader's call), so that a leader or follower that
/// reports late cannot end or leave a later flight under the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlightId(u64);

/// Names one follower's place in a flight's waiter list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WaiterId(u64);

/// What [`SingleFlight::join`] decided for a caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// No call for the key was in the air: the caller leads this one. It
    /// must end it with [`SingleFlight::finish`], or (from a drop guard, if
    /// it goes away first) [`SingleFlight::abandon`].
    Lead(FlightId),
    /// A call is in the air: the caller's waiter was queued. If the caller
    /// goes away first it calls [`SingleFlight::leave`].
    Follow {
        /// The flight followed.
        flight: FlightId,
        /// The caller's place in it.
        waiter: WaiterId,
    },
    /// A call is in the air and already has `max_waiters` followers: the
    /// caller was not queued.
    Refused {
        /// The followers already waiting.
        waiters: usize,
    },
    /// `max_flights` calls are in the air: the caller should call alone;
    /// nothing was recorded for it.
    Alone,
}

/// What a [`SingleFlight`] has done, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FlightCounters {
    /// Flights started ([`Joined::Lead`]).
    pub led: u64,
    /// Callers queued behind another's flight ([`Joined::Follow`]).
    pub followed: u64,
    /// Flights ended by their leader with an outcome.
    pub finished: u64,
    /// Flights whose leader went away first; their followers were released.
    pub abandoned: u64,
    /// Followers that went away before their flight ended.
    pub left: u64,
    /// Callers refused because their flight had `max_waiters` followers.
    pub refused: u64,
    /// Callers that called alone because `max_flights` flights were up.
    pub alone: u64,
}

/// One call in the air and who waits for it.
#[derive(Debug)]
struct Flight<W> {
    id: FlightId,
    /// By [`WaiterId`]: ids only grow, so this is arrival order.
    waiters: BTreeMap<u64, W>,
}

/// The flights of one cache. See the module docs.
#[derive(Debug)]
pub struct SingleFlight<W> {
    max_waiters: usize,
    max_flights: usize,
    flights: HashMap<CacheKey, Flight<W>>,
    /// Followers waiting, over every flight.
    waiting: usize,
    /// The next flight or waiter id; one sequence for both.
    next_id: u64,
    counters: FlightCounters,
}

impl<W> SingleFlight<W> {
    /// No flights; at most `max_flights` at once, each with at most
    /// `max_waiters` followers. `max_waiters == 0` refuses every follower
    /// (no coalescing, no herd); `max_flights == 0` makes every caller call
    /// alone.
    pub fn new(max_waiters: usize, max_flights: usize) -> Self {
        SingleFlight {
            max_waiters,
            max_flights,
            flights: HashMap::new(),
            waiting: 0,
            next_id: 0,
            counters: FlightCounters::default(),
        }
    }

    /// A caller that missed the cache for `key`: leads a new flight, follows
    /// the one in the air (then `waiter()` is queued; it is not called
    /// otherwise), is refused, or calls alone. See [`Joined`].
    pub fn join(&mut self, key: &CacheKey, waiter: impl FnOnce() -> W) -> Joined {
        if let Some(flight) = self.flights.get_mut(key) {
            let waiters = flight.waiters.len();
            if waiters >= self.max_waiters {
                self.counters.refused += 1;
                return Joined::Refused { waiters };
            }
            let id = self.next_id;
            self.next_id += 1;
            flight.waiters.insert(id, waiter());
            self.waiting += 1;
            self.counters.followed += 1;
            return Joined::Follow {
                flight: flight.id,
                waiter: WaiterId(id),
            };
        }
        if self.flights.len() >= self.max_flights {
            self.counters.alone += 1;
            return Joined::Alone;
        }
        let id = FlightId(self.next_id);
        self.next_id += 1;
        self.flights.insert(
            key.clone(),
            Flight {
                id,
                waiters: BTreeMap::new(),
            },
        );
        self.counters.led += 1;
        Joined::Lead(id)
    }

    /// The leader of `flight` has its outcome: the key is free and every
    /// waiter is returned, in arrival order, to be given the outcome. A
    /// `flight` that is not the key's current one returns nothing.
    pub fn finish(&mut self, key: &CacheKey, flight: FlightId) -> Vec<W> {
        let waiters = self.end(key, flight);
        if waiters.is_some() {
            self.counters.finished += 1;
        }
        waiters.unwrap_or_default()
    }

    /// The leader of `flight` went away without an outcome (its caller hung
    /// up, its deadline fired): the key is free and every waiter is
    /// returned, released, to be told to try again. A `flight` that is not
    /// the key's current one returns nothing.
    pub fn abandon(&mut self, key: &CacheKey, flight: FlightId) -> Vec<W> {
        let waiters = self.end(key, flight);
        if waiters.is_some() {
            self.counters.abandoned += 1;
        }
        waiters.unwrap_or_default()
    }

    /// A follower went away before its flight ended: its place is given up
    /// and its waiter returned. `None` if the flight has already ended (its
    /// waiters went with it) or the waiter is unknown.
    pub fn leave(&mut self, key: &CacheKey, flight: FlightId, waiter: WaiterId) -> Option<W> {
        let f = self.flights.get_mut(key).filter(|f| f.id == flight)?;
        let w = f.waiters.remove(&waiter.0)?;
        self.waiting -= 1;
        self.counters.left += 1;
        Some(w)
    }

    /// Keys with a call in the air.
    pub fn flights(&self) -> usize {
        self.flights.len()
    }

    /// Followers waiting, over every flight.
    pub fn waiters(&self) -> usize {
        self.waiting
    }

    /// True if `key` has a call in the air.
    pub fn is_in_flight(&self, key: &CacheKey) -> bool {
        self.flights.contains_key(key)
    }

    /// What the flights have done so far.
    pub fn counters(&self) -> FlightCounters {
        self.counters
    }

    /// Removes `key`'s flight if it is `flight`; its waiters, or `None`.
    fn end(&mut self, key: &CacheKey, flight: FlightId) -> Option<Vec<W>> {
        if self.flights.get(key)?.id != flight {
            return None;
        }
        let f = self.flights.remove(key)?;
        self.waiting -= f.waiters.len();
        Some(f.waiters.into_values().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(path: &str) -> CacheKey {
        CacheKey::custom(path)
    }

    /// Joins and expects to lead.
    fn lead(sf: &mut SingleFlight<u32>, k: &CacheKey) -> FlightId {
        match sf.join(k, || unreachable!("a leader queues no waiter")) {
            Joined::Lead(id) => id,
            other => panic!("expected to lead, got {other:?}"),
        }
    }

    /// Joins with waiter `w` and expects to follow.
    fn follow(sf: &mut SingleFlight<u32>, k: &CacheKey, w: u32) -> (FlightId, WaiterId) {
        match sf.join(k, || w) {
            Joined::Follow { flight, waiter } => (flight, waiter),
            other => panic!("expected to follow, got {other:?}"),
        }
    }

    #[test]
    fn the_first_caller_leads_the_others_follow_and_finish_hands_them_the_outcome() {
        let mut sf = SingleFlight::new(8, 8);
        let k = key("/a");
        let id = lead(&mut sf, &k);
        for w in 1..=3 {
            let (flight, _) = follow(&mut sf, &k, w);
            assert_eq!(flight, id);
        }
        // Another key is another flight.
        let other = lead(&mut sf, &key("/b"));
        assert_ne!(other, id);
        assert_eq!((sf.flights(), sf.waiters()), (2, 3));
        assert_eq!(sf.finish(&k, id), vec![1, 2, 3], "arrival order");
        assert!(!sf.is_in_flight(&k));
        assert_eq!((sf.flights(), sf.waiters()), (1, 0));
        // The key is free: the next caller leads a new flight.
        let next = lead(&mut sf, &k);
        assert_ne!(next, id);
    }

    #[test]
    fn an_abandoned_flight_frees_its_key_and_releases_every_waiter() {
        let mut sf = SingleFlight::new(8, 8);
        let k = key("/a");
        let id = lead(&mut sf, &k);
        follow(&mut sf, &k, 1);
        follow(&mut sf, &k, 2);
        // The leader's caller hung up, or its deadline fired.
        assert_eq!(sf.abandon(&k, id), vec![1, 2]);
        assert!(!sf.is_in_flight(&k));
        assert_eq!(sf.waiters(), 0);
        // A released follower (or anyone) trying again leads at once, and
        // the others follow it: one upstream call, not a herd.
        let again = lead(&mut sf, &k);
        let (flight, _) = follow(&mut sf, &k, 2);
        assert_eq!(flight, again);
        // The old leader ending late changes nothing.
        assert!(sf.finish(&k, id).is_empty());
        assert!(sf.abandon(&k, id).is_empty());
        assert!(sf.is_in_flight(&k));
        let c = sf.counters();
        assert_eq!((c.led, c.followed, c.abandoned, c.finished), (2, 3, 1, 0));
    }

    #[test]
    fn a_follower_that_leaves_gives_up_its_place_and_only_its_own() {
        let mut sf = SingleFlight::new(2, 8);
        let k = key("/a");
        let id = lead(&mut sf, &k);
        let (_, first) = follow(&mut sf, &k, 1);
        follow(&mut sf, &k, 2);
        assert!(matches!(sf.join(&k, || 3), Joined::Refused { waiters: 2 }));
        assert_eq!(sf.leave(&k, id, first), Some(1));
        assert_eq!(sf.leave(&k, id, first), None, "left once");
        assert_eq!(sf.waiters(), 1);
        // Its place is free for the next follower.
        follow(&mut sf, &k, 4);
        assert_eq!(sf.finish(&k, id), vec![2, 4]);
        // Leaving a flight that has ended is a no-op.
        assert_eq!(sf.leave(&k, id, first), None);
        assert_eq!(sf.counters().left, 1);
    }

    #[test]
    fn leaving_names_the_flight_so_a_late_leave_cannot_touch_a_new_one() {
        let mut sf = SingleFlight::new(8, 8);
        let k = key("/a");
        let old = lead(&mut sf, &k);
        let (_, w) = follow(&mut sf, &k, 1);
        assert_eq!(sf.abandon(&k, old), vec![1]);
        let new = lead(&mut sf, &k);
        follow(&mut sf, &k, 2);
        assert_eq!(sf.leave(&k, old, w), None);
        assert_eq!(sf.finish(&k, new), vec![2]);
    }

    #[test]
    fn the_waiter_list_is_bounded_and_a_refusal_queues_nothing() {
        let mut sf = SingleFlight::new(3, 8);
        let k = key("/hot");
        let id = lead(&mut sf, &k);
        for w in 0..3 {
            follow(&mut sf, &k, w);
        }
        for _ in 0..100 {
            assert_eq!(
                sf.join(&k, || unreachable!("a refused caller queues nothing")),
                Joined::Refused { waiters: 3 }
            );
        }
        assert_eq!(sf.waiters(), 3);
        assert_eq!(sf.counters().refused, 100);
        assert_eq!(sf.finish(&k, id).len(), 3);
        // Zero waiters allowed: nobody is ever queued.
        let mut none = SingleFlight::new(0, 8);
        lead(&mut none, &k);
        assert_eq!(none.join(&k, || 1), Joined::Refused { waiters: 0 });
    }

    #[test]
    fn the_flight_table_is_bounded_and_beyond_it_callers_fly_alone() {
        let mut sf = SingleFlight::new(8, 2);
        let a = lead(&mut sf, &key("/a"));
        lead(&mut sf, &key("/b"));
        assert_eq!(sf.join(&key("/c"), || 1), Joined::Alone);
        assert!(!sf.is_in_flight(&key("/c")));
        // Keys already in the air still coalesce.
        follow(&mut sf, &key("/a"), 1);
        assert_eq!(sf.flights(), 2);
        sf.finish(&key("/a"), a);
        lead(&mut sf, &key("/c"));
        assert_eq!(sf.counters().alone, 1);
    }

    /// Property: over 20,000 random joins, finishes, abandons and leaves on
    /// a few keys, the bounds hold, the waiter total is exact, every waiter
    /// queued comes back exactly once (by finish, abandon or leave), and no
    /// key stays in flight once its leader has ended.
    #[test]
    fn random_interleavings_keep_the_books_exact() {
        let mut rng = crate::backoff::Jitter::with_seed(0x5EED_F11E);
        let mut next = move || rng.next_u64();
        let keys: Vec<CacheKey> = (0..5).map(|i| key(&format!("/k{i}"))).collect();
        let mut sf: SingleFlight<u64> = SingleFlight::new(4, 3);
        let mut leaders: Vec<(usize, FlightId)> = Vec::new();
        let mut followers: Vec<(usize, FlightId, WaiterId, u64)> = Vec::new();
        let (mut queued, mut returned) = (0u64, std::collections::HashSet::new());
        for step in 0..20_000u64 {
            match next() % 4 {
                0 => {
                    let k = (next() % 5) as usize;
                    match sf.join(&keys[k], || step) {
                        Joined::Lead(id) => leaders.push((k, id)),
                        Joined::Follow { flight, waiter } => {
                            queued += 1;
                            followers.push((k, flight, waiter, step));
                        }
                        Joined::Refused { waiters } => assert_eq!(waiters, 4),
                        Joined::Alone => assert_eq!(sf.flights(), 3),
                    }
                }
                1 | 2 if !leaders.is_empty() => {
                    let (k, id) = leaders.swap_remove((next() as usize) % leaders.len());
                    let waiters = if next() % 2 == 0 {
                        sf.finish(&keys[k], id)
                    } else {
                        sf.abandon(&keys[k], id)
                    };
                    for w in waiters {
                        assert!(returned.insert(w), "waiter {w} returned twice");
                    }
                    assert!(!sf.is_in_flight(&keys[k]), "key stuck after its leader");
                }
                _ if !followers.is_empty() => {
                    let (k, flight, waiter, w) =
                        followers.swap_remove((next() as usize) % followers.len());
                    if let Some(got) = sf.leave(&keys[k], flight, waiter) {
                        assert_eq!(got, w);
                        assert!(returned.insert(got), "waiter {got} returned twice");
                    }
                }
                _ => {}
            }
            assert!(sf.flights() <= 3);
            let in_lists: usize = sf.flights.values().map(|f| f.waiters.len()).sum();
            assert_eq!(sf.waiters(), in_lists);
            assert!(sf.flights.values().all(|f| f.waiters.len() <= 4));
            assert_eq!(sf.flights(), leaders.len(), "one flight per live leader");
        }
        for (k, id) in leaders.drain(..) {
            for w in sf.abandon(&keys[k], id) {
                assert!(returned.insert(w));
            }
        }
        assert_eq!(returned.len() as u64, queued, "every waiter came back once");
        assert_eq!((sf.flights(), sf.waiters()), (0, 0));
    }
}
