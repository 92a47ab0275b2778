//! `pc-testdev`: drives QEMU's pc-testdev as QEMU-targeted test kernels do, on a machine
//! built with `--device pc-testdev`: the scratch register through its word port (0xe0) and
//! its byte port (0xe8), the flush-page port (0xe4), the 64 KiB memory window at 0xff000000
//! with loads and stores of every width and a read-modify-write instruction, and an IRQ-line
//! port raising IRQ 5 through the 8259A (the handler lowers the line again).
//!
//! Without the device the scratch register reads as all ones: the guest says so and exits 0
//! having checked nothing (the corpus runs on machines without optional devices too); a run
//! that checked everything prints [`PASS_LINE`].

use crate::link::{LinkError, SectionAsm};
use crate::rt::{BootMessages, EXIT_CHECK_FAILED, EXIT_PASS, PIC_BASE, Runtime, long_mode_image};
use deja_machine::devices::pc_testdev::{
    FLUSH_PORT, IOMEM_BASE, IRQ_PORT, SCRATCH_BYTE_PORT, SCRATCH_PORT,
};
use deja_machine::loader::Image;
use iced_x86::code_asm::*;

/// What the guest prints when every check passed.
pub const PASS_LINE: &str = "pc-testdev: scratch, flush, window and IRQ 5 all as expected";
/// What the guest prints on a machine without the device.
pub const ABSENT_LINE: &str = "pc-testdev: not present (run with --device pc-testdev)";

/// The ISA line the guest raises (free on deja-pc: no device drives it).
const LINE: u8 = 5;
/// A page directory for 3 GiB..4 GiB: one 2 MiB page over the window.
const HIGH_PD: i32 = 0x12_1000;
/// The boot path's PDPT (`rt`).
const PDPT: i32 = 0x2000;

/// `cmp rax, value; jne` a label that prints `what` and fails (RCX is clobbered).
fn expect(
    s: &mut SectionAsm<'_>,
    fails: &mut Vec<(CodeLabel, String)>,
    value: u64,
    what: &str,
) -> Result<(), LinkError> {
    let l = s.a.create_label();
    fails.push((l, format!("pc-testdev: FAIL: {what}, got ")));
    s.a.mov(rcx, value)?;
    s.a.cmp(rax, rcx)?;
    s.a.jne(l)?;
    Ok(())
}

pub(crate) fn build() -> Result<Image, LinkError> {
    long_mode_image(
        "pc-testdev",
        BootMessages::default(),
        &[(PIC_BASE + LINE, "irq")],
        &|s, rt| main(s, rt),
    )
}

fn main(s: &mut SectionAsm<'_>, rt: &mut Runtime) -> Result<(), LinkError> {
    let mut fails = Vec::new();
    let mut count = s.a.create_label();
    let mut absent = s.a.create_label();
    rt.load_idt(s)?;
    let a = &mut s.a;

    // Probe: a dword through the word port must read back.
    a.mov(eax, 0x1234_5678)?;
    a.out(u32::from(SCRATCH_PORT), eax)?;
    a.in_(eax, u32::from(SCRATCH_PORT))?;
    a.cmp(eax, -1)?;
    a.je(absent)?;
    expect(s, &mut fails, 0x1234_5678, "scratch dword at 0xe0")?;
    // Byte 1 through the byte port, then a byte written there seen through the word port.
    let a = &mut s.a;
    a.in_(al, u32::from(SCRATCH_BYTE_PORT) + 1)?;
    a.movzx(eax, al)?;
    expect(s, &mut fails, 0x56, "scratch byte 1 at 0xe9")?;
    let a = &mut s.a;
    a.mov(al, 0xab)?;
    a.out(u32::from(SCRATCH_BYTE_PORT) + 3, al)?;
    a.in_(eax, u32::from(SCRATCH_PORT))?;
    expect(s, &mut fails, 0xab34_5678, "scratch after a byte at 0xeb")?;
    let a = &mut s.a;
    a.mov(ax, 0x0102)?;
    a.out(u32::from(SCRATCH_BYTE_PORT) + 2, ax)?;
    a.in_(eax, u32::from(SCRATCH_BYTE_PORT))?;
    expect(s, &mut fails, 0x0102_5678, "scratch after a word at 0xea")?;
    // Flush a page of the image: reads 0, nothing else changes.
    let a = &mut s.a;
    a.mov(eax, 0x7000)?;
    a.out(u32::from(FLUSH_PORT), eax)?;
    a.in_(eax, u32::from(FLUSH_PORT))?;
    expect(s, &mut fails, 0, "flush port read")?;

    // Map the window: PD entry 504 of 3..4 GiB, a 2 MiB uncached page.
    let a = &mut s.a;
    a.mov(edi, HIGH_PD)?;
    a.xor(eax, eax)?;
    a.mov(ecx, 512)?;
    a.rep().stosq()?;
    a.mov(edi, HIGH_PD + 504 * 8)?;
    a.mov(eax, (IOMEM_BASE as u32 | 0x9b) as i32)?; // P RW PWT PCD PS
    a.mov(dword_ptr(rdi), eax)?;
    a.mov(edi, PDPT + 3 * 8)?;
    a.mov(qword_ptr(rdi), HIGH_PD | 3)?;
    a.mov(rax, cr3)?;
    a.mov(cr3, rax)?;
    a.mov(ebx, IOMEM_BASE as u32 as i32)?;
    // A qword, then its halves, bytes and words.
    a.mov(rax, 0x1122_3344_5566_7788u64)?;
    a.mov(qword_ptr(rbx + 8), rax)?;
    a.mov(eax, dword_ptr(rbx + 0xc))?;
    expect(s, &mut fails, 0x1122_3344, "window dword at +0xc")?;
    let a = &mut s.a;
    a.mov(byte_ptr(rbx + 9), 0xee)?;
    a.mov(word_ptr(rbx + 0xe), 0x0a0b)?;
    a.mov(rax, qword_ptr(rbx + 8))?;
    expect(
        s,
        &mut fails,
        0x0a0b_3344_5566_ee88,
        "window qword after byte and word",
    )?;
    let a = &mut s.a;
    a.movzx(eax, word_ptr(rbx + 0xe))?;
    expect(s, &mut fails, 0x0a0b, "window word at +0xe")?;
    // Read-modify-write on the window, and the end of it.
    let a = &mut s.a;
    a.mov(dword_ptr(rbx + 0x10), 40)?;
    a.add(dword_ptr(rbx + 0x10), 2)?;
    a.mov(eax, dword_ptr(rbx + 0x10))?;
    expect(s, &mut fails, 42, "ADD to the window")?;
    let a = &mut s.a;
    a.mov(dword_ptr(rbx + 0xfffc), -2)?;
    a.mov(eax, dword_ptr(rbx + 0xfffc))?;
    expect(s, &mut fails, 0xffff_fffe, "the window's last dword")?;

    // IRQ 5: raised through its port, taken once, lowered by the handler.
    rt.init_pic(s, !(1 << LINE), 0xff)?;
    let a = &mut s.a;
    a.mov(dx, i32::from(IRQ_PORT) + i32::from(LINE))?;
    a.mov(al, 1)?;
    a.out(dx, al)?;
    let mut wait = a.create_label();
    let mut got = a.create_label();
    a.set_label(&mut wait)?;
    a.cli()?;
    a.cmp(qword_ptr(count), 0)?;
    a.jne(got)?;
    a.sti()?;
    a.hlt()?;
    a.jmp(wait)?;
    a.set_label(&mut got)?;
    // A few instructions with interrupts on: the lowered line raises nothing more.
    a.sti()?;
    a.nop()?;
    a.nop()?;
    a.cli()?;
    a.mov(rax, qword_ptr(count))?;
    expect(s, &mut fails, 1, "IRQ 5 interrupts taken")?;
    rt.print(s, format!("{PASS_LINE}\r\n").as_bytes())?;
    rt.exit_with(s, EXIT_PASS)?;

    s.a.set_label(&mut absent)?;
    rt.print(s, format!("{ABSENT_LINE}; nothing checked\r\n").as_bytes())?;
    rt.exit_with(s, EXIT_PASS)?;

    for (mut l, text) in fails {
        s.a.set_label(&mut l)?;
        rt.print(s, text.as_bytes())?;
        s.a.call(rt.put_hex)?;
        rt.print(s, b"\r\n")?;
        rt.exit_with(s, EXIT_CHECK_FAILED)?;
    }

    // The IRQ handler: count, lower the line, EOI.
    s.export_here("irq")?;
    let a = &mut s.a;
    a.push(rax)?;
    a.push(rdx)?;
    a.inc(qword_ptr(count))?;
    a.mov(dx, i32::from(IRQ_PORT) + i32::from(LINE))?;
    a.xor(eax, eax)?;
    a.out(dx, al)?;
    a.mov(al, 0x20)?;
    a.out(0x20u32, al)?;
    a.pop(rdx)?;
    a.pop(rax)?;
    a.iretq()?;
    a.set_label(&mut count)?;
    a.dq(&[0])?;
    Ok(())
}
