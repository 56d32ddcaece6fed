//! The RocksDB store and its group-commit writer.
//!
//! ```text
//!  any thread                         writer thread ("petrel-store")
//!  store.append(|w| w.put(..)) ─┐      wait for work
//!    -> Ticket(n)               ├──>   take the whole pending WriteBatch
//!  store.append(..) -> Ticket(n+1)┘    db.write (WAL; fsync if configured)
//!  ticket.wait().await   <──────────   committed watermark := n+1
//! ```
//!
//! Appends from every connection go into one shared `WriteBatch`, so a burst of publishes
//! becomes one RocksDB write. Order of appends is order of application.
//!
//! A failed write (disk full, I/O error) is final: the writer records the error, marks the
//! watermark `failed` (every ticket past it will never be durable) and stops. Later appends
//! are discarded as they are made, so nothing grows while the node goes down; the node
//! restarts and recovers from what the WAL holds.

use std::path::{Path, PathBuf};
#[cfg(test)]
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::keys::{self, Cf, FORMAT_VERSION_KEY};
use crate::FORMAT_VERSION;

/// One stored entry: key and value bytes.
pub type KeyValue = (Box<[u8]>, Box<[u8]>);

/// How the store is opened.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Directory of the RocksDB database.
    pub path: PathBuf,
    /// fsync every group commit (survives power loss), not only write the WAL (survives a
    /// process crash).
    pub fsync: bool,
}

/// Position in the commit order; durable once the committed watermark reaches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Ticket(pub u64);

/// The committed watermark and whether the writer has failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Committed {
    /// Every ticket up to this one is durable.
    pub ticket: Ticket,
    /// A write failed: no ticket past `ticket` will ever be durable.
    pub failed: bool,
}

struct Pending {
    batch: WriteBatch,
    last: u64,
    stop: bool,
    /// The writer has failed: appends are discarded.
    failed: bool,
}

pub(crate) struct Shared {
    pub(crate) db: DB,
    pending: Mutex<Pending>,
    work: Condvar,
    committed: watch::Sender<Committed>,
    fsync: bool,
    /// The error that stopped the writer.
    write_error: Mutex<Option<rocksdb::Error>>,
    /// Told of each group commit: how long the write took and how many writes it held.
    on_commit: std::sync::OnceLock<CommitObserver>,
    /// Tests: make the next group commit fail.
    #[cfg(test)]
    fail_writes: AtomicBool,
}

/// What [`Store::observe_commits`] calls after each group commit, on the writer thread:
/// the time the write took and the number of writes in it.
pub type CommitObserver = Box<dyn Fn(std::time::Duration, usize) + Send + Sync>;

/// A cheap handle; clones share one database and one writer.
#[derive(Clone)]
pub struct Store {
    pub(crate) shared: Arc<Shared>,
    writer: Arc<Mutex<Option<JoinHandle<()>>>>,
}

/// Adds operations to the pending batch; handed out by [`Store::append`].
pub struct BatchWriter<'a> {
    db: &'a DB,
    batch: &'a mut WriteBatch,
}

pub(crate) fn handle(db: &DB, cf: Cf) -> &ColumnFamily {
    db.cf_handle(cf.name())
        .expect("every column family is created at open")
}

impl BatchWriter<'_> {
    pub fn put(&mut self, cf: Cf, key: &[u8], value: &[u8]) {
        self.batch.put_cf(handle(self.db, cf), key, value);
    }

    pub fn delete(&mut self, cf: Cf, key: &[u8]) {
        self.batch.delete_cf(handle(self.db, cf), key);
    }

    /// Deletes the session record and every per-client key of `client_id`.
    pub fn delete_client(&mut self, client_id: &str) {
        let (from, to) = (
            keys::client_prefix(client_id),
            keys::client_prefix_end(client_id),
        );
        for cf in Cf::PER_CLIENT {
            self.batch.delete_range_cf(handle(self.db, cf), &from, &to);
        }
        self.delete(Cf::Sessions, client_id.as_bytes());
        self.delete(Cf::Wills, client_id.as_bytes());
    }
}

/// Operations appended atomically; see [`Store::begin`].
pub struct Txn<'a> {
    shared: &'a Shared,
    guard: Option<MutexGuard<'a, Pending>>,
    was_empty: bool,
}

impl Txn<'_> {
    pub fn writer(&mut self) -> BatchWriter<'_> {
        let p = self.guard.as_mut().expect("guard held until commit");
        BatchWriter {
            db: &self.shared.db,
            batch: &mut p.batch,
        }
    }

    /// Ends the transaction; the ticket says when its operations are durable.
    pub fn commit(mut self) -> Ticket {
        self.finish()
    }

    fn finish(&mut self) -> Ticket {
        let Some(mut p) = self.guard.take() else {
            return Ticket(0);
        };
        if p.failed {
            // Never written: drop it now, and hand out a ticket past the watermark, so that
            // whoever waits for it learns of the failure.
            p.batch.clear();
            p.last += 1;
            return Ticket(p.last);
        }
        if p.batch.is_empty() {
            return Ticket(p.last);
        }
        if self.was_empty {
            // A new batch: the writer takes batches whole, so tickets number batches.
            p.last += 1;
        }
        let ticket = Ticket(p.last);
        drop(p);
        self.shared.work.notify_one();
        ticket
    }
}

impl Drop for Txn<'_> {
    fn drop(&mut self) {
        self.finish();
    }
}

fn lock(m: &Mutex<Pending>) -> MutexGuard<'_, Pending> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Store {
    /// Opens (or creates) the database and starts the writer thread. Refuses a directory
    /// written by another format version, or one that holds something else.
    pub fn open(opts: StoreOptions) -> Result<Store> {
        let path = opts.path.clone();
        let exists = path.join("CURRENT").exists();
        if !exists
            && path.exists()
            && std::fs::read_dir(&path)
                .map(|mut d| d.next().is_some())
                .unwrap_or(false)
        {
            return Err(Error::NotPetrel { path });
        }
        std::fs::create_dir_all(&path).map_err(|source| Error::CreateDir {
            path: path.clone(),
            source,
        })?;
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(2);
        db_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        db_opts.set_keep_log_file_num(4);
        let cfs = Cf::ALL
            .iter()
            .map(|cf| ColumnFamilyDescriptor::new(cf.name(), Options::default()));
        let db = DB::open_cf_descriptors(&db_opts, &path, cfs).map_err(|source| Error::Open {
            path: path.clone(),
            source,
        })?;
        let meta = db.cf_handle(Cf::Meta.name()).expect("meta family exists");
        match db
            .get_cf(meta, FORMAT_VERSION_KEY)
            .map_err(|source| Error::Rocks {
                action: "read format version",
                source,
            })? {
            Some(v) => {
                let found = v.as_slice().try_into().map(u32::from_be_bytes).unwrap_or(0);
                if found != FORMAT_VERSION {
                    return Err(Error::FormatVersion {
                        path,
                        found,
                        expected: FORMAT_VERSION,
                    });
                }
            }
            None if exists => return Err(Error::NotPetrel { path }),
            None => {
                let mut w = WriteOptions::default();
                w.set_sync(true);
                db.put_cf_opt(meta, FORMAT_VERSION_KEY, FORMAT_VERSION.to_be_bytes(), &w)
                    .map_err(|source| Error::Rocks {
                        action: "write format version",
                        source,
                    })?;
            }
        }
        let (committed, _) = watch::channel(Committed::default());
        let shared = Arc::new(Shared {
            db,
            pending: Mutex::new(Pending {
                batch: WriteBatch::default(),
                last: 0,
                stop: false,
                failed: false,
            }),
            work: Condvar::new(),
            committed,
            fsync: opts.fsync,
            write_error: Mutex::new(None),
            on_commit: std::sync::OnceLock::new(),
            #[cfg(test)]
            fail_writes: AtomicBool::new(false),
        });
        let for_thread = shared.clone();
        let writer = std::thread::Builder::new()
            .name("petrel-store".into())
            .spawn(move || write_loop(&for_thread))
            .map_err(|source| Error::CreateDir {
                path: opts.path,
                source,
            })?;
        Ok(Store {
            shared,
            writer: Arc::new(Mutex::new(Some(writer))),
        })
    }

    /// Appends operations to the next group commit and returns its ticket.
    pub fn append<F>(&self, f: F) -> Ticket
    where
        F: FnOnce(&mut BatchWriter<'_>),
    {
        let mut txn = self.begin();
        f(&mut txn.writer());
        txn.commit()
    }

    /// Starts appending operations that must land in one atomic write: the pending batch
    /// stays locked until [`Txn::commit`] (or drop), so the writer cannot split them.
    pub fn begin(&self) -> Txn<'_> {
        let guard = lock(&self.shared.pending);
        let was_empty = guard.batch.is_empty();
        Txn {
            shared: &self.shared,
            guard: Some(guard),
            was_empty,
        }
    }

    /// A receiver of the committed watermark.
    pub fn committed(&self) -> watch::Receiver<Committed> {
        self.shared.committed.subscribe()
    }

    /// The committed watermark now (a look, without a receiver to keep).
    pub fn committed_now(&self) -> Committed {
        *self.shared.committed.borrow()
    }

    /// The write error that stopped the writer, if one did.
    pub fn write_error(&self) -> Option<Error> {
        let e = self
            .shared
            .write_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        Some(Error::Rocks {
            action: "write batch",
            source: e,
        })
    }

    /// Tests: bytes appended and not yet taken by the writer.
    #[cfg(test)]
    pub(crate) fn pending_bytes(&self) -> usize {
        lock(&self.shared.pending).batch.size_in_bytes()
    }

    /// Tests: the next group commit fails as a real RocksDB write error.
    #[cfg(test)]
    pub(crate) fn fail_next_write(&self) {
        self.shared.fail_writes.store(true, Ordering::Relaxed);
    }

    /// Waits until `ticket` is durable. Errors if the writer failed.
    pub async fn wait(&self, ticket: Ticket) -> Result<()> {
        let mut rx = self.committed();
        let c = rx
            .wait_for(|c| c.failed || c.ticket >= ticket)
            .await
            .map_err(|_| Error::WriterFailed)?;
        if c.failed {
            return Err(Error::WriterFailed);
        }
        Ok(())
    }

    /// Every key and value of a column family, in key order.
    pub fn scan(&self, cf: Cf) -> impl Iterator<Item = Result<KeyValue>> + '_ {
        let h = self
            .shared
            .db
            .cf_handle(cf.name())
            .expect("every column family is created at open");
        self.shared.db.iterator_cf(h, IteratorMode::Start).map(|r| {
            r.map_err(|source| Error::Rocks {
                action: "scan",
                source,
            })
        })
    }

    /// Calls `f` after each group commit (once set, for good; a second call is ignored). It
    /// runs on the writer thread: it must be quick.
    pub fn observe_commits(&self, f: CommitObserver) {
        let _ = self.shared.on_commit.set(f);
    }

    /// Flushes what is pending and stops the writer; later appends are never written.
    pub fn close(&self) {
        lock(&self.shared.pending).stop = true;
        self.shared.work.notify_one();
        let handle = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    pub fn path(&self) -> &Path {
        self.shared.db.path()
    }
}

fn write_loop(s: &Shared) {
    let mut w = WriteOptions::default();
    w.set_sync(s.fsync);
    loop {
        let (batch, ticket, stop) = {
            let mut p = lock(&s.pending);
            while p.batch.is_empty() && !p.stop {
                p = s.work.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            (std::mem::take(&mut p.batch), p.last, p.stop)
        };
        if !batch.is_empty() {
            let (started, writes) = (std::time::Instant::now(), batch.len());
            let r = write(s, batch, &w);
            if let (Ok(()), Some(f)) = (&r, s.on_commit.get()) {
                f(started.elapsed(), writes);
            }
            if let Err(e) = r {
                // Handled by the node (it logs, counts and goes down): recorded, not logged.
                *s.write_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                let mut p = lock(&s.pending);
                p.failed = true;
                p.batch.clear();
                drop(p);
                s.committed.send_modify(|c| c.failed = true);
                return;
            }
            s.committed.send_modify(|c| c.ticket = Ticket(ticket));
        }
        if stop {
            return;
        }
    }
}

fn write(s: &Shared, batch: WriteBatch, w: &WriteOptions) -> Result<(), rocksdb::Error> {
    #[cfg(test)]
    if s.fail_writes.swap(false, Ordering::Relaxed) {
        // A real RocksDB error: a synced write needs the WAL.
        let mut bad = WriteOptions::default();
        bad.set_sync(true);
        bad.disable_wal(true);
        return s.db.write_opt(batch, &bad);
    }
    s.db.write_opt(batch, w)
}
