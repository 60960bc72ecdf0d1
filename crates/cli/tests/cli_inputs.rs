//! Inputs that once hung, crashed or misled samepage, given to the commands that do not
//! change the host's KSM (those that do are in cli_host.rs): each is refused at once, with a
//! sentence, and exit status 1 (or 2 for bad usage).

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// Twice the machine's available memory, as a --size: more than can ever fit.
fn too_big() -> String {
    let avail = samepage_workload::mem_available().expect("/proc/meminfo");
    format!("{}G", ((avail * 2) >> 30) + 1)
}

fn fifo(dir: &Path) -> Option<PathBuf> {
    let f = dir.join("fifo");
    let made = std::process::Command::new("mkfifo").arg(&f).status();
    made.is_ok_and(|s| s.success()).then_some(f)
}

#[test]
fn images_that_are_not_regular_files_are_refused_at_once() {
    let dir = tmpdir("not-regular");
    let mut cases: Vec<(PathBuf, &str)> = vec![
        ("/dev/zero".into(), "a character device"),
        ("/dev/urandom".into(), "a character device"),
        ("/proc/self/pagemap".into(), "a file of /proc"),
        (dir.clone(), "a directory"),
    ];
    match fifo(&dir) {
        Some(f) => cases.push((f, "a FIFO")),
        None => skip("FIFO case", "no mkfifo here"),
    }
    for (path, kind) in &cases {
        for cmd in ["simulate", "merge"] {
            let e = err_within(&[cmd, "--image", path.to_str().unwrap()], 20);
            assert!(
                e.contains(&format!(
                    "image {} is {kind}, not a regular file",
                    path.display()
                )),
                "{cmd} {}: {e}",
                path.display()
            );
        }
    }
    // `stat --samepage` reads a file any user names.
    for (path, kind) in &cases {
        let e = err_within(&["stat", "--samepage", path.to_str().unwrap()], 20);
        assert!(e.contains(&format!("is {kind}")), "{}: {e}", path.display());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn workloads_larger_than_the_machine_are_refused_before_allocating() {
    let size = too_big();
    for args in [
        &["simulate", "--size", &size][..],
        &["merge", "--size", &size],
        &["demo", "--size", &size, "--guests", "64"],
    ] {
        let e = err_within(args, 20);
        assert!(
            e.contains("would take about") && e.contains("MemAvailable"),
            "{args:?}: {e}"
        );
    }
    // A sparse image: its size is refused without reading it.
    let dir = tmpdir("too-big");
    let img = dir.join("huge.img");
    let f = std::fs::File::create(&img).unwrap();
    let avail = samepage_workload::mem_available().unwrap();
    f.set_len((avail * 2).div_ceil(4096) * 4096).unwrap();
    drop(f);
    for cmd in ["simulate", "merge"] {
        let e = err_within(&[cmd, "--image", img.to_str().unwrap()], 20);
        assert!(e.contains("of images"), "{cmd}: {e}");
        assert!(e.contains("MemAvailable"), "{cmd}: {e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn simulate_never_spins_forever() {
    let e = err_within(
        &["simulate", "--size", "1M", "--set", "pages_to_scan=0"],
        20,
    );
    assert!(e.contains("pages_to_scan=0"), "{e}");
    // Far more full scans than one second allows: --timeout ends it.
    let e = err_within(
        &[
            "simulate",
            "--size",
            "16M",
            "--full-scans",
            "1000000",
            "--timeout",
            "1",
        ],
        60,
    );
    assert!(
        e.contains("did not complete 1000000 full scans within 1 s of wall-clock time"),
        "{e}"
    );
}

#[test]
fn settings_that_would_do_nothing_are_refused() {
    let e = err(&["simulate", "--size", "1M", "--full-scans", "0"]);
    assert!(e.contains("--full-scans"), "{e}");
    assert_eq!(
        samepage(&["merge", "--size", "1M", "--full-scans", "0"])
            .status
            .code(),
        Some(2),
        "bad usage"
    );
    let e = err(&["simulate", "--size", "1M", "--group", "100000"]);
    assert!(
        e.contains("--group 100000 is more than the 102 pages --dup 40 gives"),
        "{e}"
    );
    let e = err(&["simulate", "--set", "zero_pages_first_visit=1"]);
    assert!(
        e.contains("zero_pages_first_visit=1 does nothing without use_zero_pages=1"),
        "{e}"
    );
    // With use_zero_pages it is what it says.
    let v = json(&[
        "simulate",
        "--size",
        "1M",
        "--set",
        "use_zero_pages=1",
        "--set",
        "zero_pages_first_visit=1",
    ]);
    assert_eq!(v["ksm"]["zero_pages_first_visit"], 1);
    let e = err(&[
        "demo",
        "--set",
        "use_zero_pages=0",
        "--set",
        "zero_pages_first_visit=1",
    ]);
    assert!(e.contains("does nothing without use_zero_pages=1"), "{e}");
    let e = err(&[
        "simulate",
        "--set",
        "advisor_mode=scan-time",
        "--set",
        "pages_to_scan=5",
    ]);
    assert!(e.contains("the advisor sets pages_to_scan"), "{e}");
}

#[test]
fn bad_output_paths_are_found_before_the_run() {
    let dir = tmpdir("outputs");
    let missing = dir.join("no/such/dir/x.svg");
    for (cmd, flag) in [
        ("merge", "--plot"),
        ("merge", "--prometheus"),
        ("demo", "--plot"),
        ("demo", "--prometheus"),
    ] {
        for (path, why) in [
            (missing.to_str().unwrap(), "does not exist"),
            (dir.to_str().unwrap(), "is a directory"),
        ] {
            let e = err_within(&[cmd, "--size", "4M", flag, path], 20);
            assert!(
                e.contains(&format!("{flag} {path}")) && e.contains(why),
                "{cmd} {flag} {path}: {e}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn stat_says_where_figures_from_a_file_come_from() {
    let dir = tmpdir("stat-file");
    let prom = dir.join("compare.prom");
    let k = samepage_engine::KsmCounters {
        pages_sharing: 9,
        ..Default::default()
    };
    // What `compare --prometheus` leaves: both engines.
    let mut text = String::new();
    for n in samepage_engine::COUNTER_NAMES {
        let m = if n.starts_with("ksm_") {
            n.to_string()
        } else {
            format!("ksm_{n}")
        };
        for e in ["samepage", "kernel"] {
            text += &format!("{m}{{engine=\"{e}\"}} {}\n", k.get(n).unwrap());
        }
    }
    std::fs::write(&prom, text).unwrap();
    let out = samepage(&["stat", "--samepage", prom.to_str().unwrap()]);
    assert!(out.status.success());
    let t = String::from_utf8(out.stdout).unwrap();
    assert!(
        !t.lines().any(|l| l == "/sys/kernel/mm/ksm"),
        "a file's figures are not the live host's: {t}"
    );
    assert!(
        t.contains(&format!(
            "kernel engine, as recorded in {} (not the live host",
            prom.display()
        )),
        "{t}"
    );
    let v = json(&["stat", "--samepage", prom.to_str().unwrap()]);
    assert_eq!(v[1]["source"], prom.to_str().unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn messages_for_a_user_without_root_say_what_is_wrong() {
    let Some(run) = as_nobody("messages_for_a_user_without_root_say_what_is_wrong") else {
        return;
    };
    let out = run(&["stat", "1"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "permission denied: {e}");
    assert!(
        e.contains("cannot read /proc/1/ksm_stat: permission denied"),
        "{e}"
    );
    assert!(!e.contains("no process"), "{e}");
    let out = run(&["stat", "4294967295"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("there is no process 4294967295"));
    assert_eq!(out.status.code(), Some(2), "bad usage");
    // Everyone's processes but its own are unreadable: it says how many it left out.
    let out = run(&["stat"]);
    assert!(out.status.success());
    let t = String::from_utf8_lossy(&out.stdout);
    assert!(
        t.contains("processes left out: their ksm_stat is readable only by"),
        "{t}"
    );
    for cmd in [&["bench", "--runs", "1"][..], &["compare", "--size", "1M"]] {
        let out = run(cmd);
        let e = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(77),
            "permission denied: {cmd:?}: {e}"
        );
        assert!(e.contains("the host's KSM needs root"), "{cmd:?}: {e}");
        assert!(!e.contains("//proc"), "{cmd:?}: {e}");
    }
}

#[test]
fn ctrl_c_ends_a_long_load_at_once() {
    if !root() {
        skip(
            "ctrl_c_ends_a_long_load_at_once",
            "not root: merge needs a userfaultfd",
        );
        return;
    }
    let dir = tmpdir("ctrl-c");
    let img = dir.join("big.img");
    // 2 GiB of data to read and copy: seconds of work, unless Ctrl-C stops it.
    let mut f = std::fs::File::create(&img).unwrap();
    let chunk = vec![0x33u8; 1 << 20];
    for _ in 0..2048 {
        std::io::Write::write_all(&mut f, &chunk).unwrap();
    }
    drop(f);
    let mut c = spawn(&["merge", "--image", img.to_str().unwrap()]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let t0 = std::time::Instant::now();
    let kill = std::process::Command::new("kill")
        .args(["-INT", &c.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    while c.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "merge ignored Ctrl-C"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let o = c.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "interrupted: {e}");
    assert!(e.contains("interrupted"), "{e}");
    assert!(o.stdout.is_empty(), "no report after an interrupt");
    std::fs::remove_dir_all(&dir).unwrap();
}
