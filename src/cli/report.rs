//! `deja report`: plots and tables from `deja bench --json` results.

use anyhow::Context;
use clap::Args;
use deja_bench::BenchResults;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `deja report`.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Results written by `deja bench --json`.
    #[arg(required = true)]
    pub results: Vec<PathBuf>,
    /// The directory to write the report to (created if missing).
    #[arg(short, long, value_name = "DIR")]
    pub out: PathBuf,
}

/// Runs `deja report`.
pub fn report(args: ReportArgs) -> anyhow::Result<ExitCode> {
    let mut all = Vec::new();
    for path in &args.results {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let r = BenchResults::from_json(&text)
            .with_context(|| format!("{} is not deja bench results", path.display()))?;
        all.push(r);
    }
    let written = deja_reports::write_report(&all, &args.out)?;
    // The files written, one a line; a closed pipe (`| head`) is not an error.
    let mut out = std::io::stdout().lock();
    for f in written {
        if writeln!(out, "{}", f.display()).is_err() {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}
