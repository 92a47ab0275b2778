//! `deja replay`: re-execute a trace, verify it, or stop at a position and show the state.

use super::run::{EngineArg, parse_mmu};
use anyhow::Context;
use clap::Args;
use deja_engine::{EngineKind, build_vm_with};
use deja_machine::WatchHit;
use deja_replayer::{ReplayHooks, ReplayOptions, Until, Verdict, replay_with};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
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
    /// bt's tiers (0, 1 or auto, as `deja run --tier`): a trace replays the same on each.
    #[arg(long, value_name = "TIER", default_value = "auto")]
    pub tier: deja_engine::Tier,
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
    /// Serve the replay to gdb at ADDR (`:PORT` or `HOST:PORT`, loopback when no host is
    /// given, or a Unix socket path) instead of running it: deja waits for gdb at the
    /// trace's start (`target remote ADDR`), and gdb can then step, continue and reverse
    /// through the whole recording (on bt, whatever engine recorded it).
    #[arg(long, value_name = "ADDR")]
    pub gdb: Option<deja_gdb::Endpoint>,
    /// Prefix every line of the guest's serial output with `[icount N] `, the instruction
    /// count at the device exit that wrote the line's first byte (`monitor seek N` in gdb
    /// goes there).
    #[arg(long)]
    pub stamp: bool,
}

/// Serial output held until the replay's next position (the device exit that wrote it) is
/// known: then each line can be prefixed with that instruction count (`--stamp`), and a
/// gdb session that replays a stretch again does not print its output twice.
#[derive(Clone)]
pub struct Stamped(Arc<Mutex<StampState>>);

/// What [`Stamped`] holds.
pub struct StampState {
    out: Box<dyn Write + Send>,
    pending: Vec<u8>,
    line_start: bool,
    stamp: bool,
    /// The last device exit whose output was passed on (output at or before it is a
    /// replay of what was already printed).
    printed_exits: Option<u64>,
}

impl Stamped {
    /// Holds what is written to it and passes it on to `out`, stamped when `stamp`.
    pub fn new(out: Box<dyn Write + Send>, stamp: bool) -> Self {
        Self(Arc::new(Mutex::new(StampState {
            out,
            pending: Vec::new(),
            line_start: true,
            stamp,
            printed_exits: None,
        })))
    }

    /// Passes the pending bytes on, written at position `at` (their lines stamped with its
    /// instruction count), unless output at that device exit was passed on before.
    pub fn flush_at(&self, at: deja_traces::Position) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if s.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut s.pending);
        if s.printed_exits.is_some_and(|e| at.exits <= e) {
            return;
        }
        s.printed_exits = Some(at.exits);
        let mut text = Vec::with_capacity(pending.len() + 24);
        let mut line_start = s.line_start;
        for b in pending {
            if line_start && s.stamp {
                text.extend_from_slice(format!("[icount {}] ", at.icount).as_bytes());
            }
            text.push(b);
            line_start = b == b'\n';
        }
        s.line_start = line_start;
        let _ = s.out.write_all(&text);
        let _ = s.out.flush();
    }
}

impl Write for Stamped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        s.pending.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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
    let (serial_out, stamped): (Box<dyn Write + Send>, _) = if args.stamp || args.gdb.is_some() {
        let s = Stamped::new(serial_out, args.stamp);
        (Box::new(s.clone()), Some(s))
    } else {
        (serial_out, None)
    };
    if let Some(at) = &args.gdb {
        if engine != EngineKind::Bt {
            eprintln!(
                "deja: debugging the {recorded} recording on bt (only bt stops at exact \
                 instructions)"
            );
        }
        return super::gdb::serve_replay(&args, at, serial_out, stamped, mmu);
    }
    let build = move |cfg: &deja_machine::MachineConfig,
                      image: &deja_machine::loader::Image,
                      host: Box<dyn deja_machine::Host>,
                      out: Box<dyn Write + Send>| {
        build_vm_with(
            engine,
            cfg.clone(),
            host,
            out,
            image,
            deja_engine::BtOptions {
                mmu,
                tier: args.tier,
            },
        )
        .map_err(|e| e.to_string())
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
    let stamp_hook = stamped.clone();
    let mut progress = |p: deja_traces::Position| {
        pb.set_position(if by_icount { p.icount } else { p.exits });
        if let Some(s) = &stamp_hook {
            s.flush_at(p);
        }
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
    if let Some(s) = &stamped {
        s.flush_at(deja_traces::Position::new(report.icount, report.exits));
    }
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
