//! `deja bench`: nanobenchmarks across engines and MMU strategies.

use anyhow::Context;
use clap::Args;
use deja_bench::runner::{self, BenchConfig, Column};
use deja_bench::{BenchResults, Status};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `deja bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Columns: bt, kvm, native (benchmarks that can run in a host process), qemu-tcg (the
    /// same guest image under `qemu-system-x86_64 -accel tcg`, when it is installed).
    #[arg(long, value_delimiter = ',', default_value = "bt,kvm,native,qemu-tcg")]
    pub engines: Vec<String>,
    /// bt's MMU strategies: shadow, nested, tlb (kvm, qemu-tcg and native always use the
    /// host's MMU).
    #[arg(long, value_delimiter = ',', default_value = "shadow,nested,tlb")]
    pub mmu: Vec<String>,
    /// bt's tiers: 0 (the micro-op interpreter), 1 (every block compiled) or auto.
    #[arg(long, value_name = "TIER", default_value = "auto")]
    pub tier: deja_engine::Tier,
    /// Only benchmarks whose name contains PATTERN.
    #[arg(long, value_name = "PATTERN")]
    pub filter: Option<String>,
    /// Repeats per measurement (ns/op is reported as median, min and max over them).
    #[arg(long, default_value_t = 5)]
    pub repeat: u32,
    /// Operations per repeat on every column (default: chosen per engine, small on kvm).
    #[arg(long, value_name = "N")]
    pub iterations: Option<u32>,
    /// Write the results as JSON to FILE (read by `deja report`).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Also measure record/replay on bt: recording overhead against a plain run, trace
    /// bytes per guest second and per event, replay speed against recording (JSON field
    /// `record_replay`).
    #[arg(long)]
    pub record_replay: bool,
    /// Only the record/replay measurements (no nanobenchmarks).
    #[arg(long, conflicts_with = "record_replay")]
    pub record_replay_only: bool,
    /// Guests for the record/replay measurements.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "GUEST,...",
        default_value = "racy-kernel,timer"
    )]
    pub record_guests: Vec<String>,
    /// Also measure a Linux boot (a `linux-boot` row in the record/replay table, implies
    /// --record-replay unless --record-replay-only): the kernel booted on bt with --initrd
    /// and --append, whose init must power the machine off; plain run, recording, replay,
    /// seeks, and the same boot under qemu-tcg when that column is on and QEMU installed.
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// The initramfs of --kernel.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// The kernel command line of --kernel.
    #[arg(
        long,
        value_name = "ARGS",
        requires = "kernel",
        default_value = "console=ttyS0 panic=-1"
    )]
    pub append: String,
    /// Guest RAM of the --kernel workload.
    #[arg(long, value_name = "SIZE", requires = "kernel", default_value = "512M", value_parser = super::run::parse_mem)]
    pub mem: u64,
    /// Runs of each kind for the --kernel workload (a boot takes a minute).
    #[arg(long, value_name = "N", requires = "kernel", default_value_t = 1)]
    pub kernel_repeat: u32,
    /// How deja enters the --kernel workload's kernel, as `deja run --kernel-entry`:
    /// boot-protocol (a bzImage's default) or pvh (a vmlinux's default; a bzImage's payload
    /// is decompressed by deja). The qemu-tcg column boots the file as QEMU does.
    #[arg(long, value_enum, value_name = "ENTRY", requires = "kernel")]
    pub kernel_entry: Option<super::run::KernelEntryArg>,
}

/// Runs `deja bench`.
pub fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let columns = args
        .engines
        .iter()
        .map(|e| Column::parse(e.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    let config = BenchConfig {
        columns,
        mmus: args.mmu.iter().map(|m| m.trim().to_string()).collect(),
        filter: args.filter.clone(),
        repeat: args.repeat,
        iterations: args.iterations,
        tier: args.tier,
    };
    let jobs = if args.record_replay_only {
        Vec::new()
    } else {
        runner::plan(&config)?
    };
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let machine = runner::machine();
    let bar = ProgressBar::new(jobs.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed} (eta {eta}) {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut measurements = Vec::with_capacity(jobs.len());
    for job in &jobs {
        bar.set_message(job.label());
        measurements.push(runner::run_job(job, &config));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let record_replay = if args.record_replay || args.record_replay_only || args.kernel.is_some() {
        let rr = deja_bench::record::RecordBenchConfig {
            guests: args.record_guests.clone(),
            repeat: args.repeat,
            ..Default::default()
        };
        let bar = ProgressBar::new(rr.guests.len() as u64 + u64::from(args.kernel.is_some()));
        let mut out = Vec::new();
        for g in &rr.guests {
            bar.set_message(format!("record/replay {g}"));
            out.push(deja_bench::record::measure(g, &rr));
            bar.inc(1);
        }
        if let Some(kernel) = &args.kernel {
            bar.set_message("record/replay linux-boot");
            out.push(linux_boot(&args, kernel, &config)?);
            bar.inc(1);
        }
        bar.finish_and_clear();
        out
    } else {
        Vec::new()
    };
    let results = BenchResults {
        format_version: deja_bench::results::FORMAT_VERSION,
        deja_version: env!("CARGO_PKG_VERSION").to_string(),
        git_revision: runner::git_revision(),
        started_unix,
        machine,
        measurements,
        record_replay,
    };
    print_table(&results);
    if !results.record_replay.is_empty() {
        print!("{}", deja_bench::record::table(&results.record_replay));
    }
    if let Some(path) = &args.json {
        let text = results.to_json().context("serializing the results")?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        println!("results written to {}", path.display());
    }
    let failed = results
        .measurements
        .iter()
        .map(|m| &m.status)
        .chain(results.record_replay.iter().map(|m| &m.status))
        .any(|s| matches!(s, Status::Failed { .. }));
    Ok(if failed {
        ExitCode::from(super::EXIT_DEJA_ERROR)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_table(results: &BenchResults) {
    println!(
        "host: {} ({}), deja {} {}",
        results.machine.host.flavour.describe(),
        results.machine.kernel,
        results.deja_version,
        results
            .git_revision
            .as_deref()
            .unwrap_or("(no git revision)")
    );
    println!(
        "{:<10} {:<12} {:>12} {:>12} {:>12} {:>10}  exits/op",
        "bench", "column", "ns/op", "min", "max", "iters"
    );
    for m in &results.measurements {
        match (&m.status, &m.ns_per_op) {
            (Status::Ok, Some(ns)) => {
                let exits: Vec<String> = m
                    .exits_per_op
                    .iter()
                    .map(|(k, v)| format!("{}={v:.2}", k.trim_start_matches("exit.")))
                    .collect();
                println!(
                    "{:<10} {:<12} {:>12.1} {:>12.1} {:>12.1} {:>10}  {}",
                    m.bench,
                    m.column(),
                    ns.median,
                    ns.min,
                    ns.max,
                    m.iterations,
                    exits.join(" ")
                );
            }
            (Status::Skipped { reason }, _) => {
                println!("{:<10} {:<12} skipped: {reason}", m.bench, m.column());
            }
            (Status::Failed { error }, _) => {
                println!("{:<10} {:<12} FAILED: {error}", m.bench, m.column());
            }
            (Status::Ok, None) => println!("{:<10} {:<12} (no timing)", m.bench, m.column()),
        }
    }
}

/// The `linux-boot` record/replay row: `kernel` with the --initrd and --append of `args`.
fn linux_boot(
    args: &BenchArgs,
    kernel: &std::path::Path,
    config: &BenchConfig,
) -> anyhow::Result<deja_bench::record::RecordReplayMeasurement> {
    let mut image = deja_machine::loader::Image::from_file(kernel)
        .with_context(|| format!("loading {}", kernel.display()))?;
    if let Some(entry) = args.kernel_entry {
        image.set_kernel_entry(entry.into(), args.mem)?;
    }
    if let Some(initrd) = &args.initrd {
        image.initrd = Some(Box::new(deja_machine::loader::Image {
            name: initrd.display().to_string(),
            bytes: deja_machine::loader::read_file_bounded(
                initrd,
                deja_machine::loader::MAX_IMAGE_FILE,
            )?,
            format: deja_machine::loader::ImageFormat::Linux,
            initrd: None,
        }));
    }
    let timeout = std::time::Duration::from_secs(1800);
    let rr = deja_bench::record::RecordBenchConfig {
        guests: Vec::new(),
        repeat: args.kernel_repeat,
        ram_size: args.mem,
        timeout,
        cmdline: Some(args.append.clone()),
        ..Default::default()
    };
    let mut m = deja_bench::record::measure_image("linux-boot", &image, &rr);
    if config.columns.contains(&Column::QemuTcg) {
        m.qemu_tcg_seconds = deja_bench::qemu::boot_linux(
            kernel,
            args.initrd.as_deref(),
            &args.append,
            args.mem,
            timeout,
        )
        .map(|d| d.as_secs_f64())
        .inspect_err(|e| eprintln!("deja: qemu-tcg linux-boot: {e}"))
        .ok();
    }
    Ok(m)
}
