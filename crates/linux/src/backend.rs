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

use crate::state::{LiveStats, PageState, Region, State};
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
const SCRATCH_PAGES: u64 = 256;
/// The store file grows in steps of this many pages.
const STORE_GROW_PAGES: u64 = 1 << 16;

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
        })
    }

    /// Room for one more merge (which adds at most two mappings)?
    fn take(&mut self) -> bool {
        if self.baseline + self.added + 2 <= self.limit {
            self.added += 2;
            return true;
        }
        // The estimate assumed no mapping ever coalesced; count for real.
        if let Ok(n) = count_maps() {
            self.baseline = n;
            self.added = 0;
        }
        if self.baseline + 2 <= self.limit {
            self.added += 2;
            true
        } else {
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
    store_size_pages: Mutex<u64>,
    pub pagemap: File,
    pub budget: Mutex<Budget>,
    pub stop: AtomicBool,
}

impl Shared {
    pub fn new(uffd: Uffd) -> io::Result<Self> {
        Ok(Self {
            uffd,
            state: Mutex::new(State::default()),
            store: sys::memfd_create("samepage-canonical")?,
            store_size_pages: Mutex::new(0),
            pagemap: File::open("/proc/self/pagemap")?,
            budget: Mutex::new(Budget::new()?),
            stop: AtomicBool::new(false),
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
        let new = (k as u64 / STORE_GROW_PAGES + 1) * STORE_GROW_PAGES;
        sys::ftruncate(&self.store, new * PAGE)?;
        *size = new;
        Ok(())
    }

    fn wp(&self, addr: u64) -> io::Result<()> {
        self.uffd
            .write_protect(addr as *mut libc::c_void, PAGE as usize)
            .map_err(uffd_err)
    }

    fn unwp(&self, addr: u64, wake: bool) {
        // Fails only if the range is no longer registered (unmapped): nothing to unprotect.
        let _ = self
            .uffd
            .remove_write_protection(addr as *mut libc::c_void, PAGE as usize, wake);
    }

    pub fn wake(&self, addr: u64) {
        let _ = self.uffd.wake(addr as *mut libc::c_void, PAGE as usize);
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
            sys::pread_page(&self.store, buf, (f.0 & !STORE_TAG) * PAGE).is_ok()
        } else {
            self.read_user(f.0, buf)
        }
    }

    /// Recheck zero pages in ranges the application discarded: the count is exact once the
    /// discards have completed.
    pub fn reconcile(&self) {
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
                    if st.regions[ri].pages[i] == PageState::Zero && !self.is_marked_zero(a) {
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
            sh,
            scratch,
            scratch_used: 0,
            buf: Box::new([0; PAGE_SIZE]),
            buf2: Box::new([0; PAGE_SIZE]),
            window: (0, 0, Vec::new()),
            window_last: 0,
        })
    }

    /// A free scratch slot; empties the scratch area when it is full (never under the lock).
    fn scratch_slot(&mut self) -> u64 {
        if self.scratch_used == SCRATCH_PAGES {
            self.flush_scratch();
        }
        let s = self.scratch + self.scratch_used * PAGE;
        self.scratch_used += 1;
        s
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
    /// starts over).
    fn present_from(&mut self, mut from: u64, end: u64) -> Option<u64> {
        const WINDOW: u64 = 2048 * PAGE;
        loop {
            if from >= end {
                return None;
            }
            let (ws, we) = (self.window.0, self.window.1);
            if !(ws <= from && from < we) || from < self.window_last {
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
            self.window_last = from;
            if let Some(&(s, _)) = self.window.2.iter().find(|&&(_, e)| e > from) {
                return Some(s.max(from));
            }
            from = self.window.1;
        }
    }

    /// Put a page back as it was after a failed transaction: unprotect, wake, state `Anon`.
    fn abort(&self, ri_addr: u64) {
        let mut st = self.sh.lock();
        if let Some(ri) = st.region_at(ri_addr) {
            let i = st.regions[ri].idx(ri_addr);
            if st.regions[ri].pages[i] == PageState::InFlight {
                st.regions[ri].pages[i] = PageState::Anon;
            }
        }
        self.sh.unwp(ri_addr, true);
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
        st.regions[ri].pages[i] = PageState::InFlight;
        Ok(())
    }

    /// Move the protected page at `addr` out to scratch (the pin check), and check the
    /// moved-out copy against `expect`; on failure the page is put back and released.
    fn move_out_checked(&mut self, addr: u64, expect: Expect) -> Result<u64, MergeError> {
        let slot = self.scratch_slot();
        if let Err(e) = sys::uffd_move(self.sh.uffd.as_raw_fd(), addr, slot) {
            self.abort(addr);
            return Err(match errno(&e) {
                libc::EBUSY => {
                    self.sh.lock().stats.pinned_skipped += 1;
                    MergeError::Pinned
                }
                _ => MergeError::Gone,
            });
        }
        let ok = self.sh.read_user(slot, &mut self.buf2)
            && match expect {
                Expect::Zero => samepage_engine::is_zero_page(&self.buf2[..]),
                Expect::Same => self.buf[..] == self.buf2[..],
            };
        if !ok {
            // Somebody wrote it (I/O that ignores write protection): put it back unchanged.
            let _ = sys::uffd_move(self.sh.uffd.as_raw_fd(), slot, addr);
            self.abort(addr);
            return Err(MergeError::Changed);
        }
        Ok(slot)
    }

    fn place_zero_page(&mut self, mm: MmId, addr: u64) -> Result<FrameId, MergeError> {
        self.claim(mm, addr)?;
        if self.sh.wp(addr).is_err() {
            self.abort(addr);
            return Err(MergeError::Gone);
        }
        if !self.sh.read_user(addr, &mut self.buf) || !samepage_engine::is_zero_page(&self.buf[..])
        {
            self.abort(addr);
            return Err(MergeError::Changed);
        }
        self.move_out_checked(addr, Expect::Zero)?;
        // SAFETY: addr is a hole (moved out) in a region registered with this userfaultfd;
        // the zero page it maps reads exactly like the zeros that were there.
        let _ = unsafe {
            self.sh
                .uffd
                .zeropage(addr as *mut libc::c_void, PAGE as usize, false)
        };
        let mut st = self.sh.lock();
        let _ = self.sh.wp(addr);
        let placed = self.sh.is_marked_zero(addr);
        let (ri, i, _) = st.page(mm, addr).expect("claimed page stays in its region");
        if placed {
            st.regions[ri].pages[i] = PageState::Zero;
            st.zero.map_zero_page(mm);
        } else {
            // Written between the zeropage and the protection: it is the writer's page now.
            st.regions[ri].pages[i] = PageState::Anon;
            self.sh.unwp(addr, false);
        }
        drop(st);
        self.sh.wake(addr);
        if placed {
            Ok(FrameId(0))
        } else {
            Err(MergeError::Changed)
        }
    }

    /// Replace the page at `addr` (claimed, protected, equal to `self.buf`) by canonical page
    /// `k`.
    fn map_canonical(&mut self, mm: MmId, addr: u64, k: u32) -> Result<FrameId, MergeError> {
        if !self
            .sh
            .budget
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let mut st = self.sh.lock();
            st.stats.budget_refused += 1;
            st.stats.budget_exhausted = true;
            drop(st);
            self.abort(addr);
            return Err(MergeError::NoBudget);
        }
        let slot = self.move_out_checked(addr, Expect::Same)?;
        {
            // Hold a reference so k is not released while the mapping is being built.
            let mut st = self.sh.lock();
            *st.store_refs.entry(k).or_insert(0) += 1;
            st.own_unmaps.insert(addr);
        }
        if let Err(e) = sys::mmap_fixed_file(addr, PAGE, self.sh.store.as_raw_fd(), k as u64 * PAGE)
        {
            // Nothing changed at addr (still the hole in the anonymous mapping): put it back.
            let _ = sys::uffd_move(self.sh.uffd.as_raw_fd(), slot, addr);
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
        // Map the page in before the mapping is registered, so that reads never fault; minor
        // faults then only come after the application discarded the page (see handle_event).
        let _ = sys::madvise(addr, PAGE, libc::MADV_POPULATE_READ);
        let registered = self.sh.uffd.register_with_mode(
            addr as *mut libc::c_void,
            PAGE as usize,
            RegisterMode::WRITE_PROTECT | RegisterMode::MINOR,
        );
        let mut st = self.sh.lock();
        let (ri, i, _) = st.page(mm, addr).expect("claimed page stays in its region");
        if registered.is_err() || self.sh.wp(addr).is_err() {
            // The page maps k but samepage cannot see writes to it: leave k mapped for good.
            st.escaped.insert(k);
            st.drop_store_ref(k, addr);
            st.regions[ri].pages[i] = PageState::Anon;
            drop(st);
            self.sh.wake(addr);
            return Err(MergeError::Gone);
        }
        let cats = self.sh.categories(addr).unwrap_or(0);
        if cats & PAGE_IS_PRESENT != 0 && cats & PAGE_IS_FILE == 0 {
            // Written (copied) in the moment between the mapping and its protection.
            st.drop_store_ref(k, addr);
            st.regions[ri].pages[i] = PageState::Anon;
            self.sh.unwp(addr, false);
            drop(st);
            self.sh.wake(addr);
            return Err(MergeError::Changed);
        }
        st.regions[ri].pages[i] = PageState::Merged(k);
        drop(st);
        self.sh.wake(addr);
        Ok(store_frame(k))
    }

    fn merge_into(&mut self, mm: MmId, addr: u64, k: u32) -> Result<FrameId, MergeError> {
        if !self.sh.lock().store_refs.contains_key(&k) {
            return Err(MergeError::Gone);
        }
        self.claim(mm, addr)?;
        if self.sh.wp(addr).is_err() {
            self.abort(addr);
            return Err(MergeError::Gone);
        }
        let same = self.sh.read_user(addr, &mut self.buf)
            && sys::pread_page(&self.sh.store, &mut self.buf2, k as u64 * PAGE).is_ok()
            && self.buf[..] == self.buf2[..];
        if !same {
            self.abort(addr);
            return Err(MergeError::Changed);
        }
        self.map_canonical(mm, addr, k)
    }

    fn promote(&mut self, mm: MmId, addr: u64) -> Result<FrameId, MergeError> {
        self.claim(mm, addr)?;
        if self.sh.wp(addr).is_err() || !self.sh.read_user(addr, &mut self.buf) {
            self.abort(addr);
            return Err(MergeError::Gone);
        }
        let k = {
            let mut st = self.sh.lock();
            let k = st.next_offset;
            st.next_offset = k.checked_add(1).expect("fewer than 2^32 canonical pages");
            k
        };
        if self.sh.ensure_store_size(k).is_err()
            || sys::pwrite_page(&self.sh.store, &self.buf, k as u64 * PAGE).is_err()
        {
            self.abort(addr);
            return Err(MergeError::NoBudget);
        }
        let r = self.map_canonical(mm, addr, k);
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
            self.sh.unwp(addr, true);
        }
        // FAULT_FLAG_UNSHARE's equivalent: a write fault that copies without writing.
        let _ = sys::madvise(addr, PAGE, libc::MADV_POPULATE_WRITE);
    }
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
            for (j, s) in r.pages[i..=last].iter().enumerate() {
                let q = a + j as u64 * PAGE;
                match *s {
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
        let (mut x, mut y) = (
            std::mem::replace(&mut self.buf, Box::new([0; PAGE_SIZE])),
            std::mem::replace(&mut self.buf2, Box::new([0; PAGE_SIZE])),
        );
        let same = self.sh.read_frame(a, &mut x) && self.sh.read_frame(b, &mut y) && x[..] == y[..];
        self.buf = x;
        self.buf2 = y;
        same
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
            MergeInto::ZeroPage => self.place_zero_page(mm, addr),
            MergeInto::Promote => self.promote(mm, addr),
            MergeInto::KsmPage(k) if k.0 & STORE_TAG != 0 => {
                self.merge_into(mm, addr, (k.0 & !STORE_TAG) as u32)
            }
            MergeInto::KsmPage(_) => Err(MergeError::Gone),
        }
    }

    fn break_ksm(&mut self, mm: MmId, start: u64, end: u64) -> Result<(), UnmergeError> {
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
                owned: false,
            };
            st.regions.insert(ri + 1, tail);
        }
    }
}

/// The handler thread: resolves faults and follows the application's discards, unmaps and
/// moves. It never maps, unmaps or discards memory itself (it would wait for its own events).
pub(crate) fn handle_events(sh: Arc<Shared>) {
    let fd = sh.uffd.as_raw_fd();
    while !sh.stop.load(Ordering::Acquire) {
        match sys::poll_readable(fd, 50) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(_) => break,
        }
        loop {
            let ev = match sh.uffd.read_event() {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                Err(_) => break,
            };
            handle_event(&sh, ev);
        }
    }
}

fn handle_event(sh: &Shared, ev: Event) {
    match ev {
        Event::Pagefault { kind, addr, .. } => {
            let a = addr as u64 & !(PAGE - 1);
            let mut st = sh.lock();
            let at = st.region_at(a).map(|ri| (ri, st.regions[ri].idx(a)));
            let s = at.map(|(ri, i)| st.regions[ri].pages[i]);
            if s == Some(PageState::InFlight) {
                // The scanner's transaction wakes it when done.
                return;
            }
            match kind {
                FaultKind::Minor => {
                    // A page of a merged mapping that is not mapped in: after the application
                    // discarded it (MADV_DONTNEED), it must read zeros as anonymous memory
                    // does, not the canonical page.
                    match s {
                        Some(PageState::Merged(_)) => {
                            if sys::uffd_continue_wp(sh.uffd.as_raw_fd(), a).is_err() {
                                sh.wake(a);
                            }
                        }
                        _ => fill_zero(sh, a),
                    }
                }
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
                    sh.unwp(a, true);
                }
                _ => {
                    st.stats.missing_faults += 1;
                    // A hole the application touched: an ordinary zero page, as without
                    // samepage.
                    // SAFETY: a hole in a range registered with this userfaultfd.
                    let r = unsafe {
                        sh.uffd
                            .zeropage(a as *mut libc::c_void, PAGE as usize, true)
                    };
                    if r.is_err() {
                        sh.wake(a);
                    }
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
                    if let PageState::Merged(_) = st.regions[ri].pages[i] {
                        st.forget_page(ri, i, PageState::Anon);
                    }
                }
                a += PAGE;
            }
            if touched {
                st.dirty.push((s, e, Instant::now()));
            }
        }
        Event::Unmap { start, end } => {
            let mut st = sh.lock();
            let (mut a, e) = (start as u64, end as u64);
            while a < e {
                // The scanner's own MAP_FIXED over a page it owns is not an unmap.
                if !st.own_unmaps.remove(&a) {
                    if let Some(ri) = st.region_at(a) {
                        let i = st.regions[ri].idx(a);
                        if st.regions[ri].pages[i] != PageState::InFlight {
                            st.forget_page(ri, i, PageState::Gone);
                        }
                    }
                }
                a += PAGE;
            }
        }
        Event::Remap { from, to, len } => {
            let mut st = sh.lock();
            let (from, to, len) = (from as u64, to as u64, len as u64);
            let mut off = 0;
            while off < len {
                let (src, dst) = (from + off, to + off);
                if let Some(ri) = st.region_at(src) {
                    let i = st.regions[ri].idx(src);
                    let s = st.regions[ri].pages[i];
                    match st.region_at(dst) {
                        Some(rj) if st.regions[rj].mm == st.regions[ri].mm => {
                            // Moved within samepage's regions: the page keeps what it is.
                            let j = st.regions[rj].idx(dst);
                            st.forget_page(rj, j, PageState::Gone);
                            st.regions[rj].pages[j] = s;
                            st.regions[ri].pages[i] = PageState::Gone;
                        }
                        _ => {
                            // Moved out of samepage's sight: it is not counted any more, and a
                            // canonical page it maps is never released.
                            if let PageState::Merged(k) = s {
                                st.escaped.insert(k);
                            }
                            st.forget_page(ri, i, PageState::Gone);
                        }
                    }
                }
                off += PAGE;
            }
        }
        Event::Fork { .. } => {}
    }
}

/// Resolve a fault on an unmapped page that must read zeros: map the zero page (after
/// clearing a write-protect marker a discard may have left), or a zeroed page if the zero page
/// cannot go there; then wake the faulting thread.
fn fill_zero(sh: &Shared, a: u64) {
    static ZEROS: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
    sh.unwp(a, false);
    // SAFETY: `a` is an unmapped page of a private mapping registered with this userfaultfd;
    // it must read zeros, which is what the zero page holds.
    if unsafe {
        sh.uffd
            .zeropage(a as *mut libc::c_void, PAGE as usize, true)
    }
    .is_ok()
    {
        return;
    }
    // SAFETY: as above; the source is a static page of zeros.
    let copied = unsafe {
        sh.uffd.copy(
            ZEROS.as_ptr() as *const libc::c_void,
            a as *mut libc::c_void,
            PAGE as usize,
            true,
        )
    };
    if copied.is_err() {
        // Mapped by now (another thread won the race): let the faulting thread retry.
        sh.wake(a);
    }
}

/// Snapshot of the live statistics.
pub(crate) fn stats(sh: &Shared) -> LiveStats {
    sh.lock().stats
}
