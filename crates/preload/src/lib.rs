//! # samepage-preload: `samepage run`'s library inside unmodified programs
//!
//! `samepage run -- CMD` starts CMD with this library in `LD_PRELOAD`. It defines
//! `madvise` and `prctl` ahead of the C library's: `MADV_MERGEABLE`/`MADV_UNMERGEABLE` and
//! `PR_SET_MEMORY_MERGE`/`PR_GET_MEMORY_MERGE` go to `samepage daemon`
//! (`samepage_linux::preload`), every other call goes to the kernel unchanged.
//!
//! The Rust code of the library allocates from an arena of its own, never from the
//! program's heap: samepage's fault handler thread must never touch memory that is itself
//! registered for merging (a program that merges everything registers its heap), or it
//! would wait on its own fault.

#![warn(missing_docs)]

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The arena: reserved once, never returned (a program lives with it).
const ARENA: u64 = 256 << 20;
const MIN_CLASS: u32 = 4; // 16 bytes
const CLASSES: usize = 28;

struct Arena {
    lock: AtomicBool,
    base: AtomicU64,
    next: AtomicU64,
    free: [AtomicU64; CLASSES],
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: AtomicU64 = AtomicU64::new(0);

static ARENA_STATE: Arena = Arena {
    lock: AtomicBool::new(false),
    base: AtomicU64::new(0),
    next: AtomicU64::new(0),
    free: [EMPTY; CLASSES],
};

fn class_of(size: usize) -> Option<usize> {
    let bits = (size.max(1 << MIN_CLASS) as u64)
        .next_power_of_two()
        .trailing_zeros();
    let c = (bits - MIN_CLASS) as usize;
    (c < CLASSES).then_some(c)
}

impl Arena {
    fn lock(&self) {
        while self
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::thread::yield_now();
        }
    }
    fn unlock(&self) {
        self.lock.store(false, Ordering::Release);
    }

    /// Map the arena (under the lock).
    fn reserve(&self) -> bool {
        if self.base.load(Ordering::Relaxed) != 0 {
            return true;
        }
        // SAFETY: a fresh mapping at an address the kernel chooses replaces nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ARENA as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return false;
        }
        self.base.store(p as u64, Ordering::Relaxed);
        self.next.store(p as u64, Ordering::Relaxed);
        true
    }
}

/// Size classes of powers of two, free lists threaded through the free blocks.
struct OwnAlloc;

// SAFETY: every block handed out lies inside the arena, is at least `layout.size()` bytes
// and aligned to `layout.align()` (blocks of class c are 2^c bytes, carved at addresses
// aligned to min(2^c, page size), and a free block is reused only if aligned enough); a
// block is on a free list only after `dealloc`, and the lock serialises the lists.
unsafe impl GlobalAlloc for OwnAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(c) = class_of(layout.size().max(layout.align())) else {
            return std::ptr::null_mut();
        };
        let size = 1u64 << (c as u32 + MIN_CLASS);
        let a = &ARENA_STATE;
        a.lock();
        if !a.reserve() {
            a.unlock();
            return std::ptr::null_mut();
        }
        let head = a.free[c].load(Ordering::Relaxed);
        if head != 0 && head.is_multiple_of(layout.align() as u64) {
            // SAFETY: head is a free block of this class; its first word holds the next.
            let next = unsafe { *(head as *const u64) };
            a.free[c].store(next, Ordering::Relaxed);
            a.unlock();
            return head as *mut u8;
        }
        let align = size.min(4096).max(layout.align() as u64);
        let start = a.next.load(Ordering::Relaxed).next_multiple_of(align);
        let end = start + size;
        if end > a.base.load(Ordering::Relaxed) + ARENA {
            a.unlock();
            return std::ptr::null_mut();
        }
        a.next.store(end, Ordering::Relaxed);
        a.unlock();
        start as *mut u8
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let Some(c) = class_of(layout.size().max(layout.align())) else {
            return;
        };
        let a = &ARENA_STATE;
        a.lock();
        // SAFETY: ptr is a block of this class we handed out, no longer used by its owner;
        // its first word now links the free list.
        unsafe { *(ptr as *mut u64) = a.free[c].load(Ordering::Relaxed) };
        a.free[c].store(ptr as u64, Ordering::Relaxed);
        a.unlock();
    }
}

#[global_allocator]
static GLOBAL: OwnAlloc = OwnAlloc;

/// A fork copies the arena's lock as it is: take it for the fork, so the child's copy is
/// free (registered first, so that its prepare handler runs last and its child handler
/// first, around samepage's own).
extern "C" fn lock_arena() {
    ARENA_STATE.lock();
}
extern "C" fn unlock_arena() {
    ARENA_STATE.unlock();
}

extern "C" fn init() {
    // SAFETY: the handlers are extern "C" functions that live for the program's life.
    unsafe { libc::pthread_atfork(Some(lock_arena), Some(unlock_arena), Some(unlock_arena)) };
    let a = &ARENA_STATE;
    a.lock();
    let ok = a.reserve();
    a.unlock();
    if ok {
        let b = a.base.load(Ordering::Relaxed);
        samepage_linux::ipc::note_own(b, b + ARENA);
    }
    samepage_linux::preload::init();
}

/// Runs when the dynamic loader loads the library, before the program's `main`.
#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = init;

fn set_errno(e: i32) {
    // SAFETY: __errno_location returns the calling thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

/// `madvise(2)`: merging advice goes to samepage, the rest to the kernel.
///
/// # Safety
/// As `madvise(2)`: the caller vouches for the range and the advice.
#[no_mangle]
pub unsafe extern "C" fn madvise(
    addr: *mut libc::c_void,
    len: libc::size_t,
    advice: libc::c_int,
) -> libc::c_int {
    match samepage_linux::preload::madvise(addr as u64, len as u64, advice) {
        Some(Ok(())) => 0,
        Some(Err(e)) => {
            set_errno(e);
            -1
        }
        // SAFETY: the program's own call, passed to the kernel unchanged.
        None => unsafe { libc::syscall(libc::SYS_madvise, addr, len, advice) as libc::c_int },
    }
}

/// `prctl(2)`: `PR_SET_MEMORY_MERGE` and `PR_GET_MEMORY_MERGE` go to samepage, the rest to
/// the kernel. (`prctl` is variadic in C; on x86-64 its integer arguments arrive in the
/// same registers as these five.)
///
/// # Safety
/// As `prctl(2)`.
#[no_mangle]
pub unsafe extern "C" fn prctl(
    option: libc::c_int,
    a2: libc::c_ulong,
    a3: libc::c_ulong,
    a4: libc::c_ulong,
    a5: libc::c_ulong,
) -> libc::c_int {
    match samepage_linux::preload::prctl(option, a2, a3, a4, a5) {
        Some(Ok(v)) => v,
        Some(Err(e)) => {
            set_errno(e);
            -1
        }
        // SAFETY: the program's own call, passed to the kernel unchanged.
        None => unsafe { libc::syscall(libc::SYS_prctl, option, a2, a3, a4, a5) as libc::c_int },
    }
}
