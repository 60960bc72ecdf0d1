//! `samepage demo`: guest-like address spaces in live memory, merged while an application
//! keeps writing some of their pages.

use crate::args::parse_knobs;
use crate::engines::{self, Until};
use crate::error::CliError;
use crate::merge::{self, Changed, LiveOpts, Loaded};
use clap::Args;
use samepage_engine::{PAGE_SIZE, PAGE_SIZE_U64};
use samepage_workload::{parse_size, GuestPage, GuestSpec, Workload};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// `samepage demo` arguments: none are needed.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Memory of all guests together (e.g. 64M, 1G).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub size: u64,
    /// Guest-like address spaces sharing one OS image.
    #[arg(long, default_value_t = 4)]
    pub guests: u32,
    /// Seed of the guests' layout and contents.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Set a KSM tunable (repeatable). The demo starts from use_zero_pages=1,
    /// pages_to_scan=2048, sleep_millisecs=0.
    #[arg(long = "set", value_name = "KNOB=VALUE")]
    pub set: Vec<String>,
    /// Run without the application that writes pages while the engine merges.
    #[arg(long)]
    pub quiet_guests: bool,
    /// Keep the guests in this process, merged by an engine of its own, instead of guest
    /// processes merged by a samepage daemon the demo starts.
    #[arg(long)]
    pub in_process: bool,
    #[command(flatten)]
    pub live: LiveOpts,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The demo's starting knobs: zero pages on, and a pace that converges in seconds.
pub const DEMO_KNOBS: [(&str, &str); 3] = [
    ("use_zero_pages", "1"),
    ("pages_to_scan", "2048"),
    ("sleep_millisecs", "0"),
];

pub fn spec(a: &DemoArgs) -> GuestSpec {
    GuestSpec {
        size: a.size,
        guests: a.guests,
        shared_pct: 35,
        unique_pct: 35,
        seed: a.seed,
    }
}

/// Pages the application rewrites all the time: they never hold still long enough to merge.
const HOT_PAGES: usize = 32;
/// Pages the application writes once, while merging is under way: each write to a merged
/// or zero page breaks its sharing (copy-on-write).
const ONCE_PAGES: usize = 512;

/// The application inside guest 0: it rewrites a few hot pages continually and, from the
/// second full scan on, writes once into pages of the OS image and of free memory.
fn application(l: &Loaded, stop: &AtomicBool, kinds: &[GuestPage]) -> Changed {
    app_in(&l.ksm, &l.regions[0], stop, kinds)
}

/// The application, on region `r` of `ksm` (guest 0's).
pub fn app_in(
    ksm: &samepage_linux::LiveKsm,
    r: &samepage_linux::Region,
    stop: &AtomicBool,
    kinds: &[GuestPage],
) -> Changed {
    let page_of = |i: usize| r.start() + i as u64 * PAGE_SIZE_U64;
    let data: Vec<usize> = (0..kinds.len())
        .filter(|&i| kinds[i] == GuestPage::Unique)
        .take(HOT_PAGES)
        .collect();
    let once: Vec<usize> = (0..kinds.len())
        .filter(|&i| kinds[i] != GuestPage::Unique)
        .step_by(7)
        .take(ONCE_PAGES)
        .collect();
    let mut changed = Changed::new();
    let mut page = Box::new([0u8; PAGE_SIZE]);
    let mut write = |i: usize, n: u64, changed: &mut Changed| {
        for (w, chunk) in page.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&(n ^ ((i as u64) << 32) ^ w as u64).to_le_bytes());
        }
        if r.write(i as u64 * PAGE_SIZE_U64, &page[..]).is_ok() {
            changed.insert(page_of(i), page.clone());
        }
    };
    let (mut n, mut next_once) = (1u64, 0);
    let mut scans = 0;
    while !stop.load(Ordering::Relaxed) {
        if !data.is_empty() {
            write(data[n as usize % data.len()], n, &mut changed);
        }
        // Reading the counters costs a page-table walk (and, with a daemon, a round trip):
        // look every 8 writes.
        if scans < 2 && n % 8 == 1 {
            scans = ksm.counters().full_scans;
        }
        // From the second full scan on (pages are merged by then), 16 writes every 2 ms:
        // all of them land before the scan can settle, however fast it goes.
        while scans >= 2 && next_once < once.len() {
            write(once[next_once], n, &mut changed);
            next_once += 1;
            if next_once % 16 == 0 {
                break;
            }
        }
        n += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    changed
}

/// `samepage demo`: guest processes merged by a daemon, or (`--in-process`) address spaces
/// of this process merged by its own engine.
pub fn run(a: &DemoArgs) -> Result<(), CliError> {
    if a.in_process {
        run_in_process(a)
    } else {
        crate::demo_daemon::run(a)
    }
}

fn run_in_process(a: &DemoArgs) -> Result<(), CliError> {
    engines::catch_interrupts();
    crate::preflight::check_outputs(&a.live)?;
    let spec = spec(a);
    let kinds = spec.layout()?;
    let workload = Workload::guests(&spec)?;
    let defaults: Vec<(String, String)> = DEMO_KNOBS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let l = merge::load(workload, &parse_knobs(&a.set)?, &defaults)?;
    let app = |l: &Loaded, stop: &AtomicBool| application(l, stop, &kinds);
    let r = merge::run_samepage(
        &l,
        Until::Stable { min_passes: 3 },
        &a.live,
        !a.json,
        (!a.quiet_guests).then_some(&app as merge::Application),
    )?;
    if let Some(p) = &a.live.plot {
        crate::plot::write(p, "samepage demo", &[("samepage", &r.samples)])?;
    }
    if !a.json {
        println!(
            "samepage demo: {} guests of {:.0} MiB each share one OS image ({}% of their pages), \
             hold their own data ({}%) and zeroed free memory ({}%); an application in guest0 \
             keeps writing pages{}.\n",
            a.guests,
            a.size as f64 / a.guests as f64 / (1 << 20) as f64,
            spec.shared_pct,
            spec.unique_pct,
            100 - spec.shared_pct - spec.unique_pct,
            if a.quiet_guests {
                " (off: --quiet-guests)"
            } else {
                ""
            }
        );
    }
    r.report.print(a.json)
}
