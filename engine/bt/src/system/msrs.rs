//! CPUID, the TSC (RDTSC/RDTSCP), RDRAND/RDSEED, RDPMC and RDMSR/WRMSR (the engine's
//! own MSRs, the machine-check bank and the MSRs the machine owns).

use super::*;

/// CPUID from the machine's table (the same one kvm presents).
pub fn cpuid(ctx: &mut Ctx, _op: &UOp) -> OpResult {
    let eax = ctx.core.gpr[0] as u32;
    let ecx = ctx.core.gpr[1] as u32;
    let mut r = ctx.machine().cpuid(eax, ecx);
    // CPUID.01H:ECX.OSXSAVE reflects CR4.OSXSAVE.
    if eax == 1 && ctx.core.cr4 & crb::OSXSAVE != 0 {
        r[2] |= deja_machine::cpuid::features::OSXSAVE;
    }
    for (i, reg) in [0usize, 3, 1, 2].iter().enumerate() {
        ctx.core.gpr[*reg] = r[i] as u64;
    }
    Ok(Ctl::Next)
}

fn tsc(ctx: &mut Ctx) -> u64 {
    let t = ctx.host_time_ns();
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
    let v = ctx.host_entropy();
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
    msr::IA32_BIOS_SIGN_ID,
    msr::IA32_ARCH_CAPABILITIES,
];

/// IA32_ARCH_CAPABILITIES (read-only): not vulnerable to rogue data cache loads (RDCL_NO),
/// no L1D flush needed on VM entry, not vulnerable to speculative store bypass (SSB_NO),
/// microarchitectural data sampling (MDS_NO), page-size-change machine checks, TSX async
/// abort (TAA_NO), the stale-data and MMIO-data leaks (SBDR_SSDP_NO, FBSDP_NO, PSDP_NO),
/// branch history injection (BHI_NO), post-barrier RSB predictions (PBRSB_NO), gather data
/// sampling (GDS_NO) and register file data sampling (RFDS_NO): deja executes nothing
/// speculatively that a guest could observe, so a kernel need not mitigate these.
pub const ARCH_CAPABILITIES: u64 = (1 << 0)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 8)
    | (1 << 13)
    | (1 << 14)
    | (1 << 15)
    | (1 << 20)
    | (1 << 24)
    | (1 << 26)
    | (1 << 27);

/// IA32_MISC_ENABLE at reset: fast-string operations enabled, branch trace storage and
/// precise event sampling unavailable (no performance monitoring).
pub const MISC_ENABLE_RESET: u64 = (1 << 0) | (1 << 11) | (1 << 12);

/// The microcode revision IA32_BIOS_SIGN_ID reports (bits 63:32; deja has no microcode).
pub const MICROCODE_REVISION: u64 = 1;

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
    if ctx.machine().handles_msr(idx) {
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
        let v = match idx {
            msr::IA32_TSC => tsc(ctx),
            msr::IA32_ARCH_CAPABILITIES => ARCH_CAPABILITIES,
            msr::IA32_BIOS_SIGN_ID => MICROCODE_REVISION << 32,
            msr::IA32_MISC_ENABLE => ctx
                .core
                .msrs
                .get(&idx)
                .copied()
                .unwrap_or(MISC_ENABLE_RESET),
            _ => ctx.core.msr(idx),
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
        // Read-only.
        msr::IA32_ARCH_CAPABILITIES => return Err(Exc::gp(0)),
        // A write (of 0, before CPUID, to latch the revision) changes nothing here.
        msr::IA32_BIOS_SIGN_ID => {}
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
    if op.aux == 0 {
        let v = ctx.machine_rdmsr(idx).map_err(|_| Exc::gp(0))?;
        ctx.core.gpr[0] = v & 0xffff_ffff;
        ctx.core.gpr[2] = v >> 32;
        return Ok(Ctl::Next);
    }
    let v = (ctx.core.gpr[0] & 0xffff_ffff) | (ctx.core.gpr[2] << 32);
    let tsc = deja_machine::devices::lapic::GuestTsc {
        offset: ctx.core.msr(msr::IA32_TSC),
        ..deja_machine::devices::lapic::GuestTsc::BT
    };
    ctx.machine_wrmsr(idx, v, tsc).map_err(|_| Exc::gp(0))?;
    if idx == msr::IA32_APIC_BASE {
        // IA32_APIC_BASE lives in the local APIC's state; the CPU state keeps a copy of what
        // the guest wrote, as kvm's does (it hands the value to KVM, whose CPUID.01H:EDX.APIC
        // follows it).
        ctx.core.msrs.insert(idx, v);
    }
    Ok(Ctl::Next)
}
