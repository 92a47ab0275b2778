//! `racy-kernel`: a small preemptive kernel with a real data race.
//!
//! The PIT raises IRQ 0 at [`TIMER_HZ`]; the timer handler increments a shared counter and a
//! tick count, then switches between two tasks by saving every register on the current
//! task's stack and loading the other task's stack pointer. Task A increments the same
//! counter without making the read-modify-write atomic: a load, two instructions of "work"
//! and a store. If a timer interrupt lands after the load and before the store, the
//! handler's increment is overwritten: a lost update. After every increment task A checks,
//! with interrupts off, that `counter == its own increments + ticks`; on a lost update it
//! panics on COM1 naming the counter's physical address and the values and exits with
//! [`EXIT_LOST_UPDATE`] (`deja replay --watch ADDRESS` then lists every store to it). After [`TICKS`]
//! ticks without one, it reports and exits 0. Task B only burns cycles.
//!
//! Where interrupts land decides everything. On bt with a fixed poll quantum that is a
//! multiple of task A's loop length ([`LOOP_LEN`]) and a handler whose length is a multiple
//! of it too, every interrupt finds task A at the same point of its loop, outside the
//! window, whatever the host clock says (task A is entered at a fixed instruction count, so
//! that point is fixed too; the tests check that it is outside the window): the race stays
//! latent. Chaos recording (random
//! poll quanta) makes interrupts land anywhere, and the kernel soon panics; the trace then
//! replays the panic at the same instruction every time.

use crate::link::LinkError;
use crate::rt::{BootMessages, PIC_BASE, long_mode_image, long_mode_link};
use deja_machine::loader::Image;
use iced_x86::code_asm::*;
use std::collections::BTreeMap;

/// Timer interrupts per second of guest time.
pub const TIMER_HZ: u32 = 10_000;
/// PIT channel 0 reload value for [`TIMER_HZ`].
pub const TIMER_COUNT: u32 = (1_193_182 + TIMER_HZ / 2) / TIMER_HZ;
/// Ticks after which the kernel declares the run clean.
pub const TICKS: u32 = 400;
/// Instructions in one iteration of task A's loop.
pub const LOOP_LEN: usize = 20;
/// Exit status of a detected lost update.
pub const EXIT_LOST_UPDATE: u8 = 3;
/// Where the kernel's variables live (outside the code pages, so bt's translated code
/// stays valid).
pub const VARS: u64 = 0x9_8000;
/// Offset of the shared counter in [`VARS`].
pub const COUNTER: i32 = 0;
/// Offset of the tick count.
pub const TICK_COUNT: i32 = 8;
/// Offset of the current task (0: A, 1: B).
pub const CURRENT: i32 = 16;
/// Offset of the saved stack pointers (A, B).
pub const SAVED_RSP: i32 = 24;
/// Top of task A's stack.
pub const STACK_A: u64 = 0x9_0000;
/// Top of task B's stack.
pub const STACK_B: u64 = 0x8_0000;

/// General-purpose registers the handler saves, in push order.
const SAVED: [AsmRegister64; 15] = [
    rax, rbx, rcx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13, r14, r15,
];

fn emit(s: &mut crate::link::SectionAsm<'_>, rt: &mut crate::rt::Runtime) -> Result<(), LinkError> {
    let mut task_b = s.a.create_label();
    let mut a_loop = s.a.create_label();
    let mut lost = s.a.create_label();
    let mut finished = s.a.create_label();
    rt.load_idt(s)?;
    rt.init_pic(s, !1, 0xff)?;
    let intro = format!(
        "racy-kernel: two tasks, timer at {TIMER_HZ} Hz, checking the shared counter for \
         {TICKS} ticks\r\n"
    );
    rt.print(s, intro.as_bytes())?;
    let a = &mut s.a;
    // Task B's first frame: what the handler pops and IRETQ takes.
    a.mov(r15, VARS)?;
    a.mov(rax, STACK_B)?;
    a.mov(rsp, rax)?;
    a.push(i32::from(crate::rt::SEL_DATA))?; // SS
    a.push(rax)?; // RSP
    a.push(0x202)?; // RFLAGS: IF
    a.push(i32::from(crate::rt::SEL_CODE64))?; // CS
    a.lea(rbx, ptr(task_b))?;
    a.push(rbx)?; // RIP
    a.xor(ebx, ebx)?;
    for _ in SAVED {
        a.push(rbx)?;
    }
    a.mov(qword_ptr(r15 + SAVED_RSP + 8), rsp)?;
    a.mov(qword_ptr(r15 + CURRENT), 0)?;
    a.mov(qword_ptr(r15 + COUNTER), 0)?;
    a.mov(qword_ptr(r15 + TICK_COUNT), 0)?;
    a.mov(rax, STACK_A)?;
    a.mov(rsp, rax)?;
    // PIT channel 0: mode 2, lobyte/hibyte.
    a.mov(al, 0x34)?;
    a.out(0x43u32, al)?;
    a.mov(al, (TIMER_COUNT & 0xff) as i32)?;
    a.out(0x40u32, al)?;
    a.mov(al, (TIMER_COUNT >> 8) as i32)?;
    a.out(0x40u32, al)?;
    a.xor(r12d, r12d)?;
    a.sti()?;
    a.jmp(a_loop)?;

    // Task A: LOOP_LEN instructions per iteration.
    // Counts task A's instructions as they are emitted.
    let mut n = 0usize;
    macro_rules! i {
        ($e:expr) => {{
            n += 1;
            $e?;
        }};
    }
    s.export("racy_load", &mut a_loop)?;
    let a = &mut s.a;
    i!(a.mov(rax, qword_ptr(r15 + COUNTER))); // the load
    i!(a.add(rax, 1)); // the window: an interrupt before the store loses its update
    i!(a.imul_3(rbx, rax, 3));
    i!(a.xor(rbx, rax));
    s.export_here("racy_store")?;
    let a = &mut s.a;
    i!(a.mov(qword_ptr(r15 + COUNTER), rax)); // the store
    i!(a.inc(r12));
    i!(a.cli());
    i!(a.mov(rcx, qword_ptr(r15 + COUNTER)));
    i!(a.sub(rcx, qword_ptr(r15 + TICK_COUNT)));
    i!(a.cmp(rcx, r12));
    i!(a.jne(lost));
    i!(a.sti());
    while n < LOOP_LEN - 1 {
        i!(a.nop());
    }
    i!(a.jmp(a_loop));
    debug_assert_eq!(n, LOOP_LEN);

    // Task B: burns cycles with interrupts on.
    a.set_label(&mut task_b)?;
    a.inc(r13)?;
    a.rol(r14, 1)?;
    a.xor(r14, r13)?;
    a.jmp(task_b)?;

    // The panic: interrupts are off.
    a.set_label(&mut lost)?;
    // The counter's address lets `deja replay --watch` find the store that lost the update.
    let panic = format!(
        "racy-kernel: PANIC: lost update: counter at {:#x} is ",
        VARS + COUNTER as u64
    );
    rt.print(s, panic.as_bytes())?;
    s.a.mov(rax, qword_ptr(r15 + COUNTER))?;
    rt.print_dec(s)?;
    rt.print(s, b", expected ")?;
    s.a.mov(rax, qword_ptr(r15 + TICK_COUNT))?;
    s.a.add(rax, r12)?;
    rt.print_dec(s)?;
    rt.print(s, b" (ticks ")?;
    s.a.mov(rax, qword_ptr(r15 + TICK_COUNT))?;
    rt.print_dec(s)?;
    rt.print(s, b", task increments ")?;
    s.a.mov(rax, r12)?;
    rt.print_dec(s)?;
    rt.print(s, b")\r\n")?;
    rt.exit_with(s, EXIT_LOST_UPDATE)?;

    // Clean end, reached from the handler (interrupts off, task A's registers saved on
    // whichever stack was current).
    s.a.set_label(&mut finished)?;
    rt.print(s, b"racy-kernel: no lost update in ")?;
    s.a.mov(rax, qword_ptr(r15 + TICK_COUNT))?;
    rt.print_dec(s)?;
    rt.print(s, b" ticks; counter ")?;
    s.a.mov(rax, qword_ptr(r15 + COUNTER))?;
    rt.print_dec(s)?;
    rt.print(s, b"\r\n")?;
    rt.exit_with(s, crate::rt::EXIT_PASS)?;

    // The timer handler: one straight path of a length that is a multiple of LOOP_LEN.
    s.export_here("tick")?;
    let a = &mut s.a;
    let mut h = 0usize;
    macro_rules! c {
        ($e:expr) => {{
            h += 1;
            $e?;
        }};
    }
    for r in SAVED {
        c!(a.push(r));
    }
    c!(a.mov(r15, VARS));
    c!(a.inc(qword_ptr(r15 + COUNTER)));
    c!(a.inc(qword_ptr(r15 + TICK_COUNT)));
    c!(a.cmp(qword_ptr(r15 + TICK_COUNT), TICKS as i32));
    c!(a.jae(finished));
    c!(a.mov(rax, qword_ptr(r15 + CURRENT)));
    c!(a.mov(qword_ptr(r15 + rax * 8 + SAVED_RSP), rsp));
    c!(a.xor(rax, 1));
    c!(a.mov(qword_ptr(r15 + CURRENT), rax));
    c!(a.mov(rsp, qword_ptr(r15 + rax * 8 + SAVED_RSP)));
    c!(a.mov(al, 0x20));
    c!(a.out(0x20u32, al));
    let rest = SAVED.len() + 1; // pops and IRETQ
    while !(h + rest).is_multiple_of(LOOP_LEN) {
        c!(a.nop());
    }
    for r in SAVED.iter().rev() {
        c!(a.pop(*r));
    }
    c!(a.iretq());
    debug_assert!(h.is_multiple_of(LOOP_LEN));
    Ok(())
}

pub(crate) fn build() -> Result<Image, LinkError> {
    long_mode_image(
        "racy-kernel",
        BootMessages::default(),
        &[(PIC_BASE, "tick")],
        &emit,
    )
}

/// Addresses of the kernel's symbols (`racy_load`, `racy_store`, `tick`, ...), for tests
/// and for finding the corrupting store in a replay.
pub fn symbols() -> Result<BTreeMap<String, u64>, LinkError> {
    Ok(long_mode_link(
        "racy-kernel",
        BootMessages::default(),
        &[(PIC_BASE, "tick")],
        &emit,
    )?
    .symbols)
}
