//! [`KsmdMemory`]: the engine's [`Memory`] over every target ksmd merges.
//!
//! Reads go straight to the targets (`process_vm_readv`, `PAGEMAP_SCAN`); every change goes
//! through the target's agent. A merge the engine asks for is queued and returns at once;
//! the queue is carried out at the end of the scan chunk, one batch per target (one round
//! trip to a daemon client per chunk), and the merges that did not happen are handed back
//! to the engine, which undoes its bookkeeping for them before anyone can read a counter.

use super::prefetch::{Prefetcher, Window, WINDOW_PAGES};
use super::store::Store;
use super::target::{dec, Target, NONE};
use crate::ops::{Change, FailReason, Op};
use crate::sys::pagemap::{PageRegion, PAGE_IS_FILE, PAGE_IS_PFNZERO, PAGE_IS_PRESENT};
use crate::sys::{self, PAGE};
use rustc_hash::FxHashMap;
use samepage_engine::memory::{Memory, MergeError, MergeInto, PageRef, UnmergeError, VmaInfo};
use samepage_engine::{page_hash, FailedMerge, FrameId, MmId, PAGE_SIZE};
use std::io;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;

/// Frame ids of canonical pages carry this bit, the domain above bit 40, the offset's
/// generation ([`Store::gen`]) in bits 32 to 39 and the offset below; ordinary pages are
/// (target index + 1) above bit 47 and their address below.
const STORE_TAG: u64 = 1 << 63;
const ADDR_BITS: u32 = 47;
/// Security domains have ids below this (a daemon refuses clients of more domains).
pub const MAX_DOMAINS: u32 = 1 << 23;

fn canonical_frame(domain: u32, k: u32, gen: u8) -> FrameId {
    debug_assert!(domain < MAX_DOMAINS);
    FrameId(STORE_TAG | (domain as u64) << 40 | (gen as u64) << 32 | k as u64)
}

fn page_frame(target: usize, addr: u64) -> FrameId {
    FrameId(((target as u64 + 1) << ADDR_BITS) | addr)
}

/// Is `[start, end)` a page-aligned range of user space with at least one page?
fn user_range(start: u64, end: u64) -> bool {
    start < end
        && start.is_multiple_of(PAGE)
        && end.is_multiple_of(PAGE)
        && end <= super::target::USER_SPACE_END
}

/// What a frame id names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frame {
    Canonical { domain: u32, k: u32, gen: u8 },
    Page { target: usize, addr: u64 },
}

fn decode(f: FrameId) -> Frame {
    if f.0 & STORE_TAG != 0 {
        Frame::Canonical {
            domain: ((f.0 & !STORE_TAG) >> 40) as u32,
            k: f.0 as u32,
            gen: (f.0 >> 32) as u8,
        }
    } else {
        Frame::Page {
            target: ((f.0 >> ADDR_BITS) - 1) as usize,
            addr: f.0 & ((1 << ADDR_BITS) - 1),
        }
    }
}

/// The engine's name for why a merge did not happen.
fn merge_error(why: FailReason) -> MergeError {
    match why {
        FailReason::Changed => MergeError::Changed,
        FailReason::Pinned => MergeError::Pinned,
        FailReason::Gone | FailReason::Raced | FailReason::Error => MergeError::Gone,
    }
}

/// How often a process that merges everything is asked for new memory: a pass over
/// little memory takes no time, and each look reads the process's `/proc/PID/smaps`.
pub(crate) const REFRESH_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// Present, non-zero, anonymous pages found by the last `PAGEMAP_SCAN` of one target.
#[derive(Default)]
struct ScanWindow {
    target: usize,
    start: u64,
    end: u64,
    ranges: Vec<PageRegion>,
    /// The last address asked about: asking below it means the scan started over.
    last: u64,
    /// A range known to hold no such page.
    none: (u64, u64),
}

/// Counters of ksmd's own work, for reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KsmdStats {
    /// Batches sent to agents.
    pub batches: u64,
    /// Merges and zero-page placements queued.
    pub ops: u64,
    /// Of those, how many the agents reported not done.
    pub failed: u64,
    /// Zero pages placed so far (that the application may have written since).
    pub zero_placed: u64,
    /// Canonical pages released.
    pub canonical_released: u64,
}

/// The engine's view of every target's memory.
pub struct KsmdMemory {
    targets: Vec<Option<Target>>,
    mm_target: FxHashMap<MmId, usize>,
    stores: FxHashMap<u32, Store>,
    window: ScanWindow,
    /// Pages read ahead of the scan, kept within one batch.
    ahead: Window,
    prefetch: Prefetcher,
    /// A merge was queued in this chunk: reading ahead stops for the next one.
    merged_in_chunk: bool,
    read_ahead: bool,
    buf: Box<[u8; PAGE_SIZE]>,
    buf2: Box<[u8; PAGE_SIZE]>,
    changes: Vec<Change>,
    stats: KsmdStats,
    /// Off while the scanner publishes its snapshot: readers count zero pages themselves,
    /// from the page tables, when they read.
    pub(crate) count_zero: std::cell::Cell<bool>,
    /// Regions agents registered on their own (`Op::Refresh`), for the engine to make
    /// mergeable.
    pub(crate) new_regions: Vec<(MmId, u64, u64)>,
    /// Merges that failed in a flush an unshare forced in the middle of a scan (the
    /// engine's `break_cow`): reported with the scan's next failures.
    failed_early: Vec<FailedMerge>,
}

impl KsmdMemory {
    pub(crate) fn new(reader_tid: Arc<AtomicU32>) -> io::Result<Self> {
        Ok(Self {
            targets: Vec::new(),
            mm_target: FxHashMap::default(),
            stores: FxHashMap::default(),
            window: ScanWindow::default(),
            ahead: Window::new(),
            prefetch: Prefetcher::new(reader_tid)?,
            merged_in_chunk: false,
            read_ahead: true,
            buf: Box::new([0; PAGE_SIZE]),
            buf2: Box::new([0; PAGE_SIZE]),
            changes: Vec::new(),
            stats: KsmdStats::default(),
            count_zero: std::cell::Cell::new(true),
            new_regions: Vec::new(),
            failed_early: Vec::new(),
        })
    }

    /// The store of `domain`, made on first use.
    pub(crate) fn store(&mut self, domain: u32) -> io::Result<&mut Store> {
        match self.stores.entry(domain) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(e) => {
                Ok(e.insert(Store::new(&format!("samepage-canonical-{domain}"))?))
            }
        }
    }

    /// Add a target; returns its index.
    pub(crate) fn add_target(&mut self, t: Target) -> usize {
        match self.targets.iter().position(Option::is_none) {
            Some(i) => {
                self.targets[i] = Some(t);
                i
            }
            None => {
                self.targets.push(Some(t));
                self.targets.len() - 1
            }
        }
    }

    /// The target `i`.
    pub(crate) fn target(&self, i: usize) -> Option<&Target> {
        self.targets.get(i).and_then(Option::as_ref)
    }

    pub(crate) fn target_mut(&mut self, i: usize) -> Option<&mut Target> {
        self.targets.get_mut(i).and_then(Option::as_mut)
    }

    /// Put address space `mm` in target `i`.
    pub(crate) fn bind_mm(&mut self, mm: MmId, i: usize) {
        self.mm_target.insert(mm, i);
        if let Some(t) = self.target_mut(i) {
            if !t.mms.contains(&mm) {
                t.mms.push(mm);
            }
        }
    }

    /// Remove target `i` (gone, and the engine has freed its address spaces).
    fn remove_target(&mut self, i: usize) {
        self.mark_gone(i);
        self.targets[i] = None;
        self.mm_target.retain(|_, &mut ti| ti != i);
    }

    /// Every address space bound to a target.
    pub(crate) fn mms(&self) -> Vec<MmId> {
        let mut v: Vec<MmId> = self.mm_target.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Target `i`'s process is gone: its address spaces read as exiting, and the canonical
    /// pages its pages stood for lose those references at once (its memory went with it).
    pub(crate) fn mark_gone(&mut self, i: usize) {
        let Some(t) = self.targets.get_mut(i).and_then(Option::as_mut) else {
            return;
        };
        t.gone = true;
        t.detached = true;
        t.regions.clear();
        t.queue.clear();
        let refs = std::mem::take(&mut t.refs);
        let inflight = std::mem::take(&mut t.inflight);
        if let Some(store) = self.stores.get_mut(&t.domain) {
            for (k, n) in refs {
                for _ in 0..n {
                    store.unref(k);
                }
            }
            for (_, k) in inflight {
                store.dequeue(k, false);
            }
        }
        self.stats.canonical_released = self.stores.values().map(|s| s.released).sum();
        self.window = ScanWindow::default();
        self.ahead.clear();
    }

    /// Target `i` disconnected: no more batches; what its pages stand for stays.
    pub(crate) fn detach(&mut self, i: usize) {
        if let Some(t) = self.target_mut(i) {
            t.detached = true;
        }
    }

    /// Targets that are gone and whose address spaces the engine has let go of, removed;
    /// returns how many.
    pub(crate) fn reap(&mut self, released: impl Fn(MmId) -> bool) -> usize {
        let done: Vec<usize> = self
            .targets
            .iter()
            .enumerate()
            .filter_map(|(i, t)| {
                let t = t.as_ref()?;
                (t.gone && t.mms.iter().all(|&m| released(m))).then_some(i)
            })
            .collect();
        for &i in &done {
            self.remove_target(i);
        }
        done.len()
    }

    /// The canonical page ksmd believes the page at `addr` of this process's target stands
    /// for (for verification).
    pub(crate) fn merged_at(&self, addr: u64) -> Option<u32> {
        self.targets
            .iter()
            .flatten()
            .find(|t| t.pid == 0)
            .and_then(|t| t.merged(addr))
    }

    fn target_of(&self, mm: MmId) -> Option<usize> {
        self.mm_target.get(&mm).copied()
    }

    /// Counters of ksmd's work.
    pub fn stats(&self) -> KsmdStats {
        self.stats
    }

    /// Canonical pages referred to now, over every domain.
    pub fn canonical_pages(&self) -> usize {
        self.stores.values().map(Store::live_pages).sum()
    }

    /// Bytes of ksmd's mirror of the targets' page states.
    pub fn state_bytes(&self) -> usize {
        self.targets
            .iter()
            .flatten()
            .map(|t| t.regions.iter().map(|r| r.pages.len()).sum::<usize>())
            .sum::<usize>()
            * std::mem::size_of::<u32>()
    }

    /// Apply what the agents reported: merged pages' references, the application's unmaps
    /// and moves.
    pub(crate) fn apply_changes(&mut self) {
        for i in 0..self.targets.len() {
            self.apply_target_changes(i, &mut Vec::new());
        }
    }

    /// Apply target `i`'s changes; the merges reported failed go to `failed`. Returns the
    /// errno of an unshare that failed, if one did.
    fn apply_target_changes(
        &mut self,
        i: usize,
        failed: &mut Vec<(u64, FailReason)>,
    ) -> Option<i32> {
        let t = self.targets.get_mut(i).and_then(Option::as_mut)?;
        self.changes.clear();
        t.link.drain(&mut self.changes);
        if self.changes.is_empty() {
            return None;
        }
        let mut unshare_errno = None;
        let store = self.stores.get_mut(&t.domain)?;
        for c in self.changes.drain(..) {
            match c {
                Change::Merged { addr, k } => {
                    // Only a merge ksmd asked for counts: an agent cannot make up references.
                    if t.inflight.get(&addr) == Some(&k) {
                        t.inflight.remove(&addr);
                        if let Some(ri) = t.region_at(addr) {
                            let r = &mut t.regions[ri];
                            let j = r.idx(addr);
                            if r.pages[j] != NONE {
                                let old = r.pages[j];
                                dec(&mut t.refs, old);
                                store.unref(old);
                            }
                            r.pages[j] = k;
                            *t.refs.entry(k).or_default() += 1;
                            store.dequeue(k, true);
                        } else {
                            store.dequeue(k, false);
                        }
                    }
                }
                Change::Failed { addr, why } => {
                    if let Some(k) = t.inflight.remove(&addr) {
                        store.dequeue(k, false);
                    }
                    failed.push((addr, why));
                }
                Change::Unmerged { addr, k } | Change::ReadCopied { addr, k } => {
                    if let Some(ri) = t.region_at(addr) {
                        let r = &mut t.regions[ri];
                        let j = r.idx(addr);
                        if r.pages[j] == k {
                            r.pages[j] = NONE;
                            dec(&mut t.refs, k);
                            store.unref(k);
                            if matches!(c, Change::ReadCopied { .. }) {
                                t.read_copied.insert(addr);
                            }
                        }
                    }
                }
                // An agent's ranges are checked as a system call would check them: a
                // client cannot make the daemon act on a range that is no range.
                Change::Unmapped { start, end } if user_range(start, end) => {
                    for k in t.remove_range(start, end) {
                        store.unref(k);
                    }
                }
                Change::Moved { from, to, len }
                    if from.checked_add(len).is_some_and(|e| user_range(from, e))
                        && to.checked_add(len).is_some_and(|e| user_range(to, e)) =>
                {
                    for k in t.move_range(from, to, len) {
                        store.unref(k);
                    }
                }
                Change::Unmapped { .. } | Change::Moved { .. } => {}
                Change::Registered { start, end } => {
                    let ok = user_range(start, end)
                        && !t.regions.iter().any(|r| r.start < end && r.end() > start);
                    if let (true, Some(&mm)) = (ok, t.mms.first()) {
                        t.add_region(mm, start, end, false);
                        self.new_regions.push((mm, start, end));
                    }
                }
                Change::UnshareFailed { errno, .. } => unshare_errno = Some(errno),
                Change::BatchDone { seq, zeros } => {
                    self.stats.zero_placed += zeros as u64;
                    if seq == t.seq {
                        t.stalled = false;
                    }
                }
            }
        }
        self.stats.canonical_released = self.stores.values().map(|s| s.released).sum();
        unshare_errno
    }

    /// Carry out every queued operation, one batch per target, and apply the results: the
    /// merges that did not happen go to `failed`. An unshare that failed is the error.
    fn flush(&mut self, failed: &mut Vec<FailedMerge>) -> Result<(), UnmergeError> {
        self.end_chunk();
        let mut result = Ok(());
        for i in 0..self.targets.len() {
            let Some(t) = self.targets.get_mut(i).and_then(Option::as_mut) else {
                continue;
            };
            if t.queue.is_empty() {
                continue;
            }
            let ops = std::mem::take(&mut t.queue);
            let mut f = Vec::new();
            if t.stalled || t.detached {
                // Nothing goes to it: what was queued did not happen.
                for op in &ops {
                    if let Op::Merge { addr, k } = *op {
                        t.inflight.remove(&addr);
                        if let Some(s) = self.stores.get_mut(&t.domain) {
                            s.dequeue(k, false);
                        }
                        f.push((addr, FailReason::Gone));
                    }
                }
                if ops.iter().any(|op| matches!(op, Op::Unshare { .. })) {
                    result = Err(UnmergeError::Backend(Box::new(io::Error::other(
                        "the process does not answer samepage's requests",
                    ))));
                }
            } else {
                t.seq += 1;
                self.stats.batches += 1;
                let sent = t.link.execute(t.seq, &ops);
                let errno = self.apply_target_changes(i, &mut f);
                let Some(t) = self.targets.get_mut(i).and_then(Option::as_mut) else {
                    continue;
                };
                if let Err(e) = sent {
                    // Its end did not come back: the engine forgets these merges, but they
                    // stay outstanding here (and keep their canonical pages) until the agent
                    // reports them or its process exits.
                    t.stalled = true;
                    f.extend(t.inflight.keys().map(|&a| (a, FailReason::Gone)));
                    if ops.iter().any(|op| matches!(op, Op::Unshare { .. })) {
                        result = Err(UnmergeError::Backend(Box::new(e)));
                    }
                } else if let Some(errno) = errno {
                    result = Err(match errno {
                        libc::ENOMEM => UnmergeError::NoMemory,
                        e => UnmergeError::Backend(Box::new(io::Error::from_raw_os_error(e))),
                    });
                }
            }
            let Some(t) = self.targets.get_mut(i).and_then(Option::as_mut) else {
                continue;
            };
            self.stats.failed += f.len() as u64;
            for (addr, why) in f {
                let mm = t
                    .region_at(addr)
                    .map(|ri| t.regions[ri].mm)
                    .or_else(|| t.mms.first().copied());
                if let Some(mm) = mm {
                    failed.push(FailedMerge {
                        mm,
                        addr,
                        error: merge_error(why),
                    });
                }
            }
        }
        result
    }

    /// Ask the agents of the address spaces `merge_any` says merge everything to register
    /// the memory they mapped since, and carry that out now. Whether there are such
    /// address spaces.
    pub(crate) fn refresh(&mut self, merge_any: impl Fn(MmId) -> bool) -> bool {
        let mut any = false;
        for t in self.targets.iter_mut().flatten() {
            if t.gone || t.detached || !t.mms.iter().any(|&m| merge_any(m)) {
                continue;
            }
            any = true;
            if t.refreshed.is_none_or(|r| r.elapsed() >= REFRESH_EVERY) {
                t.refreshed = Some(std::time::Instant::now());
                t.queue.push(Op::Refresh);
            }
        }
        let mut failed = Vec::new();
        let _ = self.flush(&mut failed);
        any
    }

    /// The end of a chunk of the scan (every queued merge is carried out by then): decide
    /// whether the next chunk reads ahead.
    fn end_chunk(&mut self) {
        // Read ahead only while the scan merges nothing: the reader on the other CPU would
        // read pages the batch is about to take away.
        if self.merged_in_chunk {
            self.prefetch.cancel();
            self.ahead.clear();
        }
        self.read_ahead = !std::mem::take(&mut self.merged_in_chunk);
    }

    /// The end of a scan batch: the reader stops (it reads nothing while ksmd sleeps).
    pub(crate) fn end_batch(&mut self) {
        self.prefetch.cancel();
        self.ahead.clear();
    }

    /// The first present, non-zero, anonymous page in `[from, end)` of target `ti`, from
    /// PAGEMAP_SCAN over a window that moves with the scan. A stretch found empty is
    /// remembered until the scan starts over.
    fn present_from(&mut self, ti: usize, mut from: u64, end: u64) -> Option<u64> {
        const WINDOW: u64 = 2048 * PAGE;
        let w = &mut self.window;
        if w.target != ti || from < w.last {
            *w = ScanWindow {
                target: ti,
                ..ScanWindow::default()
            };
        }
        w.last = from;
        let start = from;
        if w.none.0 <= from && from < w.none.1 {
            from = w.none.1;
        }
        let t = self.targets.get(ti).and_then(Option::as_ref)?;
        let found = loop {
            if from >= end {
                break None;
            }
            if !(w.start <= from && from < w.end) {
                let wend = end.min(from + WINDOW);
                w.ranges.clear();
                let _ = t.pagemap.scan(
                    from,
                    wend,
                    PAGE_IS_PRESENT,
                    PAGE_IS_PFNZERO | PAGE_IS_FILE,
                    PAGE_IS_PRESENT,
                    &mut w.ranges,
                );
                w.start = from;
                w.end = wend;
            }
            let i = w.ranges.partition_point(|r| r.end <= from);
            if let Some(r) = w.ranges.get(i) {
                break Some(r.start.max(from));
            }
            from = w.end;
        };
        w.none = (start, found.unwrap_or(end));
        found
    }

    /// The end of the present run that `addr` is in, as PAGEMAP_SCAN last found it.
    fn run_end(&self, addr: u64) -> Option<u64> {
        let i = self.window.ranges.partition_point(|r| r.end <= addr);
        self.window
            .ranges
            .get(i)
            .filter(|r| r.start <= addr)
            .map(|r| r.end)
    }

    /// The hash of ordinary page `addr` of target `ti` from the pages read ahead; the
    /// window that starts there is taken from the reader thread, or read here.
    fn hash_ahead(&mut self, ti: usize, addr: u64) -> Option<u64> {
        let pid = self.target(ti)?.pid;
        if !self.ahead.contains(pid, addr) {
            if self.window.target != ti {
                return None;
            }
            let run_end = self.run_end(addr)?;
            match self.prefetch.take(addr) {
                Some(w) if w.contains(pid, addr) => {
                    let old = std::mem::replace(&mut self.ahead, w);
                    self.prefetch.give_back(old);
                }
                other => {
                    if let Some(w) = other {
                        self.prefetch.give_back(w);
                    }
                    self.ahead.fill(pid, addr, run_end);
                }
            }
            if !self.ahead.contains(pid, addr) {
                return None;
            }
            while self.read_ahead && self.prefetch.wants_more() {
                let next = self.prefetch.asked_end().unwrap_or(self.ahead.end);
                let ranges = &self.window.ranges;
                let i = ranges.partition_point(|r| r.end <= next);
                let Some(r) = ranges.get(i) else { break };
                let s = r.start.max(next);
                self.prefetch
                    .ask(pid, s, r.end.min(s + WINDOW_PAGES * PAGE));
            }
        }
        Some(self.ahead.hash(addr))
    }

    /// Copy the contents of frame `f` into `buf` (false: it cannot be read).
    fn read_frame(&self, f: FrameId, buf: &mut [u8; PAGE_SIZE]) -> bool {
        match decode(f) {
            Frame::Canonical { domain, k, gen } => self
                .stores
                .get(&domain)
                .is_some_and(|s| s.gen(k) == gen && s.read(k, buf)),
            Frame::Page { target, addr } => {
                let Some(t) = self.target(target) else {
                    return false;
                };
                if self.ahead.contains(t.pid, addr) {
                    buf.copy_from_slice(self.ahead.page(addr));
                    return true;
                }
                sys::read_process(t.pid, addr, &mut buf[..]).is_ok_and(|n| n == PAGE_SIZE)
            }
        }
    }

    /// Queue an operation for target `ti`'s next batch.
    fn queue(&mut self, ti: usize, op: Op) {
        self.stats.ops += 1;
        if let Some(t) = self.target_mut(ti) {
            if let Op::Merge { addr, k } = op {
                t.inflight.insert(addr, k);
            }
            t.queue.push(op);
        }
    }
}

impl Memory for KsmdMemory {
    fn mm_exiting(&self, mm: MmId) -> bool {
        self.target_of(mm)
            .and_then(|i| self.target(i))
            .is_none_or(|t| t.gone || t.detached || t.link.gone())
    }

    fn find_vma(&self, mm: MmId, addr: u64) -> Option<VmaInfo> {
        let t = self.target(self.target_of(mm)?)?;
        t.regions
            .iter()
            .filter(|r| r.mm == mm && r.end() > addr)
            .min_by_key(|r| r.start)
            .map(|r| VmaInfo {
                start: r.start,
                end: r.end(),
                mergeable: r.mergeable,
                anon: true,
            })
    }

    fn next_page(&mut self, mm: MmId, from: u64, end: u64) -> Option<(u64, PageRef)> {
        let ti = self.target_of(mm)?;
        let mut a = from;
        while a < end {
            let p = self.present_from(ti, a, end).unwrap_or(end);
            let t = self.target(ti)?;
            let ri = t.region_at(a)?;
            let r = &t.regions[ri];
            let last = r.idx(p.min(r.end() - PAGE));
            // A merged page is a KSM page whether it is a hole (as it normally is) or was
            // faulted in a moment ago; ordinary pages count only where PAGEMAP_SCAN saw one.
            for (j, &k) in r.pages[r.idx(a)..=last].iter().enumerate() {
                let q = a + j as u64 * PAGE;
                if k != NONE {
                    let gen = self.stores.get(&t.domain).map_or(0, |s| s.gen(k));
                    return Some((
                        q,
                        PageRef {
                            frame: canonical_frame(t.domain, k, gen),
                            ksm: true,
                            nid: 0,
                            read_copy: false,
                        },
                    ));
                }
                if q == p {
                    let read_copy = self.target_mut(ti)?.read_copied.remove(&q);
                    return Some((
                        q,
                        PageRef {
                            frame: page_frame(ti, q),
                            ksm: false,
                            nid: 0,
                            read_copy,
                        },
                    ));
                }
            }
            a = p + PAGE;
        }
        None
    }

    fn get_page(&mut self, mm: MmId, addr: u64) -> Option<PageRef> {
        let ti = self.target_of(mm)?;
        let t = self.target(ti)?;
        let ri = t.region_at(addr)?;
        if !t.regions[ri].mergeable || t.regions[ri].mm != mm {
            return None;
        }
        if let Some(k) = t.merged(addr) {
            let gen = self.stores.get(&t.domain).map_or(0, |s| s.gen(k));
            return Some(PageRef {
                frame: canonical_frame(t.domain, k, gen),
                ksm: true,
                nid: 0,
                read_copy: false,
            });
        }
        let mut v = Vec::new();
        t.pagemap
            .scan(
                addr,
                addr + PAGE,
                PAGE_IS_PRESENT,
                PAGE_IS_PFNZERO | PAGE_IS_FILE,
                PAGE_IS_PRESENT,
                &mut v,
            )
            .ok()?;
        (!v.is_empty()).then_some(PageRef {
            frame: page_frame(ti, addr),
            ksm: false,
            nid: 0,
            // Only the scan's own visit (`next_page`) takes the mark.
            read_copy: t.read_copied.contains(&addr),
        })
    }

    fn page_hash(&mut self, frame: FrameId) -> Option<u64> {
        if let Frame::Page { target, addr } = decode(frame) {
            if let Some(h) = self.hash_ahead(target, addr) {
                return Some(h);
            }
        }
        let mut buf = std::mem::replace(&mut self.buf, Box::new([0; PAGE_SIZE]));
        let h = self
            .read_frame(frame, &mut buf)
            .then(|| page_hash(&buf[..]));
        self.buf = buf;
        h
    }

    fn pages_identical(&mut self, a: FrameId, b: FrameId) -> bool {
        if a == b {
            return true;
        }
        let (mut x, mut y) = (
            std::mem::replace(&mut self.buf, Box::new([0; PAGE_SIZE])),
            std::mem::replace(&mut self.buf2, Box::new([0; PAGE_SIZE])),
        );
        let same = self.read_frame(a, &mut x) && self.read_frame(b, &mut y) && x[..] == y[..];
        self.buf = x;
        self.buf2 = y;
        same
    }

    fn ksm_page_alive(&self, frame: FrameId) -> bool {
        match decode(frame) {
            Frame::Canonical { domain, k, gen } => self
                .stores
                .get(&domain)
                .is_some_and(|s| s.gen(k) == gen && s.alive(k)),
            Frame::Page { .. } => false,
        }
    }

    fn merge(
        &mut self,
        mm: MmId,
        addr: u64,
        page: FrameId,
        into: MergeInto,
    ) -> Result<FrameId, MergeError> {
        let ti = self.target_of(mm).ok_or(MergeError::Gone)?;
        if page != page_frame(ti, addr) {
            // Only ordinary pages are merged; a canonical page is shared already.
            return Err(MergeError::Gone);
        }
        let t = self.target(ti).ok_or(MergeError::Gone)?;
        if t.merged(addr).is_some() || t.inflight.contains_key(&addr) {
            return Err(MergeError::Gone);
        }
        let domain = t.domain;
        match into {
            MergeInto::ZeroPage => {
                self.queue(ti, Op::Zero { addr });
                Ok(FrameId(0))
            }
            MergeInto::KsmPage(f) => {
                let Frame::Canonical { domain: d, k, gen } = decode(f) else {
                    return Err(MergeError::Gone);
                };
                if d != domain {
                    return Err(MergeError::Gone);
                }
                let store = self.stores.get_mut(&domain).ok_or(MergeError::Gone)?;
                if store.gen(k) != gen || !store.alive(k) {
                    return Err(MergeError::Gone);
                }
                store.queue(k);
                self.merged_in_chunk = true;
                self.queue(ti, Op::Merge { addr, k });
                Ok(f)
            }
            MergeInto::Promote => {
                // The contents the engine compared become the canonical page; the agent
                // checks what it takes away against them, so a page changed since only
                // fails its merge.
                let mut buf = std::mem::replace(&mut self.buf, Box::new([0; PAGE_SIZE]));
                let read = self.read_frame(page, &mut buf);
                let k = if read {
                    self.store(domain).and_then(|s| s.alloc(&buf[..])).ok()
                } else {
                    None
                };
                self.buf = buf;
                let k = k.ok_or(MergeError::Gone)?;
                let gen = self.stores.get(&domain).map_or(0, |s| s.gen(k));
                self.merged_in_chunk = true;
                self.queue(ti, Op::Merge { addr, k });
                Ok(canonical_frame(domain, k, gen))
            }
        }
    }

    fn take_failed_merges(&mut self, out: &mut Vec<FailedMerge>) {
        // Unshare failures cannot be among them (break_ksm flushes on its own).
        out.append(&mut self.failed_early);
        let _ = self.flush(out);
    }

    fn break_ksm(&mut self, mm: MmId, start: u64, end: u64) -> Result<(), UnmergeError> {
        // Merges queued go first: the unshare must find them done.
        let mut failed = Vec::new();
        let flushed = self.flush(&mut failed);
        self.failed_early.append(&mut failed);
        flushed?;
        let ti = self.target_of(mm).ok_or_else(|| {
            UnmergeError::Backend(Box::new(io::Error::other("unknown address space")))
        })?;
        let ranges: Vec<(u64, u64)> = self
            .target(ti)
            .map(|t| {
                t.regions
                    .iter()
                    .filter(|r| r.mm == mm && r.start < end && r.end() > start)
                    .map(|r| (r.start.max(start), r.end().min(end)))
                    .collect()
            })
            .unwrap_or_default();
        for (s, e) in ranges {
            self.queue(ti, Op::Unshare { start: s, end: e });
        }
        self.flush(&mut failed)
    }

    fn set_mergeable(&mut self, mm: MmId, start: u64, end: u64, on: bool) {
        let Some(ti) = self.target_of(mm) else { return };
        let Some(t) = self.target_mut(ti) else { return };
        t.split_at(start);
        t.split_at(end);
        for r in t.regions.iter_mut() {
            if r.mm == mm && r.start >= start && r.end() <= end {
                r.mergeable = on;
            }
        }
        if !on {
            // The scan will not visit these pages: their marks would only stay behind.
            t.forget_read_copies(start, end);
        }
    }

    fn ksm_zero_pages(&self, mm: Option<MmId>) -> i64 {
        if !self.count_zero.get() {
            return 0;
        }
        match mm {
            Some(mm) => self
                .target_of(mm)
                .and_then(|i| self.target(i))
                .map(|t| t.zero_pages(mm))
                .unwrap_or(0),
            None => self
                .targets
                .iter()
                .flatten()
                .map(|t| t.mms.iter().map(|&m| t.zero_pages(m)).sum::<i64>())
                .sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_ranges_are_checked_as_a_system_call_would() {
        assert!(user_range(0x1000, 0x3000));
        assert!(!user_range(0x3000, 0x1000), "reversed");
        assert!(!user_range(0x1000, 0x1000), "empty");
        assert!(!user_range(0x1001, 0x3000), "unaligned");
        assert!(!user_range(0x1000, !(PAGE - 1)), "beyond user space");
    }

    #[test]
    fn frame_ids_round_trip_and_tell_generations_apart() {
        for (domain, k, gen) in [(0, 0, 0), (MAX_DOMAINS - 1, u32::MAX, u8::MAX), (7, 12, 3)] {
            let f = canonical_frame(domain, k, gen);
            assert_eq!(decode(f), Frame::Canonical { domain, k, gen });
            assert_ne!(f, canonical_frame(domain, k, gen.wrapping_add(1)));
        }
        let p = page_frame(3, 0x7fff_ffff_f000);
        assert_eq!(
            decode(p),
            Frame::Page {
                target: 3,
                addr: 0x7fff_ffff_f000
            }
        );
    }
}
