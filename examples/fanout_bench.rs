//! Run with: cargo run --release --example fanout_bench [-- --clients 100,1000,5000]
//!
//! Measures WebSocket fan-out of 64-byte text broadcasts to N clients, for
//! happynet and, in the same run, for its peers: a naive actix hub written
//! the way the actix chat example is (a `HashMap` of `Recipient`s, one fresh
//! `String` per session per broadcast, `do_send` into unbounded mailboxes),
//! and, when they are installed (`cd examples/peers && npm ci`), Bun's
//! `Bun.serve` (uWebSockets, `server.publish` to one topic) and Node's `ws`
//! (`client.send` per client), see `examples/peers/`. A peer that is not
//! installed is skipped with a note saying how to install it; `--servers`
//! picks which run. For each N it prints every server's figures side by
//! side, the ratios happynet / each peer, and the targets happynet is held
//! to (against the naive hub):
//!
//! - **connect**: time until all N clients have completed the handshake and
//!   received their first frame (the `welcome`, sent once the hub has
//!   registered them);
//! - **server RSS per idle connection**: the server's VmRSS with N idle
//!   clients minus its VmRSS before they connected, divided by N; and again
//!   after churn (all N disconnect, the server drains, N new ones connect);
//! - **fixed rate**: `--rate` (50) broadcasts/s for `--seconds` (5):
//!   deliveries/s, delivery latency p50/p99/max, server CPU per delivery;
//! - **full speed**: `--burst` (200) broadcasts sent as fast as the hub takes
//!   them: deliveries/s, latency, and server CPU per delivery (the server
//!   process's CPU time over the run divided by the deliveries).
//!
//! How to read it: each server runs in a child process (this same binary,
//! re-executed with `--serve happynet|naive`, or the peer's runtime, `bun`
//! or `node`, on its script), so /proc figures are the server's alone, all
//! its threads included; both Rust children use the same allocator
//! (jemalloc unless built otherwise, see `testkit::alloc`; the header names
//! it), 2 workers and the same `HttpServer` settings, while Bun and Node run
//! their JavaScript, and so every client, on one thread (an event loop;
//! their other threads are the runtime's helpers). Latency is receipt time at the client minus the
//! send time stamped into the payload (both read `SystemTime` on the same
//! machine); it includes the time the load generator takes to get round to
//! reading a socket. Ratios below 1 are better for times, memory and CPU,
//! above 1 for deliveries/s. Every client must receive every broadcast
//! exactly once and in order; anything else is reported in a line starting
//! with `!!` and the program exits with status 1. `--repeat K` runs
//! everything K times (fresh servers each time, alternating which server
//! goes first) and prints medians. Run `--help` for all options.
//!
//! `--history` measures what room history costs instead: the same happynet
//! server twice, `history` (`websocket.history` on, the default) against
//! `no-history` (off), both broadcasting to the clients' room (`lobby`), so
//! the one difference is stamping, keeping and the stamped frame (the
//! clients are protocol clients: they receive
//! `{"type":"message",…,"offset":…,"data":"<payload>"}`). The `naive`
//! column holds `no-history` then, and the ratio is history / no history.
//!
//! Under each table, one line per server and phase says where the time went:
//! the server's CPU by thread (the hub runs on the main thread, named
//! `fanout_bench`; workers and the broadcast driver are `actix-rt|system`),
//! how long its threads were runnable but **waiting for a CPU**, and the
//! same for the load generator. On a 2-core machine a large wait means other
//! load is competing and the latency figures describe the machine, not the
//! server.
//!
//! `--syscalls` counts each server's system calls over the fixed-rate and
//! the full-speed phase with `perf stat` on the syscall tracepoints
//! (`testkit::bench::syscalls`) and prints them per delivery: writes,
//! `epoll_wait`s, `futex`es. perf adds a little to every syscall, so use that
//! run for the counts, not the times.
//!
//! `--baseline PATH` measures another build of this program's happynet
//! server beside this one's, as the column `base`, in the same run and
//! alternating with it: build the commit to compare with in a worktree of
//! its own (its own `CARGO_TARGET_DIR`) and pass its `fanout_bench`.
//!
//! Choices worth knowing:
//! - CPU per delivery comes from `/proc/<pid>/task/*/schedstat` (nanoseconds);
//!   `utime+stime` from `/proc/<pid>/stat` is shown too, but its 10 ms tick
//!   is too coarse for short runs.
//! - Every server sets `TCP_NODELAY` (happynet does it in `on_connect`; the
//!   naive one through `HttpServer`; Node's http server and uWebSockets by
//!   default), so Nagle's algorithm is not compared.
//! - The broadcast driver runs on its own arbiter and waits for a round trip
//!   through the hub every 16 broadcasts: full speed is what the hub accepts,
//!   not how fast a mailbox can grow. The JavaScript peers' driver yields to
//!   the event loop every 16 broadcasts instead, so sockets get written.
//! - Clients connect with at most `--concurrency` handshakes in flight, so
//!   the listen backlog (capped by `net.core.somaxconn`) never overflows into
//!   one-second SYN retries.
//! - jemalloc keeps freed pages for about 10 s, so RSS "after churn" includes
//!   memory the allocator retained from the first generation; run with
//!   `_RJEM_MALLOC_CONF=dirty_decay_ms:0,muzzy_decay_ms:0` to see only what is
//!   live, and `--churn K` to see whether it keeps growing.
//!
//! Layout: this file is the command line, the server child (happynet and
//! the control routes) and the orchestration and report; the `testkit`
//! crate's `bench` module holds the naive baseline (`naive_hub`), the load
//! generator's clients (`load_clients`) on a minimal WebSocket client
//! (`testkit::ws`), the payload format (`payload`), a fixed-size latency
//! histogram (`histogram`), the `/proc` readers (`proc_stats`), where the
//! JavaScript peers are (`peers`) and the syscall counter (`syscalls`).

use actix::prelude::*;
use actix_web::{web, App, HttpResponse, HttpServer};
use happynet::actors::GetHubStats;
use serde::Deserialize;
use serde_json::json;
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, ExitCode};
use std::rc::Rc;
use std::time::{Duration, Instant};

use testkit::bench::child::{http_request, number, ServerChild};
use testkit::bench::load_clients::{ClientPool, Shared};
use testkit::bench::median;
use testkit::bench::naive_hub as naive;
use testkit::bench::payload::{bench_payload, unix_nanos, PAYLOAD_BYTES, RUN_MODULUS};
use testkit::bench::peers::{Peer, PeerCommand};
use testkit::bench::proc_stats::{self, CpuTime};
use testkit::bench::syscalls::{self, SyscallCount, SyscallFigures};

// Both Rust servers, and the load generator, use one allocator, so the
// comparison is fair: jemalloc unless built with
// `--features testkit/alloc-system` or `testkit/alloc-mimalloc`
// (`testkit::alloc`); the header names it.
#[global_allocator]
static GLOBAL: testkit::alloc::Chosen = testkit::alloc::CHOSEN;

/// The happynet server's configuration.
const HAPPYNET_CONFIG: &str = r#"{"network":{"websocket":{"max_connections":20000,"presence_interval":0,"heartbeat_interval":30}}}"#;
/// Worker threads in each server.
const WORKERS: usize = 2;
/// The listen backlog asked for (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: u32 = 8192;
/// actix-web's per-worker connection limit.
const MAX_CONNECTIONS_PER_WORKER: usize = 25_000;
/// The control routes both servers add.
const RUN_PATH: &str = "/bench/run";
const STATS_PATH: &str = "/bench/stats";
/// The broadcast driver awaits a round trip through the hub after every this
/// many broadcasts, so at most two windows are ever queued at the hub: "as
/// fast as the server accepts", not "as fast as a mailbox grows".
const FENCE_EVERY: u32 = 16;
/// The most broadcasts one `/bench/run` may ask for.
const MAX_RUN_COUNT: u32 = 10_000_000;

/// How long a child has to print its port.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(15);
/// One control request (`/bench/run`, `/bench/stats`).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// The server closing every session after the clients went away.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause before reading RSS, so in-flight work (handshakes, closes) settles.
const SETTLE: Duration = Duration::from_millis(500);
/// How often the orchestrator looks at the counters.
const POLL: Duration = Duration::from_millis(2);
/// A traffic phase ends early if nothing arrives for this long after the
/// last broadcast was due.
const STALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a traffic phase may take: this much, plus its sending time
/// at `--rate`, plus its deliveries at [`DELIVERY_FLOOR`] per second, so
/// that a large `--clients` × `--burst` is not cut short by a fixed limit.
const PHASE_TIMEOUT: Duration = Duration::from_secs(60);
/// The slowest delivery rate the phase budget allows for (deliveries/s);
/// the slowest server measured, Node's ws, does about 30,000 on a busy
/// two-core machine.
const DELIVERY_FLOOR: u64 = 20_000;
/// Where the JavaScript peers and their `node_modules` are.
const PEERS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/peers");
/// Clients connected and closed before the baseline RSS is read, so that
/// one-off allocations (thread caches, first arenas) are not charged to the
/// N clients measured.
const WARMUP_CLIENTS: usize = 8;
/// File descriptors each process needs besides its connections.
const FD_HEADROOM: u64 = 200;

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("--serve") {
        return match argv.get(1).and_then(|k| ServerKind::parse(k)) {
            Some(kind) if kind.peer().is_none() => serve(kind),
            _ => {
                eprintln!("fanout_bench: --serve needs happynet or naive");
                ExitCode::FAILURE
            }
        };
    }
    let args = match Args::parse(&argv) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{}", Args::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("fanout_bench: {e}\n\n{}", Args::USAGE);
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fanout_bench: cannot start the load generator's runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // One thread for the whole load generator: it takes the least CPU from
    // the server on a small machine, and lets the clients share counters
    // through `Rc`/`Cell` with no synchronisation.
    tokio::task::LocalSet::new().block_on(&runtime, bench(args))
}

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

/// Which server a child runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerKind {
    Happynet,
    Naive,
    /// A JavaScript peer in `examples/peers/`.
    Peer(Peer),
    /// `--history`: room broadcasts, history on.
    RoomHistory,
    /// `--history`: room broadcasts, history off.
    RoomNoHistory,
    /// `--baseline PATH`: happynet as another build of this benchmark serves
    /// it (`PATH --serve happynet`), e.g. the commit a change is measured
    /// against, in the same run and alternating with this build's.
    Baseline,
}

impl ServerKind {
    /// Every server, in the order the report shows them.
    const ALL: [ServerKind; 4] = [
        ServerKind::Happynet,
        ServerKind::Naive,
        ServerKind::Peer(Peer::Bun),
        ServerKind::Peer(Peer::Node),
    ];

    fn name(self) -> &'static str {
        match self {
            ServerKind::Happynet => "happynet",
            ServerKind::Naive => "naive",
            ServerKind::Peer(peer) => peer.name(),
            ServerKind::RoomHistory => "history",
            ServerKind::RoomNoHistory => "no-history",
            ServerKind::Baseline => "base",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .chain([ServerKind::RoomHistory, ServerKind::RoomNoHistory])
            .find(|k| k.name() == s)
    }

    fn peer(self) -> Option<Peer> {
        match self {
            ServerKind::Peer(peer) => Some(peer),
            _ => None,
        }
    }

    /// File descriptors the server holds per connection: happynet keeps a
    /// duplicate of every accepted socket (so the hub can shut down a
    /// connection whose session is frozen); the others hold just the socket.
    fn fds_per_connection(self) -> u64 {
        match self {
            ServerKind::Happynet | ServerKind::Baseline => 2,
            _ => 1,
        }
    }
}

/// The benchmark's options.
#[derive(Debug, Clone)]
struct Args {
    clients: Vec<usize>,
    seconds: u32,
    rate: u32,
    burst: u32,
    repeat: usize,
    churn: usize,
    concurrency: usize,
    servers: Vec<ServerKind>,
    syscalls: bool,
    history: bool,
    /// `--baseline`: the other build's binary.
    baseline: Option<std::path::PathBuf>,
}

impl Args {
    const USAGE: &'static str = "\
usage: fanout_bench [--clients 100,1000,5000] [--seconds 5] [--rate 50] [--burst 200]
                    [--repeat 1] [--churn 1] [--concurrency 256]
                    [--servers happynet,naive,bun,node] [--syscalls] [--history]
                    [--baseline PATH]

  --clients      client counts to measure, comma-separated
  --seconds      length of the fixed-rate phase
  --rate         broadcasts per second in the fixed-rate phase
  --burst        broadcasts in the full-speed phase
  --repeat       runs per client count (fresh servers each); medians are printed
  --churn        disconnect/reconnect cycles before the after-churn RSS is read
                 (more than one tells a one-off high-water mark from a leak)
  --concurrency  handshakes the load generator keeps in flight while connecting
  --servers      which servers to measure (ratios are against happynet; bun and node
                 need `cd examples/peers && npm ci` and are skipped with a note without)
  --syscalls     count each server's syscalls over the fixed-rate and the full-speed
                 phase with `perf stat` (apt-get install linux-perf) and print them
                 per delivery
  --history      measure history on against off (room broadcasts, happynet only) instead
  --baseline     another build of fanout_bench (e.g. of the commit a change is measured
                 against): its happynet server is measured too, as `base`, beside
                 happynet (which must be among --servers)";

    /// Parses the command line; `Ok(None)` for `--help`.
    fn parse(argv: &[String]) -> Result<Option<Args>, String> {
        let mut args = Args {
            clients: vec![100, 1000, 5000],
            seconds: 5,
            rate: 50,
            burst: 200,
            repeat: 1,
            churn: 1,
            concurrency: 256,
            servers: ServerKind::ALL.to_vec(),
            syscalls: false,
            history: false,
            baseline: None,
        };
        let mut it = argv.iter();
        while let Some(arg) = it.next() {
            if arg == "--help" || arg == "-h" {
                return Ok(None);
            }
            if arg == "--syscalls" {
                args.syscalls = true;
                continue;
            }
            if arg == "--history" {
                args.history = true;
                args.servers = vec![ServerKind::RoomHistory, ServerKind::RoomNoHistory];
                continue;
            }
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (arg.as_str(), None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .ok_or_else(|| format!("{name} needs a value"))
            };
            match name {
                "--clients" => {
                    args.clients = value()?
                        .split(',')
                        .map(|n| number(name, n.trim(), 1, 20_000))
                        .collect::<Result<_, _>>()?
                }
                "--seconds" => args.seconds = number(name, &value()?, 1, 600)?,
                "--rate" => args.rate = number(name, &value()?, 1, 10_000)?,
                "--burst" => args.burst = number(name, &value()?, 1, 1_000_000)?,
                "--repeat" => args.repeat = number(name, &value()?, 1, 50)?,
                "--churn" => args.churn = number(name, &value()?, 1, 50)?,
                "--concurrency" => args.concurrency = number(name, &value()?, 1, 20_000)?,
                "--baseline" => args.baseline = Some(value()?.into()),
                "--servers" => {
                    args.servers = value()?
                        .split(',')
                        .map(|s| {
                            ServerKind::parse(s.trim())
                                .ok_or_else(|| format!("--servers: unknown server `{s}`"))
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    if (1..args.servers.len()).any(|i| args.servers[..i].contains(&args.servers[i]))
                    {
                        return Err("--servers: a server is named twice".into());
                    }
                }
                other => return Err(format!("unknown option `{other}`")),
            }
        }
        if args.clients.is_empty() || args.servers.is_empty() {
            return Err("--clients and --servers must not be empty".into());
        }
        if let Some(path) = &args.baseline {
            let Some(at) = args.servers.iter().position(|&k| k == ServerKind::Happynet) else {
                return Err("--baseline needs happynet among --servers".into());
            };
            if !path.is_file() {
                return Err(format!("--baseline: no such file {}", path.display()));
            }
            args.servers.insert(at + 1, ServerKind::Baseline);
        }
        Ok(Some(args))
    }

    /// Broadcasts in the fixed-rate phase.
    fn fixed_count(&self) -> u32 {
        self.rate.saturating_mul(self.seconds).min(MAX_RUN_COUNT)
    }
}

// ---------------------------------------------------------------------------
// The server child
// ---------------------------------------------------------------------------

/// Where the broadcast driver sends, in either server.
#[derive(Clone)]
enum Sink {
    Happynet(Addr<happynet::BroadcastHub>),
    Naive(Addr<naive::NaiveHub>),
    /// `--history`: to the clients' room.
    Room(Addr<happynet::BroadcastHub>, happynet::RoomName),
}

impl Sink {
    /// Queues one broadcast. `do_send` is bounded here by design: the driver
    /// waits on a fence every `FENCE_EVERY` broadcasts.
    fn broadcast(&self, payload: String) {
        match self {
            Sink::Happynet(hub) => hub.do_send(happynet::Broadcast::text(payload)),
            Sink::Naive(hub) => hub.do_send(naive::NaiveBroadcast(payload)),
            Sink::Room(hub, room) => {
                hub.do_send(happynet::Broadcast::to_room(room.clone(), payload))
            }
        }
    }

    /// Queues a no-op request behind everything sent so far, now; the future
    /// resolves once the hub has handled it (and so everything before it).
    fn fence(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        match self {
            Sink::Happynet(hub) | Sink::Room(hub, _) => {
                // A broadcast to a session that cannot exist (ids count up
                // from 1): the cheapest round trip through the hub. GetHubStats
                // would walk every session and charge that to happynet.
                let request = hub.send(happynet::Broadcast::to_session(u64::MAX, ""));
                Box::pin(async move {
                    let _ = request.await;
                })
            }
            Sink::Naive(hub) => {
                let request = hub.send(naive::NaiveCount);
                Box::pin(async move {
                    let _ = request.await;
                })
            }
        }
    }
}

/// What the control routes need.
struct BenchControl {
    sink: Sink,
    /// A thread of its own for the broadcast driver, so that a worker busy
    /// writing frames does not delay the next broadcast.
    driver: ArbiterHandle,
}

/// Sends `count` broadcasts of run `run`, `rate` per second (0: as fast as
/// the hub takes them).
async fn drive(sink: Sink, run: u32, count: u32, rate: f64) {
    let start = tokio::time::Instant::now();
    let mut pending = None;
    for seq in 0..count {
        if rate > 0.0 {
            let due = start + Duration::from_secs_f64(f64::from(seq) / rate);
            tokio::time::sleep_until(due).await;
        }
        sink.broadcast(bench_payload(run, seq, unix_nanos()));
        if (seq + 1) % FENCE_EVERY == 0 {
            if let Some(previous) = pending.replace(sink.fence()) {
                previous.await;
            }
        }
    }
    if let Some(previous) = pending {
        previous.await;
    }
}

#[derive(Deserialize)]
struct RunQuery {
    run: u32,
    count: u32,
    rate: f64,
}

/// `POST /bench/run?run=R&count=M&rate=F`: starts a broadcast driver and
/// answers 202 at once.
async fn run_route(query: web::Query<RunQuery>, control: web::Data<BenchControl>) -> HttpResponse {
    let q = query.into_inner();
    if q.count > MAX_RUN_COUNT || !q.rate.is_finite() || q.rate < 0.0 {
        return HttpResponse::BadRequest().body("count or rate out of range");
    }
    let started = control
        .driver
        .spawn(drive(control.sink.clone(), q.run, q.count, q.rate));
    if started {
        HttpResponse::Accepted().finish()
    } else {
        HttpResponse::ServiceUnavailable().body("the driver thread is gone")
    }
}

/// `GET /bench/stats` for happynet.
async fn happynet_stats_route(net: web::Data<happynet::Network>) -> HttpResponse {
    let open = net.open_connections();
    match net.hub().send(GetHubStats).await {
        Ok(s) => HttpResponse::Ok().json(json!({
            "open": open,
            "sessions": s.sessions,
            "evicted_slow_consumer": s.evicted_slow_consumer,
            "evicted_heartbeat": s.evicted_heartbeat,
        })),
        Err(e) => HttpResponse::ServiceUnavailable().body(e.to_string()),
    }
}

/// `GET /bench/stats` for the naive server.
async fn naive_stats_route(hub: web::Data<Addr<naive::NaiveHub>>) -> HttpResponse {
    match hub.send(naive::NaiveCount).await {
        Ok(n) => HttpResponse::Ok().json(json!({
            "open": n,
            "sessions": n,
            "evicted_slow_consumer": 0,
            "evicted_heartbeat": 0,
        })),
        Err(e) => HttpResponse::ServiceUnavailable().body(e.to_string()),
    }
}

/// Runs a server until stdin closes (the parent exited or dropped its
/// guard) or it is killed.
fn serve(kind: ServerKind) -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
    let result = actix_web::rt::System::new().block_on(async move {
        let driver = Arbiter::new();
        let result = match kind {
            ServerKind::Happynet => serve_happynet(driver.handle(), None).await,
            ServerKind::Naive => serve_naive(driver.handle()).await,
            // main() does not get here: peers are their runtimes' programs.
            ServerKind::Peer(peer) => Err(format!("{} is not served by this binary", peer.name())),
            ServerKind::RoomHistory => serve_happynet(driver.handle(), Some(true)).await,
            ServerKind::RoomNoHistory => serve_happynet(driver.handle(), Some(false)).await,
            ServerKind::Baseline => Err("base is served by the --baseline binary".into()),
        };
        driver.stop();
        result
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fanout_bench --serve {}: {e}", kind.name());
            ExitCode::FAILURE
        }
    }
}

/// Tells the parent the port: one line on stdout.
fn announce(addrs: &[SocketAddr]) -> Result<(), String> {
    let port = addrs.first().ok_or("bound to no address")?.port();
    let mut out = std::io::stdout().lock();
    writeln!(out, "{port}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("cannot announce the port: {e}"))
}

/// `history`: `None` broadcasts to everyone (the default comparison);
/// `Some(on)` to the clients' room, with `websocket.history` on or off.
async fn serve_happynet(driver: ArbiterHandle, history: Option<bool>) -> Result<(), String> {
    let mut config = happynet::Config::from_json_str(HAPPYNET_CONFIG).map_err(|e| e.to_string())?;
    let room = history.map(|on| {
        config.network.websocket.history.enabled = on;
        config.network.websocket.default_room()
    });
    let net = happynet::Network::start(config).map_err(|e| e.to_string())?;
    let sink = match room {
        None => Sink::Happynet(net.hub()),
        Some(room) => Sink::Room(net.hub(), room),
    };
    let control = web::Data::new(BenchControl { sink, driver });
    let routes = net.configure();
    let server = HttpServer::new(move || {
        App::new()
            .configure(routes.clone())
            .app_data(control.clone())
            .route(RUN_PATH, web::post().to(run_route))
            .route(STATS_PATH, web::get().to(happynet_stats_route))
    })
    .on_connect(net.on_connect())
    .workers(WORKERS)
    .backlog(BACKLOG)
    .max_connections(MAX_CONNECTIONS_PER_WORKER)
    // Both servers get TCP_NODELAY (happynet's on_connect sets it too), so
    // Nagle's algorithm is not part of the comparison.
    .tcp_nodelay(true)
    .bind(("127.0.0.1", 0))
    .map_err(|e| format!("bind: {e}"))?;
    announce(&server.addrs())?;
    server.run().await.map_err(|e| e.to_string())
}

async fn serve_naive(driver: ArbiterHandle) -> Result<(), String> {
    let hub = naive::NaiveHub::default().start();
    let control = web::Data::new(BenchControl {
        sink: Sink::Naive(hub.clone()),
        driver,
    });
    let hub = web::Data::new(hub);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(hub.clone())
            .app_data(control.clone())
            .route("/ws", web::get().to(naive::ws_route))
            .route(RUN_PATH, web::post().to(run_route))
            .route(STATS_PATH, web::get().to(naive_stats_route))
    })
    .workers(WORKERS)
    .backlog(BACKLOG)
    .max_connections(MAX_CONNECTIONS_PER_WORKER)
    .tcp_nodelay(true)
    .bind(("127.0.0.1", 0))
    .map_err(|e| format!("bind: {e}"))?;
    announce(&server.addrs())?;
    server.run().await.map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------
// The parent: server processes and control requests
// ---------------------------------------------------------------------------

/// Starts `kind` as a child (`testkit::bench::child`): this binary with
/// `--serve`, or the peer's runtime on its script (`peer`, which the caller
/// located).
fn spawn_server(
    kind: ServerKind,
    peer: Option<&PeerCommand>,
    baseline: Option<&std::path::Path>,
) -> Result<ServerChild, String> {
    let command = match (peer, kind, baseline) {
        (Some(peer), _, _) => peer.command(),
        (None, ServerKind::Baseline, Some(exe)) => {
            let mut command = Command::new(exe);
            command.args(["--serve", ServerKind::Happynet.name()]);
            command
        }
        (None, ..) => {
            let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
            let mut command = Command::new(exe);
            command.args(["--serve", kind.name()]);
            command
        }
    };
    ServerChild::spawn(command, kind.name(), SERVER_START_TIMEOUT)
}

/// One control request to a server child.
async fn control(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, String), String> {
    http_request(addr, method, path, CONTROL_TIMEOUT).await
}

/// What `/bench/stats` says.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
struct ServerStats {
    open: u64,
    sessions: u64,
    evicted_slow_consumer: u64,
    evicted_heartbeat: u64,
}

async fn server_stats(addr: SocketAddr) -> Result<ServerStats, String> {
    let (status, body) = control(addr, "GET", STATS_PATH).await?;
    if status != 200 {
        return Err(format!("{STATS_PATH}: HTTP {status}: {body}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("{STATS_PATH}: {e}: {body}"))
}

/// Waits until the server holds no session.
async fn wait_drained(addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let stats = server_stats(addr).await?;
        if stats.open == 0 && stats.sessions == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the server still holds {} connections / {} sessions {DRAIN_TIMEOUT:?} after the clients left",
                stats.open, stats.sessions
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// Measuring
// ---------------------------------------------------------------------------

/// One traffic phase's figures.
#[derive(Debug, Clone, Default)]
struct Traffic {
    expected: u64,
    delivered: u64,
    anomalies: u64,
    incomplete_clients: usize,
    closed_clients: usize,
    timed_out: bool,
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    cpu_sched_us: f64,
    cpu_stat_us: f64,
    /// From the request to the last delivery (or the timeout).
    wall_ns: u64,
    /// Server CPU over the phase, % of one core.
    server_cpu_pct: f64,
    /// The load generator's CPU over the phase, % of one core.
    client_cpu_pct: f64,
    /// The server's busiest threads: name and CPU nanoseconds.
    server_threads: Vec<(String, u64)>,
    /// Time the server's threads were runnable but had no CPU, % of wall
    /// time (summed over threads): the machine's other load shows here.
    server_wait_pct: f64,
    /// The same for the load generator.
    client_wait_pct: f64,
    /// With `--syscalls`: what perf counted over the phase, or why it
    /// could not.
    syscalls: Option<Result<SyscallFigures, String>>,
}

impl Traffic {
    fn lossless(&self) -> bool {
        self.delivered == self.expected
            && self.anomalies == 0
            && self.incomplete_clients == 0
            && self.closed_clients == 0
            && !self.timed_out
    }
}

/// One server at one N: everything the table shows.
#[derive(Debug, Clone, Default)]
struct Figures {
    connect_ms: f64,
    rss_idle_kib: f64,
    rss_churn_kib: f64,
    /// After each churn cycle (`--churn`), KiB per connection.
    rss_churn_cycles_kib: Vec<f64>,
    fixed: Traffic,
    full: Traffic,
    peak_rss_mib: f64,
    evicted: u64,
}

/// What the orchestrator needs to run a phase.
struct Bench<'a> {
    args: &'a Args,
    ticks_per_sec: u64,
    next_run: Cell<u32>,
    /// The installed peers, located once at start.
    peers: Vec<(Peer, PeerCommand)>,
}

impl Bench<'_> {
    fn cpu(&self, pid: u32) -> Result<CpuTime, String> {
        proc_stats::cpu_time(pid, self.ticks_per_sec).map_err(|e| format!("server CPU time: {e}"))
    }

    /// Sends `count` broadcasts at `rate` (0: full speed) to the connected
    /// clients and waits until all have them, or the phase times out. With
    /// `count_syscalls`, perf counts the server's syscalls over the phase.
    async fn traffic(
        &self,
        server: &ServerChild,
        shared: &Shared,
        count: u32,
        rate: u32,
        count_syscalls: bool,
    ) -> Result<Traffic, String> {
        let run = self.next_run.get();
        self.next_run.set(run.wrapping_add(1));
        let live = shared.ready.get() - shared.closed.get();
        let closed_before = shared.closed.get();
        shared.begin_run(run, count);
        let sending_for = if rate == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(f64::from(count) / f64::from(rate))
        };
        // A server slower than the rate (Node's ws at 5,000 clients on two
        // cores) gets the same allowance per delivery as at full speed, so
        // that its phase ends late rather than cut short.
        let deliveries = live as u64 * u64::from(count);
        let budget = sending_for + PHASE_TIMEOUT + Duration::from_secs(deliveries / DELIVERY_FLOOR);

        let perf_output = std::env::temp_dir().join(format!(
            "fanout_bench-syscalls-{}-{run}.csv",
            std::process::id()
        ));
        let counter = if count_syscalls {
            let counter = SyscallCount::attach(server.pid(), &perf_output);
            if counter.is_ok() {
                tokio::time::sleep(syscalls::ATTACH_SETTLE).await;
            }
            Some(counter)
        } else {
            None
        };
        let cpu_before = self.cpu(server.pid())?;
        let threads_before = proc_stats::thread_cpu(server.pid());
        let client_before = self.cpu(std::process::id())?;
        let client_threads_before = proc_stats::thread_cpu(std::process::id());
        let start = Instant::now();
        let path = format!(
            "{RUN_PATH}?run={}&count={count}&rate={rate}",
            run % RUN_MODULUS
        );
        let (status, body) = control(server.addr(), "POST", &path).await?;
        if status != 202 {
            return Err(format!("{RUN_PATH}: HTTP {status}: {body}"));
        }
        let mut progress = (0u64, Instant::now());
        let timed_out = loop {
            let closed = shared.closed.get() - closed_before;
            if shared.complete.get() + closed >= live {
                break false;
            }
            let now = Instant::now();
            if now.duration_since(start) > budget {
                break true;
            }
            let delivered = shared.delivered.get();
            if delivered != progress.0 {
                progress = (delivered, now);
            } else if now.duration_since(progress.1) > STALL_TIMEOUT
                && now.duration_since(start) > sending_for + STALL_TIMEOUT
            {
                break true;
            }
            tokio::time::sleep(POLL).await;
        };
        let cpu_after = self.cpu(server.pid())?;
        let client_after = self.cpu(std::process::id())?;
        let wall_ns = start.elapsed().as_nanos() as u64;
        let syscalls = counter.map(|counter| counter.and_then(SyscallCount::finish));
        let _ = std::fs::remove_file(&perf_output);
        let threads_after = proc_stats::thread_cpu(server.pid());
        let server_threads = proc_stats::thread_cpu_delta(&threads_before, &threads_after, wall_ns);
        let wait_pct = |ns: u64| ns as f64 * 100.0 / wall_ns.max(1) as f64;
        let server_wait_pct = wait_pct(proc_stats::wait_delta(&threads_before, &threads_after));
        let client_wait_pct = wait_pct(proc_stats::wait_delta(
            &client_threads_before,
            &proc_stats::thread_cpu(std::process::id()),
        ));
        let pct = |before: CpuTime, after: CpuTime| {
            let ns = match (before.sched_ns, after.sched_ns) {
                (Some(b), Some(a)) => a.saturating_sub(b),
                _ => after.stat_ns.saturating_sub(before.stat_ns),
            };
            ns as f64 * 100.0 / wall_ns.max(1) as f64
        };

        let delivered = shared.delivered.get();
        let span_ns = shared
            .last_recv_ns
            .get()
            .saturating_sub(shared.first_send_ns.get());
        let per_delivery_us = |before: u64, after: u64| {
            if delivered == 0 {
                f64::NAN
            } else {
                after.saturating_sub(before) as f64 / delivered as f64 / 1_000.0
            }
        };
        let latency = shared.latency.borrow();
        Ok(Traffic {
            expected: live as u64 * u64::from(count),
            delivered,
            anomalies: shared.anomalies.get(),
            incomplete_clients: shared.incomplete_clients(run, count),
            closed_clients: shared.closed.get() - closed_before,
            timed_out,
            per_sec: if span_ns == 0 {
                f64::NAN
            } else {
                delivered as f64 * 1e9 / span_ns as f64
            },
            p50_ms: latency.quantile_ms(0.50),
            p99_ms: latency.quantile_ms(0.99),
            max_ms: latency.max_ms(),
            cpu_sched_us: match (cpu_before.sched_ns, cpu_after.sched_ns) {
                (Some(b), Some(a)) => per_delivery_us(b, a),
                _ => f64::NAN,
            },
            cpu_stat_us: per_delivery_us(cpu_before.stat_ns, cpu_after.stat_ns),
            wall_ns,
            server_cpu_pct: pct(cpu_before, cpu_after),
            client_cpu_pct: pct(client_before, client_after),
            server_threads,
            server_wait_pct,
            client_wait_pct,
            syscalls,
        })
    }

    /// Every figure for one server at `n` clients, from a fresh child.
    async fn measure(&self, kind: ServerKind, n: usize) -> Result<Figures, String> {
        let peer = match kind.peer() {
            Some(peer) => Some(
                self.peers
                    .iter()
                    .find(|(p, _)| *p == peer)
                    .map(|(_, command)| command)
                    .ok_or_else(|| format!("{} is not installed", peer.name()))?,
            ),
            None => None,
        };
        let server = spawn_server(kind, peer, self.args.baseline.as_deref())?;
        let addr = server.addr();
        let rss = |what: &str| {
            proc_stats::rss_kib(server.pid()).map_err(|e| format!("server RSS ({what}): {e}"))
        };
        let shared = Rc::new(Shared::new());
        let mut pool = ClientPool::new(addr, shared.clone(), self.args.concurrency);

        // Baseline: warmed up, no connection open.
        server_stats(addr).await?;
        pool.connect(WARMUP_CLIENTS).await?;
        pool.disconnect_all();
        wait_drained(addr).await?;
        tokio::time::sleep(SETTLE).await;
        let rss_empty = rss("no clients")?;

        // N idle connections.
        let connect_time = pool.connect(n).await?;
        tokio::time::sleep(SETTLE).await;
        let rss_idle = rss("idle clients")?;

        // Churn: all leave, the server drains, N new ones arrive.
        let mut rss_churn = Vec::with_capacity(self.args.churn);
        for _ in 0..self.args.churn {
            pool.disconnect_all();
            wait_drained(addr).await?;
            tokio::time::sleep(SETTLE).await;
            pool.connect(n).await?;
            tokio::time::sleep(SETTLE).await;
            rss_churn.push(rss("after churn")?);
        }

        let fixed = self
            .traffic(
                &server,
                &shared,
                self.args.fixed_count(),
                self.args.rate,
                self.args.syscalls,
            )
            .await?;
        let full = self
            .traffic(&server, &shared, self.args.burst, 0, self.args.syscalls)
            .await?;
        let stats = server_stats(addr).await?;
        let peak =
            proc_stats::peak_rss_kib(server.pid()).map_err(|e| format!("server VmHWM: {e}"))?;

        for (name, t) in [("fixed rate", &fixed), ("full speed", &full)] {
            if !t.lossless() {
                println!(
                    "!! LOSS {} at {n} clients, {name}: delivered {} of {} (anomalies {}, incomplete clients {}, closed {}{}); client errors: {}",
                    kind.name(),
                    t.delivered,
                    t.expected,
                    t.anomalies,
                    t.incomplete_clients,
                    t.closed_clients,
                    if t.timed_out { ", timed out" } else { "" },
                    shared.errors.borrow().join("; ")
                );
            }
        }
        let evicted = stats.evicted_slow_consumer + stats.evicted_heartbeat;
        if evicted > 0 {
            println!(
                "!! {} at {n} clients evicted {} slow consumers and {} silent clients",
                kind.name(),
                stats.evicted_slow_consumer,
                stats.evicted_heartbeat
            );
        }
        let per_conn = |kib: u64| (kib as f64 - rss_empty as f64) / n as f64;
        Ok(Figures {
            connect_ms: connect_time.as_secs_f64() * 1e3,
            rss_idle_kib: per_conn(rss_idle),
            rss_churn_kib: rss_churn.last().map_or(f64::NAN, |&kib| per_conn(kib)),
            rss_churn_cycles_kib: rss_churn.iter().map(|&kib| per_conn(kib)).collect(),
            fixed,
            full,
            peak_rss_mib: peak as f64 / 1024.0,
            evicted,
        })
    }
}

async fn bench(mut args: Args) -> ExitCode {
    println!("fanout_bench: happynet and its peers, {PAYLOAD_BYTES}-byte text broadcasts");
    // Locate the JavaScript peers once; one that is not installed is left
    // out of this run, with a note on how to install it.
    let mut peers = Vec::new();
    args.servers.retain(|&kind| {
        let Some(peer) = kind.peer() else {
            let what = match kind {
                ServerKind::Happynet => "this crate, 2 workers + the hub's thread".to_owned(),
                ServerKind::Baseline => format!(
                    "happynet as served by {}",
                    args.baseline
                        .as_deref()
                        .unwrap_or(std::path::Path::new("?"))
                        .display()
                ),
                ServerKind::RoomHistory => {
                    "happynet, room broadcasts, websocket.history on (stamped frames)".to_owned()
                }
                ServerKind::RoomNoHistory => {
                    "happynet, room broadcasts, websocket.history off".to_owned()
                }
                _ => "actix chat-example style: a String per session per broadcast, do_send"
                    .to_owned(),
            };
            println!("  {:<8} {what}", kind.name());
            return true;
        };
        match peer.locate(std::path::Path::new(PEERS_DIR)) {
            Ok(command) => {
                println!(
                    "  {:<8} {}: {}",
                    peer.name(),
                    command.version,
                    peer.describe()
                );
                peers.push((peer, command));
                true
            }
            Err(e) => {
                println!("  {:<8} skipped: {e}", peer.name());
                false
            }
        }
    });
    if args.servers.is_empty() {
        println!("!! no server to measure");
        return ExitCode::FAILURE;
    }
    let limit = proc_stats::open_files_soft_limit();
    println!(
        "machine: {} CPUs, load average {} at start; open-files soft limit {}; allocator {}",
        proc_stats::cpus(),
        proc_stats::load_average(),
        limit.map_or("unknown".to_owned(), |l| l.to_string()),
        testkit::alloc::NAME
    );
    println!(
        "phases: fixed {}/s for {} s, full speed {} broadcasts; {} run(s) each; {WORKERS} server workers; load generator: 1 thread, {} handshakes in flight",
        args.rate, args.seconds, args.burst, args.repeat, args.concurrency
    );
    if args.syscalls {
        println!(
            "syscalls: counted by perf stat over each fixed-rate and full-speed phase (perf slows every syscall a little: take times from a run without --syscalls)"
        );
    }
    let bench = Bench {
        args: &args,
        ticks_per_sec: proc_stats::clock_ticks_per_sec(),
        next_run: Cell::new(1),
        peers,
    };
    let mut failed = false;
    for &n in &args.clients {
        // Each server holds its connections (happynet twice: it duplicates
        // every accepted socket), the load generator each once; both
        // inherit this process's limit.
        let servers: Vec<ServerKind> = args
            .servers
            .iter()
            .copied()
            .filter(|&kind| {
                let need = kind.fds_per_connection() * n as u64 + FD_HEADROOM;
                let fits = limit.is_none_or(|limit| need <= limit);
                if !fits {
                    println!(
                        "!! open-files soft limit {} is too low for {} at {n} clients (it needs about {need}): skipped; raise it with `ulimit -n {need}`",
                        limit.unwrap_or_default(),
                        kind.name()
                    );
                }
                fits
            })
            .collect();
        if servers.is_empty() {
            continue;
        }
        let mut results: Vec<(ServerKind, Vec<Figures>)> =
            servers.iter().map(|&k| (k, Vec::new())).collect();
        for repeat in 0..args.repeat {
            let mut order: Vec<usize> = (0..results.len()).collect();
            if repeat % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let kind = results[i].0;
                match bench.measure(kind, n).await {
                    Ok(figures) => {
                        failed |= !figures.fixed.lossless()
                            || !figures.full.lossless()
                            || figures.evicted > 0;
                        results[i].1.push(figures);
                    }
                    Err(e) => {
                        println!("!! {} at {n} clients failed: {e}", kind.name());
                        failed = true;
                    }
                }
                tokio::time::sleep(SETTLE).await;
            }
        }
        print_table(n, &args, &results);
    }
    println!("load average at the end: {}", proc_stats::load_average());
    if failed {
        println!("!! some runs lost deliveries, evicted clients or failed: see the lines starting with !!");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

// ---------------------------------------------------------------------------
// Reporting
// ---------------------------------------------------------------------------

/// How a row's happynet figure is judged.
enum Target {
    None,
    /// At most this value.
    AtMost(f64, &'static str),
    /// p99 latency: a goal and a hard limit.
    GoalLimit(f64, f64, &'static str),
    /// happynet / naive at least this.
    RatioAtLeast(f64, &'static str),
    /// happynet / naive at most this.
    RatioAtMost(f64, &'static str),
}

struct Row {
    label: &'static str,
    get: fn(&Figures) -> f64,
    decimals: usize,
    target: Target,
}

fn fmt_value(v: f64, decimals: usize) -> String {
    if v.is_nan() {
        "-".to_owned()
    } else if decimals == 0 {
        // Thousands separators for rates.
        let s = format!("{:.0}", v);
        let (sign, digits) = s.split_at(usize::from(s.starts_with('-')));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else {
        format!("{v:.decimals$}")
    }
}

/// One table for `n` clients: a column per server measured (in
/// `results`' order), then happynet / each other server; the targets are
/// judged on happynet's figure and its ratio to the naive hub.
fn print_table(n: usize, args: &Args, results: &[(ServerKind, Vec<Figures>)]) {
    let pick = |kind: ServerKind| {
        results
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, f)| f.as_slice())
            .unwrap_or_default()
    };
    // The figures are judged on the reference server (happynet, or with
    // `--history` happynet with history on) and its ratio to the baseline
    // (the naive hub, or history off); every other server gets a ratio column.
    let (reference, baseline) = if args.history {
        (ServerKind::RoomHistory, ServerKind::RoomNoHistory)
    } else {
        (ServerKind::Happynet, ServerKind::Naive)
    };
    let happy = pick(reference);
    let naive = pick(baseline);
    let others: Vec<ServerKind> = results
        .iter()
        .map(|(k, _)| *k)
        .filter(|&k| k != reference)
        .collect();
    let runs = results.iter().map(|(_, f)| f.len()).max().unwrap_or(0);
    let rate = args.rate;
    let rows = [
        Row {
            label: "connect all N, ms",
            get: |f| f.connect_ms,
            decimals: 1,
            target: Target::AtMost(1000.0, "< 1000 ms"),
        },
        Row {
            label: "server RSS per idle conn, KiB",
            get: |f| f.rss_idle_kib,
            decimals: 2,
            target: Target::AtMost(12.0, "<= 12 KiB"),
        },
        Row {
            label: "  ... after churn, KiB",
            get: |f| f.rss_churn_kib,
            decimals: 2,
            target: Target::AtMost(12.0, "<= 12 KiB"),
        },
        Row {
            label: "fixed rate: deliveries/s",
            get: |f| f.fixed.per_sec,
            decimals: 0,
            target: Target::None,
        },
        Row {
            label: "fixed rate: latency p50, ms",
            get: |f| f.fixed.p50_ms,
            decimals: 2,
            target: Target::None,
        },
        Row {
            label: "fixed rate: latency p99, ms",
            get: |f| f.fixed.p99_ms,
            decimals: 2,
            target: Target::GoalLimit(20.0, 60.0, "<= 20 goal, never > 60"),
        },
        Row {
            label: "fixed rate: latency max, ms",
            get: |f| f.fixed.max_ms,
            decimals: 2,
            target: Target::None,
        },
        Row {
            label: "fixed rate: server CPU/delivery, us",
            get: |f| f.fixed.cpu_sched_us,
            decimals: 3,
            target: Target::None,
        },
        Row {
            label: "full speed: deliveries/s",
            get: |f| f.full.per_sec,
            decimals: 0,
            target: Target::RatioAtLeast(1.0, ">= naive"),
        },
        Row {
            label: "full speed: latency p50, ms",
            get: |f| f.full.p50_ms,
            decimals: 2,
            target: Target::None,
        },
        Row {
            label: "full speed: latency p99, ms",
            get: |f| f.full.p99_ms,
            decimals: 2,
            target: Target::None,
        },
        Row {
            label: "full speed: server CPU/delivery, us",
            get: |f| f.full.cpu_sched_us,
            decimals: 3,
            target: Target::RatioAtMost(0.5, "<= 0.5 x naive"),
        },
        Row {
            label: "  ... from utime+stime, us",
            get: |f| f.full.cpu_stat_us,
            decimals: 3,
            target: Target::RatioAtMost(0.5, "<= 0.5 x naive"),
        },
        Row {
            label: "server peak RSS, MiB",
            get: |f| f.peak_rss_mib,
            decimals: 1,
            target: Target::None,
        },
    ];
    println!();
    println!(
        "== {n} clients: {PAYLOAD_BYTES}-byte broadcasts, fixed {rate}/s x {} s, full speed x {}; median of {runs} run(s) ==",
        args.seconds, args.burst
    );
    let ratio_text = |ratio: f64| {
        if ratio.is_finite() {
            format!("{ratio:.2}")
        } else {
            "-".to_owned()
        }
    };
    let mut header = format!("{:<38}", "figure");
    for (kind, _) in results {
        header.push_str(&format!(" {:>12}", kind.name()));
    }
    if !happy.is_empty() {
        for kind in &others {
            header.push_str(&format!(
                " {:>8}",
                format!("{}/{}", &reference.name()[..1], kind.name())
            ));
        }
    }
    println!(
        "{header}   {:<24} verdict",
        format!("target ({})", reference.name())
    );
    for row in &rows {
        let h = median(happy.iter().map(row.get));
        let v = median(naive.iter().map(row.get));
        let ratio = h / v;
        let mut line = format!("{:<38}", row.label);
        for (_, figures) in results {
            let value = median(figures.iter().map(row.get));
            line.push_str(&format!(" {:>12}", fmt_value(value, row.decimals)));
        }
        if !happy.is_empty() {
            for &kind in &others {
                let other = median(pick(kind).iter().map(row.get));
                line.push_str(&format!(" {:>8}", ratio_text(h / other)));
            }
        }
        let (target, verdict) = match row.target {
            Target::None => ("", ""),
            Target::AtMost(max, text) => (text, verdict(h <= max, h)),
            Target::GoalLimit(goal, limit, text) => (
                text,
                if h.is_nan() {
                    "-"
                } else if h <= goal {
                    "ok"
                } else if h <= limit {
                    "over goal"
                } else {
                    "MISS"
                },
            ),
            Target::RatioAtLeast(min, text) => (text, verdict(ratio >= min, ratio)),
            Target::RatioAtMost(max, text) => (text, verdict(ratio <= max, ratio)),
        };
        println!("{line}   {target:<24} {verdict}");
    }
    for (kind, figures) in results {
        for (i, f) in figures.iter().enumerate() {
            if f.rss_churn_cycles_kib.len() > 1 {
                let cycles: Vec<String> = f
                    .rss_churn_cycles_kib
                    .iter()
                    .map(|kib| format!("{kib:.2}"))
                    .collect();
                println!(
                    "   {:<8} run {}: RSS per connection after each churn cycle, KiB: {}",
                    kind.name(),
                    i + 1,
                    cycles.join(", ")
                );
            }
            for (name, t) in [("fixed rate", &f.fixed), ("full speed", &f.full)] {
                let status = if t.lossless() { "ok" } else { "LOSS" };
                let threads: Vec<String> = t
                    .server_threads
                    .iter()
                    .map(|(name, ns)| {
                        format!(
                            "{name} {:.0}%",
                            *ns as f64 * 100.0 / t.wall_ns.max(1) as f64
                        )
                    })
                    .collect();
                println!(
                    "   {:<8} run {}: {name}: {} of {} deliveries, {} anomalies: {status}; {:.2} s; server CPU {:.0}% ({}), waiting for a CPU {:.0}%; load generator CPU {:.0}%, waiting {:.0}%",
                    kind.name(),
                    i + 1,
                    t.delivered,
                    t.expected,
                    t.anomalies,
                    t.wall_ns as f64 / 1e9,
                    t.server_cpu_pct,
                    threads.join(", "),
                    t.server_wait_pct,
                    t.client_cpu_pct,
                    t.client_wait_pct
                );
            }
            for (phase, t) in [("fixed rate", &f.fixed), ("full speed", &f.full)] {
                match &t.syscalls {
                    Some(Ok(counted)) => println!(
                        "   {:<8} run {}: {phase}: {}",
                        kind.name(),
                        i + 1,
                        syscalls_per_delivery(counted, t.delivered)
                    ),
                    Some(Err(e)) => println!(
                        "   {:<8} run {}: {phase}: syscalls not counted: {e}",
                        kind.name(),
                        i + 1
                    ),
                    None => {}
                }
            }
        }
    }
    if args.syscalls {
        print_syscall_medians(results, "fixed-rate", |f| &f.fixed);
        print_syscall_medians(results, "full-speed", |f| &f.full);
    }
    println!(
        "   (targets are stated for 5,000 clients; CPU rows use /proc/<pid>/task/*/schedstat (ns) unless marked utime+stime; load average now {})",
        proc_stats::load_average()
    );
}

/// How many syscalls of the kinds that tell a fan-out's story are printed
/// per server, besides the total.
const SYSCALLS_SHOWN: usize = 8;
/// Syscalls per delivery below this print as nothing (they are the odd
/// accept or timer, not the fan-out).
const SYSCALLS_NEGLIGIBLE: f64 = 0.000_05;

/// `per delivery: 0.031 syscalls (write 0.016, epoll_wait 0.004, ...),
/// 0.002 context switches`: the busiest syscalls of one phase.
fn syscalls_per_delivery(counted: &SyscallFigures, delivered: u64) -> String {
    let per = |count: u64| count as f64 / delivered.max(1) as f64;
    let busiest: Vec<String> = counted
        .by_name
        .iter()
        .take(SYSCALLS_SHOWN)
        .filter(|(_, count)| per(*count) >= SYSCALLS_NEGLIGIBLE)
        .map(|(name, count)| format!("{name} {:.4}", per(*count)))
        .collect();
    format!(
        "per delivery: {:.4} syscalls ({}), {:.4} context switches; {} syscalls in all",
        per(counted.total),
        busiest.join(", "),
        per(counted.context_switches),
        counted.total
    )
}

/// The median per delivery of each server's runs: the total, and each
/// syscall any server made among its busiest.
fn print_syscall_medians(
    results: &[(ServerKind, Vec<Figures>)],
    phase_name: &str,
    phase: fn(&Figures) -> &Traffic,
) {
    let counted = |f: &Figures| match &phase(f).syscalls {
        Some(Ok(c)) if phase(f).delivered > 0 => Some((c.clone(), phase(f).delivered as f64)),
        _ => None,
    };
    let mut names: Vec<String> = Vec::new();
    for (_, figures) in results {
        for (c, _) in figures.iter().filter_map(counted) {
            for (name, _) in c.by_name.iter().take(SYSCALLS_SHOWN) {
                if !names.contains(name) {
                    names.push(name.clone());
                }
            }
        }
    }
    println!(
        "   syscalls per delivery over the {phase_name} phase (median of the runs, perf stat):"
    );
    let mut header = format!("   {:<20}", "syscall");
    for (kind, _) in results {
        header.push_str(&format!(" {:>10}", kind.name()));
    }
    println!("{header}");
    let row = |label: &str, get: &dyn Fn(&SyscallFigures) -> u64| {
        let values: Vec<f64> = results
            .iter()
            .map(|(_, figures)| {
                median(
                    figures
                        .iter()
                        .filter_map(counted)
                        .map(|(c, delivered)| get(&c) as f64 / delivered),
                )
            })
            .collect();
        if values
            .iter()
            .all(|v| v.is_nan() || *v < SYSCALLS_NEGLIGIBLE)
        {
            return;
        }
        let mut line = format!("   {label:<20}");
        for value in values {
            line.push_str(&format!(" {:>10}", fmt_value(value, 4)));
        }
        println!("{line}");
    };
    row("all syscalls", &|c| c.total);
    row("context switches", &|c| c.context_switches);
    for name in &names {
        row(name, &|c| {
            c.by_name
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0, |(_, count)| *count)
        });
    }
}

fn verdict(ok: bool, value: f64) -> &'static str {
    if value.is_nan() {
        "-"
    } else if ok {
        "ok"
    } else {
        "MISS"
    }
}
