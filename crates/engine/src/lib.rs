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
//! samepage indexes both trees by the full 64-bit XXH64 of the contents and verifies every
//! match with a full comparison, where the kernel walks memcmp-ordered rbtrees: what a user
//! can observe (counters, when pages merge, errors) is the kernel's.
//!
//! ## The counters
//!
//! See [`KsmCounters`] (`/sys/kernel/mm/ksm`) and [`KsmStat`] (`/proc/<pid>/ksm_stat`).
//! Memory saved is `pages_sharing + ksm_zero_pages` pages. KSM-placed zero pages are counted
//! in one place, [`zero_pages`], by the backend, synchronously with every change of a mapping.
//!
//! ## Driving the engine
//!
//! ```
//! use samepage_engine::{Ksm, Clock};
//! struct NoTime;
//! impl Clock for NoTime {
//!     fn now_ns(&self) -> u64 { 0 }
//!     fn cpu_ns(&self) -> u64 { 0 }
//! }
//! let ksm = Ksm::new();
//! assert_eq!(ksm.tunables().pages_to_scan, 100);
//! assert!(!ksm.ksmd_should_run()); // run=0 and nothing registered
//! ```

mod advisor;
mod arena;
mod convergence;
pub mod counters;
mod ksm;
pub mod memory;
pub mod page;
mod rmap;
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
