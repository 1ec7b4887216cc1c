//! Giving memory back after churn: when a per-session table or queue holds
//! far less than it has room for, it shrinks.
//!
//! A `HashMap`, `HashSet` or `VecDeque` grows to fit the most it has ever
//! held and keeps that room when entries leave. For the hub that means a
//! shard which once held 5,000 sessions keeps room for 5,000 (a few hundred
//! KiB) after they have gone, and a session's delivery queue that once
//! took a burst keeps room for the burst for the rest of its life; with
//! many idle sessions the second is what costs. So:
//!
//! - a table shrinks when its capacity is more than four times what it
//!   holds (and above [`KEPT_SLOTS`]), to fit what it holds: the room left
//!   is at most about twice that, so it takes losing about half of its
//!   entries again before the next shrink, and each shrink (a rehash of
//!   what is left) is paid for by the removals before it;
//! - a queue gives its storage back as soon as it is empty: an idle
//!   session keeps no room at all for frames (even four 40-byte slots, the
//!   least a `VecDeque` allocates, are 160 bytes per connection); the next
//!   pass that has frames allocates again, one small allocation against
//!   the write it leads to.
//!
//! Plain functions of `len` and `capacity`, unit-tested here; the hub, the
//! room table and the delivery queue call them where entries leave.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;

/// Room a table always keeps: shrinking below it saves little and would
/// make the first sessions after a quiet spell grow it again.
pub const KEPT_SLOTS: usize = 64;

/// The most room a table holding `len` entries keeps (see the module
/// docs): above it, [`shrink_to`] says to shrink.
pub fn ceiling(len: usize) -> usize {
    len.max(KEPT_SLOTS).saturating_mul(4)
}

/// What a table of `len` entries and `capacity` should shrink to, if it
/// should.
pub fn shrink_to(len: usize, capacity: usize) -> Option<usize> {
    (capacity > ceiling(len)).then_some(len.max(KEPT_SLOTS))
}

/// Shrinks `map` if it is sparse (see [`shrink_to`]).
pub fn shrink_map<K: Eq + Hash, V>(map: &mut HashMap<K, V>) {
    if let Some(to) = shrink_to(map.len(), map.capacity()) {
        map.shrink_to(to);
    }
}

/// Shrinks `set` if it is sparse (see [`shrink_to`]).
pub fn shrink_set<T: Eq + Hash>(set: &mut HashSet<T>) {
    if let Some(to) = shrink_to(set.len(), set.capacity()) {
        set.shrink_to(to);
    }
}

/// Frees `queue`'s storage if it is empty.
pub fn release_drained<T>(queue: &mut VecDeque<T>) {
    if queue.is_empty() && queue.capacity() > 0 {
        *queue = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_shrinks_only_when_mostly_empty_and_above_the_floor() {
        assert_eq!(shrink_to(0, KEPT_SLOTS * 4), None);
        assert_eq!(shrink_to(0, KEPT_SLOTS * 4 + 1), Some(KEPT_SLOTS));
        assert_eq!(shrink_to(1000, 4000), None);
        assert_eq!(shrink_to(1000, 4001), Some(1000));
        assert_eq!(shrink_to(10, 300), Some(KEPT_SLOTS));
    }

    #[test]
    fn after_a_crowd_leaves_a_map_is_back_under_its_ceiling_at_every_step() {
        let mut map = HashMap::new();
        for i in 0..5000u64 {
            map.insert(i, i);
        }
        let mut shrinks = 0;
        for i in 0..5000u64 {
            map.remove(&i);
            if shrink_to(map.len(), map.capacity()).is_some() {
                shrinks += 1;
            }
            shrink_map(&mut map);
            assert!(
                map.capacity() <= ceiling(map.len()),
                "{} entries, room for {}",
                map.len(),
                map.capacity()
            );
        }
        assert!(map.capacity() <= ceiling(0));
        // Halving steps, not one per removal: each rehash is paid for by
        // the removals before it.
        assert!(shrinks <= 8, "{shrinks} shrinks");
    }

    #[test]
    fn a_set_shrinks_the_same_way() {
        let mut set: HashSet<u64> = (0..1000).collect();
        set.clear();
        shrink_set(&mut set);
        assert!(set.capacity() <= ceiling(0));
    }

    #[test]
    fn a_drained_queue_gives_its_storage_back_a_busy_one_keeps_it() {
        let mut q: VecDeque<u32> = (0..1000).collect();
        release_drained(&mut q);
        assert!(q.capacity() >= 1000, "not empty: kept");
        q.clear();
        release_drained(&mut q);
        assert_eq!(q.capacity(), 0);
        let mut one: VecDeque<u32> = VecDeque::new();
        one.push_back(1);
        release_drained(&mut one);
        assert_eq!(one.len(), 1, "a frame still queued is kept");
        one.pop_front();
        release_drained(&mut one);
        assert_eq!(one.capacity(), 0);
    }
}
