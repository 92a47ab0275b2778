//! System-level guests: code coherence (`smc`), exceptions with their error codes
//! (`exceptions`), CLI/STI/POPF in ring 3 under each IOPL (`iopl`) and mode switches down to
//! real mode and back, virtual-8086 mode and hardware task switches (`modes`).
//!
//! Each one checks itself and exits 0 (pass) or 1 (a check failed; it prints which, with
//! what it saw). They share a small ring-3 capable environment: a GDT with user segments
//! and a 64-bit TSS, user-accessible identity paging of the first 2 MiB, and exception
//! handlers that record the vector, error code and CR2 and resume where the test said.

use crate::link::{Emit, LinkError, Section, SectionAsm};
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
/// The RIP the last exception's frame held (where it faulted, or after a trap).
const LAST_RIP: u64 = CELLS + 0x28;
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
        descriptor(0, 0xfffff, 0x9a, 0xc),            // 0x08 code32
        descriptor(0, 0xfffff, 0x92, 0xc),            // 0x10 data
        descriptor(0, 0xfffff, 0x9a, 0xa),            // 0x18 code64
        descriptor(0, 0xfffff, 0xfa, 0xc),            // 0x20 code32 ring 3
        descriptor(0, 0xfffff, 0xf2, 0xc),            // 0x28 data ring 3
        descriptor(0, 0xfffff, 0xfa, 0xa),            // 0x30 code64 ring 3
        descriptor(TSS64, 0x67, 0x89, 0),             // 0x38 64-bit TSS (low half)
        0,                                            // 0x40 (its high half)
        descriptor(0, 0xfffff, 0x12, 0xc),            // 0x48 data, not present
        descriptor(0, 0xffff, 0x9a, 0),               // 0x50 code16
        descriptor(0, 0xffff, 0x92, 0),               // 0x58 data16
        descriptor(TSS_A_BASE, 0x67, 0x89, 0),        // 0x60 32-bit TSS A
        descriptor(TSS_B_BASE, 0x67, 0x89, 0),        // 0x68 32-bit TSS B
        (TSS_B as u64) << 16 | 0x85 << 40,            // 0x70 task gate -> B
        descriptor(TSS_B_BASE + 0x80, 0x20, 0x89, 0), // 0x78 TSS with too small a limit
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
        let frame = if has_error_code(v) { 16 } else { 8 };
        a.mov(rbx, qword_ptr(rsp + frame))?;
        a.mov(qword_ptr(LAST_RIP), rbx)?;
        a.mov(rbx, qword_ptr(RESUME))?;
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
    a.mov(dword_ptr(LAST_ERR), -1)?;
    a.mov(dword_ptr(LAST_ERR + 4), -1)?;
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
    rt.print(s, format!("ok: {what}\r\n").as_bytes())
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
    enter_user(a, code_sel, rflags, |a| {
        a.lea(rax, ptr(target))?;
        a.push(rax)
    })
}

/// `run_user` for code at an address another section exports.
fn run_user_at(
    a: &mut CodeAssembler,
    code_sel: u16,
    target: u64,
    rflags: u64,
) -> Result<(), IcedError> {
    enter_user(a, code_sel, rflags, |a| a.push(target as i32))
}

/// The IRETQ frame into ring 3 that both `run_user` forms build; `push_target` pushes the
/// RIP.
fn enter_user(
    a: &mut CodeAssembler,
    code_sel: u16,
    rflags: u64,
    push_target: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
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
    push_target(a)?;
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

// ---------------------------------------------------------------------------------------
// exceptions

/// Emits a ring-0 case: arm, run `body` (which should fault), record into `slot`, check.
fn ring0_case(
    s: &mut SectionAsm<'_>,
    rt: &mut Runtime,
    slot: u64,
    what: &str,
    vector: u8,
    error: Option<u64>,
    body: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Result<(), LinkError> {
    let mut resume = arm(&mut s.a, 64)?;
    body(&mut s.a)?;
    s.a.set_label(&mut resume)?;
    record(&mut s.a, slot)?;
    check_slot(s, rt, slot, what, vector, error)
}

/// Emits a case for code that cannot print (ring 3, compatibility mode): arm, `body`,
/// record into `slot`; [`check_slot`] checks it later from ring 0.
fn silent_case(
    a: &mut CodeAssembler,
    bits: u32,
    slot: u64,
    body: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Result<(), IcedError> {
    let mut resume = arm(a, bits)?;
    body(a)?;
    a.set_label(&mut resume)?;
    record(a, slot)
}

/// [`silent_case`] for 32-bit code, which has no RIP-relative LEA: the resume point is a
/// linker symbol named after the slot.
fn silent_case32(
    s: &mut SectionAsm<'_>,
    slot: u64,
    body: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Result<(), LinkError> {
    let name = format!("resume32_{slot}");
    let resume = s.sym32(&name);
    let a = &mut s.a;
    a.mov(dword_ptr(LAST_VEC), 0xff)?;
    a.mov(dword_ptr(LAST_ERR), -1)?;
    a.mov(dword_ptr(LAST_ERR + 4), -1)?;
    a.mov(dword_ptr(RESUME), resume)?;
    a.mov(dword_ptr(RESUME + 4), 0)?;
    body(a)?;
    s.export_here(&name)?;
    Ok(record(&mut s.a, slot)?)
}

/// Bounds for BOUND (lower, upper).
const BOUNDS: u64 = CELLS + 0x80;
/// A dword that misaligned ring-3 loads read.
const MISALIGNED: u64 = CELLS + 0x91;
/// A linear address with no mapping (PDPT[1] is empty).
const UNMAPPED: u64 = 0x4000_0000;
/// Scratch cells of the x87/SSE cases: a control word, a status word, MXCSR, the vector
/// seen right after the faulting FDIV (before the FWAIT), a zero (the divisor) and a stored
/// result.
const FP_CW: u64 = CELLS + 0x400;
const FP_SW: u64 = CELLS + 0x408;
const FP_MXCSR: u64 = CELLS + 0x410;
const FP_VEC_AFTER_FDIV: u64 = CELLS + 0x418;
const FP_ZERO: u64 = CELLS + 0x420;
const FP_RESULT: u64 = CELLS + 0x428;
/// FCW/MXCSR zero-divide mask bits, FSW/MXCSR zero-divide flag, FSW.ES and FSW.B.
const FCW_ZM: u32 = 1 << 2;
const MXCSR_ZM: u32 = 1 << 9;
const ZE: u32 = 1 << 2;
const FSW_ES: u32 = 1 << 7;
const FSW_B: u32 = 1 << 15;
/// CR0.NE (native x87 error reporting) and CR4.OSXMMEXCPT.
const CR0_NE: u32 = 1 << 5;
const CR4_OSXMMEXCPT: u32 = 1 << 10;
/// 1.0 as f32 and f64 bits.
const ONE_F32: u32 = 0x3f80_0000;
const ONE_F64: u64 = 0x3ff0_0000_0000_0000;

/// Emits a check that [`LAST_RIP`] is the address of `at` (the instruction that faulted).
fn check_fault_rip(
    s: &mut SectionAsm<'_>,
    rt: &mut Runtime,
    what: &str,
    at: CodeLabel,
) -> Result<(), LinkError> {
    check(s, rt, what, |a, ok| {
        a.lea(rax, ptr(at))?;
        a.cmp(qword_ptr(LAST_RIP), rax)?;
        a.je(ok)
    })
}

/// Emits the SSE #XM/#UD and x87 #MF cases (ring 0; slots 10-13): an unmasked SSE zero
/// divide faults at the DIVSS itself, #XM with CR4.OSXMMEXCPT and #UD without; an unmasked
/// x87 zero divide is pending after FDIV and faults at the next waiting instruction
/// (CR0.NE=1).
fn fp_cases(s: &mut SectionAsm<'_>, rt: &mut Runtime) -> Result<(), LinkError> {
    // SSE with CR4.OSXMMEXCPT: #XM at the DIVSS, destination unchanged, MXCSR.ZE set.
    let mut divss_at = s.a.create_label();
    {
        let a = &mut s.a;
        a.mov(rax, cr4)?;
        a.or(eax, CR4_OSXMMEXCPT)?;
        a.mov(cr4, rax)?;
        a.mov(dword_ptr(FP_MXCSR), 0x1f80 & !MXCSR_ZM)?;
        a.ldmxcsr(dword_ptr(FP_MXCSR))?;
        a.mov(eax, ONE_F32)?;
        a.movd(xmm0, eax)?;
        a.xorps(xmm1, xmm1)?;
    }
    let mut resume = arm(&mut s.a, 64)?;
    {
        let a = &mut s.a;
        a.set_label(&mut divss_at)?;
        a.divss(xmm0, xmm1)?;
        a.set_label(&mut resume)?;
        a.stmxcsr(dword_ptr(FP_MXCSR))?;
    }
    record(&mut s.a, 12)?;
    check_slot(
        s,
        rt,
        12,
        "#XM: unmasked SSE zero divide with CR4.OSXMMEXCPT",
        19,
        None,
    )?;
    check_fault_rip(s, rt, "#XM: the faulting RIP is the DIVSS's", divss_at)?;
    check(s, rt, "#XM: the destination is unchanged", |a, ok| {
        a.movd(eax, xmm0)?;
        a.cmp(eax, ONE_F32)?;
        a.je(ok)
    })?;
    check(s, rt, "#XM: MXCSR.ZE is set", |a, ok| {
        a.test(dword_ptr(FP_MXCSR), ZE)?;
        a.jne(ok)
    })?;

    // The same without CR4.OSXMMEXCPT: #UD.
    let mut divss_at = s.a.create_label();
    {
        let a = &mut s.a;
        a.mov(rax, cr4)?;
        a.and(eax, !CR4_OSXMMEXCPT)?;
        a.mov(cr4, rax)?;
        a.mov(dword_ptr(FP_MXCSR), 0x1f80 & !MXCSR_ZM)?;
        a.ldmxcsr(dword_ptr(FP_MXCSR))?;
    }
    let mut resume = arm(&mut s.a, 64)?;
    {
        let a = &mut s.a;
        a.set_label(&mut divss_at)?;
        a.divss(xmm0, xmm1)?;
        a.set_label(&mut resume)?;
    }
    record(&mut s.a, 13)?;
    check_slot(
        s,
        rt,
        13,
        "#UD: unmasked SSE zero divide without CR4.OSXMMEXCPT",
        6,
        None,
    )?;
    check_fault_rip(s, rt, "#UD: the faulting RIP is the DIVSS's", divss_at)?;
    check(s, rt, "#UD: the destination is unchanged", |a, ok| {
        a.movd(eax, xmm0)?;
        a.cmp(eax, ONE_F32)?;
        a.je(ok)
    })?;
    s.a.mov(dword_ptr(FP_MXCSR), 0x1f80)?;
    s.a.ldmxcsr(dword_ptr(FP_MXCSR))?;

    // x87: unmask #Z, FDIV by zero, then FWAIT.
    let mut fwait_at = s.a.create_label();
    {
        let a = &mut s.a;
        a.mov(rax, cr0)?;
        a.or(eax, CR0_NE)?;
        a.mov(cr0, rax)?;
        a.fninit()?;
        a.fnstcw(word_ptr(FP_CW))?;
        a.and(word_ptr(FP_CW), !FCW_ZM & 0xffff)?;
        a.fldcw(word_ptr(FP_CW))?;
        a.mov(dword_ptr(FP_ZERO), 0)?;
    }
    let mut resume = arm(&mut s.a, 64)?;
    {
        let a = &mut s.a;
        a.fld1()?;
        a.fdiv(dword_ptr(FP_ZERO))?;
        a.mov(eax, dword_ptr(LAST_VEC))?;
        a.mov(dword_ptr(FP_VEC_AFTER_FDIV), eax)?;
        a.set_label(&mut fwait_at)?;
        a.wait()?;
        a.set_label(&mut resume)?;
        a.fnstsw(word_ptr(FP_SW))?;
    }
    record(&mut s.a, 10)?;
    check(s, rt, "#MF: FDIV by zero does not fault itself", |a, ok| {
        a.cmp(dword_ptr(FP_VEC_AFTER_FDIV), 0xff)?;
        a.je(ok)
    })?;
    check_slot(
        s,
        rt,
        10,
        "#MF: FWAIT after an unmasked x87 zero divide",
        16,
        None,
    )?;
    check_fault_rip(s, rt, "#MF: the faulting RIP is the FWAIT's", fwait_at)?;
    check(s, rt, "#MF: FSW.ES and FSW.ZE are set", |a, ok| {
        a.movzx(eax, word_ptr(FP_SW))?;
        a.and(eax, FSW_ES | ZE)?;
        a.cmp(eax, FSW_ES | ZE)?;
        a.je(ok)
    })?;
    // FNCLEX clears ES, B and the flags; the next FWAIT does not fault; ST0 is the
    // unchanged dividend (an unmasked #Z leaves the destination alone).
    let mut resume = arm(&mut s.a, 64)?;
    {
        let a = &mut s.a;
        a.fnclex()?;
        a.fnstsw(word_ptr(FP_SW))?;
        a.wait()?;
        a.fstp(qword_ptr(FP_RESULT))?;
        a.set_label(&mut resume)?;
    }
    record(&mut s.a, 11)?;
    check(
        s,
        rt,
        "#MF: FNCLEX clears FSW.ES, FSW.B and FSW.ZE",
        |a, ok| {
            a.movzx(eax, word_ptr(FP_SW))?;
            a.test(eax, FSW_ES | FSW_B | ZE)?;
            a.je(ok)
        },
    )?;
    check(s, rt, "#MF: no fault after FNCLEX", |a, ok| {
        a.cmp(dword_ptr(SLOTS + 16 * 11), 0xff)?;
        a.je(ok)
    })?;
    check(s, rt, "#MF: ST0 kept the dividend", |a, ok| {
        a.mov(rax, ONE_F64)?;
        a.cmp(qword_ptr(FP_RESULT), rax)?;
        a.je(ok)
    })?;
    s.a.fninit()?;
    Ok(())
}

/// The cases of `exceptions` that ring 3 and compatibility mode run: (slot, what, vector,
/// error code).
const USER_CASES: [(u64, &str, u8, Option<u64>); 7] = [
    (20, "#BP: INT3 in ring 3", 3, None),
    (21, "#PF: ring-3 read of an unmapped page", 14, Some(4)),
    (22, "#GP: HLT in ring 3", 13, Some(0)),
    (23, "#DB: ICEBP (INT1) in ring 3", 1, None),
    (
        24,
        "#AC: misaligned ring-3 load with CR0.AM and EFLAGS.AC",
        17,
        Some(0),
    ),
    (
        30,
        "#OF: INTO with OF set (compatibility mode, ring 3)",
        4,
        None,
    ),
    (
        31,
        "#BR: BOUND out of range (compatibility mode, ring 3)",
        5,
        None,
    ),
];

/// Builds `exceptions`.
pub fn build_exceptions() -> Result<Image, LinkError> {
    let compat: &Emit<'_> = &|s| {
        s.export_here("compat_entry")?;
        let a = &mut s.a;
        a.mov(ax, USER_DATA as u32)?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        silent_case32(s, 30, |a| {
            a.mov(eax, 0x7fff_ffff)?;
            a.add(eax, 1)?;
            a.into()
        })?;
        silent_case32(s, 31, |a| {
            a.mov(eax, 20)?;
            a.bound(eax, qword_ptr(BOUNDS))
        })?;
        s.a.int(RING0_VECTOR as u32)?;
        Ok(())
    };
    let extra = [Section {
        name: "compat32",
        bitness: 32,
        align: 16,
        limit: Some(0x1_0000_0000),
        emit: compat,
    }];
    long_mode_image_with(
        "exceptions",
        &handler_table(),
        &|s, rt| {
            setup(s, rt)?;
            {
                let a = &mut s.a;
                a.mov(rax, cr4)?;
                a.or(eax, 0x200)?; // OSFXSR
                a.mov(cr4, rax)?;
            }
            ring0_case(s, rt, 0, "#DE: DIV by zero", 0, None, |a| {
                a.xor(ecx, ecx)?;
                a.div(ecx)
            })?;
            ring0_case(s, rt, 1, "#UD: UD2", 6, None, |a| a.ud2())?;
            ring0_case(s, rt, 2, "#NM: SSE with CR0.TS", 7, None, |a| {
                a.mov(rax, cr0)?;
                a.or(eax, 8)?;
                a.mov(cr0, rax)?;
                a.movaps(xmm0, xmm1)
            })?;
            s.a.clts()?;
            ring0_case(
                s,
                rt,
                3,
                "#NP: load of a not-present segment",
                11,
                Some(NOT_PRESENT as u64),
                |a| {
                    a.mov(ax, NOT_PRESENT as u32)?;
                    a.mov(ds, ax)
                },
            )?;
            ring0_case(
                s,
                rt,
                4,
                "#SS: non-canonical stack reference",
                12,
                Some(0),
                |a| {
                    a.mov(rbx, 0x8000_0000_0000_0000u64)?;
                    a.mov(rax, qword_ptr(rsp + rbx))
                },
            )?;
            ring0_case(
                s,
                rt,
                5,
                "#GP: selector beyond the GDT limit",
                13,
                Some(0x1000),
                |a| {
                    a.mov(ax, 0x1003)?;
                    a.mov(es, ax)
                },
            )?;
            ring0_case(s, rt, 6, "#GP: non-canonical address", 13, Some(0), |a| {
                a.mov(rbx, 0x8000_0000_0000_0000u64)?;
                a.mov(rax, qword_ptr(rbx))
            })?;
            ring0_case(
                s,
                rt,
                7,
                "#PF: read of an unmapped page",
                14,
                Some(0),
                |a| a.mov(rax, qword_ptr(UNMAPPED)),
            )?;
            check(s, rt, "#PF: CR2 is the faulting address", |a, ok| {
                a.mov(rax, UNMAPPED)?;
                a.cmp(qword_ptr(LAST_CR2), rax)?;
                a.je(ok)
            })?;
            ring0_case(
                s,
                rt,
                8,
                "#PF: write to an unmapped page",
                14,
                Some(2),
                |a| a.mov(qword_ptr(UNMAPPED + 8), rax),
            )?;
            let idt = s.sym("idt");
            ring0_case(s, rt, 9, "#DF: #NP while delivering #NP", 8, Some(0), |a| {
                a.and(byte_ptr(idt + 11 * 16 + 5), 0x7f)?;
                a.mov(ax, NOT_PRESENT as u32)?;
                a.mov(ds, ax)
            })?;
            s.a.or(byte_ptr(idt + 11 * 16 + 5), 0x80)?;
            fp_cases(s, rt)?;
            // Ring 3 (64-bit), with CR0.AM set and EFLAGS.AC in the user's flags.
            let mut user = s.a.create_label();
            let mut skip = s.a.create_label();
            {
                let a = &mut s.a;
                a.mov(dword_ptr(BOUNDS), 0)?;
                a.mov(dword_ptr(BOUNDS + 4), 10)?;
                a.mov(rax, cr0)?;
                a.or(eax, 1 << 18)?;
                a.mov(cr0, rax)?;
                run_user(a, USER_CODE64, user, 0x2 | 1 << 18)?;
                a.jmp(skip)?;
                a.set_label(&mut user)?;
                silent_case(a, 64, 20, |a| a.int3())?;
                silent_case(a, 64, 21, |a| a.mov(rax, qword_ptr(UNMAPPED)))?;
                silent_case(a, 64, 22, |a| a.hlt())?;
                silent_case(a, 64, 23, |a| a.int1())?;
                silent_case(a, 64, 24, |a| a.mov(eax, dword_ptr(MISALIGNED)))?;
                a.int(RING0_VECTOR as u32)?;
                a.set_label(&mut skip)?;
            }
            let compat_entry = s.sym("compat_entry");
            run_user_at(&mut s.a, USER_CODE32, compat_entry, 0x2)?;
            for (slot, what, vector, error) in USER_CASES {
                check_slot(s, rt, slot, what, vector, error)?;
            }
            rt.print(s, b"exceptions: PASS\r\n")?;
            rt.exit_with(s, EXIT_PASS)?;
            handlers(s)
        },
        &extra,
    )
}

// ---------------------------------------------------------------------------------------
// iopl

/// Builds `iopl`.
pub fn build_iopl() -> Result<Image, LinkError> {
    long_mode_image_with(
        "iopl",
        &handler_table(),
        &|s, rt| {
            setup(s, rt)?;
            for iopl in 0..4u64 {
                let base = 8 * iopl;
                let mut user = s.a.create_label();
                let mut skip = s.a.create_label();
                {
                    let a = &mut s.a;
                    run_user(a, USER_CODE64, user, 0x202 | iopl << 12)?;
                    a.jmp(skip)?;
                    a.set_label(&mut user)?;
                    let flags = |a: &mut CodeAssembler, slot: u64| -> Result<(), IcedError> {
                        a.pushfq()?;
                        a.pop(rax)?;
                        a.mov(qword_ptr(SLOTS + 16 * slot + 8), rax)
                    };
                    // CLI, then the flags.
                    silent_case(a, 64, base, |a| a.cli())?;
                    flags(a, base + 1)?;
                    // STI, then the flags.
                    silent_case(a, 64, base + 2, |a| a.sti())?;
                    flags(a, base + 3)?;
                    // POPF with IF clear in the image, then the flags.
                    silent_case(a, 64, base + 4, |a| {
                        a.pushfq()?;
                        a.and(qword_ptr(rsp), !0x200)?;
                        a.popfq()
                    })?;
                    flags(a, base + 5)?;
                    // POPF with IOPL 3 in the image, then the flags.
                    a.pushfq()?;
                    a.or(qword_ptr(rsp), 0x3000)?;
                    a.popfq()?;
                    flags(a, base + 6)?;
                    a.int(RING0_VECTOR as u32)?;
                    a.set_label(&mut skip)?;
                }
                let trusted = iopl == 3;
                let fault = |t: bool| if t { (0xffu8, None) } else { (13, Some(0)) };
                let (v, e) = fault(trusted);
                check_slot(s, rt, base, &format!("CLI at CPL 3, IOPL {iopl}"), v, e)?;
                check_slot(s, rt, base + 2, &format!("STI at CPL 3, IOPL {iopl}"), v, e)?;
                check_slot(
                    s,
                    rt,
                    base + 4,
                    &format!("POPF at CPL 3, IOPL {iopl} (never faults)"),
                    0xff,
                    None,
                )?;
                let flag_checks: [(u64, u64, u64, &str); 4] = [
                    (
                        base + 1,
                        0x200,
                        if trusted { 0 } else { 0x200 },
                        "IF after CLI",
                    ),
                    (base + 3, 0x200, 0x200, "IF after STI"),
                    (
                        base + 5,
                        0x200,
                        if trusted { 0 } else { 0x200 },
                        "IF after POPF clearing it",
                    ),
                    (base + 6, 0x3000, iopl << 12, "IOPL after POPF setting it"),
                ];
                for (slot, mask, want, what) in flag_checks {
                    check(s, rt, &format!("{what} at CPL 3, IOPL {iopl}"), |a, ok| {
                        a.mov(rax, qword_ptr(SLOTS + 16 * slot + 8))?;
                        a.and(eax, mask as u32)?;
                        a.cmp(eax, want as u32)?;
                        a.je(ok)
                    })?;
                }
            }
            rt.print(s, b"iopl: PASS\r\n")?;
            rt.exit_with(s, EXIT_PASS)?;
            handlers(s)
        },
        no_extra(),
    )
}

// ---------------------------------------------------------------------------------------
// umip

/// Where `umip`'s SGDT and SIDT store.
const UMIP_SCRATCH: u64 = CELLS + 0x300;

/// Builds `umip`: SGDT, SIDT, SLDT, SMSW and STR in ring 0 and ring 3, with CR4.UMIP clear
/// and set. Set, ring 3 gets #GP(0) for each; ring 0 and a clear UMIP run them.
pub fn build_umip() -> Result<Image, LinkError> {
    type Insn = fn(&mut CodeAssembler) -> Result<(), IcedError>;
    const INSNS: [(&str, Insn); 5] = [
        ("SGDT", |a| a.sgdt(ptr(UMIP_SCRATCH))),
        ("SIDT", |a| a.sidt(ptr(UMIP_SCRATCH))),
        ("SLDT", |a| a.sldt(ax)),
        ("SMSW", |a| a.smsw(ax)),
        ("STR", |a| a.str(ax)),
    ];
    long_mode_image_with(
        "umip",
        &handler_table(),
        &|s, rt| {
            setup(s, rt)?;
            check(s, rt, "CPUID.(EAX=07H,ECX=0):ECX.UMIP", |a, ok| {
                a.mov(eax, 7)?;
                a.xor(ecx, ecx)?;
                a.cpuid()?;
                a.test(ecx, 1 << 2)?;
                a.jnz(ok)
            })?;
            for umip in [false, true] {
                let a = &mut s.a;
                a.mov(rax, cr4)?;
                if umip {
                    a.or(eax, 1 << 11)?;
                } else {
                    a.and(eax, !(1 << 11))?;
                }
                a.mov(cr4, rax)?;
                let base = if umip { 10 } else { 0 };
                // Ring 0.
                for (i, (_, insn)) in INSNS.iter().enumerate() {
                    silent_case(a, 64, base + i as u64, insn)?;
                }
                // Ring 3.
                let mut user = a.create_label();
                let mut skip = a.create_label();
                run_user(a, USER_CODE64, user, 0x202)?;
                a.jmp(skip)?;
                a.set_label(&mut user)?;
                for (i, (_, insn)) in INSNS.iter().enumerate() {
                    silent_case(a, 64, base + 5 + i as u64, insn)?;
                }
                a.int(RING0_VECTOR as u32)?;
                a.set_label(&mut skip)?;
                let state = if umip { "set" } else { "clear" };
                for (i, (name, _)) in INSNS.iter().enumerate() {
                    let i = i as u64;
                    check_slot(
                        s,
                        rt,
                        base + i,
                        &format!("{name} at CPL 0, CR4.UMIP {state}"),
                        0xff,
                        None,
                    )?;
                    let (v, e) = if umip { (13, Some(0)) } else { (0xff, None) };
                    check_slot(
                        s,
                        rt,
                        base + 5 + i,
                        &format!("{name} at CPL 3, CR4.UMIP {state}"),
                        v,
                        e,
                    )?;
                }
            }
            s.a.mov(rax, cr4)?;
            s.a.and(eax, !(1 << 11))?;
            s.a.mov(cr4, rax)?;
            rt.print(s, b"umip: PASS\r\n")?;
            rt.exit_with(s, EXIT_PASS)?;
            handlers(s)
        },
        no_extra(),
    )
}

// ---------------------------------------------------------------------------------------
// xsave

/// `xsave`'s save area (64-byte aligned, 576 bytes used).
const XSAVE_AREA: u64 = 0x18_4000;

/// Builds `xsave`: the XSAVE feature set for x87 and SSE. CPUID (XSAVE, leaf 0xd), #UD
/// before CR4.OSXSAVE, CPUID.01H:ECX.OSXSAVE after it, XGETBV/XSETBV (XCR0 = 3, #GP(0) for
/// clearing x87, for an unsupported bit, and in ring 3, where XGETBV works), XSAVE of XMM0
/// and its XSTATE_BV bit, XRSTOR from the area and with XSTATE_BV clear (initializes), and
/// #GP(0) for an area not 64-byte aligned.
pub fn build_xsave() -> Result<Image, LinkError> {
    long_mode_image_with(
        "xsave",
        &handler_table(),
        &|s, rt| {
            setup(s, rt)?;
            check(s, rt, "CPUID.01H:ECX.XSAVE", |a, ok| {
                a.mov(eax, 1)?;
                a.cpuid()?;
                a.bt(ecx, 26)?;
                a.jc(ok)
            })?;
            check(
                s,
                rt,
                "CPUID.01H:ECX.OSXSAVE clear before CR4.OSXSAVE",
                |a, ok| {
                    a.mov(eax, 1)?;
                    a.cpuid()?;
                    a.bt(ecx, 27)?;
                    a.jnc(ok)
                },
            )?;
            check(
                s,
                rt,
                "CPUID.(EAX=0DH,ECX=0): x87 and SSE, at least 576 bytes",
                |a, ok| {
                    let mut bad = a.create_label();
                    a.mov(eax, 0xd)?;
                    a.xor(ecx, ecx)?;
                    a.cpuid()?;
                    a.and(eax, 3)?;
                    a.cmp(eax, 3)?;
                    a.jne(bad)?;
                    a.cmp(ebx, 576)?;
                    a.jae(ok)?;
                    a.set_label(&mut bad)?;
                    Ok(())
                },
            )?;
            ring0_case(s, rt, 0, "XGETBV without CR4.OSXSAVE", 6, None, |a| {
                a.xor(ecx, ecx)?;
                a.xgetbv()
            })?;
            // CR4.OSXSAVE, and OSFXSR/OSXMMEXCPT for the SSE moves.
            s.a.mov(rax, cr4)?;
            s.a.or(eax, (1 << 18) | 0x600)?;
            s.a.mov(cr4, rax)?;
            check(s, rt, "CPUID.01H:ECX.OSXSAVE with CR4.OSXSAVE", |a, ok| {
                a.mov(eax, 1)?;
                a.cpuid()?;
                a.bt(ecx, 27)?;
                a.jc(ok)
            })?;
            check(s, rt, "XCR0 = 1 at reset", |a, ok| {
                a.xor(ecx, ecx)?;
                a.xgetbv()?;
                a.cmp(eax, 1)?;
                a.je(ok)
            })?;
            ring0_case(s, rt, 1, "XSETBV 3", 0xff, None, |a| {
                a.xor(ecx, ecx)?;
                a.xor(edx, edx)?;
                a.mov(eax, 3)?;
                a.xsetbv()
            })?;
            check(s, rt, "XGETBV reads XCR0 = 3", |a, ok| {
                a.xor(ecx, ecx)?;
                a.xgetbv()?;
                a.cmp(eax, 3)?;
                a.je(ok)
            })?;
            ring0_case(s, rt, 2, "XSETBV without x87", 13, Some(0), |a| {
                a.xor(ecx, ecx)?;
                a.xor(edx, edx)?;
                a.mov(eax, 2)?;
                a.xsetbv()
            })?;
            ring0_case(s, rt, 3, "XSETBV bit 63", 13, Some(0), |a| {
                a.xor(ecx, ecx)?;
                a.mov(edx, 0x8000_0000u32)?;
                a.mov(eax, 3)?;
                a.xsetbv()
            })?;
            // XSAVE XMM0 = 0x1122334455667788 (low half) with RFBM = all.
            let a = &mut s.a;
            for off in (0..576).step_by(8) {
                a.mov(qword_ptr(XSAVE_AREA + off), 0)?;
            }
            a.mov(rax, 0x1122_3344_5566_7788u64)?;
            a.movq(xmm0, rax)?;
            a.mov(eax, -1)?;
            a.mov(edx, -1)?;
            a.xsave64(ptr(XSAVE_AREA))?;
            check(s, rt, "XSAVE stores XMM0 at offset 160", |a, ok| {
                a.mov(rax, 0x1122_3344_5566_7788u64)?;
                a.cmp(qword_ptr(XSAVE_AREA + 160), rax)?;
                a.je(ok)
            })?;
            check(s, rt, "XSAVE sets XSTATE_BV.SSE", |a, ok| {
                a.bt(qword_ptr(XSAVE_AREA + 512), 1)?;
                a.jc(ok)
            })?;
            check(s, rt, "XRSTOR loads XMM0", |a, ok| {
                a.pxor(xmm0, xmm0)?;
                a.mov(eax, -1)?;
                a.mov(edx, -1)?;
                a.xrstor64(ptr(XSAVE_AREA))?;
                a.movq(rax, xmm0)?;
                a.mov(rcx, 0x1122_3344_5566_7788u64)?;
                a.cmp(rax, rcx)?;
                a.je(ok)
            })?;
            check(
                s,
                rt,
                "XRSTOR with XSTATE_BV.SSE clear zeroes XMM0",
                |a, ok| {
                    a.btr(qword_ptr(XSAVE_AREA + 512), 1)?;
                    a.mov(eax, 3)?;
                    a.xor(edx, edx)?;
                    a.xrstor64(ptr(XSAVE_AREA))?;
                    a.movq(rax, xmm0)?;
                    a.test(rax, rax)?;
                    a.jz(ok)
                },
            )?;
            ring0_case(
                s,
                rt,
                4,
                "XSAVE to an area not 64-byte aligned",
                13,
                Some(0),
                |a| {
                    a.mov(eax, 3)?;
                    a.xor(edx, edx)?;
                    a.xsave(ptr(XSAVE_AREA + 16))
                },
            )?;
            // Ring 3: XGETBV runs, XSETBV is #GP(0).
            let a = &mut s.a;
            let mut user = a.create_label();
            let mut skip = a.create_label();
            run_user(a, USER_CODE64, user, 0x202)?;
            a.jmp(skip)?;
            a.set_label(&mut user)?;
            silent_case(a, 64, 5, |a| {
                a.xor(ecx, ecx)?;
                a.xgetbv()?;
                a.mov(dword_ptr(SLOTS + 16 * 7), eax)
            })?;
            silent_case(a, 64, 6, |a| {
                a.xor(ecx, ecx)?;
                a.xor(edx, edx)?;
                a.mov(eax, 1)?;
                a.xsetbv()
            })?;
            a.int(RING0_VECTOR as u32)?;
            a.set_label(&mut skip)?;
            check_slot(s, rt, 5, "XGETBV at CPL 3", 0xff, None)?;
            check(s, rt, "XGETBV at CPL 3 reads 3", |a, ok| {
                a.cmp(dword_ptr(SLOTS + 16 * 7), 3)?;
                a.je(ok)
            })?;
            check_slot(s, rt, 6, "XSETBV at CPL 3", 13, Some(0))?;
            rt.print(s, b"xsave: PASS\r\n")?;
            rt.exit_with(s, EXIT_PASS)?;
            handlers(s)
        },
        no_extra(),
    )
}

// ---------------------------------------------------------------------------------------
// modes

/// Where `modes` records its stages (below 64 KiB, so real and virtual-8086 code reach it
/// with DS = 0): one dword each, `stage << 16 | push width << 8 | flags`.
const TRAIL: u64 = 0x600;
/// A real-mode IDTR image (limit 0x3ff, base 0).
const REAL_IDTR: u64 = 0x5f0;
/// The 32-bit IDT used in legacy protected mode.
const IDT32: u64 = 0x18_4000;
/// ESP of the 32-bit code while it waits for virtual-8086 mode to come back.
const SAVED_ESP32: u64 = CELLS + 0x28;
/// Vector of the real-mode interrupt.
const REAL_VECTOR: u64 = 0x40;
/// Vector virtual-8086 code raises to leave.
const V86_VECTOR: u64 = 0x41;
/// A TSS descriptor whose limit is too small (for #TS).
const TSS_SHORT: u16 = 0x78;

/// Flags in a trail entry's low byte.
const TRAIL_PE: u32 = 1;
const TRAIL_LMA: u32 = 2;

/// What `modes` expects in its trail, with what each stage is.
const EXPECTED_TRAIL: [(u32, &str); 12] = [
    (
        1 << 16 | 4 << 8 | TRAIL_PE | TRAIL_LMA,
        "compatibility mode",
    ),
    (
        2 << 16 | 4 << 8 | TRAIL_PE,
        "32-bit protected mode, paging off",
    ),
    (3 << 16 | 2 << 8 | TRAIL_PE, "16-bit protected mode"),
    (4 << 16 | 2 << 8, "real mode"),
    (5 << 16 | 2 << 8, "real-mode interrupt through the IVT"),
    (6 << 16 | 4 << 8 | TRAIL_PE, "32-bit protected mode again"),
    (
        7 << 16 | 2 << 8 | TRAIL_PE,
        "virtual-8086 mode (entered by IRETD)",
    ),
    (8 << 16 | 4 << 8 | TRAIL_PE, "left virtual-8086 mode by INT"),
    (
        9 << 16 | 4 << 8 | TRAIL_PE,
        "task B entered by CALL through a task gate",
    ),
    (10 << 16 | TSS_A as u32, "task B's back link names task A"),
    (11 << 16 | TSS_A as u32, "IRET returned to task A (TR)"),
    (
        12 << 16 | 8 << 8 | TRAIL_PE | TRAIL_LMA,
        "64-bit mode again",
    ),
];

/// Emits code recording trail entry `stage` for 16-bit (`bits` 16) or 32-bit code: the width
/// of a PUSH imm8 (the mode's operand size), CR0.PE (SMSW) and, if `lma`, EFER.LMA.
fn trail(
    a: &mut CodeAssembler,
    bits: u32,
    stage: u32,
    lma: bool,
    extra: u32,
) -> Result<(), IcedError> {
    let at = TRAIL + 4 * (stage as u64 - 1);
    if bits == 16 {
        a.mov(bx, sp)?;
        a.db(&[0x6a, 0x00])?;
        a.mov(cx, bx)?;
        a.sub(cx, sp)?;
        a.mov(sp, bx)?;
        a.smsw(ax)?;
    } else {
        a.mov(ebx, esp)?;
        a.db(&[0x6a, 0x00])?;
        a.mov(ecx, ebx)?;
        a.sub(ecx, esp)?;
        a.mov(esp, ebx)?;
        a.smsw(eax)?;
    }
    a.and(al, 1)?;
    a.or(al, extra)?;
    a.mov(ah, cl)?;
    if lma {
        a.mov(bl, al)?;
        a.mov(bh, cl)?;
        a.mov(ecx, 0xc000_0080u32)?;
        a.rdmsr()?;
        a.shr(eax, 9)?;
        a.and(al, 2)?;
        a.or(al, bl)?;
        a.mov(ah, bh)?;
    }
    a.mov(word_ptr(at), ax)?;
    a.mov(word_ptr(at + 2), stage)?;
    Ok(())
}

/// Builds `modes`.
pub fn build_modes() -> Result<Image, LinkError> {
    // 32-bit code: compatibility mode down to 32-bit protected mode, and the way back up.
    let code32: &Emit<'_> = &|s| {
        let down16 = s.sym32("down16");
        let v86_code = s.sym32("v86_code");
        let back64 = s.sym32("back64");
        let task_b = s.sym32("task_b");
        let v86_exit = s.sym32("v86_exit");
        let ts_handler = s.sym32("ts_handler");
        s.export_here("compat_down")?;
        let a = &mut s.a;
        trail(a, 32, 1, true, 0)?;
        // Paging off leaves long mode.
        a.mov(eax, cr0)?;
        a.and(eax, 0x7fff_ffff)?;
        a.mov(cr0, eax)?;
        a.mov(ax, DATA as u32)?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        a.mov(ss, ax)?;
        trail(a, 32, 2, true, 0)?;
        a.jmp_far(CODE16, down16)?;

        s.export_here("up32")?;
        let a = &mut s.a;
        a.mov(ax, DATA as u32)?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        a.mov(ss, ax)?;
        a.mov(fs, ax)?;
        a.mov(gs, ax)?;
        trail(a, 32, 6, false, 0)?;
        // A 32-bit IDT: the virtual-8086 exit (DPL 3) and #TS.
        for (vector, handler, access) in
            [(V86_VECTOR, v86_exit, 0xee00u32), (10, ts_handler, 0x8e00)]
        {
            a.mov(eax, handler)?;
            a.mov(edx, eax)?;
            a.and(eax, 0xffff)?;
            a.or(eax, (CODE32 as u32) << 16)?;
            a.mov(dword_ptr(IDT32 + 8 * vector), eax)?;
            a.and(edx, 0xffff_0000u32 as i32)?;
            a.or(edx, access)?;
            a.mov(dword_ptr(IDT32 + 8 * vector + 4), edx)?;
        }
        a.mov(word_ptr(IDT32 + 0x800), 0x7ff)?;
        a.mov(dword_ptr(IDT32 + 0x802), IDT32 as u32)?;
        // Task A (the current task from now on) and task B.
        for (off, v) in [
            (0x04u64, RING0_STACK as u32),
            (0x08, DATA as u32),
            (0x64, 0x68 << 16),
        ] {
            a.mov(dword_ptr(TSS_A_BASE + off), v)?;
            a.mov(dword_ptr(TSS_B_BASE + off), v)?;
        }
        a.mov(dword_ptr(TSS_B_BASE + 0x20), task_b)?;
        a.mov(dword_ptr(TSS_B_BASE + 0x24), 2)?;
        a.mov(dword_ptr(TSS_B_BASE + 0x38), 0x6c00)?;
        for (i, sel) in [DATA, CODE32, DATA, DATA, DATA, DATA].iter().enumerate() {
            a.mov(dword_ptr(TSS_B_BASE + 0x48 + 4 * i as u64), *sel as u32)?;
        }
        a.mov(dword_ptr(TSS_B_BASE + 0x60), 0)?;
        a.mov(ax, TSS_A as u32)?;
        a.ltr(ax)?;
        a.lidt(ptr(IDT32 + 0x800))?;
        // Enter virtual-8086 mode: IRETD with VM and IOPL 3 in the image.
        a.mov(dword_ptr(SAVED_ESP32), esp)?;
        for v in [0u32, 0, 0, 0, 0, 0x6800, 0x0002_3002, 0, v86_code] {
            a.push(v as i32)?;
        }
        a.iretd()?;
        // The INT from virtual-8086 mode lands here, on task A's ring-0 stack.
        s.export_here("v86_exit")?;
        let a = &mut s.a;
        a.mov(ax, DATA as u32)?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        a.mov(fs, ax)?;
        a.mov(gs, ax)?;
        a.mov(edx, dword_ptr(esp + 8))?; // EFLAGS in the frame
        a.mov(dword_ptr(TRAIL + 0x40), edx)?;
        a.mov(esp, dword_ptr(SAVED_ESP32))?;
        trail(a, 32, 8, false, 0)?;
        // A task switch and back: CALL through the task gate, task B returns by IRET.
        a.call_far(TASK_GATE_B, 0)?;
        a.str(ax)?;
        a.mov(word_ptr(TRAIL + 4 * 10), ax)?;
        a.mov(word_ptr(TRAIL + 4 * 10 + 2), 11)?;
        a.clts()?;
        // A TSS whose limit is too small: #TS with its selector.
        silent_case32(s, 40, |a| a.jmp_far(TSS_SHORT, 0))?;
        // Back to long mode: paging on (LME is still set) and a far jump to 64-bit code.
        let a = &mut s.a;
        a.mov(eax, cr0)?;
        a.or(eax, 0x8000_0000u32 as i32)?;
        a.mov(cr0, eax)?;
        a.jmp_far(CODE64, back64)?;

        s.export_here("task_b")?;
        let a = &mut s.a;
        a.pushfd()?;
        a.pop(dword_ptr(TRAIL + 0x44))?;
        trail(a, 32, 9, false, 0)?;
        a.mov(ax, word_ptr(TSS_B_BASE))?;
        a.mov(word_ptr(TRAIL + 4 * 9), ax)?;
        a.mov(word_ptr(TRAIL + 4 * 9 + 2), 10)?;
        a.iretd()?;

        s.export_here("ts_handler")?;
        let a = &mut s.a;
        a.pop(eax)?;
        a.mov(dword_ptr(LAST_ERR), eax)?;
        a.mov(dword_ptr(LAST_ERR + 4), 0)?;
        a.mov(dword_ptr(LAST_VEC), 10)?;
        a.mov(eax, dword_ptr(RESUME))?;
        a.mov(dword_ptr(esp), eax)?;
        a.iretd()?;
        Ok(())
    };
    // 16-bit code: 16-bit protected mode, real mode, virtual-8086 mode.
    let code16: &Emit<'_> = &|s| {
        let up32 = s.sym32("up32");
        let real_entry = s.sym32("real_entry");
        let real_handler = s.sym32("real_handler");
        s.export_here("down16")?;
        let a = &mut s.a;
        a.mov(ax, DATA16 as u32)?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        a.mov(ss, ax)?;
        trail(a, 16, 3, false, 0)?;
        a.mov(eax, cr0)?;
        a.and(eax, !1)?;
        a.mov(cr0, eax)?;
        // Real mode: a far jump reloads CS with a real-mode segment.
        a.jmp_far(0, real_entry)?;
        s.export_here("real_entry")?;
        let a = &mut s.a;
        a.xor(ax, ax)?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        a.mov(ss, ax)?;
        trail(a, 16, 4, false, 0)?;
        // A real-mode interrupt through the IVT.
        a.mov(word_ptr(REAL_IDTR), 0x3ff)?;
        a.mov(dword_ptr(REAL_IDTR + 2), 0)?;
        a.lidt(ptr(REAL_IDTR))?;
        a.mov(word_ptr(REAL_VECTOR * 4), real_handler)?;
        a.mov(word_ptr(REAL_VECTOR * 4 + 2), 0)?;
        a.int(REAL_VECTOR as u32)?;
        // Up again: PE on, far jump into 32-bit code.
        a.mov(eax, cr0)?;
        a.or(eax, 1)?;
        a.mov(cr0, eax)?;
        a.jmp_far(CODE32, up32)?;

        s.export_here("real_handler")?;
        let a = &mut s.a;
        trail(a, 16, 5, false, 0)?;
        a.iret()?;

        s.export_here("v86_code")?;
        let a = &mut s.a;
        trail(a, 16, 7, false, 0)?;
        a.int(V86_VECTOR as u32)?;
        Ok(())
    };
    let extra = [
        Section {
            name: "code32",
            bitness: 32,
            align: 16,
            limit: Some(0x1_0000),
            emit: code32,
        },
        Section {
            name: "code16",
            bitness: 16,
            align: 16,
            limit: Some(0x1_0000),
            emit: code16,
        },
    ];
    long_mode_image_with(
        "modes",
        &handler_table(),
        &|s, rt| {
            setup(s, rt)?;
            let compat_down = s.sym("compat_down");
            {
                let a = &mut s.a;
                // Clear the trail.
                a.mov(rdi, TRAIL)?;
                a.xor(eax, eax)?;
                a.mov(ecx, 16)?;
                a.rep().stosd()?;
                a.push(CODE32 as i32)?;
                a.mov(rax, compat_down)?;
                a.push(rax)?;
                a.db(&[0x48, 0xcb])?; // RETFQ
            }
            s.export_here("back64")?;
            {
                let a = &mut s.a;
                a.mov(ax, DATA as u32)?;
                a.mov(ds, ax)?;
                a.mov(es, ax)?;
                a.mov(ss, ax)?;
                a.mov(ecx, 0xc000_0080u32)?;
                a.rdmsr()?;
                a.shr(eax, 9)?;
                a.and(eax, 2)?;
                a.or(eax, 1 | 12 << 16)?;
                a.mov(rbx, rsp)?;
                a.db(&[0x6a, 0x00])?;
                a.mov(rcx, rbx)?;
                a.sub(rcx, rsp)?;
                a.mov(rsp, rbx)?;
                a.shl(ecx, 8)?;
                a.or(eax, ecx)?;
                a.mov(dword_ptr(TRAIL + 4 * 11), eax)?;
            }
            rt.load_idt(s)?;
            for (i, (want, what)) in EXPECTED_TRAIL.iter().enumerate() {
                let mut ok = s.a.create_label();
                s.a.cmp(dword_ptr(TRAIL + 4 * i as u64), *want)?;
                s.a.je(ok)?;
                rt.print(
                    s,
                    format!("FAIL stage {}: {what}: expected {want:#x}, got ", i + 1).as_bytes(),
                )?;
                s.a.mov(eax, dword_ptr(TRAIL + 4 * i as u64))?;
                s.a.call(rt.put_hex)?;
                rt.print(s, b"\r\n")?;
                rt.exit_with(s, EXIT_CHECK_FAILED)?;
                s.a.set_label(&mut ok)?;
            }
            check(
                s,
                rt,
                "the INT from virtual-8086 mode pushed EFLAGS with VM",
                |a, ok| {
                    a.test(dword_ptr(TRAIL + 0x40), 1 << 17)?;
                    a.jne(ok)
                },
            )?;
            check(
                s,
                rt,
                "task B runs with EFLAGS.NT (nested by CALL)",
                |a, ok| {
                    a.test(dword_ptr(TRAIL + 0x44), 1 << 14)?;
                    a.jne(ok)
                },
            )?;
            check_slot(
                s,
                rt,
                40,
                "#TS: JMP to a TSS with a limit below 0x67",
                10,
                Some(TSS_SHORT as u64),
            )?;
            rt.print(s, b"modes: PASS\r\n")?;
            rt.exit_with(s, EXIT_PASS)?;
            handlers(s)
        },
        &extra,
    )
}

// ---------------------------------------------------------------------------------------
// debug

/// `debug`'s #DB bookkeeping: count, then the pushed RIPs and DR6 values.
const DB_COUNT: u64 = CELLS + 0x400;
const DB_RIPS: u64 = CELLS + 0x408;
const DB_DR6: u64 = CELLS + 0x488;
/// The dword `debug`'s data breakpoint watches.
const WATCHED: u64 = CELLS + 0x500;

/// Labels the next instruction and appends the label to `l`: the addresses where the
/// single-step #DBs are expected, in order.
fn mark_here(a: &mut CodeAssembler, l: &mut Vec<CodeLabel>) -> Result<(), IcedError> {
    let mut x = a.create_label();
    a.set_label(&mut x)?;
    l.push(x);
    Ok(())
}

/// Emits code that checks that #DB came `count` times, the i-th time with RIP at
/// `rips[i]` (labels), and that the last DR6 has `dr6_bits` set.
fn check_db(
    s: &mut SectionAsm<'_>,
    rt: &mut Runtime,
    what: &str,
    rips: &[CodeLabel],
    dr6_bits: u64,
) -> Result<(), LinkError> {
    let n = rips.len() as u32;
    check(s, rt, &format!("{what}: {n} #DB"), |a, ok| {
        a.cmp(dword_ptr(DB_COUNT), n)?;
        a.je(ok)
    })?;
    for (i, rip) in rips.iter().enumerate() {
        check(
            s,
            rt,
            &format!("{what}: #DB {} at the right RIP", i + 1),
            |a, ok| {
                a.lea(rax, ptr(*rip))?;
                a.cmp(qword_ptr(DB_RIPS + 8 * i as u64), rax)?;
                a.je(ok)
            },
        )?;
    }
    if n > 0 {
        let last = DB_DR6 + 8 * (n as u64 - 1);
        check(s, rt, &format!("{what}: DR6 {dr6_bits:#x}"), |a, ok| {
            a.mov(rax, qword_ptr(last))?;
            a.and(eax, dr6_bits as u32)?;
            a.cmp(eax, dr6_bits as u32)?;
            a.je(ok)
        })?;
    }
    rt.print(s, format!("ok: {what}\r\n").as_bytes())?;
    s.a.mov(dword_ptr(DB_COUNT), 0)?;
    Ok(())
}

/// Builds `debug`.
pub fn build_debug() -> Result<Image, LinkError> {
    let mut table: Vec<(u8, &'static str)> =
        RECORDED.iter().copied().filter(|(v, _)| *v != 1).collect();
    table.push((1, "db_handler"));
    long_mode_image_with(
        "debug",
        &table,
        &|s, rt| {
            setup(s, rt)?;
            s.a.mov(dword_ptr(DB_COUNT), 0)?;
            // 1. Single-step: no trap after the POPF that sets TF, one after each
            //    instruction TF was set for, including the POPF that clears it.
            let mut l = Vec::new();
            {
                let a = &mut s.a;
                a.pushfq()?;
                a.or(qword_ptr(rsp), 0x100)?;
                a.popfq()?;
                a.nop()?;
                mark_here(a, &mut l)?;
                a.nop()?;
                mark_here(a, &mut l)?;
                a.pushfq()?;
                mark_here(a, &mut l)?;
                a.and(qword_ptr(rsp), !0x100)?;
                mark_here(a, &mut l)?;
                a.popfq()?;
                mark_here(a, &mut l)?;
                a.nop()?;
            }
            check_db(s, rt, "single-step (TF)", &l, 0x4000)?;
            // 2. An instruction breakpoint hit three times in a loop (RF lets it run).
            let mut breakpoint = s.a.create_label();
            {
                let a = &mut s.a;
                let mut over = a.create_label();
                a.lea(rax, ptr(breakpoint))?;
                a.mov(dr0, rax)?;
                a.mov(eax, 1)?; // L0, execute, 1 byte
                a.mov(dr7, rax)?;
                a.mov(ecx, 3)?;
                a.xor(esi, esi)?;
                a.set_label(&mut breakpoint)?;
                a.inc(esi)?;
                a.dec(ecx)?;
                a.jnz(breakpoint)?;
                a.jmp(over)?;
                a.set_label(&mut over)?;
                a.xor(eax, eax)?;
                a.mov(dr7, rax)?;
            }
            check(
                s,
                rt,
                "instruction breakpoint: the instruction ran each time",
                |a, ok| {
                    a.cmp(esi, 3)?;
                    a.je(ok)
                },
            )?;
            check_db(
                s,
                rt,
                "instruction breakpoint (DR0)",
                &[breakpoint, breakpoint, breakpoint],
                1,
            )?;
            // 3. General detect: MOV from DR0 with DR7.GD faults once, then runs.
            let mut at = s.a.create_label();
            {
                let a = &mut s.a;
                a.mov(eax, 0x2000)?;
                a.mov(dr7, rax)?;
                a.set_label(&mut at)?;
                a.mov(rax, dr0)?;
            }
            check_db(s, rt, "general detect (DR7.GD)", &[at], 0x2000)?;
            // 4. A 4-byte write breakpoint: a 2-byte store into it traps after the store, a
            //    load does not, a store next to it does not.
            let mut after = s.a.create_label();
            {
                let a = &mut s.a;
                a.mov(rax, WATCHED)?;
                a.mov(dr1, rax)?;
                a.mov(eax, (1u32 << 2) | (0b1101 << 20))?; // L1, write, 4 bytes
                a.mov(dr7, rax)?;
                a.mov(ebx, dword_ptr(WATCHED))?;
                a.mov(word_ptr(WATCHED + 2), bx)?;
                a.set_label(&mut after)?;
                a.mov(byte_ptr(WATCHED + 4), bl)?;
                a.xor(eax, eax)?;
                a.mov(dr7, rax)?;
            }
            check_db(s, rt, "data breakpoint (DR1, write)", &[after], 2)?;
            // 5. MOV SS holds the trap back to after the next instruction.
            let mut l = Vec::new();
            {
                let a = &mut s.a;
                a.mov(ax, ss)?;
                a.pushfq()?;
                a.or(qword_ptr(rsp), 0x100)?;
                a.popfq()?;
                a.mov(ss, ax)?;
                a.nop()?;
                mark_here(a, &mut l)?;
                a.pushfq()?;
                mark_here(a, &mut l)?;
                a.and(qword_ptr(rsp), !0x100)?;
                mark_here(a, &mut l)?;
                a.popfq()?;
                mark_here(a, &mut l)?;
            }
            check_db(s, rt, "single-step over MOV SS", &l, 0x4000)?;
            // 6. ICEBP: a #DB trap.
            let mut after = s.a.create_label();
            s.a.int1()?;
            s.a.set_label(&mut after)?;
            check_db(s, rt, "ICEBP", &[after], 0)?;
            rt.print(s, b"debug: PASS\r\n")?;
            rt.exit_with(s, EXIT_PASS)?;
            handlers(s)?;
            s.export_here("db_handler")?;
            let a = &mut s.a;
            a.push(rax)?;
            a.push(rbx)?;
            a.mov(eax, dword_ptr(DB_COUNT))?;
            a.mov(rbx, qword_ptr(rsp + 16))?;
            a.mov(qword_ptr(rax * 8 + DB_RIPS), rbx)?;
            a.mov(rbx, dr6)?;
            a.mov(qword_ptr(rax * 8 + DB_DR6), rbx)?;
            a.inc(dword_ptr(DB_COUNT))?;
            a.mov(ebx, 0xffff_0ff0u32)?;
            a.mov(dr6, rbx)?;
            a.or(qword_ptr(rsp + 32), 0x1_0000)?; // RF: the faulting instruction runs
            a.pop(rbx)?;
            a.pop(rax)?;
            a.iretq()?;
            Ok(())
        },
        no_extra(),
    )
}
