//! Every call bt makes into a device, a machine MSR or the `Host` carries the position of
//! the instruction making it: the count of instructions retired before it. A guest makes
//! each kind of call at a known instruction count (several inside one block, so a position
//! left over from an earlier call, or the block's starting count, would show), and a device,
//! an interrupt controller and a host record the positions they are given.

mod common;

use common::*;
use deja_machine::devices::lapic::GuestTsc;
use deja_machine::devices::{
    Device, DeviceError, DeviceState, InterruptLines, IoCtx, Irqchip, MsrFault,
};
use deja_machine::{Cpu, Exit, Host, Machine, MachineConfig, Position};
use iced_x86::code_asm::*;
use std::sync::{Arc, Mutex};

/// What was called, with the position it was given.
type Calls = Arc<Mutex<Vec<(&'static str, Position)>>>;

/// A machine MSR the test interrupt controller owns.
const TEST_MSR: u32 = 0x808;

/// A host that answers constants and records the position of every call.
struct PositionHost(Calls);

impl PositionHost {
    fn note(&self, what: &'static str, at: Position) {
        self.0.lock().unwrap().push((what, at));
    }
}

impl Host for PositionHost {
    fn time_ns(&mut self, at: Position) -> u64 {
        self.note("time", at);
        1_000
    }
    fn boot_wallclock(&mut self) -> i64 {
        0
    }
    fn serial_input(&mut self, at: Position) -> Option<u8> {
        self.note("serial", at);
        None
    }
    fn entropy(&mut self, at: Position) -> u64 {
        self.note("entropy", at);
        0x1234
    }
    fn poll_quantum(&mut self, _at: Position) -> u64 {
        1
    }
    fn idle(&mut self, at: Position, _deadline_ns: Option<u64>) {
        self.note("idle", at);
    }
    fn interrupt_delivered(&mut self, at: Position, _vector: u8) {
        self.note("interrupt", at);
    }
}

/// A device on [`TEST_PORT`] and [`TEST_MMIO`] that records the position of each access.
struct PositionDevice(Calls);

impl Device for PositionDevice {
    fn name(&self) -> &'static str {
        "position-device"
    }
    fn read(&mut self, ctx: &mut IoCtx, addr: u64, data: &mut [u8]) {
        data.fill(0x5a);
        let what = if addr == u64::from(TEST_PORT) {
            "in"
        } else {
            "mmio read"
        };
        self.0.lock().unwrap().push((what, ctx.pos));
    }
    fn write(&mut self, ctx: &mut IoCtx, addr: u64, _data: &[u8]) {
        let what = if addr == u64::from(TEST_PORT) {
            "out"
        } else {
            "mmio write"
        };
        self.0.lock().unwrap().push((what, ctx.pos));
    }
    fn save(&self) -> DeviceState {
        DeviceState::DebugExit
    }
    fn restore(&mut self, _state: &DeviceState) -> Result<(), DeviceError> {
        Ok(())
    }
}

/// An interrupt controller with one line (raised by a write to [`IRQ_PORT`]) and one MSR
/// ([`TEST_MSR`]), recording the positions it is given.
struct PositionIrqchip {
    calls: Calls,
    pending: bool,
}

impl Device for PositionIrqchip {
    fn name(&self) -> &'static str {
        "position-irqchip"
    }
    fn read(&mut self, _ctx: &mut IoCtx, _addr: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, ctx: &mut IoCtx, _addr: u64, _data: &[u8]) {
        self.calls.lock().unwrap().push(("irq raise", ctx.pos));
        self.pending = true;
    }
    fn save(&self) -> DeviceState {
        DeviceState::DebugExit
    }
    fn restore(&mut self, _state: &DeviceState) -> Result<(), DeviceError> {
        Ok(())
    }
}

impl InterruptLines for PositionIrqchip {
    fn set_irq(&mut self, _line: u32, level: bool) {
        self.pending |= level;
    }
}

impl Irqchip for PositionIrqchip {
    fn interrupt_pending(&self) -> bool {
        self.pending
    }
    fn acknowledge(&mut self) -> u8 {
        self.pending = false;
        VECTOR_BASE
    }
    fn handles_msr(&self, msr: u32) -> bool {
        msr == TEST_MSR
    }
    fn rdmsr(&mut self, ctx: &mut IoCtx, _msr: u32) -> Result<u64, MsrFault> {
        self.calls.lock().unwrap().push(("rdmsr", ctx.pos));
        Ok(0)
    }
    fn wrmsr(
        &mut self,
        ctx: &mut IoCtx,
        _msr: u32,
        _value: u64,
        _tsc: GuestTsc,
    ) -> Result<(), MsrFault> {
        self.calls.lock().unwrap().push(("wrmsr", ctx.pos));
        Ok(())
    }
}

fn position_machine() -> (Machine, Calls) {
    let calls = Calls::default();
    let config = MachineConfig {
        ram_size: 16 << 20,
        ..MachineConfig::default()
    };
    let mut m = Machine::new(
        config,
        Box::new(PositionHost(calls.clone())),
        Box::new(PositionIrqchip {
            calls: calls.clone(),
            pending: false,
        }),
    )
    .unwrap();
    m.map_irqchip(&[(IRQ_PORT, 1)], &[]).unwrap();
    m.add_device(
        Box::new(PositionDevice(calls.clone())),
        &[(TEST_PORT, 1)],
        &[(TEST_MMIO, 0x1000)],
    )
    .unwrap();
    (m, calls)
}

/// A 32-bit interrupt gate to `target` in the ring-0 code segment.
fn gate32(target: u64) -> [u8; 8] {
    let g = (target & 0xffff) | (0x08u64 << 16) | (0x8eu64 << 40) | ((target >> 16) << 48);
    g.to_le_bytes()
}

#[test]
fn devices_msrs_and_the_host_see_the_position_of_the_instruction_calling_them() {
    let (mut m, calls) = position_machine();
    const CODE: u64 = 0x20_0000;
    const HANDLER: u64 = 0x30_0000;
    // The comments number the instructions from 0.
    let code = asm(32, CODE, |a| {
        a.mov(edx, TEST_PORT as u32).unwrap(); // 0
        a.mov(al, 0x11).unwrap(); // 1
        a.out(dx, al).unwrap(); // 2: out
        a.mov(edi, 0x9100u32).unwrap(); // 3
        a.in_(al, dx).unwrap(); // 4: in
        a.nop().unwrap(); // 5
        a.rdtsc().unwrap(); // 6: time
        a.nop().unwrap(); // 7
        a.rdrand(eax).unwrap(); // 8: entropy
        a.mov(ecx, TEST_MSR).unwrap(); // 9
        a.rdmsr().unwrap(); // 10: rdmsr
        a.nop().unwrap(); // 11
        a.wrmsr().unwrap(); // 12: wrmsr
        a.mov(ecx, 0x10u32).unwrap(); // 13
        a.rdmsr().unwrap(); // 14: time (IA32_TSC)
        a.mov(eax, dword_ptr(TEST_MMIO as u32)).unwrap(); // 15: mmio read
        a.nop().unwrap(); // 16
        a.mov(dword_ptr(TEST_MMIO as u32 + 4), eax).unwrap(); // 17: mmio write
        a.mov(edx, TEST_PORT as u32).unwrap(); // 18 (RDTSC and RDMSR changed EDX)
        a.mov(esi, 0x9000u32).unwrap(); // 19
        a.mov(ecx, 2u32).unwrap(); // 20
        a.rep().outsb().unwrap(); // 21: out, out (one exit group)
        a.mov(ecx, 2u32).unwrap(); // 22
        a.rep().insb().unwrap(); // 23: in, in
        a.sti().unwrap(); // 24
        a.mov(al, 1).unwrap(); // 25
        a.out(IRQ_PORT as u32, al).unwrap(); // 26: irq raise; interrupt before 27
        a.nop().unwrap(); // 28 (27 is the handler's IRETD)
        a.rdtsc().unwrap(); // 29: time
        a.hlt().unwrap(); // 30
    });
    let handler = asm(32, HANDLER, |a| {
        a.iretd().unwrap(); // 27
    });
    load(&m, CODE, &code);
    load(&m, HANDLER, &handler);
    load(&m, IDT + 8 * u64::from(VECTOR_BASE), &gate32(HANDLER));
    let s = protected_mode_state(&m, CODE);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 1000), Exit::Halted);
    let seen: Vec<(&str, u64)> = calls
        .lock()
        .unwrap()
        .iter()
        .map(|(what, at)| (*what, at.icount))
        .collect();
    assert_eq!(
        seen,
        [
            ("out", 2),
            ("in", 4),
            ("time", 6),
            ("entropy", 8),
            ("rdmsr", 10),
            ("wrmsr", 12),
            ("time", 14),
            ("mmio read", 15),
            ("mmio write", 17),
            ("out", 21),
            ("out", 21),
            ("in", 23),
            ("in", 23),
            ("irq raise", 26),
            ("interrupt", 27),
            ("time", 29),
        ]
    );
    // HLT is a device exit too, positioned where the CPU waits: after the HLT.
    assert_eq!(c.icount(), 31);
    assert_eq!(m.position().icount, 31);
    // The exit ordinal counted each device exit once: 2 port, 2 MSR, 2 MMIO, 4 string
    // elements, the irqchip port and HLT.
    assert_eq!(m.position().exits, 12);
}
