//! Tiny guests under the kvm engine: port and string I/O, MMIO, HLT, triple faults,
//! interrupt injection, kicks, the three CPU modes and state round trips.
//!
//! Every test prints `SKIP: ... /dev/kvm ...` and returns when the host has no KVM. Guests
//! are kept short: on PVM hosts guest ring-0 code is emulated at about 1 µs/instruction.

mod common;

use common::*;
use deja_machine::cpu::{Exit, Limit, gpr};
use deja_machine::vm_memory::{Bytes, GuestAddress};
use deja_machine::{Cpu, Machine};
use iced_x86::code_asm::*;

const CODE: u64 = 0x1000;

/// Runs until something other than a device access (or `max` device accesses).
fn run_until_not_device(cpu: &mut dyn Cpu, m: &mut Machine, max: usize) -> Exit {
    for _ in 0..max {
        let e = cpu.run(m, Limit::default()).unwrap();
        if e != Exit::DeviceAccess {
            return e;
        }
        m.poll();
    }
    panic!("guest made more than {max} device accesses");
}

fn asm16(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(16).unwrap();
    f(&mut a).unwrap();
    a.assemble(CODE).unwrap()
}

#[test]
fn real_mode_port_io_reaches_the_device_and_reads_come_back() {
    let code = asm16(|a| {
        a.mov(dx, TEST_PORT as u32)?;
        a.mov(al, 0x42u32)?;
        a.out(dx, al)?;
        a.mov(ax, 0x1234u32)?;
        a.out(dx, ax)?;
        a.mov(eax, 0xdead_beefu32)?;
        a.out(dx, eax)?;
        a.in_(al, dx)?;
        a.mov(bl, al)?;
        a.in_(ax, dx)?;
        a.mov(cx, ax)?;
        a.in_(eax, dx)?;
        a.mov(esi, eax)?;
        a.hlt()
    });
    let Some((mut m, mut cpu, log)) = guest("port_io", CODE, &code, |_| real_mode_state(CODE))
    else {
        return;
    };
    // The first OUT: the state read right after the exit shows the instruction completed.
    assert_eq!(cpu.run(&mut m, Limit::default()).unwrap(), Exit::DeviceAccess);
    let s = cpu.state().unwrap();
    assert_eq!(s.rip, CODE + 3 + 2 + 1, "rip after the first OUT");
    assert_eq!(run_until_not_device(&mut cpu, &mut m, 10), Exit::Halted);
    let s = cpu.state().unwrap();
    let p = TEST_PORT;
    assert_eq!(
        *log.lock().unwrap(),
        vec![
            Access::Out(p, vec![0x42]),
            Access::Out(p, vec![0x34, 0x12]),
            Access::Out(p, vec![0xef, 0xbe, 0xad, 0xde]),
            Access::In(p, vec![1]),
            Access::In(p, vec![2, 3]),
            Access::In(p, vec![4, 5, 6, 7]),
        ]
    );
    assert_eq!(s.gpr[gpr::RBX] & 0xff, 1);
    assert_eq!(s.gpr[gpr::RCX] & 0xffff, 0x0302);
    assert_eq!(s.gpr[gpr::RSI] & 0xffff_ffff, 0x0706_0504);
    assert!(s.pending.halted);
    let st = cpu.stats();
    assert_eq!(st.get("exit.io_out"), 3);
    assert_eq!(st.get("exit.io_in"), 3);
    assert_eq!(st.get("exit.hlt"), 1);
    // Six accesses and one HLT.
    assert_eq!(m.position().exits, 7);
}

#[test]
fn string_io_calls_the_device_once_per_element() {
    const BUF: u64 = 0x3000;
    let code = asm16(|a| {
        a.cld()?;
        a.mov(dx, TEST_PORT as u32)?;
        a.mov(si, BUF as u32)?;
        a.mov(cx, 5u32)?;
        a.rep().outsb()?;
        a.mov(di, (BUF + 0x100) as u32)?;
        a.mov(cx, 3u32)?;
        a.rep().insw()?;
        a.hlt()
    });
    let Some((mut m, mut cpu, log)) = guest("string_io", CODE, &code, |_| real_mode_state(CODE))
    else {
        return;
    };
    load(&m, BUF, b"hello");
    assert_eq!(run_until_not_device(&mut cpu, &mut m, 20), Exit::Halted);
    let p = TEST_PORT;
    let mut expected: Vec<Access> = b"hello".iter().map(|&b| Access::Out(p, vec![b])).collect();
    expected.extend([
        Access::In(p, vec![1, 2]),
        Access::In(p, vec![3, 4]),
        Access::In(p, vec![5, 6]),
    ]);
    assert_eq!(*log.lock().unwrap(), expected);
    let mut back = [0u8; 6];
    m.mem
        .read_slice(&mut back, GuestAddress(BUF + 0x100))
        .unwrap();
    assert_eq!(back, [1, 2, 3, 4, 5, 6]);
    let s = cpu.state().unwrap();
    assert_eq!(s.gpr[gpr::RCX] & 0xffff, 0);
    assert_eq!(s.gpr[gpr::RSI] & 0xffff, BUF + 5);
    assert_eq!(s.gpr[gpr::RDI] & 0xffff, BUF + 0x106);
    assert_eq!(m.position().exits, 5 + 3 + 1);
}

#[test]
fn mmio_reads_and_writes_go_to_the_machine() {
    let code = asm16(|a| {
        a.mov(ax, (TEST_MMIO >> 4) as u32)?;
        a.mov(es, ax)?;
        a.mov(byte_ptr(0x10), 0x5au32)?; // ds = 0: RAM, no exit
        a.mov(al, 0x77u32)?;
        a.mov(byte_ptr(0x20).es(), al)?;
        a.mov(eax, 0x1122_3344u32)?;
        a.mov(dword_ptr(0x24).es(), eax)?;
        a.mov(bx, word_ptr(0x30).es())?;
        // Unmapped MMIO (VGA hole, no device): reads all ones.
        a.mov(ax, 0xa000u32)?;
        a.mov(es, ax)?;
        a.mov(byte_ptr(0).es(), 1u32)?;
        a.mov(ecx, dword_ptr(0).es())?;
        a.hlt()
    });
    let Some((mut m, mut cpu, log)) = guest("mmio", CODE, &code, |_| real_mode_state(CODE)) else {
        return;
    };
    assert_eq!(run_until_not_device(&mut cpu, &mut m, 20), Exit::Halted);
    assert_eq!(
        *log.lock().unwrap(),
        vec![
            Access::MmioWrite(TEST_MMIO + 0x20, vec![0x77]),
            Access::MmioWrite(TEST_MMIO + 0x24, vec![0x44, 0x33, 0x22, 0x11]),
            Access::MmioRead(TEST_MMIO + 0x30, vec![1, 2]),
        ]
    );
    let s = cpu.state().unwrap();
    assert_eq!(s.gpr[gpr::RBX] & 0xffff, 0x0201);
    assert_eq!(s.gpr[gpr::RCX] & 0xffff_ffff, 0xffff_ffff);
    let mut b = [0u8];
    m.mem.read_slice(&mut b, GuestAddress(0x10)).unwrap();
    assert_eq!(b, [0x5a]);
    let st = cpu.stats();
    assert_eq!(st.get("exit.mmio_write"), 3);
    assert_eq!(st.get("exit.mmio_read"), 2);
    assert_eq!(m.stats().get("io.unmapped_mmio.0xa0000"), 2);
}

#[test]
fn a_halted_cpu_stays_halted_without_an_interrupt() {
    let code = asm16(|a| {
        a.cli()?;
        a.hlt()?;
        a.mov(dx, TEST_PORT as u32)?;
        a.out(dx, al)?;
        a.hlt()
    });
    let Some((mut m, mut cpu, log)) = guest("halt", CODE, &code, |_| real_mode_state(CODE)) else {
        return;
    };
    assert_eq!(cpu.run(&mut m, Limit::default()).unwrap(), Exit::Halted);
    assert_eq!(m.position().exits, 1);
    for _ in 0..3 {
        assert_eq!(cpu.run(&mut m, Limit::default()).unwrap(), Exit::Halted);
    }
    // Re-reporting the halt is not a new guest access.
    assert_eq!(m.position().exits, 1);
    assert!(log.lock().unwrap().is_empty());
    // IF = 0: a pending interrupt does not wake it either.
    m.set_irq(0, true);
    assert_eq!(cpu.run(&mut m, Limit::default()).unwrap(), Exit::Halted);
    assert!(log.lock().unwrap().is_empty());
    assert_eq!(cpu.stats().get("kvm.interrupts_injected"), 0);
    let s = cpu.state().unwrap();
    assert_eq!(s.rip, CODE + 2);
    assert!(s.pending.halted);
}

/// Real-mode guest with an IVT entry for vector 0x20 whose handler writes `0x501` and
/// IRETs.
fn interrupt_guest(body: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    asm16(|a| {
        let mut handler = a.create_label();
        let mut main = a.create_label();
        a.jmp(main)?;
        a.set_label(&mut handler)?;
        a.push(ax)?;
        a.push(dx)?;
        a.mov(dx, (TEST_PORT + 1) as u32)?;
        a.mov(al, 0x99u32)?;
        a.out(dx, al)?;
        a.pop(dx)?;
        a.pop(ax)?;
        a.iret()?;
        a.set_label(&mut main)?;
        // IVT[0x20] = 0000:handler (handler is at CODE + 2).
        a.mov(word_ptr(u32::from(VECTOR_BASE) * 4), (CODE + 2) as u32)?;
        a.mov(word_ptr(u32::from(VECTOR_BASE) * 4 + 2), 0u32)?;
        body(a)
    })
}

#[test]
fn an_interrupt_wakes_a_halted_cpu_through_the_irqchip() {
    let code = interrupt_guest(|a| {
        a.sti()?;
        a.hlt()?;
        a.mov(dx, (TEST_PORT + 2) as u32)?;
        a.out(dx, al)?;
        a.cli()?;
        a.hlt()
    });
    let Some((mut m, mut cpu, log)) = guest("irq_wake", CODE, &code, |_| real_mode_state(CODE))
    else {
        return;
    };
    assert_eq!(cpu.run(&mut m, Limit::default()).unwrap(), Exit::Halted);
    assert!(log.lock().unwrap().is_empty());
    m.set_irq(0, true);
    assert_eq!(run_until_not_device(&mut cpu, &mut m, 10), Exit::Halted);
    assert_eq!(
        *log.lock().unwrap(),
        vec![
            Access::Out(TEST_PORT + 1, vec![0x99]),
            // AL was saved and restored by the handler: still 0 from reset.
            Access::Out(TEST_PORT + 2, vec![0]),
        ]
    );
    assert_eq!(cpu.stats().get("kvm.interrupts_injected"), 1);
    assert!(!m.interrupt_pending());
}
