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
/// Addresses are page aligned. `mm` ids come from the backend.
pub trait Memory {
    /// The address space is exiting or gone (`ksm_test_exit`: no users left).
    fn mm_exiting(&self, mm: MmId) -> bool;

    /// The first area of `mm` that ends above `addr` (the kernel's `find_vma`).
    fn find_vma(&self, mm: MmId, addr: u64) -> Option<VmaInfo>;

    /// The first present anonymous page (ordinary or KSM) at or above `from` and below `end`,
    /// which lie in one area. Holes, zero-page mappings and non-anonymous pages are stepped
    /// over: the scan never sees the zero page.
    fn next_page(&mut self, mm: MmId, from: u64, end: u64) -> Option<(u64, PageRef)>;

    /// The anonymous page mapped at `addr` if it is still in a mergeable area
    /// (`get_mergeable_page`).
    fn get_page(&mut self, mm: MmId, addr: u64) -> Option<PageRef>;

    /// XXH64 with seed 0 over the frame's contents.
    fn page_hash(&mut self, frame: FrameId) -> u64;

    /// Full comparison of two frames' contents (`pages_identical`).
    fn pages_identical(&mut self, a: FrameId, b: FrameId) -> bool;

    /// The frame is still a KSM page with that identity (`ksm_get_folio` succeeds).
    fn ksm_page_alive(&self, frame: FrameId) -> bool;

    /// `try_to_merge_one_page`: write-protect the page mapped at `addr` (which must still be
    /// `page`), check it against the target while protected, and replace the mapping.
    /// Returns the frame now mapped at `addr` (for [`MergeInto::Promote`], the new KSM page).
    fn merge(
        &mut self,
        mm: MmId,
        addr: u64,
        page: FrameId,
        into: MergeInto,
    ) -> Result<FrameId, MergeError>;

    /// `break_ksm` over `[start, end)`: give every mapping of a KSM page or of a KSM-placed zero
    /// page a private copy (FAULT_FLAG_UNSHARE). Ordinary zero pages stay as they are.
    fn break_ksm(&mut self, mm: MmId, start: u64, end: u64) -> Result<(), UnmergeError>;

    /// Set or clear `VM_MERGEABLE` on the compatible areas in `[start, end)`, splitting areas at
    /// the boundaries. Incompatible areas are left alone, as `ksm_madvise` does.
    fn set_mergeable(&mut self, mm: MmId, start: u64, end: u64, on: bool);

    /// `ksm_zero_pages` of one address space, or the global count for `None`.
    fn ksm_zero_pages(&self, mm: Option<MmId>) -> i64;

    /// Carry out every merge accepted by [`Memory::merge`] and not done yet, and append to
    /// `out` those that failed. A backend that merges synchronously has nothing to do here
    /// (the default).
    ///
    /// A backend may accept a merge (return `Ok`) and do it later, at the latest in this
    /// call, which the engine makes at the end of every scan batch and before a full scan
    /// completes; after it returns, every accepted merge is done or reported. Until then the
    /// backend answers as if the accepted merges were done: a frame accepted for
    /// [`MergeInto::Promote`] is a live KSM page for [`Memory::ksm_page_alive`], and a merge
    /// into it ([`MergeInto::KsmPage`]) is accepted too and carried out after the promotion.
    /// Merges are carried out in the order they were accepted. For each failure the engine
    /// undoes its bookkeeping for that page (see [`Ksm::do_scan`](crate::Ksm::do_scan)).
    fn take_failed_merges(&mut self, out: &mut Vec<FailedMerge>) {
        let _ = out;
    }
}
