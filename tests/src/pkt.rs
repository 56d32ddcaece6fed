//! Hand-made MQTT packets, for what a client library will not send.
//!
//! Builders return complete frames (fixed header included). Property blocks are raw bytes
//! built with [`prop`] and wrapped by [`props`].

/// Packet types (upper nibble of the first byte).
pub mod kind {
    pub const CONNECT: u8 = 1;
    pub const CONNACK: u8 = 2;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const PUBREC: u8 = 5;
    pub const PUBREL: u8 = 6;
    pub const PUBCOMP: u8 = 7;
    pub const SUBSCRIBE: u8 = 8;
    pub const SUBACK: u8 = 9;
    pub const UNSUBSCRIBE: u8 = 10;
    pub const UNSUBACK: u8 = 11;
    pub const PINGREQ: u8 = 12;
    pub const PINGRESP: u8 = 13;
    pub const DISCONNECT: u8 = 14;
    pub const AUTH: u8 = 15;
}

/// Variable byte integer (remaining length, property lengths, subscription ids).
pub fn varint(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}

/// Decodes a variable byte integer: (value, bytes used).
pub fn read_varint(b: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    let mut mult = 1usize;
    for (i, &byte) in b.iter().enumerate().take(4) {
        value += (byte & 0x7f) as usize * mult;
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
        mult *= 128;
    }
    None
}

/// First byte + remaining length + body.
pub fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    out.extend(varint(body.len()));
    out.extend_from_slice(body);
    out
}

/// Two-byte length prefix + bytes.
pub fn bin(b: &[u8]) -> Vec<u8> {
    let mut out = (b.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(b);
    out
}

/// UTF-8 string with its length prefix.
pub fn string(s: &str) -> Vec<u8> {
    bin(s.as_bytes())
}

/// Single properties (identifier + value).
pub mod prop {
    use super::{bin, string, varint};

    pub fn byte(id: u8, v: u8) -> Vec<u8> {
        vec![id, v]
    }
    pub fn u16(id: u8, v: u16) -> Vec<u8> {
        let mut out = vec![id];
        out.extend(v.to_be_bytes());
        out
    }
    pub fn u32(id: u8, v: u32) -> Vec<u8> {
        let mut out = vec![id];
        out.extend(v.to_be_bytes());
        out
    }
    pub fn var(id: u8, v: usize) -> Vec<u8> {
        let mut out = vec![id];
        out.extend(varint(v));
        out
    }
    pub fn str(id: u8, s: &str) -> Vec<u8> {
        let mut out = vec![id];
        out.extend(string(s));
        out
    }
    pub fn data(id: u8, b: &[u8]) -> Vec<u8> {
        let mut out = vec![id];
        out.extend(bin(b));
        out
    }
    pub fn user(k: &str, v: &str) -> Vec<u8> {
        let mut out = vec![0x26];
        out.extend(string(k));
        out.extend(string(v));
        out
    }

    pub const PAYLOAD_FORMAT: u8 = 0x01;
    pub const MESSAGE_EXPIRY: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_ID: u8 = 0x0B;
    pub const SESSION_EXPIRY: u8 = 0x11;
    pub const ASSIGNED_CLIENT_ID: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const REQUEST_PROBLEM_INFO: u8 = 0x17;
    pub const WILL_DELAY: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFO: u8 = 0x19;
    pub const RESPONSE_INFO: u8 = 0x1A;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
}

/// A property block: length + concatenated properties.
pub fn props(list: &[Vec<u8>]) -> Vec<u8> {
    let body: Vec<u8> = list.concat();
    let mut out = varint(body.len());
    out.extend(body);
    out
}

/// A parsed property value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PropValue {
    Byte(u8),
    U16(u16),
    U32(u32),
    Var(usize),
    Str(String),
    Data(Vec<u8>),
    Pair(String, String),
}

/// Parses a property block body (without its length) into (id, value) pairs.
pub fn parse_props(mut b: &[u8]) -> Result<Vec<(u8, PropValue)>, String> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if b.len() < n {
            return Err(format!("property truncated: need {n}, have {}", b.len()));
        }
        let (h, t) = b.split_at(n);
        *b = t;
        Ok(h)
    }
    fn take_bin(b: &mut &[u8]) -> Result<Vec<u8>, String> {
        let len = take(b, 2)?;
        let len = u16::from_be_bytes([len[0], len[1]]) as usize;
        Ok(take(b, len)?.to_vec())
    }
    fn take_str(b: &mut &[u8]) -> Result<String, String> {
        String::from_utf8(take_bin(b)?).map_err(|e| e.to_string())
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let id = take(&mut b, 1)?[0];
        let v = match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => {
                PropValue::Byte(take(&mut b, 1)?[0])
            }
            0x13 | 0x21 | 0x22 | 0x23 => {
                let x = take(&mut b, 2)?;
                PropValue::U16(u16::from_be_bytes([x[0], x[1]]))
            }
            0x02 | 0x11 | 0x18 | 0x27 => {
                let x = take(&mut b, 4)?;
                PropValue::U32(u32::from_be_bytes([x[0], x[1], x[2], x[3]]))
            }
            0x0B => {
                let (v, n) = read_varint(b).ok_or("bad subscription identifier")?;
                b = &b[n..];
                PropValue::Var(v)
            }
            0x03 | 0x08 | 0x12 | 0x15 | 0x1A | 0x1C | 0x1F => PropValue::Str(take_str(&mut b)?),
            0x09 | 0x16 => PropValue::Data(take_bin(&mut b)?),
            0x26 => {
                let k = take_str(&mut b)?;
                let v = take_str(&mut b)?;
                PropValue::Pair(k, v)
            }
            other => return Err(format!("unknown property id {other:#04x}")),
        };
        out.push((id, v));
    }
    Ok(out)
}

/// A will message for [`Connect`].
#[derive(Debug, Clone)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    /// v5 will properties (raw, without the length prefix).
    pub properties: Vec<Vec<u8>>,
}

impl Will {
    pub fn new(topic: &str, payload: &[u8]) -> Will {
        Will {
            topic: topic.to_owned(),
            payload: payload.to_vec(),
            qos: 0,
            retain: false,
            properties: Vec::new(),
        }
    }
}

/// A CONNECT packet.
#[derive(Debug, Clone)]
pub struct Connect {
    pub protocol_name: String,
    pub level: u8,
    pub client_id: String,
    pub clean: bool,
    pub keep_alive: u16,
    pub will: Option<Will>,
    /// v5 CONNECT properties (raw, without the length prefix).
    pub properties: Vec<Vec<u8>>,
    /// Sets the reserved bit 0 of the connect flags (must be 0).
    pub reserved_flag: bool,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
}

impl Connect {
    /// MQTT 3.1.1 (level 4), clean session, keepalive 60.
    pub fn v311(client_id: &str) -> Connect {
        Connect {
            protocol_name: "MQTT".into(),
            level: 4,
            client_id: client_id.into(),
            clean: true,
            keep_alive: 60,
            will: None,
            properties: Vec::new(),
            reserved_flag: false,
            username: None,
            password: None,
        }
    }

    /// MQTT 3.1 ("MQIsdp", level 3).
    pub fn v31(client_id: &str) -> Connect {
        Connect {
            protocol_name: "MQIsdp".into(),
            level: 3,
            ..Connect::v311(client_id)
        }
    }

    /// MQTT 5 (level 5), clean start, keepalive 60.
    pub fn v5(client_id: &str) -> Connect {
        Connect {
            level: 5,
            ..Connect::v311(client_id)
        }
    }

    pub fn keep_alive(mut self, secs: u16) -> Connect {
        self.keep_alive = secs;
        self
    }

    pub fn clean(mut self, clean: bool) -> Connect {
        self.clean = clean;
        self
    }

    pub fn will(mut self, will: Will) -> Connect {
        self.will = Some(will);
        self
    }

    pub fn property(mut self, p: Vec<u8>) -> Connect {
        self.properties.push(p);
        self
    }

    /// Sets a username and password.
    pub fn login(mut self, username: &str, password: &[u8]) -> Connect {
        self.username = Some(username.to_owned());
        self.password = Some(password.to_vec());
        self
    }

    pub fn encode(&self) -> Vec<u8> {
        let v5 = self.level == 5;
        let mut body = string(&self.protocol_name);
        body.push(self.level);
        let mut flags = 0u8;
        if self.clean {
            flags |= 0x02;
        }
        if let Some(w) = &self.will {
            flags |= 0x04 | (w.qos << 3);
            if w.retain {
                flags |= 0x20;
            }
        }
        if self.reserved_flag {
            flags |= 0x01;
        }
        if self.username.is_some() {
            flags |= 0x80;
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        body.push(flags);
        body.extend(self.keep_alive.to_be_bytes());
        if v5 {
            body.extend(props(&self.properties));
        }
        body.extend(string(&self.client_id));
        if let Some(w) = &self.will {
            if v5 {
                body.extend(props(&w.properties));
            }
            body.extend(string(&w.topic));
            body.extend(bin(&w.payload));
        }
        if let Some(u) = &self.username {
            body.extend(string(u));
        }
        if let Some(p) = &self.password {
            body.extend(bin(p));
        }
        frame(0x10, &body)
    }
}

/// A PUBLISH. `v5` adds the property block (`properties` raw, without length prefix).
#[allow(clippy::too_many_arguments)]
pub fn publish(
    v5: bool,
    topic: &str,
    payload: &[u8],
    qos: u8,
    pkid: u16,
    retain: bool,
    dup: bool,
    properties: &[Vec<u8>],
) -> Vec<u8> {
    publish_raw_topic(
        v5,
        topic.as_bytes(),
        payload,
        qos,
        pkid,
        retain,
        dup,
        properties,
    )
}

/// A PUBLISH whose topic bytes are given as-is (for invalid UTF-8).
#[allow(clippy::too_many_arguments)]
pub fn publish_raw_topic(
    v5: bool,
    topic: &[u8],
    payload: &[u8],
    qos: u8,
    pkid: u16,
    retain: bool,
    dup: bool,
    properties: &[Vec<u8>],
) -> Vec<u8> {
    let mut first = 0x30 | (qos << 1);
    if retain {
        first |= 0x01;
    }
    if dup {
        first |= 0x08;
    }
    let mut body = bin(topic);
    if qos > 0 {
        body.extend(pkid.to_be_bytes());
    }
    if v5 {
        body.extend(props(properties));
    }
    body.extend_from_slice(payload);
    frame(first, &body)
}

/// A SUBSCRIBE with (filter, options byte) pairs; `v5` adds `properties`.
pub fn subscribe(v5: bool, pkid: u16, filters: &[(&str, u8)], properties: &[Vec<u8>]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if v5 {
        body.extend(props(properties));
    }
    for (f, opts) in filters {
        body.extend(string(f));
        body.push(*opts);
    }
    frame(0x82, &body)
}

/// PUBACK / PUBREC / PUBCOMP (two-byte form, success) and PUBREL (flags 0b0010).
pub fn puback(pkid: u16) -> Vec<u8> {
    frame(0x40, &pkid.to_be_bytes())
}
pub fn pubrec(pkid: u16) -> Vec<u8> {
    frame(0x50, &pkid.to_be_bytes())
}
pub fn pubrel(pkid: u16) -> Vec<u8> {
    frame(0x62, &pkid.to_be_bytes())
}
pub fn pubcomp(pkid: u16) -> Vec<u8> {
    frame(0x70, &pkid.to_be_bytes())
}

pub fn pingreq() -> Vec<u8> {
    vec![0xC0, 0x00]
}

/// 3.x DISCONNECT.
pub fn disconnect() -> Vec<u8> {
    vec![0xE0, 0x00]
}

/// v5 DISCONNECT with a reason code and properties.
pub fn disconnect_v5(reason: u8, properties: &[Vec<u8>]) -> Vec<u8> {
    let mut body = vec![reason];
    body.extend(props(properties));
    frame(0xE0, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_round_trips() {
        for n in [
            0usize,
            1,
            127,
            128,
            16_383,
            16_384,
            2_097_151,
            2_097_152,
            268_435_455,
        ] {
            let b = varint(n);
            assert_eq!(read_varint(&b), Some((n, b.len())), "{n}");
        }
        assert_eq!(varint(321), vec![0xC1, 0x02]);
    }

    #[test]
    fn connect_v311_bytes() {
        let c = Connect::v311("ab").keep_alive(10).encode();
        assert_eq!(
            c,
            vec![0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 10, 0, 2, b'a', b'b']
        );
    }

    #[test]
    fn parses_props() {
        let block = [
            prop::u32(0x11, 5),
            prop::user("k", "v"),
            prop::var(0x0B, 300),
        ]
        .concat();
        let parsed = parse_props(&block).unwrap();
        assert_eq!(
            parsed,
            vec![
                (0x11, PropValue::U32(5)),
                (0x26, PropValue::Pair("k".into(), "v".into())),
                (0x0B, PropValue::Var(300)),
            ]
        );
    }
}
