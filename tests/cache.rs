//! The response cache of an API client, against the fake upstream's
//! cacheable resources: what a hit saves, how revalidation and stale-on-error
//! behave, that identical concurrent misses make one upstream call, and that
//! the cache stays inside its byte bound. Every claim is checked by counting
//! what reached the upstream.

#![allow(clippy::unwrap_used)]

use testkit::fake_upstream;

use fake_upstream::{FakeUpstream, Faults};
use futures::future::join_all;
use happynet::upstream::CacheStats;
use happynet::{Config, Network};
use serde_json::Value;

fn cached_net(fake: &FakeUpstream, cache: &str) -> Network {
    Network::start(
        Config::from_json_str(&format!(
            r#"{{"network":{{"api_clients":{{"up":{{"base_url":"{}","rate_limit":600000,
                "retry_attempts":0,"cache":{{{cache}}}}}}}}}}}"#,
            fake.url("")
        ))
        .unwrap(),
    )
    .unwrap()
}

#[actix_web::test]
async fn a_fresh_hit_does_not_reach_the_upstream() {
    let fake = FakeUpstream::start("fake", Faults::default())
        .await
        .unwrap();
    let net = cached_net(&fake, "");
    let api = net.api("up").unwrap();
    let first = api.get("/cache/a?cc=max-age%3D60").send().await.unwrap();
    assert!(!first.from_cache);
    for _ in 0..10 {
        let hit = api.get("/cache/a?cc=max-age%3D60").send().await.unwrap();
        assert!(hit.from_cache);
        assert_eq!(hit.body, first.body);
    }
    assert_eq!(fake.requests(), 1);
    // A different URL is a different entry; a POST is not cached.
    api.get("/cache/b?cc=max-age%3D60").send().await.unwrap();
    api.post("/cache/a").send().await.unwrap();
    assert_eq!(fake.requests(), 3);
    let CacheStats {
        counters, entries, ..
    } = api.upstream().cache_stats().unwrap();
    assert_eq!(counters.hits, 10);
    assert_eq!(entries, 2);
}

#[actix_web::test]
async fn a_stale_entry_is_revalidated_with_its_etag_and_a_304_serves_the_cached_body() {
    let fake = FakeUpstream::start("fake", Faults::default())
        .await
        .unwrap();
    let net = cached_net(&fake, "");
    let api = net.api("up").unwrap();
    // no-cache: stored, but every use must be revalidated.
    let first = api.get("/cache/r?cc=no-cache").send().await.unwrap();
    let again = api.get("/cache/r?cc=no-cache").send().await.unwrap();
    assert!(again.from_cache, "a 304 should be answered from the cache");
    assert_eq!(again.status, 200);
    assert_eq!(again.body, first.body);
    let stats = fake.stats();
    assert_eq!((stats.cache_200, stats.cache_304), (1, 1));

    // A new version: the revalidation gets a 200 and the new body.
    fake.state.bump_cache("r").unwrap();
    let newer = api.get("/cache/r?cc=no-cache").send().await.unwrap();
    assert!(!newer.from_cache);
    assert_eq!(newer.json::<Value>().unwrap()["version"], 2);
}

#[actix_web::test]
async fn a_stale_copy_answers_when_the_upstream_fails() {
    let fake = FakeUpstream::start("fake", Faults::default())
        .await
        .unwrap();
    let net = cached_net(&fake, r#""stale_if_error":300"#);
    let api = net.api("up").unwrap();
    // max-age=0: stale at once, so the next call goes to the upstream
    // (no-cache would forbid serving it stale at all, RFC 9111 §5.2.2.4).
    let first = api.get("/cache/s?cc=max-age%3D0").send().await.unwrap();
    fake.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    });
    let stale = api.get("/cache/s?cc=max-age%3D0").send().await.unwrap();
    assert!(stale.from_cache);
    assert_eq!(stale.body, first.body);
    // Without stale_if_error the failure is the caller's to see.
    let strict = cached_net(&fake, r#""stale_if_error":0"#);
    assert!(strict
        .api("up")
        .unwrap()
        .get("/cache/s")
        .send()
        .await
        .is_err());
}

#[actix_web::test]
async fn a_hundred_concurrent_identical_misses_make_one_upstream_call() {
    let fake = FakeUpstream::start(
        "fake",
        Faults {
            latency_ms: 200,
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let net = cached_net(&fake, "");
    let api = net.api("up").unwrap();
    let results = join_all((0..100).map(|_| {
        let api = api.clone();
        async move { api.get("/cache/hot?cc=max-age%3D60").send().await }
    }))
    .await;
    assert!(results
        .iter()
        .all(|r| r.as_ref().is_ok_and(|r| r.status == 200)));
    assert_eq!(fake.requests(), 1);
    let CacheStats { collapsed, .. } = api.upstream().cache_stats().unwrap();
    assert_eq!(collapsed, 99);
}

#[actix_web::test]
async fn the_cache_stays_within_its_byte_bound_under_ten_thousand_keys() {
    const MAX_BYTES: usize = 256 * 1024;
    let fake = FakeUpstream::start("fake", Faults::default())
        .await
        .unwrap();
    let net = cached_net(
        &fake,
        &format!(r#""max_bytes":{MAX_BYTES},"max_entries":100000,"max_entry_bytes":65536"#),
    );
    let api = net.api("up").unwrap();
    for chunk in (0..10_000).collect::<Vec<_>>().chunks(200) {
        join_all(chunk.iter().map(|i| {
            let api = api.clone();
            async move {
                api.get(&format!("/cache/k{i}?cc=max-age%3D600"))
                    .send()
                    .await
                    .unwrap()
            }
        }))
        .await;
        let CacheStats { bytes, .. } = api.upstream().cache_stats().unwrap();
        assert!(bytes <= MAX_BYTES, "{bytes} bytes cached");
    }
    let CacheStats {
        counters,
        entries,
        bytes,
        ..
    } = api.upstream().cache_stats().unwrap();
    assert!(counters.evictions > 9_000, "{counters:?}");
    assert!(entries > 100, "only {entries} entries kept");
    assert!(bytes > MAX_BYTES / 2);
    assert_eq!(fake.requests(), 10_000);
}
