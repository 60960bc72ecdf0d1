//! A simulated machine: the memory manager, KSM wired into it where the kernel calls its
//! hooks (madvise, prctl, mmap, fork, exit), ksmd, and a deterministic virtual clock.

use crate::mm::{Prot, SimError, SimMemory};
use samepage_engine::{Clock, KnobError, Ksm, KsmCounters, KsmStat, MmId, ScanBatch, UnmergeError};

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
    Mergeable,
    Unmergeable,
    DontNeed,
}

/// Errors of simulated system calls that reach KSM.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error(transparent)]
    Mm(#[from] SimError),
    #[error(transparent)]
    Unmerge(#[from] UnmergeError),
}

/// The counters that settle when merging has converged ([`KsmCounters::merge_state`]).
/// (`pages_unshared` and `pages_volatile` keep moving under smart scan, which takes
/// unmergeable pages in and out of the unstable tree by design.)
pub fn merge_state(c: &KsmCounters) -> [i64; 5] {
    c.merge_state()
}

/// The whole simulated machine.
#[derive(Debug)]
pub struct SimSystem {
    pub mem: SimMemory,
    pub ksm: Ksm,
    pub clock: VirtualClock,
}

impl Default for SimSystem {
    fn default() -> Self {
        Self::new()
    }
}

impl SimSystem {
    /// A machine with KSM at its defaults (`run=0`).
    pub fn new() -> Self {
        Self {
            mem: SimMemory::new(),
            ksm: Ksm::new(),
            clock: VirtualClock::default(),
        }
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
    /// mergeable (how workloads and images are loaded). Returns the process and the region.
    pub fn spawn_with_pages(
        &mut self,
        pages: u64,
        mut fill: impl FnMut(u64, &mut [u8; samepage_engine::PAGE_SIZE]),
    ) -> Result<(MmId, u64), SysError> {
        use samepage_engine::{PAGE_SIZE, PAGE_SIZE_U64};
        let mm = self.spawn();
        let len = pages * PAGE_SIZE_U64;
        let base = self.mmap(mm, len, Prot::RW)?;
        let mut buf = [0u8; PAGE_SIZE];
        for i in 0..pages {
            fill(i, &mut buf);
            self.mem.write(mm, base + i * PAGE_SIZE_U64, &buf)?;
        }
        self.madvise(mm, base, len, Advice::Mergeable)?;
        Ok((mm, base))
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
        if self.mem.mm_exiting_pub(mm) {
            return Err(SimError::NoMm(mm).into());
        }
        let new = self.mem.create_mm();
        self.ksm.execve(mm, new);
        self.exit(mm)?;
        Ok(new)
    }

    /// `exit`.
    pub fn exit(&mut self, mm: MmId) -> Result<(), SysError> {
        self.mem.exit(mm)?;
        self.ksm.exit(mm);
        Ok(())
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

    /// Run ksmd until merging has converged: at least `min_passes` full scans, then one full
    /// scan that changes none of the merge counters ([`merge_state`]). Returns the number of
    /// full scans run, or `None` if ksmd is not running or `max_passes` were not enough.
    pub fn run_until_stable(&mut self, min_passes: u64, max_passes: u64) -> Option<u64> {
        let mut prev = merge_state(&self.counters());
        for pass in 1..=max_passes {
            if !self.run_full_scans(1) {
                return None;
            }
            let now = merge_state(&self.counters());
            if pass > min_passes && now == prev {
                return Some(pass);
            }
            prev = now;
        }
        None
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
