//! What a caller holds in `BreakerActor` and `RateLimiterActor` is given back
//! when the caller goes away, under paused tokio time.
//!
//! A caller "goes away" the two ways a future does: the task holding it is
//! aborted (a client hung up, a deadline fired around it), or its request is
//! dropped before the answer was read. Either way the next caller must get
//! what the first one held at once, not after a timeout. Time only moves
//! through `tokio::time::advance`; nothing here sleeps.

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use actix::prelude::*;
use happynet_actors::gcra::Quota;
use happynet_actors::{
    AttemptOutcome, BreakerActor, BreakerConfig, BreakerStateKind, GetBreakerStats,
    GetLimiterStats, Permit, RateLimiterActor, Reserve,
};
use std::time::Duration;

const OPEN_DURATION: Duration = Duration::from_secs(30);
const FAST: Duration = Duration::from_millis(20);

/// One probe slot, so that a lost probe is a blocked breaker.
fn one_probe() -> BreakerConfig {
    BreakerConfig {
        window: 2,
        minimum_calls: 2,
        open_duration: OPEN_DURATION,
        half_open_probes: 1,
        ..BreakerConfig::default()
    }
}

/// Lets the actors run what is queued for them.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

/// A breaker that has opened and whose open duration has passed: the next
/// permit is its one probe.
async fn half_open_breaker() -> Addr<BreakerActor> {
    tokio::time::pause();
    let breaker = BreakerActor::new("api", one_probe()).unwrap().start();
    for _ in 0..2 {
        let permit = breaker.send(Permit).await.unwrap().unwrap();
        permit.report(AttemptOutcome::Failure { elapsed: FAST });
    }
    let s = breaker.send(GetBreakerStats).await.unwrap();
    assert_eq!(s.state, BreakerStateKind::Open);
    tokio::time::advance(OPEN_DURATION + Duration::from_millis(1)).await;
    breaker
}

#[actix::test]
async fn a_probe_whose_caller_hangs_up_gives_its_slot_to_the_next_caller_at_once() {
    let breaker = half_open_breaker().await;
    // The probe's caller: takes the permit, then waits on its upstream call
    // for ever, until it is aborted (its client hung up).
    let (got_permit, permit_taken) = tokio::sync::oneshot::channel();
    let probe = actix::spawn({
        let breaker = breaker.clone();
        async move {
            let permit = breaker.send(Permit).await.unwrap().unwrap();
            assert!(permit.ticket().is_probe());
            got_permit.send(()).unwrap();
            std::future::pending::<()>().await;
            drop(permit);
        }
    });
    permit_taken.await.unwrap();
    // While the probe is out, nobody else gets through.
    assert!(breaker.send(Permit).await.unwrap().is_err());
    probe.abort();
    assert!(probe.await.unwrap_err().is_cancelled());
    settle().await;
    // No time has passed: the slot came back because the probe went away,
    // not because the breaker presumed it lost.
    let next = breaker.send(Permit).await.unwrap();
    let next = next.expect("the next caller gets the probe slot at once");
    assert!(next.ticket().is_probe());
    next.report(AttemptOutcome::Success { elapsed: FAST });
    let s = breaker.send(GetBreakerStats).await.unwrap();
    assert_eq!(s.state, BreakerStateKind::Closed);
}

#[actix::test]
async fn a_permit_answer_nobody_reads_gives_its_slot_back() {
    let breaker = half_open_breaker().await;
    // The request is queued at once; the actor answers it while the caller
    // is still there, and the caller then goes away without reading it.
    let unread = breaker.send(Permit);
    settle().await;
    drop(unread);
    settle().await;
    let next = breaker.send(Permit).await.unwrap();
    assert!(next.is_ok(), "the unread permit's probe slot was lost");
}

#[actix::test]
async fn a_reported_permit_counts_once_and_its_drop_adds_nothing() {
    let breaker = half_open_breaker().await;
    let probe = breaker.send(Permit).await.unwrap().unwrap();
    probe.report(AttemptOutcome::Failure { elapsed: FAST });
    settle().await;
    // The failed probe reopened the breaker; the report was the only one.
    let s = breaker.send(GetBreakerStats).await.unwrap();
    assert_eq!(s.state, BreakerStateKind::Open);
    assert_eq!(s.failures, 3);
    assert!(breaker.send(Permit).await.unwrap().is_err());
}

/// A limiter of one request per `interval`, no burst beyond it.
fn one_at_a_time(interval: Duration) -> Addr<RateLimiterActor> {
    let quota = Quota::new(1.0, interval, 1).unwrap();
    RateLimiterActor::new("api", quota, 100).start()
}

fn reserve(key: &str) -> Reserve {
    Reserve { key: key.into() }
}

#[actix::test]
async fn a_grant_dropped_unspent_is_refunded_at_once() {
    tokio::time::pause();
    let limiter = one_at_a_time(Duration::from_secs(60));
    let grant = limiter.send(reserve("k")).await.unwrap().unwrap();
    // The unit is held: another caller must wait the whole minute.
    let denied = limiter.send(reserve("k")).await.unwrap().unwrap_err();
    assert_eq!(denied.retry_after, Duration::from_secs(60));
    // The request never went out (its caller hung up in a queue).
    drop(grant);
    settle().await;
    let next = limiter.send(reserve("k")).await.unwrap();
    let next = next.expect("the refunded unit is the next caller's");
    // A spent grant stays spent.
    next.spend();
    settle().await;
    assert!(limiter.send(reserve("k")).await.unwrap().is_err());
    let s = limiter.send(GetLimiterStats).await.unwrap();
    assert_eq!((s.granted, s.refunded, s.denied), (2, 1, 2));
}

#[actix::test]
async fn a_grant_answer_nobody_reads_is_refunded() {
    tokio::time::pause();
    let limiter = one_at_a_time(Duration::from_secs(60));
    let unread = limiter.send(reserve("k"));
    settle().await;
    drop(unread);
    settle().await;
    assert!(limiter.send(reserve("k")).await.unwrap().is_ok());
}

#[actix::test]
async fn a_caller_waiting_out_a_denial_holds_nothing() {
    tokio::time::pause();
    let interval = Duration::from_secs(1);
    let limiter = one_at_a_time(interval);
    limiter.send(reserve("k")).await.unwrap().unwrap().spend();
    // A caller is denied and waits out the denial, then hangs up mid-wait.
    let waiter = actix::spawn({
        let limiter = limiter.clone();
        async move {
            let denied = limiter.send(reserve("k")).await.unwrap().unwrap_err();
            tokio::time::sleep(denied.retry_after).await;
            limiter.send(reserve("k")).await.unwrap().unwrap().spend();
        }
    });
    settle().await;
    waiter.abort();
    assert!(waiter.await.unwrap_err().is_cancelled());
    // When the slot opens it is the next caller's, exactly on time.
    tokio::time::advance(interval).await;
    assert!(limiter.send(reserve("k")).await.unwrap().is_ok());
}
