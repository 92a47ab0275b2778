//! Monitor calls: privileged and sensitive instructions with their exact architectural
//! semantics (CLI/STI/PUSHF/POPF with IOPL and VIF rules, control and debug registers,
//! descriptor tables, I/O with the TSS permission bitmap, MSRs, CPUID, TSC), segment loads
//! with descriptor checks, far transfers, IRET, and interrupt and exception delivery through
//! the IVT and the IDT (stack switches, IST, error codes).

use crate::core::{crb, dbg, fl, mask};
use crate::exec::Ctx;
use crate::ir::{Ctl, Exc, OpResult, Operand, UOp};
use deja_machine::Segment;
use deja_machine::cpu::{msr, seg};

/// Whether `vector` pushes an error code when raised as an exception.
pub fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21)
}

fn need_cpl0(ctx: &Ctx) -> Result<(), Exc> {
    if ctx.core.cpl() != 0 {
        Err(Exc::gp(0))
    } else {
        Ok(())
    }
}

/// Checks I/O permission for `size` bytes at `port` (IOPL, then the TSS bitmap).
pub fn io_allowed(ctx: &mut Ctx, port: u16, size: u8) -> Result<(), Exc> {
    let c = &*ctx.core;
    if !c.protected() || (!c.vm86() && c.cpl() <= c.iopl()) {
        return Ok(());
    }
    let tr = c.tr;
    if !(tr.type_ == 9 || tr.type_ == 0xb) || tr.limit < 0x67 {
        return Err(Exc::gp(0));
    }
    let base = ctx.read_lin_as(tr.base + 0x66, 2, false)?;
    let off = base + (port as u64 >> 3);
    if off + 1 > tr.limit as u64 {
        return Err(Exc::gp(0));
    }
    let bits = ctx.read_lin_as(tr.base + off, 2, false)?;
    let m = ((1u64 << size) - 1) << (port & 7);
    if bits & m != 0 {
        return Err(Exc::gp(0));
    }
    Ok(())
}

/// Records the I/O breakpoints (DR0-DR3 with R/W 10) that an access of `size` bytes at
/// `port` hits, for a #DB trap after the instruction (DR6 B0-B3). They exist only with
/// CR4.DE set: the SDM leaves R/W 10 undefined without it, and deja then never matches
/// (as for an unused breakpoint). Like data breakpoints, the breakpoint's range is DRn's
/// port aligned down to its length, and any overlapping byte of the access hits.
pub fn io_breakpoints(ctx: &mut Ctx, port: u16, size: u8) {
    let c = &mut *ctx.core;
    if c.cr4 & crb::DE == 0 || c.dr7 & 0xff == 0 {
        return;
    }
    let (lo, len) = (port as u64, size as u64);
    for n in 0..4 {
        let (rw, blen) = c.bp_kind(n);
        if !c.bp_enabled(n) || rw != 2 {
            continue;
        }
        let start = (c.dr[n] & 0xffff) & !(blen - 1);
        if lo < start + blen && start < lo + len {
            c.db_hits |= 1 << n;
        }
    }
}

/// IN (`dst` = AL/AX/EAX; `src` = Imm port or DX).
pub fn op_in(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let port = match op.src {
        Operand::Imm(p) => p as u16,
        _ => ctx.core.reg(2, false, 2) as u16,
    };
    io_allowed(ctx, port, op.size)?;
    io_breakpoints(ctx, port, op.size);
    let mut buf = [0u8; 4];
    ctx.device_access();
    ctx.machine.pio_read(port, &mut buf[..op.size as usize]);
    ctx.core
        .set_reg(0, false, op.size, u32::from_le_bytes(buf) as u64);
    Ok(Ctl::Next)
}

/// OUT (`dst` = Imm port or DX).
pub fn op_out(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let port = match op.dst {
        Operand::Imm(p) => p as u16,
        _ => ctx.core.reg(2, false, 2) as u16,
    };
    io_allowed(ctx, port, op.size)?;
    io_breakpoints(ctx, port, op.size);
    let v = ctx.core.reg(0, false, op.size);
    ctx.device_access();
    ctx.machine
        .pio_write(port, &v.to_le_bytes()[..op.size as usize]);
    Ok(Ctl::Next)
}

/// HLT.
pub fn hlt(ctx: &mut Ctx, op: &UOp) -> OpResult {
    need_cpl0(ctx)?;
    ctx.core.rip = op.next_rip;
    Ok(Ctl::Halt)
}

/// BOUND: #BR when the signed index in `dst` lies outside the signed bounds pair at `src`
/// (legacy and compatibility mode; the encoding is not valid in 64-bit mode).
pub fn bound(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let Operand::Mem(m) = op.src else {
        return Err(Exc::UD);
    };
    if ctx.core.mode64() {
        return Err(Exc::UD);
    }
    let size = op.size;
    let ea = ctx.ea(&m);
    let lin = ctx.linear(m.seg, ea, 2 * size as u64, false)?;
    let lower = crate::core::sext(ctx.read_lin(lin, size)?, size) as i64;
    let upper = crate::core::sext(ctx.read_lin(lin + size as u64, size)?, size) as i64;
    let index = crate::core::sext(ctx.get(&op.dst, size)?, size) as i64;
    if index < lower || index > upper {
        return Err(Exc {
            vector: 5,
            error: None,
        });
    }
    Ok(Ctl::Next)
}

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
    let lo = ctx.read_lin_as(addr, 8, false)?;
    Ok((addr, lo))
}

/// The checks of the code segment a call gate or an interrupt/trap gate leads to: a code
/// segment with DPL <= CPL (#GP), a 64-bit one in long mode (#GP), present (#NP); `tcode`
/// is the error code both faults carry.
fn check_gate_target(t: &Segment, tcode: u32, cpl: u8, long: bool) -> Result<(), Exc> {
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
        ctx.write_lin_as(addr + 5, 1, b as u64, false)?;
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
fn enter_cs(ctx: &mut Ctx, mut s: Segment, cpl: u8, rip: u64) {
    s.selector = (s.selector & !3) | cpl as u16;
    s.dpl = if s.type_ & 4 != 0 { cpl } else { s.dpl };
    s.type_ |= 1;
    ctx.core.seg[seg::CS] = s;
    ctx.core.rip = rip;
}

fn stack_from_tss(ctx: &mut Ctx, dpl: u8) -> Result<(u16, u64), Exc> {
    let tr = ctx.core.tr;
    if tr.type_ & 8 != 0 {
        let off = 4 + dpl as u64 * 8;
        if off + 5 > tr.limit as u64 {
            return Err(Exc::ts((tr.selector & 0xfffc) as u32));
        }
        let sp = ctx.read_lin_as(tr.base + off, 4, false)?;
        let ss = ctx.read_lin_as(tr.base + off + 4, 2, false)? as u16;
        Ok((ss, sp))
    } else {
        let off = 2 + dpl as u64 * 4;
        if off + 3 > tr.limit as u64 {
            return Err(Exc::ts((tr.selector & 0xfffc) as u32));
        }
        let sp = ctx.read_lin_as(tr.base + off, 2, false)?;
        let ss = ctx.read_lin_as(tr.base + off + 2, 2, false)? as u16;
        Ok((ss, sp))
    }
}

/// Loads SS for an inner-privilege stack switch (checks as the SDM's interrupt and call-gate
/// pseudocode: #TS on a bad selector).
fn load_inner_ss(ctx: &mut Ctx, ss: u16, dpl: u8) -> Result<Segment, Exc> {
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
        let hi = ctx.read_lin_as(addr + 8, 8, false)?;
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
            let rsp = ctx.read_lin_as(ctx.core.tr.base + 4 + new as u64 * 8, 8, false)?;
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
fn finish_task_switch(ctx: &mut Ctx, after: Option<Exc>) {
    if let Some(e) = after {
        let rip = ctx.core.rip;
        if !raise(ctx, e, EventKind::Exception, rip) {
            ctx.stats.triple_fault = true;
        }
    }
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
        let link = ctx.read_lin_as(ctx.core.tr.base, 2, false)? as u16;
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
    let (_, d) = read_descriptor(ctx, sel)?;
    let s = parse_descriptor(sel, d);
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

/// How an event reaches the delivery code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A fault or trap raised by an instruction (RIP = the faulting instruction).
    Exception,
    /// INT n / INT3 / INTO (gate DPL checked; RIP = the next instruction).
    Software,
    /// An external interrupt.
    External,
    /// ICEBP (INT1): a #DB trap raised by an instruction, delivered like a hardware event
    /// (no gate DPL check, EXT set in error codes; RIP = the next instruction).
    PrivilegedSoftware,
}

/// Whether an exception vector is fault-class, so that delivery sets RF in the pushed
/// EFLAGS image (traps #DB, #BP, #OF and the aborts #DF, #MC are not).
fn fault_class(vector: u8) -> bool {
    vector < 32 && !matches!(vector, 1 | 3 | 4 | 8 | 18)
}

/// Delivers one event through the IVT or IDT. `rip` is the return address pushed.
pub fn deliver(
    ctx: &mut Ctx,
    vector: u8,
    error: Option<u32>,
    kind: EventKind,
    rip: u64,
) -> Result<(), Exc> {
    let ext = if kind == EventKind::Software { 0 } else { 1 };
    let mut old_flags = ctx.core.flags();
    if kind == EventKind::Exception && fault_class(vector) && ctx.core.protected() {
        old_flags |= fl::RF;
    }
    if !ctx.core.protected() {
        let off = vector as u64 * 4;
        if off + 3 > ctx.core.idtr.limit as u64 {
            return Err(Exc::gp(0));
        }
        let ent = ctx.read_lin_as(ctx.core.idtr.base + off, 4, false)?;
        let cs = ctx.core.seg[seg::CS].selector;
        let sp = ctx.core.gpr[4];
        let pushed = (|| {
            ctx.push(2, old_flags & 0xffff)?;
            ctx.push(2, cs as u64)?;
            ctx.push(2, rip & 0xffff)
        })();
        if let Err(e) = pushed {
            // Nothing of a frame that faulted half-way stays (SP as before the event).
            ctx.core.gpr[4] = sp;
            return Err(e);
        }
        let sel = (ent >> 16) as u16;
        let mut c = ctx.core.seg[seg::CS];
        c.selector = sel;
        c.base = (sel as u64) << 4;
        ctx.core.seg[seg::CS] = c;
        ctx.core.rip = ent & 0xffff;
        ctx.core.rflags &= !(fl::IF | fl::TF | fl::AC | fl::RF);
        return Ok(());
    }
    let long = ctx.core.long_mode();
    let esz: u64 = if long { 16 } else { 8 };
    let gate_err = (vector as u32) * 8 + 2 + ext;
    if vector as u64 * esz + esz - 1 > ctx.core.idtr.limit as u64 {
        return Err(Exc::gp(gate_err));
    }
    let gaddr = ctx.core.idtr.base + vector as u64 * esz;
    let g = ctx.read_lin_as(gaddr, 8, false)?;
    let gtype = ((g >> 40) & 0xf) as u8;
    let gdpl = ((g >> 45) & 3) as u8;
    let present = g & (1 << 47) != 0;
    let valid = if long {
        gtype == 0xe || gtype == 0xf
    } else {
        matches!(gtype, 5 | 6 | 7 | 0xe | 0xf)
    };
    if !valid {
        return Err(Exc::gp(gate_err));
    }
    let cpl = ctx.core.cpl();
    if kind == EventKind::Software && gdpl < cpl {
        return Err(Exc::gp(gate_err));
    }
    if !present {
        return Err(Exc::np(gate_err));
    }
    if gtype == 5 {
        // Task gate: the handler is a task; the error code goes on its stack.
        let tss = (g >> 16) as u16;
        let reason = crate::task::Reason::Event { ext: ext == 1 };
        let after = crate::task::switch(ctx, tss, reason, rip)?;
        let after = match (after, error) {
            (None, Some(e)) => {
                let size = if ctx.core.tr.type_ & 8 != 0 { 4 } else { 2 };
                ctx.push(size, e as u64).err()
            }
            (a, _) => a,
        };
        finish_task_switch(ctx, after);
        return Ok(());
    }
    let tsel = (g >> 16) as u16;
    let mut toff = (g & 0xffff) | ((g >> 32) & 0xffff_0000);
    let mut ist = 0;
    if long {
        let hi = ctx.read_lin_as(gaddr + 8, 8, false)?;
        toff |= (hi & 0xffff_ffff) << 32;
        ist = ((g >> 32) & 7) as u8;
    } else if gtype & 8 == 0 {
        toff &= 0xffff;
    }
    let tcode = (tsel as u32 & 0xfffc) + ext;
    if tsel & 0xfffc == 0 {
        return Err(Exc::gp(ext));
    }
    let (_, td) = read_descriptor(ctx, tsel).map_err(|_| Exc::gp(tcode))?;
    let t = parse_descriptor(tsel, td);
    check_gate_target(&t, tcode, cpl, long)?;
    let conforming = t.type_ & 4 != 0;
    let vm86 = ctx.core.vm86();
    let new_cpl = if conforming { cpl } else { t.dpl };
    if vm86 && new_cpl != 0 {
        return Err(Exc::gp(tcode));
    }
    let gsize: u8 = if long {
        8
    } else if gtype & 8 != 0 {
        4
    } else {
        2
    };
    let saved = (ctx.core.seg, ctx.core.gpr[4], ctx.core.rflags);
    let old_ss = ctx.core.seg[seg::SS].selector;
    let old_sp = ctx.core.gpr[4];
    let old_cs = ctx.core.seg[seg::CS].selector;
    let r = (|| -> Result<(), Exc> {
        if long {
            let switch = new_cpl < cpl || ist != 0;
            let mut rsp = if ist != 0 {
                ctx.read_lin_as(ctx.core.tr.base + 0x24 + (ist as u64 - 1) * 8, 8, false)?
            } else if new_cpl < cpl {
                ctx.read_lin_as(ctx.core.tr.base + 4 + new_cpl as u64 * 8, 8, false)?
            } else {
                old_sp
            };
            if !switch {
                rsp = old_sp;
            }
            if new_cpl < cpl {
                ctx.core.seg[seg::SS] = Segment {
                    selector: new_cpl as u16,
                    unusable: true,
                    dpl: new_cpl,
                    present: true,
                    ..Segment::default()
                };
            }
            enter_cs(ctx, t, new_cpl, toff);
            ctx.core.gpr[4] = rsp & !15;
            ctx.push(8, old_ss as u64)?;
            ctx.push(8, old_sp)?;
            ctx.push(8, old_flags)?;
            ctx.push(8, old_cs as u64)?;
            ctx.push(8, rip)?;
            if let Some(e) = error {
                ctx.push(8, e as u64)?;
            }
            return Ok(());
        }
        if new_cpl < cpl {
            let (nss, nsp) = stack_from_tss(ctx, new_cpl)?;
            let ssd = load_inner_ss(ctx, nss, new_cpl)?;
            enter_cs(ctx, t, new_cpl, toff);
            ctx.core.seg[seg::SS] = ssd;
            // Leaving virtual-8086 mode: the pushes use the new stack's size, not VM's 16 bits
            // (the image pushed keeps VM; a failure below restores the flags).
            ctx.core.rflags &= !fl::VM;
            ctx.core.gpr[4] = if ssd.db {
                nsp & 0xffff_ffff
            } else {
                nsp & 0xffff
            };
            if vm86 {
                for r in [seg::GS, seg::FS, seg::DS, seg::ES] {
                    let v = saved.0[r].selector as u64;
                    ctx.push(gsize, v)?;
                }
            }
            ctx.push(gsize, old_ss as u64)?;
            ctx.push(gsize, old_sp & mask(gsize))?;
        } else {
            enter_cs(ctx, t, new_cpl, toff);
        }
        ctx.push(gsize, old_flags & mask(gsize))?;
        ctx.push(gsize, old_cs as u64)?;
        ctx.push(gsize, rip & mask(gsize))?;
        if let Some(e) = error {
            ctx.push(gsize, e as u64)?;
        }
        if vm86 {
            for r in [seg::GS, seg::FS, seg::DS, seg::ES] {
                ctx.core.seg[r] = Segment {
                    unusable: true,
                    ..Segment::default()
                };
            }
        }
        Ok(())
    })();
    if let Err(e) = r {
        ctx.core.seg = saved.0;
        ctx.core.gpr[4] = saved.1;
        ctx.core.rflags = saved.2;
        return Err(e);
    }
    ctx.core.materialize();
    ctx.core.rflags &= !(fl::TF | fl::NT | fl::RF | fl::VM);
    if gtype & 1 == 0 {
        ctx.core.rflags &= !fl::IF;
    }
    Ok(())
}

fn contributory(v: u8) -> bool {
    matches!(v, 0 | 10 | 11 | 12 | 13)
}

/// Raises an event, escalating to #DF and to shutdown as the hardware does. Returns
/// `false` on a triple fault.
pub fn raise(ctx: &mut Ctx, first: Exc, kind: EventKind, rip: u64) -> bool {
    if kind == EventKind::Exception || kind == EventKind::PrivilegedSoftware {
        *ctx.stats.exceptions.entry(first.vector).or_default() += 1;
    }
    if first.vector == 1 && kind != EventKind::Software {
        // Every #DB clears DR7.GD, so that the handler may use the debug registers.
        ctx.core.dr7 &= !dbg::GD;
    }
    let mut cur = first;
    let mut cur_kind = kind;
    loop {
        let err = if cur_kind == EventKind::Exception && !ctx.core.protected() {
            None
        } else {
            cur.error
        };
        match deliver(ctx, cur.vector, err, cur_kind, rip) {
            Ok(()) => return true,
            Err(second) => {
                *ctx.stats.exceptions.entry(second.vector).or_default() += 1;
                if cur.vector == 8 {
                    return false;
                }
                let df = (contributory(cur.vector) && contributory(second.vector))
                    || (cur.vector == 14 && (contributory(second.vector) || second.vector == 14));
                cur = if df {
                    Exc {
                        vector: 8,
                        error: Some(0),
                    }
                } else {
                    second
                };
                cur_kind = EventKind::Exception;
            }
        }
    }
}

/// INT n / INT3 / INTO / INT1 (`target` = vector; `aux` 1 = INTO, 2 = INT3 or INT1).
///
/// A fault while delivering the event (gate not present or beyond the IDT limit, the gate's
/// DPL, a page fault pushing the frame, ...) means the instruction did not complete: it is
/// returned as this instruction's fault, so it is reported with the INT's own address and
/// the handler can remove its cause and run the INT again (SDM vol. 3 6.5, the INT n
/// pseudocode). It is a fresh exception, never a double fault: the software interrupt is
/// not an exception, whatever its vector.
pub fn int_n(ctx: &mut Ctx, op: &UOp) -> OpResult {
    if op.aux == 1 && !ctx.core.cond(0) {
        return Ok(Ctl::Next);
    }
    let vector = op.target as u8;
    let c = &*ctx.core;
    // Only INT n is IOPL-sensitive in virtual-8086 mode; INT3, INTO and INT1 go to the IDT.
    if c.vm86() && c.iopl() < 3 && op.aux == 0 {
        return Err(Exc::gp(0));
    }
    let kind = if op.aux == 2 && vector == 1 {
        EventKind::PrivilegedSoftware
    } else {
        EventKind::Software
    };
    if kind == EventKind::PrivilegedSoftware {
        *ctx.stats.exceptions.entry(vector).or_default() += 1;
    }
    deliver(ctx, vector, None, kind, op.next_rip)?;
    if kind == EventKind::PrivilegedSoftware {
        // Every #DB clears DR7.GD, so that the handler may use the debug registers.
        ctx.core.dr7 &= !dbg::GD;
    }
    Ok(Ctl::End)
}

/// MOV to or from a control register (`aux` 0 = read into `dst`, 1 = write from `src`;
/// `target` = CR number).
pub fn mov_cr(ctx: &mut Ctx, op: &UOp) -> OpResult {
    need_cpl0(ctx)?;
    let n = op.target;
    if op.aux == 0 {
        let v = match n {
            0 => ctx.core.cr0,
            2 => ctx.core.cr2,
            3 => ctx.core.cr3,
            4 => ctx.core.cr4,
            8 => ctx.machine.cr8().unwrap_or(ctx.core.cr8),
            _ => return Err(Exc::UD),
        };
        ctx.put(&op.dst, op.size, v)?;
        return Ok(Ctl::Next);
    }
    let v = ctx.get(&op.src, op.size)?;
    match n {
        0 => {
            let v = v | crb::ET;
            if v >> 32 != 0 {
                return Err(Exc::gp(0));
            }
            if v & crb::PG != 0 && v & crb::PE == 0 {
                return Err(Exc::gp(0));
            }
            if v & crb::NW != 0 && v & crb::CD == 0 {
                return Err(Exc::gp(0));
            }
            let old = ctx.core.cr0;
            let c = &mut *ctx.core;
            if v & crb::PG != 0 && old & crb::PG == 0 && c.efer & crb::LME != 0 {
                if c.cr4 & crb::PAE == 0 || c.seg[seg::CS].l {
                    return Err(Exc::gp(0));
                }
                c.efer |= crb::LMA;
            }
            if v & crb::PG == 0 && old & crb::PG != 0 && c.long_mode() {
                if c.mode64() {
                    return Err(Exc::gp(0));
                }
                c.efer &= !crb::LMA;
            }
            let old_efer = c.efer;
            c.cr0 = v;
            if (old ^ v) & (crb::PG | crb::WP | crb::PE) != 0 {
                if (old ^ v) & crb::PG != 0 && !pae_pdptes_ok(ctx) {
                    ctx.core.cr0 = old;
                    ctx.core.efer = old_efer;
                    return Err(Exc::gp(0));
                }
                paging_changed(ctx, true);
            }
        }
        2 => ctx.core.cr2 = v,
        3 => {
            let v = if ctx.core.long_mode() {
                v & 0x000f_ffff_ffff_ffff
            } else {
                v & 0xffff_ffff
            };
            let old = ctx.core.cr3;
            ctx.core.cr3 = v;
            if !pae_pdptes_ok(ctx) {
                ctx.core.cr3 = old;
                return Err(Exc::gp(0));
            }
            paging_changed(ctx, false);
        }
        4 => {
            let allowed = crb::VME
                | crb::PVI
                | crb::TSD
                | crb::DE
                | crb::PSE
                | crb::PAE
                | (1 << 6)
                | crb::PGE
                | (1 << 8)
                | crb::OSFXSR
                | crb::OSXMMEXCPT
                | crb::SMEP;
            if v & !allowed != 0 {
                return Err(Exc::gp(0));
            }
            if ctx.core.long_mode() && v & crb::PAE == 0 {
                return Err(Exc::gp(0));
            }
            let old = ctx.core.cr4;
            ctx.core.cr4 = v;
            if (old ^ v) & (crb::PAE | crb::PGE | crb::PSE | crb::SMEP) != 0 {
                if !pae_pdptes_ok(ctx) {
                    ctx.core.cr4 = old;
                    return Err(Exc::gp(0));
                }
                paging_changed(ctx, true);
            }
        }
        8 => {
            if v & !0xf != 0 {
                return Err(Exc::gp(0));
            }
            // CR8 is the local APIC's TPR (bits 7:4); the core keeps a copy for its state.
            ctx.core.cr8 = v;
            ctx.machine.set_cr8(v);
        }
        _ => return Err(Exc::UD),
    }
    ctx.core.rip = op.next_rip;
    Ok(Ctl::End)
}

/// With PAE paging active (outside long mode), loads the PDPTE registers as MOV to
/// CR0/CR3/CR4 does; `false` means #GP(0).
pub(crate) fn pae_pdptes_ok(ctx: &mut Ctx) -> bool {
    let c = &*ctx.core;
    if c.cr0 & crb::PG == 0 || c.cr4 & crb::PAE == 0 || c.long_mode() {
        return true;
    }
    let regs = crate::paging::Regs {
        cr0: c.cr0,
        cr3: c.cr3,
        cr4: c.cr4,
        efer: c.efer,
    };
    ctx.mem.mmu.load_pdptes(&ctx.machine.mem, &regs)
}

/// Flushes every cached translation after a paging change.
pub fn paging_changed(ctx: &mut Ctx, include_global: bool) {
    ctx.mem.mmu.flush(include_global);
    ctx.mem.flush_fast();
    ctx.cache.flush_lookup();
}

/// MOV to or from a debug register (`aux` 0 = read, 1 = write; `target` = DR number).
pub fn mov_dr(ctx: &mut Ctx, op: &UOp) -> OpResult {
    need_cpl0(ctx)?;
    let mut n = op.target;
    if n == 4 || n == 5 {
        if ctx.core.cr4 & crb::DE != 0 {
            return Err(Exc::UD);
        }
        n += 2;
    }
    if ctx.core.dr7 & dbg::GD != 0 {
        // General detect: a #DB fault before the access, with DR6.BD; delivery clears GD.
        ctx.core.dr6 |= dbg::BD;
        return Err(Exc {
            vector: 1,
            error: None,
        });
    }
    if op.aux == 0 {
        let v = match n {
            0..=3 => ctx.core.dr[n as usize],
            6 => ctx.core.dr6,
            _ => ctx.core.dr7,
        };
        ctx.put(&op.dst, op.size, v)?;
    } else {
        let v = ctx.get(&op.src, op.size)?;
        if (n == 6 || n == 7) && v >> 32 != 0 {
            return Err(Exc::gp(0));
        }
        match n {
            0..=3 => ctx.core.dr[n as usize] = v,
            6 => ctx.core.dr6 = (v & 0xe00f) | 0xffff_0ff0,
            _ => ctx.core.dr7 = (v & 0xffff_2bff) | 0x400,
        }
        // Breakpoints may have been armed or disarmed: the run loop re-decides how to run.
        let watching = ctx.core.data_bps_armed();
        if watching && !ctx.mem.watching {
            ctx.mem.flush_fast();
        }
        ctx.mem.watching = watching;
    }
    ctx.core.rip = op.next_rip;
    Ok(Ctl::End)
}

/// Delivers a #DB: B0-B3 of DR6 are replaced by `bits`' (BD, BS and BT accumulate, as the
/// other DR6 bits stay until software clears them), DR7.GD is cleared so the handler can use
/// the debug registers. `rip` is the instruction (faults) or the next one (traps).
pub fn raise_debug(ctx: &mut Ctx, bits: u64, rip: u64) -> bool {
    let c = &mut *ctx.core;
    c.dr6 = (c.dr6 & !dbg::B_ALL) | bits | 0xffff_0ff0;
    raise(
        ctx,
        Exc {
            vector: 1,
            error: None,
        },
        EventKind::Exception,
        rip,
    )
}

/// LGDT/LIDT (`aux` 0 gdt, 1 idt) and SGDT/SIDT (`aux` 2, 3).
pub fn desc_table(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let Operand::Mem(m) = op.dst else {
        return Err(Exc::UD);
    };
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
        let hi = ctx.read_lin_as(addr + 8, 8, false)?;
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
        ctx.write_lin_as(addr + 5, 1, b as u64, false)?;
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
    let d = ctx.read_lin_as(base.wrapping_add(off), 8, false)?;
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

/// INVLPG.
pub fn invlpg(ctx: &mut Ctx, op: &UOp) -> OpResult {
    need_cpl0(ctx)?;
    let Operand::Mem(m) = op.dst else {
        return Err(Exc::UD);
    };
    let off = ctx.ea(&m);
    let lin = ctx.linear(m.seg, off, 1, false).unwrap_or(off);
    ctx.mem.mmu.invlpg(lin);
    ctx.mem.flush_fast();
    ctx.cache.flush_lookup();
    ctx.core.rip = op.next_rip;
    Ok(Ctl::End)
}

/// CPUID from the machine's table (the same one kvm presents).
pub fn cpuid(ctx: &mut Ctx, _op: &UOp) -> OpResult {
    let eax = ctx.core.gpr[0] as u32;
    let ecx = ctx.core.gpr[1] as u32;
    let r = ctx.machine.cpuid(eax, ecx);
    for (i, reg) in [0usize, 3, 1, 2].iter().enumerate() {
        ctx.core.gpr[*reg] = r[i] as u64;
    }
    Ok(Ctl::Next)
}

fn tsc(ctx: &mut Ctx) -> u64 {
    ctx.machine.set_icount(ctx.icount);
    let pos = ctx.machine.position();
    let t = ctx.machine.host.time_ns(pos);
    t.wrapping_add(ctx.core.msrs.get(&msr::IA32_TSC).copied().unwrap_or(0))
}

/// RDTSC (`aux` 0) / RDTSCP (`aux` 1).
pub fn rdtsc(ctx: &mut Ctx, op: &UOp) -> OpResult {
    if ctx.core.cr4 & crb::TSD != 0 && ctx.core.cpl() != 0 {
        return Err(Exc::gp(0));
    }
    let t = tsc(ctx);
    ctx.core.gpr[0] = t & 0xffff_ffff;
    ctx.core.gpr[2] = t >> 32;
    if op.aux == 1 {
        ctx.core.gpr[1] = ctx.core.msr(msr::IA32_TSC_AUX) & 0xffff_ffff;
    }
    Ok(Ctl::Next)
}

/// RDRAND/RDSEED: entropy through the host.
pub fn rdrand(ctx: &mut Ctx, op: &UOp) -> OpResult {
    ctx.machine.set_icount(ctx.icount);
    let pos = ctx.machine.position();
    let v = ctx.machine.host.entropy(pos);
    ctx.put(&op.dst, op.size, v & mask(op.size))?;
    ctx.core.set_arith(fl::CF);
    Ok(Ctl::Next)
}

const KNOWN_MSRS: &[u32] = &[
    msr::IA32_TSC,
    msr::IA32_APIC_BASE,
    msr::IA32_SYSENTER_CS,
    msr::IA32_SYSENTER_ESP,
    msr::IA32_SYSENTER_EIP,
    msr::IA32_PAT,
    msr::IA32_MISC_ENABLE,
    msr::IA32_EFER,
    msr::IA32_STAR,
    msr::IA32_LSTAR,
    msr::IA32_CSTAR,
    msr::IA32_FMASK,
    msr::IA32_FS_BASE,
    msr::IA32_GS_BASE,
    msr::IA32_KERNEL_GS_BASE,
    msr::IA32_TSC_AUX,
];

/// RDPMC: #GP(0) whatever ECX says. deja's CPU has no performance-monitoring counters
/// (CPUID leaf 0xA, which would count them, is beyond its maximum basic leaf), so every
/// counter index is invalid (SDM RDPMC), as under KVM without a vPMU; outside ring 0 with
/// CR4.PCE clear it would be #GP(0) anyway.
pub fn rdpmc(_ctx: &mut Ctx, _op: &UOp) -> OpResult {
    Err(Exc::gp(0))
}

/// RDMSR (`aux` 0) / WRMSR (`aux` 1).
pub fn msr_op(ctx: &mut Ctx, op: &UOp) -> OpResult {
    need_cpl0(ctx)?;
    let idx = ctx.core.gpr[1] as u32;
    if ctx.machine.handles_msr(idx) {
        return machine_msr(ctx, op, idx);
    }
    if deja_machine::cpu::mca::is_mca_msr(idx) {
        return mca_msr(ctx, op, idx);
    }
    if !KNOWN_MSRS.contains(&idx) {
        ctx.count(&format!("bt.unknown_msr.{idx:#x}"));
        return Err(Exc::gp(0));
    }
    if op.aux == 0 {
        let v = if idx == msr::IA32_TSC {
            tsc(ctx)
        } else {
            ctx.core.msr(idx)
        };
        ctx.core.gpr[0] = v & 0xffff_ffff;
        ctx.core.gpr[2] = v >> 32;
        return Ok(Ctl::Next);
    }
    let v = (ctx.core.gpr[0] & 0xffff_ffff) | (ctx.core.gpr[2] << 32);
    match idx {
        msr::IA32_EFER => {
            let allowed = crb::SCE | crb::LME | crb::LMA | crb::NXE;
            if v & !allowed != 0 {
                return Err(Exc::gp(0));
            }
            let c = &mut *ctx.core;
            if c.cr0 & crb::PG != 0 && (v ^ c.efer) & crb::LME != 0 {
                return Err(Exc::gp(0));
            }
            let old = c.efer;
            c.efer = (v & !crb::LMA) | (c.efer & crb::LMA);
            if (old ^ c.efer) & crb::NXE != 0 {
                paging_changed(ctx, true);
            }
        }
        msr::IA32_FS_BASE
        | msr::IA32_GS_BASE
        | msr::IA32_KERNEL_GS_BASE
        | msr::IA32_LSTAR
        | msr::IA32_CSTAR
        | msr::IA32_SYSENTER_ESP
        | msr::IA32_SYSENTER_EIP => {
            if !crate::exec::canonical(v) {
                return Err(Exc::gp(0));
            }
            match idx {
                msr::IA32_FS_BASE => ctx.core.seg[seg::FS].base = v,
                msr::IA32_GS_BASE => ctx.core.seg[seg::GS].base = v,
                _ => {
                    ctx.core.msrs.insert(idx, v);
                }
            }
        }
        msr::IA32_TSC => {
            let now = tsc(ctx).wrapping_sub(ctx.core.msr(msr::IA32_TSC));
            ctx.core.msrs.insert(idx, v.wrapping_sub(now));
        }
        _ => {
            ctx.core.msrs.insert(idx, v);
        }
    }
    ctx.core.rip = op.next_rip;
    Ok(Ctl::End)
}

/// RDMSR/WRMSR of a machine-check MSR ([`deja_machine::cpu::mca`]): the state lives in
/// the CPU state's MSRs, absent ones read as their reset values.
fn mca_msr(ctx: &mut Ctx, op: &UOp, idx: u32) -> OpResult {
    use deja_machine::cpu::mca;
    if op.aux == 0 {
        let v = match ctx.core.msrs.get(&idx) {
            Some(&v) if idx != msr::IA32_MCG_CAP => v,
            _ => mca::reset_value(idx),
        };
        ctx.core.gpr[0] = v & 0xffff_ffff;
        ctx.core.gpr[2] = v >> 32;
        return Ok(Ctl::Next);
    }
    let v = (ctx.core.gpr[0] & 0xffff_ffff) | (ctx.core.gpr[2] << 32);
    if !mca::write_allowed(idx, v) {
        return Err(Exc::gp(0));
    }
    ctx.core.msrs.insert(idx, v);
    Ok(Ctl::Next)
}

/// RDMSR/WRMSR of an MSR the machine owns (the local APIC's IA32_APIC_BASE,
/// IA32_TSC_DEADLINE and x2APIC registers): a device access, like kvm's userspace MSR exit.
/// The TSC the guest compares deadlines with is bt's RDTSC: guest nanoseconds (1 GHz) plus
/// the IA32_TSC adjustment.
fn machine_msr(ctx: &mut Ctx, op: &UOp, idx: u32) -> OpResult {
    ctx.machine.set_icount(ctx.icount);
    ctx.device = true;
    if op.aux == 0 {
        let v = ctx.machine.rdmsr(idx).map_err(|_| Exc::gp(0))?;
        ctx.core.gpr[0] = v & 0xffff_ffff;
        ctx.core.gpr[2] = v >> 32;
        return Ok(Ctl::Next);
    }
    let v = (ctx.core.gpr[0] & 0xffff_ffff) | (ctx.core.gpr[2] << 32);
    let tsc = deja_machine::devices::lapic::GuestTsc {
        offset: ctx.core.msr(msr::IA32_TSC),
        ..deja_machine::devices::lapic::GuestTsc::BT
    };
    ctx.machine.wrmsr(idx, v, tsc).map_err(|_| Exc::gp(0))?;
    if idx == msr::IA32_APIC_BASE {
        // IA32_APIC_BASE lives in the local APIC's state; the CPU state keeps a copy of what
        // the guest wrote, as kvm's does (it hands the value to KVM, whose CPUID.01H:EDX.APIC
        // follows it).
        ctx.core.msrs.insert(idx, v);
    }
    Ok(Ctl::Next)
}

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

/// CLTS.
pub fn clts(ctx: &mut Ctx, _op: &UOp) -> OpResult {
    need_cpl0(ctx)?;
    ctx.core.cr0 &= !crb::TS;
    Ok(Ctl::Next)
}

/// LMSW (`aux` 0) / SMSW (`aux` 1).
pub fn msw(ctx: &mut Ctx, op: &UOp) -> OpResult {
    if op.aux == 1 {
        let size = if op.dst.is_mem() { 2 } else { op.size };
        let v = ctx.core.cr0;
        ctx.put(&op.dst, size, v)?;
        return Ok(Ctl::Next);
    }
    need_cpl0(ctx)?;
    let v = ctx.get(&op.dst, 2)?;
    // LMSW can set PE but never clear it.
    let old = ctx.core.cr0;
    let new = (old & !0xe) | (v & 0xe) | ((old | v) & 1);
    ctx.core.cr0 = new;
    if (old ^ new) & crb::PE != 0 {
        paging_changed(ctx, true);
    }
    ctx.core.rip = op.next_rip;
    Ok(Ctl::End)
}

/// Privileged no-ops (WBINVD, INVD): CPL 0 only.
pub fn priv_nop(ctx: &mut Ctx, _op: &UOp) -> OpResult {
    need_cpl0(ctx)?;
    Ok(Ctl::Next)
}

/// An instruction deja does not implement: #UD, counted by mnemonic.
pub fn unimplemented(ctx: &mut Ctx, op: &UOp) -> OpResult {
    let name = format!("bt.unimplemented.{:?}", op.code.mnemonic()).to_lowercase();
    ctx.count(&name);
    Err(Exc::UD)
}

/// An undefined encoding (UD2, invalid opcodes).
pub fn ud(_ctx: &mut Ctx, _op: &UOp) -> OpResult {
    Err(Exc::UD)
}
