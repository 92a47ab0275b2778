//! Devices of the deja-pc machine. Each is a plain state machine over guest accesses and
//! [`Host`](crate::Host) answers, with an explicit serializable state; none knows which
//! engine runs the guest.

pub mod acpi;
pub mod debug_exit;
pub mod fw_cfg;
pub mod i8042;
pub mod ioapic;
pub mod lapic;
pub mod pc_irqchip;
pub mod pci;
pub mod pic;
pub mod pit;
pub mod post;
pub mod reset;
pub mod rtc;
#[cfg(test)]
pub(crate) mod scripted_host;
pub mod serial;
#[cfg(test)]
pub(crate) mod testutil;

use crate::host::{Host, Position};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::GuestMemoryMmap;

/// Something a device asks of the whole machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopRequest {
    /// isa-debug-exit was written `value`; the run ends with status `(value << 1) | 1`.
    DebugExit {
        /// The byte (or word) written.
        value: u32,
    },
    /// A reset was requested (i8042 pulse, port 0x92, 0xcf9).
    Reset {
        /// Which device asked.
        source: &'static str,
    },
    /// The guest powered the machine off (ACPI, or QEMU's shutdown ports).
    PowerOff,
}

impl StopRequest {
    /// The process exit status this request maps to, as QEMU's isa-debug-exit defines it.
    pub fn exit_status(&self) -> Option<u32> {
        match self {
            StopRequest::DebugExit { value } => Some((value << 1) | 1),
            _ => None,
        }
    }
}

/// Interrupt request lines into the interrupt controllers.
pub trait InterruptLines {
    /// Drives ISA/GSI line `line` to `level`. Edge-triggered inputs latch rising edges.
    fn set_irq(&mut self, line: u32, level: bool);
}

/// Interrupt lines that go nowhere (for the interrupt controllers' own register accesses).
#[derive(Debug, Default)]
pub struct NoInterruptLines;

impl InterruptLines for NoInterruptLines {
    fn set_irq(&mut self, _line: u32, _level: bool) {}
}

/// What a device may use while it handles an access or a poll.
pub struct IoCtx<'a> {
    /// The only source of time, input and entropy.
    pub host: &'a mut dyn Host,
    /// Where the guest is; pass it to every [`Host`] call.
    pub pos: Position,
    /// Guest memory, for devices that do DMA (fw_cfg).
    pub mem: &'a GuestMemoryMmap,
    /// Interrupt lines.
    pub irq: &'a mut dyn InterruptLines,
    /// Set to ask the machine to stop.
    pub stop: &'a mut Option<StopRequest>,
    /// Guest time read during this access, so one access or poll reads the clock once.
    pub now_cache: Option<u64>,
}

impl IoCtx<'_> {
    /// Guest time in nanoseconds, read from the host at most once per access or poll.
    pub fn now(&mut self) -> u64 {
        match self.now_cache {
            Some(t) => t,
            None => {
                let t = self.host.time_ns(self.pos);
                self.now_cache = Some(t);
                t
            }
        }
    }
}

/// The interrupt controller complex (8259A pair now; local APIC and IOAPIC later): a device
/// that is also the sink of every interrupt line and the source of the CPU's INTR.
pub trait Irqchip: Device + InterruptLines {
    /// Whether an external interrupt is being signalled to the CPU (INTR asserted).
    fn interrupt_pending(&self) -> bool;
    /// The CPU's interrupt acknowledge cycle: the vector to deliver (spurious if nothing is
    /// pending any more, as the hardware does).
    fn acknowledge(&mut self) -> u8;
}

/// Errors restoring device state.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// A snapshot of one kind of device was offered to another.
    #[error("cannot restore {device} from a snapshot of a different device ({found})")]
    WrongState {
        /// The device being restored.
        device: &'static str,
        /// What the snapshot holds.
        found: String,
    },
    /// The snapshot's values are impossible for the device.
    #[error("invalid state for {device}: {detail}")]
    InvalidState {
        /// The device being restored.
        device: &'static str,
        /// What is wrong.
        detail: String,
    },
}

/// A device's complete state, one variant per kind of device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    /// POST port 0x80.
    Post(post::PostState),
    /// isa-debug-exit.
    DebugExit,
    /// System control port A (0x92).
    Port92(reset::Port92State),
    /// PCI configuration mechanism #1 with the i440FX host bridge and PIIX3 ISA bridge.
    Pci(Box<pci::PciState>),
    /// QEMU's firmware configuration interface.
    FwCfg(fw_cfg::FwCfgState),
    /// ACPI PM1 event/control blocks and PM timer.
    AcpiPm(acpi::AcpiPmState),
    /// Local APIC.
    Lapic(Box<lapic::LapicState>),
    /// I/O APIC.
    Ioapic(Box<ioapic::IoapicState>),
    /// The 8259A pair and ELCR.
    Pic(pic::PicState),
    /// The 8254 PIT and port 0x61.
    Pit(pit::PitState),
    /// The MC146818 RTC and CMOS memory.
    Rtc(rtc::RtcState),
    /// A 16550A UART.
    Serial(serial::SerialState),
    /// The i8042 keyboard controller.
    I8042(i8042::I8042State),
    /// The PIC, I/O APIC and local APIC together.
    PcIrqchip(Box<pc_irqchip::PcIrqchipState>),
}

impl DeviceState {
    /// The variant's name, for error messages.
    pub fn kind(&self) -> String {
        format!("{self:?}")
            .split(['(', ' '])
            .next()
            .unwrap_or("?")
            .to_string()
    }
}

/// A device on the port or MMIO bus.
pub trait Device: Send {
    /// Short name for statistics and messages (`serial`, `pit`, ...).
    fn name(&self) -> &'static str;
    /// A guest read of `data.len()` bytes at absolute port or physical address `addr`
    /// (absolute, because one device may sit at several ranges, as the PIT at 0x40 and 0x61).
    fn read(&mut self, ctx: &mut IoCtx, addr: u64, data: &mut [u8]);
    /// A guest write of `data` at absolute port or physical address `addr`.
    fn write(&mut self, ctx: &mut IoCtx, addr: u64, data: &[u8]);
    /// Brings the device up to the present: expire timers, take input, raise interrupts.
    fn poll(&mut self, _ctx: &mut IoCtx) {}
    /// Guest time (ns) at which [`Device::poll`] next has work, if any.
    fn next_deadline(&self) -> Option<u64> {
        None
    }
    /// Whether external input could wake the device (so an idle guest waits for it).
    fn wants_input(&self) -> bool {
        false
    }
    /// The device's complete state.
    fn save(&self) -> DeviceState;
    /// Replaces the device's state.
    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError>;
    /// Adds the device's own counters (bytes transmitted, interrupts raised, ...) to the
    /// machine's statistics, named `<device>.<counter>`. They describe the run for people
    /// and benchmarks; they are not guest state and are not saved.
    fn add_stats(&self, _stats: &mut crate::cpu::EngineStats) {}
}
