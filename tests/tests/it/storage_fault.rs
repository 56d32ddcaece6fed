//! Issue 10, point 6: a storage write that fails. The data directory sits on a small tmpfs
//! this test mounts (it must run as root, as CI does) and fills. The publish whose write
//! failed gets no PUBACK but a v5 DISCONNECT 0x80, 3.x clients are closed, `/health/ready`
//! turns 503, `petrel_storage_write_errors_total` counts it and the process exits with 74
//! (EX_IOERR). On the same directory, with room again, a new process delivers every message
//! the first one acknowledged.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use super::*;

const MIB: u64 = 1 << 20;
/// Payload of each publish: a 4-byte sequence number, then filler.
const PAYLOAD: usize = 64 * 1024;
/// ENOSPC on Linux.
const NO_SPACE: i32 = 28;

/// A tmpfs mounted on a temporary directory, unmounted when dropped (also when the test
/// fails; lazily if a process still holds it).
struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    fn mount(size_mib: u64) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("petrel-tmpfs-")
            .tempdir()
            .expect("create mount point");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs and must run as root (CI does); mount failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut cmd = std::process::Command::new("umount");
            if lazy {
                cmd.arg("-l");
            }
            cmd.arg(self.dir.path()).status().is_ok_and(|s| s.success())
        };
        if !umount(false) && !umount(true) {
            eprintln!("could not unmount {}", self.dir.path().display());
        }
    }
}

/// Fills the filesystem holding `dir` to the last byte, then gives `room` bytes back.
fn fill_leaving(dir: &Path, room: u64) -> PathBuf {
    let path = dir.join("filler");
    let mut f = File::create(&path).expect("create filler");
    let chunk = vec![0xA5u8; MIB as usize];
    let mut len = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => len += n as u64,
            Err(e) if e.raw_os_error() == Some(NO_SPACE) => break,
            Err(e) => panic!("write filler: {e}"),
        }
    }
    f.set_len(len.saturating_sub(room)).expect("shrink filler");
    path
}

async fn start_on(data: &Path) -> Broker {
    Broker::builder()
        .without_data_dir_flag()
        .arg("--data-dir")
        .arg(data.to_str().expect("utf-8 path"))
        // The half-sent CONNECT below must outlast the test's checks.
        .env("PETREL_MQTT__CONNECT_TIMEOUT_MS", "30000")
        // No retained `$SYS` writes: the test's publishes are the only writes.
        .env("PETREL_MQTT__SYS_INTERVAL_SECS", "0")
        .start()
        .await
}

fn persistent_v5(client_id: &str) -> pkt::Connect {
    pkt::Connect::v5(client_id)
        .clean(false)
        .property(prop::u32(prop::SESSION_EXPIRY, 3600))
}

fn payload(seq: u32) -> Vec<u8> {
    let mut p = seq.to_be_bytes().to_vec();
    p.resize(PAYLOAD, 0x5A);
    p
}

#[tokio::test]
async fn t90_issue_10_full_disk_refuses_the_ack_goes_unready_exits_74_and_recovers() {
    test_timeout(async {
        let fs = Tmpfs::mount(32);
        let data = fs.path().join("data");
        let mut broker = start_on(&data).await;
        let addr = broker.mqtt_addr();

        eprintln!("--- a persistent v5 subscriber subscribes to sf/# at QoS 1, then goes offline");
        {
            let (mut sub, _) = RawClient::handshake(addr, &persistent_v5("sf-sub")).await;
            sub.send(&pkt::subscribe(true, 1, &[("sf/#", 1)], &[]))
                .await;
            sub.expect_kind(kind::SUBACK, WAIT).await;
            sub.send(&pkt::disconnect()).await;
            sub.expect_closed(WAIT).await;
        }
        wait_connections(&broker, 0).await;

        eprintln!(
            "--- an idle 3.1.1 client, and a connection with half a CONNECT (holds the drain)"
        );
        let (mut v3, _) = RawClient::handshake(addr, &pkt::Connect::v311("sf-v3")).await;
        let mut holder = RawClient::connect(addr).await;
        holder.send(&[0x10]).await;
        wait_connections(&broker, 2).await;

        eprintln!("--- fill the disk, leaving 1 MiB");
        let filler = fill_leaving(fs.path(), MIB);

        eprintln!("--- QoS 1 publishes of 64 KiB, one at a time, until one is not acknowledged");
        let (mut publisher, _) = RawClient::handshake(addr, &pkt::Connect::v5("sf-pub")).await;
        let mut acked = Vec::new();
        let reason = loop {
            let seq = acked.len() as u32;
            assert!(seq < 1000, "the disk never filled up");
            let pkid = seq as u16 + 1;
            let p = pkt::publish(true, "sf/x", &payload(seq), 1, pkid, false, false, &[]);
            publisher.send(&p).await;
            match publisher.read(WAIT).await {
                RawRead::Packet(a) if a.kind == kind::PUBACK => {
                    assert_eq!((a.pkid(), a.ack_reason()), (pkid, 0), "PUBACK of {seq}");
                    acked.push(seq);
                }
                RawRead::Packet(d) if d.kind == kind::DISCONNECT => break d.disconnect_reason(),
                other => panic!("publish {seq}: expected PUBACK or DISCONNECT, got {other:?}"),
            }
        };
        assert_eq!(reason, 0x80, "DISCONNECT reason after the failed write");
        let after = publisher.expect_closed(WAIT).await;
        assert!(after.is_empty(), "nothing after the DISCONNECT: {after:?}");
        assert!(
            !acked.is_empty(),
            "some publishes fitted before the disk was full"
        );
        eprintln!("--- {} acknowledged before the write failed", acked.len());

        eprintln!("--- not ready, counted, logged; the 3.1.1 client is closed without a word");
        let (status, body) = broker.http_get("/health/ready").await;
        assert_eq!(status, 503, "readiness after the failure: {body}");
        broker
            .wait_metric("petrel_storage_write_errors_total", WAIT, |v| v == 1.0)
            .await;
        let got = v3.expect_closed(WAIT).await;
        assert!(got.is_empty(), "3.x client got {got:?}");
        wait_until("the failure is logged at ERROR", WAIT, || async {
            let log = broker.log();
            match log.lines().find(|l| l.contains("storage write failed")) {
                Some(l) if l.contains("ERROR") => Ok(()),
                other => Err(other.map(str::to_owned)),
            }
        })
        .await;

        eprintln!("--- the half-open connection goes: the node exits with 74 (EX_IOERR)");
        drop(holder);
        let exit = broker.wait_exit(WAIT).await;
        assert_eq!(exit.code(), Some(74), "exit status {exit}");

        eprintln!("--- free the disk and restart on the same directory");
        std::fs::remove_file(&filler).expect("remove filler");
        let mut broker = start_on(&data).await;
        broker.wait_ready(200).await;
        let mut sub = RawClient::connect(broker.mqtt_addr()).await;
        sub.send(&persistent_v5("sf-sub").encode()).await;
        let (present, code) = sub.expect_packet(WAIT, "CONNACK").await.connack();
        assert_eq!((present, code), (true, 0), "the session survived");
        let mut missing: std::collections::BTreeSet<u32> = acked.iter().copied().collect();
        while !missing.is_empty() {
            let p = match sub.read(WAIT).await {
                RawRead::Packet(p) if p.kind == kind::PUBLISH => p.publish(true),
                other => panic!("waiting for {missing:?}: got {other:?}"),
            };
            let seq = u32::from_be_bytes(p.payload[..4].try_into().expect("4-byte sequence"));
            assert_eq!(p.payload, payload(seq), "payload of {seq} intact");
            missing.remove(&seq);
            sub.send(&pkt::puback(p.pkid)).await;
        }
        eprintln!("--- all {} acknowledged messages delivered", acked.len());
        broker.kill9().await;
    })
    .await;
}
