//! Issue 2, point 5: topic router, shared subscriptions, subscription options, aliases.

use std::collections::{BTreeMap, BTreeSet};

use crate::*;
use pkt::Connect;

#[tokio::test]
async fn wildcard_matching_table() {
    test_timeout(async {
        // (filter, [(topic, matches)]); every case lives under its own prefix.
        let cases: &[(&str, &[(&str, bool)])] = &[
            (
                "w/1/a/+/c",
                &[
                    ("w/1/a/b/c", true),
                    ("w/1/a//c", true),
                    ("w/1/a/b/d", false),
                    ("w/1/a/b/c/d", false),
                    ("w/1/a/c", false),
                ],
            ),
            (
                "w/2/x/#",
                &[
                    ("w/2/x", true),
                    ("w/2/x/y", true),
                    ("w/2/x/y/z", true),
                    ("w/2/x/", true),
                    ("w/2/xy", false),
                    ("w/2", false),
                ],
            ),
            (
                "w/3/+",
                &[
                    ("w/3/", true),
                    ("w/3/a", true),
                    ("w/3", false),
                    ("w/3/a/b", false),
                ],
            ),
            (
                "w/4/+/+",
                &[("w/4/a/b", true), ("w/4//", true), ("w/4/a", false)],
            ),
            (
                "w/5/+/#",
                &[("w/5/a", true), ("w/5/a/b/c", true), ("w/5", false)],
            ),
            (
                "w/6/exact",
                &[
                    ("w/6/exact", true),
                    ("w/6/Exact", false),
                    ("w/6/exact/", false),
                    ("w/6/exac", false),
                ],
            ),
            ("w/7/a b/+", &[("w/7/a b/c d", true), ("w/7/ab/c", false)]),
            ("w/8/ü/+", &[("w/8/ü/ñ", true), ("w/8/u/n", false)]),
        ];
        let b = Broker::start().await;
        let mut sub = V3Client::connect(b.mqtt_addr(), "wild-sub").await;
        let filters: Vec<(&str, Q3)> = cases.iter().map(|(f, _)| (*f, Q3::AtLeastOnce)).collect();
        for code in sub.subscribe_many(&filters).await {
            assert_eq!(code, rumqttc::SubscribeReasonCode::Success(Q3::AtLeastOnce));
        }
        let mut publ = V3Client::connect(b.mqtt_addr(), "wild-pub").await;
        let mut expected = BTreeSet::new();
        for (_, topics) in cases {
            for (topic, matches) in *topics {
                publ.publish(topic, Q3::AtLeastOnce, false, *topic).await;
                if *matches {
                    expected.insert(topic.to_string());
                }
            }
        }
        let mut got: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..expected.len() {
            let p = sub.recv_publish().await;
            assert_eq!(p.topic, text(&p.payload));
            *got.entry(p.topic).or_default() += 1;
        }
        for p in sub.publishes_before_marker().await {
            *got.entry(p.topic).or_default() += 1;
        }
        let got_set: BTreeSet<String> = got.keys().cloned().collect();
        assert_eq!(got_set, expected, "matched topics");
        assert!(got.values().all(|n| *n == 1), "each message once: {got:?}");
    })
    .await
}

#[tokio::test]
async fn leading_wildcards_do_not_match_dollar_topics() {
    test_timeout(async {
        let b = Broker::start_with(&[("PETREL_MQTT__SYS_INTERVAL_SECS", "1")], &[]).await;
        let mut all = V3Client::connect(b.mqtt_addr(), "dollar-all").await;
        all.subscribe("#", Q3::AtMostOnce).await;
        let mut plus = V5Client::connect(b.mqtt_addr(), "dollar-plus").await;
        plus.subscribe("+/broker/#", Q5::AtMostOnce).await;
        let mut sys = V3Client::connect(b.mqtt_addr(), "dollar-sys").await;
        sys.subscribe("$SYS/#", Q3::AtMostOnce).await;

        eprintln!("--- wait for two live $SYS rounds after the subscriptions");
        let mut live_uptime = 0;
        while live_uptime < 2 {
            let p = sys.recv_publish().await;
            assert!(
                p.topic.starts_with("$SYS/"),
                "$SYS/# delivered {:?}",
                p.topic
            );
            if p.topic == "$SYS/broker/uptime" && !p.retain {
                live_uptime += 1;
            }
        }
        let mut publ = V3Client::connect(b.mqtt_addr(), "dollar-pub").await;
        publ.publish("dollar/normal", Q3::AtLeastOnce, false, "n")
            .await;
        publ.publish("x/broker/y", Q3::AtLeastOnce, false, "xb")
            .await;

        let seen: Vec<String> = all
            .publishes_before_marker()
            .await
            .into_iter()
            .map(|p| p.topic)
            .collect();
        assert!(
            seen.iter().all(|t| !t.starts_with('$')),
            "'#' must not match $-topics: {seen:?}"
        );
        assert!(
            seen.contains(&"dollar/normal".to_string()),
            "'#' works: {seen:?}"
        );
        let p = plus.recv_publish().await;
        assert_eq!(
            topic5(&p),
            "x/broker/y",
            "'+/broker/#' must not match $SYS/broker/..."
        );
        plus.assert_no_publish_before_marker().await;
    })
    .await
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_one_copy_at_max_qos() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut sub = V3Client::connect(b.mqtt_addr(), "overlap").await;
        sub.subscribe("ov/#", Q3::AtMostOnce).await;
        sub.subscribe("ov/+", Q3::AtLeastOnce).await;
        let mut publ = V3Client::connect(b.mqtt_addr(), "overlap-pub").await;
        publ.publish("ov/x", Q3::ExactlyOnce, false, "one").await;
        let p = sub.recv_publish().await;
        assert_eq!(p.qos, Q3::AtLeastOnce, "max of the matching grants");
        sub.assert_no_publish_before_marker().await;

        eprintln!("--- resubscribing replaces the subscription's QoS");
        sub.subscribe("ov/+", Q3::AtMostOnce).await;
        publ.publish("ov/x", Q3::ExactlyOnce, false, "two").await;
        assert_eq!(sub.recv_publish().await.qos, Q3::AtMostOnce);
        sub.assert_no_publish_before_marker().await;
    })
    .await
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut s3 = V3Client::connect(b.mqtt_addr(), "unsub3").await;
        let mut s5 = V5Client::connect(b.mqtt_addr(), "unsub5").await;
        s3.subscribe("unsub/t", Q3::AtLeastOnce).await;
        s5.subscribe("unsub/t", Q5::AtLeastOnce).await;
        let mut publ = V3Client::connect(b.mqtt_addr(), "unsub-pub").await;
        publ.publish("unsub/t", Q3::AtLeastOnce, false, "a").await;
        s3.recv_publish().await;
        s5.recv_publish().await;
        s3.unsubscribe("unsub/t").await;
        s5.unsubscribe("unsub/t").await;
        publ.publish("unsub/t", Q3::AtLeastOnce, false, "b").await;
        s3.assert_no_publish_before_marker().await;
        s5.assert_no_publish_before_marker().await;
    })
    .await
}

/// Collects `total` messages spread over several clients; returns payloads per client.
async fn collect_spread(members: &mut [V5Client], total: usize) -> Vec<Vec<String>> {
    let mut per: Vec<Vec<String>> = vec![Vec::new(); members.len()];
    let deadline = tokio::time::Instant::now() + WAIT;
    while per.iter().map(Vec::len).sum::<usize>() < total {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {per:?} of {total} messages arrived"
        );
        for (i, m) in members.iter_mut().enumerate() {
            if let Some(p) = m.try_recv_publish(Duration::from_millis(20)).await {
                per[i].push(text(&p.payload));
            }
        }
    }
    for m in members.iter_mut() {
        m.assert_no_publish_before_marker().await;
    }
    per
}

#[tokio::test]
async fn shared_subscription_delivers_each_message_to_one_member() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut members = Vec::new();
        for i in 0..3 {
            let mut m = V5Client::connect(b.mqtt_addr(), &format!("share-m{i}")).await;
            m.subscribe("$share/g1/share/t/#", Q5::AtLeastOnce).await;
            members.push(m);
        }
        let mut plain = V5Client::connect(b.mqtt_addr(), "share-plain").await;
        plain.subscribe("share/t/#", Q5::AtLeastOnce).await;
        let mut publ = V5Client::connect(b.mqtt_addr(), "share-pub").await;
        for i in 0..30 {
            publ.publish(
                &format!("share/t/{}", i % 4),
                Q5::AtLeastOnce,
                false,
                format!("{i}"),
            )
            .await;
        }
        let per = collect_spread(&mut members, 30).await;
        let union: BTreeSet<&String> = per.iter().flatten().collect();
        assert_eq!(
            union.len(),
            30,
            "every message once across the group: {per:?}"
        );
        assert!(
            per.iter().all(|v| !v.is_empty()),
            "every member gets some: {per:?}"
        );
        let plain_got = plain.recv_publishes(30).await;
        assert_eq!(plain_got.len(), 30, "a normal subscription still gets all");
        plain.assert_no_publish_before_marker().await;
    })
    .await
}

#[tokio::test]
async fn shared_subscription_v311_members() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut a = V3Client::connect(b.mqtt_addr(), "share3-a").await;
        let mut c = V3Client::connect(b.mqtt_addr(), "share3-b").await;
        a.subscribe("$share/g3/share3/t", Q3::AtLeastOnce).await;
        c.subscribe("$share/g3/share3/t", Q3::AtLeastOnce).await;
        let mut publ = V3Client::connect(b.mqtt_addr(), "share3-pub").await;
        for i in 0..10 {
            publ.publish("share3/t", Q3::AtLeastOnce, false, format!("{i}"))
                .await;
        }
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        let (mut na, mut nc) = (0, 0);
        while got.len() < 10 {
            assert!(tokio::time::Instant::now() < deadline, "got only {got:?}");
            if let Some(p) = a.try_recv_publish(Duration::from_millis(20)).await {
                assert_eq!(p.topic, "share3/t", "delivered with the real topic name");
                got.push(text(&p.payload));
                na += 1;
            }
            if let Some(p) = c.try_recv_publish(Duration::from_millis(20)).await {
                got.push(text(&p.payload));
                nc += 1;
            }
        }
        a.assert_no_publish_before_marker().await;
        c.assert_no_publish_before_marker().await;
        got.sort_by_key(|s| s.parse::<u32>().unwrap_or(u32::MAX));
        let want: Vec<String> = (0..10).map(|i| i.to_string()).collect();
        assert_eq!(got, want);
        assert!(na > 0 && nc > 0, "both members get some ({na}, {nc})");
    })
    .await
}

#[tokio::test]
async fn shared_subscription_skips_disconnected_member() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut online = V5Client::connect(b.mqtt_addr(), "share-on").await;
        online
            .subscribe("$share/g2/share2/t", Q5::AtLeastOnce)
            .await;
        let mut offline = V5Client::connect_with(b.mqtt_addr(), "share-off", |o| {
            o.set_clean_start(false);
            set_session_expiry(o, 300);
        })
        .await;
        offline
            .subscribe("$share/g2/share2/t", Q5::AtLeastOnce)
            .await;
        offline.disconnect().await;
        wait_connections(&b, 1).await;

        let mut publ = V5Client::connect(b.mqtt_addr(), "share2-pub").await;
        for i in 0..10 {
            publ.publish("share2/t", Q5::AtLeastOnce, false, format!("{i}"))
                .await;
        }
        let got: Vec<String> = online
            .recv_publishes(10)
            .await
            .iter()
            .map(|p| text(&p.payload))
            .collect();
        let want: Vec<String> = (0..10).map(|i| i.to_string()).collect();
        assert_eq!(got, want, "all go to the connected member");
    })
    .await
}

#[tokio::test]
async fn no_local_subscription_option() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut me = V5Client::connect(b.mqtt_addr(), "nolocal").await;
        me.subscribe_with(
            vec![filter("nl/t", Q5::AtLeastOnce, |f| f.nolocal = true)],
            None,
        )
        .await;
        me.subscribe("nl/u", Q5::AtLeastOnce).await;
        me.publish("nl/t", Q5::AtLeastOnce, false, "own").await;
        let mut other = V5Client::connect(b.mqtt_addr(), "nolocal-other").await;
        other.publish("nl/t", Q5::AtLeastOnce, false, "other").await;
        let p = me.recv_publish().await;
        assert_eq!(
            text(&p.payload),
            "other",
            "no local: own message not delivered"
        );
        me.assert_no_publish_before_marker().await;

        eprintln!("--- without the option the own message comes back");
        me.publish("nl/u", Q5::AtLeastOnce, false, "own-u").await;
        assert_eq!(text(&me.recv_publish().await.payload), "own-u");
    })
    .await
}

#[tokio::test]
async fn retain_as_published_option() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut rap = V5Client::connect(b.mqtt_addr(), "rap-yes").await;
        rap.subscribe_with(
            vec![filter("rap/t", Q5::AtLeastOnce, |f| {
                f.preserve_retain = true
            })],
            None,
        )
        .await;
        let mut norap = V5Client::connect(b.mqtt_addr(), "rap-no").await;
        norap.subscribe("rap/t", Q5::AtLeastOnce).await;
        let mut v3 = V3Client::connect(b.mqtt_addr(), "rap-v3").await;
        v3.subscribe("rap/t", Q3::AtLeastOnce).await;

        let mut publ = V5Client::connect(b.mqtt_addr(), "rap-pub").await;
        publ.publish("rap/t", Q5::AtLeastOnce, true, "kept").await;
        assert!(
            rap.recv_publish().await.retain,
            "retain as published keeps RETAIN=1"
        );
        assert!(
            !norap.recv_publish().await.retain,
            "live delivery clears RETAIN"
        );
        assert!(
            !v3.recv_publish().await.retain,
            "3.1.1 live delivery clears RETAIN"
        );
        publ.publish("rap/t", Q5::AtLeastOnce, false, "plain").await;
        assert!(!rap.recv_publish().await.retain);
    })
    .await
}

#[tokio::test]
async fn subscription_identifiers_delivered() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut sub = V5Client::connect(b.mqtt_addr(), "subid").await;
        assert_ne!(
            sub.connack_props().subscription_identifiers_available,
            Some(0),
            "subscription identifiers are available"
        );
        sub.subscribe_with(
            vec![p5::Filter::new("sid/a/#", Q5::AtMostOnce)],
            Some(sub_id(7)),
        )
        .await;
        sub.subscribe_with(
            vec![p5::Filter::new("sid/a/+", Q5::AtLeastOnce)],
            Some(sub_id(9)),
        )
        .await;
        sub.subscribe("sid/z", Q5::AtLeastOnce).await;
        sub.subscribe_with(
            vec![p5::Filter::new("sid/big", Q5::AtLeastOnce)],
            Some(sub_id(268_435_455)),
        )
        .await;
        let mut publ = V5Client::connect(b.mqtt_addr(), "subid-pub").await;
        let ids = |p: &p5::Publish| -> Vec<usize> {
            let mut v = p
                .properties
                .as_ref()
                .map(|p| p.subscription_identifiers.clone())
                .unwrap_or_default();
            v.sort();
            v
        };

        publ.publish("sid/a/b", Q5::AtLeastOnce, false, "both")
            .await;
        let p = sub.recv_publish().await;
        assert_eq!(ids(&p), vec![7, 9], "one copy carrying both identifiers");
        assert_eq!(p.qos, Q5::AtLeastOnce, "at the max granted QoS");
        sub.assert_no_publish_before_marker().await;

        publ.publish("sid/a/b/c", Q5::AtLeastOnce, false, "deep")
            .await;
        let p = sub.recv_publish().await;
        assert_eq!(ids(&p), vec![7]);
        assert_eq!(p.qos, Q5::AtMostOnce);

        publ.publish("sid/z", Q5::AtLeastOnce, false, "none").await;
        assert_eq!(ids(&sub.recv_publish().await), Vec::<usize>::new());

        publ.publish("sid/big", Q5::AtLeastOnce, false, "max").await;
        assert_eq!(ids(&sub.recv_publish().await), vec![268_435_455]);
    })
    .await
}

#[tokio::test]
async fn topic_alias_inbound() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut sub = V3Client::connect(b.mqtt_addr(), "tai-sub").await;
        sub.subscribe("tai/#", Q3::AtLeastOnce).await;
        let mut publ = V5Client::connect(b.mqtt_addr(), "tai-pub").await;
        assert_eq!(
            publ.connack_props().topic_alias_max,
            Some(64),
            "Topic Alias Maximum"
        );
        let alias = |a| p5::PublishProperties {
            topic_alias: Some(a),
            ..Default::default()
        };
        publ.publish_with("tai/one", Q5::AtLeastOnce, false, "1", alias(1))
            .await;
        publ.publish_with("", Q5::AtLeastOnce, false, "2", alias(1))
            .await;
        publ.publish_with("tai/two", Q5::AtLeastOnce, false, "3", alias(1))
            .await;
        publ.publish_with("", Q5::AtLeastOnce, false, "4", alias(1))
            .await;
        publ.publish_with("tai/max", Q5::AtLeastOnce, false, "5", alias(64))
            .await;
        publ.publish_with("", Q5::AtMostOnce, false, "6", alias(64))
            .await;
        let got: Vec<(String, String)> = sub
            .recv_publishes(6)
            .await
            .into_iter()
            .map(|p| (p.topic, text(&p.payload)))
            .collect();
        let want: Vec<(String, String)> = [
            ("tai/one", "1"),
            ("tai/one", "2"),
            ("tai/two", "3"),
            ("tai/two", "4"),
            ("tai/max", "5"),
            ("tai/max", "6"),
        ]
        .iter()
        .map(|(t, p)| (t.to_string(), p.to_string()))
        .collect();
        assert_eq!(got, want);
    })
    .await
}

#[tokio::test]
async fn topic_alias_invalid_inbound() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut bystander = Bystander::new(&b, "alias").await;

        eprintln!("--- alias above the maximum: 0x94");
        let (mut raw, _) = RawClient::handshake(b.mqtt_addr(), &Connect::v5("tabad1")).await;
        raw.send(&pkt::publish(
            true,
            "ta/x",
            b"x",
            0,
            0,
            false,
            false,
            &[prop::u16(prop::TOPIC_ALIAS, 65)],
        ))
        .await;
        let got = raw.expect_closed(WAIT).await;
        assert_eq!(
            got.last().map(RawPacket::disconnect_reason),
            Some(0x94),
            "Topic Alias invalid: {got:?}"
        );

        eprintln!("--- empty topic with an unknown alias: protocol error");
        let (mut raw, _) = RawClient::handshake(b.mqtt_addr(), &Connect::v5("tabad2")).await;
        raw.send(&pkt::publish(
            true,
            "",
            b"x",
            0,
            0,
            false,
            false,
            &[prop::u16(prop::TOPIC_ALIAS, 3)],
        ))
        .await;
        let got = raw.expect_closed(WAIT).await;
        let code = got.last().map(RawPacket::disconnect_reason);
        assert!(
            matches!(code, Some(0x82) | Some(0x94)),
            "unknown alias is a protocol error: {got:?}"
        );

        eprintln!("--- empty topic without alias: protocol error");
        let (mut raw, _) = RawClient::handshake(b.mqtt_addr(), &Connect::v5("tabad3")).await;
        raw.send(&pkt::publish(true, "", b"x", 0, 0, false, false, &[]))
            .await;
        let got = raw.expect_closed(WAIT).await;
        let code = got.last().map(RawPacket::disconnect_reason);
        assert!(
            matches!(code, Some(0x82) | Some(0x81)),
            "empty topic without alias: {got:?}"
        );
        bystander.check().await;
    })
    .await
}

#[tokio::test]
async fn topic_alias_outbound_respects_client_maximum() {
    test_timeout(async {
        let b = Broker::start().await;
        // Raw, to see the wire: rumqttc fills in an aliased topic before the test sees it.
        let connect = Connect::v5("tao-2").property(prop::u16(prop::TOPIC_ALIAS_MAXIMUM, 2));
        let (mut small, _) = RawClient::handshake(b.mqtt_addr(), &connect).await;
        small
            .send(&pkt::subscribe(true, 1, &[("tao/#", 0)], &[]))
            .await;
        small.expect_kind(kind::SUBACK, WAIT).await;
        let (mut none, _) = RawClient::handshake(b.mqtt_addr(), &Connect::v5("tao-0")).await;
        none.send(&pkt::subscribe(true, 1, &[("tao/#", 0)], &[]))
            .await;
        none.expect_kind(kind::SUBACK, WAIT).await;

        let mut publ = V5Client::connect(b.mqtt_addr(), "tao-pub").await;
        let topics = ["tao/a", "tao/b", "tao/c", "tao/d"];
        for round in 0..3 {
            for t in topics {
                publ.publish(t, Q5::AtLeastOnce, false, format!("{t} {round}"))
                    .await;
            }
        }
        let alias_of = |p: &petrel_tests::RawPublish| {
            p.properties.iter().find_map(|(id, v)| match v {
                pkt::PropValue::U16(a) if *id == prop::TOPIC_ALIAS => Some(*a),
                _ => None,
            })
        };
        let mut aliases: BTreeMap<u16, String> = BTreeMap::new();
        let mut by_alias_only = 0;
        for _ in 0..12 {
            let p = small.expect_packet(WAIT, "PUBLISH").await.publish(true);
            let payload = text(&p.payload);
            let topic = match (p.topic.is_empty(), alias_of(&p)) {
                (false, None) => p.topic.clone(),
                (_, Some(a)) if !(1..=2).contains(&a) => {
                    panic!("alias {a} beyond the client's maximum 2: {p:?}")
                }
                (false, Some(a)) => {
                    aliases.insert(a, p.topic.clone());
                    p.topic.clone()
                }
                (true, Some(a)) => {
                    by_alias_only += 1;
                    aliases
                        .get(&a)
                        .unwrap_or_else(|| panic!("alias {a} used before it was set: {p:?}"))
                        .clone()
                }
                (true, None) => panic!("empty topic without an alias: {p:?}"),
            };
            assert!(
                payload.starts_with(&format!("{topic} ")),
                "{payload} on {topic}"
            );
        }
        assert!(
            by_alias_only > 0,
            "the broker never sent a topic by alias alone (aliases set: {aliases:?})"
        );

        for _ in 0..12 {
            let q = none.expect_packet(WAIT, "PUBLISH").await.publish(true);
            assert_eq!(
                alias_of(&q),
                None,
                "alias to a client without Topic Alias Maximum"
            );
            assert!(
                text(&q.payload).starts_with(&format!("{} ", q.topic)),
                "{q:?}"
            );
        }
    })
    .await
}

#[tokio::test]
async fn invalid_topic_filters_get_failure_suback_and_connection_stays() {
    test_timeout(async {
        let b = Broker::start().await;
        let bad = ["a/#/b", "a/b#", "a+/b", "+a"];

        eprintln!("--- v5: 0x8F per invalid filter");
        let (mut raw, _) = RawClient::handshake(b.mqtt_addr(), &Connect::v5("badfilter5")).await;
        let mut filters: Vec<(&str, u8)> = bad.iter().map(|f| (*f, 1)).collect();
        filters.push(("ok5/+", 1));
        raw.send(&pkt::subscribe(true, 5, &filters, &[])).await;
        let (ack, _) = raw.expect_kind(kind::SUBACK, WAIT).await;
        assert_eq!(ack.pkid(), 5);
        assert_eq!(ack.suback_codes(true), vec![0x8F, 0x8F, 0x8F, 0x8F, 0x01]);
        raw.ping().await;

        eprintln!("--- 3.1.1: 0x80 per invalid filter");
        let (mut raw3, _) = RawClient::handshake(b.mqtt_addr(), &Connect::v311("badfilter3")).await;
        let mut filters: Vec<(&str, u8)> = bad.iter().map(|f| (*f, 1)).collect();
        filters.push(("ok3/+", 2));
        raw3.send(&pkt::subscribe(false, 6, &filters, &[])).await;
        let (ack, _) = raw3.expect_kind(kind::SUBACK, WAIT).await;
        assert_eq!(ack.suback_codes(false), vec![0x80, 0x80, 0x80, 0x80, 0x02]);
        raw3.ping().await;

        eprintln!("--- the valid filters work");
        let mut publ = V3Client::connect(b.mqtt_addr(), "badfilter-pub").await;
        publ.publish("ok5/x", Q3::AtLeastOnce, false, "5").await;
        publ.publish("ok3/x", Q3::AtLeastOnce, false, "3").await;
        let p = raw.expect_kind(kind::PUBLISH, WAIT).await.0.publish(true);
        assert_eq!(p.topic, "ok5/x");
        let p = raw3.expect_kind(kind::PUBLISH, WAIT).await.0.publish(false);
        assert_eq!(p.topic, "ok3/x");
    })
    .await
}

#[tokio::test]
async fn shared_subscription_gets_no_retained_messages_on_subscribe() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut publ = V5Client::connect(b.mqtt_addr(), "shret-pub").await;
        publ.publish("shret/t", Q5::AtLeastOnce, true, "kept").await;
        let mut m = V5Client::connect(b.mqtt_addr(), "shret-m").await;
        m.subscribe("$share/g/shret/t", Q5::AtLeastOnce).await;
        m.assert_no_publish_before_marker().await;
        publ.publish("shret/t", Q5::AtLeastOnce, false, "live")
            .await;
        assert_eq!(text(&m.recv_publish().await.payload), "live");
    })
    .await
}

#[tokio::test]
async fn invalid_shared_subscription_filters() {
    test_timeout(async {
        let b = Broker::start().await;
        let (mut raw, _) = RawClient::handshake(b.mqtt_addr(), &Connect::v5("badshare")).await;
        let filters = [
            ("$share/g+/x", 1),
            ("$share//x", 1),
            ("$share/g", 1),
            ("$share/ok/x", 1),
        ];
        raw.send(&pkt::subscribe(true, 2, &filters, &[])).await;
        let (ack, _) = raw.expect_kind(kind::SUBACK, WAIT).await;
        assert_eq!(ack.suback_codes(true), vec![0x8F, 0x8F, 0x8F, 0x01]);
        raw.ping().await;
    })
    .await
}

#[tokio::test]
async fn no_local_on_shared_subscription_is_a_protocol_error() {
    test_timeout(async {
        let b = Broker::start().await;
        let (mut raw, _) = RawClient::handshake(b.mqtt_addr(), &Connect::v5("nlshare")).await;
        // options: QoS 1 | No Local (bit 2)
        raw.send(&pkt::subscribe(
            true,
            3,
            &[("$share/g/nl/t", 0b0000_0101)],
            &[],
        ))
        .await;
        let got = raw.expect_closed(WAIT).await;
        assert_eq!(
            got.last().map(RawPacket::disconnect_reason),
            Some(0x82),
            "No Local on a shared subscription: {got:?}"
        );
    })
    .await
}

#[tokio::test]
async fn subscription_identifier_zero_is_a_protocol_error() {
    test_timeout(async {
        let b = Broker::start().await;
        let (mut raw, _) = RawClient::handshake(b.mqtt_addr(), &Connect::v5("subid0")).await;
        raw.send(&pkt::subscribe(
            true,
            4,
            &[("sid0/t", 1)],
            &[prop::var(prop::SUBSCRIPTION_ID, 0)],
        ))
        .await;
        let got = raw.expect_closed(WAIT).await;
        let code = got.last().map(RawPacket::disconnect_reason);
        assert!(
            matches!(code, Some(0x81) | Some(0x82)),
            "Subscription Identifier 0: {got:?}"
        );
    })
    .await
}

#[tokio::test]
async fn unsuback_reason_codes_v5() {
    test_timeout(async {
        let b = Broker::start().await;
        let (mut raw, _) = RawClient::handshake(b.mqtt_addr(), &Connect::v5("unsubrc")).await;
        raw.send(&pkt::subscribe(true, 1, &[("unsubrc/a", 0)], &[]))
            .await;
        raw.expect_kind(kind::SUBACK, WAIT).await;
        let mut body = 2u16.to_be_bytes().to_vec();
        body.extend(pkt::props(&[]));
        body.extend(pkt::string("unsubrc/a"));
        body.extend(pkt::string("unsubrc/never"));
        raw.send(&pkt::frame(0xA2, &body)).await;
        let (ack, _) = raw.expect_kind(kind::UNSUBACK, WAIT).await;
        assert_eq!(ack.pkid(), 2);
        let (len, n) = pkt::read_varint(&ack.body[2..]).expect("property length");
        assert_eq!(
            &ack.body[2 + n + len..],
            &[0x00, 0x11],
            "Success, No subscription existed"
        );
    })
    .await
}

#[tokio::test]
async fn leading_slash_is_its_own_level() {
    test_timeout(async {
        let b = Broker::start().await;
        let mut sub = V3Client::connect(b.mqtt_addr(), "slash").await;
        sub.subscribe("+/slash/+", Q3::AtLeastOnce).await;
        let mut publ = V3Client::connect(b.mqtt_addr(), "slash-pub").await;
        publ.publish("slash/x", Q3::AtLeastOnce, false, "no").await;
        publ.publish("/slash/x", Q3::AtLeastOnce, false, "yes")
            .await;
        let p = sub.recv_publish().await;
        assert_eq!(
            (p.topic.as_str(), text(&p.payload).as_str()),
            ("/slash/x", "yes")
        );
        sub.assert_no_publish_before_marker().await;
    })
    .await
}
