//! What every guest shares: the boot path from real mode through 32-bit protected mode to
//! long mode, the 64-bit runtime (serial output, numbers, exit), the IDT with stubs that
//! report unexpected vectors, and the 8259A setup.
//!
//! Memory map (all below 2 MiB, identity mapped by one 2 MiB page):
//! - `0x1000..0x4000`: PML4, PDPT, PD built by the 32-bit code;
//! - `..0x7c00`: the stack, growing down;
//! - [`LOAD_ADDR`]`..`: the image.

use crate::link::{Emit, LinkError, Linked, Section, SectionAsm, link};
use deja_machine::loader::{EntryMode, Image, ImageFormat};
use iced_x86::code_asm::*;

/// Where guests are loaded and entered (in real mode, as a boot sector is).
pub const LOAD_ADDR: u64 = 0x7c00;
/// Top of the stack in every mode.
const STACK_TOP: i32 = 0x7c00;
/// Physical address of the PML4; the PDPT and PD follow it page by page.
const PAGE_TABLES: u32 = 0x1000;

/// GDT selectors the boot path sets up.
pub const SEL_CODE32: u16 = 0x08;
/// Flat data segment for every mode.
pub const SEL_DATA: u16 = 0x10;
/// 64-bit code segment.
pub const SEL_CODE64: u16 = 0x18;

/// Exit status: the guest's checks passed.
pub const EXIT_PASS: u8 = 0;
/// Exit status: a check failed (the guest says which on COM1).
pub const EXIT_CHECK_FAILED: u8 = 1;
/// Exit status: an exception or interrupt arrived that the guest did not expect.
pub const EXIT_UNEXPECTED_VECTOR: u8 = 2;
/// Exit status: the check could not decide (e.g. the host did not run the guest when
/// timer ticks were due); running again may decide it.
pub const EXIT_INCONCLUSIVE: u8 = 4;

/// COM1 data register (THR/RBR, DLL with DLAB).
pub const COM1: u16 = 0x3f8;
/// COM1 line status register.
pub const COM1_LSR: u16 = COM1 + 5;
/// isa-debug-exit port.
pub const DEBUG_EXIT: u32 = 0xf4;

/// Vectors covered by the IDT: the 32 exceptions and the 16 remapped PIC lines.
pub const IDT_VECTORS: u8 = 0x30;
/// Vector of IRQ 0 after the PIC is remapped.
pub const PIC_BASE: u8 = 0x20;
/// Exceptions that push an error code.
const ERROR_CODE_VECTORS: [u8; 10] = [8, 10, 11, 12, 13, 14, 17, 21, 29, 30];

/// Messages the boot path prints in each mode before moving on (None: silent).
#[derive(Default, Clone, Copy)]
pub struct BootMessages {
    /// Printed in real mode.
    pub real: Option<&'static [u8]>,
    /// Printed in 32-bit protected mode.
    pub protected: Option<&'static [u8]>,
}

/// Builds a raw image entered in real mode at [`LOAD_ADDR`] that boots to long mode and
/// runs `main` (64-bit code). `handlers` maps vectors to symbols `main` exports; every other
/// vector below [`IDT_VECTORS`] reports itself and exits with [`EXIT_UNEXPECTED_VECTOR`].
pub fn long_mode_image(
    name: &str,
    messages: BootMessages,
    handlers: &[(u8, &'static str)],
    main: &dyn Fn(&mut SectionAsm<'_>, &mut Runtime) -> Result<(), LinkError>,
) -> Result<Image, LinkError> {
    let linked = long_mode_link(name, messages, handlers, main)?;
    Ok(Image {
        initrd: None,
        name: format!("guest:{name}"),
        bytes: linked.bytes,
        format: ImageFormat::Raw {
            load_addr: LOAD_ADDR,
            entry: LOAD_ADDR,
            mode: EntryMode::Real,
        },
    })
}

/// [`long_mode_image`] with more sections after the IDT (code of other bitness a guest
/// switches to: 16-bit code for real and 16-bit protected mode, 32-bit code for protected and
/// compatibility mode). Sections that real-mode code reaches must set `limit: Some(0x1_0000)`.
pub(crate) fn long_mode_image_with(
    name: &str,
    handlers: &[(u8, &'static str)],
    main: &dyn Fn(&mut SectionAsm<'_>, &mut Runtime) -> Result<(), LinkError>,
    extra: &[Section<'_>],
) -> Result<Image, LinkError> {
    let linked = long_mode_link_with(name, BootMessages::default(), handlers, main, extra)?;
    Ok(Image {
        initrd: None,
        name: format!("guest:{name}"),
        bytes: linked.bytes,
        format: ImageFormat::Raw {
            load_addr: LOAD_ADDR,
            entry: LOAD_ADDR,
            mode: EntryMode::Real,
        },
    })
}

/// [`long_mode_image`] before it becomes an [`Image`]: bytes and symbols.
pub(crate) fn long_mode_link(
    name: &str,
    messages: BootMessages,
    handlers: &[(u8, &'static str)],
    main: &dyn Fn(&mut SectionAsm<'_>, &mut Runtime) -> Result<(), LinkError>,
) -> Result<Linked, LinkError> {
    long_mode_link_with(name, messages, handlers, main, &[])
}

fn long_mode_link_with(
    name: &str,
    messages: BootMessages,
    handlers: &[(u8, &'static str)],
    main: &dyn Fn(&mut SectionAsm<'_>, &mut Runtime) -> Result<(), LinkError>,
    extra: &[Section<'_>],
) -> Result<Linked, LinkError> {
    let guest = name.to_owned();
    let real: &Emit<'_> = &|s| real_mode(s, messages.real);
    let prot: &Emit<'_> = &|s| protected_mode(s, messages.protected);
    let long: &Emit<'_> = &|s| {
        s.export_here("long64")?;
        let a = &mut s.a;
        a.mov(ax, i32::from(SEL_DATA))?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        a.mov(ss, ax)?;
        a.mov(fs, ax)?;
        a.mov(gs, ax)?;
        a.mov(esp, STACK_TOP)?;
        let mut rt = Runtime::new(s, &guest);
        main(s, &mut rt)?;
        rt.emit(s)
    };
    let idt: &Emit<'_> = &|s| idt_table(s, handlers);
    let mut sections = vec![
        Section {
            name: "real16",
            bitness: 16,
            align: 1,
            limit: Some(0x1_0000),
            emit: real,
        },
        Section {
            name: "prot32",
            bitness: 32,
            align: 16,
            limit: None,
            emit: prot,
        },
        Section {
            name: "long64",
            bitness: 64,
            align: 16,
            limit: Some(0x20_0000),
            emit: long,
        },
        Section {
            name: "idt",
            bitness: 64,
            align: 16,
            limit: Some(0x20_0000),
            emit: idt,
        },
    ];
    sections.extend(extra.iter().map(|x| Section {
        name: x.name,
        bitness: x.bitness,
        align: x.align,
        limit: x.limit,
        emit: x.emit,
    }));
    link(LOAD_ADDR, &sections)
}

/// Real mode: normalise CS:IP, set up segments and stack, load the GDT, set CR0.PE and
/// jump into the 32-bit code segment.
pub(crate) fn real_mode(s: &mut SectionAsm<'_>, message: Option<&[u8]>) -> Result<(), LinkError> {
    // Whatever CS:IP the loader chose for the entry address, continue at 0000:real_start.
    let real_start = s.sym32("real_start");
    s.a.jmp_far(0, real_start)?;
    s.export_here("real_start")?;
    let gdt_ptr = s.sym("gdt_ptr") as i32;
    let prot32 = s.sym32("prot32");
    let msg = if message.is_some() {
        s.sym("msg_real") as i32
    } else {
        0
    };
    let a = &mut s.a;
    let mut puts = a.create_label();
    a.cli()?;
    a.xor(ax, ax)?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(sp, STACK_TOP)?;
    a.cld()?;
    if message.is_some() {
        a.mov(si, msg)?;
        a.call(puts)?;
    }
    a.mov(bx, gdt_ptr)?;
    a.lgdt(ptr(bx))?;
    a.mov(eax, cr0)?;
    a.or(eax, 1)?;
    a.mov(cr0, eax)?;
    a.jmp_far(SEL_CODE32, prot32)?;

    // puts: DS:SI -> NUL-terminated string, to COM1.
    let mut wait = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut puts)?;
    a.lodsb()?;
    a.test(al, al)?;
    a.jz(done)?;
    a.mov(bl, al)?;
    a.mov(dx, i32::from(COM1_LSR))?;
    a.set_label(&mut wait)?;
    a.in_(al, dx)?;
    a.test(al, 0x20)?;
    a.jz(wait)?;
    a.mov(al, bl)?;
    a.mov(dx, i32::from(COM1))?;
    a.out(dx, al)?;
    a.jmp(puts)?;
    a.set_label(&mut done)?;
    a.ret()?;

    s.export_here("gdt")?;
    s.a.dq(&[
        0,
        0x00cf_9a00_0000_ffff, // 0x08: 32-bit code, flat
        0x00cf_9200_0000_ffff, // 0x10: data, flat
        0x00af_9a00_0000_ffff, // 0x18: 64-bit code
    ])?;
    let gdt = s.sym32("gdt");
    s.export_here("gdt_ptr")?;
    s.a.dw(&[4 * 8 - 1])?;
    s.a.dd(&[gdt])?;
    if let Some(m) = message {
        s.export_here("msg_real")?;
        s.a.db(&nul_terminated(m))?;
    }
    Ok(())
}

/// 32-bit protected mode: flat segments, identity-map the first 2 MiB with 4-level tables,
/// enable PAE, EFER.LME and paging (which activates long mode), jump to 64-bit code.
fn protected_mode(s: &mut SectionAsm<'_>, message: Option<&[u8]>) -> Result<(), LinkError> {
    s.export_here("prot32")?;
    let long64 = s.sym32("long64");
    let msg = if message.is_some() {
        s.sym("msg_prot") as i32
    } else {
        0
    };
    let a = &mut s.a;
    let mut puts = a.create_label();
    a.mov(ax, i32::from(SEL_DATA))?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(fs, ax)?;
    a.mov(gs, ax)?;
    a.mov(esp, STACK_TOP)?;
    if message.is_some() {
        a.mov(esi, msg)?;
        a.call(puts)?;
    }
    // Three zeroed tables, then PML4[0] -> PDPT, PDPT[0] -> PD, PD[0] = 2 MiB page at 0.
    a.mov(edi, PAGE_TABLES)?;
    a.xor(eax, eax)?;
    a.mov(ecx, 3 * 1024)?;
    a.rep().stosd()?;
    a.mov(edi, PAGE_TABLES)?;
    a.mov(dword_ptr(edi), PAGE_TABLES + 0x1000 + 0x3)?;
    a.mov(dword_ptr(edi + 0x1000), PAGE_TABLES + 0x2000 + 0x3)?;
    a.mov(dword_ptr(edi + 0x2000), 0x83u32)?; // present, writable, 2 MiB
    a.mov(cr3, edi)?;
    a.mov(eax, cr4)?;
    a.or(eax, 0x20)?; // PAE
    a.mov(cr4, eax)?;
    a.mov(ecx, 0xc000_0080u32)?; // EFER
    a.rdmsr()?;
    a.or(eax, 0x100)?; // LME
    a.wrmsr()?;
    a.mov(eax, cr0)?;
    a.or(eax, 0x8000_0000u32 as i32)?; // PG
    a.mov(cr0, eax)?;
    a.jmp_far(SEL_CODE64, long64)?;

    let mut wait = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut puts)?;
    a.lodsb()?;
    a.test(al, al)?;
    a.jz(done)?;
    a.mov(bl, al)?;
    a.mov(dx, i32::from(COM1_LSR))?;
    a.set_label(&mut wait)?;
    a.in_(al, dx)?;
    a.test(al, 0x20)?;
    a.jz(wait)?;
    a.mov(al, bl)?;
    a.mov(dx, i32::from(COM1))?;
    a.out(dx, al)?;
    a.jmp(puts)?;
    a.set_label(&mut done)?;
    a.ret()?;
    if let Some(m) = message {
        s.export_here("msg_prot")?;
        s.a.db(&nul_terminated(m))?;
    }
    Ok(())
}

/// The 64-bit IDT (interrupt gates into the 64-bit code segment) and its pseudo-descriptor.
fn idt_table(s: &mut SectionAsm<'_>, handlers: &[(u8, &'static str)]) -> Result<(), LinkError> {
    let mut entries = Vec::with_capacity(usize::from(IDT_VECTORS) * 2);
    for vector in 0..IDT_VECTORS {
        let target = match handlers.iter().find(|(v, _)| *v == vector) {
            Some((_, sym)) => s.sym(sym),
            None => s.sym(&format!("vec_{vector:02x}")),
        };
        let low = (target & 0xffff)
            | u64::from(SEL_CODE64) << 16
            | 0x8e00u64 << 32 // present, DPL 0, 64-bit interrupt gate
            | ((target >> 16) & 0xffff) << 48;
        entries.push(low);
        entries.push(target >> 32);
    }
    s.export_here("idt")?;
    s.a.dq(&entries)?;
    let idt = s.sym("idt");
    s.export_here("idt_ptr")?;
    s.a.dw(&[u16::from(IDT_VECTORS) * 16 - 1])?;
    s.a.dq(&[idt])?;
    Ok(())
}

fn nul_terminated(m: &[u8]) -> Vec<u8> {
    let mut v = m.to_vec();
    v.push(0);
    v
}

/// The 64-bit runtime routines of one image, called with `call`. All preserve every
/// register except the flags (and RSI for `puts`, which it advances).
pub struct Runtime {
    guest: String,
    /// Prints AL to COM1 (polls LSR.THRE first).
    pub putc: CodeLabel,
    /// Prints the NUL-terminated string at RSI.
    pub puts: CodeLabel,
    /// Prints RAX in decimal.
    pub put_dec: CodeLabel,
    /// Prints RAX in hexadecimal with a `0x` prefix.
    pub put_hex: CodeLabel,
    /// Writes AL to isa-debug-exit; never returns.
    pub exit: CodeLabel,
    strings: Vec<(CodeLabel, Vec<u8>)>,
}

impl Runtime {
    fn new(s: &mut SectionAsm<'_>, guest: &str) -> Self {
        Self {
            guest: guest.to_owned(),
            putc: s.a.create_label(),
            puts: s.a.create_label(),
            put_dec: s.a.create_label(),
            put_hex: s.a.create_label(),
            exit: s.a.create_label(),
            strings: Vec::new(),
        }
    }

    /// A label for a NUL-terminated string emitted with the runtime.
    pub fn string(&mut self, s: &mut SectionAsm<'_>, text: &[u8]) -> CodeLabel {
        let label = s.a.create_label();
        self.strings.push((label, nul_terminated(text)));
        label
    }

    /// Emits code that prints `text` (clobbers nothing but the flags).
    pub fn print(&mut self, s: &mut SectionAsm<'_>, text: &[u8]) -> Result<(), LinkError> {
        let label = self.string(s, text);
        s.a.push(rsi)?;
        s.a.lea(rsi, ptr(label))?;
        s.a.call(self.puts)?;
        s.a.pop(rsi)?;
        Ok(())
    }

    /// Emits code that prints RAX in decimal.
    pub fn print_dec(&mut self, s: &mut SectionAsm<'_>) -> Result<(), LinkError> {
        Ok(s.a.call(self.put_dec)?)
    }

    /// Emits code that exits with `status`.
    pub fn exit_with(&mut self, s: &mut SectionAsm<'_>, status: u8) -> Result<(), LinkError> {
        s.a.mov(al, i32::from(status))?;
        Ok(s.a.jmp(self.exit)?)
    }

    /// Emits code that programs the 8259A pair: ICW1-4 (edge triggered, cascade, 8086
    /// mode), master at vectors 0x20-0x27, slave at 0x28-0x2f, then the masks.
    pub fn init_pic(
        &mut self,
        s: &mut SectionAsm<'_>,
        master_mask: u8,
        slave_mask: u8,
    ) -> Result<(), LinkError> {
        let a = &mut s.a;
        for (port, value) in [
            (0x20u32, 0x11i32),
            (0xa0, 0x11),
            (0x21, i32::from(PIC_BASE)),
            (0xa1, i32::from(PIC_BASE) + 8),
            (0x21, 0x04),
            (0xa1, 0x02),
            (0x21, 0x01),
            (0xa1, 0x01),
            (0x21, i32::from(master_mask)),
            (0xa1, i32::from(slave_mask)),
        ] {
            a.mov(al, value)?;
            a.out(port, al)?;
        }
        Ok(())
    }

    /// Emits code that loads the image's IDT.
    pub fn load_idt(&mut self, s: &mut SectionAsm<'_>) -> Result<(), LinkError> {
        let idt_ptr = s.sym("idt_ptr");
        s.a.mov(rax, idt_ptr)?;
        s.a.lidt(ptr(rax))?;
        Ok(())
    }

    /// Emits the routines, the unexpected-vector stubs and the strings.
    fn emit(mut self, s: &mut SectionAsm<'_>) -> Result<(), LinkError> {
        self.emit_stubs(s)?;
        let a = &mut s.a;

        // putc
        let mut wait = a.create_label();
        a.set_label(&mut self.putc)?;
        a.push(rax)?;
        a.push(rdx)?;
        a.mov(dx, i32::from(COM1_LSR))?;
        a.set_label(&mut wait)?;
        a.in_(al, dx)?;
        a.test(al, 0x20)?;
        a.jz(wait)?;
        a.mov(rax, qword_ptr(rsp + 8))?;
        a.mov(dx, i32::from(COM1))?;
        a.out(dx, al)?;
        a.pop(rdx)?;
        a.pop(rax)?;
        a.ret()?;

        // puts
        let mut next = a.create_label();
        let mut done = a.create_label();
        a.set_label(&mut self.puts)?;
        a.push(rax)?;
        a.set_label(&mut next)?;
        a.lodsb()?;
        a.test(al, al)?;
        a.jz(done)?;
        a.call(self.putc)?;
        a.jmp(next)?;
        a.set_label(&mut done)?;
        a.pop(rax)?;
        a.ret()?;

        // put_dec: digits built backwards in a buffer on the stack.
        let mut digit = a.create_label();
        a.set_label(&mut self.put_dec)?;
        for r in [rax, rcx, rdx, rsi, rdi] {
            a.push(r)?;
        }
        a.sub(rsp, 32)?;
        a.lea(rdi, ptr(rsp + 31))?;
        a.mov(byte_ptr(rdi), 0)?;
        a.mov(ecx, 10)?;
        a.set_label(&mut digit)?;
        a.xor(edx, edx)?;
        a.div(rcx)?;
        a.add(dl, b'0' as i32)?;
        a.dec(rdi)?;
        a.mov(byte_ptr(rdi), dl)?;
        a.test(rax, rax)?;
        a.jnz(digit)?;
        a.mov(rsi, rdi)?;
        a.call(self.puts)?;
        a.add(rsp, 32)?;
        for r in [rdi, rsi, rdx, rcx, rax] {
            a.pop(r)?;
        }
        a.ret()?;

        // put_hex: "0x", then digits without leading zeros (at least one).
        let mut skip = a.create_label();
        let mut emit_digit = a.create_label();
        let mut letter = a.create_label();
        let mut print_it = a.create_label();
        a.set_label(&mut self.put_hex)?;
        for r in [rax, rcx, rdx] {
            a.push(r)?;
        }
        a.mov(rdx, rax)?;
        a.mov(al, b'0' as i32)?;
        a.call(self.putc)?;
        a.mov(al, b'x' as i32)?;
        a.call(self.putc)?;
        a.mov(ecx, 16)?; // digits left
        a.set_label(&mut skip)?; // drop leading zero digits, keep the last one
        a.cmp(ecx, 1)?;
        a.je(emit_digit)?;
        a.mov(rax, rdx)?;
        a.shr(rax, 60)?;
        a.jnz(emit_digit)?;
        a.shl(rdx, 4)?;
        a.dec(ecx)?;
        a.jmp(skip)?;
        a.set_label(&mut emit_digit)?;
        a.mov(rax, rdx)?;
        a.shr(rax, 60)?;
        a.cmp(al, 10)?;
        a.jae(letter)?;
        a.add(al, b'0' as i32)?;
        a.jmp(print_it)?;
        a.set_label(&mut letter)?;
        a.add(al, (b'a' - 10) as i32)?;
        a.set_label(&mut print_it)?;
        a.call(self.putc)?;
        a.shl(rdx, 4)?;
        a.dec(ecx)?;
        a.jnz(emit_digit)?;
        for r in [rdx, rcx, rax] {
            a.pop(r)?;
        }
        a.ret()?;

        // exit: write AL to isa-debug-exit; should the write not stop the machine, halt
        // with interrupts off forever.
        let mut halt = a.create_label();
        a.set_label(&mut self.exit)?;
        a.out(DEBUG_EXIT, al)?;
        a.set_label(&mut halt)?;
        a.cli()?;
        a.hlt()?;
        a.jmp(halt)?;

        for (mut label, bytes) in std::mem::take(&mut self.strings) {
            s.a.set_label(&mut label)?;
            s.a.db(&bytes)?;
        }
        Ok(())
    }

    /// One stub per vector: pushes a dummy error code where the CPU pushes none, pushes the
    /// vector, and jumps to code that prints vector, error code and RIP, then exits.
    fn emit_stubs(&mut self, s: &mut SectionAsm<'_>) -> Result<(), LinkError> {
        let mut common = s.a.create_label();
        for vector in 0..IDT_VECTORS {
            s.export_here(&format!("vec_{vector:02x}"))?;
            if !ERROR_CODE_VECTORS.contains(&vector) {
                s.a.push(0)?;
            }
            s.a.push(i32::from(vector))?;
            s.a.jmp(common)?;
        }
        s.a.set_label(&mut common)?;
        let head = format!("\r\n{}: unexpected vector ", self.guest);
        self.print(s, head.as_bytes())?;
        s.a.mov(rax, qword_ptr(rsp))?;
        s.a.call(self.put_hex)?;
        self.print(s, b", error code ")?;
        s.a.mov(rax, qword_ptr(rsp + 8))?;
        s.a.call(self.put_hex)?;
        self.print(s, b", rip ")?;
        s.a.mov(rax, qword_ptr(rsp + 16))?;
        s.a.call(self.put_hex)?;
        self.print(s, b"\r\n")?;
        self.exit_with(s, EXIT_UNEXPECTED_VECTOR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Code, Decoder, DecoderOptions};

    fn linked_with_handler() -> Linked {
        long_mode_link(
            "t",
            BootMessages::default(),
            &[(0x21, "my_irq")],
            &|s, rt| {
                rt.exit_with(s, EXIT_PASS)?;
                s.export_here("my_irq")?;
                Ok(s.a.iretq()?)
            },
        )
        .unwrap()
    }

    fn gate_target(bytes: &[u8], idt_offset: usize, vector: usize) -> (u64, u16, u16) {
        let e = &bytes[idt_offset + vector * 16..][..16];
        let word = |i: usize| u64::from(u16::from_le_bytes([e[i], e[i + 1]]));
        let target = word(0)
            | word(6) << 16
            | u64::from(u32::from_le_bytes([e[8], e[9], e[10], e[11]])) << 32;
        (target, word(2) as u16, word(4) as u16)
    }

    #[test]
    fn idt_gates_point_at_handlers_and_at_stubs_that_push_their_vector() {
        let linked = linked_with_handler();
        let idt = linked.symbols["idt"];
        let offset = (idt - LOAD_ADDR) as usize;
        assert_eq!(idt % 8, 0, "IDT at {idt:#x}");
        for vector in 0..usize::from(IDT_VECTORS) {
            let (target, selector, flags) = gate_target(&linked.bytes, offset, vector);
            assert_eq!(selector, SEL_CODE64, "vector {vector:#x}");
            assert_eq!(flags, 0x8e00, "vector {vector:#x}");
            if vector == 0x21 {
                assert_eq!(target, linked.symbols["my_irq"]);
                continue;
            }
            assert_eq!(target, linked.symbols[&format!("vec_{vector:02x}")]);
            let code = &linked.bytes[(target - LOAD_ADDR) as usize..];
            let mut d = Decoder::with_ip(64, code, target, DecoderOptions::NONE);
            let mut pushes = Vec::new();
            loop {
                let i = d.decode();
                if i.code() != Code::Pushq_imm8 && i.code() != Code::Pushq_imm32 {
                    assert!(
                        matches!(i.code(), Code::Jmp_rel8_64 | Code::Jmp_rel32_64),
                        "vector {vector:#x}: {i}"
                    );
                    break;
                }
                pushes.push(i.immediate64());
            }
            let with_error_code = ERROR_CODE_VECTORS.contains(&(vector as u8));
            let expected: Vec<u64> = if with_error_code {
                vec![vector as u64]
            } else {
                vec![0, vector as u64]
            };
            assert_eq!(pushes, expected, "vector {vector:#x}");
        }
        let ptr = (linked.symbols["idt_ptr"] - LOAD_ADDR) as usize;
        let limit = u16::from_le_bytes([linked.bytes[ptr], linked.bytes[ptr + 1]]);
        let base = u64::from_le_bytes(linked.bytes[ptr + 2..ptr + 10].try_into().unwrap());
        assert_eq!((limit, base), (u16::from(IDT_VECTORS) * 16 - 1, idt));
    }

    #[test]
    fn sections_stay_where_each_mode_can_reach_them() {
        let linked = linked_with_handler();
        // Real-mode code addresses everything with 16-bit offsets from segment 0.
        assert!(linked.symbols["gdt_ptr"] < 0x1_0000);
        assert!(linked.symbols["prot32"] < 0x1_0000);
        // Long-mode code and the IDT sit inside the one identity-mapped 2 MiB page, above
        // the page tables and the stack.
        assert!(linked.symbols["long64"] >= LOAD_ADDR);
        assert!(LOAD_ADDR + (linked.bytes.len() as u64) < 0x20_0000);
    }
}
