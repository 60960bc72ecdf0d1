//! The agent: the part of samepage that runs inside every process whose memory is merged,
//! whether the engine runs in the same process or in `samepage daemon`.
//!
//! It owns the process's userfaultfd (write-protect in `WP_ASYNC` mode, missing-page
//! faults, and the unmap/discard/move events), the table of regions it manages with a
//! state per page, a read-only view of its security domain's store of canonical pages, a
//! fault handler thread (`handler`) and the executor (`exec`) that carries out the
//! operations the engine's side (ksmd) sends it. What ksmd must know comes back as an
//! ordered list of [`Change`]s.
//!
//! Because the handler runs here and the canonical pages live in a memfd the agent holds, a
//! merged page stays valid whatever happens to the engine: if the daemon is killed, every
//! fault on a merged page is still resolved from the store, nothing waits forever, and no
//! byte is lost.
//!
//! How pages are represented:
//! - a **merged page** is a hole in the application's anonymous mapping that stands for a
//!   canonical page: its memory is freed, it costs no mapping, and the first access to it
//!   (a missing-page fault) copies the canonical page in, so the page is an ordinary
//!   anonymous page of the application again, which later scans can merge again;
//! - a **KSM-placed zero page** is the shared zero page mapped with the userfaultfd
//!   write-protect bit, samepage's "placed by KSM" mark; `WP_ASYNC` lets the kernel
//!   resolve a write to it with an ordinary copy-on-write (no round trip to samepage), and
//!   `PAGEMAP_SCAN` counts the marked zero pages exactly at any moment.

mod exec;
pub(crate) mod fork;
mod handler;
pub(crate) mod state;

use crate::ops::Change;
use crate::sys::pagemap::{Pagemap, PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_WRITTEN};
use crate::sys::uffd::{self, OpenError, Userfaultfd};
use crate::sys::{EventFd, FileView, PAGE};
use samepage_engine::MmId;
pub use state::AgentStats;
use state::{PageState, Region, State};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;
use thiserror::Error;

/// The userfaultfd features the agent needs. `WP_ASYNC` implies write-protecting holes
/// (markers), so the agent never write-protects anything but the zero pages it places.
const FEATURES: u64 = uffd::FEATURE_PAGEFAULT_FLAG_WP
    | uffd::FEATURE_WP_ASYNC
    | uffd::FEATURE_EVENT_REMAP
    | uffd::FEATURE_EVENT_REMOVE
    | uffd::FEATURE_EVENT_UNMAP
    | uffd::FEATURE_THREAD_ID
    | uffd::FEATURE_MOVE;

/// Why the agent cannot start or cannot take a range.
#[derive(Debug, Error)]
pub enum AgentError {
    /// No userfaultfd that handles faults taken by system calls.
    #[error(
        "samepage cannot open a userfaultfd that handles faults from system calls \
         (userfaultfd(2): {syscall}; /dev/userfaultfd: {dev}). Run it as root, give it \
         CAP_SYS_PTRACE, or grant read-write access to /dev/userfaultfd. It will not run in \
         user-mode-only mode: system calls that write into merged memory (read(2) into a \
         buffer, for example) would fail with EFAULT"
    )]
    NoUserfaultfd {
        /// Why the system call refused.
        syscall: io::Error,
        /// Why `/dev/userfaultfd` could not be opened.
        dev: io::Error,
    },
    /// The kernel lacks a userfaultfd feature.
    #[error(
        "this kernel's userfaultfd lacks a feature samepage needs (asynchronous \
         write-protect, UFFDIO_MOVE, or the remove/unmap/remap events): Linux 6.8 or later \
         is required (features asked for: {wanted:#x})"
    )]
    MissingFeature {
        /// The `UFFD_FEATURE_*` bits asked for.
        wanted: u64,
        /// What `UFFDIO_API` answered.
        #[source]
        source: io::Error,
    },
    /// The range overlaps one the agent manages already.
    #[error("{start:#x}-{end:#x} overlaps memory samepage manages already")]
    Overlap {
        /// First address.
        start: u64,
        /// One past the last.
        end: u64,
    },
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

impl AgentError {
    fn io(what: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Io { what, source }
    }
}

/// The canonical pages of the agent's security domain, as the agent sees them.
struct StoreView {
    fd: OwnedFd,
    view: FileView,
}

/// The handler's rounds of events, and who waits for the next one.
#[derive(Debug, Default)]
struct Handled {
    /// Rounds handled so far.
    handled: u64,
    /// Threads waiting for the next round.
    waiters: u32,
}

/// The agent of this process. Shared by its handler thread, its executor's callers, and
/// whoever holds regions of it.
pub(crate) struct Agent {
    pub(crate) uffd: Userfaultfd,
    state: Mutex<State>,
    pub(crate) pagemap: Pagemap,
    store: RwLock<Option<StoreView>>,
    exec: Mutex<exec::Exec>,
    /// Batches of events the handler has handled, and a condition to wait for the next.
    events: (Mutex<Handled>, Condvar),
    handler_tid: AtomicU32,
    stopping: AtomicBool,
    /// Wakes the handler thread (to stop).
    wake: EventFd,
    /// Signalled when the outbox gains changes, for a sender thread to `poll`.
    outbox_signal: EventFd,
    handler: Mutex<Option<JoinHandle<()>>>,
    /// Where the scratch area is, to tell its events apart.
    scratch: (u64, u64),
    /// Called when the outbox gains changes (an engine in this process applies them).
    notify: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    /// The process that made the agent: in a fork child the copy is inert.
    owner: u32,
    /// Finds the anonymous memory to register for `Op::Refresh` (set by `samepage run`'s
    /// preload library for a process that asked to merge everything).
    refresh_hook: Mutex<Option<RefreshHook>>,
}

impl From<OpenError> for AgentError {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::NotPermitted { syscall, dev } => Self::NoUserfaultfd { syscall, dev },
            OpenError::Features { wanted, source } => Self::MissingFeature { wanted, source },
            OpenError::Other(source) => Self::Io {
                what: "opening a userfaultfd",
                source,
            },
        }
    }
}

/// Lists the ranges that an `Op::Refresh` should register, given those registered already.
pub(crate) type RefreshHook = Box<dyn Fn(&[(u64, u64)]) -> Vec<(u64, u64)> + Send + Sync>;

/// Whether this process may open the userfaultfd samepage needs (and the kernel has its
/// features): the error says what to do if not.
pub fn check_userfaultfd() -> Result<(), AgentError> {
    Userfaultfd::open(FEATURES, None)?;
    Ok(())
}

impl Agent {
    /// Open the userfaultfd (through `dev`, an open `/dev/userfaultfd`, if given), map the
    /// scratch area and start the handler thread.
    pub(crate) fn start(dev: Option<BorrowedFd<'_>>) -> Result<Arc<Self>, AgentError> {
        let uffd = Userfaultfd::open(FEATURES, dev)?;
        let exec = exec::Exec::new(&uffd).map_err(AgentError::io("mapping the scratch area"))?;
        let scratch = exec.range();
        let agent = Arc::new(Self {
            uffd,
            state: Mutex::new(State::default()),
            pagemap: Pagemap::open(0).map_err(AgentError::io("opening /proc/self/pagemap"))?,
            store: RwLock::new(None),
            exec: Mutex::new(exec),
            events: (Mutex::new(Handled::default()), Condvar::new()),
            handler_tid: AtomicU32::new(0),
            stopping: AtomicBool::new(false),
            wake: EventFd::new().map_err(AgentError::io("creating an eventfd"))?,
            outbox_signal: EventFd::new().map_err(AgentError::io("creating an eventfd"))?,
            handler: Mutex::new(None),
            scratch,
            notify: Mutex::new(None),
            owner: std::process::id(),
            refresh_hook: Mutex::new(None),
        });
        fork::register(&agent);
        let a = agent.clone();
        let h = std::thread::Builder::new()
            .name("samepage-fault".into())
            .spawn(move || handler::run(&a))
            .map_err(AgentError::io("starting the fault handler thread"))?;
        *agent.handler.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
        Ok(agent)
    }

    /// Whether this is the agent of the calling process (not a fork child's copy of its
    /// parent's, whose threads did not survive the fork).
    pub(crate) fn is_own(&self) -> bool {
        self.owner == std::process::id()
    }

    /// Every merged page with the address of its canonical page in the store view (for a
    /// fork child to copy in).
    fn merged_pages(&self, out: &mut Vec<(u64, *const u8)>) {
        if !self.is_own() {
            return;
        }
        let ks: Vec<(u64, u32)> = {
            let st = self.lock();
            st.regions
                .iter()
                .flat_map(|r| {
                    r.pages
                        .iter()
                        .enumerate()
                        .filter_map(move |(i, s)| match s {
                            PageState::Merged(k) => Some((r.start + i as u64 * PAGE, k)),
                            _ => None,
                        })
                })
                .collect()
        };
        if let Some(&max) = ks.iter().map(|(_, k)| k).max() {
            let _ = self.cover(max);
        }
        let g = self.store.read().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = g.as_ref() {
            out.extend(
                ks.into_iter()
                    .filter_map(|(a, k)| s.view.at(k as u64 * PAGE).map(|p| (a, p))),
            );
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state as the panicking code left it;
        // it stays consistent enough to resolve faults, which is what matters then.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Give the agent its domain's store of canonical pages (a read-only descriptor).
    pub(crate) fn attach_store(&self, fd: OwnedFd) -> io::Result<()> {
        let size = std::fs::File::from(fd.try_clone()?).metadata()?.len();
        let view = FileView::new(fd.as_fd(), view_size(size))?;
        *self.store.write().unwrap_or_else(|e| e.into_inner()) = Some(StoreView { fd, view });
        Ok(())
    }

    /// Make sure the store view covers canonical page `k` (the store grew since).
    fn cover(&self, k: u32) -> io::Result<()> {
        let need = (k as u64 + 1) * PAGE;
        if self
            .store
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|s| s.view.len() >= need)
        {
            return Ok(());
        }
        let mut g = self.store.write().unwrap_or_else(|e| e.into_inner());
        let s = g
            .as_mut()
            .ok_or_else(|| io::Error::other("no store of canonical pages attached"))?;
        let size = std::fs::File::from(s.fd.try_clone()?).metadata()?.len();
        if size < need {
            return Err(io::Error::other(
                "canonical page beyond the end of the store",
            ));
        }
        s.view.grow(view_size(size))
    }

    /// Fill the hole at `dst` with a private copy of canonical page `k`, waking its waiters.
    pub(crate) fn copy_canonical(&self, k: u32, dst: u64) -> io::Result<()> {
        self.cover(k)?;
        let g = self.store.read().unwrap_or_else(|e| e.into_inner());
        let src = g
            .as_ref()
            .and_then(|s| s.view.at(k as u64 * PAGE))
            .ok_or_else(|| io::Error::other("no store of canonical pages attached"))?;
        // SAFETY: src is canonical page k inside the store view (covered above), readable
        // and never written while pages stand for it; dst is a hole of a region this agent
        // manages, which stands for exactly that content.
        unsafe { self.uffd.copy(src, dst, true) }
    }

    /// Copy canonical page `k` into `buf`.
    pub(crate) fn read_canonical(&self, k: u32, buf: &mut [u8; PAGE as usize]) -> bool {
        if self.cover(k).is_err() {
            return false;
        }
        let g = self.store.read().unwrap_or_else(|e| e.into_inner());
        g.as_ref()
            .is_some_and(|s| s.view.read_page(k as u64 * PAGE, buf))
    }

    /// Is canonical page `k` equal to `bytes`?
    pub(crate) fn store_page_equals(&self, k: u32, bytes: &[u8]) -> bool {
        if self.cover(k).is_err() {
            return false;
        }
        let g = self.store.read().unwrap_or_else(|e| e.into_inner());
        g.as_ref()
            .is_some_and(|s| s.view.page_equals(k as u64 * PAGE, bytes))
    }

    /// Manage `[start, start + len)` of this process (private anonymous memory the caller
    /// checked): register it with the userfaultfd and track its pages for address space
    /// `mm`.
    pub(crate) fn register(
        &self,
        mm: MmId,
        start: u64,
        len: u64,
        mergeable: bool,
    ) -> Result<(), AgentError> {
        let end = start + len;
        if !self.is_own() {
            return Err(AgentError::Io {
                what: "registering memory",
                source: io::Error::other("this samepage object belongs to the parent process"),
            });
        }
        {
            let st = self.lock();
            if st.overlaps(start, end) || (start < self.scratch.1 && end > self.scratch.0) {
                return Err(AgentError::Overlap { start, end });
            }
        }
        let mut st = self.lock();
        let i = st.regions.partition_point(|r| r.start < start);
        st.regions.insert(
            i,
            Region {
                mm,
                start,
                pages: state::PageStates::new((len / PAGE) as usize),
                mergeable: false,
                registered: false,
            },
        );
        drop(st);
        if mergeable {
            self.set_mergeable(start, end, true)?;
        }
        Ok(())
    }

    /// Set or clear `VM_MERGEABLE` on the regions inside `[start, end)`. A region becomes
    /// registered with the userfaultfd the first time it is mergeable: until then it is
    /// plain memory (its first touches cost no round trip to the handler).
    pub(crate) fn set_mergeable(&self, start: u64, end: u64, on: bool) -> Result<(), AgentError> {
        let mut st = self.lock();
        st.split_at(start);
        st.split_at(end);
        for r in st.regions.iter_mut() {
            if r.start >= start && r.end() <= end {
                if on && !r.registered {
                    // Registering raises no event, so the lock may be held.
                    self.uffd
                        .register(
                            r.start,
                            r.end() - r.start,
                            uffd::REGISTER_MODE_MISSING | uffd::REGISTER_MODE_WP,
                        )
                        .map_err(|source| match source.raw_os_error() {
                            Some(libc::EBUSY) => AgentError::Overlap {
                                start: r.start,
                                end: r.end(),
                            },
                            _ => AgentError::Io {
                                what: "registering the range with the userfaultfd",
                                source,
                            },
                        })?;
                    r.registered = true;
                }
                r.mergeable = on;
            }
        }
        Ok(())
    }

    /// Stop managing `[start, end)`: give its merged and zero pages private copies, take
    /// the marks off, unregister it. The memory is then plain anonymous memory again.
    pub(crate) fn unregister(&self, start: u64, end: u64) -> io::Result<()> {
        if !self.is_own() {
            return Ok(());
        }
        let _inside = fork::enter();
        let _exec = self.exec.lock().unwrap_or_else(|e| e.into_inner());
        self.unshare(start, end)?;
        let registered: Vec<(u64, u64)> = self
            .lock()
            .regions
            .iter()
            .filter(|r| r.registered && r.start < end && r.end() > start)
            .map(|r| (r.start.max(start), r.end().min(end)))
            .collect();
        let mut result = Ok(());
        for (s, e) in registered {
            let _ = self.uffd.writeprotect(s, e - s, false, true);
            if let Err(err) = self.uffd.unregister(s, e - s) {
                result = Err(err);
            }
        }
        self.lock().remove_range(start, end);
        result
    }

    /// The regions of `mm` (or all), as `(mm, start, end, mergeable)`.
    pub(crate) fn regions(&self, mm: Option<MmId>) -> Vec<(MmId, u64, u64, bool)> {
        self.lock()
            .regions
            .iter()
            .filter(|r| mm.is_none_or(|m| m == r.mm))
            .map(|r| (r.mm, r.start, r.end(), r.mergeable))
            .collect()
    }

    /// KSM-placed zero pages of `mm` (or all) right now: zero-page entries that carry the
    /// mark, as `PAGEMAP_SCAN` reads them from the page tables.
    pub(crate) fn zero_pages(&self, mm: Option<MmId>) -> i64 {
        self.regions(mm)
            .iter()
            .map(|&(_, s, e, _)| {
                self.pagemap
                    .count(s, e, PAGE_IS_PRESENT | PAGE_IS_PFNZERO, PAGE_IS_WRITTEN)
                    .unwrap_or(0) as i64
            })
            .sum()
    }

    /// Take the changes recorded since the last call.
    pub(crate) fn take_outbox(&self, out: &mut Vec<Change>) {
        self.outbox_signal.clear();
        out.append(&mut self.lock().outbox);
    }

    /// Tell a sender thread (or an engine in this process) that the outbox has changes.
    /// Never called under the state lock.
    fn outbox_ready(&self) {
        self.outbox_signal.signal();
        if let Some(f) = self
            .notify
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            f();
        }
    }

    /// What `Op::Refresh` uses to find new memory to register.
    pub(crate) fn set_refresh_hook(&self, f: RefreshHook) {
        *self.refresh_hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    /// `Op::Refresh`: register, mergeable, the memory the hook finds, and report it.
    fn refresh(&self) {
        let hook = self.refresh_hook.lock().unwrap_or_else(|e| e.into_inner());
        let Some(h) = hook.as_ref() else { return };
        let (mm, have): (Option<MmId>, Vec<(u64, u64)>) = {
            let st = self.lock();
            (
                st.regions.first().map(|r| r.mm),
                st.regions.iter().map(|r| (r.start, r.end())).collect(),
            )
        };
        let mm = mm.unwrap_or(MmId(std::process::id()));
        for (s, e) in h(&have) {
            if self.register(mm, s, e - s, true).is_ok() {
                self.lock()
                    .outbox
                    .push(Change::Registered { start: s, end: e });
            }
        }
    }

    /// Run `fill`, a `UFFDIO_ZEROPAGE` or `UFFDIO_MOVE` into the page at `a` that answers
    /// (bytes done, result). Both take a userfaultfd write-protect marker with no page
    /// under it (a protection that outlived its page) for an existing page (`EEXIST`),
    /// while a missing-page fault sees a hole there: drop such a marker and fill again.
    /// The third value says whether a marker was dropped.
    pub(crate) fn fill_past_marker(
        &self,
        a: u64,
        mut fill: impl FnMut() -> (u64, io::Result<()>),
    ) -> (u64, io::Result<()>, bool) {
        let (n, r) = fill();
        let marker = n < PAGE
            && matches!(&r, Err(e) if e.raw_os_error() == Some(libc::EEXIST))
            && self.pagemap.count(a, a + PAGE, PAGE_IS_PRESENT, 0).ok() == Some(0);
        if !marker {
            return (n, r, false);
        }
        let _ = self.uffd.writeprotect(a, PAGE, false, false);
        let (n, r) = fill();
        (n, r, true)
    }

    /// Have `f` called whenever the outbox gains changes.
    pub(crate) fn set_notify(&self, f: Box<dyn Fn() + Send + Sync>) {
        *self.notify.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    /// For a sender thread to poll on.
    pub(crate) fn outbox_fd(&self) -> BorrowedFd<'_> {
        self.outbox_signal.fd()
    }

    /// Statistics so far.
    pub(crate) fn stats(&self) -> AgentStats {
        self.lock().stats
    }

    /// Bytes of page states the agent keeps.
    pub(crate) fn state_bytes(&self) -> usize {
        self.lock().state_bytes()
    }

    /// The state of the page at `addr`, if a region holds it.
    pub(crate) fn page_state(&self, addr: u64) -> Option<PageState> {
        self.lock().page(addr).map(|p| p.2)
    }

    /// The handler thread's id (for its CPU time).
    pub(crate) fn handler_tid(&self) -> u32 {
        self.handler_tid.load(Ordering::Relaxed)
    }

    fn events_seen(&self) -> u64 {
        self.events
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .handled
    }

    /// Wait until the handler has handled a batch of events after `seen` (bounded, in case
    /// the EAGAIN that sent the caller here came from an event already handled).
    fn wait_events_after(&self, seen: u64) {
        let mut g = self.events.0.lock().unwrap_or_else(|e| e.into_inner());
        g.waiters += 1;
        let (mut g, _) = self
            .events
            .1
            .wait_timeout_while(g, Duration::from_millis(20), |n| n.handled == seen)
            .unwrap_or_else(|e| e.into_inner());
        g.waiters -= 1;
    }

    /// The handler finished a round of events: wake whoever waits for one (a wake-up is a
    /// system call, which the handler saves when nobody waits).
    fn events_handled(&self) {
        let mut g = self.events.0.lock().unwrap_or_else(|e| e.into_inner());
        g.handled += 1;
        let wake = g.waiters > 0;
        drop(g);
        if wake {
            self.events.1.notify_all();
        }
    }

    /// Stop the handler thread. Only for an agent whose regions hold no merged page any
    /// more (every one unregistered): a merged page with no handler would wait forever.
    pub(crate) fn stop(&self) {
        if !self.is_own() {
            return;
        }
        self.stopping.store(true, Ordering::Release);
        self.wake.signal();
        if let Some(h) = self
            .handler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = h.join();
        }
    }
}

/// The store view's size for a store of `size` bytes: room to grow, in powers of two, so
/// that remapping is rare.
fn view_size(size: u64) -> u64 {
    (size.max(64 << 20)).next_power_of_two()
}
