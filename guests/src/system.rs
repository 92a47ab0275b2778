//! System-level guests: code coherence (`smc`), exceptions with their error codes
//! (`exceptions`), CLI/STI/POPF in ring 3 under each IOPL (`iopl`) and mode switches down to
//! real mode and back, virtual-8086 mode and hardware task switches (`modes`).
//!
//! Each one checks itself and exits 0 (pass) or 1 (a check failed; it prints which, with
//! what it saw). They share a small ring-3 capable environment: a GDT with user segments
//! and a 64-bit TSS, user-accessible identity paging of the first 2 MiB, and exception
//! handlers that record the vector, error code and CR2 and resume where the test said.

#![allow(dead_code)]

use crate::link::{LinkError, Section, SectionAsm};
use crate::rt::{EXIT_CHECK_FAILED, EXIT_PASS, Runtime, long_mode_image_with};
use deja_machine::loader::Image;
use iced_x86::code_asm::*;

/// The GDT the system guests load (replacing the boot path's four entries).
const GDT: u64 = 0x18_0000;
/// The 64-bit TSS (RSP0 for ring 3 -> 0).
const TSS64: u64 = 0x18_1000;
/// Cells the handlers and the tests share.
const CELLS: u64 = 0x18_2000;
/// Vector of the last exception (0xff: none).
const LAST_VEC: u64 = CELLS;
/// Its error code (all ones when the vector has none).
const LAST_ERR: u64 = CELLS + 8;
/// CR2 when the last exception was a #PF.
const LAST_CR2: u64 = CELLS + 0x10;
/// Where the handlers resume (they replace the RIP in the frame).
const RESUME: u64 = CELLS + 0x18;
/// Ring 0's RSP while ring-3 code runs (`int RING0_VECTOR` comes back to it).
const SAVED_RSP: u64 = CELLS + 0x20;
/// Per-case results recorded by code that cannot print (ring 3): vector, error code.
const SLOTS: u64 = CELLS + 0x100;
/// The ring-0 stack of ring 3 -> 0 transitions.
const RING0_STACK: u64 = 0x17_0000;
/// The ring-3 stack.
const USER_STACK: u64 = 0x16_0000;
/// Vector whose gate (DPL 3) takes ring 3 back to the ring-0 code that entered it.
const RING0_VECTOR: u8 = 0x2e;
/// "No error code" in [`LAST_ERR`].
const NO_ERROR: u64 = u64::MAX;

/// Selectors of [`GDT`].
const CODE32: u16 = 0x08;
const DATA: u16 = 0x10;
const CODE64: u16 = 0x18;
const USER_CODE32: u16 = 0x20 | 3;
const USER_DATA: u16 = 0x28 | 3;
const USER_CODE64: u16 = 0x30 | 3;
const TSS_SEL: u16 = 0x38;
/// A data segment descriptor that is not present (for #NP).
const NOT_PRESENT: u16 = 0x48;
/// 16-bit code and data segments (base 0, limit 64 KiB) for 16-bit protected mode.
const CODE16: u16 = 0x50;
const DATA16: u16 = 0x58;
/// 32-bit TSSs for the task-switch tests, and a task gate to the second.
const TSS_A: u16 = 0x60;
const TSS_B: u16 = 0x68;
const TASK_GATE_B: u16 = 0x70;
/// Where those TSSs live.
const TSS_A_BASE: u64 = 0x18_3000;
const TSS_B_BASE: u64 = 0x18_3100;

/// The vectors the recording handlers cover.
const RECORDED: [(u8, &str); 17] = [
    (0, "rec_00"),
    (1, "rec_01"),
    (3, "rec_03"),
    (4, "rec_04"),
    (5, "rec_05"),
    (6, "rec_06"),
    (7, "rec_07"),
    (8, "rec_08"),
    (10, "rec_0a"),
    (11, "rec_0b"),
    (12, "rec_0c"),
    (13, "rec_0d"),
    (14, "rec_0e"),
    (16, "rec_10"),
    (17, "rec_11"),
    (19, "rec_13"),
    (RING0_VECTOR, "ring0_return"),
];

fn has_error_code(v: u8) -> bool {
    matches!(v, 8 | 10 | 11 | 12 | 13 | 14 | 17)
}

fn descriptor(base: u64, limit: u64, access: u64, flags: u64) -> u64 {
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (access << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (flags << 52)
        | (((base >> 24) & 0xff) << 56)
}

/// The GDT entries from 0 on (the 64-bit TSS takes two slots).
fn gdt_entries() -> Vec<u64> {
    vec![
        0,
        descriptor(0, 0xfffff, 0x9a, 0xc),     // 0x08 code32
        descriptor(0, 0xfffff, 0x92, 0xc),     // 0x10 data
        descriptor(0, 0xfffff, 0x9a, 0xa),     // 0x18 code64
        descriptor(0, 0xfffff, 0xfa, 0xc),     // 0x20 code32 ring 3
        descriptor(0, 0xfffff, 0xf2, 0xc),     // 0x28 data ring 3
        descriptor(0, 0xfffff, 0xfa, 0xa),     // 0x30 code64 ring 3
        descriptor(TSS64, 0x67, 0x89, 0),      // 0x38 64-bit TSS (low half)
        0,                                     // 0x40 (its high half)
        descriptor(0, 0xfffff, 0x12, 0xc),     // 0x48 data, not present
        descriptor(0, 0xffff, 0x9a, 0),        // 0x50 code16
        descriptor(0, 0xffff, 0x92, 0),        // 0x58 data16
        descriptor(TSS_A_BASE, 0x67, 0x89, 0), // 0x60 32-bit TSS A
        descriptor(TSS_B_BASE, 0x67, 0x89, 0), // 0x68 32-bit TSS B
        (TSS_B as u64) << 16 | 0x85 << 40,     // 0x70 task gate -> B
    ]
}

/// Emits 64-bit ring-0 code that loads [`GDT`] and the TSS, makes the first 2 MiB user
/// accessible, opens the vectors ring 3 may raise (#BP, #OF, [`RING0_VECTOR`]) and masks
/// the 8259As.
fn setup(s: &mut SectionAsm<'_>, rt: &mut Runtime) -> Result<(), LinkError> {
    rt.load_idt(s)?;
    rt.init_pic(s, 0xff, 0xff)?;
    let idt = s.sym("idt");
    let a = &mut s.a;
    for (i, d) in gdt_entries().iter().enumerate() {
        a.mov(rax, *d)?;
        a.mov(qword_ptr(GDT + 8 * i as u64), rax)?;
    }
    let limit = (gdt_entries().len() * 8 - 1) as u64;
    a.mov(rax, (GDT << 16) | limit)?;
    a.mov(qword_ptr(GDT + 0x200), rax)?;
    a.mov(qword_ptr(GDT + 0x208), 0)?;
    a.lgdt(ptr(GDT + 0x200))?;
    a.mov(rax, RING0_STACK)?;
    a.mov(qword_ptr(TSS64 + 4), rax)?;
    a.mov(word_ptr(TSS64 + 0x66), 0x68)?;
    a.mov(ax, TSS_SEL as u32)?;
    a.ltr(ax)?;
    for table in [0x1000u64, 0x2000, 0x3000] {
        a.or(dword_ptr(table), 4)?;
    }
    a.mov(rax, cr3)?;
    a.mov(cr3, rax)?;
    for v in [3u64, 4, RING0_VECTOR as u64] {
        a.or(byte_ptr(idt + 16 * v + 5), 0x60)?;
    }
    Ok(())
}

/// Emits the recording handlers and the ring-3 return handler (64-bit code).
fn handlers(s: &mut SectionAsm<'_>) -> Result<(), LinkError> {
    for (v, name) in RECORDED {
        s.export_here(name)?;
        let a = &mut s.a;
        if v == RING0_VECTOR {
            a.mov(rsp, qword_ptr(SAVED_RSP))?;
            a.ret()?;
            continue;
        }
        a.push(rbx)?;
        if has_error_code(v) {
            a.mov(rbx, qword_ptr(rsp + 8))?;
        } else {
            a.mov(rbx, NO_ERROR)?;
        }
        a.mov(qword_ptr(LAST_ERR), rbx)?;
        a.mov(dword_ptr(LAST_VEC), v as u32)?;
        if v == 14 {
            a.mov(rbx, cr2)?;
            a.mov(qword_ptr(LAST_CR2), rbx)?;
        }
        a.mov(rbx, qword_ptr(RESUME))?;
        let frame = if has_error_code(v) { 16 } else { 8 };
        a.mov(qword_ptr(rsp + frame), rbx)?;
        a.pop(rbx)?;
        if has_error_code(v) {
            a.add(rsp, 8)?;
        }
        a.iretq()?;
    }
    Ok(())
}

/// Emits code that arms the handlers to resume at the returned label (set it after the
/// instruction under test). Works in 32- and 64-bit code.
fn arm(a: &mut CodeAssembler, bits: u32) -> Result<CodeLabel, IcedError> {
    let resume = a.create_label();
    a.mov(dword_ptr(LAST_VEC), 0xff)?;
    if bits == 64 {
        a.lea(rax, ptr(resume))?;
        a.mov(qword_ptr(RESUME), rax)?;
    } else {
        a.lea(eax, ptr(resume))?;
        a.mov(dword_ptr(RESUME), eax)?;
        a.mov(dword_ptr(RESUME + 4), 0)?;
    }
    Ok(resume)
}

/// Emits code that copies the last vector and error code into result slot `slot` (32- or
/// 64-bit code, any ring).
fn record(a: &mut CodeAssembler, slot: u64) -> Result<(), IcedError> {
    a.mov(eax, dword_ptr(LAST_VEC))?;
    a.mov(dword_ptr(SLOTS + 16 * slot), eax)?;
    a.mov(eax, dword_ptr(LAST_ERR))?;
    a.mov(dword_ptr(SLOTS + 16 * slot + 8), eax)?;
    a.mov(eax, dword_ptr(LAST_ERR + 4))?;
    a.mov(dword_ptr(SLOTS + 16 * slot + 12), eax)?;
    Ok(())
}

/// Emits 64-bit ring-0 code that checks slot `slot` against `vector` and `error` and exits
/// with a message naming `what` when it differs.
fn check_slot(
    s: &mut SectionAsm<'_>,
    rt: &mut Runtime,
    slot: u64,
    what: &str,
    vector: u8,
    error: Option<u64>,
) -> Result<(), LinkError> {
    let mut bad = s.a.create_label();
    let mut good = s.a.create_label();
    s.a.cmp(dword_ptr(SLOTS + 16 * slot), vector as u32)?;
    s.a.jne(bad)?;
    s.a.mov(rax, error.unwrap_or(NO_ERROR))?;
    s.a.cmp(qword_ptr(SLOTS + 16 * slot + 8), rax)?;
    s.a.jne(bad)?;
    s.a.jmp(good)?;
    s.a.set_label(&mut bad)?;
    let want = match error {
        Some(e) => format!("vector {vector} error {e:#x}"),
        None => format!("vector {vector}"),
    };
    rt.print(
        s,
        format!("FAIL {what}: expected {want}, got vector ").as_bytes(),
    )?;
    s.a.mov(eax, dword_ptr(SLOTS + 16 * slot))?;
    s.a.call(rt.put_dec)?;
    rt.print(s, b" error ")?;
    s.a.mov(rax, qword_ptr(SLOTS + 16 * slot + 8))?;
    s.a.call(rt.put_hex)?;
    rt.print(s, b"\r\n")?;
    rt.exit_with(s, EXIT_CHECK_FAILED)?;
    s.a.set_label(&mut good)?;
    Ok(())
}

/// Emits a check that `cond` (a Jcc to `ok`, emitted by `test`) holds, else prints and fails.
fn check(
    s: &mut SectionAsm<'_>,
    rt: &mut Runtime,
    what: &str,
    test: impl FnOnce(&mut CodeAssembler, CodeLabel) -> Result<(), IcedError>,
) -> Result<(), LinkError> {
    let mut ok = s.a.create_label();
    test(&mut s.a, ok)?;
    rt.print(s, format!("FAIL {what}\r\n").as_bytes())?;
    rt.exit_with(s, EXIT_CHECK_FAILED)?;
    s.a.set_label(&mut ok)?;
    Ok(())
}

/// Emits 64-bit ring-0 code that runs `target` (an address) in ring 3 with `rflags` and
/// CS `cs`, and continues after it when ring 3 raises [`RING0_VECTOR`].
fn run_user(
    a: &mut CodeAssembler,
    code_sel: u16,
    target: CodeLabel,
    rflags: u64,
) -> Result<(), IcedError> {
    let mut enter = a.create_label();
    let mut after = a.create_label();
    a.call(enter)?;
    a.jmp(after)?;
    a.set_label(&mut enter)?;
    a.mov(qword_ptr(SAVED_RSP), rsp)?;
    a.push(USER_DATA as i32)?;
    a.push(USER_STACK as i32)?;
    a.push(rflags as i32)?;
    a.push(code_sel as i32)?;
    a.lea(rax, ptr(target))?;
    a.push(rax)?;
    a.iretq()?;
    a.set_label(&mut after)?;
    Ok(())
}

/// `run_user` for code at an address another section exports.
fn run_user_at(
    a: &mut CodeAssembler,
    code_sel: u16,
    target: u64,
    rflags: u64,
) -> Result<(), IcedError> {
    let mut enter = a.create_label();
    let mut after = a.create_label();
    a.call(enter)?;
    a.jmp(after)?;
    a.set_label(&mut enter)?;
    a.mov(qword_ptr(SAVED_RSP), rsp)?;
    a.push(USER_DATA as i32)?;
    a.push(USER_STACK as i32)?;
    a.push(rflags as i32)?;
    a.push(code_sel as i32)?;
    a.push(target as i32)?;
    a.iretq()?;
    a.set_label(&mut after)?;
    Ok(())
}

fn no_extra() -> &'static [Section<'static>] {
    &[]
}

fn handler_table() -> Vec<(u8, &'static str)> {
    RECORDED.to_vec()
}

// ---------------------------------------------------------------------------------------
// smc

/// The page table `smc` hooks into PD[1] (virtual 2 MiB..4 MiB).
const SMC_PT: u64 = 0x10_0000;
/// Physical code pages `smc` writes code into.
const SMC_P: u64 = 0x10_1000;
const SMC_Q: u64 = 0x10_2000;
/// Virtual addresses: the page that runs, and an alias of the same frame for writing.
const SMC_RUN: u64 = 0x20_0000;
const SMC_ALIAS: u64 = 0x20_1000;

/// `mov eax, imm32; ret` as bytes, written into a code page as one qword store.
fn mov_eax_ret(v: u32) -> u64 {
    let b = v.to_le_bytes();
    u64::from_le_bytes([0xb8, b[0], b[1], b[2], b[3], 0xc3, 0x90, 0x90])
}

/// Builds `smc`.
pub fn build_smc() -> Result<Image, LinkError> {
    long_mode_image_with(
        "smc",
        &handler_table(),
        &|s, rt| {
            setup(s, rt)?;
            // 1. A store into the very next instruction: its immediate changes before it runs.
            {
                let a = &mut s.a;
                let mut next = a.create_label();
                a.lea(rbx, ptr(next))?;
                a.xor(eax, eax)?;
                a.mov(byte_ptr(rbx + 1), 0x5a)?; // the imm8 of the ADD below
                a.set_label(&mut next)?;
                a.db(&[0x04, 0x11])?; // add al, 0x11 (becomes add al, 0x5a)
            }
            check(
                s,
                rt,
                "store into the next instruction: old immediate ran",
                |a, ok| {
                    a.cmp(eax, 0x5a)?;
                    a.je(ok)
                },
            )?;
            // 2. A live loop whose back branch is rewritten, while it runs, to fall through
            //    (displacement 0) in its fifth iteration: first a JMP, then a JNE.
            for (what, conditional) in [("jmp", false), ("jne", true)] {
                let a = &mut s.a;
                let mut top = a.create_label();
                let mut branch = a.create_label();
                let mut after = a.create_label();
                let mut skip = a.create_label();
                let mut near = a.create_label();
                let mut runaway = a.create_label();
                let mut done = a.create_label();
                a.xor(ecx, ecx)?;
                a.lea(rbx, ptr(branch))?;
                a.lea(rdx, ptr(after))?;
                a.set_label(&mut top)?;
                a.inc(ecx)?;
                a.cmp(ecx, 50)?;
                a.je(runaway)?;
                a.cmp(ecx, 5)?;
                a.jne(skip)?;
                // The displacement is the branch's last byte (short form) or last four.
                a.mov(rax, rdx)?;
                a.sub(rax, rbx)?;
                a.cmp(eax, 2)?;
                a.jne(near)?;
                a.mov(byte_ptr(rdx - 1), 0)?;
                a.jmp(skip)?;
                a.set_label(&mut near)?;
                a.mov(dword_ptr(rdx - 4), 0)?;
                a.set_label(&mut skip)?;
                a.test(ecx, ecx)?; // ZF = 0: the JNE is taken until patched
                a.set_label(&mut branch)?;
                if conditional {
                    a.jne(top)?;
                } else {
                    a.jmp(top)?;
                }
                a.set_label(&mut after)?;
                a.jmp(done)?;
                a.set_label(&mut runaway)?;
                a.mov(ecx, 0xdead)?;
                a.set_label(&mut done)?;
                check(
                    s,
                    rt,
                    &format!("patching a live {what}: the old target kept running"),
                    |a, ok| {
                        a.cmp(ecx, 5)?;
                        a.je(ok)
                    },
                )?;
            }
            // 3. Physical page reuse: PD[1] -> SMC_PT; SMC_RUN and SMC_ALIAS both map frame P.
            {
                let a = &mut s.a;
                a.mov(rdi, SMC_PT)?;
                a.xor(eax, eax)?;
                a.mov(ecx, 512)?;
                a.rep().stosq()?;
                a.mov(qword_ptr(SMC_PT), (SMC_P | 3) as i32)?;
                a.mov(qword_ptr(SMC_PT + 8), (SMC_P | 3) as i32)?;
                a.mov(qword_ptr(0x3008u64), (SMC_PT | 3) as i32)?;
                a.mov(rax, cr3)?;
                a.mov(cr3, rax)?;
                // Old code, written through the identity map, runs at SMC_RUN.
                a.mov(rax, mov_eax_ret(0x1111))?;
                a.mov(qword_ptr(SMC_P), rax)?;
                a.mov(rbx, SMC_RUN)?;
                a.call(rbx)?;
                a.mov(r12d, eax)?;
                // New code loaded over it through the alias mapping, then run again.
                a.mov(rax, mov_eax_ret(0x2222))?;
                a.mov(rcx, SMC_ALIAS)?;
                a.mov(qword_ptr(rcx), rax)?;
                a.call(rbx)?;
                a.mov(r13d, eax)?;
                // The virtual page remapped to another frame holding other code.
                a.mov(rax, mov_eax_ret(0x3333))?;
                a.mov(qword_ptr(SMC_Q), rax)?;
                a.mov(qword_ptr(SMC_PT), (SMC_Q | 3) as i32)?;
                a.invlpg(qword_ptr(rbx))?;
                a.call(rbx)?;
                a.mov(r14d, eax)?;
            }
            check(
                s,
                rt,
                "physical page reuse: the first code did not run",
                |a, ok| {
                    a.cmp(r12d, 0x1111)?;
                    a.je(ok)
                },
            )?;
            check(
                s,
                rt,
                "physical page reuse: code loaded through an alias mapping did not run",
                |a, ok| {
                    a.cmp(r13d, 0x2222)?;
                    a.je(ok)
                },
            )?;
            check(
                s,
                rt,
                "remapped code page: the old frame's code ran",
                |a, ok| {
                    a.cmp(r14d, 0x3333)?;
                    a.je(ok)
                },
            )?;
            rt.print(s, b"smc: PASS\r\n")?;
            rt.exit_with(s, EXIT_PASS)?;
            handlers(s)
        },
        no_extra(),
    )
}
