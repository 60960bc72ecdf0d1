//! Merges the backend accepts and carries out later (as the live backend does at the end of
//! a scan batch), some of which fail: the engine undoes what it counted for each, so the
//! counters end as the kernel's would have with the merge failing at once.

use samepage_engine::{FrameId, KsmCounters, MmId, PAGE_SIZE, PAGE_SIZE_U64 as PS};
use samepage_sim::{BatchRace, FailEvery, Pte, SimSystem};
use samepage_workload::{GenSpec, Workload};

/// One process, page `i` filled with `vals[i]`; smart scan off, whole passes per batch.
fn setup(vals: &[u8], max_page_sharing: u32) -> (SimSystem, MmId, u64) {
    let mut sys = SimSystem::new();
    sys.write_knob("smart_scan", "0").unwrap();
    sys.write_knob("pages_to_scan", "1000").unwrap();
    sys.write_knob("max_page_sharing", &max_page_sharing.to_string())
        .unwrap();
    let s = sys
        .spawn_with_pages(vals.len() as u64, |i, b| b.fill(vals[i as usize]))
        .unwrap();
    sys.defer_merges(None);
    sys.write_knob("run", "1").unwrap();
    // Pass 1 only takes checksums: nothing to merge yet.
    assert!(sys.run_full_scans(1));
    (sys, s.mm, s.start)
}

fn state(c: &KsmCounters) -> (u64, u64, u64, u64, u64) {
    (
        c.pages_shared,
        c.pages_sharing,
        c.pages_unshared,
        c.stable_node_chains,
        c.stable_node_dups,
    )
}

fn ksm_frame(sys: &SimSystem, mm: MmId, addr: u64) -> Option<FrameId> {
    match sys.mem().pte(mm, addr) {
        Some(Pte::Page(f)) if sys.mem().frame_is_ksm(f) => Some(f),
        _ => None,
    }
}

fn write_race(mm: MmId, addr: u64, val: u8) -> BatchRace {
    BatchRace::Write {
        mm,
        addr,
        data: vec![val; PAGE_SIZE],
    }
}

#[test]
fn accepted_merges_are_carried_out_by_the_end_of_the_batch() {
    let (mut sys, mm, a) = setup(&[5, 5, 5], 256);
    let b = sys.scan(1000);
    assert!(b.full_scan_done);
    assert_eq!(b.merges_failed, 0);
    assert_eq!(sys.mem().queued_merges(), 0);
    assert_eq!(state(&sys.counters()), (1, 2, 0, 0, 0));
    let k = ksm_frame(&sys, mm, a).unwrap();
    for i in 1..3 {
        assert_eq!(ksm_frame(&sys, mm, a + i * PS), Some(k));
    }
    sys.ksm().check_invariants().unwrap();
}

#[test]
fn the_unstable_pages_merge_fails_so_the_promoted_page_is_unshared_again() {
    // Pass 2: page 0 goes into the unstable tree, page 1 finds it: page 1 is promoted, page 0
    // is to be merged into it. The process writes page 0 meanwhile: its merge fails for real.
    let (mut sys, mm, a) = setup(&[5, 5], 256);
    sys.during_batch(write_race(mm, a, 6));
    let frames = sys.mem().frames_in_use();
    let b = sys.scan(1000);
    assert_eq!(b.merges_failed, 1);
    let c = sys.counters();
    // As the kernel after try_to_merge_two_pages fails in its second half: no KSM page,
    // page 0 still in the unstable tree, page 1 out of both trees and unshared (break_cow).
    assert_eq!(state(&c), (0, 0, 1, 0, 0));
    assert_eq!(sys.ksm().merges_failed(), 1);
    assert_eq!(ksm_frame(&sys, mm, a + PS), None);
    assert_eq!(
        sys.mem().frames_in_use(),
        frames,
        "the promoted page was copied back"
    );
    assert_eq!(sys.mem().peek_page(mm, a + PS), Some([5; PAGE_SIZE]));
    assert_eq!(sys.mem().peek_page(mm, a), Some([6; PAGE_SIZE]));
    assert_eq!(sys.ksm_stat(mm).ksm_merging_pages, 0);
    sys.ksm().check_invariants().unwrap();
}

#[test]
fn the_promotion_fails_so_nothing_is_merged() {
    // The process pins page 1 before it can be promoted: both halves fail, nothing to undo
    // in the backend.
    let (mut sys, mm, a) = setup(&[5, 5], 256);
    sys.during_batch(BatchRace::Pin { mm, addr: a + PS });
    let b = sys.scan(1000);
    assert_eq!(b.merges_failed, 2);
    assert_eq!(state(&sys.counters()), (0, 0, 1, 0, 0));
    assert_eq!(ksm_frame(&sys, mm, a), None);
    assert_eq!(ksm_frame(&sys, mm, a + PS), None);
    sys.ksm().check_invariants().unwrap();
    // Unpinned, the two merge on a later pass.
    let Some(Pte::Page(f)) = sys.mem().pte(mm, a + PS) else {
        panic!("page 1 mapped")
    };
    sys.unpin(f);
    assert!(sys.run_until_stable(2, 20).is_some());
    assert_eq!(state(&sys.counters()), (1, 1, 0, 0, 0));
}

#[test]
fn a_discarded_page_fails_its_promotion() {
    let (mut sys, mm, a) = setup(&[5, 5, 9], 256);
    sys.during_batch(BatchRace::DontNeed {
        mm,
        addr: a + PS,
        len: PS,
    });
    sys.scan(1000);
    assert_eq!(state(&sys.counters()), (0, 0, 2, 0, 0));
    assert_eq!(sys.mem().peek_page(mm, a + PS), Some([0; PAGE_SIZE]));
    sys.ksm().check_invariants().unwrap();
}

#[test]
fn a_failed_pair_that_made_a_chain_leaves_no_chain() {
    // max_page_sharing=2, four identical pages: pass 2 makes pages 0+1 a KSM page (full),
    // page 2 goes into the unstable tree, page 3 finds it and 2+3 become a second KSM page,
    // a dup of a new chain. Page 2 is written meanwhile: the second pair fails.
    let (mut sys, mm, a) = setup(&[7; 4], 2);
    sys.during_batch(write_race(mm, a + 2 * PS, 8));
    sys.scan(1000);
    // The kernel would have made no chain: one KSM page, page 2 unstable, page 3 unshared.
    assert_eq!(state(&sys.counters()), (1, 1, 1, 0, 0));
    assert_eq!(ksm_frame(&sys, mm, a + 3 * PS), None);
    sys.ksm().check_invariants().unwrap();
    // The next passes merge page 3 into a new KSM page with... nothing: page 2 differs now,
    // and the first KSM page is full.
    assert!(sys.run_until_stable(2, 20).is_some());
    assert_eq!(state(&sys.counters()), (1, 1, 2, 0, 0));
}

#[test]
fn a_failed_first_pair_turns_the_chain_back_into_a_node() {
    // As above, but page 0 is written: the first pair fails; the second pair's chain is left
    // with one dup, which becomes a regular node again (the kernel never made the chain).
    let (mut sys, mm, a) = setup(&[7; 4], 2);
    sys.during_batch(write_race(mm, a, 8));
    sys.scan(1000);
    assert_eq!(state(&sys.counters()), (1, 1, 1, 0, 0));
    assert_eq!(ksm_frame(&sys, mm, a + PS), None);
    let k = ksm_frame(&sys, mm, a + 2 * PS).unwrap();
    assert_eq!(ksm_frame(&sys, mm, a + 3 * PS), Some(k));
    sys.ksm().check_invariants().unwrap();
}

#[test]
fn a_page_merged_into_a_failed_pairs_ksm_page_keeps_its_merge() {
    // Page 2 merges into the KSM page of pair 0+1 in the same batch; then the pair fails in
    // its second half. Page 2's merge went through: the KSM page stays, with one mapping.
    let (mut sys, mm, a) = setup(&[4, 4, 4], 256);
    sys.during_batch(write_race(mm, a, 1));
    sys.scan(1000);
    assert_eq!(state(&sys.counters()), (1, 0, 1, 0, 0));
    let k = ksm_frame(&sys, mm, a + 2 * PS).unwrap();
    assert_eq!(ksm_frame(&sys, mm, a + PS), None);
    sys.ksm().check_invariants().unwrap();
    // Page 1 (unshared, same contents) joins it on the next pass.
    assert!(sys.run_until_stable(2, 20).is_some());
    assert_eq!(state(&sys.counters()), (1, 1, 1, 0, 0));
    assert_eq!(ksm_frame(&sys, mm, a + PS), Some(k));
}

#[test]
fn a_failed_merge_into_a_stable_ksm_page_leaves_its_node() {
    let (mut sys, mm, a) = setup(&[3, 3, 3, 9], 256);
    assert!(sys.run_full_scans(1));
    assert_eq!(state(&sys.counters()), (1, 2, 1, 0, 0));
    // Page 3 takes the KSM page's contents; after one pass for its checksum to settle it is
    // to be merged into the KSM page, and is written meanwhile.
    sys.write(mm, a + 3 * PS, &[3; PAGE_SIZE]).unwrap();
    assert!(sys.run_full_scans(1));
    sys.during_batch(write_race(mm, a + 3 * PS, 2));
    let b = sys.scan(1000);
    assert_eq!(b.merges_failed, 1);
    // As try_to_merge_with_ksm_page failing: the page is in neither tree.
    assert_eq!(state(&sys.counters()), (1, 2, 0, 0, 0));
    assert_eq!(sys.ksm_stat(mm).ksm_merging_pages, 3);
    assert_eq!(ksm_frame(&sys, mm, a + 3 * PS), None);
    sys.ksm().check_invariants().unwrap();
}

#[test]
fn injected_failures_only_delay_convergence() {
    // Below max_page_sharing every group ends as one KSM page whichever merges failed on
    // the way: the converged counters are the synchronous ones.
    for (seed, n) in [(1u64, 2u32), (2, 3), (3, 5), (4, 8)] {
        let spec = GenSpec {
            size: 600 * 4096,
            zero_pct: 20,
            dup_pct: 50,
            group: 7,
            seed,
        };
        let run = |fail: Option<FailEvery>| {
            let w = Workload::generated(&spec).unwrap();
            let mut sys = SimSystem::new();
            sys.write_knob("use_zero_pages", "1").unwrap();
            sys.write_knob("pages_to_scan", "61").unwrap();
            // Every page visited every pass, so that a quiet pass means no merge was tried
            // or every one tried failed.
            sys.write_knob("smart_scan", "0").unwrap();
            for s in &w.spaces {
                sys.spawn_with_pages(s.pages(), |i, b| s.fill_page(i, b))
                    .unwrap();
            }
            if fail.is_some() {
                sys.defer_merges(fail);
            }
            sys.write_knob("run", "1").unwrap();
            // With failures, one pass may fail every merge it tried: wait for twelve passes
            // in a row that change nothing.
            let (mut quiet, mut prev) = (0, sys.counters().merge_state());
            for _ in 0..300 {
                assert!(sys.run_full_scans(1));
                let now = sys.counters().merge_state();
                quiet = if now == prev { quiet + 1 } else { 0 };
                prev = now;
                if quiet == 12 {
                    break;
                }
            }
            assert_eq!(quiet, 12, "settled");
            sys.ksm().check_invariants().unwrap();
            (sys.counters(), sys.ksm().merges_failed())
        };
        let (want, _) = run(None);
        let (got, failed) = run(Some(FailEvery { n, seed }));
        assert!(failed > 0, "seed {seed}: some merges failed");
        assert_eq!(
            (got.pages_shared, got.pages_sharing, got.ksm_zero_pages),
            (want.pages_shared, want.pages_sharing, want.ksm_zero_pages),
            "seed {seed}, one in {n} failing"
        );
    }
}

#[test]
fn deferring_without_failures_changes_nothing() {
    // Same counters after every batch, merges at once or at the end of each batch, on a
    // workload with chains and zero pages.
    let spec = GenSpec {
        size: 500 * 4096,
        zero_pct: 30,
        dup_pct: 60,
        group: 9,
        seed: 11,
    };
    let w = Workload::generated(&spec).unwrap();
    let load = |defer: bool| {
        let mut sys = SimSystem::new();
        sys.write_knob("use_zero_pages", "1").unwrap();
        sys.write_knob("max_page_sharing", "4").unwrap();
        sys.write_knob("pages_to_scan", "37").unwrap();
        for s in &w.spaces {
            sys.spawn_with_pages(s.pages(), |i, b| s.fill_page(i, b))
                .unwrap();
        }
        if defer {
            sys.defer_merges(None);
        }
        sys.write_knob("run", "1").unwrap();
        sys
    };
    let (mut now, mut later) = (load(false), load(true));
    for _ in 0..200 {
        now.ksmd_step();
        later.ksmd_step();
        assert_eq!(now.counters(), later.counters());
    }
    assert!(now.counters().stable_node_chains > 0);
    later.ksm().check_invariants().unwrap();
}

/// The backend's view of an address space that exits while a scan batch runs: the live
/// backend learns of an exit (a client's connection closing) between two pages of a batch,
/// where the simulator's processes exit only between batches.
struct ExitsMidBatch {
    mem: samepage_sim::SimMemory,
    mm: MmId,
    /// `mm` reads as exiting once the scan was handed this many of its pages.
    after: usize,
    seen: usize,
}

impl samepage_engine::Memory for ExitsMidBatch {
    fn mm_exiting(&self, mm: MmId) -> bool {
        (mm == self.mm && self.seen >= self.after) || self.mem.mm_exiting(mm)
    }
    fn find_vma(&self, mm: MmId, addr: u64) -> Option<samepage_engine::VmaInfo> {
        self.mem.find_vma(mm, addr)
    }
    fn next_page(
        &mut self,
        mm: MmId,
        from: u64,
        end: u64,
    ) -> Option<(u64, samepage_engine::PageRef)> {
        let r = self.mem.next_page(mm, from, end);
        if mm == self.mm && r.is_some() {
            self.seen += 1;
        }
        r
    }
    fn get_page(&mut self, mm: MmId, addr: u64) -> Option<samepage_engine::PageRef> {
        self.mem.get_page(mm, addr)
    }
    fn page_hash(&mut self, frame: FrameId) -> Option<u64> {
        self.mem.page_hash(frame)
    }
    fn pages_identical(&mut self, a: FrameId, b: FrameId) -> bool {
        self.mem.pages_identical(a, b)
    }
    fn ksm_page_alive(&self, frame: FrameId) -> bool {
        self.mem.ksm_page_alive(frame)
    }
    fn merge(
        &mut self,
        mm: MmId,
        addr: u64,
        page: FrameId,
        into: samepage_engine::MergeInto,
    ) -> Result<FrameId, samepage_engine::MergeError> {
        self.mem.merge(mm, addr, page, into)
    }
    fn break_ksm(
        &mut self,
        mm: MmId,
        start: u64,
        end: u64,
    ) -> Result<(), samepage_engine::UnmergeError> {
        self.mem.break_ksm(mm, start, end)
    }
    fn set_mergeable(&mut self, mm: MmId, start: u64, end: u64, on: bool) {
        self.mem.set_mergeable(mm, start, end, on)
    }
    fn ksm_zero_pages(&self, mm: Option<MmId>) -> i64 {
        self.mem.ksm_zero_pages(mm)
    }
    fn take_failed_merges(&mut self, out: &mut Vec<samepage_engine::FailedMerge>) {
        self.mem.take_failed_merges(out)
    }
}

/// Processes A and B with `pages` pages filled with the given bytes each, scanned for four
/// passes with every merge deferred (failing, if `fail`), B exiting once the scan was handed
/// `exit_after` of its pages: the engine, the memory, and A's and B's first addresses.
fn exit_mid_batch(
    pages: [(u64, u8); 2],
    exit_after: usize,
    fail: bool,
) -> (samepage_engine::Ksm, ExitsMidBatch, [(MmId, u64); 2]) {
    use samepage_sim::{Prot, SimMemory, VirtualClock};
    let mut mem = SimMemory::new();
    let mut ksm = samepage_engine::Ksm::new();
    let spaces = pages.map(|(n, fill)| {
        let mm = mem.create_mm();
        let s = mem.mmap(mm, n * PS, Prot::RW, false, 0).unwrap();
        for i in 0..n {
            mem.write(mm, s + i * PS, &[fill; PAGE_SIZE]).unwrap();
        }
        ksm.madvise_mergeable(&mut mem, mm, s, s + n * PS);
        (mm, s)
    });
    ksm.write_knob(&mut mem, "smart_scan", "0").unwrap();
    ksm.write_knob(&mut mem, "run", "1").unwrap();
    mem.defer_merges(fail.then_some(FailEvery { n: 1, seed: 0 }));
    let mut mem = ExitsMidBatch {
        mem,
        mm: spaces[1].0,
        after: exit_after,
        seen: 0,
    };
    let clock = VirtualClock::default();
    while ksm.full_scans() < 4 {
        ksm.ksmd_batch(&mut mem, &clock);
    }
    ksm.check_invariants().unwrap();
    (ksm, mem, spaces)
}

#[test]
fn a_failed_pair_whose_process_exited_before_the_batch_settled_is_forgotten() {
    // Pass 2: process A's page goes into the unstable tree; process B's page finds it and
    // the pair is made, and both merges fail. B exits before the batch settles, so the scan
    // frees B's items first. (With samepage daemon: a client that exec'd; the scan then
    // read a freed item and its thread died.)
    use samepage_engine::Memory;
    for fail in [true, false] {
        let (ksm, mut mem, [(a, at), (b, _)]) = exit_mid_batch([(1, 9), (1, 9)], 2, fail);
        let c = ksm.counters(&mem);
        // A's page: back in the unstable tree, alone, when the merges failed; a KSM page
        // nothing else maps when they went through, as the kernel leaves it.
        let want = if fail { (0, 0, 1) } else { (1, 0, 0) };
        assert_eq!(
            (c.pages_shared, c.pages_sharing, c.pages_unshared),
            want,
            "fail {fail}: {c:?}"
        );
        // A is alone now, with its page ordinary again when the merge failed.
        assert_eq!(ksm.ksm_stat(&mem, b).ksm_rmap_items, 0);
        if fail {
            let page = mem.mem.get_page(a, at).unwrap().frame;
            assert!(!mem.mem.frame_is_ksm(page));
        }
    }
}

#[test]
fn a_pair_inside_a_process_that_exited_before_the_batch_settled_is_forgotten() {
    // Both pages of the pair are B's, and B exits right after the pair is made: the scan
    // frees both items before the batch settles. A's page, alone, is untouched by it.
    for fail in [true, false] {
        // Pass 1 visits B's two pages, pass 2 makes the pair on the second.
        let (ksm, mem, [(a, _), (b, _)]) = exit_mid_batch([(1, 3), (2, 9)], 4, fail);
        let c = ksm.counters(&mem);
        assert_eq!(
            (c.pages_shared, c.pages_sharing, c.pages_unshared),
            (0, 0, 1),
            "fail {fail}: {c:?}"
        );
        assert_eq!(ksm.ksm_stat(&mem, b).ksm_rmap_items, 0);
        assert_eq!(ksm.ksm_stat(&mem, a).ksm_rmap_items, 1);
    }
}
