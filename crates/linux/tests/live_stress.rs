//! Application threads write, read, read(2) from a pipe into, discard, move out and back with
//! mremap and (a few) unmap pages of merged regions while the engine merges and unmerges at
//! full speed. A shadow copy proves that no byte was lost or
//! changed, and whenever the engine is quiescent the zero-page count equals the PAGEMAP_SCAN
//! ground truth. `SAMEPAGE_STRESS_OPS` sets the operations per thread.

mod common;

use common::{discard, mmap_anon, read_into, unmap, PS};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use samepage_linux::LiveKsm;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

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

/// A word of the page at `a` as the application reads and writes it.
fn word(a: u64) -> &'static AtomicU64 {
    // SAFETY: callers pass an 8-byte-aligned address inside a page of the region, which
    // stays mapped for as long as its thread uses it (pages moved away come back first,
    // unmapped ones are never touched again).
    unsafe { AtomicU64::from_ptr(a as *mut u64) }
}

/// Copy `data` to `a` with process_vm_writev (a kernel-mode write).
fn write_kernel(a: u64, data: &[u8]) {
    let local = libc::iovec {
        iov_base: data.as_ptr() as *mut _,
        iov_len: data.len(),
    };
    let remote = libc::iovec {
        iov_base: a as *mut _,
        iov_len: data.len(),
    };
    // SAFETY: local is a readable buffer; the kernel checks the remote range.
    let n = unsafe { libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0) };
    assert_eq!(n as usize, data.len());
}

/// Read the page at `a` with process_vm_readv (a kernel-mode read).
fn read_kernel(a: u64, buf: &mut [u8; 4096]) {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut _,
        iov_len: 4096,
    };
    let remote = libc::iovec {
        iov_base: a as *mut _,
        iov_len: 4096,
    };
    // SAFETY: local is a writable buffer; the kernel checks the remote range.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    assert_eq!(n, 4096);
}

/// Map the parking page again where the move back left a gap.
fn remap_park(park: u64) {
    // SAFETY: `park` is this thread's parking page, unmapped by the move back; nothing else
    // maps there (the gap is one page between two of this thread's).
    let p = unsafe {
        libc::mmap(
            park as *mut libc::c_void,
            PS as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    assert_eq!(p as u64, park, "mmap: {}", std::io::Error::last_os_error());
}

/// `mremap(old -> new)` of one page.
fn move_page(old: u64, new: u64) {
    // SAFETY: both are pages this test's thread owns; nothing refers into them.
    let p = unsafe {
        libc::mremap(
            old as *mut libc::c_void,
            PS as usize,
            PS as usize,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            new as *mut libc::c_void,
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mremap: {}",
        std::io::Error::last_os_error()
    );
}

/// One application thread's ops on its own pages; returns the number of page operations.
/// `None` in the shadow: the thread unmapped the page (and never touches it again).
fn app_thread(base: u64, shadow: &mut [Option<Page>], seed: u64, ops: usize) -> u64 {
    let mut rng = Pcg64Mcg::seed_from_u64(seed);
    // The parking page sits between two pages of its own: the gap a move back leaves there
    // is one page, which no other mapping of the process (samepage's own are larger) can
    // take before it is mapped again. A lone page could border free space, where any
    // thread's next mmap lands.
    let park = mmap_anon(3 * PS) + PS;
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
                word(a + w as u64 * 8).store(v, Ordering::Relaxed);
                page[w] = v;
            }
            // Fill a whole page (a kernel-mode write).
            40..=54 => {
                let v = rng.random_range(0..4u64);
                *page = fill(v);
                write_kernel(a, &as_bytes(page));
            }
            // Read it back with user-mode loads.
            55..=74 => {
                for (w, &want) in page.iter().enumerate() {
                    let got = word(a + w as u64 * 8).load(Ordering::Relaxed);
                    assert_eq!(got, want, "page {p} word {w} changed; ops {h:?}");
                }
            }
            // read(2) from a pipe into the page.
            75..=84 => {
                let w = rng.random_range(0..WORDS - 2);
                let v = [rng.random_range(0..4u64), rng.random_range(0..4u64)];
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_ne_bytes()).collect();
                assert_eq!(read_into(a + w as u64 * 8, &bytes), 16);
                page[w] = v[0];
                page[w + 1] = v[1];
            }
            // MADV_DONTNEED: reads zeros afterwards.
            85..=92 => {
                discard(a, PS);
                *page = fill(0);
            }
            // mremap the page out of the region (to this thread's parking page) and back.
            // The gap the move leaves in the region is one page: no mapping samepage or
            // the test makes meanwhile is that small, so none lands there to be replaced
            // by the move back.
            93..=97 => {
                move_page(a, park);
                move_page(park, a);
                remap_park(park);
            }
            // munmap, one operation in 10 000: the page is gone for good.
            98 if rng.random_range(0..100) == 0 => {
                unmap(a, PS);
                shadow[p as usize] = None;
            }
            // Compare with read(2)-like kernel reads.
            _ => {
                let mut buf = [0u8; 4096];
                read_kernel(a, &mut buf);
                assert!(buf[..] == as_bytes(page)[..], "page {p} changed; ops {h:?}");
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
    let region = Arc::new(ksm.create_region(mm, total * PS).unwrap());
    let base = region.start();
    let mut shadows: Vec<Vec<Option<Page>>> = Vec::new();
    for t in 0..THREADS as u64 {
        let mut sh = Vec::new();
        for p in 0..PAGES_PER_THREAD {
            let page = fill((t * PAGES_PER_THREAD + p) % 4);
            region
                .write((t * PAGES_PER_THREAD + p) * PS, &as_bytes(&page))
                .unwrap();
            sh.push(Some(page));
        }
        shadows.push(sh);
    }
    ksm.madvise_mergeable(&region).unwrap();
    ksm.set_knob("run", "1").unwrap();
    // The engine merges and unmerges at full speed while the application runs.
    let stop = Arc::new(AtomicBool::new(false));
    let toggler = {
        let (ksm, stop, region) = (ksm.clone(), stop.clone(), region.clone());
        std::thread::spawn(move || {
            let mut rng = Pcg64Mcg::seed_from_u64(99);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let p = rng.random_range(0..total - 64);
                let len = rng.random_range(1..64) * PS;
                ksm.madvise_unmergeable_range(&region, p * PS, len).unwrap();
                ksm.madvise_mergeable(&region).unwrap();
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
            region.peek_page(a - base, &mut buf).unwrap();
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
    assert_eq!(s.agent.lost_put_backs, 0);
    assert!(
        s.agent.cow_merged + s.agent.read_merged > 0 && s.ksmd.zero_placed > 0,
        "the application touched no merged page: the test did not exercise merging"
    );
}
