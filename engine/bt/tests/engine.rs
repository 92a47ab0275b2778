//! Engine behaviour: exact icount, code coherence, device exits, HLT and interrupts,
//! exceptions with error codes, mode switches.

mod common;

use common::*;
use deja_machine::cpu::seg;
use deja_machine::{Cpu, Exit, Limit};
use iced_x86::code_asm::*;

fn loop_guest(m: &deja_machine::Machine) -> deja_machine::CpuState {
    let code = asm(64, 0x20_0000, |a| {
        let mut top = a.create_label();
        a.mov(ecx, 1000).unwrap();
        a.xor(eax, eax).unwrap();
        a.set_label(&mut top).unwrap();
        a.add(eax, ecx).unwrap();
        a.mov(qword_ptr(0x30_0000u64 as i64 as u64), rax).unwrap();
        a.imul_2(ebx, eax).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    });
    load(m, 0x20_0000, &code);
    long_mode_state(m, 0x20_0000)
}

#[test]
fn stopping_at_every_instruction_count_gives_the_same_final_state() {
    let (mut m1, _, _) = machine();
    let s = loop_guest(&m1);
    let mut whole = cpu(&m1, &s);
    assert_eq!(run(&mut whole, &mut m1, u64::MAX), Exit::Halted);
    let total = whole.icount();
    assert_eq!(total, 2 + 5 * 1000 + 1);
    let expect = whole.state().unwrap();

    let (mut m2, _, _) = machine();
    let s = loop_guest(&m2);
    let mut steps = cpu(&m2, &s);
    // Irregular stops, including single steps.
    let mut n = 0u64;
    let mut k = 0u64;
    loop {
        k += 1;
        n = (n + k % 7).min(total);
        let exit = steps
            .run(
                &mut m2,
                Limit {
                    stop_at_icount: Some(n),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(steps.icount(), n.min(steps.icount()).max(steps.icount()));
        if exit == Exit::Halted {
            break;
        }
        assert_eq!(exit, Exit::InstructionLimit);
        assert_eq!(steps.icount(), n, "stopped at the wrong count");
    }
    assert_eq!(steps.icount(), total);
    let got = steps.state().unwrap();
    assert!(got.diff(&expect).is_empty(), "{:?}", got.diff(&expect));
    let st = steps.stats();
    assert!(st.get("bt.chained") > 0 || whole.stats().get("bt.chained") > 0);
}

/// A loop whose blocks mix flag producers whose flags are dead inside the block (IMUL,
/// shifts and rotates by immediates, ADD) with flag readers (ADC, RCL, SETcc, CMOVcc, Jcc),
/// a store, and a call and return, so stops inside and between chained blocks see flags
/// that dead-flag elimination skipped when the block runs whole.
fn flag_mix_guest(m: &deja_machine::Machine) -> deja_machine::CpuState {
    let code = asm(64, 0x20_0000, |a| {
        let mut top = a.create_label();
        let mut func = a.create_label();
        let mut skip = a.create_label();
        a.mov(rbx, 0x5851_f42d_4c95_7f2du64).unwrap();
        a.mov(eax, 1).unwrap();
        a.mov(r15d, 9).unwrap();
        a.set_label(&mut top).unwrap();
        a.imul_2(rax, rbx).unwrap();
        a.add(rax, r15).unwrap();
        a.ror(rax, 13).unwrap();
        a.shl(edx, 3).unwrap();
        a.imul_3(ecx, eax, 0x1234_5677).unwrap();
        a.sar(rcx, 5).unwrap();
        a.adc(rdx, rcx).unwrap();
        a.rol(ax, 9).unwrap();
        a.rcl(rsi, 1).unwrap();
        a.shr(r8d, 31).unwrap();
        a.xor(rax, rbx).unwrap();
        a.setc(dil).unwrap();
        a.mov(qword_ptr(0x30_0000u64 as i64 as u64), rax).unwrap();
        a.call(func).unwrap();
        a.imul_2(r9w, dx).unwrap();
        a.cmovs(r10, rax).unwrap();
        a.test(r15b, 1).unwrap();
        a.jz(skip).unwrap();
        a.sal(r11, 7).unwrap();
        a.add(r11, rcx).unwrap();
        a.set_label(&mut skip).unwrap();
        a.dec(r15).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
        a.set_label(&mut func).unwrap();
        a.ror(r12, 1).unwrap();
        a.add(r12, rax).unwrap();
        a.mul(rbx).unwrap();
        a.sub(r13, rdx).unwrap();
        a.ret().unwrap();
    });
    load(m, 0x20_0000, &code);
    long_mode_state(m, 0x20_0000)
}

#[test]
fn a_stop_at_any_instruction_count_sees_the_state_single_steps_see() {
    // Reference: one instruction per run without dead-flag elimination (so it does not rely
    // on partly run blocks producing every flag, which is what the stops below check).
    let (mut m1, _, _) = machine();
    let s = flag_mix_guest(&m1);
    let mut stepper = cpu(&m1, &s);
    stepper.set_dead_flag_elimination(false);
    let mut states = vec![stepper.state().unwrap()];
    loop {
        let next = stepper.icount() + 1;
        let exit = stepper
            .run(
                &mut m1,
                Limit {
                    stop_at_icount: Some(next),
                    ..Default::default()
                },
            )
            .unwrap();
        states.push(stepper.state().unwrap());
        if exit == Exit::Halted {
            break;
        }
        assert_eq!(exit, Exit::InstructionLimit);
        assert_eq!(stepper.icount(), next);
    }
    let total = stepper.icount();
    assert_eq!(states.len() as u64, total + 1);
    assert!(total > 200, "the loop ran {total} instructions");
    // Every stop from a fresh start, through whole and chained blocks.
    for (n, expect) in states.iter().enumerate().skip(1) {
        let (mut m2, _, _) = machine();
        let s = flag_mix_guest(&m2);
        let mut c = cpu(&m2, &s);
        let exit = c
            .run(
                &mut m2,
                Limit {
                    stop_at_icount: Some(n as u64),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(
            c.icount(),
            n as u64,
            "stopped at the wrong count ({exit:?})"
        );
        let got = c.state().unwrap();
        assert!(
            got.diff(expect).is_empty(),
            "stop at {n}: {:?}",
            got.diff(expect)
        );
        if n as u64 == total {
            assert!(c.stats().get("bt.chained") > 0, "the blocks never chained");
        }
    }
}

#[test]
fn chaining_and_lookup_counters_move() {
    let (mut m, _, _) = machine();
    let s = loop_guest(&m);
    let mut c = cpu(&m, &s);
    run(&mut c, &mut m, u64::MAX);
    let st = c.stats();
    assert!(st.get("bt.blocks_translated") >= 2, "{st:?}");
    // Chained by the run loop, or by compiled blocks themselves (tier 1).
    assert!(
        st.get("bt.chained") + st.get("bt.tier1.chains") >= 900,
        "{st:?}"
    );
    assert_eq!(st.get("bt.instructions"), 5003);
}

#[test]
fn store_into_the_next_instruction_runs_the_new_code() {
    let (mut m, _, _) = machine();
    // mov byte [rip+patch+1], 42 patches the immediate of the following "mov eax, 1".
    // mov rdi, imm64 (10) + mov byte [rdi], 42 (3): the patched mov starts at +13.
    let code = asm(64, 0x20_0000, |a| {
        a.mov(rdi, 0x20_000eu64).unwrap();
        a.mov(byte_ptr(rdi), 42).unwrap();
        a.mov(eax, 1).unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(code[13], 0xb8);
    load(&m, 0x20_0000, &code);
    let s = long_mode_state(&m, 0x20_0000);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 100), Exit::Halted);
    assert_eq!(c.state().unwrap().gpr[0], 42);
    assert!(c.stats().get("bt.invalidations") >= 1);
}

#[test]
fn store_into_a_later_block_invalidates_only_it_and_reruns_new_code() {
    let (mut m, _, _) = machine();
    // Run a function once, patch its immediate, run it again.
    let f = 0x20_0800u64;
    load(
        &m,
        f,
        &asm(64, f, |a| {
            a.mov(eax, 7).unwrap();
            a.ret().unwrap();
        }),
    );
    let code = asm(64, 0x20_0000, |a| {
        a.mov(rsi, f).unwrap();
        a.call(rsi).unwrap();
        a.mov(ebx, eax).unwrap();
        a.mov(rdi, f + 1).unwrap();
        a.mov(byte_ptr(rdi), 9).unwrap();
        a.call(rsi).unwrap();
        a.hlt().unwrap();
    });
    load(&m, 0x20_0000, &code);
    let s = long_mode_state(&m, 0x20_0000);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 100), Exit::Halted);
    let st = c.state().unwrap();
    assert_eq!((st.gpr[3], st.gpr[0]), (7, 9));
    assert_eq!(c.stats().get("bt.invalidations"), 1);
}

#[test]
fn store_into_the_running_block_ends_it_after_the_store() {
    let (mut m, _, _) = machine();
    // A loop whose body rewrites its own "add eax, imm8" immediate each iteration.
    // mov ecx (5) + xor (2) + mov dl (2) + mov rdi imm64 (10) = 19: top; the store is 2
    // bytes, so "add ebx, imm8" (83 c3 ib) starts at 21 and its immediate is at 23.
    let code = asm(64, 0x20_0000, |a| {
        let mut top = a.create_label();
        a.mov(ecx, 3).unwrap();
        a.xor(eax, eax).unwrap();
        a.mov(dl, 1).unwrap();
        a.mov(rdi, 0x20_0017u64).unwrap();
        a.set_label(&mut top).unwrap();
        a.mov(byte_ptr(rdi), dl).unwrap();
        a.add(ebx, 100).unwrap();
        a.shl(dl, 1).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(&code[21..24], &[0x83, 0xc3, 100]);
    load(&m, 0x20_0000, &code);
    let s = long_mode_state(&m, 0x20_0000);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 1000), Exit::Halted);
    assert_eq!(c.state().unwrap().gpr[3], 1 + 2 + 4);
}

#[test]
fn code_replaced_behind_the_cpu_runs_as_new_code() {
    let (mut m, _, _) = machine();
    let f = 0x20_0000u64;
    load(
        &m,
        f,
        &asm(64, f, |a| {
            a.mov(eax, 1).unwrap();
            a.hlt().unwrap();
        }),
    );
    let s = long_mode_state(&m, f);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 100), Exit::Halted);
    assert_eq!(c.state().unwrap().gpr[0], 1);
    // A loader (or DMA) replaces the page's code without a CPU store.
    load(
        &m,
        f,
        &asm(64, f, |a| {
            a.mov(eax, 2).unwrap();
            a.hlt().unwrap();
        }),
    );
    c.set_state(&s).unwrap();
    assert_eq!(run(&mut c, &mut m, 100), Exit::Halted);
    assert_eq!(c.state().unwrap().gpr[0], 2);
}

#[test]
fn port_and_mmio_accesses_exit_after_the_instruction_with_exact_position() {
    let (mut m, log, _) = machine();
    let code = asm(64, 0x20_0000, |a| {
        a.mov(dx, TEST_PORT as u32).unwrap();
        a.mov(al, 0x11).unwrap();
        a.out(dx, al).unwrap();
        a.in_(eax, dx).unwrap();
        a.mov(dword_ptr(TEST_MMIO), eax).unwrap();
        a.mov(ebx, dword_ptr(TEST_MMIO + 4)).unwrap();
        a.mov(dx, STOP_PORT as u32).unwrap();
        a.out(dx, al).unwrap();
    });
    load(&m, 0x20_0000, &code);
    let s = long_mode_state(&m, 0x20_0000);
    let mut c = cpu(&m, &s);
    let e = c.run(&mut m, Limit::default()).unwrap();
    assert_eq!(e, Exit::DeviceAccess);
    assert_eq!(c.icount(), 3);
    assert_eq!(m.position().icount, 2);
    assert_eq!(run(&mut c, &mut m, 100), Exit::StopRequested);
    let log = log.lock().unwrap();
    assert_eq!(log[0], (TEST_PORT as u64, vec![0x11], true));
    assert_eq!(log[1], (TEST_PORT as u64, vec![1, 2, 3, 4], false));
    assert_eq!(log[2], (TEST_MMIO, vec![1, 2, 3, 4], true));
    assert_eq!(log[3], (TEST_MMIO + 4, vec![5, 6, 7, 8], false));
    assert_eq!(c.state().unwrap().gpr[3], 0x0807_0605);
}

#[test]
fn real_mode_interrupt_through_the_ivt_wakes_hlt() {
    let (mut m, _, lines) = machine();
    // IVT[0x21] -> 0000:0x2000, which counts in BX and returns.
    load(&m, 0x21 * 4, &[0x00, 0x20, 0x00, 0x00]);
    load(
        &m,
        0x2000,
        &asm(16, 0x2000, |a| {
            a.inc(bx).unwrap();
            a.iret().unwrap();
        }),
    );
    load(
        &m,
        0x1000,
        &asm(16, 0x1000, |a| {
            a.sti().unwrap();
            a.hlt().unwrap();
            a.mov(dx, STOP_PORT as u32).unwrap();
            a.out(dx, al).unwrap();
        }),
    );
    let s = real_mode_state(0x1000);
    let mut c = cpu(&m, &s);
    let e = c.run(&mut m, Limit::default()).unwrap();
    assert_eq!(e, Exit::Halted);
    assert_eq!(c.run(&mut m, Limit::default()).unwrap(), Exit::Halted);
    *lines.lock().unwrap() |= 2;
    assert_eq!(run(&mut c, &mut m, 100), Exit::StopRequested);
    let st = c.state().unwrap();
    assert_eq!(st.gpr[3] & 0xffff, 1);
    assert_eq!(st.gpr[4], 0x7000);
    assert_eq!(c.stats().get("bt.interrupts"), 1);
}

#[test]
fn sti_shadow_delays_the_interrupt_by_one_instruction() {
    let (mut m, _, lines) = machine();
    load(&m, 0x21 * 4, &[0x00, 0x20, 0x00, 0x00]);
    // The handler records CX (how many INC CX ran before it).
    load(
        &m,
        0x2000,
        &asm(16, 0x2000, |a| {
            a.mov(bx, cx).unwrap();
            a.iret().unwrap();
        }),
    );
    load(
        &m,
        0x1000,
        &asm(16, 0x1000, |a| {
            a.sti().unwrap();
            a.inc(cx).unwrap();
            a.inc(cx).unwrap();
            a.mov(dx, STOP_PORT as u32).unwrap();
            a.out(dx, al).unwrap();
        }),
    );
    *lines.lock().unwrap() |= 2;
    let s = real_mode_state(0x1000);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 100), Exit::StopRequested);
    assert_eq!(c.state().unwrap().gpr[3] & 0xffff, 1);
}

#[test]
fn page_fault_pushes_the_error_code_and_sets_cr2() {
    let (mut m, _, _) = machine();
    let handler = 0x20_1000u64;
    load(
        &m,
        handler,
        &asm(64, handler, |a| {
            a.pop(rbx).unwrap(); // error code
            a.mov(rcx, cr2).unwrap();
            a.hlt().unwrap();
        }),
    );
    let code = asm(64, 0x20_0000, |a| {
        a.mov(rax, 0x4000_0000u64).unwrap();
        a.mov(dword_ptr(rax), 1).unwrap();
    });
    load(&m, 0x20_0000, &code);
    let s = long_mode_state(&m, 0x20_0000);
    load(&m, IDT + 14 * 16, &gate(handler));
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 100), Exit::Halted);
    let st = c.state().unwrap();
    assert_eq!(st.gpr[3], 2, "not-present write in ring 0");
    assert_eq!(st.gpr[1], 0x4000_0000);
}

#[test]
fn divide_error_and_general_protection_from_ring3() {
    let (mut m, _, _) = machine();
    let h0 = 0x20_1000u64;
    let h13 = 0x20_1100u64;
    load(
        &m,
        h0,
        &asm(64, h0, |a| {
            a.mov(r8, 0xdeu64).unwrap();
            a.add(qword_ptr(rsp), 2).unwrap(); // skip the 2-byte div
            a.iretq().unwrap();
        }),
    );
    load(
        &m,
        h13,
        &asm(64, h13, |a| {
            a.pop(r9).unwrap();
            a.mov(r10, qword_ptr(rsp) + 8).unwrap(); // CS of the interrupted code
            a.hlt().unwrap();
        }),
    );
    load(&m, IDT, &gate(h0));
    load(&m, IDT + 13 * 16, &gate(h13));
    // Ring 0 goes to ring 3 through IRETQ; ring 3 divides by zero, then runs CLI.
    let user = 0x20_2000u64;
    load(
        &m,
        user,
        &asm(64, user, |a| {
            a.xor(ecx, ecx).unwrap();
            a.div(ecx).unwrap();
            a.cli().unwrap();
        }),
    );
    let code = asm(64, 0x20_0000, |a| {
        a.push(0x2b).unwrap(); // SS = data ring 3
        a.push(0x9000).unwrap();
        a.push(0x202).unwrap();
        a.push(0x33).unwrap(); // CS = code64 ring 3
        a.mov(rax, user).unwrap();
        a.push(rax).unwrap();
        a.iretq().unwrap();
    });
    load(&m, 0x20_0000, &code);
    let s = long_mode_state(&m, 0x20_0000);
    // RSP0 for the ring transition.
    load(&m, TSS + 4, &0xa000u64.to_le_bytes());
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 200), Exit::Halted);
    let st = c.state().unwrap();
    assert_eq!(st.gpr[8], 0xde);
    assert_eq!(st.gpr[9], 0, "#GP(0) for CLI at CPL 3 with IOPL 0");
    assert_eq!(st.gpr[10], 0x33);
    assert_eq!(st.seg[seg::CS].dpl, 0);
    assert_eq!(c.stats().get("bt.exceptions.13"), 1);
    assert_eq!(c.stats().get("bt.exceptions.0"), 1);
}

#[test]
fn missing_idt_entries_triple_fault_into_shutdown() {
    let (mut m, _, _) = machine();
    let code = asm(64, 0x20_0000, |a| {
        a.ud2().unwrap();
    });
    load(&m, 0x20_0000, &code);
    let mut s = long_mode_state(&m, 0x20_0000);
    s.idtr.limit = 0;
    let mut c = cpu(&m, &s);
    assert!(matches!(run(&mut c, &mut m, 100), Exit::Shutdown { .. }));
}

/// A 64-bit interrupt gate to `target` in the ring-0 code segment.
fn gate(target: u64) -> [u8; 16] {
    let lo =
        (target & 0xffff) | (0x18u64 << 16) | (0x8eu64 << 40) | ((target >> 16) & 0xffff) << 48;
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&lo.to_le_bytes());
    b[8..].copy_from_slice(&(target >> 32).to_le_bytes());
    b
}

#[test]
fn real_to_protected_to_long_mode_switch() {
    let (mut m, _, _) = machine();
    write_gdt(&m, true);
    // GDT pointer at 0x600.
    let mut ptr = vec![0x4fu8, 0];
    ptr.extend_from_slice(&(GDT as u32).to_le_bytes());
    load(&m, 0x600, &ptr);
    // Identity-mapped page tables (as long_mode_state builds them).
    let _ = long_mode_state(&m, 0);
    load(
        &m,
        0x1000,
        &asm(16, 0x1000, |a| {
            a.cli().unwrap();
            a.lgdt(ptr_operand16(0x600)).unwrap();
            a.mov(eax, cr0).unwrap();
            a.or(eax, 1).unwrap();
            a.mov(cr0, eax).unwrap();
            a.jmp_far(0x08, 0x2000).unwrap();
        }),
    );
    load(
        &m,
        0x2000,
        &asm(32, 0x2000, |a| {
            a.mov(ax, 0x10).unwrap();
            a.mov(ds, ax).unwrap();
            a.mov(es, ax).unwrap();
            a.mov(ss, ax).unwrap();
            a.mov(esp, 0x8000).unwrap();
            a.mov(eax, cr4).unwrap();
            a.or(eax, 0x20).unwrap();
            a.mov(cr4, eax).unwrap();
            a.mov(eax, PML4 as u32).unwrap();
            a.mov(cr3, eax).unwrap();
            a.mov(ecx, 0xc000_0080u32).unwrap();
            a.rdmsr().unwrap();
            a.or(eax, 0x100).unwrap();
            a.wrmsr().unwrap();
            a.mov(eax, cr0).unwrap();
            a.or(eax, 0x8000_0000u32).unwrap();
            a.mov(cr0, eax).unwrap();
            a.jmp_far(0x18, 0x3000).unwrap();
        }),
    );
    load(
        &m,
        0x3000,
        &asm(64, 0x3000, |a| {
            a.mov(rax, 0x1234_5678_9abc_def0u64).unwrap();
            a.push(rax).unwrap();
            a.pop(rbx).unwrap();
            a.mov(dx, STOP_PORT as u32).unwrap();
            a.out(dx, al).unwrap();
        }),
    );
    let s = real_mode_state(0x1000);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 1000), Exit::StopRequested);
    let st = c.state().unwrap();
    assert_eq!(st.gpr[3], 0x1234_5678_9abc_def0);
    assert_eq!(st.efer & 0x500, 0x500, "LME and LMA");
    assert!(st.seg[seg::CS].l);
    assert_eq!(st.seg[seg::SS].selector, 0x10);
}

fn ptr_operand16(addr: u64) -> AsmMemoryOperand {
    ptr(addr)
}

/// A 64-bit gate with a DPL.
fn gate_dpl(target: u64, dpl: u8) -> [u8; 16] {
    let mut g = gate(target);
    g[5] = 0x8e | (dpl << 5);
    g
}

#[test]
fn cli_sti_popf_in_ring3_follow_iopl() {
    for iopl in 0..4u64 {
        let (mut m, _, _) = machine();
        let gp = 0x20_1000u64;
        load(
            &m,
            gp,
            &asm(64, gp, |a| {
                a.inc(r12).unwrap();
                a.pop(r13).unwrap();
                a.add(qword_ptr(rsp), 1).unwrap(); // skip the 1-byte CLI/STI
                a.iretq().unwrap();
            }),
        );
        let done = 0x20_1100u64;
        load(&m, done, &asm(64, done, |a| a.hlt().unwrap()));
        load(&m, IDT + 13 * 16, &gate(gp));
        load(&m, IDT + 0x80 * 16, &gate_dpl(done, 3));
        let user = 0x20_2000u64;
        load(
            &m,
            user,
            &asm(64, user, |a| {
                a.cli().unwrap();
                a.pushfq().unwrap();
                a.pop(r8).unwrap();
                a.push(0x2).unwrap();
                a.popfq().unwrap();
                a.pushfq().unwrap();
                a.pop(r9).unwrap();
                a.sti().unwrap();
                a.pushfq().unwrap();
                a.pop(r10).unwrap();
                a.int(0x80).unwrap();
            }),
        );
        load(
            &m,
            0x20_0000,
            &asm(64, 0x20_0000, |a| {
                a.push(0x2b).unwrap();
                a.push(0x9000).unwrap();
                a.push((0x202 | (iopl << 12)) as i32).unwrap();
                a.push(0x33).unwrap();
                a.mov(rax, user).unwrap();
                a.push(rax).unwrap();
                a.iretq().unwrap();
            }),
        );
        let s = long_mode_state(&m, 0x20_0000);
        load(&m, TSS + 4, &0xa000u64.to_le_bytes());
        let mut c = cpu(&m, &s);
        assert_eq!(run(&mut c, &mut m, 500), Exit::Halted, "iopl {iopl}");
        let st = c.state().unwrap();
        let (if_, iopl_bits) = (1u64 << 9, 3u64 << 12);
        let (r8v, r9v, r10v, gps) = (st.gpr[8], st.gpr[9], st.gpr[10], st.gpr[12]);
        if iopl == 3 {
            assert_eq!(gps, 0, "iopl 3: no #GP");
            assert_eq!(r8v & if_, 0, "iopl 3: CLI clears IF");
            assert_eq!(r9v & if_, 0, "iopl 3: POPF changes IF");
            assert_ne!(r10v & if_, 0, "iopl 3: STI sets IF");
        } else {
            assert_eq!(gps, 2, "iopl {iopl}: CLI and STI fault");
            assert_eq!(st.gpr[13], 0, "#GP(0)");
            assert_ne!(r8v & if_, 0, "iopl {iopl}: IF kept after faulting CLI");
            assert_ne!(r9v & if_, 0, "iopl {iopl}: POPF leaves IF silently");
            assert_ne!(r10v & if_, 0);
        }
        for v in [r8v, r9v, r10v] {
            assert_eq!(v & iopl_bits, iopl << 12, "ring 3 never changes IOPL");
        }
    }
}

#[test]
fn bcd_and_far_call_through_a_call_gate_in_32_bit_mode() {
    let (mut m, _, _) = machine();
    // Call gate in GDT slot 9 (0x48): to the ring-0 code32 segment, 0x2100, DPL 3.
    let target = 0x2100u64;
    let gate = (target & 0xffff) | (0x08u64 << 16) | (0xecu64 << 40) | ((target >> 16) << 48);
    load(&m, GDT + 0x48, &gate.to_le_bytes());
    load(
        &m,
        0x2100,
        &asm(32, 0x2100, |a| {
            a.mov(esi, 0x1234).unwrap();
            a.retf().unwrap();
        }),
    );
    load(
        &m,
        0x2000,
        &asm(32, 0x2000, |a| {
            a.mov(al, 0x19).unwrap();
            a.add(al, 0x28).unwrap();
            a.daa().unwrap();
            a.mov(bl, al).unwrap();
            a.mov(al, 0x10).unwrap();
            a.sub(al, 0x01).unwrap();
            a.das().unwrap();
            a.mov(bh, al).unwrap();
            a.call_far(0x48, 0).unwrap();
            a.hlt().unwrap();
        }),
    );
    let mut s = protected_mode_state(&m, 0x2000);
    s.gdtr.limit = 0x4f;
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 100), Exit::Halted);
    let st = c.state().unwrap();
    assert_eq!(
        st.gpr[3] & 0xffff,
        0x0947,
        "DAA 0x19+0x28 = 0x47, DAS 0x10-0x01 = 0x09"
    );
    assert_eq!(st.gpr[6], 0x1234);
    assert_eq!(st.seg[seg::CS].selector, 0x08);
}

/// A 32-bit interrupt gate to `target` in the ring-0 code segment.
fn gate32(target: u64) -> [u8; 8] {
    let g = (target & 0xffff) | (0x08u64 << 16) | (0x8eu64 << 40) | ((target >> 16) << 48);
    g.to_le_bytes()
}

#[test]
fn segment_load_faults_carry_the_selector_in_the_error_code() {
    // (selector loaded into DS, vector expected, error code expected)
    let cases: [(u16, u8, u32); 4] = [
        (0x60, 13, 0x60),     // beyond the GDT limit
        (0x08 | 3, 13, 0x08), // code segment not readable? it is readable: RPL 3 > DPL 0
        (0x38, 13, 0x38),     // a TSS descriptor is not a data segment
        (0x50, 11, 0x50),     // not present
    ];
    for (sel, vector, code) in cases {
        let (mut m, _, _) = machine();
        let handler = 0x2800u64;
        load(
            &m,
            handler,
            &asm(32, handler, |a| {
                a.pop(ebx).unwrap();
                a.hlt().unwrap();
            }),
        );
        load(&m, IDT + 11 * 8, &gate32(handler));
        load(&m, IDT + 13 * 8, &gate32(handler + 0x10));
        load(
            &m,
            handler + 0x10,
            &asm(32, handler + 0x10, |a| {
                a.pop(ebx).unwrap();
                a.mov(ecx, 13).unwrap();
                a.hlt().unwrap();
            }),
        );
        // GDT slot 10 (0x50): a data segment marked not present.
        load(&m, GDT + 0x50, &0x00cf_1300_0000_ffffu64.to_le_bytes());
        load(
            &m,
            0x2000,
            &asm(32, 0x2000, |a| {
                a.mov(ecx, 11).unwrap();
                a.mov(ax, sel as u32).unwrap();
                a.mov(ds, ax).unwrap();
                a.hlt().unwrap();
            }),
        );
        let mut s = protected_mode_state(&m, 0x2000);
        s.gdtr.limit = 0x57;
        let mut c = cpu(&m, &s);
        assert_eq!(run(&mut c, &mut m, 100), Exit::Halted);
        let st = c.state().unwrap();
        assert_eq!(st.gpr[1] as u8, vector, "selector {sel:#x}");
        assert_eq!(st.gpr[3] as u32, code, "selector {sel:#x}");
    }
}

#[test]
fn syscall_and_sysret_round_trip_between_rings() {
    let (mut m, _, _) = machine();
    let kernel = 0x20_1000u64;
    load(
        &m,
        kernel,
        &asm(64, kernel, |a| {
            a.mov(r8, rcx).unwrap(); // return RIP
            a.mov(r9, r11).unwrap(); // saved RFLAGS
            a.pushfq().unwrap();
            a.pop(r10).unwrap(); // RFLAGS in the kernel (FMASK applied)
            a.sysretq().unwrap();
        }),
    );
    let user = 0x20_2000u64;
    load(
        &m,
        user,
        &asm(64, user, |a| {
            a.syscall().unwrap();
            a.mov(r12, 0x77u64).unwrap();
            a.int(0x80).unwrap();
        }),
    );
    let done = 0x20_1100u64;
    load(&m, done, &asm(64, done, |a| a.hlt().unwrap()));
    load(&m, IDT + 0x80 * 16, &gate_dpl(done, 3));
    load(
        &m,
        0x20_0000,
        &asm(64, 0x20_0000, |a| {
            // STAR: kernel CS 0x18 (SS 0x20); SYSRET base 0x20 -> CS 0x30|3, SS 0x28|3.
            a.mov(ecx, 0xc000_0081u32).unwrap();
            a.xor(eax, eax).unwrap();
            a.mov(edx, 0x0020_0018).unwrap();
            a.wrmsr().unwrap();
            a.mov(ecx, 0xc000_0082u32).unwrap();
            a.mov(eax, kernel as u32).unwrap();
            a.xor(edx, edx).unwrap();
            a.wrmsr().unwrap();
            a.mov(ecx, 0xc000_0084u32).unwrap();
            a.mov(eax, 0x200).unwrap(); // FMASK clears IF
            a.wrmsr().unwrap();
            a.mov(ecx, 0xc000_0080u32).unwrap();
            a.rdmsr().unwrap();
            a.or(eax, 1).unwrap(); // SCE
            a.wrmsr().unwrap();
            a.push(0x2b).unwrap();
            a.push(0x9000).unwrap();
            a.push(0x202).unwrap();
            a.push(0x33).unwrap();
            a.mov(rax, user).unwrap();
            a.push(rax).unwrap();
            a.iretq().unwrap();
        }),
    );
    let s = long_mode_state(&m, 0x20_0000);
    load(&m, TSS + 4, &0xa000u64.to_le_bytes());
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 500), Exit::Halted);
    let st = c.state().unwrap();
    assert_eq!(st.gpr[8], user + 2, "RCX = return RIP");
    assert_ne!(st.gpr[9] & 0x200, 0, "R11 holds the user RFLAGS (IF set)");
    assert_eq!(st.gpr[10] & 0x200, 0, "FMASK cleared IF in the kernel");
    assert_eq!(st.gpr[12], 0x77, "SYSRET returned to ring 3");
}

#[test]
fn sse2_integer_and_move_operations() {
    let (mut m, _, _) = machine();
    let data = 0x30_0000u64;
    let bytes: Vec<u8> = (0..64u8).collect();
    load(&m, data, &bytes);
    load(
        &m,
        0x20_0000,
        &asm(64, 0x20_0000, |a| {
            a.mov(rsi, data).unwrap();
            a.movdqu(xmm0, xmmword_ptr(rsi)).unwrap();
            a.movdqa(xmm1, xmmword_ptr(rsi + 16)).unwrap();
            a.paddd(xmm0, xmm1).unwrap();
            a.movdqu(xmmword_ptr(rsi + 32), xmm0).unwrap();
            a.pxor(xmm2, xmm2).unwrap();
            a.pcmpeqb(xmm2, xmm1).unwrap(); // no zero bytes in 16..32 -> all clear
            a.pmovmskb(eax, xmm2).unwrap();
            a.movq(rbx, xmm1).unwrap();
            a.pshufd(xmm3, xmm1, 0x1b).unwrap();
            a.movd(ecx, xmm3).unwrap();
            a.hlt().unwrap();
        }),
    );
    let s = long_mode_state(&m, 0x20_0000);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 100), Exit::Halted);
    let st = c.state().unwrap();
    let sum = peek(&m, data + 32, 16);
    for lane in 0..4 {
        let a = u32::from_le_bytes(bytes[lane * 4..lane * 4 + 4].try_into().unwrap());
        let b = u32::from_le_bytes(bytes[16 + lane * 4..20 + lane * 4].try_into().unwrap());
        let got = u32::from_le_bytes(sum[lane * 4..lane * 4 + 4].try_into().unwrap());
        assert_eq!(got, a.wrapping_add(b));
    }
    assert_eq!(st.gpr[0], 0);
    assert_eq!(
        st.gpr[3],
        u64::from_le_bytes(bytes[16..24].try_into().unwrap())
    );
    assert_eq!(
        st.gpr[1],
        u32::from_le_bytes(bytes[28..32].try_into().unwrap()) as u64
    );
}

#[test]
fn virtual_8086_mode_enters_by_iret_and_leaves_by_interrupt() {
    let (mut m, _, _) = machine();
    load(&m, TSS + 4, &0xa000u32.to_le_bytes());
    load(&m, TSS + 8, &0x10u32.to_le_bytes());
    let handler = 0x2800u64;
    let mut g = gate32(handler);
    g[5] = 0xee; // DPL 3
    load(&m, IDT + 0x21 * 8, &g);
    load(
        &m,
        handler,
        &asm(32, handler, |a| {
            a.mov(ebx, dword_ptr(esp + 8)).unwrap(); // EFLAGS
            a.mov(ecx, dword_ptr(esp + 4)).unwrap(); // CS
            a.mov(edx, dword_ptr(esp + 20)).unwrap(); // ES
            a.hlt().unwrap();
        }),
    );
    load(
        &m,
        0x1000,
        &asm(16, 0x1000, |a| {
            a.mov(ax, 0x1234).unwrap();
            a.mov(es, ax).unwrap();
            a.int(0x21).unwrap();
        }),
    );
    load(
        &m,
        0x2000,
        &asm(32, 0x2000, |a| {
            for v in [0u32, 0, 0, 0, 0, 0x7000, 0x0002_3202, 0x100, 0] {
                a.push(v as i32).unwrap();
            }
            a.iretd().unwrap();
        }),
    );
    let s = protected_mode_state(&m, 0x2000);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 100), Exit::Halted);
    let st = c.state().unwrap();
    assert_ne!(st.gpr[3] & 0x2_0000, 0, "the pushed EFLAGS has VM set");
    assert_eq!(st.gpr[1], 0x100, "the pushed CS is the real-mode segment");
    assert_eq!(st.gpr[2], 0x1234, "ES was pushed for the monitor");
    assert_eq!(st.gpr[4], 0xa000 - 36);
    assert_eq!(
        st.rflags & 0x2_0000,
        0,
        "the handler runs outside virtual-8086 mode"
    );
    assert_eq!(st.seg[seg::ES].selector, 0, "data segments are cleared");
}

#[test]
fn sse2_scalar_double_arithmetic_conversions_and_compare() {
    let (mut m, _, _) = machine();
    load(
        &m,
        0x20_0000,
        &asm(64, 0x20_0000, |a| {
            a.mov(eax, 7).unwrap();
            a.cvtsi2sd(xmm0, eax).unwrap(); // 7.0
            a.mov(eax, 2).unwrap();
            a.cvtsi2sd(xmm1, eax).unwrap(); // 2.0
            a.divsd(xmm0, xmm1).unwrap(); // 3.5
            a.movapd(xmm2, xmm0).unwrap();
            a.mulsd(xmm2, xmm1).unwrap(); // 7.0
            a.sqrtsd(xmm3, xmm1).unwrap(); // sqrt 2
            a.cvttsd2si(rbx, xmm0).unwrap(); // 3
            a.ucomisd(xmm0, xmm1).unwrap(); // 3.5 > 2.0: CF = ZF = 0
            a.seta(cl).unwrap();
            a.movq(rdx, xmm3).unwrap();
            a.hlt().unwrap();
        }),
    );
    let s = long_mode_state(&m, 0x20_0000);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 100), Exit::Halted);
    let st = c.state().unwrap();
    assert_eq!(st.gpr[3], 3);
    assert_eq!(st.gpr[1] & 0xff, 1);
    assert_eq!(st.gpr[2], 2f64.sqrt().to_bits());
    assert_eq!(&st.fpu.xmm[2][..8], &7f64.to_bits().to_le_bytes());
}

#[test]
fn a_fault_while_delivering_a_fault_becomes_a_double_fault() {
    let (mut m, _, _) = machine();
    let df = 0x2800u64;
    load(
        &m,
        df,
        &asm(32, df, |a| {
            a.pop(ebx).unwrap();
            a.mov(ecx, 8).unwrap();
            a.hlt().unwrap();
        }),
    );
    load(&m, IDT + 8 * 8, &gate32(df));
    // Gate 13 is not present: delivering #GP raises #NP, and #GP then #NP is a #DF.
    let mut g = gate32(0x2900);
    g[5] &= 0x7f;
    load(&m, IDT + 13 * 8, &g);
    load(
        &m,
        0x2000,
        &asm(32, 0x2000, |a| {
            a.mov(ax, 0x60).unwrap();
            a.mov(ds, ax).unwrap();
            a.hlt().unwrap();
        }),
    );
    let mut s = protected_mode_state(&m, 0x2000);
    s.gdtr.limit = 0x4f;
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 100), Exit::Halted);
    let st = c.state().unwrap();
    assert_eq!((st.gpr[1], st.gpr[3]), (8, 0), "#DF with error code 0");
    let stats = c.stats();
    assert_eq!(stats.get("bt.exceptions.13"), 1);
    assert_eq!(stats.get("bt.exceptions.11"), 1);
}
