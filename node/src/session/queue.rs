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

/// Pushes with the overflow policy applied. Returns what happened and whether a message was
/// dropped to make room (drop-oldest).
pub(super) fn push(queue: &mut VecDeque<Delivery>, d: Delivery, online: bool, limits: &QueueLimits) -> (Enqueued, bool) {
    if !online && d.qos == QoS::AtMostOnce && !limits.qos0_offline {
        return (Enqueued::Dropped(DropReason::OfflineQos0), false);
    }
    if queue.len() < limits.max_messages {
        queue.push_back(d);
        return (Enqueued::Queued, false);
    }
    if d.qos == QoS::AtMostOnce || limits.overflow == QueueOverflow::DropNewest {
        return (Enqueued::Dropped(DropReason::QueueFull), false);
    }
    queue.pop_front();
    queue.push_back(d);
    (Enqueued::Queued, true)
}
