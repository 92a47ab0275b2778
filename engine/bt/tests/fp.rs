//! Table-driven x87, MMX and SSE/SSE2 tests on bt: exact results (80-bit values, rounding and
//! precision control, status words, MXCSR flags) and every FP fault (#NM, #UD, #MF, #XM,
//! #GP for misalignment) with where it is taken. The values are the architecture's (the
//! SDM's rounding rules applied by hand), not the host's answers.

mod common;

use common::*;
use deja_machine::cpu::CpuState;
use deja_machine::{Cpu, CpuidTable, Exit};
use iced_x86::code_asm::*;

const CODE: u64 = 0x20_0000;
const DATA: u64 = 0x30_0000;
/// Vector `v`'s handler is a HLT at `HANDLERS + 16 * v`.
const HANDLERS: u64 = 0x21_0000;
const STACK: u64 = 0x8000;

/// How a snippet ended.
struct Outcome {
    state: CpuState,
    data: Vec<u8>,
    /// The exception vector taken, if any, and the RIP it was raised at.
    fault: Option<(u8, u64)>,
    /// RIP of each instruction of the snippet, in order.
    rips: Vec<u64>,
    stats: deja_machine::EngineStats,
}

/// Runs `code` (then HLT) in 64-bit ring 0 with R14 = the data page (filled with `data`),
/// after `setup` adjusts the initial state.
fn go(
    data: &[u8],
    setup: impl FnOnce(&mut CpuState),
    code: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Outcome {
    go_with(&CpuidTable::deja_default(), data, setup, code)
}

/// [`go`] on a machine whose CPUID table is `cpuid`.
fn go_with(
    cpuid: &CpuidTable,
    data: &[u8],
    setup: impl FnOnce(&mut CpuState),
    code: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Outcome {
    let (mut m, _, _) = machine();
    m.config.cpuid = cpuid.clone();
    for v in [0u8, 6, 7, 13, 16, 19] {
        let h = HANDLERS + 16 * u64::from(v);
        load(&m, h, &asm(64, h, |a| a.hlt().unwrap()));
        load(&m, IDT + u64::from(v) * 16, &gate64(h, 0x18, 0));
    }
    let bytes = asm(64, CODE, |a| {
        code(a).unwrap();
        a.hlt().unwrap();
    });
    let rips = iced_x86::Decoder::with_ip(64, &bytes, CODE, iced_x86::DecoderOptions::NONE)
        .into_iter()
        .map(|i| i.ip())
        .collect();
    load(&m, CODE, &bytes);
    load(&m, DATA, data);
    let mut s = long_mode_state(&m, CODE);
    s.gpr[14] = DATA;
    s.gpr[4] = STACK;
    s.cr4 |= 0x600;
    setup(&mut s);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 10_000), Exit::Halted);
    let state = c.state().unwrap();
    let fault = (state.rip >= HANDLERS && state.rip < HANDLERS + 0x200).then(|| {
        let v = ((state.rip - 1 - HANDLERS) / 16) as u8;
        let frame = peek(&m, state.gpr[4], 16);
        let with_error = v == 13;
        let at = if with_error { 8 } else { 0 };
        (v, u64::from_le_bytes(frame[at..at + 8].try_into().unwrap()))
    });
    Outcome {
        state,
        data: peek(&m, DATA, 4096),
        fault,
        rips,
        stats: c.stats(),
    }
}

fn u64_at(d: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(d[at..at + 8].try_into().unwrap())
}

fn u16_at(d: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([d[at], d[at + 1]])
}

/// (mantissa, sign|exponent) of an 80-bit value stored at `at`.
fn f80_at(d: &[u8], at: usize) -> (u64, u16) {
    (u64_at(d, at), u16_at(d, at + 8))
}

fn f64_data(vals: &[f64]) -> Vec<u8> {
    let mut d: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    d.resize(512, 0);
    d
}

/// One x87 computation: FCW, the snippet, the expected 80-bit result (stored by FSTP m80
/// at [r14+0x100]) and the expected status-word exception and condition bits.
struct X87Case {
    name: &'static str,
    fcw: u16,
    inputs: &'static [f64],
    code: fn(&mut CodeAssembler) -> Result<(), IcedError>,
    mant: u64,
    sexp: u16,
    /// Expected FSW & 0x47ff (exceptions, SF, C0-C2; not TOP, not C3... C3 is 0x4000).
    fsw: u16,
}

#[test]
fn x87_arithmetic_rounds_with_the_control_word() {
    let cases = [
        X87Case {
            name: "fsqrt 2, extended, nearest",
            fcw: 0x37f,
            inputs: &[2.0],
            code: |a| {
                a.fld(qword_ptr(r14))?;
                a.fsqrt()
            },
            mant: 0xb504_f333_f9de_6484,
            sexp: 0x3fff,
            fsw: 0x20, // PE, rounded down: C1 = 0
        },
        X87Case {
            name: "fsqrt 2, extended, up",
            fcw: 0xb7f,
            inputs: &[2.0],
            code: |a| {
                a.fld(qword_ptr(r14))?;
                a.fsqrt()
            },
            mant: 0xb504_f333_f9de_6485,
            sexp: 0x3fff,
            fsw: 0x220, // PE, rounded up: C1
        },
        X87Case {
            name: "fsqrt 2, single precision",
            fcw: 0x07f,
            inputs: &[2.0],
            code: |a| {
                a.fld(qword_ptr(r14))?;
                a.fsqrt()
            },
            mant: 0xb504_f300_0000_0000,
            sexp: 0x3fff,
            fsw: 0x20,
        },
        X87Case {
            name: "1/3, double precision",
            fcw: 0x27f,
            inputs: &[1.0, 3.0],
            code: |a| {
                a.fld(qword_ptr(r14))?;
                a.fdiv(qword_ptr(r14 + 8))
            },
            mant: 0xaaaa_aaaa_aaaa_a800,
            sexp: 0x3ffd,
            fsw: 0x20,
        },
        X87Case {
            name: "1/3, extended, toward zero",
            fcw: 0xf7f,
            inputs: &[1.0, 3.0],
            code: |a| {
                a.fld(qword_ptr(r14))?;
                a.fdiv(qword_ptr(r14 + 8))
            },
            mant: 0xaaaa_aaaa_aaaa_aaaa,
            sexp: 0x3ffd,
            fsw: 0x20,
        },
        X87Case {
            name: "1/0 masked: +inf, ZE",
            fcw: 0x37f,
            inputs: &[1.0, 0.0],
            code: |a| {
                a.fld(qword_ptr(r14))?;
                a.fdiv(qword_ptr(r14 + 8))
            },
            mant: 1 << 63,
            sexp: 0x7fff,
            fsw: 0x04,
        },
        X87Case {
            name: "fxtract 12: significand 1.5 on top",
            fcw: 0x37f,
            inputs: &[12.0],
            code: |a| {
                a.fld(qword_ptr(r14))?;
                a.fxtract()
            },
            mant: 0xc000_0000_0000_0000,
            sexp: 0x3fff,
            fsw: 0,
        },
        X87Case {
            name: "fscale 1.5 * 2^3",
            fcw: 0x37f,
            inputs: &[3.0, 1.5],
            code: |a| {
                a.fld(qword_ptr(r14))?;
                a.fld(qword_ptr(r14 + 8))?;
                a.fscale()
            },
            mant: 0xc000_0000_0000_0000,
            sexp: 0x4002,
            fsw: 0,
        },
        X87Case {
            name: "fprem 10 mod 3 = 1, quotient 3 in C1 C3 C0",
            fcw: 0x37f,
            inputs: &[3.0, 10.0],
            code: |a| {
                a.fld(qword_ptr(r14))?;
                a.fld(qword_ptr(r14 + 8))?;
                a.fprem()
            },
            mant: 1 << 63,
            sexp: 0x3fff,
            fsw: 0x4200, // C3 = q1, C1 = q0, C0 = q2 = 0, C2 = 0 (complete)
        },
        X87Case {
            name: "nine pushes: stack overflow gives the indefinite",
            fcw: 0x37f,
            inputs: &[],
            code: |a| {
                for _ in 0..9 {
                    a.fld1()?;
                }
                Ok(())
            },
            mant: 0xc000_0000_0000_0000,
            sexp: 0xffff,
            fsw: 0x241, // IE, SF, C1 = overflow
        },
        X87Case {
            name: "fldpi, extended nearest",
            fcw: 0x37f,
            inputs: &[],
            code: |a| a.fldpi(),
            mant: 0xc90f_daa2_2168_c235,
            sexp: 0x4000,
            fsw: 0,
        },
        X87Case {
            name: "fchs fabs fchs of 2",
            fcw: 0x37f,
            inputs: &[2.0],
            code: |a| {
                a.fld(qword_ptr(r14))?;
                a.fchs()?;
                a.fabs()?;
                a.fchs()
            },
            mant: 1 << 63,
            sexp: 0xc000,
            fsw: 0,
        },
        X87Case {
            name: "frndint 2.5 nearest-even",
            fcw: 0x37f,
            inputs: &[2.5],
            code: |a| {
                a.fld(qword_ptr(r14))?;
                a.frndint()
            },
            mant: 1 << 63,
            sexp: 0x4000,
            fsw: 0x20,
        },
    ];
    for c in &cases {
        let data = f64_data(c.inputs);
        let o = go(
            &data,
            |s| s.fpu.fcw = c.fcw,
            |a| {
                (c.code)(a)?;
                a.fnstsw(word_ptr(r14 + 0xf0))?;
                a.fstp(tword_ptr(r14 + 0x100))
            },
        );
        assert_eq!(o.fault, None, "{}: faulted", c.name);
        let (mant, sexp) = f80_at(&o.data, 0x100);
        assert_eq!(
            (mant, sexp),
            (c.mant, c.sexp),
            "{}: result {mant:#x} {sexp:#x}",
            c.name
        );
        let fsw = u16_at(&o.data, 0xf0);
        assert_eq!(fsw & 0x47ff, c.fsw, "{}: fsw {fsw:#x}", c.name);
    }
}

#[test]
fn x87_integer_and_bcd_stores_round_with_the_control_word() {
    // (fcw, value, FISTP m32 result)
    let cases: [(u16, f64, i32); 6] = [
        (0x37f, 2.5, 2),
        (0x37f, 3.5, 4),
        (0x77f, 2.5, 2),         // down
        (0xb7f, 2.1, 3),         // up
        (0xf7f, -2.9, -2),       // toward zero
        (0x37f, 3e10, i32::MIN), // out of range: the integer indefinite, IE
    ];
    for (fcw, v, want) in cases {
        let o = go(
            &f64_data(&[v]),
            |s| s.fpu.fcw = fcw,
            |a| {
                a.fld(qword_ptr(r14))?;
                a.fistp(dword_ptr(r14 + 0x10))
            },
        );
        let got = i32::from_le_bytes(o.data[0x10..0x14].try_into().unwrap());
        assert_eq!(got, want, "fistp {v} with fcw {fcw:#x}");
        assert_eq!(o.state.fpu.fsw & 1, u16::from(v > 1e9), "IE for {v}");
    }
    // FILD / FBSTP: -1234567 in packed BCD; FBLD reads it back.
    let mut d = vec![0u8; 512];
    d[..4].copy_from_slice(&(-1_234_567i32).to_le_bytes());
    let o = go(
        &d,
        |_| {},
        |a| {
            a.fild(dword_ptr(r14))?;
            a.fbstp(tword_ptr(r14 + 0x20))?;
            a.fbld(tword_ptr(r14 + 0x20))?;
            a.fistp(qword_ptr(r14 + 0x40))
        },
    );
    assert_eq!(
        &o.data[0x20..0x2a],
        &[0x67, 0x45, 0x23, 0x01, 0, 0, 0, 0, 0, 0x80]
    );
    assert_eq!(
        i64::from_le_bytes(o.data[0x40..0x48].try_into().unwrap()),
        -1_234_567
    );
}

#[test]
fn x87_compares_set_condition_codes_and_eflags() {
    const CF: u64 = 1;
    const PF: u64 = 4;
    const ZF: u64 = 0x40;
    // (st0, st1, FCOMI flags, FCOM C3 C2 C0 in FSW)
    let cases: [(f64, f64, u64, u16); 4] = [
        (2.0, 1.0, 0, 0),
        (1.0, 2.0, CF, 0x0100),
        (1.0, 1.0, ZF, 0x4000),
        (f64::NAN, 1.0, ZF | PF | CF, 0x4500),
    ];
    for (x, y, flags, cc) in cases {
        let o = go(
            &f64_data(&[y, x]),
            |s| s.rflags = 2 | 0x8d5,
            |a| {
                a.fld(qword_ptr(r14))?;
                a.fld(qword_ptr(r14 + 8))?;
                a.fucomi(st0, st1)?;
                a.fucom(st0, st1)?;
                a.fnstsw(ax)
            },
        );
        assert_eq!(o.state.rflags & 0x8d5, flags, "fucomi {x} {y}");
        assert_eq!(o.state.gpr[0] as u16 & 0x4500, cc, "fucom {x} {y}");
    }
    // FXAM: an empty register, negative zero, a denormal-free normal.
    let o = go(
        &f64_data(&[-0.0]),
        |_| {},
        |a| {
            a.fxam()?;
            a.fnstsw(word_ptr(r14 + 0x10))?;
            a.fld(qword_ptr(r14))?;
            a.fxam()?;
            a.fnstsw(word_ptr(r14 + 0x12))
        },
    );
    assert_eq!(u16_at(&o.data, 0x10) & 0x4700, 0x4100, "empty: C3 C0");
    assert_eq!(u16_at(&o.data, 0x12) & 0x4700, 0x4200, "-0: C3, C1 = sign");
}

#[test]
fn fxsave_carries_the_x87_and_mmx_state() {
    let o = go(
        &f64_data(&[1.5]),
        |_| {},
        |a| {
            a.fld1()?;
            a.fld(qword_ptr(r14))?;
            a.fxsave(ptr(r14 + 0x100))?;
            a.movq(mm2, qword_ptr(r14))?;
            a.fxsave(ptr(r14 + 0x400))
        },
    );
    let d = &o.data;
    // Two pushes: TOP = 6, physical registers 6 and 7 in use (abridged tag 0xc0).
    assert_eq!(u16_at(d, 0x102) >> 11 & 7, 6);
    assert_eq!(d[0x104], 0xc0);
    assert_eq!(f80_at(d, 0x100 + 32), (0xc000_0000_0000_0000, 0x3fff));
    assert_eq!(f80_at(d, 0x100 + 48), (1 << 63, 0x3fff));
    // An MMX instruction: TOP = 0, all tags valid, MM2 = physical register 2 with the
    // exponent field set to ones.
    let fx2 = 0x400;
    assert_eq!(u16_at(d, fx2 + 2) >> 11 & 7, 0);
    assert_eq!(d[fx2 + 4], 0xff);
    assert_eq!(u64_at(d, fx2 + 32 + 2 * 16), 1.5f64.to_bits());
    assert_eq!(u16_at(d, fx2 + 32 + 2 * 16 + 8), 0xffff);
    // The register file moved with TOP: old ST0 (physical 6) is now ST6.
    assert_eq!(
        f80_at(d, fx2 + 32 + 6 * 16),
        (0xc000_0000_0000_0000, 0x3fff)
    );
    // EMMS empties the tags.
    let o = go(
        &f64_data(&[1.5]),
        |_| {},
        |a| {
            a.movq(mm2, qword_ptr(r14))?;
            a.emms()
        },
    );
    assert_eq!(o.state.fpu.ftw, 0);
}

#[test]
fn fnstenv_and_fldenv_round_trip_with_the_guest_pointers() {
    let o = go(
        &f64_data(&[2.0]),
        |s| s.fpu.fcw = 0x27f,
        |a| {
            a.fld(qword_ptr(r14))?;
            a.fsqrt()?;
            a.fnstenv(ptr(r14 + 0x100))?;
            a.fldenv(ptr(r14 + 0x100))
        },
    );
    let d = &o.data;
    assert_eq!(u16_at(d, 0x100), 0x27f, "FCW as it was");
    assert_eq!(
        o.state.fpu.fcw, 0x27f,
        "FLDENV reloads it (FNSTENV masked all)"
    );
    // Tag word: ST0 (physical 7) valid, the rest empty.
    assert_eq!(u16_at(d, 0x108), 0x3fff);
    // FIP = FSQRT's address, FOP = D9 FA -> 0x1fa; FDP = the FLD's operand offset.
    assert_eq!(
        u64::from(u32::from_le_bytes(d[0x10c..0x110].try_into().unwrap())),
        o.rips[1]
    );
    assert_eq!(u16_at(d, 0x112), 0x1fa);
    assert_eq!(
        u64::from(u32::from_le_bytes(d[0x114..0x118].try_into().unwrap())),
        DATA
    );
}

#[test]
fn fnsave_and_frstor_keep_registers_and_reinitialize() {
    let o = go(
        &f64_data(&[3.0]),
        |_| {},
        |a| {
            a.fld(qword_ptr(r14))?;
            a.fld1()?;
            a.fnsave(ptr(r14 + 0x100))?;
            a.fnstsw(word_ptr(r14 + 0x1f0))?;
            a.frstor(ptr(r14 + 0x100))?;
            a.faddp(st1, st0)?;
            a.fstp(qword_ptr(r14 + 0x1f8))
        },
    );
    assert_eq!(
        u16_at(&o.data, 0x1f0),
        0,
        "FNSAVE leaves an initialized FPU"
    );
    assert_eq!(
        f64::from_le_bytes(o.data[0x1f8..0x200].try_into().unwrap()),
        4.0
    );
    // The saved ST0 is 1.0, ST1 is 3.0.
    assert_eq!(f80_at(&o.data, 0x100 + 28), (1 << 63, 0x3fff));
    assert_eq!(f80_at(&o.data, 0x100 + 38), (0xc000_0000_0000_0000, 0x4000));
}

#[test]
fn sse_rounds_and_flags_with_mxcsr() {
    // (mxcsr, a, b, op, expected bits, expected new flags)
    type Op = fn(&mut CodeAssembler) -> Result<(), IcedError>;
    let one_plus_tiny: Op = |a| a.addss(xmm0, xmm1);
    let div: Op = |a| a.divss(xmm0, xmm1);
    let mul: Op = |a| a.mulss(xmm0, xmm1);
    let min: Op = |a| a.minss(xmm0, xmm1);
    let cases: [(u32, f32, f32, Op, u32, u32); 7] = [
        (
            0x1f80,
            1.0,
            2f32.powi(-30),
            one_plus_tiny,
            1f32.to_bits(),
            0x20,
        ),
        (
            0x1f80 | 0x4000,
            1.0,
            2f32.powi(-30),
            one_plus_tiny,
            0x3f80_0001,
            0x20,
        ),
        (0x1f80, 1.0, 0.0, div, f32::INFINITY.to_bits(), 0x04),
        (0x1f80, 0.0, 0.0, div, 0xffc0_0000, 0x01),
        // 2^-70 squared underflows: a denormal result... flushed to +0 with FTZ.
        (
            0x1f80 | 0x8000,
            2f32.powi(-70),
            2f32.powi(-70),
            mul,
            0,
            0x30,
        ),
        // DAZ: a denormal input is read as zero.
        (0x1f80 | 0x40, f32::from_bits(1), 1.0, mul, 0, 0),
        // MINSS returns the second operand when either is NaN.
        (0x1f80, f32::NAN, 5.0, min, 5f32.to_bits(), 0x01),
    ];
    for (mx, x, y, op, want, flags) in cases {
        let o = go(
            &[0; 512],
            |s| {
                s.fpu.mxcsr = mx;
                s.fpu.xmm[0][..4].copy_from_slice(&x.to_le_bytes());
                s.fpu.xmm[1][..4].copy_from_slice(&y.to_le_bytes());
            },
            op,
        );
        assert_eq!(o.fault, None);
        let got = u32::from_le_bytes(o.state.fpu.xmm[0][..4].try_into().unwrap());
        assert_eq!(got, want, "mxcsr {mx:#x}: {x} op {y} = {got:#x}");
        assert_eq!(o.state.fpu.mxcsr, mx | flags, "flags for {x} op {y}");
    }
}

#[test]
fn sse_conversions_round_with_mxcsr() {
    // (mxcsr, value, CVTSD2SI r32, CVTTSD2SI r32)
    let cases: [(u32, f64, i32, i32); 5] = [
        (0x1f80, 2.5, 2, 2),
        (0x1f80, -3.5, -4, -3),
        (0x3f80, 2.5, 2, 2),
        (0x5f80, 2.1, 3, 2),
        (0x1f80, 1e20, i32::MIN, i32::MIN),
    ];
    for (mx, v, rounded, truncated) in cases {
        let o = go(
            &f64_data(&[v]),
            |s| s.fpu.mxcsr = mx,
            |a| {
                a.cvtsd2si(eax, qword_ptr(r14))?;
                a.cvttsd2si(ebx, qword_ptr(r14))?;
                a.cvtsi2ss(xmm3, eax)
            },
        );
        assert_eq!(o.state.gpr[0] as i32, rounded, "cvtsd2si {v} mxcsr {mx:#x}");
        assert_eq!(o.state.gpr[3] as i32, truncated, "cvttsd2si {v}");
        assert_eq!(o.state.fpu.mxcsr & 1, u32::from(v > 1e10), "IE for {v}");
    }
    // CVTSI2SS of 2^24 + 1 rounds to even and flags PE.
    let o = go(
        &[0; 512],
        |s| s.gpr[0] = (1 << 24) + 1,
        |a| a.cvtsi2ss(xmm0, eax),
    );
    assert_eq!(
        u32::from_le_bytes(o.state.fpu.xmm[0][..4].try_into().unwrap()),
        16_777_216f32.to_bits()
    );
    assert_eq!(o.state.fpu.mxcsr, 0x1fa0);
}

#[test]
fn sse_and_mmx_integer_operations() {
    let o = go(
        &[0; 512],
        |s| {
            let a: u128 = 0x8000_7fff_0100_ff00_0003_0002_0001_8001;
            let b: u128 = 0x0002_0002_0002_0002_ffff_0001_0100_00ff;
            s.fpu.xmm[0] = a.to_le_bytes();
            s.fpu.xmm[1] = b.to_le_bytes();
            s.fpu.xmm[2] = a.to_le_bytes();
            s.fpu.xmm[3] = a.to_le_bytes();
            s.fpu.xmm[4] = a.to_le_bytes();
            s.fpu.xmm[5] = a.to_le_bytes();
        },
        |a| {
            a.packsswb(xmm0, xmm1)?;
            a.pmaddwd(xmm2, xmm1)?;
            a.psadbw(xmm3, xmm1)?;
            a.pmuludq(xmm4, xmm1)?;
            a.pcmpgtw(xmm5, xmm1)?;
            a.pextrw(eax, xmm1, 6)?;
            a.movdq2q(mm1, xmm1)?;
            a.paddusb(mm1, mm1)?;
            a.pmovmskb(ebx, mm1)
        },
    );
    let x = |i: usize| u128::from_le_bytes(o.state.fpu.xmm[i]);
    // PACKSSWB: words of a then b saturated to bytes (low qword from a).
    let words_a: [i16; 8] = [
        0x8001u16 as i16,
        1,
        2,
        3,
        0xff00u16 as i16,
        0x100,
        0x7fff,
        0x8000u16 as i16,
    ];
    let words_b: [i16; 8] = [0xff, 0x100, 1, -1, 2, 2, 2, 2];
    let sat = |w: i16| w.clamp(-128, 127) as i8 as u8;
    let mut packed = [0u8; 16];
    for i in 0..8 {
        packed[i] = sat(words_a[i]);
        packed[8 + i] = sat(words_b[i]);
    }
    assert_eq!(x(0), u128::from_le_bytes(packed), "packsswb");
    let mut madd = [0u8; 16];
    for i in 0..4 {
        let v = i32::from(words_a[2 * i]) * i32::from(words_b[2 * i])
            + i32::from(words_a[2 * i + 1]) * i32::from(words_b[2 * i + 1]);
        madd[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
    assert_eq!(x(2), u128::from_le_bytes(madd), "pmaddwd");
    let ab: [u8; 16] = 0x8000_7fff_0100_ff00_0003_0002_0001_8001u128.to_le_bytes();
    let bb: [u8; 16] = 0x0002_0002_0002_0002_ffff_0001_0100_00ffu128.to_le_bytes();
    let sad =
        |r: std::ops::Range<usize>| -> u128 { r.map(|i| u128::from(ab[i].abs_diff(bb[i]))).sum() };
    assert_eq!(x(3), sad(0..8) | (sad(8..16) << 64), "psadbw");
    let pmul = |lo: u32, hi: u32| u128::from(u64::from(lo) * u64::from(hi));
    assert_eq!(
        x(4),
        pmul(0x0001_8001, 0x0100_00ff) | (pmul(0x0100_ff00, 0x0002_0002) << 64),
        "pmuludq"
    );
    let mut gt = [0u8; 16];
    for i in 0..8 {
        let m: i16 = if words_a[i] > words_b[i] { -1 } else { 0 };
        gt[2 * i..2 * i + 2].copy_from_slice(&m.to_le_bytes());
    }
    assert_eq!(x(5), u128::from_le_bytes(gt), "pcmpgtw");
    assert_eq!(o.state.gpr[0], 2, "pextrw");
    // MOVDQ2Q takes the low qword; PADDUSB saturates 0xff + 0xff and 0x80-ish bytes.
    let low: [u8; 8] = 0xffff_0001_0100_00ffu64.to_le_bytes();
    let mask = low.iter().enumerate().fold(0u64, |m, (i, b)| {
        m | (u64::from(b.saturating_add(*b) >> 7) << i)
    });
    assert_eq!(o.state.gpr[3], mask, "pmovmskb after paddusb");
}

/// Which vector a snippet raised, with the RIP pushed (which instruction it is).
fn fault_of(
    data: &[u8],
    setup: impl FnOnce(&mut CpuState),
    code: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> (Option<(u8, usize)>, Outcome) {
    let o = go(data, setup, code);
    let f = o.fault.map(|(v, rip)| {
        (
            v,
            o.rips.iter().position(|&r| r == rip).unwrap_or(usize::MAX),
        )
    });
    (f, o)
}

#[test]
fn fp_faults_follow_cr0_cr4_and_the_masks() {
    const EM: u64 = 4;
    const TS: u64 = 8;
    const MP: u64 = 2;
    type Snip = fn(&mut CodeAssembler) -> Result<(), IcedError>;
    let x87: Snip = |a| a.fld1();
    let sse: Snip = |a| a.addps(xmm0, xmm1);
    let mmx: Snip = |a| a.paddb(mm0, mm1);
    let fwait: Snip = |a| a.wait();
    // (name, cr0 bits set, cr4 bits cleared, snippet, expected vector)
    let cvt: Snip = |a| a.cvtpi2ps(xmm0, mm1);
    let cases: [(&str, u64, u64, Snip, Option<u8>); 13] = [
        ("MMX without OSFXSR", 0, 0x200, mmx, None),
        ("CVTPI2PS without OSFXSR", 0, 0x200, cvt, Some(6)),
        ("CVTPI2PS with TS", TS, 0, cvt, Some(7)),
        ("x87 with TS", TS, 0, x87, Some(7)),
        ("x87 with EM", EM, 0, x87, Some(7)),
        ("SSE with TS", TS, 0, sse, Some(7)),
        ("SSE with EM", EM, 0, sse, Some(6)),
        ("SSE without OSFXSR", 0, 0x200, sse, Some(6)),
        ("MMX with TS", TS, 0, mmx, Some(7)),
        ("MMX with EM", EM, 0, mmx, Some(6)),
        ("FWAIT with TS, no MP", TS, 0, fwait, None),
        ("FWAIT with TS and MP", TS | MP, 0, fwait, Some(7)),
        ("x87 plain", 0, 0, x87, None),
    ];
    for (name, set, clear, snip, want) in cases {
        let (f, _) = fault_of(
            &[0; 512],
            |s| {
                s.cr0 = (s.cr0 & !MP) | set;
                s.cr4 &= !clear;
            },
            snip,
        );
        assert_eq!(f.map(|(v, _)| v), want, "{name}");
        if want.is_some() {
            assert_eq!(
                f.map(|(_, i)| i),
                Some(0),
                "{name}: faults on the instruction"
            );
        }
    }
}

#[test]
fn unmasked_x87_exceptions_are_delivered_at_the_next_waiting_instruction() {
    let (f, o) = fault_of(
        &[0; 512],
        |s| {
            s.fpu.fcw = 0x37b; // ZE unmasked
            s.cr0 |= 1 << 5; // NE: #MF (without it, FERR# and IRQ13: see tests/pc.rs)
        },
        |a| {
            a.fld1()?;
            a.fldz()?;
            a.fdivp(st1, st0)?; // 0: no fault yet, ES set
            a.fnstsw(ax)?; // non-waiting
            a.fnstcw(word_ptr(r14))?; // non-waiting
            a.fld1() // waiting: #MF here
        },
    );
    assert_eq!(f, Some((16, 5)));
    assert_eq!(
        o.state.gpr[0] as u16 & 0x8084,
        0x8084,
        "B, ES and ZE in FNSTSW AX"
    );
    // The divisor stays on the stack with the destination unchanged (pre-computation).
    assert_eq!(o.state.fpu.fsw >> 11 & 7, 6);
    // With CR0.NE the same goes for an MMX instruction.
    let (f, _) = fault_of(
        &[0; 512],
        |s| {
            s.fpu.fcw = 0x37b;
            s.cr0 |= 1 << 5;
        },
        |a| {
            a.fld1()?;
            a.fldz()?;
            a.fdivp(st1, st0)?;
            a.paddb(mm0, mm1)
        },
    );
    assert_eq!(f, Some((16, 3)));
    // FNCLEX clears it.
    let (f, _) = fault_of(
        &[0; 512],
        |s| {
            s.fpu.fcw = 0x37b;
            s.cr0 |= 1 << 5;
        },
        |a| {
            a.fld1()?;
            a.fldz()?;
            a.fdivp(st1, st0)?;
            a.fnclex()?;
            a.wait()
        },
    );
    assert_eq!(f, None);
}

#[test]
fn unmasked_sse_exceptions_raise_xm_and_leave_the_destination() {
    for (osxmmexcpt, vector) in [(true, 19u8), (false, 6)] {
        let (f, o) = fault_of(
            &[0; 512],
            |s| {
                s.fpu.mxcsr = 0x1f80 & !0x200; // ZE unmasked
                s.fpu.xmm[0][..4].copy_from_slice(&1f32.to_le_bytes());
                if !osxmmexcpt {
                    s.cr4 &= !0x400;
                }
            },
            |a| {
                a.addss(xmm2, xmm2)?;
                a.divss(xmm0, xmm1)
            },
        );
        assert_eq!(f, Some((vector, 1)), "OSXMMEXCPT {osxmmexcpt}");
        assert_eq!(&o.state.fpu.xmm[0][..4], &1f32.to_le_bytes());
        assert_eq!(o.state.fpu.mxcsr, (0x1f80 & !0x200) | 0x4, "ZE flagged");
    }
    // An exact tiny result: masked, a denormal and no flag; unmasked, #XM with UE.
    for (mx, fault) in [(0x1f80u32, None), (0x1f80 & !0x800, Some((19u8, 0usize)))] {
        let (f, o) = fault_of(
            &[0; 512],
            |s| {
                s.fpu.mxcsr = mx;
                s.fpu.xmm[0][..4].copy_from_slice(&2f32.powi(-70).to_le_bytes());
                s.fpu.xmm[1][..4].copy_from_slice(&2f32.powi(-60).to_le_bytes());
            },
            |a| a.mulss(xmm0, xmm1),
        );
        assert_eq!(f, fault, "mxcsr {mx:#x}");
        let got = u32::from_le_bytes(o.state.fpu.xmm[0][..4].try_into().unwrap());
        if fault.is_none() {
            assert_eq!(got, 1 << 19, "2^-130 as a denormal");
            assert_eq!(o.state.fpu.mxcsr, mx);
        } else {
            assert_eq!(got, 2f32.powi(-70).to_bits(), "destination unchanged");
            assert_eq!(o.state.fpu.mxcsr, mx | 0x10);
        }
    }
    // Misaligned packed operand: #GP(0).
    let (f, _) = fault_of(&[0; 512], |_| {}, |a| a.addps(xmm0, xmmword_ptr(r14 + 8)));
    assert_eq!(f, Some((13, 0)));
    // The unaligned move is fine.
    let (f, _) = fault_of(&[0; 512], |_| {}, |a| a.movups(xmm0, xmmword_ptr(r14 + 8)));
    assert_eq!(f, None);
}

#[test]
fn maskmovdqu_stores_only_the_selected_bytes() {
    let o = go(
        &[0xaa; 512],
        |s| {
            s.gpr[7] = DATA + 0x40;
            s.fpu.xmm[0] = 0x0f0e_0d0c_0b0a_0908_0706_0504_0302_0100u128.to_le_bytes();
            s.fpu.xmm[1] = 0x8000_0000_0000_0000_0000_0000_0080_ff80u128.to_le_bytes();
        },
        |a| a.maskmovdqu(xmm0, xmm1),
    );
    let mut want = [0xaau8; 16];
    want[0] = 0x00;
    want[1] = 0x01;
    want[2] = 0x02;
    want[15] = 0x0f;
    assert_eq!(&o.data[0x40..0x50], &want);
}

#[test]
fn instructions_deja_does_not_report_stay_undefined_and_counted() {
    // AES-NI and PCLMULQDQ are not in deja's CPUID (the host has both).
    let (f, o) = fault_of(&[0; 512], |_| {}, |a| a.aesenc(xmm0, xmm1));
    assert_eq!(f, Some((6, 0)));
    assert_eq!(o.stats.get("bt.unimplemented.aesenc"), 1);
    let (f, o) = fault_of(&[0; 512], |_| {}, |a| a.pclmulqdq(xmm0, xmm1, 0));
    assert_eq!(f, Some((6, 0)));
    assert_eq!(o.stats.get("bt.unimplemented.pclmulqdq"), 1);
}

/// deja's CPUID table without one bit of `leaf`'s register `reg`.
fn without(leaf: u32, reg: usize, mask: u32) -> CpuidTable {
    let mut t = CpuidTable::deja_default();
    let e = t
        .entries
        .iter_mut()
        .find(|e| e.function == leaf && e.index == 0)
        .unwrap();
    match reg {
        0 => e.eax &= !mask,
        1 => e.ebx &= !mask,
        2 => e.ecx &= !mask,
        _ => e.edx &= !mask,
    }
    t
}

#[test]
fn the_translator_accepts_what_the_cpuid_table_reports() {
    use deja_machine::cpuid::features as f;
    type Snip = fn(&mut CodeAssembler) -> Result<(), IcedError>;
    // (the feature, its leaf, register and bit, an instruction needing it, its mnemonic)
    let cases: [(&str, u32, usize, u32, Snip, &str); 12] = [
        ("SSE3", 1, 2, f::SSE3, |a| a.haddps(xmm0, xmm1), "haddps"),
        (
            "SSE3 (x87)",
            1,
            2,
            f::SSE3,
            |a| a.fisttp(dword_ptr(r14)),
            "fisttp",
        ),
        ("SSSE3", 1, 2, f::SSSE3, |a| a.pshufb(xmm0, xmm1), "pshufb"),
        (
            "SSSE3 (MMX)",
            1,
            2,
            f::SSSE3,
            |a| a.pabsb(mm0, mm1),
            "pabsb",
        ),
        (
            "SSE4.1",
            1,
            2,
            f::SSE4_1,
            |a| a.pmulld(xmm0, xmm1),
            "pmulld",
        ),
        (
            "SSE4.2",
            1,
            2,
            f::SSE4_2,
            |a| a.pcmpgtq(xmm0, xmm1),
            "pcmpgtq",
        ),
        (
            "SSE4.2 CRC32",
            1,
            2,
            f::SSE4_2,
            |a| a.crc32(eax, ecx),
            "crc32",
        ),
        ("POPCNT", 1, 2, f::POPCNT, |a| a.popcnt(eax, ecx), "popcnt"),
        (
            "CMPXCHG16B",
            1,
            2,
            f::CX16,
            |a| a.cmpxchg16b(xmmword_ptr(r14)),
            "cmpxchg16b",
        ),
        ("LAHF_LM", 0x8000_0001, 2, f::LAHF_LM, |a| a.lahf(), "lahf"),
        (
            "CLFLUSHOPT",
            7,
            1,
            f::CLFLUSHOPT,
            |a| a.clflushopt(byte_ptr(r14)),
            "clflushopt",
        ),
        ("CLWB", 7, 1, f::CLWB, |a| a.clwb(byte_ptr(r14)), "clwb"),
    ];
    for (name, leaf, reg, mask, snip, mnemonic) in cases {
        let (f, _) = fault_of(&[0; 512], |_| {}, snip);
        assert_eq!(f, None, "{name}: runs with deja's table");
        let o = go_with(&without(leaf, reg, mask), &[0; 512], |_| {}, snip);
        assert_eq!(
            o.fault.map(|(v, rip)| (v, rip == CODE)),
            Some((6, true)),
            "{name}: #UD without the bit"
        );
        assert_eq!(
            o.stats.get(&format!("bt.unimplemented.{mnemonic}")),
            1,
            "{name}: counted"
        );
    }
}

#[test]
fn cr4_umip_can_be_set_only_when_the_cpuid_table_reports_it() {
    let set: fn(&mut CodeAssembler) -> Result<(), IcedError> = |a| {
        a.mov(rax, cr4)?;
        a.or(eax, 1 << 11)?;
        a.mov(cr4, rax)
    };
    let o = go(&[0; 512], |_| {}, set);
    assert_eq!(o.fault, None);
    assert_ne!(o.state.cr4 & (1 << 11), 0, "CR4.UMIP set");
    let o = go_with(
        &without(7, 2, deja_machine::cpuid::features::UMIP),
        &[0; 512],
        |_| {},
        set,
    );
    assert_eq!(
        o.fault.map(|(v, _)| v),
        Some(13),
        "#GP without CPUID's UMIP"
    );
    assert_eq!(o.state.cr4 & (1 << 11), 0);
}

#[test]
fn crc32_is_crc32c_over_each_source_size() {
    // CRC-32C("123456789") = 0xE3069283 (initial value and final XOR all ones).
    let mut data = [0u8; 512];
    data[..9].copy_from_slice(b"123456789");
    let o = go(
        &data,
        |s| {
            s.gpr[0] = 0xffff_ffff;
            s.gpr[1] = u64::from_le_bytes(*b"12345678");
            s.gpr[2] = 0xffff_ffff;
            s.gpr[3] = 0xdead_beef_ffff_ffff;
        },
        |a| {
            // Eight bytes from memory then one more: 64-bit form, byte form.
            a.crc32(rax, qword_ptr(r14))?;
            a.crc32(eax, byte_ptr(r14 + 8))?;
            a.not(eax)?;
            // The same bytes by register in 4 + 2 + 2 + 1.
            a.crc32(edx, ecx)?;
            a.shr(rcx, 32)?;
            a.crc32(edx, cx)?;
            a.shr(ecx, 16)?;
            a.crc32(edx, cx)?;
            a.mov(cl, 0x39)?;
            a.crc32(edx, cl)?;
            a.not(edx)?;
            // A 64-bit destination takes the CRC of its low half and zero-extends.
            a.crc32(rbx, byte_ptr(r14 + 9))
        },
    );
    assert_eq!(o.fault, None);
    assert_eq!(o.state.gpr[0], 0xe306_9283);
    assert_eq!(o.state.gpr[2], 0xe306_9283);
    // CRC32C of one zero byte from 0xffffffff, with no final XOR.
    let mut c = 0xffff_ffffu32;
    for _ in 0..8 {
        c = (c >> 1) ^ (0x82f6_3b78 & (c & 1).wrapping_neg());
    }
    assert_eq!(o.state.gpr[3], u64::from(c));
}

#[test]
fn sse4_string_compares_use_rax_rdx_rcx_and_take_unaligned_operands() {
    // "heXlo" in memory at an odd address, "hello" in XMM1.
    let mut data = [0u8; 512];
    data[1..6].copy_from_slice(b"heXlo");
    let hello = u128::from_le_bytes(*b"hello\0\0\0\0\0\0\0\0\0\0\0");
    let o = go(
        &data,
        |s| {
            s.fpu.xmm[1] = hello.to_le_bytes();
            s.gpr[1] = 0xdead_beef_0000_0077;
            // Explicit lengths for PCMPESTRI: 2 in RAX, 2 in RDX.
            s.gpr[0] = 2;
            s.gpr[2] = 2;
        },
        |a| {
            // Unsigned bytes, equal each, negated: the first mismatch.
            a.pcmpistri(xmm1, xmmword_ptr(r14 + 1), 0x18)?;
            a.mov(rbx, rcx)?;
            a.pushfq()?;
            a.pop(rsi)?;
            // With explicit lengths of 2 the strings agree up to their ends: no index.
            a.pcmpestri(xmm1, xmmword_ptr(r14 + 1), 0x18)?;
            a.pushfq()?;
            a.pop(rdi)?;
            // PCMPISTRM's mask goes to XMM0.
            a.pcmpistrm(xmm1, xmmword_ptr(r14 + 1), 0x58)
        },
    );
    assert_eq!(o.fault, None, "no #GP for the unaligned operand");
    assert_eq!(
        o.state.gpr[3], 2,
        "RCX = the mismatch's index, zero-extended"
    );
    // CF (a result), ZF (the memory string ends), SF (XMM1's ends), OF (bit 0 clear).
    assert_eq!(o.state.gpr[6] & 0x8d5, 0x1 | 0x40 | 0x80);
    // Positions 2.. are past both explicit lengths (forced equal, then negated to 0): no
    // result bit, so RCX = 16 and CF clear; both lengths are short of 16 (ZF, SF).
    assert_eq!(o.state.gpr[1], 16);
    assert_eq!(o.state.gpr[7] & 0x8d5, 0x40 | 0x80);
    // Byte mask (bit 6 of the immediate): 0xff in the mismatching byte only.
    assert_eq!(u128::from_le_bytes(o.state.fpu.xmm[0]), 0xff << 16);
}

#[test]
fn new_sse_levels_check_alignment_and_use_xmm0_implicitly() {
    // PSHUFB (SSSE3) needs an aligned operand; LDDQU (SSE3) does not.
    let (f, _) = fault_of(&[0; 512], |_| {}, |a| a.pshufb(xmm0, xmmword_ptr(r14 + 4)));
    assert_eq!(f, Some((13, 0)));
    let (f, _) = fault_of(&[0; 512], |_| {}, |a| a.lddqu(xmm0, xmmword_ptr(r14 + 4)));
    assert_eq!(f, None);
    // BLENDVPS takes the lanes whose XMM0 sign bit is set from the source.
    let o = go(
        &[0; 512],
        |s| {
            s.fpu.xmm[0] = 0x8000_0000_0000_0000_8000_0000_0000_0000u128.to_le_bytes();
            s.fpu.xmm[1] = 0x1111_1111_2222_2222_3333_3333_4444_4444u128.to_le_bytes();
            s.fpu.xmm[2] = 0xaaaa_aaaa_bbbb_bbbb_cccc_cccc_dddd_ddddu128.to_le_bytes();
        },
        |a| a.blendvps(xmm1, xmm2),
    );
    assert_eq!(
        u128::from_le_bytes(o.state.fpu.xmm[1]),
        0xaaaa_aaaa_2222_2222_cccc_cccc_4444_4444
    );
    // FISTTP truncates whatever the rounding control says (here: round up).
    let o = go(
        &f64_data(&[2.75, -2.75]),
        |s| s.fpu.fcw = 0x0b7f,
        |a| {
            a.fld(qword_ptr(r14))?;
            a.fisttp(dword_ptr(r14 + 0x20))?;
            a.fld(qword_ptr(r14 + 8))?;
            a.fisttp(qword_ptr(r14 + 0x28))
        },
    );
    assert_eq!(o.fault, None);
    assert_eq!(&o.data[0x20..0x24], &2i32.to_le_bytes());
    assert_eq!(u64_at(&o.data, 0x28), (-2i64) as u64);
    assert_eq!(o.state.fpu.fsw & 0x3800, 0, "both popped");
}

#[test]
fn fnstenv_formats_in_protected_and_real_mode() {
    // 32-bit protected mode: 28 bytes with FIP, FCS, FOP, FDP, FDS.
    let (mut m, _, _) = machine();
    let code = asm(32, 0x1_0000, |a| {
        a.fld(dword_ptr(0x2_0000)).unwrap();
        a.fnstenv(ptr(0x2_0100)).unwrap();
        a.hlt().unwrap();
    });
    load(&m, 0x1_0000, &code);
    load(&m, 0x2_0000, &1f32.to_le_bytes());
    let mut s = protected_mode_state(&m, 0x1_0000);
    s.cr4 |= 0x200;
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 100), Exit::Halted);
    let d = peek(&m, 0x2_0100, 28);
    assert_eq!(
        u32::from_le_bytes(d[12..16].try_into().unwrap()),
        0x1_0000,
        "FIP"
    );
    assert_eq!(u16_at(&d, 16), 0x08, "FCS");
    assert_eq!(u16_at(&d, 18), 0x105, "FOP: D9 05 (fld m32, disp32)");
    assert_eq!(
        u32::from_le_bytes(d[20..24].try_into().unwrap()),
        0x2_0000,
        "FDP"
    );
    assert_eq!(u16_at(&d, 24), 0x10, "FDS");
    assert_eq!(u16_at(&d, 8), 0x3fff, "tag word: ST0 valid");

    // Real mode, 16-bit operand size: 14 bytes with 20-bit linear pointers and FOP.
    let (mut m, _, _) = machine();
    let code = asm(16, 0x100, |a| {
        a.fld(dword_ptr(0x200)).unwrap();
        a.fnstenv(ptr(0x300)).unwrap();
        a.hlt().unwrap();
    });
    let base = 0x1000u64; // CS = DS = 0x100
    load(&m, base + 0x100, &code);
    load(&m, base + 0x200, &1f32.to_le_bytes());
    let mut s = real_mode_state(0x100);
    for sg in s.seg.iter_mut() {
        sg.selector = 0x100;
        sg.base = base;
    }
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 100), Exit::Halted);
    let d = peek(&m, base + 0x300, 14);
    assert_eq!(u16_at(&d, 6), 0x1100, "FIP[15:0] (linear)");
    assert_eq!(u16_at(&d, 8), 0x106, "FIP[19:16] = 0 and FOP D9 06");
    assert_eq!(u16_at(&d, 10), 0x1200, "FDP[15:0] (linear)");
    assert_eq!(u16_at(&d, 12), 0, "FDP[19:16]");
}

#[test]
fn fxsave_pointer_layouts_in_64_bit_mode() {
    let o = go(
        &f64_data(&[1.5]),
        |_| {},
        |a| {
            a.fld(qword_ptr(r14))?;
            a.fxsave(ptr(r14 + 0x100))?;
            a.fxsave64(ptr(r14 + 0x400))
        },
    );
    let d = &o.data;
    // 32-bit layout: FIP[31:0], FCS, FDP[31:0], FDS.
    assert_eq!(
        u64::from(u32::from_le_bytes(d[0x108..0x10c].try_into().unwrap())),
        o.rips[0]
    );
    assert_eq!(u16_at(d, 0x10c), 0x18, "FCS");
    assert_eq!(
        u64::from(u32::from_le_bytes(d[0x110..0x114].try_into().unwrap())),
        DATA
    );
    assert_eq!(
        u16_at(d, 0x114),
        o.state.seg[deja_machine::cpu::seg::DS].selector,
        "FDS"
    );
    // 64-bit layout: 64-bit FIP and FDP.
    assert_eq!(u64_at(d, 0x408), o.rips[0]);
    assert_eq!(u64_at(d, 0x410), DATA);
    // No exception pending: FOP reads 0 (Intel, FOP compatibility mode off).
    assert_eq!(u16_at(d, 0x406), 0);
}

/// CR4.OSXSAVE (bit 18) on, XCR0 = `xcr0`.
fn with_xsave(xcr0: u64) -> impl FnOnce(&mut CpuState) {
    move |s: &mut CpuState| {
        s.cr4 |= 1 << 18;
        s.xcr0 = deja_machine::cpu::Xcr0(xcr0);
    }
}

/// A table whose leaf `leaf`, subleaf `index` lacks `mask` in register `reg`.
fn without_sub(leaf: u32, index: u32, reg: usize, mask: u32) -> CpuidTable {
    let mut t = CpuidTable::deja_default();
    let e = t
        .entries
        .iter_mut()
        .find(|e| e.function == leaf && e.index == index)
        .unwrap();
    match reg {
        0 => e.eax &= !mask,
        1 => e.ebx &= !mask,
        2 => e.ecx &= !mask,
        _ => e.edx &= !mask,
    }
    t
}

#[test]
fn xsave_family_faults_follow_the_sdm() {
    use deja_machine::cpuid::features as f;
    type Snip = fn(&mut CodeAssembler) -> Result<(), IcedError>;
    type Setup = fn(&mut CpuState);
    let osx: Setup = |s| with_xsave(3)(s);
    let osx1: Setup = |s| with_xsave(1)(s);
    let plain: Setup = |_| {};
    let ts: Setup = |s| {
        with_xsave(3)(s);
        s.cr0 |= 1 << 3;
    };
    // The area at R14 + 0x400 with XSTATE_BV (offset 512) and XCOMP_BV (520) as given.
    let mut data = vec![0u8; 4096];
    let header = |d: &mut [u8], at: usize, bv: u64, comp: u64, mxcsr: u32| {
        d[at + 24..at + 28].copy_from_slice(&mxcsr.to_le_bytes());
        d[at + 512..at + 520].copy_from_slice(&bv.to_le_bytes());
        d[at + 520..at + 528].copy_from_slice(&comp.to_le_bytes());
    };
    header(&mut data, 0x400, 2, 0, 0x1f80); // SSE in XSTATE_BV
    header(&mut data, 0x800, 1, 1 << 63, 0x1f80); // a compacted-form header
    header(&mut data, 0xc00, 3, 0, 0x1_0000); // a reserved MXCSR bit
    let d = &data;
    // (case, table, setup, code, the vector expected or None)
    let cases: Vec<(&str, CpuidTable, Setup, Snip, Option<u8>)> = vec![
        (
            "xgetbv without OSXSAVE",
            CpuidTable::deja_default(),
            plain,
            |a| a.xgetbv(),
            Some(6),
        ),
        (
            "xsetbv without OSXSAVE",
            CpuidTable::deja_default(),
            plain,
            |a| {
                a.mov(ecx, 0)?;
                a.mov(eax, 1)?;
                a.mov(edx, 0)?;
                a.xsetbv()
            },
            Some(6),
        ),
        (
            "xsave without OSXSAVE",
            CpuidTable::deja_default(),
            plain,
            |a| a.xsave(ptr(r14)),
            Some(6),
        ),
        (
            "xgetbv ecx=0",
            CpuidTable::deja_default(),
            osx,
            |a| {
                a.mov(ecx, 0)?;
                a.xgetbv()
            },
            None,
        ),
        (
            "xgetbv ecx=1 (not reported)",
            CpuidTable::deja_default(),
            osx,
            |a| {
                a.mov(ecx, 1)?;
                a.xgetbv()
            },
            Some(13),
        ),
        (
            "xsetbv 3",
            CpuidTable::deja_default(),
            osx1,
            |a| {
                a.mov(ecx, 0)?;
                a.mov(eax, 3)?;
                a.mov(edx, 0)?;
                a.xsetbv()
            },
            None,
        ),
        (
            "xsetbv without x87",
            CpuidTable::deja_default(),
            osx1,
            |a| {
                a.mov(ecx, 0)?;
                a.mov(eax, 2)?;
                a.mov(edx, 0)?;
                a.xsetbv()
            },
            Some(13),
        ),
        (
            "xsetbv AVX (unsupported)",
            CpuidTable::deja_default(),
            osx1,
            |a| {
                a.mov(ecx, 0)?;
                a.mov(eax, 7)?;
                a.mov(edx, 0)?;
                a.xsetbv()
            },
            Some(13),
        ),
        (
            "xsetbv a high bit",
            CpuidTable::deja_default(),
            osx1,
            |a| {
                a.mov(ecx, 0)?;
                a.mov(eax, 3)?;
                a.mov(edx, 1)?;
                a.xsetbv()
            },
            Some(13),
        ),
        (
            "xsetbv ecx=1",
            CpuidTable::deja_default(),
            osx1,
            |a| {
                a.mov(ecx, 1)?;
                a.mov(eax, 1)?;
                a.mov(edx, 0)?;
                a.xsetbv()
            },
            Some(13),
        ),
        (
            "xsave aligned",
            CpuidTable::deja_default(),
            osx,
            |a| a.xsave(ptr(r14)),
            None,
        ),
        (
            "xsave 16-byte aligned only",
            CpuidTable::deja_default(),
            osx,
            |a| a.xsave(ptr(r14 + 16)),
            Some(13),
        ),
        (
            "xrstor 32-byte aligned only",
            CpuidTable::deja_default(),
            osx,
            |a| a.xrstor(ptr(r14 + 32)),
            Some(13),
        ),
        (
            "xsave with CR0.TS",
            CpuidTable::deja_default(),
            ts,
            |a| a.xsave(ptr(r14)),
            Some(7),
        ),
        (
            "xgetbv with CR0.TS",
            CpuidTable::deja_default(),
            ts,
            |a| {
                a.mov(ecx, 0)?;
                a.xgetbv()
            },
            None,
        ),
        (
            "xrstor XSTATE_BV beyond XCR0",
            CpuidTable::deja_default(),
            osx1,
            |a| {
                a.mov(eax, -1)?;
                a.mov(edx, -1)?;
                a.xrstor(ptr(r14 + 0x400))
            },
            Some(13),
        ),
        (
            "xrstor the same with XCR0 = 3",
            CpuidTable::deja_default(),
            osx,
            |a| {
                a.mov(eax, -1)?;
                a.mov(edx, -1)?;
                a.xrstor(ptr(r14 + 0x400))
            },
            None,
        ),
        (
            "xrstor a compacted header",
            CpuidTable::deja_default(),
            osx,
            |a| {
                a.mov(eax, -1)?;
                a.mov(edx, -1)?;
                a.xrstor(ptr(r14 + 0x800))
            },
            Some(13),
        ),
        (
            "xrstor a reserved MXCSR bit",
            CpuidTable::deja_default(),
            osx,
            |a| {
                a.mov(eax, -1)?;
                a.mov(edx, -1)?;
                a.xrstor(ptr(r14 + 0xc00))
            },
            Some(13),
        ),
        (
            "xrstor a reserved MXCSR bit outside RFBM",
            CpuidTable::deja_default(),
            osx,
            |a| {
                a.mov(eax, 1)?;
                a.mov(edx, 0)?;
                a.xrstor(ptr(r14 + 0xc00))
            },
            None,
        ),
        (
            "xsaveopt",
            CpuidTable::deja_default(),
            osx,
            |a| a.xsaveopt(ptr(r14)),
            None,
        ),
        (
            "xsaveopt without CPUID.(0DH,1):EAX[0]",
            without_sub(0xd, 1, 0, f::XSAVEOPT),
            osx,
            |a| a.xsaveopt(ptr(r14)),
            Some(6),
        ),
        (
            "xsavec (not reported)",
            CpuidTable::deja_default(),
            osx,
            |a| a.xsavec(ptr(r14)),
            Some(6),
        ),
        (
            "xsaves (not reported)",
            CpuidTable::deja_default(),
            osx,
            |a| a.xsaves(ptr(r14)),
            Some(6),
        ),
        (
            "xgetbv without CPUID XSAVE",
            without(1, 2, f::XSAVE),
            osx,
            |a| {
                a.mov(ecx, 0)?;
                a.xgetbv()
            },
            Some(6),
        ),
        (
            "mov cr4.OSXSAVE",
            CpuidTable::deja_default(),
            plain,
            |a| {
                a.mov(rax, cr4)?;
                a.or(eax, 1 << 18)?;
                a.mov(cr4, rax)
            },
            None,
        ),
        (
            "mov cr4.OSXSAVE without CPUID XSAVE",
            without(1, 2, f::XSAVE),
            plain,
            |a| {
                a.mov(rax, cr4)?;
                a.or(eax, 1 << 18)?;
                a.mov(cr4, rax)
            },
            Some(13),
        ),
    ];
    for (name, table, setup, code, want) in cases {
        let o = go_with(&table, d, setup, code);
        assert_eq!(o.fault.map(|(v, _)| v), want, "{name}");
        if let Some((_, rip)) = o.fault {
            // The last RIP is the HLT after the snippet.
            assert_eq!(
                rip,
                o.rips[o.rips.len() - 2],
                "{name}: the faulting instruction's RIP"
            );
        }
    }
}

#[test]
fn xsave_writes_the_components_rfbm_names_and_xrstor_loads_or_initializes_them() {
    let mut data = vec![0xaau8; 4096];
    // XSTATE_BV: 0 at 0x400 (XRSTOR'd below), bits 5 and 1 at 0x800 (not in that XSAVE's
    // RFBM: they must survive).
    // Header bytes 8-23 of an area XRSTOR reads must be zero.
    data[0x400 + 512..0x400 + 536].fill(0);
    data[0x800 + 512..0x800 + 520].copy_from_slice(&0x22u64.to_le_bytes());
    let setup = |s: &mut CpuState| {
        with_xsave(3)(s);
        s.fpu.fcw = 0x27f;
        s.fpu.fsw = 0x3800;
        s.fpu.ftw = 0x80;
        s.fpu.st[0][..10].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 0x40]);
        s.fpu.mxcsr = 0x1fa0;
        for (i, x) in s.fpu.xmm.iter_mut().enumerate() {
            *x = [i as u8 + 1; 16];
        }
    };
    let o = go(&data, setup, |a| {
        // Everything at 0x400; x87 only at 0x800; then XRSTOR of 0x400 after clobbering.
        a.mov(eax, -1)?;
        a.mov(edx, -1)?;
        a.xsave64(ptr(r14 + 0x400))?;
        a.mov(eax, 1)?;
        a.mov(edx, 0)?;
        a.xsave64(ptr(r14 + 0x800))?;
        a.fninit()?;
        a.pxor(xmm3, xmm3)?;
        a.mov(eax, -1)?;
        a.mov(edx, -1)?;
        a.xrstor64(ptr(r14 + 0x400))
    });
    assert_eq!(o.fault, None);
    let area = &o.data[0x400..0x400 + 576];
    assert_eq!(&area[0..2], &0x27fu16.to_le_bytes(), "FCW");
    assert_eq!(&area[24..28], &0x1fa0u32.to_le_bytes(), "MXCSR");
    assert_eq!(&area[28..32], &0xffffu32.to_le_bytes(), "MXCSR_MASK");
    assert_eq!(&area[32..42], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 0x40]);
    for i in 0..16 {
        assert_eq!(area[160 + i * 16], i as u8 + 1, "XMM{i}");
    }
    assert!(
        area[416..512].iter().all(|&b| b == 0xaa),
        "bytes 416-511 are not written"
    );
    assert_eq!(&area[512..520], &3u64.to_le_bytes(), "XSTATE_BV: XINUSE");
    assert!(
        area[536..576].iter().all(|&b| b == 0xaa),
        "the rest of the header is not written"
    );
    let x87 = &o.data[0x800..0x800 + 576];
    assert_eq!(&x87[0..2], &0x27fu16.to_le_bytes());
    assert!(
        x87[24..32].iter().all(|&b| b == 0xaa),
        "no MXCSR without SSE in RFBM"
    );
    assert!(
        x87[160..416].iter().all(|&b| b == 0xaa),
        "no XMM without SSE in RFBM"
    );
    assert_eq!(
        &x87[512..520],
        &0x23u64.to_le_bytes(),
        "bits outside RFBM kept"
    );
    // The XRSTOR put back what FNINIT and PXOR changed.
    assert_eq!(o.state.fpu.fcw, 0x27f);
    assert_eq!(o.state.fpu.xmm[3], [4; 16]);
    assert_eq!(o.state.fpu.mxcsr, 0x1fa0);

    // XSTATE_BV clear: the components go to their initial configuration; MXCSR still loads.
    let mut data = vec![0u8; 4096];
    data[24..28].copy_from_slice(&0x1f00u32.to_le_bytes());
    data[0..2].copy_from_slice(&0x7fu16.to_le_bytes());
    let o = go(&data, setup, |a| {
        a.mov(eax, 3)?;
        a.mov(edx, 0)?;
        a.xrstor(ptr(r14))
    });
    assert_eq!(o.fault, None);
    assert_eq!(o.state.fpu.fcw, 0x37f, "x87 initialized, not loaded");
    assert_eq!(o.state.fpu.fsw, 0);
    assert_eq!(o.state.fpu.st[0], [0; 16]);
    assert!(o.state.fpu.xmm.iter().all(|x| *x == [0; 16]));
    assert_eq!(
        o.state.fpu.mxcsr, 0x1f00,
        "MXCSR loaded whatever XSTATE_BV says"
    );

    // XINUSE is 0 for components in their initial configuration: after FNINIT and with
    // every XMM register zero and MXCSR at its reset value, XSTATE_BV reads 0.
    let o = go(
        &[0; 4096],
        |s| with_xsave(3)(s),
        |a| {
            a.fninit()?;
            a.mov(eax, 3)?;
            a.mov(edx, 0)?;
            a.xsave(ptr(r14))
        },
    );
    assert_eq!(o.fault, None);
    assert_eq!(&o.data[512..520], &[0; 8]);
}

#[test]
fn xgetbv_reads_what_xsetbv_wrote_and_cpuid_reports_osxsave_from_cr4() {
    let o = go(
        &[0; 512],
        |s| with_xsave(1)(s),
        |a| {
            a.mov(ecx, 0)?;
            a.mov(eax, 3)?;
            a.mov(edx, 0)?;
            a.xsetbv()?;
            a.mov(rax, -1i64)?;
            a.mov(rdx, -1i64)?;
            a.xgetbv()?;
            a.mov(r8, rax)?;
            a.mov(r9, rdx)?;
            a.mov(eax, 1)?;
            a.cpuid()?;
            a.mov(r10, rcx)?;
            a.mov(rax, cr4)?;
            a.and(eax, !(1 << 18))?;
            a.mov(cr4, rax)?;
            a.mov(eax, 1)?;
            a.cpuid()?;
            a.mov(r11, rcx)?;
            a.mov(eax, 0xd)?;
            a.mov(ecx, 0)?;
            a.cpuid()?;
            a.mov(r12, rax)?;
            a.mov(r13, rbx)
        },
    );
    assert_eq!(o.fault, None);
    assert_eq!(o.state.xcr0.0, 3);
    assert_eq!((o.state.gpr[8], o.state.gpr[9]), (3, 0));
    assert_ne!(o.state.gpr[10] & (1 << 27), 0, "OSXSAVE with CR4.OSXSAVE");
    assert_ne!(o.state.gpr[10] & (1 << 26), 0, "XSAVE");
    assert_eq!(
        o.state.gpr[11] & (1 << 27),
        0,
        "no OSXSAVE once CR4.OSXSAVE is clear"
    );
    assert_eq!(
        (o.state.gpr[12], o.state.gpr[13]),
        (3, 576),
        "leaf 0xd: x87|SSE, 576 bytes"
    );
}

#[test]
fn tzcnt_and_lzcnt_are_bsf_and_bsr_without_their_cpuid_bits() {
    use deja_machine::cpuid::features as f;
    let with_bmi1 = {
        let mut t = CpuidTable::deja_default();
        for e in t
            .entries
            .iter_mut()
            .filter(|e| e.function == 7 && e.index == 0)
        {
            e.ebx |= f::BMI1;
        }
        t
    };
    let without_abm = without(0x8000_0001, 2, f::ABM);
    type Snip = fn(&mut CodeAssembler) -> Result<(), IcedError>;
    let tz0: Snip = |a| {
        a.mov(eax, 0x1234)?;
        a.xor(ecx, ecx)?;
        a.tzcnt(eax, ecx)?;
        a.pushfq()?;
        a.pop(rbx)
    };
    let tz: Snip = |a| {
        a.mov(ecx, 0x50)?;
        a.tzcnt(eax, ecx)
    };
    let lz: Snip = |a| {
        a.mov(ecx, 0x50)?;
        a.lzcnt(eax, ecx)
    };
    // (case, table, code, EAX after, CF and ZF after (None: not checked))
    type Case<'a> = (&'a str, &'a CpuidTable, Snip, u64, Option<(bool, bool)>);
    let cases: [Case; 6] = [
        (
            "tzcnt 0 without BMI1 is BSF",
            &CpuidTable::deja_default(),
            tz0,
            0x1234,
            Some((false, true)),
        ),
        (
            "tzcnt 0 with BMI1",
            &with_bmi1,
            tz0,
            32,
            Some((true, false)),
        ),
        (
            "tzcnt 0x50 without BMI1",
            &CpuidTable::deja_default(),
            tz,
            4,
            None,
        ),
        ("tzcnt 0x50 with BMI1", &with_bmi1, tz, 4, None),
        (
            "lzcnt 0x50 with ABM",
            &CpuidTable::deja_default(),
            lz,
            25,
            None,
        ),
        ("lzcnt 0x50 without ABM is BSR", &without_abm, lz, 6, None),
    ];
    for (name, table, code, eax_after, flags) in cases {
        let o = go_with(table, &[0; 512], |_| {}, code);
        assert_eq!(o.fault, None, "{name}");
        assert_eq!(o.state.gpr[0], eax_after, "{name}");
        if let Some((cf, zf)) = flags {
            let fl = o.state.gpr[3];
            assert_eq!((fl & 1 != 0, fl & 0x40 != 0), (cf, zf), "{name}");
        }
    }
}

#[test]
fn cr4_bits_are_accepted_only_when_the_cpuid_table_reports_their_feature() {
    use deja_machine::cpuid::features as f;
    // (bit, its name, a table without its feature, or None when deja's CPUID lacks it).
    // SMEP is only checked for its #GP: with it on, this test's supervisor code, on user
    // pages, could not fetch its next instruction.
    let cases: Vec<(u32, &str, Option<CpuidTable>)> = vec![
        (0, "VME", None),
        (1, "PVI", None),
        (2, "TSD", Some(without(1, 3, f::TSC))),
        (3, "DE", Some(without(1, 3, f::DE))),
        (6, "MCE", Some(without(1, 3, f::MCE))),
        (7, "PGE", Some(without(1, 3, f::PGE))),
        (11, "UMIP", Some(without(7, 2, f::UMIP))),
        (12, "LA57", None),
        (16, "FSGSBASE", None),
        (17, "PCIDE", None),
        (18, "OSXSAVE", Some(without(1, 2, f::XSAVE))),
        (20, "SMEP", Some(without(7, 1, f::SMEP))),
        (21, "SMAP", Some(without(7, 1, f::SMAP))),
        (22, "PKE", None),
        (23, "CET", None),
        (24, "PKS", None),
    ];
    for (bit, name, lacking) in cases {
        let set = move |a: &mut CodeAssembler| -> Result<(), IcedError> {
            a.mov(rax, cr4)?;
            a.bts(rax, bit)?;
            a.mov(cr4, rax)
        };
        let o = (bit != 20).then(|| go(&[0; 512], |_| {}, set));
        match &lacking {
            Some(table) => {
                if let Some(o) = o {
                    assert_eq!(o.fault, None, "CR4.{name} with its feature");
                    assert_ne!(o.state.cr4 & (1 << bit), 0, "CR4.{name} set");
                }
                let o = go_with(table, &[0; 512], |_| {}, set);
                assert_eq!(
                    o.fault.map(|(v, _)| v),
                    Some(13),
                    "CR4.{name} without its feature"
                );
            }
            None => {
                let fault = o.and_then(|o| o.fault).map(|(v, _)| v);
                assert_eq!(fault, Some(13), "CR4.{name}: not in deja's CPUID");
            }
        }
    }
}
