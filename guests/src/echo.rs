//! `echo`: copies serial input to serial output until EOT (0x04), interrupt driven.
//!
//! COM1's receive interrupt (IER bit 0, MCR.OUT2 set as a PC needs) raises IRQ 4, which the
//! remapped 8259A delivers as vector 0x24. The handler drains the receiver into a 256-byte
//! ring; the main loop takes bytes out with interrupts off and otherwise waits in `STI; HLT`
//! (STI's one-instruction shadow closes the race between the check and the halt). So the
//! guest exercises serial input, the PIC, EOI and HLT wake-ups.

use crate::link::LinkError;
use crate::rt::{BootMessages, COM1, COM1_LSR, EXIT_PASS, PIC_BASE, long_mode_image};
use deja_machine::loader::Image;
use iced_x86::code_asm::*;

/// The line `echo` prints before it echoes anything.
pub const BANNER: &str = "deja echo: type text, Ctrl-D (EOT) ends\r\n";
/// The byte that ends the echo.
pub const EOT: u8 = 0x04;

/// What `echo` prints after EOT when it echoed `count` bytes.
pub fn trailer(count: usize) -> String {
    format!("\r\necho: EOT after {count} bytes\r\n")
}

pub(crate) fn build() -> Result<Image, LinkError> {
    let irq4 = PIC_BASE + 4;
    long_mode_image(
        "echo",
        BootMessages::default(),
        &[(irq4, "irq4")],
        &|s, rt| {
            let mut buf = s.a.create_label();
            let mut head = s.a.create_label();
            let mut tail = s.a.create_label();
            rt.print(s, BANNER.as_bytes())?;
            rt.load_idt(s)?;
            rt.init_pic(s, !(1 << 4), 0xff)?;
            let a = &mut s.a;
            // 115200 8N1, FIFO on (trigger 1 byte), DTR|RTS|OUT2, receive interrupt only.
            for (port, value) in [
                (COM1 + 3, 0x80),
                (COM1, 0x01),
                (COM1 + 1, 0x00),
                (COM1 + 3, 0x03),
                (COM1 + 2, 0x07),
                (COM1 + 4, 0x0b),
                (COM1 + 1, 0x01),
            ] {
                a.mov(dx, i32::from(port))?;
                a.mov(al, value)?;
                a.out(dx, al)?;
            }
            a.xor(r12d, r12d)?; // bytes echoed

            let mut idle = a.create_label();
            let mut have = a.create_label();
            let mut done = a.create_label();
            a.set_label(&mut idle)?;
            a.cli()?;
            a.mov(al, byte_ptr(head))?;
            a.cmp(al, byte_ptr(tail))?;
            a.jne(have)?;
            a.sti()?;
            a.hlt()?;
            a.jmp(idle)?;
            a.set_label(&mut have)?;
            a.movzx(ecx, byte_ptr(tail))?;
            a.lea(rbx, ptr(buf))?;
            a.mov(al, byte_ptr(rbx + rcx))?;
            a.inc(cl)?;
            a.mov(byte_ptr(tail), cl)?;
            a.sti()?;
            a.cmp(al, i32::from(EOT))?;
            a.je(done)?;
            a.call(rt.putc)?;
            a.inc(r12)?;
            a.jmp(idle)?;
            a.set_label(&mut done)?;
            rt.print(s, b"\r\necho: EOT after ")?;
            s.a.mov(rax, r12)?;
            rt.print_dec(s)?;
            rt.print(s, b" bytes\r\n")?;
            rt.exit_with(s, EXIT_PASS)?;

            // IRQ 4: drain the receiver into the ring (a full ring drops the byte), EOI.
            s.export_here("irq4")?;
            let a = &mut s.a;
            let mut more = a.create_label();
            let mut drained = a.create_label();
            let mut full = a.create_label();
            for r in [rax, rbx, rcx, rdx] {
                a.push(r)?;
            }
            a.lea(rbx, ptr(buf))?;
            a.set_label(&mut more)?;
            a.mov(dx, i32::from(COM1_LSR))?;
            a.in_(al, dx)?;
            a.test(al, 0x01)?;
            a.jz(drained)?;
            a.mov(dx, i32::from(COM1))?;
            a.in_(al, dx)?;
            a.movzx(ecx, byte_ptr(head))?;
            a.mov(dl, cl)?;
            a.inc(dl)?;
            a.cmp(dl, byte_ptr(tail))?;
            a.je(full)?;
            a.mov(byte_ptr(rbx + rcx), al)?;
            a.mov(byte_ptr(head), dl)?;
            a.set_label(&mut full)?;
            a.jmp(more)?;
            a.set_label(&mut drained)?;
            a.mov(al, 0x20)?;
            a.out(0x20u32, al)?;
            for r in [rdx, rcx, rbx, rax] {
                a.pop(r)?;
            }
            a.iretq()?;

            a.set_label(&mut head)?;
            a.db(&[0])?;
            a.set_label(&mut tail)?;
            a.db(&[0])?;
            a.set_label(&mut buf)?;
            a.db(&[0; 256])?;
            Ok(())
        },
    )
}
