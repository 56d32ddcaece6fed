//! Messages to the client: taking them off the session queue within the in-flight window,
//! encoding them (topic alias, remaining expiry, subscription ids) and redelivery.

use std::time::Instant;

use super::conn::{Conn, BATCH as BATCH_SCRATCH, HIGH_WATER, WRITE_RESERVE};
use crate::codec::{Packet, PubResp, PublishOut, QoS, ReasonCode};
use crate::persist;
use crate::session::{Delivery, Inflight, Stage};

/// Deliveries taken off the session queue per lock.
const BATCH: usize = 256;

impl Conn {
    /// Moves queued messages into the write buffer while the window and buffer allow.
    pub(super) fn pump(&mut self) {
        // Acks and sends both lead here: what the admin API shows of the window. One
        // relaxed store to a line only this connection writes.
        self.session
            .set_inflight(self.state.inflight.len(), self.state.inflight_bytes);
        if !self.state.retained_backlog.is_empty()
            && (self.pending_subacks > 0 || !self.pump_retained())
        {
            // Retained messages from a SUBSCRIBE go first, and never ahead of its SUBACK
            // (which may wait for the store or the cluster); the queue waits behind them
            // (order per session stays total). An ack or a write brings us back.
            return;
        }
        let mut batch = BATCH_SCRATCH.take();
        loop {
            let window = self.out_window.saturating_sub(self.state.inflight.len());
            let low = self.broker.limits.drained_below();
            self.session.drain(window, BATCH, &mut batch, low);
            // The write buffer is sized on the first message, not at connect: a connection
            // that never receives anything keeps only what its CONNACK needed. Once sized it
            // is kept (giving it back after each write cost latency in allocator traffic).
            if !batch.is_empty() && self.out.capacity() - self.out.len() < 1024 {
                self.out.reserve(WRITE_RESERVE);
            }
            let taken = batch.len();
            let now = Instant::now();
            for d in batch.drain(..) {
                self.deliver(d, now);
            }
            if taken < BATCH || self.out.len() >= HIGH_WATER {
                // Either the queue is empty, the window is full, or the socket must catch up;
                // the queue notification, an ack or a write wakes us for the rest.
                self.queue_pending = taken == BATCH;
                break;
            }
        }
        BATCH_SCRATCH.set(batch);
        self.session
            .set_inflight(self.state.inflight.len(), self.state.inflight_bytes);
    }

    /// Sends retained messages owed to a SUBSCRIBE while the window and the write buffer
    /// allow. Returns whether they are all out.
    fn pump_retained(&mut self) -> bool {
        let now = Instant::now();
        while let Some(front) = self.state.retained_backlog.front() {
            let window_full =
                front.qos != QoS::AtMostOnce && self.state.inflight.len() >= self.out_window;
            if window_full || self.out.len() >= HIGH_WATER {
                return false;
            }
            if self.out.capacity() - self.out.len() < 1024 {
                self.out.reserve(WRITE_RESERVE);
            }
            let d = self
                .state
                .retained_backlog
                .pop_front()
                .expect("front exists");
            self.deliver(d, now);
        }
        true
    }

    fn deliver(&mut self, d: Delivery, now: Instant) {
        let metrics = &self.broker.metrics;
        if d.msg.is_expired(now) {
            metrics.queue_dropped.with_label_values(&["expired"]).inc();
            self.forget_stored(d.seq);
            return;
        }
        let acl_moved = || d.acl_gen != self.broker.auth.acl_generation() as u32;
        if (d.acl_check || acl_moved())
            && !self.broker.auth.may_receive(&self.acl_ctx(), &d.msg.topic)
        {
            metrics.acl_denied.with_label_values(&["receive"]).inc();
            return;
        }
        let packet_id = (d.qos != QoS::AtMostOnce).then(|| self.state.alloc_packet_id());
        let mut topic: &str = &d.msg.topic;
        let mut alias = None;
        // A new alias is only known to the client once a PUBLISH carrying it is written.
        let mut new_alias = false;
        if self.out_alias_max > 0 {
            let max = self.out_alias_max;
            let aliases = &mut self.aliases.get_or_insert_with(Box::default).outbound;
            match aliases.get(&d.msg.topic) {
                Some(&a) => {
                    alias = Some(a);
                    topic = "";
                }
                None if (aliases.len() as u16) < max => {
                    alias = Some(aliases.len() as u16 + 1);
                    new_alias = true;
                }
                None => {}
            }
        }
        let out = PublishOut {
            dup: false,
            qos: d.qos,
            retain: d.retain,
            topic,
            packet_id,
            props: d.msg.props(),
            message_expiry_interval: d.msg.remaining_expiry(now),
            topic_alias: alias,
            subscription_identifiers: d.subscription_ids.as_slice(),
            payload: &d.msg.payload,
        };
        if out.encoded_len(self.protocol) > self.out_max_packet
            || out.encode(self.protocol, &mut self.out).is_err()
        {
            // The client could not accept it: discarded as if sent (MQTT 5, 3.1.2.25).
            metrics
                .queue_dropped
                .with_label_values(&["too_large"])
                .inc();
            self.forget_stored(d.seq);
            return;
        }
        if let (true, Some(a), Some(aliases)) = (new_alias, alias, &mut self.aliases) {
            aliases.outbound.insert(d.msg.topic.clone(), a);
        }
        metrics.messages_sent.inc(d.qos as u8, d.msg.payload.len());
        if let Some(took) = d.msg.received.elapsed(now) {
            metrics.delivery_latency.observe(took.as_secs_f64());
        }
        if let Some(packet_id) = packet_id {
            if d.qos == QoS::ExactlyOnce && d.seq != 0 {
                // The packet id must be durable before the client can see it, or a restart
                // would resend the message under another id and break exactly-once.
                let client_id = &self.client_id;
                let t = self.broker.store.append(|w| {
                    persist::put_inflight(w, client_id, &d, packet_id.get(), Stage::Published)
                });
                self.write_barrier = self.write_barrier.max(t);
            }
            self.state.push_inflight(Inflight {
                packet_id,
                delivery: d,
                stage: Stage::Published,
            });
        }
    }

    /// After a reconnect: unacknowledged PUBLISHes again with DUP, PUBRELs again. An entry
    /// too large for this connection's packet limit is dropped rather than kept forever.
    pub(super) fn resend_inflight(&mut self) {
        let now = Instant::now();
        let mut inflight = std::mem::take(&mut self.state.inflight);
        inflight.retain(|f| match f.stage {
            Stage::Published => {
                let out = redelivery(f, now);
                let fits = out.encoded_len(self.protocol) <= self.out_max_packet;
                if fits && out.encode(self.protocol, &mut self.out).is_ok() {
                    self.broker
                        .metrics
                        .messages_sent
                        .inc(f.delivery.qos as u8, f.delivery.msg.payload.len());
                    true
                } else {
                    self.broker
                        .metrics
                        .queue_dropped
                        .with_label_values(&["too_large"])
                        .inc();
                    if f.delivery.seq != 0 {
                        let client_id = &self.client_id;
                        self.broker
                            .store
                            .append(|w| persist::delete_queued(w, client_id, f.delivery.seq));
                    }
                    false
                }
            }
            Stage::Released => {
                let rel = Packet::PubRel(PubResp::new(f.packet_id, ReasonCode::SUCCESS));
                crate::codec::encode_packet(&rel, self.protocol, &mut self.out).is_ok()
            }
        });
        self.state.inflight = inflight;
        self.state.recount_inflight();
    }
}

fn redelivery(f: &Inflight, now: Instant) -> PublishOut<'_> {
    let d = &f.delivery;
    PublishOut {
        dup: true,
        qos: d.qos,
        retain: d.retain,
        topic: &d.msg.topic,
        packet_id: Some(f.packet_id),
        props: d.msg.props(),
        message_expiry_interval: d.msg.remaining_expiry(now),
        topic_alias: None,
        subscription_identifiers: d.subscription_ids.as_slice(),
        payload: &d.msg.payload,
    }
}

impl Conn {
    /// Deletes a stored delivery once it is acknowledged or dropped.
    pub(super) fn forget_stored(&self, seq: u64) {
        if seq != 0 && self.session.is_persistent() {
            let client_id = &self.client_id;
            self.broker
                .store
                .append(|w| persist::delete_queued(w, client_id, seq));
        }
    }
}
