//! The simulated memory manager: address spaces, areas, page-table entries and frames.
//!
//! It models what KSM's behaviour depends on: private anonymous pages that a write fault
//! allocates or copies (copy-on-write after fork and on KSM pages), the shared zero page mapped
//! by read faults, the zero page placed by KSM (marked, like the kernel's dirty bit), discards,
//! unmaps, protection changes, fork and exit, pinned pages, and the NUMA node of each frame.

use samepage_engine::memory::{
    FailedMerge, Memory, MergeError, MergeInto, PageRef, UnmergeError, VmaInfo,
};
use samepage_engine::page::{is_zero_page, page_hash, FrameId, MmId, PAGE_SIZE, PAGE_SIZE_U64};
use samepage_engine::KsmZeroPages;
use std::collections::{BTreeMap, BTreeSet};
use thiserror::Error;

/// Access rights of an area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prot {
    /// `PROT_READ`.
    pub read: bool,
    /// `PROT_WRITE`.
    pub write: bool,
}

impl Prot {
    /// `PROT_NONE`: every access faults (KSM still merges the pages).
    pub const NONE: Prot = Prot {
        read: false,
        write: false,
    };
    /// `PROT_READ`.
    pub const READ: Prot = Prot {
        read: true,
        write: false,
    };
    /// `PROT_READ | PROT_WRITE`.
    pub const RW: Prot = Prot {
        read: true,
        write: true,
    };
}

/// A page-table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pte {
    /// Nothing mapped (`pte_none`).
    None,
    /// The shared zero page. `ksm` is the mark KSM sets when it places it (the kernel's
    /// `pte_dirty` on a zero-pfn PTE); a read fault maps it unmarked.
    Zero {
        /// Placed by KSM (counted in `ksm_zero_pages`).
        ksm: bool,
    },
    /// A frame: private anonymous (possibly shared copy-on-write after fork), a KSM page, or
    /// a shared-memory page.
    Page(FrameId),
}

/// Errors of the simulated system calls and accesses.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum SimError {
    /// The process does not exist (it never did, or it exited).
    #[error("no such address space {0:?}")]
    NoMm(MmId),
    /// No area covers the address.
    #[error("address {0:#x} is not mapped (SIGSEGV)")]
    NotMapped(u64),
    /// The area's protection forbids the access.
    #[error("access to {0:#x} violates the area's protection (SIGSEGV)")]
    Protection(u64),
    /// The address or length (the two values) is not a multiple of the page size.
    #[error("address {0:#x} or length {1:#x} is not page aligned (EINVAL)")]
    Unaligned(u64, u64),
    /// The range is empty or runs past the end of the address space.
    #[error("zero-length or overflowing range (EINVAL)")]
    BadRange,
    /// Every frame allowed by [`SimMemory::set_frame_limit`] is in use: the fault that needed
    /// a new page fails (the kernel's `VM_FAULT_OOM`).
    #[error("out of memory: no free frame for the fault at {0:#x}")]
    OutOfMemory(u64),
}

/// One area (`struct vm_area_struct`), as [`SimMemory::vmas`] shows it.
#[derive(Clone, Debug)]
pub struct Vma {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Access rights.
    pub prot: Prot,
    /// MAP_SHARED memory: not anonymous, never merged.
    pub shared: bool,
    /// `VM_MERGEABLE`.
    pub mergeable: bool,
    /// NUMA node new frames of this area are allocated on.
    pub node: u32,
    ptes: Vec<Pte>,
}

impl Vma {
    fn idx(&self, addr: u64) -> usize {
        ((addr - self.start) / PAGE_SIZE_U64) as usize
    }
}

#[derive(Clone, Debug, Default)]
struct AddressSpace {
    /// Sorted, non-overlapping.
    vmas: Vec<Vma>,
    next_addr: u64,
}

impl AddressSpace {
    fn vma_index(&self, addr: u64) -> Option<usize> {
        let i = self.vmas.partition_point(|v| v.end <= addr);
        (i < self.vmas.len() && self.vmas[i].start <= addr).then_some(i)
    }

    /// Split so that no area straddles `addr`.
    fn split_at(&mut self, addr: u64) {
        if let Some(i) = self.vma_index(addr) {
            let v = &mut self.vmas[i];
            if v.start < addr {
                let at = v.idx(addr);
                let tail = Vma {
                    start: addr,
                    end: v.end,
                    prot: v.prot,
                    shared: v.shared,
                    mergeable: v.mergeable,
                    node: v.node,
                    ptes: v.ptes.split_off(at),
                };
                v.end = addr;
                self.vmas.insert(i + 1, tail);
            }
        }
    }

    /// Indices of the areas inside `[start, end)` after splitting at both ends.
    fn isolate(&mut self, start: u64, end: u64) -> std::ops::Range<usize> {
        self.split_at(start);
        self.split_at(end);
        let a = self.vmas.partition_point(|v| v.end <= start);
        let b = self.vmas.partition_point(|v| v.start < end);
        a..b
    }
}

#[derive(Clone, Debug)]
struct Frame {
    gen: u32,
    refcount: u32,
    nid: u32,
    ksm: bool,
    anon: bool,
    pins: u32,
    hash: Option<u64>,
}

/// Frames with reference counts. Ids carry a generation, so a freed id is never confused
/// with a new frame in the same slot. Contents live in one array, in allocation order, so a
/// scan over pages loaded in order reads memory sequentially.
#[derive(Clone, Debug, Default)]
struct Frames {
    slots: Vec<Frame>,
    data: Vec<[u8; PAGE_SIZE]>,
    free: Vec<u32>,
    live: usize,
    /// At most this many frames in use at once (the machine's RAM); `None` is unlimited.
    limit: Option<usize>,
}

/// No frame is free: [`SimMemory::set_frame_limit`] frames are in use.
#[derive(Clone, Copy, Debug)]
struct OutOfFrames;

fn fid(slot: u32, gen: u32) -> FrameId {
    FrameId((gen as u64) << 32 | slot as u64)
}

impl Frames {
    fn alloc(
        &mut self,
        nid: u32,
        anon: bool,
        src: Option<&[u8; PAGE_SIZE]>,
    ) -> Result<FrameId, OutOfFrames> {
        if self.limit.is_some_and(|l| self.live >= l) {
            return Err(OutOfFrames);
        }
        self.live += 1;
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Frame {
                    gen: 0,
                    refcount: 0,
                    nid: 0,
                    ksm: false,
                    anon: true,
                    pins: 0,
                    hash: None,
                });
                self.data.push([0; PAGE_SIZE]);
                (self.slots.len() - 1) as u32
            }
        };
        let f = &mut self.slots[slot as usize];
        f.refcount = 1;
        f.nid = nid;
        f.ksm = false;
        f.anon = anon;
        f.pins = 0;
        f.hash = None;
        let gen = f.gen;
        let d = &mut self.data[slot as usize];
        match src {
            Some(s) => d.copy_from_slice(s),
            None => d.fill(0),
        }
        Ok(fid(slot, gen))
    }

    /// Frames that can still be allocated.
    fn available(&self) -> usize {
        self.limit
            .map_or(usize::MAX, |l| l.saturating_sub(self.live))
    }

    fn data(&self, id: FrameId) -> &[u8; PAGE_SIZE] {
        self.get(id).expect("live frame");
        &self.data[(id.0 & 0xffff_ffff) as usize]
    }

    /// Contents for writing; drops the cached hash.
    fn data_mut(&mut self, id: FrameId) -> &mut [u8; PAGE_SIZE] {
        self.get_mut(id).hash = None;
        &mut self.data[(id.0 & 0xffff_ffff) as usize]
    }

    fn get(&self, id: FrameId) -> Option<&Frame> {
        let f = self.slots.get((id.0 & 0xffff_ffff) as usize)?;
        (f.gen == (id.0 >> 32) as u32 && f.refcount > 0).then_some(f)
    }

    fn get_mut(&mut self, id: FrameId) -> &mut Frame {
        let f = &mut self.slots[(id.0 & 0xffff_ffff) as usize];
        assert!(
            f.gen == (id.0 >> 32) as u32 && f.refcount > 0,
            "dangling {id:?}"
        );
        f
    }

    fn put(&mut self, id: FrameId) {
        let f = self.get_mut(id);
        f.refcount -= 1;
        if f.refcount == 0 {
            f.gen = f.gen.wrapping_add(1);
            f.ksm = false;
            self.free.push((id.0 & 0xffff_ffff) as u32);
            self.live -= 1;
        }
    }

    fn hash(&mut self, id: FrameId) -> u64 {
        let slot = (id.0 & 0xffff_ffff) as usize;
        let f = self.get_mut(id);
        if let Some(h) = f.hash {
            return h;
        }
        let h = page_hash(&self.data[slot]);
        self.slots[slot].hash = Some(h);
        h
    }
}

/// Start of the address range new areas are placed in (above `mmap_min_addr`).
const MMAP_BASE: u64 = 0x1000_0000;

/// Which deferred merges [`SimMemory::defer_merges`] fails on purpose: about one in `n`,
/// chosen by a hash of `seed` and the merge's number (merges are numbered from 1 in the order
/// they were accepted), so a run is the same every time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailEvery {
    /// One merge in `n` fails on average; 1 fails them all, 0 none.
    pub n: u32,
    /// Picks which ones.
    pub seed: u64,
}

impl FailEvery {
    /// Whether merge number `seq` fails, and as what.
    fn verdict(&self, seq: u64) -> Option<MergeError> {
        if self.n == 0 {
            return None;
        }
        let h = splitmix64(self.seed ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        if !h.is_multiple_of(self.n as u64) {
            return None;
        }
        // What a real backend meets: the page went away, changed, or got pinned meanwhile.
        Some([MergeError::Gone, MergeError::Changed, MergeError::Pinned][(h >> 32) as usize % 3])
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Something the process does while a scan batch runs, between the engine's accepting a
/// merge and the backend's carrying it out ([`SimMemory::during_batch`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchRace {
    /// A store of `data` at `addr`.
    Write {
        /// The process.
        mm: MmId,
        /// Where.
        addr: u64,
        /// What.
        data: Vec<u8>,
    },
    /// `MADV_DONTNEED` of `len` bytes at `addr`.
    DontNeed {
        /// The process.
        mm: MmId,
        /// Where.
        addr: u64,
        /// How much.
        len: u64,
    },
    /// A pin of the page at `addr` for I/O ([`SimMemory::pin`]).
    Pin {
        /// The process.
        mm: MmId,
        /// Where.
        addr: u64,
    },
}

#[derive(Clone, Copy, Debug)]
struct QueuedMerge {
    mm: MmId,
    addr: u64,
    page: FrameId,
    into: MergeInto,
}

/// Merges accepted and not carried out yet ([`SimMemory::defer_merges`]).
#[derive(Clone, Debug, Default)]
struct Deferred {
    /// Merges are deferred (else only races wait here).
    on: bool,
    fail: Option<FailEvery>,
    queue: Vec<QueuedMerge>,
    /// Frames accepted for promotion.
    promoted: BTreeSet<FrameId>,
    failed: Vec<FailedMerge>,
    /// Merges accepted so far (the number of the last one).
    seq: u64,
    /// Done by the process before the queued merges are carried out.
    races: Vec<BatchRace>,
}

/// The simulated memory manager.
#[derive(Clone, Debug, Default)]
pub struct SimMemory {
    mms: BTreeMap<MmId, AddressSpace>,
    frames: Frames,
    zero: KsmZeroPages,
    next_mm: u32,
    /// Writes that copied a KSM page.
    cow_ksm: u64,
    /// Deferred merges, when on.
    deferred: Option<Deferred>,
}

impl SimMemory {
    /// An empty machine.
    pub fn new() -> Self {
        Self {
            next_mm: 1,
            ..Self::default()
        }
    }

    /// A new, empty address space (a process).
    pub fn create_mm(&mut self) -> MmId {
        let mm = MmId(self.next_mm);
        self.next_mm += 1;
        self.mms.insert(
            mm,
            AddressSpace {
                vmas: Vec::new(),
                next_addr: MMAP_BASE,
            },
        );
        mm
    }

    /// The address space exists (it was created and has not exited).
    pub fn has_mm(&self, mm: MmId) -> bool {
        self.mms.contains_key(&mm)
    }

    /// Live address spaces.
    pub fn mm_ids(&self) -> Vec<MmId> {
        self.mms.keys().copied().collect()
    }

    fn space(&mut self, mm: MmId) -> Result<&mut AddressSpace, SimError> {
        self.mms.get_mut(&mm).ok_or(SimError::NoMm(mm))
    }

    fn check_range(start: u64, len: u64) -> Result<u64, SimError> {
        if !start.is_multiple_of(PAGE_SIZE_U64) || !len.is_multiple_of(PAGE_SIZE_U64) {
            return Err(SimError::Unaligned(start, len));
        }
        if len == 0 {
            return Err(SimError::BadRange);
        }
        start.checked_add(len).ok_or(SimError::BadRange)
    }

    /// `mmap(NULL, len, prot, MAP_PRIVATE|MAP_ANONYMOUS)` (or `MAP_SHARED` with `shared`),
    /// with new frames allocated on NUMA node `node`. Areas are placed one guard page apart.
    pub fn mmap(
        &mut self,
        mm: MmId,
        len: u64,
        prot: Prot,
        shared: bool,
        node: u32,
    ) -> Result<u64, SimError> {
        let sp = self.space(mm)?;
        let start = sp.next_addr;
        let end = Self::check_range(start, len)?;
        sp.next_addr = end + PAGE_SIZE_U64;
        let i = sp.vmas.partition_point(|v| v.end <= start);
        sp.vmas.insert(
            i,
            Vma {
                start,
                end,
                prot,
                shared,
                mergeable: false,
                node,
                ptes: vec![Pte::None; (len / PAGE_SIZE_U64) as usize],
            },
        );
        Ok(start)
    }

    /// Remove a mapping: drop the frame reference, uncount a KSM-placed zero page.
    fn zap_pte(frames: &mut Frames, zero: &mut KsmZeroPages, mm: MmId, pte: &mut Pte) {
        match std::mem::replace(pte, Pte::None) {
            Pte::None => {}
            Pte::Zero { ksm } => {
                zero.might_unmap_zero_page(mm, ksm);
            }
            Pte::Page(f) => frames.put(f),
        }
    }

    /// `munmap`.
    pub fn munmap(&mut self, mm: MmId, start: u64, len: u64) -> Result<(), SimError> {
        let end = Self::check_range(start, len)?;
        let sp = self.mms.get_mut(&mm).ok_or(SimError::NoMm(mm))?;
        let r = sp.isolate(start, end);
        let removed: Vec<Vma> = sp.vmas.drain(r).collect();
        for mut v in removed {
            for pte in &mut v.ptes {
                Self::zap_pte(&mut self.frames, &mut self.zero, mm, pte);
            }
        }
        Ok(())
    }

    /// `MADV_DONTNEED`: private pages read back as zeros afterwards; shared memory keeps its
    /// contents (they live in the page cache, not in the page table).
    pub fn madv_dontneed(&mut self, mm: MmId, start: u64, len: u64) -> Result<(), SimError> {
        let end = Self::check_range(start, len)?;
        let sp = self.mms.get_mut(&mm).ok_or(SimError::NoMm(mm))?;
        let r = sp.isolate(start, end);
        if r.is_empty() {
            return Err(SimError::NotMapped(start));
        }
        for v in &mut sp.vmas[r] {
            if v.shared {
                continue;
            }
            for pte in &mut v.ptes {
                Self::zap_pte(&mut self.frames, &mut self.zero, mm, pte);
            }
        }
        Ok(())
    }

    /// `mprotect`.
    pub fn mprotect(&mut self, mm: MmId, start: u64, len: u64, prot: Prot) -> Result<(), SimError> {
        let end = Self::check_range(start, len)?;
        let sp = self.space(mm)?;
        let r = sp.isolate(start, end);
        if r.is_empty() {
            return Err(SimError::NotMapped(start));
        }
        for v in &mut sp.vmas[r] {
            v.prot = prot;
        }
        Ok(())
    }

    /// Resolve a fault at `addr` for an access (`write`), returning the frame to access.
    /// `force` is FOLL_FORCE (`/proc/self/mem`): it ignores the protection.
    fn fault(
        &mut self,
        mm: MmId,
        addr: u64,
        write: bool,
        force: bool,
    ) -> Result<Option<FrameId>, SimError> {
        let oom = |_: OutOfFrames| SimError::OutOfMemory(addr);
        let sp = self.mms.get_mut(&mm).ok_or(SimError::NoMm(mm))?;
        let i = sp.vma_index(addr).ok_or(SimError::NotMapped(addr))?;
        let v = &mut sp.vmas[i];
        if !force && ((write && !v.prot.write) || (!write && !v.prot.read)) {
            return Err(SimError::Protection(addr));
        }
        let (node, shared) = (v.node, v.shared);
        let idx = v.idx(addr);
        let pte = &mut v.ptes[idx];
        match *pte {
            Pte::None if shared => {
                let f = self.frames.alloc(node, false, None).map_err(oom)?;
                *pte = Pte::Page(f);
                Ok(Some(f))
            }
            Pte::None if !write => {
                *pte = Pte::Zero { ksm: false };
                Ok(None)
            }
            Pte::None => {
                let f = self.frames.alloc(node, true, None).map_err(oom)?;
                *pte = Pte::Page(f);
                Ok(Some(f))
            }
            Pte::Zero { .. } if !write => Ok(None),
            Pte::Zero { ksm } => {
                // Copy-on-write of the zero page (`wp_page_copy`): a marked one is uncounted
                // once the new page is there.
                let f = self.frames.alloc(node, true, None).map_err(oom)?;
                self.zero.might_unmap_zero_page(mm, ksm);
                *pte = Pte::Page(f);
                Ok(Some(f))
            }
            Pte::Page(f) if !write => Ok(Some(f)),
            Pte::Page(f) => {
                let fr = self.frames.get_mut(f);
                if fr.anon && (fr.ksm || fr.refcount > 1) {
                    // KSM pages are never reused on write; shared COW pages are copied.
                    let ksm = fr.ksm;
                    let data = *self.frames.data(f);
                    let new = self.frames.alloc(node, true, Some(&data)).map_err(oom)?;
                    if ksm {
                        self.cow_ksm += 1;
                    }
                    self.frames.put(f);
                    *pte = Pte::Page(new);
                    Ok(Some(new))
                } else {
                    Ok(Some(f))
                }
            }
        }
    }

    fn access(&mut self, mm: MmId, addr: u64, data: &[u8], force: bool) -> Result<(), SimError> {
        let mut off = 0usize;
        while off < data.len() {
            let a = addr + off as u64;
            let page = a & !(PAGE_SIZE_U64 - 1);
            let in_page = (a - page) as usize;
            let n = (PAGE_SIZE - in_page).min(data.len() - off);
            let f = self
                .fault(mm, page, true, force)?
                .expect("write fault maps a frame");
            self.frames.data_mut(f)[in_page..in_page + n].copy_from_slice(&data[off..off + n]);
            off += n;
        }
        Ok(())
    }

    /// Store `data` at `addr` (write faults as needed).
    pub fn write(&mut self, mm: MmId, addr: u64, data: &[u8]) -> Result<(), SimError> {
        self.access(mm, addr, data, false)
    }

    /// Write through `/proc/self/mem` (FOLL_FORCE): works on PROT_NONE and read-only areas,
    /// with copy-on-write as usual.
    pub fn force_write(&mut self, mm: MmId, addr: u64, data: &[u8]) -> Result<(), SimError> {
        self.access(mm, addr, data, true)
    }

    /// Load `buf.len()` bytes from `addr` (read faults map the zero page on holes).
    pub fn read(&mut self, mm: MmId, addr: u64, buf: &mut [u8]) -> Result<(), SimError> {
        let mut off = 0usize;
        while off < buf.len() {
            let a = addr + off as u64;
            let page = a & !(PAGE_SIZE_U64 - 1);
            let in_page = (a - page) as usize;
            let n = (PAGE_SIZE - in_page).min(buf.len() - off);
            match self.fault(mm, page, false, false)? {
                Some(f) => {
                    buf[off..off + n].copy_from_slice(&self.frames.data(f)[in_page..in_page + n])
                }
                None => buf[off..off + n].fill(0),
            }
            off += n;
        }
        Ok(())
    }

    /// The contents of one page as the process would read it, without faulting anything in
    /// and ignoring protection (for checking).
    pub fn peek_page(&self, mm: MmId, addr: u64) -> Option<[u8; PAGE_SIZE]> {
        match self.pte(mm, addr)? {
            Pte::Page(f) => Some(*self.frames.data(f)),
            _ => Some([0; PAGE_SIZE]),
        }
    }

    /// The entry mapping `addr`, if `addr` is in an area.
    pub fn pte(&self, mm: MmId, addr: u64) -> Option<Pte> {
        let sp = self.mms.get(&mm)?;
        let v = &sp.vmas[sp.vma_index(addr)?];
        Some(v.ptes[v.idx(addr)])
    }

    /// Areas of `mm`.
    pub fn vmas(&self, mm: MmId) -> &[Vma] {
        self.mms.get(&mm).map(|s| &s.vmas[..]).unwrap_or(&[])
    }

    /// Every `(address, entry)` of `mm`.
    pub fn ptes(&self, mm: MmId) -> impl Iterator<Item = (u64, &Vma, Pte)> + '_ {
        self.vmas(mm).iter().flat_map(|v| {
            v.ptes
                .iter()
                .enumerate()
                .map(move |(i, p)| (v.start + i as u64 * PAGE_SIZE_U64, v, *p))
        })
    }

    /// The frame is a KSM page.
    pub fn frame_is_ksm(&self, f: FrameId) -> bool {
        self.frames.get(f).is_some_and(|fr| fr.ksm)
    }

    /// Write faults that copied a KSM page (`/proc/vmstat` `cow_ksm`).
    pub fn cow_ksm(&self) -> u64 {
        self.cow_ksm
    }

    /// Frames in use.
    pub fn frames_in_use(&self) -> usize {
        self.frames.live
    }

    /// Limit the frames in use to `limit` (`None`: no limit), as if the machine had that much
    /// RAM and no swap. When no frame is free, a fault that needs a new page fails with
    /// [`SimError::OutOfMemory`] and unsharing a KSM page or a KSM-placed zero page
    /// ([`Memory::break_ksm`], so `MADV_UNMERGEABLE`, `PR_SET_MEMORY_MERGE=0` and `run=2`)
    /// fails with [`UnmergeError::NoMemory`], the kernel's -ENOMEM. Frames already in use
    /// above a lower limit stay.
    ///
    /// ```
    /// use samepage_sim::{Prot, SimError, SimMemory};
    /// let mut mem = SimMemory::new();
    /// let mm = mem.create_mm();
    /// let a = mem.mmap(mm, 2 * 4096, Prot::RW, false, 0).unwrap();
    /// mem.set_frame_limit(Some(1));
    /// mem.write(mm, a, &[1]).unwrap();
    /// assert_eq!(mem.write(mm, a + 4096, &[1]), Err(SimError::OutOfMemory(a + 4096)));
    /// ```
    pub fn set_frame_limit(&mut self, limit: Option<usize>) {
        self.frames.limit = limit;
    }

    /// From now on, accept every merge at once ([`Memory::merge`] returns `Ok`) and carry it
    /// out only when the engine calls [`Memory::take_failed_merges`] (at the end of each
    /// scan batch), as the live backend does: merges are carried out in the order they were
    /// accepted and fail for real if the page changed, went away or was pinned in between
    /// (see [`SimMemory::during_batch`]), and `fail` makes a deterministic subset fail on
    /// purpose. Until then, a page accepted for promotion counts as a KSM page
    /// ([`Memory::ksm_page_alive`]).
    ///
    /// ```
    /// use samepage_engine::{FailedMerge, Memory, MergeError, MergeInto};
    /// use samepage_sim::{FailEvery, Prot, SimMemory};
    /// let mut mem = SimMemory::new();
    /// let mm = mem.create_mm();
    /// let a = mem.mmap(mm, 4096, Prot::RW, false, 0).unwrap();
    /// mem.write(mm, a, &[7; 4096]).unwrap();
    /// mem.set_mergeable(mm, a, a + 4096, true);
    /// let page = mem.get_page(mm, a).unwrap().frame;
    /// mem.defer_merges(Some(FailEvery { n: 1, seed: 0 })); // fail every one
    /// assert_eq!(mem.merge(mm, a, page, MergeInto::Promote), Ok(page));
    /// assert!(mem.ksm_page_alive(page));
    /// let mut failed = Vec::new();
    /// mem.take_failed_merges(&mut failed);
    /// assert_eq!(failed.len(), 1);
    /// assert_eq!((failed[0].mm, failed[0].addr), (mm, a));
    /// assert!(!mem.ksm_page_alive(page));
    /// ```
    pub fn defer_merges(&mut self, fail: Option<FailEvery>) {
        let d = self.deferred.get_or_insert_with(Deferred::default);
        d.on = true;
        d.fail = fail;
    }

    /// Merge synchronously again ([`Memory::merge`] says at once whether it worked); merges
    /// still queued are carried out first and their failures kept for the next
    /// [`Memory::take_failed_merges`].
    pub fn merge_synchronously(&mut self) {
        self.carry_out_merges();
        if let Some(d) = &mut self.deferred {
            d.on = false;
        }
    }

    /// Merges accepted and not carried out yet.
    pub fn queued_merges(&self) -> usize {
        self.deferred.as_ref().map_or(0, |d| d.queue.len())
    }

    /// Have the process do `race` while the current scan batch runs: after the merges the
    /// engine asks for in the batch are accepted, before they are carried out (at the next
    /// [`Memory::take_failed_merges`], [`Memory::break_ksm`] or [`Memory::set_mergeable`]).
    /// Without [`SimMemory::defer_merges`] it still waits for that moment. A race that fails
    /// (no such process, address not mapped) is dropped, as a faulting process would be.
    pub fn during_batch(&mut self, race: BatchRace) {
        self.deferred
            .get_or_insert_with(Deferred::default)
            .races
            .push(race);
    }

    /// The frames accepted for promotion and not promoted yet, if there are any.
    fn promoted(&self) -> Option<&BTreeSet<FrameId>> {
        self.deferred
            .as_ref()
            .map(|d| &d.promoted)
            .filter(|p| !p.is_empty())
    }

    /// Do the queued races, then carry out the queued merges in order, keeping failures.
    fn carry_out_merges(&mut self) {
        let Some(d) = &mut self.deferred else {
            return;
        };
        let races = std::mem::take(&mut d.races);
        let queue = std::mem::take(&mut d.queue);
        for race in races {
            // A racing access that faults is the process's problem, not the merge's.
            let _ = match race {
                BatchRace::Write { mm, addr, data } => self.write(mm, addr, &data),
                BatchRace::DontNeed { mm, addr, len } => self.madv_dontneed(mm, addr, len),
                BatchRace::Pin { mm, addr } => self.pin(mm, addr).map(|_| ()),
            };
        }
        for q in queue {
            let d = self.deferred.as_mut().expect("deferred merges");
            d.seq += 1;
            let injected = d.fail.and_then(|f| f.verdict(d.seq));
            let result = match injected {
                Some(e) => Err(e),
                None => self.merge_now(q.mm, q.addr, q.page, q.into).map(|_| ()),
            };
            let d = self.deferred.as_mut().expect("deferred merges");
            if let MergeInto::Promote = q.into {
                d.promoted.remove(&q.page);
            }
            if let Err(error) = result {
                d.failed.push(FailedMerge {
                    mm: q.mm,
                    addr: q.addr,
                    error,
                });
            }
        }
        if let Some(d) = &mut self.deferred {
            d.promoted.clear();
        }
    }

    /// The limit set by [`SimMemory::set_frame_limit`].
    pub fn frame_limit(&self) -> Option<usize> {
        self.frames.limit
    }

    /// `fork`: the child gets a copy of every area; private pages become shared
    /// copy-on-write, KSM pages and zero pages (with their mark) are mapped in both, and the
    /// child's marked zero pages are added to the counts.
    pub fn fork(&mut self, parent: MmId) -> Result<MmId, SimError> {
        let sp = self.mms.get(&parent).ok_or(SimError::NoMm(parent))?.clone();
        for v in &sp.vmas {
            for p in &v.ptes {
                if let Pte::Page(f) = p {
                    self.frames.get_mut(*f).refcount += 1;
                }
            }
        }
        let child = MmId(self.next_mm);
        self.next_mm += 1;
        self.mms.insert(child, sp);
        self.zero.fork(parent, child);
        Ok(child)
    }

    /// The process exits: every mapping is zapped, then the address space is gone.
    pub fn exit(&mut self, mm: MmId) -> Result<(), SimError> {
        let sp = self.mms.remove(&mm).ok_or(SimError::NoMm(mm))?;
        for mut v in sp.vmas {
            for pte in &mut v.ptes {
                Self::zap_pte(&mut self.frames, &mut self.zero, mm, pte);
            }
        }
        self.zero.exit(mm);
        Ok(())
    }

    /// khugepaged collapses the 2 MiB-aligned range at `addr` into a huge page: every entry
    /// becomes a private copy (zero pages, KSM-placed ones included, become zeroed pages and
    /// are uncounted). Like khugepaged, it refuses a range that maps KSM pages or is not inside
    /// one private area, or when there are not 512 free frames for the new huge page (it is
    /// allocated before the old pages are freed). The simulator has no huge pages, so the
    /// result is 512 base pages.
    pub fn collapse_huge(&mut self, mm: MmId, addr: u64) -> Result<bool, SimError> {
        const HPAGE: u64 = 2 << 20;
        let start = addr & !(HPAGE - 1);
        let sp = self.mms.get_mut(&mm).ok_or(SimError::NoMm(mm))?;
        let Some(i) = sp.vma_index(start) else {
            return Ok(false);
        };
        let v = &mut sp.vmas[i];
        if v.shared || v.end < start + HPAGE {
            return Ok(false);
        }
        let (lo, hi) = (v.idx(start), v.idx(start + HPAGE));
        let frames = &mut self.frames;
        if v.ptes[lo..hi]
            .iter()
            .any(|p| matches!(p, Pte::Page(f) if frames.get(*f).is_some_and(|fr| fr.ksm)))
        {
            return Ok(false);
        }
        if frames.available() < (hi - lo) {
            return Ok(false);
        }
        let node = v.node;
        for pte in &mut v.ptes[lo..hi] {
            let data = match *pte {
                Pte::Page(f) => *frames.data(f),
                _ => [0; PAGE_SIZE],
            };
            Self::zap_pte(frames, &mut self.zero, mm, pte);
            let new = frames.alloc(node, true, Some(&data));
            *pte = Pte::Page(new.expect("frames checked available above"));
        }
        Ok(true)
    }

    /// Pin the page at `addr` for I/O (as `pin_user_pages`), faulting it in for write first.
    pub fn pin(&mut self, mm: MmId, addr: u64) -> Result<FrameId, SimError> {
        let f = self
            .fault(mm, addr, true, true)?
            .expect("write fault maps a frame");
        self.frames.get_mut(f).pins += 1;
        Ok(f)
    }

    /// Release a pin taken by [`SimMemory::pin`].
    pub fn unpin(&mut self, f: FrameId) {
        let fr = self.frames.get_mut(f);
        fr.pins -= 1;
    }

    /// `try_to_merge_one_page`, at once.
    fn merge_now(
        &mut self,
        mm: MmId,
        addr: u64,
        page: FrameId,
        into: MergeInto,
    ) -> Result<FrameId, MergeError> {
        if self.mergeable_pte(mm, addr) != Some(Pte::Page(page)) {
            return Err(MergeError::Gone);
        }
        let fr = self.frames.get(page).ok_or(MergeError::Gone)?;
        if !fr.anon {
            return Err(MergeError::Gone);
        }
        // write_protect_page: an extra reference (a pin) means I/O may write the page.
        if fr.pins > 0 {
            return Err(MergeError::Pinned);
        }
        match into {
            MergeInto::ZeroPage => {
                if !is_zero_page(self.frames.data(page)) {
                    return Err(MergeError::Changed);
                }
                self.set_pte(mm, addr, Pte::Zero { ksm: true });
                self.frames.put(page);
                self.zero.map_zero_page(mm);
                Ok(page)
            }
            MergeInto::Promote => {
                self.frames.get_mut(page).ksm = true;
                Ok(page)
            }
            MergeInto::KsmPage(k) => {
                if k == page {
                    return Ok(k);
                }
                if !self.frame_is_ksm(k) {
                    return Err(MergeError::Gone);
                }
                if !self.pages_identical(page, k) {
                    return Err(MergeError::Changed);
                }
                self.frames.get_mut(k).refcount += 1;
                self.set_pte(mm, addr, Pte::Page(k));
                self.frames.put(page);
                Ok(k)
            }
        }
    }

    fn set_pte(&mut self, mm: MmId, addr: u64, pte: Pte) {
        let sp = self.mms.get_mut(&mm).expect("mm");
        let i = sp.vma_index(addr).expect("vma");
        let v = &mut sp.vmas[i];
        let idx = v.idx(addr);
        v.ptes[idx] = pte;
    }

    fn mergeable_pte(&self, mm: MmId, addr: u64) -> Option<Pte> {
        let sp = self.mms.get(&mm)?;
        let v = &sp.vmas[sp.vma_index(addr)?];
        (v.mergeable && !v.shared).then(|| v.ptes[v.idx(addr)])
    }
}

impl Memory for SimMemory {
    fn mm_exiting(&self, mm: MmId) -> bool {
        !self.mms.contains_key(&mm)
    }

    fn find_vma(&self, mm: MmId, addr: u64) -> Option<VmaInfo> {
        let sp = self.mms.get(&mm)?;
        let i = sp.vmas.partition_point(|v| v.end <= addr);
        sp.vmas.get(i).map(|v| VmaInfo {
            start: v.start,
            end: v.end,
            mergeable: v.mergeable,
            anon: !v.shared,
        })
    }

    fn next_page(&mut self, mm: MmId, from: u64, end: u64) -> Option<(u64, PageRef)> {
        let promoted = self.promoted();
        let sp = self.mms.get(&mm)?;
        let v = &sp.vmas[sp.vma_index(from)?];
        let (a, b) = (v.idx(from), v.idx(end.min(v.end)));
        for (i, p) in v.ptes[a..b].iter().enumerate() {
            if let Pte::Page(f) = p {
                let fr = self.frames.get(*f).expect("mapped frame");
                if fr.anon {
                    let addr = from + i as u64 * PAGE_SIZE_U64;
                    return Some((
                        addr,
                        PageRef {
                            frame: *f,
                            ksm: fr.ksm || promoted.is_some_and(|p| p.contains(f)),
                            nid: fr.nid,
                            // Reads map KSM pages here, as in the kernel.
                            read_copy: false,
                        },
                    ));
                }
            }
        }
        None
    }

    fn get_page(&mut self, mm: MmId, addr: u64) -> Option<PageRef> {
        let promoted = self.promoted();
        match self.mergeable_pte(mm, addr)? {
            Pte::Page(f) => {
                let fr = self.frames.get(f)?;
                fr.anon.then_some(PageRef {
                    frame: f,
                    ksm: fr.ksm || promoted.is_some_and(|p| p.contains(&f)),
                    nid: fr.nid,
                    read_copy: false,
                })
            }
            _ => None,
        }
    }

    fn page_hash(&mut self, frame: FrameId) -> Option<u64> {
        Some(self.frames.hash(frame))
    }

    fn pages_identical(&mut self, a: FrameId, b: FrameId) -> bool {
        if a == b {
            return true;
        }
        let (fa, fb) = (self.frames.get(a), self.frames.get(b));
        match (fa, fb) {
            (Some(x), Some(y)) => {
                if let (Some(h1), Some(h2)) = (x.hash, y.hash) {
                    if h1 != h2 {
                        return false;
                    }
                }
                self.frames.data(a) == self.frames.data(b)
            }
            _ => false,
        }
    }

    fn ksm_page_alive(&self, frame: FrameId) -> bool {
        // A page accepted for promotion is a KSM page already, as far as the engine asks.
        self.frame_is_ksm(frame) || self.promoted().is_some_and(|p| p.contains(&frame))
    }

    fn merge(
        &mut self,
        mm: MmId,
        addr: u64,
        page: FrameId,
        into: MergeInto,
    ) -> Result<FrameId, MergeError> {
        let Some(d) = self.deferred.as_mut().filter(|d| d.on) else {
            return self.merge_now(mm, addr, page, into);
        };
        // Accepted now, carried out (or failed) in take_failed_merges.
        d.queue.push(QueuedMerge {
            mm,
            addr,
            page,
            into,
        });
        Ok(match into {
            MergeInto::Promote => {
                d.promoted.insert(page);
                page
            }
            MergeInto::KsmPage(k) => k,
            MergeInto::ZeroPage => page,
        })
    }

    fn break_ksm(&mut self, mm: MmId, start: u64, end: u64) -> Result<(), UnmergeError> {
        // Calls take effect in order: merges accepted before this one first.
        self.carry_out_merges();
        let Some(sp) = self.mms.get_mut(&mm) else {
            return Ok(());
        };
        let a = sp.vmas.partition_point(|v| v.end <= start);
        for v in &mut sp.vmas[a..] {
            if v.start >= end {
                break;
            }
            let (lo, hi) = (v.idx(start.max(v.start)), v.idx(end.min(v.end)));
            for pte in &mut v.ptes[lo..hi] {
                match *pte {
                    Pte::Zero { ksm: true } => {
                        // FAULT_FLAG_UNSHARE on a KSM zero page: a private zeroed page. Out of
                        // frames, the fault ends in VM_FAULT_OOM and break_ksm in -ENOMEM,
                        // with the pages before this one unshared.
                        let new = self
                            .frames
                            .alloc(v.node, true, None)
                            .map_err(|_| UnmergeError::NoMemory)?;
                        self.zero.might_unmap_zero_page(mm, true);
                        *pte = Pte::Page(new);
                    }
                    Pte::Page(f) if self.frames.get(f).is_some_and(|fr| fr.ksm) => {
                        // A KSM page is never reused, even by its last mapping: always a copy.
                        let data = *self.frames.data(f);
                        let nid = self.frames.get(f).expect("frame").nid;
                        let new = self
                            .frames
                            .alloc(nid, true, Some(&data))
                            .map_err(|_| UnmergeError::NoMemory)?;
                        self.frames.put(f);
                        *pte = Pte::Page(new);
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn set_mergeable(&mut self, mm: MmId, start: u64, end: u64, on: bool) {
        self.carry_out_merges();
        let Some(sp) = self.mms.get_mut(&mm) else {
            return;
        };
        let end = end.min(!(PAGE_SIZE_U64 - 1));
        // Split only areas whose flag actually changes, as madvise does.
        let needs = |v: &Vma| !v.shared && v.mergeable != on;
        if sp.vma_index(start).is_some_and(|i| needs(&sp.vmas[i])) {
            sp.split_at(start);
        }
        if sp.vma_index(end).is_some_and(|i| needs(&sp.vmas[i])) {
            sp.split_at(end);
        }
        for v in &mut sp.vmas {
            if v.start >= start && v.end <= end && !v.shared {
                v.mergeable = on;
            }
        }
    }

    fn ksm_zero_pages(&self, mm: Option<MmId>) -> i64 {
        match mm {
            None => self.zero.global(),
            Some(m) => self.zero.mm(m),
        }
    }

    fn take_failed_merges(&mut self, out: &mut Vec<FailedMerge>) {
        self.carry_out_merges();
        if let Some(d) = &mut self.deferred {
            out.append(&mut d.failed);
        }
    }
}
