//! The process's open-files limit and descriptor table, prepared before any thread starts.
//!
//! Each connection is a descriptor. Two things about descriptors hurt a broker that is
//! taking a burst of connections:
//! - a soft `RLIMIT_NOFILE` below the hard one (often 1024) refuses accepts long before
//!   `limits.max_connections`;
//! - the kernel grows a process's descriptor table by doubling it, and in a process with
//!   several threads each growth waits for an RCU grace period (10–30 ms seen here). The
//!   thread that accepts stalls meanwhile, and so do the connections it serves: a fresh node
//!   took its first 5,000 connections at half the rate of a warm one.
//!
//! [`prepare`] raises the soft limit to the hard one and grows the table once, to what the
//! connection limit needs, while the process still has one thread (no grace period).

use std::fs::File;
use std::io;

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Descriptors kept for everything that is not a client: RocksDB files, listeners, the
/// admin API, peers.
const HEADROOM: u64 = 1024;
/// The table is grown to at most this many entries (8 bytes of kernel memory each).
const TABLE_CAP: u64 = 1 << 20;

/// What [`prepare`] did, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit now in force (`None`: unlimited).
    pub limit: Option<u64>,
    /// The soft limit before, if it was raised.
    pub raised_from: Option<u64>,
    /// Entries the descriptor table was grown to (0: not grown).
    pub table: u64,
}

impl OpenFiles {
    /// Client connections the limit leaves room for, if it is below `max_connections`.
    pub fn shortfall(&self, max_connections: usize) -> Option<u64> {
        let room = self.limit?.saturating_sub(HEADROOM);
        (room < max_connections as u64).then_some(room)
    }
}

/// Raises the soft open-files limit to the hard limit and grows the descriptor table to
/// `max_connections` plus headroom (within the limit). Call it before starting threads.
pub fn prepare(max_connections: usize) -> io::Result<OpenFiles> {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    let mut done = OpenFiles {
        limit: current,
        raised_from: None,
        table: 0,
    };
    if current.is_some() && current != maximum {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: maximum,
                maximum,
            },
        )?;
        done.raised_from = current;
        done.limit = maximum;
    }
    let want = (max_connections as u64).saturating_add(HEADROOM);
    let top = done.limit.unwrap_or(u64::MAX).min(want).min(TABLE_CAP);
    if top > 64 {
        // A descriptor numbered top - 1 makes the kernel size the table for it; the table
        // stays that size after the descriptor is closed.
        let null = File::open("/dev/null")?;
        let high = rustix::io::fcntl_dupfd_cloexec(&null, (top - 1) as i32)?;
        drop(high);
        done.table = top;
    }
    Ok(done)
}

/// [`prepare`], with what it did (or why it could not) in the log.
pub fn prepare_logged(max_connections: usize) {
    match prepare(max_connections) {
        Ok(done) => {
            tracing::debug!(limit = ?done.limit, raised_from = ?done.raised_from, table = done.table, "open files prepared");
            if let Some(room) = done.shortfall(max_connections) {
                tracing::warn!(
                    open_files_limit = ?done.limit,
                    max_connections,
                    "the open-files limit leaves room for about {room} connections, fewer \
                     than limits.max_connections; raise it (ulimit -n, LimitNOFILE=)"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not prepare the open-files limit"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raises_the_soft_limit_and_reports_what_it_did() {
        let before = getrlimit(Resource::Nofile);
        let done = prepare(100).expect("prepare the descriptor table");
        let after = getrlimit(Resource::Nofile);
        assert_eq!(
            after.current, before.maximum,
            "soft limit raised to the hard one"
        );
        assert_eq!(done.limit, after.current);
        if before.current != before.maximum {
            assert_eq!(done.raised_from, before.current);
        }
        // 100 connections + headroom, unless the limit is lower.
        let expect = after.current.unwrap_or(u64::MAX).min(100 + HEADROOM);
        assert_eq!(done.table, if expect > 64 { expect } else { 0 });
    }

    #[test]
    fn shortfall_names_the_room_left_for_clients() {
        let f = OpenFiles {
            limit: Some(20_000),
            raised_from: None,
            table: 0,
        };
        assert_eq!(f.shortfall(100_000), Some(20_000 - HEADROOM));
        assert_eq!(f.shortfall(10_000), None);
        let unlimited = OpenFiles { limit: None, ..f };
        assert_eq!(unlimited.shortfall(100_000), None);
    }
}
