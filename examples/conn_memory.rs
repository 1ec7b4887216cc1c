//! Run with: cargo run --release --example conn_memory [-- --clients 5000 --churn 1 --burst 16 --repeat 3]
//!
//! What one idle connection costs the server, and whose cost it is. Three
//! servers, each in a child process (this binary re-executed with
//! `--serve KIND`), so that `/proc/<pid>/status` is the server's alone:
//!
//! - `h1`: a bare actix-web server; each client sends one `GET` and keeps
//!   the connection open (HTTP/1.1 keep-alive). What it costs is actix-http's
//!   dispatcher and actix-web's per-connection state: the floor under any
//!   actix WebSocket server;
//! - `ws-echo`: a bare actix-web-actors echo actor (`ws::start`, no hub, no
//!   checks); each client upgrades and exchanges one ping/pong. Minus `h1`,
//!   that is what actix-web-actors adds (the actor, its context and mailbox,
//!   the codec, the request payload's channel);
//! - `happynet`: a `happynet::Network` configured as `fanout_bench` does;
//!   each client upgrades (a plain client, in the default room) and
//!   exchanges one ping/pong. Minus `ws-echo`, that is happynet's own (the
//!   session actor, its link and delivery queue, the hub shard's entry, the
//!   room table, the frame checker, the guards, the upgrade body).
//!
//! For each server and run it prints, per connection (the server's `VmRSS`
//! with N clients minus its `VmRSS` with none, divided by N):
//! - **idle**: right after N clients connected;
//! - **after churn**: all N disconnected, the server closed every
//!   connection, N new ones connected (`--churn K` repeats it K times, and
//!   each cycle is shown: a figure that keeps climbing is a leak, one that
//!   levels off is the allocator's high-water mark);
//! - **after burst** (`--burst K`, 0 to skip): every client received K
//!   KiB (K frames of 1 KiB; for `h1`, one K KiB response) and is idle
//!   again. What a buffer keeps after a burst shows here, not in "idle";
//! - **connect**: how long the N handshakes took (`--concurrency` in flight);
//!
//! and then medians over `--repeat` runs (fresh servers each time,
//! alternating the order) and the attribution: `h1`, `ws-echo − h1`,
//! `happynet − ws-echo`.
//!
//! How to read it: the three children use jemalloc, 2 workers, and the same
//! `HttpServer` settings as `fanout_bench`; each counts its open TCP
//! connections with a guard its `on_connect` hook puts in the connection's
//! data (a few dozen bytes per connection, in all three), which is how the
//! parent knows a server has let go of the clients that left. jemalloc
//! returns freed pages to the kernel lazily (about 10 s), so "after churn"
//! includes pages the first generation left behind; set
//! `_RJEM_MALLOC_CONF=dirty_decay_ms:0,muzzy_decay_ms:0` to see only what is
//! live. Run it under `flock /work/notes/bench.lock` so that no other
//! benchmark shares the machine.

use actix::prelude::*;
use actix_web::web::Bytes;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use actix_web_actors::ws;
use futures::StreamExt;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use testkit::bench::child::{http_request, number, ServerChild};
use testkit::bench::{median, proc_stats};
use testkit::ws::{self as rawws, RecvBuf};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

// The same allocator as fanout_bench's servers, so the figures compare.
#[global_allocator]
static GLOBAL: testkit::alloc::Chosen = testkit::alloc::CHOSEN;

/// happynet's configuration: fanout_bench's.
const HAPPYNET_CONFIG: &str = r#"{"network":{"websocket":{"max_connections":20000,"presence_interval":0,"heartbeat_interval":30}}}"#;
/// Worker threads in each server (as in fanout_bench).
const WORKERS: usize = 2;
/// The listen backlog asked for (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: u32 = 8192;
/// actix-web's per-worker connection limit.
const MAX_CONNECTIONS_PER_WORKER: usize = 25_000;
/// The control routes every server adds.
const OPEN_PATH: &str = "/conn-memory/open";
const BURST_PATH: &str = "/conn-memory/burst";
const HELLO_PATH: &str = "/conn-memory/hello";
/// One frame of a burst.
const BURST_FRAME: usize = 1024;
/// The ping each WebSocket client sends once upgraded.
const PING: &[u8] = b"conn-memory";
/// The mask on the clients' frames (any value is valid).
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Clients connected and closed before the baseline RSS is read, so that
/// one-off allocations (thread caches, first arenas) are not charged to
/// the N clients measured.
const WARMUP_CLIENTS: usize = 8;
/// Pause before reading RSS, so in-flight work (handshakes, closes) settles.
const SETTLE: Duration = Duration::from_millis(500);
/// One client's handshake and first exchange.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// The server letting go of every connection once the clients left.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// A child printing its port.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(15);
/// Every client receiving its burst.
const BURST_TIMEOUT: Duration = Duration::from_secs(60);
/// File descriptors each process needs besides its connections.
const FD_HEADROOM: u64 = 200;

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("--serve") {
        return match argv.get(1).and_then(|k| ServerKind::parse(k)) {
            Some(kind) => serve(kind),
            None => {
                eprintln!("conn_memory: --serve needs happynet, ws-echo or h1");
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
            eprintln!("conn_memory: {e}\n\n{}", Args::USAGE);
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("conn_memory: cannot start the client runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // One thread for every client: it takes the least CPU from the server.
    tokio::task::LocalSet::new().block_on(&runtime, run(args))
}

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

/// Which server a child runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerKind {
    Happynet,
    WsEcho,
    H1,
}

impl ServerKind {
    const ALL: [ServerKind; 3] = [ServerKind::H1, ServerKind::WsEcho, ServerKind::Happynet];

    fn name(self) -> &'static str {
        match self {
            ServerKind::Happynet => "happynet",
            ServerKind::WsEcho => "ws-echo",
            ServerKind::H1 => "h1",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    fn is_ws(self) -> bool {
        self != ServerKind::H1
    }
}

#[derive(Debug, Clone)]
struct Args {
    clients: Vec<usize>,
    churn: usize,
    burst: usize,
    repeat: usize,
    concurrency: usize,
    servers: Vec<ServerKind>,
}

impl Args {
    const USAGE: &'static str = "\
usage: conn_memory [--clients 5000] [--churn 1] [--burst 16] [--repeat 3]
                   [--concurrency 256] [--servers h1,ws-echo,happynet]

  --clients      client counts to measure, comma-separated
  --churn        disconnect/reconnect cycles (each one's RSS is shown)
  --burst        KiB every client receives before the after-burst RSS (0: skip)
  --repeat       runs per server and client count (fresh servers); medians
  --concurrency  handshakes kept in flight while connecting
  --servers      which servers to measure (the attribution needs all three)";

    /// Parses the command line; `Ok(None)` for `--help`.
    fn parse(argv: &[String]) -> Result<Option<Args>, String> {
        let mut args = Args {
            clients: vec![5000],
            churn: 1,
            burst: 16,
            repeat: 3,
            concurrency: 256,
            servers: ServerKind::ALL.to_vec(),
        };
        let mut it = argv.iter();
        while let Some(arg) = it.next() {
            if arg == "--help" || arg == "-h" {
                return Ok(None);
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
                "--churn" => args.churn = number(name, &value()?, 0, 50)?,
                "--burst" => args.burst = number(name, &value()?, 0, 1024)?,
                "--repeat" => args.repeat = number(name, &value()?, 1, 50)?,
                "--concurrency" => args.concurrency = number(name, &value()?, 1, 20_000)?,
                "--servers" => {
                    args.servers = value()?
                        .split(',')
                        .map(|s| {
                            ServerKind::parse(s.trim())
                                .ok_or_else(|| format!("--servers: unknown server `{s}`"))
                        })
                        .collect::<Result<_, _>>()?
                }
                other => return Err(format!("unknown option `{other}`")),
            }
        }
        if args.clients.is_empty() || args.servers.is_empty() {
            return Err("--clients and --servers must not be empty".into());
        }
        Ok(Some(args))
    }
}

// ---------------------------------------------------------------------------
// The server child
// ---------------------------------------------------------------------------

/// Open TCP connections, counted by [`OpenGuard`]s.
#[derive(Default)]
struct OpenCount(AtomicUsize);

/// Put in each connection's data by `on_connect`; actix-http drops the
/// connection's data with the connection.
struct OpenGuard(Arc<OpenCount>);

impl OpenGuard {
    fn new(count: &Arc<OpenCount>) -> Self {
        count.0.fetch_add(1, Ordering::AcqRel);
        OpenGuard(count.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `GET /conn-memory/open`: connections open, this request's own excluded.
async fn open_route(count: web::Data<Arc<OpenCount>>) -> HttpResponse {
    let open = count.0.load(Ordering::Acquire).saturating_sub(1);
    HttpResponse::Ok().body(open.to_string())
}

/// `GET /conn-memory/hello`: what an h1 client asks for once.
async fn hello_route() -> HttpResponse {
    HttpResponse::Ok().body("hello")
}

#[derive(serde::Deserialize)]
struct BurstQuery {
    kib: usize,
}

/// `GET /conn-memory/burst?kib=K` on `h1`: a K KiB body, as one chunk.
async fn h1_burst_route(query: web::Query<BurstQuery>) -> HttpResponse {
    HttpResponse::Ok().body(vec![b'x'; query.kib * BURST_FRAME])
}

/// `POST /conn-memory/burst?kib=K` on `happynet`: K 1 KiB binary
/// broadcasts to every client, each awaited (so the hub's mailbox does not
/// grow ahead of the shards).
async fn happynet_burst_route(
    query: web::Query<BurstQuery>,
    net: web::Data<happynet::Network>,
) -> HttpResponse {
    let frame = Bytes::from(vec![b'x'; BURST_FRAME]);
    for _ in 0..query.kib {
        if let Err(e) = net
            .hub()
            .send(happynet::Broadcast::binary(frame.clone()))
            .await
        {
            return HttpResponse::ServiceUnavailable().body(e.to_string());
        }
    }
    HttpResponse::Ok().body("sent")
}

/// The bare actix-web-actors session: echoes data, answers pings.
struct Echo;

impl Actor for Echo {
    type Context = ws::WebsocketContext<Self>;
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for Echo {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        match msg {
            Ok(ws::Message::Ping(b)) => ctx.pong(&b),
            Ok(ws::Message::Text(t)) => ctx.text(t),
            Ok(ws::Message::Binary(b)) => ctx.binary(b),
            Ok(ws::Message::Close(reason)) => {
                ctx.close(reason);
                ctx.stop();
            }
            Ok(_) => {}
            Err(_) => ctx.stop(),
        }
    }
}

async fn echo_route(req: HttpRequest, stream: web::Payload) -> actix_web::Result<HttpResponse> {
    ws::start(Echo, &req, stream)
}

/// Runs a server until stdin closes (the parent exited) or it is killed.
fn serve(kind: ServerKind) -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
    let result = actix_web::rt::System::new().block_on(serve_kind(kind));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("conn_memory --serve {}: {e}", kind.name());
            ExitCode::FAILURE
        }
    }
}

async fn serve_kind(kind: ServerKind) -> Result<(), String> {
    let count = Arc::new(OpenCount::default());
    let counted = web::Data::new(count.clone());
    let happynet = match kind {
        ServerKind::Happynet => {
            let config =
                happynet::Config::from_json_str(HAPPYNET_CONFIG).map_err(|e| e.to_string())?;
            Some(happynet::Network::start(config).map_err(|e| e.to_string())?)
        }
        _ => None,
    };
    // happynet's hook first (TCP settings, the socket duplicate), then the
    // counting guard, which every server gets alike.
    let happynet_hook = happynet.as_ref().map(|net| net.on_connect());
    let happynet_app = happynet.map(|net| (net.configure(), web::Data::new(net)));
    let server = HttpServer::new(move || {
        let app = App::new()
            .app_data(counted.clone())
            .route(OPEN_PATH, web::get().to(open_route));
        match (&happynet_app, kind) {
            (Some((routes, net)), _) => app
                .configure(routes.clone())
                .app_data(net.clone())
                .route(BURST_PATH, web::post().to(happynet_burst_route)),
            (None, ServerKind::WsEcho) => app.route("/ws", web::get().to(echo_route)),
            (None, _) => app
                .route(HELLO_PATH, web::get().to(hello_route))
                .route(BURST_PATH, web::get().to(h1_burst_route)),
        }
    });
    let server = server
        .on_connect(move |io, data| {
            if let Some(hook) = &happynet_hook {
                hook(io, data);
            }
            data.insert(OpenGuard::new(&count));
        })
        .workers(WORKERS)
        .backlog(BACKLOG)
        .max_connections(MAX_CONNECTIONS_PER_WORKER)
        .tcp_nodelay(true)
        .bind(("127.0.0.1", 0))
        .map_err(|e| format!("bind: {e}"))?;
    let port = server.addrs().first().ok_or("bound to no address")?.port();
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{port}")
            .and_then(|()| out.flush())
            .map_err(|e| format!("cannot announce the port: {e}"))?;
    }
    server.run().await.map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------
// The parent: the server child, the clients
// ---------------------------------------------------------------------------

/// One control request to the server (see `testkit::bench::child`).
async fn control(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, String), String> {
    http_request(addr, method, path, BURST_TIMEOUT).await
}

/// Waits until the server holds `n` connections besides the control one.
async fn wait_open(addr: SocketAddr, n: usize) -> Result<(), String> {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let (_, body) = control(addr, "GET", OPEN_PATH).await?;
        let open: usize = body
            .trim()
            .parse()
            .map_err(|_| format!("{OPEN_PATH}: `{body}`"))?;
        if open == n {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the server holds {open} connections, not {n}, after {DRAIN_TIMEOUT:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One client's socket and what it read past the last thing it waited for.
struct Client {
    stream: TcpStream,
    buf: RecvBuf,
}

impl Client {
    /// Reads until `want` returns true for a frame (answering pings);
    /// frames before it are skipped.
    async fn until_frame(&mut self, mut want: impl FnMut(u8, &[u8]) -> bool) -> Result<(), String> {
        loop {
            let mut answer = Vec::new();
            let mut done = false;
            while let Some(frame) = rawws::parse_frame(self.buf.filled())? {
                let payload = &self.buf.filled()[frame.payload.clone()];
                let op = frame.opcode();
                if op == rawws::OP_PING {
                    rawws::push_pong(&mut answer, payload, MASK);
                }
                if op == rawws::OP_CLOSE {
                    return Err("the server closed the connection".into());
                }
                done = want(op, payload);
                self.buf.consume(frame.len);
                if done {
                    break;
                }
            }
            if !answer.is_empty() {
                self.stream
                    .write_all(&answer)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            if done {
                return Ok(());
            }
            if self.read().await? == 0 {
                return Err("the server closed the connection".into());
            }
        }
    }

    async fn read(&mut self) -> Result<usize, String> {
        self.buf
            .read_from(&mut self.stream)
            .await
            .map_err(|e| e.to_string())
    }

    /// Reads an HTTP response (with `Content-Length`) whole.
    async fn http_response(&mut self) -> Result<(), String> {
        loop {
            if let Some(head) = rawws::response_head_len(self.buf.filled()) {
                let text = String::from_utf8_lossy(&self.buf.filled()[..head]).to_lowercase();
                if !text.starts_with("http/1.1 200") {
                    return Err(format!("unexpected response: {}", text.trim()));
                }
                let length: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or("a response without content-length")?;
                self.buf.consume(head);
                let mut left = length;
                loop {
                    let have = self.buf.filled().len().min(left);
                    self.buf.consume(have);
                    left -= have;
                    if left == 0 {
                        return Ok(());
                    }
                    if self.read().await? == 0 {
                        return Err("closed in the middle of a response".into());
                    }
                }
            }
            if self.read().await? == 0 {
                return Err("closed before the response".into());
            }
        }
    }
}

/// Connects one client to `kind` and completes its first exchange: for a
/// WebSocket server the upgrade and a ping/pong (so its session is running
/// and has read and written once), for `h1` one request and its response.
async fn open_client(kind: ServerKind, addr: SocketAddr) -> Result<Client, String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    let request = if kind.is_ws() {
        rawws::upgrade_request(addr, "/ws", &[])
    } else {
        format!("GET {HELLO_PATH} HTTP/1.1\r\nHost: {addr}\r\n\r\n")
    };
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("request: {e}"))?;
    let mut client = Client {
        stream,
        buf: RecvBuf::new(),
    };
    if !kind.is_ws() {
        client.http_response().await?;
        return Ok(client);
    }
    loop {
        if let Some(len) = rawws::response_head_len(client.buf.filled()) {
            rawws::check_upgrade_response(&client.buf.filled()[..len])?;
            client.buf.consume(len);
            break;
        }
        if client.read().await? == 0 {
            return Err("closed during the handshake".into());
        }
    }
    let mut ping = Vec::new();
    rawws::push_client_frame(&mut ping, rawws::FIN | rawws::OP_PING, PING, MASK);
    client
        .stream
        .write_all(&ping)
        .await
        .map_err(|e| format!("ping: {e}"))?;
    client
        .until_frame(|op, payload| op == rawws::OP_PONG && payload == PING)
        .await?;
    Ok(client)
}

/// Opens `n` clients, at most `concurrency` handshakes at a time; returns
/// them and how long it took.
async fn connect(
    kind: ServerKind,
    addr: SocketAddr,
    n: usize,
    concurrency: usize,
) -> Result<(Vec<Client>, Duration), String> {
    let start = Instant::now();
    let opened: Vec<Result<Client, String>> = futures::stream::iter(0..n)
        .map(|_| async move {
            tokio::time::timeout(HANDSHAKE_TIMEOUT, open_client(kind, addr))
                .await
                .unwrap_or_else(|_| Err("handshake timed out".into()))
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let took = start.elapsed();
    let mut clients = Vec::with_capacity(n);
    for c in opened {
        clients.push(c?);
    }
    Ok((clients, took))
}

/// Every client receives `kib` KiB: `kib` 1 KiB broadcasts (happynet), its
/// own `kib` 1 KiB frames echoed (ws-echo), one `kib` KiB response (h1).
async fn burst(
    kind: ServerKind,
    addr: SocketAddr,
    clients: &mut [Client],
    kib: usize,
) -> Result<(), String> {
    let results = match kind {
        ServerKind::Happynet => {
            let path = format!("{BURST_PATH}?kib={kib}");
            let send = tokio::task::spawn_local(async move { control(addr, "POST", &path).await });
            let got = tokio::time::timeout(BURST_TIMEOUT, receive_all(clients, kib)).await;
            match send.await {
                Ok(Ok((200, _))) => {}
                Ok(Ok((status, body))) => return Err(format!("burst: HTTP {status}: {body}")),
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(format!("burst: {e}")),
            }
            got
        }
        ServerKind::WsEcho => {
            let mut frames = Vec::with_capacity(kib * (BURST_FRAME + 8));
            for _ in 0..kib {
                rawws::push_client_frame(
                    &mut frames,
                    rawws::FIN | rawws::OP_BINARY,
                    &[b'x'; BURST_FRAME],
                    MASK,
                );
            }
            for c in clients.iter_mut() {
                c.stream
                    .write_all(&frames)
                    .await
                    .map_err(|e| format!("burst: {e}"))?;
            }
            tokio::time::timeout(BURST_TIMEOUT, receive_all(clients, kib)).await
        }
        ServerKind::H1 => {
            let request = format!("GET {BURST_PATH}?kib={kib} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
            let each = clients.iter_mut().map(|c| {
                let request = request.clone();
                async move {
                    c.stream
                        .write_all(request.as_bytes())
                        .await
                        .map_err(|e| format!("burst: {e}"))?;
                    c.http_response().await
                }
            });
            tokio::time::timeout(BURST_TIMEOUT, futures::future::join_all(each)).await
        }
    };
    let results = results.map_err(|_| format!("the burst took more than {BURST_TIMEOUT:?}"))?;
    results.into_iter().collect::<Result<Vec<()>, String>>()?;
    Ok(())
}

/// Every client reads `kib` binary frames of 1 KiB.
async fn receive_all(clients: &mut [Client], kib: usize) -> Vec<Result<(), String>> {
    let each = clients.iter_mut().map(|c| async move {
        let mut left = kib;
        c.until_frame(|op, payload| {
            if op == rawws::OP_BINARY && payload.len() == BURST_FRAME {
                left -= 1;
            }
            left == 0
        })
        .await
    });
    futures::future::join_all(each).await
}

/// One run's figures, KiB per connection (connect: ms).
#[derive(Debug, Clone, Default)]
struct Figures {
    connect_ms: f64,
    idle: f64,
    churn: Vec<f64>,
    burst: f64,
}

/// Every figure for `kind` at `n` clients, from a fresh child.
async fn measure(kind: ServerKind, n: usize, args: &Args) -> Result<Figures, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut command = Command::new(exe);
    command.args(["--serve", kind.name()]);
    let server = ServerChild::spawn(command, kind.name(), SERVER_START_TIMEOUT)?;
    let addr = server.addr();
    let rss_kib = |what: &str| {
        proc_stats::rss_kib(server.pid()).map_err(|e| format!("server RSS ({what}): {e}"))
    };
    wait_open(addr, 0).await?;
    let (warm, _) = connect(kind, addr, WARMUP_CLIENTS, args.concurrency).await?;
    drop(warm);
    wait_open(addr, 0).await?;
    tokio::time::sleep(SETTLE).await;
    let empty = rss_kib("no clients")?;
    let per_conn = |kib: u64| (kib as f64 - empty as f64) / n as f64;

    let (mut clients, took) = connect(kind, addr, n, args.concurrency).await?;
    wait_open(addr, n).await?;
    tokio::time::sleep(SETTLE).await;
    let mut figures = Figures {
        connect_ms: took.as_secs_f64() * 1e3,
        idle: per_conn(rss_kib("idle")?),
        burst: f64::NAN,
        ..Figures::default()
    };
    for _ in 0..args.churn {
        drop(clients);
        wait_open(addr, 0).await?;
        tokio::time::sleep(SETTLE).await;
        clients = connect(kind, addr, n, args.concurrency).await?.0;
        wait_open(addr, n).await?;
        tokio::time::sleep(SETTLE).await;
        figures.churn.push(per_conn(rss_kib("after churn")?));
    }
    if args.burst > 0 {
        burst(kind, addr, &mut clients, args.burst).await?;
        tokio::time::sleep(SETTLE).await;
        figures.burst = per_conn(rss_kib("after burst")?);
    }
    drop(clients);
    Ok(figures)
}

async fn run(args: Args) -> ExitCode {
    println!(
        "conn_memory: server RSS per idle connection, KiB ({} run(s), medians; {WORKERS} workers; {} handshakes in flight; burst {} KiB)",
        args.repeat, args.concurrency, args.burst
    );
    let limit = proc_stats::open_files_soft_limit();
    let mut failed = false;
    for &n in &args.clients {
        // happynet holds each connection twice (its socket duplicate).
        if let Some(limit) = limit {
            let need = 2 * n as u64 + FD_HEADROOM;
            if need > limit {
                println!("!! open-files soft limit {limit} is too low for {n} clients: raise it with `ulimit -n {need}`");
                failed = true;
                continue;
            }
        }
        let mut results: Vec<(ServerKind, Vec<Figures>)> =
            args.servers.iter().map(|&k| (k, Vec::new())).collect();
        for repeat in 0..args.repeat {
            let mut order: Vec<usize> = (0..results.len()).collect();
            if repeat % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let kind = results[i].0;
                match measure(kind, n, &args).await {
                    Ok(f) => {
                        println!(
                            "   {:<8} n={n} run {}: connect {:.0} ms, idle {:.2}, churn [{}], burst {:.2}",
                            kind.name(),
                            repeat + 1,
                            f.connect_ms,
                            f.idle,
                            f.churn
                                .iter()
                                .map(|v| format!("{v:.2}"))
                                .collect::<Vec<_>>()
                                .join(", "),
                            f.burst
                        );
                        results[i].1.push(f);
                    }
                    Err(e) => {
                        println!("!! {} at {n} clients failed: {e}", kind.name());
                        failed = true;
                    }
                }
            }
        }
        print_table(n, &results);
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn print_table(n: usize, results: &[(ServerKind, Vec<Figures>)]) {
    let med = |kind: ServerKind, get: fn(&Figures) -> f64| {
        results
            .iter()
            .find(|(k, _)| *k == kind)
            .map_or(f64::NAN, |(_, runs)| median(runs.iter().map(get)))
    };
    type Get = fn(&Figures) -> f64;
    let rows: [(&str, Get); 4] = [
        ("idle, KiB/conn", |f| f.idle),
        ("after churn, KiB/conn", |f| {
            f.churn.last().copied().unwrap_or(f64::NAN)
        }),
        ("after burst, KiB/conn", |f| f.burst),
        ("connect all N, ms", |f| f.connect_ms),
    ];
    println!("\n{n} clients (medians)");
    print!("{:<24}", "");
    for (k, _) in results {
        print!("{:>10}", k.name());
    }
    println!("{:>12}{:>18}", "echo - h1", "happynet - echo");
    for (label, get) in rows {
        print!("{label:<24}");
        for (k, _) in results {
            print!("{:>10.2}", med(*k, get));
        }
        let h1 = med(ServerKind::H1, get);
        let echo = med(ServerKind::WsEcho, get);
        let hn = med(ServerKind::Happynet, get);
        // The attribution: h1 is actix-http's (the column), echo - h1
        // actix-web-actors', happynet - echo happynet's own.
        println!("{:>12.2}{:>18.2}", echo - h1, hn - echo);
    }
    println!();
}
