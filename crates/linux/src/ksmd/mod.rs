//! ksmd: the engine's side of the live backend, in this process (`LiveKsm`) or in
//! `samepage daemon`. It owns the KSM engine, the stores of canonical pages (one per
//! security domain) and the scanning thread, and reaches every target's memory through
//! [`KsmdMemory`]: reads directly, changes through the target's agent.
//!
//! Readers never wait for the scanner: after every chunk of a scan batch the scanner
//! publishes a [`Snapshot`] of the engine's counters, and `ksm_zero_pages` is read from the
//! page tables when asked for (it is exact at that moment, whatever the scanner is doing).

mod memory;
mod prefetch;
mod store;
mod target;

pub use memory::{KsmdMemory, KsmdStats, MAX_DOMAINS};
pub use target::AgentLink;
pub(crate) use target::{LocalLink, Target, USER_SPACE_END};

use crate::agent::Agent;
use crate::sys;
use crate::sys::pagemap::{Pagemap, PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_WRITTEN};
use samepage_engine::{Clock, DomainId, KnobError, Ksm, KsmCounters, KsmStat, MmId, UnmergeError};
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Pages scanned per hold of the engine lock: a batch of `pages_to_scan` runs in chunks of
/// this many, each ending with its merges carried out (one batch per target).
pub(crate) const CHUNK_PAGES: u64 = 1024;

/// The scanning thread's clock: wall time since start and the thread's own CPU time.
struct LiveClock {
    start: Instant,
    tid: Arc<AtomicU32>,
}

impl Clock for LiveClock {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
    fn cpu_ns(&self) -> u64 {
        sys::thread_cpu_ns(self.tid.load(Ordering::Relaxed))
    }
}

/// The engine and its memory, behind the engine lock.
pub(crate) struct EngineSide {
    pub ksm: Ksm,
    pub mem: KsmdMemory,
    clock: LiveClock,
}

/// What the scanner published after its last chunk.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The engine's counters; `ksm_zero_pages` as of the publication (readers replace it by
    /// the page tables' count).
    pub counters: KsmCounters,
    /// `/proc/PID/ksm_stat` of every address space, zero pages as above.
    pub ksm_stat: Vec<KsmStat>,
    /// When the merge counters last changed.
    pub last_change: Option<Instant>,
    /// Chunks scanned so far.
    pub chunks: u64,
    /// What the scan has merged: pages_shared, pages_sharing, zero pages placed, chains,
    /// dups (`last_change` is when it last changed).
    pub progress: [u64; 5],
}

/// Where a reader counts an address space's KSM-placed zero pages.
enum ZeroSource {
    /// An agent of this process: its own regions.
    Local(Arc<Agent>),
    /// Another process: its page tables, all of them (marked zero pages exist only in
    /// ranges registered with samepage's userfaultfd).
    Remote(Pagemap),
}

impl ZeroSource {
    fn count(&self, mm: MmId) -> i64 {
        match self {
            ZeroSource::Local(a) => a.zero_pages(Some(mm)),
            ZeroSource::Remote(pm) => pm
                .count(
                    0,
                    target::USER_SPACE_END,
                    PAGE_IS_PRESENT | PAGE_IS_PFNZERO,
                    PAGE_IS_WRITTEN,
                )
                .unwrap_or(0) as i64,
        }
    }
}

/// Wakes the scanning thread.
#[derive(Default)]
struct Kick {
    /// (scanner must look again, changes are pending)
    flags: Mutex<(bool, bool)>,
    cv: Condvar,
}

impl Kick {
    /// Knobs or targets changed: end a sleep.
    fn wake(&self) {
        self.flags.lock().unwrap_or_else(|e| e.into_inner()).0 = true;
        self.cv.notify_all();
    }
    /// An agent reported changes: apply them when idle (they do not end a sleep).
    fn changes(&self) {
        self.flags.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.cv.notify_all();
    }
    /// Sleep up to `t` (None: until woken); changes end the wait only when `idle`.
    fn wait(&self, t: Option<Duration>, idle: bool) {
        let g = self.flags.lock().unwrap_or_else(|e| e.into_inner());
        let stop = |f: &mut (bool, bool)| !(f.0 || (idle && f.1));
        let mut g = match t {
            Some(t) => {
                self.cv
                    .wait_timeout_while(g, t, stop)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
            None => self
                .cv
                .wait_while(g, stop)
                .unwrap_or_else(|e| e.into_inner()),
        };
        g.0 = false;
        if idle {
            g.1 = false;
        }
    }
}

pub(crate) struct Inner {
    eng: Mutex<EngineSide>,
    /// Callers waiting for the engine lock: the scanner lets them in between chunks.
    waiting: AtomicUsize,
    let_in: (Mutex<()>, Condvar),
    snap: Mutex<Snapshot>,
    snap_cv: Condvar,
    zero: Mutex<Vec<(MmId, Arc<ZeroSource>)>>,
    kick: Kick,
    stop: AtomicBool,
    pub(crate) scan_tid: Arc<AtomicU32>,
    pub(crate) reader_tid: Arc<AtomicU32>,
}

/// The engine's side of the live backend: KSM with its scanning thread.
pub struct Ksmd {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

impl Ksmd {
    /// An engine at the kernel's defaults (`run=0`) with its scanning thread.
    pub fn new() -> io::Result<Self> {
        let scan_tid = Arc::new(AtomicU32::new(0));
        let reader_tid = Arc::new(AtomicU32::new(0));
        let inner = Arc::new(Inner {
            eng: Mutex::new(EngineSide {
                ksm: Ksm::new(),
                mem: KsmdMemory::new(reader_tid.clone())?,
                clock: LiveClock {
                    start: Instant::now(),
                    tid: scan_tid.clone(),
                },
            }),
            waiting: AtomicUsize::new(0),
            let_in: (Mutex::new(()), Condvar::new()),
            snap: Mutex::new(Snapshot::default()),
            snap_cv: Condvar::new(),
            zero: Mutex::new(Vec::new()),
            kick: Kick::default(),
            stop: AtomicBool::new(false),
            scan_tid,
            reader_tid,
        });
        let i = inner.clone();
        let thread = std::thread::Builder::new()
            .name("samepage-ksmd".into())
            .spawn(move || {
                let _own = sys::note_own_stack();
                scan_loop(&i)
            })?;
        Ok(Self {
            inner,
            thread: Some(thread),
        })
    }

    /// The engine and its memory, as soon as the scanner is between chunks.
    pub(crate) fn engine(&self) -> EngineGuard<'_> {
        self.inner.waiting.fetch_add(1, Ordering::AcqRel);
        let g = self.inner.eng.lock().unwrap_or_else(|e| e.into_inner());
        EngineGuard {
            inner: &self.inner,
            g: Some(g),
        }
    }

    /// Add a process whose memory ksmd merges, in `domain`; returns its index and a
    /// read-only descriptor of the domain's store for its agent.
    pub fn add_target(
        &self,
        pid: u32,
        domain: u32,
        link: Box<dyn AgentLink>,
    ) -> io::Result<(usize, OwnedFd)> {
        let t = Target::new(pid, domain, link)?;
        let mut g = self.engine();
        let store = g.mem.store(domain)?.reader()?;
        let i = g.mem.add_target(t);
        drop(g);
        self.inner.kick.wake();
        Ok((i, store))
    }

    /// Put address space `mm` (a client process, its pid) in target `target`, in security
    /// domain `domain`; its zero pages are counted in the target's page tables.
    pub fn bind_mm(&self, mm: MmId, target: usize, domain: u32) -> io::Result<()> {
        self.bind(mm, target, domain, None)
    }

    /// [`Ksmd::bind_mm`] for an address space of this process, whose agent counts its
    /// zero pages.
    pub(crate) fn bind_local_mm(
        &self,
        mm: MmId,
        target: usize,
        agent: Arc<Agent>,
    ) -> io::Result<()> {
        self.bind(mm, target, 0, Some(agent))
    }

    fn bind(
        &self,
        mm: MmId,
        target: usize,
        domain: u32,
        local: Option<Arc<Agent>>,
    ) -> io::Result<()> {
        let source = match local {
            Some(a) => ZeroSource::Local(a),
            None => {
                let g = self.engine();
                let pid = g.mem.target(target).map(|t| t.pid).unwrap_or(0);
                drop(g);
                ZeroSource::Remote(Pagemap::open(pid)?)
            }
        };
        let mut g = self.engine();
        g.mem.bind_mm(mm, target);
        // A fresh address space has no rmap items yet, so its domain can always be set.
        let _ = g.ksm.set_domain(mm, DomainId(domain));
        publish(&self.inner, &g);
        drop(g);
        self.inner
            .zero
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((mm, Arc::new(source)));
        Ok(())
    }

    /// The agent of `target` registered `[start, end)` for `mm`; with `mergeable` it is
    /// `MADV_MERGEABLE` at once.
    pub fn add_region(&self, target: usize, mm: MmId, start: u64, end: u64, mergeable: bool) {
        let mut g = self.engine();
        let EngineSide { ksm, mem, .. } = &mut *g;
        mem.apply_changes();
        if let Some(t) = mem.target_mut(target) {
            t.add_region(mm, start, end, false);
        }
        if mergeable {
            ksm.madvise_mergeable(mem, mm, start, end);
        }
        publish(&self.inner, &g);
        drop(g);
        self.inner.kick.wake();
    }

    /// `MADV_MERGEABLE` / `MADV_UNMERGEABLE` on `[start, end)` of `mm`, as the engine sees
    /// it (the agent's flags are the caller's business).
    pub fn madvise(&self, mm: MmId, start: u64, end: u64, on: bool) -> Result<(), UnmergeError> {
        let mut g = self.engine();
        let EngineSide { ksm, mem, .. } = &mut *g;
        mem.apply_changes();
        let r = if on {
            ksm.madvise_mergeable(mem, mm, start, end);
            Ok(())
        } else {
            ksm.madvise_unmergeable(mem, mm, start, end)
        };
        publish(&self.inner, &g);
        drop(g);
        self.inner.kick.wake();
        r
    }

    /// `prctl(PR_SET_MEMORY_MERGE)` for `mm`.
    pub fn set_memory_merge(&self, mm: MmId, on: bool) -> Result<(), UnmergeError> {
        let mut g = self.engine();
        let EngineSide { ksm, mem, .. } = &mut *g;
        mem.apply_changes();
        let r = ksm.prctl_set_memory_merge(mem, mm, on);
        publish(&self.inner, &g);
        drop(g);
        self.inner.kick.wake();
        r
    }

    /// `prctl(PR_GET_MEMORY_MERGE)` for `mm`.
    pub fn memory_merge(&self, mm: MmId) -> bool {
        self.engine().ksm.prctl_get_memory_merge(mm)
    }

    /// The process of `target` disconnected but lives on: it gets no more batches and the
    /// engine forgets its address spaces, but the canonical pages its merged pages stand for
    /// stay until it exits ([`Ksmd::exit_target`]), since its agent still serves them.
    pub fn detach_target(&self, target: usize) {
        let mut g = self.engine();
        let mms: Vec<MmId> = g
            .mem
            .target(target)
            .map(|t| t.mms.clone())
            .unwrap_or_default();
        for &mm in &mms {
            let _ = g.ksm.exit(mm);
        }
        g.mem.detach(target);
        publish(&self.inner, &g);
        drop(g);
        self.forget_zero_sources(&mms);
        self.inner.kick.wake();
    }

    /// The process of `target` exited: its references to canonical pages go now, and its
    /// state once the engine has freed its address spaces.
    pub fn exit_target(&self, target: usize) {
        let mut g = self.engine();
        let mms: Vec<MmId> = g
            .mem
            .target(target)
            .map(|t| t.mms.clone())
            .unwrap_or_default();
        for &mm in &mms {
            let _ = g.ksm.exit(mm);
        }
        g.mem.mark_gone(target);
        publish(&self.inner, &g);
        drop(g);
        self.forget_zero_sources(&mms);
        self.inner.kick.wake();
    }

    fn forget_zero_sources(&self, mms: &[MmId]) {
        self.inner
            .zero
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(mm, _)| !mms.contains(mm));
    }

    /// A function that tells the scanner an agent has changes for it (applied when it is
    /// idle, or at the next chunk).
    pub fn changes_notifier(&self) -> impl Fn() + Send + Sync + 'static {
        let inner = Arc::downgrade(&self.inner);
        move || {
            if let Some(i) = inner.upgrade() {
                i.kick.changes();
            }
        }
    }

    /// `echo value > /sys/kernel/mm/ksm/name` for this engine.
    pub fn write_knob(&self, name: &str, value: &str) -> Result<(), KnobError> {
        let mut g = self.engine();
        let EngineSide { ksm, mem, .. } = &mut *g;
        mem.apply_changes();
        let r = ksm.write_knob(mem, name, value);
        drop(g);
        self.publish_now();
        self.inner.kick.wake();
        r
    }

    /// `cat /sys/kernel/mm/ksm/name`.
    pub fn knob(&self, name: &str) -> Option<String> {
        if name == "ksm_zero_pages" || samepage_engine::COUNTER_NAMES.contains(&name) {
            return self.counters().get(name).map(|v| v.to_string());
        }
        self.engine().ksm.tunables().show(name)
    }

    fn zero_count(&self, mm: Option<MmId>) -> i64 {
        let z = self.inner.zero.lock().unwrap_or_else(|e| e.into_inner());
        z.iter()
            .filter(|(m, _)| mm.is_none_or(|x| x == *m))
            .map(|(m, s)| s.count(*m))
            .sum()
    }

    /// The counters of `/sys/kernel/mm/ksm`, without waiting for the scanner:
    /// `ksm_zero_pages` read from the page tables now, the rest as of the last chunk.
    pub fn counters(&self) -> KsmCounters {
        let c = self.snapshot().counters;
        c.with_ksm_zero_pages(self.zero_count(None))
    }

    /// `/proc/PID/ksm_stat` of `mm` (same rules as [`Ksmd::counters`]).
    pub fn ksm_stat(&self, mm: MmId) -> KsmStat {
        let s = self
            .snapshot()
            .ksm_stat
            .into_iter()
            .find(|s| s.pid == mm.0)
            .unwrap_or(KsmStat {
                pid: mm.0,
                ..KsmStat::default()
            });
        s.with_ksm_zero_pages(self.zero_count(Some(mm)))
    }

    /// The last snapshot the scanner published.
    pub fn snapshot(&self) -> Snapshot {
        self.inner
            .snap
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Publish a snapshot now (after a knob write or an unmerge outside a scan).
    fn publish_now(&self) {
        let g = self.engine();
        publish(&self.inner, &g);
    }

    /// Wait until `full_scans` has grown by `n` (false if `timeout` passed first).
    pub fn wait_full_scans(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.inner.snap.lock().unwrap_or_else(|e| e.into_inner());
        let target = g.counters.full_scans + n;
        while g.counters.full_scans < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self
                .inner
                .snap_cv
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Wait until the scanner has published a chunk after `chunks` (false on timeout).
    pub fn wait_chunk_after(&self, chunks: u64, timeout: Duration) -> bool {
        let g = self.inner.snap.lock().unwrap_or_else(|e| e.into_inner());
        let (g, r) = self
            .inner
            .snap_cv
            .wait_timeout_while(g, timeout, |s| s.chunks <= chunks)
            .unwrap_or_else(|e| e.into_inner());
        drop(g);
        !r.timed_out()
    }

    /// Run `f` on the engine and its memory between two chunks of a scan.
    pub(crate) fn quiescent<R>(&self, f: impl FnOnce(&mut Ksm, &mut KsmdMemory) -> R) -> R {
        let mut g = self.engine();
        let EngineSide { ksm, mem, .. } = &mut *g;
        mem.apply_changes();
        f(ksm, mem)
    }

    /// Scan `n` pages on the calling thread, whatever `run` says (tests use it for a
    /// deterministic pace).
    pub fn scan(&self, n: u64) -> samepage_engine::ScanBatch {
        let mut g = self.engine();
        let b = run_chunk(&mut g, n);
        publish(&self.inner, &g);
        g.mem.end_batch();
        b
    }

    /// CPU time of the scanning and read-ahead threads so far, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        (sys::thread_cpu_ns(self.inner.scan_tid.load(Ordering::Relaxed))
            + sys::thread_cpu_ns(self.inner.reader_tid.load(Ordering::Relaxed))) as f64
            / 1e9
    }

    /// ksmd's bookkeeping: the engine's, and its mirror of the targets' page states.
    pub fn metadata(&self) -> crate::live::Metadata {
        self.quiescent(|ksm, mem| crate::live::Metadata {
            engine_bytes: ksm.metadata_bytes() as u64,
            rmap_items: ksm.rmap_items(),
            page_state_bytes: mem.state_bytes() as u64,
        })
    }

    /// ksmd's own counters.
    pub fn stats(&self) -> KsmdStats {
        self.engine().mem.stats()
    }
}

impl Drop for Ksmd {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        self.inner.kick.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The engine lock, taken by a caller the scanner makes room for.
pub(crate) struct EngineGuard<'a> {
    inner: &'a Inner,
    g: Option<MutexGuard<'a, EngineSide>>,
}

impl std::ops::Deref for EngineGuard<'_> {
    type Target = EngineSide;
    fn deref(&self) -> &EngineSide {
        self.g.as_ref().expect("held")
    }
}

impl std::ops::DerefMut for EngineGuard<'_> {
    fn deref_mut(&mut self) -> &mut EngineSide {
        self.g.as_mut().expect("held")
    }
}

impl Drop for EngineGuard<'_> {
    fn drop(&mut self) {
        self.g = None;
        self.inner.waiting.fetch_sub(1, Ordering::AcqRel);
        let _l = self
            .inner
            .let_in
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.inner.let_in.1.notify_all();
    }
}

/// Remove the targets that are gone once the engine has freed their address spaces.
fn reap(g: &mut EngineSide) {
    let EngineSide { ksm, mem, .. } = g;
    mem.reap(|mm| ksm.mm_released(mm));
}

/// One chunk: `do_scan(n)`, whose end carries out the queued merges. At the end of a full
/// scan, processes that merge everything register the memory they mapped since.
fn run_chunk(g: &mut EngineSide, n: u64) -> samepage_engine::ScanBatch {
    let b = {
        let EngineSide { ksm, mem, clock } = &mut *g;
        mem.apply_changes();
        ksm.do_scan(mem, clock, n)
    };
    new_memory(g, b.full_scan_done);
    b
}

/// Make the memory agents registered on their own mergeable, after asking the processes
/// that merge everything for what they mapped since (if `ask`). Whether there are such
/// processes.
fn new_memory(g: &mut EngineSide, ask: bool) -> bool {
    let EngineSide { ksm, mem, .. } = g;
    let any = ask && mem.refresh(|mm| ksm.prctl_get_memory_merge(mm));
    for (mm, s, e) in std::mem::take(&mut mem.new_regions) {
        ksm.madvise_mergeable(mem, mm, s, e);
    }
    any
}

/// Publish the engine's counters for readers: zero pages as 0 (readers count them in the
/// page tables), and when the scan last changed what is merged (a new merge or zero page,
/// a KSM page gone, a chain or dup).
fn publish(inner: &Inner, g: &EngineSide) {
    g.mem.count_zero.set(false);
    let counters = g.ksm.counters(&g.mem);
    let ksm_stat = g
        .mem
        .mms()
        .into_iter()
        .map(|mm| g.ksm.ksm_stat(&g.mem, mm))
        .collect();
    g.mem.count_zero.set(true);
    let progress = [
        counters.pages_shared,
        counters.pages_sharing,
        g.mem.stats().zero_placed,
        counters.stable_node_chains,
        counters.stable_node_dups,
    ];
    let mut s = inner.snap.lock().unwrap_or_else(|e| e.into_inner());
    if s.progress != progress {
        s.progress = progress;
        s.last_change = Some(Instant::now());
    }
    s.counters = counters;
    s.ksm_stat = ksm_stat;
    s.chunks += 1;
    drop(s);
    inner.snap_cv.notify_all();
}

/// The scanning thread: ksmd's loop, paced by `pages_to_scan` and `sleep_millisecs`.
fn scan_loop(inner: &Inner) {
    inner.scan_tid.store(sys::gettid(), Ordering::Relaxed);
    while !inner.stop.load(Ordering::Acquire) {
        let mut left: Option<u64> = None;
        let sleep = loop {
            let mut g = inner.eng.lock().unwrap_or_else(|e| e.into_inner());
            if !g.ksm.ksmd_should_run() || inner.stop.load(Ordering::Acquire) {
                g.mem.apply_changes();
                reap(&mut g);
                // A process that merges everything leaves the scan list when it has no
                // mergeable memory yet; the kernel puts it back at its next mmap. Here the
                // scanner, otherwise idle, keeps asking it for new memory.
                let watch = !inner.stop.load(Ordering::Acquire)
                    && g.ksm.tunables().run == samepage_engine::Run::Merge
                    && new_memory(&mut g, true);
                publish(inner, &g);
                g.mem.end_batch();
                break watch.then_some(memory::REFRESH_EVERY.as_millis() as u32);
            }
            let todo = *left.get_or_insert(g.ksm.tunables().pages_to_scan as u64);
            let chunk = todo.min(CHUNK_PAGES);
            let b = run_chunk(&mut g, chunk);
            reap(&mut g);
            publish(inner, &g);
            let ms = g.ksm.tunables().sleep_millisecs;
            let rest = todo - b.scanned.min(todo);
            let done = rest == 0 || b.full_scan_done || b.scanned < chunk;
            if done {
                g.mem.end_batch();
            }
            drop(g);
            // Let in whoever waits for the engine (knob writes, new regions, unmerges).
            if inner.waiting.load(Ordering::Acquire) > 0 {
                let l = inner.let_in.0.lock().unwrap_or_else(|e| e.into_inner());
                let _ = inner
                    .let_in
                    .1
                    .wait_timeout_while(l, Duration::from_millis(100), |_| {
                        inner.waiting.load(Ordering::Acquire) > 0
                    });
            }
            if done {
                break Some(ms);
            }
            left = Some(rest);
        };
        match sleep {
            Some(0) => {}
            Some(ms) => inner
                .kick
                .wait(Some(Duration::from_millis(ms as u64)), false),
            None => inner.kick.wait(None, true),
        }
    }
}
