//! `samepage compare`: the same bytes under samepage's live engine and under the host kernel's
//! KSM, one after the other in this process, with the same knobs, printed side by side.
//!
//! The host is held by a [`HostSession`] from before the first look at its knobs to the end:
//! one command at a time, every knob saved to disk first and put back however the command
//! ends (see `samepage_linux::host`).

use crate::args::{check_knobs, parse_knobs, RunArgs};
use crate::engines::{self, Kernel};
use crate::error::CliError;
use crate::merge::{self, LiveOpts};
use crate::report::{Report, SpaceInfo};
use crate::watch::{Sample, Watch};
use clap::Args;
use samepage_engine::{PAGE_SIZE, PAGE_SIZE_U64, SAMEPAGE_ONLY_TUNABLES, TUNABLE_NAMES};
use samepage_linux::host::{self, AnonMemory, HostError, HostSession, Waiting};
use samepage_workload::Workload;
use serde::Serialize;
use std::time::Duration;

/// `samepage compare` arguments: those of `merge`, and how long to wait for the host.
#[derive(Args, Debug, Clone)]
pub struct CompareArgs {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub live: LiveOpts,
    /// Wait at most this many seconds for another command that uses the host's KSM to finish
    /// (0: refuse at once if one is running).
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub wait: u64,
}

/// Knobs both engines start from (after the host's own values): zero pages on and ksmd at
/// full speed, without the advisor, so that the comparison measures the engines, not their
/// sleeps, whatever the host's advisor does. `--set advisor_mode=scan-time` brings the advisor
/// back (and then it sets `pages_to_scan`).
pub const COMPARE_KNOBS: [(&str, &str); 4] = [
    ("advisor_mode", "none"),
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

/// `--set` checked before the host is taken: its shape, then every value with the kernel's
/// validation, on a simulated machine at the kernel's defaults (which costs nothing).
pub fn check_set(set: &[String]) -> Result<(), CliError> {
    let mut sim = samepage_sim::SimSystem::new();
    for (k, v) in parse_knobs(set)? {
        sim.write_knob(&k, &v)
            .map_err(CliError::knob(format!("--set {k}={v}")))?;
    }
    Ok(())
}

/// The knobs both engines run with, in the order they are written: the host's tunables, then
/// [`COMPARE_KNOBS`], then `--set`; without `pages_to_scan` when the advisor sets it.
pub(crate) fn knobs(args: &RunArgs) -> Result<Vec<(String, String)>, CliError> {
    let mut k: Vec<(String, String)> = host::tunables()
        .into_iter()
        .filter(|(n, _)| n != "run" && TUNABLE_NAMES.contains(&n.as_str()))
        .map(|(n, v)| (n, host::parse_shown(&v)))
        .collect();
    let mut set = |n: &str, v: &str| match k.iter_mut().find(|(kn, _)| kn == n) {
        Some(e) => e.1 = v.to_string(),
        None => k.push((n.to_string(), v.to_string())),
    };
    for (n, v) in COMPARE_KNOBS {
        set(n, v);
    }
    for (n, v) in parse_knobs(&args.set)? {
        set(&n, &v);
    }
    if k.iter()
        .any(|(n, v)| n == "advisor_mode" && v.trim() == "scan-time")
    {
        k.retain(|(n, _)| n != "pages_to_scan");
    }
    check_knobs(&k)?;
    host::sort_for_writing(&mut k);
    Ok(k)
}

/// Take the host's KSM for a command, saying on standard error whom it waits for and what it
/// put back of a command that was killed.
pub fn take_host(wait_secs: u64) -> Result<HostSession, CliError> {
    let mut notify = |m: &str| eprintln!("samepage: {m}");
    Ok(HostSession::take_ksm(&mut Waiting {
        max: Duration::from_secs(wait_secs),
        interrupted: &engines::interrupted_now,
        notify: &mut notify,
    })?)
}

/// End a command that held the host: put everything back, read it back, and join what
/// happened to the command's own outcome. "Put back" is said only after reading back.
pub fn release_host<T>(host: HostSession, result: Result<T, CliError>) -> Result<T, CliError> {
    match (result, host.finish()) {
        (Ok(v), Ok(())) => Ok(v),
        (Ok(_), Err(e)) => Err(e.into()),
        (Err(e), Ok(())) => Err(CliError::HostRestored(Box::new(e))),
        (Err(e), Err(r)) => Err(CliError::Both {
            first: Box::new(e),
            then: Box::new(r.into()),
        }),
    }
}

/// The host's ksmd on a copy of the workload: load, advise, run, check, then end the kernel
/// phase (unmerge, knobs back) whatever happened.
fn run_kernel(
    host: &mut HostSession,
    workload: &Workload,
    info: &[SpaceInfo],
    knobs: &[(String, String)],
    args: &CompareArgs,
    probe: Option<KernelProbe<'_>>,
) -> Result<(Report, Vec<Sample>), CliError> {
    let mut mems = Vec::new();
    let mut page = [0u8; PAGE_SIZE];
    for space in &workload.spaces {
        let m = AnonMemory::new(space.pages() * PAGE_SIZE_U64)
            .map_err(CliError::io("cannot map memory for the kernel's copy"))?;
        for i in 0..space.pages() {
            if i % 4096 == 0 {
                engines::interrupted()?;
            }
            space.fill_page(i, &mut page);
            m.write(i * PAGE_SIZE_U64, &page)
                .map_err(CliError::io("cannot fill the kernel's copy"))?;
        }
        mems.push(m);
    }
    in_kernel_phase(
        host,
        knobs,
        mems,
        &[],
        |mems| kernel_phase(workload, info, mems, args, probe),
        |mems| {
            for m in mems.iter() {
                let _ = m.set_mergeable(false);
            }
        },
    )
}

/// Run `phase` under the host's ksmd with `knobs` (samepage's own left out), on `mem`, the
/// memory advised to it (processes `own` hold it too, besides this one). The end of the
/// phase, however it went: run=2 (which also frees the kernel's rmap items) before `mem`
/// goes away, then every knob back, run last, read back; but if another process uses KSM
/// now, only `mem` is unmerged (`unadvise`), and the phase fails with
/// [`HostError::OthersStarted`].
pub(crate) fn in_kernel_phase<M, T>(
    host: &mut HostSession,
    knobs: &[(String, String)],
    mut mem: M,
    own: &[u32],
    phase: impl FnOnce(&mut M) -> Result<T, CliError>,
    unadvise: impl FnOnce(&mut M),
) -> Result<T, CliError> {
    // Still idle, and nobody else started using KSM meanwhile: ksmd would merge their pages
    // too, and the end of the phase unmerge them.
    host.check_idle()?;
    let host_knobs: Vec<(String, String)> = knobs
        .iter()
        .filter(|(k, _)| !SAMEPAGE_ONLY_TUNABLES.contains(&k.as_str()))
        .cloned()
        .collect();
    let result = host
        .apply(&host_knobs)
        .map_err(CliError::from)
        .and_then(|()| phase(&mut mem));
    let others: Vec<_> = host::other_ksm_users()
        .into_iter()
        .filter(|u| !own.contains(&u.pid))
        .collect();
    if !others.is_empty() {
        unadvise(&mut mem);
    }
    let ended = host.end_phase(others.is_empty());
    drop(mem);
    let r = result?;
    if !others.is_empty() {
        return Err(HostError::OthersStarted(host::list_users(&others)).into());
    }
    ended?;
    Ok(r)
}

/// Advise the kernel's copy mergeable, run ksmd, check the copy, report.
fn kernel_phase(
    workload: &Workload,
    info: &[SpaceInfo],
    mems: &[AnonMemory],
    args: &CompareArgs,
    probe: Option<KernelProbe<'_>>,
) -> Result<(Report, Vec<Sample>), CliError> {
    let before = merge::memory_kib();
    for m in mems {
        m.set_mergeable(true)
            .map_err(CliError::io("madvise(MADV_MERGEABLE) failed"))?;
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
    let counters = host::counters()?;
    let ksm_stat = host::ksm_stat(pid)?;
    if !args.live.no_verify {
        let mut page = [0u8; PAGE_SIZE];
        let mut got = [0u8; PAGE_SIZE];
        for (m, space) in mems.iter().zip(&workload.spaces) {
            for i in 0..space.pages() {
                if i % 4096 == 0 {
                    engines::interrupted()?;
                }
                space.fill_page(i, &mut page);
                m.read_page(i * PAGE_SIZE_U64, &mut got)
                    .map_err(CliError::io("cannot read the kernel's copy"))?;
                if got != page {
                    return Err(CliError::Verification(format!(
                        "the kernel's copy of page {i} of {} changed: the host's KSM lost data",
                        space.name
                    )));
                }
            }
        }
    }
    let tunables = host::tunables()
        .into_iter()
        .map(|(k, v)| (k, host::parse_shown(&v)))
        .collect();
    let general_profit = counters.general_profit;
    let mut report = Report::live(
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
    report.net_saved_bytes = Some(general_profit);
    if let Some(p) = probe {
        p(mems);
    }
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

/// Run both engines on `workload` with the host held by `host`; the knobs are put back at
/// the end of the kernel phase however it ends (and by `host` after that).
pub fn compare(
    host: &mut HostSession,
    args: &CompareArgs,
    workload: &Workload,
    probes: Probes<'_>,
) -> Result<(Comparison, Vec<Sample>, Vec<Sample>), CliError> {
    host.check_idle()?;
    let knobs = knobs(&args.run)?;
    let l = merge::load(workload.clone(), &[], &knobs)?;
    let info = l.info.clone();
    let sp = merge::run_samepage(&l, args.run.until(), &args.live, !args.run.json, None)?;
    if let Some(p) = probes.samepage {
        p(&l);
    }
    // Dropping the regions gives their memory back before the kernel's copy is made.
    drop(l);
    let (kernel, ksamples) = run_kernel(host, workload, &info, &knobs, args, probes.kernel)?;
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
            "net saved (MiB)",
            mib(s.net_saved_bytes.unwrap_or(0)),
            mib(k.net_saved_bytes.unwrap_or(0)),
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
pub fn run(args: &CompareArgs) -> Result<(), CliError> {
    engines::catch_interrupts();
    // Everything that can be refused without the host first: nothing waits or changes for a
    // typing mistake, and a workload that cannot fit is refused before it is allocated.
    crate::preflight::check_outputs(&args.live)?;
    check_set(&args.run.set)?;
    let workload = args.run.workload()?;
    let mut host = take_host(args.wait)?;
    let result = compare(&mut host, args, &workload, Probes::default());
    let (cmp, s, k) = release_host(host, result)?;
    if args.run.json {
        println!("{}", serde_json::to_string_pretty(&cmp)?);
    } else {
        print!("{}", cmp.text());
    }
    // After the report, so that a file that cannot be written costs no figures.
    if let Some(path) = &args.live.prometheus {
        let (a, b) = (&cmp.samepage, &cmp.kernel);
        crate::prom::write_file(
            path,
            &[
                ("samepage", &a.ksm.0, &a.ksm_stat),
                ("kernel", &b.ksm.0, &b.ksm_stat),
            ],
        )
        .map_err(CliError::write(path))?;
    }
    if let Some(p) = &args.live.plot {
        crate::plot::write(
            p,
            "samepage compare: samepage (solid) and the kernel's ksmd (dashed)",
            &[("samepage", &s), ("kernel", &k)],
        )?;
    }
    Ok(())
}
