//! Shared scaffolding for the kvm engine's guest tests: a machine with a recording test
//! device and a minimal interrupt controller, and guests assembled with iced-x86.

#![allow(dead_code)]

use deja_kvm::KvmCpu;
use deja_machine::cpu::{CpuState, Segment, seg};
use deja_machine::devices::{
    Device, DeviceError, DeviceState, InterruptLines, IoCtx, Irqchip, StopRequest,
};
use deja_machine::vm_memory::{Bytes, GuestAddress};
use deja_machine::{ClockMode, Cpu, LiveHost, Machine, MachineConfig};
use std::sync::{Arc, Mutex};

/// Port range of the test device.
pub const TEST_PORT: u16 = 0x500;
/// MMIO window of the test device (inside the VGA hole, so not RAM).
pub const TEST_MMIO: u64 = 0xb_8000;
/// Port that stops the run (debug-exit style).
pub const STOP_PORT: u16 = 0x5f0;
/// Vector base of the test interrupt controller (IRQ n -> vector 0x20 + n).
pub const VECTOR_BASE: u8 = 0x20;

/// One access seen by the test device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Port write.
    Out(u16, Vec<u8>),
    /// Port read (the bytes returned).
    In(u16, Vec<u8>),
    /// MMIO write.
    MmioWrite(u64, Vec<u8>),
    /// MMIO read (the bytes returned).
    MmioRead(u64, Vec<u8>),
}

/// What the test device saw, shared with the test.
pub type Log = Arc<Mutex<Vec<Access>>>;

/// Records every access; reads return an increasing counter byte pattern.
pub struct TestDevice {
    log: Log,
    next: u8,
}

impl TestDevice {
    fn answer(&mut self, data: &mut [u8]) -> Vec<u8> {
        for b in data.iter_mut() {
            self.next = self.next.wrapping_add(1);
            *b = self.next;
        }
        data.to_vec()
    }
}

impl Device for TestDevice {
    fn name(&self) -> &'static str {
        "test-device"
    }
    fn read(&mut self, _ctx: &mut IoCtx, addr: u64, data: &mut [u8]) {
        let v = self.answer(data);
        let a = if addr < 0x10000 {
            Access::In(addr as u16, v)
        } else {
            Access::MmioRead(addr, v)
        };
        self.log.lock().unwrap().push(a);
    }
    fn write(&mut self, ctx: &mut IoCtx, addr: u64, data: &[u8]) {
        if addr == u64::from(STOP_PORT) {
            *ctx.stop = Some(StopRequest::DebugExit {
                value: u32::from(data[0]),
            });
        }
        let a = if addr < 0x10000 {
            Access::Out(addr as u16, data.to_vec())
        } else {
            Access::MmioWrite(addr, data.to_vec())
        };
        self.log.lock().unwrap().push(a);
    }
    fn save(&self) -> DeviceState {
        DeviceState::DebugExit
    }
    fn restore(&mut self, _state: &DeviceState) -> Result<(), DeviceError> {
        Ok(())
    }
}

/// An edge-triggered interrupt controller with 8 lines and a fixed vector base: just
/// enough to test injection until the 8259A model is in the machine.
#[derive(Default)]
pub struct TestIrqchip {
    pending: u8,
}

impl Device for TestIrqchip {
    fn name(&self) -> &'static str {
        "test-irqchip"
    }
    fn read(&mut self, _ctx: &mut IoCtx, _addr: u64, data: &mut [u8]) {
        data.fill(self.pending);
    }
    fn write(&mut self, _ctx: &mut IoCtx, _addr: u64, _data: &[u8]) {}
    fn save(&self) -> DeviceState {
        DeviceState::DebugExit
    }
    fn restore(&mut self, _state: &DeviceState) -> Result<(), DeviceError> {
        Ok(())
    }
}

impl InterruptLines for TestIrqchip {
    fn set_irq(&mut self, line: u32, level: bool) {
        if level && line < 8 {
            self.pending |= 1 << line;
        }
    }
}

impl Irqchip for TestIrqchip {
    fn interrupt_pending(&self) -> bool {
        self.pending != 0
    }
    fn acknowledge(&mut self) -> u8 {
        if self.pending == 0 {
            return VECTOR_BASE + 7; // spurious, as the 8259A answers
        }
        let line = self.pending.trailing_zeros() as u8;
        self.pending &= !(1 << line);
        VECTOR_BASE + line
    }
}

/// A 4 MiB machine with the test device at [`TEST_PORT`]..+16, [`STOP_PORT`] and
/// [`TEST_MMIO`]..+4 KiB.
pub fn machine() -> (Machine, Log) {
    let config = MachineConfig {
        ram_size: 4 << 20,
        ..MachineConfig::default()
    };
    let host = Box::new(LiveHost::new(ClockMode::Virtual));
    let mut m = Machine::new(config, host, Box::<TestIrqchip>::default()).unwrap();
    let log = Log::default();
    m.add_device(
        Box::new(TestDevice {
            log: log.clone(),
            next: 0,
        }),
        &[(TEST_PORT, 16), (STOP_PORT, 1)],
        &[(TEST_MMIO, 0x1000)],
    )
    .unwrap();
    (m, log)
}

/// Creates the vCPU, or prints the SKIP line and returns `None` when this host has no
/// usable /dev/kvm.
pub fn kvm_cpu(machine: &Machine, test: &str) -> Option<KvmCpu> {
    match KvmCpu::new(machine) {
        Ok(cpu) => Some(cpu),
        Err(e) if e.is_unavailable() => {
            deja_testkit::skip_without_kvm(test, &e);
            None
        }
        Err(e) => panic!("{test}: creating the kvm vCPU failed: {e}"),
    }
}

/// Copies `bytes` into guest RAM at `addr`.
pub fn load(machine: &Machine, addr: u64, bytes: &[u8]) {
    machine.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
}

/// Real mode at 0000:`ip` with all data segments 0 and SP = 0x7000.
pub fn real_mode_state(ip: u64) -> CpuState {
    let mut s = CpuState::reset();
    for (i, sg) in s.seg.iter_mut().enumerate() {
        *sg = Segment::real_mode(0, i == seg::CS);
    }
    s.rip = ip;
    s.gpr[4] = 0x7000;
    s.gpr[2] = 0;
    s.idtr.base = 0;
    s.idtr.limit = 0x3ff;
    s
}

/// 32-bit protected mode, flat segments, paging off, entered at `eip`.
pub fn protected_mode_state(eip: u64) -> CpuState {
    let mut s = CpuState::reset();
    s.cr0 = 0x11;
    for (i, sg) in s.seg.iter_mut().enumerate() {
        *sg = if i == seg::CS {
            Segment::flat(0x8, true, false)
        } else {
            Segment::flat(0x10, false, false)
        };
    }
    s.tr.type_ = 0xb;
    s.rip = eip;
    s.gpr[4] = 0x7000;
    s.gpr[2] = 0;
    s
}

/// Where [`long_mode_state`] puts its identity-mapping page tables.
pub const PAGE_TABLES: u64 = 0x10_0000;

/// 64-bit long mode with the first 4 MiB identity mapped (2 MiB pages), entered at `rip`.
pub fn long_mode_state(machine: &Machine, rip: u64) -> CpuState {
    long_mode_state_at(machine, rip, 0)
}

/// Long mode entered at privilege level `cpl` (3: user pages, ring-3 segments, IOPL 3 so
/// that port I/O still reaches deja).
pub fn long_mode_state_at(machine: &Machine, rip: u64, cpl: u8) -> CpuState {
    let user = if cpl == 3 { 4 } else { 0 };
    let pml4 = PAGE_TABLES;
    let pdpt = PAGE_TABLES + 0x1000;
    let pd = PAGE_TABLES + 0x2000;
    let mem = &machine.mem;
    mem.write_obj(pdpt | 3 | user, GuestAddress(pml4)).unwrap();
    mem.write_obj(pd | 3 | user, GuestAddress(pdpt)).unwrap();
    for i in 0..2u64 {
        mem.write_obj((i << 21) | 0x83 | user, GuestAddress(pd + i * 8))
            .unwrap();
    }
    let mut s = CpuState::reset();
    s.cr0 = 0x8000_0011;
    s.cr3 = pml4;
    s.cr4 = 0x20;
    s.efer = 0x500;
    for (i, sg) in s.seg.iter_mut().enumerate() {
        *sg = if i == seg::CS {
            Segment::flat(0x8, true, true)
        } else {
            Segment::flat(0x10, false, false)
        };
    }
    s.tr.type_ = 0xb;
    s.rip = rip;
    s.gpr[4] = 0x7000;
    s.gpr[2] = 0;
    if cpl == 3 {
        for (i, sg) in s.seg.iter_mut().enumerate() {
            sg.dpl = 3;
            sg.selector = if i == seg::CS { 0x1b } else { 0x23 };
        }
        s.rflags |= 3 << 12; // IOPL 3
    }
    s
}

/// Creates machine and vCPU, loads `code` at `addr`, sets the state `make_state` builds.
pub fn guest(
    test: &str,
    addr: u64,
    code: &[u8],
    make_state: impl FnOnce(&Machine) -> CpuState,
) -> Option<(Machine, KvmCpu, Log)> {
    let (m, log) = machine();
    let mut cpu = kvm_cpu(&m, test)?;
    load(&m, addr, code);
    let state = make_state(&m);
    cpu.set_state(&state).unwrap();
    Some((m, cpu, log))
}
