//! `samepage`: Kernel Samepage Merging in user space.
//!
//! The binary is thin: it parses arguments and prints; the work lives in the engine, the
//! simulator and the workload crates.

mod args;
mod bench;
mod bench_clients;
mod compare;
mod daemon;
mod demo;
mod demo_daemon;
mod engines;
mod error;
mod guest;
mod merge;
mod plot;
mod preflight;
mod prom;
mod report;
mod simulate;
mod stat;
mod watch;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "samepage",
    version,
    about = "Kernel Samepage Merging (KSM) in user space, with exact tracking of the zero pages it places",
    after_help = error::EXIT_STATUS_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Merge guest-like address spaces in real memory while an application writes to them,
    /// and report what was saved (no arguments needed).
    Demo(demo::DemoArgs),
    /// Run KSM on the deterministic simulated memory manager and print the counters.
    Simulate(simulate::SimArgs),
    /// Load the workload into real memory of this process, merge it, verify the page tables
    /// and print the counters.
    Merge(merge::MergeArgs),
    /// Run the same bytes under samepage and under the host kernel's KSM and print both side
    /// by side (root; the host's knobs are restored afterwards).
    Compare(compare::CompareArgs),
    /// Show the host kernel's KSM state (or a running samepage's, from its --prometheus
    /// file) in the kernel's layout, with memory saved, profit and sharing ratio.
    Stat(stat::StatArgs),
    /// Benchmark samepage against the host kernel's ksmd on the same bytes (root): time to
    /// converge, CPU, scan rate, first-write latency, metadata per page.
    Bench(bench::BenchArgs),
    /// Run one KSM engine for many processes, listening on a Unix socket (foreground;
    /// SIGINT or SIGTERM stops it, and its clients keep all their data).
    Daemon(daemon::DaemonArgs),
    /// Write knobs of a running daemon, with the kernel's validation.
    Ctl(daemon::CtlArgs),
    /// Run an unmodified program whose madvise(MADV_MERGEABLE) and prctl(PR_SET_MEMORY_MERGE)
    /// go to samepage daemon instead of the kernel.
    Run(daemon::RunCmdArgs),
    /// One guest of `samepage demo`, a client of its daemon (started by the demo).
    #[command(hide = true)]
    Guest(guest::GuestArgs),
    /// One client process of `samepage bench --what clients` (started by the bench).
    #[command(hide = true)]
    BenchClient(bench_clients::ClientArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // SIGINT and SIGTERM are how a daemon is meant to stop: not a failure.
    let daemon = matches!(cli.command, Command::Daemon(_));
    let result = match cli.command {
        Command::Simulate(a) => simulate::run(&a),
        Command::Merge(a) => merge::run(&a),
        Command::Demo(a) => demo::run(&a),
        Command::Compare(a) => compare::run(&a),
        Command::Stat(a) => stat::run(&a),
        Command::Bench(a) => bench::run(&a),
        Command::Daemon(a) => daemon::run_daemon(&a),
        Command::Ctl(a) => daemon::run_ctl(&a),
        Command::Run(a) => daemon::run_program(&a),
        Command::Guest(a) => guest::run(&a),
        Command::BenchClient(a) => bench_clients::run_client(&a),
    };
    // An interrupt that came after the last check (while printing, say) still fails the
    // command: its output may be cut short.
    let result = if daemon {
        result
    } else {
        result.and_then(|()| engines::interrupted())
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("samepage: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
