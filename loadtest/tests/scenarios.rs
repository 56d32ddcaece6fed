//! Every scenario, briefly, against a real Petrel node: the report's counts must add up.
//! Throughput is never asserted.

mod harness;

use std::path::Path;
use std::time::{Duration, Instant};

use harness::{Node, TestPki, TEST_DEADLINE};
use petrel_loadtest::report::Report;
use petrel_loadtest::run_args;

async fn bench(args: &[&str]) -> Report {
    let mut argv: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    argv.push("--quiet".into());
    match tokio::time::timeout(TEST_DEADLINE, run_args(argv)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("petrel-bench {args:?}: {e:#}"),
        Err(_) => panic!("petrel-bench {args:?} did not finish within {TEST_DEADLINE:?}"),
    }
}

/// Every QoS 1/2 message arrived exactly once at every receiver, nothing went astray.
fn assert_complete(r: &Report, expected: u64) {
    assert!(r.errors.is_empty(), "errors: {:?}", r.errors);
    assert_eq!(r.totals.expected, Some(expected), "{r:#?}");
    assert_eq!(
        (r.totals.distinct, r.totals.lost, r.totals.duplicates),
        (expected, 0, 0),
        "{r:#?}"
    );
    assert_eq!((r.foreign, r.misrouted), (0, 0));
    assert!(!r.drain_timed_out);
    assert!(
        r.latency.count == expected && r.latency.max_us > 0.0,
        "{:?}",
        r.latency
    );
}

#[tokio::test]
async fn fanin_qos1_one_publisher_every_message_arrives_once() {
    let node = Node::start();
    let r = bench(&[
        "fanin",
        "--broker",
        &node.mqtt,
        "--publishers",
        "1",
        "--qos",
        "1",
        "--count",
        "500",
    ])
    .await;
    assert_eq!((r.sent, r.acked), (500, 500));
    assert_complete(&r, 500);
    assert_eq!(r.streams.len(), 1);
    assert!(r.cpu.time.total_s > 0.0);
}

#[tokio::test]
async fn fanin_mixed_qos_v5_counts_each_qos() {
    let node = Node::start();
    let args = [
        "fanin",
        "--broker",
        &node.mqtt,
        "--mqtt-version",
        "5",
        "--publishers",
        "3",
        "--qos",
        "0,1,2",
        "--count",
        "300",
    ];
    let r = bench(&args).await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!((r.sent, r.acked), (900, 600), "QoS 0 has no ack");
    let qos: Vec<u8> = r.by_qos.iter().map(|q| q.qos).collect();
    assert_eq!(qos, [0, 1, 2]);
    for q in &r.by_qos[1..] {
        assert_eq!(
            (q.counts.distinct, q.counts.lost, q.counts.duplicates),
            (300, 0, 0),
            "QoS {}",
            q.qos
        );
    }
    assert!(r.by_qos[0].counts.distinct <= 300);
}

#[tokio::test]
async fn fanout_qos1_every_subscriber_gets_every_message() {
    let node = Node::start();
    let r = bench(&[
        "fanout",
        "--broker",
        &node.mqtt,
        "--subscribers",
        "4",
        "--qos",
        "1",
        "--count",
        "200",
    ])
    .await;
    assert_eq!(r.sent, 200);
    assert_complete(&r, 800);
    assert_eq!(r.streams.len(), 4);
    assert!(r.streams.iter().all(|s| s.counts.distinct == 200));
}

#[tokio::test]
async fn p2p_qos2_v5_pairs_hear_only_their_publisher() {
    let node = Node::start();
    let r = bench(&[
        "p2p",
        "--broker",
        &node.mqtt,
        "--mqtt-version",
        "5",
        "-c",
        "4",
        "--qos",
        "2",
        "--count",
        "200",
    ])
    .await;
    assert_eq!((r.sent, r.acked), (800, 800));
    assert_complete(&r, 800);
    for s in &r.streams {
        assert_eq!(s.receiver, format!("s{}", s.publisher));
    }
}

#[tokio::test]
async fn shared_group_receives_each_message_once() {
    let node = Node::start();
    let args = [
        "shared",
        "--broker",
        &node.mqtt,
        "--publishers",
        "3",
        "--subscribers",
        "3",
        "--qos",
        "1",
        "--count",
        "200",
    ];
    let r = bench(&args).await;
    assert_complete(&r, 600);
    assert_eq!(
        r.streams.len(),
        3,
        "one stream per publisher into the group"
    );
}

#[tokio::test]
async fn offline_sessions_drain_what_was_queued() {
    let node = Node::start();
    for version in ["3", "5"] {
        let args = [
            "offline",
            "--broker",
            &node.mqtt,
            "--mqtt-version",
            version,
            "--subscribers",
            "2",
            "--qos",
            "1",
            "--count",
            "300",
        ];
        let r = bench(&args).await;
        assert_complete(&r, 600);
        let o = r.offline.expect("offline stats");
        assert_eq!(
            (
                o.published_while_offline,
                o.sessions_resumed,
                o.sessions_not_present
            ),
            (300, 2, 0),
            "v{version}"
        );
    }
}

#[tokio::test]
async fn conn_holds_every_connection() {
    let node = Node::start();
    let r = bench(&[
        "conn",
        "--broker",
        &node.mqtt,
        "-c",
        "50",
        "--concurrency",
        "8",
        "--duration",
        "100ms",
    ])
    .await;
    let c = r.connects.expect("connect stats");
    assert_eq!(
        (c.attempted, c.succeeded, c.failed, c.dropped),
        (50, 50, 0, 0),
        "{:?}",
        r.errors
    );
    assert_eq!(c.latency.count, 50);
}

#[tokio::test]
async fn sub_counts_what_a_separate_pub_sends() {
    let node = Node::start();
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("sub-ready.json");
    let ready_arg = ready.to_str().unwrap().to_owned();
    let prefix = format!("it-sub-{}", std::process::id());
    let sub_args: Vec<String> = [
        "sub",
        "--broker",
        &node.mqtt,
        "--topic-prefix",
        &prefix,
        "--count",
        "400",
        "--ready-file",
        &ready_arg,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let sub = tokio::spawn(async move {
        bench(&sub_args.iter().map(String::as_str).collect::<Vec<_>>()).await
    });
    wait_for_file(&ready).await;
    let p = bench(&[
        "pub",
        "--broker",
        &node.mqtt,
        "--topic-prefix",
        &prefix,
        "-c",
        "2",
        "--qos",
        "1",
        "--count",
        "200",
    ])
    .await;
    assert_eq!((p.sent, p.acked), (400, 400));
    let r = sub.await.expect("sub task");
    assert_eq!(
        r.totals.expected, None,
        "publishers are outside the sub run"
    );
    assert_eq!(
        (r.totals.distinct, r.totals.lost, r.totals.duplicates),
        (400, 0, 0)
    );
    assert_eq!(r.streams.len(), 2);
}

#[tokio::test]
async fn spread_placement_puts_publishers_and_subscribers_on_different_addresses() {
    let node = Node::start();
    let other = format!("localhost:{}", node.port());
    let args = [
        "p2p",
        "--broker",
        &node.mqtt,
        "--broker",
        &other,
        "--placement",
        "spread",
        "-c",
        "3",
        "--qos",
        "1",
        "--count",
        "100",
    ];
    let r = bench(&args).await;
    assert_complete(&r, 300);
    assert_eq!((r.brokers[0].publishers, r.brokers[0].subscribers), (3, 0));
    assert_eq!((r.brokers[1].publishers, r.brokers[1].subscribers), (0, 3));
    assert!(r.publisher_results.iter().all(|p| p.broker == node.mqtt));
}

#[tokio::test]
async fn the_binary_prints_json_and_passes_its_check() {
    let node = Node::start();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_petrel-bench"))
        .args([
            "fanin",
            "--broker",
            &node.mqtt,
            "--publishers",
            "2",
            "--qos",
            "1",
            "--count",
            "100",
            "--json",
            "--check",
            "--quiet",
        ])
        .output();
    let out = tokio::time::timeout(TEST_DEADLINE, out)
        .await
        .expect("in time")
        .expect("run petrel-bench");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(v["totals"]["distinct"], 200);
    assert_eq!(v["totals"]["lost"], 0);
    assert_eq!(v["by_qos"][0]["qos"], 1);

    let tls = std::process::Command::new(env!("CARGO_BIN_EXE_petrel-bench"))
        .args(["pub", "--tls"])
        .output()
        .expect("run");
    assert!(!tls.status.success());
    assert!(
        String::from_utf8_lossy(&tls.stderr).contains("--tls needs --ca-file"),
        "{}",
        String::from_utf8_lossy(&tls.stderr)
    );
}

/// The error of a run that must fail, within the test deadline.
async fn bench_err(args: &[&str]) -> String {
    let mut argv: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    argv.push("--quiet".into());
    match tokio::time::timeout(TEST_DEADLINE, run_args(argv)).await {
        Ok(Ok(r)) => panic!("petrel-bench {args:?} succeeded: {r:#?}"),
        Ok(Err(e)) => format!("{e:#}"),
        Err(_) => panic!("petrel-bench {args:?} did not finish within {TEST_DEADLINE:?}"),
    }
}

#[tokio::test]
async fn tls_with_a_ca_file_verifies_the_broker_and_delivers_everything() {
    let pki = TestPki::new();
    let node = Node::start_tls(&pki);
    let mqtts = node.mqtts.clone().expect("TLS listener");
    let ca = pki.ca.to_str().expect("utf-8 path");
    {
        // 127.0.0.1: the certificate's IP address name.
        let r = bench(&[
            "fanin",
            "--broker",
            &mqtts,
            "--tls",
            "--ca-file",
            ca,
            "--publishers",
            "2",
            "--qos",
            "1",
            "--count",
            "500",
        ])
        .await;
        assert!(r.tls);
        assert_eq!((r.sent, r.acked), (1000, 1000));
        assert_complete(&r, 1000);
    }
    {
        // localhost: its DNS name; v5, QoS 2, publishers and subscribers apart.
        let by_name = format!("localhost:{}", mqtts.rsplit(':').next().expect("port"));
        let r = bench(&[
            "p2p",
            "--broker",
            &by_name,
            "--tls",
            "--ca-file",
            ca,
            "--mqtt-version",
            "5",
            "-c",
            "3",
            "--qos",
            "2",
            "--count",
            "200",
        ])
        .await;
        assert_eq!((r.sent, r.acked), (600, 600));
        assert_complete(&r, 600);
    }
    {
        // A name the certificate does not hold is refused.
        let e = bench_err(&[
            "pub",
            "--broker",
            &mqtts,
            "--tls",
            "--ca-file",
            ca,
            "--server-name",
            "elsewhere.example",
            "--count",
            "1",
        ])
        .await;
        assert!(
            e.contains("TLS handshake") && e.contains("certificate"),
            "{e}"
        );
    }
}

#[tokio::test]
async fn tls_insecure_accepts_the_certificate_and_delivers_everything() {
    let pki = TestPki::new();
    let node = Node::start_tls(&pki);
    let mqtts = node.mqtts.clone().expect("TLS listener");
    {
        // No CA and a name the certificate does not hold: accepted all the same.
        let r = bench(&[
            "fanin",
            "--broker",
            &mqtts,
            "--tls",
            "--insecure",
            "--server-name",
            "elsewhere.example",
            "--publishers",
            "1",
            "--qos",
            "1",
            "--count",
            "500",
        ])
        .await;
        assert!(r.tls);
        assert_eq!((r.sent, r.acked), (500, 500));
        assert_complete(&r, 500);
    }
    {
        // Idle connections: handshake, keep-alive loop, DISCONNECT over TLS.
        let r = bench(&[
            "conn",
            "--broker",
            &mqtts,
            "--tls",
            "--insecure",
            "-c",
            "20",
            "--concurrency",
            "4",
            "--duration",
            "100ms",
        ])
        .await;
        let c = r.connects.expect("connect stats");
        assert_eq!(
            (c.succeeded, c.failed, c.dropped),
            (20, 0, 0),
            "{:?}",
            r.errors
        );
        assert!(r.tls);
    }
}

#[tokio::test]
async fn tls_against_a_plain_listener_fails_with_a_handshake_error() {
    let node = Node::start();
    let started = Instant::now();
    let e = bench_err(&[
        "pub",
        "--broker",
        &node.mqtt,
        "--tls",
        "--insecure",
        "--count",
        "1",
        "--connect-timeout-ms",
        "30000",
    ])
    .await;
    assert!(e.contains("TLS handshake with"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "failed only after {:?} (the connect timeout?): {e}",
        started.elapsed()
    );
}

/// Polls for a file the other task writes once it is subscribed.
async fn wait_for_file(path: &Path) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    while !path.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tick.tick().await;
    }
}
