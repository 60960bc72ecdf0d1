//! When a run of ksmd has converged: one rule for the simulator, the live engine and the
//! command line.

use crate::counters::KsmCounters;

/// When to stop watching a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Until {
    /// At least `min_passes` full scans, then one full scan that changes none of the merge
    /// counters ([`KsmCounters::merge_state`]).
    Stable {
        /// Full scans before stability counts.
        min_passes: u64,
    },
    /// Exactly this many full scans.
    FullScans(u64),
}

/// Follows successive observations of the counters and says when a run is done.
#[derive(Clone, Debug)]
pub struct Convergence {
    until: Until,
    seen_scans: u64,
    passes: u64,
    state_at_pass: [i64; 5],
}

impl Convergence {
    /// Start watching from `start`.
    pub fn new(until: Until, start: &KsmCounters) -> Self {
        Self {
            until,
            seen_scans: start.full_scans,
            passes: 0,
            state_at_pass: start.merge_state(),
        }
    }

    /// Look at the counters now; true when the run is done.
    pub fn observe(&mut self, c: &KsmCounters) -> bool {
        if c.full_scans == self.seen_scans {
            return false;
        }
        self.passes += c.full_scans.saturating_sub(self.seen_scans);
        self.seen_scans = c.full_scans;
        let state = c.merge_state();
        let done = match self.until {
            Until::FullScans(n) => self.passes >= n,
            Until::Stable { min_passes } => self.passes > min_passes && state == self.state_at_pass,
        };
        self.state_at_pass = state;
        done
    }

    /// Full scans observed so far.
    pub fn passes(&self) -> u64 {
        self.passes
    }
}
