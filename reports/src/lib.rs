//! Plots and HTML/Markdown reports from `deja bench` results: ns per operation for each
//! benchmark grouped by engine and MMU strategy (log scale), exits per operation by reason
//! as stacked bars, MMU counters per strategy, an `index.html` and a `summary.md`.
//!
//! Text in plots needs a TrueType font (plotters lays text out with ab_glyph, for SVG as
//! well as PNG). The report uses DejaVu Sans or Liberation Sans from the usual system font
//! directories; without one it still draws every plot, without titles, labels and legends,
//! and says so in the summary.

use deja_bench::{BenchResults, Measurement, Status};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use thiserror::Error;

/// Failures writing a report.
#[derive(Debug, Error)]
pub enum ReportError {
    /// The output directory or a file in it could not be written.
    #[error("writing {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// plotters failed drawing a plot.
    #[error("drawing {plot}: {message}")]
    Draw {
        /// The plot's file name.
        plot: String,
        /// plotters' explanation.
        message: String,
    },
    /// No results were given.
    #[error("no results to report on")]
    Empty,
}

/// Where fonts are looked for, in order.
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Registers a system font with plotters once; whether text can be drawn.
fn text_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        FONT_PATHS.iter().any(|p| {
            std::fs::read(p).is_ok_and(|bytes| {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
            })
        })
    })
}

/// Measurements that ran, with the column label, from every result file in order.
fn ok_measurements(results: &[BenchResults]) -> Vec<&Measurement> {
    results
        .iter()
        .flat_map(|r| r.measurements.iter())
        .filter(|m| m.status == Status::Ok && m.ns_per_op.is_some())
        .collect()
}

fn ordered<'a>(items: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut seen = BTreeSet::new();
    items
        .filter(|s| seen.insert(s.to_string()))
        .map(str::to_string)
        .collect()
}

/// Writes the plots (SVG and PNG), `index.html` and `summary.md` into `dir`; returns the
/// files written.
pub fn write_report(results: &[BenchResults], dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
    if results.is_empty() {
        return Err(ReportError::Empty);
    }
    std::fs::create_dir_all(dir).map_err(|source| ReportError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let text = text_available();
    let mut written = Vec::new();
    for name in ["ns_per_op", "exits_per_op", "mmu_counters"] {
        let svg = dir.join(format!("{name}.svg"));
        {
            let root = SVGBackend::new(&svg, (1000, 560)).into_drawing_area();
            plot(name, &root, results, text).map_err(|message| ReportError::Draw {
                plot: format!("{name}.svg"),
                message,
            })?;
            root.present().map_err(|e| ReportError::Draw {
                plot: format!("{name}.svg"),
                message: e.to_string(),
            })?;
        }
        written.push(svg);
        let png = dir.join(format!("{name}.png"));
        {
            let root = BitMapBackend::new(&png, (1000, 560)).into_drawing_area();
            plot(name, &root, results, text).map_err(|message| ReportError::Draw {
                plot: format!("{name}.png"),
                message,
            })?;
            root.present().map_err(|e| ReportError::Draw {
                plot: format!("{name}.png"),
                message: e.to_string(),
            })?;
        }
        written.push(png);
    }
    let summary = summary_markdown(results, text);
    let path = dir.join("summary.md");
    write(&path, &summary)?;
    written.push(path);
    let path = dir.join("index.html");
    write(&path, &index_html(&summary))?;
    written.push(path);
    Ok(written)
}

fn write(path: &Path, text: &str) -> Result<(), ReportError> {
    std::fs::write(path, text).map_err(|source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Draws the plot called `name` on any backend.
fn plot<DB: DrawingBackend>(
    name: &str,
    root: &DrawingArea<DB, Shift>,
    results: &[BenchResults],
    text: bool,
) -> Result<(), String> {
    match name {
        "ns_per_op" => plot_ns_per_op(root, results, text),
        "exits_per_op" => plot_exits(root, results, text),
        _ => plot_mmu(root, results, text),
    }
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
];

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Grouped bars on a log axis: one group per benchmark, one bar per column.
fn plot_ns_per_op<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    results: &[BenchResults],
    text: bool,
) -> Result<(), String> {
    let ms = ok_measurements(results);
    let benches = ordered(ms.iter().map(|m| m.bench.as_str()));
    let columns = ordered(
        ms.iter()
            .map(|m| m.column())
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str),
    );
    let values: Vec<f64> = ms
        .iter()
        .filter_map(|m| m.ns_per_op.map(|s| s.median))
        .collect();
    let lo = values
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .max(1e-3)
        / 2.0;
    let hi = values.iter().copied().fold(0.0, f64::max).max(lo * 10.0) * 2.0;
    let lo = if lo.is_finite() { lo } else { 0.1 };
    bars(
        root,
        text,
        "ns per operation (median; log scale)",
        "ns/op",
        &benches,
        &columns,
        |b, c| {
            ms.iter()
                .find(|m| &m.bench == b && &m.column() == c)
                .and_then(|m| m.ns_per_op.map(|s| s.median))
        },
        lo..hi,
        true,
    )
}

/// Draws grouped bars; `log` picks a log y axis.
#[allow(clippy::too_many_arguments)]
fn bars<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    text: bool,
    title: &str,
    y_desc: &str,
    groups: &[String],
    series: &[String],
    value: impl Fn(&String, &String) -> Option<f64>,
    y: std::ops::Range<f64>,
    log: bool,
) -> Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let n = groups.len().max(1) as f64;
    let width = 0.8 / series.len().max(1) as f64;
    let mut builder = ChartBuilder::on(root);
    builder.margin(15);
    if text {
        builder
            .caption(title, ("sans-serif", 22))
            .x_label_area_size(40)
            .y_label_area_size(70);
    }
    macro_rules! draw {
        ($chart:expr, $base:expr) => {{
            let mut chart = $chart;
            let formatter = |x: &f64| {
                let i = x.round() as usize;
                if (x - x.round()).abs() < 1e-6 && i < groups.len() {
                    groups[i].clone()
                } else {
                    String::new()
                }
            };
            if text {
                let mut mesh = chart.configure_mesh();
                mesh.disable_x_mesh()
                    .y_desc(y_desc)
                    .x_labels(groups.len() + 1)
                    .x_label_formatter(&formatter);
                mesh.draw().map_err(|e| e.to_string())?;
            }
            for (si, s) in series.iter().enumerate() {
                let c = color(si);
                let rects: Vec<_> = groups
                    .iter()
                    .enumerate()
                    .filter_map(|(gi, g)| {
                        let v = value(g, s)?;
                        let x0 = gi as f64 - 0.4 + si as f64 * width;
                        Some(Rectangle::new(
                            [(x0, $base), (x0 + width * 0.9, v)],
                            c.filled(),
                        ))
                    })
                    .collect();
                let drawn = chart.draw_series(rects).map_err(|e| e.to_string())?;
                if text {
                    drawn.label(s.as_str()).legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 10, y + 5)], c.filled())
                    });
                }
            }
            if text {
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .position(SeriesLabelPosition::UpperRight)
                    .draw()
                    .map_err(|e| e.to_string())?;
            }
        }};
    }
    if log {
        let base = y.start;
        draw!(
            builder
                .build_cartesian_2d(-0.5..(n - 0.5), y.log_scale())
                .map_err(|e| e.to_string())?,
            base
        );
    } else {
        draw!(
            builder
                .build_cartesian_2d(-0.5..(n - 0.5), y)
                .map_err(|e| e.to_string())?,
            0.0
        );
    }
    Ok(())
}

/// Stacked bars: exits per operation by reason, one bar per benchmark x column that exits.
fn plot_exits<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    results: &[BenchResults],
    text: bool,
) -> Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let ms: Vec<&Measurement> = ok_measurements(results)
        .into_iter()
        .filter(|m| !m.exits_per_op.is_empty())
        .collect();
    let labels: Vec<String> = ms
        .iter()
        .map(|m| format!("{} {}", m.bench, m.column()))
        .collect();
    let reasons = ordered(
        ms.iter()
            .flat_map(|m| m.exits_per_op.keys().map(String::as_str)),
    );
    let top = ms
        .iter()
        .map(|m| m.exits_per_op.values().sum::<f64>())
        .fold(0.0, f64::max)
        .max(1e-3)
        * 1.2;
    let n = labels.len().max(1) as f64;
    let mut builder = ChartBuilder::on(root);
    builder.margin(15);
    if text {
        builder
            .caption("exits per operation by reason", ("sans-serif", 22))
            .x_label_area_size(40)
            .y_label_area_size(70);
    }
    let mut chart = builder
        .build_cartesian_2d(-0.5..(n - 0.5), 0.0..top)
        .map_err(|e| e.to_string())?;
    if text {
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_desc("exits/op")
            .x_labels(labels.len() + 1)
            .x_label_formatter(&|x: &f64| {
                let i = x.round() as usize;
                if (x - x.round()).abs() < 1e-6 && i < labels.len() {
                    labels[i].clone()
                } else {
                    String::new()
                }
            })
            .draw()
            .map_err(|e| e.to_string())?;
    }
    for (ri, reason) in reasons.iter().enumerate() {
        let c = color(ri);
        let rects: Vec<_> = ms
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                let v = *m.exits_per_op.get(reason)?;
                let below: f64 = reasons[..ri]
                    .iter()
                    .filter_map(|r| m.exits_per_op.get(r))
                    .sum();
                let x = i as f64;
                Some(Rectangle::new(
                    [(x - 0.3, below), (x + 0.3, below + v)],
                    c.filled(),
                ))
            })
            .collect();
        let drawn = chart.draw_series(rects).map_err(|e| e.to_string())?;
        if text {
            drawn
                .label(reason.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], c.filled()));
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// MMU counters per operation, grouped by counter, one bar per benchmark x strategy, for
/// the benchmarks that make the MMU do more than hit its TLB.
fn plot_mmu<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    results: &[BenchResults],
    text: bool,
) -> Result<(), String> {
    let ms: Vec<&Measurement> = ok_measurements(results)
        .into_iter()
        // Benchmarks that exercise the MMU beyond TLB hits (walks, INVLPG, guest faults);
        // the others only add bars of TLB hits.
        .filter(|m| {
            m.counters_per_op
                .iter()
                .any(|(k, v)| k.starts_with("mmu.") && k != "mmu.tlb_hit" && *v >= 0.01)
        })
        .collect();
    let counters = ordered(
        ms.iter()
            .flat_map(|m| m.counters_per_op.keys().map(String::as_str))
            .filter(|k| k.starts_with("mmu.")),
    );
    let series: Vec<String> = ms
        .iter()
        .map(|m| format!("{} {}", m.bench, m.column()))
        .collect();
    let top = ms
        .iter()
        .flat_map(|m| counters.iter().filter_map(|c| m.counters_per_op.get(c)))
        .copied()
        .fold(0.0, f64::max)
        .max(1e-3)
        * 1.2;
    bars(
        root,
        text,
        "MMU counters per operation, by strategy",
        "per op",
        &counters,
        &series,
        |counter, s| {
            let i = series.iter().position(|x| x == s)?;
            ms[i].counters_per_op.get(counter).copied()
        },
        0.0..top,
        false,
    )
}

/// The tables of the report in Markdown.
pub fn summary_markdown(results: &[BenchResults], text_in_plots: bool) -> String {
    let mut md = String::from("# deja bench report\n\n");
    for r in results {
        let _ = writeln!(
            md,
            "- host: {} ({}, {} CPUs{}), deja {} at {}, started at Unix time {}",
            r.machine.host.flavour.describe(),
            r.machine.kernel,
            r.machine.cpus,
            r.machine
                .host
                .cpu_model
                .as_deref()
                .map(|m| format!(", {m}"))
                .unwrap_or_default(),
            r.deja_version,
            r.git_revision.as_deref().unwrap_or("(unknown revision)"),
            r.started_unix
        );
    }
    md.push_str(
        "\n![ns per operation](ns_per_op.svg)\n![exits per operation](exits_per_op.svg)\n\
         ![MMU counters](mmu_counters.svg)\n\n",
    );
    if !text_in_plots {
        md.push_str(
            "Note: no TrueType font was found, so the plots have no titles, labels or legends; \
             the tables below carry the numbers.\n\n",
        );
    }
    md.push_str("## ns per operation (median [min, max] over the repeats)\n\n");
    let all: Vec<&Measurement> = results.iter().flat_map(|r| r.measurements.iter()).collect();
    let benches = ordered(all.iter().map(|m| m.bench.as_str()));
    let columns = ordered(
        all.iter()
            .map(|m| m.column())
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str),
    );
    let _ = writeln!(md, "| bench | {} |", columns.join(" | "));
    let _ = writeln!(md, "|---|{}", "---:|".repeat(columns.len()));
    for b in &benches {
        let cells: Vec<String> = columns
            .iter()
            .map(
                |c| match all.iter().find(|m| &m.bench == b && &m.column() == c) {
                    None => String::new(),
                    Some(m) => match (&m.status, m.ns_per_op) {
                        (Status::Ok, Some(s)) => {
                            format!("{:.1} [{:.1}, {:.1}]", s.median, s.min, s.max)
                        }
                        (Status::Skipped { .. }, _) => "skipped".into(),
                        (Status::Failed { .. }, _) => "FAILED".into(),
                        (Status::Ok, None) => "-".into(),
                    },
                },
            )
            .collect();
        let _ = writeln!(md, "| {b} | {} |", cells.join(" | "));
    }
    md.push_str("\n## exits and counters per operation\n\n| bench | column | exits/op | other counters/op |\n|---|---|---|---|\n");
    for m in all.iter().filter(|m| m.status == Status::Ok) {
        let fmt = |map: &BTreeMap<String, f64>| {
            map.iter()
                .map(|(k, v)| format!("{k} {v:.3}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            m.bench,
            m.column(),
            fmt(&m.exits_per_op),
            fmt(&m.counters_per_op)
        );
    }
    md.push_str("\n## host perf counters per operation\n\n");
    let mut unavailable = BTreeMap::new();
    for m in all
        .iter()
        .filter(|m| m.status == Status::Ok && !m.perf.is_empty())
    {
        let vals: Vec<String> = m
            .perf
            .iter()
            .filter_map(|p| p.per_op.map(|v| format!("{} {v:.3}", p.event)))
            .collect();
        for p in &m.perf {
            if let Some(e) = &p.unavailable {
                unavailable.insert(p.event.clone(), e.clone());
            }
        }
        let _ = writeln!(md, "- {} {}: {}", m.bench, m.column(), vals.join(", "));
    }
    for (event, why) in unavailable {
        let _ = writeln!(md, "- {event}: unavailable on this host ({why})");
    }
    md.push_str("\n## not measured\n\n");
    for m in all.iter() {
        match &m.status {
            Status::Skipped { reason } => {
                let _ = writeln!(md, "- {} on {}: skipped: {reason}", m.bench, m.column());
            }
            Status::Failed { error } => {
                let _ = writeln!(md, "- {} on {}: FAILED: {error}", m.bench, m.column());
            }
            Status::Ok => {}
        }
    }
    md.push_str(
        "- recording overhead and trace size: not measured yet (the harness does not run \
         the recorder)\n",
    );
    md
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `index.html`: the plots and the summary's text (as preformatted Markdown).
fn index_html(summary: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>deja bench report</title>\
         </head><body>\n<h1>deja bench report</h1>\n\
         <p><img src=\"ns_per_op.svg\" alt=\"ns per operation\"></p>\n\
         <p><img src=\"exits_per_op.svg\" alt=\"exits per operation\"></p>\n\
         <p><img src=\"mmu_counters.svg\" alt=\"MMU counters\"></p>\n\
         <pre>{}</pre>\n</body></html>\n",
        escape(summary)
    )
}
