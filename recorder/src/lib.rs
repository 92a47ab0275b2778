//! Live run to trace.
//!
//! [`Recorder`] builds a machine whose [`Host`] is a [`RecordingHost`]: every time read,
//! serial input byte, entropy value, poll quantum, idle period and interrupt delivery is
//! logged with its position into a [`deja_traces::TraceWriter`] as it happens (write-through,
//! so memory stays bounded and a crash loses at most one frame). Between exits the recorder
//! adds a state digest every [`RecordOptions::digest_interval`] events and, every
//! [`RecordOptions::checkpoint_every`] digests, a checkpoint (CPU, devices, changed pages) so
//! replay can seek and report register differences. Short runs log few events, so digests
//! also come at milestones of guest progress that double from a small start
//! ([`FIRST_EXIT_MILESTONE`] device exits, [`FIRST_ICOUNT_MILESTONE`] instructions): a
//! divergence in a short run shows within twice its distance from the start instead of only
//! at the footer, and a long trace gains only a few dozen digests. The guest's serial output
//! is teed into a digest for the footer.
//!
//! Delivery disciplines: on engines that count instructions (bt) interrupts land at exact
//! instruction boundaries decided by logged poll quanta ([`Delivery::InstructionExact`]);
//! on kvm without a PMU they land only at device exits ([`Delivery::ExitSynchronous`]),
//! which bt can also do, so such traces replay on either engine.

pub mod host;

pub use deja_snapshot::{
    MachineSnapshot, NO_POLL_QUANTUM, SerialCapture, SerialTee, StateDigester, StateError,
    describe_end, guest_cpuid, image_record, lock_capture, machine_cpuid_entry, machine_info,
    restore, snapshot, state, state_digest, trace_cpuid_entry,
};
pub use host::{Chaos, RecordingHost, Shared, TraceSink};

use deja_engine::{EngineKind, RunEnd, RunError, RunObserver, RunOptions, RunOutcome, Vm};
use deja_machine::devices::StopRequest;
use deja_machine::loader::Image;
use deja_machine::{
    ClockMode, Cpu, CpuError, Host, InterruptDelivery, Kicker, Machine, MachineConfig,
};
use deja_traces::{
    CheckpointInput, Delivery, Digest, EventKind, ExitInfo, FinishInfo, Footer, Header,
    RecordingOptions, ResetPolicy, TraceWriter, WriteError, WriterOptions,
};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use thiserror::Error;

/// Failures of a recording (the guest failing is not one: that is an outcome).
#[derive(Debug, Error)]
pub enum RecordError {
    /// The trace could not be started.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The machine could not be built.
    #[error("building the machine for {image} on {engine}: {detail}")]
    Build {
        /// The image.
        image: String,
        /// The engine.
        engine: EngineKind,
        /// The builder's explanation.
        detail: String,
    },
    /// The engine cannot deliver interrupts the way the recording needs.
    #[error("{engine} cannot record with {delivery:?} delivery: {source}")]
    Delivery {
        /// The engine.
        engine: EngineKind,
        /// The discipline asked for.
        delivery: Delivery,
        /// Why.
        source: CpuError,
    },
    /// The run loop failed (engine error).
    #[error("running the guest: {0}")]
    Run(#[from] RunError),
    /// Reading the machine state for a digest or checkpoint failed.
    #[error("taking a state digest at {at}: {source}")]
    State {
        /// Where.
        at: deja_traces::Position,
        /// Why.
        source: StateError,
    },
}

/// How to record.
#[derive(Debug, Clone)]
pub struct RecordOptions {
    /// The engine (goes into the header).
    pub engine: EngineKind,
    /// The clock the live host uses (goes into the header).
    pub clock: ClockMode,
    /// The delivery discipline; [`RecordOptions::new`] picks the engine's natural one.
    pub delivery: Delivery,
    /// A state digest every this many events, and at doubling milestones of device exits
    /// and instructions (0: only at the end).
    pub digest_interval: u64,
    /// A checkpoint at every this many digests (0: none). The first is full, later ones
    /// hold changed pages only.
    pub checkpoint_every: u64,
    /// No checkpoint closer than this many instructions to the previous one (engines that
    /// count instructions; 0: no minimum). A guest that reads the clock in tight loops (a
    /// kernel's delay loops) makes events, and so digests, every few hundred thousand
    /// instructions; checkpoints that close would cost more to write than a seek saves.
    pub checkpoint_min_instructions: u64,
    /// Chaos mode: poll quanta drawn from a generator with this seed.
    pub chaos_seed: Option<u64>,
    /// Largest chaos poll quantum, in instructions.
    pub chaos_max_quantum: u64,
    /// Limits of the run.
    pub run: RunOptions,
    /// Facts for humans in the header (host flavour, command line).
    pub notes: BTreeMap<String, String>,
    /// How the writer cuts frames.
    pub writer: WriterOptions,
    /// Whether a guest reset reboots the machine (the run goes on) or ends the run. Goes
    /// into the header, so a replay does the same; the recorder sets it on the machine it
    /// builds, whatever the build function chose.
    pub on_reset: ResetPolicy,
    /// A console line matching this is a failure (`--fail-on`): the recording stops
    /// [`RecordOptions::fail_grace_exits`] device exits later (so the rest of an oops is
    /// kept), and [`is_failure`] says so.
    pub fail_on: Option<regex::Regex>,
    /// Device exits the guest runs on after a `fail_on` match.
    pub fail_grace_exits: u64,
    /// Embed the images' bytes (kernel, initrd) in the trace (`--embed-images`, format 8),
    /// so that it replays where the files are not.
    pub embed_images: bool,
}

/// Default device exits a guest runs on after its console matched `--fail-on` (an oops of
/// a few KiB on a 16550A is a few thousand exits).
pub const DEFAULT_FAIL_GRACE_EXITS: u64 = 20_000;

/// Default events between state digests.
pub const DEFAULT_DIGEST_INTERVAL: u64 = 1024;
/// Default least distance between checkpoints, in instructions: about 40 ms of replay on
/// bt, so a seek replays at most that far after restoring the nearest one.
pub const DEFAULT_CHECKPOINT_MIN_INSTRUCTIONS: u64 = 1 << 22;
/// The device exit count of the first progress-milestone digest; each later milestone is
/// twice the previous one.
pub const FIRST_EXIT_MILESTONE: u64 = 16;
/// The instruction count of the first progress-milestone digest (engines that count
/// instructions); each later milestone is twice the previous one.
pub const FIRST_ICOUNT_MILESTONE: u64 = 1 << 16;
/// Default largest chaos poll quantum (instructions).
pub const DEFAULT_CHAOS_MAX_QUANTUM: u64 = 4000;

impl RecordOptions {
    /// Options for `engine` with its natural delivery: exact on bt, exit-synchronous on kvm.
    pub fn new(engine: EngineKind, clock: ClockMode) -> Self {
        Self {
            engine,
            clock,
            delivery: match engine {
                EngineKind::Bt => Delivery::InstructionExact,
                EngineKind::Kvm => Delivery::ExitSynchronous,
            },
            digest_interval: DEFAULT_DIGEST_INTERVAL,
            checkpoint_every: 1,
            checkpoint_min_instructions: DEFAULT_CHECKPOINT_MIN_INSTRUCTIONS,
            chaos_seed: None,
            chaos_max_quantum: DEFAULT_CHAOS_MAX_QUANTUM,
            run: RunOptions::default(),
            notes: BTreeMap::new(),
            writer: WriterOptions::default(),
            on_reset: ResetPolicy::Stop,
            fail_on: None,
            fail_grace_exits: DEFAULT_FAIL_GRACE_EXITS,
            embed_images: false,
        }
    }
}

/// Takes digests and checkpoints between exits.
struct Observer<'p> {
    progress: Option<&'p mut dyn FnMut(deja_traces::Position)>,
    shared: Arc<Mutex<Shared>>,
    serial: Arc<Mutex<SerialCapture>>,
    digester: StateDigester,
    /// Host time spent in [`Observer::digest_now`].
    state_time: std::time::Duration,
    /// Device exits to run on after a console failure match; where the run then stops.
    fail_grace_exits: u64,
    stop_at_exits: Option<u64>,
    digest_interval: u64,
    checkpoint_every: u64,
    checkpoint_min_instructions: u64,
    /// Where the last checkpoint was taken.
    last_checkpoint_icount: Option<u64>,
    /// Digests taken because `digest_interval` events had passed (checkpoints go with
    /// every `checkpoint_every`-th of them).
    digests: u64,
    checkpoints: u64,
    last_digest_at: Option<deja_machine::Position>,
    /// The next progress milestones that make a digest due.
    next_exit_milestone: u64,
    next_icount_milestone: u64,
    error: Option<RecordError>,
}

impl Observer<'_> {
    /// A digest here; `regular` when it is the events interval's (those carry the
    /// checkpoints), not only a progress milestone's.
    fn digest_now(&mut self, machine: &Machine, cpu: &mut dyn Cpu, next_poll: u64, regular: bool) {
        let pos = machine.position();
        while self.next_exit_milestone <= pos.exits {
            self.next_exit_milestone = self.next_exit_milestone.saturating_mul(2);
        }
        while self.next_icount_milestone <= pos.icount {
            self.next_icount_milestone = self.next_icount_milestone.saturating_mul(2);
        }
        let at = state::trace_position(pos);
        let output = lock_capture(&self.serial).take_pending();
        let mut s = host::lock(&self.shared);
        if !output.is_empty() {
            s.log(at, EventKind::SerialOutput { bytes: output });
        }
        let spaced = !cpu.counts_instructions()
            || self.last_checkpoint_icount.is_none_or(|last| {
                pos.icount.saturating_sub(last) >= self.checkpoint_min_instructions
            });
        let checkpoint = regular && {
            self.digests += 1;
            (self.checkpoint_every > 0 && self.digests % self.checkpoint_every == 1
                || self.checkpoint_every == 1)
                && spaced
        };
        if checkpoint {
            self.last_checkpoint_icount = Some(pos.icount);
        }
        let result = if checkpoint {
            let full = self.checkpoints == 0;
            snapshot(machine, cpu, next_poll, &mut self.digester, full).map(|snap| {
                s.log(
                    at,
                    EventKind::StateDigest {
                        digest: snap.digest,
                    },
                );
                if s.error.is_none()
                    && let Some(w) = s.writer.as_mut()
                {
                    let input = CheckpointInput {
                        position: snap.position,
                        cpu_state: snap.cpu_state,
                        device_state: snap.machine_state,
                        state_digest: Some(snap.digest),
                        full,
                    };
                    match w.checkpoint(input, snap.pages.iter().map(|(n, p)| (*n, p))) {
                        Ok(_) => self.checkpoints += 1,
                        Err(e) => s.error = Some(e),
                    }
                }
            })
        } else {
            cpu.state().map_err(StateError::from).map(|st| {
                let digest = self.digester.digest(machine, cpu, &st);
                // No checkpoint holds the CPU state here: the registers go with the digest.
                s.log(
                    at,
                    EventKind::Registers {
                        values: state::register_values(&st),
                    },
                );
                s.log(at, EventKind::StateDigest { digest });
            })
        };
        if regular {
            // Milestone digests come on top of the events interval's, which stays as it
            // was (so long traces get their checkpoints where they always did).
            s.since_digest = 0;
        }
        if let Err(source) = result {
            self.error = Some(RecordError::State { at, source });
        }
    }
}

impl RunObserver for Observer<'_> {
    fn between_exits(&mut self, machine: &mut Machine, cpu: &mut dyn Cpu, next_poll: u64) -> bool {
        if let Some(f) = self.progress.as_mut() {
            f(state::trace_position(machine.position()));
        }
        let pos = machine.position();
        let (regular, milestone) = {
            let s = host::lock(&self.shared);
            if s.error.is_some() {
                return false;
            }
            // A guest idling in HLT answers many questions at one position; a digest
            // there would repeat the previous one, so digests wait for progress.
            let enabled = self.digest_interval > 0 && self.last_digest_at != Some(pos);
            (
                enabled && s.since_digest >= self.digest_interval,
                enabled
                    && (pos.exits >= self.next_exit_milestone
                        || pos.icount >= self.next_icount_milestone),
            )
        };
        if regular || milestone {
            self.last_digest_at = Some(pos);
            let started = std::time::Instant::now();
            self.digest_now(machine, cpu, next_poll, regular);
            self.state_time += started.elapsed();
        }
        if self.stop_at_exits.is_none() && lock_capture(&self.serial).matched().is_some() {
            self.stop_at_exits = Some(pos.exits.saturating_add(self.fail_grace_exits));
        }
        if self.stop_at_exits.is_some_and(|k| pos.exits >= k) {
            return false;
        }
        self.error.is_none() && host::lock(&self.shared).error.is_none()
    }
}

/// What a recording produced.
#[derive(Debug)]
pub struct RecordOutcome {
    /// How the run went (`None` if a write error stopped it before it ended by itself is
    /// still reported here as an interrupted run).
    pub run: RunOutcome,
    /// The footer written, when the trace was finished.
    pub footer: Option<Footer>,
    /// The write error that cut the trace short, if any (the file keeps every whole frame).
    pub write_error: Option<String>,
    /// The console line that matched `--fail-on`, if one did.
    pub console_failure: Option<String>,
    /// How the run ended, as its End event says.
    pub end_reason: String,
    /// State digest at the end.
    pub final_digest: Digest,
    /// BLAKE3 of the guest's serial output.
    pub serial_digest: Digest,
    /// Bytes of serial output.
    pub serial_bytes: u64,
    /// Events logged.
    pub events: u64,
    /// Trace bytes written.
    pub trace_bytes: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
    /// Host seconds spent taking state digests and checkpoints (part of the run's time).
    pub state_seconds: f64,
    /// Guest pages hashed for them (dirty pages, plus whole-memory scans where the engine
    /// could not say what was written).
    pub pages_hashed: u64,
}

/// A recording's summary as `deja record --json` writes it (and `Display` prints).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecordSummary {
    /// The image's name.
    pub image: String,
    /// The engine's name.
    pub engine: &'static str,
    /// The trace file.
    pub trace: std::path::PathBuf,
    /// How the run ended, in words.
    pub end: String,
    /// The exit status the end maps to, if it ended in one.
    pub exit_status: Option<i32>,
    /// Retired instructions.
    pub icount: u64,
    /// Device exits.
    pub exits: u64,
    /// Events logged.
    pub events: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
    /// Trace bytes written.
    pub trace_bytes: u64,
    /// Host seconds.
    pub elapsed_seconds: f64,
    /// The state digest at the end.
    pub final_digest: Digest,
    /// BLAKE3 of the guest's serial output.
    pub serial_digest: Digest,
    /// The chaos seed, if chaos mode was on.
    pub chaos_seed: Option<u64>,
    /// The write error that cut the trace short, if any.
    pub write_error: Option<String>,
}

impl RecordSummary {
    /// The summary of recording `o` of `image` on `engine` into `trace`.
    pub fn new(
        image: &str,
        engine: EngineKind,
        trace: &std::path::Path,
        o: &RecordOutcome,
        chaos_seed: Option<u64>,
    ) -> Self {
        let exit_status = describe_end(&o.run.end).0;
        let end = o.end_reason.clone();
        Self {
            image: image.to_string(),
            engine: engine.name(),
            trace: trace.to_path_buf(),
            end,
            exit_status,
            icount: o.run.icount,
            exits: o.run.exits,
            events: o.events,
            checkpoints: o.checkpoints,
            trace_bytes: o.trace_bytes,
            elapsed_seconds: o.run.elapsed.as_secs_f64(),
            final_digest: o.final_digest,
            serial_digest: o.serial_digest,
            chaos_seed,
            write_error: o.write_error.clone(),
        }
    }
}

impl std::fmt::Display for RecordSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(e) = &self.write_error {
            return write!(
                f,
                "the trace could not be finished: {e}\n{} keeps every whole frame written \
                 before that ({} bytes); it replays up to there",
                self.trace.display(),
                self.trace_bytes
            );
        }
        let per_event = if self.events > 0 {
            self.trace_bytes as f64 / self.events as f64
        } else {
            0.0
        };
        write!(
            f,
            "recorded {} on {} ({}): {} instructions, {} exits, {} events, {} checkpoints, {} \
             bytes ({per_event:.1} bytes/event), {:.3} s -> {}",
            self.image,
            self.engine,
            self.end,
            self.icount,
            self.exits,
            self.events,
            self.checkpoints,
            self.trace_bytes,
            self.elapsed_seconds,
            self.trace.display()
        )
    }
}

/// A recording in progress: the machine is built, the header written.
pub struct Recorder {
    vm: Vm,
    scheme: deja_traces::DigestScheme,
    shared: Arc<Mutex<Shared>>,
    serial: Arc<Mutex<SerialCapture>>,
    opts: RecordOptions,
}

impl Recorder {
    /// Writes the header to `sink` and builds the machine with `build` (given the recording
    /// host and the teed serial output; the CLI passes `deja_engine::build_vm`).
    #[allow(clippy::too_many_arguments)]
    pub fn new<E: std::fmt::Display>(
        image: &Image,
        config: &MachineConfig,
        live: Box<dyn Host>,
        sink: TraceSink,
        sink_name: &str,
        serial_out: Box<dyn Write + Send>,
        serial: Arc<Mutex<SerialCapture>>,
        opts: RecordOptions,
        build: impl FnOnce(Box<dyn Host>, Box<dyn Write + Send>) -> Result<Vm, E>,
    ) -> Result<Self, RecordError> {
        let mut header = Header::new(
            opts.engine.name(),
            match opts.clock {
                ClockMode::Host => deja_traces::ClockMode::Host,
                ClockMode::Virtual => deja_traces::ClockMode::Virtual,
            },
            opts.delivery,
            machine_info(config),
        );
        header.images.push(image_record(image));
        if let Some(rd) = &image.initrd {
            // The initrd is part of the run's identity as the kernel is.
            header.images.push(deja_traces::ImageRecord::new(
                &rd.name,
                &rd.bytes,
                deja_snapshot::INITRD_LOAD,
                Vec::new(),
            ));
        }
        header.options = RecordingOptions {
            digest_interval: opts.digest_interval,
            checkpoint_interval: opts.digest_interval * opts.checkpoint_every,
            chaos_seed: opts.chaos_seed,
        };
        header.notes = opts.notes.clone();
        header.on_reset = opts.on_reset;
        header.guest_cpuid = guest_cpuid(opts.engine, &config.cpuid);
        header.host_cpu = Some(deja_traces::HostCpu::detect());
        let exit_sync = opts.delivery == Delivery::ExitSynchronous;
        // The machine is built before the header is written (the header names its devices,
        // for the digest scheme), with no writer yet: building asks the host nothing, and
        // an event logged meanwhile would be lost, so that is checked below.
        let shared = Arc::new(Mutex::new(Shared {
            writer: None,
            unwritten: 0,
            error: None,
            since_digest: 0,
            last: deja_traces::Position::default(),
            kicker: None,
            pending_empty_polls: None,
            pending_not_due: None,
            exits_only: exit_sync,
        }));
        let chaos = opts
            .chaos_seed
            .map(|seed| Chaos::new(seed, opts.chaos_max_quantum));
        let host = RecordingHost::new(live, shared.clone(), exit_sync, chaos);
        if let Some(pattern) = &opts.fail_on {
            lock_capture(&serial).watch_for(pattern.clone());
        }
        let tee = SerialTee::new(serial_out, serial.clone());
        let mut vm = build(Box::new(host), Box::new(tee)).map_err(|e| RecordError::Build {
            image: image.name.clone(),
            engine: opts.engine,
            detail: e.to_string(),
        })?;
        let scheme = state::current_digest_scheme(&vm.machine);
        header.digest_scheme = Some(scheme.clone());
        // The tables the machine was built with, which a replay must write again.
        header.firmware_revision = Some(vm.machine.config.firmware.number());
        let mut writer = TraceWriter::new(sink, sink_name, &header, opts.writer)?;
        if opts.embed_images {
            let initrd = image.initrd.as_deref().map(|rd| &rd.bytes[..]);
            for (index, bytes) in [Some(&image.bytes[..]), initrd]
                .into_iter()
                .flatten()
                .enumerate()
            {
                writer.embed_image(index as u32, bytes)?;
            }
        }
        {
            let mut s = host::lock(&shared);
            if s.unwritten != 0 {
                return Err(RecordError::Build {
                    image: image.name.clone(),
                    engine: opts.engine,
                    detail: "building the machine asked the host for an input, which would \
                             have gone unrecorded"
                        .into(),
                });
            }
            s.writer = Some(writer);
        }
        vm.set_reboot(opts.on_reset == ResetPolicy::Reboot);
        let delivery = if exit_sync {
            InterruptDelivery::AtExits
        } else if vm.cpu.counts_instructions() {
            InterruptDelivery::Exact
        } else {
            return Err(RecordError::Delivery {
                engine: opts.engine,
                delivery: opts.delivery,
                source: CpuError::Unsupported {
                    engine: vm.cpu.name(),
                    rip: 0,
                    detail: "it cannot count instructions, so it cannot deliver interrupts at \
                             recorded instruction boundaries; record exit-synchronously"
                        .into(),
                },
            });
        };
        vm.cpu
            .set_interrupt_delivery(delivery)
            .map_err(|source| RecordError::Delivery {
                engine: opts.engine,
                delivery: opts.delivery,
                source,
            })?;
        host::lock(&shared).kicker = Some(vm.cpu.kicker());
        Ok(Self {
            vm,
            scheme,
            shared,
            serial,
            opts,
        })
    }

    /// A handle that stops the recording cleanly (Ctrl-C, SIGTERM): the trace is finished.
    pub fn kicker(&self) -> Kicker {
        self.vm.cpu.kicker()
    }

    /// The machine being recorded.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Runs the guest to its end and finishes the trace.
    pub fn run(self) -> Result<RecordOutcome, RecordError> {
        self.run_with_progress(None)
    }

    /// [`Recorder::run`], telling `progress` the position between exits (for progress
    /// displays).
    pub fn run_with_progress(
        mut self,
        progress: Option<&mut dyn FnMut(deja_traces::Position)>,
    ) -> Result<RecordOutcome, RecordError> {
        let mut observer = Observer {
            progress,
            shared: self.shared.clone(),
            serial: self.serial.clone(),
            digester: StateDigester::new(self.scheme.clone()),
            state_time: std::time::Duration::ZERO,
            fail_grace_exits: self.opts.fail_grace_exits,
            stop_at_exits: None,
            digest_interval: self.opts.digest_interval,
            checkpoint_every: self.opts.checkpoint_every,
            checkpoint_min_instructions: self.opts.checkpoint_min_instructions,
            last_checkpoint_icount: None,
            digests: 0,
            checkpoints: 0,
            last_digest_at: None,
            next_exit_milestone: FIRST_EXIT_MILESTONE,
            next_icount_milestone: FIRST_ICOUNT_MILESTONE,
            error: None,
        };
        let run = self.vm.run_observed(self.opts.run, &mut observer)?;
        if let Some(e) = observer.error.take() {
            return Err(e);
        }
        let machine = &self.vm.machine;
        let at = state::trace_position(machine.position());
        let cpu_state = self.vm.cpu.state().map_err(|e| RecordError::State {
            at,
            source: e.into(),
        })?;
        let final_digest = observer
            .digester
            .digest(machine, self.vm.cpu.as_mut(), &cpu_state);
        let (status, mut reason) = describe_end(&run.end);
        let console_failure = lock_capture(&self.serial).matched().map(str::to_string);
        if let Some(line) = &console_failure
            && observer.stop_at_exits.is_some_and(|k| run.exits >= k)
        {
            reason = console_match(line);
        }
        let end_reason = reason.clone();
        let (serial_digest, serial_bytes, output) = {
            let mut c = lock_capture(&self.serial);
            (c.digest(), c.total(), c.take_pending())
        };
        let mut s = host::lock(&self.shared);
        if !output.is_empty() {
            s.log(at, EventKind::SerialOutput { bytes: output });
        }
        s.log(
            at,
            EventKind::End {
                status,
                reason: reason.clone(),
            },
        );
        let writer = s.writer.take();
        let mut write_error = s.error.take().map(|e| e.to_string());
        let at = if s.last.at_or_before(&at) { at } else { s.last };
        drop(s);
        let mut footer = None;
        let mut events = 0;
        let mut trace_bytes = 0;
        if let Some(w) = writer {
            events = w.events_written();
            trace_bytes = w.bytes_written();
            if write_error.is_none() {
                // An exit-synchronous recording stopped from outside (Ctrl-C, timeout) ran on
                // past its last exit by a number of instructions nobody counted: its final
                // state is not a reproducible position, so the footer claims no digest.
                // Nor does a bt recording kicked between two RAM-only elements of a REP
                // string instruction: its position names the instruction, not the element.
                let reproducible = status.is_some()
                    || (self.opts.delivery == Delivery::InstructionExact
                        && !self.vm.cpu.stopped_inside_instruction());
                match w.finish(FinishInfo {
                    final_position: at,
                    final_state_digest: reproducible.then_some(final_digest),
                    serial_output_digest: Some(serial_digest),
                    serial_output_bytes: serial_bytes,
                    exit: ExitInfo { status, reason },
                }) {
                    Ok((_, f)) => {
                        footer = Some(f);
                    }
                    Err(e) => write_error = Some(e.to_string()),
                }
            } else {
                drop(w.into_inner());
            }
        }
        Ok(RecordOutcome {
            run,
            footer,
            write_error,
            console_failure,
            end_reason,
            final_digest,
            serial_digest,
            serial_bytes,
            events,
            trace_bytes,
            checkpoints: observer.checkpoints,
            state_seconds: observer.state_time.as_secs_f64(),
            pages_hashed: observer.digester.memory().pages_hashed,
        })
    }
}

/// The end reason of a run stopped because its console matched `--fail-on`.
fn console_match(line: &str) -> String {
    format!("the console matched --fail-on: {line}")
}

impl RecordOutcome {
    /// What made the recording a failure (a console match) or else how it ended, for a
    /// line per `--until-failure` attempt.
    pub fn verdict(&self) -> String {
        self.console_failure
            .as_deref()
            .map_or_else(|| self.end_reason.clone(), console_match)
    }
}

/// Whether a recording is a failure worth keeping: its console matched `--fail-on`, the
/// guest wrote a non-zero status to debug-exit, or its CPU shut down.
pub fn is_failure(outcome: &RecordOutcome) -> bool {
    outcome.console_failure.is_some()
        || match &outcome.run.end {
            RunEnd::Stopped(StopRequest::DebugExit { value }) => *value != 0,
            RunEnd::Shutdown { .. } => true,
            _ => false,
        }
}

/// What [`record_until_failure`] found.
#[derive(Debug)]
pub struct UntilFailure {
    /// Attempts made.
    pub attempts: u64,
    /// The chaos seed of the failing attempt, if one failed.
    pub failing_seed: Option<u64>,
    /// The last attempt's outcome (the failing one, if any).
    pub last: Option<RecordOutcome>,
}

/// Records again and again, each time with the next chaos seed from `first_seed`, until the
/// guest fails or `max_attempts` have run, or an attempt ends without the guest ending
/// (interrupted, timed out). Each attempt writes `path` with `.attempt` appended; a failing
/// attempt's trace is renamed to `path`, the others are removed. `record_one(trace_path,
/// seed)` makes one recording; `progress(attempt, seed, outcome)` hears about each.
pub fn record_until_failure(
    path: &std::path::Path,
    max_attempts: u64,
    first_seed: u64,
    mut record_one: impl FnMut(&std::path::Path, u64) -> Result<RecordOutcome, RecordError>,
    mut progress: impl FnMut(u64, u64, &RecordOutcome),
) -> Result<UntilFailure, RecordError> {
    let mut attempt_path = path.as_os_str().to_owned();
    attempt_path.push(".attempt");
    let attempt_path = std::path::PathBuf::from(attempt_path);
    let mut result = UntilFailure {
        attempts: 0,
        failing_seed: None,
        last: None,
    };
    for i in 0..max_attempts {
        let seed = first_seed.wrapping_add(i);
        let outcome = record_one(&attempt_path, seed)?;
        result.attempts += 1;
        progress(i + 1, seed, &outcome);
        let failed = is_failure(&outcome);
        let ended = matches!(
            outcome.run.end,
            RunEnd::Stopped(_) | RunEnd::Shutdown { .. }
        );
        result.last = Some(outcome);
        if failed {
            std::fs::rename(&attempt_path, path).map_err(|source| {
                RecordError::Write(WriteError::Create {
                    name: path.display().to_string(),
                    source,
                })
            })?;
            result.failing_seed = Some(seed);
            return Ok(result);
        }
        let _ = std::fs::remove_file(&attempt_path);
        if !ended {
            break;
        }
    }
    Ok(result)
}
