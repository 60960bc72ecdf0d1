//! What the agent knows of every page of the regions it manages, shared by its fault
//! handler thread and its executor under one mutex.
//!
//! Lock rule: the mutex is held only for state changes and for userfaultfd ioctls that
//! generate no events (wake, copy, zeropage, write-protect). It is never held across
//! `mmap`, `munmap` or `madvise`, because those block until the handler thread has read the
//! events they cause, and the handler needs the mutex to handle them.

use crate::ops::Change;
use crate::sys::PAGE;
use rustc_hash::FxHashMap;
use samepage_engine::MmId;

/// One page of a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PageState {
    /// An ordinary page of the application: present, or a hole that reads zeros.
    Anon,
    /// A zero page samepage placed: the zero page mapped with the userfaultfd write-protect
    /// bit, which is samepage's "placed by KSM" mark (the kernel's dirty bit). The page
    /// table is the truth (a write turns it into an ordinary page with no message, as
    /// `WP_ASYNC` resolves the fault in the kernel); this state remembers where samepage
    /// placed them, for fork and unmerge.
    Zero,
    /// Merged: a hole whose contents are canonical page `k` of the store. The page's own
    /// memory was freed; a fault on it copies `k` in (the page is then ordinary again).
    Merged(u32),
    /// The executor's transaction owns the page (moved out, being checked); faults on it
    /// wait for the transaction to wake them.
    InFlight,
    /// An ordinary page the application is discarding: the kernel sends the
    /// `UFFD_EVENT_REMOVE` of `MADV_DONTNEED` *before* it zaps the range, and lets
    /// userfaultfd ioctls run again once the event is read. A page moved out and put back
    /// in that window would come back after the zap and undo the discard, so such a page
    /// cannot be claimed while it is still present. The zap leaves a hole, and the next
    /// touch of the hole is a missing-page fault that the handler sees: either one makes
    /// the page `Anon` again.
    Discarding,
    /// The application unmapped it.
    Gone,
}

const ANON: u32 = u32::MAX;
const ZERO: u32 = u32::MAX - 1;
const IN_FLIGHT: u32 = u32::MAX - 2;
const GONE: u32 = u32::MAX - 3;
const DISCARDING: u32 = u32::MAX - 4;
/// Canonical page offsets stay below the values that encode the other states.
pub(crate) const MAX_STORE_OFFSET: u32 = u32::MAX - 16;

impl PageState {
    fn encode(self) -> u32 {
        match self {
            PageState::Anon => ANON,
            PageState::Zero => ZERO,
            PageState::InFlight => IN_FLIGHT,
            PageState::Gone => GONE,
            PageState::Discarding => DISCARDING,
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
            DISCARDING => PageState::Discarding,
            k => PageState::Merged(k),
        }
    }
}

/// The states of a region's pages, 4 bytes each.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct PageStates(Vec<u32>);

/// Bytes per page of [`PageStates`].
pub(crate) const PAGE_STATE_BYTES: usize = std::mem::size_of::<u32>();

impl PageStates {
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
    pub fn iter(&self) -> impl Iterator<Item = PageState> + '_ {
        self.0.iter().map(|&v| PageState::decode(v))
    }
}

/// What the application did to a page while a transaction owned it, by the page's address
/// when the transaction claimed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fate {
    /// Where the page (the hole standing for it, and its `InFlight` state) is now: the
    /// application may have moved it with `mremap`, even several times.
    pub now: u64,
    /// The application discarded it (`MADV_DONTNEED`: it must read zeros) or unmapped it:
    /// its contents must not come back.
    pub dropped: bool,
}

impl Fate {
    /// The state of an ordinary page a transaction gives back, given what the application
    /// did to it meanwhile: a discard whose event came while the transaction owned the page
    /// may not have zapped it yet.
    pub fn released(fate: Option<Fate>) -> PageState {
        if fate.is_some_and(|f| f.dropped) {
            PageState::Discarding
        } else {
            PageState::Anon
        }
    }
}

/// A range of this process the agent manages: registered with its userfaultfd.
#[derive(Debug)]
pub(crate) struct Region {
    /// The engine's address space this range belongs to.
    pub mm: MmId,
    pub start: u64,
    pub pages: PageStates,
    /// `VM_MERGEABLE`: the engine may merge its pages.
    pub mergeable: bool,
    /// Registered with the agent's userfaultfd (from the first time it was mergeable).
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AgentStats {
    /// Faults on merged pages resolved with a private copy because the access was a write
    /// (the copy-on-write break of a merged page).
    pub cow_merged: u64,
    /// Faults on merged pages resolved with a private copy because the access was a read.
    pub read_merged: u64,
    /// Faults on holes that were no merged page: first touches of memory, or accesses after
    /// a discard (each gets the zero page, as without samepage).
    pub missing_faults: u64,
    /// Holes given the zero page after such a fault, ahead of their first touch (a thread
    /// walking fresh memory then faults once per window, not once per page).
    #[serde(default)]
    pub zero_filled_ahead: u64,
    /// Merged pages given their private copy after such a fault, ahead of their first touch
    /// (a thread writing or reading merged pages in a row then faults once per window).
    #[serde(default)]
    pub copied_ahead: u64,
    /// Pages not merged because they are pinned for I/O (`UFFDIO_MOVE` answered EBUSY).
    pub pinned_skipped: u64,
    /// Merges and zero-page placements that failed because the page changed meanwhile.
    pub changed_skipped: u64,
    /// Transactions that found the application had discarded, unmapped or moved the page.
    pub raced_with_application: u64,
    /// Pages taken away that could not be put back where the application left them (no
    /// test has ever seen one: a test fails if it does).
    pub lost_put_backs: u64,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    /// Sorted by start, non-overlapping.
    pub regions: Vec<Region>,
    /// What the application did to pages while a transaction owned them.
    pub fates: FxHashMap<u64, Fate>,
    /// Changes the engine must learn of, in the order they happened.
    pub outbox: Vec<Change>,
    pub stats: AgentStats,
}

impl State {
    /// Index of the region containing `addr`.
    pub fn region_at(&self, addr: u64) -> Option<usize> {
        let i = self.regions.partition_point(|r| r.end() <= addr);
        (i < self.regions.len() && self.regions[i].start <= addr).then_some(i)
    }

    /// Region index, page index and state of `addr`.
    pub fn page(&self, addr: u64) -> Option<(usize, usize, PageState)> {
        let ri = self.region_at(addr)?;
        let i = self.regions[ri].idx(addr);
        Some((ri, i, self.regions[ri].pages.get(i)))
    }

    /// The application did something to the in-flight page now at `at`: record it under
    /// the address the transaction knows the page by.
    pub fn record_fate(&mut self, at: u64, moved_to: Option<u64>) {
        let key = self
            .fates
            .iter()
            .find(|(_, f)| f.now == at)
            .map(|(&k, _)| k)
            .unwrap_or(at);
        let f = self.fates.entry(key).or_insert(Fate {
            now: at,
            dropped: false,
        });
        match moved_to {
            Some(to) => f.now = to,
            None => f.dropped = true,
        }
    }

    /// What happened to the page a transaction claimed at `addr` (and forget it). A page
    /// moved away and back, and not discarded, is as if nothing happened.
    pub fn take_fate(&mut self, addr: u64) -> Option<Fate> {
        self.fates
            .remove(&addr)
            .filter(|f| f.dropped || f.now != addr)
    }

    /// Does any region overlap `[start, end)`?
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.regions
            .iter()
            .any(|r| r.start < end && r.end() > start)
    }

    /// Set a page's state; a merged page that stops being merged tells the engine.
    pub fn set(&mut self, ri: usize, i: usize, new: PageState) -> PageState {
        let r = &mut self.regions[ri];
        let addr = r.start + i as u64 * PAGE;
        let old = r.pages.replace(i, new);
        if let PageState::Merged(k) = old {
            if new != old {
                self.outbox.push(Change::Unmerged { addr, k });
            }
        }
        old
    }

    /// A read copied merged page `i` of region `ri` in: an ordinary page again, which the
    /// engine hears of as a read's copy (it stood for the same contents a moment ago).
    pub fn set_read_copied(&mut self, ri: usize, i: usize) {
        let r = &mut self.regions[ri];
        let addr = r.start + i as u64 * PAGE;
        if let PageState::Merged(k) = r.pages.replace(i, PageState::Anon) {
            self.outbox.push(Change::ReadCopied { addr, k });
        }
    }

    /// Split the region straddling `addr` so that `addr` starts one.
    pub fn split_at(&mut self, addr: u64) {
        if let Some(ri) = self.region_at(addr) {
            let r = &mut self.regions[ri];
            if r.start < addr {
                let at = r.idx(addr);
                let tail = Region {
                    mm: r.mm,
                    start: addr,
                    pages: r.pages.split_off(at),
                    mergeable: r.mergeable,
                    registered: r.registered,
                };
                self.regions.insert(ri + 1, tail);
            }
        }
    }

    /// Forget `[start, end)` (unmapped): every page there is gone.
    pub fn remove_range(&mut self, start: u64, end: u64) {
        self.split_at(start);
        self.split_at(end);
        let mut ri = 0;
        while ri < self.regions.len() {
            let r = &self.regions[ri];
            if r.start >= start && r.end() <= end {
                for i in 0..r.pages.len() {
                    self.set(ri, i, PageState::Gone);
                }
                self.regions.remove(ri);
            } else {
                ri += 1;
            }
        }
    }

    /// Bytes of page states.
    pub fn state_bytes(&self) -> usize {
        self.regions.iter().map(|r| r.pages.len()).sum::<usize>() * PAGE_STATE_BYTES
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
            PageState::Discarding,
            PageState::Merged(0),
            PageState::Merged(MAX_STORE_OFFSET),
        ];
        let mut p = PageStates::new(all.len());
        assert!(p.iter().all(|s| s == PageState::Anon));
        for (i, s) in all.iter().enumerate() {
            p.set(i, *s);
        }
        assert_eq!(p.iter().collect::<Vec<_>>(), all);
        assert_eq!(p.replace(5, PageState::Anon), PageState::Merged(0));
        let tail = p.split_off(3);
        assert_eq!((p.len(), tail.len()), (3, 4));
        assert_eq!(tail.get(0), PageState::Gone);
    }

    #[test]
    fn leaving_a_merged_state_is_reported_once() {
        let mut st = State::default();
        st.regions.push(Region {
            mm: MmId(1),
            start: 0x10000,
            pages: PageStates::new(4),
            mergeable: true,
            registered: false,
        });
        st.set(0, 1, PageState::Merged(7));
        st.set(0, 1, PageState::Merged(7));
        assert!(st.outbox.is_empty());
        st.set(0, 1, PageState::Anon);
        assert_eq!(
            st.outbox,
            vec![Change::Unmerged {
                addr: 0x11000,
                k: 7
            }]
        );
        st.remove_range(0x11000, 0x13000);
        assert_eq!(st.regions.len(), 2);
        assert_eq!(st.regions[0].end(), 0x11000);
        assert_eq!(st.regions[1].start, 0x13000);
    }
}
