//! Engine selection and the run loop that joins a [`Machine`], a CPU engine and its
//! [`Host`](deja_machine::Host).
//!
//! The loop is the same for both engines and for live, recording and replaying hosts:
//! the engine runs until an exit; devices are polled at every device exit (exit-synchronous
//! delivery, engine independent) and, on engines that count instructions, also every
//! [`Host::poll_quantum`](deja_machine::Host::poll_quantum) instructions; a halted guest
//! idles until the next device deadline.
//!
//! A device exit here is the end of an exit group ([`deja_machine::exit_group`]): engines
//! keep the device exits of a repeated string instruction (one per element, counted in the
//! position) to themselves until its last one, so the loop polls, the observer runs and
//! interrupts are delivered at the same exit ordinals on kvm, which gets such instructions
//! in batches, and on bt, which executes them element by element.

mod boot;

pub use boot::{
    BtOptions, BuildError, GuestVisibleCpuid, build_vm, build_vm_with, guest_visible_cpuid,
};
/// The bt engine's tiers (`deja run --tier`), re-exported for [`BtOptions`].
pub use deja_bt::jit::Tier;
/// The bt engine's MMU strategies (`deja run --mmu`), re-exported for [`build_vm_with`].
pub use deja_bt::mmu::MmuStrategy;

use deja_machine::devices::StopRequest;
use deja_machine::{Cpu, CpuError, CpuState, EngineStats, Exit, Kicker, Limit, Machine};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Which CPU engine runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EngineKind {
    /// The host's KVM.
    Kvm,
    /// deja's binary translator.
    Bt,
}

impl EngineKind {
    /// The engine's name as the CLI spells it.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Kvm => "kvm",
            EngineKind::Bt => "bt",
        }
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Failures of the run loop.
#[derive(Debug, Error)]
pub enum RunError {
    /// The engine itself failed.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// A machine reset could not re-create the boot state.
    #[error("machine reset ({cause}) failed: {detail}")]
    Reset {
        /// What asked for the reset.
        cause: String,
        /// What went wrong.
        detail: String,
    },
}

/// What a machine reset needs to re-create the state at boot: the image (loaded again
/// exactly as at boot; a firmware ROM is still mapped and restarts from the reset vector)
/// and every device's state at boot. [`build_vm`] sets it; see [`Vm::set_reboot`].
pub struct ResetPlan {
    /// The image the machine booted.
    pub image: deja_machine::loader::Image,
    /// [`Machine::save_devices`] right after loading.
    pub devices: Vec<deja_machine::devices::DeviceState>,
    /// Whether the machine has firmware tables (ACPI, SMBIOS) to write again (the deja-pc
    /// machine), of the revision its configuration names.
    pub acpi_tables: bool,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// A device asked to stop (debug exit, reset, power off).
    Stopped(StopRequest),
    /// The CPU shut down (triple fault); `state` is the CPU state at that moment.
    Shutdown {
        /// The engine's explanation.
        reason: String,
        /// The CPU state when it happened.
        state: Box<CpuState>,
    },
    /// The time limit passed.
    Timeout,
    /// The instruction limit was reached (engines that count instructions).
    InstructionLimit,
    /// Another thread kicked the run (Ctrl-C).
    Interrupted,
}

/// Limits of one run.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Host wall-clock limit. It decides only when deja stops watching, never what the
    /// guest sees, so it does not go through the `Host`.
    pub timeout: Option<Duration>,
    /// Stop after exactly this many retired instructions (engines that count them).
    pub max_instructions: Option<u64>,
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// How it ended.
    pub end: RunEnd,
    /// Retired instructions (0 on engines that cannot count).
    pub icount: u64,
    /// Device exits.
    pub exits: u64,
    /// Engine and machine counters merged.
    pub stats: EngineStats,
    /// Host wall-clock time the run took.
    pub elapsed: Duration,
}

impl RunOutcome {
    /// The process exit status a run maps to: the value the guest wrote to isa-debug-exit
    /// (so a guest that writes 0 exits 0; QEMU would exit `(v << 1) | 1`), 0 for an orderly
    /// power-off or reset, and distinct codes for everything else (124 timeout, 125 triple
    /// fault, 130 interrupted).
    pub fn exit_status(&self) -> i32 {
        match &self.end {
            RunEnd::Stopped(StopRequest::DebugExit { value }) => (value & 0xff) as i32,
            RunEnd::Stopped(StopRequest::PowerOff) => 0,
            RunEnd::Stopped(StopRequest::Reset { .. } | StopRequest::Suspend) => 0,
            RunEnd::Shutdown { .. } => 125,
            RunEnd::Timeout => 124,
            RunEnd::InstructionLimit => 0,
            RunEnd::Interrupted => 130,
        }
    }
}

impl RunOutcome {
    /// One line saying how the run ended (what `deja run` prints).
    pub fn describe_end(&self) -> String {
        match &self.end {
            RunEnd::Stopped(StopRequest::DebugExit { value }) => format!(
                "guest wrote {value:#x} to debug-exit (exit status {}, QEMU's would be {})",
                self.exit_status(),
                (value << 1) | 1
            ),
            RunEnd::Stopped(StopRequest::Reset { source }) => {
                format!("guest reset the machine ({source})")
            }
            RunEnd::Stopped(StopRequest::PowerOff) => "guest powered off".to_string(),
            RunEnd::Stopped(StopRequest::Suspend) => {
                "guest suspended to RAM (ACPI S3; --no-reboot: not resumed)".to_string()
            }
            RunEnd::Shutdown { reason, .. } => format!("guest CPU shut down: {reason}"),
            RunEnd::Timeout => "time limit reached".to_string(),
            RunEnd::InstructionLimit => format!("instruction limit reached at {}", self.icount),
            RunEnd::Interrupted => "interrupted".to_string(),
        }
    }
}

/// A run's summary as `deja run --json` writes it (and `Display` prints its first line).
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// The image's name.
    pub image: String,
    /// The engine's name.
    pub engine: &'static str,
    /// How the run ended, in words.
    pub end: String,
    /// The process exit status it maps to.
    pub exit_status: i32,
    /// Retired instructions (0 where the engine cannot count).
    pub icount: u64,
    /// Device exits.
    pub exits: u64,
    /// Host seconds.
    pub elapsed_seconds: f64,
    /// Engine and machine counters.
    pub stats: std::collections::BTreeMap<String, u64>,
    /// The POST codes the guest wrote to port 0x80.
    pub post_codes: Vec<u8>,
    /// The CPU state at a shutdown (triple fault).
    pub shutdown_state: Option<CpuState>,
}

impl RunSummary {
    /// The summary of `outcome`, a run of `image` on `engine` that wrote `post_codes`.
    pub fn new(image: &str, engine: EngineKind, outcome: &RunOutcome, post_codes: Vec<u8>) -> Self {
        Self {
            image: image.to_string(),
            engine: engine.name(),
            end: outcome.describe_end(),
            exit_status: outcome.exit_status(),
            icount: outcome.icount,
            exits: outcome.exits,
            elapsed_seconds: outcome.elapsed.as_secs_f64(),
            stats: outcome.stats.counters.clone(),
            post_codes,
            shutdown_state: match &outcome.end {
                RunEnd::Shutdown { state, .. } => Some(state.as_ref().clone()),
                _ => None,
            },
        }
    }
}

impl std::fmt::Display for RunSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} on {}: {}; {} instructions, {} device exits, {:.3} s",
            self.image, self.engine, self.end, self.icount, self.exits, self.elapsed_seconds
        )
    }
}

/// A machine and the engine that runs it.
pub struct Vm {
    /// Memory, devices, host.
    pub machine: Machine,
    /// The CPU engine.
    pub cpu: Box<dyn Cpu>,
    next_poll: u64,
    reset_plan: Option<ResetPlan>,
    reboot: bool,
    stop_exits: Option<u64>,
}

/// Watches a run between exits; see [`Vm::run_observed`].
pub trait RunObserver {
    /// Called after each exit has been handled, with the CPU between instructions and
    /// `next_poll` the icount of the next scheduled device poll. Returns whether the run
    /// goes on.
    fn between_exits(&mut self, machine: &mut Machine, cpu: &mut dyn Cpu, next_poll: u64) -> bool;
}

/// The observer of a plain run.
struct NoObserver;

impl RunObserver for NoObserver {
    fn between_exits(&mut self, _: &mut Machine, _: &mut dyn Cpu, _: u64) -> bool {
        true
    }
}

/// Kicks the engine when a deadline passes, unless dropped first.
///
/// Dropping it does not wait for its thread (a join put a scheduler wake-up, milliseconds
/// on a loaded host, at the end of every timed run): the thread kicks only while holding
/// `cancelled` and finding it false, so once `drop` has set it, no kick can come later
/// (one that came before is cleared by the run loop's `kicker.take()`).
struct Watchdog {
    cancel: Option<std::sync::mpsc::Sender<()>>,
    cancelled: std::sync::Arc<std::sync::Mutex<bool>>,
}

impl Watchdog {
    fn start(timeout: Duration, kicker: Kicker) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let cancelled = std::sync::Arc::new(std::sync::Mutex::new(false));
        let flag = cancelled.clone();
        let _ = std::thread::Builder::new()
            .name("deja-watchdog".into())
            .spawn(move || {
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(timeout) {
                    let cancelled = flag.lock().unwrap_or_else(|e| e.into_inner());
                    if !*cancelled {
                        kicker.kick();
                    }
                }
            });
        Self {
            cancel: Some(tx),
            cancelled,
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        *self.cancelled.lock().unwrap_or_else(|e| e.into_inner()) = true;
        // Wakes the thread, which returns without kicking.
        drop(self.cancel.take());
    }
}

impl Vm {
    /// Joins a machine and an engine whose state has been set up (by a loader).
    pub fn new(machine: Machine, cpu: Box<dyn Cpu>) -> Self {
        Self {
            machine,
            cpu,
            next_poll: 0,
            reset_plan: None,
            reboot: false,
            stop_exits: None,
        }
    }

    /// Ends the run between two elements of a REP string instruction's exit group once the
    /// device-exit ordinal has reached `exits`, and makes [`RunOptions::max_instructions`]
    /// end it only once the ordinal is there too (see [`Limit::stop_at_exits`]): a replay
    /// stops where a recording was kicked inside an exit group, where the instruction has
    /// not retired, so the instruction count alone names only its start.
    pub fn set_stop_exits(&mut self, exits: Option<u64>) {
        self.stop_exits = exits;
    }

    /// Sets what a machine reset re-creates ([`build_vm`] does it).
    pub fn set_reset_plan(&mut self, plan: ResetPlan) {
        self.reset_plan = Some(plan);
    }

    /// Chooses what a reset request (0xcf9, port 0x92, the i8042) and a triple fault do.
    /// On (QEMU's default, `deja run` without `--no-reboot`): the machine resets (devices
    /// back to their boot state except the CMOS RTC, the image loaded again, the CPU in
    /// the loader's state) and the run goes on; the reset happens at the device exit or
    /// instruction that asked for it, so a recording replays it at the same position. Off
    /// (the library default, and `--no-reboot`): the run ends with
    /// [`RunEnd::Stopped`]`(Reset)` or [`RunEnd::Shutdown`]. Without a [`ResetPlan`] it
    /// stays off.
    pub fn set_reboot(&mut self, on: bool) {
        self.reboot = on;
    }

    /// Whether resets and triple faults reboot the machine.
    pub fn reboots(&self) -> bool {
        self.reboot && self.reset_plan.is_some()
    }

    /// Resets the machine as [`Vm::set_reboot`] describes.
    fn reset_machine(&mut self, cause: &str) -> Result<(), RunError> {
        let err = |detail: String| RunError::Reset {
            cause: cause.to_string(),
            detail,
        };
        let Some(plan) = &self.reset_plan else {
            return Err(err("the machine has no reset plan".into()));
        };
        self.machine
            .reset_devices(&plan.devices)
            .map_err(|e| err(e.to_string()))?;
        if plan.acpi_tables {
            deja_machine::tables::install_firmware_tables(
                &self.machine.mem,
                &self.machine.layout,
                &self.machine.config,
            )
            .map_err(|e| err(e.to_string()))?;
        }
        let state = deja_machine::loader::reload(&mut self.machine, &plan.image)
            .map_err(|e| err(e.to_string()))?;
        self.cpu.memory_rewritten();
        self.cpu.set_state(&state)?;
        Ok(())
    }

    /// ACPI S3 as QEMU with SeaBIOS does it, woken at once (deja has no wake-up source to
    /// wait for): the machine resets with RAM as it is (no image reload, no new ACPI
    /// tables), and the CPU resumes where the OS asked, in real mode at the FACS's
    /// Firmware_Waking_Vector, as SeaBIOS's resume path jumps there. Without a waking
    /// vector the firmware boots normally: a reset. It happens at the PM1 control write
    /// that asked for it, so a replay resumes at the same position.
    fn suspend_and_resume(&mut self) -> Result<(), RunError> {
        use deja_machine::devices::acpi;
        let vector = acpi::waking_vector(&self.machine.mem);
        if vector == 0 {
            return self.reset_machine("ACPI S3 without a waking vector");
        }
        let Some(plan) = &self.reset_plan else {
            return Err(RunError::Reset {
                cause: "ACPI S3".into(),
                detail: "the machine has no reset plan".into(),
            });
        };
        self.machine
            .reset_devices(&plan.devices)
            .map_err(|e| RunError::Reset {
                cause: "ACPI S3".into(),
                detail: e.to_string(),
            })?;
        self.cpu.set_state(&acpi::resume_state(vector))?;
        Ok(())
    }

    /// Engine counters and machine counters together.
    pub fn stats(&self) -> EngineStats {
        let mut s = self.cpu.stats();
        s.merge(&self.machine.stats());
        s
    }

    /// Runs until the guest stops, shuts down, or a limit passes.
    pub fn run(&mut self, opts: RunOptions) -> Result<RunOutcome, RunError> {
        self.run_observed(opts, &mut NoObserver)
    }

    /// The instruction count at which the run loop next polls devices (engines that count
    /// instructions): part of the machine's state for checkpoints.
    pub fn next_poll(&self) -> u64 {
        self.next_poll
    }

    /// Restores [`Vm::next_poll`] from a checkpoint.
    pub fn set_next_poll(&mut self, icount: u64) {
        self.next_poll = icount;
    }

    /// [`Vm::run`] with an observer called after every exit has been handled (devices
    /// polled), while the CPU is between instructions: the recorder takes state digests and
    /// checkpoints there, the replayer checks them. An observer that returns `false` ends the
    /// run with [`RunEnd::Interrupted`].
    pub fn run_observed(
        &mut self,
        opts: RunOptions,
        observer: &mut dyn RunObserver,
    ) -> Result<RunOutcome, RunError> {
        let started = Instant::now();
        let kicker = self.cpu.kicker();
        let watchdog = opts.timeout.map(|t| Watchdog::start(t, kicker.clone()));
        let counts = self.cpu.counts_instructions();
        if counts && self.next_poll <= self.cpu.icount() {
            self.schedule_poll();
        }
        let end = loop {
            let stop_at = if counts {
                Some(
                    opts.max_instructions
                        .map_or(self.next_poll, |m| m.min(self.next_poll)),
                )
            } else {
                None
            };
            // The exit condition goes with the run's own limit, not with a poll's (a poll due
            // at the same count comes first, as it came in the recording).
            let stop_at_exits = self
                .stop_exits
                .filter(|_| opts.max_instructions.is_none_or(|m| m < self.next_poll));
            let exit = self.cpu.run(
                &mut self.machine,
                Limit {
                    stop_at_icount: stop_at,
                    stop_at_exits,
                },
            )?;
            self.machine.set_icount(self.cpu.icount());
            if let Some(stop) = self.machine.take_stop() {
                match stop {
                    StopRequest::Reset { source } if self.reboots() => {
                        self.reset_machine(source)?;
                        continue;
                    }
                    StopRequest::Suspend if self.reboots() => {
                        self.suspend_and_resume()?;
                        continue;
                    }
                    _ => break RunEnd::Stopped(stop),
                }
            }
            match exit {
                Exit::InstructionLimit => {
                    // A poll due here happens before an instruction limit ends the run, so
                    // a run stopped at N has seen the same device activity at N whichever
                    // way it stopped (limit, or a kick that came right after this poll).
                    if self.cpu.icount() >= self.next_poll {
                        self.machine.poll();
                        self.schedule_poll();
                    }
                    let exits = self.machine.position().exits;
                    let at_max = opts
                        .max_instructions
                        .is_some_and(|m| self.cpu.icount() >= m);
                    if (at_max && self.stop_exits.is_none_or(|k| exits >= k))
                        || (opts.max_instructions.is_none()
                            && self.stop_exits.is_some_and(|k| exits >= k))
                    {
                        break RunEnd::InstructionLimit;
                    }
                }
                Exit::DeviceAccess => self.machine.poll(),
                Exit::Halted => {
                    self.machine.poll();
                    if !self.machine.interrupt_pending() && !self.machine.nmi_or_init_pending() {
                        self.machine.idle();
                    }
                }
                Exit::StopRequested => {}
                Exit::Shutdown { reason } => {
                    if self.reboots() {
                        // A triple fault resets the PC (the chipset turns shutdown into
                        // a reset), as QEMU does without --no-reboot.
                        self.reset_machine(&reason)?;
                        continue;
                    }
                    let state = Box::new(self.cpu.state()?);
                    break RunEnd::Shutdown { reason, state };
                }
                Exit::Kicked => {
                    let timed_out = opts.timeout.is_some_and(|t| started.elapsed() >= t);
                    break if timed_out {
                        RunEnd::Timeout
                    } else {
                        RunEnd::Interrupted
                    };
                }
            }
            if let Some(stop) = self.machine.take_stop() {
                match stop {
                    StopRequest::Reset { source } if self.reboots() => {
                        self.reset_machine(source)?
                    }
                    StopRequest::Suspend if self.reboots() => self.suspend_and_resume()?,
                    _ => break RunEnd::Stopped(stop),
                }
            }
            if !observer.between_exits(&mut self.machine, self.cpu.as_mut(), self.next_poll) {
                break RunEnd::Interrupted;
            }
        };
        drop(watchdog);
        // A kick that raced with another exit must not leak into the next run.
        kicker.take();
        Ok(RunOutcome {
            end,
            icount: self.cpu.icount(),
            exits: self.machine.position().exits,
            stats: self.stats(),
            elapsed: started.elapsed(),
        })
    }

    fn schedule_poll(&mut self) {
        let pos = self.machine.position();
        let quantum = self.machine.host.poll_quantum(pos).max(1);
        // Saturating: a quantum comes from the host, and a replayed one from a trace file.
        self.next_poll = self.cpu.icount().saturating_add(quantum);
    }
}
