//! `x86-64-v2`: the instructions of the x86-64-v2 level that a RHEL-9-class user space
//! assumes (SSE3, SSSE3, SSE4.1, SSE4.2 with PCMPxSTRx and CRC32, POPCNT, CMPXCHG16B,
//! LAHF/SAHF in 64-bit mode), each with a result worked out from the SDM's definition and
//! checked by the guest: the CPUID bits first, then one or more instructions per feature;
//! then CLFLUSHOPT and CLWB, which Linux uses where the CPU reports them.
//! Recorded and replayed, it shows these instructions are deterministic on bt.

use crate::link::{LinkError, SectionAsm};
use crate::rt::{BootMessages, EXIT_CHECK_FAILED, EXIT_PASS, Runtime, long_mode_image};
use deja_machine::loader::Image;
use iced_x86::code_asm::*;

/// Scratch memory (identity-mapped, above the image): operands and spilled registers.
const DATA: u64 = 0x19_0000;
/// Where a 128-bit value is staged on its way into or out of an XMM register.
const STAGE: u64 = DATA + 0x100;

/// The line the guest prints when every check passes.
pub const PASS_LINE: &str = "x86-64-v2: PASS";

/// Four f32 lanes, lane 0 lowest.
fn f32x4(v: [f32; 4]) -> u128 {
    v.iter()
        .enumerate()
        .fold(0, |acc, (i, x)| acc | (u128::from(x.to_bits()) << (32 * i)))
}

/// CRC-32C (reflected 0x82F63B78) continued from `crc` over `bytes`, no inversion: what the
/// CRC32 instruction computes.
fn crc32c(mut crc: u32, bytes: &[u8]) -> u32 {
    for b in bytes {
        crc ^= u32::from(*b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82f6_3b78 & (crc & 1).wrapping_neg());
        }
    }
    crc
}

fn load_xmm(a: &mut CodeAssembler, x: AsmRegisterXmm, v: u128) -> Result<(), IcedError> {
    a.mov(rax, v as u64)?;
    a.mov(qword_ptr(STAGE), rax)?;
    a.mov(rax, (v >> 64) as u64)?;
    a.mov(qword_ptr(STAGE + 8), rax)?;
    a.movdqa(x, xmmword_ptr(STAGE))
}

/// Emits a check: `test` jumps to its label when the check holds; otherwise the guest says
/// which check failed and exits with [`EXIT_CHECK_FAILED`].
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

/// A check that XMM register `x` holds `want`.
fn check_xmm(
    s: &mut SectionAsm<'_>,
    rt: &mut Runtime,
    what: &str,
    x: AsmRegisterXmm,
    want: u128,
) -> Result<(), LinkError> {
    check(s, rt, what, |a, ok| {
        let mut bad = a.create_label();
        a.movdqa(xmmword_ptr(STAGE), x)?;
        a.mov(rax, qword_ptr(STAGE))?;
        a.mov(rcx, want as u64)?;
        a.cmp(rax, rcx)?;
        a.jne(bad)?;
        a.mov(rax, qword_ptr(STAGE + 8))?;
        a.mov(rcx, (want >> 64) as u64)?;
        a.cmp(rax, rcx)?;
        a.je(ok)?;
        a.set_label(&mut bad)?;
        a.nop()
    })
}

/// A check that `r` equals `want`.
fn check_reg(
    s: &mut SectionAsm<'_>,
    rt: &mut Runtime,
    what: &str,
    r: AsmRegister64,
    want: u64,
) -> Result<(), LinkError> {
    check(s, rt, what, |a, ok| {
        a.mov(r15, want)?;
        a.cmp(r, r15)?;
        a.je(ok)
    })
}

pub(crate) fn build() -> Result<Image, LinkError> {
    long_mode_image("x86-64-v2", BootMessages::default(), &[], &|s, rt| {
        // CPUID: SSE3, SSSE3, CX16, SSE4.1, SSE4.2, POPCNT in leaf 1 ECX; LAHF_LM.
        const LEAF1_ECX: u32 = 1 | 1 << 9 | 1 << 13 | 1 << 19 | 1 << 20 | 1 << 23;
        check(
            s,
            rt,
            "CPUID.01H:ECX reports SSE3..SSE4.2, CX16, POPCNT",
            |a, ok| {
                a.mov(eax, 1)?;
                a.xor(ecx, ecx)?;
                a.cpuid()?;
                a.and(ecx, LEAF1_ECX)?;
                a.cmp(ecx, LEAF1_ECX)?;
                a.je(ok)
            },
        )?;
        check(s, rt, "CPUID.80000001H:ECX reports LAHF_LM", |a, ok| {
            a.mov(eax, 0x8000_0001u32)?;
            a.xor(ecx, ecx)?;
            a.cpuid()?;
            a.test(ecx, 1)?;
            a.jnz(ok)
        })?;
        // SSE on: CR4.OSFXSR and OSXMMEXCPT.
        s.a.mov(rax, cr4)?;
        s.a.or(eax, 0x600)?;
        s.a.mov(cr4, rax)?;

        // SSE3: HADDPS adds neighbours, destination pairs low, source pairs high.
        load_xmm(&mut s.a, xmm0, f32x4([1.0, 2.0, 3.0, 4.0]))?;
        load_xmm(&mut s.a, xmm1, f32x4([10.0, 20.0, 30.0, 40.0]))?;
        s.a.haddps(xmm0, xmm1)?;
        check_xmm(s, rt, "HADDPS", xmm0, f32x4([3.0, 7.0, 30.0, 70.0]))?;
        // ADDSUBPS subtracts in even lanes, adds in odd ones.
        load_xmm(&mut s.a, xmm0, f32x4([1.0, 2.0, 3.0, 4.0]))?;
        s.a.addsubps(xmm0, xmm1)?;
        check_xmm(s, rt, "ADDSUBPS", xmm0, f32x4([-9.0, 22.0, -27.0, 44.0]))?;
        // LDDQU from an odd address (no alignment rule), MOVDDUP.
        let bytes: u128 = 0x0f0e_0d0c_0b0a_0908_0706_0504_0302_0100;
        load_xmm(&mut s.a, xmm2, bytes)?;
        s.a.movdqu(xmmword_ptr(DATA + 0x41), xmm2)?;
        s.a.lddqu(xmm3, xmmword_ptr(DATA + 0x41))?;
        check_xmm(s, rt, "LDDQU at an odd address", xmm3, bytes)?;
        s.a.movddup(xmm4, xmm2)?;
        check_xmm(
            s,
            rt,
            "MOVDDUP",
            xmm4,
            (bytes & u128::from(u64::MAX)) * ((1 << 64) + 1),
        )?;

        // SSSE3: PSHUFB reversing the bytes, PALIGNR, PABSD, PHADDW.
        load_xmm(
            &mut s.a,
            xmm5,
            u128::from_le_bytes(core::array::from_fn(|i| 15 - i as u8)),
        )?;
        s.a.movdqa(xmm6, xmm2)?;
        s.a.pshufb(xmm6, xmm5)?;
        check_xmm(s, rt, "PSHUFB", xmm6, bytes.swap_bytes())?;
        s.a.movdqa(xmm6, xmm5)?;
        s.a.palignr(xmm6, xmm2, 4)?;
        check_xmm(
            s,
            rt,
            "PALIGNR",
            xmm6,
            (bytes >> 32) | (0x0c0d_0e0f_u128 << 96),
        )?;
        load_xmm(&mut s.a, xmm7, 0x8000_0000_ffff_fffe_0000_0005_ffff_ffff)?;
        s.a.pabsd(xmm7, xmm7)?;
        check_xmm(
            s,
            rt,
            "PABSD",
            xmm7,
            0x8000_0000_0000_0002_0000_0005_0000_0001,
        )?;

        // SSE4.1: PMULLD, PTEST, ROUNDSD (floor), PINSRQ/PEXTRQ, BLENDVPS (XMM0 implicit).
        load_xmm(&mut s.a, xmm1, 0x0000_0003_ffff_ffff_0001_0000_0000_0007)?;
        load_xmm(&mut s.a, xmm2, 0x0000_0005_0000_0002_0001_0000_0000_0006)?;
        s.a.pmulld(xmm1, xmm2)?;
        check_xmm(
            s,
            rt,
            "PMULLD",
            xmm1,
            0x0000_000f_ffff_fffe_0000_0000_0000_002a,
        )?;
        check(
            s,
            rt,
            "PTEST: ZF with no common bit, CF clear when not covered",
            |a, ok| {
                load_xmm(a, xmm3, 0xff00)?;
                load_xmm(a, xmm4, 0x00ff)?;
                a.ptest(xmm3, xmm4)?;
                a.setz(bl)?;
                a.setc(bh)?;
                a.cmp(bx, 0x0001)?;
                a.je(ok)
            },
        )?;
        s.a.mov(rax, (-2.5f64).to_bits())?;
        s.a.movq(xmm5, rax)?;
        s.a.roundsd(xmm6, xmm5, 1)?;
        s.a.movq(rax, xmm6)?;
        check_reg(s, rt, "ROUNDSD toward -inf", rax, (-3.0f64).to_bits())?;
        s.a.mov(rax, 0x1122_3344_5566_7788u64)?;
        s.a.pinsrq(xmm6, rax, 1)?;
        s.a.pextrq(rbx, xmm6, 1)?;
        check_reg(s, rt, "PINSRQ/PEXTRQ", rbx, 0x1122_3344_5566_7788)?;
        load_xmm(&mut s.a, xmm0, 0x8000_0000_0000_0000_8000_0000_0000_0000)?;
        load_xmm(&mut s.a, xmm1, 0x1111_1111_2222_2222_3333_3333_4444_4444)?;
        load_xmm(&mut s.a, xmm2, 0xaaaa_aaaa_bbbb_bbbb_cccc_cccc_dddd_dddd)?;
        s.a.blendvps(xmm1, xmm2)?;
        check_xmm(
            s,
            rt,
            "BLENDVPS",
            xmm1,
            0xaaaa_aaaa_2222_2222_cccc_cccc_4444_4444,
        )?;

        // SSE4.2: PCMPGTQ (signed), PCMPISTRI, CRC32.
        load_xmm(&mut s.a, xmm1, 0x8000_0000_0000_0000_0000_0000_0000_0002)?;
        load_xmm(&mut s.a, xmm2, 0x0000_0000_0000_0000_0000_0000_0000_0001)?;
        s.a.pcmpgtq(xmm1, xmm2)?;
        check_xmm(s, rt, "PCMPGTQ", xmm1, u128::from(u64::MAX))?;
        load_xmm(
            &mut s.a,
            xmm1,
            u128::from_le_bytes(*b"hello\0\0\0\0\0\0\0\0\0\0\0"),
        )?;
        s.a.mov(rax, u64::from_le_bytes(*b"heXlo\0\0\0"))?;
        s.a.mov(qword_ptr(DATA + 0x81), rax)?;
        s.a.mov(qword_ptr(DATA + 0x89), 0)?;
        s.a.mov(rcx, 0xdead_beef_0000_0077u64)?;
        // Unsigned bytes, equal each, negated: the index of the first mismatch.
        s.a.pcmpistri(xmm1, xmmword_ptr(DATA + 0x81), 0x18)?;
        check_reg(s, rt, "PCMPISTRI", rcx, 2)?;
        let text = b"123456789";
        s.a.mov(rax, u64::from_le_bytes(*b"12345678"))?;
        s.a.mov(qword_ptr(DATA), rax)?;
        s.a.mov(byte_ptr(DATA + 8), i32::from(text[8]))?;
        s.a.mov(eax, -1)?;
        s.a.crc32(rax, qword_ptr(DATA))?;
        s.a.crc32(eax, byte_ptr(DATA + 8))?;
        s.a.not(eax)?;
        check_reg(
            s,
            rt,
            "CRC32 (CRC-32C of 123456789)",
            rax,
            u64::from(!crc32c(!0, text)),
        )?;

        // POPCNT.
        s.a.mov(rax, 0xf0f0_0000_0000_0f01u64)?;
        s.a.popcnt(rbx, rax)?;
        check_reg(s, rt, "POPCNT", rbx, 13)?;

        // CMPXCHG16B: equal (stores RCX:RBX, ZF), then unequal (loads RDX:RAX, no ZF).
        s.a.mov(rax, 0x1111u64)?;
        s.a.mov(qword_ptr(DATA + 0x20), rax)?;
        s.a.mov(rax, 0x2222u64)?;
        s.a.mov(qword_ptr(DATA + 0x28), rax)?;
        check(s, rt, "CMPXCHG16B with RDX:RAX equal sets ZF", |a, ok| {
            a.mov(eax, 0x1111)?;
            a.mov(edx, 0x2222)?;
            a.mov(ebx, 0x3333)?;
            a.mov(ecx, 0x4444)?;
            a.lock().cmpxchg16b(xmmword_ptr(DATA + 0x20))?;
            a.je(ok)
        })?;
        s.a.mov(rax, qword_ptr(DATA + 0x20))?;
        s.a.mov(rdx, qword_ptr(DATA + 0x28))?;
        check_reg(s, rt, "CMPXCHG16B stored RBX", rax, 0x3333)?;
        check_reg(s, rt, "CMPXCHG16B stored RCX", rdx, 0x4444)?;
        check(
            s,
            rt,
            "CMPXCHG16B with RDX:RAX unequal clears ZF",
            |a, ok| {
                a.mov(eax, 0x1111)?;
                a.mov(edx, 0x2222)?;
                a.cmpxchg16b(xmmword_ptr(DATA + 0x20))?;
                a.jne(ok)
            },
        )?;
        check_reg(s, rt, "CMPXCHG16B loaded RAX", rax, 0x3333)?;
        check_reg(s, rt, "CMPXCHG16B loaded RDX", rdx, 0x4444)?;

        // LAHF/SAHF in 64-bit mode: CF (and the always-set bit 1) into AH, AH into flags.
        check(s, rt, "LAHF/SAHF in 64-bit mode", |a, ok| {
            let mut bad = a.create_label();
            a.stc()?;
            a.lahf()?;
            a.mov(bl, ah)?;
            a.mov(ah, 0xd5)?;
            a.sahf()?;
            a.pushfq()?;
            a.pop(rcx)?;
            a.and(ecx, 0xd5)?;
            a.and(bl, 0x03)?;
            a.cmp(bl, 0x03)?;
            a.jne(bad)?;
            a.cmp(ecx, 0xd5)?;
            a.je(ok)?;
            a.set_label(&mut bad)?;
            a.nop()
        })?;

        // Beyond the level: CLFLUSHOPT and CLWB (CPUID.07H:EBX bits 23, 24) write a line
        // back (and evict it) without changing what memory reads.
        check(
            s,
            rt,
            "CPUID.07H:EBX reports CLFLUSHOPT and CLWB",
            |a, ok| {
                a.mov(eax, 7)?;
                a.xor(ecx, ecx)?;
                a.cpuid()?;
                a.and(ebx, 3 << 23)?;
                a.cmp(ebx, 3 << 23)?;
                a.je(ok)
            },
        )?;
        check(
            s,
            rt,
            "a line written back by CLWB, CLFLUSHOPT, CLFLUSH",
            |a, ok| {
                a.mov(rax, 0x0123_4567_89ab_cdefu64)?;
                a.mov(qword_ptr(DATA + 0xc0), rax)?;
                a.clwb(byte_ptr(DATA + 0xc0))?;
                a.clflushopt(byte_ptr(DATA + 0xc0))?;
                a.clflush(byte_ptr(DATA + 0xc0))?;
                a.sfence()?;
                a.cmp(qword_ptr(DATA + 0xc0), rax)?;
                a.je(ok)
            },
        )?;

        rt.print(s, format!("{PASS_LINE}\r\n").as_bytes())?;
        rt.exit_with(s, EXIT_PASS)
    })
}
