//! The counters over time as an SVG chart: `pages_sharing`, `ksm_zero_pages` and
//! `pages_unshared` in pages (top), the memory saved in MiB (bottom); one line style per
//! engine, so that `compare` shows both on one chart.

use crate::watch::Sample;
use std::fmt::Write as _;

const W: f64 = 900.0;
const PANEL_H: f64 = 260.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 180.0;
const TOP: f64 = 50.0;
const GAP: f64 = 60.0;

type Value = fn(&Sample) -> f64;

/// The series drawn: (name, colour, panel, value).
const SERIES: [(&str, &str, usize, Value); 4] = [
    ("pages_sharing", "#1f77b4", 0, |s| s.pages_sharing as f64),
    ("ksm_zero_pages", "#2ca02c", 0, |s| s.ksm_zero_pages as f64),
    ("pages_unshared", "#ff7f0e", 0, |s| s.pages_unshared as f64),
    ("saved_bytes", "#d62728", 1, |s| {
        s.saved_bytes() as f64 / (1 << 20) as f64
    }),
];

const DASH: [&str; 2] = ["", "7 4"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A round step for about five grid lines up to `max`.
fn step(max: f64) -> f64 {
    let raw = (max / 5.0).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
}

/// The chart of `runs` (engine name, samples).
pub fn svg(title: &str, runs: &[(&str, &[Sample])]) -> String {
    let h = TOP + 2.0 * PANEL_H + GAP + 50.0;
    let pw = W - LEFT - RIGHT;
    let t_max = runs
        .iter()
        .flat_map(|(_, s)| s.iter().map(|x| x.t))
        .fold(0.0f64, f64::max)
        .max(1e-3);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="24" font-size="16" text-anchor="middle">{}</text>"#,
        W / 2.0,
        esc(title)
    );
    for (panel, unit) in [(0usize, "pages"), (1, "saved (MiB)")] {
        let y0 = TOP + panel as f64 * (PANEL_H + GAP);
        let y_max = runs
            .iter()
            .flat_map(|(_, s)| {
                SERIES
                    .iter()
                    .filter(move |x| x.2 == panel)
                    .flat_map(move |x| s.iter().map(x.3))
            })
            .fold(0.0f64, f64::max)
            .max(1.0);
        let ys = step(y_max);
        let y_top = (y_max / ys).ceil() * ys;
        let px = |t: f64| LEFT + t / t_max * pw;
        let py = |v: f64| y0 + PANEL_H - v / y_top * PANEL_H;
        let _ = writeln!(
            out,
            r##"<rect x="{LEFT}" y="{y0}" width="{pw}" height="{PANEL_H}" fill="none" stroke="#888"/>"##
        );
        let mut v = 0.0;
        while v <= y_top + ys / 2.0 {
            let y = py(v);
            let _ = writeln!(
                out,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT + pw,
                LEFT - 6.0,
                y + 4.0,
                v
            );
            v += ys;
        }
        let _ = writeln!(
            out,
            r#"<text x="16" y="{:.1}" transform="rotate(-90 16 {:.1})" text-anchor="middle">{unit}</text>"#,
            y0 + PANEL_H / 2.0,
            y0 + PANEL_H / 2.0
        );
        let ts = step(t_max);
        let mut t = 0.0;
        while t <= t_max + 1e-9 {
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                px(t),
                y0 + PANEL_H + 16.0,
                (t * 1000.0).round() / 1000.0
            );
            t += ts;
        }
        let mut legend_y = y0 + 10.0;
        for (ri, (engine, samples)) in runs.iter().enumerate() {
            for (name, colour, p, value) in SERIES.iter() {
                if *p != panel {
                    continue;
                }
                let points: Vec<String> = samples
                    .iter()
                    .map(|s| format!("{:.1},{:.1}", px(s.t), py(value(s))))
                    .collect();
                let dash = DASH[ri % DASH.len()];
                let _ = writeln!(
                    out,
                    r#"<polyline class="series" data-engine="{}" data-series="{name}" fill="none" stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}" points="{}"><title>{} {name}</title></polyline>"#,
                    esc(engine),
                    points.join(" "),
                    esc(engine)
                );
                let lx = LEFT + pw + 12.0;
                let _ = writeln!(
                    out,
                    r#"<line x1="{lx}" y1="{legend_y}" x2="{}" y2="{legend_y}" stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}"/><text x="{}" y="{:.1}">{} {name}</text>"#,
                    lx + 24.0,
                    lx + 30.0,
                    legend_y + 4.0,
                    esc(engine)
                );
                legend_y += 18.0;
            }
        }
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds since the engine started</text>"#,
        LEFT + pw / 2.0,
        h - 14.0
    );
    out.push_str("</svg>\n");
    out
}

/// Write the chart to `path`.
pub fn write(
    path: &std::path::Path,
    title: &str,
    runs: &[(&str, &[Sample])],
) -> Result<(), crate::error::CliError> {
    std::fs::write(path, svg(title, runs)).map_err(crate::error::CliError::io(format!(
        "cannot write the plot to {}",
        path.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: f64, sharing: u64, zero: i64) -> Sample {
        Sample {
            t,
            pages_shared: 1,
            pages_sharing: sharing,
            pages_unshared: 5,
            ksm_zero_pages: zero,
            full_scans: 0,
        }
    }

    #[test]
    fn chart_has_every_series_of_every_engine() {
        let a = [s(0.0, 0, 0), s(0.5, 100, 20), s(1.0, 200, 40)];
        let b = [s(0.0, 0, 0), s(2.0, 200, 40)];
        let svg = svg("t", &[("samepage", &a), ("kernel", &b)]);
        for e in ["samepage", "kernel"] {
            for (name, ..) in SERIES {
                assert!(
                    svg.contains(&format!(r#"data-engine="{e}" data-series="{name}""#)),
                    "{e} {name}"
                );
            }
        }
        assert_eq!(svg.matches("<polyline").count(), 8);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn steps_are_round() {
        assert_eq!(step(100.0), 20.0);
        assert_eq!(step(7.0), 2.0);
        assert_eq!(step(0.3), 0.1);
    }
}
