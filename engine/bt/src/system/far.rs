//! Far transfers: far JMP/CALL (call gates, task gates and TSS targets), far RET and
//! IRET, with their privilege changes and stack switches.

use super::*;

fn code_checks(ctx: &Ctx, s: &Segment, sel: u16) -> Result<(), Exc> {
    let cpl = ctx.core.cpl();
    let code = (sel & 0xfffc) as u32;
    if !s.s || s.type_ & 8 == 0 {
        return Err(Exc::gp(code));
    }
    let conforming = s.type_ & 4 != 0;
    if conforming {
        if s.dpl > cpl {
            return Err(Exc::gp(code));
        }
    } else if (sel & 3) as u8 > cpl || s.dpl != cpl {
        return Err(Exc::gp(code));
    }
    if !s.present {
        return Err(Exc::np(code));
    }
    Ok(())
}

/// Sets CS (already checked) and the new RIP, then ends the block.
pub(super) fn enter_cs(ctx: &mut Ctx, mut s: Segment, cpl: u8, rip: u64) {
    s.selector = (s.selector & !3) | cpl as u16;
    s.dpl = if s.type_ & 4 != 0 { cpl } else { s.dpl };
    s.type_ |= 1;
    ctx.core.seg[seg::CS] = s;
    ctx.core.rip = rip;
}

pub(super) fn stack_from_tss(ctx: &mut Ctx, dpl: u8) -> Result<(u16, u64), Exc> {
    let tr = ctx.core.tr;
    if tr.type_ & 8 != 0 {
        let off = 4 + dpl as u64 * 8;
        if off + 5 > tr.limit as u64 {
            return Err(Exc::ts((tr.selector & 0xfffc) as u32));
        }
        let sp = ctx.read_sys(tr.base + off, 4)?;
        let ss = ctx.read_sys(tr.base + off + 4, 2)? as u16;
        Ok((ss, sp))
    } else {
        let off = 2 + dpl as u64 * 4;
        if off + 3 > tr.limit as u64 {
            return Err(Exc::ts((tr.selector & 0xfffc) as u32));
        }
        let sp = ctx.read_sys(tr.base + off, 2)?;
        let ss = ctx.read_sys(tr.base + off + 2, 2)? as u16;
        Ok((ss, sp))
    }
}

/// Loads SS for an inner-privilege stack switch (checks as the SDM's interrupt and call-gate
/// pseudocode: #TS on a bad selector).
pub(super) fn load_inner_ss(ctx: &mut Ctx, ss: u16, dpl: u8) -> Result<Segment, Exc> {
    let code = (ss & 0xfffc) as u32;
    if ss & 0xfffc == 0 {
        return Err(Exc::ts(code));
    }
    let (addr, d) = read_descriptor(ctx, ss).map_err(|_| Exc::ts(code))?;
    let s = parse_descriptor(ss, d);
    if (ss & 3) as u8 != dpl || s.dpl != dpl || !s.s || s.type_ & 8 != 0 || s.type_ & 2 == 0 {
        return Err(Exc::ts(code));
    }
    if !s.present {
        return Err(Exc::ss(code));
    }
    set_accessed(ctx, addr, d)?;
    let mut s = s;
    s.type_ |= 1;
    Ok(s)
}

/// Far JMP/CALL through a pointer: `aux` 0 = jmp, 1 = call; `target` = offset, `src2` =
/// Imm(selector) for direct forms; `src` = memory for indirect forms.
pub fn far_transfer(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let (sel, off) = match op.src {
        Operand::Mem(m) => {
            let ea = ctx.ea(&m);
            let lin = ctx.linear(m.seg, ea, op.size as u64 + 2, false)?;
            let off = ctx.read_lin(lin, op.size)?;
            let sel = ctx.read_lin(lin + op.size as u64, 2)? as u16;
            (sel, off)
        }
        _ => match op.src2 {
            Operand::Imm(s) => (s as u16, op.target),
            _ => return Err(Exc::UD),
        },
    };
    let call = op.aux == 1;
    let old_cs = ctx.core.seg[seg::CS].selector;
    if !ctx.core.protected() || ctx.core.vm86() {
        if call {
            ctx.push(op.size, old_cs as u64)?;
            ctx.push(op.size, op.next_rip)?;
        }
        let mut cs = ctx.core.seg[seg::CS];
        cs.selector = sel;
        cs.base = (sel as u64) << 4;
        ctx.core.seg[seg::CS] = cs;
        ctx.core.rip = off & mask(op.size);
        return Ok(Ctl::End);
    }
    let cpl = ctx.core.cpl();
    if sel & 0xfffc == 0 {
        return Err(Exc::gp(0));
    }
    let (addr, d) = read_descriptor(ctx, sel)?;
    let s = parse_descriptor(sel, d);
    if s.s {
        code_checks(ctx, &s, sel)?;
        let mode64 = ctx.core.long_mode() && s.l;
        let rip = if mode64 { off } else { off & mask(op.size) };
        // A target outside the segment, or non-canonical in 64-bit mode, faults at the far
        // JMP/CALL itself, before anything changes (SDM JMP, CALL: #GP(0)).
        if (!mode64 && rip > s.limit as u64) || (mode64 && !crate::exec::canonical(rip)) {
            return Err(Exc::gp(0));
        }
        // Loading CS sets the descriptor's accessed bit in the GDT/LDT, as hardware does.
        set_accessed(ctx, addr, d)?;
        if call {
            ctx.push(op.size, old_cs as u64)?;
            ctx.push(op.size, op.next_rip)?;
        }
        enter_cs(ctx, s, cpl, rip);
        return Ok(Ctl::End);
    }
    // System descriptor: a call gate, or (outside long mode) a TSS or a task gate.
    let code = (sel & 0xfffc) as u32;
    let gate_type = s.type_;
    let long = ctx.core.long_mode();
    let task = !long && matches!(gate_type, 1 | 3 | 5 | 9 | 0xb);
    if !(task || gate_type == 0xc || (!long && gate_type == 4)) {
        return Err(Exc::gp(code));
    }
    if s.dpl < cpl || s.dpl < (sel & 3) as u8 {
        return Err(Exc::gp(code));
    }
    if task && gate_type != 5 && s.type_ & 2 != 0 {
        // A busy TSS cannot be entered by JMP or CALL.
        return Err(Exc::gp(code));
    }
    if !s.present {
        return Err(Exc::np(code));
    }
    if task {
        let tss = if gate_type == 5 {
            (d >> 16) as u16
        } else {
            sel
        };
        let reason = if call {
            crate::task::Reason::Call
        } else {
            crate::task::Reason::Jmp
        };
        let after = crate::task::switch(ctx, tss, reason, op.next_rip)?;
        finish_task_switch(ctx, after);
        return Ok(Ctl::End);
    }
    let target_sel = (d >> 16) as u16;
    let mut target_off = (d & 0xffff) | ((d >> 32) & 0xffff_0000);
    let params = ((d >> 32) & 0x1f) as u32;
    if long {
        let (addr, _) = read_descriptor(ctx, sel)?;
        let hi = ctx.read_sys(addr + 8, 8)?;
        target_off |= (hi & 0xffff_ffff) << 32;
    } else if gate_type == 4 {
        target_off &= 0xffff;
    }
    let gsize: u8 = if long {
        8
    } else if gate_type == 0xc {
        4
    } else {
        2
    };
    if target_sel & 0xfffc == 0 {
        return Err(Exc::gp(0));
    }
    let (_, td) = read_descriptor(ctx, target_sel)?;
    let t = parse_descriptor(target_sel, td);
    let tcode = (target_sel & 0xfffc) as u32;
    check_gate_target(&t, tcode, cpl, long)?;
    if long && !crate::exec::canonical(target_off) {
        // A 64-bit call gate's target offset is checked before any stack switch or push.
        return Err(Exc::gp(0));
    }
    let conforming = t.type_ & 4 != 0;
    if !call {
        if !conforming && t.dpl != cpl {
            return Err(Exc::gp(tcode));
        }
        enter_cs(ctx, t, cpl, target_off);
        return Ok(Ctl::End);
    }
    if !conforming && t.dpl < cpl {
        // Call to an inner privilege level: switch stacks.
        let new = t.dpl;
        let (old_ss, old_sp) = (ctx.core.seg[seg::SS].selector, ctx.core.gpr[4]);
        let old_ss_size = ctx.core.stack_size();
        let mut args = Vec::new();
        for i in 0..params as u64 {
            args.push(ctx.peek(gsize, i * gsize as u64)?);
        }
        let saved = (
            ctx.core.seg[seg::SS],
            ctx.core.seg[seg::CS],
            ctx.core.gpr[4],
        );
        if long {
            let rsp = ctx.read_sys(ctx.core.tr.base + 4 + new as u64 * 8, 8)?;
            let mut ss = Segment {
                selector: new as u16,
                unusable: true,
                dpl: new,
                ..Segment::default()
            };
            ss.present = true;
            ctx.core.seg[seg::SS] = ss;
            enter_cs(ctx, t, new, target_off);
            ctx.core.gpr[4] = rsp;
        } else {
            let (nss, nsp) = stack_from_tss(ctx, new)?;
            let ssd = load_inner_ss(ctx, nss, new)?;
            enter_cs(ctx, t, new, target_off);
            ctx.core.seg[seg::SS] = ssd;
            ctx.core
                .set_reg(4, false, ctx.core.stack_size().max(4), nsp);
            if !ssd.db {
                ctx.core.gpr[4] &= 0xffff;
            }
        }
        let r = (|| {
            ctx.push(gsize, old_ss as u64)?;
            ctx.push(gsize, old_sp & mask(old_ss_size.max(gsize)))?;
            for a in args.iter().rev() {
                ctx.push(gsize, *a)?;
            }
            ctx.push(gsize, old_cs as u64)?;
            ctx.push(gsize, op.next_rip)
        })();
        if let Err(e) = r {
            ctx.core.seg[seg::SS] = saved.0;
            ctx.core.seg[seg::CS] = saved.1;
            ctx.core.gpr[4] = saved.2;
            return Err(e);
        }
        return Ok(Ctl::End);
    }
    ctx.push(gsize, old_cs as u64)?;
    ctx.push(gsize, op.next_rip)?;
    enter_cs(ctx, t, cpl, target_off);
    Ok(Ctl::End)
}

/// Nulls data segment registers the new (outer) privilege level may not use.
fn null_outer_segments(ctx: &mut Ctx, cpl: u8) {
    for r in [seg::ES, seg::DS, seg::FS, seg::GS] {
        let s = ctx.core.seg[r];
        let conforming_code = s.type_ & 0xc == 0xc;
        if !s.unusable && !conforming_code && s.dpl < cpl {
            ctx.core.seg[r] = Segment {
                selector: 0,
                unusable: true,
                ..Segment::default()
            };
        }
    }
}

/// Raises a fault the task switch hit after its commit, in the new task's context (at its
/// EIP); a triple fault is reported to the run loop.
pub(super) fn finish_task_switch(ctx: &mut Ctx, after: Option<Exc>) {
    if let Some(e) = after {
        let rip = ctx.core.rip;
        if !raise(ctx, e, EventKind::Exception, rip) {
            ctx.stats.triple_fault = true;
        }
    }
}

/// The code segment a RET far or IRET returns to (selector `sel`, RPL `rpl`): a code
/// segment, conforming with DPL <= RPL or non-conforming with DPL = RPL, present (#GP or
/// #NP with the selector otherwise).
fn return_code_segment(ctx: &mut Ctx, sel: u16, rpl: u8) -> Result<Segment, Exc> {
    let (_, d) = read_descriptor(ctx, sel)?;
    let s = parse_descriptor(sel, d);
    let code = (sel & 0xfffc) as u32;
    if !s.s || s.type_ & 8 == 0 {
        return Err(Exc::gp(code));
    }
    let conforming = s.type_ & 4 != 0;
    if (conforming && s.dpl > rpl) || (!conforming && s.dpl != rpl) {
        return Err(Exc::gp(code));
    }
    if !s.present {
        return Err(Exc::np(code));
    }
    Ok(s)
}

/// Far RET (`target` = bytes to release).
pub fn far_ret(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let size = op.size;
    let rip = ctx.peek(size, 0)?;
    let sel = ctx.peek(size, size as u64)? as u16;
    if !ctx.core.protected() || ctx.core.vm86() {
        let mut cs = ctx.core.seg[seg::CS];
        cs.selector = sel;
        cs.base = (sel as u64) << 4;
        ctx.core.seg[seg::CS] = cs;
        let ss = ctx.core.stack_size();
        let sp = ctx.core.gpr[4].wrapping_add(2 * size as u64 + op.target);
        ctx.core.set_reg(4, false, ss, sp);
        ctx.core.rip = rip & mask(size);
        return Ok(Ctl::End);
    }
    let cpl = ctx.core.cpl();
    let rpl = (sel & 3) as u8;
    if sel & 0xfffc == 0 || rpl < cpl {
        return Err(Exc::gp((sel & 0xfffc) as u32));
    }
    let s = return_code_segment(ctx, sel, rpl)?;
    if ctx.core.long_mode() && s.l && !crate::exec::canonical(rip) {
        // RET far to a non-canonical RIP faults at the RET, with nothing popped.
        return Err(Exc::gp(0));
    }
    if rpl == cpl {
        let ss = ctx.core.stack_size();
        let sp = ctx.core.gpr[4].wrapping_add(2 * size as u64 + op.target);
        enter_cs(ctx, s, cpl, rip);
        ctx.core.set_reg(4, false, ss, sp);
        return Ok(Ctl::End);
    }
    // Return to an outer privilege level.
    let base = 2 * size as u64 + op.target;
    let nsp = ctx.peek(size, base)?;
    let nss = ctx.peek(size, base + size as u64)? as u16;
    let saved = ctx.core.seg;
    enter_cs(ctx, s, rpl, rip);
    if let Err(e) = load_seg(ctx, seg::SS, nss) {
        ctx.core.seg = saved;
        return Err(e);
    }
    let ss = ctx.core.stack_size();
    ctx.core.set_reg(
        4,
        false,
        ss.max(if size == 8 { 8 } else { 2 }),
        nsp.wrapping_add(op.target),
    );
    null_outer_segments(ctx, rpl);
    Ok(Ctl::End)
}

/// IRET/IRETD/IRETQ.
pub fn iret(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let size = op.size;
    ctx.core.pending.nmi_blocked = false;
    let c = &*ctx.core;
    if !c.protected() || c.vm86() {
        if c.vm86() && c.iopl() < 3 {
            return Err(Exc::gp(0));
        }
        let rip = ctx.peek(size, 0)?;
        let sel = ctx.peek(size, size as u64)? as u16;
        let f = ctx.peek(size, 2 * size as u64)?;
        if size == 4 && rip > 0xffff && ctx.core.vm86() {
            return Err(Exc::gp(0));
        }
        let old = ctx.core.flags();
        let mut changeable = (fl::WRITABLE & !(fl::VM | fl::VIF | fl::VIP)) & mask(size);
        if ctx.core.vm86() {
            changeable &= !fl::IOPL;
        }
        let nf = (old & !changeable) | (f & changeable);
        let mut cs = ctx.core.seg[seg::CS];
        cs.selector = sel;
        cs.base = (sel as u64) << 4;
        ctx.core.seg[seg::CS] = cs;
        let ss = ctx.core.stack_size();
        let sp = ctx.core.gpr[4].wrapping_add(3 * size as u64);
        ctx.core.set_reg(4, false, ss, sp);
        ctx.core.rflags = (nf & fl::WRITABLE) | 2;
        ctx.core.lazy.op = crate::core::FlagOp::Done;
        ctx.core.rip = rip & mask(size);
        return Ok(Ctl::End);
    }
    if ctx.core.rflags & fl::NT != 0 {
        if ctx.core.long_mode() {
            // IA-32e mode has no task switches: IRET with NT faults.
            return Err(Exc::gp(0));
        }
        // Return to the task named by the back link of the current TSS.
        let link = ctx.read_sys(ctx.core.tr.base, 2)? as u16;
        let after = crate::task::switch(ctx, link, crate::task::Reason::Iret, op.next_rip)?;
        finish_task_switch(ctx, after);
        return Ok(Ctl::End);
    }
    let cpl = ctx.core.cpl();
    let rip = ctx.peek(size, 0)?;
    let sel = ctx.peek(size, size as u64)? as u16;
    let f = ctx.peek(size, 2 * size as u64)?;
    if f & fl::VM != 0 && cpl == 0 && size == 4 && !ctx.core.long_mode() {
        // Return to virtual-8086 mode.
        let mut vals = [0u64; 6];
        for (i, v) in vals.iter_mut().enumerate() {
            *v = ctx.peek(4, 12 + 4 * i as u64)?;
        }
        ctx.core.rflags = (f & fl::WRITABLE) | 2;
        ctx.core.lazy.op = crate::core::FlagOp::Done;
        let regs = [seg::SS, seg::ES, seg::DS, seg::FS, seg::GS];
        for (i, r) in regs.iter().enumerate() {
            let mut s = Segment::real_mode(vals[i + 1] as u16, false);
            s.dpl = 3;
            ctx.core.seg[*r] = s;
        }
        let mut cs = Segment::real_mode(sel, true);
        cs.dpl = 3;
        ctx.core.seg[seg::CS] = cs;
        ctx.core.gpr[4] = vals[0] & 0xffff_ffff;
        ctx.core.rip = rip & 0xffff;
        return Ok(Ctl::End);
    }
    let rpl = (sel & 3) as u8;
    let code = (sel & 0xfffc) as u32;
    if sel & 0xfffc == 0 {
        return Err(Exc::gp(0));
    }
    if rpl < cpl {
        return Err(Exc::gp(code));
    }
    let s = return_code_segment(ctx, sel, rpl)?;
    let to64 = ctx.core.long_mode() && s.l;
    if (!to64 && rip > s.limit as u64) || (to64 && !crate::exec::canonical(rip)) {
        // Faults at the IRET, before any state changes (SDM IRET: #GP(0)).
        return Err(Exc::gp(0));
    }
    let pop_stack = rpl != cpl || ctx.core.mode64();
    let (nsp, nss) = if pop_stack {
        (
            ctx.peek(size, 3 * size as u64)?,
            ctx.peek(size, 4 * size as u64)? as u16,
        )
    } else {
        (0, 0)
    };
    // Flags.
    let old = ctx.core.flags();
    let iopl = ctx.core.iopl();
    let mut changeable = fl::ARITH | fl::TF | fl::DF | fl::NT | fl::AC | fl::ID | fl::RF;
    if cpl <= iopl {
        changeable |= fl::IF;
    }
    if cpl == 0 {
        changeable |= fl::IOPL | fl::VIF | fl::VIP;
    }
    changeable &= mask(size);
    let nf = (old & !changeable) | (f & changeable);
    let saved = (ctx.core.seg, ctx.core.gpr[4]);
    enter_cs(ctx, s, rpl, if to64 { rip } else { rip & 0xffff_ffff });
    if pop_stack {
        let r = if nss & 0xfffc == 0 && ctx.core.long_mode() && to64 && rpl != 3 {
            ctx.core.seg[seg::SS] = Segment {
                selector: nss,
                unusable: true,
                dpl: rpl,
                ..Segment::default()
            };
            Ok(())
        } else {
            load_seg(ctx, seg::SS, nss)
        };
        if let Err(e) = r {
            ctx.core.seg = saved.0;
            ctx.core.gpr[4] = saved.1;
            return Err(e);
        }
        let ss = ctx.core.stack_size();
        ctx.core.set_reg(4, false, ss.max(size), nsp);
        if rpl != cpl {
            null_outer_segments(ctx, rpl);
        }
    } else {
        let ss = ctx.core.stack_size();
        let sp = ctx.core.gpr[4].wrapping_add(3 * size as u64);
        ctx.core.set_reg(4, false, ss, sp);
    }
    ctx.core.rflags = (nf & fl::WRITABLE) | 2;
    ctx.core.lazy.op = crate::core::FlagOp::Done;
    Ok(Ctl::End)
}
