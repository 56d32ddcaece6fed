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
}

#[derive(Clone, Copy, Debug)]
pub struct QueueLimits {
    pub max_messages: usize,
    pub overflow: QueueOverflow,
    pub qos0_offline: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The queue was full (the new message, or the oldest under drop-oldest).
    QueueFull,
    /// The session is offline and the message is QoS 0.
    OfflineQos0,
    /// The session has ended.
    SessionGone,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enqueued {
    Queued,
    Dropped(DropReason),
}

/// What the overflow policy does with a new delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Plan {
    Push,
    /// Drop the oldest queued delivery, then push (drop-oldest on a full queue).
    ReplaceOldest,
    Reject(DropReason),
}

pub(super) fn plan(
    queue: &VecDeque<Delivery>,
    qos: QoS,
    online: bool,
    limits: &QueueLimits,
) -> Plan {
    if !online && qos == QoS::AtMostOnce && !limits.qos0_offline {
        return Plan::Reject(DropReason::OfflineQos0);
    }
    if queue.len() < limits.max_messages {
        return Plan::Push;
    }
    if qos == QoS::AtMostOnce || limits.overflow == QueueOverflow::DropNewest {
        return Plan::Reject(DropReason::QueueFull);
    }
    Plan::ReplaceOldest
}
