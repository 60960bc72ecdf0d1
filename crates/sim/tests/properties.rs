//! Random workloads on the simulator, checked after every step against a shadow copy of the
//! memory and against the counter identities; and, once ksmd has settled, the counters
//! against what the page tables show.

use proptest::prelude::*;
use samepage_engine::{FrameId, MmId, PAGE_SIZE, PAGE_SIZE_U64 as PS};
use samepage_sim::{Advice, Prot, Pte, SimSystem};
use std::collections::{BTreeMap, HashSet};

const PAGES: usize = 24;
const MAX_PROCS: usize = 4;

#[derive(Clone, Debug)]
enum Op {
    Write {
        p: usize,
        page: usize,
        val: u8,
        partial: bool,
    },
    Read {
        p: usize,
        page: usize,
    },
    DontNeed {
        p: usize,
        page: usize,
        n: usize,
    },
    Munmap {
        p: usize,
        page: usize,
        n: usize,
    },
    Unmergeable {
        p: usize,
        page: usize,
        n: usize,
    },
    Mergeable {
        p: usize,
    },
    Fork {
        p: usize,
    },
    Exit {
        p: usize,
    },
    Knob {
        name: &'static str,
        value: &'static str,
    },
    Run2,
    Scan {
        n: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let p = 0..MAX_PROCS;
    let page = 0..PAGES;
    prop_oneof![
        6 => (p.clone(), page.clone(), 0u8..4, any::<bool>())
            .prop_map(|(p, page, val, partial)| Op::Write { p, page, val, partial }),
        2 => (p.clone(), page.clone()).prop_map(|(p, page)| Op::Read { p, page }),
        1 => (p.clone(), page.clone(), 1usize..4).prop_map(|(p, page, n)| Op::DontNeed { p, page, n }),
        1 => (p.clone(), page.clone(), 1usize..3).prop_map(|(p, page, n)| Op::Munmap { p, page, n }),
        1 => (p.clone(), page.clone(), 1usize..8).prop_map(|(p, page, n)| Op::Unmergeable { p, page, n }),
        1 => p.clone().prop_map(|p| Op::Mergeable { p }),
        1 => p.clone().prop_map(|p| Op::Fork { p }),
        1 => p.prop_map(|p| Op::Exit { p }),
        1 => prop_oneof![
            Just(("use_zero_pages", "0")),
            Just(("use_zero_pages", "1")),
            Just(("max_page_sharing", "2")),
            Just(("max_page_sharing", "3")),
            Just(("max_page_sharing", "256")),
            Just(("smart_scan", "0")),
            Just(("smart_scan", "1")),
            Just(("pages_to_scan", "7")),
            Just(("pages_to_scan", "100")),
            Just(("merge_across_nodes", "0")),
            Just(("merge_across_nodes", "1")),
            Just(("stable_node_chains_prune_millisecs", "0")),
        ].prop_map(|(name, value)| Op::Knob { name, value }),
        1 => Just(Op::Run2),
        8 => (1u64..60).prop_map(|n| Op::Scan { n }),
    ]
}

/// The pages of one region as the process should read them: `None` = unmapped.
type ShadowPages = Vec<Option<Box<[u8; PAGE_SIZE]>>>;

/// What each process should read: (process, region base, pages).
struct Shadow {
    procs: Vec<(MmId, u64, ShadowPages)>,
}

fn page_of(val: u8, partial: bool, old: &[u8; PAGE_SIZE]) -> Box<[u8; PAGE_SIZE]> {
    let mut p = Box::new(*old);
    if partial {
        p[100] = val;
    } else {
        p.fill(val);
    }
    p
}

fn apply(sys: &mut SimSystem, sh: &mut Shadow, op: &Op) {
    let n = sh.procs.len();
    match *op {
        Op::Write {
            p,
            page,
            val,
            partial,
        } => {
            let (mm, base, pages) = &mut sh.procs[p % n];
            if let Some(old) = &mut pages[page] {
                let new = page_of(val, partial, old);
                if partial {
                    sys.write(*mm, *base + page as u64 * PS + 100, &[val])
                        .unwrap();
                } else {
                    sys.write(*mm, *base + page as u64 * PS, &new[..]).unwrap();
                }
                *old = new;
            }
        }
        Op::Read { p, page } => {
            let (mm, base, pages) = &sh.procs[p % n];
            if pages[page].is_some() {
                let mut b = [0u8; 8];
                sys.read(*mm, base + page as u64 * PS, &mut b).unwrap();
            }
        }
        Op::DontNeed { p, page, n: len } => {
            let (mm, base, pages) = &mut sh.procs[p % n];
            let end = (page + len).min(PAGES);
            if pages[page..end].iter().all(Option::is_some) {
                sys.madvise(
                    *mm,
                    *base + page as u64 * PS,
                    (end - page) as u64 * PS,
                    Advice::DontNeed,
                )
                .unwrap();
                for pg in &mut pages[page..end] {
                    *pg = Some(Box::new([0; PAGE_SIZE]));
                }
            }
        }
        Op::Munmap { p, page, n: len } => {
            let (mm, base, pages) = &mut sh.procs[p % n];
            let end = (page + len).min(PAGES);
            sys.munmap(*mm, *base + page as u64 * PS, (end - page) as u64 * PS)
                .unwrap();
            for pg in &mut pages[page..end] {
                *pg = None;
            }
        }
        Op::Unmergeable { p, page, n: len } => {
            let (mm, base, _) = &sh.procs[p % n];
            let end = (page + len).min(PAGES);
            sys.madvise(
                *mm,
                base + page as u64 * PS,
                (end - page) as u64 * PS,
                Advice::Unmergeable,
            )
            .unwrap();
        }
        Op::Mergeable { p } => {
            let (mm, base, _) = &sh.procs[p % n];
            sys.madvise(*mm, *base, PAGES as u64 * PS, Advice::Mergeable)
                .unwrap();
        }
        Op::Fork { p } => {
            if n < MAX_PROCS {
                let (mm, base, pages) = &sh.procs[p % n];
                let child = sys.fork(*mm).unwrap();
                let copy = pages.clone();
                let base = *base;
                sh.procs.push((child, base, copy));
            }
        }
        Op::Exit { p } => {
            if n > 1 {
                let (mm, _, _) = sh.procs.remove(p % n);
                sys.exit(mm).unwrap();
            }
        }
        Op::Knob { name, value } => {
            // EBUSY is an expected answer while KSM pages exist.
            let _ = sys.write_knob(name, value);
        }
        Op::Run2 => {
            sys.write_knob("run", "2").unwrap();
            sys.write_knob("run", "1").unwrap();
        }
        Op::Scan { n } => {
            sys.scan(n);
        }
    }
}

fn check_step(sys: &SimSystem, sh: &Shadow) -> Result<(), TestCaseError> {
    // No byte lost or changed.
    for (mm, base, pages) in &sh.procs {
        for (i, want) in pages.iter().enumerate() {
            let got = sys.mem().peek_page(*mm, base + i as u64 * PS);
            match (want, got) {
                (Some(w), Some(g)) => prop_assert!(w[..] == g[..], "{mm:?} page {i} differs"),
                (None, None) => {}
                (w, g) => prop_assert!(
                    false,
                    "{mm:?} page {i}: mapped {} vs {}",
                    w.is_some(),
                    g.is_some()
                ),
            }
        }
    }
    // ksm_zero_pages equals the marked zero-page mappings, globally and per process.
    let mut total = 0;
    for mm in sys.mem().mm_ids() {
        let marked = sys
            .mem()
            .ptes(mm)
            .filter(|(_, _, p)| *p == Pte::Zero { ksm: true })
            .count() as i64;
        prop_assert_eq!(sys.ksm_stat(mm).ksm_zero_pages, marked, "{:?}", mm);
        total += marked;
    }
    prop_assert_eq!(sys.counters().ksm_zero_pages, total);
    // Tree counters agree with the trees; pages_volatile follows the kernel's formula.
    sys.ksm().check_invariants().map_err(TestCaseError::fail)?;
    let c = sys.counters();
    let vol = sys.ksm().rmap_items() as i64
        - (c.pages_shared + c.pages_sharing + c.pages_unshared) as i64;
    prop_assert_eq!(c.pages_volatile, vol.max(0) as u64);
    // A stable item never points at a KSM page other than the one mapped at its address.
    for m in sys.ksm().stable_mappings() {
        if let Some(Pte::Page(f)) = sys.mem().pte(m.mm, m.addr) {
            if sys.mem().frame_is_ksm(f) {
                prop_assert_eq!(f, m.kpfn, "{:?} {:#x}", m.mm, m.addr);
            }
        }
    }
    Ok(())
}

/// After ksmd ran undisturbed, the counters are exactly what the page tables show.
fn check_settled(sys: &SimSystem) -> Result<(), TestCaseError> {
    let mut frames: HashSet<FrameId> = HashSet::new();
    let mut mappings = 0u64;
    let mut per_mm: BTreeMap<MmId, u64> = BTreeMap::new();
    for mm in sys.mem().mm_ids() {
        for (_, vma, pte) in sys.mem().ptes(mm) {
            if let Pte::Page(f) = pte {
                if vma.mergeable && sys.mem().frame_is_ksm(f) {
                    frames.insert(f);
                    mappings += 1;
                    *per_mm.entry(mm).or_default() += 1;
                }
            }
        }
    }
    let c = sys.counters();
    let tracked: HashSet<(MmId, u64)> = sys
        .ksm()
        .stable_mappings()
        .iter()
        .map(|m| (m.mm, m.addr))
        .collect();
    let mut untracked = vec![];
    for mm in sys.mem().mm_ids() {
        for (addr, vma, pte) in sys.mem().ptes(mm) {
            if let Pte::Page(f) = pte {
                if vma.mergeable && sys.mem().frame_is_ksm(f) && !tracked.contains(&(mm, addr)) {
                    untracked.push((mm, addr, f));
                }
            }
        }
    }
    prop_assert!(
        untracked.is_empty(),
        "KSM mappings without a stable rmap item: {:?}",
        untracked
    );
    prop_assert_eq!(c.pages_shared, frames.len() as u64);
    prop_assert_eq!(c.pages_shared + c.pages_sharing, mappings);
    for mm in sys.mem().mm_ids() {
        prop_assert_eq!(
            sys.ksm_stat(mm).ksm_merging_pages,
            per_mm.get(&mm).copied().unwrap_or(0)
        );
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn random_workloads_keep_data_and_counters_exact(
        ops in proptest::collection::vec(op(), 1..80),
        init in proptest::collection::vec(0u8..4, PAGES),
    ) {
        let mut sys = SimSystem::new();
        sys.write_knob("use_zero_pages", "1").unwrap();
        sys.write_knob("run", "1").unwrap();
        let mm = sys.spawn();
        let base = sys.mmap(mm, PAGES as u64 * PS, Prot::RW).unwrap();
        let mut pages = Vec::new();
        for (i, v) in init.iter().enumerate() {
            sys.write(mm, base + i as u64 * PS, &[*v; PAGE_SIZE]).unwrap();
            pages.push(Some(Box::new([*v; PAGE_SIZE])));
        }
        sys.madvise(mm, base, PAGES as u64 * PS, Advice::Mergeable).unwrap();
        let mut sh = Shadow { procs: vec![(mm, base, pages)] };
        for op in &ops {
            apply(&mut sys, &mut sh, op);
            check_step(&sys, &sh)?;
        }
        sys.write_knob("run", "1").unwrap();
        prop_assert!(sys.run_until_stable(2, 50).is_some());
        check_step(&sys, &sh)?;
        check_settled(&sys)?;
        sys.write_knob("run", "2").unwrap();
        check_step(&sys, &sh)?;
        prop_assert_eq!(sys.counters().ksm_zero_pages, 0);
        let c = sys.counters();
        prop_assert_eq!((c.pages_shared, c.pages_sharing, c.pages_unshared), (0, 0, 0));
    }
}
