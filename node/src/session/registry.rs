//! Client id -> session. The seam where the cluster's Raft claim will plug in.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::session::{Kick, Session, SessionId};

pub struct SessionRegistry {
    sessions: Mutex<HashMap<Arc<str>, Arc<Session>>>,
    next_id: AtomicU64,
}

impl Default for SessionRegistry {
    fn default() -> Self {
        SessionRegistry {
            sessions: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        }
    }
}

impl SessionRegistry {
    pub(crate) fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, client_id: &str) -> Option<Arc<Session>> {
        self.lock().get(client_id).cloned()
    }

    /// Creates a fresh session for the client id, returning it and the one it replaced.
    pub fn create(
        &self,
        client_id: Arc<str>,
        expiry_secs: u32,
    ) -> (Arc<Session>, Option<Arc<Session>>) {
        let id = SessionId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let session = Arc::new(Session::new(id, client_id.clone(), expiry_secs));
        let old = self.lock().insert(client_id, session.clone());
        (session, old)
    }

    /// Inserts a session built by `make` from a fresh id (recovery at start).
    pub fn restore<F>(&self, client_id: Arc<str>, make: F) -> Arc<Session>
    where
        F: FnOnce(SessionId, Arc<str>) -> Session,
    {
        let id = SessionId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let session = Arc::new(make(id, client_id.clone()));
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

    pub fn connected_count(&self) -> usize {
        self.lock().values().filter(|s| s.is_connected()).count()
    }

    /// Tells every attached connection to go; returns how many were told.
    pub fn kick_all(&self, why: Kick) -> usize {
        let sessions: Vec<Arc<Session>> = self.lock().values().cloned().collect();
        sessions.iter().filter(|s| s.kick(why)).count()
    }

    /// Total queued messages over all sessions (for $SYS; not on a hot path).
    pub fn queued_count(&self) -> usize {
        let sessions: Vec<Arc<Session>> = self.lock().values().cloned().collect();
        sessions.iter().map(|s| s.queue_len()).sum()
    }
}
