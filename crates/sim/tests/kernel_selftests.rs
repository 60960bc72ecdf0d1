//! The kernel's KSM selftests (`tools/testing/selftests/mm/ksm_functional_tests.c` and
//! `ksm_tests.c`), ported to the simulator with the same expected numbers.

use samepage_engine::{FrameId, KnobError, MmId, PAGE_SIZE_U64 as PS};
use samepage_sim::{Advice, Prot, Pte, SimSystem};
use std::collections::HashSet;

const MIB2: u64 = 2 << 20;

fn fill(sys: &mut SimSystem, mm: MmId, addr: u64, size: u64, val: u8) {
    for off in (0..size).step_by(PS as usize) {
        sys.write(mm, addr + off, &[val; 4096]).unwrap();
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Madvise,
    Prctl,
    None,
}

/// `__mmap_and_merge_range`: stop KSM, map, fill, protect, enable merging, run two full scans.
fn mmap_and_merge_range(
    sys: &mut SimSystem,
    mm: MmId,
    val: u8,
    size: u64,
    prot: Prot,
    mode: Mode,
) -> u64 {
    sys.ksm_stop().unwrap();
    assert_eq!(
        sys.ksm_stat(mm).ksm_merging_pages,
        0,
        "still merging pages after run=2"
    );
    let a = sys.mmap(mm, size, Prot::RW).unwrap();
    fill(sys, mm, a, size, val);
    sys.mprotect(mm, a, size, prot).unwrap();
    match mode {
        Mode::Madvise => sys.madvise(mm, a, size, Advice::Mergeable).unwrap(),
        Mode::Prctl => sys.prctl_set_memory_merge(mm, true).unwrap(),
        Mode::None => {}
    }
    sys.write_knob("pages_to_scan", &(size / PS).to_string())
        .unwrap();
    assert!(sys.ksm_start());
    if val != 0 {
        assert!(
            sys.ksm_stat(mm).ksm_merging_pages > 0,
            "No pages got merged"
        );
    }
    a
}

/// `range_maps_duplicates`: do two pages of the range map the same physical page?
fn range_maps_duplicates(sys: &SimSystem, mm: MmId, addr: u64, size: u64) -> bool {
    let mut seen: HashSet<FrameId> = HashSet::new();
    let mut zero = 0;
    for off in (0..size).step_by(PS as usize) {
        match sys.mem().pte(mm, addr + off) {
            Some(Pte::Page(f)) if !seen.insert(f) => return true,
            Some(Pte::Zero { .. }) => zero += 1,
            _ => {}
        }
    }
    zero > 1
}

fn new_sys() -> (SimSystem, MmId) {
    let mut sys = SimSystem::new();
    let mm = sys.spawn();
    (sys, mm)
}

#[test]
fn test_unmerge() {
    let (mut sys, mm) = new_sys();
    let a = mmap_and_merge_range(&mut sys, mm, 0xcf, MIB2, Prot::RW, Mode::Madvise);
    assert!(range_maps_duplicates(&sys, mm, a, MIB2));
    sys.madvise(mm, a, MIB2, Advice::Unmergeable).unwrap();
    assert!(!range_maps_duplicates(&sys, mm, a, MIB2));
}

#[test]
fn test_unmerge_zero_pages() {
    let (mut sys, mm) = new_sys();
    sys.write_knob("use_zero_pages", "1").unwrap();
    let a = mmap_and_merge_range(&mut sys, mm, 0x00, MIB2, Prot::RW, Mode::Madvise);
    assert_eq!(sys.ksm_stat(mm).ksm_zero_pages, 512);
    assert_eq!(sys.counters().ksm_zero_pages, 512);
    sys.madvise(mm, a, MIB2 / 2, Advice::Unmergeable).unwrap();
    assert_eq!(sys.ksm_stat(mm).ksm_zero_pages, 256);
    for off in (MIB2 / 2..MIB2).step_by(PS as usize) {
        sys.write(mm, a + off, &7u32.to_ne_bytes()).unwrap();
    }
    assert_eq!(sys.ksm_stat(mm).ksm_zero_pages, 0);
    assert_eq!(sys.counters().ksm_zero_pages, 0);
    assert!(!range_maps_duplicates(&sys, mm, a, MIB2));
}

#[test]
fn test_unmerge_discarded() {
    let (mut sys, mm) = new_sys();
    let a = mmap_and_merge_range(&mut sys, mm, 0xcf, MIB2, Prot::RW, Mode::Madvise);
    sys.madvise(mm, a, MIB2 / 2, Advice::DontNeed).unwrap();
    sys.madvise(mm, a, MIB2, Advice::Unmergeable).unwrap();
    assert!(!range_maps_duplicates(&sys, mm, a, MIB2));
}

#[test]
fn test_prot_none() {
    let (mut sys, mm) = new_sys();
    let a = mmap_and_merge_range(&mut sys, mm, 0x11, MIB2, Prot::NONE, Mode::Madvise);
    // Write a unique value into each page of the first half through /proc/self/mem.
    for (i, off) in (0..MIB2 / 2).step_by(PS as usize).enumerate() {
        sys.force_write(mm, a + off, &(i as u32).to_ne_bytes())
            .unwrap();
    }
    sys.madvise(mm, a + MIB2 / 2, MIB2 / 2, Advice::Unmergeable)
        .unwrap();
    assert!(!range_maps_duplicates(&sys, mm, a, MIB2));
}

#[test]
fn test_prctl() {
    let (mut sys, mm) = new_sys();
    sys.prctl_set_memory_merge(mm, true).unwrap();
    assert!(sys.prctl_get_memory_merge(mm));
    sys.prctl_set_memory_merge(mm, false).unwrap();
    assert!(!sys.prctl_get_memory_merge(mm));
}

/// `test_child_ksm`: the child must see PR_SET_MEMORY_MERGE set and get pages merged
/// without any madvise.
fn test_child_ksm(sys: &mut SimSystem, child: MmId) {
    assert!(sys.prctl_get_memory_merge(child));
    mmap_and_merge_range(sys, child, 0xcf, MIB2, Prot::RW, Mode::None);
    assert!(sys.ksm_stat(child).ksm_merging_pages > 0);
}

#[test]
fn test_prctl_fork() {
    let (mut sys, mm) = new_sys();
    sys.prctl_set_memory_merge(mm, true).unwrap();
    let child = sys.fork(mm).unwrap();
    test_child_ksm(&mut sys, child);
    sys.exit(child).unwrap();
    sys.prctl_set_memory_merge(mm, false).unwrap();
    assert!(!sys.prctl_get_memory_merge(mm));
}

#[test]
fn test_prctl_fork_exec() {
    let (mut sys, mm) = new_sys();
    sys.prctl_set_memory_merge(mm, true).unwrap();
    let child = sys.fork(mm).unwrap();
    let child = sys.exec(child).unwrap();
    test_child_ksm(&mut sys, child);
}

#[test]
fn test_prctl_unmerge() {
    let (mut sys, mm) = new_sys();
    let a = mmap_and_merge_range(&mut sys, mm, 0xcf, MIB2, Prot::RW, Mode::Prctl);
    sys.prctl_set_memory_merge(mm, false).unwrap();
    assert!(!range_maps_duplicates(&sys, mm, a, MIB2));
}

#[test]
fn test_fork_ksm_merging_page_count() {
    let (mut sys, mm) = new_sys();
    mmap_and_merge_range(&mut sys, mm, 0xcf, MIB2, Prot::RW, Mode::Madvise);
    let child = sys.fork(mm).unwrap();
    assert_eq!(sys.ksm_stat(child).ksm_merging_pages, 0);
    assert_eq!(sys.ksm_stat(child).ksm_rmap_items, 0);
}

#[test]
fn fork_counts_the_childs_zero_pages_globally() {
    let (mut sys, mm) = new_sys();
    sys.write_knob("use_zero_pages", "1").unwrap();
    let a = mmap_and_merge_range(&mut sys, mm, 0, 64 * PS, Prot::RW, Mode::Madvise);
    assert_eq!(sys.counters().ksm_zero_pages, 64);
    let child = sys.fork(mm).unwrap();
    assert_eq!(sys.ksm_stat(child).ksm_zero_pages, 64);
    assert_eq!(sys.counters().ksm_zero_pages, 128);
    sys.write(child, a, &[1]).unwrap();
    assert_eq!(sys.ksm_stat(child).ksm_zero_pages, 63);
    assert_eq!(sys.ksm_stat(mm).ksm_zero_pages, 64);
    sys.exit(child).unwrap();
    assert_eq!(sys.counters().ksm_zero_pages, 64);
    sys.ksm_stop().unwrap();
    assert_eq!(sys.counters().ksm_zero_pages, 0);
}

#[test]
fn read_fault_zero_pages_are_never_counted_or_unshared() {
    let (mut sys, mm) = new_sys();
    sys.write_knob("use_zero_pages", "1").unwrap();
    let a = mmap_and_merge_range(&mut sys, mm, 0, 8 * PS, Prot::RW, Mode::Madvise);
    let b = sys.mmap(mm, 8 * PS, Prot::RW).unwrap();
    let mut buf = [0u8; 1];
    for i in 0..8 {
        sys.read(mm, b + i * PS, &mut buf).unwrap();
    }
    sys.madvise(mm, b, 8 * PS, Advice::Mergeable).unwrap();
    assert!(sys.run_full_scans(2));
    assert_eq!(sys.ksm_stat(mm).ksm_zero_pages, 8);
    sys.ksm_stop().unwrap();
    assert_eq!(sys.ksm_stat(mm).ksm_zero_pages, 0);
    for i in 0..8 {
        assert_eq!(
            sys.mem().pte(mm, b + i * PS),
            Some(Pte::Zero { ksm: false })
        );
        assert!(matches!(sys.mem().pte(mm, a + i * PS), Some(Pte::Page(_))));
    }
}

// ---------------------------------------------------------------- ksm_tests.c

/// `ksm_tests.c` setup: `run=2`, `sleep_millisecs=0`, `pages_to_scan=page_count`.
fn ksm_tests_setup(page_count: u64) -> (SimSystem, MmId) {
    let (mut sys, mm) = new_sys();
    sys.write_knob("run", "2").unwrap();
    sys.write_knob("sleep_millisecs", "0").unwrap();
    sys.write_knob("merge_across_nodes", "1").unwrap();
    sys.write_knob("pages_to_scan", &page_count.to_string())
        .unwrap();
    (sys, mm)
}

/// `ksm_merge_pages`: madvise, `run=1`, wait for two full scans.
fn ksm_merge_pages(sys: &mut SimSystem, mm: MmId, a: u64, size: u64) {
    sys.madvise(mm, a, size, Advice::Mergeable).unwrap();
    assert!(sys.ksm_start());
}

/// `assert_ksm_pages_count`.
fn assert_ksm_pages_count(sys: &SimSystem, n: u64) {
    let c = sys.counters();
    let m: u64 = sys.read_knob("max_page_sharing").unwrap().parse().unwrap();
    let (shared, sharing) = if n.is_multiple_of(m) || n % m == 1 {
        (n / m, n / m * (m - 1))
    } else {
        (n / m + 1, n - (n / m + 1))
    };
    assert_eq!(
        (c.pages_shared, c.pages_sharing),
        (shared, sharing),
        "n={n} M={m}"
    );
}

#[test]
fn check_ksm_merge() {
    let (mut sys, mm) = ksm_tests_setup(10);
    let a = sys.mmap(mm, 10 * PS, Prot::RW).unwrap();
    fill(&mut sys, mm, a, 10 * PS, b'*');
    ksm_merge_pages(&mut sys, mm, a, 10 * PS);
    let c = sys.counters();
    assert_eq!((c.pages_shared, c.pages_sharing), (1, 9));
    assert_ksm_pages_count(&sys, 10);
}

#[test]
fn check_ksm_unmerge() {
    let (mut sys, mm) = ksm_tests_setup(2);
    let a = sys.mmap(mm, 2 * PS, Prot::RW).unwrap();
    fill(&mut sys, mm, a, 2 * PS, b'*');
    ksm_merge_pages(&mut sys, mm, a, 2 * PS);
    assert_eq!(sys.counters().pages_sharing, 1);
    sys.write(mm, a, b"-").unwrap();
    sys.write(mm, a + PS, b"+").unwrap();
    // Stale until ksmd comes by, as in the kernel.
    assert_eq!(sys.counters().pages_sharing, 1);
    assert!(sys.run_full_scans(1));
    let c = sys.counters();
    assert_eq!((c.pages_shared, c.pages_sharing), (0, 0));
}

#[test]
fn check_ksm_zero_page_merge() {
    for (use_zero, shared, sharing, zero) in [(false, 1, 9, 0), (true, 0, 0, 10)] {
        let (mut sys, mm) = ksm_tests_setup(10);
        sys.write_knob("use_zero_pages", if use_zero { "1" } else { "0" })
            .unwrap();
        let a = sys.mmap(mm, 10 * PS, Prot::RW).unwrap();
        fill(&mut sys, mm, a, 10 * PS, 0);
        ksm_merge_pages(&mut sys, mm, a, 10 * PS);
        let c = sys.counters();
        assert_eq!(
            (c.pages_shared, c.pages_sharing, c.ksm_zero_pages),
            (shared, sharing, zero)
        );
    }
}

#[test]
fn check_ksm_numa_merge() {
    for (across, shared, sharing) in [(true, 1, 1), (false, 0, 0)] {
        let (mut sys, mm) = ksm_tests_setup(1);
        sys.write_knob("merge_across_nodes", if across { "1" } else { "0" })
            .unwrap();
        let a = sys.mmap_on(mm, PS, Prot::RW, false, 0).unwrap();
        let b = sys.mmap_on(mm, PS, Prot::RW, false, 1).unwrap();
        fill(&mut sys, mm, a, PS, b'*');
        fill(&mut sys, mm, b, PS, b'*');
        sys.madvise(mm, a, PS, Advice::Mergeable).unwrap();
        sys.madvise(mm, b, PS, Advice::Mergeable).unwrap();
        sys.write_knob("pages_to_scan", "2").unwrap();
        assert!(sys.ksm_start());
        let c = sys.counters();
        assert_eq!(
            (c.pages_shared, c.pages_sharing),
            (shared, sharing),
            "across={across}"
        );
    }
}

#[test]
fn max_page_sharing_follows_the_selftest_formula_and_makes_chains() {
    for m in [2u64, 3, 4, 7, 256] {
        for n in 2..=24u64 {
            let (mut sys, mm) = ksm_tests_setup(n);
            sys.write_knob("max_page_sharing", &m.to_string()).unwrap();
            let a = sys.mmap(mm, n * PS, Prot::RW).unwrap();
            fill(&mut sys, mm, a, n * PS, b'*');
            ksm_merge_pages(&mut sys, mm, a, n * PS);
            assert_ksm_pages_count(&sys, n);
            let c = sys.counters();
            if c.pages_shared > 1 {
                assert_eq!(c.stable_node_chains, 1, "n={n} M={m}");
                assert_eq!(c.stable_node_dups, c.pages_shared, "n={n} M={m}");
            } else {
                assert_eq!((c.stable_node_chains, c.stable_node_dups), (0, 0));
            }
            sys.ksm().check_invariants().unwrap();
        }
    }
}

#[test]
fn chain_collapses_when_one_dup_is_left() {
    let (mut sys, mm) = ksm_tests_setup(4);
    sys.write_knob("max_page_sharing", "2").unwrap();
    sys.write_knob("stable_node_chains_prune_millisecs", "0")
        .unwrap();
    let a = sys.mmap(mm, 5 * PS, Prot::RW).unwrap();
    fill(&mut sys, mm, a, 4 * PS, b'*');
    ksm_merge_pages(&mut sys, mm, a, 5 * PS);
    let c = sys.counters();
    assert_eq!(
        (
            c.pages_shared,
            c.pages_sharing,
            c.stable_node_chains,
            c.stable_node_dups
        ),
        (2, 2, 1, 2)
    );
    // One mapping of the first KSM page diverges (it gets room again); both mappings of the
    // second diverge (its node goes stale).
    for i in 1..4u8 {
        sys.write(mm, a + i as u64 * PS, &[i]).unwrap();
    }
    assert!(sys.run_full_scans(1));
    assert_eq!(sys.counters().stable_node_dups, 1);
    // A new page of that content searches the chain, which is down to one dup with room:
    // the chain collapses into a regular node and the page merges into it.
    fill(&mut sys, mm, a + 4 * PS, PS, b'*');
    assert!(sys.run_full_scans(2));
    let c = sys.counters();
    assert_eq!((c.stable_node_chains, c.stable_node_dups), (0, 0));
    assert_eq!((c.pages_shared, c.pages_sharing), (1, 1));
    sys.ksm().check_invariants().unwrap();
}

#[test]
fn knob_errors_match_the_kernel() {
    let (mut sys, mm) = ksm_tests_setup(4);
    let a = sys.mmap(mm, 4 * PS, Prot::RW).unwrap();
    fill(&mut sys, mm, a, 4 * PS, b'*');
    ksm_merge_pages(&mut sys, mm, a, 4 * PS);
    assert!(matches!(
        sys.write_knob("max_page_sharing", "10"),
        Err(KnobError::Busy(_))
    ));
    assert!(matches!(
        sys.write_knob("merge_across_nodes", "0"),
        Err(KnobError::Busy(_))
    ));
    // Same value: no change, no error.
    sys.write_knob("max_page_sharing", "256").unwrap();
    sys.write_knob("run", "2").unwrap();
    assert_eq!(sys.counters().full_scans, 0);
    sys.write_knob("max_page_sharing", "10").unwrap();
    sys.write_knob("advisor_mode", "scan-time").unwrap();
    assert_eq!(sys.read_knob("pages_to_scan").unwrap(), "500");
    assert!(matches!(
        sys.write_knob("pages_to_scan", "5"),
        Err(KnobError::Invalid { .. })
    ));
    sys.write_knob("advisor_mode", "none").unwrap();
    assert_eq!(sys.read_knob("pages_to_scan").unwrap(), "100");
    assert!(matches!(
        sys.write_knob("run", "3"),
        Err(KnobError::Invalid { .. })
    ));
    assert!(matches!(
        sys.write_knob("pages_volatile", "3"),
        Err(KnobError::ReadOnly(_))
    ));
}

#[test]
fn smart_scan_visits_a_unique_page_at_ages_0_1_2_3_5_8_13() {
    let (mut sys, mm) = ksm_tests_setup(10);
    let a = sys.mmap(mm, PS, Prot::RW).unwrap();
    fill(&mut sys, mm, a, PS, 0x5a);
    sys.madvise(mm, a, PS, Advice::Mergeable).unwrap();
    sys.write_knob("run", "1").unwrap();
    let mut visited = vec![];
    for pass in 0..15 {
        let before = sys.counters().pages_scanned;
        assert!(sys.run_full_scans(1));
        if sys.counters().pages_scanned > before {
            visited.push(pass);
        }
    }
    assert_eq!(visited, vec![0, 1, 2, 3, 5, 8, 13]);
    assert_eq!(sys.counters().pages_skipped, 15 - 7);
}

#[test]
fn advisor_retunes_pages_to_scan_each_full_scan() {
    let (mut sys, mm) = ksm_tests_setup(10);
    let a = sys.mmap(mm, 64 * PS, Prot::RW).unwrap();
    fill(&mut sys, mm, a, 64 * PS, 3);
    sys.madvise(mm, a, 64 * PS, Advice::Mergeable).unwrap();
    sys.write_knob("advisor_mode", "scan-time").unwrap();
    sys.write_knob("sleep_millisecs", "20").unwrap();
    sys.write_knob("run", "1").unwrap();
    assert!(sys.run_full_scans(1));
    let p: u64 = sys.read_knob("pages_to_scan").unwrap().parse().unwrap();
    // One 64-page scan in 20 ms sleeps: scan_time rounds up to 1 s, so the advisor asks for
    // pages_to_scan*100/(200*100/1)*change/100, bounded below by the 10% CPU floor.
    assert_ne!(p, 500);
    assert!(p <= 30000);
}

#[test]
fn exit_of_a_merged_process_is_cleaned_up_by_the_next_pass() {
    let (mut sys, mm) = ksm_tests_setup(100);
    let other = sys.spawn();
    for p in [mm, other] {
        let a = sys.mmap(p, 10 * PS, Prot::RW).unwrap();
        fill(&mut sys, p, a, 10 * PS, 9);
        sys.madvise(p, a, 10 * PS, Advice::Mergeable).unwrap();
    }
    assert!(sys.ksm_start());
    assert_eq!(sys.counters().pages_sharing, 19);
    sys.exit(other).unwrap();
    assert!(sys.run_full_scans(1));
    let c = sys.counters();
    assert_eq!((c.pages_shared, c.pages_sharing), (1, 9));
    sys.ksm().check_invariants().unwrap();
}

#[test]
fn forked_ksm_pages_join_the_stable_tree_past_the_limit() {
    let (mut sys, mm) = ksm_tests_setup(100);
    sys.write_knob("max_page_sharing", "4").unwrap();
    let a = sys.mmap(mm, 4 * PS, Prot::RW).unwrap();
    fill(&mut sys, mm, a, 4 * PS, 9);
    ksm_merge_pages(&mut sys, mm, a, 4 * PS);
    assert_eq!(
        (sys.counters().pages_shared, sys.counters().pages_sharing),
        (1, 3)
    );
    let child = sys.fork(mm).unwrap();
    assert!(sys.run_full_scans(1));
    let c = sys.counters();
    // The child's mappings of the KSM page are attached with max_page_sharing_bypass.
    assert_eq!((c.pages_shared, c.pages_sharing), (1, 7));
    assert_eq!(sys.ksm_stat(child).ksm_merging_pages, 4);
    sys.ksm().check_invariants().unwrap();
}

#[test]
fn pinned_pages_are_not_merged() {
    let (mut sys, mm) = ksm_tests_setup(10);
    let a = sys.mmap(mm, 4 * PS, Prot::RW).unwrap();
    fill(&mut sys, mm, a, 4 * PS, 1);
    let f = sys.pin(mm, a + 3 * PS).unwrap();
    ksm_merge_pages(&mut sys, mm, a, 4 * PS);
    assert_eq!(sys.mem().pte(mm, a + 3 * PS), Some(Pte::Page(f)));
    assert_eq!(
        (sys.counters().pages_shared, sys.counters().pages_sharing),
        (1, 2)
    );
    sys.unpin(f);
    assert!(sys.run_full_scans(1));
    assert_eq!(sys.counters().pages_sharing, 3);
}

#[test]
fn khugepaged_collapse_uncounts_ksm_zero_pages() {
    let (mut sys, mm) = new_sys();
    sys.write_knob("use_zero_pages", "1").unwrap();
    let a = mmap_and_merge_range(&mut sys, mm, 0, MIB2, Prot::RW, Mode::Madvise);
    assert_eq!(sys.ksm_stat(mm).ksm_zero_pages, 512);
    assert!(sys.collapse_huge(mm, a).unwrap());
    assert_eq!(sys.ksm_stat(mm).ksm_zero_pages, 0);
    assert_eq!(sys.counters().ksm_zero_pages, 0);
    assert_eq!(sys.mem().peek_page(mm, a + 5 * PS), Some([0; 4096]));
    // A range with KSM pages is not collapsed.
    let b = mmap_and_merge_range(&mut sys, mm, 0xcf, 2 * MIB2, Prot::RW, Mode::Madvise);
    let huge = (b + MIB2 - 1) & !(MIB2 - 1);
    assert!(matches!(sys.mem().pte(mm, huge), Some(Pte::Page(f)) if sys.mem().frame_is_ksm(f)));
    assert!(!sys.collapse_huge(mm, huge).unwrap());
}

/// samepage's own `zero_pages_first_visit`: zero-filled pages go to the zero page on the first
/// full scan; off (the default, the kernel's rule) they wait a full scan for their checksum to
/// hold still. Duplicates wait either way.
#[test]
fn zero_pages_first_visit_places_zero_pages_in_the_first_full_scan() {
    for (first, zero_after_one) in [("0", 0), ("1", 32)] {
        let mut sys = SimSystem::new();
        sys.write_knob("use_zero_pages", "1").unwrap();
        sys.write_knob("zero_pages_first_visit", first).unwrap();
        sys.write_knob("pages_to_scan", "1000").unwrap();
        sys.spawn_with_pages(64, |i, buf| buf.fill(if i % 2 == 0 { 0 } else { 0x5a }))
            .unwrap();
        sys.write_knob("run", "1").unwrap();
        assert!(sys.run_full_scans(1));
        let c = sys.counters();
        assert_eq!(
            (c.ksm_zero_pages, c.pages_sharing),
            (zero_after_one, 0),
            "first={first}"
        );
        assert!(sys.run_full_scans(1));
        let c = sys.counters();
        assert_eq!(
            (c.ksm_zero_pages, c.pages_sharing),
            (32, 31),
            "first={first}"
        );
        sys.ksm().check_invariants().unwrap();
    }
    assert!(matches!(
        SimSystem::new().write_knob("zero_pages_first_visit", "2"),
        Err(KnobError::Invalid { .. })
    ));
}
