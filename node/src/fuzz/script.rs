//! A fuzz input as a script: the broker's settings, then connections opened in a few slots and
//! what each one sends, how its bytes are split into writes, and when it closes.

use bytes::BytesMut;

use super::input::Input;
use super::packets;
use crate::codec::{encode_packet, Connect, Packet, Protocol};
use crate::config::{Config, PublishRatePolicy, QueueOverflow};
use crate::limit::Refusal;

/// Connections open at once.
pub(super) const SLOTS: usize = 3;
/// Steps of one script; a longer input is not read further.
const MAX_OPS: usize = 64;

#[derive(Debug)]
pub(super) struct Script {
    pub config: Config,
    /// Capacity of each in-memory socket: small ones split the broker's reads and writes.
    pub socket_buffer: usize,
    pub ops: Vec<Op>,
}

#[derive(Debug)]
pub(super) enum Op {
    /// Opens a connection in `slot` (closing the one there) and sends its first bytes.
    Connect {
        slot: usize,
        first: First,
        /// The connection limits refused it: its CONNECT only gets the refusal.
        refused: Option<Refusal>,
        /// It came with a verified client certificate whose CN is the user name.
        cert_cn: bool,
        flush: Flush,
    },
    Send {
        slot: usize,
        packet: Packet,
        flush: Flush,
    },
    /// A packet with one byte changed, cut short or followed by junk.
    Mutated {
        slot: usize,
        packet: Packet,
        mutation: Mutation,
        flush: Flush,
    },
    Raw {
        slot: usize,
        bytes: Vec<u8>,
        flush: Flush,
    },
    /// Lets the broker run: a few yields, or a millisecond of real time (store commits).
    Settle { sleep: bool },
    /// Acknowledge what the broker delivers (PUBACK, PUBREC, PUBCOMP) or leave it unacked.
    AutoAck { slot: usize, on: bool },
    Close {
        slot: usize,
        /// Drop both directions at once instead of closing the write side and reading on.
        abrupt: bool,
    },
    /// The node shuts down: cancellation, then every attached session is kicked.
    Shutdown,
}

#[derive(Debug)]
pub(super) enum First {
    Connect(Box<Connect>),
    Mutated(Box<Connect>, Mutation),
    Raw(Vec<u8>),
    Nothing,
}

#[derive(Clone, Copy, Debug)]
pub(super) enum Mutation {
    Set { at: u16, byte: u8 },
    Cut(u8),
    Append([u8; 3]),
}

/// When the bytes queued on a connection are written.
#[derive(Debug)]
pub(super) enum Flush {
    Now,
    /// In writes of these sizes (the rest in one), yielding between them.
    Split(Vec<u8>),
    /// Later, together with what comes next.
    Later,
}

impl Mutation {
    pub fn apply(self, wire: &mut Vec<u8>) {
        if wire.is_empty() {
            return;
        }
        match self {
            Mutation::Set { at, byte } => {
                let i = at as usize % wire.len();
                wire[i] = byte;
            }
            Mutation::Cut(n) => wire.truncate(wire.len() - (n as usize % wire.len()).max(1)),
            Mutation::Append(junk) => wire.extend_from_slice(&junk),
        }
    }
}

/// Encodes a packet as a client of `protocol` would send it; empty if it cannot be encoded
/// for that protocol (AUTH before v5).
pub(super) fn encode(packet: &Packet, protocol: Protocol) -> Vec<u8> {
    let mut out = BytesMut::new();
    match encode_packet(packet, protocol, &mut out) {
        Ok(()) => out.to_vec(),
        Err(_) => Vec::new(),
    }
}

/// The wire bytes of a CONNECT: its protocol is its own.
pub(super) fn encode_connect(c: &Connect) -> Vec<u8> {
    encode(&Packet::Connect(Box::new(c.clone())), c.protocol)
}

impl Script {
    pub fn parse(data: &[u8]) -> Script {
        let mut i = Input::new(data);
        let config = config(&mut i);
        let socket_buffer = i.pick(&[64 * 1024, 64 * 1024, 16, 1024]);
        // Protocol levels as the broker will see them, so that packets fit their connection.
        let mut v5 = [true; SLOTS];
        let mut ops = vec![connect(&mut i, 0, &mut v5)];
        let mut current = 0;
        while !i.is_empty() && ops.len() < MAX_OPS {
            let slot = if i.one_in(4) { i.below(SLOTS) } else { current };
            let op = match i.below(64) {
                0..=3 => {
                    current = slot;
                    connect(&mut i, slot, &mut v5)
                }
                4..=49 => Op::Send {
                    slot,
                    packet: packets::packet(&mut i, v5[slot]),
                    flush: flush(&mut i),
                },
                50 => Op::Mutated {
                    slot,
                    packet: packets::packet(&mut i, v5[slot]),
                    mutation: mutation(&mut i),
                    flush: flush(&mut i),
                },
                51 => Op::Raw {
                    slot,
                    bytes: i.bytes(24).to_vec(),
                    flush: flush(&mut i),
                },
                52..=56 => Op::Settle { sleep: i.one_in(4) },
                57..=59 => Op::AutoAck {
                    slot,
                    on: i.u8() % 4 != 0,
                },
                60..=61 => Op::Close {
                    slot,
                    abrupt: i.bool(),
                },
                62 if i.one_in(16) => Op::Shutdown,
                _ => Op::Settle { sleep: false },
            };
            ops.push(op);
        }
        Script {
            config,
            socket_buffer,
            ops,
        }
    }

    /// Every byte the script's clients send, in order: CONNECTs of every protocol level,
    /// packets encoded for their connection's level, mutated ones and junk. Input for the
    /// codec's fuzz check, much richer in valid packets than random bytes.
    pub fn wire(&self) -> Vec<u8> {
        let mut levels = [Protocol::V5; SLOTS];
        let mut out = Vec::new();
        for op in &self.ops {
            match op {
                Op::Connect { slot, first, .. } => match first {
                    First::Connect(c) => {
                        levels[*slot] = c.protocol;
                        out.extend(encode_connect(c));
                    }
                    First::Mutated(c, m) => {
                        levels[*slot] = c.protocol;
                        let mut wire = encode_connect(c);
                        m.apply(&mut wire);
                        out.extend(wire);
                    }
                    First::Raw(bytes) => out.extend_from_slice(bytes),
                    First::Nothing => {}
                },
                Op::Send { slot, packet, .. } => out.extend(encode(packet, levels[*slot])),
                Op::Mutated {
                    slot,
                    packet,
                    mutation,
                    ..
                } => {
                    let mut wire = encode(packet, levels[*slot]);
                    mutation.apply(&mut wire);
                    out.extend(wire);
                }
                Op::Raw { bytes, .. } => out.extend_from_slice(bytes),
                _ => {}
            }
        }
        out
    }
}

fn connect(i: &mut Input<'_>, slot: usize, v5: &mut [bool; SLOTS]) -> Op {
    let first = match i.below(32) {
        0..=28 => First::Connect(Box::new(packets::connect(i))),
        29 => First::Mutated(Box::new(packets::connect(i)), mutation(i)),
        30 => First::Raw(i.bytes(32).to_vec()),
        _ => First::Nothing,
    };
    if let First::Connect(c) | First::Mutated(c, _) = &first {
        v5[slot] = c.protocol.is_v5();
    }
    let refused = if i.one_in(32) {
        Some(i.pick(&[
            Refusal::ServerFull,
            Refusal::ListenerFull,
            Refusal::RateExceeded,
        ]))
    } else {
        None
    };
    Op::Connect {
        slot,
        first,
        refused,
        cert_cn: i.one_in(32),
        flush: flush(i),
    }
}

fn mutation(i: &mut Input<'_>) -> Mutation {
    match i.below(3) {
        0 => Mutation::Set {
            at: i.u16(),
            byte: i.u8(),
        },
        1 => Mutation::Cut(i.u8()),
        _ => Mutation::Append([i.u8(), i.u8(), i.u8()]),
    }
}

fn flush(i: &mut Input<'_>) -> Flush {
    match i.below(8) {
        0..=4 => Flush::Now,
        5..=6 => Flush::Split((0..1 + i.below(4)).map(|_| 1 + i.u8() % 16).collect()),
        _ => Flush::Later,
    }
}

/// The broker's settings: the defaults, or tight limits that reach the overflow, window,
/// alias, size and rate paths within a few packets.
fn config(i: &mut Input<'_>) -> Config {
    let mut cfg = Config::default();
    cfg.mqtt.sys_interval_secs = 0;
    // Each group of settings is changed in one case out of four.
    let knobs = i.u8() & i.u8();
    let m = &mut cfg.mqtt;
    if knobs & 1 != 0 {
        m.max_inflight_messages = i.pick(&[1, 2, 3, 128]);
        m.receive_maximum = i.pick(&[1, 2, 128]);
        m.max_queued_messages = i.pick(&[1, 2, 4, 1000]);
        m.max_queued_bytes = i.pick(&[0, 0, 64, 1024]);
        m.queue_overflow = i.pick(&[QueueOverflow::DropNewest, QueueOverflow::DropOldest]);
        m.queue_qos0_offline = i.bool();
        m.backpressure_max_wait_ms = i.pick(&[100, 0, 5]);
    }
    if knobs & 2 != 0 {
        m.max_qos = i.pick(&[2, 1, 0]);
        m.retain_available = i.u8() % 4 != 0;
        m.topic_alias_maximum = i.pick(&[64, 0, 1, 2]);
        m.max_keep_alive_secs = i.pick(&[0, 0, 30]);
        m.session_expiry_max_secs = i.pick(&[u32::MAX, 0, 10]);
        m.persistent_session_expiry_secs = i.pick(&[u32::MAX, 0, 10]);
    }
    if knobs & 4 != 0 {
        m.max_packet_size_bytes = i.pick(&[32, 128, 256, 1024]);
    }
    let l = &mut cfg.limits;
    if knobs & 8 != 0 {
        l.max_topic_levels = i.pick(&[128, 2, 3]);
        l.max_topic_length_bytes = i.pick(&[65_535, 8, 16]);
        l.max_subscriptions_per_client = i.pick(&[0, 1, 2]);
    }
    if knobs & 16 != 0 {
        // Fast enough that a throttled script still finishes in milliseconds.
        l.max_publish_rate_per_client = i.pick(&[1_000, 200]);
        l.publish_rate_burst = i.pick(&[1, 2, 10]);
        l.publish_rate_policy =
            i.pick(&[PublishRatePolicy::Throttle, PublishRatePolicy::Disconnect]);
    }
    cfg.storage.durable_acks = knobs & 32 == 0;
    cfg.mqtt.queue_qos0_offline |= knobs & 64 != 0;
    cfg
}
