//! samepage's additions to the kernel's interface, on the simulator: security domains, the
//! release of an exited address space, counters with a zero-page count from elsewhere, and
//! the convergence rule.

use samepage_engine::{
    Convergence, DomainError, DomainId, FrameId, KsmCounters, MmExit, MmId, Until, PAGE_SIZE,
    PAGE_SIZE_U64 as PS, RMAP_ITEM_BYTES,
};
use samepage_sim::{Advice, Prot, Pte, SimSystem};
use std::collections::{BTreeMap, BTreeSet};

fn fresh() -> SimSystem {
    let mut sys = SimSystem::new();
    sys.write_knob("pages_to_scan", "1000").unwrap();
    sys
}

/// A process in `domain` with `n` pages of `val` (then `zeros` zero-filled pages), mergeable.
fn process(sys: &mut SimSystem, domain: u32, val: u8, n: u64, zeros: u64) -> (MmId, u64) {
    let mm = sys.spawn();
    sys.set_domain(mm, DomainId(domain)).unwrap();
    let a = sys.mmap(mm, (n + zeros) * PS, Prot::RW).unwrap();
    for i in 0..n {
        sys.write(mm, a + i * PS, &[val; PAGE_SIZE]).unwrap();
    }
    for i in n..n + zeros {
        sys.write(mm, a + i * PS, &[0]).unwrap();
    }
    sys.madvise(mm, a, (n + zeros) * PS, Advice::Mergeable)
        .unwrap();
    (mm, a)
}

/// The KSM frames each process maps.
fn ksm_frames(sys: &SimSystem, mm: MmId) -> BTreeSet<FrameId> {
    sys.mem()
        .ptes(mm)
        .filter_map(|(_, _, p)| match p {
            Pte::Page(f) if sys.mem().frame_is_ksm(f) => Some(f),
            _ => None,
        })
        .collect()
}

#[test]
fn identical_pages_in_two_domains_stay_apart() {
    let mut sys = fresh();
    sys.write_knob("use_zero_pages", "1").unwrap();
    let (a1, _) = process(&mut sys, 1, 0xcf, 4, 2);
    let (a2, _) = process(&mut sys, 1, 0xcf, 4, 2);
    let (b1, _) = process(&mut sys, 2, 0xcf, 4, 2);
    assert!(sys.ksm_start());
    let c = sys.counters();
    // Domain 1: one KSM page for eight mappings; domain 2: one for four. Zero pages go to the
    // shared zero page in both.
    assert_eq!((c.pages_shared, c.pages_sharing), (2, 7 + 3));
    assert_eq!(c.ksm_zero_pages, 6);
    let (f1, f2, g) = (
        ksm_frames(&sys, a1),
        ksm_frames(&sys, a2),
        ksm_frames(&sys, b1),
    );
    assert_eq!(f1.len(), 1);
    assert_eq!(f1, f2);
    assert_eq!(g.len(), 1);
    assert!(f1.is_disjoint(&g));
    sys.ksm().check_invariants().unwrap();
    // A process of domain 2 that comes later joins domain 2's KSM page, not domain 1's.
    let (b2, _) = process(&mut sys, 2, 0xcf, 1, 0);
    assert!(sys.run_full_scans(2));
    assert_eq!(ksm_frames(&sys, b2), g);
    assert_eq!(sys.counters().pages_sharing, 7 + 4);
}

#[test]
fn one_page_per_domain_does_not_merge_at_all() {
    let mut sys = fresh();
    for d in 0..4 {
        process(&mut sys, d, 0x77, 1, 0);
    }
    assert!(sys.ksm_start());
    assert!(sys.run_full_scans(2));
    let c = sys.counters();
    assert_eq!(
        (c.pages_shared, c.pages_sharing, c.pages_unshared),
        (0, 0, 4)
    );
    sys.ksm().check_invariants().unwrap();
}

#[test]
fn chains_and_dups_are_per_domain() {
    let mut sys = fresh();
    sys.write_knob("max_page_sharing", "2").unwrap();
    let (a, _) = process(&mut sys, 1, 0x42, 4, 0);
    let (b, _) = process(&mut sys, 2, 0x42, 4, 0);
    assert!(sys.ksm_start());
    assert!(sys.run_full_scans(1));
    let c = sys.counters();
    // Four pages with at most two mappings a KSM page: two dups under one chain, per domain.
    assert_eq!(
        (
            c.pages_shared,
            c.pages_sharing,
            c.stable_node_chains,
            c.stable_node_dups
        ),
        (4, 4, 2, 4)
    );
    assert!(ksm_frames(&sys, a).is_disjoint(&ksm_frames(&sys, b)));
    sys.ksm().check_invariants().unwrap();
}

#[test]
fn fork_keeps_the_domain_and_exec_too() {
    let mut sys = fresh();
    let (p, _) = process(&mut sys, 3, 0x10, 2, 0);
    sys.prctl_set_memory_merge(p, true).unwrap();
    let child = sys.fork(p).unwrap();
    assert_eq!(sys.ksm().domain(child), DomainId(3));
    let new = sys.exec(child).unwrap();
    assert_eq!(sys.ksm().domain(new), DomainId(3));
    // The exec'ed process's pages merge with its domain's.
    let a = sys.mmap(new, 2 * PS, Prot::RW).unwrap();
    for i in 0..2 {
        sys.write(new, a + i * PS, &[0x10; PAGE_SIZE]).unwrap();
    }
    assert!(sys.ksm_start());
    assert_eq!(ksm_frames(&sys, new), ksm_frames(&sys, p));
    assert_eq!(sys.counters().pages_sharing, 3);
}

#[test]
fn the_domain_is_set_before_the_pages_are_scanned() {
    let mut sys = fresh();
    let (p, _) = process(&mut sys, 1, 0x33, 2, 0);
    assert!(sys.ksm_start());
    assert_eq!(
        sys.set_domain(p, DomainId(2)),
        Err(DomainError::AlreadyScanned {
            mm: p,
            domain: DomainId(2)
        })
    );
    assert_eq!(sys.ksm().domain(p), DomainId(1));
    // run=2 frees every rmap item: then the domain can change.
    sys.ksm_stop().unwrap();
    sys.set_domain(p, DomainId(2)).unwrap();
    assert_eq!(sys.ksm().domain(p), DomainId(2));
}

#[test]
fn a_forked_ksm_page_of_another_domain_is_left_alone() {
    let mut sys = fresh();
    let (p, a) = process(&mut sys, 1, 0x55, 2, 0);
    assert!(sys.ksm_start());
    let child = sys.fork(p).unwrap();
    // The child has no rmap items yet, so it may move; it still maps the parent's KSM page.
    sys.set_domain(child, DomainId(2)).unwrap();
    assert!(sys.run_full_scans(2));
    assert_eq!(ksm_frames(&sys, child), ksm_frames(&sys, p));
    // Not counted as the child's (its domain's trees do not have that page) ...
    assert_eq!(sys.ksm_stat(child).ksm_merging_pages, 0);
    assert_eq!(sys.counters().pages_sharing, 1);
    sys.ksm().check_invariants().unwrap();
    // ... and once the child writes its copies back, they merge in its own domain.
    for i in 0..2 {
        sys.write(child, a + i * PS, &[0x56; PAGE_SIZE]).unwrap();
    }
    assert!(sys.run_full_scans(2));
    let c = sys.counters();
    assert_eq!((c.pages_shared, c.pages_sharing), (2, 2));
    assert!(ksm_frames(&sys, child).is_disjoint(&ksm_frames(&sys, p)));
}

#[test]
fn exit_says_when_the_engine_let_go() {
    let mut sys = fresh();
    let (p, _) = process(&mut sys, 0, 0x21, 4, 0);
    let (q, _) = process(&mut sys, 0, 0x21, 4, 0);
    // Never scanned: no rmap items, freed at once.
    let idle = sys.spawn();
    assert!(sys.ksm().mm_released(idle));
    assert_eq!(sys.exit(idle).unwrap(), MmExit::Released);
    assert!(sys.ksm().mm_released(idle));
    assert!(sys.ksm_start());
    assert!(!sys.ksm().mm_released(q));
    // q has rmap items: it stays on the list until the scan frees them; its pages stay
    // counted until then, as in the kernel.
    assert_eq!(sys.exit(q).unwrap(), MmExit::Deferred);
    assert!(!sys.ksm().mm_released(q));
    assert_eq!(sys.counters().pages_sharing, 7);
    assert!(sys.run_full_scans(1));
    assert!(sys.ksm().mm_released(q));
    assert_eq!(sys.counters().pages_sharing, 3);
    // Exited while the scan is in the middle of it: deferred, then freed by the scan.
    let (r, _) = process(&mut sys, 0, 0x21, 4, 0);
    while sys.ksm_stat(r).ksm_rmap_items != 2 {
        sys.scan(1);
    }
    assert_eq!(sys.exit(r).unwrap(), MmExit::Deferred);
    sys.ksm().check_invariants().unwrap();
    assert!(sys.run_full_scans(1));
    assert!(sys.ksm().mm_released(r));
    assert!(!sys.ksm().mm_released(p));
}

#[test]
fn counters_with_a_zero_page_count_from_elsewhere() {
    let mut sys = fresh();
    sys.write_knob("use_zero_pages", "1").unwrap();
    let (p, _) = process(&mut sys, 0, 0x99, 3, 5);
    assert!(sys.ksm_start());
    let c = sys.counters();
    assert_eq!((c.pages_sharing, c.ksm_zero_pages), (2, 5));
    let items = sys.ksm().rmap_items() as i64;
    let profit =
        |sharing: i64, zero: i64| (sharing + zero) * PS as i64 - items * RMAP_ITEM_BYTES as i64;
    assert_eq!(c.general_profit, profit(2, 5));
    // The same counters with the zero-page count of another moment.
    let other = c.clone().with_ksm_zero_pages(1);
    assert_eq!(
        (other.ksm_zero_pages, other.general_profit),
        (1, profit(2, 1))
    );
    assert_eq!(other.clone().with_ksm_zero_pages(5), c);
    let KsmCounters {
        pages_shared,
        pages_sharing,
        full_scans,
        ..
    } = other;
    assert_eq!(
        (pages_shared, pages_sharing, full_scans),
        (c.pages_shared, 2, c.full_scans)
    );
    // Per process, the same with ksm_process_profit.
    let st = sys.ksm_stat(p);
    let fewer = st.clone().with_ksm_zero_pages(st.ksm_zero_pages - 2);
    assert_eq!(
        fewer.ksm_process_profit,
        st.ksm_process_profit - 2 * PS as i64
    );
    assert_eq!(fewer.with_ksm_zero_pages(st.ksm_zero_pages), st);
    // After two zero pages are written, the engine's own counters agree with that.
    let a = sys.mem().vmas(p)[0].start;
    sys.write(p, a + 3 * PS, &[1]).unwrap();
    sys.write(p, a + 4 * PS, &[1]).unwrap();
    assert_eq!(sys.ksm_stat(p), fewer_after(&st));
    fn fewer_after(st: &samepage_engine::KsmStat) -> samepage_engine::KsmStat {
        st.clone().with_ksm_zero_pages(st.ksm_zero_pages - 2)
    }
}

#[test]
fn convergence_in_the_simulator_matches_the_old_rule() {
    // The rule the simulator used before Convergence: at least min_passes full scans, then
    // one that changes no merge counter. Both must stop after the same pass on the same
    // workloads.
    for (n, groups) in [(1u64, 1u64), (40, 3), (300, 7)] {
        let load = || {
            let mut sys = fresh();
            sys.write_knob("pages_to_scan", "17").unwrap();
            sys.spawn_with_pages(n, |i, b| b.fill((i % groups) as u8 + 1))
                .unwrap();
            sys.write_knob("run", "1").unwrap();
            sys
        };
        let mut old = load();
        let mut prev = old.counters().merge_state();
        let mut old_passes = 0;
        for pass in 1..=50 {
            assert!(old.run_full_scans(1));
            let now = old.counters().merge_state();
            if pass > 2 && now == prev {
                old_passes = pass;
                break;
            }
            prev = now;
        }
        let mut sys = load();
        let mut conv = Convergence::new(Until::Stable { min_passes: 2 }, &sys.counters());
        assert!(sys.run_until(&mut conv, 50));
        assert_eq!(conv.passes(), old_passes, "n={n}");
        assert_eq!(sys.counters(), old.counters());
        // Merging happened in the second pass (the first only takes checksums).
        let want = if n > 1 { Some(2) } else { None };
        assert_eq!(conv.last_change_pass(), want, "n={n}");
        let mut exact = load();
        let mut conv = Convergence::new(Until::FullScans(5), &exact.counters());
        assert!(exact.run_until(&mut conv, 50));
        assert_eq!((conv.passes(), exact.counters().full_scans), (5, 5));
    }
    // Not running: no convergence.
    let mut idle = fresh();
    let mut conv = Convergence::new(Until::FullScans(1), &idle.counters());
    assert!(!idle.run_until(&mut conv, 5));
}

#[test]
fn domains_survive_random_placement() {
    // Many processes in three domains with two contents: every KSM page is mapped only by
    // processes of one domain, and each (domain, content) pair has exactly one KSM page.
    let mut sys = fresh();
    let mut by_mm = BTreeMap::new();
    for k in 0..12u32 {
        let d = k % 3;
        let (mm, _) = process(&mut sys, d, 0x60 + (k % 2) as u8, 3, 0);
        by_mm.insert(mm, d);
    }
    assert!(sys.ksm_start());
    let mut owner: BTreeMap<FrameId, u32> = BTreeMap::new();
    for (&mm, &d) in &by_mm {
        for f in ksm_frames(&sys, mm) {
            assert_eq!(
                *owner.entry(f).or_insert(d),
                d,
                "{f:?} shared across domains"
            );
        }
    }
    assert_eq!(owner.len(), 3 * 2);
    assert_eq!(sys.counters().pages_shared, 6);
    assert_eq!(sys.counters().pages_sharing, 12 * 3 - 6);
}
