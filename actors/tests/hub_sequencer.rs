//! The router's history path in a cluster, with a recording actor standing
//! in for the sequencer (the cluster bridge): a local room broadcast goes to
//! the sequencer instead of being stamped here, comes back positioned
//! (`Sequenced`) and is kept at that position (a repeat is not delivered
//! again), a backfill is kept without being delivered, and broadcasts to
//! everyone and to one session take the sequencer too, in the same order.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use actix::prelude::*;
use happynet_actors::{
    Backfill, Backfilled, Broadcast, BroadcastHub, GetHistory, GetHubStats, HistoryConfig,
    HubConfig, Payload, Position, Relay, RoomName, Sequence, Sequenced, SetRelay, SetSequencer,
    Target,
};
use std::time::Duration;

/// Records what the hub hands its relay and its sequencer, in order.
#[derive(Default)]
struct Recorder {
    relayed: Vec<Relay>,
    sequenced: Vec<Sequence>,
}

impl Actor for Recorder {
    type Context = Context<Self>;
}

impl Handler<Relay> for Recorder {
    type Result = ();
    fn handle(&mut self, msg: Relay, _: &mut Self::Context) {
        self.relayed.push(msg);
    }
}

impl Handler<Sequence> for Recorder {
    type Result = ();
    fn handle(&mut self, msg: Sequence, _: &mut Self::Context) {
        self.sequenced.push(msg);
    }
}

#[derive(Message)]
#[rtype(result = "(Vec<Relay>, Vec<Sequence>)")]
struct Take;

impl Handler<Take> for Recorder {
    type Result = MessageResult<Take>;
    fn handle(&mut self, _: Take, _: &mut Self::Context) -> Self::Result {
        MessageResult((
            std::mem::take(&mut self.relayed),
            std::mem::take(&mut self.sequenced),
        ))
    }
}

fn history_config() -> HubConfig {
    HubConfig {
        history: Some(HistoryConfig::default()),
        ..common::hub_config()
    }
}

fn at(epoch: &str, offset: u64) -> Position {
    Position {
        epoch: epoch.into(),
        offset,
    }
}

fn text(s: &str) -> Payload {
    Payload::Text(s.to_owned().into())
}

async fn offsets(hub: &Addr<BroadcastHub>, room: &RoomName) -> Vec<u64> {
    let page = hub
        .send(GetHistory {
            room: room.clone(),
            since: None,
            limit: 100,
        })
        .await
        .unwrap();
    page.entries.iter().map(|e| e.offset).collect()
}

#[actix::test]
async fn room_broadcasts_go_through_the_sequencer_and_come_back_positioned() {
    let hub = BroadcastHub::new(history_config()).start();
    let recorder = Recorder::default().start();
    let news = RoomName::new("news").unwrap();
    hub.send(SetRelay(Some(recorder.clone().recipient())))
        .await
        .unwrap();
    hub.send(SetSequencer(Some(recorder.clone().recipient())))
        .await
        .unwrap();

    // Every local broadcast is handed to the sequencer, in order, and not
    // delivered nor kept here yet: a room broadcast, one to everyone, one
    // to a session (which the sequencer only keeps in its turn).
    hub.send(Broadcast::to_room(news.clone(), "n1"))
        .await
        .unwrap();
    hub.send(Broadcast::text("to all")).await.unwrap();
    hub.send(Broadcast::new(Target::Session(7), "to one"))
        .await
        .unwrap();
    let (relayed, sequenced) = recorder.send(Take).await.unwrap();
    assert!(relayed.is_empty(), "nothing takes the relay: {relayed:?}");
    let handed: Vec<(Target, Payload)> = sequenced
        .into_iter()
        .map(|s| match s {
            Sequence::Broadcast { target, payload } => (target, payload),
            Sequence::Flush(_) => panic!("no session closed"),
        })
        .collect();
    assert_eq!(
        handed,
        vec![
            (Target::Room(news.clone()), text("n1")),
            (Target::All, text("to all")),
            (Target::Session(7), text("to one")),
        ]
    );
    assert!(offsets(&hub, &news).await.is_empty());

    // Back from Redis at its position: kept there; a repeat is not.
    let back = |offset, own| Sequenced {
        rooms: vec![(news.clone(), at("c1-1", offset))],
        payload: text("n1"),
        own,
    };
    assert_eq!(hub.send(back(7, true)).await.unwrap(), 0, "no members here");
    hub.send(back(7, true)).await.unwrap();
    hub.send(back(8, false)).await.unwrap();
    assert_eq!(offsets(&hub, &news).await, vec![7, 8]);
    let page = hub
        .send(GetHistory {
            room: news.clone(),
            since: Some(at("c1-1", 6)),
            limit: 100,
        })
        .await
        .unwrap();
    assert!(page.complete);
    assert_eq!(page.last, Some(at("c1-1", 8)));
    assert!(page.entries[0].frame.contains(r#""epoch":"c1-1""#));

    // Counted once each: the own one when it was handed over, the other
    // node's when it arrived.
    let stats = hub.send(GetHubStats).await.unwrap();
    assert_eq!((stats.broadcasts, stats.from_cluster), (4, 1), "{stats:?}");

    // Handed back unpositioned (the link was down): stamped here, in an
    // epoch of this node's own, and not handed to anyone again.
    hub.send(Broadcast::unsequenced(
        Target::Rooms(vec![news.clone()]),
        "n2",
    ))
    .await
    .unwrap();
    let page = hub
        .send(GetHistory {
            room: news.clone(),
            since: None,
            limit: 1,
        })
        .await
        .unwrap();
    let local = page.last.unwrap();
    assert_ne!(&*local.epoch, "c1-1");
    assert_eq!(local.offset, 1);
    assert_eq!(recorder.send(Take).await.unwrap().0.len(), 0);
}

#[actix::test]
async fn a_backfill_is_kept_for_what_is_left_of_its_ttl() {
    let hub = BroadcastHub::new(history_config()).start();
    let recorder = Recorder::default().start();
    hub.send(SetSequencer(Some(recorder.clone().recipient())))
        .await
        .unwrap();
    let (a, b) = (RoomName::new("a").unwrap(), RoomName::new("b").unwrap());
    let ttl = HistoryConfig::default().ttl;
    let entry = |room: &RoomName, offset, age| Backfilled {
        rooms: vec![(room.clone(), at("c9-1", offset))],
        payload: text("old"),
        age,
    };
    hub.send(Backfill {
        entries: vec![
            // Older than the ttl: not kept at all.
            entry(&a, 1, ttl + Duration::from_secs(1)),
            entry(&a, 2, Duration::from_secs(10)),
            entry(&b, 5, Duration::from_secs(1)),
        ],
        done: false,
    })
    .await
    .unwrap();
    hub.send(Backfill {
        entries: vec![entry(&a, 3, Duration::ZERO)],
        done: true,
    })
    .await
    .unwrap();
    assert_eq!(offsets(&hub, &a).await, vec![2, 3]);
    assert_eq!(offsets(&hub, &b).await, vec![5]);
    // Kept, not delivered: no broadcast counted.
    let stats = hub.send(GetHubStats).await.unwrap();
    assert_eq!(stats.broadcasts, 0, "{stats:?}");
}
