//! The host kernel's KSM: `/sys/kernel/mm/ksm`, `/proc/<pid>/ksm_stat`, ksmd's CPU time, a
//! session that gives the host its knobs back however a command ends, and plain anonymous
//! memory to hand to it.
//!
//! The host's KSM is global and shared with every process on the machine. Whatever changes it
//! (or `vm.max_map_count`) goes through a [`HostSession`]:
//!
//! - **One at a time.** A session holds `flock(LOCK_EX)` on [`LOCK_FILE`]
//!   (`/run/samepage/host-ksm.lock`; the directory is created 0755) for as long as it lives, so
//!   `flock /run/samepage/host-ksm.lock CMD` serialises a script with samepage. The holder
//!   writes its pid into the lock file (decimal, one line) and empties it when it lets go. A
//!   program started under the lock inherits the locked descriptor (flock(1) passes it to CMD):
//!   samepage then uses that lock instead of waiting for its own parent. samepage sessions also
//!   take an OFD write lock (`fcntl(F_OFD_SETLK)`) on the same file, so that two samepage
//!   commands started under one holder still run one after the other. A session waits for the
//!   lock a bounded time, saying for whom, then refuses with a sentence.
//! - **Saved before the first change.** Every tunable of `/sys/kernel/mm/ksm` and
//!   `vm.max_map_count` are written to [`SAVED_FILE`] (`/run/samepage/host-ksm.saved`: a
//!   temporary file, fsynced, renamed over, the directory fsynced) before anything changes:
//!
//!   ```text
//!   # comment lines start with '#'
//!   pid=1234
//!   command=samepage compare --size 64M
//!   advisor_max_cpu=70
//!   advisor_mode=none
//!   pages_to_scan=100
//!   run=0
//!   ...                      (every tunable the kernel has, by its file name, as written to it)
//!   vm.max_map_count=65530
//!   ```
//!
//!   Values are what one writes, not what one reads (`advisor_mode=none`, not
//!   `[none] scan-time`).
//! - **Put back however it ends**: at the end of every kernel phase, when the session ends
//!   (also on an error, a panic, Ctrl-C or SIGTERM, which the commands turn into errors), and,
//!   after a SIGKILL, by the next session that takes the lock: it finds the file of a pid that
//!   is gone, writes the values back, says so, and removes the file. Putting back is: `run=2`
//!   (which unmerges and frees every rmap item) unless another process has mergeable memory
//!   (then `run=0`: samepage never unmerges another program's pages), every knob, the
//!   `advisor_*` knobs before `advisor_mode` and `pages_to_scan` after it (a change of
//!   `advisor_mode` resets `pages_to_scan`, and `pages_to_scan` cannot be written while
//!   `advisor_mode` is `scan-time`: then the advisor owns it and it is not compared),
//!   `vm.max_map_count`, `run` last; then everything is read back, and the file is removed only
//!   if all of it is as saved.

use crate::sys::Mapping;
use samepage_engine::{KsmCounters, KsmStat, TUNABLE_NAMES};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Where the kernel's KSM lives.
pub const KSM_DIR: &str = "/sys/kernel/mm/ksm";

/// `vm.max_map_count`.
pub const MAX_MAP_COUNT: &str = "/proc/sys/vm/max_map_count";

/// The directory of the lock and of the saved state.
pub const RUN_DIR: &str = "/run/samepage";

/// The lock every command that changes the host's KSM holds.
pub const LOCK_FILE: &str = "/run/samepage/host-ksm.lock";

/// The host's knobs as they were before a session changed them.
pub const SAVED_FILE: &str = "/run/samepage/host-ksm.saved";

/// Why the host's KSM cannot be used or read.
#[derive(Debug, Error)]
pub enum HostError {
    /// `/sys/kernel/mm/ksm` is missing: the kernel was built without `CONFIG_KSM`.
    #[error("this kernel has no KSM ({KSM_DIR} is missing: CONFIG_KSM is off)")]
    NoKsm,
    /// This user may not write the knob named (a file of [`KSM_DIR`], such as `run`): the
    /// host's KSM needs root.
    #[error(
        "the host's KSM needs root: {KSM_DIR}/{0} is not writable by this user (run as root, \
         or use `samepage merge`, which needs no host knobs)"
    )]
    NotRoot(String),
    /// The host's ksmd runs already (`run` holds the value given, not 0): samepage does not
    /// take it over from whoever started it.
    #[error(
        "the host's KSM is already running (run={0} in {KSM_DIR}/run): samepage will not take \
         ksmd over from whoever started it; stop it with `echo 0 > {KSM_DIR}/run` first"
    )]
    Busy(String),
    /// `run` is 0 but the host's KSM still holds merged or KSM-placed zero pages of no
    /// process that uses KSM now (the counters that say so): they would mix with the run's.
    #[error(
        "the host's KSM still holds merged pages ({0}) that no running process has: its \
         counters would mix them with this run's; unmerge them with `echo 2 > {KSM_DIR}/run` \
         (then echo 0) first"
    )]
    NotEmpty(String),
    /// Other processes have mergeable memory (as [`list_users`] lists them): the kernel's
    /// counters would count their pages, and putting the host back with `run=2` would
    /// unmerge them.
    #[error(
        "other processes use KSM on this host: {0}. The kernel's figures would count their \
         pages, and putting the host back (run=2) would unmerge them; run this when they have \
         finished"
    )]
    OthersUseKsm(String),
    /// Another process (as [`list_users`] lists them) started using KSM while the kernel's
    /// engine ran: the kernel's figures count its pages, so they are not reported.
    #[error(
        "another process started using KSM while the kernel's engine ran: {0}. The kernel's \
         figures count its pages, so they are not reported; samepage unmerged only its own \
         memory and did not write run=2, which would have unmerged that process's pages too \
         (the kernel keeps samepage's stale rmap items; the next samepage compare or bench frees them \
         with run=2 once no other process uses KSM)"
    )]
    OthersStarted(String),
    /// Writing a knob of [`KSM_DIR`] or [`MAX_MAP_COUNT`] failed.
    #[error("writing {value} to {path}: {source}")]
    Write {
        /// The file written.
        path: String,
        /// The value written to it.
        value: String,
        /// Why the write failed (`EINVAL`: the kernel refused the value).
        source: io::Error,
    },
    /// Reading a file of [`KSM_DIR`], `/proc` or [`MAX_MAP_COUNT`] failed.
    #[error("reading {what}: {source}")]
    Read {
        /// The file read (and how, where that matters).
        what: String,
        /// Why the read failed.
        source: io::Error,
    },
    /// The lock file of a session could not be opened, locked or written.
    #[error("cannot use the lock {path}: {source}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Another samepage command, or a program holding the flock, kept the lock longer than
    /// [`Waiting::max`].
    #[error(
        "another samepage command that uses the host's KSM ({holder}) still holds {path} after \
         {waited} s; run this one when it has finished, or wait longer with --wait SECONDS"
    )]
    LockBusy {
        /// Who holds it: `pid N: COMMAND`, or that its pid is unknown.
        holder: String,
        /// The lock file.
        path: PathBuf,
        /// How long the session waited, in whole seconds.
        waited: u64,
    },
    /// [`Waiting::interrupted`] said to give up (Ctrl-C) while waiting for the lock at this
    /// path; nothing was changed.
    #[error("interrupted while waiting for {0}; nothing was changed")]
    LockInterrupted(PathBuf),
    /// The saved file was written by a session whose process still runs (the same pid and
    /// command line): what it changed is not this session's to put back.
    #[error(
        "{path} says that pid {pid} ({command}) changed the host's KSM, and that process is \
         still running: it is not samepage's to put back; run this when it has finished"
    )]
    InUse {
        /// The saved file.
        path: PathBuf,
        /// The pid written in it.
        pid: u32,
        /// The command line written in it.
        command: String,
    },
    /// The host's knobs could not be saved before the session changed anything.
    #[error("cannot save the host's knobs to {path} before changing them: {source}")]
    Save {
        /// The saved file.
        path: PathBuf,
        /// Why it could not be written.
        source: io::Error,
    },
    /// A saved file left by an earlier session cannot be read as saved knobs, or cannot be
    /// rewritten or removed once they are put back.
    #[error(
        "{path} cannot be read as saved knobs: {why}; put the knobs back by hand and remove it"
    )]
    BadSaved {
        /// The saved file.
        path: PathBuf,
        /// What is wrong with it, as a sentence fragment.
        why: String,
    },
    /// Putting the host back left values that read back other than saved; they stay in the
    /// saved file, which the next session writes back.
    #[error(
        "the host's KSM could not be put back as it was: {what}. The values it had are kept in \
         {saved}; the next samepage compare or bench writes them back"
    )]
    NotRestored {
        /// Each value not as saved (`name now -> saved`, and why), or why the saved file
        /// could not be rewritten or removed; separated by `; `.
        what: String,
        /// The saved file.
        saved: PathBuf,
    },
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
        path: format!("{KSM_DIR}/{name}"),
        value: value.into(),
        source,
    })
}

/// What `cat` shows for a knob, as a value to write: `[none] scan-time` → `none`.
pub fn parse_shown(shown: &str) -> String {
    let shown = shown.trim();
    match (shown.find('['), shown.find(']')) {
        (Some(a), Some(b)) if a < b => shown[a + 1..b].to_string(),
        _ => shown.to_string(),
    }
}

/// The order knobs are written in, so that the kernel accepts each: the `advisor_*` knobs and
/// the rest first, then `advisor_mode` (whose change resets `pages_to_scan` and starts the
/// advisor from `advisor_min_pages_to_scan`), then `pages_to_scan`, `run` last.
pub fn write_rank(name: &str) -> u8 {
    match name {
        "advisor_mode" => 1,
        "pages_to_scan" => 2,
        "run" => 3,
        _ => 0,
    }
}

/// Sort knobs into [`write_rank`] order (stable: otherwise as given).
pub fn sort_for_writing(knobs: &mut [(String, String)]) {
    knobs.sort_by_key(|(k, _)| write_rank(k));
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

/// The pids of `/proc`, in order.
fn pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut v: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .collect();
    v.sort_unstable();
    v
}

/// Processes whose `ksm_stat` shows KSM at work (rmap items, merged or zero pages), and the
/// pids whose `ksm_stat` this user may not read (another user's processes, without root).
pub fn ksm_processes() -> (Vec<KsmStat>, Vec<u32>) {
    let mut seen = Vec::new();
    let mut unreadable = Vec::new();
    for pid in pids() {
        match ksm_stat(pid) {
            Ok(s) => {
                if s.ksm_rmap_items > 0 || s.ksm_merging_pages > 0 || s.ksm_zero_pages != 0 {
                    seen.push(s);
                }
            }
            Err(HostError::Read { source, .. })
                if source.kind() == io::ErrorKind::PermissionDenied =>
            {
                unreadable.push(pid)
            }
            // Gone since the directory was listed, or a kernel thread.
            Err(_) => {}
        }
    }
    (seen, unreadable)
}

/// The command line of a process, shortened for messages (its `comm` in brackets for a
/// kernel thread).
pub fn process_command(pid: u32) -> String {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|a| !a.is_empty())
                .enumerate()
                .map(|(i, a)| {
                    let a = String::from_utf8_lossy(a).into_owned();
                    // The program's name, not where it was built.
                    match (i, a.rsplit_once('/')) {
                        (0, Some((_, name))) if !name.is_empty() => name.to_string(),
                        _ => a,
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let cmd = if cmd.is_empty() {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        format!("[{}]", comm.trim())
    } else {
        cmd
    };
    let cmd = cmd.replace(['\n', '\r'], " ");
    match cmd.char_indices().nth(60) {
        Some((i, _)) => format!("{}...", &cmd[..i]),
        None => cmd,
    }
}

/// A process KSM works on, or may: it has mergeable memory (`MADV_MERGEABLE`, or
/// `PR_SET_MEMORY_MERGE`).
#[derive(Debug, Clone)]
pub struct KsmUser {
    /// The process.
    pub pid: u32,
    /// Its command line, shortened for messages ([`process_command`]).
    pub command: String,
    /// Its `/proc/<pid>/ksm_stat` (`ksm_mergeable` from its smaps on kernels whose
    /// `ksm_stat` lacks that line).
    pub stat: KsmStat,
}

impl std::fmt::Display for KsmUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.stat;
        write!(f, "pid {} ({}", self.pid, self.command)?;
        if s.ksm_merge_any {
            write!(f, ", merge_any")?;
        } else if s.ksm_mergeable {
            write!(f, ", mergeable memory")?;
        }
        if s.ksm_rmap_items > 0 {
            write!(f, ", {} rmap items", s.ksm_rmap_items)?;
        }
        if s.ksm_merging_pages > 0 {
            write!(f, ", {} merged pages", s.ksm_merging_pages)?;
        }
        write!(f, ")")
    }
}

/// Does the process have a mergeable area? `VmFlags: ... mg` in smaps, for kernels whose
/// `ksm_stat` lacks `ksm_mergeable` (older than 6.x).
fn smaps_mergeable(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/smaps")).is_ok_and(|s| {
        s.lines()
            .filter(|l| l.starts_with("VmFlags:"))
            .any(|l| l.split_whitespace().any(|f| f == "mg"))
    })
}

/// Every process but this one that KSM works on or may (see [`KsmUser`]), read from
/// `/proc/*/ksm_stat`: the cheapest reliable source (one small file per process, where smaps
/// would list every area), since `ksm_mergeable` says whether any area of the process is
/// mergeable now.
pub fn other_ksm_users() -> Vec<KsmUser> {
    let me = std::process::id();
    pids()
        .into_iter()
        .filter(|&pid| pid != me)
        .filter_map(|pid| {
            let text = std::fs::read_to_string(format!("/proc/{pid}/ksm_stat")).ok()?;
            let mut stat = parse_ksm_stat(pid, &text);
            if !text.contains("ksm_mergeable") && !text.is_empty() {
                stat.ksm_mergeable = smaps_mergeable(pid);
            }
            // Without a mergeable area no KSM page can be mapped there any more (unmerging
            // breaks them; fork copies the flag with the pages): its rmap items and counts
            // are stale until ksmd or run=2 frees them, which leaves its memory as it is.
            let uses = stat.ksm_mergeable || stat.ksm_merge_any;
            uses.then(|| KsmUser {
                pid,
                command: process_command(pid),
                stat,
            })
        })
        .collect()
}

/// Up to ten of `users`, for a message.
pub fn list_users(users: &[KsmUser]) -> String {
    let mut s: Vec<String> = users.iter().take(10).map(|u| u.to_string()).collect();
    if users.len() > 10 {
        s.push(format!("and {} more", users.len() - 10));
    }
    s.join("; ")
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

// ---- One session at a time: the lock --------------------------------------------------------

/// Where a session's lock and saved state are: in [`RUN_DIR`], or, when that cannot be used
/// (`/run` not writable), in `$XDG_RUNTIME_DIR` or `/tmp`, with `note` saying so.
#[derive(Debug, Clone)]
pub struct HostFiles {
    /// The lock file ([`LOCK_FILE`], or the fallback's).
    pub lock: PathBuf,
    /// The file of the saved state ([`SAVED_FILE`], or the fallback's).
    pub saved: PathBuf,
    /// Why the fallback is used, as a sentence for the user; `None` in [`RUN_DIR`].
    pub note: Option<String>,
}

/// The lock file, created 0644 if missing; never through a symbolic link (the fallback is in
/// `/tmp`, where anyone may plant one).
fn open_lock(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// The files of a session (see [`HostFiles`]).
pub fn host_files() -> HostFiles {
    let run = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(RUN_DIR)
        .and_then(|()| open_lock(Path::new(LOCK_FILE)).map(drop));
    match run {
        Ok(()) => HostFiles {
            lock: LOCK_FILE.into(),
            saved: SAVED_FILE.into(),
            note: None,
        },
        Err(e) => {
            let dir = std::env::var_os("XDG_RUNTIME_DIR")
                .map(PathBuf::from)
                .filter(|d| open_lock(&d.join("samepage-host-ksm.lock")).is_ok())
                .unwrap_or_else(|| PathBuf::from("/tmp"));
            let lock = dir.join("samepage-host-ksm.lock");
            HostFiles {
                note: Some(format!(
                    "{RUN_DIR} cannot be used ({e}): the lock is {} instead, which only other \
                     commands that cannot use {RUN_DIR} either will see",
                    lock.display()
                )),
                saved: dir.join("samepage-host-ksm.saved"),
                lock,
            }
        }
    }
}

/// `flock(fd, LOCK_EX | LOCK_NB)`: whether the lock is now held through `fd`.
fn flock_try(fd: RawFd) -> io::Result<bool> {
    // SAFETY: flock only acts on the descriptor's open file; an invalid fd gives EBADF.
    if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) | Some(libc::EINTR) => Ok(false),
        _ => Err(e),
    }
}

/// An OFD write lock on the whole file (`fcntl(F_OFD_SETLK)`): whether it is now held.
fn ofd_lock_try(fd: RawFd) -> io::Result<bool> {
    // SAFETY: all-zero is a valid `struct flock` (l_pid must be 0 for OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: F_OFD_SETLK reads the struct we pass, which lives across the call.
    if unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) | Some(libc::EINTR) => Ok(false),
        _ => Err(e),
    }
}

/// Let the processes this one starts inherit `fd` (clear `FD_CLOEXEC`).
fn set_inheritable(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_SETFD only changes the descriptor's flags.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A descriptor this process inherited that refers to the same file as `file` and holds (or
/// now took) its flock: the lock of the program that started this one, as flock(1) passes it.
fn inherited_flock(file: &File) -> Option<RawFd> {
    let me = file.metadata().ok()?;
    let own = file.as_raw_fd();
    for e in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<RawFd>().ok()) else {
            continue;
        };
        if fd == own {
            continue;
        }
        let Ok(m) = std::fs::metadata(e.path()) else {
            continue;
        };
        if m.dev() == me.dev() && m.ino() == me.ino() && flock_try(fd).unwrap_or(false) {
            return Some(fd);
        }
    }
    None
}

/// The pid that holds the flock of `file`, from `/proc/locks`.
fn flock_holder(file: &File) -> Option<u32> {
    let m = file.metadata().ok()?;
    let dev = m.dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let want = format!("{major:02x}:{minor:02x}:{}", m.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().filter(|l| !l.contains("->")).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str()) {
            f[4].parse().ok()
        } else {
            None
        }
    })
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The pid a samepage holder wrote into the lock file, if that process is alive.
fn pid_in(file: &File) -> Option<u32> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 32];
    let n = file.read_at(&mut buf, 0).ok()?;
    let pid: u32 = std::str::from_utf8(&buf[..n]).ok()?.trim().parse().ok()?;
    alive(pid).then_some(pid)
}

/// How long a session waits for the lock, and what it says meanwhile.
pub struct Waiting<'a> {
    /// The longest the session waits for the lock before it refuses
    /// ([`HostError::LockBusy`]).
    pub max: Duration,
    /// Give up at once (Ctrl-C).
    pub interrupted: &'a dyn Fn() -> bool,
    /// Receives each message for the user (waiting for whom; what was put back).
    pub notify: &'a mut dyn FnMut(&str),
}

/// One step of waiting: give up when interrupted or out of time, tell the user who holds the
/// lock when that changes, sleep a little.
fn wait_step(
    path: &Path,
    file: &File,
    on_flock: bool,
    t0: Instant,
    told: &mut Option<String>,
    wait: &mut Waiting<'_>,
) -> Result<(), HostError> {
    if (wait.interrupted)() {
        return Err(HostError::LockInterrupted(path.into()));
    }
    let pid = if on_flock {
        flock_holder(file).or_else(|| pid_in(file))
    } else {
        pid_in(file)
    };
    let holder = match pid {
        Some(p) => format!("pid {p}: {}", process_command(p)),
        None => "its pid is unknown".to_string(),
    };
    if t0.elapsed() >= wait.max {
        return Err(HostError::LockBusy {
            holder,
            path: path.into(),
            waited: t0.elapsed().as_secs(),
        });
    }
    if told.as_deref() != Some(holder.as_str()) {
        (wait.notify)(&format!(
            "waiting for another {} that uses the host's KSM ({holder}) to finish; giving up \
             after {} s",
            if on_flock {
                "program"
            } else {
                "samepage command"
            },
            wait.max.as_secs()
        ));
        *told = Some(holder);
    }
    std::thread::sleep(Duration::from_millis(100));
    Ok(())
}

/// The lock of one session (see the module's documentation): the flock, of its own or
/// inherited, and the OFD lock; the pid written in the file.
#[derive(Debug)]
pub struct HostLock {
    file: File,
}

/// The flock held by a program for the samepage commands it starts (a test, say): they
/// inherit it, and take their OFD locks one after the other.
#[derive(Debug)]
pub struct ChildrenLock {
    _file: Option<File>,
}

impl HostLock {
    /// Take the lock at `path`, waiting as `wait` says.
    pub fn acquire(path: &Path, wait: &mut Waiting<'_>) -> Result<Self, HostError> {
        let err = |source| HostError::Lock {
            path: path.into(),
            source,
        };
        let file = open_lock(path).map_err(err)?;
        let t0 = Instant::now();
        let mut told = None;
        if inherited_flock(&file).is_none() {
            while !flock_try(file.as_raw_fd()).map_err(err)? {
                wait_step(path, &file, true, t0, &mut told, wait)?;
            }
        }
        while !ofd_lock_try(file.as_raw_fd()).map_err(err)? {
            wait_step(path, &file, false, t0, &mut told, wait)?;
        }
        // The pid, for whoever waits next.
        use std::os::unix::fs::FileExt;
        file.set_len(0).map_err(err)?;
        file.write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0)
            .map_err(err)?;
        Ok(Self { file })
    }

    /// Take the flock at `path` in a descriptor the processes this one starts inherit (or
    /// keep using the one this process inherited).
    pub fn for_children(path: &Path, wait: &mut Waiting<'_>) -> Result<ChildrenLock, HostError> {
        let err = |source| HostError::Lock {
            path: path.into(),
            source,
        };
        let file = open_lock(path).map_err(err)?;
        if inherited_flock(&file).is_some() {
            return Ok(ChildrenLock { _file: None });
        }
        let t0 = Instant::now();
        let mut told = None;
        while !flock_try(file.as_raw_fd()).map_err(err)? {
            wait_step(path, &file, true, t0, &mut told, wait)?;
        }
        set_inheritable(file.as_raw_fd()).map_err(err)?;
        Ok(ChildrenLock { _file: Some(file) })
    }
}

impl Drop for HostLock {
    fn drop(&mut self) {
        // No pid: nobody holds it. Closing the file lets go of the OFD lock, and of the flock
        // unless it belongs to the program that started this one.
        let _ = self.file.set_len(0);
    }
}

// ---- The saved state ------------------------------------------------------------------------

/// The host's knobs as they were before a session changed them: the content of
/// [`SAVED_FILE`] (format in the module's documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedHost {
    /// The process that saved it (the session's).
    pub pid: u32,
    /// That process's command line ([`process_command`]): a pid still alive with another
    /// command line is a reused pid, not the session's.
    pub command: String,
    /// Every tunable of `/sys/kernel/mm/ksm` the kernel has, as written (`advisor_mode=none`).
    pub knobs: Vec<(String, String)>,
    /// `vm.max_map_count` as it was (`None`: it could not be read).
    pub max_map_count: Option<String>,
    /// The command put every knob back but could not free what KSM held of its memory with
    /// `run=2`, because another process used KSM then: the next session does, once none does.
    pub unmerge_pending: bool,
}

/// `vm.max_map_count`, trimmed.
pub fn max_map_count() -> Result<String, HostError> {
    std::fs::read_to_string(MAX_MAP_COUNT)
        .map(|s| s.trim().to_string())
        .map_err(|source| HostError::Read {
            what: MAX_MAP_COUNT.into(),
            source,
        })
}

fn write_max_map_count(v: &str) -> Result<(), HostError> {
    std::fs::write(MAX_MAP_COUNT, v).map_err(|source| HostError::Write {
        path: MAX_MAP_COUNT.into(),
        value: v.into(),
        source,
    })
}

const MAX_MAP_COUNT_KEY: &str = "vm.max_map_count";
const UNMERGE_PENDING_KEY: &str = "unmerge_pending";

impl SavedHost {
    /// The host as it is now, saved by this process.
    pub fn now() -> Self {
        let pid = std::process::id();
        Self {
            pid,
            command: process_command(pid),
            knobs: tunables()
                .into_iter()
                .map(|(k, v)| (k, parse_shown(&v)))
                .collect(),
            max_map_count: max_map_count().ok(),
            unmerge_pending: false,
        }
    }

    /// The saved value of a knob.
    pub fn knob(&self, name: &str) -> Option<&str> {
        self.knobs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The advisor sets `pages_to_scan` (it cannot be written, nor is it compared).
    fn advisor_owns_pages_to_scan(&self) -> bool {
        self.knob("advisor_mode") == Some("scan-time")
    }

    /// The file's text.
    pub fn to_text(&self, lock: &Path) -> String {
        let mut s = format!(
            "# samepage: the host's KSM as it was before the command below changed it (format: \
             crates/linux/src/host.rs).\n# If that command is gone, the next samepage command \
             that takes {} writes these values back and removes this file.\npid={}\ncommand={}\n",
            lock.display(),
            self.pid,
            self.command
        );
        for (k, v) in &self.knobs {
            s += &format!("{k}={v}\n");
        }
        if let Some(m) = &self.max_map_count {
            s += &format!("{MAX_MAP_COUNT_KEY}={m}\n");
        }
        if self.unmerge_pending {
            s += &format!("{UNMERGE_PENDING_KEY}=1\n");
        }
        s
    }

    /// Read the file's text back.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut pid = None;
        let mut command = String::new();
        let mut knobs = Vec::new();
        let mut max_map_count = None;
        let mut unmerge_pending = false;
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| format!("the line '{line}' is not KEY=VALUE"))?;
            let (k, v) = (k.trim(), v.trim());
            match k {
                "pid" => pid = Some(v.parse::<u32>().map_err(|_| format!("pid={v}"))?),
                "command" => command = v.to_string(),
                MAX_MAP_COUNT_KEY => max_map_count = Some(v.to_string()),
                UNMERGE_PENDING_KEY => unmerge_pending = v == "1",
                k if TUNABLE_NAMES.contains(&k) && !v.is_empty() => {
                    knobs.push((k.to_string(), v.to_string()))
                }
                k => return Err(format!("unknown key '{k}' (or no value)")),
            }
        }
        Ok(Self {
            pid: pid.ok_or("no pid= line")?,
            command,
            knobs,
            max_map_count,
            unmerge_pending,
        })
    }

    /// Each value that differs from the host's now: `name now -> saved`.
    pub fn differences(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .knobs
            .iter()
            .filter(|(k, _)| !(k == "pages_to_scan" && self.advisor_owns_pages_to_scan()))
            .filter_map(|(k, want)| {
                let now = read_knob(k).map(|s| parse_shown(&s)).unwrap_or_default();
                (now != *want).then(|| format!("{k} {now} -> {want}"))
            })
            .collect();
        if let Some(want) = &self.max_map_count {
            let now = max_map_count().unwrap_or_default();
            if now != *want {
                v.push(format!("{MAX_MAP_COUNT_KEY} {now} -> {want}"));
            }
        }
        v
    }
}

/// Replace `path` with `text`: a temporary file, fsynced, renamed over, the directory fsynced.
fn write_durably(path: &Path, text: &str) -> io::Result<()> {
    let tmp = path.with_extension("saved.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    sync_parent(path)
}

fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(d) => File::open(d)?.sync_all(),
        None => Ok(()),
    }
}

fn remove_durably(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r.and_then(|()| sync_parent(path)),
    }
}

/// The saved file's text; `None` if there is none. Small, and never through a symbolic link.
fn read_saved(path: &Path) -> io::Result<Option<String>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path);
    let f = match f {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        r => r?,
    };
    if !f.metadata()?.is_file() {
        return Err(io::Error::other("it is not a regular file"));
    }
    let mut s = String::new();
    f.take(1 << 16).read_to_string(&mut s)?;
    Ok(Some(s))
}

/// How putting back stops ksmd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stopping {
    /// The session wrote no KSM knob: write only what differs.
    Untouched,
    /// `run=2`: unmerge everything and free every rmap item.
    Unmerge,
    /// `run=0`: another process has mergeable memory, whose pages `run=2` would unmerge.
    Halt,
}

/// Put `saved` back (order in the module's documentation), vm.max_map_count too if `maps`,
/// and read it all back. Returns what is not as saved, with the write errors behind it.
fn put_back(saved: &SavedHost, stop: Stopping, maps: bool) -> Vec<String> {
    let mut errors: Vec<(String, String)> = Vec::new();
    let mut note = |k: &str, e: HostError| errors.push((k.to_string(), e.to_string()));
    match stop {
        Stopping::Untouched => {}
        Stopping::Unmerge => {
            if let Err(e) = write_knob("run", "2") {
                note("run", e);
            }
        }
        Stopping::Halt => {
            if let Err(e) = write_knob("run", "0") {
                note("run", e);
            }
        }
    }
    let mut order: Vec<&(String, String)> =
        saved.knobs.iter().filter(|(k, _)| k != "run").collect();
    order.sort_by_key(|(k, _)| write_rank(k));
    for (k, v) in order {
        if k == "pages_to_scan" && saved.advisor_owns_pages_to_scan() {
            continue;
        }
        if read_knob(k).map(|s| parse_shown(&s)).ok().as_deref() == Some(v.as_str()) {
            continue;
        }
        let mut r = write_knob(k, v);
        if r.is_err()
            && stop == Stopping::Unmerge
            && matches!(k.as_str(), "max_page_sharing" | "merge_across_nodes")
        {
            // EBUSY while KSM pages exist: unmerge, then it can change.
            let _ = write_knob("run", "2");
            r = write_knob(k, v);
        }
        if let Err(e) = r {
            note(k, e);
        }
    }
    if maps {
        if let Some(m) = &saved.max_map_count {
            if max_map_count().ok().as_deref() != Some(m.as_str()) {
                if let Err(e) = write_max_map_count(m) {
                    note(MAX_MAP_COUNT_KEY, e);
                }
            }
        }
    }
    if let Some(run) = saved.knob("run") {
        if read_knob("run").ok().as_deref() != Some(run) {
            if let Err(e) = write_knob("run", run) {
                note("run", e);
            }
        }
    }
    let mut check = saved.clone();
    if !maps {
        check.max_map_count = None;
    }
    check
        .differences()
        .into_iter()
        .map(|d| {
            let name = d.split(' ').next().unwrap_or_default().to_string();
            match errors.iter().find(|(k, _)| *k == name) {
                Some((_, e)) => format!("{d} failed ({e})"),
                None => format!("{d} did not hold"),
            }
        })
        .collect()
}

// ---- The session ----------------------------------------------------------------------------

/// Holds the host for one command: the lock, and the knobs and `vm.max_map_count` as they
/// were, on disk. Everything is put back by [`HostSession::finish`], or when it is dropped
/// (also on a panic); `run` is put back last and never left at 1 by samepage.
#[derive(Debug)]
pub struct HostSession {
    files: HostFiles,
    saved: SavedHost,
    /// A KSM knob was written since the host was last put back: putting back starts with run=2.
    touched: bool,
    /// A kernel phase ended without `run=2` (another process used KSM): samepage's stale
    /// rmap items are still in the kernel.
    stale: bool,
    /// Everything read back as saved and the saved file is gone.
    done: bool,
    // Dropped after the fields above are used by Drop: the lock is let go of last.
    _lock: HostLock,
}

impl HostSession {
    /// Take the lock, put back what a session that was killed left, and save the host's
    /// knobs and `vm.max_map_count` before anything changes.
    pub fn begin(wait: &mut Waiting<'_>) -> Result<Self, HostError> {
        let files = host_files();
        if let Some(n) = &files.note {
            (wait.notify)(n);
        }
        let lock = HostLock::acquire(&files.lock, wait)?;
        let stale = recover(&files, wait.notify)?;
        let mut saved = SavedHost::now();
        saved.unmerge_pending = stale;
        write_durably(&files.saved, &saved.to_text(&files.lock)).map_err(|source| {
            HostError::Save {
                path: files.saved.clone(),
                source,
            }
        })?;
        Ok(Self {
            files,
            saved,
            touched: false,
            stale,
            done: false,
            _lock: lock,
        })
    }

    /// A session for driving the host's KSM: it must exist and be writable by this user,
    /// and, once the lock is held, be idle ([`HostSession::check_idle`]).
    pub fn take_ksm(wait: &mut Waiting<'_>) -> Result<Self, HostError> {
        if !present() {
            return Err(HostError::NoKsm);
        }
        // Opening for writing writes nothing and tells whether this user may.
        if let Err(source) = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("{KSM_DIR}/run"))
        {
            return Err(if source.kind() == io::ErrorKind::PermissionDenied {
                HostError::NotRoot("run".into())
            } else {
                HostError::Read {
                    what: format!("{KSM_DIR}/run (opened for writing)"),
                    source,
                }
            });
        }
        let s = Self::begin(wait)?;
        s.check_idle()?;
        Ok(s)
    }

    /// The host's KSM is stopped, holds no merged pages, and no other process uses it.
    pub fn check_idle(&self) -> Result<(), HostError> {
        let run = read_knob("run")?;
        if run != "0" {
            return Err(HostError::Busy(run));
        }
        let others = other_ksm_users();
        if !others.is_empty() {
            return Err(HostError::OthersUseKsm(list_users(&others)));
        }
        let c = counters()?;
        if c.pages_shared + c.pages_sharing > 0 || c.ksm_zero_pages > 0 {
            return Err(HostError::NotEmpty(format!(
                "pages_shared {}, pages_sharing {}, ksm_zero_pages {}",
                c.pages_shared, c.pages_sharing, c.ksm_zero_pages
            )));
        }
        Ok(())
    }

    /// The host as it was.
    pub fn saved(&self) -> &SavedHost {
        &self.saved
    }

    /// Where the saved state is.
    pub fn saved_path(&self) -> &Path {
        &self.files.saved
    }

    /// Write a knob of `/sys/kernel/mm/ksm` (put back at the end). `run` may be 0, 1 or 2.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), HostError> {
        self.touched = true;
        write_knob(name, value)
    }

    /// Write each knob that differs from the host's value, in [`write_rank`] order, to run
    /// ksmd next (so putting back starts with `run=2` even if no knob had to change).
    pub fn apply(&mut self, knobs: &[(String, String)]) -> Result<(), HostError> {
        self.touched = true;
        let mut knobs = knobs.to_vec();
        sort_for_writing(&mut knobs);
        for (k, v) in &knobs {
            if read_knob(k).map(|s| parse_shown(&s)).ok().as_deref() != Some(v.as_str()) {
                self.set(k, v)?;
            }
        }
        Ok(())
    }

    /// The end of a kernel phase: `run=2` (or `run=0` if `unmerge` is false, when another
    /// process has mergeable memory), every KSM knob put back, `run` last, all read back.
    pub fn end_phase(&mut self, unmerge: bool) -> Result<(), HostError> {
        let stop = if unmerge {
            Stopping::Unmerge
        } else {
            Stopping::Halt
        };
        let bad = put_back(&self.saved, stop, false);
        if !bad.is_empty() {
            return Err(self.not_restored(bad));
        }
        self.touched = false;
        self.stale |= !unmerge;
        Ok(())
    }

    fn not_restored(&self, bad: Vec<String>) -> HostError {
        HostError::NotRestored {
            what: bad.join("; "),
            saved: self.files.saved.clone(),
        }
    }

    /// Put everything back (`vm.max_map_count` too), read it back, remove the saved file and
    /// let go of the lock. Ok means every value read back as it was.
    pub fn finish(mut self) -> Result<(), HostError> {
        self.close()
    }

    fn close(&mut self) -> Result<(), HostError> {
        if self.done {
            return Ok(());
        }
        let nobody_else = other_ksm_users().is_empty();
        let stop = match (self.touched, self.stale, nobody_else) {
            (_, _, true) if self.touched || self.stale => Stopping::Unmerge,
            (true, _, false) => Stopping::Halt,
            _ => Stopping::Untouched,
        };
        let bad = put_back(&self.saved, stop, true);
        if !bad.is_empty() {
            return Err(self.not_restored(bad));
        }
        if stop != Stopping::Unmerge && (self.touched || self.stale) {
            // The knobs are back, but run=2 would unmerge another program's pages: hand the
            // cleaning over to the next session, through the saved file.
            let mut pending = self.saved.clone();
            pending.unmerge_pending = true;
            write_durably(&self.files.saved, &pending.to_text(&self.files.lock)).map_err(|e| {
                self.not_restored(vec![format!(
                    "{} could not be rewritten ({e})",
                    self.files.saved.display()
                )])
            })?;
            self.done = true;
            return Ok(());
        }
        remove_durably(&self.files.saved).map_err(|e| {
            self.not_restored(vec![format!(
                "{} could not be removed ({e})",
                self.files.saved.display()
            )])
        })?;
        self.done = true;
        Ok(())
    }
}

impl Drop for HostSession {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            eprintln!("samepage: {e}");
        }
    }
}

/// Put back what a session that is gone (SIGKILL, power loss) left in the saved file. Returns
/// whether KSM still holds metadata of it that only `run=2` frees, which has to wait because
/// another process uses KSM.
fn recover(files: &HostFiles, notify: &mut dyn FnMut(&str)) -> Result<bool, HostError> {
    let bad = |why: String| HostError::BadSaved {
        path: files.saved.clone(),
        why,
    };
    let Some(text) = read_saved(&files.saved).map_err(|e| bad(e.to_string()))? else {
        return Ok(false);
    };
    let saved = SavedHost::parse(&text).map_err(bad)?;
    // Under the lock, only a process that took it before this one can have written the file;
    // if it still runs (the same command line: a pid can be reused), it is not ours to undo.
    if saved.pid != std::process::id()
        && alive(saved.pid)
        && process_command(saved.pid) == saved.command
    {
        return Err(HostError::InUse {
            path: files.saved.clone(),
            pid: saved.pid,
            command: saved.command,
        });
    }
    let changes = saved.differences();
    let others = other_ksm_users();
    if saved.unmerge_pending && changes.is_empty() && !others.is_empty() {
        // Still someone else's pages that run=2 would unmerge: leave the cleaning for later.
        return Ok(true);
    }
    let stop = if others.is_empty() {
        Stopping::Unmerge
    } else {
        Stopping::Halt
    };
    let left = put_back(&saved, stop, true);
    if !left.is_empty() {
        return Err(HostError::NotRestored {
            what: left.join("; "),
            saved: files.saved.clone(),
        });
    }
    if stop == Stopping::Halt {
        // The knobs are back; what KSM still holds waits for run=2 until nobody else uses it.
        let mut pending = saved.clone();
        pending.unmerge_pending = true;
        write_durably(&files.saved, &pending.to_text(&files.lock))
            .map_err(|e| bad(format!("it cannot be rewritten ({e})")))?;
    } else {
        remove_durably(&files.saved).map_err(|e| bad(format!("it cannot be removed ({e})")))?;
    }
    let how = if others.is_empty() {
        ", and run=2 freed what KSM still held of it".to_string()
    } else {
        format!(
            " (run=0, not run=2: other processes use KSM: {}; the next session frees what KSM \
             holds of it once they have finished)",
            list_users(&others)
        )
    };
    if saved.unmerge_pending && changes.is_empty() {
        notify(&format!(
            "pid {} ({}) noted KSM metadata that run=2 could not free while another process used \
             KSM{how}",
            saved.pid, saved.command
        ));
    } else {
        notify(&format!(
            "pid {} ({}) changed the host's KSM and ended without putting it back (killed?); \
             put back from {}: {}{how}",
            saved.pid,
            saved.command,
            files.saved.display(),
            if changes.is_empty() {
                "nothing had changed".to_string()
            } else {
                changes.join(", ")
            },
        ));
    }
    Ok(stop == Stopping::Halt)
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
        let a = self.word(off)?;
        let t = std::time::Instant::now();
        // SAFETY: the word lies inside this mapping, which lives as long as `self` and to
        // which no Rust reference points; it is aligned.
        unsafe { std::sync::atomic::AtomicU64::from_ptr(a as *mut u64) }
            .store(v, std::sync::atomic::Ordering::Relaxed);
        Ok(t.elapsed())
    }

    /// Load one word from byte offset `off` with a user-mode read, as the application
    /// would, and return it with how long the load took (a first read of a page never
    /// touched includes its fault).
    pub fn timed_load(&self, off: u64) -> io::Result<(u64, Duration)> {
        let a = self.word(off)?;
        let t = std::time::Instant::now();
        // SAFETY: the word lies inside this mapping, which lives as long as `self`; it is
        // aligned, and a load changes nothing.
        let v = unsafe { std::sync::atomic::AtomicU64::from_ptr(a as *mut u64) }
            .load(std::sync::atomic::Ordering::Relaxed);
        Ok((v, t.elapsed()))
    }

    /// The address of the aligned word at byte offset `off` (rounded down to 8).
    fn word(&self, off: u64) -> io::Result<u64> {
        if off.checked_add(8).is_none_or(|e| e > self.len()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range outside the memory",
            ));
        }
        Ok(self.addr() + (off & !7))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::PAGE;

    #[test]
    fn shown_values_are_written_back_as_values() {
        assert_eq!(parse_shown("[none] scan-time"), "none");
        assert_eq!(parse_shown("none [scan-time]\n"), "scan-time");
        assert_eq!(parse_shown("100"), "100");
    }

    #[test]
    fn knobs_are_written_with_the_advisor_before_pages_to_scan() {
        let mut k: Vec<(String, String)> = [
            ("pages_to_scan", "100000"),
            ("use_zero_pages", "1"),
            ("advisor_mode", "none"),
            ("advisor_min_pages_to_scan", "9"),
            ("run", "1"),
            ("sleep_millisecs", "0"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        sort_for_writing(&mut k);
        let names: Vec<&str> = k.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "use_zero_pages",
                "advisor_min_pages_to_scan",
                "sleep_millisecs",
                "advisor_mode",
                "pages_to_scan",
                "run"
            ]
        );
    }

    #[test]
    fn the_saved_file_reads_back_what_was_written() {
        let saved = SavedHost {
            pid: 42,
            command: "samepage compare --size 64M".into(),
            knobs: vec![
                ("advisor_mode".into(), "scan-time".into()),
                ("pages_to_scan".into(), "500".into()),
                ("run".into(), "0".into()),
            ],
            max_map_count: Some("65530".into()),
            unmerge_pending: true,
        };
        let text = saved.to_text(Path::new(LOCK_FILE));
        assert!(text.contains("\nadvisor_mode=scan-time\n"), "{text}");
        assert!(text.contains("\nvm.max_map_count=65530\n"), "{text}");
        assert_eq!(SavedHost::parse(&text), Ok(saved.clone()));
        assert!(saved.advisor_owns_pages_to_scan());
        assert!(SavedHost::parse("run=0\n").unwrap_err().contains("pid"));
        assert!(SavedHost::parse("pid=1\nbogus=3\n")
            .unwrap_err()
            .contains("bogus"));
        assert!(SavedHost::parse("pid=1\nrun\n")
            .unwrap_err()
            .contains("KEY=VALUE"));
    }

    fn lock_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("samepage-lock-{name}-{}", std::process::id()))
    }

    fn no_wait<'a>(max: Duration, notify: &'a mut dyn FnMut(&str)) -> Waiting<'a> {
        Waiting {
            max,
            interrupted: &|| false,
            notify,
        }
    }

    #[test]
    fn one_lock_at_a_time_and_the_holder_is_named() {
        let path = lock_path("ofd");
        let mut said = Vec::new();
        let mut notify = |m: &str| said.push(m.to_string());
        let first = HostLock::acquire(&path, &mut no_wait(Duration::ZERO, &mut notify)).unwrap();
        let me = std::process::id();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{me}\n"));
        // A second session, even in this process, waits: the OFD lock is one per open file.
        let e = HostLock::acquire(&path, &mut no_wait(Duration::from_millis(300), &mut notify))
            .unwrap_err();
        assert!(
            matches!(&e, HostError::LockBusy { holder, .. } if holder.starts_with(&format!("pid {me}: "))),
            "{e}"
        );
        let interrupted = HostLock::acquire(
            &path,
            &mut Waiting {
                max: Duration::from_secs(60),
                interrupted: &|| true,
                notify: &mut |_| {},
            },
        )
        .unwrap_err();
        assert!(matches!(interrupted, HostError::LockInterrupted(_)));
        drop(first);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "", "the pid goes");
        let again = HostLock::acquire(&path, &mut no_wait(Duration::ZERO, &mut |_| {}));
        assert!(again.is_ok());
        drop(again);
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(
            said[0]
                .starts_with("waiting for another samepage command that uses the host's KSM (pid "),
            "{said:?}"
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_lock_held_by_another_program_is_waited_for_and_named() {
        let path = lock_path("flock");
        let _ = std::fs::remove_file(&path);
        // -o: flock(1) itself holds the lock (not cat), until cat's input is closed.
        let Ok(mut child) = std::process::Command::new("flock")
            .arg("-o")
            .arg(&path)
            .arg("cat")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
        else {
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "skipped: no flock(1) here (util-linux) to hold a lock from another process"
            );
            return;
        };
        let t0 = Instant::now();
        while flock_holder(&open_lock(&path).unwrap()).is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "flock(1) took no lock"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let e = HostLock::acquire(&path, &mut no_wait(Duration::from_millis(300), &mut |_| {}))
            .unwrap_err();
        let want = format!("pid {}: flock ", child.id());
        assert!(
            matches!(&e, HostError::LockBusy { holder, .. } if holder.starts_with(&want)),
            "{e}"
        );
        // Waiting long enough, it gets the lock once flock(1) ends, which it does only
        // after the waiter has said that it waits.
        let (tx, said) = std::sync::mpsc::channel::<String>();
        let waiter = {
            let path = path.clone();
            std::thread::spawn(move || {
                HostLock::acquire(
                    &path,
                    &mut no_wait(Duration::from_secs(20), &mut |m| {
                        let _ = tx.send(m.to_string());
                    }),
                )
                .map(drop)
            })
        };
        let first = said
            .recv_timeout(Duration::from_secs(20))
            .expect("it says it waits");
        assert!(
            first.starts_with("waiting for another program that uses"),
            "{first}"
        );
        drop(child.stdin.take()); // cat ends, and flock(1) with it
        let got = waiter.join().unwrap();
        assert!(got.is_ok(), "{:?}", got.err());
        assert!(said.try_iter().next().is_none(), "said once");
        child.wait().unwrap();
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_lock_held_for_children_is_used_by_them() {
        let path = lock_path("children");
        let parent =
            HostLock::for_children(&path, &mut no_wait(Duration::ZERO, &mut |_| {})).unwrap();
        // What a child sees: the flock through the inherited descriptor, then its own OFD lock.
        let child = HostLock::acquire(&path, &mut no_wait(Duration::ZERO, &mut |_| {})).unwrap();
        drop(child);
        drop(parent);
        let _ = std::fs::remove_file(&path);
    }

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
        assert!(m.timed_load(2 * PAGE - 4).is_err());
        assert_eq!(
            m.timed_load(PAGE + 8).unwrap().0,
            u64::from_ne_bytes([1; 8])
        );
        let mut b = [0u8; 4096];
        m.read_page(PAGE, &mut b).unwrap();
        assert_eq!(b, [1u8; 4096]);
        assert!(AnonMemory::new(100).is_err());
    }
}
