//! The raw layer: thin wrappers over the system calls of the live backend, each returning
//! `io::Result`, and nearly every `unsafe` block of the crate. A wrapper that can change
//! memory the caller might not own is an `unsafe fn` whose `# Safety` section says what the
//! caller must guarantee, as rustix does; the rest are safe.

pub mod pagemap;
pub mod socket;
pub mod uffd;

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// The page size samepage works with.
pub const PAGE: u64 = samepage_engine::PAGE_SIZE as u64;

pub(crate) fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub(crate) fn cvt_isize(r: isize) -> io::Result<isize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A private anonymous mapping samepage made and owns: it is unmapped when dropped. Its
/// memory is only ever reached through system calls (`process_vm_readv`/`writev`), which
/// copy in the kernel and report an unmapped page as an error, so no Rust reference ever
/// points into it and other threads (or page moves) may change it at any time.
#[derive(Debug)]
pub struct Mapping {
    addr: u64,
    len: u64,
}

impl Mapping {
    /// `len` bytes (a multiple of the page size) of fresh memory, not reserved against the
    /// commit limit (`MAP_NORESERVE`), readable and writable.
    pub fn anon(len: u64) -> io::Result<Self> {
        if len == 0 || !len.is_multiple_of(PAGE) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a mapping must be a non-zero multiple of the page size",
            ));
        }
        // SAFETY: a fresh mapping at an address the kernel chooses replaces nothing.
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
        Ok(Self {
            addr: p as u64,
            len,
        })
    }

    /// First address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never empty (the constructor refuses that); for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, off: u64, n: usize) -> io::Result<()> {
        if off.checked_add(n as u64).is_none_or(|e| e > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the range is outside the mapping",
            ));
        }
        Ok(())
    }

    /// Copy `data` in at byte offset `off`, as a store of the application would (faults
    /// included).
    pub fn write(&self, off: u64, data: &[u8]) -> io::Result<()> {
        self.check(off, data.len())?;
        write_self(self.addr + off, data)
    }

    /// Copy `buf.len()` bytes out from byte offset `off`.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(off, buf.len())?;
        let n = read_process(0, self.addr + off, buf)?;
        if n != buf.len() {
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        Ok(())
    }

    /// `madvise` with an advice that never changes the contents (`MADV_NOHUGEPAGE`,
    /// `MADV_HUGEPAGE`, `MADV_MERGEABLE`, `MADV_UNMERGEABLE`, `MADV_POPULATE_WRITE`, ...).
    pub fn advise(&self, advice: libc::c_int) -> io::Result<()> {
        debug_assert!(
            ![libc::MADV_DONTNEED, libc::MADV_FREE, libc::MADV_REMOVE].contains(&advice),
            "destructive advice on a Mapping"
        );
        // SAFETY: the range is this mapping's, and the advices allowed keep its contents.
        unsafe { madvise(self.addr, self.len, advice) }
    }

    /// Discard the pages of `[off, off + len)`: they read zeros afterwards.
    pub fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        self.check(off, len as usize)?;
        // SAFETY: the range is inside this mapping, which samepage owns; nothing holds a
        // reference into it.
        unsafe { madvise(self.addr + off, len, libc::MADV_DONTNEED) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours and nothing refers into it.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}

/// A read-only shared view of a file samepage owns (its store of canonical pages), grown as
/// the file grows. Pages are read out of it by copying.
#[derive(Debug)]
pub struct FileView {
    addr: u64,
    len: u64,
}

impl FileView {
    /// A view of the first `len` bytes of `fd`.
    pub fn new(fd: BorrowedFd<'_>, len: u64) -> io::Result<Self> {
        // SAFETY: a fresh mapping at an address the kernel chooses replaces nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            addr: p as u64,
            len,
        })
    }

    /// Bytes the view covers.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Make the view cover `len` bytes (it may move).
    pub fn grow(&mut self, len: u64) -> io::Result<()> {
        if len <= self.len {
            return Ok(());
        }
        // SAFETY: the view is ours; MREMAP_MAYMOVE moves it whole if it cannot grow in
        // place, and callers read through it only under the lock that guards `grow`.
        let p = unsafe {
            libc::mremap(
                self.addr as *mut libc::c_void,
                self.len as usize,
                len as usize,
                libc::MREMAP_MAYMOVE,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        self.addr = p as u64;
        self.len = len;
        Ok(())
    }

    /// The address of byte `off` of the file in this view (for `UFFDIO_COPY`'s source).
    pub fn at(&self, off: u64) -> Option<*const u8> {
        (off + PAGE <= self.len).then_some((self.addr + off) as *const u8)
    }

    /// Copy the page at byte offset `off` into `buf`. The page must be inside the file:
    /// reading past its end would raise SIGBUS, so callers check against the file's size.
    pub fn read_page(&self, off: u64, buf: &mut [u8; PAGE as usize]) -> bool {
        let Some(p) = self.at(off) else { return false };
        // SAFETY: the page lies inside the view and inside the file (the caller checks the
        // file's size); canonical pages are written only before anything maps them, and no
        // Rust reference points into the view.
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), PAGE as usize) };
        true
    }

    /// Compare the page at byte offset `off` with `other` (same rules as
    /// [`FileView::read_page`]).
    pub fn page_equals(&self, off: u64, other: &[u8]) -> bool {
        let Some(p) = self.at(off) else { return false };
        // SAFETY: as read_page; the slice lives only for this comparison, while nothing
        // writes the page.
        let page = unsafe { std::slice::from_raw_parts(p, PAGE as usize) };
        page == other
    }
}

impl Drop for FileView {
    fn drop(&mut self) {
        // SAFETY: the view is ours and nothing refers into it.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}

/// `madvise(addr, len, advice)`.
///
/// # Safety
/// The range must be memory the caller manages; destructive advices (`MADV_DONTNEED`,
/// `MADV_FREE`, `MADV_REMOVE`) discard its contents.
pub unsafe fn madvise(addr: u64, len: u64, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: the caller vouches for the range and the advice.
    cvt(unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, advice) }).map(drop)
}

/// `memfd_create(name, MFD_CLOEXEC)`.
pub fn memfd_create(name: &str) -> io::Result<OwnedFd> {
    let c = std::ffi::CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a valid C string; the returned descriptor is owned by the OwnedFd.
    let fd = cvt(unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC) })?;
    // SAFETY: fd was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A new, read-only open file description of the file `fd` refers to (through
/// `/proc/self/fd`), close-on-exec: what a client gets of its domain's store.
pub fn reopen_read_only(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    Ok(f.into())
}

/// `pwrite` of one page at byte offset `off`.
pub fn pwrite_page(fd: BorrowedFd<'_>, buf: &[u8], off: u64) -> io::Result<()> {
    debug_assert_eq!(buf.len() as u64, PAGE);
    // SAFETY: buf is a valid readable buffer of its length.
    let n = cvt_isize(unsafe {
        libc::pwrite(
            fd.as_raw_fd(),
            buf.as_ptr() as *const libc::c_void,
            buf.len(),
            off as libc::off_t,
        )
    })?;
    if n as usize != buf.len() {
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    Ok(())
}

/// Release the memory of `[off, off + len)` of a file (`FALLOC_FL_PUNCH_HOLE`).
pub fn punch_hole(fd: BorrowedFd<'_>, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain system call on a borrowed descriptor.
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
pub fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    // SAFETY: plain system call on a borrowed descriptor.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) }).map(drop)
}

/// Read `buf.len()` bytes of process `pid`'s memory at `addr` (`pid` 0: this process) with
/// one `process_vm_readv`: the bytes read, which stop short at the first page that cannot be
/// read. Accesses fault like the application's would (a hole in a userfaultfd range waits
/// for its handler); an unmapped address gives an error instead of a crash.
pub fn read_process(pid: u32, addr: u64, buf: &mut [u8]) -> io::Result<usize> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let pid = if pid == 0 { std::process::id() } else { pid };
    // SAFETY: local describes a writable buffer we own; the kernel checks remote.
    let n = cvt_isize(unsafe { libc::process_vm_readv(pid as i32, &local, 1, &remote, 1, 0) })?;
    Ok(n as usize)
}

/// Write `data` into this process's memory at `addr` with `process_vm_writev`: like a store
/// of the application (faults included), but an unmapped address gives an error.
pub fn write_self(addr: u64, data: &[u8]) -> io::Result<()> {
    let local = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: local describes a readable buffer; the kernel checks and writes remote, which
    // callers restrict to memory samepage owns.
    let n =
        cvt_isize(unsafe { libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0) })?;
    if n as usize != data.len() {
        return Err(io::Error::from_raw_os_error(libc::EFAULT));
    }
    Ok(())
}

/// The page at `addr`, an address of this process that only the calling thread can reach
/// (a page just moved into samepage's scratch area), borrowed in place.
///
/// # Safety
/// The page must be mapped and readable, and nothing may write it while the slice lives.
pub unsafe fn own_page<'a>(addr: u64) -> &'a [u8] {
    // SAFETY: the caller guarantees the page is mapped, readable and not written while the
    // slice lives.
    unsafe { std::slice::from_raw_parts(addr as *const u8, PAGE as usize) }
}

/// Wait until one of `fds` is readable (or hung up), or `timeout_ms` passes (-1: forever).
/// Returns the readiness of each (`revents`).
pub fn poll(fds: &[BorrowedFd<'_>], timeout_ms: i32) -> io::Result<Vec<i16>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|f| libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: p is a valid array of pollfd of that length.
    let n = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![0; fds.len()]);
        }
        return Err(e);
    }
    Ok(p.iter().map(|x| x.revents).collect())
}

/// An eventfd: a counter another thread can wait on with `poll`.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// A non-blocking, close-on-exec eventfd at 0.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain system call.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        // SAFETY: fd is new and owned by nobody else.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
    /// Add one: pollers wake.
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64.
        unsafe {
            libc::write(
                self.0.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
    }
    /// Reset to 0.
    pub fn clear(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64; EAGAIN at 0 is fine.
        unsafe {
            libc::read(
                self.0.as_raw_fd(),
                &mut v as *mut u64 as *mut libc::c_void,
                8,
            )
        };
    }
    /// For `poll`.
    pub fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.0.as_fd()
    }
}

/// Is the page at `addr` mapped at all? (`mincore` answers ENOMEM for an address no
/// mapping covers; it reads no memory and raises no fault.)
pub fn is_mapped(addr: u64) -> bool {
    let mut v = 0u8;
    // SAFETY: mincore writes one byte per page of the range into v, which holds one.
    let r = unsafe {
        libc::mincore(
            (addr & !(PAGE - 1)) as *mut libc::c_void,
            PAGE as usize,
            &mut v,
        )
    };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOMEM)
}

/// The thread id of the calling thread.
pub fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() as u32 }
}

/// The CPU thread `tid` of this process last ran on (field 39 of `/proc/self/task/TID/stat`).
pub fn last_cpu_of(tid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields count from its last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(36)?.parse().ok()
}

/// The CPUs the calling thread may run on, to go back to after [`pin_thread`].
pub struct CpuMask(libc::cpu_set_t);

impl std::fmt::Debug for CpuMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries((0..libc::CPU_SETSIZE as u32).filter(|&c| self.contains(c)))
            .finish()
    }
}

impl CpuMask {
    /// The calling thread's mask now.
    pub fn of_this_thread() -> io::Result<Self> {
        // SAFETY: an all-zero cpu_set_t is a valid empty set; sched_getaffinity writes at
        // most its size into it.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: set is a valid, writable cpu_set_t of the size given; 0 is this thread.
        cvt(unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) })?;
        Ok(Self(set))
    }

    /// Whether `cpu` is in the mask.
    pub fn contains(&self, cpu: u32) -> bool {
        // SAFETY: CPU_ISSET only reads the set; cpu is checked against its size.
        (cpu as usize) < libc::CPU_SETSIZE as usize
            && unsafe { libc::CPU_ISSET(cpu as usize, &self.0) }
    }

    /// Let the calling thread run on these CPUs again.
    pub fn apply(&self) -> io::Result<()> {
        // SAFETY: self.0 is a valid cpu_set_t of the size given; 0 is this thread.
        cvt(unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&self.0), &self.0) })
            .map(drop)
    }
}

/// Run the calling thread on `cpu` only.
pub fn pin_thread(cpu: u32) -> io::Result<()> {
    if cpu as usize >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: cpu is below CPU_SETSIZE (checked above).
    unsafe { libc::CPU_SET(cpu as usize, &mut set) };
    // SAFETY: set is a valid cpu_set_t of the size given; 0 is this thread.
    cvt(unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) }).map(drop)
}

/// CPU time of the calling thread (`CLOCK_THREAD_CPUTIME_ID`).
pub fn this_thread_cpu() -> std::time::Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: t is a valid, writable timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// CPU time of thread `tid` of this process in nanoseconds (`/proc/self/task/TID/schedstat`).
pub fn thread_cpu_ns(tid: u32) -> u64 {
    read_first_u64(&format!("/proc/self/task/{tid}/schedstat"))
}

/// CPU time of process `pid` (all its threads) in nanoseconds (`/proc/PID/schedstat`
/// covers only its main thread, so this sums the tasks).
pub fn process_cpu_ns(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .map(|e| read_first_u64(&format!("{}/schedstat", e.path().display())))
        .sum()
}

fn read_first_u64(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// Run the calling thread only on CPU time nobody else wants (`SCHED_IDLE`).
pub fn set_idle_priority() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: param is a valid sched_param; 0 is the calling thread.
    cvt(unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) }).map(drop)
}

/// Put thread `tid` at `SCHED_IDLE` (`idle`) or back at `SCHED_OTHER` with the nice value
/// it has; leaving `SCHED_IDLE` needs `CAP_SYS_NICE` or a `RLIMIT_NICE` that allows that nice
/// value. Thread ids are system-wide: the caller makes sure `tid` is a live thread of its
/// own (one it joins before its id can be reused).
pub fn set_thread_idle(tid: u32, idle: bool) -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    // SAFETY: param is a valid sched_param; the call changes only a scheduling policy.
    cvt(unsafe { libc::sched_setscheduler(tid as libc::pid_t, policy, &param) }).map(drop)
}

/// The scheduling policy of thread `tid` (`SCHED_OTHER`, `SCHED_IDLE`, ...).
#[cfg(test)]
pub fn thread_policy(tid: u32) -> io::Result<libc::c_int> {
    // SAFETY: sched_getscheduler only reads a thread's policy.
    cvt(unsafe { libc::sched_getscheduler(tid as libc::pid_t) })
}

/// Block every signal in the calling thread: samepage's threads inside another program
/// must never run its signal handlers.
pub fn block_all_signals() {
    // SAFETY: set is initialised by sigfillset before use; pthread_sigmask only changes the
    // calling thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Ranges of this process that are samepage's own (its threads' stacks, its scratch area,
/// an allocator's arena): never to be registered for merging, because the fault handler
/// touching a page of its own memory that waits for the fault handler would never return.
static OWN: std::sync::Mutex<Vec<(u64, u64)>> = std::sync::Mutex::new(Vec::new());

/// Note `[start, end)` as samepage's own.
pub fn note_own(start: u64, end: u64) {
    OWN.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((start, end));
}

/// samepage's own ranges.
pub fn own_ranges() -> Vec<(u64, u64)> {
    OWN.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// A thread's stack noted as samepage's own, until the thread ends: glibc may then give
/// the mapping to a thread of the application.
#[must_use = "the stack is samepage's only while the note lives"]
pub struct OwnStack(Vec<(u64, u64)>);

impl Drop for OwnStack {
    fn drop(&mut self) {
        let mut own = OWN.lock().unwrap_or_else(|e| e.into_inner());
        for r in &self.0 {
            if let Some(i) = own.iter().position(|x| x == r) {
                own.swap_remove(i);
            }
        }
    }
}

/// Note the calling thread's stack as samepage's own: the whole mapping it lies in, since
/// glibc keeps the thread's TLS and descriptor in the same mapping, above the range
/// `pthread_getattr_np` reports.
pub fn note_own_stack() -> OwnStack {
    let mut noted = Vec::new();
    // SAFETY: attr is initialised by pthread_getattr_np and destroyed after use; the
    // out-parameters are valid.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            return OwnStack(noted);
        }
        let mut addr: *mut libc::c_void = std::ptr::null_mut();
        let mut size: libc::size_t = 0;
        if libc::pthread_attr_getstack(&attr, &mut addr, &mut size) == 0 {
            // The guard page below the stack too.
            let lo = (addr as u64).saturating_sub(PAGE);
            noted.push((lo, addr as u64 + size as u64));
            if let Some(r) = crate::eligibility::mapping_around(addr as u64) {
                noted.push(r);
            }
        }
        libc::pthread_attr_destroy(&mut attr);
    }
    for &(s, e) in &noted {
        note_own(s, e);
    }
    OwnStack(noted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_is_pinned_and_let_go() {
        std::thread::spawn(|| {
            let all = CpuMask::of_this_thread().unwrap();
            let cpu = last_cpu_of(gettid()).expect("this thread's CPU");
            assert!(all.contains(cpu));
            pin_thread(cpu).unwrap();
            let pinned = CpuMask::of_this_thread().unwrap();
            assert!(pinned.contains(cpu));
            assert_eq!(
                last_cpu_of(gettid()),
                Some(cpu),
                "it runs where it is pinned"
            );
            all.apply().unwrap();
            assert!(pin_thread(libc::CPU_SETSIZE as u32).is_err());
        })
        .join()
        .unwrap();
        assert_eq!(last_cpu_of(u32::MAX), None, "no such thread");
    }
}
