use std::time::Duration;

use crate::keys::{self, Cf};
use crate::{Error, Store, StoreOptions, FORMAT_VERSION};

fn open(dir: &std::path::Path) -> Store {
    Store::open(StoreOptions {
        path: dir.join("db"),
        fsync: false,
    })
    .expect("open store")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn group_commit_and_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let mut last = Default::default();
    for seq in 0..100u64 {
        last = store.append(|w| w.put(Cf::Queue, &keys::queue_key("c1", seq), b"m"));
    }
    store.append(|w| w.put(Cf::Queue, &keys::queue_key("c2", 1), b"other"));
    rt().block_on(async { tokio::time::timeout(Duration::from_secs(10), store.wait(last)).await })
        .expect("commit in time")
        .expect("commit ok");
    store.append(|w| w.delete_client("c1"));
    store.close();
    drop(store);
    let store = open(dir.path());
    let rows: Vec<_> = store.scan(Cf::Queue).map(|r| r.expect("row")).collect();
    assert_eq!(rows.len(), 1, "c1 deleted as a range, c2 kept");
    assert_eq!(
        keys::split_client_key(&rows[0].0).map(|(c, _)| c),
        Some("c2")
    );
}

#[test]
fn refuses_other_format_and_foreign_dirs() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(dir.path());
        store.append(|w| w.put(Cf::Meta, keys::FORMAT_VERSION_KEY, &99u32.to_be_bytes()));
        store.close();
    }
    match Store::open(StoreOptions {
        path: dir.path().join("db"),
        fsync: false,
    }) {
        Err(Error::FormatVersion {
            found: 99,
            expected,
            ..
        }) => assert_eq!(expected, FORMAT_VERSION),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("opened a directory of another format"),
    }
    let foreign = dir.path().join("foreign");
    std::fs::create_dir_all(&foreign).expect("mkdir");
    std::fs::write(foreign.join("notes.txt"), b"hello").expect("write");
    let err = Store::open(StoreOptions {
        path: foreign,
        fsync: false,
    })
    .err()
    .expect("refused");
    assert!(matches!(err, Error::NotPetrel { .. }), "{err}");
    assert!(err.to_string().contains("not a petrel data directory"));
}

#[test]
fn failed_write_fails_waiters_and_discards_later_appends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let rt = rt();
    let wait = |t| {
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), store.wait(t)).await })
            .expect("an answer in time")
    };
    let good = store.append(|w| w.put(Cf::Queue, &keys::queue_key("c", 1), b"durable"));
    wait(good).expect("first write is durable");
    assert!(store.write_error().is_none());

    store.fail_next_write();
    let lost = store.append(|w| w.put(Cf::Queue, &keys::queue_key("c", 2), b"lost"));
    assert!(
        matches!(wait(lost), Err(Error::WriterFailed)),
        "the failed ticket errors"
    );
    let c = store.committed_now();
    assert!(
        c.failed && c.ticket == good,
        "watermark stays at the last good write: {c:?}"
    );
    let e = store.write_error().expect("the error is kept");
    assert!(e.to_string().contains("write batch"), "{e}");

    let empty = store.pending_bytes();
    let mut last = lost;
    for seq in 3..1000u64 {
        last = store.append(|w| w.put(Cf::Queue, &keys::queue_key("c", seq), &[0; 1024]));
    }
    assert_eq!(
        store.pending_bytes(),
        empty,
        "appends after the failure are discarded"
    );
    assert!(last > lost, "tickets stay ordered");
    assert!(matches!(wait(last), Err(Error::WriterFailed)));
    store.close();
    drop(store);

    let store = open(dir.path());
    let rows: Vec<_> = store.scan(Cf::Queue).map(|r| r.expect("row")).collect();
    assert_eq!(rows.len(), 1, "only the durable write survives: {rows:?}");
    assert_eq!(&*rows[0].1, b"durable");
}
