//! Application threads write, read, read(2) from a pipe into, discard, move out and back with
//! mremap and (a few) unmap pages of merged regions while the engine merges and unmerges at
//! full speed. A shadow copy proves that no byte was lost or
//! changed, and whenever the engine is quiescent the zero-page count equals the PAGEMAP_SCAN
//! ground truth. `SAMEPAGE_STRESS_OPS` sets the operations per thread.

use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use samepage_linux::{sys, LiveKsm};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const PS: u64 = 4096;
const WORDS: usize = 512;
const THREADS: usize = 2;
const PAGES_PER_THREAD: u64 = 1024;
const ROUNDS: usize = 4;

type Page = [u64; WORDS];

fn ops_per_thread() -> usize {
    std::env::var("SAMEPAGE_STRESS_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600_000)
}

fn fill(v: u64) -> Page {
    [v; WORDS]
}

fn as_bytes(p: &Page) -> Vec<u8> {
    p.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

/// One application thread's ops on its own pages; returns the number of page operations.
/// `None` in the shadow: the thread unmapped the page (and never touches it again).
fn app_thread(base: u64, shadow: &mut [Option<Page>], seed: u64, ops: usize) -> u64 {
    let mut rng = Pcg64Mcg::seed_from_u64(seed);
    let (pr, pw) = sys::pipe().unwrap();
    let n = shadow.len() as u64;
    let mut done = 0;
    let mut hist: Vec<Vec<u32>> = vec![Vec::new(); n as usize];
    for _ in 0..ops {
        let p = rng.random_range(0..n);
        let a = base + p * PS;
        let k: u32 = rng.random_range(0..100);
        let Some(page) = shadow[p as usize].as_mut() else {
            continue;
        };
        hist[p as usize].push(k);
        let h = hist[p as usize].clone();
        match k {
            // A user-mode store of one word (mostly values that make duplicates).
            0..=39 => {
                let w = rng.random_range(0..WORDS);
                let v = rng.random_range(0..4u64);
                // SAFETY: `a` is a page of this thread's part of the region, mapped and
                // writable (moved pages are moved back before this thread goes on).
                unsafe { sys::user_store(a + w as u64 * 8, v) };
                page[w] = v;
            }
            // Fill a whole page (a kernel-mode write).
            40..=54 => {
                let v = rng.random_range(0..4u64);
                *page = fill(v);
                sys::write_self(a, &as_bytes(page)).unwrap();
            }
            // Read it back with user-mode loads.
            55..=74 => {
                for (w, &want) in page.iter().enumerate() {
                    // SAFETY: as above.
                    let got = unsafe { sys::user_load(a + w as u64 * 8) };
                    assert_eq!(got, want, "page {p} word {w} changed; ops {h:?}");
                }
            }
            // read(2) from a pipe into the page.
            75..=84 => {
                let w = rng.random_range(0..WORDS - 2);
                let v = [rng.random_range(0..4u64), rng.random_range(0..4u64)];
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_ne_bytes()).collect();
                sys::write_fd(pw.as_raw_fd(), &bytes).unwrap();
                assert_eq!(
                    sys::read_fd_into(pr.as_raw_fd(), a + w as u64 * 8, 16).unwrap(),
                    16
                );
                page[w] = v[0];
                page[w + 1] = v[1];
            }
            // MADV_DONTNEED: reads zeros afterwards.
            85..=92 => {
                sys::madvise(a, PS, libc::MADV_DONTNEED).unwrap();
                *page = fill(0);
            }
            // mremap the page out of the region (to a page this thread just mapped) and back.
            93..=97 => {
                let park = sys::mmap_anon(PS).unwrap();
                sys::mremap_fixed(a, PS, park).unwrap();
                sys::mremap_fixed(park, PS, a).unwrap();
            }
            // munmap, one operation in 10 000: the page is gone for good.
            98 if rng.random_range(0..100) == 0 => {
                sys::munmap(a, PS).unwrap();
                shadow[p as usize] = None;
            }
            // Compare with read(2)-like kernel reads.
            _ => {
                let mut buf = [0u8; 4096];
                sys::read_self(a, &mut buf).unwrap();
                assert!(buf[..] == as_bytes(page)[..], "page {p} changed");
            }
        }
        done += 1;
    }
    done
}

#[test]
fn stress_merging_under_application_load() {
    let ksm = Arc::new(LiveKsm::new().expect("live engine"));
    for (k, v) in [
        ("use_zero_pages", "1"),
        ("pages_to_scan", "512"),
        ("sleep_millisecs", "0"),
    ] {
        ksm.set_knob(k, v).unwrap();
    }
    let mm = ksm.new_mm();
    let total = THREADS as u64 * PAGES_PER_THREAD;
    let base = ksm.create_region(mm, total * PS).unwrap();
    let mut shadows: Vec<Vec<Option<Page>>> = Vec::new();
    for t in 0..THREADS as u64 {
        let mut sh = Vec::new();
        for p in 0..PAGES_PER_THREAD {
            let page = fill((t * PAGES_PER_THREAD + p) % 4);
            sys::write_self(base + (t * PAGES_PER_THREAD + p) * PS, &as_bytes(&page)).unwrap();
            sh.push(Some(page));
        }
        shadows.push(sh);
    }
    ksm.madvise_mergeable(mm, base, total * PS).unwrap();
    ksm.set_knob("run", "1").unwrap();
    // The engine merges and unmerges at full speed while the application runs.
    let stop = Arc::new(AtomicBool::new(false));
    let toggler = {
        let (ksm, stop) = (ksm.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = Pcg64Mcg::seed_from_u64(99);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let p = rng.random_range(0..total - 64);
                let len = rng.random_range(1..64) * PS;
                ksm.madvise_unmergeable(mm, base + p * PS, len).unwrap();
                ksm.madvise_mergeable(mm, base, total * PS).unwrap();
                if n % 50 == 49 {
                    ksm.set_knob("run", "2").unwrap();
                    ksm.set_knob("run", "1").unwrap();
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            n
        })
    };
    let t0 = Instant::now();
    let ops = ops_per_thread() / ROUNDS;
    let barrier = Arc::new(Barrier::new(THREADS + 1));
    let mut total_ops = 0;
    let mut handles = Vec::new();
    for (t, mut shadow) in shadows.into_iter().enumerate() {
        let barrier = barrier.clone();
        handles.push(std::thread::spawn(move || {
            let my_base = base + t as u64 * PAGES_PER_THREAD * PS;
            let mut n = 0;
            let mut failure = None;
            for round in 0..ROUNDS {
                // A failed check must fail the test, not leave the others waiting at the
                // barrier: keep arriving there, and fail at the end.
                if failure.is_none() {
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        app_thread(my_base, &mut shadow, (t * 1000 + round) as u64, ops)
                    }));
                    match r {
                        Ok(k) => n += k,
                        Err(e) => failure = Some(e),
                    }
                }
                barrier.wait(); // quiescent check by the main thread
                barrier.wait();
            }
            if let Some(e) = failure {
                std::panic::resume_unwind(e);
            }
            (n, shadow)
        }));
    }
    for _ in 0..ROUNDS {
        barrier.wait();
        // Application threads are parked: hold the engine between batches and compare.
        let v = ksm.verify();
        assert!(v.problems().is_empty(), "{:?}", v.problems());
        barrier.wait();
    }
    let mut shadows = Vec::new();
    for h in handles {
        let (n, shadow) = h.join().unwrap();
        total_ops += n;
        shadows.push(shadow);
    }
    stop.store(true, Ordering::Relaxed);
    let toggles = toggler.join().unwrap();
    ksm.set_knob("run", "1").unwrap();
    assert!(ksm.wait_full_scans(2, Duration::from_secs(60)));
    ksm.set_knob("run", "0").unwrap();
    let v = ksm.verify();
    assert!(v.problems().is_empty(), "{:?}", v.problems());
    // Every byte is what the application last put there.
    let mut buf = [0u8; 4096];
    for (t, shadow) in shadows.iter().enumerate() {
        for (p, page) in shadow.iter().enumerate() {
            let Some(page) = page else { continue };
            let a = base + (t as u64 * PAGES_PER_THREAD + p as u64) * PS;
            sys::read_self(a, &mut buf).unwrap();
            assert!(buf[..] == as_bytes(page)[..], "thread {t} page {p} changed");
        }
    }
    let s = ksm.stats();
    eprintln!(
        "stress: {total_ops} page operations in {:.1} s, {toggles} unmerge/merge rounds, {:?}, counters {:?}",
        t0.elapsed().as_secs_f64(),
        s,
        ksm.counters()
    );
    assert!(
        s.cow_zero + s.cow_merged > 0,
        "the application broke no merged page: the test did not exercise merging"
    );
}
