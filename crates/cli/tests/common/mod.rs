//! Running the `samepage` binary as a user would.

#![allow(dead_code)] // each test binary uses a different part

use serde_json::Value;
use std::process::{Command, Output};

pub fn samepage(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_samepage"))
        .args(args)
        .output()
        .expect("run samepage")
}

/// Run with `--json`; it must succeed and print one JSON object.
pub fn json(args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = samepage(&a);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

/// The exit statuses `samepage --help` documents for a failure (a panic exits 101, a
/// signal with none).
pub const FAILURE_CODES: [i32; 9] = [1, 2, 3, 69, 75, 77, 126, 127, 130];

/// Run; it must fail with one of the documented statuses and say why on stderr.
pub fn err(args: &[&str]) -> String {
    let out = samepage(args);
    assert!(!out.status.success(), "expected failure for {args:?}");
    let code = out.status.code();
    assert!(
        code.is_some_and(|c| FAILURE_CODES.contains(&c)),
        "{args:?}: exit code {code:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.stdout.is_empty(), "a failure prints nothing on stdout");
    e
}

/// Run; it must fail with exactly `code` and say why on stderr.
pub fn err_code(args: &[&str], code: i32) -> String {
    let out = samepage(args);
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{args:?}: {e}");
    assert!(out.stdout.is_empty(), "a failure prints nothing on stdout");
    e
}

/// A fresh directory for a test's files.
pub fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("samepage-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The `data-series` of every polyline of one engine in an SVG the plot wrote, with its points.
pub fn svg_series(svg: &str, engine: &str) -> Vec<(String, Vec<(f64, f64)>)> {
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    svg.split("<polyline")
        .skip(1)
        .filter(|p| p.contains(&format!("data-engine=\"{engine}\"")))
        .map(|p| {
            let attr = |name: &str| {
                let s = p.split(&format!("{name}=\"")).nth(1).expect("attribute");
                s[..s.find('"').unwrap()].to_string()
            };
            let points = attr("points")
                .split_whitespace()
                .map(|xy| {
                    let (x, y) = xy.split_once(',').unwrap();
                    (x.parse().unwrap(), y.parse().unwrap())
                })
                .collect();
            (attr("data-series"), points)
        })
        .collect()
}

/// Start `samepage` with its output piped.
pub fn spawn(args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_samepage"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start samepage")
}

/// Run, and fail the test (after killing it) if it takes longer than `secs`: for inputs that
/// once made samepage hang.
pub fn run_within(args: &[&str], secs: u64) -> Output {
    let mut child = spawn(args);
    let t0 = std::time::Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if t0.elapsed() > std::time::Duration::from_secs(secs) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} did not end within {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// Like [`err`], within `secs`.
pub fn err_within(args: &[&str], secs: u64) -> String {
    let out = run_within(args, secs);
    assert!(!out.status.success(), "expected failure for {args:?}");
    let code = out.status.code();
    assert!(
        code.is_some_and(|c| FAILURE_CODES.contains(&c)),
        "{args:?}: exit code {code:?}"
    );
    assert!(out.stdout.is_empty(), "a failure prints nothing on stdout");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Is this process root? (`/proc/self` belongs to the effective user.)
pub fn root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Say that a test could not run here, and why, where the test harness does not hide it
/// (its capture only takes `print!`/`eprint!`); the test then returns early.
pub fn skip(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "test {test} SKIPPED: {why}");
}

/// A copy of the binary that user 65534 may run, and a way to run it as that user without
/// any capability (None, said, if this is not root).
pub fn as_nobody(test: &str) -> Option<impl Fn(&[&str]) -> Output> {
    if !root() {
        skip(test, "not root: cannot drop to an unprivileged user here");
        return None;
    }
    let dir = tmpdir(&format!("nobody-{test}"));
    let bin = dir.join("samepage");
    std::fs::copy(env!("CARGO_BIN_EXE_samepage"), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    Some(move |args: &[&str]| {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
            ])
            .arg(&bin)
            .args(args)
            .current_dir("/")
            .output()
            .expect("setpriv (util-linux)")
    })
}
