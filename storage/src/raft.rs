//! The Raft log and vote, in the node's RocksDB, written with fsync.
//!
//! ```text
//!  raft_log   index (u64 big-endian) -> entry (bytes the node's codec makes: protobuf)
//!  raft_state "vote" -> vote, "committed" -> log id, "purged" -> log id
//!             "snapshot_meta" / "snapshot_data" -> the last snapshot the node built or
//!             installed (opaque bytes)
//! ```
//!
//! These writes bypass the group-commit writer: Raft must know its log and vote are on disk
//! (fsync) before it answers, and a Raft write is already a batch of commands. Message
//! writes keep the writer and its cheaper WAL-only durability. Both share one database, so
//! an fsync here also syncs the WAL of message writes before it.
//!
//! The crate knows nothing of the entry format: [`RaftCodec`], which the node implements,
//! turns entries, votes and log ids into bytes and back.

use std::fmt::Debug;
use std::io;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::type_config::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::{OptionalSend, RaftTypeConfig};
use rocksdb::{Direction, IteratorMode, WriteBatch, WriteOptions};

use crate::keys::Cf;
use crate::store::{Shared, Store};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const PURGED: &[u8] = b"purged";
const SNAPSHOT_META: &[u8] = b"snapshot_meta";
const SNAPSHOT_DATA: &[u8] = b"snapshot_data";
const NODE_ID: &[u8] = b"node_id";

/// How the node's Raft types become bytes and back. Decoding fails on bytes a newer,
/// incompatible version wrote (the node refuses to start rather than guess).
pub trait RaftCodec<C: RaftTypeConfig>: Send + Sync + 'static {
    fn encode_entry(entry: &EntryOf<C>) -> Vec<u8>;
    fn decode_entry(bytes: &[u8]) -> io::Result<EntryOf<C>>;
    fn encode_vote(vote: &VoteOf<C>) -> Vec<u8>;
    fn decode_vote(bytes: &[u8]) -> io::Result<VoteOf<C>>;
    fn encode_log_id(id: &LogIdOf<C>) -> Vec<u8>;
    fn decode_log_id(bytes: &[u8]) -> io::Result<LogIdOf<C>>;
}

/// The Raft log store: openraft's `RaftLogStorage` over the node's database.
pub struct RaftLogStore<C, K> {
    shared: Arc<Shared>,
    _types: PhantomData<fn() -> (C, K)>,
}

impl<C, K> Clone for RaftLogStore<C, K> {
    fn clone(&self) -> Self {
        RaftLogStore {
            shared: self.shared.clone(),
            _types: PhantomData,
        }
    }
}

fn rocks(action: &'static str) -> impl Fn(rocksdb::Error) -> io::Error {
    move |e| io::Error::other(format!("{action}: {e}"))
}

fn index_key(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

fn synced() -> WriteOptions {
    let mut w = WriteOptions::default();
    w.set_sync(true);
    w
}

impl Store {
    /// The Raft log store over this database.
    pub fn raft_log<C, K>(&self) -> RaftLogStore<C, K>
    where
        C: RaftTypeConfig,
        K: RaftCodec<C>,
    {
        RaftLogStore {
            shared: self.shared.clone(),
            _types: PhantomData,
        }
    }

    /// Records the Raft node id this data dir belongs to, or checks it against the one
    /// recorded: `Err(recorded)` if they differ (a data dir never changes its node id).
    pub fn claim_raft_node_id(&self, id: u64) -> crate::Result<Result<(), u64>> {
        let db = &self.shared.db;
        let cf = crate::store::handle(db, Cf::RaftState);
        let got = db
            .get_cf(cf, NODE_ID)
            .map_err(|source| crate::Error::Rocks {
                action: "read node id",
                source,
            })?;
        match got {
            Some(v) => {
                let recorded = v
                    .as_slice()
                    .try_into()
                    .map(u64::from_be_bytes)
                    .unwrap_or(u64::MAX);
                Ok(if recorded == id {
                    Ok(())
                } else {
                    Err(recorded)
                })
            }
            None => {
                db.put_cf_opt(cf, NODE_ID, id.to_be_bytes(), &synced())
                    .map_err(|source| crate::Error::Rocks {
                        action: "write node id",
                        source,
                    })?;
                Ok(Ok(()))
            }
        }
    }

    /// The last snapshot saved with [`Store::save_raft_snapshot`]: (meta, data).
    pub fn load_raft_snapshot(&self) -> crate::Result<Option<(Vec<u8>, Vec<u8>)>> {
        let db = &self.shared.db;
        let cf = crate::store::handle(db, Cf::RaftState);
        let meta = db
            .get_cf(cf, SNAPSHOT_META)
            .map_err(|source| crate::Error::Rocks {
                action: "read snapshot",
                source,
            })?;
        let data = db
            .get_cf(cf, SNAPSHOT_DATA)
            .map_err(|source| crate::Error::Rocks {
                action: "read snapshot",
                source,
            })?;
        Ok(meta.zip(data))
    }

    /// Replaces the saved snapshot (fsync): meta and data in one atomic write.
    pub fn save_raft_snapshot(&self, meta: &[u8], data: &[u8]) -> crate::Result<()> {
        let db = &self.shared.db;
        let cf = crate::store::handle(db, Cf::RaftState);
        let mut b = WriteBatch::default();
        b.put_cf(cf, SNAPSHOT_META, meta);
        b.put_cf(cf, SNAPSHOT_DATA, data);
        db.write_opt(b, &synced())
            .map_err(|source| crate::Error::Rocks {
                action: "write snapshot",
                source,
            })
    }
}

impl<C, K> RaftLogStore<C, K>
where
    C: RaftTypeConfig,
    K: RaftCodec<C>,
{
    fn get_state(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let db = &self.shared.db;
        db.get_cf(crate::store::handle(db, Cf::RaftState), key)
            .map_err(rocks("read raft state"))
    }

    fn read_log_id(&self, key: &[u8]) -> io::Result<Option<LogIdOf<C>>> {
        self.get_state(key)?
            .map(|b| K::decode_log_id(&b))
            .transpose()
    }

    fn last_entry(&self) -> io::Result<Option<EntryOf<C>>> {
        let db = &self.shared.db;
        let mut it = db.iterator_cf(crate::store::handle(db, Cf::RaftLog), IteratorMode::End);
        match it.next() {
            Some(r) => {
                let (_, v) = r.map_err(rocks("read raft log"))?;
                Ok(Some(K::decode_entry(&v)?))
            }
            None => Ok(None),
        }
    }

    fn entries<RB: RangeBounds<u64>>(&self, range: RB) -> io::Result<Vec<EntryOf<C>>> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let db = &self.shared.db;
        let it = db.iterator_cf(
            crate::store::handle(db, Cf::RaftLog),
            IteratorMode::From(&index_key(start), Direction::Forward),
        );
        let mut out = Vec::new();
        for r in it {
            let (k, v) = r.map_err(rocks("read raft log"))?;
            let index = u64::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|_| io::Error::other("raft log key is not an index"))?,
            );
            if !range.contains(&index) {
                break;
            }
            out.push(K::decode_entry(&v)?);
        }
        Ok(out)
    }

    /// Runs a blocking RocksDB write off the async workers.
    async fn blocking<T, F>(&self, f: F) -> io::Result<T>
    where
        F: FnOnce(&Shared) -> io::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || f(&shared))
            .await
            .map_err(io::Error::other)?
    }
}

impl<C, K> RaftLogReader<C> for RaftLogStore<C, K>
where
    C: RaftTypeConfig,
    K: RaftCodec<C>,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<EntryOf<C>>> {
        self.entries(range)
    }

    async fn read_vote(&mut self) -> io::Result<Option<VoteOf<C>>> {
        self.get_state(VOTE)?
            .map(|b| K::decode_vote(&b))
            .transpose()
    }
}

impl<C, K> RaftLogStorage<C> for RaftLogStore<C, K>
where
    C: RaftTypeConfig,
    K: RaftCodec<C>,
{
    type LogReader = Self;

    async fn get_log_state(&mut self) -> io::Result<LogState<C>> {
        let purged = self.read_log_id(PURGED)?;
        let last = self
            .last_entry()?
            .map(|e| e.log_id())
            .or_else(|| purged.clone());
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<C>) -> io::Result<()> {
        let v = K::encode_vote(vote);
        self.blocking(move |s| {
            s.db.put_cf_opt(
                crate::store::handle(&s.db, Cf::RaftState),
                VOTE,
                v,
                &synced(),
            )
            .map_err(rocks("write vote"))
        })
        .await
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<C>>) -> io::Result<()> {
        // Not synced: losing it only means re-applying from the snapshot up to what a leader
        // says is committed.
        let db = &self.shared.db;
        let cf = crate::store::handle(db, Cf::RaftState);
        match committed {
            Some(id) => db.put_cf(cf, COMMITTED, K::encode_log_id(&id)),
            None => db.delete_cf(cf, COMMITTED),
        }
        .map_err(rocks("write committed"))
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogIdOf<C>>> {
        self.read_log_id(COMMITTED)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> io::Result<()>
    where
        I: IntoIterator<Item = EntryOf<C>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::default();
        {
            let cf = crate::store::handle(&self.shared.db, Cf::RaftLog);
            for e in entries {
                batch.put_cf(cf, index_key(e.index()), K::encode_entry(&e));
            }
        }
        let r = self
            .blocking(move |s| {
                s.db.write_opt(batch, &synced())
                    .map_err(rocks("append raft log"))
            })
            .await;
        match r {
            Ok(()) => {
                callback.io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.io_completed(Err(io::Error::new(e.kind(), e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate_after(&mut self, last: Option<LogIdOf<C>>) -> io::Result<()> {
        let from = last.map(|id| id.index() + 1).unwrap_or(0);
        self.blocking(move |s| {
            let cf = crate::store::handle(&s.db, Cf::RaftLog);
            let mut b = WriteBatch::default();
            b.delete_range_cf(cf, index_key(from), index_key(u64::MAX));
            b.delete_cf(cf, index_key(u64::MAX));
            s.db.write_opt(b, &synced())
                .map_err(rocks("truncate raft log"))
        })
        .await
    }

    async fn purge(&mut self, upto: LogIdOf<C>) -> io::Result<()> {
        let id = K::encode_log_id(&upto);
        let to = upto.index().saturating_add(1);
        self.blocking(move |s| {
            let mut b = WriteBatch::default();
            b.put_cf(crate::store::handle(&s.db, Cf::RaftState), PURGED, id);
            b.delete_range_cf(
                crate::store::handle(&s.db, Cf::RaftLog),
                index_key(0),
                index_key(to),
            );
            s.db.write_opt(b, &synced())
                .map_err(rocks("purge raft log"))
        })
        .await
    }
}
