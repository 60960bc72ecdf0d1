//! `samepage daemon`, `samepage ctl` and `samepage run`: one engine merging the memory of
//! many processes, its knobs, and unmodified programs as its clients.

use crate::args::parse_knobs_allowing_run;
use crate::error::CliError;
use clap::Args;
use samepage_daemon::{Config, Stop};
use samepage_linux::{ConnectOptions, Control};
use std::path::PathBuf;

/// `samepage daemon` arguments.
#[derive(Args, Debug, Clone)]
pub struct DaemonArgs {
    /// The socket to listen on (default: $XDG_RUNTIME_DIR/samepage.sock, or
    /// /run/samepage.sock as root).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Also serve processes of this user (repeatable); by default only the daemon's own
    /// user is served.
    #[arg(long = "allow-uid", value_name = "UID")]
    pub allow_uid: Vec<u32>,
    /// Also serve processes in this group (repeatable).
    #[arg(long = "allow-gid", value_name = "GID")]
    pub allow_gid: Vec<u32>,
    /// Set a KSM knob by its kernel name before serving (repeatable); run=1 starts
    /// scanning.
    #[arg(long = "set", value_name = "KNOB=VALUE")]
    pub set: Vec<String>,
    /// Keep the counters in this file in the Prometheus text format (rewritten every
    /// second).
    #[arg(long, value_name = "FILE")]
    pub prometheus: Option<PathBuf>,
    /// Print nothing but errors.
    #[arg(long)]
    pub quiet: bool,
}

/// `samepage ctl` arguments.
#[derive(Args, Debug, Clone)]
pub struct CtlArgs {
    /// The daemon's socket.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Knobs to write, in order, as `echo VALUE > /sys/kernel/mm/ksm/KNOB` would.
    #[arg(value_name = "KNOB=VALUE", required = true)]
    pub knobs: Vec<String>,
}

/// `samepage run` arguments.
#[derive(Args, Debug, Clone)]
pub struct RunCmdArgs {
    /// The daemon's socket.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Merge in this security domain (a subdivision of the user's own): pages of different
    /// domains never share a physical page.
    #[arg(long, value_name = "NAME")]
    pub domain: Option<String>,
    /// The program and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// `samepage daemon`.
pub fn run_daemon(a: &DaemonArgs) -> Result<(), CliError> {
    let socket = a
        .socket
        .clone()
        .unwrap_or_else(ConnectOptions::default_socket);
    let knobs = parse_knobs_allowing_run(&a.set)?;
    if let Some(p) = &a.prometheus {
        crate::preflight::check_output(p, "--prometheus")?;
    }
    let stop = Stop::new().map_err(CliError::io("cannot make an eventfd for SIGTERM"))?;
    {
        let stop = stop.clone();
        crate::engines::on_interrupt(move || stop.stop());
    }
    let cfg = Config {
        socket: socket.clone(),
        allow_uids: a.allow_uid.clone(),
        allow_gids: a.allow_gid.clone(),
        knobs,
        log: !a.quiet,
    };
    // A thread of the daemon that panics leaves the engine in a state the other threads
    // cannot trust: one that went on would hang the next client that asks it anything. So
    // the daemon stops at once, as a SIGKILL would stop it: its clients' agents hold the
    // canonical pages, so every merged page stays valid, and the programs go on unmerged.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        eprintln!(
            "samepage daemon: a thread failed (above); stopping, its clients keep running \
             with their merged pages valid"
        );
        std::process::abort();
    }));
    let prom = a.prometheus.clone();
    samepage_daemon::serve(cfg, &stop, |d| {
        if let Some(p) = &prom {
            let st = d.stat();
            let c = samepage_linux::wire::counters_of(&st.ksm);
            let per: Vec<_> = st.ksm_stat.iter().map(|s| s.to_ksm_stat()).collect();
            if let Err(e) = crate::prom::write_file(p, &[("samepage", &c, &per)]) {
                eprintln!("samepage daemon: cannot write {}: {e}", p.display());
            }
        }
    })?;
    if !a.quiet {
        eprintln!(
            "samepage daemon: stopped; its clients keep running with their merged pages valid"
        );
    }
    Ok(())
}

/// `samepage ctl`.
pub fn run_ctl(a: &CtlArgs) -> Result<(), CliError> {
    let socket = a
        .socket
        .clone()
        .unwrap_or_else(ConnectOptions::default_socket);
    let knobs = parse_knobs_allowing_run(&a.knobs)?;
    let c = Control::connect(&socket)?;
    for (k, v) in knobs {
        c.write_knob(&k, &v)
            .map_err(CliError::context(format!("{k}={v}")))?;
    }
    Ok(())
}

/// Where the preload library is: `$SAMEPAGE_PRELOAD`, or next to this executable (where
/// cargo builds both), or one directory up (this executable in `deps/`).
pub fn preload_library() -> Result<PathBuf, CliError> {
    if let Some(p) = std::env::var_os("SAMEPAGE_PRELOAD") {
        return Ok(PathBuf::from(p));
    }
    const NAME: &str = "libsamepage_preload.so";
    let exe = std::env::current_exe().map_err(CliError::io("cannot find samepage's own binary"))?;
    let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    for d in [dir.clone(), dir.join(".."), dir.join("../lib")] {
        let p = d.join(NAME);
        if p.is_file() {
            return Ok(p.canonicalize().unwrap_or(p));
        }
    }
    Err(CliError::Failed(format!(
        "cannot find {NAME} next to {}: build it with `cargo build --release -p \
         samepage-preload` (or `cargo build --workspace`), or set SAMEPAGE_PRELOAD to its path",
        exe.display()
    )))
}

/// `samepage run`: exec the program with the preload library, which turns its
/// `madvise(MADV_MERGEABLE)` and `prctl(PR_SET_MEMORY_MERGE)` into registrations with the
/// daemon.
pub fn run_program(a: &RunCmdArgs) -> Result<(), CliError> {
    use std::os::unix::process::CommandExt;
    let socket = a
        .socket
        .clone()
        .unwrap_or_else(ConnectOptions::default_socket);
    let lib = preload_library()?;
    // Fail early with a sentence rather than let the program run unmerged.
    Control::connect(&socket)?;
    let preload = match std::env::var("LD_PRELOAD") {
        Ok(old) if !old.is_empty() => format!("{} {old}", lib.display()),
        _ => lib.display().to_string(),
    };
    let mut cmd = std::process::Command::new(&a.command[0]);
    cmd.args(&a.command[1..])
        .env("LD_PRELOAD", preload)
        .env("SAMEPAGE_SOCKET", &socket);
    match &a.domain {
        Some(d) => cmd.env("SAMEPAGE_DOMAIN", d),
        None => cmd.env_remove("SAMEPAGE_DOMAIN"),
    };
    let source = cmd.exec();
    Err(CliError::Exec {
        program: a.command[0].clone(),
        source,
    })
}
