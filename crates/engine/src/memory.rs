//! The memory backend trait: the only way the engine touches pages.
//!
//! A backend is a memory manager: the simulator (`samepage-sim`) or real regions of this
//! process (`samepage-linux`). The engine asks it where the anonymous pages are, for their
//! checksums and comparisons, to merge a page (a transaction that may fail at any step), and to
//! unshare merged pages. Everything that happens to memory behind the engine's back
//! (copy-on-write, discards, unmaps, forks, exits) is the backend's business; the engine
//! notices it the way ksmd does, on its next visit, except for KSM-placed zero pages, which the
//! backend counts synchronously in its [`KsmZeroPages`](crate::KsmZeroPages).

use crate::page::{FrameId, MmId};
use thiserror::Error;

/// A present anonymous page as the scan sees it (the kernel's `folio_walk` result).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRef {
    /// Physical identity.
    pub frame: FrameId,
    /// The page is a KSM page (`folio_test_ksm`): shared, write-protected, copy-on-write.
    pub ksm: bool,
    /// NUMA node of the frame.
    pub nid: u32,
    /// The page stood for a KSM page until the application *read* it, since the scan last
    /// looked: a backend whose merged pages cannot be mapped for reads (samepage's live
    /// one) gives a read a private copy, where the kernel would still map the KSM page. Such
    /// a page did not fail to merge, so smart scan does not age it as one that did.
    pub read_copy: bool,
}

/// One virtual memory area, as far as KSM cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmaInfo {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// `VM_MERGEABLE`.
    pub mergeable: bool,
    /// The area can hold anonymous pages at all (the kernel's `vma->anon_vma` test, and
    /// `vma_ksm_compatible` for private anonymous memory).
    pub anon: bool,
}

/// What a page is to be merged into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeInto {
    /// The shared zero page, with the "placed by KSM" mark (`use_zero_pages`).
    ZeroPage,
    /// An existing KSM page with identical content.
    KsmPage(FrameId),
    /// Make this page itself a KSM page (write-protected, shared from now on): the first half
    /// of `try_to_merge_two_pages`.
    Promote,
}

/// Why a merge did not happen. All of these are ordinary outcomes: the engine skips the page
/// and the scan goes on.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum MergeError {
    /// The address no longer maps that page in a mergeable area (unmapped, replaced,
    /// not mergeable any more).
    #[error("the page is no longer mapped at that address in a mergeable area")]
    Gone,
    /// The contents differ from the target once the page was write-protected.
    #[error("the page's contents changed before the merge could complete")]
    Changed,
    /// The page is pinned (DMA, O_DIRECT, io_uring fixed buffer): write protection would not
    /// stop writes, so it must not be merged.
    #[error("the page is pinned for I/O")]
    Pinned,
    /// Merging would exceed the backend's mapping budget (live backend: `vm.max_map_count`).
    #[error("the mapping budget is used up")]
    NoBudget,
}

/// A merge that [`Memory::merge`] accepted (returned `Ok`) but the backend could not carry
/// out, as [`Memory::take_failed_merges`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailedMerge {
    /// The address space of the page.
    pub mm: MmId,
    /// The page's address, as it was passed to [`Memory::merge`].
    pub addr: u64,
    /// Why it failed.
    pub error: MergeError,
}

/// Why an unmerge ([`Memory::break_ksm`]) failed. The pages unshared before the failure stay
/// unshared; the others stay merged.
#[derive(Debug, Error)]
pub enum UnmergeError {
    /// No memory for the private copies: the kernel's `break_ksm` returns -ENOMEM when the
    /// unsharing fault ends in `VM_FAULT_OOM`.
    #[error("not enough memory to unshare the merged pages (ENOMEM)")]
    NoMemory,
    /// The backend failed for another reason; the source says why.
    #[error("the memory backend could not unshare the merged pages")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl UnmergeError {
    /// An [`UnmergeError::Backend`] with `source` as its cause.
    pub fn backend(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        UnmergeError::Backend(source.into())
    }
}

/// A memory manager that KSM can scan and merge.
///
/// Addresses are page aligned; `mm` ids and frame ids come from the backend. Every method is
/// called by the engine with no other call of the backend's under way; what the backend's
/// own users (the processes) do in between is the backend's business.
///
/// The examples run against the simulated memory manager of `samepage-sim`, the oracle the
/// other backends are tested against. Most set up one process whose pages are these:
///
/// ```
/// use samepage_engine::{Memory, PAGE_SIZE_U64 as PS};
/// use samepage_sim::{Prot, SimMemory};
/// let mut mem = SimMemory::new();
/// let mm = mem.create_mm();
/// let a = mem.mmap(mm, 4 * PS, Prot::RW, false, 0).unwrap();
/// mem.write(mm, a, &[7; 4096]).unwrap(); // page 0: sevens
/// mem.write(mm, a + PS, &[7; 4096]).unwrap(); // page 1: sevens
/// let mut b = [0u8; 1];
/// mem.read(mm, a + 2 * PS, &mut b).unwrap(); // page 2: the zero page (read fault)
/// // page 3: nothing mapped
/// mem.set_mergeable(mm, a, a + 4 * PS, true);
/// assert_eq!(mem.next_page(mm, a, a + 4 * PS).map(|(addr, _)| addr), Some(a));
/// ```
pub trait Memory {
    /// The address space is exiting or gone (`ksm_test_exit`: no users left). The engine
    /// then frees what it holds for it instead of scanning it.
    ///
    /// ```
    /// # use samepage_engine::Memory;
    /// # let mut mem = samepage_sim::SimMemory::new();
    /// let mm = mem.create_mm();
    /// assert!(!mem.mm_exiting(mm));
    /// mem.exit(mm).unwrap();
    /// assert!(mem.mm_exiting(mm));
    /// ```
    fn mm_exiting(&self, mm: MmId) -> bool;

    /// The first area of `mm` that ends above `addr` (the kernel's `find_vma`): it may start
    /// above `addr`.
    ///
    /// ```
    /// # use samepage_engine::{Memory, PAGE_SIZE_U64 as PS};
    /// # use samepage_sim::{Prot, SimMemory};
    /// # let mut mem = SimMemory::new();
    /// # let mm = mem.create_mm();
    /// let a = mem.mmap(mm, 4 * PS, Prot::RW, false, 0).unwrap();
    /// let shared = mem.mmap(mm, PS, Prot::RW, true, 0).unwrap();
    /// let v = mem.find_vma(mm, 0).unwrap();
    /// assert_eq!((v.start, v.end, v.mergeable, v.anon), (a, a + 4 * PS, false, true));
    /// assert!(!mem.find_vma(mm, v.end).unwrap().anon); // MAP_SHARED
    /// assert_eq!(mem.find_vma(mm, shared + PS), None);
    /// ```
    fn find_vma(&self, mm: MmId, addr: u64) -> Option<VmaInfo>;

    /// The first present anonymous page (ordinary or KSM) at or above `from` and below `end`,
    /// which lie in one area. Holes, zero-page mappings and non-anonymous pages are stepped
    /// over: the scan never sees the zero page.
    ///
    /// ```
    /// # use samepage_engine::{Memory, PAGE_SIZE_U64 as PS};
    /// # use samepage_sim::{Prot, SimMemory};
    /// # let mut mem = SimMemory::new();
    /// # let mm = mem.create_mm();
    /// let a = mem.mmap(mm, 3 * PS, Prot::RW, false, 0).unwrap();
    /// let mut b = [0u8; 1];
    /// mem.read(mm, a, &mut b).unwrap(); // the zero page
    /// mem.write(mm, a + 2 * PS, &[1]).unwrap();
    /// let (addr, page) = mem.next_page(mm, a, a + 3 * PS).unwrap();
    /// assert_eq!((addr, page.ksm, page.nid), (a + 2 * PS, false, 0));
    /// assert_eq!(mem.next_page(mm, a, a + 2 * PS), None);
    /// ```
    fn next_page(&mut self, mm: MmId, from: u64, end: u64) -> Option<(u64, PageRef)>;

    /// The anonymous page mapped at `addr` if it is still in a mergeable area
    /// (`get_mergeable_page`).
    ///
    /// ```
    /// # use samepage_engine::{Memory, PAGE_SIZE_U64 as PS};
    /// # use samepage_sim::{Prot, SimMemory};
    /// # let mut mem = SimMemory::new();
    /// # let mm = mem.create_mm();
    /// let a = mem.mmap(mm, PS, Prot::RW, false, 0).unwrap();
    /// mem.write(mm, a, &[1]).unwrap();
    /// assert_eq!(mem.get_page(mm, a), None); // not mergeable yet
    /// mem.set_mergeable(mm, a, a + PS, true);
    /// assert_eq!(mem.get_page(mm, a), mem.next_page(mm, a, a + PS).map(|(_, p)| p));
    /// ```
    fn get_page(&mut self, mm: MmId, addr: u64) -> Option<PageRef>;

    /// XXH64 with seed 0 over the frame's contents ([`page_hash`](crate::page_hash)); its
    /// low 32 bits are the kernel's checksum. `None`: the page could not be read (the
    /// process unmapped it meanwhile); the scan skips it this time, and its next visit
    /// finds it gone.
    ///
    /// ```
    /// # use samepage_engine::{Memory, PAGE_SIZE_U64 as PS};
    /// # use samepage_sim::{Prot, SimMemory};
    /// # let mut mem = SimMemory::new();
    /// # let mm = mem.create_mm();
    /// # let a = mem.mmap(mm, PS, Prot::RW, false, 0).unwrap();
    /// mem.write(mm, a, &[7; 4096]).unwrap();
    /// let (_, page) = mem.next_page(mm, a, a + PS).unwrap();
    /// assert_eq!(mem.page_hash(page.frame), Some(samepage_engine::page_hash(&[7; 4096])));
    /// ```
    fn page_hash(&mut self, frame: FrameId) -> Option<u64>;

    /// Full comparison of two frames' contents (`pages_identical`).
    ///
    /// ```
    /// # use samepage_engine::{Memory, PAGE_SIZE_U64 as PS};
    /// # use samepage_sim::{Prot, SimMemory};
    /// # let mut mem = SimMemory::new();
    /// # let mm = mem.create_mm();
    /// let a = mem.mmap(mm, 3 * PS, Prot::RW, false, 0).unwrap();
    /// for (i, v) in [7u8, 7, 8].iter().enumerate() {
    ///     mem.write(mm, a + i as u64 * PS, &[*v; 4096]).unwrap();
    /// }
    /// let f = |mem: &mut SimMemory, i: u64| mem.next_page(mm, a + i * PS, a + 3 * PS).unwrap().1.frame;
    /// let (p0, p1, p2) = (f(&mut mem, 0), f(&mut mem, 1), f(&mut mem, 2));
    /// assert!(mem.pages_identical(p0, p1));
    /// assert!(!mem.pages_identical(p0, p2));
    /// ```
    fn pages_identical(&mut self, a: FrameId, b: FrameId) -> bool;

    /// The frame is still a KSM page with that identity (`ksm_get_folio` succeeds): false
    /// once its last mapping went away, so the engine drops its stable node.
    ///
    /// ```
    /// # use samepage_engine::{Memory, MergeInto, PAGE_SIZE_U64 as PS};
    /// # use samepage_sim::{Prot, SimMemory};
    /// # let mut mem = SimMemory::new();
    /// # let mm = mem.create_mm();
    /// let a = mem.mmap(mm, PS, Prot::RW, false, 0).unwrap();
    /// mem.write(mm, a, &[7; 4096]).unwrap();
    /// mem.set_mergeable(mm, a, a + PS, true);
    /// let page = mem.get_page(mm, a).unwrap().frame;
    /// assert!(!mem.ksm_page_alive(page));
    /// let k = mem.merge(mm, a, page, MergeInto::Promote).unwrap();
    /// assert!(mem.ksm_page_alive(k));
    /// mem.munmap(mm, a, PS).unwrap();
    /// assert!(!mem.ksm_page_alive(k));
    /// ```
    fn ksm_page_alive(&self, frame: FrameId) -> bool;

    /// `try_to_merge_one_page`: write-protect the page mapped at `addr` (which must still be
    /// `page`), check it against the target while protected, and replace the mapping.
    /// Returns the frame now mapped at `addr` (for [`MergeInto::Promote`], the new KSM page).
    /// A backend may also accept the merge and carry it out later
    /// ([`Memory::take_failed_merges`]).
    ///
    /// ```
    /// # use samepage_engine::{Memory, MergeError, MergeInto, PAGE_SIZE_U64 as PS};
    /// # use samepage_sim::{Prot, SimMemory};
    /// # let mut mem = SimMemory::new();
    /// # let mm = mem.create_mm();
    /// let a = mem.mmap(mm, 3 * PS, Prot::RW, false, 0).unwrap();
    /// mem.write(mm, a, &[7; 4096]).unwrap();
    /// mem.write(mm, a + PS, &[7; 4096]).unwrap();
    /// mem.write(mm, a + 2 * PS, &[0; 4096]).unwrap();
    /// mem.set_mergeable(mm, a, a + 3 * PS, true);
    /// let page = |mem: &mut SimMemory, i: u64| mem.get_page(mm, a + i * PS).unwrap().frame;
    /// // try_to_merge_two_pages: page 0 becomes a KSM page, page 1 is merged into it.
    /// let (p0, p1, p2) = (page(&mut mem, 0), page(&mut mem, 1), page(&mut mem, 2));
    /// let k = mem.merge(mm, a, p0, MergeInto::Promote).unwrap();
    /// assert_eq!(mem.merge(mm, a + PS, p1, MergeInto::KsmPage(k)), Ok(k));
    /// assert!(mem.get_page(mm, a + PS).unwrap().ksm);
    /// // A zero-filled page goes to the zero page, counted as placed by KSM.
    /// mem.merge(mm, a + 2 * PS, p2, MergeInto::ZeroPage).unwrap();
    /// assert_eq!(mem.ksm_zero_pages(Some(mm)), 1);
    /// // A page that is not the one mapped there any more is not merged.
    /// assert_eq!(mem.merge(mm, a + PS, p1, MergeInto::KsmPage(k)), Err(MergeError::Gone));
    /// ```
    fn merge(
        &mut self,
        mm: MmId,
        addr: u64,
        page: FrameId,
        into: MergeInto,
    ) -> Result<FrameId, MergeError>;

    /// `break_ksm` over `[start, end)`: give every mapping of a KSM page or of a KSM-placed
    /// zero page a private copy (FAULT_FLAG_UNSHARE). Ordinary zero pages stay as they are.
    /// On failure ([`UnmergeError::NoMemory`] when no memory is left for a copy) the pages
    /// unshared so far stay unshared.
    ///
    /// ```
    /// # use samepage_engine::{Memory, MergeInto, UnmergeError, PAGE_SIZE_U64 as PS};
    /// # use samepage_sim::{Prot, SimMemory};
    /// # let mut mem = SimMemory::new();
    /// # let mm = mem.create_mm();
    /// let a = mem.mmap(mm, 2 * PS, Prot::RW, false, 0).unwrap();
    /// mem.write(mm, a, &[0; 4096]).unwrap();
    /// mem.set_mergeable(mm, a, a + 2 * PS, true);
    /// let mut b = [0u8; 1];
    /// mem.read(mm, a + PS, &mut b).unwrap(); // an ordinary zero page
    /// let p = mem.get_page(mm, a).unwrap().frame;
    /// mem.merge(mm, a, p, MergeInto::ZeroPage).unwrap();
    /// mem.set_frame_limit(Some(mem.frames_in_use()));
    /// assert!(matches!(mem.break_ksm(mm, a, a + 2 * PS), Err(UnmergeError::NoMemory)));
    /// mem.set_frame_limit(None);
    /// mem.break_ksm(mm, a, a + 2 * PS).unwrap();
    /// assert_eq!(mem.ksm_zero_pages(Some(mm)), 0);
    /// assert!(mem.get_page(mm, a).is_some()); // a private zeroed page again
    /// assert!(mem.get_page(mm, a + PS).is_none()); // still the zero page
    /// ```
    fn break_ksm(&mut self, mm: MmId, start: u64, end: u64) -> Result<(), UnmergeError>;

    /// Set or clear `VM_MERGEABLE` on the compatible areas in `[start, end)`, splitting areas
    /// at the boundaries. Incompatible areas are left alone, as `ksm_madvise` does.
    ///
    /// ```
    /// # use samepage_engine::{Memory, PAGE_SIZE_U64 as PS};
    /// # use samepage_sim::{Prot, SimMemory};
    /// # let mut mem = SimMemory::new();
    /// # let mm = mem.create_mm();
    /// let a = mem.mmap(mm, 4 * PS, Prot::RW, false, 0).unwrap();
    /// mem.set_mergeable(mm, a + PS, a + 2 * PS, true);
    /// let areas: Vec<_> = mem.vmas(mm).iter().map(|v| (v.start, v.mergeable)).collect();
    /// assert_eq!(areas, [(a, false), (a + PS, true), (a + 2 * PS, false)]);
    /// ```
    fn set_mergeable(&mut self, mm: MmId, start: u64, end: u64, on: bool);

    /// `ksm_zero_pages` of one address space, or the global count for `None`: the KSM-placed
    /// zero pages mapped now (see [`KsmZeroPages`](crate::KsmZeroPages)).
    ///
    /// ```
    /// # use samepage_engine::{Memory, MergeInto, PAGE_SIZE_U64 as PS};
    /// # use samepage_sim::{Prot, SimMemory};
    /// # let mut mem = SimMemory::new();
    /// # let mm = mem.create_mm();
    /// let a = mem.mmap(mm, PS, Prot::RW, false, 0).unwrap();
    /// mem.write(mm, a, &[0; 4096]).unwrap();
    /// mem.set_mergeable(mm, a, a + PS, true);
    /// let p = mem.get_page(mm, a).unwrap().frame;
    /// mem.merge(mm, a, p, MergeInto::ZeroPage).unwrap();
    /// assert_eq!((mem.ksm_zero_pages(Some(mm)), mem.ksm_zero_pages(None)), (1, 1));
    /// mem.write(mm, a, &[1]).unwrap(); // copy-on-write: uncounted at once
    /// assert_eq!(mem.ksm_zero_pages(None), 0);
    /// ```
    fn ksm_zero_pages(&self, mm: Option<MmId>) -> i64;

    /// Carry out every merge accepted by [`Memory::merge`] and not done yet, and append to
    /// `out` those that failed. A backend that merges synchronously has nothing to do here
    /// (the default).
    ///
    /// A backend may accept a merge (return `Ok`) and do it later, at the latest in this
    /// call, which the engine makes at the end of every scan batch and before a full scan
    /// completes; after it returns, every accepted merge is done or reported. Until then the
    /// backend answers as if the accepted merges were done: a frame accepted for
    /// [`MergeInto::Promote`] is a KSM page ([`PageRef::ksm`] wherever it is mapped, a fork's
    /// mappings included) and alive ([`Memory::ksm_page_alive`]), and a merge into it
    /// ([`MergeInto::KsmPage`]) is accepted too and carried out after the promotion.
    /// Merges are carried out in the order they were accepted. For each failure the engine
    /// undoes its bookkeeping for that page (see [`Ksm::do_scan`](crate::Ksm::do_scan)).
    ///
    /// ```
    /// # use samepage_engine::{FailedMerge, Memory, MergeError, MergeInto, PAGE_SIZE_U64 as PS};
    /// # use samepage_sim::{Prot, SimMemory};
    /// # let mut mem = SimMemory::new();
    /// # let mm = mem.create_mm();
    /// let a = mem.mmap(mm, 2 * PS, Prot::RW, false, 0).unwrap();
    /// mem.write(mm, a, &[7; 4096]).unwrap();
    /// mem.write(mm, a + PS, &[7; 4096]).unwrap();
    /// mem.set_mergeable(mm, a, a + 2 * PS, true);
    /// let (p0, p1) = (mem.get_page(mm, a).unwrap().frame, mem.get_page(mm, a + PS).unwrap().frame);
    /// mem.defer_merges(None);
    /// let k = mem.merge(mm, a, p0, MergeInto::Promote).unwrap();
    /// assert!(mem.ksm_page_alive(k)); // as if done
    /// assert_eq!(mem.merge(mm, a + PS, p1, MergeInto::KsmPage(k)), Ok(k));
    /// mem.write(mm, a + PS, &[8]).unwrap(); // the process writes page 1 meanwhile
    /// let mut failed = Vec::new();
    /// mem.take_failed_merges(&mut failed);
    /// let want = FailedMerge { mm, addr: a + PS, error: MergeError::Changed };
    /// assert_eq!(failed, [want]);
    /// assert!(mem.get_page(mm, a).unwrap().ksm); // the promotion went through
    /// ```
    fn take_failed_merges(&mut self, out: &mut Vec<FailedMerge>) {
        let _ = out;
    }
}
