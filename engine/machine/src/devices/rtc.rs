//! The MC146818 real-time clock and its 128 bytes of CMOS memory (index port 0x70, whose
//! bit 7 disables NMI, and data port 0x71), as on QEMU's `pc`.
//!
//! The clock reads `Host::boot_wallclock` once, at the first access that needs the time,
//! and then advances with guest time, so a replay sees the same dates. Registers A-D follow
//! the data sheet: UIP for the 244 us before each update, the divider and periodic rate in
//! A, SET/PIE/AIE/UIE/DM/24h in B (setting SET freezes the time registers for writing and
//! clears UIE), the PF/AF/UF/IRQF flags in C (cleared by reading C), VRT in D. Periodic,
//! alarm and update-ended interrupts drive IRQ 8 high until C is read. Events are not
//! stepped: flags are brought up to date from the time at every access and poll, and
//! [`Device::next_deadline`] names the next event that would raise the line.
//!
//! Simplification: a divider in reset (A bits 6-4 other than 010) stops the periodic and
//! update events and UIP, but not the time itself.
//!
//! The CMOS holds what QEMU's `pc` firmware interface puts there: memory sizes from the
//! layout, the equipment byte, the century, and the standard checksum over 0x10-0x2d.

use super::{Device, DeviceError, DeviceState, IoCtx};
use crate::cpu::EngineStats;
use crate::memory::MemoryLayout;
use serde::{Deserialize, Serialize};

/// The index and data ports.
pub const RTC_BASE: u16 = 0x70;
/// The RTC's interrupt line.
pub const RTC_IRQ: u32 = 8;
/// Bytes of CMOS memory (including the clock registers).
pub const CMOS_SIZE: usize = 128;

/// Seconds, minutes, hours, day of week, day of month, month, year.
const REG_SECONDS: usize = 0x00;
const REG_SECONDS_ALARM: usize = 0x01;
const REG_MINUTES: usize = 0x02;
const REG_MINUTES_ALARM: usize = 0x03;
const REG_HOURS: usize = 0x04;
const REG_HOURS_ALARM: usize = 0x05;
const REG_WEEKDAY: usize = 0x06;
const REG_DAY: usize = 0x07;
const REG_MONTH: usize = 0x08;
const REG_YEAR: usize = 0x09;
/// Register A: UIP, divider, rate select.
pub const REG_A: usize = 0x0a;
/// Register B: SET, PIE, AIE, UIE, SQWE, DM, 24/12, DSE.
pub const REG_B: usize = 0x0b;
/// Register C: IRQF, PF, AF, UF (read-only, cleared by reading).
pub const REG_C: usize = 0x0c;
/// Register D: VRT.
pub const REG_D: usize = 0x0d;
/// The century (BCD or binary, as the date).
pub const REG_CENTURY: usize = 0x32;

const A_UIP: u8 = 0x80;
const A_DV_MASK: u8 = 0x70;
const A_DV_NORMAL: u8 = 0x20;
const B_SET: u8 = 0x80;
const B_PIE: u8 = 0x40;
const B_AIE: u8 = 0x20;
const B_UIE: u8 = 0x10;
const B_DM_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const C_IRQF: u8 = 0x80;
const C_PF: u8 = 0x40;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;
const D_VRT: u8 = 0x80;

const NS_PER_SEC: u64 = 1_000_000_000;
/// UIP is set this long before each update (8 periods of the 32.768 kHz time base).
pub const UIP_HOLD_NS: u64 = 244_141;
/// The time base of the divider chain.
const BASE_HZ: u64 = 32_768;

/// Saved state of the RTC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcState {
    /// CMOS memory, 128 bytes. The time registers hold the clock only while SET is set or
    /// right after an access refreshed them.
    pub cmos: Vec<u8>,
    /// The selected register.
    pub index: u8,
    /// Bit 7 of the last index write.
    pub nmi_disabled: bool,
    /// The clock: RTC time (seconds since the epoch) at guest time `.1` (ns); `None` until
    /// the wall clock was first asked.
    pub clock: Option<(i64, u64)>,
    /// Periodic and update events up to this guest time have set their flags.
    pub flags_checked_ns: u64,
    /// The level of IRQ 8.
    pub irq_level: bool,
}

/// The RTC with its CMOS memory.
#[derive(Debug)]
pub struct Rtc {
    state: RtcState,
    irq8_raised: u64,
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

fn from_bcd(v: u8) -> u8 {
    (v >> 4).wrapping_mul(10).wrapping_add(v & 0xf)
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Days since 1970-01-01 of a date (month clamped to 1-12).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let m = i64::from(m.clamp(1, 12));
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Broken-down time: (seconds, minutes, hours, weekday 1-7 with Sunday 1, day, month, year).
fn broken_down(secs: i64) -> (u8, u8, u8, u8, u8, u8, i64) {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let weekday = (days + 4).rem_euclid(7) + 1;
    (
        (rem % 60) as u8,
        (rem / 60 % 60) as u8,
        (rem / 3600) as u8,
        weekday as u8,
        d as u8,
        m as u8,
        y,
    )
}

impl Rtc {
    /// An RTC whose CMOS describes `layout` (memory sizes) the way QEMU's `pc` does.
    pub fn new(layout: &MemoryLayout) -> Self {
        let mut cmos = vec![0u8; CMOS_SIZE];
        cmos[REG_A] = A_DV_NORMAL | 0x06;
        cmos[REG_B] = B_24H;
        cmos[REG_D] = D_VRT;
        // Equipment: math coprocessor present; no floppy drives, no PS/2 mouse (deja-pc
        // attaches neither); display bits 0 (EGA/VGA), as QEMU.
        cmos[0x14] = 0x02;
        // Base memory: 640 KiB.
        cmos[0x15..=0x16].copy_from_slice(&640u16.to_le_bytes());
        // Extended memory above 1 MiB in KiB, capped at 0xffff (old and new locations).
        let ext_kib = (layout.below_4g / 1024).saturating_sub(1024).min(0xffff) as u16;
        cmos[0x17..=0x18].copy_from_slice(&ext_kib.to_le_bytes());
        cmos[0x30..=0x31].copy_from_slice(&ext_kib.to_le_bytes());
        // Memory above 16 MiB (below 4 GiB) in 64 KiB units.
        let above_16m = (layout.below_4g.saturating_sub(16 << 20) >> 16).min(0xffff) as u16;
        cmos[0x34..=0x35].copy_from_slice(&above_16m.to_le_bytes());
        // Memory above 4 GiB in 64 KiB units, 24 bits.
        let above_4g = (layout.above_4g >> 16).min(0xff_ffff) as u32;
        cmos[0x5b..=0x5d].copy_from_slice(&above_4g.to_le_bytes()[..3]);
        // Processors minus one.
        cmos[0x5f] = 0;
        let sum: u16 = cmos[0x10..=0x2d].iter().map(|&b| u16::from(b)).sum();
        cmos[0x2e..=0x2f].copy_from_slice(&sum.to_be_bytes());
        Self {
            state: RtcState {
                cmos,
                index: 0,
                nmi_disabled: false,
                clock: None,
                flags_checked_ns: 0,
                irq_level: false,
            },
            irq8_raised: 0,
        }
    }

    /// The state, for inspection.
    pub fn state(&self) -> &RtcState {
        &self.state
    }

    /// A CMOS byte as stored (without refreshing the time registers).
    pub fn cmos(&self, index: usize) -> u8 {
        self.state.cmos.get(index).copied().unwrap_or(0xff)
    }

    fn reg(&self, r: usize) -> u8 {
        self.state.cmos[r]
    }

    fn binary(&self) -> bool {
        self.reg(REG_B) & B_DM_BINARY != 0
    }

    fn divider_running(&self) -> bool {
        self.reg(REG_A) & A_DV_MASK == A_DV_NORMAL
    }

    fn updating(&self) -> bool {
        self.reg(REG_B) & B_SET == 0
    }

    fn encode(&self, v: u8) -> u8 {
        if self.binary() { v } else { to_bcd(v) }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.binary() { v } else { from_bcd(v) }
    }

    fn encode_hour(&self, h: u8) -> u8 {
        if self.reg(REG_B) & B_24H != 0 {
            return self.encode(h);
        }
        let h12 = if h.is_multiple_of(12) { 12 } else { h % 12 };
        self.encode(h12) | if h >= 12 { 0x80 } else { 0 }
    }

    fn decode_hour(&self, raw: u8) -> u8 {
        if self.reg(REG_B) & B_24H != 0 {
            return self.decode(raw);
        }
        let h12 = self.decode(raw & 0x7f) % 12;
        if raw & 0x80 != 0 { h12 + 12 } else { h12 }
    }

    /// Asks the host for the wall clock the first time the time is needed.
    fn ensure_clock(&mut self, ctx: &mut IoCtx) {
        if self.state.clock.is_none() {
            let wallclock = ctx.host.boot_wallclock();
            self.state.clock = Some((wallclock, 0));
        }
    }

    /// The RTC time in seconds at guest time `now`, and the ns since the last update.
    fn time_at(&self, now: u64) -> (i64, u64) {
        let (secs, base_ns) = self.state.clock.unwrap_or((0, 0));
        let elapsed = now.saturating_sub(base_ns);
        (
            secs.saturating_add((elapsed / NS_PER_SEC) as i64),
            elapsed % NS_PER_SEC,
        )
    }

    /// The time registers' bytes for `secs` in the current format.
    fn time_bytes(&self, secs: i64) -> [(usize, u8); 8] {
        let (s, m, h, wd, d, mo, y) = broken_down(secs);
        [
            (REG_SECONDS, self.encode(s)),
            (REG_MINUTES, self.encode(m)),
            (REG_HOURS, self.encode_hour(h)),
            (REG_WEEKDAY, self.encode(wd)),
            (REG_DAY, self.encode(d)),
            (REG_MONTH, self.encode(mo)),
            (REG_YEAR, self.encode(y.rem_euclid(100) as u8)),
            (
                REG_CENTURY,
                self.encode(y.div_euclid(100).clamp(0, 99) as u8),
            ),
        ]
    }

    /// Copies the running clock into the time registers.
    fn refresh_registers(&mut self, now: u64) {
        let (secs, _) = self.time_at(now);
        for (r, v) in self.time_bytes(secs) {
            self.state.cmos[r] = v;
        }
    }

    /// The time the time registers hold, in seconds since the epoch.
    fn registers_time(&self) -> i64 {
        let year = i64::from(self.decode(self.reg(REG_CENTURY))) * 100
            + i64::from(self.decode(self.reg(REG_YEAR)));
        let days = days_from_civil(
            year,
            u32::from(self.decode(self.reg(REG_MONTH))),
            u32::from(self.decode(self.reg(REG_DAY))),
        );
        days * 86_400
            + i64::from(self.decode_hour(self.reg(REG_HOURS))) * 3600
            + i64::from(self.decode(self.reg(REG_MINUTES))) * 60
            + i64::from(self.decode(self.reg(REG_SECONDS)))
    }

    /// Ticks of the 32.768 kHz time base between periodic interrupts (0: off).
    fn periodic_divisor(&self) -> u64 {
        match self.reg(REG_A) & 0x0f {
            0 => 0,
            rs @ 1..=2 => 1 << (rs + 6),
            rs => 1 << (rs - 1),
        }
    }

    fn alarm_matches(&self, secs: i64) -> bool {
        let (s, m, h, ..) = broken_down(secs);
        [
            (REG_SECONDS_ALARM, self.encode(s)),
            (REG_MINUTES_ALARM, self.encode(m)),
            (REG_HOURS_ALARM, self.encode_hour(h)),
        ]
        .iter()
        .all(|&(r, v)| self.reg(r) & 0xc0 == 0xc0 || self.reg(r) == v)
    }

    /// Sets PF, UF and AF for the events in `(flags_checked_ns, now]`.
    fn catch_up(&mut self, now: u64) {
        let from = self.state.flags_checked_ns;
        if now <= from {
            return;
        }
        self.state.flags_checked_ns = now;
        if !self.divider_running() || self.state.clock.is_none() {
            return;
        }
        let mut flags = 0;
        let t32 = |ns: u64| (u128::from(ns) * u128::from(BASE_HZ) / 1_000_000_000) as u64;
        if let (Some(a), Some(b)) = (
            t32(now).checked_div(self.periodic_divisor()),
            t32(from).checked_div(self.periodic_divisor()),
        ) && a > b
        {
            flags |= C_PF;
        }
        if self.updating() {
            let base_ns = self.state.clock.map_or(0, |c| c.1);
            let k = |ns: u64| ns.saturating_sub(base_ns) / NS_PER_SEC;
            let (k_from, k_to) = (k(from), k(now));
            if k_to > k_from {
                flags |= C_UF;
                let base_secs = self.state.clock.map_or(0, |c| c.0);
                // A day of updates covers every alarm setting.
                let first = (k_from + 1).max(k_to.saturating_sub(86_400));
                if (first..=k_to).any(|i| self.alarm_matches(base_secs.saturating_add(i as i64))) {
                    flags |= C_AF;
                }
            }
        }
        self.state.cmos[REG_C] |= flags;
    }

    /// Recomputes IRQF and drives IRQ 8.
    fn update_irq(&mut self, ctx: &mut IoCtx) {
        let c = self.reg(REG_C);
        let enabled = self.reg(REG_B) & (B_PIE | B_AIE | B_UIE);
        // PIE/AIE/UIE in B sit at the same bits as PF/AF/UF in C.
        let irqf = c & enabled & (C_PF | C_AF | C_UF) != 0;
        self.state.cmos[REG_C] = if irqf { c | C_IRQF } else { c & !C_IRQF };
        if irqf != self.state.irq_level {
            self.state.irq_level = irqf;
            self.irq8_raised += u64::from(irqf);
            ctx.irq.set_irq(RTC_IRQ, irqf);
        }
    }

    fn read_data(&mut self, now: u64) -> u8 {
        let index = usize::from(self.state.index);
        match index {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
            | REG_YEAR | REG_CENTURY => {
                if self.updating() {
                    self.refresh_registers(now);
                }
                self.reg(index)
            }
            REG_A => {
                let (_, phase) = self.time_at(now);
                let uip =
                    self.updating() && self.divider_running() && phase >= NS_PER_SEC - UIP_HOLD_NS;
                (self.reg(REG_A) & !A_UIP) | if uip { A_UIP } else { 0 }
            }
            REG_C => {
                let c = self.reg(REG_C);
                self.state.cmos[REG_C] = 0;
                c
            }
            _ => self.reg(index),
        }
    }

    fn write_data(&mut self, now: u64, value: u8) {
        let index = usize::from(self.state.index);
        match index {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
            | REG_YEAR | REG_CENTURY => {
                if self.updating() {
                    // Keep the sub-second phase; the new time counts from the last update.
                    self.refresh_registers(now);
                    self.state.cmos[index] = value;
                    let (_, phase) = self.time_at(now);
                    self.state.clock = Some((self.registers_time(), now - phase));
                } else {
                    self.state.cmos[index] = value;
                }
            }
            REG_A => self.state.cmos[REG_A] = value & !A_UIP,
            REG_B => {
                let was_set = !self.updating();
                let mut value = value;
                if value & B_SET != 0 {
                    if !was_set {
                        self.refresh_registers(now);
                    }
                    value &= !B_UIE;
                }
                self.state.cmos[REG_B] = value;
                if was_set && value & B_SET == 0 {
                    // The clock restarts from the registers written while it was stopped.
                    self.state.clock = Some((self.registers_time(), now));
                }
            }
            REG_C | REG_D => {}
            _ => self.state.cmos[index] = value,
        }
    }
}

impl Device for Rtc {
    fn survives_reset(&self) -> bool {
        // Battery backed: a PC reset keeps the clock and the NVRAM.
        true
    }

    fn name(&self) -> &'static str {
        "rtc"
    }

    fn read(&mut self, ctx: &mut IoCtx, addr: u64, data: &mut [u8]) {
        let value = if addr & 1 == 0 {
            // The index register is write-only.
            0xff
        } else {
            self.ensure_clock(ctx);
            let now = ctx.now();
            self.catch_up(now);
            let v = self.read_data(now);
            self.update_irq(ctx);
            v
        };
        data.fill(value);
    }

    fn write(&mut self, ctx: &mut IoCtx, addr: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        if addr & 1 == 0 {
            self.state.index = value & 0x7f;
            self.state.nmi_disabled = value & 0x80 != 0;
            return;
        }
        self.ensure_clock(ctx);
        let now = ctx.now();
        self.catch_up(now);
        self.write_data(now, value);
        self.update_irq(ctx);
    }

    fn poll(&mut self, ctx: &mut IoCtx) {
        if self.next_deadline().is_none() {
            return;
        }
        let now = ctx.now();
        self.catch_up(now);
        self.update_irq(ctx);
    }

    fn next_deadline(&self) -> Option<u64> {
        if self.state.irq_level || self.state.clock.is_none() || !self.divider_running() {
            return None;
        }
        let b = self.reg(REG_B);
        let from = self.state.flags_checked_ns;
        let mut next: Option<u64> = None;
        let div = self.periodic_divisor();
        if b & B_PIE != 0 && div != 0 {
            let t32 = (u128::from(from) * u128::from(BASE_HZ) / 1_000_000_000) as u64;
            let tick = (t32 / div + 1) * div;
            let ns = (u128::from(tick) * 1_000_000_000).div_ceil(u128::from(BASE_HZ));
            next = Some(ns.min(u128::from(u64::MAX)) as u64);
        }
        if b & (B_UIE | B_AIE) != 0 && self.updating() {
            let base_ns = self.state.clock.map_or(0, |c| c.1);
            let k = from.saturating_sub(base_ns) / NS_PER_SEC;
            let ns = base_ns.saturating_add((k + 1).saturating_mul(NS_PER_SEC));
            next = Some(next.map_or(ns, |n| n.min(ns)));
        }
        next
    }

    fn save(&self) -> DeviceState {
        DeviceState::Rtc(self.state.clone())
    }

    fn add_stats(&self, stats: &mut EngineStats) {
        stats.add("rtc.irq8_raised", self.irq8_raised);
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        let DeviceState::Rtc(s) = state else {
            return Err(DeviceError::WrongState {
                device: "rtc",
                found: state.kind(),
            });
        };
        if s.cmos.len() != CMOS_SIZE || s.index >= CMOS_SIZE as u8 {
            return Err(DeviceError::InvalidState {
                device: "rtc",
                detail: format!(
                    "CMOS of {} bytes (expected {CMOS_SIZE}), index {:#x}",
                    s.cmos.len(),
                    s.index
                ),
            });
        }
        self.state = s.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testutil::Bench;

    /// 2026-11-23 21:04:46 UTC, a Monday.
    const BOOT: i64 = 1_795_467_886;
    const SEC: u64 = NS_PER_SEC;

    fn setup() -> (Bench, Rtc) {
        let b = Bench::new();
        b.host.0.lock().unwrap().wallclock = BOOT;
        (b, Rtc::new(&MemoryLayout::pc(16 << 20).unwrap()))
    }

    fn get(b: &mut Bench, r: &mut Rtc, index: u8) -> u8 {
        b.out(r, 0x70, index);
        b.inb(r, 0x71)
    }

    fn set(b: &mut Bench, r: &mut Rtc, index: u8, value: u8) {
        b.out(r, 0x70, index);
        b.out(r, 0x71, value);
    }

    /// Seconds, minutes, hours, weekday, day, month, year, century.
    fn date(b: &mut Bench, r: &mut Rtc) -> [u8; 8] {
        [0, 2, 4, 6, 7, 8, 9, 0x32].map(|i| get(b, r, i))
    }

    #[test]
    fn date_formats() {
        // (register B, expected registers at boot + 0)
        let table: &[(u8, [u8; 8], &str)] = &[
            (
                0x02,
                [0x46, 0x04, 0x21, 0x02, 0x23, 0x11, 0x26, 0x20],
                "BCD 24h",
            ),
            (0x06, [46, 4, 21, 2, 23, 11, 26, 20], "binary 24h"),
            (
                0x00,
                [0x46, 0x04, 0x89, 0x02, 0x23, 0x11, 0x26, 0x20],
                "BCD 12h",
            ),
            (0x04, [46, 4, 0x89, 2, 23, 11, 26, 20], "binary 12h"),
        ];
        for &(reg_b, expected, what) in table {
            let (mut b, mut r) = setup();
            set(&mut b, &mut r, 0x0b, reg_b);
            assert_eq!(date(&mut b, &mut r), expected, "{what}");
        }
    }

    #[test]
    fn wall_clock_is_asked_once() {
        let (mut b, mut r) = setup();
        date(&mut b, &mut r);
        b.at(5 * SEC);
        date(&mut b, &mut r);
        assert_eq!(b.host.0.lock().unwrap().wallclock_asks, 1);
    }

    #[test]
    fn twelve_hour_mode_noon_and_midnight() {
        // (seconds after 21:18:46, 12 h BCD hour register)
        for (dt, hour) in [
            (0, 0x89),
            (3 * 3600, 0x12),
            (3 * 3600 + 1800, 0x12),
            (15 * 3600, 0x92),
        ] {
            let (mut b, mut r) = setup();
            set(&mut b, &mut r, 0x0b, 0x00);
            b.at((dt + 14 * 60) as u64 * SEC);
            assert_eq!(get(&mut b, &mut r, 4), hour, "+{dt} s");
        }
    }

    #[test]
    fn time_follows_guest_time_and_rolls_the_date() {
        let (mut b, mut r) = setup();
        b.at(61 * SEC + SEC / 2);
        assert_eq!(&date(&mut b, &mut r)[..3], &[0x47, 0x05, 0x21]);
        // 2 h 55 min 14 s after boot it is Tuesday 2026-11-24 00:00:00.
        b.at(10_514 * SEC);
        let d = date(&mut b, &mut r);
        assert_eq!(d, [0x00, 0x00, 0x00, 0x03, 0x24, 0x11, 0x26, 0x20]);
    }

    #[test]
    fn set_mode_freezes_and_restarts_from_written_registers() {
        let (mut b, mut r) = setup();
        b.at(10 * SEC);
        set(&mut b, &mut r, 0x0b, 0x82 | B_UIE);
        assert_eq!(get(&mut b, &mut r, 0x0b), 0x82, "SET clears UIE");
        b.at(20 * SEC);
        assert_eq!(get(&mut b, &mut r, 0), 0x56, "frozen at the SET time");
        // 2099-12-31 23:59:59, a Thursday.
        for (i, v) in [
            (0, 0x59),
            (2, 0x59),
            (4, 0x23),
            (7, 0x31),
            (8, 0x12),
            (9, 0x99),
        ] {
            set(&mut b, &mut r, i, v);
        }
        set(&mut b, &mut r, 0x32, 0x20);
        b.at(30 * SEC);
        assert_eq!(get(&mut b, &mut r, 0), 0x59, "still frozen");
        set(&mut b, &mut r, 0x0b, 0x02);
        b.at(31 * SEC);
        assert_eq!(
            date(&mut b, &mut r),
            [0x00, 0x00, 0x00, 0x06, 0x01, 0x01, 0x00, 0x21],
            "2100-01-01 is a Friday"
        );
        // A write without SET re-bases immediately and keeps the phase.
        b.at(31 * SEC + SEC / 4);
        set(&mut b, &mut r, 2, 0x30);
        b.at(32 * SEC);
        assert_eq!(&date(&mut b, &mut r)[..3], &[0x01, 0x30, 0x00]);
    }

    #[test]
    fn uip_is_set_just_before_each_update() {
        let (mut b, mut r) = setup();
        for (ns, uip) in [
            (0, false),
            (SEC / 2, false),
            (SEC - UIP_HOLD_NS - 1, false),
            (SEC - UIP_HOLD_NS, true),
            (SEC - 1, true),
            (SEC, false),
        ] {
            b.at(ns);
            assert_eq!(get(&mut b, &mut r, 0x0a) & 0x80 != 0, uip, "at {ns} ns");
        }
        assert_eq!(get(&mut b, &mut r, 0x0a), 0x26, "default divider and rate");
        b.at(SEC - 1);
        set(&mut b, &mut r, 0x0b, 0x82);
        assert_eq!(get(&mut b, &mut r, 0x0a) & 0x80, 0, "no update while SET");
    }

    #[test]
    fn periodic_rates_raise_irq8_until_c_is_read() {
        // (rate select, period in ns, rounded up)
        for (rs, period) in [
            (3u8, 122_071u64),
            (6, 976_563),
            (0xf, 500_000_000),
            (1, 3_906_250),
        ] {
            let (mut b, mut r) = setup();
            set(&mut b, &mut r, 0x0a, 0x20 | rs);
            get(&mut b, &mut r, 0x0c);
            assert_eq!(r.next_deadline(), None, "PIE off: nothing to wake for");
            set(&mut b, &mut r, 0x0b, 0x02 | B_PIE);
            assert_eq!(r.next_deadline(), Some(period), "rate {rs}");
            b.at(period - 1);
            b.poll(&mut r);
            assert!(!b.lines.level[8], "rate {rs}");
            b.at(period);
            b.poll(&mut r);
            assert!(b.lines.level[8], "rate {rs}");
            assert_eq!(r.next_deadline(), None, "line high until C is read");
            assert_eq!(get(&mut b, &mut r, 0x0c), 0xc0, "rate {rs}: IRQF | PF");
            assert!(!b.lines.level[8]);
            assert_eq!(get(&mut b, &mut r, 0x0c), 0x00, "C cleared by reading");
        }
    }

    #[test]
    fn flags_are_set_without_their_enables_but_irqf_is_not() {
        let (mut b, mut r) = setup();
        get(&mut b, &mut r, 0x0c);
        b.at(SEC + 1);
        assert_eq!(get(&mut b, &mut r, 0x0c), C_PF | C_UF);
        assert_eq!(b.lines.rises[8], 0);
        // Enabling with a flag already set raises the line at once.
        b.at(2 * SEC + 1);
        set(&mut b, &mut r, 0x0b, 0x02 | B_UIE);
        assert!(b.lines.level[8]);
        assert_eq!(get(&mut b, &mut r, 0x0c), C_IRQF | C_PF | C_UF);
    }

    #[test]
    fn update_and_alarm_interrupts() {
        let (mut b, mut r) = setup();
        set(&mut b, &mut r, 0x0b, 0x02 | B_UIE);
        assert_eq!(r.next_deadline(), Some(SEC));
        b.at(SEC);
        b.poll(&mut r);
        assert!(b.lines.level[8]);
        assert_eq!(get(&mut b, &mut r, 0x0c) & !C_PF, C_IRQF | C_UF);
        // Alarm at 21:04:49 (boot + 3 s), minutes and hours "don't care".
        set(&mut b, &mut r, 0x01, 0x49);
        set(&mut b, &mut r, 0x03, 0xc0);
        set(&mut b, &mut r, 0x05, 0xff);
        set(&mut b, &mut r, 0x0b, 0x02 | B_AIE);
        b.at(2 * SEC);
        b.poll(&mut r);
        assert!(!b.lines.level[8], "update without UIE, no alarm yet");
        b.at(3 * SEC + 5);
        b.poll(&mut r);
        assert!(b.lines.level[8]);
        assert_eq!(get(&mut b, &mut r, 0x0c) & !C_PF, C_IRQF | C_AF | C_UF);
        // An alarm passed while nobody polled is still flagged.
        set(&mut b, &mut r, 0x01, 0x30);
        b.at(3600 * SEC);
        assert_eq!(get(&mut b, &mut r, 0x0c) & C_AF, C_AF);
    }

    #[test]
    fn cmos_describes_memory_like_qemu() {
        // (RAM, [0x15, 0x16, 0x17, 0x18, 0x30, 0x31, 0x34, 0x35, 0x5b, 0x5c, 0x5d])
        let table: &[(u64, [u8; 11])] = &[
            (8 << 20, [0x80, 0x02, 0x00, 0x1c, 0x00, 0x1c, 0, 0, 0, 0, 0]),
            (
                256 << 20,
                [0x80, 0x02, 0xff, 0xff, 0xff, 0xff, 0x00, 0x0f, 0, 0, 0],
            ),
            (
                6 << 30,
                [
                    0x80, 0x02, 0xff, 0xff, 0xff, 0xff, 0x00, 0xbf, 0x00, 0xc0, 0x00,
                ],
            ),
        ];
        for &(ram, expected) in table {
            let r = Rtc::new(&MemoryLayout::pc(ram).unwrap());
            let got = [
                0x15, 0x16, 0x17, 0x18, 0x30, 0x31, 0x34, 0x35, 0x5b, 0x5c, 0x5d,
            ]
            .map(|i| r.cmos(i));
            assert_eq!(got, expected, "{ram:#x}");
            assert_eq!(r.cmos(0x14), 0x02);
            assert_eq!(r.cmos(0x0d), 0x80);
            let sum: u16 = (0x10..=0x2d).map(|i| u16::from(r.cmos(i))).sum();
            assert_eq!(u16::from_be_bytes([r.cmos(0x2e), r.cmos(0x2f)]), sum);
        }
    }

    #[test]
    fn index_port_keeps_nmi_bit_and_plain_cmos_bytes_round_trip() {
        let (mut b, mut r) = setup();
        b.out(&mut r, 0x70, 0x80 | 0x40);
        assert!(r.state().nmi_disabled);
        assert_eq!(r.state().index, 0x40);
        b.out(&mut r, 0x71, 0xab);
        assert_eq!(get(&mut b, &mut r, 0x40), 0xab);
        assert!(!r.state().nmi_disabled);
        assert_eq!(b.inb(&mut r, 0x70), 0xff);
        set(&mut b, &mut r, 0x0d, 0);
        assert_eq!(get(&mut b, &mut r, 0x0d), 0x80, "D is read-only");
        set(&mut b, &mut r, 0x0a, 0xa6);
        assert_eq!(get(&mut b, &mut r, 0x0a), 0x26, "UIP is read-only");
    }

    #[test]
    fn save_restore_round_trip_and_mismatch() {
        let (mut b, mut r) = setup();
        set(&mut b, &mut r, 0x0b, 0x02 | B_PIE);
        b.at(5 * SEC + 3);
        let t0 = date(&mut b, &mut r);
        let saved = r.save();
        let mut q = Rtc::new(&MemoryLayout::pc(16 << 20).unwrap());
        q.restore(&saved).unwrap();
        assert_eq!(q.save(), saved);
        assert_eq!(date(&mut b, &mut q), t0);
        assert_eq!(q.next_deadline(), r.next_deadline());
        assert_eq!(
            b.host.0.lock().unwrap().wallclock_asks,
            1,
            "restored clock kept"
        );
        assert!(matches!(
            q.restore(&DeviceState::DebugExit),
            Err(DeviceError::WrongState { device: "rtc", .. })
        ));
        let DeviceState::Rtc(mut bad) = saved else {
            unreachable!()
        };
        bad.cmos.truncate(64);
        assert!(matches!(
            q.restore(&DeviceState::Rtc(bad)),
            Err(DeviceError::InvalidState { .. })
        ));
    }
}
