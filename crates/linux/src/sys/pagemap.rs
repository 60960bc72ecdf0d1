//! `/proc/PID/pagemap`: one entry per page, and the `PAGEMAP_SCAN` ioctl (Linux 6.7) that
//! returns runs of pages by category. Both work on another process's address space (with
//! ptrace read access to it), which is how the scanner of a daemon sees its clients' pages.

use super::{cvt, PAGE};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// The page's uffd write-protect bit is *clear* (the kernel's name: "written since
/// protected").
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// The page maps a file (page cache), not anonymous memory.
pub const PAGE_IS_FILE: u64 = 1 << 2;
/// A page is present in the page table.
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// The entry maps the shared zero page (or the huge zero page).
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;

/// A page is present (an entry of `/proc/PID/pagemap`).
pub const PM_PRESENT: u64 = 1 << 63;

/// `struct page_region`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageRegion {
    /// First address of the run.
    pub start: u64,
    /// One past its last address.
    pub end: u64,
    /// The categories asked for in `return_mask` that these pages have.
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
const PAGEMAP_SCAN: libc::c_ulong =
    ((3u32 << 30) | ((std::mem::size_of::<PmScanArg>() as u32) << 16) | ((b'f' as u32) << 8) | 16)
        as libc::c_ulong;

/// The pagemap of one process.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    /// `/proc/PID/pagemap` (`pid` 0: this process).
    pub fn open(pid: u32) -> io::Result<Self> {
        let path = if pid == 0 {
            "/proc/self/pagemap".to_string()
        } else {
            format!("/proc/{pid}/pagemap")
        };
        Ok(Self {
            file: File::open(path)?,
        })
    }

    /// Runs of pages in `[start, end)` that have every category of `required` and none of
    /// `excluded`, reported with the categories of `return_mask`; appended to `out`.
    pub fn scan(
        &self,
        start: u64,
        end: u64,
        required: u64,
        excluded: u64,
        return_mask: u64,
        out: &mut Vec<PageRegion>,
    ) -> io::Result<()> {
        let mut vec = [PageRegion::default(); 256];
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
            // SAFETY: arg describes `vec`, a writable array of vec_len page_region structs
            // that outlives the call; the ioctl only reads page tables.
            let n = cvt(unsafe {
                libc::ioctl(
                    self.file.as_raw_fd(),
                    PAGEMAP_SCAN,
                    &mut arg as *mut PmScanArg,
                )
            })? as usize;
            out.extend_from_slice(&vec[..n]);
            // walk_end goes stale once the buffer has filled more than once (seen on this
            // kernel): a short answer is the end; otherwise go on after the last run.
            if n < vec.len() {
                break;
            }
            from = vec[n - 1].end;
        }
        Ok(())
    }

    /// How many pages of `[start, end)` have every category of `required` and none of
    /// `excluded`.
    pub fn count(&self, start: u64, end: u64, required: u64, excluded: u64) -> io::Result<u64> {
        let mut v = Vec::new();
        self.scan(start, end, required, excluded, required, &mut v)?;
        Ok(v.iter().map(|r| (r.end - r.start) / PAGE).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pm_scan_arg_matches_the_kernel_uapi() {
        assert_eq!(std::mem::size_of::<PmScanArg>(), 0x60);
        assert_eq!(std::mem::size_of::<PageRegion>(), 0x18);
        assert_eq!(PAGEMAP_SCAN, 0xc0606610);
    }

    #[test]
    fn scan_sees_touched_and_untouched_pages() {
        let m = super::super::Mapping::anon(8 * PAGE).unwrap();
        m.write(2 * PAGE, &[1]).unwrap();
        m.write(5 * PAGE, &[1]).unwrap();
        let pm = Pagemap::open(0).unwrap();
        let mut v = Vec::new();
        pm.scan(
            m.addr(),
            m.addr() + 8 * PAGE,
            PAGE_IS_PRESENT,
            0,
            PAGE_IS_PRESENT,
            &mut v,
        )
        .unwrap();
        let got: Vec<_> = v
            .iter()
            .map(|r| ((r.start - m.addr()) / PAGE, (r.end - m.addr()) / PAGE))
            .collect();
        assert_eq!(got, vec![(2, 3), (5, 6)]);
        assert_eq!(
            pm.count(m.addr(), m.addr() + 8 * PAGE, PAGE_IS_PRESENT, 0)
                .unwrap(),
            2
        );
        // The classic pagemap interface agrees.
        let entry = |addr: u64| {
            use std::os::unix::fs::FileExt;
            let mut b = [0u8; 8];
            pm.file.read_exact_at(&mut b, addr / PAGE * 8).unwrap();
            u64::from_ne_bytes(b)
        };
        assert_ne!(entry(m.addr() + 2 * PAGE) & PM_PRESENT, 0);
        assert_eq!(entry(m.addr()) & PM_PRESENT, 0);
    }
}
