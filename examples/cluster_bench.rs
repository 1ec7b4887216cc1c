//! Run with: cargo run --release --example cluster_bench [-- --runs 3 --clients 1000 --rate 50 --seconds 5 --burst 500]
//! or, for room broadcasts with history off against history on (three
//! nodes each): `-- --room --compare-history`
//!
//! Scale-out: the same number of WebSocket clients served by one
//! node, then by three nodes sharing broadcasts through Redis, alternating
//! `--runs` (3) times in one run; every figure printed is the median over
//! the runs. For each topology:
//!
//! - **fixed rate**: `--rate` (50) broadcasts/s for `--seconds` (5), sent
//!   round-robin to the nodes with `POST /broadcast`: delivery latency
//!   p50/p99/max, split into *local* (the client is on the node the
//!   broadcast was posted to) and *cross-node* (it came through Redis), and
//!   deliveries/s; and, per broadcast, the *first* receipt local and
//!   across nodes — the hop through Redis without the time the receiving
//!   node takes to write the frame to all its clients;
//! - **the hop, in parts** (three nodes): an observer thread of this
//!   process reads the cluster's stream with its own blocking `XREAD`, so
//!   *POST → XREAD* is the sending node's part plus Redis; a probe thread
//!   `XADD`s its own clock to a stream of its own every 10 ms and the
//!   observer reads it back, so *XADD → XREAD* is Redis's part (and the
//!   wake of a reader) under the same load; *receiving node* is, per
//!   broadcast, the first cross-node receipt minus the observer's read of
//!   the same entry: the receiving bridge, hub and shards, a write, and
//!   the load generator reading it;
//! - **CPU per delivery** during the fixed-rate phase (schedstat): the
//!   nodes' processes, the load generator (this process without the
//!   observer and probe threads) and `redis-server`;
//! - **full speed**: `--burst` (500) broadcasts posted as fast as the nodes
//!   accept them (`--in-flight` (8) POSTs at a time): cluster-wide
//!   deliveries/s, from the first send to the last receipt.
//!
//! Targets: cross-node p99 ≤ 5 ms at 1,000 clients and 50 broadcasts/s;
//! three nodes' full-speed throughput ≥ 80% of one node's.
//!
//! How to read it: every node is a child process (this binary re-executed
//! with `--serve`), each with 2 HTTP workers (`--workers`); the single node runs without
//! Redis (the deployment it is compared with). Redis is a `redis-server`
//! child on a free port, unless `--redis URL` names one (a fresh key prefix
//! is used per run). Clients are minimal raw-socket WebSocket clients on this
//! process's one thread, spread evenly over the nodes. Latency is receipt
//! time minus the send time stamped in the 64-byte payload (same machine,
//! same clock), so it includes the load generator's own delay in reading a
//! socket: with one thread reading 1,000 sockets per broadcast, the last
//! client is read about 1,000 reads after the first, and the one-node
//! figure at the same load is the floor under the cross-node one. On a
//! 2-core machine the three nodes, Redis and the load generator share two
//! CPUs: the cluster figures are a floor, not what three machines would do.
//! Every client must receive every broadcast exactly once; anything else is
//! reported on a line starting with `!!` and the exit status is 1.
//!
//! With `--room`, every client is in the room `bench` and every broadcast
//! goes to it (`POST /broadcast?room=bench`), as protocol clients receive
//! room messages: stamped frames when history is on. History is on by
//! default, and in a cluster a room broadcast is then positioned by Redis
//! and delivered from the stream on its own node too, so *local* includes
//! a round trip to Redis. `--compare-history` replaces the one-node column
//! with three nodes whose history is off (room broadcasts delivered
//! locally first, as before positioning existed), alternating with three
//! nodes with history on, in one run.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use actix_web::{App, HttpServer};
use happynet::{Config, Network};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitCode, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use testkit::bench::payload::unix_nanos;
use testkit::bench::{median, proc_stats};
use testkit::redis_server::RedisServer;
use testkit::ws;
use tokio::io::AsyncWriteExt;

/// Every broadcast is exactly this long.
const PAYLOAD_BYTES: usize = 64;
/// The mask on the clients' pongs.
const MASK: [u8; 4] = [0x1f, 0x2e, 0x3d, 0x4c];
/// Handshakes in flight at once.
const CONNECT_CONCURRENCY: usize = 64;
/// How long every client may take to receive every broadcast of a phase.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node may take to start and (with Redis) link up.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How often the probe thread stamps its own stream.
const PROBE_INTERVAL: Duration = Duration::from_millis(10);
/// How long the observer's `XREAD` blocks, so that it sees the stop flag.
const OBSERVE_BLOCK_MS: u64 = 100;
/// The names of this process's threads that are not the load generator.
const WATCH_THREADS: [&str; 2] = ["redis-observer", "redis-probe"];

struct Options {
    runs: usize,
    clients: usize,
    rate: f64,
    seconds: f64,
    burst: usize,
    in_flight: usize,
    redis: Option<String>,
    room: bool,
    compare_history: bool,
    /// HTTP workers per node.
    workers: usize,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        runs: 3,
        clients: 1000,
        rate: 50.0,
        seconds: 5.0,
        burst: 500,
        in_flight: 8,
        redis: None,
        room: false,
        compare_history: false,
        workers: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        let number = |name: &str, v: String| {
            v.parse::<f64>()
                .ok()
                .filter(|n| *n > 0.0)
                .ok_or_else(|| format!("{name} needs a positive number, got {v:?}"))
        };
        match flag.as_str() {
            "--runs" => o.runs = number("--runs", value("--runs")?)? as usize,
            "--clients" => o.clients = number("--clients", value("--clients")?)? as usize,
            "--rate" => o.rate = number("--rate", value("--rate")?)?,
            "--seconds" => o.seconds = number("--seconds", value("--seconds")?)?,
            "--burst" => o.burst = number("--burst", value("--burst")?)? as usize,
            "--in-flight" => o.in_flight = number("--in-flight", value("--in-flight")?)? as usize,
            "--redis" => o.redis = Some(value("--redis")?),
            "--room" => o.room = true,
            "--compare-history" => o.compare_history = true,
            "--workers" => o.workers = number("--workers", value("--workers")?)? as usize,
            "--help" | "-h" => {
                return Err(
                    "usage: cluster_bench [--runs N] [--clients N] [--rate R] [--seconds S] \
                            [--burst N] [--in-flight N] [--redis URL] [--room] [--compare-history] \
                            [--workers N]"
                        .into(),
                )
            }
            other => return Err(format!("unknown flag {other} (try --help)")),
        }
    }
    Ok(o)
}

// ---------------------------------------------------------------------------
// Payload: `C<origin>:<phase:3>:<seq:9>:<sent ns:20>:` padded to 64 bytes
// ---------------------------------------------------------------------------

fn payload(origin: usize, phase: u32, seq: u32, sent_ns: u64) -> String {
    let head = format!("C{origin}:{phase:03}:{seq:09}:{sent_ns:020}:");
    format!("{head:.<width$}", width = PAYLOAD_BYTES)
}

/// The benchmark payload in a frame: the frame itself, or the `data` of a
/// stamped room message (the payload needs no JSON escaping).
fn frame_payload(p: &[u8]) -> &[u8] {
    const DATA: &[u8] = br#""data":""#;
    if !p.starts_with(br#"{"type":"message""#) {
        return p;
    }
    let Some(at) = p.windows(DATA.len()).position(|w| w == DATA) else {
        return p;
    };
    let rest = &p[at + DATA.len()..];
    rest.iter()
        .position(|b| *b == b'"')
        .map_or(p, |end| &rest[..end])
}

/// `(origin, phase, seq, sent ns)` of a benchmark payload.
fn parse_payload(p: &[u8]) -> Option<(usize, u32, u32, u64)> {
    let p = frame_payload(p);
    if p.len() != PAYLOAD_BYTES || p.first() != Some(&b'C') {
        return None;
    }
    let text = std::str::from_utf8(p).ok()?;
    let mut parts = text[1..].split(':');
    Some((
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    ))
}

// ---------------------------------------------------------------------------
// A node (child process)
// ---------------------------------------------------------------------------

/// `--serve <redis-url|none> <prefix> <history-on|history-off> <workers>`:
/// one node on 127.0.0.1:0; prints `LISTENING <addr>` and serves until its
/// standard input closes.
fn serve(redis: &str, prefix: &str, history: bool, workers: usize) -> ExitCode {
    let mut json = serde_json::json!({"network": {"websocket": {
        "max_connections": 20_000, "history": {"enabled": history}}}});
    if redis != "none" {
        json["network"]["cluster"] = serde_json::json!({"redis_url": redis, "prefix": prefix});
    }
    let config = Config::from_json_str(&json.to_string()).expect("bench config");
    actix_web::rt::System::new().block_on(async move {
        let net = Network::start(config).expect("network starts");
        let routes = net.configure();
        let server = HttpServer::new(move || App::new().configure(routes.clone()))
            .workers(workers)
            .backlog(4096)
            .on_connect(net.on_connect())
            .disable_signals()
            .bind(("127.0.0.1", 0))
            .expect("bind");
        println!("LISTENING {}", server.addrs()[0]);
        let server = server.run();
        let handle = server.handle();
        actix_web::rt::spawn(server);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            let _ = tx.send(());
        });
        let _ = rx.await;
        handle.stop(false).await;
    });
    ExitCode::SUCCESS
}

/// A node's process; killed when dropped.
struct NodeProcess {
    child: Child,
    addr: SocketAddr,
}

impl NodeProcess {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn spawn(redis: Option<&str>, prefix: &str, history: bool, workers: usize) -> NodeProcess {
        let exe = std::env::current_exe().expect("own path");
        let history = if history { "history-on" } else { "history-off" };
        let mut child = Command::new(exe)
            .args(["--serve", redis.unwrap_or("none"), prefix, history])
            .arg(workers.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn a node");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("node address");
        let addr = line
            .trim()
            .strip_prefix("LISTENING ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("node said {line:?}"));
        NodeProcess { child, addr }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// What the clients saw, shared on this one thread.
#[derive(Default)]
struct Seen {
    ready: Cell<usize>,
    failed: RefCell<Vec<String>>,
    phase: Cell<u32>,
    /// Receipt minus send, ns, for clients on the origin node.
    local: RefCell<Vec<u64>>,
    /// The same for clients on the other nodes.
    cross: RefCell<Vec<u64>>,
    /// Per broadcast (by seq): the earliest local receipt's latency — how
    /// long the first client waited, before the fan-out to the rest.
    first_local: RefCell<std::collections::HashMap<u32, u64>>,
    /// The same across nodes: the hop through Redis without the fan-out.
    first_cross: RefCell<std::collections::HashMap<u32, u64>>,
    /// Per client: broadcasts of this phase received.
    counts: RefCell<Vec<u32>>,
    delivered: Cell<u64>,
    anomalies: Cell<u64>,
    first_send_ns: Cell<u64>,
    last_recv_ns: Cell<u64>,
}

impl Seen {
    fn begin(&self, phase: u32, clients: usize) {
        self.phase.set(phase);
        self.local.borrow_mut().clear();
        self.cross.borrow_mut().clear();
        self.first_local.borrow_mut().clear();
        self.first_cross.borrow_mut().clear();
        *self.counts.borrow_mut() = vec![0; clients];
        self.delivered.set(0);
        self.anomalies.set(0);
        self.first_send_ns.set(u64::MAX);
        self.last_recv_ns.set(0);
    }

    fn on_text(&self, idx: usize, node: usize, p: &[u8], now_ns: u64) {
        let Some((origin, phase, seq, sent_ns)) = parse_payload(p) else {
            return;
        };
        if phase != self.phase.get() {
            self.anomalies.set(self.anomalies.get() + 1);
            return;
        }
        self.delivered.set(self.delivered.get() + 1);
        if let Some(c) = self.counts.borrow_mut().get_mut(idx) {
            *c += 1;
        }
        let latency = now_ns.saturating_sub(sent_ns);
        let (all, first) = if origin == node {
            (&self.local, &self.first_local)
        } else {
            (&self.cross, &self.first_cross)
        };
        all.borrow_mut().push(latency);
        first
            .borrow_mut()
            .entry(seq)
            .and_modify(|f| *f = (*f).min(latency))
            .or_insert(latency);
        self.first_send_ns
            .set(self.first_send_ns.get().min(sent_ns));
        self.last_recv_ns.set(self.last_recv_ns.get().max(now_ns));
    }
}

async fn client(
    idx: usize,
    node: usize,
    addr: SocketAddr,
    seen: Rc<Seen>,
    gate: Rc<tokio::sync::Semaphore>,
    room: bool,
) {
    let opened = {
        let _turn = gate.acquire().await;
        ws::upgrade_to(addr, if room { "/ws?room=bench" } else { "/ws" }).await
    };
    let (mut stream, mut buf) = match opened {
        Ok(o) => o,
        Err(e) => {
            seen.failed.borrow_mut().push(e);
            return;
        }
    };
    let mut welcomed = false;
    let mut answer = Vec::new();
    let mut now_ns = unix_nanos();
    loop {
        while let Ok(Some(frame)) = ws::parse_frame(buf.filled()) {
            let p = &buf.filled()[frame.payload.clone()];
            match frame.opcode() {
                ws::OP_TEXT if !welcomed => {
                    welcomed = true;
                    seen.ready.set(seen.ready.get() + 1);
                }
                ws::OP_TEXT => seen.on_text(idx, node, p, now_ns),
                ws::OP_PING => ws::push_pong(&mut answer, p, MASK),
                ws::OP_CLOSE => return,
                _ => {}
            }
            buf.consume(frame.len);
        }
        if !answer.is_empty() {
            if stream.write_all(&answer).await.is_err() {
                return;
            }
            answer.clear();
        }
        match buf.read_from(&mut stream).await {
            Ok(0) | Err(_) => return,
            Ok(_) => now_ns = unix_nanos(),
        }
    }
}

// ---------------------------------------------------------------------------
// The stream, watched from outside the nodes
// ---------------------------------------------------------------------------

/// What the observer saw of the phase being recorded. Bounded: one entry
/// per broadcast of the phase, one per probe.
#[derive(Default)]
struct Watched {
    /// Per broadcast (by seq): the observer's read of its entry minus its
    /// send time (POST → XREAD).
    stream: HashMap<u32, u64>,
    /// Per probe: XADD → XREAD.
    hop: Vec<u64>,
}

/// The observer and probe threads (see the module docs), on blocking
/// connections of their own so that the load generator's thread never
/// delays their reads; stopped when dropped.
struct Watch {
    stop: Arc<AtomicBool>,
    /// The phase whose entries are recorded (0: none).
    phase: Arc<AtomicU32>,
    seen: Arc<Mutex<Watched>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn bulk(entry: &redis::streams::StreamId, field: &str) -> Option<Vec<u8>> {
    match entry.map.get(field)? {
        redis::Value::BulkString(b) => Some(b.clone()),
        _ => None,
    }
}

impl Watch {
    fn start(url: &str, prefix: &str) -> Result<Watch, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let mut reader = client.get_connection().map_err(|e| e.to_string())?;
        let mut writer = client.get_connection().map_err(|e| e.to_string())?;
        let stream = format!("{prefix}:broadcasts");
        let probe = format!("{prefix}:probe");
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(AtomicU32::new(0));
        let seen = Arc::new(Mutex::new(Watched::default()));
        let observer = {
            let (stop, phase, seen, probe) =
                (stop.clone(), phase.clone(), seen.clone(), probe.clone());
            std::thread::Builder::new()
                .name(WATCH_THREADS[0].into())
                .spawn(move || {
                    // A fresh prefix: both streams are read from their start.
                    let mut ids = ["0-0".to_owned(), "0-0".to_owned()];
                    while !stop.load(Ordering::Relaxed) {
                        let reply: Option<redis::streams::StreamReadReply> =
                            match redis::cmd("XREAD")
                                .arg("BLOCK")
                                .arg(OBSERVE_BLOCK_MS)
                                .arg("STREAMS")
                                .arg(&stream)
                                .arg(&probe)
                                .arg(&ids[0])
                                .arg(&ids[1])
                                .query(&mut reader)
                            {
                                Ok(r) => r,
                                Err(_) => return,
                            };
                        let now = unix_nanos();
                        let recording = phase.load(Ordering::Relaxed);
                        let mut seen = seen.lock().unwrap();
                        for key in reply.map_or_else(Vec::new, |r| r.keys) {
                            let slot = usize::from(key.key == probe);
                            for entry in &key.ids {
                                ids[slot].clone_from(&entry.id);
                                if recording == 0 {
                                    continue;
                                }
                                if slot == 1 {
                                    let sent = bulk(entry, "t").and_then(|t| {
                                        String::from_utf8(t).ok()?.parse::<u64>().ok()
                                    });
                                    if let Some(sent) = sent {
                                        seen.hop.push(now.saturating_sub(sent));
                                    }
                                } else if let Some((_, phase, seq, sent)) =
                                    bulk(entry, "payload").as_deref().and_then(parse_payload)
                                {
                                    if phase == recording {
                                        seen.stream.insert(seq, now.saturating_sub(sent));
                                    }
                                }
                            }
                        }
                    }
                })
                .map_err(|e| e.to_string())?
        };
        let prober = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(WATCH_THREADS[1].into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let added: redis::RedisResult<String> = redis::cmd("XADD")
                            .arg(&probe)
                            .arg("MAXLEN")
                            .arg("~")
                            .arg(1000)
                            .arg("*")
                            .arg("t")
                            .arg(unix_nanos())
                            .query(&mut writer);
                        if added.is_err() {
                            return;
                        }
                        std::thread::sleep(PROBE_INTERVAL);
                    }
                })
                .map_err(|e| e.to_string())?
        };
        Ok(Watch {
            stop,
            phase,
            seen,
            threads: vec![observer, prober],
        })
    }

    /// Records `phase` from now on (forgetting what was recorded).
    fn record(&self, phase: u32) {
        *self.seen.lock().unwrap() = Watched::default();
        self.phase.store(phase, Ordering::Relaxed);
    }

    /// Stops recording and returns what was recorded.
    fn take(&self) -> Watched {
        self.phase.store(0, Ordering::Relaxed);
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// CPU time used so far, nanoseconds: the nodes, the load generator (this
/// process without the watch threads), redis-server.
fn cpu_now(nodes: &[u32], redis: Option<u32>, ticks: u64) -> [Option<u64>; 3] {
    let of = |pid: u32| {
        proc_stats::cpu_time(pid, ticks)
            .ok()
            .and_then(|c| c.sched_ns)
    };
    let nodes_ns = nodes.iter().map(|&p| of(p)).sum::<Option<u64>>();
    let own = proc_stats::thread_cpu(std::process::id());
    let loadgen = (!own.is_empty()).then(|| {
        own.iter()
            .filter(|t| !WATCH_THREADS.contains(&t.name.as_str()))
            .map(|t| t.ns)
            .sum()
    });
    [nodes_ns, loadgen, redis.and_then(of)]
}

// ---------------------------------------------------------------------------
// Broadcasts
// ---------------------------------------------------------------------------

async fn post(http: &awc::Client, addr: SocketAddr, body: String, room: bool) -> bool {
    let query = if room { "?room=bench" } else { "" };
    http.post(format!("http://{addr}/broadcast{query}"))
        .content_type("text/plain")
        .send_body(body)
        .await
        .map(|r| r.status().as_u16() == 202)
        .unwrap_or(false)
}

async fn wait_until(what: &str, limit: Duration, done: impl Fn() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

fn quantile_ms(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q) as usize).min(sorted.len() - 1);
    sorted[i] as f64 / 1e6
}

#[derive(Default, Clone, Copy)]
struct Latency {
    p50: f64,
    p99: f64,
    max: f64,
    n: usize,
}

fn latency(samples: &RefCell<Vec<u64>>) -> Latency {
    let mut v = samples.borrow().clone();
    v.sort_unstable();
    Latency {
        p50: quantile_ms(&v, 0.50),
        p99: quantile_ms(&v, 0.99),
        max: v.last().map_or(f64::NAN, |m| *m as f64 / 1e6),
        n: v.len(),
    }
}

#[derive(Default, Clone, Copy)]
struct Figures {
    local: Latency,
    cross: Latency,
    first_local: Latency,
    first_cross: Latency,
    /// POST → the observer's XREAD of the entry.
    to_stream: Latency,
    /// The probe's XADD → the observer's XREAD.
    redis_hop: Latency,
    /// Per broadcast: first cross-node receipt − the observer's read.
    receiving: Latency,
    fixed_rate_deliveries: f64,
    full_speed_deliveries: f64,
    /// CPU µs per fixed-rate delivery: nodes, load generator, redis-server.
    cpu_us: [f64; 3],
}

/// Checks every client got `expect` broadcasts of the phase; `!!` lines
/// otherwise.
fn check_exactly_once(seen: &Seen, expect: u32, what: &str) -> bool {
    let counts = seen.counts.borrow();
    let wrong = counts.iter().filter(|c| **c != expect).count();
    if wrong > 0 || seen.anomalies.get() > 0 {
        println!(
            "!! {what}: {wrong} clients did not get exactly {expect} broadcasts; {} frames from another phase",
            seen.anomalies.get()
        );
        return false;
    }
    true
}

/// One topology: `nodes` nodes (with Redis when more than one), the
/// clients spread over them, the fixed-rate and full-speed phases.
async fn run_topology(
    o: &Options,
    nodes: usize,
    redis: Option<(&str, Option<u32>)>,
    history: bool,
    ok: &mut bool,
) -> Result<Figures, String> {
    let prefix = format!("bench{}", unix_nanos() % 1_000_000_007);
    let redis = redis.filter(|_| nodes > 1);
    let procs: Vec<NodeProcess> = (0..nodes)
        .map(|_| NodeProcess::spawn(redis.map(|r| r.0), &prefix, history, o.workers))
        .collect();
    let watch = match redis {
        Some((url, _)) => Some(Watch::start(url, &prefix)?),
        None => None,
    };
    let pids: Vec<u32> = procs.iter().map(NodeProcess::pid).collect();
    let ticks = proc_stats::clock_ticks_per_sec();
    let http = awc::Client::builder()
        .connector(awc::Connector::new().limit(64))
        .timeout(Duration::from_secs(10))
        .finish();
    for p in &procs {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let ready = http
                .get(format!("http://{}/ready", p.addr))
                .send()
                .await
                .map(|r| r.status().as_u16() == 200)
                .unwrap_or(false);
            if ready {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("node {} never became ready", p.addr));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    let seen = Rc::new(Seen::default());
    seen.begin(0, o.clients);
    let gate = Rc::new(tokio::sync::Semaphore::new(CONNECT_CONCURRENCY));
    let tasks: Vec<_> = (0..o.clients)
        .map(|i| {
            let node = i % nodes;
            tokio::task::spawn_local(client(
                i,
                node,
                procs[node].addr,
                seen.clone(),
                gate.clone(),
                o.room,
            ))
        })
        .collect();
    wait_until("every client's welcome", START_TIMEOUT * 3, || {
        seen.ready.get() + seen.failed.borrow().len() >= o.clients
    })
    .await?;
    if !seen.failed.borrow().is_empty() {
        return Err(format!(
            "clients failed: {:?}",
            seen.failed.borrow().first()
        ));
    }

    let mut figures = Figures::default();
    // Fixed rate, round-robin over the nodes.
    let count = (o.rate * o.seconds).round().max(1.0) as u32;
    seen.begin(1, o.clients);
    if let Some(w) = &watch {
        w.record(1);
    }
    let cpu_before = cpu_now(&pids, redis.and_then(|r| r.1), ticks);
    let interval = Duration::from_secs_f64(1.0 / o.rate);
    let start = Instant::now();
    for seq in 0..count {
        let at = start + interval * seq;
        if let Some(wait) = at.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let origin = seq as usize % nodes;
        if !post(
            &http,
            procs[origin].addr,
            payload(origin, 1, seq, unix_nanos()),
            o.room,
        )
        .await
        {
            return Err("a fixed-rate broadcast was refused".into());
        }
    }
    let expect = u64::from(count) * o.clients as u64;
    wait_until("every fixed-rate delivery", DRAIN_TIMEOUT, || {
        seen.delivered.get() >= expect
    })
    .await
    .map_err(|e| format!("{e} ({} of {expect})", seen.delivered.get()))?;
    let cpu_after = cpu_now(&pids, redis.and_then(|r| r.1), ticks);
    for (i, (b, a)) in cpu_before.iter().zip(&cpu_after).enumerate() {
        figures.cpu_us[i] = match (b, a) {
            (Some(b), Some(a)) => a.saturating_sub(*b) as f64 / 1e3 / seen.delivered.get() as f64,
            _ => f64::NAN,
        };
    }
    *ok &= check_exactly_once(&seen, count, "fixed rate");
    figures.local = latency(&seen.local);
    figures.cross = latency(&seen.cross);
    let firsts = |m: &RefCell<std::collections::HashMap<u32, u64>>| {
        RefCell::new(m.borrow().values().copied().collect::<Vec<u64>>())
    };
    figures.first_local = latency(&firsts(&seen.first_local));
    figures.first_cross = latency(&firsts(&seen.first_cross));
    if let Some(w) = &watch {
        // Give the observer its last read (it blocks at most this long).
        tokio::time::sleep(Duration::from_millis(OBSERVE_BLOCK_MS)).await;
        let watched = w.take();
        figures.redis_hop = latency(&RefCell::new(watched.hop));
        figures.to_stream = latency(&RefCell::new(watched.stream.values().copied().collect()));
        let first_cross = seen.first_cross.borrow();
        let receiving = watched
            .stream
            .iter()
            .filter_map(|(seq, at)| first_cross.get(seq).map(|f| f.saturating_sub(*at)))
            .collect();
        figures.receiving = latency(&RefCell::new(receiving));
    }
    let span = (seen.last_recv_ns.get() - seen.first_send_ns.get()) as f64 / 1e9;
    figures.fixed_rate_deliveries = seen.delivered.get() as f64 / span;

    // Full speed: `in_flight` POSTs at a time, round-robin over the nodes.
    seen.begin(2, o.clients);
    let next = Rc::new(Cell::new(0u32));
    let burst = o.burst as u32;
    let room = o.room;
    let senders = (0..o.in_flight).map(|_| {
        let (next, http) = (next.clone(), http.clone());
        let addrs: Vec<SocketAddr> = procs.iter().map(|p| p.addr).collect();
        async move {
            loop {
                let seq = next.get();
                if seq >= burst {
                    return true;
                }
                next.set(seq + 1);
                let origin = seq as usize % addrs.len();
                if !post(
                    &http,
                    addrs[origin],
                    payload(origin, 2, seq, unix_nanos()),
                    room,
                )
                .await
                {
                    return false;
                }
            }
        }
    });
    if !futures::future::join_all(senders)
        .await
        .into_iter()
        .all(|b| b)
    {
        return Err("a full-speed broadcast was refused".into());
    }
    let expect = u64::from(burst) * o.clients as u64;
    wait_until("every full-speed delivery", DRAIN_TIMEOUT, || {
        seen.delivered.get() >= expect
    })
    .await
    .map_err(|e| format!("{e} ({} of {expect})", seen.delivered.get()))?;
    *ok &= check_exactly_once(&seen, burst, "full speed");
    let span = (seen.last_recv_ns.get() - seen.first_send_ns.get()) as f64 / 1e9;
    figures.full_speed_deliveries = seen.delivered.get() as f64 / span;

    for t in tasks {
        t.abort();
    }
    drop(procs);
    Ok(figures)
}

/// One row's figures from one run.
type Pick<'a> = &'a dyn Fn(&Figures) -> Vec<f64>;

/// Medians over the runs, one row each.
struct Table<'a> {
    one: &'a [Figures],
    three: &'a [Figures],
}

impl Table<'_> {
    fn cell(runs: &[Figures], f: &dyn Fn(&Figures) -> Vec<f64>) -> String {
        if runs.is_empty() {
            return "-".into();
        }
        let width = f(&runs[0]).len();
        let cells: Vec<f64> = (0..width)
            .map(|i| median(runs.iter().map(|r| f(r)[i])))
            .collect();
        if cells.iter().all(|c| c.is_nan()) {
            return "-".into();
        }
        cells
            .iter()
            .map(|c| format!("{c:.2}"))
            .collect::<Vec<_>>()
            .join(" / ")
    }

    fn row(&self, label: &str, one: Option<Pick<'_>>, three: &dyn Fn(&Figures) -> Vec<f64>) {
        let left = one.map_or_else(|| "-".to_owned(), |f| Self::cell(self.one, f));
        println!(
            "{label:<44} {left:>22} {:>24}",
            Self::cell(self.three, three)
        );
    }
}

fn lat(l: &Latency) -> Vec<f64> {
    if l.n == 0 {
        return vec![f64::NAN; 3];
    }
    vec![l.p50, l.p99, l.max]
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve") {
        let redis = args.get(2).map_or("none", String::as_str);
        let prefix = args.get(3).map_or("bench", String::as_str);
        let history = args.get(4).map(String::as_str) != Some("history-off");
        let workers = args.get(5).and_then(|w| w.parse().ok()).unwrap_or(2);
        return serve(redis, prefix, history, workers);
    }
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("cluster_bench: {e}");
            return ExitCode::from(2);
        }
    };
    let own_redis = o.redis.is_none().then(RedisServer::start);
    let redis_url = o
        .redis
        .clone()
        .or_else(|| own_redis.as_ref().map(RedisServer::url))
        .unwrap_or_default();
    let redis_pid = own_redis.as_ref().and_then(RedisServer::pid);
    let mut ok = true;
    let mut one = Vec::new();
    let mut three = Vec::new();
    let result = actix_web::rt::System::new().block_on(async {
        for run in 0..o.runs {
            // Alternating, so that whatever else the machine does weighs on
            // both alike.
            let linked = Some((&redis_url[..], redis_pid));
            if o.compare_history {
                one.push(run_topology(&o, 3, linked, false, &mut ok).await?);
            } else {
                one.push(run_topology(&o, 1, None, true, &mut ok).await?);
            }
            three.push(run_topology(&o, 3, linked, true, &mut ok).await?);
            eprintln!(
                "run {}: cross-node p99 {:.2} ms, local p99 {:.2} ms; {} p99 {:.2} ms",
                run + 1,
                three[run].cross.p99,
                three[run].local.p99,
                if o.compare_history {
                    "history off: cross-node"
                } else {
                    "one node"
                },
                if o.compare_history {
                    one[run].cross.p99
                } else {
                    one[run].local.p99
                },
            );
        }
        Ok::<_, String>(())
    });
    if let Err(e) = result {
        println!("!! {e}");
        return ExitCode::FAILURE;
    }
    println!(
        "cluster_bench: {} clients{}; {} broadcasts/s for {} s, then {} at full speed ({} in flight); medians of {} runs; load {}",
        o.clients,
        if o.room { " in one room" } else { "" },
        o.rate,
        o.seconds,
        o.burst,
        o.in_flight,
        o.runs,
        proc_stats::load_average()
    );
    let t = Table {
        one: &one,
        three: &three,
    };
    let (left, right) = if o.compare_history {
        ("3 nodes, history off", "3 nodes, history on")
    } else {
        ("one node", "three nodes + Redis")
    };
    println!("{:<44} {left:>22} {right:>24}", "");
    // Comparing two clusters, every row has both columns.
    let both = o.compare_history;
    let cross: Pick<'_> = &|f| lat(&f.cross);
    t.row("cross-node p50/p99/max ms", both.then_some(cross), cross);
    t.row(
        "local p50/p99/max ms (one node: alone)",
        Some(&|f| lat(&f.local)),
        &|f| lat(&f.local),
    );
    let gap: Pick<'_> = &|f| vec![f.cross.p50 - f.local.p50, f.cross.p99 - f.local.p99];
    t.row("cross − local p50/p99 ms", both.then_some(gap), gap);
    t.row(
        "first receipt, local p50/p99/max ms",
        Some(&|f| lat(&f.first_local)),
        &|f| lat(&f.first_local),
    );
    let first_cross: Pick<'_> = &|f| lat(&f.first_cross);
    t.row(
        "first receipt, cross p50/p99/max ms",
        both.then_some(first_cross),
        first_cross,
    );
    let to_stream: Pick<'_> = &|f| lat(&f.to_stream);
    t.row(
        "  POST → XREAD (observer) p50/p99/max ms",
        both.then_some(to_stream),
        to_stream,
    );
    let hop: Pick<'_> = &|f| lat(&f.redis_hop);
    t.row(
        "  Redis hop XADD → XREAD p50/p99/max ms",
        both.then_some(hop),
        hop,
    );
    let receiving: Pick<'_> = &|f| lat(&f.receiving);
    t.row(
        "  receiving node p50/p99/max ms",
        both.then_some(receiving),
        receiving,
    );
    t.row(
        "fixed rate: deliveries/s",
        Some(&|f| vec![f.fixed_rate_deliveries]),
        &|f| vec![f.fixed_rate_deliveries],
    );
    t.row(
        "full speed: deliveries/s",
        Some(&|f| vec![f.full_speed_deliveries]),
        &|f| vec![f.full_speed_deliveries],
    );
    t.row(
        "CPU µs/delivery: nodes / loadgen / redis",
        Some(&|f| f.cpu_us.to_vec()),
        &|f| f.cpu_us.to_vec(),
    );
    let cross_p99 = median(three.iter().map(|f| f.cross.p99));
    let ratio = median(three.iter().map(|f| f.full_speed_deliveries))
        / median(one.iter().map(|f| f.full_speed_deliveries));
    let per_run: Vec<String> = three
        .iter()
        .map(|f| format!("{:.2}", f.cross.p99))
        .collect();
    println!("cross-node p99 per run ms: {}", per_run.join(", "));
    let p99_ok = cross_p99 <= 5.0;
    let ratio_ok = ratio >= 0.8;
    println!(
        "targets: cross-node p99 {:.2} ms <= 5 ms: {}; {} throughput {:.2} >= 0.80: {}",
        cross_p99,
        if p99_ok { "met" } else { "MISSED" },
        if o.compare_history {
            "history on / history off"
        } else {
            "three nodes / one node"
        },
        ratio,
        if ratio_ok { "met" } else { "MISSED" }
    );
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
