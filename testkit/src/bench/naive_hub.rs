//! The baseline: a hub and sessions written the way the actix chat example
//! (`actix/examples`, `websockets/chat`) writes them, minus rooms.
//!
//! `NaiveHub` keeps a `HashMap` of `Recipient`s; each broadcast makes one
//! fresh `String` per session and `do_send`s it into an unbounded mailbox;
//! each session runs its own heartbeat timer and registers with the hub in
//! `started`. This is the code happynet is meant to beat, so it is kept as
//! plain as the example: no bound, no batching, no shared payload.

use actix::prelude::*;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The session's heartbeat, like the chat example's (the same period as
/// happynet's `heartbeat_interval` in this benchmark).
const NAIVE_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);
/// A session not heard from for this long is stopped.
const NAIVE_CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// What a session sends once the hub has registered it, so that clients
/// synchronise exactly as they do with happynet's `welcome`.
const NAIVE_WELCOME: &str = r#"{"type":"welcome"}"#;

/// A text frame for one session: each recipient gets its own `String`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct NaiveMsg(pub String);

/// A session registers; the result is its id.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct NaiveConnect {
    /// Where the hub sends the session's messages.
    pub addr: Recipient<NaiveMsg>,
}

/// A session went away.
#[derive(Message)]
#[rtype(result = "()")]
pub struct NaiveDisconnect {
    /// The id `NaiveConnect` returned.
    pub id: usize,
}

/// Send this text to every session.
#[derive(Message)]
#[rtype(result = "()")]
pub struct NaiveBroadcast(pub String);

/// How many sessions are registered (also the driver's fence).
#[derive(Message)]
#[rtype(result = "usize")]
pub struct NaiveCount;

/// The chat example's `ChatServer`, with one room.
#[derive(Default)]
pub struct NaiveHub {
    sessions: HashMap<usize, Recipient<NaiveMsg>>,
    next_id: usize,
}

impl Actor for NaiveHub {
    type Context = Context<Self>;
}

impl Handler<NaiveConnect> for NaiveHub {
    type Result = usize;

    fn handle(&mut self, msg: NaiveConnect, _: &mut Context<Self>) -> usize {
        self.next_id += 1;
        self.sessions.insert(self.next_id, msg.addr);
        self.next_id
    }
}

impl Handler<NaiveDisconnect> for NaiveHub {
    type Result = ();

    fn handle(&mut self, msg: NaiveDisconnect, _: &mut Context<Self>) {
        self.sessions.remove(&msg.id);
    }
}

impl Handler<NaiveBroadcast> for NaiveHub {
    type Result = ();

    fn handle(&mut self, msg: NaiveBroadcast, _: &mut Context<Self>) {
        for session in self.sessions.values() {
            session.do_send(NaiveMsg(msg.0.to_owned()));
        }
    }
}

impl Handler<NaiveCount> for NaiveHub {
    type Result = usize;

    fn handle(&mut self, _: NaiveCount, _: &mut Context<Self>) -> usize {
        self.sessions.len()
    }
}

/// The chat example's `WsChatSession`.
pub struct NaiveSession {
    id: usize,
    hb: Instant,
    hub: Addr<NaiveHub>,
}

impl NaiveSession {
    fn heartbeat(&self, ctx: &mut ws::WebsocketContext<Self>) {
        ctx.run_interval(NAIVE_HEARTBEAT_INTERVAL, |act, ctx| {
            if Instant::now().duration_since(act.hb) > NAIVE_CLIENT_TIMEOUT {
                ctx.stop();
                return;
            }
            ctx.ping(b"");
        });
    }
}

impl Actor for NaiveSession {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.heartbeat(ctx);
        let addr = ctx.address();
        self.hub
            .send(NaiveConnect {
                addr: addr.recipient(),
            })
            .into_actor(self)
            .then(|res, act, ctx| {
                match res {
                    Ok(id) => {
                        act.id = id;
                        ctx.text(NAIVE_WELCOME);
                    }
                    Err(_) => ctx.stop(),
                }
                fut::ready(())
            })
            .wait(ctx);
    }

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        self.hub.do_send(NaiveDisconnect { id: self.id });
        Running::Stop
    }
}

impl Handler<NaiveMsg> for NaiveSession {
    type Result = ();

    fn handle(&mut self, msg: NaiveMsg, ctx: &mut Self::Context) {
        ctx.text(msg.0);
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for NaiveSession {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        match msg {
            Ok(ws::Message::Ping(bytes)) => {
                self.hb = Instant::now();
                ctx.pong(&bytes);
            }
            Ok(ws::Message::Pong(_)) => self.hb = Instant::now(),
            Ok(ws::Message::Close(reason)) => {
                ctx.close(reason);
                ctx.stop();
            }
            Ok(_) => {}
            Err(_) => ctx.stop(),
        }
    }
}

/// `GET /ws`.
pub async fn ws_route(
    req: HttpRequest,
    stream: web::Payload,
    hub: web::Data<Addr<NaiveHub>>,
) -> Result<HttpResponse, actix_web::Error> {
    ws::start(
        NaiveSession {
            id: 0,
            hb: Instant::now(),
            hub: hub.get_ref().clone(),
        },
        &req,
        stream,
    )
}
