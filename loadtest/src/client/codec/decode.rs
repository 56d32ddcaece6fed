//! Decoders: each borrows one packet body found by [`super::frame`].

use super::{DecodeError, Stamp, Version, STAMP_MAGIC};

/// A cursor over a packet body.
struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated(self.what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn varint(&mut self) -> Result<usize, DecodeError> {
        let mut n = 0usize;
        for i in 0..4 {
            let b = self.u8()?;
            n |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(DecodeError::RemainingLength)
    }

    fn str(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    /// The v5 property block: its bytes, skipped as a whole.
    fn properties(&mut self) -> Result<Reader<'a>, DecodeError> {
        let n = self.varint()?;
        Ok(Reader::new(self.take(n)?, "properties"))
    }
}

/// Calls `f(id, reader)` for each property; `f` must consume the value it cares about and
/// return `false` for the ones it leaves to [`skip_property`].
fn each_property<'a, F>(mut props: Reader<'a>, mut f: F) -> Result<(), DecodeError>
where
    F: FnMut(u8, &mut Reader<'a>) -> Result<bool, DecodeError>,
{
    while !props.buf.is_empty() {
        let id = props.u8()?;
        if !f(id, &mut props)? {
            skip_property(id, &mut props)?;
        }
    }
    Ok(())
}

fn skip_property(id: u8, r: &mut Reader<'_>) -> Result<(), DecodeError> {
    let fixed = match id {
        0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => 1,
        0x13 | 0x21 | 0x22 | 0x23 => 2,
        0x02 | 0x11 | 0x18 | 0x27 => 4,
        0x0B => {
            r.varint()?;
            return Ok(());
        }
        0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => {
            r.str()?;
            return Ok(());
        }
        0x26 => {
            r.str()?;
            r.str()?;
            return Ok(());
        }
        other => return Err(DecodeError::Property(other)),
    };
    r.take(fixed)?;
    Ok(())
}

/// What a CONNACK says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    pub code: u8,
    pub receive_maximum: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub server_keepalive: Option<u16>,
    pub maximum_packet_size: Option<u32>,
    pub reason_string: Option<String>,
}

pub fn parse_connack(version: Version, body: &[u8]) -> Result<ConnAck, DecodeError> {
    let mut r = Reader::new(body, "connack");
    let mut ack = ConnAck {
        session_present: r.u8()? & 1 == 1,
        code: r.u8()?,
        ..ConnAck::default()
    };
    if version == Version::V5 && !r.buf.is_empty() {
        each_property(r.properties()?, |id, p| {
            match id {
                0x21 => ack.receive_maximum = Some(p.u16()?),
                0x24 => ack.maximum_qos = Some(p.u8()?),
                0x13 => ack.server_keepalive = Some(p.u16()?),
                0x27 => ack.maximum_packet_size = Some(p.u32()?),
                0x1F => ack.reason_string = Some(String::from_utf8_lossy(p.str()?).into_owned()),
                _ => return Ok(false),
            }
            Ok(true)
        })?;
    }
    Ok(ack)
}

/// A PUBLISH, borrowed from the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish<'a> {
    pub qos: u8,
    pub dup: bool,
    pub retain: bool,
    pub topic: &'a [u8],
    pub pid: u16,
    pub payload: &'a [u8],
}

pub fn parse_publish(version: Version, flags: u8, body: &[u8]) -> Result<Publish<'_>, DecodeError> {
    let mut r = Reader::new(body, "publish");
    let qos = (flags >> 1) & 3;
    let topic = r.str()?;
    let pid = if qos > 0 { r.u16()? } else { 0 };
    if version == Version::V5 {
        r.properties()?;
    }
    Ok(Publish {
        qos,
        dup: flags & 0x08 != 0,
        retain: flags & 1 != 0,
        topic,
        pid,
        payload: r.buf,
    })
}

/// The send stamp of a benchmark payload; `None` for a payload this tool did not write.
pub fn parse_stamp(payload: &[u8]) -> Option<Stamp> {
    let mut r = Reader::new(payload, "stamp");
    if r.u32().ok()? != STAMP_MAGIC {
        return None;
    }
    let publisher = r.u32().ok()?;
    let seq = u64::from_be_bytes(r.take(8).ok()?.try_into().ok()?);
    let sent_ns = u64::from_be_bytes(r.take(8).ok()?.try_into().ok()?);
    Some(Stamp {
        publisher,
        seq,
        sent_ns,
    })
}

/// PUBACK / PUBREC / PUBREL / PUBCOMP: packet id and reason code (0 when omitted).
pub fn parse_ack(body: &[u8]) -> Result<(u16, u8), DecodeError> {
    let mut r = Reader::new(body, "ack");
    let pid = r.u16()?;
    let code = if r.buf.is_empty() { 0 } else { r.u8()? };
    Ok((pid, code))
}

/// SUBACK: packet id and the return codes.
pub fn parse_suback(version: Version, body: &[u8]) -> Result<(u16, &[u8]), DecodeError> {
    let mut r = Reader::new(body, "suback");
    let pid = r.u16()?;
    if version == Version::V5 {
        r.properties()?;
    }
    Ok((pid, r.buf))
}

/// DISCONNECT from the server: its reason code (v5; 0 when omitted) and reason string.
pub fn parse_disconnect(
    version: Version,
    body: &[u8],
) -> Result<(u8, Option<String>), DecodeError> {
    let mut r = Reader::new(body, "disconnect");
    if version == Version::V311 || r.buf.is_empty() {
        return Ok((0, None));
    }
    let code = r.u8()?;
    let mut reason = None;
    if !r.buf.is_empty() {
        each_property(r.properties()?, |id, p| {
            if id == 0x1F {
                reason = Some(String::from_utf8_lossy(p.str()?).into_owned());
                return Ok(true);
            }
            Ok(false)
        })?;
    }
    Ok((code, reason))
}

/// Server side (the sink): the protocol version of a CONNECT.
pub fn parse_connect_version(body: &[u8]) -> Result<Version, DecodeError> {
    let mut r = Reader::new(body, "connect");
    r.str()?;
    match r.u8()? {
        3 | 4 => Ok(Version::V311),
        5 => Ok(Version::V5),
        other => Err(DecodeError::ProtocolLevel(other)),
    }
}

/// Server side (the sink): packet id and the requested QoS of each filter, into `qos`.
pub fn parse_subscribe(
    version: Version,
    body: &[u8],
    qos: &mut Vec<u8>,
) -> Result<u16, DecodeError> {
    let mut r = Reader::new(body, "subscribe");
    let pid = r.u16()?;
    if version == Version::V5 {
        r.properties()?;
    }
    qos.clear();
    while !r.buf.is_empty() {
        r.str()?;
        qos.push(r.u8()? & 3);
    }
    Ok(pid)
}
