//! `deja record`: run a guest with a recording host and write its trace.

use super::run::{GuestArgs, kick_on_signals, resolve_image};
use anyhow::{Context, bail};
use clap::Args;
use deja_engine::{EngineKind, RunOptions, build_vm_with};
use deja_machine::LiveHost;
use deja_recorder::{
    DEFAULT_CHAOS_MAX_QUANTUM, DEFAULT_DIGEST_INTERVAL, DEFAULT_FAIL_GRACE_EXITS, RecordOptions,
    RecordOutcome, RecordSummary, Recorder, SerialCapture, record_until_failure,
};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

/// `--until-failure` found no failure in its attempts.
pub const EXIT_NO_FAILURE: u8 = 4;

/// Arguments of `deja record`.
#[derive(Args, Debug)]
pub struct RecordArgs {
    /// The guest and its machine, as `deja run` takes them.
    #[command(flatten)]
    pub guest: GuestArgs,
    /// The trace file to write.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: PathBuf,
    /// A state digest every N events, so a replay notices a divergence early.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_DIGEST_INTERVAL)]
    pub digest_interval: u64,
    /// A checkpoint (CPU, devices, changed pages) at every Nth digest, for fast seeking and
    /// register diffs on divergence; 0 for none.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub checkpoint_every: u64,
    /// No checkpoint closer than N instructions to the previous one (bt; 0: no minimum), so
    /// guests that read the clock in tight loops do not fill the trace with checkpoints.
    #[arg(long, value_name = "N", default_value_t = deja_recorder::DEFAULT_CHECKPOINT_MIN_INSTRUCTIONS)]
    pub checkpoint_min_instructions: u64,
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
    /// Record again (with the next chaos seed, with --chaos) until the guest fails (its
    /// console matches --fail-on, a non-zero debug-exit status, or a triple fault), and
    /// keep the failing trace. A reset then always ends the attempt (a triple fault is a
    /// failure to keep); otherwise a reset reboots unless --no-reboot. The trace's header
    /// says which, and `deja replay` does the same.
    #[arg(long)]
    pub until_failure: bool,
    /// A console line matching REGEX is a failure (e.g. 'Kernel panic|BUG:|Oops|WARNING:'):
    /// the guest runs on for --fail-grace-exits device exits (so the rest of the oops is
    /// kept), then the recording stops and, with --until-failure, is kept.
    #[arg(long, value_name = "REGEX", value_parser = parse_regex)]
    pub fail_on: Option<regex::Regex>,
    /// Device exits the guest runs on after its console matched --fail-on.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_FAIL_GRACE_EXITS, requires = "fail_on")]
    pub fail_grace_exits: u64,
    /// Most recordings `--until-failure` makes.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub attempts: u64,
    /// Embed the image's bytes (a kernel and its initrd too) in the trace, so that it
    /// replays where the files are not (on a colleague's machine); a replay uses the
    /// embedded copy when the recorded path is missing or holds another file.
    #[arg(long)]
    pub embed_images: bool,
    /// No progress display.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

fn parse_regex(s: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(s).map_err(|e| e.to_string())
}

/// Where the guest's COM1 output goes: FILE, or stdout for none or `-`.
pub(crate) fn serial_sink(path: &Option<PathBuf>) -> anyhow::Result<Box<dyn Write + Send>> {
    Ok(match path {
        Some(p) if p.as_os_str() != "-" => {
            Box::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        _ => Box::new(std::io::stdout()),
    })
}

/// Runs `deja record`.
pub fn record(args: RecordArgs) -> anyhow::Result<ExitCode> {
    let guest = &args.guest;
    let image = resolve_image(guest)?;
    let engine = EngineKind::from(guest.engine);
    if engine == EngineKind::Kvm && (args.chaos || guest.max_instructions.is_some()) {
        bail!(
            "--chaos and --max-instructions need an engine that counts instructions (bt); \
             kvm delivers interrupts at device exits only"
        );
    }
    let config = guest.machine_config();
    let clock = guest.clock_mode();
    let mut opts = RecordOptions::new(engine, clock);
    opts.digest_interval = args.digest_interval;
    opts.checkpoint_every = args.checkpoint_every;
    opts.checkpoint_min_instructions = args.checkpoint_min_instructions;
    if args.exit_synchronous {
        opts.delivery = deja_traces::Delivery::ExitSynchronous;
    }
    opts.chaos_max_quantum = args.chaos_max_quantum;
    opts.fail_on = args.fail_on.clone();
    opts.fail_grace_exits = args.fail_grace_exits;
    opts.embed_images = args.embed_images;
    opts.on_reset = if guest.no_reboot || args.until_failure {
        deja_traces::ResetPolicy::Stop
    } else {
        deja_traces::ResetPolicy::Reboot
    };
    opts.run = RunOptions {
        timeout: guest.timeout,
        max_instructions: guest.max_instructions,
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
            serial_sink(&guest.serial_out)?,
            serial,
            opts,
            |host, out| {
                build_vm_with(
                    engine,
                    config.clone(),
                    host,
                    out,
                    &image,
                    guest.bt_options(),
                )
            },
        )
        .with_context(|| format!("starting {} on {engine}", image.name))?;
        *current.lock().unwrap_or_else(|e| e.into_inner()) = Some(recorder.kicker());
        if stop.pending() {
            recorder.kicker().kick();
        }
        let by_icount = engine == EngineKind::Bt && !args.exit_synchronous;
        let pb = super::progress::bar(
            guest.max_instructions.filter(|_| by_icount),
            if by_icount { "instructions" } else { "exits" },
            !args.quiet
                && guest.json.is_none()
                && !super::progress::guest_output_on_terminal(guest.serial_out.as_deref()),
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
                record_one(path, args.chaos.then_some(s)).map_err(|e| {
                    failure = Some(e);
                    deja_recorder::RecordError::Build {
                        image: image.name.clone(),
                        engine,
                        detail: "see above".into(),
                    }
                })
            },
            |n, s, o| {
                let seed = if args.chaos {
                    format!(" (chaos seed {s})")
                } else {
                    String::new()
                };
                eprintln!("deja: attempt {n}{seed}: {}", o.verdict());
            },
        );
        if let Some(e) = failure {
            return Err(e);
        }
        let found = found?;
        let Some(last) = &found.last else {
            bail!("no attempt was made (--attempts 0)");
        };
        let chaos_seed = found.failing_seed.filter(|_| args.chaos);
        report(&args, &image.name, engine, last, chaos_seed)?;
        let seeds = if args.chaos {
            format!(" (chaos seeds {seed}..)")
        } else {
            String::new()
        };
        return Ok(match found.failing_seed {
            Some(_) => {
                eprintln!(
                    "deja: the guest failed on attempt {}{}; kept its trace in {}",
                    found.attempts,
                    chaos_seed.map_or(String::new(), |s| format!(" (chaos seed {s})")),
                    args.output.display()
                );
                ExitCode::SUCCESS
            }
            None => {
                eprintln!(
                    "deja: no failure in {} attempts{seeds}; no trace kept",
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
    let summary = RecordSummary::new(image, engine, &args.output, o, chaos_seed);
    for line in summary.to_string().lines() {
        eprintln!("deja: {line}");
    }
    if let Some(path) = &args.guest.json {
        super::run::write_json(path, &summary)?;
    }
    Ok(())
}
