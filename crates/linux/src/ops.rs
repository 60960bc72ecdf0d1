//! What the engine's side (ksmd) asks an agent to do to its memory, and what the agent tells
//! ksmd back. In-process these are passed by function call; with the daemon they cross the
//! client's socket. Every page operation runs inside the process that owns the memory,
//! because `UFFDIO_MOVE`, samepage's pin-safe way to take a page away, refuses callers of
//! another address space.

use serde::{Deserialize, Serialize};

/// One operation of a batch ksmd sends an agent at the end of a scan chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Merge the ordinary page at `addr` into canonical page `k` of the agent's store: take
    /// it away (`UFFDIO_MOVE`, which refuses pinned pages), check that what was taken
    /// equals page `k`, and leave a hole that stands for `k` (the page's memory is freed);
    /// or put it back if it differs.
    Merge {
        /// Address of the page in the agent's process (page aligned).
        addr: u64,
        /// The canonical page: its offset in the domain's store, in pages.
        k: u32,
    },
    /// Replace the ordinary page at `addr` by the shared zero page, marked as placed by KSM,
    /// if what was taken away is all zeros.
    Zero {
        /// Address of the page in the agent's process (page aligned).
        addr: u64,
    },
    /// `break_ksm` over `[start, end)`: give every merged page and every KSM-placed zero
    /// page a private copy. Ordinary zero pages are left alone.
    Unshare {
        /// First address of the range.
        start: u64,
        /// One past its last byte.
        end: u64,
    },
    /// The process asked to merge everything (`PR_SET_MEMORY_MERGE`): register its
    /// anonymous memory mapped since the last time, as the kernel makes new areas mergeable.
    Refresh,
}

/// Why a merge did not happen (reported back to the engine, which undoes its bookkeeping).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailReason {
    /// The page is not an ordinary page of a mergeable region any more.
    Gone,
    /// Its contents differed from the target when it was taken away.
    Changed,
    /// It is pinned for I/O.
    Pinned,
    /// The application discarded, unmapped or moved it during the transaction.
    Raced,
    /// The store's page could not be read, or another system call failed.
    Error,
}

/// Something ksmd must know of an agent's memory, in the order it happened there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// The page at `addr` is now merged into canonical page `k` (an `Op::Merge` succeeded).
    Merged {
        /// Address of the page in the agent's process.
        addr: u64,
        /// The canonical page: its offset in the domain's store, in pages.
        k: u32,
    },
    /// An `Op::Merge` or `Op::Zero` on `addr` did not happen.
    Failed {
        /// Address of the page in the agent's process.
        addr: u64,
        /// Why the operation did not happen.
        why: FailReason,
    },
    /// The page at `addr` no longer stands for canonical page `k` (the application touched
    /// it and got a private copy, discarded it, unmapped it, or it was unshared).
    Unmerged {
        /// Address of the page in the agent's process.
        addr: u64,
        /// The canonical page it stood for: its offset in the domain's store, in pages.
        k: u32,
    },
    /// The page at `addr` no longer stands for canonical page `k` because the application
    /// read it: it got a private copy of the same contents (where the kernel would still map
    /// the KSM page).
    ReadCopied {
        /// Address of the page in the agent's process.
        addr: u64,
        /// The canonical page it stood for: its offset in the domain's store, in pages.
        k: u32,
    },
    /// The application unmapped `[start, end)`.
    Unmapped {
        /// First address of the range.
        start: u64,
        /// One past its last byte.
        end: u64,
    },
    /// The application moved `[from, from + len)` to `to` (`mremap`); pages that stood for
    /// canonical pages keep doing so at their new address.
    Moved {
        /// First address of the range before the move.
        from: u64,
        /// First address of the range after it.
        to: u64,
        /// Length of the range, in bytes.
        len: u64,
    },
    /// An `Op::Unshare` failed with this errno (ENOMEM: no memory for the copies).
    UnshareFailed {
        /// First address of the range the operation was given.
        start: u64,
        /// One past its last byte.
        end: u64,
        /// The errno of the first page that could not be unshared.
        errno: i32,
    },
    /// The agent registered `[start, end)` for its address space, mergeable (after
    /// `Op::Refresh`).
    Registered {
        /// First address of the range.
        start: u64,
        /// One past its last byte.
        end: u64,
    },
    /// The batch with this sequence number is done: every change it caused is above, and
    /// `zeros` zero pages were placed by it.
    BatchDone {
        /// The batch's sequence number, as ksmd sent it (a batch too long for one message
        /// goes in parts that share it, each answered by a `BatchDone` of its own).
        seq: u64,
        /// Zero pages this batch (or part) placed, marked as placed by KSM: a count of
        /// pages, added to [`KsmdStats::zero_placed`](crate::KsmdStats::zero_placed).
        zeros: u32,
    },
}
