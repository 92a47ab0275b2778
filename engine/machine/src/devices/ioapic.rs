//! The I/O APIC (82093AA, as QEMU's `ioapic` version 0x11) with 24 redirection entries:
//! IOREGSEL at 0xfec00000 and IOWIN at 0xfec00010.
//!
//! Pins are driven with logical levels (asserted or not; QEMU does not model polarity
//! either). Edge-triggered pins deliver on a rising edge while unmasked; level-triggered pins
//! deliver while asserted and set Remote IRR until the local APIC broadcasts the EOI for
//! their vector. Every message for the local APIC goes to an outbox that the interrupt
//! complex drains after each operation ([`Ioapic::take_deliveries`]).

use super::{Device, DeviceError, DeviceState, IoCtx};
use serde::{Deserialize, Serialize};

/// Physical address of the register window.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Size of the window the machine maps.
pub const IOAPIC_SIZE: u64 = 0x1000;
/// Number of input pins (and redirection entries).
pub const IOAPIC_PINS: usize = 24;
/// Version register: version 0x11, highest redirection entry 23.
pub const IOAPIC_VERSION: u32 = 0x0017_0011;
/// Offset of the register selector.
pub const IOREGSEL: u64 = 0x00;
/// Offset of the data window.
pub const IOWIN: u64 = 0x10;

/// Redirection entry bit: delivery status (send pending; always idle here).
pub const REDIR_DELIVERY_STATUS: u64 = 1 << 12;
/// Redirection entry bit: remote IRR (level interrupt accepted, EOI not yet seen).
pub const REDIR_REMOTE_IRR: u64 = 1 << 14;
/// Redirection entry bit: level-triggered.
pub const REDIR_LEVEL: u64 = 1 << 15;
/// Redirection entry bit: masked.
pub const REDIR_MASKED: u64 = 1 << 16;
/// Guest-writable bits of the low dword: vector, delivery mode, destination mode,
/// polarity, trigger mode, mask.
const REDIR_LOW_WRITABLE: u64 = 0x0001_afff;
/// Guest-writable bits of the high dword: the destination.
const REDIR_HIGH_WRITABLE: u64 = 0xff00_0000;

/// A message for the local APIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// The vector.
    pub vector: u8,
    /// Delivery mode (see [`super::lapic::delivery`]).
    pub mode: u32,
    /// Logical (true) or physical destination mode.
    pub logical: bool,
    /// Destination APIC ID or logical mask.
    pub dest: u8,
    /// Level-triggered (the local APIC sets TMR and broadcasts the EOI).
    pub level: bool,
}

/// The I/O APIC's complete state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoapicState {
    /// I/O APIC ID (4 bits).
    pub id: u8,
    /// The register selector.
    pub ioregsel: u8,
    /// The redirection table.
    pub redir: Vec<u64>,
    /// Latched requests, one bit per pin.
    pub irr: u32,
    /// Input levels, one bit per pin.
    pub levels: u32,
}

/// The I/O APIC.
#[derive(Debug, Clone)]
pub struct Ioapic {
    state: IoapicState,
    outbox: Vec<Delivery>,
}

impl Default for Ioapic {
    fn default() -> Self {
        Self::new()
    }
}

impl Ioapic {
    /// At reset: ID 0, every entry masked and edge-triggered.
    pub fn new() -> Self {
        Self {
            state: IoapicState {
                id: 0,
                ioregsel: 0,
                redir: vec![REDIR_MASKED; IOAPIC_PINS],
                irr: 0,
                levels: 0,
            },
            outbox: Vec::new(),
        }
    }

    /// The state, for inspection.
    pub fn state(&self) -> &IoapicState {
        &self.state
    }

    /// The redirection entry of `pin`.
    pub fn entry(&self, pin: usize) -> Option<u64> {
        self.state.redir.get(pin).copied()
    }

    /// Messages produced since the last call, oldest first.
    pub fn take_deliveries(&mut self) -> Vec<Delivery> {
        std::mem::take(&mut self.outbox)
    }

    /// Drives input `pin` to `level` (asserted or not).
    pub fn set_irq(&mut self, pin: usize, level: bool) {
        let Some(&entry) = self.state.redir.get(pin) else {
            return;
        };
        let mask = 1u32 << pin;
        let old = self.state.levels & mask != 0;
        if level {
            self.state.levels |= mask;
        } else {
            self.state.levels &= !mask;
        }
        if entry & REDIR_LEVEL != 0 {
            if level {
                self.state.irr |= mask;
                self.service();
            } else {
                self.state.irr &= !mask;
            }
        } else if level && !old && entry & REDIR_MASKED == 0 {
            // Edges on a masked pin are lost, as the 82093AA manual says.
            self.state.irr |= mask;
            self.service();
        }
    }

    /// Delivers every latched, unmasked request that is not waiting for an EOI.
    fn service(&mut self) {
        for pin in 0..IOAPIC_PINS {
            let mask = 1u32 << pin;
            let entry = self.state.redir[pin];
            if self.state.irr & mask == 0 || entry & REDIR_MASKED != 0 {
                continue;
            }
            let level = entry & REDIR_LEVEL != 0;
            if level {
                if entry & REDIR_REMOTE_IRR != 0 {
                    continue;
                }
                self.state.redir[pin] |= REDIR_REMOTE_IRR;
            } else {
                self.state.irr &= !mask;
            }
            self.outbox.push(Delivery {
                vector: entry as u8,
                mode: ((entry >> 8) & 7) as u32,
                logical: entry & (1 << 11) != 0,
                dest: (entry >> 56) as u8,
                level,
            });
        }
    }

    /// The local APIC's EOI broadcast for a level-triggered `vector`: clears Remote IRR of
    /// the entries using it and redelivers those whose input is still asserted.
    pub fn eoi(&mut self, vector: u8) {
        for entry in &mut self.state.redir {
            if *entry as u8 == vector && *entry & REDIR_REMOTE_IRR != 0 {
                *entry &= !REDIR_REMOTE_IRR;
            }
        }
        self.service();
    }

    fn read_register(&self) -> u32 {
        let s = &self.state;
        match s.ioregsel {
            0x00 => u32::from(s.id & 0xf) << 24,
            0x01 => IOAPIC_VERSION,
            0x02 => u32::from(s.id & 0xf) << 24,
            r @ 0x10..=0x3f => {
                let e = s.redir[usize::from((r - 0x10) >> 1)];
                if r & 1 == 0 {
                    e as u32
                } else {
                    (e >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    fn write_register(&mut self, value: u32) {
        match self.state.ioregsel {
            0x00 => self.state.id = ((value >> 24) & 0xf) as u8,
            r @ 0x10..=0x3f => {
                let pin = usize::from((r - 0x10) >> 1);
                let e = &mut self.state.redir[pin];
                if r & 1 == 0 {
                    *e = (*e & !REDIR_LOW_WRITABLE) | (u64::from(value) & REDIR_LOW_WRITABLE);
                    if *e & REDIR_LEVEL == 0 {
                        // An edge-triggered entry has no EOI to wait for (QEMU clears it too,
                        // for guests that switch a level pin to edge).
                        *e &= !REDIR_REMOTE_IRR;
                    }
                } else {
                    *e = (*e & !(REDIR_HIGH_WRITABLE << 32))
                        | (u64::from(value) & REDIR_HIGH_WRITABLE) << 32;
                }
                // A level pin that is still asserted is re-latched when (re)configured.
                let mask = 1u32 << pin;
                if *e & REDIR_LEVEL != 0 && self.state.levels & mask != 0 {
                    self.state.irr |= mask;
                }
                self.service();
            }
            // Version and arbitration are read-only.
            _ => {}
        }
    }

    /// A guest read at `offset` in the window.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset & !3 {
            IOREGSEL => u32::from(self.state.ioregsel),
            IOWIN => self.read_register(),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let at = (offset & 3) as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(at + i).copied().unwrap_or(0);
        }
    }

    /// A guest write at `offset` in the window (IOWIN takes dword writes only).
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            IOREGSEL => {
                if let Some(&b) = data.first() {
                    self.state.ioregsel = b;
                }
            }
            IOWIN if data.len() == 4 => {
                self.write_register(u32::from_le_bytes([data[0], data[1], data[2], data[3]]))
            }
            _ => {}
        }
    }
}

impl Device for Ioapic {
    fn name(&self) -> &'static str {
        "ioapic"
    }

    fn read(&mut self, _ctx: &mut IoCtx, addr: u64, data: &mut [u8]) {
        self.mmio_read(addr.wrapping_sub(IOAPIC_BASE), data);
    }

    fn write(&mut self, _ctx: &mut IoCtx, addr: u64, data: &[u8]) {
        self.mmio_write(addr.wrapping_sub(IOAPIC_BASE), data);
    }

    fn save(&self) -> DeviceState {
        DeviceState::Ioapic(Box::new(self.state.clone()))
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        match state {
            DeviceState::Ioapic(s) if s.redir.len() != IOAPIC_PINS => {
                Err(DeviceError::InvalidState {
                    device: "ioapic",
                    detail: format!(
                        "{} redirection entries, expected {IOAPIC_PINS}",
                        s.redir.len()
                    ),
                })
            }
            DeviceState::Ioapic(s) => {
                self.state = (**s).clone();
                self.outbox.clear();
                Ok(())
            }
            other => Err(DeviceError::WrongState {
                device: "ioapic",
                found: other.kind(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel_read(io: &mut Ioapic, index: u8) -> u32 {
        io.mmio_write(IOREGSEL, &[index]);
        let mut b = [0u8; 4];
        io.mmio_read(IOWIN, &mut b);
        u32::from_le_bytes(b)
    }

    fn sel_write(io: &mut Ioapic, index: u8, value: u32) {
        io.mmio_write(IOREGSEL, &[index]);
        io.mmio_write(IOWIN, &value.to_le_bytes());
    }

    fn program(io: &mut Ioapic, pin: u8, low: u32, dest: u8) {
        sel_write(io, 0x11 + 2 * pin, u32::from(dest) << 24);
        sel_write(io, 0x10 + 2 * pin, low);
    }

    fn fixed(vector: u8, dest: u8, level: bool) -> Delivery {
        Delivery {
            vector,
            mode: 0,
            logical: false,
            dest,
            level,
        }
    }

    #[test]
    fn registers_reset_and_masks() {
        let mut io = Ioapic::new();
        // (index, written, read back)
        let cases: &[(u8, Option<u32>, u32)] = &[
            (0x00, None, 0),
            (0x01, None, 0x0017_0011),
            (0x02, None, 0),
            (0x10, None, 0x0001_0000),
            (0x11, None, 0),
            (0x3e, None, 0x0001_0000),
            (0x40, None, 0),
            (0x00, Some(0xffff_ffff), 0x0f00_0000),
            (0x02, None, 0x0f00_0000),
            (0x01, Some(0), 0x0017_0011),
            (0x12, Some(0xffff_ffff), 0x0001_afff),
            (0x13, Some(0xffff_ffff), 0xff00_0000),
            (0x3f, Some(0x1234_5678), 0x1200_0000),
        ];
        for &(index, write, want) in cases {
            if let Some(v) = write {
                sel_write(&mut io, index, v);
            }
            assert_eq!(sel_read(&mut io, index), want, "index {index:#x}");
        }
        let mut b = [0u8; 4];
        io.mmio_write(IOREGSEL, &[0x12]);
        io.mmio_read(IOREGSEL, &mut b);
        assert_eq!(b[0], 0x12, "IOREGSEL reads back");
        // Byte reads of IOWIN extract.
        let mut one = [0u8];
        io.mmio_read(IOWIN + 1, &mut one);
        assert_eq!(one[0], 0xaf);
    }

    #[test]
    fn edge_pins_deliver_on_rising_edges_while_unmasked() {
        let mut io = Ioapic::new();
        io.set_irq(4, true);
        io.set_irq(4, false);
        assert!(io.take_deliveries().is_empty(), "masked edges are lost");
        program(&mut io, 4, 0x34, 0);
        assert!(
            io.take_deliveries().is_empty(),
            "no edge was latched while masked"
        );
        io.set_irq(4, true);
        io.set_irq(4, true);
        assert_eq!(io.take_deliveries(), vec![fixed(0x34, 0, false)]);
        io.set_irq(4, false);
        io.set_irq(4, true);
        assert_eq!(io.take_deliveries(), vec![fixed(0x34, 0, false)]);
        // Other modes and destinations are passed on.
        program(&mut io, 7, 0x0000_0c00 | 0x11, 0x03);
        io.set_irq(7, true);
        assert_eq!(
            io.take_deliveries(),
            vec![Delivery {
                vector: 0x11,
                mode: 4,
                logical: true,
                dest: 3,
                level: false
            }]
        );
        io.set_irq(30, true); // no such pin: ignored
        assert!(io.take_deliveries().is_empty());
    }

    #[test]
    fn level_pins_wait_for_eoi_and_redeliver_while_asserted() {
        let mut io = Ioapic::new();
        program(&mut io, 9, 0x0000_8000 | 0x49, 0);
        io.set_irq(9, true);
        assert_eq!(io.take_deliveries(), vec![fixed(0x49, 0, true)]);
        assert_ne!(io.entry(9).unwrap() & REDIR_REMOTE_IRR, 0);
        assert_eq!(
            sel_read(&mut io, 0x22) & (1 << 14),
            1 << 14,
            "remote IRR visible"
        );
        io.set_irq(9, true);
        assert!(io.take_deliveries().is_empty(), "remote IRR holds it");
        io.eoi(0x48);
        assert!(io.take_deliveries().is_empty(), "other vector");
        io.eoi(0x49);
        assert_eq!(
            io.take_deliveries(),
            vec![fixed(0x49, 0, true)],
            "still asserted"
        );
        io.set_irq(9, false);
        io.eoi(0x49);
        assert!(io.take_deliveries().is_empty());
        assert_eq!(io.entry(9).unwrap() & REDIR_REMOTE_IRR, 0);
        // Remote IRR is read-only: writing the entry keeps it.
        io.set_irq(9, true);
        io.take_deliveries();
        sel_write(&mut io, 0x22, 0x0000_8000 | 0x49);
        assert_ne!(io.entry(9).unwrap() & REDIR_REMOTE_IRR, 0);
        // Switching to edge clears it.
        sel_write(&mut io, 0x22, 0x49);
        assert_eq!(io.entry(9).unwrap() & REDIR_REMOTE_IRR, 0);
    }

    #[test]
    fn unmasking_an_asserted_level_pin_delivers() {
        let mut io = Ioapic::new();
        program(&mut io, 11, 0x0001_8000 | 0x5b, 1);
        io.set_irq(11, true);
        assert!(io.take_deliveries().is_empty());
        sel_write(&mut io, 0x10 + 22, 0x0000_8000 | 0x5b);
        assert_eq!(io.take_deliveries(), vec![fixed(0x5b, 1, true)]);
        // Dropping the line before unmasking forgets the request.
        let mut io = Ioapic::new();
        program(&mut io, 10, 0x0001_8000 | 0x5a, 0);
        io.set_irq(10, true);
        io.set_irq(10, false);
        sel_write(&mut io, 0x10 + 20, 0x0000_8000 | 0x5a);
        assert!(io.take_deliveries().is_empty());
    }

    #[test]
    fn save_restore_round_trip() {
        let mut io = Ioapic::new();
        sel_write(&mut io, 0, 0x0300_0000);
        program(&mut io, 9, 0x0000_8000 | 0x49, 0);
        io.set_irq(9, true);
        io.take_deliveries();
        io.mmio_write(IOREGSEL, &[0x13]);
        let saved = io.save();
        let mut other = Ioapic::new();
        other.restore(&saved).unwrap();
        assert_eq!(other.save(), saved);
        other.eoi(0x49);
        assert_eq!(other.take_deliveries(), vec![fixed(0x49, 0, true)]);
        assert!(other.restore(&DeviceState::DebugExit).is_err());
        let DeviceState::Ioapic(mut bad) = saved else {
            unreachable!()
        };
        bad.redir.pop();
        assert!(other.restore(&DeviceState::Ioapic(bad)).is_err());
    }
}
