//! Packets from the client.

use std::sync::Arc;

use petrel_storage::{keys, Cf};
use std::time::{Duration, Instant};

use super::conn::{Conn, Exit, MATCHES};
use super::error::ConnError;
use crate::auth::SubscribeDecision;
use crate::codec::{
    AckProperties, Disconnect, MqttStr, Packet, PubResp, Publish, QoS, ReasonCode, RetainHandling,
    SubAck, Subscribe, UnsubAck, Unsubscribe,
};
use crate::config::PublishRatePolicy;
use crate::control::ReplicaSubscription;
use crate::limit;
use crate::message::Message;
use crate::persist::{self, value};
use crate::router::{topic, AclStamp};
use crate::session::{Delivery, Stage, StoredSubscription, SubIds};

impl Conn {
    /// Handles one packet; `Some(exit)` ends the connection normally.
    pub(super) fn handle(&mut self, p: Packet) -> Result<Option<Exit>, ConnError> {
        match p {
            Packet::Publish(p) => self.on_publish(p)?,
            Packet::PubAck(r) => {
                if let Some(f) = self.state.take_inflight(r.packet_id, Stage::Published) {
                    if f.delivery.qos != QoS::AtLeastOnce {
                        return Err(ConnError::Protocol("PUBACK for a QoS 2 message"));
                    }
                    self.forget_stored(f.delivery.seq);
                    self.queue_pending = true;
                }
            }
            Packet::PubRec(r) => self.on_pubrec(r),
            Packet::PubComp(r) => {
                if let Some(f) = self.state.take_inflight(r.packet_id, Stage::Released) {
                    self.forget_stored(f.delivery.seq);
                    self.queue_pending = true;
                }
            }
            Packet::PubRel(r) => {
                let rc = if self.state.inbound_qos2.remove(&r.packet_id.get()) {
                    if self.session.is_persistent() {
                        let key = keys::inbound_key(&self.client_id, r.packet_id.get());
                        self.broker.store.append(|w| w.delete(Cf::Inbound, &key));
                    }
                    ReasonCode::SUCCESS
                } else {
                    ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
                };
                self.send(&Packet::PubComp(PubResp::new(r.packet_id, rc)));
            }
            Packet::Subscribe(s) => self.on_subscribe(s)?,
            Packet::Unsubscribe(u) => self.on_unsubscribe(u),
            Packet::PingReq => self.send(&Packet::PingResp),
            Packet::Disconnect(d) => return self.on_disconnect(d).map(Some),
            Packet::Connect(_) => return Err(ConnError::SecondConnect),
            Packet::Auth(_) => {
                return Err(ConnError::Protocol("AUTH without an authentication method"))
            }
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                return Err(ConnError::Protocol(
                    "server-to-client packet sent by a client",
                ));
            }
        }
        Ok(None)
    }

    fn ack(&mut self, p: &Publish, rc: ReasonCode, why: Option<&'static str>) {
        let Some(id) = p.packet_id else { return };
        let mut resp = PubResp::new(id, rc);
        if self.problem_info && self.v5() {
            resp.properties.reason_string = why.map(MqttStr::from_static);
        }
        // Behind any acknowledgement still waiting for the store: acknowledgements keep the
        // order of the PUBLISHes they answer.
        match p.qos {
            QoS::AtLeastOnce => self.send_after(None, Packet::PubAck(resp)),
            QoS::ExactlyOnce => self.send_after(None, Packet::PubRec(resp)),
            QoS::AtMostOnce => {}
        }
    }

    fn on_publish(&mut self, mut p: Publish) -> Result<(), ConnError> {
        let cfg = &self.broker.cfg;
        self.broker
            .metrics
            .messages_received
            .inc(p.qos as u8, p.payload.len());
        if let Some(rate) = &mut self.rate {
            // Under the throttle policy the read loop waited for this token already.
            if !rate.bucket.try_take(Instant::now())
                && cfg.limits.publish_rate_policy == PublishRatePolicy::Disconnect
            {
                self.broker.metrics.limit_hit("publish_rate");
                return Err(ConnError::MessageRateTooHigh);
            }
        }
        if let Some(alias) = p.properties.topic_alias {
            if alias == 0 || alias > cfg.mqtt.topic_alias_maximum {
                return Err(ConnError::TopicAliasInvalid);
            }
            if p.topic.is_empty() {
                p.topic = self
                    .aliases
                    .get_or_insert_with(Box::default)
                    .inbound
                    .get(&alias)
                    .cloned()
                    .ok_or(ConnError::Protocol("unknown topic alias"))?;
            } else {
                self.aliases
                    .get_or_insert_with(Box::default)
                    .inbound
                    .insert(alias, p.topic.clone());
            }
        }
        if !p.properties.subscription_identifiers.is_empty() {
            return Err(ConnError::Protocol(
                "subscription identifier in a client's PUBLISH",
            ));
        }
        if p.qos as u8 > cfg.mqtt.max_qos {
            return Err(ConnError::QosNotSupported);
        }
        if p.retain && !cfg.mqtt.retain_available {
            return Err(ConnError::RetainNotSupported);
        }
        if let Some(limit) = limit::topic_over_limit(&p.topic, &cfg.limits) {
            self.broker.metrics.limit_hit(limit);
            if self.v5() && p.qos != QoS::AtMostOnce {
                // v5 can refuse one message and keep the connection.
                self.ack(&p, ReasonCode::TOPIC_NAME_INVALID, Some(limit));
                return Ok(());
            }
            return Err(ConnError::TopicNameInvalid);
        }
        if p.properties.payload_format_indicator == Some(1)
            && std::str::from_utf8(&p.payload).is_err()
        {
            if p.qos == QoS::AtMostOnce {
                return Err(ConnError::PayloadFormatInvalid);
            }
            self.ack(
                &p,
                ReasonCode::PAYLOAD_FORMAT_INVALID,
                Some("payload is not valid UTF-8"),
            );
            return Ok(());
        }
        if p.topic.starts_with("$SYS") {
            // Clients may not write the broker's own topics; v3 has no way to say so.
            let rc = if self.v5() {
                ReasonCode::NOT_AUTHORIZED
            } else {
                ReasonCode::SUCCESS
            };
            self.ack(&p, rc, Some("$SYS topics are published by the broker only"));
            return Ok(());
        }
        if !self.broker.auth.may_publish(&self.acl_ctx(), &p.topic) {
            self.broker
                .metrics
                .acl_denied
                .with_label_values(&["publish"])
                .inc();
            tracing::debug!(client_id = %self.client_id, topic = %p.topic, "publish denied by the ACL");
            // v5 says why; 3.x has no negative acknowledgement, so the message is dropped.
            let rc = if self.v5() {
                ReasonCode::NOT_AUTHORIZED
            } else {
                ReasonCode::SUCCESS
            };
            self.ack(&p, rc, Some("not authorized"));
            return Ok(());
        }
        if p.retain && !self.broker.control.has_quorum() {
            // The change cannot reach the cluster now (no leader, or cut off from the
            // quorum): v5 is told, 3.x (and QoS 0) gets the message delivered, not retained.
            self.broker.metrics.retained_refused.inc();
            if self.v5() && p.qos != QoS::AtMostOnce {
                self.ack(
                    &p,
                    ReasonCode::UNSPECIFIED_ERROR,
                    Some("no quorum: retained messages cannot change now"),
                );
                return Ok(());
            }
            p.retain = false;
        }
        if p.retain {
            if let Some(limit) = self.broker.retained_over_limit_of(&p.topic, &p.payload) {
                if self.v5() && p.qos != QoS::AtMostOnce {
                    // Refused whole: the publisher learns nothing happened.
                    self.ack(&p, ReasonCode::QUOTA_EXCEEDED, Some(limit));
                    return Ok(());
                }
                // 3.x (and QoS 0) cannot be told: delivered, not retained.
                p.retain = false;
            }
        }
        if p.qos == QoS::ExactlyOnce {
            let id = p.packet_id.expect("qos 2 has a packet id").get();
            if self.state.inbound_qos2.contains(&id) {
                // A retransmission: already routed once, so only acknowledge it again.
                self.ack(&p, ReasonCode::SUCCESS, None);
                return Ok(());
            }
            if self.inbound_unacked() >= cfg.mqtt.receive_maximum as usize {
                return Err(ConnError::ReceiveMaximumExceeded);
            }
            self.state.inbound_qos2.insert(id);
        } else if p.qos == QoS::AtLeastOnce
            && self.inbound_unacked() >= cfg.mqtt.receive_maximum as usize
        {
            // Only a v5 client gets here (`must_wait_for_acks` holds 3.x ones back).
            return Err(ConnError::ReceiveMaximumExceeded);
        }
        let packet_id = p.packet_id;
        let qos = p.qos;
        let inbound = match packet_id {
            Some(id) if qos == QoS::ExactlyOnce && self.session.is_persistent() => {
                Some((&*self.client_id, id.get()))
            }
            _ => None,
        };
        let mut msg = Message::from_publish(p, self.session.id(), Instant::now);
        if crate::message::sample_latency() {
            msg.received = crate::message::Stamp::at(Instant::now());
        }
        let msg = Arc::new(msg);
        let mut matches = MATCHES.take();
        let routed = self.broker.publish(msg, &mut matches, inbound);
        // Emptied now rather than at the next publish: no session is kept alive by it.
        matches.clear();
        MATCHES.set(matches);
        let (n, ticket, mark, fwd) = (
            routed.delivered,
            routed.ticket,
            routed.mark,
            routed.forwarded,
        );
        if let Some(session) = routed.congested {
            // Stop reading until that subscriber catches up (or the wait runs out).
            let wait = Duration::from_millis(cfg.mqtt.backpressure_max_wait_ms);
            self.backpressure = Some((session, Instant::now() + wait));
        }
        if let Some(id) = packet_id {
            let rc = if routed.unstorable && self.v5() {
                // Refused: a PUBREC with an error ends the QoS 2 exchange. 3.x has no
                // negative acknowledgement, so there it is acknowledged and dropped (counted),
                // as an ACL denial is.
                self.state.inbound_qos2.remove(&id.get());
                ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR
            } else if n == 0 && self.v5() {
                ReasonCode::NO_MATCHING_SUBSCRIBERS
            } else {
                ReasonCode::SUCCESS
            };
            let mut resp = PubResp::new(id, rc);
            if rc.is_error() && self.problem_info {
                resp.properties.reason_string =
                    Some(MqttStr::from_static("message too large to store"));
            }
            let ack = if qos == QoS::AtLeastOnce {
                Packet::PubAck(resp)
            } else {
                Packet::PubRec(resp)
            };
            self.send_after_all(ticket, mark, fwd, ack);
        }
        Ok(())
    }

    fn on_pubrec(&mut self, r: PubResp) {
        let pos = self.state.inflight.iter().position(|f| {
            f.packet_id == r.packet_id
                && f.stage == Stage::Published
                && f.delivery.qos == QoS::ExactlyOnce
        });
        let Some(pos) = pos else {
            self.send(&Packet::PubRel(PubResp::new(
                r.packet_id,
                ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
            )));
            return;
        };
        if r.reason_code.is_error() {
            // The receiver refused it: the exchange ends here.
            if let Some(f) = self.state.remove_inflight(pos) {
                self.forget_stored(f.delivery.seq);
            }
            self.queue_pending = true;
            return;
        }
        let f = &mut self.state.inflight[pos];
        f.stage = Stage::Released;
        if f.delivery.seq != 0 {
            let (client_id, f) = (&self.client_id, &*f);
            self.broker.store.append(|w| {
                persist::put_inflight(
                    w,
                    client_id,
                    &f.delivery,
                    f.packet_id.get(),
                    Stage::Released,
                )
            });
        }
        self.send(&Packet::PubRel(PubResp::new(
            r.packet_id,
            ReasonCode::SUCCESS,
        )));
    }

    fn on_subscribe(&mut self, s: Subscribe) -> Result<(), ConnError> {
        let v5 = self.v5();
        let max_qos = QoS::from_u8(self.broker.cfg.mqtt.max_qos).unwrap_or(QoS::ExactlyOnce);
        let limits = &self.broker.cfg.limits;
        let max_levels = limits.max_topic_levels;
        let max_subs = limits.max_subscriptions_per_client;
        let sub_id = s.properties.subscription_identifier;
        let now = Instant::now();
        // 3.x has one failure code for every refusal.
        let refused = |rc| {
            if v5 {
                rc
            } else {
                ReasonCode::UNSPECIFIED_ERROR
            }
        };
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut retained = Vec::new();
        // A persistent session's SUBACK waits until its subscriptions are in the WAL.
        let mut durable = None;
        for (raw, asked) in &s.filters {
            let parsed = match topic::parse_filter(raw, max_levels) {
                Ok(parsed) if raw.len() <= limits.max_topic_length_bytes => parsed,
                too_big => {
                    if too_big.is_ok() || topic::depth(raw) > max_levels {
                        let limit = if too_big.is_ok() {
                            "max_topic_length_bytes"
                        } else {
                            "max_topic_levels"
                        };
                        self.broker.metrics.limit_hit(limit);
                    }
                    codes.push(refused(ReasonCode::TOPIC_FILTER_INVALID));
                    continue;
                }
            };
            if max_subs > 0
                && self.state.subscriptions.len() >= max_subs
                && !self.state.subscriptions.contains_key(raw)
            {
                self.broker
                    .metrics
                    .limit_hit("max_subscriptions_per_client");
                codes.push(refused(ReasonCode::QUOTA_EXCEEDED));
                continue;
            }
            if v5 && parsed.group.is_some() && asked.no_local {
                return Err(ConnError::Protocol("no local on a shared subscription"));
            }
            // Read before deciding: a reload in between makes this decision stale, not fresh.
            let acl_gen = self.broker.auth.acl_generation();
            let acl_filtered = match self
                .broker
                .auth
                .may_subscribe(&self.acl_ctx(), parsed.filter)
            {
                SubscribeDecision::Allow => false,
                SubscribeDecision::AllowFiltered => true,
                SubscribeDecision::Deny => {
                    self.broker
                        .metrics
                        .acl_denied
                        .with_label_values(&["subscribe"])
                        .inc();
                    codes.push(refused(ReasonCode::NOT_AUTHORIZED));
                    continue;
                }
            };
            if !self.broker.has_route(&parsed) && !self.broker.control.has_quorum() {
                // A new route cannot be made known to the cluster now (no leader, or cut
                // off from the quorum): refused rather than granted on this node only.
                self.broker.metrics.subscribes_refused.inc();
                codes.push(ReasonCode::UNSPECIFIED_ERROR);
                continue;
            }
            let mut options = *asked;
            options.qos = asked.qos.min(max_qos);
            let acl = AclStamp {
                filtered: acl_filtered,
                generation: acl_gen,
            };
            let existed = self
                .broker
                .subscribe(&self.session, &parsed, options, sub_id, acl);
            self.state.subscriptions.insert(
                raw.clone(),
                StoredSubscription {
                    options,
                    subscription_id: sub_id,
                },
            );
            self.session.show_subscribed(raw, options);
            if self.session.is_persistent() {
                // Replicated, so that another node can resume the session.
                self.broker.control.subscription_put(
                    &self.client_id,
                    self.session.epoch(),
                    ReplicaSubscription {
                        filter: raw.to_string(),
                        options: value::options_byte(&options),
                        subscription_id: sub_id.unwrap_or(0),
                        acl_filtered,
                    },
                );
                let (key, value) = (
                    keys::subscription_key(&self.client_id, raw),
                    value::subscription(&options, sub_id),
                );
                let t = self
                    .broker
                    .store
                    .append(|w| w.put(Cf::Subscriptions, &key, &value));
                durable = durable.max(Some(t));
            }
            codes.push(ReasonCode(options.qos as u8));
            let send_retained = match options.retain_handling {
                RetainHandling::SendAtSubscribe => true,
                RetainHandling::SendIfNew => !existed,
                RetainHandling::DoNotSend => false,
            };
            if parsed.group.is_none() && send_retained {
                for msg in self.broker.retained_matching(parsed.filter, now) {
                    let qos = msg.qos.min(options.qos);
                    let mut ids = SubIds::None;
                    ids.extend(sub_id);
                    retained.push(Delivery {
                        msg,
                        qos,
                        retain: true,
                        subscription_ids: ids,
                        seq: 0,
                        acl_check: acl_filtered,
                        acl_gen: acl_gen as u32,
                        shared: false,
                    });
                }
            }
        }
        let properties = AckProperties::default();
        // Granted ones are known cluster-wide once every live member has applied the route
        // changes queued so far (this node's, or an earlier subscriber's still in flight).
        let mark = match codes.iter().any(|c| !c.is_error()) {
            true => self.broker.control.barrier(),
            false => 0,
        };
        let suback = Packet::SubAck(SubAck {
            packet_id: s.packet_id,
            properties,
            reason_codes: codes,
        });
        self.send_after_mark(durable, mark, suback);
        // Paced by the in-flight window ahead of the queue (`Conn::pump`), not pushed through
        // the bounded queue.
        self.state.retained_backlog.extend(retained);
        self.queue_pending = true;
        Ok(())
    }

    fn on_unsubscribe(&mut self, u: Unsubscribe) {
        let max_levels = usize::MAX;
        let mut codes = Vec::with_capacity(u.filters.len());
        // Like SUBACK: after the store has the change, and never ahead of an earlier answer.
        let mut durable = None;
        for raw in &u.filters {
            let rc = match topic::parse_filter(raw, max_levels) {
                Ok(parsed) => {
                    let had = self.state.subscriptions.remove(raw).is_some();
                    if had {
                        self.session.show_unsubscribed(raw);
                    }
                    if had && self.session.is_persistent() {
                        self.broker.control.subscription_del(
                            &self.client_id,
                            self.session.epoch(),
                            raw,
                        );
                        let key = keys::subscription_key(&self.client_id, raw);
                        let t = self
                            .broker
                            .store
                            .append(|w| w.delete(Cf::Subscriptions, &key));
                        durable = durable.max(Some(t));
                    }
                    if self.broker.unsubscribe(self.session.id(), &parsed) {
                        ReasonCode::SUCCESS
                    } else {
                        ReasonCode::NO_SUBSCRIPTION_EXISTED
                    }
                }
                Err(_) => ReasonCode::TOPIC_FILTER_INVALID,
            };
            codes.push(rc);
        }
        let properties = AckProperties::default();
        // Like SUBACK: nothing is forwarded here from publishes that start after UNSUBACK.
        let mark = self.broker.control.barrier();
        let unsuback = Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            properties,
            reason_codes: codes,
        });
        self.send_after_mark(durable, mark, unsuback);
    }

    fn on_disconnect(&mut self, d: Disconnect) -> Result<Exit, ConnError> {
        if let Some(secs) = d.properties.session_expiry_interval {
            if self.expiry == 0 && secs != 0 {
                return Err(ConnError::Protocol(
                    "session expiry set on DISCONNECT after 0 on CONNECT",
                ));
            }
            self.expiry = secs.min(self.broker.cfg.mqtt.session_expiry_max_secs);
        }
        Ok(Exit::Disconnect {
            with_will: d.reason_code == ReasonCode::DISCONNECT_WITH_WILL,
        })
    }
}
