//! The XSAVE feature set for the state components deja's CPU has, x87 (0) and SSE (1):
//! XGETBV/XSETBV and XCR0, XSAVE, XSAVEOPT and XRSTOR in their standard (non-compacted)
//! form (SDM vol. 1 chapter 13). The area is the FXSAVE image ([`super::fx_image`]) as the
//! legacy region, then the 64-byte XSAVE header; CPUID leaf 0xd says 576 bytes.
//!
//! XINUSE, the processor's record of which components are not in their initial
//! configuration, is computed from the state itself: a component counts as in use unless it
//! is exactly in its initial configuration (x87: FCW 0x37f, everything else zero, every
//! register empty; SSE: every XMM register zero and MXCSR 0x1f80). The SDM lets XINUSE[i]
//! be 1 for a component in its initial configuration, never 0 for one that is not, so this
//! is exact where it reports 0 and deterministic everywhere. XSAVEOPT uses neither of its
//! optional optimizations (modified, init): it writes what XSAVE writes, which the SDM
//! allows.

use super::{MXCSR_MASK, fx_image, fx_load_x87, fx_load_xmm};
use crate::core::crb;
use crate::exec::Ctx;
use crate::ir::{Ctl, Exc, OpResult, Operand, UOp};
use deja_machine::cpu::Xcr0;

/// Size of the standard-form XSAVE area for x87 and SSE: legacy region and header.
pub const AREA_SIZE: u64 = 576;
/// Offset of the XSAVE header (XSTATE_BV, then XCOMP_BV).
const HEADER: usize = 512;

/// `aux` of [`xsave`]: XSAVE.
pub const XSAVE: u8 = 0;
/// `aux` of [`xsave`]: XRSTOR.
pub const XRSTOR: u8 = 1;
/// `aux` of [`xsave`]: XSAVEOPT.
pub const XSAVEOPT: u8 = 2;

/// #UD unless CR4.OSXSAVE is set (the translator already gave #UD when the CPUID table
/// lacks XSAVE).
fn osxsave(ctx: &Ctx) -> Result<(), Exc> {
    if ctx.core.cr4 & crb::OSXSAVE == 0 {
        return Err(Exc::UD);
    }
    Ok(())
}

/// XGETBV: EDX:EAX = XCR[ECX]. Only XCR0 exists (CPUID.(EAX=0DH,ECX=1):EAX[2], XGETBV
/// with ECX = 1, is not reported): any other ECX is #GP(0). Any CPL.
pub fn xgetbv(ctx: &mut Ctx, _op: &UOp) -> OpResult {
    osxsave(ctx)?;
    if ctx.core.gpr[1] as u32 != 0 {
        return Err(Exc::gp(0));
    }
    let v = ctx.core.xcr0;
    ctx.core.gpr[0] = v & 0xffff_ffff;
    ctx.core.gpr[2] = v >> 32;
    Ok(Ctl::Next)
}

/// XSETBV: XCR[ECX] = EDX:EAX, CPL 0 only (#GP(0) in ring 3 and virtual-8086 mode), ECX
/// must be 0, bit 0 (x87) must stay set and no unsupported component may be enabled.
pub fn xsetbv(ctx: &mut Ctx, _op: &UOp) -> OpResult {
    osxsave(ctx)?;
    if ctx.core.cpl() != 0 || ctx.core.gpr[1] as u32 != 0 {
        return Err(Exc::gp(0));
    }
    let v = (ctx.core.gpr[2] & 0xffff_ffff) << 32 | (ctx.core.gpr[0] & 0xffff_ffff);
    if v & Xcr0::X87 == 0 || v & !Xcr0::SUPPORTED != 0 {
        return Err(Exc::gp(0));
    }
    ctx.core.xcr0 = v;
    Ok(Ctl::Next)
}

/// XINUSE as deja tracks it (see the module documentation).
pub fn in_use(ctx: &Ctx) -> u64 {
    let f = &ctx.core.fpu;
    let x87_init = f.fcw == 0x37f
        && f.fsw == 0
        && f.ftw == 0
        && f.fop == 0
        && f.fip == 0
        && f.fdp == 0
        && f.st.iter().all(|r| r[..10].iter().all(|&b| b == 0));
    let sse_init = f.mxcsr == 0x1f80 && f.xmm.iter().all(|r| r.iter().all(|&b| b == 0));
    (u64::from(!x87_init) * Xcr0::X87) | (u64::from(!sse_init) * Xcr0::SSE)
}

/// XSAVE, XSAVEOPT and XRSTOR (`aux` [`XSAVE`], [`XSAVEOPT`], [`XRSTOR`]; `size` 8 for the
/// REX.W forms, whose legacy region has the 64-bit FIP/FDP layout).
pub fn xsave(ctx: &mut Ctx, op: &UOp) -> OpResult {
    osxsave(ctx)?;
    if ctx.core.cr0 & crb::TS != 0 {
        return Err(Exc::NM);
    }
    let Operand::Mem(m) = op.dst else {
        return Err(Exc::UD);
    };
    let restore = op.aux == XRSTOR;
    let off = ctx.ea(&m);
    // 64-byte alignment or #GP(0); under alignment checking #AC(0) first for an area not
    // 4-byte aligned, as FXSAVE does here.
    let lin = ctx.linear_aligned(m.seg, off, AREA_SIZE, !restore, 4)?;
    if off & 63 != 0 {
        return Err(Exc::gp(0));
    }
    let rfbm =
        ctx.core.xcr0 & ((ctx.core.gpr[2] & 0xffff_ffff) << 32 | ctx.core.gpr[0] & 0xffff_ffff);
    let rex_w = op.size == 8;
    let user = ctx.core.cpl() == 3;
    if restore {
        return xrstor(ctx, lin, rfbm, rex_w, user);
    }
    // Every byte the instruction writes is checked before the first is written.
    ctx.check_writable(lin, AREA_SIZE)?;
    let image = fx_image(ctx, rex_w);
    let mut header = [0u8; 8];
    ctx.read_bytes(lin + HEADER as u64, &mut header, user)?;
    let xstate_bv = u64::from_le_bytes(header);
    let xstate_bv = (xstate_bv & !rfbm) | (in_use(ctx) & rfbm);
    if rfbm & Xcr0::X87 != 0 {
        ctx.write_bytes(lin, &image[0..24], user)?;
        ctx.write_bytes(lin + 32, &image[32..160], user)?;
    }
    if rfbm & Xcr0::SSE != 0 {
        // MXCSR and MXCSR_MASK go with the SSE component (and with AVX, which deja lacks).
        ctx.write_bytes(lin + 24, &image[24..32], user)?;
        let xmm_bytes = if ctx.core.mode64() { 256 } else { 128 };
        ctx.write_bytes(lin + 160, &image[160..160 + xmm_bytes], user)?;
    }
    ctx.write_bytes(lin + HEADER as u64, &xstate_bv.to_le_bytes(), user)?;
    Ok(Ctl::Next)
}

/// XRSTOR in its standard form: #GP(0) for an XSTATE_BV bit XCR0 lacks, for a non-zero
/// byte among header bytes 8-23 (XCOMP_BV: deja has no compacted form) and for reserved
/// MXCSR bits, before any state changes. Then for each component in RFBM: loaded from the
/// area when its XSTATE_BV bit is set, put in its initial configuration otherwise; MXCSR
/// is loaded whenever RFBM includes SSE.
fn xrstor(ctx: &mut Ctx, lin: u64, rfbm: u64, rex_w: bool, user: bool) -> OpResult {
    let mut area = [0u8; AREA_SIZE as usize];
    ctx.read_bytes(lin, &mut area, user)?;
    let field = |at: usize| u64::from_le_bytes(area[at..at + 8].try_into().unwrap_or([0; 8]));
    let xstate_bv = field(HEADER);
    if xstate_bv & !ctx.core.xcr0 != 0 || field(HEADER + 8) != 0 || field(HEADER + 16) != 0 {
        return Err(Exc::gp(0));
    }
    let mxcsr = u32::from_le_bytes([area[24], area[25], area[26], area[27]]);
    if rfbm & Xcr0::SSE != 0 && mxcsr & !MXCSR_MASK != 0 {
        return Err(Exc::gp(0));
    }
    let mut legacy = [0u8; 512];
    legacy.copy_from_slice(&area[..512]);
    if rfbm & Xcr0::X87 != 0 {
        if xstate_bv & Xcr0::X87 != 0 {
            fx_load_x87(ctx, &legacy, rex_w);
        } else {
            let f = &mut ctx.core.fpu;
            let mxcsr = f.mxcsr;
            let xmm = f.xmm;
            *f = deja_machine::cpu::FpuState {
                mxcsr,
                xmm,
                ..Default::default()
            };
        }
    }
    if rfbm & Xcr0::SSE != 0 {
        if xstate_bv & Xcr0::SSE != 0 {
            fx_load_xmm(ctx, &legacy);
        } else {
            // The registers this mode has: XMM8-15 are left alone outside 64-bit mode.
            let n = if ctx.core.mode64() { 16 } else { 8 };
            for x in &mut ctx.core.fpu.xmm[..n] {
                *x = [0; 16];
            }
        }
        ctx.core.fpu.mxcsr = mxcsr;
    }
    crate::native::x87_error_sync(ctx);
    Ok(Ctl::Next)
}
