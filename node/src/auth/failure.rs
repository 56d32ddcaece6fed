//! Slowing down repeated failed logins from one address.
//!
//! After a failed CONNECT from an address, its next CONNECT waits `base`, doubling with each
//! further failure up to `max`. A success, or `idle_reset` without a failure, clears the
//! address. IPv4-mapped IPv6 addresses count as their IPv4 address, and IPv6 addresses are
//! grouped by their /64 prefix, which one host usually controls whole. At most `max_entries`
//! addresses are remembered; when full, expired entries are dropped, then the oldest.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Tuning of [`FailureTracker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlowdownPolicy {
    /// Delay after the first failure.
    pub base: Duration,
    /// Largest delay.
    pub max: Duration,
    /// Time without failures after which an address starts afresh.
    pub idle_reset: Duration,
    /// Addresses remembered at most.
    pub max_entries: usize,
}

impl Default for SlowdownPolicy {
    fn default() -> Self {
        SlowdownPolicy {
            base: Duration::from_millis(100),
            max: Duration::from_secs(5),
            idle_reset: Duration::from_secs(60),
            max_entries: 10_000,
        }
    }
}

/// Failed-login counts per source address.
#[derive(Debug, Default)]
pub struct FailureTracker {
    policy: SlowdownPolicy,
    entries: Mutex<HashMap<IpAddr, Entry>>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    last_failure: Instant,
}

impl FailureTracker {
    pub fn new(policy: SlowdownPolicy) -> Self {
        FailureTracker {
            policy,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// How long a CONNECT from `ip` arriving at `now` should wait before it is answered.
    pub fn delay_for(&self, ip: IpAddr, now: Instant) -> Duration {
        let key = key(ip);
        let mut entries = self.lock();
        match entries.get(&key) {
            Some(entry) if self.expired(entry, now) => {
                entries.remove(&key);
                Duration::ZERO
            }
            Some(entry) => self.delay(entry.failures),
            None => Duration::ZERO,
        }
    }

    /// Counts a failed login from `ip` at `now`.
    pub fn record_failure(&self, ip: IpAddr, now: Instant) {
        let key = key(ip);
        let mut entries = self.lock();
        if !entries.contains_key(&key) && entries.len() >= self.policy.max_entries {
            entries.retain(|_, entry| !self.expired(entry, now));
            if entries.len() >= self.policy.max_entries {
                let oldest = entries
                    .iter()
                    .min_by_key(|(_, entry)| entry.last_failure)
                    .map(|(ip, _)| *ip);
                if let Some(oldest) = oldest {
                    entries.remove(&oldest);
                }
            }
        }
        if self.policy.max_entries == 0 {
            return;
        }
        let entry = entries.entry(key).or_insert(Entry {
            failures: 0,
            last_failure: now,
        });
        if self.expired(entry, now) {
            entry.failures = 0;
        }
        entry.failures = entry.failures.saturating_add(1);
        entry.last_failure = now;
    }

    /// Forgets the failures of `ip` after a successful login.
    pub fn record_success(&self, ip: IpAddr) {
        self.lock().remove(&key(ip));
    }

    /// Number of addresses remembered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.policy
            .base
            .saturating_mul(1 << doublings)
            .min(self.policy.max)
    }

    fn expired(&self, entry: &Entry, now: Instant) -> bool {
        now.saturating_duration_since(entry.last_failure) >= self.policy.idle_reset
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// The address failures are counted under.
fn key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn delay_doubles_and_caps() {
        let t = FailureTracker::default();
        let a = ip("192.0.2.1");
        let now = Instant::now();
        assert_eq!(t.delay_for(a, now), Duration::ZERO);
        let want = [100, 200, 400, 800, 1600, 3200, 5000, 5000];
        for (i, want) in want.into_iter().enumerate() {
            t.record_failure(a, now + ms(i as u64));
            assert_eq!(
                t.delay_for(a, now + ms(i as u64)),
                ms(want),
                "after {} failures",
                i + 1
            );
        }
        for _ in 0..100 {
            t.record_failure(a, now);
        }
        assert_eq!(t.delay_for(a, now), ms(5000));
        assert_eq!(
            t.delay_for(ip("192.0.2.2"), now),
            Duration::ZERO,
            "other addresses unaffected"
        );
    }

    #[test]
    fn success_and_idle_reset() {
        let t = FailureTracker::default();
        let a = ip("192.0.2.1");
        let now = Instant::now();
        t.record_failure(a, now);
        t.record_failure(a, now);
        t.record_success(a);
        assert_eq!(t.delay_for(a, now), Duration::ZERO);

        t.record_failure(a, now);
        t.record_failure(a, now + ms(1000));
        assert_eq!(
            t.delay_for(a, now + ms(60_999)),
            ms(200),
            "idle counted from the last failure"
        );
        assert_eq!(t.delay_for(a, now + ms(61_000)), Duration::ZERO);
        assert!(t.is_empty(), "expired entry dropped");
        t.record_failure(a, now + ms(1000));
        t.record_failure(a, now + ms(70_000));
        assert_eq!(
            t.delay_for(a, now + ms(70_000)),
            ms(100),
            "a failure after the idle time starts afresh"
        );
    }

    #[test]
    fn addresses_are_grouped() {
        let t = FailureTracker::default();
        let now = Instant::now();
        t.record_failure(ip("2001:db8:1:2::1"), now);
        assert_eq!(
            t.delay_for(ip("2001:db8:1:2:ffff::9"), now),
            ms(100),
            "same /64"
        );
        assert_eq!(
            t.delay_for(ip("2001:db8:1:3::1"), now),
            Duration::ZERO,
            "other /64"
        );
        t.record_failure(ip("::ffff:192.0.2.7"), now);
        assert_eq!(t.delay_for(ip("192.0.2.7"), now), ms(100), "mapped IPv4");
    }

    #[test]
    fn memory_is_bounded() {
        let policy = SlowdownPolicy {
            max_entries: 3,
            ..SlowdownPolicy::default()
        };
        let t = FailureTracker::new(policy);
        let now = Instant::now();
        for i in 1..=3u64 {
            t.record_failure(ip(&format!("192.0.2.{i}")), now + ms(i));
        }
        t.record_failure(ip("192.0.2.1"), now + ms(10));
        t.record_failure(ip("192.0.2.9"), now + ms(11));
        assert_eq!(t.len(), 3);
        assert_eq!(
            t.delay_for(ip("192.0.2.2"), now + ms(12)),
            Duration::ZERO,
            "oldest evicted"
        );
        assert_eq!(
            t.delay_for(ip("192.0.2.1"), now + ms(12)),
            ms(200),
            "recently failed kept"
        );
        assert_eq!(t.delay_for(ip("192.0.2.9"), now + ms(12)), ms(100));

        let later = now + ms(120_000);
        t.record_failure(ip("198.51.100.1"), later);
        assert_eq!(t.len(), 1, "expired entries dropped first");

        let none = FailureTracker::new(SlowdownPolicy {
            max_entries: 0,
            ..SlowdownPolicy::default()
        });
        none.record_failure(ip("192.0.2.1"), now);
        assert!(none.is_empty());
    }
}
