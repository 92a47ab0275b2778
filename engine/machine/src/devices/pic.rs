//! The two cascaded 8259A programmable interrupt controllers of the PC (master at
//! 0x20-0x21, slave at 0xa0-0xa1, the slave's INT wired to the master's IR2) and the ELCR
//! (0x4d0-0x4d1) that makes individual lines level-sensitive.
//!
//! The model follows the 8259A data sheet as QEMU's `i8259` does: ICW1-ICW4
//! initialisation, OCW1 (mask), OCW2 (specific and non-specific EOI, rotation), OCW3 (IRR/ISR
//! read, poll, special mask), auto-EOI, special fully nested mode, edge latching of IRR for
//! edge-triggered inputs and spurious IR7 when a request vanishes before INTA.
//!
//! It is the machine's [`Irqchip`]: `interrupt_pending` is the master's INT output and
//! `acknowledge` is the INTA cycle.

use super::{Device, DeviceError, DeviceState, InterruptLines, IoCtx, Irqchip};
use crate::cpu::EngineStats;
use serde::{Deserialize, Serialize};

/// The master's command and data ports.
pub const MASTER_BASE: u16 = 0x20;
/// The slave's command and data ports.
pub const SLAVE_BASE: u16 = 0xa0;
/// The edge/level control registers (master, slave).
pub const ELCR_BASE: u16 = 0x4d0;
/// The master input the slave's INT output is wired to.
pub const CASCADE_IRQ: u8 = 2;
/// ELCR bits that may be set on the master: IRQ0-2 are always edge triggered on a PC.
pub const MASTER_ELCR_MASK: u8 = 0xf8;
/// ELCR bits that may be set on the slave: IRQ8 (RTC) and IRQ13 (FPU) are always edge.
pub const SLAVE_ELCR_MASK: u8 = 0xde;

/// Saved state of one 8259A.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicChipState {
    /// Input levels as last driven (for edge detection).
    pub last_irr: u8,
    /// Interrupt request register.
    pub irr: u8,
    /// Interrupt mask register (OCW1).
    pub imr: u8,
    /// In-service register.
    pub isr: u8,
    /// The IR with the lowest priority is `priority_add - 1` (rotation).
    pub priority_add: u8,
    /// Vector base (ICW2, low 3 bits zero).
    pub irq_base: u8,
    /// OCW3 RR/RIS: reads of the command port return ISR (true) or IRR.
    pub read_isr: bool,
    /// OCW3 poll command pending: the next read is a poll.
    pub poll: bool,
    /// OCW3 special mask mode.
    pub special_mask: bool,
    /// Which ICW the data port expects next (0: none, normal operation; 1-3: ICW2-ICW4).
    pub init_state: u8,
    /// ICW4 AEOI.
    pub auto_eoi: bool,
    /// Rotate on auto-EOI (OCW2 R with EOI=0, SL=0).
    pub rotate_on_auto_eoi: bool,
    /// ICW4 SFNM.
    pub special_fully_nested: bool,
    /// ICW1 IC4: an ICW4 follows.
    pub init4: bool,
    /// ICW1 SNGL: no ICW3.
    pub single_mode: bool,
    /// ICW1 LTIM: every input level-triggered.
    pub ltim: bool,
    /// Edge/level control register (1 = level).
    pub elcr: u8,
}

/// Saved state of the pair.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicState {
    /// The master (IRQ0-7).
    pub master: PicChipState,
    /// The slave (IRQ8-15).
    pub slave: PicChipState,
}

fn is_level(s: &PicChipState, irq: u8) -> bool {
    s.ltim || s.elcr & (1 << irq) != 0
}

/// Priority (0 = highest) of the highest-priority bit in `mask`, 8 if none.
fn priority(s: &PicChipState, mask: u8) -> u8 {
    if mask == 0 {
        return 8;
    }
    (0..8)
        .find(|p| mask & (1 << ((p + s.priority_add) & 7)) != 0)
        .unwrap_or(8)
}

/// The IR this chip would request the CPU for now, if any.
fn wanted_irq(s: &PicChipState, master: bool) -> Option<u8> {
    let p = priority(s, s.irr & !s.imr);
    if p == 8 {
        return None;
    }
    let mut in_service = s.isr;
    if s.special_mask {
        in_service &= !s.imr;
    }
    if s.special_fully_nested && master {
        in_service &= !(1 << CASCADE_IRQ);
    }
    (p < priority(s, in_service)).then_some((p + s.priority_add) & 7)
}

fn chip_set_irq(s: &mut PicChipState, irq: u8, level: bool) {
    let mask = 1 << irq;
    if is_level(s, irq) {
        if level {
            s.irr |= mask;
            s.last_irr |= mask;
        } else {
            s.irr &= !mask;
            s.last_irr &= !mask;
        }
    } else if level {
        if s.last_irr & mask == 0 {
            s.irr |= mask;
        }
        s.last_irr |= mask;
    } else {
        s.last_irr &= !mask;
    }
}

/// The INTA cycle's effect on one chip for `irq`.
fn intack(s: &mut PicChipState, irq: u8) {
    if s.auto_eoi {
        if s.rotate_on_auto_eoi {
            s.priority_add = (irq + 1) & 7;
        }
    } else {
        s.isr |= 1 << irq;
    }
    // A level-triggered request stays in IRR while the line is high.
    if !is_level(s, irq) {
        s.irr &= !(1 << irq);
    }
}

/// ICW1 with the init bit: everything but the ELCR and the input levels' edge memory resets.
fn init_reset(s: &mut PicChipState) {
    *s = PicChipState {
        elcr: s.elcr,
        irr: s.irr & s.elcr,
        ..PicChipState::default()
    };
}

/// The 8259A pair plus ELCR.
#[derive(Debug, Default)]
pub struct Pic {
    state: PicState,
    acknowledged: u64,
    spurious: u64,
}

impl Pic {
    /// A pair in its power-on state (uninitialised, nothing masked, all inputs edge).
    pub fn new() -> Self {
        Self::default()
    }

    /// The state, for inspection.
    pub fn state(&self) -> &PicState {
        &self.state
    }

    /// Drives the master's IR2 from the slave's INT output.
    fn update_cascade(&mut self) {
        let slave_int = wanted_irq(&self.state.slave, false).is_some();
        chip_set_irq(&mut self.state.master, CASCADE_IRQ, slave_int);
    }

    fn chip_mut(&mut self, slave: bool) -> &mut PicChipState {
        if slave {
            &mut self.state.slave
        } else {
            &mut self.state.master
        }
    }

    fn write_command(&mut self, slave: bool, val: u8) {
        let s = self.chip_mut(slave);
        if val & 0x10 != 0 {
            // ICW1.
            init_reset(s);
            s.init_state = 1;
            s.init4 = val & 0x01 != 0;
            s.single_mode = val & 0x02 != 0;
            s.ltim = val & 0x08 != 0;
        } else if val & 0x08 != 0 {
            // OCW3.
            if val & 0x04 != 0 {
                s.poll = true;
            }
            if val & 0x02 != 0 {
                s.read_isr = val & 0x01 != 0;
            }
            if val & 0x40 != 0 {
                s.special_mask = val & 0x20 != 0;
            }
        } else {
            // OCW2: R, SL, EOI in bits 7-5, level in bits 2-0.
            let level = val & 7;
            match val >> 5 {
                // Clear / set rotate in automatic EOI mode.
                0 | 4 => s.rotate_on_auto_eoi = val & 0x80 != 0,
                // Non-specific EOI, optionally rotating.
                1 | 5 => {
                    let p = priority(s, s.isr);
                    if p != 8 {
                        let irq = (p + s.priority_add) & 7;
                        s.isr &= !(1 << irq);
                        if val >> 5 == 5 {
                            s.priority_add = (irq + 1) & 7;
                        }
                    }
                }
                // Specific EOI.
                3 => s.isr &= !(1 << level),
                // Set priority: `level` becomes the lowest.
                6 => s.priority_add = (level + 1) & 7,
                // Rotate on specific EOI.
                7 => {
                    s.isr &= !(1 << level);
                    s.priority_add = (level + 1) & 7;
                }
                // 2: no operation.
                _ => {}
            }
        }
        self.update_cascade();
    }

    fn write_data(&mut self, slave: bool, val: u8) {
        let s = self.chip_mut(slave);
        match s.init_state {
            0 => s.imr = val,
            1 => {
                s.irq_base = val & 0xf8;
                s.init_state = match (s.single_mode, s.init4) {
                    (false, _) => 2,
                    (true, true) => 3,
                    (true, false) => 0,
                };
            }
            2 => s.init_state = if s.init4 { 3 } else { 0 },
            _ => {
                s.special_fully_nested = val & 0x10 != 0;
                s.auto_eoi = val & 0x02 != 0;
                s.init_state = 0;
            }
        }
        self.update_cascade();
    }

    /// A poll-mode read: acknowledges the highest request like INTA and returns
    /// `0x80 | irq`, or 0 when nothing is requested.
    fn poll_read(&mut self, slave: bool) -> u8 {
        let s = self.chip_mut(slave);
        s.poll = false;
        let result = match wanted_irq(s, !slave) {
            Some(irq) => {
                intack(s, irq);
                0x80 | irq
            }
            None => 0,
        };
        self.update_cascade();
        result
    }

    fn read_port(&mut self, port: u16) -> u8 {
        match port {
            0x20 | 0x21 | 0xa0 | 0xa1 => {
                let slave = port & 0x80 != 0;
                if self.chip_mut(slave).poll {
                    return self.poll_read(slave);
                }
                let s = self.chip_mut(slave);
                match (port & 1, s.read_isr) {
                    (0, true) => s.isr,
                    (0, false) => s.irr,
                    _ => s.imr,
                }
            }
            0x4d0 => self.state.master.elcr,
            0x4d1 => self.state.slave.elcr,
            _ => 0xff,
        }
    }

    fn write_port(&mut self, port: u16, val: u8) {
        match port {
            0x20 | 0xa0 => self.write_command(port == 0xa0, val),
            0x21 | 0xa1 => self.write_data(port == 0xa1, val),
            0x4d0 => {
                self.state.master.elcr = val & MASTER_ELCR_MASK;
                self.update_cascade();
            }
            0x4d1 => {
                self.state.slave.elcr = val & SLAVE_ELCR_MASK;
                self.update_cascade();
            }
            _ => {}
        }
    }
}

impl InterruptLines for Pic {
    /// ISA IRQ0-15. IRQ2 is the cascade input and not available to devices (on a PC, ISA
    /// IRQ2 is routed to IRQ9; nothing in deja-pc uses it), lines above 15 belong to the
    /// IOAPIC; both are ignored here.
    fn set_irq(&mut self, line: u32, level: bool) {
        match line {
            0 | 1 | 3..=7 => chip_set_irq(&mut self.state.master, line as u8, level),
            8..=15 => {
                chip_set_irq(&mut self.state.slave, line as u8 - 8, level);
                self.update_cascade();
            }
            _ => {}
        }
    }
}

impl Irqchip for Pic {
    fn interrupt_pending(&self) -> bool {
        wanted_irq(&self.state.master, true).is_some()
    }

    fn acknowledge(&mut self) -> u8 {
        let vector = match wanted_irq(&self.state.master, true) {
            Some(CASCADE_IRQ) => {
                let slave_irq = wanted_irq(&self.state.slave, false);
                if let Some(irq) = slave_irq {
                    intack(&mut self.state.slave, irq);
                }
                intack(&mut self.state.master, CASCADE_IRQ);
                // The slave's request vanished: it answers with its IR7 (IRQ15), and the
                // master still marks IR2 in service.
                if slave_irq.is_none() {
                    self.spurious += 1;
                }
                self.state.slave.irq_base + slave_irq.unwrap_or(7)
            }
            Some(irq) => {
                intack(&mut self.state.master, irq);
                self.state.master.irq_base + irq
            }
            // The request vanished: spurious IRQ7, nothing goes in service.
            None => {
                self.spurious += 1;
                self.state.master.irq_base + 7
            }
        };
        self.acknowledged += 1;
        self.update_cascade();
        vector
    }
}

impl Device for Pic {
    fn name(&self) -> &'static str {
        "pic"
    }

    fn read(&mut self, _ctx: &mut IoCtx, addr: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.read_port((addr as u16).wrapping_add(i as u16));
        }
    }

    fn write(&mut self, _ctx: &mut IoCtx, addr: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            self.write_port((addr as u16).wrapping_add(i as u16), b);
        }
    }

    fn save(&self) -> DeviceState {
        DeviceState::Pic(self.state.clone())
    }

    fn add_stats(&self, stats: &mut EngineStats) {
        stats.add("pic.acknowledged", self.acknowledged);
        stats.add("pic.spurious", self.spurious);
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        let DeviceState::Pic(s) = state else {
            return Err(DeviceError::WrongState {
                device: "pic",
                found: state.kind(),
            });
        };
        for (name, chip) in [("master", &s.master), ("slave", &s.slave)] {
            if chip.init_state > 3 || chip.priority_add > 7 || chip.irq_base & 7 != 0 {
                return Err(DeviceError::InvalidState {
                    device: "pic",
                    detail: format!(
                        "{name}: init_state {}, priority_add {}, irq_base {:#x} out of range",
                        chip.init_state, chip.priority_add, chip.irq_base
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

    /// Initialises like Linux and the deja guests: edge, cascade, 8086 mode.
    fn init(b: &mut Bench, p: &mut Pic, master_base: u8, slave_base: u8, icw4: u8) {
        for (port, v) in [
            (0x20, 0x11),
            (0xa0, 0x11),
            (0x21, master_base),
            (0xa1, slave_base),
            (0x21, 0x04),
            (0xa1, 0x02),
            (0x21, icw4),
            (0xa1, icw4),
            (0x21, 0x00),
            (0xa1, 0x00),
        ] {
            b.out(p, port, v);
        }
    }

    fn setup() -> (Bench, Pic) {
        let mut b = Bench::new();
        let mut p = Pic::new();
        init(&mut b, &mut p, 0x20, 0x28, 0x01);
        (b, p)
    }

    fn pulse(p: &mut Pic, line: u32) {
        p.set_irq(line, true);
        p.set_irq(line, false);
    }

    #[test]
    fn init_sequence_sets_bases_and_clears_masks() {
        let (mut b, mut p) = setup();
        assert_eq!(p.state().master.irq_base, 0x20);
        assert_eq!(p.state().slave.irq_base, 0x28);
        assert_eq!(p.state().master.init_state, 0);
        assert_eq!(b.inb(&mut p, 0x21), 0);
        // Single mode without ICW4: ICW2 ends the sequence, next data write is the mask.
        b.out(&mut p, 0x20, 0x12);
        b.out(&mut p, 0x21, 0x40);
        assert_eq!(p.state().master.init_state, 0);
        b.out(&mut p, 0x21, 0xfe);
        assert_eq!(b.inb(&mut p, 0x21), 0xfe);
        assert_eq!(p.state().master.irq_base, 0x40);
        // ICW2's low three bits are ignored.
        b.out(&mut p, 0x20, 0x13);
        b.out(&mut p, 0x21, 0x47);
        b.out(&mut p, 0x21, 0x03);
        assert_eq!(p.state().master.irq_base, 0x40);
        assert!(p.state().master.auto_eoi);
    }

    #[test]
    fn edge_request_is_delivered_once_with_its_vector_and_waits_for_eoi() {
        let (mut b, mut p) = setup();
        assert!(!p.interrupt_pending());
        pulse(&mut p, 0);
        assert!(p.interrupt_pending());
        assert_eq!(p.acknowledge(), 0x20);
        assert!(!p.interrupt_pending());
        b.out(&mut p, 0x20, 0x0b); // OCW3: read ISR
        assert_eq!(b.inb(&mut p, 0x20), 0x01);
        // Same-priority request waits for the EOI.
        pulse(&mut p, 0);
        assert!(!p.interrupt_pending());
        b.out(&mut p, 0x20, 0x20);
        assert_eq!(b.inb(&mut p, 0x20), 0x00);
        assert!(p.interrupt_pending());
        assert_eq!(p.acknowledge(), 0x20);
    }

    #[test]
    fn held_edge_line_latches_only_rising_edges() {
        let (mut b, mut p) = setup();
        p.set_irq(4, true);
        assert_eq!(p.acknowledge(), 0x24);
        b.out(&mut p, 0x20, 0x20);
        p.set_irq(4, true); // still high: no new edge
        assert!(!p.interrupt_pending());
        p.set_irq(4, false);
        p.set_irq(4, true);
        assert!(p.interrupt_pending());
    }

    #[test]
    fn mask_blocks_and_unmask_delivers() {
        let (mut b, mut p) = setup();
        b.out(&mut p, 0x21, 0x01);
        pulse(&mut p, 0);
        assert!(!p.interrupt_pending());
        b.out(&mut p, 0x0a, 0); // not a PIC port: ignored
        b.out(&mut p, 0x20, 0x0a); // OCW3: read IRR
        assert_eq!(b.inb(&mut p, 0x20), 0x01);
        b.out(&mut p, 0x21, 0x00);
        assert_eq!(p.acknowledge(), 0x20);
    }

    #[test]
    fn fixed_priority_orders_requests_and_nests() {
        // (lines raised, expected vectors in delivery order without EOI in between
        // except where a higher priority interrupts a lower one)
        let (mut b, mut p) = setup();
        pulse(&mut p, 5);
        pulse(&mut p, 3);
        pulse(&mut p, 7);
        assert_eq!(p.acknowledge(), 0x23);
        // 5 and 7 are lower than 3 (in service): nothing until EOI.
        assert!(!p.interrupt_pending());
        pulse(&mut p, 1);
        assert_eq!(p.acknowledge(), 0x21, "higher priority nests");
        b.out(&mut p, 0x20, 0x20); // EOI for 1 (highest in service)
        b.out(&mut p, 0x20, 0x0b);
        assert_eq!(b.inb(&mut p, 0x20), 0x08);
        b.out(&mut p, 0x20, 0x20); // EOI for 3
        assert_eq!(p.acknowledge(), 0x25);
        b.out(&mut p, 0x20, 0x65); // specific EOI for 5
        assert_eq!(p.acknowledge(), 0x27);
        b.out(&mut p, 0x20, 0x67);
        assert_eq!(b.inb(&mut p, 0x20), 0);
    }

    #[test]
    fn rotation_makes_the_serviced_level_lowest() {
        let cases: &[(u8, &str, [u8; 3])] = &[
            // OCW2 after servicing IRQ 3 via non-specific rotate EOI: 3 becomes lowest, so
            // 4 outranks 1.
            (0xa0, "rotate on non-specific EOI", [4, 1, 3]),
            // Set priority command making 4 lowest: order 5, 1, 4... only 1,3,4 pending.
            (0xc4, "set priority (4 lowest)", [1, 3, 4]),
            // Rotate on specific EOI for 1: lowest is 1.
            (0xe1, "rotate on specific EOI", [3, 4, 1]),
        ];
        for &(ocw2, what, order) in cases {
            let (mut b, mut p) = setup();
            pulse(&mut p, 3);
            assert_eq!(p.acknowledge(), 0x23, "{what}");
            if ocw2 == 0xc4 {
                b.out(&mut p, 0x20, 0x20);
            }
            b.out(&mut p, 0x20, ocw2);
            if ocw2 == 0xe1 {
                b.out(&mut p, 0x20, 0x63); // 3 still in service there
            }
            for l in [1u32, 3, 4] {
                pulse(&mut p, l);
            }
            let got: Vec<u8> = (0..3)
                .map(|_| {
                    let v = p.acknowledge() - 0x20;
                    b.out(&mut p, 0x20, 0x60 | v); // specific EOI, no rotation
                    v
                })
                .collect();
            assert_eq!(got, order, "{what}");
        }
    }

    #[test]
    fn auto_eoi_leaves_nothing_in_service_and_can_rotate() {
        let mut b = Bench::new();
        let mut p = Pic::new();
        init(&mut b, &mut p, 0x08, 0x70, 0x03);
        pulse(&mut p, 6);
        assert_eq!(p.acknowledge(), 0x0e);
        b.out(&mut p, 0x20, 0x0b);
        assert_eq!(b.inb(&mut p, 0x20), 0);
        // Rotate in auto-EOI: after 6, IRQ 7 is highest.
        b.out(&mut p, 0x20, 0x80);
        pulse(&mut p, 1);
        assert_eq!(p.acknowledge(), 0x09);
        pulse(&mut p, 0);
        pulse(&mut p, 3);
        assert_eq!(p.acknowledge(), 0x0b, "1 rotated to lowest: 3 before 0");
        assert_eq!(p.acknowledge(), 0x08);
    }

    #[test]
    fn poll_mode_acknowledges_and_reports() {
        let (mut b, mut p) = setup();
        b.out(&mut p, 0x21, 0xff); // polled guests mask everything
        b.out(&mut p, 0x20, 0x0c);
        assert_eq!(b.inb(&mut p, 0x20), 0x00, "nothing requested");
        pulse(&mut p, 5);
        b.out(&mut p, 0x20, 0x0c);
        // Masked requests are not polled either (the chip only sees unmasked IRR).
        assert_eq!(b.inb(&mut p, 0x20), 0x00);
        b.out(&mut p, 0x21, 0x00);
        b.out(&mut p, 0x20, 0x0c);
        assert_eq!(b.inb(&mut p, 0x21), 0x85, "poll read works on either port");
        b.out(&mut p, 0x20, 0x0b);
        assert_eq!(b.inb(&mut p, 0x20), 0x20, "IRQ5 in service after the poll");
        assert_eq!(b.inb(&mut p, 0x21), 0x00, "the poll is one-shot");
    }

    #[test]
    fn special_mask_mode_lets_lower_priorities_through() {
        let (mut b, mut p) = setup();
        pulse(&mut p, 2 + 1);
        assert_eq!(p.acknowledge(), 0x23);
        pulse(&mut p, 6);
        assert!(!p.interrupt_pending());
        // Mask the in-service level and enter special mask mode.
        b.out(&mut p, 0x21, 0x08);
        b.out(&mut p, 0x20, 0x68);
        assert_eq!(p.acknowledge(), 0x26);
        b.out(&mut p, 0x20, 0x48); // leave special mask mode
        pulse(&mut p, 5);
        assert!(!p.interrupt_pending());
    }

    #[test]
    fn vanished_requests_give_spurious_irq7_and_irq15() {
        let (mut b, mut p) = setup();
        b.out(&mut p, 0x4d0, 0x20); // IRQ5 level
        p.set_irq(5, true);
        assert!(p.interrupt_pending());
        p.set_irq(5, false);
        assert!(!p.interrupt_pending());
        assert_eq!(p.acknowledge(), 0x27);
        b.out(&mut p, 0x20, 0x0b);
        assert_eq!(
            b.inb(&mut p, 0x20),
            0,
            "spurious IRQ7 is not put in service"
        );

        // Slave side: the slave's request vanishes after it raised IR2 on the master.
        b.out(&mut p, 0x4d1, 0x02); // IRQ9 level
        p.set_irq(9, true);
        assert!(p.interrupt_pending());
        p.set_irq(9, false);
        // The master latched the edge on IR2, so INTA still happens: slave answers IR7.
        assert_eq!(p.acknowledge(), 0x2f);
        assert_eq!(b.inb(&mut p, 0x20), 0x04, "master has IR2 in service");
        b.out(&mut p, 0xa0, 0x0b);
        assert_eq!(b.inb(&mut p, 0xa0), 0, "slave put nothing in service");
        let mut stats = EngineStats::default();
        p.add_stats(&mut stats);
        assert_eq!(stats.get("pic.spurious"), 2);
        assert_eq!(stats.get("pic.acknowledged"), 2);
    }

    #[test]
    fn cascade_delivers_slave_vectors_and_needs_both_eois() {
        let (mut b, mut p) = setup();
        pulse(&mut p, 8);
        assert!(p.interrupt_pending());
        assert_eq!(p.acknowledge(), 0x28);
        b.out(&mut p, 0x20, 0x0b);
        b.out(&mut p, 0xa0, 0x0b);
        assert_eq!(b.inb(&mut p, 0x20), 0x04);
        assert_eq!(b.inb(&mut p, 0xa0), 0x01);
        pulse(&mut p, 14);
        assert!(
            !p.interrupt_pending(),
            "blocked by the slave's IR0 in service"
        );
        b.out(&mut p, 0xa0, 0x20);
        assert!(
            !p.interrupt_pending(),
            "blocked by the master's IR2 in service"
        );
        b.out(&mut p, 0x20, 0x20);
        assert_eq!(p.acknowledge(), 0x2e);
        // Master priority: IRQ1 beats the whole slave, IRQ3 loses to it.
        b.out(&mut p, 0xa0, 0x20);
        b.out(&mut p, 0x20, 0x20);
        pulse(&mut p, 3);
        pulse(&mut p, 12);
        pulse(&mut p, 1);
        assert_eq!(p.acknowledge(), 0x21);
        b.out(&mut p, 0x20, 0x20);
        assert_eq!(p.acknowledge(), 0x2c);
        b.out(&mut p, 0xa0, 0x20);
        b.out(&mut p, 0x20, 0x20);
        assert_eq!(p.acknowledge(), 0x23);
        // Masking IR2 on the master masks the whole slave.
        b.out(&mut p, 0x20, 0x20);
        b.out(&mut p, 0x21, 0x04);
        pulse(&mut p, 10);
        assert!(!p.interrupt_pending());
        b.out(&mut p, 0x21, 0x00);
        assert_eq!(p.acknowledge(), 0x2a);
    }

    #[test]
    fn level_lines_stay_requested_until_lowered() {
        let (mut b, mut p) = setup();
        b.out(&mut p, 0x4d1, 0xff);
        assert_eq!(b.inb(&mut p, 0x4d1), SLAVE_ELCR_MASK, "IRQ8/13 stay edge");
        b.out(&mut p, 0x4d0, 0xff);
        assert_eq!(b.inb(&mut p, 0x4d0), MASTER_ELCR_MASK);
        p.set_irq(11, true);
        assert_eq!(p.acknowledge(), 0x2b);
        b.out(&mut p, 0xa0, 0x20);
        b.out(&mut p, 0x20, 0x20);
        // Still high after EOI: requested again.
        assert_eq!(p.acknowledge(), 0x2b);
        p.set_irq(11, false);
        b.out(&mut p, 0xa0, 0x20);
        b.out(&mut p, 0x20, 0x20);
        assert!(
            !p.interrupt_pending(),
            "lowered before EOI: not requested again"
        );
        // ICW1 LTIM makes every input level triggered, even IRQ0.
        b.out(&mut p, 0x20, 0x19);
        b.out(&mut p, 0x21, 0x20);
        b.out(&mut p, 0x21, 0x04);
        b.out(&mut p, 0x21, 0x01);
        b.out(&mut p, 0x21, 0x00);
        p.set_irq(0, true);
        assert_eq!(p.acknowledge(), 0x20);
        b.out(&mut p, 0x20, 0x20);
        assert!(p.interrupt_pending());
    }

    #[test]
    fn special_fully_nested_lets_slave_nest_on_master() {
        let mut b = Bench::new();
        let mut p = Pic::new();
        init(&mut b, &mut p, 0x20, 0x28, 0x11);
        pulse(&mut p, 12);
        assert_eq!(p.acknowledge(), 0x2c);
        pulse(&mut p, 9);
        assert_eq!(
            p.acknowledge(),
            0x29,
            "higher slave level nests while IR2 in service"
        );
    }

    #[test]
    fn save_restore_round_trip_and_mismatch() {
        let (mut b, mut p) = setup();
        pulse(&mut p, 9);
        pulse(&mut p, 4);
        b.out(&mut p, 0x21, 0x10);
        let saved = p.save();
        let mut q = Pic::new();
        q.restore(&saved).unwrap();
        assert_eq!(q.save(), saved);
        assert_eq!(q.acknowledge(), 0x29);
        assert!(matches!(
            q.restore(&DeviceState::DebugExit),
            Err(DeviceError::WrongState { device: "pic", .. })
        ));
        let DeviceState::Pic(mut bad) = saved else {
            unreachable!()
        };
        bad.master.irq_base = 0x21;
        assert!(matches!(
            q.restore(&DeviceState::Pic(bad)),
            Err(DeviceError::InvalidState { .. })
        ));
    }
}
