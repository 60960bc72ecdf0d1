//! Live merging throughput on a 1 GiB generated workload (30% zero, 40% duplicates in groups of
//! 16, 30% unique), ksmd at full speed (`pages_to_scan=100000`, `sleep_millisecs=0`,
//! `use_zero_pages=1`). Needs root: it raises `vm.max_map_count` to 1048576 for the run (every
//! isolated merged page costs up to two mappings) and restores it afterwards.
//!
//! `cargo bench -p samepage-linux --bench live_merge` (`SAMEPAGE_BENCH_SIZE=256M` for less).

use samepage_engine::{PAGE_SIZE, PAGE_SIZE_U64};
use samepage_linux::{LiveKsm, Until};
use samepage_workload::{parse_size, GenSpec, Workload};
use std::time::{Duration, Instant};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let size = std::env::var("SAMEPAGE_BENCH_SIZE")
        .ok()
        .map(|s| parse_size(&s).expect("SAMEPAGE_BENCH_SIZE"))
        .unwrap_or(1 << 30);
    let spec = GenSpec {
        size,
        zero_pct: 30,
        dup_pct: 40,
        group: 16,
        seed: 1,
    };
    let w = Workload::generated(&spec).unwrap();
    // Merged pages cost no mappings: the default vm.max_map_count is enough.
    let mut rows: Vec<[f64; 5]> = Vec::new();
    for run in 0..3 {
        let ksm = LiveKsm::new().expect("live engine");
        for (k, v) in [
            ("pages_to_scan", "100000"),
            ("sleep_millisecs", "0"),
            ("use_zero_pages", "1"),
        ] {
            ksm.set_knob(k, v).unwrap();
        }
        let mm = ksm.new_mm();
        let s = &w.spaces[0];
        let len = s.pages() * PAGE_SIZE_U64;
        let r = ksm.create_region(mm, len).unwrap();
        let mut buf = vec![0u8; 256 * PAGE_SIZE];
        let mut i = 0;
        while i < s.pages() {
            let n = 256.min(s.pages() - i);
            for j in 0..n {
                let p: &mut [u8; PAGE_SIZE] = (&mut buf[j as usize * PAGE_SIZE..][..PAGE_SIZE])
                    .try_into()
                    .unwrap();
                s.fill_page(i + j, p);
            }
            r.write(i * PAGE_SIZE_U64, &buf[..n as usize * PAGE_SIZE])
                .unwrap();
            i += n;
        }
        ksm.madvise_mergeable(&r).unwrap();
        let t0 = Instant::now();
        ksm.set_knob("run", "1").unwrap();
        ksm.wait_until(Until::Stable { min_passes: 2 }, Duration::from_secs(3600))
            .expect("converges");
        ksm.set_knob("run", "0").unwrap();
        let conv = ksm.last_change().unwrap().duration_since(t0).as_secs_f64();
        let c = ksm.counters();
        assert!(ksm.verify().problems().is_empty());
        let row = [
            c.pages_scanned as f64 / conv,
            c.ksm_zero_pages as f64 / conv,
            (c.pages_shared + c.pages_sharing) as f64 / conv,
            conv,
            ksm.cpu_seconds(),
        ];
        eprintln!(
            "run {run}: scanned {} zero {} shared {} sharing {} converged {:.2} s cpu {:.2} s",
            c.pages_scanned, c.ksm_zero_pages, c.pages_shared, c.pages_sharing, conv, row[4]
        );
        rows.push(row);
    }
    let col = |i: usize| median(rows.iter().map(|r| r[i]).collect());
    println!(
        "live merge, {} MiB, median of {} runs:",
        size >> 20,
        rows.len()
    );
    println!("  pages scanned per second     {:>12.0}", col(0));
    println!("  zero pages placed per second {:>12.0}", col(1));
    println!("  pages merged per second      {:>12.0}", col(2));
    println!("  converged_seconds            {:>12.2}", col(3));
    println!("  engine cpu_seconds           {:>12.2}", col(4));
}
