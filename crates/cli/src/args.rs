//! Arguments shared by the commands that run a workload.

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

    /// Stop after exactly N full scans instead of running until the counters are stable.
    #[arg(long = "full-scans", value_name = "N")]
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

    /// The workload: the images, or the generated mix.
    pub fn workload(&self) -> Result<Workload, String> {
        if self.images.is_empty() {
            Workload::generated(&self.gen_spec()).map_err(|e| e.to_string())
        } else {
            Workload::from_images(&self.images).map_err(|e| e.to_string())
        }
    }

    /// When a live run stops: after `--full-scans N`, or when the counters are stable.
    pub fn until(&self) -> crate::engines::Until {
        match self.full_scans {
            Some(n) => crate::engines::Until::FullScans(n),
            None => crate::engines::Until::Stable { min_passes: 2 },
        }
    }

    /// `--set` pairs, split and checked for shape.
    pub fn knobs(&self) -> Result<Vec<(String, String)>, String> {
        parse_knobs(&self.set)
    }
}

/// `--set KNOB=VALUE` pairs, split and checked for shape. `run` is the command's own business.
pub fn parse_knobs(set: &[String]) -> Result<Vec<(String, String)>, String> {
    {
        set.iter()
            .map(|kv| {
                let (k, v) = kv.split_once('=').ok_or_else(|| {
                    format!("--set '{kv}' is not KNOB=VALUE (for example --set use_zero_pages=1)")
                })?;
                if k == "run" {
                    return Err(
                        "--set run=... is not allowed: the command starts and stops KSM itself"
                            .to_string(),
                    );
                }
                Ok((k.to_string(), v.to_string()))
            })
            .collect()
    }
}
