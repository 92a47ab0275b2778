//! The machine: guest memory, both buses, the devices and the interrupt controller, behind
//! the calls an engine makes (port I/O, MMIO, HLT, interrupt acknowledge).

use crate::bus::{Bus, BusConflict};
use crate::counters::{AccessKind, Event, MachineCounters};
use crate::cpu::EngineStats;
use crate::cpuid::CpuidTable;
use crate::devices::{
    Device, DeviceError, DeviceState, InterruptLines, IoCtx, Irqchip, MsrFault, NoInterruptLines,
    StopRequest, lapic::GuestTsc,
};
use crate::host::{Host, Position};
use crate::memory::{DmaMemory, GuestRam, MemoryError, MemoryLayout};
use crate::tables::FirmwareRevision;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Failures building or restoring a machine.
#[derive(Debug, Error)]
pub enum MachineError {
    /// Guest memory could not be laid out or allocated.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Two devices claim the same addresses.
    #[error(transparent)]
    BusConflict(#[from] BusConflict),
    /// A saved device state does not fit.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A read-only memory range could not be added (see [`Machine::add_rom`]).
    #[error("cannot map a {len:#x}-byte ROM at {addr:#x}: {reason}")]
    Rom {
        /// Guest-physical address asked for.
        addr: u64,
        /// Length in bytes.
        len: u64,
        /// What is wrong.
        reason: String,
    },
    /// The firmware tables could not be written.
    #[error(transparent)]
    Firmware(#[from] crate::tables::TablesError),
    /// `--device` named a device deja does not have.
    #[error("unknown device {name:?}; the optional devices are: {known}")]
    UnknownDevice {
        /// The name asked for.
        name: String,
        /// The names deja knows, comma separated.
        known: String,
    },
    /// The same optional device was asked for twice (both would claim the same addresses).
    #[error("device {0} is asked for more than once")]
    DuplicateDevice(OptionalDevice),
    /// A saved machine state has a different set of devices.
    #[error("saved state has {found} devices, this machine has {expected}")]
    DeviceCountMismatch {
        /// Devices in the machine.
        expected: usize,
        /// Devices in the saved state.
        found: usize,
    },
}

/// Static configuration of a machine: what a trace header records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// RAM in bytes.
    pub ram_size: u64,
    /// Kernel command line (multiboot, fw_cfg).
    pub cmdline: String,
    /// The CPUID table both engines present.
    pub cpuid: CpuidTable,
    /// Devices added to the machine on request (`--device`), in the order asked for.
    /// Traces recorded before the field existed have none (`serde(default)`), and a machine
    /// without any writes no field, so its trace header is what it was before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<OptionalDevice>,
    /// What the firmware tables hold ([`crate::tables`]). Not in the JSON: a trace header
    /// names it in a field of its own (format 9), which the recorder writes and the
    /// replayer reads back into this field; JSON alone (a header before format 9) reads as
    /// revision 1, the tables such traces were recorded with.
    #[serde(skip, default = "firmware_of_older_traces")]
    pub firmware: FirmwareRevision,
}

/// The firmware revision of a configuration read without one: revision 1.
fn firmware_of_older_traces() -> FirmwareRevision {
    FirmwareRevision::Rev1
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            ram_size: crate::memory::DEFAULT_RAM,
            cmdline: String::new(),
            cpuid: CpuidTable::deja_default(),
            devices: Vec::new(),
            firmware: FirmwareRevision::LATEST,
        }
    }
}

/// A device the machine has only when asked for (`deja run --device NAME`). Off by default,
/// so that a machine without them has exactly the devices, keys and digests it always had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OptionalDevice {
    /// QEMU's `pc-testdev` ([`crate::devices::pc_testdev`]).
    #[serde(rename = "pc-testdev")]
    PcTestdev,
}

impl OptionalDevice {
    /// Every optional device, in the order `--help` and errors list them.
    pub const ALL: [OptionalDevice; 1] = [OptionalDevice::PcTestdev];

    /// The name `--device` takes (QEMU's `-device` name).
    pub fn name(self) -> &'static str {
        match self {
            OptionalDevice::PcTestdev => crate::devices::pc_testdev::NAME,
        }
    }
}

impl std::fmt::Display for OptionalDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for OptionalDevice {
    type Err = MachineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| MachineError::UnknownDevice {
                name: s.to_string(),
                known: Self::ALL.map(OptionalDevice::name).join(", "),
            })
    }
}

/// Which bus an access went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    /// Port I/O.
    Pio,
    /// Memory-mapped I/O.
    Mmio,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Irqchip,
    Device(usize),
}

/// Adapter giving devices the irqchip as their interrupt lines.
struct Lines<'a>(&'a mut dyn Irqchip);

impl InterruptLines for Lines<'_> {
    fn set_irq(&mut self, line: u32, level: bool) {
        self.0.set_irq(line, level);
    }
}

/// The PC chipset's coprocessor-error port: a write lowers IRQ13 and asserts the CPU's
/// IGNNE# input (see [`crate::cpu::X87ErrorPins`]). Handled by the machine itself (not a
/// device with saved state, so that checkpoints and state digests of older traces keep
/// their device list) unless a device claims the port.
pub const FPU_ERROR_PORT: u16 = 0xf0;
/// The ISA interrupt line the chipset drives from the CPU's FERR# output.
pub const FPU_ERROR_IRQ: u32 = 13;

/// Everything but the CPU.
pub struct Machine {
    /// Static configuration.
    pub config: MachineConfig,
    /// Where RAM is.
    pub layout: MemoryLayout,
    /// Guest RAM.
    pub mem: GuestRam,
    /// The nondeterminism boundary.
    pub host: Box<dyn Host>,
    position: Position,
    irqchip: Box<dyn Irqchip>,
    devices: Vec<Box<dyn Device>>,
    pio: Bus<Target>,
    mmio: Bus<Target>,
    stop: Option<StopRequest>,
    counters: MachineCounters,
    fpu_error_cleared: bool,
}

impl Machine {
    /// A machine with memory laid out for `config` and only an interrupt controller; add
    /// devices with [`Machine::add_device`].
    pub fn new(
        config: MachineConfig,
        host: Box<dyn Host>,
        irqchip: Box<dyn Irqchip>,
    ) -> Result<Self, MachineError> {
        let layout = MemoryLayout::pc(config.ram_size)?;
        let mem = layout.allocate()?;
        Ok(Self {
            config,
            layout,
            mem,
            host,
            position: Position::default(),
            irqchip,
            devices: Vec::new(),
            pio: Bus::default(),
            mmio: Bus::default(),
            stop: None,
            counters: MachineCounters::default(),
            fpu_error_cleared: false,
        })
    }

    /// Adds a device and maps it at the given port and MMIO ranges (`(start, len)` each).
    /// Returns its index (the order of [`Machine::save_devices`]).
    pub fn add_device(
        &mut self,
        device: Box<dyn Device>,
        pio: &[(u16, u16)],
        mmio: &[(u64, u64)],
    ) -> Result<usize, MachineError> {
        let id = self.devices.len();
        let name = device.name();
        for &(start, len) in pio {
            self.pio
                .insert(u64::from(start), u64::from(len), Target::Device(id), name)?;
        }
        for &(start, len) in mmio {
            self.mmio.insert(start, len, Target::Device(id), name)?;
        }
        self.devices.push(device);
        Ok(id)
    }

    /// Maps `bytes` as read-only memory at `addr` (a firmware ROM) and records the range in
    /// [`MemoryLayout::rom`], so that engines map it read-only (kvm: `KVM_MEM_READONLY`; bt:
    /// writes are dropped). Engines take their memory map when they are created, so ROMs
    /// must be added before that (the loader does it). `addr` and the length must be whole
    /// 4 KiB pages, and the range may overlap neither RAM nor another ROM.
    pub fn add_rom(&mut self, addr: u64, bytes: &[u8]) -> Result<(), MachineError> {
        use vm_memory::{Bytes, GuestAddress, GuestRegionMmap};
        let len = bytes.len() as u64;
        let err = |reason: String| MachineError::Rom { addr, len, reason };
        if len == 0 || !len.is_multiple_of(4096) || !addr.is_multiple_of(4096) {
            return Err(err(
                "address and length must be non-zero multiples of 4 KiB".to_string(),
            ));
        }
        let end = addr
            .checked_add(len)
            .ok_or_else(|| err("the range wraps past the end of the address space".into()))?;
        for r in self.layout.ranges.iter().chain(&self.layout.rom) {
            if addr < r.end() && r.start < end {
                let what = if self.layout.rom.contains(r) {
                    "ROM"
                } else {
                    "RAM"
                };
                return Err(err(format!(
                    "it overlaps {what} at {:#x}..{:#x}",
                    r.start,
                    r.end()
                )));
            }
        }
        let region = GuestRegionMmap::<vm_memory::bitmap::AtomicBitmap>::from_range(
            GuestAddress(addr),
            bytes.len(),
            None,
        )
        .map_err(|e| err(format!("allocating host memory failed: {e}")))?;
        let mem = self
            .mem
            .insert_region(std::sync::Arc::new(region))
            .map_err(|e| err(format!("inserting the region failed: {e}")))?;
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| err(format!("writing the ROM contents failed: {e}")))?;
        self.mem = mem;
        let range = crate::memory::RamRange { start: addr, len };
        let at = self.layout.rom.partition_point(|r| r.start < addr);
        self.layout.rom.insert(at, range);
        Ok(())
    }

    /// Maps the interrupt controller's registers.
    pub fn map_irqchip(
        &mut self,
        pio: &[(u16, u16)],
        mmio: &[(u64, u64)],
    ) -> Result<(), MachineError> {
        let name = self.irqchip.name();
        for &(start, len) in pio {
            self.pio
                .insert(u64::from(start), u64::from(len), Target::Irqchip, name)?;
        }
        for &(start, len) in mmio {
            self.mmio.insert(start, len, Target::Irqchip, name)?;
        }
        Ok(())
    }

    /// Marks guest-physical `phys..phys + len` as written, for an engine that stores through
    /// a host pointer rather than through `vm_memory` (which marks by itself). Addresses
    /// outside guest memory are ignored.
    pub fn mark_dirty(&self, phys: u64, len: usize) {
        if let Some(region) = self.mem.find_region(GuestAddress(phys)) {
            let offset = (phys - region.start_addr().0) as usize;
            dirty_bitmap(region).set_addr_range(offset, len);
        }
    }

    /// Calls `f` with the number of every page written since the previous call (in
    /// ascending order) and clears the marks. An engine whose guest writes memory behind
    /// deja's back adds those first ([`crate::Cpu::collect_dirty_pages`]).
    pub fn drain_dirty_pages(&self, mut f: impl FnMut(u64)) {
        let mut regions: Vec<_> = self.mem.iter().collect();
        regions.sort_by_key(|r| r.start_addr().0);
        for region in regions {
            let first = region.start_addr().0 / 4096;
            for (i, mut word) in dirty_bitmap(region).get_and_reset().into_iter().enumerate() {
                while word != 0 {
                    let bit = word.trailing_zeros() as u64;
                    word &= word - 1;
                    f(first + i as u64 * 64 + bit);
                }
            }
        }
    }

    /// The current position (exit ordinal kept here, icount set by the engine).
    pub fn position(&self) -> Position {
        self.position
    }

    /// Moves the position, when a snapshot is restored (replay seeking from a checkpoint).
    pub fn set_position(&mut self, position: Position) {
        self.position = position;
    }

    /// Engines that count instructions report the count before every device access.
    pub fn set_icount(&mut self, icount: u64) {
        self.position.icount = icount;
    }

    /// An access to a register of the interrupt controller itself (its port or its MMIO
    /// window); the controller raises no lines through the bus.
    fn irqchip_access(&mut self, addr: u64, data: &mut [u8], write: bool) {
        let mut none = NoInterruptLines;
        let mut ctx = IoCtx {
            host: self.host.as_mut(),
            pos: self.position,
            mem: DmaMemory::new(&self.mem, &self.layout.rom),
            irq: &mut none,
            stop: &mut self.stop,
            now_cache: None,
        };
        if write {
            self.irqchip.write(&mut ctx, addr, data);
        } else {
            self.irqchip.read(&mut ctx, addr, data);
        }
    }

    fn dispatch(&mut self, space: Space, addr: u64, data: &mut [u8], write: bool) {
        self.position.exits += 1;
        let kind = match (space, write) {
            (Space::Pio, false) => AccessKind::PioRead,
            (Space::Pio, true) => AccessKind::PioWrite,
            (Space::Mmio, false) => AccessKind::MmioRead,
            (Space::Mmio, true) => AccessKind::MmioWrite,
        };
        if space == Space::Mmio && self.in_irqchip_window(addr) {
            self.counters.access(None, kind);
            self.irqchip_access(addr, data, write);
            return;
        }
        let bus = match space {
            Space::Pio => &self.pio,
            Space::Mmio => &self.mmio,
        };
        let Some((entry, _)) = bus.find(addr) else {
            match space {
                Space::Pio => self.counters.unmapped_pio.note(addr),
                Space::Mmio => self.counters.unmapped_mmio.note(addr),
            }
            if !write {
                data.fill(0xff);
            }
            return;
        };
        self.counters.access(
            match entry.target {
                Target::Irqchip => None,
                Target::Device(id) => Some(id),
            },
            kind,
        );
        match entry.target {
            Target::Irqchip => self.irqchip_access(addr, data, write),
            Target::Device(id) => {
                let mut lines = Lines(self.irqchip.as_mut());
                let mut ctx = IoCtx {
                    host: self.host.as_mut(),
                    pos: self.position,
                    mem: DmaMemory::new(&self.mem, &self.layout.rom),
                    irq: &mut lines,
                    stop: &mut self.stop,
                    now_cache: None,
                };
                let dev = &mut self.devices[id];
                if write {
                    dev.write(&mut ctx, addr, data);
                } else {
                    dev.read(&mut ctx, addr, data);
                }
            }
        }
    }

    /// A guest IN from `port` (`data.len()` is 1, 2 or 4). Counts as one device exit.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        self.dispatch(Space::Pio, u64::from(port), data, false);
    }

    /// A guest OUT to `port`. Counts as one device exit.
    pub fn pio_write(&mut self, port: u16, data: &[u8]) {
        if port == FPU_ERROR_PORT && self.pio.find(u64::from(port)).is_none() {
            self.position.exits += 1;
            self.counters.event(Event::FpuErrorClear);
            self.irqchip.set_irq(FPU_ERROR_IRQ, false);
            self.fpu_error_cleared = true;
            return;
        }
        let mut buf = [0u8; 8];
        let n = data.len().min(8);
        buf[..n].copy_from_slice(&data[..n]);
        self.dispatch(Space::Pio, u64::from(port), &mut buf[..n], true);
    }

    /// A guest read of a physical address that is not RAM. Counts as one device exit.
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        self.dispatch(Space::Mmio, addr, data, false);
    }

    /// A guest write to a physical address that is not RAM. Counts as one device exit.
    pub fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        let mut buf = [0u8; 8];
        let n = data.len().min(8);
        buf[..n].copy_from_slice(&data[..n]);
        self.dispatch(Space::Mmio, addr, &mut buf[..n], true);
    }

    /// Whether a device sits at `addr` on the MMIO bus (engines route such accesses here).
    pub fn is_mmio(&self, addr: u64) -> bool {
        self.in_irqchip_window(addr) || self.mmio.find(addr).is_some()
    }

    /// Whether `addr` is in the local APIC's xAPIC page where IA32_APIC_BASE puts it now.
    /// The page is decoded ahead of the bus, so a relocated page works anywhere outside
    /// RAM (engines send RAM accesses to RAM; a page moved over RAM is not decoded).
    fn in_irqchip_window(&self, addr: u64) -> bool {
        self.irqchip
            .mmio_window()
            .is_some_and(|(base, len)| (base..base + len).contains(&addr))
    }

    /// CPUID as the guest sees it now: the table's answer, with CPUID.01H:EDX.APIC clear
    /// while IA32_APIC_BASE disables the local APIC (as the hardware reports it).
    pub fn cpuid(&self, function: u32, index: u32) -> [u32; 4] {
        let mut r = self.config.cpuid.lookup(function, index);
        if function == 1 && self.irqchip.apic_globally_enabled() == Some(false) {
            r[3] &= !crate::cpuid::features::APIC;
        }
        r
    }

    /// Whether RDMSR/WRMSR of `msr` goes to the machine ([`Machine::rdmsr`],
    /// [`Machine::wrmsr`]) rather than to the engine's own MSRs: the local APIC's
    /// IA32_APIC_BASE, IA32_TSC_DEADLINE and x2APIC registers.
    pub fn handles_msr(&self, msr: u32) -> bool {
        self.irqchip.handles_msr(msr)
    }

    /// A guest RDMSR of a machine MSR. Counts as one device exit (both engines stop for
    /// it: bt at the instruction, kvm with a userspace MSR exit), so exit ordinals stay
    /// engine independent. `Err` means the CPU raises #GP(0).
    pub fn rdmsr(&mut self, msr: u32) -> Result<u64, MsrFault> {
        self.position.exits += 1;
        self.counters.access(None, AccessKind::Rdmsr);
        let mut none = NoInterruptLines;
        let mut ctx = IoCtx {
            host: self.host.as_mut(),
            pos: self.position,
            mem: DmaMemory::new(&self.mem, &self.layout.rom),
            irq: &mut none,
            stop: &mut self.stop,
            now_cache: None,
        };
        self.irqchip.rdmsr(&mut ctx, msr)
    }

    /// A guest WRMSR of a machine MSR, with the engine's TSC (for IA32_TSC_DEADLINE).
    /// Counts as one device exit, as [`Machine::rdmsr`].
    pub fn wrmsr(&mut self, msr: u32, value: u64, tsc: GuestTsc) -> Result<(), MsrFault> {
        self.position.exits += 1;
        self.counters.access(None, AccessKind::Wrmsr);
        let mut none = NoInterruptLines;
        let mut ctx = IoCtx {
            host: self.host.as_mut(),
            pos: self.position,
            mem: DmaMemory::new(&self.mem, &self.layout.rom),
            irq: &mut none,
            stop: &mut self.stop,
            now_cache: None,
        };
        self.irqchip.wrmsr(&mut ctx, msr, value, tsc)
    }

    /// Guest time in ns at the current position, through the [`Host`] (kvm relates the
    /// host TSC it reads to guest time with it, see [`GuestTsc::observed`]).
    pub fn time_ns(&mut self) -> u64 {
        self.host.time_ns(self.position)
    }

    /// CR8 as the guest reads it when the interrupt controller owns the task priority
    /// (the local APIC's TPR bits 7:4); `None` when the CPU keeps CR8 itself.
    pub fn cr8(&self) -> Option<u64> {
        self.irqchip.cr8()
    }

    /// A guest MOV to CR8 (or kvm's CR8 after an exit): the local APIC's TPR. Not a device
    /// exit (kvm does not exit for it).
    pub fn set_cr8(&mut self, value: u64) {
        self.irqchip.set_cr8(value);
    }

    /// Takes an NMI waiting for the CPU (LINT1, NMI IPI, I/O APIC).
    pub fn take_nmi(&mut self) -> bool {
        let nmi = self.irqchip.take_nmi();
        if nmi {
            self.counters.event(Event::NmiDelivered);
        }
        nmi
    }

    /// Takes an INIT waiting for the CPU; the local APIC has then been reset as INIT does,
    /// and the engine must put the CPU in its INIT state.
    pub fn take_init(&mut self) -> bool {
        let init = self.irqchip.take_init();
        if init {
            self.counters.event(Event::InitDelivered);
            self.irqchip.init_reset();
        }
        init
    }

    /// Whether the guest wrote [`FPU_ERROR_PORT`] since the last call: the engine asserts
    /// IGNNE# if its FERR# is asserted (engines without FERR# ignore it). Engines take it
    /// before returning from the run that made the write, so it is never left pending in a
    /// checkpoint.
    pub fn take_fpu_error_clear(&mut self) -> bool {
        std::mem::take(&mut self.fpu_error_cleared)
    }

    /// The guest executed HLT: counts as one device exit (the ordinal is engine independent).
    pub fn note_halt(&mut self) {
        self.position.exits += 1;
        self.counters.event(Event::Hlt);
    }

    /// Brings every device up to the present (timers, input), raising due interrupts.
    ///
    /// The clock is asked only whether the earliest device deadline has passed
    /// ([`Host::time_if_due`]): until it has, devices with a deadline are not polled (their
    /// polls would only catch up on time with nothing to raise; their accesses catch up
    /// themselves), and devices without one (serial input) are polled as always.
    pub fn poll(&mut self) {
        let mut now_cache = None;
        let mut due = true;
        if let Some(deadline) = self.next_deadline() {
            now_cache = self.host.time_if_due(self.position, deadline);
            due = now_cache.is_some();
        }
        if due || self.irqchip.next_deadline().is_none() {
            let mut none = NoInterruptLines;
            let mut ctx = IoCtx {
                host: self.host.as_mut(),
                pos: self.position,
                mem: DmaMemory::new(&self.mem, &self.layout.rom),
                irq: &mut none,
                stop: &mut self.stop,
                now_cache,
            };
            self.irqchip.poll(&mut ctx);
            now_cache = ctx.now_cache;
        }
        for dev in &mut self.devices {
            if !due && dev.next_deadline().is_some() {
                continue;
            }
            let mut lines = Lines(self.irqchip.as_mut());
            let mut ctx = IoCtx {
                host: self.host.as_mut(),
                pos: self.position,
                mem: DmaMemory::new(&self.mem, &self.layout.rom),
                irq: &mut lines,
                stop: &mut self.stop,
                now_cache,
            };
            dev.poll(&mut ctx);
            now_cache = ctx.now_cache;
        }
    }

    /// The earliest guest time at which some device has work, if any.
    pub fn next_deadline(&self) -> Option<u64> {
        std::iter::once(self.irqchip.next_deadline())
            .chain(self.devices.iter().map(|d| d.next_deadline()))
            .flatten()
            .min()
    }

    /// The guest is halted with nothing pending: let the host wait (or jump virtual time) to
    /// the next device deadline, then poll.
    pub fn idle(&mut self) {
        let deadline = self.next_deadline();
        self.host.idle(self.position, deadline);
        self.poll();
    }

    /// Whether INTR is asserted.
    pub fn interrupt_pending(&self) -> bool {
        self.irqchip.interrupt_pending()
    }

    /// Whether an NMI or INIT waits for the CPU: a halted CPU wakes for it, so the run loop
    /// must not idle.
    pub fn nmi_or_init_pending(&self) -> bool {
        self.irqchip.nmi_or_init_pending()
    }

    /// Interrupt acknowledge: the vector the CPU must deliver now.
    pub fn acknowledge_interrupt(&mut self) -> u8 {
        self.counters.event(Event::InterruptDelivered);
        let vector = self.irqchip.acknowledge();
        self.host.interrupt_delivered(self.position, vector);
        vector
    }

    /// Drives an interrupt line from outside the device set (tests, injected events).
    pub fn set_irq(&mut self, line: u32, level: bool) {
        self.irqchip.set_irq(line, level);
    }

    /// The stop a device requested, if any (left in place; see [`Machine::take_stop`]).
    pub fn stop_request(&self) -> Option<StopRequest> {
        self.stop
    }

    /// Takes the pending stop request.
    pub fn take_stop(&mut self) -> Option<StopRequest> {
        self.stop.take()
    }

    /// Device-access counters, including unmapped accesses per port.
    pub fn stats(&self) -> EngineStats {
        let mut s = EngineStats::default();
        self.counters.add_to(&mut s, |target| match target {
            None => self.irqchip.name(),
            Some(id) => self.devices[id].name(),
        });
        self.irqchip.add_stats(&mut s);
        for d in &self.devices {
            d.add_stats(&mut s);
        }
        s
    }

    /// The device with `name`, to inspect it (e.g. the POST codes).
    pub fn device(&self, name: &str) -> Option<&dyn Device> {
        self.devices
            .iter()
            .find(|d| d.name() == name)
            .map(|d| d.as_ref())
    }

    /// Every device's state: the interrupt controller first, then devices in order added.
    pub fn save_devices(&self) -> Vec<DeviceState> {
        std::iter::once(self.irqchip.save())
            .chain(self.devices.iter().map(|d| d.save()))
            .collect()
    }

    /// A machine reset: every device back to `boot` (what [`Machine::save_devices`]
    /// returned at boot), except those that survive a reset (the CMOS RTC). RAM is left as
    /// it is, as on a PC; the caller re-loads the image (and the ACPI tables, as firmware
    /// does on every boot). A pending stop request is dropped.
    pub fn reset_devices(&mut self, boot: &[DeviceState]) -> Result<(), MachineError> {
        if boot.len() != self.devices.len() + 1 {
            return Err(MachineError::DeviceCountMismatch {
                expected: self.devices.len() + 1,
                found: boot.len(),
            });
        }
        self.irqchip.restore(&boot[0])?;
        for (d, s) in self.devices.iter_mut().zip(&boot[1..]) {
            if !d.survives_reset() {
                d.restore(s)?;
            }
        }
        self.stop = None;
        self.fpu_error_cleared = false;
        self.counters.event(Event::Reset);
        Ok(())
    }

    /// Each device's snapshot key, in the order of [`Machine::save_devices`]: its name, with
    /// `#k` appended to the k-th (k >= 2) of several devices of one name. Checkpoints store
    /// device states by key, so that a device added to the machine later does not shift the
    /// others.
    pub fn device_keys(&self) -> Vec<String> {
        let names: Vec<&str> = std::iter::once(self.irqchip.name())
            .chain(self.devices.iter().map(|d| d.name()))
            .collect();
        names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let k = names[..i].iter().filter(|n| *n == name).count();
                if k == 0 {
                    name.to_string()
                } else {
                    format!("{name}#{}", k + 1)
                }
            })
            .collect()
    }

    /// The digest of device `index` (in the order of [`Machine::save_devices`]) by its
    /// [`Device::digest`]; `None` if there is no such device.
    pub fn device_digest(&self, index: usize) -> Option<[u8; 32]> {
        let mut h = blake3::Hasher::new();
        match index {
            0 => self.irqchip.digest(&mut h),
            i => self.devices.get(i - 1)?.digest(&mut h),
        }
        Some(*h.finalize().as_bytes())
    }

    /// Each device's [`Device::state_version`], in the order of [`Machine::save_devices`].
    pub fn device_state_versions(&self) -> Vec<u32> {
        std::iter::once(self.irqchip.state_version())
            .chain(self.devices.iter().map(|d| d.state_version()))
            .collect()
    }

    /// Restores one device (`index` in the order of [`Machine::save_devices`]).
    pub fn restore_device(
        &mut self,
        index: usize,
        state: &DeviceState,
    ) -> Result<(), MachineError> {
        let expected = self.devices.len() + 1;
        match index {
            0 => self.irqchip.restore(state)?,
            i => self
                .devices
                .get_mut(i - 1)
                .ok_or(MachineError::DeviceCountMismatch {
                    expected,
                    found: i + 1,
                })?
                .restore(state)?,
        }
        Ok(())
    }

    /// Restores what [`Machine::save_devices`] returned.
    pub fn restore_devices(&mut self, states: &[DeviceState]) -> Result<(), MachineError> {
        if states.len() != self.devices.len() + 1 {
            return Err(MachineError::DeviceCountMismatch {
                expected: self.devices.len() + 1,
                found: states.len(),
            });
        }
        self.irqchip.restore(&states[0])?;
        for (d, s) in self.devices.iter_mut().zip(&states[1..]) {
            d.restore(s)?;
        }
        Ok(())
    }
}

/// The dirty-page bitmap of one region of guest memory (one bit per 4 KiB page).
fn dirty_bitmap(
    region: &vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>,
) -> &vm_memory::bitmap::AtomicBitmap {
    let mapping: &vm_memory::MmapRegion<vm_memory::bitmap::AtomicBitmap> = region;
    mapping.bitmap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::{debug_exit::DebugExit, post::PostPort};
    use crate::host::{ClockMode, LiveHost};
    use std::sync::{Arc, Mutex};

    /// An interrupt controller that records line changes, for bus tests.
    #[derive(Default)]
    struct RecordingIrqchip {
        lines: Arc<Mutex<Vec<(u32, bool)>>>,
    }

    impl Device for RecordingIrqchip {
        fn name(&self) -> &'static str {
            "test-irqchip"
        }
        fn read(&mut self, _ctx: &mut IoCtx, addr: u64, data: &mut [u8]) {
            data.fill(addr as u8);
        }
        fn write(&mut self, _ctx: &mut IoCtx, _addr: u64, _data: &[u8]) {}
        fn save(&self) -> DeviceState {
            DeviceState::DebugExit
        }
        fn restore(&mut self, _state: &DeviceState) -> Result<(), DeviceError> {
            Ok(())
        }
    }

    impl InterruptLines for RecordingIrqchip {
        fn set_irq(&mut self, line: u32, level: bool) {
            self.lines.lock().unwrap().push((line, level));
        }
    }

    impl Irqchip for RecordingIrqchip {
        fn interrupt_pending(&self) -> bool {
            false
        }
        fn acknowledge(&mut self) -> u8 {
            0xff
        }
    }

    fn machine() -> Machine {
        let host = Box::new(LiveHost::new(ClockMode::Virtual));
        let config = MachineConfig {
            ram_size: 8 << 20,
            ..MachineConfig::default()
        };
        let mut m = Machine::new(config, host, Box::<RecordingIrqchip>::default()).unwrap();
        m.map_irqchip(&[(0x20, 2)], &[]).unwrap();
        m.add_device(Box::<PostPort>::default(), &[(0x80, 1)], &[])
            .unwrap();
        m.add_device(Box::<DebugExit>::default(), &[(0xf4, 1)], &[])
            .unwrap();
        m
    }

    #[test]
    fn unmapped_ports_read_all_ones_and_are_counted() {
        let mut m = machine();
        let mut b = [0u8; 2];
        m.pio_read(0x1234, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        m.pio_write(0x1234, &[1]);
        m.mmio_write(0xfed0_0000, &[1, 2, 3, 4]);
        let mut d = [0u8; 4];
        m.mmio_read(0xfed0_0000, &mut d);
        assert_eq!(d, [0xff; 4]);
        let s = m.stats();
        assert_eq!(s.get("io.unmapped_pio.0x1234"), 2);
        assert_eq!(s.get("io.unmapped_mmio.0xfed00000"), 2);
        assert_eq!(m.position().exits, 4);
    }

    #[test]
    fn a_guest_touching_a_million_unbacked_addresses_leaves_bounded_counters() {
        let mut m = machine();
        let mut d = [0u8; 8];
        for i in 0..1_000_000u64 {
            m.mmio_read(0x1_0000_0000 + i * 8, &mut d);
        }
        let s = m.stats();
        assert_eq!(s.get("io.unmapped_mmio"), 1_000_000);
        let named = s
            .counters
            .keys()
            .filter(|k| k.starts_with("io.unmapped_mmio."))
            .count();
        assert_eq!(named, crate::counters::MAX_TRACKED_UNMAPPED + 1);
        assert_eq!(
            s.get("io.unmapped_mmio.other"),
            1_000_000 - crate::counters::MAX_TRACKED_UNMAPPED as u64
        );
        assert_eq!(m.position().exits, 1_000_000);
    }

    #[test]
    fn debug_exit_requests_a_stop_with_qemu_status() {
        let mut m = machine();
        m.pio_write(0xf4, &[0x10]);
        let stop = m.take_stop().unwrap();
        assert_eq!(stop, StopRequest::DebugExit { value: 0x10 });
        assert_eq!(stop.exit_status(), Some(0x21));
        assert!(m.take_stop().is_none());
    }

    #[test]
    fn post_codes_are_kept_and_read_back() {
        let mut m = machine();
        for v in [1u8, 2, 0x55] {
            m.pio_write(0x80, &[v]);
        }
        let mut b = [0u8];
        m.pio_read(0x80, &mut b);
        assert_eq!(b, [0x55]);
        assert_eq!(m.stats().get("io.post.pio_write"), 3);
        let saved = m.save_devices();
        assert!(matches!(&saved[1], DeviceState::Post(p) if p.history == vec![1, 2, 0x55]));
    }

    #[test]
    fn irqchip_ports_route_to_the_irqchip() {
        let mut m = machine();
        let mut b = [0u8];
        m.pio_read(0x21, &mut b);
        assert_eq!(b, [0x21]);
    }

    #[test]
    fn restore_rejects_a_different_device_set() {
        let mut m = machine();
        let mut saved = m.save_devices();
        saved.pop();
        assert!(matches!(
            m.restore_devices(&saved),
            Err(MachineError::DeviceCountMismatch {
                expected: 3,
                found: 2
            })
        ));
        saved.push(DeviceState::DebugExit);
        saved.swap(1, 2);
        assert!(matches!(
            m.restore_devices(&saved),
            Err(MachineError::Device(_))
        ));
    }
}
