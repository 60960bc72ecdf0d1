//! `samepage merge` on real memory (needs root or /dev/userfaultfd access, as CI has).

mod common;
use common::*;
use std::io::Write;

const SAME: &[&str] = &[
    "pages_shared",
    "pages_sharing",
    "ksm_zero_pages",
    "stable_node_chains",
    "stable_node_dups",
];

#[test]
fn simulate_and_merge_agree_on_the_same_image() {
    let dir = std::env::temp_dir().join(format!("samepage-merge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("guest.img");
    let mut f = std::fs::File::create(&img).unwrap();
    // 1200 pages: zeros, 3 contents in groups (one larger than max_page_sharing=8), unique.
    for i in 0..1200u32 {
        let mut p = [0u8; 4096];
        match i % 6 {
            0 | 1 => {}
            2 => p.fill(0x11),
            3 => p.fill(if i % 12 == 3 { 0x22 } else { 0x33 }),
            _ => p[..4].copy_from_slice(&i.to_le_bytes()),
        }
        f.write_all(&p).unwrap();
    }
    drop(f);
    let img = img.to_str().unwrap();
    for zero in ["0", "1"] {
        let common = [
            "--image",
            img,
            "--set",
            "max_page_sharing=8",
            "--set",
            &format!("use_zero_pages={zero}"),
            "--set",
            "pages_to_scan=500",
            "--set",
            "sleep_millisecs=0",
        ];
        let mut sim_args = vec!["simulate"];
        sim_args.extend_from_slice(&common);
        let mut live_args = vec!["merge"];
        live_args.extend_from_slice(&common);
        let sim = json(&sim_args);
        let live = json(&live_args);
        // The live scanner may finish one more full scan before it sees run=0; the merge
        // counters are the same whichever.
        assert!(live["ksm"]["full_scans"].as_i64() >= sim["ksm"]["full_scans"].as_i64());
        for c in SAME {
            assert_eq!(
                sim["ksm"][c], live["ksm"][c],
                "{c} with use_zero_pages={zero}"
            );
        }
        for f in ["ksm_zero_pages", "ksm_merging_pages", "ksm_rmap_items"] {
            assert_eq!(sim["ksm_stat"][0][f], live["ksm_stat"][0][f], "{f}");
        }
        assert!(live["ksm"]["pages_sharing"].as_i64().unwrap() > 0);
        for f in [
            "converged_seconds",
            "cpu_seconds",
            "rss_anon_kib_before",
            "rss_anon_kib_after",
        ] {
            assert!(live[f].is_number(), "missing {f}");
        }
        let saved = live["ksm"]["pages_sharing"].as_i64().unwrap()
            + live["ksm"]["ksm_zero_pages"].as_i64().unwrap();
        let freed = live["rss_anon_kib_before"].as_i64().unwrap()
            - live["rss_anon_kib_after"].as_i64().unwrap();
        // Every saved page (and the pages that became canonical pages in the memfd store) left
        // the anonymous memory.
        assert!(
            freed >= saved * 4,
            "freed {freed} KiB for {saved} saved pages"
        );
        assert_eq!(live["verification"]["present_merged"], 0);
        assert_eq!(live["verification"]["stray_marks"], 0);
        // The honest saving: what samepage's bookkeeping and its own mappings cost comes
        // off it. Its mappings: ksmd's and the agent's views of the store, the scratch
        // area, and the stacks of the scanner, the reader and the fault handler, each with
        // its guard page.
        let n = |v: &serde_json::Value| v.as_i64().unwrap();
        let f = &live["footprint"];
        assert_eq!(n(&f["mappings"]), 2 + 1 + 3 * 2, "{f}");
        assert_eq!(n(&f["splits"]), 0, "merge maps its regions itself: {f}");
        assert!(n(&f["mapping_bytes"]) >= n(&f["mappings"]) * 192, "{f}");
        assert!(
            n(&f["page_table_bytes"]) > 0,
            "the store views map pages: {f}"
        );
        let md = &live["metadata"];
        assert_eq!(
            n(&live["net_saved_bytes"]),
            n(&live["saved_bytes"])
                - n(&md["engine_bytes"])
                - n(&md["page_state_bytes"])
                - n(&f["mapping_bytes"])
                - n(&f["page_table_bytes"])
        );
        assert_eq!(
            n(&sim["net_saved_bytes"]),
            n(&sim["saved_bytes"]) - n(&sim["metadata"]["engine_bytes"])
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_is_refused_with_a_clear_message() {
    let e = err(&["merge", "--image", "/nonexistent/samepage.img"]);
    assert!(
        e.contains("cannot read image /nonexistent/samepage.img"),
        "{e}"
    );
    let dir = tmpdir("merge-bad");
    let img = dir.join("short.img");
    std::fs::write(&img, [1u8; 5000]).unwrap();
    let e = err(&["merge", "--image", img.to_str().unwrap()]);
    assert!(
        e.contains("not a multiple of the 4096-byte page size"),
        "{e}"
    );
    let e = err(&["merge", "--size", "12345"]);
    assert!(e.contains("multiple of 4096"), "{e}");
    let e = err(&["merge", "--set", "bogus=1"]);
    assert!(e.contains("unknown KSM knob 'bogus'"), "{e}");
    let e = err(&["merge", "--set", "pages_to_scan=-1"]);
    assert!(e.contains("EINVAL"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
