//! Test helpers for the devices: a scripted [`Host`] whose time and input the test sets, and
//! a bench that drives one device with recorded interrupt lines.

use super::{Device, InterruptLines, IoCtx, StopRequest};
use crate::host::{Host, Position};
use crate::memory::GuestRam;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use vm_memory::GuestAddress;

/// What the scripted host answers; shared so a test can change it while a machine owns the
/// host.
#[derive(Debug, Default)]
pub struct Script {
    /// Guest time in ns.
    pub now: u64,
    /// Wall clock at boot (seconds since the epoch).
    pub wallclock: i64,
    /// Serial input still to deliver.
    pub input: VecDeque<u8>,
    /// How many times the wall clock was asked.
    pub wallclock_asks: u32,
}

/// A host answering from a [`Script`].
#[derive(Debug, Clone, Default)]
pub struct ScriptedHost(pub Arc<Mutex<Script>>);

impl ScriptedHost {
    /// Sets guest time.
    pub fn set_now(&self, ns: u64) {
        self.0.lock().unwrap().now = ns;
    }
    /// Queues serial input.
    pub fn push_input(&self, bytes: &[u8]) {
        self.0.lock().unwrap().input.extend(bytes);
    }
}

impl Host for ScriptedHost {
    fn time_ns(&mut self, _at: Position) -> u64 {
        self.0.lock().unwrap().now
    }
    fn boot_wallclock(&mut self) -> i64 {
        let mut s = self.0.lock().unwrap();
        s.wallclock_asks += 1;
        s.wallclock
    }
    fn serial_input(&mut self, _at: Position) -> Option<u8> {
        self.0.lock().unwrap().input.pop_front()
    }
    fn entropy(&mut self, _at: Position) -> u64 {
        4
    }
    fn poll_quantum(&mut self, _at: Position) -> u64 {
        1000
    }
    fn idle(&mut self, _at: Position, deadline_ns: Option<u64>) {
        if let Some(d) = deadline_ns {
            let mut s = self.0.lock().unwrap();
            s.now = s.now.max(d);
        }
    }
}

/// Interrupt lines that remember their levels and every change.
#[derive(Debug, Default)]
pub struct RecordingLines {
    /// Every `set_irq` call in order.
    pub calls: Vec<(u32, bool)>,
    /// Current level per line.
    pub level: [bool; 24],
    /// Rising edges seen per line.
    pub rises: [u32; 24],
}

impl InterruptLines for RecordingLines {
    fn set_irq(&mut self, line: u32, level: bool) {
        self.calls.push((line, level));
        let l = line as usize;
        if level && !self.level[l] {
            self.rises[l] += 1;
        }
        self.level[l] = level;
    }
}

/// Drives one device with a scripted host.
pub struct Bench {
    /// The host (clone it to change time from the test).
    pub host: ScriptedHost,
    /// Guest memory (one page; no device here does DMA).
    pub mem: GuestRam,
    /// The device's interrupt lines.
    pub lines: RecordingLines,
    /// A stop the device requested.
    pub stop: Option<StopRequest>,
}

impl Bench {
    /// A bench at time 0.
    pub fn new() -> Self {
        Self {
            host: ScriptedHost::default(),
            mem: GuestRam::from_ranges(&[(GuestAddress(0), 4096)]).unwrap(),
            lines: RecordingLines::default(),
            stop: None,
        }
    }

    /// Sets guest time.
    pub fn at(&mut self, ns: u64) -> &mut Self {
        self.host.set_now(ns);
        self
    }

    fn with_ctx<R>(&mut self, f: impl FnOnce(&mut IoCtx) -> R) -> R {
        let mut ctx = IoCtx {
            host: &mut self.host,
            pos: Position::default(),
            mem: crate::memory::DmaMemory::new(&self.mem, &[]),
            irq: &mut self.lines,
            stop: &mut self.stop,
            now_cache: None,
        };
        f(&mut ctx)
    }

    /// A one-byte OUT.
    pub fn out(&mut self, dev: &mut dyn Device, port: u64, value: u8) {
        self.with_ctx(|ctx| dev.write(ctx, port, &[value]));
    }

    /// A one-byte IN.
    pub fn inb(&mut self, dev: &mut dyn Device, port: u64) -> u8 {
        let mut b = [0u8];
        self.with_ctx(|ctx| dev.read(ctx, port, &mut b));
        b[0]
    }

    /// A poll.
    pub fn poll(&mut self, dev: &mut dyn Device) {
        self.with_ctx(|ctx| dev.poll(ctx));
    }
}
