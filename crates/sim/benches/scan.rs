//! Scan throughput of the engine on the simulator: 1 GiB generated workloads, ksmd at full
//! speed (`pages_to_scan=100000`, `sleep_millisecs=0`), timed from `run=1` until the counters
//! are stable (loading the workload is not timed). The counter is pages scanned.
//!
//! `cargo bench -p samepage-sim --bench scan`

use divan::counter::ItemsCount;
use divan::Bencher;
use samepage_engine::{PAGE_SIZE, PAGE_SIZE_U64};
use samepage_sim::SimSystem;
use samepage_workload::{GenSpec, Workload};

fn main() {
    divan::main();
}

const GIB: u64 = 1 << 30;

fn load(spec: &GenSpec) -> SimSystem {
    let w = Workload::generated(spec).unwrap();
    let mut sys = SimSystem::new();
    for s in &w.spaces {
        sys.spawn_with_pages(s.pages(), |i, buf| s.fill_page(i, buf))
            .unwrap();
    }
    for (k, v) in [
        ("pages_to_scan", "100000"),
        ("sleep_millisecs", "0"),
        ("use_zero_pages", "1"),
    ] {
        sys.write_knob(k, v).unwrap();
    }
    sys
}

fn converge(sys: &mut SimSystem) -> u64 {
    sys.write_knob("run", "1").unwrap();
    sys.run_until_stable(2, 100).expect("converges");
    sys.counters().pages_scanned
}

fn bench_spec(bencher: Bencher, spec: GenSpec) {
    // The number of pages a run scans is deterministic: learn it once for the counter.
    let scanned = converge(&mut load(&spec));
    bencher
        .counter(ItemsCount::new(scanned))
        .with_inputs(|| load(&spec))
        .bench_local_values(|mut sys| {
            converge(&mut sys);
            sys
        });
}

/// Three full scans after convergence: every checksum is cached in the simulated frames,
/// so this is the engine's own cost per visited page.
fn bench_steady(bencher: Bencher, spec: GenSpec) {
    let prepare = || {
        let mut sys = load(&spec);
        converge(&mut sys);
        sys
    };
    let mut probe = prepare();
    let before = probe.counters().pages_scanned;
    probe.run_full_scans(3);
    let scanned = probe.counters().pages_scanned - before;
    bencher
        .counter(ItemsCount::new(scanned))
        .with_inputs(prepare)
        .bench_local_values(|mut sys| {
            sys.run_full_scans(3);
            sys
        });
}

const MIXED: GenSpec = GenSpec {
    size: GIB,
    zero_pct: 30,
    dup_pct: 40,
    group: 16,
    seed: 1,
};
const UNIQUE: GenSpec = GenSpec {
    size: GIB,
    zero_pct: 0,
    dup_pct: 0,
    group: 2,
    seed: 1,
};
const ZERO: GenSpec = GenSpec {
    size: GIB,
    zero_pct: 100,
    dup_pct: 0,
    group: 2,
    seed: 1,
};

/// From `run=1` to converged. 30% zero, 40% duplicates in groups of 16, 30% unique.
#[divan::bench(sample_count = 3, sample_size = 1)]
fn converge_mixed_1gib(bencher: Bencher) {
    bench_spec(bencher, MIXED);
}

/// From `run=1` to converged; every page unique.
#[divan::bench(sample_count = 3, sample_size = 1)]
fn converge_unique_1gib(bencher: Bencher) {
    bench_spec(bencher, UNIQUE);
}

/// From `run=1` to converged; every page zero-filled.
#[divan::bench(sample_count = 3, sample_size = 1)]
fn converge_zero_1gib(bencher: Bencher) {
    bench_spec(bencher, ZERO);
}

/// Steady state on the converged mixed workload.
#[divan::bench(sample_count = 3, sample_size = 1)]
fn steady_mixed_1gib(bencher: Bencher) {
    bench_steady(bencher, MIXED);
}

/// Steady state on the all-unique workload (smart scan skips most visits).
#[divan::bench(sample_count = 3, sample_size = 1)]
fn steady_unique_1gib(bencher: Bencher) {
    bench_steady(bencher, UNIQUE);
}

/// XXH64 of one 4 KiB page, the checksum every first visit of a page pays.
#[divan::bench]
fn xxh64_page(bencher: Bencher) {
    let page = [0x5au8; PAGE_SIZE];
    bencher
        .counter(ItemsCount::new(1usize))
        .bench(|| samepage_engine::page_hash(divan::black_box(&page)));
}

/// XXH64 of every page of 1 GiB, each page once: the cold-memory cost a first full scan pays.
#[divan::bench(sample_count = 5, sample_size = 1)]
fn xxh64_cold_1gib(bencher: Bencher) {
    let pages = vec![[0x5au8; PAGE_SIZE]; (GIB / PAGE_SIZE_U64) as usize];
    bencher
        .counter(ItemsCount::new(pages.len()))
        .bench_local(|| {
            let mut acc = 0u64;
            for p in &pages {
                acc ^= samepage_engine::page_hash(divan::black_box(p));
            }
            acc
        });
}
