//! The counters of `/sys/kernel/mm/ksm` and `/proc/<pid>/ksm_stat`, by their kernel names.

use crate::page::PAGE_SIZE;
use serde::Serialize;
use std::fmt;

/// Names of the read-only files of `/sys/kernel/mm/ksm`, in `ls` order.
pub const COUNTER_NAMES: &[&str] = &[
    "full_scans",
    "general_profit",
    "ksm_zero_pages",
    "pages_scanned",
    "pages_shared",
    "pages_sharing",
    "pages_skipped",
    "pages_unshared",
    "pages_volatile",
    "stable_node_chains",
    "stable_node_dups",
];

/// A snapshot of every global counter. Field names are the sysfs file names.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KsmCounters {
    /// KSM pages (stable nodes) with at least one mapping tracked by an rmap item.
    pub pages_shared: u64,
    /// Further mappings of KSM pages: the pages saved by merging.
    pub pages_sharing: u64,
    /// rmap items in the unstable tree: candidates not merged yet.
    pub pages_unshared: u64,
    /// `rmap_items - pages_shared - pages_sharing - pages_unshared`, clamped at 0.
    pub pages_volatile: u64,
    /// Pages passed to `cmp_and_merge_page`.
    pub pages_scanned: u64,
    /// Pages smart scan skipped.
    pub pages_skipped: u64,
    /// Completed full scans; reset by `run=2`.
    pub full_scans: u64,
    /// Stable-node chains (contents that reached `max_page_sharing`).
    pub stable_node_chains: u64,
    /// Dups hanging in chains.
    pub stable_node_dups: u64,
    /// Zero pages placed by KSM and still mapped.
    pub ksm_zero_pages: i64,
    /// `(pages_sharing + ksm_zero_pages) * PAGE_SIZE - rmap_items * sizeof(rmap item)`, bytes.
    pub general_profit: i64,
}

impl KsmCounters {
    /// The value of one sysfs counter file.
    pub fn get(&self, name: &str) -> Option<i64> {
        Some(match name {
            "full_scans" => self.full_scans as i64,
            "general_profit" => self.general_profit,
            "ksm_zero_pages" => self.ksm_zero_pages,
            "pages_scanned" => self.pages_scanned as i64,
            "pages_shared" => self.pages_shared as i64,
            "pages_sharing" => self.pages_sharing as i64,
            "pages_skipped" => self.pages_skipped as i64,
            "pages_unshared" => self.pages_unshared as i64,
            "pages_volatile" => self.pages_volatile as i64,
            "stable_node_chains" => self.stable_node_chains as i64,
            "stable_node_dups" => self.stable_node_dups as i64,
            _ => return None,
        })
    }

    /// Memory saved: `pages_sharing + ksm_zero_pages` pages.
    pub fn saved_pages(&self) -> i64 {
        self.pages_sharing as i64 + self.ksm_zero_pages
    }

    /// These counters with `ksm_zero_pages` replaced by `z`, counted elsewhere (the live
    /// backend counts zero pages from the page tables when the counters are read, while the
    /// rest is the scanner's snapshot), and `general_profit` adjusted to match: it changes by
    /// `(z - ksm_zero_pages) * PAGE_SIZE`.
    ///
    /// ```
    /// use samepage_engine::{KsmCounters, PAGE_SIZE};
    /// let c = KsmCounters { ksm_zero_pages: 2, general_profit: 100, ..KsmCounters::default() };
    /// let c = c.with_ksm_zero_pages(5);
    /// assert_eq!(c.ksm_zero_pages, 5);
    /// assert_eq!(c.general_profit, 100 + 3 * PAGE_SIZE as i64);
    /// ```
    pub fn with_ksm_zero_pages(mut self, z: i64) -> Self {
        self.general_profit += (z - self.ksm_zero_pages) * PAGE_SIZE as i64;
        self.ksm_zero_pages = z;
        self
    }

    /// The counters that stop changing when merging has converged (see [`MergeState`]).
    pub fn merge_state(&self) -> MergeState {
        MergeState {
            pages_shared: self.pages_shared,
            pages_sharing: self.pages_sharing,
            ksm_zero_pages: self.ksm_zero_pages,
            stable_node_chains: self.stable_node_chains,
            stable_node_dups: self.stable_node_dups,
        }
    }
}

/// The counters that stop changing when merging has converged: what is merged, not how the
/// scan goes. `pages_unshared` and `pages_volatile` are not in it: smart scan keeps taking
/// unmergeable pages in and out of the unstable tree by design. Compared by
/// [`Convergence`](crate::Convergence).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct MergeState {
    /// [`KsmCounters::pages_shared`].
    pub pages_shared: u64,
    /// [`KsmCounters::pages_sharing`].
    pub pages_sharing: u64,
    /// [`KsmCounters::ksm_zero_pages`].
    pub ksm_zero_pages: i64,
    /// [`KsmCounters::stable_node_chains`].
    pub stable_node_chains: u64,
    /// [`KsmCounters::stable_node_dups`].
    pub stable_node_dups: u64,
}

impl fmt::Display for KsmCounters {
    /// One `name value` line per file, in `ls /sys/kernel/mm/ksm` order (as
    /// `grep . /sys/kernel/mm/ksm/*` shows them, without the directory).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for name in COUNTER_NAMES {
            writeln!(f, "{name} {}", self.get(name).expect("known counter"))?;
        }
        Ok(())
    }
}

/// `/proc/<pid>/ksm_stat` of one address space.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KsmStat {
    /// Which address space: the process id in the simulator, the engine's address-space id
    /// live.
    pub pid: u32,
    pub ksm_rmap_items: u64,
    pub ksm_zero_pages: i64,
    pub ksm_merging_pages: u64,
    pub ksm_process_profit: i64,
    pub ksm_merge_any: bool,
    pub ksm_mergeable: bool,
}

impl KsmStat {
    /// This `ksm_stat` with `ksm_zero_pages` replaced by `z`, counted elsewhere, and
    /// `ksm_process_profit` adjusted to match: it changes by `(z - ksm_zero_pages) *
    /// PAGE_SIZE` (see [`KsmCounters::with_ksm_zero_pages`]).
    ///
    /// ```
    /// use samepage_engine::{KsmStat, PAGE_SIZE};
    /// let s = KsmStat { ksm_zero_pages: 4, ksm_process_profit: -14, ..KsmStat::default() };
    /// let s = s.with_ksm_zero_pages(1);
    /// assert_eq!((s.ksm_zero_pages, s.ksm_process_profit), (1, -14 - 3 * PAGE_SIZE as i64));
    /// ```
    pub fn with_ksm_zero_pages(mut self, z: i64) -> Self {
        self.ksm_process_profit += (z - self.ksm_zero_pages) * PAGE_SIZE as i64;
        self.ksm_zero_pages = z;
        self
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

impl fmt::Display for KsmStat {
    /// Exactly the layout of `fs/proc/base.c:proc_pid_ksm_stat`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "ksm_rmap_items {}", self.ksm_rmap_items)?;
        writeln!(f, "ksm_zero_pages {}", self.ksm_zero_pages)?;
        writeln!(f, "ksm_merging_pages {}", self.ksm_merging_pages)?;
        writeln!(f, "ksm_process_profit {}", self.ksm_process_profit)?;
        writeln!(f, "ksm_merge_any: {}", yes_no(self.ksm_merge_any))?;
        writeln!(f, "ksm_mergeable: {}", yes_no(self.ksm_mergeable))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ksm_stat_layout_matches_procfs() {
        let s = KsmStat {
            pid: 1,
            ksm_rmap_items: 3,
            ksm_zero_pages: 2,
            ksm_merging_pages: 1,
            ksm_process_profit: -5,
            ksm_merge_any: true,
            ksm_mergeable: false,
        };
        assert_eq!(
            s.to_string(),
            "ksm_rmap_items 3\nksm_zero_pages 2\nksm_merging_pages 1\nksm_process_profit -5\n\
             ksm_merge_any: yes\nksm_mergeable: no\n"
        );
    }

    #[test]
    fn every_counter_has_a_value() {
        let c = KsmCounters::default();
        assert_eq!(c.to_string().lines().count(), COUNTER_NAMES.len());
    }
}
