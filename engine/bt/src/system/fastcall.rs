//! Fast system calls: SYSCALL/SYSRET, SYSENTER/SYSEXIT and SWAPGS.

use super::*;

/// SWAPGS.
pub fn swapgs(ctx: &mut Ctx, _op: &UOp) -> OpResult {
    if !ctx.core.mode64() {
        return Err(Exc::UD);
    }
    need_cpl0(ctx)?;
    let k = ctx.core.msr(msr::IA32_KERNEL_GS_BASE);
    let g = ctx.core.seg[seg::GS].base;
    ctx.core.seg[seg::GS].base = k;
    ctx.core.msrs.insert(msr::IA32_KERNEL_GS_BASE, g);
    Ok(Ctl::Next)
}

fn flat(selector: u16, code: bool, long: bool, dpl: u8) -> Segment {
    let mut s = Segment::flat(selector, code, long);
    s.dpl = dpl;
    if dpl == 3 {
        s.selector |= 3;
    }
    s
}

/// SYSCALL.
pub fn syscall(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let c = &*ctx.core;
    if c.efer & crb::SCE == 0 || !c.long_mode() {
        return Err(Exc::UD);
    }
    let star = c.msr(msr::IA32_STAR);
    let fmask = c.msr(msr::IA32_FMASK);
    let target = if c.mode64() {
        c.msr(msr::IA32_LSTAR)
    } else {
        c.msr(msr::IA32_CSTAR)
    };
    let f = c.flags();
    ctx.core.gpr[1] = op.next_rip;
    ctx.core.gpr[11] = f & !fl::RF;
    let sel = ((star >> 32) & 0xfffc) as u16;
    ctx.core.seg[seg::CS] = flat(sel, true, true, 0);
    ctx.core.seg[seg::SS] = flat(sel + 8, false, false, 0);
    ctx.core.rflags = ((f & !fmask & !fl::RF) & fl::WRITABLE) | 2;
    ctx.core.lazy.op = crate::core::FlagOp::Done;
    ctx.core.rip = target;
    single_step_after(ctx);
    Ok(Ctl::End)
}

/// SYSCALL and SYSRET single-step by the TF they leave, not the one they found (the debug
/// step skips them): an FMASK that clears TF keeps the trap out of the kernel, and a SYSRET
/// that restores TF traps at once, in user mode, as if the SYSCALL had just completed. This
/// is what QEMU does and what Linux relies on (its FMASK clears TF, and its SYSCALL entry,
/// unlike SYSENTER's, has no code for a #DB on its first instruction).
fn single_step_after(ctx: &mut Ctx) {
    if ctx.core.rflags & fl::TF != 0 {
        ctx.core.db_pending |= dbg::BS;
    }
}

/// SYSRET (`size` 8 = to 64-bit, 4 = to compatibility mode).
pub fn sysret(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let c = &*ctx.core;
    if c.efer & crb::SCE == 0 || !c.mode64() {
        return Err(Exc::UD);
    }
    need_cpl0(ctx)?;
    let rip = ctx.core.gpr[1];
    if op.size == 8 && !crate::exec::canonical(rip) {
        return Err(Exc::gp(0));
    }
    let star = ctx.core.msr(msr::IA32_STAR);
    let base = ((star >> 48) & 0xffff) as u16;
    if op.size == 8 {
        ctx.core.seg[seg::CS] = flat(base + 16, true, true, 3);
        ctx.core.rip = rip;
    } else {
        ctx.core.seg[seg::CS] = flat(base, true, false, 3);
        ctx.core.rip = rip & 0xffff_ffff;
    }
    let mut ss = flat(base + 8, false, false, 3);
    ss.selector = (base + 8) | 3;
    ctx.core.seg[seg::SS] = ss;
    let f = ctx.core.gpr[11];
    ctx.core.rflags = ((f & !(fl::RF | fl::VM)) & fl::WRITABLE) | 2;
    ctx.core.lazy.op = crate::core::FlagOp::Done;
    single_step_after(ctx);
    Ok(Ctl::End)
}

/// SYSENTER.
pub fn sysenter(ctx: &mut Ctx, _op: &UOp) -> OpResult {
    let c = &*ctx.core;
    if !c.protected() {
        return Err(Exc::gp(0));
    }
    let cs = c.msr(msr::IA32_SYSENTER_CS) as u16;
    if cs & 0xfffc == 0 {
        return Err(Exc::gp(0));
    }
    let long = c.long_mode();
    let esp = c.msr(msr::IA32_SYSENTER_ESP);
    let eip = c.msr(msr::IA32_SYSENTER_EIP);
    ctx.core.materialize();
    ctx.core.rflags &= !(fl::VM | fl::IF | fl::RF);
    ctx.core.seg[seg::CS] = flat(cs & 0xfffc, true, long, 0);
    ctx.core.seg[seg::SS] = flat((cs & 0xfffc) + 8, false, false, 0);
    ctx.core.gpr[4] = if long { esp } else { esp & 0xffff_ffff };
    ctx.core.rip = if long { eip } else { eip & 0xffff_ffff };
    Ok(Ctl::End)
}

/// SYSEXIT (`size` 8 = to 64-bit).
pub fn sysexit(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let c = &*ctx.core;
    if !c.protected() || c.vm86() {
        return Err(Exc::gp(0));
    }
    need_cpl0(ctx)?;
    let cs = ctx.core.msr(msr::IA32_SYSENTER_CS) as u16 & 0xfffc;
    if cs == 0 {
        return Err(Exc::gp(0));
    }
    let canonical = |v| crate::exec::canonical(v);
    if op.size == 8 && !(canonical(ctx.core.gpr[2]) && canonical(ctx.core.gpr[1])) {
        // SDM SYSEXIT: a non-canonical RDX (RIP) or RCX (RSP) is #GP(0) at the SYSEXIT.
        return Err(Exc::gp(0));
    }
    if op.size == 8 {
        ctx.core.seg[seg::CS] = flat(cs + 32, true, true, 3);
        ctx.core.seg[seg::SS] = flat(cs + 40, false, false, 3);
        ctx.core.gpr[4] = ctx.core.gpr[1];
        ctx.core.rip = ctx.core.gpr[2];
    } else {
        ctx.core.seg[seg::CS] = flat(cs + 16, true, false, 3);
        ctx.core.seg[seg::SS] = flat(cs + 24, false, false, 3);
        ctx.core.gpr[4] = ctx.core.gpr[1] & 0xffff_ffff;
        ctx.core.rip = ctx.core.gpr[2] & 0xffff_ffff;
    }
    Ok(Ctl::End)
}
