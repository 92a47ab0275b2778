//! Record/replay performance: what recording costs against a plain run, how big traces
//! are, and how fast a trace replays.
//!
//! Each workload (a built-in guest on bt) runs three ways, [`RecordBenchConfig::repeat`]
//! times each: a plain run with a live host, a recording (trace written to a temporary
//! file, digests and checkpoints at the recorder's defaults), and a verified replay of that
//! recording. The guest time is virtual by default, so the three runs execute exactly the
//! same instructions and their host times compare directly; per-instruction rates make the
//! host-clock variant comparable too. Host times are the run loop's only (machine building
//! and trace opening are left out), so short guests are not dominated by set-up.
//!
//! Targets (issue #4): [`RecordReplayMeasurement::record_overhead`] at most 0.10, and
//! [`RecordReplayMeasurement::replay_speed`] at least 1.0.

use crate::results::{Status, Summary};
use deja_engine::{EngineKind, RunOptions, build_vm};
use deja_machine::loader::Image;
use deja_machine::{ClockMode, LiveHost, MachineConfig};
use deja_recorder::{RecordOptions, Recorder, SerialCapture};
use deja_replayer::{ReplayOptions, Verdict};
use deja_traces::{EventKind, TraceReader};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Workloads measured by default: a timer-driven kernel (many interrupts, long run) and an
/// idle guest on the PIT (mostly HLT, time reads and interrupts).
pub const DEFAULT_GUESTS: &[&str] = &["racy-kernel", "timer"];

/// What to measure.
#[derive(Debug, Clone)]
pub struct RecordBenchConfig {
    /// Built-in guests (`deja guests list` names).
    pub guests: Vec<String>,
    /// Runs of each kind per guest; times are medians over them.
    pub repeat: u32,
    /// Guest clock: virtual (same instructions every run) or host.
    pub clock: ClockMode,
    /// Guest RAM.
    pub ram_size: u64,
    /// Host wall-clock limit of each run.
    pub timeout: Duration,
    /// The kernel command line (Linux workloads).
    pub cmdline: Option<String>,
}

impl Default for RecordBenchConfig {
    fn default() -> Self {
        Self {
            guests: DEFAULT_GUESTS.iter().map(|g| g.to_string()).collect(),
            repeat: 3,
            clock: ClockMode::Virtual,
            ram_size: 32 << 20,
            timeout: Duration::from_secs(120),
            cmdline: None,
        }
    }
}

/// One guest's record/replay costs (field `record_replay` of the bench JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordReplayMeasurement {
    /// The guest.
    pub guest: String,
    /// The engine (`bt`).
    pub engine: String,
    /// `virtual` or `host`.
    pub clock: String,
    /// Whether it ran.
    #[serde(flatten)]
    pub status: Status,
    /// Runs of each kind.
    pub repeats: u32,
    /// Guest instructions of the (last) recorded run.
    pub icount: u64,
    /// Device exits of the recorded run.
    pub exits: u64,
    /// Events in its trace.
    pub events: u64,
    /// Checkpoints in its trace.
    pub checkpoints: u64,
    /// Size of its trace file in bytes.
    pub trace_bytes: u64,
    /// Guest time the recording covers, in ns (the last time the guest was told).
    pub guest_ns: u64,
    /// Host seconds of a plain run (live host, nothing logged).
    pub plain_seconds: Option<Summary>,
    /// Host seconds of a recording.
    pub record_seconds: Option<Summary>,
    /// Host seconds of a verified replay.
    pub replay_seconds: Option<Summary>,
    /// Host ns per guest instruction: plain run, recording, replay (medians).
    pub ns_per_instruction: Option<[f64; 3]>,
    /// Recording cost over a plain run, per guest instruction: 0.05 means 5 % slower.
    /// Target: at most 0.10.
    pub record_overhead: Option<f64>,
    /// Replay speed relative to recording, per guest instruction: 2.0 means replay runs
    /// twice as fast. Target: at least 1.0.
    pub replay_speed: Option<f64>,
    /// Trace bytes per second of guest time.
    pub trace_bytes_per_guest_second: Option<f64>,
    /// Trace bytes per event (compressed, checkpoints included).
    pub trace_bytes_per_event: Option<f64>,
    /// Events per second of guest time.
    pub events_per_guest_second: Option<f64>,
    /// Host seconds the recording spent taking state digests and checkpoints.
    #[serde(default)]
    pub checkpoint_seconds: Option<f64>,
    /// Host seconds of `deja replay --until N` (seeking from the nearest checkpoint, opening
    /// the trace included) at a quarter, half and three quarters of the run. Target for a
    /// Linux boot: at most 3 s.
    #[serde(default)]
    pub seek_seconds: Option<Summary>,
    /// Host seconds of the same workload booted under `qemu-system-x86_64 -accel tcg` to its
    /// power-off (Linux workloads, when QEMU is installed).
    #[serde(default)]
    pub qemu_tcg_seconds: Option<f64>,
}

impl RecordReplayMeasurement {
    fn new(guest: &str, clock: ClockMode, status: Status) -> Self {
        Self {
            guest: guest.into(),
            engine: EngineKind::Bt.name().into(),
            clock: clock_name(clock).into(),
            status,
            repeats: 0,
            icount: 0,
            exits: 0,
            events: 0,
            checkpoints: 0,
            trace_bytes: 0,
            guest_ns: 0,
            plain_seconds: None,
            record_seconds: None,
            replay_seconds: None,
            ns_per_instruction: None,
            record_overhead: None,
            replay_speed: None,
            trace_bytes_per_guest_second: None,
            trace_bytes_per_event: None,
            events_per_guest_second: None,
            checkpoint_seconds: None,
            seek_seconds: None,
            qemu_tcg_seconds: None,
        }
    }
}

fn clock_name(c: ClockMode) -> &'static str {
    match c {
        ClockMode::Virtual => "virtual",
        ClockMode::Host => "host",
    }
}

/// Measures every configured guest.
pub fn measure_all(config: &RecordBenchConfig) -> Vec<RecordReplayMeasurement> {
    config.guests.iter().map(|g| measure(g, config)).collect()
}

/// One run's instructions and host seconds.
struct Timed {
    icount: u64,
    seconds: f64,
}

/// Measures one guest; failures are reported in the measurement's status.
pub fn measure(guest: &str, config: &RecordBenchConfig) -> RecordReplayMeasurement {
    match try_measure(guest, config) {
        Ok(m) => m,
        Err(error) => RecordReplayMeasurement::new(guest, config.clock, Status::Failed { error }),
    }
}

fn try_measure(guest: &str, config: &RecordBenchConfig) -> Result<RecordReplayMeasurement, String> {
    let image = deja_guests::find(guest)
        .ok_or_else(|| format!("no built-in guest named {guest:?}"))?
        .image()
        .map_err(|e| format!("building guest {guest}: {e}"))?;
    try_measure_image(guest, &image, config)
}

/// Measures a workload given as an image (a Linux kernel with its initrd, say) under the
/// name `label`; failures are reported in the measurement's status.
pub fn measure_image(
    label: &str,
    image: &Image,
    config: &RecordBenchConfig,
) -> RecordReplayMeasurement {
    try_measure_image(label, image, config).unwrap_or_else(|error| {
        RecordReplayMeasurement::new(label, config.clock, Status::Failed { error })
    })
}

fn try_measure_image(
    guest: &str,
    image: &Image,
    config: &RecordBenchConfig,
) -> Result<RecordReplayMeasurement, String> {
    let image = image.clone();
    let mut machine = MachineConfig {
        ram_size: config.ram_size,
        ..MachineConfig::default()
    };
    if let Some(cmdline) = &config.cmdline {
        machine.cmdline = cmdline.clone();
    }
    let dir = std::env::temp_dir().join(format!("deja-bench-rr-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let trace = dir.join(format!("{guest}.trace"));
    let mut m = RecordReplayMeasurement::new(guest, config.clock, Status::Ok);
    let (mut plain, mut record, mut replay) = (Vec::new(), Vec::new(), Vec::new());
    let repeat = config.repeat.max(1);
    for _ in 0..repeat {
        plain.push(plain_run(&image, &machine, config)?);
        let (timed, outcome) = record_run(&image, &machine, &trace, config)?;
        m.icount = outcome.run.icount;
        m.exits = outcome.run.exits;
        m.events = outcome.events;
        m.checkpoints = outcome.checkpoints;
        m.checkpoint_seconds = Some(outcome.state_seconds);
        record.push(timed);
        replay.push(replay_run(&trace, config, None)?);
    }
    let mut seeks = Vec::new();
    for quarter in 1..=3 {
        let target = m.icount / 4 * quarter;
        if target > 0 {
            seeks.push(replay_run(&trace, config, Some(target))?.seconds);
        }
    }
    m.seek_seconds = Summary::of(&seeks);
    m.repeats = repeat;
    m.trace_bytes = std::fs::metadata(&trace).map_or(0, |md| md.len());
    m.guest_ns = guest_ns(&trace)?;
    let _ = std::fs::remove_file(&trace);
    let _ = std::fs::remove_dir(&dir);

    let seconds = |v: &[Timed]| Summary::of(&v.iter().map(|t| t.seconds).collect::<Vec<_>>());
    let per_insn = |v: &[Timed]| {
        let rates: Vec<f64> = v
            .iter()
            .filter(|t| t.icount > 0)
            .map(|t| t.seconds * 1e9 / t.icount as f64)
            .collect();
        Summary::of(&rates).map(|s| s.median)
    };
    m.plain_seconds = seconds(&plain);
    m.record_seconds = seconds(&record);
    m.replay_seconds = seconds(&replay);
    if let (Some(p), Some(r), Some(q)) = (per_insn(&plain), per_insn(&record), per_insn(&replay)) {
        m.ns_per_instruction = Some([p, r, q]);
        if p > 0.0 && q > 0.0 {
            m.record_overhead = Some(r / p - 1.0);
            m.replay_speed = Some(r / q);
        }
    }
    let guest_seconds = m.guest_ns as f64 / 1e9;
    if guest_seconds > 0.0 {
        m.trace_bytes_per_guest_second = Some(m.trace_bytes as f64 / guest_seconds);
        m.events_per_guest_second = Some(m.events as f64 / guest_seconds);
    }
    if m.events > 0 {
        m.trace_bytes_per_event = Some(m.trace_bytes as f64 / m.events as f64);
    }
    Ok(m)
}

fn plain_run(
    image: &Image,
    machine: &MachineConfig,
    config: &RecordBenchConfig,
) -> Result<Timed, String> {
    let mut vm = build_vm(
        EngineKind::Bt,
        machine.clone(),
        Box::new(LiveHost::new(config.clock)),
        Box::new(std::io::sink()),
        image,
    )
    .map_err(|e| format!("building the plain run: {e}"))?;
    let run = vm
        .run(RunOptions {
            timeout: Some(config.timeout),
            max_instructions: None,
        })
        .map_err(|e| format!("plain run: {e}"))?;
    Ok(Timed {
        icount: run.icount,
        seconds: run.elapsed.as_secs_f64(),
    })
}

fn record_run(
    image: &Image,
    machine: &MachineConfig,
    trace: &Path,
    config: &RecordBenchConfig,
) -> Result<(Timed, deja_recorder::RecordOutcome), String> {
    let mut opts = RecordOptions::new(EngineKind::Bt, config.clock);
    opts.run.timeout = Some(config.timeout);
    let sink =
        std::fs::File::create(trace).map_err(|e| format!("creating {}: {e}", trace.display()))?;
    let recorder = Recorder::new(
        image,
        machine,
        Box::new(LiveHost::new(config.clock)),
        Box::new(std::io::BufWriter::new(sink)),
        &trace.display().to_string(),
        Box::new(std::io::sink()),
        Arc::new(Mutex::new(SerialCapture::default())),
        opts,
        |host, out| build_vm(EngineKind::Bt, machine.clone(), host, out, image),
    )
    .map_err(|e| format!("starting the recording: {e}"))?;
    let outcome = recorder.run().map_err(|e| format!("recording: {e}"))?;
    if let Some(e) = &outcome.write_error {
        return Err(format!("writing the trace: {e}"));
    }
    Ok((
        Timed {
            icount: outcome.run.icount,
            seconds: outcome.run.elapsed.as_secs_f64(),
        },
        outcome,
    ))
}

/// A verified replay of the whole trace (its run loop's seconds), or with `until` a seek
/// there (all the seconds a user waits: opening the trace, restoring the nearest
/// checkpoint, replaying the rest).
fn replay_run(
    trace: &Path,
    config: &RecordBenchConfig,
    until: Option<u64>,
) -> Result<Timed, String> {
    let mut opts = ReplayOptions::new(EngineKind::Bt);
    opts.timeout = Some(config.timeout);
    opts.until = until.map(deja_replayer::Until::Icount);
    let report = deja_replayer::replay(
        trace,
        &opts,
        &|name| deja_guests::find(name).and_then(|g| g.image().ok()),
        Box::new(std::io::sink()),
        Box::new(|cfg, image, host, out| {
            build_vm(EngineKind::Bt, cfg.clone(), host, out, image).map_err(|e| e.to_string())
        }),
    )
    .map_err(|e| format!("replaying: {e}"))?;
    if until.is_some() {
        if !matches!(report.verdict, Verdict::ReachedUntil { .. }) {
            return Err(format!("the seek did not reach its target: {report}"));
        }
        return Ok(Timed {
            icount: report.icount,
            seconds: report.elapsed_seconds,
        });
    }
    if !matches!(report.verdict, Verdict::Verified) {
        return Err(format!("the replay did not verify: {report}"));
    }
    Ok(Timed {
        icount: report.icount,
        seconds: report.run_seconds,
    })
}

/// The guest time a trace covers: the latest time the guest was told.
fn guest_ns(trace: &Path) -> Result<u64, String> {
    let mut r = TraceReader::open(trace).map_err(|e| e.to_string())?;
    let mut latest = 0;
    for e in r.events() {
        match e.map_err(|e| e.to_string())?.kind {
            EventKind::TimeRead { ns } => latest = latest.max(ns),
            EventKind::Idle { resumed_ns, .. } => latest = latest.max(resumed_ns),
            _ => {}
        }
    }
    Ok(latest)
}

/// The measurements as a text table (for `deja bench`'s output).
pub fn table(ms: &[RecordReplayMeasurement]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<12} {:>12} {:>8} {:>10} {:>10} {:>10} {:>9} {:>9} {:>11} {:>9} {:>8} {:>8} {:>9}\n",
        "record/replay",
        "instructions",
        "events",
        "plain ns/i",
        "record",
        "replay",
        "overhead",
        "replay x",
        "B/guest-s",
        "B/event",
        "ckpt s",
        "seek s",
        "qemu-tcg s"
    ));
    let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".to_string(), f);
    for m in ms {
        match &m.status {
            Status::Ok => {
                let [p, r, q] = m.ns_per_instruction.unwrap_or([f64::NAN; 3]);
                out.push_str(&format!(
                    "{:<12} {:>12} {:>8} {:>10.2} {:>10.2} {:>10.2} {:>9} {:>9} {:>11} {:>9} {:>8} {:>8} {:>9}\n",
                    m.guest,
                    m.icount,
                    m.events,
                    p,
                    r,
                    q,
                    opt(m.record_overhead, &|v| format!("{:+.1}%", v * 100.0)),
                    opt(m.replay_speed, &|v| format!("{v:.2}x")),
                    opt(m.trace_bytes_per_guest_second, &|v| format!("{v:.0}")),
                    opt(m.trace_bytes_per_event, &|v| format!("{v:.2}")),
                    opt(m.checkpoint_seconds, &|v| format!("{v:.2}")),
                    opt(m.seek_seconds.map(|s| s.max), &|v| format!("{v:.2}")),
                    opt(m.qemu_tcg_seconds, &|v| format!("{v:.1}")),
                ));
            }
            Status::Skipped { reason } => {
                out.push_str(&format!("{:<12} skipped: {reason}\n", m.guest));
            }
            Status::Failed { error } => {
                out.push_str(&format!("{:<12} FAILED: {error}\n", m.guest));
            }
        }
    }
    out
}
