//! Run with: cargo run --release --example upstream_bench [-- --requests 20000 --rounds 5]
//!
//! What the resilience pipeline costs. The fake upstream runs in a child
//! process (this binary re-executed with `--serve`), so its CPU is not ours.
//! In this process the same GET is made two ways, in alternating rounds:
//!
//! - **raw awc**: one `awc::Client` with a connection pool, on this thread —
//!   the baseline;
//! - **HttpClient**: `happynet`'s `ApiClient` — rate limiter, circuit breaker
//!   and pool actors (on their own arbiter), retry policy and deadline.
//!
//! - **awc behind one thread hop**: raw awc on another arbiter, reached with
//!   one spawn and one reply — the floor under any design that keeps the pool
//!   on its own thread, as awc's `!Send` client requires;
//!
//! at concurrency 1 and 64. Each round sends `--requests` requests (after a
//! warm-up); the figures are the medians over `--rounds` rounds of
//! requests/s and of the p50 and p99 latency, then the pipeline's cost:
//! throughput lost (%) and added p99 (µs). Targets: ≤ 10 % and ≤ 50 µs.

#![allow(clippy::unwrap_used, missing_docs)]

use futures::future::join_all;
use happynet::{Config, Network};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};
use testkit::fake_upstream;

#[global_allocator]
static GLOBAL: testkit::alloc::Chosen = testkit::alloc::CHOSEN;

const CONCURRENCIES: [usize; 2] = [1, 64];
const WARMUP: usize = 2_000;

struct Args {
    requests: usize,
    rounds: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        requests: 20_000,
        rounds: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|v| *v > 0)
                .ok_or_else(|| format!("{name} needs a positive number"))
        };
        match flag.as_str() {
            "--requests" => args.requests = value("--requests")?,
            "--rounds" => args.rounds = value("--rounds")?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

/// The fake upstream's process; killed when dropped.
struct Upstream {
    child: Child,
    url: String,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_upstream() -> Upstream {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg("--serve")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the fake upstream");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("the fake upstream prints its address");
    Upstream {
        child,
        url: format!("http://{}", line.trim()),
    }
}

fn serve() {
    actix_web::rt::System::new().block_on(async {
        let fake = fake_upstream::FakeUpstream::start("bench", fake_upstream::Faults::default())
            .await
            .expect("start the fake upstream");
        println!("{}", fake.addr);
        // Runs until the parent kills it (bounded: at most an hour).
        actix_web::rt::time::sleep(Duration::from_secs(3600)).await;
    });
}

#[derive(Clone, Copy)]
enum Mode {
    RawAwc,
    /// Raw awc on another arbiter: one cross-thread round trip per call, the
    /// floor under any design that keeps the pool on its own thread.
    HopAwc,
    Pipeline,
}

thread_local! {
    /// The hop arbiter's awc client (awc clients cannot move between threads).
    static HOP_CLIENT: awc::Client = awc::Client::builder()
        .connector(awc::Connector::new().limit(128))
        .finish();
}

async fn hop_call(arbiter: &actix::ArbiterHandle, url: &str) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let url = url.to_owned();
    // spawn_fn: the closure crosses threads; the awc future it starts
    // (which is !Send) never does.
    arbiter.spawn_fn(move || {
        actix_web::rt::spawn(async move {
            let client = HOP_CLIENT.with(|c| c.clone());
            let mut resp = client.get(url).send().await.expect("hop awc call");
            let _ = resp.body().await.expect("hop awc body");
            let _ = tx.send(resp.status().is_success());
        });
    });
    assert!(rx.await.expect("hop reply"));
}

struct Round {
    rps: f64,
    p50: Duration,
    p99: Duration,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

async fn run(
    mode: Mode,
    concurrency: usize,
    requests: usize,
    awc_client: &awc::Client,
    api: &happynet::ApiClient,
    hop: &actix::ArbiterHandle,
    url: &str,
) -> Round {
    let per_worker = requests / concurrency;
    let started = Instant::now();
    let latencies = join_all((0..concurrency).map(|_| async move {
        let mut lat = Vec::with_capacity(per_worker);
        for _ in 0..per_worker {
            let t = Instant::now();
            match mode {
                Mode::RawAwc => {
                    let mut resp = awc_client.get(url).send().await.expect("raw awc call");
                    let _ = resp.body().await.expect("raw awc body");
                    assert!(resp.status().is_success());
                }
                Mode::HopAwc => hop_call(hop, url).await,
                Mode::Pipeline => {
                    let resp = api.get("/bench").send().await.expect("pipeline call");
                    assert!(resp.status.is_success());
                }
            }
            lat.push(t.elapsed());
        }
        lat
    }))
    .await;
    let elapsed = started.elapsed();
    let mut all: Vec<Duration> = latencies.into_iter().flatten().collect();
    all.sort_unstable();
    Round {
        rps: all.len() as f64 / elapsed.as_secs_f64(),
        p50: percentile(&all, 0.50),
        p99: percentile(&all, 0.99),
    }
}

fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--serve") {
        return serve();
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("upstream_bench: {e}");
            std::process::exit(2);
        }
    };
    let upstream = spawn_upstream();
    let url = upstream.url.clone();
    actix_web::rt::System::new().block_on(async move {
        let config = Config::from_json_str(&format!(
            r#"{{"network":{{"api_clients":{{"bench":{{"base_url":"{url}",
                "rate_limit":1e9,"max_connections":128,
                "bulkhead":{{"max_in_flight":128,"max_queue":1024}}}}}}}}}}"#
        ))
        .unwrap();
        let net = Network::start(config).unwrap();
        let api = net.api("bench").unwrap();
        let awc_client = Rc::new(
            awc::Client::builder()
                .connector(awc::Connector::new().limit(128))
                .finish(),
        );
        let target = format!("{url}/bench");
        let hop_arbiter = actix::Arbiter::new();
        let hop = hop_arbiter.handle();

        println!(
            "upstream_bench: {} requests per round, {} rounds, medians; load {}",
            args.requests,
            args.rounds,
            std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
        );
        println!(
            "{:>4}  {:>10} {:>9} {:>9}   {:>10} {:>9} {:>9}   {:>10} {:>11}",
            "conc", "awc rps", "awc p50", "awc p99", "pipe rps", "pipe p50", "pipe p99",
            "rps lost", "p99 added"
        );
        for concurrency in CONCURRENCIES {
            // Warm both paths: connections open, caches hot.
            run(Mode::RawAwc, concurrency, WARMUP, &awc_client, &api, &hop, &target).await;
            run(Mode::Pipeline, concurrency, WARMUP, &awc_client, &api, &hop, &target).await;
            run(Mode::HopAwc, concurrency, WARMUP, &awc_client, &api, &hop, &target).await;
            let mut raw = Vec::new();
            let mut hopped = Vec::new();
            let mut pipe = Vec::new();
            for _ in 0..args.rounds {
                hopped.push(run(Mode::HopAwc, concurrency, args.requests, &awc_client, &api, &hop, &target).await);
                raw.push(run(Mode::RawAwc, concurrency, args.requests, &awc_client, &api, &hop, &target).await);
                pipe.push(run(Mode::Pipeline, concurrency, args.requests, &awc_client, &api, &hop, &target).await);
            }
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            let raw_rps = median(raw.iter().map(|r| r.rps).collect());
            let raw_p50 = median(raw.iter().map(|r| r.p50).collect());
            let raw_p99 = median(raw.iter().map(|r| r.p99).collect());
            let hop_p50 = median(hopped.iter().map(|r| r.p50).collect());
            let hop_p99 = median(hopped.iter().map(|r| r.p99).collect());
            let hop_rps = median(hopped.iter().map(|r| r.rps).collect());
            let pipe_rps = median(pipe.iter().map(|r| r.rps).collect());
            let pipe_p50 = median(pipe.iter().map(|r| r.p50).collect());
            let pipe_p99 = median(pipe.iter().map(|r| r.p99).collect());
            println!(
                "{:>4}  {:>10.0} {:>7.0}µs {:>7.0}µs   {:>10.0} {:>7.0}µs {:>7.0}µs   {:>9.1}% {:>9.0}µs",
                concurrency,
                raw_rps,
                us(raw_p50),
                us(raw_p99),
                pipe_rps,
                us(pipe_p50),
                us(pipe_p99),
                (1.0 - pipe_rps / raw_rps) * 100.0,
                us(pipe_p99) - us(raw_p99),
            );
            println!(
                "      floor: raw awc behind one thread hop: {:.0} rps, p50 {:.0}µs, p99 {:.0}µs \
                 (pipeline vs floor: {:.1}% rps lost, {:.0}µs p99 added)",
                hop_rps,
                us(hop_p50),
                us(hop_p99),
                (1.0 - pipe_rps / hop_rps) * 100.0,
                us(pipe_p99) - us(hop_p99),
            );
        }
        println!("targets: rps lost <= 10%, p99 added <= 50µs");
    });
    drop(upstream);
}
