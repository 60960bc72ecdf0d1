//! `samepage stat [PID]`: KSM's state in the kernel's layout, with the figures operators
//! most often derive wrongly (memory saved forgets the zero pages; the sharing ratio).

use crate::error::CliError;
use crate::prom;
use clap::Args;
use samepage_engine::{KsmCounters, KsmStat, PAGE_SIZE_U64};
use samepage_linux::host::{self, HostError};
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
    /// Ask a running samepage daemon (its /sys/kernel/mm/ksm layout and one ksm_stat per
    /// client process, under its real pid).
    #[arg(long, conflicts_with_all = ["pid", "samepage"])]
    pub daemon: bool,
    /// The daemon's socket (with --daemon).
    #[arg(long, value_name = "PATH", requires = "daemon")]
    pub socket: Option<PathBuf>,
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
    /// Where the figures come from: `/sys/kernel/mm/ksm` (the live host), or the file a
    /// samepage command wrote with `--prometheus`.
    pub source: String,
    #[serde(serialize_with = "crate::report::ser_ksm")]
    pub ksm: (KsmCounters, Vec<(String, String)>),
    pub derived: Derived,
    pub ksm_stat: Vec<KsmStat>,
    /// Processes whose `ksm_stat` this user may not read (left out above; root sees them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unreadable_processes: Vec<u32>,
    /// A daemon's clients: command, domain, and what they advised that cannot merge.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<samepage_linux::wire::ClientStat>,
}

fn mib(b: i64) -> f64 {
    b as f64 / (1 << 20) as f64
}

impl State {
    pub fn text(&self) -> String {
        let mut out = if self.source == host::KSM_DIR {
            format!("{}\n", host::KSM_DIR)
        } else if self.engine == "daemon" {
            format!(
                "samepage daemon at {} (the layout of {})\n",
                self.source,
                host::KSM_DIR
            )
        } else {
            format!(
                "{} engine, as recorded in {} (not the live host; the layout of {})\n",
                self.engine,
                self.source,
                host::KSM_DIR
            )
        };
        out += &self.ksm.0.to_string();
        for (k, v) in &self.ksm.1 {
            out += &format!("{k} {v}\n");
        }
        for st in &self.ksm_stat {
            match self.clients.iter().find(|c| c.pid == st.pid) {
                Some(c) => {
                    out += &format!(
                        "\n/proc/{}/ksm_stat  ({}, domain {})\n{st}",
                        st.pid, c.comm, c.domain
                    );
                    for i in &c.ignored {
                        out += &format!("ignored (not private anonymous memory): {i}\n");
                    }
                }
                None => out += &format!("\n/proc/{}/ksm_stat\n{st}", st.pid),
            }
        }
        if !self.unreadable_processes.is_empty() {
            out += &format!(
                "\n({} processes left out: their ksm_stat is readable only by their owner or \
                 root)\n",
                self.unreadable_processes.len()
            );
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

/// Why `/proc/<pid>/ksm_stat` could not be read, in words.
fn ksm_stat_error(pid: u32, e: HostError) -> CliError {
    let path = format!("/proc/{pid}/ksm_stat");
    match e {
        HostError::Read { source, .. } => match source.kind() {
            std::io::ErrorKind::PermissionDenied => CliError::NoPermission(format!(
                "cannot read {path}: permission denied (it is readable only by the process's \
                 owner and root; run as root)"
            )),
            std::io::ErrorKind::NotFound
                if std::path::Path::new(&format!("/proc/{pid}")).exists() =>
            {
                CliError::Unavailable(format!(
                    "{path} does not exist: this kernel lacks ksm_stat (Linux 6.1 has it)"
                ))
            }
            std::io::ErrorKind::NotFound => CliError::Usage(format!("there is no process {pid}")),
            _ => CliError::Io {
                what: format!("cannot read {path}"),
                source,
            },
        },
        e => e.into(),
    }
}

/// The host kernel's state, with the `ksm_stat` of `pid` or of every process KSM works on.
pub fn host_state(pid: Option<u32>) -> Result<State, CliError> {
    let c = host::counters()?;
    let (ksm_stat, unreadable_processes) = match pid {
        Some(p) => (
            vec![host::ksm_stat(p).map_err(|e| ksm_stat_error(p, e))?],
            Vec::new(),
        ),
        None => host::ksm_processes(),
    };
    Ok(State {
        engine: "kernel".into(),
        source: host::KSM_DIR.into(),
        derived: derive(&c),
        ksm: (c, host::tunables()),
        ksm_stat,
        unreadable_processes,
        clients: Vec::new(),
    })
}

/// The largest `--prometheus` file read back (one is a few KiB).
const MAX_PROM_BYTES: u64 = 16 << 20;

/// The text of a `--prometheus` file: a regular file of sensible size (never a device, a
/// FIFO or a file of /proc, which would block or never end).
fn read_prom(path: &std::path::Path) -> Result<String, CliError> {
    use samepage_workload::{open_input_file, InputFileError};
    use std::io::Read;
    let hint = format!(
        "(start samepage with --prometheus {} first)",
        path.display()
    );
    let (f, len) = open_input_file(path).map_err(|e| {
        CliError::Usage(match e {
            InputFileError::Io(e) => format!("cannot read {}: {e} {hint}", path.display()),
            InputFileError::NotRegular(kind) => format!(
                "{} is {kind}, not the regular file samepage writes with --prometheus",
                path.display()
            ),
        })
    })?;
    if len > MAX_PROM_BYTES {
        return Err(CliError::Usage(format!(
            "{} is {len} bytes, far more than a --prometheus file holds; is it the right file?",
            path.display()
        )));
    }
    let mut s = String::new();
    f.take(MAX_PROM_BYTES)
        .read_to_string(&mut s)
        .map_err(CliError::io(format!("cannot read {}", path.display())))?;
    Ok(s)
}

/// A running daemon's state.
pub fn daemon_state(socket: &std::path::Path) -> Result<State, CliError> {
    let c = samepage_linux::Control::connect(socket)?;
    let st = c.stat()?;
    let counters = samepage_linux::wire::counters_of(&st.ksm);
    let tunables = samepage_engine::TUNABLE_NAMES
        .iter()
        .filter_map(|n| st.ksm.get(*n).map(|v| (n.to_string(), v.clone())))
        .collect();
    Ok(State {
        engine: "daemon".into(),
        source: socket.display().to_string(),
        derived: derive(&counters),
        ksm: (counters, tunables),
        ksm_stat: st.ksm_stat.iter().map(|c| c.to_ksm_stat()).collect(),
        unreadable_processes: Vec::new(),
        clients: st.ksm_stat,
    })
}

/// `samepage stat`.
pub fn run(a: &StatArgs) -> Result<(), CliError> {
    if a.daemon {
        let socket = a
            .socket
            .clone()
            .unwrap_or_else(samepage_linux::ConnectOptions::default_socket);
        let s = daemon_state(&socket)?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&s)?);
        } else {
            print!("{}", s.text());
        }
        return Ok(());
    }
    let states = match &a.samepage {
        Some(path) => {
            let s = read_prom(path)?;
            let engines = prom::parse(&s);
            if engines.is_empty() {
                return Err(CliError::Usage(format!(
                    "{} holds no samepage counters (it is written by --prometheus)",
                    path.display()
                )));
            }
            engines
                .into_iter()
                .map(|(engine, c)| State {
                    engine,
                    source: path.display().to_string(),
                    derived: derive(&c),
                    ksm: (c, Vec::new()),
                    ksm_stat: Vec::new(),
                    unreadable_processes: Vec::new(),
                    clients: Vec::new(),
                })
                .collect()
        }
        None => {
            // A command that changed the host and was killed: what is shown is not the
            // host's own setting.
            if std::path::Path::new(host::SAVED_FILE).exists() {
                eprintln!(
                    "samepage: note: {} exists: a samepage command changed the host's KSM and \
                     is still running or was killed; the next samepage compare or bench puts \
                     the knobs it saved back",
                    host::SAVED_FILE
                );
            }
            vec![host_state(a.pid)?]
        }
    };
    if a.json {
        let v = if states.len() == 1 {
            serde_json::to_string_pretty(&states[0])
        } else {
            serde_json::to_string_pretty(&states)
        };
        println!("{}", v?);
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
