//! A token bucket: `rate` tokens a second, at most `capacity` saved up.

use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. `capacity` 0 means one second's worth; `rate` must be above 0.
    pub fn new(rate: u32, capacity: u32, now: Instant) -> TokenBucket {
        let rate = f64::from(rate.max(1));
        let capacity = if capacity == 0 {
            rate
        } else {
            f64::from(capacity)
        };
        TokenBucket {
            rate,
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.last = now;
    }

    /// Takes a token if one is there.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long until a token is there (zero if one is).
    pub fn wait(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
        }
    }

    /// Whether the bucket has refilled completely, so forgetting it changes nothing.
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 3, t0);
        assert!(b.try_take(t0) && b.try_take(t0) && b.try_take(t0));
        assert!(!b.try_take(t0), "the burst of 3 is spent");
        assert_eq!(b.wait(t0), Duration::from_millis(100));
        let t1 = t0 + Duration::from_millis(100);
        assert!(b.try_take(t1));
        assert!(!b.try_take(t1));
        // A long pause refills up to the capacity, not beyond.
        let t2 = t1 + Duration::from_secs(60);
        assert!(b.is_full(t2));
        assert!((0..3).all(|_| b.try_take(t2)));
        assert!(!b.try_take(t2));
    }

    #[test]
    fn capacity_zero_means_one_second() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(5, 0, t0);
        assert_eq!((0..10).filter(|_| b.try_take(t0)).count(), 5);
    }
}
