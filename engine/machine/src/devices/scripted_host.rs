//! Test support for the platform devices: a [`Host`] whose clock the test sets, interrupt
//! lines that remember their levels, and a rig that builds an [`IoCtx`] from them.

use super::{InterruptLines, IoCtx, StopRequest};
use crate::host::{Host, Position};
use crate::memory::GuestRam;
use crate::memory::MemoryLayout;

/// A host whose time is whatever the test last set; it never touches the real world.
#[derive(Debug, Default)]
pub struct ScriptedHost {
    /// Guest time returned by `time_ns`.
    pub now_ns: u64,
    /// How many times the clock was read.
    pub clock_reads: u64,
}

impl Host for ScriptedHost {
    fn time_ns(&mut self, _at: Position) -> u64 {
        self.clock_reads += 1;
        self.now_ns
    }
    fn boot_wallclock(&mut self) -> i64 {
        0
    }
    fn serial_input(&mut self, _at: Position) -> Option<u8> {
        None
    }
    fn entropy(&mut self, _at: Position) -> u64 {
        0
    }
    fn poll_quantum(&mut self, _at: Position) -> u64 {
        1
    }
    fn idle(&mut self, _at: Position, deadline_ns: Option<u64>) {
        if let Some(d) = deadline_ns {
            self.now_ns = self.now_ns.max(d);
        }
    }
}

/// Interrupt lines that keep each line's level and every change.
#[derive(Debug, Default)]
pub struct RecordingLines {
    /// `(line, level)` in the order they were driven.
    pub changes: Vec<(u32, bool)>,
}

impl RecordingLines {
    /// The last level driven on `line` (low if never driven).
    pub fn level(&self, line: u32) -> bool {
        self.changes
            .iter()
            .rev()
            .find(|(l, _)| *l == line)
            .is_some_and(|(_, v)| *v)
    }
}

impl InterruptLines for RecordingLines {
    fn set_irq(&mut self, line: u32, level: bool) {
        self.changes.push((line, level));
    }
}

/// Everything an [`IoCtx`] borrows, owned by one test.
pub struct Rig {
    /// The clock.
    pub host: ScriptedHost,
    /// Guest memory (pc layout).
    pub mem: GuestRam,
    /// The layout `mem` was allocated with.
    pub layout: MemoryLayout,
    /// Interrupt lines.
    pub lines: RecordingLines,
    /// What a device asked of the machine.
    pub stop: Option<StopRequest>,
}

impl Rig {
    /// A rig with `ram` bytes of guest memory.
    pub fn new(ram: u64) -> Self {
        let layout = MemoryLayout::pc(ram).expect("test layout");
        let mem = layout.allocate().expect("test memory");
        Self {
            host: ScriptedHost::default(),
            mem,
            layout,
            lines: RecordingLines::default(),
            stop: None,
        }
    }

    /// A context for one access at the current scripted time.
    pub fn ctx(&mut self) -> IoCtx<'_> {
        IoCtx {
            host: &mut self.host,
            pos: Position::default(),
            mem: crate::memory::DmaMemory::new(&self.mem, &self.layout.rom),
            irq: &mut self.lines,
            stop: &mut self.stop,
            now_cache: None,
        }
    }
}
