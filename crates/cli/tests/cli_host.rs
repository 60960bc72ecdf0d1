//! The commands that read or drive the host kernel's KSM: `compare`, `bench` and `stat` (root,
//! as CI runs). They share /sys/kernel/mm/ksm with everything else on the machine, so the
//! tests of this file hold the host lock (/run/samepage/host-ksm.lock, which the samepage
//! commands they start inherit, and then take their own turns on) and one mutex among
//! themselves, and each checks that every knob, vm.max_map_count and the counters are back as
//! they were. Without root or KSM, each says so and is skipped.

mod common;
use common::*;
use samepage_linux::host::{self, ChildrenLock, HostLock, Waiting};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

static HOST: Mutex<()> = Mutex::new(());
static LOCK: OnceLock<ChildrenLock> = OnceLock::new();

const KSM: &str = "/sys/kernel/mm/ksm";

/// The host for one test: the mutex of this process, and the host lock for the whole test
/// binary (or the one it inherited, under `flock /run/samepage/host-ksm.lock cargo test`).
/// `None` (said) when the test cannot run here.
fn take_host(test: &str) -> Option<MutexGuard<'static, ()>> {
    if !root() {
        skip(test, "not root: the host's KSM needs root");
        return None;
    }
    if !host::present() {
        skip(test, "this kernel has no KSM");
        return None;
    }
    let g = HOST.lock().unwrap_or_else(|e| e.into_inner());
    LOCK.get_or_init(|| {
        let mut notify = |m: &str| eprintln!("{m}");
        HostLock::for_children(
            &host::host_files().lock,
            &mut Waiting {
                max: Duration::from_secs(3600),
                interrupted: &|| false,
                notify: &mut notify,
            },
        )
        .expect("the host lock")
    });
    Some(g)
}

fn knobs() -> Vec<(String, String)> {
    samepage_engine::TUNABLE_NAMES
        .iter()
        .filter_map(|n| {
            std::fs::read_to_string(format!("{KSM}/{n}"))
                .ok()
                .map(|v| (n.to_string(), v))
        })
        .collect()
}

fn max_map_count() -> String {
    std::fs::read_to_string("/proc/sys/vm/max_map_count").unwrap()
}

fn counter(name: &str) -> i64 {
    std::fs::read_to_string(format!("{KSM}/{name}"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Every knob and vm.max_map_count as they were.
#[derive(Debug, PartialEq)]
struct Host {
    knobs: Vec<(String, String)>,
    max_map_count: String,
}

fn host_now() -> Host {
    Host {
        knobs: knobs(),
        max_map_count: max_map_count(),
    }
}

/// The host is as `before`, stopped, holds nothing of samepage's, and no saved state is
/// waiting to be put back.
fn assert_put_back(before: &Host, what: &str) {
    assert_eq!(&host_now(), before, "{what}: the host was not put back");
    assert_eq!(counter("run"), 0, "{what}");
    for c in [
        "pages_shared",
        "pages_sharing",
        "ksm_zero_pages",
        "pages_unshared",
        "pages_volatile",
        "stable_node_chains",
        "stable_node_dups",
    ] {
        assert_eq!(counter(c), 0, "{what}: {c} left in the kernel");
    }
    let saved = host::host_files().saved;
    assert!(!saved.exists(), "{what}: {} left", saved.display());
}

/// Puts a knob back even if the test fails half-way.
struct KnobBack(&'static str, String);
impl Drop for KnobBack {
    fn drop(&mut self) {
        let _ = std::fs::write(format!("{KSM}/{}", self.0), host::parse_shown(&self.1));
    }
}

fn knob_back(name: &'static str) -> KnobBack {
    KnobBack(
        name,
        std::fs::read_to_string(format!("{KSM}/{name}")).unwrap(),
    )
}

/// Wait until `f` holds (or fail after `secs`).
fn wait_for(secs: u64, what: &str, f: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(secs), "{what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn output(c: std::process::Child) -> (Option<i32>, String, String) {
    let o = c.wait_with_output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Both engines reached the same merge counters.
fn same_counters(v: &serde_json::Value) {
    for c in [
        "pages_shared",
        "pages_sharing",
        "ksm_zero_pages",
        "stable_node_chains",
        "stable_node_dups",
    ] {
        assert_eq!(
            v["samepage"]["ksm"][c], v["kernel"]["ksm"][c],
            "{c}: samepage {} kernel {}",
            v["samepage"]["ksm"][c], v["kernel"]["ksm"][c]
        );
    }
}

#[test]
fn compare_runs_both_engines_on_the_same_bytes_and_restores_the_host() {
    let Some(_g) = take_host("compare_runs_both_engines_on_the_same_bytes_and_restores_the_host")
    else {
        return;
    };
    let before = host_now();
    let dir = tmpdir("compare");
    let svg = dir.join("cmp.svg");
    let prom = dir.join("cmp.prom");
    let v = json(&[
        "compare",
        "--size",
        "16M",
        "--set",
        "max_page_sharing=8",
        "--plot",
        svg.to_str().unwrap(),
        "--prometheus",
        prom.to_str().unwrap(),
    ]);
    assert_put_back(&before, "compare");
    let (s, k) = (&v["samepage"], &v["kernel"]);
    // The generated 16M workload: 1228 zero pages, 102 groups of 16 (chains of 8).
    for c in [
        "pages_shared",
        "pages_sharing",
        "ksm_zero_pages",
        "stable_node_chains",
        "stable_node_dups",
    ] {
        assert_eq!(
            s["ksm"][c], k["ksm"][c],
            "{c}: samepage {} kernel {}",
            s["ksm"][c], k["ksm"][c]
        );
    }
    assert_eq!(k["ksm"]["ksm_zero_pages"], 1228);
    assert_eq!(k["ksm"]["stable_node_chains"], 102);
    assert_eq!(k["ksm"]["max_page_sharing"], 8);
    assert_eq!(s["ksm"]["max_page_sharing"], 8);
    assert_eq!(k["ksm"]["pages_to_scan"], 100000);
    for r in [s, k] {
        for f in [
            "converged_seconds",
            "cpu_seconds",
            "rss_anon_kib_before",
            "rss_anon_kib_after",
            "pss_kib_before",
            "pss_kib_after",
            "saved_bytes",
        ] {
            assert!(r[f].as_f64().unwrap() > 0.0, "{f}: {}", r[f]);
        }
        assert!(r["full_scans_run"].as_u64().unwrap() >= 3);
    }
    // The kernel's own ksm_stat of the process that held the copy.
    assert_eq!(k["ksm_stat"][0]["ksm_zero_pages"], 1228);
    assert_eq!(k["ksm_stat"][0]["ksm_mergeable"], true);
    // One chart with both engines.
    let svg = std::fs::read_to_string(&svg).unwrap();
    for e in ["samepage", "kernel"] {
        assert_eq!(svg_series(&svg, e).len(), 4, "{e}");
    }
    let p = std::fs::read_to_string(&prom).unwrap();
    assert!(p.contains(&format!(
        "ksm_pages_sharing{{engine=\"kernel\"}} {}\n",
        k["ksm"]["pages_sharing"]
    )));
    assert!(p.contains(&format!(
        "ksm_pages_sharing{{engine=\"samepage\"}} {}\n",
        s["ksm"]["pages_sharing"]
    )));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn compare_refuses_a_busy_host_and_bad_input_without_touching_it() {
    let Some(_g) = take_host("compare_refuses_a_busy_host_and_bad_input_without_touching_it")
    else {
        return;
    };
    let before = host_now();
    let e = err(&["compare", "--size", "4M", "--set", "bogus=1"]);
    assert!(e.contains("unknown KSM knob 'bogus'"), "{e}");
    let e = err(&["compare", "--size", "4M", "--set", "max_page_sharing=1"]);
    assert!(e.contains("EINVAL"), "{e}");
    let e = err(&["compare", "--image", "/nonexistent/samepage.img"]);
    assert!(
        e.contains("cannot read image /nonexistent/samepage.img"),
        "{e}"
    );
    // Inputs that once hung or exhausted the machine: refused at once, the host untouched.
    let dir = tmpdir("compare-inputs");
    let fifo = dir.join("fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    let mut images = vec![
        ("/dev/zero".to_string(), "a character device"),
        (dir.to_str().unwrap().to_string(), "a directory"),
    ];
    if made.is_ok_and(|s| s.success()) {
        images.push((fifo.to_str().unwrap().to_string(), "a FIFO"));
    } else {
        skip("compare with a FIFO", "no mkfifo here");
    }
    for (img, kind) in &images {
        let e = err_within(&["compare", "--image", img], 20);
        assert!(
            e.contains(&format!("is {kind}, not a regular file")),
            "{img}: {e}"
        );
    }
    let avail = samepage_workload::mem_available().unwrap();
    let size = format!("{}G", ((avail * 2) >> 30) + 1);
    let e = err_within(&["compare", "--size", &size], 20);
    assert!(e.contains("MemAvailable"), "{e}");
    for flag in ["--plot", "--prometheus"] {
        let bad = dir.join("no/such/dir/out");
        let e = err_within(
            &["compare", "--size", "4M", flag, bad.to_str().unwrap()],
            20,
        );
        assert!(e.contains("does not exist"), "{flag}: {e}");
    }
    let e = err(&[
        "compare",
        "--set",
        "advisor_mode=scan-time",
        "--set",
        "pages_to_scan=5",
    ]);
    assert!(e.contains("the advisor sets pages_to_scan"), "{e}");
    assert_put_back(&before, "refused input");
    // ksmd running (with nothing to merge): compare must not take it over.
    let _back = knob_back("run");
    std::fs::write(format!("{KSM}/run"), "1").unwrap();
    let e = err(&["compare", "--size", "4M"]);
    assert!(e.contains("already running"), "{e}");
    assert_eq!(counter("run"), 1);
    std::fs::write(format!("{KSM}/run"), "0").unwrap();
    assert_put_back(&before, "busy host");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Item 1 of issue 13: two `compare` at once once left the second's saved knobs behind.
#[test]
fn two_commands_at_once_run_one_after_the_other() {
    let Some(_g) = take_host("two_commands_at_once_run_one_after_the_other") else {
        return;
    };
    let before = host_now();
    let lock = host::host_files().lock;
    let first = spawn(&["compare", "--size", "64M", "--json"]);
    let pid = first.id();
    wait_for(60, "the first compare takes the lock", || {
        std::fs::read_to_string(&lock).is_ok_and(|s| s.trim() == pid.to_string())
    });
    let second = spawn(&[
        "compare",
        "--size",
        "16M",
        "--set",
        "max_page_sharing=8",
        "--json",
    ]);
    // One that waits can still be interrupted, and changes nothing.
    let mut third = spawn(&["compare", "--size", "4M"]);
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = third.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("waiting for another samepage command") {
                let _ = tx.send(());
            }
            all += &line;
            all.push('\n');
        }
        all
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the third compare says it waits");
    let kill = std::process::Command::new("kill")
        .args(["-INT", &third.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let code = third.wait().unwrap().code();
    let e3 = reader.join().unwrap();
    assert_eq!(code, Some(130), "interrupted: {e3}");
    assert!(e3.contains("interrupted while waiting for"), "{e3}");
    // One that will not wait refuses, naming the holder.
    let e = err(&["compare", "--size", "4M", "--wait", "0"]);
    assert!(
        e.contains(&format!(
            "another samepage command that uses the host's KSM (pid {pid}: samepage compare"
        )),
        "{e}"
    );
    let (code, out, e1) = output(first);
    assert_eq!(code, Some(0), "{e1}");
    let a: serde_json::Value = serde_json::from_str(&out).unwrap();
    same_counters(&a);
    assert_eq!(a["kernel"]["ksm"]["pages_to_scan"], 100000);
    let (code, out, e2) = output(second);
    assert_eq!(code, Some(0), "{e2}");
    assert!(
        e2.contains(&format!(
            "waiting for another samepage command that uses the host's KSM (pid {pid}: "
        )),
        "{e2}"
    );
    let b: serde_json::Value = serde_json::from_str(&out).unwrap();
    same_counters(&b);
    // Its own knobs, not the first one's leftovers; the 16M workload's counters.
    assert_eq!(b["kernel"]["ksm"]["max_page_sharing"], 8);
    assert_eq!(b["kernel"]["ksm"]["ksm_zero_pages"], 1228);
    assert_eq!(b["kernel"]["ksm"]["stable_node_chains"], 102);
    assert_put_back(&before, "two compares");
}

/// Item 5: a SIGKILL in the kernel phase; the next command puts the host back.
#[test]
fn a_killed_command_is_put_back_by_the_next_one() {
    let Some(_g) = take_host("a_killed_command_is_put_back_by_the_next_one") else {
        return;
    };
    let before = host_now();
    let saved = host::host_files().saved;
    let mut bench = spawn(&[
        "bench",
        "--runs",
        "1",
        "--what",
        "workloads",
        "--size",
        "64M",
        "--json",
    ]);
    let pid = bench.id();
    wait_for(120, "bench reaches the kernel phase", || {
        counter("run") == 1
    });
    bench.kill().unwrap();
    bench.wait().unwrap();
    // What it leaves: its changes, and the file that says what they replaced.
    assert_ne!(
        host_now(),
        before,
        "the kill changed nothing: the test proves nothing"
    );
    // bench runs at the machine's vm.max_map_count (a merged page costs no mapping).
    assert_eq!(max_map_count(), before.max_map_count);
    let text = std::fs::read_to_string(&saved).unwrap();
    assert!(text.contains(&format!("\npid={pid}\n")), "{text}");
    // `stat`, which anyone may run, says the knobs shown are not the host's own.
    let out = samepage(&["stat"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("host-ksm.saved exists"));
    // The next command that takes the lock puts it back, says so, and runs as usual.
    let out = samepage(&["compare", "--size", "4M", "--json"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{e}");
    assert!(
        e.contains(&format!(
            "pid {pid} (samepage bench --runs 1 --what workloads --size 64M --json) changed the \
             host's KSM and ended without putting it back (killed?); put back from"
        )),
        "{e}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    same_counters(&v);
    assert_put_back(&before, "after the kill");
}

/// Item 2: an interrupt (or an error) in the kernel phase ends with run=2, then the saved run.
#[test]
fn an_interrupt_in_the_kernel_phase_leaves_nothing_behind() {
    let Some(_g) = take_host("an_interrupt_in_the_kernel_phase_leaves_nothing_behind") else {
        return;
    };
    let before = host_now();
    let c = spawn(&[
        "compare",
        "--size",
        "256M",
        "--zero",
        "0",
        "--dup",
        "0",
        "--full-scans",
        "1000",
    ]);
    wait_for(120, "compare reaches the kernel phase", || {
        counter("run") == 1
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        counter("pages_volatile") + counter("pages_unshared") > 0,
        "the kernel holds rmap items of the run: the test proves something"
    );
    let kill = std::process::Command::new("kill")
        .args(["-INT", &c.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let (code, out, e) = output(c);
    assert_eq!(code, Some(130), "interrupted: {e}");
    assert!(out.is_empty());
    assert!(
        e.contains(
            "interrupted; the host's KSM knobs and vm.max_map_count are put back as they were \
             (read back)"
        ),
        "{e}"
    );
    assert_put_back(&before, "interrupted");
}

/// Item 3: the host's advisor, whatever it is, and `--set advisor_mode=scan-time`.
#[test]
fn the_advisor_mode_is_put_back() {
    let Some(_g) = take_host("the_advisor_mode_is_put_back") else {
        return;
    };
    let _mode = knob_back("advisor_mode");
    let _pages = knob_back("pages_to_scan");
    // The advisor's own mode on the host.
    std::fs::write(format!("{KSM}/advisor_mode"), "scan-time").unwrap();
    let before = host_now();
    let v = json(&["compare", "--size", "4M"]);
    same_counters(&v);
    assert_eq!(v["kernel"]["ksm"]["advisor_mode"], "none");
    assert_eq!(v["kernel"]["ksm"]["pages_to_scan"], 100000);
    assert_put_back(&before, "host advisor scan-time");
    assert_eq!(
        std::fs::read_to_string(format!("{KSM}/advisor_mode"))
            .unwrap()
            .trim(),
        "none [scan-time]"
    );
    std::fs::write(format!("{KSM}/advisor_mode"), "none").unwrap();
    std::fs::write(format!("{KSM}/pages_to_scan"), host::parse_shown(&_pages.1)).unwrap();
    // The advisor for the run only.
    let before = host_now();
    let v = json(&["compare", "--size", "4M", "--set", "advisor_mode=scan-time"]);
    assert_eq!(v["kernel"]["ksm"]["advisor_mode"], "scan-time");
    assert_eq!(v["samepage"]["ksm"]["advisor_mode"], "none [scan-time]");
    same_counters(&v);
    assert_put_back(&before, "--set advisor_mode=scan-time");
}

/// Item 4: another program's mergeable memory is never counted, nor unmerged.
#[test]
fn another_programs_mergeable_memory_is_left_alone() {
    let Some(_g) = take_host("another_programs_mergeable_memory_is_left_alone") else {
        return;
    };
    let before = host_now();
    let me = std::process::id();
    // This test's process is the other program: 64 identical pages, advised mergeable.
    let other = |n: u64| {
        let m = host::AnonMemory::new(n * 4096).unwrap();
        for i in 0..n {
            m.write(i * 4096, &[0x5a; 4096]).unwrap();
        }
        m.set_mergeable(true).unwrap();
        m
    };
    let mine = other(64);
    let e = err(&["compare", "--size", "4M"]);
    assert!(
        e.contains(&format!("other processes use KSM on this host: pid {me} (")),
        "{e}"
    );
    let e = err(&[
        "bench",
        "--runs",
        "1",
        "--what",
        "latency",
        "--latency-size",
        "4M",
    ]);
    assert!(e.contains(&format!("pid {me} (")), "{e}");
    drop(mine);
    assert_put_back(&before, "refused for another program");
    // It starts while ksmd runs for compare: compare must not unmerge it with run=2.
    let c = spawn(&["compare", "--size", "64M", "--full-scans", "60"]);
    wait_for(120, "compare reaches the kernel phase", || {
        counter("run") == 1
    });
    let mine = other(64);
    let stat = || host::ksm_stat(me).unwrap();
    wait_for(120, "ksmd merges this process's pages", || {
        stat().ksm_merging_pages > 0 || counter("run") != 1
    });
    let (code, _, e) = output(c);
    assert_eq!(code, Some(75), "busy, try later: {e}");
    assert!(
        e.contains(&format!(
            "another process started using KSM while the kernel's engine ran: pid {me} ("
        )),
        "{e}"
    );
    assert_eq!(stat().ksm_merging_pages, 64, "its pages are still merged");
    assert_eq!(host_now(), before, "the knobs are back");
    assert_eq!(counter("run"), 0);
    // What KSM still holds of compare's own memory waits for run=2 until this program is done.
    let e = err(&["compare", "--size", "4M"]);
    assert!(e.contains("other processes use KSM"), "{e}");
    mine.set_mergeable(false).unwrap();
    drop(mine);
    let out = samepage(&["compare", "--size", "4M"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{e}");
    assert!(
        e.contains("noted KSM metadata that run=2 could not free while another process used KSM, and run=2 freed"),
        "{e}"
    );
    assert_put_back(&before, "after the other program");
}

#[test]
fn stat_shows_the_host_in_the_kernel_layout() {
    let Some(_g) = take_host("stat_shows_the_host_in_the_kernel_layout") else {
        return;
    };
    let v = json(&["stat"]);
    for c in samepage_engine::COUNTER_NAMES {
        assert_eq!(v["ksm"][c].as_i64(), Some(counter(c)), "{c}");
    }
    assert_eq!(v["ksm"]["run"], 0);
    let saved = (counter("pages_sharing") + counter("ksm_zero_pages")) * 4096;
    assert_eq!(v["derived"]["saved_bytes"], saved);
    // Its own process, with the procfs layout.
    let pid = std::process::id().to_string();
    let v = json(&["stat", &pid]);
    assert_eq!(v["ksm_stat"][0]["pid"].to_string(), pid);
    let out = samepage(&["stat", &pid]);
    let t = String::from_utf8(out.stdout).unwrap();
    assert!(t.starts_with("/sys/kernel/mm/ksm\nfull_scans "), "{t}");
    assert!(
        t.contains(&format!("/proc/{pid}/ksm_stat\nksm_rmap_items ")),
        "{t}"
    );
    assert!(t.contains("memory saved: "), "{t}");
    assert!(
        t.contains("sharing ratio (pages_sharing / pages_shared): "),
        "{t}"
    );
    let e = err(&["stat", "4294967295"]);
    assert!(e.contains("no process 4294967295"), "{e}");
    let e = err(&["stat", "not-a-pid"]);
    assert!(e.contains("invalid value"), "{e}");
}

#[test]
fn bench_reports_ratios_and_restores_the_host() {
    let Some(_g) = take_host("bench_reports_ratios_and_restores_the_host") else {
        return;
    };
    let before = host_now();
    let v = json(&[
        "bench",
        "--runs",
        "1",
        "--size",
        "4M",
        "--scaling",
        "2M,4M",
        "--latency-size",
        "4M",
        "--latency-pages",
        "100",
    ]);
    assert_put_back(&before, "bench");
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(
        rows.len(),
        8,
        "four workloads, two with samepage's first-visit zero pages, two scaling sizes"
    );
    assert!(rows[4]["workload"]
        .as_str()
        .unwrap()
        .ends_with("first visit"));
    for r in rows {
        assert_eq!(r["same_counters"], true, "{r}");
        for f in [
            "samepage_cpu_seconds",
            "kernel_cpu_seconds",
            "samepage_scan_pages_per_second",
        ] {
            assert!(r[f].as_f64().unwrap() > 0.0, "{f}: {r}");
        }
    }
    // All-zero: every page saved by both engines.
    assert_eq!(rows[0]["saved_bytes"], 4 << 20);
    assert_eq!(rows[0]["kernel_saved_bytes"], 4 << 20);
    // Reads are checked against what the pages hold: the run fails otherwise.
    let lat = v["latency"].as_array().unwrap();
    let kinds: Vec<(&str, &str)> = lat
        .iter()
        .map(|l| (l["kind"].as_str().unwrap(), l["engine"].as_str().unwrap()))
        .collect();
    for kind in [
        "write, zero page",
        "write, merged page",
        "read, merged page",
        "write, untouched page",
        "read, untouched page",
    ] {
        for engine in ["samepage", "kernel"] {
            assert!(
                kinds.contains(&(kind, engine)),
                "{kind} {engine}: {kinds:?}"
            );
        }
    }
    assert_eq!(lat.len(), 10);
    for l in lat {
        assert!(l["pages"].as_u64().unwrap() > 50, "{l}");
        assert!(l["p50_us"].as_f64().unwrap() <= l["p99_us"].as_f64().unwrap());
    }
    assert_eq!(v["metadata"]["kernel_bytes_per_page"], 64);
    // All unique: the items and the unstable tree, measured on the live engine.
    let per = rows[1]["samepage_metadata_bytes_per_rmap_item"]
        .as_f64()
        .unwrap();
    assert!(per > 9.0 && per <= 16.0, "{}", rows[1]);
    let e = err(&["bench", "--runs", "0"]);
    assert!(e.contains("--runs must be at least 1"), "{e}");
    // An empty --scaling is no scaling series, as the help says.
    let v = json(&["bench", "--runs", "1", "--scaling", "", "--what", "scaling"]);
    assert_eq!(v["rows"].as_array().unwrap().len(), 0);
    assert_put_back(&before, "bench --scaling ''");
}

#[test]
fn bench_clients_merges_the_same_bytes_in_process_by_the_daemon_and_by_the_kernel() {
    let Some(_g) =
        take_host("bench_clients_merges_the_same_bytes_in_process_by_the_daemon_and_by_the_kernel")
    else {
        return;
    };
    let before = host_now();
    let v = json(&[
        "bench",
        "--what",
        "clients",
        "--clients",
        "1,2",
        "--clients-size",
        "16M",
        "--runs",
        "1",
    ]);
    assert_put_back(&before, "bench --what clients");
    assert_eq!(v["rows"].as_array().unwrap().len(), 0, "clients only");
    let rows = v["clients"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (r, n) in rows.iter().zip([1, 2]) {
        assert_eq!(r["clients"], n, "{r}");
        assert_eq!(r["pages"], 4096, "{r}");
        assert_eq!(r["same_counters"], true, "{r}");
        for e in ["in_process", "daemon", "kernel"] {
            let f = &r[e];
            // Every byte was checked: a mismatch would have ended the bench (status 3),
            // and `json` requires success.
            assert_eq!(
                f["merged_pages"].as_i64(),
                Some(f["pages_sharing"].as_i64().unwrap() + f["ksm_zero_pages"].as_i64().unwrap()),
                "{e}: {r}"
            );
            // The generated 16M workload: 1228 zero pages, 102 groups of 16.
            assert_eq!(f["ksm_zero_pages"], 1228, "{e}: {r}");
            assert_eq!(f["pages_shared"], 102, "{e}: {r}");
            assert_eq!(f["pages_sharing"], 102 * 15, "{e}: {r}");
            for c in ["pages_shared", "pages_sharing", "ksm_zero_pages"] {
                assert_eq!(f[c], r["in_process"][c], "{e} {c}: {r}");
            }
            for x in ["converged_seconds", "cpu_seconds", "cpu_us_per_merged_page"] {
                assert!(f[x].as_f64().unwrap() > 0.0, "{e} {x}: {r}");
            }
        }
        // The daemon's clients serve its requests with their agents.
        assert!(
            r["daemon"]["clients_cpu_seconds"].as_f64().unwrap() > 0.0,
            "{r}"
        );
        for x in ["daemon_converged_ratio", "daemon_cpu_ratio"] {
            assert!(r[x].as_f64().unwrap() > 0.0, "{x}: {r}");
        }
    }
}
