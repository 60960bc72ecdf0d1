//! Reading pages ahead of the scan on a second core: while the scanning thread hashes and
//! indexes one window of 64 pages, a helper thread reads the next two with
//! `process_vm_readv`. The copy out of the application's pages is most of what a scan of
//! ordinary pages costs; XXH64 and the engine's work are the rest, so the two overlap well
//! (an all-unique 1 GiB scan: about 1.3 times as fast). Hashes are computed where they are
//! used, on the scanning thread: splitting the hashing between the threads gained nothing.
//! The helper runs at `SCHED_IDLE`, and only while the scan merges nothing (see
//! `LiveMemory::end_chunk`).
//!
//! A window is a snapshot: a page the application changes after it was read hashes as it was,
//! as if the scan had come by a moment earlier. Merges compare the contents again under write
//! protection, so a stale window can cost a failed merge, never data.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use samepage_engine::{page_hash, PAGE_SIZE};

use crate::sys::{self, PAGE};

/// Pages in one window.
pub(crate) const WINDOW_PAGES: u64 = 64;

/// Windows asked for ahead of the one in use: two keep the reader busy while the scanner
/// hashes, without reading far ahead of the scan.
const DEPTH: usize = 2;

/// A hash not computed yet (a page hashing to this value is merely hashed again).
const NOT_HASHED: u64 = u64::MAX;

/// Pages `[start, end)` of process `pid` as read at one moment, and their hashes (computed
/// on first use).
pub(crate) struct Window {
    /// The process read (0: this one).
    pub pid: u32,
    pub start: u64,
    pub end: u64,
    bytes: Vec<u8>,
    hashes: Vec<u64>,
}

impl Window {
    pub fn new() -> Self {
        // Touch the buffer now: samepage's own memory shows in the process's RSS when it
        // starts, not as it scans, and the first read pays no page faults.
        let mut bytes = vec![0u8; WINDOW_PAGES as usize * PAGE_SIZE];
        for p in bytes.chunks_mut(PAGE_SIZE) {
            p[0] = 1;
        }
        Self {
            pid: 0,
            start: 0,
            end: 0,
            bytes,
            hashes: Vec::with_capacity(WINDOW_PAGES as usize),
        }
    }

    pub fn contains(&self, pid: u32, addr: u64) -> bool {
        self.pid == pid && self.start <= addr && addr + PAGE <= self.end
    }

    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// The bytes of the page at `addr` (which the window contains).
    pub fn page(&self, addr: u64) -> &[u8] {
        let off = (addr - self.start) as usize;
        &self.bytes[off..off + PAGE_SIZE]
    }

    /// The hash of the page at `addr` (which the window contains).
    pub fn hash(&mut self, addr: u64) -> u64 {
        let i = ((addr - self.start) / PAGE) as usize;
        if self.hashes[i] == NOT_HASHED {
            self.hashes[i] = page_hash(self.page(addr));
        }
        self.hashes[i]
    }

    /// Read up to [`WINDOW_PAGES`] pages from `start` (less than `end - start` if a page in
    /// between cannot be read).
    pub fn fill(&mut self, pid: u32, start: u64, end: u64) {
        let want = (end.saturating_sub(start)).min(WINDOW_PAGES * PAGE) as usize;
        let got = sys::read_process(pid, start, &mut self.bytes[..want]).unwrap_or(0);
        let pages = got / PAGE_SIZE;
        self.pid = pid;
        self.start = start;
        self.end = start + (pages * PAGE_SIZE) as u64;
        self.hashes.clear();
        self.hashes.resize(pages, NOT_HASHED);
    }
}

/// How long the scanner waiting for a window spins before it sleeps. A window takes tens of
/// microseconds to read, about what waking a sleeping thread costs on an idle vCPU.
const SCANNER_SPIN: Duration = Duration::from_micros(200);

/// How long the reader spins for its next window. While the scan only reads, the next ask
/// comes right after the reader delivered; while it merges, the ask is far off, and a reader
/// that kept spinning would keep the address space live on the other CPU, where every merge's
/// page-table change then costs a TLB shootdown.
const READER_SPIN: Duration = Duration::from_micros(20);

/// The next message, spinning for `spin` before sleeping; `None` once the sender is gone.
/// If none came within `stalled` of sleep, `on_stall` runs, and what it returns lives until
/// the message came.
fn spin_recv<T, G>(
    rx: &mpsc::Receiver<T>,
    spin: Duration,
    stalled: Duration,
    on_stall: impl FnOnce() -> G,
) -> Option<T> {
    let start = Instant::now();
    loop {
        match rx.try_recv() {
            Ok(v) => return Some(v),
            Err(mpsc::TryRecvError::Disconnected) => return None,
            Err(mpsc::TryRecvError::Empty) if start.elapsed() < spin => std::hint::spin_loop(),
            Err(mpsc::TryRecvError::Empty) => break,
        }
    }
    match rx.recv_timeout(stalled) {
        Ok(v) => Some(v),
        Err(mpsc::RecvTimeoutError::Disconnected) => None,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            let _g = on_stall();
            rx.recv().ok()
        }
    }
}

/// How long the scanner sleeps for a window before it lends the reader its priority: a
/// window takes tens of microseconds to read when the reader gets a CPU.
const LEND_AFTER: Duration = Duration::from_millis(1);

/// The reader at normal priority while the scanner waits for it: a reader at `SCHED_IDLE`
/// gets no CPU while anything else runs, and a scanner waiting for it then waits as long (on
/// a machine busy compiling, 1 GiB scans took 10-15 s instead of 2 in one run of two). This
/// is priority inheritance by hand: the scanner lends its priority to the thread it waits
/// for, and only once the reader is seen stalled, since a reader at normal priority delays
/// the application's faults on its CPU. Without the right to raise a thread's priority
/// (`CAP_SYS_NICE`, or a `RLIMIT_NICE` that allows it) the reader keeps its own, and the
/// scanner stops asking after the first refusal.
struct Lent(Option<u32>);

impl Lent {
    fn to(tid: &AtomicU32, refused: &AtomicBool) -> Self {
        let tid = tid.load(Ordering::Relaxed);
        if tid == 0 || refused.load(Ordering::Relaxed) {
            return Self(None);
        }
        match sys::set_thread_idle(tid, false) {
            Ok(()) => Self(Some(tid)),
            Err(_) => {
                refused.store(true, Ordering::Relaxed);
                Self(None)
            }
        }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(tid) = self.0 {
            let _ = sys::set_thread_idle(tid, true);
        }
    }
}

/// The helper thread and the window it is filling.
pub(crate) struct Prefetcher {
    to_helper: Option<mpsc::Sender<Window>>,
    from_helper: mpsc::Receiver<Window>,
    /// The windows asked for, `[start, end)`, in the order the helper reads them.
    pending: VecDeque<(u64, u64)>,
    spare: Vec<Window>,
    helper: Option<JoinHandle<()>>,
    /// The helper's thread id (0 until it started). The thread lives as long as this,
    /// which joins it when dropped, so the id names no other thread meanwhile.
    tid: Arc<AtomicU32>,
    /// Raising the helper's priority was refused once ([`Lent`]).
    lend_refused: AtomicBool,
}

impl Prefetcher {
    /// Start the helper thread; its thread id goes to `tid` (for CPU accounting).
    pub fn new(tid: Arc<AtomicU32>) -> io::Result<Self> {
        let (to_helper, requests) = mpsc::channel::<Window>();
        let (done, from_helper) = mpsc::channel::<Window>();
        let helper_tid = tid.clone();
        let helper = std::thread::Builder::new()
            .name("samepage-read".into())
            .spawn(move || {
                tid.store(sys::gettid(), Ordering::Relaxed);
                let _own = sys::note_own_stack();
                // Reading ahead is worth only CPU time nobody else wants: an application
                // thread or the fault handler waking on the reader's CPU must not wait for it
                // (with the reader at normal priority, first writes on merged pages during a
                // scan took 70-85 µs at p90 instead of 11-14).
                let _ = sys::set_idle_priority();
                while let Some(mut w) = spin_recv(&requests, READER_SPIN, Duration::MAX, || ()) {
                    let (pid, start, end) = (w.pid, w.start, w.end);
                    w.fill(pid, start, end);
                    if done.send(w).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Self {
            to_helper: Some(to_helper),
            from_helper,
            pending: VecDeque::new(),
            spare: (0..DEPTH).map(|_| Window::new()).collect(),
            helper: Some(helper),
            tid: helper_tid,
            lend_refused: AtomicBool::new(false),
        })
    }

    /// Whether the helper may be asked for another window.
    pub fn wants_more(&self) -> bool {
        self.pending.len() < DEPTH
    }

    /// The end of the last window asked for.
    pub fn asked_end(&self) -> Option<u64> {
        self.pending.back().map(|&(_, e)| e)
    }

    /// Have the helper read `[start, end)` after the windows asked for before.
    pub fn ask(&mut self, pid: u32, start: u64, end: u64) {
        if !self.wants_more() || start >= end {
            return;
        }
        let mut w = self.spare.pop().unwrap_or_else(Window::new);
        w.pid = pid;
        w.start = start;
        w.end = end;
        if let Some(tx) = &self.to_helper {
            if tx.send(w).is_ok() {
                self.pending.push_back((start, end));
            }
        }
    }

    /// The window that starts at `start` if it is the next one asked for (waiting for it
    /// to be read); otherwise every window asked for is dropped.
    pub fn take(&mut self, start: u64) -> Option<Window> {
        let (asked, _) = self.pending.pop_front()?;
        let w = spin_recv(&self.from_helper, SCANNER_SPIN, LEND_AFTER, || {
            Lent::to(&self.tid, &self.lend_refused)
        })?;
        if asked == start {
            return Some(w);
        }
        self.spare.push(w);
        self.cancel();
        None
    }

    /// Drop the windows asked for, once the helper is done with them: nothing of them is
    /// used, and the helper reads no page after this returns.
    pub fn cancel(&mut self) {
        while self.pending.pop_front().is_some() {
            if let Some(w) = spin_recv(&self.from_helper, SCANNER_SPIN, LEND_AFTER, || {
                Lent::to(&self.tid, &self.lend_refused)
            }) {
                self.spare.push(w);
            }
        }
    }

    pub fn give_back(&mut self, w: Window) {
        self.spare.push(w);
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.cancel();
        // Closing the channel ends the helper's loop.
        self.to_helper = None;
        if let Some(h) = self.helper.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiting_scanner_lends_the_reader_its_priority() {
        let tid = Arc::new(AtomicU32::new(0));
        let p = Prefetcher::new(tid.clone()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let t = loop {
            let t = tid.load(Ordering::Relaxed);
            if t != 0 && sys::thread_policy(t).ok() == Some(libc::SCHED_IDLE) {
                break t;
            }
            if Instant::now() > deadline {
                eprintln!("skipped: the reader cannot put itself at SCHED_IDLE here");
                return;
            }
            std::thread::yield_now();
        };
        let lent = Lent::to(&p.tid, &p.lend_refused);
        if lent.0.is_none() {
            eprintln!("skipped: no right to raise a thread's priority here");
            return;
        }
        assert_eq!(sys::thread_policy(t).unwrap(), libc::SCHED_OTHER);
        drop(lent);
        assert_eq!(sys::thread_policy(t).unwrap(), libc::SCHED_IDLE);
    }

    #[test]
    fn the_helper_reads_and_hashes_a_window() {
        let n = 100u64;
        let mem: Vec<u8> = (0..n as usize * PAGE_SIZE)
            .map(|i| (i / PAGE_SIZE) as u8)
            .collect();
        let base = mem.as_ptr() as u64;
        // Only whole pages of `mem` are read: start at its first page boundary.
        let start = (base + PAGE - 1) & !(PAGE - 1);
        let tid = Arc::new(AtomicU32::new(0));
        let mut p = Prefetcher::new(tid.clone()).unwrap();
        p.ask(0, start, start + 10 * PAGE);
        assert!(
            p.take(start + PAGE).is_none(),
            "a window asked elsewhere is dropped"
        );
        p.ask(0, start, start + 10 * PAGE);
        let mut w = p.take(start).expect("the window asked for");
        assert!(tid.load(Ordering::Relaxed) > 0);
        assert_eq!((w.start, w.end), (start, start + 10 * PAGE));
        for i in 0..10 {
            let a = start + i * PAGE;
            let off = (a - base) as usize;
            assert_eq!(w.page(a), &mem[off..off + PAGE_SIZE]);
            assert_eq!(w.hash(a), page_hash(&mem[off..off + PAGE_SIZE]));
        }
        assert!(!w.contains(0, start + 10 * PAGE));
        assert!(!w.contains(1, start));
        p.give_back(w);
        p.ask(0, start, start + 50 * PAGE);
        p.cancel();
        assert!(p.take(start).is_none());
    }
}
