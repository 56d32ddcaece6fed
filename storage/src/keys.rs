//! Column families and key layout.
//!
//! Keys that belong to one client start with the client id and a 0 byte (MQTT strings never
//! contain U+0000), so everything of a client is one prefix and can be deleted as a range.

/// The column families of the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cf {
    /// Store-wide metadata: the format version.
    Meta,
    /// client id -> session record.
    Sessions,
    /// client id, 0, filter -> subscription record.
    Subscriptions,
    /// client id, 0, sequence (u64 big-endian) -> queued or in-flight message.
    Queue,
    /// client id, 0, sequence -> packet id and stage of an outbound QoS 2 message.
    Inflight,
    /// client id, 0, packet id (u16 big-endian) -> empty: inbound QoS 2 awaiting PUBREL.
    Inbound,
    /// topic -> retained message.
    Retained,
    /// client id -> pending delayed will.
    Wills,
    /// Raft log: index (u64 big-endian) -> entry.
    RaftLog,
    /// Raft vote, committed and purged log ids, and the last snapshot.
    RaftState,
    /// peer node id (u64 big-endian), id (u64 big-endian) -> a forwarded message the peer
    /// has not acknowledged although its publisher was (the data plane's outbox).
    Outbox,
}

impl Cf {
    pub const ALL: [Cf; 11] = [
        Cf::Meta,
        Cf::Sessions,
        Cf::Subscriptions,
        Cf::Queue,
        Cf::Inflight,
        Cf::Inbound,
        Cf::Retained,
        Cf::Wills,
        Cf::RaftLog,
        Cf::RaftState,
        Cf::Outbox,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Cf::Meta => "meta",
            Cf::Sessions => "sessions",
            Cf::Subscriptions => "subscriptions",
            Cf::Queue => "queue",
            Cf::Inflight => "inflight_qos2",
            Cf::Inbound => "inbound_qos2",
            Cf::Retained => "retained",
            Cf::Wills => "wills",
            Cf::RaftLog => "raft_log",
            Cf::RaftState => "raft_state",
            Cf::Outbox => "forward_outbox",
        }
    }

    /// Column families whose keys start with a client id prefix.
    pub const PER_CLIENT: [Cf; 4] = [Cf::Subscriptions, Cf::Queue, Cf::Inflight, Cf::Inbound];
}

/// Key of a stored outbox entry: peer, then id, both big-endian (in order).
pub fn outbox_key(peer: u64, id: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&peer.to_be_bytes());
    k[8..].copy_from_slice(&id.to_be_bytes());
    k
}

/// (peer, id) of an outbox key.
pub fn parse_outbox_key(k: &[u8]) -> Option<(u64, u64)> {
    let k: &[u8; 16] = k.try_into().ok()?;
    let peer = u64::from_be_bytes(k[..8].try_into().ok()?);
    let id = u64::from_be_bytes(k[8..].try_into().ok()?);
    Some((peer, id))
}

/// Key of the format version in [`Cf::Meta`].
pub const FORMAT_VERSION_KEY: &[u8] = b"format_version";

/// `client_id 0`: the prefix of everything of one client in a per-client family.
pub fn client_prefix(client_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(client_id.len() + 1);
    k.extend_from_slice(client_id.as_bytes());
    k.push(0);
    k
}

/// The first key after every key with this client's prefix.
pub fn client_prefix_end(client_id: &str) -> Vec<u8> {
    let mut k = client_prefix(client_id);
    *k.last_mut().expect("prefix ends with 0") = 1;
    k
}

pub fn queue_key(client_id: &str, seq: u64) -> Vec<u8> {
    let mut k = client_prefix(client_id);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub fn subscription_key(client_id: &str, filter: &str) -> Vec<u8> {
    let mut k = client_prefix(client_id);
    k.extend_from_slice(filter.as_bytes());
    k
}

pub fn inbound_key(client_id: &str, packet_id: u16) -> Vec<u8> {
    let mut k = client_prefix(client_id);
    k.extend_from_slice(&packet_id.to_be_bytes());
    k
}

/// Splits a per-client key into the client id and the rest.
pub fn split_client_key(key: &[u8]) -> Option<(&str, &[u8])> {
    let at = key.iter().position(|&b| b == 0)?;
    let client = std::str::from_utf8(&key[..at]).ok()?;
    Some((client, &key[at + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_bound_a_client() {
        let a = queue_key("dev", 7);
        assert!(a.as_slice() > client_prefix("dev").as_slice());
        assert!(a.as_slice() < client_prefix_end("dev").as_slice());
        // "dev2" sorts outside the range of "dev".
        assert!(queue_key("dev2", 0).as_slice() > client_prefix_end("dev").as_slice());
        assert_eq!(split_client_key(&a), Some(("dev", &7u64.to_be_bytes()[..])));
        assert!(
            queue_key("dev", 1) < queue_key("dev", 256),
            "sequence order is key order"
        );
    }
}
