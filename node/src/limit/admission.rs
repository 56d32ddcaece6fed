//! Which new connections get in: the overall and per-listener connection caps and the
//! per-address connection rate.
//!
//! A refused connection is not simply closed: it gets a CONNACK that says why (v5 0x97
//! Quota exceeded or 0x9F Connection rate exceeded, 3.x 3 Server unavailable), so a client
//! can tell a full broker from a dead one. Answering needs the TLS handshake and the CONNECT,
//! so refusals have their own small pool of tasks; past it a refused socket is closed at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::TokenBucket;
use crate::codec::{Protocol, ReasonCode};
use crate::config::LimitsConfig;
use crate::listener::Kind;

/// Refused connections answered with a CONNACK at the same time; more are closed unanswered.
const MAX_REFUSING: usize = 64;
/// How long a refused connection may take over its TLS handshake, WebSocket upgrade and
/// CONNECT before it is closed unanswered.
pub const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);
/// Forget per-address buckets once this many are held (full buckets only).
const PRUNE_ABOVE: usize = 4096;

/// Why a connection is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `limits.max_connections` reached.
    ServerFull,
    /// The listener's own cap reached.
    ListenerFull,
    /// The source address opened connections faster than `max_connection_rate_per_ip`.
    RateExceeded,
}

impl Refusal {
    /// Label for `petrel_limit_hits_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::ServerFull => "max_connections",
            Refusal::ListenerFull => "max_connections_listener",
            Refusal::RateExceeded => "connection_rate",
        }
    }

    /// The CONNACK code: v5 says which limit, 3.x only has "server unavailable".
    pub fn reason_code(self, protocol: Protocol) -> ReasonCode {
        match (protocol.is_v5(), self) {
            (false, _) => ReasonCode(3),
            (true, Refusal::RateExceeded) => ReasonCode::CONNECTION_RATE_EXCEEDED,
            (true, _) => ReasonCode::QUOTA_EXCEEDED,
        }
    }
}

/// What a connection holds while it lives (released on drop): the overall permit and the
/// listener's, or a refusal slot. Two fields rather than a `Vec`: no allocation per
/// connection.
pub struct Permits {
    _first: OwnedSemaphorePermit,
    _second: Option<OwnedSemaphorePermit>,
}

impl Permits {
    pub fn one(permit: OwnedSemaphorePermit) -> Permits {
        Permits {
            _first: permit,
            _second: None,
        }
    }
}

/// The outcome of [`Admission::admit`].
pub enum Admit {
    /// Serve it; the permits are released when the connection ends.
    Accepted(Permits),
    /// Answer its CONNECT with the refusal, holding a refusal slot meanwhile.
    Refused(Refusal, OwnedSemaphorePermit),
    /// Refused, and too many refusals are being answered already: close it.
    Dropped(Refusal),
}

pub struct Admission {
    overall: Arc<Semaphore>,
    per_listener: Vec<(Kind, Arc<Semaphore>)>,
    refusing: Arc<Semaphore>,
    rate: u32,
    buckets: Mutex<Buckets>,
}

struct Buckets {
    by_ip: HashMap<IpAddr, TokenBucket>,
    pruned: Instant,
}

impl Admission {
    pub fn new(cfg: &LimitsConfig) -> Admission {
        let per_listener = [
            (Kind::Mqtt, cfg.max_connections_mqtt),
            (Kind::Mqtts, cfg.max_connections_mqtts),
            (Kind::Ws, cfg.max_connections_ws),
            (Kind::Wss, cfg.max_connections_wss),
        ]
        .into_iter()
        .filter(|(_, max)| *max > 0)
        .map(|(kind, max)| (kind, Arc::new(Semaphore::new(max))))
        .collect();
        Admission {
            overall: Arc::new(Semaphore::new(cfg.max_connections)),
            per_listener,
            refusing: Arc::new(Semaphore::new(MAX_REFUSING)),
            rate: cfg.max_connection_rate_per_ip,
            buckets: Mutex::new(Buckets {
                by_ip: HashMap::new(),
                pruned: Instant::now(),
            }),
        }
    }

    /// Decides on a connection just accepted on `kind` from `ip`.
    pub fn admit(&self, kind: Kind, ip: IpAddr) -> Admit {
        match self.permits(kind, ip) {
            Ok(permits) => Admit::Accepted(permits),
            Err(why) => match self.refusing.clone().try_acquire_owned() {
                Ok(slot) => Admit::Refused(why, slot),
                Err(_) => Admit::Dropped(why),
            },
        }
    }

    fn permits(&self, kind: Kind, ip: IpAddr) -> Result<Permits, Refusal> {
        if self.rate > 0 && !self.take_rate_token(ip, Instant::now()) {
            return Err(Refusal::RateExceeded);
        }
        let overall = self
            .overall
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::ServerFull)?;
        let listener = match self.per_listener.iter().find(|(k, _)| *k == kind) {
            Some((_, sem)) => Some(
                sem.clone()
                    .try_acquire_owned()
                    .map_err(|_| Refusal::ListenerFull)?,
            ),
            None => None,
        };
        Ok(Permits {
            _first: overall,
            _second: listener,
        })
    }

    fn take_rate_token(&self, ip: IpAddr, now: Instant) -> bool {
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if b.by_ip.len() > PRUNE_ABOVE && now.duration_since(b.pruned) > Duration::from_secs(1) {
            // A full bucket is the same as no bucket: forgetting it loses nothing.
            b.by_ip.retain(|_, bucket| !bucket.is_full(now));
            b.pruned = now;
        }
        let rate = self.rate;
        b.by_ip
            .entry(ip)
            .or_insert_with(|| TokenBucket::new(rate, 0, now))
            .try_take(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(f: impl FnOnce(&mut LimitsConfig)) -> LimitsConfig {
        let mut cfg = LimitsConfig::default();
        f(&mut cfg);
        cfg
    }

    fn refusal(a: Admit) -> Option<Refusal> {
        match a {
            Admit::Accepted(_) => None,
            Admit::Refused(why, _) | Admit::Dropped(why) => Some(why),
        }
    }

    #[test]
    fn overall_and_listener_caps() {
        let a = Admission::new(&limits(|c| {
            c.max_connections = 3;
            c.max_connections_ws = 1;
        }));
        let ip: IpAddr = [127, 0, 0, 1].into();
        let ws = a.admit(Kind::Ws, ip);
        assert!(matches!(ws, Admit::Accepted(_)));
        assert_eq!(refusal(a.admit(Kind::Ws, ip)), Some(Refusal::ListenerFull));
        let m1 = a.admit(Kind::Mqtt, ip);
        let m2 = a.admit(Kind::Mqtt, ip);
        assert!(matches!(
            (&m1, &m2),
            (Admit::Accepted(_), Admit::Accepted(_))
        ));
        assert_eq!(refusal(a.admit(Kind::Mqtt, ip)), Some(Refusal::ServerFull));
        drop(m1);
        assert!(matches!(a.admit(Kind::Mqtt, ip), Admit::Accepted(_)));
        drop(ws);
    }

    #[test]
    fn rate_is_per_address() {
        let a = Admission::new(&limits(|c| c.max_connection_rate_per_ip = 2));
        let (x, y): (IpAddr, IpAddr) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        let held: Vec<_> = (0..2).map(|_| a.admit(Kind::Mqtt, x)).collect();
        assert!(held.iter().all(|h| matches!(h, Admit::Accepted(_))));
        assert_eq!(refusal(a.admit(Kind::Mqtt, x)), Some(Refusal::RateExceeded));
        assert!(matches!(a.admit(Kind::Mqtt, y), Admit::Accepted(_)));
    }

    #[test]
    fn refusals_beyond_the_pool_are_dropped() {
        let a = Admission::new(&limits(|c| c.max_connection_rate_per_ip = 1));
        let ip: IpAddr = [10, 0, 0, 3].into();
        let _first = a.admit(Kind::Mqtt, ip);
        let slots: Vec<_> = (0..MAX_REFUSING).map(|_| a.admit(Kind::Mqtt, ip)).collect();
        assert!(slots.iter().all(|s| matches!(s, Admit::Refused(..))));
        assert!(matches!(
            a.admit(Kind::Mqtt, ip),
            Admit::Dropped(Refusal::RateExceeded)
        ));
    }

    #[test]
    fn reason_codes() {
        use Refusal::*;
        assert_eq!(RateExceeded.reason_code(Protocol::V5), ReasonCode(0x9F));
        assert_eq!(ServerFull.reason_code(Protocol::V5), ReasonCode(0x97));
        assert_eq!(ListenerFull.reason_code(Protocol::V5), ReasonCode(0x97));
        assert_eq!(ServerFull.reason_code(Protocol::V3_1_1), ReasonCode(3));
    }
}
