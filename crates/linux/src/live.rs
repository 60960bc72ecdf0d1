//! [`LiveKsm`]: the engine merging real memory of this process, with its scanning thread and
//! its userfaultfd handler thread.

use crate::backend::{self, LiveMemory, Shared};
use crate::state::{LiveStats, PageState, PageStates, Region};
use crate::sys::{self, PAGE};
use samepage_engine::{Clock, KnobError, Ksm, KsmCounters, KsmStat, MmId, ScanBatch, UnmergeError};
use std::io;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thiserror::Error;
use userfaultfd::{FeatureFlags, RegisterMode, UffdBuilder};

/// Why the live engine cannot start or cannot take a range.
#[derive(Debug, Error)]
pub enum LiveError {
    /// No userfaultfd with kernel-mode fault handling.
    #[error(
        "samepage cannot open a userfaultfd that handles faults from system calls ({detail}). \
         Run it as root, give it CAP_SYS_PTRACE, or grant it read-write access to \
         /dev/userfaultfd. It will not run in user-mode-only mode: system calls that write \
         into merged memory (read(2) into a buffer, for example) would fail with EFAULT"
    )]
    NoUserfaultfd { detail: String },
    /// The kernel lacks a userfaultfd feature samepage needs.
    #[error(
        "this kernel's userfaultfd lacks a feature samepage needs (write-protect, \
         WP_UNPOPULATED, UFFDIO_MOVE, or the remove/unmap/remap events): Linux 6.8 or later \
         is required ({detail})"
    )]
    MissingFeature { detail: String },
    /// The range cannot be managed by samepage.
    #[error("{start:#x}-{end:#x} cannot be merged: {reason}")]
    Ineligible {
        start: u64,
        end: u64,
        reason: String,
    },
    /// The range is not page aligned or empty.
    #[error("{start:#x} (+{len:#x}) is not a page-aligned, non-empty range")]
    Unaligned { start: u64, len: u64 },
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> LiveError {
    move |source| LiveError::Io { what, source }
}

/// The features samepage asks its userfaultfd for.
const FEATURES: u64 = sys::UFFD_FEATURE_PAGEFAULT_FLAG_WP
    | sys::UFFD_FEATURE_EVENT_REMAP
    | sys::UFFD_FEATURE_EVENT_REMOVE
    | sys::UFFD_FEATURE_EVENT_UNMAP
    | sys::UFFD_FEATURE_THREAD_ID
    | sys::UFFD_FEATURE_MINOR_SHMEM
    | sys::UFFD_FEATURE_WP_UNPOPULATED
    | sys::UFFD_FEATURE_MOVE;

fn open_uffd() -> Result<userfaultfd::Uffd, LiveError> {
    UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .require_features(FeatureFlags::from_bits_retain(FEATURES))
        .create()
        .map_err(|e| match e {
            userfaultfd::Error::OpenDevUserfaultfd(err) => LiveError::NoUserfaultfd {
                detail: format!("/dev/userfaultfd: {err}"),
            },
            userfaultfd::Error::SystemError(errno) if errno as i32 == libc::EPERM => {
                LiveError::NoUserfaultfd {
                    detail: "userfaultfd(2): EPERM".into(),
                }
            }
            other => LiveError::MissingFeature {
                detail: other.to_string(),
            },
        })
}

/// The scanning thread's clock: wall time since start and the thread's own CPU time.
struct LiveClock {
    start: Instant,
    tid: Arc<AtomicI32>,
}

impl Clock for LiveClock {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
    fn cpu_ns(&self) -> u64 {
        sys::thread_cpu_ns(self.tid.load(Ordering::Relaxed))
    }
}

struct EngineSide {
    ksm: Ksm,
    mem: LiveMemory,
    clock: LiveClock,
    /// The merge counters after the last batch, and when they last changed.
    last_state: samepage_engine::MergeState,
    last_change: Option<Instant>,
}

/// The counters that settle when merging has converged (as in the simulator).
fn merge_state(c: &KsmCounters) -> samepage_engine::MergeState {
    c.merge_state()
}

impl EngineSide {
    fn after_batch(&mut self, b: ScanBatch) {
        self.mem.end_chunk();
        if b.full_scan_done {
            self.mem.flush_scratch();
        }
        let now = merge_state(&self.ksm.counters(&self.mem));
        if now != self.last_state {
            self.last_state = now;
            self.last_change = Some(Instant::now());
        }
    }
}

/// Wakes the scanning thread when `run` or the regions change.
#[derive(Default)]
struct Kick {
    flag: Mutex<bool>,
    cv: Condvar,
}

impl Kick {
    fn kick(&self) {
        *self.flag.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }
    fn wait(&self, timeout: Duration) {
        let g = self.flag.lock().unwrap_or_else(|e| e.into_inner());
        let (mut g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |k| !*k)
            .unwrap_or_else(|e| e.into_inner());
        *g = false;
    }
}

/// KSM over real memory of this process.
///
/// ```no_run
/// use samepage_linux::LiveKsm;
/// let ksm = LiveKsm::new().expect("userfaultfd");
/// let mm = ksm.new_mm();
/// let a = ksm.create_region(mm, 64 * 4096).unwrap();
/// for i in 0..64 {
///     ksm.write(a + i * 4096, &[0xcf; 4096]).unwrap();
/// }
/// ksm.madvise_mergeable(mm, a, 64 * 4096).unwrap();
/// ksm.set_knob("run", "1").unwrap();
/// ksm.wait_full_scans(2, std::time::Duration::from_secs(10));
/// assert_eq!(ksm.counters().pages_sharing, 63);
/// ```
pub struct LiveKsm {
    sh: Arc<Shared>,
    eng: Arc<Mutex<EngineSide>>,
    kick: Arc<Kick>,
    scan_tid: Arc<AtomicI32>,
    handler_tid: Arc<AtomicI32>,
    threads: Vec<JoinHandle<()>>,
    next_mm: Mutex<u32>,
}

impl LiveKsm {
    /// Open the userfaultfd, start the handler and scanning threads (with `run=0`).
    pub fn new() -> Result<Self, LiveError> {
        let uffd = open_uffd()?;
        let sh = Arc::new(Shared::new(uffd).map_err(io_err("setting up the live backend"))?);
        let mem = LiveMemory::new(sh.clone()).map_err(io_err("setting up the scratch area"))?;
        let scan_tid = Arc::new(AtomicI32::new(0));
        let eng = Arc::new(Mutex::new(EngineSide {
            ksm: Ksm::new(),
            mem,
            clock: LiveClock {
                start: Instant::now(),
                tid: scan_tid.clone(),
            },
            last_state: samepage_engine::MergeState::default(),
            last_change: None,
        }));
        let kick = Arc::new(Kick::default());
        let handler_tid = Arc::new(AtomicI32::new(0));
        let mut threads = Vec::new();
        let (h, ht) = (sh.clone(), handler_tid.clone());
        threads.push(
            std::thread::Builder::new()
                .name("samepage-uffd".into())
                .spawn(move || {
                    ht.store(sys::gettid(), Ordering::Relaxed);
                    h.handler_tid.store(sys::gettid(), Ordering::Relaxed);
                    backend::handle_events(h)
                })
                .map_err(io_err("starting the fault handler thread"))?,
        );
        let (e, k, s, t) = (eng.clone(), kick.clone(), sh.clone(), scan_tid.clone());
        threads.push(
            std::thread::Builder::new()
                .name("samepage-ksmd".into())
                .spawn(move || scan_loop(e, k, s, t))
                .map_err(io_err("starting the scanning thread"))?,
        );
        Ok(Self {
            sh,
            eng,
            kick,
            scan_tid,
            handler_tid,
            threads,
            next_mm: Mutex::new(1),
        })
    }

    fn engine(&self) -> MutexGuard<'_, EngineSide> {
        self.eng.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new address space: a group of regions with its own `ksm_stat`.
    pub fn new_mm(&self) -> MmId {
        let mut n = self.next_mm.lock().unwrap_or_else(|e| e.into_inner());
        let mm = MmId(*n);
        *n += 1;
        self.sh.lock().mms.insert(mm);
        mm
    }

    /// Map `len` bytes of private anonymous memory for `mm`. It is merged once
    /// [`LiveKsm::madvise_mergeable`] is called on it (after filling it, typically).
    pub fn create_region(&self, mm: MmId, len: u64) -> Result<u64, LiveError> {
        check_range(0, len)?;
        let a = sys::mmap_anon(len).map_err(io_err("mapping a region"))?;
        let _ = sys::madvise(a, len, libc::MADV_NOHUGEPAGE);
        self.insert_region(mm, a, len, true);
        Ok(a)
    }

    /// Take an existing private anonymous range of this process (the `MADV_MERGEABLE`
    /// analogue for memory samepage did not map). Shared, file-backed, hugetlb, locked,
    /// already userfaultfd-registered or kernel-KSM ranges are refused with the reason.
    pub fn adopt_region(&self, mm: MmId, start: u64, len: u64) -> Result<(), LiveError> {
        check_range(start, len)?;
        crate::eligibility::check(start, start + len)?;
        if self.sh.lock().region_at_any(start, start + len) {
            return Err(LiveError::Ineligible {
                start,
                end: start + len,
                reason: "samepage already manages part of it".into(),
            });
        }
        self.insert_region(mm, start, len, false);
        Ok(())
    }

    fn insert_region(&self, mm: MmId, start: u64, len: u64, owned: bool) {
        let mut st = self.sh.lock();
        st.mms.insert(mm);
        let i = st.regions.partition_point(|r| r.start < start);
        st.regions.insert(
            i,
            Region {
                mm,
                start,
                pages: PageStates::new((len / PAGE) as usize),
                mergeable: false,
                owned,
                registered: false,
            },
        );
    }

    /// Store `data` at `addr` of a region, as the application would (faults included).
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), LiveError> {
        sys::write_self(addr, data).map_err(io_err("writing region memory"))
    }

    /// Store one word at `addr` with a user-mode write, as the application would, and return
    /// how long the store took: the first write to a KSM-placed zero page or a merged page
    /// includes the write-protect fault and the copy-on-write. Only pages of regions samepage
    /// created ([`LiveKsm::create_region`]) and that are still mapped are accepted.
    pub fn timed_store(&self, addr: u64, v: u64) -> Result<Duration, LiveError> {
        let ok = {
            let st = self.sh.lock();
            st.region_at(addr).is_some_and(|ri| {
                let r = &st.regions[ri];
                r.owned && r.pages.get(r.idx(addr)) != PageState::Gone
            })
        };
        if !ok {
            return Err(LiveError::Ineligible {
                start: addr,
                end: addr + 8,
                reason: "not a mapped page of a region samepage created".into(),
            });
        }
        // SAFETY: the word is inside a region samepage mapped and still maps (regions it owns
        // are unmapped only by drop_region); no Rust reference points into region memory.
        Ok(unsafe { sys::timed_store(addr & !7, v) })
    }

    /// Load `buf.len()` bytes from `addr`.
    pub fn read(
        &self,
        addr: u64,
        buf: &mut [u8; samepage_engine::PAGE_SIZE],
    ) -> Result<(), LiveError> {
        sys::read_self(addr, buf).map_err(io_err("reading region memory"))
    }

    /// `MADV_MERGEABLE`: register the range's regions with the userfaultfd and let the scan
    /// visit them.
    pub fn madvise_mergeable(&self, mm: MmId, start: u64, len: u64) -> Result<(), LiveError> {
        check_range(start, len)?;
        let end = start + len;
        let ranges: Vec<(u64, u64)> = {
            let st = self.sh.lock();
            st.regions
                .iter()
                .filter(|r| r.mm == mm && r.start < end && r.end() > start && !r.registered)
                .map(|r| (r.start, r.end()))
                .collect()
        };
        if ranges.is_empty() && !self.sh.lock().region_at_any(start, end) {
            return Err(LiveError::Ineligible {
                start,
                end,
                reason: "it is not a region samepage manages (create or adopt it first)".into(),
            });
        }
        for (s, e) in ranges {
            self.sh
                .uffd
                .register_with_mode(
                    s as *mut libc::c_void,
                    (e - s) as usize,
                    RegisterMode::MISSING | RegisterMode::WRITE_PROTECT,
                )
                .map_err(|err| LiveError::Ineligible {
                    start: s,
                    end: e,
                    reason: format!(
                        "userfaultfd registration failed ({err}); another userfaultfd may own it"
                    ),
                })?;
            let mut st = self.sh.lock();
            for r in st
                .regions
                .iter_mut()
                .filter(|r| r.start >= s && r.end() <= e)
            {
                r.registered = true;
            }
        }
        let mut g = self.engine();
        let EngineSide { ksm, mem, .. } = &mut *g;
        ksm.madvise_mergeable(mem, mm, start, end);
        drop(g);
        self.kick.kick();
        Ok(())
    }

    /// `MADV_UNMERGEABLE`: unshare every merged and KSM-placed zero page in the range.
    pub fn madvise_unmergeable(&self, mm: MmId, start: u64, len: u64) -> Result<(), UnmergeError> {
        let mut g = self.engine();
        let EngineSide { ksm, mem, .. } = &mut *g;
        ksm.madvise_unmergeable(mem, mm, start, start + len)
    }

    /// `PR_SET_MEMORY_MERGE` for one address space: all its regions.
    pub fn set_memory_merge(&self, mm: MmId, on: bool) -> Result<(), LiveError> {
        if on {
            let ranges: Vec<(u64, u64)> = {
                let st = self.sh.lock();
                st.regions
                    .iter()
                    .filter(|r| r.mm == mm)
                    .map(|r| (r.start, r.end()))
                    .collect()
            };
            for (s, e) in ranges {
                self.madvise_mergeable(mm, s, e - s)?;
            }
        }
        let mut g = self.engine();
        let EngineSide { ksm, mem, .. } = &mut *g;
        ksm.prctl_set_memory_merge(mem, mm, on)
            .map_err(|e| LiveError::Io {
                what: "unmerging",
                source: io::Error::other(e.to_string()),
            })
    }

    /// Unmerge and forget a region; unmap it if samepage mapped it.
    pub fn drop_region(&self, start: u64) -> Result<(), LiveError> {
        let (mm, end, owned) = {
            let st = self.sh.lock();
            let ri = st.region_at(start).ok_or(LiveError::Ineligible {
                start,
                end: start + PAGE,
                reason: "no region starts there".into(),
            })?;
            let r = &st.regions[ri];
            (r.mm, r.end(), r.owned)
        };
        self.madvise_unmergeable(mm, start, end - start)
            .map_err(|e| LiveError::Io {
                what: "unmerging",
                source: io::Error::other(e.to_string()),
            })?;
        // Hold the engine so that no transaction is under way in the range.
        let g = self.engine();
        let _ = self.sh.uffd.remove_write_protection(
            start as *mut libc::c_void,
            (end - start) as usize,
            true,
        );
        let _ = self
            .sh
            .uffd
            .unregister(start as *mut libc::c_void, (end - start) as usize);
        {
            let mut st = self.sh.lock();
            st.regions.retain(|r| r.end() <= start || r.start >= end);
        }
        drop(g);
        if owned {
            sys::munmap(start, end - start).map_err(io_err("unmapping a region"))?;
        }
        Ok(())
    }

    /// `echo value > /sys/kernel/mm/ksm/name` for this engine.
    pub fn set_knob(&self, name: &str, value: &str) -> Result<(), KnobError> {
        let mut g = self.engine();
        let EngineSide { ksm, mem, .. } = &mut *g;
        let r = ksm.write_knob(mem, name, value);
        drop(g);
        self.kick.kick();
        r
    }

    /// `cat /sys/kernel/mm/ksm/name`.
    pub fn knob(&self, name: &str) -> Option<String> {
        let g = self.engine();
        g.ksm.show(&g.mem, name)
    }

    /// The counters of `/sys/kernel/mm/ksm`.
    pub fn counters(&self) -> KsmCounters {
        let g = self.engine();
        g.ksm.counters(&g.mem)
    }

    /// `/proc/<pid>/ksm_stat` of one address space.
    pub fn ksm_stat(&self, mm: MmId) -> KsmStat {
        let g = self.engine();
        g.ksm.ksm_stat(&g.mem, mm)
    }

    /// Bytes of samepage's bookkeeping: the engine's (rmap items, trees, stable nodes, scan
    /// list), its rmap items, and the backend's state of every page of the regions.
    pub fn metadata_bytes(&self) -> (u64, u64, u64) {
        let (engine, items) = {
            let g = self.engine();
            (g.ksm.metadata_bytes() as u64, g.ksm.rmap_items())
        };
        let pages: usize = self.sh.lock().regions.iter().map(|r| r.pages.len()).sum();
        (engine, items, (pages * crate::PAGE_STATE_BYTES) as u64)
    }

    /// Copy-on-write, pin and budget statistics.
    pub fn stats(&self) -> LiveStats {
        backend::stats(&self.sh)
    }

    /// CPU time of the engine's threads (scanning, fault handling, reading ahead) so far, in
    /// seconds.
    pub fn cpu_seconds(&self) -> f64 {
        (sys::thread_cpu_ns(self.scan_tid.load(Ordering::Relaxed))
            + sys::thread_cpu_ns(self.handler_tid.load(Ordering::Relaxed))
            + sys::thread_cpu_ns(self.sh.reader_tid.load(Ordering::Relaxed))) as f64
            / 1e9
    }

    /// When the merge counters (`pages_shared`, `pages_sharing`, `ksm_zero_pages`, chains,
    /// dups) last changed after a scan batch.
    pub fn last_change(&self) -> Option<Instant> {
        self.engine().last_change
    }

    /// Run ksmd until merging has converged: at least `min_passes` full scans, then one full
    /// scan that changes none of the merge counters. Returns the full scans run, or `None` on
    /// timeout.
    pub fn run_until_stable(&self, min_passes: u64, timeout: Duration) -> Option<u64> {
        let t0 = Instant::now();
        let _ = self.set_knob("run", "1");
        let mut prev = merge_state(&self.counters());
        let mut passes = 0;
        let result = loop {
            let left = timeout.saturating_sub(t0.elapsed());
            if left.is_zero() || !self.wait_full_scans(1, left) {
                break None;
            }
            passes += 1;
            let now = merge_state(&self.counters());
            if passes > min_passes && now == prev {
                break Some(passes);
            }
            prev = now;
        };
        let _ = self.set_knob("run", "0");
        result
    }

    /// Wait until `full_scans` grows by `n`; false on timeout.
    pub fn wait_full_scans(&self, n: u64, timeout: Duration) -> bool {
        let target = self.engine().ksm.full_scans() + n;
        let t0 = Instant::now();
        while self.engine().ksm.full_scans() < target {
            if t0.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Run one batch on the calling thread (for tests that want a deterministic pace; the
    /// scanning thread does the same with `run=1`).
    pub fn scan_batch(&self, n: u64) -> ScanBatch {
        let mut g = self.engine();
        let EngineSide {
            ksm, mem, clock, ..
        } = &mut *g;
        let b = ksm.do_scan(mem, clock, n);
        g.after_batch(b);
        b
    }

    /// Run `f` with the engine and its backend while no scan batch is under way, e.g. to
    /// verify the page tables against the counters.
    pub fn quiescent<R>(&self, f: impl FnOnce(&Ksm, &LiveMemory) -> R) -> R {
        let g = self.engine();
        f(&g.ksm, &g.mem)
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.sh
    }
}

impl Drop for LiveKsm {
    /// Stop scanning, take the write protection off every region and stop the handler. Merged
    /// pages stay merged and valid (the canonical pages live as long as they are mapped).
    fn drop(&mut self) {
        {
            let mut g = self.engine();
            let EngineSide { ksm, mem, .. } = &mut *g;
            let _ = ksm.write_knob(mem, "run", "0");
            mem.flush_scratch();
        }
        let ranges: Vec<(u64, u64)> = {
            let st = self.sh.lock();
            st.regions.iter().map(|r| (r.start, r.end())).collect()
        };
        for (s, e) in ranges {
            let _ = self.sh.uffd.remove_write_protection(
                s as *mut libc::c_void,
                (e - s) as usize,
                true,
            );
        }
        self.sh.stop.store(true, Ordering::Release);
        self.kick.kick();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Closing the userfaultfd (when Shared drops) unregisters everything and wakes any
        // thread still waiting on a fault.
    }
}

fn check_range(start: u64, len: u64) -> Result<(), LiveError> {
    if !start.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) || len == 0 {
        return Err(LiveError::Unaligned { start, len });
    }
    Ok(())
}

/// Pages scanned per hold of the engine lock: a batch of `pages_to_scan` runs in chunks of
/// this many, so that counters and knobs stay readable during a large batch and the time of
/// the last change is known to within a chunk.
const CHUNK_PAGES: u64 = 1024;

/// The scanning thread: ksmd's loop, paced by `pages_to_scan` and `sleep_millisecs`.
fn scan_loop(eng: Arc<Mutex<EngineSide>>, kick: Arc<Kick>, sh: Arc<Shared>, tid: Arc<AtomicI32>) {
    tid.store(sys::gettid(), Ordering::Relaxed);
    sh.scanner_tid.store(sys::gettid(), Ordering::Relaxed);
    let allowed = sys::allowed_cpus().ok();
    while !sh.stop.load(Ordering::Acquire) {
        // ksm_do_scan(pages_to_scan), a chunk at a time; it ends early at the end of a full
        // scan, as the kernel's does.
        let mut left: Option<u64> = None;
        // Each merge's MAP_FIXED waits until the handler thread has read the UNMAP event it
        // causes: on one CPU that hand-off is a context switch, across CPUs of a VM it is a
        // wake-up of an idle vCPU (256 MiB of duplicates: 1.26 s on one CPU, 7.0 s across
        // two). Keep both threads on this CPU for the batch.
        let mut pinned = false;
        let sleep = loop {
            let mut g = eng.lock().unwrap_or_else(|e| e.into_inner());
            let EngineSide {
                ksm, mem, clock, ..
            } = &mut *g;
            if !ksm.ksmd_should_run() || sh.stop.load(Ordering::Acquire) {
                mem.end_batch();
                break None;
            }
            if !pinned {
                pinned = allowed.as_ref().is_some_and(|a| pin_together(&sh, a));
            }
            let todo = *left.get_or_insert(ksm.tunables().pages_to_scan as u64);
            let chunk = todo.min(CHUNK_PAGES);
            let b = ksm.do_scan(mem, clock, chunk);
            let ms = ksm.tunables().sleep_millisecs;
            g.after_batch(b);
            let rest = todo - b.scanned.min(todo);
            if rest == 0 || b.full_scan_done || b.scanned < chunk {
                g.mem.end_batch();
                break Some(ms);
            }
            left = Some(rest);
        };
        if let (true, Some(a)) = (pinned, allowed.as_ref()) {
            let _ = sys::pin_thread(sh.handler_tid.load(Ordering::Relaxed), None, a);
            let _ = sys::pin_thread(0, None, a);
        }
        match sleep {
            // Let callers waiting for the engine (counters, knobs) in between batches.
            Some(0) => std::thread::sleep(Duration::from_micros(20)),
            Some(ms) => kick.wait(Duration::from_millis(ms as u64)),
            None => kick.wait(Duration::from_millis(100)),
        }
    }
}

/// Put the scanning thread and the fault handler thread on the scanner's current CPU.
fn pin_together(sh: &Shared, allowed: &libc::cpu_set_t) -> bool {
    let (Some(cpu), handler) = (sys::current_cpu(), sh.handler_tid.load(Ordering::Relaxed)) else {
        return false;
    };
    if handler == 0 || sys::pin_thread(0, Some(cpu), allowed).is_err() {
        return false;
    }
    if sys::pin_thread(handler, Some(cpu), allowed).is_err() {
        let _ = sys::pin_thread(0, None, allowed);
        return false;
    }
    true
}

impl crate::state::State {
    /// Does any region overlap `[start, end)`?
    pub(crate) fn region_at_any(&self, start: u64, end: u64) -> bool {
        self.regions
            .iter()
            .any(|r| r.start < end && r.end() > start)
    }
}
