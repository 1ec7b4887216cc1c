//! The [`ClusterBridge`] actor: the shell that does the cluster's I/O —
//! connecting to Redis, the blocking reader, the publishing pipeline, the
//! presence rounds, leaving — around the plain parts of its sibling
//! modules, and the messages it answers ([`GetClusterStats`], [`Leave`]).

use super::link::LinkState;
use super::outbox::{OutEntry, Outbox, Pushed};
use super::presence::{presence_fields, sum_presence, MAX_PRESENCE_NODES, PRESENCE_TTL_INTERVALS};
use super::sequence::{Seen, SeqTracker, MAX_ORIGINS, ORIGIN_TTL};
use super::sequencer::{
    candidate_epoch, record_ttl, script_call, Held, ScriptContext, Unconfirmed, SCRIPT,
};
use super::wire::{add_xadd, decode_entry, decode_read_reply, decode_top_id, InEntry, StreamId};
use crate::config::{ClusterConfig, ConfigError, NodeIdentity};
use actix::prelude::*;
use futures::future::BoxFuture;
use futures::FutureExt;
use happynet_actors::backoff::Jitter;
use happynet_actors::{
    Backfill, Backfilled, Broadcast, BroadcastHub, ClusterPresence, FlushBehind, FlushToken,
    GetOccupancy, Origin, Payload, Position, Relay, RelayTarget, RoomName, Sequence, Sequenced,
    SetRelay, SetSequencer, Target, FLUSH_WAIT,
};
use redis::aio::MultiplexedConnection;
use redis::IntoConnectionInfo;
use serde::Serialize;
use std::collections::HashMap;
use std::fmt;
use std::time::Duration;
use tokio::time::Instant;

/// How long one `XREAD` blocks waiting for entries.
pub const READ_BLOCK: Duration = Duration::from_secs(1);

/// How long past [`READ_BLOCK`] a read may stay unanswered before the link
/// is declared dead (a hung server never resets the connection).
pub const READ_GRACE: Duration = Duration::from_secs(2);

/// How long one publishing pipeline (or presence round) may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// How long making a connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long setting the link up may take in all: both connections, naming
/// them, and reading the stream's newest id.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(3);

/// The most entries one publishing pipeline carries.
pub const PUBLISH_BATCH: usize = 256;

/// The most entries one read of a backfill returns.
pub const BACKFILL_PAGE: usize = 1000;

/// How long [`Leave`] waits to flush the outbox and remove this node's
/// presence.
pub const LEAVE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long the bridge waits for the hub's occupancy.
const HUB_REPLY_TIMEOUT: Duration = Duration::from_millis(500);

/// The most characters of an error message kept for logs, `last_error` and
/// the `/ready` body: a Redis error may quote a whole reply, and with it
/// other people's messages.
pub const MAX_ERROR_CHARS: usize = 200;

/// `error` as text, cut to [`MAX_ERROR_CHARS`] characters (marked `…`).
pub fn short_error(error: impl fmt::Display) -> String {
    let text = error.to_string();
    match text.char_indices().nth(MAX_ERROR_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// The bridge's counters, the result of [`GetClusterStats`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClusterStats {
    /// This node's name (`network.cluster.node_id` or random).
    pub node: String,
    /// Whether the link to Redis is up.
    pub link_up: bool,
    /// Milliseconds the link has been down (0 while up).
    pub link_down_ms: u64,
    /// Why the link last went down, or why the last attempt failed.
    pub last_error: Option<String>,
    /// Local broadcasts published to the stream.
    pub published: u64,
    /// Broadcasts from other nodes handed to the hub.
    pub received: u64,
    /// This node's own entries read back and skipped.
    pub skipped_own: u64,
    /// Entries read twice (a resent batch) and dropped.
    pub duplicates: u64,
    /// Local broadcasts dropped because the outbox was full.
    pub lost_outbound: u64,
    /// Messages from other nodes never received: the gaps in their
    /// sequences.
    pub lost_inbound: u64,
    /// Received entries that were published while the link was down and
    /// read from the stream after it came back.
    pub replayed: u64,
    /// Entries that could not be decoded (skipped).
    pub malformed: u64,
    /// Remote broadcasts the hub's full mailbox refused.
    pub dropped_inbound: u64,
    /// Times the link came back after being down.
    pub reconnects: u64,
    /// This node's own broadcasts read back from the stream and delivered
    /// here (history on).
    pub positioned_own: u64,
    /// Own broadcasts delivered here at once because the link was down
    /// when they were to be published (room ones with this node's own
    /// stamps; history on).
    pub unpositioned: u64,
    /// Positioned messages read back into the history when the node
    /// started (history on).
    pub backfilled: u64,
    /// Broadcasts waiting in the outbox now.
    pub outbox: usize,
    /// Other nodes seen in the last presence round.
    pub peers: usize,
    /// Sessions on the other nodes, as of the last presence round.
    pub remote_sessions: usize,
}

/// Sent by `/ready`, `/metrics` and `/status`: the result is the bridge's
/// [`ClusterStats`] as of now.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "ClusterStats")]
pub struct GetClusterStats;

/// Sent by `Network::shutdown`: flush what waits in the outbox, remove this
/// node's presence, and stop (within [`LEAVE_TIMEOUT`]).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct Leave;

/// The hub's handling of a batch's last broadcast: done once the hub has
/// handled the whole batch (its mailbox is FIFO).
type Delivery = BoxFuture<'static, ()>;

/// What the bridge hands the hub from the stream: a broadcast to deliver
/// as it is (stamped locally if history is on), or one the sequencer
/// positioned; and, in their turn, a held flush ([`Held`]).
enum ToHub {
    Plain(Broadcast),
    Positioned(Sequenced),
    Flush(FlushToken),
}

impl ToHub {
    /// `try_send`: false if the hub's mailbox is full. This node's own
    /// broadcasts and flushes go with `do_send`: one was handed over for
    /// each, and a flush refused would hold a closing session.
    fn try_send(self, hub: &Addr<BroadcastHub>) -> bool {
        match self {
            ToHub::Plain(b) if b.origin == Origin::Unsequenced => {
                hub.do_send(b);
                true
            }
            ToHub::Plain(b) => hub.try_send(b).is_ok(),
            ToHub::Positioned(p) => hub.try_send(p).is_ok(),
            ToHub::Flush(token) => {
                hub.do_send(FlushBehind(token));
                true
            }
        }
    }

    /// `send`: done once the hub has handled it.
    fn send(self, hub: &Addr<BroadcastHub>) -> Delivery {
        match self {
            ToHub::Plain(b) => hub.send(b).map(|_| ()).boxed(),
            ToHub::Positioned(p) => hub.send(p).map(|_| ()).boxed(),
            ToHub::Flush(token) => hub.send(FlushBehind(token)).map(|_| ()).boxed(),
        }
    }
}

/// A batch read from the stream, from the bridge's reader to the bridge.
/// The reply is the batch's [`Delivery`] (none if nothing in it was for
/// the hub). The reader reads the next batch while this one is delivered
/// and waits for the delivery before it hands the next one over: the read
/// no longer waits for the fan-out, and still no more than one batch is in
/// the hub and one in the reader.
#[derive(Message)]
#[rtype(result = "Option<Delivery>")]
struct Inbound {
    generation: u64,
    entries: Vec<InEntry>,
}

/// Each room of a positioned entry's target with its position (they were
/// checked to be as many when decoded).
fn positioned_rooms(target: Target, positions: Vec<Position>) -> Option<Vec<(RoomName, Position)>> {
    let rooms = match target {
        Target::Room(room) => vec![room],
        Target::Rooms(rooms) => rooms,
        Target::All | Target::Session(_) => return None,
    };
    (rooms.len() == positions.len()).then(|| rooms.into_iter().zip(positions).collect())
}

/// After a reconnect: entries up to `top` were in the stream before the
/// link came back.
#[derive(Debug, Clone, Copy)]
struct CatchUp {
    top: StreamId,
    replayed: u64,
    lost: u64,
}

struct Keys {
    stream: String,
    nodes: String,
    prefix: String,
}

impl Keys {
    fn presence(&self, node: &str) -> String {
        format!("{}:presence:{node}", self.prefix)
    }
}

/// The cluster bridge; see the module docs. Started by `Network::start`
/// when `network.cluster` is configured.
pub struct ClusterBridge {
    hub: Addr<BroadcastHub>,
    client: redis::Client,
    node: NodeIdentity,
    keys: Keys,
    stream_max_len: usize,
    read_batch: usize,
    presence_interval: Duration,
    link: LinkState,
    jitter: Jitter,
    /// Bumped whenever the link goes up or down: answers from an older
    /// connection are recognised and ignored.
    generation: u64,
    publisher: Option<MultiplexedConnection>,
    reader: Option<SpawnHandle>,
    flushing: bool,
    /// The presence round in flight, if any.
    presence_round: Option<SpawnHandle>,
    /// Set by [`Leave`]: no more presence rounds.
    leaving: bool,
    outbox: Outbox,
    /// Whether the outbox's overflow was logged since it last drained.
    outbox_warned: bool,
    seqs: SeqTracker,
    /// The last stream id read: where the reader resumes.
    last_id: Option<StreamId>,
    catch_up: Option<CatchUp>,
    stats: ClusterStats,
    /// With history on (`Some(ttl)`): the bridge is the hub's sequencer
    /// (see [`super::sequencer`]).
    history_ttl: Option<Duration>,
    script: redis::Script,
    /// Drawn once: the candidate epochs' `run`.
    run: u64,
    /// Script calls made: the candidate epochs' counter.
    calls: u64,
    unconfirmed: Unconfirmed,
    /// Broadcasts to one session and flushes, in their turn behind this
    /// node's own broadcasts not delivered here yet.
    held: Held<ToHub>,
    /// Whether the history was read back from the stream (once per start).
    backfilled: bool,
}

impl ClusterBridge {
    /// A bridge for `config` that hands remote broadcasts to `hub`, for the
    /// node `node` ([`NodeIdentity::new`], decided once so that the alerts
    /// name the node as the bridge does). Start it with `Actor::start`, then
    /// install it as the hub's relay ([`ClusterBridge::start_for`] does both).
    ///
    /// With `history_ttl` (history is on, and that is its `ttl`), the
    /// bridge also positions the node's room broadcasts (see
    /// [`super::sequencer`]).
    pub fn new(
        config: &ClusterConfig,
        node: NodeIdentity,
        hub: Addr<BroadcastHub>,
        history_ttl: Option<Duration>,
    ) -> Result<Self, ConfigError> {
        let invalid = |e: redis::RedisError| ConfigError::Invalid {
            path: "network.cluster.redis_url".into(),
            message: format!("is not a Redis URL: {e}"),
        };
        // TCP_NODELAY on both connections (the redis crate turns it off):
        // an XADD pipeline written while another command's bytes are not
        // yet acknowledged must not wait for that ACK (Nagle) before it
        // leaves, and every entry is small.
        let info = config
            .redis_url
            .as_str()
            .into_connection_info()
            .map_err(invalid)?;
        let tcp = info.tcp_settings().clone().set_nodelay(true);
        let client = redis::Client::open(info.set_tcp_settings(tcp)).map_err(invalid)?;
        let mut jitter = Jitter::new();
        let run = jitter.next_u64();
        let prefix = config.prefix.clone();
        Ok(ClusterBridge {
            hub,
            client,
            keys: Keys {
                stream: format!("{prefix}:broadcasts"),
                nodes: format!("{prefix}:nodes"),
                prefix,
            },
            stream_max_len: config.stream_max_len,
            read_batch: config.read_batch,
            presence_interval: config.presence_interval.0,
            link: LinkState::new(config.reconnect()?),
            jitter,
            generation: 0,
            publisher: None,
            reader: None,
            flushing: false,
            presence_round: None,
            leaving: false,
            outbox: Outbox::new(config.outbox_max, config.outbox_max_bytes),
            outbox_warned: false,
            seqs: SeqTracker::new(node.origin.clone(), MAX_ORIGINS),
            last_id: None,
            catch_up: None,
            stats: ClusterStats {
                node: node.name.clone(),
                ..ClusterStats::default()
            },
            node,
            history_ttl,
            script: redis::Script::new(SCRIPT),
            run,
            calls: 0,
            unconfirmed: Unconfirmed::new(config.outbox_max),
            held: Held::new(config.outbox_max, FLUSH_WAIT),
            backfilled: false,
        })
    }

    /// Starts a bridge for `config` on the current arbiter and installs it
    /// as `hub`'s relay (and, with `history_ttl`, its sequencer).
    pub fn start_for(
        config: &ClusterConfig,
        node: NodeIdentity,
        hub: Addr<BroadcastHub>,
        history_ttl: Option<Duration>,
    ) -> Result<Addr<ClusterBridge>, ConfigError> {
        let bridge = ClusterBridge::new(config, node, hub.clone(), history_ttl)?.start();
        // One message each at start-up: do_send is bounded by design.
        hub.do_send(SetRelay(Some(bridge.clone().recipient())));
        if history_ttl.is_some() {
            hub.do_send(SetSequencer(Some(bridge.clone().recipient())));
        }
        Ok(bridge)
    }

    fn warn_if_full(&mut self, pushed: Pushed) {
        if pushed != Pushed::Queued && !self.outbox_warned {
            self.outbox_warned = true;
            log::warn!(
                "cluster: outbox full ({} broadcasts or {} bytes); dropping the oldest broadcasts meant for other nodes until the link catches up",
                self.outbox.max(),
                self.outbox.max_bytes()
            );
        }
    }

    fn sequencing(&self) -> bool {
        self.history_ttl.is_some()
    }

    /// Delivers own broadcast `seq`, which could not be published (or not
    /// read back), on this node now (a room broadcast stamped by the hub
    /// itself), and marks its copy in the stream, if the script ran after
    /// all, a repeat; unless that copy was read back and delivered already.
    fn deliver_unpositioned(&mut self, seq: u64, target: RelayTarget, payload: Payload) {
        if !self.seqs.claim_own(seq) {
            return;
        }
        self.stats.unpositioned += 1;
        // One per local broadcast, as the hub's relay to this bridge is.
        self.hub
            .do_send(Broadcast::unsequenced(target.into(), payload));
    }

    /// Holds `item` behind this node's own broadcasts not delivered here
    /// yet, and hands the hub whatever is no longer behind anything.
    fn hold(&mut self, item: ToHub) {
        let behind = self.outbox.last_seq();
        let delivered = self.seqs.own_delivered();
        for item in self.held.hold(behind, delivered, Instant::now(), item) {
            item.try_send(&self.hub);
        }
    }

    /// Hands the hub the held items no longer behind anything (or held
    /// for [`FLUSH_WAIT`]).
    fn release_held(&mut self) {
        for item in self.held.release(self.seqs.own_delivered(), Instant::now()) {
            item.try_send(&self.hub);
        }
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node.name
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        if !self.link.start_connect() {
            return;
        }
        let client = self.client.clone();
        let stream = self.keys.stream.clone();
        let name = self.node.name.clone();
        let script = self.sequencing().then(|| self.script.clone());
        let setup = async move {
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(COMMAND_TIMEOUT));
            let mut publisher = client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(short_error)?;
            // The reader's reads block for READ_BLOCK; it has its own
            // deadline (READ_BLOCK + READ_GRACE) instead.
            let mut reader = client
                .get_multiplexed_async_connection_with_config(
                    &config.clone().set_response_timeout(None),
                )
                .await
                .map_err(short_error)?;
            // Named, so that an operator (or a test) can tell them apart
            // in CLIENT LIST.
            redis::cmd("CLIENT")
                .arg("SETNAME")
                .arg(format!("happynet-{name}-pub"))
                .exec_async(&mut publisher)
                .await
                .map_err(short_error)?;
            redis::cmd("CLIENT")
                .arg("SETNAME")
                .arg(format!("happynet-{name}-read"))
                .exec_async(&mut reader)
                .await
                .map_err(short_error)?;
            // The newest entry's id now: where a fresh node starts, and
            // the end of what a reconnecting node replays. Read raw and
            // only the id: the entry's fields may be anything.
            let newest: redis::Value = redis::cmd("XREVRANGE")
                .arg(&stream)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut publisher)
                .await
                .map_err(short_error)?;
            let top = decode_top_id(&newest)?;
            // Loaded now, so that publishing is an EVALSHA (the whole
            // script is sent again only if the server forgot it).
            if let Some(script) = script {
                script
                    .prepare_invoke()
                    .load_async(&mut publisher)
                    .await
                    .map_err(|e| short_error(format!("SCRIPT LOAD: {e}")))?;
            }
            Ok::<_, String>((publisher, reader, top))
        };
        ctx.spawn(
            async move {
                // The reader's connection has no response timeout (its
                // reads have their own deadline), so its setup would wait
                // forever on a server that accepts and never answers: the
                // whole setup has one deadline.
                tokio::time::timeout(SETUP_TIMEOUT, setup)
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {SETUP_TIMEOUT:?}")))
            }
            .into_actor(self)
            .map(|result, bridge, ctx| match result {
                Ok((publisher, reader, top)) => bridge.link_up(ctx, publisher, reader, top),
                Err(e) => {
                    let e = short_error(e);
                    let wait = bridge
                        .link
                        .connect_failed(Instant::now(), bridge.jitter.unit());
                    let first = bridge.stats.last_error.is_none();
                    bridge.stats.last_error = Some(format!("connect: {e}"));
                    if first {
                        log::warn!(
                            "cluster: cannot reach Redis ({e}); retrying in {wait:?}, broadcasts for other nodes wait in the outbox"
                        );
                    } else {
                        log::debug!("cluster: reconnect failed ({e}); retrying in {wait:?}");
                    }
                    ctx.run_later(wait, |bridge, ctx| bridge.connect(ctx));
                }
            }),
        );
    }

    fn link_up(
        &mut self,
        ctx: &mut Context<Self>,
        publisher: MultiplexedConnection,
        reader: MultiplexedConnection,
        top: StreamId,
    ) {
        let now = Instant::now();
        self.generation += 1;
        let down_for = self.link.connected(now);
        self.seqs.resume(now);
        self.stats.reconnects = self.link.reconnects();
        self.stats.last_error = None;
        self.publisher = Some(publisher);
        let start = match self.last_id {
            Some(last) => {
                self.catch_up = Some(CatchUp {
                    top,
                    replayed: 0,
                    lost: 0,
                });
                last
            }
            None => top,
        };
        self.last_id = Some(start);
        match down_for {
            Some(down_for) => log::info!(
                "cluster: link to Redis back after {down_for:?} (node {}); resuming the stream at {start}, {} broadcasts to flush, {} dropped from the full outbox so far",
                self.node.name,
                self.outbox.len(),
                self.outbox.lost()
            ),
            None => log::info!(
                "cluster: node {} linked to Redis, reading {} from {start}",
                self.node.name,
                self.keys.stream
            ),
        }
        self.outbox_warned = false;
        if self.sequencing() && !self.backfilled {
            // The reader starts where the backfill ends: nothing between.
            self.spawn_backfill(ctx, reader, start);
        } else {
            self.spawn_reader(ctx, reader, start);
        }
        self.flush(ctx);
        self.presence_round(ctx);
    }

    /// Reads the stream's positioned entries up to `top` into the hub's
    /// history (not delivered), in pages, then starts the reader from
    /// `top`. Once per start: later outages resume from the last id read.
    fn spawn_backfill(
        &mut self,
        ctx: &mut Context<Self>,
        reader: MultiplexedConnection,
        top: StreamId,
    ) {
        let generation = self.generation;
        let Some(mut conn) = self.publisher.clone() else {
            return;
        };
        let stream = self.keys.stream.clone();
        let hub = self.hub.clone();
        let backfill = async move {
            let mut from = "-".to_owned();
            let mut total = 0u64;
            if top != StreamId::default() {
                loop {
                    let page: redis::Value = redis::cmd("XRANGE")
                        .arg(&stream)
                        .arg(&from)
                        .arg(top.to_string())
                        .arg("COUNT")
                        .arg(BACKFILL_PAGE)
                        .query_async(&mut conn)
                        .await
                        .map_err(|e| short_error(format!("XRANGE: {e}")))?;
                    let redis::Value::Array(raw) = page else {
                        return Err("XRANGE: the reply is not an array".to_owned());
                    };
                    let entries: Vec<InEntry> = raw.iter().map(decode_entry).collect();
                    let last = entries.iter().filter_map(|e| e.id).max();
                    let now_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64);
                    let page: Vec<Backfilled> = entries
                        .into_iter()
                        .filter_map(|e| {
                            let age = Duration::from_millis(now_ms.saturating_sub(e.id?.ms));
                            let (target, payload) = e.content.ok()?;
                            let rooms = positioned_rooms(target, e.positions?)?;
                            Some(Backfilled {
                                rooms,
                                payload,
                                age,
                            })
                        })
                        .collect();
                    total += page.len() as u64;
                    hub.send(Backfill {
                        entries: page,
                        done: false,
                    })
                    .await
                    .map_err(|e| format!("hub: {e}"))?;
                    match last {
                        Some(last) if raw.len() >= BACKFILL_PAGE && last < top => {
                            from = format!("({last}");
                        }
                        _ => break,
                    }
                }
            }
            hub.send(Backfill {
                entries: Vec::new(),
                done: true,
            })
            .await
            .map_err(|e| format!("hub: {e}"))?;
            Ok::<_, String>(total)
        };
        let handle = ctx.spawn(backfill.into_actor(self).map(
            move |result, bridge, ctx| {
                if bridge.generation != generation {
                    return;
                }
                match result {
                    Ok(total) => {
                        bridge.backfilled = true;
                        bridge.stats.backfilled = total;
                        log::info!(
                            "cluster: node {} read {total} positioned messages back into its history, up to {top}",
                            bridge.node.name
                        );
                        bridge.spawn_reader(ctx, reader, top);
                    }
                    Err(why) => {
                        // Read again from the top on the next link.
                        bridge.last_id = None;
                        bridge.link_lost(ctx, format!("backfill: {why}"));
                    }
                }
            },
        ));
        self.reader = Some(handle);
    }

    fn link_lost(&mut self, ctx: &mut Context<Self>, why: String) {
        let now = Instant::now();
        let Some(wait) = self.link.lost(now, self.jitter.unit()) else {
            return;
        };
        let why = short_error(why);
        self.seqs.pause(now);
        self.generation += 1;
        if let Some(reader) = self.reader.take() {
            ctx.cancel_future(reader);
        }
        self.publisher = None;
        self.catch_up = None;
        // Own room broadcasts not read back yet (published or not) cannot
        // wait for the stream: delivered here now, in order, and relayed
        // plain later (those still in the outbox).
        let mut pending = self.unconfirmed.take();
        pending.extend(self.outbox.unsequence());
        for entry in pending {
            self.deliver_unpositioned(entry.seq, entry.target, entry.payload);
        }
        // Everything before them is delivered here now.
        self.release_held();
        log::warn!(
            "cluster: link to Redis down ({why}); local delivery continues, broadcasts for other nodes wait in the outbox (up to {}); reconnecting in {wait:?}",
            self.outbox.max()
        );
        self.stats.last_error = Some(why);
        // The other nodes' numbers are unknown now; show this node's own.
        // One message per outage: do_send is bounded.
        self.hub.do_send(ClusterPresence::default());
        self.stats.peers = 0;
        self.stats.remote_sessions = 0;
        ctx.run_later(wait, |bridge, ctx| bridge.connect(ctx));
    }

    /// Reads the stream from `from` until the link fails; each batch goes
    /// to the bridge as an [`Inbound`], and the next batch is read while it
    /// is delivered (see [`Inbound`]).
    fn spawn_reader(
        &mut self,
        ctx: &mut Context<Self>,
        mut conn: MultiplexedConnection,
        from: StreamId,
    ) {
        let generation = self.generation;
        let stream = self.keys.stream.clone();
        let batch = self.read_batch;
        let me = ctx.address();
        let handle = ctx.spawn(
            async move {
                let mut last = from;
                let mut delivering: Option<Delivery> = None;
                loop {
                    let mut xread = redis::cmd("XREAD");
                    xread
                        .arg("COUNT")
                        .arg(batch)
                        .arg("BLOCK")
                        .arg(READ_BLOCK.as_millis() as u64)
                        .arg("STREAMS")
                        .arg(&stream)
                        .arg(last.to_string());
                    // Raw: each entry is decoded on its own, so one that is
                    // malformed cannot fail the whole read.
                    let read = xread.query_async::<redis::Value>(&mut conn);
                    let read = tokio::time::timeout(READ_BLOCK + READ_GRACE, read);
                    // Polled together: the previous batch's delivery is
                    // driven (if the hub's mailbox was full, its last
                    // message is queued only when polled) while the read
                    // waits for entries.
                    let previous = delivering.take();
                    let delivered = async move {
                        if let Some(delivery) = previous {
                            let _ = delivery.await;
                        }
                    };
                    let (read, ()) = futures::join!(read, delivered);
                    let reply = match read {
                        Err(_) => {
                            return format!(
                                "no answer to XREAD within {:?}",
                                READ_BLOCK + READ_GRACE
                            )
                        }
                        Ok(Err(e)) => return short_error(format!("XREAD: {e}")),
                        Ok(Ok(reply)) => reply,
                    };
                    let entries = match decode_read_reply(&reply) {
                        Ok(entries) => entries,
                        Err(e) => return e,
                    };
                    for id in entries.iter().filter_map(|e| e.id) {
                        last = last.max(id);
                    }
                    // An empty batch (the block expired) still goes: it
                    // tells a reconnected bridge that it has caught up.
                    match me
                        .send(Inbound {
                            generation,
                            entries,
                        })
                        .await
                    {
                        Ok(delivery) => delivering = delivery,
                        Err(_) => return "the bridge stopped".to_owned(),
                    }
                }
            }
            .into_actor(self)
            .map(move |why, bridge, ctx| {
                if bridge.generation == generation {
                    bridge.link_lost(ctx, why);
                }
            }),
        );
        self.reader = Some(handle);
    }

    /// Publishes the oldest waiting broadcasts, one pipeline at a time, in
    /// order.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.flushing || !self.link.is_up() {
            return;
        }
        let Some(conn) = self.publisher.clone() else {
            return;
        };
        let batch = self.outbox.take(PUBLISH_BATCH);
        if batch.is_empty() {
            self.outbox_warned = false;
            return;
        }
        self.flushing = true;
        let publish = self.publish(&batch, conn);
        let generation = self.generation;
        ctx.spawn(
            async move { tokio::time::timeout(COMMAND_TIMEOUT, publish).await }
                .into_actor(self)
                .map(move |result, bridge, ctx| {
                    bridge.flushing = false;
                    match result {
                        Ok(Ok(())) => {
                            bridge.stats.published += bridge.outbox.acked() as u64;
                            // Positioned and not read back yet. A batch
                            // from before the link was lost was delivered
                            // here by then (link_lost).
                            if bridge.generation == generation {
                                bridge.unconfirmed.published(batch);
                            }
                            bridge.flush(ctx);
                        }
                        Ok(Err(e)) => {
                            bridge.outbox.failed();
                            if bridge.generation == generation {
                                bridge.link_lost(ctx, short_error(format!("publish: {e}")));
                            } else {
                                bridge.flush(ctx);
                            }
                        }
                        Err(_) => {
                            bridge.outbox.failed();
                            if bridge.generation == generation {
                                bridge.link_lost(
                                    ctx,
                                    format!("no answer to publishing within {COMMAND_TIMEOUT:?}"),
                                );
                            } else {
                                bridge.flush(ctx);
                            }
                        }
                    }
                }),
        );
    }

    /// Publishes `batch` in order: one call of the sequencer's script
    /// (history on), or an `XADD` pipeline.
    fn publish(
        &mut self,
        batch: &[OutEntry],
        mut conn: MultiplexedConnection,
    ) -> BoxFuture<'static, redis::RedisResult<()>> {
        let Some(ttl) = self.history_ttl else {
            let pipe = self.xadd_pipeline(batch);
            return async move { pipe.query_async::<()>(&mut conn).await }.boxed();
        };
        self.calls += 1;
        let call = script_call(
            &ScriptContext {
                prefix: &self.keys.prefix,
                stream: &self.keys.stream,
                max_len: self.stream_max_len,
                record_ttl: record_ttl(ttl),
                origin: &self.node.origin,
            },
            &candidate_epoch(self.run, self.calls),
            batch,
        );
        let script = self.script.clone();
        async move {
            let mut invocation = script.prepare_invoke();
            for key in call.keys {
                invocation.key(key);
            }
            for arg in call.args {
                invocation.arg(arg);
            }
            // EVALSHA; the whole script again if the server answers
            // NOSCRIPT (then nothing of the batch ran).
            invocation
                .invoke_async::<redis::Value>(&mut conn)
                .await
                .map(|_| ())
        }
        .boxed()
    }

    fn xadd_pipeline(&self, batch: &[OutEntry]) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        for entry in batch {
            add_xadd(
                &mut pipe,
                &self.keys.stream,
                self.stream_max_len,
                &self.node.origin,
                entry,
            );
        }
        pipe
    }

    /// Writes this node's occupancy and reads the others' (see the module
    /// docs).
    fn presence_round(&mut self, ctx: &mut Context<Self>) {
        if self.presence_interval.is_zero()
            || self.presence_round.is_some()
            || self.leaving
            || !self.link.is_up()
        {
            return;
        }
        let Some(mut conn) = self.publisher.clone() else {
            return;
        };
        let hub = self.hub.clone();
        let name = self.node.name.clone();
        let own_key = self.keys.presence(&name);
        let nodes_key = self.keys.nodes.clone();
        let prefix = self.keys.prefix.clone();
        let ttl_ms = (self.presence_interval * PRESENCE_TTL_INTERVALS).as_millis() as u64;
        let round = async move {
            let occupancy = hub
                .send(GetOccupancy)
                .timeout(HUB_REPLY_TIMEOUT)
                .await
                .map_err(|e| format!("hub: {e}"))?;
            let mut pipe = redis::pipe();
            pipe.atomic()
                .del(&own_key)
                .ignore()
                .hset_multiple(&own_key, &presence_fields(&occupancy))
                .ignore()
                .pexpire(&own_key, ttl_ms as i64)
                .ignore()
                .sadd(&nodes_key, &name)
                .ignore()
                .smembers(&nodes_key);
            let (members,): (Vec<String>,) = pipe
                .query_async(&mut conn)
                .await
                .map_err(|e| format!("presence: {e}"))?;
            let others: Vec<String> = members
                .into_iter()
                .filter(|m| *m != name)
                .take(MAX_PRESENCE_NODES)
                .collect();
            if others.is_empty() {
                return Ok((ClusterPresence::default(), 0));
            }
            let mut pipe = redis::pipe();
            for other in &others {
                pipe.hgetall(format!("{prefix}:presence:{other}"));
            }
            let hashes: Vec<HashMap<String, String>> = pipe
                .query_async(&mut conn)
                .await
                .map_err(|e| format!("presence: {e}"))?;
            let (total, dead) = sum_presence(&others, &hashes);
            if !dead.is_empty() {
                let _: Result<(), _> = redis::cmd("SREM")
                    .arg(&nodes_key)
                    .arg(&dead)
                    .query_async(&mut conn)
                    .await;
            }
            Ok::<_, String>((total, others.len() - dead.len()))
        };
        let generation = self.generation;
        let handle = ctx.spawn(
            async move {
                tokio::time::timeout(COMMAND_TIMEOUT, round)
                    .await
                    .unwrap_or_else(|_| Err("presence: no answer in time".to_owned()))
            }
            .into_actor(self)
            .map(move |result, bridge, _| {
                bridge.presence_round = None;
                // A round from before the link dropped would overwrite the
                // reset (link_lost) with stale totals.
                if bridge.generation != generation {
                    return;
                }
                match result {
                    Ok((total, peers)) => {
                        bridge.stats.peers = peers;
                        bridge.stats.remote_sessions = total.sessions;
                        // One per presence interval: do_send is bounded.
                        bridge.hub.do_send(total);
                    }
                    // The reader notices a dead link; this is only logged.
                    Err(e) => log::debug!("cluster: {}", short_error(e)),
                }
            }),
        );
        // Spawned futures first run after this handler returns, so the
        // completion above cannot have cleared the slot yet.
        self.presence_round = Some(handle);
    }

    /// Handles a batch from the reader: skips own and repeated entries,
    /// counts gaps, hands the rest to the hub. Returns the delivery of the
    /// batch's last broadcast, which completes once the hub has handled the
    /// whole batch (its mailbox is FIFO).
    fn on_inbound(&mut self, entries: Vec<InEntry>) -> Option<ToHub> {
        let now = Instant::now();
        let mut deliveries: Vec<ToHub> = Vec::new();
        let mut newest = None;
        for entry in entries {
            if let Some(id) = entry.id {
                self.last_id = Some(self.last_id.map_or(id, |l| l.max(id)));
                newest = Some(id);
            }
            // The sequence is tracked even when the rest is malformed: the
            // entry was published, so it is not a gap.
            // Positioned entries are delivered from the stream, this
            // node's own too (see the sequence module).
            // With the sequencer, so are its own plain entries (broadcasts
            // to everyone); the ones delivered by the fallback are repeats.
            let positioned = entry.positions.is_some();
            let sequencing = self.sequencing();
            let seen = entry.sender.as_ref().map(|(origin, seq)| {
                let seen = if positioned || sequencing {
                    if *origin == self.node.origin {
                        self.unconfirmed.read_back(*seq);
                    }
                    self.seqs.observe_positioned(origin, *seq, now)
                } else {
                    self.seqs.observe(origin, *seq, now)
                };
                (origin, *seq, seen)
            });
            let own = seen
                .as_ref()
                .is_some_and(|(origin, _, _)| **origin == self.node.origin);
            if let Some((origin, seq, Seen::New { lost })) = seen {
                if lost > 0 {
                    self.stats.lost_inbound = self.stats.lost_inbound.saturating_add(lost);
                    if let Some(c) = &mut self.catch_up {
                        c.lost = c.lost.saturating_add(lost);
                    }
                    log::warn!(
                        "cluster: {lost} messages from node {origin} were lost (sequence {}..={}), e.g. trimmed from the stream or dropped from its outbox",
                        seq.saturating_sub(lost),
                        seq.saturating_sub(1)
                    );
                }
            }
            let (target, payload) = match (seen.map(|(_, _, seen)| seen), entry.content) {
                (Some(Seen::New { .. }), Ok(content)) => content,
                (Some(Seen::Own), Ok(_)) => {
                    self.stats.skipped_own += 1;
                    continue;
                }
                // An own plain entry delivered here before it was published
                // (the fallback) is skipped as own entries were before.
                (Some(Seen::Duplicate), Ok(_)) if own && !positioned => {
                    self.stats.skipped_own += 1;
                    continue;
                }
                (Some(Seen::Duplicate), Ok(_)) => {
                    self.stats.duplicates += 1;
                    continue;
                }
                (_, Err(e)) => {
                    self.stats.malformed += 1;
                    if self.stats.malformed.is_power_of_two() {
                        log::warn!(
                            "cluster: skipped a malformed stream entry ({}); {} so far",
                            short_error(e),
                            self.stats.malformed
                        );
                    }
                    continue;
                }
                // Content decodes only with a sender (decode_entry).
                (None, Ok(_)) => {
                    self.stats.malformed += 1;
                    continue;
                }
            };
            if own {
                self.stats.positioned_own += 1;
            } else {
                self.stats.received += 1;
                if let Some(c) = &mut self.catch_up {
                    if entry.id.is_some_and(|id| id <= c.top) {
                        c.replayed += 1;
                        self.stats.replayed += 1;
                    }
                }
            }
            let positioned = entry
                .positions
                .and_then(|positions| positioned_rooms(target.clone(), positions));
            deliveries.push(match positioned {
                Some(rooms) => ToHub::Positioned(Sequenced {
                    rooms,
                    payload,
                    own,
                }),
                None if own => ToHub::Plain(Broadcast::unsequenced(target, payload)),
                None => ToHub::Plain(Broadcast::from_cluster(target, payload)),
            });
            if own {
                // Right behind it: what was held for it, before any newer
                // own entry of this batch.
                deliveries.extend(self.held.release(self.seqs.own_delivered(), now));
            }
        }
        deliveries.extend(self.held.release(self.seqs.own_delivered(), now));
        if let Some(c) = self.catch_up {
            // Caught up once a read ends past the old top (or comes back
            // empty: the block expired with nothing newer).
            if newest.is_none_or(|id| id >= c.top) {
                self.catch_up = None;
                log::info!(
                    "cluster: caught up after the outage: {} messages replayed from the stream, {} lost",
                    c.replayed,
                    c.lost
                );
            }
        }
        let last = deliveries.pop();
        for delivery in deliveries {
            // try_send: the hub's mailbox is bounded and a full one must be
            // noticed; the reader waits for each batch (below), so this
            // only fails if the hub is swamped by other senders.
            if !delivery.try_send(&self.hub) {
                self.stats.dropped_inbound += 1;
            }
        }
        last
    }

    fn snapshot(&self) -> ClusterStats {
        let mut stats = self.stats.clone();
        stats.link_up = self.link.is_up();
        stats.link_down_ms = self
            .link
            .down_since()
            .map_or(0, |s| s.elapsed().as_millis() as u64);
        stats.lost_outbound = self.outbox.lost();
        stats.outbox = self.outbox.len();
        stats
    }
}

impl Actor for ClusterBridge {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // As in the hub: no timers when dropped outside a runtime.
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        self.connect(ctx);
        if !self.presence_interval.is_zero() {
            ctx.run_interval(self.presence_interval, |bridge, ctx| {
                bridge.presence_round(ctx)
            });
        }
        ctx.run_interval(ORIGIN_TTL / 4, |bridge, _| {
            bridge.seqs.sweep(Instant::now())
        });
        if self.sequencing() {
            // Held items never wait much past FLUSH_WAIT.
            ctx.run_interval(FLUSH_WAIT / 8, |bridge, _| bridge.release_held());
        }
    }
}

impl Handler<Relay> for ClusterBridge {
    type Result = ();

    fn handle(&mut self, msg: Relay, ctx: &mut Self::Context) {
        // Nobody to deliver to anywhere; published, it would only be a
        // malformed entry on every other node.
        if matches!(&msg.target, RelayTarget::Rooms(rooms) if rooms.is_empty()) {
            return;
        }
        let (pushed, seq, _) = self.outbox.push_numbered(msg.target, msg.payload, false);
        if self.sequencing() {
            // Delivered here already (before the hub's sequencer was set):
            // its copy in the stream is a repeat here.
            self.seqs.claim_own(seq);
        }
        self.warn_if_full(pushed);
        self.flush(ctx);
    }
}

impl Handler<Sequence> for ClusterBridge {
    type Result = ();

    fn handle(&mut self, msg: Sequence, ctx: &mut Self::Context) {
        let (target, payload) = match msg {
            Sequence::Flush(token) => return self.hold(ToHub::Flush(token)),
            Sequence::Broadcast { target, payload } => (target, payload),
        };
        let target = match RelayTarget::of(target) {
            Ok(RelayTarget::Rooms(rooms)) if rooms.is_empty() => return,
            Ok(target) => target,
            // Not published (session ids are per node): delivered here in
            // its turn.
            Err(target) => {
                return self.hold(ToHub::Plain(Broadcast::unsequenced(target, payload)));
            }
        };
        let up = self.link.is_up() && self.publisher.is_some();
        // Published by the script (room broadcasts positioned), delivered
        // here when read back; with the link down, delivered here now and
        // relayed plain later.
        let (pushed, seq, dropped) = self
            .outbox
            .push_numbered(target.clone(), payload.clone(), up);
        if !up {
            self.deliver_unpositioned(seq, target, payload);
        }
        // A full outbox drops for the other nodes, never for this one. Once
        // a dropped one is delivered here, every older own entry's copy in
        // the stream is a repeat here (`claim_own`), so those not delivered
        // here yet (published and not read back, or still to publish) are
        // delivered first, in order.
        let dropped: Vec<OutEntry> = dropped.into_iter().filter(|e| e.sequenced).collect();
        if let Some(newest) = dropped.last().map(|e| e.seq) {
            let mut older = self.unconfirmed.take();
            older.extend(self.outbox.sequenced_before(newest));
            older.sort_by_key(|e| e.seq);
            older.dedup_by_key(|e| e.seq);
            for entry in older.into_iter().chain(dropped) {
                self.deliver_unpositioned(entry.seq, entry.target, entry.payload);
            }
        }
        self.warn_if_full(pushed);
        self.flush(ctx);
    }
}

impl Handler<Inbound> for ClusterBridge {
    type Result = MessageResult<Inbound>;

    fn handle(&mut self, msg: Inbound, _: &mut Self::Context) -> Self::Result {
        if msg.generation != self.generation {
            return MessageResult(None);
        }
        // A read came back on this connection: it works.
        self.link.healthy();
        let last = self.on_inbound(msg.entries);
        // send (not try_send) for the last one: the reader waits for its
        // answer before handing over the next batch (its back-pressure).
        MessageResult(last.map(|last| last.send(&self.hub)))
    }
}

impl Handler<GetClusterStats> for ClusterBridge {
    type Result = MessageResult<GetClusterStats>;

    fn handle(&mut self, _: GetClusterStats, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.snapshot())
    }
}

impl Handler<Leave> for ClusterBridge {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Leave, ctx: &mut Self::Context) -> Self::Result {
        // No more relays: the hub is shutting down too. No more presence
        // either: a round still waiting for the hub is dropped before it
        // writes (one already written is ordered before the DEL below, on
        // the same connection).
        self.hub.do_send(SetRelay(None));
        if self.sequencing() {
            self.hub.do_send(SetSequencer(None));
        }
        self.leaving = true;
        if let Some(round) = self.presence_round.take() {
            ctx.cancel_future(round);
        }
        let conn = self.publisher.clone().filter(|_| self.link.is_up());
        let waiting = self.outbox.drain_waiting();
        // With history on, the waiting entries go through the script
        // first (the other nodes get them positioned), then the rest.
        let publish = match &conn {
            Some(c) if self.sequencing() && !waiting.is_empty() => {
                Some(self.publish(&waiting, c.clone()))
            }
            _ => None,
        };
        let mut pipe = if self.sequencing() {
            redis::pipe()
        } else {
            self.xadd_pipeline(&waiting)
        };
        pipe.del(self.keys.presence(&self.node.name))
            .ignore()
            .srem(&self.keys.nodes, &self.node.name)
            .ignore();
        let flushed = waiting.len();
        if let Some(reader) = self.reader.take() {
            ctx.cancel_future(reader);
        }
        Box::pin(
            async move {
                let Some(mut conn) = conn else {
                    return Err("the link is down".to_owned());
                };
                let leave = async move {
                    if let Some(publish) = publish {
                        publish.await?;
                    }
                    pipe.query_async::<()>(&mut conn).await
                };
                match tokio::time::timeout(LEAVE_TIMEOUT, leave).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {LEAVE_TIMEOUT:?}")),
                }
            }
            .into_actor(self)
            .map(move |result, bridge, ctx| {
                match result {
                    Ok(()) => {
                        bridge.stats.published += flushed as u64;
                        log::info!(
                            "cluster: node {} left the cluster ({flushed} queued broadcasts flushed)",
                            bridge.node.name
                        );
                    }
                    Err(e) => {
                        bridge.outbox.count_lost(flushed as u64);
                        log::warn!(
                            "cluster: node {} left without flushing {flushed} queued broadcasts ({e})",
                            bridge.node.name
                        );
                    }
                }
                ctx.stop();
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_cut_short() {
        assert_eq!(short_error("short"), "short");
        let long = "é".repeat(MAX_ERROR_CHARS + 50);
        let cut = short_error(&long);
        assert_eq!(cut.chars().count(), MAX_ERROR_CHARS + 1);
        assert!(cut.ends_with('…'));
    }
}
