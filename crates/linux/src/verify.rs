//! Checks of the page tables against what samepage believes: `ksm_zero_pages` is the
//! number of zero-page entries carrying samepage's mark (the userfaultfd write-protect bit)
//! as `PAGEMAP_SCAN` reads them, and every mark must be one samepage placed; every merged
//! page must be a hole (its memory freed, its contents in the canonical page), and ksmd's
//! mirror must agree with the agent on which canonical page it stands for.

use crate::agent::state::PageState;
use crate::live::LiveKsm;
use crate::sys::pagemap::{PageRegion, PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_WRITTEN};
use crate::sys::PAGE;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What the page tables say, next to what the counters and the bookkeeping say.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Verification {
    /// Zero-page entries with samepage's mark, per address space.
    pub marked_zero_pages: BTreeMap<u32, i64>,
    /// `ksm_zero_pages` per address space.
    pub counted_zero_pages: BTreeMap<u32, i64>,
    /// Global `ksm_zero_pages`.
    pub counted_zero_pages_global: i64,
    /// Marked zero pages where the agent did not place one.
    pub stray_marks: u64,
    /// Merged pages (holes standing for a canonical page).
    pub merged_pages: u64,
    /// Distinct canonical pages they stand for.
    pub canonical_pages: u64,
    /// Merged pages that have memory of their own (a page is mapped there).
    pub present_merged: u64,
    /// Pages where ksmd's mirror and the agent disagree on the canonical page.
    pub mirror_mismatches: u64,
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
        if self.stray_marks > 0 {
            p.push(format!(
                "{} zero-page entries carry samepage's mark where it placed no zero page",
                self.stray_marks
            ));
        }
        if self.present_merged > 0 {
            p.push(format!(
                "{} merged pages still have memory of their own",
                self.present_merged
            ));
        }
        if self.mirror_mismatches > 0 {
            p.push(format!(
                "{} pages are merged into different canonical pages in ksmd's view and the \
                 agent's",
                self.mirror_mismatches
            ));
        }
        p
    }
}

impl LiveKsm {
    /// What a daemon's client can check by itself: every mark is one its agent placed, and
    /// every merged page is a hole.
    fn verify_agent(&self) -> Verification {
        let agent = self.agent();
        let st = agent.lock();
        let mut v = Verification::default();
        let mut canonical = std::collections::BTreeSet::new();
        let mut runs: Vec<PageRegion> = Vec::new();
        for r in &st.regions {
            runs.clear();
            let _ = agent.pagemap.scan(
                r.start,
                r.end(),
                PAGE_IS_PRESENT | PAGE_IS_PFNZERO,
                PAGE_IS_WRITTEN,
                PAGE_IS_PRESENT,
                &mut runs,
            );
            let marked: u64 = runs.iter().map(|x| (x.end - x.start) / PAGE).sum();
            *v.marked_zero_pages.entry(r.mm.0).or_default() += marked as i64;
            for x in &runs {
                v.stray_marks += (x.start..x.end)
                    .step_by(PAGE as usize)
                    .filter(|&a| r.pages.get(r.idx(a)) != PageState::Zero)
                    .count() as u64;
            }
            runs.clear();
            let _ = agent.pagemap.scan(
                r.start,
                r.end(),
                PAGE_IS_PRESENT,
                0,
                PAGE_IS_PRESENT,
                &mut runs,
            );
            for (i, s) in r.pages.iter().enumerate() {
                if let PageState::Merged(k) = s {
                    let a = r.start + i as u64 * PAGE;
                    v.merged_pages += 1;
                    canonical.insert(k);
                    if runs.iter().any(|x| x.start <= a && a < x.end) {
                        v.present_merged += 1;
                    }
                }
            }
        }
        drop(st);
        v.canonical_pages = canonical.len() as u64;
        for &mm in v.marked_zero_pages.keys() {
            v.counted_zero_pages
                .insert(mm, self.ksm_stat(samepage_engine::MmId(mm)).ksm_zero_pages);
        }
        v.counted_zero_pages_global = v.counted_zero_pages.values().sum();
        v
    }

    /// Compare the page tables with the counters and the bookkeeping, between two chunks
    /// of a scan (and with the fault handler holding still).
    pub fn verify(&self) -> Verification {
        let agent = self.agent().clone();
        let Some(ksmd) = self.ksmd() else {
            return self.verify_agent();
        };
        ksmd.quiescent(|_, mem| {
            let st = agent.lock();
            let mut v = Verification::default();
            let mut canonical = std::collections::BTreeSet::new();
            let mut runs: Vec<PageRegion> = Vec::new();
            for r in &st.regions {
                runs.clear();
                let _ = agent.pagemap.scan(
                    r.start,
                    r.end(),
                    PAGE_IS_PRESENT | PAGE_IS_PFNZERO,
                    PAGE_IS_WRITTEN,
                    PAGE_IS_PRESENT,
                    &mut runs,
                );
                let marked: u64 = runs.iter().map(|x| (x.end - x.start) / PAGE).sum();
                *v.marked_zero_pages.entry(r.mm.0).or_default() += marked as i64;
                for x in &runs {
                    let mut a = x.start;
                    while a < x.end {
                        if r.pages.get(r.idx(a)) != PageState::Zero {
                            v.stray_marks += 1;
                        }
                        a += PAGE;
                    }
                }
                runs.clear();
                let _ = agent.pagemap.scan(
                    r.start,
                    r.end(),
                    PAGE_IS_PRESENT,
                    0,
                    PAGE_IS_PRESENT,
                    &mut runs,
                );
                for (i, s) in r.pages.iter().enumerate() {
                    let a = r.start + i as u64 * PAGE;
                    let agent_k = match s {
                        PageState::Merged(k) => Some(k),
                        _ => None,
                    };
                    if let Some(k) = agent_k {
                        v.merged_pages += 1;
                        canonical.insert(k);
                        if runs.iter().any(|x| x.start <= a && a < x.end) {
                            v.present_merged += 1;
                        }
                    }
                    if mem.merged_at(a) != agent_k {
                        v.mirror_mismatches += 1;
                    }
                }
            }
            v.canonical_pages = canonical.len() as u64;
            drop(st);
            for &mm in v.marked_zero_pages.keys() {
                v.counted_zero_pages
                    .insert(mm, self.ksm_stat(samepage_engine::MmId(mm)).ksm_zero_pages);
            }
            v.counted_zero_pages_global = self.counters().ksm_zero_pages;
            v
        })
    }
}
