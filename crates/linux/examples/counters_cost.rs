//! What a reading of samepage's counters costs: merges `SIZE` (default 1 GiB) of the mixed
//! workload (30% zero, 40% duplicates in groups of 16) and times 20 readings of
//! `LiveKsm::counters`, whose `ksm_zero_pages` walks the page tables. Prints the fastest,
//! the median and the slowest in milliseconds. Needs root, as `first_writes`.
//!
//! `cargo run --release -p samepage-linux --example counters_cost [SIZE]`

use samepage_linux::LiveKsm;
use samepage_workload::{parse_size, GenSpec, Workload};
use std::time::{Duration, Instant};

fn main() {
    let size = std::env::args()
        .nth(1)
        .map(|a| parse_size(&a).expect("SIZE such as 1G"))
        .unwrap_or(1 << 30);
    let ksm = match LiveKsm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("counters_cost: {e}");
            std::process::exit(69);
        }
    };
    let w = Workload::generated(&GenSpec {
        size,
        zero_pct: 30,
        dup_pct: 40,
        group: 16,
        seed: 1,
    })
    .unwrap();
    let s = &w.spaces[0];
    let r = ksm.create_region(ksm.new_mm(), s.pages() * 4096).unwrap();
    let mut page = [0u8; 4096];
    for i in 0..s.pages() {
        s.fill_page(i, &mut page);
        r.write(i * 4096, &page).unwrap();
    }
    for (k, v) in [
        ("pages_to_scan", "100000"),
        ("sleep_millisecs", "0"),
        ("use_zero_pages", "1"),
    ] {
        ksm.set_knob(k, v).unwrap();
    }
    ksm.madvise_mergeable(&r).unwrap();
    ksm.set_knob("run", "1").unwrap();
    assert!(ksm.wait_full_scans(3, Duration::from_secs(300)));
    ksm.set_knob("run", "0").unwrap();
    let mut ms: Vec<f64> = (0..20)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(ksm.counters());
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    println!(
        "{} pages, ksm_zero_pages {}: a reading of the counters takes {:.2} / {:.2} / {:.2} ms (min / median / max)",
        s.pages(),
        ksm.counters().ksm_zero_pages,
        ms[0],
        ms[10],
        ms[19]
    );
}
