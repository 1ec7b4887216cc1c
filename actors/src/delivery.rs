//! How a broadcast's frame gets from the hub's shard to a session's socket:
//! encoded once, queued without a message, written in batches.
//!
//! actix-web-actors writes only what a session's handlers put in its
//! `WebsocketContext`, one message at a time, each encoded again for each
//! session and each carried in a mailbox envelope with a wake of its own.
//! For a broadcast to thousands of sessions that is most of the work. So
//! data takes another road, around the actor:
//! - the shard encodes each broadcast's frame once ([`encode`]: server frames
//!   are unmasked, so every session sends the very same bytes) and pushes a
//!   reference-counted handle to it into each member's [`DeliveryQueue`];
//! - the queue wakes the session's connection task only if it is not awake
//!   already, so a burst of broadcasts costs one wake, not one per message;
//! - the upgrade response's body ([`Outbound`]) takes everything queued at
//!   once each time the HTTP layer polls it and hands it over frame by
//!   frame (the HTTP layer copies them into its write buffer and writes
//!   them with one `write()`), at most [`PASS_BYTES`] per pass (see
//!   below).
//!
//! The session's own frames (pings, pongs, error frames, the close frame)
//! still go through its `WebsocketContext`, which [`Outbound`] polls too, so
//! the actor runs as before. Order: each poll first takes what the queue
//! holds and then polls the context, so a close frame is always behind
//! every frame queued before the session decided to close (the session's
//! `Flush` waits for exactly those); once the close is out, the queue is
//! closed and later pushes are refused.
//!
//! **Memory per idle session.** actix-http's dispatcher copies whatever the
//! body yields into its write buffer until that holds
//! `h1_write_buffer_size` (32 KiB by default), and a buffer that grew keeps
//! its size until it exceeds 128 KiB: a burst of broadcasts would leave
//! every session that took it with a write buffer of 32 KiB or more for
//! the rest of its life. So [`Outbound`] hands over at most
//! [`PASS_BYTES`] between two `Pending`s (splitting a larger frame, which
//! costs a reference count, not a copy) and then wakes itself: a pass
//! that starts with the write buffer flushed fits it at its initial 8 KiB.
//! (One that starts with unwritten bytes, a client slow to read, can still
//! grow it: see `src/realtime/websocket.rs` in the `happynet` crate for the
//! bound and the evidence.) And a drained queue gives its storage back
//! ([`crate::capacity::release_drained`]): a burst's room is not kept.
//!
//! **Written straight to the socket (plain TCP).** Even so, each delivery
//! at a fixed rate cost a wake of the session's connection task and a poll
//! of actix-http's dispatcher, its service layers and this body, just to
//! reach one `write()`: at 1,000 clients × 50/s, three quarters of the
//! server's user-space time per delivery. The server's `on_connect` hook
//! keeps a duplicate of every plain TCP socket, so a body built
//! [`Outbound::with_direct`] hands actix-http nothing at all:
//! - its first poll comes while actix-http still holds the `101` head; it
//!   hands over nothing and asks to be polled again, and from its second
//!   poll on, actix-http has written the head (see [`Outbound::with_direct`]
//!   for why that write is always whole) and holds no byte of the
//!   connection, so the socket is the queue's to write;
//! - the shard pushes frames without waking anyone ([`Pushed::Flush`] says
//!   when a queue goes from empty to not), and once it has handled every
//!   message in its mailbox it writes each such queue with one `send`
//!   (`writev` for several frames) from its own task
//!   (`HubShard::flush_queues`): no session's task is woken, and a burst of
//!   broadcasts is still one write per session;
//! - a write that would block (the client reads slowly) leaves the rest to
//!   the body: the queue is `blocked`, the shard only queues, and the body
//!   waits for the socket to drain (a readiness registration of its own on
//!   the duplicate, made the first time) and writes it all, in order; then
//!   the shard writes again;
//! - the session's own frames come out of its context into the same queue,
//!   behind everything queued before them, and the body ends only once
//!   the queue, the close frame last, is in the socket.
//!
//! Over TLS (or with no socket) the body hands frames over as above.
//!
//! Bounded as before: the shard charges each frame to the session's byte
//! budget ([`crate::liveness::OutboundBudget`]) and the queue holds at most
//! `max_frames`; either limit reached means a slow consumer. Since the
//! queue is filled while the body is not polled (a client that stops
//! reading), both limits are what evicts it.

use crate::capacity::release_drained;
use crate::liveness::SessionLink;
use crate::messages::Payload;
use actix_http::ws::{OpCode, Parser};
use actix_web::web::{Bytes, BytesMut};
use futures::task::AtomicWaker;
use futures::Stream;
use socket2::Socket;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// The most [`Outbound`] hands the HTTP layer in one pass (from a poll to
/// the `Pending` that ends it): actix-http's initial write buffer (8 KiB,
/// `HW_BUFFER_SIZE` in actix-http's `h1/dispatcher.rs`) less room for the
/// `101` response head, which is in that buffer during the first pass.
pub const PASS_BYTES: usize = 7 * 1024;

/// One encoded frame, ready for the socket, with what it was charged.
#[derive(Debug, Clone)]
pub struct Frame {
    bytes: Bytes,
    cost: usize,
}

impl Frame {
    /// The encoded frame of `payload` (a final, unmasked text or binary
    /// frame), charged `cost` against the session's budget.
    pub fn new(bytes: Bytes, cost: usize) -> Self {
        Frame { bytes, cost }
    }

    /// What the frame was charged.
    pub fn cost(&self) -> usize {
        self.cost
    }
}

/// `payload` as one final server frame (unmasked), header and all.
pub fn encode(payload: &Payload) -> Bytes {
    let (op, bytes) = match payload {
        Payload::Text(t) => (OpCode::Text, t.as_bytes().clone()),
        Payload::Binary(b) => (OpCode::Binary, b.clone()),
    };
    // The header is at most 10 bytes for an unmasked frame.
    let mut out = BytesMut::with_capacity(bytes.len() + 10);
    Parser::write_message(&mut out, bytes, op, true, false);
    out.freeze()
}

/// Why a push was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `max_frames` are queued: the session is not being written.
    Full,
    /// The session's output has ended (it closed, or is closing).
    Closed,
}

#[derive(Debug, Default)]
struct Queued {
    frames: VecDeque<Frame>,
    closed: bool,
    writer: Writer,
}

/// Who writes a session's queued frames to its socket.
#[derive(Debug, Default)]
enum Writer {
    /// Its response body hands them to actix-http, which writes them: over
    /// TLS, without a socket, and until the body has seen the `101` out.
    #[default]
    Body,
    /// They are written straight to the socket's duplicate (see
    /// [`Outbound::with_direct`]): by the shard once per pass over its
    /// mailbox, and, once a write would block (`blocked`), by the body,
    /// when the socket is writable again.
    Direct { socket: Arc<Socket>, blocked: bool },
}

/// What a push asks of the shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Nothing: the writer has it (the body was woken, or a flush is
    /// pending already, or the body writes once the socket drains).
    Queued,
    /// The queue was empty and is written straight to the socket: the
    /// shard is to flush it ([`DeliveryQueue::write_direct`]) once its
    /// pass is over.
    Flush,
}

/// How a direct write ended.
#[derive(Debug)]
pub enum WriteOutcome {
    /// The queue is not written directly (or is the body's to write now).
    NotMine,
    /// Everything queued is in the socket.
    Done,
    /// The socket is full: the body writes the rest when it drains.
    Blocked,
    /// The write failed (the peer is gone): the body reports it.
    Failed(io::Error),
}

/// The most frames one direct write gathers (well under `IOV_MAX`).
const MAX_IOV: usize = 64;

/// `send` flags for a direct write: never block (the duplicate shares the
/// socket's non-blocking mode, but a direct write must not depend on it)
/// and never raise `SIGPIPE` (an app may not ignore it; Rust binaries do).
#[cfg(any(target_os = "linux", target_os = "android"))]
const SEND_FLAGS: i32 = 0x40 /* MSG_DONTWAIT */ | 0x4000 /* MSG_NOSIGNAL */;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const SEND_FLAGS: i32 = 0;

/// The frames queued for one session's socket: pushed by its shard, taken
/// by its response body ([`Outbound`]). Shared through the
/// [`SessionLink`]; both sides run on the same thread, so the lock is never
/// contended and the wake is a local one.
#[derive(Debug)]
pub struct DeliveryQueue {
    queued: Mutex<Queued>,
    waker: AtomicWaker,
    max_frames: usize,
}

fn lock(m: &Mutex<Queued>) -> MutexGuard<'_, Queued> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl DeliveryQueue {
    /// A queue that holds up to `max_frames` frames.
    pub fn new(max_frames: usize) -> Self {
        DeliveryQueue {
            queued: Mutex::new(Queued::default()),
            waker: AtomicWaker::new(),
            max_frames: max_frames.max(1),
        }
    }

    /// Queues `frame` and wakes the writer. `bounded` is false for a
    /// session whose body has not been polled yet (registered before its
    /// `101`): then only the byte budget bounds it, as the module docs say.
    ///
    /// The wake costs one task wake per burst, not per frame: the body's
    /// waker is registered once per poll and `AtomicWaker::wake` takes it,
    /// so the pushes after the first find none to wake until the body has
    /// run.
    ///
    /// When the queue is written directly, a push wakes nobody: it says
    /// [`Pushed::Flush`] if the shard is to write it (see
    /// [`Outbound::with_direct`]).
    pub fn push(&self, frame: Frame, bounded: bool) -> Result<Pushed, Refused> {
        {
            let mut q = lock(&self.queued);
            if q.closed {
                return Err(Refused::Closed);
            }
            if bounded && q.frames.len() >= self.max_frames {
                return Err(Refused::Full);
            }
            let was_empty = q.frames.is_empty();
            q.frames.push_back(frame);
            match q.writer {
                Writer::Direct { blocked: false, .. } if was_empty => return Ok(Pushed::Flush),
                Writer::Direct { .. } => return Ok(Pushed::Queued),
                Writer::Body => {}
            }
        }
        self.waker.wake();
        Ok(Pushed::Queued)
    }

    /// Wakes the body (after a direct write by the shard blocked or
    /// failed: the body takes over).
    pub fn wake_writer(&self) {
        self.waker.wake();
    }

    /// Writes what is queued straight to the socket, as many frames per
    /// `send` as it takes, and returns what the written frames were
    /// charged and how it ended. `by_body`: the body may write while the
    /// queue is blocked (it is the one waiting for the socket), the shard
    /// may not.
    pub fn write_direct(&self, by_body: bool) -> (usize, WriteOutcome) {
        let mut q = lock(&self.queued);
        let Queued { frames, writer, .. } = &mut *q;
        let Writer::Direct { socket, blocked } = writer else {
            return (0, WriteOutcome::NotMine);
        };
        if *blocked && !by_body {
            return (0, WriteOutcome::NotMine);
        }
        let mut released = 0;
        loop {
            if frames.is_empty() {
                *blocked = false;
                release_drained(frames);
                return (released, WriteOutcome::Done);
            }
            let (sent, asked) = if frames.len() == 1 {
                let only = &frames[0].bytes;
                (socket.send_with_flags(only, SEND_FLAGS), only.len())
            } else {
                let slices: Vec<IoSlice<'_>> = frames
                    .iter()
                    .take(MAX_IOV)
                    .map(|f| IoSlice::new(&f.bytes))
                    .collect();
                let asked = slices.iter().map(|s| s.len()).sum();
                (socket.send_vectored_with_flags(&slices, SEND_FLAGS), asked)
            };
            match sent {
                Ok(mut n) => {
                    let short = n < asked;
                    while n > 0 {
                        let Some(front) = frames.front_mut() else {
                            break;
                        };
                        if front.bytes.len() <= n {
                            n -= front.bytes.len();
                            released += front.cost;
                            frames.pop_front();
                        } else {
                            // Its cost is released once all of it is out.
                            let _ = front.bytes.split_to(n);
                            n = 0;
                        }
                    }
                    if short {
                        // The socket took less than offered: it is full.
                        *blocked = true;
                        return (released, WriteOutcome::Blocked);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    *blocked = true;
                    return (released, WriteOutcome::Blocked);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    *blocked = true;
                    return (released, WriteOutcome::Failed(e));
                }
            }
        }
    }

    /// From now on the queue is written straight to `socket` (the body
    /// writes first: it is blocked until the body's first write).
    fn arm_direct(&self, socket: Arc<Socket>) {
        lock(&self.queued).writer = Writer::Direct {
            socket,
            blocked: true,
        };
    }

    /// Queues one of the session's own chunks (a ping, a pong, an error or
    /// the close frame) behind every frame queued before it, in direct
    /// mode: never refused for room (the session makes few), but nothing
    /// follows the close.
    fn push_own(&self, chunk: Bytes) {
        let mut q = lock(&self.queued);
        if !q.closed {
            q.frames.push_back(Frame::new(chunk, 0));
        }
    }

    /// Refuses every later push, keeping what is queued (direct mode: the
    /// close frame is the last of it).
    fn close_behind(&self) {
        lock(&self.queued).closed = true;
    }

    /// Takes everything queued into `into` (an empty deque: a swap, which
    /// leaves the queue `into`'s storage; the body frees it once drained,
    /// so what the queue keeps is small).
    fn take_all(&self, into: &mut VecDeque<Frame>) {
        let mut q = lock(&self.queued);
        if into.is_empty() {
            std::mem::swap(&mut q.frames, into);
        } else {
            into.extend(q.frames.drain(..));
        }
        release_drained(&mut q.frames);
    }

    /// Refuses every later push and drops what is queued; returns what the
    /// dropped frames were charged.
    fn close(&self) -> usize {
        let mut q = lock(&self.queued);
        q.closed = true;
        let dropped = q.frames.drain(..).map(|f| f.cost).sum();
        // Nothing is queued again: no room is kept.
        q.frames = VecDeque::new();
        dropped
    }

    /// How many frames the queue has room for without growing.
    pub fn capacity(&self) -> usize {
        lock(&self.queued).frames.capacity()
    }
}

/// The waker [`Outbound`] polls the session's context with: it notes that
/// the context has something to do and wakes the body's task (through the
/// delivery queue's waker, which the body registers on every poll).
///
/// Why not poll the context on every poll of the body: a frame delivered at
/// a fixed rate costs the body two polls (the one that hands it over and
/// the one that finds nothing more), and polling the actor's context (its
/// mailbox, its inbound stream, its items) in both was a good part of what
/// a delivery cost beyond the `write()`. The context's output only changes
/// when something woke it, so the body polls it only then.
#[derive(Debug)]
struct ContextWake {
    /// Set by a wake, cleared just before the context is polled (so a wake
    /// during that poll is not lost). Starts set: the context has not been
    /// polled yet.
    woken: AtomicBool,
    link: Arc<SessionLink>,
}

impl Wake for ContextWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.link.queue().waker.wake();
    }
}

/// The upgrade response's body: the session's `WebsocketContext` output
/// (`inner`) merged with its [`DeliveryQueue`], in the order the module
/// docs give.
pub struct Outbound<S, E> {
    inner: Option<S>,
    link: Arc<SessionLink>,
    /// What `inner` is polled with (see [`ContextWake`]).
    inner_wake: Arc<ContextWake>,
    inner_waker: Waker,
    /// Taken from the queue, not yet handed over.
    ready: VecDeque<Frame>,
    /// The context's chunk, held behind `ready`.
    held: Option<Bytes>,
    /// The context's output ended with this (an error, or `None`).
    ended: Option<Option<E>>,
    /// Bytes handed over in this pass, at most [`PASS_BYTES`].
    this_pass: usize,
    /// Plain TCP: the body writes to the socket itself ([`Outbound::with_direct`]).
    direct: Option<Direct<E>>,
}

/// A body that writes straight to the socket: where it is.
struct Direct<E> {
    socket: Arc<Socket>,
    /// Whether the first poll, which leaves actix-http to write the `101`,
    /// is behind it.
    armed: bool,
    /// Whether the queue is written directly yet (from the second poll on).
    writing: bool,
    /// Registered with the runtime the first time a write blocks: how the
    /// body learns that the socket drained.
    writable: Option<AsyncFd<Arc<Socket>>>,
    /// How a failed write becomes the body's error.
    error: fn(io::Error) -> E,
}

/// What polling the session's context gave ([`Outbound::poll_context`]).
enum Polled {
    /// A chunk of its output (frames it wrote: pongs, the close frame).
    Chunk(Bytes),
    /// Its output ended (kept in `ended`).
    Ended,
    /// Nothing now, or it was not polled (nothing woke it).
    Nothing,
}

impl<S, E> Outbound<S, E> {
    /// The body for a session whose link is `link` and whose context's
    /// output is `inner`.
    pub fn new(link: Arc<SessionLink>, inner: S) -> Self {
        let inner_wake = Arc::new(ContextWake {
            woken: AtomicBool::new(true),
            link: link.clone(),
        });
        Outbound {
            inner: Some(inner),
            link,
            inner_waker: Waker::from(inner_wake.clone()),
            inner_wake,
            ready: VecDeque::new(),
            held: None,
            ended: None,
            this_pass: 0,
            direct: None,
        }
    }

    /// Writes to `socket` (a duplicate of the connection's plain TCP
    /// socket) itself, instead of handing its frames to actix-http: see
    /// the module docs. The shard then writes a session's frames with one
    /// `send` per pass over its mailbox, and no task is woken for it.
    ///
    /// Why the socket is the body's from its second poll on: the first
    /// comes before actix-http has written the `101` head it holds, and
    /// asks for a second, which comes after actix-http's write of the head.
    /// That write is whole: a few hundred bytes to a socket that has sent
    /// nothing yet always fit (its send buffer is empty, and Linux charges
    /// the first buffer of an empty socket even under memory pressure), so
    /// actix-http holds none of the connection's bytes from then on, and
    /// never gets any more.
    pub fn with_direct(mut self, socket: Arc<Socket>) -> Self
    where
        E: From<io::Error>,
    {
        self.direct = Some(Direct {
            socket,
            armed: false,
            writing: false,
            writable: None,
            error: E::from,
        });
        self
    }

    /// How many frames the body has room for, taken from the queue and
    /// not yet handed over.
    pub fn capacity(&self) -> usize {
        self.ready.capacity()
    }

    fn close_queue(&mut self) {
        let dropped = self.link.queue().close();
        if dropped > 0 {
            self.link.release(dropped);
        }
    }
}

impl<S, E> Outbound<S, E>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Unpin,
{
    /// [`Stream::poll_next`] for a body that writes to the socket itself:
    /// it hands actix-http nothing, and ends once everything queued,
    /// the close frame last, is in the socket.
    fn poll_direct(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, E>>> {
        let Some(direct) = self.direct.as_mut() else {
            return Poll::Pending;
        };
        if !direct.armed {
            // Before actix-http's write of the `101` head: nothing may
            // reach the socket ahead of it (see `with_direct`).
            direct.armed = true;
            self.link.queue().waker.register(cx.waker());
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if !direct.writing {
            direct.writing = true;
            self.link.queue().arm_direct(direct.socket.clone());
        }
        loop {
            self.link.queue().waker.register(cx.waker());
            match self.poll_context() {
                Polled::Chunk(chunk) => {
                    self.link.queue().push_own(chunk);
                    if self.link.is_closing() {
                        // The close frame is queued: nothing may follow it.
                        self.link.queue().close_behind();
                    }
                }
                Polled::Ended => self.link.queue().close_behind(),
                Polled::Nothing => {}
            }
            let (released, outcome) = self.link.queue().write_direct(true);
            if released > 0 {
                self.link.release(released);
            }
            let Some(direct) = self.direct.as_mut() else {
                return Poll::Pending;
            };
            match outcome {
                WriteOutcome::Done | WriteOutcome::NotMine => {
                    if self.inner.is_some() && self.inner_wake.woken.load(Ordering::Acquire) {
                        // The context has more.
                        continue;
                    }
                    return match self.take_end() {
                        Some(end) => Poll::Ready(end),
                        None => Poll::Pending,
                    };
                }
                WriteOutcome::Blocked => {
                    if direct.writable.is_none() {
                        // Deprecated for a `T` whose `as_raw_fd` could
                        // change or close under the registration; an
                        // `Arc<Socket>` owns its descriptor, unchanged, for
                        // as long as the registration holds it, which is
                        // what the replacement's `unsafe` contract asks
                        // (and this workspace forbids `unsafe`).
                        #[allow(deprecated)]
                        let registered =
                            AsyncFd::with_interest(direct.socket.clone(), Interest::WRITABLE);
                        match registered {
                            Ok(fd) => direct.writable = Some(fd),
                            Err(e) => {
                                let error = direct.error;
                                return self.fail(error(e));
                            }
                        }
                    }
                    let Some(fd) = direct.writable.as_ref() else {
                        return Poll::Pending;
                    };
                    match fd.poll_write_ready(cx) {
                        // Readiness may be stale: cleared, and the write
                        // tried again, which registers for the next.
                        Poll::Ready(Ok(mut guard)) => guard.clear_ready(),
                        Poll::Ready(Err(e)) => {
                            let error = direct.error;
                            return self.fail(error(e));
                        }
                        Poll::Pending => return Poll::Pending,
                    }
                }
                WriteOutcome::Failed(e) => {
                    let error = direct.error;
                    return self.fail(error(e));
                }
            }
        }
    }

    /// Polls the session's context, only if something woke it since its
    /// last `Pending` (see [`ContextWake`]); the flag is cleared first, so
    /// a wake while it runs brings the body back. An end is kept in
    /// `ended` (reported by [`Outbound::take_end`]) and the context
    /// dropped.
    fn poll_context(&mut self) -> Polled
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
    {
        let woken = self.inner_wake.woken.swap(false, Ordering::AcqRel);
        let Some(inner) = self.inner.as_mut().filter(|_| woken) else {
            return Polled::Nothing;
        };
        let mut inner_cx = Context::from_waker(&self.inner_waker);
        match Pin::new(inner).poll_next(&mut inner_cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                // A stream that yielded has registered no waker: it is
                // polled again next time.
                self.inner_wake.woken.store(true, Ordering::Release);
                return Polled::Chunk(chunk);
            }
            Poll::Ready(Some(Err(e))) => self.ended = Some(Some(e)),
            Poll::Ready(None) => self.ended = Some(None),
            Poll::Pending => return Polled::Nothing,
        }
        self.inner = None;
        Polled::Ended
    }

    /// The body's end, once everything before it is handed over: an error
    /// is reported once, then the body is over for good.
    fn take_end(&mut self) -> Option<Option<Result<Bytes, E>>> {
        let end = self.ended.take()?;
        self.ended = Some(None);
        Some(end.map(Err))
    }

    /// Ends a direct body with `e`: what is queued is dropped, and nothing
    /// more is.
    fn fail(&mut self, e: E) -> Poll<Option<Result<Bytes, E>>> {
        self.inner = None;
        self.close_queue();
        self.ended = Some(None);
        Poll::Ready(Some(Err(e)))
    }
}

impl<S, E> Stream for Outbound<S, E>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Unpin,
{
    type Item = Result<Bytes, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.direct.is_some() {
            return this.poll_direct(cx);
        }
        if this.ready.is_empty() && this.held.is_none() && this.ended.is_none() {
            // Registered before taking, so a push after the take wakes us.
            this.link.queue().waker.register(cx.waker());
            this.link.queue().take_all(&mut this.ready);
            match this.poll_context() {
                Polled::Chunk(chunk) => {
                    if this.link.is_closing() {
                        // The close frame is in this chunk or was before
                        // it: nothing may follow it.
                        this.close_queue();
                    }
                    this.held = Some(chunk);
                }
                Polled::Ended => this.close_queue(),
                Polled::Nothing => {}
            }
        }
        let room = PASS_BYTES - this.this_pass;
        if room == 0 && (!this.ready.is_empty() || this.held.is_some()) {
            // This pass has had its share (see the module docs): the HTTP
            // layer writes it out, and the wake brings it back for more.
            this.this_pass = 0;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if let Some(front) = this.ready.front_mut() {
            if front.bytes.len() > room {
                // The rest of the frame goes in the next pass; its cost is
                // released once all of it is handed over.
                this.this_pass = PASS_BYTES;
                return Poll::Ready(Some(Ok(front.bytes.split_to(room))));
            }
            if let Some(frame) = this.ready.pop_front() {
                this.this_pass += frame.bytes.len();
                this.link.release(frame.cost);
                release_drained(&mut this.ready);
                return Poll::Ready(Some(Ok(frame.bytes)));
            }
        }
        if let Some(chunk) = this.held.as_mut() {
            if chunk.len() > room {
                this.this_pass = PASS_BYTES;
                return Poll::Ready(Some(Ok(chunk.split_to(room))));
            }
            if let Some(chunk) = this.held.take() {
                this.this_pass += chunk.len();
                return Poll::Ready(Some(Ok(chunk)));
            }
        }
        match this.take_end() {
            Some(end) => Poll::Ready(end),
            None => {
                // Nothing more to hand over: the pass ends here.
                this.this_pass = 0;
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio::time::Instant;

    fn link(max_frames: usize) -> Arc<SessionLink> {
        let now = Instant::now();
        Arc::new(SessionLink::new(now, now).with_max_queued(max_frames))
    }

    fn frame(text: &str) -> Frame {
        Frame::new(encode(&Payload::Text(text.into())), 100)
    }

    #[test]
    fn a_text_frame_is_encoded_once_as_an_unmasked_final_frame() {
        let f = encode(&Payload::Text("hi".into()));
        assert_eq!(&f[..], &[0x81, 2, b'h', b'i']);
        let b = encode(&Payload::Binary(Bytes::from(vec![0u8; 300])));
        assert_eq!(&b[..4], &[0x82, 126, 1, 44]);
        assert_eq!(b.len(), 304);
    }

    #[test]
    fn a_full_queue_refuses_only_when_bounded_and_a_closed_one_always() {
        let l = link(2);
        let q = l.queue();
        q.push(frame("a"), true).unwrap();
        q.push(frame("b"), true).unwrap();
        assert_eq!(q.push(frame("c"), true), Err(Refused::Full));
        // Before the session is started, only the byte budget bounds it.
        q.push(frame("c"), false).unwrap();
        assert_eq!(q.close(), 300);
        assert_eq!(q.push(frame("d"), false), Err(Refused::Closed));
    }

    #[actix::test]
    async fn queued_frames_come_out_before_the_contexts_chunk_and_nothing_after_the_close() {
        let l = link(16);
        l.queue().push(frame("one"), true).unwrap();
        l.queue().push(frame("two"), true).unwrap();
        // The context's output: the close frame, after which it ends.
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Bytes, actix_web::Error>>();
        let mut out = Outbound::new(l.clone(), rx);
        l.mark_closing();
        tx.unbounded_send(Ok(Bytes::from_static(b"CLOSE"))).unwrap();
        drop(tx);
        assert_eq!(
            out.next().await.unwrap().unwrap(),
            encode(&Payload::Text("one".into()))
        );
        // Pushed after the close was taken: refused, never written.
        assert_eq!(l.queue().push(frame("late"), true), Err(Refused::Closed));
        assert_eq!(
            out.next().await.unwrap().unwrap(),
            encode(&Payload::Text("two".into()))
        );
        assert_eq!(&out.next().await.unwrap().unwrap()[..], b"CLOSE");
        assert!(out.next().await.is_none());
        // Both handed-over frames were released.
        assert_eq!(l.released(), 200);
    }

    /// Counts its wakes.
    #[derive(Default)]
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl futures::task::ArcWake for Wakes {
        fn wake_by_ref(arc_self: &Arc<Self>) {
            arc_self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    type Body = Outbound<futures::channel::mpsc::UnboundedReceiver<Result<Bytes, ()>>, ()>;

    /// Polls `out` until it is pending; returns what it handed over.
    fn one_pass<S>(out: &mut Outbound<S, ()>, cx: &mut Context<'_>) -> Vec<Bytes>
    where
        S: Stream<Item = Result<Bytes, ()>> + Unpin,
    {
        let mut got = Vec::new();
        while let Poll::Ready(Some(Ok(piece))) = Pin::new(&mut *out).poll_next(cx) {
            got.push(piece);
        }
        got
    }

    #[test]
    fn a_pass_hands_over_at_most_pass_bytes_and_a_big_frame_goes_in_slices() {
        let l = link(16);
        let big = |fill: u8| {
            let f = encode(&Payload::Binary(Bytes::from(vec![fill; 5000])));
            (Frame::new(f.clone(), 100), f)
        };
        let mut expected = Vec::new();
        for fill in [1, 2, 3] {
            let (frame, bytes) = big(fill);
            l.queue().push(frame, true).unwrap();
            expected.extend_from_slice(&bytes);
        }
        // Keeps the context's output open: the body never ends here.
        let (_tx, rx) = futures::channel::mpsc::unbounded();
        let mut out = Outbound::new(l.clone(), rx);
        let wakes = Arc::new(Wakes::default());
        let waker = futures::task::waker(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut written = Vec::new();
        let mut passes = 0;
        while written.len() < expected.len() {
            let before = wakes.0.load(std::sync::atomic::Ordering::SeqCst);
            let pass: usize = one_pass(&mut out, &mut cx)
                .into_iter()
                .map(|piece| {
                    written.extend_from_slice(&piece);
                    piece.len()
                })
                .sum();
            assert!(pass <= PASS_BYTES, "one pass handed over {pass} bytes");
            if written.len() < expected.len() {
                // More is ready: the body woke itself for the next pass.
                assert_eq!(
                    wakes.0.load(std::sync::atomic::Ordering::SeqCst),
                    before + 1
                );
            }
            passes += 1;
            assert!(passes <= 10, "no progress");
        }
        assert_eq!(written, expected, "every byte, in order, once");
        assert_eq!(passes, expected.len().div_ceil(PASS_BYTES));
        // Each frame's cost was released once, after its last slice.
        assert_eq!(l.released(), 300);
    }

    #[test]
    fn a_drained_queue_and_body_keep_no_room_for_the_burst_they_took() {
        let l = link(4096);
        for i in 0..1000 {
            l.queue().push(frame(&i.to_string()), true).unwrap();
        }
        assert!(l.queue().capacity() >= 1000);
        let (_tx, rx) = futures::channel::mpsc::unbounded();
        let mut out: Body = Outbound::new(l.clone(), rx);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut frames = 0;
        for _ in 0..100 {
            frames += one_pass(&mut out, &mut cx).len();
            if frames == 1000 {
                break;
            }
        }
        assert_eq!(frames, 1000);
        assert_eq!(l.queue().capacity(), 0, "the queue keeps room");
        assert_eq!(out.capacity(), 0, "the body keeps room");
        // And it still delivers what comes next, keeping nothing after.
        l.queue().push(frame("after"), true).unwrap();
        let next = one_pass(&mut out, &mut cx);
        assert_eq!(next, vec![encode(&Payload::Text("after".into()))]);
        assert_eq!((l.queue().capacity(), out.capacity()), (0, 0));
    }

    #[test]
    fn a_closed_queue_keeps_no_room() {
        let l = link(4096);
        for i in 0..100 {
            l.queue().push(frame(&i.to_string()), true).unwrap();
        }
        assert_eq!(l.queue().close(), 100 * 100);
        assert_eq!(l.queue().capacity(), 0);
    }

    #[test]
    fn a_burst_wakes_the_body_once_and_every_frame_is_taken() {
        let l = link(4096);
        let (_tx, rx) = futures::channel::mpsc::unbounded();
        let mut out: Body = Outbound::new(l.clone(), rx);
        let wakes = Arc::new(Wakes::default());
        let waker = futures::task::waker(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let count = || wakes.0.load(std::sync::atomic::Ordering::SeqCst);
        // Waiting, with nothing queued: the waker is registered.
        assert!(one_pass(&mut out, &mut cx).is_empty());
        for round in 0..3 {
            let before = count();
            for i in 0..10 {
                l.queue()
                    .push(frame(&format!("{round}-{i}")), true)
                    .unwrap();
            }
            assert_eq!(count(), before + 1, "round {round}: one wake per burst");
            let got = one_pass(&mut out, &mut cx);
            let want: Vec<Bytes> = (0..10)
                .map(|i| encode(&Payload::Text(format!("{round}-{i}").into())))
                .collect();
            assert_eq!(got, want, "round {round}: all of it, in order");
        }
    }

    /// A context output that counts how often it is polled.
    struct CountedPolls {
        rx: futures::channel::mpsc::UnboundedReceiver<Result<Bytes, ()>>,
        polls: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Stream for CountedPolls {
        type Item = Result<Bytes, ()>;

        fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            let this = self.get_mut();
            this.polls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Pin::new(&mut this.rx).poll_next(cx)
        }
    }

    #[test]
    fn queued_frames_do_not_poll_the_context_and_its_own_wake_does() {
        let l = link(16);
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut out = Outbound::new(
            l.clone(),
            CountedPolls {
                rx,
                polls: polls.clone(),
            },
        );
        let wakes = Arc::new(Wakes::default());
        let waker = futures::task::waker(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let count =
            |c: &std::sync::atomic::AtomicUsize| c.load(std::sync::atomic::Ordering::SeqCst);
        // The first pass polls the context once, which then waits.
        assert!(one_pass(&mut out, &mut cx).is_empty());
        assert_eq!(count(&polls), 1);
        for i in 0..5 {
            l.queue().push(frame(&i.to_string()), true).unwrap();
            let got = one_pass(&mut out, &mut cx);
            assert_eq!(got, vec![encode(&Payload::Text(i.to_string().into()))]);
        }
        assert_eq!(
            count(&polls),
            1,
            "the queue's frames left the context alone"
        );
        // The context's own output wakes the body and is polled for.
        let before = count(&wakes.0);
        tx.unbounded_send(Ok(Bytes::from_static(b"PING"))).unwrap();
        assert_eq!(
            count(&wakes.0),
            before + 1,
            "the context's wake reached the task"
        );
        l.queue().push(frame("after"), true).unwrap();
        let got = one_pass(&mut out, &mut cx);
        assert_eq!(
            got,
            vec![
                encode(&Payload::Text("after".into())),
                Bytes::from_static(b"PING")
            ]
        );
        // Polled for the chunk, and once more (it yielded) to find it waiting.
        assert_eq!(count(&polls), 3);
    }

    /// A connected pair on loopback: the server's end as the duplicate a
    /// direct body writes to (non-blocking, like actix's), and the client's.
    fn socket_pair() -> (Arc<Socket>, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (Arc::new(Socket::from(server)), client)
    }

    type DirectBody =
        Outbound<futures::channel::mpsc::UnboundedReceiver<Result<Bytes, io::Error>>, io::Error>;

    #[actix::test]
    async fn a_direct_queue_is_written_by_the_shards_flush_with_no_wake() {
        let l = link(16);
        let (socket, mut client) = socket_pair();
        let (_tx, rx) = futures::channel::mpsc::unbounded();
        let mut out: DirectBody = Outbound::new(l.clone(), rx).with_direct(socket);
        let wakes = Arc::new(Wakes::default());
        let waker = futures::task::waker(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let count = || wakes.0.load(std::sync::atomic::Ordering::SeqCst);
        // The first poll leaves the socket to actix-http's `101` and asks
        // for another; the second takes the queue over.
        assert!(Pin::new(&mut out).poll_next(&mut cx).is_pending());
        assert_eq!(count(), 1);
        assert!(Pin::new(&mut out).poll_next(&mut cx).is_pending());
        let before = count();
        assert_eq!(l.queue().push(frame("one"), true), Ok(Pushed::Flush));
        assert_eq!(l.queue().push(frame("two"), true), Ok(Pushed::Queued));
        assert_eq!(count(), before, "a direct push wakes nobody");
        let (released, outcome) = l.queue().write_direct(false);
        assert!(matches!(outcome, WriteOutcome::Done), "{outcome:?}");
        assert_eq!(released, 200);
        l.release(released);
        let mut want = encode(&Payload::Text("one".into())).to_vec();
        want.extend_from_slice(&encode(&Payload::Text("two".into())));
        let mut got = vec![0u8; want.len()];
        std::io::Read::read_exact(&mut client, &mut got).unwrap();
        assert_eq!(got, want, "both frames, in order, in one write");
        assert_eq!(l.released(), 200);
    }

    #[actix::test]
    async fn a_full_socket_leaves_the_rest_to_the_body_which_ends_with_the_close() {
        let l = link(4096);
        let (socket, client) = socket_pair();
        socket.set_send_buffer_size(4096).unwrap();
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let out: DirectBody = Outbound::new(l.clone(), rx).with_direct(socket);
        let mut want = Vec::new();
        let body = actix::spawn(async move {
            let mut out = out;
            // A direct body hands actix-http nothing: it only ends.
            out.next().await.map(|r| r.map(|b| b.len()))
        });
        // Let the body take the queue over (its first two polls).
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        let mut blocked = false;
        for i in 0..400u32 {
            let bytes = encode(&Payload::Binary(Bytes::from(vec![(i % 251) as u8; 1000])));
            want.extend_from_slice(&bytes);
            let pushed = l.queue().push(Frame::new(bytes, 10), true).unwrap();
            if pushed == Pushed::Flush {
                let (released, outcome) = l.queue().write_direct(false);
                l.release(released);
                if matches!(outcome, WriteOutcome::Blocked) {
                    blocked = true;
                    l.queue().wake_writer();
                }
            }
        }
        assert!(blocked, "400 KB should not fit a 4 KiB send buffer unread");
        // The session closes: its close frame goes behind everything queued.
        l.mark_closing();
        tx.unbounded_send(Ok(Bytes::from_static(b"CLOSE"))).unwrap();
        drop(tx);
        want.extend_from_slice(b"CLOSE");
        let expected = want.len();
        let reader = std::thread::spawn(move || {
            let mut client = client;
            let mut got = Vec::new();
            std::io::Read::read_to_end(&mut client, &mut got).map(|_| got)
        });
        assert!(body.await.unwrap().is_none(), "the body ends, no error");
        assert_eq!(l.queue().push(frame("late"), true), Err(Refused::Closed));
        // The server's end closes once the test drops it; read what came.
        drop(l);
        let got = tokio::task::spawn_blocking(move || reader.join().unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.len(), expected);
        assert!(got == want, "every byte, in order, the close last");
    }

    #[actix::test]
    async fn a_push_wakes_a_waiting_body() {
        let l = link(16);
        let (_tx, rx) = futures::channel::mpsc::unbounded::<Result<Bytes, actix_web::Error>>();
        let mut out = Outbound::new(l.clone(), rx);
        let waiting = actix::spawn(async move { out.next().await.map(|r| r.unwrap()) });
        tokio::task::yield_now().await;
        l.queue().push(frame("woken"), true).unwrap();
        let got = waiting.await.unwrap().unwrap();
        assert_eq!(got, encode(&Payload::Text("woken".into())));
    }
}
