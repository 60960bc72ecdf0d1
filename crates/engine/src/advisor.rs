//! The scan-time advisor (`advisor_mode=scan-time`, Linux 6.8): tunes `pages_to_scan` at the end
//! of every full scan so that a full scan takes `advisor_target_scan_time` seconds, within CPU
//! limits. Integer arithmetic exactly as `scan_time_advisor` in `mm/ksm.c`.

/// `KSM_ADVISOR_MIN_CPU`: the advisor keeps ksmd at or above 10% CPU.
const MIN_CPU: u64 = 10;
/// `EWMA_WEIGHT`: weight (percent) of the newest sample.
const EWMA_WEIGHT: u64 = 30;

/// A clock for the engine: wall time and the CPU time of the scanning thread, in nanoseconds.
/// The simulator gives a deterministic virtual clock; the live backend the real ones.
pub trait Clock {
    /// Monotonic wall time (`ktime_get`).
    fn now_ns(&self) -> u64;
    /// CPU time consumed by the scanner so far (`task_sched_runtime(ksmd)`).
    fn cpu_ns(&self) -> u64;
}

/// `advisor_ctx`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct AdvisorCtx {
    start_scan_ns: u64,
    scan_time: u64,
    change: u64,
    cpu_time: u64,
}

fn ewma(prev: u64, curr: u64) -> u64 {
    ((100 - EWMA_WEIGHT) * prev + EWMA_WEIGHT * curr) / 100
}

/// The tunables the advisor reads.
pub(crate) struct AdvisorKnobs {
    pub pages_to_scan: u64,
    pub max_cpu: u64,
    pub max_pages_to_scan: u64,
    pub target_scan_time: u64,
}

impl AdvisorCtx {
    pub fn start_scan(&mut self, now_ns: u64) {
        self.start_scan_ns = now_ns;
    }

    /// Returns the new `pages_to_scan`.
    pub fn stop_scan(&mut self, now_ns: u64, cpu_ns: u64, k: &AdvisorKnobs) -> u64 {
        let scan_ms = now_ns.saturating_sub(self.start_scan_ns) / 1_000_000;
        let scan_time = (scan_ms / 1000).max(1);
        let cpu_time = cpu_ns;
        let cpu_time_diff_ms = cpu_time.wrapping_sub(self.cpu_time) / 1_000_000;
        let cpu_percent = ((cpu_time_diff_ms * 100) / (scan_time * 1000)).max(1);
        let last_scan_time = if self.scan_time != 0 {
            self.scan_time
        } else {
            scan_time
        };
        let factor = (k.target_scan_time.saturating_mul(100) / scan_time).max(1);
        let change = ((scan_time * 100) / last_scan_time).max(1);
        let change = ewma(self.change, change);
        let mut pages = k.pages_to_scan * 100 / factor;
        pages = pages * change / 100;
        let per_page_cost = (k.pages_to_scan / cpu_percent).max(1);
        pages = pages.min(per_page_cost.saturating_mul(k.max_cpu));
        pages = pages.max(per_page_cost * MIN_CPU);
        pages = pages.min(k.max_pages_to_scan);
        self.change = change;
        self.scan_time = scan_time;
        self.cpu_time = cpu_time;
        pages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_round_follows_kernel_arithmetic() {
        // 10 s scan at 5% CPU with pages_to_scan 500, target 200 s.
        let mut a = AdvisorCtx::default();
        a.start_scan(0);
        let k = AdvisorKnobs {
            pages_to_scan: 500,
            max_cpu: 70,
            max_pages_to_scan: 30000,
            target_scan_time: 200,
        };
        let pages = a.stop_scan(10_000_000_000, 500_000_000, &k);
        // factor = 2000, change = ewma(0, 100) = 30, pages = 500*100/2000*30/100 = 7,
        // per_page_cost = 500/5 = 100, floor 100*10 = 1000.
        assert_eq!(pages, 1000);
        assert_eq!(a.change, 30);
        assert_eq!(a.scan_time, 10);
    }
}
