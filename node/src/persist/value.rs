//! Encodings of stored values. Every value starts with a version byte.
//!
//! Instants become milliseconds since the Unix epoch on the way out and back on the way in,
//! so message expiry and session expiry keep counting across a restart.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::codec::decode::decode_frame;
use crate::codec::decode::MAX_REMAINING_LENGTH;
use crate::codec::encode::varint_len;
use crate::codec::{EncodeError, Packet, PacketId, Protocol, PublishOut, QoS, SubscriptionOptions};
use crate::message::Message;
use crate::session::{Delivery, SessionId, Stage, SubIds};

const VERSION: u8 = 1;

/// How old [`Clock::cheap`]'s reading of the wall clock may get.
pub const WALL_RECHECK: Duration = Duration::from_millis(10);

/// A wall clock reading paired with the monotonic clock, to convert between the two.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub now: Instant,
    pub unix_ms: u64,
}

impl Clock {
    pub fn now() -> Clock {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Clock {
            now: Instant::now(),
            unix_ms,
        }
    }

    /// [`Clock::now`] from one reading of the monotonic clock: the wall clock's offset
    /// from it is read again when the last reading is [`WALL_RECHECK`] old, so a step of
    /// the wall clock shows within that. For the forwarding path, which stamps every
    /// message (the wall clock read each time was 2% of its CPU).
    pub fn cheap() -> Clock {
        static BASE: OnceLock<Instant> = OnceLock::new();
        // Unix time at `BASE` in µs, and when (ns after `BASE`) it was last read.
        static UNIX_US_AT_BASE: AtomicU64 = AtomicU64::new(0);
        static CHECKED_NS: AtomicU64 = AtomicU64::new(0);
        let base = *BASE.get_or_init(Instant::now);
        let now = Instant::now();
        let since = now.saturating_duration_since(base);
        let since_ns = since.as_nanos() as u64;
        // The check time first: a thread that sees a new one sees its offset too.
        let checked = CHECKED_NS.load(Ordering::Acquire);
        let mut at_base = UNIX_US_AT_BASE.load(Ordering::Relaxed);
        if at_base == 0 || since_ns.saturating_sub(checked) > WALL_RECHECK.as_nanos() as u64 {
            let unix_us = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(0);
            at_base = unix_us.saturating_sub(since.as_micros() as u64).max(1);
            UNIX_US_AT_BASE.store(at_base, Ordering::Relaxed);
            CHECKED_NS.store(since_ns, Ordering::Release);
        }
        Clock {
            now,
            unix_ms: (at_base + since.as_micros() as u64) / 1000,
        }
    }

    pub fn to_unix_ms(&self, t: Instant) -> u64 {
        match t.checked_duration_since(self.now) {
            Some(ahead) => self.unix_ms + ahead.as_millis() as u64,
            None => self
                .unix_ms
                .saturating_sub(self.now.duration_since(t).as_millis() as u64),
        }
    }

    /// [`Clock::to_unix_ms`] for a deadline: rounded up to the next millisecond, and by one
    /// more for the millisecond `unix_ms` was truncated to, so that a deadline stored this
    /// way never comes early after a restart (a delayed will once fired 0.14 ms before its
    /// delay).
    pub fn to_unix_ms_not_before(&self, t: Instant) -> u64 {
        match t.checked_duration_since(self.now) {
            Some(ahead) => {
                let partial = u64::from(ahead.subsec_nanos() % 1_000_000 != 0);
                self.unix_ms + ahead.as_millis() as u64 + partial + 1
            }
            None => self.to_unix_ms(t),
        }
    }

    pub fn to_instant(&self, unix_ms: u64) -> Instant {
        if unix_ms >= self.unix_ms {
            self.now + Duration::from_millis(unix_ms - self.unix_ms)
        } else {
            let back = Duration::from_millis(self.unix_ms - unix_ms);
            self.now.checked_sub(back).unwrap_or(self.now)
        }
    }
}

/// A message as delivered to one session: version, absolute expiry (0: none), then the
/// v5 PUBLISH with the granted QoS, retain flag and subscription identifiers.
///
/// Fails only when that PUBLISH would pass the MQTT size limit: a message that arrived just
/// under it can grow when stored (a 3.x PUBLISH gains a property length, a topic alias is
/// replaced by its topic, subscription identifiers are added). [`message_fits`] checks it
/// before anything is written.
pub fn message(
    msg: &Message,
    qos: QoS,
    retain: bool,
    sub_ids: &[u32],
    clock: &Clock,
) -> Result<Bytes, EncodeError> {
    queued(msg, qos, retain, sub_ids, false, clock)
}

/// [`message`] for a copy of a session's queue or in-flight window; `shared`: it went to
/// the session as a share group's chosen member ([`Delivery::shared`]), so that a session
/// recovered after a restart, or handed over to another node, still gives its
/// unacknowledged share copies to another member when it ends (MQTT 5, 4.8.2). The mark is
/// the stored PUBLISH's DUP flag, which a delivery never takes from the store and earlier
/// versions ignore; a QoS 0 PUBLISH may not carry it (its copies are not given on anyway).
pub fn queued(
    msg: &Message,
    qos: QoS,
    retain: bool,
    sub_ids: &[u32],
    shared: bool,
    clock: &Clock,
) -> Result<Bytes, EncodeError> {
    let mut out = stored_publish(msg, qos, retain, sub_ids);
    out.dup = shared && qos != QoS::AtMostOnce;
    let body = out.body_len(Protocol::V5);
    if body > MAX_REMAINING_LENGTH {
        // Refused before a buffer of that size is allocated.
        return Err(EncodeError::TooLarge(body));
    }
    // Exactly the length written: the encoder does not grow it.
    let len = HEADER + 1 + varint_len(body) + body;
    let mut buf = BytesMut::with_capacity(len);
    buf.put_u8(VERSION);
    buf.put_u64(
        msg.expires_at
            .map(|t| clock.to_unix_ms(t).max(1))
            .unwrap_or(0),
    );
    out.encode_sized(Protocol::V5, body, &mut buf)?;
    debug_assert_eq!(buf.len(), len);
    // Frozen, not copied: a forwarded copy or a handed-over message shares it.
    Ok(buf.freeze())
}

/// Whether every stored copy of `msg` can be encoded by [`message`], at any granted QoS, for
/// subscription identifiers taking at most `sub_id_bytes` bytes of properties in all
/// ([`sub_id_len`] each).
pub fn message_fits(msg: &Message, sub_id_bytes: usize) -> bool {
    // The message's own QoS is the highest granted (a packet id is then present); the retain
    // flag costs nothing. With identifiers the property length may take up to 3 more bytes.
    let body = stored_publish(msg, msg.qos, msg.retain, &[]).body_len(Protocol::V5);
    let ids = if sub_id_bytes > 0 {
        sub_id_bytes + 3
    } else {
        0
    };
    body + ids <= MAX_REMAINING_LENGTH
}

/// Property bytes of one subscription identifier in a stored message.
pub fn sub_id_len(id: u32) -> usize {
    1 + varint_len(id as usize)
}

/// Version byte and absolute expiry in front of the stored PUBLISH.
const HEADER: usize = 9;

fn stored_publish<'a>(
    msg: &'a Message,
    qos: QoS,
    retain: bool,
    sub_ids: &'a [u32],
) -> PublishOut<'a> {
    PublishOut {
        dup: false,
        qos,
        retain,
        topic: &msg.topic,
        // A placeholder: the real packet id is assigned at delivery.
        packet_id: (qos != QoS::AtMostOnce).then(|| PacketId::new(1).expect("1 is not 0")),
        props: msg.props(),
        // The original interval rides along (a will's expiry starts when it is published);
        // deliveries use the absolute expiry in the header instead.
        message_expiry_interval: msg.props().message_expiry_interval,
        topic_alias: None,
        subscription_identifiers: sub_ids,
        payload: &msg.payload,
    }
}

/// Decodes [`message`] back into a delivery (seq 0; the caller sets it), in a buffer of its
/// own.
pub fn delivery(bytes: &[u8], clock: &Clock) -> Option<Delivery> {
    decode(Bytes::copy_from_slice(bytes), true, clock)
}

/// [`delivery`] from `bytes` without a copy: the message is a slice of them (of a forwarded
/// batch's receive buffer), and not `owned` (it is copied when it is kept past delivery,
/// as a message read from a client's connection is: [`Message::kept`]).
pub fn delivery_in(bytes: &Bytes, clock: &Clock) -> Option<Delivery> {
    decode(bytes.clone(), false, clock)
}

fn decode(mut b: Bytes, owned: bool, clock: &Clock) -> Option<Delivery> {
    if b.len() < HEADER || b.get_u8() != VERSION {
        return None;
    }
    let expires_ms = b.get_u64();
    let Ok(Packet::Publish(p)) = decode_frame(b, Protocol::V5) else {
        return None;
    };
    let mut ids = SubIds::None;
    for &id in &p.properties.subscription_identifiers {
        ids.push(id);
    }
    let (qos, retain) = (p.qos, p.retain);
    // The share mark of a queued copy ([`queued`]).
    let shared = p.dup && qos != QoS::AtMostOnce;
    let mut msg = Message::from_publish(p, SessionId::BROKER, || clock.now);
    msg.owned = owned;
    msg.expires_at = (expires_ms != 0).then(|| clock.to_instant(expires_ms));
    Some(Delivery {
        msg: Arc::new(msg),
        qos,
        retain,
        subscription_ids: ids,
        seq: 0,
        // Decided before the node stopped (the ACL may have changed since): checked again.
        acl_check: true,
        acl_gen: 0,
        shared,
    })
}

/// Session record: version, expiry interval, when it went offline (0: it was connected).
pub fn session(expiry: u32, disconnected_ms: u64, epoch: u64) -> [u8; 21] {
    let mut v = [0u8; 21];
    v[0] = VERSION;
    v[1..5].copy_from_slice(&expiry.to_be_bytes());
    v[5..13].copy_from_slice(&disconnected_ms.to_be_bytes());
    v[13..21].copy_from_slice(&epoch.to_be_bytes());
    v
}

/// (expiry, disconnected at, epoch); records of versions before the cluster have no epoch
/// (0).
pub fn parse_session(mut b: &[u8]) -> Option<(u32, u64, u64)> {
    if !(b.len() == 13 || b.len() == 21) || b.get_u8() != VERSION {
        return None;
    }
    let (expiry, disconnected) = (b.get_u32(), b.get_u64());
    let epoch = if b.is_empty() { 0 } else { b.get_u64() };
    Some((expiry, disconnected, epoch))
}

/// The v5 SUBSCRIBE options byte of `o`.
pub fn options_byte(o: &SubscriptionOptions) -> u8 {
    o.qos as u8
        | (o.no_local as u8) << 2
        | (o.retain_as_published as u8) << 3
        | (o.retain_handling as u8) << 4
}

/// Subscription options from a v5 SUBSCRIBE options byte.
pub fn options_from_byte(o: u8) -> Option<SubscriptionOptions> {
    use crate::codec::RetainHandling;
    Some(SubscriptionOptions {
        qos: QoS::from_u8(o & 3)?,
        no_local: o & 4 != 0,
        retain_as_published: o & 8 != 0,
        retain_handling: match (o >> 4) & 3 {
            0 => RetainHandling::SendAtSubscribe,
            1 => RetainHandling::SendIfNew,
            _ => RetainHandling::DoNotSend,
        },
    })
}

/// Subscription record: version, the v5 options byte, subscription identifier (0: none).
pub fn subscription(o: &SubscriptionOptions, id: Option<u32>) -> [u8; 6] {
    let mut v = [0u8; 6];
    v[0] = VERSION;
    v[1] = options_byte(o);
    v[2..6].copy_from_slice(&id.unwrap_or(0).to_be_bytes());
    v
}

pub fn parse_subscription(mut b: &[u8]) -> Option<(SubscriptionOptions, Option<u32>)> {
    if b.len() != 6 || b.get_u8() != VERSION {
        return None;
    }
    let options = options_from_byte(b.get_u8())?;
    let id = b.get_u32();
    Some((options, (id != 0).then_some(id)))
}

/// In-flight record of an outbound QoS 2 message: version, packet id, stage.
pub fn inflight(packet_id: u16, stage: Stage) -> [u8; 4] {
    let p = packet_id.to_be_bytes();
    [VERSION, p[0], p[1], matches!(stage, Stage::Released) as u8]
}

pub fn parse_inflight(mut b: &[u8]) -> Option<(PacketId, Stage)> {
    if b.len() != 4 || b.get_u8() != VERSION {
        return None;
    }
    let id = PacketId::new(b.get_u16())?;
    let stage = if b.get_u8() == 1 {
        Stage::Released
    } else {
        Stage::Published
    };
    Some((id, stage))
}

/// Record kind of an armed will (its client is connected): kept apart from [`VERSION`] so a
/// reader of either kind never mistakes the other for its own.
const ARMED_WILL: u8 = 2;

/// What the `wills` column family holds for a client id.
#[derive(Debug)]
pub enum StoredWill {
    /// The client went away; the will is published at `due` unless it comes back.
    Pending { msg: Message, due: Instant },
    /// The client was connected: if this is found at start, the node died under it, and the
    /// will is published after `delay_secs` (the v5 will delay, capped by the session expiry).
    /// `epoch`: of the connection's claim (absent in records of earlier versions).
    Armed {
        msg: Message,
        delay_secs: u32,
        epoch: Option<u64>,
    },
}

/// Armed will with the epoch of its connection's claim.
const ARMED_WILL_EPOCH: u8 = 3;

/// Armed will, written when the client connects: kind, will delay, the epoch of the
/// connection's claim, then the message.
pub fn armed_will(
    msg: &Message,
    delay_secs: u32,
    epoch: u64,
    clock: &Clock,
) -> Result<Vec<u8>, EncodeError> {
    let mut v = Vec::with_capacity(64 + msg.payload.len());
    v.push(ARMED_WILL_EPOCH);
    v.extend_from_slice(&delay_secs.to_be_bytes());
    v.extend_from_slice(&epoch.to_be_bytes());
    v.extend_from_slice(&message(msg, msg.qos, msg.retain, &[], clock)?);
    Ok(v)
}

/// Reads either kind of will record.
pub fn parse_stored_will(b: &[u8], clock: &Clock) -> Option<StoredWill> {
    match b.first() {
        Some(&ARMED_WILL) if b.len() >= 5 => {
            let delay_secs = u32::from_be_bytes(b[1..5].try_into().ok()?);
            let d = delivery(&b[5..], clock)?;
            let msg = Arc::try_unwrap(d.msg).ok()?;
            Some(StoredWill::Armed {
                msg,
                delay_secs,
                epoch: None,
            })
        }
        Some(&ARMED_WILL_EPOCH) if b.len() >= 13 => {
            let delay_secs = u32::from_be_bytes(b[1..5].try_into().ok()?);
            let epoch = u64::from_be_bytes(b[5..13].try_into().ok()?);
            let d = delivery(&b[13..], clock)?;
            let msg = Arc::try_unwrap(d.msg).ok()?;
            Some(StoredWill::Armed {
                msg,
                delay_secs,
                epoch: Some(epoch),
            })
        }
        _ => {
            let (msg, due) = parse_will(b, clock)?;
            Some(StoredWill::Pending { msg, due })
        }
    }
}

/// Pending will: version, when it is due, then the message.
pub fn will(msg: &Message, due: Instant, clock: &Clock) -> Result<Vec<u8>, EncodeError> {
    let stored = message(msg, msg.qos, msg.retain, &[], clock)?;
    let mut v = Vec::with_capacity(HEADER + stored.len());
    v.push(VERSION);
    v.extend_from_slice(&clock.to_unix_ms_not_before(due).to_be_bytes());
    v.extend_from_slice(&stored);
    Ok(v)
}

pub fn parse_will(mut b: &[u8], clock: &Clock) -> Option<(Message, Instant)> {
    if b.len() < 9 || b.get_u8() != VERSION {
        return None;
    }
    let due = clock.to_instant(b.get_u64());
    let d = delivery(b, clock)?;
    let msg = Arc::try_unwrap(d.msg).ok()?;
    Some((msg, due))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{MqttStr, PublishProperties, RetainHandling};

    #[test]
    fn message_round_trip_keeps_properties_and_expiry() {
        let clock = Clock::now();
        let props = PublishProperties {
            content_type: Some(MqttStr::from_static("text/plain")),
            user_properties: vec![(MqttStr::from_static("k"), MqttStr::from_static("v"))],
            ..Default::default()
        };
        let msg = Message {
            topic: MqttStr::from_static("a/b"),
            payload: bytes::Bytes::from_static(b"hello"),
            qos: QoS::ExactlyOnce,
            retain: true,
            props: Some(Box::new(props)),
            expires_at: Some(clock.now + Duration::from_secs(30)),
            origin: SessionId(7),
            owned: true,
            received: crate::message::Stamp::NONE,
            routed_at: Default::default(),
        };
        let bytes = message(&msg, QoS::AtLeastOnce, false, &[3, 9], &clock).expect("encodes");
        let d = delivery(&bytes, &clock).expect("decodes");
        assert_eq!(d.qos, QoS::AtLeastOnce);
        assert!(!d.retain);
        assert_eq!(d.subscription_ids.as_slice(), &[3, 9]);
        assert_eq!(&d.msg.payload[..], b"hello");
        assert_eq!(d.msg.topic.as_str(), "a/b");
        assert_eq!(d.msg.props().content_type, msg.props().content_type);
        assert_eq!(d.msg.props().user_properties, msg.props().user_properties);
        let left = d.msg.remaining_expiry(clock.now).expect("expiry kept");
        assert!((29..=30).contains(&left), "{left}");
        assert!(d.msg.owned, "a copy of its own");
        assert!(!bytes.as_ptr_range().contains(&d.msg.payload.as_ptr()));

        // A forwarded batch's message is decoded in place, and says it does not own it.
        let d = delivery_in(&bytes, &clock).expect("decodes");
        assert_eq!(&d.msg.payload[..], b"hello");
        assert_eq!(d.msg.props().user_properties, msg.props().user_properties);
        let within = bytes.as_ptr_range();
        assert!(
            within.contains(&d.msg.payload.as_ptr()),
            "a slice, not a copy"
        );
        assert!(!d.msg.owned);
        let kept = Message::kept(&d.msg);
        assert!(kept.owned && !within.contains(&kept.payload.as_ptr()));

        // Cut short or with bytes after the packet: unreadable, not a panic.
        let short = (0..bytes.len()).map(|n| bytes.slice(..n));
        for bad in short.chain([{
            let mut longer = bytes.to_vec();
            longer.push(0);
            Bytes::from(longer)
        }]) {
            assert!(delivery_in(&bad, &clock).is_none());
            assert!(delivery(&bad, &clock).is_none());
        }
    }

    #[test]
    fn a_stored_deadline_never_comes_early() {
        let clock = Clock::now();
        for micros in [0u64, 1, 999, 1000, 1001, 1_500_000, 10_000_000] {
            let due = clock.now + Duration::from_micros(micros);
            let back = clock.to_instant(clock.to_unix_ms_not_before(due));
            assert!(back >= due, "{micros} µs: {back:?} < {due:?}");
            assert!(
                back - due <= Duration::from_millis(2),
                "{micros} µs: too late"
            );
        }
    }

    /// A message whose stored encoding at its own QoS (with a packet id) is exactly the MQTT
    /// limit. The payload is a zeroed allocation the test never touches unless it encodes.
    fn at_ceiling(qos: QoS) -> Message {
        // Body: topic length (2) + "t" + packet id (2) + property length (1) + payload.
        let payload = vec![0u8; MAX_REMAINING_LENGTH - 6];
        Message {
            topic: MqttStr::from_static("t"),
            payload: bytes::Bytes::from(payload),
            qos,
            retain: false,
            props: None,
            expires_at: None,
            origin: SessionId(1),
            owned: true,
            received: crate::message::Stamp::NONE,
            routed_at: Default::default(),
        }
    }

    #[test]
    fn message_near_the_packet_size_ceiling_is_refused_not_panicked() {
        let clock = Clock::now();
        let msg = at_ceiling(QoS::AtLeastOnce);
        assert!(message_fits(&msg, 0), "exactly at the limit fits");
        assert!(
            !message_fits(&msg, sub_id_len(1)),
            "one identifier more does not"
        );
        match message(&msg, QoS::AtLeastOnce, false, &[1], &clock) {
            Err(EncodeError::TooLarge(n)) => assert_eq!(n, MAX_REMAINING_LENGTH + 2),
            other => panic!("expected TooLarge, got {:?}", other.map(|v| v.len())),
        }
        let mut bigger = at_ceiling(QoS::AtLeastOnce);
        bigger.topic = MqttStr::from_static("tt");
        assert!(!message_fits(&bigger, 0));
        assert!(matches!(
            will(&bigger, clock.now, &clock),
            Err(EncodeError::TooLarge(_))
        ));
        // At QoS 0 the copy has no packet id: two bytes of room.
        let v = message(&bigger, QoS::AtMostOnce, false, &[], &clock).expect("fits at qos 0");
        assert_eq!(v.len(), 9 + 1 + 4 + MAX_REMAINING_LENGTH - 1);
    }

    #[test]
    fn both_will_kinds_round_trip() {
        let clock = Clock::now();
        let msg = Message {
            topic: MqttStr::from_static("dev/1/status"),
            payload: bytes::Bytes::from_static(b"offline"),
            qos: QoS::AtLeastOnce,
            retain: true,
            props: None,
            expires_at: None,
            origin: SessionId(3),
            owned: true,
            received: crate::message::Stamp::NONE,
            routed_at: Default::default(),
        };
        match parse_stored_will(&armed_will(&msg, 30, 77, &clock).expect("encodes"), &clock) {
            Some(StoredWill::Armed {
                msg: m,
                delay_secs,
                epoch,
            }) => {
                assert_eq!((delay_secs, epoch), (30, Some(77)));
                assert_eq!(
                    (m.topic.as_str(), &m.payload[..]),
                    ("dev/1/status", &b"offline"[..])
                );
                assert!(m.retain);
            }
            other => panic!("armed will read back as {other:?}"),
        }
        let due = clock.now + Duration::from_secs(5);
        match parse_stored_will(&will(&msg, due, &clock).expect("encodes"), &clock) {
            Some(StoredWill::Pending { msg: m, due: d }) => {
                assert_eq!(m.topic.as_str(), "dev/1/status");
                assert!(d.saturating_duration_since(due) < Duration::from_millis(2));
            }
            other => panic!("pending will read back as {other:?}"),
        }
    }

    #[test]
    fn small_records_round_trip() {
        assert_eq!(parse_session(&session(3600, 42, 7)), Some((3600, 42, 7)));
        // A record written before sessions had an epoch.
        let old = &session(3600, 42, 7)[..13];
        assert_eq!(parse_session(old), Some((3600, 42, 0)));
        let o = SubscriptionOptions {
            qos: QoS::ExactlyOnce,
            no_local: true,
            retain_as_published: true,
            retain_handling: RetainHandling::DoNotSend,
        };
        assert_eq!(
            parse_subscription(&subscription(&o, Some(5))),
            Some((o, Some(5)))
        );
        assert_eq!(
            parse_subscription(&subscription(&SubscriptionOptions::default(), None)),
            Some((Default::default(), None))
        );
        let (id, stage) = parse_inflight(&inflight(513, Stage::Released)).expect("parses");
        assert_eq!((id.get(), stage), (513, Stage::Released));
        assert!(parse_session(&[9; 13]).is_none(), "unknown version refused");
    }
}
