//! `samepage merge`: the workload in live memory of this process, merged for real.

use crate::args::RunArgs;
use crate::report::{tunables_of, Report, SpaceInfo};
use clap::Args;
use samepage_engine::{MmId, PAGE_SIZE, PAGE_SIZE_U64};
use samepage_linux::LiveKsm;
use std::time::{Duration, Instant};

/// `samepage merge` arguments: those of `simulate`, plus verification and a time limit.
#[derive(Args, Debug, Clone)]
pub struct MergeArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Skip the check of the page tables (pagemap, PAGEMAP_SCAN) and of the contents.
    #[arg(long)]
    pub no_verify: bool,
    /// Give up if the counters have not settled after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

/// `Anonymous:` of /proc/self/smaps_rollup, in KiB.
pub fn rss_anon_kib() -> u64 {
    std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Anonymous:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// A workload loaded into live regions.
pub struct Loaded {
    pub ksm: LiveKsm,
    pub info: Vec<SpaceInfo>,
    pub regions: Vec<(MmId, u64, u64)>,
    pub workload: samepage_workload::Workload,
}

/// Start the live engine, load every address space into its own region, apply the knobs.
pub fn load(args: &RunArgs) -> Result<Loaded, String> {
    let knobs = args.knobs()?;
    let workload = args.workload()?;
    let ksm = LiveKsm::new().map_err(|e| e.to_string())?;
    for (k, v) in &knobs {
        ksm.set_knob(k, v)
            .map_err(|e| format!("--set {k}={v}: {e}"))?;
    }
    let mut info = Vec::new();
    let mut regions = Vec::new();
    const CHUNK: u64 = 256;
    let mut buf = vec![0u8; CHUNK as usize * PAGE_SIZE];
    for space in &workload.spaces {
        let mm = ksm.new_mm();
        let len = space.pages() * PAGE_SIZE_U64;
        let a = ksm.create_region(mm, len).map_err(|e| e.to_string())?;
        let mut i = 0;
        while i < space.pages() {
            let n = CHUNK.min(space.pages() - i);
            for j in 0..n {
                let page: &mut [u8; PAGE_SIZE] = (&mut buf[j as usize * PAGE_SIZE..][..PAGE_SIZE])
                    .try_into()
                    .expect("page");
                space.fill_page(i + j, page);
            }
            ksm.write(a + i * PAGE_SIZE_U64, &buf[..n as usize * PAGE_SIZE])
                .map_err(|e| e.to_string())?;
            i += n;
        }
        info.push(SpaceInfo {
            pid: mm.0,
            name: space.name.clone(),
            pages: space.pages(),
        });
        regions.push((mm, a, len));
    }
    Ok(Loaded {
        ksm,
        info,
        regions,
        workload,
    })
}

/// Every page still reads what the workload put there.
pub fn check_contents(l: &Loaded) -> Result<(), String> {
    let mut want = [0u8; PAGE_SIZE];
    let mut got = [0u8; PAGE_SIZE];
    for ((_, a, _), space) in l.regions.iter().zip(&l.workload.spaces) {
        for i in 0..space.pages() {
            space.fill_page(i, &mut want);
            l.ksm
                .read(a + i * PAGE_SIZE_U64, &mut got)
                .map_err(|e| e.to_string())?;
            if want != got {
                return Err(format!(
                    "verification failed: page {i} of {} does not hold what was loaded",
                    space.name
                ));
            }
        }
    }
    Ok(())
}

/// `samepage merge`.
pub fn run(args: &MergeArgs) -> Result<(), String> {
    let l = load(&args.run)?;
    let rss_before = rss_anon_kib();
    for (mm, a, len) in &l.regions {
        l.ksm
            .madvise_mergeable(*mm, *a, *len)
            .map_err(|e| e.to_string())?;
    }
    let start = Instant::now();
    let passes = match args.run.full_scans {
        Some(n) => {
            l.ksm.set_knob("run", "1").map_err(|e| e.to_string())?;
            let ok = l.ksm.wait_full_scans(n, Duration::from_secs(args.timeout));
            l.ksm.set_knob("run", "0").map_err(|e| e.to_string())?;
            if !ok {
                return Err(format!("{n} full scans did not complete within {} s", args.timeout));
            }
            n
        }
        None => l
            .ksm
            .run_until_stable(2, Duration::from_secs(args.timeout))
            .ok_or_else(|| {
                format!(
                    "the counters did not settle within {} s; raise --timeout, or --set pages_to_scan=N \
                     / sleep_millisecs=0 to scan faster",
                    args.timeout
                )
            })?,
    };
    let converged = l
        .ksm
        .last_change()
        .map(|t| t.saturating_duration_since(start).as_secs_f64())
        .unwrap_or(0.0);
    let rss_after = rss_anon_kib();
    let verification = if args.no_verify {
        None
    } else {
        let v = l.ksm.verify();
        let problems = v.problems();
        if !problems.is_empty() {
            return Err(format!("verification failed: {}", problems.join("; ")));
        }
        check_contents(&l)?;
        Some(v)
    };
    let counters = l.ksm.counters();
    let report = Report {
        engine: "live",
        ksm_stat: l.info.iter().map(|w| l.ksm.ksm_stat(MmId(w.pid))).collect(),
        workload: l.info.clone(),
        ksm: (counters, tunables_of(|n| l.ksm.knob(n))),
        full_scans_run: passes,
        converged_seconds: converged,
        cpu_seconds: Some(l.ksm.cpu_seconds()),
        rss_anon_kib_before: Some(rss_before),
        rss_anon_kib_after: Some(rss_after),
        live: Some(l.ksm.stats()),
        verification,
    };
    report.print(args.run.json)
}
