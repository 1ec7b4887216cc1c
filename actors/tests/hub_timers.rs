//! The hub's heartbeat under paused tokio time, with real `WsSessionActor`s
//! driven through their WebSocket contexts (frames in, frames out) instead of
//! sockets. Pausing time makes the timer's behaviour exact: a session that
//! answers is kept through any number of intervals, and a frozen session — one
//! whose output nobody polls, exactly what actix-web-actors does when a client
//! stops reading — is still evicted by the hub's timer at the right tick.

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

mod common;

use common::{hub_config, HEARTBEAT};

use actix::prelude::*;
use actix_codec::{Decoder, Encoder};
use actix_http::ws::{Codec, Frame, Message};
use actix_web::error::PayloadError;
use actix_web::web::{Bytes, BytesMut};
use actix_web_actors::ws::WebsocketContext;
use futures::channel::mpsc;
use futures::{FutureExt, Stream, StreamExt};
use happynet_actors::delivery::Outbound;
use happynet_actors::gcra::Quota;
use happynet_actors::liveness::EvictionPolicy;
use happynet_actors::session::CLOSE_FLUSH_TIMEOUT;
use happynet_actors::{
    Broadcast, BroadcastHub, ClientKind, Connect, ConnectRefused, GetHubStats, HubShard, RoomName,
    SessionConfig, WsSessionActor,
};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// A session with a client-side codec: `send` feeds it frames as a client
/// would, `next_frame` reads what it wrote.
struct DrivenSession {
    input: mpsc::UnboundedSender<Result<Bytes, PayloadError>>,
    output: Pin<Box<dyn Stream<Item = Result<Bytes, actix_web::Error>>>>,
    codec: Codec,
    buf: BytesMut,
}

/// A protocol session of `id`, its actor created but not started (nobody
/// has polled its output yet), and its `Connect` for the hub: what the
/// upgrade route holds just before it registers the session.
fn unstarted_session(
    id: u64,
    hub: &Addr<HubShard>,
    epoch: tokio::time::Instant,
) -> (DrivenSession, Connect) {
    unstarted_session_of(id, hub, epoch, ClientKind::Protocol)
}

fn unstarted_session_of(
    id: u64,
    hub: &Addr<HubShard>,
    epoch: tokio::time::Instant,
    kind: ClientKind,
) -> (DrivenSession, Connect) {
    let config = Arc::new(SessionConfig {
        max_message_bytes: 65536,
        inbound: Quota::per_second(100.0, 100).unwrap(),
        mailbox_capacity: 1024,
    });
    let actor = WsSessionActor::new(id, hub.clone(), epoch, config, kind, None);
    let link = actor.link();
    let (input, rx) = mpsc::unbounded();
    let checked = actor.check_inbound(rx);
    let (addr, output) = WebsocketContext::create_with_addr(actor, checked);
    // What the upgrade route makes the response body: the session's own
    // frames and the frames the hub queues for it.
    let output = Outbound::new(link.clone(), output);
    let connect = Connect {
        id,
        addr,
        link,
        room: RoomName::new("lobby").unwrap(),
        presence: false,
        kind,
        socket: None,
        ip_key: None,
        recover: None,
    };
    let session = DrivenSession {
        input,
        output: Box::pin(output),
        codec: Codec::new().client_mode(),
        buf: BytesMut::new(),
    };
    (session, connect)
}

impl DrivenSession {
    /// A session registered with `hub` as the upgrade route does it: before
    /// its actor has started.
    async fn start(id: u64, hub: &Addr<HubShard>, epoch: tokio::time::Instant) -> Self {
        let (session, connect) = unstarted_session(id, hub, epoch);
        hub.send(connect).await.unwrap().unwrap();
        session
    }

    fn send(&mut self, msg: Message) {
        let mut out = BytesMut::new();
        self.codec.encode(msg, &mut out).unwrap();
        self.input.unbounded_send(Ok(out.freeze())).unwrap();
    }

    /// The next frame the session wrote (polling its output, which also
    /// drives the actor). It waits by yielding, never on a timer: under
    /// paused time a timer wait would let tokio advance the clock.
    async fn next_frame(&mut self) -> Frame {
        for _ in 0..10_000 {
            if let Some(frame) = self.codec.decode(&mut self.buf).unwrap() {
                return frame;
            }
            let next =
                futures::future::select(self.output.next(), Box::pin(tokio::task::yield_now()));
            match next.await {
                futures::future::Either::Left((Some(chunk), _)) => {
                    self.buf.extend_from_slice(&chunk.unwrap())
                }
                futures::future::Either::Left((None, _)) => panic!("session output ended"),
                futures::future::Either::Right(_) => {}
            }
        }
        panic!("the session wrote nothing");
    }

    /// Lets the session handle what it has been sent, at the current time.
    async fn drive(&mut self) {
        for _ in 0..100 {
            if let Some(Some(chunk)) = self.output.next().now_or_never() {
                self.buf.extend_from_slice(&chunk.unwrap());
            }
            tokio::task::yield_now().await;
        }
    }

    async fn next_text(&mut self) -> String {
        loop {
            match self.next_frame().await {
                Frame::Text(b) => return String::from_utf8(b.to_vec()).unwrap(),
                Frame::Ping(_) => {}
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }
}

/// Moves paused time to `t0 + n` heartbeats and a millisecond: tokio rounds
/// timer deadlines up to the next millisecond, so landing exactly on a
/// multiple of the interval could stop short of the timer.
async fn advance_to_tick(t0: tokio::time::Instant, n: u32) {
    let target = t0 + HEARTBEAT * n + Duration::from_millis(1);
    tokio::time::advance(target - tokio::time::Instant::now()).await;
}

async fn stats(hub: &Addr<BroadcastHub>) -> happynet_actors::HubStats {
    hub.send(GetHubStats).await.unwrap()
}

#[actix::test]
async fn the_hub_timer_keeps_answering_sessions_and_evicts_a_frozen_one() {
    tokio::time::pause();
    let hub_actor = BroadcastHub::new(hub_config());
    let epoch = hub_actor.epoch();
    let shards = hub_actor.shards();
    let hub = hub_actor.start();
    // This test's thread's shard: where its sessions register.
    let shard = shards.local().unwrap();
    let t0 = tokio::time::Instant::now();

    let mut live = DrivenSession::start(1, &shard, epoch).await;
    let mut frozen = DrivenSession::start(2, &shard, epoch).await;
    assert!(live.next_text().await.contains("welcome"));
    assert!(frozen.next_text().await.contains("welcome"));
    // From here on nobody polls `frozen`: its actor never runs again.

    // Ten heartbeats. The live session answers each ping with a pong.
    for tick in 1..=10u32 {
        advance_to_tick(t0, tick).await;
        match live.next_frame().await {
            Frame::Ping(_) => {
                live.send(Message::Pong(Bytes::new()));
                live.drive().await;
            }
            other => panic!("tick {tick}: expected a ping, got {other:?}"),
        }
        let s = stats(&hub).await;
        // The frozen session was last heard at t=0 and is silent for more
        // than 60 s from the second tick (60.001 s) on.
        let expect_evicted = u64::from(tick >= 2);
        assert_eq!(s.evicted_heartbeat, expect_evicted, "at tick {tick}");
    }
    let s = stats(&hub).await;
    assert_eq!(s.sessions, 1);

    // The live session still receives broadcasts.
    assert_eq!(hub.send(Broadcast::text("hi")).await.unwrap(), 1);
    assert_eq!(live.next_text().await, "hi");
    drop(frozen);
}

#[actix::test]
async fn a_session_that_stops_answering_is_evicted_after_client_timeout() {
    tokio::time::pause();
    let hub_actor = BroadcastHub::new(hub_config());
    let epoch = hub_actor.epoch();
    let shards = hub_actor.shards();
    let hub = hub_actor.start();
    // This test's thread's shard: where its sessions register.
    let shard = shards.local().unwrap();
    let t0 = tokio::time::Instant::now();
    let mut s = DrivenSession::start(1, &shard, epoch).await;
    assert!(s.next_text().await.contains("welcome"));

    // It answers once at tick 1 (30.001 s), then goes quiet but keeps reading.
    advance_to_tick(t0, 1).await;
    assert!(matches!(s.next_frame().await, Frame::Ping(_)));
    s.send(Message::Pong(Bytes::new()));
    s.drive().await;
    advance_to_tick(t0, 2).await; // heard 30 s ago
    assert!(matches!(s.next_frame().await, Frame::Ping(_)));
    advance_to_tick(t0, 3).await; // heard 60 s ago: not more than the timeout
    assert!(matches!(s.next_frame().await, Frame::Ping(_)));
    assert_eq!(stats(&hub).await.evicted_heartbeat, 0);
    advance_to_tick(t0, 4).await; // 90 s of silence
    match s.next_frame().await {
        Frame::Close(Some(reason)) => {
            assert_eq!(reason.description.as_deref(), Some("heartbeat timeout"))
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert_eq!(stats(&hub).await.evicted_heartbeat, 1);
}

#[actix::test]
async fn a_frozen_session_is_evicted_once_its_byte_budget_is_spent() {
    const CAP: usize = 1 << 20;
    let hub_actor = BroadcastHub::new(hub_config());
    let epoch = hub_actor.epoch();
    let shards = hub_actor.shards();
    let hub = hub_actor.start();
    // This test's thread's shard: where its sessions register.
    let shard = shards.local().unwrap();
    let mut live = DrivenSession::start(1, &shard, epoch).await;
    let mut frozen = DrivenSession::start(2, &shard, epoch).await;
    assert!(live.next_text().await.contains("welcome"));
    assert!(frozen.next_text().await.contains("welcome"));

    // 1 KiB broadcasts: the frozen session can hold CAP / (1 KiB + 128 B)
    // of them; the next one evicts it. The live one reads every one.
    let payload = "x".repeat(1024);
    let fits = CAP / EvictionPolicy::cost_of(payload.len());
    for i in 0..fits + 10 {
        let reached = hub.send(Broadcast::text(payload.clone())).await.unwrap();
        let expected = if i < fits { 2 } else { 1 };
        assert_eq!(reached, expected, "broadcast {i}");
        assert_eq!(live.next_text().await.len(), 1024);
    }
    let s = stats(&hub).await;
    assert_eq!(s.evicted_slow_consumer, 1);
    assert_eq!(s.sessions, 1);
    assert!(s.peak_session_queued_bytes <= CAP);
    assert!(s.peak_session_queued_bytes > CAP - EvictionPolicy::cost_of(1024));
    drop(frozen);
}

/// Registered before its `101`, a session's actor has not started and its
/// mailbox holds actix's default 16: a burst of broadcasts in that window is
/// queued past it, not taken for a slow consumer, and arrives in order.
#[actix::test]
async fn a_burst_before_the_session_starts_is_delivered_not_evicted() {
    const BURST: usize = 200;
    let hub_actor = BroadcastHub::new(hub_config());
    let epoch = hub_actor.epoch();
    let shards = hub_actor.shards();
    let hub = hub_actor.start();
    // This test's thread's shard: where its sessions register.
    let shard = shards.local().unwrap();
    let mut s = DrivenSession::start(1, &shard, epoch).await;
    for i in 0..BURST {
        // Awaited: the hub has queued each one before the next, all while
        // the session's actor has yet to run.
        let reached = hub.send(Broadcast::text(format!("m{i}"))).await.unwrap();
        assert_eq!(reached, 1, "broadcast {i}");
    }
    let st = stats(&hub).await;
    assert_eq!((st.evicted_slow_consumer, st.dropped), (0, 0));
    assert!(s.next_text().await.contains("welcome"));
    for i in 0..BURST {
        assert_eq!(s.next_text().await, format!("m{i}"));
    }
    // Started now: the configured mailbox applies from here on.
    assert_eq!(hub.send(Broadcast::text("after")).await.unwrap(), 1);
    assert_eq!(s.next_text().await, "after");
    assert_eq!(stats(&hub).await.sessions, 1);
}

/// An upgrade abandoned before the hub answered (its response, and with it
/// the unstarted session, dropped) is not registered.
#[actix::test]
async fn a_session_dropped_before_it_registers_is_refused() {
    let hub_actor = BroadcastHub::new(hub_config());
    let epoch = hub_actor.epoch();
    let shards = hub_actor.shards();
    let hub = hub_actor.start();
    // This test's thread's shard: where its sessions register.
    let shard = shards.local().unwrap();
    let (session, connect) = unstarted_session(1, &shard, epoch);
    drop(session);
    assert_eq!(
        shard.send(connect).await.unwrap(),
        Err(ConnectRefused::Gone)
    );
    assert_eq!(stats(&hub).await.sessions, 0);
}

/// A hub whose mailbox is full cannot take a client's message. A protocol
/// client is told in an error frame and stays; a plain client, which gets
/// no frames of the server's own, is closed with 1013 (try again later)
/// rather than have its message vanish.
#[actix::test]
async fn a_full_hub_is_an_error_frame_for_a_protocol_client_and_1013_for_a_plain_one() {
    tokio::time::pause();
    // A hub that never runs: its mailbox (actix's default 16) fills up and
    // stays full. actix lets each sender queue one message past the
    // capacity, so each session's first message is taken and its second
    // is refused.
    let stalled: Context<HubShard> = Context::new();
    let hub = stalled.address();
    while hub.try_send(GetHubStats).is_ok() {}
    let epoch = tokio::time::Instant::now();

    let (mut protocol, _) = unstarted_session_of(1, &hub, epoch, ClientKind::Protocol);
    protocol.send(Message::Text("one".into()));
    protocol.send(Message::Text("two".into()));
    let v: serde_json::Value = serde_json::from_str(&protocol.next_text().await).unwrap();
    assert_eq!(
        (v["type"].as_str(), v["code"].as_str()),
        (Some("error"), Some("busy"))
    );

    let (mut plain, _) = unstarted_session_of(2, &hub, epoch, ClientKind::Plain);
    plain.send(Message::Text("one".into()));
    plain.send(Message::Text("two".into()));
    plain.drive().await;
    // Its first message went to the hub, so the close waits for the hub's
    // Flush, which a stalled hub never answers: the wait is bounded.
    tokio::time::advance(CLOSE_FLUSH_TIMEOUT + Duration::from_millis(1)).await;
    match plain.next_frame().await {
        Frame::Close(Some(reason)) => {
            assert_eq!(u16::from(reason.code), 1013);
            assert_eq!(reason.description.as_deref(), Some("server overloaded"));
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    drop(stalled);
}
