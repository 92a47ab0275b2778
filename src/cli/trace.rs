//! `deja trace info|verify|dump|stats`: look inside a trace without running anything.

use clap::{Args, Subcommand};
use deja_traces::{DumpOptions, Position, TraceReader};
use std::path::PathBuf;
use std::process::ExitCode;

/// `trace verify` found problems.
pub const EXIT_TRACE_PROBLEMS: u8 = 3;

/// The `deja trace` subcommands.
#[derive(Subcommand, Debug)]
pub enum TraceCommand {
    /// Header (engine, clock, delivery, machine, images) and outcome.
    Info(FileArgs),
    /// Check every frame's checksum and contents, every checkpoint and the footer.
    Verify(FileArgs),
    /// One line per event: icount, exits, kind, details.
    Dump(DumpArgs),
    /// Sizes and counts by frame and event kind, checkpoint costs.
    Stats(FileArgs),
}

/// A trace and an output format.
#[derive(Args, Debug)]
pub struct FileArgs {
    /// The trace.
    pub trace: PathBuf,
    /// JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `deja trace dump`.
#[derive(Args, Debug)]
pub struct DumpArgs {
    /// The trace.
    pub trace: PathBuf,
    /// Start at this position: `ICOUNT:EXITS`.
    #[arg(long, value_name = "ICOUNT:EXITS", value_parser = parse_position)]
    pub from: Option<Position>,
    /// At most this many lines.
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
    /// Only events of these kinds (time, wallclock, serial-in, entropy, poll-quantum, idle,
    /// interrupt, state-digest, serial-out, chaos, end, registers).
    #[arg(long = "kind", value_name = "KIND")]
    pub kinds: Vec<String>,
    /// Also list checkpoints.
    #[arg(long)]
    pub checkpoints: bool,
}

fn parse_position(s: &str) -> Result<Position, String> {
    let (i, e) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not ICOUNT:EXITS"))?;
    let n = |t: &str| {
        t.trim()
            .parse::<u64>()
            .map_err(|_| format!("{s:?} is not ICOUNT:EXITS"))
    };
    Ok(Position::new(n(i)?, n(e)?))
}

/// Runs `deja trace ...`.
pub fn run(cmd: TraceCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TraceCommand::Info(a) => {
            let r = TraceReader::open(&a.trace)?;
            let info = deja_traces::info(&r);
            if a.json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print!("{info}");
            }
            Ok(ExitCode::SUCCESS)
        }
        TraceCommand::Verify(a) => {
            let mut r = TraceReader::open(&a.trace)?;
            let pb = super::progress::bar(Some(r.file_len()), "bytes", !a.json);
            pb.set_message("verifying");
            let report =
                deja_traces::tools::verify_with_progress(&mut r, &mut |o| pb.set_position(o));
            pb.finish_and_clear();
            let report = report?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_TRACE_PROBLEMS)
            })
        }
        TraceCommand::Dump(a) => {
            let known = deja_traces::tools::event_kind_names();
            if let Some(k) = a.kinds.iter().find(|k| !known.contains(&k.as_str())) {
                anyhow::bail!("unknown event kind {k:?}; kinds are: {}", known.join(", "));
            }
            let mut r = TraceReader::open(&a.trace)?;
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            deja_traces::dump(
                &mut r,
                &mut out,
                &DumpOptions {
                    from: a.from,
                    limit: a.limit,
                    kinds: a.kinds,
                    checkpoints: a.checkpoints,
                },
            )?;
            Ok(ExitCode::SUCCESS)
        }
        TraceCommand::Stats(a) => {
            let mut r = TraceReader::open(&a.trace)?;
            let stats = deja_traces::stats(&mut r)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                print!("{stats}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
