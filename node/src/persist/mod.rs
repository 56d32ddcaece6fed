//! Persistence of sessions and delayed wills in `petrel-storage` (retained messages are
//! replicated state: the cluster's Raft log and snapshots keep them).
//!
//! - [`value`]: the byte encodings of what is stored (messages reuse the MQTT v5 PUBLISH
//!   encoding, so there is one serialisation of a message, not two).
//! - [`recover`]: rebuilding sessions, the trie, retained messages and wills at start.
//!
//! What is written, and when (only for persistent sessions: expiry interval above 0):
//!
//! | event | write | the client waits for it |
//! |---|---|---|
//! | QoS 1/2 message queued for a persistent session | queue put | yes: PUBACK/PUBREC to the publisher |
//! | retained message set or cleared | (a Raft command: the log, fsync) | yes: PUBACK once every live node applied it |
//! | inbound QoS 2 PUBLISH | inbound put | yes: PUBREC |
//! | outbound QoS 2 PUBLISH gets a packet id | inflight put | yes: the PUBLISH is not written to the socket before |
//! | PUBACK / PUBCOMP from the subscriber | queue + inflight delete | no |
//! | PUBREC from the subscriber | inflight put (released) | no |
//! | CONNECT, DISCONNECT, SUBSCRIBE, UNSUBSCRIBE | session / subscription records | no |
//! | session ends | every key of the client | no |
//! | will with a delay | will put, delete when fired or cancelled | no |
//! | a forwarded copy whose peer has not acknowledged it in time (or is behind) | outbox put (`cluster/forward.rs`), delete when the peer acknowledges | yes: PUBACK/PUBREC to the publisher |

pub mod recover;
pub mod value;

use petrel_storage::{keys, BatchWriter, Cf};

use crate::session::{Delivery, Stage};

/// Writes the record of a persistent session (`epoch`: of the claim that attached its
/// last connection).
pub fn put_session(
    w: &mut BatchWriter<'_>,
    client_id: &str,
    expiry: u32,
    disconnected_ms: u64,
    epoch: u64,
) {
    w.put(
        Cf::Sessions,
        client_id.as_bytes(),
        &value::session(expiry, disconnected_ms, epoch),
    );
}

/// Deletes a delivered (or dropped) queued message and its in-flight record.
pub fn delete_queued(w: &mut BatchWriter<'_>, client_id: &str, seq: u64) {
    let key = keys::queue_key(client_id, seq);
    w.delete(Cf::Queue, &key);
    w.delete(Cf::Inflight, &key);
}

/// Records the packet id and stage of an outbound QoS 2 message.
pub fn put_inflight(
    w: &mut BatchWriter<'_>,
    client_id: &str,
    d: &Delivery,
    packet_id: u16,
    stage: Stage,
) {
    w.put(
        Cf::Inflight,
        &keys::queue_key(client_id, d.seq),
        &value::inflight(packet_id, stage),
    );
}
