//! `timer`: counts PIT interrupts and checks them against time measured independently.
//!
//! PIT channel 0 runs in mode 2 (rate generator) at [`TIMER_HZ`] and raises IRQ 0, which the
//! remapped 8259A delivers as vector 0x20; the guest waits for [`INTERRUPTS`] of them in a
//! `STI; HLT` loop. PIT channel 2, gated on through port 0x61 with the speaker off, runs
//! free in mode 2 with count 0 (65536 PIT ticks, 54.9 ms per wrap). After each wake-up the
//! guest latches and reads channel 2 and adds the ticks since the previous read (mod 65536,
//! sound because wake-ups are far less than 54.9 ms apart). The measurement starts at the
//! first interrupt, so the expected time is `interrupts * count`. The guest prints both
//! numbers, the tolerance, the shortest and longest wake-up interval and the number of
//! stalled wake-ups (a wake-up whose interval exceeds its interrupts by a whole period: the
//! vCPU was not running when a tick was due, so the tick was coalesced, as on a real PC
//! under a loaded hypervisor). It exits 0 if the two agree within [`TOLERANCE_PERCENT`];
//! otherwise 4 ([`EXIT_INCONCLUSIVE`](crate::EXIT_INCONCLUSIVE)) if there were stalls, and
//! 1 if there were none (the timer model is wrong).

use crate::link::LinkError;
use crate::rt::{
    BootMessages, EXIT_CHECK_FAILED, EXIT_INCONCLUSIVE, EXIT_PASS, PIC_BASE, long_mode_image,
};
use deja_machine::loader::Image;
use iced_x86::code_asm::*;

/// The PIT's input clock in Hz.
pub const PIT_HZ: u32 = 1_193_182;
/// Channel 0's interrupt rate.
pub const TIMER_HZ: u32 = 250;
/// Channel 0's reload value.
pub const TIMER_COUNT: u32 = (PIT_HZ + TIMER_HZ / 2) / TIMER_HZ;
/// Interrupts measured (after the first, which starts the measurement).
pub const INTERRUPTS: u32 = 50;
/// How far channel 2's measurement may differ from `INTERRUPTS * TIMER_COUNT`.
///
/// With a virtual clock the two agree exactly. With the host's clock a vCPU thread that
/// the host does not schedule for longer than a period loses or bunches ticks (as a real
/// PC under a loaded hypervisor does); 10% absorbs about 20 ms of such stalls in the
/// 200 ms run and still catches the errors a timer model makes (a wrong input clock, a
/// channel 2 counting in steps of 2 as in mode 3, a reload off by a factor).
pub const TOLERANCE_PERCENT: u32 = 10;
const _: () = assert!(
    100 % TOLERANCE_PERCENT == 0,
    "the guest divides by 100 / percent"
);

pub(crate) fn build() -> Result<Image, LinkError> {
    long_mode_image(
        "timer",
        BootMessages::default(),
        &[(PIC_BASE, "irq0")],
        &|s, rt| {
            let mut ticks = s.a.create_label();
            let mut read_ch2 = s.a.create_label();
            rt.load_idt(s)?;
            rt.init_pic(s, !1, 0xff)?;
            let a = &mut s.a;
            // Channel 2: gate on (bit 0), speaker off (bit 1); mode 2, lobyte/hibyte, count 0.
            a.in_(al, 0x61u32)?;
            a.and(al, 0xfc)?;
            a.or(al, 0x01)?;
            a.out(0x61u32, al)?;
            a.mov(al, 0xb4)?;
            a.out(0x43u32, al)?;
            a.xor(eax, eax)?;
            a.out(0x42u32, al)?;
            a.out(0x42u32, al)?;
            // Channel 0: mode 2, lobyte/hibyte.
            a.mov(al, 0x34)?;
            a.out(0x43u32, al)?;
            a.mov(al, (TIMER_COUNT & 0xff) as i32)?;
            a.out(0x40u32, al)?;
            a.mov(al, (TIMER_COUNT >> 8) as i32)?;
            a.out(0x40u32, al)?;
            let intro = format!(
                "timer: PIT channel 0 mode 2 at {TIMER_HZ} Hz (count {TIMER_COUNT}), \
                 waiting for {} interrupts\r\n",
                INTERRUPTS + 1
            );
            rt.print(s, intro.as_bytes())?;

            // r12: interrupts seen, r13: last channel 2 reading, r14: ticks measured,
            // r15: shortest wake-up interval, rbp: longest, r10: stalled wake-ups.
            let a = &mut s.a;
            a.xor(r12d, r12d)?;
            a.xor(r14d, r14d)?;
            a.xor(r10d, r10d)?; // stalled wake-ups
            a.mov(r15, -1i64)?;
            a.xor(ebp, ebp)?;
            let mut wait = a.create_label();
            let mut got = a.create_label();
            let mut measure = a.create_label();
            let mut done = a.create_label();
            a.set_label(&mut wait)?;
            a.cli()?;
            a.mov(rax, qword_ptr(ticks))?;
            a.cmp(rax, r12)?;
            a.jne(got)?;
            a.sti()?;
            a.hlt()?;
            a.jmp(wait)?;
            a.set_label(&mut got)?;
            a.sti()?;
            a.mov(rbx, rax)?;
            a.call(read_ch2)?;
            a.test(r12, r12)?;
            a.jnz(measure)?;
            a.mov(r13, rax)?; // first interrupt: the measurement starts here
            a.mov(r12, rbx)?;
            a.jmp(wait)?;
            a.set_label(&mut measure)?;
            a.mov(rcx, r13)?;
            a.sub(rcx, rax)?;
            a.and(ecx, 0xffff)?;
            a.mov(r13, rax)?;
            a.add(r14, rcx)?;
            a.cmp(rcx, r15)?;
            a.cmovb(r15, rcx)?;
            a.cmp(rcx, rbp)?;
            a.cmova(rbp, rcx)?;
            // A wake-up with at least one whole period more than its interrupts account
            // for: the vCPU was not running when a tick was due (a stalled host thread).
            let mut not_stalled = a.create_label();
            a.mov(rdx, rbx)?;
            a.sub(rdx, r12)?;
            a.inc(rdx)?;
            a.imul_3(rdx, rdx, TIMER_COUNT as i32)?;
            a.cmp(rcx, rdx)?;
            a.jbe(not_stalled)?;
            a.inc(r10)?;
            a.set_label(&mut not_stalled)?;
            a.mov(r12, rbx)?;
            a.cmp(r12, (INTERRUPTS + 1) as i32)?;
            a.jb(wait)?;
            a.set_label(&mut done)?;
            // Stop the interrupts before reporting.
            a.cli()?;
            a.mov(al, 0xff)?;
            a.out(0x21u32, al)?;

            // rbx = interrupts measured, rdi = expected ticks, rsi = tolerance.
            let a = &mut s.a;
            a.mov(rbx, r12)?;
            a.dec(rbx)?;
            a.imul_3(rdi, rbx, TIMER_COUNT as i32)?;
            a.mov(rax, rdi)?;
            a.xor(edx, edx)?;
            a.mov(ecx, (100 / TOLERANCE_PERCENT) as i32)?;
            a.div(rcx)?;
            a.mov(rsi, rax)?;
            rt.print(s, b"timer: ")?;
            s.a.mov(rax, rbx)?;
            rt.print_dec(s)?;
            rt.print(s, b" interrupts = ")?;
            s.a.mov(rax, rdi)?;
            rt.print_dec(s)?;
            rt.print(s, b" PIT ticks; channel 2 measured ")?;
            s.a.mov(rax, r14)?;
            rt.print_dec(s)?;
            rt.print(s, b" (tolerance ")?;
            s.a.mov(rax, rsi)?;
            rt.print_dec(s)?;
            rt.print(s, b"; wake-up interval min ")?;
            s.a.mov(rax, r15)?;
            rt.print_dec(s)?;
            rt.print(s, b" max ")?;
            s.a.mov(rax, rbp)?;
            rt.print_dec(s)?;
            rt.print(s, b"; stalled wake-ups ")?;
            s.a.mov(rax, r10)?;
            rt.print_dec(s)?;
            rt.print(s, b")\r\n")?;
            // |measured - expected| <= tolerance
            let a = &mut s.a;
            let mut fail = a.create_label();
            a.mov(rax, r14)?;
            a.sub(rax, rdi)?;
            a.mov(rcx, rax)?;
            a.neg(rcx)?;
            a.cmovs(rcx, rax)?; // rcx = |rax|
            a.cmp(rcx, rsi)?;
            a.ja(fail)?;
            rt.print(s, b"timer: PASS\r\n")?;
            rt.exit_with(s, EXIT_PASS)?;
            s.a.set_label(&mut fail)?;
            let mut no_stall = s.a.create_label();
            s.a.test(r10, r10)?;
            s.a.jz(no_stall)?;
            let why = format!(
                "timer: INCONCLUSIVE: channel 2 time and the interrupt count differ by more \
                 than {TOLERANCE_PERCENT}%, but some wake-ups came a whole period late, so the \
                 vCPU was not running when ticks were due\r\n"
            );
            rt.print(s, why.as_bytes())?;
            rt.exit_with(s, EXIT_INCONCLUSIVE)?;
            s.a.set_label(&mut no_stall)?;
            let why = format!(
                "timer: FAIL: channel 2 time and the interrupt count differ by more than \
                 {TOLERANCE_PERCENT}% with no stalled wake-up\r\n"
            );
            rt.print(s, why.as_bytes())?;
            rt.exit_with(s, EXIT_CHECK_FAILED)?;

            // read_ch2: latch channel 2 and return its count in RAX (clobbers RCX).
            let a = &mut s.a;
            a.set_label(&mut read_ch2)?;
            a.mov(al, 0x80)?;
            a.out(0x43u32, al)?;
            a.in_(al, 0x42u32)?;
            a.movzx(ecx, al)?;
            a.in_(al, 0x42u32)?;
            a.movzx(eax, al)?;
            a.shl(eax, 8)?;
            a.or(eax, ecx)?;
            a.ret()?;

            // IRQ 0: count and acknowledge.
            s.export_here("irq0")?;
            let a = &mut s.a;
            a.push(rax)?;
            a.inc(qword_ptr(ticks))?;
            a.mov(al, 0x20)?;
            a.out(0x20u32, al)?;
            a.pop(rax)?;
            a.iretq()?;
            a.set_label(&mut ticks)?;
            a.dq(&[0])?;
            Ok(())
        },
    )
}
