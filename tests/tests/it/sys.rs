//! Issue 2, point 9: $SYS topics.

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
