//! Run with: cargo run --release --example history_bench [-- --messages 1000 --repeat 21]
//!
//! How long a client that reconnects takes to recover what it missed: a
//! real happynet server on `127.0.0.1:0` (in this process, 2 workers), a
//! room with `--messages` broadcasts of 64 bytes in its history, and a raw
//! protocol client ([`testkit::ws::RawWsClient`]) that connects with
//! `/ws?room=…&since=<epoch>:0` and reads until the last replayed message.
//! The time is from before the TCP connect to the last message read, so it
//! includes the handshake; the baseline, measured in the same run, is the
//! same connect without `since` (up to the `welcome` frame), and the figure
//! to read is the difference. Every run checks the replay: `recovered` says
//! complete with N replayed, then offsets 1..=N in order, each once.
//! Medians of `--repeat` runs (odd, so the median is a run).
//!
//! `--cluster`: two nodes (both in this process) on a `redis-server` child
//! of their own; the messages are broadcast on node A, numbered by Redis,
//! and the client recovers on node B (once B's history has the last one),
//! which is what a client that reconnects to another node costs.

use happynet::{Broadcast, Config, Network, RoomName};
use std::time::{Duration, Instant};
use testkit::bench::median;
use testkit::ws::{RawWsClient, OP_TEXT, PROTOCOL_HEADER};

/// A receive buffer that never makes the server wait.
const RCVBUF: u32 = 4 << 20;

fn arg(name: &str, default: usize) -> usize {
    let argv: Vec<String> = std::env::args().collect();
    argv.iter()
        .position(|a| a == name)
        .and_then(|i| argv.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The next text frame, as JSON.
async fn next_json(c: &mut RawWsClient) -> Result<serde_json::Value, String> {
    loop {
        let frame = c.read_frame().await.ok_or("closed")?;
        if frame.opcode() == OP_TEXT {
            return serde_json::from_slice(&frame.payload).map_err(|e| e.to_string());
        }
    }
}

/// Connects with `query` and reads the `welcome`; then, when `replay` is
/// set, the `recovered` frame and that many messages, checked.
async fn connect(
    addr: std::net::SocketAddr,
    query: &str,
    replay: Option<u64>,
) -> Result<(), String> {
    let mut c = RawWsClient::connect_with(addr, query, RCVBUF, &[PROTOCOL_HEADER]).await;
    let welcome = next_json(&mut c).await?;
    if welcome["type"] != "welcome" {
        return Err(format!("expected the welcome, got {welcome}"));
    }
    let Some(n) = replay else {
        return Ok(());
    };
    let recovered = next_json(&mut c).await?;
    if recovered["complete"] != true || recovered["replayed"] != n {
        return Err(format!("expected {n} replayed, got {recovered}"));
    }
    for offset in 1..=n {
        let m = next_json(&mut c).await?;
        if m["offset"] != offset {
            return Err(format!("expected offset {offset}, got {m}"));
        }
    }
    Ok(())
}

/// A node serving `config` on 127.0.0.1:0 (2 workers): its network, its
/// address and the handle that stops it.
fn serve(config: Config) -> (Network, std::net::SocketAddr, actix_web::dev::ServerHandle) {
    let net = Network::start(config).expect("network");
    let routes = net.configure();
    let server =
        actix_web::HttpServer::new(move || actix_web::App::new().configure(routes.clone()))
            .workers(2)
            .on_connect(net.on_connect())
            .disable_signals()
            .bind(("127.0.0.1", 0))
            .expect("bind");
    let addr = server.addrs()[0];
    let handle = server.run();
    let stop = handle.handle();
    actix_web::rt::spawn(handle);
    (net, addr, stop)
}

#[actix_web::main]
async fn main() -> std::process::ExitCode {
    let messages = arg("--messages", 1000).max(1);
    let repeat = arg("--repeat", 21).max(1) | 1;
    let cluster = std::env::args().any(|a| a == "--cluster");
    let redis = cluster.then(testkit::redis_server::RedisServer::start);
    let cluster_json = redis.as_ref().map_or(String::new(), |r| {
        format!(
            r#","cluster":{{"redis_url":"{}","presence_interval_ms":0}}"#,
            r.url()
        )
    });
    let config = || {
        Config::from_json_str(&format!(
            r#"{{"network":{{"websocket":{{"presence_interval":0,"history":{{"size":{messages}}}}}{cluster_json}}}}}"#
        ))
        .expect("config")
    };
    // Node A publishes; the client recovers on node B (the same node
    // without --cluster).
    let (net, addr, stop) = serve(config());
    let other = cluster.then(|| serve(config()));
    let (reader_net, addr) = match &other {
        Some((net_b, addr_b, _)) => (net_b, *addr_b),
        None => (&net, addr),
    };
    if let Some(cluster) = net.cluster() {
        // Linked (and backfilled) before the first message.
        for _ in 0..500 {
            let linked = cluster
                .send(happynet::cluster::GetClusterStats)
                .await
                .is_ok_and(|s| s.link_up);
            if linked {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    let hub = net.hub();
    let mut recover_ms = Vec::new();
    let mut connect_ms = Vec::new();
    for run in 0..repeat {
        let room = RoomName::new(&format!("room-{run}")).expect("room");
        for i in 0..messages {
            hub.do_send(Broadcast::to_room(room.clone(), format!("{i:0>64}")));
        }
        // On the node the client recovers on: every message has arrived.
        let mut page = None;
        for _ in 0..1000 {
            let p = reader_net
                .history(room.clone(), None, 1)
                .await
                .expect("the hub answers");
            if p.last.as_ref().is_some_and(|l| l.offset == messages as u64) {
                page = Some(p);
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let Some(last) = page.and_then(|p| p.last) else {
            eprintln!("!! the history never had all {messages}");
            return std::process::ExitCode::FAILURE;
        };
        // Baseline and measurement alternate which goes first.
        let plain = format!("?room=other-{run}");
        let since = format!("?room={room}&since={}:0", last.epoch);
        for first in [run % 2 == 0, run % 2 == 1] {
            let t = Instant::now();
            let result = if first {
                connect(addr, &since, Some(messages as u64)).await
            } else {
                connect(addr, &plain, None).await
            };
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if let Err(e) = result {
                eprintln!("!! run {run}: {e}");
                return std::process::ExitCode::FAILURE;
            }
            if first {
                recover_ms.push(ms);
            } else {
                connect_ms.push(ms);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recover = median(recover_ms.iter().copied());
    let baseline = median(connect_ms.iter().copied());
    let worst = recover_ms.iter().copied().fold(0.0, f64::max);
    println!(
        "{}recover {messages} messages: median {recover:.2} ms (max {worst:.2}) over {repeat} runs; \
         connect without recovery: median {baseline:.2} ms; recovery itself {:.2} ms (target <= 50 ms)",
        if cluster { "across nodes (broadcast on A, recovered on B): " } else { "" },
        recover - baseline
    );
    if let Some((_, _, stop_b)) = other {
        stop_b.stop(true).await;
    }
    stop.stop(true).await;
    std::process::ExitCode::SUCCESS
}
