//! v5 property identifiers and the typed reader used by the decoder.

use bytes::Bytes;

use super::decode::Reader;
use super::error::DecodeError;
use super::types::MqttStr;

pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
pub const CONTENT_TYPE: u8 = 0x03;
pub const RESPONSE_TOPIC: u8 = 0x08;
pub const CORRELATION_DATA: u8 = 0x09;
pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
pub const SERVER_KEEP_ALIVE: u8 = 0x13;
pub const AUTHENTICATION_METHOD: u8 = 0x15;
pub const AUTHENTICATION_DATA: u8 = 0x16;
pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
pub const WILL_DELAY_INTERVAL: u8 = 0x18;
pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
pub const RESPONSE_INFORMATION: u8 = 0x1A;
pub const SERVER_REFERENCE: u8 = 0x1C;
pub const REASON_STRING: u8 = 0x1F;
pub const RECEIVE_MAXIMUM: u8 = 0x21;
pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
pub const TOPIC_ALIAS: u8 = 0x23;
pub const MAXIMUM_QOS: u8 = 0x24;
pub const RETAIN_AVAILABLE: u8 = 0x25;
pub const USER_PROPERTY: u8 = 0x26;
pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;

/// The largest value a variable byte integer can hold.
pub const MAX_VARINT: u32 = 268_435_455;

/// A decoded property value, typed by its identifier.
#[derive(Debug)]
pub enum Value {
    Byte(u8),
    U16(u16),
    U32(u32),
    VarInt(u32),
    Str(MqttStr),
    Bin(Bytes),
    Pair(MqttStr, MqttStr),
}

impl Value {
    pub fn byte(self) -> u8 {
        match self {
            Value::Byte(v) => v,
            _ => unreachable!("property typed as byte"),
        }
    }
    pub fn bool(self) -> Result<bool, DecodeError> {
        match self.byte() {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Protocol("boolean property is not 0 or 1")),
        }
    }
    pub fn u16(self) -> u16 {
        match self {
            Value::U16(v) => v,
            _ => unreachable!("property typed as u16"),
        }
    }
    pub fn u32(self) -> u32 {
        match self {
            Value::U32(v) | Value::VarInt(v) => v,
            _ => unreachable!("property typed as u32"),
        }
    }
    pub fn str(self) -> MqttStr {
        match self {
            Value::Str(v) => v,
            _ => unreachable!("property typed as string"),
        }
    }
    pub fn bin(self) -> Bytes {
        match self {
            Value::Bin(v) => v,
            _ => unreachable!("property typed as binary"),
        }
    }
    pub fn pair(self) -> (MqttStr, MqttStr) {
        match self {
            Value::Pair(k, v) => (k, v),
            _ => unreachable!("property typed as pair"),
        }
    }
}

fn read_value(id: u8, r: &mut Reader) -> Result<Value, DecodeError> {
    Ok(match id {
        PAYLOAD_FORMAT_INDICATOR
        | REQUEST_PROBLEM_INFORMATION
        | REQUEST_RESPONSE_INFORMATION
        | MAXIMUM_QOS
        | RETAIN_AVAILABLE
        | WILDCARD_SUBSCRIPTION_AVAILABLE
        | SUBSCRIPTION_IDENTIFIER_AVAILABLE
        | SHARED_SUBSCRIPTION_AVAILABLE => Value::Byte(r.u8()?),
        SERVER_KEEP_ALIVE | RECEIVE_MAXIMUM | TOPIC_ALIAS_MAXIMUM | TOPIC_ALIAS => {
            Value::U16(r.u16()?)
        }
        MESSAGE_EXPIRY_INTERVAL
        | SESSION_EXPIRY_INTERVAL
        | WILL_DELAY_INTERVAL
        | MAXIMUM_PACKET_SIZE => Value::U32(r.u32()?),
        SUBSCRIPTION_IDENTIFIER => Value::VarInt(r.varint()?),
        CONTENT_TYPE
        | RESPONSE_TOPIC
        | ASSIGNED_CLIENT_IDENTIFIER
        | AUTHENTICATION_METHOD
        | RESPONSE_INFORMATION
        | SERVER_REFERENCE
        | REASON_STRING => Value::Str(r.str()?),
        CORRELATION_DATA | AUTHENTICATION_DATA => Value::Bin(r.bin()?),
        USER_PROPERTY => {
            let k = r.str()?;
            let v = r.str()?;
            Value::Pair(k, v)
        }
        _ => return Err(DecodeError::Malformed("unknown property identifier")),
    })
}

/// Reads a property block (length prefix included) and hands each property to `f`.
/// `f` returns `Ok(false)` for an identifier the packet does not allow.
pub fn read_properties<F>(r: &mut Reader, mut f: F) -> Result<(), DecodeError>
where
    F: FnMut(u8, Value) -> Result<bool, DecodeError>,
{
    let len = r.varint()? as usize;
    let mut block = r.sub(len)?;
    while !block.is_empty() {
        let id = block.varint()?;
        let id =
            u8::try_from(id).map_err(|_| DecodeError::Malformed("unknown property identifier"))?;
        let value = read_value(id, &mut block)?;
        if !f(id, value)? {
            return Err(DecodeError::Malformed(
                "property not allowed in this packet",
            ));
        }
    }
    Ok(())
}

/// Sets an optional property once; a second occurrence is a protocol error.
pub fn set_once<T>(slot: &mut Option<T>, v: T) -> Result<bool, DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::Protocol("property included more than once"));
    }
    *slot = Some(v);
    Ok(true)
}
