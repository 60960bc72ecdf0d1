//! `samepage simulate`, run as a user would: JSON fields and values, exit codes, messages.

mod common;
use common::*;
use std::io::Write;

use samepage_engine::COUNTER_NAMES as COUNTERS;

#[test]
fn metadata_per_rmap_item_is_measured_and_small() {
    // All unique: every page keeps an rmap item in the unstable tree.
    let v = json(&["simulate", "--size", "16M", "--zero", "0", "--dup", "0"]);
    let m = &v["metadata"];
    assert_eq!(m["rmap_items"], 4096);
    let per = m["engine_bytes_per_rmap_item"].as_f64().unwrap();
    // An item alone is 9 bytes; chunks and the unstable tree's buckets add to it.
    assert!(per > 9.0 && per <= 16.0, "{m}");
    assert_eq!(
        m["engine_bytes"].as_f64().unwrap(),
        per * 4096.0,
        "bytes per item is the total over the items"
    );
    assert!(
        m["page_state_bytes"].is_null(),
        "the simulator has no live page states"
    );
}

#[test]
fn generated_workload_converges_to_the_expected_counters() {
    // 2048 pages: 614 zero, 51 groups of 16 (816 pages), 618 unique.
    for (zero, shared, sharing, zeros) in [("1", 51, 765, 614), ("0", 51 + 3, 765 + 611, 0)] {
        let v = json(&[
            "simulate",
            "--size",
            "8M",
            "--set",
            &format!("use_zero_pages={zero}"),
        ]);
        let k = &v["ksm"];
        for c in COUNTERS {
            assert!(k[c].is_i64(), "missing counter {c}");
        }
        assert_eq!(k["pages_shared"], shared, "use_zero_pages={zero}");
        assert_eq!(k["pages_sharing"], sharing);
        assert_eq!(k["ksm_zero_pages"], zeros);
        assert!(k["full_scans"].as_i64().unwrap() >= 3);
        let st = &v["ksm_stat"][0];
        for f in [
            "ksm_rmap_items",
            "ksm_zero_pages",
            "ksm_merging_pages",
            "ksm_process_profit",
            "ksm_merge_any",
            "ksm_mergeable",
        ] {
            assert!(!st[f].is_null(), "missing ksm_stat field {f}");
        }
        assert_eq!(st["ksm_zero_pages"], zeros);
        assert_eq!(st["ksm_merging_pages"], shared + sharing);
    }
}

#[test]
fn group_larger_than_max_page_sharing_makes_chains() {
    let v = json(&[
        "simulate",
        "--size",
        "1M",
        "--zero",
        "0",
        "--dup",
        "100",
        "--group",
        "64",
        "--set",
        "max_page_sharing=10",
    ]);
    // 256 pages = 4 groups of 64; 64 % 10 == 4, so 7 KSM pages per group.
    assert_eq!(v["ksm"]["pages_shared"], 28);
    assert_eq!(v["ksm"]["pages_sharing"], 256 - 28);
    assert_eq!(v["ksm"]["stable_node_chains"], 4);
    assert_eq!(v["ksm"]["stable_node_dups"], 28);
}

#[test]
fn images_are_address_spaces() {
    let dir = std::env::temp_dir().join(format!("samepage-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let a = dir.join("a.img");
    let b = dir.join("b.img");
    let mut fa = std::fs::File::create(&a).unwrap();
    for i in 0..8u8 {
        fa.write_all(&[i % 2 * 0x11; 4096]).unwrap(); // 4 zero pages, 4 pages of 0x11
    }
    let mut fb = std::fs::File::create(&b).unwrap();
    fb.write_all(&[0x11; 4096 * 2]).unwrap();
    fb.write_all(&[0x22; 4096]).unwrap();
    drop((fa, fb));
    let v = json(&[
        "simulate",
        "--image",
        a.to_str().unwrap(),
        "--image",
        b.to_str().unwrap(),
        "--set",
        "use_zero_pages=1",
    ]);
    assert_eq!(v["ksm"]["pages_shared"], 1);
    assert_eq!(v["ksm"]["pages_sharing"], 5);
    assert_eq!(v["ksm"]["ksm_zero_pages"], 4);
    assert_eq!(v["ksm_stat"].as_array().unwrap().len(), 2);
    assert_eq!(v["ksm_stat"][0]["ksm_zero_pages"], 4);
    assert_eq!(v["ksm_stat"][1]["ksm_zero_pages"], 0);
    assert_eq!(v["ksm_stat"][1]["ksm_merging_pages"], 2);

    let odd = dir.join("odd.img");
    std::fs::write(&odd, [1u8; 5000]).unwrap();
    let e = err(&["simulate", "--image", odd.to_str().unwrap()]);
    assert!(
        e.contains("not a multiple of the 4096-byte page size"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn full_scans_stops_after_n() {
    let v = json(&["simulate", "--size", "1M", "--full-scans", "1"]);
    assert_eq!(v["ksm"]["full_scans"], 1);
    // One pass only records checksums: nothing can merge yet.
    assert_eq!(v["ksm"]["pages_sharing"], 0);
    assert_eq!(v["ksm"]["pages_volatile"], 256);
}

#[test]
fn text_output_uses_the_kernel_layouts() {
    let out = samepage(&["simulate", "--size", "1M", "--set", "use_zero_pages=1"]);
    assert!(out.status.success());
    let t = String::from_utf8(out.stdout).unwrap();
    assert!(t.contains("\npages_sharing "), "{t}");
    assert!(t.contains("\nksm_merge_any: no\n"), "{t}");
    assert!(t.contains("saved: "), "{t}");
}

#[test]
fn bad_input_is_refused_with_a_clear_message() {
    let e = err(&["simulate", "--image", "/nonexistent/samepage.img"]);
    assert!(
        e.contains("cannot read image /nonexistent/samepage.img"),
        "{e}"
    );
    let e = err_code(&["simulate", "--size", "1M", "--set", "bogus=1"], 2);
    assert!(e.contains("unknown KSM knob 'bogus'"), "{e}");
    let e = err_code(
        &["simulate", "--size", "1M", "--set", "max_page_sharing=1"],
        2,
    );
    assert!(e.contains("EINVAL"), "{e}");
    let e = err_code(&["simulate", "--size", "1M", "--set", "pages_shared=1"], 2);
    assert!(e.contains("read-only"), "{e}");
    let e = err_code(&["simulate", "--size", "1M", "--set", "use_zero_pages"], 2);
    assert!(e.contains("KNOB=VALUE"), "{e}");
    let e = err_code(&["simulate", "--size", "1M", "--set", "run=1"], 2);
    assert!(e.contains("not allowed"), "{e}");
    let e = err_code(&["simulate", "--size", "1000"], 2);
    assert!(e.contains("multiple of 4096"), "{e}");
    let e = err_code(&["simulate", "--zero", "70", "--dup", "50"], 2);
    assert!(e.contains("at most 100"), "{e}");
    let out = samepage(&["simulate", "--size", "lots"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn help_lists_the_exit_statuses() {
    let out = samepage(&["--help"]);
    assert!(out.status.success());
    let h = String::from_utf8_lossy(&out.stdout);
    for line in [
        "Exit status:",
        "2    bad usage",
        "69   unavailable",
        "130  interrupted",
    ] {
        assert!(h.contains(line), "{line:?} in {h}");
    }
}
