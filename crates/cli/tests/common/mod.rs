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

/// Run; it must fail (exit code 1 for refused input, 2 for bad usage) and say why on stderr.
pub fn err(args: &[&str]) -> String {
    let out = samepage(args);
    assert!(!out.status.success(), "expected failure for {args:?}");
    let code = out.status.code();
    assert!(matches!(code, Some(1) | Some(2)), "exit code {code:?}");
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
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
