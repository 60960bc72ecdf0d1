//! The commands that read or drive the host kernel's KSM: `compare` and `stat` (root, as CI
//! runs). They share /sys/kernel/mm/ksm with everything else on the machine, so the tests of
//! this file hold one lock, and each checks that every knob is back as it was.

mod common;
use common::*;
use std::sync::Mutex;

static HOST: Mutex<()> = Mutex::new(());

const KSM: &str = "/sys/kernel/mm/ksm";

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

fn counter(name: &str) -> i64 {
    std::fs::read_to_string(format!("{KSM}/{name}"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Puts `run` back even if the test fails half-way.
struct RunBack(String);
impl Drop for RunBack {
    fn drop(&mut self) {
        let _ = std::fs::write(format!("{KSM}/run"), &self.0);
    }
}

#[test]
fn compare_runs_both_engines_on_the_same_bytes_and_restores_the_host() {
    let _g = HOST.lock().unwrap_or_else(|e| e.into_inner());
    let before = knobs();
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
    assert_eq!(knobs(), before, "the host's knobs were not restored");
    assert_eq!(
        counter("pages_shared"),
        0,
        "the kernel's merged pages were left"
    );
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
    let _g = HOST.lock().unwrap_or_else(|e| e.into_inner());
    let before = knobs();
    let e = err(&["compare", "--size", "4M", "--set", "bogus=1"]);
    assert!(e.contains("unknown KSM knob 'bogus'"), "{e}");
    let e = err(&["compare", "--size", "4M", "--set", "max_page_sharing=1"]);
    assert!(e.contains("EINVAL"), "{e}");
    let e = err(&["compare", "--image", "/nonexistent/samepage.img"]);
    assert!(
        e.contains("cannot read image /nonexistent/samepage.img"),
        "{e}"
    );
    assert_eq!(knobs(), before);
    // ksmd running (with nothing to merge): compare must not take it over.
    let run = std::fs::read_to_string(format!("{KSM}/run")).unwrap();
    let _back = RunBack(run);
    std::fs::write(format!("{KSM}/run"), "1").unwrap();
    let e = err(&["compare", "--size", "4M"]);
    assert!(e.contains("already running"), "{e}");
    assert_eq!(
        std::fs::read_to_string(format!("{KSM}/run"))
            .unwrap()
            .trim(),
        "1"
    );
}

#[test]
fn stat_shows_the_host_in_the_kernel_layout() {
    let _g = HOST.lock().unwrap_or_else(|e| e.into_inner());
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
    let _g = HOST.lock().unwrap_or_else(|e| e.into_inner());
    let before = knobs();
    let maps = std::fs::read_to_string("/proc/sys/vm/max_map_count").unwrap();
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
    assert_eq!(knobs(), before, "the host's knobs were not restored");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/vm/max_map_count").unwrap(),
        maps,
        "vm.max_map_count was not restored"
    );
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
    let lat = v["latency"].as_array().unwrap();
    assert_eq!(lat.len(), 4);
    for l in lat {
        assert!(l["pages"].as_u64().unwrap() > 50, "{l}");
        assert!(l["p50_us"].as_f64().unwrap() <= l["p99_us"].as_f64().unwrap());
    }
    assert_eq!(v["metadata"]["kernel_bytes_per_page"], 64);
    // All unique: the items and the unstable tree, measured on the live engine.
    let per = rows[1]["samepage_metadata_bytes_per_rmap_item"]
        .as_f64()
        .unwrap();
    assert!(per > 13.0 && per <= 16.0, "{}", rows[1]);
    let e = err(&["bench", "--runs", "0"]);
    assert!(e.contains("--runs must be at least 1"), "{e}");
}
