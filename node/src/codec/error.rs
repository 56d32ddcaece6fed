//! Codec errors, and the one table that maps a decode failure to the reason code the client
//! is told.

use super::types::ReasonCode;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed remaining length")]
    MalformedRemainingLength,
    #[error("packet of {size} bytes exceeds the maximum packet size of {max}")]
    PacketTooLarge { size: usize, max: u32 },
    #[error("reserved packet type {0}")]
    ReservedPacketType(u8),
    #[error("invalid fixed header flags {flags:#06b} for packet type {kind}")]
    InvalidFlags { kind: u8, flags: u8 },
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("invalid UTF-8 string")]
    InvalidUtf8,
    #[error("invalid topic name")]
    InvalidTopicName,
    #[error("unsupported protocol name or level {level}")]
    UnsupportedProtocol { level: u8 },
}

impl DecodeError {
    /// The reason code a v5 peer is sent (in CONNACK before the session, DISCONNECT after).
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            DecodeError::PacketTooLarge { .. } => ReasonCode::PACKET_TOO_LARGE,
            DecodeError::Protocol(_) => ReasonCode::PROTOCOL_ERROR,
            DecodeError::InvalidTopicName => ReasonCode::TOPIC_NAME_INVALID,
            DecodeError::UnsupportedProtocol { .. } => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            DecodeError::MalformedRemainingLength
            | DecodeError::ReservedPacketType(_)
            | DecodeError::InvalidFlags { .. }
            | DecodeError::Malformed(_)
            | DecodeError::InvalidUtf8 => ReasonCode::MALFORMED_PACKET,
        }
    }

    /// Label for the `petrel_mqtt_bad_packets_total{reason}` metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            DecodeError::MalformedRemainingLength => "remaining_length",
            DecodeError::PacketTooLarge { .. } => "too_large",
            DecodeError::ReservedPacketType(_) => "packet_type",
            DecodeError::InvalidFlags { .. } => "flags",
            DecodeError::Malformed(_) => "malformed",
            DecodeError::Protocol(_) => "protocol",
            DecodeError::InvalidUtf8 => "utf8",
            DecodeError::InvalidTopicName => "topic_name",
            DecodeError::UnsupportedProtocol { .. } => "protocol_version",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("packet body of {0} bytes exceeds the MQTT limit")]
    TooLarge(usize),
    #[error("publish at qos > 0 without a packet id")]
    MissingPacketId,
    #[error("{0} cannot be sent with this protocol level")]
    NotInProtocol(&'static str),
}
