//! The packed form of a forwarded batch (wire level 3, `ForwardBatch.packed`): its messages
//! as fixed-width fields in one buffer, written and read here rather than by protobuf.
//!
//! prost writes a varint one byte at a time, each through `BufMut::put_slice`, and decodes
//! every field of every `ForwardedMessage` through its generic merge loop: encoding and
//! decoding the batches of the p2p QoS 1 row took about 0.4 µs per message, an eighth of
//! what a cross-node message cost in all (perf, session 16). Here a message is a few
//! fixed-width writes and two copies (topic and payload) on the sender, and reads and
//! slices of the receive buffer on the receiver (only a pass-on copy's client id and a
//! share group's names are copied out, into strings).
//!
//! A reader refuses the whole batch at the first thing that does not read (a length past
//! the end, an unknown flag, a topic that is not a topic name, QoS 3): the receiver then
//! ends the stream unacknowledged. Nodes write these batches, so that is a bug, and the
//! sender's link, which sends the batch again on its next stream, is refused again until
//! the outbox drops it for room; the error log names it.
//!
//! A message without v5 properties or expiry goes as its topic, payload, QoS and retain
//! flag (the sender encodes nothing, the receiver decodes no MQTT); any other in the stored
//! encoding (`persist::value::message`), as in `ForwardedMessage.message`.
//!
//! Layout, big-endian: a version byte ([`VERSION`]), the number of messages (u32), then each
//! message:
//!
//! | field | bytes | present |
//! | --- | --- | --- |
//! | `seq` | 8 | always |
//! | flags (below) | 2 | always |
//! | `published_at_ms`, `routed_at` | 8, 8 | always |
//! | `first_incarnation`, `first_seq` | 8, 8 | `FIRST` |
//! | `client_id` | 2 (length) + its bytes | `CLIENT` |
//! | `shared` | 4 (count) + per target: 2 + group, 2 + filter | `SHARED` |
//! | the stored encoding | 4 (length) + its bytes | `STORED` |
//! | topic, payload | 2 + topic, 4 + payload | not `STORED` |
//!
//! Flags: `plain` 1, `share_redirected` 2, `FIRST` 4, `CLIENT` 8, `SHARED` 16, `STORED` 32,
//! retain 64, QoS in bits 8 and 9; other bits are 0 (a reader refuses them).

use bytes::{Buf, Bytes};
use petrel_cluster_proto::pb;

use crate::codec::decode::is_valid_topic_name;
use crate::codec::{MqttStr, QoS};
use crate::message::Message;

/// The format's version (first byte).
pub const VERSION: u8 = 1;

const PLAIN: u16 = 1;
const REDIRECTED: u16 = 2;
const FIRST: u16 = 4;
const CLIENT: u16 = 8;
const SHARED: u16 = 16;
const STORED: u16 = 32;
const RETAIN: u16 = 64;
const QOS_SHIFT: u16 = 8;
const KNOWN: u16 =
    PLAIN | REDIRECTED | FIRST | CLIENT | SHARED | STORED | RETAIN | (3 << QOS_SHIFT);

/// A message that came as its fields rather than in the stored encoding (checked as a
/// PUBLISH's would be: a topic name, a QoS).
#[derive(Debug, PartialEq, Eq)]
pub struct Fields {
    pub topic: MqttStr,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
}

/// Writes a packed batch.
pub struct Packer {
    buf: Vec<u8>,
    count: u32,
}

impl Packer {
    /// A batch of about `bytes` bytes of messages.
    pub fn with_capacity(bytes: usize) -> Packer {
        let mut buf = Vec::with_capacity(5 + bytes);
        buf.push(VERSION);
        buf.extend_from_slice(&0u32.to_be_bytes());
        Packer { buf, count: 0 }
    }

    /// Adds `m` (its metadata; its `message` if `live` is `None`), or `live` as fields.
    /// Strings longer than their length field (never: MQTT strings are at most 65,535
    /// bytes) are cut.
    pub fn push(&mut self, m: &pb::ForwardedMessage, live: Option<&Message>) {
        let mut flags = 0;
        let first = m.first_incarnation != 0;
        flags |= if m.plain { PLAIN } else { 0 };
        flags |= if m.share_redirected { REDIRECTED } else { 0 };
        flags |= if first { FIRST } else { 0 };
        flags |= if m.client_id.is_empty() { 0 } else { CLIENT };
        flags |= if m.shared.is_empty() { 0 } else { SHARED };
        match live {
            Some(msg) => {
                flags |= (msg.qos as u16) << QOS_SHIFT;
                flags |= if msg.retain { RETAIN } else { 0 };
            }
            None => flags |= STORED,
        }
        let b = &mut self.buf;
        b.extend_from_slice(&m.seq.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&m.published_at_ms.to_be_bytes());
        b.extend_from_slice(&m.routed_at.to_be_bytes());
        if first {
            b.extend_from_slice(&m.first_incarnation.to_be_bytes());
            b.extend_from_slice(&m.first_seq.to_be_bytes());
        }
        if !m.client_id.is_empty() {
            put16(b, m.client_id.as_bytes());
        }
        if !m.shared.is_empty() {
            b.extend_from_slice(&(m.shared.len() as u32).to_be_bytes());
            for s in &m.shared {
                put16(b, s.group.as_bytes());
                put16(b, s.filter.as_bytes());
            }
        }
        match live {
            Some(msg) => {
                put16(b, msg.topic.as_bytes());
                put32(b, &msg.payload);
            }
            None => put32(b, &m.message),
        }
        self.count += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn finish(mut self) -> Bytes {
        self.buf[1..5].copy_from_slice(&self.count.to_be_bytes());
        Bytes::from(self.buf)
    }
}

fn put16(b: &mut Vec<u8>, s: &[u8]) {
    let s = &s[..s.len().min(u16::MAX as usize)];
    b.extend_from_slice(&(s.len() as u16).to_be_bytes());
    b.extend_from_slice(s);
}

fn put32(b: &mut Vec<u8>, s: &[u8]) {
    let s = &s[..s.len().min(u32::MAX as usize)];
    b.extend_from_slice(&(s.len() as u32).to_be_bytes());
    b.extend_from_slice(s);
}

/// How many messages the packed batch `b` says it holds (0 if it is not one).
pub fn count(b: &[u8]) -> usize {
    match b {
        [VERSION, n @ ..] if n.len() >= 4 => u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize,
        _ => 0,
    }
}

/// A packed batch that does not read: the whole batch is refused (a message cannot be
/// skipped without its length, nor its sequence number known).
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed packed batch: {}", self.0)
    }
}

/// The messages of a packed batch, in order, as slices of `b`.
pub struct Unpacked {
    b: Bytes,
    left: u32,
}

/// Starts reading the packed batch `b`.
pub fn unpack(mut b: Bytes) -> Result<Unpacked, Malformed> {
    if b.remaining() < 5 {
        return Err(Malformed("shorter than its header"));
    }
    if b.get_u8() != VERSION {
        return Err(Malformed("unknown version"));
    }
    let left = b.get_u32();
    Ok(Unpacked { b, left })
}

impl Unpacked {
    fn next_message(&mut self) -> Result<(pb::ForwardedMessage, Option<Fields>), Malformed> {
        let b = &mut self.b;
        let seq = u64_of(b)?;
        let flags = u16_of(b)?;
        if flags & !KNOWN != 0 {
            return Err(Malformed("unknown flags"));
        }
        if flags & STORED != 0 && flags & (RETAIN | (3 << QOS_SHIFT)) != 0 {
            return Err(Malformed("QoS or retain flags beside a stored encoding"));
        }
        let mut m = pb::ForwardedMessage {
            seq,
            plain: flags & PLAIN != 0,
            share_redirected: flags & REDIRECTED != 0,
            published_at_ms: u64_of(b)?,
            routed_at: u64_of(b)?,
            ..Default::default()
        };
        if flags & FIRST != 0 {
            m.first_incarnation = u64_of(b)?;
            m.first_seq = u64_of(b)?;
        }
        if flags & CLIENT != 0 {
            m.client_id = string_of(b)?;
        }
        if flags & SHARED != 0 {
            let n = u32_of(b)?;
            // Each target takes at least 4 bytes: a count past that is a lie. Room is made
            // as targets are read, not from the count.
            if n as usize > b.remaining() / 4 {
                return Err(Malformed("share targets past the end"));
            }
            for _ in 0..n {
                m.shared.push(pb::SharedTarget {
                    group: string_of(b)?,
                    filter: string_of(b)?,
                });
            }
        }
        if flags & STORED != 0 {
            let n = u32_of(b)? as usize;
            m.message = take(b, n)?;
            return Ok((m, None));
        }
        let n = u16_of(b)? as usize;
        let topic = MqttStr::from_bytes(take(b, n)?)
            .map_err(|_| Malformed("a topic that is not an MQTT string"))?;
        if topic.is_empty() || !is_valid_topic_name(&topic) {
            return Err(Malformed("not a topic name"));
        }
        let qos = QoS::from_u8((flags >> QOS_SHIFT) as u8 & 3).ok_or(Malformed("QoS 3"))?;
        let n = u32_of(b)? as usize;
        let payload = take(b, n)?;
        let fields = Fields {
            topic,
            payload,
            qos,
            retain: flags & RETAIN != 0,
        };
        Ok((m, Some(fields)))
    }
}

impl Iterator for Unpacked {
    type Item = Result<(pb::ForwardedMessage, Option<Fields>), Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            if self.b.has_remaining() {
                self.b.clear();
                return Some(Err(Malformed("bytes after the last message")));
            }
            return None;
        }
        self.left -= 1;
        let r = self.next_message();
        if r.is_err() {
            // Nothing after an error reads.
            self.left = 0;
            self.b.clear();
        }
        Some(r)
    }
}

/// The messages of a batch in either form, in order.
pub enum Messages {
    Listed(std::vec::IntoIter<pb::ForwardedMessage>),
    Packed(Unpacked),
}

impl Messages {
    /// `batch`'s messages: packed if it has any so (then none listed).
    pub fn of(batch: &mut pb::ForwardBatch) -> Result<Messages, Malformed> {
        if !batch.packed.is_empty() && !batch.messages.is_empty() {
            return Err(Malformed("messages both packed and listed"));
        }
        if batch.packed.is_empty() {
            return Ok(Messages::Listed(
                std::mem::take(&mut batch.messages).into_iter(),
            ));
        }
        unpack(std::mem::take(&mut batch.packed)).map(Messages::Packed)
    }
}

impl Iterator for Messages {
    type Item = Result<(pb::ForwardedMessage, Option<Fields>), Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Messages::Listed(it) => it.next().map(|m| Ok((m, None))),
            Messages::Packed(it) => it.next(),
        }
    }
}

fn take(b: &mut Bytes, n: usize) -> Result<Bytes, Malformed> {
    if b.remaining() < n {
        return Err(Malformed("a field past the end"));
    }
    Ok(b.split_to(n))
}

fn u16_of(b: &mut Bytes) -> Result<u16, Malformed> {
    match b.remaining() >= 2 {
        true => Ok(b.get_u16()),
        false => Err(Malformed("a field past the end")),
    }
}

fn u32_of(b: &mut Bytes) -> Result<u32, Malformed> {
    match b.remaining() >= 4 {
        true => Ok(b.get_u32()),
        false => Err(Malformed("a field past the end")),
    }
}

fn u64_of(b: &mut Bytes) -> Result<u64, Malformed> {
    match b.remaining() >= 8 {
        true => Ok(b.get_u64()),
        false => Err(Malformed("a field past the end")),
    }
}

fn string_of(b: &mut Bytes) -> Result<String, Malformed> {
    let n = u16_of(b)? as usize;
    let s = take(b, n)?;
    String::from_utf8(s.to_vec()).map_err(|_| Malformed("a string that is not UTF-8"))
}

#[cfg(test)]
#[path = "packed_test.rs"]
mod tests;
