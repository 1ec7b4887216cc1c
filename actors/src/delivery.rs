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
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};

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
}

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
    pub fn push(&self, frame: Frame, bounded: bool) -> Result<(), Refused> {
        {
            let mut q = lock(&self.queued);
            if q.closed {
                return Err(Refused::Closed);
            }
            if bounded && q.frames.len() >= self.max_frames {
                return Err(Refused::Full);
            }
            q.frames.push_back(frame);
        }
        self.waker.wake();
        Ok(())
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
        }
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

impl<S, E> Stream for Outbound<S, E>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Unpin,
{
    type Item = Result<Bytes, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ready.is_empty() && this.held.is_none() && this.ended.is_none() {
            // Registered before taking, so a push after the take wakes us.
            this.link.queue().waker.register(cx.waker());
            this.link.queue().take_all(&mut this.ready);
            // Only if something woke the context since its last `Pending`
            // (see `ContextWake`); cleared first, so a wake while it runs
            // brings the body back.
            let woken = this.inner_wake.woken.swap(false, Ordering::AcqRel);
            if let (true, Some(inner)) = (woken, this.inner.as_mut()) {
                let mut inner_cx = Context::from_waker(&this.inner_waker);
                match Pin::new(inner).poll_next(&mut inner_cx) {
                    Poll::Ready(Some(Ok(chunk))) => {
                        // A stream that yielded has registered no waker:
                        // it is polled again next time.
                        this.inner_wake.woken.store(true, Ordering::Release);
                        if this.link.is_closing() {
                            // The close frame is in this chunk or was
                            // before it: nothing may follow it.
                            this.close_queue();
                        }
                        this.held = Some(chunk);
                    }
                    Poll::Ready(Some(Err(e))) => {
                        this.ended = Some(Some(e));
                    }
                    Poll::Ready(None) => {
                        this.ended = Some(None);
                    }
                    Poll::Pending => {}
                }
            }
            if this.ended.is_some() {
                this.inner = None;
                this.close_queue();
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
        match this.ended.take() {
            Some(Some(e)) => {
                // Ended by an error: end after reporting it.
                this.ended = Some(None);
                Poll::Ready(Some(Err(e)))
            }
            Some(None) => {
                this.ended = Some(None);
                Poll::Ready(None)
            }
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
