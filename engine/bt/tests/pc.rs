//! bt on the deja-pc machine: timer interrupts from the 8254 through the 8259A.

mod common;

use common::{asm, load, real_mode_state};
use deja_bt::BtCpu;
use deja_machine::pc::build_pc;
use deja_machine::{ClockMode, Cpu, Exit, Limit, LiveHost, MachineConfig};
use iced_x86::code_asm::*;

#[test]
fn pit_interrupts_through_the_8259a_wake_hlt_in_real_mode() {
    let config = MachineConfig {
        ram_size: 16 << 20,
        ..MachineConfig::default()
    };
    let mut m = build_pc(
        config,
        Box::new(LiveHost::new(ClockMode::Virtual)),
        Box::new(std::io::sink()),
    )
    .unwrap();
    // IRQ0 -> vector 0x20 -> 0000:0x2000: count in SI, EOI, IRET.
    load(&m, 0x20 * 4, &[0x00, 0x20, 0x00, 0x00]);
    load(
        &m,
        0x2000,
        &asm(16, 0x2000, |a| {
            a.inc(si).unwrap();
            a.mov(al, 0x20).unwrap();
            a.out(0x20, al).unwrap();
            a.iret().unwrap();
        }),
    );
    load(
        &m,
        0x1000,
        &asm(16, 0x1000, |a| {
            let mut wait = a.create_label();
            // 8259A master: ICW1 (edge, ICW4), ICW2 = 0x20, ICW3, ICW4 (8086); unmask IRQ0.
            for (port, v) in [
                (0x20u32, 0x11u32),
                (0x21, 0x20),
                (0x21, 0x04),
                (0x21, 0x01),
                (0x21, 0xfe),
            ] {
                a.mov(al, v).unwrap();
                a.out(port, al).unwrap();
            }
            // 8254 channel 0, mode 2, divisor 1193 (about 1 kHz).
            a.mov(al, 0x34u32).unwrap();
            a.out(0x43, al).unwrap();
            a.mov(al, 0xa9u32).unwrap();
            a.out(0x40, al).unwrap();
            a.mov(al, 0x04u32).unwrap();
            a.out(0x40, al).unwrap();
            a.xor(si, si).unwrap();
            a.sti().unwrap();
            a.set_label(&mut wait).unwrap();
            a.hlt().unwrap();
            a.cmp(si, 3).unwrap();
            a.jb(wait).unwrap();
            a.mov(al, 0).unwrap();
            a.out(0xf4, al).unwrap();
        }),
    );
    let mut cpu = BtCpu::new(&m).unwrap();
    cpu.set_state(&real_mode_state(0x1000)).unwrap();
    let mut done = false;
    for _ in 0..100_000 {
        let e = cpu
            .run(
                &mut m,
                Limit {
                    stop_at_icount: Some(cpu.icount() + 10_000),
                },
            )
            .unwrap();
        if m.take_stop().is_some() {
            done = true;
            break;
        }
        match e {
            Exit::Halted => {
                m.poll();
                if !m.interrupt_pending() {
                    m.idle();
                }
            }
            Exit::DeviceAccess | Exit::InstructionLimit => m.poll(),
            other => panic!("unexpected exit {other:?}"),
        }
    }
    assert!(done, "the guest never wrote debug-exit");
    let st = cpu.state().unwrap();
    assert_eq!(st.gpr[6] & 0xffff, 3);
    assert!(cpu.stats().get("bt.interrupts") >= 3);
}
