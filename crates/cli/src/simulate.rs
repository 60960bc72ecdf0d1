//! `samepage simulate`: load the workload into the simulator and run ksmd to convergence.

use crate::args::RunArgs;
use crate::error::CliError;
use crate::report::{tunables_of, Report, SpaceInfo};
use clap::Args;
use samepage_engine::{Convergence, Until};
use samepage_sim::{SimSystem, SIM_NS_PER_PAGE};
use std::time::{Duration, Instant};

/// `samepage simulate` arguments: the workload, and a limit on the time it may take.
#[derive(Args, Debug, Clone)]
pub struct SimArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Give up after this many seconds of wall-clock time (the simulator's own clock is
    /// virtual, and stands still when ksmd scans nothing).
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub timeout: u64,
}

/// Give up on convergence after this many full scans.
const MAX_FULL_SCANS: u64 = 1000;

/// Build the simulated machine: one process per address space, each with one mergeable
/// region holding its pages in order; then apply the `--set` knobs.
pub fn load(args: &RunArgs) -> Result<(SimSystem, Vec<SpaceInfo>), CliError> {
    let knobs = args.knobs()?;
    let workload = args.workload()?;
    let mut sys = SimSystem::new();
    let mut info = Vec::new();
    for space in &workload.spaces {
        let mm = sys
            .spawn_with_pages(space.pages(), |i, buf| space.fill_page(i, buf))?
            .mm;
        info.push(SpaceInfo {
            pid: mm.0,
            name: space.name.clone(),
            pages: space.pages(),
        });
    }
    for (k, v) in &knobs {
        sys.write_knob(k, v)
            .map_err(CliError::knob(format!("--set {k}={v}")))?;
    }
    Ok((sys, info))
}

/// Scan until stable (at least two full scans, then one that changes no merge counter), or
/// exactly `--full-scans N`, within `timeout` of wall-clock time. Returns the full scans run
/// and the virtual time (ns) at the end of the batch that last changed a merge counter.
pub fn converge(
    sys: &mut SimSystem,
    full_scans: Option<u64>,
    timeout: Duration,
) -> Result<(u64, u64), CliError> {
    if sys.read_knob("pages_to_scan").as_deref() == Some("0")
        && sys.read_knob("advisor_mode").as_deref() == Some("[none] scan-time")
    {
        // The kernel accepts 0, and then ksmd never finishes a full scan.
        return Err(CliError::usage(
            "pages_to_scan=0: ksmd would scan no page at all and never finish a full scan; \
             give at least 1",
        ));
    }
    let t0 = Instant::now();
    let too_long = |passes: u64| {
        CliError::Failed(match full_scans {
            Some(n) => format!(
                "the simulator did not complete {n} full scans within {} s of wall-clock time \
             ({passes} done); raise --timeout, or --set pages_to_scan=N to scan faster",
                timeout.as_secs()
            ),
            None => format!(
                "the counters did not settle within {} s of wall-clock time ({passes} full scans \
             done); raise --timeout, or --set pages_to_scan=N to scan faster",
                timeout.as_secs()
            ),
        })
    };
    sys.write_knob("run", "1")
        .map_err(CliError::knob("run=1"))?;
    let until = match full_scans {
        Some(n) => Until::FullScans(n),
        None => Until::Stable { min_passes: 2 },
    };
    // Fed after every batch, so that the last change is known to the batch.
    let mut conv = Convergence::new(until, &sys.counters());
    let mut last_change_ns = 0;
    let mut steps = 0u64;
    while !conv.is_done() {
        if full_scans.is_none() && conv.passes() >= MAX_FULL_SCANS {
            return Err(CliError::Failed(format!(
                "the counters did not settle within {MAX_FULL_SCANS} full scans; \
                 use --full-scans N to stop after N"
            )));
        }
        if !sys.ksm().ksmd_should_run() {
            return Err(CliError::usage(
                "nothing to scan: no address space has a mergeable area",
            ));
        }
        steps += 1;
        if steps.is_multiple_of(256) && t0.elapsed() > timeout {
            return Err(too_long(conv.passes()));
        }
        let before = sys.clock().now_ns;
        let batch = sys.ksmd_step();
        if conv.observe(&sys.counters()).changed {
            last_change_ns = before + batch.scanned * SIM_NS_PER_PAGE;
        }
    }
    sys.write_knob("run", "0")
        .map_err(CliError::knob("run=0"))?;
    Ok((conv.passes(), last_change_ns))
}

/// `samepage simulate`.
pub fn run(a: &SimArgs) -> Result<(), CliError> {
    let args = &a.run;
    let (mut sys, workload) = load(args)?;
    let (passes, last_change_ns) =
        converge(&mut sys, args.full_scans, Duration::from_secs(a.timeout))?;
    let counters = sys.counters();
    let mut report = Report {
        saved_bytes: counters.saved_pages() * samepage_engine::PAGE_SIZE_U64 as i64,
        engine: "sim",
        ksm_stat: workload
            .iter()
            .map(|w| sys.ksm_stat(samepage_engine::MmId(w.pid)))
            .collect(),
        workload,
        ksm: (counters, tunables_of(|n| sys.read_knob(n))),
        full_scans_run: passes,
        converged_seconds: last_change_ns as f64 / 1e9,
        cpu_seconds: None,
        run_seconds: None,
        pages_scanned_run: None,
        rss_anon_kib_before: None,
        rss_anon_kib_after: None,
        pss_kib_before: None,
        pss_kib_after: None,
        live: None,
        verification: None,
        metadata: None,
        footprint: None,
        net_saved_bytes: None,
    };
    report.set_costs(
        crate::report::MetadataBytes::new(
            sys.ksm().metadata_bytes() as u64,
            sys.ksm().rmap_items(),
            None,
        ),
        crate::report::Mappings::None,
    );
    report.print(args.json)
}
