//! x86 fidelity, round two (issue #16): address-size prefixes on LOOP/JCXZ, the stack size
//! POP Sreg and ENTER use, BCD adjusts, LAR/LSL/VERR/VERW/ARPL and canonical descriptor-table
//! bases. Expected values follow the SDM's pseudocode; each table names the rule it checks.

mod common;

use common::*;
use deja_machine::cpu::{CpuState, Segment, seg};
use deja_machine::{Cpu, Exit, Machine};
use iced_x86::code_asm::*;
use iced_x86::{Code, Encoder, Instruction};

/// Encodes one branch `code` at `ip` whose target is the byte after the instruction and a
/// following HLT, so the guest halts one byte further when the branch is taken.
fn branch_then_hlt(bitness: u32, code: Code, ip: u64) -> Vec<u8> {
    let mut enc = Encoder::new(bitness);
    let probe = Instruction::with_branch(code, ip + 8).unwrap();
    let len = enc.encode(&probe, ip).unwrap() as u64;
    let _probe = enc.take_buffer();
    let insn = Instruction::with_branch(code, ip + len + 1).unwrap();
    enc.encode(&insn, ip).unwrap();
    let mut bytes = enc.take_buffer();
    bytes.extend([0xf4, 0xf4]);
    bytes
}

/// The initial state for `bitness` with code at `ip`.
fn mode_state(m: &Machine, bitness: u32, ip: u64) -> CpuState {
    match bitness {
        16 => real_mode_state(ip),
        32 => protected_mode_state(m, ip),
        _ => long_mode_state(m, ip),
    }
}

/// LOOP/LOOPcc/JCXZ count with CX, ECX or RCX by address size (the 0x67 prefix), not by
/// the mode's default; JCXZ/JECXZ/JRCXZ likewise test the register the address size names.
#[test]
fn loop_and_jcxz_use_the_counter_of_the_address_size() {
    const ZF: u64 = 0x40;
    // (bitness, form, RCX before, flags, RCX after, taken)
    let cases: &[(u32, Code, u64, u64, u64, bool)] = &[
        (16, Code::Loop_rel8_16_CX, 0x1_0000, 0, 0x1_ffff, true),
        (16, Code::Loop_rel8_16_ECX, 0x1_0000, 0, 0xffff, true),
        (16, Code::Loop_rel8_16_ECX, 0x2_0001, 0, 0x2_0000, true),
        (16, Code::Loope_rel8_16_ECX, 0x1_0001, ZF, 0x1_0000, true),
        (16, Code::Loopne_rel8_16_ECX, 0x1_0001, 0, 0x1_0000, true),
        (16, Code::Loope_rel8_16_CX, 0x1_0001, ZF, 0x1_0000, false),
        (16, Code::Jcxz_rel8_16, 0x1_0000, 0, 0x1_0000, true),
        (16, Code::Jecxz_rel8_16, 0x1_0000, 0, 0x1_0000, false),
        (32, Code::Loop_rel8_32_CX, 0x1_0001, 0, 0x1_0000, false),
        (32, Code::Loop_rel8_32_CX, 0x2_0000, 0, 0x2_ffff, true),
        (32, Code::Loop_rel8_32_ECX, 0x1_0000, 0, 0xffff, true),
        (32, Code::Loopne_rel8_32_CX, 0x2_0000, 0, 0x2_ffff, true),
        (32, Code::Loope_rel8_32_CX, 0x2_0002, ZF, 0x2_0001, true),
        (32, Code::Jcxz_rel8_32, 0x1_0000, 0, 0x1_0000, true),
        (32, Code::Jecxz_rel8_32, 0x1_0000, 0, 0x1_0000, false),
        // A 32-bit counter write zero-extends into RCX.
        (64, Code::Loop_rel8_64_ECX, 0x1_0000_0001, 0, 0, false),
        (
            64,
            Code::Loop_rel8_64_ECX,
            0x5_0000_0000,
            0,
            0xffff_ffff,
            true,
        ),
        (64, Code::Loope_rel8_64_ECX, 0x1_0000_0002, ZF, 1, true),
        (
            64,
            Code::Loop_rel8_64_RCX,
            0x1_0000_0001,
            0,
            0x1_0000_0000,
            true,
        ),
        (
            64,
            Code::Jecxz_rel8_64,
            0x1_0000_0000,
            0,
            0x1_0000_0000,
            true,
        ),
        (
            64,
            Code::Jrcxz_rel8_64,
            0x1_0000_0000,
            0,
            0x1_0000_0000,
            false,
        ),
    ];
    for &(bitness, code, count, flags, want_rcx, taken) in cases {
        let (mut m, _, _) = machine();
        let ip = if bitness == 64 { 0x20_0000 } else { 0x2000 };
        let bytes = branch_then_hlt(bitness, code, ip);
        load(&m, ip, &bytes);
        let mut s = mode_state(&m, bitness, ip);
        s.gpr[1] = count;
        s.rflags = 2 | flags;
        let mut c = cpu(&m, &s);
        assert_eq!(run(&mut c, &mut m, 10), Exit::Halted, "{code:?}");
        let st = c.state().unwrap();
        let len = bytes.len() as u64 - 2;
        let want_rip = ip + len + 1 + u64::from(taken);
        assert_eq!(
            (st.gpr[1], st.rip),
            (want_rcx, want_rip),
            "{bitness}-bit {code:?} with RCX {count:#x}: RCX and RIP (taken: {taken})"
        );
        assert_eq!(c.icount(), 2, "{code:?}: icount");
    }
}

/// GDT slot 0x50: a ring-0 16-bit (B = 0) writable data segment, base 0, 4 GiB limit.
const DATA16: u16 = 0x50;

fn protected_with_data16(m: &Machine, eip: u64) -> CpuState {
    let mut s = protected_mode_state(m, eip);
    load(
        m,
        GDT + u64::from(DATA16),
        &0x008f_9300_0000_ffffu64.to_le_bytes(),
    );
    s.gdtr.limit = 0x57;
    s
}

fn data16_segment() -> Segment {
    let mut s = Segment::flat(DATA16, false, false);
    s.db = false;
    s
}

/// POP Sreg adds to the stack pointer with the stack size in force before the load: POP SS
/// that switches between 16-bit and 32-bit stacks, and POP DS/ES/FS/GS, on both sizes.
#[test]
fn pop_sreg_steps_the_stack_pointer_by_the_old_stack_size() {
    // (operand size 4 = o32, pop into, SS is 16-bit before, selector popped, ESP before,
    //  ESP after)
    let cases: &[(u8, usize, bool, u16, u64, u64)] = &[
        (4, seg::SS, true, 0x10, 0x2_fffc, 0x2_0000),
        (4, seg::SS, false, DATA16, 0x1_fffc, 0x2_0000),
        (2, seg::SS, true, 0x10, 0x2_fffe, 0x2_0000),
        (2, seg::SS, false, DATA16, 0x1_fffe, 0x2_0000),
        (4, seg::DS, true, 0x10, 0x2_fffc, 0x2_0000),
        (4, seg::ES, false, DATA16, 0x1_fffc, 0x2_0000),
        (2, seg::FS, true, DATA16, 0x2_fffe, 0x2_0000),
        (4, seg::GS, false, 0x10, 0x1_fffc, 0x2_0000),
    ];
    for &(size, sreg, ss16, sel, sp0, want) in cases {
        let (mut m, _, _) = machine();
        let code = asm(32, 0x2000, |a| {
            match (size, sreg) {
                (4, seg::SS) => a.pop(ss),
                (4, seg::DS) => a.pop(ds),
                (4, seg::ES) => a.pop(es),
                (4, seg::GS) => a.pop(gs),
                (2, seg::SS) => a.db(&[0x66, 0x17]),
                (2, seg::FS) => a.db(&[0x66, 0x0f, 0xa1]),
                _ => unreachable!(),
            }
            .unwrap();
            a.hlt().unwrap();
        });
        load(&m, 0x2000, &code);
        let mut s = protected_with_data16(&m, 0x2000);
        if ss16 {
            s.seg[seg::SS] = data16_segment();
        }
        let top = if ss16 { sp0 & 0xffff } else { sp0 };
        load(&m, top, &u32::from(sel).to_le_bytes());
        s.gpr[4] = sp0;
        let mut c = cpu(&m, &s);
        assert_eq!(run(&mut c, &mut m, 10), Exit::Halted);
        let st = c.state().unwrap();
        assert_eq!(st.seg[sreg].selector, sel, "pop sreg {sreg} size {size}");
        assert_eq!(
            st.gpr[4],
            want,
            "pop sreg {sreg} o{} from a {}-bit stack: ESP",
            size * 8,
            if ss16 { 16 } else { 32 }
        );
    }
}

/// ENTER as the SDM's pseudocode (and Bochs) does it: FrameTemp is the stack pointer after
/// pushing the frame pointer, the nested copies read below the old frame pointer at the
/// stack size, BP or EBP (by operand size) gets FrameTemp, and only the stack pointer's
/// stack-size part moves.
#[test]
fn enter_follows_operand_and_stack_sizes_at_every_nesting_level() {
    struct Case {
        name: &'static str,
        bitness: u32,
        o32: bool,
        ss16: bool,
        alloc: u16,
        level: u8,
        esp: u64,
        ebp: u64,
        want_esp: u64,
        want_ebp: u64,
        /// (address, size, value) written to the stack.
        pushed: &'static [(u64, u8, u64)],
    }
    let cases = [
        Case {
            name: "o32 enter 8,0 on a 16-bit stack",
            bitness: 32,
            o32: true,
            ss16: true,
            alloc: 8,
            level: 0,
            esp: 0x1_0000,
            ebp: 0x1234_5678,
            want_esp: 0x1_fff4,
            want_ebp: 0x1_fffc,
            pushed: &[(0xfffc, 4, 0x1234_5678)],
        },
        Case {
            name: "o32 enter 8,3 on a 16-bit stack",
            bitness: 32,
            o32: true,
            ss16: true,
            alloc: 8,
            level: 3,
            esp: 0x1_0000,
            ebp: 0x5_2000,
            want_esp: 0x1_ffe8,
            want_ebp: 0x1_fffc,
            pushed: &[
                (0xfffc, 4, 0x5_2000),
                (0xfff8, 4, 0xaaaa_1ffc),
                (0xfff4, 4, 0xaaaa_1ff8),
                (0xfff0, 4, 0x1_fffc),
            ],
        },
        Case {
            name: "o32 enter 36,2 on a 32-bit stack",
            bitness: 32,
            o32: true,
            ss16: false,
            alloc: 36,
            level: 2,
            esp: 0x9000,
            ebp: 0x7000,
            want_esp: 0x8fd0,
            want_ebp: 0x8ffc,
            pushed: &[
                (0x8ffc, 4, 0x7000),
                (0x8ff8, 4, 0xaaaa_6ffc),
                (0x8ff4, 4, 0x8ffc),
            ],
        },
        Case {
            name: "o16 enter 4,2 on a 32-bit stack",
            bitness: 32,
            o32: false,
            ss16: false,
            alloc: 4,
            level: 2,
            esp: 0x9000,
            ebp: 0x1_7000,
            want_esp: 0x8ff6,
            want_ebp: 0x1_8ffe,
            pushed: &[
                (0x8ffe, 2, 0x7000),
                (0x8ffc, 2, 0x6ffe),
                (0x8ffa, 2, 0x8ffe),
            ],
        },
        Case {
            name: "o16 enter 6,1 in real mode",
            bitness: 16,
            o32: false,
            ss16: true,
            alloc: 6,
            level: 1,
            esp: 0x5_7000,
            ebp: 0x9_1234,
            want_esp: 0x5_6ff6,
            want_ebp: 0x9_6ffe,
            pushed: &[(0x6ffe, 2, 0x1234), (0x6ffc, 2, 0x6ffe)],
        },
        Case {
            name: "o16 enter 0,33 (level mod 32 = 1) on a 16-bit stack",
            bitness: 32,
            o32: false,
            ss16: true,
            alloc: 0,
            level: 33,
            esp: 0x3_0000,
            ebp: 0x4_0100,
            want_esp: 0x3_fffc,
            want_ebp: 0x4_fffe,
            pushed: &[(0xfffe, 2, 0x0100), (0xfffc, 2, 0xfffe)],
        },
    ];
    for c in &cases {
        let (mut m, _, _) = machine();
        let ip = 0x2000;
        let code = asm(c.bitness, ip, |a| {
            let o32 = if c.bitness == 16 { c.o32 } else { !c.o32 };
            if o32 {
                a.db(&[0x66]).unwrap();
            }
            a.db(&[0xc8, c.alloc as u8, (c.alloc >> 8) as u8, c.level])
                .unwrap();
            a.hlt().unwrap();
        });
        load(&m, ip, &code);
        let mut s = if c.bitness == 16 {
            real_mode_state(ip)
        } else {
            protected_with_data16(&m, ip)
        };
        if c.bitness == 32 && c.ss16 {
            s.seg[seg::SS] = data16_segment();
        }
        // The old frames below EBP: each word/dword holds 0xaaaa_0000 | its address.
        let base = c.ebp & if c.ss16 { 0xffff } else { 0xffff_ffff };
        for i in 1..8u64 {
            let a = base - 4 * i;
            load(&m, a, &(0xaaaa_0000u32 | (a as u32 & 0xffff)).to_le_bytes());
        }
        if !c.o32 {
            for i in 1..8u64 {
                let a = base - 2 * i;
                load(&m, a, &(a as u16).to_le_bytes());
            }
        }
        s.gpr[4] = c.esp;
        s.gpr[5] = c.ebp;
        let mut cpu = cpu(&m, &s);
        assert_eq!(run(&mut cpu, &mut m, 10), Exit::Halted, "{}", c.name);
        let st = cpu.state().unwrap();
        assert_eq!(
            (st.gpr[4], st.gpr[5]),
            (c.want_esp, c.want_ebp),
            "{}: ESP, EBP",
            c.name
        );
        for &(addr, size, v) in c.pushed {
            let got = peek(&m, addr, size as usize);
            let mut b = [0u8; 8];
            b[..size as usize].copy_from_slice(&got);
            assert_eq!(u64::from_le_bytes(b), v, "{}: pushed at {addr:#x}", c.name);
        }
    }
}

/// ENTER checks that a write at the final stack pointer would succeed: with the final frame
/// on a not-present page it raises #PF there (CR2 = the final RSP, a supervisor write
/// to a not-present page), RSP and RBP unchanged, RIP at the ENTER.
#[test]
fn enter_faults_when_the_final_stack_pointer_is_not_writable() {
    let (mut m, _, _) = machine();
    let rip = 0x20_0000u64;
    let handler = 0x20_1000u64;
    load(
        &m,
        handler,
        &asm(64, handler, |a| {
            a.pop(rbx).unwrap();
            a.pop(rcx).unwrap();
            a.hlt().unwrap();
        }),
    );
    let code = asm(64, rip, |a| {
        a.enter(0x20u32, 0u32).unwrap();
        a.hlt().unwrap();
    });
    load(&m, rip, &code);
    let mut s = long_mode_state(&m, rip);
    // The 2 MiB page at 0x40_0000 is not present; the stack starts just above it.
    load(&m, PML4 + 0x2000 + 2 * 8, &0u64.to_le_bytes());
    load(&m, IDT + 14 * 16, &gate64(handler, 0x18, 1));
    load(&m, TSS + 0x24, &0x9000u64.to_le_bytes());
    s.gpr[4] = 0x60_0010;
    s.gpr[5] = 0x1234;
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 10), Exit::Halted);
    let st = c.state().unwrap();
    assert_eq!(st.rip, handler + 3, "the #PF handler ran");
    assert_eq!(st.cr2, 0x60_0010 - 8 - 0x20, "CR2: the final RSP");
    assert_eq!(st.gpr[3], 2, "error code: supervisor write, not present");
    assert_eq!(st.gpr[1], rip, "the fault is at the ENTER");
    assert_eq!(st.gpr[5], 0x1234, "RBP unchanged");
    assert_eq!(
        peek(&m, 0x9000 - 16, 8),
        0x60_0010u64.to_le_bytes(),
        "RSP unchanged"
    );
}

/// The SDM's pseudocode for DAA/DAS/AAA/AAS/AAM/AAD: the result AX and flags, with the mask
/// of the flags it defines.
fn bcd_reference(op: &str, ax_in: u16, flags: u16, base: u8) -> (u16, u16, u16) {
    const CF: u16 = 1;
    const PF: u16 = 4;
    const AF: u16 = 0x10;
    const ZF: u16 = 0x40;
    const SF: u16 = 0x80;
    let szp = |v: u8| {
        let mut f = 0;
        if v == 0 {
            f |= ZF;
        }
        if v & 0x80 != 0 {
            f |= SF;
        }
        if v.count_ones().is_multiple_of(2) {
            f |= PF;
        }
        f
    };
    let (cf, af) = (flags & CF != 0, flags & AF != 0);
    let lo = ax_in as u8;
    let hi = (ax_in >> 8) as u8;
    match op {
        "daa" | "das" => {
            let (mut a, mut ncf, mut naf) = (lo, false, false);
            if lo & 0xf > 9 || af {
                let (v, c) = if op == "daa" {
                    lo.overflowing_add(6)
                } else {
                    lo.overflowing_sub(6)
                };
                a = v;
                ncf = cf || c;
                naf = true;
            }
            if lo > 0x99 || cf {
                a = if op == "daa" {
                    a.wrapping_add(0x60)
                } else {
                    a.wrapping_sub(0x60)
                };
                ncf = true;
            } else if op == "daa" {
                ncf = false;
            }
            let f = szp(a) | if ncf { CF } else { 0 } | if naf { AF } else { 0 };
            (u16::from(hi) << 8 | u16::from(a), f, CF | AF | SF | ZF | PF)
        }
        "aaa" | "aas" => {
            let adjust = lo & 0xf > 9 || af;
            let mut r = ax_in;
            if adjust {
                r = if op == "aaa" {
                    r.wrapping_add(0x106)
                } else {
                    let v = r.wrapping_sub(6);
                    v.wrapping_sub(0x100)
                };
            }
            r &= 0xff0f;
            (r, if adjust { CF | AF } else { 0 }, CF | AF)
        }
        "aam" => {
            let r = u16::from(lo / base) << 8 | u16::from(lo % base);
            (r, szp(r as u8), SF | ZF | PF)
        }
        _ => {
            let r = u16::from(lo.wrapping_add(hi.wrapping_mul(base)));
            (r, szp(r as u8), SF | ZF | PF)
        }
    }
}

/// DAA, DAS, AAA, AAS, AAM and AAD over every AL, AF and CF, with AH from a set that
/// includes the carry and borrow edges (0x00, 0x05, 0x7f, 0xff), against the SDM's
/// pseudocode (AAA and AAS adjust AX as a whole: AL = 0xfa with AF carries into AH).
/// The host cannot judge them: under PVM DAA/AAA/AAS shut the kvm guest down.
#[test]
fn bcd_adjusts_match_the_sdm_pseudocode_for_every_input() {
    let ops: [(&str, u8); 8] = [
        ("daa", 0),
        ("das", 0),
        ("aaa", 0),
        ("aas", 0),
        ("aam", 10),
        ("aam", 7),
        ("aad", 10),
        ("aad", 16),
    ];
    let inputs: Vec<u32> = (0..256u32)
        .flat_map(|lo| {
            [0x00u32, 0x05, 0x7f, 0xff].into_iter().flat_map(move |hi| {
                [0u32, 1, 0x10, 0x11].into_iter().map(move |cfaf| {
                    // Other arithmetic flags set on every other input, to see they change.
                    let other = if lo & 1 != 0 { 0x8c4 } else { 0 };
                    (hi << 8 | lo) | (2 | cfaf | other) << 16
                })
            })
        })
        .collect();
    let (input_at, output_at) = (0x10_0000u64, 0x20_0000u64);
    let bytes: Vec<u8> = inputs.iter().flat_map(|v| v.to_le_bytes()).collect();
    for (op, base) in ops {
        let (mut m, _, _) = machine();
        load(&m, input_at, &bytes);
        let code = asm(32, 0x2000, |a| {
            let mut top = a.create_label();
            a.set_label(&mut top).unwrap();
            a.mov(eax, dword_ptr(esi)).unwrap();
            a.mov(edx, eax).unwrap();
            a.shr(edx, 16).unwrap();
            a.push(edx).unwrap();
            a.popfd().unwrap();
            match op {
                "daa" => a.daa(),
                "das" => a.das(),
                "aaa" => a.aaa(),
                "aas" => a.aas(),
                "aam" => a.aam(u32::from(base)),
                _ => a.aad(u32::from(base)),
            }
            .unwrap();
            a.pushfd().unwrap();
            a.pop(edx).unwrap();
            a.mov(word_ptr(edi), ax).unwrap();
            a.mov(word_ptr(edi + 2), dx).unwrap();
            a.add(esi, 4).unwrap();
            a.add(edi, 4).unwrap();
            a.dec(ecx).unwrap();
            a.jnz(top).unwrap();
            a.hlt().unwrap();
        });
        load(&m, 0x2000, &code);
        let mut s = protected_mode_state(&m, 0x2000);
        s.gpr[6] = input_at;
        s.gpr[7] = output_at;
        s.gpr[1] = inputs.len() as u64;
        let mut c = cpu(&m, &s);
        assert_eq!(run(&mut c, &mut m, 1 << 20), Exit::Halted, "{op}");
        let out = peek(&m, output_at, 4 * inputs.len());
        let mut wrong = Vec::new();
        for (i, &input) in inputs.iter().enumerate() {
            let got_ax = u16::from_le_bytes([out[4 * i], out[4 * i + 1]]);
            let got_f = u16::from_le_bytes([out[4 * i + 2], out[4 * i + 3]]);
            let (want_ax, f, defined) = bcd_reference(op, input as u16, (input >> 16) as u16, base);
            if got_ax != want_ax || got_f & defined != f & defined {
                wrong.push(format!(
                    "AX {:#06x} flags {:#x}: got AX {got_ax:#06x} flags {:#x}, want AX {want_ax:#06x} flags {:#x}",
                    input as u16,
                    (input >> 16) & 0x8d5,
                    got_f & defined,
                    f & defined
                ));
            }
        }
        assert!(
            wrong.is_empty(),
            "{op} {base}: {} of {} inputs wrong; first:\n{}",
            wrong.len(),
            inputs.len(),
            wrong[..wrong.len().min(8)].join("\n")
        );
    }
}

/// Where the #GP handler of [`ring0_gp`] stores the error code and the faulting RIP (and a
/// marker that it ran).
const GP_OUT: u64 = 0x6000;
/// 16-byte system descriptors for the canonical-base tests: an LDT at 0x50, a TSS at 0x60.
const LDT_SEL: u16 = 0x50;
const TSS_SEL: u16 = 0x60;

/// A 16-byte system descriptor of `type_` (present, DPL 0) with `base` and `limit`.
fn system_descriptor(type_: u64, base: u64, limit: u64) -> [u8; 16] {
    let lo = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (type_ << 40)
        | (1 << 47)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&lo.to_le_bytes());
    b[8..].copy_from_slice(&(base >> 32).to_le_bytes());
    b
}

/// Runs `body` in 64-bit ring 0 on `cpu`'s engine (bt, or kvm when given), with a #GP
/// handler; returns (#GP raised, error code, faulting RIP, the final state).
fn ring0_gp(
    kvm: Option<&mut deja_kvm::KvmCpu>,
    body: &dyn Fn(&mut CodeAssembler),
    setup: &dyn Fn(&Machine),
) -> (bool, u64, u64, CpuState) {
    try_ring0_gp(kvm, body, setup).unwrap_or_else(|e| panic!("{e}"))
}

/// [`ring0_gp`], with a run that did not reach HLT as an error.
fn try_ring0_gp(
    kvm: Option<&mut deja_kvm::KvmCpu>,
    body: &dyn Fn(&mut CodeAssembler),
    setup: &dyn Fn(&Machine),
) -> Result<(bool, u64, u64, CpuState), String> {
    let (mut m, _, _) = machine();
    let mut s = long_mode_state(&m, 0x2000);
    s.gdtr.limit = 0x6f;
    s.gpr[4] = 0x8000;
    load(
        &m,
        0x2000,
        &asm(64, 0x2000, |a| {
            body(a);
            a.hlt().unwrap();
        }),
    );
    let handler = 0x4800;
    load(
        &m,
        handler,
        &asm(64, handler, |a| {
            a.pop(rax).unwrap();
            a.mov(qword_ptr(GP_OUT), rax).unwrap();
            a.pop(rax).unwrap();
            a.mov(qword_ptr(GP_OUT + 8), rax).unwrap();
            a.mov(qword_ptr(GP_OUT + 16), 1).unwrap();
            a.hlt().unwrap();
        }),
    );
    load(&m, IDT + 13 * 16, &gate64(handler, 0x18, 0));
    setup(&m);
    let st = match kvm {
        Some(k) => {
            k.set_state(&s).unwrap();
            let exit = k.run(&mut m, deja_machine::Limit::default()).unwrap();
            let st = k.state().unwrap();
            if exit != Exit::Halted {
                return Err(format!("kvm did not halt: {exit:?} at rip {:#x}", st.rip));
            }
            st
        }
        None => {
            let mut c = cpu(&m, &s);
            assert_eq!(run(&mut c, &mut m, 100), Exit::Halted, "bt did not halt");
            c.state().unwrap()
        }
    };
    let q = |at: u64| u64::from_le_bytes(peek(&m, at, 8).try_into().unwrap());
    Ok((q(GP_OUT + 16) == 1, q(GP_OUT), q(GP_OUT + 8), st))
}

/// LGDT/LIDT in 64-bit mode and LLDT/LTR (the base of the 16-byte descriptor) refuse a
/// non-canonical base with #GP before changing anything: #GP(0) for LGDT/LIDT, #GP with
/// the selector for LLDT/LTR (as the host's kvm and Bochs do); canonical bases load.
/// Checked on bt and, where /dev/kvm exists, on kvm.
#[test]
fn descriptor_table_bases_must_be_canonical_in_64_bit_mode() {
    const NON_CANONICAL: u64 = 0x0000_8000_0000_7000;
    const HIGH: u64 = 0xffff_8000_0000_7000;
    type Body = fn(&mut CodeAssembler);
    // (name, base, instruction, expected #GP error code or None)
    let cases: [(&str, u64, Body, Option<u64>); 8] = [
        (
            "lgdt",
            NON_CANONICAL,
            |a| a.lgdt(ptr(0x7000u64)).unwrap(),
            Some(0),
        ),
        ("lgdt", HIGH, |a| a.lgdt(ptr(0x7000u64)).unwrap(), None),
        (
            "lidt",
            NON_CANONICAL,
            |a| a.lidt(ptr(0x7000u64)).unwrap(),
            Some(0),
        ),
        ("lidt", HIGH, |a| a.lidt(ptr(0x7000u64)).unwrap(), None),
        (
            "lldt",
            NON_CANONICAL,
            |a| {
                a.mov(eax, u32::from(LDT_SEL)).unwrap();
                a.lldt(ax).unwrap();
            },
            Some(u64::from(LDT_SEL)),
        ),
        (
            "lldt",
            HIGH,
            |a| {
                a.mov(eax, u32::from(LDT_SEL)).unwrap();
                a.lldt(ax).unwrap();
            },
            None,
        ),
        (
            "ltr",
            NON_CANONICAL,
            |a| {
                a.mov(eax, u32::from(TSS_SEL)).unwrap();
                a.ltr(ax).unwrap();
            },
            Some(u64::from(TSS_SEL)),
        ),
        (
            "ltr",
            HIGH,
            |a| {
                a.mov(eax, u32::from(TSS_SEL)).unwrap();
                a.ltr(ax).unwrap();
            },
            None,
        ),
    ];
    let (km, _, _) = machine();
    let mut kvm = match deja_kvm::KvmCpu::new(&km) {
        Ok(c) => Some(c),
        Err(e) if e.is_unavailable() => {
            deja_testkit::skip_without_kvm(
                "descriptor_table_bases_must_be_canonical (kvm part)",
                &e,
            );
            None
        }
        Err(e) => panic!("creating the kvm vCPU failed: {e}"),
    };
    if let Some(k) = kvm.as_mut() {
        // Whether kvm here delivers a ring-0 #GP through the IDT at all.
        let probe = |a: &mut CodeAssembler| {
            a.mov(rax, NON_CANONICAL).unwrap();
            a.mov(rbx, qword_ptr(rax)).unwrap();
        };
        if let Err(e) = try_ring0_gp(Some(k), &probe, &|_| {}) {
            println!(
                "SKIP (kvm part): descriptor_table_bases_must_be_canonical: a ring-0 #GP from a \
                 non-canonical load is not delivered under kvm on this host ({e})"
            );
            kvm = None;
        }
    }
    for (name, base, body, want) in cases {
        let setup = move |m: &Machine| {
            let mut pseudo = vec![0xffu8, 0x0f];
            pseudo.extend(base.to_le_bytes());
            load(m, 0x7000, &pseudo);
            load(
                m,
                GDT + u64::from(LDT_SEL),
                &system_descriptor(2, base, 0xfff),
            );
            load(
                m,
                GDT + u64::from(TSS_SEL),
                &system_descriptor(9, base, 0x67),
            );
        };
        let mut engines: Vec<(&str, Option<&mut deja_kvm::KvmCpu>)> = vec![("bt", None)];
        if let Some(k) = kvm.as_mut() {
            engines.push(("kvm", Some(k)));
        }
        for (engine, k) in engines {
            let (faulted, code, rip, st) = ring0_gp(k, &|a| body(a), &setup);
            let what = format!("{engine}: {name} with base {base:#x}");
            match want {
                Some(e) => {
                    assert!(faulted, "{what}: no #GP");
                    assert_eq!(code, e, "{what}: error code");
                    let at = if name.starts_with("lgdt") || name.starts_with("lidt") {
                        0x2000
                    } else {
                        0x2005
                    };
                    assert_eq!(rip, at, "{what}: RIP");
                    assert_eq!(
                        (st.gdtr.base, st.idtr.base),
                        (GDT, IDT),
                        "{what}: GDTR, IDTR"
                    );
                    assert_eq!(st.ldtr.selector, 0, "{what}: LDTR");
                    assert_eq!(st.tr.selector, 0x38, "{what}: TR");
                }
                None => {
                    assert!(!faulted, "{what}: #GP({code:#x}) at {rip:#x}");
                    let loaded = match name {
                        "lgdt" => st.gdtr.base,
                        "lidt" => st.idtr.base,
                        "lldt" => st.ldtr.base,
                        _ => st.tr.base,
                    };
                    assert_eq!(loaded, base, "{what}: loaded base");
                }
            }
        }
    }
}

/// System-descriptor types LAR and LSL accept (SDM vol. 2, LAR and LSL), in legacy
/// protected mode and in IA-32e mode (64-bit and compatibility mode).
const LAR_LEGACY: &[u8] = &[1, 2, 3, 4, 5, 9, 0xb, 0xc];
const LAR_IA32E: &[u8] = &[2, 9, 0xb, 0xc];
const LSL_LEGACY: &[u8] = &[1, 2, 3, 9, 0xb];
const LSL_IA32E: &[u8] = &[2, 9, 0xb];

/// The descriptors of the selector-query table: every system type and a set of code and
/// data types at several DPLs, one per 16-byte slot from GDT offset 0x50, each with its own
/// limit (byte granular or 4 KiB granular).
fn query_descriptors() -> Vec<u64> {
    let mut v = Vec::new();
    for t in 0..16u64 {
        for dpl in [0u64, 3] {
            v.push((t << 40) | (dpl << 45));
        }
    }
    for t in [0u64, 2, 6, 8, 0xa, 0xc, 0xe] {
        for dpl in 0..4u64 {
            v.push(((0x10 | t) << 40) | (dpl << 45) | (u64::from(dpl == 2) << 40));
        }
    }
    v.iter()
        .enumerate()
        .map(|(i, d)| {
            let i = i as u64;
            let present = u64::from(i % 5 != 4) << 47;
            let g = i.is_multiple_of(3) as u64;
            d | present
                | (g << 55)
                | (1 << 54)
                | (0x1000 + i * 0x111)
                | ((i & 0xf) << 48)
                | (0xab << 16)
        })
        .collect()
}

/// LAR, LSL, VERR and VERW over every system-descriptor type and code/data types at every
/// DPL, with RPL 0 and 3, at CPL 0 and 3, in legacy protected mode and in compatibility
/// mode (IA-32e: other system types), plus the null selector, a selector beyond the GDT
/// limit, an LDT selector without an LDT and (IA-32e) a system descriptor whose upper half
/// is beyond the limit: ZF and the result against the SDM's rules (an invalid selector
/// leaves the destination and never faults; not-present descriptors answer too), with ZF
/// set and clear beforehand.
#[test]
fn lar_lsl_verr_verw_follow_the_descriptor_type_and_privilege_rules() {
    let descs = query_descriptors();
    let first = 0x50u64;
    let table_end = first + 16 * descs.len() as u64;
    // An LDT descriptor whose second half lies beyond the GDT limit.
    let tail_sel = table_end;
    let gdt_limit = table_end + 7;
    let mut sels: Vec<u16> = Vec::new();
    for i in 0..descs.len() as u64 {
        for rpl in [0u16, 3] {
            sels.push((first + 16 * i) as u16 | rpl);
        }
    }
    sels.extend([
        0,
        3,
        tail_sel as u16,
        (gdt_limit + 1) as u16 & !7,
        0x0804,
        0x000c,
    ]);
    const SENTINEL: u64 = 0xdead_beef;
    for ia32e in [false, true] {
        for cpl in [0u16, 3] {
            for zf_before in [false, true] {
                let (mut m, _, _) = machine();
                let mut s = if ia32e {
                    long_mode_state(&m, 0x2000)
                } else {
                    protected_mode_state(&m, 0x2000)
                };
                for (i, d) in descs.iter().enumerate() {
                    load(&m, GDT + first + 16 * i as u64, &d.to_le_bytes());
                }
                load(
                    &m,
                    GDT + tail_sel,
                    &(0x0000_8200_0000_ffffu64).to_le_bytes(),
                );
                s.gdtr.limit = gdt_limit as u16;
                // No LDT: an LDT selector answers ZF = 0.
                s.ldtr = Segment {
                    unusable: true,
                    ..Segment::default()
                };
                let (code_sel, stack_sel) = if cpl == 3 { (0x23, 0x2b) } else { (0x08, 0x10) };
                s.seg[seg::CS] = Segment::flat(code_sel, true, false);
                s.seg[seg::CS].dpl = cpl as u8;
                s.seg[seg::CS].type_ |= 1;
                s.seg[seg::SS] = Segment::flat(stack_sel, false, false);
                s.seg[seg::SS].dpl = cpl as u8;
                s.rflags = 2 | (3 << 12);
                let (sel_at, out_at) = (0x10_0000u64, 0x11_0000u64);
                let bytes: Vec<u8> = sels.iter().flat_map(|v| v.to_le_bytes()).collect();
                load(&m, sel_at, &bytes);
                let code = asm(32, 0x2000, |a| {
                    let mut top = a.create_label();
                    a.set_label(&mut top).unwrap();
                    for (i, kind) in ["lar", "lsl", "verr", "verw"].into_iter().enumerate() {
                        let at = 8 * i as i32;
                        a.mov(eax, SENTINEL as u32).unwrap();
                        a.cmp(ebx, 0).unwrap();
                        match kind {
                            "lar" => a.lar(eax, word_ptr(esi)),
                            "lsl" => a.lsl(eax, word_ptr(esi)),
                            "verr" => a.verr(word_ptr(esi)),
                            _ => a.verw(word_ptr(esi)),
                        }
                        .unwrap();
                        a.pushfd().unwrap();
                        a.pop(edx).unwrap();
                        a.mov(dword_ptr(edi + at), eax).unwrap();
                        a.mov(dword_ptr(edi + at + 4), edx).unwrap();
                    }
                    a.add(esi, 2).unwrap();
                    a.add(edi, 32).unwrap();
                    a.dec(ecx).unwrap();
                    a.jnz(top).unwrap();
                    a.mov(edx, u32::from(STOP_PORT)).unwrap();
                    a.out(dx, al).unwrap();
                });
                load(&m, 0x2000, &code);
                s.gpr[6] = sel_at;
                s.gpr[7] = out_at;
                s.gpr[1] = sels.len() as u64;
                s.gpr[3] = u64::from(!zf_before);
                let mut c = cpu(&m, &s);
                let mode = format!(
                    "{} CPL {cpl} ZF before {zf_before}",
                    if ia32e {
                        "compatibility mode"
                    } else {
                        "protected mode"
                    }
                );
                assert_eq!(run(&mut c, &mut m, 1 << 16), Exit::StopRequested, "{mode}");
                let out = peek(&m, out_at, 32 * sels.len());
                let u32_at =
                    |o: usize| u64::from(u32::from_le_bytes(out[o..o + 4].try_into().unwrap()));
                let mut wrong = Vec::new();
                for (n, &sel) in sels.iter().enumerate() {
                    let off = u64::from(sel & 0xfff8);
                    let d = if sel & 4 != 0 || sel & 0xfffc == 0 || off + 7 > gdt_limit {
                        None
                    } else if off == tail_sel {
                        Some(0x0000_8200_0000_ffffu64)
                    } else {
                        Some(descs[((off - first) / 16) as usize])
                    };
                    for (i, kind) in ["lar", "lsl", "verr", "verw"].into_iter().enumerate() {
                        let want = d.and_then(|d| {
                            let hi = d >> 32;
                            let s_bit = hi & (1 << 12) != 0;
                            let t = ((hi >> 8) & 0xf) as u8;
                            let dpl = ((hi >> 13) & 3) as u16;
                            let conforming_code = s_bit && t & 0xc == 0xc;
                            let priv_ok = dpl >= cpl && dpl >= sel & 3;
                            let upper_in_limit = !ia32e || s_bit || off + 15 <= gdt_limit;
                            let (types, ok) = match kind {
                                "lar" => (if ia32e { LAR_IA32E } else { LAR_LEGACY }, true),
                                "lsl" => (if ia32e { LSL_IA32E } else { LSL_LEGACY }, true),
                                "verr" => (&[][..], s_bit && (t & 8 == 0 || t & 2 != 0)),
                                _ => (&[][..], s_bit && t & 8 == 0 && t & 2 != 0),
                            };
                            let type_ok = if kind.starts_with('l') {
                                s_bit || types.contains(&t)
                            } else {
                                ok
                            };
                            let allowed = (conforming_code && kind != "verw") || priv_ok;
                            (type_ok && allowed && upper_in_limit).then(|| match kind {
                                "lar" => hi & 0x00f0_ff00,
                                "lsl" => {
                                    let l = (d & 0xffff) | ((d >> 32) & 0xf_0000);
                                    if hi & (1 << 23) != 0 {
                                        (l << 12) | 0xfff
                                    } else {
                                        l
                                    }
                                }
                                _ => SENTINEL,
                            })
                        });
                        let got = u32_at(32 * n + 8 * i);
                        let got_zf = u32_at(32 * n + 8 * i + 4) & 0x40 != 0;
                        let want_val = want.unwrap_or(SENTINEL);
                        if got_zf != want.is_some() || got != want_val {
                            wrong.push(format!(
                                "{kind} {sel:#06x} (descriptor {:x?}): got ZF {got_zf} {got:#x}, want ZF {} {want_val:#x}",
                                d,
                                want.is_some()
                            ));
                        }
                    }
                }
                assert!(
                    wrong.is_empty(),
                    "{mode}: {} of {} queries wrong; first:\n{}",
                    wrong.len(),
                    4 * sels.len(),
                    wrong[..wrong.len().min(10)].join("\n")
                );
            }
        }
    }
}

/// ARPL raises the destination selector's RPL to the source's (ZF = 1) or leaves it (ZF =
/// 0), register and memory forms; only the low 16 bits and ZF change.
#[test]
fn arpl_adjusts_the_rpl_and_sets_zf() {
    // (dst, src, ZF before, dst after, ZF after)
    let cases: &[(u64, u64, bool, u64, bool)] = &[
        (0xaaaa_0010, 0x0003, false, 0xaaaa_0013, true),
        (0xaaaa_0011, 0xff02, false, 0xaaaa_0012, true),
        (0xaaaa_0013, 0x0001, true, 0xaaaa_0013, false),
        (0xaaaa_0012, 0x0002, true, 0xaaaa_0012, false),
        (0x0000_fff8, 0x0003, false, 0x0000_fffb, true),
    ];
    for &(dst, src, zf, want, want_zf) in cases {
        for memory in [false, true] {
            let (mut m, _, _) = machine();
            let code = asm(32, 0x2000, |a| {
                if memory {
                    a.arpl(word_ptr(0x3000u32), cx).unwrap();
                } else {
                    a.arpl(ax, cx).unwrap();
                }
                a.hlt().unwrap();
            });
            load(&m, 0x2000, &code);
            load(&m, 0x3000, &(dst as u32).to_le_bytes());
            let mut s = protected_mode_state(&m, 0x2000);
            s.gpr[0] = dst;
            s.gpr[1] = src;
            s.rflags = 2 | if zf { 0x40 } else { 0 } | 0x1;
            let mut c = cpu(&m, &s);
            assert_eq!(run(&mut c, &mut m, 10), Exit::Halted);
            let st = c.state().unwrap();
            let got = if memory {
                u64::from(u32::from_le_bytes(peek(&m, 0x3000, 4).try_into().unwrap()))
            } else {
                st.gpr[0]
            };
            let what = format!("arpl {dst:#x}, {src:#x} (memory {memory})");
            assert_eq!(got, want, "{what}");
            assert_eq!(st.rflags & 0x40 != 0, want_zf, "{what}: ZF");
            assert_eq!(st.rflags & 1, 1, "{what}: CF kept");
        }
    }
}

/// LAR, LSL, VERR, VERW and ARPL are not recognized in real mode: #UD (through the IVT).
#[test]
fn selector_queries_raise_ud_in_real_mode() {
    type Body = fn(&mut CodeAssembler) -> Result<(), IcedError>;
    let cases: [(&str, Body); 5] = [
        ("lar", |a| a.lar(ax, cx)),
        ("lsl", |a| a.lsl(ax, cx)),
        ("verr", |a| a.verr(cx)),
        ("verw", |a| a.verw(cx)),
        ("arpl", |a| a.arpl(ax, cx)),
    ];
    for (name, body) in cases {
        let (mut m, _, _) = machine();
        let handler = 0x3000u64;
        load(&m, handler, &asm(16, handler, |a| a.hlt().unwrap()));
        load(&m, 6 * 4, &((handler as u32) & 0xffff).to_le_bytes());
        let code = asm(16, 0x2000, |a| {
            body(a).unwrap();
            a.hlt().unwrap();
        });
        load(&m, 0x2000, &code);
        let s = real_mode_state(0x2000);
        let mut c = cpu(&m, &s);
        assert_eq!(run(&mut c, &mut m, 10), Exit::Halted, "{name}");
        let st = c.state().unwrap();
        assert_eq!(st.rip, handler + 1, "{name}: #UD handler");
        assert_eq!(
            peek(&m, 0x7000 - 6, 2),
            [0x00, 0x20],
            "{name}: the #UD pushed the RIP of the instruction"
        );
    }
}
