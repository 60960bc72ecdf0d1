//! The counters in the Prometheus text exposition format, by the kernel's names: the files of
//! `/sys/kernel/mm/ksm` as `ksm_<file>` (`ksm_zero_pages` keeps its name), the lines of
//! `/proc/<pid>/ksm_stat` as `ksm_process_*{pid=...}`, and the memory saved.

use samepage_engine::{KsmCounters, KsmStat, COUNTER_NAMES, PAGE_SIZE_U64};
use std::fmt::Write as _;
use std::path::Path;

/// The metric name of a sysfs counter.
pub fn metric_name(counter: &str) -> String {
    if counter.starts_with("ksm_") {
        counter.to_string()
    } else {
        format!("ksm_{counter}")
    }
}

fn help(counter: &str) -> &'static str {
    match counter {
        "full_scans" => "Full scans of all mergeable areas completed (reset by run=2).",
        "general_profit" => "Bytes saved minus the bytes of KSM metadata (rmap items).",
        "ksm_zero_pages" => "Zero-filled pages KSM replaced by the shared zero page and still mapped (use_zero_pages).",
        "pages_scanned" => "Pages KSM has scanned.",
        "pages_shared" => "KSM pages in use (each backs one or more mappings).",
        "pages_sharing" => "Further mappings of KSM pages: the pages saved by merging.",
        "pages_skipped" => "Pages smart scan skipped.",
        "pages_unshared" => "Pages checked but unique so far (unstable tree).",
        "pages_volatile" => "Pages changing too fast to be merged.",
        "stable_node_chains" => "KSM pages that reached max_page_sharing (chains).",
        "stable_node_dups" => "Duplicate KSM pages hanging in chains.",
        _ => "",
    }
}

/// One exposition of the counters of several engines (`engine` label), with the
/// per-process figures of each.
pub fn text(engines: &[(&str, &KsmCounters, &[KsmStat])]) -> String {
    let mut out = String::new();
    for name in COUNTER_NAMES {
        let m = metric_name(name);
        let _ = writeln!(out, "# HELP {m} {}", help(name));
        let _ = writeln!(out, "# TYPE {m} gauge");
        for (engine, c, _) in engines {
            let v = c.get(name).expect("known counter");
            let _ = writeln!(out, "{m}{{engine=\"{engine}\"}} {v}");
        }
    }
    let _ = writeln!(
        out,
        "# HELP ksm_saved_bytes Memory saved: (pages_sharing + ksm_zero_pages) * page size."
    );
    let _ = writeln!(out, "# TYPE ksm_saved_bytes gauge");
    for (engine, c, _) in engines {
        let _ = writeln!(
            out,
            "ksm_saved_bytes{{engine=\"{engine}\"}} {}",
            c.saved_pages() * PAGE_SIZE_U64 as i64
        );
    }
    type Field = fn(&KsmStat) -> i64;
    let per_process: [(&str, &str, Field); 4] = [
        (
            "ksm_process_rmap_items",
            "ksm_rmap_items of /proc/<pid>/ksm_stat.",
            |s| s.ksm_rmap_items as i64,
        ),
        (
            "ksm_process_zero_pages",
            "ksm_zero_pages of /proc/<pid>/ksm_stat.",
            |s| s.ksm_zero_pages,
        ),
        (
            "ksm_process_merging_pages",
            "ksm_merging_pages of /proc/<pid>/ksm_stat.",
            |s| s.ksm_merging_pages as i64,
        ),
        (
            "ksm_process_profit",
            "ksm_process_profit of /proc/<pid>/ksm_stat, bytes.",
            |s| s.ksm_process_profit,
        ),
    ];
    if engines.iter().any(|(_, _, s)| !s.is_empty()) {
        for (m, h, f) in per_process {
            let _ = writeln!(out, "# HELP {m} {h}");
            let _ = writeln!(out, "# TYPE {m} gauge");
            for (engine, _, stats) in engines {
                for s in stats.iter() {
                    let _ = writeln!(out, "{m}{{engine=\"{engine}\",pid=\"{}\"}} {}", s.pid, f(s));
                }
            }
        }
    }
    out
}

/// Replace `path` with a new exposition, atomically (a scraper never reads half a file).
pub fn write_file(
    path: &Path,
    engines: &[(&str, &KsmCounters, &[KsmStat])],
) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text(engines))?;
    std::fs::rename(&tmp, path)
}

/// Read back a file this module wrote: (engine, counters) for each engine in it.
pub fn parse(s: &str) -> Vec<(String, KsmCounters)> {
    let mut out: Vec<(String, KsmCounters)> = Vec::new();
    for line in s.lines().filter(|l| !l.starts_with('#')) {
        let Some((lhs, v)) = line.rsplit_once(' ') else {
            continue;
        };
        let Some((metric, labels)) = lhs.split_once('{') else {
            continue;
        };
        let Some(engine) = labels
            .split(',')
            .find_map(|l| l.strip_prefix("engine=\""))
            .map(|e| e.trim_end_matches(['}', '"']).to_string())
        else {
            continue;
        };
        let Some(counter) = COUNTER_NAMES.iter().find(|n| metric_name(n) == metric) else {
            continue;
        };
        let Ok(v) = v.parse::<i64>() else { continue };
        let i = match out.iter().position(|(e, _)| *e == engine) {
            Some(i) => i,
            None => {
                out.push((engine, KsmCounters::default()));
                out.len() - 1
            }
        };
        let c = &mut out[i].1;
        let u = v.max(0) as u64;
        match *counter {
            "full_scans" => c.full_scans = u,
            "general_profit" => c.general_profit = v,
            "ksm_zero_pages" => c.ksm_zero_pages = v,
            "pages_scanned" => c.pages_scanned = u,
            "pages_shared" => c.pages_shared = u,
            "pages_sharing" => c.pages_sharing = u,
            "pages_skipped" => c.pages_skipped = u,
            "pages_unshared" => c.pages_unshared = u,
            "pages_volatile" => c.pages_volatile = u,
            "stable_node_chains" => c.stable_node_chains = u,
            "stable_node_dups" => c.stable_node_dups = u,
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_round_trips_and_uses_kernel_names() {
        let c = KsmCounters {
            pages_shared: 3,
            pages_sharing: 40,
            ksm_zero_pages: 7,
            full_scans: 2,
            general_profit: -5,
            ..KsmCounters::default()
        };
        let k = KsmCounters {
            pages_sharing: 1,
            ..KsmCounters::default()
        };
        let st = [KsmStat {
            pid: 9,
            ksm_zero_pages: 7,
            ..KsmStat::default()
        }];
        let t = text(&[("samepage", &c, &st), ("kernel", &k, &[])]);
        assert!(t.contains("ksm_pages_sharing{engine=\"samepage\"} 40\n"));
        assert!(t.contains("ksm_zero_pages{engine=\"samepage\"} 7\n"));
        assert!(t.contains("ksm_saved_bytes{engine=\"samepage\"} 192512\n"));
        assert!(t.contains("ksm_process_zero_pages{engine=\"samepage\",pid=\"9\"} 7\n"));
        assert!(!t.contains("ksm_ksm_zero_pages"));
        // Every sample line is `name{labels} value` and every metric has HELP and TYPE.
        for l in t.lines().filter(|l| !l.starts_with('#')) {
            let (lhs, v) = l.rsplit_once(' ').unwrap();
            assert!(v.parse::<i64>().is_ok(), "{l}");
            let m = lhs.split('{').next().unwrap();
            assert!(t.contains(&format!("# TYPE {m} gauge")), "{m}");
        }
        let back = parse(&t);
        assert_eq!(
            back,
            vec![("samepage".to_string(), c), ("kernel".to_string(), k)]
        );
    }
}
