//! `deja record`: run a guest with a recording host and write its trace.

use super::run::{
    ClockArg, EngineArg, ModeArg, RunArgs, kick_on_signals, parse_mmu, resolve_image,
};
use anyhow::{Context, bail};
use clap::Args;
use deja_engine::{EngineKind, RunOptions, build_vm_with_mmu};
use deja_machine::{ClockMode, LiveHost, MachineConfig, memory};
use deja_recorder::{
    DEFAULT_CHAOS_MAX_QUANTUM, DEFAULT_DIGEST_INTERVAL, RecordOptions, RecordOutcome, Recorder,
    SerialCapture, record_until_failure,
};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `--until-failure` found no failure in its attempts.
pub const EXIT_NO_FAILURE: u8 = 4;

/// Arguments of `deja record`.
#[derive(Args, Debug)]
pub struct RecordArgs {
    /// What to run (as `deja run` takes it): `guest:NAME`, a multiboot kernel, a file with a
    /// `FILE.json` load description, or with --bios/--raw a firmware ROM or raw image.
    pub image: String,
    /// The trace file to write.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: PathBuf,
    /// Which engine runs the guest.
    #[arg(long, value_enum, default_value = "kvm")]
    pub engine: EngineArg,
    /// Guest-visible clock: host time (what the trace makes reproducible) or virtual time.
    #[arg(long, value_enum, default_value = "host")]
    pub clock: ClockArg,
    /// bt's MMU strategy (shadow, nested, tlb; default shadow). The guest sees the same on
    /// all three, so a trace replays under any of them.
    #[arg(long, value_name = "STRATEGY", value_parser = parse_mmu)]
    pub mmu: Option<deja_engine::MmuStrategy>,
    /// Guest RAM, e.g. 64M, 256M, 1G.
    #[arg(long, default_value = "256M", value_parser = parse_mem)]
    pub mem: u64,
    /// Stop recording after this many seconds of host time (the trace is finished).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub timeout: Option<Duration>,
    /// Stop after exactly this many guest instructions (bt only).
    #[arg(long, value_name = "N")]
    pub max_instructions: Option<u64>,
    /// A state digest every N events, so a replay notices a divergence early.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_DIGEST_INTERVAL)]
    pub digest_interval: u64,
    /// A checkpoint (CPU, devices, changed pages) at every Nth digest, for fast seeking and
    /// register diffs on divergence; 0 for none.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub checkpoint_every: u64,
    /// On bt, deliver interrupts only at device exits (as kvm does), so the trace also
    /// replays on kvm.
    #[arg(long)]
    pub exit_synchronous: bool,
    /// Perturb where interrupts land (bt): poll quanta drawn at random from a seeded
    /// generator, each one logged in the trace.
    #[arg(long)]
    pub chaos: bool,
    /// Seed of the chaos generator (default: from the clock; printed).
    #[arg(long, value_name = "SEED", requires = "chaos")]
    pub chaos_seed: Option<u64>,
    /// Largest chaos poll quantum in instructions.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CHAOS_MAX_QUANTUM, requires = "chaos")]
    pub chaos_max_quantum: u64,
    /// Record again with the next chaos seed until the guest fails (non-zero debug-exit
    /// status or a triple fault), and keep the failing trace.
    #[arg(long, requires = "chaos")]
    pub until_failure: bool,
    /// End the recording at the first reset request (0xcf9, port 0x92, i8042) or triple
    /// fault instead of rebooting the machine, as `deja run --no-reboot`. Without it a
    /// reset reboots (as `deja run` does), except with --until-failure, where a triple fault
    /// is a failure to keep, so a reset always ends the attempt. The trace's header says
    /// which, and `deja replay` does the same.
    #[arg(long)]
    pub no_reboot: bool,
    /// Most recordings `--until-failure` makes.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub attempts: u64,
    /// Write the guest's COM1 output to FILE instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub serial_out: Option<PathBuf>,
    /// Write a machine-readable summary to FILE (`-` for stdout).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// No progress display.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Kernel command line (multiboot).
    #[arg(long, value_name = "ARGS", default_value = "")]
    pub append: String,
    /// IMAGE is a firmware ROM (as -bios).
    #[arg(long, conflicts_with = "raw")]
    pub bios: bool,
    /// IMAGE is a raw image loaded at ADDR (with --entry and --mode).
    #[arg(long, value_name = "ADDR", value_parser = parse_addr, requires = "mode")]
    pub raw: Option<u64>,
    /// Entry point of a raw image (default: its load address).
    #[arg(long, value_name = "ADDR", value_parser = parse_addr, requires = "raw")]
    pub entry: Option<u64>,
    /// CPU mode a raw image starts in.
    #[arg(long, value_enum, requires = "raw")]
    pub mode: Option<ModeArg>,
}

fn parse_mem(s: &str) -> Result<u64, String> {
    memory::parse_size(s).map_err(|e| e.to_string())
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("bad timeout {s:?}: {e}"))
}

fn parse_addr(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    };
    parsed.map_err(|_| format!("{s:?} is not an address (decimal or 0x-prefixed hex)"))
}

fn serial_sink(path: &Option<PathBuf>) -> anyhow::Result<Box<dyn Write + Send>> {
    Ok(match path {
        Some(p) if p.as_os_str() != "-" => {
            Box::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        _ => Box::new(std::io::stdout()),
    })
}

/// Runs `deja record`.
pub fn record(args: RecordArgs) -> anyhow::Result<ExitCode> {
    let image = resolve_image(&RunArgs {
        image: args.image.clone(),
        engine: args.engine,
        mem: args.mem,
        timeout: args.timeout,
        max_instructions: args.max_instructions,
        clock: args.clock,
        mmu: args.mmu,
        stats: false,
        json: None,
        verbose: false,
        serial_out: None,
        append: args.append.clone(),
        no_reboot: args.no_reboot,
        bios: args.bios,
        raw: args.raw,
        entry: args.entry,
        mode: args.mode,
    })?;
    let engine = EngineKind::from(args.engine);
    if engine == EngineKind::Kvm && (args.chaos || args.max_instructions.is_some()) {
        bail!(
            "--chaos and --max-instructions need an engine that counts instructions (bt); \
             kvm delivers interrupts at device exits only"
        );
    }
    let config = MachineConfig {
        ram_size: args.mem,
        cmdline: args.append.clone(),
        ..MachineConfig::default()
    };
    let clock = match args.clock {
        ClockArg::Host => ClockMode::Host,
        ClockArg::Virtual => ClockMode::Virtual,
    };
    let mut opts = RecordOptions::new(engine, clock);
    opts.digest_interval = args.digest_interval;
    opts.checkpoint_every = args.checkpoint_every;
    if args.exit_synchronous {
        opts.delivery = deja_traces::Delivery::ExitSynchronous;
    }
    opts.chaos_max_quantum = args.chaos_max_quantum;
    opts.on_reset = if args.no_reboot || args.until_failure {
        deja_traces::ResetPolicy::Stop
    } else {
        deja_traces::ResetPolicy::Reboot
    };
    opts.run = RunOptions {
        timeout: args.timeout,
        max_instructions: args.max_instructions,
    };
    opts.notes.insert(
        "command".into(),
        std::env::args().collect::<Vec<_>>().join(" "),
    );
    let seed = args.chaos_seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    // Ctrl-C and SIGTERM stop whichever recording is running; its trace is finished.
    // A signal that comes while no recorder is running (start-up, between attempts) stays
    // pending on `stop` and stops the next recorder as soon as it exists.
    let current: Arc<Mutex<Option<deja_machine::Kicker>>> = Arc::default();
    let slot = current.clone();
    let stop = deja_machine::Kicker::with_hook(Arc::new(move || {
        if let Some(k) = slot.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            k.kick();
        }
    }));
    kick_on_signals(stop.clone())?;
    let record_one = |path: &Path, chaos: Option<u64>| -> anyhow::Result<RecordOutcome> {
        let mut opts = opts.clone();
        opts.chaos_seed = chaos;
        let sink = Box::new(
            std::fs::File::create(path)
                .with_context(|| format!("creating trace {}", path.display()))?,
        );
        let serial = Arc::new(Mutex::new(SerialCapture::default()));
        let recorder = Recorder::new(
            &image,
            &config,
            Box::new(LiveHost::new(clock).with_stdin()),
            sink,
            &path.display().to_string(),
            serial_sink(&args.serial_out)?,
            serial,
            opts,
            |host, out| build_vm_with_mmu(engine, config.clone(), host, out, &image, args.mmu),
        )
        .with_context(|| format!("starting {} on {engine}", image.name))?;
        *current.lock().unwrap_or_else(|e| e.into_inner()) = Some(recorder.kicker());
        if stop.pending() {
            recorder.kicker().kick();
        }
        let by_icount = engine == EngineKind::Bt && !args.exit_synchronous;
        let pb = super::progress::bar(
            args.max_instructions.filter(|_| by_icount),
            if by_icount { "instructions" } else { "exits" },
            !args.quiet
                && args.json.is_none()
                && !super::progress::guest_output_on_terminal(args.serial_out.as_deref()),
        );
        pb.set_message(format!("recording on {engine}"));
        let mut progress = |p: deja_traces::Position| {
            pb.set_position(if by_icount { p.icount } else { p.exits });
        };
        let outcome = recorder
            .run_with_progress(Some(&mut progress))
            .with_context(|| format!("recording {} on {engine}", image.name));
        pb.finish_and_clear();
        let outcome = outcome?;
        let _ = std::io::stdout().flush();
        Ok(outcome)
    };

    if args.until_failure {
        let mut failure = None;
        let found = record_until_failure(
            &args.output,
            args.attempts,
            seed,
            |path, s| {
                record_one(path, Some(s)).map_err(|e| {
                    failure = Some(e);
                    deja_recorder::RecordError::Build {
                        image: image.name.clone(),
                        engine,
                        detail: "see above".into(),
                    }
                })
            },
            |n, s, o| {
                eprintln!(
                    "deja: attempt {n} (chaos seed {s}): {}",
                    deja_recorder::describe_end(&o.run.end).1
                );
            },
        );
        if let Some(e) = failure {
            return Err(e);
        }
        let found = found?;
        let Some(last) = &found.last else {
            bail!("no attempt was made (--attempts 0)");
        };
        report(&args, &image.name, engine, last, found.failing_seed)?;
        return Ok(match found.failing_seed {
            Some(s) => {
                eprintln!(
                    "deja: the guest failed on attempt {} (chaos seed {s}); kept its trace in {}",
                    found.attempts,
                    args.output.display()
                );
                ExitCode::SUCCESS
            }
            None => {
                eprintln!(
                    "deja: no failure in {} attempts (chaos seeds {seed}..); no trace kept",
                    found.attempts
                );
                ExitCode::from(EXIT_NO_FAILURE)
            }
        });
    }

    let chaos = args.chaos.then_some(seed);
    let outcome = record_one(&args.output, chaos)?;
    report(&args, &image.name, engine, &outcome, chaos)?;
    if outcome.write_error.is_some() {
        return Ok(ExitCode::from(super::EXIT_DEJA_ERROR));
    }
    Ok(ExitCode::from(outcome.run.exit_status() as u8))
}

fn report(
    args: &RecordArgs,
    image: &str,
    engine: EngineKind,
    o: &RecordOutcome,
    chaos_seed: Option<u64>,
) -> anyhow::Result<()> {
    let (status, end) = deja_recorder::describe_end(&o.run.end);
    let secs = o.run.elapsed.as_secs_f64();
    let per_event = if o.events > 0 {
        o.trace_bytes as f64 / o.events as f64
    } else {
        0.0
    };
    match &o.write_error {
        Some(e) => eprintln!(
            "deja: the trace could not be finished: {e}\n\
             deja: {} keeps every whole frame written before that ({} bytes); it replays up \
             to there",
            args.output.display(),
            o.trace_bytes
        ),
        None => eprintln!(
            "deja: recorded {image} on {engine} ({end}): {} instructions, {} exits, {} events, \
             {} checkpoints, {} bytes ({per_event:.1} bytes/event), {secs:.3} s -> {}",
            o.run.icount,
            o.run.exits,
            o.events,
            o.checkpoints,
            o.trace_bytes,
            args.output.display()
        ),
    }
    if let Some(path) = &args.json {
        let summary = serde_json::json!({
            "image": image,
            "engine": engine.name(),
            "trace": args.output,
            "end": end,
            "exit_status": status,
            "icount": o.run.icount,
            "exits": o.run.exits,
            "events": o.events,
            "checkpoints": o.checkpoints,
            "trace_bytes": o.trace_bytes,
            "elapsed_seconds": secs,
            "final_digest": o.final_digest,
            "serial_digest": o.serial_digest,
            "chaos_seed": chaos_seed,
            "write_error": o.write_error,
        });
        let text = serde_json::to_string_pretty(&summary)?;
        if path.as_os_str() == "-" {
            super::say(text);
        } else {
            std::fs::write(path, text + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}
