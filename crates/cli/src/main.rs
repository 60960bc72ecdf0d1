//! `samepage`: Kernel Samepage Merging in user space.
//!
//! The binary is thin: it parses arguments and prints; the work lives in the engine, the
//! simulator and the workload crates.

mod args;
mod merge;
mod report;
mod simulate;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "samepage",
    version,
    about = "Kernel Samepage Merging (KSM) in user space, with exact tracking of the zero pages it places"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run KSM on the deterministic simulated memory manager and print the counters.
    Simulate(args::RunArgs),
    /// Load the workload into real memory of this process, merge it, verify the page tables
    /// and print the counters.
    Merge(merge::MergeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Simulate(a) => simulate::run(&a),
        Command::Merge(a) => merge::run(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("samepage: error: {e}");
            ExitCode::FAILURE
        }
    }
}
