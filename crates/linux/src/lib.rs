//! # samepage-linux: KSM for real memory, in this process or across processes
//!
//! The live backend of samepage. Two parts cooperate:
//!
//! - the **agent** runs inside every process whose memory is merged. It owns that
//!   process's userfaultfd (asynchronous write-protect, missing-page faults, and the
//!   unmap/discard/move events), a state per page of the regions it manages, a fault
//!   handler thread, and the executor that carries out merges. Every change to a page
//!   happens here, because `UFFDIO_MOVE`, samepage's pin-safe way to take a page away,
//!   refuses callers from another address space.
//! - **ksmd** runs the engine (`samepage-engine`): the scan, the rmap items, the stable and
//!   unstable indexes, and the stores of canonical pages (one memfd per security domain).
//!   It reads the targets' pages (`process_vm_readv`) and page tables (`PAGEMAP_SCAN`)
//!   itself, decides, and sends each agent one batch of operations per scan chunk.
//!
//! [`LiveKsm`] puts both in one process. With `samepage daemon`, ksmd runs in the daemon
//! and each client process has an agent; the same [`LiveKsm`] calls work there through
//! [`LiveKsm::connect`].
//!
//! How pages are represented. A **merged page** is a hole in the application's mapping
//! that stands for a canonical page: its memory is freed, it costs no mapping (so
//! `vm.max_map_count` caps nothing), and its first access copies the canonical page in,
//! making it an ordinary page again that later scans merge again. A **KSM-placed zero
//! page** is the kernel's shared zero page mapped with the userfaultfd write-protect bit,
//! samepage's "placed by KSM" mark; with `WP_ASYNC` a write to it is an ordinary
//! copy-on-write resolved in the kernel, and `ksm_zero_pages` is read from the page tables
//! with `PAGEMAP_SCAN`, exact at the moment it is read. Ordinary zero pages (the
//! application reading untouched memory) carry no mark and are never counted.
//!
//! It needs a userfaultfd that also handles faults taken by system calls (root,
//! `CAP_SYS_PTRACE`, or access to `/dev/userfaultfd`) and Linux 6.8 or later.
//!
//! # Example
//!
//! Two address spaces of this process, the same bytes in each, merged by the engine in this
//! process (with [`LiveKsm::connect`] instead of [`LiveKsm::new`], by a running
//! `samepage daemon`). It needs a userfaultfd that handles faults taken by system calls;
//! without one it says so and does nothing.
//!
//! ```
//! use samepage_linux::{LiveKsm, PAGE_SIZE};
//! use std::time::Duration;
//!
//! # fn main() -> Result<(), samepage_linux::LiveError> {
//! let ksm = match LiveKsm::new() {
//!     Ok(k) => k,
//!     Err(e) => {
//!         eprintln!("example skipped: {e}");
//!         return Ok(());
//!     }
//! };
//! let page = PAGE_SIZE as u64;
//! let mut regions = Vec::new();
//! for _ in 0..2 {
//!     let mm = ksm.new_mm();
//!     let r = ksm.create_region(mm, 32 * page)?;
//!     // Pages 0..8 are zero-filled (written, so they exist); pages 8..32 all hold the
//!     // same bytes.
//!     for i in 0..32 {
//!         let v = if i < 8 { 0 } else { 7 };
//!         r.write(i * page, &[v; PAGE_SIZE])?;
//!     }
//!     ksm.madvise_mergeable(&r)?;
//!     regions.push(r);
//! }
//! for (knob, value) in [("use_zero_pages", "1"), ("sleep_millisecs", "0"), ("run", "1")] {
//!     ksm.set_knob(knob, value)?;
//! }
//! // A page merges once its checksum held still between two visits.
//! assert!(ksm.wait_full_scans(4, Duration::from_secs(30)));
//! let c = ksm.counters();
//! assert_eq!((c.pages_shared, c.pages_sharing, c.ksm_zero_pages), (1, 47, 16));
//!
//! // A write breaks sharing of that one page only; the region reads what was written.
//! regions[0].write(8 * page, b"hello")?;
//! let mut buf = [0u8; 5];
//! regions[0].read(8 * page, &mut buf)?;
//! assert_eq!(&buf, b"hello");
//! regions[1].read(8 * page, &mut buf)?;
//! assert_eq!(buf, [7u8; 5]);
//! ksm.set_knob("run", "2")?; // unmerge everything, as the kernel's run=2
//! # Ok(())
//! # }
//! ```
//!
//! Layout: `sys` holds the system calls and nearly every `unsafe` block; `agent` the agent
//! (its states, fault handler and executor); `ksmd` the engine's side (the `Memory`
//! implementation, the stores, the scanning thread); [`ops`] what they tell each other;
//! [`verify`] checks the page tables against the counters; [`host`] reads and drives the
//! host kernel's KSM, for comparisons.

#![warn(missing_docs)]

pub mod agent;
mod eligibility;
pub mod footprint;
pub mod host;
pub mod ksmd;
mod live;
pub mod ops;
pub mod preload;
mod remote;
pub(crate) mod sys;
pub mod verify;
pub mod wire;

/// Unix sockets with descriptors, peer credentials, pidfds and eventfds: what the daemon
/// needs besides the engine. Every function is safe (none changes memory).
pub mod ipc {
    pub use crate::sys::socket::{
        accept, allow_ptracer, euid, peer_cred, pidfd_exited, pidfd_open, recv_with_fds,
        send_with_fds, seqpacket_connect, seqpacket_listen, shutdown, terminate, PeerCred, MAX_FDS,
    };
    pub use crate::sys::{note_own, poll, process_cpu_ns, this_thread_cpu, EventFd};
}

pub use agent::{check_userfaultfd, AgentError, AgentStats};
pub use ksmd::{Ksmd, KsmdStats, Snapshot};
pub use live::{
    ConnectOptions, LiveError, LiveKsm, LiveStats, Metadata, PageInfo, PageKind, Region,
};
pub use remote::{Control, RemoteError};
pub use samepage_engine::{
    KnobError, KsmCounters, KsmStat, MmId, ScanBatch, UnmergeError, Until, PAGE_SIZE,
};
pub use verify::Verification;

/// Bytes of the live backend's state for every page of a region, besides the engine's
/// rmap item for the pages it tracks: the agent's state and ksmd's mirror of it.
pub const PAGE_STATE_BYTES: usize = 2 * agent::state::PAGE_STATE_BYTES;
