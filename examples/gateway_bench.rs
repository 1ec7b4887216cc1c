//! Run with: cargo run --release --example gateway_bench [-- --seconds 5 --rounds 3 --requests 20000]
//!
//! What the OpenAI-compatible gateway adds to a chat completion. Three
//! processes, so that no one's CPU is counted as another's: the fake upstream
//! (this binary re-executed with `--serve-upstream`), the happynet gateway
//! server (`--serve-gateway <upstream-url>`: `Network::start`, the gateway
//! routes, one HTTP worker) and this process, the load generator (one awc
//! client, one connection pool). Two measurements, each in alternating rounds
//! so that drift in the machine's load falls on both sides alike:
//!
//! - **Added latency, uncached**: open loop at `--rate` requests/s (default
//!   1,000) for `--seconds` per round, `POST /v1/chat/completions` straight to
//!   the fake (*direct*) and through the gateway (*gateway*). Every body is
//!   unique, so the gateway's response cache misses every time (it still
//!   looks up, collapses, stores and evicts: that is part of what a miss
//!   costs). Requests are sent at `t0 + i/rate` by a pacer thread whatever
//!   happened to earlier ones, and each latency runs from the *scheduled*
//!   send time to the last byte of the answer, so a stall shows up in the
//!   figures instead of silently delaying the schedule (no coordinated
//!   omission). At most [`MAX_IN_FLIGHT`] requests are outstanding; sends
//!   that had to wait for a slot are counted, and the wait is in their
//!   latency. *added* is gateway minus direct within each pair of adjacent
//!   rounds; the `all` rows give the medians over rounds and pairs, and the
//!   worst pair.
//! - **Cached hits**: closed loop, [`CACHED_CONCURRENCY`] callers, the same
//!   body every time, `--requests` per round: through the gateway (after the
//!   first call every answer comes from its cache) versus straight to the
//!   fake (which parses and answers every one). The fake's `/__stats` shows
//!   how many of the gateway's calls reached it (expected: 1 in all).
//!
//! How to read it. `lag p99` is how late the generator itself sent: it is
//! in both sides' latency, so it cancels out of *added* on average, but when
//! it is near the target the p99s are measuring the machine, not the
//! gateway. `CPU/req` is the CPU time of the process that answered (the fake
//! on direct rows, the gateway on gateway rows) per request, from `/proc`;
//! the per-thread table splits the gateway's between its HTTP worker and the
//! upstream arbiter (limiter, breaker, pool, cache); `runq` is how long
//! those threads were runnable but waiting for a CPU. A high `runq`, a load
//! average near or above the CPU count, or a negative *added* all say the
//! run was noisy: rerun on a quiet machine, or with more `--rounds`.
//!
//! Target: p99 added latency <= 0.5 ms uncached.

#![allow(missing_docs)]

use actix_web::http::header::CONTENT_TYPE;
use actix_web::web::Bytes;
use actix_web::{App, HttpServer};
use futures::future::join_all;
use happynet::{Config, Network};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use testkit::bench::proc_stats;
use testkit::fake_upstream;
use tokio::sync::{mpsc, Semaphore};

#[global_allocator]
static GLOBAL: testkit::alloc::Chosen = testkit::alloc::CHOSEN;

/// Requests outstanding at once in the open loop (and the awc pool's
/// connection limit): enough for a 250 ms stall at 1,000/s, small enough
/// that a dead gateway cannot make the generator grow without bound.
const MAX_IN_FLIGHT: usize = 256;
/// Callers in the cached-hit closed loop.
const CACHED_CONCURRENCY: usize = 32;
/// Scheduled sends the pacer may be ahead of the sender by; beyond it the
/// pacer blocks (the lateness still shows, as latency from the schedule).
const PACER_QUEUE: usize = 1024;
/// One request's limit, connect to last byte; a slower one counts as an
/// error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the end of a round waits for its stragglers.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The pacer's first send is this far after the round starts, so that it
/// is not already late.
const START_DELAY: Duration = Duration::from_millis(10);
/// Open-loop warm-up per path before the first round (connections open,
/// caches and allocators hot), seconds.
const WARMUP_SECONDS: f64 = 1.0;
/// Closed-loop warm-up per path, requests.
const WARMUP_REQUESTS: usize = 2_000;
/// A child that is never killed (the parent crashed hard) exits after this.
const CHILD_LIFETIME: Duration = Duration::from_secs(3600);
/// The largest answer body read.
const BODY_LIMIT: usize = 1 << 20;
/// The issue's target for the uncached p99 added latency.
const TARGET_P99_ADDED: Duration = Duration::from_micros(500);
/// The gateway's API client reads its key from here (the fake checks none).
const KEY_ENV: &str = "GATEWAY_BENCH_KEY";

struct Args {
    rate: f64,
    seconds: f64,
    rounds: usize,
    requests: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        rate: 1_000.0,
        seconds: 5.0,
        rounds: 3,
        requests: 20_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| format!("{name} needs a positive number"))
        };
        match flag.as_str() {
            "--rate" => args.rate = value("--rate")?.min(100_000.0),
            "--seconds" => args.seconds = value("--seconds")?.min(600.0),
            "--rounds" => args.rounds = value("--rounds")?.clamp(1.0, 100.0) as usize,
            "--requests" => {
                args.requests = value("--requests")?.clamp(1.0, 10_000_000.0) as usize;
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

// ---------------------------------------------------------------------------
// The children.

/// A child process of this binary, killed when dropped. The child also exits
/// when its stdin closes, so it goes with us even if we are killed outright.
struct ChildServer {
    child: Child,
    _stdin: Option<ChildStdin>,
    /// The first line it printed: `<addr> [details]`.
    addr: String,
    details: String,
}

impl ChildServer {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_child(args: &[&str], env: &[(&str, &str)]) -> Result<ChildServer, String> {
    let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
    let mut child = Command::new(exe)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn {args:?}: {e}"))?;
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    // From here on the guard owns the child: any error below kills it.
    let mut server = ChildServer {
        child,
        _stdin: stdin,
        addr: String::new(),
        details: String::new(),
    };
    let mut line = String::new();
    if let Some(stdout) = stdout {
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| format!("{args:?}: reading its address: {e}"))?;
    }
    let mut words = line.split_whitespace();
    server.addr = words
        .next()
        .ok_or_else(|| format!("{args:?} exited without printing its address"))?
        .to_owned();
    server.details = words.collect::<Vec<_>>().join(" ");
    Ok(server)
}

/// Exits this (child) process when the parent closes our stdin, i.e. when
/// the parent is gone for any reason.
fn exit_with_parent() {
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
}

fn print_ready(line: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout();
    writeln!(out, "{line}")?;
    out.flush()
}

fn serve_upstream() -> Result<(), String> {
    exit_with_parent();
    actix_web::rt::System::new().block_on(async {
        let fake = fake_upstream::FakeUpstream::start("fake", fake_upstream::Faults::default())
            .await
            .map_err(|e| format!("start the fake upstream: {e}"))?;
        print_ready(&fake.addr.to_string()).map_err(|e| e.to_string())?;
        actix_web::rt::time::sleep(CHILD_LIFETIME).await;
        Ok(())
    })
}

/// The ids of this process's threads.
fn own_threads() -> HashSet<u32> {
    std::fs::read_dir("/proc/self/task")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn serve_gateway(upstream: &str) -> Result<(), String> {
    exit_with_parent();
    let config = serde_json::json!({"network": {
        "gateway": {"clients": ["openai"]},
        "api_clients": {"openai": {
            "base_url": upstream,
            "rate_limit": 1e9,
            "max_connections": 64,
            "api_key_env": KEY_ENV,
            "cache": {"max_entries": 1000, "default_ttl": 60}
        }}
    }});
    let config = Config::from_json_str(&config.to_string()).map_err(|e| e.to_string())?;
    actix_web::rt::System::new().block_on(async move {
        // The threads Network::start creates are the upstream arbiter's:
        // the parent names them in its per-thread CPU table.
        let before = own_threads();
        let net = Network::start(config).map_err(|e| e.to_string())?;
        let arbiter: Vec<String> = own_threads()
            .difference(&before)
            .map(u32::to_string)
            .collect();
        let routes = net.configure();
        let gateways = net.configure_gateways();
        let server = HttpServer::new(move || {
            App::new()
                .configure(routes.clone())
                .configure(gateways.clone())
        })
        .workers(1)
        .on_connect(net.on_connect())
        .disable_signals()
        .bind(("127.0.0.1", 0))
        .map_err(|e| format!("bind: {e}"))?;
        let addr = server
            .addrs()
            .first()
            .copied()
            .ok_or("bound to no address")?;
        let server = server.run();
        print_ready(&format!("{addr} {}", arbiter.join(","))).map_err(|e| e.to_string())?;
        tokio::select! {
            done = server => done.map_err(|e| e.to_string()),
            _ = actix_web::rt::time::sleep(CHILD_LIFETIME) => Ok(()),
        }
    })
}

// ---------------------------------------------------------------------------
// Measuring.

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn signed_us(a: Duration, b: Duration) -> f64 {
    us(a) - us(b)
}

/// Latencies and failures of one round.
#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn record(&mut self, outcome: Result<(), String>, latency: Duration) {
        match outcome {
            Ok(()) => self.latencies.push(latency),
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }
}

/// The figures of one round, either loop.
struct Round {
    requests: usize,
    rps: f64,
    p50: Duration,
    p99: Duration,
    max: Duration,
    errors: u64,
    first_error: Option<String>,
    /// Open loop: p99 of how late the generator sent, and how many sends
    /// waited for an in-flight slot.
    send_lag_p99: Duration,
    cap_waits: u64,
    /// CPU per request of the process that answered (the gateway in
    /// gateway rounds, the fake in direct ones).
    cpu_per_req: Option<Duration>,
}

impl Round {
    fn from_tally(mut tally: Tally, elapsed: Duration) -> Round {
        tally.latencies.sort_unstable();
        let n = tally.latencies.len();
        Round {
            requests: n + tally.errors as usize,
            rps: n as f64 / elapsed.as_secs_f64().max(1e-9),
            p50: percentile(&tally.latencies, 0.50),
            p99: percentile(&tally.latencies, 0.99),
            max: tally.latencies.last().copied().unwrap_or_default(),
            errors: tally.errors,
            first_error: tally.first_error,
            send_lag_p99: Duration::ZERO,
            cap_waits: 0,
            cpu_per_req: None,
        }
    }
}

fn chat_body(content: &str) -> Bytes {
    Bytes::from(format!(
        r#"{{"model":"{}","messages":[{{"role":"user","content":"{content}"}}]}}"#,
        fake_upstream::FAKE_MODEL
    ))
}

/// One chat completion, answer read to the end; an error names the cause.
async fn post_chat(client: &awc::Client, url: &str, body: Bytes) -> Result<(), String> {
    let mut resp = client
        .post(url)
        .insert_header((CONTENT_TYPE, "application/json"))
        .send_body(body)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let answer = resp
        .body()
        .limit(BODY_LIMIT)
        .await
        .map_err(|e| format!("body: {e}"))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        let shown = &answer[..answer.len().min(200)];
        Err(format!(
            "status {}: {}",
            resp.status(),
            String::from_utf8_lossy(shown)
        ))
    }
}

fn scheduled(t0: Instant, rate: f64, i: u64) -> Instant {
    t0 + Duration::from_secs_f64(i as f64 / rate)
}

/// Sleeps until each scheduled time and hands the index to the sender. A
/// thread, because `std::thread::sleep` wakes within tens of microseconds
/// where the runtime's timer works in whole milliseconds.
fn pace(t0: Instant, rate: f64, n: u64, tx: mpsc::Sender<u64>) {
    for i in 0..n {
        let at = scheduled(t0, rate, i);
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        if tx.blocking_send(i).is_err() {
            return;
        }
    }
}

/// One open-loop round: `rate` unique chat completions a second to `url`
/// for `seconds`; see the module docs.
async fn open_loop(
    client: &awc::Client,
    url: &str,
    rate: f64,
    seconds: f64,
    counter: &Cell<u64>,
) -> Result<Round, String> {
    let n = (rate * seconds).round().max(1.0) as u64;
    let (tx, mut rx) = mpsc::channel(PACER_QUEUE);
    let t0 = Instant::now() + START_DELAY;
    let pacer = std::thread::Builder::new()
        .name("pacer".into())
        .spawn(move || pace(t0, rate, n, tx))
        .map_err(|e| format!("pacer thread: {e}"))?;
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let tally = Rc::new(RefCell::new(Tally::default()));
    let url: Rc<str> = url.into();
    let mut lags = Vec::with_capacity(n as usize);
    let mut cap_waits = 0;
    while let Some(i) = rx.recv().await {
        let at = scheduled(t0, rate, i);
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                cap_waits += 1;
                slots
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|e| format!("in-flight slots: {e}"))?
            }
        };
        let count = counter.get();
        counter.set(count + 1);
        let body = chat_body(&format!("gateway bench request {count}"));
        lags.push(at.elapsed());
        let (client, url, tally) = (client.clone(), url.clone(), tally.clone());
        actix_web::rt::spawn(async move {
            let outcome = post_chat(&client, &url, body).await;
            tally.borrow_mut().record(outcome, at.elapsed());
            drop(permit);
        });
    }
    let _ = pacer.join();
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, slots.acquire_many(MAX_IN_FLIGHT as u32))
        .await
        .map_err(|_| format!("requests still in flight after {DRAIN_TIMEOUT:?}"))?;
    drop(drained);
    let elapsed = t0.elapsed();
    let tally = std::mem::take(&mut *tally.borrow_mut());
    let mut round = Round::from_tally(tally, elapsed);
    lags.sort_unstable();
    round.send_lag_p99 = percentile(&lags, 0.99);
    round.cap_waits = cap_waits;
    Ok(round)
}

/// One closed-loop round: `concurrency` callers send `body` to `url` back
/// to back, `requests` in all.
async fn closed_loop(
    client: &awc::Client,
    url: &str,
    body: &Bytes,
    concurrency: usize,
    requests: usize,
) -> Round {
    let started = Instant::now();
    let tallies = join_all((0..concurrency).map(|w| async move {
        let mut tally = Tally::default();
        let share = requests / concurrency + usize::from(w < requests % concurrency);
        tally.latencies.reserve(share);
        for _ in 0..share {
            let sent = Instant::now();
            let outcome = post_chat(client, url, body.clone()).await;
            tally.record(outcome, sent.elapsed());
        }
        tally
    }))
    .await;
    let elapsed = started.elapsed();
    let mut all = Tally::default();
    for t in tallies {
        all.latencies.extend(t.latencies);
        all.errors += t.errors;
        if all.first_error.is_none() {
            all.first_error = t.first_error;
        }
    }
    Round::from_tally(all, elapsed)
}

/// Requests the fake upstream has counted so far (control routes excluded).
async fn upstream_requests(client: &awc::Client, upstream: &ChildServer) -> Result<u64, String> {
    let url = upstream.url(fake_upstream::STATS_PATH);
    let mut resp = client
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let stats: serde_json::Value = resp.json().await.map_err(|e| format!("{url}: {e}"))?;
    stats["requests"]
        .as_u64()
        .ok_or_else(|| format!("{url}: no \"requests\" in {stats}"))
}

/// CPU time `pid` has used so far, nanoseconds.
fn process_cpu_ns(pid: u32, ticks_per_sec: u64) -> Option<u64> {
    let cpu = proc_stats::cpu_time(pid, ticks_per_sec).ok()?;
    Some(cpu.sched_ns.unwrap_or(cpu.stat_ns))
}

/// Runs `round` and sets its CPU per request: what `pid` used meanwhile.
async fn with_cpu<F: Future<Output = Result<Round, String>>>(
    pid: u32,
    ticks_per_sec: u64,
    round: F,
) -> Result<Round, String> {
    let before = process_cpu_ns(pid, ticks_per_sec);
    let mut round = round.await?;
    if let (Some(before), Some(after)) = (before, process_cpu_ns(pid, ticks_per_sec)) {
        let per_req = after.saturating_sub(before) / (round.requests as u64).max(1);
        round.cpu_per_req = Some(Duration::from_nanos(per_req));
    }
    Ok(round)
}

/// CPU per thread of the gateway process, summed over the gateway rounds of
/// one phase.
struct GatewayCpu {
    pid: u32,
    arbiter: HashSet<u32>,
    ticks_per_sec: u64,
    /// tid → (label, CPU ns, runqueue wait ns).
    threads: BTreeMap<u32, (String, u64, u64)>,
    wall: Duration,
    requests: u64,
}

impl GatewayCpu {
    fn new(gateway: &ChildServer, ticks_per_sec: u64) -> GatewayCpu {
        GatewayCpu {
            pid: gateway.pid(),
            arbiter: gateway
                .details
                .split(',')
                .filter_map(|t| t.parse().ok())
                .collect(),
            ticks_per_sec,
            threads: BTreeMap::new(),
            wall: Duration::ZERO,
            requests: 0,
        }
    }

    fn label(&self, tid: u32, name: &str) -> String {
        if tid == self.pid {
            "System thread (hub)".into()
        } else if self.arbiter.contains(&tid) {
            "upstream arbiter".into()
        } else if name.starts_with("actix-server ac") {
            "acceptor".into()
        } else if name.starts_with("actix-server wo") || name.starts_with("actix-rt") {
            // The server's worker is an actix arbiter; the only other one is
            // the upstreams', recognised above.
            "HTTP worker".into()
        } else {
            name.to_owned()
        }
    }

    /// Runs `round`, adds the gateway's CPU during it, and sets the round's
    /// CPU per request.
    async fn measure<F: Future<Output = Result<Round, String>>>(
        &mut self,
        round: F,
    ) -> Result<Round, String> {
        let threads_before = proc_stats::thread_cpu(self.pid);
        let started = Instant::now();
        let round = with_cpu(self.pid, self.ticks_per_sec, round).await?;
        self.wall += started.elapsed();
        let threads_after = proc_stats::thread_cpu(self.pid);
        for after in &threads_after {
            let before = threads_before.iter().find(|b| b.tid == after.tid);
            let ns = after.ns - before.map_or(0, |b| b.ns.min(after.ns));
            let wait = after.wait_ns - before.map_or(0, |b| b.wait_ns.min(after.wait_ns));
            let label = self.label(after.tid, &after.name);
            let entry = self.threads.entry(after.tid).or_insert((label, 0, 0));
            entry.1 += ns;
            entry.2 += wait;
        }
        self.requests += round.requests as u64;
        Ok(round)
    }

    fn print(&self, phase: &str) {
        if self.threads.is_empty() {
            println!("  gateway threads ({phase}): /proc/<pid>/task/*/schedstat unavailable");
            return;
        }
        let wall_ns = self.wall.as_nanos().max(1) as f64;
        let per_req = |ns: u64| ns as f64 / 1e3 / self.requests.max(1) as f64;
        println!(
            "  gateway threads ({phase}, {} requests in {:.1} s of gateway rounds):",
            self.requests,
            self.wall.as_secs_f64()
        );
        println!(
            "    {:<22} {:>8} {:>12} {:>8}",
            "thread", "busy", "CPU µs/req", "runq"
        );
        let mut threads: Vec<_> = self.threads.iter().collect();
        threads.sort_by_key(|(_, (_, ns, _))| std::cmp::Reverse(*ns));
        for (tid, (label, ns, wait)) in threads {
            if (*ns as f64) < wall_ns * 0.001 {
                continue;
            }
            println!(
                "    {:<22} {:>7.1}% {:>12.1} {:>7.1}%",
                format!("{label} [{tid}]"),
                *ns as f64 / wall_ns * 100.0,
                per_req(*ns),
                *wait as f64 / wall_ns * 100.0,
            );
        }
    }
}

fn error_note(rounds: &[&Round]) -> String {
    let errors: u64 = rounds.iter().map(|r| r.errors).sum();
    match rounds.iter().find_map(|r| r.first_error.as_deref()) {
        Some(first) => format!("{errors} errors, first: {first}"),
        None => "no errors".to_owned(),
    }
}

/// Checks one call each way before measuring: a wrong setup should fail
/// loudly, not produce figures.
async fn check_setup(client: &awc::Client, direct: &str, gateway: &str) -> Result<(), String> {
    for (what, url) in [("direct", direct), ("gateway", gateway)] {
        let mut resp = client
            .post(url)
            .insert_header((CONTENT_TYPE, "application/json"))
            .send_body(chat_body("setup check"))
            .await
            .map_err(|e| format!("{what} {url}: {e}"))?;
        let answer: serde_json::Value = resp
            .json()
            .await
            .map_err(|e| format!("{what} {url}: {e}"))?;
        let content = &answer["choices"][0]["message"]["content"];
        if !resp.status().is_success() || content != "Echo: setup check" {
            return Err(format!(
                "{what} {url}: unexpected answer {} {answer}",
                resp.status()
            ));
        }
    }
    Ok(())
}

async fn run(args: Args, upstream: &ChildServer, gateway: &ChildServer) -> Result<(), String> {
    let client = awc::Client::builder()
        .connector(awc::Connector::new().limit(MAX_IN_FLIGHT))
        .timeout(REQUEST_TIMEOUT)
        .finish();
    let direct_url = upstream.url(fake_upstream::CHAT_COMPLETIONS_PATH);
    let gateway_url = gateway.url(fake_upstream::CHAT_COMPLETIONS_PATH);
    check_setup(&client, &direct_url, &gateway_url).await?;
    let ticks = proc_stats::clock_ticks_per_sec();
    let counter = Cell::new(0u64);

    println!(
        "gateway_bench: load average {} on {} CPUs; open loop {:.0}/s × {} s, closed loop {} \
         requests at concurrency {}; {} alternating rounds, medians",
        proc_stats::load_average(),
        proc_stats::cpus(),
        args.rate,
        args.seconds,
        args.requests,
        CACHED_CONCURRENCY,
        args.rounds,
    );
    println!(
        "processes: fake upstream pid {} at {}, gateway pid {} at {}, load generator pid {}",
        upstream.pid(),
        upstream.addr,
        gateway.pid(),
        gateway.addr,
        std::process::id()
    );

    // --- Added latency, uncached.
    for url in [&direct_url, &gateway_url] {
        open_loop(&client, url, args.rate, WARMUP_SECONDS, &counter).await?;
    }
    let mut gw_cpu = GatewayCpu::new(gateway, ticks);
    let mut direct = Vec::new();
    let mut via = Vec::new();
    let upstream_before = upstream_requests(&client, upstream).await?;
    for _ in 0..args.rounds {
        let round = open_loop(&client, &direct_url, args.rate, args.seconds, &counter);
        direct.push(with_cpu(upstream.pid(), ticks, round).await?);
        let round = open_loop(&client, &gateway_url, args.rate, args.seconds, &counter);
        via.push(gw_cpu.measure(round).await?);
    }
    let upstream_seen = upstream_requests(&client, upstream).await? - upstream_before;
    let direct_calls: usize = direct.iter().map(|r| r.requests).sum();
    let gateway_calls: usize = via.iter().map(|r| r.requests).sum();

    println!();
    println!(
        "uncached: open loop at {:.0} requests/s, every body unique, latency from the scheduled \
         send to the last byte",
        args.rate
    );
    let header = || {
        println!(
            "{:>5}  {:<8} {:>9} {:>9} {:>9}  {:>9} {:>9} {:>6}  {:>9}",
            "round", "path", "p50", "p99", "max", "rate", "lag p99", "errors", "CPU/req"
        )
    };
    let row = |round: &str, path: &str, r: &Round, whose: &str| {
        println!(
            "{:>5}  {:<8} {:>7.0}µs {:>7.0}µs {:>7.0}µs  {:>7.0}/s {:>7.0}µs {:>6}  {:>7.0}µs {}",
            round,
            path,
            us(r.p50),
            us(r.p99),
            us(r.max),
            r.rps,
            us(r.send_lag_p99),
            r.errors,
            r.cpu_per_req.map_or(f64::NAN, us),
            whose,
        )
    };
    header();
    let mut added_p50 = Vec::new();
    let mut added_p99 = Vec::new();
    let mut added_max = Vec::new();
    for (i, (d, g)) in direct.iter().zip(&via).enumerate() {
        added_p50.push(signed_us(g.p50, d.p50));
        added_p99.push(signed_us(g.p99, d.p99));
        added_max.push(signed_us(g.max, d.max));
        let n = (i + 1).to_string();
        row(&n, "direct", d, "(fake)");
        row("", "gateway", g, "(gateway)");
        println!(
            "{:>5}  {:<8} {:>7.0}µs {:>7.0}µs {:>7.0}µs",
            "", "added", added_p50[i], added_p99[i], added_max[i]
        );
    }
    let worst = |v: &[f64]| v.iter().copied().fold(f64::MIN, f64::max);
    let median_added_p99 = median(added_p99.clone());
    let med =
        |rounds: &[Round], f: fn(&Round) -> Duration| us(median(rounds.iter().map(f).collect()));
    let largest = |rounds: &[Round]| rounds.iter().map(|r| us(r.max)).fold(0.0, f64::max);
    println!(
        "{:>5}  {:<8} {:>7.0}µs {:>7.0}µs {:>7.0}µs   (median p50 and p99; max of all rounds)",
        "all",
        "direct",
        med(&direct, |r| r.p50),
        med(&direct, |r| r.p99),
        largest(&direct),
    );
    println!(
        "{:>5}  {:<8} {:>7.0}µs {:>7.0}µs {:>7.0}µs",
        "",
        "gateway",
        med(&via, |r| r.p50),
        med(&via, |r| r.p99),
        largest(&via),
    );
    println!(
        "{:>5}  {:<8} {:>7.0}µs {:>7.0}µs {:>9}   (median over round pairs)",
        "",
        "added",
        median(added_p50.clone()),
        median_added_p99,
        "",
    );
    println!(
        "{:>5}  {:<8} {:>7.0}µs {:>7.0}µs {:>7.0}µs   (worst round pair)",
        "",
        "added",
        worst(&added_p50),
        worst(&added_p99),
        worst(&added_max),
    );
    let cap_waits: u64 = direct.iter().chain(&via).map(|r| r.cap_waits).sum();
    println!(
        "  {}; {cap_waits} sends waited for one of the {MAX_IN_FLIGHT} in-flight slots; the fake \
         saw {upstream_seen} requests for {direct_calls} direct + {gateway_calls} gateway calls{}",
        error_note(&direct.iter().chain(&via).collect::<Vec<_>>()),
        if upstream_seen == (direct_calls + gateway_calls) as u64 {
            " (one each)"
        } else {
            " (expected one each)"
        },
    );
    gw_cpu.print("uncached");

    // --- Cached hits.
    let cached_body = chat_body("gateway bench cached prompt");
    let mut gw_cpu = GatewayCpu::new(gateway, ticks);
    let mut direct = Vec::new();
    let mut via = Vec::new();
    let mut upstream_from_gateway = 0;
    let warm = |url: &str| {
        let (client, body) = (&client, &cached_body);
        let url = url.to_owned();
        async move { closed_loop(client, &url, body, CACHED_CONCURRENCY, WARMUP_REQUESTS).await }
    };
    warm(&direct_url).await;
    let before = upstream_requests(&client, upstream).await?;
    let mut gateway_calls = warm(&gateway_url).await.requests;
    upstream_from_gateway += upstream_requests(&client, upstream).await? - before;
    for _ in 0..args.rounds {
        let round = closed_loop(
            &client,
            &direct_url,
            &cached_body,
            CACHED_CONCURRENCY,
            args.requests,
        );
        direct.push(with_cpu(upstream.pid(), ticks, async { Ok(round.await) }).await?);
        let before = upstream_requests(&client, upstream).await?;
        let round = closed_loop(
            &client,
            &gateway_url,
            &cached_body,
            CACHED_CONCURRENCY,
            args.requests,
        );
        let round = gw_cpu.measure(async { Ok(round.await) }).await?;
        gateway_calls += round.requests;
        via.push(round);
        upstream_from_gateway += upstream_requests(&client, upstream).await? - before;
    }

    println!();
    println!(
        "cached hits: closed loop, {CACHED_CONCURRENCY} callers, one identical body, {} requests \
         per round (gateway: answered from its cache; direct: the fake answers each)",
        args.requests
    );
    println!(
        "{:>5}  {:<8} {:>9} {:>9} {:>9} {:>9} {:>6}  {:>9}",
        "round", "path", "req/s", "p50", "p99", "max", "errors", "CPU/req"
    );
    let row = |round: &str, path: &str, r: &Round, whose: &str| {
        println!(
            "{:>5}  {:<8} {:>9.0} {:>7.0}µs {:>7.0}µs {:>7.0}µs {:>6}  {:>7.0}µs {}",
            round,
            path,
            r.rps,
            us(r.p50),
            us(r.p99),
            us(r.max),
            r.errors,
            r.cpu_per_req.map_or(f64::NAN, us),
            whose,
        )
    };
    for (i, (d, g)) in direct.iter().zip(&via).enumerate() {
        row(&(i + 1).to_string(), "direct", d, "(fake)");
        row("", "gateway", g, "(gateway)");
    }
    let direct_rps = median(direct.iter().map(|r| r.rps).collect());
    let gateway_rps = median(via.iter().map(|r| r.rps).collect());
    for (label, path, rounds, rps, note) in [
        (
            "all",
            "direct",
            &direct,
            direct_rps,
            "   (median req/s, p50 and p99; max of all rounds)",
        ),
        ("", "gateway", &via, gateway_rps, ""),
    ] {
        println!(
            "{:>5}  {:<8} {:>9.0} {:>7.0}µs {:>7.0}µs {:>7.0}µs{note}",
            label,
            path,
            rps,
            med(rounds, |r| r.p50),
            med(rounds, |r| r.p99),
            largest(rounds),
        );
    }
    println!(
        "  gateway cached / direct: {:.2}x the requests/s; {}; the fake saw {} request(s) for {} \
         gateway calls in the cached phase, warm-up included{}",
        gateway_rps / direct_rps,
        error_note(&direct.iter().chain(&via).collect::<Vec<_>>()),
        upstream_from_gateway,
        gateway_calls,
        if upstream_from_gateway <= 1 {
            " (as expected)"
        } else {
            " (expected 1: the cache did not hold)"
        }
    );
    gw_cpu.print("cached");

    println!();
    let verdict = if Duration::from_secs_f64(median_added_p99.max(0.0) / 1e6) <= TARGET_P99_ADDED {
        "met"
    } else {
        "NOT met"
    };
    println!("targets: p99 added <= 0.5 ms uncached");
    println!(
        "  measured: {:.3} ms median over rounds (worst round {:.3} ms): {verdict}; load average \
         now {}",
        median_added_p99 / 1e3,
        worst(&added_p99) / 1e3,
        proc_stats::load_average()
    );
    Ok(())
}

fn main() {
    let mut argv = std::env::args().skip(1);
    let result = match argv.next().as_deref() {
        Some("--serve-upstream") => serve_upstream(),
        Some("--serve-gateway") => match argv.next() {
            Some(upstream) => serve_gateway(&upstream),
            None => Err("--serve-gateway needs the upstream's URL".into()),
        },
        _ => bench(),
    };
    if let Err(e) = result {
        eprintln!("gateway_bench: {e}");
        std::process::exit(1);
    }
}

fn bench() -> Result<(), String> {
    let args = parse_args()?;
    // The guards live until this function returns, so every exit path
    // (errors included) kills the children.
    let upstream = spawn_child(&["--serve-upstream"], &[])?;
    let gateway = spawn_child(
        &["--serve-gateway", &upstream.url("")],
        &[(KEY_ENV, "gateway-bench-key")],
    )?;
    actix_web::rt::System::new().block_on(run(args, &upstream, &gateway))
}
