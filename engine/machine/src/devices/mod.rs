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
pub mod pc_testdev;
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
    /// The guest entered ACPI S3 (suspend-to-RAM): the machine resets with RAM kept and the
    /// CPU resumes at the FACS waking vector ([`acpi::resume_state`]).
    Suspend,
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
    /// Guest memory, for devices that do DMA (fw_cfg), with the CPU's ROM rules.
    pub mem: crate::memory::DmaMemory<'a>,
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

    // The rest are the local APIC's ties to the CPU (issue #6). The defaults describe a
    // controller without a local APIC: no MSRs, CR8 kept by the CPU, no NMI or INIT.

    /// Where the local APIC's xAPIC register page currently is (IA32_APIC_BASE; `None`
    /// while the APIC is disabled or in x2APIC mode). The machine decodes this page
    /// itself, ahead of its MMIO bus, because the guest can move it.
    fn mmio_window(&self) -> Option<(u64, u64)> {
        None
    }
    /// Whether the local APIC is globally enabled (IA32_APIC_BASE.EN), which CPUID.01H:EDX
    /// reports as the hardware does; `None` without a local APIC (CPUID says what the table
    /// says).
    fn apic_globally_enabled(&self) -> Option<bool> {
        None
    }
    /// Whether RDMSR/WRMSR of `msr` belongs to the interrupt controller (IA32_APIC_BASE,
    /// IA32_TSC_DEADLINE, the x2APIC registers) rather than to the CPU core.
    fn handles_msr(&self, _msr: u32) -> bool {
        false
    }
    /// RDMSR of an MSR [`Irqchip::handles_msr`] claims; `Err` means #GP(0).
    fn rdmsr(&mut self, _ctx: &mut IoCtx, msr: u32) -> Result<u64, MsrFault> {
        Err(MsrFault::not_handled(msr))
    }
    /// WRMSR of an MSR [`Irqchip::handles_msr`] claims; `tsc` says how the engine's RDTSC
    /// relates to guest time (for IA32_TSC_DEADLINE). `Err` means #GP(0).
    fn wrmsr(
        &mut self,
        _ctx: &mut IoCtx,
        msr: u32,
        _value: u64,
        _tsc: lapic::GuestTsc,
    ) -> Result<(), MsrFault> {
        Err(MsrFault::not_handled(msr))
    }
    /// The task priority as CR8 reads it, when the controller owns it (`None`: the CPU
    /// keeps CR8 itself).
    fn cr8(&self) -> Option<u64> {
        None
    }
    /// A MOV to CR8 (bits 3:0 already checked by the CPU).
    fn set_cr8(&mut self, _value: u64) {}
    /// Takes a pending NMI for the CPU (LVT LINT1, an NMI IPI, an I/O APIC NMI entry).
    fn take_nmi(&mut self) -> bool {
        false
    }
    /// Takes a pending INIT for the CPU (an INIT IPI to itself, an I/O APIC INIT entry).
    fn take_init(&mut self) -> bool {
        false
    }
    /// Whether an NMI or INIT waits for the CPU (without taking it): it wakes a halted CPU
    /// as INTR does.
    fn nmi_or_init_pending(&self) -> bool {
        false
    }
    /// Resets the local APIC as an INIT does (registers to their power-on values; the ID
    /// and IA32_APIC_BASE survive).
    fn init_reset(&mut self) {}
}

/// An MSR access the CPU must answer with #GP(0), and why.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("#GP(0) on MSR {msr:#x}: {why}")]
pub struct MsrFault {
    /// The MSR.
    pub msr: u32,
    /// Why it faults.
    pub why: String,
}

impl MsrFault {
    fn not_handled(msr: u32) -> Self {
        MsrFault {
            msr,
            why: "the interrupt controller has no such MSR".to_string(),
        }
    }
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
    /// QEMU's pc-testdev (only on machines built with `--device pc-testdev`). New variants
    /// go at the end: checkpoints store the variant index.
    PcTestdev(Box<pc_testdev::PcTestdevState>),
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
    /// Whether a machine reset leaves the device alone (the battery-backed CMOS RTC, whose
    /// NVRAM a guest may use to know it rebooted); every other device returns to its state
    /// at boot. Added for issue #6.
    fn survives_reset(&self) -> bool {
        false
    }
    /// Feeds what the guest can observe of this device into a state digest. The default
    /// is the whole saved state; a device with state the guest cannot see (buffers of
    /// output already delivered, statistics) may digest less.
    fn digest(&self, hasher: &mut blake3::Hasher) {
        // Encoding plain in-memory state into a Vec cannot fail.
        let bytes = bincode::serde::encode_to_vec(self.save(), bincode::config::standard())
            .unwrap_or_default();
        hasher.update(&bytes);
    }

    /// The layout version of this device's saved state. A checkpoint stores it with the
    /// state; a device whose state gains a field bumps it (and learns to read the older
    /// layout), so that older checkpoints still restore without a trace-format change.
    fn state_version(&self) -> u32 {
        1
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
