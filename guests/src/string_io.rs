//! `string-io`: repeated string I/O in long mode under PIT interrupts, for record/replay
//! across engines (KVM hands such instructions over in batches, bt element by element; see
//! `deja_machine::exit_group`).
//!
//! [`ROUNDS`] times: REP INSB from PIT channel 0's counter (every element a clock read),
//! REP INSD from the ACPI PM timer, REP INSW from an unmapped port, an address-size-prefixed
//! REP INSB (ECX counts, RCX's high half is not zero), REP OUTSB of text to COM1, REP
//! OUTSW to the POST port, REP OUTSD to an unmapped port, a REP INSB with DF set, plain INSB
//! and OUTSB, and an IN directly followed by a REP INSB; lengths from 1 to several KVM
//! batches, starting just below page boundaries; each followed by a PM timer read. Channel 0
//! interrupts at [`TIMER_HZ`]; the handler counts them and reads the PM timer. The guest
//! prints the tick count and exits 0.

use crate::link::LinkError;
use crate::rt::{BootMessages, COM1, EXIT_PASS, PIC_BASE, long_mode_image};
use deja_machine::loader::Image;
use iced_x86::code_asm::*;

/// Rounds of the whole sequence.
pub const ROUNDS: i32 = 3;
/// PIT channel 0's interrupt rate.
pub const TIMER_HZ: u32 = 4000;
const PIT_HZ: u32 = 1_193_182;
const PM_TIMER: u16 = 0x608;
const UNMAPPED: u16 = 0x2e0;
const POST: u16 = 0x80;
const PIT_CH0: u16 = 0x40;
/// Text for the OUTSB to COM1 (above the 1 MiB line, inside the identity-mapped 2 MiB).
const TEXT: u64 = 0x18_0000;

/// How a string instruction of the sequence is encoded.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Form {
    Rep,
    /// REP with the address-size prefix (ECX and EDI in 64-bit mode).
    RepA32,
    Plain,
}

struct Op {
    input: bool,
    size: u8,
    port: u16,
    count: u64,
    start: u64,
    form: Form,
    down: bool,
    lead_in: bool,
}

const fn op(input: bool, size: u8, port: u16, count: u64, start: u64) -> Op {
    Op {
        input,
        size,
        port,
        count,
        start,
        form: Form::Rep,
        down: false,
        lead_in: false,
    }
}

const SEQUENCE: &[Op] = &[
    op(true, 1, PIT_CH0, 1, 0x10_0000),
    op(true, 1, PIT_CH0, 3000, 0x10_0f00),
    op(true, 4, PM_TIMER, 700, 0x10_3ff0),
    op(true, 2, UNMAPPED, 1500, 0x10_5ffe),
    Op {
        form: Form::RepA32,
        ..op(true, 1, PIT_CH0, 0x1_0000_0020, 0x10_7ff0)
    },
    op(false, 1, COM1, 300, TEXT + 0xf80),
    op(false, 2, POST, 2000, 0x10_0f00),
    op(false, 4, UNMAPPED + 4, 33, 0x10_3ff0),
    Op {
        down: true,
        ..op(true, 1, PIT_CH0, 100, 0x10_8080)
    },
    Op {
        form: Form::Plain,
        ..op(true, 1, PIT_CH0, 1, 0x10_9000)
    },
    Op {
        form: Form::Plain,
        ..op(false, 1, COM1, 1, TEXT)
    },
    Op {
        lead_in: true,
        ..op(true, 1, PIT_CH0, 40, 0x10_9100)
    },
];

pub(crate) fn build() -> Result<Image, LinkError> {
    long_mode_image(
        "string-io",
        BootMessages::default(),
        &[(PIC_BASE, "irq0")],
        &|s, rt| {
            let mut ticks = s.a.create_label();
            rt.load_idt(s)?;
            rt.init_pic(s, !1, 0xff)?;
            let a = &mut s.a;
            // Channel 0: mode 2, lobyte/hibyte (reads alternate the counter's bytes).
            let count = (PIT_HZ + TIMER_HZ / 2) / TIMER_HZ;
            a.mov(al, 0x34)?;
            a.out(0x43u32, al)?;
            a.mov(al, (count & 0xff) as i32)?;
            a.out(0x40u32, al)?;
            a.mov(al, (count >> 8) as i32)?;
            a.out(0x40u32, al)?;
            // Printable text for COM1: 'a'..'p' repeated, CR LF ending the REP OUTSB's run.
            let mut fill = a.create_label();
            a.cld()?;
            a.mov(rdi, TEXT)?;
            a.mov(ecx, 0x2000)?;
            a.set_label(&mut fill)?;
            a.mov(eax, edi)?;
            a.and(al, 15)?;
            a.add(al, i32::from(b'a'))?;
            a.stosb()?;
            a.dec(ecx)?;
            a.jnz(fill)?;
            a.mov(rax, TEXT + 0xf80 + 300 - 2)?;
            a.mov(word_ptr(rax), 0x0a0d)?;
            rt.print(s, b"string-io: REP INS/OUTS under PIT interrupts\r\n")?;
            let a = &mut s.a;
            a.sti()?;
            a.mov(r12d, ROUNDS)?;
            let mut round = a.create_label();
            a.set_label(&mut round)?;
            for o in SEQUENCE {
                let first = if o.down {
                    o.start + (o.count - 1) * u64::from(o.size)
                } else {
                    o.start
                };
                a.mov(edx, i32::from(o.port))?;
                a.mov(rcx, o.count)?;
                a.mov(if o.input { rdi } else { rsi }, first)?;
                if o.down {
                    a.std()?;
                }
                if o.lead_in {
                    a.in_(al, dx)?;
                }
                let opcode = match (o.input, o.size) {
                    (true, 1) => 0x6c,
                    (true, _) => 0x6d,
                    (false, 1) => 0x6e,
                    (false, _) => 0x6f,
                };
                let mut bytes = Vec::new();
                if o.form == Form::RepA32 {
                    bytes.push(0x67);
                }
                if o.size == 2 {
                    bytes.push(0x66);
                }
                if o.form != Form::Plain {
                    bytes.push(0xf3);
                }
                bytes.push(opcode);
                a.db(&bytes)?;
                if o.down {
                    a.cld()?;
                }
                a.mov(edx, i32::from(PM_TIMER))?;
                a.in_(eax, dx)?;
            }
            a.dec(r12d)?;
            a.jnz(round)?;
            a.cli()?;
            a.mov(al, 0xff)?;
            a.out(0x21u32, al)?;
            rt.print(s, b"string-io: ")?;
            s.a.mov(rax, qword_ptr(ticks))?;
            rt.print_dec(s)?;
            rt.print(s, b" timer interrupts\r\nstring-io: PASS\r\n")?;
            rt.exit_with(s, EXIT_PASS)?;

            // IRQ 0: count, read the clock, acknowledge.
            s.export_here("irq0")?;
            let a = &mut s.a;
            a.push(rax)?;
            a.push(rdx)?;
            a.inc(qword_ptr(ticks))?;
            a.mov(edx, i32::from(PM_TIMER))?;
            a.in_(eax, dx)?;
            a.mov(al, 0x20)?;
            a.out(0x20u32, al)?;
            a.pop(rdx)?;
            a.pop(rax)?;
            a.iretq()?;
            a.set_label(&mut ticks)?;
            a.dq(&[0])?;
            Ok(())
        },
    )
}
