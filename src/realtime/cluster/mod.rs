//! Scale-out through Redis: the [`ClusterBridge`] actor, which carries the
//! broadcasts that originate on this node to every other node and back, and
//! shares room occupancy (presence) across the cluster.
//!
//! # Design
//!
//! **One Redis Stream per cluster**, `{prefix}:broadcasts`. Each node
//! `XADD`s the broadcasts that originate locally (`MAXLEN ~
//! stream_max_len`), and reads the stream with a blocking `XREAD` on a
//! connection of its own (a blocking read on a shared, multiplexed
//! connection would stall every other command behind it). Redis work is
//! therefore one `XADD` per broadcast plus about one read per node per
//! batch: proportional to nodes, independent of connections and rooms. A
//! node filters by room locally; a message for a room with no member here
//! costs a hash lookup. There is no subscription per room or per connection.
//!
//! **Entries** have four fields: `node` (the origin: random per process
//! start), `seq` (consecutive per origin), `target` (`all` or a JSON array of
//! room names) and `payload` (the frame's data, verbatim); a binary
//! broadcast has a fifth, `kind` = `binary`, and is delivered as a binary
//! frame (without it an entry is text, so text entries read the same as
//! before binary existed). A node skips its own entries (it delivered them
//! locally before relaying) and tracks the
//! last `seq` of every other origin ([`SeqTracker`]): a jump is a gap of
//! exactly `seq - last - 1` lost messages, logged and counted, even when the
//! stream was trimmed past what was missed. A repeated `seq` (an `XADD`
//! retried after a lost reply) is dropped. (With history on, a node's own
//! entries are the exception: see below.)
//!
//! **Failures.** Local delivery never waits for a Redis that is down: the
//! hub delivers before it relays (with history on, a node's own broadcasts
//! take the stream while the link is up, and the bridge delivers at once
//! what it cannot publish: below). Broadcasts for other nodes wait in a bounded
//! [`Outbox`] while the link is down and are flushed in order when it comes
//! back; a full outbox drops its oldest and counts them (`lost_outbound`).
//! The reader resumes `XREAD` from the last id it saw, so entries still in
//! the stream are replayed (`replayed`). The link reconnects with
//! exponential backoff and jitter ([`LinkState`]), reset only once a read
//! has succeeded. Replies are read raw and decoded entry by entry, so an
//! entry that cannot be decoded is skipped and counted (`malformed`), never
//! a broken link. The guarantee, across nodes: at most once, and nothing
//! lost while the outage is shorter than what the sender's outbox holds
//! *and* the stream still holds the entries when the reader is back. Losses
//! beyond that are counted where they can be seen: the sender's outbox
//! overflow (`lost_outbound`), a gap in an origin's sequence once its next
//! entry arrives (`lost_inbound`: overflow, trimming, a Redis that lost
//! data), a full hub mailbox (`dropped_inbound`). A node's last messages
//! before it dies leave no later entry to reveal the gap and are not
//! counted.
//!
//! **History: Redis is the sequencer.** With `websocket.history` on, no
//! broadcast that originates here is delivered here first: the hub hands
//! each to the bridge ([`Sequence`](happynet_actors::Sequence)), in its
//! order, whose outbox publishes them, in that order, through the
//! sequencer's Lua script ([`sequencer`]): per room, the room's record
//! `{prefix}:room:{room}` (`epoch`, `offset`; created with this node's
//! candidate epoch when missing, expiring after [`record_ttl`]) gives a
//! room broadcast its next offset, and the entry is `XADD`ed with a sixth
//! field, `positions`, in the same atomic step; a broadcast to everyone
//! is `XADD`ed plain by the same call. Every node, this one too, delivers
//! them from the stream, in stream order: with history on a node's own
//! entries are not skipped, and [`SeqTracker::observe_positioned`] drops
//! their repeats. So the stream is one order of this node's broadcasts,
//! whatever their targets, and every receiver sees each sender's in the
//! order sent. A broadcast to one session (session ids are per node) is
//! not published: the bridge holds it ([`Held`]) behind this node's own
//! entries not delivered here yet and hands it to the hub in its turn; so
//! does a closing session's flush, which therefore still comes behind the
//! session's own messages (held at most [`FLUSH_WAIT`](happynet_actors::FLUSH_WAIT)). A
//! node that starts reads the stream's positioned entries back into its
//! history first ([`BACKFILL_PAGE`] at a time, up to the newest id at
//! link-up, where the reader then starts: nothing between). The cost:
//! local delivery of every broadcast, to everyone too, waits for one round
//! trip to Redis and the reader's wake.
//!
//! **The link down, with history on.** Local delivery still does not
//! wait: a broadcast that cannot be published now is delivered here at
//! once (a room broadcast stamped by the hub itself in a node-local epoch:
//! recoveries across the outage are `complete:false`, never wrong), and
//! waits in the outbox as a plain entry, relayed as before when the link is
//! back (its receivers stamp room ones locally too). When the link is lost,
//! every own broadcast not yet read back from the stream — waiting, being published,
//! or published and unconfirmed ([`Unconfirmed`]) — is delivered here the
//! same way, in order; a script that ran although its reply was lost left
//! a positioned copy in the stream, which is then a repeat by `seq`
//! ([`SeqTracker::claim_own`]) on this node, and the plain copy a
//! repeat on the others; one whose copy was read back (and delivered)
//! before its reply came is not delivered again. Each message is therefore delivered once on every
//! node, and a script call is never resent: a batch is one `EVALSHA`, all
//! or nothing.
//!
//! **Presence.** Every `presence_interval_ms` the bridge writes this node's
//! occupancy to the hash `{prefix}:presence:{node}` (expiring after three
//! intervals, so a dead node drops out by itself), reads the other nodes'
//! hashes (named in the set `{prefix}:nodes`) and tells the hub their totals
//! ([`ClusterPresence`](happynet_actors::ClusterPresence)). Cost:
//! O(nodes + rooms) per interval, nothing per message.
//!
//! # Layout
//!
//! One file per part named above. All but the bridge are plain code that
//! takes `now` and does no I/O, unit-tested in its own file; the actor is
//! their shell.
//!
//! - [`wire`]: stream ids, and entries written for `XADD` and decoded from
//!   raw `XREAD` replies;
//! - [`outbox`]: the bounded, numbered queue of broadcasts for the other
//!   nodes;
//! - [`sequence`]: the last `seq` of every origin ([`SeqTracker`]): own
//!   entries, repeats and gaps;
//! - [`sequencer`]: the Lua script that positions room broadcasts and
//!   publishes a batch, its arguments, the own entries published but not
//!   yet read back ([`Unconfirmed`]), and what waits behind them
//!   ([`Held`]);
//! - [`link`]: up or down, and when to reconnect ([`LinkState`]), on the
//!   reconnect policy the shared rate limits use too
//!   ([`happynet_actors::reconnect`]);
//! - [`presence`]: this node's occupancy as a hash, the other nodes' added
//!   up;
//! - [`bridge`]: the [`ClusterBridge`] actor, which does the Redis I/O, and
//!   its messages.

pub mod bridge;
pub mod link;
pub mod outbox;
pub mod presence;
pub mod sequence;
pub mod sequencer;
pub mod wire;

pub use bridge::{
    short_error, ClusterBridge, ClusterStats, GetClusterStats, Leave, BACKFILL_PAGE,
    COMMAND_TIMEOUT, CONNECT_TIMEOUT, LEAVE_TIMEOUT, MAX_ERROR_CHARS, PUBLISH_BATCH, READ_BLOCK,
    READ_GRACE, SETUP_TIMEOUT,
};
pub use link::LinkState;
pub use outbox::{OutEntry, Outbox, Pushed};
pub use presence::{
    presence_fields, sum_presence, MAX_PRESENCE_COUNT, MAX_PRESENCE_NODES, PRESENCE_TTL_INTERVALS,
};
pub use sequence::{Seen, SeqTracker, MAX_ORIGINS, ORIGIN_TTL};
pub use sequencer::{
    candidate_epoch, record_ttl, room_key, script_call, Held, ScriptCall, ScriptContext,
    Unconfirmed, RECORD_TTL_FLOOR, SCRIPT,
};
pub use wire::{
    add_xadd, decode_entry, decode_positions, decode_read_reply, decode_target, decode_top_id,
    encode_positions, encode_target, InEntry, StreamId, KIND_BINARY,
};
