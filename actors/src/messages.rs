//! Every message between the [`BroadcastHub`](crate::hub::BroadcastHub) and
//! its peers, with their replies, in one place: a reader sees the whole
//! conversation here, and the two actors' files hold only what they do with
//! it.
//!
//! - **Session → hub**: [`Connect`] (sent by the upgrade route for the
//!   session, before the `101`), [`FromClient`], [`Flush`], [`Disconnect`];
//! - **hub → session**: [`Heartbeat`], [`Close`], [`Flushed`]; data does not
//!   travel as a message but as encoded frames in the session's delivery
//!   queue ([`crate::delivery`]);
//! - **app code and routes → hub**: [`Broadcast`] (to a [`Target`]),
//!   [`GetHubStats`] (answered with the hub's [`HubStats`]), [`GetHistory`]
//!   (answered with a [`HistoryPage`]), [`Shutdown`];
//! - **hub ↔ cluster bridge**: the hub hands local broadcasts to its relay
//!   ([`Relay`], installed with [`SetRelay`]); the bridge asks for
//!   [`GetOccupancy`] and sends back the other nodes' [`ClusterPresence`];
//!   remote broadcasts come in as [`Broadcast::from_cluster`].
//!
//! How each is sent is part of its contract, written on it: a request that
//! waits gets a timeout (`send(..).timeout(..)`), a message a peer could
//! flood goes with `try_send` into a bounded mailbox, and `do_send` is kept
//! for messages bounded by construction (one per connection, one per
//! interval).

use crate::histogram::Histogram;
use crate::history::{HistoryEntry, Position, Recover};
use crate::liveness::{ClosedBy, SessionLink};
use crate::protocol::{self, ClientFrame, ClientKind};
use crate::rooms::{RoomName, SessionId};
use crate::session::WsSessionActor;
use actix::prelude::*;
use actix_web::web::Bytes;
use actix_web_actors::ws::CloseCode;
use bytestring::ByteString;
use serde::Serialize;
use socket2::Socket;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

// ---------------------------------------------------------------------------
// The data every message carries
// ---------------------------------------------------------------------------

// [`Payload`]: the data of one WebSocket message, text or binary, as it
// travels from a broadcast through the hub to every recipient's socket and
// to the other nodes.
//
// Both variants are reference-counted buffers, so cloning one for each of
// 5,000 recipients is a counter increment, not a copy. Keeping the kind
// next to the bytes is also what later work needs to encode a frame once
// per broadcast: the frame header depends on it.
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

// ---------------------------------------------------------------------------
// Session → hub
// ---------------------------------------------------------------------------

/// Sent by the upgrade route before it returns the `101`: register this
/// session and put it in `room`. The route waits for the answer
/// (`send(..).timeout(..)`), so that broadcasts sent after the client holds
/// its `101` reach it; `Err` is why the hub refused it, answered with an
/// HTTP status instead of the upgrade.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), ConnectRefused>")]
pub struct Connect {
    /// The session's id, allocated by whoever accepted the connection.
    pub id: SessionId,
    /// Where to deliver frames.
    pub addr: Addr<WsSessionActor>,
    /// The state shared with the hub (last heard from, bytes queued).
    pub link: Arc<SessionLink>,
    /// The room to start in.
    pub room: RoomName,
    /// Whether the session wants presence frames (protocol clients only).
    pub presence: bool,
    /// Plain (data only) or protocol (welcome, control and error frames).
    pub kind: ClientKind,
    /// A duplicate of the connection's socket, so that the hub can shut down
    /// a session whose actor is frozen. `None` when the server was not set up
    /// to provide one (see `happynet::Network::on_connect`).
    pub socket: Option<Arc<Socket>>,
    /// The client's per-IP key (its IPv4 address, or its IPv6 /64), which
    /// rooms it creates are charged to; `None` for an exempt or unknown
    /// address, whose rooms are not counted per address.
    pub ip_key: Option<IpAddr>,
    /// What to replay from `room`'s history once registered (`/ws?since=`
    /// or `recover=last`; protocol clients only): the shard answers with a
    /// `recovered` frame, then the messages, then live ones.
    pub recover: Option<Recover>,
}

/// Why the hub refused a [`Connect`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectRefused {
    /// A graceful shutdown has begun.
    ShuttingDown,
    /// The room could not be joined (the table holds `max_rooms`), and the
    /// client is plain: no frame could tell it so.
    RoomTableFull(String),
    /// The room would be new and the client's address has created
    /// `max_rooms_per_ip` rooms that still exist; the client is plain.
    RoomQuota(String),
    /// The session's actor was already gone (its upgrade was abandoned).
    Gone,
}

impl std::fmt::Display for ConnectRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectRefused::ShuttingDown => f.write_str("the server is shutting down"),
            ConnectRefused::RoomTableFull(why) | ConnectRefused::RoomQuota(why) => {
                write!(f, "cannot join the room: {why}")
            }
            ConnectRefused::Gone => f.write_str("the connection went away"),
        }
    }
}

impl std::error::Error for ConnectRefused {}

/// Sent by a session before it closes when it has forwarded messages. The
/// hub answers with [`Flushed`] *into the session's mailbox*, once it has
/// handled everything the session sent before: the frames those messages
/// produced for the session (its own echo) are in its delivery queue by
/// then, and the session's body takes the queue before it runs the
/// handler that writes the close frame ([`crate::delivery`]), so they are
/// written ahead of it.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Flush {
    /// The closing session's own mailbox.
    pub reply_to: Recipient<Flushed>,
}

/// The hub's answer to [`Flush`], sent after every frame it queued for the
/// session before.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Flushed;

/// Sent when a session's actor is dropped: forget me.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Disconnect {
    /// The session that went away.
    pub id: SessionId,
}

/// A parsed frame from a client, forwarded by its session.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct FromClient {
    /// The sender.
    pub id: SessionId,
    /// What it sent.
    pub frame: ClientFrame,
}

// ---------------------------------------------------------------------------
// Hub → session
// ---------------------------------------------------------------------------

/// The hub's heartbeat: send the client a ping.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Heartbeat;

/// The hub closes the session with a close frame.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Close {
    /// The WebSocket close code.
    pub code: CloseCode,
    /// A short human-readable reason.
    pub reason: String,
}

// ---------------------------------------------------------------------------
// App code and routes → hub
// ---------------------------------------------------------------------------

/// Where a [`Broadcast`] goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every connected session.
    All,
    /// Every member of one room.
    Room(RoomName),
    /// One session.
    Session(SessionId),
    /// Every member of any of these rooms, once each (a client's message
    /// goes to all its rooms; relayed from another node like this).
    Rooms(Vec<RoomName>),
}

/// Where a [`Broadcast`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// This node: app code, `POST /broadcast`, a client. Relayed to the other
    /// nodes when a relay is set ([`SetRelay`]).
    Local,
    /// Another node, through the cluster bridge. Never relayed again.
    Cluster,
    /// This node's own broadcast, handed back by the sequencer
    /// ([`Sequence`]) unpositioned: one to everyone or to a session, in its
    /// turn, or a room broadcast it could not position (its link is down).
    /// Delivered here (a room broadcast stamped here), not relayed (the
    /// sequencer relays it) and not counted again.
    Unsequenced,
}

/// A message from app code (or `POST /broadcast`) to sessions.
///
/// The result is how many sessions it was queued for. App code that does not
/// care uses `hub.do_send(Broadcast::text("Hello, clients!"))`, or
/// `Broadcast::binary(bytes)` for a binary frame.
#[derive(Debug, Clone, Message)]
#[rtype(result = "usize")]
pub struct Broadcast {
    /// Who receives it.
    pub target: Target,
    /// The frame's data, shared by every recipient.
    pub payload: Payload,
    /// Where it came from; only local broadcasts are relayed to other nodes.
    pub origin: Origin,
    /// When it was built: the start of its latency measurement (read by
    /// the hub once it has fanned it out).
    pub(crate) created: Instant,
    /// Counts it in [`queued_broadcasts`] until a hub has handled it.
    _queued: QueueTicket,
}

impl Broadcast {
    /// A local broadcast of `payload` to `target`: text for a `String`,
    /// `&str` or `ByteString`, binary for `Bytes` or `Vec<u8>`.
    pub fn new(target: Target, payload: impl Into<Payload>) -> Self {
        Broadcast {
            target,
            payload: payload.into(),
            origin: Origin::Local,
            created: Instant::now(),
            _queued: QueueTicket::new(),
        }
    }

    /// A broadcast that another node published, as the cluster bridge hands
    /// it to this node's hub: delivered here, never relayed again.
    pub fn from_cluster(target: Target, payload: impl Into<Payload>) -> Self {
        Broadcast {
            origin: Origin::Cluster,
            ..Broadcast::new(target, payload)
        }
    }

    /// A broadcast of this node that the sequencer hands back unpositioned
    /// ([`Origin::Unsequenced`]).
    pub fn unsequenced(target: Target, payload: impl Into<Payload>) -> Self {
        Broadcast {
            origin: Origin::Unsequenced,
            ..Broadcast::new(target, payload)
        }
    }

    /// Text sent verbatim to every connected session.
    pub fn text(text: impl Into<ByteString>) -> Self {
        Broadcast::new(Target::All, Payload::Text(text.into()))
    }

    /// Bytes sent verbatim, as a binary frame, to every connected session.
    pub fn binary(bytes: impl Into<Bytes>) -> Self {
        Broadcast::new(Target::All, Payload::Binary(bytes.into()))
    }

    /// Text sent verbatim to every member of `room`.
    pub fn to_room(room: RoomName, text: impl Into<ByteString>) -> Self {
        Broadcast::new(Target::Room(room), Payload::Text(text.into()))
    }

    /// Bytes sent verbatim, as a binary frame, to every member of `room`.
    pub fn binary_to_room(room: RoomName, bytes: impl Into<Bytes>) -> Self {
        Broadcast::new(Target::Room(room), Payload::Binary(bytes.into()))
    }

    /// Text sent verbatim to one session. Session ids are per node, so this
    /// is never relayed to other nodes.
    pub fn to_session(session: SessionId, text: impl Into<ByteString>) -> Self {
        Broadcast::new(Target::Session(session), Payload::Text(text.into()))
    }

    /// A JSON value wrapped as `{"type":"message","room":…,"data":…}`, sent to
    /// `room`'s members, or to everyone (with `"room":null`) when `room` is
    /// `None`. This is what clients receive for a `publish`.
    pub fn message(room: Option<RoomName>, data: &serde_json::value::RawValue) -> Self {
        let payload = protocol::message_frame(room.as_ref(), data);
        Broadcast::new(
            room.map_or(Target::All, Target::Room),
            Payload::Text(payload),
        )
    }
}

/// Asks the hub for a page of a room's history (`Network::history`,
/// `GET /rooms/{room}/history`): a request, sent with a timeout.
#[derive(Debug, Clone, Message)]
#[rtype(result = "HistoryPage")]
pub struct GetHistory {
    /// The room.
    pub room: RoomName,
    /// The messages after this position; `None`: the last `limit`.
    pub since: Option<Position>,
    /// The most messages in the page.
    pub limit: usize,
}

/// The reply to [`GetHistory`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryPage {
    /// False when the hub keeps no history (`websocket.history` off).
    pub enabled: bool,
    /// Whether the history covers everything after `since` (always true
    /// without one). When false, `entries` is empty: the app must reload.
    pub complete: bool,
    /// Up to `limit` messages, oldest first, each with its offset and the
    /// frame protocol clients receive for it.
    pub entries: Vec<HistoryEntry>,
    /// The room's last position (`None`: it has no history).
    pub last: Option<Position>,
}

/// Broadcasts built and not yet handled (or dropped), in this process.
static QUEUED_BROADCASTS: AtomicUsize = AtomicUsize::new(0);

/// How many [`Broadcast`]s exist in this process that no hub has handled
/// yet — in a hub's mailbox, or about to be sent. actix does not expose a
/// mailbox's length, so each `Broadcast` carries a ticket that counts it
/// from construction until it is handled. The count is per process, not per
/// hub: one node runs one hub.
pub fn queued_broadcasts() -> usize {
    QUEUED_BROADCASTS.load(Ordering::Relaxed)
}

/// Counts one live [`Broadcast`] in [`queued_broadcasts`]; two atomic
/// operations per broadcast (not per delivery).
#[derive(Debug)]
struct QueueTicket(());

impl QueueTicket {
    fn new() -> QueueTicket {
        QUEUED_BROADCASTS.fetch_add(1, Ordering::Relaxed);
        QueueTicket(())
    }
}

impl Clone for QueueTicket {
    fn clone(&self) -> QueueTicket {
        QueueTicket::new()
    }
}

impl Drop for QueueTicket {
    fn drop(&mut self) {
        QUEUED_BROADCASTS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Asks for the hub's counters (`/health`, `/metrics`, `/status`).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "HubStats")]
pub struct GetHubStats;

/// Counters the hub keeps: the reply to [`GetHubStats`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HubStats {
    /// Sessions registered now.
    pub sessions: usize,
    /// Rooms that exist now.
    pub rooms: usize,
    /// Sessions ever registered.
    pub sessions_opened: u64,
    /// Sessions that went away on their own (client closed, error, limit).
    pub sessions_closed: u64,
    /// Broadcast messages handled (from app code, HTTP and clients).
    pub broadcasts: u64,
    /// Frames queued for sessions.
    pub deliveries: u64,
    /// Frames not queued: the session was a slow consumer (and is evicted)
    /// or had already gone.
    pub dropped: u64,
    /// Sessions evicted because they stopped reading.
    pub evicted_slow_consumer: u64,
    /// Sessions evicted because they stopped answering.
    pub evicted_heartbeat: u64,
    /// Sessions closed by a graceful shutdown.
    pub closed_by_shutdown: u64,
    /// The largest byte backlog any session has had.
    pub peak_session_queued_bytes: usize,
    /// Sessions that closed their own connection, by why.
    pub closed: ClosedCounts,
    /// Time from a [`Broadcast`]'s construction to the end of its fan-out:
    /// the wait in the hub's mailbox plus the fan-out itself. Left out of
    /// the JSON (`/health`); `/metrics` exposes it as a histogram.
    #[serde(skip)]
    pub broadcast_latency: Histogram,
    /// Broadcasts built and not yet handled by a hub: the broadcast part of
    /// the hub's mailbox depth. Process-wide (see [`queued_broadcasts`]).
    pub queued_broadcasts: usize,
    /// Local broadcasts handed to the cluster relay.
    pub relayed: u64,
    /// Broadcasts that arrived from other nodes.
    pub from_cluster: u64,
    /// Sessions on each of the hub's shards (one per worker thread that
    /// has hosted a session), in the order the shards started.
    pub shard_sessions: Vec<usize>,
    /// How many sessions each shard's table has room for, in the same
    /// order: it follows `shard_sessions` back down after churn (see
    /// [`crate::capacity`]).
    pub shard_session_capacity: Vec<usize>,
    /// Messages replayed to clients from the rooms' history.
    pub replayed: u64,
    /// Recoveries answered `complete:false`.
    pub recoveries_incomplete: u64,
    /// Rooms with a history now.
    pub history_rooms: usize,
    /// Bytes the history counts against `websocket.history.max_bytes`.
    pub history_bytes: usize,
}

impl HubStats {
    /// Adds one shard's counters to these (the node's): sums, except the
    /// peak backlog, which is the largest. `sessions`, `rooms` and
    /// `queued_broadcasts` are the node's own and are left alone.
    pub fn absorb(&mut self, shard: &HubStats) {
        self.sessions_opened += shard.sessions_opened;
        self.sessions_closed += shard.sessions_closed;
        self.broadcasts += shard.broadcasts;
        self.deliveries += shard.deliveries;
        self.dropped += shard.dropped;
        self.evicted_slow_consumer += shard.evicted_slow_consumer;
        self.evicted_heartbeat += shard.evicted_heartbeat;
        self.closed_by_shutdown += shard.closed_by_shutdown;
        self.peak_session_queued_bytes = self
            .peak_session_queued_bytes
            .max(shard.peak_session_queued_bytes);
        self.closed.absorb(&shard.closed);
        self.broadcast_latency.merge(&shard.broadcast_latency);
        self.relayed += shard.relayed;
        self.from_cluster += shard.from_cluster;
        self.replayed += shard.replayed;
        self.recoveries_incomplete += shard.recoveries_incomplete;
    }
}

/// Sessions that ended their own connection, by [`ClosedBy`] reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClosedCounts {
    /// The client closed, or the connection ended cleanly.
    pub normal: u64,
    /// A frame or message over the size limit (1009).
    pub too_big: u64,
    /// Over the inbound message rate (1008).
    pub rate: u64,
    /// Invalid text (1007).
    pub invalid: u64,
    /// A protocol violation (1002).
    pub protocol: u64,
    /// A socket error.
    pub error: u64,
}

impl ClosedCounts {
    fn absorb(&mut self, other: &ClosedCounts) {
        self.normal += other.normal;
        self.too_big += other.too_big;
        self.rate += other.rate;
        self.invalid += other.invalid;
        self.protocol += other.protocol;
        self.error += other.error;
    }

    /// Counts one session that closed for `why`.
    pub(crate) fn count(&mut self, why: ClosedBy) {
        let n = match why {
            ClosedBy::Normal => &mut self.normal,
            ClosedBy::TooBig => &mut self.too_big,
            ClosedBy::Rate => &mut self.rate,
            ClosedBy::Invalid => &mut self.invalid,
            ClosedBy::Protocol => &mut self.protocol,
            ClosedBy::Error => &mut self.error,
        };
        *n += 1;
    }
}

/// Asks the hub to close every session with 1001 (going away) and stop. The
/// result is how many sessions were open; it arrives once they have all
/// closed or `shutdown_timeout` has passed (the rest are cut off).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "usize")]
pub struct Shutdown;

// ---------------------------------------------------------------------------
// Hub ↔ cluster bridge
// ---------------------------------------------------------------------------

/// What the hub hands its relay (the cluster bridge): a broadcast that
/// originated on this node, for the other nodes. Sent with `do_send`; the
/// relay keeps its own bounded outbox.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Relay {
    /// Who receives it on the other nodes.
    pub target: RelayTarget,
    /// The frame's data, verbatim, text or binary.
    pub payload: Payload,
}

/// Where a relayed broadcast goes on the other nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayTarget {
    /// Every session.
    All,
    /// Every member of any of these rooms, once each.
    Rooms(Vec<RoomName>),
}

impl RelayTarget {
    /// Where `target` reaches on the other nodes, or `target` back when it
    /// is one session: session ids are per node, so it is never relayed.
    pub fn of(target: Target) -> Result<RelayTarget, Target> {
        match target {
            Target::All => Ok(RelayTarget::All),
            Target::Room(room) => Ok(RelayTarget::Rooms(vec![room])),
            Target::Rooms(rooms) => Ok(RelayTarget::Rooms(rooms)),
            Target::Session(_) => Err(target),
        }
    }
}

impl From<RelayTarget> for Target {
    fn from(target: RelayTarget) -> Self {
        match target {
            RelayTarget::All => Target::All,
            RelayTarget::Rooms(rooms) => Target::Rooms(rooms),
        }
    }
}

/// Installs (or, with `None`, removes) the relay that local broadcasts are
/// handed to.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SetRelay(pub Option<Recipient<Relay>>);

/// What the hub hands its sequencer (the cluster bridge, when history is
/// on), in the router's order: every broadcast that originated on this
/// node, **not** delivered here yet, and the flushes of closing sessions.
/// The sequencer publishes the broadcasts in that order, positioning the
/// room broadcasts cluster-wide (a broadcast to everyone is published
/// plain), and hands each back to be delivered in the stream's order
/// ([`Sequenced`], or a [`Broadcast::unsequenced`] for one that is not
/// positioned); when it cannot (its link is down), it hands it back at
/// once, and the hub stamps a room broadcast locally. A broadcast to one
/// session of this node is not published (session ids are per node) but
/// handed back once everything handed over before it is delivered here,
/// so no path overtakes another. Sent with `do_send`; the sequencer keeps
/// its own bounded outbox.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub enum Sequence {
    /// A broadcast of this node.
    Broadcast {
        /// Who receives it (a room target names at least one room).
        target: Target,
        /// The frame's data, verbatim, text or binary.
        payload: Payload,
    },
    /// A closing session's [`Flush`]: handed back ([`FlushBehind`]) once
    /// every broadcast handed over before it was delivered here, or after
    /// at most [`FLUSH_WAIT`].
    Flush(FlushToken),
}

/// A closing session's [`Flush`] on its way through the sequencer; opaque
/// outside the hub.
#[derive(Clone)]
pub struct FlushToken(pub(crate) crate::hub::FlushVia);

impl std::fmt::Debug for FlushToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FlushToken")
    }
}

/// The sequencer hands a [`FlushToken`] back to the hub: the broadcasts
/// handed over before it were delivered here (or it waited
/// [`FLUSH_WAIT`]). The hub answers the session behind their frames.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct FlushBehind(pub FlushToken);

/// The longest the sequencer holds a [`Sequence::Flush`] (or a broadcast
/// to one session) behind broadcasts not yet read back: a closing session
/// never waits on a stalled Redis for longer (its own wait,
/// `CLOSE_FLUSH_TIMEOUT`, is shorter still).
pub const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// Installs (or, with `None`, removes) the sequencer that local
/// broadcasts (and flushes) go to instead of being delivered at once
/// (history on). A
/// sequencer set also means its backfill is coming ([`Backfill`]):
/// recoveries wait for it, up to [`BACKFILL_WAIT`].
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SetSequencer(pub Option<Recipient<Sequence>>);

/// How long recoveries wait for the sequencer's backfill before they are
/// answered from whatever history there is.
pub const BACKFILL_WAIT: Duration = Duration::from_secs(5);

/// A room broadcast positioned by the cluster's sequencer, in the order
/// the sequencer gave the positions (the stream's): the hub keeps it in
/// each room's history at that position and delivers it. The result is how
/// many sessions it was queued for.
#[derive(Debug, Clone, Message)]
#[rtype(result = "usize")]
pub struct Sequenced {
    /// Each room and the message's position in it.
    pub rooms: Vec<(RoomName, Position)>,
    /// The frame's data.
    pub payload: Payload,
    /// Published by this node (counted when it was handed to the
    /// sequencer), rather than by another.
    pub own: bool,
}

/// Messages the sequencer positioned before this node started, read back
/// from the stream, oldest first: kept in the history, not delivered.
/// `done` ends the backfill (recoveries waiting for it are answered).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Backfill {
    /// The messages, oldest first.
    pub entries: Vec<Backfilled>,
    /// The last page.
    pub done: bool,
}

/// One message of a [`Backfill`].
#[derive(Debug, Clone)]
pub struct Backfilled {
    /// Each room and the message's position in it.
    pub rooms: Vec<(RoomName, Position)>,
    /// The frame's data.
    pub payload: Payload,
    /// How long ago it was published: it expires from the history that
    /// much sooner.
    pub age: Duration,
}

/// Asks for this node's own room occupancy (not counting other nodes).
#[derive(Debug, Message)]
#[rtype(result = "Occupancy")]
pub struct GetOccupancy;

/// This node's sessions and the member count of each of its rooms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Occupancy {
    /// Sessions registered on this node.
    pub sessions: usize,
    /// `(room, members on this node)` for every room that exists here.
    pub rooms: Vec<(RoomName, usize)>,
}

/// The other nodes' totals, from the cluster bridge: the hub adds them to
/// the presence frames it sends, so clients see cluster-wide counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Message)]
#[rtype(result = "()")]
pub struct ClusterPresence {
    /// Sessions on the other nodes.
    pub sessions: usize,
    /// Members per room on the other nodes.
    pub rooms: HashMap<RoomName, usize>,
}
