//! Descriptors and segment loads: reading and parsing descriptors, the accessed bit,
//! MOV/POP/PUSH Sreg and LDS/LES/LFS/LGS/LSS with every protected-mode check.

use super::*;

/// Reads a descriptor (8 bytes) for `sel` from the GDT or LDT. `Err(sel)`-style faults are
/// #GP(selector) unless the caller maps them.
pub fn read_descriptor(ctx: &mut Ctx, sel: u16) -> Result<(u64, u64), Exc> {
    let (base, limit) = if sel & 4 != 0 {
        let l = ctx.core.ldtr;
        if l.unusable || !l.present {
            return Err(Exc::gp((sel & 0xfffc) as u32));
        }
        (l.base, l.limit as u64)
    } else {
        (ctx.core.gdtr.base, ctx.core.gdtr.limit as u64)
    };
    let off = (sel & 0xfff8) as u64;
    if off + 7 > limit {
        return Err(Exc::gp((sel & 0xfffc) as u32));
    }
    let addr = base.wrapping_add(off);
    let lo = ctx.read_sys(addr, 8)?;
    Ok((addr, lo))
}

/// The checks of the code segment a call gate or an interrupt/trap gate leads to: a code
/// segment with DPL <= CPL (#GP), a 64-bit one in long mode (#GP), present (#NP); `tcode`
/// is the error code both faults carry.
pub(super) fn check_gate_target(t: &Segment, tcode: u32, cpl: u8, long: bool) -> Result<(), Exc> {
    if !t.s || t.type_ & 8 == 0 || t.dpl > cpl {
        return Err(Exc::gp(tcode));
    }
    if long && (!t.l || t.db) {
        return Err(Exc::gp(tcode));
    }
    if !t.present {
        return Err(Exc::np(tcode));
    }
    Ok(())
}

/// The segment a descriptor describes.
pub fn parse_descriptor(sel: u16, d: u64) -> Segment {
    let lo = d as u32;
    let hi = (d >> 32) as u32;
    let g = hi & (1 << 23) != 0;
    let mut limit = (lo & 0xffff) | (hi & 0xf_0000);
    if g {
        limit = (limit << 12) | 0xfff;
    }
    Segment {
        selector: sel,
        base: ((lo >> 16) | ((hi & 0xff) << 16) | (hi & 0xff00_0000)) as u64,
        limit,
        type_: ((hi >> 8) & 0xf) as u8,
        s: hi & (1 << 12) != 0,
        dpl: ((hi >> 13) & 3) as u8,
        present: hi & (1 << 15) != 0,
        avl: hi & (1 << 20) != 0,
        l: hi & (1 << 21) != 0,
        db: hi & (1 << 22) != 0,
        g,
        unusable: false,
    }
}

pub(crate) fn set_accessed(ctx: &mut Ctx, addr: u64, d: u64) -> Result<(), Exc> {
    if d & (1 << 40) == 0 {
        let b = ((d >> 40) as u8) | 1;
        ctx.write_sys(addr + 5, 1, b as u64)?;
    }
    Ok(())
}

/// Loads a data segment register or SS with every protected-mode check.
pub fn load_seg(ctx: &mut Ctx, sreg: usize, sel: u16) -> Result<(), Exc> {
    let c = &*ctx.core;
    if !c.protected() || c.vm86() {
        let vm86 = ctx.core.vm86();
        let s = &mut ctx.core.seg[sreg];
        s.selector = sel;
        s.base = (sel as u64) << 4;
        if vm86 {
            *s = Segment::real_mode(sel, sreg == seg::CS);
            s.dpl = 3;
        }
        return Ok(());
    }
    let cpl = c.cpl();
    let rpl = (sel & 3) as u8;
    let code = (sel & 0xfffc) as u32;
    if sel & 0xfffc == 0 {
        if sreg == seg::SS && !(c.mode64() && cpl != 3 && rpl == cpl) {
            return Err(Exc::gp(0));
        }
        let s = &mut ctx.core.seg[sreg];
        *s = Segment {
            selector: sel,
            unusable: true,
            ..Segment::default()
        };
        if sreg == seg::SS {
            s.dpl = cpl;
            s.db = false;
        }
        return Ok(());
    }
    let (addr, d) = read_descriptor(ctx, sel)?;
    let s = parse_descriptor(sel, d);
    if sreg == seg::SS {
        if rpl != cpl || s.dpl != cpl || !s.s || s.type_ & 8 != 0 || s.type_ & 2 == 0 {
            return Err(Exc::gp(code));
        }
        if !s.present {
            return Err(Exc::ss(code));
        }
    } else {
        if !s.s || (s.type_ & 8 != 0 && s.type_ & 2 == 0) {
            return Err(Exc::gp(code));
        }
        let conforming_code = s.type_ & 0xc == 0xc;
        if !conforming_code && (rpl > s.dpl || cpl > s.dpl) {
            return Err(Exc::gp(code));
        }
        if !s.present {
            return Err(Exc::np(code));
        }
    }
    set_accessed(ctx, addr, d)?;
    let mut s = s;
    s.type_ |= 1;
    ctx.core.seg[sreg] = s;
    Ok(())
}

/// MOV Sreg, r/m and POP Sreg (`aux` 1 = pop).
pub fn mov_sreg(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let Operand::Sreg(s) = op.dst else {
        return Err(Exc::UD);
    };
    let s = s as usize;
    if s == seg::CS {
        return Err(Exc::UD);
    }
    let sel = if op.aux == 1 {
        ctx.peek(op.size, 0)? as u16
    } else {
        ctx.get(&op.src, 2)? as u16
    };
    // POP steps the stack pointer by the stack size in force before the load (POP SS may
    // change SS.B).
    let ss = ctx.core.stack_size();
    load_seg(ctx, s, sel)?;
    if op.aux == 1 {
        let sp = ctx.core.gpr[4].wrapping_add(op.size as u64);
        ctx.core.set_reg(4, false, ss, sp);
    }
    ctx.core.rip = op.next_rip;
    if s == seg::SS {
        ctx.core.pending.interrupt_shadow = true;
    }
    // The stack size and data segments are part of the block's mode: look up afresh.
    Ok(Ctl::End)
}

/// MOV from Sreg.
pub fn mov_from_sreg(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let Operand::Sreg(s) = op.src else {
        return Err(Exc::UD);
    };
    let v = ctx.core.seg[s as usize].selector as u64;
    // To a register, 32/64-bit sizes zero-extend; to memory, always 16 bits.
    let size = if op.dst.is_mem() { 2 } else { op.size };
    ctx.put(&op.dst, size, v)?;
    Ok(Ctl::Next)
}

/// PUSH Sreg.
pub fn push_sreg(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let Operand::Sreg(s) = op.dst else {
        return Err(Exc::UD);
    };
    let v = ctx.core.seg[s as usize].selector as u64;
    ctx.push(op.size, v)?;
    Ok(Ctl::Next)
}

/// LDS/LES/LFS/LGS/LSS (`aux` = segment register).
pub fn load_far_pointer(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let Operand::Mem(m) = op.src else {
        return Err(Exc::UD);
    };
    let off = ctx.ea(&m);
    let lin = ctx.linear(m.seg, off, op.size as u64 + 2, false)?;
    let v = ctx.read_lin(lin, op.size)?;
    let sel = ctx.read_lin(lin + op.size as u64, 2)? as u16;
    load_seg(ctx, op.aux as usize, sel)?;
    ctx.put(&op.dst, op.size, v)?;
    ctx.core.rip = op.next_rip;
    Ok(Ctl::End)
}
