//! First writes to merged pages, one after another, as one application thread makes them:
//! merges `PAGES` pages (default 32768, 64 contents) and times a store into each, in
//! address order. Prints the mean, p50, p90 and p99 in microseconds, and how many writes
//! faulted (the others found their page copied ahead of them). Needs a userfaultfd samepage may
//! use (root, as CI has). BENCHMARKS.md quotes it.
//!
//! `cargo run --release -p samepage-linux --example first_writes [PAGES]`

use samepage_linux::LiveKsm;
use std::time::Duration;

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("PAGES is a number"))
        .unwrap_or(32768);
    let ksm = match LiveKsm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("first_writes: {e}");
            std::process::exit(69);
        }
    };
    let r = ksm.create_region(ksm.new_mm(), n * 4096).unwrap();
    for i in 0..n {
        let mut p = [0u8; 4096];
        p[..8].copy_from_slice(&(i % 64 + 1).to_le_bytes());
        r.write(i * 4096, &p).unwrap();
    }
    for (k, v) in [("pages_to_scan", "100000"), ("sleep_millisecs", "0")] {
        ksm.set_knob(k, v).unwrap();
    }
    ksm.madvise_mergeable(&r).unwrap();
    ksm.set_knob("run", "1").unwrap();
    assert!(ksm.wait_full_scans(3, Duration::from_secs(120)));
    ksm.set_knob("run", "0").unwrap();
    let before = ksm.stats().agent;
    let mut us: Vec<f64> = (0..n)
        .map(|i| r.timed_store(i * 4096 + 8, 7).unwrap().as_secs_f64() * 1e6)
        .collect();
    let faults = ksm.stats().agent.cow_merged - before.cow_merged;
    let mean = us.iter().sum::<f64>() / us.len() as f64;
    us.sort_by(f64::total_cmp);
    let q = |p: f64| us[((us.len() as f64 * p) as usize).min(us.len() - 1)];
    println!(
        "{n} first writes to merged pages (µs): mean {mean:.1} p50 {:.1} p90 {:.1} p99 {:.1}; {faults} faulted",
        q(0.5),
        q(0.9),
        q(0.99)
    );
}
