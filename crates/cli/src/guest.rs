//! `samepage guest` (hidden): one guest of `samepage demo` as a process of its own, a
//! client of `samepage daemon`. It loads its guest's memory, offers it for merging, runs
//! the demo's application if asked, and answers the demo on its standard input and output,
//! one JSON line per answer:
//!
//! - on start: `{"ready": true, "pid": N}` once its memory is loaded and mergeable;
//! - `verify`: the application stops, every page is compared with what it should hold
//!   (merged pages read from their canonical page, which unmerges nothing), the agent's
//!   page states are checked against the page tables, and it answers
//!   `{"ok": bool, "problems": [...], "merged": [[page, canonical], ...], "verification": {...},
//!   "stats": {...}}`;
//! - `quit`: it exits.

use crate::error::CliError;
use crate::merge::Changed;
use clap::Args;
use samepage_engine::{PAGE_SIZE, PAGE_SIZE_U64};
use samepage_linux::{ConnectOptions, LiveKsm, PageKind};
use samepage_workload::{parse_size, GuestSpec, Workload};
use serde_json::json;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

/// `samepage guest` arguments.
#[derive(Args, Debug, Clone)]
pub struct GuestArgs {
    /// The daemon's socket.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Memory of all guests together.
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// Guests in all.
    #[arg(long)]
    pub guests: u32,
    /// Which guest this process is.
    #[arg(long)]
    pub index: u32,
    /// Seed of the guests' layout and contents.
    #[arg(long)]
    pub seed: u64,
    /// Run the demo's application in this guest.
    #[arg(long)]
    pub app: bool,
    /// Security domain.
    #[arg(long)]
    pub domain: Option<String>,
}

fn say(v: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// `samepage guest`.
pub fn run(a: &GuestArgs) -> Result<(), CliError> {
    let spec = GuestSpec {
        size: a.size,
        guests: a.guests,
        shared_pct: 35,
        unique_pct: 35,
        seed: a.seed,
    };
    let kinds = spec.layout()?;
    let workload = Workload::guests(&spec)?;
    let space = workload
        .spaces
        .get(a.index as usize)
        .ok_or_else(|| CliError::Usage(format!("there is no guest {} of {}", a.index, a.guests)))?;
    let ksm = LiveKsm::connect(&ConnectOptions {
        socket: a.socket.clone(),
        domain: a.domain.clone(),
        merge_any: false,
    })?;
    let mm = ksm.new_mm();
    let r = ksm.create_region(mm, space.pages() * PAGE_SIZE_U64)?;
    let mut page = [0u8; PAGE_SIZE];
    for i in 0..space.pages() {
        space.fill_page(i, &mut page);
        r.write(i * PAGE_SIZE_U64, &page)?;
    }
    ksm.madvise_mergeable(&r)?;
    say(json!({"ready": true, "pid": std::process::id()}));
    let stop = AtomicBool::new(false);
    let mut changed = Changed::new();
    std::thread::scope(|s| -> Result<(), CliError> {
        let app = a
            .app
            .then(|| s.spawn(|| crate::demo::app_in(&ksm, &r, &stop, &kinds)));
        let mut app = app;
        for line in std::io::stdin().lock().lines() {
            let line = line.map_err(CliError::io("cannot read the demo's request"))?;
            match line.trim() {
                "verify" => {
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    if let Some(h) = app.take() {
                        changed = h.join().unwrap_or_default();
                    }
                    let mut problems = Vec::new();
                    let mut want = [0u8; PAGE_SIZE];
                    let mut got = [0u8; PAGE_SIZE];
                    let mut merged = Vec::new();
                    for i in 0..space.pages() {
                        let addr = r.start() + i * PAGE_SIZE_U64;
                        match changed.get(&addr) {
                            Some(p) => want.copy_from_slice(&p[..]),
                            None => space.fill_page(i, &mut want),
                        }
                        if let PageKind::Merged { canonical } = ksm.page(addr).kind {
                            merged.push((i, canonical));
                        }
                        if r.peek_page(i * PAGE_SIZE_U64, &mut got).is_err() || got != want {
                            problems.push(format!("page {i} does not hold what it should"));
                            if problems.len() > 8 {
                                break;
                            }
                        }
                    }
                    let v = ksm.verify();
                    problems.extend(v.problems());
                    say(json!({
                        "ok": problems.is_empty(),
                        "problems": problems,
                        "merged": merged,
                        "verification": v,
                        "stats": ksm.stats(),
                        "metadata": ksm.metadata(),
                        "footprint": ksm.footprint().ok(),
                        "connected": ksm.connected(),
                    }));
                }
                "quit" | "" => break,
                other => say(json!({"error": format!("unknown command {other:?}")})),
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = app.take() {
            let _ = h.join();
        }
        Ok(())
    })
}
