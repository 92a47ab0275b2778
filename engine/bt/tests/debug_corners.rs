//! Debug corner cases on bt: single-stepping across SYSCALL/SYSRET (the trap follows the TF
//! the instruction leaves, so FMASK keeps it out of the kernel and SYSRET's restored TF traps
//! at the user instruction after the SYSCALL, as QEMU does and as Linux relies on), and the
//! MOV SS shadow against ICEBP, DR7.GD and STI; HLT (SDM vol. 3 6.8.3 and 17.3).

mod common;

use common::*;
use deja_machine::{Cpu, CpuState, Exit, Machine};
use iced_x86::code_asm::*;

/// Scratch data the handlers record into (clear of the TSS and its I/O bitmap).
const DATA: u64 = 0x6000;
/// SYSCALL's kernel code segment (SS after it), past the common GDT.
const KERNEL_CS: u64 = 0x50;

fn u64_at(m: &Machine, addr: u64) -> u64 {
    u64::from_le_bytes(peek(m, addr, 8).try_into().unwrap())
}

fn ips(bitness: u32, code: &[u8], ip: u64) -> Vec<u64> {
    let mut d = iced_x86::Decoder::with_ip(bitness, code, ip, iced_x86::DecoderOptions::NONE);
    d.iter().map(|i| i.ip()).collect()
}

/// A 64-bit interrupt gate with `dpl`.
fn gate64_dpl(target: u64, dpl: u8) -> [u8; 16] {
    let mut g = gate64(target, 0x18, 0);
    g[5] |= dpl << 5;
    g
}

/// The (RIP, CS) pairs the long-mode #DB handler recorded.
fn db_log(m: &Machine) -> Vec<(u64, u64)> {
    let n = u64_at(m, DATA);
    (0..n)
        .map(|i| {
            (
                u64_at(m, DATA + 0x10 + 16 * i),
                u64_at(m, DATA + 0x18 + 16 * i),
            )
        })
        .collect()
}

/// Long mode with a #DB handler that logs the pushed RIP and CS and returns, an INT 0x80
/// gate (DPL 3) to HLT, and SYSCALL set up (kernel CS [`KERNEL_CS`], SYSRET to CS 0x33)
/// with `fmask`.
/// The ring-0 code at 0x20_0000 drops to ring 3 at `user`.
fn syscall_machine(
    user_code: &[u8],
    user: u64,
    kernel_code: &[u8],
    kernel: u64,
    fmask: u64,
) -> (Machine, CpuState) {
    let (m, _, _) = machine();
    load(&m, user, user_code);
    load(&m, kernel, kernel_code);
    let db = 0x20_3000u64;
    load(
        &m,
        db,
        &asm(64, db, |a| {
            a.push(rax).unwrap();
            a.push(rbx).unwrap();
            a.mov(rax, qword_ptr(DATA as u32)).unwrap();
            a.shl(rax, 4).unwrap();
            a.mov(rbx, qword_ptr(rsp + 16)).unwrap(); // RIP
            a.mov(qword_ptr(rax + (DATA + 0x10) as i32), rbx).unwrap();
            a.mov(rbx, qword_ptr(rsp + 24)).unwrap(); // CS
            a.mov(qword_ptr(rax + (DATA + 0x18) as i32), rbx).unwrap();
            a.inc(qword_ptr(DATA as u32)).unwrap();
            a.pop(rbx).unwrap();
            a.pop(rax).unwrap();
            a.iretq().unwrap();
        }),
    );
    let done = 0x20_3800u64;
    load(&m, done, &asm(64, done, |a| a.hlt().unwrap()));
    load(&m, IDT + 16, &gate64_dpl(db, 0));
    load(&m, IDT + 0x80 * 16, &gate64_dpl(done, 3));
    load(
        &m,
        0x20_0000,
        &asm(64, 0x20_0000, |a| {
            a.push(0x2b).unwrap();
            a.push(0x9000).unwrap();
            a.push(0x2).unwrap();
            a.push(0x33).unwrap();
            a.mov(rax, user).unwrap();
            a.push(rax).unwrap();
            a.iretq().unwrap();
        }),
    );
    let mut s = long_mode_state(&m, 0x20_0000);
    s.efer |= 1; // SCE
    // SYSCALL's CS and SS: a 64-bit ring-0 code segment and a ring-0 data segment after it.
    load(&m, GDT + KERNEL_CS, &0x00af_9b00_0000_ffffu64.to_le_bytes());
    load(
        &m,
        GDT + KERNEL_CS + 8,
        &0x00cf_9300_0000_ffffu64.to_le_bytes(),
    );
    s.gdtr.limit = KERNEL_CS as u16 + 15;
    s.msrs
        .insert(0xc000_0081, (0x20u64 << 48) | (KERNEL_CS << 32));
    s.msrs.insert(0xc000_0082, kernel);
    s.msrs.insert(0xc000_0084, fmask);
    load(&m, TSS + 4, &0xa000u64.to_le_bytes());
    (m, s)
}

fn single_step_user(user: u64) -> Vec<u8> {
    asm(64, user, |a| {
        a.pushfq().unwrap();
        a.or(qword_ptr(rsp), 0x100).unwrap();
        a.popfq().unwrap(); // sets TF: no trap after it
        a.nop().unwrap(); // trap
        a.syscall().unwrap();
        a.mov(r12, 0x77u64).unwrap(); // trap
        a.pushfq().unwrap(); // trap
        a.and(qword_ptr(rsp), !0x100).unwrap(); // trap
        a.popfq().unwrap(); // trap: TF was set when it started
        a.int(0x80).unwrap();
    })
}

#[test]
fn syscall_with_fmask_clearing_tf_traps_after_sysret_in_user_mode_not_in_the_kernel() {
    let user = 0x20_2000u64;
    let kernel = 0x20_1000u64;
    let kcode = asm(64, kernel, |a| {
        a.mov(r8, rcx).unwrap();
        a.sysretq().unwrap();
    });
    let ucode = single_step_user(user);
    let (mut m, s) = syscall_machine(&ucode, user, &kcode, kernel, 0x300);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 500), Exit::Halted);
    let u = ips(64, &ucode, user);
    // After NOP (at the SYSCALL); none in the kernel; after SYSRET (at the MOV, in ring 3, as
    // if the SYSCALL had just completed); after MOV, PUSHFQ, AND and POPFQ.
    let want: Vec<(u64, u64)> = (4..=9).map(|i| (u[i], 0x33)).collect();
    assert_eq!(db_log(&m), want);
    let st = c.state().unwrap();
    assert_eq!(st.gpr[8], u[5], "the kernel ran (RCX = the return RIP)");
    assert_eq!(st.gpr[12], 0x77);
}

#[test]
fn syscall_with_tf_left_set_by_fmask_traps_at_the_kernel_entry() {
    let user = 0x20_2000u64;
    let kernel = 0x20_1000u64;
    let kcode = asm(64, kernel, |a| {
        a.mov(r8, rcx).unwrap(); // trap after it, in the kernel
        a.pushfq().unwrap();
        a.and(qword_ptr(rsp), !0x100).unwrap();
        a.popfq().unwrap();
        a.sysretq().unwrap(); // R11 has TF: traps after it, in ring 3
    });
    let ucode = single_step_user(user);
    let (mut m, s) = syscall_machine(&ucode, user, &kcode, kernel, 0x200);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 500), Exit::Halted);
    let u = ips(64, &ucode, user);
    let k = ips(64, &kcode, kernel);
    let mut want = vec![(u[4], 0x33)];
    // SYSCALL kept TF: it traps at the first kernel instruction, then after each one while
    // TF is set (POPFQ clears it but traps, SDM 17.3.1.4).
    want.extend(k[..5].iter().map(|&ip| (ip, KERNEL_CS)));
    want.extend((5..=9).map(|i| (u[i], 0x33)));
    assert_eq!(db_log(&m), want);
}

fn u32_at(m: &Machine, addr: u64) -> u32 {
    u32::from_le_bytes(peek(m, addr, 4).try_into().unwrap())
}

fn gate32(target: u64, dpl: u8) -> [u8; 8] {
    let access = 0x8eu64 | (u64::from(dpl) << 5);
    ((target & 0xffff) | (0x08u64 << 16) | (access << 40) | ((target >> 16) << 48)).to_le_bytes()
}

/// The word MOV SS loads from in the MOV SS tests (DR0 watches it).
const SS_WORD: u64 = DATA + 0x100;

/// Protected mode with a #DB handler (vector 1, DPL 3 so ICEBP can reach it from ring 3)
/// that logs (EIP, CS, DR6) per event and clears DR6; `code` at 0x2000 in ring 0.
fn db_machine32(code: &[u8]) -> (Machine, CpuState) {
    let (m, _, _) = machine();
    load(&m, 0x2000, code);
    let h = 0x2800u64;
    load(
        &m,
        h,
        &asm(32, h, |a| {
            a.push(eax).unwrap();
            a.push(ecx).unwrap();
            a.mov(eax, dword_ptr(DATA as u32)).unwrap();
            a.shl(eax, 4).unwrap();
            a.mov(ecx, dword_ptr(esp + 8)).unwrap();
            a.mov(dword_ptr(eax + (DATA + 0x10) as i32), ecx).unwrap();
            a.mov(ecx, dword_ptr(esp + 12)).unwrap();
            a.mov(dword_ptr(eax + (DATA + 0x14) as i32), ecx).unwrap();
            a.mov(ecx, dr6).unwrap();
            a.mov(dword_ptr(eax + (DATA + 0x18) as i32), ecx).unwrap();
            a.xor(ecx, ecx).unwrap();
            a.mov(dr6, ecx).unwrap();
            a.inc(dword_ptr(DATA as u32)).unwrap();
            a.pop(ecx).unwrap();
            a.pop(eax).unwrap();
            a.iretd().unwrap();
        }),
    );
    load(&m, IDT + 8, &gate32(h, 3));
    load(&m, TSS + 4, &0xa000u32.to_le_bytes());
    load(&m, TSS + 8, &0x10u32.to_le_bytes());
    let s = protected_mode_state(&m, 0x2000);
    (m, s)
}

/// The logged (EIP, CS, DR6 condition bits B0-B3, BD, BS).
fn db_log32(m: &Machine) -> Vec<(u32, u32, u32)> {
    (0..u32_at(m, DATA) as u64)
        .map(|i| {
            let e = DATA + 0x10 + 16 * i;
            (u32_at(m, e), u32_at(m, e + 4), u32_at(m, e + 8) & 0x600f)
        })
        .collect()
}

/// Arms DR0 as a 2-byte read/write breakpoint on [`SS_WORD`], which holds `ss`.
fn arm_ss_word_breakpoint(a: &mut CodeAssembler, selector: u32) {
    a.mov(dword_ptr(SS_WORD as u32), selector).unwrap();
    a.mov(eax, SS_WORD as u32).unwrap();
    a.mov(dr0, eax).unwrap();
    a.mov(eax, 0x0007_0001u32).unwrap(); // L0, R/W0 = 11, LEN0 = 01
    a.mov(dr7, eax).unwrap();
}

#[test]
fn icebp_after_mov_ss_with_a_data_breakpoint_traps_at_the_handler_entry_in_ring_0() {
    // SDM 6.8.3: the data breakpoint MOV SS hit is held back over the next instruction; that
    // is ICEBP, so the #DB arrives once the ICEBP's #DB has been delivered, at its handler's
    // first instruction (ring 0). Then the ICEBP's own #DB runs (EIP after the ICEBP).
    let code = asm(32, 0x2000, |a| {
        arm_ss_word_breakpoint(a, 0x10);
        a.mov(ss, word_ptr(SS_WORD as u32)).unwrap();
        a.int1().unwrap();
        a.hlt().unwrap();
    });
    let ip = ips(32, &code, 0x2000);
    let after_icebp = ip[ip.len() - 1] as u32;
    let (mut m, s) = db_machine32(&code);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 200), Exit::Halted);
    assert_eq!(
        db_log32(&m),
        vec![(0x2800, 0x08, 0x1), (after_icebp, 0x08, 0)],
        "the deferred B0 #DB at the handler entry, then ICEBP's"
    );
}

#[test]
fn icebp_after_mov_ss_with_a_data_breakpoint_in_ring_3_traps_in_ring_0_at_the_handler() {
    let user = asm(32, 0x2400, |a| {
        a.mov(ss, word_ptr(SS_WORD as u32)).unwrap();
        a.int1().unwrap();
        let mut spin = a.create_label();
        a.set_label(&mut spin).unwrap();
        a.jmp(spin).unwrap(); // the test stops by instruction count
    });
    let code = asm(32, 0x2000, |a| {
        arm_ss_word_breakpoint(a, 0x2b);
        a.mov(eax, 0x2bu32).unwrap(); // ring-3 data, also usable by the ring-0 handler
        a.mov(ds, ax).unwrap();
        a.push(0x2b).unwrap();
        a.push(0x7800).unwrap();
        a.push(0x2).unwrap();
        a.push(0x23).unwrap();
        a.push(0x2400).unwrap();
        a.iretd().unwrap();
    });
    let ui = ips(32, &user, 0x2400);
    let (mut m, s) = db_machine32(&code);
    load(&m, 0x2400, &user);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 300), Exit::InstructionLimit);
    assert_eq!(
        db_log32(&m),
        vec![(0x2800, 0x08, 0x1), (ui[2] as u32, 0x23, 0)],
        "the deferred B0 #DB in ring 0 at the handler entry, then ICEBP's from ring 3"
    );
}

#[test]
fn general_detect_faults_on_the_instruction_after_mov_ss() {
    // The MOV SS shadow holds back traps and interrupts, not faults of the next
    // instruction: MOV from DR0 with DR7.GD set is a #DB fault at that instruction (DR6.BD).
    let code = asm(32, 0x2000, |a| {
        a.mov(eax, 0x2000u32).unwrap(); // GD
        a.mov(dr7, eax).unwrap();
        a.mov(ax, ss).unwrap();
        a.mov(ss, ax).unwrap();
        a.mov(ebx, dr0).unwrap();
        a.hlt().unwrap();
    });
    let ip = ips(32, &code, 0x2000);
    let (mut m, s) = db_machine32(&code);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 200), Exit::Halted);
    assert_eq!(db_log32(&m), vec![(ip[4] as u32, 0x08, 0x2000)]);
    assert_eq!(c.state().unwrap().dr7 & 0x2000, 0, "delivery cleared GD");
}

#[test]
fn single_step_over_sti_hlt_traps_at_hlt_and_the_shadowed_interrupt_comes_after_the_trap() {
    // TF set, IF clear, an interrupt pending: STI's shadow holds the interrupt but not the
    // single-step trap, which is taken at the HLT (priority 4 before interrupts, SDM 6.9).
    // The #DB handler's IRET returns to the HLT with IF set: the interrupt is taken there,
    // before HLT runs, and its handler returns to the HLT, which then halts. The trap HLT
    // itself owes (TF was set) stays pending in the state until the CPU wakes (as on kvm,
    // where the HLT exit reaches deja before KVM delivers the #DB).
    let code = asm(32, 0x2000, |a| {
        a.pushfd().unwrap();
        a.or(dword_ptr(esp), 0x100).unwrap();
        a.popfd().unwrap();
        a.mov(al, 1).unwrap();
        a.out(IRQ_PORT as u32, al).unwrap(); // line 0 pending; IF is clear
        a.sti().unwrap();
        a.hlt().unwrap();
        a.nop().unwrap();
    });
    let ip = ips(32, &code, 0x2000);
    let (mut m, s) = db_machine32(&code);
    let irq = 0x2c00u64;
    load(
        &m,
        irq,
        &asm(32, irq, |a| {
            a.mov(eax, dword_ptr(esp)).unwrap();
            a.mov(dword_ptr((DATA + 8) as u32), eax).unwrap(); // EIP interrupted
            a.inc(dword_ptr((DATA + 12) as u32)).unwrap();
            a.iretd().unwrap();
        }),
    );
    load(&m, IDT + u64::from(VECTOR_BASE) * 8, &gate32(irq, 0));
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 200), Exit::Halted);
    let hlt = ip[6] as u32;
    assert_eq!(
        db_log32(&m),
        vec![
            (ip[4] as u32, 0x08, 0x4000), // after MOV AL
            (ip[5] as u32, 0x08, 0x4000), // after OUT
            (hlt, 0x08, 0x4000),          // after STI, despite its shadow
        ]
    );
    assert_eq!(u32_at(&m, DATA + 12), 1, "one interrupt");
    assert_eq!(u32_at(&m, DATA + 8), hlt, "taken at the HLT, before it ran");
    let st = c.state().unwrap();
    assert!(st.pending.halted);
    assert_eq!(st.rip, ip[7]);
    assert_eq!(st.pending_debug.trap & 0x4000, 0x4000, "HLT's trap pending");
}
