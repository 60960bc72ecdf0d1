//! Watching the counters while an engine runs: samples for the plot, a progress display on
//! the terminal, and a Prometheus text file rewritten as the counters move.

use crate::prom;
use indicatif::{ProgressBar, ProgressStyle};
use samepage_engine::{KsmCounters, KsmStat, PAGE_SIZE_U64};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The counters at one moment of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sample {
    /// Seconds since the engine started.
    pub t: f64,
    pub pages_shared: u64,
    pub pages_sharing: u64,
    pub pages_unshared: u64,
    pub ksm_zero_pages: i64,
    pub full_scans: u64,
}

impl Sample {
    /// Bytes saved: `(pages_sharing + ksm_zero_pages) * PAGE_SIZE`.
    pub fn saved_bytes(&self) -> i64 {
        (self.pages_sharing as i64 + self.ksm_zero_pages) * PAGE_SIZE_U64 as i64
    }
}

/// Where the watched counters go.
pub struct Watch<'a> {
    engine: &'static str,
    bar: Option<ProgressBar>,
    prometheus: Option<PathBuf>,
    /// Per-process figures to add to the Prometheus file.
    pub ksm_stat: Box<dyn Fn() -> Vec<KsmStat> + 'a>,
    samples: Vec<Sample>,
    last_sample: Option<Instant>,
    last_prom: Option<Instant>,
    total_pages: u64,
}

const SAMPLE_EVERY: Duration = Duration::from_millis(50);
const PROM_EVERY: Duration = Duration::from_secs(1);

impl<'a> Watch<'a> {
    /// Watch `engine`'s run over `total_pages` pages; `progress` draws a bar on stderr (when
    /// it is a terminal), `prometheus` names the file to keep up to date.
    pub fn new(
        engine: &'static str,
        total_pages: u64,
        progress: bool,
        prometheus: Option<PathBuf>,
    ) -> Self {
        let bar = progress.then(|| {
            let b = ProgressBar::new(total_pages.max(1));
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix:>9} {spinner} [{elapsed_precise}] scan {bar:30} {msg}",
                )
                .expect("valid template"),
            );
            b.set_prefix(engine);
            b.enable_steady_tick(Duration::from_millis(100));
            b
        });
        Self {
            engine,
            bar,
            prometheus,
            ksm_stat: Box::new(Vec::new),
            samples: Vec::new(),
            last_sample: None,
            last_prom: None,
            total_pages,
        }
    }

    /// Record the counters read at this moment (`force`: whatever the time since the last).
    pub fn observe(&mut self, t0: Instant, c: &KsmCounters, force: bool) {
        let now = Instant::now();
        if force || self.last_sample.is_none_or(|t| now - t >= SAMPLE_EVERY) {
            self.last_sample = Some(now);
            self.samples.push(Sample {
                t: (now - t0).as_secs_f64(),
                pages_shared: c.pages_shared,
                pages_sharing: c.pages_sharing,
                pages_unshared: c.pages_unshared,
                ksm_zero_pages: c.ksm_zero_pages,
                full_scans: c.full_scans,
            });
            if let Some(b) = &self.bar {
                // The position within the current full scan.
                let into_pass = c.pages_scanned + c.pages_skipped;
                b.set_position(if self.total_pages > 0 {
                    into_pass % self.total_pages
                } else {
                    0
                });
                b.set_message(format!(
                    "full_scans {} · saved {:.1} MiB (sharing {} + zero {}) · unshared {}",
                    c.full_scans,
                    c.saved_pages() as f64 * PAGE_SIZE_U64 as f64 / (1 << 20) as f64,
                    c.pages_sharing,
                    c.ksm_zero_pages,
                    c.pages_unshared
                ));
            }
        }
        if let Some(path) = &self.prometheus {
            if force || self.last_prom.is_none_or(|t| now - t >= PROM_EVERY) {
                self.last_prom = Some(now);
                let stats = (self.ksm_stat)();
                // A failed write here is retried next second; the final write at the end of
                // the run reports an error.
                let _ = prom::write_file(path, &[(self.engine, c, &stats)]);
            }
        }
    }

    /// The samples so far (the watch starts over), and the progress bar cleared.
    pub fn take_samples(&mut self) -> Vec<Sample> {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        std::mem::take(&mut self.samples)
    }
}
