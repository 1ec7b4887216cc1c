//! `WsSessionActor`: one WebSocket connection.
//!
//! The session reads what its client sends, forwards data (and, for a
//! protocol client, control frames) to the hub's shard on its own thread
//! ([`HubShard`]), and writes what the hub delivers. It owns no timers: the hub pings it and judges its
//! liveness from the [`SessionLink`] the two share, because a session whose
//! client stops reading is never polled again by actix-web-actors and so
//! could not act on its own timers.
//!
//! **Plain and protocol clients** ([`ClientKind`]). A plain client's text
//! and binary messages are data, broadcast verbatim to its room; nothing it
//! sends is parsed and it is sent nothing but data, so what the server
//! cannot tell it in a frame is a close code: 1013 when the hub is too busy
//! to take its message. A protocol client's text may be a JSON control frame
//! and it is told about refusals with error frames.
//!
//! **Inbound checks.** The frames reach the session through a
//! [`CheckedPayload`] (see [`crate::frame_check`]), which validates them as
//! they arrive and ends the stream on a violation; the session then closes
//! with the code it recorded. The session itself enforces the inbound
//! message rate.
//!
//! **Closing.** When the session closes after forwarding messages to the
//! hub (the client's close frame, or a violation), it first waits for the
//! hub's answer to [`Flush`] ([`Flushed`], into the session's own mailbox),
//! so its own echo of those messages goes out
//! before the close frame, as RFC 6455 lets a server do.
//!
//! Close codes it sends: 1002 for protocol errors, 1007 for text (or a close
//! reason) that is not UTF-8, 1009 for a message over
//! `websocket.max_message_bytes`, 1008 when the client exceeds its message
//! rate, 1013 when the hub cannot take a plain client's message, 1001 when
//! the server shuts down; a client's own close frame is echoed.

use crate::frame_check::{CheckedPayload, InboundVerdict};
use crate::gcra::{Gcra, Quota};
use crate::hub::HubShard;
use crate::liveness::{ClosedBy, SessionLink};
use crate::messages::{Close, Disconnect, Flush, Flushed, FromClient, Heartbeat};
use crate::protocol::{self, ClientFrame, ClientKind};
use crate::rooms::SessionId;
use actix::prelude::*;
use actix_http::ws::Item;
use actix_web::web::{Bytes, BytesMut};
use actix_web_actors::ws::{self, CloseCode, CloseReason};
use bytestring::ByteString;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long a closing session waits for the hub's answer to [`Flush`]
/// before it sends its close frame anyway.
pub const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_millis(500);

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

/// A fragmented message being reassembled.
struct Fragments {
    is_text: bool,
    buf: BytesMut,
}

/// One WebSocket connection. Build it with [`WsSessionActor::new`], wrap the
/// request payload with [`WsSessionActor::check_inbound`], start it with
/// `actix_web_actors::ws::WsResponseBuilder::start_with_addr`, and register
/// it with the hub ([`crate::messages::Connect`]) before returning the `101`.
pub struct WsSessionActor {
    id: SessionId,
    hub: Addr<HubShard>,
    link: Arc<SessionLink>,
    config: Arc<SessionConfig>,
    kind: ClientKind,
    inbound: Gcra,
    /// Boxed, like `pending_close`: rare, and every idle session would
    /// otherwise carry its room (see the size test below).
    fragments: Option<Box<Fragments>>,
    /// What the frame checker found wrong, if it ended the stream.
    verdict: InboundVerdict,
    /// Set once the session has decided to close: nothing more the client
    /// sends is acted on.
    closing: bool,
    /// Whether messages went to the hub since the session started: if so,
    /// closing waits for [`Flush`] (see the module docs).
    forwarded: bool,
    /// The close frame held until the hub's [`Flushed`] (or the timeout).
    pending_close: Option<Box<Option<CloseReason>>>,
    _slot: Option<ConnectionSlot>,
}

impl WsSessionActor {
    /// A session `id` for `hub` (the shard on the thread the session will
    /// run on: [`crate::HubShards::local`]), of `kind`.
    ///
    /// `epoch` must be the hub's ([`crate::BroadcastHub::epoch`]). `slot` is
    /// released when the session ends.
    pub fn new(
        id: SessionId,
        hub: Addr<HubShard>,
        epoch: Instant,
        config: Arc<SessionConfig>,
        kind: ClientKind,
        slot: Option<ConnectionSlot>,
    ) -> Self {
        WsSessionActor {
            id,
            hub,
            link: Arc::new(
                SessionLink::new(epoch, Instant::now()).with_max_queued(config.mailbox_capacity),
            ),
            config,
            kind,
            inbound: Gcra::new(),
            fragments: None,
            verdict: InboundVerdict::default(),
            closing: false,
            forwarded: false,
            pending_close: None,
            _slot: slot,
        }
    }

    /// The state this session shares with the hub: put it in the
    /// [`crate::messages::Connect`] that registers the session.
    pub fn link(&self) -> Arc<SessionLink> {
        self.link.clone()
    }

    /// Wraps the request payload in the inbound frame checker; give the
    /// result to actix-web-actors as the session's stream. Set the codec's
    /// frame size to `max_message_bytes` too: the checker then refuses
    /// anything bigger first, with 1009.
    pub fn check_inbound<S>(&self, payload: S) -> CheckedPayload<S> {
        CheckedPayload::new(payload, self.config.max_message_bytes, self.verdict.clone())
    }

    /// Closes with `code`: after the hub's [`Flush`] if messages went to it.
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
            CloseCode::Error | CloseCode::Again => ClosedBy::Error,
            _ => ClosedBy::Normal,
        });
        self.close_after_flush(
            ctx,
            Some(CloseReason {
                code,
                description: Some(reason.to_owned()),
            }),
        );
    }

    /// Sends `reason` (echoing a client's close, or our own) and stops,
    /// once the hub has handled what this session sent it.
    fn close_after_flush(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        reason: Option<CloseReason>,
    ) {
        if self.closing {
            return;
        }
        self.closing = true;
        if !self.forwarded {
            self.link.mark_closing();
            ctx.close(reason);
            ctx.stop();
            return;
        }
        // The hub answers with `Flushed` into this session's mailbox, behind
        // the echoes it queued there first. A hub that is full or stalled
        // does not hold the close for longer than the timeout.
        self.pending_close = Some(Box::new(reason));
        let flush = Flush {
            reply_to: ctx.address().recipient(),
        };
        if self.hub.try_send(flush).is_err() {
            self.finish_close(ctx);
            return;
        }
        ctx.run_later(CLOSE_FLUSH_TIMEOUT, |act, ctx| act.finish_close(ctx));
    }

    /// Sends the close frame `close_after_flush` is holding, once.
    fn finish_close(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        if let Some(reason) = self.pending_close.take() {
            self.link.mark_closing();
            ctx.close(*reason);
            ctx.stop();
        }
    }

    /// Charges one data message against the inbound rate; closes with 1008
    /// and returns false when the client is over it.
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
        match self.kind {
            ClientKind::Plain => self.forward(ClientFrame::Text(text), ctx),
            ClientKind::Protocol => match protocol::parse_client_text(text) {
                Ok(frame) => self.forward(frame, ctx),
                Err(e) => ctx.text(protocol::error_frame(e.code(), &e.to_string())),
            },
        }
    }

    fn forward(&mut self, frame: ClientFrame, ctx: &mut ws::WebsocketContext<Self>) {
        match self.hub.try_send(FromClient { id: self.id, frame }) {
            Ok(()) => self.forwarded = true,
            Err(SendError::Full(_)) => match self.kind {
                ClientKind::Protocol => ctx.text(protocol::busy_frame()),
                // A plain client cannot be told in a frame that its message
                // was dropped; the close code says it.
                ClientKind::Plain => {
                    log::warn!(
                        "session {}: closed (1013), the hub's mailbox is full",
                        self.id
                    );
                    self.close(ctx, CloseCode::Again, protocol::BUSY_CLOSE_REASON);
                }
            },
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
        // The frame checker refuses stray continuations, interleaved data
        // frames and oversized messages before they get here; these checks
        // stay so that the session never depends on it for memory safety.
        match (first, &mut self.fragments) {
            (Some(is_text), None) => {
                self.fragments = Some(Box::new(Fragments {
                    is_text,
                    buf: BytesMut::new(),
                }))
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
        let Some(frags) = self.fragments.take() else {
            return;
        };
        let Fragments { is_text, buf } = *frags;
        if !is_text {
            return self.forward(ClientFrame::Binary(buf.freeze()), ctx);
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
        // From here a full mailbox means a slow consumer (see the hub).
        self.link.mark_started();
    }
}

impl Drop for WsSessionActor {
    fn drop(&mut self) {
        // Drop, not `stopped`: it also runs when the connection is cut off
        // under a frozen actor, and when an upgrade is abandoned before the
        // actor started. do_send: one per connection.
        self.hub.do_send(Disconnect { id: self.id });
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for WsSessionActor {
    fn handle(&mut self, item: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        if self.closing {
            return;
        }
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
            Ok(ws::Message::Binary(bytes)) => {
                if self.fragments.is_some() {
                    return self.close(
                        ctx,
                        CloseCode::Protocol,
                        "binary frame inside a fragmented message",
                    );
                }
                if self.admit(now, ctx) {
                    self.forward(ClientFrame::Binary(bytes), ctx);
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
            // The client's close: echo it (RFC 6455 §5.5.1), after our
            // echoes of what it sent before.
            Ok(ws::Message::Close(reason)) => self.close_after_flush(ctx, reason),
            Err(ws::ProtocolError::Overflow) => {
                log::info!("session {}: closed, frame over the size limit", self.id);
                self.close(ctx, CloseCode::Size, "message too big");
            }
            // The payload stream failed: the connection is gone or broken,
            // and no close frame will reach anyone.
            Err(ws::ProtocolError::Io(e)) => {
                log::debug!("session {}: connection error: {e}", self.id);
                self.link.set_close_reason(ClosedBy::Error);
                self.closing = true;
                ctx.stop();
            }
            Err(e) => {
                // The checker refuses everything the codec would, first; a
                // codec error here is one it does not know about.
                log::info!("session {}: closed on a protocol error: {e}", self.id);
                self.close(ctx, CloseCode::Protocol, "protocol error");
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        if self.closing {
            return;
        }
        match self.verdict.take() {
            // The frame checker refused something and ended the stream after
            // the frames before it, which have all been handled by now.
            Some(v) => {
                log::info!(
                    "session {}: closed ({}), {}",
                    self.id,
                    u16::from(v.code),
                    v.reason
                );
                self.close(ctx, v.code, v.reason);
            }
            // The client went away without a close frame.
            None => {
                self.closing = true;
                ctx.stop();
            }
        }
    }
}

impl Handler<Heartbeat> for WsSessionActor {
    type Result = ();

    fn handle(&mut self, _: Heartbeat, ctx: &mut Self::Context) {
        ctx.ping(b"");
    }
}

impl Handler<Flushed> for WsSessionActor {
    type Result = ();

    /// Every echo the hub queued before this is written: close now.
    fn handle(&mut self, _: Flushed, ctx: &mut Self::Context) {
        self.finish_close(ctx);
    }
}

impl Handler<Close> for WsSessionActor {
    type Result = ();

    /// The hub's close (eviction, shutdown): at once, without waiting for
    /// a flush. A session already closing sends its own close shortly.
    fn handle(&mut self, msg: Close, ctx: &mut Self::Context) {
        if self.closing {
            return;
        }
        self.forwarded = false;
        self.close(ctx, msg.code, &msg.reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every open connection carries one session for as long as it is open,
    /// idle or not, so its size is memory per idle connection (it lives in
    /// the upgrade body's allocation, with actix-web-actors' context). What
    /// only a fragmented message or a closing session needs is boxed; this
    /// keeps a new field from quietly adding to every connection. 104 bytes
    /// on 64-bit targets: the hub's address (24), the rate limiter's
    /// timestamp (16), six pointer-sized fields and three flags.
    #[test]
    fn a_session_stays_small() {
        let size = std::mem::size_of::<WsSessionActor>();
        assert!(size <= 104, "WsSessionActor is {size} bytes");
    }

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
