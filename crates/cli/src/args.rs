//! Arguments shared by the commands that run a workload.

use crate::error::CliError;
use clap::Args;
use samepage_workload::{parse_size, GenSpec, Workload};

/// What to load and how to run KSM on it.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// A raw memory image (a file of 4096-byte pages); repeat for several address spaces.
    /// Without --image, a workload is generated.
    #[arg(long = "image", value_name = "FILE")]
    pub images: Vec<std::path::PathBuf>,

    /// Size of the generated workload (e.g. 64M, 1G).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub size: u64,

    /// Percentage of zero-filled pages in the generated workload.
    #[arg(long = "zero", value_name = "PCT", default_value_t = 30)]
    pub zero_pct: u32,

    /// Percentage of pages in duplicate groups in the generated workload.
    #[arg(long = "dup", value_name = "PCT", default_value_t = 40)]
    pub dup_pct: u32,

    /// Identical pages per duplicate group.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub group: u32,

    /// Seed of the generated workload's layout and contents.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Set a KSM tunable by its kernel name before scanning (repeatable), e.g.
    /// --set use_zero_pages=1 --set pages_to_scan=1000.
    #[arg(long = "set", value_name = "KNOB=VALUE")]
    pub set: Vec<String>,

    /// Stop after exactly N full scans (at least 1) instead of running until the counters are
    /// stable.
    #[arg(long = "full-scans", value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub full_scans: Option<u64>,

    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

impl RunArgs {
    /// The generated workload's parameters.
    pub fn gen_spec(&self) -> GenSpec {
        GenSpec {
            size: self.size,
            zero_pct: self.zero_pct,
            dup_pct: self.dup_pct,
            group: self.group,
            seed: self.seed,
        }
    }

    /// The workload: the images, or the generated mix. Refused before anything is allocated
    /// if it cannot fit in the machine's available memory; reading images stops at Ctrl-C.
    pub fn workload(&self) -> Result<Workload, CliError> {
        if self.images.is_empty() {
            let spec = self.gen_spec();
            let c = spec.counts()?;
            if spec.dup_pct > 0 && c.groups == 0 {
                return Err(CliError::Usage(format!(
                    "--group {} is more than the {} pages --dup {} gives, so no duplicate group \
                     would be made; use a smaller --group, a larger --dup or a larger --size",
                    spec.group,
                    c.pages * spec.dup_pct as u64 / 100,
                    spec.dup_pct
                )));
            }
            Ok(Workload::generated(&spec)?)
        } else {
            Ok(Workload::from_images_until(
                &self.images,
                &crate::engines::interrupted_now,
            )?)
        }
    }

    /// When a live run stops: after `--full-scans N`, or when the counters are stable.
    pub fn until(&self) -> crate::engines::Until {
        match self.full_scans {
            Some(n) => crate::engines::Until::FullScans(n),
            None => crate::engines::Until::Stable { min_passes: 2 },
        }
    }

    /// `--set` pairs, split and checked for shape and for combinations that do nothing (on
    /// the engine's defaults).
    pub fn knobs(&self) -> Result<Vec<(String, String)>, CliError> {
        let k = parse_knobs(&self.set)?;
        check_knobs(&k)?;
        Ok(k)
    }
}

/// `kstrtobool`'s reading of a value, for the checks here (the engine validates it fully).
fn truthy(v: &str) -> bool {
    let v = v.trim().to_ascii_lowercase();
    v.starts_with(['1', 'y', 't']) || v == "on"
}

/// The value a list of knob writes leaves (a later write wins).
fn last<'a>(knobs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    knobs
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

const FIRST_VISIT_NEEDS_ZERO_PAGES: &str =
    "zero_pages_first_visit=1 does nothing without use_zero_pages=1 (zero-filled pages go to \
     the zero page only with use_zero_pages); add --set use_zero_pages=1";

/// Refuse knob settings that would be accepted and then do nothing: `knobs` is everything a
/// command writes, in order, over the engine's defaults (`use_zero_pages=0`).
pub fn check_knobs(knobs: &[(String, String)]) -> Result<(), CliError> {
    if last(knobs, "zero_pages_first_visit").is_some_and(truthy)
        && !last(knobs, "use_zero_pages").is_some_and(truthy)
    {
        return Err(CliError::usage(FIRST_VISIT_NEEDS_ZERO_PAGES));
    }
    Ok(())
}

/// `--set KNOB=VALUE` pairs, split and checked for shape. `run` is the command's own business.
pub fn parse_knobs(set: &[String]) -> Result<Vec<(String, String)>, CliError> {
    set.iter()
        .map(|kv| {
            let (k, v) = kv.split_once('=').ok_or_else(|| {
                CliError::Usage(format!(
                    "--set '{kv}' is not KNOB=VALUE (for example --set use_zero_pages=1)"
                ))
            })?;
            if k == "run" {
                return Err(CliError::usage(
                    "--set run=... is not allowed: the command starts and stops KSM itself",
                ));
            }
            Ok((k.to_string(), v.to_string()))
        })
        .collect::<Result<Vec<_>, CliError>>()
        .and_then(|k| check_set(&k).map(|()| k))
}

/// `KNOB=VALUE` pairs for the daemon (`--set`, `samepage ctl`), where `run` is a knob like
/// any other.
pub fn parse_knobs_allowing_run(set: &[String]) -> Result<Vec<(String, String)>, CliError> {
    set.iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| {
                    CliError::Usage(format!("'{kv}' is not KNOB=VALUE (for example run=1)"))
                })
        })
        .collect::<Result<Vec<_>, CliError>>()
        .and_then(|k| check_set(&k).map(|()| k))
}

/// Combinations within the `--set` pairs themselves that cannot work, whatever the defaults.
fn check_set(set: &[(String, String)]) -> Result<(), CliError> {
    if last(set, "zero_pages_first_visit").is_some_and(truthy)
        && last(set, "use_zero_pages").is_some_and(|v| !truthy(v))
    {
        return Err(CliError::usage(FIRST_VISIT_NEEDS_ZERO_PAGES));
    }
    if last(set, "advisor_mode").map(str::trim) == Some("scan-time")
        && set.iter().any(|(k, _)| k == "pages_to_scan")
    {
        return Err(CliError::usage(
            "--set pages_to_scan cannot go with --set advisor_mode=scan-time: the advisor sets \
             pages_to_scan (starting from advisor_min_pages_to_scan); set one of the two",
        ));
    }
    Ok(())
}
