//! SSE/SSE2 micro-ops as gcc-built 64-bit code uses them: moves, integer and logical
//! operations, and FXSAVE/FXRSTOR/LDMXCSR/STMXCSR.

use crate::core::crb;
use crate::exec::Ctx;
use crate::ir::{Ctl, Exc, OpResult, Operand, UOp};
use iced_x86::{Instruction, Mnemonic};

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
        0 => a ^ b,
        1 => a & b,
        2 => a | b,
        3 => !a & b,
        4 => pack(
            lanes(a, w).zip(lanes(b, w)).map(|(x, y)| x.wrapping_add(y)),
            w,
        ),
        5 => pack(
            lanes(a, w).zip(lanes(b, w)).map(|(x, y)| x.wrapping_sub(y)),
            w,
        ),
        6 => pack(
            lanes(a, w)
                .zip(lanes(b, w))
                .map(|(x, y)| if x == y { u64::MAX } else { 0 }),
            w,
        ),
        7 => {
            // PUNPCKL*: interleave the low halves.
            let la: Vec<u64> = lanes(a, w).collect();
            let lb: Vec<u64> = lanes(b, w).collect();
            let n = la.len() / 2;
            pack((0..n).flat_map(|i| [la[i], lb[i]]), w)
        }
        8 => {
            let la: Vec<u64> = lanes(a, w).collect();
            let lb: Vec<u64> = lanes(b, w).collect();
            let n = la.len() / 2;
            pack((n..2 * n).flat_map(|i| [la[i], lb[i]]), w)
        }
        9 => pack(lanes(a, w).zip(lanes(b, w)).map(|(x, y)| x.min(y)), w),
        10 => pack(lanes(a, w).zip(lanes(b, w)).map(|(x, y)| x.max(y)), w),
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
        0 => pack(lanes(v, w).map(|x| if n >= w { 0 } else { x << n }), w),
        1 => pack(lanes(v, w).map(|x| if n >= w { 0 } else { x >> n }), w),
        2 => {
            if n >= 16 {
                0
            } else {
                v << (n * 8)
            }
        }
        3 => {
            if n >= 16 {
                0
            } else {
                v >> (n * 8)
            }
        }
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
    if off & 15 != 0 {
        return Err(Exc::gp(0));
    }
    let lin = ctx.linear(m.seg, off, 512, op.aux == 0)?;
    let user = ctx.core.cpl() == 3;
    let xmm_count = if ctx.core.mode64() { 16 } else { 8 };
    if op.aux == 0 {
        let f = &ctx.core.fpu;
        let mut b = vec![0u8; 512];
        b[0..2].copy_from_slice(&f.fcw.to_le_bytes());
        b[2..4].copy_from_slice(&f.fsw.to_le_bytes());
        b[4] = f.ftw;
        b[6..8].copy_from_slice(&f.fop.to_le_bytes());
        b[8..16].copy_from_slice(&f.fip.to_le_bytes());
        b[16..24].copy_from_slice(&f.fdp.to_le_bytes());
        b[24..28].copy_from_slice(&f.mxcsr.to_le_bytes());
        b[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
        for i in 0..8 {
            b[32 + i * 16..48 + i * 16].copy_from_slice(&f.st[i]);
        }
        for i in 0..xmm_count {
            b[160 + i * 16..176 + i * 16].copy_from_slice(&f.xmm[i]);
        }
        ctx.write_bytes(lin, &b, user)?;
    } else {
        let mut b = vec![0u8; 512];
        ctx.read_bytes(lin, &mut b, user)?;
        let mx = u32::from_le_bytes([b[24], b[25], b[26], b[27]]);
        if mx & !0xffff != 0 {
            return Err(Exc::gp(0));
        }
        let f = &mut ctx.core.fpu;
        f.fcw = u16::from_le_bytes([b[0], b[1]]);
        f.fsw = u16::from_le_bytes([b[2], b[3]]);
        f.ftw = b[4];
        f.fop = u16::from_le_bytes([b[6], b[7]]);
        f.fip = u64::from_le_bytes(b[8..16].try_into().unwrap_or([0; 8]));
        f.fdp = u64::from_le_bytes(b[16..24].try_into().unwrap_or([0; 8]));
        f.mxcsr = mx;
        for i in 0..8 {
            f.st[i].copy_from_slice(&b[32 + i * 16..48 + i * 16]);
        }
        for i in 0..xmm_count {
            f.xmm[i].copy_from_slice(&b[160 + i * 16..176 + i * 16]);
        }
    }
    Ok(Ctl::Next)
}

/// Scalar and packed floating point arithmetic (`aux`: 0 add, 1 sub, 2 mul, 3 div, 4 min,
/// 5 max, 6 sqrt; `size` 4 or 8 = element width; `target` 1 = packed). The host is x86, so
/// Rust's `f32`/`f64` operations are the same SSE operations in the default MXCSR mode
/// (round to nearest, exceptions masked), including NaN propagation; min/max follow the
/// SSE rule (the second operand when either is NaN or both are zero).
fn fparith(ctx: &mut Ctx, op: &UOp) -> OpResult {
    sse_enabled(ctx)?;
    let packed = op.target == 1;
    let w = op.size as u32 * 8;
    let a = get128(ctx, &op.dst, 16, false)?;
    let bsize = if packed { 16 } else { op.size };
    let b = get128(ctx, &op.src, bsize, packed && op.src.is_mem())?;
    let n = if packed { 128 / w } else { 1 };
    let mut r = a;
    for i in 0..n {
        let sh = i * w;
        let m = if w == 64 { u64::MAX } else { (1u64 << w) - 1 };
        let x = ((a >> sh) as u64) & m;
        let y = ((b >> sh) as u64) & m;
        let z = if w == 64 {
            let (x, y) = (f64::from_bits(x), f64::from_bits(y));
            let v = match op.aux {
                0 => x + y,
                1 => x - y,
                2 => x * y,
                3 => x / y,
                4 => {
                    if x < y {
                        x
                    } else {
                        y
                    }
                }
                5 => {
                    if x > y {
                        x
                    } else {
                        y
                    }
                }
                _ => y.sqrt(),
            };
            v.to_bits()
        } else {
            let (x, y) = (f32::from_bits(x as u32), f32::from_bits(y as u32));
            let v = match op.aux {
                0 => x + y,
                1 => x - y,
                2 => x * y,
                3 => x / y,
                4 => {
                    if x < y {
                        x
                    } else {
                        y
                    }
                }
                5 => {
                    if x > y {
                        x
                    } else {
                        y
                    }
                }
                _ => y.sqrt(),
            };
            v.to_bits() as u64
        };
        let lane = (m as u128) << sh;
        r = (r & !lane) | ((z as u128) << sh);
    }
    put128(ctx, &op.dst, 16, r, false)?;
    Ok(Ctl::Next)
}

/// UCOMISS/UCOMISD/COMISS/COMISD: ZF, PF, CF from the comparison; OF, SF, AF cleared.
fn fpcompare(ctx: &mut Ctx, op: &UOp) -> OpResult {
    sse_enabled(ctx)?;
    let a = get128(ctx, &op.dst, op.size, false)? as u64;
    let b = get128(ctx, &op.src, op.size, false)? as u64;
    let ord = if op.size == 8 {
        f64::from_bits(a).partial_cmp(&f64::from_bits(b))
    } else {
        f32::from_bits(a as u32).partial_cmp(&f32::from_bits(b as u32))
    };
    use crate::core::fl;
    let f = match ord {
        None => fl::ZF | fl::PF | fl::CF,
        Some(std::cmp::Ordering::Less) => fl::CF,
        Some(std::cmp::Ordering::Equal) => fl::ZF,
        Some(std::cmp::Ordering::Greater) => 0,
    };
    ctx.core.set_arith(f);
    Ok(Ctl::Next)
}

/// Conversions (`aux`: 0 int -> f64, 1 int -> f32, 2 f64 -> int truncating, 3 f32 -> int
/// truncating, 4 f32 -> f64, 5 f64 -> f32; `size` = integer width for 0-3).
fn convert(ctx: &mut Ctx, op: &UOp) -> OpResult {
    sse_enabled(ctx)?;
    match op.aux {
        0 | 1 => {
            let v = ctx.get(&op.src, op.size)?;
            let i = crate::core::sext(v, op.size) as i64;
            let cur = u128::from_le_bytes(match op.dst {
                Operand::Xmm(d) => ctx.core.fpu.xmm[d as usize],
                _ => return Err(Exc::UD),
            });
            let r = if op.aux == 0 {
                (cur & !(u64::MAX as u128)) | (i as f64).to_bits() as u128
            } else {
                (cur & !(u32::MAX as u128)) | (i as f32).to_bits() as u128
            };
            put128(ctx, &op.dst, 16, r, false)?;
        }
        2 | 3 => {
            let src = get128(ctx, &op.src, if op.aux == 2 { 8 } else { 4 }, false)? as u64;
            let x = if op.aux == 2 {
                f64::from_bits(src)
            } else {
                f32::from_bits(src as u32) as f64
            };
            let bits = op.size as u32 * 8;
            let lim = 2f64.powi(bits as i32 - 1);
            // Out of range and NaN give the "integer indefinite" value.
            let r = if x.is_nan() || x >= lim || x < -lim {
                1u64 << (bits - 1)
            } else {
                (x.trunc() as i64) as u64 & crate::core::mask(op.size)
            };
            ctx.put(&op.dst, op.size, r)?;
        }
        4 | 5 => {
            let src = get128(ctx, &op.src, if op.aux == 4 { 4 } else { 8 }, false)? as u64;
            let cur = u128::from_le_bytes(match op.dst {
                Operand::Xmm(d) => ctx.core.fpu.xmm[d as usize],
                _ => return Err(Exc::UD),
            });
            let r = if op.aux == 4 {
                let v = f32::from_bits(src as u32) as f64;
                (cur & !(u64::MAX as u128)) | v.to_bits() as u128
            } else {
                let v = f64::from_bits(src) as f32;
                (cur & !(u32::MAX as u128)) | v.to_bits() as u128
            };
            put128(ctx, &op.dst, 16, r, false)?;
        }
        _ => return Err(Exc::UD),
    }
    Ok(Ctl::Next)
}

/// Element width in bits of a packed-integer instruction (the b/w/d/q its name ends in).
fn lane_bits(m: Mnemonic) -> u64 {
    use Mnemonic::*;
    match m {
        Paddb | Psubb | Pcmpeqb | Punpcklbw | Punpckhbw => 8,
        Paddw | Psubw | Pcmpeqw | Punpcklwd | Punpckhwd | Psllw | Psrlw => 16,
        Paddd | Psubd | Pcmpeqd | Punpckldq | Punpckhdq | Pslld | Psrld => 32,
        _ => 64,
    }
}

/// Picks the handler for SSE instructions; anything else stays unimplemented.
pub fn build(insn: &Instruction, op: &mut UOp) {
    let m = insn.mnemonic();
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
        Mnemonic::Pxor | Mnemonic::Xorps | Mnemonic::Xorpd => {
            op.aux = 0;
            op.exec = packed;
        }
        Mnemonic::Pand | Mnemonic::Andps | Mnemonic::Andpd => {
            op.aux = 1;
            op.exec = packed;
        }
        Mnemonic::Por | Mnemonic::Orps | Mnemonic::Orpd => {
            op.aux = 2;
            op.exec = packed;
        }
        Mnemonic::Pandn | Mnemonic::Andnps | Mnemonic::Andnpd => {
            op.aux = 3;
            op.exec = packed;
        }
        Mnemonic::Paddb | Mnemonic::Paddw | Mnemonic::Paddd | Mnemonic::Paddq => {
            op.aux = 4;
            op.target = lane_bits(m);
            op.exec = packed;
        }
        Mnemonic::Psubb | Mnemonic::Psubw | Mnemonic::Psubd | Mnemonic::Psubq => {
            op.aux = 5;
            op.target = lane_bits(m);
            op.exec = packed;
        }
        Mnemonic::Pcmpeqb | Mnemonic::Pcmpeqw | Mnemonic::Pcmpeqd => {
            op.aux = 6;
            op.target = lane_bits(m);
            op.exec = packed;
        }
        Mnemonic::Punpcklbw | Mnemonic::Punpcklwd | Mnemonic::Punpckldq | Mnemonic::Punpcklqdq => {
            op.aux = 7;
            op.target = lane_bits(m);
            op.exec = packed;
        }
        Mnemonic::Punpckhbw | Mnemonic::Punpckhwd | Mnemonic::Punpckhdq | Mnemonic::Punpckhqdq => {
            op.aux = 8;
            op.target = lane_bits(m);
            op.exec = packed;
        }
        Mnemonic::Pminub => {
            op.aux = 9;
            op.target = 8;
            op.exec = packed;
        }
        Mnemonic::Pmaxub => {
            op.aux = 10;
            op.target = 8;
            op.exec = packed;
        }
        Mnemonic::Pmovmskb => op.exec = pmovmskb,
        Mnemonic::Pshufd => op.exec = pshufd,
        Mnemonic::Psllw | Mnemonic::Pslld | Mnemonic::Psllq => {
            op.aux = 0;
            op.target = lane_bits(m);
            op.exec = pshift;
        }
        Mnemonic::Psrlw | Mnemonic::Psrld | Mnemonic::Psrlq => {
            op.aux = 1;
            op.target = lane_bits(m);
            op.exec = pshift;
        }
        Mnemonic::Psraw | Mnemonic::Psrad => {
            op.aux = 4;
            op.target = if m == Mnemonic::Psraw { 16 } else { 32 };
            op.exec = pshift;
        }
        Mnemonic::Pslldq => {
            op.aux = 2;
            op.exec = pshift;
        }
        Mnemonic::Psrldq => {
            op.aux = 3;
            op.exec = pshift;
        }
        Mnemonic::Addsd
        | Mnemonic::Subsd
        | Mnemonic::Mulsd
        | Mnemonic::Divsd
        | Mnemonic::Minsd
        | Mnemonic::Maxsd
        | Mnemonic::Sqrtsd
        | Mnemonic::Addss
        | Mnemonic::Subss
        | Mnemonic::Mulss
        | Mnemonic::Divss
        | Mnemonic::Minss
        | Mnemonic::Maxss
        | Mnemonic::Sqrtss
        | Mnemonic::Addpd
        | Mnemonic::Subpd
        | Mnemonic::Mulpd
        | Mnemonic::Divpd
        | Mnemonic::Addps
        | Mnemonic::Subps
        | Mnemonic::Mulps
        | Mnemonic::Divps => {
            let name = format!("{m:?}");
            op.aux = match &name[..3] {
                "Add" => 0,
                "Sub" => 1,
                "Mul" => 2,
                "Div" => 3,
                "Min" => 4,
                "Max" => 5,
                _ => 6,
            };
            op.size = if name.ends_with('d') { 8 } else { 4 };
            op.target = u64::from(name.ends_with("pd") || name.ends_with("ps"));
            op.exec = fparith;
        }
        Mnemonic::Ucomisd | Mnemonic::Comisd | Mnemonic::Ucomiss | Mnemonic::Comiss => {
            op.size = if matches!(m, Mnemonic::Ucomisd | Mnemonic::Comisd) {
                8
            } else {
                4
            };
            op.exec = fpcompare;
        }
        Mnemonic::Cvtsi2sd | Mnemonic::Cvtsi2ss => {
            op.aux = u8::from(m == Mnemonic::Cvtsi2ss);
            op.size = match insn.op1_kind() {
                iced_x86::OpKind::Register => insn.op1_register().size() as u8,
                _ => insn.memory_size().size() as u8,
            };
            op.exec = convert;
        }
        Mnemonic::Cvttsd2si | Mnemonic::Cvttss2si => {
            op.aux = if m == Mnemonic::Cvttsd2si { 2 } else { 3 };
            op.size = insn.op0_register().size() as u8;
            op.exec = convert;
        }
        Mnemonic::Cvtss2sd | Mnemonic::Cvtsd2ss => {
            op.aux = if m == Mnemonic::Cvtss2sd { 4 } else { 5 };
            op.exec = convert;
        }
        Mnemonic::Ldmxcsr | Mnemonic::Stmxcsr => {
            op.aux = (m == Mnemonic::Stmxcsr) as u8;
            op.exec = mxcsr;
        }
        Mnemonic::Fxsave | Mnemonic::Fxsave64 | Mnemonic::Fxrstor | Mnemonic::Fxrstor64 => {
            op.aux = matches!(m, Mnemonic::Fxrstor | Mnemonic::Fxrstor64) as u8;
            op.exec = fxsave;
        }
        _ => {}
    }
}
