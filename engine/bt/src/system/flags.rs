//! CLI/STI, PUSHF and POPF with the IOPL, VIF and VM rules.

use super::*;

/// CLI (`aux` 0) / STI (`aux` 1).
pub fn cli_sti(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let c = &mut *ctx.core;
    let set = op.aux == 1;
    let allowed = !c.protected() || c.cpl() <= c.iopl();
    if allowed {
        if set {
            if c.rflags & fl::IF == 0 {
                c.pending.interrupt_shadow = true;
            }
            c.rflags |= fl::IF;
        } else {
            c.rflags &= !fl::IF;
        }
    } else if (c.vm86() && c.cr4 & crb::VME != 0)
        || (!c.vm86() && c.cpl() == 3 && c.cr4 & crb::PVI != 0)
    {
        if set {
            if c.rflags & fl::VIP != 0 {
                return Err(Exc::gp(0));
            }
            c.rflags |= fl::VIF;
        } else {
            c.rflags &= !fl::VIF;
        }
    } else {
        return Err(Exc::gp(0));
    }
    ctx.core.rip = op.next_rip;
    Ok(Ctl::End)
}

/// PUSHF/PUSHFD/PUSHFQ.
pub fn pushf(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let c = &*ctx.core;
    let mut f = c.flags() & !(fl::RF | fl::VM);
    if c.vm86() && c.iopl() < 3 {
        if c.cr4 & crb::VME == 0 || op.size != 2 {
            return Err(Exc::gp(0));
        }
        f = (f & !fl::IF) | if c.rflags & fl::VIF != 0 { fl::IF } else { 0 } | fl::IOPL;
    }
    ctx.push(op.size, f & mask(op.size))?;
    Ok(Ctl::Next)
}

/// POPF/POPFD/POPFQ with the CPL/IOPL/VM rules.
pub fn popf(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let (cpl, iopl, vm86, vme) = {
        let c = &*ctx.core;
        (c.cpl(), c.iopl(), c.vm86(), c.cr4 & crb::VME != 0)
    };
    let v = ctx.peek(op.size, 0)?;
    let old = ctx.core.flags();
    let mut changeable = fl::ARITH | fl::TF | fl::DF | fl::NT | fl::AC | fl::ID | fl::IF | fl::IOPL;
    let mut newf = v;
    if vm86 && iopl < 3 {
        if !vme || op.size != 2 {
            return Err(Exc::gp(0));
        }
        if (v & fl::TF != 0) || (v & fl::IF != 0 && old & fl::VIP != 0) {
            return Err(Exc::gp(0));
        }
        changeable &= !(fl::IF | fl::IOPL);
        // IF in the image goes to VIF.
        let vif = if v & fl::IF != 0 { fl::VIF } else { 0 };
        newf = (newf & !fl::VIF) | vif;
        let f = (old & !(changeable | fl::VIF)) | (newf & (changeable | fl::VIF));
        ctx.pop(op.size)?;
        ctx.core.rflags = (f & fl::WRITABLE) | 2;
        ctx.core.lazy.op = crate::core::FlagOp::Done;
        ctx.core.rip = op.next_rip;
        return Ok(Ctl::End);
    }
    if ctx.core.protected() && cpl > 0 {
        changeable &= !fl::IOPL;
        if cpl > iopl && !vm86 {
            changeable &= !fl::IF;
        }
    }
    if vm86 {
        changeable &= !fl::IOPL;
    }
    changeable &= mask(op.size);
    ctx.pop(op.size)?;
    let f = (old & !changeable) | (newf & changeable);
    let f = f & !fl::RF;
    if f & fl::IF != 0 && old & fl::IF == 0 {
        // POPF does not create an interrupt shadow; the block ends so the boundary check
        // sees the new IF.
    }
    ctx.core.rflags = (f & fl::WRITABLE) | 2;
    ctx.core.lazy.op = crate::core::FlagOp::Done;
    ctx.core.rip = op.next_rip;
    Ok(Ctl::End)
}

/// STAC (`aux` 1) / CLAC (`aux` 0): set or clear EFLAGS.AC, which lets explicit
/// supervisor-mode accesses reach user pages under SMAP. #UD at CPL > 0 (virtual-8086 mode
/// included); the translator gives #UD when the CPUID table lacks SMAP. Alignment checking
/// is off at CPL 0, so nothing cached depends on the change.
pub fn stac_clac(ctx: &mut Ctx, op: &UOp) -> OpResult {
    if ctx.core.cpl() != 0 {
        return Err(Exc::UD);
    }
    if op.aux == 1 {
        ctx.core.rflags |= fl::AC;
    } else {
        ctx.core.rflags &= !fl::AC;
    }
    Ok(Ctl::Next)
}
