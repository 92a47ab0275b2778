//! `deja replay`: re-execute a trace, verify it, or stop at a position and show the state.

use super::run::EngineArg;
use anyhow::Context;
use clap::Args;
use deja_engine::{EngineKind, build_vm};
use deja_replayer::{ReplayOptions, Until, Verdict, replay};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// The replay differed from the recording.
pub const EXIT_DIVERGED: u8 = 3;
/// The trace ends early (truncated): everything it holds matched.
pub const EXIT_TRACE_ENDED: u8 = 4;

/// Arguments of `deja replay`.
#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// The trace to replay.
    pub trace: PathBuf,
    /// The engine to replay on (default: the one it was recorded on).
    #[arg(long, value_enum)]
    pub engine: Option<EngineArg>,
    /// Stop at POSITION and print the machine state: `N` or `icount:N` (exactly N retired
    /// instructions, bt), or `exit:N` (N device exits).
    #[arg(long, value_name = "POSITION")]
    pub until: Option<Until>,
    /// With --until, replay from the start instead of the nearest checkpoint.
    #[arg(long)]
    pub from_start: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Write the guest's COM1 output to FILE (`-` for stdout); by default it is discarded.
    #[arg(long, value_name = "FILE")]
    pub serial_out: Option<PathBuf>,
    /// Give up after this many seconds of host time.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,
}

/// Runs `deja replay`.
pub fn run(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let reader = deja_traces::TraceReader::open(&args.trace)?;
    let recorded = reader.header().engine.clone();
    if let deja_traces::TraceStatus::Truncated { .. } | deja_traces::TraceStatus::Damaged { .. } =
        reader.status()
    {
        eprintln!(
            "deja: warning: trace {}: {}",
            args.trace.display(),
            reader.status()
        );
    }
    drop(reader);
    let engine = match args.engine {
        Some(e) => EngineKind::from(e),
        None if recorded == "bt" => EngineKind::Bt,
        None => EngineKind::Kvm,
    };
    let serial_out: Box<dyn Write + Send> = match &args.serial_out {
        Some(p) if p.as_os_str() == "-" => Box::new(std::io::stdout()),
        Some(p) => {
            Box::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => Box::new(std::io::sink()),
    };
    let opts = ReplayOptions {
        engine,
        until: args.until,
        seek: !args.from_start,
        timeout: args.timeout.map(Duration::from_secs_f64),
    };
    let report = replay(
        &args.trace,
        &opts,
        &|name| deja_guests::find(name).and_then(|g| g.image().ok()),
        serial_out,
        Box::new(move |cfg, image, host, out| {
            build_vm(engine, cfg.clone(), host, out, image).map_err(|e| e.to_string())
        }),
    )
    .with_context(|| format!("replaying {} on {engine}", args.trace.display()))?;
    let _ = std::io::stdout().flush();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        match &report.verdict {
            Verdict::Verified => println!("{report}"),
            _ => eprintln!("{report}"),
        }
        if let Some(from) = report.started_from {
            eprintln!("deja: started from the checkpoint at {from}");
        }
        eprintln!(
            "deja: replayed on {engine} (recorded on {}) in {:.3} s",
            report.recorded_engine, report.elapsed_seconds
        );
    }
    Ok(ExitCode::from(match report.verdict {
        Verdict::Verified | Verdict::ReachedUntil { .. } => 0,
        Verdict::Diverged(_) => EXIT_DIVERGED,
        Verdict::TraceEnded { .. } => EXIT_TRACE_ENDED,
    }))
}
