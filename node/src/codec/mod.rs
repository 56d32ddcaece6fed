//! MQTT 3.1, 3.1.1 and 5.0 wire format.
//!
//! - [`types`]: QoS, protocol level, validated strings ([`MqttStr`]), packet ids, reason codes.
//! - [`packet`]: one struct per control packet, with the v5 properties of each.
//! - [`decode`]: strict, incremental decoding from a read buffer.
//! - [`encode`]: encoding into a write buffer, including the allocation-free
//!   [`PublishOut`] used on the delivery hot path.
//! - [`error`]: [`DecodeError`] and its mapping to reason codes (the one place that does it).
//!
//! The decoder never panics on any input (proptest and a cargo-fuzz target call
//! [`fuzz_logic`]); every packet it accepts re-encodes to bytes that decode to the same packet.

pub mod decode;
pub mod encode;
pub mod error;
pub mod packet;
pub mod property;
pub mod types;

#[cfg(test)]
mod codec_test;

pub use decode::{decode_packet, read_remaining_length};
pub use encode::{encode_packet, PublishOut};
pub use error::{DecodeError, EncodeError};
pub use packet::*;
pub use types::{MqttStr, PacketId, Protocol, QoS, ReasonCode};

/// Entry point for the fuzzer: decodes arbitrary bytes as every protocol level and checks that
/// whatever decodes re-encodes to an equal packet. Panics only if that invariant breaks.
pub fn fuzz_logic(data: &[u8]) {
    for protocol in [Protocol::V3_1, Protocol::V3_1_1, Protocol::V5] {
        let mut buf = bytes::BytesMut::from(data);
        while let Ok(Some(packet)) = decode_packet(&mut buf, protocol, u32::MAX) {
            let mut out = bytes::BytesMut::new();
            if encode_packet(&packet, protocol, &mut out).is_ok() {
                let again = decode_packet(&mut out, protocol, u32::MAX)
                    .expect("re-encoded packet decodes")
                    .expect("re-encoded packet is complete");
                assert_eq!(packet, again, "round trip changed the packet");
                assert!(out.is_empty(), "re-encoded packet left trailing bytes");
            }
        }
    }
}
