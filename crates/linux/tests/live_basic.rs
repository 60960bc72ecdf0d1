//! The live backend on real memory: merges, zero pages, copy-on-write, unmerge.
//! Needs root (or /dev/userfaultfd access), as CI has.

use samepage_linux::{LiveKsm, PageKind};
use std::time::Duration;

const PS: u64 = 4096;

fn page(v: u8, i: u64) -> [u8; 4096] {
    let mut p = [v; 4096];
    if v == 0xee {
        p[..8].copy_from_slice(&i.to_le_bytes()); // unique
    }
    p
}

#[test]
fn merges_duplicates_and_places_zero_pages() {
    let ksm = LiveKsm::new().expect("live engine");
    let mm = ksm.new_mm();
    let n = 64u64;
    let r = ksm.create_region(mm, n * PS).unwrap();
    let want: Vec<[u8; 4096]> = (0..n)
        .map(|i| match i % 4 {
            0 => page(0, i),
            1 | 2 => page(0xcf, i),
            _ => page(0xee, i),
        })
        .collect();
    for (i, p) in want.iter().enumerate() {
        r.write(i as u64 * PS, p).unwrap();
    }
    ksm.set_knob("use_zero_pages", "1").unwrap();
    ksm.set_knob("pages_to_scan", "1000").unwrap();
    ksm.set_knob("sleep_millisecs", "0").unwrap();
    ksm.madvise_mergeable(&r).unwrap();
    ksm.set_knob("run", "1").unwrap();
    assert!(ksm.wait_full_scans(3, Duration::from_secs(30)));
    ksm.set_knob("run", "0").unwrap();
    let c = ksm.counters();
    assert_eq!(
        (c.pages_shared, c.pages_sharing, c.ksm_zero_pages),
        (1, 31, 16),
        "{c:?}"
    );
    assert_eq!(ksm.ksm_stat(mm).ksm_zero_pages, 16);
    assert_eq!(ksm.ksm_stat(mm).ksm_merging_pages, 32);
    let v = ksm.verify();
    assert!(v.problems().is_empty(), "{:?}", v.problems());
    assert_eq!(v.merged_pages, 32);
    assert_eq!(v.canonical_pages, 1);
    assert_eq!(
        ksm.page(r.start() + PS).kind,
        PageKind::Merged { canonical: 0 }
    );
    assert!(
        !ksm.page(r.start() + PS).present,
        "a merged page has no memory of its own"
    );
    assert_eq!(ksm.page(r.start()).kind, PageKind::KsmZero);
    let mut buf = [0u8; 4096];
    for (i, p) in want.iter().enumerate() {
        r.peek_page(i as u64 * PS, &mut buf).unwrap();
        assert!(buf == *p, "page {i} changed");
    }
    assert!(
        ksm.verify().problems().is_empty(),
        "peeking unmerged nothing"
    );
    // A write to a placed zero page uncounts it at once; a write to a merged page copies it.
    r.write(0, &[1]).unwrap();
    assert_eq!(ksm.counters().ksm_zero_pages, 15);
    r.write(PS + 100, &[7]).unwrap();
    r.read(PS, &mut buf).unwrap();
    let mut w = want[1];
    w[100] = 7;
    assert!(buf == w);
    r.read(2 * PS, &mut buf).unwrap();
    assert!(
        buf == want[2],
        "the other page of the merged content is unchanged"
    );
    assert_eq!(ksm.stats().agent.cow_merged, 1);
    assert_eq!(ksm.stats().agent.read_merged, 1);
    assert!(ksm.verify().problems().is_empty());
}

/// Mappings of this process now.
fn mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count()
}

#[test]
fn merges_more_pages_than_the_mapping_limit_allows_mappings() {
    // Every merged page costs no mapping: more pages merge than vm.max_map_count at its
    // default (65530, the limit here and in CI) allows mappings, and the process's
    // mappings barely change.
    let limit: u64 = 65530;
    let n = limit + 4096;
    let group = 64;
    let ksm = LiveKsm::new().expect("live engine");
    let r = ksm.create_region(ksm.new_mm(), n * PS).unwrap();
    for i in 0..n {
        let mut p = [0u8; 4096];
        p[..8].copy_from_slice(&(i / group + 1).to_le_bytes());
        r.write(i * PS, &p).unwrap();
    }
    for (k, v) in [("pages_to_scan", "100000"), ("sleep_millisecs", "0")] {
        ksm.set_knob(k, v).unwrap();
    }
    ksm.madvise_mergeable(&r).unwrap();
    let before = mappings();
    ksm.set_knob("run", "1").unwrap();
    assert!(ksm.wait_full_scans(3, Duration::from_secs(120)));
    ksm.set_knob("run", "0").unwrap();
    let c = ksm.counters();
    let groups = n.div_ceil(group);
    assert_eq!(c.pages_shared, groups, "{c:?}");
    assert_eq!(c.pages_sharing, n - groups, "{c:?}");
    assert!(
        c.pages_sharing > limit / 2,
        "{c:?} at vm.max_map_count {limit}"
    );
    let after = mappings();
    assert!(
        after <= before + 16,
        "{before} mappings before merging, {after} after"
    );
    let mut buf = [0u8; 4096];
    for i in (0..n).step_by(997) {
        r.peek_page(i * PS, &mut buf).unwrap();
        assert_eq!(
            u64::from_le_bytes(buf[..8].try_into().unwrap()),
            i / group + 1
        );
    }
    assert!(ksm.verify().problems().is_empty());
}

#[test]
fn a_walk_through_fresh_memory_faults_once_a_window_and_leaves_merged_pages_alone() {
    let ksm = LiveKsm::new().expect("live engine");
    let mm = ksm.new_mm();
    let n = 4096u64;
    let r = ksm.create_region(mm, n * PS).unwrap();
    // Two runs of 16 duplicates amid memory never touched; merged, they are holes too.
    let dups: Vec<u64> = (1000..1016).chain(3000..3016).collect();
    for &i in &dups {
        r.write(i * PS, &page(0xcf, i)).unwrap();
    }
    ksm.set_knob("use_zero_pages", "1").unwrap();
    ksm.set_knob("pages_to_scan", "10000").unwrap();
    ksm.set_knob("sleep_millisecs", "0").unwrap();
    ksm.madvise_mergeable(&r).unwrap();
    ksm.set_knob("run", "1").unwrap();
    assert!(ksm.wait_full_scans(3, Duration::from_secs(30)));
    ksm.set_knob("run", "0").unwrap();
    let c = ksm.counters();
    assert_eq!((c.pages_shared, c.pages_sharing), (1, 31), "{c:?}");
    let before = ksm.stats().agent;
    // One thread reads every page in order, as a program walking a new allocation does.
    let word = u64::from_ne_bytes([0xcf; 8]);
    for i in 0..n {
        let (v, _) = r.timed_load(i * PS + 8).unwrap();
        let want = if dups.contains(&i) { word } else { 0 };
        assert_eq!(v, want, "page {i}");
    }
    let after = ksm.stats().agent;
    let fresh = n - dups.len() as u64;
    let faults = after.missing_faults - before.missing_faults;
    let ahead = after.zero_filled_ahead - before.zero_filled_ahead;
    assert_eq!(
        faults + ahead,
        fresh,
        "each fresh page faulted or was filled ahead"
    );
    // Windows double from one page up to 512: 1 + 2 + ... + 512 = 1023 pages in 10 faults;
    // each run of merged pages starts a new stream.
    assert!(
        faults <= 3 * 10 + 12,
        "{faults} faults for {fresh} fresh pages"
    );
    // Each run of merged pages is a stream of its own: its pages are copied in by a read
    // fault or ahead of one (windows of 1, 2, 4 and 8 pages: 5 faults for 16 pages).
    let reads = after.read_merged - before.read_merged;
    let copied = after.copied_ahead - before.copied_ahead;
    assert_eq!(reads + copied, dups.len() as u64);
    assert!(reads <= 2 * 5, "{reads} read faults on 32 merged pages");
    // The zero page given ahead is no page KSM placed, and costs no memory.
    assert_eq!(ksm.counters().ksm_zero_pages, 0);
    assert_eq!(ksm.ksm_stat(mm).ksm_zero_pages, 0);
    // Writes land on it as on any page.
    for i in (0..n).step_by(7) {
        r.timed_store(i * PS + 16, i + 1).unwrap();
    }
    let mut buf = [0u8; 4096];
    for i in (0..n).step_by(7) {
        r.read(i * PS, &mut buf).unwrap();
        assert_eq!(u64::from_ne_bytes(buf[16..24].try_into().unwrap()), i + 1);
        let fill = if dups.contains(&i) { 0xcf } else { 0 };
        assert!(buf[..16].iter().all(|&b| b == fill), "page {i}");
    }
    assert!(
        ksm.verify().problems().is_empty(),
        "{:?}",
        ksm.verify().problems()
    );
}

#[test]
fn writes_to_merged_pages_in_a_row_fault_once_a_window() {
    let ksm = LiveKsm::new().expect("live engine");
    let mm = ksm.new_mm();
    // Pages 0..1024 all merged (16 contents); from 1024 on, merged pages amid unique ones.
    let n = 2048u64;
    let r = ksm.create_region(mm, n * PS).unwrap();
    let content = |i: u64| {
        if i >= 1024 && i % 2 == 1 {
            page(0xee, i)
        } else {
            let mut p = [0xcf; 4096];
            p[..8].copy_from_slice(&(i % 16).to_le_bytes());
            p
        }
    };
    for i in 0..n {
        r.write(i * PS, &content(i)).unwrap();
    }
    for (k, v) in [("pages_to_scan", "10000"), ("sleep_millisecs", "0")] {
        ksm.set_knob(k, v).unwrap();
    }
    ksm.madvise_mergeable(&r).unwrap();
    ksm.set_knob("run", "1").unwrap();
    assert!(ksm.wait_full_scans(3, Duration::from_secs(30)));
    ksm.set_knob("run", "0").unwrap();
    let merged = 1024 + 512;
    let c = ksm.counters();
    assert_eq!(c.pages_shared + c.pages_sharing, merged, "{c:?}");
    let before = ksm.stats().agent;
    // One thread writes every page in order, as a program rewriting a buffer does.
    for i in 0..n {
        r.timed_store(i * PS + 16, i + 1).unwrap();
    }
    let after = ksm.stats().agent;
    let writes = after.cow_merged - before.cow_merged;
    let copied = after.copied_ahead - before.copied_ahead;
    assert_eq!(
        writes + copied,
        merged,
        "each merged page faulted or was copied ahead"
    );
    // Windows of 1, 2, ... 64 pages, then 64 at a time: 7 faults for the first 127 pages,
    // 15 for the rest of the first half, 16 for the second (its windows span as many
    // pages, half of them merged). 37 here; without copies ahead, 1536.
    assert!(
        writes <= 40,
        "{writes} write faults on {merged} merged pages"
    );
    let mut buf = [0u8; 4096];
    for i in 0..n {
        r.read(i * PS, &mut buf).unwrap();
        let mut want = content(i);
        want[16..24].copy_from_slice(&(i + 1).to_ne_bytes());
        assert!(buf == want, "page {i}");
    }
    // Every page is unique now: the engine, told of each copy, merges none again.
    ksm.set_knob("run", "1").unwrap();
    assert!(ksm.wait_full_scans(2, Duration::from_secs(30)));
    ksm.set_knob("run", "0").unwrap();
    let c = ksm.counters();
    assert_eq!((c.pages_shared, c.pages_sharing), (0, 0), "{c:?}");
    assert!(
        ksm.verify().problems().is_empty(),
        "{:?}",
        ksm.verify().problems()
    );
}

#[test]
fn pages_read_again_and_again_merge_again_every_time() {
    // Every read of a merged page gives a private copy; the next scans merge it again. Smart
    // scan must not take such a page for one that keeps failing to merge: skipped in other
    // passes than its twin, it would never meet it in the unstable tree again (seen with two
    // guests re-reading their data: merging stopped after a few rounds).
    let ksm = LiveKsm::new().expect("live engine");
    let mm = ksm.new_mm();
    let n = 1024u64;
    let r = ksm.create_region(mm, n * PS).unwrap();
    for i in 0..n {
        // Pairs: page i and page i + n/2 hold the same bytes.
        r.write(i * PS, &page(0xee, i % (n / 2))).unwrap();
    }
    for (k, v) in [
        ("pages_to_scan", "10000"),
        ("sleep_millisecs", "0"),
        ("smart_scan", "1"),
    ] {
        ksm.set_knob(k, v).unwrap();
    }
    ksm.madvise_mergeable(&r).unwrap();
    ksm.set_knob("run", "1").unwrap();
    // Every page a hole standing for a canonical page: merged, not only counted so (the
    // counters follow the scan).
    let merged = || {
        (0..n)
            .filter(|&i| matches!(ksm.page(r.start() + i * PS).kind, PageKind::Merged { .. }))
            .count() as u64
    };
    for round in 0..12 {
        // Full scans are events: wait for them, up to 200 of them a round.
        let mut scans = 0;
        while merged() != n && scans < 200 {
            assert!(ksm.wait_full_scans(1, Duration::from_secs(30)));
            scans += 1;
        }
        assert_eq!(merged(), n, "round {round}, after {scans} full scans");
        let copies = |s: samepage_linux::AgentStats| s.read_merged + s.copied_ahead;
        let reads = copies(ksm.stats().agent);
        for i in 0..n {
            let (v, _) = r.timed_load(i * PS).unwrap();
            assert_eq!(v, i % (n / 2), "page {i}");
        }
        // Each read copied its page, or a fault before it did (copied ahead), a few twice
        // (the faults all come from this thread; the scan, running meanwhile, likely merged
        // the page again before the retried read).
        assert!(
            copies(ksm.stats().agent) - reads >= n,
            "each read copied its page"
        );
    }
    assert!(ksm.wait_full_scans(2, Duration::from_secs(30)));
    ksm.set_knob("run", "0").unwrap();
    let c = ksm.counters();
    assert_eq!((c.pages_shared, c.pages_sharing), (n / 2, n / 2), "{c:?}");
    assert!(ksm.verify().problems().is_empty());
}

#[test]
fn fault_around_stops_at_the_end_of_the_applications_mapping() {
    let ksm = LiveKsm::new().expect("live engine");
    let mm = ksm.new_mm();
    let n = 256u64;
    let r = ksm.create_region(mm, n * PS).unwrap();
    ksm.madvise_mergeable(&r).unwrap();
    // The application makes pages 100 on read-only: the region spans two mappings, and a
    // window that crosses from one into the other cannot be filled in one call.
    // SAFETY: pages of a region this test owns, which it only reads from now on.
    let rc = unsafe {
        libc::mprotect(
            (r.start() + 100 * PS) as *mut libc::c_void,
            ((n - 100) * PS) as usize,
            libc::PROT_READ,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    let before = ksm.stats().agent;
    for i in 0..n {
        assert_eq!(r.timed_load(i * PS + 8).unwrap().0, 0, "page {i}");
    }
    let after = ksm.stats().agent;
    let faults = after.missing_faults - before.missing_faults;
    let ahead = after.zero_filled_ahead - before.zero_filled_ahead;
    assert_eq!(faults + ahead, n);
    // Windows of 1, 2, ... 32 pages to page 63, then what fits before page 100, then the
    // rest; a window that failed whole would cost a fault a page from 64 to 100.
    assert!(faults <= 12, "{faults} faults for {n} pages");
}
