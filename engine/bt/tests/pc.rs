//! bt on the deja-pc machine: timer interrupts from the 8254 through the 8259A.

mod common;

use common::{asm, load, real_mode_state};
use deja_bt::BtCpu;
use deja_machine::pc::build_pc;
use deja_machine::{ClockMode, Cpu, Exit, Limit, LiveHost, Machine, MachineConfig};
use iced_x86::code_asm::*;

/// A deja-pc machine with 16 MiB of RAM on the virtual clock.
fn pc_machine() -> Machine {
    let config = MachineConfig {
        ram_size: 16 << 20,
        ..MachineConfig::default()
    };
    build_pc(
        config,
        Box::new(LiveHost::new(ClockMode::Virtual)),
        Box::new(std::io::sink()),
    )
    .unwrap()
}

/// Runs the guest until it writes debug-exit (`true`), polling devices between runs, for at
/// most `rounds` runs of 10,000 instructions. A halted guest with nothing to wake it idles
/// until the next device deadline when `idle`, and ends the run (`false`) otherwise.
fn run_until_debug_exit(cpu: &mut BtCpu, m: &mut Machine, rounds: usize, idle: bool) -> bool {
    for _ in 0..rounds {
        let e = cpu
            .run(
                m,
                Limit {
                    stop_at_icount: Some(cpu.icount() + 10_000),
                    ..Default::default()
                },
            )
            .unwrap();
        if m.take_stop().is_some() {
            return true;
        }
        match e {
            Exit::Halted => {
                m.poll();
                if !m.interrupt_pending() {
                    if !idle {
                        return false;
                    }
                    m.idle();
                }
            }
            Exit::DeviceAccess | Exit::InstructionLimit => m.poll(),
            other => panic!("unexpected exit {other:?}"),
        }
    }
    false
}

#[test]
fn pit_interrupts_through_the_8259a_wake_hlt_in_real_mode() {
    let mut m = pc_machine();
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
    let done = run_until_debug_exit(&mut cpu, &mut m, 100_000, true);
    assert!(done, "the guest never wrote debug-exit");
    let st = cpu.state().unwrap();
    assert_eq!(st.gpr[6] & 0xffff, 3);
    assert!(cpu.stats().get("bt.interrupts") >= 3);
}

/// How the FERR# test's IRQ13 handler and main code behave.
#[derive(Debug, Clone, Copy, PartialEq)]
enum FerrCase {
    /// The handler writes port 0xF0 and clears the error with FNCLEX.
    HandlerClears,
    /// The handler only writes port 0xF0: the FWAIT then runs past the error (IGNNE#), and
    /// so does a second one; FNCLEX drops FERR#, and a new error raises IRQ13 again.
    HandlerOnlyIgnores,
    /// Interrupts are off: the CPU waits at the FWAIT.
    InterruptsOff,
    /// CR0.NE set: #MF instead of IRQ13.
    NativeErrors,
}

/// Real mode on deja-pc with an unmasked x87 zero divide and FWAIT; returns the CPU, the
/// machine, whether the guest reached its end, and the FWAIT's address.
fn ferr_run(case: FerrCase) -> (BtCpu, Machine, bool, u64) {
    let mut m = pc_machine();
    // IRQ13 -> vector 0x2d -> 0000:0x2000: count in SI, the pushed IP at 0x3000, port 0xF0,
    // FNCLEX if the byte at 0x3010 says so, EOI to both 8259As, IRET.
    load(&m, 0x2d * 4, &[0x00, 0x20, 0x00, 0x00]);
    load(&m, 0x3010, &[u8::from(case == FerrCase::HandlerClears)]);
    load(
        &m,
        0x2000,
        &asm(16, 0x2000, |a| {
            let mut keep = a.create_label();
            a.inc(si).unwrap();
            a.mov(bp, sp).unwrap();
            a.mov(ax, word_ptr(bp)).unwrap();
            a.mov(word_ptr(0x3000), ax).unwrap();
            a.out(0xf0, al).unwrap();
            a.cmp(byte_ptr(0x3010), 1).unwrap();
            a.jne(keep).unwrap();
            a.fnclex().unwrap();
            a.set_label(&mut keep).unwrap();
            a.mov(al, 0x20).unwrap();
            a.out(0xa0, al).unwrap();
            a.out(0x20, al).unwrap();
            a.iret().unwrap();
        }),
    );
    // #MF (vector 16) -> 0000:0x2100: DI = 0x16, FNCLEX, IRET.
    load(&m, 16 * 4, &[0x00, 0x21, 0x00, 0x00]);
    load(
        &m,
        0x2100,
        &asm(16, 0x2100, |a| {
            a.mov(di, 0x16).unwrap();
            a.fnclex().unwrap();
            a.iret().unwrap();
        }),
    );
    load(&m, 0x3020, &0x037bu16.to_le_bytes()); // FCW: zero divide unmasked
    let mut fwait_at = 0;
    let code = asm(16, 0x1000, |a| {
        // Master: vectors 0x20.., slave on IR2, only IR2 unmasked; slave: vectors 0x28..,
        // only IR5 (IRQ13) unmasked.
        for (port, v) in [
            (0x20u32, 0x11u32),
            (0x21, 0x20),
            (0x21, 0x04),
            (0x21, 0x01),
            (0x21, 0xfb),
            (0xa0, 0x11),
            (0xa1, 0x28),
            (0xa1, 0x02),
            (0xa1, 0x01),
            (0xa1, 0xdf),
        ] {
            a.mov(al, v).unwrap();
            a.out(port, al).unwrap();
        }
        let zero_divide = |a: &mut CodeAssembler| {
            a.fld1().unwrap();
            a.fldz().unwrap();
            a.fdivp(st1, st0).unwrap();
        };
        a.xor(si, si).unwrap();
        a.xor(di, di).unwrap();
        a.fninit().unwrap();
        a.fldcw(word_ptr(0x3020)).unwrap();
        zero_divide(a);
        if case == FerrCase::InterruptsOff {
            a.cli().unwrap();
        } else {
            a.sti().unwrap();
        }
        a.nop().unwrap();
        let mut here = a.create_label();
        a.set_label(&mut here).unwrap();
        a.wait().unwrap();
        if case == FerrCase::HandlerOnlyIgnores {
            a.wait().unwrap();
            a.fnclex().unwrap();
            zero_divide(a);
            a.wait().unwrap();
        }
        a.mov(al, 0).unwrap();
        a.out(0xf4, al).unwrap();
        a.hlt().unwrap();
    });
    // The FWAIT follows the first NOP after STI/CLI.
    let insns: Vec<_> = iced_x86::Decoder::with_ip(16, &code, 0x1000, 0)
        .iter()
        .collect();
    for w in insns.windows(2) {
        if w[0].mnemonic() == iced_x86::Mnemonic::Nop && fwait_at == 0 {
            fwait_at = w[1].ip();
        }
    }
    load(&m, 0x1000, &code);
    let mut state = real_mode_state(0x1000);
    if case == FerrCase::NativeErrors {
        state.cr0 |= 1 << 5;
    }
    let mut cpu = BtCpu::new(&m).unwrap();
    cpu.set_state(&state).unwrap();
    let done = run_until_debug_exit(&mut cpu, &mut m, 100, false);
    (cpu, m, done, fwait_at)
}

#[test]
fn with_cr0_ne_clear_x87_errors_raise_irq13_through_ferr_and_port_f0_asserts_ignne() {
    use deja_machine::cpu::X87ErrorPins;
    // The handler clears the error: one IRQ13, taken at the FWAIT (the CPU waited there),
    // which then runs without an error; FERR# is gone.
    let (mut cpu, _m, done, fwait) = ferr_run(FerrCase::HandlerClears);
    let st = cpu.state().unwrap();
    assert!(done, "{st}");
    assert_eq!(st.gpr[6] & 0xffff, 1, "one IRQ13");
    assert_eq!(st.gpr[7] & 0xffff, 0, "no #MF");
    assert_eq!(
        u64::from(u16::from_le_bytes(peek2(&_m, 0x3000))),
        fwait,
        "the handler's frame points at the waiting FWAIT"
    );
    assert_eq!(st.fpu.fsw & 0x80, 0, "FSW.ES cleared by the handler");
    assert_eq!(st.x87_error_pins, X87ErrorPins::default());
    assert_eq!(cpu.stats().get("bt.x87_ferr"), 1);

    // The handler only writes 0xF0: IGNNE# lets both FWAITs run with the error pending;
    // FNCLEX drops FERR# and IGNNE#, so the next error raises IRQ13 again.
    let (mut cpu, _m, done, _) = ferr_run(FerrCase::HandlerOnlyIgnores);
    let st = cpu.state().unwrap();
    assert!(done, "{st}");
    assert_eq!(st.gpr[6] & 0xffff, 2, "two IRQ13s");
    assert_ne!(st.fpu.fsw & 0x80, 0, "the last error is still pending");
    assert_eq!(
        st.x87_error_pins,
        X87ErrorPins {
            ferr: true,
            ignne: true
        }
    );

    // IF clear: the CPU waits at the FWAIT with FERR# asserted and IRQ13 requested.
    let (mut cpu, m, done, fwait) = ferr_run(FerrCase::InterruptsOff);
    let st = cpu.state().unwrap();
    assert!(!done);
    assert_eq!(st.rip, fwait, "waiting at the FWAIT, not past it");
    assert!(st.pending.halted);
    assert!(m.interrupt_pending(), "IRQ13 is requested");
    assert_eq!(
        st.x87_error_pins,
        X87ErrorPins {
            ferr: true,
            ignne: false
        }
    );

    // CR0.NE set: #MF, no IRQ13.
    let (mut cpu, _m, done, _) = ferr_run(FerrCase::NativeErrors);
    let st = cpu.state().unwrap();
    assert!(done, "{st}");
    assert_eq!(st.gpr[7] & 0xffff, 0x16, "#MF");
    assert_eq!(st.gpr[6] & 0xffff, 0, "no IRQ13");
    assert_eq!(st.x87_error_pins, X87ErrorPins::default());
}

fn peek2(m: &Machine, addr: u64) -> [u8; 2] {
    use deja_machine::vm_memory::{Bytes, GuestAddress};
    m.mem.read_obj(GuestAddress(addr)).unwrap()
}
