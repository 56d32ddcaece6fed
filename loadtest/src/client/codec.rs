//! A lean MQTT 3.1.1 / 5.0 wire codec: only what a load generator (and the `sink`) needs.
//!
//! Independent of the broker's codec on purpose, so the benchmark checks the broker from the
//! outside. Encoders append to a caller-owned `BytesMut` (no allocation once it has grown);
//! the decoder works on a read buffer: [`frame`] finds one complete packet, the `parse_*`
//! functions borrow its body.

/// Packet types (the high nibble of the first byte).
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
    pub const PINGREQ: u8 = 12;
    pub const PINGRESP: u8 = 13;
    pub const DISCONNECT: u8 = 14;
}

/// Largest remaining length the decoder accepts (the protocol's own limit).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Bytes of the header every benchmark payload starts with: magic, publisher, sequence, stamp.
pub const STAMP_LEN: usize = 24;
const STAMP_MAGIC: u32 = 0x5042_0001; // "PB" v1

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

impl Version {
    pub fn level(self) -> u8 {
        match self {
            Version::V311 => 4,
            Version::V5 => 5,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed remaining length")]
    RemainingLength,
    #[error("packet of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("unknown property 0x{0:02x}")]
    Property(u8),
    #[error("unsupported protocol level {0}")]
    ProtocolLevel(u8),
}

/// The fixed header of one complete packet at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub header_len: usize,
    pub body_len: usize,
}

impl Frame {
    pub fn packet_len(&self) -> usize {
        self.header_len + self.body_len
    }

    pub fn body<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.header_len..self.packet_len()]
    }
}

/// The complete packet at the start of `buf`, or `None` while more bytes are needed.
pub fn frame(buf: &[u8], max_len: usize) -> Result<Option<Frame>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if len > max_len {
                return Err(DecodeError::TooLarge(len));
            }
            let f = Frame {
                kind: first >> 4,
                flags: first & 0x0f,
                header_len: 2 + i,
                body_len: len,
            };
            return Ok((buf.len() >= f.packet_len()).then_some(f));
        }
    }
    Err(DecodeError::RemainingLength)
}

/// The send stamp at the start of every benchmark payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub publisher: u32,
    pub seq: u64,
    pub sent_ns: u64,
}

mod decode;
mod encode;

pub use decode::*;
pub use encode::*;

#[cfg(test)]
#[path = "codec_test.rs"]
mod tests;
