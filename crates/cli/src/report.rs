//! The report printed by `simulate` (and the live commands): the kernel's sysfs and procfs
//! layouts as text, or one JSON object.

use samepage_engine::{KsmCounters, KsmStat, TUNABLE_NAMES};
use serde::Serialize;
use serde_json::{Map, Value};

/// Everything a run reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// "sim" or "live".
    pub engine: &'static str,
    pub workload: Vec<SpaceInfo>,
    /// Every file of /sys/kernel/mm/ksm: counters, then tunables.
    #[serde(serialize_with = "ser_ksm")]
    pub ksm: (KsmCounters, Vec<(String, String)>),
    pub ksm_stat: Vec<KsmStat>,
    /// Memory saved: `(pages_sharing + ksm_zero_pages) * 4096`.
    pub saved_bytes: i64,
    /// Full scans this run made.
    pub full_scans_run: u64,
    /// Time from engine start to the last change of the merge counters, in seconds
    /// (virtual seconds for the simulator).
    pub converged_seconds: f64,
    /// Wall time the engine ran (live only), and the pages it scanned meanwhile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pages_scanned_run: Option<u64>,
    /// CPU time of the engine's threads (live only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<f64>,
    /// Anonymous memory of this process before the engine started and after it converged
    /// (`Anonymous:` of /proc/self/smaps_rollup; live only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_anon_kib_before: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_anon_kib_after: Option<u64>,
    /// Proportional set size of this process (`Pss:`), before and after (live only): a page
    /// mapped N times counts 1/N each time, so merged pages show as saved whatever backs them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pss_kib_before: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pss_kib_after: Option<u64>,
    /// Copy-on-write and pin statistics (live only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live: Option<samepage_linux::LiveStats>,
    /// The page tables checked against the counters (live only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verification: Option<samepage_linux::verify::Verification>,
    /// samepage's own bookkeeping at the end of the run (not for the kernel's engine).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<MetadataBytes>,
    /// The kernel memory samepage's own mappings cost (live only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub footprint: Option<samepage_linux::footprint::Footprint>,
    /// What merging saved, net of what it cost: for samepage, `saved_bytes` less its
    /// metadata (engine and page states) and the kernel memory of its own mappings; for the
    /// kernel's engine, `general_profit` (saved less its rmap items).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub net_saved_bytes: Option<i64>,
}

/// Bytes samepage spends on bookkeeping.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MetadataBytes {
    /// The engine's: rmap items, the unstable tree's index, stable nodes and their index,
    /// the scan list and per-process records.
    pub engine_bytes: u64,
    /// rmap items (`ksm_rmap_items` of every process).
    pub rmap_items: u64,
    /// `engine_bytes / rmap_items`, to set against the kernel's 64-byte `ksm_rmap_item` (the
    /// kernel's figure leaves its stable nodes out; this one counts everything).
    pub engine_bytes_per_rmap_item: f64,
    /// The live backend's state of every page of its regions (live only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_state_bytes: Option<u64>,
}

impl MetadataBytes {
    pub fn new(engine_bytes: u64, rmap_items: u64, page_state_bytes: Option<u64>) -> Self {
        Self {
            engine_bytes,
            rmap_items,
            engine_bytes_per_rmap_item: if rmap_items > 0 {
                engine_bytes as f64 / rmap_items as f64
            } else {
                0.0
            },
            page_state_bytes,
        }
    }
}

/// samepage's own mappings, for [`Report::set_costs`].
#[derive(Debug, Clone, Copy)]
pub enum Mappings {
    /// It makes none (the simulator).
    None,
    /// As counted in the processes' `smaps`.
    Known(samepage_linux::footprint::Footprint),
    /// A process's `smaps` could not be read.
    Unknown,
}

/// One address space of the workload.
#[derive(Debug, Clone, Serialize)]
pub struct SpaceInfo {
    pub pid: u32,
    pub name: String,
    pub pages: u64,
}

/// The `"ksm"` object: every counter and tunable by its sysfs name.
pub(crate) fn ser_ksm<S: serde::Serializer>(
    v: &(KsmCounters, Vec<(String, String)>),
    s: S,
) -> Result<S::Ok, S::Error> {
    let mut m = match serde_json::to_value(&v.0).map_err(serde::ser::Error::custom)? {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    for (k, val) in &v.1 {
        let j = match val.parse::<i64>() {
            Ok(n) => Value::from(n),
            Err(_) => Value::from(val.clone()),
        };
        m.insert(k.clone(), j);
    }
    Value::Object(m).serialize(s)
}

impl Report {
    /// The report of a run of a live engine (samepage's or the kernel's).
    #[allow(clippy::too_many_arguments)]
    pub fn live(
        engine: &'static str,
        workload: Vec<SpaceInfo>,
        ksm: (KsmCounters, Vec<(String, String)>),
        ksm_stat: Vec<KsmStat>,
        outcome: &crate::engines::Outcome,
        before: crate::merge::MemoryKib,
        after: crate::merge::MemoryKib,
        live: Option<samepage_linux::LiveStats>,
        verification: Option<samepage_linux::verify::Verification>,
    ) -> Self {
        Self {
            engine,
            workload,
            saved_bytes: ksm.0.saved_pages() * samepage_engine::PAGE_SIZE_U64 as i64,
            ksm,
            ksm_stat,
            full_scans_run: outcome.passes,
            converged_seconds: outcome.converged_seconds,
            cpu_seconds: Some(outcome.cpu_seconds),
            run_seconds: Some(outcome.run_seconds),
            pages_scanned_run: Some(outcome.pages_scanned),
            rss_anon_kib_before: Some(before.anon),
            rss_anon_kib_after: Some(after.anon),
            pss_kib_before: Some(before.pss),
            pss_kib_after: Some(after.pss),
            live,
            verification,
            metadata: None,
            footprint: None,
            net_saved_bytes: None,
        }
    }

    /// Record samepage's bookkeeping and mappings, and the net saving they leave (not when
    /// the mappings could not be counted).
    pub fn set_costs(&mut self, metadata: MetadataBytes, mappings: Mappings) {
        let footprint = match mappings {
            Mappings::None => Some(0),
            Mappings::Known(f) => {
                self.footprint = Some(f);
                Some(f.kernel_bytes())
            }
            Mappings::Unknown => None,
        };
        self.net_saved_bytes = footprint.map(|f| {
            self.saved_bytes
                - (metadata.engine_bytes + metadata.page_state_bytes.unwrap_or(0) + f) as i64
        });
        self.metadata = Some(metadata);
    }
}

/// Tunables as (name, shown value), in `ls` order.
pub fn tunables_of(show: impl Fn(&str) -> Option<String>) -> Vec<(String, String)> {
    TUNABLE_NAMES
        .iter()
        .map(|n| (n.to_string(), show(n).unwrap_or_default()))
        .collect()
}

fn mib(pages: i64) -> f64 {
    pages as f64 * 4096.0 / (1 << 20) as f64
}

impl Report {
    /// Print as one JSON object, or as text.
    pub fn print(&self, json: bool) -> Result<(), crate::error::CliError> {
        if json {
            println!("{}", serde_json::to_string_pretty(self)?);
        } else {
            print!("{}", self.text());
        }
        Ok(())
    }

    /// The human-readable form.
    pub fn text(&self) -> String {
        let pages: u64 = self.workload.iter().map(|w| w.pages).sum();
        let c = &self.ksm.0;
        let mut out = format!(
            "samepage ({} engine): {} address space(s), {} pages ({:.1} MiB); {} full scans, converged after {:.3} s{}\n\n",
            self.engine,
            self.workload.len(),
            pages,
            mib(pages as i64),
            self.full_scans_run,
            self.converged_seconds,
            if self.engine == "sim" { " (virtual time)" } else { "" },
        );
        out += "/sys/kernel/mm/ksm\n";
        out += &c.to_string();
        for (k, v) in &self.ksm.1 {
            out += &format!("{k} {v}\n");
        }
        for (st, w) in self.ksm_stat.iter().zip(&self.workload) {
            out += &format!("\n/proc/{}/ksm_stat  ({})\n{}", st.pid, w.name, st);
        }
        out += &format!(
            "\nsaved: {} pages ({:.1} MiB) = pages_sharing {} + ksm_zero_pages {}\n",
            c.saved_pages(),
            mib(c.saved_pages()),
            c.pages_sharing,
            c.ksm_zero_pages
        );
        if let (Some(b), Some(a)) = (self.rss_anon_kib_before, self.rss_anon_kib_after) {
            out += &format!(
                "anonymous memory: {:.1} MiB before, {:.1} MiB after\n",
                b as f64 / 1024.0,
                a as f64 / 1024.0
            );
        }
        if let (Some(b), Some(a)) = (self.pss_kib_before, self.pss_kib_after) {
            out += &format!(
                "proportional set size (PSS): {:.1} MiB before, {:.1} MiB after\n",
                b as f64 / 1024.0,
                a as f64 / 1024.0
            );
        }
        if let Some(cpu) = self.cpu_seconds {
            out += &format!("engine CPU: {cpu:.3} s\n");
        }
        if let Some(l) = &self.live {
            out += &format!(
                "faults on merged pages: {} writes, {} reads (each got a private copy), {} more copied ahead of such faults; zero pages placed: {}; pinned pages skipped: {}\n",
                l.agent.cow_merged, l.agent.read_merged, l.agent.copied_ahead, l.ksmd.zero_placed, l.agent.pinned_skipped
            );
        }
        if let Some(m) = &self.metadata {
            out += &format!(
                "samepage metadata: {:.1} KiB in the engine for {} rmap items ({:.1} bytes each; the kernel's are 64){}\n",
                m.engine_bytes as f64 / 1024.0,
                m.rmap_items,
                m.engine_bytes_per_rmap_item,
                match m.page_state_bytes {
                    Some(b) => format!(", {:.1} KiB of page states", b as f64 / 1024.0),
                    None => String::new(),
                }
            );
        }
        if let Some(f) = &self.footprint {
            out += &format!(
                "samepage's own mappings: {} (store views, scratch area, thread stacks) and {} split{} of the application's by registration: about {:.1} KiB of kernel memory with their page tables (general_profit leaves it out)\n",
                f.mappings,
                f.splits,
                if f.splits == 1 { "" } else { "s" },
                f.kernel_bytes() as f64 / 1024.0
            );
        }
        if self.metadata.is_some() && self.net_saved_bytes.is_none() {
            out += "net saved: unknown (samepage's own mappings could not be counted: a process's /proc/PID/smaps could not be read)\n";
        }
        if let Some(n) = self.net_saved_bytes {
            out += &format!(
                "net saved: {:.1} MiB ({})\n",
                n as f64 / (1 << 20) as f64,
                if self.engine == "kernel" {
                    "general_profit: saved less the kernel's rmap items"
                } else {
                    "saved less samepage's metadata and mappings"
                }
            );
        }
        if let Some(v) = &self.verification {
            out += &format!(
                "verified: ksm_zero_pages equals the {} marked zero-page entries, each placed by samepage; {} merged pages on {} canonical pages, none with memory of its own; every page holds what it should\n",
                v.marked_zero_pages.values().sum::<i64>(),
                v.merged_pages,
                v.canonical_pages
            );
        }
        out
    }
}
