//! `deja info`: what this host offers deja.

use clap::Args;
use deja_kvm::host_info::HostInfo;
use std::process::ExitCode;

/// Arguments of `deja info`.
#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Skip the probe guests (tiny guests run under KVM, about 0.1 s, that measure the limits
    /// of the host's flavour instead of inferring them).
    #[arg(long)]
    pub no_probe: bool,
}

/// Runs `deja info`.
pub fn info(args: InfoArgs) -> anyhow::Result<ExitCode> {
    let host = if args.no_probe {
        HostInfo::detect()
    } else {
        HostInfo::detect_and_probe()
    };
    let cpuid = deja_machine::CpuidTable::deja_default();
    if args.json {
        let out = serde_json::json!({
            "deja_version": env!("CARGO_PKG_VERSION"),
            "engines": {"kvm": host.unavailable_reason.is_none(), "bt": true},
            "host": host,
            "cpuid": cpuid,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("deja {}", env!("CARGO_PKG_VERSION"));
        println!(
            "engines: bt (always), kvm ({})",
            host.unavailable_reason.as_deref().unwrap_or("available")
        );
        println!("{}", host.render());
    }
    Ok(ExitCode::SUCCESS)
}
