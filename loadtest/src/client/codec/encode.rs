//! Encoders: each appends one packet to a caller-owned buffer.

use bytes::{BufMut, BytesMut};

use super::{kind, Stamp, Version, STAMP_LEN, STAMP_MAGIC};

pub fn put_varint(buf: &mut BytesMut, mut n: usize) {
    loop {
        let mut b = (n & 0x7f) as u8;
        n >>= 7;
        if n > 0 {
            b |= 0x80;
        }
        buf.put_u8(b);
        if n == 0 {
            break;
        }
    }
}

pub fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_str(buf: &mut BytesMut, s: &[u8]) {
    buf.put_u16(s.len() as u16);
    buf.put_slice(s);
}

/// What a client puts in its CONNECT.
#[derive(Debug, Clone)]
pub struct Connect<'a> {
    pub version: Version,
    pub client_id: &'a str,
    pub clean: bool,
    pub keepalive_secs: u16,
    /// v5 Session Expiry Interval; ignored for 3.1.1.
    pub session_expiry_secs: Option<u32>,
    /// v5 Receive Maximum; ignored for 3.1.1.
    pub receive_maximum: Option<u16>,
    pub username: Option<&'a str>,
    pub password: Option<&'a str>,
}

pub fn encode_connect(buf: &mut BytesMut, c: &Connect<'_>) {
    let v5 = c.version == Version::V5;
    let mut props = 0;
    if v5 {
        props += c.session_expiry_secs.map_or(0, |_| 5) + c.receive_maximum.map_or(0, |_| 3);
    }
    let mut len = 6 + 1 + 1 + 2 + 2 + c.client_id.len();
    if v5 {
        len += varint_len(props) + props;
    }
    len += c.username.map_or(0, |u| 2 + u.len()) + c.password.map_or(0, |p| 2 + p.len());
    let mut flags = 0u8;
    if c.clean {
        flags |= 0x02;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    buf.put_u8(kind::CONNECT << 4);
    put_varint(buf, len);
    put_str(buf, b"MQTT");
    buf.put_u8(c.version.level());
    buf.put_u8(flags);
    buf.put_u16(c.keepalive_secs);
    if v5 {
        put_varint(buf, props);
        if let Some(s) = c.session_expiry_secs {
            buf.put_u8(0x11);
            buf.put_u32(s);
        }
        if let Some(r) = c.receive_maximum {
            buf.put_u8(0x21);
            buf.put_u16(r);
        }
    }
    put_str(buf, c.client_id.as_bytes());
    if let Some(u) = c.username {
        put_str(buf, u.as_bytes());
    }
    if let Some(p) = c.password {
        put_str(buf, p.as_bytes());
    }
}

/// One PUBLISH whose payload is a [`Stamp`] padded with zeros to `payload_len` bytes
/// (at least [`STAMP_LEN`]). `pid` is ignored at QoS 0.
pub fn encode_publish(
    buf: &mut BytesMut,
    version: Version,
    topic: &[u8],
    qos: u8,
    pid: u16,
    stamp: Stamp,
    payload_len: usize,
) {
    let payload_len = payload_len.max(STAMP_LEN);
    let pid_len = if qos > 0 { 2 } else { 0 };
    let props_len = usize::from(version == Version::V5);
    let len = 2 + topic.len() + pid_len + props_len + payload_len;
    buf.reserve(5 + len);
    buf.put_u8(kind::PUBLISH << 4 | qos << 1);
    put_varint(buf, len);
    put_str(buf, topic);
    if qos > 0 {
        buf.put_u16(pid);
    }
    if version == Version::V5 {
        buf.put_u8(0);
    }
    buf.put_u32(STAMP_MAGIC);
    buf.put_u32(stamp.publisher);
    buf.put_u64(stamp.seq);
    buf.put_u64(stamp.sent_ns);
    buf.put_bytes(0, payload_len - STAMP_LEN);
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP with reason "success" (its short form in v5).
pub fn encode_ack(buf: &mut BytesMut, packet_kind: u8, pid: u16) {
    let flags = if packet_kind == kind::PUBREL { 0x02 } else { 0 };
    buf.put_u8(packet_kind << 4 | flags);
    buf.put_u8(2);
    buf.put_u16(pid);
}

pub fn encode_subscribe(buf: &mut BytesMut, version: Version, pid: u16, filter: &str, qos: u8) {
    let props_len = usize::from(version == Version::V5);
    buf.put_u8(kind::SUBSCRIBE << 4 | 0x02);
    put_varint(buf, 2 + props_len + 2 + filter.len() + 1);
    buf.put_u16(pid);
    if version == Version::V5 {
        buf.put_u8(0);
    }
    put_str(buf, filter.as_bytes());
    buf.put_u8(qos);
}

pub fn encode_pingreq(buf: &mut BytesMut) {
    buf.put_slice(&[kind::PINGREQ << 4, 0]);
}

/// DISCONNECT; in v5 `expire_session` adds Session Expiry Interval 0 (drop the session).
pub fn encode_disconnect(buf: &mut BytesMut, version: Version, expire_session: bool) {
    if version == Version::V5 && expire_session {
        buf.put_slice(&[kind::DISCONNECT << 4, 7, 0x00, 5, 0x11, 0, 0, 0, 0]);
    } else {
        buf.put_slice(&[kind::DISCONNECT << 4, 0]);
    }
}

/// Server side (the sink): CONNACK with `code`, no properties.
pub fn encode_connack(buf: &mut BytesMut, version: Version, code: u8) {
    match version {
        Version::V311 => buf.put_slice(&[kind::CONNACK << 4, 2, 0, code]),
        Version::V5 => buf.put_slice(&[kind::CONNACK << 4, 3, 0, code, 0]),
    }
}

/// Server side (the sink): SUBACK granting `codes`.
pub fn encode_suback(buf: &mut BytesMut, version: Version, pid: u16, codes: &[u8]) {
    let props_len = usize::from(version == Version::V5);
    buf.put_u8(kind::SUBACK << 4);
    put_varint(buf, 2 + props_len + codes.len());
    buf.put_u16(pid);
    if version == Version::V5 {
        buf.put_u8(0);
    }
    buf.put_slice(codes);
}

pub fn encode_pingresp(buf: &mut BytesMut) {
    buf.put_slice(&[kind::PINGRESP << 4, 0]);
}
