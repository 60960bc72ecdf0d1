//! What the live tests do as "the application": plain system calls on memory the test
//! owns, and reads of the page tables.

#![allow(dead_code)] // each test binary uses a different part

use samepage_linux::{LiveKsm, PageKind, Region};
use std::os::unix::fs::FileExt;
use std::time::Duration;

pub const PS: u64 = 4096;

/// An engine at full speed (run=0).
pub fn engine() -> LiveKsm {
    let ksm = LiveKsm::new().expect("live engine (needs root or /dev/userfaultfd access)");
    ksm.set_knob("pages_to_scan", "10000").unwrap();
    ksm.set_knob("sleep_millisecs", "0").unwrap();
    ksm
}

/// Run `n` full scans (run=1 for them, then run=0 again).
pub fn full_scans(ksm: &LiveKsm, n: u64) {
    ksm.set_knob("run", "1").unwrap();
    assert!(
        ksm.wait_full_scans(n, Duration::from_secs(60)),
        "{n} full scans"
    );
    ksm.set_knob("run", "0").unwrap();
}

/// Fill every page of `r` with what `f(page index)` gives.
pub fn fill(r: &Region, f: impl Fn(u64) -> [u8; 4096]) {
    for i in 0..r.len() / PS {
        r.write(i * PS, &f(i)).unwrap();
    }
}

/// Pages of `[start, start + len)` samepage says are merged.
pub fn merged_pages(ksm: &LiveKsm, start: u64, len: u64) -> usize {
    (0..len / PS)
        .filter(|i| matches!(ksm.page(start + i * PS).kind, PageKind::Merged { .. }))
        .count()
}

/// The pagemap entry of `addr` in this process.
pub fn pagemap_entry(addr: u64) -> u64 {
    let f = std::fs::File::open("/proc/self/pagemap").unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, addr / PS * 8).unwrap();
    u64::from_ne_bytes(b)
}

/// Pages of `[start, start + len)` that have memory (a page is mapped).
pub fn present_pages(start: u64, len: u64) -> usize {
    (0..len / PS)
        .filter(|i| pagemap_entry(start + i * PS) & (1 << 63) != 0)
        .count()
}

/// `MADV_DONTNEED` on a range of a region the test owns.
pub fn discard(addr: u64, len: u64) {
    // SAFETY: the range is memory of a region this test created; discarding it is what the
    // test is about, and no Rust reference points into it.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, libc::MADV_DONTNEED) };
    assert_eq!(r, 0, "madvise: {}", std::io::Error::last_os_error());
}

/// `munmap` of memory the test mapped itself.
pub fn unmap(addr: u64, len: u64) {
    // SAFETY: the range was mapped by this test with `mmap_anon` and nothing refers to it.
    let r = unsafe { libc::munmap(addr as *mut libc::c_void, len as usize) };
    assert_eq!(r, 0, "munmap: {}", std::io::Error::last_os_error());
}

/// Fresh private anonymous memory the test owns (to adopt).
pub fn mmap_anon(len: u64) -> u64 {
    // SAFETY: a new mapping at an address the kernel chooses.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p as u64
}

/// Fork; the child runs `child` (only system calls: the parent has other threads) and exits
/// with its result. Returns the child's exit status.
pub fn fork_child(child: fn() -> i32) -> i32 {
    // SAFETY: the child only runs `child`, which makes raw system calls, then leaves with
    // _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let code = child();
        // SAFETY: _exit ends the child at once.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    libc::WEXITSTATUS(status)
}

/// Read `len` bytes of what `data` holds into memory at `addr` with read(2) from a pipe: a
/// write by the kernel.
pub fn read_into(addr: u64, data: &[u8]) -> usize {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: data is a readable buffer; fds[1] is the pipe's write end.
    let w = unsafe { libc::write(fds[1], data.as_ptr() as *const libc::c_void, data.len()) };
    assert_eq!(w as usize, data.len());
    // SAFETY: the destination is memory of a region the test owns; the kernel checks it.
    let n = unsafe { libc::read(fds[0], addr as *mut libc::c_void, data.len()) };
    // SAFETY: closing the two descriptors made above.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    n as usize
}
