//! Checks of the page tables against samepage's counters: the ground truth of
//! `ksm_zero_pages` is the number of zero-page entries that carry samepage's mark (the
//! userfaultfd write-protect bit), which PAGEMAP_SCAN reports; merged pages must share one
//! physical page per canonical page, which `/proc/self/pagemap` shows.

use crate::live::LiveKsm;
use crate::state::{PageState, PageStates};
use crate::sys::{self, PAGE, PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_WRITTEN};
use rustc_hash::FxHashMap;
use samepage_engine::{Memory, MmId, PAGE_SIZE};
use serde::Serialize;
use std::collections::BTreeMap;

/// What the page tables say, next to what the counters say.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Verification {
    /// Zero-page entries with samepage's mark, per address space.
    pub marked_zero_pages: BTreeMap<u32, i64>,
    /// `ksm_zero_pages` per address space.
    pub counted_zero_pages: BTreeMap<u32, i64>,
    /// Global `ksm_zero_pages`.
    pub counted_zero_pages_global: i64,
    /// Pages mapped from canonical pages.
    pub merged_pages: u64,
    /// Distinct canonical pages they map.
    pub canonical_pages: u64,
    /// Merged pages whose physical page differs from the others of their canonical page.
    pub pfn_mismatches: u64,
    /// Whether physical page numbers were visible (root).
    pub pfns_checked: bool,
}

impl Verification {
    /// Problems found, as sentences; empty when everything matches.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let marked: i64 = self.marked_zero_pages.values().sum();
        if marked != self.counted_zero_pages_global {
            p.push(format!(
                "ksm_zero_pages is {} but {} zero-page entries carry samepage's mark",
                self.counted_zero_pages_global, marked
            ));
        }
        for (mm, m) in &self.marked_zero_pages {
            let c = self.counted_zero_pages.get(mm).copied().unwrap_or(0);
            if c != *m {
                p.push(format!(
                    "address space {mm}: ksm_zero_pages is {c} but {m} entries carry the mark"
                ));
            }
        }
        if self.pfn_mismatches > 0 {
            p.push(format!(
                "{} merged pages do not map the physical page of their canonical page",
                self.pfn_mismatches
            ));
        }
        p
    }
}

/// A region's address space, bounds and page states, copied out of the lock.
type RegionCopy = (MmId, u64, u64, PageStates);

impl LiveKsm {
    /// Compare the page tables with the counters while no scan batch runs. Merged pages are
    /// read once (which maps them in, still write-protected) so that their physical pages can
    /// be compared.
    pub fn verify(&self) -> Verification {
        let sh = self.shared().clone();
        self.quiescent(|_, mem| {
            sh.reconcile();
            let mut v = Verification {
                counted_zero_pages_global: mem.ksm_zero_pages(None),
                ..Verification::default()
            };
            let (regions, mms): (Vec<RegionCopy>, Vec<MmId>) = {
                let st = sh.lock();
                (
                    st.regions
                        .iter()
                        .map(|r| (r.mm, r.start, r.end(), r.pages.clone()))
                        .collect(),
                    st.mms.iter().copied().collect(),
                )
            };
            for mm in mms {
                v.counted_zero_pages
                    .insert(mm.0, mem.ksm_zero_pages(Some(mm)));
                v.marked_zero_pages.insert(mm.0, 0);
            }
            let mut buf = [0u8; PAGE_SIZE];
            let mut pfn_of: FxHashMap<u32, u64> = FxHashMap::default();
            for (mm, start, end, pages) in regions {
                let marked: u64 = sys::pagemap_scan(
                    &sh.pagemap,
                    start,
                    end,
                    PAGE_IS_PRESENT | PAGE_IS_PFNZERO,
                    PAGE_IS_WRITTEN,
                    PAGE_IS_PFNZERO,
                )
                .unwrap_or_default()
                .iter()
                .map(|r| (r.end - r.start) / PAGE)
                .sum();
                *v.marked_zero_pages.entry(mm.0).or_default() += marked as i64;
                for (i, s) in pages.iter().enumerate() {
                    let PageState::Merged(k) = s else { continue };
                    let a = start + i as u64 * PAGE;
                    v.merged_pages += 1;
                    let _ = sys::read_self(a, &mut buf);
                    let e = sys::pagemap_entry(&sh.pagemap, a).unwrap_or(0);
                    let pfn = e & sys::PM_PFN_MASK;
                    if pfn == 0 {
                        continue; // not visible without CAP_SYS_ADMIN
                    }
                    v.pfns_checked = true;
                    match pfn_of.get(&k) {
                        Some(&p) if p != pfn => v.pfn_mismatches += 1,
                        Some(_) => {}
                        None => {
                            pfn_of.insert(k, pfn);
                        }
                    }
                }
            }
            v.canonical_pages = {
                let st = sh.lock();
                st.store_refs.len() as u64
            };
            v
        })
    }
}
