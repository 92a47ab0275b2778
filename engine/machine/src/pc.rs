//! The deja-pc machine: a [`Machine`] with the legacy PC devices at QEMU's `pc` addresses,
//! so that test kernels written for QEMU find what they expect.
//!
//! | device | ports | IRQ |
//! |---|---|---|
//! | 8259A pair (the irqchip) | 0x20-0x21, 0xa0-0xa1, ELCR 0x4d0-0x4d1 | |
//! | 8254 PIT + port B | 0x40-0x43, 0x61 | 0 |
//! | i8042 | 0x60, 0x64 | 1 |
//! | CMOS RTC | 0x70-0x71 | 8 |
//! | POST | 0x80 | |
//! | isa-debug-exit | 0xf4 | |
//! | COM1 16550A | 0x3f8-0x3ff | 4 |

use crate::devices::debug_exit::DebugExit;
use crate::devices::i8042::I8042;
use crate::devices::pic::{ELCR_BASE, MASTER_BASE, Pic, SLAVE_BASE};
use crate::devices::pit::{PIT_BASE, PORT_B, Pit};
use crate::devices::post::PostPort;
use crate::devices::rtc::Rtc;
use crate::devices::serial::{COM1_BASE, Serial};
use crate::devices::{DeviceState, i8042, rtc};
use crate::host::Host;
use crate::machine::{Machine, MachineConfig, MachineError};
use std::io::Write;

/// The POST diagnostic port.
pub const POST_PORT: u16 = 0x80;
/// QEMU's default isa-debug-exit port.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// Builds the deja-pc machine: memory for `config`, the 8259A pair as interrupt controller,
/// and the PIT, RTC, COM1, i8042, POST port and isa-debug-exit. COM1's output goes to
/// `serial_out` (stdout, a file, a buffer).
pub fn build_pc(
    config: MachineConfig,
    host: Box<dyn Host>,
    serial_out: Box<dyn Write + Send>,
) -> Result<Machine, MachineError> {
    let mut m = Machine::new(config, host, Box::new(Pic::new()))?;
    m.map_irqchip(&[(MASTER_BASE, 2), (SLAVE_BASE, 2), (ELCR_BASE, 2)], &[])?;
    m.add_device(Box::new(Pit::new()), &[(PIT_BASE, 4), (PORT_B, 1)], &[])?;
    m.add_device(
        Box::new(I8042::new()),
        &[(i8042::DATA_PORT, 1), (i8042::COMMAND_PORT, 1)],
        &[],
    )?;
    let rtc = Rtc::new(&m.layout);
    m.add_device(Box::new(rtc), &[(rtc::RTC_BASE, 2)], &[])?;
    m.add_device(Box::<PostPort>::default(), &[(POST_PORT, 1)], &[])?;
    m.add_device(Box::new(DebugExit), &[(DEBUG_EXIT_PORT, 1)], &[])?;
    m.add_device(Box::new(Serial::new(serial_out)), &[(COM1_BASE, 8)], &[])?;
    Ok(m)
}

/// The POST codes the guest wrote, oldest first (empty if the machine has no POST port).
pub fn post_codes(machine: &Machine) -> Vec<u8> {
    match machine.device("post").map(|d| d.save()) {
        Some(DeviceState::Post(p)) => p.history,
        _ => Vec::new(),
    }
}

/// Bytes the guest transmitted on COM1 (0 if the machine has no serial port).
pub fn serial_bytes_written(machine: &Machine) -> u64 {
    match machine.device("serial").map(|d| d.save()) {
        Some(DeviceState::Serial(s)) => s.tx_bytes,
        _ => 0,
    }
}
