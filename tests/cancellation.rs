//! Cancellation is a normal path: a caller that hangs up, or whose deadline
//! fires, leaves nothing behind in the upstream stack, and the next caller
//! succeeds at once.
//!
//! Each test takes one piece of in-flight bookkeeping — a cache
//! single-flight entry, a half-open breaker's probe slot, a bulkhead slot, a
//! queue place, a pooled connection, a rate-limit unit — has a caller take
//! it against a real upstream (the fake upstream, real HTTP on
//! `127.0.0.1:0`) that never answers, makes that caller go away, and then
//! checks that the next caller gets through without waiting for anything to
//! time out. A caller "hangs up" the way a gateway client does: the task
//! running its call is aborted and its future dropped.
//!
//! The upstream stack runs on its own arbiter thread, so tokio's paused
//! time cannot reach it; these tests run on the real clock and synchronise
//! on observable state (what the upstream received, the pool's and the
//! breaker's own counters), polled with a bound, never on a sleep. "At once"
//! is checked against a bound far below the deadline the old behaviour
//! would have waited out.

#![allow(clippy::unwrap_used)]

use testkit::fake_upstream;

use actix_web::rt::task::JoinHandle;
use fake_upstream::{FakeUpstream, Faults, FAULT_HANG_HEADER};
use futures::future::join_all;
use happynet::actors::breaker::GetBreakerStats;
use happynet::actors::pool::{GetPoolStats, PoolStats};
use happynet::actors::single_flight::DEFAULT_MAX_WAITERS;
use happynet::actors::BreakerStateKind;
use happynet::upstream::CallOutcome;
use happynet::{ApiClient, Config, HttpError, Network, Response};
use std::future::Future;
use std::time::{Duration, Instant};

/// The longest any wait for a condition may take before the test fails.
const WAIT: Duration = Duration::from_secs(20);

/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(5);

/// What "at once" allows on a loaded two-core machine: far below the
/// deadlines (5 s and more) that a leaked resource would make a caller wait.
const AT_ONCE: Duration = Duration::from_millis(1500);

/// The deadline of callers that must not wait for anything.
const PATIENT: Duration = Duration::from_secs(5);

/// A network with one API client `up` on `fake`: no retries, long
/// timeouts, a rate limit that never binds unless `extra` sets one, plus
/// `extra` keys.
fn client(fake: &FakeUpstream, extra: &str) -> Network {
    let rate = if extra.contains("rate_limit") {
        ""
    } else {
        r#","rate_limit":600000"#
    };
    let json = format!(
        r#"{{"network":{{"api_clients":{{"up":{{"base_url":"{}"{rate},
            "retry_attempts":0,"timeout":30,"deadline":30{extra}}}}}}}}}"#,
        fake.url("")
    );
    Network::start(Config::from_json_str(&json).unwrap()).unwrap()
}

/// Polls `check` until it holds, failing the test after [`WAIT`].
async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        actix_web::rt::time::sleep(POLL).await;
    }
}

/// Waits until the upstream has received `n` requests.
async fn upstream_received(fake: &FakeUpstream, n: u64) {
    wait_until(&format!("{n} requests upstream"), || async {
        fake.requests() >= n
    })
    .await;
}

async fn pool_stats(api: &ApiClient) -> PoolStats {
    api.upstream().pool().send(GetPoolStats).await.unwrap()
}

/// Waits until the pool's bulkhead queue holds `n` calls.
async fn queued(api: &ApiClient, n: usize) {
    wait_until(&format!("{n} queued calls"), || async {
        pool_stats(api).await.queued == n
    })
    .await;
}

/// Waits until the call `next` waits in the bulkhead queue; fails at once,
/// with its answer, if it was answered instead (refused, say).
async fn waits_in_queue(
    api: &ApiClient,
    next: JoinHandle<Result<Response, HttpError>>,
) -> JoinHandle<Result<Response, HttpError>> {
    wait_until("the next call to queue", || async {
        next.is_finished() || pool_stats(api).await.queued == 1
    })
    .await;
    if next.is_finished() {
        panic!(
            "the next caller was answered instead of queued: {:?}",
            next.await
        );
    }
    next
}

/// A call that the upstream holds without answering, in a task of its own.
fn hung_call(api: &ApiClient, path: &str) -> JoinHandle<Result<Response, HttpError>> {
    let call = api.get(path).header(FAULT_HANG_HEADER, "1");
    actix_web::rt::spawn(call.send())
}

/// A plain call in a task of its own.
fn spawned_call(api: &ApiClient, path: &str) -> JoinHandle<Result<Response, HttpError>> {
    actix_web::rt::spawn(api.get(path).deadline(PATIENT).send())
}

/// The caller hangs up: its call's future is dropped. Returns once the
/// upstream stack has seen it go (counted it as cancelled): the hang-up
/// crosses to the upstream's arbiter thread, and a caller that started
/// after it could otherwise overtake it there.
async fn hang_up<T: std::fmt::Debug>(api: &ApiClient, call: JoinHandle<T>) {
    let cancelled = || api.upstream().call_stats().requests(CallOutcome::Cancelled);
    let before = cancelled();
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    wait_until("the hang-up to reach the upstream stack", || async {
        cancelled() > before
    })
    .await;
}

/// Calls `path` and expects a 200 at once.
async fn succeeds_at_once(api: &ApiClient, path: &str) -> Response {
    let started = Instant::now();
    let resp = api.get(path).deadline(PATIENT).send().await;
    let took = started.elapsed();
    let resp = resp.unwrap_or_else(|e| panic!("the next caller failed after {took:?}: {e}"));
    assert_eq!(resp.status, 200);
    assert!(took < AT_ONCE, "the next caller waited {took:?}");
    resp
}

// ---------------------------------------------------------------------------
// Cache single-flight

#[actix_web::test]
async fn a_cache_leader_cut_off_by_its_deadline_does_not_wedge_its_key() {
    let fake = FakeUpstream::start("fake", Faults::default())
        .await
        .unwrap();
    let net = client(&fake, r#","cache":{}"#);
    let api = net.api("up").unwrap();
    // The leader's deadline is shorter than the upstream (which never
    // answers it).
    let err = api
        .get("/cache/w")
        .header(FAULT_HANG_HEADER, "1")
        .deadline(Duration::from_millis(200))
        .send()
        .await
        .unwrap_err();
    assert!(matches!(err, HttpError::Timeout { .. }), "{err}");
    // The same key is free for the next caller, who is answered at once...
    let resp = succeeds_at_once(&api, "/cache/w").await;
    assert!(!resp.from_cache);
    // ...and whose answer is cached as usual.
    assert!(succeeds_at_once(&api, "/cache/w").await.from_cache);
    assert_eq!(fake.requests(), 2);
}

#[actix_web::test]
async fn followers_of_a_cache_leader_that_hangs_up_are_released_and_make_one_call() {
    let fake = FakeUpstream::start("fake", Faults::default())
        .await
        .unwrap();
    let net = client(&fake, r#","cache":{}"#);
    let api = net.api("up").unwrap();
    let leader = hung_call(&api, "/cache/f");
    upstream_received(&fake, 1).await;
    // Three identical calls wait for the leader's answer.
    let followers: Vec<_> = (0..3).map(|_| spawned_call(&api, "/cache/f")).collect();
    wait_until("three followers", || async {
        api.upstream().cache_stats().unwrap().collapsed == 3
    })
    .await;
    let released = Instant::now();
    hang_up(&api, leader).await;
    for result in join_all(followers).await {
        let resp = result.unwrap().unwrap();
        assert_eq!(resp.status, 200);
    }
    let took = released.elapsed();
    assert!(took < AT_ONCE, "the followers waited {took:?}");
    // The released followers coalesced again: one new call for the three.
    assert_eq!(fake.requests(), 2);
    assert!(succeeds_at_once(&api, "/cache/f").await.from_cache);
}

#[actix_web::test]
async fn a_cache_follower_that_hangs_up_gives_up_its_place() {
    let fake = FakeUpstream::start("fake", Faults::default())
        .await
        .unwrap();
    let net = client(&fake, r#","cache":{}"#);
    let api = net.api("up").unwrap();
    let leader = api
        .get("/cache/p")
        .header(FAULT_HANG_HEADER, "1")
        .deadline(Duration::from_millis(1500));
    let leader = actix_web::rt::spawn(leader.send());
    upstream_received(&fake, 1).await;
    let follower = spawned_call(&api, "/cache/p");
    wait_until("a follower", || async {
        api.upstream().cache_stats().unwrap().collapsed == 1
    })
    .await;
    hang_up(&api, follower).await;
    // Its place in the bounded waiter list was given up at once, not when
    // the leader ends.
    assert_eq!(api.upstream().flight_stats().unwrap().left, 1);
    // The leader is still there and still times out on its own...
    let err = leader.await.unwrap().unwrap_err();
    assert!(matches!(err, HttpError::Timeout { .. }), "{err}");
    // ...and then the key is free.
    succeeds_at_once(&api, "/cache/p").await;
}

#[actix_web::test]
async fn callers_beyond_the_waiter_bound_are_refused_at_once_and_the_rest_released() {
    let fake = FakeUpstream::start("fake", Faults::default())
        .await
        .unwrap();
    let net = client(&fake, r#","cache":{}"#);
    let api = net.api("up").unwrap();
    let leader = hung_call(&api, "/cache/herd");
    upstream_received(&fake, 1).await;
    let followers: Vec<_> = (0..DEFAULT_MAX_WAITERS)
        .map(|_| spawned_call(&api, "/cache/herd"))
        .collect();
    wait_until("a full waiter list", || async {
        api.upstream().cache_stats().unwrap().collapsed == DEFAULT_MAX_WAITERS as u64
    })
    .await;
    let started = Instant::now();
    let err = api.get("/cache/herd").send().await.unwrap_err();
    assert!(matches!(err, HttpError::Overloaded { .. }), "{err}");
    assert!(started.elapsed() < AT_ONCE);
    assert_eq!(api.upstream().flight_stats().unwrap().refused, 1);
    // The leader goes; the whole herd is answered by one new call.
    hang_up(&api, leader).await;
    for result in join_all(followers).await {
        assert_eq!(result.unwrap().unwrap().status, 200);
    }
    assert_eq!(fake.requests(), 2);
}

// ---------------------------------------------------------------------------
// Breaker permits

#[actix_web::test]
async fn a_half_open_probe_whose_caller_hangs_up_frees_the_probe_slot_at_once() {
    let fake = FakeUpstream::start("fake", Faults::default())
        .await
        .unwrap();
    let net = client(
        &fake,
        r#","breaker":{"window":2,"minimum_calls":2,"open_duration":1,"half_open_probes":1}"#,
    );
    let api = net.api("up").unwrap();
    for _ in 0..2 {
        let err = api
            .get("/x")
            .header("x-fault-status", "500")
            .send()
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::Status { .. }), "{err}");
    }
    let err = api.get("/x").send().await.unwrap_err();
    assert!(matches!(err, HttpError::BreakerOpen { .. }), "{err}");
    let breaker = api.upstream().breaker().clone();
    wait_until("the breaker to let a probe through", || async {
        let s = breaker.send(GetBreakerStats).await.unwrap();
        s.state == BreakerStateKind::HalfOpen
    })
    .await;
    // The one probe reaches the upstream, which never answers; its caller
    // hangs up.
    let probe = hung_call(&api, "/x");
    upstream_received(&fake, 3).await;
    hang_up(&api, probe).await;
    // The probe slot is free at once (the open duration is 1 s, so a slot
    // presumed lost would come back only after it, as a BreakerOpen first).
    succeeds_at_once(&api, "/x").await;
    let s = breaker.send(GetBreakerStats).await.unwrap();
    assert_eq!(s.state, BreakerStateKind::Closed);
}

// ---------------------------------------------------------------------------
// Bulkhead slots, queue places, pooled connections

#[actix_web::test]
async fn a_bulkhead_slot_comes_back_when_its_caller_hangs_up() {
    let fake = FakeUpstream::start("fake", Faults::default())
        .await
        .unwrap();
    let net = client(&fake, r#","bulkhead":{"max_in_flight":1,"max_queue":0}"#);
    let api = net.api("up").unwrap();
    let first = hung_call(&api, "/slow");
    upstream_received(&fake, 1).await;
    let err = api.get("/x").send().await.unwrap_err();
    assert!(matches!(err, HttpError::Overloaded { .. }), "{err}");
    hang_up(&api, first).await;
    succeeds_at_once(&api, "/x").await;
    let stats = pool_stats(&api).await;
    assert_eq!((stats.in_flight, stats.cancelled), (0, 1));
}

#[actix_web::test]
async fn a_queued_caller_that_hangs_up_leaves_the_queue_at_once() {
    let fake = FakeUpstream::start("fake", Faults::default())
        .await
        .unwrap();
    let net = client(&fake, r#","bulkhead":{"max_in_flight":1,"max_queue":1}"#);
    let api = net.api("up").unwrap();
    let running = hung_call(&api, "/slow");
    upstream_received(&fake, 1).await;
    let waiting = spawned_call(&api, "/x");
    queued(&api, 1).await;
    hang_up(&api, waiting).await;
    // Its place is free: the queue counts live callers only.
    queued(&api, 0).await;
    // The next caller gets that place, not "overloaded", and runs as soon as
    // the running call's caller hangs up too.
    let next = waits_in_queue(&api, spawned_call(&api, "/x")).await;
    let started = Instant::now();
    hang_up(&api, running).await;
    let resp = next.await.unwrap().unwrap();
    assert_eq!(resp.status, 200);
    assert!(started.elapsed() < AT_ONCE);
    // The one who left was never sent.
    assert_eq!(fake.requests(), 2);
    let stats = pool_stats(&api).await;
    assert_eq!(stats.abandoned_in_queue, 1);
    assert_eq!(stats.rejected_overloaded, 0);
}

#[actix_web::test]
async fn a_pooled_connection_comes_back_when_its_caller_hangs_up() {
    let fake = FakeUpstream::start("fake", Faults::default())
        .await
        .unwrap();
    // One connection, many bulkhead slots: the connection is what binds.
    let net = client(
        &fake,
        r#","max_connections":1,"bulkhead":{"max_in_flight":8,"max_queue":8}"#,
    );
    let api = net.api("up").unwrap();
    let first = hung_call(&api, "/slow");
    upstream_received(&fake, 1).await;
    hang_up(&api, first).await;
    // The hung connection was closed, not kept waiting for an answer, so the
    // connector has a connection for the next caller.
    succeeds_at_once(&api, "/x").await;
    succeeds_at_once(&api, "/x").await;
}

#[actix_web::test]
async fn a_streamed_call_whose_caller_hangs_up_before_the_head_frees_its_slot() {
    let fake = FakeUpstream::start("fake", Faults::default())
        .await
        .unwrap();
    let net = client(&fake, r#","bulkhead":{"max_in_flight":1,"max_queue":0}"#);
    let api = net.api("up").unwrap();
    let stream = api.get("/slow").header(FAULT_HANG_HEADER, "1");
    let stream = actix_web::rt::spawn(async move { stream.send_streaming().await.map(|_| ()) });
    upstream_received(&fake, 1).await;
    hang_up(&api, stream).await;
    succeeds_at_once(&api, "/x").await;
}

// ---------------------------------------------------------------------------
// Rate-limit units

#[actix_web::test]
async fn a_rate_limit_unit_held_by_a_caller_that_hangs_up_unsent_is_refunded() {
    let fake = FakeUpstream::start("fake", Faults::default())
        .await
        .unwrap();
    // Two requests at once, then one a minute: a unit lost to a caller who
    // left would cost the next caller a minute.
    let net = client(
        &fake,
        r#","rate_limit":1,"rate_burst":2,"wait_for_rate_limit":false,
           "bulkhead":{"max_in_flight":1,"max_queue":1}"#,
    );
    let api = net.api("up").unwrap();
    let running = hung_call(&api, "/slow");
    upstream_received(&fake, 1).await;
    // The second unit goes to a caller who then waits in the queue and
    // hangs up before its request is sent.
    let waiting = spawned_call(&api, "/x");
    queued(&api, 1).await;
    hang_up(&api, waiting).await;
    queued(&api, 0).await;
    // Its unit came back: the next caller is admitted, not told to wait.
    let next = waits_in_queue(&api, spawned_call(&api, "/x")).await;
    hang_up(&api, running).await;
    let resp = next.await.unwrap().unwrap();
    assert_eq!(resp.status, 200);
    // Both units are now spent on requests that were sent.
    let err = api.get("/x").send().await.unwrap_err();
    assert!(matches!(err, HttpError::RateLimited { .. }), "{err}");
}
