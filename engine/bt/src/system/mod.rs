//! Monitor calls: privileged and sensitive instructions with their exact architectural
//! semantics (CLI/STI/PUSHF/POPF with IOPL and VIF rules, control and debug registers,
//! descriptor tables, I/O with the TSS permission bitmap, MSRs, CPUID, TSC), segment loads
//! with descriptor checks, far transfers, IRET, and interrupt and exception delivery through
//! the IVT and the IDT (stack switches, IST, error codes).
//!
//! One file per domain; everything is re-exported here, so handlers keep their
//! `system::name` paths.

mod control;
mod events;
mod far;
mod fastcall;
mod flags;
mod io;
mod msrs;
mod segments;
mod tables;

pub use control::*;
pub use events::*;
pub use far::*;
pub use fastcall::*;
pub use flags::*;
pub use io::*;
pub use msrs::*;
pub use segments::*;
pub use tables::*;

use crate::core::{crb, dbg, fl, mask};
use crate::exec::Ctx;
use crate::ir::{Ctl, Exc, OpResult, Operand, UOp};
use deja_machine::Segment;
use deja_machine::cpu::{msr, seg};

fn need_cpl0(ctx: &Ctx) -> Result<(), Exc> {
    if ctx.core.cpl() != 0 {
        Err(Exc::gp(0))
    } else {
        Ok(())
    }
}

/// UMIP (CR4 bit 11): SGDT, SIDT, SLDT, SMSW and STR raise #GP(0) outside ring 0 (virtual-8086
/// mode included), before they touch memory.
fn umip_check(ctx: &Ctx) -> Result<(), Exc> {
    if ctx.core.cr4 & crb::UMIP != 0 && ctx.core.cpl() > 0 {
        return Err(Exc::gp(0));
    }
    Ok(())
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
