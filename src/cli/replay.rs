//! `deja replay`: re-execute a trace, verify it, or stop at a position and show the state.

use super::run::{EngineArg, parse_mmu};
use anyhow::Context;
use clap::Args;
use deja_engine::{EngineKind, build_vm_with_mmu};
use deja_machine::WatchHit;
use deja_replayer::{ReplayHooks, ReplayOptions, Until, Verdict, replay_with};
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
    /// bt's MMU strategy to replay with (shadow, nested, tlb; default shadow): any of them
    /// reproduces a trace recorded under any other.
    #[arg(long, value_name = "STRATEGY", value_parser = parse_mmu)]
    pub mmu: Option<deja_engine::MmuStrategy>,
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
    /// Report every CPU store into the guest-physical bytes ADDR..ADDR+LEN (LEN defaults
    /// to 8, a 64-bit variable), with the icount and RIP of the storing instruction and the
    /// old and new values (bt). `--until ICOUNT` with a reported icount then shows the
    /// machine just before that store. May be given more than once.
    #[arg(long, value_name = "ADDR[:LEN]", value_parser = parse_watch)]
    pub watch: Vec<(u64, u64)>,
    /// As --watch, for guest-virtual bytes (a kernel variable's address from System.map,
    /// /proc/kallsyms or a module's own message): translated through the guest's page
    /// tables where the replay stops (--until, else the end of the recording), found by a
    /// first, seeking replay; the physical bytes are then watched for the whole replay.
    #[arg(long, value_name = "VADDR[:LEN]", value_parser = parse_watch)]
    pub watch_virtual: Vec<(u64, u64)>,
    /// No progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

fn parse_watch(s: &str) -> Result<(u64, u64), String> {
    let num = |t: &str| {
        let t = t.trim().replace('_', "");
        match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => t.parse(),
        }
        .map_err(|_| format!("{s:?} is not ADDR[:LEN] (decimal or 0x-prefixed hex)"))
    };
    let (addr, len) = match s.split_once(':') {
        Some((a, l)) => (num(a)?, num(l)?),
        None => (num(s)?, 8),
    };
    if len == 0 {
        return Err(format!("{s:?}: a watched range needs at least one byte"));
    }
    addr.checked_add(len)
        .ok_or_else(|| format!("{s:?}: the range passes the end of the address space"))?;
    Ok((addr, len))
}

/// The watched bytes as a number (little endian, up to 8 bytes) or as hex bytes.
fn value(bytes: &[u8]) -> String {
    if bytes.len() <= 8 {
        let mut b = [0u8; 8];
        b[..bytes.len()].copy_from_slice(bytes);
        format!("{:#x}", u64::from_le_bytes(b))
    } else {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn describe_hit(h: &WatchHit) -> String {
    let change = if h.old == h.new { " (unchanged)" } else { "" };
    format!(
        "watch: icount {} rip {:#x}: [{:#x}] {} bytes {} -> {}{change}",
        h.icount,
        h.rip,
        h.address,
        h.new.len(),
        value(&h.old),
        value(&h.new)
    )
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
    let end = reader.footer().map(|f| f.final_position);
    let mmu = args.mmu;
    let engine = match args.engine {
        Some(e) => EngineKind::from(e),
        None if recorded == "bt" => EngineKind::Bt,
        None => EngineKind::Kvm,
    };
    for warning in deja_replayer::preflight_warnings(reader.header(), engine) {
        eprintln!("deja: warning: {warning}");
    }
    drop(reader);
    let serial_out: Box<dyn Write + Send> = match &args.serial_out {
        Some(p) if p.as_os_str() == "-" => Box::new(std::io::stdout()),
        Some(p) => {
            Box::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => Box::new(std::io::sink()),
    };
    let build = move |cfg: &deja_machine::MachineConfig,
                      image: &deja_machine::loader::Image,
                      host: Box<dyn deja_machine::Host>,
                      out: Box<dyn Write + Send>| {
        build_vm_with_mmu(engine, cfg.clone(), host, out, image, mmu).map_err(|e| e.to_string())
    };
    let mut watch = args.watch.clone();
    if !args.watch_virtual.is_empty() {
        watch.extend(translate_watches(&args, engine, end, &build)?);
    }
    let opts = ReplayOptions {
        engine,
        until: args.until,
        seek: !args.from_start,
        timeout: args.timeout.map(Duration::from_secs_f64),
        watch: watch.clone(),
        translate: Vec::new(),
    };
    // Progress towards the recorded end (or the --until target), by instructions where the
    // trace counts them, else by device exits.
    let (total, by_icount) = match (args.until, end) {
        (Some(Until::Icount(n)), _) => (Some(n), true),
        (Some(Until::Exit(k)), _) => (Some(k), false),
        (None, Some(p)) if p.icount > 0 => (Some(p.icount), true),
        (None, Some(p)) => (Some(p.exits), false),
        (None, None) => (None, true),
    };
    let unit = if by_icount { "instructions" } else { "exits" };
    let to_terminal = args
        .serial_out
        .as_deref()
        .is_some_and(|p| super::progress::guest_output_on_terminal(Some(p)));
    let pb = super::progress::bar(total, unit, !args.quiet && !args.json && !to_terminal);
    pb.set_message(format!("replaying on {engine}"));
    let mut progress = |p: deja_traces::Position| {
        pb.set_position(if by_icount { p.icount } else { p.exits });
    };
    let print_hits = !args.json;
    let pb_for_hits = pb.clone();
    let mut on_watch = |h: &WatchHit| {
        if print_hits {
            pb_for_hits.suspend(|| {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{}", describe_hit(h));
            });
        }
    };
    let report = replay_with(
        &args.trace,
        &opts,
        &|name| deja_guests::find(name).and_then(|g| g.image().ok()),
        serial_out,
        Box::new(build),
        ReplayHooks {
            on_watch: Some(&mut on_watch),
            progress: Some(&mut progress),
        },
    )
    .with_context(|| format!("replaying {} on {engine}", args.trace.display()))?;
    pb.finish_and_clear();
    let _ = std::io::stdout().flush();
    if !args.json
        && !watch.is_empty()
        && let Some(last) = report.watch.last()
    {
        super::say(format_args!(
            "watch: {} stores into the watched bytes; the last, at icount {} (rip {:#x}), is \
             shown just before it runs by: deja replay --until {} {}",
            report.watch_hits,
            last.icount,
            last.rip,
            last.icount,
            args.trace.display()
        ));
    } else if !args.json && !watch.is_empty() {
        super::say("watch: no store touched the watched bytes");
    }
    if args.json {
        super::say(serde_json::to_string_pretty(&report)?);
    } else {
        match &report.verdict {
            Verdict::Verified => super::say(&report),
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

/// The physical ranges of `--watch-virtual`'s virtual ones: a first replay seeks to where the
/// replay will stop (`--until`, else the recorded end) and translates every page of every
/// range through the guest's page tables there.
fn translate_watches(
    args: &ReplayArgs,
    engine: EngineKind,
    end: Option<deja_traces::Position>,
    build: &(
         impl Fn(
        &deja_machine::MachineConfig,
        &deja_machine::loader::Image,
        Box<dyn deja_machine::Host>,
        Box<dyn Write + Send>,
    ) -> Result<deja_engine::Vm, String>
         + Clone
         + 'static
     ),
) -> anyhow::Result<Vec<(u64, u64)>> {
    let stop = match (args.until, end) {
        (Some(u), _) => u,
        (None, Some(p)) if p.icount > 0 => Until::Icount(p.icount),
        (None, Some(p)) => Until::Exit(p.exits),
        (None, None) => anyhow::bail!(
            "--watch-virtual: the trace has no recorded end to translate at; give --until"
        ),
    };
    // Each range split at page boundaries: consecutive virtual pages need not be
    // consecutive physical ones.
    let mut pieces = Vec::new();
    for &(start, len) in &args.watch_virtual {
        let mut at = start;
        let end = start + len;
        while at < end {
            let n = (0x1000 - (at & 0xfff)).min(end - at);
            pieces.push((at, n));
            at += n;
        }
    }
    let opts = ReplayOptions {
        engine,
        until: Some(stop),
        seek: true,
        timeout: args.timeout.map(Duration::from_secs_f64),
        watch: Vec::new(),
        translate: pieces.iter().map(|&(v, _)| v).collect(),
    };
    let report = replay_with(
        &args.trace,
        &opts,
        &|name| deja_guests::find(name).and_then(|g| g.image().ok()),
        Box::new(std::io::sink()),
        Box::new(build.clone()),
        ReplayHooks::default(),
    )
    .with_context(|| {
        format!(
            "replaying {} to translate --watch-virtual",
            args.trace.display()
        )
    })?;
    // Without --until the stop is the recorded end, which a replay reaches as verified.
    let at_end = args.until.is_none() && matches!(report.verdict, Verdict::Verified);
    if !matches!(report.verdict, Verdict::ReachedUntil { .. }) && !at_end {
        anyhow::bail!(
            "--watch-virtual: the replay did not reach {stop} to translate there: {report}"
        );
    }
    let mut physical = Vec::new();
    for (&(virt, len), &(_, phys)) in pieces.iter().zip(&report.translations) {
        let Some(phys) = phys else {
            anyhow::bail!(
                "--watch-virtual: {virt:#x} is not mapped by the guest's page tables at {stop}"
            );
        };
        if !args.json {
            super::say(format_args!(
                "watch: virtual {virt:#x} is physical {phys:#x} at {stop} ({len} bytes)"
            ));
        }
        physical.push((phys, len));
    }
    Ok(physical)
}
