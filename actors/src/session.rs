//! `WsSessionActor`: one WebSocket connection.
//!
//! The session parses what its client sends (enforcing the frame size, the
//! reassembled message size and the inbound message rate), forwards it to the
//! [`BroadcastHub`], and writes what the hub delivers. It owns no timers: the
//! hub pings it and judges its liveness from the [`SessionLink`] the two
//! share, because a session whose client stops reading is never polled again
//! by actix-web-actors and so could not act on its own timers.
//!
//! Close codes it sends: 1009 for a frame or message over
//! `websocket.max_message_bytes`, 1008 when the client exceeds its message
//! rate, 1007 for text that is not UTF-8, 1002 for other protocol errors.

use crate::gcra::{Gcra, Quota};
use crate::hub::{BroadcastHub, Connect, Disconnect, FromClient};
use crate::liveness::{ClosedBy, SessionLink};
use crate::protocol::{self, ClientFrame};
use crate::rooms::{RoomName, SessionId};
use actix::prelude::*;
use actix_http::ws::Item;
use actix_web::web::{Bytes, BytesMut};
use actix_web_actors::ws::{self, CloseCode, CloseReason};
use bytestring::ByteString;
use socket2::Socket;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::time::Instant;

/// Per-session limits, derived from `network.websocket`.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The largest message (one frame, or a reassembled fragmented message).
    pub max_message_bytes: usize,
    /// How many data frames per second a client may send, with burst.
    pub inbound: Quota,
    /// How many messages the hub may queue in this session's mailbox.
    pub mailbox_capacity: usize,
}

/// The hub queues one text frame for the client. `cost` is what the hub
/// charged against the session's byte budget; the session gives it back once
/// the frame is handed to the socket writer.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Deliver {
    /// The frame, shared by every recipient.
    pub payload: ByteString,
    /// What was charged to the session's [`SessionLink`].
    pub cost: usize,
}

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

/// Counts open WebSocket connections against `websocket.max_connections`.
/// Shared by the upgrade route (which acquires) and every session (whose
/// [`ConnectionSlot`] releases on drop, however the session ends).
#[derive(Debug)]
pub struct ConnectionGate {
    open: AtomicUsize,
    max: usize,
}

impl ConnectionGate {
    /// A gate that admits up to `max` connections at once.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(ConnectionGate {
            open: AtomicUsize::new(0),
            max,
        })
    }

    /// Takes a slot, or `None` when `max` are open.
    pub fn try_acquire(self: &Arc<Self>) -> Option<ConnectionSlot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectionSlot(self.clone()))
    }

    /// How many connections hold a slot now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// The limit.
    pub fn max(&self) -> usize {
        self.max
    }
}

/// One admitted connection; dropping it frees the slot.
#[derive(Debug)]
pub struct ConnectionSlot(Arc<ConnectionGate>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a session hands the hub when it starts.
struct Registration {
    room: RoomName,
    presence: bool,
    socket: Option<Arc<Socket>>,
    ip_key: Option<IpAddr>,
}

/// A fragmented message being reassembled.
struct Fragments {
    is_text: bool,
    buf: BytesMut,
}

/// One WebSocket connection. Build it with [`WsSessionActor::new`] and start
/// it with `actix_web_actors::ws::WsResponseBuilder`.
pub struct WsSessionActor {
    id: SessionId,
    hub: Addr<BroadcastHub>,
    link: Arc<SessionLink>,
    config: Arc<SessionConfig>,
    inbound: Gcra,
    registration: Option<Registration>,
    fragments: Option<Fragments>,
    _slot: Option<ConnectionSlot>,
}

impl WsSessionActor {
    /// A session `id` that will register with `hub` in `room`.
    ///
    /// `epoch` must be the hub's ([`BroadcastHub::epoch`]). `socket` is a
    /// duplicate of the connection's socket, which lets the hub cut off the
    /// connection even if this actor is frozen. `slot` is released when the
    /// session ends.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: SessionId,
        hub: Addr<BroadcastHub>,
        epoch: Instant,
        config: Arc<SessionConfig>,
        room: RoomName,
        presence: bool,
        socket: Option<Arc<Socket>>,
        slot: Option<ConnectionSlot>,
    ) -> Self {
        WsSessionActor {
            id,
            hub,
            link: Arc::new(SessionLink::new(epoch, Instant::now())),
            config,
            inbound: Gcra::new(),
            registration: Some(Registration {
                room,
                presence,
                socket,
                ip_key: None,
            }),
            fragments: None,
            _slot: slot,
        }
    }

    /// Sets the client's per-IP key (see [`Connect::ip_key`]), which the
    /// rooms this session creates are charged to. Without it the session's
    /// rooms are not counted per address.
    pub fn with_ip_key(mut self, ip_key: Option<IpAddr>) -> Self {
        if let Some(reg) = &mut self.registration {
            reg.ip_key = ip_key;
        }
        self
    }

    fn close(&mut self, ctx: &mut ws::WebsocketContext<Self>, code: CloseCode, reason: &str) {
        // Recorded for the hub's per-reason counters (it reads the link when
        // this session's Disconnect arrives). The hub's own evictions reach
        // here through `Close` too, but the hub has forgotten the session by
        // then and does not count it twice.
        self.link.set_close_reason(match code {
            CloseCode::Size => ClosedBy::TooBig,
            CloseCode::Policy => ClosedBy::Rate,
            CloseCode::Invalid => ClosedBy::Invalid,
            CloseCode::Protocol => ClosedBy::Protocol,
            CloseCode::Error => ClosedBy::Error,
            _ => ClosedBy::Normal,
        });
        ctx.close(Some(CloseReason {
            code,
            description: Some(reason.to_owned()),
        }));
        ctx.stop();
    }

    /// Charges one data frame against the inbound rate; closes with 1008 and
    /// returns false when the client is over it.
    fn admit(&mut self, now: Instant, ctx: &mut ws::WebsocketContext<Self>) -> bool {
        if self
            .inbound
            .check(&self.config.inbound, now.into_std())
            .is_allowed()
        {
            true
        } else {
            log::info!("session {}: closed, inbound message rate exceeded", self.id);
            self.close(ctx, CloseCode::Policy, "message rate exceeded");
            false
        }
    }

    fn on_text(&mut self, text: ByteString, ctx: &mut ws::WebsocketContext<Self>) {
        match protocol::parse_client_text(text) {
            Ok(frame) => self.forward(frame, ctx),
            Err(e) => ctx.text(protocol::error_frame(e.code(), &e.to_string())),
        }
    }

    fn forward(&mut self, frame: ClientFrame, ctx: &mut ws::WebsocketContext<Self>) {
        match self.hub.try_send(FromClient { id: self.id, frame }) {
            Ok(()) => {}
            Err(SendError::Full(_)) => ctx.text(protocol::error_frame(
                "busy",
                "the server is overloaded; your message was dropped",
            )),
            Err(SendError::Closed(_)) => self.close(ctx, CloseCode::Away, "server shutting down"),
        }
    }

    fn on_fragment(&mut self, item: Item, ctx: &mut ws::WebsocketContext<Self>) {
        let (first, chunk, last): (Option<bool>, Bytes, bool) = match item {
            Item::FirstText(b) => (Some(true), b, false),
            Item::FirstBinary(b) => (Some(false), b, false),
            Item::Continue(b) => (None, b, false),
            Item::Last(b) => (None, b, true),
        };
        match (first, &mut self.fragments) {
            (Some(is_text), None) => {
                self.fragments = Some(Fragments {
                    is_text,
                    buf: BytesMut::new(),
                })
            }
            (None, Some(_)) => {}
            _ => {
                return self.close(ctx, CloseCode::Protocol, "unexpected continuation frame");
            }
        }
        let Some(frags) = &mut self.fragments else {
            return;
        };
        if frags.buf.len() + chunk.len() > self.config.max_message_bytes {
            return self.close(ctx, CloseCode::Size, "message too big");
        }
        frags.buf.extend_from_slice(&chunk);
        if !last {
            return;
        }
        let Some(Fragments { is_text, buf }) = self.fragments.take() else {
            return;
        };
        if !is_text {
            ctx.text(protocol::error_frame(
                "unsupported",
                "binary messages are not supported",
            ));
            return;
        }
        match ByteString::try_from(buf.freeze()) {
            Ok(text) => self.on_text(text, ctx),
            Err(_) => self.close(ctx, CloseCode::Invalid, "text is not UTF-8"),
        }
    }
}

impl Actor for WsSessionActor {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.config.mailbox_capacity);
        if let Some(reg) = self.registration.take() {
            // do_send: one Connect per connection, bounded by max_connections.
            self.hub.do_send(Connect {
                id: self.id,
                addr: ctx.address(),
                link: self.link.clone(),
                room: reg.room,
                presence: reg.presence,
                socket: reg.socket,
                ip_key: reg.ip_key,
            });
        }
    }
}

impl Drop for WsSessionActor {
    fn drop(&mut self) {
        // Drop, not `stopped`: it also runs when the connection is cut off
        // under a frozen actor. do_send: one per connection.
        self.hub.do_send(Disconnect { id: self.id });
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for WsSessionActor {
    fn handle(&mut self, item: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        let now = Instant::now();
        self.link.touch(now);
        match item {
            Ok(ws::Message::Ping(bytes)) => ctx.pong(&bytes),
            Ok(ws::Message::Pong(_)) | Ok(ws::Message::Nop) => {}
            Ok(ws::Message::Text(text)) => {
                if self.fragments.is_some() {
                    return self.close(
                        ctx,
                        CloseCode::Protocol,
                        "text frame inside a fragmented message",
                    );
                }
                if self.admit(now, ctx) {
                    self.on_text(text, ctx);
                }
            }
            Ok(ws::Message::Binary(_)) => {
                if self.admit(now, ctx) {
                    ctx.text(protocol::error_frame(
                        "unsupported",
                        "binary messages are not supported",
                    ));
                }
            }
            Ok(ws::Message::Continuation(item)) => {
                // A fragmented message counts against the rate once, on its
                // first frame.
                let first = matches!(item, Item::FirstText(_) | Item::FirstBinary(_));
                if !first || self.admit(now, ctx) {
                    self.on_fragment(item, ctx);
                }
            }
            Ok(ws::Message::Close(reason)) => {
                ctx.close(reason);
                ctx.stop();
            }
            Err(ws::ProtocolError::Overflow) => {
                log::info!("session {}: closed, frame over the size limit", self.id);
                self.close(ctx, CloseCode::Size, "message too big");
            }
            Err(e) => {
                // A peer that vanishes without a close frame shows up here as
                // an I/O error; that is routine, not worth an info line.
                log::debug!("session {}: closed on protocol error: {e}", self.id);
                let code = if matches!(e, ws::ProtocolError::Io(_)) {
                    CloseCode::Error
                } else if e.to_string().contains("utf-8") {
                    CloseCode::Invalid
                } else {
                    CloseCode::Protocol
                };
                self.close(ctx, code, "protocol error");
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl Handler<Deliver> for WsSessionActor {
    type Result = ();

    fn handle(&mut self, msg: Deliver, ctx: &mut Self::Context) {
        ctx.text(msg.payload);
        self.link.release(msg.cost);
    }
}

impl Handler<Heartbeat> for WsSessionActor {
    type Result = ();

    fn handle(&mut self, _: Heartbeat, ctx: &mut Self::Context) {
        ctx.ping(b"");
    }
}

impl Handler<Close> for WsSessionActor {
    type Result = ();

    fn handle(&mut self, msg: Close, ctx: &mut Self::Context) {
        self.close(ctx, msg.code, &msg.reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_admits_up_to_max_and_frees_on_drop() {
        let gate = ConnectionGate::new(2);
        let a = gate.try_acquire().expect("first");
        let _b = gate.try_acquire().expect("second");
        assert!(gate.try_acquire().is_none());
        assert_eq!(gate.open(), 2);
        drop(a);
        assert_eq!(gate.open(), 1);
        assert!(gate.try_acquire().is_some());
    }
}
