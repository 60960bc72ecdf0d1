//! A simulated machine: the memory manager, KSM wired into it where the kernel calls its
//! hooks (madvise, prctl, mmap, fork, exec, exit), ksmd, and a deterministic virtual clock.

use crate::mm::{BatchRace, FailEvery, Prot, SimError, SimMemory};
use samepage_engine::{
    Clock, Convergence, DomainError, DomainId, KnobError, Ksm, KsmCounters, KsmStat, MmExit, MmId,
    ScanBatch, UnmergeError, Until, PAGE_SIZE, PAGE_SIZE_U64,
};

/// Virtual nanoseconds ksmd spends per scanned page in the simulation's time model.
pub const SIM_NS_PER_PAGE: u64 = 250;

/// The deterministic clock of a simulation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtualClock {
    /// Wall time, ns.
    pub now_ns: u64,
    /// ksmd's CPU time, ns.
    pub cpu_ns: u64,
}

impl Clock for VirtualClock {
    fn now_ns(&self) -> u64 {
        self.now_ns
    }
    fn cpu_ns(&self) -> u64 {
        self.cpu_ns
    }
}

/// `madvise` advice the simulator understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// `MADV_MERGEABLE`: let KSM merge the private anonymous pages of the range.
    Mergeable,
    /// `MADV_UNMERGEABLE`: unshare what KSM merged in the range and stop merging it.
    Unmergeable,
    /// `MADV_DONTNEED`: discard the range's private pages (they read back as zeros).
    DontNeed,
}

/// Errors of simulated system calls that reach KSM.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// The memory manager refused the call (no such process, bad range, out of memory...).
    #[error(transparent)]
    Mm(#[from] SimError),
    /// Unsharing merged pages failed (`MADV_UNMERGEABLE`, `PR_SET_MEMORY_MERGE=0`).
    #[error(transparent)]
    Unmerge(#[from] UnmergeError),
}

/// A new process's mergeable region, as [`SimSystem::spawn_with_pages`] made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spawned {
    /// The process.
    pub mm: MmId,
    /// First address of the region.
    pub start: u64,
    /// Length of the region, bytes.
    pub len: u64,
}

/// The whole simulated machine: processes in a [`SimMemory`], KSM (a [`Ksm`]) wired into it,
/// ksmd on a [`VirtualClock`].
///
/// ```
/// use samepage_sim::{Advice, Prot, SimSystem};
/// let mut sys = SimSystem::new();
/// let p = sys.spawn();
/// let a = sys.mmap(p, 4 * 4096, Prot::RW).unwrap();
/// for i in 0..4 {
///     sys.write(p, a + i * 4096, &[0xcf; 4096]).unwrap();
/// }
/// sys.madvise(p, a, 4 * 4096, Advice::Mergeable).unwrap();
/// assert!(sys.ksm_start()); // run=1, then two full scans
/// let c = sys.counters();
/// assert_eq!((c.pages_shared, c.pages_sharing), (1, 3));
/// ```
#[derive(Debug)]
pub struct SimSystem {
    mem: SimMemory,
    ksm: Ksm,
    clock: VirtualClock,
}

impl Default for SimSystem {
    fn default() -> Self {
        Self::new()
    }
}

impl SimSystem {
    /// A machine with KSM at its defaults (`run=0`) and no processes.
    pub fn new() -> Self {
        Self {
            mem: SimMemory::new(),
            ksm: Ksm::new(),
            clock: VirtualClock::default(),
        }
    }

    /// The memory manager, to inspect (page tables, frames, areas).
    pub fn mem(&self) -> &SimMemory {
        &self.mem
    }

    /// The KSM engine, to inspect (tunables, `full_scans`, metadata).
    pub fn ksm(&self) -> &Ksm {
        &self.ksm
    }

    /// The virtual clock.
    pub fn clock(&self) -> VirtualClock {
        self.clock
    }

    /// Test hook: the memory manager, for changes behind KSM's back (calling the
    /// [`Memory`](samepage_engine::Memory) methods directly, deferring merges).
    #[cfg(feature = "test-hooks")]
    pub fn mem_mut(&mut self) -> &mut SimMemory {
        &mut self.mem
    }

    /// Test hook: the engine, the memory manager and the clock at once.
    #[cfg(feature = "test-hooks")]
    pub fn parts_mut(&mut self) -> (&mut Ksm, &mut SimMemory, &mut VirtualClock) {
        (&mut self.ksm, &mut self.mem, &mut self.clock)
    }

    /// A new process.
    pub fn spawn(&mut self) -> MmId {
        self.mem.create_mm()
    }

    /// `mmap` of private anonymous memory on node 0 (see [`SimSystem::mmap_on`]).
    pub fn mmap(&mut self, mm: MmId, len: u64, prot: Prot) -> Result<u64, SysError> {
        self.mmap_on(mm, len, prot, false, 0)
    }

    /// `mmap` with the area's sharing and NUMA node; a process that set
    /// `PR_SET_MEMORY_MERGE` gets the area mergeable at once.
    pub fn mmap_on(
        &mut self,
        mm: MmId,
        len: u64,
        prot: Prot,
        shared: bool,
        node: u32,
    ) -> Result<u64, SysError> {
        let a = self.mem.mmap(mm, len, prot, shared, node)?;
        if self.ksm.new_vma_mergeable(mm) {
            samepage_engine::Memory::set_mergeable(&mut self.mem, mm, a, a + len, true);
        }
        Ok(a)
    }

    /// A new process with one private region of `pages` pages, page `i` filled by `fill`, made
    /// mergeable (how workloads and images are loaded).
    pub fn spawn_with_pages(
        &mut self,
        pages: u64,
        mut fill: impl FnMut(u64, &mut [u8; PAGE_SIZE]),
    ) -> Result<Spawned, SysError> {
        let mm = self.spawn();
        let len = pages * PAGE_SIZE_U64;
        let start = self.mmap(mm, len, Prot::RW)?;
        let mut buf = [0u8; PAGE_SIZE];
        for i in 0..pages {
            fill(i, &mut buf);
            self.mem.write(mm, start + i * PAGE_SIZE_U64, &buf)?;
        }
        self.madvise(mm, start, len, Advice::Mergeable)?;
        Ok(Spawned { mm, start, len })
    }

    /// A store of `data` at `addr` by the process (write faults as needed).
    pub fn write(&mut self, mm: MmId, addr: u64, data: &[u8]) -> Result<(), SimError> {
        self.mem.write(mm, addr, data)
    }

    /// A write through `/proc/PID/mem` (FOLL_FORCE): see [`SimMemory::force_write`].
    pub fn force_write(&mut self, mm: MmId, addr: u64, data: &[u8]) -> Result<(), SimError> {
        self.mem.force_write(mm, addr, data)
    }

    /// A load of `buf.len()` bytes at `addr` by the process (read faults as needed).
    pub fn read(&mut self, mm: MmId, addr: u64, buf: &mut [u8]) -> Result<(), SimError> {
        self.mem.read(mm, addr, buf)
    }

    /// `munmap`.
    pub fn munmap(&mut self, mm: MmId, start: u64, len: u64) -> Result<(), SimError> {
        self.mem.munmap(mm, start, len)
    }

    /// `mprotect`.
    pub fn mprotect(&mut self, mm: MmId, start: u64, len: u64, prot: Prot) -> Result<(), SimError> {
        self.mem.mprotect(mm, start, len, prot)
    }

    /// Pin the page at `addr` for I/O: see [`SimMemory::pin`].
    pub fn pin(&mut self, mm: MmId, addr: u64) -> Result<samepage_engine::FrameId, SimError> {
        self.mem.pin(mm, addr)
    }

    /// Release a pin taken by [`SimSystem::pin`].
    pub fn unpin(&mut self, frame: samepage_engine::FrameId) {
        self.mem.unpin(frame)
    }

    /// khugepaged collapses the huge page at `addr`: see [`SimMemory::collapse_huge`].
    pub fn collapse_huge(&mut self, mm: MmId, addr: u64) -> Result<bool, SimError> {
        self.mem.collapse_huge(mm, addr)
    }

    /// Give the machine room for at most `limit` frames: see [`SimMemory::set_frame_limit`].
    pub fn set_frame_limit(&mut self, limit: Option<usize>) {
        self.mem.set_frame_limit(limit)
    }

    /// Carry out merges at the end of each scan batch instead of at once, failing some on
    /// purpose: see [`SimMemory::defer_merges`].
    pub fn defer_merges(&mut self, fail: Option<FailEvery>) {
        self.mem.defer_merges(fail)
    }

    /// Have a process do `race` while the next scan batch runs, after the engine asked for
    /// its merges and before they are carried out: see [`SimMemory::during_batch`].
    pub fn during_batch(&mut self, race: BatchRace) {
        self.mem.during_batch(race)
    }

    /// `madvise`.
    pub fn madvise(
        &mut self,
        mm: MmId,
        start: u64,
        len: u64,
        advice: Advice,
    ) -> Result<(), SysError> {
        match advice {
            Advice::Mergeable => self
                .ksm
                .madvise_mergeable(&mut self.mem, mm, start, start + len),
            Advice::Unmergeable => {
                self.ksm
                    .madvise_unmergeable(&mut self.mem, mm, start, start + len)?
            }
            Advice::DontNeed => self.mem.madv_dontneed(mm, start, len)?,
        }
        Ok(())
    }

    /// `prctl(PR_SET_MEMORY_MERGE, on)`.
    pub fn prctl_set_memory_merge(&mut self, mm: MmId, on: bool) -> Result<(), SysError> {
        Ok(self.ksm.prctl_set_memory_merge(&mut self.mem, mm, on)?)
    }

    /// `prctl(PR_GET_MEMORY_MERGE)`.
    pub fn prctl_get_memory_merge(&self, mm: MmId) -> bool {
        self.ksm.prctl_get_memory_merge(mm)
    }

    /// `fork`.
    pub fn fork(&mut self, mm: MmId) -> Result<MmId, SysError> {
        let child = self.mem.fork(mm)?;
        self.ksm.fork(mm, child);
        Ok(child)
    }

    /// `execve`: the process gets a new, empty address space (returned); the old one is torn
    /// down. `PR_SET_MEMORY_MERGE` survives exec.
    pub fn exec(&mut self, mm: MmId) -> Result<MmId, SysError> {
        if !self.mem.has_mm(mm) {
            return Err(SimError::NoMm(mm).into());
        }
        let new = self.mem.create_mm();
        self.ksm.execve(mm, new);
        // The old mm is KSM's to free, now or on its next pass.
        let _ = self.exit(mm)?;
        Ok(new)
    }

    /// `exit`: the address space is torn down, then KSM's `ksm_exit` runs. Says whether KSM
    /// freed everything of it at once (see [`Ksm::exit`]).
    pub fn exit(&mut self, mm: MmId) -> Result<MmExit, SysError> {
        self.mem.exit(mm)?;
        Ok(self.ksm.exit(mm))
    }

    /// Put process `mm` in security domain `domain` (see [`Ksm::set_domain`]): before its
    /// pages are scanned.
    pub fn set_domain(&mut self, mm: MmId, domain: DomainId) -> Result<(), DomainError> {
        self.ksm.set_domain(mm, domain)
    }

    /// `echo value > /sys/kernel/mm/ksm/name`.
    pub fn write_knob(&mut self, name: &str, value: &str) -> Result<(), KnobError> {
        self.ksm.write_knob(&mut self.mem, name, value)
    }

    /// `cat /sys/kernel/mm/ksm/name`.
    pub fn read_knob(&self, name: &str) -> Option<String> {
        self.ksm.show(&self.mem, name)
    }

    /// The global counters.
    pub fn counters(&self) -> KsmCounters {
        self.ksm.counters(&self.mem)
    }

    /// `/proc/<pid>/ksm_stat`.
    pub fn ksm_stat(&self, mm: MmId) -> KsmStat {
        self.ksm.ksm_stat(&self.mem, mm)
    }

    /// `ksm_do_scan(n)` now, whatever `run` says (as a test drives the scanner by hand); the
    /// clock advances by the scan's cost, without ksmd's sleep.
    pub fn scan(&mut self, n: u64) -> ScanBatch {
        let b = self.ksm.do_scan(&mut self.mem, &self.clock, n);
        let cost = b.scanned * SIM_NS_PER_PAGE;
        self.clock.cpu_ns += cost;
        self.clock.now_ns += cost;
        b
    }

    /// One ksmd wake-up, then its sleep, in virtual time.
    pub fn ksmd_step(&mut self) -> ScanBatch {
        let b = self.ksm.ksmd_batch(&mut self.mem, &self.clock);
        let cost = b.scanned * SIM_NS_PER_PAGE;
        self.clock.cpu_ns += cost;
        self.clock.now_ns += cost + self.ksm.tunables().sleep_millisecs as u64 * 1_000_000;
        b
    }

    /// Run ksmd until `full_scans` has grown by `n` (what the kernel selftests wait for).
    /// Returns false if ksmd is not running or stopped making progress.
    pub fn run_full_scans(&mut self, n: u64) -> bool {
        let target = self.ksm.full_scans() + n;
        while self.ksm.full_scans() < target {
            if !self.ksm.ksmd_should_run() {
                return false;
            }
            self.ksmd_step();
        }
        true
    }

    /// Run ksmd one full scan at a time, feeding `conv` after each, until it is done.
    /// Returns false if ksmd is not running (or stops: nothing left to scan), or if
    /// `max_passes` full scans were not enough.
    pub fn run_until(&mut self, conv: &mut Convergence, max_passes: u64) -> bool {
        for _ in 0..max_passes {
            if conv.is_done() {
                return true;
            }
            if !self.run_full_scans(1) {
                return false;
            }
            conv.observe(&self.counters());
        }
        conv.is_done()
    }

    /// Run ksmd until merging has converged ([`Until::Stable`]): at least `min_passes` full
    /// scans, then one full scan that changes none of the merge counters. Returns the number
    /// of full scans run, or `None` if ksmd is not running or `max_passes` were not enough.
    pub fn run_until_stable(&mut self, min_passes: u64, max_passes: u64) -> Option<u64> {
        let mut conv = Convergence::new(Until::Stable { min_passes }, &self.counters());
        self.run_until(&mut conv, max_passes)
            .then_some(conv.passes())
    }

    /// The kernel selftests' `ksm_start`: `run=1`, then wait for two more full scans.
    pub fn ksm_start(&mut self) -> bool {
        self.write_knob("run", "1").expect("run=1 is valid");
        self.run_full_scans(2)
    }

    /// The kernel selftests' `ksm_stop`: `run=2` (unmerge everything).
    pub fn ksm_stop(&mut self) -> Result<(), KnobError> {
        self.write_knob("run", "2")
    }
}
