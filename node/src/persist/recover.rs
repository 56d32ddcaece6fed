//! Rebuilding the node's state from the store at start.
//!
//! Sessions come back offline: their subscriptions go into the trie, their queues and
//! in-flight QoS 2 state are parked, and their expiry counts from when they went offline (or
//! from now, if they were connected when the node stopped). Keys of clients without a session
//! record are leftovers of an interrupted write and are deleted.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use petrel_storage::{keys, Cf, Store};

use super::value::{self, Clock, StoredWill};
use crate::broker::Broker;
use crate::codec::MqttStr;
use crate::router::{topic, AclStamp};
use crate::session::{Delivery, Inflight, Session, SessionState, Stage, StoredSubscription};

/// What was found, for the start-up log line.
#[derive(Debug, Default)]
pub struct Recovered {
    pub sessions: usize,
    pub subscriptions: usize,
    pub queued: usize,
    pub retained: usize,
    pub wills: usize,
    /// Wills of clients that were connected when the node died, published or scheduled now.
    pub wills_of_crash: usize,
    pub expired: usize,
    pub orphans: usize,
}

struct Pending {
    expiry: u32,
    disconnected_ms: u64,
    epoch: u64,
    state: Box<SessionState>,
    queue: Vec<(u64, Delivery)>,
}

/// Loads everything from `store` into `broker`.
pub fn recover(broker: &Broker, store: &Store) -> Result<Recovered, petrel_storage::Error> {
    let clock = Clock::now();
    let mut r = Recovered::default();
    let mut sessions: HashMap<String, Pending> = HashMap::new();
    for row in store.scan(Cf::Sessions) {
        let (k, v) = row?;
        let (Ok(client_id), Some((expiry, disconnected_ms, epoch))) =
            (std::str::from_utf8(&k), value::parse_session(&v))
        else {
            r.orphans += 1;
            continue;
        };
        let pending = Pending {
            expiry,
            disconnected_ms,
            epoch,
            state: Box::default(),
            queue: Vec::new(),
        };
        sessions.insert(client_id.to_owned(), pending);
    }
    let mut orphans: Vec<String> = Vec::new();
    for row in store.scan(Cf::Subscriptions) {
        let (k, v) = row?;
        let Some((client, rest)) = keys::split_client_key(&k) else {
            continue;
        };
        let (Some(p), Ok(filter), Some((options, id))) = (
            sessions.get_mut(client),
            MqttStr::from_bytes(bytes::Bytes::copy_from_slice(rest)),
            value::parse_subscription(&v),
        ) else {
            orphans.push(client.to_owned());
            continue;
        };
        p.state.subscriptions.insert(
            filter,
            StoredSubscription {
                options,
                subscription_id: id,
            },
        );
    }
    let mut inflight: HashMap<(String, u64), (crate::codec::PacketId, Stage)> = HashMap::new();
    for row in store.scan(Cf::Inflight) {
        let (k, v) = row?;
        let Some((client, rest)) = keys::split_client_key(&k) else {
            continue;
        };
        if let (Ok(seq), Some(f)) = (<[u8; 8]>::try_from(rest), value::parse_inflight(&v)) {
            inflight.insert((client.to_owned(), u64::from_be_bytes(seq)), f);
        }
    }
    for row in store.scan(Cf::Queue) {
        let (k, v) = row?;
        let Some((client, rest)) = keys::split_client_key(&k) else {
            continue;
        };
        let (Some(p), Ok(seq), Some(mut d)) = (
            sessions.get_mut(client),
            <[u8; 8]>::try_from(rest),
            value::delivery(&v, &clock),
        ) else {
            orphans.push(client.to_owned());
            continue;
        };
        d.seq = u64::from_be_bytes(seq);
        p.queue.push((d.seq, d));
    }
    for row in store.scan(Cf::Inbound) {
        let (k, _) = row?;
        let Some((client, rest)) = keys::split_client_key(&k) else {
            continue;
        };
        match (sessions.get_mut(client), <[u8; 2]>::try_from(rest)) {
            (Some(p), Ok(id)) => {
                p.state.inbound_qos2.insert(u16::from_be_bytes(id));
            }
            _ => orphans.push(client.to_owned()),
        }
    }
    orphans.sort();
    orphans.dedup();
    r.orphans += orphans.len();
    store.append(|w| {
        for client in &orphans {
            w.delete_client(client);
        }
    });

    // Stored filters were valid when stored; a lowered depth limit does not drop them.
    let max_levels = usize::MAX;
    for (client_id, mut p) in sessions {
        let offline_since = if p.disconnected_ms == 0 {
            clock.now
        } else {
            clock.to_instant(p.disconnected_ms)
        };
        let expires_at =
            (p.expiry != u32::MAX).then(|| offline_since + Duration::from_secs(p.expiry as u64));
        let client_id: Arc<str> = client_id.into();
        p.queue.sort_by_key(|(seq, _)| *seq);
        let next_seq = p.queue.last().map_or(1, |(seq, _)| seq + 1);
        let mut queue = VecDeque::with_capacity(p.queue.len());
        for (seq, d) in p.queue {
            match inflight.get(&(client_id.to_string(), seq)) {
                Some(&(packet_id, stage)) => p.state.push_inflight(Inflight {
                    packet_id,
                    delivery: d,
                    stage,
                }),
                None => queue.push_back(d),
            }
        }
        // Packet ids continue after the highest one still in flight.
        if let Some(max) = p.state.inflight.iter().map(|f| f.packet_id).max() {
            p.state.next_packet_id = max.next();
        }
        r.sessions += 1;
        r.subscriptions += p.state.subscriptions.len();
        r.queued += queue.len() + p.state.inflight.len();
        let filters: Vec<_> = p
            .state
            .subscriptions
            .iter()
            .map(|(f, s)| (f.clone(), *s))
            .collect();
        let session = broker.sessions.restore(client_id, |id, client_id| {
            Session::restore(id, client_id, p.expiry, p.state, queue, next_seq)
        });
        session.set_epoch(crate::session::Epoch(p.epoch));
        broker.metrics.sessions.inc();
        for (filter, sub) in filters {
            if let Ok(parsed) = topic::parse_filter(&filter, max_levels) {
                // The ACL may have changed while the node was down, and the next connection
                // may be another user's: every message is checked at delivery.
                broker.subscribe(
                    &session,
                    &parsed,
                    sub.options,
                    sub.subscription_id,
                    AclStamp::UNDECIDED,
                );
            }
        }
        session.set_offline_until(expires_at);
        match expires_at {
            Some(at) if at <= Instant::now() => {
                r.expired += 1;
                broker.metrics.sessions_expired.inc();
                let (state, _) = session.end();
                broker.end_session(&session, state);
            }
            Some(at) => broker.schedule_session_expiry(&session, at),
            None => {}
        }
    }

    // Retained messages are replicated state: the cluster's snapshot and log bring them
    // back (the `retained` column family of older versions is no longer read).
    r.retained = broker.retained_count();
    for row in store.scan(Cf::Wills) {
        let (k, v) = row?;
        let (Ok(client_id), Some(will)) = (
            std::str::from_utf8(&k),
            value::parse_stored_will(&v, &clock),
        ) else {
            continue;
        };
        let client_id: Arc<str> = client_id.into();
        let session = broker.sessions.get(&client_id);
        let session_id = session
            .as_ref()
            .map(|s| s.id())
            .unwrap_or(crate::session::SessionId::BROKER);
        match will {
            StoredWill::Pending { msg, due } => {
                // Its client gets the grace from this start to connect again (a drained
                // client's will was delayed for that; a restart must not cut it short).
                let grace = Duration::from_millis(broker.cfg.cluster.will_grace_ms);
                let due = due.max(clock.now + grace);
                broker.restore_will(client_id, session_id, msg, due)
            }
            StoredWill::Armed {
                msg,
                delay_secs,
                epoch,
            } => {
                // The client was connected when the node died: its connection is gone, so
                // the will is due now, or after its delay (capped by the session expiry; a
                // session that was not stored ended with the node), counted from the restart.
                let delay = session.map_or(0, |s| delay_secs.min(s.expiry_secs()));
                r.wills_of_crash += 1;
                broker.schedule_will(
                    &client_id,
                    session_id,
                    crate::broker::WillOf::Crash(epoch.map(crate::session::Epoch)),
                    msg,
                    Duration::from_secs(u64::from(delay)),
                );
            }
        }
        r.wills += 1;
    }
    Ok(r)
}
