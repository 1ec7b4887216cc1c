//! The hub's safe defaults against hostile and unlucky clients, on a real
//! server with real clients: headroom that keeps a reading client from
//! being evicted by a burst of the largest messages.

mod support;

use happynet::actors::liveness::OUTBOUND_HEADROOM_MESSAGES;
use happynet::{Broadcast, Config, RoomName};
use serde_json::Value;
use support::{config, start, WsClient};

/// Sends a join and returns the answer: `joined` or `error`.
async fn try_join(c: &mut WsClient, room: &str) -> Value {
    c.send_text(&serde_json::json!({"type":"join","room":room}).to_string())
        .await;
    loop {
        let v = c.next_json().await;
        if v["type"] == "joined" || v["type"] == "error" {
            return v;
        }
    }
}

// ---------------------------------------------------------------------------
// Headroom for the largest messages
// ---------------------------------------------------------------------------

/// The smallest `max_outbound_bytes` the config accepts with messages of up
/// to `max_message` bytes, found by asking the validator (bisection over a
/// range the answer must lie in, so the loop is bounded).
fn smallest_accepted_outbound(max_message: usize) -> usize {
    let accepts = |outbound: usize| {
        Config::from_json_str(&format!(
            r#"{{"network":{{"websocket":{{"max_message_bytes":{max_message},
                "max_outbound_bytes":{outbound}}}}}}}"#
        ))
        .is_ok()
    };
    let (mut refused, mut accepted) = (0, 64 * max_message);
    assert!(accepts(accepted));
    while accepted - refused > 1 {
        let mid = refused + (accepted - refused) / 2;
        if accepts(mid) {
            accepted = mid;
        } else {
            refused = mid;
        }
    }
    accepted
}

#[actix_web::test]
async fn a_reading_client_survives_a_burst_of_the_largest_messages_at_the_smallest_cap() {
    const MAX_MESSAGE: usize = 16 * 1024;
    let cap = smallest_accepted_outbound(MAX_MESSAGE);
    let server = start(config(&format!(
        r#"{{"network":{{"websocket":{{"max_message_bytes":{MAX_MESSAGE},
            "max_outbound_bytes":{cap}}}}}}}"#
    )))
    .await;
    // The largest frame a message of MAX_MESSAGE bytes becomes: a
    // `POST /broadcast?room=…` JSON body `{"data":"…"}` of exactly
    // MAX_MESSAGE bytes, to a room whose 64-byte name escapes to 128.
    let name = "\"".repeat(64);
    let room = RoomName::new(&name).unwrap();
    let data = format!("\"{}\"", "x".repeat(MAX_MESSAGE - r#"{"data":""}"#.len()));
    let raw = serde_json::value::RawValue::from_string(data.clone()).unwrap();
    let mut reader = WsClient::connect(&server, "").await;
    assert_eq!(try_join(&mut reader, &name).await["type"], "joined");

    // The burst: queued back to back, before the reader's session can run.
    let hub = server.net.hub();
    for _ in 0..OUTBOUND_HEADROOM_MESSAGES {
        hub.do_send(Broadcast::message(Some(room.clone()), &raw));
    }
    for i in 0..OUTBOUND_HEADROOM_MESSAGES {
        let v = reader.next_json().await;
        assert_eq!(v["type"], "message", "frame {i}");
        assert_eq!(v["data"].as_str().unwrap().len(), data.len() - 2);
    }
    let health = server.health().await;
    assert_eq!(health["hub"]["evicted_slow_consumer"], 0, "{health}");
    assert_eq!(health["hub"]["dropped"], 0, "{health}");
    // Still connected, still served.
    hub.do_send(Broadcast::text("after the burst"));
    assert_eq!(reader.next_text().await, "after the burst");
}
