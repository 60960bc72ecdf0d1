//! Memory read again and again: `PAIRS` pairs of identical pages merge, then every page is
//! read (each read of a merged page gets a private copy) between rounds of scans, `ROUNDS`
//! times. Prints the counters before each round's reads: a page copied by a read should
//! merge again, round after round, as under the kernel (whose KSM pages stay mapped for
//! reads). Needs root (or /dev/userfaultfd access).
//!
//! ```text
//! cargo run --release -p samepage-linux --example reread -- [PAIRS [ROUNDS [SMART_SCAN]]]
//! ```

use samepage_linux::LiveKsm;
use std::time::Duration;

fn arg(i: usize, default: u64) -> u64 {
    std::env::args()
        .nth(i)
        .map_or(default, |s| s.parse().expect("a number"))
}

fn main() {
    let (pairs, rounds, smart_scan) = (arg(1, 4096), arg(2, 30), arg(3, 1));
    let ksm = LiveKsm::new().expect("the live engine (root, or /dev/userfaultfd access)");
    let mm = ksm.new_mm();
    let n = 2 * pairs;
    let r = ksm.create_region(mm, n * 4096).expect("a region");
    for i in 0..n {
        let mut p = [0x5au8; 4096];
        p[..8].copy_from_slice(&(i % pairs).to_le_bytes());
        r.write(i * 4096, &p).expect("writing the region");
    }
    for (k, v) in [
        ("pages_to_scan", "100000".to_string()),
        ("sleep_millisecs", "0".to_string()),
        ("smart_scan", smart_scan.to_string()),
        ("run", "1".to_string()),
    ] {
        ksm.set_knob(k, &v).expect("a knob");
    }
    ksm.madvise_mergeable(&r).expect("madvise");
    for round in 0..rounds {
        ksm.wait_full_scans(4, Duration::from_secs(60));
        let c = ksm.counters();
        println!(
            "round {round}: pages_shared {} pages_sharing {} pages_unshared {} pages_volatile {}",
            c.pages_shared, c.pages_sharing, c.pages_unshared, c.pages_volatile
        );
        for i in 0..n {
            r.timed_load(i * 4096).expect("reading the region");
        }
    }
    ksm.set_knob("run", "0").expect("run=0");
}
