//! `fork()` of a process with merged pages. Without `UFFD_FEATURE_EVENT_FORK` the child's
//! mappings are not registered with any userfaultfd, so a merged page, which is a hole
//! standing for a canonical page, would read as zeros there. Handlers installed with
//! `pthread_atfork` prevent it:
//!
//! - before the fork, the fork gate is closed (no transaction or event handling runs
//!   during the fork, and an application discard cannot complete: its event waits to be
//!   read), and every agent's merged pages are listed with where their canonical page is;
//! - in the child, each listed page that is still a hole there gets its canonical page
//!   copied in (the child's mapping is plain memory, so a store does it): the child has
//!   every byte, in pages of its own; its KSM-placed zero pages are ordinary zero pages;
//! - in the parent, the gate opens again.
//!
//! The child's copies of samepage's objects are inert: they belong to the parent's agent,
//! whose threads did not survive the fork.
//!
//! The gate lets readers (the handler, the executor) in while a fork waits for it, so a
//! transaction waiting for the handler can never deadlock with a fork: the fork closes it
//! only at a moment when nobody is inside.

use super::Agent;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once, Weak};

/// Readers inside the gate, and whether a fork holds it.
struct Gate {
    readers: Mutex<Readers>,
    cv: Condvar,
    closed: AtomicBool,
}

/// Who is inside the gate, and whether a fork waits for them to leave.
struct Readers {
    inside: u32,
    /// Forks waiting for `inside` to reach 0 (the last to leave wakes them; nobody else
    /// makes the system call a wake-up costs).
    forking: u32,
}

static GATE: Gate = Gate {
    readers: Mutex::new(Readers {
        inside: 0,
        forking: 0,
    }),
    cv: Condvar::new(),
    closed: AtomicBool::new(false),
};

static AGENTS: Mutex<Vec<Weak<Agent>>> = Mutex::new(Vec::new());
static INSTALL: Once = Once::new();

thread_local! {
    /// Pages to fill in the child: (address, source page in a store view).
    static HOLES: RefCell<Vec<(u64, *const u8)>> = const { RefCell::new(Vec::new()) };
    /// The mergeable regions of the agents, for the child to register again.
    static REGIONS: RefCell<Vec<(u64, u64)>> = const { RefCell::new(Vec::new()) };
}

/// Called in a fork child once its merged pages are filled in, with the regions that were
/// mergeable in the parent (`samepage run`'s preload library reconnects the child).
static AFTER_CHILD: std::sync::OnceLock<AfterChild> = std::sync::OnceLock::new();

/// What [`AFTER_CHILD`] holds: called with the parent's mergeable regions.
pub type AfterChild = fn(&[(u64, u64)]);

/// Have `f` called in every fork child (see [`AFTER_CHILD`]).
pub fn after_fork_child(f: AfterChild) {
    let _ = AFTER_CHILD.set(f);
}

/// Inside the gate: no fork happens while one of these lives.
pub(crate) struct Inside(());

impl Drop for Inside {
    fn drop(&mut self) {
        let mut n = GATE.readers.lock().unwrap_or_else(|e| e.into_inner());
        n.inside -= 1;
        let wake = n.inside == 0 && n.forking > 0;
        drop(n);
        if wake {
            GATE.cv.notify_all();
        }
    }
}

/// Enter the gate (waits while a fork holds it).
pub(crate) fn enter() -> Inside {
    let mut n = GATE.readers.lock().unwrap_or_else(|e| e.into_inner());
    while GATE.closed.load(Ordering::Acquire) {
        n = GATE.cv.wait(n).unwrap_or_else(|e| e.into_inner());
    }
    n.inside += 1;
    Inside(())
}

/// Install the fork handlers (once) and remember `agent`.
pub(crate) fn register(agent: &Arc<Agent>) {
    INSTALL.call_once(|| {
        // SAFETY: the three handlers are extern "C" functions that live for the whole
        // program.
        unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    });
    let mut v = AGENTS.lock().unwrap_or_else(|e| e.into_inner());
    v.retain(|w| w.strong_count() > 0);
    v.push(Arc::downgrade(agent));
}

extern "C" fn prepare() {
    // Close the gate at a moment nobody is inside.
    let mut n = GATE.readers.lock().unwrap_or_else(|e| e.into_inner());
    n.forking += 1;
    while n.inside > 0 {
        n = GATE.cv.wait(n).unwrap_or_else(|e| e.into_inner());
    }
    n.forking -= 1;
    GATE.closed.store(true, Ordering::Release);
    drop(n);
    let agents: Vec<Arc<Agent>> = AGENTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    HOLES.with(|h| {
        let mut h = h.borrow_mut();
        h.clear();
        for a in &agents {
            a.merged_pages(&mut h);
        }
    });
    REGIONS.with(|r| {
        let mut r = r.borrow_mut();
        r.clear();
        for a in agents.iter().filter(|a| a.is_own()) {
            r.extend(
                a.regions(None)
                    .into_iter()
                    .filter(|x| x.3)
                    .map(|x| (x.1, x.2)),
            );
        }
    });
}

extern "C" fn parent() {
    HOLES.with(|h| h.borrow_mut().clear());
    REGIONS.with(|r| r.borrow_mut().clear());
    let n = GATE.readers.lock().unwrap_or_else(|e| e.into_inner());
    GATE.closed.store(false, Ordering::Release);
    drop(n);
    GATE.cv.notify_all();
}

extern "C" fn child() {
    // Only this thread exists now; the locks other threads of the parent held may be
    // held forever in this copy, so only atomics and system calls from here.
    GATE.closed.store(false, Ordering::Release);
    HOLES.with(|h| {
        let h = h.borrow();
        if h.is_empty() {
            return;
        }
        // SAFETY: a path literal and a fresh descriptor, closed below.
        let pm = unsafe {
            libc::open(
                c"/proc/self/pagemap".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        for &(addr, src) in h.iter() {
            let mut e = 0u64;
            // SAFETY: reads 8 bytes into e from the child's own pagemap.
            let n = unsafe {
                libc::pread(
                    pm,
                    &mut e as *mut u64 as *mut libc::c_void,
                    8,
                    (addr / crate::sys::PAGE * 8) as libc::off_t,
                )
            };
            if n == 8 && e & crate::sys::pagemap::PM_PRESENT != 0 {
                continue; // touched before the fork: the child has it already
            }
            // SAFETY: addr is a page of a region the agent managed, mapped in the child as a
            // copy of the parent's mapping and no longer registered with any userfaultfd, so
            // the store is an ordinary write into a hole; src is the canonical page in the
            // store view, a shared mapping the child inherited, which nothing writes while
            // pages stand for it.
            unsafe {
                std::ptr::copy_nonoverlapping(src, addr as *mut u8, crate::sys::PAGE as usize)
            };
        }
        // SAFETY: closing the descriptor opened above.
        unsafe { libc::close(pm) };
    });
    if let Some(f) = AFTER_CHILD.get() {
        REGIONS.with(|r| f(&r.borrow()));
    }
}
