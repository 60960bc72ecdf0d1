//! `samepage demo` across processes: a `samepage daemon` and one `samepage guest` process
//! per guest, merged through the daemon, as virtual machines (one QEMU each) would be.

use crate::demo::{DemoArgs, DEMO_KNOBS};
use crate::engines::{self, Engine, Until};
use crate::error::CliError;
use crate::merge::MemoryKib;
use crate::report::{tunables_of, Mappings, MetadataBytes, Report, SpaceInfo};
use crate::watch::Watch;
use samepage_engine::KsmCounters;
use samepage_linux::footprint::Footprint;
use samepage_linux::ipc;
use samepage_linux::verify::Verification;
use samepage_linux::wire::{counters_of, StatReply};
use samepage_linux::{Control, LiveStats, Metadata};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

/// The daemon as an engine the run loop drives.
pub(crate) struct Daemon<'a> {
    pub(crate) control: &'a Control,
    pub(crate) pid: u32,
}

impl Engine for Daemon<'_> {
    fn name(&self) -> &'static str {
        "samepage"
    }
    fn counters(&self) -> KsmCounters {
        self.control
            .stat()
            .map(|s| counters_of(&s.ksm))
            .unwrap_or_default()
    }
    fn set_running(&self, on: bool) -> Result<(), CliError> {
        Ok(self.control.write_knob("run", if on { "1" } else { "0" })?)
    }
    fn cpu_seconds(&self) -> f64 {
        ipc::process_cpu_ns(self.pid) as f64 / 1e9
    }
    fn wait_for_change(&self, timeout: Duration) {
        let _ = self.control.wait(0, timeout);
    }
    fn read_every(&self) -> Duration {
        // A reading is a stat request whose answer walks every client's page tables.
        engines::SAMEPAGE_READ_EVERY
    }
}

/// The processes the demo started: every one is ended (by pid) when it is dropped.
pub(crate) struct Procs {
    pub(crate) daemon: Option<Child>,
    pub(crate) guests: Vec<Guest>,
}

impl Procs {
    /// Wait for every child's first line, `{"ready": true, ...}` once it has loaded its
    /// memory.
    pub(crate) fn wait_ready(&mut self, what: &str) -> Result<(), CliError> {
        for g in &mut self.guests {
            let v = g.answer()?;
            if v["ready"] != true {
                return Err(CliError::Failed(format!(
                    "{what} {} did not start: {v}",
                    g.pid
                )));
            }
            engines::interrupted()?;
        }
        Ok(())
    }
}

/// A child process answering one JSON line per request on its standard output.
pub(crate) struct Guest {
    pub(crate) child: Child,
    pub(crate) pid: u32,
    pub(crate) stdin: ChildStdin,
    pub(crate) stdout: BufReader<ChildStdout>,
}

impl Guest {
    /// Start `cmd` with its standard input and output piped to this process.
    pub(crate) fn spawn(cmd: &mut Command, what: &str) -> Result<Self, CliError> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(CliError::io(format!("cannot start {what}")))?;
        let pid = child.id();
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        Ok(Self {
            child,
            pid,
            stdin,
            stdout,
        })
    }
    pub(crate) fn ask(&mut self, cmd: &str) -> Result<Value, CliError> {
        writeln!(self.stdin, "{cmd}")
            .map_err(CliError::io(format!("cannot ask guest {}", self.pid)))?;
        self.answer()
    }
    pub(crate) fn answer(&mut self) -> Result<Value, CliError> {
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(0) | Err(_) => Err(CliError::Failed(format!(
                "guest process {} ended early",
                self.pid
            ))),
            Ok(_) => serde_json::from_str(&line).map_err(|e| {
                CliError::Failed(format!("guest {} answered {line:?}: {e}", self.pid))
            }),
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for g in &mut self.guests {
            let _ = writeln!(g.stdin, "quit");
        }
        for g in &mut self.guests {
            let _ = g.child.wait();
        }
        if let Some(mut d) = self.daemon.take() {
            ipc::terminate(d.id());
            let _ = d.wait();
        }
    }
}

/// Memory of a set of processes, summed.
fn memory_of(pids: &[u32]) -> MemoryKib {
    pids.iter().fold(MemoryKib { anon: 0, pss: 0 }, |acc, &p| {
        let m = crate::merge::memory_kib_of(p);
        MemoryKib {
            anon: acc.anon + m.anon,
            pss: acc.pss + m.pss,
        }
    })
}

pub(crate) fn start_daemon(
    exe: &Path,
    socket: &Path,
    knobs: &[(String, String)],
) -> Result<Child, CliError> {
    let mut cmd = Command::new(exe);
    cmd.arg("daemon").arg("--socket").arg(socket);
    for (k, v) in knobs {
        cmd.arg("--set").arg(format!("{k}={v}"));
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(CliError::io("cannot start samepage daemon"))?;
    // It says when it listens; what it says after that is its log, kept for an error.
    let mut err = BufReader::new(child.stderr.take().expect("piped"));
    let mut line = String::new();
    loop {
        line.clear();
        if err.read_line(&mut line).unwrap_or(0) == 0 {
            let _ = child.wait();
            return Err(CliError::failed(
                "samepage daemon stopped before it listened",
            ));
        }
        if line.contains("listening on") {
            break;
        }
        if line.starts_with("samepage: error: ") {
            // main prints this line and returns: the daemon is exiting, and its status says
            // which kind of failure it was.
            let status = child
                .wait()
                .ok()
                .and_then(|s| s.code())
                .and_then(|c| u8::try_from(c).ok())
                .filter(|&c| c != 0)
                .unwrap_or(crate::error::EXIT_FAILURE);
            return Err(CliError::Child {
                message: line
                    .trim()
                    .trim_start_matches("samepage: error: ")
                    .to_string(),
                status,
            });
        }
    }
    std::thread::spawn(move || {
        let mut s = String::new();
        while err.read_line(&mut s).unwrap_or(0) > 0 {
            s.clear();
        }
    });
    Ok(child)
}

/// `samepage demo` with the guests as processes of their own.
pub fn run(a: &DemoArgs) -> Result<(), CliError> {
    engines::catch_interrupts();
    crate::preflight::check_outputs(&a.live)?;
    // Every guest process needs a userfaultfd: say so once, before starting anything.
    samepage_linux::check_userfaultfd()?;
    let spec = crate::demo::spec(a);
    let kinds = spec.layout()?;
    let workload = samepage_workload::Workload::guests(&spec)?;
    let mut knobs: Vec<(String, String)> = DEMO_KNOBS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    knobs.extend(crate::args::parse_knobs(&a.set)?);
    crate::args::check_knobs(&knobs)?;
    let exe = std::env::current_exe().map_err(CliError::io("cannot find samepage's own binary"))?;
    let dir = std::env::temp_dir().join(format!("samepage-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(CliError::io(format!("cannot make {}", dir.display())))?;
    let socket = dir.join("samepage.sock");
    let result = run_in(a, &spec, &kinds, &workload, &knobs, &exe, &socket);
    let _ = std::fs::remove_dir_all(&dir);
    let report = result?;
    if let Some((p, samples)) = a.live.plot.as_ref().zip(report.1.as_ref()) {
        crate::plot::write(p, "samepage demo", &[("samepage", samples)])?;
    }
    if !a.json {
        println!(
            "samepage demo: {} guest processes of {:.0} MiB each share one OS image ({}% of \
             their pages), hold their own data ({}%) and zeroed free memory ({}%), merged by \
             samepage daemon (pid {}); an application in guest0 keeps writing pages{}.\n",
            a.guests,
            a.size as f64 / a.guests as f64 / (1 << 20) as f64,
            spec.shared_pct,
            spec.unique_pct,
            100 - spec.shared_pct - spec.unique_pct,
            report.2,
            if a.quiet_guests {
                " (off: --quiet-guests)"
            } else {
                ""
            }
        );
    }
    report.0.print(a.json)
}

#[allow(clippy::too_many_arguments)]
fn run_in(
    a: &DemoArgs,
    spec: &samepage_workload::GuestSpec,
    kinds: &[samepage_workload::GuestPage],
    workload: &samepage_workload::Workload,
    knobs: &[(String, String)],
    exe: &Path,
    socket: &Path,
) -> Result<(Report, Option<Vec<crate::watch::Sample>>, u32), CliError> {
    let mut procs = Procs {
        daemon: Some(start_daemon(exe, socket, knobs)?),
        guests: Vec::new(),
    };
    let daemon_pid = procs.daemon.as_ref().map(|d| d.id()).unwrap_or(0);
    for i in 0..a.guests {
        let mut cmd = Command::new(exe);
        cmd.arg("guest")
            .arg("--socket")
            .arg(socket)
            .args(["--size", &spec.size.to_string()])
            .args(["--guests", &spec.guests.to_string()])
            .args(["--index", &i.to_string()])
            .args(["--seed", &spec.seed.to_string()]);
        if i == 0 && !a.quiet_guests {
            cmd.arg("--app");
        }
        procs
            .guests
            .push(Guest::spawn(&mut cmd, "a guest process")?);
    }
    procs.wait_ready("guest")?;
    let pids: Vec<u32> = procs.guests.iter().map(|g| g.pid).collect();
    let control = Control::connect(socket)?;
    let all: Vec<u32> = pids.iter().copied().chain([daemon_pid]).collect();
    let before = memory_of(&all);
    let mut watch = Watch::new(
        "samepage",
        workload.total_pages(),
        !a.json,
        a.live.prometheus.clone(),
    );
    let c = &control;
    watch.ksm_stat = Box::new(move || {
        c.stat()
            .unwrap_or_default()
            .ksm_stat
            .iter()
            .map(|c| c.to_ksm_stat())
            .collect()
    });
    let outcome = engines::run(
        &Daemon {
            control: &control,
            pid: daemon_pid,
        },
        Until::Stable { min_passes: 3 },
        Duration::from_secs(a.live.timeout),
        &mut watch,
    )?;
    let after = memory_of(&all);
    // Each guest checks its own memory; the demo checks that pages of the OS image every
    // guest has stand for one canonical page, whichever process they are in.
    let mut v = Verification::default();
    let mut live = LiveStats::default();
    let mut canonical_of: BTreeMap<u64, u64> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut cross = 0u64;
    let mut guests_state_bytes = 0;
    // Unknown as soon as one process's could not be read.
    let mut footprint = Some(Footprint::default());
    for g in &mut procs.guests {
        let r = g.ask("verify")?;
        if let Ok(m) = serde_json::from_value::<Metadata>(r["metadata"].clone()) {
            guests_state_bytes += m.page_state_bytes;
        }
        match serde_json::from_value::<Footprint>(r["footprint"].clone()) {
            Ok(f) => footprint.iter_mut().for_each(|x| x.add(&f)),
            Err(_) => footprint = None,
        }
        if a.live.no_verify {
            continue;
        }
        for p in r["problems"].as_array().into_iter().flatten() {
            problems.push(format!("guest {}: {}", g.pid, p.as_str().unwrap_or("?")));
        }
        if let Ok(gv) = serde_json::from_value::<Verification>(r["verification"].clone()) {
            v.marked_zero_pages.extend(gv.marked_zero_pages);
            v.counted_zero_pages.extend(gv.counted_zero_pages);
            v.stray_marks += gv.stray_marks;
            v.merged_pages += gv.merged_pages;
            v.present_merged += gv.present_merged;
        }
        if let Ok(s) = serde_json::from_value::<LiveStats>(r["stats"].clone()) {
            live.agent.cow_merged += s.agent.cow_merged;
            live.agent.read_merged += s.agent.read_merged;
            live.agent.missing_faults += s.agent.missing_faults;
            live.agent.zero_filled_ahead += s.agent.zero_filled_ahead;
            live.agent.copied_ahead += s.agent.copied_ahead;
            live.agent.pinned_skipped += s.agent.pinned_skipped;
            live.agent.changed_skipped += s.agent.changed_skipped;
        }
        for m in r["merged"].as_array().into_iter().flatten() {
            let (i, k) = (m[0].as_u64().unwrap_or(0), m[1].as_u64().unwrap_or(0));
            if kinds.get(i as usize) != Some(&samepage_workload::GuestPage::Shared) {
                continue;
            }
            match canonical_of.get(&i) {
                Some(&k0) if k0 != k => {
                    problems.push(format!(
                        "page {i} of the OS image stands for canonical page {k0} in one guest \
                         and {k} in guest {}",
                        g.pid
                    ));
                }
                Some(_) => cross += 1,
                None => {
                    canonical_of.insert(i, k);
                }
            }
        }
    }
    // Read once every guest's application has stopped (the last one stops at its verify).
    let st: StatReply = control.stat()?;
    v.counted_zero_pages_global = counters_of(&st.ksm).ksm_zero_pages;
    v.canonical_pages = canonical_of
        .values()
        .collect::<std::collections::BTreeSet<_>>()
        .len() as u64;
    problems.extend(v.problems());
    if !a.live.no_verify && cross == 0 && a.guests > 1 {
        problems.push("no page of the OS image is merged across guest processes".into());
    }
    if !problems.is_empty() {
        return Err(CliError::Verification(problems.join("; ")));
    }
    let counters = counters_of(&st.ksm);
    let ksm_stat: Vec<_> = st.ksm_stat.iter().map(|c| c.to_ksm_stat()).collect();
    if let Some(path) = &a.live.prometheus {
        crate::prom::write_file(path, &[("samepage", &counters, &ksm_stat)])
            .map_err(CliError::write(path))?;
    }
    live.ksmd = st.ksmd;
    let info: Vec<SpaceInfo> = procs
        .guests
        .iter()
        .enumerate()
        .map(|(i, g)| SpaceInfo {
            pid: g.pid,
            name: format!("guest{i}"),
            pages: workload.spaces[i].pages(),
        })
        .collect();
    let tunables = tunables_of(|n| st.ksm.get(n).cloned());
    let mut report = Report::live(
        "daemon",
        info,
        (counters, tunables),
        ksm_stat,
        &outcome,
        before,
        after,
        Some(live),
        (!a.live.no_verify).then_some(v),
    );
    let costs = control.costs()?;
    match (&mut footprint, &costs.footprint) {
        (Some(f), Some(d)) => f.add(d),
        _ => footprint = None,
    }
    report.set_costs(
        MetadataBytes::new(
            costs.metadata.engine_bytes,
            costs.metadata.rmap_items,
            Some(costs.metadata.page_state_bytes + guests_state_bytes),
        ),
        footprint.map_or(Mappings::Unknown, Mappings::Known),
    );
    drop(procs);
    Ok((report, Some(outcome.samples), daemon_pid))
}
