//! `BroadcastHub`: the node's registry of WebSocket sessions, its rooms, its
//! fan-out, and its one heartbeat timer.
//!
//! Every session registers here on start ([`Connect`]) and every broadcast —
//! from app code, from `POST /broadcast`, or from a client — is fanned out
//! from here. The payload is encoded once and shared ([`Payload`] is a
//! reference-counted buffer, text or binary), so a broadcast to 5,000
//! sessions allocates one frame, not 5,000.
//!
//! **Plain and protocol clients.** A session is one or the other for its
//! whole life ([`ClientKind`]). A plain client receives only data: exactly
//! what was broadcast to it. A protocol client (subprotocol
//! [`protocol::SUBPROTOCOL`]) also gets the hub's own frames: `welcome`,
//! `joined`/`left`, `presence` and `error`. What the hub cannot tell a plain
//! client in a frame it refuses before the upgrade ([`ConnectRefused`]).
//!
//! **Registration comes before the `101`.** The upgrade route sends
//! [`Connect`] and waits for the hub's answer before it returns the
//! response, so a broadcast sent once the client holds its `101` reaches it.
//! The session's actor has not started then, and its mailbox still has
//! actix's default capacity of 16: until the session marks its
//! [`SessionLink`] started, a full mailbox is not taken for a slow consumer
//! and the hub queues past it with `do_send` — bounded still, by the
//! session's byte budget (each message is charged its payload plus
//! [`PER_MESSAGE_OVERHEAD`](crate::liveness::PER_MESSAGE_OVERHEAD)).
//!
//! Each send is chosen for what a full mailbox must mean (the messages
//! themselves are in [`crate::messages`]):
//! - hub → session uses `try_send` into a bounded mailbox and charges the
//!   session's [`SessionLink`] byte budget; a full mailbox or an exhausted
//!   budget means the client is not reading, and it is evicted as a slow
//!   consumer instead of letting the server's memory grow;
//! - session → hub ([`FromClient`]) uses `try_send` too, so a flood of client
//!   frames meets a bounded hub mailbox and the sender is told it was dropped;
//! - [`Connect`] is a request (`send(..).timeout(..)`, one per upgrade);
//!   [`Disconnect`] uses `do_send`: one per connection, bounded by
//!   `websocket.max_connections`.
//!
//! Eviction must work on a session whose actor is frozen (its socket is not
//! being written, so actix never polls it). The hub therefore also holds a
//! duplicate of each session's socket, when the server gave it one, and shuts
//! the socket down itself: that ends the connection, which drops the frozen
//! actor and frees everything queued for it. When the hub cuts a
//! connection off like that (a slow consumer, or a session that did not
//! close within its grace), it aborts it: `SO_LINGER` 0 first, so that the
//! last close sends a reset and the kernel frees the socket's send buffer at
//! once, instead of keeping it (up to a few MiB) for minutes while it probes
//! a peer that does not read. A session that closes itself, as every healthy
//! one does on a graceful shutdown (1001), is never aborted.

use crate::liveness::{EvictionPolicy, OutboundBudget, SessionLink, Verdict};
use crate::messages::{
    queued_broadcasts, Broadcast, Close, ClusterPresence, Connect, ConnectRefused, Deliver,
    Disconnect, Flush, Flushed, FromClient, GetHubStats, GetOccupancy, Heartbeat, HubStats,
    Occupancy, Origin, Relay, RelayTarget, SetRelay, Shutdown, Target,
};
use crate::payload::Payload;
use crate::presence::{self, PresenceLimits};
use crate::protocol::{self, ClientFrame, ClientKind};
use crate::rooms::{JoinError, Joined, RoomName, RoomTable, SessionId};
use crate::session::WsSessionActor;
use actix::prelude::*;
use actix_web_actors::ws::CloseCode;
use bytestring::ByteString;
use socket2::Socket;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Shutdown as SocketShutdown};
use std::sync::Arc;
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

/// The node's session registry, room table and fan-out. See the module docs.
pub struct BroadcastHub {
    config: HubConfig,
    epoch: Instant,
    sessions: HashMap<SessionId, Member>,
    rooms: RoomTable,
    presence: HashSet<SessionId>,
    presence_dirty: bool,
    closing: HashMap<SessionId, Closing>,
    stats: HubStats,
    /// Where local broadcasts go for the other nodes, when clustered.
    relay: Option<Recipient<Relay>>,
    /// The other nodes' presence, added to this node's in presence frames.
    remote_presence: ClusterPresence,
    /// Set by [`Shutdown`]: the sessions still to close, and who to tell
    /// when none are left.
    shutting_down: Option<Draining>,
}

struct Draining {
    open: HashSet<SessionId>,
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

impl BroadcastHub {
    /// A hub with `config`; start it with `Actor::start`.
    pub fn new(config: HubConfig) -> Self {
        BroadcastHub {
            rooms: RoomTable::new(config.max_rooms_per_session, config.max_rooms)
                .with_max_rooms_per_ip(config.max_rooms_per_ip),
            config,
            epoch: Instant::now(),
            sessions: HashMap::new(),
            presence: HashSet::new(),
            presence_dirty: false,
            closing: HashMap::new(),
            stats: HubStats::default(),
            relay: None,
            remote_presence: ClusterPresence::default(),
            shutting_down: None,
        }
    }

    /// The reference instant for [`SessionLink`]s registered with this hub.
    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    /// Queues `payload` for one session. Returns false if it was not queued;
    /// the caller collects slow consumers in `evict` and evicts them after
    /// its loop.
    fn deliver(
        policy: &EvictionPolicy,
        stats: &mut HubStats,
        id: SessionId,
        member: &mut Member,
        payload: &Payload,
        evict: &mut Vec<SessionId>,
    ) -> bool {
        let cost = EvictionPolicy::cost_of(payload.len());
        let link = &member.link;
        if !member
            .budget
            .try_charge(cost, policy.max_outbound_bytes, || link.released())
        {
            stats.dropped += 1;
            evict.push(id);
            return false;
        }
        match member.addr.try_send(Deliver {
            payload: payload.clone(),
            cost,
        }) {
            Ok(()) => {
                stats.deliveries += 1;
                true
            }
            // Registered but not started (see the module docs): its mailbox
            // is still actix's default 16. do_send queues past that; the
            // budget charged above bounds it.
            Err(SendError::Full(deliver)) if !member.link.is_started() => {
                member.addr.do_send(deliver);
                stats.deliveries += 1;
                true
            }
            Err(SendError::Full(_)) => {
                member.budget.refund(cost);
                stats.dropped += 1;
                evict.push(id);
                false
            }
            // The session is gone; its Disconnect is on its way.
            Err(SendError::Closed(_)) => {
                member.budget.refund(cost);
                stats.dropped += 1;
                false
            }
        }
    }

    /// Delivers `payload` to the sessions `walk` visits, then evicts those
    /// found to be slow consumers (after the walk: the table cannot change
    /// under it). Returns how many it was queued for.
    fn fan_out_by(
        &mut self,
        payload: &Payload,
        walk: impl FnOnce(&mut HashMap<SessionId, Member>, &mut dyn FnMut(SessionId, &mut Member)),
    ) -> usize {
        let mut evict = Vec::new();
        let mut sent = 0;
        {
            let policy = &self.config.eviction;
            let stats = &mut self.stats;
            let mut one = |id: SessionId, member: &mut Member| {
                if Self::deliver(policy, stats, id, member, payload, &mut evict) {
                    sent += 1;
                }
            };
            walk(&mut self.sessions, &mut one);
        }
        for id in evict {
            self.evict(id, Eviction::SlowConsumer);
        }
        sent
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
        self.rooms.remove_session(id);
        self.presence.remove(&id);
        self.presence_dirty = true;
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
                    self.config.eviction.max_outbound_bytes
                );
                (CloseCode::Again, "slow consumer")
            }
            Eviction::Heartbeat => {
                self.stats.evicted_heartbeat += 1;
                log::info!(
                    "session {id}: evicted, silent for more than {:?}",
                    self.config.eviction.client_timeout
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
                self.config.shutdown_timeout
            } else {
                self.config.heartbeat_interval
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
        let mut silent = Vec::new();
        let mut slow = Vec::new();
        for (&id, member) in &self.sessions {
            if self.config.eviction.liveness(member.link.last_seen(), now) == Verdict::Silent {
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
        if !self.presence_dirty || self.presence.is_empty() {
            return;
        }
        self.presence_dirty = false;
        // Cluster-wide when clustered: this node's rooms plus the other
        // nodes'. Bounded in bytes either way (crate::presence).
        let remote = &self.remote_presence;
        let rooms = if remote.rooms.is_empty() {
            self.rooms.occupancy().collect()
        } else {
            presence::merge(self.rooms.occupancy(), &remote.rooms)
        };
        let clients = self.sessions.len().saturating_add(remote.sessions);
        let frame = presence::presence_frame(clients, rooms, &self.config.presence_limits);
        let to: Vec<SessionId> = self.presence.iter().copied().collect();
        self.fan_out(to, &Payload::Text(frame));
    }

    /// Hands a local broadcast to the relay, if there is one.
    fn relay(&mut self, target: RelayTarget, payload: Payload) {
        if let Some(relay) = &self.relay {
            self.stats.relayed += 1;
            relay.do_send(Relay { target, payload });
        }
    }

    fn fan_out_rooms(&mut self, rooms: &[RoomName], payload: &Payload) -> usize {
        let mut to = HashSet::new();
        for room in rooms {
            to.extend(self.rooms.members(room));
        }
        self.fan_out(to, payload)
    }

    fn on_client_frame(&mut self, id: SessionId, frame: ClientFrame) {
        if !self.sessions.contains_key(&id) {
            return;
        }
        match frame {
            ClientFrame::Text(text) => self.send_to_senders_rooms(id, Payload::Text(text)),
            ClientFrame::Binary(bytes) => self.send_to_senders_rooms(id, Payload::Binary(bytes)),
            ClientFrame::Join(room) => {
                let ip_key = self.sessions.get(&id).and_then(|m| m.ip_key);
                let reply = match self.rooms.join_from(id, &room, ip_key) {
                    Ok(Joined::Added) => {
                        self.presence_dirty = true;
                        protocol::joined_frame(&room, self.rooms.member_count(&room))
                    }
                    Ok(Joined::AlreadyMember) => {
                        protocol::joined_frame(&room, self.rooms.member_count(&room))
                    }
                    Err(e) => join_error_frame(&e),
                };
                self.send_to(id, reply);
            }
            ClientFrame::Leave(room) => {
                let reply = if self.rooms.leave(id, &room) {
                    self.presence_dirty = true;
                    protocol::left_frame(&room)
                } else {
                    protocol::error_frame("not_member", &format!("not in room {room}"))
                };
                self.send_to(id, reply);
            }
            ClientFrame::Publish { room, data } => {
                if !self.rooms.is_member(id, &room) {
                    self.send_to(
                        id,
                        protocol::error_frame(
                            "not_member",
                            &format!("join room {room} before publishing to it"),
                        ),
                    );
                    return;
                }
                self.stats.broadcasts += 1;
                let payload = Payload::Text(protocol::message_frame(Some(&room), &data));
                let members: Vec<SessionId> = self.rooms.members(&room).collect();
                self.relay(RelayTarget::Rooms(vec![room]), payload.clone());
                self.fan_out(members, &payload);
            }
        }
    }

    /// A client's text or binary message: verbatim to every room it is in,
    /// itself included.
    fn send_to_senders_rooms(&mut self, id: SessionId, payload: Payload) {
        if self.rooms.rooms_of(id).is_empty() {
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
        self.stats.broadcasts += 1;
        if self.relay.is_some() {
            let rooms = self.rooms.rooms_of(id).to_vec();
            self.relay(RelayTarget::Rooms(rooms), payload.clone());
        }
        let mates = self.rooms.room_mates(id);
        self.fan_out(mates, &payload);
    }
}

impl Actor for BroadcastHub {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.config.mailbox_capacity);
        // An app that starts the network and then leaves its System before
        // the hub ever ran (a bind error, say) drops the hub outside the
        // runtime; actix still calls `started` then, and a timer there
        // would panic. Nothing will run anyway, so start none.
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        ctx.run_interval(self.config.heartbeat_interval, |hub, _| hub.heartbeat());
        if !self.config.presence_interval.is_zero() {
            ctx.run_interval(self.config.presence_interval, |hub, _| {
                hub.publish_presence()
            });
        }
    }
}

impl Handler<Connect> for BroadcastHub {
    type Result = Result<(), ConnectRefused>;

    fn handle(&mut self, msg: Connect, _: &mut Self::Context) -> Self::Result {
        if self.shutting_down.is_some() {
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
        let joined = self.rooms.join_from(id, &msg.room, msg.ip_key);
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
        self.sessions.insert(
            id,
            Member {
                addr: msg.addr,
                link: msg.link,
                budget: OutboundBudget::default(),
                socket: msg.socket,
                ip_key: msg.ip_key,
                kind: msg.kind,
            },
        );
        if msg.presence && msg.kind == ClientKind::Protocol {
            self.presence.insert(id);
        }
        self.presence_dirty = true;
        if msg.kind == ClientKind::Protocol {
            let welcome = protocol::welcome_frame(id, self.rooms.rooms_of(id));
            self.send_to(id, welcome);
            if let Some(e) = join_error {
                self.send_to(id, join_error_frame(&e));
            }
        }
        Ok(())
    }
}

impl Handler<Flush> for BroadcastHub {
    type Result = ();

    fn handle(&mut self, msg: Flush, _: &mut Self::Context) {
        // `do_send`: the answer must not be refused by a full mailbox, and
        // there is one per closing session.
        msg.reply_to.do_send(Flushed);
    }
}

impl Handler<Disconnect> for BroadcastHub {
    type Result = ();

    fn handle(&mut self, msg: Disconnect, _: &mut Self::Context) {
        self.closing.remove(&msg.id);
        if let Some(member) = self.remove(msg.id) {
            self.stats.sessions_closed += 1;
            self.stats.closed.count(member.link.close_reason());
        }
        if let Some(draining) = &mut self.shutting_down {
            draining.open.remove(&msg.id);
            // The Shutdown handler's future stops the hub once told.
            if draining.open.is_empty() {
                if let Some(done) = draining.done.take() {
                    let _ = done.send(());
                }
            }
        }
    }
}

impl Handler<FromClient> for BroadcastHub {
    type Result = ();

    fn handle(&mut self, msg: FromClient, _: &mut Self::Context) {
        self.on_client_frame(msg.id, msg.frame);
    }
}

impl Handler<Broadcast> for BroadcastHub {
    type Result = usize;

    fn handle(&mut self, msg: Broadcast, _: &mut Self::Context) -> usize {
        self.stats.broadcasts += 1;
        // Relay first: the other nodes' clients should not wait for this
        // node's fan-out (a `do_send` and a refcount bump, not a copy).
        match (&msg.origin, &msg.target) {
            (Origin::Cluster, _) => self.stats.from_cluster += 1,
            // Session ids are per node.
            (Origin::Local, Target::Session(_)) => {}
            (Origin::Local, target) if self.relay.is_some() => {
                let target = match target {
                    Target::Room(room) => RelayTarget::Rooms(vec![room.clone()]),
                    Target::Rooms(rooms) => RelayTarget::Rooms(rooms.clone()),
                    _ => RelayTarget::All,
                };
                self.relay(target, msg.payload.clone());
            }
            (Origin::Local, _) => {}
        }
        let sent = match &msg.target {
            Target::All => self.fan_out_all(&msg.payload),
            Target::Room(room) => {
                let members: Vec<SessionId> = self.rooms.members(room).collect();
                self.fan_out(members, &msg.payload)
            }
            Target::Session(id) => self.fan_out(std::iter::once(*id), &msg.payload),
            Target::Rooms(rooms) => self.fan_out_rooms(rooms, &msg.payload),
        };
        self.stats.broadcast_latency.observe(msg.created.elapsed());
        sent
    }
}

impl Handler<SetRelay> for BroadcastHub {
    type Result = ();

    fn handle(&mut self, msg: SetRelay, _: &mut Self::Context) {
        self.relay = msg.0;
    }
}

impl Handler<GetOccupancy> for BroadcastHub {
    type Result = MessageResult<GetOccupancy>;

    fn handle(&mut self, _: GetOccupancy, _: &mut Self::Context) -> Self::Result {
        MessageResult(Occupancy {
            sessions: self.sessions.len(),
            rooms: self
                .rooms
                .occupancy()
                .map(|(r, n)| (r.clone(), n))
                .collect(),
        })
    }
}

impl Handler<ClusterPresence> for BroadcastHub {
    type Result = ();

    fn handle(&mut self, msg: ClusterPresence, _: &mut Self::Context) {
        if msg != self.remote_presence {
            self.remote_presence = msg;
            self.presence_dirty = true;
        }
    }
}

impl Handler<GetHubStats> for BroadcastHub {
    type Result = MessageResult<GetHubStats>;

    fn handle(&mut self, _: GetHubStats, _: &mut Self::Context) -> Self::Result {
        let mut stats = self.stats.clone();
        stats.queued_broadcasts = queued_broadcasts();
        stats.sessions = self.sessions.len();
        stats.rooms = self.rooms.room_count();
        stats.peak_session_queued_bytes = self
            .sessions
            .values()
            .map(|m| m.budget.peak() as usize)
            .fold(stats.peak_session_queued_bytes, usize::max);
        MessageResult(stats)
    }
}

impl Handler<Shutdown> for BroadcastHub {
    type Result = ResponseActFuture<Self, usize>;

    fn handle(&mut self, _: Shutdown, _: &mut Self::Context) -> Self::Result {
        let open = self.sessions.len();
        log::info!("hub: shutting down, closing {open} sessions");
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
        let timeout = self.config.shutdown_timeout;
        Box::pin(
            async move {
                let _ = tokio::time::timeout(timeout, wait).await;
            }
            .into_actor(self)
            .map(move |_, hub, ctx| {
                // Those that closed are gone from `closing`; what is left
                // did not read its 1001 within shutdown_timeout.
                for (_, c) in hub.closing.drain() {
                    abort(&c.socket);
                }
                ctx.stop();
                open
            }),
        )
    }
}
