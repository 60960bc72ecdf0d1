//! The kernel selftest scenarios that apply to a live process (`ksm_functional_tests.c`),
//! on real memory, checked through /proc/self/pagemap physical page numbers; plus the
//! hazards of DESIGN.md. Needs root (or /dev/userfaultfd access), as CI has.

use samepage_linux::{sys, LiveKsm};
use std::collections::HashSet;
use std::fs::File;
use std::time::Duration;

const PS: u64 = 4096;
const MIB2: u64 = 2 << 20;

fn engine() -> LiveKsm {
    let ksm = LiveKsm::new().expect("live engine (needs root or /dev/userfaultfd access)");
    ksm.set_knob("pages_to_scan", "10000").unwrap();
    ksm.set_knob("sleep_millisecs", "0").unwrap();
    ksm
}

/// `__mmap_and_merge_range`: map, fill, enable merging, run two full scans.
fn mmap_and_merge(ksm: &LiveKsm, val: u8, size: u64) -> (samepage_engine::MmId, u64) {
    let mm = ksm.new_mm();
    let a = ksm.create_region(mm, size).unwrap();
    for off in (0..size).step_by(PS as usize) {
        ksm.write(a + off, &[val; 4096]).unwrap();
    }
    ksm.madvise_mergeable(mm, a, size).unwrap();
    ksm.set_knob("run", "1").unwrap();
    assert!(ksm.wait_full_scans(2, Duration::from_secs(60)));
    ksm.set_knob("run", "0").unwrap();
    if val != 0 {
        assert!(
            ksm.ksm_stat(mm).ksm_merging_pages > 0,
            "No pages got merged"
        );
    }
    (mm, a)
}

/// `range_maps_duplicates`: two pages of the range on one physical page?
fn range_maps_duplicates(addr: u64, size: u64) -> bool {
    let pm = File::open("/proc/self/pagemap").unwrap();
    let mut seen = HashSet::new();
    for off in (0..size).step_by(PS as usize) {
        let e = sys::pagemap_entry(&pm, addr + off).unwrap();
        let pfn = e & sys::PM_PFN_MASK;
        if e & sys::PM_PRESENT == 0 || pfn == 0 {
            continue;
        }
        if !seen.insert(pfn) {
            return true;
        }
    }
    false
}

#[test]
fn test_unmerge() {
    let ksm = engine();
    let (mm, a) = mmap_and_merge(&ksm, 0xcf, MIB2);
    assert!(range_maps_duplicates(a, MIB2));
    ksm.madvise_unmergeable(mm, a, MIB2).unwrap();
    assert!(!range_maps_duplicates(a, MIB2));
    let mut buf = [0u8; 4096];
    ksm.read(a + 77 * PS, &mut buf).unwrap();
    assert_eq!(buf, [0xcf; 4096]);
}

#[test]
fn test_unmerge_zero_pages() {
    let ksm = engine();
    ksm.set_knob("use_zero_pages", "1").unwrap();
    let (mm, a) = mmap_and_merge(&ksm, 0, MIB2);
    assert_eq!(ksm.ksm_stat(mm).ksm_zero_pages, 512);
    assert!(ksm.verify().problems().is_empty());
    ksm.madvise_unmergeable(mm, a, MIB2 / 2).unwrap();
    assert_eq!(ksm.ksm_stat(mm).ksm_zero_pages, 256);
    for off in (MIB2 / 2..MIB2).step_by(PS as usize) {
        ksm.write(a + off, &7u32.to_ne_bytes()).unwrap();
    }
    assert_eq!(ksm.ksm_stat(mm).ksm_zero_pages, 0);
    assert_eq!(ksm.counters().ksm_zero_pages, 0);
    assert!(!range_maps_duplicates(a, MIB2));
    assert!(ksm.verify().problems().is_empty());
}

#[test]
fn test_unmerge_discarded() {
    let ksm = engine();
    let (mm, a) = mmap_and_merge(&ksm, 0xcf, MIB2);
    sys::madvise(a, MIB2 / 2, libc::MADV_DONTNEED).unwrap();
    ksm.madvise_unmergeable(mm, a, MIB2).unwrap();
    assert!(!range_maps_duplicates(a, MIB2));
}

#[test]
fn discarded_pages_read_zeros_and_zero_pages_are_uncounted() {
    let ksm = engine();
    ksm.set_knob("use_zero_pages", "1").unwrap();
    let mm = ksm.new_mm();
    let a = ksm.create_region(mm, 64 * PS).unwrap();
    for i in 0..64 {
        ksm.write(a + i * PS, &[if i < 32 { 0x5a } else { 0 }; 4096])
            .unwrap();
    }
    ksm.madvise_mergeable(mm, a, 64 * PS).unwrap();
    ksm.set_knob("run", "1").unwrap();
    assert!(ksm.wait_full_scans(2, Duration::from_secs(30)));
    ksm.set_knob("run", "0").unwrap();
    let c = ksm.counters();
    assert_eq!(
        (c.ksm_zero_pages, c.pages_sharing),
        (32, 31),
        "{c:?} {:?}",
        ksm.stats()
    );
    // MADV_DONTNEED on merged pages: they read zeros afterwards, as anonymous memory does.
    sys::madvise(a + 4 * PS, 4 * PS, libc::MADV_DONTNEED).unwrap();
    let mut buf = [0u8; 4096];
    for i in 0..32 {
        ksm.read(a + i * PS, &mut buf).unwrap();
        let want = if (4..8).contains(&i) { 0 } else { 0x5a };
        assert_eq!(buf, [want; 4096], "page {i}");
    }
    // ... and on placed zero pages: uncounted once the call returned.
    sys::madvise(a + 40 * PS, 8 * PS, libc::MADV_DONTNEED).unwrap();
    assert_eq!(ksm.counters().ksm_zero_pages, 24);
    // munmap of placed zero pages and merged pages.
    sys::munmap(a + 56 * PS, 8 * PS).unwrap();
    assert_eq!(ksm.counters().ksm_zero_pages, 16);
    assert!(
        ksm.verify().problems().is_empty(),
        "{:?}",
        ksm.verify().problems()
    );
    // Reading untouched memory maps ordinary zero pages, which are never counted.
    ksm.read(a + 40 * PS, &mut buf).unwrap();
    assert_eq!(ksm.counters().ksm_zero_pages, 16);
    assert!(ksm.verify().problems().is_empty());
}

#[test]
fn kernel_mode_writes_into_merged_pages_complete() {
    let ksm = engine();
    ksm.set_knob("use_zero_pages", "1").unwrap();
    let mm = ksm.new_mm();
    let a = ksm.create_region(mm, 16 * PS).unwrap();
    for i in 0..16 {
        ksm.write(a + i * PS, &[if i < 8 { 0x33 } else { 0 }; 4096])
            .unwrap();
    }
    ksm.madvise_mergeable(mm, a, 16 * PS).unwrap();
    ksm.set_knob("run", "1").unwrap();
    assert!(ksm.wait_full_scans(2, Duration::from_secs(30)));
    ksm.set_knob("run", "0").unwrap();
    assert_eq!(ksm.counters().pages_sharing, 7);
    let (r, w) = sys::pipe().unwrap();
    use std::os::fd::AsRawFd;
    for (i, target) in [(0u8, a + 3 * PS + 10), (1, a + 12 * PS + 20)] {
        sys::write_fd(w.as_raw_fd(), &[0xa0 + i; 16]).unwrap();
        assert_eq!(sys::read_fd_into(r.as_raw_fd(), target, 16).unwrap(), 16);
    }
    let mut buf = [0u8; 4096];
    ksm.read(a + 3 * PS, &mut buf).unwrap();
    assert_eq!(&buf[10..26], &[0xa0; 16]);
    assert_eq!(buf[9], 0x33);
    ksm.read(a + 4 * PS, &mut buf).unwrap();
    assert_eq!(buf, [0x33; 4096]);
    ksm.read(a + 12 * PS, &mut buf).unwrap();
    assert_eq!(&buf[20..36], &[0xa1; 16]);
    assert_eq!(ksm.counters().ksm_zero_pages, 7);
    assert!(ksm.verify().problems().is_empty());
}

#[test]
fn test_prctl_and_prctl_unmerge() {
    let ksm = engine();
    let mm = ksm.new_mm();
    let a = ksm.create_region(mm, MIB2).unwrap();
    for off in (0..MIB2).step_by(PS as usize) {
        ksm.write(a + off, &[0xcf; 4096]).unwrap();
    }
    ksm.set_memory_merge(mm, true).unwrap();
    assert!(ksm.ksm_stat(mm).ksm_merge_any);
    ksm.set_knob("run", "1").unwrap();
    assert!(ksm.wait_full_scans(2, Duration::from_secs(60)));
    ksm.set_knob("run", "0").unwrap();
    assert!(range_maps_duplicates(a, MIB2));
    ksm.set_memory_merge(mm, false).unwrap();
    assert!(!ksm.ksm_stat(mm).ksm_merge_any);
    assert!(!range_maps_duplicates(a, MIB2));
}

#[test]
fn fork_child_writes_do_not_touch_the_parent() {
    let ksm = engine();
    ksm.set_knob("use_zero_pages", "1").unwrap();
    let mm = ksm.new_mm();
    let a = ksm.create_region(mm, 16 * PS).unwrap();
    for i in 0..16 {
        ksm.write(a + i * PS, &[if i < 8 { 0x44 } else { 0 }; 4096])
            .unwrap();
    }
    ksm.madvise_mergeable(mm, a, 16 * PS).unwrap();
    ksm.set_knob("run", "1").unwrap();
    assert!(ksm.wait_full_scans(2, Duration::from_secs(30)));
    ksm.set_knob("run", "0").unwrap();
    static TARGET: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    TARGET.store(a, std::sync::atomic::Ordering::Relaxed);
    fn child() -> i32 {
        let a = TARGET.load(std::sync::atomic::Ordering::Relaxed);
        // The child's copies carry no write protection: these writes go straight through.
        let ok = sys::write_self(a + PS, &[0xff; 64]).is_ok()
            && sys::write_self(a + 9 * PS, &[0xff; 64]).is_ok();
        if ok {
            0
        } else {
            1
        }
    }
    assert_eq!(sys::fork_child(child).unwrap(), 0);
    let mut buf = [0u8; 4096];
    ksm.read(a + PS, &mut buf).unwrap();
    assert_eq!(buf, [0x44; 4096]);
    ksm.read(a + 9 * PS, &mut buf).unwrap();
    assert_eq!(buf, [0; 4096]);
    assert_eq!(ksm.counters().ksm_zero_pages, 8);
    assert_eq!(ksm.counters().pages_sharing, 7);
    assert!(ksm.verify().problems().is_empty());
}

#[test]
fn ineligible_ranges_are_refused_with_the_reason() {
    let ksm = engine();
    let mm = ksm.new_mm();
    // Shared memory.
    let fd = sys::memfd_create("t").unwrap();
    sys::ftruncate(&fd, PS).unwrap();
    let e = ksm.adopt_region(mm, 0x1000, PS).unwrap_err().to_string();
    assert!(e.contains("not mapped"), "{e}");
    let e = ksm.adopt_region(mm, 0x1001, PS).unwrap_err().to_string();
    assert!(e.contains("page-aligned"), "{e}");
    // A range another userfaultfd already manages.
    let other = LiveKsm::new().unwrap();
    let omm = other.new_mm();
    let b = other.create_region(omm, 4 * PS).unwrap();
    other.madvise_mergeable(omm, b, 4 * PS).unwrap();
    let e = ksm.adopt_region(mm, b, 4 * PS).unwrap_err().to_string();
    assert!(e.contains("another userfaultfd"), "{e}");
    // Memory samepage did not map is taken as it is.
    let c = sys::mmap_anon(8 * PS).unwrap();
    ksm.adopt_region(mm, c, 8 * PS).unwrap();
    let e = ksm.adopt_region(mm, c, 8 * PS).unwrap_err().to_string();
    assert!(e.contains("already manages"), "{e}");
}

#[test]
fn run_2_unmerges_everything_and_keeps_contents() {
    let ksm = engine();
    ksm.set_knob("use_zero_pages", "1").unwrap();
    let mm = ksm.new_mm();
    let a = ksm.create_region(mm, 64 * PS).unwrap();
    for i in 0..64 {
        ksm.write(
            a + i * PS,
            &[if i < 48 { (i % 3) as u8 + 1 } else { 0 }; 4096],
        )
        .unwrap();
    }
    ksm.madvise_mergeable(mm, a, 64 * PS).unwrap();
    let merged = |ksm: &LiveKsm| {
        ksm.set_knob("run", "1").unwrap();
        assert!(ksm.wait_full_scans(3, Duration::from_secs(30)));
        ksm.set_knob("run", "0").unwrap();
        let c = ksm.counters();
        (c.pages_shared, c.pages_sharing, c.ksm_zero_pages)
    };
    assert_eq!(merged(&ksm), (3, 45, 16));
    ksm.set_knob("run", "2").unwrap();
    let c = ksm.counters();
    assert_eq!(
        (
            c.pages_shared,
            c.pages_sharing,
            c.ksm_zero_pages,
            c.full_scans
        ),
        (0, 0, 0, 0)
    );
    assert!(!range_maps_duplicates(a, 64 * PS));
    assert!(ksm.verify().problems().is_empty());
    // Zero pages are placed again; unshared merged pages are private copies inside the memfd
    // mapping now, which UFFDIO_MOVE cannot take, so they stay unmerged (a known limitation).
    assert_eq!(merged(&ksm).2, 16);
    let mut buf = [0u8; 4096];
    for i in 0..64 {
        ksm.read(a + i * PS, &mut buf).unwrap();
        assert_eq!(
            buf,
            [if i < 48 { (i % 3) as u8 + 1 } else { 0 }; 4096],
            "page {i}"
        );
    }
    assert!(ksm.verify().problems().is_empty());
}

/// After a fork, the parent's pages are shared with the child (even once the child has
/// exited, until the parent writes them): UFFDIO_MOVE refuses such pages as it refuses
/// pinned ones. They must still be merged, not skipped as pinned.
#[test]
fn pages_a_fork_shared_are_merged() {
    let ksm = engine();
    ksm.set_knob("use_zero_pages", "1").unwrap();
    let mm = ksm.new_mm();
    let a = ksm.create_region(mm, 64 * PS).unwrap();
    for i in 0..64 {
        ksm.write(a + i * PS, &[if i < 32 { 0x77 } else { 0 }; 4096])
            .unwrap();
    }
    fn child() -> i32 {
        0
    }
    assert_eq!(sys::fork_child(child).unwrap(), 0);
    ksm.madvise_mergeable(mm, a, 64 * PS).unwrap();
    ksm.set_knob("run", "1").unwrap();
    assert!(ksm.wait_full_scans(3, Duration::from_secs(30)));
    ksm.set_knob("run", "0").unwrap();
    let c = ksm.counters();
    assert_eq!(
        (c.pages_sharing, c.ksm_zero_pages),
        (31, 32),
        "{c:?} {:?}",
        ksm.stats()
    );
    assert_eq!(ksm.stats().pinned_skipped, 0);
    assert!(ksm.verify().problems().is_empty());
    let mut buf = [0u8; 4096];
    for i in 0..64 {
        ksm.read(a + i * PS, &mut buf).unwrap();
        assert_eq!(buf, [if i < 32 { 0x77 } else { 0 }; 4096]);
    }
}
