//! # samepage-engine: Kernel Samepage Merging, in user space
//!
//! This crate is the KSM algorithm of Linux `mm/ksm.c` with no operating-system calls in it.
//! It reaches memory only through the [`Memory`] trait, implemented by a deterministic
//! simulated memory manager (`samepage-sim`) and by real regions of the running process
//! (`samepage-linux`).
//!
//! ## The algorithm (as ksmd runs it)
//!
//! Address spaces that asked for merging (`MADV_MERGEABLE`, `PR_SET_MEMORY_MERGE`) sit on a
//! scan list. Each wake-up scans `pages_to_scan` pages, continuing where the cursor stopped;
//! a *full scan* is one pass over every mergeable area of every address space. Each present
//! anonymous page visited gets an *rmap item* that remembers its checksum (the low 32 bits of
//! XXH64, seed 0) from the previous visit. Then, in the order of Linux 6.11+:
//!
//! 1. A page that is already a KSM page is only re-attached to its stable node if needed.
//! 2. An ordinary page whose checksum changed since the last visit is *volatile*: the new
//!    checksum is stored and nothing else happens. So every page needs two visits.
//! 3. With `use_zero_pages`, a page whose checksum is the zero page's is compared with zero
//!    while write-protected and replaced by the shared zero page, marked as placed by KSM.
//! 4. The *stable tree* (KSM pages, write-protected, content never changes) is searched; on a
//!    match the page is merged into that KSM page.
//! 5. Otherwise the *unstable tree* (pages seen unchanged in this pass) is searched; on a match
//!    the two pages become a new KSM page in the stable tree; if not, the page is inserted.
//!    The unstable tree is emptied at the start of every full scan, because its pages may
//!    change under it.
//!
//! A KSM page is shared by at most `max_page_sharing` mappings; more identical pages make new
//! KSM pages ("dups") collected under a "chain" for that content. Smart scan skips pages that
//! keep failing to merge; the scan-time advisor tunes `pages_to_scan`.
//!
//! samepage indexes the stable tree by the full 64-bit XXH64 of the contents and the
//! unstable tree by the kernel's 32-bit checksum, and verifies every match with a full
//! comparison, where the kernel walks memcmp-ordered rbtrees: what a user can observe
//! (counters, when pages merge, errors) is the kernel's.
//!
//! ## The counters
//!
//! See [`KsmCounters`] (`/sys/kernel/mm/ksm`) and [`KsmStat`] (`/proc/<pid>/ksm_stat`), each
//! counter documented where it is defined. Memory saved is `pages_sharing + ksm_zero_pages`
//! pages. `general_profit` and `ksm_process_profit` follow the kernel's formula but charge an
//! rmap item what it costs here, [`RMAP_ITEM_BYTES`] (10 bytes), not the kernel's 64.
//! KSM-placed zero pages are counted in one place, [`zero_pages`], by the backend,
//! synchronously with every change of a mapping; a backend that counts them another way can
//! put its count into a snapshot with [`KsmCounters::with_ksm_zero_pages`].
//!
//! ## Beyond the kernel
//!
//! - **Merges that finish later.** A backend may accept a merge and carry it out at the end
//!   of the scan batch ([`Memory::take_failed_merges`]); the engine undoes every merge that
//!   then fails, so the counters read between batches are those of the merge failing at
//!   once (see [`Ksm::do_scan`]).
//! - **Security domains.** [`Ksm::set_domain`] puts an address space in a [`DomainId`]: pages
//!   of different domains are never compared or merged (zero pages are merged in every
//!   domain), as pages of different NUMA nodes with `merge_across_nodes=0`.
//! - **Knowing when merging is done.** [`Convergence`] is the one rule for "the counters
//!   have settled" ([`Until::Stable`]) or "n full scans ran" ([`Until::FullScans`]), fed with
//!   the counters however the driver reads them.
//! - **Releasing an exited address space.** [`Ksm::exit`] says whether everything of it was
//!   freed at once ([`MmExit`]); [`Ksm::mm_released`] says when the scan freed it.
//! - `zero_pages_first_visit`, a knob of samepage's own ([`SAMEPAGE_ONLY_TUNABLES`]).
//!
//! ## Driving the engine
//!
//! A backend implements [`Memory`]; the memory manager calls KSM's hooks, a scanner thread
//! calls [`Ksm::ksmd_batch`], and a reader asks for [`Ksm::counters`]. With the simulator
//! (which wraps all of it in `samepage_sim::SimSystem`):
//!
//! ```
//! use samepage_engine::{Convergence, Ksm, Until, PAGE_SIZE_U64 as PS};
//! use samepage_sim::{Prot, SimMemory, VirtualClock};
//! let mut mem = SimMemory::new();
//! let mut ksm = Ksm::new();
//! ksm.write_knob(&mut mem, "use_zero_pages", "1").unwrap();
//! let mm = mem.create_mm();
//! let a = mem.mmap(mm, 16 * PS, Prot::RW, false, 0).unwrap();
//! for i in 0..16 {
//!     // Eight pages of one content, eight zero-filled pages.
//!     let v = if i < 8 { 0x5a } else { 0 };
//!     mem.write(mm, a + i * PS, &[v; 4096]).unwrap();
//! }
//! ksm.madvise_mergeable(&mut mem, mm, a, a + 16 * PS);
//! ksm.write_knob(&mut mem, "run", "1").unwrap();
//! let clock = VirtualClock::default();
//! let mut conv = Convergence::new(Until::Stable { min_passes: 2 }, &ksm.counters(&mem));
//! while !conv.is_done() {
//!     ksm.ksmd_batch(&mut mem, &clock);
//!     conv.observe(&ksm.counters(&mem));
//! }
//! let c = ksm.counters(&mem);
//! assert_eq!((c.pages_shared, c.pages_sharing, c.ksm_zero_pages), (1, 7, 8));
//! assert_eq!(c.saved_pages(), 15);
//! assert_eq!(conv.last_change_pass(), Some(2));
//! ```
//!
//! ## Features
//!
//! - `test-hooks`: `Ksm::check_invariants` and `Ksm::stable_mappings`, which tests of
//!   the engine and of backends use to compare the engine's view with the page tables. Not
//!   part of the stable interface.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod advisor;
mod convergence;
pub mod counters;
mod heap;
mod ksm;
pub mod memory;
pub mod page;
mod rmap;
mod stable;
pub mod tunables;
pub mod zero_pages;

pub use advisor::Clock;
pub use convergence::{Convergence, Observation, Until};
pub use counters::{KsmCounters, KsmStat, MergeState, COUNTER_NAMES};
#[cfg(any(test, feature = "test-hooks"))]
pub use ksm::StableMapping;
pub use ksm::{DomainError, Ksm, MmExit, ScanBatch, RMAP_ITEM_BYTES};
pub use memory::{FailedMerge, Memory, MergeError, MergeInto, PageRef, UnmergeError, VmaInfo};
pub use page::{
    calc_checksum, is_zero_page, page_hash, DomainId, FrameId, MmId, PAGE_SIZE, PAGE_SIZE_U64,
};
pub use tunables::{AdvisorMode, KnobError, Run, Tunables, SAMEPAGE_ONLY_TUNABLES, TUNABLE_NAMES};
pub use zero_pages::KsmZeroPages;
