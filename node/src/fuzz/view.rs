//! The client's view of one connection: it decodes everything the broker writes and checks it
//! against the protocol and against what the client sent.
//!
//! Checks that need to know every packet the client sent (acknowledgement order, the
//! in-flight window, SUBACK matching) stop once junk or a mutated packet was sent
//! (`followed` false), and the in-flight ones also once the client acknowledged an id the
//! view did not expect (the broker may have re-used it already).

use std::collections::{HashMap, VecDeque};

use bytes::{Bytes, BytesMut};

use crate::codec::{decode_packet, Connect, MqttStr, Packet, Protocol, PubResp, QoS, ReasonCode};

/// A request the broker must answer, in the order sent.
#[derive(Debug)]
enum Asked {
    Subscribe { id: u16, qos: Vec<QoS> },
    Unsubscribe { id: u16, n: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outbound {
    Qos1,
    Qos2Published,
    Qos2Released,
}

pub(super) struct View {
    slot: usize,
    /// None: the CONNECT was not one the view understands; nothing is checked.
    protocol: Option<Protocol>,
    clean_start: bool,
    rbuf: BytesMut,
    pub connack: Option<ReasonCode>,
    /// DISCONNECT or a refusing CONNACK came: nothing may follow.
    pub ended: bool,
    max_packet: usize,
    alias_max: u16,
    aliases: HashMap<u16, MqttStr>,
    /// Every byte sent was a whole packet the view saw.
    pub followed: bool,
    /// The in-flight window is known exactly.
    inflight_known: bool,
    asked: VecDeque<Asked>,
    /// QoS 1/2 PUBLISHes sent, waiting for PUBACK/PUBREC, in order.
    acks_due: VecDeque<(u16, QoS)>,
    pings: usize,
    window: usize,
    inflight: HashMap<u16, Outbound>,
    pub auto_ack: bool,
    /// PUBLISHes received: (topic, payload).
    pub delivered: Vec<(MqttStr, Bytes)>,
}

impl View {
    /// A view of a connection that opened with `connect` (None: with something else) on a
    /// broker whose outbound window is `max_inflight`.
    pub fn new(slot: usize, connect: Option<&Connect>, max_inflight: u16) -> View {
        let props = connect.map(|c| &c.properties);
        let v5 = connect.is_some_and(|c| c.protocol.is_v5());
        let receive_max = props.and_then(|p| p.receive_maximum).filter(|_| v5);
        View {
            slot,
            protocol: connect.map(|c| c.protocol),
            clean_start: connect.is_some_and(|c| c.clean_start),
            rbuf: BytesMut::new(),
            connack: None,
            ended: false,
            max_packet: props
                .and_then(|p| p.maximum_packet_size)
                .filter(|_| v5)
                .map_or(usize::MAX, |m| m as usize),
            alias_max: props
                .and_then(|p| p.topic_alias_maximum)
                .filter(|_| v5)
                .unwrap_or(0),
            aliases: HashMap::new(),
            followed: connect.is_some(),
            inflight_known: connect.is_some(),
            asked: VecDeque::new(),
            acks_due: VecDeque::new(),
            pings: 0,
            window: (receive_max.unwrap_or(u16::MAX).min(max_inflight) as usize).max(1),
            inflight: HashMap::new(),
            auto_ack: true,
            delivered: Vec::new(),
        }
    }

    pub fn protocol(&self) -> Option<Protocol> {
        self.protocol
    }

    pub fn connected(&self) -> bool {
        self.connack == Some(ReasonCode::SUCCESS) && !self.ended
    }

    /// Everything asked has been answered: SUBACKs, UNSUBACKs, PINGRESPs, PUBACKs and PUBRECs.
    pub fn answered(&self) -> bool {
        self.asked.is_empty() && self.acks_due.is_empty() && self.pings == 0
    }

    /// Says what remains unanswered.
    pub fn unanswered(&self) -> String {
        format!(
            "asked {:?}, acks due {:?}, pings {}",
            self.asked, self.acks_due, self.pings
        )
    }

    /// Bytes that were not a packet the view followed (junk, a mutated packet).
    pub fn lose_track(&mut self) {
        self.followed = false;
        self.inflight_known = false;
    }

    /// The client sends `p`.
    pub fn on_send(&mut self, p: &Packet) {
        match p {
            Packet::Subscribe(s) => self.asked.push_back(Asked::Subscribe {
                id: s.packet_id.get(),
                qos: s.filters.iter().map(|(_, o)| o.qos).collect(),
            }),
            Packet::Unsubscribe(u) => self.asked.push_back(Asked::Unsubscribe {
                id: u.packet_id.get(),
                n: u.filters.len(),
            }),
            Packet::PingReq => self.pings += 1,
            Packet::Publish(p) => {
                if let Some(id) = p.packet_id {
                    self.acks_due.push_back((id.get(), p.qos));
                }
            }
            Packet::PubAck(r) => self.ack(r, Outbound::Qos1, None),
            Packet::PubRec(r) if r.reason_code.is_error() => {
                self.ack(r, Outbound::Qos2Published, None)
            }
            Packet::PubRec(r) => self.ack(r, Outbound::Qos2Published, Some(Outbound::Qos2Released)),
            Packet::PubComp(r) => self.ack(r, Outbound::Qos2Released, None),
            _ => {}
        }
    }

    /// An acknowledgement of a delivery in stage `from`, moving it to `to` (None: done).
    fn ack(&mut self, r: &PubResp, from: Outbound, to: Option<Outbound>) {
        let id = r.packet_id.get();
        if self.inflight.get(&id) != Some(&from) {
            self.inflight_known = false;
            return;
        }
        match to {
            Some(stage) => self.inflight.insert(id, stage),
            None => self.inflight.remove(&id),
        };
    }

    #[track_caller]
    fn fail(&self, what: &str, p: &Packet) -> ! {
        panic!(
            "slot {} ({:?}): {what}: {p:?}",
            self.slot,
            self.protocol.map(|p| p.to_string())
        );
    }

    /// Takes bytes the broker wrote; returns the acknowledgements the client sends back.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Packet> {
        let mut acks = Vec::new();
        let Some(protocol) = self.protocol else {
            return acks;
        };
        self.rbuf.extend_from_slice(bytes);
        loop {
            let before = self.rbuf.len();
            let head = self.rbuf[..before.min(32)].to_vec();
            let p = match decode_packet(&mut self.rbuf, protocol, u32::MAX) {
                Ok(Some(p)) => p,
                Ok(None) => return acks,
                Err(e) => panic!(
                    "slot {}: the broker wrote bytes that do not decode as {protocol}: {e}: \
                     {head:02x?}",
                    self.slot
                ),
            };
            let size = before - self.rbuf.len();
            self.check(p, size, &mut acks);
        }
    }

    fn check(&mut self, p: Packet, size: usize, acks: &mut Vec<Packet>) {
        if self.ended {
            self.fail("packet after DISCONNECT or a refusing CONNACK", &p);
        }
        let Some(connack) = self.connack else {
            let Packet::ConnAck(c) = &p else {
                self.fail("first packet is not CONNACK", &p);
            };
            if c.session_present && (self.clean_start || c.reason_code != ReasonCode::SUCCESS) {
                self.fail("session present after a clean start or a refusal", &p);
            }
            self.connack = Some(c.reason_code);
            self.ended = c.reason_code != ReasonCode::SUCCESS;
            return;
        };
        debug_assert_eq!(connack, ReasonCode::SUCCESS);
        if size > self.max_packet && matches!(p, Packet::Publish(_)) {
            self.fail("PUBLISH larger than the client's maximum packet size", &p);
        }
        let followed = self.followed;
        match &p {
            Packet::Publish(publish) => self.on_publish(&p, publish, acks),
            Packet::PubAck(r) | Packet::PubRec(r) if followed => {
                let qos = if matches!(p, Packet::PubAck(_)) {
                    QoS::AtLeastOnce
                } else {
                    QoS::ExactlyOnce
                };
                if self.acks_due.pop_front() != Some((r.packet_id.get(), qos)) {
                    self.fail(
                        "acknowledgement out of the order of the PUBLISHes (or unasked)",
                        &p,
                    );
                }
            }
            Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) => {}
            Packet::PubRel(r) => {
                let id = r.packet_id.get();
                if self.inflight_known {
                    match self.inflight.get(&id) {
                        // Released before a reconnect, and resent.
                        None => {
                            self.inflight.insert(id, Outbound::Qos2Released);
                        }
                        Some(Outbound::Qos2Released) => {}
                        Some(_) => self.fail("PUBREL for a message not received", &p),
                    }
                }
                if self.auto_ack {
                    acks.push(Packet::PubComp(PubResp::new(
                        r.packet_id,
                        ReasonCode::SUCCESS,
                    )));
                }
            }
            Packet::SubAck(s) if followed => match self.asked.pop_front() {
                Some(Asked::Subscribe { id, qos })
                    if id == s.packet_id.get() && qos.len() == s.reason_codes.len() =>
                {
                    let granted_ok = s
                        .reason_codes
                        .iter()
                        .zip(&qos)
                        .all(|(rc, asked)| rc.is_error() || rc.0 <= *asked as u8);
                    if !granted_ok {
                        self.fail("SUBACK grants more than asked", &p);
                    }
                }
                other => self.fail(&format!("SUBACK does not answer {other:?}"), &p),
            },
            Packet::UnsubAck(u) if followed => match self.asked.pop_front() {
                Some(Asked::Unsubscribe { id, n })
                    if id == u.packet_id.get()
                        && u.reason_codes.len()
                            == if protocol_v5(self.protocol) { n } else { 0 } => {}
                other => self.fail(&format!("UNSUBACK does not answer {other:?}"), &p),
            },
            Packet::PingResp if followed => {
                if self.pings == 0 {
                    self.fail("PINGRESP without PINGREQ", &p);
                }
                self.pings -= 1;
            }
            Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {}
            Packet::Disconnect(_) => {
                if !protocol_v5(self.protocol) {
                    self.fail("DISCONNECT sent to a 3.x client", &p);
                }
                self.ended = true;
            }
            Packet::ConnAck(_) => self.fail("second CONNACK", &p),
            Packet::Connect(_)
            | Packet::Subscribe(_)
            | Packet::Unsubscribe(_)
            | Packet::PingReq
            | Packet::Auth(_) => self.fail("a packet the broker never sends", &p),
        }
    }

    fn on_publish(&mut self, p: &Packet, publish: &crate::codec::Publish, acks: &mut Vec<Packet>) {
        let mut topic = publish.topic.clone();
        if let Some(alias) = publish.properties.topic_alias {
            if alias == 0 || alias > self.alias_max {
                self.fail("topic alias above the client's topic alias maximum", p);
            }
            if topic.is_empty() {
                match self.aliases.get(&alias) {
                    Some(t) => topic = t.clone(),
                    None => self.fail("unknown topic alias", p),
                }
            } else {
                self.aliases.insert(alias, topic.clone());
            }
        }
        if topic.is_empty() {
            self.fail("PUBLISH without a topic", p);
        }
        self.delivered.push((topic, publish.payload.clone()));
        let Some(id) = publish.packet_id else {
            return;
        };
        if self.inflight_known {
            let stage = if publish.qos == QoS::AtLeastOnce {
                Outbound::Qos1
            } else {
                Outbound::Qos2Published
            };
            if self.inflight.insert(id.get(), stage).is_some() {
                self.fail("packet id re-used while in flight", p);
            }
            // Resends after a reconnect are not checked: the broker resends every in-flight
            // message at once, even past a receive maximum lowered on reconnecting (a known
            // gap); the messages after them must fit.
            if !publish.dup {
                self.check_window(p);
            }
        }
        if self.auto_ack {
            let resp = PubResp::new(id, ReasonCode::SUCCESS);
            acks.push(match publish.qos {
                QoS::AtLeastOnce => Packet::PubAck(resp),
                _ => Packet::PubRec(resp),
            });
        }
    }

    fn check_window(&self, p: &Packet) {
        if self.inflight.len() > self.window {
            self.fail(
                &format!(
                    "more than {} QoS 1/2 messages in flight (the receive maximum)",
                    self.window
                ),
                p,
            );
        }
    }

    /// The broker closed the connection: it must not have stopped in the middle of a packet.
    pub fn at_eof(&self) {
        if self.protocol.is_some() && !self.rbuf.is_empty() {
            panic!(
                "slot {}: the broker closed the connection in the middle of a packet: {:?}",
                self.slot, self.rbuf
            );
        }
    }
}

fn protocol_v5(p: Option<Protocol>) -> bool {
    p.is_some_and(Protocol::is_v5)
}
