//! The local APIC of deja's single CPU: the xAPIC register page at 0xfee00000 and the
//! x2APIC MSR view of the same registers, as a deterministic state machine.
//!
//! It keeps IRR/ISR/TMR and decides the highest deliverable vector from the task and
//! processor priorities; runs the timer in one-shot, periodic and TSC-deadline modes from
//! [`IoCtx::now`] only (the bus clock is 1 GHz, as QEMU's emulated APIC); takes LINT0/LINT1
//! (ExtINT from the 8259, NMI) and IPIs sent to itself through the ICR. NMI and INIT requests
//! are left for the CPU to take. The APIC base MSR's enable and x2APIC bits switch between
//! the views with the architectural transitions (#GP on invalid ones).

use super::{Device, DeviceError, DeviceState, IoCtx};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Default physical address of the register page.
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// Size of the register page.
pub const LAPIC_SIZE: u64 = 0x1000;
/// IA32_APIC_BASE.
pub const MSR_APIC_BASE: u32 = 0x1b;
/// IA32_TSC_DEADLINE.
pub const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// First x2APIC register MSR.
pub const X2APIC_MSR_FIRST: u32 = 0x800;
/// Last x2APIC register MSR.
pub const X2APIC_MSR_LAST: u32 = 0x8ff;
/// IA32_APIC_BASE: this is the bootstrap processor.
pub const APIC_BASE_BSP: u64 = 1 << 8;
/// IA32_APIC_BASE: x2APIC mode.
pub const APIC_BASE_EXTD: u64 = 1 << 10;
/// IA32_APIC_BASE: APIC globally enabled.
pub const APIC_BASE_ENABLE: u64 = 1 << 11;
/// Version register: version 0x14, six LVT entries (QEMU's value).
pub const LAPIC_VERSION: u32 = 0x0005_0014;
/// Physical address bits of deja's CPU (CPUID 0x80000008), limiting the APIC base.
const PHYS_ADDR_BITS: u32 = 40;
/// Default TSC frequency in kHz for TSC-deadline mode (1 GHz: the TSC counts nanoseconds).
pub const DEFAULT_TSC_KHZ: u64 = 1_000_000;

/// Register offsets in the xAPIC page (the x2APIC MSR is `0x800 + offset / 16`).
pub mod reg {
    #![allow(missing_docs)]
    pub const ID: u32 = 0x020;
    pub const VERSION: u32 = 0x030;
    pub const TPR: u32 = 0x080;
    pub const APR: u32 = 0x090;
    pub const PPR: u32 = 0x0a0;
    pub const EOI: u32 = 0x0b0;
    pub const RRD: u32 = 0x0c0;
    pub const LDR: u32 = 0x0d0;
    pub const DFR: u32 = 0x0e0;
    pub const SVR: u32 = 0x0f0;
    pub const ISR: u32 = 0x100;
    pub const TMR: u32 = 0x180;
    pub const IRR: u32 = 0x200;
    pub const ESR: u32 = 0x280;
    pub const ICR_LOW: u32 = 0x300;
    pub const ICR_HIGH: u32 = 0x310;
    pub const LVT_TIMER: u32 = 0x320;
    pub const LVT_THERMAL: u32 = 0x330;
    pub const LVT_PERF: u32 = 0x340;
    pub const LVT_LINT0: u32 = 0x350;
    pub const LVT_LINT1: u32 = 0x360;
    pub const LVT_ERROR: u32 = 0x370;
    pub const TIMER_INITIAL: u32 = 0x380;
    pub const TIMER_CURRENT: u32 = 0x390;
    pub const TIMER_DIVIDE: u32 = 0x3e0;
    /// x2APIC only.
    pub const SELF_IPI: u32 = 0x3f0;
}

/// LVT and ICR bit: masked.
pub const LVT_MASKED: u32 = 1 << 16;
/// LVT bit: remote IRR (level-triggered LINT input being serviced).
pub const LVT_REMOTE_IRR: u32 = 1 << 14;
/// LVT/ICR bit: level-triggered.
pub const LVT_LEVEL: u32 = 1 << 15;
/// SVR bit: APIC software enabled.
pub const SVR_ENABLE: u32 = 1 << 8;

/// ESR bit: an IPI with an illegal vector was sent.
pub const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
/// ESR bit: an interrupt with an illegal vector was received.
pub const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;
/// ESR bit: a reserved register was accessed.
pub const ESR_ILLEGAL_REGISTER: u32 = 1 << 7;

/// Delivery modes (LVT and ICR bits 10:8).
pub mod delivery {
    #![allow(missing_docs)]
    pub const FIXED: u32 = 0;
    pub const LOWEST: u32 = 1;
    pub const SMI: u32 = 2;
    pub const NMI: u32 = 4;
    pub const INIT: u32 = 5;
    pub const STARTUP: u32 = 6;
    pub const EXTINT: u32 = 7;
}

/// Index of each LVT entry in [`LapicState::lvt`].
const LVT_INDEX_TIMER: usize = 0;
const LVT_INDEX_LINT0: usize = 3;
const LVT_INDEX_ERROR: usize = 5;
/// Writable bits of each LVT entry: timer, thermal, perf, LINT0, LINT1, error.
const LVT_WRITABLE: [u32; 6] = [
    0x0007_00ff,
    0x0001_07ff,
    0x0001_07ff,
    0x0001_a7ff,
    0x0001_a7ff,
    0x0001_00ff,
];

/// How the engine's guest TSC relates to guest time, for IA32_TSC_DEADLINE: the guest
/// reads `now_ns * khz / 10^6 + offset` (wrapping) from RDTSC at guest time `now_ns`.
///
/// bt's TSC counts guest nanoseconds (1 GHz, [`GuestTsc::BT`] plus its IA32_TSC
/// adjustment); kvm's is the host's TSC at KVM's TSC frequency, so its offset is taken at
/// each write from the TSC KVM reports and the [`Host`](crate::Host)'s time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestTsc {
    /// TSC ticks per millisecond.
    pub khz: u64,
    /// Guest TSC minus `now_ns * khz / 10^6`, wrapping.
    pub offset: u64,
}

impl GuestTsc {
    /// bt's TSC with no IA32_TSC adjustment: one tick per guest nanosecond.
    pub const BT: GuestTsc = GuestTsc {
        khz: DEFAULT_TSC_KHZ,
        offset: 0,
    };

    /// The guest TSC an engine read (`tsc`) at guest time `now_ns`, at `khz`.
    pub fn observed(khz: u64, now_ns: u64, tsc: u64) -> GuestTsc {
        let khz = khz.max(1);
        let machine = (u128::from(now_ns) * u128::from(khz) / 1_000_000) as u64;
        GuestTsc {
            khz,
            offset: tsc.wrapping_sub(machine),
        }
    }
}

/// Timer modes (LVT timer bits 18:17).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerMode {
    /// Counts down once.
    OneShot,
    /// Reloads from the initial count.
    Periodic,
    /// Fires when the TSC reaches IA32_TSC_DEADLINE.
    TscDeadline,
}

/// An access the CPU must answer with #GP.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LapicError {
    /// An x2APIC MSR access that faults: wrong mode, missing register, read-only register,
    /// write-only register, or reserved bits set.
    #[error("#GP: {op} of x2APIC MSR {msr:#x} ({why})")]
    X2apicAccess {
        /// "rdmsr" or "wrmsr".
        op: &'static str,
        /// The MSR.
        msr: u32,
        /// Why it faults.
        why: &'static str,
    },
    /// A write to IA32_APIC_BASE with reserved bits or an invalid mode transition.
    #[error("#GP: wrmsr IA32_APIC_BASE {value:#x} from {current:#x} ({why})")]
    ApicBase {
        /// The value written.
        value: u64,
        /// The value before.
        current: u64,
        /// Why it faults.
        why: &'static str,
    },
}

/// The local APIC's complete state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LapicState {
    /// IA32_APIC_BASE.
    pub apic_base: u64,
    /// APIC ID.
    pub id: u32,
    /// Task priority.
    pub tpr: u8,
    /// Logical destination (xAPIC layout, bits 31:24).
    pub ldr: u32,
    /// Destination format (bits 31:28).
    pub dfr: u32,
    /// Spurious vector register.
    pub svr: u32,
    /// In-service register, 256 bits.
    pub isr: [u32; 8],
    /// Trigger-mode register, 256 bits.
    pub tmr: [u32; 8],
    /// Interrupt request register, 256 bits.
    pub irr: [u32; 8],
    /// The error status the guest last latched by writing ESR.
    pub esr: u32,
    /// Errors since the last latch.
    pub esr_pending: u32,
    /// Interrupt command register (destination in 63:32 as x2APIC; xAPIC uses 63:56).
    pub icr: u64,
    /// LVT timer, thermal, perf, LINT0, LINT1, error.
    pub lvt: [u32; 6],
    /// Timer initial count.
    pub timer_initial: u32,
    /// Timer divide configuration.
    pub timer_divide: u32,
    /// Guest time the count was last loaded or re-based (one-shot/periodic).
    pub timer_start_ns: u64,
    /// The current count at `timer_start_ns` (the initial count, unless the divisor changed
    /// mid-count).
    pub timer_start_count: u32,
    /// When the timer next fires, if armed.
    pub timer_deadline_ns: Option<u64>,
    /// IA32_TSC_DEADLINE.
    pub tsc_deadline: u64,
    /// TSC frequency in kHz (converts TSC deadlines to guest time).
    pub tsc_khz: u64,
    /// The guest's TSC minus the machine's TSC (`now_ns * tsc_khz / 10^6`) when
    /// IA32_TSC_DEADLINE was last written, wrapping: bt's IA32_TSC adjustment, or on kvm the
    /// host TSC's distance from guest time. Deadlines are compared in machine TSC units.
    pub tsc_offset: u64,
    /// Input levels of LINT0 and LINT1.
    pub lint_level: [bool; 2],
    /// An NMI waits for the CPU.
    pub nmi_pending: bool,
    /// An INIT waits for the CPU.
    pub init_pending: bool,
}

fn bit(bits: &[u32; 8], v: u8) -> bool {
    bits[usize::from(v >> 5)] & (1 << (v & 31)) != 0
}

fn set_bit(bits: &mut [u32; 8], v: u8, on: bool) {
    let w = &mut bits[usize::from(v >> 5)];
    if on {
        *w |= 1 << (v & 31);
    } else {
        *w &= !(1 << (v & 31));
    }
}

/// The highest vector set in a 256-bit register.
fn highest(bits: &[u32; 8]) -> Option<u8> {
    (0..8)
        .rev()
        .find(|&i| bits[i] != 0)
        .map(|i| (i * 32 + 31 - bits[i].leading_zeros() as usize) as u8)
}

/// What an EOI did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Eoi {
    /// The vector taken out of service.
    pub vector: u8,
    /// It was level-triggered: the I/O APIC must see an EOI for it.
    pub level: bool,
}

/// The local APIC.
#[derive(Debug, Clone)]
pub struct Lapic {
    state: LapicState,
    /// The vector of a level-triggered interrupt the guest just ended through the EOI
    /// register, for the I/O APIC (taken right after the access by the interrupt complex).
    level_eoi: Option<u8>,
}

impl Default for Lapic {
    fn default() -> Self {
        Self::new(0)
    }
}

impl Lapic {
    /// A local APIC at power-on for the bootstrap processor with `id`: globally enabled at
    /// 0xfee00000, software disabled, every LVT masked.
    pub fn new(id: u32) -> Self {
        let s = LapicState {
            apic_base: LAPIC_BASE | APIC_BASE_BSP | APIC_BASE_ENABLE,
            id,
            tpr: 0,
            ldr: 0,
            dfr: 0xffff_ffff,
            svr: 0xff,
            isr: [0; 8],
            tmr: [0; 8],
            irr: [0; 8],
            esr: 0,
            esr_pending: 0,
            icr: 0,
            lvt: [LVT_MASKED; 6],
            timer_initial: 0,
            timer_divide: 0,
            timer_start_ns: 0,
            timer_start_count: 0,
            timer_deadline_ns: None,
            tsc_deadline: 0,
            tsc_khz: DEFAULT_TSC_KHZ,
            tsc_offset: 0,
            lint_level: [false; 2],
            nmi_pending: false,
            init_pending: false,
        };
        Self {
            state: s,
            level_eoi: None,
        }
    }

    /// The state firmware (SeaBIOS) leaves for an OS loaded without one, as QEMU's
    /// `-kernel`: software enabled with spurious vector 0xff, LINT0 in ExtINT (virtual-wire
    /// mode: the 8259's INTR passes through) and LINT1 delivering NMI.
    pub fn firmware_handoff(id: u32) -> Self {
        let mut l = Self::new(id);
        l.state.svr = SVR_ENABLE | 0xff;
        l.state.lvt[LVT_INDEX_LINT0] = delivery::EXTINT << 8;
        l.state.lvt[LVT_INDEX_LINT0 + 1] = delivery::NMI << 8;
        l
    }

    /// Sets the TSC frequency used to convert IA32_TSC_DEADLINE to guest time.
    pub fn set_tsc_khz(&mut self, khz: u64) {
        self.state.tsc_khz = khz.max(1);
    }

    /// The state, for inspection.
    pub fn state(&self) -> &LapicState {
        &self.state
    }

    /// Whether IA32_APIC_BASE enables the APIC.
    pub fn globally_enabled(&self) -> bool {
        self.state.apic_base & APIC_BASE_ENABLE != 0
    }

    /// Whether the APIC is in x2APIC mode.
    pub fn x2apic(&self) -> bool {
        self.state.apic_base & APIC_BASE_EXTD != 0
    }

    fn software_enabled(&self) -> bool {
        self.state.svr & SVR_ENABLE != 0
    }

    /// Where the xAPIC page is (decoded only in xAPIC mode).
    pub fn mmio_base(&self) -> Option<u64> {
        (self.globally_enabled() && !self.x2apic()).then_some(self.state.apic_base & !0xfff)
    }

    /// The task priority as CR8 sees it (TPR bits 7:4).
    pub fn cr8(&self) -> u64 {
        u64::from(self.state.tpr >> 4)
    }

    /// A MOV to CR8: sets TPR bits 7:4 (and clears 3:0).
    pub fn set_cr8(&mut self, value: u64) {
        self.state.tpr = ((value & 0xf) << 4) as u8;
    }

    /// Processor priority: the task priority or the class of the highest in-service vector.
    pub fn ppr(&self) -> u8 {
        let tpr = self.state.tpr;
        let isrv = highest(&self.state.isr).unwrap_or(0);
        if tpr >> 4 >= isrv >> 4 {
            tpr
        } else {
            isrv & 0xf0
        }
    }

    /// The vector the APIC would deliver now, if its priority class beats the PPR.
    pub fn deliverable_vector(&self) -> Option<u8> {
        if !self.globally_enabled() || !self.software_enabled() {
            return None;
        }
        let irrv = highest(&self.state.irr)?;
        (irrv >> 4 > self.ppr() >> 4).then_some(irrv)
    }

    /// The interrupt acknowledge cycle for an APIC-sourced interrupt: moves the vector from
    /// IRR to ISR, or returns the spurious vector if nothing is deliverable any more.
    pub fn acknowledge(&mut self) -> u8 {
        match self.deliverable_vector() {
            Some(v) => {
                set_bit(&mut self.state.irr, v, false);
                set_bit(&mut self.state.isr, v, true);
                v
            }
            None => self.state.svr as u8,
        }
    }

    /// Ends the highest in-service interrupt.
    pub fn eoi(&mut self) -> Option<Eoi> {
        let v = highest(&self.state.isr)?;
        set_bit(&mut self.state.isr, v, false);
        let level = bit(&self.state.tmr, v);
        if level {
            for lvt in &mut self.state.lvt[LVT_INDEX_LINT0..=LVT_INDEX_LINT0 + 1] {
                if *lvt & 0xff == u32::from(v) {
                    *lvt &= !LVT_REMOTE_IRR;
                }
            }
        }
        Some(Eoi { vector: v, level })
    }

    /// An interrupt message for this APIC (from the I/O APIC, an LVT or an IPI).
    pub fn accept(&mut self, vector: u8, level: bool) {
        if vector < 16 {
            self.report_error(ESR_RECEIVE_ILLEGAL_VECTOR);
            return;
        }
        set_bit(&mut self.state.irr, vector, true);
        set_bit(&mut self.state.tmr, vector, level);
    }

    fn report_error(&mut self, bits: u32) {
        let new = bits & !self.state.esr_pending;
        self.state.esr_pending |= bits;
        let lvt = self.state.lvt[LVT_INDEX_ERROR];
        if new != 0 && lvt & LVT_MASKED == 0 && lvt & 0xff >= 16 {
            self.accept(lvt as u8, false);
        }
    }

    /// Takes the vector of a level-triggered interrupt the guest ended by writing the EOI
    /// register (the I/O APIC must clear its remote IRR).
    pub fn take_level_eoi(&mut self) -> Option<u8> {
        self.level_eoi.take()
    }

    /// An NMI message arrived (from the I/O APIC).
    pub fn set_nmi_pending(&mut self) {
        self.state.nmi_pending = true;
    }

    /// An INIT message arrived (from the I/O APIC).
    pub fn set_init_pending(&mut self) {
        self.state.init_pending = true;
    }

    /// Takes a pending NMI (from LINT1 or an IPI).
    pub fn take_nmi(&mut self) -> bool {
        std::mem::take(&mut self.state.nmi_pending)
    }

    /// Takes a pending INIT.
    pub fn take_init(&mut self) -> bool {
        std::mem::take(&mut self.state.init_pending)
    }

    /// Whether the 8259's INTR reaches the CPU: the APIC is globally disabled (bypassed), or
    /// LINT0 is unmasked in ExtINT mode (virtual wire).
    pub fn accepts_pic_interrupts(&self) -> bool {
        let lvt = self.state.lvt[LVT_INDEX_LINT0];
        !self.globally_enabled() || (lvt & LVT_MASKED == 0 && (lvt >> 8) & 7 == delivery::EXTINT)
    }

    /// Drives LINT0 (`pin` 0) or LINT1 (`pin` 1).
    pub fn set_lint(&mut self, pin: usize, level: bool) {
        let Some(&old) = self.state.lint_level.get(pin) else {
            return;
        };
        self.state.lint_level[pin] = level;
        let idx = LVT_INDEX_LINT0 + pin;
        let lvt = self.state.lvt[idx];
        if lvt & LVT_MASKED != 0 || !self.globally_enabled() {
            return;
        }
        let rising = level && !old;
        match (lvt >> 8) & 7 {
            delivery::FIXED if lvt & LVT_LEVEL != 0 && level && lvt & LVT_REMOTE_IRR == 0 => {
                self.state.lvt[idx] |= LVT_REMOTE_IRR;
                self.accept(lvt as u8, true);
            }
            delivery::FIXED if lvt & LVT_LEVEL != 0 => {}
            delivery::FIXED if rising => self.accept(lvt as u8, false),
            delivery::NMI if rising => self.state.nmi_pending = true,
            delivery::INIT if rising => self.state.init_pending = true,
            _ => {}
        }
    }

    fn timer_mode(&self) -> TimerMode {
        match (self.state.lvt[LVT_INDEX_TIMER] >> 17) & 3 {
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            _ => TimerMode::OneShot,
        }
    }

    /// Bus-clock nanoseconds per timer tick.
    fn timer_divisor(&self) -> u64 {
        let d = self.state.timer_divide;
        let v = (d & 3) | ((d & 8) >> 1);
        if v == 7 { 1 } else { 2 << v }
    }

    fn tsc_to_ns(&self, tsc: u64) -> u64 {
        let ns = (u128::from(tsc) * 1_000_000).div_ceil(u128::from(self.state.tsc_khz));
        u64::try_from(ns).unwrap_or(u64::MAX)
    }

    fn current_count(&self, now: u64) -> u32 {
        if self.timer_mode() == TimerMode::TscDeadline || self.state.timer_initial == 0 {
            return 0;
        }
        let initial = u64::from(self.state.timer_initial);
        let first = u64::from(self.state.timer_start_count);
        let elapsed = now.saturating_sub(self.state.timer_start_ns) / self.timer_divisor();
        if elapsed < first {
            return (first - elapsed) as u32;
        }
        match self.timer_mode() {
            TimerMode::Periodic => (initial - (elapsed - first) % initial) as u32,
            _ => 0,
        }
    }

    /// Recomputes the next expiry after `now` from the count at `timer_start_ns`.
    fn rearm(&mut self, now: u64) {
        let s = &self.state;
        let div = self.timer_divisor();
        let first_end = s
            .timer_start_ns
            .saturating_add(u64::from(s.timer_start_count) * div);
        self.state.timer_deadline_ns = match self.timer_mode() {
            TimerMode::TscDeadline => (s.tsc_deadline != 0)
                .then(|| self.tsc_to_ns(s.tsc_deadline.wrapping_sub(s.tsc_offset))),
            _ if s.timer_initial == 0 => None,
            TimerMode::OneShot => (first_end > now).then_some(first_end),
            TimerMode::Periodic if first_end > now => Some(first_end),
            TimerMode::Periodic => {
                let period = u64::from(s.timer_initial) * div;
                let k = (now - first_end) / period + 1;
                Some(first_end.saturating_add(k.saturating_mul(period)))
            }
        };
    }

    /// Fires the timer if it is due at `now`.
    fn run_timer(&mut self, now: u64) {
        let Some(deadline) = self.state.timer_deadline_ns else {
            return;
        };
        if now < deadline {
            return;
        }
        let lvt = self.state.lvt[LVT_INDEX_TIMER];
        if lvt & LVT_MASKED == 0 {
            self.accept(lvt as u8, false);
        }
        match self.timer_mode() {
            TimerMode::Periodic => self.rearm(now),
            TimerMode::OneShot => self.state.timer_deadline_ns = None,
            TimerMode::TscDeadline => {
                self.state.tsc_deadline = 0;
                self.state.timer_deadline_ns = None;
            }
        }
    }

    /// Brings the timer up to `now`.
    pub fn advance(&mut self, now: u64) {
        self.run_timer(now);
    }

    /// When the timer next fires.
    pub fn timer_deadline(&self) -> Option<u64> {
        self.state.timer_deadline_ns
    }

    /// IA32_TSC_DEADLINE as RDMSR sees it (0 outside TSC-deadline mode).
    pub fn tsc_deadline(&self) -> u64 {
        if self.timer_mode() == TimerMode::TscDeadline {
            self.state.tsc_deadline
        } else {
            0
        }
    }

    /// WRMSR IA32_TSC_DEADLINE at guest time `now` (ignored outside TSC-deadline mode), with
    /// the guest's TSC as the engine presents it (see [`GuestTsc`]).
    pub fn set_tsc_deadline(&mut self, now: u64, value: u64, tsc: GuestTsc) {
        if self.timer_mode() != TimerMode::TscDeadline {
            return;
        }
        self.state.tsc_khz = tsc.khz.max(1);
        self.state.tsc_offset = tsc.offset;
        self.state.tsc_deadline = value;
        self.rearm(now);
        self.run_timer(now);
    }

    /// IA32_APIC_BASE.
    pub fn apic_base(&self) -> u64 {
        self.state.apic_base
    }

    /// WRMSR IA32_APIC_BASE: reserved bits and invalid mode transitions fault; disabling
    /// the APIC resets it (keeping its ID).
    pub fn set_apic_base(&mut self, value: u64) -> Result<(), LapicError> {
        let current = self.state.apic_base;
        let fail = |why| LapicError::ApicBase {
            value,
            current,
            why,
        };
        let reserved = 0xff | 1 << 9 | !((1u64 << PHYS_ADDR_BITS) - 1);
        if value & reserved != 0 {
            return Err(fail("reserved bits set"));
        }
        let mode = |v: u64| (v & APIC_BASE_ENABLE != 0, v & APIC_BASE_EXTD != 0);
        match (mode(current), mode(value)) {
            (_, (false, true)) => return Err(fail("x2APIC without enable")),
            ((true, true), (true, false)) => return Err(fail("x2APIC to xAPIC directly")),
            ((false, false), (true, true)) => return Err(fail("disabled to x2APIC directly")),
            _ => {}
        }
        if mode(current).0 && !mode(value).0 {
            // Disabling resets the registers to their power-on values (the ID survives).
            self.init_reset();
        }
        self.state.apic_base = value;
        Ok(())
    }

    /// What an INIT (or a global disable) does to the APIC: every register back to its
    /// power-on value except the APIC ID and IA32_APIC_BASE (SDM 10.4.7.3); the input
    /// levels on LINT0/LINT1 are wires, not registers, and stay.
    pub fn init_reset(&mut self) {
        let s = &self.state;
        let (apic_base, lint_level, tsc_khz) = (s.apic_base, s.lint_level, s.tsc_khz);
        self.state = Self::new(self.state.id).state;
        self.state.apic_base = apic_base;
        self.state.lint_level = lint_level;
        self.state.tsc_khz = tsc_khz;
        self.level_eoi = None;
    }

    fn ldr(&self) -> u32 {
        if self.x2apic() {
            let id = self.state.id;
            ((id & 0xffff_fff0) << 12) | (1 << (id & 0xf))
        } else {
            self.state.ldr
        }
    }

    /// Whether a destination field (an IPI without shorthand, an I/O APIC redirection entry
    /// or MSI) names this APIC, in physical or logical mode.
    pub fn is_destination(&self, dest: u32, logical: bool) -> bool {
        if self.x2apic() {
            if dest == 0xffff_ffff {
                return true;
            }
            if logical {
                let ldr = self.ldr();
                dest >> 16 == ldr >> 16 && dest & ldr & 0xffff != 0
            } else {
                dest == self.state.id
            }
        } else {
            let dest = dest & 0xff;
            if dest == 0xff {
                return true;
            }
            if logical {
                let ldr = self.state.ldr >> 24;
                if self.state.dfr >> 28 == 0xf {
                    dest & ldr != 0
                } else {
                    dest >> 4 == ldr >> 4 && dest & ldr & 0xf != 0
                }
            } else {
                dest == self.state.id & 0xff
            }
        }
    }

    /// Sends the IPI in the ICR; with one CPU, only deliveries to itself have an effect.
    fn send_ipi(&mut self) {
        let icr = self.state.icr;
        let low = icr as u32;
        let vector = low as u8;
        let mode = (low >> 8) & 7;
        let dest = if self.x2apic() {
            (icr >> 32) as u32
        } else {
            (icr >> 56) as u32
        };
        let to_self = match (low >> 18) & 3 {
            0 => self.is_destination(dest, low & (1 << 11) != 0),
            1 | 2 => true,
            _ => false,
        };
        match mode {
            delivery::FIXED | delivery::LOWEST => {
                if vector < 16 {
                    self.report_error(ESR_SEND_ILLEGAL_VECTOR);
                } else if to_self {
                    self.accept(vector, low & LVT_LEVEL != 0);
                }
            }
            delivery::NMI if to_self => self.state.nmi_pending = true,
            // INIT level de-assert (level trigger, level 0) only synchronises arbitration IDs.
            delivery::INIT if to_self && !(low & LVT_LEVEL != 0 && low & (1 << 14) == 0) => {
                self.state.init_pending = true
            }
            // SMI, STARTUP (the BSP is not waiting for SIPI) and reserved modes do nothing.
            _ => {}
        }
    }

    fn write_lvt(&mut self, idx: usize, value: u32, now: u64) {
        let old = self.state.lvt[idx];
        let keep = old & LVT_REMOTE_IRR;
        let mut v = (value & LVT_WRITABLE[idx] & !LVT_REMOTE_IRR) | keep;
        if !self.software_enabled() {
            v |= LVT_MASKED;
        }
        self.state.lvt[idx] = v;
        if idx == LVT_INDEX_TIMER {
            let was_deadline = (old >> 17) & 3 == 2;
            let is_deadline = (v >> 17) & 3 == 2;
            if was_deadline != is_deadline {
                // Switching into or out of TSC-deadline mode disarms the timer.
                self.state.timer_initial = 0;
                self.state.tsc_deadline = 0;
                self.state.timer_deadline_ns = None;
            } else {
                self.rearm(now);
            }
        }
    }

    /// Reads the 32-bit register at `offset` (16-byte aligned) in the xAPIC view.
    fn read_reg(&self, offset: u32, now: u64) -> Option<u32> {
        let s = &self.state;
        let x2 = self.x2apic();
        Some(match offset {
            reg::ID if x2 => s.id,
            reg::ID => s.id << 24,
            reg::VERSION => LAPIC_VERSION,
            reg::TPR => u32::from(s.tpr),
            reg::APR if !x2 => 0,
            reg::PPR => u32::from(self.ppr()),
            reg::EOI if !x2 => 0,
            reg::RRD if !x2 => 0,
            reg::LDR => self.ldr(),
            reg::DFR if !x2 => s.dfr | 0x0fff_ffff,
            reg::SVR => s.svr,
            0x100..=0x170 => s.isr[((offset - reg::ISR) >> 4) as usize],
            0x180..=0x1f0 => s.tmr[((offset - reg::TMR) >> 4) as usize],
            0x200..=0x270 => s.irr[((offset - reg::IRR) >> 4) as usize],
            reg::ESR => s.esr,
            reg::ICR_LOW => s.icr as u32,
            reg::ICR_HIGH if !x2 => (s.icr >> 32) as u32 & 0xff00_0000,
            0x320..=0x370 => s.lvt[((offset - reg::LVT_TIMER) >> 4) as usize],
            reg::TIMER_INITIAL => s.timer_initial,
            reg::TIMER_CURRENT => self.current_count(now),
            reg::TIMER_DIVIDE => s.timer_divide,
            _ => return None,
        })
    }

    /// Writes the register at `offset`; false if there is no writable register there.
    fn write_reg(&mut self, offset: u32, value: u32, now: u64) -> bool {
        let x2 = self.x2apic();
        match offset {
            reg::ID if !x2 => self.state.id = value >> 24,
            reg::TPR => self.state.tpr = value as u8,
            reg::EOI => {
                if let Some(Eoi {
                    vector,
                    level: true,
                }) = self.eoi()
                {
                    self.level_eoi = Some(vector);
                }
            }
            reg::LDR if !x2 => self.state.ldr = value & 0xff00_0000,
            reg::DFR if !x2 => self.state.dfr = value | 0x0fff_ffff,
            reg::SVR => {
                self.state.svr = value & 0x1ff;
                if !self.software_enabled() {
                    for lvt in &mut self.state.lvt {
                        *lvt |= LVT_MASKED;
                    }
                }
            }
            reg::ESR => {
                self.state.esr = std::mem::take(&mut self.state.esr_pending);
            }
            reg::ICR_LOW => {
                self.state.icr = (self.state.icr & !0xffff_ffff) | u64::from(value & 0x000c_cfff);
                self.send_ipi();
            }
            reg::ICR_HIGH if !x2 => {
                self.state.icr =
                    (self.state.icr & 0xffff_ffff) | u64::from(value & 0xff00_0000) << 32;
            }
            0x320..=0x370 => self.write_lvt(((offset - reg::LVT_TIMER) >> 4) as usize, value, now),
            reg::TIMER_INITIAL => {
                if self.timer_mode() != TimerMode::TscDeadline {
                    self.state.timer_initial = value;
                    self.state.timer_start_count = value;
                    self.state.timer_start_ns = now;
                    self.rearm(now);
                }
            }
            reg::TIMER_DIVIDE => {
                // Keep the current count across the change (restart from it with the new
                // divisor), as a real counter would.
                let remaining = self.current_count(now);
                self.state.timer_divide = value & 0xb;
                if self.state.timer_initial != 0 && self.timer_mode() != TimerMode::TscDeadline {
                    self.state.timer_start_ns = now;
                    self.state.timer_start_count = remaining;
                    self.rearm(now);
                }
            }
            reg::SELF_IPI if x2 => {
                self.state.icr = u64::from(value & 0xff) | 1 << 18;
                self.accept(value as u8, false);
            }
            // Read-only registers: writes are ignored.
            reg::VERSION | reg::PPR | reg::TIMER_CURRENT | reg::APR | reg::RRD => {}
            0x100..=0x270 => {}
            reg::ID | reg::LDR => {}
            _ => return false,
        }
        true
    }

    /// Whether an access to the register at `offset` depends on the current time: the
    /// timer registers, or any register while the timer is armed (it may fire first).
    /// Accesses that do not need it can skip the host clock (and its trace event).
    pub fn needs_time(&self, offset: u64) -> bool {
        self.state.timer_deadline_ns.is_some()
            || matches!(
                (offset & 0xff0) as u32,
                reg::LVT_TIMER | reg::TIMER_INITIAL | reg::TIMER_CURRENT | reg::TIMER_DIVIDE
            )
    }

    /// A guest read of the xAPIC page at `offset` (any width; registers are dwords on
    /// 16-byte boundaries).
    pub fn mmio_read(&mut self, now: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let reg_off = (offset & 0xff0) as u32;
        let within = (offset & 0xf) as usize;
        self.run_timer(now);
        let value = match self.read_reg(reg_off, now) {
            Some(v) if !self.x2apic() => v,
            Some(_) => 0,
            None => {
                self.report_error(ESR_ILLEGAL_REGISTER);
                0
            }
        };
        let bytes = value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(within + i).copied().unwrap_or(0);
        }
    }

    /// A guest write to the xAPIC page: only aligned dword writes take effect (as KVM and
    /// QEMU do).
    pub fn mmio_write(&mut self, now: u64, offset: u64, data: &[u8]) {
        self.run_timer(now);
        if data.len() != 4 || offset & 0xf != 0 || self.x2apic() {
            return;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        if !self.write_reg(offset as u32 & 0xff0, value, now) {
            self.report_error(ESR_ILLEGAL_REGISTER);
        }
        self.run_timer(now);
    }

    fn x2apic_offset(&self, op: &'static str, msr: u32) -> Result<u32, LapicError> {
        let fail = |why| LapicError::X2apicAccess { op, msr, why };
        if !self.x2apic() {
            return Err(fail("APIC not in x2APIC mode"));
        }
        if !(X2APIC_MSR_FIRST..=X2APIC_MSR_LAST).contains(&msr) {
            return Err(fail("not an x2APIC register"));
        }
        Ok((msr - X2APIC_MSR_FIRST) << 4)
    }

    /// RDMSR of an x2APIC register.
    pub fn rdmsr(&mut self, now: u64, msr: u32) -> Result<u64, LapicError> {
        let offset = self.x2apic_offset("rdmsr", msr)?;
        let fail = |why| LapicError::X2apicAccess {
            op: "rdmsr",
            msr,
            why,
        };
        if offset == reg::EOI || offset == reg::SELF_IPI {
            return Err(fail("write-only register"));
        }
        self.run_timer(now);
        if offset == reg::ICR_LOW {
            return Ok(self.state.icr);
        }
        self.read_reg(offset, now)
            .map(u64::from)
            .ok_or(fail("no such register"))
    }

    /// WRMSR of an x2APIC register.
    pub fn wrmsr(&mut self, now: u64, msr: u32, value: u64) -> Result<(), LapicError> {
        let offset = self.x2apic_offset("wrmsr", msr)?;
        let fail = |why| LapicError::X2apicAccess {
            op: "wrmsr",
            msr,
            why,
        };
        let reserved: u64 = match offset {
            reg::TPR => !0xff,
            reg::EOI | reg::ESR => !0,
            reg::SVR => !0x1ff,
            reg::ICR_LOW => 0x0000_0000_fff3_3000,
            // Delivery status and remote IRR are read-only; writing back what was read is fine.
            0x320..=0x370 => {
                !u64::from(LVT_WRITABLE[((offset - reg::LVT_TIMER) >> 4) as usize] | 0x5000)
            }
            reg::TIMER_INITIAL => !0xffff_ffff,
            reg::TIMER_DIVIDE => !0xb,
            reg::SELF_IPI => !0xff,
            reg::ID | reg::VERSION | reg::PPR | reg::LDR | reg::TIMER_CURRENT => {
                return Err(fail("read-only register"));
            }
            0x100..=0x270 => return Err(fail("read-only register")),
            _ => 0,
        };
        if value & reserved != 0 {
            return Err(fail("reserved bits set"));
        }
        self.run_timer(now);
        if offset == reg::ICR_LOW {
            self.state.icr = value;
            self.send_ipi();
        } else if !self.write_reg(offset, value as u32, now) {
            return Err(fail("no such register"));
        }
        self.run_timer(now);
        Ok(())
    }
}

impl Device for Lapic {
    fn name(&self) -> &'static str {
        "lapic"
    }

    fn read(&mut self, ctx: &mut IoCtx, addr: u64, data: &mut [u8]) {
        let offset = addr.wrapping_sub(LAPIC_BASE);
        let now = if self.needs_time(offset) {
            ctx.now()
        } else {
            0
        };
        self.mmio_read(now, offset, data);
    }

    fn write(&mut self, ctx: &mut IoCtx, addr: u64, data: &[u8]) {
        let offset = addr.wrapping_sub(LAPIC_BASE);
        let now = if self.needs_time(offset) {
            ctx.now()
        } else {
            0
        };
        self.mmio_write(now, offset, data);
    }

    fn poll(&mut self, ctx: &mut IoCtx) {
        if self.state.timer_deadline_ns.is_some() {
            let now = ctx.now();
            self.run_timer(now);
        }
    }

    fn next_deadline(&self) -> Option<u64> {
        self.state.timer_deadline_ns
    }

    fn save(&self) -> DeviceState {
        DeviceState::Lapic(Box::new(self.state.clone()))
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        match state {
            DeviceState::Lapic(s) => {
                if s.tsc_khz == 0 {
                    return Err(DeviceError::InvalidState {
                        device: "lapic",
                        detail: "TSC frequency of 0 kHz".into(),
                    });
                }
                self.state = (**s).clone();
                self.level_eoi = None;
                Ok(())
            }
            other => Err(DeviceError::WrongState {
                device: "lapic",
                found: other.kind(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::scripted_host::Rig;

    fn rd(l: &mut Lapic, rig: &mut Rig, off: u32) -> u32 {
        let mut b = [0u8; 4];
        l.read(&mut rig.ctx(), LAPIC_BASE + u64::from(off), &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(l: &mut Lapic, rig: &mut Rig, off: u32, v: u32) {
        l.write(
            &mut rig.ctx(),
            LAPIC_BASE + u64::from(off),
            &v.to_le_bytes(),
        );
    }

    fn enabled() -> (Lapic, Rig) {
        let mut l = Lapic::new(0);
        let mut rig = Rig::new(4 << 20);
        wr(&mut l, &mut rig, reg::SVR, SVR_ENABLE | 0xff);
        (l, rig)
    }

    #[test]
    fn power_on_register_values() {
        let mut l = Lapic::new(3);
        let mut rig = Rig::new(4 << 20);
        let cases: &[(u32, u32)] = &[
            (reg::ID, 3 << 24),
            (reg::VERSION, 0x0005_0014),
            (reg::TPR, 0),
            (reg::PPR, 0),
            (reg::LDR, 0),
            (reg::DFR, 0xffff_ffff),
            (reg::SVR, 0xff),
            (reg::ESR, 0),
            (reg::LVT_TIMER, LVT_MASKED),
            (reg::LVT_LINT0, LVT_MASKED),
            (reg::LVT_LINT1, LVT_MASKED),
            (reg::LVT_ERROR, LVT_MASKED),
            (reg::TIMER_INITIAL, 0),
            (reg::TIMER_CURRENT, 0),
            (reg::TIMER_DIVIDE, 0),
        ];
        for &(off, want) in cases {
            assert_eq!(rd(&mut l, &mut rig, off), want, "register {off:#x}");
        }
        assert_eq!(l.apic_base(), 0xfee0_0900);
        // Sub-dword reads extract from the register.
        let mut b = [0u8; 1];
        l.read(&mut rig.ctx(), LAPIC_BASE + 0x23, &mut b);
        assert_eq!(b[0], 3);
    }

    #[test]
    fn writable_bits_per_register() {
        // (register, written, read back)
        let cases: &[(u32, u32, u32)] = &[
            (reg::ID, 0xffff_ffff, 0xff00_0000),
            (reg::TPR, 0xffff_ff5a, 0x5a),
            (reg::LDR, 0xffff_ffff, 0xff00_0000),
            (reg::DFR, 0x0000_0000, 0x0fff_ffff),
            (reg::SVR, 0xffff_ffff, 0x1ff),
            (reg::LVT_TIMER, 0xffff_ffff, 0x0007_00ff),
            (reg::LVT_THERMAL, 0xffff_ffff, 0x0001_07ff),
            (reg::LVT_LINT0, 0xffff_ffff, 0x0001_a7ff),
            (reg::LVT_LINT1, 0x0000_8420, 0x0000_8420),
            (reg::LVT_ERROR, 0xffff_ffff, 0x0001_00ff),
            (reg::TIMER_DIVIDE, 0xffff_ffff, 0xb),
            (reg::VERSION, 0, 0x0005_0014),
            (reg::ICR_HIGH, 0xffff_ffff, 0xff00_0000),
        ];
        for &(off, v, want) in cases {
            let (mut l, mut rig) = enabled();
            wr(&mut l, &mut rig, off, v);
            assert_eq!(
                rd(&mut l, &mut rig, off),
                want,
                "register {off:#x} after {v:#x}"
            );
        }
        // Narrow and misaligned writes are dropped.
        let (mut l, mut rig) = enabled();
        l.write(&mut rig.ctx(), LAPIC_BASE + 0x80, &[0x40]);
        l.write(&mut rig.ctx(), LAPIC_BASE + 0x84, &0x40u32.to_le_bytes());
        assert_eq!(rd(&mut l, &mut rig, reg::TPR), 0);
    }

    #[test]
    fn priority_decides_the_deliverable_vector() {
        // (TPR, in service, requested, PPR, deliverable)
        type Case<'a> = (u8, &'a [u8], &'a [u8], u8, Option<u8>);
        let cases: &[Case] = &[
            (0x00, &[], &[], 0x00, None),
            (0x00, &[], &[0x31], 0x00, Some(0x31)),
            (0x00, &[], &[0x31, 0x80, 0x45], 0x00, Some(0x80)),
            (0x30, &[], &[0x31], 0x30, None),
            (0x30, &[], &[0x40], 0x30, Some(0x40)),
            (0x3f, &[], &[0x3f], 0x3f, None),
            (0x00, &[0x50], &[0x55], 0x50, None),
            (0x00, &[0x50], &[0x61], 0x50, Some(0x61)),
            (0x20, &[0x51], &[0x61], 0x50, Some(0x61)),
            (0x70, &[0x51], &[0x61], 0x70, None),
            (0x65, &[0x61], &[0xff], 0x65, Some(0xff)),
            (0x00, &[0x20, 0xe0], &[0xd0], 0xe0, None),
        ];
        for &(tpr, isr, irr, ppr, want) in cases {
            let (mut l, mut rig) = enabled();
            wr(&mut l, &mut rig, reg::TPR, u32::from(tpr));
            for &v in isr {
                set_bit(&mut l.state.isr, v, true);
            }
            for &v in irr {
                l.accept(v, false);
            }
            assert_eq!(
                rd(&mut l, &mut rig, reg::PPR),
                u32::from(ppr),
                "{tpr:#x} {isr:x?}"
            );
            assert_eq!(l.deliverable_vector(), want, "{tpr:#x} {isr:x?} {irr:x?}");
        }
    }

    #[test]
    fn acknowledge_and_eoi_nest_by_priority() {
        let (mut l, mut rig) = enabled();
        l.accept(0x41, false);
        l.accept(0x92, true);
        assert_eq!(l.acknowledge(), 0x92);
        assert_eq!(
            rd(&mut l, &mut rig, reg::ISR + 0x40) & (1 << 0x12),
            1 << 0x12
        );
        assert_eq!(
            rd(&mut l, &mut rig, reg::TMR + 0x40) & (1 << 0x12),
            1 << 0x12
        );
        assert_eq!(
            l.deliverable_vector(),
            None,
            "0x41 is below the in-service 0x92"
        );
        l.accept(0xa0, false);
        assert_eq!(l.acknowledge(), 0xa0);
        wr(&mut l, &mut rig, reg::EOI, 0);
        assert_eq!(l.take_level_eoi(), None, "0xa0 was edge");
        assert_eq!(l.deliverable_vector(), None);
        wr(&mut l, &mut rig, reg::EOI, 0);
        assert_eq!(l.take_level_eoi(), Some(0x92));
        assert_eq!(l.acknowledge(), 0x41);
        // Nothing deliverable any more: the spurious vector, and ISR untouched.
        wr(&mut l, &mut rig, reg::SVR, SVR_ENABLE | 0xef);
        assert_eq!(l.acknowledge(), 0xef);
        assert_eq!(highest(&l.state.isr), Some(0x41));
        // Software-disabled: nothing is delivered.
        l.accept(0x80, false);
        wr(&mut l, &mut rig, reg::SVR, 0xff);
        assert_eq!(l.deliverable_vector(), None);
    }

    #[test]
    fn illegal_vectors_and_registers_are_reported_in_esr() {
        let (mut l, mut rig) = enabled();
        wr(&mut l, &mut rig, reg::LVT_ERROR, 0xe3);
        l.accept(0x0f, false);
        assert_eq!(highest(&l.state.irr), Some(0xe3), "error LVT fired");
        assert_eq!(rd(&mut l, &mut rig, reg::ESR), 0, "not latched yet");
        wr(&mut l, &mut rig, reg::ESR, 0);
        assert_eq!(rd(&mut l, &mut rig, reg::ESR), ESR_RECEIVE_ILLEGAL_VECTOR);
        wr(&mut l, &mut rig, reg::ICR_LOW, 0x0004_0005); // fixed vector 5 to self
        let _ = rd(&mut l, &mut rig, 0x3c0); // reserved register
        wr(&mut l, &mut rig, reg::ESR, 0);
        assert_eq!(
            rd(&mut l, &mut rig, reg::ESR),
            ESR_SEND_ILLEGAL_VECTOR | ESR_ILLEGAL_REGISTER
        );
        wr(&mut l, &mut rig, reg::ESR, 0);
        assert_eq!(rd(&mut l, &mut rig, reg::ESR), 0);
    }

    #[test]
    fn software_disable_masks_every_lvt() {
        let (mut l, mut rig) = enabled();
        wr(&mut l, &mut rig, reg::LVT_LINT0, 0x700);
        wr(&mut l, &mut rig, reg::SVR, 0x0ff);
        assert_eq!(rd(&mut l, &mut rig, reg::LVT_LINT0), 0x10700);
        wr(&mut l, &mut rig, reg::LVT_LINT0, 0x700);
        assert_eq!(
            rd(&mut l, &mut rig, reg::LVT_LINT0),
            0x10700,
            "cannot unmask"
        );
        wr(&mut l, &mut rig, reg::SVR, 0x1ff);
        wr(&mut l, &mut rig, reg::LVT_LINT0, 0x700);
        assert_eq!(rd(&mut l, &mut rig, reg::LVT_LINT0), 0x700);
    }

    #[test]
    fn one_shot_timer_over_scripted_time() {
        let (mut l, mut rig) = enabled();
        wr(&mut l, &mut rig, reg::TIMER_DIVIDE, 0x3); // divide by 16
        wr(&mut l, &mut rig, reg::LVT_TIMER, 0x40);
        rig.host.now_ns = 1_000;
        wr(&mut l, &mut rig, reg::TIMER_INITIAL, 100);
        assert_eq!(l.next_deadline(), Some(1_000 + 1_600));
        // (time, current count, fired)
        let steps: &[(u64, u32, bool)] = &[
            (1_000, 100, false),
            (1_015, 100, false),
            (1_016, 99, false),
            (2_599, 1, false),
            (2_600, 0, true),
            (9_999, 0, true),
        ];
        for &(t, count, fired) in steps {
            rig.host.now_ns = t;
            l.poll(&mut rig.ctx());
            assert_eq!(rd(&mut l, &mut rig, reg::TIMER_CURRENT), count, "at {t}");
            assert_eq!(bit(&l.state.irr, 0x40), fired, "at {t}");
        }
        assert_eq!(l.next_deadline(), None);
        // Writing 0 to the initial count stops an armed timer.
        wr(&mut l, &mut rig, reg::TIMER_INITIAL, 5);
        assert!(l.next_deadline().is_some());
        wr(&mut l, &mut rig, reg::TIMER_INITIAL, 0);
        assert_eq!(l.next_deadline(), None);
    }

    #[test]
    fn divide_configuration_values() {
        // (divide register, ns per tick)
        let cases: &[(u32, u64)] = &[
            (0x0, 2),
            (0x1, 4),
            (0x2, 8),
            (0x3, 16),
            (0x8, 32),
            (0x9, 64),
            (0xa, 128),
            (0xb, 1),
        ];
        for &(div, per_tick) in cases {
            let (mut l, mut rig) = enabled();
            wr(&mut l, &mut rig, reg::TIMER_DIVIDE, div);
            wr(&mut l, &mut rig, reg::TIMER_INITIAL, 1000);
            rig.host.now_ns = per_tick * 10;
            assert_eq!(
                rd(&mut l, &mut rig, reg::TIMER_CURRENT),
                990,
                "divide {div:#x}"
            );
            assert_eq!(l.next_deadline(), Some(per_tick * 1000));
        }
        // Changing the divisor mid-count keeps the count and changes its pace.
        let (mut l, mut rig) = enabled();
        wr(&mut l, &mut rig, reg::TIMER_DIVIDE, 0xb);
        wr(&mut l, &mut rig, reg::TIMER_INITIAL, 1000);
        rig.host.now_ns = 400;
        wr(&mut l, &mut rig, reg::TIMER_DIVIDE, 0x0);
        assert_eq!(rd(&mut l, &mut rig, reg::TIMER_CURRENT), 600);
        assert_eq!(l.next_deadline(), Some(400 + 1200));
    }

    #[test]
    fn periodic_timer_reloads_and_masked_timer_counts_silently() {
        let (mut l, mut rig) = enabled();
        wr(&mut l, &mut rig, reg::TIMER_DIVIDE, 0xb);
        wr(&mut l, &mut rig, reg::LVT_TIMER, 1 << 17 | 0x50);
        wr(&mut l, &mut rig, reg::TIMER_INITIAL, 1000);
        let mut fired = Vec::new();
        for t in (0..=3500).step_by(250) {
            rig.host.now_ns = t;
            l.poll(&mut rig.ctx());
            if bit(&l.state.irr, 0x50) {
                fired.push(t);
                assert_eq!(l.acknowledge(), 0x50);
                l.eoi();
            }
        }
        assert_eq!(fired, vec![1000, 2000, 3000]);
        assert_eq!(l.next_deadline(), Some(4000));
        rig.host.now_ns = 3_250;
        assert_eq!(rd(&mut l, &mut rig, reg::TIMER_CURRENT), 750);
        // Late polls coalesce missed periods into one interrupt and stay in phase.
        rig.host.now_ns = 7_100;
        l.poll(&mut rig.ctx());
        assert!(bit(&l.state.irr, 0x50));
        assert_eq!(l.next_deadline(), Some(8000));
        // Masked: counts on, no interrupt.
        l.acknowledge();
        l.eoi();
        wr(
            &mut l,
            &mut rig,
            reg::LVT_TIMER,
            LVT_MASKED | 1 << 17 | 0x50,
        );
        rig.host.now_ns = 8_000;
        l.poll(&mut rig.ctx());
        assert!(!bit(&l.state.irr, 0x50));
        assert_eq!(l.next_deadline(), Some(9000));
    }

    #[test]
    fn tsc_deadline_timer() {
        let (mut l, mut rig) = enabled();
        // 2 GHz: two TSC ticks per ns, and the guest TSC equal to machine time.
        let tsc = GuestTsc::observed(2_000_000, 0, 0);
        // Outside TSC-deadline mode the MSR reads 0 and ignores writes.
        l.set_tsc_deadline(0, 5000, tsc);
        assert_eq!(l.tsc_deadline(), 0);
        wr(&mut l, &mut rig, reg::LVT_TIMER, 2 << 17 | 0x60);
        l.set_tsc_deadline(0, 5001, tsc);
        assert_eq!(l.tsc_deadline(), 5001);
        assert_eq!(l.next_deadline(), Some(2501));
        // The initial-count register is ignored in this mode.
        wr(&mut l, &mut rig, reg::TIMER_INITIAL, 10);
        assert_eq!(rd(&mut l, &mut rig, reg::TIMER_INITIAL), 0);
        rig.host.now_ns = 2500;
        l.poll(&mut rig.ctx());
        assert!(!bit(&l.state.irr, 0x60));
        rig.host.now_ns = 2501;
        l.poll(&mut rig.ctx());
        assert!(bit(&l.state.irr, 0x60));
        assert_eq!(l.tsc_deadline(), 0, "disarmed after firing");
        assert_eq!(l.next_deadline(), None);
        // A deadline in the past fires at once; 0 disarms.
        l.acknowledge();
        l.eoi();
        l.set_tsc_deadline(3000, 10, tsc);
        assert!(bit(&l.state.irr, 0x60));
        l.set_tsc_deadline(3000, 100_000, tsc);
        l.set_tsc_deadline(3000, 0, tsc);
        assert_eq!(l.next_deadline(), None);
        // A guest TSC ahead of machine time (a host TSC, an IA32_TSC write): the deadline
        // is the same distance ahead of the TSC the guest saw. At 3000 ns the guest read
        // 1_000_000 + 6000; a deadline 4000 ticks later is 2000 ns later.
        let ahead = GuestTsc::observed(2_000_000, 3000, 1_006_000);
        assert_eq!(ahead.offset, 1_000_000);
        l.set_tsc_deadline(3000, 1_010_000, ahead);
        assert_eq!(l.next_deadline(), Some(5000));
        assert_eq!(l.tsc_deadline(), 1_010_000, "reads back as written");
        // Leaving the mode disarms an armed deadline.
        l.set_tsc_deadline(3000, 100_000, tsc);
        wr(&mut l, &mut rig, reg::LVT_TIMER, 0x60);
        assert_eq!(l.next_deadline(), None);
        assert_eq!(l.tsc_deadline(), 0);
    }

    #[test]
    fn icr_deliveries_to_self() {
        // (ICR high, ICR low, vector in IRR, TMR bit, NMI, INIT)
        type Case = (u32, u32, Option<u8>, bool, bool, bool);
        let cases: &[Case] = &[
            (0, 0x0004_0031, Some(0x31), false, false, false), // self shorthand
            (0, 0x0008_0032, Some(0x32), false, false, false), // all including self
            (0, 0x000c_0033, None, false, false, false),       // all excluding self
            (0x0200_0000, 0x0000_0034, Some(0x34), false, false, false), // physical, my ID 2
            (0x0300_0000, 0x0000_0035, None, false, false, false), // physical, other ID
            (0xff00_0000, 0x0000_0036, Some(0x36), false, false, false), // physical broadcast
            (0x0100_0000, 0x0000_0837, None, false, false, false), // logical, LDR 0x04 no match
            (0x0500_0000, 0x0000_0838, Some(0x38), false, false, false), // logical match
            (0, 0x0004_c139, Some(0x39), true, false, false),  // lowest priority, level
            (0, 0x0004_0400, None, false, true, false),        // NMI
            (0, 0x0004_4500, None, false, false, true),        // INIT assert
            (0, 0x0004_8500, None, false, false, false),       // INIT level de-assert
            (0, 0x0004_0600, None, false, false, false),       // STARTUP: ignored on the BSP
            (0, 0x0004_0200, None, false, false, false),       // SMI: not modelled
        ];
        for &(high, low, vector, level, nmi, init) in cases {
            let mut l = Lapic::new(2);
            let mut rig = Rig::new(4 << 20);
            wr(&mut l, &mut rig, reg::SVR, 0x1ff);
            wr(&mut l, &mut rig, reg::LDR, 0x0400_0000);
            wr(&mut l, &mut rig, reg::ICR_HIGH, high);
            wr(&mut l, &mut rig, reg::ICR_LOW, low);
            assert_eq!(highest(&l.state.irr), vector, "ICR {high:#x}:{low:#x}");
            if let Some(v) = vector {
                assert_eq!(bit(&l.state.tmr, v), level, "ICR {high:#x}:{low:#x}");
            }
            assert_eq!(l.take_nmi(), nmi, "ICR {high:#x}:{low:#x}");
            assert_eq!(l.take_init(), init, "ICR {high:#x}:{low:#x}");
            assert_eq!(rd(&mut l, &mut rig, reg::ICR_LOW) & (1 << 12), 0, "idle");
        }
        // Logical cluster model: cluster 1, member bit 2.
        let mut l = Lapic::new(2);
        let mut rig = Rig::new(4 << 20);
        wr(&mut l, &mut rig, reg::SVR, 0x1ff);
        wr(&mut l, &mut rig, reg::DFR, 0x0fff_ffff);
        wr(&mut l, &mut rig, reg::LDR, 0x1400_0000);
        for (dest, hit) in [(0x14u32, true), (0x24, false), (0x1b, false), (0x1f, true)] {
            wr(&mut l, &mut rig, reg::ICR_HIGH, dest << 24);
            wr(&mut l, &mut rig, reg::ICR_LOW, 0x0000_0840);
            assert_eq!(bit(&l.state.irr, 0x40), hit, "cluster dest {dest:#x}");
            l.state.irr = [0; 8];
        }
    }

    #[test]
    fn lint_inputs() {
        let (mut l, _rig) = enabled();
        assert!(!l.accepts_pic_interrupts(), "LINT0 masked at power-on");
        let mut bypass = Lapic::new(0);
        bypass.set_apic_base(0xfee0_0100).unwrap();
        assert!(
            bypass.accepts_pic_interrupts(),
            "globally disabled APIC is bypassed"
        );
        let mut l2 = Lapic::firmware_handoff(0);
        assert!(l2.accepts_pic_interrupts());
        // LINT1 NMI on rising edges only.
        l2.set_lint(1, true);
        assert!(l2.take_nmi());
        l2.set_lint(1, true);
        assert!(!l2.take_nmi());
        l2.set_lint(1, false);
        l2.set_lint(1, true);
        assert!(l2.take_nmi());
        // LINT0 fixed, level-triggered: remote IRR until EOI.
        l.state.lvt[LVT_INDEX_LINT0] = LVT_LEVEL | 0x70;
        l.set_lint(0, true);
        assert_eq!(
            l.state.lvt[LVT_INDEX_LINT0] & LVT_REMOTE_IRR,
            LVT_REMOTE_IRR
        );
        assert_eq!(l.acknowledge(), 0x70);
        l.set_lint(0, true);
        assert_eq!(l.deliverable_vector(), None, "remote IRR holds it back");
        assert_eq!(
            l.eoi(),
            Some(Eoi {
                vector: 0x70,
                level: true
            })
        );
        assert_eq!(l.state.lvt[LVT_INDEX_LINT0] & LVT_REMOTE_IRR, 0);
        l.set_lint(0, true);
        assert_eq!(
            l.deliverable_vector(),
            Some(0x70),
            "still asserted: delivered again"
        );
    }

    #[test]
    fn apic_base_transitions() {
        let base = 0xfee0_0000 | APIC_BASE_BSP;
        let (xapic, x2, off) = (
            base | APIC_BASE_ENABLE,
            base | APIC_BASE_ENABLE | APIC_BASE_EXTD,
            base,
        );
        // (from, to, allowed)
        let cases: &[(u64, u64, bool)] = &[
            (xapic, x2, true),
            (x2, xapic, false),
            (x2, off, true),
            (off, x2, false),
            (off, xapic, true),
            (xapic, off, true),
            (xapic, base | APIC_BASE_EXTD, false),
            (xapic, xapic | 1, false),
            (xapic, xapic | 1 << 9, false),
            (xapic, xapic | 1 << 40, false),
            (xapic, 0xfed0_0000 | APIC_BASE_ENABLE, true),
        ];
        for &(from, to, ok) in cases {
            let mut l = Lapic::new(0);
            if from == off {
                l.set_apic_base(off).unwrap();
            } else if from == x2 {
                l.set_apic_base(x2).unwrap();
            }
            assert_eq!(l.set_apic_base(to).is_ok(), ok, "{from:#x} -> {to:#x}");
            assert_eq!(l.apic_base(), if ok { to } else { from });
        }
        // Disabling resets the registers but keeps the ID.
        let (mut l, mut rig) = enabled();
        wr(&mut l, &mut rig, reg::ID, 0x0500_0000);
        wr(&mut l, &mut rig, reg::TPR, 0x20);
        l.set_apic_base(off).unwrap();
        l.set_apic_base(xapic).unwrap();
        assert_eq!(rd(&mut l, &mut rig, reg::TPR), 0);
        assert_eq!(rd(&mut l, &mut rig, reg::SVR), 0xff);
        assert_eq!(rd(&mut l, &mut rig, reg::ID), 0x0500_0000);
    }

    #[test]
    fn x2apic_msr_view() {
        let mut l = Lapic::new(0x21);
        assert!(matches!(
            l.rdmsr(0, 0x802),
            Err(LapicError::X2apicAccess {
                why: "APIC not in x2APIC mode",
                ..
            })
        ));
        l.set_apic_base(0xfee0_0000 | APIC_BASE_BSP | APIC_BASE_ENABLE | APIC_BASE_EXTD)
            .unwrap();
        assert_eq!(l.mmio_base(), None);
        // (MSR, value read)
        let reads: &[(u32, u64)] = &[
            (0x802, 0x21),
            (0x803, 0x0005_0014),
            (0x80d, 0x0002_0002), // cluster 2, bit 1
            (0x80f, 0xff),
            (0x808, 0),
        ];
        for &(msr, want) in reads {
            assert_eq!(l.rdmsr(0, msr), Ok(want), "MSR {msr:#x}");
        }
        // (MSR, write value or None for a read, fault reason)
        let faults: &[(u32, Option<u64>, &str)] = &[
            (0x80e, None, "no such register"),      // DFR
            (0x831, None, "no such register"),      // ICR high
            (0x809, None, "no such register"),      // APR
            (0x80b, None, "write-only register"),   // EOI
            (0x83f, None, "write-only register"),   // SELF IPI
            (0x802, Some(1), "read-only register"), // ID
            (0x80d, Some(1), "read-only register"), // LDR
            (0x839, Some(1), "read-only register"), // current count
            (0x80b, Some(1), "reserved bits set"),  // EOI must be 0
            (0x828, Some(1), "reserved bits set"),  // ESR must be 0
            (0x808, Some(0x100), "reserved bits set"),
            (0x83f, Some(0x100), "reserved bits set"),
            (0x830, Some(1 << 13), "reserved bits set"),
            (0x8ff, Some(0), "no such register"),
        ];
        for &(msr, write, why) in faults {
            let r = match write {
                Some(v) => l.wrmsr(0, msr, v).map(|_| 0),
                None => l.rdmsr(0, msr),
            };
            assert!(
                matches!(r, Err(LapicError::X2apicAccess { why: w, .. }) if w == why),
                "MSR {msr:#x} {write:?}: {r:?}"
            );
        }
        assert!(matches!(
            l.rdmsr(0, 0x900),
            Err(LapicError::X2apicAccess {
                why: "not an x2APIC register",
                ..
            })
        ));
        l.wrmsr(0, 0x80f, 0x1ff).unwrap();
        l.wrmsr(0, 0x808, 0x10).unwrap();
        assert_eq!(l.cr8(), 1);
        l.set_cr8(3);
        assert_eq!(l.rdmsr(0, 0x808), Ok(0x30));
        // SELF IPI and the 64-bit ICR with a 32-bit destination.
        l.wrmsr(0, 0x83f, 0x45).unwrap();
        assert_eq!(l.deliverable_vector(), Some(0x45));
        l.wrmsr(0, 0x830, 0x21u64 << 32 | 0x46).unwrap();
        assert_eq!(l.rdmsr(0, 0x830), Ok(0x21u64 << 32 | 0x46));
        assert_eq!(l.deliverable_vector(), Some(0x46));
        l.wrmsr(0, 0x830, 0x22u64 << 32 | 0x47).unwrap();
        assert_eq!(l.deliverable_vector(), Some(0x46), "other destination");
        assert_eq!(l.acknowledge(), 0x46);
        l.wrmsr(0, 0x80b, 0).unwrap();
        assert_eq!(l.rdmsr(0, 0x810 + 2), Ok(0));
        // Timer through MSRs.
        l.wrmsr(0, 0x83e, 0xb).unwrap();
        l.wrmsr(0, 0x832, 0x50).unwrap();
        l.wrmsr(100, 0x838, 500).unwrap();
        assert_eq!(l.rdmsr(350, 0x839), Ok(250));
        // The xAPIC page is not decoded in x2APIC mode.
        let mut b = [0u8; 4];
        l.mmio_read(0, 0x30, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn save_restore_round_trip_keeps_a_running_timer() {
        let (mut l, mut rig) = enabled();
        wr(&mut l, &mut rig, reg::TIMER_DIVIDE, 0xb);
        wr(&mut l, &mut rig, reg::LVT_TIMER, 1 << 17 | 0x50);
        wr(&mut l, &mut rig, reg::TIMER_INITIAL, 1000);
        l.accept(0x33, true);
        wr(&mut l, &mut rig, reg::TPR, 0x10);
        let saved = l.save();
        let mut m = Lapic::new(7);
        m.restore(&saved).unwrap();
        assert_eq!(m.save(), saved);
        rig.host.now_ns = 1000;
        m.poll(&mut rig.ctx());
        assert_eq!(m.acknowledge(), 0x50);
        assert!(m.restore(&DeviceState::DebugExit).is_err());
        let DeviceState::Lapic(mut bad) = saved else {
            unreachable!()
        };
        bad.tsc_khz = 0;
        assert!(m.restore(&DeviceState::Lapic(bad)).is_err());
    }
}
