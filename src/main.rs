//! The `deja` command-line program: parses arguments and calls into the crates.

mod cli;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// deja: record/replay deterministic x86 virtualization.
///
/// deja runs x86 guests on two engines that share one machine model (a subset of QEMU's
/// `pc` machine): the host's KVM and deja's own binary translator (bt).
#[derive(Parser, Debug)]
#[command(name = "deja", version, about, long_about = None, after_help = cli::EXIT_CODES_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a guest until it writes the debug-exit port, shuts down, or a limit passes.
    Run(cli::run::RunArgs),
    /// Show what this host offers: KVM API, virtualization flavour, capabilities, perf counters.
    Info(cli::info::InfoArgs),
    /// The built-in guest corpus.
    #[command(subcommand)]
    Guests(cli::guests::GuestsCommand),
    /// Run a guest and record every nondeterministic input into a trace.
    ///
    /// A guest reset reboots the machine as in `deja run` (--no-reboot, or --until-failure,
    /// ends the recording there); the trace's header records which.
    Record(cli::record::RecordArgs),
    /// Re-execute a trace deterministically and verify it, or stop at a position.
    ///
    /// A guest reset reboots the machine or ends the replay as it did while recording
    /// (the trace header's reset policy; traces older than format 3 end at the first reset).
    Replay(cli::replay::ReplayArgs),
    /// Inspect a trace: info, verify, dump, stats.
    #[command(subcommand)]
    Trace(cli::trace::TraceCommand),
    /// Nanobenchmarks: ns and exits per operation for each benchmark x engine x MMU strategy.
    Bench(cli::bench::BenchArgs),
    /// Plots, index.html and summary.md from `deja bench --json` results.
    Report(cli::report::ReportArgs),
}

fn main() -> ExitCode {
    // Before anything else, so that no Ctrl-C or SIGTERM can kill a recording before its
    // handler exists (see set_stop_signals_blocked).
    cli::run::set_stop_signals_blocked(true);
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run(_) | Command::Record(_)) {
        cli::run::set_stop_signals_blocked(false);
    }
    if !matches!(
        cli.command,
        Command::Run(_) | Command::Record(_) | Command::Replay(_)
    ) {
        cli::end_quietly_on_closed_stdout();
    }
    let result = match cli.command {
        Command::Run(args) => cli::run::run(args),
        Command::Info(args) => cli::info::info(args),
        Command::Guests(cmd) => cli::guests::guests(cmd),
        Command::Record(args) => cli::record::record(args),
        Command::Replay(args) => cli::replay::run(args),
        Command::Trace(cmd) => cli::trace::run(cmd),
        Command::Bench(args) => cli::bench::bench(args),
        Command::Report(args) => cli::report::report(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("deja: error: {}", error_chain(&e));
            ExitCode::from(cli::EXIT_DEJA_ERROR)
        }
    }
}

/// The error and its causes on one line, skipping causes whose text an outer message
/// already includes (many library errors embed their source in their own message).
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}
