//! `samepage bench --what clients` (issue 11): the same bytes spread over 1, 2, 4... client
//! processes and merged by `samepage daemon`, against samepage's engine in this process (one
//! address space per slice) and against the host kernel's ksmd over the same processes.
//!
//! The bytes are the mixed workload (30% zero / 40% duplicates in groups of 16 / 30% unique,
//! seed 1), its pages cut into contiguous slices, one per process, so that duplicate groups
//! span processes. The client processes are `samepage bench-client` (hidden), which answers on
//! its standard input and output, one JSON line per answer:
//!
//! - on start: `{"ready": true, "pid": N}` once its slice is loaded (with `--socket`: a client
//!   of the daemon, its region advised mergeable; without: plain anonymous memory, not yet
//!   advised);
//! - `advise` / `unadvise`: `madvise(MADV_MERGEABLE / MADV_UNMERGEABLE)` on the plain memory
//!   (nothing for a daemon's client), `{"ok": true}`;
//! - `verify`: every page compared with what was loaded (merged pages are read from their
//!   canonical page, which unmerges nothing), and a daemon's client checks its agent's page
//!   states against its page tables: `{"ok": bool, "problems": [...], "marked_zero_pages": N}`;
//! - `quit` (or the end of its input): it exits.

use crate::bench::{median, ratio, run_args, BenchArgs};
use crate::compare;
use crate::demo_daemon::{start_daemon, Daemon, Guest, Procs};
use crate::engines::{self, Kernel, Samepage, Until};
use crate::error::CliError;
use crate::watch::Watch;
use clap::Args;
use samepage_engine::{KsmCounters, MergeState, PAGE_SIZE, PAGE_SIZE_U64};
use samepage_linux::host::{self, AnonMemory, HostSession};
use samepage_linux::wire::counters_of;
use samepage_linux::{ipc, ConnectOptions, Control, LiveKsm, Region};
use samepage_workload::{parse_size, Space, Workload};
use serde::Serialize;
use serde_json::{json, Value};
use std::io::{BufRead, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// One engine's figures for one process count: medians of the runs.
#[derive(Debug, Clone, Serialize)]
pub struct EngineFigures {
    /// From `run=1` to the last change of the merge counters.
    pub converged_seconds: f64,
    /// From `run=1` to `run=0` (the counters stable for two full scans).
    pub run_seconds: f64,
    /// Full scans of the run.
    pub full_scans: u64,
    /// The engine's CPU during the run: in-process, samepage's scanner and fault-handler
    /// threads; daemon, the daemon process; kernel, ksmd.
    pub cpu_seconds: f64,
    /// The client processes' CPU during the run (their agents serve the daemon's requests);
    /// 0 for the other two.
    pub clients_cpu_seconds: f64,
    pub pages_shared: u64,
    pub pages_sharing: u64,
    pub ksm_zero_pages: i64,
    /// pages_sharing + ksm_zero_pages at the end.
    pub merged_pages: i64,
    /// (cpu_seconds + clients_cpu_seconds) per merged page, in microseconds.
    pub cpu_us_per_merged_page: f64,
}

/// One process count.
#[derive(Debug, Clone, Serialize)]
pub struct ClientsRow {
    /// Client processes (address spaces of the in-process engine).
    pub clients: u64,
    /// Pages in all.
    pub pages: u64,
    pub runs: usize,
    pub in_process: EngineFigures,
    pub daemon: EngineFigures,
    pub kernel: EngineFigures,
    /// daemon / in-process, converge time.
    pub daemon_converged_ratio: f64,
    /// (daemon + its clients) / in-process, CPU.
    pub daemon_cpu_ratio: f64,
    /// The daemon process alone / in-process, CPU.
    pub daemon_only_cpu_ratio: f64,
    /// The merge counters (pages_shared, pages_sharing, ksm_zero_pages, chains, dups) were
    /// the same for the three engines in every run.
    pub same_counters: bool,
}

/// The pages of slice `i` of `n` over `pages` pages: contiguous and in order, the slices
/// together cover every page once, their sizes differ by at most one.
pub fn slice_of(pages: u64, n: u64, i: u64) -> Range<u64> {
    pages * i / n..pages * (i + 1) / n
}

/// Pages `range` of an address space, seen as an address space of its own.
struct Slice<'a> {
    space: &'a Space,
    range: Range<u64>,
}

impl Slice<'_> {
    fn pages(&self) -> u64 {
        self.range.end - self.range.start
    }
    fn bytes(&self) -> u64 {
        self.pages() * PAGE_SIZE_U64
    }
    fn fill_page(&self, i: u64, buf: &mut [u8; PAGE_SIZE]) {
        self.space.fill_page(self.range.start + i, buf);
    }
}

fn slices(w: &Workload, n: u64) -> Vec<Slice<'_>> {
    let space = &w.spaces[0];
    (0..n)
        .map(|i| Slice {
            space,
            range: slice_of(space.pages(), n, i),
        })
        .collect()
}

/// Write a slice's pages through `write(offset, bytes)`.
fn load(
    s: &Slice<'_>,
    write: impl FnMut(u64, &[u8]) -> Result<(), CliError>,
) -> Result<(), CliError> {
    crate::merge::load_pages(s.pages(), |i, page| s.fill_page(i, page), write)
}

/// The pages of a slice that do not read what was loaded (the first few), read through
/// `read(offset, page)`.
fn mismatches(
    s: &Slice<'_>,
    mut read: impl FnMut(u64, &mut [u8; PAGE_SIZE]) -> Result<(), CliError>,
) -> Result<Vec<String>, CliError> {
    let mut want = [0u8; PAGE_SIZE];
    let mut got = [0u8; PAGE_SIZE];
    let mut bad = Vec::new();
    for i in 0..s.pages() {
        if i % 4096 == 0 {
            engines::interrupted()?;
        }
        s.fill_page(i, &mut want);
        read(i * PAGE_SIZE_U64, &mut got)?;
        if got != want {
            bad.push(format!(
                "page {} of the workload does not hold what was loaded",
                s.range.start + i
            ));
            if bad.len() >= 8 {
                break;
            }
        }
    }
    Ok(bad)
}

/// One run of one engine.
struct Measure {
    converged: f64,
    run: f64,
    passes: u64,
    cpu: f64,
    clients_cpu: f64,
    counters: KsmCounters,
}

impl Measure {
    fn of(out: &engines::Outcome, clients_cpu: f64, counters: KsmCounters) -> Self {
        Self {
            converged: out.converged_seconds,
            run: out.run_seconds,
            passes: out.passes,
            cpu: out.cpu_seconds,
            clients_cpu,
            counters,
        }
    }
    fn merged(&self) -> i64 {
        self.counters.pages_sharing as i64 + self.counters.ksm_zero_pages
    }
    fn state(&self) -> MergeState {
        self.counters.merge_state()
    }
}

fn figures(m: &[Measure]) -> EngineFigures {
    let med = |f: &dyn Fn(&Measure) -> f64| median(m.iter().map(f).collect());
    let last = &m[m.len() - 1].counters;
    EngineFigures {
        converged_seconds: med(&|x| x.converged),
        run_seconds: med(&|x| x.run),
        full_scans: median(m.iter().map(|x| x.passes as f64).collect()) as u64,
        cpu_seconds: med(&|x| x.cpu),
        clients_cpu_seconds: med(&|x| x.clients_cpu),
        pages_shared: last.pages_shared,
        pages_sharing: last.pages_sharing,
        ksm_zero_pages: last.ksm_zero_pages,
        merged_pages: last.pages_sharing as i64 + last.ksm_zero_pages,
        cpu_us_per_merged_page: med(&|x| ratio((x.cpu + x.clients_cpu) * 1e6, x.merged() as f64)),
    }
}

/// What the clients part can refuse before the host is taken.
pub fn check(a: &BenchArgs) -> Result<(), CliError> {
    if a.clients_size == 0 || !a.clients_size.is_multiple_of(PAGE_SIZE_U64) {
        return Err(CliError::Usage(format!(
            "--clients-size {} is not a positive multiple of {PAGE_SIZE} bytes",
            a.clients_size
        )));
    }
    let pages = a.clients_size / PAGE_SIZE_U64;
    if let Some(&n) = a.clients.iter().find(|&&n| n == 0 || n > pages) {
        return Err(CliError::Usage(format!(
            "--clients {n}: each process needs at least one of the {pages} pages of \
             --clients-size, and there is at least one process"
        )));
    }
    run_args(a.clients_size, 30, 40, &a.set).workload()?;
    // Every client and the in-process engine need a userfaultfd.
    samepage_linux::check_userfaultfd()?;
    Ok(())
}

/// Everything one process count's runs share.
struct Setup<'a> {
    exe: &'a Path,
    dir: &'a Path,
    size: u64,
    knobs: &'a [(String, String)],
    until: Until,
    timeout: Duration,
}

/// The rows of `--clients`, with the host held by `host` (only the kernel's runs touch it).
pub fn rows(host: &mut HostSession, a: &BenchArgs) -> Result<Vec<ClientsRow>, CliError> {
    let run = run_args(a.clients_size, 30, 40, &a.set);
    let w = run.workload()?;
    let knobs = compare::knobs(&run)?;
    let exe = std::env::current_exe().map_err(CliError::io("cannot find samepage's own binary"))?;
    let dir = std::env::temp_dir().join(format!("samepage-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(CliError::io(format!("cannot make {}", dir.display())))?;
    let setup = Setup {
        exe: &exe,
        dir: &dir,
        size: a.clients_size,
        knobs: &knobs,
        until: run.until(),
        timeout: Duration::from_secs(a.timeout),
    };
    let result = a
        .clients
        .iter()
        .map(|&n| row(host, &setup, &w, n, a.runs))
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn row(
    host: &mut HostSession,
    s: &Setup<'_>,
    w: &Workload,
    n: u64,
    runs: usize,
) -> Result<ClientsRow, CliError> {
    let (mut ip, mut dm, mut k) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        eprintln!("bench: {n} client process(es), run {}/{runs}", i + 1);
        ip.push(in_process(s, w, n)?);
        dm.push(daemon(s, n, i)?);
        k.push(kernel(host, s, n)?);
    }
    let first = ip[0].state();
    let same_counters = ip.iter().chain(&dm).chain(&k).all(|m| m.state() == first);
    let (ip, dm, k) = (figures(&ip), figures(&dm), figures(&k));
    Ok(ClientsRow {
        clients: n,
        pages: w.total_pages(),
        runs,
        daemon_converged_ratio: ratio(dm.converged_seconds, ip.converged_seconds),
        daemon_cpu_ratio: ratio(dm.cpu_seconds + dm.clients_cpu_seconds, ip.cpu_seconds),
        daemon_only_cpu_ratio: ratio(dm.cpu_seconds, ip.cpu_seconds),
        in_process: ip,
        daemon: dm,
        kernel: k,
        same_counters,
    })
}

/// samepage's engine in this process, one address space per slice.
fn in_process(s: &Setup<'_>, w: &Workload, n: u64) -> Result<Measure, CliError> {
    let ksm = LiveKsm::new()?;
    for (k, v) in s.knobs {
        ksm.set_knob(k, v)
            .map_err(CliError::live_knob(format!("setting {k}={v}")))?;
    }
    let sl = slices(w, n);
    let mut regions: Vec<Region> = Vec::new();
    for x in &sl {
        let r = ksm.create_region(ksm.new_mm(), x.bytes())?;
        load(x, |off, b| Ok(r.write(off, b)?))?;
        regions.push(r);
    }
    for r in &regions {
        ksm.madvise_mergeable(r)?;
    }
    let mut watch = Watch::new("samepage", w.total_pages(), false, None);
    let out = engines::run(&Samepage(&ksm), s.until, s.timeout, &mut watch)?;
    let counters = ksm.counters();
    let mut problems = ksm.verify().problems();
    for (r, x) in regions.iter().zip(&sl) {
        problems.extend(mismatches(x, |off, page| Ok(r.peek_page(off, page)?))?);
    }
    if !problems.is_empty() {
        return Err(CliError::Verification(format!(
            "in-process, {n} address space(s): {}",
            problems.join("; ")
        )));
    }
    Ok(Measure::of(&out, 0.0, counters))
}

/// Start `n` client processes (of the daemon on `socket`, or of the host's KSM) and wait
/// until each has loaded its slice.
fn start_clients(
    s: &Setup<'_>,
    procs: &mut Procs,
    n: u64,
    socket: Option<&Path>,
) -> Result<(), CliError> {
    for i in 0..n {
        let mut cmd = Command::new(s.exe);
        cmd.arg("bench-client")
            .args(["--size", &s.size.to_string()])
            .args(["--clients", &n.to_string()])
            .args(["--index", &i.to_string()]);
        if let Some(p) = socket {
            cmd.arg("--socket").arg(p);
        }
        procs
            .guests
            .push(Guest::spawn(&mut cmd, "a bench client process")?);
    }
    procs.wait_ready("bench client")
}

/// Ask every client to check its bytes; `zero_pages` is the engine's ksm_zero_pages, which
/// the zero-page entries the clients' agents marked must add up to.
fn verify_clients(procs: &mut Procs, what: &str, zero_pages: Option<i64>) -> Result<(), CliError> {
    let mut problems = Vec::new();
    let mut marked = 0;
    for g in &mut procs.guests {
        let r = g.ask("verify")?;
        for p in r["problems"].as_array().into_iter().flatten() {
            problems.push(format!("client {}: {}", g.pid, p.as_str().unwrap_or("?")));
        }
        if r["ok"] != true && problems.is_empty() {
            problems.push(format!("client {} answered {r}", g.pid));
        }
        marked += r["marked_zero_pages"].as_i64().unwrap_or(0);
    }
    if let Some(z) = zero_pages.filter(|&z| z != marked) {
        problems.push(format!(
            "ksm_zero_pages is {z} but the clients' page tables hold {marked} marked zero pages"
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CliError::Verification(format!(
            "{what}: {}",
            problems.join("; ")
        )))
    }
}

fn clients_cpu_ns(pids: &[u32]) -> u64 {
    pids.iter().map(|&p| ipc::process_cpu_ns(p)).sum()
}

/// `samepage daemon` on a private socket and `n` client processes.
fn daemon(s: &Setup<'_>, n: u64, run: usize) -> Result<Measure, CliError> {
    let socket = s.dir.join(format!("daemon-{n}-{run}.sock"));
    let mut procs = Procs {
        daemon: Some(start_daemon(s.exe, &socket, s.knobs)?),
        guests: Vec::new(),
    };
    let daemon_pid = procs.daemon.as_ref().map_or(0, |d| d.id());
    start_clients(s, &mut procs, n, Some(&socket))?;
    let control = Control::connect(&socket)?;
    let pids: Vec<u32> = procs.guests.iter().map(|g| g.pid).collect();
    let mut watch = Watch::new("samepage", 0, false, None);
    let c0 = clients_cpu_ns(&pids);
    let out = engines::run(
        &Daemon {
            control: &control,
            pid: daemon_pid,
        },
        s.until,
        s.timeout,
        &mut watch,
    )?;
    let clients_cpu = clients_cpu_ns(&pids).saturating_sub(c0) as f64 / 1e9;
    let counters = counters_of(&control.stat()?.ksm);
    verify_clients(
        &mut procs,
        &format!("daemon, {n} client(s)"),
        Some(counters.ksm_zero_pages),
    )?;
    drop(procs);
    Ok(Measure::of(&out, clients_cpu, counters))
}

/// The host's ksmd over `n` client processes holding the slices in plain memory. The end of
/// the phase is that of `compare`: `run=2` (unless another process uses KSM now, when only
/// the clients' memory is unmerged), every knob back, `run` last, before the clients exit.
fn kernel(host: &mut HostSession, s: &Setup<'_>, n: u64) -> Result<Measure, CliError> {
    host.check_idle()?;
    let mut procs = Procs {
        daemon: None,
        guests: Vec::new(),
    };
    start_clients(s, &mut procs, n, None)?;
    let pids: Vec<u32> = procs.guests.iter().map(|g| g.pid).collect();
    // The clients are not advised yet: the host is still idle.
    compare::in_kernel_phase(
        host,
        s.knobs,
        procs,
        &pids,
        |procs| kernel_phase(s, procs, n),
        |procs| {
            for g in &mut procs.guests {
                let _ = g.ask("unadvise");
            }
        },
    )
}

fn kernel_phase(s: &Setup<'_>, procs: &mut Procs, n: u64) -> Result<Measure, CliError> {
    for g in &mut procs.guests {
        let v = g.ask("advise")?;
        if v["ok"] != true {
            return Err(CliError::Failed(format!(
                "bench client {}: madvise(MADV_MERGEABLE): {v}",
                g.pid
            )));
        }
    }
    let mut watch = Watch::new("kernel", 0, false, None);
    let out = engines::run(
        &Kernel {
            ksmd: host::ksmd_pid(),
        },
        s.until,
        s.timeout,
        &mut watch,
    )?;
    let counters = host::counters()?;
    verify_clients(procs, &format!("kernel, {n} client(s)"), None)?;
    Ok(Measure::of(&out, 0.0, counters))
}

/// The table of `--what clients`.
pub fn text(rows: &[ClientsRow]) -> String {
    let Some(r0) = rows.first() else {
        return String::new();
    };
    let mut out = format!(
        "\nclient processes: the mixed workload (30% zero / 40% duplicates in groups of 16 / 30% \
         unique, seed 1), {:.1} MiB ({} pages) in all, cut into contiguous slices, one per \
         process; medians of {} run(s), every byte checked after each (a mismatch ends the \
         benchmark with status 3)\n",
        r0.pages as f64 * PAGE_SIZE_U64 as f64 / (1 << 20) as f64,
        r0.pages,
        r0.runs
    );
    out += &format!(
        "{:>7}  {:<12}{:>9}{:>9}{:>7}{:>9}{:>13}{:>14}{:>8}{:>9}{:>9}\n",
        "procs",
        "engine",
        "conv (s)",
        "run (s)",
        "scans",
        "cpu (s)",
        "clients cpu",
        "µs/merged pg",
        "shared",
        "sharing",
        "zero"
    );
    for r in rows {
        for (name, f) in [
            ("in-process", &r.in_process),
            ("daemon", &r.daemon),
            ("kernel", &r.kernel),
        ] {
            out += &format!(
                "{:>7}  {:<12}{:>9.3}{:>9.3}{:>7}{:>9.3}{:>13.3}{:>14.2}{:>8}{:>9}{:>9}\n",
                r.clients,
                name,
                f.converged_seconds,
                f.run_seconds,
                f.full_scans,
                f.cpu_seconds,
                f.clients_cpu_seconds,
                f.cpu_us_per_merged_page,
                f.pages_shared,
                f.pages_sharing,
                f.ksm_zero_pages
            );
        }
        out += &format!(
            "{:>7}  daemon / in-process: converged {:.2}, CPU {:.2} with its clients ({:.2} the \
             daemon alone); same merge counters: {}\n",
            "",
            r.daemon_converged_ratio,
            r.daemon_cpu_ratio,
            r.daemon_only_cpu_ratio,
            if r.same_counters { "yes" } else { "no" }
        );
    }
    out += "run: run=1 to run=0 (stable for two full scans); cpu, over the run: in-process, samepage's scanner and fault handler; daemon, the daemon process; \
            kernel, ksmd. clients cpu: the daemon's clients during the run (their agents serve \
            the daemon). µs/merged pg: (cpu + clients cpu) / (pages_sharing + ksm_zero_pages)\n";
    out
}

/// `samepage bench-client` arguments.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// The daemon's socket; without it, the slice is plain memory for the host's KSM.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Bytes of the whole workload.
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// Processes the workload is cut into.
    #[arg(long)]
    pub clients: u64,
    /// Which slice this process holds.
    #[arg(long)]
    pub index: u64,
}

fn say(v: Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// Where a client's slice is.
enum Memory {
    Daemon { ksm: LiveKsm, region: Region },
    Kernel(AnonMemory),
}

/// `samepage bench-client`.
pub fn run_client(a: &ClientArgs) -> Result<(), CliError> {
    let w = run_args(a.size, 30, 40, &[]).workload()?;
    let pages = w.total_pages();
    if a.clients == 0 || a.index >= a.clients || a.clients > pages {
        return Err(CliError::Usage(format!(
            "there is no slice {} of {} over {pages} pages",
            a.index, a.clients
        )));
    }
    let slice = Slice {
        space: &w.spaces[0],
        range: slice_of(pages, a.clients, a.index),
    };
    let mem = match &a.socket {
        Some(socket) => {
            let ksm = LiveKsm::connect(&ConnectOptions {
                socket: socket.clone(),
                domain: None,
                merge_any: false,
            })?;
            let region = ksm.create_region(ksm.new_mm(), slice.bytes())?;
            load(&slice, |off, b| Ok(region.write(off, b)?))?;
            ksm.madvise_mergeable(&region)?;
            Memory::Daemon { ksm, region }
        }
        None => {
            let m = AnonMemory::new(slice.bytes())
                .map_err(CliError::io("cannot map memory for the slice"))?;
            load(&slice, |off, b| {
                m.write(off, b)
                    .map_err(CliError::io("cannot fill the slice"))
            })?;
            Memory::Kernel(m)
        }
    };
    say(json!({"ready": true, "pid": std::process::id()}));
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(CliError::io("cannot read the bench's request"))?;
        match line.trim() {
            cmd @ ("advise" | "unadvise") => {
                let r = match &mem {
                    Memory::Kernel(m) => m.set_mergeable(cmd == "advise"),
                    Memory::Daemon { .. } => Ok(()),
                };
                match r {
                    Ok(()) => say(json!({"ok": true})),
                    Err(e) => say(json!({"ok": false, "error": e.to_string()})),
                }
            }
            "verify" => {
                let (mut problems, marked) = match &mem {
                    Memory::Daemon { ksm, region } => {
                        let v = ksm.verify();
                        let marked: i64 = v.marked_zero_pages.values().sum();
                        let mut p =
                            mismatches(&slice, |off, page| Ok(region.peek_page(off, page)?))?;
                        p.extend(v.problems());
                        (p, marked)
                    }
                    Memory::Kernel(m) => (
                        mismatches(&slice, |off, page| {
                            m.read_page(off, page)
                                .map_err(CliError::io("cannot read the slice"))
                        })?,
                        0,
                    ),
                };
                if let Memory::Daemon { ksm, .. } = &mem {
                    if !ksm.connected() {
                        problems.push("the connection to the daemon is gone".into());
                    }
                }
                say(json!({
                    "ok": problems.is_empty(),
                    "problems": problems,
                    "marked_zero_pages": marked,
                }));
            }
            "quit" | "" => break,
            other => say(json!({"error": format!("unknown command {other:?}")})),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn slices_cover_every_page_once_in_order_and_differ_by_at_most_one() {
        for pages in [1u64, 2, 3, 7, 16, 4096, 262_144, 262_147] {
            for n in (1..=8).filter(|&n| n <= pages) {
                let s: Vec<_> = (0..n).map(|i| slice_of(pages, n, i)).collect();
                assert_eq!(s[0].start, 0);
                assert_eq!(s[n as usize - 1].end, pages);
                for w in s.windows(2) {
                    assert_eq!(w[0].end, w[1].start, "{pages} pages, {n} slices");
                }
                let len: Vec<u64> = s.iter().map(|r| r.end - r.start).collect();
                let (lo, hi) = (len.iter().min().unwrap(), len.iter().max().unwrap());
                assert!(
                    *lo >= 1 && hi - lo <= 1,
                    "{pages} pages, {n} slices: {len:?}"
                );
            }
        }
    }

    #[test]
    fn duplicate_groups_span_the_processes() {
        let w = run_args(4 << 20, 30, 40, &[]).workload().unwrap();
        let sl = slices(&w, 4);
        assert_eq!(sl.iter().map(Slice::pages).sum::<u64>(), w.total_pages());
        // Which slices hold each content of a duplicate group (the first word names it).
        let mut seen: HashMap<u64, Vec<usize>> = HashMap::new();
        let mut page = [0u8; PAGE_SIZE];
        for (k, s) in sl.iter().enumerate() {
            for i in 0..s.pages() {
                s.fill_page(i, &mut page);
                let class = u64::from_le_bytes(page[..8].try_into().unwrap());
                if class != 0 {
                    seen.entry(class).or_default().push(k);
                }
            }
        }
        let spanning = seen
            .values()
            .filter(|v| v.len() > 1 && v.iter().any(|&k| k != v[0]))
            .count();
        assert!(spanning > 0, "no duplicate group spans two slices");
        // Slice pages are the workload's pages, in order.
        let mut a = [0u8; PAGE_SIZE];
        sl[2].fill_page(5, &mut page);
        w.spaces[0].fill_page(sl[2].range.start + 5, &mut a);
        assert_eq!(a, page);
    }
}
