//! `samepage merge`: the workload in live memory of this process, merged for real. The
//! loading, running and checking here are shared with `demo` and `compare`.

use crate::args::RunArgs;
use crate::engines::{self, Samepage, Until};
use crate::error::CliError;
use crate::report::{tunables_of, Report, SpaceInfo};
use crate::watch::{Sample, Watch};
use clap::Args;
use samepage_engine::{MmId, PAGE_SIZE, PAGE_SIZE_U64};
use samepage_linux::{LiveKsm, Region};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Options of the commands that run an engine on live memory.
#[derive(Args, Debug, Clone)]
pub struct LiveOpts {
    /// Skip the check of the page tables (pagemap, PAGEMAP_SCAN) and of the contents.
    #[arg(long)]
    pub no_verify: bool,
    /// Give up if the counters have not settled after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Keep the counters in this file in the Prometheus text format while the engine runs
    /// (rewritten every second; point a node_exporter textfile collector at it).
    #[arg(long, value_name = "FILE")]
    pub prometheus: Option<PathBuf>,
    /// Draw the counters over time (pages_sharing, ksm_zero_pages, pages_unshared, saved
    /// bytes) into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

/// `samepage merge` arguments: those of `simulate`, plus the live options.
#[derive(Args, Debug, Clone)]
pub struct MergeArgs {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub live: LiveOpts,
}

/// Memory of this process from /proc/self/smaps_rollup, in KiB.
#[derive(Debug, Clone, Copy)]
pub struct MemoryKib {
    /// `Anonymous:` (a page mapped N times counts N times).
    pub anon: u64,
    /// `Pss:` (a page mapped N times counts 1/N each time).
    pub pss: u64,
}

pub fn memory_kib() -> MemoryKib {
    memory_kib_of(0)
}

/// [`memory_kib`] of process `pid` (0: this one).
pub fn memory_kib_of(pid: u32) -> MemoryKib {
    let path = if pid == 0 {
        "/proc/self/smaps_rollup".to_string()
    } else {
        format!("/proc/{pid}/smaps_rollup")
    };
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
            .unwrap_or(0)
    };
    MemoryKib {
        anon: field("Anonymous:"),
        pss: field("Pss:"),
    }
}

/// A workload loaded into live regions.
pub struct Loaded {
    pub ksm: LiveKsm,
    pub info: Vec<SpaceInfo>,
    /// The region of each address space, in workload order.
    pub regions: Vec<Region>,
    pub workload: samepage_workload::Workload,
}

/// Start the live engine, apply `defaults` and then the `--set` knobs, and load every address
/// space into its own region.
pub fn load(
    workload: samepage_workload::Workload,
    knobs: &[(String, String)],
    defaults: &[(String, String)],
) -> Result<Loaded, CliError> {
    let ksm = LiveKsm::new()?;
    for (k, v) in defaults {
        ksm.set_knob(k, v)
            .map_err(CliError::live_knob(format!("setting {k}={v}")))?;
    }
    for (k, v) in knobs {
        ksm.set_knob(k, v)
            .map_err(CliError::live_knob(format!("--set {k}={v}")))?;
    }
    let mut info = Vec::new();
    let mut regions = Vec::new();
    for space in &workload.spaces {
        let mm = ksm.new_mm();
        let len = space.pages() * PAGE_SIZE_U64;
        let r = ksm.create_region(mm, len)?;
        load_pages(
            space.pages(),
            |i, page| space.fill_page(i, page),
            |off, b| Ok(r.write(off, b)?),
        )?;
        info.push(SpaceInfo {
            pid: mm.0,
            name: space.name.clone(),
            pages: space.pages(),
        });
        regions.push(r);
    }
    Ok(Loaded {
        ksm,
        info,
        regions,
        workload,
    })
}

/// Write `pages` pages, page `i` made by `fill(i, page)`, through `write(offset, bytes)`, 1 MiB
/// at a time; Ctrl-C stops it between chunks.
pub fn load_pages(
    pages: u64,
    fill: impl Fn(u64, &mut [u8; PAGE_SIZE]),
    mut write: impl FnMut(u64, &[u8]) -> Result<(), CliError>,
) -> Result<(), CliError> {
    const CHUNK: u64 = 256;
    let mut buf = vec![0u8; CHUNK as usize * PAGE_SIZE];
    let mut i = 0;
    while i < pages {
        engines::interrupted()?;
        let n = CHUNK.min(pages - i);
        for (j, page) in buf.chunks_exact_mut(PAGE_SIZE).take(n as usize).enumerate() {
            fill(i + j as u64, page.try_into().expect("a page"));
        }
        write(i * PAGE_SIZE_U64, &buf[..n as usize * PAGE_SIZE])?;
        i += n;
    }
    Ok(())
}

/// Every page still reads what the workload put there, except the pages in `changed`
/// (address → what was written there since).
pub fn check_contents(l: &Loaded, changed: &Changed) -> Result<(), CliError> {
    let mut want = [0u8; PAGE_SIZE];
    let mut got = [0u8; PAGE_SIZE];
    for (r, space) in l.regions.iter().zip(&l.workload.spaces) {
        for i in 0..space.pages() {
            if i % 4096 == 0 {
                engines::interrupted()?;
            }
            let addr = r.start() + i * PAGE_SIZE_U64;
            match changed.get(&addr) {
                Some(p) => want.copy_from_slice(&p[..]),
                None => space.fill_page(i, &mut want),
            }
            // Looking must not unmerge: a merged page is read from its canonical page.
            r.peek_page(i * PAGE_SIZE_U64, &mut got)?;
            if want != got {
                return Err(CliError::Verification(format!(
                    "page {i} of {} does not hold what was loaded",
                    space.name
                )));
            }
        }
    }
    Ok(())
}

/// One run of samepage's live engine on a loaded workload: the report and the samples.
pub struct LiveRun {
    pub report: Report,
    pub samples: Vec<Sample>,
}

/// What a page holds now, for pages changed since the workload was loaded.
pub type Changed = HashMap<u64, Box<[u8; PAGE_SIZE]>>;

/// An application running beside the engine: it returns when the flag is set, with the pages
/// it changed.
pub type Application<'a> = &'a (dyn Fn(&Loaded, &AtomicBool) -> Changed + Sync);

/// Mark the regions mergeable, run the engine until `until` says, verify, and report. `during`
/// runs on its own thread while the engine runs (it must return when its flag is set) and
/// returns the pages it changed.
pub fn run_samepage(
    l: &Loaded,
    until: Until,
    opts: &LiveOpts,
    progress: bool,
    during: Option<Application<'_>>,
) -> Result<LiveRun, CliError> {
    let before = memory_kib();
    for r in &l.regions {
        l.ksm.madvise_mergeable(r)?;
    }
    let mms: Vec<MmId> = l.regions.iter().map(|r| r.mm()).collect();
    let mut watch = Watch::new(
        "samepage",
        l.workload.total_pages(),
        progress,
        opts.prometheus.clone(),
    );
    watch.ksm_stat = Box::new(|| mms.iter().map(|&mm| l.ksm.ksm_stat(mm)).collect());
    let stop = AtomicBool::new(false);
    let (outcome, changed) = std::thread::scope(|s| {
        let writer = during.map(|f| s.spawn(|| f(l, &stop)));
        let out = engines::run(
            &Samepage(&l.ksm),
            until,
            Duration::from_secs(opts.timeout),
            &mut watch,
        );
        stop.store(true, Ordering::Relaxed);
        let changed = writer
            .map(|w| w.join().unwrap_or_default())
            .unwrap_or_default();
        (out, changed)
    });
    let outcome = outcome?;
    let after = memory_kib();
    let verification = if opts.no_verify {
        None
    } else {
        let v = l.ksm.verify();
        let problems = v.problems();
        if !problems.is_empty() {
            return Err(CliError::Verification(problems.join("; ")));
        }
        check_contents(l, &changed)?;
        Some(v)
    };
    let ksm_stat: Vec<_> = mms.iter().map(|&mm| l.ksm.ksm_stat(mm)).collect();
    let counters = l.ksm.counters();
    if let Some(path) = &opts.prometheus {
        crate::prom::write_file(path, &[("samepage", &counters, &ksm_stat)])
            .map_err(CliError::write(path))?;
    }
    let md = l.ksm.metadata();
    let (engine_bytes, rmap_items, state_bytes) =
        (md.engine_bytes, md.rmap_items, md.page_state_bytes);
    let mut report = Report::live(
        "live",
        l.info.clone(),
        (counters, tunables_of(|n| l.ksm.knob(n))),
        ksm_stat,
        &outcome,
        before,
        after,
        Some(l.ksm.stats()),
        verification,
    );
    report.set_costs(
        crate::report::MetadataBytes::new(engine_bytes, rmap_items, Some(state_bytes)),
        match l.ksm.footprint() {
            Ok(f) => crate::report::Mappings::Known(f),
            Err(_) => crate::report::Mappings::Unknown,
        },
    );
    Ok(LiveRun {
        report,
        samples: outcome.samples,
    })
}

/// `samepage merge`.
pub fn run(args: &MergeArgs) -> Result<(), CliError> {
    engines::catch_interrupts();
    crate::preflight::check_outputs(&args.live)?;
    let l = load(args.run.workload()?, &args.run.knobs()?, &[])?;
    let r = run_samepage(&l, args.run.until(), &args.live, !args.run.json, None)?;
    if let Some(p) = &args.live.plot {
        crate::plot::write(p, "samepage merge", &[("samepage", &r.samples)])?;
    }
    r.report.print(args.run.json)
}
