//! Port I/O: IN and OUT with the IOPL and TSS permission-bitmap checks and I/O
//! breakpoints, and HLT.

use super::*;

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
    let base = ctx.read_sys(tr.base + 0x66, 2)?;
    let off = base + (port as u64 >> 3);
    if off + 1 > tr.limit as u64 {
        return Err(Exc::gp(0));
    }
    let bits = ctx.read_sys(tr.base + off, 2)?;
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
    ctx.port_in(port, &mut buf[..op.size as usize]);
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
    ctx.port_out(port, &v.to_le_bytes()[..op.size as usize]);
    Ok(Ctl::Next)
}

/// HLT.
pub fn hlt(ctx: &mut Ctx, op: &UOp) -> OpResult {
    need_cpl0(ctx)?;
    ctx.core.rip = op.next_rip;
    Ok(Ctl::Halt)
}
