//! Trace to deterministic re-execution.
//!
//! [`replay`] rebuilds the recorded machine (configuration and image digests from the
//! header), gives it a [`ReplayingHost`] that answers every question from the trace and never
//! from the real world, and runs it. Every answer must be asked for at the recorded position
//! and be of the recorded kind; every interrupt must land where it landed; every state digest
//! must match where it was taken; at the end the final digest, the serial-output digest and
//! the exit status must match the footer. The first difference stops the run and is reported
//! with its position, the expected and the actual event or state, and (where the trace holds
//! the recorded CPU state there) the register difference.
//!
//! Positions are compared by device-exit ordinal always, and by exact instruction count when
//! both the trace and the replaying engine count instructions (bt) — a kvm trace carries no
//! instruction counts, and its exit-synchronous delivery is reproduced on either engine.
//!
//! [`ReplayOptions::until`] stops at a position and returns the machine state there,
//! starting from the nearest checkpoint at or before it.

mod host;
pub mod session;

pub use host::{Mismatch, PRELOAD_MAX_EVENTS, Player, ReplayingHost};

use deja_engine::{EngineKind, RunEnd, RunError, RunObserver, RunOptions, RunOutcome, Vm};
use deja_machine::loader::{Image, ImageFormat};
use deja_machine::tables::FirmwareRevision;
use deja_machine::{
    Cpu, CpuError, CpuState, Host, InterruptDelivery, Machine, MachineConfig, WatchHit,
};
use deja_snapshot::{SerialCapture, SerialTee, StateError, lock_capture, state};
use deja_traces::{
    CheckpointIndexEntry, Delivery, Digest, Event, EventKind, Footer, Header, ImageRecord,
    Position, ReadError, TraceReader, TraceStatus,
};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;

/// Failures that prevent a replay (a divergence is not one: it is a verdict).
#[derive(Debug, Error)]
pub enum ReplayError {
    /// The trace cannot be read.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The trace's machine configuration or image format does not decode.
    #[error("trace {trace}: {detail}")]
    BadTrace {
        /// The file.
        trace: String,
        /// What is wrong.
        detail: String,
    },
    /// The recorded image cannot be found or does not match its digest.
    #[error("image {name}: {detail}")]
    Image {
        /// The image's recorded name.
        name: String,
        /// What is wrong.
        detail: String,
    },
    /// The machine could not be built.
    #[error("building the machine on {engine}: {detail}")]
    Build {
        /// The engine.
        engine: EngineKind,
        /// Why.
        detail: String,
    },
    /// The replaying engine cannot reproduce the trace's delivery discipline.
    #[error("a trace recorded with {delivery:?} delivery cannot be replayed on {engine}: {detail}")]
    Delivery {
        /// The engine.
        engine: EngineKind,
        /// The trace's discipline.
        delivery: Delivery,
        /// Why.
        detail: String,
    },
    /// The run loop failed.
    #[error("replaying: {0}")]
    Run(#[from] RunError),
    /// Restoring a checkpoint or reading state failed.
    #[error("{0}")]
    State(#[from] StateError),
    /// Reading the CPU state failed.
    #[error("reading the CPU state: {0}")]
    Cpu(#[from] CpuError),
    /// A replay session refused a request (see [`session`]).
    #[error("replay session: {0}")]
    Session(String),
}

/// Where `--until` stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Until {
    /// After exactly this many retired instructions (engines that count them).
    Icount(u64),
    /// At the first point between exits where this many device exits have happened.
    Exit(u64),
}

impl std::fmt::Display for Until {
    /// As `--until` takes it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Until::Icount(n) => write!(f, "icount:{n}"),
            Until::Exit(k) => write!(f, "exit:{k}"),
        }
    }
}

impl std::str::FromStr for Until {
    type Err = String;

    /// `N` or `icount:N` (instructions), `exit:N` (device exits).
    fn from_str(s: &str) -> Result<Self, String> {
        let num = |t: &str| {
            t.trim()
                .replace('_', "")
                .parse::<u64>()
                .map_err(|_| format!("{s:?} is not a position (N, icount:N or exit:N)"))
        };
        if let Some(rest) = s.strip_prefix("exit:") {
            Ok(Until::Exit(num(rest)?))
        } else if let Some(rest) = s.strip_prefix("icount:") {
            Ok(Until::Icount(num(rest)?))
        } else {
            Ok(Until::Icount(num(s)?))
        }
    }
}

/// How to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// The engine to replay on.
    pub engine: EngineKind,
    /// Stop there and report the state.
    pub until: Option<Until>,
    /// Start from the nearest checkpoint at or before `until` (else from the beginning).
    pub seek: bool,
    /// Host wall-clock limit.
    pub timeout: Option<Duration>,
    /// Guest-physical ranges `(start, len)` whose every store is reported (engines that see
    /// individual stores: bt).
    pub watch: Vec<(u64, u64)>,
    /// Guest-virtual addresses to translate through the guest's page tables where the
    /// replay stops ([`ReplayReport::translations`]): how `deja replay --watch-virtual`
    /// finds the physical bytes of a kernel variable.
    pub translate: Vec<u64>,
}

impl ReplayOptions {
    /// Replays the whole trace on `engine`, with no limits and nothing watched.
    pub fn new(engine: EngineKind) -> Self {
        Self {
            engine,
            until: None,
            seek: true,
            timeout: None,
            watch: Vec::new(),
            translate: Vec::new(),
        }
    }
}

/// Most recent watch hits a [`ReplayReport`] keeps (the hook hears every one).
pub const WATCH_TAIL: usize = 64;

/// Callers' hooks into a running replay.
#[derive(Default)]
pub struct ReplayHooks<'a> {
    /// Hears every store into a watched range, in execution order.
    pub on_watch: Option<&'a mut dyn FnMut(&WatchHit)>,
    /// Hears the replay's position between exits (for progress displays).
    pub progress: Option<&'a mut dyn FnMut(Position)>,
}

/// The first difference between the recording and the replay.
#[derive(Debug, Clone, Serialize)]
pub struct Divergence {
    /// Where the replay was.
    pub at: Position,
    /// Index of the expected event in the trace.
    pub event_index: u64,
    /// What the trace holds there.
    pub expected: String,
    /// What the replay did.
    pub actual: String,
    /// Register differences `name: recorded -> replayed`, when the trace holds the recorded
    /// registers at that position (a checkpoint, or the registers logged with a digest).
    pub register_diff: Vec<String>,
    /// Guest memory differences from the checkpoint at that position, if there is one.
    pub memory_diff: Vec<String>,
    /// Device state differences from the checkpoint at that position, if there is one.
    pub device_diff: Vec<String>,
    /// What else was compared there (e.g. "registers match the recording").
    pub note: Option<String>,
    /// The replay's CPU state when it stopped.
    pub state: Option<CpuState>,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "replay diverged at {} (event #{})",
            self.at, self.event_index
        )?;
        writeln!(f, "  expected: {}", self.expected)?;
        writeln!(f, "  actual:   {}", self.actual)?;
        if !self.register_diff.is_empty() {
            writeln!(f, "  registers (recorded -> replayed):")?;
            for d in &self.register_diff {
                writeln!(f, "    {d}")?;
            }
        }
        if !self.memory_diff.is_empty() {
            writeln!(f, "  memory (recorded -> replayed):")?;
            for d in &self.memory_diff {
                writeln!(f, "    {d}")?;
            }
        }
        if !self.device_diff.is_empty() {
            writeln!(f, "  devices (recorded -> replayed):")?;
            for d in &self.device_diff {
                writeln!(f, "    {d}")?;
            }
        }
        if let Some(n) = &self.note {
            writeln!(f, "  {n}")?;
        }
        if let Some(s) = &self.state {
            writeln!(f, "  replay CPU state:\n{s}")?;
        }
        Ok(())
    }
}

/// How a replay ended.
#[derive(Debug, Clone, Serialize)]
pub enum Verdict {
    /// Everything matched, to the end of the recording.
    Verified,
    /// The replay differed from the recording.
    Diverged(Box<Divergence>),
    /// The trace ends early (no footer): everything it holds matched, up to here.
    TraceEnded {
        /// Where the last recorded event was.
        at: Position,
        /// Why the trace ends.
        detail: String,
    },
    /// `until` was reached; everything up to it matched.
    ReachedUntil {
        /// The exact position.
        at: Position,
        /// The CPU state there.
        state: Box<CpuState>,
    },
}

/// What a replay found.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    /// The verdict.
    pub verdict: Verdict,
    /// Retired instructions (0 on engines that cannot count).
    pub icount: u64,
    /// Device exits.
    pub exits: u64,
    /// Events checked.
    pub events: u64,
    /// State digests checked.
    pub digests_checked: u64,
    /// State digest at the end of the replay.
    pub final_digest: Digest,
    /// Exit status of the replayed guest, if it ended with one.
    pub exit_status: Option<i32>,
    /// How the replayed run ended.
    pub end: String,
    /// The checkpoint the replay started from, if it seeked.
    pub started_from: Option<Position>,
    /// Host seconds the replay ran, from opening the trace to the verdict.
    pub elapsed_seconds: f64,
    /// Host seconds of those in the run loop (what compares with a recording's run time).
    pub run_seconds: f64,
    /// The engine the trace was recorded on.
    pub recorded_engine: String,
    /// Stores seen into watched ranges.
    pub watch_hits: u64,
    /// The last [`WATCH_TAIL`] of them, oldest first.
    pub watch: Vec<WatchHit>,
    /// Each of [`ReplayOptions::translate`]'s virtual addresses with the physical address
    /// it maps to where the replay stopped (`None`: not mapped there).
    pub translations: Vec<(u64, Option<u64>)>,
}

impl std::fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.verdict {
            Verdict::Verified => write!(
                f,
                "replay verified: {} instructions, {} exits, {} events, {} digests, digest {}",
                self.icount, self.exits, self.events, self.digests_checked, self.final_digest
            ),
            Verdict::Diverged(d) => write!(f, "{d}"),
            Verdict::TraceEnded { at, detail } => write!(
                f,
                "trace ends early ({detail}): replay matched every one of its {} events and {} \
                 digests up to {at}; nothing to check after that",
                self.events, self.digests_checked
            ),
            Verdict::ReachedUntil { at, state } => {
                write!(
                    f,
                    "stopped at {at} (all {} events up to it matched)\n{state}",
                    self.events
                )
            }
        }
    }
}

/// Finds images by their recorded name: `guest:NAME` through `guests`, anything else as a
/// file path. The digest must match.
pub fn resolve_image(
    record: &ImageRecord,
    guests: &dyn Fn(&str) -> Option<Image>,
) -> Result<Image, ReplayError> {
    let err = |detail: String| ReplayError::Image {
        name: record.name.clone(),
        detail,
    };
    let format: ImageFormat =
        state::decode_json(&record.load_spec, "image format").map_err(|e| err(e.to_string()))?;
    let image = if let Some(name) = record.name.strip_prefix("guest:") {
        guests(name).ok_or_else(|| err(format!("no built-in guest named {name:?}")))?
    } else {
        Image {
            initrd: None,
            name: record.name.clone(),
            bytes: read_recorded_file(record)?,
            format,
        }
    };
    if !record.matches(&image.bytes) {
        return Err(err(format!(
            "it is not the image recorded ({} bytes, BLAKE3 {}; found {} bytes, BLAKE3 {})",
            record.size,
            record.digest,
            image.bytes.len(),
            Digest::of(&image.bytes)
        )));
    }
    Ok(image)
}

/// What a replay of a trace with `header` on `engine` should say before it starts: where
/// the guest will get other CPUID answers than it got while recording (a guest that tests
/// those bits can take another path, and the replay then diverges), and whether this host's
/// CPU differs from the recording host's (x87 transcendentals run on the host FPU).
pub fn preflight_warnings(header: &Header, engine: EngineKind) -> Vec<String> {
    let mut warnings = Vec::new();
    if let Some(recorded) = &header.guest_cpuid {
        let table = deja_machine::CpuidTable {
            entries: header
                .machine
                .cpuid
                .iter()
                .map(deja_snapshot::machine_cpuid_entry)
                .collect(),
        };
        match deja_engine::guest_visible_cpuid(engine, &table) {
            Ok(current) => {
                for (ring, then, now) in [
                    (0, &recorded.ring0, &current.ring0),
                    (3, &recorded.ring3, &current.ring3),
                ] {
                    let diffs = cpuid_differences(then, now);
                    if !diffs.is_empty() {
                        warnings.push(format!(
                            "the guest's ring-{ring} CPUID answers differ from the recording's \
                             (recorded from {}; on {engine} from {}): {}; a guest that tests \
                             these bits may take another path and the replay diverge",
                            recorded.source,
                            current.source,
                            diffs.join("; ")
                        ));
                    }
                }
            }
            Err(e) => warnings.push(format!(
                "cannot tell whether {engine} gives the guest the CPUID answers it got while \
                 recording: {e}"
            )),
        }
    }
    if let Some(then) = &header.host_cpu {
        let now = deja_traces::HostCpu::detect();
        if (&then.vendor, then.family, then.model, then.stepping)
            != (&now.vendor, now.family, now.model, now.stepping)
        {
            warnings.push(format!(
                "recorded on a {then}, replaying on a {now}: x87 transcendental instructions \
                 (FSIN, FCOS, FPATAN, F2XM1, FYL2X, ...) run on the host FPU and may give other \
                 results"
            ));
        }
    }
    warnings
}

/// The leaves whose answers differ between two probes of the same leaves, as text.
fn cpuid_differences(
    then: &[deja_traces::CpuidEntry],
    now: &[deja_machine::cpuid::CpuidEntry],
) -> Vec<String> {
    let mut out = Vec::new();
    for t in then {
        let recorded = [t.eax, t.ebx, t.ecx, t.edx];
        let current = now
            .iter()
            .find(|n| (n.function, n.index) == (t.function, t.index))
            .map(|n| [n.eax, n.ebx, n.ecx, n.edx]);
        match current {
            Some(current) if current == recorded => {}
            Some(current) => {
                let mut d = format!("leaf {:#x}.{}:", t.function, t.index);
                for (i, name) in ["eax", "ebx", "ecx", "edx"].iter().enumerate() {
                    if recorded[i] != current[i] {
                        d.push_str(&format!(
                            " {name} {:08x} recorded, {:08x} now",
                            recorded[i], current[i]
                        ));
                    }
                }
                out.push(d);
            }
            None => out.push(format!(
                "leaf {:#x}.{}: not probed now",
                t.function, t.index
            )),
        }
    }
    out
}

/// The bytes of the file an image record names. Only a regular file of exactly the recorded
/// size is read: a trace names any path it likes, and must not make deja read a device,
/// block on a FIFO, or say anything about a file that is not the image.
fn read_recorded_file(record: &ImageRecord) -> Result<Vec<u8>, ReplayError> {
    let err = |detail: String| ReplayError::Image {
        name: record.name.clone(),
        detail,
    };
    let path = std::path::Path::new(&record.name);
    let size = std::fs::metadata(path)
        .map_err(|e| err(format!("reading it: {e}")))?
        .len();
    if size != record.size {
        return Err(err(format!(
            "it is not the image recorded: the recorded image has {} bytes, the file {size}",
            record.size
        )));
    }
    let bytes = deja_machine::loader::read_file_bounded(path, record.size)
        .map_err(|e| err(format!("reading it: {e}")))?;
    if !record.matches(&bytes) {
        return Err(err(format!(
            "it is not the image recorded: the file has the recorded size ({} bytes) but not \
             its BLAKE3 digest {}",
            record.size, record.digest
        )));
    }
    Ok(bytes)
}

/// The images a trace's header names: the first is the one booted; a Linux kernel's second
/// is its initrd (recorded with load "initrd"). Each is found by its name and checked; when
/// that fails and the trace embeds the image (`embedded(index)`, format 8's
/// `--embed-images`), the embedded copy, already checked against the record, is used.
pub fn resolve_images(
    images: &[ImageRecord],
    guests: &dyn Fn(&str) -> Option<Image>,
    embedded: &mut dyn FnMut(usize) -> Result<Option<Vec<u8>>, ReplayError>,
) -> Result<Image, ReplayError> {
    let first = images.first().ok_or_else(|| ReplayError::Image {
        name: "(none)".into(),
        detail: "the header lists no image".into(),
    })?;
    let mut image = match resolve_image(first, guests) {
        Ok(image) => image,
        Err(e) => match embedded(0)? {
            Some(bytes) => Image {
                name: first.name.clone(),
                bytes,
                format: state::decode_json(&first.load_spec, "image format").map_err(|d| {
                    ReplayError::Image {
                        name: first.name.clone(),
                        detail: d.to_string(),
                    }
                })?,
                initrd: None,
            },
            None => return Err(e),
        },
    };
    if let Some(rd) = images
        .get(1)
        .filter(|r| r.load == deja_snapshot::INITRD_LOAD)
    {
        let bytes = match read_recorded_file(rd) {
            Ok(bytes) => bytes,
            Err(e) => embedded(1)?.ok_or(e)?,
        };
        image.initrd = Some(Box::new(Image {
            name: rd.name.clone(),
            bytes,
            format: image.format.clone(),
            initrd: None,
        }));
    }
    Ok(image)
}

/// The machine configuration a trace was recorded with: the header's machine JSON, and its
/// firmware table revision (revision 1 when the header predates the field, as every such
/// recording had).
pub fn machine_config(header: &Header, trace: &str) -> Result<MachineConfig, ReplayError> {
    let bad = |detail: String| ReplayError::BadTrace {
        trace: trace.to_string(),
        detail,
    };
    let mut config: MachineConfig =
        state::decode_json(&header.machine.extra, "machine configuration")
            .map_err(|e| bad(e.to_string()))?;
    config.firmware = match header.firmware_revision {
        None => FirmwareRevision::Rev1,
        Some(n) => FirmwareRevision::from_number(n).map_err(|e| bad(e.to_string()))?,
    };
    Ok(config)
}

/// Builds the machine a replay runs: `(config, image, host, serial output)` to a `Vm`.
pub type Builder<'a> = dyn FnOnce(&MachineConfig, &Image, Box<dyn Host>, Box<dyn Write + Send>) -> Result<Vm, String>
    + 'a;

struct Observer<'h> {
    digester: deja_snapshot::StateDigester,
    hooks: ReplayHooks<'h>,
    watch_hits: u64,
    watch_tail: std::collections::VecDeque<WatchHit>,
    player: Arc<Mutex<Player>>,
    serial: Arc<Mutex<SerialCapture>>,
    until_exit: Option<u64>,
    reached: bool,
    /// Stop where the recording stopped (it was interrupted or hit a limit): at the End
    /// event's position.
    stop_at_end: bool,
    reached_end: bool,
    digests: u64,
    /// Where logged registers last matched (a digest mismatch there is not in them).
    registers_matched_at: Option<Position>,
    /// Where a state digest last matched.
    last_verified: Option<Position>,
}

impl Observer<'_> {
    /// Hands the engine's watch hits to the hook and keeps the tail.
    fn drain_watch(&mut self, cpu: &mut dyn Cpu) {
        for hit in cpu.take_watch_hits() {
            if let Some(f) = self.hooks.on_watch.as_mut() {
                f(&hit);
            }
            self.watch_hits += 1;
            if self.watch_tail.len() == WATCH_TAIL {
                self.watch_tail.pop_front();
            }
            self.watch_tail.push_back(hit);
        }
    }
}

impl RunObserver for Observer<'_> {
    fn between_exits(&mut self, machine: &mut Machine, cpu: &mut dyn Cpu, _next_poll: u64) -> bool {
        let at = state::trace_position(machine.position());
        self.drain_watch(cpu);
        if let Some(f) = self.hooks.progress.as_mut() {
            f(at);
        }
        let mut p = host::lock(&self.player);
        if p.stopped() {
            return false;
        }
        while let Some(e) = p.peek().cloned() {
            match &e.kind {
                EventKind::SerialOutput { bytes } if p.same_position(e.at, at) => {
                    let got = lock_capture(&self.serial).take_pending();
                    if &got != bytes {
                        p.diverge(
                            at,
                            format!("serial output {:?}", String::from_utf8_lossy(bytes)),
                            format!("serial output {:?}", String::from_utf8_lossy(&got)),
                        );
                        return false;
                    }
                    p.consume();
                }
                EventKind::StateDigest { digest } if p.same_position(e.at, at) => {
                    let state = match cpu.state() {
                        Ok(s) => s,
                        Err(err) => {
                            p.diverge(
                                at,
                                format!("state digest {digest}"),
                                format!("no CPU state: {err}"),
                            );
                            return false;
                        }
                    };
                    let actual = self.digester.digest(machine, cpu, &state);
                    if actual != *digest {
                        p.diverge(
                            at,
                            format!("state digest {digest}"),
                            format!("state digest {actual}"),
                        );
                        if self.registers_matched_at == Some(at) {
                            p.set_note(
                                "the registers match the recording here: the difference is in \
                                 memory, device state or segment/SSE state"
                                    .into(),
                            );
                        }
                        p.set_state(state);
                        return false;
                    }
                    self.digests += 1;
                    self.last_verified = Some(at);
                    p.consume();
                }
                EventKind::Registers { values } if p.same_position(e.at, at) => {
                    let state = match cpu.state() {
                        Ok(s) => s,
                        Err(err) => {
                            p.diverge(at, format!("{}", e.kind), format!("no CPU state: {err}"));
                            return false;
                        }
                    };
                    let diff = state::register_diff(values, &state);
                    if !diff.is_empty() {
                        p.diverge(
                            at,
                            format!(
                                "registers {}",
                                EventKind::Registers {
                                    values: values.clone()
                                }
                            ),
                            format!(
                                "registers {}",
                                EventKind::Registers {
                                    values: state::register_values(&state)
                                }
                            ),
                        );
                        p.set_register_diff(diff);
                        p.set_state(state);
                        return false;
                    }
                    self.registers_matched_at = Some(at);
                    p.consume();
                }
                EventKind::SerialOutput { .. }
                | EventKind::StateDigest { .. }
                | EventKind::Registers { .. }
                    if p.passed(e.at, at) =>
                {
                    p.diverge(
                        at,
                        format!("{} at {}", e.kind, e.at),
                        "execution passed that position without reaching it".into(),
                    );
                    return false;
                }
                _ => break,
            }
        }
        if let Some(k) = self.until_exit
            && at.exits >= k
        {
            self.reached = true;
            return false;
        }
        if self.stop_at_end
            && let Some(e) = p.peek().cloned()
            && matches!(e.kind, EventKind::End { .. })
            && p.same_position(e.at, at)
        {
            self.reached_end = true;
            return false;
        }
        true
    }
}

/// A replay's machine built from its trace, before it runs: what [`replay_with`] and a
/// [`session::ReplaySession`] share.
struct Prepared {
    reader: TraceReader<std::io::BufReader<std::fs::File>>,
    header: Header,
    footer: Option<Footer>,
    vm: Vm,
    player: Arc<Mutex<Player>>,
    serial: Arc<Mutex<SerialCapture>>,
    scheme: deja_traces::DigestScheme,
    exit_sync: bool,
    /// The engine counts instructions.
    counts: bool,
    /// Where an interrupted recording (Ctrl-C, timeout, instruction limit) stopped, so that
    /// a replay stops there too. Without a footer (the trace was cut), the End event says so
    /// when it made it to disk.
    interrupted_at: Option<Position>,
}

/// Makes a replay's [`Player`] from the trace (its reader and footer) and whether delivery is
/// exit-synchronous.
type MakePlayer<'a> = dyn FnMut(
        &mut TraceReader<std::io::BufReader<std::fs::File>>,
        Option<&Footer>,
        bool,
    ) -> Result<Player, ReplayError>
    + 'a;

/// Opens the trace at `path` and builds its machine on `engine` at the start of the
/// recording: images resolved and checked, a [`ReplayingHost`] over the player
/// `make_player` gives, interrupt delivery as recorded, the digest scheme checked.
fn prepare(
    path: &Path,
    engine: EngineKind,
    guests: &dyn Fn(&str) -> Option<Image>,
    serial_out: Box<dyn Write + Send>,
    build: Box<Builder<'_>>,
    make_player: &mut MakePlayer<'_>,
) -> Result<Prepared, ReplayError> {
    let name = path.display().to_string();
    let mut reader = TraceReader::open(path)?;
    let header = reader.header().clone();
    let footer: Option<Footer> = reader.footer().cloned();
    let config = machine_config(&header, &name)?;
    if header.images.is_empty() {
        return Err(ReplayError::BadTrace {
            trace: name,
            detail: "the header lists no image".into(),
        });
    }
    let image = resolve_images(&header.images, guests, &mut |index| {
        Ok(reader.embedded_image(index)?)
    })?;
    let exit_sync = header.delivery == Delivery::ExitSynchronous;
    let serial = Arc::new(Mutex::new(SerialCapture::default()));
    let tee = SerialTee::new(serial_out, serial.clone());
    let player = Arc::new(Mutex::new(make_player(
        &mut reader,
        footer.as_ref(),
        exit_sync,
    )?));
    host::lock(&player)
        .set_polls_log_due_times_only(reader.format_version() >= deja_traces::DUE_POLLS_FORMAT);
    let host = ReplayingHost::new(player.clone());
    let mut vm = build(&config, &image, Box::new(host), Box::new(tee))
        .map_err(|detail| ReplayError::Build { engine, detail })?;
    // A reset does what it did while recording: reboot, or end the run.
    vm.set_reboot(header.on_reset == deja_traces::ResetPolicy::Reboot);
    let counts = vm.cpu.counts_instructions();
    host::lock(&player).set_compare_icount(counts && !exit_sync);
    let delivery = if exit_sync {
        InterruptDelivery::AtExits
    } else if counts {
        InterruptDelivery::Exact
    } else {
        return Err(ReplayError::Delivery {
            engine,
            delivery: header.delivery,
            detail: "the engine cannot count instructions, so it cannot deliver interrupts at \
                     the recorded instruction boundaries"
                .into(),
        });
    };
    vm.cpu
        .set_interrupt_delivery(delivery)
        .map_err(|e| ReplayError::Delivery {
            engine,
            delivery: header.delivery,
            detail: e.to_string(),
        })?;
    host::lock(&player).set_kicker(vm.cpu.kicker());
    let scheme = state::recorded_digest_scheme(&header);
    state::check_digest_scheme(&vm.machine, &scheme)?;
    let interrupted_at = match &footer {
        Some(f) => f.exit.status.is_none().then_some(f.final_position),
        None => match reader.last_event()? {
            Some(Event {
                at,
                kind: EventKind::End { status: None, .. },
            }) => Some(at),
            _ => None,
        },
    };
    Ok(Prepared {
        reader,
        header,
        footer,
        vm,
        player,
        serial,
        scheme,
        exit_sync,
        counts,
        interrupted_at,
    })
}

/// Replays the trace at `path`.
pub fn replay(
    path: &Path,
    opts: &ReplayOptions,
    guests: &dyn Fn(&str) -> Option<Image>,
    serial_out: Box<dyn Write + Send>,
    build: Box<Builder<'_>>,
) -> Result<ReplayReport, ReplayError> {
    replay_with(
        path,
        opts,
        guests,
        serial_out,
        build,
        ReplayHooks::default(),
    )
}

/// [`replay`], with hooks that watch stores and follow progress.
pub fn replay_with(
    path: &Path,
    opts: &ReplayOptions,
    guests: &dyn Fn(&str) -> Option<Image>,
    serial_out: Box<dyn Write + Send>,
    build: Box<Builder<'_>>,
    hooks: ReplayHooks<'_>,
) -> Result<ReplayReport, ReplayError> {
    let started = std::time::Instant::now();
    // Where to start: the nearest checkpoint at or before the target, when seeking.
    let mut checkpoint: Option<CheckpointIndexEntry> = None;
    let Prepared {
        mut reader,
        header,
        footer,
        mut vm,
        player,
        serial,
        scheme,
        exit_sync,
        counts,
        interrupted_at,
    } = prepare(
        path,
        opts.engine,
        guests,
        serial_out,
        build,
        &mut |reader, footer, exit_sync| {
            checkpoint = match (opts.until, opts.seek) {
                (Some(Until::Icount(n)), true) => {
                    reader.nearest_checkpoint(Position::new(n, u64::MAX))
                }
                (Some(Until::Exit(k)), true) => {
                    reader.nearest_checkpoint(Position::new(u64::MAX, k))
                }
                _ => None,
            };
            // Short traces are decoded here and now; long ones stream from a reader thread.
            let events_left = footer.map(|f| {
                f.events_total - checkpoint.map_or(0, |c| c.event_index.min(f.events_total))
            });
            Ok(match events_left {
                Some(n) if n <= host::PRELOAD_MAX_EVENTS => {
                    Player::preloaded(reader, checkpoint, exit_sync)
                }
                _ => Player::new(path.to_path_buf(), checkpoint, exit_sync),
            })
        },
    )?;
    vm.cpu.set_watch(&opts.watch)?;

    let mut started_from = None;
    if let Some(cp) = checkpoint {
        let memory = reader.memory_at(&cp)?;
        let meta = reader.read_checkpoint(&cp)?.meta;
        let (next_poll, _) = state::restore(
            &mut vm.machine,
            vm.cpu.as_mut(),
            &memory,
            &meta.cpu_state,
            &meta.device_state,
            reader.format_version(),
        )?;
        vm.set_next_poll(next_poll);
        started_from = Some(cp.position);
    }

    let (max_instructions, until_exit) = match opts.until {
        Some(Until::Icount(n)) if counts => (Some(n), None),
        Some(Until::Icount(n)) => {
            return Err(ReplayError::Delivery {
                engine: opts.engine,
                delivery: header.delivery,
                detail: format!(
                    "--until icount:{n} needs an engine that counts instructions (bt); \
                     use exit:N"
                ),
            });
        }
        Some(Until::Exit(k)) => (None, Some(k)),
        None => (None, None),
    };
    // A recording that was interrupted (Ctrl-C, timeout, instruction limit) ends wherever
    // it was stopped: the replay stops there too, exactly on engines that count.
    let stop_at_end = opts.until.is_none() && interrupted_at.is_some();
    let end_icount = interrupted_at
        .filter(|_| stop_at_end && counts && !exit_sync)
        .map(|at| at.icount);
    // A recording kicked between two elements of a REP string instruction stopped inside
    // its exit group: the instruction count names the instruction, the exit ordinal the
    // element.
    let end_exits = interrupted_at
        .filter(|_| stop_at_end && (counts || exit_sync))
        .map(|at| at.exits);
    vm.set_stop_exits(end_exits);
    let mut observer = Observer {
        digester: deja_snapshot::StateDigester::new(scheme),
        hooks,
        watch_hits: 0,
        watch_tail: Default::default(),
        player: player.clone(),
        serial: serial.clone(),
        until_exit,
        reached: false,
        stop_at_end,
        reached_end: false,
        digests: 0,
        registers_matched_at: None,
        last_verified: None,
    };
    let run = vm.run_observed(
        RunOptions {
            timeout: opts.timeout,
            max_instructions: max_instructions.or(end_icount),
        },
        &mut observer,
    )?;
    observer.drain_watch(vm.cpu.as_mut());
    let stopped_at_recorded_end = observer.reached_end
        || ((end_icount.is_some() || end_exits.is_some()) && run.end == RunEnd::InstructionLimit);
    let at = state::trace_position(vm.machine.position());
    let cpu_state = vm.cpu.state()?;
    let final_digest = observer
        .digester
        .digest(&vm.machine, vm.cpu.as_mut(), &cpu_state);
    let paging = deja_machine::exit_group::PagingRegs {
        cr0: cpu_state.cr0,
        cr3: cpu_state.cr3,
        cr4: cpu_state.cr4,
        efer: cpu_state.efer,
    };
    let translations = opts
        .translate
        .iter()
        .map(|&v| {
            let phys = deja_machine::exit_group::translate_linear(&vm.machine.mem, &paging, v);
            (v, phys)
        })
        .collect();
    let (exit_status, end) = deja_snapshot::describe_end(&run.end);

    let mut p = host::lock(&player);
    let reached_until =
        observer.reached || (max_instructions.is_some() && run.end == RunEnd::InstructionLimit);
    let verdict = if let Some(m) = p.take_mismatch() {
        let mut register_diff = m.register_diff;
        let mut memory_diff = Vec::new();
        let mut device_diff = Vec::new();
        let mut note = m.note;
        // The recorded state at that very position, if a checkpoint holds it (the replay
        // stopped right there, so memory and devices can be compared too).
        if let Some(cp) = reader
            .checkpoints()
            .iter()
            .find(|c| Some(c.position) == m.expected_at && c.position == at)
            .copied()
            && let Ok(c) = reader.read_checkpoint(&cp)
            && let Ok(recorded) =
                state::decode_cpu_state(&c.meta.cpu_state, reader.format_version())
        {
            if register_diff.is_empty() {
                register_diff = recorded.diff(m.state.as_ref().unwrap_or(&cpu_state));
            }
            if let Ok(memory) = reader.memory_at(&cp) {
                memory_diff = state::memory_diff(&vm.machine, &memory, 8);
            }
            device_diff =
                state::device_diff(&vm.machine, &c.meta.device_state, reader.format_version());
            if register_diff.is_empty() && memory_diff.is_empty() && device_diff.is_empty() {
                note = Some(
                    "the checkpoint here matches registers, memory and devices: the \
                     difference is in state only the digest covers"
                        .into(),
                );
            }
        }
        if note.is_none()
            && let Some(v) = observer.last_verified
        {
            note = Some(format!(
                "the whole machine state last matched the recording at {v} (a state digest): \
                 the divergence began after that"
            ));
        }
        Verdict::Diverged(Box::new(Divergence {
            at: m.at,
            event_index: m.event_index,
            expected: m.expected,
            actual: m.actual,
            register_diff,
            memory_diff,
            device_diff,
            note,
            state: Some(m.state.unwrap_or_else(|| cpu_state.clone())),
        }))
    } else if let Some(detail) = p.trace_end() {
        Verdict::TraceEnded {
            at: p.last_position(),
            detail,
        }
    } else if reached_until {
        Verdict::ReachedUntil {
            at,
            state: Box::new(cpu_state.clone()),
        }
    } else {
        finish_check(
            &mut p,
            &run,
            at,
            final_digest,
            exit_status,
            &end,
            footer.as_ref(),
            &serial,
            started_from.is_some(),
            &cpu_state,
            stopped_at_recorded_end,
        )
    };
    let events = p.consumed();
    drop(p);
    Ok(ReplayReport {
        verdict,
        icount: run.icount,
        exits: run.exits,
        events,
        digests_checked: observer.digests,
        final_digest,
        exit_status,
        end,
        started_from,
        elapsed_seconds: started.elapsed().as_secs_f64(),
        run_seconds: run.elapsed.as_secs_f64(),
        recorded_engine: header.engine.clone(),
        watch_hits: observer.watch_hits,
        watch: observer.watch_tail.into(),
        translations,
    })
}

/// At the natural end of a replay: the rest of the trace must be the recorded end.
#[allow(clippy::too_many_arguments)]
fn finish_check(
    p: &mut Player,
    run: &RunOutcome,
    at: Position,
    final_digest: Digest,
    exit_status: Option<i32>,
    end: &str,
    footer: Option<&Footer>,
    serial: &Mutex<SerialCapture>,
    seeked: bool,
    state: &CpuState,
    stopped_at_recorded_end: bool,
) -> Verdict {
    let diverged = |p: &Player, expected: String, actual: String| {
        Verdict::Diverged(Box::new(Divergence {
            at,
            event_index: p.consumed(),
            expected,
            actual,
            register_diff: Vec::new(),
            memory_diff: Vec::new(),
            device_diff: Vec::new(),
            note: None,
            state: Some(state.clone()),
        }))
    };
    if !stopped_at_recorded_end && matches!(run.end, RunEnd::Timeout | RunEnd::Interrupted) {
        return diverged(
            p,
            "the recording to continue".into(),
            format!("the replay stopped: {end}"),
        );
    }
    loop {
        let Some(e) = p.peek().cloned() else {
            return match p.trace_end() {
                Some(detail) => Verdict::TraceEnded {
                    at: p.last_position(),
                    detail,
                },
                None => diverged(p, "an end event".into(), format!("the run ended ({end})")),
            };
        };
        match &e.kind {
            // A recording stopped from outside (Ctrl-C, an instruction limit) may have taken
            // a digest at the very position where it then stopped; a replay that stops there
            // by its instruction limit never gets between exits to check it, so it is checked
            // here, against the final state (the same position).
            EventKind::StateDigest { digest } if p.same_position(e.at, at) => {
                if *digest != final_digest {
                    return diverged(
                        p,
                        format!("state digest {digest} at {}", e.at),
                        format!("state digest {final_digest}"),
                    );
                }
                p.consume();
            }
            EventKind::Registers { values } if p.same_position(e.at, at) => {
                if !state::register_diff(values, state).is_empty() {
                    let mut d = diverged(
                        p,
                        format!("{} at {}", e.kind, e.at),
                        format!(
                            "{}",
                            EventKind::Registers {
                                values: state::register_values(state)
                            }
                        ),
                    );
                    if let Verdict::Diverged(d) = &mut d {
                        d.register_diff = state::register_diff(values, state);
                    }
                    return d;
                }
                p.consume();
            }
            EventKind::SerialOutput { bytes } => {
                let got = lock_capture(serial).take_pending();
                if &got != bytes {
                    return diverged(
                        p,
                        format!("serial output {:?}", String::from_utf8_lossy(bytes)),
                        format!("serial output {:?}", String::from_utf8_lossy(&got)),
                    );
                }
                p.consume();
            }
            EventKind::End { status, reason } => {
                if !p.same_position(e.at, at) || *status != exit_status {
                    return diverged(
                        p,
                        format!("the run to end at {} with {}", e.at, e.kind),
                        format!("it ended at {at} with status {exit_status:?}: {end}"),
                    );
                }
                let _ = reason;
                p.consume();
                break;
            }
            _ => {
                return diverged(
                    p,
                    format!("{} at {}", e.kind, e.at),
                    format!("the run ended ({end})"),
                );
            }
        }
    }
    let Some(f) = footer else {
        return Verdict::TraceEnded {
            at: p.last_position(),
            detail: "the trace has no footer to check the final state against".into(),
        };
    };
    if let Some(d) = f.final_state_digest
        && d != final_digest
    {
        return diverged(
            p,
            format!("final state digest {d}"),
            format!("final state digest {final_digest}"),
        );
    }
    if !seeked && let Some(d) = f.serial_output_digest {
        let c = lock_capture(serial);
        if d != c.digest() || f.serial_output_bytes != c.total() {
            return diverged(
                p,
                format!(
                    "serial output of {} bytes, BLAKE3 {d}",
                    f.serial_output_bytes
                ),
                format!(
                    "serial output of {} bytes, BLAKE3 {}",
                    c.total(),
                    c.digest()
                ),
            );
        }
    }
    Verdict::Verified
}

/// The trace file a replay reads, for messages.
pub fn trace_name(path: &Path) -> PathBuf {
    path.to_path_buf()
}

/// Whether a trace reads as complete, for callers that want to warn before replaying.
pub fn trace_status(path: &Path) -> Result<TraceStatus, ReplayError> {
    Ok(TraceReader::open(path)?.status().clone())
}

/// Convenience for tests and tools: events of a trace as a vector.
pub fn read_events(path: &Path) -> Result<Vec<Event>, ReplayError> {
    let mut r = TraceReader::open(path)?;
    let events: Result<Vec<Event>, ReadError> = r.events().collect();
    Ok(events?)
}
