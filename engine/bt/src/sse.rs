//! SSE/SSE2 micro-ops as gcc-built 64-bit code uses them: moves, integer and logical
//! operations, and FXSAVE/FXRSTOR/LDMXCSR/STMXCSR.

use crate::core::crb;
use crate::exec::Ctx;
use crate::features::Features;
use crate::ir::{Ctl, Exc, OpResult, Operand, UOp};
use iced_x86::{Instruction, Mnemonic};

pub mod xsave;

fn sse_enabled(ctx: &Ctx) -> Result<(), Exc> {
    let c = &*ctx.core;
    if c.cr0 & crb::EM != 0 || c.cr4 & crb::OSFXSR == 0 {
        return Err(Exc::UD);
    }
    if c.cr0 & crb::TS != 0 {
        return Err(Exc::NM);
    }
    Ok(())
}

/// Reads a 128-bit (or narrower, zero-extended) operand.
fn get128(ctx: &mut Ctx, o: &Operand, size: u8, aligned: bool) -> Result<u128, Exc> {
    match *o {
        Operand::Xmm(r) => Ok(u128::from_le_bytes(ctx.core.fpu.xmm[r as usize])),
        Operand::Reg { idx, .. } => Ok(ctx.core.reg(idx, false, size.min(8)) as u128),
        Operand::Mem(m) => {
            let off = ctx.ea(&m);
            if aligned && size == 16 && off & 15 != 0 {
                return Err(Exc::gp(0));
            }
            let lin = ctx.linear(m.seg, off, size as u64, false)?;
            let mut b = [0u8; 16];
            let user = ctx.core.cpl() == 3;
            ctx.read_bytes(lin, &mut b[..size as usize], user)?;
            Ok(u128::from_le_bytes(b))
        }
        Operand::Imm(v) => Ok(v as u128),
        _ => Ok(0),
    }
}

fn put128(ctx: &mut Ctx, o: &Operand, size: u8, v: u128, aligned: bool) -> Result<(), Exc> {
    match *o {
        Operand::Xmm(r) => {
            ctx.core.fpu.xmm[r as usize] = v.to_le_bytes();
            Ok(())
        }
        Operand::Reg { idx, .. } => {
            ctx.core.set_reg(idx, false, size.min(8), v as u64);
            Ok(())
        }
        Operand::Mem(m) => {
            let off = ctx.ea(&m);
            if aligned && size == 16 && off & 15 != 0 {
                return Err(Exc::gp(0));
            }
            let lin = ctx.linear(m.seg, off, size as u64, true)?;
            let user = ctx.core.cpl() == 3;
            ctx.write_bytes(lin, &v.to_le_bytes()[..size as usize], user)
        }
        _ => Ok(()),
    }
}

/// Full-width moves (`aux` 1 = alignment checked).
fn mov128(ctx: &mut Ctx, op: &UOp) -> OpResult {
    sse_enabled(ctx)?;
    let v = get128(ctx, &op.src, 16, op.aux == 1)?;
    put128(ctx, &op.dst, 16, v, op.aux == 1)?;
    Ok(Ctl::Next)
}

/// MOVD/MOVQ (`size` 4 or 8): to an XMM register zero-extends.
fn movdq(ctx: &mut Ctx, op: &UOp) -> OpResult {
    sse_enabled(ctx)?;
    let v = get128(ctx, &op.src, op.size, false)? & ((1u128 << (op.size as u32 * 8)) - 1);
    put128(ctx, &op.dst, op.size, v, false)?;
    Ok(Ctl::Next)
}

/// MOVSS/MOVSD scalar moves (`size` 4 or 8): register-to-register merges the low element;
/// a load zero-extends; a store writes the low element.
fn movscalar(ctx: &mut Ctx, op: &UOp) -> OpResult {
    sse_enabled(ctx)?;
    let m = (1u128 << (op.size as u32 * 8)) - 1;
    let v = get128(ctx, &op.src, op.size, false)? & m;
    match (op.dst, op.src) {
        (Operand::Xmm(d), Operand::Xmm(_)) => {
            let cur = u128::from_le_bytes(ctx.core.fpu.xmm[d as usize]);
            ctx.core.fpu.xmm[d as usize] = ((cur & !m) | v).to_le_bytes();
        }
        _ => put128(ctx, &op.dst, op.size, v, false)?,
    }
    Ok(Ctl::Next)
}

fn lanes(v: u128, w: u32) -> impl Iterator<Item = u64> {
    let n = 128 / w;
    let m = if w == 64 { u64::MAX } else { (1u64 << w) - 1 };
    (0..n).map(move |i| ((v >> (i * w)) as u64) & m)
}

fn pack(vals: impl Iterator<Item = u64>, w: u32) -> u128 {
    let m = if w == 64 { u64::MAX } else { (1u64 << w) - 1 };
    vals.enumerate().fold(0u128, |acc, (i, x)| {
        acc | (((x & m) as u128) << (i as u32 * w))
    })
}

/// Packed integer and logical operations; `aux` selects the operation, `target` the lane
/// width in bits.
fn packed(ctx: &mut Ctx, op: &UOp) -> OpResult {
    sse_enabled(ctx)?;
    let a = get128(ctx, &op.dst, 16, false)?;
    let b = get128(ctx, &op.src, 16, op.src.is_mem())?;
    let w = op.target as u32;
    let r = match op.aux {
        packed_op::XOR => a ^ b,
        packed_op::AND => a & b,
        packed_op::OR => a | b,
        packed_op::ANDN => !a & b,
        packed_op::ADD => pack(
            lanes(a, w).zip(lanes(b, w)).map(|(x, y)| x.wrapping_add(y)),
            w,
        ),
        packed_op::SUB => pack(
            lanes(a, w).zip(lanes(b, w)).map(|(x, y)| x.wrapping_sub(y)),
            w,
        ),
        packed_op::CMPEQ => pack(
            lanes(a, w)
                .zip(lanes(b, w))
                .map(|(x, y)| if x == y { u64::MAX } else { 0 }),
            w,
        ),
        packed_op::UNPACK_LOW => {
            // PUNPCKL*: interleave the low halves.
            let la: Vec<u64> = lanes(a, w).collect();
            let lb: Vec<u64> = lanes(b, w).collect();
            let n = la.len() / 2;
            pack((0..n).flat_map(|i| [la[i], lb[i]]), w)
        }
        packed_op::UNPACK_HIGH => {
            let la: Vec<u64> = lanes(a, w).collect();
            let lb: Vec<u64> = lanes(b, w).collect();
            let n = la.len() / 2;
            pack((n..2 * n).flat_map(|i| [la[i], lb[i]]), w)
        }
        packed_op::MIN_UNSIGNED => pack(lanes(a, w).zip(lanes(b, w)).map(|(x, y)| x.min(y)), w),
        packed_op::MAX_UNSIGNED => pack(lanes(a, w).zip(lanes(b, w)).map(|(x, y)| x.max(y)), w),
        _ => return Err(Exc::UD),
    };
    put128(ctx, &op.dst, 16, r, false)?;
    Ok(Ctl::Next)
}

/// PMOVMSKB.
fn pmovmskb(ctx: &mut Ctx, op: &UOp) -> OpResult {
    sse_enabled(ctx)?;
    let v = get128(ctx, &op.src, 16, false)?;
    let mut r = 0u64;
    for i in 0..16 {
        if (v >> (i * 8 + 7)) & 1 != 0 {
            r |= 1 << i;
        }
    }
    ctx.put(&op.dst, op.size.max(4), r)?;
    Ok(Ctl::Next)
}

/// PSHUFD.
fn pshufd(ctx: &mut Ctx, op: &UOp) -> OpResult {
    sse_enabled(ctx)?;
    let v = get128(ctx, &op.src, 16, op.src.is_mem())?;
    let imm = match op.src2 {
        Operand::Imm(i) => i,
        _ => 0,
    };
    let l: Vec<u64> = lanes(v, 32).collect();
    let r = pack((0..4).map(|i| l[((imm >> (2 * i)) & 3) as usize]), 32);
    put128(ctx, &op.dst, 16, r, false)?;
    Ok(Ctl::Next)
}

/// Packed shifts by an immediate (`aux`: 0 left, 1 logical right, 2 byte left, 3 byte
/// right, 4 arithmetic right).
fn pshift(ctx: &mut Ctx, op: &UOp) -> OpResult {
    sse_enabled(ctx)?;
    let v = get128(ctx, &op.dst, 16, false)?;
    let n = match op.src {
        Operand::Imm(i) => i as u32,
        _ => (get128(ctx, &op.src, 16, op.src.is_mem())? as u64).min(255) as u32,
    };
    let w = op.target as u32;
    let r = match op.aux {
        shift_op::LEFT => pack(lanes(v, w).map(|x| if n >= w { 0 } else { x << n }), w),
        shift_op::RIGHT => pack(lanes(v, w).map(|x| if n >= w { 0 } else { x >> n }), w),
        shift_op::BYTES_LEFT => {
            if n >= 16 {
                0
            } else {
                v << (n * 8)
            }
        }
        shift_op::BYTES_RIGHT => {
            if n >= 16 {
                0
            } else {
                v >> (n * 8)
            }
        }
        // shift_op::RIGHT_ARITHMETIC
        _ => pack(
            lanes(v, w).map(|x| {
                let s = crate::core::sext(x, (w / 8) as u8) as i64;
                (s >> n.min(w - 1)) as u64
            }),
            w,
        ),
    };
    put128(ctx, &op.dst, 16, r, false)?;
    Ok(Ctl::Next)
}

/// LDMXCSR (`aux` 0) / STMXCSR (`aux` 1).
fn mxcsr(ctx: &mut Ctx, op: &UOp) -> OpResult {
    sse_enabled(ctx)?;
    if op.aux == 0 {
        let v = ctx.get(&op.dst, 4)?;
        if v & !0xffff != 0 {
            return Err(Exc::gp(0));
        }
        ctx.core.fpu.mxcsr = v as u32;
    } else {
        let v = ctx.core.fpu.mxcsr as u64;
        ctx.put(&op.dst, 4, v)?;
    }
    Ok(Ctl::Next)
}

/// FXSAVE (`aux` 0) / FXRSTOR (`aux` 1) in the 64-bit layout (`size` 8) or 32-bit layout.
fn fxsave(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let c = &*ctx.core;
    if c.cr0 & crb::EM != 0 {
        return Err(Exc::UD);
    }
    if c.cr0 & crb::TS != 0 {
        return Err(Exc::NM);
    }
    let Operand::Mem(m) = op.dst else {
        return Err(Exc::UD);
    };
    let off = ctx.ea(&m);
    // The area must be 16-byte aligned, #GP(0) otherwise. With alignment checking on, the
    // SDM lets an implementation raise #AC instead for some misalignments; deja does what
    // this project's host CPUs do natively in ring 3 (measured on AMD EPYC, as the SDM's
    // example describes): #AC(0) when the address is not 4-byte aligned, #GP(0) when it is
    // but not 16-byte aligned.
    let lin = ctx.linear_aligned(m.seg, off, 512, op.aux == 0, 4)?;
    if off & 15 != 0 {
        return Err(Exc::gp(0));
    }
    let user = ctx.core.cpl() == 3;
    if op.aux == 0 {
        let b = fx_image(ctx, op.size == 8);
        ctx.write_bytes(lin, &b, user)?;
    } else {
        let mut b = [0u8; 512];
        ctx.read_bytes(lin, &mut b, user)?;
        let mx = u32::from_le_bytes([b[24], b[25], b[26], b[27]]);
        if mx & !MXCSR_MASK != 0 {
            return Err(Exc::gp(0));
        }
        fx_load_x87(ctx, &b, op.size == 8);
        ctx.core.fpu.mxcsr = mx;
        fx_load_xmm(ctx, &b);
        crate::native::x87_error_sync(ctx);
    }
    Ok(Ctl::Next)
}

/// The MXCSR bits deja's CPU implements (the MXCSR_MASK FXSAVE stores: DAZ included);
/// loading any other bit raises #GP(0).
pub(crate) const MXCSR_MASK: u32 = 0xffff;

/// The FXSAVE image of the x87 and SSE state (XSAVE's legacy region is the same 512 bytes):
/// the 64-bit layout with `rex_w` (FXSAVE64), else the 32-bit one, which in 64-bit mode
/// stores the low halves of FIP/FDP with the CS and DS selectors. XMM8-15 only in 64-bit mode.
pub(crate) fn fx_image(ctx: &Ctx, rex_w: bool) -> [u8; 512] {
    let mode64 = ctx.core.mode64();
    let xmm_count = if mode64 { 16 } else { 8 };
    let cs = ctx.core.seg[deja_machine::cpu::seg::CS].selector;
    let ds = ctx.core.seg[deja_machine::cpu::seg::DS].selector;
    let f = &ctx.core.fpu;
    let mut b = [0u8; 512];
    b[0..2].copy_from_slice(&f.fcw.to_le_bytes());
    b[2..4].copy_from_slice(&f.fsw.to_le_bytes());
    b[4] = f.ftw;
    // The last opcode only with an exception pending (Intel, FOP compatibility mode off).
    let fop = if f.fsw & 0x80 != 0 { f.fop } else { 0 };
    b[6..8].copy_from_slice(&fop.to_le_bytes());
    b[8..16].copy_from_slice(&f.fip.to_le_bytes());
    b[16..24].copy_from_slice(&f.fdp.to_le_bytes());
    if !rex_w && mode64 {
        // The 32-bit layout in 64-bit mode: offsets' low halves and the selectors.
        b[12..14].copy_from_slice(&cs.to_le_bytes());
        b[14..16].fill(0);
        b[20..22].copy_from_slice(&ds.to_le_bytes());
        b[22..24].fill(0);
    }
    b[24..28].copy_from_slice(&f.mxcsr.to_le_bytes());
    b[28..32].copy_from_slice(&MXCSR_MASK.to_le_bytes());
    for i in 0..8 {
        b[32 + i * 16..48 + i * 16].copy_from_slice(&f.st[i]);
    }
    for i in 0..xmm_count {
        b[160 + i * 16..176 + i * 16].copy_from_slice(&f.xmm[i]);
    }
    b
}

/// Loads the x87 part of an FXSAVE image (bytes 0-23 and 32-159; `rex_w` as in
/// [`fx_image`]). The caller syncs FERR# afterwards ([`crate::native::x87_error_sync`]).
pub(crate) fn fx_load_x87(ctx: &mut Ctx, b: &[u8; 512], rex_w: bool) {
    let mode64 = ctx.core.mode64();
    let f = &mut ctx.core.fpu;
    f.fcw = u16::from_le_bytes([b[0], b[1]]);
    f.fsw = u16::from_le_bytes([b[2], b[3]]);
    f.ftw = b[4];
    f.fop = u16::from_le_bytes([b[6], b[7]]);
    f.fip = u64::from_le_bytes(b[8..16].try_into().unwrap_or([0; 8]));
    f.fdp = u64::from_le_bytes(b[16..24].try_into().unwrap_or([0; 8]));
    if !rex_w && mode64 {
        f.fip &= 0xffff_ffff;
        f.fdp &= 0xffff_ffff;
    }
    for i in 0..8 {
        f.st[i].copy_from_slice(&b[32 + i * 16..48 + i * 16]);
    }
}

/// Loads the XMM registers of an FXSAVE image (XMM8-15 only in 64-bit mode).
pub(crate) fn fx_load_xmm(ctx: &mut Ctx, b: &[u8; 512]) {
    let xmm_count = if ctx.core.mode64() { 16 } else { 8 };
    let f = &mut ctx.core.fpu;
    for i in 0..xmm_count {
        f.xmm[i].copy_from_slice(&b[160 + i * 16..176 + i * 16]);
    }
}

/// Element width in bits of a packed-integer instruction (the b/w/d/q its name ends in).
fn lane_bits(m: Mnemonic) -> u64 {
    use Mnemonic::*;
    match m {
        Paddb | Psubb | Pcmpeqb | Punpcklbw | Punpckhbw | Pminub | Pmaxub => 8,
        Paddw | Psubw | Pcmpeqw | Punpcklwd | Punpckhwd | Psllw | Psrlw | Psraw => 16,
        Paddd | Psubd | Pcmpeqd | Punpckldq | Punpckhdq | Pslld | Psrld | Psrad => 32,
        _ => 64,
    }
}

/// Picks the handler for SSE, MMX and x87 instructions: the exact software forms here for
/// the XMM moves and integer operations gcc-built code uses most (no MXCSR involvement, no
/// host FPU round trip), the environment and masked-store instructions in [`crate::x87`],
/// and host execution ([`crate::native`]) for the rest; anything else stays unimplemented.
pub fn build(insn: &Instruction, bitness: u32, op: &mut UOp, features: &Features) {
    let mmx = (0..insn.op_count())
        .any(|i| insn.op_kind(i) == iced_x86::OpKind::Register && insn.op_register(i).is_mm());
    if (mmx || !software(insn, op)) && !crate::x87::build(insn, op) {
        crate::native::build(insn, bitness, op, features);
    }
}

/// The operations [`packed`] does, by `aux`.
mod packed_op {
    pub const XOR: u8 = 0;
    pub const AND: u8 = 1;
    pub const OR: u8 = 2;
    pub const ANDN: u8 = 3;
    pub const ADD: u8 = 4;
    pub const SUB: u8 = 5;
    pub const CMPEQ: u8 = 6;
    pub const UNPACK_LOW: u8 = 7;
    pub const UNPACK_HIGH: u8 = 8;
    pub const MIN_UNSIGNED: u8 = 9;
    pub const MAX_UNSIGNED: u8 = 10;
}

/// The shifts [`pshift`] does, by `aux`.
mod shift_op {
    pub const LEFT: u8 = 0;
    pub const RIGHT: u8 = 1;
    pub const BYTES_LEFT: u8 = 2;
    pub const BYTES_RIGHT: u8 = 3;
    pub const RIGHT_ARITHMETIC: u8 = 4;
}

/// The packed instructions done in software: mnemonic, handler, its `aux` (the element
/// width, in `target`, comes from [`lane_bits`]).
const PACKED_FORMS: &[(Mnemonic, crate::ir::Handler, u8)] = {
    use Mnemonic::*;
    use packed_op::*;
    use shift_op::*;
    &[
        (Pxor, packed, XOR),
        (Xorps, packed, XOR),
        (Xorpd, packed, XOR),
        (Pand, packed, AND),
        (Andps, packed, AND),
        (Andpd, packed, AND),
        (Por, packed, OR),
        (Orps, packed, OR),
        (Orpd, packed, OR),
        (Pandn, packed, ANDN),
        (Andnps, packed, ANDN),
        (Andnpd, packed, ANDN),
        (Paddb, packed, ADD),
        (Paddw, packed, ADD),
        (Paddd, packed, ADD),
        (Paddq, packed, ADD),
        (Psubb, packed, SUB),
        (Psubw, packed, SUB),
        (Psubd, packed, SUB),
        (Psubq, packed, SUB),
        (Pcmpeqb, packed, CMPEQ),
        (Pcmpeqw, packed, CMPEQ),
        (Pcmpeqd, packed, CMPEQ),
        (Punpcklbw, packed, UNPACK_LOW),
        (Punpcklwd, packed, UNPACK_LOW),
        (Punpckldq, packed, UNPACK_LOW),
        (Punpcklqdq, packed, UNPACK_LOW),
        (Punpckhbw, packed, UNPACK_HIGH),
        (Punpckhwd, packed, UNPACK_HIGH),
        (Punpckhdq, packed, UNPACK_HIGH),
        (Punpckhqdq, packed, UNPACK_HIGH),
        (Pminub, packed, MIN_UNSIGNED),
        (Pmaxub, packed, MAX_UNSIGNED),
        (Psllw, pshift, LEFT),
        (Pslld, pshift, LEFT),
        (Psllq, pshift, LEFT),
        (Psrlw, pshift, RIGHT),
        (Psrld, pshift, RIGHT),
        (Psrlq, pshift, RIGHT),
        (Psraw, pshift, RIGHT_ARITHMETIC),
        (Psrad, pshift, RIGHT_ARITHMETIC),
        (Pslldq, pshift, BYTES_LEFT),
        (Psrldq, pshift, BYTES_RIGHT),
    ]
};

/// The software SSE forms; returns whether `op` got one.
fn software(insn: &Instruction, op: &mut UOp) -> bool {
    let m = insn.mnemonic();
    if let Some(&(_, exec, aux)) = PACKED_FORMS.iter().find(|f| f.0 == m) {
        op.aux = aux;
        op.target = lane_bits(m);
        op.exec = exec;
        return true;
    }
    match m {
        Mnemonic::Movaps | Mnemonic::Movapd | Mnemonic::Movdqa => {
            op.aux = 1;
            op.exec = mov128;
        }
        Mnemonic::Movups | Mnemonic::Movupd | Mnemonic::Movdqu => {
            op.aux = 0;
            op.exec = mov128;
        }
        Mnemonic::Movd | Mnemonic::Movq => {
            op.size = if m == Mnemonic::Movd { 4 } else { 8 };
            op.exec = movdq;
        }
        Mnemonic::Movss => {
            op.size = 4;
            op.exec = movscalar;
        }
        Mnemonic::Movsd if !insn.is_string_instruction() => {
            op.size = 8;
            op.exec = movscalar;
        }
        Mnemonic::Pmovmskb => op.exec = pmovmskb,
        Mnemonic::Pshufd => op.exec = pshufd,
        Mnemonic::Ldmxcsr | Mnemonic::Stmxcsr => {
            op.aux = (m == Mnemonic::Stmxcsr) as u8;
            op.exec = mxcsr;
        }
        Mnemonic::Fxsave | Mnemonic::Fxsave64 | Mnemonic::Fxrstor | Mnemonic::Fxrstor64 => {
            op.aux = matches!(m, Mnemonic::Fxrstor | Mnemonic::Fxrstor64) as u8;
            op.size = if matches!(m, Mnemonic::Fxsave64 | Mnemonic::Fxrstor64) {
                8
            } else {
                4
            };
            op.exec = fxsave;
        }
        Mnemonic::Xsave
        | Mnemonic::Xsave64
        | Mnemonic::Xsaveopt
        | Mnemonic::Xsaveopt64
        | Mnemonic::Xrstor
        | Mnemonic::Xrstor64 => {
            op.aux = match m {
                Mnemonic::Xsave | Mnemonic::Xsave64 => xsave::XSAVE,
                Mnemonic::Xsaveopt | Mnemonic::Xsaveopt64 => xsave::XSAVEOPT,
                _ => xsave::XRSTOR,
            };
            op.size = if matches!(
                m,
                Mnemonic::Xsave64 | Mnemonic::Xsaveopt64 | Mnemonic::Xrstor64
            ) {
                8
            } else {
                4
            };
            op.exec = xsave::xsave;
        }
        Mnemonic::Xgetbv => op.exec = xsave::xgetbv,
        Mnemonic::Xsetbv => op.exec = xsave::xsetbv,
        _ => return false,
    }
    true
}
