//! Interrupt and exception delivery through the IVT and the IDT (stack switches, IST,
//! error codes, escalation to #DF and shutdown), INT n/INT3/INTO/INT1, BOUND's #BR and
//! #DB delivery.

use super::*;

/// Whether `vector` pushes an error code when raised as an exception.
pub fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21)
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
        let ent = ctx.read_sys(ctx.core.idtr.base + off, 4)?;
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
    let g = ctx.read_sys(gaddr, 8)?;
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
        let hi = ctx.read_sys(gaddr + 8, 8)?;
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
                ctx.read_sys(ctx.core.tr.base + 0x24 + (ist as u64 - 1) * 8, 8)?
            } else if new_cpl < cpl {
                ctx.read_sys(ctx.core.tr.base + 4 + new_cpl as u64 * 8, 8)?
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
