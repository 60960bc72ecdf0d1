//! The host kernel's KSM: `/sys/kernel/mm/ksm`, `/proc/<pid>/ksm_stat`, ksmd's CPU time, a
//! guard that gives the host its knobs back, and plain anonymous memory to hand to it.
//!
//! The host's counters are global and shared with every other process: whoever changes a knob
//! through [`KnobGuard`] gets every knob restored when the guard is dropped (also on a panic),
//! and `run` is never left at 1.

use crate::sys::{Mapping, PAGE};
use samepage_engine::{KsmCounters, KsmStat, COUNTER_NAMES, TUNABLE_NAMES};
use std::io;
use std::time::Duration;
use thiserror::Error;

/// Where the kernel's KSM lives.
pub const KSM_DIR: &str = "/sys/kernel/mm/ksm";

/// Why the host's KSM cannot be used or read.
#[derive(Debug, Error)]
pub enum HostError {
    #[error("this kernel has no KSM ({KSM_DIR} is missing: CONFIG_KSM is off)")]
    NoKsm,
    #[error(
        "the host's KSM needs root: {KSM_DIR}/{0} is not writable by this user (run as root, \
         or use `samepage merge`, which needs no host knobs)"
    )]
    NotRoot(String),
    #[error(
        "the host's KSM is already running (run={0} in {KSM_DIR}/run): samepage will not take \
         ksmd over from whoever started it; stop it with `echo 0 > {KSM_DIR}/run` first"
    )]
    Busy(String),
    #[error(
        "the host's KSM still holds merged pages ({0}): its counters would mix them with this \
         run's; unmerge them with `echo 2 > {KSM_DIR}/run` (then echo 0) first"
    )]
    NotEmpty(String),
    #[error("writing {value} to {KSM_DIR}/{name}: {source}")]
    Write {
        name: String,
        value: String,
        source: io::Error,
    },
    #[error("reading {what}: {source}")]
    Read { what: String, source: io::Error },
}

/// The content of one file of `/sys/kernel/mm/ksm`, trimmed.
pub fn read_knob(name: &str) -> Result<String, HostError> {
    std::fs::read_to_string(format!("{KSM_DIR}/{name}"))
        .map(|s| s.trim().to_string())
        .map_err(|source| HostError::Read {
            what: format!("{KSM_DIR}/{name}"),
            source,
        })
}

/// `echo value > /sys/kernel/mm/ksm/name`.
pub fn write_knob(name: &str, value: &str) -> Result<(), HostError> {
    std::fs::write(format!("{KSM_DIR}/{name}"), value).map_err(|source| HostError::Write {
        name: name.into(),
        value: value.into(),
        source,
    })
}

/// Is KSM there at all?
pub fn present() -> bool {
    std::path::Path::new(KSM_DIR).is_dir()
}

/// Every counter of `/sys/kernel/mm/ksm`. Counters an older kernel lacks read as 0.
pub fn counters() -> Result<KsmCounters, HostError> {
    if !present() {
        return Err(HostError::NoKsm);
    }
    let get = |n: &str| -> i64 { read_knob(n).ok().and_then(|v| v.parse().ok()).unwrap_or(0) };
    let u = |n: &str| get(n).max(0) as u64;
    Ok(KsmCounters {
        pages_shared: u("pages_shared"),
        pages_sharing: u("pages_sharing"),
        pages_unshared: u("pages_unshared"),
        pages_volatile: u("pages_volatile"),
        pages_scanned: u("pages_scanned"),
        pages_skipped: u("pages_skipped"),
        full_scans: u("full_scans"),
        stable_node_chains: u("stable_node_chains"),
        stable_node_dups: u("stable_node_dups"),
        ksm_zero_pages: get("ksm_zero_pages"),
        general_profit: get("general_profit"),
    })
}

/// The counter names this kernel has (a subset of [`COUNTER_NAMES`]).
pub fn counter_names() -> Vec<&'static str> {
    COUNTER_NAMES
        .iter()
        .copied()
        .filter(|n| std::path::Path::new(&format!("{KSM_DIR}/{n}")).exists())
        .collect()
}

/// The host's tunables as (name, value), for those this kernel has.
pub fn tunables() -> Vec<(String, String)> {
    TUNABLE_NAMES
        .iter()
        .filter_map(|n| read_knob(n).ok().map(|v| (n.to_string(), v)))
        .collect()
}

/// `/proc/<pid>/ksm_stat`.
pub fn ksm_stat(pid: u32) -> Result<KsmStat, HostError> {
    let path = format!("/proc/{pid}/ksm_stat");
    let s = std::fs::read_to_string(&path).map_err(|source| HostError::Read {
        what: path.clone(),
        source,
    })?;
    Ok(parse_ksm_stat(pid, &s))
}

/// Parse the layout of `fs/proc/base.c:proc_pid_ksm_stat`.
pub fn parse_ksm_stat(pid: u32, s: &str) -> KsmStat {
    let mut st = KsmStat {
        pid,
        ..KsmStat::default()
    };
    for line in s.lines() {
        let Some((k, v)) = line.split_once(' ') else {
            continue;
        };
        let k = k.trim_end_matches(':');
        let v = v.trim();
        let n = v.parse::<i64>().unwrap_or(0);
        match k {
            "ksm_rmap_items" => st.ksm_rmap_items = n.max(0) as u64,
            "ksm_zero_pages" => st.ksm_zero_pages = n,
            "ksm_merging_pages" => st.ksm_merging_pages = n.max(0) as u64,
            "ksm_process_profit" => st.ksm_process_profit = n,
            "ksm_merge_any" => st.ksm_merge_any = v == "yes",
            "ksm_mergeable" => st.ksm_mergeable = v == "yes",
            _ => {}
        }
    }
    st
}

/// Processes whose `ksm_stat` shows KSM at work (rmap items, merged or zero pages).
pub fn ksm_processes() -> Vec<KsmStat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut v: Vec<KsmStat> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| ksm_stat(pid).ok())
        .filter(|s| s.ksm_rmap_items > 0 || s.ksm_merging_pages > 0 || s.ksm_zero_pages != 0)
        .collect();
    v.sort_by_key(|s| s.pid);
    v
}

/// The pid of the `ksmd` kernel thread.
pub fn ksmd_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.find_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "ksmd").then_some(pid)
    })
}

/// CPU time ksmd has used, in nanoseconds (`/proc/<ksmd>/schedstat`).
pub fn ksmd_cpu_ns(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// Holds the host's KSM for one run: every knob is saved when taken and restored when
/// dropped, `run` last and never to anything but what it was (which [`KnobGuard::take`]
/// requires to be 0).
#[derive(Debug)]
pub struct KnobGuard {
    saved: Vec<(String, String)>,
}

impl KnobGuard {
    /// Take the host's KSM: it must exist, be writable by this user, be stopped and hold no
    /// merged pages.
    pub fn take() -> Result<Self, HostError> {
        if !present() {
            return Err(HostError::NoKsm);
        }
        let run = read_knob("run")?;
        // Writing the value it already has changes nothing and tells whether we may.
        if let Err(HostError::Write { source, .. }) = write_knob("run", &run) {
            if matches!(source.kind(), io::ErrorKind::PermissionDenied) {
                return Err(HostError::NotRoot("run".into()));
            }
            return Err(HostError::Write {
                name: "run".into(),
                value: run,
                source,
            });
        }
        if run != "0" {
            return Err(HostError::Busy(run));
        }
        let c = counters()?;
        if c.pages_shared + c.pages_sharing > 0 || c.ksm_zero_pages > 0 {
            return Err(HostError::NotEmpty(format!(
                "pages_shared {}, pages_sharing {}, ksm_zero_pages {}",
                c.pages_shared, c.pages_sharing, c.ksm_zero_pages
            )));
        }
        Ok(Self { saved: tunables() })
    }

    /// Set a knob for this run (restored on drop). `run` may be set to 0, 1 or 2.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), HostError> {
        write_knob(name, value)
    }

    /// The value a knob had when the guard was taken.
    pub fn saved(&self, name: &str) -> Option<&str> {
        self.saved
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Unmerge everything the host merged (`run=2`, which also frees its rmap items) and
    /// stop it.
    pub fn unmerge_all(&mut self) -> Result<(), HostError> {
        write_knob("run", "2")?;
        write_knob("run", "0")
    }
}

impl Drop for KnobGuard {
    fn drop(&mut self) {
        // Stop ksmd first, then put every knob back; run last.
        let _ = write_knob("run", "0");
        for (name, value) in &self.saved {
            if name == "run" || read_knob(name).ok().as_deref() == Some(value.as_str()) {
                continue;
            }
            if write_knob(name, value).is_err() && name == "merge_across_nodes" {
                // EBUSY while pages are merged: unmerge, then it can change.
                let _ = write_knob("run", "2");
                let _ = write_knob(name, value);
            }
        }
        if let Some(run) = self.saved("run") {
            let _ = write_knob("run", run);
        }
    }
}

/// Plain private anonymous memory of this process, as an application has it: the copy of a
/// workload handed to the host's KSM with `MADV_MERGEABLE`.
#[derive(Debug)]
pub struct AnonMemory {
    m: Mapping,
}

impl AnonMemory {
    /// `len` bytes (a multiple of the page size) of fresh anonymous memory.
    pub fn new(len: u64) -> io::Result<Self> {
        let m = Mapping::anon(len)?;
        // Huge pages would hide the 4 KiB pages from KSM until they are split.
        let _ = m.advise(libc::MADV_NOHUGEPAGE);
        Ok(Self { m })
    }

    /// First address.
    pub fn addr(&self) -> u64 {
        self.m.addr()
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.m.len()
    }

    /// Never empty; for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.m.is_empty()
    }

    /// Copy `data` in at byte offset `off`.
    pub fn write(&self, off: u64, data: &[u8]) -> io::Result<()> {
        self.m.write(off, data)
    }

    /// Read the page at byte offset `off` (page aligned).
    pub fn read_page(
        &self,
        off: u64,
        buf: &mut [u8; samepage_engine::PAGE_SIZE],
    ) -> io::Result<()> {
        self.m.read(off, buf)
    }

    /// `madvise(MADV_MERGEABLE)` or `MADV_UNMERGEABLE` on all of it.
    pub fn set_mergeable(&self, on: bool) -> io::Result<()> {
        self.m.advise(if on {
            libc::MADV_MERGEABLE
        } else {
            libc::MADV_UNMERGEABLE
        })
    }

    /// Store one word into the page at byte offset `off` with a user-mode write, as the
    /// application would, and return how long the store took (the first write to a merged
    /// or zero page includes the copy-on-write fault).
    pub fn timed_store(&self, off: u64, v: u64) -> io::Result<Duration> {
        if off.checked_add(8).is_none_or(|e| e > self.len()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range outside the memory",
            ));
        }
        let a = self.addr() + (off & !7);
        let t = std::time::Instant::now();
        // SAFETY: the word lies inside this mapping, which lives as long as `self` and to
        // which no Rust reference points; it is aligned.
        unsafe { std::sync::atomic::AtomicU64::from_ptr(a as *mut u64) }
            .store(v, std::sync::atomic::Ordering::Relaxed);
        Ok(t.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ksm_stat_parses_the_procfs_layout() {
        let s = "ksm_rmap_items 10\nksm_zero_pages 3\nksm_merging_pages 4\n\
                 ksm_process_profit -12\nksm_merge_any: no\nksm_mergeable: yes\n";
        let st = parse_ksm_stat(7, s);
        assert_eq!(
            st,
            KsmStat {
                pid: 7,
                ksm_rmap_items: 10,
                ksm_zero_pages: 3,
                ksm_merging_pages: 4,
                ksm_process_profit: -12,
                ksm_merge_any: false,
                ksm_mergeable: true,
            }
        );
        // The engine prints the same layout back.
        assert_eq!(st.to_string(), s);
    }

    #[test]
    fn anon_memory_refuses_ranges_outside_it() {
        let m = AnonMemory::new(2 * PAGE).unwrap();
        assert!(m.write(PAGE, &[1u8; 4096]).is_ok());
        assert!(m.write(PAGE + 1, &[1u8; 4096]).is_err());
        assert!(m.timed_store(2 * PAGE, 1).is_err());
        let mut b = [0u8; 4096];
        m.read_page(PAGE, &mut b).unwrap();
        assert_eq!(b, [1u8; 4096]);
        assert!(AnonMemory::new(100).is_err());
    }
}

/// Raises `vm.max_map_count` for as long as it lives, and puts the old value back when
/// dropped: samepage's merges of isolated pages each cost mappings.
#[derive(Debug)]
pub struct MaxMapCount {
    saved: Option<String>,
}

const MAX_MAP_COUNT: &str = "/proc/sys/vm/max_map_count";

impl MaxMapCount {
    /// At least `n` (unchanged if it is already that high).
    pub fn raise(n: u64) -> Result<Self, HostError> {
        let cur = std::fs::read_to_string(MAX_MAP_COUNT).map_err(|source| HostError::Read {
            what: MAX_MAP_COUNT.into(),
            source,
        })?;
        let cur = cur.trim().to_string();
        if cur.parse::<u64>().is_ok_and(|c| c >= n) {
            return Ok(Self { saved: None });
        }
        std::fs::write(MAX_MAP_COUNT, n.to_string()).map_err(|source| HostError::Write {
            name: MAX_MAP_COUNT.into(),
            value: n.to_string(),
            source,
        })?;
        Ok(Self { saved: Some(cur) })
    }
}

impl Drop for MaxMapCount {
    fn drop(&mut self) {
        if let Some(v) = &self.saved {
            let _ = std::fs::write(MAX_MAP_COUNT, v);
        }
    }
}
