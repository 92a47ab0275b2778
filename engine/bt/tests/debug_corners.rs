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
