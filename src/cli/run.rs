//! `deja run`: boot an image on an engine and report how the run ended.

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use deja_engine::{EngineKind, RunEnd, RunOptions, RunOutcome, RunSummary};
use deja_machine::loader::{
    EntryMode, Image, ImageFormat, ImageRequest, KernelEntry, MAX_IMAGE_FILE, read_file_bounded,
};
use deja_machine::{ClockMode, LiveHost, MachineConfig, OptionalDevice, memory};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// The engine, as the command line names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineArg {
    /// The host's KVM, every device emulated in deja's userspace.
    Kvm,
    /// deja's binary translator.
    Bt,
}

impl From<EngineArg> for EngineKind {
    fn from(e: EngineArg) -> Self {
        match e {
            EngineArg::Kvm => EngineKind::Kvm,
            EngineArg::Bt => EngineKind::Bt,
        }
    }
}

/// The clock, as the command line names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ClockArg {
    /// Host monotonic time (what QEMU does; only a trace makes it reproducible).
    Host,
    /// Time derived from guest progress: reproducible without a trace.
    Virtual,
}

/// The CPU mode a raw image starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Real mode.
    Real,
    /// 32-bit protected mode, flat segments, paging off.
    Protected,
    /// 64-bit long mode with identity-mapped page tables built by deja.
    Long,
}

/// The entry a Linux kernel boots through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KernelEntryArg {
    /// The x86 boot protocol's 64-bit entry, after the bzImage's decompressor.
    BootProtocol,
    /// The PVH entry (32-bit, paging off): a vmlinux, or the vmlinux in a bzImage's payload
    /// (decompressed by deja, so the kernel's decompressor never runs).
    Pvh,
}

impl From<KernelEntryArg> for KernelEntry {
    fn from(e: KernelEntryArg) -> Self {
        match e {
            KernelEntryArg::BootProtocol => KernelEntry::BootProtocol,
            KernelEntryArg::Pvh => KernelEntry::Pvh,
        }
    }
}

/// What to run and on what machine: the arguments `deja run` and `deja record` share.
#[derive(Args, Debug, Clone)]
pub struct GuestArgs {
    /// What to run: `guest:NAME` (see `deja guests list`), a multiboot kernel, a Linux
    /// bzImage or vmlinux (with --initrd, --append, --kernel-entry), a file with a
    /// `FILE.json` load description (as `deja guests build` writes), or with --bios/--raw a
    /// firmware ROM or raw image. A kernel may be given with --kernel instead.
    #[arg(required_unless_present = "kernel")]
    pub image: Option<String>,
    /// The kernel to boot, as QEMU's -kernel: a Linux bzImage or vmlinux (with --initrd,
    /// --append, --kernel-entry) or a multiboot kernel. The same as giving it as IMAGE.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["bios", "raw"])]
    pub kernel: Option<PathBuf>,
    /// Which engine runs the guest.
    #[arg(long, value_enum, default_value = "kvm")]
    pub engine: EngineArg,
    /// Guest RAM, e.g. 256M, 1G, 4G (above 3.5 GiB RAM continues at 4 GiB, as QEMU's pc).
    #[arg(long, default_value = "256M", value_parser = parse_mem)]
    pub mem: u64,
    /// Stop after this many seconds of host time (`deja run` exits 124; a recording's trace
    /// is finished).
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
    /// Stop after exactly this many guest instructions (bt only).
    #[arg(long, value_name = "N")]
    pub max_instructions: Option<u64>,
    /// Guest-visible clock: host time (what a trace makes reproducible) or virtual time
    /// (derived from guest progress: reproducible without a trace).
    #[arg(long, value_enum, default_value = "host")]
    pub clock: ClockArg,
    /// bt's MMU strategy: shadow (shadow page tables kept coherent by write tracing, the
    /// default), nested (EPT-style two-dimensional walks) or tlb (a plain soft TLB). The
    /// guest sees the same on all three, so a trace replays under any of them.
    #[arg(long, value_name = "STRATEGY", value_parser = parse_mmu)]
    pub mmu: Option<deja_engine::MmuStrategy>,
    /// bt's tiers: 0 (the micro-op interpreter only), 1 (every block compiled to host code
    /// on its first run) or auto (blocks compiled once hot). The guest sees the same on
    /// every tier, so a trace replays under any.
    #[arg(long, value_name = "TIER", default_value = "auto")]
    pub tier: deja_engine::Tier,
    /// Write the guest's COM1 output to FILE instead of stdout (`-` is stdout).
    #[arg(long, value_name = "FILE")]
    pub serial_out: Option<PathBuf>,
    /// Write a machine-readable summary to FILE (`-` for stdout; then use --serial-out so
    /// guest output does not mix with it).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Kernel command line (Linux, multiboot).
    #[arg(long, value_name = "ARGS", default_value = "")]
    pub append: String,
    /// The initial RAM disk of a Linux kernel (IMAGE a bzImage, found by its setup header,
    /// or a vmlinux, found by its PVH note).
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// How a Linux kernel is entered: boot-protocol (the default for a bzImage) or pvh (the
    /// default for a vmlinux; a bzImage's payload is decompressed by deja and booted the
    /// same way, skipping its decompressor). A trace records the entry and replays it.
    #[arg(long, value_enum, value_name = "ENTRY")]
    pub kernel_entry: Option<KernelEntryArg>,
    /// End the run on a reset request (0xcf9, port 0x92, i8042) or a triple fault instead
    /// of rebooting the machine (as QEMU's -no-reboot).
    #[arg(long)]
    pub no_reboot: bool,
    /// IMAGE is a firmware ROM, mapped below 4 GiB and started at the reset vector (as -bios).
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
    /// Add an optional device (repeatable; none by default): pc-testdev (QEMU's ISA test
    /// device for QEMU-targeted test kernels). A trace records the devices, and its replay
    /// rebuilds the same machine.
    #[arg(long = "device", value_name = "NAME", value_parser = |s: &str| s.parse::<OptionalDevice>().map_err(|e| e.to_string()))]
    pub devices: Vec<OptionalDevice>,
}

impl GuestArgs {
    /// The image the arguments name.
    pub fn image_request(&self) -> anyhow::Result<ImageRequest> {
        match (&self.image, &self.kernel) {
            (Some(image), Some(kernel)) => bail!(
                "both IMAGE ({image}) and --kernel ({}) name what to boot; give the kernel \
                 one way only",
                kernel.display()
            ),
            (None, Some(kernel)) => Ok(ImageRequest::File {
                path: kernel.clone(),
                format: None,
            }),
            (Some(image), None) => Ok(self.image_request_of(image)),
            (None, None) => bail!("nothing to run: give IMAGE or --kernel FILE"),
        }
    }

    /// The request for the positional IMAGE, with --bios and --raw.
    fn image_request_of(&self, image: &str) -> ImageRequest {
        let format = if self.bios {
            Some(ImageFormat::Firmware)
        } else {
            self.raw.map(|load_addr| ImageFormat::Raw {
                load_addr,
                entry: self.entry.unwrap_or(load_addr),
                mode: match self.mode {
                    Some(ModeArg::Real) | None => EntryMode::Real,
                    Some(ModeArg::Protected) => EntryMode::Protected,
                    Some(ModeArg::Long) => EntryMode::Long,
                },
            })
        };
        ImageRequest::new(image, format)
    }

    /// The machine configuration the arguments describe.
    /// bt's options from `--mmu` and `--tier`.
    pub fn bt_options(&self) -> deja_engine::BtOptions {
        deja_engine::BtOptions {
            mmu: self.mmu,
            tier: self.tier,
        }
    }

    pub fn machine_config(&self) -> MachineConfig {
        MachineConfig {
            ram_size: self.mem,
            cmdline: self.append.clone(),
            devices: self.devices.clone(),
            ..MachineConfig::default()
        }
    }

    /// The clock.
    pub fn clock_mode(&self) -> ClockMode {
        match self.clock {
            ClockArg::Host => ClockMode::Host,
            ClockArg::Virtual => ClockMode::Virtual,
        }
    }
}

/// Arguments of `deja run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The guest and its machine.
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Print the counters (exits by reason, device accesses, engine counters) after the run.
    #[arg(long)]
    pub stats: bool,
    /// Also show how the run ended when it ended normally, and the POST codes written to 0x80.
    #[arg(long, short)]
    pub verbose: bool,
    /// Serve the run to gdb at ADDR (`:PORT`, `HOST:PORT` or a Unix socket path) on bt,
    /// stopped before the guest's first instruction: forward only (record it and use
    /// `deja replay --gdb` to go backwards).
    #[arg(long, value_name = "ADDR")]
    pub gdb: Option<deja_gdb::Endpoint>,
}

pub(crate) fn parse_mem(s: &str) -> Result<u64, String> {
    memory::parse_size(s).map_err(|e| e.to_string())
}

pub(crate) fn parse_mmu(s: &str) -> Result<deja_engine::MmuStrategy, String> {
    s.parse::<deja_engine::MmuStrategy>()
        .map_err(|e| e.to_string())
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
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

/// Resolves the IMAGE argument and its flags into an image to load.
pub fn resolve_image(args: &GuestArgs) -> anyhow::Result<Image> {
    let mut image = args.image_request()?.resolve(&deja_guests::image_of)?;
    if args.kernel.is_some() && !image.is_linux() && image.format != ImageFormat::Multiboot {
        bail!(
            "--kernel takes a Linux kernel (a bzImage or a vmlinux) or a multiboot kernel; {} \
             is loaded as {:?}",
            image.name,
            image.format
        );
    }
    if let Some(entry) = args.kernel_entry {
        image.set_kernel_entry(entry.into(), args.mem)?;
    }
    if let Some(path) = &args.initrd {
        if !image.is_linux() {
            bail!(
                "--initrd goes with a Linux kernel (a bzImage or a vmlinux); {} is loaded as {:?}",
                image.name,
                image.format
            );
        }
        image.initrd = Some(Box::new(Image {
            name: path.display().to_string(),
            bytes: read_file_bounded(path, MAX_IMAGE_FILE)?,
            format: ImageFormat::Linux,
            initrd: None,
        }));
    }
    Ok(image)
}

/// SIGINT and SIGTERM, the signals that stop a run cleanly.
fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

/// Blocks or unblocks SIGINT and SIGTERM for this thread (and threads spawned later).
/// `main` blocks them before anything else, so that a signal in the first milliseconds of
/// `deja record` stays pending until [`kick_on_signals`] takes it (and the recording it
/// stops keeps a trace) instead of killing the process; commands without a handler
/// unblock them again.
pub(crate) fn set_stop_signals_blocked(blocked: bool) {
    let set = stop_signals();
    let how = if blocked {
        libc::SIG_BLOCK
    } else {
        libc::SIG_UNBLOCK
    };
    // SAFETY: `set` is initialised; pthread_sigmask only changes this thread's mask. It
    // fails only for an invalid `how`, which this is not.
    unsafe {
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// Stops the run cleanly on the first Ctrl-C or SIGTERM; a second one exits at once.
pub(crate) fn kick_on_signals(kicker: deja_machine::Kicker) -> anyhow::Result<()> {
    set_stop_signals_blocked(true);
    let set = stop_signals();
    std::thread::Builder::new()
        .name("deja-signals".into())
        .spawn(move || {
            let mut first = true;
            loop {
                let mut sig = 0;
                // SAFETY: `set` is initialised and owned by this thread; `sig` is valid.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    return;
                }
                if !first {
                    std::process::exit(130);
                }
                first = false;
                kicker.kick();
            }
        })?;
    Ok(())
}

/// Runs `deja run`.
pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let guest = &args.guest;
    let image = resolve_image(guest)?;
    let mut engine = EngineKind::from(guest.engine);
    if args.gdb.is_some() && engine != EngineKind::Bt {
        eprintln!("deja: --gdb runs the guest on bt (only bt stops at exact instructions)");
        engine = EngineKind::Bt;
    }
    if guest.max_instructions.is_some() && engine == EngineKind::Kvm {
        bail!("--max-instructions needs an engine that counts instructions (bt); kvm cannot here");
    }
    let host = Box::new(LiveHost::new(guest.clock_mode()).with_stdin());
    let serial_out = super::record::serial_sink(&guest.serial_out)?;
    let mut vm = deja_engine::build_vm_with(
        engine,
        guest.machine_config(),
        host,
        serial_out,
        &image,
        guest.bt_options(),
    )
    .with_context(|| format!("starting {} on {engine}", image.name))?;
    vm.set_reboot(!guest.no_reboot);
    if let Some(at) = &args.gdb {
        return super::gdb::serve_live(vm, at);
    }
    kick_on_signals(vm.cpu.kicker())?;
    let outcome = vm
        .run(RunOptions {
            timeout: guest.timeout,
            max_instructions: guest.max_instructions,
        })
        .with_context(|| format!("running {} on {engine}", image.name))?;
    let _ = std::io::stdout().flush();

    let post_codes = deja_machine::pc::post_codes(&vm.machine);
    let summary = RunSummary::new(&image.name, engine, &outcome, post_codes);
    report(&args, &summary, &outcome)?;
    Ok(ExitCode::from(outcome.exit_status() as u8))
}

fn report(args: &RunArgs, summary: &RunSummary, outcome: &RunOutcome) -> anyhow::Result<()> {
    let normal = matches!(outcome.end, RunEnd::Stopped(_) | RunEnd::InstructionLimit);
    if args.verbose || !normal {
        eprintln!("deja: {}", summary.end);
    }
    if let Some(state) = &summary.shutdown_state {
        eprintln!("deja: CPU state at shutdown:\n{state}");
    }
    if args.verbose && !summary.post_codes.is_empty() {
        let codes: Vec<String> = summary
            .post_codes
            .iter()
            .map(|c| format!("{c:02x}"))
            .collect();
        eprintln!("deja: POST codes (port 0x80): {}", codes.join(" "));
    }
    if args.stats {
        eprintln!("deja: {summary}");
        let mut section = "";
        for (name, value) in &summary.stats {
            let head = name.split('.').next().unwrap_or("");
            if head != section {
                section = head;
                eprintln!("  [{}]", section_title(head));
            }
            eprintln!("    {name:<40} {value:>14}");
        }
    }
    if let Some(path) = &args.guest.json {
        write_json(path, summary)?;
    }
    Ok(())
}

/// Writes `value` as pretty JSON to `path` (`-`: stdout).
pub(crate) fn write_json(path: &Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    if path.as_os_str() == "-" {
        super::say(text);
    } else {
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn section_title(prefix: &str) -> &str {
    match prefix {
        "exit" => "exits by reason (engine)",
        "io" => "device accesses (machine)",
        "bt" => "translation cache (bt)",
        "mmu" => "MMU",
        "kvm" => "kvm",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_in_hex_and_decimal() {
        assert_eq!(parse_addr("0x7c00"), Ok(0x7c00));
        assert_eq!(parse_addr("4096"), Ok(4096));
        assert!(parse_addr("0xzz").is_err());
    }

    #[test]
    fn timeouts_parse_as_seconds() {
        assert_eq!(parse_timeout("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_timeout("-1").is_err());
        assert!(parse_timeout("soon").is_err());
    }
}
