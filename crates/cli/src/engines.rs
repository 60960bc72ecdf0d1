//! The two KSM engines a live command can run on the same bytes: samepage's own (a
//! [`LiveKsm`] in this process) and the host kernel's ksmd. One loop runs either until its
//! counters settle, watching them for the progress display, the Prometheus file and the plot.

use crate::error::CliError;
use crate::watch::{Sample, Watch};
pub use samepage_engine::Until;
use samepage_engine::{Convergence, KsmCounters};
use samepage_linux::{host, LiveKsm};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Set by Ctrl-C (SIGINT), SIGTERM or SIGHUP once [`catch_interrupts`] ran: long loops give
/// up cleanly, so that what they changed is put back, and the command exits with status 130
/// however far it got.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Catch Ctrl-C, SIGTERM and SIGHUP for the live commands (installed once).
pub fn catch_interrupts() {
    let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst));
}

/// On Ctrl-C, SIGTERM or SIGHUP, set the flag and call `f` too (a daemon stops at once
/// rather than at its next check).
pub fn on_interrupt(f: impl Fn() + Send + 'static) {
    let _ = ctrlc::set_handler(move || {
        INTERRUPTED.store(true, Ordering::SeqCst);
        f();
    });
}

/// Has the user interrupted the command?
pub fn interrupted_now() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// An error once the command is interrupted. What the command changed is put back by its
/// owners as the error unwinds, and they say so.
pub fn interrupted() -> Result<(), CliError> {
    if interrupted_now() {
        Err(CliError::Interrupted)
    } else {
        Ok(())
    }
}

/// A KSM engine the run loop can drive.
pub trait Engine: Sync {
    /// "samepage" or "kernel".
    fn name(&self) -> &'static str;
    /// The global counters (`/sys/kernel/mm/ksm`).
    fn counters(&self) -> KsmCounters;
    /// `run=1` or `run=0`.
    fn set_running(&self, on: bool) -> Result<(), CliError>;
    /// When the merge counters last changed, if the engine knows it more precisely than a
    /// reader polling its counters.
    fn last_change(&self) -> Option<Instant> {
        None
    }
    /// CPU time the engine has used so far, in seconds.
    fn cpu_seconds(&self) -> f64;
    /// Wait until the counters may have changed (at most `timeout`). Without a way to be
    /// told, that is a sleep: the run loop reads the counters again after it.
    fn wait_for_change(&self, timeout: Duration) {
        std::thread::sleep(timeout);
    }
    /// Read the counters at most this often while a run is watched (the changes in between
    /// are taken as one). The kernel's sysfs files tell nobody when they change, so they are
    /// polled this often: a reader that never sleeps takes a core from ksmd (the kernel's
    /// column of `compare` took six times its time when one did).
    fn read_every(&self) -> Duration {
        Duration::from_millis(2)
    }
}

/// How often samepage's counters are read at most while a run is watched. Its events come
/// once per scan chunk (every few milliseconds at full speed), and a reading walks the page
/// tables of every region (`ksm_zero_pages` comes from PAGEMAP_SCAN): reading at every event
/// took a core from the scanner's read-ahead, which runs at idle priority, and doubled the
/// time to converge on 1 GiB of zero pages. On 1 GiB a reading takes about 3 ms, so
/// [`READ_DUTY`] spaces them further. When the counters last changed comes from the engine
/// itself ([`Engine::last_change`]), so nothing is less precise for it.
pub const SAMEPAGE_READ_EVERY: Duration = Duration::from_millis(10);

/// The shortest wait between two readings of an engine's counters.
const MIN_WAIT: Duration = Duration::from_micros(500);

/// The longest wait [`READ_DUTY`] makes: the end of a run is seen this late at most (the
/// engine scans on meanwhile).
const MAX_WAIT: Duration = Duration::from_millis(100);

/// A reading of the counters is followed by a wait at least this many times the CPU it
/// took (up to [`MAX_WAIT`]), so that watching takes about 2% of a core. (`samepage merge
/// --size 1G` of the mixed workload, 5 runs each: converged 1.54 s median reading every
/// 10 ms, 1.47 s with this rule on a reading's wall time, 1.41 s reading every 100 ms,
/// which would leave a run of 0.2 s with two samples.)
const READ_DUTY: u32 = 50;

/// samepage's live engine.
pub struct Samepage<'a>(pub &'a LiveKsm);

impl Engine for Samepage<'_> {
    fn name(&self) -> &'static str {
        "samepage"
    }
    fn counters(&self) -> KsmCounters {
        self.0.counters()
    }
    fn set_running(&self, on: bool) -> Result<(), CliError> {
        self.0
            .set_knob("run", if on { "1" } else { "0" })
            .map_err(CliError::from)
    }
    fn last_change(&self) -> Option<Instant> {
        // Recorded after every scan batch; counters are only readable between batches.
        self.0.last_change()
    }
    fn cpu_seconds(&self) -> f64 {
        self.0.cpu_seconds()
    }
    fn wait_for_change(&self, timeout: Duration) {
        // The scanner publishes its counters after every chunk: wait for the next one
        // (reading counters costs a PAGEMAP_SCAN of the regions, so do not spin on it).
        self.0.wait_chunk(timeout);
    }
    fn read_every(&self) -> Duration {
        SAMEPAGE_READ_EVERY
    }
}

/// The host kernel's ksmd (its knobs held by a [`host::KnobGuard`]).
pub struct Kernel {
    pub ksmd: Option<u32>,
}

impl Engine for Kernel {
    fn name(&self) -> &'static str {
        "kernel"
    }
    fn counters(&self) -> KsmCounters {
        host::counters().unwrap_or_default()
    }
    fn set_running(&self, on: bool) -> Result<(), CliError> {
        Ok(host::write_knob("run", if on { "1" } else { "0" })?)
    }
    fn cpu_seconds(&self) -> f64 {
        self.ksmd.map(host::ksmd_cpu_ns).unwrap_or(0) as f64 / 1e9
    }
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Full scans the run made.
    pub passes: u64,
    /// From `run=1` to the last change of the merge counters.
    pub converged_seconds: f64,
    /// CPU the engine used during the run.
    pub cpu_seconds: f64,
    /// From `run=1` to `run=0`.
    pub run_seconds: f64,
    /// Pages the engine scanned during the run.
    pub pages_scanned: u64,
    /// The counters over time.
    pub samples: Vec<Sample>,
}

/// Start the engine, wait as `until` says (or until `timeout`, or Ctrl-C), stop it.
pub fn run(
    e: &dyn Engine,
    until: Until,
    timeout: Duration,
    watch: &mut Watch<'_>,
) -> Result<Outcome, CliError> {
    let cpu0 = e.cpu_seconds();
    let c0 = e.counters();
    let t0 = Instant::now();
    e.set_running(true)?;
    let result = poll(e, until, timeout, watch, t0, c0.clone());
    let stopped = e.set_running(false);
    let run_seconds = t0.elapsed().as_secs_f64();
    let (passes, polled_change) = result?;
    stopped?;
    let cpu = e.cpu_seconds() - cpu0;
    let last = e.last_change().or(polled_change);
    let converged = last
        .map(|t| t.saturating_duration_since(t0).as_secs_f64())
        .unwrap_or(0.0);
    let c = e.counters();
    watch.observe(t0, &c, true);
    Ok(Outcome {
        passes,
        converged_seconds: converged,
        cpu_seconds: cpu,
        run_seconds,
        pages_scanned: c.pages_scanned.saturating_sub(c0.pages_scanned),
        samples: watch.take_samples(),
    })
}

/// Read the counters until the engine's [`Convergence`] rule says the run is done; returns
/// the full scans it ran and when the merge counters were last seen changing.
fn poll(
    e: &dyn Engine,
    until: Until,
    timeout: Duration,
    watch: &mut Watch<'_>,
    t0: Instant,
    c0: KsmCounters,
) -> Result<(u64, Option<Instant>), CliError> {
    let mut conv = Convergence::new(until, &c0);
    let mut last_change = None;
    loop {
        interrupted()?;
        // What a reading costs is the CPU it takes (a reading that waited for a lock or a
        // CPU cost the engine nothing).
        let t = samepage_linux::ipc::this_thread_cpu();
        let c = e.counters();
        let now = Instant::now();
        let cost = samepage_linux::ipc::this_thread_cpu().saturating_sub(t);
        let seen = conv.observe(&c);
        if seen.changed {
            last_change = Some(now);
        }
        watch.observe(t0, &c, false);
        if seen.done {
            return Ok((conv.passes(), last_change));
        }
        if t0.elapsed() > timeout {
            return Err(CliError::Failed(match until {
                Until::FullScans(n) => format!(
                    "{} did not complete {n} full scans within {} s (raise --timeout)",
                    e.name(),
                    timeout.as_secs()
                ),
                Until::Stable { .. } => format!(
                    "the counters of {} did not settle within {} s; raise --timeout, or \
                     --set pages_to_scan=N / sleep_millisecs=0 to scan faster",
                    e.name(),
                    timeout.as_secs()
                ),
            }));
        }
        // At least one wait between two readings, however short `read_every` is, and
        // readings that take long (samepage's ksm_zero_pages walks the page tables) spaced
        // so that they take at most 1/READ_DUTY of a core from the engine.
        let next = now
            + e.read_every()
                .max((cost * READ_DUTY).min(MAX_WAIT))
                .max(MIN_WAIT);
        loop {
            e.wait_for_change(next.saturating_duration_since(Instant::now()));
            if Instant::now() >= next {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// An engine whose scanner finishes a full scan every 10 ms, counting its readers.
    struct Ticking {
        t0: Instant,
        reads: AtomicU64,
    }

    impl Engine for Ticking {
        fn name(&self) -> &'static str {
            "ticking"
        }
        fn counters(&self) -> KsmCounters {
            self.reads.fetch_add(1, Ordering::Relaxed);
            KsmCounters {
                full_scans: (self.t0.elapsed().as_millis() / 10) as u64,
                ..KsmCounters::default()
            }
        }
        fn set_running(&self, _: bool) -> Result<(), CliError> {
            Ok(())
        }
        fn cpu_seconds(&self) -> f64 {
            0.0
        }
    }

    #[test]
    fn an_engine_that_cannot_say_when_it_changed_is_polled_not_spun_on() {
        let e = Ticking {
            t0: Instant::now(),
            reads: AtomicU64::new(0),
        };
        let mut watch = Watch::new("ticking", 0, false, None);
        let out = run(&e, Until::FullScans(5), Duration::from_secs(10), &mut watch).unwrap();
        assert_eq!(out.passes, 5);
        // 50 ms at one reading every 2 ms is about 25 readings; a loop that never waits
        // makes thousands, one that waits MIN_WAIT a hundred.
        let reads = e.reads.load(Ordering::Relaxed);
        let bound = (out.run_seconds / e.read_every().as_secs_f64()) as u64 + 4;
        assert!(
            reads <= bound,
            "{reads} readings in {:.3} s",
            out.run_seconds
        );
    }
}
