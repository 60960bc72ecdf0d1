//! What the engine's bookkeeping costs per page it tracks: `Ksm::metadata_bytes() /
//! Ksm::rmap_items()`, the `engine_bytes_per_rmap_item` that `samepage simulate --json`
//! reports, on generated workloads run to convergence as `samepage simulate` runs them.
//!
//! The target (issue 12, item 7) is at most 16 bytes per tracked page on every workload,
//! memory that is 80% zero pages in scattered runs included. Not met, and so not held here:
//! memory where the engine tracks one page in 16 or fewer (a chunk of 256 pages costs about
//! 88 bytes however few it tracks: 16.6 bytes an item at one in 16, 99 at one in 256), and
//! `merge_across_nodes=0` over several NUMA nodes (each node's unstable tree is sized for
//! all nodes' items: 17.7 bytes an item on 4 nodes, 25.7 on 8). Duplicates in small groups
//! are the other exception: each KSM page costs a stable node (its frame, its content's 64-bit hash,
//! its list's head and length: 28 bytes) and a slot in each of its two indexes (6.25 bytes
//! each at 80%), which pairs share between two pages and groups of 16 between sixteen; their
//! bound here is what they cost now, so that it cannot grow unnoticed.

use samepage_sim::SimSystem;
use samepage_workload::{GenSpec, Workload};

const MIB: u64 = 1 << 20;

/// Engine bytes per rmap item once `specs` (one address space each) have converged.
fn bytes_per_item(specs: &[GenSpec], use_zero_pages: bool) -> (f64, u64) {
    let (bytes, items, _) = converged(specs, use_zero_pages);
    (
        if items == 0 {
            // Nothing tracked: what is left must be next to nothing, not a ratio.
            assert!(bytes < 4096.0, "{bytes} engine bytes for no rmap item");
            0.0
        } else {
            bytes / items as f64
        },
        items,
    )
}

/// The engine's bytes and rmap items once `specs` have converged, and the system.
fn converged(specs: &[GenSpec], use_zero_pages: bool) -> (f64, u64, SimSystem) {
    let mut sys = SimSystem::new();
    for spec in specs {
        let w = Workload::generated(spec).unwrap();
        for s in &w.spaces {
            sys.spawn_with_pages(s.pages(), |i, buf| s.fill_page(i, buf))
                .unwrap();
        }
    }
    for (k, v) in [
        ("pages_to_scan", "100000"),
        ("sleep_millisecs", "0"),
        ("use_zero_pages", if use_zero_pages { "1" } else { "0" }),
        ("run", "1"),
    ] {
        sys.write_knob(k, v).unwrap();
    }
    sys.run_until_stable(2, 100).expect("converges");
    let items = sys.ksm().rmap_items();
    let bytes = sys.ksm().metadata_bytes() as f64;
    (bytes, items, sys)
}

#[test]
fn run_2_gives_the_bookkeeping_back() {
    let (bytes, items, mut sys) = converged(&[spec(64 * MIB, 30, 40, 16, 1)], true);
    assert!(items > 0 && bytes > 0.0);
    sys.write_knob("run", "2").unwrap();
    assert_eq!(sys.ksm().rmap_items(), 0);
    let left = sys.ksm().metadata_bytes();
    assert!(
        left < 4096,
        "{left} engine bytes after run=2 (there were {bytes} for {items} items)"
    );
}

fn spec(size: u64, zero_pct: u32, dup_pct: u32, group: u32, seed: u64) -> GenSpec {
    GenSpec {
        size,
        zero_pct,
        dup_pct,
        group,
        seed,
    }
}

#[test]
fn at_most_16_bytes_per_tracked_page() {
    let workloads = [
        ("all zero", vec![spec(64 * MIB, 100, 0, 16, 1)]),
        ("all unique", vec![spec(64 * MIB, 0, 0, 16, 1)]),
        ("duplicates in 16s", vec![spec(64 * MIB, 0, 100, 16, 1)]),
        ("duplicates in 8s", vec![spec(64 * MIB, 0, 100, 8, 1)]),
        ("30% zero, 40% dup", vec![spec(64 * MIB, 30, 40, 16, 1)]),
        ("80% zero, 10% dup", vec![spec(64 * MIB, 80, 10, 16, 1)]),
        (
            "80% zero, 10% dup in pairs",
            vec![spec(64 * MIB, 80, 10, 2, 1)],
        ),
        (
            "16 address spaces of 30% zero, 40% dup",
            (1..=16)
                .map(|seed| spec(4 * MIB, 30, 40, 16, seed))
                .collect(),
        ),
    ];
    for use_zero_pages in [true, false] {
        for (name, specs) in &workloads {
            if use_zero_pages && *name == "80% zero, 10% dup in pairs" {
                // With the zero pages out of the way, pairs are a third of the tracked
                // pages: see the test of small groups.
                continue;
            }
            let (b, items) = bytes_per_item(specs, use_zero_pages);
            assert!(
                b <= 16.0,
                "{name}, use_zero_pages={use_zero_pages}: {b:.2} bytes per rmap item ({items} items)"
            );
        }
    }
}

#[test]
fn small_groups_of_duplicates_cost_what_their_ksm_pages_do() {
    // (workload, bytes per rmap item at most), with use_zero_pages=1: about 9.3 bytes an
    // item plus 41 a KSM page (node and index slots), which the group shares.
    let cases = [
        ("pairs", vec![spec(64 * MIB, 0, 100, 2, 1)], 32.5),
        (
            "80% zero, 10% dup in pairs",
            vec![spec(64 * MIB, 80, 10, 2, 1)],
            24.5,
        ),
        ("duplicates in 4s", vec![spec(64 * MIB, 0, 100, 4, 1)], 21.5),
        (
            "4 address spaces with the same unique pages",
            vec![spec(16 * MIB, 0, 0, 16, 1); 4],
            21.5,
        ),
    ];
    for (name, specs, bound) in cases {
        let (b, items) = bytes_per_item(&specs, true);
        assert!(
            b <= bound,
            "{name}: {b:.2} bytes per rmap item ({items} items), more than {bound}"
        );
    }
}
