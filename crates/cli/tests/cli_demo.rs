//! `samepage demo` on real memory (root or /dev/userfaultfd access, as CI has): the JSON, the
//! plot, the Prometheus file, and refusals.

mod common;
use common::*;
use samepage_workload::{GuestSpec, Workload};

fn spec(size: u64, guests: u32) -> GuestSpec {
    GuestSpec {
        size,
        guests,
        shared_pct: 35,
        unique_pct: 35,
        seed: 1,
    }
}

#[test]
fn quiet_guests_converge_to_one_os_image() {
    let v = json(&["demo", "--size", "16M", "--guests", "4", "--quiet-guests"]);
    let want = spec(16 << 20, 4).expected().unwrap();
    let k = &v["ksm"];
    assert_eq!(k["pages_shared"], want.pages_shared);
    assert_eq!(k["pages_sharing"], want.pages_sharing);
    assert_eq!(k["ksm_zero_pages"], want.ksm_zero_pages);
    assert_eq!(k["use_zero_pages"], 1);
    let saved = (want.pages_sharing + want.ksm_zero_pages) * 4096;
    assert_eq!(v["saved_bytes"], saved);
    // One ksm_stat per guest; together they hold every zero page.
    let st = v["ksm_stat"].as_array().unwrap();
    assert_eq!(st.len(), 4);
    let zero: i64 = st
        .iter()
        .map(|s| s["ksm_zero_pages"].as_i64().unwrap())
        .sum();
    assert_eq!(zero as u64, want.ksm_zero_pages);
    for f in [
        "converged_seconds",
        "cpu_seconds",
        "rss_anon_kib_before",
        "rss_anon_kib_after",
    ] {
        assert!(v[f].as_f64().unwrap() > 0.0, "{f}: {}", v[f]);
    }
    // The saved pages left anonymous memory (merged pages moved to the store: at least the
    // zero pages and the duplicates beyond their canonical page are gone).
    let freed =
        v["rss_anon_kib_before"].as_i64().unwrap() - v["rss_anon_kib_after"].as_i64().unwrap();
    assert!(
        freed as u64 >= saved / 1024,
        "freed {freed} KiB, saved {saved} B"
    );
    assert_eq!(v["live"]["agent"]["cow_merged"], 0);
    assert_eq!(v["live"]["agent"]["read_merged"], 0);
    assert_eq!(v["verification"]["present_merged"], 0);
    assert_eq!(v["verification"]["stray_marks"], 0);
}

#[test]
fn the_application_breaks_sharing_and_nothing_is_lost() {
    let dir = tmpdir("demo");
    let svg = dir.join("demo.svg");
    let prom = dir.join("demo.prom");
    let v = json(&[
        "demo",
        "--size",
        "32M",
        "--plot",
        svg.to_str().unwrap(),
        "--prometheus",
        prom.to_str().unwrap(),
    ]);
    let k = &v["ksm"];
    let want = spec(32 << 20, 4).expected().unwrap();
    // The application's writes break some sharing (and its pages then differ from the
    // other guests'); everything else is merged. The contents were checked by the run.
    let cow = v["live"]["agent"]["cow_merged"].as_u64().unwrap();
    assert!(cow > 0, "no write broke sharing: {}", v["live"]);
    let sharing = k["pages_sharing"].as_u64().unwrap();
    let zero = k["ksm_zero_pages"].as_u64().unwrap();
    assert!(
        sharing <= want.pages_sharing && sharing + 600 >= want.pages_sharing,
        "{sharing}"
    );
    assert!(
        zero <= want.ksm_zero_pages && zero + 600 >= want.ksm_zero_pages,
        "{zero}"
    );
    // The plot holds the four series, ending at the final counters.
    let svg = std::fs::read_to_string(&svg).unwrap();
    let series = svg_series(&svg, "samepage");
    let names: Vec<&str> = series.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "pages_sharing",
            "ksm_zero_pages",
            "pages_unshared",
            "saved_bytes"
        ]
    );
    for (n, pts) in &series {
        assert!(pts.len() >= 2, "{n}");
        assert!(
            pts.windows(2).all(|w| w[0].0 <= w[1].0),
            "{n}: time goes forward"
        );
    }
    // The Prometheus file holds the final counters under the kernel's names.
    let p = std::fs::read_to_string(&prom).unwrap();
    for c in samepage_engine::COUNTER_NAMES {
        let name = if c.starts_with("ksm_") {
            c.to_string()
        } else {
            format!("ksm_{c}")
        };
        let line = format!("{name}{{engine=\"samepage\"}} {}\n", k[c]);
        assert!(p.contains(&line), "{line} not in\n{p}");
    }
    assert!(p.contains(&format!(
        "ksm_saved_bytes{{engine=\"samepage\"}} {}\n",
        v["saved_bytes"]
    )));
    // `samepage stat --samepage` reads it back.
    let st = json(&["stat", "--samepage", prom.to_str().unwrap()]);
    assert_eq!(st["ksm"]["pages_sharing"], k["pages_sharing"]);
    assert_eq!(st["derived"]["saved_bytes"], v["saved_bytes"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn text_report_says_what_was_saved() {
    let out = samepage(&["demo", "--size", "8M", "--guests", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = String::from_utf8(out.stdout).unwrap();
    for s in [
        "samepage demo: 2 guest processes of 4 MiB each",
        "\npages_sharing ",
        "\nksm_zero_pages ",
        "saved: ",
        "anonymous memory: ",
        "engine CPU: ",
        "faults on merged pages: ",
        "converged after ",
        "verified: ",
    ] {
        assert!(t.contains(s), "{s:?} not in\n{t}");
    }
}

#[test]
fn bad_input_is_refused_with_a_clear_message() {
    let e = err(&["demo", "--size", "16K"]);
    assert!(e.contains("pages per guest"), "{e}");
    let e = err(&["demo", "--guests", "0"]);
    assert!(e.contains("--guests 0 must be between 1 and 64"), "{e}");
    let e = err(&["demo", "--size", "lots"]);
    assert!(e.contains("not a size"), "{e}");
    let e = err(&["demo", "--set", "bogus=1"]);
    assert!(e.contains("unknown KSM knob 'bogus'"), "{e}");
    let e = err(&["demo", "--set", "max_page_sharing=1"]);
    assert!(e.contains("EINVAL"), "{e}");
    let e = err(&["demo", "--set", "run=1"]);
    assert!(e.contains("not allowed"), "{e}");
    let e = err(&["stat", "--samepage", "/nonexistent/samepage.prom"]);
    assert!(e.contains("cannot read /nonexistent/samepage.prom"), "{e}");
}

#[test]
fn the_guests_share_their_os_image_at_the_same_addresses() {
    let w = Workload::guests(&spec(1 << 20, 2)).unwrap();
    let mut a = [0u8; 4096];
    let mut b = [0u8; 4096];
    let kinds = spec(1 << 20, 2).layout().unwrap();
    for (i, k) in kinds.iter().enumerate() {
        w.spaces[0].fill_page(i as u64, &mut a);
        w.spaces[1].fill_page(i as u64, &mut b);
        assert_eq!(
            a == b,
            *k != samepage_workload::GuestPage::Unique,
            "page {i}"
        );
    }
}

/// Without root, CAP_SYS_PTRACE or /dev/userfaultfd access, samepage cannot handle faults of
/// system calls: it must refuse to start with a sentence that says so (and what to do),
/// not run in a mode where read(2) into merged memory fails with EFAULT.
#[test]
fn without_privileges_it_refuses_with_one_sentence() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: cannot drop to an unprivileged user here; skipped");
        return;
    }
    // A copy of the binary that user 65534 may run.
    let dir = tmpdir("nobody");
    let bin = dir.join("samepage");
    std::fs::copy(env!("CARGO_BIN_EXE_samepage"), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
            ])
            .arg(&bin)
            .args(args)
            .output()
            .expect("setpriv (util-linux)")
    };
    for cmd in [&["demo", "--size", "1M"][..], &["merge", "--size", "1M"]] {
        let out = run(cmd);
        let e = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(69), "unavailable: {cmd:?}: {e}");
        assert!(
            e.contains("cannot open a userfaultfd that handles faults from system calls")
                && e.contains("Run it as root, give it CAP_SYS_PTRACE, or grant read-write access to /dev/userfaultfd"),
            "{e}"
        );
        assert_eq!(e.trim().lines().count(), 1, "one sentence: {e}");
    }
    // The host's KSM needs root to drive, but anyone may read it.
    let out = run(&["compare", "--size", "1M"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "permission denied: {e}");
    assert!(e.contains("needs root"), "{e}");
    let out = run(&["stat", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
