//! `BroadcastHub`: the node's registry of WebSocket sessions, its rooms and
//! its fan-out, as one router in front of one shard per worker thread.
//!
//! **Shards.** Every session registers with the [`HubShard`] on its own
//! thread ([`HubShards::local`], which starts that thread's shard the first
//! time), so the hub's deliveries to a session — a push onto its
//! [`crate::delivery::DeliveryQueue`] and, at most once per burst, a wake —
//! never cross threads. Each shard owns its sessions,
//! their byte budgets, its heartbeat and its evictions. A [`Broadcast`] sent
//! to the [`BroadcastHub`] (the one address app code knows: `net.hub()`)
//! becomes one message per shard, not one per session, and each shard fans
//! it out to its own members. A client's message to its rooms is delivered
//! by its own shard at once and handed to the other shards as one message
//! each — unless history is on, when it goes through the router (below).
//! Order per sender holds: every path from one sender to one receiver is a
//! chain of FIFO mailboxes (in a cluster with history, through Redis's
//! stream: below).
//!
//! **One node.** What must be counted once per node lives in [`NodeRooms`],
//! shared by every shard and the router: the room table (so
//! `max_rooms`, `max_rooms_per_ip` and the member counts in `joined` and
//! presence frames are node-wide), the session count, the other nodes'
//! presence, and the relay to the cluster, which every local broadcast
//! takes once. It is behind a lock taken per broadcast and per join, never
//! per delivery. `GetHubStats` merges the shards' counters.
//!
//! Each shard encodes a broadcast's frame once ([`crate::delivery::encode`]:
//! header and payload, unmasked) and every member on it shares those bytes,
//! so a broadcast to 5,000 sessions allocates one frame per shard, not
//! 5,000.
//!
//! **History.** With `HubConfig::history` set, the router keeps every
//! room's recent messages ([`crate::history`]) and is the one place room
//! broadcasts get their offsets: `BroadcastHub::stamp` gives each of a
//! broadcast's rooms its next offset and builds the frame protocol clients
//! receive for it (`{"type":"message","room","offset","epoch","data"}`),
//! once for every shard, and the `Fan` carries those stamps. A client's
//! message to its rooms goes through the router then too (instead of being
//! delivered by its own shard first), so each is stamped once, in the one
//! order every member sees; a `Flush` takes the same way, so it still comes
//! behind the session's echoes. Plain members get the data once, as before;
//! protocol members get each of their rooms' stamped frame.
//!
//! **History in a cluster.** When the cluster bridge installs itself as
//! the sequencer (`SetSequencer`, history on), no local broadcast (app
//! code, `POST /broadcast`, a client's; to rooms, to everyone or to one
//! session) is stamped nor delivered here: the router hands each to the
//! sequencer (`Sequence::Broadcast`), in its own order, and answers with
//! the member count now. The sequencer publishes them in that order (room
//! broadcasts positioned by Redis, the rest plain; one to a session is not
//! published but held in its turn) and hands each back in the stream's
//! order: a room broadcast as `Sequenced`, which the router keeps at that
//! position (`History::insert`; a repeat is not delivered again) and fans
//! out with its stamps like any other, the rest as a
//! `Broadcast::unsequenced`. When the link is down they come back at once
//! as `Broadcast::unsequenced`, room ones stamped here. Order per sender
//! therefore holds across targets, the stream being the one order of this
//! node's broadcasts; the price is a Redis round trip before local
//! delivery of every broadcast, to everyone too. A closing session's
//! `Flush` goes the same way (`Sequence::Flush`) and comes back
//! (`FlushBehind`) once everything handed over before it was delivered
//! here, or after `FLUSH_WAIT`, so it still comes behind the session's
//! echoes. Until the sequencer's `Backfill` is done (or for
//! `BACKFILL_WAIT`), recoveries wait, so that a node that just started
//! answers from the history read back from the stream.
//!
//! **Recovery** (`/ws?since=`, a join with `since`, `recover=last`): the
//! shard makes the session a member first, marks its seam for the room
//! pending, and asks the router (`RecoverAsk`). The router answers with
//! `Recovered` through the shard's mailbox with `do_send`, the way every
//! `Fan` goes, so every broadcast stamped before the answer reaches the
//! shard before it, and every later one after it. While pending, the
//! room's live frames are held back from that member (all are at or below
//! the answer's last offset, so the replay has them); then it gets
//! `recovered`, the replay, and live frames from the next offset on — a
//! live frame at or below the replayed position (same epoch) is skipped,
//! so the seam has no gap and no duplicate. For `last`, live frames are
//! not held back; if one arrived, it is the last message already.
//!
//! **Plain and protocol clients.** A session is one or the other for its
//! whole life ([`ClientKind`]). A plain client receives only data: exactly
//! what was broadcast to it. A protocol client (subprotocol
//! [`protocol::SUBPROTOCOL`]) also gets the hub's own frames: `welcome`,
//! `joined`/`left`, `presence` and `error`. What the hub cannot tell a plain
//! client in a frame it refuses before the upgrade ([`ConnectRefused`]).
//!
//! **Registration comes before the `101`.** The upgrade route sends
//! [`Connect`] to its shard and waits for the answer before it returns the
//! response, so a broadcast sent once the client holds its `101` reaches it
//! (the shard is in the directory the router reads before the `Connect` is
//! sent). Its response body has not been polled then: until the session
//! marks its [`SessionLink`] started, its delivery queue's frame limit is
//! not applied (a queue nobody drains yet is not a slow consumer), and it
//! is bounded still by the session's byte budget (each frame is charged its
//! payload plus
//! [`PER_MESSAGE_OVERHEAD`](crate::liveness::PER_MESSAGE_OVERHEAD)).
//!
//! Each send is chosen for what a full mailbox must mean (the messages
//! themselves are in [`crate::messages`]):
//! - shard → session data is no message at all: the shard charges the
//!   session's [`SessionLink`] byte budget and pushes the encoded frame onto
//!   its bounded delivery queue; a full queue or an exhausted budget means
//!   the client is not reading, and it is evicted as a slow consumer
//!   instead of letting the server's memory grow;
//! - session → shard ([`FromClient`]) uses `try_send` too, so a flood of
//!   client frames meets a bounded mailbox and the sender is told it was
//!   dropped;
//! - router → shard uses `do_send`, so that no broadcast overtakes another
//!   (a `send` to a full mailbox is retried later, out of order); what is
//!   queued is counted in `HubStats::queued_broadcasts`;
//! - [`Connect`] is a request (`send(..).timeout(..)`, one per upgrade);
//!   [`Disconnect`] uses `do_send`: one per connection, bounded by
//!   `websocket.max_connections`.
//!
//! Eviction must work on a session whose actor is frozen (its socket is not
//! being written, so actix never polls it). The shard therefore also holds a
//! duplicate of each session's socket, when the server gave it one, and shuts
//! the socket down itself: that ends the connection, which drops the frozen
//! actor and frees everything queued for it. When the shard cuts a
//! connection off like that (a slow consumer, or a session that did not
//! close within its grace), it aborts it: `SO_LINGER` 0 first, so that the
//! last close sends a reset and the kernel frees the socket's send buffer at
//! once, instead of keeping it (up to a few MiB) for minutes while it probes
//! a peer that does not read. A session that closes itself, as every healthy
//! one does on a graceful shutdown (1001), is never aborted.

use crate::capacity;
use crate::delivery::{self, Frame, Pushed, Refused, WriteOutcome};
use crate::history::{History, HistoryConfig, Position, Recover, Since};
use crate::liveness::{EvictionPolicy, OutboundBudget, SessionLink, Verdict};
use crate::messages::Payload;
use crate::messages::{
    queued_broadcasts, Broadcast, Close, ClusterPresence, Connect, ConnectRefused, Disconnect,
    Flush, FlushBehind, FlushToken, Flushed, FromClient, GetHistory, GetHubStats, GetOccupancy,
    Heartbeat, HistoryPage, HubStats, Occupancy, Origin, Relay, RelayTarget, Sequence, Sequenced,
    SetRelay, SetSequencer, Shutdown, Target, BACKFILL_WAIT,
};
use crate::messages::{Backfill, Backfilled};
use crate::presence::{self, PresenceLimits};
use crate::protocol::{self, ClientFrame, ClientKind};
use crate::rooms::{JoinError, Joined, RoomName, RoomTable, SessionId};
use crate::session::WsSessionActor;
use actix::prelude::*;
use actix::WeakAddr;
use actix_web_actors::ws::CloseCode;
use bytestring::ByteString;
use socket2::Socket;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Shutdown as SocketShutdown};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::{Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::Duration;
use tokio::time::Instant;

/// The hub's settings, derived from `network.websocket` by the `happynet`
/// crate.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// How often the hub pings every session and checks its liveness.
    pub heartbeat_interval: Duration,
    /// When a session is silent or slow enough to be evicted.
    pub eviction: EvictionPolicy,
    /// How many rooms one session may be in.
    pub max_rooms_per_session: usize,
    /// How many rooms may exist at once.
    pub max_rooms: usize,
    /// How many existing rooms one client address may have created (see
    /// [`crate::rooms`]); 0 turns the quota off.
    pub max_rooms_per_ip: usize,
    /// How big a presence frame may get (see [`crate::presence`]).
    pub presence_limits: PresenceLimits,
    /// How often presence frames go to sessions that asked for them
    /// (only when something changed). Zero disables presence.
    pub presence_interval: Duration,
    /// How long a graceful shutdown waits for sessions to close.
    pub shutdown_timeout: Duration,
    /// How many messages the hub's own mailbox holds for `try_send` senders.
    pub mailbox_capacity: usize,
    /// The room a session joins when it does not name one.
    pub default_room: RoomName,
    /// The rooms' history (offsets, recovery); `None` turns it off, and
    /// with it the stamped frames protocol clients receive.
    pub history: Option<HistoryConfig>,
}

/// Why a session left the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Eviction {
    SlowConsumer,
    Heartbeat,
    Shutdown,
}

struct Member {
    addr: Addr<WsSessionActor>,
    link: Arc<SessionLink>,
    budget: OutboundBudget,
    socket: Option<Arc<Socket>>,
    ip_key: Option<IpAddr>,
    kind: ClientKind,
    /// The rooms this session is recovering or has recovered, where live
    /// frames meet the replay (see [`Seam`]); empty for nearly everyone.
    seams: Vec<Seam>,
}

/// Where a recovering session's replay meets the live frames of one room.
struct Seam {
    room: RoomName,
    state: SeamState,
}

enum SeamState {
    /// Asked the router (`ask` numbers the question, so an answer to a
    /// superseded one is ignored). For a `since`, live frames are held
    /// back: every one that reaches the shard before the answer is at or
    /// below the room's position in the answer, so the replay has it. For
    /// `last`, they are delivered, and `seen` says one was.
    Pending {
        ask: u64,
        hold_live: bool,
        seen: bool,
    },
    /// Replayed through this position: a live frame at or below it (same
    /// epoch) is a duplicate.
    Through(Position),
}

impl Member {
    /// Whether the stamped frame at `at` in `room` is not for this member
    /// now (held back during its recovery, or already replayed).
    fn skips(&mut self, room: &RoomName, at: &Position) -> bool {
        if self.seams.is_empty() {
            return false;
        }
        let Some(i) = self.seams.iter().position(|s| s.room == *room) else {
            return false;
        };
        match &mut self.seams[i].state {
            SeamState::Pending {
                hold_live, seen, ..
            } => {
                *seen = true;
                *hold_live
            }
            SeamState::Through(p) => {
                if p.epoch == at.epoch && at.offset <= p.offset {
                    true
                } else {
                    // Past the seam: nothing more to compare.
                    self.seams.swap_remove(i);
                    false
                }
            }
        }
    }
}

/// One room's stamp on a broadcast: its position in the room's history and
/// the frame protocol clients receive (built once, by the router).
#[derive(Debug)]
pub(crate) struct Stamp {
    room: RoomName,
    at: Position,
    frame: ByteString,
}

/// Ends a connection at once: `SO_LINGER` 0, so the last close of the socket
/// sends a reset and drops whatever the kernel still holds to send, then a
/// shutdown, which wakes the server's own handle on it (its actor may be
/// frozen) so that the HTTP layer drops the connection and that last close
/// happens now.
fn abort(socket: &Socket) {
    let _ = socket.set_linger(Some(Duration::ZERO));
    let _ = socket.shutdown(SocketShutdown::Both);
}

/// The error frame for a refused join.
fn join_error_frame(e: &JoinError) -> ByteString {
    let code = match e {
        // The client's own quotas: leaving a room is what it can do.
        JoinError::TooManyRoomsForSession { .. } | JoinError::TooManyRoomsForAddress { .. } => {
            "too_many_rooms"
        }
        _ => "server_full",
    };
    protocol::error_frame(code, &e.to_string())
}

/// A socket whose session was asked to close and has until `deadline` to do
/// so before the hub shuts the socket down.
struct Closing {
    socket: Arc<Socket>,
    deadline: Instant,
}

/// What the shards of one hub share: whatever must be counted once per
/// node. See the module docs.
pub struct NodeRooms {
    config: HubConfig,
    epoch: Instant,
    /// Which sessions are in which rooms, node-wide: the limits and the
    /// counts clients see are the node's, not a shard's.
    rooms: Mutex<RoomTable>,
    /// Sessions registered on every shard.
    sessions: AtomicUsize,
    /// Bumped by whatever changes what a presence frame would say; a shard
    /// publishes when it differs from what it last published.
    presence_version: AtomicU64,
    /// The other nodes' presence, added to this node's in presence frames.
    remote_presence: Mutex<ClusterPresence>,
    /// Where local broadcasts go for the other nodes, when clustered.
    relay: Mutex<Option<Recipient<Relay>>>,
    /// Every shard, by the thread it runs on.
    shards: Mutex<Vec<(ThreadId, Addr<HubShard>)>>,
    /// Set by [`Shutdown`]: no new shard starts.
    shutting_down: AtomicBool,
    /// The router, once started: with history on, clients' room messages
    /// go through it to be stamped, and recoveries are asked of it. Weak:
    /// the router holds this struct.
    router: Mutex<Option<WeakAddr<BroadcastHub>>>,
}

/// A lock that a panic elsewhere does not make unusable: every value behind
/// these locks is left consistent by each critical section.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl NodeRooms {
    fn touch_presence(&self) {
        self.presence_version.fetch_add(1, Ordering::Relaxed);
    }

    fn relay(&self) -> Option<Recipient<Relay>> {
        lock(&self.relay).clone()
    }

    fn history_on(&self) -> bool {
        self.config.history.is_some()
    }

    fn router(&self) -> Option<Addr<BroadcastHub>> {
        lock(&self.router).as_ref().and_then(WeakAddr::upgrade)
    }

    /// Every shard in the directory.
    fn shard_addrs(&self) -> Vec<Addr<HubShard>> {
        lock(&self.shards).iter().map(|(_, a)| a.clone()).collect()
    }

    /// Sends `msg` to every shard and waits for all the answers (a shard
    /// that stopped meanwhile gives an error, which callers skip).
    fn ask_every_shard<M>(&self, msg: M) -> futures::future::JoinAll<Request<HubShard, M>>
    where
        M: Message + Send + Clone + 'static,
        M::Result: Send,
        HubShard: Handler<M>,
    {
        futures::future::join_all(
            self.shard_addrs()
                .into_iter()
                .map(|shard| shard.send(msg.clone())),
        )
    }
}

/// The directory of a hub's shards: how the upgrade route finds the shard
/// its session belongs to. Cheap to clone.
#[derive(Clone)]
pub struct HubShards {
    node: Arc<NodeRooms>,
}

impl HubShards {
    /// The shard on the calling thread, started on the first call from that
    /// thread. Call it from the thread the session's actor will run on (the
    /// upgrade route's worker). Refused once the hub is shutting down.
    pub fn local(&self) -> Result<Addr<HubShard>, ConnectRefused> {
        if self.node.shutting_down.load(Ordering::Acquire) {
            return Err(ConnectRefused::ShuttingDown);
        }
        let me = std::thread::current().id();
        let mut shards = lock(&self.node.shards);
        if let Some((_, addr)) = shards.iter().find(|(t, a)| *t == me && a.connected()) {
            return Ok(addr.clone());
        }
        // A shard whose thread went away (a worker that stopped) is gone
        // from the directory with it: bounded by the threads alive.
        shards.retain(|(_, a)| a.connected());
        let addr = HubShard::new(self.node.clone()).start();
        shards.push((me, addr.clone()));
        Ok(addr)
    }

    /// How many shards are running.
    pub fn count(&self) -> usize {
        lock(&self.node.shards)
            .iter()
            .filter(|(_, a)| a.connected())
            .count()
    }
}

/// One worker thread's part of the hub: the sessions on that thread, their
/// budgets, heartbeat and eviction. See the module docs.
pub struct HubShard {
    node: Arc<NodeRooms>,
    /// This shard's own address, to skip itself among its peers.
    me: Option<Addr<HubShard>>,
    sessions: HashMap<SessionId, Member>,
    presence: HashSet<SessionId>,
    /// The presence version this shard last published.
    presence_seen: u64,
    closing: HashMap<SessionId, Closing>,
    stats: HubStats,
    /// Set by [`Shutdown`]: the sessions still to close, and who to tell
    /// when none are left.
    shutting_down: Option<Draining>,
    /// Numbers this shard's recovery questions to the router.
    asks: u64,
    /// Sessions whose queues are written straight to their sockets and
    /// have frames since the last [`FlushQueues`]: each at most once, so
    /// bounded by the sessions.
    to_flush: Vec<SessionId>,
    /// A [`FlushQueues`] is in the mailbox.
    flush_sent: bool,
}

struct Draining {
    open: HashSet<SessionId>,
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

impl HubShard {
    fn new(node: Arc<NodeRooms>) -> Self {
        HubShard {
            node,
            me: None,
            sessions: HashMap::new(),
            presence: HashSet::new(),
            presence_seen: 0,
            closing: HashMap::new(),
            stats: HubStats::default(),
            shutting_down: None,
            asks: 0,
            to_flush: Vec::new(),
            flush_sent: false,
        }
    }

    /// Queues `payload` for one session. Returns false if it was not queued;
    /// the caller collects slow consumers in `evict` and evicts them after
    /// its loop, and notes in `to_flush` the queues the shard is to write
    /// ([`HubShard::schedule_flush`]).
    fn deliver(
        policy: &EvictionPolicy,
        stats: &mut HubStats,
        id: SessionId,
        member: &mut Member,
        frame: &Frame,
        evict: &mut Vec<SessionId>,
        to_flush: &mut Vec<SessionId>,
    ) -> bool {
        let cost = frame.cost();
        let link = &member.link;
        if !member
            .budget
            .try_charge(cost, policy.max_outbound_bytes, || link.released())
        {
            stats.dropped += 1;
            evict.push(id);
            return false;
        }
        // Registered but not started (see the module docs): its body has
        // not been polled yet, so only the budget charged above bounds it.
        match link.queue().push(frame.clone(), link.is_started()) {
            Ok(pushed) => {
                if pushed == Pushed::Flush {
                    to_flush.push(id);
                }
                stats.deliveries += 1;
                true
            }
            Err(Refused::Full) => {
                member.budget.refund(cost);
                stats.dropped += 1;
                evict.push(id);
                false
            }
            // The session is closing or gone; its Disconnect is on its way.
            Err(Refused::Closed) => {
                member.budget.refund(cost);
                stats.dropped += 1;
                false
            }
        }
    }

    /// Delivers `payload` to the sessions `walk` visits, then evicts those
    /// found to be slow consumers (after the walk: the table cannot change
    /// under it). Returns how many it was queued for.
    ///
    /// The frame is encoded here, once per shard: every member on this
    /// shard shares it, and its reference count stays on this shard's core.
    fn fan_out_by(
        &mut self,
        payload: &Payload,
        walk: impl FnOnce(&mut HashMap<SessionId, Member>, &mut dyn FnMut(SessionId, &mut Member)),
    ) -> usize {
        let frame = Frame::new(
            delivery::encode(payload),
            EvictionPolicy::cost_of(payload.len()),
        );
        let mut evict = Vec::new();
        let mut sent = 0;
        {
            let policy = &self.node.config.eviction;
            let stats = &mut self.stats;
            let to_flush = &mut self.to_flush;
            let mut one = |id: SessionId, member: &mut Member| {
                if Self::deliver(policy, stats, id, member, &frame, &mut evict, to_flush) {
                    sent += 1;
                }
            };
            walk(&mut self.sessions, &mut one);
        }
        for id in evict {
            self.evict(id, Eviction::SlowConsumer);
        }
        self.schedule_flush();
        sent
    }

    /// Asks for a [`FlushQueues`] once the shard has handled everything its
    /// mailbox holds, if a queue waits for one: a task of its own sends it
    /// when it first runs, which is after the shard's task has drained its
    /// mailbox and yielded, so a burst of broadcasts goes out in one `send`
    /// per session, and a lone broadcast a few task hops after it came.
    fn schedule_flush(&mut self) {
        if self.to_flush.is_empty() || self.flush_sent {
            return;
        }
        match &self.me {
            Some(me) => {
                let me = me.clone();
                actix::spawn(async move { me.do_send(FlushQueues) });
                self.flush_sent = true;
            }
            // Not started (a unit test driving the state directly).
            None => self.flush_queues(),
        }
    }

    /// Writes every queue that waits for it to its socket; a queue whose
    /// socket is full (or gone) is its session's body's to finish.
    fn flush_queues(&mut self) {
        self.flush_sent = false;
        // A pass writes at most FLUSH_CHUNK queues, then lets the mailbox
        // in before the rest: a broadcast that came meanwhile is queued for
        // the sessions not yet written, so when the shard is behind they
        // take two frames in one write instead of two writes.
        let chunk = self.to_flush.len().min(FLUSH_CHUNK);
        for i in 0..chunk {
            let Some(member) = self.sessions.get(&self.to_flush[i]) else {
                continue; // gone since
            };
            let queue = member.link.queue();
            let (released, outcome) = queue.write_direct(false);
            if released > 0 {
                member.link.release(released);
            }
            if matches!(outcome, WriteOutcome::Blocked | WriteOutcome::Failed(_)) {
                queue.wake_writer();
            }
        }
        self.to_flush.drain(..chunk);
        if self.to_flush.is_empty() {
            // Its room is bounded by the sessions; kept for the next pass.
            if let Some(to) = capacity::shrink_to(self.sessions.len(), self.to_flush.capacity()) {
                self.to_flush.shrink_to(to);
            }
        } else {
            self.schedule_flush();
        }
    }

    fn fan_out<I: IntoIterator<Item = SessionId>>(&mut self, to: I, payload: &Payload) -> usize {
        self.fan_out_by(payload, |sessions, one| {
            for id in to {
                if let Some(member) = sessions.get_mut(&id) {
                    one(id, member);
                }
            }
        })
    }

    fn fan_out_all(&mut self, payload: &Payload) -> usize {
        self.fan_out_by(payload, |sessions, one| {
            for (&id, member) in sessions.iter_mut() {
                one(id, member);
            }
        })
    }

    /// Sends one of the hub's own (protocol) frames to a session.
    fn send_to(&mut self, id: SessionId, frame: ByteString) -> usize {
        self.fan_out(std::iter::once(id), &Payload::Text(frame))
    }

    fn remove(&mut self, id: SessionId) -> Option<Member> {
        let member = self.sessions.remove(&id)?;
        lock(&self.node.rooms).remove_session(id);
        self.node.sessions.fetch_sub(1, Ordering::Relaxed);
        self.presence.remove(&id);
        // After churn the tables are not left sized for the crowd that left.
        capacity::shrink_map(&mut self.sessions);
        capacity::shrink_set(&mut self.presence);
        self.node.touch_presence();
        self.stats.peak_session_queued_bytes = self
            .stats
            .peak_session_queued_bytes
            .max(member.budget.peak() as usize);
        Some(member)
    }

    /// Removes a session and gets its connection closed, whatever state its
    /// actor is in.
    fn evict(&mut self, id: SessionId, why: Eviction) {
        let Some(member) = self.remove(id) else {
            return;
        };
        let (code, reason) = match why {
            Eviction::SlowConsumer => {
                self.stats.evicted_slow_consumer += 1;
                log::warn!(
                    "session {id}: evicted as a slow consumer ({} bytes undelivered, cap {})",
                    member.budget.backlog(),
                    self.node.config.eviction.max_outbound_bytes
                );
                (CloseCode::Again, "slow consumer")
            }
            Eviction::Heartbeat => {
                self.stats.evicted_heartbeat += 1;
                log::info!(
                    "session {id}: evicted, silent for more than {:?}",
                    self.node.config.eviction.client_timeout
                );
                (CloseCode::Policy, "heartbeat timeout")
            }
            Eviction::Shutdown => {
                self.stats.closed_by_shutdown += 1;
                (CloseCode::Away, "server shutting down")
            }
        };
        let asked = member
            .addr
            .try_send(Close {
                code,
                reason: reason.into(),
            })
            .is_ok();
        let Some(socket) = member.socket else {
            return;
        };
        if why == Eviction::SlowConsumer || !asked {
            // It is not reading: a close frame would never reach it.
            abort(&socket);
        } else {
            // Give a live session time to send its close frame; a frozen one
            // is cut off when that time is up.
            let grace = if why == Eviction::Shutdown {
                self.node.config.shutdown_timeout
            } else {
                self.node.config.heartbeat_interval
            };
            self.closing.insert(
                id,
                Closing {
                    socket,
                    deadline: Instant::now() + grace,
                },
            );
        }
    }

    fn heartbeat(&mut self) {
        let now = Instant::now();
        self.closing.retain(|_, c| {
            if c.deadline <= now {
                // It did not close within its grace: it is not reading.
                abort(&c.socket);
                false
            } else {
                true
            }
        });
        capacity::shrink_map(&mut self.closing);
        let mut silent = Vec::new();
        let mut slow = Vec::new();
        for (&id, member) in &self.sessions {
            if self
                .node
                .config
                .eviction
                .liveness(member.link.last_seen(), now)
                == Verdict::Silent
            {
                silent.push(id);
            } else if let Err(SendError::Full(_)) = member.addr.try_send(Heartbeat) {
                slow.push(id);
            }
        }
        for id in silent {
            self.evict(id, Eviction::Heartbeat);
        }
        for id in slow {
            self.evict(id, Eviction::SlowConsumer);
        }
    }

    fn publish_presence(&mut self) {
        let version = self.node.presence_version.load(Ordering::Relaxed);
        if version == self.presence_seen || self.presence.is_empty() {
            return;
        }
        self.presence_seen = version;
        // Node-wide (the shared room table and session count), and
        // cluster-wide when clustered: the other nodes' rooms added. Bounded
        // in bytes either way (crate::presence).
        let frame = {
            let remote = lock(&self.node.remote_presence);
            let rooms = lock(&self.node.rooms);
            let merged = if remote.rooms.is_empty() {
                rooms.occupancy().collect()
            } else {
                presence::merge(rooms.occupancy(), &remote.rooms)
            };
            let clients = self
                .node
                .sessions
                .load(Ordering::Relaxed)
                .saturating_add(remote.sessions);
            presence::presence_frame(clients, merged, &self.node.config.presence_limits)
        };
        let to: Vec<SessionId> = self.presence.iter().copied().collect();
        self.fan_out(to, &Payload::Text(frame));
    }

    /// A client's message to `rooms`. With history on, through the router,
    /// which stamps it (so every room message gets its offset once, in
    /// order) and relays it; a full router mailbox drops it and tells the
    /// sender. Without, to this shard's members at once, then to the other
    /// shards (one message each) and to the other nodes.
    fn publish_from_client(&mut self, from: SessionId, rooms: Vec<RoomName>, payload: Payload) {
        if self.node.history_on() {
            let Some(router) = self.node.router() else {
                return;
            };
            // `try_send`: a flood of clients meets the router's bounded
            // mailbox; a dropped message is not retried, so none is
            // reordered.
            if let Err(SendError::Full(_)) =
                router.try_send(Broadcast::new(Target::Rooms(rooms), payload))
            {
                self.refuse_busy(from);
            }
            return;
        }
        self.stats.broadcasts += 1;
        for shard in self.node.shard_addrs() {
            if shard.connected() && !self.is_me(&shard) {
                shard.do_send(Fan {
                    broadcast: Broadcast::new(Target::Rooms(rooms.clone()), payload.clone()),
                    stamps: None,
                    done: None,
                });
            }
        }
        if let Some(relay) = self.node.relay() {
            self.stats.relayed += 1;
            relay.do_send(Relay {
                target: RelayTarget::Rooms(rooms.clone()),
                payload: payload.clone(),
            });
        }
        self.fan_out_rooms(&rooms, &payload);
    }

    /// Tells a client its message was dropped because the router is
    /// overloaded, as its session does when the shard's mailbox is full
    /// (`WsSessionActor::forward`): an error frame, or for a plain client
    /// the close code.
    fn refuse_busy(&mut self, id: SessionId) {
        let Some(member) = self.sessions.get(&id) else {
            return;
        };
        match member.kind {
            ClientKind::Protocol => {
                self.send_to(id, protocol::busy_frame());
            }
            ClientKind::Plain => {
                let _ = member.addr.try_send(Close {
                    code: CloseCode::Again,
                    reason: protocol::BUSY_CLOSE_REASON.into(),
                });
            }
        }
    }

    /// A stamped room broadcast ([`Stamp`]): plain members get the data
    /// once, as today; protocol members get each of their rooms' stamped
    /// frame, encoded once per shard per room, except where their recovery
    /// holds it back or already replayed it ([`Member::skips`]).
    fn fan_out_stamped(&mut self, payload: &Payload, stamps: &[Stamp]) -> usize {
        let members: Vec<Vec<SessionId>> = {
            let table = lock(&self.node.rooms);
            stamps
                .iter()
                .map(|s| table.members(&s.room).collect())
                .collect()
        };
        let several = stamps.len() > 1;
        let mut plain_seen = HashSet::new();
        let mut raw: Option<Frame> = None;
        let mut evict = Vec::new();
        let mut sent = 0;
        let policy = &self.node.config.eviction;
        let stats = &mut self.stats;
        let sessions = &mut self.sessions;
        let to_flush = &mut self.to_flush;
        for (stamp, ids) in stamps.iter().zip(members) {
            let mut stamped: Option<Frame> = None;
            for id in ids {
                let Some(member) = sessions.get_mut(&id) else {
                    continue;
                };
                let frame = match member.kind {
                    ClientKind::Plain => {
                        if several && !plain_seen.insert(id) {
                            continue;
                        }
                        &*raw.get_or_insert_with(|| {
                            Frame::new(
                                delivery::encode(payload),
                                EvictionPolicy::cost_of(payload.len()),
                            )
                        })
                    }
                    ClientKind::Protocol => {
                        if member.skips(&stamp.room, &stamp.at) {
                            continue;
                        }
                        &*stamped.get_or_insert_with(|| text_frame(&stamp.frame))
                    }
                };
                if Self::deliver(policy, stats, id, member, frame, &mut evict, to_flush) {
                    sent += 1;
                }
            }
        }
        for id in evict {
            self.evict(id, Eviction::SlowConsumer);
        }
        self.schedule_flush();
        sent
    }

    /// Starts `id`'s recovery of `room` (it is a member already: live
    /// frames reach it from now on, and its seam sorts them out). The
    /// router answers with [`Recovered`] through this shard's mailbox,
    /// behind every broadcast it stamped before.
    fn begin_recovery(&mut self, id: SessionId, room: RoomName, recover: Recover) {
        let router = self.node.router().filter(|_| self.node.history_on());
        let (Some(router), Some(me)) = (router, self.me.clone()) else {
            self.stats.recoveries_incomplete += 1;
            self.send_to(id, protocol::recovered_frame(&room, None));
            return;
        };
        let Some(member) = self.sessions.get_mut(&id) else {
            return;
        };
        self.asks += 1;
        let ask = self.asks;
        member.seams.retain(|s| s.room != room);
        member.seams.push(Seam {
            room: room.clone(),
            state: SeamState::Pending {
                ask,
                hold_live: matches!(recover, Recover::Since(_)),
                seen: false,
            },
        });
        // `do_send`: one per join, and joins are rate limited per client.
        router.do_send(RecoverAsk {
            shard: me,
            session: id,
            room,
            recover,
            ask,
        });
    }

    /// The router's answer to a recovery: the `recovered` frame, the
    /// replayed messages, and the seam moved to where live frames resume.
    fn end_recovery(&mut self, msg: Recovered) {
        let Some(member) = self.sessions.get_mut(&msg.session) else {
            return;
        };
        let Some(i) = member.seams.iter().position(|s| {
            s.room == msg.room
                && matches!(s.state, SeamState::Pending { ask, .. } if ask == msg.ask)
        }) else {
            // Superseded by a later join, or the room was left.
            return;
        };
        let seen = matches!(member.seams[i].state, SeamState::Pending { seen: true, .. });
        let (entries, last) = match msg.answer {
            // A `last` whose message the session already got live.
            Since::Complete { last, .. } if msg.last_only && seen => (Some(Vec::new()), last),
            Since::Complete { entries, last } => {
                // A replay its outbound budget cannot hold would evict it
                // as a slow consumer: it is told to reload instead.
                let cost: usize = entries
                    .iter()
                    .map(|e| EvictionPolicy::cost_of(e.frame.len()))
                    .sum();
                if cost > self.node.config.eviction.max_outbound_bytes / 2 {
                    (None, last)
                } else {
                    (Some(entries), last)
                }
            }
            Since::Incomplete { last } => (None, last),
        };
        match last {
            Some(p) => member.seams[i].state = SeamState::Through(p),
            None => {
                member.seams.swap_remove(i);
            }
        }
        let room = msg.room;
        match entries {
            Some(entries) => {
                self.send_to(
                    msg.session,
                    protocol::recovered_frame(&room, Some(entries.len())),
                );
                self.stats.replayed += entries.len() as u64;
                for entry in entries {
                    if self.send_to(msg.session, entry.frame) == 0 {
                        break;
                    }
                }
            }
            None => {
                self.stats.recoveries_incomplete += 1;
                self.send_to(msg.session, protocol::recovered_frame(&room, None));
            }
        }
    }

    fn is_me(&self, shard: &Addr<HubShard>) -> bool {
        self.me.as_ref().is_some_and(|me| me == shard)
    }

    fn members_of(&self, room: &RoomName) -> Vec<SessionId> {
        lock(&self.node.rooms).members(room).collect()
    }

    fn fan_out_rooms(&mut self, rooms: &[RoomName], payload: &Payload) -> usize {
        let mut to = HashSet::new();
        {
            let table = lock(&self.node.rooms);
            for room in rooms {
                to.extend(table.members(room));
            }
        }
        self.fan_out(to, payload)
    }

    fn on_client_frame(&mut self, id: SessionId, frame: ClientFrame) {
        let Some(member) = self.sessions.get(&id) else {
            return;
        };
        let ip_key = member.ip_key;
        match frame {
            ClientFrame::Text(text) => self.send_to_senders_rooms(id, Payload::Text(text)),
            ClientFrame::Binary(bytes) => self.send_to_senders_rooms(id, Payload::Binary(bytes)),
            ClientFrame::Join { room, recover } => {
                let (reply, joined) = {
                    let mut table = lock(&self.node.rooms);
                    match table.join_from(id, &room, ip_key) {
                        Ok(Joined::Added) => {
                            self.node.touch_presence();
                            (
                                protocol::joined_frame(&room, table.member_count(&room)),
                                true,
                            )
                        }
                        Ok(Joined::AlreadyMember) => (
                            protocol::joined_frame(&room, table.member_count(&room)),
                            true,
                        ),
                        Err(e) => (join_error_frame(&e), false),
                    }
                };
                self.send_to(id, reply);
                // A member first, then the history: nothing falls between.
                if let (true, Some(recover)) = (joined, recover) {
                    self.begin_recovery(id, room, recover);
                }
            }
            ClientFrame::Leave(room) => {
                if let Some(member) = self.sessions.get_mut(&id) {
                    member.seams.retain(|s| s.room != room);
                }
                let left = lock(&self.node.rooms).leave(id, &room);
                let reply = if left {
                    self.node.touch_presence();
                    protocol::left_frame(&room)
                } else {
                    protocol::error_frame("not_member", &format!("not in room {room}"))
                };
                self.send_to(id, reply);
            }
            ClientFrame::Publish { room, data } => {
                let member = lock(&self.node.rooms).is_member(id, &room);
                if !member {
                    self.send_to(
                        id,
                        protocol::error_frame(
                            "not_member",
                            &format!("join room {room} before publishing to it"),
                        ),
                    );
                    return;
                }
                let payload = Payload::Text(protocol::message_frame(Some(&room), &data));
                self.publish_from_client(id, vec![room], payload);
            }
        }
    }

    /// A client's text or binary message: verbatim to every room it is in,
    /// itself included.
    fn send_to_senders_rooms(&mut self, id: SessionId, payload: Payload) {
        let rooms = lock(&self.node.rooms).rooms_of(id).to_vec();
        if rooms.is_empty() {
            let Some(member) = self.sessions.get(&id) else {
                return;
            };
            match member.kind {
                ClientKind::Protocol => {
                    self.send_to(
                        id,
                        protocol::error_frame("no_room", "join a room before sending messages"),
                    );
                }
                // A plain client is refused at Connect if it cannot join its
                // room, and cannot leave it, so this does not happen; were
                // it to, a close says so rather than a silent drop.
                ClientKind::Plain => {
                    let _ = member.addr.try_send(Close {
                        code: CloseCode::Error,
                        reason: "not in any room".into(),
                    });
                }
            }
            return;
        }
        self.publish_from_client(id, rooms, payload);
    }

    /// This shard's share of a broadcast.
    fn fan_out_target(&mut self, target: &Target, payload: &Payload) -> usize {
        match target {
            Target::All => self.fan_out_all(payload),
            Target::Room(room) => {
                let members = self.members_of(room);
                self.fan_out(members, payload)
            }
            Target::Session(id) => self.fan_out(std::iter::once(*id), payload),
            Target::Rooms(rooms) => self.fan_out_rooms(rooms, payload),
        }
    }
}

impl Actor for HubShard {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // The address before the capacity (see `BroadcastHub::started`).
        self.me = Some(ctx.address());
        ctx.set_mailbox_capacity(self.node.config.mailbox_capacity);
        // An app that starts the network and then leaves its System before
        // the hub ever ran (a bind error, say) drops the hub outside the
        // runtime; actix still calls `started` then, and a timer there
        // would panic. Nothing will run anyway, so start none.
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        ctx.run_interval(self.node.config.heartbeat_interval, |shard, _| {
            shard.heartbeat()
        });
        if !self.node.config.presence_interval.is_zero() {
            ctx.run_interval(self.node.config.presence_interval, |shard, _| {
                shard.publish_presence()
            });
        }
    }
}

impl Handler<Connect> for HubShard {
    type Result = Result<(), ConnectRefused>;

    fn handle(&mut self, msg: Connect, _: &mut Self::Context) -> Self::Result {
        if self.shutting_down.is_some() || self.node.shutting_down.load(Ordering::Acquire) {
            return Err(ConnectRefused::ShuttingDown);
        }
        // The route gave up waiting (or the client left) and dropped the
        // session: registering it would leave a member nobody reads.
        if !msg.addr.connected() {
            return Err(ConnectRefused::Gone);
        }
        let id = msg.id;
        // A fresh session is in no room, so this join can only fail on the
        // table-wide or the per-address room limit. A protocol client then
        // starts in no room and is told why; a plain client could not be,
        // so it is refused.
        let (joined, rooms_of) = {
            let mut table = lock(&self.node.rooms);
            let joined = table.join_from(id, &msg.room, msg.ip_key);
            (joined, table.rooms_of(id).to_vec())
        };
        let join_error = match (joined, msg.kind) {
            (Ok(_), _) => None,
            (Err(e @ JoinError::TooManyRoomsForAddress { .. }), ClientKind::Plain) => {
                return Err(ConnectRefused::RoomQuota(e.to_string()))
            }
            (Err(e), ClientKind::Plain) => {
                return Err(ConnectRefused::RoomTableFull(e.to_string()))
            }
            (Err(e), ClientKind::Protocol) => Some(e),
        };
        self.stats.sessions_opened += 1;
        self.node.sessions.fetch_add(1, Ordering::Relaxed);
        self.sessions.insert(
            id,
            Member {
                addr: msg.addr,
                link: msg.link,
                budget: OutboundBudget::default(),
                socket: msg.socket,
                ip_key: msg.ip_key,
                kind: msg.kind,
                seams: Vec::new(),
            },
        );
        if msg.presence && msg.kind == ClientKind::Protocol {
            self.presence.insert(id);
        }
        self.node.touch_presence();
        if msg.kind == ClientKind::Protocol {
            let welcome = protocol::welcome_frame(id, &rooms_of);
            self.send_to(id, welcome);
            match (join_error, msg.recover) {
                (Some(e), _) => {
                    self.send_to(id, join_error_frame(&e));
                }
                // Registered and a member: now the history.
                (None, Some(recover)) => self.begin_recovery(id, msg.room, recover),
                (None, None) => {}
            }
        }
        Ok(())
    }
}

impl Handler<Flush> for HubShard {
    type Result = ();

    fn handle(&mut self, msg: Flush, _: &mut Self::Context) {
        // With history on, the session's messages went through the router,
        // which sends their frames back to this shard: the answer takes
        // the same way, so it comes behind them.
        if self.node.history_on() {
            if let (Some(router), Some(me)) = (self.node.router(), self.me.clone()) {
                router.do_send(FlushVia {
                    shard: me,
                    reply_to: msg.reply_to,
                });
                return;
            }
        }
        // `do_send`: the answer must not be refused by a full mailbox, and
        // there is one per closing session.
        msg.reply_to.do_send(Flushed);
    }
}

/// A [`Flush`] on its way through the router (and, in a cluster with
/// history, the sequencer: [`crate::messages::FlushToken`]) and back to
/// the shard.
#[derive(Clone)]
pub(crate) struct FlushVia {
    shard: Addr<HubShard>,
    reply_to: Recipient<Flushed>,
}

impl Message for FlushVia {
    type Result = ();
}

/// A [`Flush`] back from the router: everything the router stamped before
/// has been fanned out by this shard.
struct FlushBack(Recipient<Flushed>);

impl Message for FlushBack {
    type Result = ();
}

impl Handler<FlushBack> for HubShard {
    type Result = ();

    fn handle(&mut self, msg: FlushBack, _: &mut Self::Context) {
        msg.0.do_send(Flushed);
    }
}

/// A shard asks the router for `room`'s history on behalf of `session`.
struct RecoverAsk {
    shard: Addr<HubShard>,
    session: SessionId,
    room: RoomName,
    recover: Recover,
    ask: u64,
}

impl Message for RecoverAsk {
    type Result = ();
}

/// The router's answer, sent to the shard with `do_send` after every
/// broadcast it stamped before (see [`SeamState::Pending`]).
struct Recovered {
    session: SessionId,
    room: RoomName,
    ask: u64,
    last_only: bool,
    answer: Since,
}

impl Message for Recovered {
    type Result = ();
}

impl Handler<Recovered> for HubShard {
    type Result = ();

    fn handle(&mut self, msg: Recovered, _: &mut Self::Context) {
        self.end_recovery(msg);
    }
}

impl Handler<Disconnect> for HubShard {
    type Result = ();

    fn handle(&mut self, msg: Disconnect, _: &mut Self::Context) {
        if self.closing.remove(&msg.id).is_some() {
            capacity::shrink_map(&mut self.closing);
        }
        if let Some(member) = self.remove(msg.id) {
            self.stats.sessions_closed += 1;
            self.stats.closed.count(member.link.close_reason());
        }
        if let Some(draining) = &mut self.shutting_down {
            draining.open.remove(&msg.id);
            // The Shutdown handler's future stops the shard once told.
            if draining.open.is_empty() {
                if let Some(done) = draining.done.take() {
                    let _ = done.send(());
                }
            }
        }
    }
}

impl Handler<FromClient> for HubShard {
    type Result = ();

    fn handle(&mut self, msg: FromClient, _: &mut Self::Context) {
        self.on_client_frame(msg.id, msg.frame);
    }
}

/// The most queues one [`FlushQueues`] writes (about a millisecond of
/// `send`s) before the shard looks at its mailbox again.
const FLUSH_CHUNK: usize = 256;

/// Sent by a shard to itself: write the queues [`HubShard::schedule_flush`]
/// noted.
struct FlushQueues;

impl Message for FlushQueues {
    type Result = ();
}

impl Handler<FlushQueues> for HubShard {
    type Result = ();

    fn handle(&mut self, _: FlushQueues, _: &mut Self::Context) {
        self.flush_queues();
    }
}

/// A broadcast for one shard's sessions only (it has been relayed, if it
/// was to be, by whoever sent this), and where to say how many it was
/// queued for.
struct Fan {
    broadcast: Broadcast,
    /// Its rooms' stamps, when the router stamped it (history on).
    stamps: Option<Arc<[Stamp]>>,
    done: Option<tokio::sync::oneshot::Sender<usize>>,
}

impl Message for Fan {
    type Result = ();
}

impl Handler<Fan> for HubShard {
    type Result = ();

    fn handle(&mut self, msg: Fan, _: &mut Self::Context) {
        let sent = match &msg.stamps {
            Some(stamps) => self.fan_out_stamped(&msg.broadcast.payload, stamps),
            None => self.fan_out_target(&msg.broadcast.target, &msg.broadcast.payload),
        };
        if let Some(done) = msg.done {
            let _ = done.send(sent);
        }
    }
}

impl Handler<GetHubStats> for HubShard {
    type Result = MessageResult<GetHubStats>;

    fn handle(&mut self, _: GetHubStats, _: &mut Self::Context) -> Self::Result {
        let mut stats = self.stats.clone();
        stats.sessions = self.sessions.len();
        stats.shard_session_capacity = vec![self.sessions.capacity()];
        stats.peak_session_queued_bytes = self
            .sessions
            .values()
            .map(|m| m.budget.peak() as usize)
            .fold(stats.peak_session_queued_bytes, usize::max);
        MessageResult(stats)
    }
}

impl Handler<Shutdown> for HubShard {
    type Result = ResponseActFuture<Self, usize>;

    fn handle(&mut self, _: Shutdown, _: &mut Self::Context) -> Self::Result {
        let open = self.sessions.len();
        log::info!("hub shard: shutting down, closing {open} sessions");
        let (done, wait) = tokio::sync::oneshot::channel();
        let ids: HashSet<SessionId> = self.sessions.keys().copied().collect();
        for &id in &ids {
            self.evict(id, Eviction::Shutdown);
        }
        let done = if ids.is_empty() {
            let _ = done.send(());
            None
        } else {
            Some(done)
        };
        self.shutting_down = Some(Draining { open: ids, done });
        let timeout = self.node.config.shutdown_timeout;
        Box::pin(
            async move {
                let _ = tokio::time::timeout(timeout, wait).await;
            }
            .into_actor(self)
            .map(move |_, shard, ctx| {
                // Those that closed are gone from `closing`; what is left
                // did not read its 1001 within shutdown_timeout.
                for (_, c) in shard.closing.drain() {
                    abort(&c.socket);
                }
                ctx.stop();
                open
            }),
        )
    }
}

// ---------------------------------------------------------------------------
// The router: the one address app code sends to
// ---------------------------------------------------------------------------

/// The node's hub: the address app code, the routes and the cluster bridge
/// send to. It holds no sessions; it hands each broadcast to every shard
/// once, relays local broadcasts to the cluster once, and answers for the
/// node (stats merged over the shards). See the module docs.
pub struct BroadcastHub {
    node: Arc<NodeRooms>,
    /// The router's own counters: broadcasts it took, relayed, from the
    /// cluster, and their fan-out latency (until every shard has queued
    /// it). The shards' are added in `GetHubStats`.
    stats: HubStats,
    /// Every room's history, when on: the router sees every room message,
    /// in one order, so it is where offsets are given.
    history: Option<History>,
    /// With history on in a cluster: where local room broadcasts go to be
    /// positioned cluster-wide, instead of being stamped here.
    sequencer: Option<Recipient<Sequence>>,
    /// Recoveries asked while the sequencer's backfill has not arrived yet.
    backfill: Option<BackfillWait>,
}

/// Recoveries waiting for the sequencer's backfill (see [`Backfill`]):
/// answered when it is done, or at `until`, whichever comes first.
struct BackfillWait {
    until: Instant,
    asks: VecDeque<RecoverAsk>,
}

/// The most recoveries that wait for a backfill; more are answered at once
/// from the history there is.
const MAX_BACKFILL_ASKS: usize = 4096;

impl BroadcastHub {
    /// A hub with `config`; start it with `Actor::start`, and get its
    /// shards' directory ([`BroadcastHub::shards`]) for the upgrade route
    /// first.
    pub fn new(config: HubConfig) -> Self {
        let config_history = config.history.clone();
        let rooms = RoomTable::new(config.max_rooms_per_session, config.max_rooms)
            .with_max_rooms_per_ip(config.max_rooms_per_ip);
        BroadcastHub {
            node: Arc::new(NodeRooms {
                config,
                epoch: Instant::now(),
                rooms: Mutex::new(rooms),
                sessions: AtomicUsize::new(0),
                presence_version: AtomicU64::new(0),
                remote_presence: Mutex::new(ClusterPresence::default()),
                relay: Mutex::new(None),
                shards: Mutex::new(Vec::new()),
                shutting_down: AtomicBool::new(false),
                router: Mutex::new(None),
            }),
            stats: HubStats::default(),
            history: config_history.map(History::new),
            sequencer: None,
            backfill: None,
        }
    }

    /// The reference instant for [`SessionLink`]s registered with this hub.
    pub fn epoch(&self) -> Instant {
        self.node.epoch
    }

    /// Where each session finds the shard on its own thread.
    pub fn shards(&self) -> HubShards {
        HubShards {
            node: self.node.clone(),
        }
    }

    /// Gives a room broadcast its offset in each of its rooms' history and
    /// builds the frame protocol clients receive for it, once for every
    /// shard. `None` when history is off or the target is not rooms.
    fn stamp(&mut self, target: &Target, payload: &Payload) -> Option<Arc<[Stamp]>> {
        let history = self.history.as_mut()?;
        let rooms = match target {
            Target::Room(room) => std::slice::from_ref(room),
            Target::Rooms(rooms) => rooms.as_slice(),
            Target::All | Target::Session(_) => return None,
        };
        let now = Instant::now();
        Some(
            rooms
                .iter()
                .map(|room| {
                    let (at, frame) =
                        history.append(room, now, |at| protocol::stamped_frame(room, at, payload));
                    Stamp {
                        room: room.clone(),
                        at,
                        frame,
                    }
                })
                .collect(),
        )
    }
}

impl BroadcastHub {
    /// Keeps a broadcast the sequencer positioned in each of its rooms'
    /// history and builds the stamps for the shards: a room where the
    /// position is a repeat gets none (it was delivered already).
    fn insert_stamps(
        history: &mut History,
        rooms: &[(RoomName, Position)],
        payload: &Payload,
        now: Instant,
    ) -> Vec<Stamp> {
        rooms
            .iter()
            .filter_map(|(room, at)| {
                let frame = history.insert(room, at, now, |at| {
                    protocol::stamped_frame(room, at, payload)
                })?;
                Some(Stamp {
                    room: room.clone(),
                    at: at.clone(),
                    frame,
                })
            })
            .collect()
    }

    /// Hands `broadcast` (and its stamps, if any) to every shard; the
    /// future says how many sessions it was queued for.
    fn fan(
        &mut self,
        broadcast: Broadcast,
        stamps: Option<Arc<[Stamp]>>,
    ) -> ResponseActFuture<Self, usize> {
        let created = broadcast.created;
        let shards = self.node.shard_addrs();
        let mut counts = Vec::with_capacity(shards.len());
        let mut msg = Some(broadcast);
        for (i, shard) in shards.iter().enumerate() {
            let (done, count) = tokio::sync::oneshot::channel();
            // The last shard takes the message itself; the others a copy
            // (refcounts, not bytes).
            let broadcast = if i + 1 == shards.len() {
                msg.take()
            } else {
                msg.clone()
            };
            if let Some(broadcast) = broadcast {
                shard.do_send(Fan {
                    broadcast,
                    stamps: stamps.clone(),
                    done: Some(done),
                });
                counts.push(count);
            }
        }
        Box::pin(
            async move {
                let mut sent = 0;
                for count in counts {
                    // A shard that stopped meanwhile queued nothing.
                    sent += count.await.unwrap_or(0);
                }
                sent
            }
            .into_actor(self)
            .map(move |sent, hub, _| {
                hub.stats.broadcast_latency.observe(created.elapsed());
                sent
            }),
        )
    }

    /// Answers a recovery from the history there is now.
    fn answer(&mut self, msg: RecoverAsk) {
        let last_only = msg.recover == Recover::Last;
        let answer = match &mut self.history {
            None => Since::Incomplete { last: None },
            Some(history) => {
                history.expire(Instant::now());
                match &msg.recover {
                    Recover::Since(since) => {
                        let limit = history.config().size;
                        history.since(&msg.room, since, limit)
                    }
                    Recover::Last => {
                        let (entries, last) = history.last(&msg.room, 1);
                        Since::Complete { entries, last }
                    }
                }
            }
        };
        // `do_send`, like every Fan: behind every broadcast stamped before.
        msg.shard.do_send(Recovered {
            session: msg.session,
            room: msg.room,
            ask: msg.ask,
            last_only,
            answer,
        });
    }

    /// The backfill is done (or waited for long enough): the recoveries
    /// that waited for it are answered, in the order they were asked.
    fn end_backfill(&mut self) {
        if let Some(wait) = self.backfill.take() {
            for ask in wait.asks {
                self.answer(ask);
            }
        }
    }
}

/// A text frame for one of the hub's own JSON frames.
fn text_frame(text: &ByteString) -> Frame {
    Frame::new(
        delivery::encode(&Payload::Text(text.clone())),
        EvictionPolicy::cost_of(text.len()),
    )
}

impl Actor for BroadcastHub {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // The address first: actix refuses (panics) to make a sender once
        // the capacity is set beyond its own limit, and configs may say so.
        *lock(&self.node.router) = Some(ctx.address().downgrade());
        ctx.set_mailbox_capacity(self.node.config.mailbox_capacity);
        // Expired history goes even from rooms nobody writes to (see
        // `HubShard::started` for why a timer needs a runtime here).
        if self.history.is_some() && tokio::runtime::Handle::try_current().is_ok() {
            ctx.run_interval(Duration::from_secs(1), |hub, _| {
                if let Some(history) = &mut hub.history {
                    history.expire(Instant::now());
                }
            });
        }
    }
}

impl Handler<RecoverAsk> for BroadcastHub {
    type Result = ();

    fn handle(&mut self, msg: RecoverAsk, _: &mut Self::Context) {
        if let Some(wait) = &mut self.backfill {
            if Instant::now() < wait.until && wait.asks.len() < MAX_BACKFILL_ASKS {
                // The session is a member already: live frames held back
                // meanwhile are all in the history when this is answered.
                wait.asks.push_back(msg);
                return;
            }
            self.end_backfill();
        }
        self.answer(msg);
    }
}

impl Handler<SetSequencer> for BroadcastHub {
    type Result = ();

    fn handle(&mut self, msg: SetSequencer, ctx: &mut Self::Context) {
        self.sequencer = msg.0.filter(|_| self.history.is_some());
        if self.sequencer.is_some() {
            self.backfill = Some(BackfillWait {
                until: Instant::now() + BACKFILL_WAIT,
                asks: VecDeque::new(),
            });
            ctx.run_later(BACKFILL_WAIT, |hub, _| hub.end_backfill());
        } else {
            self.end_backfill();
        }
    }
}

impl Handler<Backfill> for BroadcastHub {
    type Result = ();

    fn handle(&mut self, msg: Backfill, _: &mut Self::Context) {
        if let Some(history) = &mut self.history {
            let now = Instant::now();
            let ttl = history.config().ttl;
            for Backfilled {
                rooms,
                payload,
                age,
            } in &msg.entries
            {
                if *age >= ttl {
                    continue;
                }
                // Kept for what is left of its ttl, not a whole new one (a
                // clock that cannot go back that far keeps it a whole one).
                let at = now.checked_sub(*age).unwrap_or(now);
                Self::insert_stamps(history, rooms, payload, at);
            }
        }
        if msg.done {
            self.end_backfill();
        }
    }
}

impl Handler<Sequenced> for BroadcastHub {
    type Result = ResponseActFuture<Self, usize>;

    fn handle(&mut self, msg: Sequenced, _: &mut Self::Context) -> Self::Result {
        // An own broadcast was counted when it was handed to the sequencer.
        if !msg.own {
            self.stats.broadcasts += 1;
            self.stats.from_cluster += 1;
        }
        let Some(history) = &mut self.history else {
            // History went off (it cannot): deliver as any room broadcast.
            let rooms = msg.rooms.into_iter().map(|(room, _)| room).collect();
            return self.fan(
                Broadcast::from_cluster(Target::Rooms(rooms), msg.payload),
                None,
            );
        };
        let stamps = Self::insert_stamps(history, &msg.rooms, &msg.payload, Instant::now());
        if stamps.is_empty() {
            return Box::pin(actix::fut::ready(0));
        }
        let rooms = stamps.iter().map(|s| s.room.clone()).collect();
        let broadcast = Broadcast::from_cluster(Target::Rooms(rooms), msg.payload);
        self.fan(broadcast, Some(stamps.into()))
    }
}

impl Handler<FlushVia> for BroadcastHub {
    type Result = ();

    fn handle(&mut self, msg: FlushVia, _: &mut Self::Context) {
        // In a cluster the session's broadcasts are still on their way
        // through the sequencer: the flush goes behind them.
        match &self.sequencer {
            Some(sequencer) => sequencer.do_send(Sequence::Flush(FlushToken(msg))),
            None => msg.shard.do_send(FlushBack(msg.reply_to)),
        }
    }
}

impl Handler<FlushBehind> for BroadcastHub {
    type Result = ();

    fn handle(&mut self, msg: FlushBehind, _: &mut Self::Context) {
        // Behind the Fans of everything the sequencer handed back before.
        let FlushVia { shard, reply_to } = (msg.0).0;
        shard.do_send(FlushBack(reply_to));
    }
}

impl Handler<GetHistory> for BroadcastHub {
    type Result = MessageResult<GetHistory>;

    fn handle(&mut self, msg: GetHistory, _: &mut Self::Context) -> Self::Result {
        let Some(history) = &mut self.history else {
            return MessageResult(HistoryPage::default());
        };
        history.expire(Instant::now());
        let page = match &msg.since {
            Some(since) => {
                let page = history.page(&msg.room, since, msg.limit);
                HistoryPage {
                    enabled: true,
                    complete: page.complete,
                    entries: page.entries,
                    last: page.last,
                }
            }
            None => {
                let (entries, last) = history.last(&msg.room, msg.limit);
                HistoryPage {
                    enabled: true,
                    complete: true,
                    entries,
                    last,
                }
            }
        };
        MessageResult(page)
    }
}

impl Handler<Broadcast> for BroadcastHub {
    type Result = ResponseActFuture<Self, usize>;

    fn handle(&mut self, msg: Broadcast, _: &mut Self::Context) -> Self::Result {
        // An unsequenced one was counted when it was handed to the
        // sequencer.
        if msg.origin != Origin::Unsequenced {
            self.stats.broadcasts += 1;
        }
        // History in a cluster: every local broadcast goes through the
        // sequencer, in this order, and is delivered here when it hands it
        // back, in the order every node delivers it.
        if let (Origin::Local, Some(sequencer)) = (&msg.origin, &self.sequencer) {
            // Who it will reach here, as far as can be told now.
            let members = match &msg.target {
                Target::All => self.node.sessions.load(Ordering::Relaxed),
                Target::Session(_) => 1,
                Target::Room(room) => lock(&self.node.rooms).members(room).count(),
                Target::Rooms(rooms) => {
                    let table = lock(&self.node.rooms);
                    let mut ids: HashSet<SessionId> = HashSet::new();
                    for room in rooms {
                        ids.extend(table.members(room));
                    }
                    ids.len()
                }
            };
            if matches!(&msg.target, Target::Rooms(rooms) if rooms.is_empty()) {
                return Box::pin(actix::fut::ready(0));
            }
            // Session ids are per node: not relayed (the sequencer only
            // keeps it in its turn).
            if !matches!(msg.target, Target::Session(_)) {
                self.stats.relayed += 1;
            }
            sequencer.do_send(Sequence::Broadcast {
                target: msg.target,
                payload: msg.payload,
            });
            return Box::pin(actix::fut::ready(members));
        }
        // Relay first: the other nodes' clients should not wait for this
        // node's fan-out (a `do_send` and a refcount bump, not a copy).
        match (&msg.origin, &msg.target) {
            (Origin::Cluster, _) => self.stats.from_cluster += 1,
            (Origin::Unsequenced, _) => {}
            // Session ids are per node.
            (Origin::Local, Target::Session(_)) => {}
            (Origin::Local, target) => {
                if let (Some(relay), Ok(target)) =
                    (self.node.relay(), RelayTarget::of(target.clone()))
                {
                    self.stats.relayed += 1;
                    relay.do_send(Relay {
                        target,
                        payload: msg.payload.clone(),
                    });
                }
            }
        }
        let stamps = self.stamp(&msg.target, &msg.payload);
        self.fan(msg, stamps)
    }
}

impl Handler<SetRelay> for BroadcastHub {
    type Result = ();

    fn handle(&mut self, msg: SetRelay, _: &mut Self::Context) {
        *lock(&self.node.relay) = msg.0;
    }
}

impl Handler<GetOccupancy> for BroadcastHub {
    type Result = MessageResult<GetOccupancy>;

    fn handle(&mut self, _: GetOccupancy, _: &mut Self::Context) -> Self::Result {
        let rooms = lock(&self.node.rooms)
            .occupancy()
            .map(|(r, n)| (r.clone(), n))
            .collect();
        MessageResult(Occupancy {
            sessions: self.node.sessions.load(Ordering::Relaxed),
            rooms,
        })
    }
}

impl Handler<ClusterPresence> for BroadcastHub {
    type Result = ();

    fn handle(&mut self, msg: ClusterPresence, _: &mut Self::Context) {
        let mut remote = lock(&self.node.remote_presence);
        if msg != *remote {
            *remote = msg;
            self.node.touch_presence();
        }
    }
}

impl Handler<GetHubStats> for BroadcastHub {
    type Result = ResponseActFuture<Self, HubStats>;

    fn handle(&mut self, _: GetHubStats, _: &mut Self::Context) -> Self::Result {
        Box::pin(
            self.node
                .ask_every_shard(GetHubStats)
                .into_actor(self)
                .map(|answers, hub, _| {
                    let mut stats = hub.stats.clone();
                    for shard in answers.into_iter().flatten() {
                        stats.absorb(&shard);
                        stats.shard_sessions.push(shard.sessions);
                        stats
                            .shard_session_capacity
                            .extend(shard.shard_session_capacity);
                    }
                    stats.queued_broadcasts = queued_broadcasts();
                    stats.sessions = hub.node.sessions.load(Ordering::Relaxed);
                    stats.rooms = lock(&hub.node.rooms).room_count();
                    if let Some(history) = &hub.history {
                        stats.history_rooms = history.rooms();
                        stats.history_bytes = history.bytes();
                    }
                    stats
                }),
        )
    }
}

impl Handler<Shutdown> for BroadcastHub {
    type Result = ResponseActFuture<Self, usize>;

    fn handle(&mut self, _: Shutdown, _: &mut Self::Context) -> Self::Result {
        self.node.shutting_down.store(true, Ordering::Release);
        Box::pin(
            self.node
                .ask_every_shard(Shutdown)
                .into_actor(self)
                .map(|answers, _, ctx| {
                    ctx.stop();
                    answers.into_iter().flatten().sum()
                }),
        )
    }
}
