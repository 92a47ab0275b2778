//! Runs benchmarks: plans the benchmark x column jobs and measures each.

use crate::marker::{BenchMarker, MARK_STOP_BASE, MarkHandle};
use crate::perf::PerfSet;
use crate::results::{Machine, Measurement, PerfValue, Status, Summary};
use deja_engine::{
    BtOptions, BuildError, EngineKind, MmuStrategy, RunEnd, RunOptions, Vm, build_vm_with,
};
use deja_guests::bench::{BENCH_MARKER_PORT, Bench, MARK_END, MARK_INSTRUCTIONS, MARK_START};
use deja_machine::devices::StopRequest;
use deja_machine::loader::Image;
use deja_machine::{ClockMode, EngineStats, LiveHost, MachineConfig};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Every MMU strategy name the harness accepts (bt's [`MmuStrategy`] names).
pub const KNOWN_MMU_STRATEGIES: &[&str] = &["tlb", "shadow", "nested"];

/// Failures of the harness itself (not of a measurement, which is recorded as failed).
#[derive(Debug, Error)]
pub enum BenchError {
    /// An engine name the harness does not know.
    #[error("unknown engine {0:?} (known: bt, kvm, native, qemu-tcg)")]
    UnknownEngine(String),
    /// An MMU strategy name the harness does not know.
    #[error("unknown MMU strategy {0:?} (known: tlb, shadow, nested)")]
    UnknownMmu(String),
    /// The filter matches no benchmark.
    #[error("no benchmark matches {0:?} (benchmarks: {1})")]
    NothingMatches(String, String),
}

/// A column of the results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    /// A deja engine.
    Engine(EngineKind),
    /// The loop run in the harness process.
    Native,
    /// QEMU's TCG, when `qemu-system-x86_64` is installed.
    QemuTcg,
}

impl Column {
    /// Parses a command-line engine name.
    pub fn parse(name: &str) -> Result<Column, BenchError> {
        match name {
            "bt" => Ok(Column::Engine(EngineKind::Bt)),
            "kvm" => Ok(Column::Engine(EngineKind::Kvm)),
            "native" => Ok(Column::Native),
            "qemu-tcg" | "qemu" => Ok(Column::QemuTcg),
            other => Err(BenchError::UnknownEngine(other.into())),
        }
    }

    /// The name results use.
    pub fn name(self) -> &'static str {
        match self {
            Column::Engine(e) => e.name(),
            Column::Native => "native",
            Column::QemuTcg => "qemu-tcg",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Columns, in order.
    pub columns: Vec<Column>,
    /// MMU strategies for bt.
    pub mmus: Vec<String>,
    /// Only benchmarks whose name contains this.
    pub filter: Option<String>,
    /// Repeats per measurement.
    pub repeat: u32,
    /// Operations per repeat for every column (default: chosen per column).
    pub iterations: Option<u32>,
    /// bt's tiers (issue #12).
    pub tier: deja_engine::Tier,
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self {
            columns: vec![
                Column::Engine(EngineKind::Bt),
                Column::Engine(EngineKind::Kvm),
                Column::Native,
                Column::QemuTcg,
            ],
            mmus: vec!["shadow".into(), "nested".into(), "tlb".into()],
            filter: None,
            repeat: 5,
            iterations: None,
            tier: deja_engine::Tier::default(),
        }
    }
}

/// One measurement to make.
#[derive(Debug, Clone)]
pub struct Job {
    /// The benchmark.
    pub bench: Bench,
    /// The column.
    pub column: Column,
    /// The MMU strategy (`host` where the column has no choice).
    pub mmu: String,
}

impl Job {
    /// `bench on column[/mmu]`, for progress lines.
    pub fn label(&self) -> String {
        if self.mmu == "host" {
            format!("{} on {}", self.bench.name(), self.column.name())
        } else {
            format!(
                "{} on {}/{}",
                self.bench.name(),
                self.column.name(),
                self.mmu
            )
        }
    }
}

/// The jobs `config` asks for, benchmark-major.
pub fn plan(config: &BenchConfig) -> Result<Vec<Job>, BenchError> {
    for m in &config.mmus {
        if !KNOWN_MMU_STRATEGIES.contains(&m.as_str()) {
            return Err(BenchError::UnknownMmu(m.clone()));
        }
    }
    let benches: Vec<Bench> = Bench::ALL
        .into_iter()
        .filter(|b| {
            config
                .filter
                .as_deref()
                .is_none_or(|f| b.name().contains(f))
        })
        .collect();
    if benches.is_empty() {
        let names: Vec<_> = Bench::ALL.iter().map(|b| b.name()).collect();
        return Err(BenchError::NothingMatches(
            config.filter.clone().unwrap_or_default(),
            names.join(", "),
        ));
    }
    let mut jobs = Vec::new();
    for bench in benches {
        for &column in &config.columns {
            match column {
                Column::Engine(EngineKind::Bt) => {
                    for mmu in &config.mmus {
                        jobs.push(Job {
                            bench,
                            column,
                            mmu: mmu.clone(),
                        });
                    }
                }
                Column::Native if !bench.runs_natively() => {}
                _ => jobs.push(Job {
                    bench,
                    column,
                    mmu: "host".into(),
                }),
            }
        }
    }
    Ok(jobs)
}

/// Operations per repeat when the command line does not say: enough for a few milliseconds
/// per repeat on each column (KVM under PVM emulates ring-0 code at about 1 µs per
/// instruction, so its counts are small).
pub fn default_iterations(column: Column) -> u32 {
    match column {
        Column::Engine(EngineKind::Kvm) => 2_000,
        Column::Engine(EngineKind::Bt) => 20_000,
        Column::Native => 1_000_000,
        // Enough that the loop takes milliseconds even for the compute loops, far above
        // the pipe's wake-up latency for the marks.
        Column::QemuTcg => 100_000,
    }
}

/// Measures one job.
pub fn run_job(job: &Job, config: &BenchConfig) -> Measurement {
    let bench = job.bench.name();
    let column = job.column.name();
    let iterations = config
        .iterations
        .unwrap_or(default_iterations(job.column))
        .max(1);
    let repeat = config.repeat.max(1);
    match job.column {
        Column::QemuTcg => {
            if !crate::qemu::on_path(crate::qemu::QEMU) {
                return Measurement::skipped(
                    bench,
                    column,
                    &job.mmu,
                    crate::qemu::QemuError::NotInstalled.to_string(),
                );
            }
            let mut ns = Vec::new();
            for _ in 0..repeat {
                match crate::qemu::run(job.bench, iterations) {
                    Ok(d) => ns.push(d.as_nanos() as f64 / f64::from(iterations)),
                    Err(e) => {
                        return Measurement {
                            status: Status::Failed {
                                error: e.to_string(),
                            },
                            ..Measurement::skipped(bench, column, &job.mmu, "")
                        };
                    }
                }
            }
            Measurement {
                status: Status::Ok,
                iterations: u64::from(iterations),
                repeats: repeat,
                ns_per_op: Summary::of(&ns),
                perf: crate::perf::events()
                    .iter()
                    .map(|(event, _)| PerfValue {
                        event: (*event).into(),
                        per_op: None,
                        unavailable: Some(
                            "QEMU runs in a child process; only its marked loop is timed".into(),
                        ),
                    })
                    .collect(),
                ..Measurement::skipped(bench, column, &job.mmu, "")
            }
        }
        Column::Native => {
            let mut ns = Vec::new();
            for _ in 0..repeat {
                match crate::native::run(job.bench, iterations) {
                    Some(d) => ns.push(d.as_nanos() as f64 / f64::from(iterations)),
                    None => {
                        return Measurement::skipped(
                            bench,
                            column,
                            &job.mmu,
                            "the operation cannot run in a host process",
                        );
                    }
                }
            }
            Measurement {
                status: Status::Ok,
                iterations: u64::from(iterations),
                repeats: repeat,
                ns_per_op: Summary::of(&ns),
                ..Measurement::skipped(bench, column, &job.mmu, "")
            }
        }
        Column::Engine(engine) => {
            let mmu = match engine {
                EngineKind::Bt => match job.mmu.parse::<MmuStrategy>() {
                    Ok(m) => Some(m),
                    Err(e) => return Measurement::skipped(bench, column, &job.mmu, e.to_string()),
                },
                EngineKind::Kvm => None,
            };
            if engine == EngineKind::Kvm
                && job.bench == Bench::Syscall
                && deja_kvm::host_info::HostInfo::detect_flavour_only()
                    == deja_kvm::host_info::Flavour::Pvm
            {
                return Measurement::skipped(
                    bench,
                    column,
                    &job.mmu,
                    "under PVM, a deja guest's SYSCALL from ring 3 reaches LSTAR still in ring 3 \
                     (observed: CS 0x3b at the handler, then a triple fault at SYSRETQ)",
                );
            }
            let mut samples = Vec::new();
            for _ in 0..repeat {
                match measure_once(job.bench, engine, (mmu, config.tier), iterations) {
                    Ok(s) => samples.push(s),
                    Err(Outcome::Unavailable(reason)) => {
                        return Measurement::skipped(bench, column, &job.mmu, reason);
                    }
                    Err(Outcome::Failed(error)) => {
                        return Measurement {
                            status: Status::Failed { error },
                            ..Measurement::skipped(bench, column, &job.mmu, "")
                        };
                    }
                }
            }
            summarize(job, iterations, &samples)
        }
    }
}

/// One repeat's deltas between the marks.
struct Sample {
    elapsed: Duration,
    counters: BTreeMap<String, u64>,
    perf: Vec<(&'static str, Result<u64, String>)>,
}

enum Outcome {
    Unavailable(String),
    Failed(String),
}

/// The machine for one repeat (`bt`: bt's strategy and tier; no strategy for kvm).
fn build(engine: EngineKind, bt: BtOptions, image: &Image) -> Result<Vm, Outcome> {
    let config = MachineConfig {
        ram_size: 16 << 20,
        ..MachineConfig::default()
    };
    let host = Box::new(LiveHost::new(ClockMode::Virtual));
    match build_vm_with(engine, config, host, Box::new(std::io::sink()), image, bt) {
        Ok(vm) => Ok(vm),
        Err(BuildError::EngineUnavailable { reason, .. }) => Err(Outcome::Unavailable(reason)),
        Err(e @ BuildError::MmuStrategy { .. }) => Err(Outcome::Unavailable(e.to_string())),
        Err(e) => Err(Outcome::Failed(e.to_string())),
    }
}

fn measure_once(
    bench: Bench,
    engine: EngineKind,
    (mmu, tier): (Option<MmuStrategy>, deja_engine::Tier),
    iterations: u32,
) -> Result<Sample, Outcome> {
    let image = bench
        .image(iterations)
        .map_err(|e| Outcome::Failed(format!("building bench-{}: {e}", bench.name())))?;
    let mut vm = build(engine, BtOptions { mmu, tier }, &image)?;
    let (marker, marks) = BenchMarker::new();
    vm.machine
        .add_device(Box::new(marker), &[(BENCH_MARKER_PORT, 1)], &[])
        .map_err(|e| Outcome::Failed(format!("adding the bench marker: {e}")))?;
    // bt counts instructions, so a runaway guest is bounded without a watchdog thread
    // (whose start would fall inside the measurement); kvm needs the host-time limit.
    let budget = u64::from(iterations) * 200 + 10_000_000;
    let mut perf = PerfSet::open();
    run_to(&mut vm, &marks, Some(MARK_START), budget)?;
    let s0 = vm.stats();
    let p0 = perf.read();
    let t0 = Instant::now();
    run_to(&mut vm, &marks, Some(MARK_END), budget)?;
    let elapsed = t0.elapsed();
    let p1 = perf.read();
    let s1 = vm.stats();
    run_to(&mut vm, &marks, None, budget)?;
    let mut counters = delta(&s0, &s1);
    // The end mark's own MOV and OUT are inside the deltas; they are not part of the loop.
    counters.remove("io.bench-marker.pio_write");
    if let Some(n) = counters.get_mut("bt.instructions") {
        *n = n.saturating_sub(MARK_INSTRUCTIONS);
    }
    if let Some(out) = counters.get_mut("exit.io_out") {
        *out -= 1;
    }
    counters.retain(|_, v| *v > 0);
    Ok(Sample {
        elapsed,
        counters,
        perf: p0
            .into_iter()
            .zip(p1)
            .map(|((name, a), (_, b))| {
                let d = match (a, b) {
                    (Ok(a), Ok(b)) => Ok(b.saturating_sub(a)),
                    (Err(e), _) | (_, Err(e)) => Err(e),
                };
                (name, d)
            })
            .collect(),
    })
}

/// Runs until the marker writes `mark` (or, for `None`, until the guest exits 0).
fn run_to(vm: &mut Vm, marks: &MarkHandle, mark: Option<u8>, budget: u64) -> Result<(), Outcome> {
    let opts = if vm.cpu.counts_instructions() {
        RunOptions {
            timeout: None,
            max_instructions: Some(vm.cpu.icount() + budget),
        }
    } else {
        RunOptions {
            timeout: Some(Duration::from_secs(120)),
            max_instructions: None,
        }
    };
    let outcome = vm
        .run(opts)
        .map_err(|e| Outcome::Failed(format!("engine error: {e}")))?;
    let seen = marks.take();
    match (&outcome.end, mark) {
        (RunEnd::Stopped(StopRequest::DebugExit { value }), Some(m))
            if *value == MARK_STOP_BASE | u32::from(m) && seen == Some(m) =>
        {
            Ok(())
        }
        (RunEnd::Stopped(StopRequest::DebugExit { value: 0 }), None) if seen.is_none() => Ok(()),
        (end, _) => Err(Outcome::Failed(format!(
            "expected {} but the run ended with {end:?} (last mark {seen:?})",
            match mark {
                Some(m) => format!("mark {m:#x}"),
                None => "debug-exit 0".to_string(),
            }
        ))),
    }
}

fn delta(before: &EngineStats, after: &EngineStats) -> BTreeMap<String, u64> {
    after
        .counters
        .iter()
        .filter_map(|(k, &v)| {
            let d = v.saturating_sub(before.get(k));
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

fn median(values: &[f64]) -> f64 {
    Summary::of(values).map_or(0.0, |s| s.median)
}

fn summarize(job: &Job, iterations: u32, samples: &[Sample]) -> Measurement {
    let ops = f64::from(iterations);
    let ns: Vec<f64> = samples
        .iter()
        .map(|s| s.elapsed.as_nanos() as f64 / ops)
        .collect();
    let keys: std::collections::BTreeSet<&String> =
        samples.iter().flat_map(|s| s.counters.keys()).collect();
    let mut exits_per_op = BTreeMap::new();
    let mut counters_per_op = BTreeMap::new();
    for key in keys {
        let values: Vec<f64> = samples
            .iter()
            .map(|s| s.counters.get(key).copied().unwrap_or(0) as f64 / ops)
            .collect();
        let target = if key.starts_with("exit.") {
            &mut exits_per_op
        } else {
            &mut counters_per_op
        };
        target.insert(key.clone(), median(&values));
    }
    let perf = crate::perf::events()
        .iter()
        .enumerate()
        .map(|(i, (event, _))| {
            let values: Result<Vec<f64>, String> = samples
                .iter()
                .map(|s| match &s.perf[i].1 {
                    Ok(v) => Ok(*v as f64 / ops),
                    Err(e) => Err(e.clone()),
                })
                .collect();
            match values {
                Ok(v) => PerfValue {
                    event: (*event).into(),
                    per_op: Some(median(&v)),
                    unavailable: None,
                },
                Err(e) => PerfValue {
                    event: (*event).into(),
                    per_op: None,
                    unavailable: Some(e),
                },
            }
        })
        .collect();
    Measurement {
        bench: job.bench.name().into(),
        engine: job.column.name().into(),
        mmu: job.mmu.clone(),
        status: Status::Ok,
        iterations: u64::from(iterations),
        repeats: samples.len() as u32,
        ns_per_op: Summary::of(&ns),
        exits_per_op,
        counters_per_op,
        perf,
    }
}

/// The host the harness runs on.
pub fn machine() -> Machine {
    let kernel = ["/proc/sys/kernel/ostype", "/proc/sys/kernel/osrelease"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .collect::<Vec<_>>()
        .join(" ");
    let memory_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        });
    let load_average = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| {
            let v: Vec<f64> = text
                .split_whitespace()
                .take(3)
                .filter_map(|x| x.parse().ok())
                .collect();
            (v.len() == 3).then(|| [v[0], v[1], v[2]])
        });
    Machine {
        kernel: format!("{kernel} {}", std::env::consts::ARCH),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        host: deja_kvm::host_info::HostInfo::detect(),
        memory_bytes,
        load_average,
        build_profile: Some(
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
            .into(),
        ),
        qemu_version: crate::qemu::version(),
    }
}

/// `git rev-parse HEAD` in the current directory, when git and a checkout are there, with
/// `+dirty` when tracked files differ from it (the numbers then come from code no revision
/// holds).
pub fn git_revision() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()?;
    let head = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || head.is_empty() {
        return None;
    }
    let clean = std::process::Command::new("git")
        .args(["diff", "--quiet", "HEAD", "--"])
        .status()
        .is_ok_and(|s| s.success());
    Some(if clean { head } else { format!("{head}+dirty") })
}
