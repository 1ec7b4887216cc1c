//! The hub's hooks for the cluster bridge, with a recording actor standing
//! in for the bridge: which broadcasts are relayed to other nodes (local
//! ones, except those for a node-local session id), that a broadcast from
//! another node is delivered but never relayed back, and the hub's own
//! latency and mailbox-depth accounting for them.
//!
//! One test function: the queued-broadcast count is process-wide, so no
//! other test in this binary may build broadcasts at the same time.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use common::hub_config;

use actix::prelude::*;
use happynet_actors::messages::queued_broadcasts;
use happynet_actors::{
    Broadcast, BroadcastHub, GetHubStats, Payload, Relay, RelayTarget, RoomName, SetRelay, Target,
};

/// Records what the hub relays, in order.
struct Recorder(Vec<Relay>);

impl Actor for Recorder {
    type Context = Context<Self>;
}

impl Handler<Relay> for Recorder {
    type Result = ();
    fn handle(&mut self, msg: Relay, _: &mut Self::Context) {
        self.0.push(msg);
    }
}

#[derive(Message)]
#[rtype(result = "Vec<Relay>")]
struct Take;

impl Handler<Take> for Recorder {
    type Result = MessageResult<Take>;
    fn handle(&mut self, _: Take, _: &mut Self::Context) -> Self::Result {
        MessageResult(std::mem::take(&mut self.0))
    }
}

#[actix::test]
async fn local_broadcasts_are_relayed_and_cluster_ones_are_not() {
    let hub = BroadcastHub::new(hub_config()).start();
    let recorder = Recorder(Vec::new()).start();
    let room = RoomName::new("news").unwrap();

    // Without a relay nothing is relayed (a single node).
    hub.send(Broadcast::text("alone")).await.unwrap();
    hub.send(SetRelay(Some(recorder.clone().recipient())))
        .await
        .unwrap();

    let queued = [
        Broadcast::text("to all"),
        Broadcast::to_room(room.clone(), "to news"),
        Broadcast::to_session(7, "to one session"),
        Broadcast::from_cluster(Target::All, "from elsewhere"),
        Broadcast::new(
            Target::Rooms(vec![room.clone(), RoomName::new("b").unwrap()]),
            "to two rooms",
        ),
        Broadcast::binary(vec![0xff, 0x00]),
    ];
    // Built and not yet handled: counted as waiting for a hub.
    assert!(queued_broadcasts() >= queued.len());
    for b in queued {
        hub.send(b).await.unwrap();
    }
    assert_eq!(
        queued_broadcasts(),
        0,
        "every handled broadcast is uncounted"
    );

    let stats = hub.send(GetHubStats).await.unwrap();
    assert_eq!(stats.broadcasts, 7);
    assert_eq!(stats.broadcast_latency.count(), 7);
    assert_eq!(stats.from_cluster, 1);
    assert_eq!(stats.relayed, 4);

    // The recorder got the relays in order. The hub queued them before it
    // answered GetHubStats above, so this later Take arrives after them.
    let relayed = recorder.send(Take).await.unwrap();
    let got: Vec<(RelayTarget, Payload)> =
        relayed.into_iter().map(|r| (r.target, r.payload)).collect();
    assert_eq!(
        got,
        vec![
            (RelayTarget::All, Payload::from("to all")),
            (
                RelayTarget::Rooms(vec![room.clone()]),
                Payload::from("to news")
            ),
            (
                RelayTarget::Rooms(vec![room, RoomName::new("b").unwrap()]),
                Payload::from("to two rooms")
            ),
            // Binary stays binary on its way to the other nodes.
            (RelayTarget::All, Payload::Binary(vec![0xff, 0x00].into())),
        ]
    );

    // Removing the relay stops relaying.
    hub.send(SetRelay(None)).await.unwrap();
    hub.send(Broadcast::text("alone again")).await.unwrap();
    assert_eq!(hub.send(GetHubStats).await.unwrap().relayed, 4);
}
