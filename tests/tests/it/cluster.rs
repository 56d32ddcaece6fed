//! Issue 11, the control plane: real nodes (processes on loopback ports), formed into one
//! Raft cluster through `--join`, inspected with `petrel cluster status --json` and changed
//! with `petrel cluster remove`. Every wait is on a condition with a deadline.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Instant;

use petrel_tests::{free_port, run_petrel};
use serde_json::Value;

use super::*;

/// Fast elections, so leader loss is quick to test (the defaults suit real networks).
const FAST: [(&str, &str); 2] = [
    ("PETREL_CLUSTER__HEARTBEAT_INTERVAL_MS", "100"),
    ("PETREL_CLUSTER__ELECTION_TIMEOUT_MS", "500"),
];

/// One node of a test cluster: its id, gRPC address and data dir survive restarts.
struct Member {
    id: u64,
    grpc: String,
    data: PathBuf,
    broker: Option<Broker>,
}

struct Cluster {
    _dir: tempfile::TempDir,
    members: Vec<Member>,
    join: String,
    env: Vec<(String, String)>,
}

impl Cluster {
    /// `n` members that all list the first `seeds` members as seeds; none started.
    fn new(n: usize, seeds: usize, env: &[(&str, &str)]) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("petrel-cluster-")
            .tempdir()
            .expect("temp dir");
        let members: Vec<Member> = (0..n as u64)
            .map(|id| Member {
                id,
                grpc: format!("127.0.0.1:{}", free_port()),
                data: dir.path().join(format!("node{id}")),
                broker: None,
            })
            .collect();
        let join = members[..seeds]
            .iter()
            .map(|m| m.grpc.clone())
            .collect::<Vec<_>>()
            .join(",");
        let env = FAST
            .iter()
            .chain(env)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Cluster {
            _dir: dir,
            members,
            join,
            env,
        }
    }

    fn spawn(&self, i: usize) -> petrel_tests::Spawned {
        let m = &self.members[i];
        let mut b = Broker::builder()
            .without_mqtt_addr_flag()
            .without_data_dir_flag()
            .env("PETREL_MQTT_ADDR", "127.0.0.1:0")
            .env("PETREL_GRPC_ADDR", &m.grpc)
            .env("PETREL_NODE_ID", &m.id.to_string())
            .env("PETREL_JOIN", &self.join)
            .env("PETREL_DATA_DIR", m.data.to_str().expect("utf-8 path"));
        for (k, v) in &self.env {
            b = b.env(k, v);
        }
        b.spawn()
    }

    /// Starts members `which` at the same moment.
    async fn start(&mut self, which: &[usize]) {
        let spawned: Vec<_> = which.iter().map(|&i| self.spawn(i)).collect();
        for (&i, s) in which.iter().zip(spawned) {
            self.members[i].broker = Some(s.ready().await);
        }
    }

    fn grpc(&self, i: usize) -> &str {
        &self.members[i].grpc
    }

    async fn kill9(&mut self, i: usize) {
        let mut b = self.members[i].broker.take().expect("running");
        b.kill9().await;
    }
}

/// `petrel cluster status --json` against `addr`, or why it failed.
async fn status(addr: &str) -> Result<Value, String> {
    let out = run_petrel(&["cluster", "--addr", addr, "status", "--json"], &[], WAIT).await;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

fn roles(st: &Value) -> Vec<(u64, String)> {
    st["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["node_id"].as_u64().unwrap_or(u64::MAX),
                m["role"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

/// Waits until every node in `at` reports the same leader, `voters` voters and `learners`
/// learners among its members, each with the MQTT address it announced; returns the leader.
async fn wait_agreed(c: &Cluster, at: &[usize], voters: usize, learners: usize) -> u64 {
    let addrs: Vec<String> = at.iter().map(|&i| c.grpc(i).to_owned()).collect();
    let leader = wait_until("the members to agree on the cluster", WAIT, || {
        let addrs = addrs.clone();
        async move {
            let mut leader = None;
            for a in &addrs {
                let st = status(a).await?;
                let l = st["leader_id"]
                    .as_u64()
                    .ok_or_else(|| format!("{a}: no leader: {st}"))?;
                if leader.is_some_and(|x| x != l) {
                    return Err(format!("leaders differ: {leader:?} and {l}"));
                }
                leader = Some(l);
                let r = roles(&st);
                let v = r
                    .iter()
                    .filter(|(_, r)| r == "leader" || r == "follower")
                    .count();
                let n = r.iter().filter(|(_, r)| r == "learner").count();
                if (v, n) != (voters, learners) {
                    return Err(format!("{a}: {v} voters and {n} learners: {st}"));
                }
                let announced = st["members"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|m| m["role"] != "removed")
                    .all(|m| m["mqtt_addr"].as_str().is_some_and(|s| !s.is_empty()));
                if !announced {
                    return Err(format!("{a}: a member has not announced itself: {st}"));
                }
            }
            leader.ok_or_else(|| "no nodes".to_owned())
        }
    })
    .await;
    // And the data plane: each of them streams to the others.
    for &i in at {
        let others: Vec<u64> = at
            .iter()
            .filter(|&&j| j != i)
            .map(|&j| c.members[j].id)
            .collect();
        node(c, i).wait_linked(&others).await;
    }
    leader
}

#[tokio::test]
async fn three_nodes_started_together_form_one_cluster_and_a_fourth_is_a_learner() {
    test_timeout(async {
        let mut c = Cluster::new(4, 3, &[]);
        eprintln!("--- three seeds start at once: one cluster, node 0 bootstraps it");
        c.start(&[2, 1, 0]).await;
        let leader = wait_agreed(&c, &[0, 1, 2], 3, 0).await;
        assert!(leader < 3);
        eprintln!("--- a fourth node joins as a learner (3 voters by default)");
        c.start(&[3]).await;
        wait_agreed(&c, &[0, 1, 2, 3], 3, 1).await;
        let st = status(c.grpc(3)).await.unwrap();
        assert_eq!(st["role"], "learner", "{st}");
        // The learner applies the log: its applied index reaches the leader's commit.
        let lead = status(&c.members[leader as usize].grpc).await.unwrap();
        let committed = lead["committed_index"].as_u64().unwrap();
        wait_until("the learner to catch up", WAIT, || async {
            let st = status(c.grpc(3)).await?;
            match st["applied_index"].as_u64() {
                Some(i) if i >= committed => Ok(()),
                _ => Err(format!("{st}")),
            }
        })
        .await;
    })
    .await
}

#[tokio::test]
async fn a_killed_leader_is_replaced_and_rejoins_from_its_data_dir() {
    test_timeout(async {
        let mut c = Cluster::new(3, 3, &[]);
        c.start(&[0, 1, 2]).await;
        let leader = wait_agreed(&c, &[0, 1, 2], 3, 0).await as usize;
        eprintln!("--- kill -9 the leader (node {leader})");
        let killed_at = Instant::now();
        c.kill9(leader).await;
        let rest: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
        let addrs: Vec<String> = rest.iter().map(|&i| c.grpc(i).to_owned()).collect();
        let new_leader = wait_until("a new leader", WAIT, || {
            let addrs = addrs.clone();
            async move {
                let mut seen = None;
                for a in &addrs {
                    let st = status(a).await?;
                    match st["leader_id"].as_u64() {
                        Some(l) if l as usize != leader && seen.is_none_or(|s| s == l) => {
                            seen = Some(l)
                        }
                        other => return Err(format!("{a}: leader {other:?}")),
                    }
                }
                seen.ok_or_else(|| "none".to_owned())
            }
        })
        .await;
        eprintln!("new leader {new_leader} after {:?}", killed_at.elapsed());
        eprintln!("--- the old leader restarts on its data dir, with the same flags");
        c.start(&[leader]).await;
        wait_agreed(&c, &[0, 1, 2], 3, 0).await;
    })
    .await
}

#[tokio::test]
async fn a_dead_node_is_removed_and_a_new_one_takes_its_vote() {
    test_timeout(async {
        let mut c = Cluster::new(4, 3, &[]);
        c.start(&[0, 1, 2]).await;
        wait_agreed(&c, &[0, 1, 2], 3, 0).await;
        eprintln!("--- node 2 dies and is removed through node 1");
        c.kill9(2).await;
        let out = run_petrel(&["cluster", "--addr", c.grpc(1), "remove", "2"], &[], WAIT).await;
        assert!(
            out.status.success(),
            "remove: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_until("node 2 to be gone", WAIT, || async {
            let st = status(c.grpc(0)).await?;
            let r = roles(&st);
            match r.iter().find(|(id, _)| *id == 2) {
                None => Ok(()),
                Some(x) => Err(format!("still {x:?}: {st}")),
            }
        })
        .await;
        wait_agreed(&c, &[0, 1], 2, 0).await;
        eprintln!("--- node 3 joins and becomes the third voter");
        c.start(&[3]).await;
        wait_agreed(&c, &[0, 1, 3], 3, 0).await;
    })
    .await
}

#[tokio::test]
async fn a_node_far_behind_installs_a_snapshot() {
    test_timeout(async {
        // A snapshot after every few entries, and no log kept behind it: a late joiner can
        // only catch up from the snapshot.
        let env = [
            ("PETREL_CLUSTER__SNAPSHOT_AFTER_ENTRIES", "2"),
            ("PETREL_CLUSTER__SNAPSHOT_KEEP_ENTRIES", "0"),
        ];
        let mut c = Cluster::new(4, 1, &env);
        c.start(&[0]).await;
        wait_agreed(&c, &[0], 1, 0).await;
        c.start(&[1]).await;
        c.start(&[2]).await;
        wait_agreed(&c, &[0, 1, 2], 3, 0).await;
        c.start(&[3]).await;
        wait_agreed(&c, &[0, 1, 2, 3], 3, 1).await;
        let log = c.members[3].broker.as_ref().unwrap().log();
        assert!(
            log.contains("raft snapshot installed"),
            "node 3 log:\n{log}"
        );
        eprintln!("--- node 3 restarts from its snapshot and log");
        c.kill9(3).await;
        c.start(&[3]).await;
        wait_agreed(&c, &[0, 1, 2, 3], 3, 1).await;
    })
    .await
}

#[tokio::test]
async fn a_seed_list_waits_for_the_lowest_id() {
    test_timeout(async {
        let mut c = Cluster::new(2, 2, &[]);
        eprintln!("--- node 1 alone: node 0 (a lower id) is a seed, so it waits");
        c.start(&[1]).await;
        let st = status(c.grpc(1)).await.unwrap();
        assert!(st["leader_id"].is_null(), "node 1 started a cluster: {st}");
        c.start(&[0]).await;
        wait_agreed(&c, &[0, 1], 2, 0).await;
    })
    .await
}

#[tokio::test]
async fn a_claim_on_another_node_closes_the_old_connection_with_0x8e() {
    test_timeout(async {
        let mut c = Cluster::new(3, 3, &[]);
        c.start(&[0, 1, 2]).await;
        wait_agreed(&c, &[0, 1, 2], 3, 0).await;
        let mqtt = |i: usize| c.members[i].broker.as_ref().unwrap().mqtt_addr();
        let mut first = V5Client::connect(mqtt(0), "roamer").await;
        eprintln!("--- the same client id connects to node 1");
        let _second = V5Client::connect(mqtt(1), "roamer").await;
        let (code, _) = first.wait_disconnect(WAIT).await;
        assert_eq!(code, p5::DisconnectReasonCode::SessionTakenOver);
        eprintln!("--- and back to node 2, over node 1's connection");
        let mut second = _second;
        let _third = V5Client::connect(mqtt(2), "roamer").await;
        let (code, _) = second.wait_disconnect(WAIT).await;
        assert_eq!(code, p5::DisconnectReasonCode::SessionTakenOver);
        let takeovers = c.members[0].broker.as_ref().unwrap();
        assert_eq!(
            takeovers.metric("petrel_session_takeovers_total").await,
            1.0
        );
    })
    .await
}

#[tokio::test]
async fn without_a_quorum_a_connect_is_refused_in_bounded_time() {
    test_timeout(async {
        let env = [("PETREL_CLUSTER__PROPOSE_TIMEOUT_MS", "1500")];
        let mut c = Cluster::new(3, 3, &env);
        c.start(&[0, 1, 2]).await;
        wait_agreed(&c, &[0, 1, 2], 3, 0).await;
        eprintln!("--- two of three voters die: node 0 is left without a quorum");
        c.kill9(1).await;
        c.kill9(2).await;
        let node0 = c.members[0].broker.take().unwrap();
        let started = Instant::now();
        let r = V5Client::try_connect_with(node0.mqtt_addr(), "lonely", |_| {}).await;
        let took = started.elapsed();
        let err = match r {
            Ok(c) => panic!("connected without a quorum: {:?}", c.connack_props()),
            Err(e) => e,
        };
        assert!(
            err.contains("ServerUnavailable")
                || err.contains("0x88")
                || err.contains("Unavailable"),
            "{err}"
        );
        assert!(took < Duration::from_secs(8), "refused after {took:?}");
        eprintln!("refused after {took:?}: {err}");
        let mut v3 = RawClient::connect(node0.mqtt_addr()).await;
        v3.send(&pkt::Connect::v311("lonely-3").encode()).await;
        let ack = v3.expect_packet(WAIT, "CONNACK").await;
        assert_eq!(
            ack.connack().1,
            3,
            "3.1.1 CONNACK return code 3, server unavailable"
        );
        assert_eq!(node0.metric("petrel_claims_refused_total").await, 2.0);
        eprintln!("--- not ready while there is no leader");
        node0.wait_ready(503).await;
        eprintln!("--- a voter comes back: a quorum again, CONNECT works, ready again");
        c.start(&[1]).await;
        wait_until("a CONNECT to be accepted", WAIT, || async {
            V5Client::try_connect_with(node0.mqtt_addr(), "lonely", |_| {})
                .await
                .map(|_| ())
        })
        .await;
        node0.wait_ready(200).await;
    })
    .await
}

/// Routes of node `node` in `at`'s replica.
async fn routes_of(addr: &str, node: u64) -> Result<u64, String> {
    let st = status(addr).await?;
    st["members"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["node_id"].as_u64() == Some(node))
        .and_then(|m| m["routes"].as_u64())
        .ok_or_else(|| format!("no member {node}: {st}"))
}

async fn wait_routes(addr: &str, node: u64, n: u64) {
    wait_until(&format!("node {node} to have {n} routes"), WAIT, || async {
        match routes_of(addr, node).await? {
            got if got == n => Ok(()),
            got => Err(format!("{got} routes")),
        }
    })
    .await
}

#[tokio::test]
async fn routes_follow_first_and_last_subscribers_and_survive_restarts() {
    test_timeout(async {
        let mut c = Cluster::new(3, 3, &[]);
        c.start(&[0, 1, 2]).await;
        wait_agreed(&c, &[0, 1, 2], 3, 0).await;
        let mqtt = |c: &Cluster, i: usize| c.members[i].broker.as_ref().unwrap().mqtt_addr();
        let (a0, a2) = (c.grpc(0).to_owned(), c.grpc(2).to_owned());
        eprintln!("--- two subscribers to one filter on node 1: one route");
        let mut s1 = V5Client::connect(mqtt(&c, 1), "route-a").await;
        s1.subscribe("routes/+/t", Q5::AtLeastOnce).await;
        let mut s2 = V5Client::connect(mqtt(&c, 1), "route-b").await;
        s2.subscribe("routes/+/t", Q5::AtLeastOnce).await;
        s2.subscribe("$share/g/routes/#", Q5::AtLeastOnce).await;
        wait_routes(&a0, 1, 2).await;
        wait_routes(&a2, 1, 2).await;
        s1.unsubscribe("routes/+/t").await;
        s2.unsubscribe("$share/g/routes/#").await;
        wait_routes(&a0, 1, 1).await;
        s2.unsubscribe("routes/+/t").await;
        wait_routes(&a0, 1, 0).await;
        eprintln!("--- a persistent and a clean subscriber, then kill -9 of node 1");
        let mut kept = V3Client::connect_with(mqtt(&c, 1), "route-kept", |o| {
            o.set_clean_session(false);
        })
        .await;
        kept.subscribe("kept/#", Q3::AtLeastOnce).await;
        let mut clean = V3Client::connect(mqtt(&c, 1), "route-clean").await;
        clean.subscribe("clean/+", Q3::AtLeastOnce).await;
        wait_routes(&a0, 1, 2).await;
        c.kill9(1).await;
        drop((kept, clean, s1, s2));
        eprintln!("--- restarted: the persistent subscription's route stays, the clean one's goes");
        c.start(&[1]).await;
        wait_routes(&a0, 1, 1).await;
        wait_routes(c.grpc(1), 1, 1).await;
        let st = status(&a0).await.unwrap();
        assert_eq!(st["routes_unknown_node"], 0, "{st}");
        eprintln!("--- node 2 subscribes, dies and is removed: its routes go with it");
        let mut s3 = V5Client::connect(mqtt(&c, 2), "route-c").await;
        s3.subscribe("two/#", Q5::AtMostOnce).await;
        wait_routes(&a0, 2, 1).await;
        c.kill9(2).await;
        drop(s3);
        let out = run_petrel(&["cluster", "--addr", &a0, "remove", "2"], &[], WAIT).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_until("node 2's routes to go", WAIT, || async {
            let st = status(&a0).await?;
            let gone = st["members"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|m| m["node_id"] != 2);
            match (gone, st["routes_unknown_node"].as_u64()) {
                (true, Some(0)) => Ok(()),
                _ => Err(format!("{st}")),
            }
        })
        .await;
        let b0 = c.members[0].broker.as_ref().unwrap();
        b0.wait_metric("petrel_cluster_routes", WAIT, |v| v == 1.0)
            .await;
        assert_eq!(b0.metric("petrel_cluster_routes_unknown_node").await, 0.0);
    })
    .await
}

#[tokio::test]
async fn a_data_dir_keeps_its_node_id() {
    test_timeout(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().to_str().expect("utf-8 path").to_owned();
        let mut b = start_on(dir.path(), &[("PETREL_NODE_ID", "4")]).await;
        b.kill9().await;
        let mut s = Broker::builder()
            .without_data_dir_flag()
            .arg("--data-dir")
            .arg(&data)
            .env("PETREL_NODE_ID", "5")
            .spawn();
        let status = s.wait_exit(WAIT).await;
        assert!(!status.success(), "started with another node id: {status}");
        let log = s.log();
        assert!(log.contains("belongs to node 4"), "{log}");
    })
    .await
}

fn persistent(o: &mut rumqttc::v5::MqttOptions) {
    o.set_clean_start(false);
    set_session_expiry(o, 300);
}

/// Connect options with a QoS 1 will "gone" on `topic`, no delay.
fn will(topic: &'static str) -> impl Fn(&mut rumqttc::v5::MqttOptions) {
    move |o| {
        o.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
            topic,
            "gone",
            Q5::AtLeastOnce,
            false,
            None,
        ));
    }
}

fn node(c: &Cluster, i: usize) -> &Broker {
    c.members[i].broker.as_ref().expect("running")
}

#[tokio::test]
async fn a_persistent_session_moves_to_another_node_with_its_queue() {
    test_timeout(async {
        let mut c = Cluster::new(3, 3, &[]);
        c.start(&[0, 1, 2]).await;
        wait_agreed(&c, &[0, 1, 2], 3, 0).await;
        let mut sub = V5Client::connect_with(node(&c, 0).mqtt_addr(), "mover", persistent).await;
        sub.subscribe("mv/t", Q5::ExactlyOnce).await;
        sub.subscribe("mv/+/x", Q5::AtLeastOnce).await;
        sub.disconnect().await;
        eprintln!("--- queued on node 0 while the client is away");
        let mut publ = V5Client::connect(node(&c, 0).mqtt_addr(), "mover-pub").await;
        for (i, q) in [1u8, 2, 1].into_iter().enumerate() {
            publ.publish("mv/t", q5(q), false, format!("m{i}")).await;
        }
        publ.publish("mv/a/x", Q5::AtLeastOnce, false, "m3").await;
        eprintln!("--- the client comes back on node 1");
        let mut sub = V5Client::connect_with(node(&c, 1).mqtt_addr(), "mover", persistent).await;
        assert!(
            sub.connack.session_present,
            "session present on the new node"
        );
        let got: Vec<(String, u8)> = sub
            .recv_publishes(4)
            .await
            .iter()
            .map(|p| (text(&p.payload), n5(p.qos)))
            .collect();
        assert_eq!(
            got,
            [
                ("m0".into(), 1),
                ("m1".into(), 2),
                ("m2".into(), 1),
                ("m3".into(), 1)
            ]
        );
        let moved = |dir: &str| format!("petrel_session_handovers_total{{direction=\"{dir}\"}}");
        assert_eq!(
            node(&c, 1).metric(&moved("in")).await,
            1.0,
            "handed over before CONNACK"
        );
        assert_eq!(node(&c, 0).metric(&moved("out")).await, 1.0);
        eprintln!("--- its subscriptions came from the replica: node 1 delivers");
        let mut publ1 = V5Client::connect(node(&c, 1).mqtt_addr(), "mover-pub1").await;
        publ1
            .publish("mv/b/x", Q5::AtLeastOnce, false, "here")
            .await;
        assert_eq!(text(&sub.recv_publish().await.payload), "here");
        sub.assert_no_publish_before_marker().await;
        // Its router keeps the session 5 s (passing late copies on), then lets go.
        eprintln!("--- node 0 let go: no session, no route for it");
        wait_routes(c.grpc(0), 0, 0).await;
        // mv/t, mv/+/x and the marker's topic.
        wait_routes(c.grpc(2), 1, 3).await;
        node(&c, 0)
            .wait_metric("petrel_sessions", WAIT, |v| v == 1.0)
            .await;
        eprintln!("--- and a clean start elsewhere leaves nothing to resume");
        sub.disconnect().await;
        let clean = V5Client::connect_with(node(&c, 2).mqtt_addr(), "mover", |o| {
            set_session_expiry(o, 300);
        })
        .await;
        assert!(!clean.connack.session_present);
        clean.disconnect().await;
        let back = V5Client::connect_with(node(&c, 1).mqtt_addr(), "mover", persistent).await;
        assert!(
            back.connack.session_present,
            "the clean start's session (expiry 300)"
        );
        // The clean start dropped every subscription (the marker's too), and node 1 let go
        // of its stale copy.
        wait_routes(c.grpc(1), 1, 0).await;
        node(&c, 1)
            .wait_metric("petrel_sessions", WAIT, |v| v == 2.0)
            .await;
    })
    .await
}

#[tokio::test]
async fn a_session_of_a_dead_node_resumes_elsewhere_and_its_messages_follow_when_it_returns() {
    test_timeout(async {
        let mut c = Cluster::new(3, 3, &[]);
        c.start(&[0, 1, 2]).await;
        wait_agreed(&c, &[0, 1, 2], 3, 0).await;
        let mut sub = V5Client::connect_with(node(&c, 0).mqtt_addr(), "phoenix", persistent).await;
        sub.subscribe("px/#", Q5::AtLeastOnce).await;
        sub.disconnect().await;
        let mut publ = V5Client::connect(node(&c, 0).mqtt_addr(), "phoenix-pub").await;
        publ.publish("px/1", Q5::AtLeastOnce, false, "old-1").await;
        publ.publish("px/2", Q5::ExactlyOnce, false, "old-2").await;
        drop(publ);
        eprintln!("--- node 0 dies with the queue; the client resumes on node 2");
        c.kill9(0).await;
        let mut sub = V5Client::connect_with(node(&c, 2).mqtt_addr(), "phoenix", persistent).await;
        assert!(sub.connack.session_present);
        let mut publ = V5Client::connect(node(&c, 2).mqtt_addr(), "phoenix-pub2").await;
        publ.publish("px/3", Q5::AtLeastOnce, false, "new").await;
        assert_eq!(text(&sub.recv_publish().await.payload), "new");
        eprintln!("--- node 0 returns and hands the old messages over");
        c.start(&[0]).await;
        let mut got: Vec<String> = sub
            .recv_publishes(2)
            .await
            .iter()
            .map(|p| text(&p.payload))
            .collect();
        got.sort();
        assert_eq!(got, ["old-1", "old-2"]);
        let moved = |dir: &str| format!("petrel_session_handovers_total{{direction=\"{dir}\"}}");
        assert_eq!(node(&c, 2).metric(&moved("resumed_without")).await, 1.0);
        assert_eq!(node(&c, 2).metric(&moved("late_in")).await, 1.0);
        sub.assert_no_publish_before_marker().await;
        node(&c, 0)
            .wait_metric("petrel_sessions", WAIT, |v| v == 0.0)
            .await;
        wait_routes(c.grpc(2), 0, 0).await;
    })
    .await
}

#[tokio::test]
async fn retained_messages_are_set_and_cleared_cluster_wide() {
    test_timeout(async {
        let mut c = Cluster::new(3, 3, &[]);
        c.start(&[0, 1, 2]).await;
        wait_agreed(&c, &[0, 1, 2], 3, 0).await;
        let mut publ = V5Client::connect(node(&c, 0).mqtt_addr(), "ret-pub").await;
        publ.publish("ret/a", Q5::AtLeastOnce, true, "kept").await;
        eprintln!("--- acknowledged on node 0: seen by subscribers on nodes 1 and 2 at once");
        for i in [1, 2] {
            let mut s = V5Client::connect(node(&c, i).mqtt_addr(), &format!("ret-sub{i}")).await;
            s.subscribe("ret/#", Q5::AtLeastOnce).await;
            let p = s.recv_publish().await;
            assert_eq!((text(&p.payload), p.retain), ("kept".into(), true));
            s.assert_no_publish_before_marker().await;
        }
        eprintln!("--- cleared on node 2: gone everywhere");
        let mut publ2 = V5Client::connect(node(&c, 2).mqtt_addr(), "ret-pub2").await;
        publ2.publish("ret/a", Q5::AtLeastOnce, true, "").await;
        for i in [0, 1] {
            let mut s = V5Client::connect(node(&c, i).mqtt_addr(), &format!("ret-late{i}")).await;
            s.subscribe("ret/#", Q5::AtLeastOnce).await;
            s.assert_no_publish_before_marker().await;
        }
        eprintln!("--- a restarted node has them from the log");
        publ2.publish("ret/b", Q5::AtLeastOnce, true, "again").await;
        c.kill9(1).await;
        c.start(&[1]).await;
        let mut s = V5Client::connect(node(&c, 1).mqtt_addr(), "ret-restart").await;
        s.subscribe("ret/#", Q5::AtLeastOnce).await;
        assert_eq!(text(&s.recv_publish().await.payload), "again");
    })
    .await
}

/// Route entries of `node` in `addr`'s replica, read once (no waiting).
async fn routes_now(addr: &str, node: u64) -> u64 {
    routes_of(addr, node).await.expect("status")
}

#[tokio::test]
async fn a_suback_means_every_live_member_has_the_route() {
    test_timeout(async {
        let mut c = Cluster::new(3, 3, &[("PETREL_CLUSTER__APPLY_WAIT_MS", "1000")]);
        c.start(&[0, 1, 2]).await;
        wait_agreed(&c, &[0, 1, 2], 3, 0).await;
        let mut s = V5Client::connect(node(&c, 2).mqtt_addr(), "suback").await;
        let mut took = Vec::new();
        for i in 0..20u64 {
            let started = Instant::now();
            s.subscribe(&format!("sa/{i}"), Q5::AtLeastOnce).await;
            took.push(started.elapsed());
            // Read right after the SUBACK, without waiting: every replica has the route.
            for at in [0, 1] {
                assert_eq!(
                    routes_now(c.grpc(at), 2).await,
                    i + 1,
                    "node {at} after SUBACK {i}"
                );
            }
        }
        took.sort();
        eprintln!(
            "SUBACK of a new route on a 3-node cluster: median {:?}, max {:?}",
            took[took.len() / 2],
            took[took.len() - 1]
        );
        for i in 0..20u64 {
            s.unsubscribe(&format!("sa/{i}")).await;
            for at in [0, 1] {
                assert_eq!(
                    routes_now(c.grpc(at), 2).await,
                    19 - i,
                    "node {at} after UNSUBACK {i}"
                );
            }
        }
        eprintln!("--- a stopped member holds a SUBACK for at most cluster.apply_wait_ms");
        node(&c, 1).sigstop();
        let started = Instant::now();
        s.subscribe("sa/while-stopped", Q5::AtLeastOnce).await;
        let waited = started.elapsed();
        node(&c, 1).sigcont();
        eprintln!("SUBACK with a stopped member: {waited:?}");
        assert!(waited < Duration::from_secs(4), "{waited:?}");
        assert_eq!(routes_now(c.grpc(0), 2).await, 1);
        wait_routes(c.grpc(1), 2, 1).await;
    })
    .await
}

#[tokio::test]
async fn without_a_quorum_a_subscribe_that_needs_a_new_route_is_refused() {
    test_timeout(async {
        let mut c = Cluster::new(3, 3, &[]);
        c.start(&[0, 1, 2]).await;
        wait_agreed(&c, &[0, 1, 2], 3, 0).await;
        let mut s = V5Client::connect(node(&c, 0).mqtt_addr(), "minority").await;
        s.subscribe("mi/old", Q5::AtLeastOnce).await;
        let mut other = V5Client::connect(node(&c, 0).mqtt_addr(), "minority-2").await;
        // A raw client: rumqttc treats a refused filter as the end of the connection.
        let mut raw = RawClient::connect(node(&c, 0).mqtt_addr()).await;
        raw.send(&pkt::Connect::v5("minority-raw").encode()).await;
        raw.expect_packet(WAIT, "CONNACK").await;
        c.kill9(1).await;
        c.kill9(2).await;
        node(&c, 0).wait_ready(503).await;
        let started = Instant::now();
        raw.send(&pkt::subscribe(
            true,
            7,
            &[("mi/new", 1), ("mi/old", 1)],
            &[],
        ))
        .await;
        let ack = raw.expect_packet(WAIT, "SUBACK").await;
        assert_eq!(ack.suback_codes(true), [0x80, 0x01]);
        eprintln!("minority SUBACK after {:?}", started.elapsed());
        assert!(started.elapsed() < Duration::from_secs(8));
        assert_eq!(
            other.subscribe("mi/old", Q5::AtMostOnce).await,
            p5::SubscribeReasonCode::Success(Q5::AtMostOnce),
            "a route this node has needs no quorum"
        );
        drop(s);
        assert_eq!(
            node(&c, 0).metric("petrel_subscribes_refused_total").await,
            1.0
        );
        eprintln!("--- a retained message cannot change there either: PUBACK 0x80");
        raw.send(&pkt::publish(true, "mi/kept", b"x", 1, 9, true, false, &[]))
            .await;
        let (ack, _) = raw.expect_kind(kind::PUBACK, WAIT).await;
        assert_eq!(ack.body[..3], [0, 9, 0x80], "{ack:?}");
        assert_eq!(
            node(&c, 0).metric("petrel_retained_refused_total").await,
            1.0
        );
    })
    .await
}

#[tokio::test]
async fn an_idle_single_node_stays_ready_and_takes_subscriptions() {
    test_timeout(async {
        // One voter is a quorum by itself: its lease never runs out (openraft keeps a lone
        // leader's quorum-acked time at its election).
        let mut c = Cluster::new(1, 1, &[]);
        c.start(&[0]).await;
        // Two election timeouts (500 ms each here) and then some, without a Raft write.
        let_time_pass(Duration::from_millis(1500)).await;
        assert_eq!(node(&c, 0).http_get("/health/ready").await.0, 200);
        let mut s = V5Client::connect(node(&c, 0).mqtt_addr(), "idle").await;
        assert_eq!(
            s.subscribe("idle/t", Q5::AtLeastOnce).await,
            p5::SubscribeReasonCode::Success(Q5::AtLeastOnce)
        );
    })
    .await
}

// ---- Issue 12: the data plane -------------------------------------------------------------

/// Waits until `at`'s route table holds `n` routes of every node in `of`.
async fn wait_routes_of_all(c: &Cluster, at: &[usize], of: &[(u64, u64)]) {
    for &i in at {
        for &(node, n) in of {
            wait_routes(c.grpc(i), node, n).await;
        }
    }
}

#[tokio::test]
async fn a_publish_reaches_subscribers_on_every_node_with_its_properties_in_order() {
    test_timeout(async {
        let mut c = Cluster::new(3, 3, &[]);
        c.start(&[0, 1, 2]).await;
        wait_agreed(&c, &[0, 1, 2], 3, 0).await;
        let mut s1 = V5Client::connect(node(&c, 1).mqtt_addr(), "fw-sub1").await;
        s1.subscribe("fw/+/t", Q5::ExactlyOnce).await;
        let mut s2 = V5Client::connect(node(&c, 2).mqtt_addr(), "fw-sub2").await;
        s2.subscribe("fw/#", Q5::AtLeastOnce).await;
        // The SUBACK promised it: node 0 has both routes already.
        assert_eq!(routes_now(c.grpc(0), 1).await, 1);
        assert_eq!(routes_now(c.grpc(0), 2).await, 1);
        let mut publ = V5Client::connect(node(&c, 0).mqtt_addr(), "fw-pub").await;
        let props = p5::PublishProperties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(600),
            response_topic: Some("fw/reply".into()),
            correlation_data: Some(bytes::Bytes::from_static(b"corr")),
            user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
            content_type: Some("text/plain".into()),
            ..Default::default()
        };
        publ.publish_with("fw/a/t", Q5::ExactlyOnce, false, "first", props)
            .await;
        for i in 0..30u8 {
            publ.publish("fw/a/t", q5(i % 3), false, format!("m{i}"))
                .await;
        }
        for (s, max) in [(&mut s1, 2u8), (&mut s2, 1)] {
            let first = s.recv_publish().await;
            assert_eq!(text(&first.payload), "first");
            assert_eq!(n5(first.qos), max);
            let p = first.properties.expect("properties forwarded");
            assert_eq!(p.payload_format_indicator, Some(1));
            assert!(
                matches!(p.message_expiry_interval, Some(599 | 600)),
                "{p:?}"
            );
            assert_eq!(p.response_topic.as_deref(), Some("fw/reply"));
            assert_eq!(p.correlation_data.as_deref(), Some(&b"corr"[..]));
            assert_eq!(p.content_type.as_deref(), Some("text/plain"));
            assert_eq!(
                p.user_properties,
                vec![("k".into(), "v".into()), ("k".into(), "w".into())]
            );
            let got: Vec<(String, u8)> = s
                .recv_publishes(30)
                .await
                .iter()
                .map(|p| (text(&p.payload), n5(p.qos)))
                .collect();
            let want: Vec<(String, u8)> = (0..30u8)
                .map(|i| (format!("m{i}"), (i % 3).min(max)))
                .collect();
            assert_eq!(
                got, want,
                "every message once, in order, at the granted QoS"
            );
            s.assert_no_publish_before_marker().await;
        }
        let forwarded_in = "petrel_forward_messages_total{direction=\"in\"}";
        assert!(node(&c, 1).metric(forwarded_in).await >= 31.0);
        assert!(node(&c, 2).metric(forwarded_in).await >= 31.0);
        assert_eq!(
            node(&c, 0).metric_sum("petrel_forward_dropped_total").await,
            0.0
        );
        eprintln!("--- one copy per node, whatever its number of subscribers");
        let mut s1b = V5Client::connect(node(&c, 1).mqtt_addr(), "fw-sub1b").await;
        s1b.subscribe("fw/b/t", Q5::AtLeastOnce).await;
        let out = "petrel_forward_messages_total{direction=\"out\"}";
        let before = node(&c, 0).metric(out).await;
        publ.publish("fw/b/t", Q5::AtLeastOnce, false, "once").await;
        assert_eq!(text(&s1.recv_publish().await.payload), "once");
        assert_eq!(text(&s1b.recv_publish().await.payload), "once");
        assert_eq!(text(&s2.recv_publish().await.payload), "once");
        assert_eq!(node(&c, 0).metric(out).await - before, 2.0, "nodes 1 and 2");
        eprintln!("--- after UNSUBACK nothing more is forwarded there");
        s2.unsubscribe("fw/#").await;
        publ.publish("fw/a/t", Q5::AtLeastOnce, false, "after")
            .await;
        assert_eq!(text(&s1.recv_publish().await.payload), "after");
        s2.assert_no_publish_before_marker().await;
    })
    .await
}

#[tokio::test]
async fn a_stopped_peer_does_not_hold_publishers_and_gets_its_messages_when_back() {
    test_timeout(async {
        let mut c = Cluster::new(3, 3, &[("PETREL_CLUSTER__FORWARD_ACK_TIMEOUT_MS", "300")]);
        c.start(&[0, 1, 2]).await;
        wait_agreed(&c, &[0, 1, 2], 3, 0).await;
        let mut s2 = V5Client::connect_with(node(&c, 2).mqtt_addr(), "fw-stopped", |o| {
            o.set_keep_alive(Duration::from_secs(60));
        })
        .await;
        s2.subscribe("st/#", Q5::AtLeastOnce).await;
        let mut s1 = V5Client::connect(node(&c, 1).mqtt_addr(), "fw-live").await;
        s1.subscribe("st/#", Q5::AtLeastOnce).await;
        wait_routes_of_all(&c, &[0], &[(1, 1), (2, 1)]).await;
        let mut publ = V5Client::connect(node(&c, 0).mqtt_addr(), "fw-pub2").await;
        publ.publish("st/x", Q5::AtLeastOnce, false, "warm").await;
        assert_eq!(text(&s2.recv_publish().await.payload), "warm");
        assert_eq!(text(&s1.recv_publish().await.payload), "warm");
        node(&c, 2).sigstop();
        let started = Instant::now();
        for i in 0..10 {
            publ.publish("st/x", Q5::AtLeastOnce, false, format!("p{i}"))
                .await;
        }
        let took = started.elapsed();
        eprintln!("10 QoS 1 publishes with a stopped peer: {took:?}");
        // One acknowledgement timeout (300 ms) for the stall, not one per message.
        assert!(took < Duration::from_secs(2), "{took:?}");
        let live: Vec<String> = s1
            .recv_publishes(10)
            .await
            .iter()
            .map(|p| text(&p.payload))
            .collect();
        assert_eq!(live, (0..10).map(|i| format!("p{i}")).collect::<Vec<_>>());
        assert!(
            node(&c, 0)
                .metric("petrel_forward_ack_timeouts_total")
                .await
                >= 1.0
        );
        node(&c, 2).sigcont();
        let late: Vec<String> = s2
            .recv_publishes(10)
            .await
            .iter()
            .map(|p| text(&p.payload))
            .collect();
        assert_eq!(late, (0..10).map(|i| format!("p{i}")).collect::<Vec<_>>());
        // Back in the cluster before it takes a new route (the marker's).
        node(&c, 2).wait_ready(200).await;
        s2.assert_no_publish_before_marker().await;
        node(&c, 0)
            .wait_metric("petrel_forward_outbox_messages", WAIT, |v| v == 0.0)
            .await;
    })
    .await
}

/// What each of a share group's `members` got (up to a marker of its own): every payload,
/// sorted, and how many each member got.
async fn split_among(
    members: impl IntoIterator<Item = &mut V5Client>,
) -> (Vec<String>, Vec<usize>) {
    let (mut got, mut per_member) = (Vec::new(), Vec::new());
    for m in members {
        let mine = m.publishes_before_marker().await;
        per_member.push(mine.len());
        got.extend(mine.iter().map(|p| text(&p.payload)));
    }
    got.sort();
    (got, per_member)
}

#[tokio::test]
async fn a_share_group_across_nodes_gets_each_message_once() {
    test_timeout(async {
        let mut c = Cluster::new(3, 3, &[]);
        c.start(&[0, 1, 2]).await;
        wait_agreed(&c, &[0, 1, 2], 3, 0).await;
        let mut m1 = V5Client::connect(node(&c, 1).mqtt_addr(), "sh-1").await;
        m1.subscribe("$share/g/sh/+", Q5::AtLeastOnce).await;
        let mut m2 = V5Client::connect(node(&c, 2).mqtt_addr(), "sh-2").await;
        m2.subscribe("$share/g/sh/+", Q5::AtLeastOnce).await;
        let mut publ = V5Client::connect(node(&c, 0).mqtt_addr(), "sh-pub").await;
        for i in 0..20 {
            publ.publish("sh/x", Q5::AtLeastOnce, false, format!("s{i}"))
                .await;
        }
        let (got, per_member) = split_among([&mut m1, &mut m2]).await;
        let mut want: Vec<String> = (0..20).map(|i| format!("s{i}")).collect();
        want.sort();
        assert_eq!(got, want, "each message to exactly one member");
        assert!(
            per_member.iter().all(|&n| n > 0),
            "both nodes take turns: {per_member:?}"
        );
        eprintln!("--- with a member on the publishing node, it is served there (local first)");
        let mut m0 = V5Client::connect(node(&c, 0).mqtt_addr(), "sh-0").await;
        m0.subscribe("$share/g/sh/+", Q5::AtLeastOnce).await;
        for i in 0..5 {
            publ.publish("sh/x", Q5::AtLeastOnce, false, format!("l{i}"))
                .await;
        }
        let local: Vec<String> = m0
            .recv_publishes(5)
            .await
            .iter()
            .map(|p| text(&p.payload))
            .collect();
        assert_eq!(local, (0..5).map(|i| format!("l{i}")).collect::<Vec<_>>());
        m1.assert_no_publish_before_marker().await;
        m2.assert_no_publish_before_marker().await;
    })
    .await
}

#[tokio::test]
async fn round_robin_spreads_a_share_group_evenly_over_nodes_the_publishers_own_included() {
    test_timeout(async {
        let mut c = Cluster::new(3, 3, &[("PETREL_CLUSTER__SHARED_STRATEGY", "round_robin")]);
        c.start(&[0, 1, 2]).await;
        wait_agreed(&c, &[0, 1, 2], 3, 0).await;
        let mut members = Vec::new();
        for i in 0..3 {
            let mut m = V5Client::connect(node(&c, i).mqtt_addr(), &format!("rr-{i}")).await;
            m.subscribe("$share/g/rr/+", Q5::AtLeastOnce).await;
            members.push(m);
        }
        let mut publ = V5Client::connect(node(&c, 0).mqtt_addr(), "rr-pub").await;
        for i in 0..30 {
            publ.publish("rr/x", Q5::AtLeastOnce, false, format!("m{i:02}"))
                .await;
        }
        let (got, per_member) = split_among(members.iter_mut()).await;
        let want: Vec<String> = (0..30).map(|i| format!("m{i:02}")).collect();
        assert_eq!(got, want, "each message to exactly one member");
        assert_eq!(
            per_member,
            vec![10, 10, 10],
            "the nodes take turns, the publishing node as one of them"
        );
    })
    .await
}

/// Every distinct payload `c` receives until it has `n` of them (duplicates allowed: a
/// QoS 2 message sent again after a crash reaches a new client connection as new).
async fn distinct_payloads(
    c: &mut V5Client,
    mut seen: BTreeSet<String>,
    n: usize,
) -> BTreeSet<String> {
    while seen.len() < n {
        match c.try_recv_publish(WAIT).await {
            Some(p) => {
                seen.insert(text(&p.payload));
            }
            None => panic!(
                "{} of {n} distinct messages, then nothing: {seen:?}",
                seen.len()
            ),
        }
    }
    seen
}

/// Publishes a QoS 1/2 stream on node 0 to persistent subscribers on nodes 1 and 2, kills
/// node 2 with `kill -9` in the middle of it, and checks that nothing acknowledged is lost:
/// node 1's subscriber gets every message once and in order; node 2's (at QoS 1) gets
/// every one, some perhaps twice across the crash, once it is back: on node 2 after its
/// restart, or (`resume_elsewhere`) on node 1 while node 2 is down, with what node 2 held
/// following when it returns.
async fn kill_9_mid_stream(resume_elsewhere: bool) {
    const N: usize = 300;
    let mut c = Cluster::new(3, 3, &[]);
    c.start(&[0, 1, 2]).await;
    wait_agreed(&c, &[0, 1, 2], 3, 0).await;
    let mut far = V5Client::connect_with(node(&c, 2).mqtt_addr(), "k9-far", persistent).await;
    // At QoS 1: a QoS 2 message whose PUBREL was out when node 2 died gets that PUBREL
    // again on the resumed session (as it must), and rumqttc, a new client object with no
    // memory of the packet id, ends the connection on it ("unsolicited ack"). The stream
    // itself is QoS 1 and 2, and node 1's subscriber takes it at QoS 2.
    far.subscribe("k9/#", Q5::AtLeastOnce).await;
    let mut near = V5Client::connect_with(node(&c, 1).mqtt_addr(), "k9-near", persistent).await;
    near.subscribe("k9/#", Q5::ExactlyOnce).await;
    let mut publ = V5Client::connect(node(&c, 0).mqtt_addr(), "k9-pub").await;
    // QoS 1 and 2 in turn, each acknowledged before the next; the kill lands wherever the
    // stream is then.
    let (acked, mut acked_rx) = tokio::sync::watch::channel(0usize);
    let publisher = tokio::spawn(async move {
        for i in 0..N {
            let qos = if i % 2 == 0 {
                Q5::AtLeastOnce
            } else {
                Q5::ExactlyOnce
            };
            publ.publish(&format!("k9/{}", i % 3), qos, false, format!("{i:04}"))
                .await;
            acked.send_replace(i + 1);
        }
        publ
    });
    tokio::time::timeout(WAIT, acked_rx.wait_for(|&n| n >= N / 3))
        .await
        .expect("a third acknowledged")
        .expect("publisher alive");
    eprintln!("--- kill -9 of node 2 in the middle of the stream");
    c.kill9(2).await;
    let started = Instant::now();
    let mut publ = publisher.await.expect("publisher");
    eprintln!(
        "--- the rest acknowledged in {:?} without node 2",
        started.elapsed()
    );
    let got: Vec<String> = near
        .recv_publishes(N)
        .await
        .iter()
        .map(|p| text(&p.payload))
        .collect();
    let mut sorted = got.clone();
    sorted.sort();
    let mut all: BTreeSet<String> = (0..N).map(|i| format!("{i:04}")).collect();
    assert_eq!(
        sorted,
        all.iter().cloned().collect::<Vec<_>>(),
        "a surviving node's subscriber gets each one once"
    );
    assert_eq!(got, sorted, "in the publisher's order");
    near.assert_no_publish_before_marker().await;
    let before: BTreeSet<String> = far
        .publishes_until_closed(WAIT)
        .await
        .iter()
        .map(|p| text(&p.payload))
        .collect();
    eprintln!(
        "--- its client had {} of {N} when node 2 died",
        before.len()
    );
    let mut far = match resume_elsewhere {
        false => {
            c.start(&[2]).await;
            V5Client::connect_with(node(&c, 2).mqtt_addr(), "k9-far", persistent).await
        }
        true => {
            let far = V5Client::connect_with(node(&c, 1).mqtt_addr(), "k9-far", persistent).await;
            assert!(far.connack.session_present, "from the replica");
            eprintln!("--- resumed on node 1; new messages come from there");
            for i in N..N + 10 {
                publ.publish("k9/new", Q5::ExactlyOnce, false, format!("{i:04}"))
                    .await;
                all.insert(format!("{i:04}"));
            }
            eprintln!("--- node 2 returns and hands over what it held and was kept for it");
            c.start(&[2]).await;
            far
        }
    };
    assert!(far.connack.session_present);
    let seen = distinct_payloads(&mut far, before, all.len()).await;
    assert_eq!(
        seen, all,
        "the killed node's session gets every acknowledged message"
    );
    drop(publ);
}

#[tokio::test]
async fn a_kill_9_of_a_subscribers_node_mid_stream_loses_no_acknowledged_message() {
    test_timeout(kill_9_mid_stream(false)).await
}

#[tokio::test]
async fn a_session_resumed_elsewhere_while_its_node_is_dead_gets_every_message_when_it_returns() {
    test_timeout(kill_9_mid_stream(true)).await
}

#[tokio::test]
async fn copies_for_a_stopped_peer_survive_a_kill_9_of_the_publishing_node() {
    test_timeout(async {
        let mut c = Cluster::new(3, 3, &[("PETREL_CLUSTER__FORWARD_ACK_TIMEOUT_MS", "300")]);
        c.start(&[0, 1, 2]).await;
        wait_agreed(&c, &[0, 1, 2], 3, 0).await;
        let mut s2 = V5Client::connect_with(node(&c, 2).mqtt_addr(), "kept-sub", |o| {
            o.set_keep_alive(Duration::from_secs(60));
        })
        .await;
        s2.subscribe("kept/#", Q5::ExactlyOnce).await;
        wait_routes(c.grpc(0), 2, 1).await;
        let mut publ = V5Client::connect(node(&c, 0).mqtt_addr(), "kept-pub").await;
        publ.publish("kept/x", Q5::AtLeastOnce, false, "warm").await;
        assert_eq!(text(&s2.recv_publish().await.payload), "warm");
        node(&c, 2).sigstop();
        for i in 0..10u8 {
            publ.publish("kept/x", q5(1 + i % 2), false, format!("k{i}"))
                .await;
        }
        eprintln!("--- every PUBACK/PUBCOMP came; the node that has the copies dies");
        c.kill9(0).await;
        c.start(&[0]).await;
        node(&c, 2).sigcont();
        let got: Vec<String> = s2
            .recv_publishes(10)
            .await
            .iter()
            .map(|p| text(&p.payload))
            .collect();
        assert_eq!(got, (0..10).map(|i| format!("k{i}")).collect::<Vec<_>>());
        node(&c, 0)
            .wait_metric("petrel_forward_outbox_messages", WAIT, |v| v == 0.0)
            .await;
    })
    .await
}

#[tokio::test]
async fn a_dead_nodes_wills_are_published_by_a_survivor_once_even_when_it_returns() {
    test_timeout(async {
        let mut c = Cluster::new(3, 3, &[("PETREL_CLUSTER__WILL_GRACE_MS", "1000")]);
        c.start(&[0, 1, 2]).await;
        wait_agreed(&c, &[0, 1, 2], 3, 0).await;
        let mut watch = V5Client::connect(node(&c, 1).mqtt_addr(), "will-watch").await;
        watch.subscribe("wl/#", Q5::AtLeastOnce).await;
        wait_routes(c.grpc(0), 1, 1).await;
        let dev = V5Client::connect_with(node(&c, 0).mqtt_addr(), "will-dev", will("wl/dev")).await;
        // A persistent one too, whose session outlives its node.
        let dev2 = V5Client::connect_with(node(&c, 0).mqtt_addr(), "will-dev2", |o| {
            will("wl/dev2")(o);
            persistent(o);
        })
        .await;
        eprintln!("--- node 0 dies with both connected");
        c.kill9(0).await;
        drop((dev, dev2));
        let mut got: Vec<String> = watch.recv_publishes(2).await.iter().map(topic5).collect();
        got.sort();
        assert_eq!(got, ["wl/dev", "wl/dev2"]);
        let published = node(&c, 1).metric("petrel_wills_published_total").await
            + node(&c, 2).metric("petrel_wills_published_total").await;
        assert_eq!(published, 2.0, "by the leader, once each");
        eprintln!("--- node 0 returns: it finds both armed, and leaves them");
        c.start(&[0]).await;
        node(&c, 0)
            .wait_metric("petrel_wills_skipped_total", WAIT, |v| v == 2.0)
            .await;
        assert_eq!(
            node(&c, 0).metric("petrel_wills_published_total").await,
            0.0
        );
        watch.assert_no_publish_before_marker().await;
    })
    .await
}

/// A client whose node dies and that reconnects to another node before the grace has passed,
/// as a fleet behind a load balancer does: its will was due when its connection died, and the
/// leader publishes it once (the new claim keeps the dead node's record aside for it); the
/// dead node, back, finds it armed and leaves it. A takeover while the old node lives
/// publishes the will once too, through the old node.
#[tokio::test]
async fn wills_of_a_dead_nodes_clients_that_reconnect_elsewhere_at_once_are_published_once() {
    test_timeout(async {
        let mut c = Cluster::new(3, 3, &[("PETREL_CLUSTER__WILL_GRACE_MS", "5000")]);
        c.start(&[0, 1, 2]).await;
        wait_agreed(&c, &[0, 1, 2], 3, 0).await;
        let mut watch = V5Client::connect(node(&c, 2).mqtt_addr(), "rw-watch").await;
        watch.subscribe("rw/#", Q5::AtLeastOnce).await;
        wait_routes(c.grpc(0), 2, 1).await;
        eprintln!("--- a takeover on node 1 while node 0 lives: node 0 publishes the will, once");
        let old =
            V5Client::connect_with(node(&c, 0).mqtt_addr(), "rw-moved", will("rw/moved")).await;
        let new = V5Client::connect(node(&c, 1).mqtt_addr(), "rw-moved").await;
        assert_eq!(topic5(&watch.recv_publishes(1).await[0]), "rw/moved");
        node(&c, 0)
            .wait_metric("petrel_wills_published_total", WAIT, |v| v == 1.0)
            .await;
        drop((old, new));
        let dev = V5Client::connect_with(node(&c, 0).mqtt_addr(), "rw-dev", will("rw/dev")).await;
        let dev2 = V5Client::connect_with(node(&c, 0).mqtt_addr(), "rw-dev2", |o| {
            will("rw/dev2")(o);
            persistent(o);
        })
        .await;
        eprintln!("--- node 0 dies; both clients come back on node 1 at once, without wills");
        c.kill9(0).await;
        drop((dev, dev2));
        let back = V5Client::connect(node(&c, 1).mqtt_addr(), "rw-dev").await;
        let back2 = V5Client::connect_with(node(&c, 1).mqtt_addr(), "rw-dev2", persistent).await;
        assert_eq!(
            node(&c, 1).metric("petrel_cluster_wills_replaced").await,
            2.0,
            "both claims came within the grace, and kept the wills aside"
        );
        let mut got: Vec<String> = watch.recv_publishes(2).await.iter().map(topic5).collect();
        got.sort();
        assert_eq!(got, ["rw/dev", "rw/dev2"]);
        let published = node(&c, 1).metric("petrel_wills_published_total").await
            + node(&c, 2).metric("petrel_wills_published_total").await;
        assert_eq!(published, 2.0, "by the leader, once each");
        for i in [1, 2] {
            node(&c, i)
                .wait_metric("petrel_cluster_wills_replaced", WAIT, |v| v == 0.0)
                .await;
        }
        eprintln!("--- node 0 returns: it finds both armed, and leaves them");
        c.start(&[0]).await;
        node(&c, 0)
            .wait_metric("petrel_wills_skipped_total", WAIT, |v| v == 2.0)
            .await;
        assert_eq!(
            node(&c, 0).metric("petrel_wills_published_total").await,
            0.0
        );
        watch.assert_no_publish_before_marker().await;
        drop((back, back2));
    })
    .await
}

/// A persistent session taken over from node to node (the client connects to the next node
/// while its connection to the last is still up) while QoS 1 streams from every node go on:
/// each move is a claim that brings the session's routes to the new node in the same log
/// entry, and each copy in flight is the old node's or the new one's by the index it was
/// routed at (the old node passes its late ones on). Every acknowledged message reaches the
/// client (QoS 1: a copy in flight at a move may come twice).
#[tokio::test]
async fn a_session_moving_between_nodes_under_streams_loses_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    const MOVES: usize = 12;
    test_timeout(async {
        let mut c = Cluster::new(3, 3, &[]);
        c.start(&[0, 1, 2]).await;
        wait_agreed(&c, &[0, 1, 2], 3, 0).await;
        let mut sub = V5Client::connect_with(node(&c, 0).mqtt_addr(), "walker", persistent).await;
        sub.subscribe("walk/#", Q5::AtLeastOnce).await;
        let stop = Arc::new(AtomicBool::new(false));
        let mut streams = Vec::new();
        for i in 0..3 {
            let addr = node(&c, i).mqtt_addr();
            let stop = stop.clone();
            streams.push(tokio::spawn(async move {
                let mut p = V5Client::connect(addr, &format!("walk-pub{i}")).await;
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    p.publish(
                        &format!("walk/{i}"),
                        Q5::AtLeastOnce,
                        false,
                        format!("{i}-{n:06}"),
                    )
                    .await;
                    n += 1;
                }
                p.disconnect().await;
                n
            }));
        }
        let mut seen = BTreeSet::new();
        let mut copies = 0usize;
        for m in 0..MOVES {
            for _ in 0..40 {
                seen.insert(text(&sub.recv_publish().await.payload));
                copies += 1;
            }
            let next = (m + 1) % 3;
            let new =
                V5Client::connect_with(node(&c, next).mqtt_addr(), "walker", persistent).await;
            assert!(new.connack.session_present, "move {m}: session present");
            for p in sub.publishes_until_closed(WAIT).await {
                seen.insert(text(&p.payload));
                copies += 1;
            }
            sub = new;
        }
        stop.store(true, Ordering::Relaxed);
        let mut all = BTreeSet::new();
        for (i, s) in streams.into_iter().enumerate() {
            let n = s.await.expect("stream");
            all.extend((0..n).map(|k| format!("{i}-{k:06}")));
        }
        eprintln!(
            "--- {} acknowledged over {MOVES} moves; {copies} copies so far",
            all.len()
        );
        while !all.is_subset(&seen) {
            match sub.try_recv_publish(WAIT).await {
                Some(p) => {
                    seen.insert(text(&p.payload));
                }
                None => break,
            }
        }
        let missing: Vec<&String> = all.difference(&seen).collect();
        assert!(missing.is_empty(), "lost: {missing:?}");
        let passed: f64 = {
            let mut t = 0.0;
            for i in 0..3 {
                t += node(&c, i).metric("petrel_forward_passed_on_total").await;
            }
            t
        };
        eprintln!("--- copies passed on by an old node: {passed}");
    })
    .await
}
