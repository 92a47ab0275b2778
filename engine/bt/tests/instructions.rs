//! Table-driven instruction tests: each case runs a snippet in 64-bit long mode on bt and
//! compares registers and arithmetic flags with architecturally defined results.

mod common;

use common::*;
use deja_machine::{Cpu, Exit};
use iced_x86::code_asm::*;

const CF: u64 = 1;
const PF: u64 = 4;
const AF: u64 = 0x10;
const ZF: u64 = 0x40;
const SF: u64 = 0x80;
const OF: u64 = 0x800;
const ARITH: u64 = CF | PF | AF | ZF | SF | OF;

type Snippet = fn(&mut CodeAssembler) -> Result<(), IcedError>;

struct Case {
    name: &'static str,
    code: Snippet,
    /// rax, rbx, rcx, rdx.
    init: [u64; 4],
    init_flags: u64,
    expect: [u64; 4],
    /// Expected arithmetic flags and which of them are defined.
    flags: u64,
    defined: u64,
}

fn run_case(c: &Case) {
    let (mut m, _, _) = machine();
    let code = asm(64, 0x20_0000, |a| {
        (c.code)(a).unwrap();
        a.hlt().unwrap();
    });
    load(&m, 0x20_0000, &code);
    let mut s = long_mode_state(&m, 0x20_0000);
    s.gpr[0] = c.init[0];
    s.gpr[3] = c.init[1];
    s.gpr[1] = c.init[2];
    s.gpr[2] = c.init[3];
    s.rflags = 2 | c.init_flags;
    s.gpr[4] = 0x8000;
    let mut cpu = cpu(&m, &s);
    let exit = run(&mut cpu, &mut m, 1000);
    assert_eq!(exit, Exit::Halted, "{}: did not reach HLT", c.name);
    let st = cpu.state().unwrap();
    let got = [st.gpr[0], st.gpr[3], st.gpr[1], st.gpr[2]];
    assert_eq!(
        got, c.expect,
        "{}: registers rax/rbx/rcx/rdx {:x?} != expected {:x?}",
        c.name, got, c.expect
    );
    assert_eq!(
        st.rflags & c.defined,
        c.flags & c.defined,
        "{}: flags {:#x} != expected {:#x} (mask {:#x})",
        c.name,
        st.rflags & ARITH,
        c.flags,
        c.defined
    );
}

#[test]
fn integer_instructions_match_the_architecture() {
    let cases = [
        Case {
            name: "add32 signed overflow",
            code: |a| a.add(eax, ebx),
            init: [0x7fff_ffff, 1, 0, 0],
            init_flags: 0,
            expect: [0x8000_0000, 1, 0, 0],
            flags: OF | SF | AF | PF,
            defined: ARITH,
        },
        Case {
            name: "add8 carry and zero",
            code: |a| a.add(al, bl),
            init: [0x1234_56ff, 1, 0, 0],
            init_flags: 0,
            expect: [0x1234_5600, 1, 0, 0],
            flags: CF | ZF | AF | PF,
            defined: ARITH,
        },
        Case {
            name: "sub64 borrow",
            code: |a| a.sub(rax, rbx),
            init: [1, 2, 0, 0],
            init_flags: 0,
            expect: [u64::MAX, 2, 0, 0],
            flags: CF | SF | AF | PF,
            defined: ARITH,
        },
        Case {
            name: "adc with carry in",
            code: |a| a.adc(eax, ebx),
            init: [0xffff_ffff, 0, 0, 0],
            init_flags: CF,
            expect: [0, 0, 0, 0],
            flags: CF | ZF | AF | PF,
            defined: ARITH,
        },
        Case {
            name: "sbb with borrow in",
            code: |a| a.sbb(eax, ebx),
            init: [5, 5, 0, 0],
            init_flags: CF,
            expect: [0xffff_ffff, 5, 0, 0],
            flags: CF | SF | AF | PF,
            defined: ARITH,
        },
        Case {
            name: "inc keeps CF, sets OF",
            code: |a| a.inc(ax),
            init: [0x7fff, 0, 0, 0],
            init_flags: CF,
            expect: [0x8000, 0, 0, 0],
            flags: CF | OF | SF | AF | PF,
            defined: ARITH,
        },
        Case {
            name: "dec to zero",
            code: |a| a.dec(ecx),
            init: [0, 0, 1, 0],
            init_flags: 0,
            expect: [0, 0, 0, 0],
            flags: ZF | PF,
            defined: ARITH,
        },
        Case {
            name: "neg of minimum",
            code: |a| a.neg(bl),
            init: [0, 0x80, 0, 0],
            init_flags: 0,
            expect: [0, 0x80, 0, 0],
            flags: CF | OF | SF,
            defined: CF | OF | SF | ZF,
        },
        Case {
            name: "xor clears CF/OF, 32-bit write zero-extends",
            code: |a| a.xor(eax, eax),
            init: [0xdead_beef_0000_0001, 0, 0, 0],
            init_flags: CF | OF,
            expect: [0, 0, 0, 0],
            flags: ZF | PF,
            defined: CF | OF | ZF | SF | PF,
        },
        Case {
            name: "cmp sets flags without writing",
            code: |a| a.cmp(rax, rbx),
            init: [3, 3, 0, 0],
            init_flags: 0,
            expect: [3, 3, 0, 0],
            flags: ZF | PF,
            defined: ARITH,
        },
        Case {
            name: "shl by 1 sets CF and OF",
            code: |a| a.shl(al, 1),
            init: [0x40c0, 0, 0, 0],
            init_flags: 0,
            expect: [0x4080, 0, 0, 0],
            flags: CF | SF,
            defined: CF | OF | SF | ZF | PF,
        },
        Case {
            name: "shr by cl",
            code: |a| a.shr(eax, cl),
            init: [0x8000_0001, 0, 1, 0],
            init_flags: 0,
            expect: [0x4000_0000, 0, 1, 0],
            flags: CF | OF | PF,
            defined: CF | OF | SF | ZF | PF,
        },
        Case {
            name: "sar keeps sign",
            code: |a| a.sar(bx, 4),
            init: [0, 0x8010, 0, 0],
            init_flags: 0,
            expect: [0, 0xf801, 0, 0],
            flags: SF,
            defined: CF | SF | ZF | PF,
        },
        Case {
            name: "shift by zero leaves flags",
            code: |a| a.shl(eax, cl),
            init: [5, 0, 0, 0],
            init_flags: CF | ZF,
            expect: [5, 0, 0, 0],
            flags: CF | ZF,
            defined: ARITH,
        },
        Case {
            name: "rol through the top",
            code: |a| a.rol(al, 1),
            init: [0x81, 0, 0, 0],
            init_flags: 0,
            expect: [0x03, 0, 0, 0],
            flags: CF | OF,
            defined: CF | OF,
        },
        Case {
            name: "rcr with carry in",
            code: |a| a.rcr(al, 1),
            init: [0x01, 0, 0, 0],
            init_flags: CF,
            expect: [0x80, 0, 0, 0],
            flags: CF | OF,
            defined: CF | OF,
        },
        Case {
            name: "mul32 high half",
            code: |a| a.mul(ebx),
            init: [0x8000_0000, 4, 0, 0x55],
            init_flags: 0,
            expect: [0, 4, 0, 2],
            flags: CF | OF,
            defined: CF | OF,
        },
        Case {
            name: "imul 3-operand overflow",
            code: |a| a.imul_3(ecx, ebx, 0x10000),
            init: [0, 0x10000, 0, 0],
            init_flags: 0,
            expect: [0, 0x10000, 0, 0],
            flags: CF | OF,
            defined: CF | OF,
        },
        Case {
            name: "idiv rounds toward zero",
            code: |a| a.idiv(ebx),
            init: [(-7i32) as u32 as u64, 2, 0, 0xffff_ffff],
            init_flags: 0,
            expect: [(-3i32) as u32 as u64, 2, 0, (-1i32) as u32 as u64],
            flags: 0,
            defined: 0,
        },
        Case {
            name: "div64",
            code: |a| a.div(rbx),
            init: [0, 10, 0, 1],
            init_flags: 0,
            expect: [(1u128 << 64).div_euclid(10) as u64, 10, 0, 6],
            flags: 0,
            defined: 0,
        },
        Case {
            name: "bsf and bsr",
            code: |a| {
                a.bsf(ecx, eax)?;
                a.bsr(edx, eax)
            },
            init: [0x0100_1000, 0, 0, 0],
            init_flags: ZF,
            expect: [0x0100_1000, 0, 12, 24],
            flags: 0,
            defined: ZF,
        },
        Case {
            // deja's CPUID has no BMI1: F3 0F BC is BSF (fp.rs checks TZCNT with BMI1).
            name: "tzcnt of zero without BMI1 is BSF: destination kept, ZF set",
            code: |a| a.tzcnt(ecx, ebx),
            init: [0, 0, 7, 0],
            init_flags: 0,
            expect: [0, 0, 7, 0],
            flags: ZF,
            defined: ZF,
        },
        Case {
            name: "popcnt",
            code: |a| a.popcnt(rcx, rax),
            init: [0xf0f0, 0, 0, 0],
            init_flags: CF | OF,
            expect: [0xf0f0, 0, 8, 0],
            flags: 0,
            defined: ARITH,
        },
        Case {
            name: "bts sets CF from old bit",
            code: |a| a.bts(eax, 3),
            init: [0x8, 0, 0, 0],
            init_flags: 0,
            expect: [0x8, 0, 0, 0],
            flags: CF,
            defined: CF,
        },
        Case {
            name: "btr with register offset",
            code: |a| a.btr(rax, rcx),
            init: [1 << 40, 0, 40, 0],
            init_flags: 0,
            expect: [0, 0, 40, 0],
            flags: CF,
            defined: CF,
        },
        Case {
            name: "cmovcc taken and not taken",
            code: |a| {
                a.cmp(eax, ebx)?;
                a.cmovb(ecx, eax)?;
                a.cmova(edx, eax)
            },
            init: [1, 2, 0xffff_ffff_0000_0000, 9],
            init_flags: 0,
            expect: [1, 2, 1, 9],
            flags: CF | SF | AF | PF,
            defined: ARITH,
        },
        Case {
            name: "setcc after sub",
            code: |a| {
                a.sub(eax, ebx)?;
                a.setl(cl)?;
                a.setg(dl)
            },
            init: [(-5i64) as u64, 3, 0x100, 0x200],
            init_flags: 0,
            expect: [0xffff_fff8, 3, 0x101, 0x200],
            flags: SF,
            defined: SF | ZF | CF | OF,
        },
        Case {
            name: "cmpxchg success and failure",
            code: |a| {
                a.cmpxchg(ecx, ebx)?;
                a.cmpxchg(edx, ebx)
            },
            init: [5, 7, 5, 9],
            init_flags: 0,
            expect: [9, 7, 7, 9],
            flags: CF | SF | PF | AF,
            defined: ZF | CF,
        },
        Case {
            name: "xadd",
            code: |a| a.xadd(eax, ebx),
            init: [3, 4, 0, 0],
            init_flags: 0,
            expect: [7, 3, 0, 0],
            flags: 0,
            defined: ARITH,
        },
        Case {
            name: "bswap and movbe-free byte swap",
            code: |a| a.bswap(eax),
            init: [0x1122_3344, 0, 0, 0],
            init_flags: 0,
            expect: [0x4433_2211, 0, 0, 0],
            flags: 0,
            defined: 0,
        },
        Case {
            name: "lahf/sahf round trip",
            code: |a| {
                a.stc()?;
                a.lahf()?;
                a.mov(bl, ah)?;
                a.clc()?;
                a.sahf()
            },
            init: [0, 0, 0, 0],
            init_flags: 0,
            expect: [0x0300, 0x03, 0, 0],
            flags: CF,
            defined: CF,
        },
        Case {
            name: "cdq and cqo",
            code: |a| {
                a.cdq()?;
                a.mov(rbx, rdx)?;
                a.cqo()
            },
            init: [0x8000_0000, 0, 0, 0],
            init_flags: 0,
            expect: [0x8000_0000, 0xffff_ffff, 0, 0],
            flags: 0,
            defined: 0,
        },
        Case {
            name: "push/pop and call/ret",
            code: |a| {
                let mut f = a.create_label();
                let mut end = a.create_label();
                a.push(rax)?;
                a.call(f)?;
                a.pop(rdx)?;
                a.jmp(end)?;
                a.set_label(&mut f)?;
                a.mov(ecx, 42)?;
                a.ret()?;
                a.set_label(&mut end)?;
                a.nop()
            },
            init: [0x77, 0, 0, 0],
            init_flags: 0,
            expect: [0x77, 0, 42, 0x77],
            flags: 0,
            defined: 0,
        },
        Case {
            name: "loop counts down",
            code: |a| {
                let mut top = a.create_label();
                a.set_label(&mut top)?;
                a.add(eax, 2)?;
                a.loop_(top)
            },
            init: [0, 0, 5, 0],
            init_flags: 0,
            expect: [10, 0, 0, 0],
            flags: 0,
            defined: 0,
        },
        Case {
            name: "daa after bcd add",
            code: |a| {
                a.add(al, bl)?;
                a.daa()
            },
            init: [0x19, 0x28, 0, 0],
            init_flags: 0,
            expect: [0x47, 0x28, 0, 0],
            flags: AF,
            defined: CF | AF | ZF | SF,
        },
        Case {
            name: "shld",
            code: |a| a.shld(eax, ebx, 4),
            init: [0x1234_5678, 0xf000_0000, 0, 0],
            init_flags: 0,
            expect: [0x2345_678f, 0xf000_0000, 0, 0],
            flags: CF,
            defined: CF | ZF | SF,
        },
    ];
    // Cases in 32-bit mode only (BCD) run in long mode's compatibility segment elsewhere;
    // DAA is invalid in 64-bit mode, so it must raise #UD here.
    for c in &cases {
        if c.name.starts_with("daa") {
            continue;
        }
        run_case(c);
    }
}

#[test]
fn unimplemented_instruction_raises_ud_and_is_counted() {
    let (mut m, _, _) = machine();
    // IDT entry 6 → a handler that halts.
    let handler = 0x20_1000u64;
    load(&m, handler, &asm(64, handler, |a| a.hlt().unwrap()));
    let gate = gate64(handler, 0x18, 0);
    load(&m, IDT + 6 * 16, &gate);
    let code = asm(64, 0x20_0000, |a| {
        a.aesenc(xmm0, xmm1).unwrap();
        a.hlt().unwrap();
    });
    load(&m, 0x20_0000, &code);
    let s = long_mode_state(&m, 0x20_0000);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 100), Exit::Halted);
    let st = c.state().unwrap();
    assert_eq!(st.rip, handler + 1);
    let stats = c.stats();
    assert_eq!(stats.get("bt.unimplemented.aesenc"), 1, "{stats:?}");
    assert_eq!(stats.get("bt.exceptions.6"), 1);
}

#[test]
fn cache_line_instructions_check_the_address_as_a_load_does() {
    // (case, the instruction on [RAX], RAX, expected vector and error code; None: runs).
    // CLFLUSH, CLFLUSHOPT and CLWB fault on the address as a one-byte load would: #PF (not
    // present, supervisor read: error 0, CR2 = the address) past the mapped gigabyte,
    // #GP(0) for a non-canonical address, and nothing for a mapped line.
    let clflush: Snippet = |a| a.clflush(byte_ptr(rax));
    let clflushopt: Snippet = |a| a.clflushopt(byte_ptr(rax));
    let clwb: Snippet = |a| a.clwb(byte_ptr(rax));
    /// A vector and its error code.
    type Fault = Option<(u8, u64)>;
    let cases: [(&str, Snippet, u64, Fault); 7] = [
        ("clflush mapped", clflush, 0x30_0040, None),
        ("clflushopt mapped", clflushopt, 0x30_0040, None),
        ("clwb mapped", clwb, 0x30_0040, None),
        ("clflush unmapped", clflush, 0x4000_0040, Some((14, 0))),
        (
            "clflushopt unmapped",
            clflushopt,
            0x4000_0040,
            Some((14, 0)),
        ),
        ("clwb unmapped", clwb, 0x4000_0040, Some((14, 0))),
        ("clwb non-canonical", clwb, 0x8000_0000_0000, Some((13, 0))),
    ];
    for (name, snip, addr, want) in cases {
        let (mut m, _, _) = machine();
        let handler = 0x20_1000u64;
        for v in [13u64, 14] {
            let h = handler + 16 * v;
            load(&m, h, &asm(64, h, |a| a.hlt().unwrap()));
            load(&m, IDT + v * 16, &gate64(h, 0x18, 0));
        }
        let code = asm(64, 0x20_0000, |a| {
            a.mov(rax, addr).unwrap();
            snip(a).unwrap();
            a.hlt().unwrap();
        });
        load(&m, 0x20_0000, &code);
        let mut s = long_mode_state(&m, 0x20_0000);
        s.gpr[4] = 0x8000;
        let mut c = cpu(&m, &s);
        assert_eq!(run(&mut c, &mut m, 100), Exit::Halted, "{name}");
        let st = c.state().unwrap();
        match want {
            None => assert_eq!(st.rip, 0x20_0000 + code.len() as u64, "{name}: runs"),
            Some((v, err)) => {
                assert_eq!(st.rip, handler + 16 * u64::from(v) + 1, "{name}: vector");
                let frame = peek(&m, st.gpr[4], 16);
                assert_eq!(
                    u64::from_le_bytes(frame[0..8].try_into().unwrap()),
                    err,
                    "{name}: error code"
                );
                assert_eq!(
                    u64::from_le_bytes(frame[8..16].try_into().unwrap()),
                    0x20_000a,
                    "{name}: the faulting instruction's RIP"
                );
                if v == 14 {
                    assert_eq!(st.cr2, addr, "{name}: CR2");
                }
            }
        }
    }
}
