//! A replay session: the replayed machine kept between runs, moved through the recording by
//! instruction count, forwards and backwards, with a debugger's stop conditions.
//!
//! [`replay`](crate::replay) runs a trace once from start (or a checkpoint) to a verdict. A
//! debugger needs the same machine held still between commands and moved by small steps:
//! [`ReplaySession::step`], [`ReplaySession::seek`], [`ReplaySession::resume`] (forward to
//! the next breakpoint or watched access) and [`ReplaySession::reverse_resume`] (back to the
//! last one). Every run goes through the replay's own observer, so each state digest, serial
//! output and register event the trace holds on the way is checked exactly as a plain replay
//! checks it; a divergence stops the session with the replay's report.
//!
//! Going back restores the nearest restore point at or before the target and replays
//! forward: the trace's own checkpoints (traces with instruction counts), and snapshots the
//! session takes in memory (at the start, every [`SessionOptions::snapshot_every`]
//! instructions of forward progress when running has cost ten times the last snapshot,
//! and near where the debugger stops; at most [`MAX_SNAPSHOTS`] holding
//! [`MAX_SNAPSHOT_BYTES`] together). Restore points share the pages they have in common: a
//! snapshot copies the pages written since the last restore point, and a restore rewrites
//! only the pages that differ, so both cost what changed rather than the guest's memory
//! size. A seek forward also jumps to a restore point ahead (what it jumps over is not
//! replayed, so not checked, as with `deja replay --until`). The session never changes
//! guest state itself: nothing a debugger does can make the replay diverge.
//!
//! Positions are bt's instruction counts: a trace recorded on kvm replays on bt and gets
//! them from the replay (its own positions count device exits only).

use crate::host::{self, Player};
use crate::{Divergence, Observer, Prepared, ReplayError, ReplayHooks, prepare};
use deja_engine::{EngineKind, RunEnd, RunOptions, Vm};
use deja_machine::exit_group::{PagingRegs, fetch_code, translate_linear};
use deja_machine::loader::Image;
use deja_machine::{CpuState, WatchHit};
use deja_snapshot::{SerialCapture, lock_capture, state};
use deja_traces::{Event, PAGE_SIZE, Position, TraceReader};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Instructions between two snapshots a session takes while running forward.
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 2_000_000;
/// Most in-memory snapshots a session keeps (the one at the start is never dropped).
pub const MAX_SNAPSHOTS: usize = 128;
/// Most bytes of guest memory the in-memory snapshots hold together (distinct pages: a
/// snapshot shares every page it did not see written with the restore point it was taken
/// after); older ones are dropped first.
pub const MAX_SNAPSHOT_BYTES: u64 = 2 << 30;
/// A forward snapshot costs a digest and a copy of the pages written since the last restore
/// point: the session runs at least this many times as long as the last snapshot took
/// before it takes the next one, so that snapshots never cost more than a small share of a
/// forward run.
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
    /// A store into watched bytes, or a load from bytes watched for loads: after the
    /// accessing instruction going forward, before it going backward. The address is the
    /// watched virtual address the access touched.
    Watch {
        /// The first watched virtual address accessed.
        address: u64,
        /// Which accesses the watch that saw it sees.
        access: Access,
        /// The access ([`WatchHit::read`] for a load).
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

/// Which accesses a watch sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Stores (gdb's `watch`).
    Write,
    /// Loads (gdb's `rwatch`).
    Read,
    /// Both (gdb's `awatch`).
    ReadWrite,
}

impl Access {
    fn writes(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }

    fn reads(self) -> bool {
        matches!(self, Access::Read | Access::ReadWrite)
    }
}

/// A watched range of guest virtual memory and the physical bytes it maps to at the stop
/// where it was set.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Watched {
    virt: u64,
    len: u64,
    access: Access,
    /// `(physical start, length, virtual start)` pieces, one per page touched.
    pieces: Vec<(u64, u64, u64)>,
}

/// Guest-physical `(start, length)` ranges.
type Ranges = Vec<(u64, u64)>;

/// A page of guest memory as restore points hold it: shared by every restore point that
/// holds the same bytes there (a snapshot copies only the pages written since the restore
/// point the machine last stood at, and shares the rest with it).
type Page = Arc<[u8; PAGE_SIZE]>;

/// Guest memory at a restore point: its non-zero pages.
type Pages = BTreeMap<u64, Page>;

/// One restore point in memory.
struct Snapshot {
    position: Position,
    event_index: u64,
    cpu_state: Vec<u8>,
    machine_state: Vec<u8>,
    /// The trace format `cpu_state` and `machine_state` are written in.
    format: u32,
    memory: Arc<Pages>,
    /// The trace checkpoint (its index) this is a copy of, if it is one.
    trace_checkpoint: Option<usize>,
}

/// Where a restore starts from.
#[derive(Clone, Copy)]
enum RestorePoint {
    Memory(usize),
    /// A trace checkpoint, by index.
    Trace(usize),
}

/// Sets page `n` of `map` to `bytes` (dropping it when zero), counting the pages held by no
/// other map in `held`.
fn put_page(map: &mut Pages, n: u64, bytes: &[u8], held: &mut u64) {
    let old = if bytes.iter().all(|&b| b == 0) {
        map.remove(&n)
    } else {
        let mut page = [0u8; PAGE_SIZE];
        let len = bytes.len().min(PAGE_SIZE);
        page[..len].copy_from_slice(&bytes[..len]);
        *held += 1;
        map.insert(n, Arc::new(page))
    };
    if let Some(old) = old
        && Arc::strong_count(&old) == 1
    {
        *held -= 1;
    }
}

/// Adds to `out` every page whose contents differ between `a` and `b`.
fn differing_pages(a: &Pages, b: &Pages, out: &mut BTreeSet<u64>) {
    let (mut ia, mut ib) = (a.iter().peekable(), b.iter().peekable());
    loop {
        match (ia.peek(), ib.peek()) {
            (Some(&(&na, pa)), Some(&(&nb, pb))) => {
                if na < nb {
                    out.insert(na);
                    ia.next();
                } else if nb < na {
                    out.insert(nb);
                    ib.next();
                } else {
                    if !Arc::ptr_eq(pa, pb) && pa[..] != pb[..] {
                        out.insert(na);
                    }
                    ia.next();
                    ib.next();
                }
            }
            (Some(&(&n, _)), None) => {
                out.insert(n);
                ia.next();
            }
            (None, Some(&(&n, _))) => {
                out.insert(n);
                ib.next();
            }
            (None, None) => return,
        }
    }
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
    /// Guest memory as of the last restore or snapshot (the machine's memory is that plus
    /// the pages the digester has seen written since); `None` when unknown, which makes the
    /// next restore rewrite all of memory and the next snapshot copy all of it.
    base: Option<Arc<Pages>>,
    /// Distinct pages the restore points (and `base`) hold.
    held_pages: u64,
    stats: SessionStats,
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

/// What a session's restore points have cost so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Restores done.
    pub restores: u64,
    /// Pages of guest memory those restores wrote.
    pub pages_restored: u64,
    /// Restore points taken in memory (snapshots, and trace checkpoints read into memory).
    pub snapshots: u64,
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
    /// kept it; what memory held at the last restore point is then unknown).
    fn take_digester(&mut self) -> deja_snapshot::StateDigester {
        match self.digester.take() {
            Some(d) => d,
            None => {
                self.set_base(None);
                deja_snapshot::StateDigester::new(self.scheme.clone())
            }
        }
    }

    /// Makes `base` the memory of the last restore point, letting the old one go.
    fn set_base(&mut self, base: Option<Arc<Pages>>) {
        if let Some(old) = std::mem::replace(&mut self.base, base) {
            self.release(old);
        }
    }

    /// Lets a restore point's memory go, counting the pages no other map holds.
    fn release(&mut self, map: Arc<Pages>) {
        if let Ok(map) = Arc::try_unwrap(map) {
            for page in map.into_values() {
                if Arc::strong_count(&page) == 1 {
                    self.held_pages -= 1;
                }
            }
        }
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
        let mut events: Option<Arc<Vec<Event>>> = None;
        let Prepared {
            reader,
            mut vm,
            player,
            serial,
            scheme,
            exit_sync,
            counts,
            interrupted_at,
            ..
        } = prepare(
            path,
            EngineKind::Bt,
            guests,
            serial_out,
            build,
            &mut |reader, _, exit_sync| {
                // Every event in memory: a session goes back and forth through them.
                let all: Result<Vec<Event>, _> = reader.events().collect();
                let all = Arc::new(all?);
                events = Some(all.clone());
                Ok(Player::from_shared(all, 0, Position::default(), exit_sync))
            },
        )?;
        let events = events.unwrap_or_default();
        if !counts {
            return Err(ReplayError::Build {
                engine: EngineKind::Bt,
                detail: format!(
                    "a replay session needs an engine that counts instructions; {} does not",
                    vm.cpu.name()
                ),
            });
        }
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
            base: None,
            held_pages: 0,
            stats: SessionStats::default(),
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

    /// What the restore points cost so far.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// Restore points held in memory, and the bytes of guest memory they hold together
    /// (pages they share counted once).
    pub fn snapshots_held(&self) -> (usize, u64) {
        (self.snapshots.len(), self.held_pages * PAGE_SIZE as u64)
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

    /// Watches `len` bytes of guest virtual memory at `virt` for the accesses `access`
    /// names, translated through the page tables of the current position (the physical
    /// bytes stay watched wherever the guest maps them later). Unmapped pages are refused.
    pub fn add_watch(&mut self, virt: u64, len: u64, access: Access) -> Result<(), ReplayError> {
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
        self.watched.push(Watched {
            virt,
            len,
            access,
            pieces,
        });
        Ok(())
    }

    /// Stops watching the range added by `add_watch(virt, len, access)`; whether there was
    /// one.
    pub fn remove_watch(&mut self, virt: u64, len: u64, access: Access) -> bool {
        match self
            .watched
            .iter()
            .position(|w| w.virt == virt && w.len == len && w.access == access)
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

    /// The watched virtual address an access to `phys` touched (a load when `read`), and
    /// which accesses the watch that names it sees.
    fn watched_virtual(&self, phys: u64, read: bool) -> (u64, Access) {
        for w in &self.watched {
            if (read && !w.access.reads()) || (!read && !w.access.writes()) {
                continue;
            }
            for &(p, n, v) in &w.pieces {
                if (p..p + n).contains(&phys) {
                    return (v + (phys - p), w.access);
                }
            }
        }
        let access = if read { Access::Read } else { Access::Write };
        (phys, access)
    }

    /// The physical ranges watched for stores and for loads.
    fn physical_ranges(&self) -> (Ranges, Ranges) {
        let ranges = |on: fn(Access) -> bool| -> Ranges {
            self.watched
                .iter()
                .filter(|w| on(w.access))
                .flat_map(|w| w.pieces.iter().map(|&(p, n, _)| (p, n)))
                .collect()
        };
        (ranges(Access::writes), ranges(Access::reads))
    }

    /// Executes one instruction (an interrupt or exception delivered on the way counts with
    /// the instruction it precedes).
    pub fn step(&mut self) -> Result<Stop, ReplayError> {
        let now = self.vm.cpu.icount();
        self.run_plain(now + 1)
    }

    /// Goes to instruction count `target`, forwards or backwards: from the latest restore
    /// point at or before it when that is nearer than where the session stands (a restore
    /// costs the pages that differ, replaying costs every instruction).
    pub fn seek(&mut self, target: u64) -> Result<Stop, ReplayError> {
        let now = self.vm.cpu.icount();
        let ahead = |icount: u64| now < icount && icount <= target;
        let point_ahead = self.snapshots.iter().any(|s| ahead(s.position.icount))
            || (self.trace_checkpoints
                && self
                    .reader
                    .checkpoints()
                    .iter()
                    .any(|c| ahead(c.position.icount)));
        if target < now || self.diverged.is_some() || point_ahead {
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
        let (address, access) = self.watched_virtual(hit.address, hit.read);
        Stop::Watch {
            address,
            access,
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
            let (writes, reads) = self.physical_ranges();
            self.vm.cpu.set_watch_access(&writes, &reads)?;
        } else {
            self.vm.cpu.set_breakpoints(&[])?;
            // Watching stays on for a single step, so that a step over a breakpoint still
            // sees an access it makes.
            let (writes, reads) = if limit == from + 1 {
                self.physical_ranges()
            } else {
                Default::default()
            };
            self.vm.cpu.set_watch_access(&writes, &reads)?;
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
    ///
    /// Only the pages that differ are written: those the guest wrote since the last restore
    /// point (the digester's dirty pages) and those where that point's memory and the
    /// target's differ (the maps share unchanged pages, so comparing them costs little). So a
    /// restore costs what changed, not the size of guest memory.
    fn restore_before(&mut self, target: u64) -> Result<Position, ReplayError> {
        let mut best: Option<(Position, RestorePoint)> = None;
        for (i, s) in self.snapshots.iter().enumerate() {
            if s.position.icount <= target && best.is_none_or(|(p, _)| s.position.icount > p.icount)
            {
                best = Some((s.position, RestorePoint::Memory(i)));
            }
        }
        if self.trace_checkpoints {
            for (k, c) in self.reader.checkpoints().iter().enumerate() {
                if c.position.icount <= target
                    && best.is_none_or(|(p, _)| c.position.icount > p.icount)
                {
                    best = Some((c.position, RestorePoint::Trace(k)));
                }
            }
        }
        let Some((position, point)) = best else {
            return Err(self.refuse("no restore point before the target".into()));
        };
        let i = match point {
            RestorePoint::Memory(i) => i,
            RestorePoint::Trace(k) => self.snapshot_of_trace_checkpoint(k)?,
        };
        let (memory, cpu_state, machine_state, event_index, format) = {
            let s = &self.snapshots[i];
            (
                s.memory.clone(),
                s.cpu_state.clone(),
                s.machine_state.clone(),
                s.event_index,
                s.format,
            )
        };
        // Decoded before memory changes: a bad checkpoint changes nothing.
        let cpu = state::decode_cpu_state(&cpu_state, format)?;
        let devices = state::decode_machine_state(&machine_state, format, &self.vm.machine)?;
        let mut digester = self.take_digester();
        let known = self.base.clone().and_then(|base| {
            digester
                .take_changed_pages(&self.vm.machine, self.vm.cpu.as_mut())
                .map(|changed| (base, changed))
        });
        let write = match known {
            Some((base, mut changed)) => {
                if !Arc::ptr_eq(&base, &memory) {
                    differing_pages(&base, &memory, &mut changed);
                }
                changed
            }
            None => {
                // What memory holds is unknown: every page that is not zero now or will not
                // be zero, and everything rehashed afterwards.
                digester.invalidate();
                let mut all: BTreeSet<u64> = memory.keys().copied().collect();
                state::for_each_resident_page(&self.vm.machine, |n, page| {
                    if page.iter().any(|&b| b != 0) {
                        all.insert(n);
                    }
                });
                all
            }
        };
        let written = write.len();
        let result = state::write_pages(
            &mut self.vm.machine,
            write.iter().map(|&n| (n, memory.get(&n).map(|p| &p[..]))),
        )
        .and_then(|()| {
            state::restore_decoded(&mut self.vm.machine, self.vm.cpu.as_mut(), &cpu, &devices)
        });
        self.vm.cpu.memory_rewritten();
        // The hashes learn the pages just written (their dirty bits), and the next
        // snapshot's copy starts from here.
        let _ = digester.take_changed_pages(&self.vm.machine, self.vm.cpu.as_mut());
        self.digester = Some(digester);
        self.stats.restores += 1;
        self.stats.pages_restored += written as u64;
        let next_poll = match result {
            Ok((next_poll, _)) => {
                self.set_base(Some(memory));
                next_poll
            }
            Err(e) => {
                self.set_base(None);
                return Err(e.into());
            }
        };
        self.vm.set_next_poll(next_poll);
        let first = usize::try_from(event_index)
            .unwrap_or(usize::MAX)
            .min(self.events.len());
        *host::lock(&self.player) =
            Player::from_shared(self.events.clone(), first, position, self.exit_sync);
        self.arm_player();
        // Output is matched against the trace at the exit that wrote it, so nothing is
        // pending at a restore point; whatever the abandoned run left goes.
        lock_capture(&self.serial).take_pending();
        self.at_end = false;
        self.diverged = None;
        Ok(position)
    }

    /// The in-memory restore point holding trace checkpoint `k` (its index), read from the
    /// trace the first time: its memory is built from the nearest earlier checkpoint the
    /// session already holds (or the last full one) plus the pages of those in between.
    fn snapshot_of_trace_checkpoint(&mut self, k: usize) -> Result<usize, ReplayError> {
        if let Some(i) = self
            .snapshots
            .iter()
            .position(|s| s.trace_checkpoint == Some(k))
        {
            return Ok(i);
        }
        let checkpoints = self.reader.checkpoints().to_vec();
        let cp = checkpoints[k];
        let Some(full) = checkpoints[..=k].iter().rposition(|c| c.full) else {
            return Err(self.refuse(format!(
                "trace checkpoint {} has no full checkpoint before it, so its memory cannot be \
                 rebuilt",
                cp.ordinal
            )));
        };
        let from = self
            .snapshots
            .iter()
            .filter_map(|s| {
                s.trace_checkpoint
                    .filter(|&j| (full..k).contains(&j))
                    .map(|j| (j, s))
            })
            .max_by_key(|(j, _)| *j);
        let (mut map, first) = match from {
            Some((j, s)) => ((*s.memory).clone(), j + 1),
            None => (Pages::new(), full),
        };
        let mut held = self.held_pages;
        let mut meta = None;
        for c in &checkpoints[first..=k] {
            meta =
                Some(self.reader.for_each_checkpoint_page(c, |n, bytes| {
                    put_page(&mut map, n, bytes, &mut held)
                })?);
        }
        self.held_pages = held;
        let meta = match meta {
            Some(m) => m,
            None => self.reader.read_checkpoint(&cp)?.meta,
        };
        self.push_snapshot(Snapshot {
            position: cp.position,
            event_index: cp.event_index,
            cpu_state: meta.cpu_state,
            machine_state: meta.device_state,
            format: self.reader.format_version(),
            memory: Arc::new(map),
            trace_checkpoint: Some(k),
        });
        Ok(self
            .snapshots
            .iter()
            .position(|s| s.trace_checkpoint == Some(k))
            .unwrap_or(self.snapshots.len() - 1))
    }

    /// Keeps a restore point, dropping the oldest (never the one at the start) while they
    /// hold too many, and keeping the list in position order.
    fn push_snapshot(&mut self, snap: Snapshot) {
        let key = |p: &Position| (p.icount, p.exits);
        let new = key(&snap.position);
        let at = self.snapshots.partition_point(|s| key(&s.position) <= new);
        self.snapshots.insert(at, snap);
        self.stats.snapshots += 1;
        let max_pages = MAX_SNAPSHOT_BYTES / PAGE_SIZE as u64;
        while self.snapshots.len() > MAX_SNAPSHOTS || self.held_pages > max_pages {
            // The earliest after the start, but not the one just added.
            let Some(victim) =
                (1..self.snapshots.len()).find(|&i| key(&self.snapshots[i].position) != new)
            else {
                break;
            };
            let gone = self.snapshots.remove(victim);
            self.release(gone.memory);
        }
    }

    fn arm_player(&mut self) {
        let format = self.reader.format_version();
        let mut p = host::lock(&self.player);
        p.set_polls_log_due_times_only(format >= deja_traces::DUE_POLLS_FORMAT);
        p.set_compare_icount(!self.exit_sync);
        p.set_kicker(self.vm.cpu.kicker());
    }

    /// Takes a restore point here: the CPU and device state, and the memory of the last
    /// restore point with the pages written since then replaced (all of memory when that is
    /// unknown).
    fn take_snapshot(&mut self) -> Result<(), ReplayError> {
        let now = self.position();
        if self.snapshots.iter().any(|s| s.position == now) {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let next_poll = self.vm.next_poll();
        let mut digester = self.take_digester();
        let base = self.base.clone();
        let snap = state::snapshot(
            &self.vm.machine,
            self.vm.cpu.as_mut(),
            next_poll,
            &mut digester,
            base.is_none(),
        );
        self.digester = Some(digester);
        let snap = snap?;
        let mut map = base.map(|b| (*b).clone()).unwrap_or_default();
        let mut held = self.held_pages;
        for (n, page) in &snap.pages {
            put_page(&mut map, *n, page, &mut held);
        }
        self.held_pages = held;
        let memory = Arc::new(map);
        self.set_base(Some(memory.clone()));
        let event_index = host::lock(&self.player).consumed();
        self.push_snapshot(Snapshot {
            position: now,
            event_index,
            cpu_state: snap.cpu_state,
            machine_state: snap.machine_state,
            format: deja_traces::FORMAT_VERSION,
            memory,
            trace_checkpoint: None,
        });
        self.snapshot_cost = started.elapsed();
        self.run_since_snapshot = std::time::Duration::ZERO;
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
