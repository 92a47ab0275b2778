//! Control and debug registers: MOV CRn/DRn (with the PAE PDPTE loads and the paging
//! flushes they imply), INVLPG, CLTS, LMSW/SMSW.

use super::*;

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
            8 => ctx.machine().cr8().unwrap_or(ctx.core.cr8),
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
            let allowed = cr4_allowed(ctx.machine());
            if v & !allowed != 0 {
                return Err(Exc::gp(0));
            }
            if ctx.core.long_mode() && v & crb::PAE == 0 {
                return Err(Exc::gp(0));
            }
            let old = ctx.core.cr4;
            ctx.core.cr4 = v;
            if (old ^ v) & (crb::PAE | crb::PGE | crb::PSE | crb::SMEP | crb::SMAP) != 0 {
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
            ctx.set_cr8(v);
        }
        _ => return Err(Exc::UD),
    }
    ctx.core.rip = op.next_rip;
    Ok(Ctl::End)
}

/// The CR4 bits MOV to CR4 accepts: each bit whose feature the machine's CPUID table
/// reports (SDM vol. 3 2.5, table 2-? "CR4 bits and their CPUID feature flags"); setting any
/// other bit, reserved ones included, raises #GP(0). PCE (performance-monitoring counters
/// at CPL 3) has no feature flag and is always accepted, as on every P6-family CPU.
pub fn cr4_allowed(machine: &deja_machine::Machine) -> u64 {
    use deja_machine::cpuid::features as f;
    let l1 = machine.cpuid(1, 0);
    let l7 = machine.cpuid(7, 0);
    let (ecx1, edx1, ebx7, ecx7) = (l1[2], l1[3], l7[1], l7[2]);
    let gates: [(bool, u64); 16] = [
        (edx1 & f::VME != 0, crb::VME | crb::PVI),
        (edx1 & f::TSC != 0, crb::TSD),
        (edx1 & f::DE != 0, crb::DE),
        (edx1 & f::PSE != 0, crb::PSE),
        (edx1 & f::PAE != 0, crb::PAE),
        (edx1 & f::MCE != 0, crb::MCE),
        (edx1 & f::PGE != 0, crb::PGE),
        (true, crb::PCE),
        (edx1 & f::FXSR != 0, crb::OSFXSR),
        (edx1 & f::SSE != 0, crb::OSXMMEXCPT),
        (ecx7 & f::UMIP != 0, crb::UMIP),
        (ebx7 & f::FSGSBASE != 0, crb::FSGSBASE),
        (ecx1 & f::PCID != 0, crb::PCIDE),
        (ecx1 & f::XSAVE != 0, crb::OSXSAVE),
        (ebx7 & f::SMEP != 0, crb::SMEP),
        (ebx7 & f::SMAP != 0, crb::SMAP),
    ];
    gates
        .iter()
        .filter(|(on, _)| *on)
        .fold(0, |acc, (_, bits)| acc | bits)
}

/// With PAE paging active (outside long mode), loads the PDPTE registers as MOV to
/// CR0/CR3/CR4 does; `false` means #GP(0).
pub(crate) fn pae_pdptes_ok(ctx: &mut Ctx) -> bool {
    let c = &*ctx.core;
    if c.cr0 & crb::PG == 0 || c.cr4 & crb::PAE == 0 || c.long_mode() {
        return true;
    }
    ctx.load_pdptes()
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

/// CLTS.
pub fn clts(ctx: &mut Ctx, _op: &UOp) -> OpResult {
    need_cpl0(ctx)?;
    ctx.core.cr0 &= !crb::TS;
    Ok(Ctl::Next)
}

/// LMSW (`aux` 0) / SMSW (`aux` 1).
pub fn msw(ctx: &mut Ctx, op: &UOp) -> OpResult {
    if op.aux == 1 {
        umip_check(ctx)?;
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
