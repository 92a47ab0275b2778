//! Hardware task switches (SDM vol. 3, chapter 8): far JMP/CALL to a TSS descriptor or a
//! task gate, interrupts and exceptions through a task gate, and IRET with EFLAGS.NT, for
//! 32-bit and 16-bit TSSs.
//!
//! The switch runs in the SDM's order: the checks on the new TSS descriptor, then the new
//! task's state is read (so a fault reading it leaves everything untouched), the old task's
//! state is saved into its TSS, busy bits and the back link are updated, TR, CR0.TS, CR3,
//! LDTR, EFLAGS, EIP and the registers are loaded, and only then are the new segment
//! selectors checked. A fault in that last step is delivered in the context of the new task
//! (its EIP is pushed), which is why the switch reports it separately from faults that
//! happen before the commit.

use crate::core::{crb, dbg, fl};
use crate::exec::Ctx;
use crate::ir::Exc;
use crate::system::{paging_changed, parse_descriptor, read_descriptor};
use deja_machine::Segment;
use deja_machine::cpu::seg;

/// What started a task switch: it decides the busy bits, NT and the back link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Far JMP: the old task becomes available, no back link.
    Jmp,
    /// Far CALL: the new task is nested (back link, NT).
    Call,
    /// IRET with NT: return to the task named by the back link; the old task becomes
    /// available.
    Iret,
    /// An interrupt or exception through a task gate (nested like CALL); `ext` is the EXT
    /// bit of error codes (set for events external to the program).
    Event {
        /// The event is external (hardware interrupt or exception), not INT n.
        ext: bool,
    },
}

/// The new task's state read from its TSS.
struct TaskImage {
    cr3: u64,
    eip: u64,
    eflags: u64,
    gpr: [u64; 8],
    /// ES, CS, SS, DS, FS, GS (FS/GS are `None` for a 16-bit TSS, which has no slots).
    sel: [Option<u16>; 6],
    ldt: u16,
    trap: bool,
}

fn read(ctx: &mut Ctx, lin: u64, size: u8) -> Result<u64, Exc> {
    ctx.read_sys(lin, size)
}

fn write(ctx: &mut Ctx, lin: u64, size: u8, v: u64) -> Result<(), Exc> {
    ctx.write_sys(lin, size, v)
}

fn read_image(ctx: &mut Ctx, base: u64, is32: bool) -> Result<TaskImage, Exc> {
    if is32 {
        let mut gpr = [0u64; 8];
        for (i, r) in gpr.iter_mut().enumerate() {
            *r = read(ctx, base + 0x28 + 4 * i as u64, 4)?;
        }
        let mut sel = [None; 6];
        for (i, s) in sel.iter_mut().enumerate() {
            *s = Some(read(ctx, base + 0x48 + 4 * i as u64, 2)? as u16);
        }
        Ok(TaskImage {
            cr3: read(ctx, base + 0x1c, 4)?,
            eip: read(ctx, base + 0x20, 4)?,
            eflags: read(ctx, base + 0x24, 4)?,
            gpr,
            sel,
            ldt: read(ctx, base + 0x60, 2)? as u16,
            trap: read(ctx, base + 0x64, 2)? & 1 != 0,
        })
    } else {
        let mut gpr = [0u64; 8];
        for (i, r) in gpr.iter_mut().enumerate() {
            *r = read(ctx, base + 0x12 + 2 * i as u64, 2)?;
        }
        let mut sel = [None; 6];
        for (i, s) in sel.iter_mut().take(4).enumerate() {
            *s = Some(read(ctx, base + 0x22 + 2 * i as u64, 2)? as u16);
        }
        Ok(TaskImage {
            cr3: 0,
            eip: read(ctx, base + 0x0e, 2)?,
            eflags: read(ctx, base + 0x10, 2)?,
            gpr,
            sel,
            ldt: read(ctx, base + 0x2a, 2)? as u16,
            trap: false,
        })
    }
}

/// Saves the current task's dynamic state (EIP, EFLAGS, registers, selectors) in its TSS.
fn save_state(ctx: &mut Ctx, eip: u64, eflags: u64) -> Result<(), Exc> {
    let tr = ctx.core.tr;
    let base = tr.base;
    let gpr = ctx.core.gpr;
    let sels: Vec<u16> = ctx.core.seg.iter().map(|s| s.selector).collect();
    if tr.type_ & 8 != 0 {
        write(ctx, base + 0x20, 4, eip & 0xffff_ffff)?;
        write(ctx, base + 0x24, 4, eflags & 0xffff_ffff)?;
        for (i, r) in gpr.iter().take(8).enumerate() {
            write(ctx, base + 0x28 + 4 * i as u64, 4, r & 0xffff_ffff)?;
        }
        for (i, s) in sels.iter().enumerate() {
            write(ctx, base + 0x48 + 4 * i as u64, 2, *s as u64)?;
        }
    } else {
        write(ctx, base + 0x0e, 2, eip & 0xffff)?;
        write(ctx, base + 0x10, 2, eflags & 0xffff)?;
        for (i, r) in gpr.iter().take(8).enumerate() {
            write(ctx, base + 0x12 + 2 * i as u64, 2, r & 0xffff)?;
        }
        for (i, s) in sels.iter().take(4).enumerate() {
            write(ctx, base + 0x22 + 2 * i as u64, 2, *s as u64)?;
        }
    }
    Ok(())
}

/// Sets (`busy`) or clears the busy bit of the TSS descriptor `sel` in the GDT.
fn set_busy(ctx: &mut Ctx, sel: u16, busy: bool) -> Result<(), Exc> {
    let addr = ctx.core.gdtr.base.wrapping_add((sel & 0xfff8) as u64) + 5;
    let b = read(ctx, addr, 1)?;
    let nb = if busy { b | 2 } else { b & !2 };
    write(ctx, addr, 1, nb)
}

/// Switches to the task whose TSS selector is `sel`. `eip` is the old task's resume point.
///
/// `Err` is a fault before the commit (raise it at the instruction that started the
/// switch); `Ok(Some(e))` is a fault after the commit (raise it in the new task, at its
/// EIP); `Ok(None)` is a completed switch.
pub fn switch(ctx: &mut Ctx, sel: u16, reason: Reason, eip: u64) -> Result<Option<Exc>, Exc> {
    let ext = matches!(reason, Reason::Event { ext: true }) as u32;
    let code = (sel & 0xfffc) as u32 | ext;
    let iret = reason == Reason::Iret;
    let bad = |c: u32| if iret { Exc::ts(c) } else { Exc::gp(c) };
    if sel & 4 != 0 || sel & 0xfffc == 0 {
        return Err(bad(code));
    }
    let (_, d) = read_descriptor(ctx, sel).map_err(|_| bad(code))?;
    let mut new = parse_descriptor(sel, d);
    if new.s || !matches!(new.type_, 1 | 3 | 9 | 0xb) {
        return Err(bad(code));
    }
    let busy = new.type_ & 2 != 0;
    if iret && !busy {
        return Err(Exc::ts(code));
    }
    if !iret && busy {
        return Err(Exc::gp(code));
    }
    if !new.present {
        return Err(Exc::np(code));
    }
    let is32 = new.type_ & 8 != 0;
    if new.limit < if is32 { 0x67 } else { 0x2b } {
        return Err(Exc::ts(code));
    }
    let old = ctx.core.tr;
    let old_min = if old.type_ & 8 != 0 { 0x5f } else { 0x29 };
    if old.unusable || old.limit < old_min {
        return Err(Exc::ts((old.selector & 0xfffc) as u32 | ext));
    }
    let image = read_image(ctx, new.base, is32)?;
    ctx.core.materialize();
    let mut old_flags = ctx.core.rflags;
    if iret {
        old_flags &= !fl::NT;
    }
    save_state(ctx, eip, old_flags)?;
    if matches!(reason, Reason::Jmp | Reason::Iret) {
        set_busy(ctx, old.selector, false)?;
    }
    let nested = matches!(reason, Reason::Call | Reason::Event { .. });
    if nested {
        write(ctx, new.base, 2, old.selector as u64)?;
    }
    if !iret {
        set_busy(ctx, sel, true)?;
    }

    // Commit: from here on the CPU is in the new task.
    new.type_ |= 2;
    ctx.core.tr = new;
    ctx.core.cr0 |= crb::TS;
    ctx.core.dr7 &= !dbg::LOCAL_ENABLES;
    if is32 && ctx.core.cr0 & crb::PG != 0 {
        ctx.core.cr3 = image.cr3 & 0xffff_ffff;
        if !crate::system::pae_pdptes_ok(ctx) {
            return Ok(Some(Exc::gp(0)));
        }
        paging_changed(ctx, false);
    }
    let mut flags = if is32 {
        image.eflags
    } else {
        image.eflags & 0xffff
    };
    if nested {
        flags |= fl::NT;
    }
    ctx.core.rflags = (flags & fl::WRITABLE) | 2;
    ctx.core.lazy.op = crate::core::FlagOp::Done;
    ctx.core.rip = image.eip;
    for (i, v) in image.gpr.iter().enumerate() {
        ctx.core.gpr[i] = *v;
    }
    if image.trap {
        ctx.core.db_pending |= dbg::BT;
    }
    // Selectors first (so a fault below leaves them as the new task names them; the hidden
    // parts keep the old descriptors until each is checked and loaded, as KVM's emulator
    // does), then the descriptor checks, LDT first since the others may live in it.
    for (i, s) in image.sel.iter().enumerate() {
        if let Some(s) = s {
            ctx.core.seg[i].selector = *s;
        }
    }
    ctx.core.ldtr.selector = image.ldt;
    Ok(load_task_segments(ctx, &image, ext).err())
}

fn load_task_segments(ctx: &mut Ctx, image: &TaskImage, ext: u32) -> Result<(), Exc> {
    let ts = |s: u16| Exc::ts((s & 0xfffc) as u32 | ext);
    // LDT: a GDT selector of a present LDT descriptor (any fault is #TS).
    let ldt = image.ldt;
    if ldt & 0xfffc != 0 {
        if ldt & 4 != 0 {
            return Err(ts(ldt));
        }
        let (_, d) = read_descriptor(ctx, ldt).map_err(|_| ts(ldt))?;
        let l = parse_descriptor(ldt, d);
        if l.s || l.type_ != 2 || !l.present {
            return Err(ts(ldt));
        }
        ctx.core.ldtr = l;
    }
    if ctx.core.rflags & fl::VM != 0 {
        // A virtual-8086 task: every segment is a real-mode style segment at privilege 3.
        for (i, s) in image.sel.iter().enumerate() {
            if let Some(s) = s {
                let mut d = Segment::real_mode(*s, i == seg::CS);
                d.dpl = 3;
                ctx.core.seg[i] = d;
            }
        }
        ctx.core.rip &= 0xffff;
        return Ok(());
    }
    let load = |ctx: &mut Ctx, sel: u16| -> Result<(u64, u64, Segment), Exc> {
        let (addr, d) = read_descriptor(ctx, sel).map_err(|_| ts(sel))?;
        Ok((addr, d, parse_descriptor(sel, d)))
    };
    // CS: its RPL is the new CPL.
    let cs_sel = image.sel[seg::CS].unwrap_or(0);
    let cpl = (cs_sel & 3) as u8;
    if cs_sel & 0xfffc == 0 {
        return Err(ts(cs_sel));
    }
    let (cs_addr, cs_d, mut cs) = load(ctx, cs_sel)?;
    let conforming = cs.type_ & 4 != 0;
    if !cs.s || cs.type_ & 8 == 0 || (conforming && cs.dpl > cpl) || (!conforming && cs.dpl != cpl)
    {
        return Err(ts(cs_sel));
    }
    if !cs.present {
        return Err(Exc::np((cs_sel & 0xfffc) as u32 | ext));
    }
    // SS: a writable data segment at the new CPL.
    let ss_sel = image.sel[seg::SS].unwrap_or(0);
    if ss_sel & 0xfffc == 0 {
        return Err(ts(ss_sel));
    }
    let (ss_addr, ss_d, mut ss) = load(ctx, ss_sel)?;
    if (ss_sel & 3) as u8 != cpl || ss.dpl != cpl || !ss.s || ss.type_ & 8 != 0 || ss.type_ & 2 == 0
    {
        return Err(ts(ss_sel));
    }
    if !ss.present {
        return Err(Exc::ss((ss_sel & 0xfffc) as u32 | ext));
    }
    crate::system::set_accessed(ctx, cs_addr, cs_d)?;
    crate::system::set_accessed(ctx, ss_addr, ss_d)?;
    cs.type_ |= 1;
    ss.type_ |= 1;
    ctx.core.seg[seg::CS] = cs;
    ctx.core.seg[seg::SS] = ss;
    // Data segments: null is allowed; otherwise data or readable code the new CPL may use.
    for r in [seg::ES, seg::DS, seg::FS, seg::GS] {
        let Some(sel) = image.sel[r] else { continue };
        if sel & 0xfffc == 0 {
            continue;
        }
        let (addr, d, mut s) = load(ctx, sel)?;
        let code = s.type_ & 8 != 0;
        if !s.s || (code && s.type_ & 2 == 0) {
            return Err(ts(sel));
        }
        let conforming_code = code && s.type_ & 4 != 0;
        if !conforming_code && (s.dpl < cpl || s.dpl < (sel & 3) as u8) {
            return Err(ts(sel));
        }
        if !s.present {
            return Err(Exc::np((sel & 0xfffc) as u32 | ext));
        }
        crate::system::set_accessed(ctx, addr, d)?;
        s.type_ |= 1;
        ctx.core.seg[r] = s;
    }
    let limit = ctx.core.seg[seg::CS].limit as u64;
    if ctx.core.rip > limit {
        return Err(Exc::gp(ext));
    }
    Ok(())
}
