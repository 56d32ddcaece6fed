//! Client id -> session, and the local turn-taking of claims of one client id (the claim
//! itself, with its epoch, is the claim service's: `crate::claim`).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::session::{Kick, Session, SessionId};
use super::stats::SessionStats;

/// The order of claims: every successful claim of a client id gets a higher epoch than the
/// one before it, cluster-wide (the claim service hands them out).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

type ClaimLock = Arc<tokio::sync::Mutex<()>>;

pub struct SessionRegistry {
    sessions: Mutex<HashMap<Arc<str>, Arc<Session>>>,
    /// Client ids with a claim in progress: claims of one client id run one at a time.
    claims: Mutex<HashMap<Arc<str>, ClaimLock>>,
    next_id: AtomicU64,
    /// Counted by the sessions themselves: `$SYS` reads them without walking the map.
    stats: Arc<SessionStats>,
}

impl Default for SessionRegistry {
    fn default() -> Self {
        SessionRegistry {
            sessions: Mutex::new(HashMap::new()),
            claims: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            stats: Arc::default(),
        }
    }
}

/// Held while a client id is being claimed; the next claim of that id waits for its drop.
pub struct ClaimGuard<'a> {
    registry: &'a SessionRegistry,
    client_id: Arc<str>,
    lock: Option<ClaimLock>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let lock = self.lock.take();
        let mut claims = lock_map(&self.registry.claims);
        // The map's handle and ours: nobody else waits for this client id.
        if lock.is_some_and(|l| Arc::strong_count(&l) == 2) {
            claims.remove(&self.client_id);
        }
    }
}

fn lock_map<K, V>(m: &Mutex<HashMap<K, V>>) -> MutexGuard<'_, HashMap<K, V>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SessionRegistry {
    pub(crate) fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<Session>>> {
        lock_map(&self.sessions)
    }

    /// Waits for any other claim of `client_id` to finish, then holds the claim until the
    /// guard is dropped. Claims of other client ids do not wait.
    pub async fn lock_claim(&self, client_id: &Arc<str>) -> ClaimGuard<'_> {
        let lock = lock_map(&self.claims)
            .entry(client_id.clone())
            .or_default()
            .clone();
        let guard = lock.clone().lock_owned().await;
        ClaimGuard {
            registry: self,
            client_id: client_id.clone(),
            lock: Some(lock),
            guard: Some(guard),
        }
    }

    pub fn get(&self, client_id: &str) -> Option<Arc<Session>> {
        self.lock().get(client_id).cloned()
    }

    /// Creates a fresh session for the client id if its entry is still `expected` (the
    /// session the caller saw, or none): returns it and the one it replaced. `None` if
    /// another session got there first.
    pub fn create(
        &self,
        client_id: Arc<str>,
        expiry_secs: u32,
        expected: Option<SessionId>,
    ) -> Option<(Arc<Session>, Option<Arc<Session>>)> {
        let mut map = self.lock();
        if map.get(&client_id).map(|s| s.id()) != expected {
            return None;
        }
        let id = SessionId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let session = Session::new(id, client_id.clone(), expiry_secs);
        let session = Arc::new(session.with_stats(self.stats.clone()));
        let old = map.insert(client_id, session.clone());
        Some((session, old))
    }

    /// Inserts a session built by `make` from a fresh id (recovery at start).
    pub fn restore<F>(&self, client_id: Arc<str>, make: F) -> Arc<Session>
    where
        F: FnOnce(SessionId, Arc<str>) -> Session,
    {
        let id = SessionId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let session = Arc::new(make(id, client_id.clone()).with_stats(self.stats.clone()));
        self.lock().insert(client_id, session.clone());
        session
    }

    /// Removes the entry if it still is this session.
    pub fn remove(&self, session: &Session) -> bool {
        let mut map = self.lock();
        match map.get(session.client_id()) {
            Some(s) if s.id() == session.id() => map.remove(session.client_id()).is_some(),
            _ => false,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sessions with a connection attached (a counter: no walk, no lock).
    pub fn connected_count(&self) -> usize {
        self.stats.connected()
    }

    /// Tells every attached connection to go; returns how many were told.
    pub fn kick_all(&self, why: Kick) -> usize {
        let sessions: Vec<Arc<Session>> = self.lock().values().cloned().collect();
        sessions.iter().filter(|s| s.kick(why)).count()
    }

    /// Total queued messages over all sessions (a sum of counters: no walk, no lock).
    pub fn queued_count(&self) -> usize {
        self.stats.queued()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn create_refuses_when_the_entry_changed() {
        let r = SessionRegistry::default();
        let id: Arc<str> = "c".into();
        let (a, old) = r.create(id.clone(), 0, None).expect("empty entry");
        assert!(old.is_none());
        assert!(r.create(id.clone(), 0, None).is_none(), "a is there now");
        let (b, old) = r.create(id.clone(), 0, Some(a.id())).expect("a expected");
        assert_eq!(old.map(|s| s.id()), Some(a.id()));
        assert_eq!(r.get("c").map(|s| s.id()), Some(b.id()));
    }

    #[tokio::test]
    async fn claims_of_one_client_id_take_turns() {
        let r = Arc::new(SessionRegistry::default());
        let id: Arc<str> = "c".into();
        let first = r.lock_claim(&id).await;
        let r2 = r.clone();
        let id2 = id.clone();
        let second = tokio::spawn(async move {
            let _turn = r2.lock_claim(&id2).await;
        });
        tokio::task::yield_now().await;
        assert!(!second.is_finished(), "waits for the first claim");
        // Another client id does not wait.
        let other = r.lock_claim(&"d".into()).await;
        drop(other);
        drop(first);
        second.await.expect("second claim");
        assert!(lock_map(&r.claims).is_empty(), "no claim entry left behind");
    }
}
