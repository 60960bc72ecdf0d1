//! The kernel selftest scenarios that apply to a live process (`ksm_functional_tests.c`),
//! on real memory, plus the hazards of never losing data. Needs root (or /dev/userfaultfd
//! access), as CI has.

mod common;

use common::*;
use samepage_linux::{LiveKsm, MmId, PageKind, Region};

const MIB2: u64 = 2 << 20;

/// `__mmap_and_merge_range`: map, fill, enable merging, run two full scans.
fn mmap_and_merge(ksm: &LiveKsm, val: u8, size: u64) -> (MmId, Region) {
    let mm = ksm.new_mm();
    let r = ksm.create_region(mm, size).unwrap();
    fill(&r, |_| [val; 4096]);
    ksm.madvise_mergeable(&r).unwrap();
    full_scans(ksm, 2);
    if val != 0 {
        assert!(
            ksm.ksm_stat(mm).ksm_merging_pages > 0,
            "No pages got merged"
        );
    }
    (mm, r)
}

/// Every page of the region has memory of its own and none is merged: the kernel test's
/// `!range_maps_duplicates`.
fn all_private(ksm: &LiveKsm, r: &Region) -> bool {
    merged_pages(ksm, r.start(), r.len()) == 0
        && present_pages(r.start(), r.len()) as u64 == r.len() / PS
}

#[test]
fn test_unmerge() {
    let ksm = engine();
    let (_, r) = mmap_and_merge(&ksm, 0xcf, MIB2);
    assert_eq!(merged_pages(&ksm, r.start(), MIB2), 512);
    assert_eq!(present_pages(r.start(), MIB2), 0, "merged pages are holes");
    ksm.madvise_unmergeable(&r).unwrap();
    assert!(all_private(&ksm, &r));
    let mut buf = [0u8; 4096];
    r.read(77 * PS, &mut buf).unwrap();
    assert_eq!(buf, [0xcf; 4096]);
    assert!(ksm.verify().problems().is_empty());
}

#[test]
fn test_unmerge_zero_pages() {
    let ksm = engine();
    ksm.set_knob("use_zero_pages", "1").unwrap();
    let (mm, r) = mmap_and_merge(&ksm, 0, MIB2);
    assert_eq!(ksm.ksm_stat(mm).ksm_zero_pages, 512);
    assert!(ksm.verify().problems().is_empty());
    // Unmerge the first half: those zero pages get private copies.
    let (lo, hi) = split(&ksm, mm, r);
    ksm.madvise_unmergeable(&lo).unwrap();
    assert_eq!(ksm.ksm_stat(mm).ksm_zero_pages, 256);
    for off in (0..hi.len()).step_by(PS as usize) {
        hi.write(off, &7u32.to_ne_bytes()).unwrap();
    }
    assert_eq!(ksm.ksm_stat(mm).ksm_zero_pages, 0);
    assert_eq!(ksm.counters().ksm_zero_pages, 0);
    assert!(all_private(&ksm, &lo) && all_private(&ksm, &hi));
    assert!(ksm.verify().problems().is_empty());
}

/// Two regions over the halves of `r`'s memory: adopt the halves of a fresh mapping with
/// `r`'s contents (the kernel test unmerges half a range; samepage's unit is the region).
fn split(ksm: &LiveKsm, mm: MmId, r: Region) -> (Region, Region) {
    let half = r.len() / 2;
    let a = mmap_anon(r.len());
    let mut buf = [0u8; 4096];
    for off in (0..r.len()).step_by(PS as usize) {
        r.peek_page(off, &mut buf).unwrap();
        // SAFETY: the destination is the test's own fresh mapping.
        let n = unsafe {
            libc::process_vm_writev(
                libc::getpid(),
                &libc::iovec {
                    iov_base: buf.as_ptr() as *mut _,
                    iov_len: 4096,
                },
                1,
                &libc::iovec {
                    iov_base: (a + off) as *mut _,
                    iov_len: 4096,
                },
                1,
                0,
            )
        };
        assert_eq!(n, 4096);
    }
    drop(r);
    // SAFETY: the test owns the mapping and keeps it while the regions live.
    let lo = unsafe { ksm.adopt_region(mm, a, half) }.unwrap();
    // SAFETY: as above.
    let hi = unsafe { ksm.adopt_region(mm, a + half, half) }.unwrap();
    ksm.madvise_mergeable(&lo).unwrap();
    ksm.madvise_mergeable(&hi).unwrap();
    full_scans(ksm, 2);
    (lo, hi)
}

#[test]
fn test_unmerge_discarded() {
    let ksm = engine();
    let (_, r) = mmap_and_merge(&ksm, 0xcf, MIB2);
    discard(r.start(), MIB2 / 2);
    ksm.madvise_unmergeable(&r).unwrap();
    assert_eq!(merged_pages(&ksm, r.start(), MIB2), 0);
    // The discarded half reads zeros (and takes no memory until touched); the other half
    // is private copies.
    assert_eq!(
        present_pages(r.start() + MIB2 / 2, MIB2 / 2) as u64,
        MIB2 / 2 / PS
    );
    let mut buf = [0u8; 4096];
    r.read(0, &mut buf).unwrap();
    assert_eq!(buf, [0; 4096]);
    r.read(MIB2 - PS, &mut buf).unwrap();
    assert_eq!(buf, [0xcf; 4096]);
}

#[test]
fn discarded_pages_read_zeros_and_zero_pages_are_uncounted() {
    let ksm = engine();
    ksm.set_knob("use_zero_pages", "1").unwrap();
    let mm = ksm.new_mm();
    let a = mmap_anon(64 * PS);
    // SAFETY: the test owns the mapping; it unmaps part of it below, as an application
    // would.
    let r = unsafe { ksm.adopt_region(mm, a, 64 * PS) }.unwrap();
    fill(&r, |i| [if i < 32 { 0x5a } else { 0 }; 4096]);
    ksm.madvise_mergeable(&r).unwrap();
    full_scans(&ksm, 2);
    let c = ksm.counters();
    assert_eq!(
        (c.ksm_zero_pages, c.pages_sharing),
        (32, 31),
        "{c:?} {:?}",
        ksm.stats()
    );
    // MADV_DONTNEED on merged pages: they read zeros afterwards, as anonymous memory does.
    discard(a + 4 * PS, 4 * PS);
    let mut buf = [0u8; 4096];
    for i in 0..32 {
        r.peek_page(i * PS, &mut buf).unwrap();
        let want = if (4..8).contains(&i) { 0 } else { 0x5a };
        assert_eq!(buf, [want; 4096], "page {i}");
    }
    // ... and on placed zero pages: uncounted once the call returned.
    discard(a + 40 * PS, 8 * PS);
    assert_eq!(ksm.counters().ksm_zero_pages, 24);
    // munmap of placed zero pages and of merged pages.
    unmap(a + 56 * PS, 8 * PS);
    assert_eq!(ksm.counters().ksm_zero_pages, 16);
    unmap(a + 8 * PS, 4 * PS);
    assert!(
        ksm.verify().problems().is_empty(),
        "{:?}",
        ksm.verify().problems()
    );
    // Reading untouched memory maps ordinary zero pages, which are never counted.
    r.read(40 * PS, &mut buf).unwrap();
    assert_eq!(ksm.counters().ksm_zero_pages, 16);
    assert!(ksm.verify().problems().is_empty());
    // The next pass sees the merged pages that were unmapped and discarded gone.
    full_scans(&ksm, 1);
    assert_eq!(
        ksm.counters().pages_sharing,
        31 - 4 - 4,
        "{:?}",
        ksm.counters()
    );
}

#[test]
fn kernel_mode_writes_into_merged_pages_complete() {
    let ksm = engine();
    ksm.set_knob("use_zero_pages", "1").unwrap();
    let mm = ksm.new_mm();
    let r = ksm.create_region(mm, 16 * PS).unwrap();
    fill(&r, |i| [if i < 8 { 0x33 } else { 0 }; 4096]);
    ksm.madvise_mergeable(&r).unwrap();
    full_scans(&ksm, 2);
    assert_eq!(ksm.counters().pages_sharing, 7);
    assert_eq!(read_into(r.start() + 3 * PS + 10, &[0xa0; 16]), 16);
    assert_eq!(read_into(r.start() + 12 * PS + 20, &[0xa1; 16]), 16);
    let mut buf = [0u8; 4096];
    r.read(3 * PS, &mut buf).unwrap();
    assert_eq!(&buf[10..26], &[0xa0; 16]);
    assert_eq!(buf[9], 0x33);
    r.peek_page(4 * PS, &mut buf).unwrap();
    assert_eq!(buf, [0x33; 4096]);
    r.read(12 * PS, &mut buf).unwrap();
    assert_eq!(&buf[20..36], &[0xa1; 16]);
    assert_eq!(ksm.counters().ksm_zero_pages, 7);
    assert!(ksm.verify().problems().is_empty());
}

#[test]
fn test_prctl_and_prctl_unmerge() {
    let ksm = engine();
    let mm = ksm.new_mm();
    let r = ksm.create_region(mm, MIB2).unwrap();
    fill(&r, |_| [0xcf; 4096]);
    ksm.set_memory_merge(mm, true).unwrap();
    assert!(ksm.ksm_stat(mm).ksm_merge_any);
    assert!(ksm.memory_merge(mm));
    full_scans(&ksm, 2);
    assert_eq!(merged_pages(&ksm, r.start(), MIB2), 512);
    ksm.set_memory_merge(mm, false).unwrap();
    assert!(!ksm.ksm_stat(mm).ksm_merge_any);
    assert!(all_private(&ksm, &r));
}

static TARGET: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[test]
fn a_fork_child_reads_merged_pages_and_its_writes_stay_its_own() {
    let ksm = engine();
    ksm.set_knob("use_zero_pages", "1").unwrap();
    let mm = ksm.new_mm();
    let r = ksm.create_region(mm, 16 * PS).unwrap();
    fill(&r, |i| [if i < 8 { 0x44 } else { 0 }; 4096]);
    ksm.madvise_mergeable(&r).unwrap();
    full_scans(&ksm, 2);
    assert_eq!(merged_pages(&ksm, r.start(), 8 * PS), 8);
    TARGET.store(r.start(), std::sync::atomic::Ordering::Relaxed);
    fn child() -> i32 {
        let a = TARGET.load(std::sync::atomic::Ordering::Relaxed);
        // The child has its own copy of every merged page, with the right contents.
        for i in 0..16u64 {
            let want = if i < 8 { 0x44 } else { 0 };
            // SAFETY: the page is mapped in the child (a copy of the parent's region).
            let got = unsafe { std::ptr::read_volatile((a + i * PS + 100) as *const u8) };
            if got != want {
                return 10 + i as i32;
            }
        }
        // SAFETY: as above; the child writes its own copies.
        unsafe {
            std::ptr::write_volatile((a + PS) as *mut u8, 0xff);
            std::ptr::write_volatile((a + 9 * PS) as *mut u8, 0xff);
        }
        0
    }
    assert_eq!(fork_child(child), 0);
    let mut buf = [0u8; 4096];
    r.peek_page(PS, &mut buf).unwrap();
    assert_eq!(buf, [0x44; 4096]);
    r.peek_page(9 * PS, &mut buf).unwrap();
    assert_eq!(buf, [0; 4096]);
    assert_eq!(ksm.counters().ksm_zero_pages, 8);
    assert_eq!(ksm.counters().pages_sharing, 7);
    assert_eq!(
        merged_pages(&ksm, r.start(), 8 * PS),
        8,
        "the parent stays merged"
    );
    assert!(ksm.verify().problems().is_empty());
}

#[test]
fn ineligible_ranges_are_refused_with_the_reason() {
    let ksm = engine();
    let mm = ksm.new_mm();
    // SAFETY (all adopt_region calls): the ranges are the test's own memory or refused.
    let e = unsafe { ksm.adopt_region(mm, 0x1000, PS) }
        .unwrap_err()
        .to_string();
    assert!(e.contains("not mapped"), "{e}");
    let e = unsafe { ksm.adopt_region(mm, 0x1001, PS) }
        .unwrap_err()
        .to_string();
    assert!(e.contains("page-aligned"), "{e}");
    // A range another userfaultfd already manages.
    let other = LiveKsm::new().unwrap();
    let omm = other.new_mm();
    let b = other.create_region(omm, 4 * PS).unwrap();
    other.madvise_mergeable(&b).unwrap();
    let e = unsafe { ksm.adopt_region(mm, b.start(), 4 * PS) }
        .unwrap_err()
        .to_string();
    assert!(e.contains("another userfaultfd"), "{e}");
    // Memory samepage did not map is taken as it is, once.
    let c = mmap_anon(8 * PS);
    let _r = unsafe { ksm.adopt_region(mm, c, 8 * PS) }.unwrap();
    let e = unsafe { ksm.adopt_region(mm, c, 8 * PS) }
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("another userfaultfd") || e.contains("manages already"),
        "{e}"
    );
    // Reads and writes outside a region are refused.
    let r = ksm.create_region(mm, 2 * PS).unwrap();
    assert!(r.write(2 * PS - 8, &[0; 16]).is_err());
    let mut buf = [0u8; 16];
    assert!(r.read(u64::MAX - 4, &mut buf).is_err());
}

#[test]
fn run_2_unmerges_everything_and_pages_merge_again() {
    let ksm = engine();
    ksm.set_knob("use_zero_pages", "1").unwrap();
    let mm = ksm.new_mm();
    let r = ksm.create_region(mm, 64 * PS).unwrap();
    let want = |i: u64| [if i < 48 { (i % 3) as u8 + 1 } else { 0 }; 4096];
    fill(&r, want);
    ksm.madvise_mergeable(&r).unwrap();
    let merged = |ksm: &LiveKsm| {
        full_scans(ksm, 3);
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
    assert!(all_private(&ksm, &r));
    assert!(ksm.verify().problems().is_empty());
    // The unshared pages are ordinary pages again: they merge as the first time.
    assert_eq!(merged(&ksm), (3, 45, 16));
    let mut buf = [0u8; 4096];
    for i in 0..64 {
        r.peek_page(i * PS, &mut buf).unwrap();
        assert_eq!(buf, want(i), "page {i}");
    }
    assert!(ksm.verify().problems().is_empty());
}

#[test]
fn rewritten_merged_pages_merge_with_their_new_twins() {
    let ksm = engine();
    let mm = ksm.new_mm();
    let r = ksm.create_region(mm, 64 * PS).unwrap();
    // Two groups of 32 identical pages.
    fill(&r, |i| [if i < 32 { 1 } else { 2 }; 4096]);
    ksm.madvise_mergeable(&r).unwrap();
    full_scans(&ksm, 3);
    let c = ksm.counters();
    assert_eq!((c.pages_shared, c.pages_sharing), (2, 62));
    // The application rewrites 16 pages of the first group with the second's contents.
    for i in 0..16 {
        r.write(i * PS, &[2; 4096]).unwrap();
    }
    full_scans(&ksm, 3);
    let c = ksm.counters();
    assert_eq!((c.pages_shared, c.pages_sharing), (2, 62), "{c:?}");
    assert_eq!(ksm.ksm_stat(mm).ksm_merging_pages, 64);
    assert_eq!(merged_pages(&ksm, r.start(), 64 * PS), 64);
    let mut buf = [0u8; 4096];
    for i in 0..64 {
        r.peek_page(i * PS, &mut buf).unwrap();
        assert_eq!(
            buf,
            [if (16..32).contains(&i) { 1 } else { 2 }; 4096],
            "page {i}"
        );
    }
}

/// After a fork, the parent's pages are shared with the child (even once the child has
/// exited, until the parent writes them): UFFDIO_MOVE refuses such pages as it refuses
/// pinned ones. They must still be merged, not skipped as pinned.
#[test]
fn pages_a_fork_shared_are_merged() {
    let ksm = engine();
    ksm.set_knob("use_zero_pages", "1").unwrap();
    let mm = ksm.new_mm();
    let r = ksm.create_region(mm, 64 * PS).unwrap();
    fill(&r, |i| [if i < 32 { 0x77 } else { 0 }; 4096]);
    fn child() -> i32 {
        0
    }
    assert_eq!(fork_child(child), 0);
    ksm.madvise_mergeable(&r).unwrap();
    full_scans(&ksm, 3);
    let c = ksm.counters();
    assert_eq!(
        (c.pages_sharing, c.ksm_zero_pages),
        (31, 32),
        "{c:?} {:?}",
        ksm.stats()
    );
    assert_eq!(ksm.stats().agent.pinned_skipped, 0);
    assert!(ksm.verify().problems().is_empty());
    let mut buf = [0u8; 4096];
    for i in 0..64 {
        r.peek_page(i * PS, &mut buf).unwrap();
        assert_eq!(buf, [if i < 32 { 0x77 } else { 0 }; 4096]);
    }
    assert_eq!(ksm.page(r.start()).kind, PageKind::Merged { canonical: 0 });
}
