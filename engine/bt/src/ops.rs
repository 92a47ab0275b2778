//! Handlers of the general-purpose integer micro-ops: data movement, ALU with lazy flags,
//! shifts and rotates with exact flags, multiply and divide, bit operations, BCD, control
//! transfer within a code segment, and the string instructions.

use crate::core::{FlagOp, fl, mask, msb, sext};
use crate::exec::Ctx;
use crate::ir::{Ctl, Exc, NO_REG, OpResult, Operand, UOp};
use deja_machine::cpu::seg;

/// ALU kinds carried in `UOp::aux`.
pub mod alu {
    #![allow(missing_docs)]
    pub const ADD: u8 = 0;
    pub const OR: u8 = 1;
    pub const ADC: u8 = 2;
    pub const SBB: u8 = 3;
    pub const AND: u8 = 4;
    pub const SUB: u8 = 5;
    pub const XOR: u8 = 6;
    pub const CMP: u8 = 7;
    pub const TEST: u8 = 8;
}

#[inline(always)]
fn live(ctx: &Ctx, op: &UOp) -> bool {
    op.flags_live || ctx.exact_flags
}

/// Computes an ALU result; returns it and the lazy-flag producer.
#[inline(always)]
fn alu_compute(ctx: &Ctx, kind: u8, size: u8, a: u64, b: u64) -> (u64, FlagOp) {
    let m = mask(size);
    let (r, f) = match kind {
        alu::ADD => (a.wrapping_add(b), FlagOp::Add),
        alu::OR => (a | b, FlagOp::Logic),
        alu::ADC => {
            if ctx.core.cf() {
                (a.wrapping_add(b).wrapping_add(1), FlagOp::AdcCarry)
            } else {
                (a.wrapping_add(b), FlagOp::Add)
            }
        }
        alu::SBB => {
            if ctx.core.cf() {
                (a.wrapping_sub(b).wrapping_sub(1), FlagOp::SbbBorrow)
            } else {
                (a.wrapping_sub(b), FlagOp::Sub)
            }
        }
        alu::AND | alu::TEST => (a & b, FlagOp::Logic),
        alu::XOR => (a ^ b, FlagOp::Logic),
        _ => (a.wrapping_sub(b), FlagOp::Sub),
    };
    (r & m, f)
}

/// ALU between two registers (no high-byte registers).
pub fn alu_rr(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let (Operand::Reg { idx: d, .. }, Operand::Reg { idx: s, .. }) = (op.dst, op.src) else {
        return alu_any(ctx, op);
    };
    let m = mask(op.size);
    let a = ctx.core.gpr[d as usize] & m;
    let b = ctx.core.gpr[s as usize] & m;
    let (r, f) = alu_compute(ctx, op.aux, op.size, a, b);
    if op.aux < alu::CMP {
        ctx.core.set_reg(d, false, op.size, r);
    }
    if live(ctx, op) {
        ctx.core.set_lazy(f, op.size, r, a, b);
    }
    Ok(Ctl::Next)
}

/// ALU of a register with an immediate (no high-byte registers).
pub fn alu_ri(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let (Operand::Reg { idx: d, .. }, Operand::Imm(b)) = (op.dst, op.src) else {
        return alu_any(ctx, op);
    };
    let m = mask(op.size);
    let a = ctx.core.gpr[d as usize] & m;
    let (r, f) = alu_compute(ctx, op.aux, op.size, a, b);
    if op.aux < alu::CMP {
        ctx.core.set_reg(d, false, op.size, r);
    }
    if live(ctx, op) {
        ctx.core.set_lazy(f, op.size, r, a, b);
    }
    Ok(Ctl::Next)
}

#[inline(always)]
fn alu_const<const K: u8, const S: u8>(ctx: &mut Ctx, op: &UOp, d: u8, a: u64, b: u64) {
    let m = mask(S);
    let (r, f) = match K {
        alu::ADD => (a.wrapping_add(b) & m, FlagOp::Add),
        alu::OR => (a | b, FlagOp::Logic),
        alu::AND | alu::TEST => (a & b, FlagOp::Logic),
        alu::XOR => (a ^ b, FlagOp::Logic),
        alu::SUB | alu::CMP => (a.wrapping_sub(b) & m, FlagOp::Sub),
        _ => alu_compute(ctx, K, S, a, b),
    };
    if K != alu::CMP && K != alu::TEST {
        ctx.core.set_reg(d, false, S, r);
    }
    if op.flags_live || ctx.exact_flags {
        ctx.core.set_lazy(f, S, r, a, b);
    }
}

/// ALU register, register, specialized by kind and size.
pub fn alu_rr_t<const K: u8, const S: u8>(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let (Operand::Reg { idx: d, .. }, Operand::Reg { idx: s, .. }) = (op.dst, op.src) else {
        return alu_any(ctx, op);
    };
    let m = mask(S);
    let a = ctx.core.gpr[(d & 15) as usize] & m;
    let b = ctx.core.gpr[(s & 15) as usize] & m;
    alu_const::<K, S>(ctx, op, d, a, b);
    Ok(Ctl::Next)
}

/// ALU register, immediate, specialized by kind and size.
pub fn alu_ri_t<const K: u8, const S: u8>(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let (Operand::Reg { idx: d, .. }, Operand::Imm(b)) = (op.dst, op.src) else {
        return alu_any(ctx, op);
    };
    let a = ctx.core.gpr[(d & 15) as usize] & mask(S);
    alu_const::<K, S>(ctx, op, d, a, b);
    Ok(Ctl::Next)
}

macro_rules! alu_table {
    ($f:ident) => {
        [
            [$f::<0, 1>, $f::<0, 2>, $f::<0, 4>, $f::<0, 8>],
            [$f::<1, 1>, $f::<1, 2>, $f::<1, 4>, $f::<1, 8>],
            [$f::<2, 1>, $f::<2, 2>, $f::<2, 4>, $f::<2, 8>],
            [$f::<3, 1>, $f::<3, 2>, $f::<3, 4>, $f::<3, 8>],
            [$f::<4, 1>, $f::<4, 2>, $f::<4, 4>, $f::<4, 8>],
            [$f::<5, 1>, $f::<5, 2>, $f::<5, 4>, $f::<5, 8>],
            [$f::<6, 1>, $f::<6, 2>, $f::<6, 4>, $f::<6, 8>],
            [$f::<7, 1>, $f::<7, 2>, $f::<7, 4>, $f::<7, 8>],
            [$f::<8, 1>, $f::<8, 2>, $f::<8, 4>, $f::<8, 8>],
        ]
    };
}

/// Specialized register-register ALU handlers by kind and size index (1, 2, 4, 8 bytes).
pub static ALU_RR: [[crate::ir::Handler; 4]; 9] = alu_table!(alu_rr_t);
/// Specialized register-immediate ALU handlers by kind and size index.
pub static ALU_RI: [[crate::ir::Handler; 4]; 9] = alu_table!(alu_ri_t);

/// Index of an operand size in the specialization tables.
pub fn size_index(size: u8) -> Option<usize> {
    match size {
        1 => Some(0),
        2 => Some(1),
        4 => Some(2),
        8 => Some(3),
        _ => None,
    }
}

/// INC/DEC of a plain register, specialized by direction and size.
pub fn incdec_r<const DEC: bool, const S: u8>(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let Operand::Reg { idx: d, hi: false } = op.dst else {
        return incdec(ctx, op);
    };
    let a = ctx.core.gpr[(d & 15) as usize] & mask(S);
    let r = if DEC {
        a.wrapping_sub(1)
    } else {
        a.wrapping_add(1)
    } & mask(S);
    ctx.core.set_reg(d, false, S, r);
    if op.flags_live || ctx.exact_flags {
        let carry = ctx.core.cf();
        let f = if DEC { FlagOp::Dec } else { FlagOp::Inc };
        ctx.core.set_lazy(f, S, r, a, 1);
        ctx.core.lazy.carry = carry;
    }
    Ok(Ctl::Next)
}

/// Specialized INC/DEC handlers: [inc, dec][size index].
pub static INCDEC_R: [[crate::ir::Handler; 4]; 2] = [
    [
        incdec_r::<false, 1>,
        incdec_r::<false, 2>,
        incdec_r::<false, 4>,
        incdec_r::<false, 8>,
    ],
    [
        incdec_r::<true, 1>,
        incdec_r::<true, 2>,
        incdec_r::<true, 4>,
        incdec_r::<true, 8>,
    ],
];

/// ALU with any operand forms.
pub fn alu_any(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let a = ctx.get(&op.dst, op.size)?;
    let b = ctx.get(&op.src, op.size)? & mask(op.size);
    let (r, f) = alu_compute(ctx, op.aux, op.size, a, b);
    if op.aux < alu::CMP {
        ctx.put(&op.dst, op.size, r)?;
    }
    if live(ctx, op) {
        ctx.core.set_lazy(f, op.size, r, a, b);
    }
    Ok(Ctl::Next)
}

/// MOV register to register.
pub fn mov_rr(ctx: &mut Ctx, op: &UOp) -> OpResult {
    if let (Operand::Reg { idx: d, hi: false }, Operand::Reg { idx: s, hi: false }) =
        (op.dst, op.src)
    {
        let v = ctx.core.gpr[s as usize];
        ctx.core.set_reg(d, false, op.size, v);
        return Ok(Ctl::Next);
    }
    mov(ctx, op)
}

/// MOV immediate to register.
pub fn mov_ri(ctx: &mut Ctx, op: &UOp) -> OpResult {
    if let (Operand::Reg { idx: d, hi: false }, Operand::Imm(v)) = (op.dst, op.src) {
        ctx.core.set_reg(d, false, op.size, v);
        return Ok(Ctl::Next);
    }
    mov(ctx, op)
}

/// MOV load from memory into a register.
pub fn mov_load(ctx: &mut Ctx, op: &UOp) -> OpResult {
    if let (Operand::Reg { idx: d, hi: false }, Operand::Mem(m)) = (op.dst, op.src) {
        let v = ctx.read_mem(&m, op.size)?;
        ctx.core.set_reg(d, false, op.size, v);
        return Ok(Ctl::Next);
    }
    mov(ctx, op)
}

/// MOV store of a register or immediate.
pub fn mov_store(ctx: &mut Ctx, op: &UOp) -> OpResult {
    if let Operand::Mem(m) = op.dst {
        let v = ctx.get(&op.src, op.size)?;
        ctx.write_mem(&m, op.size, v)?;
        return Ok(Ctl::Next);
    }
    mov(ctx, op)
}

/// MOV, any form.
pub fn mov(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let v = ctx.get(&op.src, op.size)?;
    ctx.put(&op.dst, op.size, v)?;
    Ok(Ctl::Next)
}

/// MOVZX (`aux` = source size).
pub fn movzx(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let v = ctx.get(&op.src, op.aux)?;
    ctx.put(&op.dst, op.size, v)?;
    Ok(Ctl::Next)
}

/// MOVSX/MOVSXD (`aux` = source size).
pub fn movsx(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let v = ctx.get(&op.src, op.aux)?;
    ctx.put(&op.dst, op.size, sext(v, op.aux))?;
    Ok(Ctl::Next)
}

/// LEA.
pub fn lea(ctx: &mut Ctx, op: &UOp) -> OpResult {
    if let Operand::Mem(m) = op.src {
        let a = ctx.ea(&m);
        ctx.put(&op.dst, op.size, a)?;
    }
    Ok(Ctl::Next)
}

/// XCHG.
pub fn xchg(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let a = ctx.get(&op.dst, op.size)?;
    let b = ctx.get(&op.src, op.size)?;
    // Memory first, so a fault leaves registers untouched.
    if op.src.is_mem() {
        ctx.put(&op.src, op.size, a)?;
        ctx.put(&op.dst, op.size, b)?;
    } else {
        ctx.put(&op.dst, op.size, b)?;
        ctx.put(&op.src, op.size, a)?;
    }
    Ok(Ctl::Next)
}

/// NOP and hints.
pub fn nop(_ctx: &mut Ctx, _op: &UOp) -> OpResult {
    Ok(Ctl::Next)
}

/// INC / DEC (`aux`: 0 inc, 1 dec).
pub fn incdec(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let a = ctx.get(&op.dst, op.size)?;
    let r = if op.aux == 0 {
        a.wrapping_add(1)
    } else {
        a.wrapping_sub(1)
    } & mask(op.size);
    ctx.put(&op.dst, op.size, r)?;
    if live(ctx, op) {
        let carry = ctx.core.cf();
        let f = if op.aux == 0 {
            FlagOp::Inc
        } else {
            FlagOp::Dec
        };
        ctx.core.set_lazy(f, op.size, r, a, 1);
        ctx.core.lazy.carry = carry;
    }
    Ok(Ctl::Next)
}

/// NEG.
pub fn neg(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let b = ctx.get(&op.dst, op.size)?;
    let r = 0u64.wrapping_sub(b) & mask(op.size);
    ctx.put(&op.dst, op.size, r)?;
    if live(ctx, op) {
        ctx.core.set_lazy(FlagOp::Sub, op.size, r, 0, b);
    }
    Ok(Ctl::Next)
}

/// NOT.
pub fn not(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let a = ctx.get(&op.dst, op.size)?;
    ctx.put(&op.dst, op.size, !a & mask(op.size))?;
    Ok(Ctl::Next)
}

fn szp(r: u64, size: u8) -> u64 {
    let r = r & mask(size);
    let mut f = 0;
    if r == 0 {
        f |= fl::ZF;
    }
    if r & msb(size) != 0 {
        f |= fl::SF;
    }
    if (r as u8).count_ones().is_multiple_of(2) {
        f |= fl::PF;
    }
    f
}

/// Shift and rotate kinds in `aux` (the ModRM reg field of the group-2 opcodes).
pub mod shift {
    #![allow(missing_docs)]
    pub const ROL: u8 = 0;
    pub const ROR: u8 = 1;
    pub const RCL: u8 = 2;
    pub const RCR: u8 = 3;
    pub const SHL: u8 = 4;
    pub const SHR: u8 = 5;
    pub const SAL: u8 = 6;
    pub const SAR: u8 = 7;
}

/// Shifts and rotates with exact flags.
pub fn shift_op(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let size = op.size;
    let a = ctx.get(&op.dst, size)?;
    let cmask = if size == 8 { 0x3f } else { 0x1f };
    let count = (ctx.get(&op.src, 1)? & cmask) as u32;
    if count == 0 {
        // Flags untouched, but a 32-bit register destination is still zero-extended.
        if size == 4 && !op.dst.is_mem() {
            ctx.put(&op.dst, 4, a)?;
        }
        return Ok(Ctl::Next);
    }
    let old = ctx.core.flags();
    let (r, flags) = shift_compute(op.aux, size, a, count, old);
    ctx.put(&op.dst, size, r)?;
    ctx.core.set_arith(flags);
    Ok(Ctl::Next)
}

/// A shift or rotate of `a` (`size` bytes) by a masked, nonzero `count`, with the flags
/// before it `old`: the result and the flags after it.
#[inline(always)]
fn shift_compute(kind: u8, size: u8, a: u64, count: u32, old: u64) -> (u64, u64) {
    let bits = size as u32 * 8;
    let m = mask(size);
    let top = msb(size);
    let cf_in = old & fl::CF != 0;
    match kind {
        shift::ROL | shift::ROR => {
            let c = count % bits;
            let r = if kind == shift::ROL {
                if c == 0 {
                    a
                } else {
                    ((a << c) | (a >> (bits - c))) & m
                }
            } else if c == 0 {
                a
            } else {
                ((a >> c) | (a << (bits - c))) & m
            };
            let (cf, of) = if kind == shift::ROL {
                let cf = r & 1 != 0;
                (cf, (r & top != 0) != cf)
            } else {
                let cf = r & top != 0;
                (cf, (r & top != 0) != (r & (top >> 1) != 0))
            };
            let mut f = old & !(fl::CF | fl::OF);
            if cf {
                f |= fl::CF;
            }
            if of {
                f |= fl::OF;
            }
            (r, f)
        }
        shift::RCL | shift::RCR => {
            let c = count % (bits + 1);
            let mut r = a;
            let mut cf = cf_in;
            for _ in 0..c {
                if kind == shift::RCL {
                    let out = r & top != 0;
                    r = ((r << 1) | cf as u64) & m;
                    cf = out;
                } else {
                    let out = r & 1 != 0;
                    r = (r >> 1) | if cf { top } else { 0 };
                    cf = out;
                }
            }
            let of = if kind == shift::RCL {
                (r & top != 0) != cf
            } else {
                (r & top != 0) != (r & (top >> 1) != 0)
            };
            let mut f = old & !(fl::CF | fl::OF);
            if cf {
                f |= fl::CF;
            }
            if of {
                f |= fl::OF;
            }
            (r, f)
        }
        shift::SHL | shift::SAL => {
            let r = if count >= bits { 0 } else { (a << count) & m };
            let cf = if count > bits {
                false
            } else {
                (a >> (bits - count)) & 1 != 0
            };
            let mut f = (old & !fl::ARITH) | szp(r, size);
            if cf {
                f |= fl::CF;
            }
            if (r & top != 0) != cf {
                f |= fl::OF;
            }
            (r, f)
        }
        shift::SHR => {
            let r = if count >= bits { 0 } else { a >> count };
            let cf = if count > bits {
                false
            } else {
                (a >> (count - 1)) & 1 != 0
            };
            let mut f = (old & !fl::ARITH) | szp(r, size);
            if cf {
                f |= fl::CF;
            }
            if a & top != 0 {
                f |= fl::OF;
            }
            (r, f)
        }
        _ => {
            let sa = sext(a, size) as i64;
            let c = count.min(63);
            let r = (sa >> c) as u64 & m;
            let cf = (sa >> (c - 1)) & 1 != 0;
            let mut f = (old & !fl::ARITH) | szp(r, size);
            if cf {
                f |= fl::CF;
            }
            (r, f)
        }
    }
}

/// A shift or rotate (not through carry) of a plain register by an immediate whose masked
/// count is not zero (the translator checks both), specialized by kind and size. The result
/// does not depend on the flags, so when the flags it writes are dead (see
/// [`crate::translate::eliminate_dead_flags`]) they are not computed at all.
pub fn shift_ri<const K: u8, const S: u8>(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let (Operand::Reg { idx: d, hi: false }, Operand::Imm(count)) = (op.dst, op.src) else {
        return shift_op(ctx, op);
    };
    let cmask = if S == 8 { 0x3f } else { 0x1f };
    let count = (count & cmask) as u32;
    if count == 0 || K == shift::RCL || K == shift::RCR {
        return shift_op(ctx, op);
    }
    let a = ctx.core.gpr[(d & 15) as usize] & mask(S);
    if live(ctx, op) {
        let old = ctx.core.flags();
        let (r, f) = shift_compute(K, S, a, count, old);
        ctx.core.set_reg(d, false, S, r);
        ctx.core.set_arith(f);
    } else {
        let (r, _) = shift_compute(K, S, a, count, 0);
        ctx.core.set_reg(d, false, S, r);
    }
    Ok(Ctl::Next)
}

macro_rules! shift_table {
    ($f:ident) => {
        [
            [$f::<0, 1>, $f::<0, 2>, $f::<0, 4>, $f::<0, 8>],
            [$f::<1, 1>, $f::<1, 2>, $f::<1, 4>, $f::<1, 8>],
            [$f::<2, 1>, $f::<2, 2>, $f::<2, 4>, $f::<2, 8>],
            [$f::<3, 1>, $f::<3, 2>, $f::<3, 4>, $f::<3, 8>],
            [$f::<4, 1>, $f::<4, 2>, $f::<4, 4>, $f::<4, 8>],
            [$f::<5, 1>, $f::<5, 2>, $f::<5, 4>, $f::<5, 8>],
            [$f::<6, 1>, $f::<6, 2>, $f::<6, 4>, $f::<6, 8>],
            [$f::<7, 1>, $f::<7, 2>, $f::<7, 4>, $f::<7, 8>],
        ]
    };
}

/// Specialized register-immediate shift handlers by kind ([`shift`]) and size index (RCL
/// and RCR entries fall back to [`shift_op`]).
pub static SHIFT_RI: [[crate::ir::Handler; 4]; 8] = shift_table!(shift_ri);

/// SHLD / SHRD (`aux`: 0 left, 1 right); `src` is the register shifted in, `src2` the count.
pub fn shxd(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let size = op.size;
    let bits = size as u32 * 8;
    let a = ctx.get(&op.dst, size)?;
    let b = ctx.get(&op.src, size)?;
    let cmask = if size == 8 { 0x3f } else { 0x1f };
    let count = (ctx.get(&op.src2, 1)? & cmask) as u32;
    if count == 0 {
        // Flags untouched, but a 32-bit register destination is still zero-extended.
        if size == 4 && !op.dst.is_mem() {
            ctx.put(&op.dst, 4, a)?;
        }
        return Ok(Ctl::Next);
    }
    let m = mask(size);
    let top = msb(size);
    // 16-bit operands with counts above 16 are undefined; model them as the 32-bit
    // concatenation rotating through, which is what Intel parts do.
    let (r, cf) = if op.aux == 0 {
        let wide = ((a as u128) << bits) | b as u128;
        let w2 = bits * 2;
        let rot = |v: u128, c: u32| -> u128 {
            let full = if w2 == 128 {
                u128::MAX
            } else {
                (1u128 << w2) - 1
            };
            ((v << c) | (v >> (w2 - c))) & full
        };
        let res = rot(wide, count % w2);
        let r = ((res >> bits) as u64) & m;
        let cf = (wide >> (w2 - count)) & 1 != 0;
        (r, cf)
    } else {
        let wide = ((b as u128) << bits) | a as u128;
        let r = ((wide >> count) as u64) & m;
        let cf = (wide >> (count - 1)) & 1 != 0;
        (r, cf)
    };
    ctx.put(&op.dst, size, r)?;
    let old = ctx.core.flags();
    let mut f = (old & !fl::ARITH) | szp(r, size);
    if cf {
        f |= fl::CF;
    }
    if (r ^ a) & top != 0 {
        f |= fl::OF;
    }
    ctx.core.set_arith(f);
    Ok(Ctl::Next)
}

fn set_cf_of(ctx: &mut Ctx, on: bool, res_low: u64, size: u8) {
    let old = ctx.core.flags();
    let mut f = (old & !fl::ARITH) | szp(res_low, size);
    if on {
        f |= fl::CF | fl::OF;
    }
    ctx.core.set_arith(f);
}

/// MUL / IMUL with one operand (`aux`: 0 unsigned, 1 signed).
pub fn mul1(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let size = op.size;
    let b = ctx.get(&op.dst, size)?;
    let a = ctx.core.reg(0, false, size);
    let bits = size as u32 * 8;
    let (lo, hi, over) = if op.aux == 0 {
        let p = (a as u128) * (b as u128);
        let lo = (p as u64) & mask(size);
        let hi = ((p >> bits) as u64) & mask(size);
        (lo, hi, hi != 0)
    } else {
        let p = (sext(a, size) as i64 as i128) * (sext(b, size) as i64 as i128);
        let lo = (p as u64) & mask(size);
        let hi = ((p >> bits) as u64) & mask(size);
        (lo, hi, p != sext(lo, size) as i64 as i128)
    };
    if size == 1 {
        ctx.core.set_reg(0, false, 2, lo | (hi << 8));
    } else {
        ctx.core.set_reg(0, false, size, lo);
        ctx.core.set_reg(2, false, size, hi);
    }
    set_cf_of(ctx, over, lo, size);
    Ok(Ctl::Next)
}

/// IMUL with two or three operands: `dst = src * src2` (src2 = dst for the two-operand form).
pub fn imul(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let size = op.size;
    let a = ctx.get(&op.src, size)?;
    let b = ctx.get(&op.src2, size)?;
    let p = (sext(a, size) as i64 as i128) * (sext(b, size) as i64 as i128);
    let lo = (p as u64) & mask(size);
    ctx.put(&op.dst, size, lo)?;
    set_cf_of(ctx, p != sext(lo, size) as i64 as i128, lo, size);
    Ok(Ctl::Next)
}

/// [`imul`] into a plain register from a plain register and a register or immediate,
/// specialized by size (2, 4, 8); dead flags are not computed.
pub fn imul_r<const S: u8>(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let (Operand::Reg { idx: d, hi: false }, Operand::Reg { idx: s, hi: false }) = (op.dst, op.src)
    else {
        return imul(ctx, op);
    };
    let b = match op.src2 {
        Operand::Reg { idx, hi: false } => ctx.core.gpr[(idx & 15) as usize],
        Operand::Imm(v) => v,
        _ => return imul(ctx, op),
    };
    let a = ctx.core.gpr[(s & 15) as usize];
    let (lo, over) = match S {
        2 => {
            let p = i32::from(a as i16) * i32::from(b as i16);
            (p as u64 & 0xffff, p != i32::from(p as i16))
        }
        4 => {
            let p = i64::from(a as i32) * i64::from(b as i32);
            (p as u64 & 0xffff_ffff, p != i64::from(p as i32))
        }
        _ => {
            let (p, over) = (a as i64).overflowing_mul(b as i64);
            (p as u64, over)
        }
    };
    ctx.core.set_reg(d, false, S, lo);
    if live(ctx, op) {
        set_cf_of(ctx, over, lo, S);
    }
    Ok(Ctl::Next)
}

/// Specialized [`imul_r`] handlers by size index (1-byte IMUL has no two-operand form).
pub static IMUL_R: [crate::ir::Handler; 4] = [imul, imul_r::<2>, imul_r::<4>, imul_r::<8>];

/// DIV / IDIV (`aux`: 0 unsigned, 1 signed); #DE on zero divisor or overflow.
pub fn div(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let size = op.size;
    let d = ctx.get(&op.dst, size)?;
    if d == 0 {
        return Err(Exc::DE);
    }
    let bits = size as u32 * 8;
    let (lo, hi) = if size == 1 {
        let ax = ctx.core.reg(0, false, 2);
        (ax & 0xff, ax >> 8)
    } else {
        (ctx.core.reg(0, false, size), ctx.core.reg(2, false, size))
    };
    let n = ((hi as u128) << bits) | lo as u128;
    let (q, r) = if op.aux == 0 {
        let q = n / d as u128;
        if q > mask(size) as u128 {
            return Err(Exc::DE);
        }
        (q as u64, (n % d as u128) as u64)
    } else {
        // Sign-extend the 2*size dividend.
        let sh = 128 - 2 * bits;
        let sn = ((n << sh) as i128) >> sh;
        let sd = sext(d, size) as i64 as i128;
        let q = sn.checked_div(sd).ok_or(Exc::DE)?;
        let r = sn - q * sd;
        let lim = 1i128 << (bits - 1);
        if q >= lim || q < -lim {
            return Err(Exc::DE);
        }
        (q as u64 & mask(size), r as u64 & mask(size))
    };
    if size == 1 {
        ctx.core.set_reg(0, false, 2, q | (r << 8));
    } else {
        ctx.core.set_reg(0, false, size, q);
        ctx.core.set_reg(2, false, size, r);
    }
    Ok(Ctl::Next)
}

/// PUSH.
pub fn push(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let v = if let Operand::Reg { idx: 4, hi: false } = op.dst {
        ctx.core.gpr[4]
    } else {
        ctx.get(&op.dst, op.size)?
    };
    ctx.push(op.size, v)?;
    Ok(Ctl::Next)
}

/// POP (to a register or memory; memory addresses use the incremented RSP).
pub fn pop(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let v = ctx.peek(op.size, 0)?;
    let ss = ctx.core.stack_size();
    let old = ctx.core.gpr[4];
    ctx.core
        .set_reg(4, false, ss, old.wrapping_add(op.size as u64));
    if let Err(e) = ctx.put(&op.dst, op.size, v) {
        ctx.core.gpr[4] = old;
        return Err(e);
    }
    Ok(Ctl::Next)
}

/// PUSHA/PUSHAD.
pub fn pusha(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let sp = ctx.core.gpr[4];
    let ss = ctx.core.stack_size();
    let mut vals = [0u64; 8];
    for (i, v) in vals.iter_mut().enumerate() {
        *v = if i == 4 { sp } else { ctx.core.gpr[i] };
    }
    for (i, v) in vals.iter().enumerate() {
        let off = sp.wrapping_sub((i as u64 + 1) * op.size as u64) & mask(ss);
        let lin = ctx.linear(seg::SS as u8, off, op.size as u64, true)?;
        ctx.write_lin(lin, op.size, *v)?;
    }
    ctx.core
        .set_reg(4, false, ss, sp.wrapping_sub(8 * op.size as u64));
    Ok(Ctl::Next)
}

/// POPA/POPAD (the stored SP is skipped).
pub fn popa(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let mut vals = [0u64; 8];
    for (i, v) in vals.iter_mut().enumerate() {
        *v = ctx.peek(op.size, (i as u64) * op.size as u64)?;
    }
    for (i, v) in vals.iter().enumerate() {
        let r = 7 - i;
        if r != 4 {
            ctx.core.set_reg(r as u8, false, op.size, *v);
        }
    }
    let ss = ctx.core.stack_size();
    let sp = ctx.core.gpr[4].wrapping_add(8 * op.size as u64);
    ctx.core.set_reg(4, false, ss, sp);
    Ok(Ctl::Next)
}

/// ENTER imm16, imm8 (`target` = frame size, `aux` = nesting level), as the SDM's
/// pseudocode: FrameTemp is the stack pointer (at operand size) after pushing the frame
/// pointer; the nested copies are read below the old frame pointer, stepped at the stack
/// size; BP/EBP/RBP (operand size) gets FrameTemp and only the stack-size part of the stack
/// pointer moves. A write at the final stack pointer is checked (segment limit and paging)
/// before any register changes.
pub fn enter(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let size = op.size;
    let ss = ctx.core.stack_size();
    let level = op.aux & 31;
    let bp = ctx.core.gpr[5];
    let mut sp = ctx.core.gpr[4];
    fn push_at(ctx: &mut Ctx, sp: &mut u64, size: u8, ss: u8, v: u64) -> Result<(), Exc> {
        let nsp = sp.wrapping_sub(size as u64) & mask(ss);
        let lin = ctx.linear(seg::SS as u8, nsp, size as u64, true)?;
        ctx.write_lin(lin, size, v)?;
        *sp = (*sp & !mask(ss)) | nsp;
        Ok(())
    }
    push_at(ctx, &mut sp, size, ss, bp)?;
    let frame = sp & mask(size);
    if level > 0 {
        let mut b = bp;
        for _ in 1..level {
            b = (b & !mask(ss)) | (b.wrapping_sub(size as u64) & mask(ss));
            let lin = ctx.linear(seg::SS as u8, b & mask(ss), size as u64, false)?;
            let v = ctx.read_lin(lin, size)?;
            push_at(ctx, &mut sp, size, ss, v)?;
        }
        push_at(ctx, &mut sp, size, ss, frame)?;
    }
    let nsp = sp.wrapping_sub(op.target) & mask(ss);
    // SDM: #PF "if a write using the final value of the stack pointer (within the current
    // stack segment) would cause a page fault"; nothing is written there.
    let lin = ctx.linear(seg::SS as u8, nsp, size as u64, true)?;
    ctx.check_writable(lin, size as u64)?;
    ctx.core.set_reg(5, false, size, frame);
    ctx.core.set_reg(4, false, ss, nsp);
    Ok(Ctl::Next)
}

/// LEAVE.
pub fn leave(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let ss = ctx.core.stack_size();
    let bp = ctx.core.gpr[5] & mask(ss);
    let lin = ctx.linear(seg::SS as u8, bp, op.size as u64, false)?;
    let v = ctx.read_lin(lin, op.size)?;
    ctx.core
        .set_reg(4, false, ss, bp.wrapping_add(op.size as u64));
    ctx.core.set_reg(5, false, op.size, v);
    Ok(Ctl::Next)
}

/// JMP to an immediate target.
pub fn jmp(ctx: &mut Ctx, op: &UOp) -> OpResult {
    ctx.core.rip = op.target;
    Ok(Ctl::Jump)
}

/// JMP through a register or memory.
pub fn jmp_ind(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let t = ctx.get(&op.dst, op.size)?;
    check_target(ctx, t)?;
    ctx.core.rip = t;
    Ok(Ctl::Jump)
}

fn check_target(ctx: &Ctx, t: u64) -> Result<(), Exc> {
    if ctx.core.mode64() {
        if !crate::exec::canonical(t) {
            return Err(Exc::gp(0));
        }
    } else if t > ctx.core.seg[seg::CS].limit as u64 {
        return Err(Exc::gp(0));
    }
    Ok(())
}

/// Jcc (`aux` = condition code).
pub fn jcc(ctx: &mut Ctx, op: &UOp) -> OpResult {
    if ctx.core.cond(op.aux) {
        ctx.core.rip = op.target;
        Ok(Ctl::Jump)
    } else {
        Ok(Ctl::Next)
    }
}

/// JCXZ/JECXZ/JRCXZ (`aux` = address size) and LOOP/LOOPE/LOOPNE (`src` = Imm kind:
/// 0 loop, 1 loope, 2 loopne, 3 jcxz).
pub fn loop_op(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let asz = op.aux;
    let kind = match op.src {
        Operand::Imm(k) => k,
        _ => 0,
    };
    let cx = ctx.core.reg(1, false, asz);
    let take = if kind == 3 {
        cx == 0
    } else {
        let n = cx.wrapping_sub(1) & mask(asz);
        ctx.core.set_reg(1, false, asz, n);
        n != 0
            && match kind {
                1 => ctx.core.cond(4),
                2 => ctx.core.cond(5),
                _ => true,
            }
    };
    if take {
        ctx.core.rip = op.target;
        Ok(Ctl::Jump)
    } else {
        Ok(Ctl::Next)
    }
}

/// CALL to an immediate target.
pub fn call(ctx: &mut Ctx, op: &UOp) -> OpResult {
    ctx.push(op.size, op.next_rip)?;
    ctx.core.rip = op.target;
    Ok(Ctl::Jump)
}

/// CALL through a register or memory.
pub fn call_ind(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let t = ctx.get(&op.dst, op.size)?;
    check_target(ctx, t)?;
    ctx.push(op.size, op.next_rip)?;
    ctx.core.rip = t;
    Ok(Ctl::Jump)
}

/// RET (`target` = bytes to release).
pub fn ret(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let t = ctx.peek(op.size, 0)?;
    check_target(ctx, t)?;
    let ss = ctx.core.stack_size();
    let sp = ctx.core.gpr[4]
        .wrapping_add(op.size as u64)
        .wrapping_add(op.target);
    ctx.core.set_reg(4, false, ss, sp);
    ctx.core.rip = t;
    Ok(Ctl::Jump)
}

/// SETcc.
pub fn setcc(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let v = ctx.core.cond(op.aux) as u64;
    ctx.put(&op.dst, 1, v)?;
    Ok(Ctl::Next)
}

/// CMOVcc (the source is read, and may fault, even when the condition is false; a 32-bit
/// destination is zero-extended either way).
pub fn cmov(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let v = ctx.get(&op.src, op.size)?;
    if ctx.core.cond(op.aux) {
        ctx.put(&op.dst, op.size, v)?;
    } else if op.size == 4 {
        let cur = ctx.get(&op.dst, 4)?;
        ctx.put(&op.dst, 4, cur)?;
    }
    Ok(Ctl::Next)
}

/// CBW/CWDE/CDQE (size = destination size).
pub fn cbw(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let half = op.size / 2;
    let v = sext(ctx.core.reg(0, false, half), half);
    ctx.core.set_reg(0, false, op.size, v);
    Ok(Ctl::Next)
}

/// CWD/CDQ/CQO.
pub fn cwd(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let a = ctx.core.reg(0, false, op.size);
    let v = if a & msb(op.size) != 0 { u64::MAX } else { 0 };
    ctx.core.set_reg(2, false, op.size, v);
    Ok(Ctl::Next)
}

/// BSWAP.
pub fn bswap(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let v = ctx.get(&op.dst, op.size)?;
    let r = match op.size {
        8 => v.swap_bytes(),
        4 => (v as u32).swap_bytes() as u64,
        // BSWAP of a 16-bit register is undefined; hardware clears it.
        _ => 0,
    };
    ctx.put(&op.dst, op.size, r)?;
    Ok(Ctl::Next)
}

/// MOVBE.
pub fn movbe(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let v = ctx.get(&op.src, op.size)?;
    let r = match op.size {
        8 => v.swap_bytes(),
        4 => (v as u32).swap_bytes() as u64,
        _ => (v as u16).swap_bytes() as u64,
    };
    ctx.put(&op.dst, op.size, r)?;
    Ok(Ctl::Next)
}

/// CLFLUSH, CLFLUSHOPT and CLWB: a translator has no cache lines to write back or evict,
/// but the address is checked as a one-byte load's is (segment, canonical form, paging with
/// #PF and its error code) without reading it, so an MMIO line sees no access.
pub fn cache_line(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let Operand::Mem(m) = op.dst else {
        return Err(Exc::UD);
    };
    let off = ctx.ea(&m);
    let lin = ctx.linear(m.seg, off, 1, false)?;
    let user = ctx.core.cpl() == 3;
    ctx.translate(lin, crate::paging::Kind::Read, user)?;
    Ok(Ctl::Next)
}

/// CRC32 (SSE4.2): the CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) of the source's
/// `aux` bytes, least significant first, continuing from the destination's low 32 bits; the
/// result zero-extends into a 64-bit destination. No flags change.
pub fn crc32(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let mut crc = ctx.get(&op.dst, 4)? as u32;
    let v = ctx.get(&op.src, op.aux)?;
    for i in 0..op.aux as u32 {
        crc ^= (v >> (8 * i)) as u32 & 0xff;
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82f6_3b78 & (crc & 1).wrapping_neg());
        }
    }
    ctx.put(&op.dst, op.size, u64::from(crc))?;
    Ok(Ctl::Next)
}

/// XADD.
pub fn xadd(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let a = ctx.get(&op.dst, op.size)?;
    let b = ctx.get(&op.src, op.size)?;
    let r = a.wrapping_add(b) & mask(op.size);
    // SRC := DEST, then DEST := sum (so XADD r, r leaves the sum).
    ctx.put(&op.src, op.size, a)?;
    ctx.put(&op.dst, op.size, r)?;
    if live(ctx, op) {
        ctx.core.set_lazy(FlagOp::Add, op.size, r, a, b);
    }
    Ok(Ctl::Next)
}

/// CMPXCHG.
pub fn cmpxchg(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let size = op.size;
    let d = ctx.get(&op.dst, size)?;
    let a = ctx.core.reg(0, false, size);
    let r = a.wrapping_sub(d) & mask(size);
    if a == d {
        let s = ctx.get(&op.src, size)?;
        ctx.put(&op.dst, size, s)?;
    } else {
        // A memory destination is written back with its own value (a locked cycle); a
        // register destination is left alone (no zero-extension).
        if op.dst.is_mem() {
            ctx.put(&op.dst, size, d)?;
        }
        ctx.core.set_reg(0, false, size, d);
    }
    ctx.core.set_lazy(FlagOp::Sub, size, r, a, d);
    Ok(Ctl::Next)
}

/// CMPXCHG8B / CMPXCHG16B (`size` = 8 or 16 total).
pub fn cmpxchg_wide(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let Operand::Mem(m) = op.dst else {
        return Err(Exc::UD);
    };
    let half = op.size / 2;
    let off = ctx.ea(&m);
    if op.size == 16 && off & 15 != 0 {
        return Err(Exc::gp(0));
    }
    let lin = ctx.linear(m.seg, off, op.size as u64, true)?;
    let lo = ctx.read_lin(lin, half)?;
    let hi = ctx.read_lin(lin + half as u64, half)?;
    let (ea, ed) = (ctx.core.reg(0, false, half), ctx.core.reg(2, false, half));
    ctx.core.materialize();
    if lo == ea && hi == ed {
        let (b, c) = (ctx.core.reg(3, false, half), ctx.core.reg(1, false, half));
        let mut buf = [0u8; 16];
        buf[..half as usize].copy_from_slice(&b.to_le_bytes()[..half as usize]);
        buf[half as usize..op.size as usize].copy_from_slice(&c.to_le_bytes()[..half as usize]);
        let user = ctx.core.cpl() == 3;
        ctx.write_bytes(lin, &buf[..op.size as usize], user)?;
        ctx.core.rflags |= fl::ZF;
    } else {
        let mut buf = [0u8; 16];
        buf[..half as usize].copy_from_slice(&lo.to_le_bytes()[..half as usize]);
        buf[half as usize..op.size as usize].copy_from_slice(&hi.to_le_bytes()[..half as usize]);
        let user = ctx.core.cpl() == 3;
        ctx.write_bytes(lin, &buf[..op.size as usize], user)?;
        ctx.core.set_reg(0, false, half, lo);
        ctx.core.set_reg(2, false, half, hi);
        ctx.core.rflags &= !fl::ZF;
    }
    Ok(Ctl::Next)
}

/// BT/BTS/BTR/BTC (`aux`: 0 bt, 1 bts, 2 btr, 3 btc).
pub fn bt(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let size = op.size;
    let bits = size as u64 * 8;
    let off = ctx.get(&op.src, size)?;
    let (val, bit, place) = match op.dst {
        Operand::Mem(m) if !matches!(op.src, Operand::Imm(_)) => {
            // A register bit offset addresses memory beyond the operand (signed).
            let soff = sext(off, size) as i64;
            let byte = (soff >> (bits.trailing_zeros())) * size as i64;
            let ea = ctx.ea(&m).wrapping_add(byte as u64);
            let ea = match m.asize {
                2 => ea & 0xffff,
                4 => ea & 0xffff_ffff,
                _ => ea,
            };
            let lin = ctx.linear(m.seg, ea, size as u64, op.aux != 0)?;
            (
                ctx.read_lin(lin, size)?,
                (off & (bits - 1)) as u32,
                Some(lin),
            )
        }
        _ => (ctx.get(&op.dst, size)?, (off & (bits - 1)) as u32, None),
    };
    let cf = (val >> bit) & 1 != 0;
    let nv = match op.aux {
        1 => val | (1 << bit),
        2 => val & !(1 << bit),
        3 => val ^ (1 << bit),
        _ => val,
    };
    if op.aux != 0 {
        match place {
            Some(lin) => ctx.write_lin(lin, size, nv)?,
            None => ctx.put(&op.dst, size, nv)?,
        }
    }
    ctx.core.materialize();
    if cf {
        ctx.core.rflags |= fl::CF;
    } else {
        ctx.core.rflags &= !fl::CF;
    }
    Ok(Ctl::Next)
}

/// BSF/BSR/TZCNT/LZCNT/POPCNT (`aux`: 0 bsf, 1 bsr, 2 tzcnt, 3 lzcnt, 4 popcnt).
pub fn bitscan(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let size = op.size;
    let bits = size as u32 * 8;
    let v = ctx.get(&op.src, size)?;
    ctx.core.materialize();
    let mut f = ctx.core.rflags;
    match op.aux {
        0 | 1 => {
            if v == 0 {
                f |= fl::ZF;
            } else {
                f &= !fl::ZF;
                let r = if op.aux == 0 {
                    v.trailing_zeros()
                } else {
                    63 - v.leading_zeros()
                };
                ctx.put(&op.dst, size, r as u64)?;
            }
        }
        2 | 3 => {
            let r = if op.aux == 2 {
                if v == 0 { bits } else { v.trailing_zeros() }
            } else {
                (v.leading_zeros()) - (64 - bits)
            };
            ctx.put(&op.dst, size, r as u64)?;
            f &= !(fl::CF | fl::ZF);
            if v == 0 {
                f |= fl::CF;
            }
            if r == 0 {
                f |= fl::ZF;
            }
        }
        _ => {
            ctx.put(&op.dst, size, v.count_ones() as u64)?;
            f &= !fl::ARITH;
            if v == 0 {
                f |= fl::ZF;
            }
        }
    }
    ctx.core.rflags = f;
    Ok(Ctl::Next)
}

/// CLC/STC/CMC/CLD/STD (`aux`: 0 clc, 1 stc, 2 cmc, 3 cld, 4 std).
pub fn flagop(ctx: &mut Ctx, op: &UOp) -> OpResult {
    ctx.core.materialize();
    let f = &mut ctx.core.rflags;
    match op.aux {
        0 => *f &= !fl::CF,
        1 => *f |= fl::CF,
        2 => *f ^= fl::CF,
        3 => *f &= !fl::DF,
        _ => *f |= fl::DF,
    }
    Ok(Ctl::Next)
}

/// LAHF.
pub fn lahf(ctx: &mut Ctx, _op: &UOp) -> OpResult {
    let f = ctx.core.flags() & 0xd5 | 2;
    ctx.core.set_reg(0, true, 1, f);
    Ok(Ctl::Next)
}

/// SAHF.
pub fn sahf(ctx: &mut Ctx, _op: &UOp) -> OpResult {
    let ah = ctx.core.reg(0, true, 1);
    ctx.core.materialize();
    ctx.core.rflags = (ctx.core.rflags & !0xd5) | (ah & 0xd5);
    Ok(Ctl::Next)
}

/// DAA/DAS/AAA/AAS (`aux`: 0 daa, 1 das, 2 aaa, 3 aas).
pub fn bcd_adjust(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let f = ctx.core.flags();
    let (cf, af) = (f & fl::CF != 0, f & fl::AF != 0);
    let al = ctx.core.reg(0, false, 1);
    let mut nf = f & !fl::ARITH;
    match op.aux {
        0 | 1 => {
            let mut a = al;
            let mut ncf = false;
            let mut naf = false;
            if al & 0xf > 9 || af {
                a = if op.aux == 0 {
                    a.wrapping_add(6)
                } else {
                    a.wrapping_sub(6)
                } & 0xff;
                ncf = cf || (op.aux == 0 && al + 6 > 0xff) || (op.aux == 1 && al < 6);
                naf = true;
            }
            if al > 0x99 || cf {
                a = if op.aux == 0 {
                    a.wrapping_add(0x60)
                } else {
                    a.wrapping_sub(0x60)
                } & 0xff;
                ncf = true;
            }
            ctx.core.set_reg(0, false, 1, a);
            nf |= szp(a, 1);
            if ncf {
                nf |= fl::CF;
            }
            if naf {
                nf |= fl::AF;
            }
        }
        _ => {
            let ax = ctx.core.reg(0, false, 2);
            let adjust = al & 0xf > 9 || af;
            // The SDM's pseudocode for current CPUs adjusts AX as a whole (AAA: AX + 0x106;
            // AAS: AX - 6, then AH - 1), so AL's carry or borrow reaches AH.
            let nax = if adjust {
                if op.aux == 2 {
                    ax.wrapping_add(0x106)
                } else {
                    ax.wrapping_sub(6).wrapping_sub(0x100)
                }
            } else {
                ax
            } & 0xff0f;
            ctx.core.set_reg(0, false, 2, nax);
            nf |= szp(nax & 0xff, 1);
            if adjust {
                nf |= fl::CF | fl::AF;
            }
        }
    }
    ctx.core.set_arith(nf);
    Ok(Ctl::Next)
}

/// AAM/AAD (`aux`: 0 aam, 1 aad; `target` = base).
pub fn aam_aad(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let base = op.target & 0xff;
    let al = ctx.core.reg(0, false, 1);
    let r = if op.aux == 0 {
        if base == 0 {
            return Err(Exc::DE);
        }
        let v = ((al / base) << 8) | (al % base);
        ctx.core.set_reg(0, false, 2, v);
        v & 0xff
    } else {
        let ah = ctx.core.reg(0, true, 1);
        let v = (al + ah * base) & 0xff;
        ctx.core.set_reg(0, false, 2, v);
        v
    };
    let f = ctx.core.flags() & !fl::ARITH;
    ctx.core.set_arith(f | szp(r, 1));
    Ok(Ctl::Next)
}

/// String operation kinds in `aux` (low 4 bits) and REP kinds (bits 4-5: 1 rep/repe,
/// 2 repne).
pub mod string {
    #![allow(missing_docs)]
    pub const MOVS: u8 = 0;
    pub const STOS: u8 = 1;
    pub const LODS: u8 = 2;
    pub const CMPS: u8 = 3;
    pub const SCAS: u8 = 4;
    pub const INS: u8 = 5;
    pub const OUTS: u8 = 6;
    pub const REP: u8 = 0x10;
    pub const REPNE: u8 = 0x20;
}

/// How many iterations of a REP string instruction run between checks of the icount and
/// interrupt boundaries (the instruction resumes where it left off).
const REP_CHUNK: u64 = 1 << 16;

/// String instructions with REP/REPE/REPNE. `src` holds the source segment (MOVS, LODS,
/// CMPS, OUTS) as `Sreg`; `target` holds the address size.
pub fn string_op(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let kind = op.aux & 0xf;
    let rep = op.aux & 0x30;
    let size = op.size;
    let asz = op.target as u8;
    let am = mask(asz);
    let sseg = match op.src {
        Operand::Sreg(s) => s,
        _ => seg::DS as u8,
    };
    let step = if ctx.core.rflags & fl::DF != 0 {
        (size as u64).wrapping_neg()
    } else {
        size as u64
    };
    if kind == string::INS || kind == string::OUTS {
        crate::system::io_allowed(ctx, ctx.core.reg(2, false, 2) as u16, size)?;
        // The port is the same for every iteration: an I/O breakpoint hits the first one
        // this execution makes, and the trap comes right after it (SDM 17.3.1.2: "repeated
        // INS and OUTS instructions generate an I/O-breakpoint debug exception after the
        // first iteration"); the instruction then resumes with the count left.
        let rep_done = rep != 0 && ctx.core.gpr[1] & mask(op.target as u8) == 0;
        if !rep_done {
            crate::system::io_breakpoints(ctx, ctx.core.reg(2, false, 2) as u16, size);
        }
    }
    let mut n = 0u64;
    loop {
        if rep != 0 {
            if ctx.core.gpr[1] & am == 0 {
                break;
            }
            if n == REP_CHUNK {
                return Ok(Ctl::Restart);
            }
        }
        let si = ctx.core.gpr[6] & am;
        let di = ctx.core.gpr[7] & am;
        let mut cmp = None;
        match kind {
            string::MOVS => {
                let s = ctx.linear(sseg, si, size as u64, false)?;
                let v = ctx.read_lin(s, size)?;
                let d = ctx.linear(seg::ES as u8, di, size as u64, true)?;
                ctx.write_lin(d, size, v)?;
            }
            string::STOS => {
                let d = ctx.linear(seg::ES as u8, di, size as u64, true)?;
                let v = ctx.core.reg(0, false, size);
                ctx.write_lin(d, size, v)?;
            }
            string::LODS => {
                let s = ctx.linear(sseg, si, size as u64, false)?;
                let v = ctx.read_lin(s, size)?;
                ctx.core.set_reg(0, false, size, v);
            }
            string::CMPS => {
                let s = ctx.linear(sseg, si, size as u64, false)?;
                let a = ctx.read_lin(s, size)?;
                let d = ctx.linear(seg::ES as u8, di, size as u64, false)?;
                let b = ctx.read_lin(d, size)?;
                cmp = Some((a, b));
            }
            string::SCAS => {
                let d = ctx.linear(seg::ES as u8, di, size as u64, false)?;
                let b = ctx.read_lin(d, size)?;
                cmp = Some((ctx.core.reg(0, false, size), b));
            }
            string::INS => {
                let d = ctx.linear(seg::ES as u8, di, size as u64, true)?;
                // Check the destination is writable before the device sees the read.
                ctx.translate(d, crate::paging::Kind::Write, ctx.core.cpl() == 3)?;
                let port = ctx.core.reg(2, false, 2) as u16;
                let mut buf = [0u8; 4];
                ctx.port_in(port, &mut buf[..size as usize]);
                ctx.write_lin(d, size, u32::from_le_bytes(buf) as u64)?;
            }
            _ => {
                let s = ctx.linear(sseg, si, size as u64, false)?;
                let v = ctx.read_lin(s, size)?;
                let port = ctx.core.reg(2, false, 2) as u16;
                ctx.port_out(port, &v.to_le_bytes()[..size as usize]);
            }
        }
        if matches!(
            kind,
            string::MOVS | string::LODS | string::CMPS | string::OUTS
        ) {
            let v = si.wrapping_add(step) & am;
            ctx.core
                .set_reg(6, false, asz.max(2), v | (ctx.core.gpr[6] & !am));
        }
        if matches!(
            kind,
            string::MOVS | string::STOS | string::CMPS | string::SCAS | string::INS
        ) {
            let v = di.wrapping_add(step) & am;
            ctx.core
                .set_reg(7, false, asz.max(2), v | (ctx.core.gpr[7] & !am));
        }
        if let Some((a, b)) = cmp {
            let r = a.wrapping_sub(b) & mask(size);
            ctx.core.set_lazy(FlagOp::Sub, size, r, a, b);
        }
        if rep == 0 {
            break;
        }
        let c = ctx.core.gpr[1].wrapping_sub(1) & am;
        ctx.core
            .set_reg(1, false, asz.max(2), c | (ctx.core.gpr[1] & !am));
        n += 1;
        if let Some((a, b)) = cmp {
            let eq = a == b;
            if (rep == string::REP && !eq) || (rep == string::REPNE && eq) {
                break;
            }
        }
        if ctx.device || ctx.smc_current || ctx.core.db_hits != 0 || ctx.core.rflags & fl::TF != 0 {
            // One device access per exit; a store into the running block ends it; an I/O
            // or data breakpoint hit traps after the iteration that hit it, and single
            // stepping traps after every iteration (the run loop delivers the #DB with RIP
            // still at this instruction when iterations remain).
            if ctx.core.gpr[1] & am != 0 {
                return Ok(Ctl::Restart);
            }
            break;
        }
    }
    Ok(Ctl::Next)
}

/// Whether an operand is a plain (non high-byte) register.
pub fn plain_reg(o: &Operand) -> bool {
    matches!(o, Operand::Reg { hi: false, idx } if *idx != NO_REG)
}
