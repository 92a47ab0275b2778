//! Descriptor tables: LGDT/LIDT/SGDT/SIDT, LLDT/LTR/SLDT/STR, and the selector queries
//! LAR, LSL, VERR, VERW and ARPL.

use super::*;

/// LGDT/LIDT (`aux` 0 gdt, 1 idt) and SGDT/SIDT (`aux` 2, 3).
pub fn desc_table(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let Operand::Mem(m) = op.dst else {
        return Err(Exc::UD);
    };
    if op.aux >= 2 {
        umip_check(ctx)?;
    }
    let bsize: u8 = if ctx.core.mode64() { 8 } else { 4 };
    let off = ctx.ea(&m);
    let lin = ctx.linear(m.seg, off, 2 + bsize as u64, op.aux >= 2)?;
    if op.aux < 2 {
        need_cpl0(ctx)?;
        let limit = ctx.read_lin(lin, 2)? as u16;
        let mut base = ctx.read_lin(lin + 2, bsize)?;
        if op.size == 2 && bsize == 4 {
            base &= 0xff_ffff;
        }
        // A non-canonical table base is refused before anything changes.
        if bsize == 8 && !crate::exec::canonical(base) {
            return Err(Exc::gp(0));
        }
        let t = deja_machine::cpu::DescriptorTable { base, limit };
        if op.aux == 0 {
            ctx.core.gdtr = t;
        } else {
            ctx.core.idtr = t;
        }
    } else {
        let t = if op.aux == 2 {
            ctx.core.gdtr
        } else {
            ctx.core.idtr
        };
        ctx.write_lin(lin, 2, t.limit as u64)?;
        ctx.write_lin(lin + 2, bsize, t.base)?;
    }
    Ok(Ctl::Next)
}

/// LLDT (`aux` 0), LTR (`aux` 1), SLDT (`aux` 2), STR (`aux` 3).
pub fn ldt_tr(ctx: &mut Ctx, op: &UOp) -> OpResult {
    if !ctx.core.protected() || ctx.core.vm86() {
        return Err(Exc::UD);
    }
    if op.aux >= 2 {
        umip_check(ctx)?;
        let v = if op.aux == 2 {
            ctx.core.ldtr.selector
        } else {
            ctx.core.tr.selector
        };
        let size = if op.dst.is_mem() { 2 } else { op.size };
        ctx.put(&op.dst, size, v as u64)?;
        return Ok(Ctl::Next);
    }
    need_cpl0(ctx)?;
    let sel = ctx.get(&op.dst, 2)? as u16;
    let code = (sel & 0xfffc) as u32;
    if sel & 4 != 0 {
        return Err(Exc::gp(code));
    }
    if sel & 0xfffc == 0 {
        if op.aux == 1 {
            return Err(Exc::gp(0));
        }
        ctx.core.ldtr = Segment {
            selector: sel,
            unusable: true,
            ..Segment::default()
        };
        return Ok(Ctl::Next);
    }
    let (addr, d) = read_descriptor(ctx, sel)?;
    let mut s = parse_descriptor(sel, d);
    let ok = if op.aux == 0 {
        !s.s && s.type_ == 2
    } else {
        !s.s && (s.type_ == 1 || s.type_ == 9)
    };
    if !ok {
        return Err(Exc::gp(code));
    }
    if !s.present {
        return Err(Exc::np(code));
    }
    if ctx.core.long_mode() {
        // The 16-byte descriptor's upper half holds base 63:32; a non-canonical base is
        // #GP(selector) (as kvm's emulator and Bochs do).
        let hi = ctx.read_sys(addr + 8, 8)?;
        s.base |= (hi & 0xffff_ffff) << 32;
        if !crate::exec::canonical(s.base) {
            return Err(Exc::gp(code));
        }
    }
    if op.aux == 0 {
        ctx.core.ldtr = s;
    } else {
        // Mark busy in the descriptor and the cache.
        let b = ((d >> 40) as u8) | 2;
        ctx.write_sys(addr + 5, 1, b as u64)?;
        s.type_ |= 2;
        ctx.core.tr = s;
    }
    Ok(Ctl::Next)
}

/// What [`selector_query`] does, in `aux`.
pub mod selector_query {
    #![allow(missing_docs)]
    pub const LAR: u8 = 0;
    pub const LSL: u8 = 1;
    pub const VERR: u8 = 2;
    pub const VERW: u8 = 3;
    pub const ARPL: u8 = 4;
}

/// The descriptor `sel` names, or `None` where LAR/LSL/VERR/VERW answer ZF = 0 without a
/// fault: a null selector, one beyond the GDT or LDT limit (or into an unusable LDT), and in
/// IA-32e mode a system descriptor whose upper 8 bytes are beyond the limit. Returns the
/// low 8 bytes of the descriptor.
fn query_descriptor(ctx: &mut Ctx, sel: u16) -> Result<Option<u64>, Exc> {
    if sel & 0xfffc == 0 {
        return Ok(None);
    }
    let (base, limit) = if sel & 4 != 0 {
        let l = ctx.core.ldtr;
        if l.unusable || !l.present {
            return Ok(None);
        }
        (l.base, l.limit as u64)
    } else {
        (ctx.core.gdtr.base, ctx.core.gdtr.limit as u64)
    };
    let off = (sel & 0xfff8) as u64;
    if off + 7 > limit {
        return Ok(None);
    }
    let d = ctx.read_sys(base.wrapping_add(off), 8)?;
    let system = d & (1 << 44) == 0;
    if system && ctx.core.long_mode() && off + 15 > limit {
        return Ok(None);
    }
    Ok(Some(d))
}

/// LAR, LSL, VERR, VERW (`aux`: [`selector_query`]) and ARPL: descriptor queries that set
/// ZF instead of faulting on a selector they cannot use (SDM vol. 2: the descriptor types
/// each accepts, in legacy and in IA-32e mode; DPL against CPL and RPL except for
/// conforming code). #UD in real and virtual-8086 mode. Only ZF changes.
pub fn selector_query(ctx: &mut Ctx, op: &UOp) -> OpResult {
    use selector_query::*;
    if !ctx.core.protected() || ctx.core.vm86() {
        return Err(Exc::UD);
    }
    let zf = if op.aux == ARPL {
        let dst = ctx.get(&op.dst, 2)?;
        let src = ctx.get(&op.src, 2)?;
        let adjust = dst & 3 < src & 3;
        if adjust {
            ctx.put(&op.dst, 2, (dst & !3) | (src & 3))?;
        }
        adjust
    } else {
        let sel_op = if op.aux >= VERR { &op.dst } else { &op.src };
        let sel = ctx.get(sel_op, 2)? as u16;
        let ok = match query_descriptor(ctx, sel)? {
            None => None,
            Some(d) => {
                let hi = (d >> 32) as u32;
                let s = hi & (1 << 12) != 0;
                let type_ = ((hi >> 8) & 0xf) as u8;
                let dpl = ((hi >> 13) & 3) as u8;
                let code = s && type_ & 8 != 0;
                let conforming = code && type_ & 4 != 0;
                let cpl = ctx.core.cpl();
                let rpl = (sel & 3) as u8;
                let privileged = dpl >= cpl && dpl >= rpl;
                let ia32e = ctx.core.long_mode();
                let type_ok = match op.aux {
                    LAR if !s && ia32e => matches!(type_, 2 | 9 | 0xb | 0xc),
                    LAR if !s => matches!(type_, 1..=5 | 9 | 0xb | 0xc),
                    LSL if !s && ia32e => matches!(type_, 2 | 9 | 0xb),
                    LSL if !s => matches!(type_, 1..=3 | 9 | 0xb),
                    LAR | LSL => true,
                    // Data segments are always readable; code only with R.
                    VERR => s && (!code || type_ & 2 != 0),
                    // Writable data segments only.
                    _ => s && !code && type_ & 2 != 0,
                };
                (type_ok && (conforming && op.aux != VERW || privileged)).then_some(d)
            }
        };
        if let Some(d) = ok {
            let hi = (d >> 32) as u32;
            match op.aux {
                LAR => {
                    let mask = if op.size == 2 { 0xff00 } else { 0x00f0_ff00 };
                    ctx.put(&op.dst, op.size, u64::from(hi & mask))?;
                }
                LSL => {
                    let limit = parse_descriptor(sel, d).limit;
                    ctx.put(&op.dst, op.size, u64::from(limit))?;
                }
                _ => {}
            }
        }
        ok.is_some()
    };
    ctx.core.materialize();
    if zf {
        ctx.core.rflags |= fl::ZF;
    } else {
        ctx.core.rflags &= !fl::ZF;
    }
    Ok(Ctl::Next)
}
