//! The 8254 programmable interval timer (0x40-0x43) and the PC's system control port B
//! (0x61: channel 2's gate, the speaker enable, the refresh toggle and OUT2).
//!
//! Counters are not stepped: each channel keeps the PIT tick at which it started counting and
//! its value and OUT level are computed from the current guest time (1.193182 MHz input
//! clock, ticks = floor(ns * 1193182 / 10^9)). That keeps the device exact at any time
//! resolution and lets [`Device::next_deadline`] name the next rising edge of OUT0 so a
//! halted guest wakes on time. Channel 0's OUT drives IRQ0: every rising edge is delivered
//! to the (edge-triggered) PIC as a pulse. Edges that pass while nobody polls are coalesced
//! into one pulse, as the PIC's single IRR bit would on hardware.
//!
//! Modes 0-5 follow the data sheet, with the count loaded on the write (no one-clock load
//! delay). Modes 2 and 3 take a new count at the end of the current period, and an illegal
//! count of 1 in those modes behaves as 2.

use super::{Device, DeviceError, DeviceState, IoCtx};
use crate::cpu::EngineStats;
use serde::{Deserialize, Serialize};

/// The PIT's input clock in Hz.
pub const PIT_HZ: u64 = 1_193_182;
/// The PIT's ports.
pub const PIT_BASE: u16 = 0x40;
/// System control port B.
pub const PORT_B: u16 = 0x61;
/// The interrupt line channel 0 drives.
pub const PIT_IRQ: u32 = 0;
/// Half-period of the DRAM refresh toggle in port 0x61 bit 4 (as QEMU: 15.085 us).
pub const REFRESH_TOGGLE_NS: u64 = 15_085;

const NS_PER_SEC: u128 = 1_000_000_000;

/// PIT ticks elapsed at guest time `ns`.
pub fn ticks_at(ns: u64) -> u64 {
    (u128::from(ns) * u128::from(PIT_HZ) / NS_PER_SEC) as u64
}

/// The first guest time (ns) at which [`ticks_at`] reaches `tick`.
pub fn ns_of_tick(tick: u64) -> u64 {
    let n = u128::from(tick) * NS_PER_SEC;
    n.div_ceil(u128::from(PIT_HZ)).min(u128::from(u64::MAX)) as u64
}

/// Read/write access mode of a counter (control word bits 5-4).
const RW_LSB: u8 = 1;
const RW_MSB: u8 = 2;
const RW_WORD: u8 = 3;

/// Saved state of one counter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelState {
    /// Mode bits as programmed (0-7; 6 and 7 act as 2 and 3).
    pub mode_bits: u8,
    /// Access mode: 1 low byte, 2 high byte, 3 low then high.
    pub rw: u8,
    /// BCD counting.
    pub bcd: bool,
    /// The initial count in effect (1..=65536 binary, 1..=10000 BCD); 0 if never written
    /// since the last control word.
    pub count: u32,
    /// A count written while a mode 2/3 period runs, and the tick it takes effect.
    pub pending_count: Option<(u32, u64)>,
    /// Counting (count loaded and, for gated modes, triggered and gate high).
    pub running: bool,
    /// Tick at which the counter held `count` and started counting.
    pub load_tick: u64,
    /// Ticks counted when the gate paused counting (modes 0 and 4).
    pub paused_at: Option<u64>,
    /// OUT when not counting.
    pub idle_out: bool,
    /// The gate input.
    pub gate: bool,
    /// Low byte of a two-byte count write, waiting for the high byte.
    pub write_low: Option<u8>,
    /// Next unlatched read of a two-byte count returns the high byte.
    pub read_high_next: bool,
    /// A latched count and which bytes of it are still to be read (1 low, 2 high, 3 both).
    pub latched: Option<(u16, u8)>,
    /// A latched status byte (read before a latched count).
    pub latched_status: Option<u8>,
}

/// Saved state of the PIT and port 0x61.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitState {
    /// Counters 0-2.
    pub channels: [ChannelState; 3],
    /// Rising edges of OUT0 up to this tick have been delivered.
    pub irq_checked_tick: u64,
    /// Port 0x61 bits 0-3 as written (gate 2, speaker, parity/IOCHK check disables).
    pub port_b: u8,
}

impl ChannelState {
    fn power_on(gate: bool) -> Self {
        Self {
            mode_bits: 3,
            rw: RW_WORD,
            count: 0x10000,
            running: gate,
            idle_out: true,
            gate,
            ..Self::default()
        }
    }

    fn mode(&self) -> u8 {
        if self.mode_bits > 5 {
            self.mode_bits - 4
        } else {
            self.mode_bits
        }
    }

    fn modulus(&self) -> u64 {
        if self.bcd { 10_000 } else { 0x10000 }
    }

    /// Ticks counted at tick `t`, if counting.
    fn elapsed(&self, t: u64) -> Option<u64> {
        if !self.running {
            return None;
        }
        Some(self.paused_at.unwrap_or(t.saturating_sub(self.load_tick)))
    }

    /// Applies a pending mode 2/3 count whose period boundary has passed. Returns the
    /// boundary tick if it did.
    fn sync(&mut self, t: u64) -> Option<u64> {
        match self.pending_count {
            Some((count, at)) if self.running && t >= at => {
                self.count = count;
                self.load_tick = at;
                self.pending_count = None;
                Some(at)
            }
            _ => None,
        }
    }

    /// The counting element's value at tick `t` (binary, before BCD encoding).
    fn value(&self, t: u64) -> u32 {
        let n = u64::from(self.count);
        let Some(d) = self.elapsed(t) else {
            return (n % self.modulus()) as u32;
        };
        let v = match self.mode() {
            2 => n - d % n,
            3 => {
                let high_len = n.div_ceil(2);
                let r = d % n;
                let p = if r < high_len { r } else { r - high_len };
                if n % 2 == 0 { n - 2 * p } else { n - 1 - 2 * p }
            }
            _ => {
                let m = self.modulus();
                (n % m + m - d % m) % m
            }
        };
        (v % 0x10000) as u32
    }

    /// OUT at tick `t`.
    fn out(&self, t: u64) -> bool {
        let n = u64::from(self.count);
        let Some(d) = self.elapsed(t) else {
            return self.idle_out;
        };
        match self.mode() {
            0 | 1 => d >= n,
            2 => d % n != n - 1,
            3 => d % n < n.div_ceil(2),
            _ => d != n,
        }
    }

    /// The first rising edge of OUT strictly after `d0` ticks of counting, in ticks of
    /// counting.
    fn first_edge_after(&self, d0: u64) -> Option<u64> {
        let n = u64::from(self.count);
        match self.mode() {
            0 | 1 => (d0 < n).then_some(n),
            2 | 3 => Some((d0 / n + 1) * n),
            _ => (d0 < n + 1).then_some(n + 1),
        }
    }

    /// How many times OUT rises in the ticks `(from, to]` (absolute).
    fn edges_between(&self, from: u64, to: u64) -> u64 {
        if !self.running || self.paused_at.is_some() || to <= from {
            return 0;
        }
        let start = from.saturating_sub(self.load_tick);
        let Some(first) = self.first_edge_after(start) else {
            return 0;
        };
        if self.load_tick + first > to {
            return 0;
        }
        match self.mode() {
            // Periodic: one edge per period from the first.
            2 | 3 => (to - self.load_tick - first) / u64::from(self.count) + 1,
            _ => 1,
        }
    }

    /// Tick of the next rising edge of OUT after tick `from`.
    fn next_edge_tick(&self, from: u64) -> Option<u64> {
        if !self.running || self.paused_at.is_some() {
            return None;
        }
        let d0 = from.saturating_sub(self.load_tick);
        let start = if from < self.load_tick { 0 } else { d0 };
        self.first_edge_after(start).map(|e| self.load_tick + e)
    }

    fn encode(&self, v: u32) -> u16 {
        if self.bcd {
            let v = v % 10_000;
            (((v / 1000) << 12) | ((v / 100 % 10) << 8) | ((v / 10 % 10) << 4) | (v % 10)) as u16
        } else {
            v as u16
        }
    }

    fn decode(&self, raw: u16) -> u32 {
        let v = if self.bcd {
            let d = |s: u16| u32::from((raw >> s) & 0xf);
            d(12) * 1000 + d(8) * 100 + d(4) * 10 + d(0)
        } else {
            u32::from(raw)
        };
        if v == 0 { self.modulus() as u32 } else { v }
    }

    fn status(&self, t: u64) -> u8 {
        (u8::from(self.out(t)) << 7)
            | (u8::from(self.null_count()) << 6)
            | (self.rw << 4)
            | (self.mode_bits << 1)
            | u8::from(self.bcd)
    }

    /// Status bit 6: a control word was written and no count yet, or a written count has
    /// not reached the counting element (a mode 2/3 count waiting for the period end, a
    /// mode 1/5 count waiting for its gate trigger).
    fn null_count(&self) -> bool {
        self.count == 0
            || self.pending_count.is_some()
            || (matches!(self.mode(), 1 | 5) && !self.running)
    }

    fn latch_count(&mut self, t: u64) {
        if self.latched.is_none() {
            let value = self.encode(self.value(t));
            let bytes = match self.rw {
                RW_LSB => 1,
                RW_MSB => 2,
                _ => 3,
            };
            self.latched = Some((value, bytes));
        }
    }

    fn control(&mut self, val: u8, t: u64) {
        let rw = (val >> 4) & 3;
        if rw == 0 {
            self.latch_count(t);
            return;
        }
        let gate = self.gate;
        *self = Self {
            mode_bits: (val >> 1) & 7,
            rw,
            bcd: val & 1 != 0,
            gate,
            ..Self::default()
        };
        // Mode 0's OUT goes low on the control word; every other mode's goes high.
        self.idle_out = self.mode() != 0;
    }

    fn load_count(&mut self, raw: u16, t: u64) {
        let mut count = self.decode(raw);
        let mode = self.mode();
        if (mode == 2 || mode == 3) && count == 1 {
            count = 2;
        }
        match mode {
            2 | 3 if self.running && self.count != 0 => {
                let d = self.elapsed(t).unwrap_or(0);
                let n = u64::from(self.count);
                self.pending_count = Some((count, self.load_tick + (d / n + 1) * n));
            }
            _ => {
                self.count = count;
                self.pending_count = None;
                self.paused_at = None;
                self.load_tick = t;
                self.running = match mode {
                    0 | 4 => {
                        if !self.gate {
                            self.paused_at = Some(0);
                        }
                        true
                    }
                    2 | 3 => self.gate,
                    // Modes 1 and 5 wait for a rising edge of the gate.
                    _ => false,
                };
                self.idle_out = mode != 0;
            }
        }
    }

    fn write_data(&mut self, val: u8, t: u64) {
        match self.rw {
            RW_LSB => self.load_count(u16::from(val), t),
            RW_MSB => self.load_count(u16::from(val) << 8, t),
            _ => match self.write_low.take() {
                None => self.write_low = Some(val),
                Some(low) => self.load_count(u16::from(low) | u16::from(val) << 8, t),
            },
        }
    }

    fn read_data(&mut self, t: u64) -> u8 {
        if let Some(s) = self.latched_status.take() {
            return s;
        }
        if let Some((value, bytes)) = self.latched {
            let [low, high] = value.to_le_bytes();
            return match bytes {
                3 => {
                    self.latched = Some((value, 2));
                    low
                }
                2 => {
                    self.latched = None;
                    high
                }
                _ => {
                    self.latched = None;
                    low
                }
            };
        }
        let [low, high] = self.encode(self.value(t)).to_le_bytes();
        match self.rw {
            RW_LSB => low,
            RW_MSB => high,
            _ => {
                self.read_high_next = !self.read_high_next;
                if self.read_high_next { low } else { high }
            }
        }
    }

    fn set_gate(&mut self, gate: bool, t: u64) {
        if gate == self.gate {
            return;
        }
        self.gate = gate;
        let programmed = self.count != 0;
        match self.mode() {
            0 | 4 if programmed && self.running => {
                if gate {
                    if let Some(d) = self.paused_at.take() {
                        self.load_tick = t.saturating_sub(d);
                    }
                } else {
                    self.paused_at = Some(t.saturating_sub(self.load_tick));
                }
            }
            2 | 3 if programmed => {
                if let Some((count, _)) = self.pending_count.take() {
                    self.count = count;
                }
                self.running = gate;
                self.load_tick = t;
            }
            1 | 5 if programmed && gate => {
                if let Some((count, _)) = self.pending_count.take() {
                    self.count = count;
                }
                self.running = true;
                self.load_tick = t;
                // Mode 1's OUT goes low on the trigger; once the count ends it stays high.
            }
            _ => {}
        }
    }
}

/// The PIT with port 0x61.
#[derive(Debug)]
pub struct Pit {
    state: PitState,
    irq0_pulses: u64,
    irq0_edges_coalesced: u64,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    /// The power-on state QEMU gives it: every channel in mode 3 with count 65536, channels
    /// 0 and 1 counting from time 0 (gates high), channel 2's gate low.
    pub fn new() -> Self {
        Self {
            state: PitState {
                channels: [
                    ChannelState::power_on(true),
                    ChannelState::power_on(true),
                    ChannelState::power_on(false),
                ],
                irq_checked_tick: 0,
                port_b: 0,
            },
            irq0_pulses: 0,
            irq0_edges_coalesced: 0,
        }
    }

    /// The state, for inspection.
    pub fn state(&self) -> &PitState {
        &self.state
    }

    /// Delivers channel 0's rising edges up to tick `t` (one pulse however many passed)
    /// and brings pending counts up to date.
    fn advance(&mut self, ctx: &mut IoCtx, t: u64) {
        let from = self.state.irq_checked_tick;
        let ch0 = &mut self.state.channels[0];
        let mut edges = 0;
        if let Some(boundary) = ch0.pending_count.map(|(_, at)| at)
            && t >= boundary
        {
            // The old period runs up to its end (itself an edge), the new one after it.
            edges += ch0.edges_between(from, boundary);
            ch0.sync(t);
        }
        edges += ch0.edges_between(from.max(ch0.load_tick), t);
        for ch in &mut self.state.channels[1..] {
            ch.sync(t);
        }
        self.state.irq_checked_tick = t.max(from);
        if edges > 0 {
            ctx.irq.set_irq(PIT_IRQ, true);
            ctx.irq.set_irq(PIT_IRQ, false);
            self.irq0_pulses += 1;
            self.irq0_edges_coalesced += edges - 1;
        }
    }

    fn read_port(&mut self, port: u16, now_ns: u64) -> u8 {
        let t = ticks_at(now_ns);
        match port {
            0x40..=0x42 => self.state.channels[usize::from(port - 0x40)].read_data(t),
            // The control word register is write-only.
            0x43 => 0xff,
            PORT_B => {
                let refresh = (now_ns / REFRESH_TOGGLE_NS) & 1 == 1;
                let out2 = self.state.channels[2].out(t);
                (self.state.port_b & 0x0f) | (u8::from(refresh) << 4) | (u8::from(out2) << 5)
            }
            _ => 0xff,
        }
    }

    fn write_port(&mut self, port: u16, val: u8, t: u64) {
        match port {
            0x40..=0x42 => self.state.channels[usize::from(port - 0x40)].write_data(val, t),
            0x43 => {
                let select = val >> 6;
                if select == 3 {
                    // Read-back: bit 5 clear latches counts, bit 4 clear latches status.
                    for (i, ch) in self.state.channels.iter_mut().enumerate() {
                        if val & (2 << i) == 0 {
                            continue;
                        }
                        if val & 0x20 == 0 {
                            ch.latch_count(t);
                        }
                        if val & 0x10 == 0 && ch.latched_status.is_none() {
                            ch.latched_status = Some(ch.status(t));
                        }
                    }
                } else {
                    self.state.channels[usize::from(select)].control(val, t);
                }
            }
            PORT_B => {
                self.state.port_b = val & 0x0f;
                self.state.channels[2].set_gate(val & 1 != 0, t);
            }
            _ => {}
        }
        // Reprogramming channel 0 restarts its edge schedule at the present.
        let ch0 = &self.state.channels[0];
        if ch0.load_tick > self.state.irq_checked_tick {
            self.state.irq_checked_tick = ch0.load_tick;
        }
    }
}

impl Device for Pit {
    fn name(&self) -> &'static str {
        "pit"
    }

    fn read(&mut self, ctx: &mut IoCtx, addr: u64, data: &mut [u8]) {
        let now = ctx.now();
        self.advance(ctx, ticks_at(now));
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.read_port((addr as u16).wrapping_add(i as u16), now);
        }
    }

    fn write(&mut self, ctx: &mut IoCtx, addr: u64, data: &[u8]) {
        let t = ticks_at(ctx.now());
        self.advance(ctx, t);
        for (i, &b) in data.iter().enumerate() {
            self.write_port((addr as u16).wrapping_add(i as u16), b, t);
        }
    }

    fn poll(&mut self, ctx: &mut IoCtx) {
        if self.next_deadline().is_none() {
            return;
        }
        let t = ticks_at(ctx.now());
        self.advance(ctx, t);
    }

    fn next_deadline(&self) -> Option<u64> {
        let ch0 = &self.state.channels[0];
        ch0.next_edge_tick(self.state.irq_checked_tick)
            .map(ns_of_tick)
    }

    fn save(&self) -> DeviceState {
        DeviceState::Pit(self.state.clone())
    }

    fn add_stats(&self, stats: &mut EngineStats) {
        stats.add("pit.irq0_pulses", self.irq0_pulses);
        stats.add("pit.irq0_edges_coalesced", self.irq0_edges_coalesced);
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        let DeviceState::Pit(s) = state else {
            return Err(DeviceError::WrongState {
                device: "pit",
                found: state.kind(),
            });
        };
        for (i, ch) in s.channels.iter().enumerate() {
            let limit = if ch.bcd { 10_000 } else { 0x10000 };
            let bad_pending = ch.pending_count.is_some_and(|(c, _)| c == 0 || c > limit);
            let bad_count = ch.count > limit || (ch.running && ch.count == 0) || bad_pending;
            if ch.mode_bits > 7 || !(1..=3).contains(&ch.rw) || bad_count {
                return Err(DeviceError::InvalidState {
                    device: "pit",
                    detail: format!(
                        "channel {i}: mode {}, access {}, count {} (running {})",
                        ch.mode_bits, ch.rw, ch.count, ch.running
                    ),
                });
            }
        }
        self.state = s.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testutil::Bench;

    const LOAD: u64 = 1000;

    /// (ticks after the count started, counter value, OUT).
    type Samples = &'static [(u64, u16, bool)];

    fn at(b: &mut Bench, tick: u64) {
        b.at(ns_of_tick(tick));
    }

    fn status(b: &mut Bench, p: &mut Pit, ch: u8) -> u8 {
        b.out(p, 0x43, 0xe0 | (2 << ch));
        b.inb(p, 0x40 + u64::from(ch))
    }

    fn read16(b: &mut Bench, p: &mut Pit, ch: u8) -> u16 {
        let lo = b.inb(p, 0x40 + u64::from(ch));
        let hi = b.inb(p, 0x40 + u64::from(ch));
        u16::from_le_bytes([lo, hi])
    }

    /// Programs channel `ch` in `mode` (lo/hi, binary unless `bcd`) with `count` at tick
    /// [`LOAD`].
    fn program(b: &mut Bench, p: &mut Pit, ch: u8, mode: u8, count: u16, bcd: bool) {
        at(b, LOAD);
        b.out(p, 0x43, ch << 6 | 0x30 | mode << 1 | u8::from(bcd));
        let [lo, hi] = count.to_le_bytes();
        b.out(p, 0x40 + u64::from(ch), lo);
        b.out(p, 0x40 + u64::from(ch), hi);
    }

    #[test]
    fn tick_conversion_round_trips() {
        for tick in [0, 1, 2, 1193, 1_193_182, 65536 * 1000 + 7] {
            let ns = ns_of_tick(tick);
            assert_eq!(ticks_at(ns), tick, "tick {tick}");
            if ns > 0 {
                assert_eq!(ticks_at(ns - 1), tick - 1, "tick {tick}");
            }
        }
        assert_eq!(ticks_at(1_000_000_000), PIT_HZ);
    }

    #[test]
    fn each_mode_counts_and_drives_out_over_time() {
        // (mode, count, [(ticks after load, counter value, OUT)])
        let table: &[(u8, u16, Samples)] = &[
            (
                0,
                100,
                &[
                    (0, 100, false),
                    (50, 50, false),
                    (99, 1, false),
                    (100, 0, true),
                    (101, 0xffff, true),
                    (300, 65336, true),
                ],
            ),
            (
                2,
                100,
                &[
                    (0, 100, true),
                    (98, 2, true),
                    (99, 1, false),
                    (100, 100, true),
                    (250, 50, true),
                    (299, 1, false),
                ],
            ),
            (
                3,
                100,
                &[
                    (0, 100, true),
                    (25, 50, true),
                    (49, 2, true),
                    (50, 100, false),
                    (75, 50, false),
                    (99, 2, false),
                    (100, 100, true),
                ],
            ),
            (
                3,
                5,
                &[
                    (0, 4, true),
                    (1, 2, true),
                    (2, 0, true),
                    (3, 4, false),
                    (4, 2, false),
                    (5, 4, true),
                ],
            ),
            (
                4,
                100,
                &[
                    (0, 100, true),
                    (99, 1, true),
                    (100, 0, false),
                    (101, 0xffff, true),
                ],
            ),
            // Mode 6 is mode 2.
            (6, 10, &[(9, 1, false), (10, 10, true)]),
        ];
        for &(mode, count, samples) in table {
            let mut b = Bench::new();
            let mut p = Pit::new();
            program(&mut b, &mut p, 0, mode, count, false);
            for &(dt, value, out) in samples {
                at(&mut b, LOAD + dt);
                let s = status(&mut b, &mut p, 0);
                assert_eq!(s & 0x80 != 0, out, "mode {mode} count {count} +{dt}: OUT");
                assert_eq!(s & 0x3f, 0x30 | mode << 1, "mode {mode}: status bits");
                assert_eq!(
                    read16(&mut b, &mut p, 0),
                    value,
                    "mode {mode} count {count} +{dt}: value"
                );
            }
        }
    }

    #[test]
    fn gate_triggered_modes_wait_for_the_gate_on_channel_2() {
        // (mode, [(ticks after trigger, value, OUT)])
        let table: &[(u8, Samples)] = &[
            (
                1,
                &[
                    (0, 50, false),
                    (49, 1, false),
                    (50, 0, true),
                    (60, 65526, true),
                ],
            ),
            (5, &[(0, 50, true), (50, 0, false), (51, 0xffff, true)]),
        ];
        for &(mode, samples) in table {
            let mut b = Bench::new();
            let mut p = Pit::new();
            program(&mut b, &mut p, 2, mode, 50, false);
            assert_eq!(
                status(&mut b, &mut p, 2) & 0xc0,
                0xc0,
                "OUT high, null count"
            );
            at(&mut b, LOAD + 500);
            assert_eq!(status(&mut b, &mut p, 2) & 0x80, 0x80, "no trigger yet");
            b.out(&mut p, 0x61, 0x01); // gate 2 rising: trigger
            assert_eq!(status(&mut b, &mut p, 2) & 0x40, 0, "count loaded");
            for &(dt, value, out) in samples {
                at(&mut b, LOAD + 500 + dt);
                assert_eq!(
                    status(&mut b, &mut p, 2) & 0x80 != 0,
                    out,
                    "mode {mode} +{dt}"
                );
                assert_eq!(read16(&mut b, &mut p, 2), value, "mode {mode} +{dt}");
            }
            // Retriggering restarts the count.
            b.out(&mut p, 0x61, 0x00);
            b.out(&mut p, 0x61, 0x01);
            assert_eq!(read16(&mut b, &mut p, 2), 50, "mode {mode} retrigger");
        }
    }

    #[test]
    fn gate_low_pauses_mode_0_and_stops_mode_2() {
        let mut b = Bench::new();
        let mut p = Pit::new();
        b.out(&mut p, 0x61, 0x01);
        program(&mut b, &mut p, 2, 0, 100, false);
        at(&mut b, LOAD + 30);
        b.out(&mut p, 0x61, 0x00);
        at(&mut b, LOAD + 80);
        assert_eq!(read16(&mut b, &mut p, 2), 70, "paused");
        b.out(&mut p, 0x61, 0x01);
        at(&mut b, LOAD + 90);
        assert_eq!(read16(&mut b, &mut p, 2), 60, "resumed");

        program(&mut b, &mut p, 2, 2, 100, false);
        at(&mut b, LOAD + 99);
        assert_eq!(b.inb(&mut p, 0x61) & 0x20, 0, "OUT2 low at count 1");
        b.out(&mut p, 0x61, 0x00);
        assert_eq!(b.inb(&mut p, 0x61) & 0x20, 0x20, "gate low forces OUT high");
        at(&mut b, LOAD + 150);
        b.out(&mut p, 0x61, 0x01);
        at(&mut b, LOAD + 160);
        assert_eq!(read16(&mut b, &mut p, 2), 90, "gate rising reloads");
    }

    #[test]
    fn bcd_counting_encodes_and_wraps_at_10000() {
        let mut b = Bench::new();
        let mut p = Pit::new();
        program(&mut b, &mut p, 0, 0, 0x1000, true);
        at(&mut b, LOAD + 1);
        assert_eq!(read16(&mut b, &mut p, 0), 0x0999);
        program(&mut b, &mut p, 0, 0, 0, true);
        at(&mut b, LOAD + 1);
        assert_eq!(read16(&mut b, &mut p, 0), 0x9999, "0 is 10000 in BCD");
        assert_eq!(status(&mut b, &mut p, 0) & 1, 1);
        program(&mut b, &mut p, 0, 2, 0x0100, true);
        at(&mut b, LOAD + 150);
        assert_eq!(
            read16(&mut b, &mut p, 0),
            0x0050,
            "mode 2 period 100 in BCD"
        );
    }

    #[test]
    fn single_byte_access_modes() {
        let mut b = Bench::new();
        let mut p = Pit::new();
        at(&mut b, LOAD);
        b.out(&mut p, 0x43, 0x10 | 2 << 1); // LSB only, mode 2
        b.out(&mut p, 0x40, 0x50);
        at(&mut b, LOAD + 0x10);
        assert_eq!(b.inb(&mut p, 0x40), 0x40);
        assert_eq!(b.inb(&mut p, 0x40), 0x40, "every read is the low byte");
        at(&mut b, LOAD);
        b.out(&mut p, 0x43, 0x20); // MSB only, mode 0
        b.out(&mut p, 0x40, 0x12);
        at(&mut b, LOAD + 0x100);
        assert_eq!(b.inb(&mut p, 0x40), 0x11);
        assert_eq!(b.inb(&mut p, 0x43), 0xff, "control word is write-only");
    }

    #[test]
    fn counter_latch_holds_the_value_until_read() {
        let mut b = Bench::new();
        let mut p = Pit::new();
        program(&mut b, &mut p, 0, 2, 1000, false);
        at(&mut b, LOAD + 100);
        b.out(&mut p, 0x43, 0x00);
        at(&mut b, LOAD + 200);
        b.out(&mut p, 0x43, 0x00); // ignored: already latched
        at(&mut b, LOAD + 500);
        assert_eq!(read16(&mut b, &mut p, 0), 900);
        assert_eq!(
            read16(&mut b, &mut p, 0),
            500,
            "latch released after both bytes"
        );
        // An unlatched read flip-flop survives a latch read in between.
        assert_eq!(b.inb(&mut p, 0x40), 500u16.to_le_bytes()[0]);
        b.out(&mut p, 0x43, 0x00);
        assert_eq!(b.inb(&mut p, 0x40), 500u16.to_le_bytes()[0], "latched low");
        assert_eq!(b.inb(&mut p, 0x40), 500u16.to_le_bytes()[1], "latched high");
        assert_eq!(
            b.inb(&mut p, 0x40),
            500u16.to_le_bytes()[1],
            "free-running high"
        );
    }

    #[test]
    fn read_back_latches_status_then_count_on_several_channels() {
        let mut b = Bench::new();
        let mut p = Pit::new();
        program(&mut b, &mut p, 0, 2, 1000, false);
        program(&mut b, &mut p, 1, 0, 300, false);
        at(&mut b, LOAD + 100);
        b.out(&mut p, 0x43, 0xc6); // count and status of channels 0 and 1
        at(&mut b, LOAD + 400);
        assert_eq!(b.inb(&mut p, 0x40), 0xb4, "ch0: OUT high, lo/hi, mode 2");
        assert_eq!(read16(&mut b, &mut p, 0), 900);
        assert_eq!(b.inb(&mut p, 0x41), 0x30, "ch1: OUT low, lo/hi, mode 0");
        assert_eq!(read16(&mut b, &mut p, 1), 200);
        // Status only, after a control word without a count: null count.
        b.out(&mut p, 0x43, 0xb0);
        b.out(&mut p, 0x43, 0xe8);
        assert_eq!(
            b.inb(&mut p, 0x42),
            0x70,
            "ch2: OUT low (mode 0), null count"
        );
    }

    #[test]
    fn port_61_bits() {
        let mut b = Bench::new();
        let mut p = Pit::new();
        assert_eq!(b.inb(&mut p, 0x61), 0x20, "gate off: OUT2 high, refresh 0");
        b.out(&mut p, 0x61, 0xff);
        assert_eq!(b.inb(&mut p, 0x61) & 0x0f, 0x0f, "bits 0-3 read back");
        b.at(REFRESH_TOGGLE_NS);
        assert_eq!(b.inb(&mut p, 0x61) & 0x10, 0x10, "refresh toggles");
        b.at(2 * REFRESH_TOGGLE_NS);
        assert_eq!(b.inb(&mut p, 0x61) & 0x10, 0);
        b.out(&mut p, 0x61, 0x01);
        program(&mut b, &mut p, 2, 0, 10, false);
        at(&mut b, LOAD + 9);
        assert_eq!(b.inb(&mut p, 0x61) & 0x23, 0x01, "OUT2 low, speaker off");
        at(&mut b, LOAD + 10);
        assert_eq!(
            b.inb(&mut p, 0x61) & 0x20,
            0x20,
            "OUT2 high at terminal count"
        );
    }

    #[test]
    fn power_on_channel_0_ticks_at_18_hz() {
        let p = Pit::new();
        assert_eq!(p.next_deadline(), Some(ns_of_tick(65536)));
    }

    #[test]
    fn channel_0_pulses_irq0_at_each_edge_and_coalesces_missed_ones() {
        let mut b = Bench::new();
        let mut p = Pit::new();
        program(&mut b, &mut p, 0, 2, 1000, false);
        let first = ns_of_tick(LOAD + 1000);
        assert_eq!(p.next_deadline(), Some(first));
        b.at(first - 1);
        b.poll(&mut p);
        assert_eq!(b.lines.rises[0], 0);
        b.at(first);
        b.poll(&mut p);
        assert_eq!(b.lines.rises[0], 1);
        assert!(!b.lines.level[0], "pulse leaves the line low");
        assert_eq!(p.next_deadline(), Some(ns_of_tick(LOAD + 2000)));
        b.poll(&mut p);
        assert_eq!(b.lines.rises[0], 1, "no edge twice");
        // Five periods pass unpolled: one pulse.
        at(&mut b, LOAD + 6500);
        b.poll(&mut p);
        assert_eq!(b.lines.rises[0], 2);
        assert_eq!(p.next_deadline(), Some(ns_of_tick(LOAD + 7000)));
        let mut stats = EngineStats::default();
        p.add_stats(&mut stats);
        assert_eq!(stats.get("pit.irq0_pulses"), 2);
        assert_eq!(
            stats.get("pit.irq0_edges_coalesced"),
            4,
            "edges at +2000..+6000"
        );
    }

    #[test]
    fn one_shot_mode_0_fires_once() {
        let mut b = Bench::new();
        let mut p = Pit::new();
        program(&mut b, &mut p, 0, 0, 500, false);
        assert_eq!(p.next_deadline(), Some(ns_of_tick(LOAD + 500)));
        at(&mut b, LOAD + 10_000);
        b.poll(&mut p);
        assert_eq!(b.lines.rises[0], 1);
        assert_eq!(p.next_deadline(), None);
        b.poll(&mut p);
        assert_eq!(b.lines.rises[0], 1);
        // A control word alone stops channel 0 (mode 0 waits for its count).
        b.out(&mut p, 0x43, 0x34);
        assert_eq!(p.next_deadline(), None);
    }

    #[test]
    fn reprogramming_delivers_edges_that_already_happened() {
        let mut b = Bench::new();
        let mut p = Pit::new();
        program(&mut b, &mut p, 0, 2, 100, false);
        at(&mut b, LOAD + 150);
        b.out(&mut p, 0x43, 0x34);
        assert_eq!(b.lines.rises[0], 1);
    }

    #[test]
    fn mode_2_takes_a_new_count_at_the_end_of_the_period() {
        let mut b = Bench::new();
        let mut p = Pit::new();
        program(&mut b, &mut p, 0, 2, 1000, false);
        at(&mut b, LOAD + 300);
        b.out(&mut p, 0x40, 0xf4); // 500
        b.out(&mut p, 0x40, 0x01);
        assert_eq!(
            status(&mut b, &mut p, 0) & 0x40,
            0x40,
            "null count until reload"
        );
        at(&mut b, LOAD + 400);
        assert_eq!(read16(&mut b, &mut p, 0), 600, "old period still running");
        assert_eq!(p.next_deadline(), Some(ns_of_tick(LOAD + 1000)));
        at(&mut b, LOAD + 1200);
        assert_eq!(read16(&mut b, &mut p, 0), 300, "new count from the reload");
        assert_eq!(b.lines.rises[0], 1, "the reload edge was delivered");
        assert_eq!(p.next_deadline(), Some(ns_of_tick(LOAD + 1500)));
    }

    #[test]
    fn save_restore_round_trip_and_mismatch() {
        let mut b = Bench::new();
        let mut p = Pit::new();
        program(&mut b, &mut p, 0, 3, 0x1234, false);
        at(&mut b, LOAD + 77);
        b.out(&mut p, 0x43, 0x00);
        let saved = p.save();
        let mut q = Pit::new();
        q.restore(&saved).unwrap();
        assert_eq!(q.save(), saved);
        assert_eq!(read16(&mut b, &mut q, 0), read16(&mut b, &mut p, 0));
        assert_eq!(q.next_deadline(), p.next_deadline());
        assert!(matches!(
            q.restore(&DeviceState::DebugExit),
            Err(DeviceError::WrongState { device: "pit", .. })
        ));
        let DeviceState::Pit(mut bad) = saved else {
            unreachable!()
        };
        bad.channels[1].rw = 0;
        assert!(matches!(
            q.restore(&DeviceState::Pit(bad)),
            Err(DeviceError::InvalidState { .. })
        ));
    }
}
