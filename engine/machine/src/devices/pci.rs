//! PCI configuration mechanism #1 (address latch at 0xcf8, data window at 0xcfc-0xcff) with
//! the two functions QEMU's `pc` machine puts on bus 0 before any add-on card: the i440FX
//! host bridge (00:00.0) and the PIIX3 PCI-to-ISA bridge (00:01.0). The PIIX3 reset control
//! register at 0xcf9 lives in the same dword and is handled here too.
//!
//! Each function has a 256-byte configuration space with QEMU's write masks: header fields
//! read-only except the command register, cache line size, latency timer and interrupt
//! line; the status register's error bits write-1-to-clear; device-specific space
//! (0x40-0xff) writable. Every other bus/device/function reads as all ones.

use super::reset::ResetControl;
use super::{Device, DeviceError, DeviceState, IoCtx};
use serde::{Deserialize, Serialize};

/// The configuration address register.
pub const CONFIG_ADDRESS: u16 = 0xcf8;
/// The configuration data window.
pub const CONFIG_DATA: u16 = 0xcfc;
/// Ports the device answers: 0xcf8-0xcff.
pub const PORT_RANGE: (u16, u16) = (CONFIG_ADDRESS, 8);
/// Bit 31 of the address register: configuration cycles enabled.
pub const ADDRESS_ENABLE: u32 = 1 << 31;

/// The i440FX's PAM0 register (BIOS area shadowing); PAM1-PAM6 follow it.
pub const I440FX_PAM0: usize = 0x59;
/// The i440FX's SMRAM control register.
pub const I440FX_SMRAM: usize = 0x72;
/// The PIIX3's PIRQA route control register; PIRQB-D follow it.
pub const PIIX3_PIRQA_ROUTE: usize = 0x60;

const CONFIG_SIZE: usize = 256;
const HEADER_SIZE: usize = 0x40;
const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;

/// One PCI function's configuration space and its write behaviour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciFunction {
    /// Bus/device/function as `device << 3 | function` on bus 0.
    pub devfn: u8,
    /// The configuration space.
    pub config: Vec<u8>,
}

impl PciFunction {
    fn new(devfn: u8, vendor: u16, device: u16, revision: u8, class: u32, header: u8) -> Self {
        let mut config = vec![0u8; CONFIG_SIZE];
        config[0..2].copy_from_slice(&vendor.to_le_bytes());
        config[2..4].copy_from_slice(&device.to_le_bytes());
        config[8] = revision;
        config[9..12].copy_from_slice(&class.to_le_bytes()[..3]);
        config[0x0e] = header;
        Self { devfn, config }
    }

    /// QEMU's default masks for a type 0 function without BARs or capabilities: the bits
    /// of byte `offset` the guest may write, and those a written 1 clears.
    fn masks(offset: usize) -> (u8, u8) {
        match offset {
            // Command: I/O, memory, bus master, parity, SERR; then INTx disable.
            COMMAND => (0x47, 0),
            0x05 => (0x05, 0),
            // Status: parity/abort/SERR error bits are write-1-to-clear.
            STATUS => (0, 0),
            0x07 => (0, 0xf9),
            // Cache line size, latency timer, interrupt line.
            0x0c | 0x0d | 0x3c => (0xff, 0),
            HEADER_SIZE.. => (0xff, 0),
            _ => (0, 0),
        }
    }

    /// The i440FX host bridge at 00:00.0, with QEMU's reset values.
    pub fn i440fx() -> Self {
        let mut f = Self::new(0, 0x8086, 0x1237, 0x02, 0x06_0000, 0x00);
        f.config[I440FX_SMRAM] = 0x02;
        f
    }

    /// The PIIX3 ISA bridge at 00:01.0 (multi-function, as its IDE and USB functions would
    /// be), with QEMU's `piix3_reset` values.
    pub fn piix3() -> Self {
        let mut f = Self::new(1 << 3, 0x8086, 0x7000, 0x00, 0x06_0100, 0x80);
        let c = &mut f.config;
        c[COMMAND] = 0x07; // I/O, memory, bus master
        c[STATUS + 1] = 0x02; // DEVSEL medium
        c[0x4c] = 0x4d;
        c[0x4e] = 0x03;
        c[PIIX3_PIRQA_ROUTE..PIIX3_PIRQA_ROUTE + 4].fill(0x80); // PIRQx routing disabled
        c[0x69] = 0x02;
        c[0x70] = 0x80;
        c[0x76] = 0x0c;
        c[0x77] = 0x0c;
        c[0x78] = 0x02;
        c[0xa0] = 0x08;
        f
    }

    /// Reads `len` bytes at `offset` (bytes past the end of the space read as all ones).
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.config.get(offset + i).copied().unwrap_or(0xff);
        }
    }

    /// Writes `data` at `offset`, honouring the write and write-1-to-clear masks.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let at = offset + i;
            if at >= CONFIG_SIZE {
                break;
            }
            let (w, c) = Self::masks(at);
            let old = self.config[at];
            self.config[at] = (old & !w) | (v & w);
            self.config[at] &= !(v & c);
        }
    }

    /// The PIRQ line routed to an ISA IRQ by the PIIX3 (`None` when routing is disabled).
    pub fn pirq_route(&self, pirq: usize) -> Option<u8> {
        let v = *self.config.get(PIIX3_PIRQA_ROUTE + pirq)?;
        (v & 0x80 == 0).then_some(v & 0x0f)
    }
}

/// Saved state of the PCI host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciState {
    /// The configuration address register.
    pub address: u32,
    /// The functions on bus 0, ascending `devfn`.
    pub functions: Vec<PciFunction>,
    /// The reset control register at 0xcf9.
    pub reset_control: ResetControl,
}

/// Configuration mechanism #1 and the functions on bus 0.
#[derive(Debug)]
pub struct PciHost {
    state: PciState,
}

impl Default for PciHost {
    fn default() -> Self {
        Self::new()
    }
}

impl PciHost {
    /// QEMU's `pc` bus 0: the i440FX host bridge and the PIIX3 ISA bridge.
    pub fn new() -> Self {
        Self {
            state: PciState {
                address: 0,
                functions: vec![PciFunction::i440fx(), PciFunction::piix3()],
                reset_control: ResetControl::default(),
            },
        }
    }

    /// The function at bus 0 `devfn`, if present.
    pub fn function(&self, devfn: u8) -> Option<&PciFunction> {
        self.state.functions.iter().find(|f| f.devfn == devfn)
    }

    /// The function the address register selects, and the dword-aligned register offset.
    fn selected(&mut self) -> Option<(&mut PciFunction, usize)> {
        let a = self.state.address;
        if a & ADDRESS_ENABLE == 0 || (a >> 16) & 0xff != 0 {
            return None;
        }
        let devfn = ((a >> 8) & 0xff) as u8;
        let offset = (a & 0xfc) as usize;
        self.state
            .functions
            .iter_mut()
            .find(|f| f.devfn == devfn)
            .map(|f| (f, offset))
    }
}

impl Device for PciHost {
    fn name(&self) -> &'static str {
        "pci"
    }

    fn read(&mut self, _ctx: &mut IoCtx, addr: u64, data: &mut [u8]) {
        data.fill(0xff);
        let port = addr as u16;
        match port {
            CONFIG_ADDRESS if data.len() == 4 => {
                data.copy_from_slice(&self.state.address.to_le_bytes());
            }
            super::reset::PORT_CF9 if data.len() == 1 => data[0] = self.state.reset_control.read(),
            CONFIG_DATA..=0xcff => {
                let byte = usize::from(port - CONFIG_DATA);
                if let Some((f, offset)) = self.selected() {
                    f.read(offset + byte, data);
                }
            }
            _ => {}
        }
    }

    fn write(&mut self, ctx: &mut IoCtx, addr: u64, data: &[u8]) {
        let port = addr as u16;
        match port {
            CONFIG_ADDRESS if data.len() == 4 => {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                // Bits 30:24 are reserved and bits 1:0 must read back as zero.
                self.state.address = v & 0x80ff_fffc;
            }
            super::reset::PORT_CF9 if data.len() == 1 => {
                self.state.reset_control.write(ctx.stop, data[0]);
            }
            CONFIG_DATA..=0xcff => {
                let byte = usize::from(port - CONFIG_DATA);
                if let Some((f, offset)) = self.selected() {
                    f.write(offset + byte, data);
                }
            }
            _ => {}
        }
    }

    fn save(&self) -> DeviceState {
        DeviceState::Pci(Box::new(self.state.clone()))
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        let DeviceState::Pci(s) = state else {
            return Err(DeviceError::WrongState {
                device: "pci",
                found: state.kind(),
            });
        };
        let mine: Vec<u8> = self.state.functions.iter().map(|f| f.devfn).collect();
        let theirs: Vec<u8> = s.functions.iter().map(|f| f.devfn).collect();
        if mine != theirs || s.functions.iter().any(|f| f.config.len() != CONFIG_SIZE) {
            return Err(DeviceError::InvalidState {
                device: "pci",
                detail: format!(
                    "saved functions {theirs:?} (or their config sizes) do not match {mine:?}"
                ),
            });
        }
        for (f, saved) in self.state.functions.iter_mut().zip(&s.functions) {
            f.config.clone_from(&saved.config);
        }
        self.state.address = s.address;
        self.state.reset_control = s.reset_control;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::StopRequest;
    use crate::devices::scripted_host::Rig;

    fn addr(dev: u32, func: u32, reg: u32) -> u32 {
        ADDRESS_ENABLE | dev << 11 | func << 8 | reg
    }

    fn cfg_read(p: &mut PciHost, rig: &mut Rig, address: u32, port_off: u16, len: usize) -> u32 {
        p.write(&mut rig.ctx(), 0xcf8, &address.to_le_bytes());
        let mut b = [0u8; 4];
        p.read(&mut rig.ctx(), u64::from(0xcfc + port_off), &mut b[..len]);
        u32::from_le_bytes(b)
    }

    fn cfg_write(p: &mut PciHost, rig: &mut Rig, address: u32, port_off: u16, v: u32, len: usize) {
        p.write(&mut rig.ctx(), 0xcf8, &address.to_le_bytes());
        p.write(
            &mut rig.ctx(),
            u64::from(0xcfc + port_off),
            &v.to_le_bytes()[..len],
        );
    }

    #[test]
    fn identification_reads_at_every_width() {
        let mut rig = Rig::new(4 << 20);
        let mut p = PciHost::new();
        // (device, function, register, port offset, width, expected)
        let cases: &[(u32, u32, u32, u16, usize, u32)] = &[
            (0, 0, 0x00, 0, 4, 0x1237_8086),
            (0, 0, 0x00, 0, 2, 0x8086),
            (0, 0, 0x00, 2, 2, 0x1237),
            (0, 0, 0x00, 1, 1, 0x80),
            (0, 0, 0x00, 3, 1, 0x12),
            (0, 0, 0x08, 0, 4, 0x0600_0002),
            (0, 0, 0x0c, 2, 1, 0x00),
            (0, 0, 0x70, 2, 1, 0x02),
            (1, 0, 0x00, 0, 4, 0x7000_8086),
            (1, 0, 0x08, 0, 4, 0x0601_0000),
            (1, 0, 0x0c, 2, 1, 0x80),
            (1, 0, 0x60, 0, 4, 0x8080_8080),
            (1, 0, 0x04, 0, 4, 0x0200_0007),
            // absent functions and devices
            (1, 1, 0x00, 0, 4, 0xffff_ffff),
            (2, 0, 0x00, 0, 4, 0xffff_ffff),
            (31, 7, 0x00, 0, 2, 0xffff),
        ];
        for &(d, f, r, off, len, want) in cases {
            assert_eq!(
                cfg_read(&mut p, &mut rig, addr(d, f, r), off, len),
                want,
                "{d:02x}.{f} reg {r:#x}+{off} width {len}"
            );
        }
        // Bus 1 and a disabled address decode nothing.
        assert_eq!(
            cfg_read(&mut p, &mut rig, addr(0, 0, 0) | 1 << 16, 0, 4),
            !0
        );
        assert_eq!(cfg_read(&mut p, &mut rig, 0x0000_0000, 0, 4), !0);
    }

    #[test]
    fn address_register_only_answers_dwords() {
        let mut rig = Rig::new(4 << 20);
        let mut p = PciHost::new();
        p.write(&mut rig.ctx(), 0xcf8, &0xffff_ffffu32.to_le_bytes());
        let mut b = [0u8; 4];
        p.read(&mut rig.ctx(), 0xcf8, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x80ff_fffc);
        // Word writes to 0xcf8 are ignored; word reads see all ones.
        p.write(&mut rig.ctx(), 0xcf8, &[0, 0]);
        let mut w = [0u8; 2];
        p.read(&mut rig.ctx(), 0xcf8, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        p.read(&mut rig.ctx(), 0xcf8, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x80ff_fffc);
    }

    #[test]
    fn writes_follow_the_masks() {
        let mut rig = Rig::new(4 << 20);
        let mut p = PciHost::new();
        // (device, register, port offset, width, value written, dword read back at register)
        let cases: &[(u32, u32, u16, usize, u32, u32)] = &[
            // vendor/device ID are read-only
            (0, 0x00, 0, 4, 0xdead_beef, 0x1237_8086),
            // command: only the defined bits stick
            (0, 0x04, 0, 2, 0xffff, 0x0000_0547),
            // class/revision read-only
            (0, 0x08, 0, 4, 0xffff_ffff, 0x0600_0002),
            // latency timer writable, header type read-only
            (0, 0x0c, 1, 1, 0x40, 0x0000_4000),
            (0, 0x0c, 2, 1, 0x00, 0x0000_4000),
            // BAR space read-only (no BARs)
            (0, 0x10, 0, 4, 0xffff_ffff, 0),
            // PAM registers 0x59..0x5f writable at byte and word widths
            (0, 0x58, 1, 1, 0x30, 0x0000_3000),
            (0, 0x58, 2, 2, 0x3333, 0x3333_3000),
            (0, 0x5c, 0, 4, 0x1122_3311, 0x1122_3311),
            // PIRQ route registers
            (1, 0x60, 0, 1, 0x0b, 0x8080_800b),
            (1, 0x60, 2, 2, 0x0a05, 0x0a05_800b),
            // interrupt line
            (1, 0x3c, 0, 1, 0x0e, 0x0000_000e),
        ];
        for &(d, r, off, len, v, want) in cases {
            cfg_write(&mut p, &mut rig, addr(d, 0, r), off, v, len);
            assert_eq!(
                cfg_read(&mut p, &mut rig, addr(d, 0, r), 0, 4),
                want,
                "{d:02x}.0 reg {r:#x}+{off} width {len} value {v:#x}"
            );
        }
        let isa = p.function(1 << 3).unwrap();
        assert_eq!(isa.pirq_route(0), Some(0x0b));
        assert_eq!(isa.pirq_route(1), None);
        assert_eq!(isa.pirq_route(2), Some(0x05));
        assert_eq!(isa.pirq_route(3), Some(0x0a));
    }

    #[test]
    fn status_error_bits_are_write_one_to_clear() {
        let mut p = PciFunction::i440fx();
        p.config[STATUS + 1] = 0xfa;
        p.write(STATUS, &[0xff, 0x08]);
        assert_eq!(p.config[STATUS + 1], 0xf2, "bit 11 cleared, DEVSEL kept");
        p.write(STATUS, &[0x00, 0xf0]);
        assert_eq!(p.config[STATUS + 1], 0x02);
    }

    #[test]
    fn port_cf9_resets_and_does_not_disturb_the_address() {
        let mut rig = Rig::new(4 << 20);
        let mut p = PciHost::new();
        p.write(&mut rig.ctx(), 0xcf8, &addr(0, 0, 0).to_le_bytes());
        p.write(&mut rig.ctx(), 0xcf9, &[0x02]);
        let mut b = [0u8];
        p.read(&mut rig.ctx(), 0xcf9, &mut b);
        assert_eq!(b[0], 0x02);
        assert_eq!(rig.stop, None);
        assert_eq!(cfg_read(&mut p, &mut rig, addr(0, 0, 0), 0, 2), 0x8086);
        p.write(&mut rig.ctx(), 0xcf9, &[0x06]);
        assert_eq!(
            rig.stop,
            Some(StopRequest::Reset {
                source: "port 0xcf9 (hard reset)"
            })
        );
    }

    #[test]
    fn save_restore_round_trip() {
        let mut rig = Rig::new(4 << 20);
        let mut p = PciHost::new();
        cfg_write(&mut p, &mut rig, addr(0, 0, 0x58), 1, 0x10, 1);
        cfg_write(&mut p, &mut rig, addr(1, 0, 0x60), 0, 0x09, 1);
        p.write(&mut rig.ctx(), 0xcf9, &[0x02]);
        p.write(&mut rig.ctx(), 0xcf8, &addr(1, 0, 0x08).to_le_bytes());
        let saved = p.save();
        let mut q = PciHost::new();
        q.restore(&saved).unwrap();
        assert_eq!(q.save(), saved);
        // The restored masks still apply and the restored address still selects.
        let mut b = [0u8; 4];
        q.read(&mut rig.ctx(), 0xcfc, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0601_0000);
        cfg_write(&mut q, &mut rig, addr(0, 0, 0), 0, 0, 4);
        assert_eq!(cfg_read(&mut q, &mut rig, addr(0, 0, 0), 0, 4), 0x1237_8086);
        assert!(q.restore(&DeviceState::DebugExit).is_err());
        let DeviceState::Pci(mut bad) = saved else {
            unreachable!()
        };
        bad.functions.pop();
        assert!(q.restore(&DeviceState::Pci(bad)).is_err());
    }
}
