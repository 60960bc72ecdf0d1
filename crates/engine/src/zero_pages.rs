//! KSM-placed zero pages: the one place where they are counted.
//!
//! This is the feature of Linux 6.6 that the seed thread designed ("ksm: support tracking
//! KSM-placed zero-pages"). The rules, as the kernel implements them after David Hildenbrand's
//! review:
//!
//! - The *mark* lives with the mapping, not with a scan item. In the kernel it is the dirty
//!   bit of the zero-page PTE (`is_ksm_zero_pte`); in samepage's simulator it is a flag on the
//!   simulated PTE, and in the live backend the userfaultfd write-protect bit on the zero-page
//!   entry. A zero page mapped by an ordinary read fault carries no mark and is never counted
//!   or unshared.
//! - The count rises when KSM places a zero page ([`KsmZeroPages::map_zero_page`], the
//!   kernel's `ksm_map_zero_page`) and falls *synchronously* whenever a marked mapping goes
//!   away: a write (copy-on-write), a discard or unmap, an unmerge, a collapse
//!   ([`KsmZeroPages::might_unmap_zero_page`], the kernel's `ksm_might_unmap_zero_page`).
//! - A fork copies the marked mappings into the child, so the child starts with the parent's
//!   per-process count and the global count grows by the same amount
//!   ([`KsmZeroPages::fork`], the 2025 fix "mm/ksm: fix incorrect KSM counter handling in
//!   mm_struct during fork").
//!
//! Backends own one `KsmZeroPages` and call it under the same lock that changes the mark, so
//! the count equals the number of marked mappings at every instant (the kernel needed atomics
//! to stop readers from seeing -1; here the count and the marks change together).

use crate::page::MmId;
use rustc_hash::FxHashMap;

/// Global and per-address-space counts of KSM-placed zero pages still mapped.
///
/// ```
/// use samepage_engine::{KsmZeroPages, MmId};
/// let mut z = KsmZeroPages::new();
/// z.map_zero_page(MmId(1)); // KSM placed one
/// z.fork(MmId(1), MmId(2)); // the child maps it too
/// assert_eq!(z.global(), 2);
/// assert!(z.might_unmap_zero_page(MmId(2), true)); // the child wrote it
/// assert!(!z.might_unmap_zero_page(MmId(1), false)); // a read-fault zero page: not counted
/// assert_eq!((z.global(), z.mm(MmId(1)), z.mm(MmId(2))), (1, 1, 0));
/// ```
#[derive(Clone, Debug, Default)]
pub struct KsmZeroPages {
    global: i64,
    per_mm: FxHashMap<MmId, i64>,
}

impl KsmZeroPages {
    /// No zero pages placed yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// KSM replaced a page of `mm` by a marked zero-page mapping.
    pub fn map_zero_page(&mut self, mm: MmId) {
        self.global += 1;
        *self.per_mm.entry(mm).or_insert(0) += 1;
    }

    /// A mapping of `mm` is going away or being replaced (write fault, zap, unshare).
    /// `marked` says whether it was a KSM-placed zero page; only those are counted.
    /// Returns whether the count fell.
    pub fn might_unmap_zero_page(&mut self, mm: MmId, marked: bool) -> bool {
        if !marked {
            return false;
        }
        let c = self.per_mm.entry(mm).or_insert(0);
        debug_assert!(*c > 0, "ksm_zero_pages of {mm:?} would go negative");
        *c -= 1;
        self.global -= 1;
        true
    }

    /// `child` was forked from `parent` and inherited its marked zero-page mappings.
    pub fn fork(&mut self, parent: MmId, child: MmId) {
        let inherited = self.mm(parent);
        self.per_mm.insert(child, inherited);
        self.global += inherited;
    }

    /// `mm` is gone; all its mappings were zapped before (which brought its count to 0).
    pub fn exit(&mut self, mm: MmId) {
        if let Some(left) = self.per_mm.remove(&mm) {
            debug_assert_eq!(
                left, 0,
                "exit of {mm:?} with marked zero pages still counted"
            );
            self.global -= left;
        }
    }

    /// `/sys/kernel/mm/ksm/ksm_zero_pages`.
    pub fn global(&self) -> i64 {
        self.global
    }

    /// `ksm_zero_pages` of `/proc/<pid>/ksm_stat`.
    pub fn mm(&self, mm: MmId) -> i64 {
        self.per_mm.get(&mm).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_marked_mappings_and_forks_add_to_global() {
        let (a, b) = (MmId(1), MmId(2));
        let mut z = KsmZeroPages::new();
        z.map_zero_page(a);
        z.map_zero_page(a);
        assert!(!z.might_unmap_zero_page(a, false));
        assert_eq!((z.global(), z.mm(a)), (2, 2));
        z.fork(a, b);
        assert_eq!((z.global(), z.mm(b)), (4, 2));
        assert!(z.might_unmap_zero_page(b, true));
        assert_eq!((z.global(), z.mm(a), z.mm(b)), (3, 2, 1));
        assert!(z.might_unmap_zero_page(b, true));
        z.exit(b);
        assert_eq!(z.global(), 2);
    }
}
