//! The HTTP side of the real-time core: `POST /broadcast` in both of its
//! forms, its errors, and `GET /health`, against a real server.

mod support;

use serde_json::{json, Value};
use support::{config, http_client, start, WsClient};

#[actix_web::test]
async fn post_broadcast_text_goes_verbatim_to_everyone_or_one_room() {
    let server = start(config("{}")).await;
    let mut lobby = WsClient::connect(&server, "").await;
    let mut blue = WsClient::connect(&server, "?room=blue").await;
    let client = http_client();

    let mut resp = client
        .post(server.url("/broadcast"))
        .content_type("text/plain; charset=utf-8")
        .send_body("Hello, clients!")
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"recipients": 2})
    );
    assert_eq!(lobby.next_text().await, "Hello, clients!");
    assert_eq!(blue.next_text().await, "Hello, clients!");

    let mut resp = client
        .post(server.url("/broadcast?room=blue"))
        .content_type("text/plain")
        .send_body("blue only")
        .await
        .unwrap();
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"recipients": 1})
    );
    assert_eq!(blue.next_text().await, "blue only");
    lobby
        .expect_silence(std::time::Duration::from_millis(200))
        .await;
}

#[actix_web::test]
async fn post_broadcast_json_is_wrapped_as_a_message() {
    let server = start(config("{}")).await;
    let mut blue = WsClient::connect(&server, "?room=blue").await;
    let mut lobby = WsClient::connect(&server, "").await;
    let client = http_client();

    let mut resp = client
        .post(server.url("/broadcast"))
        .send_json(&json!({"room": "blue", "data": {"price": 42}}))
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(resp.json::<Value>().await.unwrap()["recipients"], 1);
    assert_eq!(
        blue.next_json().await,
        json!({"type": "message", "room": "blue", "data": {"price": 42}})
    );

    client
        .post(server.url("/broadcast"))
        .send_json(&json!({"data": [1, 2]}))
        .await
        .unwrap();
    for c in [&mut blue, &mut lobby] {
        assert_eq!(
            c.next_json().await,
            json!({"type": "message", "room": null, "data": [1, 2]})
        );
    }
}

#[actix_web::test]
async fn post_broadcast_refuses_bad_input_with_a_clear_status() {
    let server = start(config(
        r#"{"network":{"websocket":{"max_message_bytes":1024}}}"#,
    ))
    .await;
    let mut watcher = WsClient::connect(&server, "").await;
    let client = http_client();
    let url = server.url("/broadcast");

    let resp = client
        .post(&url)
        .content_type("text/plain")
        .send_body("x".repeat(2048))
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);

    let mut resp = client
        .post(&url)
        .content_type("application/json")
        .send_body("{\"data\":")
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "bad_json");

    let mut resp = client
        .post(&url)
        .send_json(&json!({"room": "", "data": 1}))
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "bad_room");

    let resp = client
        .post(&url)
        .content_type("image/png")
        .send_body("bytes")
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);

    let resp = client
        .post(&url)
        .content_type("text/plain")
        .send_body(vec![0xff, 0xfe])
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // None of it reached a client.
    watcher
        .expect_silence(std::time::Duration::from_millis(200))
        .await;
}

#[actix_web::test]
async fn health_reports_the_hub() {
    let server = start(config("{}")).await;
    let _a = WsClient::connect(&server, "?room=a").await;
    let _b = WsClient::connect(&server, "?room=b").await;
    let health = server.health().await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["connections"], 2);
    assert_eq!(health["hub"]["sessions"], 2);
    assert_eq!(health["hub"]["rooms"], 2);
    server.net.shutdown().await;
    let resp = http_client()
        .get(server.url("/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
}
