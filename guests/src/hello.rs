//! `hello`: the boot path on its own. Each mode prints its part of the greeting, so the
//! output shows how far the guest got; 64-bit code then checks EFER.LMA before exiting 0.

use crate::link::LinkError;
use crate::rt::{BootMessages, EXIT_CHECK_FAILED, EXIT_PASS, long_mode_image};
use deja_machine::loader::Image;
use iced_x86::code_asm::*;

/// The full line `hello` prints when every mode switch works.
pub const GREETING: &str = "Hello from deja: real -> protected -> long mode\r\n";

pub(crate) fn build() -> Result<Image, LinkError> {
    long_mode_image(
        "hello",
        BootMessages {
            real: Some(b"Hello from deja: real"),
            protected: Some(b" -> protected"),
        },
        &[],
        &|s, rt| {
            rt.print(s, b" -> long mode\r\n")?;
            // Executing this code already implies IA-32e mode; make the CPU confirm it.
            let mut lma_clear = s.a.create_label();
            s.a.mov(ecx, 0xc000_0080u32)?;
            s.a.rdmsr()?;
            s.a.test(eax, 0x400)?;
            s.a.jz(lma_clear)?;
            rt.exit_with(s, EXIT_PASS)?;
            s.a.set_label(&mut lma_clear)?;
            rt.print(s, b"hello: EFER.LMA is clear in 64-bit code, EFER = ")?;
            s.a.shl(rdx, 32)?;
            s.a.or(rax, rdx)?;
            s.a.call(rt.put_hex)?;
            rt.print(s, b"\r\n")?;
            rt.exit_with(s, EXIT_CHECK_FAILED)
        },
    )
}
