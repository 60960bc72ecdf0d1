//! userfaultfd: opening one, its handshake, registration, the ioctls samepage uses, and its
//! events. The machine's 6.1 headers lack several of these (`UFFDIO_MOVE`, `WP_ASYNC`, ...):
//! the values below are the upstream uapi ones, and the unit tests check every struct size,
//! field offset and ioctl number against what `<linux/userfaultfd.h>` gives on Linux 6.18.
//!
//! Every ioctl here acts on the address space of the process that *created* the
//! userfaultfd, whichever process calls it, except `UFFDIO_MOVE`, which the kernel refuses
//! (`EINVAL`) unless the caller is that process ("Do not allow cross-mm moves"). samepage
//! therefore runs every page operation inside the process whose memory it is (the agent).

use super::{cvt, cvt_isize, PAGE};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `UFFD_API`.
const UFFD_API: u64 = 0xAA;

/// Messages one [`Userfaultfd::read_events`] reads at most.
pub const READ_BATCH: usize = 64;

/// Report write-protect faults (`UFFD_FEATURE_PAGEFAULT_FLAG_WP`).
pub const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// `mremap` of a registered range queues an event.
pub const FEATURE_EVENT_REMAP: u64 = 1 << 2;
/// `MADV_DONTNEED`/`MADV_REMOVE`/`MADV_FREE` of a registered range queue an event.
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// `munmap` of a registered range queues an event.
pub const FEATURE_EVENT_UNMAP: u64 = 1 << 6;
/// Fault messages carry the faulting thread's id.
pub const FEATURE_THREAD_ID: u64 = 1 << 8;
/// The kernel resolves write-protect faults itself: it clears the bit and the write goes on,
/// with no message; `PAGEMAP_SCAN` then shows which protected pages were written.
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;
/// `UFFDIO_MOVE`.
pub const FEATURE_MOVE: u64 = 1 << 16;

/// Register for faults on missing pages (holes).
pub const REGISTER_MODE_MISSING: u64 = 1 << 0;
/// Register for write-protection.
pub const REGISTER_MODE_WP: u64 = 1 << 1;

const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> libc::c_ulong {
    ((dir << 30) | ((size as u32) << 16) | (ty << 8) | nr) as libc::c_ulong
}
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;
const UFFDIO: u32 = 0xAA;

/// `struct uffdio_api`.
#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
/// `struct uffdio_range`.
#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}
/// `struct uffdio_register`.
#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
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
/// `struct uffdio_zeropage`.
#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}
/// `struct uffdio_writeprotect`.
#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
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

const UFFDIO_API: libc::c_ulong = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x3F,
    std::mem::size_of::<UffdioApi>(),
);
const UFFDIO_REGISTER: libc::c_ulong = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x00,
    std::mem::size_of::<UffdioRegister>(),
);
const UFFDIO_UNREGISTER: libc::c_ulong =
    ioc(IOC_READ, UFFDIO, 0x01, std::mem::size_of::<UffdioRange>());
const UFFDIO_WAKE: libc::c_ulong = ioc(IOC_READ, UFFDIO, 0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_COPY: libc::c_ulong = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x03,
    std::mem::size_of::<UffdioCopy>(),
);
const UFFDIO_ZEROPAGE: libc::c_ulong = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x04,
    std::mem::size_of::<UffdioZeropage>(),
);
const UFFDIO_MOVE: libc::c_ulong = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x05,
    std::mem::size_of::<UffdioMove>(),
);
const UFFDIO_WRITEPROTECT: libc::c_ulong = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x06,
    std::mem::size_of::<UffdioWriteprotect>(),
);
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: libc::c_ulong = ioc(0, UFFDIO, 0x00, 0);

const MODE_DONTWAKE: u64 = 1 << 0;
const WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;

/// Why a userfaultfd could not be opened.
#[derive(Debug)]
pub enum OpenError {
    /// Neither `userfaultfd(2)` without `UFFD_USER_MODE_ONLY` nor `/dev/userfaultfd` is
    /// allowed to this process.
    NotPermitted { syscall: io::Error, dev: io::Error },
    /// The kernel lacks a feature asked for (`UFFDIO_API` refused it).
    Features { wanted: u64, source: io::Error },
    /// Another failure.
    Other(io::Error),
}

/// A userfaultfd: faults and events of the address space that created it.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
}

impl AsRawFd for Userfaultfd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Userfaultfd {
    /// A userfaultfd for this process that also handles faults taken by system calls
    /// (`read(2)` into a protected buffer), non-blocking and close-on-exec, with the
    /// `features` handshake done. `userfaultfd(2)` needs `CAP_SYS_PTRACE` for that (or
    /// `vm.unprivileged_userfaultfd=1`); `/dev/userfaultfd` needs read-write access to the
    /// node; `dev` is an already opened `/dev/userfaultfd` (a daemon can hand one over).
    pub fn open(features: u64, dev: Option<BorrowedFd<'_>>) -> Result<Self, OpenError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        let fd = match dev {
            Some(d) => new_from_dev(d, flags).map_err(OpenError::Other)?,
            None => {
                // SAFETY: the userfaultfd system call takes flags only.
                let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
                if r >= 0 {
                    // SAFETY: r is a new descriptor owned by nobody else.
                    unsafe { OwnedFd::from_raw_fd(r as RawFd) }
                } else {
                    let syscall = io::Error::last_os_error();
                    match std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open("/dev/userfaultfd")
                    {
                        Ok(f) => new_from_dev(f.as_fd(), flags).map_err(OpenError::Other)?,
                        Err(dev) => return Err(OpenError::NotPermitted { syscall, dev }),
                    }
                }
            }
        };
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: the ioctl reads and writes the struct we pass.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api as *mut UffdioApi) })
            .map_err(|source| OpenError::Features {
                wanted: features,
                source,
            })?;
        Ok(Self { fd })
    }

    /// Register `[start, start + len)` with `mode` (`REGISTER_MODE_*`). Registering a range
    /// again with this userfaultfd replaces its modes.
    pub fn register(&self, start: u64, len: u64, mode: u64) -> io::Result<()> {
        let mut r = UffdioRegister {
            range: UffdioRange { start, len },
            mode,
            ioctls: 0,
        };
        // SAFETY: the ioctl reads and writes the struct we pass; registration changes no
        // memory.
        cvt(unsafe { libc::ioctl(self.as_raw_fd(), UFFDIO_REGISTER, &mut r) }).map(drop)
    }

    /// Unregister `[start, start + len)`: faults there are ordinary faults again, and
    /// threads waiting on one are woken.
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = UffdioRange { start, len };
        // SAFETY: the ioctl reads the struct we pass.
        cvt(unsafe { libc::ioctl(self.as_raw_fd(), UFFDIO_UNREGISTER, &mut r) }).map(drop)
    }

    /// Wake the threads waiting on a fault in `[start, start + len)`: they retry the access.
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = UffdioRange { start, len };
        // SAFETY: the ioctl reads the struct we pass.
        cvt(unsafe { libc::ioctl(self.as_raw_fd(), UFFDIO_WAKE, &mut r) }).map(drop)
    }

    /// Set (`protect`) or clear the write-protect bit on `[start, start + len)`, waking the
    /// threads that wait on a write-protect fault there when clearing and `wake`. With
    /// `WP_ASYNC` a set bit on an entry that maps the zero page is samepage's "placed by
    /// KSM" mark. It never changes the contents of memory. EAGAIN: the address space is
    /// changing (an unmap, discard or move whose event is not read yet).
    pub fn writeprotect(&self, start: u64, len: u64, protect: bool, wake: bool) -> io::Result<()> {
        let mode = match (protect, wake) {
            (true, _) => WRITEPROTECT_MODE_WP,
            (false, true) => 0,
            (false, false) => WRITEPROTECT_MODE_DONTWAKE,
        };
        let mut w = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode,
        };
        // SAFETY: the ioctl reads the struct we pass; protection changes no contents.
        cvt(unsafe { libc::ioctl(self.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut w) }).map(drop)
    }

    /// Map the shared zero page at every hole of `[start, start + len)`. Returns the bytes
    /// mapped from `start` and how the call ended (it stops at the first page that is not a
    /// hole, with EEXIST).
    ///
    /// # Safety
    /// The range must be memory the caller manages: a hole there reads zeros afterwards.
    pub unsafe fn zeropage(&self, start: u64, len: u64, wake: bool) -> (u64, io::Result<()>) {
        let mut z = UffdioZeropage {
            range: UffdioRange { start, len },
            mode: if wake { 0 } else { MODE_DONTWAKE },
            zeropage: 0,
        };
        // SAFETY: the ioctl reads and writes the struct we pass; it only fills holes, as
        // the caller allows.
        let r = cvt(unsafe { libc::ioctl(self.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z) }).map(drop);
        (z.zeropage.max(0) as u64, r)
    }

    /// Fill the hole at `dst` with a private copy of the page at `src` (an address of the
    /// *calling* process), waking the threads that wait on it.
    ///
    /// # Safety
    /// `dst` must be a page the caller manages; `src` must be readable for a page.
    pub unsafe fn copy(&self, src: *const u8, dst: u64, wake: bool) -> io::Result<()> {
        let mut c = UffdioCopy {
            dst,
            src: src as u64,
            len: PAGE,
            mode: if wake { 0 } else { MODE_DONTWAKE },
            copy: 0,
        };
        // SAFETY: the ioctl reads the struct we pass and PAGE bytes at src, which the
        // caller guarantees are readable; it only fills a hole at dst.
        cvt(unsafe { libc::ioctl(self.as_raw_fd(), UFFDIO_COPY, &mut c) }).map(drop)
    }

    /// Move the pages of `[src, src + len)` to the holes at `dst` without waking anyone:
    /// the bytes moved from the start, and how the call ended. EBUSY stops it at a page
    /// that is pinned (DMA, io_uring fixed buffers) or shared with a fork; ENOENT at a hole
    /// in `src`; EAGAIN when the address space is changing. Only the process that created
    /// the userfaultfd may move.
    ///
    /// # Safety
    /// Both ranges must be memory the caller manages: `src` becomes holes.
    pub unsafe fn move_pages(&self, src: u64, dst: u64, len: u64) -> (u64, io::Result<()>) {
        let mut m = UffdioMove {
            dst,
            src,
            len,
            mode: MODE_DONTWAKE,
            moved: 0,
        };
        // SAFETY: the ioctl reads and writes the struct we pass; it moves page-table
        // entries between ranges the caller manages.
        let r = cvt(unsafe { libc::ioctl(self.as_raw_fd(), UFFDIO_MOVE, &mut m) }).map(drop);
        if m.moved < 0 {
            return (0, Err(io::Error::from_raw_os_error((-m.moved) as i32)));
        }
        (m.moved as u64, r)
    }

    /// Read the queued messages (up to [`READ_BATCH`]) without blocking; returns how many
    /// were read (fewer than [`READ_BATCH`]: the queue was empty at that moment).
    pub fn read_events(&self, out: &mut Vec<Event>) -> io::Result<usize> {
        let mut raw = [UffdMsg::default(); READ_BATCH];
        // SAFETY: raw is a writable buffer of that many bytes; read(2) fills whole messages.
        let n = cvt_isize(unsafe {
            libc::read(
                self.as_raw_fd(),
                raw.as_mut_ptr() as *mut libc::c_void,
                std::mem::size_of_val(&raw),
            )
        });
        let n = match n {
            Ok(n) => n as usize / std::mem::size_of::<UffdMsg>(),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        out.extend(raw[..n].iter().filter_map(UffdMsg::parse));
        Ok(n)
    }
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn new_from_dev(dev: BorrowedFd<'_>, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its argument and returns a new
    // descriptor.
    let fd = cvt(unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) })?;
    // SAFETY: fd is a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `struct uffd_msg`: 32 bytes; `event` at 0, the union at 8.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct UffdMsg {
    event: u8,
    _reserved: [u8; 7],
    arg: [u64; 3],
}

const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_FORK: u8 = 0x13;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;
const PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
const PAGEFAULT_FLAG_WP: u64 = 1 << 1;
const PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

/// What kind of fault a thread took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// A hole was accessed.
    Missing,
    /// A write hit a write-protected page (only without `WP_ASYNC`).
    WriteProtect,
    /// A page the page cache holds is not mapped yet.
    Minor,
}

/// One userfaultfd message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A thread waits on a fault at `addr`.
    Pagefault {
        kind: FaultKind,
        write: bool,
        addr: u64,
        tid: u32,
    },
    /// `[start, end)` was discarded (`MADV_DONTNEED`, `MADV_FREE`, `MADV_REMOVE`).
    Remove { start: u64, end: u64 },
    /// `[start, end)` was unmapped.
    Unmap { start: u64, end: u64 },
    /// `[from, from + len)` moved to `to` (`mremap`).
    Remap { from: u64, to: u64, len: u64 },
}

impl UffdMsg {
    fn parse(&self) -> Option<Event> {
        let [a, b, c] = self.arg;
        Some(match self.event {
            EVENT_PAGEFAULT => Event::Pagefault {
                kind: if a & PAGEFAULT_FLAG_WP != 0 {
                    FaultKind::WriteProtect
                } else if a & PAGEFAULT_FLAG_MINOR != 0 {
                    FaultKind::Minor
                } else {
                    FaultKind::Missing
                },
                write: a & PAGEFAULT_FLAG_WRITE != 0,
                addr: b,
                tid: c as u32,
            },
            EVENT_REMOVE => Event::Remove { start: a, end: b },
            EVENT_UNMAP => Event::Unmap { start: a, end: b },
            EVENT_REMAP => Event::Remap {
                from: a,
                to: b,
                len: c,
            },
            // samepage never asks for fork events; anything else is a kernel newer than
            // this code, and is skipped.
            EVENT_FORK => return None,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// Values printed by a C program including `<linux/userfaultfd.h>` (and the newer
    /// uapi definitions) on Linux 6.18.
    #[test]
    fn structs_and_ioctls_match_the_kernel_uapi() {
        assert_eq!(size_of::<UffdioApi>(), 0x18);
        assert_eq!(size_of::<UffdioRegister>(), 0x20);
        assert_eq!(size_of::<UffdioCopy>(), 0x28);
        assert_eq!(size_of::<UffdioZeropage>(), 0x20);
        assert_eq!(size_of::<UffdioWriteprotect>(), 0x18);
        assert_eq!(size_of::<UffdioMove>(), 0x28);
        assert_eq!(size_of::<UffdMsg>(), 0x20);
        assert_eq!(offset_of!(UffdMsg, arg), 0x8);
        assert_eq!(UFFDIO_API, 0xc018aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010aa02);
        assert_eq!(UFFDIO_COPY, 0xc028aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020aa04);
        assert_eq!(UFFDIO_MOVE, 0xc028aa05);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018aa06);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
    }

    #[test]
    fn messages_parse() {
        let msg = |event, arg| UffdMsg {
            event,
            _reserved: [0; 7],
            arg,
        };
        assert_eq!(
            msg(0x12, [0x1, 0x7000, 42]).parse(),
            Some(Event::Pagefault {
                kind: FaultKind::Missing,
                write: true,
                addr: 0x7000,
                tid: 42
            })
        );
        assert_eq!(
            msg(0x12, [0x3, 0x7000, 1]).parse().map(|e| matches!(
                e,
                Event::Pagefault {
                    kind: FaultKind::WriteProtect,
                    write: true,
                    ..
                }
            )),
            Some(true)
        );
        assert_eq!(
            msg(0x14, [0x1000, 0x9000, 0x2000]).parse(),
            Some(Event::Remap {
                from: 0x1000,
                to: 0x9000,
                len: 0x2000
            })
        );
        assert_eq!(
            msg(0x16, [0x1000, 0x3000, 0]).parse(),
            Some(Event::Unmap {
                start: 0x1000,
                end: 0x3000
            })
        );
        assert_eq!(msg(0x99, [0; 3]).parse(), None);
    }
}
