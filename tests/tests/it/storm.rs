//! Issue 10, point 7: connect storms. Password checks (argon2id, about 19 MiB each) run a
//! bounded number at a time; CONNECTs past the waiting room are refused at once with
//! CONNACK 0x97 (3.1.1: 3), counted, and the node's memory stays bounded.

use crate::*;
use petrel_tests::run_petrel;
use pkt::Connect;

/// Peak resident set size of process `pid`, in KiB (Linux `VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status"))
}

#[tokio::test]
async fn t90_issue_10_password_check_storm_is_bounded() {
    test_timeout(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let pwfile = dir.path().join("passwd");
        let pw = pwfile.to_string_lossy().into_owned();
        let out = run_petrel(&["passwd", "-c", "-b", &pw, "storm", "s3cret"], &[], WAIT).await;
        assert!(out.status.success(), "petrel passwd: {out:?}");
        let b = Broker::builder()
            .env("PETREL_AUTH__PASSWORD_FILE", &pw)
            .env("PETREL_AUTH__ALLOW_ANONYMOUS", "false")
            .env("PETREL_LIMITS__MAX_CONCURRENT_PASSWORD_CHECKS", "2")
            .env("PETREL_LIMITS__MAX_WAITING_PASSWORD_CHECKS", "8")
            .env("PETREL_LOG", "info")
            .start()
            .await;
        let addr = b.mqtt_addr();
        let rss_before = peak_rss_kib(b.pid());

        eprintln!("--- 200 CONNECTs with a password at once, v5 and 3.1.1 alternating");
        const N: usize = 200;
        let mut clients = Vec::with_capacity(N);
        for _ in 0..N {
            clients.push(RawClient::connect(addr).await);
        }
        let tasks: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(i, mut raw)| {
                tokio::spawn(async move {
                    let v5 = i % 2 == 0;
                    let id = format!("storm-{i}");
                    let c = if v5 {
                        Connect::v5(&id)
                    } else {
                        Connect::v311(&id)
                    };
                    raw.send(&c.login("storm", b"s3cret").encode()).await;
                    let ack = raw.expect_packet(WAIT, "CONNACK").await;
                    let (_, code) = ack.connack();
                    if code != 0 {
                        let rest = raw.expect_closed(WAIT).await;
                        assert!(rest.is_empty(), "{id}: after the refusal: {rest:?}");
                        assert_eq!(raw.close_error(), None, "{id}: refused with a clean close");
                    }
                    (v5, code, raw)
                })
            })
            .collect();
        let mut accepted = Vec::new();
        let (mut refused_v5, mut refused_v3) = (0u32, 0u32);
        for t in tasks {
            let (v5, code, raw) = t.await.expect("client task");
            match (v5, code) {
                (_, 0) => accepted.push(raw),
                (true, 0x97) => refused_v5 += 1,
                (false, 3) => refused_v3 += 1,
                other => panic!("CONNACK (v5, code) = {other:?}: only success or quota"),
            }
        }
        eprintln!(
            "accepted {}, refused v5 {refused_v5}, refused 3.1.1 {refused_v3}",
            accepted.len()
        );
        assert!(accepted.len() >= 2, "the checks that got a slot succeed");
        assert!(refused_v5 >= 1, "some v5 CONNECTs get 0x97");
        assert!(refused_v3 >= 1, "some 3.1.1 CONNECTs get 3");

        eprintln!("--- counted, and not as failed logins");
        let m = b.metrics().await;
        assert_eq!(
            m.get(r#"petrel_limit_hits_total{limit="password_checks"}"#),
            f64::from(refused_v5 + refused_v3)
        );
        assert_eq!(m.sum("petrel_auth_failures_total"), 0.0);
        assert_eq!(m.get("petrel_auth_password_checks_running"), 0.0);
        assert_eq!(m.get("petrel_auth_password_checks_waiting"), 0.0);

        eprintln!("--- memory: at most 2 checks ran at once");
        let grew_mib = peak_rss_kib(b.pid()).saturating_sub(rss_before) / 1024;
        assert!(
            grew_mib < 100,
            "peak RSS grew by {grew_mib} MiB: more than 2 checks' memory (19 MiB each)"
        );

        eprintln!("--- the accepted clients are connected; a later CONNECT gets in");
        for raw in &mut accepted {
            raw.ping().await;
        }
        let (mut late, _) =
            RawClient::handshake(addr, &Connect::v5("storm-late").login("storm", b"s3cret")).await;
        late.ping().await;
    })
    .await
}
