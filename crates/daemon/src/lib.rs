//! # samepage-daemon: one KSM engine for many processes
//!
//! `samepage daemon` runs ksmd (the engine, the stores of canonical pages, the scanning
//! thread) for every process that connects to its socket: programs that link
//! `samepage-linux` and call `LiveKsm::connect`, and unmodified programs run under
//! `samepage run`, whose preload library turns their `madvise(MADV_MERGEABLE)` and
//! `prctl(PR_SET_MEMORY_MERGE)` into registrations.
//!
//! Each client process is one address space of the engine, shown under its real pid. The
//! daemon reads a client's pages and page tables itself (`process_vm_readv`,
//! `PAGEMAP_SCAN` on `/proc/PID/pagemap`: the pid comes from `SO_PEERCRED`, so a client
//! can only ever point the daemon at its own memory) and sends the client's agent one batch
//! of operations per scan chunk; the agent carries them out in its own process.
//!
//! What happens when something dies:
//! - the daemon (even `SIGKILL`): every client keeps running; its agent resolves every
//!   fault on a merged page from the store it holds a descriptor of, so no byte is lost and
//!   no fault waits; merging stops;
//! - a client: the daemon sees its connection end; once its process has exited, the
//!   canonical pages only it used are released;
//! - a client that lies or sends garbage: its connection is closed; it can keep pages of
//!   its own domain alive, never release what another process uses, and pages of two
//!   domains never share a canonical page (each domain has its own store, and a client
//!   gets a read-only descriptor of its own domain's only).

#![warn(missing_docs)]

mod server;

pub use server::{serve, Config, Daemon, DaemonError, Stop};
