//! `deja guests`: list and build the built-in guest corpus.

use anyhow::Context;
use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;

/// Guest corpus subcommands.
#[derive(Subcommand, Debug)]
pub enum GuestsCommand {
    /// List the built-in guests (run one with `deja run guest:NAME`).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write every built-in guest as an image file plus its `.json` load description.
    Build {
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

/// Runs a `deja guests` subcommand.
pub fn guests(cmd: GuestsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        GuestsCommand::List { json } => {
            if json {
                let list: Vec<_> = deja_guests::all()
                    .iter()
                    .map(|g| serde_json::json!({"name": g.name, "description": g.description}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for g in deja_guests::all() {
                    println!("{:<16} {}", g.name, g.description);
                }
            }
        }
        GuestsCommand::Build { out } => {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            for g in deja_guests::all() {
                let image = g
                    .image()
                    .with_context(|| format!("assembling guest {}", g.name))?;
                let path = out.join(format!("{}.img", g.name));
                image
                    .write_with_sidecar(&path)
                    .with_context(|| format!("writing guest {} to {}", g.name, out.display()))?;
                println!("{}", path.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
