//! The per-session message queue: bounded, with a documented overflow policy.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::codec::QoS;
use crate::config::QueueOverflow;
use crate::message::Message;

/// Subscription identifiers of one delivery; one or none in the common case, no allocation.
#[derive(Clone, Debug, Default)]
pub enum SubIds {
    #[default]
    None,
    One(u32),
    Many(Box<[u32]>),
}

impl SubIds {
    pub fn as_slice(&self) -> &[u32] {
        match self {
            SubIds::None => &[],
            SubIds::One(id) => std::slice::from_ref(id),
            SubIds::Many(ids) => ids,
        }
    }

    pub fn extend(&mut self, id: Option<u32>) {
        if let Some(id) = id {
            self.push(id);
        }
    }

    pub fn push(&mut self, id: u32) {
        *self = match std::mem::take(self) {
            SubIds::None => SubIds::One(id),
            SubIds::One(a) => SubIds::Many(Box::new([a, id])),
            SubIds::Many(v) => {
                let mut v = v.into_vec();
                v.push(id);
                SubIds::Many(v.into_boxed_slice())
            }
        }
    }
}

/// One message on its way to one session.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub msg: Arc<Message>,
    /// Granted QoS: the lower of the message's and the subscription's.
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: SubIds,
    /// Position in the session's stored queue; 0 when the delivery is not stored.
    pub seq: u64,
    /// The ACL must allow this topic for the receiving client before it is sent.
    pub acl_check: bool,
    /// The ACL generation (truncated) when it was routed: after a reload, it is checked
    /// against the new ACL before it is sent. Sits in what would be padding.
    pub acl_gen: u32,
    /// Routed to this session as a share group's chosen member: if the session ends
    /// before the client acknowledged it, another member gets it (MQTT 5 section 4.8.2).
    /// In padding too. Stored as the DUP flag of the queued copy (`value::queued`).
    pub shared: bool,
}

impl Delivery {
    /// A QoS 1 delivery of a `t/x` message with a zeroed payload of `payload_len` bytes.
    #[cfg(test)]
    pub fn for_test(payload_len: usize) -> Delivery {
        let msg = Message {
            topic: crate::codec::MqttStr::from_static("t/x"),
            payload: vec![0u8; payload_len].into(),
            qos: QoS::AtLeastOnce,
            retain: false,
            props: None,
            expires_at: None,
            origin: crate::session::SessionId::BROKER,
            owned: true,
            received: crate::message::Stamp::NONE,
            routed_at: Default::default(),
        };
        Delivery {
            msg: Arc::new(msg),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: SubIds::None,
            seq: 0,
            acl_check: false,
            acl_gen: 0,
            shared: false,
        }
    }

    /// What the message weighs against `max_queued_bytes`: its topic and payload.
    pub fn size(&self) -> usize {
        self.msg.topic.len() + self.msg.payload.len()
    }
}

#[derive(Clone, Copy, Debug)]
pub struct QueueLimits {
    pub max_messages: usize,
    /// 0: no byte limit.
    pub max_bytes: usize,
    pub overflow: QueueOverflow,
    pub qos0_offline: bool,
    /// A connected session's queue at least this long slows its publishers down (0: never).
    pub congested_at: usize,
}

impl QueueLimits {
    /// Below this length a congested queue lets its publishers go again.
    pub fn drained_below(&self) -> usize {
        self.congested_at / 2
    }

    /// The queue length at which publishers wait: half the queue, at most 1024.
    pub fn congestion_threshold(max_messages: usize) -> usize {
        (max_messages / 2).clamp(1, 1024)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The queue held `max_queued_messages` (the new message, or the oldest under
    /// drop-oldest, is dropped).
    QueueFull,
    /// The queue held too many bytes for the new message (`max_queued_bytes`).
    QueueBytes,
    /// The session is offline and the message is QoS 0.
    OfflineQos0,
    /// The session has ended.
    SessionGone,
}

#[derive(Debug)]
pub enum Enqueued {
    /// Queued; under drop-oldest, `dropped` older messages made room for it. `congested`:
    /// the session is connected and its queue is long enough that publishers should wait.
    Queued {
        dropped: usize,
        why: DropReason,
        congested: bool,
    },
    Dropped(DropReason),
    /// The session has ended (it may have moved to another node: [`Session::moved`]); the
    /// delivery comes back.
    ///
    /// [`Session::moved`]: crate::session::Session::moved
    Gone(Delivery),
}

impl DropReason {
    /// Label for `petrel_limit_hits_total`, when a configured limit caused the drop.
    pub fn limit_label(self) -> Option<&'static str> {
        match self {
            DropReason::QueueFull => Some("max_queued_messages"),
            DropReason::QueueBytes => Some("max_queued_bytes"),
            _ => None,
        }
    }
}

/// What the overflow policy does with a new delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Plan {
    Push,
    /// Drop the oldest queued deliveries until the new one fits, then push (drop-oldest on a
    /// full queue).
    ReplaceOldest(DropReason),
    Reject(DropReason),
}

pub(super) fn plan(
    queue: &VecDeque<Delivery>,
    queued_bytes: usize,
    d: &Delivery,
    online: bool,
    limits: &QueueLimits,
) -> Plan {
    if !online && d.qos == QoS::AtMostOnce && !limits.qos0_offline {
        return Plan::Reject(DropReason::OfflineQos0);
    }
    let why = if queue.len() >= limits.max_messages {
        DropReason::QueueFull
    } else if !fits_bytes(queue.len(), queued_bytes, d.size(), limits) {
        DropReason::QueueBytes
    } else {
        return Plan::Push;
    };
    if d.qos == QoS::AtMostOnce || limits.overflow == QueueOverflow::DropNewest {
        return Plan::Reject(why);
    }
    Plan::ReplaceOldest(why)
}

/// Whether `size` more bytes fit; an empty queue takes any one message, so a message larger
/// than the limit still reaches an online client.
pub(super) fn fits_bytes(
    len: usize,
    queued_bytes: usize,
    size: usize,
    limits: &QueueLimits,
) -> bool {
    limits.max_bytes == 0 || len == 0 || queued_bytes + size <= limits.max_bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Session;

    fn delivery(payload_len: usize) -> Delivery {
        Delivery::for_test(payload_len)
    }

    fn limits(max_bytes: usize, overflow: QueueOverflow) -> QueueLimits {
        QueueLimits {
            max_messages: 100,
            max_bytes,
            overflow,
            qos0_offline: false,
            congested_at: 0,
        }
    }

    fn queued(s: &Session) -> Vec<usize> {
        let mut out = Vec::new();
        s.drain(usize::MAX, usize::MAX, &mut out, 0);
        out.iter().map(|d| d.msg.payload.len()).collect()
    }

    #[test]
    fn byte_limit_drop_newest() {
        let s = Session::new_for_test("bytes");
        let l = limits(100, QueueOverflow::DropNewest);
        // Each delivery weighs 3 topic bytes plus its payload.
        assert!(matches!(
            s.enqueue(delivery(47), &l, None),
            Enqueued::Queued { dropped: 0, .. }
        ));
        assert!(matches!(
            s.enqueue(delivery(47), &l, None),
            Enqueued::Queued { dropped: 0, .. }
        ));
        assert!(matches!(
            s.enqueue(delivery(1), &l, None),
            Enqueued::Dropped(DropReason::QueueBytes)
        ));
        assert_eq!(queued(&s), vec![47, 47]);
        // Drained: the bytes are free again, and an empty queue takes even an oversized one.
        assert!(matches!(
            s.enqueue(delivery(500), &l, None),
            Enqueued::Queued { .. }
        ));
        assert_eq!(queued(&s), vec![500]);
    }

    #[test]
    fn byte_limit_drop_oldest_drops_enough() {
        let s = Session::new_for_test("bytes-oldest");
        let l = limits(100, QueueOverflow::DropOldest);
        for n in [17, 17, 17, 17] {
            s.enqueue(delivery(n), &l, None);
        }
        // 80 bytes queued; 60 more fit once two of them are gone (40 + 60 = 100).
        assert!(matches!(
            s.enqueue(delivery(57), &l, None),
            Enqueued::Queued {
                dropped: 2,
                why: DropReason::QueueBytes,
                congested: false,
            }
        ));
        assert_eq!(queued(&s), vec![17, 17, 57]);
    }
}
