//! QEMU's `pc-testdev`, the ISA device kvm-unit-tests and other QEMU-targeted test kernels
//! poke to check emulation paths. deja models it from QEMU's behaviour (hw/misc/pc-testdev.c),
//! as a plain state machine:
//!
//! | where | width | what |
//! |---|---|---|
//! | port 0xe0-0xe3 | 1, 2, 4 (aligned) | a 32-bit scratch register, byte `port & 3` at each port |
//! | port 0xe4 | 4 | "flush page": a write names a guest page; reads 0 |
//! | port 0xe8-0xeb | 1, 2, 4 (aligned) | the same scratch register, accessed byte by byte |
//! | port 0x2000-0x2017 | 1 | a write of `v` drives ISA IRQ line `port - 0x2000` to `v != 0`; reads 0 |
//! | MMIO 0xff000000, 64 KiB | any | plain memory behind MMIO exits (emulated-access tests) |
//!
//! The flush port exists in QEMU to make KVM drop its mapping of a guest page (QEMU
//! `mprotect`s the host page away and back); the page's contents do not change, so nothing
//! the guest can observe changes either. deja has no host mapping to drop (bt's translations
//! are of unchanged bytes, kvm's slot keeps them), so a flush only counts in the statistics.
//!
//! QEMU's device has no reset handler: the scratch register and the memory window keep their
//! contents across a machine reset, and deja's does too ([`Device::survives_reset`]).

use super::{Device, DeviceError, DeviceState, IoCtx};
use serde::{Deserialize, Serialize};

/// The device's name and snapshot key, as `--device` spells it.
pub const NAME: &str = "pc-testdev";
/// The scratch register's word-access port.
pub const SCRATCH_PORT: u16 = 0xe0;
/// The flush-page port.
pub const FLUSH_PORT: u16 = 0xe4;
/// The scratch register's byte-access port (QEMU splits every access there into bytes,
/// which reads and writes the same bytes as an access at [`SCRATCH_PORT`]).
pub const SCRATCH_BYTE_PORT: u16 = 0xe8;
/// The first IRQ-line port: port `IRQ_PORT + n` drives ISA line `n`.
pub const IRQ_PORT: u16 = 0x2000;
/// Ports in the IRQ-line range (QEMU maps 24 although an ISA bus has 16 lines).
pub const IRQ_PORTS: u16 = 24;
/// ISA interrupt lines: the ports beyond them (0x2010-0x2017) name lines QEMU does not have
/// (QEMU aborts on such a write); deja ignores those writes.
pub const ISA_LINES: u16 = 16;
/// The memory window's guest-physical base.
pub const IOMEM_BASE: u64 = 0xff00_0000;
/// The memory window's length.
pub const IOMEM_LEN: u64 = 0x1_0000;

/// The port ranges `(start, len)` the device answers.
pub const PIO_RANGES: [(u16, u16); 4] = [
    (SCRATCH_PORT, 4),
    (FLUSH_PORT, 4),
    (SCRATCH_BYTE_PORT, 4),
    (IRQ_PORT, IRQ_PORTS),
];
/// The MMIO range `(start, len)` the device answers.
pub const MMIO_RANGE: (u64, u64) = (IOMEM_BASE, IOMEM_LEN);

/// Saved state of the pc-testdev: everything the guest can read back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PcTestdevState {
    /// The scratch register behind ports 0xe0 and 0xe8.
    pub scratch: u32,
    /// The memory window's contents ([`IOMEM_LEN`] bytes).
    pub iomem: Vec<u8>,
}

impl Default for PcTestdevState {
    fn default() -> Self {
        Self {
            scratch: 0,
            iomem: vec![0; IOMEM_LEN as usize],
        }
    }
}

/// The pc-testdev device.
#[derive(Debug, Default)]
pub struct PcTestdev {
    state: PcTestdevState,
    /// Flush-page writes (statistics only: not guest state).
    flushes: u64,
    /// IRQ-line writes that changed nothing because they were malformed or named a line
    /// beyond the ISA bus (statistics only).
    ignored: u64,
}

impl PcTestdev {
    /// A device at power-on: scratch register and memory window zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a port access of `len` bytes at `offset` into a 4-byte register is one QEMU
    /// accepts: 1, 2 or 4 bytes, naturally aligned.
    fn aligned(offset: u16, len: usize) -> bool {
        matches!(len, 1 | 2 | 4) && usize::from(offset) % len == 0
    }

    fn read_port(&mut self, port: u16, data: &mut [u8]) {
        match port {
            SCRATCH_PORT..=0xe3 | SCRATCH_BYTE_PORT..=0xeb => {
                let offset = port & 3;
                if !Self::aligned(offset, data.len()) {
                    data.fill(0xff);
                    return;
                }
                let bytes = self.state.scratch.to_le_bytes();
                let at = usize::from(offset);
                data.copy_from_slice(&bytes[at..at + data.len()]);
            }
            FLUSH_PORT if data.len() == 4 => data.fill(0),
            p if (IRQ_PORT..IRQ_PORT + IRQ_PORTS).contains(&p) && data.len() == 1 => data[0] = 0,
            // Widths QEMU rejects: the access decodes nothing.
            _ => data.fill(0xff),
        }
    }

    fn write_port(&mut self, ctx: &mut IoCtx, port: u16, data: &[u8]) {
        match port {
            SCRATCH_PORT..=0xe3 | SCRATCH_BYTE_PORT..=0xeb => {
                let offset = port & 3;
                if !Self::aligned(offset, data.len()) {
                    return;
                }
                let mut bytes = self.state.scratch.to_le_bytes();
                let at = usize::from(offset);
                bytes[at..at + data.len()].copy_from_slice(data);
                self.state.scratch = u32::from_le_bytes(bytes);
            }
            FLUSH_PORT if data.len() == 4 => self.flushes += 1,
            p if (IRQ_PORT..IRQ_PORT + ISA_LINES).contains(&p) && data.len() == 1 => {
                ctx.irq.set_irq(u32::from(p - IRQ_PORT), data[0] != 0);
            }
            p if (IRQ_PORT..IRQ_PORT + IRQ_PORTS).contains(&p) => self.ignored += 1,
            _ => {}
        }
    }

    /// The window bytes an MMIO access of `len` bytes at `addr` covers (clipped to the
    /// window; a bus hit guarantees `addr` is inside it).
    fn window(addr: u64, len: usize) -> std::ops::Range<usize> {
        let start = addr.saturating_sub(IOMEM_BASE).min(IOMEM_LEN) as usize;
        let end = (start + len).min(IOMEM_LEN as usize);
        start..end
    }
}

impl Device for PcTestdev {
    fn name(&self) -> &'static str {
        NAME
    }

    fn read(&mut self, _ctx: &mut IoCtx, addr: u64, data: &mut [u8]) {
        if addr >= IOMEM_BASE {
            // Little-endian memory: byte i of the access is byte addr + i of the window.
            // Bytes past the window's end decode nothing.
            data.fill(0xff);
            let r = Self::window(addr, data.len());
            let n = r.len();
            data[..n].copy_from_slice(&self.state.iomem[r]);
        } else {
            self.read_port(addr as u16, data);
        }
    }

    fn write(&mut self, ctx: &mut IoCtx, addr: u64, data: &[u8]) {
        if addr >= IOMEM_BASE {
            let r = Self::window(addr, data.len());
            let n = r.len();
            self.state.iomem[r].copy_from_slice(&data[..n]);
        } else {
            self.write_port(ctx, addr as u16, data);
        }
    }

    fn survives_reset(&self) -> bool {
        true
    }

    fn digest(&self, hasher: &mut blake3::Hasher) {
        // Everything is observable; hashing the window directly spares encoding 64 KiB.
        hasher.update(&self.state.scratch.to_le_bytes());
        hasher.update(&self.state.iomem);
    }

    fn save(&self) -> DeviceState {
        DeviceState::PcTestdev(Box::new(self.state.clone()))
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        let DeviceState::PcTestdev(s) = state else {
            return Err(DeviceError::WrongState {
                device: NAME,
                found: state.kind(),
            });
        };
        if s.iomem.len() as u64 != IOMEM_LEN {
            return Err(DeviceError::InvalidState {
                device: NAME,
                detail: format!(
                    "the memory window holds {} bytes, not {IOMEM_LEN}",
                    s.iomem.len()
                ),
            });
        }
        self.state.clone_from(s);
        Ok(())
    }

    fn add_stats(&self, stats: &mut crate::cpu::EngineStats) {
        stats.add("pc-testdev.flushes", self.flushes);
        stats.add("pc-testdev.ignored_irq_writes", self.ignored);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::scripted_host::Rig;

    fn port_read(d: &mut PcTestdev, rig: &mut Rig, port: u16, len: usize) -> u64 {
        let mut b = [0u8; 8];
        d.read(&mut rig.ctx(), u64::from(port), &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn port_write(d: &mut PcTestdev, rig: &mut Rig, port: u16, v: u64, len: usize) {
        d.write(&mut rig.ctx(), u64::from(port), &v.to_le_bytes()[..len]);
    }

    #[test]
    fn scratch_register_at_every_port_and_width() {
        let mut rig = Rig::new(4 << 20);
        let mut d = PcTestdev::new();
        // (port written, width, value, port read, width, expected, scratch afterwards)
        let cases: &[(u16, usize, u64, u16, usize, u64, u32)] = &[
            (0xe0, 4, 0x1234_5678, 0xe0, 4, 0x1234_5678, 0x1234_5678),
            (0xe0, 4, 0x1234_5678, 0xe8, 4, 0x1234_5678, 0x1234_5678),
            (0xe1, 1, 0xab, 0xe0, 4, 0x1234_ab78, 0x1234_ab78),
            (0xe2, 2, 0xcdef, 0xe2, 2, 0xcdef, 0xcdef_ab78),
            (0xe3, 1, 0x01, 0xe3, 1, 0x01, 0x01ef_ab78),
            (0xe8, 1, 0x55, 0xe0, 1, 0x55, 0x01ef_ab55),
            (0xea, 2, 0x0000, 0xe8, 4, 0x0000_ab55, 0x0000_ab55),
            (0xe9, 1, 0xff, 0xe9, 1, 0xff, 0x0000_ff55),
            (0xe8, 4, 0xdead_beef, 0xe0, 2, 0xbeef, 0xdead_beef),
            (0xe0, 2, 0x0102, 0xea, 2, 0xdead, 0xdead_0102),
            // Unaligned accesses are rejected as QEMU rejects them: nothing changes, reads
            // decode nothing.
            (0xe1, 2, 0x7777, 0xe1, 2, 0xffff, 0xdead_0102),
            (0xe2, 4, 0x7777_7777, 0xe2, 4, 0xffff_ffff, 0xdead_0102),
            (0xeb, 2, 0x7777, 0xe8, 4, 0xdead_0102, 0xdead_0102),
        ];
        for (i, &(wp, wl, v, rp, rl, want, scratch)) in cases.iter().enumerate() {
            port_write(&mut d, &mut rig, wp, v, wl);
            assert_eq!(port_read(&mut d, &mut rig, rp, rl), want, "case {i}");
            assert_eq!(d.state.scratch, scratch, "case {i}");
        }
    }

    #[test]
    fn flush_port_reads_zero_and_changes_nothing() {
        let mut rig = Rig::new(4 << 20);
        let mut d = PcTestdev::new();
        port_write(&mut d, &mut rig, 0xe0, 0x1111_2222, 4);
        let before = d.save();
        port_write(&mut d, &mut rig, FLUSH_PORT, 0x0010_0000, 4);
        port_write(&mut d, &mut rig, FLUSH_PORT, 0x0010_0000, 2); // not a dword: ignored
        assert_eq!(d.save(), before);
        assert_eq!(d.flushes, 1);
        assert_eq!(port_read(&mut d, &mut rig, FLUSH_PORT, 4), 0);
        assert_eq!(port_read(&mut d, &mut rig, FLUSH_PORT, 1), 0xff);
        assert!(rig.lines.changes.is_empty());
    }

    #[test]
    fn irq_ports_drive_isa_lines() {
        let mut rig = Rig::new(4 << 20);
        let mut d = PcTestdev::new();
        // (port, width, value, the line change it makes)
        type Case = (u16, usize, u64, Option<(u32, bool)>);
        let cases: &[Case] = &[
            (0x2000, 1, 1, Some((0, true))),
            (0x2000, 1, 0, Some((0, false))),
            (0x200e, 1, 0x80, Some((14, true))),
            (0x200e, 1, 0, Some((14, false))),
            (0x200f, 1, 0xff, Some((15, true))),
            (0x2004, 1, 2, Some((4, true))),
            // Wider writes and the lines past the ISA bus are ignored.
            (0x2003, 2, 1, None),
            (0x2008, 4, 1, None),
            (0x2010, 1, 1, None),
            (0x2017, 1, 1, None),
        ];
        for (i, &(port, len, v, change)) in cases.iter().enumerate() {
            let before = rig.lines.changes.len();
            port_write(&mut d, &mut rig, port, v, len);
            assert_eq!(rig.lines.changes.get(before).copied(), change, "case {i}");
            assert_eq!(
                rig.lines.changes.len(),
                before + usize::from(change.is_some())
            );
        }
        assert!(!rig.lines.level(14) && rig.lines.level(15) && rig.lines.level(4));
        assert_eq!(d.ignored, 4);
        assert_eq!(port_read(&mut d, &mut rig, 0x200f, 1), 0, "lines read as 0");
        assert_eq!(port_read(&mut d, &mut rig, 0x200f, 2), 0xffff);
    }

    #[test]
    fn memory_window_round_trips_every_width() {
        let mut rig = Rig::new(4 << 20);
        let mut d = PcTestdev::new();
        let patterns: [u64; 4] = [
            0x0123_4567_89ab_cdef,
            0xfedc_ba98_7654_3210,
            u64::MAX,
            0x8000_0000_0000_0001,
        ];
        for (len, offset) in [
            (1usize, 0u64),
            (2, 2),
            (4, 4),
            (8, 8),
            (8, 0x7),
            (4, 0xfffc),
        ] {
            for v in patterns {
                let addr = IOMEM_BASE + offset;
                d.write(&mut rig.ctx(), addr, &v.to_le_bytes()[..len]);
                let mut b = [0u8; 8];
                d.read(&mut rig.ctx(), addr, &mut b[..len]);
                let mask = if len == 8 {
                    u64::MAX
                } else {
                    (1u64 << (8 * len)) - 1
                };
                assert_eq!(u64::from_le_bytes(b), v & mask, "{len} bytes at {addr:#x}");
            }
        }
        // Little endian: a dword then its bytes and its words.
        d.write(
            &mut rig.ctx(),
            IOMEM_BASE + 0x100,
            &0xa1b2_c3d4u32.to_le_bytes(),
        );
        let mut b = [0u8; 1];
        d.read(&mut rig.ctx(), IOMEM_BASE + 0x101, &mut b);
        assert_eq!(b[0], 0xc3);
        let mut w = [0u8; 2];
        d.read(&mut rig.ctx(), IOMEM_BASE + 0x102, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0xa1b2);
        // An access running off the end keeps the bytes inside and decodes nothing past it.
        d.write(&mut rig.ctx(), IOMEM_BASE + 0xfffe, &[1, 2, 3, 4]);
        let mut q = [0u8; 4];
        d.read(&mut rig.ctx(), IOMEM_BASE + 0xfffe, &mut q);
        assert_eq!(q, [1, 2, 0xff, 0xff]);
    }

    #[test]
    fn save_restore_and_digest_cover_register_and_window() {
        let mut rig = Rig::new(4 << 20);
        let mut d = PcTestdev::new();
        port_write(&mut d, &mut rig, 0xe0, 0x4242_4242, 4);
        d.write(&mut rig.ctx(), IOMEM_BASE + 0x10, &[9, 8, 7]);
        let saved = d.save();
        let mut e = PcTestdev::new();
        let digest = |d: &PcTestdev| {
            let mut h = blake3::Hasher::new();
            d.digest(&mut h);
            h.finalize()
        };
        assert_ne!(digest(&d), digest(&e));
        e.restore(&saved).unwrap();
        assert_eq!(e.save(), saved);
        assert_eq!(digest(&d), digest(&e));
        assert_eq!(port_read(&mut e, &mut rig, 0xe8, 4), 0x4242_4242);
        d.write(&mut rig.ctx(), IOMEM_BASE + 0xffff, &[1]);
        assert_ne!(digest(&d), digest(&e), "the last byte of the window counts");
        assert!(e.restore(&DeviceState::DebugExit).is_err());
        let short = DeviceState::PcTestdev(Box::new(PcTestdevState {
            scratch: 0,
            iomem: vec![0; 16],
        }));
        assert!(matches!(
            e.restore(&short),
            Err(DeviceError::InvalidState { .. })
        ));
        assert!(e.survives_reset());
    }
}
