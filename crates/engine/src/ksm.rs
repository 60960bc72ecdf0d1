//! The scanner: `mm/ksm.c`'s algorithm over a [`Memory`] backend (see the crate
//! documentation for the algorithm).

use crate::advisor::{AdvisorCtx, AdvisorKnobs, Clock};
use crate::counters::{KsmCounters, KsmStat};
use crate::heap::hash_map_bytes;
use crate::memory::{FailedMerge, Memory, MergeError, MergeInto, PageRef, UnmergeError};
use crate::page::{zero_page_hash, DomainId, FrameId, MmId, PAGE_SIZE_U64};
use crate::rmap::{ItemState, Items, UnstableIndex, NIL};
use crate::stable::{Key, NodeKind, StableNodes};
use crate::tunables::{parse_knob, AdvisorMode, KnobError, KnobValue, Run, Tunables};
use rustc_hash::FxHashMap;

pub use crate::rmap::RMAP_ITEM_BYTES;

/// Entries a scratch list of the scan keeps room for between batches.
const SCRATCH_KEPT: usize = 32;

/// Per-address-space state that the kernel keeps in `mm_struct`.
#[derive(Clone, Debug, Default)]
struct MmState {
    /// `MMF_VM_MERGE_ANY` (prctl).
    merge_any: bool,
    /// `MMF_VM_MERGEABLE`: the mm has a slot on the scan list.
    registered: bool,
    ksm_rmap_items: u64,
    ksm_merging_pages: u64,
    /// The security domain whose pages this mm's pages may merge with.
    domain: DomainId,
}

/// `struct ksm_mm_slot`. Its `rmap_list` is the mm's items in [`Items`], by address; the
/// items below `next` were visited in this pass, so any left between `next` and the page
/// visited now belong to pages that are gone.
#[derive(Clone, Debug)]
struct MmSlot {
    mm: MmId,
    next: u64,
    /// The mm's security domain (kept here too: the scan needs it for every page).
    domain: DomainId,
}

/// Why [`Ksm::set_domain`] refused.
#[derive(Clone, Copy, Debug, thiserror::Error, PartialEq, Eq)]
pub enum DomainError {
    /// The address space's pages were scanned under its current domain already.
    #[error(
        "{mm:?} cannot move to {domain:?}: its pages were scanned in its current domain;          set the domain before it is scanned (or after run=2)"
    )]
    AlreadyScanned {
        /// The address space.
        mm: MmId,
        /// The domain it was to move to.
        domain: DomainId,
    },
}

/// What [`Ksm::exit`] did with an exited address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmExit {
    /// Everything of the mm is freed: the backend may forget it.
    Released,
    /// The mm stays on the scan list until the scan frees its rmap items (it had some, or
    /// the scan cursor was on it); [`Ksm::mm_released`] says when.
    Deferred,
}

/// What one call of [`Ksm::do_scan`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanBatch {
    /// Pages passed to `cmp_and_merge_page` (added to `pages_scanned`).
    pub scanned: u64,
    /// The batch ended because a full scan completed.
    pub full_scan_done: bool,
    /// Merges the backend accepted and then reported failed
    /// ([`Memory::take_failed_merges`]); the engine undid them.
    pub merges_failed: u64,
}

/// The engine: every tunable, counter, tree and rmap item of KSM, for the address spaces of
/// one [`Memory`] backend.
///
/// The backend's memory manager calls the entry points where the kernel calls KSM's hooks
/// ([`Ksm::madvise_mergeable`], [`Ksm::prctl_set_memory_merge`], [`Ksm::new_vma_mergeable`],
/// [`Ksm::fork`], [`Ksm::execve`], [`Ksm::exit`]); a scanner thread (ksmd) calls
/// [`Ksm::ksmd_batch`] every `sleep_millisecs`; the knobs and counters of
/// `/sys/kernel/mm/ksm` are [`Ksm::write_knob`], [`Ksm::show`] and [`Ksm::counters`].
///
/// ```
/// use samepage_engine::{Clock, Ksm, Memory, PAGE_SIZE_U64 as PS};
/// use samepage_sim::{Prot, SimMemory, VirtualClock};
/// let mut mem = SimMemory::new();
/// let mut ksm = Ksm::new();
/// let mm = mem.create_mm();
/// let a = mem.mmap(mm, 8 * PS, Prot::RW, false, 0).unwrap();
/// for i in 0..8 {
///     mem.write(mm, a + i * PS, &[0x5a; 4096]).unwrap();
/// }
/// ksm.madvise_mergeable(&mut mem, mm, a, a + 8 * PS);
/// ksm.write_knob(&mut mem, "run", "1").unwrap();
/// let clock = VirtualClock::default();
/// while ksm.full_scans() < 2 {
///     // A page merges on its second visit: two full scans.
///     ksm.ksmd_batch(&mut mem, &clock);
/// }
/// let c = ksm.counters(&mem);
/// assert_eq!((c.pages_shared, c.pages_sharing), (1, 7));
/// assert_eq!(ksm.ksm_stat(&mem, mm).ksm_merging_pages, 8);
/// ksm.write_knob(&mut mem, "run", "2").unwrap(); // unmerge everything
/// assert_eq!(ksm.counters(&mem).pages_sharing, 0);
/// ```
#[derive(Debug)]
pub struct Ksm {
    tun: Tunables,
    zero_checksum: u32,
    pages_shared: u64,
    pages_sharing: u64,
    pages_unshared: u64,
    pages_scanned: u64,
    pages_skipped: u64,
    stable_node_chains: u64,
    stable_node_dups: u64,
    /// `ksm_scan.seqnr`, i.e. `full_scans`.
    seqnr: u64,
    /// Merges the backend accepted and then reported failed, since the engine was made.
    merges_failed: u64,
    mms: FxHashMap<MmId, MmState>,
    /// The scan list (`ksm_mm_head`).
    slots: Vec<MmSlot>,
    /// `ksm_scan.mm_slot`; `None` is the list head (between full scans).
    cur: Option<usize>,
    /// `ksm_scan.address`.
    address: u64,
    items: Items,
    /// Stable nodes, the stable tree's index, and which node a KSM page belongs to.
    nodes: StableNodes,
    unstable: UnstableIndex,
    advisor: AdvisorCtx,
    /// The new KSM pages of this batch (`try_to_merge_two_pages`), until the backend says
    /// which of its accepted merges failed.
    pending_pairs: Vec<PendingPair>,
    /// Scratch for [`Memory::take_failed_merges`].
    failed: Vec<FailedMerge>,
}

/// A KSM page made in this batch from two pages, whose merges the backend may still fail.
#[derive(Clone, Copy, Debug)]
struct PendingPair {
    /// The stable node inserted for it.
    node: u32,
    kpfn: FrameId,
    /// The item of the page promoted into the KSM page.
    promoted: u32,
    /// The item of the unstable tree's page merged into it.
    merged: u32,
    /// Where the two pages are (mm and address): an item freed before the batch settles
    /// (its mm exited meanwhile, say) may be made again under the same id for another page.
    promoted_at: (MmId, u64),
    merged_at: (MmId, u64),
    /// Where `merged` was before: the unstable tree of this pass.
    merged_was: ItemState,
    /// The NUMA root of that tree.
    merged_nid: u32,
    /// The chain that `stable_tree_insert` made for the node, if it made one.
    new_chain: Option<u32>,
}

impl Default for Ksm {
    fn default() -> Self {
        Self::new()
    }
}

impl Ksm {
    /// An engine with the kernel's default tunables and no address spaces.
    pub fn new() -> Self {
        Self {
            tun: Tunables::default(),
            zero_checksum: zero_page_hash() as u32,
            pages_shared: 0,
            pages_sharing: 0,
            pages_unshared: 0,
            pages_scanned: 0,
            pages_skipped: 0,
            stable_node_chains: 0,
            stable_node_dups: 0,
            seqnr: 0,
            merges_failed: 0,
            mms: FxHashMap::default(),
            slots: Vec::new(),
            cur: None,
            address: 0,
            items: Items::default(),
            nodes: StableNodes::default(),
            unstable: UnstableIndex::default(),
            advisor: AdvisorCtx::default(),
            pending_pairs: Vec::new(),
            failed: Vec::new(),
        }
    }

    /// The current tunables.
    pub fn tunables(&self) -> &Tunables {
        &self.tun
    }

    /// `full_scans`: full scans completed since the start or the last `run=2`.
    pub fn full_scans(&self) -> u64 {
        self.seqnr
    }

    /// Merges the backend accepted and later reported failed
    /// ([`Memory::take_failed_merges`]), since the engine was made (not a kernel counter).
    pub fn merges_failed(&self) -> u64 {
        self.merges_failed
    }

    /// rmap items: pages KSM tracks (the kernel's `ksm_rmap_items`, not a sysfs file).
    pub fn rmap_items(&self) -> u64 {
        self.items.len() as u64
    }

    /// Bytes of memory the engine holds for its bookkeeping: rmap items, the unstable tree's
    /// index, stable nodes and their indexes, the scan list and per-mm records, and the
    /// scratch lists of a scan batch: every container at its capacity, hash maps by their
    /// buckets with a control byte each. (What the allocator keeps around each allocation is
    /// not counted: there is one allocation per 256 pages of items.)
    pub fn metadata_bytes(&self) -> usize {
        self.items.heap_bytes()
            + self.unstable.heap_bytes()
            + self.nodes.heap_bytes()
            + hash_map_bytes(&self.mms)
            + self.slots.capacity() * std::mem::size_of::<MmSlot>()
            + self.pending_pairs.capacity() * std::mem::size_of::<PendingPair>()
            + self.failed.capacity() * std::mem::size_of::<FailedMerge>()
    }

    /// Every counter of `/sys/kernel/mm/ksm`, `ksm_zero_pages` read from `mem`. Every merge
    /// the backend accepted is settled when [`Ksm::do_scan`] returns, so the counters read
    /// between batches never count a merge that failed.
    pub fn counters<M: Memory + ?Sized>(&self, mem: &M) -> KsmCounters {
        let rmap_items = self.items.len() as i64;
        let volatile =
            rmap_items - (self.pages_shared + self.pages_sharing + self.pages_unshared) as i64;
        let zero = mem.ksm_zero_pages(None);
        KsmCounters {
            pages_shared: self.pages_shared,
            pages_sharing: self.pages_sharing,
            pages_unshared: self.pages_unshared,
            pages_volatile: volatile.max(0) as u64,
            pages_scanned: self.pages_scanned,
            pages_skipped: self.pages_skipped,
            full_scans: self.seqnr,
            stable_node_chains: self.stable_node_chains,
            stable_node_dups: self.stable_node_dups,
            ksm_zero_pages: zero,
            general_profit: (self.pages_sharing as i64 + zero) * PAGE_SIZE_U64 as i64
                - rmap_items * RMAP_ITEM_BYTES as i64,
        }
    }

    /// `/proc/<pid>/ksm_stat` for `mm` (zeros for an address space KSM never saw).
    pub fn ksm_stat<M: Memory + ?Sized>(&self, mem: &M, mm: MmId) -> KsmStat {
        let st = self.mms.get(&mm).cloned().unwrap_or_default();
        let zero = mem.ksm_zero_pages(Some(mm));
        let mut mergeable = false;
        let mut addr = 0;
        while let Some(v) = mem.find_vma(mm, addr) {
            if v.mergeable {
                mergeable = true;
                break;
            }
            addr = v.end;
        }
        KsmStat {
            pid: mm.0,
            ksm_rmap_items: st.ksm_rmap_items,
            ksm_zero_pages: zero,
            ksm_merging_pages: st.ksm_merging_pages,
            ksm_process_profit: (st.ksm_merging_pages as i64 + zero) * PAGE_SIZE_U64 as i64
                - st.ksm_rmap_items as i64 * RMAP_ITEM_BYTES as i64,
            ksm_merge_any: st.merge_any,
            ksm_mergeable: mergeable,
        }
    }

    /// Read any file of `/sys/kernel/mm/ksm` (counter or tunable), without the newline.
    pub fn show<M: Memory + ?Sized>(&self, mem: &M, name: &str) -> Option<String> {
        self.tun
            .show(name)
            .or_else(|| self.counters(mem).get(name).map(|v| v.to_string()))
    }

    /// Write a tunable as `echo VALUE > /sys/kernel/mm/ksm/NAME` would, with the kernel's
    /// validation, errors and side effects: `run=2` unmerges everything and frees every rmap
    /// item and stable node (on failure, [`KnobError::Unmerge`] with `run` back at 0 and the
    /// scan cursor at the head); `max_page_sharing` and `merge_across_nodes` change only
    /// while no KSM page exists ([`KnobError::Busy`]); `advisor_mode` resets `pages_to_scan`.
    ///
    /// ```
    /// use samepage_engine::{KnobError, Ksm};
    /// let mut mem = samepage_sim::SimMemory::new();
    /// let mut ksm = Ksm::new();
    /// ksm.write_knob(&mut mem, "pages_to_scan", "1000\n").unwrap();
    /// assert_eq!(ksm.show(&mem, "pages_to_scan").as_deref(), Some("1000"));
    /// assert!(matches!(ksm.write_knob(&mut mem, "run", "3"), Err(KnobError::Invalid { .. })));
    /// assert!(matches!(ksm.write_knob(&mut mem, "full_scans", "0"), Err(KnobError::ReadOnly(_))));
    /// ```
    pub fn write_knob<M: Memory + ?Sized>(
        &mut self,
        mem: &mut M,
        name: &str,
        value: &str,
    ) -> Result<(), KnobError> {
        self.settle_merges(mem);
        match parse_knob(name, value)? {
            KnobValue::Run(r) => {
                if r != self.tun.run {
                    self.tun.run = r;
                    if r == Run::Unmerge {
                        if let Err(e) = self.unmerge_and_remove_all_rmap_items(mem) {
                            self.tun.run = Run::Stop;
                            return Err(KnobError::Unmerge(e));
                        }
                    }
                }
            }
            KnobValue::PagesToScan(n) => {
                if self.tun.advisor_mode != AdvisorMode::None {
                    return Err(KnobError::Invalid {
                        name: name.into(),
                        value: value.into(),
                        why: "pages_to_scan is set by the advisor while advisor_mode is scan-time",
                    });
                }
                self.tun.pages_to_scan = n;
            }
            KnobValue::SleepMillisecs(n) => self.tun.sleep_millisecs = n,
            KnobValue::MergeAcrossNodes(b) => {
                if b != self.tun.merge_across_nodes {
                    if self.pages_shared != 0 || self.remove_all_stable_nodes(mem) {
                        return Err(KnobError::Busy(name.into()));
                    }
                    self.tun.merge_across_nodes = b;
                }
            }
            KnobValue::UseZeroPages(b) => self.tun.use_zero_pages = b,
            KnobValue::ZeroPagesFirstVisit(b) => self.tun.zero_pages_first_visit = b,
            KnobValue::MaxPageSharing(n) => {
                if n != self.tun.max_page_sharing {
                    if self.pages_shared != 0 || self.remove_all_stable_nodes(mem) {
                        return Err(KnobError::Busy(name.into()));
                    }
                    self.tun.max_page_sharing = n;
                }
            }
            KnobValue::PruneMillisecs(n) => self.tun.stable_node_chains_prune_millisecs = n,
            KnobValue::SmartScan(b) => self.tun.smart_scan = b,
            KnobValue::AdvisorMode(m) => {
                if m != self.tun.advisor_mode {
                    self.tun.advisor_mode = m;
                    // set_advisor_defaults()
                    match m {
                        AdvisorMode::None => self.tun.pages_to_scan = 100,
                        AdvisorMode::ScanTime => {
                            self.advisor = AdvisorCtx::default();
                            self.tun.pages_to_scan =
                                self.tun.advisor_min_pages_to_scan.min(u32::MAX as u64) as u32;
                        }
                    }
                }
            }
            KnobValue::AdvisorMaxCpu(n) => self.tun.advisor_max_cpu = n,
            KnobValue::AdvisorMinPages(n) => self.tun.advisor_min_pages_to_scan = n,
            KnobValue::AdvisorMaxPages(n) => self.tun.advisor_max_pages_to_scan = n,
            KnobValue::AdvisorTargetScanTime(n) => self.tun.advisor_target_scan_time = n,
        }
        Ok(())
    }

    // ----- entry points from the memory manager (madvise, prctl, fork, exit, mmap) -----

    fn mm_state(&mut self, mm: MmId) -> &mut MmState {
        self.mms.entry(mm).or_default()
    }

    /// `__ksm_enter`: put `mm` on the scan list, just behind the cursor so that a fresh area
    /// has time to settle (at the tail while unmerging).
    fn ksm_enter(&mut self, mm: MmId) {
        if self.mm_state(mm).registered {
            return;
        }
        self.mm_state(mm).registered = true;
        let domain = self.mm_state(mm).domain;
        let slot = MmSlot {
            mm,
            next: 0,
            domain,
        };
        match (self.tun.run, self.cur) {
            (Run::Unmerge, _) | (_, None) => self.slots.push(slot),
            (_, Some(i)) => {
                self.slots.insert(i, slot);
                self.cur = Some(i + 1);
            }
        }
    }

    /// `MADV_MERGEABLE` on `[start, end)`: the compatible areas become `VM_MERGEABLE` and the
    /// address space joins the scan list (just behind the cursor, as `__ksm_enter` puts it).
    pub fn madvise_mergeable<M: Memory + ?Sized>(
        &mut self,
        mem: &mut M,
        mm: MmId,
        start: u64,
        end: u64,
    ) {
        mem.set_mergeable(mm, start, end, true);
        if self.any_mergeable(mem, mm, start, end) {
            self.ksm_enter(mm);
        }
    }

    fn any_mergeable<M: Memory + ?Sized>(&self, mem: &M, mm: MmId, start: u64, end: u64) -> bool {
        let mut addr = start;
        while let Some(v) = mem.find_vma(mm, addr) {
            if v.start >= end {
                break;
            }
            if v.mergeable {
                return true;
            }
            addr = v.end;
        }
        false
    }

    /// `unmerge_ksm_pages` over the mergeable areas in `[start, end)`.
    fn unmerge_range<M: Memory + ?Sized>(
        &mut self,
        mem: &mut M,
        mm: MmId,
        start: u64,
        end: u64,
    ) -> Result<(), UnmergeError> {
        let mut addr = start;
        while let Some(v) = mem.find_vma(mm, addr) {
            if v.start >= end {
                break;
            }
            if v.mergeable && v.anon {
                mem.break_ksm(mm, v.start.max(start), v.end.min(end))?;
            }
            addr = v.end;
        }
        Ok(())
    }

    /// `MADV_UNMERGEABLE` on `[start, end)`: area by area, unshare KSM pages and KSM-placed
    /// zero pages, then clear `VM_MERGEABLE`. As in the kernel, the rmap items (and so
    /// `pages_sharing`) are left for the next pass to clean up; zero pages are uncounted at
    /// once.
    ///
    /// If unsharing fails (no memory for the copies), the error is returned as `ksm_madvise`
    /// returns it: the areas before the failing one are unmergeable already, the failing one
    /// and those after it stay mergeable, and the pages unshared so far stay unshared.
    pub fn madvise_unmergeable<M: Memory + ?Sized>(
        &mut self,
        mem: &mut M,
        mm: MmId,
        start: u64,
        end: u64,
    ) -> Result<(), UnmergeError> {
        self.settle_merges(mem);
        let mut addr = start;
        while let Some(v) = mem.find_vma(mm, addr) {
            if v.start >= end {
                break;
            }
            if v.mergeable {
                let (s, e) = (v.start.max(start), v.end.min(end));
                if v.anon {
                    mem.break_ksm(mm, s, e)?;
                }
                mem.set_mergeable(mm, s, e, false);
            }
            addr = v.end;
        }
        Ok(())
    }

    /// `prctl(PR_SET_MEMORY_MERGE, enable)`.
    pub fn prctl_set_memory_merge<M: Memory + ?Sized>(
        &mut self,
        mem: &mut M,
        mm: MmId,
        enable: bool,
    ) -> Result<(), UnmergeError> {
        self.settle_merges(mem);
        let merge_any = self.mm_state(mm).merge_any;
        if enable {
            if merge_any {
                return Ok(());
            }
            self.ksm_enter(mm);
            self.mm_state(mm).merge_any = true;
            mem.set_mergeable(mm, 0, u64::MAX, true);
        } else {
            if !merge_any {
                return Ok(());
            }
            if let Err(e) = self.unmerge_range(mem, mm, 0, u64::MAX) {
                mem.set_mergeable(mm, 0, u64::MAX, true);
                return Err(e);
            }
            mem.set_mergeable(mm, 0, u64::MAX, false);
            self.mm_state(mm).merge_any = false;
        }
        Ok(())
    }

    /// `prctl(PR_GET_MEMORY_MERGE)`: `MMF_VM_MERGE_ANY`.
    pub fn prctl_get_memory_merge(&self, mm: MmId) -> bool {
        self.mms.get(&mm).is_some_and(|s| s.merge_any)
    }

    /// A new area is being mapped in `mm` (`ksm_vma_flags`): returns whether it starts out
    /// `VM_MERGEABLE` because the process asked to merge everything.
    pub fn new_vma_mergeable(&mut self, mm: MmId) -> bool {
        if self.prctl_get_memory_merge(mm) {
            self.ksm_enter(mm);
            true
        } else {
            false
        }
    }

    /// `ksm_fork`: the child inherits `MMF_VM_MERGE_ANY` and joins the scan list if the parent
    /// is on it. It inherits no rmap items, so its `ksm_rmap_items` and `ksm_merging_pages`
    /// start at 0 (the 2025 fix); its zero pages are counted by the backend's fork.
    /// The child is in the parent's security domain.
    pub fn fork(&mut self, parent: MmId, child: MmId) {
        let p = self.mms.get(&parent).cloned().unwrap_or_default();
        self.mms.insert(
            child,
            MmState {
                merge_any: p.merge_any,
                domain: p.domain,
                ..MmState::default()
            },
        );
        if p.registered {
            self.ksm_enter(child);
        }
    }

    /// `ksm_execve`: a process that asked to merge everything keeps asking after exec; its
    /// new address space `new` (replacing `old`) joins the scan list. The process stays in
    /// its security domain.
    pub fn execve(&mut self, old: MmId, new: MmId) {
        let merge_any = self.prctl_get_memory_merge(old);
        let domain = self.domain(old);
        self.mms.insert(
            new,
            MmState {
                merge_any,
                domain,
                ..MmState::default()
            },
        );
        if merge_any {
            self.ksm_enter(new);
        }
    }

    /// `ksm_exit` (`__ksm_exit`): the backend has torn down `mm`. A slot with no rmap items
    /// that the cursor is not on is freed at once; otherwise it is moved right behind the
    /// cursor so that the scan frees it next (the items of an exiting mm are freed when the
    /// scan reaches it, and `pages_shared`/`pages_sharing` keep counting them until then, as
    /// in the kernel).
    ///
    /// Says which: with [`MmExit::Deferred`], the backend keeps what the engine may still ask
    /// about `mm` (it answers [`Memory::mm_exiting`] with true) until
    /// [`Ksm::mm_released`] says the engine let go of it, after some later scan batch.
    #[must_use = "with MmExit::Deferred the backend must keep answering for the mm"]
    pub fn exit(&mut self, mm: MmId) -> MmExit {
        let Some(j) = self.slots.iter().position(|s| s.mm == mm) else {
            self.mms.remove(&mm);
            return MmExit::Released;
        };
        if self.cur == Some(j) {
            return MmExit::Deferred;
        }
        if !self.items.has_items(mm) {
            self.remove_slot(j);
            self.mms.remove(&mm);
            return MmExit::Released;
        }
        let slot = self.slots.remove(j);
        match self.cur {
            None => self.slots.insert(0, slot),
            Some(c) => {
                let c = if j < c { c - 1 } else { c };
                self.slots.insert(c + 1, slot);
                self.cur = Some(c);
            }
        }
        MmExit::Deferred
    }

    /// The engine holds nothing of `mm` any more: no slot on the scan list, no rmap item, no
    /// per-mm record. True of an mm the engine never saw; after [`Ksm::exit`], true at once
    /// or once the scan has freed the mm's items.
    pub fn mm_released(&self, mm: MmId) -> bool {
        !self.mms.contains_key(&mm)
            && !self.items.has_items(mm)
            && !self.slots.iter().any(|s| s.mm == mm)
    }

    fn remove_slot(&mut self, j: usize) {
        let slot = self.slots.remove(j);
        debug_assert!(!self.items.has_items(slot.mm));
        if let Some(c) = self.cur {
            if j < c {
                self.cur = Some(c - 1);
            }
        }
        if let Some(st) = self.mms.get_mut(&slot.mm) {
            st.registered = false;
        }
    }

    // ----- ksmd -----

    /// `ksmd_should_run`: `run=1` and something to scan.
    pub fn ksmd_should_run(&self) -> bool {
        self.tun.run == Run::Merge && !self.slots.is_empty()
    }

    /// One ksmd wake-up: `ksm_do_scan(pages_to_scan)` if ksmd should run, else nothing.
    pub fn ksmd_batch<M: Memory + ?Sized>(&mut self, mem: &mut M, clock: &dyn Clock) -> ScanBatch {
        if !self.ksmd_should_run() {
            return ScanBatch::default();
        }
        self.do_scan(mem, clock, self.tun.pages_to_scan as u64)
    }

    /// `ksm_do_scan(n)`: scan up to `n` pages; stops early at the end of a full scan. `clock`
    /// times the advisor and the pruning of chains.
    ///
    /// Before it returns (and before a full scan counts as completed) it asks the backend
    /// which merges it accepted and could not carry out ([`Memory::take_failed_merges`]) and
    /// undoes each, so that the counters are those of the merge failing at once:
    ///
    /// - a page merged into a KSM page of the stable tree leaves that node (the kernel's
    ///   `try_to_merge_with_ksm_page` failing: the page is in neither tree);
    /// - a pair made into a new KSM page (`try_to_merge_two_pages`) where either half failed:
    ///   both pages leave the new stable node, which goes (with what was attached to it, if
    ///   the promotion failed), a chain made in the batch and left with one KSM page becomes
    ///   a regular node again, the unstable tree's page goes back to the unstable tree, and
    ///   the half that succeeded is unshared again (`break_cow`), as the kernel does when the
    ///   second half fails. A page merged into that KSM page later in the same batch keeps
    ///   its merge if it went through (the KSM page stays, with that mapping);
    /// - a zero-page merge needs nothing: the backend counts zero pages itself.
    pub fn do_scan<M: Memory + ?Sized>(
        &mut self,
        mem: &mut M,
        clock: &dyn Clock,
        n: u64,
    ) -> ScanBatch {
        let mut batch = ScanBatch::default();
        let seqnr = self.seqnr;
        let failed = self.merges_failed;
        for _ in 0..n {
            match self.scan_get_next_rmap_item(mem, clock) {
                Some((item, page)) => {
                    self.cmp_and_merge_page(mem, clock, item, page);
                    self.pages_scanned += 1;
                    batch.scanned += 1;
                }
                None => {
                    batch.full_scan_done = self.seqnr != seqnr;
                    break;
                }
            }
        }
        self.settle_merges(mem);
        batch.merges_failed = self.merges_failed - failed;
        batch
    }

    /// Ask the backend which of the merges it accepted failed ([`Memory::take_failed_merges`])
    /// and undo the engine's side of each, as [`Ksm::do_scan`] describes.
    fn settle_merges<M: Memory + ?Sized>(&mut self, mem: &mut M) {
        let mut failed = std::mem::take(&mut self.failed);
        failed.clear();
        mem.take_failed_merges(&mut failed);
        let pairs = std::mem::take(&mut self.pending_pairs);
        if !failed.is_empty() {
            self.merges_failed += failed.len() as u64;
            let mut items: FxHashMap<(MmId, u64), bool> =
                failed.iter().map(|f| ((f.mm, f.addr), false)).collect();
            // Pairs first: a later page merged into a pair's KSM page is undone on its own.
            for p in &pairs {
                // A pair one page of which lost its item since (its mm exited before the
                // batch settled: the scan freed what it had) is no pair to undo any more:
                // what is left of it is undone page by page below.
                let live = |ksm: &mut Self, (mm, addr): (MmId, u64), it: u32| {
                    ksm.items.find(mm, addr) == Some(it)
                };
                if !live(self, p.promoted_at, p.promoted) || !live(self, p.merged_at, p.merged) {
                    continue;
                }
                let a = items.get_mut(&p.promoted_at).map(|d| *d = true);
                let b = items.get_mut(&p.merged_at).map(|d| *d = true);
                if a.is_some() || b.is_some() {
                    self.undo_pair(mem, p, a.is_some(), b.is_some());
                }
            }
            for ((mm, addr), done) in items {
                if done {
                    continue;
                }
                if let Some(it) = self.items.find(mm, addr) {
                    if matches!(self.items.state(it), ItemState::Stable { .. }) {
                        self.remove_rmap_item_from_tree(mem, it);
                    }
                }
            }
            // A chain made in this batch that is down to one dup (or none) would not have
            // been made had the failed merges failed at once.
            for chain in pairs.iter().filter_map(|p| p.new_chain) {
                self.unmake_chain(chain);
            }
        }
        // Scratch for the next batch, kept small: a batch that made many KSM pages does not
        // leave its list behind.
        self.pending_pairs = pairs;
        self.pending_pairs.clear();
        self.pending_pairs.shrink_to(SCRATCH_KEPT);
        self.failed = failed;
        self.failed.shrink_to(SCRATCH_KEPT);
    }

    /// Undo the pair `p` after the backend failed its promotion (`promote_failed`) or the
    /// merge of the unstable tree's page into it (`merge_failed`).
    fn undo_pair<M: Memory + ?Sized>(
        &mut self,
        mem: &mut M,
        p: &PendingPair,
        promote_failed: bool,
        merge_failed: bool,
    ) {
        let node_ok = self.nodes.contains(p.node)
            && !self.nodes.is_chain(p.node)
            && self.nodes.kpfn(p.node) == p.kpfn;
        if !node_ok {
            return;
        }
        for it in [p.promoted, p.merged] {
            if self.items.state(it) == (ItemState::Stable { node: p.node }) {
                self.unlink_stable_item(p.node, it);
            }
        }
        // The unstable tree's page stays in the unstable tree when the merge fails.
        if self.items.state(p.merged) == ItemState::Volatile {
            if let ItemState::Unstable { odd } = p.merged_was {
                self.items.set_state(p.merged, p.merged_was);
                if odd == self.odd_pass() {
                    self.unstable
                        .insert(&mut self.items, p.merged, p.merged_nid);
                }
                self.pages_unshared += 1;
            }
        }
        // Without the promotion nothing on the node maps a KSM page: the pages merged into
        // it failed too (and are reported), and the forks that share the promoted page were
        // attached to it without a merge of their own.
        if promote_failed || self.nodes.len(p.node) == 0 {
            self.remove_node_from_stable_tree(p.node);
        }
        match (promote_failed, merge_failed) {
            (false, true) => self.break_cow(mem, p.promoted),
            (true, false) => self.break_cow(mem, p.merged),
            _ => {}
        }
    }

    /// A chain made in this batch with fewer than two dups left: with one it turns back into
    /// that regular node, with none it goes.
    fn unmake_chain(&mut self, chain: u32) {
        if !self.nodes.contains(chain) || !self.nodes.is_chain(chain) {
            return;
        }
        match *self.nodes.dups(chain) {
            [] => self.free_stable_node_chain(chain),
            [dup] => self.collapse_chain(chain, dup),
            _ => {}
        }
    }

    /// The chain is down to one dup: that dup becomes a regular node in the chain's place.
    fn collapse_chain(&mut self, chain: u32, dup: u32) {
        let key = self.nodes.key(chain);
        self.nodes.remove(chain);
        self.nodes.set_regular(dup, key);
        self.nodes.index_insert(dup);
        self.stable_node_chains -= 1;
        self.stable_node_dups -= 1;
    }

    /// Whether this pass's `seqnr` is odd: the parity of the unstable items in its tree.
    fn odd_pass(&self) -> bool {
        self.seqnr & 1 == 1
    }

    /// Put `mm` in security `domain`: from now on its pages are compared and merged only with
    /// pages of address spaces in the same domain (zero pages are merged in every domain).
    /// Every mm is in domain 0 until this is called, and a forked or exec'ed mm starts in its
    /// parent's.
    ///
    /// The domain must be set before the mm's pages are scanned: once the mm has rmap items
    /// (some of its pages may be merged or waiting in the unstable tree under the old domain)
    /// the change is refused with [`DomainError::AlreadyScanned`]; `run=2`, which frees every
    /// rmap item, makes it possible again. KSM pages an mm maps from before (inherited over
    /// `fork`, say) are left alone if their domain is not the mm's: they are not counted as
    /// the mm's, and a write gives the mm its own copy as usual.
    pub fn set_domain(&mut self, mm: MmId, domain: DomainId) -> Result<(), DomainError> {
        if self.items.has_items(mm) {
            return Err(DomainError::AlreadyScanned { mm, domain });
        }
        self.mm_state(mm).domain = domain;
        for s in self.slots.iter_mut().filter(|s| s.mm == mm) {
            s.domain = domain;
        }
        Ok(())
    }

    /// The security domain of `mm` (see [`Ksm::set_domain`]).
    pub fn domain(&self, mm: MmId) -> DomainId {
        self.mms.get(&mm).map_or(DomainId::default(), |s| s.domain)
    }

    fn nid_root(&self, nid: u32) -> u32 {
        if self.tun.merge_across_nodes {
            0
        } else {
            nid
        }
    }

    /// `scan_get_next_rmap_item`.
    fn scan_get_next_rmap_item<M: Memory + ?Sized>(
        &mut self,
        mem: &mut M,
        clock: &dyn Clock,
    ) -> Option<(u32, PageRef)> {
        if self.slots.is_empty() {
            return None;
        }
        let mut si = match self.cur {
            Some(i) => i,
            None => {
                if self.tun.advisor_mode == AdvisorMode::ScanTime {
                    self.advisor.start_scan(clock.now_ns());
                }
                // A new pass starts with an empty unstable tree; the old one is just dropped.
                // It is empty already unless a failed run=2 put the cursor back to the head in
                // mid-pass: its items then become items of a past tree (still counted in
                // pages_unshared until visited, as after a completed pass).
                if self.unstable.len() != 0 {
                    let past = !self.odd_pass();
                    self.unstable.retag_all(&mut self.items, past);
                }
                self.unstable.clear();
                for s in &mut self.slots {
                    s.next = 0;
                }
                self.cur = Some(0);
                self.address = 0;
                0
            }
        };
        loop {
            let mm = self.slots[si].mm;
            let exiting = mem.mm_exiting(mm);
            if !exiting {
                let mut vaddr = self.address;
                while let Some(vma) = mem.find_vma(mm, vaddr) {
                    vaddr = vma.end;
                    if !vma.mergeable {
                        continue;
                    }
                    if self.address < vma.start {
                        self.address = vma.start;
                    }
                    if !vma.anon {
                        self.address = vma.end;
                    }
                    while self.address < vma.end {
                        let Some((a, page)) = mem.next_page(mm, self.address, vma.end) else {
                            self.address = vma.end;
                            break;
                        };
                        let item = self.get_next_rmap_item(mem, si, a);
                        self.address = a + PAGE_SIZE_U64;
                        if self.should_skip_rmap_item(mem, item, &page) {
                            continue;
                        }
                        return Some((item, page));
                    }
                }
            }
            // End of this mm: nuke the items beyond the last mergeable page (all of them if
            // the mm is exiting).
            if exiting {
                self.address = 0;
                self.free_all_items(mem, si);
            } else {
                self.remove_trailing_rmap_items(mem, si);
            }
            let mut next = si + 1;
            if self.address == 0 {
                let gone = self.slots[si].mm;
                self.remove_slot(si);
                if exiting {
                    self.mms.remove(&gone);
                }
                next = si;
            }
            self.address = 0;
            if next >= self.slots.len() {
                // Every merge of the pass settled before the pass counts as done.
                self.settle_merges(mem);
                self.cur = None;
                if self.tun.advisor_mode == AdvisorMode::ScanTime {
                    let k = AdvisorKnobs {
                        pages_to_scan: self.tun.pages_to_scan as u64,
                        max_cpu: self.tun.advisor_max_cpu,
                        max_pages_to_scan: self.tun.advisor_max_pages_to_scan,
                        target_scan_time: self.tun.advisor_target_scan_time,
                    };
                    let pages = self.advisor.stop_scan(clock.now_ns(), clock.cpu_ns(), &k);
                    self.tun.pages_to_scan = pages.min(u32::MAX as u64) as u32;
                }
                // The pass's unstable tree goes with it (the kernel empties it when the next
                // pass starts; nothing reads it in between).
                self.unstable.clear();
                self.items.trim();
                self.nodes.trim();
                self.seqnr += 1;
                return None;
            }
            si = next;
            self.cur = Some(si);
        }
    }

    /// `get_next_rmap_item`: the item for `addr`, freeing the items between the last page
    /// visited and it (their pages are gone: unmapped, discarded, or replaced by a KSM zero
    /// page).
    fn get_next_rmap_item<M: Memory + ?Sized>(&mut self, mem: &mut M, si: usize, addr: u64) -> u32 {
        let (mm, next) = (self.slots[si].mm, self.slots[si].next);
        self.free_items_in(mem, mm, next, addr);
        self.slots[si].next = addr + PAGE_SIZE_U64;
        let (it, made) = self.items.get_or_insert(mm, addr);
        if made {
            self.mm_state(mm).ksm_rmap_items += 1;
        }
        it
    }

    fn free_items_in<M: Memory + ?Sized>(&mut self, mem: &mut M, mm: MmId, from: u64, to: u64) {
        if from >= to {
            return;
        }
        let ids = self.items.ids_in(mm, from, to);
        if ids.is_empty() {
            return;
        }
        for &it in &ids {
            self.remove_rmap_item_from_tree(mem, it);
        }
        self.items.remove_many(&ids);
        if let Some(st) = self.mms.get_mut(&mm) {
            st.ksm_rmap_items -= ids.len() as u64;
        }
    }

    /// `remove_trailing_rmap_items` at the end of an mm: free what the pass did not reach.
    fn remove_trailing_rmap_items<M: Memory + ?Sized>(&mut self, mem: &mut M, si: usize) {
        let (mm, next) = (self.slots[si].mm, self.slots[si].next);
        self.free_items_in(mem, mm, next, u64::MAX);
        self.slots[si].next = 0;
    }

    fn free_all_items<M: Memory + ?Sized>(&mut self, mem: &mut M, si: usize) {
        let mm = self.slots[si].mm;
        self.free_items_in(mem, mm, 0, u64::MAX);
        self.slots[si].next = 0;
    }

    /// Smart scan (`should_skip_rmap_item`): pages that keep failing to merge are visited less
    /// and less often, up to one visit in nine.
    fn should_skip_rmap_item<M: Memory + ?Sized>(
        &mut self,
        mem: &mut M,
        it: u32,
        page: &PageRef,
    ) -> bool {
        if !self.tun.smart_scan || page.ksm {
            return false;
        }
        let mut skip = false;
        let read_copy = page.read_copy;
        self.items.update_age_skips(it, |age, skips| {
            // A page copied by a read was a KSM page all along, as far as the kernel is
            // concerned, where it never ages: it starts over. Otherwise its twin, copied by
            // the same reads, could be skipped in other passes than it and never be met in
            // the unstable tree again.
            let (age, skips) = if read_copy { (0, 0) } else { (age, skips) };
            let older = age.saturating_add(1);
            if age < 3 {
                (older, skips)
            } else if skips == 0 {
                let skips = match age {
                    0..=3 => 1,
                    4..=5 => 2,
                    6..=8 => 4,
                    _ => 8,
                };
                (older, skips)
            } else {
                skip = true;
                (older, skips - 1)
            }
        });
        if skip {
            self.pages_skipped += 1;
            self.remove_rmap_item_from_tree(mem, it);
        }
        skip
    }

    /// `remove_rmap_item_from_tree`.
    fn remove_rmap_item_from_tree<M: Memory + ?Sized>(&mut self, mem: &mut M, it: u32) {
        match self.items.state(it) {
            ItemState::Volatile => {}
            ItemState::Stable { node } => {
                if !mem.ksm_page_alive(self.nodes.kpfn(node)) {
                    // Stale node: this clears every item hanging on it, this one included.
                    self.remove_node_from_stable_tree(node);
                    return;
                }
                self.unlink_stable_item(node, it);
            }
            ItemState::Unstable { odd } => {
                // Items of the previous pass were dropped with its tree.
                if odd == self.odd_pass() {
                    self.unstable.remove(&mut self.items, it);
                }
                self.pages_unshared -= 1;
                self.items.set_state(it, ItemState::Volatile);
            }
        }
    }

    /// Take the stable item `it` off its live `node`, uncounted; it is volatile afterwards.
    fn unlink_stable_item(&mut self, node: u32, it: u32) {
        self.unlink_from_node(node, it);
        if self.nodes.len(node) == 0 {
            self.pages_shared -= 1;
        } else {
            self.pages_sharing -= 1;
        }
        let mm = self.items.mm(it);
        self.mm_state(mm).ksm_merging_pages -= 1;
        self.items.unset_stable(it, self.nodes.checksum(node));
    }

    /// Take `it` off the `hlist` of `node`.
    fn unlink_from_node(&mut self, node: u32, it: u32) {
        let next = self.items.link(it);
        let head = self.nodes.head(node);
        if head == it {
            self.nodes.set_head(node, next);
        } else {
            let mut p = head;
            while self.items.link(p) != it {
                p = self.items.link(p);
                assert!(p != NIL, "item {it} on the list of node {node}");
            }
            self.items.set_link(p, next);
        }
        self.nodes.set_len(node, self.nodes.len(node) - 1);
        self.items.set_link(it, NIL);
    }

    /// The rmap items on `node`'s `hlist`.
    fn node_items(&self, node: u32) -> Vec<u32> {
        let mut v = Vec::with_capacity(self.nodes.len(node) as usize);
        let mut it = self.nodes.head(node);
        while it != NIL {
            v.push(it);
            it = self.items.link(it);
        }
        v
    }

    /// `remove_node_from_stable_tree`: the KSM page is gone; uncount every item on the node.
    fn remove_node_from_stable_tree(&mut self, node: u32) {
        let items = self.node_items(node);
        let len = self.nodes.len(node);
        if len != 0 {
            self.pages_shared -= 1;
            self.pages_sharing -= len as u64 - 1;
        }
        let sum = self.nodes.checksum(node);
        for it in items {
            let mm = self.items.mm(it);
            self.items.unset_stable(it, sum);
            self.mm_state(mm).ksm_merging_pages -= 1;
        }
        match self.nodes.kind(node) {
            NodeKind::Dup { chain } => {
                self.nodes.dups_mut(chain).retain(|&d| d != node);
                self.stable_node_dups -= 1;
            }
            NodeKind::Regular => {}
            NodeKind::Chain => unreachable!("chains have no page"),
        }
        self.nodes.remove(node);
    }

    fn free_stable_node_chain(&mut self, chain: u32) {
        self.nodes.remove(chain);
        self.stable_node_chains -= 1;
    }

    /// `ksm_get_folio(NOLOCK)`: the node's page if it is still a KSM page, else prune the node.
    fn get_ksm_page<M: Memory + ?Sized>(&mut self, mem: &M, node: u32) -> Option<FrameId> {
        let kpfn = self.nodes.kpfn(node);
        if mem.ksm_page_alive(kpfn) {
            Some(kpfn)
        } else {
            self.remove_node_from_stable_tree(node);
            None
        }
    }

    fn rmap_hlist_len(&self, node: u32) -> usize {
        self.nodes.len(node) as usize
    }

    /// `__is_page_sharing_candidate(node, offset)`.
    fn is_candidate_off(&self, node: u32, offset: usize) -> bool {
        let len = self.rmap_hlist_len(node);
        len != 0 && len + offset < self.tun.max_page_sharing as usize
    }

    fn is_page_sharing_candidate(&self, node: u32) -> bool {
        self.is_candidate_off(node, 0)
    }

    /// `__stable_node_chain`: for the node in the index, the dup to merge with (if any has
    /// room) and its page. Returns `(page, dup, node)`, where `node` is the index node after
    /// a possible chain collapse.
    fn stable_node_chain<M: Memory + ?Sized>(
        &mut self,
        mem: &M,
        node: u32,
        prune: bool,
        now_ms: u64,
    ) -> (Option<FrameId>, Option<u32>, u32) {
        if !self.nodes.is_chain(node) {
            if self.is_page_sharing_candidate(node) {
                return (self.get_ksm_page(mem, node), Some(node), node);
            }
            return (None, None, node);
        }
        self.stable_node_dup(mem, node, prune, now_ms)
    }

    /// `stable_node_dup`: walk a chain's dups, pruning stale ones; pick the fullest dup that
    /// still has room; collapse a chain that is down to one dup (when pruning).
    fn stable_node_dup<M: Memory + ?Sized>(
        &mut self,
        mem: &M,
        chain: u32,
        prune: bool,
        now_ms: u64,
    ) -> (Option<FrameId>, Option<u32>, u32) {
        let prune_ms = self.tun.stable_node_chains_prune_millisecs as u64;
        let prune = prune && now_ms >= self.nodes.prune_time_ms(chain).saturating_add(prune_ms);
        if prune {
            self.nodes.set_prune_time_ms(chain, now_ms);
        }
        let list = self.nodes.dups(chain).to_vec();
        let mut found: Option<(u32, usize)> = None;
        let mut nr = 0;
        for dup in list {
            if self.get_ksm_page(mem, dup).is_none() {
                continue;
            }
            nr += 1;
            if self.is_page_sharing_candidate(dup) {
                let len = self.rmap_hlist_len(dup);
                if found.is_none_or(|(_, fl)| len > fl) {
                    found = Some((dup, len));
                    if !prune {
                        break;
                    }
                }
            }
        }
        let Some((f, _)) = found else {
            return (None, None, chain);
        };
        if prune && nr == 1 {
            // Only one dup left and it has room: the chain is not needed any more.
            self.collapse_chain(chain, f);
            return (Some(self.nodes.kpfn(f)), Some(f), f);
        }
        if self.is_candidate_off(f, 1) {
            let dups = self.nodes.dups_mut(chain);
            if dups[0] != f {
                dups.retain(|&d| d != f);
                dups.insert(0, f);
            }
        }
        (Some(self.nodes.kpfn(f)), Some(f), chain)
    }

    /// `stable_node_dup_any`: any dup of a chain (to continue a walk), or the node itself.
    /// Frees an empty chain and returns `None`.
    fn stable_node_dup_any(&mut self, node: u32) -> Option<u32> {
        if !self.nodes.is_chain(node) {
            return Some(node);
        }
        match self.nodes.dups(node).first() {
            Some(&d) => Some(d),
            None => {
                self.free_stable_node_chain(node);
                None
            }
        }
    }

    /// `stable_tree_search` for an ordinary anonymous page: the KSM page to merge with and
    /// its node, if the content is in the stable tree and some KSM page has room.
    fn stable_tree_search<M: Memory + ?Sized>(
        &mut self,
        mem: &mut M,
        clock: &dyn Clock,
        page: &PageRef,
        hash: u64,
        domain: DomainId,
    ) -> Option<(FrameId, u32)> {
        let key = Key {
            hash,
            nid: self.nid_root(page.nid),
            domain,
        };
        let now_ms = clock.now_ns() / 1_000_000;
        loop {
            let root = self.nodes.lookup(&key)?;
            let (mut tree_page, dup, root) = self.stable_node_chain(mem, root, true, now_ms);
            if dup.is_none() {
                let any = self.stable_node_dup_any(root)?;
                tree_page = self.get_ksm_page(mem, any);
            }
            let Some(tp) = tree_page else {
                continue; // walked over a stale node: search again
            };
            if !mem.pages_identical(page.frame, tp) {
                return None; // a different content under the same 64-bit hash
            }
            // All KSM pages of this content are full: wait for the unstable tree to make a
            // new one (a new dup).
            let dup = dup?;
            match self.get_ksm_page(mem, dup) {
                Some(kpfn) => return Some((kpfn, dup)),
                None => continue,
            }
        }
    }

    /// `stable_tree_insert`: a node for the new KSM page `kpfn`, as a regular node, or as a
    /// dup of a chain when the content is already there (all its KSM pages being full).
    /// Returns the node, and the chain if one was made for it.
    fn stable_tree_insert<M: Memory + ?Sized>(
        &mut self,
        mem: &mut M,
        kpfn: FrameId,
        hash: u64,
        nid: u32,
        domain: DomainId,
        now_ms: u64,
    ) -> (u32, Option<u32>) {
        let key = Key {
            hash,
            nid: self.nid_root(nid),
            domain,
        };
        let mut chain_with: Option<u32> = None;
        let mut in_index = true;
        while let Some(root) = self.nodes.lookup(&key) {
            let (mut tree_page, dup, root) = self.stable_node_chain(mem, root, false, now_ms);
            if dup.is_none() {
                let Some(any) = self.stable_node_dup_any(root) else {
                    continue;
                };
                tree_page = self.get_ksm_page(mem, any);
            }
            let Some(tp) = tree_page else { continue };
            if mem.pages_identical(kpfn, tp) {
                chain_with = Some(root);
            } else {
                // 64-bit hash collision with other content: keep the node out of the index.
                in_index = false;
            }
            break;
        }
        let node = self.nodes.insert_page_node(kpfn, key);
        let mut new_chain = None;
        match chain_with {
            None if in_index => self.nodes.index_insert(node),
            None => {}
            Some(root) => {
                let chain = if self.nodes.is_chain(root) {
                    root
                } else {
                    // alloc_stable_node_chain: the chain takes the old node's place.
                    let chain = self.nodes.insert_chain(key, now_ms, root);
                    self.stable_node_chains += 1;
                    self.stable_node_dups += 1;
                    new_chain = Some(chain);
                    chain
                };
                self.nodes.dups_mut(chain).insert(0, node);
                self.nodes.set_dup(node, chain);
                self.stable_node_dups += 1;
            }
        }
        (node, new_chain)
    }

    /// `stable_tree_append`. Only a forked KSM page (`max_page_sharing_bypass`) may take a
    /// node past `max_page_sharing` mappings; anything else doing so is a bug in the chain
    /// logic (the kernel's `WARN_ON_ONCE`).
    fn stable_tree_append(&mut self, it: u32, node: u32, max_page_sharing_bypass: bool) {
        let max = self.tun.max_page_sharing as u32;
        let len = self.nodes.len(node);
        debug_assert!(
            max_page_sharing_bypass || len < max,
            "stable node {node} would get {} mappings, max_page_sharing is {max}",
            len + 1
        );
        if len == 0 {
            self.pages_shared += 1;
        } else {
            self.pages_sharing += 1;
        }
        self.items.set_stable(it, node, self.nodes.checksum(node));
        self.items.set_link(it, self.nodes.head(node));
        self.nodes.set_head(node, it);
        self.nodes.set_len(node, len + 1);
        let mm = self.items.mm(it);
        self.mm_state(mm).ksm_merging_pages += 1;
    }

    /// `unstable_tree_search_insert`: an identical page of the same domain met earlier in
    /// this pass, or insert this one. (The domain is not part of the bucket: the items of
    /// other domains are passed over like other contents under the same checksum.)
    fn unstable_tree_search_insert<M: Memory + ?Sized>(
        &mut self,
        mem: &mut M,
        it: u32,
        page: &PageRef,
        hash: u64,
        domain: DomainId,
    ) -> Option<(u32, PageRef)> {
        let nid = self.nid_root(page.nid);
        let checksum = hash as u32;
        let mut t = self.unstable.head(checksum, nid);
        while t != NIL {
            let next = self.items.link(t);
            // The tree of root `nid` holds only unstable items of this pass.
            debug_assert_eq!(
                self.items.state(t),
                ItemState::Unstable {
                    odd: self.odd_pass()
                }
            );
            if self.items.checksum(t) == checksum && self.domain(self.items.mm(t)) == domain {
                let (tmm, taddr) = (self.items.mm(t), self.items.address(t));
                // As the kernel's tree walk: a node whose page is gone ends the search.
                let tree_page = mem.get_page(tmm, taddr)?;
                if tree_page.frame == page.frame {
                    return None; // don't substitute a KSM page for a forked page
                }
                if mem.pages_identical(page.frame, tree_page.frame) {
                    if !self.tun.merge_across_nodes && tree_page.nid != page.nid {
                        return None;
                    }
                    return Some((t, tree_page));
                }
                // Same checksum, other contents (or the tree's page changed): keep looking.
            }
            t = next;
        }
        self.items.set_state(
            it,
            ItemState::Unstable {
                odd: self.odd_pass(),
            },
        );
        self.unstable.insert(&mut self.items, it, nid);
        self.pages_unshared += 1;
        None
    }

    /// `break_cow`: unshare one page that was left alone on a KSM page.
    fn break_cow<M: Memory + ?Sized>(&mut self, mem: &mut M, it: u32) {
        let (mm, a) = (self.items.mm(it), self.items.address(it));
        // A failure leaves a KSM page with a single mapping: harmless, and it is what the
        // kernel does when break_ksm fails here.
        let _ = mem.break_ksm(mm, a, a + PAGE_SIZE_U64);
    }

    /// `cmp_and_merge_page` in the v6.11+ order: KSM pages skip the checksum; an ordinary page
    /// must keep its checksum for one pass (volatility rule), then tries the zero page, the
    /// stable tree, and the unstable tree.
    fn cmp_and_merge_page<M: Memory + ?Sized>(
        &mut self,
        mem: &mut M,
        clock: &dyn Clock,
        it: u32,
        page: PageRef,
    ) {
        let (mm, addr) = (self.items.mm(it), self.items.address(it));
        // The scan is on the slot of this mm.
        let domain = match self.cur {
            Some(si) if self.slots[si].mm == mm => self.slots[si].domain,
            _ => self.domain(mm),
        };
        let mut bypass = false;
        let page_node = if page.ksm {
            if let ItemState::Stable { node } = self.items.state(it) {
                // Most visits find the KSM page the item was merged into, whose node
                // `by_page` would find (unless a newer node has the same page).
                if self.nodes.kpfn(node) == page.frame && !self.nodes.is_shadowed(node) {
                    debug_assert_eq!(self.nodes.by_page(page.frame), Some(node));
                    return;
                }
            }
            self.nodes.by_page(page.frame)
        } else {
            None
        };
        let mut hash = 0;
        let found = if let Some(node) = page_node {
            if self.items.state(it) == (ItemState::Stable { node }) {
                return;
            }
            if self.nodes.key(node).domain != domain {
                // A KSM page of another domain (mapped since before set_domain, or promoted
                // while a fork of this mm shared it): never joined to this mm's pages, and
                // out of both trees.
                self.remove_rmap_item_from_tree(mem, it);
                return;
            }
            // A KSM page forked: this mapping may go over the sharing limit.
            if !self.is_page_sharing_candidate(node) {
                bypass = true;
            }
            Some((page.frame, node))
        } else {
            self.remove_rmap_item_from_tree(mem, it);
            let Some(h) = mem.page_hash(page.frame) else {
                return; // gone meanwhile: its next visit drops it
            };
            hash = h;
            let checksum = hash as u32;
            let zero = self.tun.use_zero_pages && checksum == self.zero_checksum;
            if self.items.checksum(it) != checksum {
                self.items.set_checksum(it, checksum);
                // The volatility rule, unless zero pages go on their first visit: placing
                // one is checked under write protection, and a write after it only costs
                // the copy-on-write the page would have taken anyway.
                if !(zero && self.tun.zero_pages_first_visit) {
                    return;
                }
            }
            if zero {
                match mem.merge(mm, addr, page.frame, MergeInto::ZeroPage) {
                    Ok(_) | Err(MergeError::Gone) => return,
                    Err(_) => {}
                }
            }
            self.stable_tree_search(mem, clock, &page, hash, domain)
        };
        if let Some((kpfn, node)) = found {
            if kpfn == page.frame && self.items.state(it) == (ItemState::Stable { node }) {
                return;
            }
        }
        self.remove_rmap_item_from_tree(mem, it);
        if let Some((kpfn, _)) = found {
            let merged = kpfn == page.frame
                || mem
                    .merge(mm, addr, page.frame, MergeInto::KsmPage(kpfn))
                    .is_ok();
            if merged {
                if let Some(node) = self.nodes.by_page(kpfn) {
                    self.stable_tree_append(it, node, bypass);
                }
            }
            return;
        }
        let Some((tree_it, tree_page)) =
            self.unstable_tree_search_insert(mem, it, &page, hash, domain)
        else {
            return;
        };
        // try_to_merge_two_pages: make this page a KSM page, then merge the tree's page into it.
        let Ok(kpfn) = mem.merge(mm, addr, page.frame, MergeInto::Promote) else {
            return;
        };
        let (tmm, taddr) = (self.items.mm(tree_it), self.items.address(tree_it));
        if mem
            .merge(tmm, taddr, tree_page.frame, MergeInto::KsmPage(kpfn))
            .is_err()
        {
            self.break_cow(mem, it);
            return;
        }
        let merged_was = self.items.state(tree_it);
        let merged_nid = self.nid_root(page.nid);
        self.remove_rmap_item_from_tree(mem, tree_it);
        let now_ms = clock.now_ns() / 1_000_000;
        let (node, new_chain) = self.stable_tree_insert(mem, kpfn, hash, page.nid, domain, now_ms);
        self.stable_tree_append(tree_it, node, false);
        self.stable_tree_append(it, node, false);
        // Either merge may still fail in the backend (take_failed_merges).
        let at = |ksm: &Self, it: u32| (ksm.items.mm(it), ksm.items.address(it));
        let (promoted_at, merged_at) = (at(self, it), at(self, tree_it));
        self.pending_pairs.push(PendingPair {
            node,
            kpfn,
            promoted: it,
            merged: tree_it,
            promoted_at,
            merged_at,
            merged_was,
            merged_nid,
            new_chain,
        });
    }

    // ----- run=2 -----

    /// `unmerge_and_remove_all_rmap_items`: unshare every KSM page and KSM-placed zero page in
    /// the registered address spaces, free all rmap items and stable nodes, reset `full_scans`.
    /// The address spaces stay registered for the next `run=1`.
    fn unmerge_and_remove_all_rmap_items<M: Memory + ?Sized>(
        &mut self,
        mem: &mut M,
    ) -> Result<(), UnmergeError> {
        let mut si = 0;
        while si < self.slots.len() {
            let mm = self.slots[si].mm;
            let exiting = mem.mm_exiting(mm);
            if !exiting {
                if let Err(e) = self.unmerge_range(mem, mm, 0, u64::MAX) {
                    self.cur = None;
                    self.address = 0;
                    return Err(e);
                }
            }
            self.free_all_items(mem, si);
            if exiting {
                self.remove_slot(si);
                self.mms.remove(&mm);
            } else {
                si += 1;
            }
        }
        self.cur = None;
        self.address = 0;
        self.remove_all_stable_nodes(mem);
        self.seqnr = 0;
        // What run=2 freed goes back now, not at the end of a pass that may never come.
        if self.unstable.len() == 0 {
            self.unstable.reset();
        }
        self.items.trim();
        self.nodes.trim();
        Ok(())
    }

    /// `remove_all_stable_nodes`: drop the nodes whose KSM page is gone. Returns true (EBUSY)
    /// if some KSM page is still mapped.
    fn remove_all_stable_nodes<M: Memory + ?Sized>(&mut self, mem: &M) -> bool {
        let mut busy = false;
        let ids = self.nodes.ids();
        for &id in &ids {
            if !self.nodes.contains(id) || self.nodes.is_chain(id) {
                continue;
            }
            if mem.ksm_page_alive(self.nodes.kpfn(id)) {
                busy = true;
            } else {
                self.remove_node_from_stable_tree(id);
            }
        }
        for id in ids {
            if self.nodes.contains(id) && self.nodes.is_chain(id) && self.nodes.dups(id).is_empty()
            {
                self.free_stable_node_chain(id);
            }
        }
        busy
    }

    /// Test hook (feature `test-hooks`): check the engine's internal identities: the
    /// counters agree with the trees and the per-mm records.
    #[cfg(any(test, feature = "test-hooks"))]
    pub fn check_invariants(&self) -> Result<(), String> {
        let (mut shared, mut sharing, mut unshared) = (0u64, 0u64, 0u64);
        let mut merging: FxHashMap<MmId, u64> = FxHashMap::default();
        let mut rmap: FxHashMap<MmId, u64> = FxHashMap::default();
        let mut unstable_here = 0usize;
        for it in self.items.iter() {
            let mm = self.items.mm(it);
            *rmap.entry(mm).or_default() += 1;
            match self.items.state(it) {
                ItemState::Unstable { odd } => {
                    unshared += 1;
                    unstable_here += usize::from(odd == self.odd_pass());
                }
                ItemState::Stable { .. } => *merging.entry(mm).or_default() += 1,
                ItemState::Volatile => {}
            }
        }
        if unstable_here != self.unstable.len() {
            return Err(format!(
                "{unstable_here} unstable items of this pass, {} in the unstable index",
                self.unstable.len()
            ));
        }
        let (mut chains, mut dups) = (0u64, 0u64);
        for id in self.nodes.ids() {
            match self.nodes.kind(id) {
                NodeKind::Chain => {
                    chains += 1;
                    for &d in self.nodes.dups(id) {
                        if self.nodes.kind(d) != (NodeKind::Dup { chain: id }) {
                            return Err(format!("node {d} in chain {id} is not its dup"));
                        }
                    }
                    continue;
                }
                NodeKind::Dup { .. } => dups += 1,
                NodeKind::Regular => {}
            }
            if (self.nodes.by_page(self.nodes.kpfn(id)) == Some(id)) == self.nodes.is_shadowed(id) {
                return Err(format!(
                    "node {id} is not found by its KSM page, or is shadowed"
                ));
            }
            let items = self.node_items(id);
            if items.len() != self.nodes.len(id) as usize {
                return Err(format!(
                    "node {id}: rmap_hlist_len {} but {} items",
                    self.nodes.len(id),
                    items.len()
                ));
            }
            if !items.is_empty() {
                shared += 1;
                sharing += items.len() as u64 - 1;
            }
            for it in items {
                if self.items.state(it) != (ItemState::Stable { node: id }) {
                    return Err(format!("item {it} on node {id} is not marked stable there"));
                }
            }
        }
        let want = (
            self.pages_shared,
            self.pages_sharing,
            self.pages_unshared,
            self.stable_node_chains,
            self.stable_node_dups,
        );
        let got = (shared, sharing, unshared, chains, dups);
        if want != got {
            return Err(format!(
                "counters (shared, sharing, unshared, chains, dups) = {want:?}, trees say {got:?}"
            ));
        }
        for (mm, st) in &self.mms {
            let m = merging.get(mm).copied().unwrap_or(0);
            let r = rmap.get(mm).copied().unwrap_or(0);
            if st.ksm_merging_pages != m || st.ksm_rmap_items != r {
                return Err(format!(
                    "{mm:?}: ksm_merging_pages {} / ksm_rmap_items {} but items say {m} / {r}",
                    st.ksm_merging_pages, st.ksm_rmap_items
                ));
            }
        }
        Ok(())
    }

    /// Test hook (feature `test-hooks`): the stable rmap items of every address space, to
    /// compare the engine's view with the page tables.
    #[cfg(any(test, feature = "test-hooks"))]
    pub fn stable_mappings(&self) -> Vec<StableMapping> {
        self.items
            .iter()
            .filter_map(|it| match self.items.state(it) {
                ItemState::Stable { node } => Some(StableMapping {
                    mm: self.items.mm(it),
                    addr: self.items.address(it),
                    kpfn: self.nodes.kpfn(node),
                }),
                _ => None,
            })
            .collect()
    }
}

/// One stable rmap item, as [`Ksm::stable_mappings`] lists them (feature `test-hooks`).
#[cfg(any(test, feature = "test-hooks"))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StableMapping {
    /// The address space.
    pub mm: MmId,
    /// The page's address.
    pub addr: u64,
    /// The KSM page the item's stable node stands for.
    pub kpfn: FrameId,
}
