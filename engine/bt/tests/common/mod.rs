//! Shared scaffolding for the bt engine's tests: a machine with a recording test device and
//! a minimal interrupt controller, CPU states for each mode, and guests assembled with
//! iced-x86's code assembler.

#![allow(dead_code)]

use deja_bt::BtCpu;
use deja_machine::cpu::{CpuState, Segment, seg};
use deja_machine::devices::{
    Device, DeviceError, DeviceState, InterruptLines, IoCtx, Irqchip, StopRequest,
};
use deja_machine::vm_memory::{Bytes, GuestAddress};
use deja_machine::{ClockMode, Cpu, Exit, Limit, LiveHost, Machine, MachineConfig};
use iced_x86::code_asm::CodeAssembler;
use std::sync::{Arc, Mutex};

/// Port range of the test device.
pub const TEST_PORT: u16 = 0x500;
/// MMIO window of the test device (inside the VGA hole, so not RAM).
pub const TEST_MMIO: u64 = 0xb_8000;
/// Port that stops the run.
pub const STOP_PORT: u16 = 0x5f0;
/// Vector base of the test interrupt controller.
pub const VECTOR_BASE: u8 = 0x20;

/// Everything the test device saw: (port or address, bytes, is_write).
pub type Log = Arc<Mutex<Vec<(u64, Vec<u8>, bool)>>>;

/// Records accesses; reads return an increasing byte pattern.
pub struct TestDevice {
    log: Log,
    next: u8,
}

impl Device for TestDevice {
    fn name(&self) -> &'static str {
        "test-device"
    }
    fn read(&mut self, _ctx: &mut IoCtx, addr: u64, data: &mut [u8]) {
        for b in data.iter_mut() {
            self.next = self.next.wrapping_add(1);
            *b = self.next;
        }
        self.log.lock().unwrap().push((addr, data.to_vec(), false));
    }
    fn write(&mut self, ctx: &mut IoCtx, addr: u64, data: &[u8]) {
        if addr == u64::from(STOP_PORT) {
            *ctx.stop = Some(StopRequest::DebugExit {
                value: u32::from(data[0]),
            });
        }
        self.log.lock().unwrap().push((addr, data.to_vec(), true));
    }
    fn save(&self) -> DeviceState {
        DeviceState::DebugExit
    }
    fn restore(&mut self, _state: &DeviceState) -> Result<(), DeviceError> {
        Ok(())
    }
}

/// Pending lines shared with the test, so it can raise interrupts.
pub type Lines = Arc<Mutex<u8>>;

/// An edge-triggered interrupt controller with 8 lines at vectors 0x20..0x27.
pub struct TestIrqchip {
    pending: Lines,
}

impl Device for TestIrqchip {
    fn name(&self) -> &'static str {
        "test-irqchip"
    }
    fn read(&mut self, _ctx: &mut IoCtx, _addr: u64, data: &mut [u8]) {
        data.fill(*self.pending.lock().unwrap());
    }
    fn write(&mut self, _ctx: &mut IoCtx, _addr: u64, data: &[u8]) {
        // Writing a line mask raises those lines (lets guests trigger interrupts).
        *self.pending.lock().unwrap() |= data[0];
    }
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
            *self.pending.lock().unwrap() |= 1 << line;
        }
    }
}

impl Irqchip for TestIrqchip {
    fn interrupt_pending(&self) -> bool {
        *self.pending.lock().unwrap() != 0
    }
    fn acknowledge(&mut self) -> u8 {
        let mut p = self.pending.lock().unwrap();
        if *p == 0 {
            return VECTOR_BASE + 7;
        }
        let line = p.trailing_zeros() as u8;
        *p &= !(1 << line);
        VECTOR_BASE + line
    }
}

/// The port of the test interrupt controller.
pub const IRQ_PORT: u16 = 0x20;

/// A 16 MiB machine with the test device and the test interrupt controller.
pub fn machine() -> (Machine, Log, Lines) {
    let config = MachineConfig {
        ram_size: 16 << 20,
        ..MachineConfig::default()
    };
    let host = Box::new(LiveHost::new(ClockMode::Virtual));
    let lines = Lines::default();
    let mut m = Machine::new(
        config,
        host,
        Box::new(TestIrqchip {
            pending: lines.clone(),
        }),
    )
    .unwrap();
    m.map_irqchip(&[(IRQ_PORT, 1)], &[]).unwrap();
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
    (m, log, lines)
}

/// Copies `bytes` into guest RAM at `addr`.
pub fn load(machine: &Machine, addr: u64, bytes: &[u8]) {
    machine.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
}

/// Reads guest RAM.
pub fn peek(machine: &Machine, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    machine.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

/// Assembles with `f` at `ip`.
pub fn asm(bitness: u32, ip: u64, f: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
    let mut a = CodeAssembler::new(bitness).unwrap();
    f(&mut a);
    a.assemble(ip).unwrap()
}

/// Real mode at 0000:`ip`, SP = 0x7000, IVT at 0.
pub fn real_mode_state(ip: u64) -> CpuState {
    let mut s = CpuState::reset();
    for (i, sg) in s.seg.iter_mut().enumerate() {
        *sg = Segment::real_mode(0, i == seg::CS);
    }
    s.rip = ip;
    s.gpr[4] = 0x7000;
    s.gpr[2] = 0;
    s.idtr.limit = 0x3ff;
    s
}

/// Where [`protected_mode_state`] and [`long_mode_state`] put the GDT.
pub const GDT: u64 = 0x500;
/// Where the IDT goes.
pub const IDT: u64 = 0x1000;
/// Where the TSS goes.
pub const TSS: u64 = 0x3000;
/// Where 64-bit page tables go (PML4; then PDPT, PD).
pub const PML4: u64 = 0x10000;

/// GDT: 0 null, 0x08 code32, 0x10 data, 0x18 code64, 0x20 code32 ring 3, 0x28 data ring 3,
/// 0x30 code64 ring 3, 0x38 TSS (16 bytes in long mode).
pub fn write_gdt(m: &Machine, long: bool) {
    let mut g: Vec<u64> = vec![
        0,
        0x00cf_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00af_9b00_0000_ffff,
        0x00cf_fb00_0000_ffff,
        0x00cf_f300_0000_ffff,
        0x00af_fb00_0000_ffff,
    ];
    let base = TSS;
    let limit = 0x67 + 0x2000 + 1;
    let _ = long;
    let ty = 0x9u64;
    let tss = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (ty << 40)
        | (1 << 47)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    g.push(tss);
    g.push(base >> 32);
    let bytes: Vec<u8> = g.iter().flat_map(|d| d.to_le_bytes()).collect();
    load(m, GDT, &bytes);
    // I/O bitmap offset past the end: no ports allowed above IOPL.
    load(m, TSS + 0x66, &0x68u16.to_le_bytes());
}

/// 32-bit protected mode, flat segments from the GDT, paging off, at `eip`.
pub fn protected_mode_state(m: &Machine, eip: u64) -> CpuState {
    write_gdt(m, false);
    let mut s = CpuState::reset();
    s.cr0 = 0x11;
    for (i, sg) in s.seg.iter_mut().enumerate() {
        *sg = if i == seg::CS {
            Segment::flat(0x8, true, false)
        } else {
            Segment::flat(0x10, false, false)
        };
        sg.type_ |= 1;
    }
    s.gdtr.base = GDT;
    s.gdtr.limit = 0x4f;
    s.idtr.base = IDT;
    s.idtr.limit = 0x7ff;
    s.tr = Segment {
        selector: 0x38,
        base: TSS,
        limit: 0x67 + 0x2001,
        type_: 0xb,
        present: true,
        ..Segment::default()
    };
    s.rip = eip;
    s.gpr[4] = 0x8000;
    s
}

/// 64-bit long mode with the first 1 GiB identity-mapped by 2 MiB pages (user accessible,
/// writable), at `rip`.
pub fn long_mode_state(m: &Machine, rip: u64) -> CpuState {
    write_gdt(m, true);
    let pdpt = PML4 + 0x1000;
    let pd = PML4 + 0x2000;
    load(m, PML4, &(pdpt | 7).to_le_bytes());
    load(m, pdpt, &(pd | 7).to_le_bytes());
    let pdes: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | 0x87).to_le_bytes())
        .collect();
    load(m, pd, &pdes);
    let mut s = protected_mode_state(m, rip);
    s.cr0 = 0x8000_0011;
    s.cr3 = PML4;
    s.cr4 = 0x20 | 0x200;
    s.efer = 0x500;
    s.seg[seg::CS] = Segment::flat(0x18, true, true);
    s.seg[seg::CS].type_ |= 1;
    s.idtr.limit = 0xfff;
    s
}

/// Runs until the guest writes [`STOP_PORT`], shuts down, or `max` instructions pass.
pub fn run(cpu: &mut BtCpu, m: &mut Machine, max: u64) -> Exit {
    loop {
        let exit = cpu
            .run(
                m,
                Limit {
                    stop_at_icount: Some(max),
                    ..Default::default()
                },
            )
            .unwrap();
        match exit {
            Exit::DeviceAccess => {
                if m.take_stop().is_some() {
                    return Exit::StopRequested;
                }
            }
            Exit::Halted => {
                if !m.interrupt_pending() {
                    return Exit::Halted;
                }
            }
            other => return other,
        }
    }
}

/// A CPU with `state` on machine `m`.
pub fn cpu(m: &Machine, state: &CpuState) -> BtCpu {
    let mut c = BtCpu::new(m).unwrap();
    c.set_state(state).unwrap();
    c
}

/// A 64-bit interrupt gate.
pub fn gate64(target: u64, sel: u16, ist: u8) -> [u8; 16] {
    let lo = (target & 0xffff)
        | (u64::from(sel) << 16)
        | (u64::from(ist) << 32)
        | (0x8eu64 << 40)
        | ((target >> 16) & 0xffff) << 48;
    let hi = target >> 32;
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&lo.to_le_bytes());
    b[8..].copy_from_slice(&hi.to_le_bytes());
    b
}

/// A xorshift generator for the seeded random tests (differential, host oracle, tiers).
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// 64-bit mode at `cpl` (flat segments, IOPL 3) starting at `rip`, with the first 4 MiB
/// identity-mapped as user-writable 2 MiB pages by tables written at `tables`.
pub fn flat_long_mode(m: &Machine, tables: u64, rip: u64, cpl: u8) -> CpuState {
    let (pml4, pdpt, pd) = (tables, tables + 0x1000, tables + 0x2000);
    m.mem.write_obj(pdpt | 7, GuestAddress(pml4)).unwrap();
    m.mem.write_obj(pd | 7, GuestAddress(pdpt)).unwrap();
    for i in 0..2u64 {
        m.mem
            .write_obj((i << 21) | 0x87, GuestAddress(pd + i * 8))
            .unwrap();
    }
    let mut s = CpuState::reset();
    s.cr0 = 0x8000_0011;
    s.cr3 = pml4;
    s.cr4 = 0x20;
    s.efer = 0x500;
    let (code_sel, data_sel) = if cpl == 3 { (0x1b, 0x23) } else { (0x08, 0x10) };
    for (i, sg) in s.seg.iter_mut().enumerate() {
        *sg = if i == seg::CS {
            Segment::flat(code_sel, true, true)
        } else {
            Segment::flat(data_sel, false, false)
        };
        sg.dpl = cpl;
    }
    s.tr.type_ = 0xb;
    s.rip = rip;
    s.rflags = 2 | (3 << 12);
    s
}
