//! The load generator: N minimal WebSocket clients on one thread, and the
//! counters they share with the orchestrator.
//!
//! Each client is a task on a current-thread runtime: it connects (with at
//! most `--concurrency` handshakes in flight, so the server's listen backlog
//! never overflows into SYN retries), waits for the `welcome` frame, then
//! reads frames until the connection ends, answering pings. For every
//! benchmark frame it checks the sequence number against its `Tally`
//! (8 bytes per client) and records the latency in one shared histogram.
//! Everything is single-threaded, so the shared counters are `Cell`s.

use super::histogram::LatencyHistogram;
use super::payload::{parse_payload, unix_nanos, RUN_MODULUS, WELCOME_PREFIX};
use crate::ws::{self, RecvBuf};
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// The mask on the load generator's pongs (any value is valid).
const MASK: [u8; 4] = [0x5a, 0xa5, 0x3c, 0xc3];
/// One client's connect + handshake + welcome, once it has its turn.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// All N clients connecting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// How often `connect` looks at the counters.
const POLL: Duration = Duration::from_millis(2);

/// What one client has seen of the current run: 8 bytes per client.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    run: u32,
    next: u32,
}

/// Counters every client task updates and the orchestrator reads. Single
/// threaded, so plain `Cell`s.
pub struct Shared {
    // This generation of connections.
    /// Clients that got their welcome frame.
    pub ready: Cell<usize>,
    failed: Cell<usize>,
    /// Clients whose connection ended (the server closed it or an error).
    pub closed: Cell<usize>,
    last_ready: Cell<Option<Instant>>,
    /// The first few distinct reasons clients failed or were closed.
    pub errors: RefCell<Vec<String>>,
    // The current traffic run.
    run: Cell<u32>,
    expect: Cell<u32>,
    tallies: RefCell<Vec<Tally>>,
    /// Clients that have received the run's last sequence number.
    pub complete: Cell<usize>,
    /// Benchmark frames received in this run.
    pub delivered: Cell<u64>,
    /// Frames out of order, duplicated, after a gap, or from another run.
    pub anomalies: Cell<u64>,
    /// The earliest send time seen in this run (unix ns).
    pub first_send_ns: Cell<u64>,
    /// The latest receipt time in this run (unix ns).
    pub last_recv_ns: Cell<u64>,
    /// Receipt minus send time of every frame in this run.
    pub latency: RefCell<LatencyHistogram>,
}

/// How many distinct client errors are kept for the report.
const MAX_ERRORS_KEPT: usize = 5;

impl Default for Shared {
    fn default() -> Self {
        Self::new()
    }
}

impl Shared {
    /// Counters for no clients and no run yet.
    pub fn new() -> Self {
        Shared {
            ready: Cell::new(0),
            failed: Cell::new(0),
            closed: Cell::new(0),
            last_ready: Cell::new(None),
            errors: RefCell::new(Vec::new()),
            run: Cell::new(u32::MAX),
            expect: Cell::new(0),
            tallies: RefCell::new(Vec::new()),
            complete: Cell::new(0),
            delivered: Cell::new(0),
            anomalies: Cell::new(0),
            first_send_ns: Cell::new(u64::MAX),
            last_recv_ns: Cell::new(0),
            latency: RefCell::new(LatencyHistogram::new()),
        }
    }

    fn new_generation(&self, n: usize) {
        self.ready.set(0);
        self.failed.set(0);
        self.closed.set(0);
        self.last_ready.set(None);
        self.errors.borrow_mut().clear();
        *self.tallies.borrow_mut() = vec![Tally::default(); n];
    }

    /// Starts counting traffic run `run`, of `expect` broadcasts: every
    /// counter of the previous run is reset.
    pub fn begin_run(&self, run: u32, expect: u32) {
        self.run.set(run % RUN_MODULUS);
        self.expect.set(expect);
        self.complete.set(0);
        self.delivered.set(0);
        self.anomalies.set(0);
        self.first_send_ns.set(u64::MAX);
        self.last_recv_ns.set(0);
        self.latency.borrow_mut().clear();
    }

    fn note_error(&self, e: String) {
        let mut errors = self.errors.borrow_mut();
        if errors.len() < MAX_ERRORS_KEPT && !errors.contains(&e) {
            errors.push(e);
        }
    }

    /// A benchmark frame arrived at client `idx` at `now_ns`.
    fn on_text(&self, idx: usize, payload: &[u8], now_ns: u64) {
        let Some((run, seq, sent_ns)) = parse_payload(payload) else {
            return; // a control frame, not ours to count
        };
        self.delivered.set(self.delivered.get() + 1);
        if run != self.run.get() {
            self.anomalies.set(self.anomalies.get() + 1);
            return;
        }
        let mut tallies = self.tallies.borrow_mut();
        let Some(tally) = tallies.get_mut(idx) else {
            return;
        };
        if tally.run != run {
            *tally = Tally { run, next: 0 };
        }
        if seq != tally.next {
            // A gap (lost broadcasts) or a duplicate / reordering.
            self.anomalies.set(self.anomalies.get() + 1);
        }
        if seq >= tally.next {
            tally.next = seq + 1;
            if tally.next == self.expect.get() {
                self.complete.set(self.complete.get() + 1);
            }
        }
        self.latency
            .borrow_mut()
            .record(now_ns.saturating_sub(sent_ns));
        self.first_send_ns
            .set(self.first_send_ns.get().min(sent_ns));
        self.last_recv_ns.set(self.last_recv_ns.get().max(now_ns));
    }

    /// Clients of the current generation that did not get run `run` whole.
    pub fn incomplete_clients(&self, run: u32, expect: u32) -> usize {
        self.tallies
            .borrow()
            .iter()
            .filter(|t| !(t.run == run % RUN_MODULUS && t.next == expect))
            .count()
    }
}

/// Connects, upgrades and waits for the welcome frame.
async fn open_client(addr: SocketAddr, gate: &Semaphore) -> Result<(TcpStream, RecvBuf), String> {
    let _turn = gate.acquire().await.map_err(|e| e.to_string())?;
    let (mut stream, mut buf) = ws::upgrade(addr).await?;
    loop {
        let mut answer = Vec::new();
        while let Some(frame) = ws::parse_frame(buf.filled())? {
            let payload = &buf.filled()[frame.payload.clone()];
            match frame.opcode() {
                ws::OP_TEXT if payload.starts_with(WELCOME_PREFIX) => {
                    buf.consume(frame.len);
                    if !answer.is_empty() {
                        let _ = stream.write_all(&answer).await;
                    }
                    return Ok((stream, buf));
                }
                ws::OP_PING => ws::push_pong(&mut answer, payload, MASK),
                ws::OP_CLOSE => return Err("closed before the welcome frame".into()),
                _ => {}
            }
            buf.consume(frame.len);
        }
        if !answer.is_empty() {
            stream.write_all(&answer).await.map_err(|e| e.to_string())?;
        }
        if buf
            .read_from(&mut stream)
            .await
            .map_err(|e| e.to_string())?
            == 0
        {
            return Err("closed before the welcome frame".into());
        }
    }
}

/// Reads frames until the connection ends; returns why it ended.
async fn receive(idx: usize, stream: &mut TcpStream, buf: &mut RecvBuf, shared: &Shared) -> String {
    let mut now_ns = unix_nanos();
    let mut answer = Vec::new();
    loop {
        loop {
            let frame = match ws::parse_frame(buf.filled()) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => return e.to_owned(),
            };
            let payload = &buf.filled()[frame.payload.clone()];
            match frame.opcode() {
                ws::OP_TEXT => shared.on_text(idx, payload, now_ns),
                ws::OP_PING => ws::push_pong(&mut answer, payload, MASK),
                ws::OP_CLOSE => {
                    let code = payload
                        .get(..2)
                        .map_or(0, |c| u16::from_be_bytes([c[0], c[1]]));
                    return format!(
                        "the server closed the connection ({code} {})",
                        String::from_utf8_lossy(payload.get(2..).unwrap_or_default())
                    );
                }
                _ => {} // pong, binary, continuation: the servers send none
            }
            buf.consume(frame.len);
        }
        if !answer.is_empty() {
            if let Err(e) = stream.write_all(&answer).await {
                return format!("writing a pong: {e}");
            }
            answer.clear();
        }
        match buf.read_from(stream).await {
            Ok(0) => return "the server closed the connection".into(),
            Ok(_) => now_ns = unix_nanos(),
            Err(e) => return format!("read: {e}"),
        }
    }
}

/// One client for its whole life.
async fn run_client(idx: usize, addr: SocketAddr, shared: Rc<Shared>, gate: Rc<Semaphore>) {
    let opened = tokio::time::timeout(HANDSHAKE_TIMEOUT, open_client(addr, &gate)).await;
    let (mut stream, mut buf) = match opened {
        Ok(Ok(open)) => open,
        Ok(Err(e)) => {
            shared.failed.set(shared.failed.get() + 1);
            shared.note_error(e);
            return;
        }
        Err(_) => {
            shared.failed.set(shared.failed.get() + 1);
            shared.note_error("handshake timed out".into());
            return;
        }
    };
    shared.ready.set(shared.ready.get() + 1);
    shared.last_ready.set(Some(Instant::now()));
    let why = receive(idx, &mut stream, &mut buf, &shared).await;
    shared.closed.set(shared.closed.get() + 1);
    shared.note_error(why);
}

/// The current generation of client tasks.
pub struct ClientPool {
    addr: SocketAddr,
    shared: Rc<Shared>,
    gate: Rc<Semaphore>,
    tasks: Vec<JoinHandle<()>>,
}

impl ClientPool {
    /// No clients yet; they will connect to `addr` with at most
    /// `concurrency` handshakes in flight and count into `shared`.
    pub fn new(addr: SocketAddr, shared: Rc<Shared>, concurrency: usize) -> Self {
        ClientPool {
            addr,
            shared,
            gate: Rc::new(Semaphore::new(concurrency)),
            tasks: Vec::new(),
        }
    }

    /// Starts `n` clients and waits until each has its welcome; returns how
    /// long it took until the last one had it.
    pub async fn connect(&mut self, n: usize) -> Result<Duration, String> {
        self.disconnect_all();
        self.shared.new_generation(n);
        let start = Instant::now();
        for idx in 0..n {
            self.tasks.push(tokio::task::spawn_local(run_client(
                idx,
                self.addr,
                self.shared.clone(),
                self.gate.clone(),
            )));
        }
        let s = &self.shared;
        while s.ready.get() + s.failed.get() < n {
            if start.elapsed() > CONNECT_TIMEOUT {
                return Err(format!(
                    "only {} of {n} clients connected within {CONNECT_TIMEOUT:?}",
                    s.ready.get()
                ));
            }
            tokio::time::sleep(POLL).await;
        }
        if s.failed.get() > 0 {
            return Err(format!(
                "{} of {n} clients failed to connect: {}",
                s.failed.get(),
                s.errors.borrow().join("; ")
            ));
        }
        let last = s.last_ready.get().unwrap_or(start);
        Ok(last.duration_since(start))
    }

    /// Drops every client's socket (the tasks stop at once; the server sees
    /// the connections close).
    pub fn disconnect_all(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}

impl Drop for ClientPool {
    fn drop(&mut self) {
        self.disconnect_all();
    }
}
