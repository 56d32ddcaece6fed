//! The Raft log's byte format is a promise to every later version: these fixtures were
//! written by this format and must decode to the same values forever. A change that breaks
//! one is a change that breaks an older node's log (or a rolling upgrade).
//!
//! `PETREL_BLESS_FIXTURES=1 cargo test -p petrel-node --lib cluster::` writes fixtures that
//! are missing (never overwrites one).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use openraft::entry::RaftEntry;
use openraft::EntryPayload;
use petrel_cluster_proto::pb;
use petrel_storage::RaftCodec;

use super::*;
use crate::cluster::sm::ClusterState;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../cluster-proto/fixtures/v1")
}

fn check(name: &str, bytes: &[u8]) -> Vec<u8> {
    let path = dir().join(name);
    match std::fs::read(&path) {
        Ok(fixture) => fixture,
        Err(_) if std::env::var_os("PETREL_BLESS_FIXTURES").is_some() => {
            std::fs::create_dir_all(dir()).unwrap();
            std::fs::write(&path, bytes).unwrap();
            bytes.to_vec()
        }
        Err(e) => panic!(
            "fixture {} is missing ({e}); write it with PETREL_BLESS_FIXTURES=1",
            path.display()
        ),
    }
}

fn id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term), index)
}

fn cmd(c: pb::command::Cmd) -> pb::Command {
    pb::Command { cmd: Some(c) }
}

fn will() -> pb::Will {
    pb::Will {
        message: bytes::Bytes::from_static(b"\x00\x01stored will"),
        delay_secs: 30,
    }
}

/// One command of every kind.
fn commands() -> Vec<(&'static str, pb::Command)> {
    use pb::command::Cmd;
    let route = pb::Route {
        filter: "sensors/+/temp".into(),
        share_group: "g1".into(),
        node_id: 2,
    };
    vec![
        (
            "member-up",
            cmd(Cmd::MemberUp(pb::MemberUp {
                node_id: 2,
                grpc_addr: "petrel-2.petrel:7883".into(),
                mqtt_addr: "petrel-2.petrel:1883".into(),
                version: "0.1.0".into(),
                wire_level: 0,
            })),
        ),
        (
            "member-drain",
            cmd(Cmd::MemberDrain(pb::MemberDrain {
                node_id: 2,
                draining: true,
            })),
        ),
        (
            "member-remove",
            cmd(Cmd::MemberRemove(pb::MemberRemove {
                node_id: 3,
                at_ms: 1_765_000_000_000,
            })),
        ),
        (
            "route-add",
            cmd(Cmd::RouteAdd(pb::RouteAdd {
                route: Some(route.clone()),
            })),
        ),
        (
            "route-del",
            cmd(Cmd::RouteDel(pb::RouteDel { route: Some(route) })),
        ),
        (
            "claim",
            cmd(Cmd::Claim(pb::Claim {
                client_id: "device-17".into(),
                node_id: 1,
                clean_start: false,
                expiry_secs: 3600,
                will: Some(will()),
                at_ms: 1_765_000_000_123,
                with_routes: false,
                keep_replaced_will: false,
            })),
        ),
        (
            "session-disconnected",
            cmd(Cmd::SessionDisconnected(pb::SessionDisconnected {
                client_id: "device-17".into(),
                epoch: 9,
                at_ms: 1_765_000_000_456,
                will: Some(will()),
                keep_will: false,
                expiry_secs: None,
                drained: false,
            })),
        ),
        (
            "session-end",
            cmd(Cmd::SessionEnd(pb::SessionEnd {
                client_id: "device-17".into(),
                epoch: 9,
            })),
        ),
        (
            "sub-put",
            cmd(Cmd::SubPut(pb::SubPut {
                sub: Some(pb::Subscription {
                    client_id: "device-17".into(),
                    filter: "$share/g1/cmd/#".into(),
                    options: 0b0010_0101,
                    subscription_id: 42,
                    acl_filtered: true,
                    // As the first version wrote it (no epoch).
                    epoch: 0,
                }),
            })),
        ),
        (
            "sub-del",
            cmd(Cmd::SubDel(pb::SubDel {
                client_id: "device-17".into(),
                filter: "cmd/#".into(),
                epoch: 0,
            })),
        ),
        (
            "retain-set",
            cmd(Cmd::RetainSet(pb::RetainSet {
                topic: "status/device-17".into(),
                message: bytes::Bytes::from_static(b"\x00\x01online"),
            })),
        ),
        (
            "retain-clear",
            cmd(Cmd::RetainClear(pb::RetainClear {
                topic: "status/device-17".into(),
            })),
        ),
        (
            "will-fired",
            cmd(Cmd::WillFired(pb::WillFired {
                client_id: "device-17".into(),
                epoch: 9,
                node_id: 2,
                at_ms: 0,
            })),
        ),
        (
            "sub-put-epoch",
            cmd(Cmd::SubPut(pb::SubPut {
                sub: Some(pb::Subscription {
                    client_id: "device-17".into(),
                    filter: "cmd/#".into(),
                    options: 0b0000_0001,
                    subscription_id: 0,
                    acl_filtered: false,
                    epoch: 12,
                }),
            })),
        ),
        (
            "sub-del-epoch",
            cmd(Cmd::SubDel(pb::SubDel {
                client_id: "device-17".into(),
                filter: "cmd/#".into(),
                epoch: 12,
            })),
        ),
        (
            "session-disconnected-keep-will",
            cmd(Cmd::SessionDisconnected(pb::SessionDisconnected {
                client_id: "device-17".into(),
                epoch: 9,
                at_ms: 1_765_000_000_456,
                will: None,
                keep_will: true,
                expiry_secs: None,
                drained: false,
            })),
        ),
        (
            "will-fired-at",
            cmd(Cmd::WillFired(pb::WillFired {
                client_id: "device-17".into(),
                epoch: 9,
                node_id: 2,
                at_ms: 1_765_000_000_789,
            })),
        ),
        (
            "session-disconnected-expiry",
            cmd(Cmd::SessionDisconnected(pb::SessionDisconnected {
                client_id: "device-17".into(),
                epoch: 9,
                at_ms: 1_765_000_000_456,
                will: None,
                keep_will: false,
                expiry_secs: Some(0),
                drained: false,
            })),
        ),
        (
            "member-up-wire-level",
            cmd(Cmd::MemberUp(pb::MemberUp {
                node_id: 2,
                grpc_addr: "petrel-2.petrel:7883".into(),
                mqtt_addr: "petrel-2.petrel:1883".into(),
                version: "0.2.0".into(),
                wire_level: 2,
            })),
        ),
        (
            "claim-with-routes",
            cmd(Cmd::Claim(pb::Claim {
                client_id: "device-17".into(),
                node_id: 2,
                clean_start: false,
                expiry_secs: 3600,
                will: Some(will()),
                at_ms: 1_765_000_000_789,
                with_routes: true,
                keep_replaced_will: false,
            })),
        ),
        (
            "claim-keep-replaced-will",
            cmd(Cmd::Claim(pb::Claim {
                client_id: "device-17".into(),
                node_id: 3,
                clean_start: false,
                expiry_secs: 3600,
                will: None,
                at_ms: 1_765_000_001_234,
                with_routes: true,
                keep_replaced_will: true,
            })),
        ),
        (
            "session-disconnected-drained",
            cmd(Cmd::SessionDisconnected(pb::SessionDisconnected {
                client_id: "device-17".into(),
                epoch: 9,
                at_ms: 1_765_000_001_456,
                will: None,
                keep_will: true,
                expiry_secs: Some(3600),
                drained: true,
            })),
        ),
    ]
}

fn membership() -> Membership {
    let nodes: BTreeMap<u64, RaftNode> = (0..4)
        .map(|i| {
            (
                i,
                RaftNode {
                    grpc_addr: format!("petrel-{i}.petrel:7883"),
                },
            )
        })
        .collect();
    Membership::new(vec![BTreeSet::from([0, 1, 2])], nodes).unwrap()
}

#[test]
fn every_entry_kind_decodes_from_its_fixture() {
    let mut entries: Vec<(String, Entry)> = vec![
        ("entry-blank.bin".into(), Entry::new_blank(id(3, 10))),
        (
            "entry-membership.bin".into(),
            Entry::new_membership(id(3, 11), membership()),
        ),
    ];
    for (i, (name, c)) in commands().into_iter().enumerate() {
        let batch = Batch(pb::CommandBatch { commands: vec![c] });
        entries.push((
            format!("entry-cmd-{name}.bin"),
            Entry::new(id(4, 20 + i as u64), EntryPayload::Normal(batch)),
        ));
    }
    for (name, expected) in entries {
        let encoded = Codec::encode_entry(&expected);
        let fixture = check(&name, &encoded);
        let decoded = Codec::decode_entry(&fixture).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(decoded.log_id, expected.log_id, "{name}");
        assert_eq!(
            format!("{:?}", decoded.payload),
            format!("{:?}", expected.payload),
            "{name}"
        );
        assert_eq!(fixture, encoded, "{name}: the encoding changed");
    }
}

#[test]
fn vote_and_log_id_decode_from_their_fixtures() {
    let vote = Vote::new_committed(7, 2);
    let fixture = check("vote.bin", &Codec::encode_vote(&vote));
    assert_eq!(Codec::decode_vote(&fixture).unwrap(), vote);
    let log_id = id(7, 12_345);
    let fixture = check("log-id.bin", &Codec::encode_log_id(&log_id));
    assert_eq!(Codec::decode_log_id(&fixture).unwrap(), log_id);
}

#[test]
fn a_snapshot_decodes_from_its_fixture() {
    let mut st = ClusterState::default();
    // The commands of wire level 2 (at the end) are left out: the older fixtures hold the
    // state of the earlier list.
    for (name, c) in commands() {
        if !matches!(
            name,
            "member-up-wire-level"
                | "claim-with-routes"
                | "claim-keep-replaced-will"
                | "session-disconnected-drained"
        ) {
            st.apply(c);
        }
    }
    // Leave something of each kind in the state.
    for (_, c) in commands().into_iter().take(6) {
        st.apply(c);
    }
    let sub = commands().remove(8).1;
    st.apply(sub);
    // Retained messages are applied to the node's retained store, not to the state.
    let retained = match commands().remove(10).1.cmd {
        Some(pb::command::Cmd::RetainSet(r)) => vec![(r.topic, r.message)],
        other => panic!("expected RetainSet, got {other:?}"),
    };
    let meta = SnapshotMeta {
        last_log_id: Some(id(5, 99)),
        last_membership: StoredMembership::new(Some(id(3, 11)), membership()),
    };
    // The first version's records had no `started_epoch`: its fixture still decodes, to the
    // same state but for that field.
    let mut first = st.clone();
    for r in first.sessions.values_mut() {
        r.started_epoch = 0;
        r.claimed_at_ms = 0;
    }
    let fixture = check("snapshot.bin", &first.encode_snapshot(&retained));
    let (old, _) = ClusterState::decode_snapshot(&fixture, &meta).unwrap();
    assert_eq!(old.sessions, first.sessions);
    assert!(st.sessions.values().all(|r| r.started_epoch != 0));
    // Nor had the second version's `claimed_at_ms`.
    let mut second = st.clone();
    for r in second.sessions.values_mut() {
        r.claimed_at_ms = 0;
    }
    let fixture = check(
        "snapshot-started-epoch.bin",
        &second.encode_snapshot(&retained),
    );
    let (old, _) = ClusterState::decode_snapshot(&fixture, &meta).unwrap();
    assert_eq!(old.sessions, second.sessions);
    assert!(st.sessions.values().all(|r| r.claimed_at_ms != 0));
    let encoded = st.encode_snapshot(&retained);
    let fixture = check("snapshot-claimed-at.bin", &encoded);
    let (decoded, decoded_retained) = ClusterState::decode_snapshot(&fixture, &meta).unwrap();
    assert_eq!(decoded.members, st.members);
    assert_eq!(decoded.routes.entries(), st.routes.entries());
    assert_eq!(decoded.sessions, st.sessions);
    assert_eq!(decoded.subscriptions, st.subscriptions);
    let decoded_retained: Vec<_> = decoded_retained
        .into_iter()
        .map(|r| (r.topic, r.message))
        .collect();
    assert_eq!(decoded_retained, retained);
    assert_eq!(decoded.next_epoch, st.next_epoch);
    assert!(!decoded.sessions.is_empty() && !retained.is_empty());
    assert!(!decoded.members.is_empty() && !decoded.subscriptions.is_empty()); // Wire level 2: members announce their level, records keep their claim's index.
    let mut third = st.clone();
    for r in third.sessions.values_mut() {
        r.claimed_at_index = 77;
    }
    for m in third.members.values_mut() {
        m.wire_level = 2;
    }
    let encoded = third.encode_snapshot(&retained);
    let fixture = check("snapshot-wire-level.bin", &encoded);
    assert_eq!(fixture, encoded, "the encoding changed");
    let (decoded, _) = ClusterState::decode_snapshot(&fixture, &meta).unwrap();
    assert_eq!(decoded.members, third.members);
    assert_eq!(decoded.sessions, third.sessions);
    // Wire level 4: records replaced by a claim elsewhere with their wills due.
    let mut fourth = third.clone();
    let mut replaced = fourth.sessions.values().next().unwrap().clone();
    replaced.will = Some(will());
    replaced.connected = true;
    fourth.replaced_wills.insert(
        (replaced.client_id.as_str().into(), replaced.epoch),
        replaced,
    );
    let encoded = fourth.encode_snapshot(&retained);
    let fixture = check("snapshot-replaced-will.bin", &encoded);
    assert_eq!(fixture, encoded, "the encoding changed");
    let (decoded, _) = ClusterState::decode_snapshot(&fixture, &meta).unwrap();
    assert_eq!(decoded.replaced_wills, fourth.replaced_wills);
    assert_eq!(decoded.sessions, fourth.sessions);
}

#[test]
fn an_entry_of_a_newer_format_is_refused() {
    let mut e = entry_pb(&Entry::new_blank(id(1, 1)));
    e.format = petrel_cluster_proto::ENTRY_FORMAT + 1;
    let bytes = prost::Message::encode_to_vec(&e);
    let err = Codec::decode_entry(&bytes).unwrap_err();
    assert!(err.to_string().contains("newer"), "{err}");
}
