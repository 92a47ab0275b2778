//! Reset and A20 controls outside the keyboard controller: System Control Port A (port
//! 0x92, "fast reset" and fast A20) and the PIIX3 reset control register (port 0xcf9).
//!
//! Port 0xcf9 shares the dword at 0xcf8 with the PCI configuration address register, so the
//! PCI host ([`super::pci`]) owns the port and forwards byte accesses to [`ResetControl`].

use super::{Device, DeviceError, DeviceState, IoCtx, StopRequest};
use serde::{Deserialize, Serialize};

/// The port of System Control Port A.
pub const PORT_92: u16 = 0x92;
/// Bit 0 of port 0x92: a rising edge resets the CPU.
pub const PORT92_FAST_RESET: u8 = 1 << 0;
/// Bit 1 of port 0x92: address line 20 enabled.
pub const PORT92_A20: u8 = 1 << 1;

/// Saved state of port 0x92.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port92State {
    /// The register as last written, without the self-clearing reset bit (QEMU's `outport`).
    pub outport: u8,
}

/// System Control Port A, as QEMU's `port92` device.
#[derive(Debug, Default)]
pub struct Port92 {
    state: Port92State,
}

impl Port92 {
    /// Whether the guest enabled A20 through this port. deja's memory does not mask A20, so
    /// this is informational (the keyboard controller's A20 line is the other source).
    pub fn a20_enabled(&self) -> bool {
        self.state.outport & PORT92_A20 != 0
    }
}

impl Device for Port92 {
    fn name(&self) -> &'static str {
        "port92"
    }

    fn read(&mut self, _ctx: &mut IoCtx, _addr: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.state.outport;
        }
    }

    fn write(&mut self, ctx: &mut IoCtx, _addr: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let old = self.state.outport;
        self.state.outport = value & !PORT92_FAST_RESET;
        // The reset is edge-triggered on bit 0; the stored value never holds bit 0, so every
        // write with bit 0 set is a rising edge, as in QEMU.
        if value & PORT92_FAST_RESET != 0 && old & PORT92_FAST_RESET == 0 {
            *ctx.stop = Some(StopRequest::Reset {
                source: "port 0x92",
            });
        }
    }

    fn save(&self) -> DeviceState {
        DeviceState::Port92(self.state)
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        match state {
            DeviceState::Port92(s) if s.outport & PORT92_FAST_RESET != 0 => {
                Err(DeviceError::InvalidState {
                    device: "port92",
                    detail: format!(
                        "outport {:#04x} holds the self-clearing reset bit",
                        s.outport
                    ),
                })
            }
            DeviceState::Port92(s) => {
                self.state = *s;
                Ok(())
            }
            other => Err(DeviceError::WrongState {
                device: "port92",
                found: other.kind(),
            }),
        }
    }
}

/// The reset control register's port.
pub const PORT_CF9: u16 = 0xcf9;
/// Bit 1 of 0xcf9: the next reset is a hard (full) reset rather than a CPU-only reset.
pub const RCR_SYSTEM_RESET: u8 = 1 << 1;
/// Bit 2 of 0xcf9: writing 1 starts the reset selected by bit 1.
pub const RCR_RESET_CPU: u8 = 1 << 2;

/// PIIX3 reset control register (port 0xcf9), as QEMU's `rcr_write`: any write with bit 2
/// set resets (bit 1 chooses hard or soft, both reset deja's single CPU); only bit 1 is
/// kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetControl {
    /// The stored register value (bit 1 only).
    pub value: u8,
}

impl ResetControl {
    /// A read of the register.
    pub fn read(&self) -> u8 {
        self.value
    }

    /// A write of the register; asks for a reset when bit 2 is set.
    pub fn write(&mut self, stop: &mut Option<StopRequest>, value: u8) {
        if value & RCR_RESET_CPU != 0 {
            let source = if value & RCR_SYSTEM_RESET != 0 {
                "port 0xcf9 (hard reset)"
            } else {
                "port 0xcf9 (soft reset)"
            };
            *stop = Some(StopRequest::Reset { source });
            return;
        }
        self.value = value & RCR_SYSTEM_RESET;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::scripted_host::Rig;

    #[test]
    fn port92_bits_behave_as_qemu() {
        // (written, read back afterwards, reset requested)
        let cases: &[(u8, u8, bool)] = &[
            (0x00, 0x00, false),
            (0x02, 0x02, false),
            (0x03, 0x02, true),
            (0x01, 0x00, true),
            (0xfe, 0xfe, false),
        ];
        for &(written, read_back, reset) in cases {
            let mut rig = Rig::new(4 << 20);
            let mut dev = Port92::default();
            dev.write(&mut rig.ctx(), 0x92, &[written]);
            let mut b = [0u8];
            dev.read(&mut rig.ctx(), 0x92, &mut b);
            assert_eq!(b[0], read_back, "write {written:#x}");
            assert_eq!(
                rig.stop,
                reset.then_some(StopRequest::Reset {
                    source: "port 0x92"
                }),
                "write {written:#x}"
            );
            assert_eq!(dev.a20_enabled(), written & 2 != 0);
        }
    }

    #[test]
    fn port92_save_restore_round_trips_and_rejects_others() {
        let mut rig = Rig::new(4 << 20);
        let mut dev = Port92::default();
        dev.write(&mut rig.ctx(), 0x92, &[0x02]);
        let saved = dev.save();
        let mut other = Port92::default();
        other.restore(&saved).unwrap();
        assert!(other.a20_enabled());
        assert_eq!(other.save(), saved);
        assert!(other.restore(&DeviceState::DebugExit).is_err());
        assert!(
            other
                .restore(&DeviceState::Port92(Port92State { outport: 1 }))
                .is_err()
        );
    }

    #[test]
    fn reset_control_register() {
        let cases: &[(u8, Option<&'static str>, u8)] = &[
            (0x02, None, 0x02),
            (0x00, None, 0x00),
            (0x06, Some("port 0xcf9 (hard reset)"), 0x00),
            (0x04, Some("port 0xcf9 (soft reset)"), 0x00),
            (0xf9, None, 0x00),
        ];
        for &(value, source, stored) in cases {
            let mut rcr = ResetControl::default();
            let mut stop = None;
            rcr.write(&mut stop, value);
            assert_eq!(stop, source.map(|source| StopRequest::Reset { source }));
            assert_eq!(rcr.read(), stored, "write {value:#x}");
        }
    }
}
