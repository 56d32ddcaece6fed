//! Issue 2, point 9: $SYS topics (and issue 10, point 7: their counts are counters).

use std::collections::BTreeMap;

use crate::*;

const COUNTERS: &[&str] = &[
    "$SYS/broker/clients/connected",
    "$SYS/broker/clients/total",
    "$SYS/broker/clients/disconnected",
    "$SYS/broker/messages/received",
    "$SYS/broker/messages/sent",
    "$SYS/broker/subscriptions/count",
    "$SYS/broker/retained messages/count",
    "$SYS/broker/messages/stored",
    "$SYS/broker/messages/queued",
];

#[tokio::test]
async fn sys_topics_published_on_interval() {
    test_timeout(async {
        let b = Broker::start_with(&[("PETREL_MQTT__SYS_INTERVAL_SECS", "1")], &[]).await;
        let mut sub = V3Client::connect(b.mqtt_addr(), "sys-sub").await;
        sub.subscribe("$SYS/#", Q3::AtMostOnce).await;
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        let wanted: Vec<&str> = COUNTERS
            .iter()
            .copied()
            .chain(["$SYS/broker/version", "$SYS/broker/uptime"])
            .collect();
        // Only live rounds: the retained copies may predate this subscriber.
        while !wanted.iter().all(|t| seen.contains_key(*t)) {
            let p = sub.recv_publish_within(Duration::from_secs(5)).await;
            if !p.retain {
                seen.insert(p.topic.clone(), text(&p.payload));
            }
        }
        for t in COUNTERS {
            let v = &seen[*t];
            assert!(v.trim().parse::<u64>().is_ok(), "{t} = {v:?} is a count");
        }
        let uptime = &seen["$SYS/broker/uptime"];
        let secs = uptime
            .strip_suffix(" seconds")
            .unwrap_or_else(|| panic!("uptime {uptime:?} has the form 'N seconds'"));
        assert!(secs.parse::<u64>().is_ok(), "uptime {uptime:?}");
        assert!(!seen["$SYS/broker/version"].trim().is_empty(), "version");
        assert!(
            seen["$SYS/broker/clients/connected"]
                .trim()
                .parse::<u64>()
                .unwrap()
                >= 1
        );
        assert!(
            seen["$SYS/broker/subscriptions/count"]
                .trim()
                .parse::<u64>()
                .unwrap()
                >= 1
        );

        eprintln!("--- the values follow the broker's state");
        let _other = V3Client::connect(b.mqtt_addr(), "sys-other").await;
        loop {
            let p = sub.recv_publish_within(Duration::from_secs(5)).await;
            if p.topic == "$SYS/broker/clients/connected"
                && text(&p.payload).trim().parse::<u64>().unwrap_or(0) >= 2
            {
                break;
            }
        }

        eprintln!("--- retained: a late subscriber gets them at once");
        let mut late = V3Client::connect(b.mqtt_addr(), "sys-late").await;
        late.subscribe("$SYS/broker/version", Q3::AtMostOnce).await;
        // RETAIN=1 only on the copy the subscription gets from the store (a live round
        // clears it), so no time bound is needed to tell the two apart.
        let p = late.recv_publish().await;
        assert!(p.retain, "$SYS messages are retained");
    })
    .await
}

#[tokio::test]
async fn sys_disabled_with_interval_zero() {
    test_timeout(async {
        let b = Broker::start_with(&[("PETREL_MQTT__SYS_INTERVAL_SECS", "0")], &[]).await;
        // With an interval the first round is published (retained) at start, so a $SYS/#
        // subscription would get it at once, before the marker.
        let mut sub = V3Client::connect(b.mqtt_addr(), "nosys").await;
        sub.subscribe("$SYS/#", Q3::AtMostOnce).await;
        sub.assert_no_publish_before_marker().await;
        assert_eq!(
            b.metric("petrel_retained_messages").await,
            0.0,
            "no retained $SYS messages"
        );
    })
    .await
}

/// The latest value of each `$SYS` topic `watch` received.
struct SysValues(BTreeMap<String, u64>);

impl SysValues {
    /// Reads `$SYS` messages until `connected`, `disconnected`, `total` (clients) and
    /// `queued` (messages) all have the wanted values.
    async fn wait_for(&mut self, watch: &mut V5Client, want: [u64; 4], what: &str) {
        let names = [
            "$SYS/broker/clients/connected",
            "$SYS/broker/clients/disconnected",
            "$SYS/broker/clients/total",
            "$SYS/broker/messages/queued",
        ];
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let got: Vec<Option<u64>> = names.iter().map(|n| self.0.get(*n).copied()).collect();
            if got.iter().zip(want).all(|(g, w)| *g == Some(w)) {
                return;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(p) = watch.try_recv_publish(left).await else {
                panic!("{what}: wanted {names:?} = {want:?}, last seen {got:?}");
            };
            let value = text(&p.payload).trim().parse().unwrap_or(u64::MAX);
            self.0.insert(topic5(&p), value);
        }
    }
}

#[tokio::test]
async fn t90_issue_10_sys_counts_follow_sessions() {
    test_timeout(async {
        let b = Broker::start_with(
            &[
                ("PETREL_MQTT__SYS_INTERVAL_SECS", "1"),
                // The half-open socket below must outlive the test.
                ("PETREL_MQTT__CONNECT_TIMEOUT_MS", "60000"),
            ],
            &[],
        )
        .await;
        let addr = b.mqtt_addr();
        let mut watch = V5Client::connect(addr, "sys-watch").await;
        watch
            .subscribe("$SYS/broker/clients/+", Q5::AtMostOnce)
            .await;
        watch
            .subscribe("$SYS/broker/messages/queued", Q5::AtMostOnce)
            .await;
        let mut sys = SysValues(BTreeMap::new());
        sys.wait_for(&mut watch, [1, 0, 1, 0], "the watcher alone")
            .await;

        eprintln!("--- a persistent client, and a socket still in its CONNECT (not a client)");
        let mut half_open = RawClient::connect(addr).await;
        half_open.send(&[0x10]).await;
        let persistent = |o: &mut rumqttc::v5::MqttOptions| {
            o.set_clean_start(false);
            set_session_expiry(o, 2);
        };
        let mut p = V5Client::connect_with(addr, "sys-p", persistent).await;
        p.subscribe("sys-p/t", Q5::AtLeastOnce).await;
        wait_connections(&b, 3).await;
        sys.wait_for(&mut watch, [2, 0, 2, 0], "two clients").await;

        eprintln!("--- offline with three messages queued");
        p.disconnect().await;
        for i in 0..3 {
            watch
                .publish("sys-p/t", Q5::AtLeastOnce, false, format!("m{i}"))
                .await;
        }
        sys.wait_for(&mut watch, [1, 1, 2, 3], "one offline session, 3 queued")
            .await;

        eprintln!("--- back: the queue drains");
        let mut p = V5Client::connect_with(addr, "sys-p", persistent).await;
        assert_eq!(p.recv_publishes(3).await.len(), 3);
        sys.wait_for(&mut watch, [2, 0, 2, 0], "resumed and drained")
            .await;

        eprintln!("--- offline again, then the session expires");
        p.disconnect().await;
        sys.wait_for(&mut watch, [1, 0, 1, 0], "the session expired")
            .await;
        drop(half_open);
    })
    .await
}
