//! A target: one process whose memory ksmd merges, as ksmd sees it. ksmd reads its pages
//! (`process_vm_readv`) and page tables (`PAGEMAP_SCAN` on `/proc/PID/pagemap`) directly,
//! keeps a mirror of its regions with the canonical page each merged page stands for, and
//! asks its agent, through an [`AgentLink`], to carry out every change to its memory.

use crate::agent::Agent;
use crate::ops::{Change, Op};
use crate::sys::pagemap::{Pagemap, PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_WRITTEN};
use crate::sys::PAGE;
use rustc_hash::FxHashMap;
use samepage_engine::MmId;
use std::collections::BTreeSet;
use std::io;
use std::sync::Arc;

/// How ksmd reaches a target's agent: in this process, or across a daemon client's socket.
pub trait AgentLink: Send {
    /// Have the agent run `ops` as batch `seq`; returns once the batch is over, its changes
    /// ending with `Change::BatchDone { seq }` ready for [`AgentLink::drain`].
    fn execute(&mut self, seq: u64, ops: &[Op]) -> io::Result<()>;
    /// Append the changes the agent reported since the last call, in order.
    fn drain(&mut self, out: &mut Vec<Change>);
    /// KSM-placed zero pages of `mm` if the agent can count them itself (in this process);
    /// `None`: ksmd counts them in the target's page tables.
    fn zero_pages(&self, mm: MmId) -> Option<i64>;
    /// The agent is gone (its process exited or its connection broke).
    fn gone(&self) -> bool;
}

/// The link to an agent of this process.
pub(crate) struct LocalLink(pub Arc<Agent>);

impl AgentLink for LocalLink {
    fn execute(&mut self, seq: u64, ops: &[Op]) -> io::Result<()> {
        self.0.execute(seq, ops);
        Ok(())
    }
    fn drain(&mut self, out: &mut Vec<Change>) {
        self.0.take_outbox(out);
    }
    fn zero_pages(&self, mm: MmId) -> Option<i64> {
        Some(self.0.zero_pages(Some(mm)))
    }
    fn gone(&self) -> bool {
        false
    }
}

/// Not merged (or not known to be).
pub(crate) const NONE: u32 = u32::MAX;

/// ksmd's mirror of one region of a target.
#[derive(Debug)]
pub(crate) struct MirrorRegion {
    pub mm: MmId,
    pub start: u64,
    /// Per page: the canonical page it stands for, or [`NONE`].
    pub pages: Vec<u32>,
    pub mergeable: bool,
}

impl MirrorRegion {
    pub fn end(&self) -> u64 {
        self.start + self.pages.len() as u64 * PAGE
    }
    pub fn idx(&self, addr: u64) -> usize {
        ((addr - self.start) / PAGE) as usize
    }
}

/// One process whose memory ksmd merges.
pub(crate) struct Target {
    /// Its pid (that of this process for the in-process engine).
    pub pid: u32,
    /// Its security domain: the store its pages are merged into.
    pub domain: u32,
    pub pagemap: Pagemap,
    pub link: Box<dyn AgentLink>,
    /// Sorted by start, non-overlapping.
    pub regions: Vec<MirrorRegion>,
    /// Pages of this target standing for each canonical page.
    pub refs: FxHashMap<u32, u32>,
    /// Operations queued for the end of the chunk.
    pub queue: Vec<Op>,
    /// The merges among them: address and canonical page.
    pub inflight: FxHashMap<u64, u32>,
    /// Batches sent.
    pub seq: u64,
    /// The address spaces of the engine whose regions live in this target.
    pub mms: Vec<MmId>,
    /// The process is gone (or left): its address spaces read as exiting.
    pub gone: bool,
    /// The process disconnected (alive or not): no more batches go to it.
    pub detached: bool,
    /// A batch was sent and its end has not come back (the agent is slow, stopped, or
    /// gone): no batch goes to it until it does, and the merges of that batch stay
    /// outstanding, keeping their canonical pages, since the agent may still carry them out.
    pub stalled: bool,
    /// When it was last asked to register memory mapped since (`Op::Refresh`).
    pub refreshed: Option<std::time::Instant>,
    /// Pages that stood for a canonical page until a read copied it in, not visited by the
    /// scan since ([`samepage_engine::memory::PageRef::read_copy`]).
    pub read_copied: BTreeSet<u64>,
}

impl Target {
    pub fn new(pid: u32, domain: u32, link: Box<dyn AgentLink>) -> io::Result<Self> {
        Ok(Self {
            pid,
            domain,
            pagemap: Pagemap::open(pid)?,
            link,
            regions: Vec::new(),
            refs: FxHashMap::default(),
            queue: Vec::new(),
            inflight: FxHashMap::default(),
            seq: 0,
            mms: Vec::new(),
            gone: false,
            detached: false,
            read_copied: BTreeSet::new(),
            stalled: false,
            refreshed: None,
        })
    }

    /// Index of the region containing `addr`.
    pub fn region_at(&self, addr: u64) -> Option<usize> {
        let i = self.regions.partition_point(|r| r.end() <= addr);
        (i < self.regions.len() && self.regions[i].start <= addr).then_some(i)
    }

    /// The canonical page `addr` stands for.
    pub fn merged(&self, addr: u64) -> Option<u32> {
        let ri = self.region_at(addr)?;
        let r = &self.regions[ri];
        let k = r.pages[r.idx(addr)];
        (k != NONE).then_some(k)
    }

    /// Split the region straddling `addr`.
    pub fn split_at(&mut self, addr: u64) {
        if let Some(ri) = self.region_at(addr) {
            let r = &mut self.regions[ri];
            if r.start < addr {
                let at = r.idx(addr);
                let tail = MirrorRegion {
                    mm: r.mm,
                    start: addr,
                    pages: r.pages.split_off(at),
                    mergeable: r.mergeable,
                };
                self.regions.insert(ri + 1, tail);
            }
        }
    }

    /// Add a region (the agent registered it).
    pub fn add_region(&mut self, mm: MmId, start: u64, end: u64, mergeable: bool) {
        let i = self.regions.partition_point(|r| r.start < start);
        self.regions.insert(
            i,
            MirrorRegion {
                mm,
                start,
                pages: vec![NONE; ((end - start) / PAGE) as usize],
                mergeable,
            },
        );
        if !self.mms.contains(&mm) {
            self.mms.push(mm);
        }
    }

    /// Remove `[start, end)` from the mirror; returns the canonical pages its merged pages
    /// stood for (their references are to be dropped).
    pub fn remove_range(&mut self, start: u64, end: u64) -> Vec<u32> {
        self.split_at(start);
        self.split_at(end);
        let mut dropped = Vec::new();
        self.regions.retain(|r| {
            let inside = r.start >= start && r.end() <= end;
            if inside {
                dropped.extend(r.pages.iter().copied().filter(|&k| k != NONE));
            }
            !inside
        });
        for &k in &dropped {
            dec(&mut self.refs, k);
        }
        take_range(&mut self.read_copied, start, end);
        dropped
    }

    /// Forget that pages of `[start, end)` were copied by reads.
    pub fn forget_read_copies(&mut self, start: u64, end: u64) {
        take_range(&mut self.read_copied, start, end);
    }

    /// Move `[from, from + len)` to `to` (the application's mremap), states included.
    /// Returns the canonical pages of merged pages the move dropped (at the destination).
    pub fn move_range(&mut self, from: u64, to: u64, len: u64) -> Vec<u32> {
        let end = from + len;
        self.split_at(from);
        self.split_at(end);
        let mut taken = Vec::new();
        let mut i = 0;
        while i < self.regions.len() {
            if self.regions[i].start >= from && self.regions[i].end() <= end {
                taken.push(self.regions.remove(i));
            } else {
                i += 1;
            }
        }
        let moved = take_range(&mut self.read_copied, from, end);
        let dropped = self.remove_range(to, to + len);
        self.read_copied
            .extend(moved.into_iter().map(|a| a - from + to));
        for mut r in taken {
            r.start = r.start - from + to;
            let i = self.regions.partition_point(|x| x.start < r.start);
            self.regions.insert(i, r);
        }
        dropped
    }

    /// KSM-placed zero pages of `mm` now.
    pub fn zero_pages(&self, mm: MmId) -> i64 {
        if let Some(n) = self.link.zero_pages(mm) {
            return n;
        }
        // Marked zero pages can only be in ranges registered with samepage's userfaultfd:
        // the whole address space is scanned, so that a region the application just moved
        // is counted even before its change is applied.
        self.pagemap
            .count(
                0,
                USER_SPACE_END,
                PAGE_IS_PRESENT | PAGE_IS_PFNZERO,
                PAGE_IS_WRITTEN,
            )
            .unwrap_or(0) as i64
    }
}

/// Take the addresses in `[start, end)` out of `set` (none if the range is empty or
/// reversed: `BTreeSet::range` would panic on a reversed one).
fn take_range(set: &mut BTreeSet<u64>, start: u64, end: u64) -> Vec<u64> {
    if start >= end {
        return Vec::new();
    }
    let taken: Vec<u64> = set.range(start..end).copied().collect();
    for a in &taken {
        set.remove(a);
    }
    taken
}

/// The end of user space on x86-64 with 4-level page tables.
pub(crate) const USER_SPACE_END: u64 = 0x7fff_ffff_f000;

pub(crate) fn dec(m: &mut FxHashMap<u32, u32>, k: u32) {
    if let Some(n) = m.get_mut(&k) {
        *n -= 1;
        if *n == 0 {
            m.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_of_marks_are_taken_out_and_reversed_ones_are_empty() {
        let mut set: BTreeSet<u64> = [0x1000, 0x2000, 0x3000, 0x9000].into_iter().collect();
        assert_eq!(take_range(&mut set, 0x2000, 0x9000), [0x2000, 0x3000]);
        assert_eq!(set.len(), 2);
        // What an agent could send: nothing happens, nothing panics.
        assert!(take_range(&mut set, 0x9000, 0x1000).is_empty());
        assert!(take_range(&mut set, 0x9000, 0x9000).is_empty());
        assert_eq!(set.len(), 2);
    }
}
