//! `samepage bench`: samepage's live engine against the host kernel's ksmd on the same bytes,
//! one after the other in one run, at full speed (pages_to_scan=100000, sleep_millisecs=0),
//! as ratios samepage / kernel. Needs root; the host's knobs are restored.

use crate::args::RunArgs;
use crate::compare::{self, CompareArgs, Comparison, Probes};
use crate::error::CliError;
use crate::merge::{LiveOpts, Loaded};
use clap::Args;
use samepage_engine::{page_hash, PAGE_SIZE, PAGE_SIZE_U64, RMAP_ITEM_BYTES};
use samepage_linux::host::{AnonMemory, HostSession};
use samepage_workload::{parse_size, Workload};
use serde::Serialize;
use std::collections::HashMap;
use std::time::Duration;

/// `samepage bench` arguments.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Runs of each workload under each engine; the figures are medians.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Size of the four fixed workloads.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub size: u64,
    /// Sizes of the scaling series of the mixed workload (comma-separated; empty for none).
    #[arg(long, default_value = "256M,512M,1G,2G,4G", value_parser = parse_sizes)]
    pub scaling: Sizes,
    /// Size of the workload whose first touches are timed.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub latency_size: u64,
    /// First touches timed per kind (writes to zero pages; writes and reads of merged pages
    /// and of memory never touched) and engine.
    #[arg(long, default_value_t = 2000)]
    pub latency_pages: usize,
    /// Set a KSM tunable for both engines (repeatable), on top of the full-speed defaults.
    #[arg(long = "set", value_name = "KNOB=VALUE")]
    pub set: Vec<String>,
    /// Give up on a run after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Wait at most this many seconds for another command that uses the host's KSM to finish
    /// (0: refuse at once if one is running).
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub wait: u64,
    /// Client process counts of `--what clients`: the same total bytes spread over each
    /// number of processes (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub clients: Vec<u64>,
    /// Total bytes of `--what clients` (the mixed workload).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub clients_size: u64,
    /// What to measure (comma-separated): workloads (the four fixed ones), scaling, latency,
    /// and, only when asked for, clients (samepage daemon over client processes against the
    /// in-process engine and the host's KSM over the same processes).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "workloads,scaling,latency"
    )]
    pub what: Vec<Part>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// A comma-separated list of sizes; the empty string is the empty list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sizes(pub Vec<u64>);

fn parse_sizes(s: &str) -> Result<Sizes, String> {
    if s.trim().is_empty() {
        return Ok(Sizes(Vec::new()));
    }
    s.split(',')
        .map(|p| parse_size(p.trim()))
        .collect::<Result<Vec<u64>, String>>()
        .map(Sizes)
}

/// A part of the suite.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Workloads,
    Scaling,
    Latency,
    Clients,
}

/// One workload's medians.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub workload: String,
    pub pages: u64,
    pub runs: usize,
    pub samepage_converged_seconds: f64,
    pub kernel_converged_seconds: f64,
    pub samepage_cpu_seconds: f64,
    pub kernel_cpu_seconds: f64,
    /// Pages scanned per second of engine run time.
    pub samepage_scan_pages_per_second: f64,
    pub kernel_scan_pages_per_second: f64,
    /// samepage / kernel.
    pub converged_ratio: f64,
    pub cpu_ratio: f64,
    pub scan_rate_ratio: f64,
    /// The merge counters were the same in every run.
    pub same_counters: bool,
    pub saved_bytes: i64,
    pub kernel_saved_bytes: i64,
    /// samepage's engine metadata at the end, per rmap item, everything counted (trees,
    /// stable nodes); the kernel's 64-byte rmap item leaves its stable nodes out.
    pub samepage_metadata_bytes_per_rmap_item: f64,
}

/// First-write latencies in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub kind: &'static str,
    pub engine: &'static str,
    pub pages: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// Metadata per page samepage tracks, against the kernel's.
#[derive(Debug, Clone, Serialize)]
pub struct Metadata {
    /// The engine's rmap item (a full 256-page chunk's bytes per page, rounded up), as
    /// `general_profit` charges it.
    pub samepage_rmap_item_bytes: usize,
    /// The live backend's state of every page of a region.
    pub samepage_page_state_bytes: usize,
    pub samepage_bytes_per_page: usize,
    /// `sizeof(struct ksm_rmap_item)` on 64-bit Linux.
    pub kernel_bytes_per_page: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub machine: String,
    pub rows: Vec<Row>,
    pub latency: Vec<Latency>,
    pub metadata: Metadata,
    /// `--what clients`.
    pub clients: Vec<crate::bench_clients::ClientsRow>,
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub(crate) fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

/// A generated workload's arguments.
pub(crate) fn run_args(size: u64, zero: u32, dup: u32, set: &[String]) -> RunArgs {
    RunArgs {
        images: Vec::new(),
        size,
        zero_pct: zero,
        dup_pct: dup,
        group: 16,
        seed: 1,
        set: set.to_vec(),
        full_scans: None,
        json: true,
    }
}

fn live_opts(timeout: u64) -> LiveOpts {
    LiveOpts {
        no_verify: false,
        timeout,
        prometheus: None,
        plot: None,
    }
}

fn scan_rate(r: &crate::report::Report) -> f64 {
    ratio(
        r.pages_scanned_run.unwrap_or(0) as f64,
        r.run_seconds.unwrap_or(0.0),
    )
}

fn compare_args(run: RunArgs, live: LiveOpts, a: &BenchArgs) -> CompareArgs {
    CompareArgs {
        run,
        live,
        wait: a.wait,
    }
}

fn row(host: &mut HostSession, name: &str, run: &RunArgs, a: &BenchArgs) -> Result<Row, CliError> {
    let w = run.workload()?;
    let mut cmps: Vec<Comparison> = Vec::new();
    for i in 0..a.runs {
        eprintln!("bench: {name}, run {}/{}", i + 1, a.runs);
        let args = compare_args(run.clone(), live_opts(a.timeout), a);
        cmps.push(compare::compare(host, &args, &w, Probes::default())?.0);
    }
    let m = |f: &dyn Fn(&Comparison) -> f64| median(cmps.iter().map(f).collect());
    let sc = m(&|c| c.samepage.converged_seconds);
    let kc = m(&|c| c.kernel.converged_seconds);
    let scpu = m(&|c| c.samepage.cpu_seconds.unwrap_or(0.0));
    let kcpu = m(&|c| c.kernel.cpu_seconds.unwrap_or(0.0));
    let srate = m(&|c| scan_rate(&c.samepage));
    let krate = m(&|c| scan_rate(&c.kernel));
    Ok(Row {
        workload: name.to_string(),
        pages: cmps[0].samepage.workload.iter().map(|w| w.pages).sum(),
        runs: a.runs,
        samepage_converged_seconds: sc,
        kernel_converged_seconds: kc,
        samepage_cpu_seconds: scpu,
        kernel_cpu_seconds: kcpu,
        samepage_scan_pages_per_second: srate,
        kernel_scan_pages_per_second: krate,
        converged_ratio: ratio(sc, kc),
        cpu_ratio: ratio(scpu, kcpu),
        scan_rate_ratio: ratio(srate, krate),
        same_counters: cmps
            .iter()
            .all(|c| c.samepage.ksm.0.merge_state() == c.kernel.ksm.0.merge_state()),
        saved_bytes: cmps[0].samepage.saved_bytes,
        kernel_saved_bytes: cmps[0].kernel.saved_bytes,
        samepage_metadata_bytes_per_rmap_item: m(&|c| {
            c.samepage
                .metadata
                .map_or(f64::NAN, |x| x.engine_bytes_per_rmap_item)
        }),
    })
}

/// Pages of the first address space by kind: zero-filled, and duplicated (merged).
/// Up to `zero` KSM-zero pages and `dup` pages with a duplicate of the first address space,
/// by index.
fn pages_by_kind(w: &Workload, zero: usize, dup: usize) -> (Vec<u64>, Vec<u64>) {
    let space = &w.spaces[0];
    let mut buf = [0u8; PAGE_SIZE];
    let mut count: HashMap<u64, u32> = HashMap::new();
    let mut hashes = Vec::new();
    for i in 0..space.pages() {
        space.fill_page(i, &mut buf);
        let h = page_hash(&buf);
        let z = samepage_engine::is_zero_page(&buf);
        *count.entry(h).or_default() += 1;
        hashes.push((h, z));
    }
    let (mut zeros, mut dups) = (Vec::new(), Vec::new());
    for (i, (h, z)) in hashes.into_iter().enumerate() {
        if z && zeros.len() < zero {
            zeros.push(i as u64);
        } else if !z && count[&h] > 1 && dups.len() < dup {
            dups.push(i as u64);
        }
    }
    // Merged pages are touched in a random order (the same every run): each touch is a
    // first touch on its own. In address order they would be a stream, which the agent
    // copies ahead of (`--example first_writes` measures that).
    for i in (1..dups.len()).rev() {
        let j = (samepage_workload::splitmix64(i as u64) % (i as u64 + 1)) as usize;
        dups.swap(i, j);
    }
    (zeros, dups)
}

fn latency(kind: &'static str, engine: &'static str, mut us: Vec<f64>) -> Latency {
    us.sort_by(f64::total_cmp);
    let q = |p: f64| {
        us.get(((us.len() as f64 * p) as usize).min(us.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    Latency {
        kind,
        engine,
        pages: us.len(),
        p50_us: q(0.5),
        p90_us: q(0.9),
        p99_us: q(0.99),
        max_us: us.last().copied().unwrap_or(0.0),
    }
}

/// The word a first touch reads or writes: the second of its page.
const WORD: u64 = 8;

/// What the latency probe times, in the order of its rows: each is a first touch of pages
/// that nothing touched since the engine converged (or ever, for untouched pages).
const TOUCHES: [&str; 5] = [
    "write, zero page",
    "write, merged page",
    "read, merged page",
    "write, untouched page",
    "read, untouched page",
];

/// Timed first touches of one engine's memory, in the order of [`TOUCHES`].
type Timings = Vec<Vec<f64>>;

/// A timed store at a byte offset.
type Store<'a, E> = &'a dyn Fn(u64) -> Result<Duration, E>;
/// A timed load at a byte offset, with the word it read.
type Load<'a, E> = &'a dyn Fn(u64) -> Result<(u64, Duration), E>;

/// How a first touch touches its page.
enum Access<'a, E> {
    Write(Store<'a, E>),
    /// A read, which must give what the page holds (by page index).
    Read(Load<'a, E>, &'a dyn Fn(u64) -> u64),
}

/// Time the first touch of each of `pages`.
fn touch<E: std::fmt::Display>(
    pages: &[u64],
    access: Access<'_, E>,
    what: &str,
) -> Result<Vec<f64>, String> {
    let mut us = Vec::with_capacity(pages.len());
    for &i in pages {
        let off = i * PAGE_SIZE_U64 + WORD;
        let d = match &access {
            Access::Write(store) => store(off).map_err(|e| format!("{what}: {e}"))?,
            Access::Read(load, want) => {
                let (v, d) = load(off).map_err(|e| format!("{what}: {e}"))?;
                if v != want(i) {
                    return Err(format!(
                        "{what}: page {i} read {v:#x} where it holds {:#x}",
                        want(i)
                    ));
                }
                d
            }
        };
        us.push(d.as_secs_f64() * 1e6);
    }
    Ok(us)
}

/// The pages the latency probe touches, by index, and the word each read must give.
struct Probed<'a> {
    zero: &'a [u64],
    dup_w: &'a [u64],
    dup_r: &'a [u64],
    untouched: &'a [u64],
    held: &'a dyn Fn(u64) -> u64,
}

/// One engine's first touches, in the order of [`TOUCHES`]: `store` and `load` on its copy
/// of the workload, `fresh_store` and `fresh_load` on two fresh mappings.
fn touch_all<E: std::fmt::Display>(
    p: &Probed<'_>,
    store: Store<'_, E>,
    load: Load<'_, E>,
    fresh_store: Store<'_, E>,
    fresh_load: Load<'_, E>,
) -> Result<Timings, String> {
    Ok(vec![
        touch(p.zero, Access::Write(store), TOUCHES[0])?,
        touch(p.dup_w, Access::Write(store), TOUCHES[1])?,
        touch(p.dup_r, Access::Read(load, p.held), TOUCHES[2])?,
        touch(p.untouched, Access::Write(fresh_store), TOUCHES[3])?,
        touch(p.untouched, Access::Read(fresh_load, &|_| 0), TOUCHES[4])?,
    ])
}

/// First touches under each engine: writes to placed zero pages, writes and reads of merged
/// pages, and writes and reads of pages of fresh memory handed to the engine untouched (what
/// an application pays for memory it has not used yet). Reads are checked against what the
/// page holds.
fn latencies(host: &mut HostSession, a: &BenchArgs) -> Result<Vec<Latency>, CliError> {
    let run = run_args(a.latency_size, 30, 40, &a.set);
    let w = run.workload()?;
    let n = a.latency_pages;
    let (zero, dup) = pages_by_kind(&w, n, 2 * n);
    let (dup_w, dup_r) = dup.split_at(dup.len() / 2);
    // Fresh pages are written in one mapping and read in another: a write's fault may give
    // the zero page to the holes after it.
    let untouched: Vec<u64> = (0..n as u64).collect();
    let space = &w.spaces[0];
    let held = |i: u64| {
        let mut buf = [0u8; PAGE_SIZE];
        space.fill_page(i, &mut buf);
        let o = WORD as usize;
        u64::from_ne_bytes(buf[o..o + 8].try_into().expect("8 bytes"))
    };
    let probed = Probed {
        zero: &zero,
        dup_w,
        dup_r,
        untouched: &untouched,
        held: &held,
    };
    let fresh_len = n as u64 * PAGE_SIZE_U64;
    let mut sp: Result<Timings, String> = Err("the samepage phase did not run".into());
    let mut k: Result<Timings, String> = Err("the kernel phase did not run".into());
    let mut probe_sp = |l: &Loaded| {
        sp = (|| {
            let r = &l.regions[0];
            let fresh = || {
                l.ksm
                    .create_region(r.mm(), fresh_len)
                    .and_then(|f| l.ksm.madvise_mergeable(&f).map(|()| f))
                    .map_err(|e| format!("fresh memory: {e}"))
            };
            let (fresh_w, fresh_r) = (fresh()?, fresh()?);
            let s = |off: u64| r.timed_store(off, 0xfeed);
            let f = |off: u64| fresh_w.timed_store(off, 0xfeed);
            let ls = |off: u64| r.timed_load(off);
            let lf = |off: u64| fresh_r.timed_load(off);
            touch_all(&probed, &s, &ls, &f, &lf)
        })();
    };
    let mut probe_k = |m: &[AnonMemory]| {
        k = (|| {
            let fresh = || {
                AnonMemory::new(fresh_len)
                    .and_then(|f| f.set_mergeable(true).map(|()| f))
                    .map_err(|e| format!("fresh memory: {e}"))
            };
            let (fresh_w, fresh_r) = (fresh()?, fresh()?);
            let s = |off: u64| m[0].timed_store(off, 0xfeed);
            let f = |off: u64| fresh_w.timed_store(off, 0xfeed);
            let ls = |off: u64| m[0].timed_load(off);
            let lf = |off: u64| fresh_r.timed_load(off);
            touch_all(&probed, &s, &ls, &f, &lf)
        })();
    };
    eprintln!("bench: first-touch latency");
    let args = compare_args(
        run,
        LiveOpts {
            no_verify: true,
            ..live_opts(a.timeout)
        },
        a,
    );
    compare::compare(
        host,
        &args,
        &w,
        Probes {
            samepage: Some(&mut probe_sp),
            kernel: Some(&mut probe_k),
        },
    )?;
    let failed = |engine: &str, e: String| {
        CliError::Verification(format!("the {engine} engine's first touches: {e}"))
    };
    let (sp, k) = (
        sp.map_err(|e| failed("samepage", e))?,
        k.map_err(|e| failed("kernel", e))?,
    );
    Ok(TOUCHES
        .iter()
        .zip(sp.into_iter().zip(k))
        .flat_map(|(&kind, (s, k))| [latency(kind, "samepage", s), latency(kind, "kernel", k)])
        .collect())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':').map(|x| x.1.trim().to_string()))
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().next().and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .map_or(0.0, |kib| kib as f64 / (1 << 20) as f64);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpu}, {cores} cores, {mem_gib:.0} GiB, Linux {}",
        kernel.trim()
    )
}

/// Run the whole suite, with the host held from start to end: one session, so that nothing
/// else changes its knobs between runs. `vm.max_map_count` stays as it is: a merged page
/// costs samepage no mapping.
pub fn bench(a: &BenchArgs) -> Result<BenchReport, CliError> {
    crate::engines::catch_interrupts();
    if a.runs == 0 {
        return Err(CliError::usage("--runs must be at least 1"));
    }
    compare::check_set(&a.set)?;
    if a.what.contains(&Part::Clients) {
        crate::bench_clients::check(a)?;
    }
    let mut host = compare::take_host(a.wait)?;
    let r = suite(&mut host, a);
    compare::release_host(host, r)
}

fn suite(host: &mut HostSession, a: &BenchArgs) -> Result<BenchReport, CliError> {
    let mut rows = Vec::new();
    let gib = |s: u64| format!("{:.2} GiB", s as f64 / (1u64 << 30) as f64);
    let fixed = [
        ("all zero", 100, 0),
        ("all unique", 0, 0),
        ("duplicates in groups of 16", 0, 100),
        ("mixed 30% zero / 40% dup / 30% unique", 30, 40),
    ];
    let fixed = if a.what.contains(&Part::Workloads) {
        &fixed[..]
    } else {
        &[]
    };
    for &(name, zero, dup) in fixed {
        let label = format!("{name}, {}", gib(a.size));
        rows.push(row(host, &label, &run_args(a.size, zero, dup, &a.set), a)?);
    }
    // samepage's zero-only fast path against the kernel's rule, on the workloads with zeros.
    let mut fast = a.set.clone();
    fast.push("zero_pages_first_visit=1".into());
    for &(name, zero, dup) in fixed.iter().filter(|w| w.1 > 0) {
        let label = format!("{name}, {}, first visit", gib(a.size));
        rows.push(row(host, &label, &run_args(a.size, zero, dup, &fast), a)?);
    }
    let scaling = if a.what.contains(&Part::Scaling) {
        &a.scaling.0[..]
    } else {
        &[]
    };
    for &s in scaling {
        let label = format!("mixed, {}", gib(s));
        rows.push(row(host, &label, &run_args(s, 30, 40, &a.set), a)?);
    }
    let latency = if a.what.contains(&Part::Latency) {
        latencies(host, a)?
    } else {
        Vec::new()
    };
    let clients = if a.what.contains(&Part::Clients) {
        crate::bench_clients::rows(host, a)?
    } else {
        Vec::new()
    };
    let state = samepage_linux::PAGE_STATE_BYTES;
    Ok(BenchReport {
        machine: machine(),
        rows,
        latency,
        metadata: Metadata {
            samepage_rmap_item_bytes: RMAP_ITEM_BYTES,
            samepage_page_state_bytes: state,
            samepage_bytes_per_page: RMAP_ITEM_BYTES + state,
            kernel_bytes_per_page: 64,
        },
        clients,
    })
}

impl BenchReport {
    pub fn text(&self) -> String {
        let mut out = format!(
            "samepage bench on {}\n(ratios are samepage / kernel; medians)\n\n",
            self.machine
        );
        // Tables of parts not asked for are left out (`--what clients` alone, say).
        if !self.rows.is_empty() {
            out += &format!(
                "{:<56}{:>9}{:>9}{:>7}{:>8}{:>8}{:>7}{:>11}{:>11}{:>7}{:>6}{:>8}\n",
                "workload",
                "conv sp",
                "conv k",
                "ratio",
                "cpu sp",
                "cpu k",
                "ratio",
                "scan/s sp",
                "scan/s k",
                "ratio",
                "same",
                "B/item"
            );
        }
        for r in &self.rows {
            out += &format!(
                "{:<56}{:>9.3}{:>9.3}{:>7.2}{:>8.3}{:>8.3}{:>7.2}{:>11.0}{:>11.0}{:>7.2}{:>6}{:>8.1}\n",
                r.workload,
                r.samepage_converged_seconds,
                r.kernel_converged_seconds,
                r.converged_ratio,
                r.samepage_cpu_seconds,
                r.kernel_cpu_seconds,
                r.cpu_ratio,
                r.samepage_scan_pages_per_second,
                r.kernel_scan_pages_per_second,
                r.scan_rate_ratio,
                if r.same_counters { "yes" } else { "no" },
                r.samepage_metadata_bytes_per_rmap_item
            );
        }
        if !self.latency.is_empty() {
            out += "\nfirst touch (µs)            engine       pages      p50      p90      p99      max\n";
        }
        for l in &self.latency {
            out += &format!(
                "{:<28}{:<10}{:>8}{:>9.1}{:>9.1}{:>9.1}{:>9.1}\n",
                l.kind, l.engine, l.pages, l.p50_us, l.p90_us, l.p99_us, l.max_us
            );
        }
        let m = &self.metadata;
        out += &format!(
            "\nmetadata per tracked page: samepage {} bytes (rmap item {} + page state {}), kernel {} bytes (rmap item)\n\
             B/item: samepage's engine metadata at the end of a run over its rmap items, trees and stable nodes included\n",
            m.samepage_bytes_per_page, m.samepage_rmap_item_bytes, m.samepage_page_state_bytes, m.kernel_bytes_per_page
        );
        out += &crate::bench_clients::text(&self.clients);
        out
    }
}

/// `samepage bench`.
pub fn run(a: &BenchArgs) -> Result<(), CliError> {
    let r = bench(a)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", r.text());
    }
    Ok(())
}
