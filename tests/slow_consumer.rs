//! A client that stops reading, in a test binary of its own: the test
//! measures this process's memory, so no other test may run beside it.

mod support;

use happynet::Broadcast;
use support::{config, start, wait_for_hub, WsClient, WAIT};

#[actix_web::test]
async fn a_client_that_stops_reading_is_evicted_and_the_others_get_everything() {
    const CAP: usize = 256 * 1024;
    const PAYLOAD: usize = 4096;
    const BROADCASTS: usize = 10_000; // 40 MiB in all: far beyond the cap
    let server = start(config(&format!(
        r#"{{"network":{{"websocket":{{"max_outbound_bytes":{CAP},"socket_send_buffer":16384,
            "max_message_bytes":16384}}}}}}"#
    )))
    .await;
    let mut reader = WsClient::connect(&server, "").await;
    let mut jammed = testkit::ws::RawWsClient::connect(server.addr, "", 4096).await;
    wait_for_hub(&server, "two sessions", |h| h["sessions"] == 2).await;
    let rss_before = support::rss_bytes();

    // The reading client reports its progress; the sender stays at most
    // WINDOW broadcasts ahead of it, as a healthy client keeps up with a
    // realistic rate. The jammed client gets the same broadcasts regardless.
    const WINDOW: usize = 16;
    let (progress, mut seen) = tokio::sync::watch::channel(0usize);
    let hub = server.net.hub();
    let reading = actix_web::rt::spawn(async move {
        for i in 0..BROADCASTS {
            let text = reader.next_text().await;
            assert!(
                text.starts_with(&format!("{i:08}")),
                "broadcast {i} out of order"
            );
            assert_eq!(text.len(), PAYLOAD);
            let _ = progress.send(i + 1);
        }
        reader
    });
    for i in 0..BROADCASTS {
        let mut text = format!("{i:08}");
        text.extend(std::iter::repeat_n('x', PAYLOAD - text.len()));
        hub.send(Broadcast::text(text)).await.unwrap();
        tokio::time::timeout(WAIT, seen.wait_for(|&done| i < done + WINDOW))
            .await
            .expect("the reading client keeps up")
            .expect("reader alive");
    }
    let mut reader = tokio::time::timeout(WAIT, reading)
        .await
        .expect("the reading client got every broadcast in time")
        .unwrap();

    let health = wait_for_hub(&server, "the slow consumer's eviction", |h| {
        h["evicted_slow_consumer"] == 1
    })
    .await;
    let peak = health["hub"]["peak_session_queued_bytes"].as_u64().unwrap() as usize;
    // The frame that found it over its cap was dropped, and counted.
    assert!(health["hub"]["dropped"].as_u64().unwrap() >= 1, "{health}");
    assert!(
        peak <= CAP,
        "queued {peak} bytes for one session, cap {CAP}"
    );
    assert!(
        peak > CAP / 2,
        "the jammed session never backed up ({peak} bytes)"
    );
    let grown = support::rss_bytes().saturating_sub(rss_before);
    assert!(
        grown < 24 << 20,
        "server memory grew by {} MiB for 40 MiB sent to a client that does not read",
        grown >> 20
    );

    // The server has cut the jammed connection: once the client reads, it
    // finds the end of the stream after what was already in flight.
    let drained = jammed.drain_until_closed().await;
    assert!(drained < 8 << 20, "drained {drained} bytes");
    // And the reader is still served.
    hub.do_send(Broadcast::text("after"));
    assert_eq!(reader.next_text().await, "after");
    assert_eq!(server.health().await["hub"]["sessions"], 1);
}
