//! `samepage stat [PID]`: KSM's state in the kernel's layout, with the figures operators
//! most often derive wrongly (memory saved forgets the zero pages; the sharing ratio).

use crate::prom;
use clap::Args;
use samepage_engine::{KsmCounters, KsmStat, PAGE_SIZE_U64};
use samepage_linux::host;
use serde::Serialize;
use std::path::PathBuf;

/// `samepage stat` arguments.
#[derive(Args, Debug, Clone)]
pub struct StatArgs {
    /// Show /proc/PID/ksm_stat of this process (default: every process KSM works on).
    pub pid: Option<u32>,
    /// Read a running samepage engine's figures from the file it keeps with --prometheus,
    /// instead of the host kernel's.
    #[arg(long, value_name = "FILE", conflicts_with = "pid")]
    pub samepage: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Figures derived from the counters.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Derived {
    /// `(pages_sharing + ksm_zero_pages) * page size`: zero pages are memory saved too.
    pub saved_bytes: i64,
    /// Of which by merging duplicates (`pages_sharing`).
    pub saved_by_merging_bytes: i64,
    /// Of which by zero pages (`ksm_zero_pages`).
    pub saved_by_zero_pages_bytes: i64,
    /// `general_profit`: saved bytes minus KSM's metadata.
    pub profit_bytes: i64,
    /// `pages_sharing / pages_shared`: mappings per KSM page beyond the first (the kernel's
    /// documentation calls a high ratio good).
    pub sharing_ratio: Option<f64>,
    /// `pages_unshared / pages_sharing`: a high ratio means wasted scanning.
    pub unshared_ratio: Option<f64>,
}

pub fn derive(c: &KsmCounters) -> Derived {
    let p = PAGE_SIZE_U64 as i64;
    let div = |a: u64, b: u64| (b > 0).then(|| a as f64 / b as f64);
    Derived {
        saved_bytes: c.saved_pages() * p,
        saved_by_merging_bytes: c.pages_sharing as i64 * p,
        saved_by_zero_pages_bytes: c.ksm_zero_pages * p,
        profit_bytes: c.general_profit,
        sharing_ratio: div(c.pages_sharing, c.pages_shared),
        unshared_ratio: div(c.pages_unshared, c.pages_sharing),
    }
}

/// One engine's state.
#[derive(Debug, Serialize)]
pub struct State {
    pub engine: String,
    #[serde(serialize_with = "crate::report::ser_ksm")]
    pub ksm: (KsmCounters, Vec<(String, String)>),
    pub derived: Derived,
    pub ksm_stat: Vec<KsmStat>,
}

fn mib(b: i64) -> f64 {
    b as f64 / (1 << 20) as f64
}

impl State {
    pub fn text(&self) -> String {
        let mut out = match self.engine.as_str() {
            "kernel" => format!("{}\n", host::KSM_DIR),
            e => format!("{e} engine (the layout of {})\n", host::KSM_DIR),
        };
        out += &self.ksm.0.to_string();
        for (k, v) in &self.ksm.1 {
            out += &format!("{k} {v}\n");
        }
        for st in &self.ksm_stat {
            out += &format!("\n/proc/{}/ksm_stat\n{st}", st.pid);
        }
        let d = &self.derived;
        out += &format!(
            "\nmemory saved: {:.1} MiB = pages_sharing {:.1} MiB + ksm_zero_pages {:.1} MiB\n",
            mib(d.saved_bytes),
            mib(d.saved_by_merging_bytes),
            mib(d.saved_by_zero_pages_bytes)
        );
        out += &format!(
            "profit (general_profit, saved minus metadata): {:.1} MiB\n",
            mib(d.profit_bytes)
        );
        let r = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
        out += &format!(
            "sharing ratio (pages_sharing / pages_shared): {}\nunshared ratio (pages_unshared / pages_sharing): {}\n",
            r(d.sharing_ratio),
            r(d.unshared_ratio)
        );
        out
    }
}

/// The host kernel's state, with the `ksm_stat` of `pid` or of every process KSM works on.
pub fn host_state(pid: Option<u32>) -> Result<State, String> {
    let c = host::counters().map_err(|e| e.to_string())?;
    let ksm_stat = match pid {
        Some(p) => vec![host::ksm_stat(p).map_err(|_| {
            format!("no /proc/{p}/ksm_stat: there is no process {p}, or this kernel lacks ksm_stat")
        })?],
        None => host::ksm_processes(),
    };
    Ok(State {
        engine: "kernel".into(),
        derived: derive(&c),
        ksm: (c, host::tunables()),
        ksm_stat,
    })
}

/// `samepage stat`.
pub fn run(a: &StatArgs) -> Result<(), String> {
    let states = match &a.samepage {
        Some(path) => {
            let s = std::fs::read_to_string(path).map_err(|e| {
                format!(
                    "cannot read {}: {e} (start samepage with --prometheus {} first)",
                    path.display(),
                    path.display()
                )
            })?;
            let engines = prom::parse(&s);
            if engines.is_empty() {
                return Err(format!(
                    "{} holds no samepage counters (it is written by --prometheus)",
                    path.display()
                ));
            }
            engines
                .into_iter()
                .map(|(engine, c)| State {
                    engine,
                    derived: derive(&c),
                    ksm: (c, Vec::new()),
                    ksm_stat: Vec::new(),
                })
                .collect()
        }
        None => vec![host_state(a.pid)?],
    };
    if a.json {
        let v = if states.len() == 1 {
            serde_json::to_string_pretty(&states[0])
        } else {
            serde_json::to_string_pretty(&states)
        };
        println!("{}", v.map_err(|e| e.to_string())?);
    } else {
        let texts: Vec<String> = states.iter().map(State::text).collect();
        print!("{}", texts.join("\n"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_memory_counts_zero_pages() {
        let c = KsmCounters {
            pages_shared: 10,
            pages_sharing: 30,
            pages_unshared: 15,
            ksm_zero_pages: 5,
            general_profit: 1000,
            ..KsmCounters::default()
        };
        let d = derive(&c);
        assert_eq!(d.saved_bytes, 35 * 4096);
        assert_eq!(d.saved_by_zero_pages_bytes, 5 * 4096);
        assert_eq!(d.sharing_ratio, Some(3.0));
        assert_eq!(d.unshared_ratio, Some(0.5));
        assert_eq!(derive(&KsmCounters::default()).sharing_ratio, None);
    }
}
