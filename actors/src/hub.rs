//! `BroadcastHub`: the node's registry of WebSocket sessions, its rooms, its
//! fan-out, and its one heartbeat timer.
//!
//! Every session registers here on start ([`Connect`]) and every broadcast —
//! from app code, from `POST /broadcast`, or from a client — is fanned out
//! from here. The payload is encoded once and shared (`ByteString` is a
//! reference-counted buffer), so a broadcast to 5,000 sessions allocates one
//! frame, not 5,000.
//!
//! Sends are chosen deliberately (STYLE habit 4):
//! - hub → session uses `try_send` into a bounded mailbox and charges the
//!   session's [`SessionLink`] byte budget; a full mailbox or an exhausted
//!   budget means the client is not reading, and it is evicted as a slow
//!   consumer instead of letting the server's memory grow;
//! - session → hub ([`FromClient`]) uses `try_send` too, so a flood of client
//!   frames meets a bounded hub mailbox and the sender is told it was dropped;
//! - [`Connect`]/[`Disconnect`] use `do_send`: one of each per connection,
//!   bounded by `websocket.max_connections`.
//!
//! Eviction must work on a session whose actor is frozen (its socket is not
//! being written, so actix never polls it). The hub therefore also holds a
//! duplicate of each session's socket, when the server gave it one, and shuts
//! the socket down itself: that ends the connection, which drops the frozen
//! actor and frees everything queued for it.

use crate::liveness::{EvictionPolicy, OutboundBudget, SessionLink, Verdict};
use crate::protocol::{self, ClientFrame};
use crate::rooms::{JoinError, Joined, RoomName, RoomTable, SessionId};
use crate::session::{Close, Deliver, Heartbeat, WsSessionActor};
use actix::prelude::*;
use actix_web_actors::ws::CloseCode;
use bytestring::ByteString;
use serde::Serialize;
use socket2::Socket;
use std::collections::{HashMap, HashSet};
use std::net::Shutdown as SocketShutdown;
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

/// Counters the hub keeps; read them with [`GetStats`].
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
    /// Sessions evicted because they stopped reading.
    pub evicted_slow_consumer: u64,
    /// Sessions evicted because they stopped answering.
    pub evicted_heartbeat: u64,
    /// Sessions closed by a graceful shutdown.
    pub closed_by_shutdown: u64,
    /// The largest byte backlog any session has had.
    pub peak_session_queued_bytes: usize,
}

/// Where a [`Broadcast`] goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every connected session.
    All,
    /// Every member of one room.
    Room(RoomName),
    /// One session.
    Session(SessionId),
}

/// A message from app code (or `POST /broadcast`) to sessions.
///
/// The result is how many sessions it was queued for. App code that does not
/// care uses `hub.do_send(Broadcast::text("Hello, clients!"))`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "usize")]
pub struct Broadcast {
    /// Who receives it.
    pub target: Target,
    /// The text frame, encoded once for every recipient.
    pub payload: ByteString,
}

impl Broadcast {
    /// Text sent verbatim to every connected session.
    pub fn text(text: impl Into<ByteString>) -> Self {
        Broadcast {
            target: Target::All,
            payload: text.into(),
        }
    }

    /// Text sent verbatim to every member of `room`.
    pub fn to_room(room: RoomName, text: impl Into<ByteString>) -> Self {
        Broadcast {
            target: Target::Room(room),
            payload: text.into(),
        }
    }

    /// Text sent verbatim to one session.
    pub fn to_session(session: SessionId, text: impl Into<ByteString>) -> Self {
        Broadcast {
            target: Target::Session(session),
            payload: text.into(),
        }
    }

    /// A JSON value wrapped as `{"type":"message","room":…,"data":…}`, sent to
    /// `room`'s members, or to everyone (with `"room":null`) when `room` is
    /// `None`. This is what clients receive for a `publish`.
    pub fn message(room: Option<RoomName>, data: &serde_json::value::RawValue) -> Self {
        let payload = protocol::message_frame(room.as_ref(), data);
        Broadcast {
            target: room.map_or(Target::All, Target::Room),
            payload,
        }
    }
}

/// Sent by a new session when it starts: register me and put me in `room`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Connect {
    /// The session's id, allocated by whoever accepted the connection.
    pub id: SessionId,
    /// Where to deliver frames.
    pub addr: Addr<WsSessionActor>,
    /// The state shared with the hub (last heard from, bytes queued).
    pub link: Arc<SessionLink>,
    /// The room to start in.
    pub room: RoomName,
    /// Whether the session wants presence frames.
    pub presence: bool,
    /// A duplicate of the connection's socket, so that the hub can shut down
    /// a session whose actor is frozen. `None` when the server was not set up
    /// to provide one (see `happynet::Network::on_connect`).
    pub socket: Option<Arc<Socket>>,
}

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

/// Asks for the hub's counters.
#[derive(Debug, Message)]
#[rtype(result = "HubStats")]
pub struct GetStats;

/// Asks the hub to close every session with 1001 (going away) and stop. The
/// result is how many sessions were open; it arrives once they have all
/// closed or `shutdown_timeout` has passed (the rest are cut off).
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct Shutdown;

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
            rooms: RoomTable::new(config.max_rooms_per_session, config.max_rooms),
            config,
            epoch: Instant::now(),
            sessions: HashMap::new(),
            presence: HashSet::new(),
            presence_dirty: false,
            closing: HashMap::new(),
            stats: HubStats::default(),
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
        payload: &ByteString,
        evict: &mut Vec<SessionId>,
    ) -> bool {
        let cost = EvictionPolicy::cost_of(payload.len());
        let link = &member.link;
        if !member
            .budget
            .try_charge(cost, policy.max_outbound_bytes, || link.released())
        {
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
            Err(SendError::Full(_)) => {
                member.budget.refund(cost);
                evict.push(id);
                false
            }
            // The session is gone; its Disconnect is on its way.
            Err(SendError::Closed(_)) => {
                member.budget.refund(cost);
                false
            }
        }
    }

    /// Delivers `payload` to the sessions `walk` visits, then evicts those
    /// found to be slow consumers (after the walk: the table cannot change
    /// under it). Returns how many it was queued for.
    fn fan_out_by(
        &mut self,
        payload: &ByteString,
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

    fn fan_out<I: IntoIterator<Item = SessionId>>(&mut self, to: I, payload: &ByteString) -> usize {
        self.fan_out_by(payload, |sessions, one| {
            for id in to {
                if let Some(member) = sessions.get_mut(&id) {
                    one(id, member);
                }
            }
        })
    }

    fn fan_out_all(&mut self, payload: &ByteString) -> usize {
        self.fan_out_by(payload, |sessions, one| {
            for (&id, member) in sessions.iter_mut() {
                one(id, member);
            }
        })
    }

    fn send_to(&mut self, id: SessionId, payload: ByteString) -> usize {
        self.fan_out(std::iter::once(id), &payload)
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
            let _ = socket.shutdown(SocketShutdown::Both);
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
                let _ = c.socket.shutdown(SocketShutdown::Both);
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
        let frame = protocol::presence_frame(self.sessions.len(), self.rooms.occupancy());
        let to: Vec<SessionId> = self.presence.iter().copied().collect();
        self.fan_out(to, &frame);
    }

    fn on_client_frame(&mut self, id: SessionId, frame: ClientFrame) {
        if !self.sessions.contains_key(&id) {
            return;
        }
        match frame {
            ClientFrame::Text(text) => {
                if self.rooms.rooms_of(id).is_empty() {
                    self.send_to(
                        id,
                        protocol::error_frame("no_room", "join a room before sending text"),
                    );
                    return;
                }
                self.stats.broadcasts += 1;
                let mates = self.rooms.room_mates(id);
                self.fan_out(mates, &text);
            }
            ClientFrame::Join(room) => {
                let reply = match self.rooms.join(id, &room) {
                    Ok(Joined::Added) => {
                        self.presence_dirty = true;
                        protocol::joined_frame(&room, self.rooms.member_count(&room))
                    }
                    Ok(Joined::AlreadyMember) => {
                        protocol::joined_frame(&room, self.rooms.member_count(&room))
                    }
                    Err(e @ JoinError::TooManyRoomsForSession { .. }) => {
                        protocol::error_frame("too_many_rooms", &e.to_string())
                    }
                    Err(e) => protocol::error_frame("server_full", &e.to_string()),
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
                let payload = protocol::message_frame(Some(&room), &data);
                let members: Vec<SessionId> = self.rooms.members(&room).collect();
                self.fan_out(members, &payload);
            }
        }
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
    type Result = ();

    fn handle(&mut self, msg: Connect, _: &mut Self::Context) {
        if self.shutting_down.is_some() {
            let _ = msg.addr.try_send(Close {
                code: CloseCode::Away,
                reason: "server shutting down".into(),
            });
            return;
        }
        let id = msg.id;
        self.stats.sessions_opened += 1;
        self.sessions.insert(
            id,
            Member {
                addr: msg.addr,
                link: msg.link,
                budget: OutboundBudget::default(),
                socket: msg.socket,
            },
        );
        // A fresh session is in no room, so this join can only fail on the
        // table-wide room limit; the session then starts in no room.
        if let Err(e) = self.rooms.join(id, &msg.room) {
            self.send_to(id, protocol::error_frame("server_full", &e.to_string()));
        }
        if msg.presence {
            self.presence.insert(id);
        }
        self.presence_dirty = true;
        let welcome = protocol::welcome_frame(id, self.rooms.rooms_of(id));
        self.send_to(id, welcome);
    }
}

impl Handler<Disconnect> for BroadcastHub {
    type Result = ();

    fn handle(&mut self, msg: Disconnect, _: &mut Self::Context) {
        self.closing.remove(&msg.id);
        if self.remove(msg.id).is_some() {
            self.stats.sessions_closed += 1;
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
        match msg.target {
            Target::All => self.fan_out_all(&msg.payload),
            Target::Room(room) => {
                let members: Vec<SessionId> = self.rooms.members(&room).collect();
                self.fan_out(members, &msg.payload)
            }
            Target::Session(id) => self.fan_out(std::iter::once(id), &msg.payload),
        }
    }
}

impl Handler<GetStats> for BroadcastHub {
    type Result = MessageResult<GetStats>;

    fn handle(&mut self, _: GetStats, _: &mut Self::Context) -> Self::Result {
        let mut stats = self.stats.clone();
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
                for (_, c) in hub.closing.drain() {
                    let _ = c.socket.shutdown(SocketShutdown::Both);
                }
                ctx.stop();
                open
            }),
        )
    }
}
