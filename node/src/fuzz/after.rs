//! What must hold once a script has run and every client has left.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::client::{Client, Server, DEADLINE};
use super::script::Flush;
use super::view::View;
use crate::broker::Broker;
use crate::codec::{
    Connect, ConnectProperties, MqttStr, Packet, PacketId, Protocol, Publish, QoS, ReasonCode,
    Subscribe, SubscriptionOptions,
};

/// A fresh subscriber and publisher on the same broker: the round trip must work.
pub(super) async fn bystander(broker: &Arc<Broker>) {
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(2));
    let server = Server {
        broker,
        cancel: &cancel,
        tracker: &tracker,
        permits: &permits,
        socket_buffer: 4096,
    };
    // Short names: the broker's limits may be as small as 32-byte packets and 2 topic levels.
    let qos = QoS::from_u8(broker.cfg.mqtt.max_qos.min(1)).expect("0 or 1");
    let mut sub = open_connected(&server, "by-s", Protocol::V5).await;
    sub.queue(&Packet::Subscribe(Subscribe {
        packet_id: PacketId::new(1).expect("not 0"),
        properties: Default::default(),
        filters: vec![(
            MqttStr::from_static("by/+"),
            SubscriptionOptions {
                qos,
                ..Default::default()
            },
        )],
    }));
    sub.flush(&Flush::Now).await;
    assert!(
        sub.wait_for(View::answered).await && !sub.eof,
        "bystander: no SUBACK"
    );
    let mut publisher = open_connected(&server, "by-p", Protocol::V3_1_1).await;
    publisher.queue(&Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: MqttStr::from_static("by/x"),
        packet_id: (qos != QoS::AtMostOnce).then(|| PacketId::new(1).expect("not 0")),
        properties: Default::default(),
        payload: Bytes::from_static(b"ok"),
    }));
    publisher.flush(&Flush::Now).await;
    assert!(
        publisher.wait_for(View::answered).await && !publisher.eof,
        "bystander: no PUBACK"
    );
    let got = |v: &View| {
        v.delivered
            .iter()
            .any(|(t, p)| t.as_str() == "by/x" && p == "ok")
    };
    assert!(
        sub.wait_for(got).await && got(&sub.view),
        "bystander: message not delivered"
    );
    for c in [&mut sub, &mut publisher] {
        c.close().await;
        c.wait_closed().await;
    }
    tracker.close();
    assert!(
        tokio::time::timeout(DEADLINE, tracker.wait()).await.is_ok(),
        "bystander: connection tasks still running"
    );
}

async fn open_connected(server: &Server<'_>, id: &'static str, protocol: Protocol) -> Client {
    let connect = Connect {
        protocol,
        clean_start: true,
        keep_alive: 0,
        client_id: MqttStr::from_static(id),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    };
    let max_inflight = server.broker.cfg.mqtt.max_inflight_messages;
    let mut c = Client::open(
        0,
        server,
        None,
        false,
        View::new(0, Some(&connect), max_inflight),
    );
    c.queue(&Packet::Connect(Box::new(connect)));
    c.flush(&Flush::Now).await;
    let connected = c.wait_for(|v| v.connack.is_some()).await;
    assert!(
        connected && c.view.connack == Some(ReasonCode::SUCCESS),
        "bystander {id}: not connected: {:?}",
        c.view.connack
    );
    c
}

/// After every client left: only sessions that outlive their connection remain, none of them
/// attached; once they are ended too, nothing is left in the registry or the subscription trie.
pub(super) fn check_sessions(broker: &Broker) {
    let sessions: Vec<_> = broker.sessions.lock().values().cloned().collect();
    for s in &sessions {
        assert!(
            !s.is_connected(),
            "session {} still attached",
            s.client_id()
        );
        assert!(
            !s.is_ended(),
            "ended session {} still registered",
            s.client_id()
        );
        assert!(
            s.expiry_secs() > 0,
            "session {} with expiry 0 outlived its connection",
            s.client_id()
        );
    }
    for s in &sessions {
        let (state, _) = s.end();
        broker.end_session(s, state);
    }
    assert!(broker.sessions.is_empty(), "sessions left after ending all");
    assert_eq!(broker.metrics.sessions.get(), 0, "sessions gauge");
    assert_eq!(
        broker.metrics.subscriptions.get(),
        0,
        "subscriptions left in the trie after every session ended"
    );
}
