//! What `samepage run`'s preload library does inside an unmodified program: its
//! `madvise(MADV_MERGEABLE / MADV_UNMERGEABLE)` and `prctl(PR_SET_MEMORY_MERGE /
//! PR_GET_MEMORY_MERGE)` become registrations with `samepage daemon`, and return what the
//! kernel would return. The library itself (`crates/preload`) is the C ABI around these.
//!
//! - `MADV_MERGEABLE` on private anonymous memory registers it; on memory the kernel's KSM
//!   ignores (shared or file-backed) it does nothing and returns 0, as the kernel does, and
//!   the daemon logs it and shows it in `samepage stat --daemon`. A range with unmapped
//!   parts returns ENOMEM, the mapped parts advised.
//! - `PR_SET_MEMORY_MERGE(1)` registers all of the process's private anonymous memory
//!   (but its stack and samepage's own), and memory it maps later: the daemon asks for it
//!   at every full scan. It survives exec (the daemon knows the process by pid and start
//!   time) and fork.
//! - fork: the child gets every merged page's contents (`agent::fork`), then connects as a
//!   client of its own with the parent's mergeable regions and flag.
//!
//! Nothing here is reached unless `SAMEPAGE_SOCKET` is set (by `samepage run`). Calls are
//! made inside the fork gate, so a fork never copies them half done.

use crate::eligibility::{self, Piece};
use crate::live::{ConnectOptions, LiveKsm};
use crate::sys::PAGE;
use samepage_engine::MmId;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

/// `prctl` options (`linux/prctl.h`).
pub const PR_SET_MEMORY_MERGE: i32 = 67;
/// `prctl(PR_GET_MEMORY_MERGE)`.
pub const PR_GET_MEMORY_MERGE: i32 = 68;

struct Settings {
    socket: PathBuf,
    domain: Option<String>,
}

struct Session {
    ksm: LiveKsm,
    mm: MmId,
    merge_any: bool,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();
static SESSION: Mutex<Option<Session>> = Mutex::new(None);
static WARNED: AtomicBool = AtomicBool::new(false);

fn warn(what: &str) {
    if !WARNED.swap(true, Ordering::Relaxed) {
        eprintln!("samepage: {what}; this program's memory is not merged");
    }
}

/// Read the settings `samepage run` left in the environment and, if the process merged
/// everything before an exec, go on doing so. Call once, early (the library's constructor).
pub fn init() {
    let Some(socket) = std::env::var_os("SAMEPAGE_SOCKET") else {
        return;
    };
    let domain = std::env::var("SAMEPAGE_DOMAIN")
        .ok()
        .filter(|d| !d.is_empty());
    let socket = PathBuf::from(socket);
    let _ = SETTINGS.set(Settings {
        socket: socket.clone(),
        domain,
    });
    crate::agent::fork::after_fork_child(reconnect_child);
    if let Ok(c) = crate::remote::Control::connect(&socket) {
        if c.merge_any_inherited() {
            drop(c);
            let _ = set_memory_merge(true);
        }
    }
}

/// The session, connecting first if needed. `None`: not under `samepage run`, or the
/// daemon cannot be reached (said once on stderr).
fn with_session<R>(f: impl FnOnce(&mut Session) -> R) -> Option<R> {
    let settings = SETTINGS.get()?;
    let mut g = SESSION.lock().unwrap_or_else(|e| e.into_inner());
    if g.is_none() {
        match LiveKsm::connect(&ConnectOptions {
            socket: settings.socket.clone(),
            domain: settings.domain.clone(),
            merge_any: false,
        }) {
            Ok(ksm) => {
                let mm = ksm.new_mm();
                *g = Some(Session {
                    ksm,
                    mm,
                    merge_any: false,
                });
            }
            Err(e) => {
                warn(&e.to_string());
                return None;
            }
        }
    }
    g.as_mut().map(f)
}

fn round_up(len: u64) -> Option<u64> {
    len.checked_add(PAGE - 1).map(|l| l & !(PAGE - 1))
}

/// Is this piece memory the session can merge? Memory its own agent registered shows as
/// "another userfaultfd" in smaps: it is the session's.
fn mergeable_piece(s: &Session, p: &Piece) -> bool {
    match &p.refusal {
        None => true,
        Some(r) if r.contains("userfaultfd") => s
            .ksm
            .agent()
            .regions(None)
            .iter()
            .any(|x| x.1 <= p.start && p.end <= x.2),
        Some(_) => false,
    }
}

/// `madvise(addr, len, advice)` if samepage takes it: `Some(Ok(()))` for 0, `Some(Err(errno))`
/// for -1, `None` for an advice the kernel handles.
pub fn madvise(addr: u64, len: u64, advice: i32) -> Option<Result<(), i32>> {
    let on = match advice {
        libc::MADV_MERGEABLE => true,
        libc::MADV_UNMERGEABLE => false,
        _ => return None,
    };
    SETTINGS.get()?;
    if !addr.is_multiple_of(PAGE) {
        return Some(Err(libc::EINVAL));
    }
    let Some(len) = round_up(len) else {
        return Some(Err(libc::EINVAL));
    };
    if len == 0 {
        return Some(Ok(()));
    }
    let Some(end) = addr.checked_add(len) else {
        return Some(Err(libc::EINVAL));
    };
    let _inside = crate::agent::fork::enter();
    let Ok((pieces, gaps)) = eligibility::pieces(addr, end) else {
        return Some(Err(libc::ENOMEM));
    };
    let r = with_session(|s| -> Result<(), i32> {
        for p in &pieces {
            if !mergeable_piece(s, p) {
                if on {
                    let reason = p.refusal.clone().unwrap_or_default();
                    s.ksm.report_ignored(p.start, p.end, &reason);
                }
                continue;
            }
            if on {
                s.ksm
                    .manage_range(s.mm, p.start, p.end)
                    .and_then(|()| s.ksm.advise_range(s.mm, p.start, p.end, true))
                    .map_err(|_| libc::EAGAIN)?;
            } else if s
                .ksm
                .agent()
                .regions(None)
                .iter()
                .any(|x| x.1 < p.end && x.2 > p.start)
            {
                s.ksm
                    .advise_range(s.mm, p.start, p.end, false)
                    .map_err(|_| libc::EAGAIN)?;
            }
        }
        Ok(())
    });
    Some(match r {
        None | Some(Ok(())) if gaps => Err(libc::ENOMEM),
        None => Ok(()),
        Some(r) => r,
    })
}

/// The private anonymous memory `PR_SET_MEMORY_MERGE` covers, outside `have` (what is
/// registered already): not the stack (it grows on faults of its own), not read-only
/// memory, never samepage's own.
fn all_anonymous(have: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let Ok((pieces, _)) = eligibility::pieces(PAGE, crate::ksmd::USER_SPACE_END) else {
        return Vec::new();
    };
    let own = crate::sys::own_ranges();
    let mut out = Vec::new();
    for p in pieces {
        // The `.bss` of the loader, libc and samepage itself holds what samepage's own
        // threads touch while they serve faults (locks, allocator state): merging it could
        // make the fault handler fault on itself.
        if p.refusal.is_some() || p.stack || p.bss || !p.writable {
            continue;
        }
        let mut parts = vec![(p.start, p.end)];
        for &(s, e) in own.iter().chain(have) {
            parts = parts
                .into_iter()
                .flat_map(|(a, b)| {
                    if e <= a || s >= b {
                        vec![(a, b)]
                    } else {
                        [(a, s.max(a)), (e.min(b), b)]
                            .into_iter()
                            .filter(|(x, y)| x < y)
                            .collect()
                    }
                })
                .collect();
        }
        out.extend(parts.into_iter().filter(|(a, b)| a < b));
    }
    out
}

fn set_memory_merge(on: bool) -> Option<Result<(), i32>> {
    with_session(|s| -> Result<(), i32> {
        if on {
            // A range that cannot be taken stays the kernel's, as it was.
            for (a, b) in all_anonymous(&[]) {
                let _ = s.ksm.manage_range(s.mm, a, b);
            }
            s.ksm.agent().set_refresh_hook(Box::new(all_anonymous));
        }
        s.ksm.set_memory_merge(s.mm, on).map_err(|_| libc::EAGAIN)?;
        s.merge_any = on;
        Ok(())
    })
}

/// `prctl(option, a2, a3, a4, a5)` if samepage takes it: `Some(Ok(v))` returns `v`,
/// `Some(Err(errno))` returns -1, `None` for an option the kernel handles.
pub fn prctl(option: i32, a2: u64, a3: u64, a4: u64, a5: u64) -> Option<Result<i32, i32>> {
    SETTINGS.get()?;
    match option {
        PR_SET_MEMORY_MERGE => {
            if a3 | a4 | a5 != 0 {
                return Some(Err(libc::EINVAL));
            }
            let _inside = crate::agent::fork::enter();
            Some(match set_memory_merge(a2 != 0) {
                // The daemon cannot be reached: the kernel would have succeeded.
                None => Ok(0),
                Some(r) => r.map(|()| 0),
            })
        }
        PR_GET_MEMORY_MERGE => {
            if a2 | a3 | a4 | a5 != 0 {
                return Some(Err(libc::EINVAL));
            }
            let _inside = crate::agent::fork::enter();
            let g = SESSION.lock().unwrap_or_else(|e| e.into_inner());
            Some(Ok(g.as_ref().is_some_and(|s| s.merge_any) as i32))
        }
        _ => None,
    }
}

/// In a fork child (its merged pages already filled in): the parent's session belongs to
/// the parent; connect anew with its mergeable regions and its flag, as the kernel's fork
/// keeps `VM_MERGEABLE` and `MMF_VM_MERGE_ANY`.
fn reconnect_child(regions: &[(u64, u64)]) {
    let merge_any = {
        let mut g = SESSION.lock().unwrap_or_else(|e| e.into_inner());
        let any = g.as_ref().is_some_and(|s| s.merge_any);
        // The parent's session is the parent's: never drop it here (that would close the
        // parent's connection and stop its agent's threads, which this process lacks).
        if let Some(s) = g.take() {
            std::mem::forget(s);
        }
        any
    };
    if regions.is_empty() && !merge_any {
        return;
    }
    let _ = with_session(|s| {
        for &(a, b) in regions {
            let _ = s
                .ksm
                .manage_range(s.mm, a, b)
                .and_then(|()| s.ksm.advise_range(s.mm, a, b, true));
        }
    });
    if merge_any {
        let _ = set_memory_merge(true);
    }
}
