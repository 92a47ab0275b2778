//! The interrupt complex of QEMU's `pc` machine: the 8259A pair, the I/O APIC and the local
//! APIC behind one [`Irqchip`].
//!
//! Routing follows QEMU's `pc` GSI handler: ISA IRQ n drives both PIC input n and I/O APIC
//! pin n, except that IRQ 0 (the PIT) reaches I/O APIC pin 2 (the MADT's override); lines
//! 16-23 reach only the I/O APIC. The PIC's INTR output goes to the local APIC's LINT0: while
//! LINT0 is an unmasked ExtINT entry (virtual-wire mode) or the APIC is globally disabled,
//! the CPU acknowledges the PIC; otherwise only the APIC delivers. On acknowledge the local
//! APIC wins over the PIC, as QEMU's `cpu_get_pic_interrupt`.

use super::ioapic::{Delivery, IOAPIC_BASE, IOAPIC_SIZE, Ioapic, IoapicState};
use super::lapic::{
    GuestTsc, LAPIC_SIZE, Lapic, LapicError, LapicState, MSR_APIC_BASE, MSR_TSC_DEADLINE,
    X2APIC_MSR_FIRST, X2APIC_MSR_LAST, delivery,
};
use super::{Device, DeviceError, DeviceState, InterruptLines, IoCtx, Irqchip, MsrFault};
use serde::{Deserialize, Serialize};

/// Number of ISA IRQ lines (shared by the PIC and the I/O APIC).
pub const ISA_IRQS: u32 = 16;

/// Saved state of the whole complex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PcIrqchipState {
    /// The 8259A pair's own state.
    pub pic: DeviceState,
    /// The I/O APIC.
    pub ioapic: IoapicState,
    /// The local APIC.
    pub lapic: LapicState,
}

/// The 8259A pair, the I/O APIC and the local APIC.
pub struct PcIrqchip {
    pic: Box<dyn Irqchip>,
    ioapic: Ioapic,
    lapic: Lapic,
    /// Vectors the local APIC delivered (statistics only, not guest state).
    lapic_acknowledged: u64,
    /// Messages the I/O APIC sent (statistics only).
    ioapic_deliveries: u64,
}

impl PcIrqchip {
    /// Joins a PIC with an I/O APIC and `lapic` (use [`Lapic::firmware_handoff`] for guests
    /// started without firmware, [`Lapic::new`] for a firmware ROM).
    pub fn new(pic: Box<dyn Irqchip>, lapic: Lapic) -> Self {
        Self {
            pic,
            ioapic: Ioapic::new(),
            lapic,
            lapic_acknowledged: 0,
            ioapic_deliveries: 0,
        }
    }

    /// MMIO ranges to map on the machine's bus: the I/O APIC window. The local APIC page
    /// moves with IA32_APIC_BASE, so the machine decodes it through
    /// [`Irqchip::mmio_window`] instead.
    pub fn mmio_ranges() -> [(u64, u64); 1] {
        [(IOAPIC_BASE, IOAPIC_SIZE)]
    }

    /// The local APIC.
    pub fn lapic(&self) -> &Lapic {
        &self.lapic
    }

    /// The local APIC, to change (CR8 writes, tests).
    pub fn lapic_mut(&mut self) -> &mut Lapic {
        &mut self.lapic
    }

    /// The I/O APIC.
    pub fn ioapic(&self) -> &Ioapic {
        &self.ioapic
    }

    /// Passes I/O APIC messages on to the local APIC.
    fn deliver(&mut self) {
        for Delivery {
            vector,
            mode,
            logical,
            dest,
            level,
        } in self.ioapic.take_deliveries()
        {
            self.ioapic_deliveries += 1;
            if !self.lapic.is_destination(u32::from(dest), logical) {
                continue;
            }
            match mode {
                delivery::FIXED | delivery::LOWEST => self.lapic.accept(vector, level),
                delivery::NMI => self.lapic.set_nmi_pending(),
                delivery::INIT => self.lapic.set_init_pending(),
                // ExtINT through the I/O APIC (pin 0 virtual wire) is not wired in QEMU's pc
                // either; SMI is not modelled.
                _ => {}
            }
        }
    }

    /// Forwards an EOI of a level-triggered vector to the I/O APIC.
    fn after_lapic_access(&mut self) {
        if let Some(v) = self.lapic.take_level_eoi() {
            self.ioapic.eoi(v);
            self.deliver();
        }
    }

    /// The PIC's INTR output drives LINT0.
    fn sync_lint0(&mut self) {
        let intr = self.pic.interrupt_pending();
        self.lapic.set_lint(0, intr);
    }

    /// Whether this MSR belongs to the APIC (IA32_APIC_BASE, IA32_TSC_DEADLINE, x2APIC).
    pub fn handles_msr(msr: u32) -> bool {
        msr == MSR_APIC_BASE
            || msr == MSR_TSC_DEADLINE
            || (X2APIC_MSR_FIRST..=X2APIC_MSR_LAST).contains(&msr)
    }

    /// RDMSR of an APIC MSR at guest time `now` (#GP as an error).
    pub fn rdmsr(&mut self, now: u64, msr: u32) -> Result<u64, LapicError> {
        match msr {
            MSR_APIC_BASE => Ok(self.lapic.apic_base()),
            MSR_TSC_DEADLINE => Ok(self.lapic.tsc_deadline()),
            _ => self.lapic.rdmsr(now, msr),
        }
    }

    /// WRMSR of an APIC MSR at guest time `now` (#GP as an error); `tsc` relates the
    /// engine's TSC to guest time for IA32_TSC_DEADLINE.
    pub fn wrmsr(
        &mut self,
        now: u64,
        msr: u32,
        value: u64,
        tsc: GuestTsc,
    ) -> Result<(), LapicError> {
        let r = match msr {
            MSR_APIC_BASE => self.lapic.set_apic_base(value),
            MSR_TSC_DEADLINE => {
                self.lapic.set_tsc_deadline(now, value, tsc);
                Ok(())
            }
            _ => self.lapic.wrmsr(now, msr, value),
        };
        self.after_lapic_access();
        r
    }

    /// Takes a pending NMI (LINT1, IPI or I/O APIC).
    pub fn take_nmi(&mut self) -> bool {
        self.lapic.take_nmi()
    }

    /// Takes a pending INIT.
    pub fn take_init(&mut self) -> bool {
        self.lapic.take_init()
    }

    /// The offset of `addr` in the xAPIC page, if the page is decoded there now.
    fn lapic_offset(&self, addr: u64) -> Option<u64> {
        let base = self.lapic.mmio_base()?;
        (base..base + LAPIC_SIZE)
            .contains(&addr)
            .then(|| addr - base)
    }

    /// Whether an x2APIC MSR access needs guest time (the timer's registers).
    fn msr_needs_time(&self, msr: u32) -> bool {
        msr == MSR_TSC_DEADLINE
            || ((X2APIC_MSR_FIRST..=X2APIC_MSR_LAST).contains(&msr)
                && self
                    .lapic
                    .needs_time(u64::from(msr - X2APIC_MSR_FIRST) << 4))
    }

    fn in_ioapic(addr: u64) -> bool {
        (IOAPIC_BASE..IOAPIC_BASE + IOAPIC_SIZE).contains(&addr)
    }
}

fn msr_fault(msr: u32, e: LapicError) -> MsrFault {
    MsrFault {
        msr,
        why: e.to_string(),
    }
}

impl InterruptLines for PcIrqchip {
    fn set_irq(&mut self, line: u32, level: bool) {
        if line < ISA_IRQS {
            self.pic.set_irq(line, level);
            self.sync_lint0();
        }
        let pin = if line == 0 { 2 } else { line as usize };
        self.ioapic.set_irq(pin, level);
        self.deliver();
    }
}

impl Device for PcIrqchip {
    fn name(&self) -> &'static str {
        "pc-irqchip"
    }

    fn read(&mut self, ctx: &mut IoCtx, addr: u64, data: &mut [u8]) {
        if let Some(offset) = self.lapic_offset(addr) {
            let now = if self.lapic.needs_time(offset) {
                ctx.now()
            } else {
                0
            };
            self.lapic.mmio_read(now, offset, data);
            self.after_lapic_access();
        } else if Self::in_ioapic(addr) {
            self.ioapic.mmio_read(addr - IOAPIC_BASE, data);
        } else {
            self.pic.read(ctx, addr, data);
            self.sync_lint0();
        }
    }

    fn write(&mut self, ctx: &mut IoCtx, addr: u64, data: &[u8]) {
        if let Some(offset) = self.lapic_offset(addr) {
            let now = if self.lapic.needs_time(offset) {
                ctx.now()
            } else {
                0
            };
            self.lapic.mmio_write(now, offset, data);
            self.after_lapic_access();
        } else if Self::in_ioapic(addr) {
            self.ioapic.mmio_write(addr - IOAPIC_BASE, data);
            self.deliver();
        } else {
            self.pic.write(ctx, addr, data);
            self.sync_lint0();
        }
    }

    fn poll(&mut self, ctx: &mut IoCtx) {
        self.pic.poll(ctx);
        if self.lapic.timer_deadline().is_some() {
            let now = ctx.now();
            self.lapic.advance(now);
        }
        self.sync_lint0();
    }

    fn next_deadline(&self) -> Option<u64> {
        [self.pic.next_deadline(), self.lapic.timer_deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    fn add_stats(&self, stats: &mut crate::cpu::EngineStats) {
        self.pic.add_stats(stats);
        stats.add("lapic.acknowledged", self.lapic_acknowledged);
        stats.add("ioapic.deliveries", self.ioapic_deliveries);
    }

    fn save(&self) -> DeviceState {
        DeviceState::PcIrqchip(Box::new(PcIrqchipState {
            pic: self.pic.save(),
            ioapic: self.ioapic.state().clone(),
            lapic: self.lapic.state().clone(),
        }))
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        let DeviceState::PcIrqchip(s) = state else {
            return Err(DeviceError::WrongState {
                device: "pc-irqchip",
                found: state.kind(),
            });
        };
        self.pic.restore(&s.pic)?;
        self.ioapic
            .restore(&DeviceState::Ioapic(Box::new(s.ioapic.clone())))?;
        self.lapic
            .restore(&DeviceState::Lapic(Box::new(s.lapic.clone())))?;
        Ok(())
    }
}

impl Irqchip for PcIrqchip {
    fn mmio_window(&self) -> Option<(u64, u64)> {
        self.lapic.mmio_base().map(|base| (base, LAPIC_SIZE))
    }

    fn apic_globally_enabled(&self) -> Option<bool> {
        Some(self.lapic.globally_enabled())
    }

    fn handles_msr(&self, msr: u32) -> bool {
        Self::handles_msr(msr)
    }

    fn rdmsr(&mut self, ctx: &mut IoCtx, msr: u32) -> Result<u64, MsrFault> {
        let now = if self.msr_needs_time(msr) {
            ctx.now()
        } else {
            0
        };
        PcIrqchip::rdmsr(self, now, msr).map_err(|e| msr_fault(msr, e))
    }

    fn wrmsr(
        &mut self,
        ctx: &mut IoCtx,
        msr: u32,
        value: u64,
        tsc: GuestTsc,
    ) -> Result<(), MsrFault> {
        let now = if self.msr_needs_time(msr) {
            ctx.now()
        } else {
            0
        };
        PcIrqchip::wrmsr(self, now, msr, value, tsc).map_err(|e| msr_fault(msr, e))
    }

    fn cr8(&self) -> Option<u64> {
        Some(self.lapic.cr8())
    }

    fn set_cr8(&mut self, value: u64) {
        self.lapic.set_cr8(value);
    }

    fn take_nmi(&mut self) -> bool {
        self.lapic.take_nmi()
    }

    fn take_init(&mut self) -> bool {
        self.lapic.take_init()
    }

    fn nmi_or_init_pending(&self) -> bool {
        let s = self.lapic.state();
        s.nmi_pending || s.init_pending
    }

    fn init_reset(&mut self) {
        self.lapic.init_reset();
        self.sync_lint0();
    }

    fn interrupt_pending(&self) -> bool {
        self.lapic.deliverable_vector().is_some()
            || (self.pic.interrupt_pending() && self.lapic.accepts_pic_interrupts())
    }

    fn acknowledge(&mut self) -> u8 {
        if self.lapic.deliverable_vector().is_some() {
            self.lapic_acknowledged += 1;
            return self.lapic.acknowledge();
        }
        if self.lapic.accepts_pic_interrupts() && self.pic.interrupt_pending() {
            let v = self.pic.acknowledge();
            self.sync_lint0();
            return v;
        }
        if self.lapic.globally_enabled() {
            self.lapic.acknowledge()
        } else {
            // A bypassed APIC: the PIC answers (with its spurious vector).
            let v = self.pic.acknowledge();
            self.sync_lint0();
            v
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::ioapic::{IOREGSEL, IOWIN};
    use crate::devices::lapic::{LAPIC_BASE, SVR_ENABLE, reg};
    use crate::devices::scripted_host::Rig;

    /// A stand-in 8259 pair: IRQ n pending gives vector 0x08 + n; acknowledging clears it.
    #[derive(Default)]
    struct FakePic {
        levels: u16,
        pending: u16,
        acks: Vec<u8>,
    }

    impl Device for FakePic {
        fn name(&self) -> &'static str {
            "fake-pic"
        }
        fn read(&mut self, _ctx: &mut IoCtx, _addr: u64, data: &mut [u8]) {
            data.fill(self.pending as u8);
        }
        fn write(&mut self, _ctx: &mut IoCtx, _addr: u64, _data: &[u8]) {}
        fn save(&self) -> DeviceState {
            DeviceState::Port92(super::super::reset::Port92State {
                outport: self.pending as u8,
            })
        }
        fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
            match state {
                DeviceState::Port92(s) => {
                    self.pending = u16::from(s.outport);
                    Ok(())
                }
                other => Err(DeviceError::WrongState {
                    device: "fake-pic",
                    found: other.kind(),
                }),
            }
        }
    }

    impl InterruptLines for FakePic {
        fn set_irq(&mut self, line: u32, level: bool) {
            let bit = 1u16 << line;
            if level && self.levels & bit == 0 {
                self.pending |= bit;
            }
            if level {
                self.levels |= bit;
            } else {
                self.levels &= !bit;
            }
        }
    }

    impl Irqchip for FakePic {
        fn interrupt_pending(&self) -> bool {
            self.pending != 0
        }
        fn acknowledge(&mut self) -> u8 {
            if self.pending == 0 {
                return 0x0f;
            }
            let irq = self.pending.trailing_zeros();
            self.pending &= !(1 << irq);
            let v = 0x08 + irq as u8;
            self.acks.push(v);
            v
        }
    }

    fn chip(lapic: Lapic) -> PcIrqchip {
        PcIrqchip::new(Box::<FakePic>::default(), lapic)
    }

    fn mmio_write(c: &mut PcIrqchip, rig: &mut Rig, addr: u64, v: u32) {
        c.write(&mut rig.ctx(), addr, &v.to_le_bytes());
    }

    fn route(c: &mut PcIrqchip, rig: &mut Rig, pin: u8, low: u32) {
        mmio_write(c, rig, IOAPIC_BASE + IOREGSEL, u32::from(0x10 + 2 * pin));
        mmio_write(c, rig, IOAPIC_BASE + IOWIN, low);
    }

    #[test]
    fn virtual_wire_passes_pic_interrupts() {
        let mut rig = Rig::new(4 << 20);
        let mut c = chip(Lapic::firmware_handoff(0));
        assert!(!c.interrupt_pending());
        c.set_irq(4, true);
        assert!(c.interrupt_pending());
        assert_eq!(c.acknowledge(), 0x0c);
        assert!(!c.interrupt_pending());
        // Masking LINT0 cuts the PIC off.
        c.set_irq(3, true);
        mmio_write(
            &mut c,
            &mut rig,
            LAPIC_BASE + u64::from(reg::LVT_LINT0),
            0x1_0700,
        );
        assert!(!c.interrupt_pending());
        // A globally disabled APIC is bypassed.
        c.wrmsr(0, MSR_APIC_BASE, 0xfee0_0100, GuestTsc::BT)
            .unwrap();
        assert!(c.interrupt_pending());
        assert_eq!(c.acknowledge(), 0x0b);
        assert_eq!(c.acknowledge(), 0x0f, "PIC spurious when bypassed");
    }

    #[test]
    fn power_on_apic_blocks_the_pic_until_lint0_is_programmed() {
        let mut rig = Rig::new(4 << 20);
        let mut c = chip(Lapic::new(0));
        c.set_irq(1, true);
        assert!(!c.interrupt_pending());
        mmio_write(
            &mut c,
            &mut rig,
            LAPIC_BASE + u64::from(reg::SVR),
            SVR_ENABLE | 0xff,
        );
        mmio_write(
            &mut c,
            &mut rig,
            LAPIC_BASE + u64::from(reg::LVT_LINT0),
            0x700,
        );
        assert!(c.interrupt_pending());
        assert_eq!(c.acknowledge(), 0x09);
    }

    #[test]
    fn isa_irqs_reach_ioapic_pins_with_the_irq0_override() {
        let mut rig = Rig::new(4 << 20);
        let mut c = chip(Lapic::firmware_handoff(0));
        // Mask the PIC path so only the I/O APIC delivers.
        mmio_write(
            &mut c,
            &mut rig,
            LAPIC_BASE + u64::from(reg::LVT_LINT0),
            0x1_0700,
        );
        route(&mut c, &mut rig, 2, 0x30);
        route(&mut c, &mut rig, 4, 0x34);
        route(&mut c, &mut rig, 0, 0x20);
        // (ISA line, vector expected)
        for (line, want) in [
            (0u32, Some(0x30u8)),
            (4, Some(0x34)),
            (2, Some(0x30)),
            (7, None),
        ] {
            c.set_irq(line, true);
            assert_eq!(c.lapic().deliverable_vector(), want, "line {line}");
            if let Some(v) = want {
                assert!(c.interrupt_pending());
                assert_eq!(c.acknowledge(), v);
                mmio_write(&mut c, &mut rig, LAPIC_BASE + u64::from(reg::EOI), 0);
            }
            c.set_irq(line, false);
        }
        // PCI lines 16-23 reach only the I/O APIC.
        route(&mut c, &mut rig, 19, 0x8000 | 0x53);
        c.set_irq(19, true);
        assert_eq!(c.acknowledge(), 0x53);
    }

    #[test]
    fn only_timer_accesses_read_the_clock() {
        let mut rig = Rig::new(4 << 20);
        let mut c = chip(Lapic::firmware_handoff(0));
        let mut d = [0u8; 4];
        c.read(&mut rig.ctx(), LAPIC_BASE + u64::from(reg::VERSION), &mut d);
        mmio_write(&mut c, &mut rig, LAPIC_BASE + u64::from(reg::EOI), 0);
        mmio_write(&mut c, &mut rig, LAPIC_BASE + u64::from(reg::TPR), 0x20);
        c.poll(&mut rig.ctx());
        assert_eq!(rig.host.clock_reads, 0);
        mmio_write(
            &mut c,
            &mut rig,
            LAPIC_BASE + u64::from(reg::TIMER_INITIAL),
            100,
        );
        assert_eq!(rig.host.clock_reads, 1);
        // While armed, every access asks (the timer may have fired first).
        c.read(&mut rig.ctx(), LAPIC_BASE + u64::from(reg::VERSION), &mut d);
        c.poll(&mut rig.ctx());
        assert_eq!(rig.host.clock_reads, 3);
    }

    #[test]
    fn level_eoi_through_the_lapic_clears_remote_irr() {
        let mut rig = Rig::new(4 << 20);
        let mut c = chip(Lapic::firmware_handoff(0));
        route(&mut c, &mut rig, 9, 0x8000 | 0x49);
        c.set_irq(9, true);
        assert_eq!(c.acknowledge(), 0x49);
        assert_ne!(c.ioapic().entry(9).unwrap() & (1 << 14), 0);
        mmio_write(&mut c, &mut rig, LAPIC_BASE + u64::from(reg::EOI), 0);
        // The line is still high: delivered again after the EOI.
        assert_eq!(c.lapic().deliverable_vector(), Some(0x49));
        assert_eq!(c.acknowledge(), 0x49);
        c.set_irq(9, false);
        mmio_write(&mut c, &mut rig, LAPIC_BASE + u64::from(reg::EOI), 0);
        assert_eq!(c.ioapic().entry(9).unwrap() & (1 << 14), 0);
        assert!(c.lapic().deliverable_vector().is_none());
    }

    #[test]
    fn apic_wins_over_the_pic_and_timer_runs_from_poll() {
        let mut rig = Rig::new(4 << 20);
        let mut c = chip(Lapic::firmware_handoff(0));
        mmio_write(
            &mut c,
            &mut rig,
            LAPIC_BASE + u64::from(reg::TIMER_DIVIDE),
            0xb,
        );
        mmio_write(
            &mut c,
            &mut rig,
            LAPIC_BASE + u64::from(reg::LVT_TIMER),
            0xec,
        );
        mmio_write(
            &mut c,
            &mut rig,
            LAPIC_BASE + u64::from(reg::TIMER_INITIAL),
            500,
        );
        assert_eq!(c.next_deadline(), Some(500));
        c.set_irq(1, true);
        rig.host.now_ns = 500;
        c.poll(&mut rig.ctx());
        assert_eq!(c.acknowledge(), 0xec);
        assert_eq!(c.acknowledge(), 0x09);
        // x2APIC MSRs through the complex.
        c.wrmsr(0, MSR_APIC_BASE, 0xfee0_0d00, GuestTsc::BT)
            .unwrap();
        assert_eq!(c.rdmsr(0, 0x803), Ok(0x0005_0014));
        assert!(PcIrqchip::handles_msr(0x6e0) && !PcIrqchip::handles_msr(0x10));
        c.wrmsr(0, 0x80b, 0, GuestTsc::BT).unwrap();
        assert!(
            c.wrmsr(0, MSR_APIC_BASE, 0xfee0_0900, GuestTsc::BT)
                .is_err()
        );
        let mut stats = crate::cpu::EngineStats::default();
        c.add_stats(&mut stats);
        assert_eq!(stats.get("lapic.acknowledged"), 1);
    }

    #[test]
    fn save_restore_round_trip() {
        let mut rig = Rig::new(4 << 20);
        let mut c = chip(Lapic::firmware_handoff(0));
        route(&mut c, &mut rig, 9, 0x8000 | 0x49);
        c.set_irq(9, true);
        c.set_irq(5, true);
        let saved = c.save();
        let mut d = chip(Lapic::new(0));
        d.restore(&saved).unwrap();
        assert_eq!(d.save(), saved);
        assert_eq!(d.acknowledge(), 0x49);
        assert!(d.restore(&DeviceState::DebugExit).is_err());
    }

    /// The real 8259 pair behind the complex, programmed through the machine's ports as
    /// guests do, and the new platform devices as `build_pc` maps them.
    #[test]
    fn build_pc_platform_devices_answer() {
        use crate::devices::StopRequest;
        use crate::devices::scripted_host::ScriptedHost;
        use crate::machine::MachineConfig;
        use vm_memory::{Bytes, GuestAddress};
        let config = MachineConfig {
            ram_size: 16 << 20,
            cmdline: "console=ttyS0".into(),
            ..MachineConfig::default()
        };
        let mut m = crate::build_pc(
            config,
            Box::<ScriptedHost>::default(),
            Box::new(std::io::sink()),
        )
        .unwrap();
        let inb = |m: &mut crate::Machine, port: u16| {
            let mut b = [0u8];
            m.pio_read(port, &mut b);
            b[0]
        };
        // PIC through the complex: vectors 0x20/0x28, IRQ 4 unmasked.
        for (port, v) in [
            (0x20, 0x11),
            (0xa0, 0x11),
            (0x21, 0x20),
            (0xa1, 0x28),
            (0x21, 0x04),
            (0xa1, 0x02),
            (0x21, 0x01),
            (0xa1, 0x01),
            (0x21, 0xef),
            (0xa1, 0xff),
        ] {
            m.pio_write(port, &[v]);
        }
        m.set_irq(4, true);
        assert!(m.interrupt_pending());
        assert_eq!(m.acknowledge_interrupt(), 0x24);
        m.set_irq(4, false);
        m.pio_write(0x20, &[0x20]);
        assert!(!m.interrupt_pending());
        // Local APIC version through MMIO, I/O APIC version through its window.
        let mut d = [0u8; 4];
        m.mmio_read(0xfee0_0030, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0005_0014);
        m.mmio_write(0xfec0_0000, &[1, 0, 0, 0]);
        m.mmio_read(0xfec0_0010, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0017_0011);
        // fw_cfg signature and command line.
        m.pio_write(0x510, &0u16.to_le_bytes());
        let sig: Vec<u8> = (0..4).map(|_| inb(&mut m, 0x511)).collect();
        assert_eq!(sig, b"QEMU");
        m.pio_write(0x510, &0x15u16.to_le_bytes());
        let cmd: Vec<u8> = (0..14).map(|_| inb(&mut m, 0x511)).collect();
        assert_eq!(cmd, b"console=ttyS0\0");
        // PCI host bridge ID.
        m.pio_write(0xcf8, &0x8000_0000u32.to_le_bytes());
        m.pio_read(0xcfc, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1237_8086);
        // ACPI tables are in memory.
        let mut sig = [0u8; 8];
        m.mem
            .read_slice(&mut sig, GuestAddress(acpi_start()))
            .unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        // Port 0x92 fast reset.
        m.pio_write(0x92, &[1]);
        assert_eq!(
            m.take_stop(),
            Some(StopRequest::Reset {
                source: "port 0x92"
            })
        );
        // ACPI soft-off.
        m.pio_write(0x604, &(1u16 << 13).to_le_bytes());
        assert_eq!(m.take_stop(), Some(StopRequest::PowerOff));
        // The whole machine's state round-trips.
        let saved = m.save_devices();
        assert!(matches!(saved[0], DeviceState::PcIrqchip(_)));
        m.restore_devices(&saved).unwrap();
        assert_eq!(m.save_devices(), saved);
    }

    fn acpi_start() -> u64 {
        crate::devices::acpi::ACPI_REGION_START
    }

    /// The PIT's IRQ 0 reaches I/O APIC pin 2 through the real PIC path too.
    #[test]
    fn irq0_goes_to_pin_2_with_the_real_pic() {
        let mut rig = Rig::new(4 << 20);
        let mut c = PcIrqchip::new(
            Box::new(crate::devices::pic::Pic::new()),
            Lapic::firmware_handoff(0),
        );
        route(&mut c, &mut rig, 2, 0x30);
        c.set_irq(0, true);
        assert_eq!(c.lapic().deliverable_vector(), Some(0x30));
        // The APIC wins; the PIC (IMR 0 after reset) signals IRQ 0 too, through LINT0, which
        // is why OSes mask the 8259 before using the I/O APIC.
        assert_eq!(c.acknowledge(), 0x30);
        assert!(c.interrupt_pending());
        c.lapic_mut().set_cr8(0xf);
        let mut rig2 = Rig::new(4 << 20);
        c.write(&mut rig2.ctx(), 0x21, &[0xff]);
        assert!(!c.interrupt_pending(), "PIC masked, APIC vector in service");
    }
}
