//! The x87 instructions that expose the FP environment's layout or the guest's pointers, done
//! in software: FNSTENV/FLDENV and FNSAVE/FRSTOR in their four formats (16/32-bit operand
//! size × real/protected mode), and the byte-masked stores MASKMOVQ/MASKMOVDQU (their
//! implicit DS:rDI operand follows the guest's address size). All other x87, MMX and SSE
//! arithmetic runs in [`crate::native`].

use crate::exec::Ctx;
use crate::ir::{Ctl, Exc, OpResult, Operand, UOp};
use crate::native::{fp_available, x87_error, x87_error_sync, x87_pending};
use deja_machine::cpu::seg;
use iced_x86::{Code, Instruction, Mnemonic, OpKind, Register};

/// Which environment operation (`UOp::aux`).
mod env_op {
    pub const STENV: u8 = 0;
    pub const LDENV: u8 = 1;
    pub const SAVE: u8 = 2;
    pub const RSTOR: u8 = 3;
}

/// The 2-bit tag of one register's contents (valid 00, zero 01, special 10).
fn tag_of(reg: &[u8; 16]) -> u16 {
    let mant = u64::from_le_bytes(reg[0..8].try_into().unwrap_or([0; 8]));
    let exp = u16::from_le_bytes([reg[8], reg[9]]) & 0x7fff;
    match exp {
        0x7fff => 2,
        0 if mant == 0 => 1,
        0 => 2,
        _ if mant >> 63 == 0 => 2,
        _ => 0,
    }
}

/// TOP of a status word.
fn top_of(fsw: u16) -> usize {
    ((fsw >> 11) & 7) as usize
}

/// The ST-ordered register file (FXSAVE order) after TOP changes from `old` to `new` with
/// the physical registers unchanged.
pub fn restack(st: &[[u8; 16]; 8], old: usize, new: usize) -> [[u8; 16]; 8] {
    std::array::from_fn(|i| st[(i + new + 8 - old) & 7])
}

/// The full 16-bit tag word from the abridged one and the register contents.
pub fn full_tag_word(fsw: u16, ftw: u8, st: &[[u8; 16]; 8]) -> u16 {
    let top = ((fsw >> 11) & 7) as usize;
    let mut w = 0u16;
    for phys in 0..8 {
        let t = if ftw & (1 << phys) == 0 {
            3
        } else {
            tag_of(&st[(phys + 8 - top) & 7])
        };
        w |= t << (phys * 2);
    }
    w
}

/// The abridged tag (one bit per physical register: not empty) of a full tag word.
pub fn abridged_tag(ftw: u16) -> u8 {
    (0..8).fold(0u8, |acc, p| {
        if (ftw >> (p * 2)) & 3 != 3 {
            acc | (1 << p)
        } else {
            acc
        }
    })
}

/// FNSTENV/FLDENV/FNSAVE/FRSTOR; `size` is the operand size (2 or 4) that picks the 14- or
/// 28-byte environment.
fn env(ctx: &mut Ctx, op: &UOp) -> OpResult {
    fp_available(ctx, true, false, false)?;
    let loads = matches!(op.aux, env_op::LDENV | env_op::RSTOR);
    let regs = matches!(op.aux, env_op::SAVE | env_op::RSTOR);
    if loads
        && x87_pending(ctx.core.fpu.fsw, ctx.core.fpu.fcw)
        && let Some(instead) = x87_error(ctx)
    {
        return instead;
    }
    let Operand::Mem(m) = op.dst else {
        return Err(Exc::UD);
    };
    let env_len = if op.size == 2 { 14 } else { 28 };
    let len = env_len + if regs { 80 } else { 0 };
    let off = ctx.ea(&m);
    // Alignment checking sees the area as one operand aligned to the operand size (SDM vol. 3
    // table 6-7: "FSTENV/FLDENV save area, FSAVE/FRSTOR save area: 4 or 2, depending on
    // operand size"), not the 80-bit registers inside it one by one.
    let lin = ctx.linear_aligned(m.seg, off, len as u64, !loads, u64::from(op.size))?;
    let user = ctx.core.cpl() == 3;
    let real = !ctx.core.protected() || ctx.core.vm86();
    let mut b = vec![0u8; len];
    if loads {
        ctx.read_bytes(lin, &mut b, user)?;
        let w = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let d = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let (fcw, fsw, ftw, fip, fdp, fop);
        if op.size == 2 {
            (fcw, fsw, ftw) = (w(0), w(2), w(4));
            if real {
                fip = u64::from(w(6)) | (u64::from(w(8) >> 12) << 16);
                fop = w(8) & 0x7ff;
                fdp = u64::from(w(10)) | (u64::from(w(12) >> 12) << 16);
            } else {
                fip = u64::from(w(6)) | (u64::from(w(8)) << 32);
                fop = ctx.core.fpu.fop;
                fdp = u64::from(w(10)) | (u64::from(w(12)) << 32);
            }
        } else {
            (fcw, fsw, ftw) = (w(0), w(4), w(8));
            if real {
                fip = u64::from(w(12)) | (u64::from((d(16) >> 12) & 0xffff) << 16);
                fop = (d(16) & 0x7ff) as u16;
                fdp = u64::from(w(20)) | (u64::from((d(24) >> 12) & 0xffff) << 16);
            } else {
                fip = u64::from(d(12)) | (u64::from(w(16)) << 32);
                fop = w(18) & 0x7ff;
                fdp = u64::from(d(20)) | (u64::from(w(24)) << 32);
            }
        }
        let f = &mut ctx.core.fpu;
        if regs {
            // FRSTOR's register image is in ST order for the new TOP.
            for i in 0..8 {
                let mut r = [0u8; 16];
                r[..10].copy_from_slice(&b[env_len + i * 10..env_len + i * 10 + 10]);
                f.st[i] = r;
            }
        } else {
            // FLDENV keeps the physical registers: they move in ST order with TOP.
            f.st = restack(&f.st, top_of(f.fsw), top_of(fsw));
        }
        f.fcw = fcw;
        f.fsw = fsw;
        f.ftw = abridged_tag(ftw);
        f.fip = fip;
        f.fdp = fdp;
        f.fop = fop;
        x87_error_sync(ctx);
        return Ok(Ctl::Next);
    }
    let f = &ctx.core.fpu;
    let ftw = full_tag_word(f.fsw, f.ftw, &f.st);
    let fcs = if ctx.core.mode64() {
        ctx.core.seg[seg::CS].selector
    } else {
        (f.fip >> 32) as u16
    };
    let fds = if ctx.core.mode64() {
        ctx.core.seg[seg::DS].selector
    } else {
        (f.fdp >> 32) as u16
    };
    let (fip, fdp) = (f.fip & 0xffff_ffff, f.fdp & 0xffff_ffff);
    // Real-mode formats hold linear (20- or 32-bit) pointers.
    let (lip, ldp) = (
        fip.wrapping_add(u64::from(fcs) << 4),
        fdp.wrapping_add(u64::from(fds) << 4),
    );
    let put16 = |b: &mut Vec<u8>, i: usize, v: u16| b[i..i + 2].copy_from_slice(&v.to_le_bytes());
    let put32 = |b: &mut Vec<u8>, i: usize, v: u32| b[i..i + 4].copy_from_slice(&v.to_le_bytes());
    if op.size == 2 {
        put16(&mut b, 0, f.fcw);
        put16(&mut b, 2, f.fsw);
        put16(&mut b, 4, ftw);
        if real {
            put16(&mut b, 6, lip as u16);
            put16(
                &mut b,
                8,
                (((lip >> 16) as u16 & 0xf) << 12) | (f.fop & 0x7ff),
            );
            put16(&mut b, 10, ldp as u16);
            put16(&mut b, 12, ((ldp >> 16) as u16 & 0xf) << 12);
        } else {
            put16(&mut b, 6, fip as u16);
            put16(&mut b, 8, fcs);
            put16(&mut b, 10, fdp as u16);
            put16(&mut b, 12, fds);
        }
    } else {
        for i in [0, 4, 8, 12, 20, 24] {
            put32(&mut b, i, 0xffff_ffff);
        }
        put16(&mut b, 0, f.fcw);
        put16(&mut b, 4, f.fsw);
        put16(&mut b, 8, ftw);
        if real {
            put16(&mut b, 12, lip as u16);
            put32(
                &mut b,
                16,
                ((((lip >> 16) & 0xffff) as u32) << 12) | u32::from(f.fop & 0x7ff),
            );
            put16(&mut b, 20, ldp as u16);
            put32(&mut b, 24, (((ldp >> 16) & 0xffff) as u32) << 12);
        } else {
            put32(&mut b, 12, fip as u32);
            put16(&mut b, 16, fcs);
            put16(&mut b, 18, f.fop & 0x7ff);
            put32(&mut b, 20, fdp as u32);
            put16(&mut b, 24, fds);
        }
    }
    if regs {
        for i in 0..8 {
            b[env_len + i * 10..env_len + i * 10 + 10].copy_from_slice(&f.st[i][..10]);
        }
    }
    ctx.write_bytes(lin, &b, user)?;
    let f = &mut ctx.core.fpu;
    if regs {
        // FNSAVE ends with FNINIT (TOP = 0: the registers move in ST order).
        f.st = restack(&f.st, top_of(f.fsw), 0);
        f.fcw = 0x37f;
        f.fsw = 0;
        f.ftw = 0;
        f.fip = 0;
        f.fdp = 0;
        f.fop = 0;
    } else {
        // FNSTENV masks every exception after storing.
        f.fcw |= 0x3f;
    }
    x87_error_sync(ctx);
    Ok(Ctl::Next)
}

/// MASKMOVQ (`size` 8) / MASKMOVDQU (`size` 16): stores the bytes of the first register
/// whose mask byte (second register) has its top bit set, at DS:rDI (`aux` = address size).
fn maskmov(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let mmx = op.size == 8;
    fp_available(ctx, false, !mmx, false)?;
    if mmx
        && x87_pending(ctx.core.fpu.fsw, ctx.core.fpu.fcw)
        && let Some(instead) = x87_error(ctx)
    {
        return instead;
    }
    let reg = |ctx: &Ctx, o: &Operand| -> u128 {
        match *o {
            Operand::Xmm(r) => u128::from_le_bytes(ctx.core.fpu.xmm[r as usize]),
            Operand::Other(r) => {
                let i = r.wrapping_sub(Register::MM0 as u16) as usize & 7;
                u128::from(u64::from_le_bytes(
                    ctx.core.fpu.st[i][..8].try_into().unwrap_or([0; 8]),
                ))
            }
            _ => 0,
        }
    };
    let data = reg(ctx, &op.src);
    let mask = reg(ctx, &op.src2);
    let Operand::Sreg(sreg) = op.dst else {
        return Err(Exc::UD);
    };
    let mut di = ctx.core.gpr[7];
    match op.aux {
        2 => di &= 0xffff,
        4 => di &= 0xffff_ffff,
        _ => {}
    }
    let user = ctx.core.cpl() == 3;
    for i in 0..op.size as u32 {
        if (mask >> (i * 8 + 7)) & 1 != 0 {
            let lin = ctx.linear(sreg, di.wrapping_add(i as u64), 1, true)?;
            ctx.write_bytes(lin, &[(data >> (i * 8)) as u8], user)?;
        }
    }
    if mmx {
        // An MMX instruction: TOP = 0, every register valid.
        ctx.core.fpu.fsw &= !0x3800;
        ctx.core.fpu.ftw = 0xff;
    }
    Ok(Ctl::Next)
}

/// Picks the software handler for the instructions above; returns whether it did.
pub fn build(insn: &Instruction, op: &mut UOp) -> bool {
    let m = insn.mnemonic();
    match m {
        Mnemonic::Fnstenv | Mnemonic::Fldenv | Mnemonic::Fnsave | Mnemonic::Frstor => {
            op.aux = match m {
                Mnemonic::Fnstenv => env_op::STENV,
                Mnemonic::Fldenv => env_op::LDENV,
                Mnemonic::Fnsave => env_op::SAVE,
                _ => env_op::RSTOR,
            };
            op.size = if matches!(
                insn.code(),
                Code::Fnstenv_m14byte
                    | Code::Fldenv_m14byte
                    | Code::Fnsave_m94byte
                    | Code::Frstor_m94byte
            ) {
                2
            } else {
                4
            };
            op.exec = env;
            true
        }
        Mnemonic::Maskmovq | Mnemonic::Maskmovdqu => {
            op.size = if m == Mnemonic::Maskmovq { 8 } else { 16 };
            let mut sreg = seg::DS as u8;
            op.aux = 8;
            for i in 0..insn.op_count() {
                match insn.op_kind(i) {
                    OpKind::MemorySegDI => op.aux = 2,
                    OpKind::MemorySegEDI => op.aux = 4,
                    OpKind::MemorySegRDI => op.aux = 8,
                    _ => continue,
                }
                sreg = (insn.memory_segment() as u32 - Register::ES as u32) as u8;
            }
            op.dst = Operand::Sreg(sreg);
            op.src = crate::translate::operand(insn, 1, 64);
            op.src2 = crate::translate::operand(insn, 2, 64);
            if let (Operand::None, Operand::None) = (op.src, op.src2) {
                return false;
            }
            op.exec = maskmov;
            true
        }
        _ => false,
    }
}
