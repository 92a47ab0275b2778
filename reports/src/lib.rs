//! Plots and HTML/Markdown reports from `deja bench` results: ns per operation for each
//! benchmark grouped by engine and MMU strategy (log scale), exits per operation by reason
//! as stacked bars, MMU counters per strategy (one panel per benchmark that makes the MMU
//! work), recording overhead and trace size (from `deja bench --record-replay`), an
//! `index.html` and a `summary.md`.
//!
//! Text in plots needs a TrueType font (plotters lays text out with ab_glyph, for SVG as
//! well as PNG). The report embeds DejaVu Sans (`reports/fonts`, with its license), so the
//! plots look the same whatever fonts the machine drawing them has.

use deja_bench::record::RecordReplayMeasurement;
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
    /// The embedded font could not be registered with plotters.
    #[error("registering the embedded DejaVu Sans font with plotters: {0}")]
    Font(String),
    /// No results were given.
    #[error("no results to report on")]
    Empty,
}

/// DejaVu Sans 2.37 (Bitstream Vera license, `reports/fonts/LICENSE-DejaVu.txt`).
const FONT: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");
/// The family name plots ask for; bound to [`FONT`].
const FAMILY: &str = "sans-serif";

/// Registers the embedded font with plotters (once per process).
fn register_font() -> Result<(), ReportError> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
                .map_err(|_| "ab_glyph cannot parse the embedded font".to_string())
        })
        .clone()
        .map_err(ReportError::Font)
}

/// Measurements that ran, from every result file in order.
fn ok_measurements(results: &[BenchResults]) -> Vec<&Measurement> {
    results
        .iter()
        .flat_map(|r| r.measurements.iter())
        .filter(|m| m.status == Status::Ok && m.ns_per_op.is_some())
        .collect()
}

/// The distinct items in first-seen order.
fn ordered<'a>(items: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut seen = BTreeSet::new();
    items
        .filter(|s| seen.insert(s.to_string()))
        .map(str::to_string)
        .collect()
}

/// A plot: its file stem, its size, and how it is drawn.
struct PlotSpec {
    name: &'static str,
    size: (u32, u32),
}

/// The plots `results` call for: the MMU panel grid grows with the benchmarks in it, and
/// the recording plot is drawn only when the results hold record/replay measurements.
fn plots(results: &[BenchResults]) -> Vec<PlotSpec> {
    let mut specs = vec![
        PlotSpec {
            name: "ns_per_op",
            size: (1400, 640),
        },
        PlotSpec {
            name: "exits_per_op",
            size: (1400, 600),
        },
    ];
    let panels = mmu_benches(results).len();
    if panels > 0 {
        specs.push(PlotSpec {
            name: "mmu_counters",
            size: (1400, 380 * panels.div_ceil(2) as u32),
        });
    }
    if !recorded(results).is_empty() {
        specs.push(PlotSpec {
            name: "recording",
            size: (1400, 900),
        });
    }
    specs
}

/// Writes the plots (SVG and PNG), `index.html` and `summary.md` into `dir`; returns the
/// files written.
pub fn write_report(results: &[BenchResults], dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
    if results.is_empty() {
        return Err(ReportError::Empty);
    }
    register_font()?;
    std::fs::create_dir_all(dir).map_err(|source| ReportError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let specs = plots(results);
    let mut written = Vec::new();
    for spec in &specs {
        let draw_err = |file: String| {
            move |message: String| ReportError::Draw {
                plot: file,
                message,
            }
        };
        let svg = dir.join(format!("{}.svg", spec.name));
        {
            let root = SVGBackend::new(&svg, spec.size).into_drawing_area();
            plot(spec.name, &root, results).map_err(draw_err(format!("{}.svg", spec.name)))?;
            root.present()
                .map_err(|e| draw_err(format!("{}.svg", spec.name))(e.to_string()))?;
        }
        written.push(svg);
        let png = dir.join(format!("{}.png", spec.name));
        {
            let root = BitMapBackend::new(&png, spec.size).into_drawing_area();
            plot(spec.name, &root, results).map_err(draw_err(format!("{}.png", spec.name)))?;
            root.present()
                .map_err(|e| draw_err(format!("{}.png", spec.name))(e.to_string()))?;
        }
        written.push(png);
    }
    let names: Vec<&str> = specs.iter().map(|s| s.name).collect();
    let summary = summary_markdown(results, &names);
    let path = dir.join("summary.md");
    write(&path, &summary)?;
    written.push(path);
    let path = dir.join("index.html");
    write(&path, &index_html(&summary, &names))?;
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
) -> Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    match name {
        "ns_per_op" => plot_ns_per_op(root, results),
        "exits_per_op" => plot_exits(root, results),
        "mmu_counters" => plot_mmu(root, results),
        "recording" => plot_recording(root, results),
        other => Err(format!("no plot called {other}")),
    }
}

const PALETTE: [RGBColor; 10] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x17, 0xbe, 0xcf),
];

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// The lower and upper bound of a log axis over `values` (positive ones), with headroom
/// above for the legend.
fn log_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let positive: Vec<f64> = values.filter(|v| *v > 0.0 && v.is_finite()).collect();
    let lo = positive.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = positive.iter().copied().fold(0.0, f64::max);
    if !lo.is_finite() {
        return 0.1..10.0;
    }
    let lo = lo / 2.0;
    lo..(hi.max(lo * 10.0) * 30.0)
}

/// Grouped bars on a log axis: one group per benchmark, one bar per column.
fn plot_ns_per_op<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    results: &[BenchResults],
) -> Result<(), String> {
    let ms = ok_measurements(results);
    let benches = ordered(ms.iter().map(|m| m.bench.as_str()));
    let columns = column_order(&ms);
    let y = log_range(ms.iter().filter_map(|m| m.ns_per_op.map(|s| s.median)));
    bars(
        root,
        &Bars {
            title: "host ns per operation (median over repeats; log scale)",
            y_desc: "ns/op",
            groups: &benches,
            series: &columns,
            log: true,
        },
        |b, c| {
            ms.iter()
                .find(|m| &m.bench == b && &m.column() == c)
                .and_then(|m| m.ns_per_op.map(|s| s.median))
        },
        y,
    )
}

/// Columns in a fixed, readable order: bt strategies, kvm, qemu-tcg, native, then others.
fn column_order(ms: &[&Measurement]) -> Vec<String> {
    let mut columns = ordered(
        ms.iter()
            .map(|m| m.column())
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str),
    );
    let rank = |c: &str| match c {
        "bt/shadow" => 0,
        "bt/nested" => 1,
        "bt/tlb" => 2,
        "kvm" => 3,
        "qemu-tcg" => 4,
        "native" => 5,
        _ => 6,
    };
    columns.sort_by_key(|c| rank(c));
    columns
}

/// What [`bars`] draws.
struct Bars<'a> {
    title: &'a str,
    y_desc: &'a str,
    groups: &'a [String],
    series: &'a [String],
    log: bool,
}

/// Draws grouped bars: one group per `groups` entry, one bar per `series` entry.
fn bars<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    spec: &Bars<'_>,
    value: impl Fn(&String, &String) -> Option<f64>,
    y: std::ops::Range<f64>,
) -> Result<(), String> {
    let groups = spec.groups;
    let n = groups.len().max(1) as f64;
    let width = 0.8 / spec.series.len().max(1) as f64;
    let mut builder = ChartBuilder::on(root);
    builder
        .margin(15)
        .caption(spec.title, (FAMILY, 22))
        .x_label_area_size(40)
        .y_label_area_size(70);
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
            chart
                .configure_mesh()
                .disable_x_mesh()
                .y_desc(spec.y_desc)
                .x_labels(groups.len() + 1)
                .x_label_formatter(&formatter)
                .x_label_style((FAMILY, 13))
                .draw()
                .map_err(|e| e.to_string())?;
            for (si, s) in spec.series.iter().enumerate() {
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
                chart
                    .draw_series(rects)
                    .map_err(|e| e.to_string())?
                    .label(s.as_str())
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 10, y + 5)], c.filled())
                    });
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(|e| e.to_string())?;
        }};
    }
    if spec.log {
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
) -> Result<(), String> {
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
        * 1.6;
    let n = labels.len().max(1) as f64;
    let mut chart = ChartBuilder::on(root)
        .margin(15)
        .caption(
            "exits to deja per operation by reason (kvm; bt handles devices without exiting)",
            (FAMILY, 22),
        )
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5..(n - 0.5), 0.0..top)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc("exits/op")
        .x_labels(labels.len() + 1)
        .x_label_style((FAMILY, 12))
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
        chart
            .draw_series(rects)
            .map_err(|e| e.to_string())?
            .label(reason.trim_start_matches("exit."))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], c.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// KVM's own MMU statistics (binary stats, `kvm.stat.vm.*` / `kvm.stat.vcpu.*`) that bt's
/// MMU counters are named after: for the kvm column they are the host KVM's shadow or
/// two-dimensional paging at work (PVM: shadow paging).
const KVM_MMU_STATS: &[&str] = &[
    "pf_fixed",
    "pf_guest",
    "mmu_pte_write",
    "mmu_flooded",
    "mmu_shadow_zapped",
    "mmu_cache_miss",
    "mmu_unsync",
    "mmu_recycled",
    "tlb_flush",
    "invlpg",
];

/// A measurement's MMU counters per operation, without the `mmu.` prefix: bt's own, or for
/// kvm the host KVM's statistics of the same names.
fn mmu_counters(m: &Measurement) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (k, v) in &m.counters_per_op {
        if let Some(name) = k.strip_prefix("mmu.") {
            out.insert(name.to_string(), *v);
        } else if let Some(name) = k
            .strip_prefix("kvm.stat.vm.")
            .or_else(|| k.strip_prefix("kvm.stat.vcpu."))
            .filter(|n| KVM_MMU_STATS.contains(n))
        {
            *out.entry(name.to_string()).or_insert(0.0) += *v;
        }
    }
    out
}

/// Whether the MMU did more than hit its TLB in a good share of the operations (not only
/// on the first touches of a page).
fn mmu_works(m: &Measurement) -> bool {
    mmu_counters(m)
        .iter()
        .any(|(k, v)| k != "tlb_hit" && *v >= 0.05)
}

/// Benchmarks that make the MMU do more than hit its TLB (walks, INVLPG, guest faults,
/// shadow-table work), in first-seen order.
fn mmu_benches(results: &[BenchResults]) -> Vec<String> {
    let ms = ok_measurements(results);
    ordered(ms.iter().filter(|m| mmu_works(m)).map(|m| m.bench.as_str()))
}

/// MMU counters per operation: one panel per benchmark that makes the MMU work, counters
/// along x, one bar per column (bt's strategies; kvm with the host KVM's counters), log
/// scale.
fn plot_mmu<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    results: &[BenchResults],
) -> Result<(), String> {
    let benches = mmu_benches(results);
    let ms = ok_measurements(results);
    let rows = benches.len().div_ceil(2).max(1);
    let panels = root.split_evenly((rows, 2));
    for (bench, area) in benches.iter().zip(panels.iter()) {
        // The columns that have an MMU to count.
        let runs: Vec<(&Measurement, BTreeMap<String, f64>)> = ms
            .iter()
            .filter(|m| &m.bench == bench)
            .map(|m| (*m, mmu_counters(m)))
            .filter(|(_, c)| !c.is_empty())
            .collect();
        let counters = ordered(
            runs.iter()
                .flat_map(|(_, c)| c.iter())
                .filter(|(_, v)| **v >= 0.01)
                .map(|(k, _)| k.as_str()),
        );
        let columns = column_order(&runs.iter().map(|(m, _)| *m).collect::<Vec<_>>());
        let y = log_range(
            runs.iter()
                .flat_map(|(_, c)| counters.iter().filter_map(|k| c.get(k)))
                .copied(),
        );
        let title = format!("{bench}: MMU counters per operation (log scale)");
        bars(
            area,
            &Bars {
                title: &title,
                y_desc: "per op",
                groups: &counters,
                series: &columns,
                log: true,
            },
            |counter, column| {
                let (_, c) = runs.iter().find(|(m, _)| &m.column() == column)?;
                c.get(counter).copied().filter(|v| *v >= 0.01)
            },
            y,
        )?;
    }
    Ok(())
}

/// The record/replay measurements that ran (`deja bench --record-replay`).
fn recorded(results: &[BenchResults]) -> Vec<&RecordReplayMeasurement> {
    results
        .iter()
        .flat_map(|r| r.record_replay.iter())
        .filter(|m| m.status == Status::Ok)
        .collect()
}

/// The label of a record/replay measurement: guest, engine and clock.
fn rr_label(m: &RecordReplayMeasurement) -> String {
    format!("{} ({}, {} clock)", m.guest, m.engine, m.clock)
}

/// Recording overhead and trace size: host ns per guest instruction of a plain run, a
/// recording and a replay (log scale), and trace bytes per second of guest time.
fn plot_recording<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    results: &[BenchResults],
) -> Result<(), String> {
    let ms = recorded(results);
    let guests: Vec<String> = ms.iter().map(|m| rr_label(m)).collect();
    let (top, bottom) = root.split_vertically(480);
    let kinds = ["plain run".to_string(), "recording".into(), "replay".into()];
    let find = |g: &String| ms.iter().find(|m| &rr_label(m) == g);
    let y = log_range(
        ms.iter()
            .flat_map(|m| m.ns_per_instruction.unwrap_or_default()),
    );
    bars(
        &top,
        &Bars {
            title: "host ns per guest instruction: plain, recording, replay (log scale)",
            y_desc: "ns/instruction",
            groups: &guests,
            series: &kinds,
            log: true,
        },
        |g, kind| {
            let i = kinds.iter().position(|k| k == kind)?;
            find(g)?.ns_per_instruction.map(|v| v[i])
        },
        y,
    )?;
    let series = ["trace bytes per guest second".to_string()];
    let y = log_range(ms.iter().filter_map(|m| m.trace_bytes_per_guest_second));
    bars(
        &bottom,
        &Bars {
            title: "trace size: compressed bytes per second of guest time (log scale)",
            y_desc: "bytes/s",
            groups: &guests,
            series: &series,
            log: true,
        },
        |g, _| find(g)?.trace_bytes_per_guest_second,
        y,
    )
}

/// The tables of the report in Markdown; `plots` are the plot files (stems) written.
pub fn summary_markdown(results: &[BenchResults], plots: &[&str]) -> String {
    let mut md = String::from("# deja bench report\n\n");
    for r in results {
        let m = &r.machine;
        let _ = writeln!(
            md,
            "- host: {} ({}, {} CPUs{}{}), deja {} ({} build) at {}, started at Unix time {}",
            m.host.flavour.describe(),
            m.kernel,
            m.cpus,
            m.host
                .cpu_model
                .as_deref()
                .map(|c| format!(", {c}"))
                .unwrap_or_default(),
            m.memory_bytes
                .map(|b| format!(", {} MiB RAM", b >> 20))
                .unwrap_or_default(),
            r.deja_version,
            m.build_profile.as_deref().unwrap_or("unknown"),
            r.git_revision.as_deref().unwrap_or("(unknown revision)"),
            r.started_unix
        );
        if let Some(load) = m.load_average {
            let _ = writeln!(
                md,
                "  - load average at the start: {:.2} {:.2} {:.2} (1, 5, 15 min) on {} CPUs{}",
                load[0],
                load[1],
                load[2],
                m.cpus,
                if load[0] > m.cpus as f64 * 0.5 {
                    ": a loaded machine; expect noisy timings (compare min columns)"
                } else {
                    ""
                }
            );
        }
        let _ = writeln!(
            md,
            "  - qemu-tcg peer: {}",
            m.qemu_version
                .as_deref()
                .unwrap_or("not installed (or not recorded)")
        );
    }
    md.push('\n');
    for p in plots {
        let _ = writeln!(md, "![{}]({p}.svg)", p.replace('_', " "));
    }
    md.push('\n');
    md.push_str("## ns per operation (median [min, max] over the repeats)\n\n");
    let all: Vec<&Measurement> = results.iter().flat_map(|r| r.measurements.iter()).collect();
    let benches = ordered(all.iter().map(|m| m.bench.as_str()));
    let columns = column_order(&all);
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
    mmu_table(&mut md, &all);
    recording_table(&mut md, results);
    md.push_str(
        "\n## exits and counters per operation\n\n\
         Exits (`exit.*`) are kvm's returns to deja; `bt.*` the translation cache, `mmu.*` \
         the MMU strategy, `io.*` device accesses, `kvm.stat.*` KVM's own binary statistics.\n\n\
         | bench | column | exits/op | other counters/op |\n|---|---|---|---|\n",
    );
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
                unavailable
                    .entry((p.event.clone(), e.clone()))
                    .or_insert_with(Vec::new)
                    .push(m.column());
            }
        }
        if !vals.is_empty() {
            let _ = writeln!(md, "- {} {}: {}", m.bench, m.column(), vals.join(", "));
        }
    }
    for ((event, why), columns) in unavailable {
        let columns = ordered(columns.iter().map(String::as_str));
        let _ = writeln!(md, "- {event}: unavailable ({}): {why}", columns.join(", "));
    }
    md.push_str("\n## not measured\n\n");
    for m in &all {
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
    for m in results.iter().flat_map(|r| r.record_replay.iter()) {
        match &m.status {
            Status::Skipped { reason } => {
                let _ = writeln!(md, "- record/replay of {}: skipped: {reason}", rr_label(m));
            }
            Status::Failed { error } => {
                let _ = writeln!(md, "- record/replay of {}: FAILED: {error}", rr_label(m));
            }
            Status::Ok => {}
        }
    }
    if results.iter().all(|r| r.record_replay.is_empty()) {
        md.push_str(
            "- recording overhead and trace size: not measured in these results \
             (`deja bench --record-replay` measures them)\n",
        );
    }
    md
}

/// MMU counters per operation, one row per benchmark x column that makes the MMU work.
fn mmu_table(md: &mut String, all: &[&Measurement]) {
    let rows: Vec<(&Measurement, BTreeMap<String, f64>)> = all
        .iter()
        .filter(|m| m.status == Status::Ok && mmu_works(m))
        .map(|m| (*m, mmu_counters(m)))
        .collect();
    if rows.is_empty() {
        return;
    }
    let counters = ordered(rows.iter().flat_map(|(_, c)| c.keys()).map(String::as_str));
    md.push_str(
        "\n## MMU counters per operation, by strategy\n\n\
         bt's columns count its own MMU; the kvm column shows the host KVM's statistics of the \
         same names (`kvm.stat.*`; on PVM its shadow paging).\n\n",
    );
    let _ = writeln!(md, "| bench | column | {} |", counters.join(" | "));
    let _ = writeln!(md, "|---|---|{}", "---:|".repeat(counters.len()));
    for (m, c) in rows {
        let cells: Vec<String> = counters
            .iter()
            .map(|k| c.get(k).map_or(String::new(), |v| format!("{v:.2}")))
            .collect();
        let _ = writeln!(
            md,
            "| {} | {} | {} |",
            m.bench,
            m.column(),
            cells.join(" | ")
        );
    }
}

/// Recording overhead, replay speed and trace size, per recorded guest.
fn recording_table(md: &mut String, results: &[BenchResults]) {
    let rows = recorded(results);
    if rows.is_empty() {
        return;
    }
    md.push_str(
        "\n## recording overhead, replay speed and trace size\n\n\
         Host ns per guest instruction (median over the repeats) of a plain run, a recording \
         and a verified replay of the same guest; overhead is recording over plain minus one, \
         replay speed recording over replay.\n\n\
         | guest | engine | clock | instructions | exits | events | trace bytes | ns/insn plain | recording | replay | overhead | replay speed | trace bytes/guest s | bytes/event |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".to_string(), f);
    for m in rows {
        let ns = m.ns_per_instruction;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            m.guest,
            m.engine,
            m.clock,
            m.icount,
            m.exits,
            m.events,
            m.trace_bytes,
            opt(ns.map(|v| v[0]), &|v| format!("{v:.2}")),
            opt(ns.map(|v| v[1]), &|v| format!("{v:.2}")),
            opt(ns.map(|v| v[2]), &|v| format!("{v:.2}")),
            opt(m.record_overhead, &|v| format!("{:+.1}%", v * 100.0)),
            opt(m.replay_speed, &|v| format!("{v:.2}x")),
            opt(m.trace_bytes_per_guest_second, &|v| format!("{v:.0}")),
            opt(m.trace_bytes_per_event, &|v| format!("{v:.2}")),
        );
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `index.html`: the plots and the summary's text (as preformatted Markdown).
fn index_html(summary: &str, plots: &[&str]) -> String {
    let images: String = plots
        .iter()
        .map(|p| {
            format!(
                "<p><a href=\"{p}.svg\"><img src=\"{p}.png\" alt=\"{}\" style=\"max-width:100%\"></a></p>\n",
                p.replace('_', " ")
            )
        })
        .collect();
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>deja bench report</title>\
         </head><body>\n<h1>deja bench report</h1>\n{images}<pre>{}</pre>\n</body></html>\n",
        escape(summary)
    )
}
