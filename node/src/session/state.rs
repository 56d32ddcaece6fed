//! The owned half of a session: touched only by the connection that holds it.

use std::collections::{HashMap, HashSet, VecDeque};

use super::queue::Delivery;
use crate::codec::{MqttStr, PacketId, SubscriptionOptions};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredSubscription {
    pub options: SubscriptionOptions,
    pub subscription_id: Option<u32>,
}

/// Where an outbound QoS 1/2 message stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// PUBLISH sent; waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published,
    /// PUBREL sent; waiting for PUBCOMP.
    Released,
}

#[derive(Debug)]
pub struct Inflight {
    pub packet_id: PacketId,
    pub delivery: Delivery,
    pub stage: Stage,
}

#[derive(Debug)]
pub struct SessionState {
    /// Raw filter (with any `$share/group/` prefix) -> options.
    pub subscriptions: HashMap<MqttStr, StoredSubscription>,
    /// Outbound QoS 1/2 messages not yet acknowledged, in send order. Changed through
    /// [`SessionState::push_inflight`], [`SessionState::take_inflight`] and
    /// [`SessionState::remove_inflight`], which keep `inflight_bytes`.
    pub inflight: VecDeque<Inflight>,
    /// Sum of the in-flight deliveries' sizes (admin API).
    pub inflight_bytes: usize,
    pub next_packet_id: PacketId,
    /// Inbound QoS 2 packet ids received (and routed) whose PUBREL has not come yet.
    pub inbound_qos2: HashSet<u16>,
    /// Retained messages a SUBSCRIBE asked for that are not sent yet. They go out ahead of
    /// the session queue, through the in-flight window as the client acknowledges, and are
    /// not bound by `max_queued_messages` (which is for live traffic): a new `status/#`
    /// subscriber gets every device's status, however many. References to the retained
    /// store's messages, not copies.
    pub retained_backlog: VecDeque<Delivery>,
    /// Set when the session ends: its queued deliveries that a share group routed to it,
    /// for another member (MQTT 5 section 4.8.2; see `Broker::end_session`).
    pub orphans: Vec<Delivery>,
}

impl Default for SessionState {
    fn default() -> SessionState {
        SessionState {
            subscriptions: HashMap::new(),
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            next_packet_id: PacketId::new(1).expect("1 is not 0"),
            inbound_qos2: HashSet::new(),
            retained_backlog: VecDeque::new(),
            orphans: Vec::new(),
        }
    }
}

impl SessionState {
    /// Allocates a packet id not used by an in-flight message.
    pub fn alloc_packet_id(&mut self) -> PacketId {
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = id.next();
            if !self.inflight.iter().any(|f| f.packet_id == id) {
                return id;
            }
        }
    }

    /// Removes and returns the in-flight entry with this id, if it is at `stage`.
    pub fn take_inflight(&mut self, id: PacketId, stage: Stage) -> Option<Inflight> {
        let pos = self
            .inflight
            .iter()
            .position(|f| f.packet_id == id && f.stage == stage)?;
        self.remove_inflight(pos)
    }

    /// Adds an entry at the end of the in-flight window.
    pub fn push_inflight(&mut self, f: Inflight) {
        self.inflight_bytes += f.delivery.size();
        self.inflight.push_back(f);
    }

    /// Removes the entry at `pos`.
    pub fn remove_inflight(&mut self, pos: usize) -> Option<Inflight> {
        let f = self.inflight.remove(pos)?;
        self.inflight_bytes = self.inflight_bytes.saturating_sub(f.delivery.size());
        Some(f)
    }

    /// Recounts `inflight_bytes` after the window was changed as a whole.
    pub fn recount_inflight(&mut self) {
        self.inflight_bytes = self.inflight.iter().map(|f| f.delivery.size()).sum();
    }
}
