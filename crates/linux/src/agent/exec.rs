//! The executor: runs the batches of operations ksmd sends at the end of each scan chunk,
//! inside the process whose memory they change.
//!
//! A merge or zero-page placement is a transaction through these steps, each a type:
//!
//! 1. [`Claimed`]: the page is an ordinary page of a mergeable region and is marked
//!    `InFlight` (faults on it now wait for the transaction). Dropping it releases the page.
//! 2. [`MovedOut`]: `UFFDIO_MOVE` took the page into the scratch area (it refuses pages
//!    pinned for I/O, whose writes no protection would stop). Where it was is a hole, and
//!    accesses wait there. Nobody can change the moved-out copy any more, so that copy is
//!    what is checked against the target. Dropping it puts the page back where it is now
//!    (where it was, or where the application moved it), or drops it if the application
//!    discarded or unmapped it meanwhile.
//! 3. Committed: for a merge the hole now stands for the canonical page (the page's memory
//!    goes when the scratch area is emptied); for a zero page the zero page is mapped and
//!    write-protected (samepage's mark). Threads that waited are woken and retry.
//!
//! No step writes a page protection would have to keep writers out of, and no step holds
//! the state lock across a system call that raises userfaultfd events.

use super::handler::is_again;
use super::state::{Fate, PageState};
use super::Agent;
use crate::ops::{Change, FailReason, Op};
use crate::sys::pagemap::{PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_WRITTEN};
use crate::sys::{self, Mapping, PAGE};
use std::io;

/// Pages of the scratch area pages are moved out to: one scan chunk's worth, twice.
pub(crate) const SCRATCH_PAGES: u64 = 2048;

/// The executor's own memory: the scratch area (registered with the agent's userfaultfd,
/// as `UFFDIO_MOVE` needs) and how much of it holds moved-out pages.
pub(crate) struct Exec {
    scratch: Mapping,
    used: u64,
}

impl Exec {
    pub(super) fn new(agent_uffd: &crate::sys::uffd::Userfaultfd) -> io::Result<Self> {
        let scratch = Mapping::anon(SCRATCH_PAGES * PAGE)?;
        crate::sys::note_own(scratch.addr(), scratch.addr() + scratch.len());
        agent_uffd.register(
            scratch.addr(),
            scratch.len(),
            crate::sys::uffd::REGISTER_MODE_MISSING,
        )?;
        Ok(Self { scratch, used: 0 })
    }

    /// `n` consecutive free slots, emptying the area first if they do not fit.
    fn slots(&mut self, n: u64) -> u64 {
        debug_assert!(n <= SCRATCH_PAGES);
        if self.used + n > SCRATCH_PAGES {
            self.flush();
        }
        let s = self.scratch.addr() + self.used * PAGE;
        self.used += n;
        s
    }

    /// Free the pages moved out so far (this is when a merged page's memory goes back).
    /// Never called under the state lock: the discard raises an event the handler reads.
    fn flush(&mut self) {
        if self.used > 0 {
            let _ = self.scratch.discard(0, self.used * PAGE);
            self.used = 0;
        }
    }

    /// The address range of the scratch area.
    pub(super) fn range(&self) -> (u64, u64) {
        (
            self.scratch.addr(),
            self.scratch.addr() + self.scratch.len(),
        )
    }
}

/// What a transaction wants the page to become.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Zero,
    Canonical(u32),
}

/// Step 1: the page is the transaction's (`InFlight`).
struct Claimed<'a> {
    agent: &'a Agent,
    addr: u64,
    want: Want,
}

impl<'a> Claimed<'a> {
    /// Claim `addr` if it is an ordinary page of a mergeable region (a zero page samepage
    /// placed that the scan finds holding data again was written since: ordinary now).
    fn new(agent: &'a Agent, addr: u64, want: Want) -> Result<Self, FailReason> {
        let mut st = agent.lock();
        match st.page(addr) {
            Some((ri, i, PageState::Anon | PageState::Zero)) if st.regions[ri].mergeable => {
                st.regions[ri].pages.set(i, PageState::InFlight);
                st.fates.remove(&addr);
                Ok(Self { agent, addr, want })
            }
            Some((ri, i, PageState::Discarding)) if st.regions[ri].mergeable => {
                // Still present: the zap of the discard may be still to come, and a page
                // taken out now would come back after it. A hole: the zap is over (or there
                // was nothing to zap), and there is nothing to merge either.
                let present = agent.pagemap.count(addr, addr + PAGE, PAGE_IS_PRESENT, 0);
                if present.ok() == Some(0) {
                    st.regions[ri].pages.set(i, PageState::Anon);
                    Err(FailReason::Gone)
                } else {
                    st.stats.raced_with_application += 1;
                    Err(FailReason::Raced)
                }
            }
            _ => Err(FailReason::Gone),
        }
    }
}

impl Drop for Claimed<'_> {
    /// Give the page back as it is (it never left): ordinary again, where it is now.
    fn drop(&mut self) {
        release(self.agent, self.addr);
    }
}

/// The page at `addr` stops being the transaction's: it is ordinary again wherever the
/// application left it, and threads waiting on it retry.
fn release(agent: &Agent, addr: u64) {
    let at = {
        let mut st = agent.lock();
        let fate = st.fates.remove(&addr);
        let at = fate.map_or(addr, |f| f.now);
        if let Some((ri, i, PageState::InFlight)) = st.page(at) {
            st.set(ri, i, Fate::released(fate));
        }
        at
    };
    let _ = agent.uffd.wake(at, PAGE);
    if at != addr {
        let _ = agent.uffd.wake(addr, PAGE);
    }
}

/// Step 2: the page sits in scratch slot `slot`; where it was is a hole.
struct MovedOut<'a> {
    agent: &'a Agent,
    addr: u64,
    want: Want,
    slot: u64,
}

impl MovedOut<'_> {
    /// The moved-out copy, which nobody else can reach.
    fn copy(&self) -> &[u8] {
        // SAFETY: the slot is a page of the executor's scratch area that a move has just
        // filled; only the executor's thread touches the scratch area, and it frees the
        // slot only after this transaction is over.
        unsafe { sys::own_page(self.slot) }
    }

    /// Is the moved-out copy what the transaction wants the page to become?
    fn verify(&self) -> bool {
        match self.want {
            Want::Zero => samepage_engine::is_zero_page(self.copy()),
            Want::Canonical(k) => self.agent.store_page_equals(k, self.copy()),
        }
    }

    /// Merge: the hole now stands for canonical page `k`.
    fn commit_merged(self, k: u32) -> Result<(), FailReason> {
        {
            let mut st = self.agent.lock();
            if st
                .fates
                .get(&self.addr)
                .is_some_and(|f| f.dropped || f.now != self.addr)
            {
                st.stats.raced_with_application += 1;
                drop(st);
                return Err(FailReason::Raced); // dropping self puts the page back
            }
            let Some((ri, i, PageState::InFlight)) = st.page(self.addr) else {
                return Err(FailReason::Gone);
            };
            st.fates.remove(&self.addr);
            st.set(ri, i, PageState::Merged(k));
            st.outbox.push(Change::Merged { addr: self.addr, k });
        }
        let _ = self.agent.uffd.wake(self.addr, PAGE);
        std::mem::forget(self);
        Ok(())
    }
}

impl Drop for MovedOut<'_> {
    /// Undo the move: the contents go back where the page is now, unless the application
    /// discarded or unmapped it while it was out (then the hole is what it asked for).
    fn drop(&mut self) {
        let slot = self.slot;
        let r = self.agent.follow(self.addr, |to| {
            // SAFETY: the slot holds the page the transaction took; `to` is the hole that
            // stands for it now (where it was, or where the application moved it), which
            // faults wait on.
            let (n, r, _) = self
                .agent
                .fill_past_marker(to, || unsafe { self.agent.uffd.move_pages(slot, to, PAGE) });
            if n == PAGE {
                Ok(())
            } else {
                r.and(Err(io::Error::from_raw_os_error(libc::EAGAIN)))
            }
        });
        if r.is_err() {
            self.agent.lock().stats.lost_put_backs += 1;
        }
        release(self.agent, self.addr);
    }
}

/// Move the claimed pages `run` (consecutive addresses) out to consecutive scratch slots.
/// Pages the kernel refuses come back with the reason.
fn move_out<'a>(
    agent: &'a Agent,
    run: Vec<Claimed<'a>>,
    slots: u64,
) -> Vec<Result<MovedOut<'a>, (u64, FailReason)>> {
    let n = run.len() as u64;
    let start = run[0].addr;
    let mut out = Vec::with_capacity(run.len());
    let mut done = 0u64; // pages of the run dealt with
    let mut run = run.into_iter();
    while done < n {
        let (src, dst) = (start + done * PAGE, slots + done * PAGE);
        let mut moved = 0;
        let r = agent.with_retry(|| {
            // SAFETY: [src, src + len) are pages this transaction claimed; the slots are
            // free holes of the scratch area.
            let (m, r) = unsafe {
                agent
                    .uffd
                    .move_pages(src + moved, dst + moved, (n - done) * PAGE - moved)
            };
            moved += m;
            r
        });
        for _ in 0..moved / PAGE {
            let c = run.next().expect("claimed page");
            let (agent, addr, want) = (c.agent, c.addr, c.want);
            std::mem::forget(c);
            out.push(Ok(MovedOut {
                agent,
                addr,
                want,
                slot: slots + (addr - start),
            }));
        }
        done += moved / PAGE;
        if done == n {
            break;
        }
        // The kernel stopped at this page: find out why, and go on after it.
        let c = run.next().expect("claimed page");
        let addr = c.addr;
        let why = match r.err().and_then(|e| e.raw_os_error()) {
            Some(libc::EBUSY) => retry_shared(agent, c, slots + done * PAGE),
            _ => Err(FailReason::Gone), // ENOENT: it became a hole (discarded) meanwhile
        };
        out.push(why.map_err(|w| (addr, w)));
        done += 1;
    }
    out
}

/// EBUSY: the page is pinned, or shared with a fork (even a child that has exited). A write
/// fault makes a fork-shared page the process's own (reused, or copied while the child
/// lives) without changing a byte; then try once more. A pinned page stays where it is.
fn retry_shared<'a>(
    agent: &'a Agent,
    c: Claimed<'a>,
    slot: u64,
) -> Result<MovedOut<'a>, FailReason> {
    // SAFETY: the page is the transaction's and present; populating it for write changes no
    // byte of it.
    let _ = unsafe { sys::madvise(c.addr, PAGE, libc::MADV_POPULATE_WRITE) };
    let r = agent.with_retry(|| {
        // SAFETY: as in move_out.
        let (m, r) = unsafe { agent.uffd.move_pages(c.addr, slot, PAGE) };
        if m == PAGE {
            Ok(())
        } else {
            r.and(Err(io::Error::from_raw_os_error(libc::EAGAIN)))
        }
    });
    match r {
        Ok(()) => {
            let (addr, want) = (c.addr, c.want);
            std::mem::forget(c);
            Ok(MovedOut {
                agent,
                addr,
                want,
                slot,
            })
        }
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            agent.lock().stats.pinned_skipped += 1;
            Err(FailReason::Pinned)
        }
        Err(_) => Err(FailReason::Gone),
    }
}

/// Place the zero page over the verified pages `pages` (moved out, zero-filled), marked,
/// a run of consecutive addresses at a time, then commit each.
fn commit_zeros(agent: &Agent, pages: Vec<MovedOut<'_>>) -> Vec<(u64, Result<(), FailReason>)> {
    let mut out = Vec::with_capacity(pages.len());
    let mut i = 0;
    while i < pages.len() {
        let mut j = i + 1;
        while j < pages.len() && pages[j].addr == pages[j - 1].addr + PAGE {
            j += 1;
        }
        let (s, len) = (pages[i].addr, (j - i) as u64 * PAGE);
        let mut done = 0;
        let _ = agent.with_retry(|| {
            // SAFETY: the range is holes this transaction made; the zero page reads like
            // the zeros that were there.
            let (z, r) = unsafe { agent.uffd.zeropage(s + done, len - done, false) };
            done += z;
            r
        });
        // The mark. A range partly discarded meanwhile gets markers on its holes; those
        // pages are unprotected below.
        let _ = agent.with_retry(|| agent.uffd.writeprotect(s, len, true, false));
        i = j;
    }
    let mut unprotect = Vec::new();
    {
        let mut st = agent.lock();
        for p in &pages {
            let fate = st.take_fate(p.addr);
            match st.page(p.addr) {
                Some((ri, idx, PageState::InFlight)) if fate.is_none() => {
                    st.set(ri, idx, PageState::Zero);
                    out.push((p.addr, Ok(())));
                }
                _ => {
                    // Discarded, unmapped or moved while out: it reads zeros wherever it
                    // is (a hole), but carries no mark.
                    let at = fate.map_or(p.addr, |f| f.now);
                    if let Some((ri, idx, PageState::InFlight)) = st.page(at) {
                        st.set(ri, idx, Fate::released(fate));
                    }
                    st.stats.raced_with_application += 1;
                    unprotect.push(p.addr);
                    out.push((p.addr, Err(FailReason::Raced)));
                }
            }
        }
    }
    for a in unprotect {
        // A zero page placed where a page that moved away was is not samepage's any more:
        // unprotecting there changes nothing, or fails where nothing is registered.
        let _ = agent.uffd.writeprotect(a, PAGE, false, true);
    }
    for p in pages {
        let _ = agent.uffd.wake(p.addr, PAGE);
        std::mem::forget(p);
    }
    out
}

impl Agent {
    /// Run a batch of operations and append their results to the outbox, ending with
    /// `BatchDone { seq }`.
    pub(crate) fn execute(&self, seq: u64, ops: &[Op]) {
        if !self.is_own() {
            return;
        }
        let _inside = super::fork::enter();
        let mut exec = self.exec.lock().unwrap_or_else(|e| e.into_inner());
        let mut pages: Vec<(u64, Want)> = ops
            .iter()
            .filter_map(|op| match *op {
                Op::Merge { addr, k } => Some((addr, Want::Canonical(k))),
                Op::Zero { addr } => Some((addr, Want::Zero)),
                Op::Unshare { .. } | Op::Refresh => None,
            })
            .collect();
        pages.sort_unstable_by_key(|p| p.0);
        pages.dedup_by_key(|p| p.0);
        let mut failed: Vec<(u64, FailReason)> = Vec::new();
        let mut zeros = 0u32;
        // Runs of neighbouring pages go through each step together, up to the scratch area.
        let mut i = 0;
        while i < pages.len() {
            let mut j = i + 1;
            while j < pages.len()
                && pages[j].0 == pages[j - 1].0 + PAGE
                && ((j - i) as u64) < SCRATCH_PAGES
            {
                j += 1;
            }
            zeros += self.run_pages(&mut exec, &pages[i..j], &mut failed);
            i = j;
        }
        exec.flush();
        if ops.contains(&Op::Refresh) {
            self.refresh();
        }
        for op in ops {
            if let Op::Unshare { start, end } = *op {
                if let Err(e) = self.unshare(start, end) {
                    self.lock().outbox.push(Change::UnshareFailed {
                        start,
                        end,
                        errno: e.raw_os_error().unwrap_or(libc::EIO),
                    });
                }
            }
        }
        let mut st = self.lock();
        for (addr, why) in failed {
            if why == FailReason::Changed {
                st.stats.changed_skipped += 1;
            }
            st.outbox.push(Change::Failed { addr, why });
        }
        st.outbox.push(Change::BatchDone { seq, zeros });
        drop(st);
        self.outbox_ready();
    }

    /// The transactions of one run of neighbouring pages; returns the zero pages placed.
    fn run_pages(
        &self,
        exec: &mut Exec,
        run: &[(u64, Want)],
        failed: &mut Vec<(u64, FailReason)>,
    ) -> u32 {
        // Claim; each stretch of consecutive claims moves out with one call.
        let mut groups: Vec<Vec<Claimed<'_>>> = Vec::new();
        for &(addr, want) in run {
            match Claimed::new(self, addr, want) {
                Ok(c) => match groups.last_mut() {
                    Some(g) if g.last().is_some_and(|l| l.addr + PAGE == addr) => g.push(c),
                    _ => groups.push(vec![c]),
                },
                Err(why) => failed.push((addr, why)),
            }
        }
        // Slots for the whole run at once: emptying the scratch area while pages of the run
        // wait there would lose them.
        let base = exec.slots(run.len() as u64);
        let run_start = run[0].0;
        let mut moved: Vec<MovedOut<'_>> = Vec::with_capacity(run.len());
        for g in groups {
            let slots = base + (g[0].addr - run_start);
            for r in move_out(self, g, slots) {
                match r {
                    Ok(m) => moved.push(m),
                    Err(f) => failed.push(f),
                }
            }
        }
        // Check what was moved out; commit what matches, put back what does not.
        let mut zeros = Vec::new();
        for m in moved {
            if !m.verify() {
                failed.push((m.addr, FailReason::Changed));
                continue; // dropping m puts the page back
            }
            match m.want {
                Want::Zero => zeros.push(m),
                Want::Canonical(k) => {
                    let addr = m.addr;
                    if let Err(why) = m.commit_merged(k) {
                        failed.push((addr, why));
                    }
                }
            }
        }
        let mut placed = 0;
        for (addr, r) in commit_zeros(self, zeros) {
            match r {
                Ok(()) => placed += 1,
                Err(why) => failed.push((addr, why)),
            }
        }
        placed
    }

    /// `break_ksm` over `[start, end)`: merged pages get their canonical page copied in,
    /// KSM-placed zero pages (the zero page carrying samepage's mark, as the page table
    /// says) a private zero-filled page. Ordinary zero pages are left alone.
    pub(crate) fn unshare(&self, start: u64, end: u64) -> io::Result<()> {
        // Claim the merged pages (faults on them then wait, and the application's
        // discards and moves are recorded), copy each in, commit.
        let claimed: Vec<(u64, u32)> = {
            let mut st = self.lock();
            let mut v = Vec::new();
            for ri in 0..st.regions.len() {
                let (rs, re) = (st.regions[ri].start, st.regions[ri].end());
                if re <= start || rs >= end {
                    continue;
                }
                let mut a = rs.max(start);
                while a < re.min(end) {
                    let i = st.regions[ri].idx(a);
                    if let PageState::Merged(k) = st.regions[ri].pages.get(i) {
                        st.regions[ri].pages.set(i, PageState::InFlight);
                        st.fates.remove(&a);
                        v.push((a, k));
                    }
                    a += PAGE;
                }
            }
            v
        };
        let mut result = Ok(());
        for (a, k) in claimed {
            if let Err(e) = self.unshare_one(a, k) {
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        result?;
        let mut runs = Vec::new();
        self.pagemap.scan(
            start,
            end,
            PAGE_IS_PRESENT | PAGE_IS_PFNZERO,
            PAGE_IS_WRITTEN,
            PAGE_IS_PRESENT,
            &mut runs,
        )?;
        for r in &runs {
            // SAFETY: the runs are KSM-placed zero pages of regions this agent manages; a
            // write fault gives each a private zero-filled page (WP_ASYNC resolves it in the
            // kernel), which changes no byte the application can read.
            unsafe { sys::madvise(r.start, r.end - r.start, libc::MADV_POPULATE_WRITE) }?;
        }
        let mut st = self.lock();
        for ri in 0..st.regions.len() {
            for i in 0..st.regions[ri].pages.len() {
                let a = st.regions[ri].start + i as u64 * PAGE;
                if a >= start && a < end && st.regions[ri].pages.get(i) == PageState::Zero {
                    st.set(ri, i, PageState::Anon);
                }
            }
        }
        Ok(())
    }

    /// Copy canonical page `k` into the claimed hole `a` (the page it stands for), wherever
    /// the application left it meanwhile. On failure (ENOMEM) the page stays merged.
    fn unshare_one(&self, a: u64, k: u32) -> io::Result<()> {
        let r = self.follow(a, |to| match self.copy_canonical(k, to) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            r => r,
        });
        let mut st = self.lock();
        let fate = st.fates.remove(&a);
        let at = fate.map_or(a, |f| f.now);
        let dropped = fate.is_some_and(|f| f.dropped);
        if let Err(e) = r {
            // Not copied (no memory): the page stays merged.
            if let Some((ri, i, PageState::InFlight)) = st.page(at) {
                st.regions[ri].pages.set(i, PageState::Merged(k));
            }
            drop(st);
            let _ = self.uffd.wake(at, PAGE);
            return Err(e);
        }
        let ours = if let Some((ri, i, PageState::InFlight)) = st.page(at) {
            st.regions[ri].pages.set(i, PageState::Anon);
            true
        } else {
            false
        };
        st.outbox.push(Change::Unmerged { addr: at, k });
        drop(st);
        if dropped && ours {
            // The application discarded it while it was being copied in: it reads zeros.
            // SAFETY: the page is one of this agent's regions; the application asked for it
            // to be discarded.
            let _ = unsafe { sys::madvise(at, PAGE, libc::MADV_DONTNEED) };
        }
        let _ = self.uffd.wake(at, PAGE);
        Ok(())
    }

    /// Run `f` on where the in-flight page claimed at `addr` is now, following it as the
    /// application moves it (an `mremap` under way answers EAGAIN, or leaves the old place
    /// unmapped before its event is handled). `Ok(None)`: the application discarded or
    /// unmapped it, so nothing is to be done; `Ok(Some(at))`: done at `at`.
    pub(crate) fn follow(
        &self,
        addr: u64,
        mut f: impl FnMut(u64) -> io::Result<()>,
    ) -> io::Result<Option<u64>> {
        let mut last = Err(io::Error::from_raw_os_error(libc::EAGAIN));
        for _ in 0..1000 {
            let seen = self.events_seen();
            let at = match self.lock().fates.get(&addr).copied() {
                None => addr,
                Some(fate) if fate.dropped => return Ok(None),
                Some(fate) => fate.now,
            };
            match f(at) {
                Ok(()) => return Ok(Some(at)),
                Err(e) => {
                    // Wait for the events queued by now, then look again: the page may have
                    // moved (or gone) meanwhile.
                    self.wait_events_after(seen);
                    let moved = self.lock().fates.get(&addr).copied();
                    // Nothing mapped there: the application is unmapping or moving the page
                    // and its event is not queued yet. It will be: wait for it.
                    let again = is_again(&e)
                        || e.raw_os_error() == Some(libc::ENOENT) && !sys::is_mapped(at);
                    last = Err(e);
                    if !again && moved.map_or(addr, |m| if m.dropped { 0 } else { m.now }) == at {
                        break;
                    }
                }
            }
        }
        last.map(|()| None)
    }

    /// Run `f` until it stops answering EAGAIN (the address space is changing: an unmap,
    /// discard or move is under way and its event is being read). Each retry waits for
    /// the handler thread to handle the events queued by then.
    pub(crate) fn with_retry(&self, mut f: impl FnMut() -> io::Result<()>) -> io::Result<()> {
        for _ in 0..10_000 {
            let seen = self.events_seen();
            match f() {
                Err(e) if is_again(&e) => self.wait_events_after(seen),
                r => return r,
            }
        }
        Err(io::Error::from_raw_os_error(libc::EAGAIN))
    }
}
