//! Why a command failed, and the exit status that tells a script which kind of failure it was.
//!
//! Each failure keeps the typed error it came from as its `source`, so nothing is flattened
//! into a string before `main` prints it. The exit statuses (documented in `samepage --help`
//! and the README) follow sysexits(3) where one fits, so a caller can tell "fix the command"
//! from "this machine cannot do it" from "try again later":
//!
//! | status | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | the run failed (an I/O error, a timeout, a daemon that went away) |
//! | 2 | bad usage: an argument, knob value, workload or output path was refused before anything ran (clap's own errors exit 2 too) |
//! | 3 | verification failed: memory did not hold the bytes written to it |
//! | 69 | unavailable here: no KSM in this kernel, a userfaultfd without the features samepage needs, no daemon on the socket |
//! | 75 | busy, try again later: the host's KSM is used by someone else, or another samepage holds its lock |
//! | 77 | permission denied: the host's KSM needs root, or the daemon refused this user |
//! | 126, 127 | `samepage run` cannot execute or cannot find the program (as a shell says); otherwise `run` exits with the program's own status |
//! | 130 | interrupted (SIGINT or SIGTERM); what the command changed was put back |

use samepage_daemon::DaemonError;
use samepage_engine::KnobError;
use samepage_linux::host::HostError;
use samepage_linux::{AgentError, LiveError, RemoteError};
use samepage_sim::SysError;
use samepage_workload::WorkloadError;
use std::io;
use std::path::Path;

/// Exit status of a run that failed (I/O, a timeout, a daemon that went away).
pub const EXIT_FAILURE: u8 = 1;
/// Exit status of a refused command line (clap uses 2 as well).
pub const EXIT_USAGE: u8 = 2;
/// Exit status when memory did not hold what was written to it.
pub const EXIT_VERIFICATION: u8 = 3;
/// `EX_UNAVAILABLE`: this machine lacks what the command needs.
pub const EXIT_UNAVAILABLE: u8 = 69;
/// `EX_TEMPFAIL`: someone else is using what the command needs; try again later.
pub const EXIT_TEMPFAIL: u8 = 75;
/// `EX_NOPERM`: the command needs permissions this user does not have.
pub const EXIT_NOPERM: u8 = 77;
/// A program `samepage run` cannot execute, as a shell reports it.
pub const EXIT_CANNOT_EXECUTE: u8 = 126;
/// A program `samepage run` cannot find, as a shell reports it.
pub const EXIT_NOT_FOUND: u8 = 127;
/// 128 + SIGINT, as a shell reports a command that a signal stopped.
pub const EXIT_INTERRUPTED: u8 = 130;

/// What `samepage --help` says about exit statuses.
pub const EXIT_STATUS_HELP: &str = "\
Exit status:
  0    success
  1    the run failed (I/O error, timeout, a daemon that went away)
  2    bad usage: an argument, knob value, workload or output path was refused
  3    verification failed: memory did not hold the bytes written to it
  69   unavailable here: no KSM, a userfaultfd without needed features, no daemon
  75   busy: the host's KSM or its lock is in use by someone else; try again later
  77   permission denied: the host's KSM needs root, or the daemon refused this user
  126  samepage run: the program cannot be executed (127: it is not found);
       otherwise samepage run exits with the program's own status
  130  interrupted; what the command changed was put back";

/// A command's failure.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line asks for something that cannot work; nothing was changed.
    #[error("{0}")]
    Usage(String),
    /// This machine lacks what the command needs.
    #[error("{0}")]
    Unavailable(String),
    /// This user may not do what the command needs.
    #[error("{0}")]
    NoPermission(String),
    /// A knob write was refused, with the argument that asked for it.
    #[error("{context}: {source}")]
    Knob {
        /// The argument as given (`--set pages_to_scan=0`).
        context: String,
        /// The kernel's validation error.
        #[source]
        source: KnobError,
    },
    /// The workload cannot be built or read.
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    /// The simulated machine refused an operation (out of frames, say).
    #[error("the simulator: {0}")]
    Sim(#[from] SysError),
    /// The host's KSM cannot be used or put back.
    #[error(transparent)]
    Host(#[from] HostError),
    /// The live backend failed.
    #[error(transparent)]
    Live(#[from] LiveError),
    /// The userfaultfd agent cannot run.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// samepage daemon cannot be reached or refused a request.
    #[error(transparent)]
    Daemon(#[from] RemoteError),
    /// samepage daemon could not start or stopped on an error.
    #[error(transparent)]
    Serve(#[from] DaemonError),
    /// `samepage run` could not start the program.
    #[error("cannot run {program}: {source}")]
    Exec {
        /// The program as given.
        program: String,
        /// Why `execvp` failed.
        #[source]
        source: io::Error,
    },
    /// A failure, with the argument or step it belongs to.
    #[error("{context}: {source}")]
    Context {
        /// What was being done (`run=1`).
        context: String,
        /// The failure, which decides the exit status.
        #[source]
        source: Box<CliError>,
    },
    /// A system call or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done ("cannot write out.prom").
        what: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// JSON output could not be produced.
    #[error("cannot write the JSON report: {0}")]
    Json(#[from] serde_json::Error),
    /// Memory did not hold what was written to it.
    #[error("verification failed: {0}")]
    Verification(String),
    /// The user interrupted the command.
    #[error("interrupted")]
    Interrupted,
    /// The run went wrong in a way none of the above describes (a timeout, a child process
    /// that ended early).
    #[error("{0}")]
    Failed(String),
    /// A samepage process this command started (a demo's daemon) failed; its message and
    /// exit status are passed on.
    #[error("{message}")]
    Child {
        /// What the child printed after `samepage: error: `.
        message: String,
        /// Its exit status.
        status: u8,
    },
    /// The command failed after it took the host's KSM, which was then put back.
    #[error(
        "{0}; the host's KSM knobs and vm.max_map_count are put back as they were (read back)"
    )]
    HostRestored(Box<CliError>),
    /// The command failed, and putting things back afterwards failed as well.
    #[error("{first}; and {then}")]
    Both {
        /// The failure of the command itself, which decides the exit status.
        first: Box<CliError>,
        /// The failure while putting things back.
        then: Box<CliError>,
    },
}

impl CliError {
    /// A refused command line.
    pub fn usage(why: impl Into<String>) -> Self {
        Self::Usage(why.into())
    }

    /// A failed run.
    pub fn failed(why: impl Into<String>) -> Self {
        Self::Failed(why.into())
    }

    /// An I/O error, with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }

    /// An error writing `path`.
    pub fn write(path: &Path) -> impl FnOnce(io::Error) -> Self {
        Self::io(format!("cannot write {}", path.display()))
    }

    /// A refused knob write, with the argument that asked for it.
    pub fn knob(context: impl Into<String>) -> impl FnOnce(KnobError) -> Self {
        let context = context.into();
        move |source| Self::Knob { context, source }
    }

    /// A knob write the live engine refused, with the argument that asked for it (its other
    /// failures pass through as they are).
    pub fn live_knob(context: impl Into<String>) -> impl FnOnce(LiveError) -> Self {
        let context = context.into();
        move |e| match e {
            LiveError::Knob(source) => Self::Knob { context, source },
            e => Self::Live(e),
        }
    }

    /// Put `context` before an error, keeping its exit status.
    pub fn context<E: Into<CliError>>(context: impl Into<String>) -> impl FnOnce(E) -> Self {
        let context = context.into();
        move |e| Self::Context {
            context,
            source: Box::new(e.into()),
        }
    }

    /// The exit status of this failure (the table in the module's documentation).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Workload(WorkloadError::Interrupted) => EXIT_INTERRUPTED,
            Self::Usage(_) | Self::Workload(_) => EXIT_USAGE,
            Self::Unavailable(_) => EXIT_UNAVAILABLE,
            Self::NoPermission(_) => EXIT_NOPERM,
            Self::Knob { source, .. } => knob_code(source),
            Self::Host(e) => host_code(e),
            Self::Live(e) => live_code(e),
            Self::Agent(e) => agent_code(e),
            Self::Daemon(e) => remote_code(e),
            Self::Serve(e) => daemon_code(e),
            // As a shell reports a command it cannot run.
            Self::Exec { source, .. } if source.kind() == io::ErrorKind::NotFound => EXIT_NOT_FOUND,
            Self::Exec { .. } => EXIT_CANNOT_EXECUTE,
            Self::Context { source, .. } => source.exit_code(),
            Self::Io { .. } | Self::Json(_) | Self::Sim(_) | Self::Failed(_) => EXIT_FAILURE,
            Self::Verification(_) => EXIT_VERIFICATION,
            Self::Interrupted => EXIT_INTERRUPTED,
            Self::Child { status, .. } => *status,
            Self::HostRestored(first) | Self::Both { first, .. } => first.exit_code(),
        }
    }
}

fn knob_code(e: &KnobError) -> u8 {
    match e {
        KnobError::Busy(_) => EXIT_TEMPFAIL,
        KnobError::Unmerge(_) => EXIT_FAILURE,
        _ => EXIT_USAGE,
    }
}

fn host_code(e: &HostError) -> u8 {
    match e {
        HostError::NoKsm => EXIT_UNAVAILABLE,
        HostError::NotRoot(_) => EXIT_NOPERM,
        HostError::Busy(_)
        | HostError::NotEmpty(_)
        | HostError::OthersUseKsm(_)
        | HostError::OthersStarted(_)
        | HostError::LockBusy { .. }
        | HostError::InUse { .. } => EXIT_TEMPFAIL,
        HostError::LockInterrupted(_) => EXIT_INTERRUPTED,
        HostError::Write { source, .. } if is_permission(source) => EXIT_NOPERM,
        HostError::Write { source, .. } if source.raw_os_error() == Some(EINVAL) => EXIT_USAGE,
        _ => EXIT_FAILURE,
    }
}

fn live_code(e: &LiveError) -> u8 {
    match e {
        LiveError::Agent(a) => agent_code(a),
        LiveError::Knob(k) => knob_code(k),
        LiveError::Remote(r) => remote_code(r),
        _ => EXIT_FAILURE,
    }
}

fn agent_code(e: &AgentError) -> u8 {
    match e {
        AgentError::NoUserfaultfd { .. } | AgentError::MissingFeature { .. } => EXIT_UNAVAILABLE,
        _ => EXIT_FAILURE,
    }
}

// The errnos a daemon's refusal carries (Linux's numbers; the CLI links no libc).
const EPERM: i32 = 1;
const EACCES: i32 = 13;
const EBUSY: i32 = 16;
const EINVAL: i32 = 22;

fn remote_code(e: &RemoteError) -> u8 {
    match e {
        RemoteError::Connect { source, .. } if is_permission(source) => EXIT_NOPERM,
        RemoteError::Connect { .. } => EXIT_UNAVAILABLE,
        RemoteError::Refused { errno, .. } => match *errno {
            EPERM | EACCES => EXIT_NOPERM,
            EBUSY => EXIT_TEMPFAIL,
            EINVAL => EXIT_USAGE,
            _ => EXIT_FAILURE,
        },
        _ => EXIT_FAILURE,
    }
}

fn daemon_code(e: &DaemonError) -> u8 {
    match e {
        DaemonError::InUse(_) => EXIT_TEMPFAIL,
        DaemonError::Socket { source, .. } if is_permission(source) => EXIT_NOPERM,
        DaemonError::Knob { source, .. } => knob_code(source),
        _ => EXIT_FAILURE,
    }
}

fn is_permission(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::PermissionDenied
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_failure_has_its_status() {
        assert_eq!(CliError::usage("x").exit_code(), EXIT_USAGE);
        assert_eq!(CliError::failed("x").exit_code(), EXIT_FAILURE);
        assert_eq!(CliError::Interrupted.exit_code(), EXIT_INTERRUPTED);
        assert_eq!(
            CliError::Verification("x".into()).exit_code(),
            EXIT_VERIFICATION
        );
        assert_eq!(
            CliError::from(HostError::NoKsm).exit_code(),
            EXIT_UNAVAILABLE
        );
        assert_eq!(
            CliError::from(HostError::NotRoot("run".into())).exit_code(),
            EXIT_NOPERM
        );
        assert_eq!(
            CliError::from(HostError::Busy("1".into())).exit_code(),
            EXIT_TEMPFAIL
        );
        let refused = |errno| RemoteError::Refused {
            errno,
            message: String::new(),
        };
        assert_eq!(CliError::from(refused(22)).exit_code(), EXIT_USAGE);
        assert_eq!(CliError::from(refused(16)).exit_code(), EXIT_TEMPFAIL);
        assert_eq!(CliError::from(refused(1)).exit_code(), EXIT_NOPERM);
        let gone = RemoteError::Connect {
            path: "/x".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert_eq!(CliError::from(gone).exit_code(), EXIT_UNAVAILABLE);
        let unknown = KnobError::Unknown("nope".into());
        assert_eq!(
            CliError::knob("--set nope=1")(unknown).exit_code(),
            EXIT_USAGE
        );
        assert_eq!(
            CliError::from(LiveError::Knob(KnobError::Busy("max_page_sharing".into()))).exit_code(),
            EXIT_TEMPFAIL
        );
    }

    #[test]
    fn a_failure_while_putting_back_keeps_the_first_status() {
        let e = CliError::Both {
            first: Box::new(CliError::from(HostError::NoKsm)),
            then: Box::new(CliError::failed("restore")),
        };
        assert_eq!(e.exit_code(), EXIT_UNAVAILABLE);
        assert_eq!(e.to_string(), format!("{}; and restore", HostError::NoKsm));
    }
}
