//! The tunables of `/sys/kernel/mm/ksm`, with the kernel's defaults, parsing and errors.

use serde::Serialize;
use thiserror::Error;

/// `run`: what ksmd does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Run {
    /// 0: stop scanning, keep merged pages.
    Stop,
    /// 1: scan and merge.
    Merge,
    /// 2: stop and unmerge everything (resets `full_scans`).
    Unmerge,
}

impl Run {
    /// The value `run` reads as.
    pub fn as_u32(self) -> u32 {
        match self {
            Run::Stop => 0,
            Run::Merge => 1,
            Run::Unmerge => 2,
        }
    }
}

/// `advisor_mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum AdvisorMode {
    /// No advisor: `pages_to_scan` is what the user set.
    None,
    /// The scan-time advisor tunes `pages_to_scan` to reach `advisor_target_scan_time`.
    ScanTime,
}

/// Every tunable, with the kernel's defaults (`mm/ksm.c`). Read them with
/// [`Ksm::tunables`](crate::Ksm::tunables); change them with
/// [`Ksm::write_knob`](crate::Ksm::write_knob), which validates as the kernel does.
///
/// ```
/// use samepage_engine::{Run, Tunables};
/// let t = Tunables::default();
/// assert_eq!((t.run, t.pages_to_scan, t.max_page_sharing), (Run::Stop, 100, 256));
/// assert_eq!(t.show("advisor_mode").as_deref(), Some("[none] scan-time"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Tunables {
    /// `run` (default 0): stop, merge, or unmerge everything.
    pub run: Run,
    /// `pages_to_scan` (100): pages ksmd scans per wake-up.
    pub pages_to_scan: u32,
    /// `sleep_millisecs` (20): how long ksmd sleeps between wake-ups.
    pub sleep_millisecs: u32,
    /// `merge_across_nodes` (1): merge pages of different NUMA nodes; with 0, one stable and
    /// one unstable tree per node. Changes only while no KSM page exists (else EBUSY).
    pub merge_across_nodes: bool,
    /// `use_zero_pages` (0): merge zero-filled pages with the shared zero page instead of
    /// into a KSM page, and count them in `ksm_zero_pages`.
    pub use_zero_pages: bool,
    /// `max_page_sharing` (256): mappings one KSM page may have; more identical pages make
    /// more KSM pages, chained. At least 2; changes only while no KSM page exists.
    pub max_page_sharing: i32,
    /// `stable_node_chains_prune_millisecs` (2000): how often a chain's stale KSM pages are
    /// pruned.
    pub stable_node_chains_prune_millisecs: u32,
    /// `smart_scan` (1): visit pages that keep failing to merge less and less often.
    pub smart_scan: bool,
    /// `advisor_mode` (none): with `scan-time`, the advisor sets `pages_to_scan`.
    pub advisor_mode: AdvisorMode,
    /// `advisor_max_cpu` (70): CPU percentage the advisor lets ksmd use at most.
    pub advisor_max_cpu: u64,
    /// `advisor_min_pages_to_scan` (500): the advisor's lower bound for `pages_to_scan`.
    pub advisor_min_pages_to_scan: u64,
    /// `advisor_max_pages_to_scan` (30000): its upper bound.
    pub advisor_max_pages_to_scan: u64,
    /// `advisor_target_scan_time` (200): seconds a full scan should take.
    pub advisor_target_scan_time: u64,
    /// samepage's own knob, not the kernel's: with `use_zero_pages`, merge a zero-filled page
    /// with the zero page on its first visit instead of waiting a full scan for its checksum
    /// to hold still (the zero-only fast path). Off by default: the kernel's behaviour.
    pub zero_pages_first_visit: bool,
}

impl Default for Tunables {
    fn default() -> Self {
        Self {
            run: Run::Stop,
            pages_to_scan: 100,
            sleep_millisecs: 20,
            merge_across_nodes: true,
            use_zero_pages: false,
            max_page_sharing: 256,
            stable_node_chains_prune_millisecs: 2000,
            smart_scan: true,
            advisor_mode: AdvisorMode::None,
            advisor_max_cpu: 70,
            advisor_min_pages_to_scan: 500,
            advisor_max_pages_to_scan: 30000,
            advisor_target_scan_time: 200,
            zero_pages_first_visit: false,
        }
    }
}

/// Names of the writable files, in the order `ls /sys/kernel/mm/ksm` lists them.
pub const TUNABLE_NAMES: &[&str] = &[
    "advisor_max_cpu",
    "advisor_max_pages_to_scan",
    "advisor_min_pages_to_scan",
    "advisor_mode",
    "advisor_target_scan_time",
    "max_page_sharing",
    "merge_across_nodes",
    "pages_to_scan",
    "run",
    "sleep_millisecs",
    "smart_scan",
    "stable_node_chains_prune_millisecs",
    "use_zero_pages",
    SAMEPAGE_ONLY_TUNABLES[0],
];

/// Knobs samepage has and the kernel does not (listed after the kernel's in
/// [`TUNABLE_NAMES`]); comparisons with the host's KSM leave them out on its side.
pub const SAMEPAGE_ONLY_TUNABLES: &[&str] = &["zero_pages_first_visit"];

/// Why a write to a knob was refused. The errno names are the kernel's.
#[derive(Debug, Error)]
pub enum KnobError {
    /// No such file in `/sys/kernel/mm/ksm`.
    #[error("unknown KSM knob '{0}'; known knobs: {known}", known = TUNABLE_NAMES.join(", "))]
    Unknown(String),
    /// The file exists but is a counter.
    #[error("'{0}' is a read-only counter, not a knob")]
    ReadOnly(String),
    /// EINVAL: the value does not parse or is out of range.
    #[error("invalid value '{value}' for {name} (EINVAL): {why}")]
    Invalid {
        /// The knob.
        name: String,
        /// The value written.
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// EBUSY: `max_page_sharing` or `merge_across_nodes` cannot change while KSM pages exist.
    #[error(
        "cannot change {0} while KSM pages exist (EBUSY); write 2 to run first to unmerge them"
    )]
    Busy(String),
    /// Unmerging (`run=2`) failed; `run` is left at 0 as the kernel's `run_store` leaves it,
    /// with the scan cursor back at the head of the list. The source says why.
    #[error("writing 2 to run failed, run is 0 now")]
    Unmerge(#[from] crate::memory::UnmergeError),
}

/// A parsed value for one knob, before the engine applies the side effects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KnobValue {
    Run(Run),
    PagesToScan(u32),
    SleepMillisecs(u32),
    MergeAcrossNodes(bool),
    UseZeroPages(bool),
    MaxPageSharing(i32),
    PruneMillisecs(u32),
    SmartScan(bool),
    AdvisorMode(AdvisorMode),
    AdvisorMaxCpu(u64),
    AdvisorMinPages(u64),
    AdvisorMaxPages(u64),
    AdvisorTargetScanTime(u64),
    ZeroPagesFirstVisit(bool),
}

fn invalid(name: &str, value: &str, why: &'static str) -> KnobError {
    KnobError::Invalid {
        name: name.to_string(),
        value: value.to_string(),
        why,
    }
}

/// `kstrtoul(buf, 10, ..)`: optional '+', decimal digits, one optional trailing newline.
fn parse_unsigned(name: &str, value: &str, max: u64) -> Result<u64, KnobError> {
    let s = value.strip_suffix('\n').unwrap_or(value);
    let digits = s.strip_prefix('+').unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(name, value, "expected a decimal number"));
    }
    match digits.parse::<u64>() {
        Ok(v) if v <= max => Ok(v),
        _ => Err(invalid(name, value, "number out of range")),
    }
}

/// `kstrtoint(buf, 10, ..)`.
fn parse_int(name: &str, value: &str) -> Result<i32, KnobError> {
    let s = value.strip_suffix('\n').unwrap_or(value);
    let (neg, digits) = match s.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(name, value, "expected a decimal number"));
    }
    let v: i64 = digits
        .parse::<i64>()
        .map_err(|_| invalid(name, value, "number out of range"))?;
    let v = if neg { -v } else { v };
    i32::try_from(v).map_err(|_| invalid(name, value, "number out of range"))
}

/// `kstrtobool`: the first character decides (1/y/Y/t/T true, 0/n/N/f/F false), "on"/"off".
fn parse_bool(name: &str, value: &str) -> Result<bool, KnobError> {
    let s = value.strip_suffix('\n').unwrap_or(value).as_bytes();
    match s {
        [b'1' | b'y' | b'Y' | b't' | b'T', ..] => Ok(true),
        [b'0' | b'n' | b'N' | b'f' | b'F', ..] => Ok(false),
        [b'o' | b'O', b'n' | b'N', ..] => Ok(true),
        [b'o' | b'O', b'f' | b'F', ..] => Ok(false),
        _ => Err(invalid(
            name,
            value,
            "expected a boolean (0/1, y/n, on/off)",
        )),
    }
}

/// Parse and validate a value as the kernel's `*_store` would (before side effects).
pub(crate) fn parse_knob(name: &str, value: &str) -> Result<KnobValue, KnobError> {
    const UINT: u64 = u32::MAX as u64;
    Ok(match name {
        "run" => match parse_unsigned(name, value, UINT)? {
            0 => KnobValue::Run(Run::Stop),
            1 => KnobValue::Run(Run::Merge),
            2 => KnobValue::Run(Run::Unmerge),
            _ => return Err(invalid(name, value, "run takes 0, 1 or 2")),
        },
        "pages_to_scan" => KnobValue::PagesToScan(parse_unsigned(name, value, UINT)? as u32),
        "sleep_millisecs" => KnobValue::SleepMillisecs(parse_unsigned(name, value, UINT)? as u32),
        "merge_across_nodes" => match parse_unsigned(name, value, u64::MAX)? {
            0 => KnobValue::MergeAcrossNodes(false),
            1 => KnobValue::MergeAcrossNodes(true),
            _ => return Err(invalid(name, value, "merge_across_nodes takes 0 or 1")),
        },
        "use_zero_pages" => KnobValue::UseZeroPages(parse_bool(name, value)?),
        "zero_pages_first_visit" => KnobValue::ZeroPagesFirstVisit(parse_bool(name, value)?),
        "max_page_sharing" => {
            let v = parse_int(name, value)?;
            if v < 2 {
                return Err(invalid(name, value, "max_page_sharing must be at least 2"));
            }
            KnobValue::MaxPageSharing(v)
        }
        "stable_node_chains_prune_millisecs" => {
            KnobValue::PruneMillisecs(parse_unsigned(name, value, UINT)? as u32)
        }
        "smart_scan" => KnobValue::SmartScan(parse_bool(name, value)?),
        "advisor_mode" => match value.strip_suffix('\n').unwrap_or(value) {
            "none" => KnobValue::AdvisorMode(AdvisorMode::None),
            "scan-time" => KnobValue::AdvisorMode(AdvisorMode::ScanTime),
            _ => {
                return Err(invalid(
                    name,
                    value,
                    "advisor_mode takes 'none' or 'scan-time'",
                ))
            }
        },
        "advisor_max_cpu" => KnobValue::AdvisorMaxCpu(parse_unsigned(name, value, u64::MAX)?),
        "advisor_min_pages_to_scan" => {
            KnobValue::AdvisorMinPages(parse_unsigned(name, value, u64::MAX)?)
        }
        "advisor_max_pages_to_scan" => {
            KnobValue::AdvisorMaxPages(parse_unsigned(name, value, u64::MAX)?)
        }
        "advisor_target_scan_time" => {
            let v = parse_unsigned(name, value, u64::MAX)?;
            if v < 1 {
                return Err(invalid(
                    name,
                    value,
                    "advisor_target_scan_time must be at least 1",
                ));
            }
            KnobValue::AdvisorTargetScanTime(v)
        }
        n if crate::counters::COUNTER_NAMES.contains(&n) => {
            return Err(KnobError::ReadOnly(n.to_string()))
        }
        n => return Err(KnobError::Unknown(n.to_string())),
    })
}

impl Tunables {
    /// The text a read of `/sys/kernel/mm/ksm/<name>` returns, without the newline.
    pub fn show(&self, name: &str) -> Option<String> {
        Some(match name {
            "run" => self.run.as_u32().to_string(),
            "pages_to_scan" => self.pages_to_scan.to_string(),
            "sleep_millisecs" => self.sleep_millisecs.to_string(),
            "merge_across_nodes" => u32::from(self.merge_across_nodes).to_string(),
            "use_zero_pages" => u32::from(self.use_zero_pages).to_string(),
            "zero_pages_first_visit" => u32::from(self.zero_pages_first_visit).to_string(),
            "max_page_sharing" => self.max_page_sharing.to_string(),
            "stable_node_chains_prune_millisecs" => {
                self.stable_node_chains_prune_millisecs.to_string()
            }
            "smart_scan" => u32::from(self.smart_scan).to_string(),
            "advisor_mode" => match self.advisor_mode {
                AdvisorMode::None => "[none] scan-time".to_string(),
                AdvisorMode::ScanTime => "none [scan-time]".to_string(),
            },
            "advisor_max_cpu" => self.advisor_max_cpu.to_string(),
            "advisor_min_pages_to_scan" => self.advisor_min_pages_to_scan.to_string(),
            "advisor_max_pages_to_scan" => self.advisor_max_pages_to_scan.to_string(),
            "advisor_target_scan_time" => self.advisor_target_scan_time.to_string(),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing_follows_kstrto() {
        assert!(matches!(
            parse_knob("run", "1\n"),
            Ok(KnobValue::Run(Run::Merge))
        ));
        assert!(matches!(
            parse_knob("run", "3"),
            Err(KnobError::Invalid { .. })
        ));
        assert!(matches!(
            parse_knob("run", "-1"),
            Err(KnobError::Invalid { .. })
        ));
        assert!(matches!(
            parse_knob("pages_to_scan", "4294967296"),
            Err(KnobError::Invalid { .. })
        ));
        assert!(matches!(
            parse_knob("pages_to_scan", "+7"),
            Ok(KnobValue::PagesToScan(7))
        ));
        assert!(matches!(
            parse_knob("max_page_sharing", "1"),
            Err(KnobError::Invalid { .. })
        ));
        assert!(matches!(
            parse_knob("max_page_sharing", "2"),
            Ok(KnobValue::MaxPageSharing(2))
        ));
        assert!(matches!(
            parse_knob("use_zero_pages", "on"),
            Ok(KnobValue::UseZeroPages(true))
        ));
        assert!(matches!(
            parse_knob("smart_scan", "N"),
            Ok(KnobValue::SmartScan(false))
        ));
        assert!(matches!(
            parse_knob("use_zero_pages", "2"),
            Err(KnobError::Invalid { .. })
        ));
        assert!(matches!(
            parse_knob("merge_across_nodes", "2"),
            Err(KnobError::Invalid { .. })
        ));
        assert!(matches!(
            parse_knob("advisor_target_scan_time", "0"),
            Err(KnobError::Invalid { .. })
        ));
        assert!(matches!(
            parse_knob("advisor_mode", "scan-time\n"),
            Ok(KnobValue::AdvisorMode(AdvisorMode::ScanTime))
        ));
        assert!(matches!(
            parse_knob("pages_shared", "1"),
            Err(KnobError::ReadOnly(_))
        ));
        assert!(matches!(
            parse_knob("bogus", "1"),
            Err(KnobError::Unknown(_))
        ));
    }

    #[test]
    fn defaults_are_the_kernels() {
        let t = Tunables::default();
        assert_eq!(t.show("pages_to_scan").unwrap(), "100");
        assert_eq!(t.show("sleep_millisecs").unwrap(), "20");
        assert_eq!(t.show("max_page_sharing").unwrap(), "256");
        assert_eq!(t.show("smart_scan").unwrap(), "1");
        assert_eq!(t.show("use_zero_pages").unwrap(), "0");
        assert_eq!(t.show("advisor_mode").unwrap(), "[none] scan-time");
        for n in TUNABLE_NAMES {
            assert!(t.show(n).is_some(), "{n}");
        }
    }
}
