//! Why a connection ends, and the one table from that to a reason code and a metric label.

use crate::codec::{DecodeError, ReasonCode};

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("{0}")]
    Decode(#[from] DecodeError),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("second CONNECT on a connection")]
    SecondConnect,
    #[error("invalid topic alias")]
    TopicAliasInvalid,
    #[error("receive maximum exceeded")]
    ReceiveMaximumExceeded,
    #[error("qos not supported")]
    QosNotSupported,
    #[error("retain not supported")]
    RetainNotSupported,
    #[error("topic name invalid")]
    TopicNameInvalid,
    #[error("payload format invalid")]
    PayloadFormatInvalid,
    #[error("publish rate limit exceeded")]
    MessageRateTooHigh,
    #[error("keep alive timeout")]
    KeepAliveTimeout,
    #[error("session taken over")]
    TakenOver,
    #[error("server shutting down")]
    ShuttingDown,
    #[error("closed by an administrator")]
    Administrative { discard: bool },
    #[error("the server's message store failed")]
    StoreFailed,
    #[error("connection closed in the middle of a packet")]
    Truncated,
    #[error("connection closed by peer")]
    PeerClosed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl ConnError {
    /// The v5 DISCONNECT reason code to send, if one is sent at all.
    pub fn reason_code(&self) -> Option<ReasonCode> {
        Some(match self {
            ConnError::Decode(e) => e.reason_code(),
            ConnError::Protocol(_) | ConnError::SecondConnect => ReasonCode::PROTOCOL_ERROR,
            ConnError::TopicAliasInvalid => ReasonCode::TOPIC_ALIAS_INVALID,
            ConnError::ReceiveMaximumExceeded => ReasonCode::RECEIVE_MAXIMUM_EXCEEDED,
            ConnError::QosNotSupported => ReasonCode::QOS_NOT_SUPPORTED,
            ConnError::RetainNotSupported => ReasonCode::RETAIN_NOT_SUPPORTED,
            ConnError::TopicNameInvalid => ReasonCode::TOPIC_NAME_INVALID,
            ConnError::PayloadFormatInvalid => ReasonCode::PAYLOAD_FORMAT_INVALID,
            ConnError::MessageRateTooHigh => ReasonCode::MESSAGE_RATE_TOO_HIGH,
            ConnError::KeepAliveTimeout => ReasonCode::KEEP_ALIVE_TIMEOUT,
            ConnError::TakenOver => ReasonCode::SESSION_TAKEN_OVER,
            ConnError::ShuttingDown => ReasonCode::SERVER_SHUTTING_DOWN,
            ConnError::Administrative { .. } => ReasonCode::ADMINISTRATIVE_ACTION,
            // Not 0x83 (the packet is valid but this implementation cannot process it): the
            // packets were fine, the server failed.
            ConnError::StoreFailed => ReasonCode::UNSPECIFIED_ERROR,
            ConnError::PeerClosed | ConnError::Truncated | ConnError::Io(_) => return None,
        })
    }

    /// Label for `petrel_mqtt_bad_packets_total`, when the client sent something wrong.
    pub fn bad_packet_label(&self) -> Option<&'static str> {
        Some(match self {
            ConnError::Decode(e) => e.metric_label(),
            ConnError::Protocol(_) => "protocol",
            ConnError::SecondConnect => "second_connect",
            ConnError::TopicAliasInvalid => "topic_alias",
            ConnError::ReceiveMaximumExceeded => "receive_maximum",
            ConnError::QosNotSupported => "qos",
            ConnError::RetainNotSupported => "retain",
            ConnError::TopicNameInvalid => "topic_name",
            ConnError::PayloadFormatInvalid => "payload_format",
            ConnError::Truncated => "truncated",
            _ => return None,
        })
    }

    /// Label for `petrel_mqtt_connections_closed_total`.
    pub fn close_label(&self) -> &'static str {
        match self {
            ConnError::PeerClosed | ConnError::Truncated => "client_closed",
            ConnError::KeepAliveTimeout => "keepalive_timeout",
            ConnError::TakenOver => "taken_over",
            ConnError::Administrative { .. } => "admin",
            ConnError::ShuttingDown => "shutdown",
            ConnError::StoreFailed => "store_failed",
            ConnError::Io(_) => "io_error",
            _ => "protocol_error",
        }
    }

    pub fn reason_string(&self) -> String {
        self.to_string()
    }
}
