//! The live backend: [`Memory`] over real regions of this process.
//!
//! Protocols (see `shared/reference/linux-primitives.md` for what they rest on):
//!
//! - **Zero page** at A: write-protect A; check it is zero while protected; `UFFDIO_MOVE` the
//!   page out to a scratch slot (EBUSY means pinned: skip); check the moved-out copy, which
//!   nobody can reach, is still zero; `UFFDIO_ZEROPAGE` A; write-protect A (the mark); count it
//!   if A now maps the zero page with the mark, then wake A. Between the move and the
//!   zeropage, A is a hole and the region's MISSING registration keeps accesses waiting.
//! - **Merge** A into canonical page k of the store (a memfd): write-protect A; compare with k;
//!   move A out (pin check); compare the moved-out copy; `mmap(MAP_PRIVATE|MAP_FIXED)` the
//!   memfd page over A; register the new mapping for write-protect and protect it; wake A.
//!   A write to A then arrives as a fault *before* the copy-on-write.
//! - **Promote** A: copy A (protected) to a fresh store offset k, then merge A into k.
//!
//! Faults and events are handled by [`handle_events`] on its own thread, which never maps,
//! unmaps or discards memory itself.

use crate::prefetch::{Prefetcher, Window, WINDOW_PAGES};
use crate::state::{Discard, LiveStats, PageState, Region, State, MAX_STORE_OFFSET};
use crate::sys::{self, PAGE, PAGE_IS_FILE, PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_WRITTEN};
use samepage_engine::memory::{Memory, MergeError, MergeInto, PageRef, UnmergeError, VmaInfo};
use samepage_engine::{page_hash, FrameId, MmId, PAGE_SIZE};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use userfaultfd::{Event, FaultKind, RegisterMode, Uffd};

/// Frame ids of canonical pages carry this bit; ordinary pages are named by their address.
pub(crate) const STORE_TAG: u64 = 1 << 63;
/// Pages of the scratch area the scanner moves pages out to.
const SCRATCH_PAGES: u64 = 1024;
/// Longest run of zero pages placed with one set of userfaultfd calls.
const ZERO_RUN_PAGES: u64 = 256;
/// The store file grows in steps of this many pages.
const STORE_GROW_PAGES: u64 = 1 << 16;
/// Canonical pages the store can hold: the size of samepage's read-only view of it (virtual
/// address space only; 64 GiB).
const STORE_VIEW_PAGES: u64 = 1 << 24;

fn store_frame(k: u32) -> FrameId {
    FrameId(STORE_TAG | k as u64)
}

/// The mapping budget: samepage never lets its own mappings push the process past
/// `vm.max_map_count` minus a reserve left for the application.
#[derive(Debug)]
pub(crate) struct Budget {
    pub limit: u64,
    baseline: u64,
    added: u64,
    refused: u64,
}

impl Budget {
    pub fn new() -> io::Result<Self> {
        let max: u64 = std::fs::read_to_string("/proc/sys/vm/max_map_count")?
            .trim()
            .parse()
            .map_err(|_| io::Error::other("unreadable vm.max_map_count"))?;
        let reserve = (max / 4).max(1024);
        Ok(Self {
            limit: max.saturating_sub(reserve),
            baseline: count_maps()?,
            added: 0,
            refused: 0,
        })
    }

    /// Room for one more merge (which adds at most two mappings)?
    fn take(&mut self) -> bool {
        if self.baseline + self.added + 2 <= self.limit {
            self.added += 2;
            return true;
        }
        // The estimate assumed no mapping ever coalesced: count for real, but not more often
        // than every 4096 refusals (counting reads all of /proc/self/maps, which is long by
        // then).
        if self.refused.is_multiple_of(4096) {
            if let Ok(n) = count_maps() {
                self.baseline = n;
                self.added = 0;
            }
        }
        if self.baseline + self.added + 2 <= self.limit {
            self.added += 2;
            self.refused = 0;
            true
        } else {
            self.refused += 1;
            false
        }
    }
}

/// Lines of `/proc/self/maps`.
pub(crate) fn count_maps() -> io::Result<u64> {
    let s = std::fs::read("/proc/self/maps")?;
    Ok(s.iter().filter(|&&b| b == b'\n').count() as u64)
}

/// What the scanner thread and the handler thread share.
pub(crate) struct Shared {
    pub uffd: Uffd,
    pub state: Mutex<State>,
    pub store: OwnedFd,
    /// A read-only view of the whole store: canonical pages are compared and hashed in place.
    store_view: u64,
    store_size_pages: Mutex<u64>,
    pub pagemap: File,
    pub budget: Mutex<Budget>,
    pub stop: AtomicBool,
    /// The thread that runs scan batches: a fault it takes on a page its own transaction owns
    /// (the page was discarded under it) must be resolved, not left for it to wake.
    pub scanner_tid: std::sync::atomic::AtomicI32,
    /// Held by the handler thread from reading events to having handled them: an unmap or
    /// discard returns to the application when its event is read, so a count read after it
    /// waits here for the event's effect.
    pub events: Mutex<()>,
    /// The fault handler thread, which the scanner keeps on its own CPU during a batch.
    pub handler_tid: std::sync::atomic::AtomicI32,
    /// The thread that reads pages ahead of the scan.
    pub reader_tid: Arc<std::sync::atomic::AtomicI32>,
}

impl Shared {
    pub fn new(uffd: Uffd) -> io::Result<Self> {
        let store = sys::memfd_create("samepage-canonical")?;
        let store_view = sys::mmap_shared_ro(store.as_raw_fd(), STORE_VIEW_PAGES * PAGE)?;
        Ok(Self {
            uffd,
            state: Mutex::new(State::default()),
            store,
            store_view,
            store_size_pages: Mutex::new(0),
            pagemap: File::open("/proc/self/pagemap")?,
            budget: Mutex::new(Budget::new()?),
            stop: AtomicBool::new(false),
            scanner_tid: std::sync::atomic::AtomicI32::new(0),
            handler_tid: std::sync::atomic::AtomicI32::new(0),
            reader_tid: Arc::new(std::sync::atomic::AtomicI32::new(0)),
            events: Mutex::new(()),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state as the panicking code left it; the
        // state stays consistent enough to unmerge, which is what matters then.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ensure_store_size(&self, k: u32) -> io::Result<()> {
        let mut size = self
            .store_size_pages
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if (k as u64) < *size {
            return Ok(());
        }
        if k as u64 >= STORE_VIEW_PAGES {
            return Err(io::Error::other("the store of canonical pages is full"));
        }
        let new = (k as u64 / STORE_GROW_PAGES + 1) * STORE_GROW_PAGES;
        sys::ftruncate(&self.store, new * PAGE)?;
        *size = new;
        Ok(())
    }

    fn fd(&self) -> std::os::fd::RawFd {
        self.uffd.as_raw_fd()
    }

    /// Let the handler read and handle what is already queued on the userfaultfd. A
    /// transaction about to decide looks at what the application did to its page meanwhile,
    /// and an event the handler has not read yet would go unseen: an mremap that took the
    /// page away before the transaction's mapping was made, for one (the handler shares the
    /// scanner's CPU during a batch, so it reads nothing until the scanner lets it run). What
    /// remains is an event its system call has not queued yet.
    fn settle_events(&self) {
        let fd = self.fd();
        for _ in 0..64 {
            if !sys::poll_readable(fd, 0).unwrap_or(false) {
                // Wait for the handling of what was read last.
                drop(self.events.lock().unwrap_or_else(|e| e.into_inner()));
                if !sys::poll_readable(fd, 0).unwrap_or(false) {
                    return;
                }
            }
            std::thread::yield_now();
        }
    }

    /// Run a userfaultfd ioctl, retrying while it answers EAGAIN: a non-cooperative event (an
    /// unmap, discard or move by the application) is waiting for the handler thread to read
    /// it. Never call this holding the state lock: the handler may need it to get there.
    fn retrying(&self, mut f: impl FnMut() -> io::Result<()>) -> io::Result<()> {
        let mut tries = 0u32;
        loop {
            match f() {
                Err(e) if errno(&e) == libc::EAGAIN && tries < 200_000 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_micros(5));
                }
                r => return r,
            }
        }
    }

    pub(crate) fn wp(&self, addr: u64) -> io::Result<()> {
        self.retrying(|| sys::uffd_wp(self.fd(), addr, true, false))
    }

    /// Take the write protection off (not under the state lock).
    pub(crate) fn unwp(&self, addr: u64, wake: bool) {
        // Fails only if the range is no longer registered (unmapped): nothing to unprotect.
        let _ = self.retrying(|| sys::uffd_wp(self.fd(), addr, false, wake));
    }

    pub fn wake(&self, addr: u64) {
        let _ = sys::uffd_wake(self.fd(), addr);
    }

    /// Categories of one page: (present, pfnzero, written=no wp bit, file).
    fn categories(&self, addr: u64) -> io::Result<u64> {
        let r = sys::pagemap_scan(
            &self.pagemap,
            addr,
            addr + PAGE,
            0,
            0,
            PAGE_IS_PRESENT | PAGE_IS_PFNZERO | PAGE_IS_WRITTEN | PAGE_IS_FILE,
        )?;
        Ok(r.first().map(|x| x.categories).unwrap_or(0))
    }

    /// A zero page with samepage's mark: the zero PFN, write-protected.
    fn is_marked_zero(&self, addr: u64) -> bool {
        self.categories(addr)
            .map(|c| {
                c & (PAGE_IS_PRESENT | PAGE_IS_PFNZERO | PAGE_IS_WRITTEN)
                    == PAGE_IS_PRESENT | PAGE_IS_PFNZERO
            })
            .unwrap_or(false)
    }

    /// Read a page of this process without risking a fault on memory the application may have
    /// unmapped meanwhile.
    pub(crate) fn read_user(&self, addr: u64, buf: &mut [u8; PAGE_SIZE]) -> bool {
        sys::read_self(addr, buf).is_ok()
    }

    fn read_frame(&self, f: FrameId, buf: &mut [u8; PAGE_SIZE]) -> bool {
        if f.0 & STORE_TAG != 0 {
            self.read_store((f.0 & !STORE_TAG) as u32, buf)
        } else {
            self.read_user(f.0, buf)
        }
    }

    /// Canonical page `k`, read in place through the store's view.
    fn read_store(&self, k: u32, buf: &mut [u8; PAGE_SIZE]) -> bool {
        if k as u64
            >= *self
                .store_size_pages
                .lock()
                .unwrap_or_else(|e| e.into_inner())
        {
            return false;
        }
        // SAFETY: k is inside the file (below its size, and the view covers the whole
        // possible store), so the page is mapped and reads its contents, or zeros if it was
        // released; canonical pages are written only before any page maps them, by pwrite on
        // this thread, and no Rust reference points into the view.
        unsafe { sys::read_own(self.store_view + k as u64 * PAGE, &mut buf[..]) };
        true
    }

    /// Recheck zero pages in ranges the application discarded: the count is exact once the
    /// discards have completed.
    pub fn reconcile(&self) {
        drop(self.events.lock().unwrap_or_else(|e| e.into_inner()));
        let mut st = self.lock();
        if st.dirty.is_empty() {
            return;
        }
        let dirty = std::mem::take(&mut st.dirty);
        let mut keep = Vec::new();
        for (start, end, when) in dirty {
            let mut a = start;
            while a < end {
                let Some(ri) = st.region_at(a) else {
                    a += PAGE;
                    continue;
                };
                let r_end = st.regions[ri].end().min(end);
                while a < r_end {
                    let i = st.regions[ri].idx(a);
                    if st.regions[ri].pages.get(i) == PageState::Zero && !self.is_marked_zero(a) {
                        st.forget_page(ri, i, PageState::Anon);
                    }
                    a += PAGE;
                }
            }
            // A discard may still be on its way (its event is read before it happens); look
            // again at the next reading for a while.
            if when.elapsed() < Duration::from_secs(2) {
                keep.push((start, end, when));
            }
        }
        st.dirty.extend(keep);
    }
}

fn uffd_err(e: userfaultfd::Error) -> io::Error {
    io::Error::other(e.to_string())
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// The [`Memory`] handle the scanning thread uses.
pub struct LiveMemory {
    pub(crate) sh: Arc<Shared>,
    scratch: u64,
    scratch_used: u64,
    buf: Box<[u8; PAGE_SIZE]>,
    buf2: Box<[u8; PAGE_SIZE]>,
    /// Present, non-zero, anonymous pages found by the last PAGEMAP_SCAN: `[start, end)` of
    /// the window and the ranges inside it.
    window: (u64, u64, Vec<(u64, u64)>),
    window_last: u64,
    /// A range with no present anonymous page, as found since the scan last started over.
    none: (u64, u64),
    /// Pages read ahead of the scan (a snapshot, see [`crate::prefetch`]), kept within one
    /// batch until zero pages are placed.
    ahead: Window,
    /// Reads the window after `ahead` on another thread.
    prefetch: Prefetcher,
    /// A merge changed page mappings in this chunk of the batch.
    mapped_in_chunk: bool,
    /// Read ahead on the other thread in this chunk: the last one mapped nothing.
    read_ahead: bool,
    /// Zero pages the engine merged in this chunk, claimed, to be placed together when the
    /// chunk ends ([`LiveMemory::end_chunk`]).
    pending_zero: Vec<(MmId, u64)>,
}

impl LiveMemory {
    pub(crate) fn new(sh: Arc<Shared>) -> io::Result<Self> {
        let scratch = sys::mmap_anon(SCRATCH_PAGES * PAGE)?;
        // UFFDIO_MOVE needs its destination registered with the same userfaultfd.
        sh.uffd
            .register_with_mode(
                scratch as *mut libc::c_void,
                (SCRATCH_PAGES * PAGE) as usize,
                RegisterMode::MISSING,
            )
            .map_err(uffd_err)?;
        Ok(Self {
            prefetch: Prefetcher::new(sh.reader_tid.clone())?,
            sh,
            scratch,
            scratch_used: 0,
            buf: Box::new([0; PAGE_SIZE]),
            buf2: Box::new([0; PAGE_SIZE]),
            window: (0, 0, Vec::new()),
            window_last: 0,
            none: (0, 0),
            ahead: Window::new(),
            mapped_in_chunk: false,
            read_ahead: true,
            pending_zero: Vec::new(),
        })
    }

    /// A free scratch slot; empties the scratch area when it is full (never under the lock).
    fn scratch_slot(&mut self) -> u64 {
        self.scratch_slots(1)
    }

    /// `n` consecutive free scratch slots (`n` at most `SCRATCH_PAGES`).
    fn scratch_slots(&mut self, n: u64) -> u64 {
        if self.scratch_used + n > SCRATCH_PAGES {
            self.flush_scratch();
        }
        let s = self.scratch + self.scratch_used * PAGE;
        self.scratch_used += n;
        s
    }

    /// The end of a chunk of a scan batch (the engine lock is still held): place the zero
    /// pages merged in it, and decide whether the next chunk reads ahead.
    pub(crate) fn end_chunk(&mut self) {
        if !self.pending_zero.is_empty() {
            // First stop the reader: the zero pages are moved out while they are placed.
            self.end_batch();
            self.flush_zero();
        }
        // Read ahead only while the scan merges nothing: a reader working on the other CPU
        // makes every page-table change of a merge a TLB shootdown there (mixed 1 GiB image:
        // engine CPU 4.2 s with it, 2.8 s without), while a scan that only reads and hashes
        // goes 1.3 times as fast with it.
        self.read_ahead = !std::mem::take(&mut self.mapped_in_chunk);
    }

    /// The end of a scan batch: the reader stops (it reads no page while the scanner sleeps)
    /// and the pages read ahead are forgotten.
    pub(crate) fn end_batch(&mut self) {
        self.prefetch.cancel();
        self.ahead.clear();
    }

    /// Free the pages moved out to scratch, and release canonical pages nothing maps.
    pub(crate) fn flush_scratch(&mut self) {
        if self.scratch_used > 0 {
            let _ = sys::madvise(self.scratch, self.scratch_used * PAGE, libc::MADV_DONTNEED);
            self.scratch_used = 0;
        }
        self.release_store_pages();
    }

    /// Punch out canonical pages whose references are gone, once none of the pages that
    /// mapped them still maps the page-cache page (a woken writer may not have copied yet).
    fn release_store_pages(&mut self) {
        let mut st = self.sh.lock();
        let candidates: Vec<u32> = st
            .departed
            .keys()
            .copied()
            .filter(|k| !st.store_refs.contains_key(k))
            .collect();
        for k in candidates {
            if st.escaped.contains(&k) {
                st.departed.remove(&k);
                continue;
            }
            let addrs = &st.departed[&k];
            let still_mapped = addrs.iter().any(|&a| {
                sys::pagemap_entry(&self.sh.pagemap, a)
                    .map(|e| e & sys::PM_PRESENT != 0 && e & sys::PM_FILE != 0)
                    .unwrap_or(false)
                    && self
                        .sh
                        .categories(a)
                        .map(|c| c & PAGE_IS_FILE != 0)
                        .unwrap_or(false)
            });
            if !still_mapped && sys::punch_hole(&self.sh.store, k as u64 * PAGE, PAGE).is_ok() {
                st.departed.remove(&k);
                st.stats.store_pages_freed += 1;
            }
        }
    }

    /// The first present, non-zero, anonymous page in `[from, end)` of one region, from
    /// PAGEMAP_SCAN over a window of pages that is refreshed as the scan moves on (and when it
    /// starts over). Each answer is remembered as a range without such pages until the scan
    /// starts over, so that a stretch of merged pages (one mapping each, which PAGEMAP_SCAN
    /// walks one by one) is walked once per pass, not once per page in it.
    fn present_from(&mut self, mut from: u64, end: u64) -> Option<u64> {
        const WINDOW: u64 = 2048 * PAGE;
        if from < self.window_last {
            self.window = (0, 0, Vec::new());
            self.none = (0, 0);
        }
        self.window_last = from;
        let start = from;
        if self.none.0 <= from && from < self.none.1 {
            from = self.none.1;
        }
        let found = loop {
            if from >= end {
                break None;
            }
            let (ws, we) = (self.window.0, self.window.1);
            if !(ws <= from && from < we) {
                let wend = end.min(from + WINDOW);
                let ranges = sys::pagemap_scan(
                    &self.sh.pagemap,
                    from,
                    wend,
                    PAGE_IS_PRESENT,
                    PAGE_IS_PFNZERO | PAGE_IS_FILE,
                    PAGE_IS_PRESENT,
                )
                .unwrap_or_default();
                self.window = (
                    from,
                    wend,
                    ranges.iter().map(|r| (r.start, r.end)).collect(),
                );
            }
            let ranges = &self.window.2;
            let i = ranges.partition_point(|&(_, e)| e <= from);
            if let Some(&(s, _)) = ranges.get(i) {
                break Some(s.max(from));
            }
            from = self.window.1;
        };
        self.none = (start, found.unwrap_or(end));
        found
    }

    /// The hash of the ordinary page at `addr` from the pages read ahead. If `addr` is not
    /// among them, the window that starts there is taken from the reader thread (or read
    /// here if the reader was not asked for it), and the reader is asked for the next one: up
    /// to the end of the present run PAGEMAP_SCAN found, or the next run.
    fn hash_ahead(&mut self, addr: u64) -> Option<u64> {
        if addr & STORE_TAG != 0 {
            return None;
        }
        if !self.ahead.contains(addr) {
            let run_end = self.run_end(addr)?;
            match self.prefetch.take(addr) {
                Some(w) if w.contains(addr) => {
                    let old = std::mem::replace(&mut self.ahead, w);
                    self.prefetch.give_back(old);
                }
                other => {
                    if let Some(w) = other {
                        self.prefetch.give_back(w);
                    }
                    self.ahead.fill(addr, run_end);
                }
            }
            if !self.ahead.contains(addr) {
                return None;
            }
            while self.read_ahead && self.prefetch.wants_more() {
                let next = self.prefetch.asked_end().unwrap_or(self.ahead.end);
                let ranges = &self.window.2;
                let i = ranges.partition_point(|&(_, e)| e <= next);
                let Some(&(s, e)) = ranges.get(i) else { break };
                let s = s.max(next);
                self.prefetch.ask(s, e.min(s + WINDOW_PAGES * PAGE));
            }
        }
        Some(self.ahead.hash(addr))
    }

    /// The end of the present run (as PAGEMAP_SCAN last found) that `addr` is in.
    fn run_end(&self, addr: u64) -> Option<u64> {
        let ranges = &self.window.2;
        let i = ranges.partition_point(|&(_, e)| e <= addr);
        match ranges.get(i) {
            Some(&(s, e)) if s <= addr => Some(e),
            _ => None,
        }
    }

    /// Put a page back as it was after a failed transaction: unprotect, wake, state `Anon`.
    fn abort(&self, ri_addr: u64) {
        {
            let mut st = self.sh.lock();
            st.discarded.remove(&ri_addr);
            if let Some(ri) = st.region_at(ri_addr) {
                let i = st.regions[ri].idx(ri_addr);
                if st.regions[ri].pages.get(i) == PageState::InFlight {
                    st.regions[ri].pages.set(i, PageState::Anon);
                }
            }
        }
        self.sh.unwp(ri_addr, true);
        self.sh.wake(ri_addr);
    }

    /// Claim `addr` for a transaction if it is an ordinary page of a mergeable region of `mm`.
    fn claim(&self, mm: MmId, addr: u64) -> Result<(), MergeError> {
        let mut st = self.sh.lock();
        let Some((ri, i, PageState::Anon)) = st.page(mm, addr) else {
            return Err(MergeError::Gone);
        };
        if !st.regions[ri].mergeable {
            return Err(MergeError::Gone);
        }
        st.regions[ri].pages.set(i, PageState::InFlight);
        st.discarded.remove(&addr);
        Ok(())
    }

    /// What the application did to `addr` during the transaction, if anything (and forget it).
    fn take_discard(&self, addr: u64) -> Option<Discard> {
        self.sh.lock().discarded.remove(&addr)
    }

    /// A transaction gives up after moving the page out to `slot`: the contents go back where
    /// the page is now (where it was, or where the application moved it meanwhile), unless the
    /// application discarded or unmapped it. A destination that is no longer a registered hole
    /// refuses the move, which leaves nothing behind but scratch memory. The page must still
    /// be `InFlight`, so that a discard while the contents go back is recorded.
    fn put_back(&self, slot: u64, addr: u64) {
        let mut to = match self.take_discard(addr) {
            None => addr,
            Some(Discard::Moved(d)) => d,
            Some(Discard::Removed | Discard::Unmapped) => return,
        };
        let fd = self.sh.fd();
        // The application may move the page again while the contents go back (its event is
        // read while the move waits): follow it to where it is now.
        for _ in 0..8 {
            if self.sh.retrying(|| sys::uffd_move(fd, slot, to)).is_ok() {
                // A discard whose event was read before the contents came back may have
                // zapped the empty hole first: discard them now. Nothing the application did
                // after its discard is lost: its faults on the page wait for the wake.
                self.sh.settle_events();
                if let Some(Discard::Removed) = self.take_discard(addr) {
                    let _ = sys::madvise(to, PAGE, libc::MADV_DONTNEED);
                }
                return;
            }
            match self.take_discard(addr) {
                Some(Discard::Moved(d)) if d != to => to = d,
                _ => return,
            }
        }
    }

    /// Does `addr` map canonical page `k` (the same physical page as the store's view)?
    fn maps_canonical(&self, addr: u64, k: u32) -> bool {
        // Reading k through the view maps it there, so that it has a PFN to compare.
        let mut page = [0u8; PAGE_SIZE];
        if !self.sh.read_store(k, &mut page) {
            return false;
        }
        let pfn = |a: u64| {
            sys::pagemap_entry(&self.sh.pagemap, a)
                .ok()
                .filter(|e| e & sys::PM_PRESENT != 0)
                .map(|e| e & sys::PM_PFN_MASK)
        };
        match (pfn(addr), pfn(self.sh.store_view + k as u64 * PAGE)) {
            (Some(a), Some(b)) => a == b && a != 0,
            _ => false,
        }
    }

    /// A page of the scratch area that a move has just filled, read in place.
    fn scratch_page<'a>(slot: u64) -> &'a [u8; PAGE_SIZE] {
        // SAFETY: the scratch area is samepage's own private mapping, unknown to the
        // application, and stays mapped while samepage runs; the pages moved into it are not
        // pinned (the move refuses those) and nothing writes them until the scanner frees
        // them (flush_scratch), after every use of the reference.
        unsafe { sys::own_page(slot) }
    }

    /// Move the protected page at `addr` out to scratch (the pin check); on failure the page
    /// is released.
    fn move_out(&mut self, addr: u64) -> Result<u64, MergeError> {
        let slot = self.scratch_slot();
        let fd = self.sh.fd();
        let mut r = self.sh.retrying(|| sys::uffd_move(fd, addr, slot));
        if r.as_ref().is_err_and(|e| errno(e) == libc::EBUSY) {
            // A page a fork shared (even with a child that has exited since) is refused like
            // a pinned one. A write fault makes it the process's own again (reused, or
            // copied while the child lives) without changing a byte; then try once more.
            self.sh.unwp(addr, false);
            let _ = sys::madvise(addr, PAGE, libc::MADV_POPULATE_WRITE);
            r = self
                .sh
                .wp(addr)
                .and_then(|()| self.sh.retrying(|| sys::uffd_move(fd, addr, slot)));
        }
        if let Err(e) = r {
            self.abort(addr);
            return Err(match errno(&e) {
                libc::EBUSY => {
                    self.sh.lock().stats.pinned_skipped += 1;
                    MergeError::Pinned
                }
                _ => MergeError::Gone,
            });
        }
        Ok(slot)
    }

    /// [`Self::move_out`], then check the moved-out copy, which nobody can reach any more,
    /// against `expect`: a page written under the protection (by I/O that ignores it) goes
    /// back unchanged.
    fn move_out_checked(&mut self, addr: u64, expect: Expect) -> Result<u64, MergeError> {
        let slot = self.move_out(addr)?;
        let copy = Self::scratch_page(slot);
        let ok = match expect {
            Expect::Zero => samepage_engine::is_zero_page(copy),
            Expect::Same => self.buf[..] == copy[..],
        };
        if !ok {
            self.put_back(slot, addr);
            self.abort(addr);
            return Err(MergeError::Changed);
        }
        Ok(slot)
    }

    /// Place the zero pages merged in this chunk: runs of neighbouring pages go through each
    /// step of the protocol together (one protect, one move, one read, one zeropage, one
    /// protect, one PAGEMAP_SCAN and one wake per run).
    fn flush_zero(&mut self) {
        if self.pending_zero.is_empty() {
            return;
        }
        let mut pend = std::mem::take(&mut self.pending_zero);
        pend.sort_unstable_by_key(|&(_, a)| a);
        let mut i = 0;
        while i < pend.len() {
            let (mm, start) = pend[i];
            let mut j = i + 1;
            while j < pend.len()
                && pend[j] == (mm, pend[j - 1].1 + PAGE)
                && ((j - i) as u64) < ZERO_RUN_PAGES
            {
                j += 1;
            }
            self.place_zero_run(mm, start, (j - i) as u64);
            i = j;
        }
    }

    /// The zero-page protocol over `n` claimed pages from `start`. Whatever cannot go the
    /// batched way (a pinned page, a page written under the protection, a range split in
    /// several mappings) takes the one-page way or is left as it was.
    fn place_zero_run(&mut self, mm: MmId, start: u64, n: u64) {
        let fd = self.sh.fd();
        let end = start + n * PAGE;
        // Room for the run and for every page of it going the one-page way: the scratch area
        // must not be emptied while moved-out pages wait in it.
        if self.scratch_used + 2 * n > SCRATCH_PAGES {
            self.flush_scratch();
        }
        if self
            .sh
            .retrying(|| sys::uffd_wp_range(fd, start, n * PAGE, true, false))
            .is_err()
        {
            for k in 0..n {
                let _ = self.place_zero_claimed(mm, start + k * PAGE);
            }
            return;
        }
        // Move out as far as it goes; a page that refuses (pinned: EBUSY) takes the one-page
        // way, which skips it; a refusal of the whole range too.
        let slots = self.scratch_slots(n);
        let mut moved: Vec<(u64, u64)> = Vec::with_capacity(n as usize);
        let mut a = start;
        while a < end {
            let slot = slots + (a - start);
            let mut progress = 0;
            let r = self.sh.retrying(|| {
                let (m, r) =
                    sys::uffd_move_range(fd, a + progress, slot + progress, end - a - progress);
                progress += m;
                // Partial progress then EAGAIN: go on from where it stopped.
                r
            });
            for k in 0..progress / PAGE {
                moved.push((a + k * PAGE, slot + k * PAGE));
            }
            a += progress;
            if a < end {
                // Refused here (r says why): the one-page way decides (and counts a pin).
                drop(r);
                let _ = self.place_zero_claimed(mm, a);
                a += PAGE;
            }
        }
        // Check the moved-out copies, which nobody can reach: a page written under the
        // protection (by I/O that ignores it) goes back unchanged.
        let mut ok: Vec<u64> = Vec::with_capacity(moved.len());
        for &(addr, slot) in &moved {
            if samepage_engine::is_zero_page(Self::scratch_page(slot)) {
                ok.push(addr);
            } else {
                self.put_back(slot, addr);
                self.abort(addr);
            }
        }
        // The holes read as zeros meanwhile (faults wait); map the zero page there and
        // protect it again: the mark.
        let mut placed_try: Vec<u64> = Vec::with_capacity(ok.len());
        let mut r0 = 0;
        while r0 < ok.len() {
            let mut r1 = r0 + 1;
            while r1 < ok.len() && ok[r1] == ok[r1 - 1] + PAGE {
                r1 += 1;
            }
            let (s0, len) = (ok[r0], (r1 - r0) as u64 * PAGE);
            let mut done = 0;
            let _ = self.sh.retrying(|| {
                let (z, r) = sys::uffd_zeropage_range(fd, s0 + done, len - done, false);
                done += z;
                r
            });
            // A page the zeropage did not reach (unmapped or mapped meanwhile) is left as the
            // application left it: its contents were zeros.
            let _ = self
                .sh
                .retrying(|| sys::uffd_wp_range(fd, s0, len, true, false));
            placed_try.extend(ok[r0..r1].iter().copied());
            r0 = r1;
        }
        // Count what carries the mark now, under the lock that the fault handler takes to
        // uncount.
        let marked = sys::pagemap_scan(
            &self.sh.pagemap,
            start,
            end,
            PAGE_IS_PRESENT | PAGE_IS_PFNZERO,
            PAGE_IS_WRITTEN,
            PAGE_IS_PRESENT,
        )
        .unwrap_or_default();
        let is_marked = |a: u64| marked.iter().any(|r| r.start <= a && a < r.end);
        let mut unprotect = Vec::new();
        {
            let mut st = self.sh.lock();
            for &a in &placed_try {
                st.discarded.remove(&a);
                let Some((ri, i, PageState::InFlight)) = st.page(mm, a) else {
                    continue;
                };
                // Writers fault and wait for the wake below, so the scan still holds; a
                // discard meanwhile is reconciled like any discard.
                if is_marked(a) {
                    st.regions[ri].pages.set(i, PageState::Zero);
                    st.zero.map_zero_page(mm);
                } else {
                    st.regions[ri].pages.set(i, PageState::Anon);
                    unprotect.push(a);
                }
            }
        }
        for a in unprotect {
            self.sh.unwp(a, false);
        }
        let _ = sys::uffd_wake_range(fd, start, n * PAGE);
    }

    /// The zero-page protocol on one page the scanner has claimed.
    fn place_zero_claimed(&mut self, mm: MmId, addr: u64) -> Result<FrameId, MergeError> {
        if self.sh.wp(addr).is_err() {
            self.abort(addr);
            return Err(MergeError::Gone);
        }
        // The scan found it zero; the copy moved out is what counts.
        self.move_out_checked(addr, Expect::Zero)?;
        // addr is a hole now (moved out); the zero page reads like the zeros that were there.
        let fd = self.sh.fd();
        let _ = self.sh.retrying(|| sys::uffd_zeropage(fd, addr, false));
        let _ = self.sh.wp(addr);
        let placed = {
            let mut st = self.sh.lock();
            let placed = self.sh.is_marked_zero(addr);
            // A discard during the transaction leaves zeros, which is what is there; the
            // zap itself, if it comes after, is reconciled like any discard.
            st.discarded.remove(&addr);
            let (ri, i, _) = st.page(mm, addr).expect("claimed page stays in its region");
            if placed {
                st.regions[ri].pages.set(i, PageState::Zero);
                st.zero.map_zero_page(mm);
            } else {
                // Written between the zeropage and the protection: the writer's page now.
                st.regions[ri].pages.set(i, PageState::Anon);
            }
            placed
        };
        if !placed {
            self.sh.unwp(addr, false);
        }
        self.sh.wake(addr);
        if placed {
            Ok(FrameId(0))
        } else {
            Err(MergeError::Changed)
        }
    }

    /// Replace the page at `addr` (claimed, protected, moved out to `slot`, equal to canonical
    /// page `k`) by a mapping of `k`.
    fn map_canonical(
        &mut self,
        mm: MmId,
        addr: u64,
        k: u32,
        slot: u64,
    ) -> Result<FrameId, MergeError> {
        {
            let mut st = self.sh.lock();
            if st.discarded.contains_key(&addr) {
                // Discarded, unmapped or moved while it was out: map nothing there. A discard
                // leaves the hole reading zeros, as it must; a moved page gets its contents
                // back where it went.
                drop(st);
                self.put_back(slot, addr);
                self.abort(addr);
                return Err(MergeError::Gone);
            }
            // Hold a reference so k is not released while the mapping is being built.
            *st.store_refs.entry(k).or_insert(0) += 1;
            st.own_unmaps.insert(addr, false);
        }
        if let Err(e) = sys::mmap_fixed_file(addr, PAGE, self.sh.store.as_raw_fd(), k as u64 * PAGE)
        {
            // Nothing changed at addr (still the hole in the anonymous mapping): put it back.
            self.put_back(slot, addr);
            let mut st = self.sh.lock();
            st.own_unmaps.remove(&addr);
            st.drop_store_ref(k, addr);
            if errno(&e) == libc::ENOMEM {
                st.stats.budget_exhausted = true;
            }
            drop(st);
            self.abort(addr);
            return Err(MergeError::NoBudget);
        }
        // Register the new mapping, then map its page write-protected in one step: it has no
        // page yet, so UFFDIO_CONTINUE installs the page-cache page with samepage's
        // protection (minor faults then only come after the application discarded the page;
        // see handle_event). If an access in between mapped a page already (a read maps the
        // canonical page, a write copies it), protect it and look at what is there.
        let registered = self.sh.uffd.register_with_mode(
            addr as *mut libc::c_void,
            PAGE as usize,
            RegisterMode::WRITE_PROTECT | RegisterMode::MINOR,
        );
        let fd = self.sh.fd();
        let (protected, cats) = if registered.is_err() {
            (false, 0)
        } else if self
            .sh
            .retrying(|| sys::uffd_continue(fd, addr, false))
            .is_ok()
        {
            (true, PAGE_IS_PRESENT | PAGE_IS_FILE)
        } else {
            let protected = self.sh.wp(addr).is_ok();
            (protected, self.sh.categories(addr).unwrap_or(0))
        };
        self.sh.settle_events();
        // The mapping replaced the application's page if its UNMAP event came. If not, the
        // application had moved or unmapped the page first, and the event that says where it
        // went may not be queued yet (its system call runs on): wait for one or the other.
        for _ in 0..200 {
            {
                let st = self.sh.lock();
                if st.own_unmaps.get(&addr) == Some(&true) || st.discarded.contains_key(&addr) {
                    break;
                }
            }
            std::thread::sleep(Duration::from_micros(100));
            self.sh.settle_events();
        }
        self.sh.lock().own_unmaps.remove(&addr);
        let mut st = self.sh.lock();
        let (ri, i, _) = st.page(mm, addr).expect("claimed page stays in its region");
        if !protected {
            // The page maps k but samepage cannot see writes to it: leave k mapped for good.
            st.escaped.insert(k);
            st.drop_store_ref(k, addr);
            st.regions[ri].pages.set(i, PageState::Anon);
            drop(st);
            self.sh.wake(addr);
            return Err(MergeError::Gone);
        }
        if cats & PAGE_IS_PRESENT != 0 && cats & PAGE_IS_FILE == 0 {
            // Written (copied) in the moment between the mapping and its protection.
            st.drop_store_ref(k, addr);
            st.regions[ri].pages.set(i, PageState::Anon);
            drop(st);
            self.sh.unwp(addr, false);
            self.sh.wake(addr);
            return Err(MergeError::Changed);
        }
        match st.discarded.remove(&addr) {
            None => {}
            Some(Discard::Removed) => {
                // The application discarded the page during the transaction: it must read
                // zeros, not the canonical page. Discard the new mapping's page as well.
                st.drop_store_ref(k, addr);
                st.regions[ri].pages.set(i, PageState::Anon);
                drop(st);
                let _ = sys::madvise(addr, PAGE, libc::MADV_DONTNEED);
                self.sh.unwp(addr, false);
                self.sh.wake(addr);
                return Err(MergeError::Changed);
            }
            // Moved away and back again after the mapping was made: addr maps k, with the
            // right contents, but the move's event may yet take the protection off. Leave it
            // an ordinary page that happens to map k (which is then never released).
            Some(Discard::Moved(to)) if to == addr && self.maps_canonical(addr, k) => {
                st.escaped.insert(k);
                st.drop_store_ref(k, addr);
                st.regions[ri].pages.set(i, PageState::Anon);
                drop(st);
                self.sh.unwp(addr, false);
                self.sh.wake(addr);
                return Err(MergeError::Gone);
            }
            Some(Discard::Moved(to)) if to == addr => {
                // Back before the mapping was made, which the move then replaced: put the
                // contents back (the page stays in flight until they are).
                st.drop_store_ref(k, addr);
                drop(st);
                self.put_back(slot, addr);
                self.abort(addr);
                return Err(MergeError::Gone);
            }
            Some(d @ (Discard::Moved(_) | Discard::Unmapped)) => {
                // The application moved the page elsewhere or unmapped it while it was out. If
                // that came after the mapping, the mapping of k went with it (k must then
                // never be released) and the contents are safe; if it came before, the hole
                // went and the contents go where it is now. A mapping of k left at addr is
                // samepage's alone and stays: unmapping it could not be made atomic with the
                // check, and the application may move a page back to addr in between (the
                // stress test with moves crashed on exactly that).
                st.escaped.insert(k);
                st.drop_store_ref(k, addr);
                st.regions[ri].pages.set(i, PageState::Gone);
                drop(st);
                if let Discard::Moved(to) = d {
                    // Refused (harmlessly) where the mapping of k went instead of the hole.
                    let _ = self.sh.retrying(|| sys::uffd_move(fd, slot, to));
                }
                self.sh.wake(addr);
                return Err(MergeError::Gone);
            }
        }
        st.regions[ri].pages.set(i, PageState::Merged(k));
        drop(st);
        self.sh.wake(addr);
        Ok(store_frame(k))
    }

    /// Reserve room in the mapping budget for one merge, before any work is done for it.
    fn take_budget(&self) -> Result<(), MergeError> {
        if self
            .sh
            .budget
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            return Ok(());
        }
        let mut st = self.sh.lock();
        st.stats.budget_refused += 1;
        st.stats.budget_exhausted = true;
        Err(MergeError::NoBudget)
    }

    fn merge_into(&mut self, mm: MmId, addr: u64, k: u32) -> Result<FrameId, MergeError> {
        if !self.sh.lock().store_refs.contains_key(&k) {
            return Err(MergeError::Gone);
        }
        self.take_budget()?;
        self.claim(mm, addr)?;
        let readable = self.sh.read_store(k, &mut self.buf);
        if !readable || self.sh.wp(addr).is_err() {
            self.abort(addr);
            return Err(MergeError::Gone);
        }
        // The copy moved out, which nobody can change any more, is compared with k.
        let slot = self.move_out_checked(addr, Expect::Same)?;
        self.map_canonical(mm, addr, k, slot)
    }

    fn promote(&mut self, mm: MmId, addr: u64) -> Result<FrameId, MergeError> {
        self.take_budget()?;
        self.claim(mm, addr)?;
        if self.sh.wp(addr).is_err() {
            self.abort(addr);
            return Err(MergeError::Gone);
        }
        // What was moved out, which nobody can change any more, becomes canonical page k.
        let slot = self.move_out(addr)?;
        self.buf.copy_from_slice(Self::scratch_page(slot));
        let k = {
            let mut st = self.sh.lock();
            let k = st.next_offset;
            assert!(
                k < MAX_STORE_OFFSET,
                "fewer than {MAX_STORE_OFFSET} canonical pages"
            );
            st.next_offset = k + 1;
            k
        };
        if self.sh.ensure_store_size(k).is_err()
            || sys::pwrite_page(&self.sh.store, &self.buf, k as u64 * PAGE).is_err()
        {
            self.put_back(slot, addr);
            self.abort(addr);
            return Err(MergeError::NoBudget);
        }
        let r = self.map_canonical(mm, addr, k, slot);
        if r.is_err() {
            let _ = sys::punch_hole(&self.sh.store, k as u64 * PAGE, PAGE);
        }
        r
    }

    /// Unshare one page: a KSM-placed zero page or a merged page gets a private copy.
    fn unshare(&self, mm: MmId, addr: u64) {
        {
            let mut st = self.sh.lock();
            let Some((ri, i, s)) = st.page(mm, addr) else {
                return;
            };
            if !matches!(s, PageState::Zero | PageState::Merged(_)) {
                return;
            }
            st.forget_page(ri, i, PageState::Anon);
        }
        self.sh.unwp(addr, true);
        // FAULT_FLAG_UNSHARE's equivalent: a write fault that copies without writing.
        let _ = sys::madvise(addr, PAGE, libc::MADV_POPULATE_WRITE);
    }
}

/// A frame's contents, from the pages read ahead (`ahead`) when it is one of them.
fn read_frame_ahead(sh: &Shared, ahead: &Window, f: FrameId, buf: &mut [u8; PAGE_SIZE]) -> bool {
    let a = f.0;
    if a & STORE_TAG == 0 && ahead.contains(a) {
        buf.copy_from_slice(ahead.page(a));
        return true;
    }
    sh.read_frame(f, buf)
}

#[derive(Clone, Copy)]
enum Expect {
    Zero,
    Same,
}

impl Memory for LiveMemory {
    fn mm_exiting(&self, mm: MmId) -> bool {
        !self.sh.lock().mms.contains(&mm)
    }

    fn find_vma(&self, mm: MmId, addr: u64) -> Option<VmaInfo> {
        let st = self.sh.lock();
        st.regions
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
        let mut a = from;
        while a < end {
            // The first present, non-zero, anonymous page at or after a (or end).
            let p = self.present_from(a, end).unwrap_or(end);
            let st = self.sh.lock();
            let (ri, i, _) = st.page(mm, a)?;
            let r = &st.regions[ri];
            let last = r.idx(p.min(r.end() - PAGE));
            // Merged pages are KSM pages whether they are mapped in yet or not; ordinary pages
            // count only where PAGEMAP_SCAN saw one.
            for (j, s) in r.pages.range(i, last + 1).enumerate() {
                let q = a + j as u64 * PAGE;
                match s {
                    PageState::Merged(k) => {
                        let frame = store_frame(k);
                        return Some((
                            q,
                            PageRef {
                                frame,
                                ksm: true,
                                nid: 0,
                            },
                        ));
                    }
                    PageState::Anon if q == p => {
                        return Some((
                            q,
                            PageRef {
                                frame: FrameId(q),
                                ksm: false,
                                nid: 0,
                            },
                        ));
                    }
                    _ => {}
                }
            }
            a = p + PAGE;
        }
        None
    }

    fn get_page(&mut self, mm: MmId, addr: u64) -> Option<PageRef> {
        let s = {
            let st = self.sh.lock();
            let (ri, _, s) = st.page(mm, addr)?;
            if !st.regions[ri].mergeable {
                return None;
            }
            s
        };
        match s {
            PageState::Merged(k) => Some(PageRef {
                frame: store_frame(k),
                ksm: true,
                nid: 0,
            }),
            PageState::Anon => {
                let c = self.sh.categories(addr).ok()?;
                (c & PAGE_IS_PRESENT != 0 && c & PAGE_IS_PFNZERO == 0).then_some(PageRef {
                    frame: FrameId(addr),
                    ksm: false,
                    nid: 0,
                })
            }
            _ => None,
        }
    }

    fn page_hash(&mut self, frame: FrameId) -> u64 {
        if let Some(h) = self.hash_ahead(frame.0) {
            return h;
        }
        if !self.sh.read_frame(frame, &mut self.buf) {
            // Unreadable (unmapped meanwhile): a value no real page hashes to in practice,
            // so the page looks volatile and the next visit drops it.
            return frame.0 ^ 0x5eed_5eed_5eed_5eed;
        }
        page_hash(&self.buf[..])
    }

    fn pages_identical(&mut self, a: FrameId, b: FrameId) -> bool {
        if a == b {
            return true;
        }
        read_frame_ahead(&self.sh, &self.ahead, a, &mut self.buf)
            && read_frame_ahead(&self.sh, &self.ahead, b, &mut self.buf2)
            && self.buf[..] == self.buf2[..]
    }

    fn ksm_page_alive(&self, frame: FrameId) -> bool {
        frame.0 & STORE_TAG != 0
            && self
                .sh
                .lock()
                .store_refs
                .contains_key(&((frame.0 & !STORE_TAG) as u32))
    }

    fn merge(
        &mut self,
        mm: MmId,
        addr: u64,
        page: FrameId,
        into: MergeInto,
    ) -> Result<FrameId, MergeError> {
        if page.0 != addr {
            // Only ordinary pages (named by their address) are merged; a canonical page is
            // already shared.
            return Err(MergeError::Gone);
        }
        match into {
            MergeInto::ZeroPage => {
                // Placed with its neighbours when the chunk ends, before the engine lock is
                // released: nobody sees the page half-way.
                self.claim(mm, addr)?;
                self.pending_zero.push((mm, addr));
                Ok(FrameId(0))
            }
            MergeInto::Promote => {
                self.mapped_in_chunk = true;
                self.promote(mm, addr)
            }
            MergeInto::KsmPage(k) if k.0 & STORE_TAG != 0 => {
                self.mapped_in_chunk = true;
                self.merge_into(mm, addr, (k.0 & !STORE_TAG) as u32)
            }
            MergeInto::KsmPage(_) => Err(MergeError::Gone),
        }
    }

    fn break_ksm(&mut self, mm: MmId, start: u64, end: u64) -> Result<(), UnmergeError> {
        self.flush_zero();
        let targets: Vec<u64> = {
            let st = self.sh.lock();
            st.regions
                .iter()
                .filter(|r| r.mm == mm && r.start < end && r.end() > start)
                .flat_map(|r| {
                    r.pages.iter().enumerate().filter_map(move |(i, s)| {
                        let a = r.start + i as u64 * PAGE;
                        (a >= start
                            && a < end
                            && matches!(s, PageState::Zero | PageState::Merged(_)))
                        .then_some(a)
                    })
                })
                .collect()
        };
        for a in targets {
            self.unshare(mm, a);
        }
        Ok(())
    }

    fn set_mergeable(&mut self, mm: MmId, start: u64, end: u64, on: bool) {
        let mut st = self.sh.lock();
        split_regions(&mut st, start);
        split_regions(&mut st, end);
        for r in st.regions.iter_mut() {
            if r.mm == mm && r.start >= start && r.end() <= end {
                r.mergeable = on;
            }
        }
    }

    fn ksm_zero_pages(&self, mm: Option<MmId>) -> i64 {
        self.sh.reconcile();
        let st = self.sh.lock();
        match mm {
            None => st.zero.global(),
            Some(m) => st.zero.mm(m),
        }
    }
}

/// Split the region straddling `addr` so that a flag can change on one side only.
fn split_regions(st: &mut State, addr: u64) {
    if let Some(ri) = st.region_at(addr) {
        let r = &mut st.regions[ri];
        if r.start < addr {
            let at = r.idx(addr);
            let tail = Region {
                mm: r.mm,
                start: addr,
                pages: r.pages.split_off(at),
                mergeable: r.mergeable,
                owned: r.owned,
                registered: r.registered,
            };
            st.regions.insert(ri + 1, tail);
        }
    }
}

/// What resolves a fault, done after the state lock is released.
#[derive(Clone, Copy, Debug)]
enum Resolve {
    /// Take the write protection off and wake (the write becomes a copy-on-write).
    Unprotect(u64),
    /// Map zeros and wake.
    Zero(u64),
    /// Map the page-cache page of a merged page, write-protected, and wake.
    Continue(u64),
    /// Just wake (the scanner's transaction owns the page and wakes it itself otherwise).
    Nothing,
}

/// The handler thread: resolves faults and follows the application's discards, unmaps and
/// moves. It never maps, unmaps or discards memory itself (it would wait for its own events),
/// and it never waits for an ioctl: one that answers EAGAIN (an event is pending) is retried
/// after the pending events are read.
pub(crate) fn handle_events(sh: Arc<Shared>) {
    let fd = sh.uffd.as_raw_fd();
    let mut retry: Vec<Resolve> = Vec::new();
    while !sh.stop.load(Ordering::Acquire) {
        let timeout = if retry.is_empty() { 50 } else { 1 };
        if sys::poll_readable(fd, timeout).is_err() {
            break;
        }
        {
            let _handling = sh.events.lock().unwrap_or_else(|e| e.into_inner());
            while let Ok(Some(ev)) = sh.uffd.read_event() {
                handle_event(&sh, ev, &mut retry);
            }
        }
        retry.retain(|&r| !resolve(&sh, recheck(&sh, r)));
    }
}

/// A resolution put off (EAGAIN: the application was changing its mappings) is decided again,
/// since events handled meanwhile may have changed the page: a merged page the application
/// discarded in between must read zeros, not its canonical page.
fn recheck(sh: &Shared, r: Resolve) -> Resolve {
    let Resolve::Continue(a) = r else {
        return r;
    };
    let st = sh.lock();
    let merged = st.region_at(a).is_some_and(|ri| {
        let reg = &st.regions[ri];
        matches!(reg.pages.get(reg.idx(a)), PageState::Merged(_))
    });
    if merged {
        r
    } else {
        Resolve::Zero(a)
    }
}

/// Carry out a resolution; false if it must be tried again (EAGAIN).
fn resolve(sh: &Shared, r: Resolve) -> bool {
    let again = |e: &io::Error| errno(e) == libc::EAGAIN;
    match r {
        Resolve::Nothing => true,
        Resolve::Unprotect(a) => match sys::uffd_wp(sh.fd(), a, false, true) {
            Err(e) if again(&e) => false,
            Err(_) => {
                sh.wake(a);
                true
            }
            Ok(()) => true,
        },
        Resolve::Continue(a) => match sys::uffd_continue_wp(sh.fd(), a) {
            Err(e) if again(&e) => false,
            Err(_) => {
                sh.wake(a);
                true
            }
            Ok(()) => true,
        },
        Resolve::Zero(a) => {
            static ZEROS: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
            // A discard may have left a write-protect marker where zeros must go.
            if let Err(e) = sys::uffd_wp(sh.fd(), a, false, false) {
                if again(&e) {
                    return false;
                }
            }
            match sys::uffd_zeropage(sh.fd(), a, true) {
                Ok(()) => true,
                Err(e) if again(&e) => false,
                Err(_) => match sys::uffd_copy(sh.fd(), &ZEROS, a) {
                    Ok(()) => true,
                    Err(e) if again(&e) => false,
                    Err(_) => {
                        // Mapped by now (another thread won the race): let it retry.
                        sh.wake(a);
                        true
                    }
                },
            }
        }
    }
}

fn handle_event(sh: &Shared, ev: Event, todo: &mut Vec<Resolve>) {
    let r = match ev {
        Event::Pagefault {
            kind,
            addr,
            thread_id,
            ..
        } => {
            let a = addr as u64 & !(PAGE - 1);
            let mut st = sh.lock();
            let at = st.region_at(a).map(|ri| (ri, st.regions[ri].idx(a)));
            let s = at.map(|(ri, i)| st.regions[ri].pages.get(i));
            let by_scanner = thread_id.as_raw() == sh.scanner_tid.load(Ordering::Relaxed);
            if s == Some(PageState::InFlight) && !by_scanner {
                // The scanner's transaction wakes it when done.
                return;
            }
            match kind {
                FaultKind::WriteProtected => {
                    if let (Some((ri, i)), Some(s)) = (at, s) {
                        match s {
                            PageState::Zero => st.stats.cow_zero += 1,
                            PageState::Merged(_) => st.stats.cow_merged += 1,
                            _ => {}
                        }
                        // The write goes ahead as a copy-on-write: uncount first.
                        st.forget_page(ri, i, PageState::Anon);
                    }
                    Resolve::Unprotect(a)
                }
                // A page of a merged mapping that is not mapped in reads its canonical page;
                // after the application discarded it (MADV_DONTNEED) it must read zeros, as
                // anonymous memory does. The scanner reading a page discarded under its
                // transaction reads zeros too.
                FaultKind::Minor
                    if s.is_some_and(|s| matches!(s, PageState::Merged(_))) && !by_scanner =>
                {
                    Resolve::Continue(a)
                }
                FaultKind::Minor => Resolve::Zero(a),
                FaultKind::Missing => {
                    // A hole the application touched: an ordinary zero page, as without
                    // samepage.
                    st.stats.missing_faults += 1;
                    Resolve::Zero(a)
                }
            }
        }
        Event::Remove { start, end } => {
            let mut st = sh.lock();
            let (s, e) = (start as u64, end as u64);
            let mut touched = false;
            let mut a = s;
            while a < e {
                if let Some(ri) = st.region_at(a) {
                    touched = true;
                    let i = st.regions[ri].idx(a);
                    // A discarded merged page stops mapping its canonical page; its next
                    // access is a minor fault that maps zeros.
                    match st.regions[ri].pages.get(i) {
                        PageState::Merged(_) => st.forget_page(ri, i, PageState::Anon),
                        PageState::InFlight => {
                            st.discarded.insert(a, Discard::Removed);
                        }
                        _ => {}
                    }
                }
                a += PAGE;
            }
            if touched {
                st.dirty.push((s, e, Instant::now()));
            }
            Resolve::Nothing
        }
        Event::Unmap { start, end } => {
            let mut st = sh.lock();
            let (mut a, e) = (start as u64, end as u64);
            while a < e {
                // The scanner's own MAP_FIXED over a page it owns is not an unmap.
                let own = match st.own_unmaps.get_mut(&a) {
                    Some(seen @ false) => {
                        *seen = true;
                        true
                    }
                    _ => false,
                };
                if !own {
                    if let Some(ri) = st.region_at(a) {
                        let i = st.regions[ri].idx(a);
                        if st.regions[ri].pages.get(i) == PageState::InFlight {
                            st.discarded.insert(a, Discard::Unmapped);
                        } else {
                            st.forget_page(ri, i, PageState::Gone);
                        }
                    }
                }
                a += PAGE;
            }
            Resolve::Nothing
        }
        Event::Remap { from, to, len } => {
            let mut st = sh.lock();
            let (from, to, len) = (from as u64, to as u64, len as u64);
            let mut off = 0;
            while off < len {
                let (src, dst) = (from + off, to + off);
                let into = st.region_at(dst);
                match st.region_at(src) {
                    Some(ri)
                        if st.regions[ri].pages.get(st.regions[ri].idx(src))
                            == PageState::InFlight =>
                    {
                        // Moved away under the scanner's transaction: it must map nothing there.
                        st.discarded.insert(src, Discard::Moved(dst));
                    }
                    Some(ri) => {
                        let i = st.regions[ri].idx(src);
                        let s = st.regions[ri].pages.get(i);
                        match into {
                            Some(rj) if st.regions[rj].mm == st.regions[ri].mm => {
                                // Moved within samepage's regions: it stays what it is.
                                let j = st.regions[rj].idx(dst);
                                st.forget_page(rj, j, PageState::Gone);
                                st.regions[rj].pages.set(j, s);
                                st.regions[ri].pages.set(i, PageState::Gone);
                            }
                            _ => {
                                // Moved out of samepage's sight: its mark comes off (so it is
                                // not a KSM-placed zero page any more), it is uncounted, and a
                                // canonical page it maps is never released.
                                if let PageState::Merged(k) = s {
                                    st.escaped.insert(k);
                                }
                                if matches!(s, PageState::Zero | PageState::Merged(_)) {
                                    todo.push(Resolve::Unprotect(dst));
                                }
                                st.forget_page(ri, i, PageState::Gone);
                            }
                        }
                    }
                    None => {
                        // Moved in from outside: an ordinary page of the application.
                        if let Some(rj) = into {
                            let j = st.regions[rj].idx(dst);
                            if st.regions[rj].pages.get(j) == PageState::InFlight {
                                // Moved back under the scanner's transaction.
                                st.discarded.insert(dst, Discard::Moved(dst));
                            } else {
                                st.forget_page(rj, j, PageState::Anon);
                            }
                            // Whatever protection it carries in is not samepage's mark.
                            todo.push(Resolve::Unprotect(dst));
                        }
                    }
                }
                off += PAGE;
            }
            Resolve::Nothing
        }
        Event::Fork { .. } => Resolve::Nothing,
    };
    todo.push(r);
}

/// Snapshot of the live statistics.
pub(crate) fn stats(sh: &Shared) -> LiveStats {
    sh.lock().stats
}
