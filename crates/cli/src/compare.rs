//! `samepage compare`: the same bytes under samepage's live engine and under the host kernel's
//! KSM, one after the other in this process, with the same knobs, printed side by side.

use crate::args::RunArgs;
use crate::engines::{self, Kernel};
use crate::merge::{self, LiveOpts};
use crate::report::{Report, SpaceInfo};
use crate::watch::{Sample, Watch};
use clap::Args;
use samepage_engine::{PAGE_SIZE, PAGE_SIZE_U64, TUNABLE_NAMES};
use samepage_linux::host::{self, AnonMemory, KnobGuard};
use samepage_workload::Workload;
use serde::Serialize;
use std::time::Duration;

/// `samepage compare` arguments: those of `merge`.
#[derive(Args, Debug, Clone)]
pub struct CompareArgs {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub live: LiveOpts,
}

/// Knobs both engines start from (after the host's own values): zero pages on and ksmd at
/// full speed, so that the comparison measures the engines, not their sleeps.
pub const COMPARE_KNOBS: [(&str, &str); 3] = [
    ("use_zero_pages", "1"),
    ("pages_to_scan", "100000"),
    ("sleep_millisecs", "0"),
];

/// Both runs.
#[derive(Serialize)]
pub struct Comparison {
    pub samepage: Report,
    pub kernel: Report,
}

/// What `cat` shows for a knob, as a value to write: `[none] scan-time` → `none`.
fn writable(shown: &str) -> String {
    match (shown.find('['), shown.find(']')) {
        (Some(a), Some(b)) if a < b => shown[a + 1..b].to_string(),
        _ => shown.to_string(),
    }
}

/// The knobs both engines run with: the host's tunables, then [`COMPARE_KNOBS`], then `--set`.
fn knobs(args: &RunArgs) -> Result<Vec<(String, String)>, String> {
    let mut k: Vec<(String, String)> = host::tunables()
        .into_iter()
        .filter(|(n, _)| n != "run" && TUNABLE_NAMES.contains(&n.as_str()))
        .map(|(n, v)| (n, writable(&v)))
        .collect();
    let mut set = |n: &str, v: &str| match k.iter_mut().find(|(kn, _)| kn == n) {
        Some(e) => e.1 = v.to_string(),
        None => k.push((n.to_string(), v.to_string())),
    };
    for (n, v) in COMPARE_KNOBS {
        set(n, v);
    }
    for (n, v) in args.knobs()? {
        set(&n, &v);
    }
    Ok(k)
}

/// The host's ksmd on a copy of the workload: load, advise, run, check, unmerge.
fn run_kernel(
    guard: &mut KnobGuard,
    workload: &Workload,
    info: &[SpaceInfo],
    knobs: &[(String, String)],
    args: &CompareArgs,
    probe: Option<KernelProbe<'_>>,
) -> Result<(Report, Vec<Sample>), String> {
    for (k, v) in knobs {
        // samepage's own knobs have no file on the host.
        if samepage_engine::SAMEPAGE_ONLY_TUNABLES.contains(&k.as_str()) {
            continue;
        }
        if host::read_knob(k).map(|s| writable(&s)).ok().as_deref() != Some(v.as_str()) {
            guard
                .set(k, v)
                .map_err(|e| format!("the host's KSM refused {k}={v}: {e}"))?;
        }
    }
    let mut mems = Vec::new();
    let mut page = [0u8; PAGE_SIZE];
    for space in &workload.spaces {
        let m = AnonMemory::new(space.pages() * PAGE_SIZE_U64)
            .map_err(|e| format!("cannot map memory for the kernel's copy: {e}"))?;
        for i in 0..space.pages() {
            space.fill_page(i, &mut page);
            m.write(i * PAGE_SIZE_U64, &page)
                .map_err(|e| format!("cannot fill the kernel's copy: {e}"))?;
        }
        mems.push(m);
    }
    let before = merge::memory_kib();
    for m in &mems {
        m.set_mergeable(true)
            .map_err(|e| format!("madvise(MADV_MERGEABLE) failed: {e}"))?;
    }
    let mut watch = Watch::new(
        "kernel",
        workload.total_pages(),
        !args.run.json,
        args.live.prometheus.clone(),
    );
    let pid = std::process::id();
    watch.ksm_stat = Box::new(move || host::ksm_stat(pid).into_iter().collect());
    let outcome = engines::run(
        &Kernel {
            ksmd: host::ksmd_pid(),
        },
        args.run.until(),
        Duration::from_secs(args.live.timeout),
        &mut watch,
    )?;
    let after = merge::memory_kib();
    let counters = host::counters().map_err(|e| e.to_string())?;
    let ksm_stat = host::ksm_stat(pid).map_err(|e| e.to_string())?;
    if !args.live.no_verify {
        let mut got = [0u8; PAGE_SIZE];
        for (m, space) in mems.iter().zip(&workload.spaces) {
            for i in 0..space.pages() {
                space.fill_page(i, &mut page);
                m.read_page(i * PAGE_SIZE_U64, &mut got)
                    .map_err(|e| e.to_string())?;
                if got != page {
                    return Err(format!(
                        "the kernel's copy of page {i} of {} changed: the host's KSM lost data",
                        space.name
                    ));
                }
            }
        }
    }
    let tunables = host::tunables()
        .into_iter()
        .map(|(k, v)| (k, writable(&v)))
        .collect();
    let report = Report::live(
        "kernel",
        info.to_vec(),
        (counters, tunables),
        vec![ksm_stat],
        &outcome,
        before,
        after,
        None,
        None,
    );
    if let Some(p) = probe {
        p(&mems);
    }
    // Unmerge (which frees the kernel's rmap items) before the memory goes away.
    guard.unmerge_all().map_err(|e| e.to_string())?;
    drop(mems);
    Ok((report, outcome.samples))
}

/// Looks at the kernel's copy of the workload once ksmd has converged.
pub type KernelProbe<'a> = &'a mut dyn FnMut(&[AnonMemory]);

/// Looks at each engine's memory once it has converged (a benchmark's latency probe).
#[derive(Default)]
pub struct Probes<'a> {
    pub samepage: Option<&'a mut dyn FnMut(&merge::Loaded)>,
    pub kernel: Option<KernelProbe<'a>>,
}

/// Run both engines; the host's knobs are restored however this ends.
pub fn compare(
    args: &CompareArgs,
    probes: Probes<'_>,
) -> Result<(Comparison, Vec<Sample>, Vec<Sample>), String> {
    engines::catch_interrupts();
    // The host first: refusing takes no time, and nothing runs until it is ours.
    let mut guard = KnobGuard::take().map_err(|e| e.to_string())?;
    let knobs = knobs(&args.run)?;
    let workload = args.run.workload()?;
    let l = merge::load(workload.clone(), &[], &knobs)?;
    let info = l.info.clone();
    let sp = merge::run_samepage(&l, args.run.until(), &args.live, !args.run.json, None)?;
    if let Some(p) = probes.samepage {
        p(&l);
    }
    // Dropping the regions gives their memory back before the kernel's copy is made.
    drop(l);
    let (kernel, ksamples) = run_kernel(&mut guard, &workload, &info, &knobs, args, probes.kernel)?;
    drop(guard);
    if let Some(path) = &args.live.prometheus {
        let (a, b) = (&sp.report, &kernel);
        crate::prom::write_file(
            path,
            &[
                ("samepage", &a.ksm.0, &a.ksm_stat),
                ("kernel", &b.ksm.0, &b.ksm_stat),
            ],
        )
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok((
        Comparison {
            samepage: sp.report,
            kernel,
        },
        sp.samples,
        ksamples,
    ))
}

fn ratio(a: f64, b: f64) -> String {
    if b == 0.0 {
        if a == 0.0 {
            "=".into()
        } else {
            "-".into()
        }
    } else {
        format!("{:.2}", a / b)
    }
}

impl Comparison {
    /// The side-by-side table.
    pub fn text(&self) -> String {
        let (s, k) = (&self.samepage, &self.kernel);
        let pages: u64 = s.workload.iter().map(|w| w.pages).sum();
        let mut out = format!(
            "samepage compare: {} address space(s), {} pages ({:.1} MiB), the same bytes under each engine\n",
            s.workload.len(),
            pages,
            pages as f64 * PAGE_SIZE_U64 as f64 / (1 << 20) as f64
        );
        let knobs: Vec<String> = s
            .ksm
            .1
            .iter()
            .filter(|(n, _)| n != "run")
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        out += &format!("knobs (both): {}\n\n", knobs.join(" "));
        out += &format!(
            "{:<26}{:>14}{:>14}{:>18}\n",
            "", "samepage", "kernel", "samepage/kernel"
        );
        let row = |out: &mut String, name: &str, a: f64, b: f64, prec: usize| {
            *out += &format!("{name:<26}{a:>14.prec$}{b:>14.prec$}{:>18}\n", ratio(a, b));
        };
        let c = |r: &Report, n: &str| r.ksm.0.get(n).unwrap_or(0) as f64;
        for n in [
            "pages_shared",
            "pages_sharing",
            "ksm_zero_pages",
            "pages_unshared",
            "pages_volatile",
            "stable_node_chains",
            "stable_node_dups",
            "general_profit",
        ] {
            row(&mut out, n, c(s, n), c(k, n), 0);
        }
        row(
            &mut out,
            "full scans (this run)",
            s.full_scans_run as f64,
            k.full_scans_run as f64,
            0,
        );
        let mib = |b: i64| b as f64 / (1 << 20) as f64;
        row(
            &mut out,
            "saved (MiB)",
            mib(s.saved_bytes),
            mib(k.saved_bytes),
            1,
        );
        row(
            &mut out,
            "converged (s)",
            s.converged_seconds,
            k.converged_seconds,
            3,
        );
        row(
            &mut out,
            "CPU (s)",
            s.cpu_seconds.unwrap_or(0.0),
            k.cpu_seconds.unwrap_or(0.0),
            3,
        );
        let kib = |v: Option<u64>| v.unwrap_or(0) as f64 / 1024.0;
        row(
            &mut out,
            "PSS before (MiB)",
            kib(s.pss_kib_before),
            kib(k.pss_kib_before),
            1,
        );
        row(
            &mut out,
            "PSS after (MiB)",
            kib(s.pss_kib_after),
            kib(k.pss_kib_after),
            1,
        );
        row(
            &mut out,
            "anon RSS after (MiB)",
            kib(s.rss_anon_kib_after),
            kib(k.rss_anon_kib_after),
            1,
        );
        let same = s.ksm.0.merge_state() == k.ksm.0.merge_state();
        out += &format!(
            "\nsame merge counters (pages_shared, pages_sharing, ksm_zero_pages, chains, dups): {}\n",
            if same { "yes" } else { "no" }
        );
        out += "(anonymous RSS counts a KSM page once per mapping; PSS divides it among them. \
                samepage's merged pages are file pages of its store, so only PSS compares both.)\n";
        out
    }
}

/// `samepage compare`.
pub fn run(args: &CompareArgs) -> Result<(), String> {
    let (cmp, s, k) = compare(args, Probes::default())?;
    if let Some(p) = &args.live.plot {
        crate::plot::write(
            p,
            "samepage compare: samepage (solid) and the kernel's ksmd (dashed)",
            &[("samepage", &s), ("kernel", &k)],
        )?;
    }
    if args.run.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&cmp).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", cmp.text());
    }
    Ok(())
}
