//! The counters of `/sys/kernel/mm/ksm` and `/proc/<pid>/ksm_stat`, by their kernel names
//! and with the kernel's definitions (`mm/ksm.c`, `fs/proc/base.c`), documented where each is
//! defined.
//!
//! One difference is in the profit figures: they charge each rmap item what it costs here,
//! [`RMAP_ITEM_BYTES`](crate::RMAP_ITEM_BYTES) (10 bytes: samepage keeps an item in 9 bytes of a
//! chunk of 256 neighbouring pages), where the kernel charges `sizeof(struct ksm_rmap_item)` (64
//! bytes on 64-bit). The formula is the kernel's; the figure is larger than the kernel's would
//! be for the same rmap items by 54 bytes an item.

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

/// A snapshot of every global counter of `/sys/kernel/mm/ksm`. Field names are the sysfs
/// file names; [`Display`](fmt::Display) prints them as `grep . /sys/kernel/mm/ksm/*`
/// would (without the directory).
///
/// ```
/// use samepage_engine::KsmCounters;
/// let c = KsmCounters { pages_shared: 1, pages_sharing: 9, ..KsmCounters::default() };
/// assert_eq!(c.get("pages_sharing"), Some(9));
/// assert_eq!(c.saved_pages(), 9);
/// assert!(c.to_string().contains("pages_shared 1\n"));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KsmCounters {
    /// `ksm_pages_shared`: KSM pages in use, i.e. stable nodes with at least one mapping
    /// tracked by an rmap item.
    pub pages_shared: u64,
    /// `ksm_pages_sharing`: the mappings of KSM pages beyond the first of each, i.e. the
    /// pages merging saves.
    pub pages_sharing: u64,
    /// `ksm_pages_unshared`: rmap items in the unstable tree (of this pass or, until they are
    /// visited again, of the one before): pages checked for merging and not merged yet.
    pub pages_unshared: u64,
    /// `rmap_items - pages_shared - pages_sharing - pages_unshared`, at least 0: pages that
    /// changed too fast to be put in a tree, or that are between trees.
    pub pages_volatile: u64,
    /// `ksm_pages_scanned`: pages passed to `cmp_and_merge_page` since the engine was made
    /// (smart scan's skipped pages not included).
    pub pages_scanned: u64,
    /// `ksm_pages_skipped`: visits smart scan skipped.
    pub pages_skipped: u64,
    /// `ksm_scan.seqnr`: full scans completed; `run=2` resets it to 0.
    pub full_scans: u64,
    /// `ksm_stable_node_chains`: contents with more identical pages than one KSM page may
    /// hold (`max_page_sharing`), held as a chain of KSM pages.
    pub stable_node_chains: u64,
    /// `ksm_stable_node_dups`: the KSM pages in those chains.
    pub stable_node_dups: u64,
    /// `ksm_zero_pages`: zero pages placed by KSM (`use_zero_pages`) and still mapped,
    /// counted by the backend when a mapping changes ([`KsmZeroPages`](crate::KsmZeroPages)).
    pub ksm_zero_pages: i64,
    /// `general_profit`, bytes: `(pages_sharing + ksm_zero_pages) * PAGE_SIZE - rmap_items *`
    /// [`RMAP_ITEM_BYTES`](crate::RMAP_ITEM_BYTES) (the kernel's formula, with samepage's item size; see the
    /// [module documentation](self)).
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

/// `/proc/<pid>/ksm_stat` of one address space; [`Display`](fmt::Display) prints the
/// kernel's layout.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KsmStat {
    /// Which address space ([`MmId`](crate::MmId)`.0`): the process id in the simulator,
    /// the backend's address-space id live. Not printed.
    pub pid: u32,
    /// `mm->ksm_rmap_items`: rmap items of this address space (its pages KSM tracks).
    pub ksm_rmap_items: u64,
    /// `mm_ksm_zero_pages(mm)`: zero pages KSM placed in it and still mapped.
    pub ksm_zero_pages: i64,
    /// `mm->ksm_merging_pages`: its pages that map a KSM page through a stable rmap item.
    pub ksm_merging_pages: u64,
    /// `ksm_process_profit`, bytes: `(ksm_merging_pages + ksm_zero_pages) * PAGE_SIZE -
    /// ksm_rmap_items *` [`RMAP_ITEM_BYTES`](crate::RMAP_ITEM_BYTES) (the kernel's formula with samepage's item
    /// size, as [`KsmCounters::general_profit`]).
    pub ksm_process_profit: i64,
    /// `MMF_VM_MERGE_ANY`: the process asked to merge everything (`PR_SET_MEMORY_MERGE`).
    pub ksm_merge_any: bool,
    /// Some area of the address space is `VM_MERGEABLE`.
    pub ksm_mergeable: bool,
}

impl KsmStat {
    /// This `ksm_stat` with `ksm_zero_pages` replaced by `z`, counted elsewhere, and
    /// `ksm_process_profit` adjusted to match: it changes by `(z - ksm_zero_pages) *
    /// PAGE_SIZE` (see [`KsmCounters::with_ksm_zero_pages`]).
    ///
    /// ```
    /// use samepage_engine::{KsmStat, PAGE_SIZE};
    /// let s = KsmStat { ksm_zero_pages: 4, ksm_process_profit: -10, ..KsmStat::default() };
    /// let s = s.with_ksm_zero_pages(1);
    /// assert_eq!((s.ksm_zero_pages, s.ksm_process_profit), (1, -10 - 3 * PAGE_SIZE as i64));
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
