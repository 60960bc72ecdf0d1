//! Unmerging under memory pressure: the simulator runs out of frames on purpose, so that
//! `break_ksm` fails with -ENOMEM as the kernel's does, and the error paths of `run=2`,
//! `PR_SET_MEMORY_MERGE=0` and `MADV_UNMERGEABLE` run (kernel-ksm.md §4.4, §5.1, §5.2).

use samepage_engine::{KnobError, MmId, UnmergeError, PAGE_SIZE, PAGE_SIZE_U64 as PS};
use samepage_sim::{Advice, Prot, Pte, SimError, SimSystem, SysError};
use std::error::Error as _;

/// A process with one mergeable region of `n` pages of `val`, then `unique` pages of their
/// own.
fn region(sys: &mut SimSystem, val: u8, n: u64, unique: u64) -> (MmId, u64) {
    let s = sys
        .spawn_with_pages(n + unique, |i, buf| {
            buf.fill(val);
            if i >= n {
                buf[..8].copy_from_slice(&(i + ((val as u64) << 32)).to_ne_bytes());
            }
        })
        .unwrap();
    (s.mm, s.start)
}

fn ksm_mappings(sys: &SimSystem, mm: MmId) -> usize {
    sys.mem()
        .ptes(mm)
        .filter(|(_, _, p)| matches!(p, Pte::Page(f) if sys.mem().frame_is_ksm(*f)))
        .count()
}

fn marked_zero_pages(sys: &SimSystem, mm: MmId) -> i64 {
    sys.mem()
        .ptes(mm)
        .filter(|(_, _, p)| *p == Pte::Zero { ksm: true })
        .count() as i64
}

fn fresh() -> SimSystem {
    let mut sys = SimSystem::new();
    sys.write_knob("smart_scan", "0").unwrap();
    sys.write_knob("pages_to_scan", "1000").unwrap();
    sys
}

#[test]
fn write_faults_fail_when_no_frame_is_free() {
    let mut sys = fresh();
    let mm = sys.spawn();
    let a = sys.mmap(mm, 4 * PS, Prot::RW).unwrap();
    sys.set_frame_limit(Some(sys.mem().frames_in_use() + 1));
    sys.write(mm, a, &[1]).unwrap();
    assert_eq!(
        sys.write(mm, a + PS, &[1]),
        Err(SimError::OutOfMemory(a + PS))
    );
    // A read maps the zero page and needs no frame.
    let mut b = [9u8; 1];
    sys.read(mm, a + 2 * PS, &mut b).unwrap();
    assert_eq!(b, [0]);
    sys.set_frame_limit(None);
    sys.write(mm, a + PS, &[1]).unwrap();
}

#[test]
fn run_2_out_of_memory_stops_resets_the_cursor_and_keeps_the_rest() {
    let mut sys = fresh();
    let (p1, _) = region(&mut sys, 0x11, 8, 8);
    let (p2, _) = region(&mut sys, 0x22, 8, 8);
    let (p3, _) = region(&mut sys, 0x33, 8, 8);
    assert!(sys.ksm_start());
    assert_eq!(sys.counters().pages_sharing, 3 * 7);
    let full_scans = sys.counters().full_scans;
    // Stop in the middle of a pass, inside p3: every unique page of p1 and p2 (and half of
    // p3's pages) is in this pass's unstable tree.
    assert!(!sys.scan(16 + 16 + 8).full_scan_done);
    assert_eq!(sys.counters().pages_unshared, 3 * 8);
    // Room for p1's eight copies (the last one frees the KSM page: 7 more in all) and four of
    // p2's.
    sys.set_frame_limit(Some(sys.mem().frames_in_use() + 7 + 4));
    let err = sys.write_knob("run", "2").unwrap_err();
    assert!(
        matches!(err, KnobError::Unmerge(UnmergeError::NoMemory)),
        "{err:?}"
    );
    let source = err.source().expect("the unmerge error is the source");
    assert!(matches!(
        source.downcast_ref::<UnmergeError>(),
        Some(UnmergeError::NoMemory)
    ));
    // run is 0, as run_store leaves it; full_scans is not reset.
    assert_eq!(sys.read_knob("run").unwrap(), "0");
    let c = sys.counters();
    assert_eq!(c.full_scans, full_scans);
    // p1 was done: unshared, its items freed. p2 failed after four copies: its items stay,
    // stale where the page was unshared (the next pass cleans them up). p3 was not reached.
    assert_eq!(ksm_mappings(&sys, p1), 0);
    assert_eq!(sys.ksm_stat(p1).ksm_rmap_items, 0);
    assert_eq!(ksm_mappings(&sys, p2), 4);
    assert_eq!(sys.ksm_stat(p2).ksm_merging_pages, 8);
    assert_eq!(ksm_mappings(&sys, p3), 8);
    assert_eq!(sys.ksm_stat(p3).ksm_merging_pages, 8);
    assert_eq!(c.pages_unshared, 2 * 8, "p2's and p3's unstable items stay");
    sys.ksm().check_invariants().unwrap();

    // The cursor went back to the head: the next full scan is a whole pass, not the rest of
    // the interrupted one.
    sys.set_frame_limit(None);
    sys.write_knob("run", "1").unwrap();
    let before = sys.counters().pages_scanned;
    let mut batches = 0;
    while !sys.scan(5).full_scan_done {
        sys.ksm().check_invariants().unwrap();
        batches += 1;
        assert!(batches < 100);
    }
    assert_eq!(sys.counters().pages_scanned - before, 3 * 16);
    assert_eq!(sys.counters().full_scans, full_scans + 1);
    assert!(sys.run_until_stable(2, 20).is_some());
    let c = sys.counters();
    assert_eq!((c.pages_shared, c.pages_sharing), (3, 21));
    sys.ksm().check_invariants().unwrap();

    // With memory, run=2 unmerges everything and resets full_scans.
    sys.write_knob("run", "2").unwrap();
    let c = sys.counters();
    assert_eq!(
        (c.pages_shared, c.pages_sharing, c.pages_unshared),
        (0, 0, 0)
    );
    assert_eq!((c.full_scans, sys.ksm().rmap_items()), (0, 0));
    for p in [p1, p2, p3] {
        assert_eq!(ksm_mappings(&sys, p), 0);
    }
}

#[test]
fn run_2_out_of_memory_for_zero_pages_keeps_the_count_exact() {
    let mut sys = fresh();
    sys.write_knob("use_zero_pages", "1").unwrap();
    let (p, _) = region(&mut sys, 0, 16, 0);
    assert!(sys.ksm_start());
    assert_eq!(sys.counters().ksm_zero_pages, 16);
    sys.set_frame_limit(Some(sys.mem().frames_in_use() + 5));
    assert!(matches!(
        sys.write_knob("run", "2"),
        Err(KnobError::Unmerge(UnmergeError::NoMemory))
    ));
    // Five zero pages got their private copy; the count fell by exactly five.
    assert_eq!(sys.counters().ksm_zero_pages, 11);
    assert_eq!(sys.ksm_stat(p).ksm_zero_pages, 11);
    assert_eq!(marked_zero_pages(&sys, p), 11);
    sys.set_frame_limit(None);
    sys.write_knob("run", "2").unwrap();
    assert_eq!(sys.counters().ksm_zero_pages, 0);
}

#[test]
fn prctl_disable_out_of_memory_re_adds_the_areas() {
    let mut sys = fresh();
    let mm = sys.spawn();
    sys.prctl_set_memory_merge(mm, true).unwrap();
    let a = sys.mmap(mm, 8 * PS, Prot::RW).unwrap();
    let b = sys.mmap(mm, 8 * PS, Prot::RW).unwrap();
    for i in 0..8 {
        sys.write(mm, a + i * PS, &[0x5a; PAGE_SIZE]).unwrap();
        sys.write(mm, b + i * PS, &[0xa5; PAGE_SIZE]).unwrap();
    }
    assert!(sys.ksm_start());
    assert_eq!(ksm_mappings(&sys, mm), 16);
    // Enough for the first area, not for the second.
    sys.set_frame_limit(Some(sys.mem().frames_in_use() + 7 + 3));
    let err = sys.prctl_set_memory_merge(mm, false).unwrap_err();
    assert!(
        matches!(err, SysError::Unmerge(UnmergeError::NoMemory)),
        "{err:?}"
    );
    // ksm_disable_merge_any failed: the areas are mergeable again and MMF_VM_MERGE_ANY stays.
    assert!(sys.prctl_get_memory_merge(mm));
    assert!(sys.mem().vmas(mm).iter().all(|v| v.mergeable));
    let st = sys.ksm_stat(mm);
    assert!(st.ksm_merge_any && st.ksm_mergeable);
    assert_eq!(ksm_mappings(&sys, mm), 8 - 3);
    // The unshared pages merge again.
    sys.set_frame_limit(None);
    assert!(sys.run_until_stable(2, 20).is_some());
    assert_eq!(ksm_mappings(&sys, mm), 16);
    sys.ksm().check_invariants().unwrap();
    // With memory, it succeeds.
    sys.prctl_set_memory_merge(mm, false).unwrap();
    assert!(!sys.prctl_get_memory_merge(mm));
    assert!(sys.mem().vmas(mm).iter().all(|v| !v.mergeable));
    assert_eq!(ksm_mappings(&sys, mm), 0);
}

#[test]
fn madvise_unmergeable_out_of_memory_stops_at_the_failing_area() {
    let mut sys = fresh();
    let mm = sys.spawn();
    let a = sys.mmap(mm, 8 * PS, Prot::RW).unwrap();
    let b = sys.mmap(mm, 8 * PS, Prot::RW).unwrap();
    let c = sys.mmap(mm, 8 * PS, Prot::RW).unwrap();
    for base in [a, b, c] {
        for i in 0..8 {
            sys.write(mm, base + i * PS, &[0xcf; PAGE_SIZE]).unwrap();
        }
        sys.madvise(mm, base, 8 * PS, Advice::Mergeable).unwrap();
    }
    assert!(sys.ksm_start());
    assert_eq!(ksm_mappings(&sys, mm), 24);
    // All 24 mappings share one KSM page: copies for the first area and two of the second.
    sys.set_frame_limit(Some(sys.mem().frames_in_use() + 8 + 2));
    let err = sys
        .madvise(mm, a, c + 8 * PS - a, Advice::Unmergeable)
        .unwrap_err();
    assert!(
        matches!(err, SysError::Unmerge(UnmergeError::NoMemory)),
        "{err:?}"
    );
    // As ksm_madvise area by area: the first area is unmergeable, the failing one and the one
    // after it still mergeable.
    let flags: Vec<(u64, bool)> = sys
        .mem()
        .vmas(mm)
        .iter()
        .map(|v| (v.start, v.mergeable))
        .collect();
    assert_eq!(flags, vec![(a, false), (b, true), (c, true)]);
    assert_eq!(ksm_mappings(&sys, mm), 24 - 8 - 2);
    sys.ksm().check_invariants().unwrap();
    // The next passes drop the first area's items and merge the second area's copies again.
    sys.set_frame_limit(None);
    assert!(sys.run_until_stable(2, 20).is_some());
    assert_eq!(ksm_mappings(&sys, mm), 16);
    let st = sys.counters();
    assert_eq!((st.pages_shared, st.pages_sharing), (1, 15));
    sys.ksm().check_invariants().unwrap();
    sys.madvise(mm, a, c + 8 * PS - a, Advice::Unmergeable)
        .unwrap();
    assert_eq!(ksm_mappings(&sys, mm), 0);
}

#[test]
fn a_failed_unmerge_error_names_its_cause() {
    let e = KnobError::from(UnmergeError::backend("disk on fire"));
    assert_eq!(e.to_string(), "writing 2 to run failed, run is 0 now");
    let inner = e.source().unwrap();
    assert_eq!(
        inner.to_string(),
        "the memory backend could not unshare the merged pages"
    );
    assert_eq!(inner.source().unwrap().to_string(), "disk on fire");
}
