//! A replay session: the replayed machine kept between runs, moved through the recording by
//! instruction count, forwards and backwards, with a debugger's stop conditions.
//!
//! [`replay`](crate::replay) runs a trace once from start (or a checkpoint) to a verdict. A
//! debugger needs the same machine held still between commands and moved by small steps:
//! [`ReplaySession::step`], [`ReplaySession::seek`], [`ReplaySession::resume`] (forward to
//! the next breakpoint or watched store) and [`ReplaySession::reverse_resume`] (back to the
//! last one). Every run goes through the replay's own observer, so each state digest, serial
//! output and register event the trace holds on the way is checked exactly as a plain replay
//! checks it; a divergence stops the session with the replay's report.
//!
//! Going back restores the nearest restore point at or before the target and replays
//! forward: the trace's own checkpoints (traces with instruction counts), and snapshots the
//! session takes in memory (at the start, every [`SessionOptions::snapshot_every`]
//! instructions of forward progress when running has cost ten times the last snapshot,
//! and near where the debugger stops; at most [`MAX_SNAPSHOTS`] holding
//! [`MAX_SNAPSHOT_BYTES`] together). The session never changes guest state itself:
//! nothing a debugger does can make the replay diverge.
//!
//! Positions are bt's instruction counts: a trace recorded on kvm replays on bt and gets
//! them from the replay (its own positions count device exits only).

use crate::host::{self, Player};
use crate::{Divergence, Observer, ReplayError, ReplayHooks, machine_config, resolve_images};
use deja_engine::{EngineKind, RunEnd, RunOptions, Vm};
use deja_machine::exit_group::{PagingRegs, fetch_code, translate_linear};
use deja_machine::loader::Image;
use deja_machine::{CpuState, InterruptDelivery, WatchHit};
use deja_snapshot::{SerialCapture, SerialTee, lock_capture, state};
use deja_traces::{
    CheckpointIndexEntry, Delivery, Event, EventKind, MemoryImage, Position, TraceReader,
};
use std::fs::File;
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Instructions between two snapshots a session takes while running forward.
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 2_000_000;
/// Most in-memory snapshots a session keeps (the one at the start is never dropped).
pub const MAX_SNAPSHOTS: usize = 128;
/// Most bytes of guest memory the in-memory snapshots hold together (each holds every
/// non-zero page: a Linux guest's are hundreds of MiB); older ones are dropped first.
pub const MAX_SNAPSHOT_BYTES: u64 = 2 << 30;
/// A forward snapshot costs a copy and a digest of memory: the session runs at least this
/// many times as long as the last snapshot took before it takes the next one, so that
/// snapshots never cost more than a small share of a forward run.
const SNAPSHOT_COST_RATIO: u32 = 10;
/// A stop farther than this from the nearest restore point gets a snapshot of its own, so
/// that stepping backwards near it replays only a few instructions.
pub const NEAR_STOP: u64 = 20_000;
/// Instructions a forward run executes between two looks at [`Resume::interrupt`].
const SLICE: u64 = 1 << 20;

/// How a session replays.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Instructions between snapshots taken while running forward.
    pub snapshot_every: u64,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            snapshot_every: DEFAULT_SNAPSHOT_EVERY,
        }
    }
}

/// Why a session stopped.
#[derive(Debug, Clone)]
pub enum Stop {
    /// It reached the instruction count it was sent to (a step or a seek).
    Reached,
    /// Before the instruction at this linear address, a breakpoint.
    Breakpoint(u64),
    /// A store into watched bytes: after the storing instruction going forward, before it
    /// going backward. The address is the watched virtual address the store touched.
    Watch {
        /// The first watched virtual address written.
        address: u64,
        /// The store.
        hit: WatchHit,
    },
    /// The caller's interrupt (Ctrl-C) stopped a forward run.
    Interrupted,
    /// At the end of the recording: forward execution can go no further.
    End,
    /// At the start of the recording: backward execution can go no further.
    Start,
    /// The replay differed from the recording.
    Diverged(Box<Divergence>),
}

/// A watched range of guest virtual memory and the physical bytes it maps to at the stop
/// where it was set.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Watched {
    virt: u64,
    len: u64,
    /// `(physical start, length, virtual start)` pieces, one per page touched.
    pieces: Vec<(u64, u64, u64)>,
}

/// One restore point in memory.
struct Snapshot {
    position: Position,
    event_index: u64,
    cpu_state: Vec<u8>,
    machine_state: Vec<u8>,
    memory: Arc<MemoryImage>,
}

/// Where a restore starts from.
#[derive(Clone, Copy)]
enum RestorePoint {
    Memory(usize),
    Trace(CheckpointIndexEntry),
}

/// Hears where a session is between exits (stamped serial output uses it).
pub type PositionHook = Box<dyn FnMut(Position) + Send>;

/// A run's interrupt check: called between slices of a forward run; `true` stops it.
pub type Interrupt<'a> = &'a mut dyn FnMut() -> bool;

/// A trace's replay held between runs; see the module documentation.
pub struct ReplaySession {
    vm: Vm,
    reader: TraceReader<BufReader<File>>,
    path: PathBuf,
    events: Arc<Vec<Event>>,
    player: Arc<Mutex<Player>>,
    serial: Arc<Mutex<SerialCapture>>,
    /// Digests under the trace's scheme; lent to each run's observer and taken back.
    digester: Option<deja_snapshot::StateDigester>,
    scheme: deja_traces::DigestScheme,
    exit_sync: bool,
    trace_checkpoints: bool,
    snapshots: Vec<Snapshot>,
    snapshot_every: u64,
    /// How long the last snapshot took, and how long the machine has run since.
    snapshot_cost: std::time::Duration,
    run_since_snapshot: std::time::Duration,
    /// The recording's last position, when it ended at a known instruction count.
    end_icount: Option<u64>,
    stop_at_end: bool,
    /// The run has reached the recording's end.
    at_end: bool,
    breakpoints: Vec<u64>,
    watched: Vec<Watched>,
    digests: u64,
    diverged: Option<Box<Divergence>>,
    on_position: Option<PositionHook>,
    /// How far forward the session has ever run.
    frontier: u64,
    /// The first watched store of the last single step, if it made one.
    last_step_hits: Option<WatchHit>,
    /// The watched stores of the last armed run that stopped for them or at a breakpoint.
    segment_hits: Vec<WatchHit>,
}

/// What a session built its machine from (for messages).
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// The engine the trace was recorded on.
    pub recorded_engine: String,
    /// Where the recording ends, if known.
    pub end: Option<Position>,
}

impl ReplaySession {
    /// The digester, lent out (a fresh one, which rehashes all memory once, if a failed run
    /// kept it).
    fn take_digester(&mut self) -> deja_snapshot::StateDigester {
        self.digester
            .take()
            .unwrap_or_else(|| deja_snapshot::StateDigester::new(self.scheme.clone()))
    }

    /// Opens the trace at `path` and builds its machine at the start of the recording, on bt
    /// (whatever engine recorded it: only bt stops at instructions).
    pub fn open(
        path: &Path,
        opts: &SessionOptions,
        guests: &dyn Fn(&str) -> Option<Image>,
        serial_out: Box<dyn Write + Send>,
        build: Box<crate::Builder<'_>>,
    ) -> Result<Self, ReplayError> {
        let name = path.display().to_string();
        let mut reader = TraceReader::open(path)?;
        let header = reader.header().clone();
        let footer = reader.footer().cloned();
        let config = machine_config(&header, &name)?;
        let image = resolve_images(&header.images, guests, &mut |index| {
            Ok(reader.embedded_image(index)?)
        })?;
        let exit_sync = header.delivery == Delivery::ExitSynchronous;
        let events: Result<Vec<Event>, _> = reader.events().collect();
        let events = Arc::new(events?);
        let serial = Arc::new(Mutex::new(SerialCapture::default()));
        let tee = SerialTee::new(serial_out, serial.clone());
        let player = Arc::new(Mutex::new(Player::from_events(
            events.as_ref().clone(),
            0,
            Position::default(),
            exit_sync,
        )));
        let host = crate::ReplayingHost::new(player.clone());
        let mut vm = build(&config, &image, Box::new(host), Box::new(tee)).map_err(|detail| {
            ReplayError::Build {
                engine: EngineKind::Bt,
                detail,
            }
        })?;
        vm.set_reboot(header.on_reset == deja_traces::ResetPolicy::Reboot);
        if !vm.cpu.counts_instructions() {
            return Err(ReplayError::Build {
                engine: EngineKind::Bt,
                detail: format!(
                    "a replay session needs an engine that counts instructions; {} does not",
                    vm.cpu.name()
                ),
            });
        }
        let delivery = if exit_sync {
            InterruptDelivery::AtExits
        } else {
            InterruptDelivery::Exact
        };
        vm.cpu
            .set_interrupt_delivery(delivery)
            .map_err(|e| ReplayError::Delivery {
                engine: EngineKind::Bt,
                delivery: header.delivery,
                detail: e.to_string(),
            })?;
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
        let end_icount = interrupted_at.filter(|_| !exit_sync).map(|at| at.icount);
        vm.set_stop_exits(interrupted_at.map(|at| at.exits));
        let mut s = Self {
            vm,
            reader,
            path: path.to_path_buf(),
            events,
            player,
            serial,
            digester: Some(deja_snapshot::StateDigester::new(scheme.clone())),
            scheme,
            exit_sync,
            trace_checkpoints: !exit_sync,
            snapshots: Vec::new(),
            snapshot_every: opts.snapshot_every.max(1),
            snapshot_cost: std::time::Duration::ZERO,
            run_since_snapshot: std::time::Duration::ZERO,
            end_icount,
            stop_at_end: interrupted_at.is_some(),
            at_end: false,
            breakpoints: Vec::new(),
            watched: Vec::new(),
            digests: 0,
            diverged: None,
            on_position: None,
            frontier: 0,
            last_step_hits: None,
            segment_hits: Vec::new(),
        };
        s.arm_player();
        s.take_snapshot()?;
        Ok(s)
    }

    /// What the session replays.
    pub fn info(&self) -> SessionInfo {
        SessionInfo {
            recorded_engine: self.reader.header().engine.clone(),
            end: self.reader.footer().map(|f| f.final_position),
        }
    }

    /// The trace file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets the hook that hears the position between exits.
    pub fn set_position_hook(&mut self, hook: Option<PositionHook>) {
        self.on_position = hook;
    }

    /// The current position (instruction count and device-exit ordinal).
    pub fn position(&self) -> Position {
        Position::new(self.vm.cpu.icount(), self.vm.machine.position().exits)
    }

    /// State digests checked so far, over every run of the session.
    pub fn digests_checked(&self) -> u64 {
        self.digests
    }

    /// Whether the session stands at the recording's end.
    pub fn at_end(&self) -> bool {
        self.at_end
    }

    /// The divergence that stopped the session, if one did.
    pub fn divergence(&self) -> Option<&Divergence> {
        self.diverged.as_deref()
    }

    /// The CPU state at the current position.
    pub fn cpu_state(&mut self) -> Result<CpuState, ReplayError> {
        Ok(self.vm.cpu.state()?)
    }

    /// The positions of the restore points (in memory and in the trace), in order.
    pub fn restore_points(&self) -> Vec<Position> {
        let mut v: Vec<Position> = self.snapshots.iter().map(|s| s.position).collect();
        if self.trace_checkpoints {
            v.extend(self.reader.checkpoints().iter().map(|c| c.position));
        }
        v.sort_by_key(|p| (p.icount, p.exits));
        v.dedup();
        v
    }

    /// Reads guest memory at a virtual (linear) address through the page tables of the
    /// current position; returns how many bytes it read (it stops at an unmapped page).
    pub fn read_virtual(&mut self, addr: u64, buf: &mut [u8]) -> Result<usize, ReplayError> {
        let regs = self.paging()?;
        Ok(fetch_code(&self.vm.machine.mem, &regs, addr, buf))
    }

    /// Reads guest-physical memory (RAM and ROM); returns how many bytes it read.
    pub fn read_physical(&self, addr: u64, buf: &mut [u8]) -> usize {
        let regs = PagingRegs::default();
        fetch_code(&self.vm.machine.mem, &regs, addr, buf)
    }

    /// The guest-physical address a virtual address maps to at the current position.
    pub fn translate(&mut self, addr: u64) -> Result<Option<u64>, ReplayError> {
        let regs = self.paging()?;
        Ok(translate_linear(&self.vm.machine.mem, &regs, addr))
    }

    fn paging(&mut self) -> Result<PagingRegs, ReplayError> {
        let s = self.vm.cpu.state()?;
        Ok(PagingRegs {
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
        })
    }

    /// Replaces the breakpoints (linear addresses of instructions).
    pub fn set_breakpoints(&mut self, linear: &[u64]) {
        self.breakpoints = linear.to_vec();
        self.breakpoints.sort_unstable();
        self.breakpoints.dedup();
    }

    /// Watches `len` bytes of guest virtual memory at `virt`, translated through the page
    /// tables of the current position (the physical bytes stay watched wherever the guest
    /// maps them later). Unmapped pages are refused.
    pub fn add_watch(&mut self, virt: u64, len: u64) -> Result<(), ReplayError> {
        let mut pieces = Vec::new();
        let mut at = virt;
        let end = virt.checked_add(len.max(1)).ok_or_else(|| {
            self.refuse(format!(
                "watch {virt:#x}+{len}: the range passes the end of the address space"
            ))
        })?;
        while at < end {
            let n = (0x1000 - (at & 0xfff)).min(end - at);
            let phys = self.translate(at)?.ok_or_else(|| {
                self.refuse(format!(
                    "watch {virt:#x}+{len}: {at:#x} is not mapped at this position"
                ))
            })?;
            pieces.push((phys, n, at));
            at += n;
        }
        self.watched.push(Watched { virt, len, pieces });
        Ok(())
    }

    /// Stops watching the range added by `add_watch(virt, len)`; whether there was one.
    pub fn remove_watch(&mut self, virt: u64, len: u64) -> bool {
        match self
            .watched
            .iter()
            .position(|w| w.virt == virt && w.len == len)
        {
            Some(i) => {
                self.watched.remove(i);
                true
            }
            None => false,
        }
    }

    fn refuse(&self, detail: String) -> ReplayError {
        ReplayError::Session(detail)
    }

    /// The watched virtual address a store to `phys` touched.
    fn watched_virtual(&self, phys: u64) -> u64 {
        for w in &self.watched {
            for &(p, n, v) in &w.pieces {
                if (p..p + n).contains(&phys) {
                    return v + (phys - p);
                }
            }
        }
        phys
    }

    fn physical_ranges(&self) -> Vec<(u64, u64)> {
        self.watched
            .iter()
            .flat_map(|w| w.pieces.iter().map(|&(p, n, _)| (p, n)))
            .collect()
    }

    /// Executes one instruction (an interrupt or exception delivered on the way counts with
    /// the instruction it precedes).
    pub fn step(&mut self) -> Result<Stop, ReplayError> {
        let now = self.vm.cpu.icount();
        self.run_plain(now + 1)
    }

    /// Goes to instruction count `target`, forwards or backwards.
    pub fn seek(&mut self, target: u64) -> Result<Stop, ReplayError> {
        if target < self.vm.cpu.icount() || self.diverged.is_some() {
            self.restore_before(target)?;
        }
        self.run_plain(target)
    }

    /// Goes back one instruction.
    pub fn reverse_step(&mut self) -> Result<Stop, ReplayError> {
        let now = self.vm.cpu.icount();
        if now == 0 {
            return Ok(Stop::Start);
        }
        self.seek(now - 1)
    }

    /// Runs forward to the next breakpoint or watched store, the end of the recording, or
    /// until `interrupt` says to stop.
    pub fn resume(&mut self, interrupt: Interrupt<'_>) -> Result<Stop, ReplayError> {
        if let Some(d) = &self.diverged {
            return Ok(Stop::Diverged(d.clone()));
        }
        if self.at_end {
            return Ok(Stop::End);
        }
        // A breakpoint at RIP was the reason for the last stop: step over it first.
        if self.at_breakpoint()? {
            match self.step()? {
                Stop::Reached => {}
                other => return Ok(other),
            }
            if let Some(hit) = self.last_step_hits.take() {
                let stop = self.watch_stop(hit);
                return Ok(self.stopped(stop));
            }
        }
        loop {
            let from = self.vm.cpu.icount();
            let limit = self
                .end_icount
                .map_or(from + SLICE, |e| e.min(from + SLICE));
            let seg = self.segment(limit, true)?;
            match seg {
                Segment::Watch(hit) => {
                    // The store has happened somewhere before where the run stopped: go to
                    // just after it.
                    let target = hit.icount + 1;
                    self.restore_before(target)?;
                    match self.run_plain(target)? {
                        Stop::Reached => return Ok(self.watch_stop(hit)),
                        other => return Ok(other),
                    }
                }
                Segment::Breakpoint(b) => return Ok(self.stopped(Stop::Breakpoint(b))),
                Segment::Limit => {
                    if self.end_icount.is_some_and(|e| self.vm.cpu.icount() >= e) {
                        self.at_end = true;
                        return Ok(self.stopped(Stop::End));
                    }
                    if interrupt() {
                        return Ok(self.stopped(Stop::Interrupted));
                    }
                }
                Segment::Stop(s) => return Ok(self.stopped(s)),
            }
        }
    }

    /// Runs backward to the last breakpoint or watched store before the current position
    /// (a watched store stops before the storing instruction), or to the start.
    pub fn reverse_resume(&mut self) -> Result<Stop, ReplayError> {
        let now = self.vm.cpu.icount();
        let mut window_end = now;
        loop {
            if window_end == 0 {
                self.seek(0)?;
                return Ok(Stop::Start);
            }
            self.restore_before(window_end - 1)?;
            let window_start = self.vm.cpu.icount();
            // Every event in [window_start, window_end), the last one wins.
            let mut last: Option<(u64, Stop)> = None;
            while self.vm.cpu.icount() < window_end {
                match self.segment(window_end, true)? {
                    Segment::Watch(_) => {
                        for hit in std::mem::take(&mut self.segment_hits) {
                            if hit.icount < window_end {
                                let stop = self.watch_stop(hit.clone());
                                last = Some((hit.icount, stop));
                            }
                        }
                    }
                    Segment::Breakpoint(b) => {
                        // Stores before it are older than the breakpoint, which wins.
                        self.segment_hits.clear();
                        last = Some((self.vm.cpu.icount(), Stop::Breakpoint(b)));
                        // Step over it, seeing a store it makes.
                        match self.step()? {
                            Stop::Reached => {}
                            Stop::Diverged(d) => return Ok(Stop::Diverged(d)),
                            _ => break,
                        }
                        if let Some(hit) = self.last_step_hits.take()
                            && hit.icount < window_end
                        {
                            last = Some((hit.icount, self.watch_stop(hit)));
                        }
                    }
                    Segment::Limit => break,
                    Segment::Stop(Stop::Diverged(d)) => return Ok(Stop::Diverged(d)),
                    Segment::Stop(_) => break,
                }
            }
            if let Some((icount, stop)) = last {
                self.seek(icount)?;
                if let Stop::Breakpoint(addr) = stop {
                    // The breakpoint stops after any interrupt delivered at this count (the
                    // plain seek stops before it): run on to it.
                    let keep = std::mem::replace(&mut self.breakpoints, vec![addr]);
                    let r = self.segment(icount + 1, true);
                    self.breakpoints = keep;
                    r?;
                }
                return Ok(self.stopped(stop));
            }
            window_end = window_start;
        }
    }

    fn watch_stop(&self, hit: WatchHit) -> Stop {
        Stop::Watch {
            address: self.watched_virtual(hit.address),
            hit,
        }
    }

    /// Takes a snapshot now, for `monitor checkpoint`; returns its position.
    pub fn checkpoint(&mut self) -> Result<Position, ReplayError> {
        self.take_snapshot()?;
        Ok(self.position())
    }

    fn lin_rip(&mut self) -> Result<u64, ReplayError> {
        let s = self.vm.cpu.state()?;
        Ok(linear_rip(&s))
    }

    fn at_breakpoint(&mut self) -> Result<bool, ReplayError> {
        if self.breakpoints.is_empty() {
            return Ok(false);
        }
        let lin = self.lin_rip()?;
        Ok(self.breakpoints.binary_search(&lin).is_ok())
    }

    /// Bookkeeping at a stop the debugger will look at: a snapshot when none is near.
    fn stopped(&mut self, stop: Stop) -> Stop {
        let now = self.vm.cpu.icount();
        let near = self
            .restore_points()
            .iter()
            .any(|p| p.icount <= now && now - p.icount <= NEAR_STOP);
        if !near && !matches!(stop, Stop::Diverged(_)) && !self.at_end {
            let _ = self.take_snapshot();
        }
        stop
    }

    /// Runs to exactly `target` with nothing armed.
    fn run_plain(&mut self, target: u64) -> Result<Stop, ReplayError> {
        if let Some(d) = &self.diverged {
            return Ok(Stop::Diverged(d.clone()));
        }
        self.last_step_hits = None;
        let target = self.end_icount.map_or(target, |e| target.min(e));
        while self.vm.cpu.icount() < target {
            if self.at_end {
                return Ok(Stop::End);
            }
            let limit = target.min(self.vm.cpu.icount() + SLICE);
            match self.segment(limit, false)? {
                Segment::Limit => {}
                Segment::Stop(s) => return Ok(s),
                Segment::Watch(_) | Segment::Breakpoint(_) => {}
            }
        }
        if self.end_icount.is_some_and(|e| self.vm.cpu.icount() >= e) {
            self.at_end = true;
            return Ok(Stop::End);
        }
        Ok(Stop::Reached)
    }

    /// One run of the machine up to `limit` instructions: with `armed`, breakpoints stop it
    /// and watched stores are collected (into `segment_hits`).
    fn segment(&mut self, limit: u64, armed: bool) -> Result<Segment, ReplayError> {
        let from = self.vm.cpu.icount();
        if armed {
            self.vm.cpu.set_breakpoints(&self.breakpoints)?;
            self.vm.cpu.set_watch(&self.physical_ranges())?;
        } else {
            self.vm.cpu.set_breakpoints(&[])?;
            // Watching stays on for a single step, so that a step over a breakpoint still
            // sees a store it makes.
            let ranges = if limit == from + 1 {
                self.physical_ranges()
            } else {
                Vec::new()
            };
            self.vm.cpu.set_watch(&ranges)?;
        }
        let mut hits: Vec<WatchHit> = Vec::new();
        let mut on_watch = |h: &WatchHit| hits.push(h.clone());
        let mut position_hook = self.on_position.take();
        let mut progress = |p: Position| {
            if let Some(h) = position_hook.as_mut() {
                h(p)
            }
        };
        let observer = Observer {
            digester: self.take_digester(),
            hooks: ReplayHooks {
                on_watch: Some(&mut on_watch),
                progress: Some(&mut progress),
            },
            watch_hits: 0,
            watch_tail: Default::default(),
            player: self.player.clone(),
            serial: self.serial.clone(),
            until_exit: None,
            reached: false,
            stop_at_end: self.stop_at_end,
            reached_end: false,
            digests: 0,
            registers_matched_at: None,
            last_verified: None,
        };
        let mut obs = SessionObserver {
            inner: observer,
            breakpoints: if armed { &self.breakpoints } else { &[] },
            stop_on_watch: armed,
            at_breakpoint: None,
        };
        let run = self.vm.run_observed(
            RunOptions {
                timeout: None,
                max_instructions: Some(limit),
            },
            &mut obs,
        );
        obs.inner.drain_watch(self.vm.cpu.as_mut());
        let digests = obs.inner.digests;
        let reached_end = obs.inner.reached_end;
        let at_breakpoint = obs.at_breakpoint;
        self.digester = Some(obs.inner.digester);
        self.on_position = position_hook;
        self.digests += digests;
        let run = run?;
        self.frontier = self.frontier.max(self.vm.cpu.icount());
        let mismatch = host::lock(&self.player).take_mismatch();
        if let Some(m) = mismatch {
            let d = Box::new(Divergence {
                at: m.at,
                event_index: m.event_index,
                expected: m.expected,
                actual: m.actual,
                register_diff: m.register_diff,
                memory_diff: Vec::new(),
                device_diff: Vec::new(),
                note: m.note,
                state: m.state,
            });
            self.diverged = Some(d.clone());
            return Ok(Segment::Stop(Stop::Diverged(d)));
        }
        hits.retain(|h| h.icount >= from);
        if limit == from + 1 && !armed {
            self.last_step_hits = hits.first().cloned();
        }
        if reached_end || matches!(run.end, RunEnd::Stopped(_) | RunEnd::Shutdown { .. }) {
            self.at_end = true;
            if armed && !hits.is_empty() {
                let first = hits[0].clone();
                self.segment_hits = hits;
                return Ok(Segment::Watch(first));
            }
            return Ok(Segment::Stop(Stop::End));
        }
        if armed && !hits.is_empty() {
            let first = hits[0].clone();
            self.segment_hits = hits;
            return Ok(Segment::Watch(first));
        }
        if let Some(b) = at_breakpoint {
            self.segment_hits = hits;
            return Ok(Segment::Breakpoint(b));
        }
        // Forward progress: a snapshot every `snapshot_every` instructions.
        let now = self.vm.cpu.icount();
        let last = self
            .snapshots
            .iter()
            .map(|s| s.position.icount)
            .filter(|&i| i <= now)
            .max()
            .unwrap_or(0);
        self.run_since_snapshot += run.elapsed;
        if now - last >= self.snapshot_every
            && self.run_since_snapshot >= self.snapshot_cost * SNAPSHOT_COST_RATIO
        {
            self.take_snapshot()?;
        }
        Ok(Segment::Limit)
    }

    /// Restores the latest restore point at or before `target`; returns it.
    fn restore_before(&mut self, target: u64) -> Result<Position, ReplayError> {
        let mut best: Option<(Position, RestorePoint)> = None;
        for (i, s) in self.snapshots.iter().enumerate() {
            if s.position.icount <= target && best.is_none_or(|(p, _)| s.position.icount > p.icount)
            {
                best = Some((s.position, RestorePoint::Memory(i)));
            }
        }
        if self.trace_checkpoints {
            for c in self.reader.checkpoints() {
                if c.position.icount <= target
                    && best.is_none_or(|(p, _)| c.position.icount > p.icount)
                {
                    best = Some((c.position, RestorePoint::Trace(*c)));
                }
            }
        }
        let Some((position, point)) = best else {
            return Err(self.refuse("no restore point before the target".into()));
        };
        let (memory, cpu_state, machine_state, event_index, format) = match point {
            RestorePoint::Memory(i) => {
                let s = &self.snapshots[i];
                (
                    s.memory.clone(),
                    s.cpu_state.clone(),
                    s.machine_state.clone(),
                    s.event_index,
                    deja_traces::FORMAT_VERSION,
                )
            }
            RestorePoint::Trace(cp) => {
                let memory = Arc::new(self.reader.memory_at(&cp)?);
                let meta = self.reader.read_checkpoint(&cp)?.meta;
                (
                    memory,
                    meta.cpu_state,
                    meta.device_state,
                    cp.event_index,
                    self.reader.format_version(),
                )
            }
        };
        let (next_poll, _) = state::restore(
            &mut self.vm.machine,
            self.vm.cpu.as_mut(),
            &memory,
            &cpu_state,
            &machine_state,
            format,
        )?;
        self.vm.cpu.memory_rewritten();
        // The restore marked every page it wrote; rehashing all of memory once more keeps the
        // digests independent of what the dirty bitmap saw before it.
        if let Some(d) = self.digester.as_mut() {
            d.invalidate();
        }
        self.vm.set_next_poll(next_poll);
        let first = usize::try_from(event_index)
            .unwrap_or(usize::MAX)
            .min(self.events.len());
        *host::lock(&self.player) = Player::from_events(
            self.events[first..].to_vec(),
            first as u64,
            position,
            self.exit_sync,
        );
        self.arm_player();
        // Output is matched against the trace at the exit that wrote it, so nothing is
        // pending at a restore point; whatever the abandoned run left goes.
        lock_capture(&self.serial).take_pending();
        self.at_end = false;
        self.diverged = None;
        Ok(position)
    }

    fn arm_player(&mut self) {
        let format = self.reader.format_version();
        let mut p = host::lock(&self.player);
        p.set_polls_log_due_times_only(format >= deja_traces::DUE_POLLS_FORMAT);
        p.set_compare_icount(!self.exit_sync);
        p.set_kicker(self.vm.cpu.kicker());
    }

    fn take_snapshot(&mut self) -> Result<(), ReplayError> {
        let now = self.position();
        if self.snapshots.iter().any(|s| s.position == now) {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let next_poll = self.vm.next_poll();
        let mut digester = self.take_digester();
        let snap = state::snapshot(
            &self.vm.machine,
            self.vm.cpu.as_mut(),
            next_poll,
            &mut digester,
            true,
        );
        self.digester = Some(digester);
        let snap = snap?;
        let mut memory = MemoryImage::new();
        for (n, page) in &snap.pages {
            memory.set_page(*n, page);
        }
        let event_index = host::lock(&self.player).consumed();
        let bytes = |v: &[Snapshot]| -> u64 {
            v.iter()
                .map(|s| s.memory.pages().count() as u64 * deja_traces::PAGE_SIZE as u64)
                .sum()
        };
        let new_bytes = snap.pages.len() as u64 * deja_traces::PAGE_SIZE as u64;
        // Drop the oldest taken, but never the one at the start.
        while self.snapshots.len() > 1
            && (self.snapshots.len() >= MAX_SNAPSHOTS
                || bytes(&self.snapshots) + new_bytes > MAX_SNAPSHOT_BYTES)
        {
            self.snapshots.remove(1);
        }
        self.snapshot_cost = started.elapsed();
        self.run_since_snapshot = std::time::Duration::ZERO;
        self.snapshots.push(Snapshot {
            position: now,
            event_index,
            cpu_state: snap.cpu_state,
            machine_state: snap.machine_state,
            memory: Arc::new(memory),
        });
        Ok(())
    }
}

/// How one run of [`ReplaySession::segment`] ended.
enum Segment {
    /// At its instruction limit.
    Limit,
    /// At a breakpoint.
    Breakpoint(u64),
    /// Watched stores happened (the first is given); the run went on past them.
    Watch(WatchHit),
    /// Anything else.
    Stop(Stop),
}

/// The replay's observer plus a debugger's breakpoints and watched stores.
struct SessionObserver<'h, 'b> {
    inner: Observer<'h>,
    breakpoints: &'b [u64],
    stop_on_watch: bool,
    at_breakpoint: Option<u64>,
}

impl deja_engine::RunObserver for SessionObserver<'_, '_> {
    fn between_exits(
        &mut self,
        machine: &mut deja_machine::Machine,
        cpu: &mut dyn deja_machine::Cpu,
        next_poll: u64,
    ) -> bool {
        if !self.inner.between_exits(machine, cpu, next_poll) {
            return false;
        }
        if self.stop_on_watch && self.inner.watch_hits > 0 {
            return false;
        }
        if !self.breakpoints.is_empty()
            && cpu.stopped_at_breakpoint()
            && let Ok(s) = cpu.state()
        {
            self.at_breakpoint = Some(linear_rip(&s));
            return false;
        }
        true
    }
}

/// The linear address of the next instruction (CS base + RIP; RIP alone in 64-bit mode).
pub fn linear_rip(s: &CpuState) -> u64 {
    let cs = &s.seg[deja_machine::cpu::seg::CS];
    if s.efer & (1 << 10) != 0 && cs.l {
        s.rip
    } else {
        cs.base.wrapping_add(s.rip) & 0xffff_ffff
    }
}
