//! [`LiveKsm`]: samepage merging real memory of this process, and the [`Region`] handles
//! through which a program reads and writes the memory it gave samepage.

use crate::agent::state::PageState;
use crate::agent::{Agent, AgentError, AgentStats};
use crate::ksmd::{Ksmd, KsmdStats, LocalLink};
use crate::remote::Connection;
use crate::sys::pagemap::{PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_WRITTEN};
use crate::sys::{self, Mapping, PAGE};
use crate::wire::{Request, Response};
use samepage_engine::{Convergence, KnobError, KsmCounters, KsmStat, MmId, UnmergeError, Until};
use serde::Serialize;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Why a live operation failed.
#[derive(Debug, Error)]
pub enum LiveError {
    /// The agent (userfaultfd, fault handler) could not start or take the range.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The range is not page aligned, or empty.
    #[error("{start:#x} (+{len:#x} bytes) is not a page-aligned, non-empty range")]
    Unaligned {
        /// First address given.
        start: u64,
        /// Length given.
        len: u64,
    },
    /// An access outside a region.
    #[error("{len} bytes at offset {offset:#x} do not fit in a region of {region_len:#x} bytes")]
    OutOfRange {
        /// Offset given.
        offset: u64,
        /// Bytes asked for.
        len: u64,
        /// The region's length.
        region_len: u64,
    },
    /// The range cannot be merged (not private anonymous memory, locked, ...).
    #[error("{start:#x}-{end:#x} cannot be merged: {reason}")]
    Ineligible {
        /// First address.
        start: u64,
        /// One past the last.
        end: u64,
        /// Why, as a sentence fragment.
        reason: String,
    },
    /// Unsharing merged pages failed (no memory for the copies, or the agent is gone).
    #[error("unmerging failed")]
    Unmerge(#[from] UnmergeError),
    /// A knob write was refused, with the kernel's validation.
    #[error(transparent)]
    Knob(#[from] KnobError),
    /// The daemon refused, or could not be reached.
    #[error(transparent)]
    Remote(#[from] crate::remote::RemoteError),
    /// The call needs the engine in this process (`LiveKsm::new`), not a daemon.
    #[error("{0} needs the engine in this process (LiveKsm::new), not samepage daemon")]
    InProcessOnly(&'static str),
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What samepage was doing.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl LiveError {
    pub(crate) fn io(what: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Io { what, source }
    }
}

/// Keeps the agent alive: it stops its handler only when the last region and the engine
/// that use it are gone (a merged page with no handler would wait forever).
pub(crate) struct AgentOwner(pub(crate) Arc<Agent>);

impl Drop for AgentOwner {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// A range of memory samepage manages: the handle a program reads and writes it through.
///
/// Dropping a region gives samepage's hold on it up: a region samepage mapped is unmapped;
/// an adopted one gets private copies of its merged and zero pages and is plain anonymous
/// memory again.
pub struct Region {
    agent: Arc<AgentOwner>,
    mm: MmId,
    start: u64,
    len: u64,
    /// The memory, if samepage mapped it.
    owned: Option<Mapping>,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("mm", &self.mm)
            .field("start", &format_args!("{:#x}", self.start))
            .field("len", &self.len)
            .field("owned", &self.owned.is_some())
            .finish()
    }
}

impl Region {
    /// First address.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Regions are never empty; for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address space it belongs to.
    pub fn mm(&self) -> MmId {
        self.mm
    }

    /// `[start, end)` of `len` bytes from byte `offset`, page aligned and inside.
    fn range(&self, offset: u64, len: u64) -> Result<(u64, u64), LiveError> {
        if !offset.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) || len == 0 {
            return Err(LiveError::Unaligned {
                start: self.start.wrapping_add(offset),
                len,
            });
        }
        let a = self.check(offset, len as usize)?;
        Ok((a, a + len))
    }

    fn check(&self, offset: u64, n: usize) -> Result<u64, LiveError> {
        match offset.checked_add(n as u64) {
            Some(e) if e <= self.len => Ok(self.start + offset),
            _ => Err(LiveError::OutOfRange {
                offset,
                len: n as u64,
                region_len: self.len,
            }),
        }
    }

    /// Store `data` at byte `offset`, as the application would (a write to a merged page
    /// gives it a private copy first).
    ///
    /// ```no_run
    /// # use samepage_linux::{LiveKsm, PAGE_SIZE};
    /// # let ksm = LiveKsm::new()?;
    /// let r = ksm.create_region(ksm.new_mm(), 4 * PAGE_SIZE as u64)?;
    /// r.write(PAGE_SIZE as u64, b"hello")?; // bytes 4096..4101
    /// assert!(r.write(4 * PAGE_SIZE as u64, b"x").is_err()); // past the end
    /// # Ok::<(), samepage_linux::LiveError>(())
    /// ```
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), LiveError> {
        let a = self.check(offset, data.len())?;
        sys::write_self(a, data).map_err(LiveError::io("writing region memory"))
    }

    /// Load `buf.len()` bytes from byte `offset`, as the application would (reading a
    /// merged page gives it a private copy: it is an ordinary page again until a later
    /// scan merges it).
    ///
    /// ```no_run
    /// # use samepage_linux::{LiveKsm, PAGE_SIZE};
    /// # let ksm = LiveKsm::new()?;
    /// let r = ksm.create_region(ksm.new_mm(), 4 * PAGE_SIZE as u64)?;
    /// r.write(100, b"hello")?;
    /// let mut buf = [0u8; 7];
    /// r.read(99, &mut buf)?;
    /// assert_eq!(&buf, b"\0hello\0"); // untouched memory reads as zeros
    /// # Ok::<(), samepage_linux::LiveError>(())
    /// ```
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), LiveError> {
        let a = self.check(offset, buf.len())?;
        match sys::read_process(0, a, buf) {
            Ok(n) if n == buf.len() => Ok(()),
            Ok(_) => Err(LiveError::io("reading region memory")(
                io::Error::from_raw_os_error(libc::EFAULT),
            )),
            Err(e) => Err(LiveError::io("reading region memory")(e)),
        }
    }

    /// The page at byte `offset` (page aligned) as it reads, without touching it: a merged
    /// page is read from its canonical page, so looking does not unmerge it.
    pub fn peek_page(&self, offset: u64, buf: &mut [u8; PAGE as usize]) -> Result<(), LiveError> {
        if !offset.is_multiple_of(PAGE) {
            return Err(LiveError::Unaligned {
                start: self.start + offset,
                len: PAGE,
            });
        }
        let a = self.check(offset, PAGE as usize)?;
        if let Some(PageState::Merged(k)) = self.agent.0.page_state(a) {
            if self.agent.0.read_canonical(k, buf) {
                return Ok(());
            }
        }
        self.read(offset, buf)
    }

    /// Store one word at byte `offset` (rounded down to 8) with a user-mode store and
    /// return how long it took: a first write to a merged page includes its fault, one to
    /// a KSM-placed zero page its copy-on-write.
    pub fn timed_store(&self, offset: u64, v: u64) -> Result<Duration, LiveError> {
        let a = self.check(offset & !7, 8)?;
        // SAFETY: the word lies inside this region, which stays mapped while the handle
        // lives (samepage never unmaps it; the application would have to, and then the
        // handle's owner broke the contract of adopt_region); no Rust reference points
        // into region memory.
        Ok(unsafe { timed_store(a, v) })
    }

    /// Load one word at byte `offset` (rounded down to 8) with a user-mode load and return
    /// it with how long the load took: a first read of a merged page or of a hole includes
    /// its fault.
    pub fn timed_load(&self, offset: u64) -> Result<(u64, Duration), LiveError> {
        let a = self.check(offset & !7, 8)?;
        // SAFETY: as in `timed_store`; a load changes nothing.
        Ok(unsafe { timed_load(a) })
    }
}

/// Time one user-mode load.
///
/// # Safety
/// `addr` must be 8-byte aligned inside a mapped, readable page for the whole call.
unsafe fn timed_load(addr: u64) -> (u64, Duration) {
    let t = Instant::now();
    // SAFETY: the caller guarantees the address is mapped, readable and aligned.
    let v = unsafe { std::sync::atomic::AtomicU64::from_ptr(addr as *mut u64) }
        .load(std::sync::atomic::Ordering::Relaxed);
    (v, t.elapsed())
}

/// Time one user-mode store.
///
/// # Safety
/// `addr` must be 8-byte aligned inside a mapped, writable page for the whole call.
unsafe fn timed_store(addr: u64, v: u64) -> Duration {
    let t = Instant::now();
    // SAFETY: the caller guarantees the address is mapped, writable and aligned.
    unsafe { std::sync::atomic::AtomicU64::from_ptr(addr as *mut u64) }
        .store(v, std::sync::atomic::Ordering::Relaxed);
    t.elapsed()
}

impl Drop for Region {
    fn drop(&mut self) {
        // Unshare and unregister first: an adopted range must be plain memory again, and an
        // owned one must have no page that only samepage's handler can resolve when it goes.
        let _ = self.agent.0.unregister(self.start, self.start + self.len);
        // `owned` unmaps when it drops after this.
    }
}

/// What one page of a region is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum PageKind {
    /// An ordinary page of the application (or a hole that reads zeros).
    Ordinary,
    /// Merged: its contents are canonical page `canonical` of the store, and it has no
    /// memory of its own.
    Merged {
        /// The canonical page's offset in the store, in pages.
        canonical: u32,
    },
    /// A zero page samepage placed (counted in `ksm_zero_pages`).
    KsmZero,
    /// A transaction is merging it right now.
    Merging,
    /// Not in a region samepage manages.
    NotManaged,
}

/// What samepage knows of one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PageInfo {
    /// What it is.
    pub kind: PageKind,
    /// A page is mapped there (merged pages are holes until touched).
    pub present: bool,
}

/// Statistics of the live backend: the agent's and ksmd's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct LiveStats {
    /// What happened in the agent (faults, pins, races).
    pub agent: AgentStats,
    /// What ksmd did (batches, operations, canonical pages released).
    pub ksmd: KsmdStats,
}

/// Bytes samepage keeps for its bookkeeping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Metadata {
    /// The engine's: rmap items, both trees' indexes, stable nodes, per-mm records.
    pub engine_bytes: u64,
    /// rmap items the engine holds.
    pub rmap_items: u64,
    /// The page states of the agent and of ksmd's mirror (4 bytes a page each).
    pub page_state_bytes: u64,
}

/// KSM for real memory of this process: duplicates end up as holes standing for one
/// canonical page in a memfd (their memory is freed), zero-filled pages on the kernel's
/// shared zero page, and `ksm_zero_pages` counts the latter exactly.
///
/// ```no_run
/// use samepage_linux::LiveKsm;
/// use std::time::Duration;
/// let ksm = LiveKsm::new().expect("userfaultfd");
/// let mm = ksm.new_mm();
/// let r = ksm.create_region(mm, 64 * 4096).unwrap();
/// for i in 0..64 {
///     r.write(i * 4096, &[0xcf; 4096]).unwrap();
/// }
/// ksm.madvise_mergeable(&r).unwrap();
/// ksm.set_knob("run", "1").unwrap();
/// assert!(ksm.wait_full_scans(2, Duration::from_secs(10)));
/// assert_eq!(ksm.counters().pages_sharing, 63);
/// ```
pub struct LiveKsm {
    engine: Engine,
    agent: Arc<AgentOwner>,
    next_mm: AtomicU32,
}

/// Where the engine runs.
enum Engine {
    /// In this process: ksmd and its scanning thread, with this process as `target`.
    Local { ksmd: Ksmd, target: usize },
    /// In `samepage daemon`: this process is its address space `pid`.
    Remote { conn: Arc<Connection>, pid: u32 },
}

/// How to reach a daemon.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// The daemon's socket.
    pub socket: PathBuf,
    /// The security domain to merge in (None: the uid's own).
    pub domain: Option<String>,
    /// The process asked for `PR_SET_MEMORY_MERGE` before (a fork child's inheritance).
    pub merge_any: bool,
}

impl ConnectOptions {
    /// The daemon's default socket: `$XDG_RUNTIME_DIR/samepage.sock`, or
    /// `/run/samepage.sock` as root (or without `XDG_RUNTIME_DIR`).
    pub fn default_socket() -> PathBuf {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(d) if !root => PathBuf::from(d).join("samepage.sock"),
            _ => PathBuf::from("/run/samepage.sock"),
        }
    }
}

impl LiveKsm {
    /// An engine in this process, with `run=0`: the agent (userfaultfd and fault handler)
    /// and ksmd (the scanning thread).
    ///
    /// It fails with [`LiveError::Agent`] when this process cannot open a userfaultfd that
    /// handles faults taken by system calls, or the kernel lacks its features (what
    /// [`check_userfaultfd`](crate::check_userfaultfd) checks).
    ///
    /// ```no_run
    /// use samepage_linux::LiveKsm;
    /// let ksm = LiveKsm::new()?;
    /// assert_eq!(ksm.knob("run").as_deref(), Some("0")); // nothing is scanned yet
    /// # Ok::<(), samepage_linux::LiveError>(())
    /// ```
    pub fn new() -> Result<Self, LiveError> {
        let agent = Agent::start(None)?;
        let ksmd = Ksmd::new().map_err(LiveError::io("starting ksmd"))?;
        let (target, store) = ksmd
            .add_target(0, 0, Box::new(LocalLink(agent.clone())))
            .map_err(LiveError::io("setting up the store of canonical pages"))?;
        agent
            .attach_store(store)
            .map_err(LiveError::io("mapping the store of canonical pages"))?;
        let k = ksmd.changes_notifier();
        agent.set_notify(Box::new(k));
        Ok(Self {
            engine: Engine::Local { ksmd, target },
            agent: Arc::new(AgentOwner(agent)),
            next_mm: AtomicU32::new(1),
        })
    }

    /// Connect this process to `samepage daemon`: its regions are merged by the daemon's
    /// engine, with those of every other client of the same security domain. The calls are
    /// those of the engine in this process, except that the process is one address space
    /// ([`LiveKsm::new_mm`] returns its pid) and the knobs are the daemon's.
    ///
    /// ```no_run
    /// use samepage_linux::{ConnectOptions, LiveKsm, PAGE_SIZE};
    /// let ksm = LiveKsm::connect(&ConnectOptions {
    ///     socket: ConnectOptions::default_socket(),
    ///     domain: None, // the uid's own security domain
    ///     merge_any: false,
    /// })?;
    /// let r = ksm.create_region(ksm.new_mm(), 64 * PAGE_SIZE as u64)?;
    /// ksm.madvise_mergeable(&r)?; // the daemon's scan now visits it
    /// # Ok::<(), samepage_linux::LiveError>(())
    /// ```
    pub fn connect(opts: &ConnectOptions) -> Result<Self, LiveError> {
        let conn = Connection::connect(&opts.socket)?;
        let agent = Agent::start(None)?;
        let (r, store) = conn.hello(Request::Hello {
            version: crate::wire::VERSION,
            domain: opts.domain.clone(),
            agent: true,
            merge_any: opts.merge_any,
        })?;
        let Response::Welcome { pid, .. } = r else {
            return Err(crate::remote::RemoteError::Protocol(format!("{r:?}")).into());
        };
        let store = store.ok_or_else(|| {
            crate::remote::RemoteError::Protocol("no store of canonical pages came".into())
        })?;
        agent
            .attach_store(store)
            .map_err(LiveError::io("mapping the store of canonical pages"))?;
        conn.start_link(Some(agent.clone()))
            .map_err(LiveError::io("starting the link thread"))?;
        Ok(Self {
            engine: Engine::Remote { conn, pid },
            agent: Arc::new(AgentOwner(agent)),
            next_mm: AtomicU32::new(1),
        })
    }

    fn request(&self, r: Request) -> Result<Response, LiveError> {
        match &self.engine {
            Engine::Remote { conn, .. } => Ok(conn.request(r)?),
            Engine::Local { .. } => unreachable!("a request to a daemon from a local engine"),
        }
    }

    /// The daemon's state.
    fn remote_stat(&self) -> Option<crate::wire::StatReply> {
        match self.request(Request::Stat) {
            Ok(Response::Stat(s)) => Some(s),
            _ => None,
        }
    }

    /// A new address space: a group of regions with its own `ksm_stat`.
    pub fn new_mm(&self) -> MmId {
        match &self.engine {
            Engine::Local { ksmd, target } => {
                let mm = MmId(self.next_mm.fetch_add(1, Ordering::Relaxed));
                // Cannot fail for an agent of this process.
                let _ = ksmd.bind_local_mm(mm, *target, self.agent.0.clone());
                mm
            }
            Engine::Remote { pid, .. } => MmId(*pid),
        }
    }

    /// Tell the engine of a region the agent registered.
    fn add_region(&self, mm: MmId, start: u64, end: u64) -> Result<(), LiveError> {
        match &self.engine {
            Engine::Local { ksmd, target } => {
                ksmd.add_region(*target, mm, start, end, false);
                Ok(())
            }
            Engine::Remote { .. } => {
                self.request(Request::Register {
                    start,
                    end,
                    mergeable: false,
                })?;
                Ok(())
            }
        }
    }

    /// `MADV_MERGEABLE` or `MADV_UNMERGEABLE` as the engine sees it.
    fn engine_madvise(&self, mm: MmId, start: u64, end: u64, on: bool) -> Result<(), LiveError> {
        match &self.engine {
            Engine::Local { ksmd, .. } => Ok(ksmd.madvise(mm, start, end, on)?),
            Engine::Remote { .. } => {
                self.request(Request::Madvise { start, end, on })?;
                Ok(())
            }
        }
    }

    /// Map `len` bytes of private anonymous memory for `mm`, managed by samepage. It is
    /// merged once [`LiveKsm::madvise_mergeable`] is called on it (after filling it,
    /// typically). `len` must be a non-zero multiple of [`PAGE_SIZE`](crate::PAGE_SIZE).
    ///
    /// ```no_run
    /// use samepage_linux::{LiveKsm, PAGE_SIZE};
    /// let ksm = LiveKsm::new()?;
    /// let mm = ksm.new_mm();
    /// let r = ksm.create_region(mm, 16 * PAGE_SIZE as u64)?;
    /// assert_eq!((r.mm(), r.len()), (mm, 16 * PAGE_SIZE as u64));
    /// for i in 0..16 {
    ///     r.write(i * PAGE_SIZE as u64, &[0x5a; PAGE_SIZE])?;
    /// }
    /// ksm.madvise_mergeable(&r)?;
    /// # Ok::<(), samepage_linux::LiveError>(())
    /// ```
    pub fn create_region(&self, mm: MmId, len: u64) -> Result<Region, LiveError> {
        check_range(0, len)?;
        let m = Mapping::anon(len).map_err(LiveError::io("mapping a region"))?;
        // Huge pages would hide the 4 KiB pages until split; a region made to be merged
        // does without them.
        let _ = m.advise(libc::MADV_NOHUGEPAGE);
        let start = m.addr();
        self.agent.0.register(mm, start, len, false)?;
        let r = Region {
            agent: self.agent.clone(),
            mm,
            start,
            len,
            owned: Some(m),
        };
        self.add_region(mm, start, start + len)?;
        Ok(r)
    }

    /// Manage `[start, start + len)`, private anonymous memory of this process that
    /// samepage did not map (a VMM's guest RAM). It is merged once
    /// [`LiveKsm::madvise_mergeable`] is called on it. Shared, file-backed, hugetlb,
    /// locked, already userfaultfd-registered or kernel-KSM ranges are refused with the
    /// reason.
    ///
    /// # Safety
    /// The range must be memory the caller owns and keeps mapped while the region lives (an
    /// unmap by the program is followed, but the region handle then refers to memory that
    /// is gone), and no Rust reference may point into it while the handle is used to write
    /// it.
    pub unsafe fn adopt_region(&self, mm: MmId, start: u64, len: u64) -> Result<Region, LiveError> {
        check_range(start, len)?;
        crate::eligibility::check(start, start + len)?;
        self.agent.0.register(mm, start, len, false)?;
        let r = Region {
            agent: self.agent.clone(),
            mm,
            start,
            len,
            owned: None,
        };
        self.add_region(mm, start, start + len)?;
        Ok(r)
    }

    /// `MADV_MERGEABLE` on the region: the scan visits it.
    pub fn madvise_mergeable(&self, r: &Region) -> Result<(), LiveError> {
        self.madvise_mergeable_range(r, 0, r.len)
    }

    /// `MADV_MERGEABLE` on `len` bytes of the region from byte `offset` (page aligned).
    pub fn madvise_mergeable_range(
        &self,
        r: &Region,
        offset: u64,
        len: u64,
    ) -> Result<(), LiveError> {
        let (s, e) = r.range(offset, len)?;
        self.agent.0.set_mergeable(s, e, true)?;
        self.engine_madvise(r.mm, s, e, true)
    }

    /// `MADV_UNMERGEABLE` on the region: every merged page and KSM-placed zero page in it
    /// gets a private copy, and the scan leaves it alone.
    pub fn madvise_unmergeable(&self, r: &Region) -> Result<(), LiveError> {
        self.madvise_unmergeable_range(r, 0, r.len)
    }

    /// `MADV_UNMERGEABLE` on `len` bytes of the region from byte `offset` (page aligned).
    pub fn madvise_unmergeable_range(
        &self,
        r: &Region,
        offset: u64,
        len: u64,
    ) -> Result<(), LiveError> {
        let (s, e) = r.range(offset, len)?;
        // The scan must not merge the range again while it is being unshared.
        self.agent.0.set_mergeable(s, e, false)?;
        self.engine_madvise(r.mm, s, e, false)
    }

    /// `prctl(PR_SET_MEMORY_MERGE)` for `mm`: all its regions (and those it gets later) are
    /// mergeable; turning it off unmerges them all.
    pub fn set_memory_merge(&self, mm: MmId, on: bool) -> Result<(), LiveError> {
        if on {
            for (_, s, e, _) in self.agent.0.regions(Some(mm)) {
                self.agent.0.set_mergeable(s, e, true)?;
            }
            self.engine_memory_merge(mm, true)?;
        } else {
            self.engine_memory_merge(mm, false)?;
            for (_, s, e, _) in self.agent.0.regions(Some(mm)) {
                self.agent.0.set_mergeable(s, e, false)?;
            }
        }
        Ok(())
    }

    fn engine_memory_merge(&self, mm: MmId, on: bool) -> Result<(), LiveError> {
        match &self.engine {
            Engine::Local { ksmd, .. } => Ok(ksmd.set_memory_merge(mm, on)?),
            Engine::Remote { .. } => {
                self.request(Request::SetMemoryMerge { on })?;
                Ok(())
            }
        }
    }

    /// Manage `[start, end)` for `mm` without a region handle (`samepage run`'s preload
    /// library, for the program's own memory): the parts the agent does not manage yet are
    /// registered. The caller checked that the range is private anonymous memory.
    pub(crate) fn manage_range(&self, mm: MmId, start: u64, end: u64) -> Result<(), LiveError> {
        let mut have: Vec<(u64, u64)> = self
            .agent
            .0
            .regions(None)
            .into_iter()
            .map(|r| (r.1, r.2))
            .filter(|&(s, e)| s < end && e > start)
            .collect();
        have.sort_unstable();
        let mut a = start;
        for (s, e) in have.into_iter().chain([(end, end)]) {
            if s > a {
                let b = s.min(end);
                self.agent.0.register(mm, a, b - a, false)?;
                self.add_region(mm, a, b)?;
            }
            a = a.max(e);
            if a >= end {
                break;
            }
        }
        Ok(())
    }

    /// `MADV_MERGEABLE` / `MADV_UNMERGEABLE` on `[start, end)` of the managed memory.
    pub(crate) fn advise_range(
        &self,
        mm: MmId,
        start: u64,
        end: u64,
        on: bool,
    ) -> Result<(), LiveError> {
        self.agent.0.set_mergeable(start, end, on)?;
        self.engine_madvise(mm, start, end, on)
    }

    /// Tell the daemon of memory advised that cannot be merged.
    pub(crate) fn report_ignored(&self, start: u64, end: u64, reason: &str) {
        if let Engine::Remote { .. } = &self.engine {
            let _ = self.request(Request::Ignored {
                start,
                end,
                reason: reason.into(),
            });
        }
    }

    /// `prctl(PR_GET_MEMORY_MERGE)` for `mm`.
    pub fn memory_merge(&self, mm: MmId) -> bool {
        match &self.engine {
            Engine::Local { ksmd, .. } => ksmd.memory_merge(mm),
            Engine::Remote { .. } => {
                matches!(
                    self.request(Request::GetMemoryMerge),
                    Ok(Response::MemoryMerge(true))
                )
            }
        }
    }

    /// `echo value > /sys/kernel/mm/ksm/name` for this engine (the daemon's, for a client),
    /// with the kernel's validation (`run=2` unmerges everything).
    pub fn set_knob(&self, name: &str, value: &str) -> Result<(), LiveError> {
        match &self.engine {
            Engine::Local { ksmd, .. } => Ok(ksmd.write_knob(name, value)?),
            Engine::Remote { .. } => {
                self.request(Request::WriteKnob {
                    name: name.into(),
                    value: value.into(),
                })?;
                Ok(())
            }
        }
    }

    /// `cat /sys/kernel/mm/ksm/name`.
    pub fn knob(&self, name: &str) -> Option<String> {
        match &self.engine {
            Engine::Local { ksmd, .. } => ksmd.knob(name),
            Engine::Remote { .. } => self.remote_stat()?.ksm.get(name).cloned(),
        }
    }

    /// The counters of `/sys/kernel/mm/ksm`. Never waits for the scanner: `ksm_zero_pages`
    /// is read from the page tables now, the others are as of the last scan chunk.
    ///
    /// ```no_run
    /// # use samepage_linux::{LiveKsm, PAGE_SIZE};
    /// # use std::time::Duration;
    /// # let ksm = LiveKsm::new()?;
    /// let r = ksm.create_region(ksm.new_mm(), 8 * PAGE_SIZE as u64)?;
    /// for i in 0..8 {
    ///     r.write(i * PAGE_SIZE as u64, &[1; PAGE_SIZE])?;
    /// }
    /// ksm.madvise_mergeable(&r)?;
    /// ksm.set_knob("run", "1")?;
    /// assert!(ksm.wait_full_scans(2, Duration::from_secs(10)));
    /// let c = ksm.counters();
    /// // One canonical page stands for all eight: seven pages saved.
    /// assert_eq!((c.pages_shared, c.pages_sharing), (1, 7));
    /// # Ok::<(), samepage_linux::LiveError>(())
    /// ```
    pub fn counters(&self) -> KsmCounters {
        match &self.engine {
            Engine::Local { ksmd, .. } => ksmd.counters(),
            Engine::Remote { .. } => self
                .remote_stat()
                .map(|s| crate::wire::counters_of(&s.ksm))
                .unwrap_or_default(),
        }
    }

    /// `/proc/<pid>/ksm_stat` of one address space (same rules as [`LiveKsm::counters`]).
    pub fn ksm_stat(&self, mm: MmId) -> KsmStat {
        match &self.engine {
            Engine::Local { ksmd, .. } => ksmd.ksm_stat(mm),
            Engine::Remote { .. } => self
                .remote_stat()
                .and_then(|s| s.ksm_stat.into_iter().find(|c| c.pid == mm.0))
                .map(|c| c.to_ksm_stat())
                .unwrap_or(KsmStat {
                    pid: mm.0,
                    ..KsmStat::default()
                }),
        }
    }

    /// Wait until `full_scans` has grown by `n`; false if `timeout` passed first.
    pub fn wait_full_scans(&self, n: u64, timeout: Duration) -> bool {
        match &self.engine {
            Engine::Local { ksmd, .. } => ksmd.wait_full_scans(n, timeout),
            Engine::Remote { .. } => self
                .request(Request::Wait {
                    n: n.max(1),
                    timeout_ms: timeout.as_millis() as u64,
                })
                .is_ok(),
        }
    }

    /// Wait until merging has converged as `until` says (it does not start or stop the
    /// scanner: set `run=1` first). Returns the full scans waited, or `None` on timeout.
    pub fn wait_until(&self, until: Until, timeout: Duration) -> Option<u64> {
        let deadline = Instant::now() + timeout;
        let mut conv = Convergence::new(until, &self.counters());
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !self.wait_full_scans(1, left) {
                return None;
            }
            if conv.observe(&self.counters()).done {
                return Some(conv.passes());
            }
        }
    }

    /// Wait until the scanner has published the counters of another scan chunk (at most
    /// `timeout`); false on timeout.
    pub fn wait_chunk(&self, timeout: Duration) -> bool {
        match &self.engine {
            Engine::Local { ksmd, .. } => {
                let c = ksmd.snapshot().chunks;
                ksmd.wait_chunk_after(c, timeout)
            }
            Engine::Remote { .. } => self
                .request(Request::Wait {
                    n: 0,
                    timeout_ms: timeout.as_millis() as u64,
                })
                .is_ok(),
        }
    }

    /// What samepage knows of the page at `addr` (any address in it), read from the
    /// agent's page states and the page tables without touching the page.
    ///
    /// ```no_run
    /// use samepage_linux::{LiveKsm, PageKind, PAGE_SIZE};
    /// use std::time::Duration;
    /// let ksm = LiveKsm::new()?;
    /// let r = ksm.create_region(ksm.new_mm(), 2 * PAGE_SIZE as u64)?;
    /// r.write(0, &[9; PAGE_SIZE])?;
    /// r.write(PAGE_SIZE as u64, &[9; PAGE_SIZE])?;
    /// ksm.madvise_mergeable(&r)?;
    /// ksm.set_knob("run", "1")?;
    /// assert!(ksm.wait_full_scans(2, Duration::from_secs(10)));
    /// let p = ksm.page(r.start());
    /// assert!(matches!(p.kind, PageKind::Merged { .. }));
    /// assert!(!p.present); // a hole until it is touched
    /// # Ok::<(), samepage_linux::LiveError>(())
    /// ```
    pub fn page(&self, addr: u64) -> PageInfo {
        let a = addr & !(PAGE - 1);
        let agent = &self.agent.0;
        let present = agent
            .pagemap
            .count(a, a + PAGE, PAGE_IS_PRESENT, 0)
            .unwrap_or(0)
            > 0;
        let kind = match agent.page_state(a) {
            None => PageKind::NotManaged,
            Some(PageState::Merged(k)) => PageKind::Merged { canonical: k },
            Some(PageState::InFlight) => PageKind::Merging,
            Some(PageState::Gone) => PageKind::NotManaged,
            Some(PageState::Anon | PageState::Zero | PageState::Discarding) => {
                let marked = agent
                    .pagemap
                    .count(
                        a,
                        a + PAGE,
                        PAGE_IS_PRESENT | PAGE_IS_PFNZERO,
                        PAGE_IS_WRITTEN,
                    )
                    .unwrap_or(0)
                    > 0;
                if marked {
                    PageKind::KsmZero
                } else {
                    PageKind::Ordinary
                }
            }
        };
        PageInfo { kind, present }
    }

    /// Statistics of the agent and of ksmd.
    pub fn stats(&self) -> LiveStats {
        LiveStats {
            agent: self.agent.0.stats(),
            ksmd: match &self.engine {
                Engine::Local { ksmd, .. } => ksmd.stats(),
                Engine::Remote { .. } => KsmdStats::default(),
            },
        }
    }

    /// Bytes of samepage's bookkeeping (for a daemon's client, its agent's only).
    pub fn metadata(&self) -> Metadata {
        let mut m = match &self.engine {
            Engine::Local { ksmd, .. } => ksmd.metadata(),
            Engine::Remote { .. } => Metadata::default(),
        };
        m.page_state_bytes += self.agent.0.state_bytes() as u64;
        m
    }

    /// The kernel memory samepage's own mappings cost this process (store views, the
    /// executor's scratch area, samepage's thread stacks, splits of the application's
    /// mappings by registration), which `general_profit` leaves out.
    ///
    /// ```no_run
    /// let ksm = samepage_linux::LiveKsm::new().expect("userfaultfd");
    /// let f = ksm.footprint().expect("/proc/self/smaps");
    /// println!("{} mappings, about {} bytes of kernel memory", f.mappings + f.splits, f.kernel_bytes());
    /// ```
    pub fn footprint(&self) -> Result<crate::footprint::Footprint, LiveError> {
        crate::footprint::of_self().map_err(LiveError::io("reading /proc/self/smaps"))
    }

    /// CPU time of samepage's threads so far (scanning, reading ahead, fault handling), in
    /// seconds.
    pub fn cpu_seconds(&self) -> f64 {
        let local = match &self.engine {
            Engine::Local { ksmd, .. } => ksmd.cpu_seconds(),
            Engine::Remote { .. } => 0.0,
        };
        local + sys::thread_cpu_ns(self.agent.0.handler_tid()) as f64 / 1e9
    }

    /// When the merge counters last changed after a scan chunk (the engine in this
    /// process only).
    pub fn last_change(&self) -> Option<Instant> {
        match &self.engine {
            Engine::Local { ksmd, .. } => ksmd.snapshot().last_change,
            Engine::Remote { .. } => None,
        }
    }

    /// Scan `n` pages on the calling thread, whatever `run` says (for tests that want a
    /// deterministic pace; the engine in this process only).
    pub fn scan(&self, n: u64) -> Result<samepage_engine::ScanBatch, LiveError> {
        match &self.engine {
            Engine::Local { ksmd, .. } => Ok(ksmd.scan(n)),
            Engine::Remote { .. } => {
                Err(LiveError::InProcessOnly("scanning on the caller's thread"))
            }
        }
    }

    /// Whether merging goes on: the engine is in this process, or the daemon is still
    /// connected.
    pub fn connected(&self) -> bool {
        match &self.engine {
            Engine::Local { .. } => true,
            Engine::Remote { conn, .. } => conn.alive(),
        }
    }

    pub(crate) fn ksmd(&self) -> Option<&Ksmd> {
        match &self.engine {
            Engine::Local { ksmd, .. } => Some(ksmd),
            Engine::Remote { .. } => None,
        }
    }

    pub(crate) fn agent(&self) -> &Arc<Agent> {
        &self.agent.0
    }
}

impl Drop for LiveKsm {
    fn drop(&mut self) {
        if let Engine::Remote { conn, .. } = &self.engine {
            conn.close();
        }
    }
}

fn check_range(start: u64, len: u64) -> Result<(), LiveError> {
    if !start.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) || len == 0 {
        return Err(LiveError::Unaligned { start, len });
    }
    Ok(())
}
