//! Time sources. Every timer in this crate reads time through [`Clock`], so
//! tests can drive them deterministically with [`ManualClock`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

pub trait Clock: Send + Sync {
    /// Monotonic nanoseconds since an arbitrary epoch (typically VM creation).
    fn now_ns(&self) -> u64;
}

/// Host monotonic clock, relative to the moment of creation.
#[derive(Debug)]
pub struct HostClock {
    start: Instant,
}

impl HostClock {
    pub fn new() -> Self {
        HostClock {
            start: Instant::now(),
        }
    }
}

impl Default for HostClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for HostClock {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

/// A clock that only moves when told to.
#[derive(Debug, Default)]
pub struct ManualClock {
    ns: AtomicU64,
}

impl ManualClock {
    pub fn new(ns: u64) -> Self {
        ManualClock {
            ns: AtomicU64::new(ns),
        }
    }
    pub fn set_ns(&self, ns: u64) {
        self.ns.store(ns, Ordering::SeqCst);
    }
    pub fn advance_ns(&self, ns: u64) {
        self.ns.fetch_add(ns, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.ns.load(Ordering::SeqCst)
    }
}

/// Converts nanoseconds to ticks of a `hz` clock (floor).
pub fn ns_to_ticks(ns: u64, hz: u64) -> u64 {
    if hz.is_multiple_of(1_000_000_000) {
        // The guest TSC (2 GHz), read on every RDTSC: the same value
        // without a 128-bit division.
        return ns.wrapping_mul(hz / 1_000_000_000);
    }
    (ns as u128 * hz as u128 / 1_000_000_000) as u64
}

/// Converts ticks of a `hz` clock to nanoseconds, rounding up so that a
/// deadline computed this way has always been reached when it is observed.
pub fn ticks_to_ns(ticks: u64, hz: u64) -> u64 {
    if hz == 0 {
        return u64::MAX;
    }
    let ns = (ticks as u128 * 1_000_000_000).div_ceil(hz as u128);
    ns.min(u64::MAX as u128) as u64
}

/// Guest TSC value at clock time `ns`. The LAPIC's TSC-deadline timer assumes
/// the CPU's TSC is `ns_to_tsc(clock.now_ns(), tsc_hz)`; the VMM's RDTSC
/// should use this same function (plus a per-VM offset applied on both sides
/// if it wants one).
pub fn ns_to_tsc(ns: u64, tsc_hz: u64) -> u64 {
    ns_to_ticks(ns, tsc_hz)
}

/// Clock time (ns) at which the guest TSC reaches `tsc`.
pub fn tsc_to_ns(tsc: u64, tsc_hz: u64) -> u64 {
    ticks_to_ns(tsc, tsc_hz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_trip() {
        let hz = 2_999_999_999;
        for ns in [0u64, 1, 333, 1_000_000_007, 123_456_789_012] {
            let t = ns_to_tsc(ns, hz);
            let back = tsc_to_ns(t, hz);
            assert!(back <= ns, "{ns} {t} {back}");
            assert!(ns_to_tsc(back, hz) == t);
        }
        // Whole-GHz rates take the multiplication: the same ticks as the
        // 128-bit formula, wrapping included.
        for (ns, hz) in [
            (123_456_789_012u64, 2_000_000_000u64),
            (u64::MAX / 3, 3_000_000_000),
        ] {
            let want = (ns as u128 * hz as u128 / 1_000_000_000) as u64;
            assert_eq!(ns_to_tsc(ns, hz), want, "{ns} at {hz}");
        }
        let c = ManualClock::new(5);
        c.advance_ns(10);
        assert_eq!(c.now_ns(), 15);
        let h = HostClock::new();
        let a = h.now_ns();
        assert!(h.now_ns() >= a);
    }
}
