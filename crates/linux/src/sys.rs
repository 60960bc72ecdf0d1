//! The raw layer: every system call and every `unsafe` block of the live backend, each a thin
//! wrapper that returns `io::Result`. The uapi constants that the machine's 6.1 headers lack
//! (PAGEMAP_SCAN, UFFDIO_MOVE, newer userfaultfd features) are defined here.

use samepage_engine::PAGE_SIZE;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub const PAGE: u64 = PAGE_SIZE as u64;

// ---- userfaultfd features and ioctls newer than the 6.1 headers (upstream uapi values) ----
pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
pub const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const UFFD_FEATURE_MOVE: u64 = 1 << 16;

/// `struct uffdio_range`.
#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}
/// `struct uffdio_writeprotect`.
#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}
/// `struct uffdio_zeropage`.
#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}
/// `struct uffdio_copy`.
#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
const UFFDIO_WAKE: libc::c_ulong = ioc(2, 0xAA, 0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_COPY: libc::c_ulong = ioc(3, 0xAA, 0x03, std::mem::size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: libc::c_ulong = ioc(3, 0xAA, 0x04, std::mem::size_of::<UffdioZeropage>());
const UFFDIO_WRITEPROTECT: libc::c_ulong =
    ioc(3, 0xAA, 0x06, std::mem::size_of::<UffdioWriteprotect>());

/// `UFFDIO_WRITEPROTECT` on one page: protect, or unprotect (waking waiters if `wake`).
/// EAGAIN means a non-cooperative event (an unmap, discard or move) is waiting to be read.
pub fn uffd_wp(uffd: RawFd, addr: u64, protect: bool, wake: bool) -> io::Result<()> {
    uffd_wp_range(uffd, addr, PAGE, protect, wake)
}

/// `UFFDIO_WRITEPROTECT` on `[addr, addr + len)`.
pub fn uffd_wp_range(
    uffd: RawFd,
    addr: u64,
    len: u64,
    protect: bool,
    wake: bool,
) -> io::Result<()> {
    const MODE_WP: u64 = 1 << 0;
    const MODE_DONTWAKE: u64 = 1 << 1;
    let mode = match (protect, wake) {
        (true, _) => MODE_WP,
        (false, true) => 0,
        (false, false) => MODE_DONTWAKE,
    };
    let mut w = UffdioWriteprotect {
        range: UffdioRange { start: addr, len },
        mode,
    };
    // SAFETY: the ioctl reads the struct we pass; the range belongs to this process.
    cvt(unsafe { libc::ioctl(uffd, UFFDIO_WRITEPROTECT, &mut w as *mut UffdioWriteprotect) })
        .map(drop)
}

/// `UFFDIO_ZEROPAGE` on one page.
pub fn uffd_zeropage(uffd: RawFd, addr: u64, wake: bool) -> io::Result<()> {
    let (done, r) = uffd_zeropage_range(uffd, addr, PAGE, wake);
    r.and(if done == PAGE {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(libc::EAGAIN))
    })
}

/// `UFFDIO_ZEROPAGE` on `[addr, addr + len)`: the bytes mapped (from `addr`) and how the call
/// ended (an error stops it part-way).
pub fn uffd_zeropage_range(uffd: RawFd, addr: u64, len: u64, wake: bool) -> (u64, io::Result<()>) {
    let mut z = UffdioZeropage {
        range: UffdioRange { start: addr, len },
        mode: if wake { 0 } else { 1 },
        zeropage: 0,
    };
    // SAFETY: the ioctl reads and writes the struct we pass; the kernel maps the zero page at
    // each address of the range only if nothing is mapped there.
    let r =
        cvt(unsafe { libc::ioctl(uffd, UFFDIO_ZEROPAGE, &mut z as *mut UffdioZeropage) }).map(drop);
    (z.zeropage.max(0) as u64, r)
}

/// `UFFDIO_COPY` of one page from `src` (a page-sized buffer) to `addr`, waking waiters.
pub fn uffd_copy(uffd: RawFd, src: &[u8; PAGE_SIZE], addr: u64) -> io::Result<()> {
    let mut c = UffdioCopy {
        dst: addr,
        src: src.as_ptr() as u64,
        len: PAGE,
        mode: 0,
        copy: 0,
    };
    // SAFETY: src is a readable page-sized buffer; the kernel fills addr only if nothing is
    // mapped there.
    cvt(unsafe { libc::ioctl(uffd, UFFDIO_COPY, &mut c as *mut UffdioCopy) }).map(drop)
}

/// `UFFDIO_WAKE` on one page.
pub fn uffd_wake(uffd: RawFd, addr: u64) -> io::Result<()> {
    uffd_wake_range(uffd, addr, PAGE)
}

/// `UFFDIO_WAKE` on `[addr, addr + len)`.
pub fn uffd_wake_range(uffd: RawFd, addr: u64, len: u64) -> io::Result<()> {
    let mut r = UffdioRange { start: addr, len };
    // SAFETY: the ioctl reads the struct we pass.
    cvt(unsafe { libc::ioctl(uffd, UFFDIO_WAKE, &mut r as *mut UffdioRange) }).map(drop)
}

/// `struct uffdio_move`.
#[repr(C)]
struct UffdioMove {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    moved: i64,
}
const UFFDIO_MOVE_MODE_DONTWAKE: u64 = 1 << 0;
/// `_IOWR(0xAA, 0x05, struct uffdio_move)`.
const UFFDIO_MOVE: libc::c_ulong = ioc(3, 0xAA, 0x05, std::mem::size_of::<UffdioMove>());

/// `struct uffdio_continue`.
#[repr(C)]
struct UffdioContinue {
    start: u64,
    len: u64,
    mode: u64,
    mapped: i64,
}
/// Map the page write-protected (Linux 6.3).
const UFFDIO_CONTINUE_MODE_WP: u64 = 1 << 1;
/// `_IOWR(0xAA, 0x07, struct uffdio_continue)`.
const UFFDIO_CONTINUE: libc::c_ulong = ioc(3, 0xAA, 0x07, std::mem::size_of::<UffdioContinue>());

/// `UFFDIO_CONTINUE` one page write-protected: map the page-cache page that a minor fault
/// found, keep samepage's write protection on it, and wake the faulting thread.
pub fn uffd_continue_wp(uffd: RawFd, addr: u64) -> io::Result<()> {
    uffd_continue(uffd, addr, true)
}

/// `UFFDIO_CONTINUE` one page write-protected, waking waiters or not. EEXIST: a page is
/// mapped there already.
pub fn uffd_continue(uffd: RawFd, addr: u64, wake: bool) -> io::Result<()> {
    const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1 << 0;
    let mut c = UffdioContinue {
        start: addr,
        len: PAGE,
        mode: UFFDIO_CONTINUE_MODE_WP
            | if wake {
                0
            } else {
                UFFDIO_CONTINUE_MODE_DONTWAKE
            },
        mapped: 0,
    };
    // SAFETY: the ioctl reads and writes the struct we pass; addr is a page of a range
    // registered for minor faults with this userfaultfd.
    cvt(unsafe { libc::ioctl(uffd, UFFDIO_CONTINUE, &mut c as *mut UffdioContinue) }).map(drop)
}

// ---- PAGEMAP_SCAN (Linux 6.7) ----
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;

/// `struct page_region`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}
/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = ioc(3, b'f' as u32, 16, std::mem::size_of::<PmScanArg>());

const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> libc::c_ulong {
    ((dir << 30) | ((size as u32) << 16) | (ty << 8) | nr) as libc::c_ulong
}

/// pagemap entry bits.
pub const PM_PFN_MASK: u64 = (1 << 55) - 1;
pub const PM_UFFD_WP: u64 = 1 << 57;
pub const PM_FILE: u64 = 1 << 61;
pub const PM_PRESENT: u64 = 1 << 63;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `mmap(NULL, len, RW, MAP_PRIVATE|MAP_ANONYMOUS)`.
pub fn mmap_anon(len: u64) -> io::Result<u64> {
    // SAFETY: a fresh anonymous mapping at an address the kernel chooses; nothing existing is
    // replaced.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p as u64)
}

/// `mmap(addr, len, RW, MAP_PRIVATE|MAP_FIXED, fd, off)`: replaces what is mapped there.
///
/// The caller owns `[addr, addr+len)` (a page of a region it manages, currently a hole that
/// faults block on) and replaces it with a private mapping of identical contents.
pub fn mmap_fixed_file(addr: u64, len: u64, fd: RawFd, off: u64) -> io::Result<()> {
    // SAFETY: the range belongs to a region samepage manages and holds the same bytes before
    // and after; no Rust reference points into it.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED,
            fd,
            off as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `mmap(NULL, len, PROT_READ, MAP_SHARED|MAP_NORESERVE, fd, 0)`: a read-only view of a
/// file samepage owns (its store of canonical pages).
pub fn mmap_shared_ro(fd: RawFd, len: u64) -> io::Result<u64> {
    // SAFETY: a fresh mapping at an address the kernel chooses; nothing existing is replaced.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p as u64)
}

/// Copy `buf.len()` bytes from `addr`, a range of a mapping samepage made for itself and
/// that nobody else writes (its scratch area, the view of its store).
///
/// # Safety
/// `[addr, addr + buf.len())` must be mapped and readable for the duration of the call, and
/// not written meanwhile: no Rust reference to it exists and no other thread stores to it.
pub unsafe fn read_own(addr: u64, buf: &mut [u8]) {
    // SAFETY: the caller guarantees the source is mapped, readable and not written; buf is a
    // distinct, writable buffer of the same length.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len()) }
}

/// The page at `addr` of a mapping samepage made for itself, read in place.
///
/// # Safety
/// As [`read_own`], for as long as the returned reference lives.
pub unsafe fn own_page<'a>(addr: u64) -> &'a [u8; PAGE_SIZE] {
    // SAFETY: the caller guarantees the page is mapped, readable and not written while the
    // reference lives; page alignment satisfies the array's alignment of 1.
    unsafe { &*(addr as *const [u8; PAGE_SIZE]) }
}

/// `munmap`.
pub fn munmap(addr: u64, len: u64) -> io::Result<()> {
    // SAFETY: only called on mappings samepage created and no longer references.
    cvt(unsafe { libc::munmap(addr as *mut libc::c_void, len as usize) }).map(drop)
}

/// `madvise`.
pub fn madvise(addr: u64, len: u64, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: madvise on a range of this process; the advices used (DONTNEED on samepage's own
    // scratch area, POPULATE_WRITE, NOHUGEPAGE) never make memory the program reads invalid.
    cvt(unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, advice) }).map(drop)
}

/// `memfd_create(name, MFD_CLOEXEC)`.
pub fn memfd_create(name: &str) -> io::Result<OwnedFd> {
    let c = std::ffi::CString::new(name).expect("no NUL in name");
    // SAFETY: a valid C string; the returned descriptor is owned by the OwnedFd.
    let fd = cvt(unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC) })?;
    // SAFETY: fd was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `pwrite` of one page.
pub fn pwrite_page(fd: &OwnedFd, buf: &[u8; PAGE_SIZE], off: u64) -> io::Result<()> {
    // SAFETY: buf is a valid readable buffer of PAGE_SIZE bytes.
    let n = unsafe {
        libc::pwrite(
            fd.as_raw_fd(),
            buf.as_ptr() as *const libc::c_void,
            PAGE_SIZE,
            off as libc::off_t,
        )
    };
    if n != PAGE_SIZE as isize {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Release the memory of a range of a memfd (`FALLOC_FL_PUNCH_HOLE`).
pub fn punch_hole(fd: &OwnedFd, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain system call on an owned descriptor.
    cvt(unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    })
    .map(drop)
}

/// `ftruncate`.
pub fn ftruncate(fd: &OwnedFd, len: u64) -> io::Result<()> {
    // SAFETY: plain system call on an owned descriptor.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) }).map(drop)
}

/// Read one page of this process's memory at `addr`: a page the application unmapped
/// meanwhile gives an error instead of a crash, and a page other threads are writing is copied
/// by the kernel rather than raced on by Rust code. `process_vm_readv` first (it waits for
/// userfaultfd faults like an ordinary access); for PROT_NONE pages, which it cannot read but
/// the kernel's KSM does merge, `/proc/self/mem`.
pub fn read_self(addr: u64, buf: &mut [u8; PAGE_SIZE]) -> io::Result<()> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: PAGE_SIZE,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: PAGE_SIZE,
    };
    // SAFETY: local describes a writable buffer we own; remote is only read by the kernel,
    // which checks it.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    if n == PAGE_SIZE as isize {
        return Ok(());
    }
    use std::os::unix::fs::FileExt;
    thread_local! {
        static MEM: Option<std::fs::File> = std::fs::File::open("/proc/self/mem").ok();
    }
    MEM.with(|f| match f {
        Some(f) => f.read_exact_at(buf, addr),
        None => Err(io::Error::last_os_error()),
    })
}

/// Read `buf.len()` bytes of this process's memory at `addr` with one `process_vm_readv`:
/// the bytes read, which stop short at the first page that cannot be read.
pub fn read_self_range(addr: u64, buf: &mut [u8]) -> io::Result<usize> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: local describes a writable buffer we own; remote is only read by the kernel,
    // which checks it.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Write `data` into this process's memory at `addr` with `process_vm_writev`: like a store
/// by the application, including its faults (a write-protected page faults to samepage's
/// handler first), but an unmapped address gives an error instead of a crash.
pub fn write_self(addr: u64, data: &[u8]) -> io::Result<()> {
    let local = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: local describes a readable buffer; the kernel checks and writes remote.
    let n = unsafe { libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0) };
    if n != data.len() as isize {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `UFFDIO_MOVE` one page from `src` to `dst` without waking faulting threads.
pub fn uffd_move(uffd: RawFd, src: u64, dst: u64) -> io::Result<()> {
    let (moved, r) = uffd_move_range(uffd, src, dst, PAGE);
    r.and(if moved == PAGE {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(libc::EAGAIN))
    })
}

/// `UFFDIO_MOVE` of `[src, src + len)` to `dst` without waking faulting threads: the bytes
/// moved (from the start) and how the call ended. EBUSY stops it at a page that is pinned
/// (or shared); the pages before it have moved.
pub fn uffd_move_range(uffd: RawFd, src: u64, dst: u64, len: u64) -> (u64, io::Result<()>) {
    let mut m = UffdioMove {
        dst,
        src,
        len,
        mode: UFFDIO_MOVE_MODE_DONTWAKE,
        moved: 0,
    };
    // SAFETY: the ioctl reads and writes the struct we pass; src and dst are ranges
    // registered with this userfaultfd.
    let r = cvt(unsafe { libc::ioctl(uffd, UFFDIO_MOVE, &mut m as *mut UffdioMove) }).map(drop);
    if m.moved < 0 {
        return (0, Err(io::Error::from_raw_os_error((-m.moved) as i32)));
    }
    (m.moved as u64, r)
}

/// `PAGEMAP_SCAN` over `[start, end)`: regions whose categories match `required` (all set)
/// and `excluded` (none set), with `return_mask` categories reported.
pub fn pagemap_scan(
    pagemap: &std::fs::File,
    start: u64,
    end: u64,
    required: u64,
    excluded: u64,
    return_mask: u64,
) -> io::Result<Vec<PageRegion>> {
    let mut out = Vec::new();
    let mut vec = vec![PageRegion::default(); 512];
    let mut from = start;
    while from < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: 0,
            start: from,
            end,
            walk_end: 0,
            vec: vec.as_mut_ptr() as u64,
            vec_len: vec.len() as u64,
            max_pages: 0,
            category_inverted: excluded,
            category_mask: required | excluded,
            category_anyof_mask: 0,
            return_mask,
        };
        // SAFETY: arg describes `vec`, a writable buffer of vec_len page_region structs that
        // outlives the call.
        let n = cvt(unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) })? as usize;
        out.extend_from_slice(&vec[..n]);
        // walk_end is unreliable once the buffer fills (a kernel quirk seen on this machine):
        // continue after the last region returned instead.
        if n < vec.len() {
            break;
        }
        from = vec[n - 1].end;
    }
    Ok(out)
}

/// One `/proc/self/pagemap` entry.
pub fn pagemap_entry(pagemap: &std::fs::File, addr: u64) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 8];
    pagemap.read_exact_at(&mut b, addr / PAGE * 8)?;
    Ok(u64::from_ne_bytes(b))
}

/// `prctl(PR_SET_MEMORY_MERGE, v)` on this process (the host kernel's KSM).
pub fn prctl_set_memory_merge(on: bool) -> io::Result<()> {
    const PR_SET_MEMORY_MERGE: libc::c_int = 67;
    // SAFETY: plain prctl with integer arguments.
    cvt(unsafe { libc::prctl(PR_SET_MEMORY_MERGE, on as libc::c_ulong, 0, 0, 0) }).map(drop)
}

/// The thread id of the calling thread.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// CPU time of one thread, in nanoseconds (`/proc/self/task/TID/schedstat`, first field).
pub fn thread_cpu_ns(tid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// Wait until `fd` is readable or `timeout_ms` passes. Returns true if readable.
pub fn poll_readable(fd: RawFd, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(n > 0)
}

/// Fork; the child runs `child` (which may only make system calls: the parent has other
/// threads) and exits with its result. Returns the child's exit status.
pub fn fork_child(child: fn() -> i32) -> io::Result<i32> {
    // SAFETY: the child only runs `child`, whose contract is to make raw system calls (no
    // allocation, no locks), then leaves with _exit without running destructors or atexit
    // handlers.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        let code = child();
        // SAFETY: _exit ends the child immediately.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child with a valid status pointer.
    if unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(libc::WEXITSTATUS(status))
}

/// `mprotect`.
pub fn mprotect(addr: u64, len: u64, prot: libc::c_int) -> io::Result<()> {
    // SAFETY: changing the protection of memory the caller owns; Rust code reaches region
    // memory only through system calls that report faults as errors.
    cvt(unsafe { libc::mprotect(addr as *mut libc::c_void, len as usize, prot) }).map(drop)
}

/// `read(2)` from `fd` into this process's memory at `addr` (a kernel-mode write).
pub fn read_fd_into(fd: RawFd, addr: u64, len: usize) -> io::Result<usize> {
    // SAFETY: the kernel checks the destination range and faults it in as needed; a bad
    // address gives EFAULT.
    let n = unsafe { libc::read(fd, addr as *mut libc::c_void, len) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// A pipe: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `write(2)` of a buffer.
pub fn write_fd(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: data is a valid readable buffer.
    let n = unsafe { libc::write(fd, data.as_ptr() as *const libc::c_void, data.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// `mremap(old, len, len, MREMAP_MAYMOVE|MREMAP_FIXED, new)`: move a range.
pub fn mremap_fixed(old: u64, len: u64, new: u64) -> io::Result<()> {
    // SAFETY: moves memory the caller owns to a range the caller owns; Rust code reaches it
    // only through system calls.
    let p = unsafe {
        libc::mremap(
            old as *mut libc::c_void,
            len as usize,
            len as usize,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            new as *mut libc::c_void,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A plain store of the application (a user-mode write, which faults like any store).
///
/// # Safety
/// `addr` must be 8-byte aligned and inside a mapped, writable page of this process for the
/// duration of the call.
pub unsafe fn user_store(addr: u64, v: u64) {
    // SAFETY: the caller guarantees the address is mapped, writable and aligned.
    unsafe { std::sync::atomic::AtomicU64::from_ptr(addr as *mut u64) }
        .store(v, std::sync::atomic::Ordering::Relaxed);
}

/// A plain load of the application.
///
/// # Safety
/// `addr` must be 8-byte aligned and inside a mapped, readable page of this process for the
/// duration of the call.
pub unsafe fn user_load(addr: u64) -> u64 {
    // SAFETY: the caller guarantees the address is mapped, readable and aligned.
    unsafe { std::sync::atomic::AtomicU64::from_ptr(addr as *mut u64) }
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// Time one user-mode store of `v` to `addr` (a first write to a shared page includes its
/// copy-on-write fault).
///
/// # Safety
/// As [`user_store`].
pub unsafe fn timed_store(addr: u64, v: u64) -> std::time::Duration {
    let t = std::time::Instant::now();
    // SAFETY: the caller's guarantee is user_store's.
    unsafe { user_store(addr, v) };
    t.elapsed()
}

/// The CPU the calling thread runs on.
pub fn current_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu has no preconditions.
    let c = unsafe { libc::sched_getcpu() };
    (c >= 0).then_some(c as usize)
}

/// Restrict thread `tid` of this process to `cpu`, or let it run anywhere (`None`: every CPU
/// the process may use, as `allowed` says).
pub fn pin_thread(tid: i32, cpu: Option<usize>, allowed: &libc::cpu_set_t) -> io::Result<()> {
    let mut set = *allowed;
    if let Some(c) = cpu {
        // SAFETY: CPU_ZERO and CPU_SET write into the cpu_set_t we own; c is below
        // CPU_SETSIZE because the kernel reported it as a CPU of this machine.
        unsafe {
            libc::CPU_ZERO(&mut set);
            libc::CPU_SET(c, &mut set);
        }
    }
    // SAFETY: set is a valid cpu_set_t of the size passed; tid is a thread of this process.
    cvt(unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) })
        .map(drop)
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> io::Result<libc::cpu_set_t> {
    // SAFETY: an all-zero cpu_set_t is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid cpu_set_t of the size passed; 0 is the calling thread.
    cvt(unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) })?;
    Ok(set)
}

/// Run the calling thread only on CPU time no other thread wants (`SCHED_IDLE`): any thread
/// that wakes on its CPU (an application thread, the fault handler) runs at once.
pub fn set_idle_priority() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: param is a valid sched_param; 0 is the calling thread.
    cvt(unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) }).map(drop)
}
