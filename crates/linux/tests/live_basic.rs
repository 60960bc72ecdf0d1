//! The live backend on real memory: merges, zero pages, copy-on-write, unmerge.
//! Needs root (or /dev/userfaultfd access), as CI has.

use samepage_linux::LiveKsm;
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
    let a = ksm.create_region(mm, n * PS).unwrap();
    let want: Vec<[u8; 4096]> = (0..n)
        .map(|i| match i % 4 {
            0 => page(0, i),
            1 | 2 => page(0xcf, i),
            _ => page(0xee, i),
        })
        .collect();
    for (i, p) in want.iter().enumerate() {
        ksm.write(a + i as u64 * PS, p).unwrap();
    }
    ksm.set_knob("use_zero_pages", "1").unwrap();
    ksm.set_knob("pages_to_scan", "1000").unwrap();
    ksm.set_knob("sleep_millisecs", "0").unwrap();
    ksm.madvise_mergeable(mm, a, n * PS).unwrap();
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
    let mut buf = [0u8; 4096];
    for (i, p) in want.iter().enumerate() {
        ksm.read(a + i as u64 * PS, &mut buf).unwrap();
        assert!(buf == *p, "page {i} changed");
    }
    // A write to a placed zero page uncounts it at once; a write to a merged page copies it.
    ksm.write(a, &[1]).unwrap();
    assert_eq!(ksm.counters().ksm_zero_pages, 15);
    ksm.write(a + PS + 100, &[7]).unwrap();
    ksm.read(a + PS, &mut buf).unwrap();
    let mut w = want[1];
    w[100] = 7;
    assert!(buf == w);
    ksm.read(a + 2 * PS, &mut buf).unwrap();
    assert!(
        buf == want[2],
        "the other mapping of the merged page is unchanged"
    );
    assert_eq!(ksm.stats().cow_zero, 1);
    assert_eq!(ksm.stats().cow_merged, 1);
    assert!(ksm.verify().problems().is_empty());
}

/// Mappings of this process inside `[start, end)`.
fn maps_in(start: u64, end: u64) -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| {
            let (s, e) = l
                .split_whitespace()
                .next()
                .unwrap()
                .split_once('-')
                .unwrap();
            let (s, e) = (
                u64::from_str_radix(s, 16).unwrap(),
                u64::from_str_radix(e, 16).unwrap(),
            );
            s >= start && e <= end
        })
        .count()
}

/// Runs of duplicates (the same pages in the same order in two address spaces, as guests
/// share an OS image) get consecutive offsets in the store, so their mappings coalesce: the
/// mapping count grows by a handful, not by two per merged page.
#[test]
fn adjacent_duplicates_coalesce_into_few_mappings() {
    let ksm = LiveKsm::new().expect("live engine");
    ksm.set_knob("pages_to_scan", "10000").unwrap();
    ksm.set_knob("sleep_millisecs", "0").unwrap();
    let n = 256u64;
    let (m1, m2) = (ksm.new_mm(), ksm.new_mm());
    let a = ksm.create_region(m1, n * PS).unwrap();
    let b = ksm.create_region(m2, n * PS).unwrap();
    for i in 0..n {
        let p = page(0xee, i);
        ksm.write(a + i * PS, &p).unwrap();
        ksm.write(b + i * PS, &p).unwrap();
    }
    ksm.madvise_mergeable(m1, a, n * PS).unwrap();
    ksm.madvise_mergeable(m2, b, n * PS).unwrap();
    ksm.set_knob("run", "1").unwrap();
    assert!(ksm.wait_full_scans(3, Duration::from_secs(30)));
    ksm.set_knob("run", "0").unwrap();
    let c = ksm.counters();
    assert_eq!((c.pages_shared, c.pages_sharing), (n, n));
    // Each region was one mapping; now a few, not hundreds.
    let (ma, mb) = (maps_in(a, a + n * PS), maps_in(b, b + n * PS));
    assert!(
        ma + mb <= 8,
        "{ma} + {mb} mappings for {} merged pages",
        2 * n
    );
    assert!(ksm.verify().problems().is_empty());
}
