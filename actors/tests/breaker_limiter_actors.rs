//! `BreakerActor` and `RateLimiterActor` through their messages, under paused
//! tokio time.
//!
//! The state machines are unit-tested next to their code; these tests check
//! what only the actors can get wrong: that a thousand concurrent callers
//! racing a half-open breaker still get exactly the configured probes, that a
//! limiter's table comes back down after a flood of distinct keys once its
//! sweep timer runs, and that a denial's `retry_after` is the true wait.
//!
//! Pausing time makes them exact. Nothing here waits on a timer of its own
//! (under paused time tokio would auto-advance the clock to it); the clock
//! only moves through `tokio::time::advance`.

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use actix::prelude::*;
use futures::future::join_all;
use happynet_actors::breaker::HALF_OPEN_RETRY_HINT;
use happynet_actors::gcra::Quota;
use happynet_actors::limiter::sweep_interval;
use happynet_actors::{
    Acquire, AttemptOutcome, BreakerActor, BreakerConfig, BreakerOpen, BreakerPermit,
    BreakerStateKind, GetBreakerStats, GetLimiterStats, LimiterStats, Permit, RateLimited,
    RateLimiterActor,
};
use std::time::Duration;

const OPEN_DURATION: Duration = Duration::from_secs(10);
const PROBES: u32 = 3;
const CALLERS: usize = 1_000;
const FAST: Duration = Duration::from_millis(20);

fn breaker_config() -> BreakerConfig {
    BreakerConfig {
        window: 10,
        minimum_calls: 5,
        open_duration: OPEN_DURATION,
        half_open_probes: PROBES,
        ..BreakerConfig::default()
    }
}

/// Opens the breaker with `minimum_calls` failures.
async fn trip(breaker: &Addr<BreakerActor>) {
    for _ in 0..breaker_config().minimum_calls {
        let permit = breaker.send(Permit).await.unwrap().unwrap();
        permit.report(AttemptOutcome::Failure { elapsed: FAST });
    }
    let s = breaker.send(GetBreakerStats).await.unwrap();
    assert_eq!(s.state, BreakerStateKind::Open);
    assert_eq!(s.retry_after, Some(OPEN_DURATION));
}

/// Fires `CALLERS` concurrent `Permit`s and splits the answers.
async fn race_for_permits(breaker: &Addr<BreakerActor>) -> (Vec<BreakerPermit>, Vec<BreakerOpen>) {
    let answers = join_all((0..CALLERS).map(|_| breaker.send(Permit))).await;
    let mut granted = Vec::new();
    let mut refused = Vec::new();
    for answer in answers {
        match answer.unwrap() {
            Ok(permit) => granted.push(permit),
            Err(open) => refused.push(open),
        }
    }
    (granted, refused)
}

/// Moves paused time forward by `d` and a millisecond, so that anything due
/// at `d` is due: tokio rounds timer deadlines up to the next millisecond.
async fn advance_past(d: Duration) {
    tokio::time::advance(d + Duration::from_millis(1)).await;
    // Let actors woken by the timers run before the test looks at them.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[actix::test]
async fn a_half_open_breaker_admits_exactly_its_probes_among_1000_callers() {
    tokio::time::pause();
    let breaker = BreakerActor::new("api", breaker_config()).unwrap().start();

    // Round 1: every probe succeeds, the breaker closes.
    trip(&breaker).await;
    advance_past(OPEN_DURATION).await;
    let s = breaker.send(GetBreakerStats).await.unwrap();
    assert_eq!(s.state, BreakerStateKind::HalfOpen);
    assert_eq!(s.retry_after, None);

    let (probes, refused) = race_for_permits(&breaker).await;
    assert_eq!(probes.len(), PROBES as usize);
    assert!(probes.iter().all(|p| p.ticket().is_probe()));
    assert_eq!(refused.len(), CALLERS - PROBES as usize);
    for open in &refused {
        assert_eq!(open.upstream, "api");
        assert!(!open.retry_after.is_zero());
        assert!(open.retry_after <= HALF_OPEN_RETRY_HINT, "{open}");
    }
    assert_eq!(
        refused[0].to_string(),
        format!(
            "upstream api: circuit open, retry after {} ms",
            refused[0].retry_after.as_millis()
        )
    );
    let s = breaker.send(GetBreakerStats).await.unwrap();
    assert_eq!(s.state, BreakerStateKind::HalfOpen);
    assert_eq!(s.rejections, (CALLERS - PROBES as usize) as u64);

    for permit in probes {
        permit.report(AttemptOutcome::Success { elapsed: FAST });
    }
    let s = breaker.send(GetBreakerStats).await.unwrap();
    assert_eq!(s.state, BreakerStateKind::Closed);
    // closed -> open -> half-open -> closed
    assert_eq!(s.transitions, 3);
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["state"], "closed");
    assert!(json["retry_after_ms"].is_null());

    // Round 2: one probe fails, the breaker reopens for a full duration.
    trip(&breaker).await;
    advance_past(OPEN_DURATION).await;
    let (probes, refused) = race_for_permits(&breaker).await;
    assert_eq!(probes.len(), PROBES as usize);
    assert_eq!(refused.len(), CALLERS - PROBES as usize);
    let mut probes = probes.into_iter();
    if let Some(first) = probes.next() {
        first.report(AttemptOutcome::Failure { elapsed: FAST });
    }
    // The other probes succeed too late: their tickets are stale.
    for permit in probes {
        permit.report(AttemptOutcome::Success { elapsed: FAST });
    }
    let s = breaker.send(GetBreakerStats).await.unwrap();
    assert_eq!(s.state, BreakerStateKind::Open);
    assert_eq!(s.retry_after, Some(OPEN_DURATION));
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["state"], "open");
    assert_eq!(json["retry_after_ms"], OPEN_DURATION.as_millis() as u64);
    let open = breaker.send(Permit).await.unwrap().unwrap_err();
    assert_eq!(open.retry_after, OPEN_DURATION);
}

/// The process's resident set size in KiB, from /proc (Linux); 0 elsewhere.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}

async fn limiter_stats(limiter: &Addr<RateLimiterActor>) -> LimiterStats {
    limiter.send(GetLimiterStats).await.unwrap()
}

#[actix::test]
async fn a_limiter_returns_to_empty_after_100_000_keys_go_idle() {
    const KEYS: usize = 100_000;
    const CHUNK: usize = 1_000;
    tokio::time::pause();
    // 10/s with bursts of 5: a key used once is idle 100 ms later, a key
    // that spent its burst 500 ms later (the tolerance).
    let quota = Quota::per_second(10.0, 5).unwrap();
    let tolerance = quota.interval() * quota.burst();
    let limiter = RateLimiterActor::new("api", quota, 2 * KEYS).start();

    let rss_before = rss_kib();
    for chunk in 0..KEYS / CHUNK {
        let answers = join_all((0..CHUNK).map(|i| {
            limiter.send(Acquire {
                key: format!("client-{}", chunk * CHUNK + i),
            })
        }))
        .await;
        assert!(answers.into_iter().all(|a| a.unwrap().is_ok()));
    }
    let rss_full = rss_kib();
    let s = limiter_stats(&limiter).await;
    assert_eq!(s.keys, KEYS);
    assert_eq!(s.granted, KEYS as u64);
    assert_eq!(s.overflow, 0);

    // Past the tolerance and one sweep: every key is idle and swept.
    advance_past(tolerance + sweep_interval(&quota)).await;
    let s = limiter_stats(&limiter).await;
    assert_eq!(s.keys, 0);
    assert_eq!(s.evicted, KEYS as u64);
    let rss_after = rss_kib();
    println!(
        "RSS: {rss_before} KiB before, {rss_full} KiB with {KEYS} keys, \
         {rss_after} KiB after the sweep"
    );

    // The limiter still works, from an empty table.
    limiter
        .send(Acquire {
            key: "client-0".into(),
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(limiter_stats(&limiter).await.keys, 1);
}

#[actix::test]
async fn a_denial_says_how_long_to_wait_and_that_wait_is_enough() {
    tokio::time::pause();
    // One request per 500 ms, no burst beyond one.
    let quota = Quota::per_second(2.0, 1).unwrap();
    let limiter = RateLimiterActor::new("search", quota, 100).start();
    let acquire = || {
        limiter.send(Acquire {
            key: "user-7".into(),
        })
    };

    acquire().await.unwrap().unwrap();
    let denied: RateLimited = acquire().await.unwrap().unwrap_err();
    assert_eq!(denied.limiter, "search");
    assert_eq!(denied.key, "user-7");
    assert_eq!(denied.retry_after, Duration::from_millis(500));
    assert_eq!(
        denied.to_string(),
        "rate limiter search: key \"user-7\" over its rate, retry after 500 ms"
    );

    // A millisecond short is still too early, and says so exactly.
    tokio::time::advance(denied.retry_after - Duration::from_millis(1)).await;
    let early = acquire().await.unwrap().unwrap_err();
    assert_eq!(early.retry_after, Duration::from_millis(1));
    // The full wait admits the next request.
    tokio::time::advance(Duration::from_millis(1)).await;
    acquire().await.unwrap().unwrap();

    // Another key was never affected.
    limiter
        .send(Acquire {
            key: "user-8".into(),
        })
        .await
        .unwrap()
        .unwrap();
    let s = limiter_stats(&limiter).await;
    assert_eq!((s.granted, s.denied, s.keys), (3, 2, 2));
}

#[actix::test]
async fn a_full_limiter_refuses_new_keys_until_old_ones_go_idle() {
    tokio::time::pause();
    let quota = Quota::per_second(10.0, 1).unwrap(); // 100 ms
    let limiter = RateLimiterActor::new("tiny", quota, 2).start();
    let acquire = |key: &str| limiter.send(Acquire { key: key.into() });

    acquire("a").await.unwrap().unwrap();
    acquire("b").await.unwrap().unwrap();
    let refused = acquire("c").await.unwrap().unwrap_err();
    assert_eq!(refused.retry_after, quota.interval());
    let s = limiter_stats(&limiter).await;
    assert_eq!((s.keys, s.overflow, s.denied), (2, 1, 0));

    // After that wait, "a" and "b" are idle: a sweep on arrival makes room.
    tokio::time::advance(refused.retry_after).await;
    acquire("c").await.unwrap().unwrap();
    let s = limiter_stats(&limiter).await;
    assert_eq!((s.keys, s.overflow, s.evicted), (1, 1, 2));
}
