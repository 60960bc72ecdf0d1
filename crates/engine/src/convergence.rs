//! When a run of the scanner is done: one rule for every driver of the engine (the simulator,
//! the live backend, the command line), fed with the counters it reads.

use crate::counters::{KsmCounters, MergeState};

/// When a run is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Until {
    /// At least `min_passes` full scans, then one more full scan that changed none of the
    /// merge counters ([`KsmCounters::merge_state`]). `min_passes: 2` is what merging needs
    /// (a page merges on its second unchanged visit), so the run ends after the third full
    /// scan at the earliest.
    Stable {
        /// Full scans that always run before stability is looked for.
        min_passes: u64,
    },
    /// This many full scans (what the kernel selftests wait for).
    FullScans(u64),
}

/// What one [`Convergence::observe`] saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    /// The merge state differs from the one observed before.
    pub changed: bool,
    /// Full scans completed since the observation before.
    pub new_passes: u64,
    /// The run is done (and stays done).
    pub done: bool,
}

/// Watches successive counter readings of one run and says when it is done.
///
/// Feed it with every reading, as often as the driver reads: after each full scan (the
/// simulator), or every few milliseconds while a scanner thread runs (live). It counts full
/// scans from `full_scans`, notes every change of [`KsmCounters::merge_state`] between
/// readings, and compares the merge state at each full-scan boundary with the one at the
/// boundary before:
///
/// - [`Until::Stable`]: done at the first boundary after more than `min_passes` full scans
///   where the merge state equals the state at the previous boundary (the state before the
///   run for the first one). When a reading sees several full scans at once, they count as
///   one step: the state must equal the one at the previous boundary seen.
/// - [`Until::FullScans`]: done once at least `n` full scans are counted.
///
/// A reading whose `full_scans` is lower than the one before (`run=2` resets it) starts the
/// count again from there without counting a full scan.
///
/// ```
/// use samepage_engine::{Convergence, KsmCounters, Until};
/// let mut c = KsmCounters::default();
/// let mut conv = Convergence::new(Until::Stable { min_passes: 2 }, &c);
/// // Pass 1: nothing merged yet (a page merges on its second visit).
/// c.full_scans = 1;
/// assert!(!conv.observe(&c).done);
/// // Pass 2: ten pages merged into one KSM page.
/// c.full_scans = 2;
/// c.pages_shared = 1;
/// c.pages_sharing = 9;
/// assert!(conv.observe(&c).changed);
/// // Pass 3 changed nothing: done.
/// c.full_scans = 3;
/// assert!(conv.observe(&c).done);
/// assert_eq!((conv.passes(), conv.last_change_pass()), (3, Some(2)));
/// ```
#[derive(Clone, Debug)]
pub struct Convergence {
    until: Until,
    seen_scans: u64,
    passes: u64,
    state: MergeState,
    state_at_pass: MergeState,
    last_change_pass: Option<u64>,
    done: bool,
}

impl Convergence {
    /// Start watching a run whose counters read `start` before it began.
    pub fn new(until: Until, start: &KsmCounters) -> Self {
        let state = start.merge_state();
        Self {
            until,
            seen_scans: start.full_scans,
            passes: 0,
            state,
            state_at_pass: state,
            last_change_pass: None,
            done: matches!(until, Until::FullScans(0)),
        }
    }

    /// Take one reading of the counters.
    pub fn observe(&mut self, c: &KsmCounters) -> Observation {
        let now = c.merge_state();
        let changed = now != self.state;
        self.state = now;
        let new_passes = c.full_scans.saturating_sub(self.seen_scans);
        self.seen_scans = c.full_scans;
        if changed {
            // Seen together with the end of a full scan, the change is put in the pass that
            // ended; seen in between, in the pass under way.
            self.last_change_pass = Some(self.passes + new_passes.max(1));
        }
        if new_passes > 0 {
            self.passes += new_passes;
            let done = match self.until {
                Until::FullScans(n) => self.passes >= n,
                Until::Stable { min_passes } => {
                    self.passes > min_passes && now == self.state_at_pass
                }
            };
            self.done |= done;
            self.state_at_pass = now;
        }
        Observation {
            changed,
            new_passes,
            done: self.done,
        }
    }

    /// The run is done.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Full scans counted so far.
    pub fn passes(&self) -> u64 {
        self.passes
    }

    /// The pass (1 for the first full scan of the run) in which the merge state was last
    /// seen changing, or `None` if it never changed.
    pub fn last_change_pass(&self) -> Option<u64> {
        self.last_change_pass
    }

    /// The merge state of the last reading.
    pub fn state(&self) -> MergeState {
        self.state
    }

    /// The rule this run ends by.
    pub fn until(&self) -> Until {
        self.until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(full_scans: u64, pages_sharing: u64) -> KsmCounters {
        KsmCounters {
            full_scans,
            pages_shared: u64::from(pages_sharing > 0),
            pages_sharing,
            ..KsmCounters::default()
        }
    }

    #[test]
    fn stable_needs_min_passes_then_one_unchanged_pass() {
        let mut conv = Convergence::new(Until::Stable { min_passes: 2 }, &at(10, 0));
        // Nothing ever changes: still the third pass is needed.
        assert!(!conv.observe(&at(11, 0)).done);
        assert!(!conv.observe(&at(12, 0)).done);
        assert!(conv.observe(&at(13, 0)).done);
        assert_eq!((conv.passes(), conv.last_change_pass()), (3, None));
    }

    #[test]
    fn a_change_in_the_last_pass_means_one_more() {
        let mut conv = Convergence::new(Until::Stable { min_passes: 2 }, &at(0, 0));
        conv.observe(&at(1, 0));
        conv.observe(&at(2, 5));
        assert!(!conv.observe(&at(3, 7)).done);
        assert!(!conv.observe(&at(4, 8)).done);
        let o = conv.observe(&at(5, 8));
        assert!(o.done && !o.changed && o.new_passes == 1);
        assert_eq!(conv.last_change_pass(), Some(4));
    }

    #[test]
    fn readings_between_boundaries() {
        // Frequent readings: changes inside a pass are put in the pass under way, and a pass
        // that changed the state and changed it back is not stable.
        let mut conv = Convergence::new(Until::Stable { min_passes: 1 }, &at(0, 0));
        conv.observe(&at(0, 3));
        assert_eq!(conv.last_change_pass(), Some(1));
        conv.observe(&at(1, 3));
        conv.observe(&at(1, 4));
        conv.observe(&at(1, 3));
        assert_eq!(conv.last_change_pass(), Some(2));
        assert!(conv.observe(&at(2, 3)).done);
    }

    #[test]
    fn full_scans_counts_jumps_and_resets() {
        let mut conv = Convergence::new(Until::FullScans(3), &at(5, 0));
        assert!(!conv.observe(&at(7, 0)).done);
        // run=2 reset full_scans: counting goes on from there.
        let o = conv.observe(&at(0, 0));
        assert_eq!((o.new_passes, o.done), (0, false));
        assert!(conv.observe(&at(1, 0)).done);
        assert_eq!(conv.passes(), 3);
        assert!(Convergence::new(Until::FullScans(0), &at(0, 0)).is_done());
    }
}
