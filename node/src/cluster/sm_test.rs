use pb::command::Cmd;
use petrel_cluster_proto::pb;

use super::raft::SnapshotMeta;
use super::ClusterState;
use crate::router::RouteTable;

fn c(cmd: Cmd) -> pb::Command {
    pb::Command { cmd: Some(cmd) }
}

fn claim(client: &str, node: u64, clean: bool, expiry: u32, at_ms: u64) -> pb::Command {
    c(Cmd::Claim(pb::Claim {
        client_id: client.into(),
        node_id: node,
        clean_start: clean,
        expiry_secs: expiry,
        will: Some(pb::Will {
            message: bytes::Bytes::from_static(b"will"),
            delay_secs: 0,
        }),
        at_ms,
        with_routes: false,
        keep_replaced_will: false,
    }))
}

/// A claim of wire level 4: it keeps the will of a record it replaces.
fn claim_keeping(client: &str, node: u64, clean: bool, will_delay: Option<u32>) -> pb::Command {
    let mut cmd = claim(client, node, clean, 60, 1000);
    if let Some(Cmd::Claim(c)) = cmd.cmd.as_mut() {
        c.keep_replaced_will = true;
        c.will = will_delay.map(|delay_secs| pb::Will {
            message: bytes::Bytes::from_static(b"will"),
            delay_secs,
        });
    }
    cmd
}

fn will_fired(client: &str, epoch: u64, node: u64) -> pb::Command {
    c(Cmd::WillFired(pb::WillFired {
        client_id: client.into(),
        epoch,
        node_id: node,
        at_ms: 2000,
    }))
}

/// A claim that brings a moving session's routes (wire level 2).
fn claim_with_routes(client: &str, node: u64) -> pb::Command {
    let mut cmd = claim(client, node, false, 60, 1000);
    if let Some(Cmd::Claim(c)) = cmd.cmd.as_mut() {
        c.with_routes = true;
    }
    cmd
}

fn claimed(o: pb::Outcome) -> pb::Claimed {
    match o.result {
        Some(pb::outcome::Result::Claimed(c)) => c,
        other => panic!("expected Claimed, got {other:?}"),
    }
}

fn is_done(o: &pb::Outcome) -> bool {
    matches!(o.result, Some(pb::outcome::Result::Done(_)))
}

#[test]
fn claims_take_growing_epochs_and_name_the_previous_owner() {
    let mut st = ClusterState::default();
    let a = claimed(st.apply(claim("dev", 1, false, 60, 1000)));
    assert!(!a.session_present);
    let b = claimed(st.apply(claim("dev", 2, false, 60, 2000)));
    assert!(b.epoch > a.epoch);
    assert!(b.session_present, "resumed, not clean start");
    assert_eq!((b.previous_node_id, b.previous_epoch), (1, a.epoch));
    assert!(b.previous_connected);
    let c2 = claimed(st.apply(claim("dev", 2, true, 60, 3000)));
    assert!(!c2.session_present, "clean start");
}

#[test]
fn a_persistent_session_expires_by_the_proposers_clock() {
    let mut st = ClusterState::default();
    let a = claimed(st.apply(claim("dev", 1, false, 10, 1000)));
    st.apply(c(Cmd::SubPut(pb::SubPut {
        sub: Some(pb::Subscription {
            client_id: "dev".into(),
            filter: "a/#".into(),
            ..Default::default()
        }),
    })));
    let gone = c(Cmd::SessionDisconnected(pb::SessionDisconnected {
        client_id: "dev".into(),
        epoch: a.epoch,
        at_ms: 5000,
        will: None,
        keep_will: false,
        expiry_secs: None,
        drained: false,
    }));
    assert!(is_done(&st.apply(gone)));
    // Within 10 s of the disconnect: present, subscriptions kept.
    let b = claimed(st.apply(claim("dev", 1, false, 10, 14_999)));
    assert!(b.session_present);
    assert_eq!(st.subscriptions["dev"].len(), 1);
    st.apply(c(Cmd::SessionDisconnected(pb::SessionDisconnected {
        client_id: "dev".into(),
        epoch: b.epoch,
        at_ms: 20_000,
        will: None,
        keep_will: false,
        expiry_secs: None,
        drained: false,
    })));
    // 10 s later: expired; its subscriptions go.
    let c3 = claimed(st.apply(claim("dev", 1, false, 10, 30_000)));
    assert!(!c3.session_present);
    assert!(!st.subscriptions.contains_key("dev"));
}

#[test]
fn a_clean_session_ends_with_its_connection_and_stale_epochs_are_ignored() {
    let mut st = ClusterState::default();
    let a = claimed(st.apply(claim("dev", 1, true, 0, 1000)));
    let b = claimed(st.apply(claim("dev", 2, true, 0, 1001)));
    // The first connection's end arrives after the takeover: ignored.
    let late = c(Cmd::SessionDisconnected(pb::SessionDisconnected {
        client_id: "dev".into(),
        epoch: a.epoch,
        at_ms: 1002,
        will: None,
        keep_will: false,
        expiry_secs: None,
        drained: false,
    }));
    assert!(!is_done(&st.apply(late)));
    assert!(st.sessions.contains_key("dev"));
    let end = c(Cmd::SessionDisconnected(pb::SessionDisconnected {
        client_id: "dev".into(),
        epoch: b.epoch,
        at_ms: 1003,
        will: None,
        keep_will: false,
        expiry_secs: None,
        drained: false,
    }));
    assert!(is_done(&st.apply(end)));
    assert!(!st.sessions.contains_key("dev"));
}

#[test]
fn a_will_fires_once() {
    let mut st = ClusterState::default();
    let a = claimed(st.apply(claim("dev", 1, false, 60, 1000)));
    let fire = |node| {
        c(Cmd::WillFired(pb::WillFired {
            client_id: "dev".into(),
            epoch: a.epoch,
            node_id: node,
            at_ms: 2000,
        }))
    };
    assert!(is_done(&st.apply(fire(2))));
    assert!(!is_done(&st.apply(fire(3))), "a second firing is stale");
    let rec = &st.sessions["dev"];
    assert!(
        !rec.connected && rec.disconnected_at_ms == 2000,
        "its node died: offline since"
    );
}

#[test]
fn a_pending_will_keeps_a_session_without_expiry_until_it_fires() {
    let mut st = ClusterState::default();
    let a = claimed(st.apply(claim("dev", 1, true, 0, 1000)));
    let gone = |keep_will| {
        c(Cmd::SessionDisconnected(pb::SessionDisconnected {
            client_id: "dev".into(),
            epoch: a.epoch,
            at_ms: 1500,
            will: None,
            keep_will,
            expiry_secs: None,
            drained: false,
        }))
    };
    assert!(is_done(&st.apply(gone(true))));
    assert!(st.sessions["dev"].will.is_some(), "kept for WillFired");
    let fire = c(Cmd::WillFired(pb::WillFired {
        client_id: "dev".into(),
        epoch: a.epoch,
        node_id: 1,
        at_ms: 1600,
    }));
    assert!(is_done(&st.apply(fire.clone())));
    assert!(!st.sessions.contains_key("dev"), "then the session ends");
    assert!(!is_done(&st.apply(fire)));
    eprintln!("--- a normal DISCONNECT drops the will with the session");
    let b = claimed(st.apply(claim("dev", 1, true, 0, 2000)));
    assert!(b.epoch > a.epoch);
    let bye = c(Cmd::SessionDisconnected(pb::SessionDisconnected {
        client_id: "dev".into(),
        epoch: b.epoch,
        at_ms: 2500,
        will: None,
        keep_will: false,
        expiry_secs: None,
        drained: false,
    }));
    assert!(is_done(&st.apply(bye)));
    assert!(!st.sessions.contains_key("dev"));
}

#[test]
fn removing_a_member_takes_its_routes_and_orphans_its_sessions() {
    let mut st = ClusterState::default();
    for n in [1, 2] {
        st.apply(c(Cmd::MemberUp(pb::MemberUp {
            node_id: n,
            ..Default::default()
        })));
        st.apply(c(Cmd::RouteAdd(pb::RouteAdd {
            route: Some(pb::Route {
                filter: "a/+".into(),
                share_group: String::new(),
                node_id: n,
            }),
        })));
    }
    // Idempotent.
    st.apply(c(Cmd::RouteAdd(pb::RouteAdd {
        route: Some(pb::Route {
            filter: "a/+".into(),
            share_group: String::new(),
            node_id: 2,
        }),
    })));
    st.apply(claim("clean", 2, true, 0, 1));
    st.apply(claim("kept", 2, false, 60, 1));
    st.apply(c(Cmd::MemberRemove(pb::MemberRemove {
        node_id: 2,
        at_ms: 500,
    })));
    let nodes = st.routes.nodes_of("", "a/+");
    assert_eq!(nodes.iter().copied().collect::<Vec<_>>(), vec![1]);
    assert!(!st.sessions.contains_key("clean"));
    let kept = &st.sessions["kept"];
    assert!(kept.orphaned && !kept.connected);
    assert_eq!(kept.disconnected_at_ms, 500);
    assert!(!st.members.contains_key(&2));
}

#[test]
fn a_clean_session_without_a_will_leaves_no_record() {
    let mut st = ClusterState::default();
    let bare = |at_ms| {
        c(Cmd::Claim(pb::Claim {
            client_id: "bare".into(),
            node_id: 1,
            clean_start: true,
            expiry_secs: 0,
            will: None,
            at_ms,
            with_routes: false,
            keep_replaced_will: false,
        }))
    };
    let a = claimed(st.apply(bare(1)));
    assert!(st.sessions.is_empty(), "nothing to resume, nothing to fire");
    let b = claimed(st.apply(bare(2)));
    assert!(b.epoch > a.epoch, "epochs still grow");
    // A persistent claim of the same id, then a bare one: the record goes.
    st.apply(claim("bare", 2, false, 60, 3));
    assert!(st.sessions.contains_key("bare"));
    let d = claimed(st.apply(bare(4)));
    assert_eq!(d.previous_node_id, 2);
    assert!(st.sessions.is_empty());
}

#[test]
fn a_subscription_change_of_an_older_epoch_is_stale() {
    let mut st = ClusterState::default();
    let a = claimed(st.apply(claim("dev", 1, false, 60, 1000)));
    let put = |epoch, filter: &str| {
        c(Cmd::SubPut(pb::SubPut {
            sub: Some(pb::Subscription {
                client_id: "dev".into(),
                filter: filter.into(),
                epoch,
                ..Default::default()
            }),
        }))
    };
    assert!(is_done(&st.apply(put(a.epoch, "a"))));
    // Taken over with a clean start on node 2: node 1's late change must not come back.
    let b = claimed(st.apply(claim("dev", 2, true, 60, 2000)));
    assert!(!st.subscriptions.contains_key("dev"));
    assert!(!is_done(&st.apply(put(a.epoch, "late"))));
    assert!(is_done(&st.apply(put(b.epoch, "b"))));
    let del = |epoch, filter: &str| {
        c(Cmd::SubDel(pb::SubDel {
            client_id: "dev".into(),
            filter: filter.into(),
            epoch,
        }))
    };
    assert!(!is_done(&st.apply(del(a.epoch, "b"))));
    assert_eq!(st.subscriptions["dev"].len(), 1);
    assert!(is_done(&st.apply(del(b.epoch, "b"))));
    assert!(!st.subscriptions.contains_key("dev"));
}

#[test]
fn resuming_with_expiry_0_keeps_the_subscriptions_until_the_disconnect() {
    let mut st = ClusterState::default();
    let a = claimed(st.apply(claim("dev", 1, false, 60, 1000)));
    st.apply(c(Cmd::SubPut(pb::SubPut {
        sub: Some(pb::Subscription {
            client_id: "dev".into(),
            filter: "a/#".into(),
            epoch: a.epoch,
            ..Default::default()
        }),
    })));
    let mut resume = claim("dev", 2, false, 0, 2000);
    if let Some(Cmd::Claim(cl)) = resume.cmd.as_mut() {
        cl.will = None;
    }
    let b = claimed(st.apply(resume));
    assert!(b.session_present);
    assert_eq!(
        st.subscriptions["dev"].len(),
        1,
        "resumed with its subscriptions"
    );
    assert_eq!(st.sessions["dev"].node_id, 2);
    st.apply(c(Cmd::SessionDisconnected(pb::SessionDisconnected {
        client_id: "dev".into(),
        epoch: b.epoch,
        at_ms: 3000,
        will: None,
        keep_will: false,
        expiry_secs: None,
        drained: false,
    })));
    assert!(!st.sessions.contains_key("dev") && !st.subscriptions.contains_key("dev"));
}

#[test]
fn a_node_set_holds_one_inline_and_many_sorted() {
    use super::NodeSet;
    let mut s = NodeSet::default();
    assert!(s.is_empty());
    s.insert(5);
    s.insert(5);
    assert_eq!(s, NodeSet::One(5));
    s.insert(2);
    s.insert(9);
    assert_eq!(s.as_slice(), [2, 5, 9]);
    s.remove(&5);
    s.remove(&7);
    assert_eq!(s.as_slice(), [2, 9]);
    s.remove(&2);
    assert_eq!(s, NodeSet::One(9));
    assert!(s.contains(&9) && !s.contains(&2));
    s.remove(&9);
    assert!(s.is_empty());
}

#[test]
fn a_disconnect_that_shortens_the_expiry_to_0_ends_the_session() {
    let mut st = ClusterState::default();
    let a = claimed(st.apply(claim("dev", 1, false, 600, 1000)));
    let bye = c(Cmd::SessionDisconnected(pb::SessionDisconnected {
        client_id: "dev".into(),
        epoch: a.epoch,
        at_ms: 1500,
        will: None,
        keep_will: false,
        expiry_secs: Some(0),
        drained: false,
    }));
    assert!(is_done(&st.apply(bye)));
    assert!(
        !st.sessions.contains_key("dev"),
        "nothing left to resume on another node"
    );
}

#[test]
fn a_claim_that_moves_a_session_brings_its_routes_and_its_index() {
    use crate::router::RouteOp;
    let mut st = ClusterState::default();
    let first = claimed(st.apply_at(claim_with_routes("dev", 1), 10, &mut Vec::new()));
    for filter in ["a/+", "$share/g/b/#"] {
        st.apply(c(Cmd::SubPut(pb::SubPut {
            sub: Some(pb::Subscription {
                client_id: "dev".into(),
                filter: filter.into(),
                epoch: first.epoch,
                ..Default::default()
            }),
        })));
    }
    assert_eq!(st.sessions["dev"].claimed_at_index, 10, "a new session");
    // Node 1 reconnects: no move, no routes, the index stays.
    let mut ops = Vec::new();
    claimed(st.apply_at(claim_with_routes("dev", 1), 20, &mut ops));
    assert!(ops.is_empty());
    assert_eq!(st.sessions["dev"].claimed_at_index, 10);
    // To node 2: its routes come in the same entry.
    let mut ops = Vec::new();
    let moved = claimed(st.apply_at(claim_with_routes("dev", 2), 30, &mut ops));
    assert_eq!(moved.previous_node_id, 1);
    let op = |group: &str, filter: &str| RouteOp::Add {
        group: group.into(),
        filter: filter.into(),
        node: 2,
    };
    assert_eq!(ops, [op("", "a/+")], "plain filters only");
    // Applied with the entry: not before.
    assert!(!st.routes.nodes_of("", "a/+").contains(&2));
    st.routes.apply(&ops, 30);
    assert!(st.routes.nodes_of("", "a/+").contains(&2));
    assert!(st.routes.nodes_of("g", "b/#").is_empty());
    assert_eq!(st.sessions["dev"].claimed_at_index, 30);
    // Without the flag (a member of level 1): neither routes nor an index.
    let mut ops = Vec::new();
    claimed(st.apply_at(claim("dev", 3, false, 60, 2000), 40, &mut ops));
    assert!(ops.is_empty());
    assert_eq!(st.sessions["dev"].claimed_at_index, 0);
    // A clean start moves nothing: the session is new.
    let mut ops = Vec::new();
    let mut clean = claim_with_routes("dev", 1);
    if let Some(Cmd::Claim(c)) = clean.cmd.as_mut() {
        c.clean_start = true;
    }
    claimed(st.apply_at(clean, 50, &mut ops));
    assert!(ops.is_empty());
}

#[test]
fn routes_go_through_a_snapshot_and_into_the_node_s_table() {
    let mut st = ClusterState::default();
    for (group, filter, node) in [
        ("", "a/+/c", 2),
        ("", "a/+/c", 3),
        ("", "exact/topic", 2),
        ("g", "s/#", 3),
        ("", "fleet/dev1/+/status", 1),
    ] {
        st.apply(c(Cmd::RouteAdd(pb::RouteAdd {
            route: Some(pb::Route {
                filter: filter.into(),
                share_group: group.into(),
                node_id: node,
            }),
        })));
    }
    let meta = SnapshotMeta::default();
    let (mut decoded, _) = ClusterState::decode_snapshot(&st.encode_snapshot(&[]), &meta).unwrap();
    assert_eq!(decoded.routes.entries(), st.routes.entries());
    assert_eq!(st.routes.entries().len(), 5);
    // Into the node's own table (node 2), which the state then holds.
    let table = std::sync::Arc::new(RouteTable::new(2));
    table.add("", "stale", 3);
    decoded.move_routes_to(&table);
    assert!(std::sync::Arc::ptr_eq(&decoded.routes, &table));
    assert_eq!(table.entries(), st.routes.entries());
    assert_eq!(table.node_counts(), [(1, 1), (2, 2), (3, 2)]);
    assert!(table.has_remote());
    let mut out = Vec::new();
    table.collect("a/b/c", &mut out);
    assert_eq!(
        out.iter().map(|t| t.node).collect::<Vec<_>>(),
        [3],
        "not itself"
    );
}

#[test]
fn a_claim_elsewhere_keeps_the_will_of_the_connection_it_replaces_until_it_fires_once() {
    let mut st = ClusterState::default();
    let a = claimed(st.apply(claim_keeping("dev", 1, false, Some(0))));
    eprintln!("--- the client comes back on node 2 (node 1 died, or still holds the connection)");
    let b = claimed(st.apply(claim_keeping("dev", 2, false, None)));
    assert!(b.session_present && b.previous_connected);
    assert_eq!(st.sessions["dev"].epoch, b.epoch);
    assert!(
        st.sessions["dev"].will.is_none(),
        "the new connection has none"
    );
    let kept = &st.replaced_wills[&("dev".into(), a.epoch)];
    assert_eq!((kept.node_id, kept.epoch), (1, a.epoch));
    assert!(kept.will.is_some());
    eprintln!("--- through a snapshot");
    let meta = SnapshotMeta::default();
    let (decoded, _) = ClusterState::decode_snapshot(&st.encode_snapshot(&[]), &meta).unwrap();
    assert_eq!(decoded.replaced_wills, st.replaced_wills);
    eprintln!("--- fired once, whoever asks first; the new epoch's record is not touched");
    assert!(is_done(&st.apply(will_fired("dev", a.epoch, 3))));
    assert!(!is_done(&st.apply(will_fired("dev", a.epoch, 1))), "once");
    assert!(st.replaced_wills.is_empty());
    let rec = &st.sessions["dev"];
    assert!(rec.connected && rec.epoch == b.epoch && rec.node_id == 2);
}

#[test]
fn a_replaced_will_is_kept_only_when_due_and_only_from_another_node() {
    let kept = |first: pb::Command, second: pb::Command| {
        let mut st = ClusterState::default();
        st.apply(first);
        st.apply(second);
        st.replaced_wills.len()
    };
    assert_eq!(
        kept(
            claim_keeping("d", 1, false, Some(0)),
            claim_keeping("d", 2, false, None)
        ),
        1,
        "no delay"
    );
    assert_eq!(
        kept(
            claim_keeping("d", 1, false, Some(30)),
            claim_keeping("d", 2, false, None)
        ),
        0,
        "a delayed will of a session that goes on is not published (MQTT 5, 3.1.3.2.2)"
    );
    assert_eq!(
        kept(
            claim_keeping("d", 1, false, Some(30)),
            claim_keeping("d", 2, true, None)
        ),
        1,
        "the session ends with a clean start: its delayed will is due"
    );
    assert_eq!(
        kept(
            claim_keeping("d", 1, false, Some(0)),
            claim_keeping("d", 1, false, None)
        ),
        0,
        "a takeover on the same node: that node publishes the will, as before"
    );
    assert_eq!(
        kept(
            claim_keeping("d", 1, false, None),
            claim_keeping("d", 2, false, None)
        ),
        0,
        "no will"
    );
    assert_eq!(
        kept(
            claim_keeping("d", 1, false, Some(0)),
            claim("d", 2, false, 60, 1000)
        ),
        0,
        "a claim of a member before level 4 keeps nothing"
    );
    eprintln!("--- a record already disconnected (its will pending or not) is not kept");
    let mut st = ClusterState::default();
    let a = claimed(st.apply(claim_keeping("d", 1, false, Some(0))));
    st.apply(c(Cmd::SessionDisconnected(pb::SessionDisconnected {
        client_id: "d".into(),
        epoch: a.epoch,
        at_ms: 1500,
        will: None,
        keep_will: true,
        expiry_secs: None,
        drained: false,
    })));
    st.apply(claim_keeping("d", 2, false, None));
    assert!(st.replaced_wills.is_empty());
    eprintln!("--- nor one of a draining node (its drained clients' wills wait for the grace)");
    let mut st = ClusterState::default();
    for (node, draining) in [(1, true), (2, false)] {
        st.apply(c(Cmd::MemberUp(pb::MemberUp {
            node_id: node,
            ..Default::default()
        })));
        st.apply(c(Cmd::MemberDrain(pb::MemberDrain {
            node_id: node,
            draining,
        })));
    }
    st.apply(claim_keeping("d", 1, false, Some(0)));
    st.apply(claim_keeping("d", 2, false, None));
    assert!(st.replaced_wills.is_empty());
}

#[test]
fn a_normal_disconnect_or_a_drain_that_raced_the_claim_drops_the_kept_will() {
    let mut st = ClusterState::default();
    let a = claimed(st.apply(claim_keeping("d", 1, false, Some(0))));
    st.apply(claim_keeping("d", 2, false, None));
    let gone = |keep_will| {
        c(Cmd::SessionDisconnected(pb::SessionDisconnected {
            client_id: "d".into(),
            epoch: a.epoch,
            at_ms: 1500,
            will: None,
            keep_will,
            expiry_secs: None,
            drained: false,
        }))
    };
    eprintln!("--- a connection that ended with its will pending keeps it kept");
    st.apply(gone(true));
    assert_eq!(st.replaced_wills.len(), 1);
    eprintln!("--- a DISCONNECT (no will) committed after the claim: nothing to publish");
    let mut drained = st.clone();
    st.apply(gone(false));
    assert!(st.replaced_wills.is_empty());
    eprintln!("--- nor for a connection its node drained (its will waits for the grace)");
    let mut cmd = gone(true);
    if let Some(Cmd::SessionDisconnected(d)) = cmd.cmd.as_mut() {
        d.drained = true;
    }
    drained.apply(cmd);
    assert!(drained.replaced_wills.is_empty());
    assert!(!is_done(&st.apply(will_fired("d", a.epoch, 1))));
    assert!(
        st.sessions["d"].connected,
        "the new connection's record is untouched"
    );
}

#[test]
fn a_node_notes_what_other_nodes_did_with_its_connections_wills() {
    use super::{StateMachine, Taken};
    use std::sync::Arc;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = petrel_storage::Store::open(petrel_storage::StoreOptions {
        path: dir.path().join("db"),
        fsync: false,
    })
    .expect("open store");
    let (sm, _effects) = StateMachine::open(store, 1, Arc::default(), Arc::new(RouteTable::new(1)))
        .expect("state machine");
    let mut st = ClusterState::default();
    let mut ops = Vec::new();
    let taken = sm.taken_wills();
    let mut apply = |cmd| sm.apply_one(&mut st, cmd, &mut ops);
    eprintln!("--- what a restart applies again is of an earlier process: not noted");
    let old = claimed(apply(claim_keeping("old", 1, false, Some(0))));
    assert!(is_done(&apply(will_fired("old", old.epoch, 3))));
    taken.claimed(old.epoch + 1);
    eprintln!("--- node 2 takes a connection of node 1's over and keeps its will");
    let a = claimed(apply(claim_keeping("kept", 1, false, Some(0))));
    apply(claim_keeping("kept", 2, false, None));
    eprintln!("--- the leader (node 3) fires a will of node 1's connection, as if node 1 was away");
    let b = claimed(apply(claim_keeping("fired", 1, false, Some(0))));
    assert!(is_done(&apply(will_fired("fired", b.epoch, 3))));
    eprintln!("--- node 1 fires its own: nothing to note");
    let d = claimed(apply(claim_keeping("own", 1, false, Some(0))));
    assert!(is_done(&apply(will_fired("own", d.epoch, 1))));
    assert_eq!(taken.take("old", old.epoch), None);
    assert_eq!(taken.take("kept", a.epoch), Some(Taken::Kept));
    assert_eq!(taken.take("kept", a.epoch), None, "asked once");
    assert_eq!(taken.take("fired", b.epoch), Some(Taken::FiredElsewhere));
    assert_eq!(taken.take("own", d.epoch), None);
}
