//! Clocks: the send stamp (CLOCK_MONOTONIC, so a `pub` and a `sub` in two processes on one
//! machine still measure latency) and the generator's own CPU time.

use std::time::Duration;

use rustix::time::{clock_gettime, ClockId};
use serde::Serialize;

/// Nanoseconds of CLOCK_MONOTONIC (a vDSO call, no system call).
pub fn now_ns() -> u64 {
    let t = clock_gettime(ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// CPU time this process has used so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CpuTime {
    pub user_s: f64,
    pub system_s: f64,
    /// From CLOCK_PROCESS_CPUTIME_ID (nanosecond resolution); user + system.
    pub total_s: f64,
}

impl CpuTime {
    pub fn now() -> CpuTime {
        let t = clock_gettime(ClockId::ProcessCPUTime);
        let total_s = Duration::new(t.tv_sec as u64, t.tv_nsec as u32).as_secs_f64();
        let (user_s, system_s) = proc_stat_times().unwrap_or((0.0, 0.0));
        CpuTime {
            user_s,
            system_s,
            total_s,
        }
    }

    pub fn since(self, start: CpuTime) -> CpuTime {
        CpuTime {
            user_s: self.user_s - start.user_s,
            system_s: self.system_s - start.system_s,
            total_s: self.total_s - start.total_s,
        }
    }
}

/// utime and stime (fields 14 and 15) of /proc/self/stat, in seconds.
fn proc_stat_times() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces; the fields after it start past its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ').skip(11);
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    let user = fields.next()?.parse::<f64>().ok()? / ticks;
    let system = fields.next()?.parse::<f64>().ok()? / ticks;
    Some((user, system))
}

/// Raises the soft open-files limit to the hard one (a `conn` run holds one socket per
/// client); returns the limit now in force.
pub fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        lim.current = lim.maximum;
        setrlimit(Resource::Nofile, lim).ok()?;
    }
    getrlimit(Resource::Nofile).current
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_move_forward() {
        let a = now_ns();
        let c0 = CpuTime::now();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(now_ns() > a);
        let used = CpuTime::now().since(c0);
        assert!(used.total_s > 0.0, "{used:?}");
        assert!(proc_stat_times().is_some());
    }
}
