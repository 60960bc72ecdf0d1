//! The agent's fault handler thread: it reads the userfaultfd and resolves every fault on
//! the agent's memory, and follows the application's discards, unmaps and moves. It never
//! maps, unmaps or discards memory itself (it would wait for its own events), so nothing it
//! does can block on the application or on the executor for longer than the state lock.
//!
//! Events are read and handled under the state lock: a transaction that commits sees either
//! an event not yet read (its system call has not happened: handling it later is correct)
//! or one already handled, never one read and not yet recorded.

use super::state::{PageState, State};
use super::Agent;
use crate::ops::Change;
use crate::sys::uffd::{Event, FaultKind};
use crate::sys::PAGE;
use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A fault resolution that must be tried again: the address space was changing (EAGAIN)
/// when it was first tried; the event that says how is being read.
#[derive(Clone, Copy, Debug)]
enum Retry {
    Fault { addr: u64, write: bool },
}

/// The changes a fault makes (a merged page became ordinary) are told to the sender (ksmd,
/// or the link to the daemon) together, not one wake-up of another thread per fault: once no
/// event came for [`Deferred::QUIET`], once the oldest waited [`Deferred::MAX_AGE`], or once
/// [`Deferred::MAX`] wait; ksmd also takes them at its next batch. Changes of other events
/// are told at once.
#[derive(Debug, Default)]
struct Deferred {
    /// Changes in the outbox not told yet.
    count: usize,
    /// When the oldest of them was made.
    since: Option<Instant>,
}

impl Deferred {
    const QUIET: Duration = Duration::from_millis(2);
    const MAX_AGE: Duration = Duration::from_millis(20);
    const MAX: usize = 4096;

    fn add(&mut self, n: usize) {
        if n > 0 {
            self.count += n;
            self.since.get_or_insert_with(Instant::now);
        }
    }

    /// Whether to tell the sender now, after a round of events.
    fn due(&self, urgent: bool) -> bool {
        self.count > 0
            && (urgent
                || self.count >= Self::MAX
                || self.since.is_some_and(|t| t.elapsed() >= Self::MAX_AGE))
    }

    /// How long the handler may sleep before it tells the sender.
    fn wait(&self) -> Option<Duration> {
        (self.count > 0).then_some(Self::QUIET)
    }

    /// Tell the sender; returns whether there was anything to tell.
    fn take(&mut self) -> bool {
        let had = self.count > 0;
        *self = Self::default();
        had
    }
}

/// The handler thread's loop.
pub(super) fn run(agent: &Agent) {
    crate::sys::block_all_signals();
    let _own = crate::sys::note_own_stack();
    agent
        .handler_tid
        .store(crate::sys::gettid(), Ordering::Relaxed);
    let mut events = Vec::with_capacity(64);
    let mut retry: Vec<Retry> = Vec::new();
    let mut follow = Follow::default();
    let mut deferred = Deferred::default();
    let mut around = Streams::default();
    loop {
        let timeout = [
            (!retry.is_empty()).then_some(Duration::from_millis(1)),
            deferred.wait(),
            follow.release_after(),
        ]
        .into_iter()
        .flatten()
        .min();
        // Rounded up: a wake-up before the time would find nothing to do.
        let ms = timeout.map_or(-1, |t| t.as_micros().div_ceil(1000).max(1) as i32);
        let ready = match crate::sys::poll(&[agent.uffd.as_fd(), agent.wake.fd()], ms) {
            Ok(r) => r,
            Err(_) => break,
        };
        if agent.stopping.load(Ordering::Acquire) && ready[1] != 0 {
            break;
        }
        if ready.iter().all(|&r| r == 0) {
            // Nothing came within the timeout.
            if deferred.take() {
                agent.outbox_ready();
            }
            follow.idle();
            if retry.is_empty() {
                continue;
            }
        }
        let mut faulted = Faulted::None;
        let (added, urgent) = {
            let _inside = super::fork::enter();
            let mut st = agent.lock();
            let before = st.outbox.len();
            let mut urgent = false;
            loop {
                events.clear();
                let n = agent.uffd.read_events(&mut events).unwrap_or_default();
                for &ev in &events {
                    match ev {
                        Event::Pagefault { tid, .. } => faulted.add(tid),
                        _ => urgent = true,
                    }
                    handle(agent, &mut st, ev, &mut retry, &mut around);
                }
                // A short read emptied the queue; what comes later, poll reports.
                if n < crate::sys::uffd::READ_BATCH {
                    break;
                }
            }
            let pending = std::mem::take(&mut retry);
            for r in pending {
                let Retry::Fault { addr, write } = r;
                fault_missing(agent, &mut st, addr, write, &mut retry, &mut around);
            }
            (st.outbox.len().saturating_sub(before), urgent)
        };
        agent.events_handled();
        deferred.add(added);
        if deferred.due(urgent) {
            deferred.take();
            agent.outbox_ready();
        }
        follow.faulted(faulted);
    }
    if deferred.take() {
        agent.outbox_ready();
    }
}

/// Which threads faulted in one round of events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Faulted {
    None,
    One(u32),
    Several,
}

impl Faulted {
    fn add(&mut self, tid: u32) {
        *self = match *self {
            Faulted::None => Faulted::One(tid),
            Faulted::One(t) if t == tid => Faulted::One(t),
            _ => Faulted::Several,
        };
    }
}

/// Keeps the handler on the CPU of the thread whose faults it resolves. A thread that
/// faults blocks until the handler has resolved the fault, so its CPU is free for the
/// handler: there the round trip is two context switches. On another CPU it is two
/// wake-ups of an idle CPU, which in a VM whose idle vCPUs halt cost far more
/// (`scripts/probes/uffd_round_trip.c` here: p50 8.5 µs on one CPU, 36–50 µs across two).
/// The scheduler wakes the handler on an idle CPU when it can, so while the faults come
/// from one thread the handler pins itself to that thread's CPU (read from procfs at most
/// every [`Follow::CHECK_EVERY`]); it lets go when another thread faults, and once faults
/// stop. (Pinned, it waits for that CPU: a real-time thread that kept the CPU would hold
/// the handler until the faults stop; the faulting thread itself is blocked meanwhile.)
#[derive(Debug, Default)]
struct Follow {
    /// The thread whose faults came last, if they all came from one.
    thread: Option<u32>,
    /// The CPU the handler is pinned to, and the CPUs it may use otherwise.
    pinned: Option<(u32, crate::sys::CpuMask)>,
    checked: Option<Instant>,
    last_fault: Option<Instant>,
    /// Pinning failed to undo once: the handler stays where the scheduler puts it.
    off: bool,
}

impl Follow {
    /// A thread's CPU is looked up at most this often: reading procfs costs the handler
    /// tens of microseconds, which a thread on the same CPU waits through (looked up every
    /// 10 ms, one first write in a hundred took 25–45 µs instead of 10).
    const CHECK_EVERY: Duration = Duration::from_secs(1);
    /// Pinned this long after the last fault at most.
    const RELEASE: Duration = Duration::from_millis(50);

    /// A round of events resolved faults of `who`.
    fn faulted(&mut self, who: Faulted) {
        let tid = match who {
            Faulted::None => return,
            Faulted::One(tid) => tid,
            Faulted::Several => 0,
        };
        let now = Instant::now();
        self.last_fault = Some(now);
        if self.thread != Some(tid) {
            // Another thread (or several): the CPU followed so far is not theirs.
            self.thread = (tid != 0).then_some(tid);
            self.unpin();
            return;
        }
        if self.off
            || self.pinned.is_some()
            || self.checked.is_some_and(|t| now - t < Self::CHECK_EVERY)
        {
            return;
        }
        self.checked = Some(now);
        let (Some(cpu), Ok(allowed)) = (
            crate::sys::last_cpu_of(tid),
            crate::sys::CpuMask::of_this_thread(),
        ) else {
            return;
        };
        if allowed.contains(cpu) && crate::sys::pin_thread(cpu).is_ok() {
            self.pinned = Some((cpu, allowed));
        }
    }

    /// How long the handler may sleep before it should let go of its CPU.
    fn release_after(&self) -> Option<Duration> {
        let last = self.last_fault?;
        self.pinned
            .as_ref()
            .map(|_| Self::RELEASE.saturating_sub(last.elapsed()))
    }

    /// Nothing came for a while: let go of the CPU once faults have stopped.
    fn idle(&mut self) {
        if self.last_fault.is_none_or(|t| t.elapsed() >= Self::RELEASE) {
            self.unpin();
        }
    }

    fn unpin(&mut self) {
        if let Some((_, allowed)) = self.pinned.take() {
            if allowed.apply().is_err() {
                // The CPUs it had may be gone (a cpuset changed): stay put, follow no more.
                self.off = true;
            }
        }
    }
}

fn handle(agent: &Agent, st: &mut State, ev: Event, retry: &mut Vec<Retry>, around: &mut Streams) {
    match ev {
        Event::Pagefault {
            kind, write, addr, ..
        } => match kind {
            FaultKind::Missing => {
                fault_missing(agent, st, addr & !(PAGE - 1), write, retry, around)
            }
            // With WP_ASYNC the kernel resolves write-protect faults itself; one can only
            // come from a range registered before that, so let the write go ahead.
            FaultKind::WriteProtect => {
                let a = addr & !(PAGE - 1);
                if agent.uffd.writeprotect(a, PAGE, false, true).is_err() {
                    let _ = agent.uffd.wake(a, PAGE);
                }
            }
            FaultKind::Minor => {
                let _ = agent.uffd.wake(addr & !(PAGE - 1), PAGE);
            }
        },
        Event::Remove { start, end } => removed(st, start, end),
        Event::Unmap { start, end } => unmapped(st, start, end),
        Event::Remap { from, to, len } => moved(st, from, to, len),
    }
}

/// Streams of faults, for work done ahead of them. A thread that walks memory page by page
/// would wait for a round trip to the handler on every page, where the kernel alone takes a
/// page fault: 50-65 µs against 1-2 µs in `samepage bench` for memory never touched, 45-50 µs
/// against 3 for merged pages written in a row. So a fault that continues a stream also
/// resolves the pages after it that the stream has earned: one page for a fault out of the
/// blue, twice the last window for a fault that continues it, up to a largest window (as
/// readahead grows).
///
/// - Memory never touched ([`FaultAround::holes`]): the holes after the fault get the zero
///   page. A hole on the zero page reads zeros as the hole did, and its first write is the
///   kernel's own copy-on-write fault, with no round trip; the zero page costs no memory, and
///   the scan skips it as the kernel's does. Only ordinary holes are filled: merged pages,
///   pages a transaction owns and KSM's own zero pages keep their state. A fault continues a
///   stream if it is on the page right after the last window.
/// - Merged pages ([`FaultAround::merged`]): the merged pages after the fault get their
///   private copy, as a read of each would give them; the engine hears of each as a read's
///   copy, which it merges again on a later scan if it is still the same. Merged pages lie
///   among others (ordinary pages, zero pages), so a fault continues a stream anywhere in
///   the span its next window would have (twice the last one) after it. The window is
///   smaller: each copy is a page that is no longer shared until the scan merges it again.
#[derive(Clone, Copy, Debug)]
struct FaultAround {
    /// Recent streams: the page after the window resolved last, that window in pages (0: an
    /// unused slot), and when the stream last faulted (in faults).
    streams: [(u64, u64, u64); 8],
    /// Faults so far.
    clock: u64,
    /// The largest window.
    max: u64,
    /// A fault continues a stream anywhere in twice its last window after it, not only on
    /// the page right after it.
    reach: bool,
}

impl FaultAround {
    /// Memory never touched: up to 2 MiB, one page table's worth.
    fn holes() -> Self {
        Self::new(512, false)
    }

    /// Merged pages: up to 256 KiB.
    fn merged() -> Self {
        Self::new(64, true)
    }

    fn new(max: u64, reach: bool) -> Self {
        Self {
            streams: [(0, 0, 0); 8],
            clock: 0,
            max,
            reach,
        }
    }

    /// The stream a fault on the page at `a` belongs to, and how many pages its window
    /// spans from `a`. A fault that continues no stream starts one in the slot used longest
    /// ago.
    fn window(&mut self, a: u64) -> (usize, u64) {
        self.clock += 1;
        let reach = self.reach;
        match self.streams.iter().position(|&(end, w, _)| {
            w > 0 && (a == end || reach && a > end && a - end < 2 * w * PAGE)
        }) {
            Some(i) => (i, (self.streams[i].1 * 2).min(self.max)),
            None => {
                let i = (0..self.streams.len())
                    .min_by_key(|&i| self.streams[i].2)
                    .expect("slots");
                (i, 1)
            }
        }
    }

    /// The window a fault at `a` would get, leaving the streams as they are.
    #[cfg(test)]
    fn clone_window(&self, a: u64) -> u64 {
        let mut f = *self;
        f.window(a).1
    }

    /// Stream `slot` resolved up to `end` with a window of `pages`.
    fn filled(&mut self, slot: usize, end: u64, pages: u64) {
        self.streams[slot] = (end, pages, self.clock);
    }
}

/// The faults of the handler's streams: on memory never touched, on merged pages.
#[derive(Debug)]
struct Streams {
    holes: FaultAround,
    merged: FaultAround,
}

impl Default for Streams {
    fn default() -> Self {
        Self {
            holes: FaultAround::holes(),
            merged: FaultAround::merged(),
        }
    }
}

/// A thread touched a hole: a merged page gets its canonical page copied in (it is an
/// ordinary page of the application from then on); any other hole of a region reads as the
/// zero page, as without samepage; the pages after it that its stream has earned get the
/// same ([`FaultAround`]). A page a transaction owns waits for its wake.
fn fault_missing(
    agent: &Agent,
    st: &mut State,
    a: u64,
    write: bool,
    retry: &mut Vec<Retry>,
    around: &mut Streams,
) {
    let state = st.page(a);
    let r = match state {
        Some((_, _, PageState::InFlight)) => return,
        Some((ri, i, PageState::Merged(k))) => match agent.copy_canonical(k, a) {
            Ok(()) => {
                if write {
                    st.set(ri, i, PageState::Anon);
                    st.stats.cow_merged += 1;
                } else {
                    st.set_read_copied(ri, i);
                    st.stats.read_merged += 1;
                }
                copy_ahead(agent, st, ri, i, &mut around.merged);
                return;
            }
            Err(e) => Err(e),
        },
        _ => {
            st.stats.missing_faults += u64::from(state.is_some());
            // SAFETY: a is a hole of a range this agent registered; the zero page reads
            // like the zeros the hole stands for.
            let (done, r, dropped_marker) =
                agent.fill_past_marker(a, || unsafe { agent.uffd.zeropage(a, PAGE, true) });
            match (state, dropped_marker) {
                // A discard's zap is over once its hole is touched (or the zero page it
                // got now is this fault's, which a zap still to come may take).
                (Some((ri, i, PageState::Discarding)), _) => {
                    st.set(ri, i, PageState::Anon);
                }
                // The marker was all that was left of a KSM-placed zero page.
                (Some((ri, i, PageState::Zero)), true) if done == PAGE => {
                    st.set(ri, i, PageState::Anon);
                }
                _ => {}
            }
            if done == PAGE {
                if let Some((ri, i, PageState::Anon)) = state {
                    fill_around(agent, st, ri, i, &mut around.holes);
                }
                return;
            }
            r
        }
    };
    match r {
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
            retry.push(Retry::Fault { addr: a, write })
        }
        // Mapped meanwhile (another thread's fault won), or not ours any more: let the
        // thread try again.
        _ => {
            let _ = agent.uffd.wake(a, PAGE);
        }
    }
}

/// The hole at page `i` of region `ri` got the zero page: give it to the ordinary holes
/// after it that its stream has earned. The faulting thread is already awake.
fn fill_around(agent: &Agent, st: &mut State, ri: usize, i: usize, around: &mut FaultAround) {
    let r = &st.regions[ri];
    let a = r.start + i as u64 * PAGE;
    let (slot, window) = around.window(a);
    let pages = (1..window as usize)
        .take_while(|&j| i + j < r.pages.len() && r.pages.get(i + j) == PageState::Anon)
        .count() as u64;
    let mut end = a + PAGE;
    let mut len = pages * PAGE;
    while len > 0 {
        // SAFETY: ordinary pages of a region the agent registered: a hole among them reads
        // zeros, as the zero page does; the call stops at the first page that is not a hole.
        let (n, r) = unsafe { agent.uffd.zeropage(end, len, true) };
        end += n;
        st.stats.zero_filled_ahead += n / PAGE;
        // ENOENT: the window crosses the end of the application's mapping (a region can
        // span several, split by mprotect): try the half that may lie inside it.
        match r {
            Err(e) if n == 0 && e.raw_os_error() == Some(libc::ENOENT) => {
                len = (len / 2) & !(PAGE - 1);
            }
            _ => break,
        }
    }
    around.filled(slot, end, window);
}

/// Merged page `i` of region `ri` got its private copy: give one to the merged pages after
/// it in the window its stream has earned. The faulting thread is already awake; one that
/// faults on a page of the window meanwhile finds it copied.
fn copy_ahead(agent: &Agent, st: &mut State, ri: usize, i: usize, around: &mut FaultAround) {
    let a = st.regions[ri].start + i as u64 * PAGE;
    let (slot, window) = around.window(a);
    let last = (i + window as usize).min(st.regions[ri].pages.len());
    for j in i + 1..last {
        if let PageState::Merged(k) = st.regions[ri].pages.get(j) {
            // Any error (the address space changing, the mapping ending) leaves the page
            // merged, for its own fault.
            if agent.copy_canonical(k, a + (j - i) as u64 * PAGE).is_err() {
                break;
            }
            st.set_read_copied(ri, j);
            st.stats.copied_ahead += 1;
        }
    }
    around.filled(slot, a + window * PAGE, window);
}

/// `MADV_DONTNEED` (or `MADV_FREE`) on `[start, end)`, about to happen: the kernel zaps
/// the range after this event is read. A merged page now stands for zeros (its next access
/// maps the zero page); the pages are `Discarding` until the zap is seen to be over; a page
/// a transaction owns must be left reading zeros by it.
fn removed(st: &mut State, start: u64, end: u64) {
    for ri in 0..st.regions.len() {
        let (rs, re) = (st.regions[ri].start, st.regions[ri].end());
        if re <= start || rs >= end {
            continue;
        }
        // Pages of a range never registered are never claimed (nor touched by samepage).
        let after = if st.regions[ri].registered {
            PageState::Discarding
        } else {
            PageState::Anon
        };
        let mut a = rs.max(start);
        while a < re.min(end) {
            let i = st.regions[ri].idx(a);
            match st.regions[ri].pages.get(i) {
                PageState::Merged(_) | PageState::Zero | PageState::Anon => {
                    st.set(ri, i, after);
                }
                PageState::InFlight => st.record_fate(a, None),
                PageState::Discarding | PageState::Gone => {}
            }
            a += PAGE;
        }
    }
}

/// `munmap` of `[start, end)`.
fn unmapped(st: &mut State, start: u64, end: u64) {
    if !st.overlaps(start, end) {
        return;
    }
    let mut inflight = Vec::new();
    for r in &st.regions {
        if r.end() <= start || r.start >= end {
            continue;
        }
        for i in 0..r.pages.len() {
            let a = r.start + i as u64 * PAGE;
            if a >= start && a < end && r.pages.get(i) == PageState::InFlight {
                inflight.push(a);
            }
        }
    }
    for a in inflight {
        st.record_fate(a, None);
    }
    st.remove_range(start, end);
    st.outbox.push(Change::Unmapped { start, end });
}

/// `mremap` moved `[from, from + len)` to `to`: the registration moved with the mapping, so
/// the pages stay the agent's at their new address, with their states. A page a
/// transaction owns must get its contents at the new address.
fn moved(st: &mut State, from: u64, to: u64, len: u64) {
    if !st.overlaps(from, from + len) {
        return;
    }
    let end = from + len;
    st.split_at(from);
    st.split_at(end);
    let mut taken = Vec::new();
    let mut ri = 0;
    while ri < st.regions.len() {
        let r = &st.regions[ri];
        if r.start >= from && r.end() <= end {
            taken.push(st.regions.remove(ri));
        } else {
            ri += 1;
        }
    }
    // What the move put at the destination replaced whatever was there (its UNMAP event,
    // if it was the agent's, came first).
    st.remove_range(to, to + len);
    for mut r in taken {
        let new_start = r.start - from + to;
        for i in 0..r.pages.len() {
            if r.pages.get(i) == PageState::InFlight {
                let a = r.start + i as u64 * PAGE;
                st.record_fate(a, Some(a - from + to));
            }
        }
        r.start = new_start;
        let i = st.regions.partition_point(|x| x.start < new_start);
        st.regions.insert(i, r);
    }
    st.outbox.push(Change::Moved { from, to, len });
}

/// An error that says the address space is changing (try again once its event is read).
pub(super) fn is_again(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EAGAIN)
}

#[cfg(test)]
mod tests {
    use super::super::state::{Fate, PageStates, Region};
    use super::*;
    use samepage_engine::MmId;

    #[test]
    fn fault_changes_are_told_together_other_changes_at_once() {
        let mut d = Deferred::default();
        assert_eq!(d.wait(), None);
        assert!(!d.due(true), "nothing to tell");
        d.add(0);
        assert_eq!(d.wait(), None);
        d.add(3);
        assert_eq!(d.wait(), Some(Deferred::QUIET));
        assert!(!d.due(false), "a few fresh fault changes wait");
        assert!(d.due(true), "with an unmap or discard, everything goes");
        d.add(Deferred::MAX);
        assert!(d.due(false), "too many wait");
        assert!(d.take());
        assert!(!d.take(), "told once");
        d.add(1);
        d.since = Some(Instant::now() - Deferred::MAX_AGE);
        assert!(d.due(false), "too old");
    }

    #[test]
    fn the_threads_of_a_round_are_one_or_several() {
        let mut f = Faulted::None;
        f.add(7);
        f.add(7);
        assert_eq!(f, Faulted::One(7));
        f.add(8);
        assert_eq!(f, Faulted::Several);
        f.add(7);
        assert_eq!(f, Faulted::Several);
    }

    #[test]
    fn fault_around_windows_double_along_a_stream_and_start_over_elsewhere() {
        let mut f = FaultAround::holes();
        // A walk through fresh memory, one fault per window.
        let walk = |f: &mut FaultAround, a: &mut u64, faults: usize| -> Vec<u64> {
            (0..faults)
                .map(|_| {
                    let (slot, w) = f.window(*a);
                    *a += w * PAGE;
                    f.filled(slot, *a, w);
                    w
                })
                .collect()
        };
        let mut a = 0x10_0000;
        assert_eq!(
            walk(&mut f, &mut a, 12),
            [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 512, 512]
        );
        // Seven other streams keep their own windows; the walk above goes on where it was.
        let mut others: Vec<u64> = (1..8).map(|k| k << 32).collect();
        for o in &mut others {
            assert_eq!(walk(&mut f, o, 3), [1, 2, 4]);
        }
        assert_eq!(walk(&mut f, &mut a, 1), [512]);
        // A fault off every stream starts a ninth one, in the slot used longest ago.
        let mut elsewhere = 0x7000_0000_0000;
        assert_eq!(walk(&mut f, &mut elsewhere, 2), [1, 2]);
        assert_eq!(walk(&mut f, &mut a, 1), [512]);
        assert_eq!(walk(&mut f, &mut others[0], 1), [1], "the one left out");
        assert_eq!(walk(&mut f, &mut others[2], 1), [8]);
        // A window cut short by a page in the way: the stream goes on after what was filled.
        let (slot, w) = f.window(others[2]);
        assert_eq!(w, 16);
        f.filled(slot, others[2] + 3 * PAGE, w);
        assert_eq!(f.window(others[2] + 3 * PAGE).1, 32);
        // A fault inside a filled window (a hole that was in the way, say) is no stream's.
        assert_eq!(f.window(a - PAGE).1, 1);
    }

    #[test]
    fn a_stream_of_merged_faults_reaches_over_the_pages_in_between() {
        let mut f = FaultAround::merged();
        // Faults on every other page: each lands within the window after the last one.
        let mut a = 0x10_0000;
        let mut windows = Vec::new();
        for _ in 0..9 {
            let (slot, w) = f.window(a);
            windows.push(w);
            f.filled(slot, a + w * PAGE, w);
            a += w * PAGE + PAGE;
        }
        assert_eq!(windows, [1, 2, 4, 8, 16, 32, 64, 64, 64]);
        // Beyond the reach of the last window, or behind its end: no stream's.
        let end = a - PAGE;
        assert_eq!(f.clone_window(end + 128 * PAGE), 1);
        assert_eq!(f.clone_window(end - PAGE), 1);
        assert_eq!(f.clone_window(end + 127 * PAGE), 64);
        // Memory never touched continues a stream only on the page right after it.
        let mut h = FaultAround::holes();
        let (slot, w) = h.window(0x10_0000);
        h.filled(slot, 0x10_0000 + w * PAGE, w);
        assert_eq!(h.window(0x10_0000 + 2 * PAGE).1, 1);
    }

    #[test]
    fn the_handler_follows_one_faulting_thread_and_lets_go() {
        std::thread::spawn(|| {
            let all = crate::sys::CpuMask::of_this_thread().unwrap();
            let me = crate::sys::gettid();
            let mut f = Follow::default();
            f.faulted(Faulted::One(me));
            assert!(f.pinned.is_none(), "a thread's first fault pins nothing");
            f.faulted(Faulted::One(me));
            let (cpu, _) = f.pinned.as_ref().expect("pinned on the second");
            assert_eq!(crate::sys::last_cpu_of(me), Some(*cpu));
            assert!(f.release_after().unwrap() <= Follow::RELEASE);
            f.faulted(Faulted::Several);
            assert!(f.pinned.is_none(), "several threads: let go");
            assert_eq!(
                format!("{:?}", crate::sys::CpuMask::of_this_thread().unwrap()),
                format!("{all:?}")
            );
            f.faulted(Faulted::One(me));
            f.faulted(Faulted::One(me));
            assert!(f.pinned.is_none(), "looked up at most once a second");
            f.checked = None;
            f.faulted(Faulted::One(me));
            assert!(f.pinned.is_some());
            f.last_fault = Some(Instant::now() - Follow::RELEASE);
            f.idle();
            assert!(f.pinned.is_none(), "faults stopped: let go");
        })
        .join()
        .unwrap();
    }

    fn region(start: u64, registered: bool) -> Region {
        Region {
            mm: MmId(1),
            start,
            pages: PageStates::new(4),
            mergeable: registered,
            registered,
        }
    }

    #[test]
    fn a_discard_announced_keeps_pages_unclaimable_until_its_zap() {
        let mut st = State::default();
        st.regions.push(region(0x10000, true));
        st.regions.push(region(0x20000, false));
        st.set(0, 0, PageState::Merged(3));
        st.set(0, 1, PageState::Zero);
        st.set(0, 2, PageState::InFlight);
        removed(&mut st, 0x10000, 0x24000);
        let states: Vec<_> = st.regions[0].pages.iter().collect();
        assert_eq!(
            states,
            [
                PageState::Discarding,
                PageState::Discarding,
                PageState::InFlight,
                PageState::Discarding
            ]
        );
        // The merged page stopped standing for its canonical page; the in-flight one learns
        // of the discard when its transaction ends.
        assert_eq!(
            st.outbox,
            vec![Change::Unmerged {
                addr: 0x10000,
                k: 3
            }]
        );
        let fate = st.take_fate(0x12000);
        assert_eq!(Fate::released(fate), PageState::Discarding);
        assert_eq!(Fate::released(None), PageState::Anon);
        // Memory never registered is never claimed: nothing to hold back there.
        assert!(st.regions[1].pages.iter().all(|s| s == PageState::Anon));
    }
}
