//! The node's shared broker state and the publish path.
//!
//! ```text
//!  connection task                    Broker::publish
//!  PUBLISH ──decode──> Message ──Arc──>  retained store (if retain)
//!                                        trie.collect(topic) -> matches (reused Vec)
//!                                        drop No Local, merge overlaps per session
//!                                        Session::enqueue ──notify──> subscriber's task
//!                                                                      drains, encodes, writes
//! ```
//! Locks are sync and never held across `.await`: the trie and retained store are
//! `RwLock`s, each session queue a `Mutex` held for a push or a drain.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use petrel_storage::{keys, Cf, Store, Ticket, Txn};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::auth::AuthGate;
use crate::codec::{QoS, SubscriptionOptions};
use crate::config::Config;
use crate::message::Message;
use crate::metrics::Metrics;
use crate::persist::value::{self, Clock};
use crate::router::{Match, ParsedFilter, RetainedStore, Subscriber, SubscriptionTrie};
use crate::session::{
    Delivery, DropReason, Enqueued, QueueLimits, Session, SessionId, SessionRegistry, SessionState,
    SubIds,
};

/// What [`Broker::publish`] did with a message.
pub struct Routed {
    /// Sessions that got a copy.
    pub delivered: usize,
    /// Every stored copy is durable once the store has passed this ticket.
    pub ticket: Option<Ticket>,
    /// A connected session whose queue is long: the publisher should wait for it.
    pub congested: Option<Arc<Session>>,
    /// The message was refused, with nothing routed, retained or written: a stored copy would
    /// pass the MQTT size limit (see `value::message_fits`).
    pub unstorable: bool,
}

pub struct Broker {
    pub cfg: Config,
    pub metrics: Metrics,
    pub sessions: SessionRegistry,
    pub limits: QueueLimits,
    pub started: Instant,
    pub store: Store,
    pub auth: AuthGate,
    router: RwLock<SubscriptionTrie>,
    retained: RwLock<RetainedStore>,
    timers: Timers,
    pending_wills: Mutex<HashMap<Arc<str>, PendingWill>>,
    next_conn_id: AtomicU64,
}

struct PendingWill {
    session: SessionId,
    msg: Message,
}

#[derive(Clone, Debug)]
enum TimerEvent {
    Will(Arc<str>, SessionId),
    SessionExpiry(Arc<str>, SessionId),
}

#[derive(Default)]
struct Timers {
    queue: Mutex<BTreeMap<(Instant, u64), TimerEvent>>,
    seq: AtomicU64,
    wake: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Broker {
    pub fn new(cfg: Config, metrics: Metrics, auth: AuthGate, store: Store) -> Broker {
        let limits = QueueLimits {
            max_messages: cfg.mqtt.max_queued_messages,
            max_bytes: cfg.mqtt.max_queued_bytes,
            overflow: cfg.mqtt.queue_overflow,
            qos0_offline: cfg.mqtt.queue_qos0_offline,
            congested_at: if cfg.mqtt.backpressure_max_wait_ms > 0 {
                QueueLimits::congestion_threshold(cfg.mqtt.max_queued_messages)
            } else {
                0
            },
        };
        Broker {
            cfg,
            metrics,
            sessions: SessionRegistry::default(),
            limits,
            started: Instant::now(),
            store,
            auth,
            router: RwLock::new(SubscriptionTrie::default()),
            retained: RwLock::new(RetainedStore::default()),
            timers: Timers::default(),
            pending_wills: Mutex::new(HashMap::new()),
            next_conn_id: AtomicU64::new(1),
        }
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Routes a message to every matching local session and stores it if retained.
    /// `scratch` is the caller's reusable match buffer. `inbound` names an inbound QoS 2
    /// packet id to record in the same atomic write as the stored copies (exactly once across
    /// a crash).
    pub fn publish(
        &self,
        msg: Arc<Message>,
        scratch: &mut Vec<Match>,
        inbound: Option<(&str, u16)>,
    ) -> Routed {
        scratch.clear();
        self.router
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .collect(&msg.topic, scratch);
        scratch.retain(|m| !(m.no_local && m.session.id() == msg.origin));
        if scratch.len() > 1 {
            scratch.sort_unstable_by_key(|m| (m.session.id(), m.shared));
        }
        let stored = msg.qos != QoS::AtMostOnce
            && scratch
                .iter()
                .any(|m| m.qos != QoS::AtMostOnce && m.session.is_persistent());
        if (stored || msg.retain) && !self.storable(&msg, scratch) {
            // Refused before the transaction opens: nothing half-written, nothing half-routed.
            scratch.clear();
            self.count_unstorable();
            tracing::debug!(topic = %msg.topic, "message too large to store; refused");
            return Routed {
                delivered: 0,
                ticket: None,
                congested: None,
                unstorable: true,
            };
        }
        // One atomic write for everything this publish stores; nothing is taken when the
        // message goes only to clean sessions.
        let mut txn = (stored || msg.retain || inbound.is_some()).then(|| self.store.begin());
        if let (Some(txn), Some((client_id, packet_id))) = (txn.as_mut(), inbound) {
            txn.writer()
                .put(Cf::Inbound, &keys::inbound_key(client_id, packet_id), &[]);
        }
        if msg.retain {
            self.set_retained(&msg, txn.as_mut().expect("taken for retained messages"));
        }
        // Read the wall clock only if something is stored.
        let mut clock = None;
        let mut delivered = 0;
        let mut congested = None;
        let mut i = 0;
        while i < scratch.len() {
            let first = &scratch[i];
            let mut qos = first.qos;
            let mut rap = first.retain_as_published;
            let mut acl_check = first.acl_filtered;
            let mut ids = SubIds::None;
            ids.extend(first.subscription_id);
            let mut j = i + 1;
            // Overlapping subscriptions of one session: one copy, highest QoS, every id.
            while !first.shared
                && j < scratch.len()
                && !scratch[j].shared
                && scratch[j].session.id() == first.session.id()
            {
                qos = qos.max(scratch[j].qos);
                rap |= scratch[j].retain_as_published;
                acl_check &= scratch[j].acl_filtered;
                ids.extend(scratch[j].subscription_id);
                j += 1;
            }
            let d = Delivery {
                msg: msg.clone(),
                qos: qos.min(msg.qos),
                retain: msg.retain && rap,
                subscription_ids: ids,
                seq: 0,
                acl_check,
            };
            let (queued, full) = self.enqueue_in(&first.session, d, txn.as_mut(), &mut clock);
            delivered += queued as usize;
            // The publisher's own session never makes it wait (it could not drain).
            if full && congested.is_none() && first.session.id() != msg.origin {
                congested = Some(first.session.clone());
            }
            i = j;
        }
        scratch.clear();
        Routed {
            delivered,
            ticket: txn.map(Txn::commit),
            congested,
            unstorable: false,
        }
    }

    /// Whether every copy of `msg` this publish would store can be encoded: the message at
    /// its own QoS with every subscription identifier of the persistent matches (more than
    /// any one session's copy carries).
    fn storable(&self, msg: &Message, matches: &[Match]) -> bool {
        let id_bytes = matches
            .iter()
            .filter(|m| m.session.is_persistent())
            .filter_map(|m| m.subscription_id)
            .map(value::sub_id_len)
            .sum();
        value::message_fits(msg, id_bytes)
    }

    fn set_retained(&self, msg: &Arc<Message>, txn: &mut Txn<'_>) {
        let encoded = match (!msg.payload.is_empty())
            .then(|| value::message(msg, msg.qos, true, &[], &Clock::now()))
            .transpose()
        {
            Ok(encoded) => encoded,
            Err(e) => {
                // `publish` checked this already; neither stored nor kept in memory.
                tracing::debug!(topic = %msg.topic, error = %e, "retained message not stored");
                return;
            }
        };
        let mut retained = self.retained.write().unwrap_or_else(|e| e.into_inner());
        retained.set(msg.clone());
        self.metrics.retained.set(retained.len() as i64);
        let mut w = txn.writer();
        match &encoded {
            Some(v) => w.put(Cf::Retained, msg.topic.as_bytes(), v),
            None => w.delete(Cf::Retained, msg.topic.as_bytes()),
        }
    }

    /// Queues one delivery (stored first for a persistent session), outside any publish.
    /// Returns whether it was queued and the store ticket.
    pub fn enqueue(&self, session: &Session, d: Delivery) -> (bool, Option<Ticket>) {
        let stored = session.is_persistent() && d.qos != QoS::AtMostOnce;
        let mut txn = stored.then(|| self.store.begin());
        let (queued, _) = self.enqueue_in(session, d, txn.as_mut(), &mut None);
        (queued, txn.map(Txn::commit))
    }

    /// Queues one delivery, counting what the overflow policy drops. Returns whether it was
    /// queued and whether the session is congested (its publishers should wait).
    fn enqueue_in(
        &self,
        session: &Session,
        d: Delivery,
        txn: Option<&mut Txn<'_>>,
        clock: &mut Option<Clock>,
    ) -> (bool, bool) {
        let stored = match txn {
            Some(txn) if session.is_persistent() && d.qos != QoS::AtMostOnce => {
                match value::message(
                    &d.msg,
                    d.qos,
                    d.retain,
                    d.subscription_ids.as_slice(),
                    clock.get_or_insert_with(Clock::now),
                ) {
                    Ok(v) => Some((txn, v)),
                    Err(e) => {
                        // A retained message plus this subscription's identifiers: this
                        // copy alone is dropped, and nothing of it was written.
                        tracing::debug!(client_id = %session.client_id(), error = %e, "message too large to store; dropped");
                        self.count_unstorable();
                        return (false, false);
                    }
                }
            }
            _ => None,
        };
        match session.enqueue(d, &self.limits, stored) {
            Enqueued::Queued {
                dropped,
                why,
                congested,
            } => {
                if dropped > 0 {
                    self.count_overflow(why, dropped as u64);
                }
                (true, congested)
            }
            Enqueued::Dropped(why) => {
                self.count_overflow(why, 1);
                (false, false)
            }
        }
    }

    /// Counts a message (or one copy of it) refused because its stored encoding would pass
    /// the MQTT size limit.
    fn count_unstorable(&self) {
        self.metrics
            .queue_dropped
            .with_label_values(&["too_large"])
            .inc();
    }

    /// Counts messages a session queue's overflow policy dropped.
    fn count_overflow(&self, why: DropReason, n: u64) {
        if let Some(limit) = why.limit_label() {
            self.metrics
                .queue_dropped
                .with_label_values(&["queue_full"])
                .inc_by(n);
            self.metrics
                .limit_hits
                .with_label_values(&[limit])
                .inc_by(n);
        }
    }

    /// Adds or replaces a subscription; returns whether it existed.
    pub fn subscribe(
        &self,
        session: &Arc<Session>,
        f: &ParsedFilter<'_>,
        options: SubscriptionOptions,
        id: Option<u32>,
        acl_filtered: bool,
    ) -> bool {
        let sub = Subscriber {
            session: session.clone(),
            options,
            subscription_id: id,
            acl_filtered,
        };
        let existed = self
            .router
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .subscribe(f.filter, f.group, sub);
        if !existed {
            self.metrics.subscriptions.inc();
        }
        existed
    }

    pub fn unsubscribe(&self, session: SessionId, f: &ParsedFilter<'_>) -> bool {
        let found = self
            .router
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .unsubscribe(f.filter, f.group, session);
        if found {
            self.metrics.subscriptions.dec();
        }
        found
    }

    /// Retained messages matching a (non-shared) filter, expired ones left out.
    pub fn retained_matching(&self, filter: &str, now: Instant) -> Vec<Arc<Message>> {
        let mut out = Vec::new();
        self.retained
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .collect(filter, &mut out);
        out.retain(|m| !m.is_expired(now));
        out
    }

    pub fn retained_count(&self) -> usize {
        self.retained
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Removes an ended session's subscriptions and registry entry and fires its pending will.
    pub fn end_session(&self, session: &Session, state: Option<Box<SessionState>>) {
        if let Some(state) = state {
            let max_levels = usize::MAX;
            for filter in state.subscriptions.keys() {
                if let Ok(parsed) = crate::router::topic::parse_filter(filter, max_levels) {
                    self.unsubscribe(session.id(), &parsed);
                }
            }
        }
        if self.sessions.remove(session) {
            self.metrics.sessions.dec();
        }
        self.fire_will(session.client_id(), session.id());
        if session.is_persistent() {
            let client_id = session.client_id();
            self.store.append(|w| w.delete_client(client_id));
        }
    }

    /// Publishes a will now, or after `delay` unless the client comes back first.
    pub fn schedule_will(
        &self,
        client_id: &Arc<str>,
        session: SessionId,
        msg: Message,
        delay: Duration,
    ) {
        if delay.is_zero() {
            self.publish_will(msg);
            return;
        }
        let due = Instant::now() + delay;
        let stored = value::will(&msg, due, &Clock::now());
        let mut wills = lock(&self.pending_wills);
        wills.insert(client_id.clone(), PendingWill { session, msg });
        match &stored {
            Ok(v) => {
                self.store
                    .append(|w| w.put(Cf::Wills, client_id.as_bytes(), v));
            }
            // Kept in memory only: it fires unless the node restarts first.
            Err(e) => tracing::warn!(%client_id, error = %e, "delayed will too large to store"),
        }
        drop(wills);
        self.timers
            .add(due, TimerEvent::Will(client_id.clone(), session));
    }

    /// Re-arms a will recovered from the store.
    pub fn restore_will(
        &self,
        client_id: Arc<str>,
        session: SessionId,
        msg: Message,
        due: Instant,
    ) {
        lock(&self.pending_wills).insert(client_id.clone(), PendingWill { session, msg });
        self.timers.add(due, TimerEvent::Will(client_id, session));
    }

    /// Drops a pending will of this session (its client reconnected in time).
    pub fn cancel_will(&self, client_id: &str, session: SessionId) {
        let mut wills = lock(&self.pending_wills);
        if wills.get(client_id).is_some_and(|w| w.session == session) {
            wills.remove(client_id);
            self.store
                .append(|w| w.delete(Cf::Wills, client_id.as_bytes()));
        }
    }

    fn fire_will(&self, client_id: &str, session: SessionId) {
        let will = {
            let mut wills = lock(&self.pending_wills);
            match wills.get(client_id) {
                Some(w) if w.session == session => {
                    self.store
                        .append(|w| w.delete(Cf::Wills, client_id.as_bytes()));
                    wills.remove(client_id)
                }
                _ => None,
            }
        };
        if let Some(w) = will {
            self.publish_will(w.msg);
        }
    }

    fn publish_will(&self, mut msg: Message) {
        // The expiry interval counts from publication, not from CONNECT.
        let now = Instant::now();
        msg.expires_at = msg
            .props
            .message_expiry_interval
            .map(|s| now + Duration::from_secs(s as u64));
        self.metrics.wills_published.inc();
        tracing::debug!(topic = %msg.topic, "publishing will");
        self.publish(Arc::new(msg), &mut Vec::new(), None);
    }

    /// Restores a retained message at start, without writing it back.
    pub fn restore_retained(&self, msg: Arc<Message>) {
        let mut retained = self.retained.write().unwrap_or_else(|e| e.into_inner());
        retained.set(msg);
        self.metrics.retained.set(retained.len() as i64);
    }

    pub fn schedule_session_expiry(&self, session: &Session, at: Instant) {
        self.timers.add(
            at,
            TimerEvent::SessionExpiry(session.client_id().clone(), session.id()),
        );
    }

    fn on_timer(&self, ev: TimerEvent, now: Instant) {
        match ev {
            TimerEvent::Will(client_id, session) => self.fire_will(&client_id, session),
            TimerEvent::SessionExpiry(client_id, id) => {
                let Some(session) = self.sessions.get(&client_id) else {
                    return;
                };
                if session.id() != id
                    || session.is_connected()
                    || session.expires_at().is_none_or(|t| t > now)
                {
                    return;
                }
                tracing::debug!(%client_id, "session expired");
                let (state, _) = session.end();
                self.end_session(&session, state);
            }
        }
    }

    /// Runs delayed wills and session expiry until cancelled.
    pub async fn run_timers(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            let wake = self.timers.wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            let now = Instant::now();
            let (due, next) = self.timers.take_due(now);
            for ev in due {
                self.on_timer(ev, now);
            }
            let sleep = match next {
                Some(t) => tokio::time::sleep_until(t.into()),
                None => tokio::time::sleep(Duration::from_secs(3600)),
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = &mut wake => {}
                _ = sleep => {}
            }
        }
    }
}

impl Timers {
    fn add(&self, at: Instant, ev: TimerEvent) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut q = lock(&self.queue);
        let earliest = q.keys().next().is_none_or(|(t, _)| at < *t);
        q.insert((at, seq), ev);
        drop(q);
        if earliest {
            self.wake.notify_one();
        }
    }

    fn take_due(&self, now: Instant) -> (Vec<TimerEvent>, Option<Instant>) {
        let mut q = lock(&self.queue);
        let mut due = Vec::new();
        while let Some(entry) = q.first_entry() {
            if entry.key().0 > now {
                break;
            }
            due.push(entry.remove());
        }
        (due, q.keys().next().map(|(t, _)| *t))
    }
}

#[cfg(test)]
#[path = "broker_test.rs"]
mod tests;
