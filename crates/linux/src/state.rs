//! What samepage knows about every page of the regions it manages, shared by the scanning
//! thread and the userfaultfd handler thread under one mutex.
//!
//! Lock rule: the mutex is held only for state changes and for userfaultfd ioctls that
//! generate no events (write-protect, wake, zeropage). It is never held across `mmap`,
//! `munmap` or `madvise`, because those block until the handler thread has read the events
//! they generate, and the handler needs the mutex.

use rustc_hash::FxHashMap;
use samepage_engine::{KsmZeroPages, MmId};
use std::collections::BTreeSet;
use std::time::Instant;

use crate::sys::PAGE;

/// One page of a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PageState {
    /// An ordinary private page of the application (or a hole).
    Anon,
    /// A zero page samepage placed: the zero PFN with the userfaultfd write-protect bit, which
    /// is samepage's "placed by KSM" mark (the kernel's dirty bit). Counted in `ksm_zero_pages`.
    Zero,
    /// Mapped copy-on-write from canonical page `k` of the store; write-protected.
    Merged(u32),
    /// A transaction of the scanning thread owns the page; faults on it wait for its wake.
    InFlight,
    /// The application unmapped it.
    Gone,
}

const ANON: u32 = u32::MAX;
const ZERO: u32 = u32::MAX - 1;
const IN_FLIGHT: u32 = u32::MAX - 2;
const GONE: u32 = u32::MAX - 3;
/// Canonical page offsets stay below the values that encode the other states.
pub(crate) const MAX_STORE_OFFSET: u32 = u32::MAX - 4;

/// The states of a region's pages, 4 bytes each: a canonical page's offset for `Merged`, one
/// of the values above [`MAX_STORE_OFFSET`] for the others.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct PageStates(Vec<u32>);

/// Bytes per page of [`PageStates`].
pub(crate) const PAGE_STATE_BYTES: usize = std::mem::size_of::<u32>();

impl PageState {
    fn encode(self) -> u32 {
        match self {
            PageState::Anon => ANON,
            PageState::Zero => ZERO,
            PageState::InFlight => IN_FLIGHT,
            PageState::Gone => GONE,
            PageState::Merged(k) => {
                debug_assert!(k <= MAX_STORE_OFFSET);
                k
            }
        }
    }

    fn decode(v: u32) -> Self {
        match v {
            ANON => PageState::Anon,
            ZERO => PageState::Zero,
            IN_FLIGHT => PageState::InFlight,
            GONE => PageState::Gone,
            k => PageState::Merged(k),
        }
    }
}

impl PageStates {
    /// `n` ordinary pages.
    pub fn new(n: usize) -> Self {
        Self(vec![ANON; n])
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn get(&self, i: usize) -> PageState {
        PageState::decode(self.0[i])
    }
    pub fn set(&mut self, i: usize, s: PageState) {
        self.0[i] = s.encode();
    }
    pub fn replace(&mut self, i: usize, s: PageState) -> PageState {
        PageState::decode(std::mem::replace(&mut self.0[i], s.encode()))
    }
    pub fn split_off(&mut self, at: usize) -> Self {
        Self(self.0.split_off(at))
    }
    /// The states of pages `from..to`.
    pub fn range(&self, from: usize, to: usize) -> impl Iterator<Item = PageState> + '_ {
        self.0[from..to].iter().map(|&v| PageState::decode(v))
    }
    pub fn iter(&self) -> impl Iterator<Item = PageState> + '_ {
        self.range(0, self.len())
    }
}

/// What the application did to a page while the scanner's transaction owned it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Discard {
    /// MADV_DONTNEED: it must read zeros afterwards.
    Removed,
    /// munmap: the address is not the application's memory any more.
    Unmapped,
    /// mremap: the page (its mapping) is now at this address.
    Moved(u64),
}

/// A range of this process that samepage manages.
#[derive(Debug)]
pub(crate) struct Region {
    pub mm: MmId,
    pub start: u64,
    pub pages: PageStates,
    /// `VM_MERGEABLE`: the scanner visits it.
    pub mergeable: bool,
    /// samepage mapped it (and unmaps it when it is dropped).
    pub owned: bool,
    /// Registered with the userfaultfd. Registration stays when the region stops being
    /// mergeable: registering again would overwrite the modes of the merged mappings in it.
    pub registered: bool,
}

impl Region {
    pub fn end(&self) -> u64 {
        self.start + self.pages.len() as u64 * PAGE
    }
    pub fn idx(&self, addr: u64) -> usize {
        ((addr - self.start) / PAGE) as usize
    }
}

/// Counters of what happened to merged and zero pages, for reports.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct LiveStats {
    /// Writes that broke a KSM-placed zero page (copy-on-write).
    pub cow_zero: u64,
    /// Writes that broke a merged page.
    pub cow_merged: u64,
    /// Missing faults resolved (first touches of holes in registered regions).
    pub missing_faults: u64,
    /// Pages skipped because they are pinned (UFFDIO_MOVE answered EBUSY).
    pub pinned_skipped: u64,
    /// Merges refused because the mapping budget was used up.
    pub budget_refused: u64,
    /// The mapping budget is used up (vm.max_map_count minus the application's reserve).
    pub budget_exhausted: bool,
    /// Canonical pages whose memory was released.
    pub store_pages_freed: u64,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    /// Sorted by start, non-overlapping.
    pub regions: Vec<Region>,
    pub mms: BTreeSet<MmId>,
    pub zero: KsmZeroPages,
    /// Canonical page offset → pages in state `Merged(offset)`.
    pub store_refs: FxHashMap<u32, u32>,
    /// Canonical pages some page stopped mapping, with the addresses that did, to check
    /// before the page's memory is released.
    pub departed: FxHashMap<u32, Vec<u64>>,
    /// Canonical pages that stay mapped outside samepage's regions (moved away by mremap):
    /// their memory is never released.
    pub escaped: BTreeSet<u32>,
    pub next_offset: u32,
    /// Pages the scanner is replacing with `MAP_FIXED`, and whether the UNMAP event that
    /// causes has come: the first UNMAP of such a page is samepage's own. None coming means
    /// the mapping replaced nothing of the application's (it had moved or unmapped the page).
    pub own_unmaps: FxHashMap<u64, bool>,
    /// Pages the application discarded or unmapped while a transaction of the scanner owned
    /// them: the transaction must leave them reading zeros (or not map them at all).
    pub discarded: FxHashMap<u64, Discard>,
    /// Ranges the application discarded (REMOVE events): zero pages in them are re-checked
    /// before the count is read, since the discard happens after the event is read.
    pub dirty: Vec<(u64, u64, Instant)>,
    pub stats: LiveStats,
}

impl State {
    /// Index of the region containing `addr`.
    pub fn region_at(&self, addr: u64) -> Option<usize> {
        let i = self.regions.partition_point(|r| r.end() <= addr);
        (i < self.regions.len() && self.regions[i].start <= addr).then_some(i)
    }

    /// The state of the page at `addr` in a region of `mm`.
    pub fn page(&self, mm: MmId, addr: u64) -> Option<(usize, usize, PageState)> {
        let ri = self.region_at(addr)?;
        let r = &self.regions[ri];
        (r.mm == mm).then(|| {
            let i = r.idx(addr);
            (ri, i, r.pages.get(i))
        })
    }

    /// A page leaves `Merged(k)` (written, unmerged, unmapped): drop the reference and
    /// remember the address for the release check.
    pub fn drop_store_ref(&mut self, k: u32, addr: u64) {
        let r = self
            .store_refs
            .get_mut(&k)
            .expect("referenced canonical page");
        *r -= 1;
        if *r == 0 {
            self.store_refs.remove(&k);
        }
        self.departed.entry(k).or_default().push(addr);
    }

    /// What happens when the page at `addr` stops being what samepage placed there.
    pub fn forget_page(&mut self, ri: usize, i: usize, new: PageState) {
        let addr = self.regions[ri].start + i as u64 * PAGE;
        let mm = self.regions[ri].mm;
        match self.regions[ri].pages.replace(i, new) {
            PageState::Zero => {
                self.zero.might_unmap_zero_page(mm, true);
            }
            PageState::Merged(k) => self.drop_store_ref(k, addr),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_states_round_trip_in_four_bytes() {
        let all = [
            PageState::Anon,
            PageState::Zero,
            PageState::InFlight,
            PageState::Gone,
            PageState::Merged(0),
            PageState::Merged(MAX_STORE_OFFSET),
        ];
        let mut p = PageStates::new(all.len());
        assert!(p.iter().all(|s| s == PageState::Anon));
        for (i, s) in all.iter().enumerate() {
            p.set(i, *s);
        }
        assert_eq!(p.iter().collect::<Vec<_>>(), all);
        assert_eq!(p.replace(4, PageState::Anon), PageState::Merged(0));
        let tail = p.split_off(3);
        assert_eq!((p.len(), tail.len()), (3, 3));
        assert_eq!(tail.get(0), PageState::Gone);
    }
}
