//! Conversions between KVM's register structures and deja's engine-independent
//! [`CpuState`](deja_machine::CpuState).

use deja_machine::cpu::{DescriptorTable, FpuState, PendingDebug, Segment, msr};
use kvm_bindings::{kvm_dtable, kvm_fpu, kvm_regs, kvm_segment, kvm_vcpu_events};

/// The MSRs deja keeps in [`CpuState::msrs`](deja_machine::CpuState::msrs) besides those
/// KVM reports through `kvm_sregs` (EFER, APIC base) and the segment bases (FS, GS).
pub const KEPT_MSRS: &[u32] = &[
    msr::IA32_TSC,
    msr::IA32_SYSENTER_CS,
    msr::IA32_SYSENTER_ESP,
    msr::IA32_SYSENTER_EIP,
    msr::IA32_MISC_ENABLE,
    msr::IA32_PAT,
    msr::IA32_STAR,
    msr::IA32_LSTAR,
    msr::IA32_CSTAR,
    msr::IA32_FMASK,
    msr::IA32_KERNEL_GS_BASE,
    msr::IA32_TSC_AUX,
];

/// `kvm_segment` to [`Segment`].
pub fn segment_from_kvm(s: &kvm_segment) -> Segment {
    Segment {
        selector: s.selector,
        base: s.base,
        limit: s.limit,
        type_: s.type_,
        dpl: s.dpl,
        s: s.s != 0,
        present: s.present != 0,
        db: s.db != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

/// [`Segment`] to `kvm_segment`.
pub fn segment_to_kvm(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_ & 0xf,
        present: u8::from(s.present),
        dpl: s.dpl & 3,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: u8::from(s.avl),
        unusable: u8::from(s.unusable),
        padding: 0,
    }
}

/// `kvm_dtable` to [`DescriptorTable`].
pub fn dtable_from_kvm(d: &kvm_dtable) -> DescriptorTable {
    DescriptorTable {
        base: d.base,
        limit: d.limit,
    }
}

/// [`DescriptorTable`] to `kvm_dtable`.
pub fn dtable_to_kvm(d: &DescriptorTable) -> kvm_dtable {
    kvm_dtable {
        base: d.base,
        limit: d.limit,
        padding: [0; 3],
    }
}

/// `kvm_regs` to deja's GPR array (encoding order), RIP and RFLAGS.
pub fn gprs_from_kvm(r: &kvm_regs) -> ([u64; 16], u64, u64) {
    (
        [
            r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ],
        r.rip,
        r.rflags,
    )
}

/// deja's GPRs, RIP and RFLAGS to `kvm_regs`.
pub fn gprs_to_kvm(g: &[u64; 16], rip: u64, rflags: u64) -> kvm_regs {
    kvm_regs {
        rax: g[0],
        rcx: g[1],
        rdx: g[2],
        rbx: g[3],
        rsp: g[4],
        rbp: g[5],
        rsi: g[6],
        rdi: g[7],
        r8: g[8],
        r9: g[9],
        r10: g[10],
        r11: g[11],
        r12: g[12],
        r13: g[13],
        r14: g[14],
        r15: g[15],
        rip,
        rflags,
    }
}

/// `kvm_fpu` (FXSAVE layout) to [`FpuState`].
pub fn fpu_from_kvm(f: &kvm_fpu) -> FpuState {
    FpuState {
        fcw: f.fcw,
        fsw: f.fsw,
        ftw: f.ftwx,
        fop: f.last_opcode,
        fip: f.last_ip,
        fdp: f.last_dp,
        st: f.fpr,
        mxcsr: f.mxcsr,
        xmm: f.xmm,
    }
}

/// [`FpuState`] to `kvm_fpu`.
pub fn fpu_to_kvm(f: &FpuState) -> kvm_fpu {
    kvm_fpu {
        fpr: f.st,
        fcw: f.fcw,
        fsw: f.fsw,
        ftwx: f.ftw,
        pad1: 0,
        last_opcode: f.fop,
        last_ip: f.fip,
        last_dp: f.fdp,
        xmm: f.xmm,
        mxcsr: f.mxcsr,
        pad2: 0,
    }
}

/// Offset of XSTATE_BV in the XSAVE header, right after the 512-byte legacy area.
const XSTATE_BV: usize = 512;
/// x87 and SSE components of XSTATE_BV.
const XSTATE_X87_SSE: u64 = 0b11;

fn le<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[at..at + N]);
    out
}

/// Reads x87/SSE state from a standard-format XSAVE image (its FXSAVE legacy area).
///
/// Some hosts lose MXCSR through `KVM_SET_FPU`/`KVM_GET_FPU` (seen on PVM), while the XSAVE
/// interface keeps it, so deja prefers XSAVE where the host has it.
pub fn fpu_from_xsave(image: &[u8; 4096]) -> FpuState {
    let mut st = [[0u8; 16]; 8];
    for (i, r) in st.iter_mut().enumerate() {
        *r = le::<16>(image, 32 + 16 * i);
    }
    let mut xmm = [[0u8; 16]; 16];
    for (i, r) in xmm.iter_mut().enumerate() {
        *r = le::<16>(image, 160 + 16 * i);
    }
    FpuState {
        fcw: u16::from_le_bytes(le(image, 0)),
        fsw: u16::from_le_bytes(le(image, 2)),
        ftw: image[4],
        fop: u16::from_le_bytes(le(image, 6)),
        fip: u64::from_le_bytes(le(image, 8)),
        fdp: u64::from_le_bytes(le(image, 16)),
        st,
        mxcsr: u32::from_le_bytes(le(image, 24)),
        xmm,
    }
}

/// Writes x87/SSE state into a standard-format XSAVE image and marks both components as
/// present in XSTATE_BV, leaving every other component as it was.
pub fn fpu_into_xsave(f: &FpuState, image: &mut [u8; 4096]) {
    image[0..2].copy_from_slice(&f.fcw.to_le_bytes());
    image[2..4].copy_from_slice(&f.fsw.to_le_bytes());
    image[4] = f.ftw;
    image[5] = 0;
    image[6..8].copy_from_slice(&f.fop.to_le_bytes());
    image[8..16].copy_from_slice(&f.fip.to_le_bytes());
    image[16..24].copy_from_slice(&f.fdp.to_le_bytes());
    image[24..28].copy_from_slice(&f.mxcsr.to_le_bytes());
    for (i, r) in f.st.iter().enumerate() {
        image[32 + 16 * i..48 + 16 * i].copy_from_slice(r);
    }
    for (i, r) in f.xmm.iter().enumerate() {
        image[160 + 16 * i..176 + 16 * i].copy_from_slice(r);
    }
    let bv = u64::from_le_bytes(le(image, XSTATE_BV)) | XSTATE_X87_SSE;
    image[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&bv.to_le_bytes());
}

/// The DR6 condition bits a pending #DB carries: B0-B3, BD, BS, BT.
const DR6_CONDITIONS: u64 = 0xf | 1 << 13 | 1 << 14 | 1 << 15;
/// The bits DR6 always reads as 1.
const DR6_FIXED_ONES: u64 = 0xffff_0ff0;

/// The #DB trap KVM has queued but not delivered, as [`PendingDebug`].
///
/// KVM queues a #DB it raises itself (a single step or data breakpoint over an instruction
/// it completed, e.g. a port access that exited to deja) in its vCPU events as exception
/// vector 1, pending or injected, and delivers it at the next entry. deja does not enable
/// `KVM_CAP_EXCEPTION_PAYLOAD`, so KVM has already merged the trap's condition bits into DR6
/// when it queued it: the bits are read from `dr6`. A queued #DB whose DR6 holds no condition
/// bit (ICEBP) cannot be told from none and reads as none.
///
/// `after_shadow` is always 0: a trap held back by a MOV SS shadow lives in VMX's
/// pending-debug-exceptions field (SVM has no such field), which KVM only exposes in nested
/// state, not in `KVM_GET_VCPU_EVENTS`.
pub fn pending_debug_from_kvm(events: &kvm_vcpu_events, dr6: u64) -> PendingDebug {
    let ex = &events.exception;
    let queued = (ex.injected != 0 || ex.pending != 0) && ex.nr == 1;
    PendingDebug {
        trap: if queued { dr6 & DR6_CONDITIONS } else { 0 },
        after_shadow: 0,
    }
}

/// Puts a pending #DB trap into KVM's vCPU events (as an injected exception 1, which KVM
/// delivers at the next entry before any interrupt, as the CPU would) and its condition bits
/// into `dr6`, as a #DB delivery leaves them; clears a #DB KVM had queued when `p` has none.
/// Returns `false` when `p.after_shadow` had bits, which KVM cannot hold (see
/// [`pending_debug_from_kvm`]): they are dropped.
pub fn pending_debug_to_kvm(p: &PendingDebug, events: &mut kvm_vcpu_events, dr6: &mut u64) -> bool {
    let ex = &mut events.exception;
    if p.trap != 0 {
        *dr6 = (*dr6 & !0xf) | (p.trap & DR6_CONDITIONS) | DR6_FIXED_ONES;
        ex.injected = 1;
        ex.pending = 0;
        ex.nr = 1;
        ex.has_error_code = 0;
        ex.error_code = 0;
    } else if ex.nr == 1 {
        ex.injected = 0;
        ex.pending = 0;
    }
    p.after_shadow == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use deja_machine::cpu::gpr;

    #[test]
    fn conversions_round_trip() {
        let seg = Segment {
            selector: 0x2b,
            base: 0x1234_5678,
            limit: 0xfffff,
            type_: 0xa,
            dpl: 3,
            s: true,
            present: true,
            db: false,
            l: true,
            g: true,
            avl: true,
            unusable: false,
        };
        assert_eq!(segment_from_kvm(&segment_to_kvm(&seg)), seg);
        let mut g = [0u64; 16];
        for (i, v) in g.iter_mut().enumerate() {
            *v = 0x1000 + i as u64;
        }
        let k = gprs_to_kvm(&g, 0x7c00, 0x202);
        assert_eq!(k.rbx, 0x1000 + gpr::RBX as u64);
        assert_eq!(k.rsp, 0x1000 + gpr::RSP as u64);
        assert_eq!(gprs_from_kvm(&k), (g, 0x7c00, 0x202));
        let mut f = FpuState::default();
        f.xmm[3][5] = 9;
        f.st[7][0] = 1;
        f.fop = 0x7ff;
        assert_eq!(fpu_from_kvm(&fpu_to_kvm(&f)), f);
        f.mxcsr = 0x1fa0;
        f.fip = 0x1122_3344_5566;
        let mut image = [0xeeu8; 4096];
        image[512..520].fill(0);
        fpu_into_xsave(&f, &mut image);
        assert_eq!(fpu_from_xsave(&image), f);
        assert_eq!(image[512], 3);
        assert_eq!(image[600], 0xee, "other components untouched");
        let d = DescriptorTable {
            base: 0xffff_8000_0000_1000,
            limit: 0x7ff,
        };
        assert_eq!(dtable_from_kvm(&dtable_to_kvm(&d)), d);
    }
}
