//! A gdb remote stub over a deja replay: stock gdb debugs a recording, forwards and
//! backwards, without ever changing it.
//!
//! [`ReplayTarget`] puts a [`ReplaySession`] behind gdb's remote serial protocol (through the
//! `gdbstub` crate): registers in deja's fixed 64-bit description ([`arch`]), memory at
//! virtual addresses through the guest's page tables at the stop, software and hardware
//! breakpoints and watchpoints kept by deja (never written into guest memory), `c`/`s`/
//! `vCont`, Ctrl-C, and the reverse extensions `bs`/`bc` with `replaylog` stops at the ends
//! of the recording. `monitor` commands give rr's time coordinates: `when`, `seek N`,
//! `checkpoint`, `restart K`, and `phys ADDR [LEN]` for physical memory.
//!
//! Nothing a debugger sends changes the replay: register and memory writes are refused with
//! a message on the stub's standard error (a replayed guest must do what the recording did),
//! and every run goes through the replay's checks, so a divergence shows as a stop with
//! SIGABRT and the replay's report.

pub mod arch;
pub mod live;

use arch::{DejaRegs, DejaX86};
use deja_machine::CpuState;
use deja_replayer::ReplayError;
use deja_replayer::session::{Access, ReplaySession, Stop};
use deja_traces::Position;
use gdbstub::common::{Pid, Signal};
use gdbstub::conn::ConnectionExt;
use gdbstub::stub::{DisconnectReason, GdbStub, SingleThreadStopReason, run_blocking};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::base::reverse_exec::{
    ReplayLogPosition, ReverseCont, ReverseContOps, ReverseStep, ReverseStepOps,
};
use gdbstub::target::ext::base::singlethread::{
    SingleThreadBase, SingleThreadResume, SingleThreadResumeOps, SingleThreadSingleStep,
    SingleThreadSingleStepOps,
};
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, HwWatchpoint, HwWatchpointOps,
    SwBreakpoint, SwBreakpointOps, WatchKind,
};
use gdbstub::target::ext::extended_mode::{
    Args, AttachKind, ExtendedMode, ExtendedModeOps, ShouldTerminate,
};
use gdbstub::target::ext::monitor_cmd::{ConsoleOutput, MonitorCmd, MonitorCmdOps, outputln};
use gdbstub::target::{Target, TargetError, TargetResult};
use std::collections::BTreeSet;
use thiserror::Error;

/// Failures that end a gdb session (anything gdb asks that cannot be done is answered with
/// an error reply instead).
#[derive(Debug, Error)]
pub enum GdbError {
    /// The replay failed (not a divergence: that is reported to gdb as a stop).
    #[error("replay: {0}")]
    Replay(#[from] ReplayError),
    /// Listening for or talking to gdb failed.
    #[error("gdb connection on {address}: {source}")]
    Connection {
        /// Where deja listened.
        address: String,
        /// The error.
        source: std::io::Error,
    },
    /// The protocol machinery failed.
    #[error("gdb protocol: {0}")]
    Protocol(String),
    /// A live run failed.
    #[error("running: {0}")]
    Run(#[from] deja_engine::RunError),
    /// The live engine failed.
    #[error("the engine: {0}")]
    Cpu(#[from] deja_machine::CpuError),
    /// A live run cannot do what was asked.
    #[error("{0}")]
    Refused(String),
}

/// What gdb asked the target to do at the last resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Continue,
    Step,
    ReverseStep,
    ReverseContinue,
}

/// A watchpoint as gdb set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Watchpoint {
    addr: u64,
    len: u64,
    kind: WatchKind,
}

/// What gdb debugs: a replay session (every command) or a live run (forward only).
pub trait Debuggee {
    /// The current position.
    fn position(&self) -> Position;
    /// The CPU state here.
    fn cpu_state(&mut self) -> Result<CpuState, GdbError>;
    /// Reads memory at a virtual address through the page tables here.
    fn read_virtual(&mut self, addr: u64, buf: &mut [u8]) -> Result<usize, GdbError>;
    /// Reads guest-physical memory.
    fn read_physical(&self, addr: u64, buf: &mut [u8]) -> usize;
    /// The physical address of a virtual one here.
    fn translate(&mut self, addr: u64) -> Result<Option<u64>, GdbError>;
    /// Replaces the breakpoints (linear addresses).
    fn set_breakpoints(&mut self, linear: &[u64]);
    /// Watches `access` accesses to `len` bytes at virtual `virt`.
    fn add_watch(&mut self, virt: u64, len: u64, access: Access) -> Result<(), GdbError>;
    /// Stops watching them.
    fn remove_watch(&mut self, virt: u64, len: u64, access: Access) -> bool;
    /// One instruction forward.
    fn step(&mut self) -> Result<Stop, GdbError>;
    /// Forward to the next breakpoint or watched store.
    fn resume(&mut self, interrupt: &mut dyn FnMut() -> bool) -> Result<Stop, GdbError>;
    /// Whether it can go backwards and seek (a replay) or not (a live run).
    fn reversible(&self) -> bool;
    /// One instruction back.
    fn reverse_step(&mut self) -> Result<Stop, GdbError>;
    /// Back to the last breakpoint or watched store.
    fn reverse_resume(&mut self) -> Result<Stop, GdbError>;
    /// To instruction count `n`.
    fn seek(&mut self, n: u64) -> Result<Stop, GdbError>;
    /// A restore point here; its position.
    fn checkpoint(&mut self) -> Result<Position, GdbError>;
    /// State digests checked so far (a replay's).
    fn digests_checked(&self) -> u64;
    /// Whether a replay diverged.
    fn diverged(&self) -> bool;
    /// Restore points held, the bytes they hold, restores done and the pages they wrote (a
    /// replay's; `None` for a live run).
    fn restore_stats(&self) -> Option<(usize, u64, u64, u64)> {
        None
    }
}

impl Debuggee for ReplaySession {
    fn position(&self) -> Position {
        ReplaySession::position(self)
    }
    fn cpu_state(&mut self) -> Result<CpuState, GdbError> {
        Ok(ReplaySession::cpu_state(self)?)
    }
    fn read_virtual(&mut self, addr: u64, buf: &mut [u8]) -> Result<usize, GdbError> {
        Ok(ReplaySession::read_virtual(self, addr, buf)?)
    }
    fn read_physical(&self, addr: u64, buf: &mut [u8]) -> usize {
        ReplaySession::read_physical(self, addr, buf)
    }
    fn translate(&mut self, addr: u64) -> Result<Option<u64>, GdbError> {
        Ok(ReplaySession::translate(self, addr)?)
    }
    fn set_breakpoints(&mut self, linear: &[u64]) {
        ReplaySession::set_breakpoints(self, linear)
    }
    fn add_watch(&mut self, virt: u64, len: u64, access: Access) -> Result<(), GdbError> {
        Ok(ReplaySession::add_watch(self, virt, len, access)?)
    }
    fn remove_watch(&mut self, virt: u64, len: u64, access: Access) -> bool {
        ReplaySession::remove_watch(self, virt, len, access)
    }
    fn step(&mut self) -> Result<Stop, GdbError> {
        Ok(ReplaySession::step(self)?)
    }
    fn resume(&mut self, interrupt: &mut dyn FnMut() -> bool) -> Result<Stop, GdbError> {
        Ok(ReplaySession::resume(self, interrupt)?)
    }
    fn reversible(&self) -> bool {
        true
    }
    fn reverse_step(&mut self) -> Result<Stop, GdbError> {
        Ok(ReplaySession::reverse_step(self)?)
    }
    fn reverse_resume(&mut self) -> Result<Stop, GdbError> {
        Ok(ReplaySession::reverse_resume(self)?)
    }
    fn seek(&mut self, n: u64) -> Result<Stop, GdbError> {
        Ok(ReplaySession::seek(self, n)?)
    }
    fn checkpoint(&mut self) -> Result<Position, GdbError> {
        Ok(ReplaySession::checkpoint(self)?)
    }
    fn digests_checked(&self) -> u64 {
        ReplaySession::digests_checked(self)
    }
    fn diverged(&self) -> bool {
        self.divergence().is_some()
    }
    fn restore_stats(&self) -> Option<(usize, u64, u64, u64)> {
        let (held, bytes) = self.snapshots_held();
        let s = self.stats();
        Some((held, bytes, s.restores, s.pages_restored))
    }
}

/// The accesses a gdb watchpoint of `kind` stops at.
fn access(kind: WatchKind) -> Access {
    match kind {
        WatchKind::Write => Access::Write,
        WatchKind::Read => Access::Read,
        WatchKind::ReadWrite => Access::ReadWrite,
    }
}

/// A replay session served to gdb.
pub type ReplayTarget = DebugTarget<ReplaySession>;

/// A [`Debuggee`] served to gdb.
pub struct DebugTarget<D: Debuggee> {
    session: D,
    sw: BTreeSet<u64>,
    hw: BTreeSet<u64>,
    watches: Vec<Watchpoint>,
    action: Option<Action>,
    checkpoints: Vec<deja_traces::Position>,
    /// gdb connected with `target extended-remote`: `kill` keeps the session for a `run`.
    extended: bool,
    /// Where the stub says what it refused and why (standard error in the CLI).
    log: Box<dyn FnMut(&str) + Send>,
}

/// An instruction count as gdb's user typed it: decimal, `0x` hex, `_` separators allowed.
fn parse_count(t: &str) -> Option<u64> {
    let t = t.trim().replace('_', "");
    match t.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => t.parse().ok(),
    }
}

impl<D: Debuggee> DebugTarget<D> {
    /// Serves `session`; `log` hears the stub's explanations (refused writes, divergences).
    pub fn new(session: D, log: Box<dyn FnMut(&str) + Send>) -> Self {
        Self {
            session,
            sw: BTreeSet::new(),
            hw: BTreeSet::new(),
            watches: Vec::new(),
            action: None,
            checkpoints: Vec::new(),
            extended: false,
            log,
        }
    }

    /// The session (to read its verdict after gdb detaches).
    pub fn session(&mut self) -> &mut D {
        &mut self.session
    }

    fn sync_breakpoints(&mut self) {
        let all: Vec<u64> = self.sw.union(&self.hw).copied().collect();
        self.session.set_breakpoints(&all);
    }

    fn refuse_write(&mut self, what: &str) {
        (self.log)(&format!(
            "deja gdb: refused to write {what}: this is a replay, and a changed state would \
             make it diverge from the recording (use `monitor seek` to move in time instead)"
        ));
    }

    /// Carries out the pending action; `interrupt` says whether gdb sent something.
    fn run(
        &mut self,
        interrupt: &mut dyn FnMut() -> bool,
    ) -> Result<Option<SingleThreadStopReason<u64>>, GdbError> {
        let Some(action) = self.action.take() else {
            return Ok(Some(SingleThreadStopReason::DoneStep));
        };
        let stop = match action {
            Action::Continue => self.session.resume(interrupt)?,
            Action::Step => self.session.step()?,
            Action::ReverseStep => self.session.reverse_step()?,
            Action::ReverseContinue => self.session.reverse_resume()?,
        };
        Ok(Some(match stop {
            Stop::Reached => SingleThreadStopReason::DoneStep,
            Stop::Breakpoint(addr) if self.sw.contains(&addr) => {
                SingleThreadStopReason::SwBreak(())
            }
            Stop::Breakpoint(_) => SingleThreadStopReason::HwBreak(()),
            Stop::Watch {
                address, access, ..
            } => SingleThreadStopReason::Watch {
                tid: (),
                kind: match access {
                    Access::Write => WatchKind::Write,
                    Access::Read => WatchKind::Read,
                    Access::ReadWrite => WatchKind::ReadWrite,
                },
                addr: address,
            },
            Stop::Interrupted => {
                // gdb sent something: the run goes on once it is handled (unless it is a
                // Ctrl-C, which `on_interrupt` turns into a stop).
                self.action = Some(Action::Continue);
                return Ok(None);
            }
            // A live run has no log to reach the end of: its guest is gone.
            Stop::End if !self.session.reversible() => SingleThreadStopReason::Exited(0),
            Stop::End => SingleThreadStopReason::ReplayLog {
                tid: None,
                pos: ReplayLogPosition::End,
            },
            Stop::Start => SingleThreadStopReason::ReplayLog {
                tid: None,
                pos: ReplayLogPosition::Begin,
            },
            Stop::Diverged(d) => {
                (self.log)(&format!("deja gdb: the replay diverged:\n{d}"));
                SingleThreadStopReason::Signal(Signal::SIGABRT)
            }
        }))
    }

    fn monitor(&mut self, cmd: &str, out: &mut ConsoleOutput<'_>) -> Result<(), GdbError> {
        let mut words = cmd.split_whitespace();
        let verb = words.next().unwrap_or("help");
        let arg = words.next();
        let num = |t: Option<&str>| t.and_then(parse_count);
        if !self.session.reversible() && matches!(verb, "seek" | "run" | "checkpoint" | "restart") {
            outputln!(
                out,
                "a live run goes forward only: {verb} needs a replay (deja replay --gdb)"
            );
            return Ok(());
        }
        match verb {
            "when" => {
                let p = self.session.position();
                outputln!(out, "icount {} exit #{}", p.icount, p.exits);
            }
            "seek" | "run" => match num(arg) {
                Some(n) => {
                    let stop = self.session.seek(n)?;
                    let p = self.session.position();
                    match stop {
                        Stop::Diverged(d) => outputln!(out, "the replay diverged:\n{d}"),
                        Stop::End if p.icount < n => outputln!(
                            out,
                            "the recording ends at icount {} exit #{}",
                            p.icount,
                            p.exits
                        ),
                        _ => outputln!(out, "at icount {} exit #{}", p.icount, p.exits),
                    }
                }
                None => outputln!(out, "usage: monitor seek ICOUNT"),
            },
            "checkpoint" => {
                let p = self.session.checkpoint()?;
                self.checkpoints.push(p);
                outputln!(
                    out,
                    "checkpoint {} at icount {} exit #{}",
                    self.checkpoints.len() - 1,
                    p.icount,
                    p.exits
                );
            }
            "restart" => match num(arg).and_then(|k| self.checkpoints.get(k as usize).copied()) {
                Some(p) => {
                    self.session.seek(p.icount)?;
                    let now = self.session.position();
                    outputln!(out, "at icount {} exit #{}", now.icount, now.exits);
                }
                None => outputln!(
                    out,
                    "usage: monitor restart K, K one of the {} checkpoints taken",
                    self.checkpoints.len()
                ),
            },
            "phys" => match num(arg) {
                Some(addr) => {
                    let len = num(words.next()).unwrap_or(64).min(4096) as usize;
                    let mut buf = vec![0u8; len];
                    let n = self.session.read_physical(addr, &mut buf);
                    if n == 0 {
                        outputln!(out, "no RAM or ROM at physical {addr:#x}");
                    }
                    for (i, chunk) in buf[..n].chunks(16).enumerate() {
                        let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
                        outputln!(out, "{:#014x}: {}", addr + 16 * i as u64, hex.join(" "));
                    }
                }
                None => outputln!(out, "usage: monitor phys ADDR [LEN]"),
            },
            "translate" => match num(arg) {
                Some(addr) => match self.session.translate(addr)? {
                    Some(p) => outputln!(out, "{addr:#x} -> physical {p:#x}"),
                    None => outputln!(out, "{addr:#x} is not mapped here"),
                },
                None => outputln!(out, "usage: monitor translate VADDR"),
            },
            "stats" => match self.session.restore_stats() {
                Some((held, bytes, restores, pages)) => outputln!(
                    out,
                    "{held} restore points in memory holding {} KiB; {restores} restores \
                     wrote {pages} pages",
                    bytes / 1024
                ),
                None => outputln!(out, "a live run keeps no restore points"),
            },
            "digests" => {
                outputln!(
                    out,
                    "{} state digests checked, all matched{}",
                    self.session.digests_checked(),
                    if self.session.diverged() {
                        " until the divergence"
                    } else {
                        ""
                    }
                );
            }
            _ => {
                outputln!(out, "deja monitor commands:");
                outputln!(
                    out,
                    "  when              instruction count and device-exit ordinal here"
                );
                outputln!(
                    out,
                    "  seek N            go to instruction count N (forwards or backwards)"
                );
                outputln!(
                    out,
                    "  checkpoint        remember this position (cheap to come back to)"
                );
                outputln!(out, "  restart K         go back to checkpoint K");
                outputln!(out, "  phys ADDR [LEN]   guest-physical memory");
                outputln!(
                    out,
                    "  translate VADDR   the physical address a virtual one maps to"
                );
                outputln!(out, "  digests           state digests verified so far");
                outputln!(
                    out,
                    "  stats             restore points held and what restores cost"
                );
                outputln!(
                    out,
                    "after seek/restart, gdb's cached registers are stale: `maint flush \
                     register-cache` (or `stepi` then `reverse-stepi`) reloads them"
                );
            }
        }
        Ok(())
    }
}

impl<D: Debuggee> Target for DebugTarget<D> {
    type Arch = DejaX86;
    type Error = GdbError;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::SingleThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }

    fn support_monitor_cmd(&mut self) -> Option<MonitorCmdOps<'_, Self>> {
        Some(self)
    }

    fn support_extended_mode(&mut self) -> Option<ExtendedModeOps<'_, Self>> {
        Some(self)
    }

    // Breakpoints live in deja, not in guest memory: gdb must not plant INT3s.
    fn guard_rail_implicit_sw_breakpoints(&self) -> bool {
        true
    }

    // Acks stay on: a session that goes on after a bad packet starts a fresh protocol
    // state, which would not know that acks had been turned off.
    fn use_no_ack_mode(&self) -> bool {
        false
    }
}

impl<D: Debuggee> SingleThreadBase for DebugTarget<D> {
    fn read_registers(&mut self, regs: &mut DejaRegs) -> TargetResult<(), Self> {
        let s = self.session.cpu_state().map_err(TargetError::Fatal)?;
        *regs = DejaRegs::from_state(&s);
        Ok(())
    }

    fn write_registers(&mut self, _regs: &DejaRegs) -> TargetResult<(), Self> {
        self.refuse_write("registers");
        Err(TargetError::Errno(1))
    }

    fn read_addrs(&mut self, start_addr: u64, data: &mut [u8]) -> TargetResult<usize, Self> {
        let n = self
            .session
            .read_virtual(start_addr, data)
            .map_err(TargetError::Fatal)?;
        if n == 0 && !data.is_empty() {
            return Err(TargetError::Errno(14));
        }
        Ok(n)
    }

    fn write_addrs(&mut self, start_addr: u64, data: &[u8]) -> TargetResult<(), Self> {
        if data.is_empty() {
            // gdb's probe for the X packet writes nothing: nothing to refuse.
            return Ok(());
        }
        self.refuse_write(&format!(
            "{} bytes of memory at {start_addr:#x}",
            data.len()
        ));
        Err(TargetError::Errno(1))
    }

    fn support_resume(&mut self) -> Option<SingleThreadResumeOps<'_, Self>> {
        Some(self)
    }
}

impl<D: Debuggee> SingleThreadResume for DebugTarget<D> {
    fn resume(&mut self, _signal: Option<Signal>) -> Result<(), Self::Error> {
        // A replayed guest has no signals to take: C and S resume as c and s.
        self.action = Some(Action::Continue);
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<SingleThreadSingleStepOps<'_, Self>> {
        Some(self)
    }

    fn support_reverse_step(&mut self) -> Option<ReverseStepOps<'_, (), Self>> {
        if self.session.reversible() {
            Some(self)
        } else {
            None
        }
    }

    fn support_reverse_cont(&mut self) -> Option<ReverseContOps<'_, (), Self>> {
        if self.session.reversible() {
            Some(self)
        } else {
            None
        }
    }
}

impl<D: Debuggee> SingleThreadSingleStep for DebugTarget<D> {
    fn step(&mut self, _signal: Option<Signal>) -> Result<(), Self::Error> {
        self.action = Some(Action::Step);
        Ok(())
    }
}

impl<D: Debuggee> ReverseStep<()> for DebugTarget<D> {
    fn reverse_step(&mut self, _tid: ()) -> Result<(), Self::Error> {
        self.action = Some(Action::ReverseStep);
        Ok(())
    }
}

impl<D: Debuggee> ReverseCont<()> for DebugTarget<D> {
    fn reverse_cont(&mut self) -> Result<(), Self::Error> {
        self.action = Some(Action::ReverseContinue);
        Ok(())
    }
}

impl<D: Debuggee> Breakpoints for DebugTarget<D> {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_watchpoint(&mut self) -> Option<HwWatchpointOps<'_, Self>> {
        Some(self)
    }
}

impl<D: Debuggee> SwBreakpoint for DebugTarget<D> {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        self.sw.insert(addr);
        self.sync_breakpoints();
        Ok(true)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        let had = self.sw.remove(&addr);
        self.sync_breakpoints();
        Ok(had)
    }
}

impl<D: Debuggee> HwBreakpoint for DebugTarget<D> {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        self.hw.insert(addr);
        self.sync_breakpoints();
        Ok(true)
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        let had = self.hw.remove(&addr);
        self.sync_breakpoints();
        Ok(had)
    }
}

impl<D: Debuggee> HwWatchpoint for DebugTarget<D> {
    fn add_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        if len == 0 || len > 1 << 20 {
            return Ok(false);
        }
        match self.session.add_watch(addr, len, access(kind)) {
            Ok(()) => {
                self.watches.push(Watchpoint { addr, len, kind });
                Ok(true)
            }
            Err(e) => {
                (self.log)(&format!("deja gdb: watchpoint at {addr:#x}: {e}"));
                Ok(false)
            }
        }
    }

    fn remove_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        let w = Watchpoint { addr, len, kind };
        match self.watches.iter().position(|x| *x == w) {
            Some(i) => {
                self.watches.remove(i);
                self.session.remove_watch(addr, len, access(kind));
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

impl<D: Debuggee> MonitorCmd for DebugTarget<D> {
    fn handle_monitor_cmd(
        &mut self,
        cmd: &[u8],
        mut out: ConsoleOutput<'_>,
    ) -> Result<(), Self::Error> {
        let cmd = String::from_utf8_lossy(cmd).to_string();
        match self.monitor(&cmd, &mut out) {
            Ok(()) => Ok(()),
            Err(e) => {
                outputln!(out, "error: {e}");
                Ok(())
            }
        }
    }
}

/// `target extended-remote`: gdb's `run` restarts the replay, and `run N` goes to instruction
/// count N (as `monitor seek N`); the recording is the one "program", which `kill` leaves in
/// place for the next `run`.
impl<D: Debuggee> ExtendedMode for DebugTarget<D> {
    fn run(&mut self, _filename: Option<&[u8]>, mut args: Args<'_, '_>) -> TargetResult<Pid, Self> {
        if !self.session.reversible() {
            (self.log)(
                "deja gdb: run: a live run cannot restart (record it, then deja replay --gdb)",
            );
            return Err(TargetError::NonFatal);
        }
        let target = match args.next() {
            None => 0,
            Some(arg) => {
                let arg = String::from_utf8_lossy(arg);
                match parse_count(&arg) {
                    Some(n) => n,
                    None => {
                        (self.log)(&format!(
                            "deja gdb: run {arg:?}: the argument is the instruction count to \
                             start at (run, or run N)"
                        ));
                        return Err(TargetError::NonFatal);
                    }
                }
            }
        };
        self.action = None;
        if let Stop::Diverged(d) = self.session.seek(target).map_err(TargetError::Fatal)? {
            (self.log)(&format!("deja gdb: the replay diverged:\n{d}"));
        }
        Ok(Pid::MIN)
    }

    fn attach(&mut self, _pid: Pid) -> TargetResult<(), Self> {
        (self.log)("deja gdb: attach: there is one recording to debug; use run (or run N)");
        Err(TargetError::NonFatal)
    }

    fn query_if_attached(&mut self, _pid: Pid) -> TargetResult<AttachKind, Self> {
        // Under plain `target remote`, gdb detaches when it quits, as it did before extended
        // mode existed here.
        Ok(if self.extended {
            AttachKind::Run
        } else {
            AttachKind::Attach
        })
    }

    fn kill(&mut self, _pid: Option<Pid>) -> TargetResult<ShouldTerminate, Self> {
        self.action = None;
        Ok(if self.extended {
            ShouldTerminate::No
        } else {
            ShouldTerminate::Yes
        })
    }

    fn restart(&mut self) -> Result<(), GdbError> {
        if self.session.reversible() {
            self.action = None;
            self.session.seek(0)?;
        }
        Ok(())
    }

    fn on_start(&mut self) -> Result<(), GdbError> {
        self.extended = true;
        Ok(())
    }
}

/// The blocking event loop: runs the pending action, watching the connection for Ctrl-C.
struct EventLoop<D>(std::marker::PhantomData<D>);

impl<D: Debuggee> run_blocking::BlockingEventLoop for EventLoop<D> {
    type Target = DebugTarget<D>;
    type Connection = Box<dyn ConnectionExt<Error = std::io::Error>>;
    type StopReason = SingleThreadStopReason<u64>;

    #[allow(clippy::type_complexity)]
    fn wait_for_stop_reason(
        target: &mut DebugTarget<D>,
        conn: &mut Self::Connection,
    ) -> Result<
        run_blocking::Event<SingleThreadStopReason<u64>>,
        run_blocking::WaitForStopReasonError<GdbError, std::io::Error>,
    > {
        let stop = {
            let mut incoming = || conn.peek().map(|b| b.is_some()).unwrap_or(true);
            target
                .run(&mut incoming)
                .map_err(run_blocking::WaitForStopReasonError::Target)?
        };
        match stop {
            Some(reason) => Ok(run_blocking::Event::TargetStopped(reason)),
            None => {
                let byte = conn
                    .read()
                    .map_err(run_blocking::WaitForStopReasonError::Connection)?;
                Ok(run_blocking::Event::IncomingData(byte))
            }
        }
    }

    fn on_interrupt(
        target: &mut DebugTarget<D>,
    ) -> Result<Option<SingleThreadStopReason<u64>>, GdbError> {
        target.action = None;
        Ok(Some(SingleThreadStopReason::Signal(Signal::SIGINT)))
    }
}

/// Where gdb connects: `HOST:PORT` (`:PORT` is loopback), or a Unix socket path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP address.
    Tcp(String),
    /// A Unix socket path.
    Unix(std::path::PathBuf),
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    /// `:PORT` and `PORT` listen on 127.0.0.1; `HOST:PORT` on HOST; anything with a `/` is
    /// a Unix socket path.
    fn from_str(s: &str) -> Result<Self, String> {
        if s.contains('/') {
            return Ok(Endpoint::Unix(s.into()));
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (if h.is_empty() { "127.0.0.1" } else { h }, p),
            None => ("127.0.0.1", s),
        };
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{s:?} is not HOST:PORT, :PORT or a Unix socket path"))?;
        Ok(Endpoint::Tcp(format!("{host}:{port}")))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => f.write_str(a),
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A connection to gdb that can be handed to a protocol stub more than once (after a packet
/// the protocol library cannot parse, the session goes on with a fresh stub on the same
/// stream).
pub enum Link {
    /// TCP.
    Tcp(std::net::TcpStream),
    /// A Unix socket.
    Unix(std::os::unix::net::UnixStream),
}

impl Link {
    /// Another handle on the same stream.
    fn conn(&self) -> std::io::Result<Conn> {
        Ok(match self {
            Link::Tcp(t) => Box::new(t.try_clone()?),
            Link::Unix(u) => Box::new(u.try_clone()?),
        })
    }

    fn write_raw(&self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        match self {
            Link::Tcp(t) => (&*t).write_all(bytes),
            Link::Unix(u) => (&*u).write_all(bytes),
        }
    }
}

/// Listens at `at`, calls `ready` with the address once gdb can connect, and accepts one
/// connection.
pub fn accept(at: &Endpoint, ready: &mut dyn FnMut(&str)) -> Result<Link, GdbError> {
    let err = |source| GdbError::Connection {
        address: at.to_string(),
        source,
    };
    match at {
        Endpoint::Tcp(addr) => {
            let listener = std::net::TcpListener::bind(addr).map_err(err)?;
            let local = listener.local_addr().map_err(err)?;
            ready(&local.to_string());
            let (stream, _) = listener.accept().map_err(err)?;
            let _ = stream.set_nodelay(true);
            Ok(Link::Tcp(stream))
        }
        Endpoint::Unix(path) => {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(err(e)),
            }
            let listener = std::os::unix::net::UnixListener::bind(path).map_err(err)?;
            ready(&path.display().to_string());
            let (stream, _) = listener.accept().map_err(err)?;
            Ok(Link::Unix(stream))
        }
    }
}

/// Serves `target` to the gdb on `link` until it detaches or kills the session. A packet
/// the protocol library refuses to parse (malformed arguments) is answered with an error
/// reply and the session goes on; connection and replay failures end it.
pub fn serve<D: Debuggee>(
    target: &mut DebugTarget<D>,
    link: &Link,
) -> Result<DisconnectReason, GdbError> {
    let conn_err = |source| GdbError::Connection {
        address: "gdb".into(),
        source,
    };
    loop {
        let stub = GdbStub::builder(link.conn().map_err(conn_err)?)
            .packet_buffer_size(0x4000)
            .build()
            .map_err(|e| GdbError::Protocol(e.to_string()))?;
        match stub.run_blocking::<EventLoop<D>>(target) {
            Ok(r) => return Ok(r),
            Err(e) if e.is_target_error() => {
                return Err(e
                    .into_target_error()
                    .unwrap_or_else(|| GdbError::Protocol("target error".into())));
            }
            Err(e) if e.is_connection_error() => {
                let msg = e.to_string();
                return match e.into_connection_error() {
                    // gdb went away without detaching (killed, or the user quit): the
                    // session is over, as after a detach.
                    Some((io, _))
                        if matches!(
                            io.kind(),
                            std::io::ErrorKind::UnexpectedEof
                                | std::io::ErrorKind::ConnectionReset
                                | std::io::ErrorKind::BrokenPipe
                        ) =>
                    {
                        Ok(DisconnectReason::Disconnect)
                    }
                    _ => Err(GdbError::Protocol(msg)),
                };
            }
            Err(e) => {
                // gdbstub names the failure only in its message.
                let msg = e.to_string();
                // gdb nacks a reply that came after it gave up waiting (a long `monitor
                // seek` outlasts its remote timeout) and sends the command again.
                let nack = msg.to_ascii_lowercase().contains("nack");
                if !msg.contains("parse packet") && !nack && !msg.contains("too much data") {
                    return Err(GdbError::Protocol(msg));
                }
                let answer: &[u8] = if msg.contains("Checksum") {
                    // A damaged packet: ask gdb to send it again.
                    b"-"
                } else if nack {
                    // gdb asked for a reply again; it will ask again or time out.
                    b""
                } else {
                    // The packet was not acknowledged: ack it and answer E01.
                    b"+$E01#a6"
                };
                (target.log)(&format!("deja gdb: bad packet ({msg}); going on"));
                link.write_raw(answer).map_err(conn_err)?;
            }
        }
    }
}

/// A connection gdb talks over.
pub type Conn = Box<dyn ConnectionExt<Error = std::io::Error>>;
