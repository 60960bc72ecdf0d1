//! # samepage-linux: KSM for real memory of this process
//!
//! [`LiveKsm`] runs the samepage engine over regions of the calling process: duplicate pages
//! end up on one physical page (a canonical page in a memfd, mapped copy-on-write), zero-filled
//! pages on the kernel's shared zero page, and `ksm_zero_pages` counts the latter exactly. It
//! needs a userfaultfd that handles faults of system calls too (root, CAP_SYS_PTRACE or access
//! to `/dev/userfaultfd`) and Linux 6.8+ (write-protect, `WP_UNPOPULATED`, `UFFDIO_MOVE`,
//! `PAGEMAP_SCAN`).
//!
//! The mark of a KSM-placed zero page is the userfaultfd write-protect bit on its zero-page
//! entry: a write to it arrives as a fault before the copy-on-write, and the count falls then.
//! Ordinary zero pages (the application reading untouched memory) carry no mark.
//!
//! Layout: [`sys`] holds every system call and nearly every `unsafe` block; `state` what is
//! known of each page; `backend` the `Memory` implementation and the fault handler;
//! [`LiveKsm`] the threads and the API; [`verify`] checks the page tables against the
//! counters; [`host`] reads and drives the host kernel's KSM, for comparisons.

mod backend;
mod eligibility;
pub mod host;
mod live;
mod prefetch;
mod state;
pub mod sys;
pub mod verify;

pub use backend::LiveMemory;
pub use live::{LiveError, LiveKsm};
pub use state::LiveStats;

/// Bytes of the live backend's state for every page of a region (besides the engine's rmap
/// item for the pages it tracks).
pub const PAGE_STATE_BYTES: usize = state::PAGE_STATE_BYTES;
