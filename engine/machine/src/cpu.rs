//! The contract between the machine and a CPU engine, and the engine-independent
//! architectural state that snapshots, checkpoints and cross-engine replay go through.

use crate::Machine;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use thiserror::Error;

/// General-purpose register indices, in x86 encoding order.
pub mod gpr {
    #![allow(missing_docs)]
    pub const RAX: usize = 0;
    pub const RCX: usize = 1;
    pub const RDX: usize = 2;
    pub const RBX: usize = 3;
    pub const RSP: usize = 4;
    pub const RBP: usize = 5;
    pub const RSI: usize = 6;
    pub const RDI: usize = 7;
    /// Names in index order (R8..R15 follow RDI).
    pub const NAMES: [&str; 16] = [
        "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12",
        "r13", "r14", "r15",
    ];
}

/// Segment register indices, in x86 encoding order.
pub mod seg {
    #![allow(missing_docs)]
    pub const ES: usize = 0;
    pub const CS: usize = 1;
    pub const SS: usize = 2;
    pub const DS: usize = 3;
    pub const FS: usize = 4;
    pub const GS: usize = 5;
    pub const NAMES: [&str; 6] = ["es", "cs", "ss", "ds", "fs", "gs"];
}

/// A segment register with its hidden descriptor cache, as KVM's `kvm_segment` holds it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Segment {
    /// The visible selector.
    pub selector: u16,
    /// Cached base address.
    pub base: u64,
    /// Cached limit in bytes (already scaled by the granularity bit).
    pub limit: u32,
    /// Descriptor type field (4 bits).
    pub type_: u8,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// S bit: code/data (true) or system descriptor (false).
    pub s: bool,
    /// Present bit.
    pub present: bool,
    /// Default operation size / big bit.
    pub db: bool,
    /// 64-bit code segment bit.
    pub l: bool,
    /// Granularity bit (as loaded; `limit` is already scaled).
    pub g: bool,
    /// Available-for-software bit.
    pub avl: bool,
    /// The register holds a null selector or is otherwise unusable (VMX's notion).
    pub unusable: bool,
}

impl Segment {
    /// A real-mode segment: base = selector * 16, 64 KiB limit, read/write (or code).
    pub fn real_mode(selector: u16, code: bool) -> Self {
        Self {
            selector,
            base: u64::from(selector) << 4,
            limit: 0xffff,
            type_: if code { 0xb } else { 0x3 },
            dpl: 0,
            s: true,
            present: true,
            ..Self::default()
        }
    }

    /// A flat 4 GiB segment for protected or long mode.
    pub fn flat(selector: u16, code: bool, long: bool) -> Self {
        Self {
            selector,
            base: 0,
            limit: 0xffff_ffff,
            type_: if code { 0xb } else { 0x3 },
            dpl: 0,
            s: true,
            present: true,
            db: !(code && long),
            l: code && long,
            g: true,
            ..Self::default()
        }
    }

    /// The access-rights word in VMX layout (type, S, DPL, P, AVL, L, D/B, G, unusable).
    pub fn access_rights(&self) -> u32 {
        u32::from(self.type_ & 0xf)
            | u32::from(self.s) << 4
            | u32::from(self.dpl & 3) << 5
            | u32::from(self.present) << 7
            | u32::from(self.avl) << 12
            | u32::from(self.l) << 13
            | u32::from(self.db) << 14
            | u32::from(self.g) << 15
            | u32::from(self.unusable) << 16
    }
}

/// GDTR or IDTR.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DescriptorTable {
    /// Linear base address.
    pub base: u64,
    /// Limit in bytes.
    pub limit: u16,
}

/// x87 and SSE state in FXSAVE terms.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FpuState {
    /// x87 control word.
    pub fcw: u16,
    /// x87 status word.
    pub fsw: u16,
    /// Abridged tag word (FXSAVE format, one bit per register).
    pub ftw: u8,
    /// Last x87 opcode.
    pub fop: u16,
    /// Last x87 instruction pointer.
    pub fip: u64,
    /// Last x87 data pointer.
    pub fdp: u64,
    /// The eight 80-bit x87/MMX registers, each in 16 bytes.
    pub st: [[u8; 16]; 8],
    /// SSE control and status.
    pub mxcsr: u32,
    /// XMM0..XMM15.
    pub xmm: [[u8; 16]; 16],
}

impl Default for FpuState {
    fn default() -> Self {
        // The values FNINIT and reset leave behind.
        Self {
            fcw: 0x37f,
            fsw: 0,
            ftw: 0,
            fop: 0,
            fip: 0,
            fdp: 0,
            st: [[0; 16]; 8],
            mxcsr: 0x1f80,
            xmm: [[0; 16]; 16],
        }
    }
}

/// Events that are part of the architectural state between two instructions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PendingEvents {
    /// Interrupts are blocked for one instruction (after STI or a load of SS).
    pub interrupt_shadow: bool,
    /// An NMI is waiting to be delivered.
    pub nmi_pending: bool,
    /// NMIs are blocked until the next IRET.
    pub nmi_blocked: bool,
    /// The CPU is in the HLT state.
    pub halted: bool,
}

/// A debug exception (#DB) trap that an instruction raised but the CPU has not delivered
/// yet: single step (TF), a data or I/O breakpoint the instruction hit, or the TSS T bit of
/// the task switch it made. Hardware delivers it at the very next instruction boundary,
/// before any interrupt, so a state saved between the two (a checkpoint, `--until`) must
/// carry it or the trap is lost on restore. VMX calls this the "pending debug exceptions"
/// field. Added for issue #3 (trace format 4 carries it; older checkpoints read as none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PendingDebug {
    /// DR6 condition bits (B0-B3, BS, BT) of a #DB trap due at the next instruction
    /// boundary; 0 when none is due.
    pub trap: u64,
    /// DR6 condition bits of a trap held back by a MOV SS / POP SS shadow
    /// ([`PendingEvents::interrupt_shadow`]): they join [`PendingDebug::trap`] once the
    /// instruction after the SS load retires.
    pub after_shadow: u64,
}

impl PendingDebug {
    /// Whether any trap is waiting.
    pub fn any(&self) -> bool {
        self.trap | self.after_shadow != 0
    }
}

/// The PC's legacy x87 error signalling, used while CR0.NE is clear (MS-DOS compatibility
/// mode, SDM vol. 1 appendix D): a waiting x87 instruction that finds an unmasked exception
/// pending asserts the CPU's FERR# output, which the chipset routes to IRQ13, and the CPU
/// waits at that instruction for an interrupt unless its IGNNE# input is asserted; a write
/// to port 0xF0 makes the chipset lower IRQ13 and assert IGNNE# until FERR# goes away (no
/// unmasked exception pending any more). Added for issue #3 (trace format 5 carries it;
/// older checkpoints read as both inactive, which is all their recorders did).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct X87ErrorPins {
    /// FERR# is asserted (IRQ13 was raised for it).
    pub ferr: bool,
    /// IGNNE# is asserted: waiting instructions ignore the pending error.
    pub ignne: bool,
}

/// Engine-independent architectural state of one x86 CPU.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CpuState {
    /// RAX..R15 in encoding order (see [`gpr`]).
    pub gpr: [u64; 16],
    /// Instruction pointer.
    pub rip: u64,
    /// Flags.
    pub rflags: u64,
    /// ES, CS, SS, DS, FS, GS (see [`seg`]).
    pub seg: [Segment; 6],
    /// Task register.
    pub tr: Segment,
    /// Local descriptor table register.
    pub ldtr: Segment,
    /// Global descriptor table register.
    pub gdtr: DescriptorTable,
    /// Interrupt descriptor table register.
    pub idtr: DescriptorTable,
    /// Control register 0.
    pub cr0: u64,
    /// Page-fault linear address.
    pub cr2: u64,
    /// Page-table root.
    pub cr3: u64,
    /// Control register 4.
    pub cr4: u64,
    /// Task priority (CR8).
    pub cr8: u64,
    /// Extended feature enable register.
    pub efer: u64,
    /// Every other MSR the engines keep, by index (ordered, so digests are stable).
    pub msrs: BTreeMap<u32, u64>,
    /// DR0..DR3.
    pub dr: [u64; 4],
    /// DR6.
    pub dr6: u64,
    /// DR7.
    pub dr7: u64,
    /// x87/SSE state.
    pub fpu: FpuState,
    /// Interrupt shadow, NMI, HLT.
    pub pending: PendingEvents,
    /// A #DB trap not delivered yet. Last, so that the encoding of the fields before it is
    /// the one trace formats 1-3 used (their checkpoints decode to "none pending").
    pub pending_debug: PendingDebug,
    /// FERR# and IGNNE# (CR0.NE = 0). Appended for trace format 5, after `pending_debug`.
    pub x87_error_pins: X87ErrorPins,
    /// XCR0, the XSAVE feature mask (XSETBV/XGETBV). Appended in CPU state layout 6; older
    /// checkpoints read as the reset value, x87 only.
    pub xcr0: Xcr0,
}

/// XCR0 (extended control register 0): which state components XSAVE/XRSTOR manage. Bit 0
/// (x87) is always set; deja's CPU supports x87 and SSE ([`Xcr0::SUPPORTED`]). Its default
/// is the reset value, 1, so a state built with `..Default::default()` is a valid one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Xcr0(pub u64);

impl Xcr0 {
    /// State component 0: x87.
    pub const X87: u64 = 1 << 0;
    /// State component 1: SSE (XMM registers and MXCSR).
    pub const SSE: u64 = 1 << 1;
    /// The components deja's CPU supports (CPUID.(EAX=0DH,ECX=0):EAX).
    pub const SUPPORTED: u64 = Self::X87 | Self::SSE;
    /// The value at reset and INIT.
    pub const RESET: Xcr0 = Xcr0(Self::X87);
}

impl Default for Xcr0 {
    fn default() -> Self {
        Self::RESET
    }
}

/// Well-known MSR indices.
pub mod msr {
    #![allow(missing_docs)]
    pub const IA32_TSC: u32 = 0x10;
    pub const IA32_APIC_BASE: u32 = 0x1b;
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_PAT: u32 = 0x277;
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    pub const IA32_BIOS_SIGN_ID: u32 = 0x8b;
    pub const IA32_ARCH_CAPABILITIES: u32 = 0x10a;
    pub const IA32_EFER: u32 = 0xc000_0080;
    pub const IA32_STAR: u32 = 0xc000_0081;
    pub const IA32_LSTAR: u32 = 0xc000_0082;
    pub const IA32_CSTAR: u32 = 0xc000_0083;
    pub const IA32_FMASK: u32 = 0xc000_0084;
    pub const IA32_FS_BASE: u32 = 0xc000_0100;
    pub const IA32_GS_BASE: u32 = 0xc000_0101;
    pub const IA32_KERNEL_GS_BASE: u32 = 0xc000_0102;
    pub const IA32_TSC_AUX: u32 = 0xc000_0103;
    pub const IA32_MCG_CAP: u32 = 0x179;
    pub const IA32_MCG_STATUS: u32 = 0x17a;
    pub const IA32_MCG_CTL: u32 = 0x17b;
    pub const IA32_MC0_CTL: u32 = 0x400;
}

/// deja's machine-check architecture, the same on both engines: QEMU's default (10 banks
/// and IA32_MCG_CTL), no error ever pending (deja injects none). kvm hands it to KVM with
/// `KVM_X86_SETUP_MCE`, whose MSR emulation the bt engine follows.
pub mod mca {
    use super::msr;

    /// Error-reporting banks (MCi_CTL/STATUS/ADDR/MISC at 0x400 + 4i).
    pub const BANKS: u32 = 10;
    /// IA32_MCG_CAP.MCG_CTL_P: IA32_MCG_CTL is present.
    pub const MCG_CTL_P: u64 = 1 << 8;
    /// IA32_MCG_CAP.
    pub const MCG_CAP: u64 = MCG_CTL_P | BANKS as u64;

    /// The machine-check MSRs that hold state (all but the read-only IA32_MCG_CAP), which
    /// [`CpuState::msrs`](super::CpuState::msrs) carries once known: kvm reports them all,
    /// bt those the guest wrote (an absent one has its [`reset_value`]; the reset state
    /// leaves them out, so that older checkpoints keep their layout).
    pub fn state_msrs() -> impl Iterator<Item = u32> {
        [msr::IA32_MCG_STATUS, msr::IA32_MCG_CTL]
            .into_iter()
            .chain(msr::IA32_MC0_CTL..msr::IA32_MC0_CTL + 4 * BANKS)
    }

    /// Whether `index` is a machine-check MSR of this CPU.
    pub fn is_mca_msr(index: u32) -> bool {
        index == msr::IA32_MCG_CAP
            || index == msr::IA32_MCG_STATUS
            || index == msr::IA32_MCG_CTL
            || (msr::IA32_MC0_CTL..msr::IA32_MC0_CTL + 4 * BANKS).contains(&index)
    }

    /// The value after RESET: every error-reporting enable set (IA32_MCG_CTL, MCi_CTL, as
    /// KVM and QEMU leave them), no error logged.
    pub fn reset_value(index: u32) -> u64 {
        match index {
            msr::IA32_MCG_CAP => MCG_CAP,
            msr::IA32_MCG_CTL => !0,
            i if i >= msr::IA32_MC0_CTL && (i - msr::IA32_MC0_CTL).is_multiple_of(4) => !0,
            _ => 0,
        }
    }

    /// Whether WRMSR may write `value` (else #GP(0)): IA32_MCG_CAP is read-only;
    /// IA32_MCG_CTL and MCi_CTL take all 0s or all 1s (KVM also lets bit 10 of MCi_CTL be
    /// clear, for an old Linux workaround on AMD K8); MCi_STATUS takes 0 only (software
    /// clears a logged error; it cannot log one); IA32_MCG_STATUS, MCi_ADDR and MCi_MISC
    /// take any value, as under KVM.
    pub fn write_allowed(index: u32, value: u64) -> bool {
        match index {
            msr::IA32_MCG_CAP => false,
            msr::IA32_MCG_CTL => value == 0 || value == !0,
            msr::IA32_MCG_STATUS => true,
            i => match (i - msr::IA32_MC0_CTL) % 4 {
                0 => value == 0 || value | (1 << 10) == !0,
                1 => value == 0,
                _ => true,
            },
        }
    }
}

impl CpuState {
    /// The state after RESET: real mode, CS:IP = F000:FFF0 with CS base 0xFFFF0000.
    pub fn reset() -> Self {
        let mut s = Self {
            rflags: 0x2,
            cr0: 0x6000_0010,
            rip: 0xfff0,
            gdtr: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            idtr: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            dr6: 0xffff_0ff0,
            dr7: 0x400,
            ..Self::default()
        };
        for (i, sg) in s.seg.iter_mut().enumerate() {
            *sg = Segment::real_mode(0, i == seg::CS);
        }
        s.seg[seg::CS].selector = 0xf000;
        s.seg[seg::CS].base = 0xffff_0000;
        s.ldtr = Segment {
            limit: 0xffff,
            type_: 2,
            present: true,
            ..Segment::default()
        };
        s.tr = Segment {
            limit: 0xffff,
            type_: 0xb,
            present: true,
            ..Segment::default()
        };
        s.gpr[gpr::RDX] = 0x600; // family 6 signature, as QEMU's reset leaves it
        s.msrs.insert(msr::IA32_APIC_BASE, 0xfee0_0900);
        s.msrs.insert(msr::IA32_PAT, 0x0007_0406_0007_0406);
        s
    }

    /// The state an INIT leaves (SDM table 9-1): as [`CpuState::reset`], except that the
    /// x87/SSE state, the MSRs other than EFER (IA32_APIC_BASE included) and the pending
    /// NMI stay as they were. Added for issue #6 (INIT IPIs); engines apply it themselves.
    pub fn after_init(&self) -> CpuState {
        let mut s = CpuState::reset();
        s.fpu = self.fpu.clone();
        s.msrs = self.msrs.clone();
        s.pending.nmi_pending = self.pending.nmi_pending;
        s
    }

    /// Current privilege level (CS.DPL outside real mode; 3 in virtual-8086 mode).
    pub fn cpl(&self) -> u8 {
        if self.cr0 & 1 == 0 {
            0
        } else if self.rflags & (1 << 17) != 0 {
            3
        } else {
            self.seg[seg::CS].dpl
        }
    }

    /// The MSR value, or 0 when the state does not hold it.
    pub fn msr(&self, index: u32) -> u64 {
        match index {
            msr::IA32_EFER => self.efer,
            _ => self.msrs.get(&index).copied().unwrap_or(0),
        }
    }

    /// Lists every field that differs from `other`, as `name: self -> other` lines, for
    /// divergence reports and differential tests.
    pub fn diff(&self, other: &CpuState) -> Vec<String> {
        let mut out = Vec::new();
        let mut cmp = |name: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{name}: {a} -> {b}"));
            }
        };
        for i in 0..16 {
            cmp(
                gpr::NAMES[i],
                format!("{:#x}", self.gpr[i]),
                format!("{:#x}", other.gpr[i]),
            );
        }
        cmp(
            "rip",
            format!("{:#x}", self.rip),
            format!("{:#x}", other.rip),
        );
        cmp(
            "rflags",
            format!("{:#x}", self.rflags),
            format!("{:#x}", other.rflags),
        );
        for i in 0..6 {
            cmp(
                seg::NAMES[i],
                format!("{:x?}", self.seg[i]),
                format!("{:x?}", other.seg[i]),
            );
        }
        cmp("tr", format!("{:x?}", self.tr), format!("{:x?}", other.tr));
        cmp(
            "ldtr",
            format!("{:x?}", self.ldtr),
            format!("{:x?}", other.ldtr),
        );
        cmp(
            "gdtr",
            format!("{:x?}", self.gdtr),
            format!("{:x?}", other.gdtr),
        );
        cmp(
            "idtr",
            format!("{:x?}", self.idtr),
            format!("{:x?}", other.idtr),
        );
        for (name, a, b) in [
            ("cr0", self.cr0, other.cr0),
            ("cr2", self.cr2, other.cr2),
            ("cr3", self.cr3, other.cr3),
            ("cr4", self.cr4, other.cr4),
            ("cr8", self.cr8, other.cr8),
            ("efer", self.efer, other.efer),
            ("dr6", self.dr6, other.dr6),
            ("dr7", self.dr7, other.dr7),
        ] {
            cmp(name, format!("{a:#x}"), format!("{b:#x}"));
        }
        cmp(
            "dr0-3",
            format!("{:x?}", self.dr),
            format!("{:x?}", other.dr),
        );
        cmp(
            "msrs",
            format!("{:x?}", self.msrs),
            format!("{:x?}", other.msrs),
        );
        for i in 0..16 {
            cmp(
                &format!("xmm{i}"),
                format!("{:02x?}", self.fpu.xmm[i]),
                format!("{:02x?}", other.fpu.xmm[i]),
            );
        }
        let (mut fa, mut fb) = (self.fpu.clone(), other.fpu.clone());
        fa.xmm = [[0; 16]; 16];
        fb.xmm = [[0; 16]; 16];
        cmp("x87", format!("{fa:x?}"), format!("{fb:x?}"));
        cmp(
            "pending",
            format!("{:?}", self.pending),
            format!("{:?}", other.pending),
        );
        cmp(
            "pending_debug",
            format!("{:x?}", self.pending_debug),
            format!("{:x?}", other.pending_debug),
        );
        cmp(
            "x87_error_pins",
            format!("{:?}", self.x87_error_pins),
            format!("{:?}", other.x87_error_pins),
        );
        cmp(
            "xcr0",
            format!("{:#x}", self.xcr0.0),
            format!("{:#x}", other.xcr0.0),
        );
        out
    }
}

/// How far one call to [`Cpu::run`] may go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limit {
    /// Stop exactly when the retired-instruction count reaches this value (engines that
    /// count instructions only; others ignore it and stop at their next exit).
    pub stop_at_icount: Option<u64>,
    /// Stop between two elements of a repeated string instruction's exit group once the
    /// device-exit ordinal has reached this value; and when [`Limit::stop_at_icount`] is
    /// reached before it, run the unretired instruction at RIP on to there. A recording
    /// kicked between two elements of a REP INS/OUTS ends at such a position, which the
    /// instruction count alone does not name (the instruction has not retired). Engines that
    /// cannot stop there ignore it.
    pub stop_at_exits: Option<u64>,
}

/// Why [`Cpu::run`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The instruction count reached [`Limit::stop_at_icount`].
    InstructionLimit,
    /// The guest made a device access (port I/O or device MMIO); it has been completed.
    /// Engines return it only at the end of an exit group ([`crate::exit_group`]): the
    /// accesses of a repeated string instruction are counted one by one but returned once,
    /// after the last.
    DeviceAccess,
    /// The guest executed HLT and no interrupt could wake it yet.
    Halted,
    /// A device asked the machine to stop (debug exit, reset, power off); see
    /// [`Machine::stop_request`].
    StopRequested,
    /// The CPU entered shutdown: a triple fault, or an exception it could not deliver.
    Shutdown {
        /// What the engine knows about why.
        reason: String,
    },
    /// [`Kicker::kick`] was called from another thread (timeout, Ctrl-C).
    Kicked,
}

/// Failures of the engine itself (not of the guest).
#[derive(Debug, Error)]
pub enum CpuError {
    /// The host refused an operation (ioctl, mapping).
    #[error("{engine}: {operation} failed: {detail}")]
    Host {
        /// Which engine.
        engine: &'static str,
        /// The operation, e.g. `KVM_RUN`.
        operation: &'static str,
        /// The host's error.
        detail: String,
    },
    /// The engine met something it cannot emulate (e.g. the host's KVM emulator gave up).
    #[error("{engine}: cannot continue at rip {rip:#x}: {detail}")]
    Unsupported {
        /// Which engine.
        engine: &'static str,
        /// Guest RIP when it happened.
        rip: u64,
        /// What could not be done.
        detail: String,
    },
}

/// Counters an engine keeps, by name. Names are dotted: `exit.io`, `bt.blocks_translated`,
/// `mmu.pf_fixed`. A `BTreeMap` so that listings and digests are ordered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineStats {
    /// Counter name to value.
    pub counters: BTreeMap<String, u64>,
}

impl EngineStats {
    /// Adds `n` to a counter, creating it at zero.
    pub fn add(&mut self, name: &str, n: u64) {
        *self.counters.entry(name.to_string()).or_default() += n;
    }

    /// A counter's value, 0 when absent.
    pub fn get(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }

    /// Adds every counter of `other` into `self`.
    pub fn merge(&mut self, other: &EngineStats) {
        for (k, v) in &other.counters {
            self.add(k, *v);
        }
    }
}

/// Interrupts a running [`Cpu::run`] from another thread.
#[derive(Clone, Default)]
pub struct Kicker {
    flag: Arc<AtomicBool>,
    hook: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl Kicker {
    /// A kicker that only raises a flag the engine polls.
    pub fn new() -> Self {
        Self::default()
    }

    /// A kicker that also calls `hook` (e.g. to signal a vCPU thread out of `KVM_RUN`).
    pub fn with_hook(hook: Arc<dyn Fn() + Send + Sync>) -> Self {
        Self {
            flag: Arc::default(),
            hook: Some(hook),
        }
    }

    /// Asks the engine to return [`Exit::Kicked`] as soon as it can.
    pub fn kick(&self) {
        self.flag.store(true, Ordering::SeqCst);
        if let Some(h) = &self.hook {
            h();
        }
    }

    /// Whether a kick is pending; clears it.
    pub fn take(&self) -> bool {
        self.flag.swap(false, Ordering::SeqCst)
    }

    /// The flag itself, for code that polls it without calling [`Kicker::pending`] (bt's
    /// compiled blocks, between chained blocks); valid as long as this kicker lives.
    pub fn flag(&self) -> &AtomicBool {
        &self.flag
    }

    /// Whether a kick is pending, without clearing it. Inlined: bt asks after every block.
    #[inline]
    pub fn pending(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

impl std::fmt::Debug for Kicker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kicker")
            .field("pending", &self.pending())
            .finish()
    }
}

/// One x86 CPU engine (kvm or bt) behind one interface.
///
/// Interrupts are pulled, not pushed: at every boundary where the guest could take an
/// external interrupt, the engine asks [`Machine::interrupt_pending`] and, if it can deliver,
/// takes the vector with [`Machine::acknowledge_interrupt`].
pub trait Cpu: Send {
    /// The engine's short name (`kvm`, `bt`).
    fn name(&self) -> &'static str;
    /// Whether [`Limit::stop_at_icount`] is honoured exactly.
    fn counts_instructions(&self) -> bool;
    /// Runs the guest until an [`Exit`].
    fn run(&mut self, machine: &mut Machine, limit: Limit) -> Result<Exit, CpuError>;
    /// Retired guest instructions so far (0 on engines that cannot count).
    fn icount(&self) -> u64;
    /// The current architectural state.
    fn state(&mut self) -> Result<CpuState, CpuError>;
    /// Replaces the architectural state.
    fn set_state(&mut self, state: &CpuState) -> Result<(), CpuError>;
    /// The engine's counters.
    fn stats(&self) -> EngineStats;
    /// A handle other threads can use to interrupt [`Cpu::run`].
    fn kicker(&self) -> Kicker;
    /// Sets the retired-instruction count, when a snapshot is restored (replay seeking from
    /// a checkpoint). Engines that cannot count ignore it; a counting engine that does not
    /// override it cannot seek, which callers detect by reading [`Cpu::icount`] back.
    fn set_icount(&mut self, _icount: u64) {}
    /// Guest memory was rewritten behind the engine's back (a machine reset re-loading the
    /// image, issue #6): drop whatever was derived from it (bt's translated blocks and
    /// TLBs). Engines that derive nothing from guest memory keep the default.
    fn memory_rewritten(&mut self) {}
    /// Marks in `machine`'s dirty-page bitmap ([`Machine::drain_dirty_pages`]) every page the
    /// guest wrote since the previous call without deja seeing the store (bt's write TLB,
    /// kvm's guest mode), and starts tracking afresh. Returns false when the engine cannot
    /// tell (not supported, or tracking only starts now): the caller must then treat every
    /// page as possibly written. The default cannot tell.
    fn collect_dirty_pages(&mut self, _machine: &Machine) -> bool {
        false
    }
    /// Whether the last run stopped (kicked) inside an instruction at a point its position
    /// does not name: between two elements of a REP string instruction whose elements since
    /// the last device exit touched RAM only. The icount and exit ordinal are those of an
    /// earlier point, so a recording stopped there claims no final state. Engines that stop
    /// only at instruction boundaries or device exits keep the default.
    fn stopped_inside_instruction(&self) -> bool {
        false
    }
    /// Chooses where external interrupts may be delivered. Every engine supports
    /// [`InterruptDelivery::Exact`]; [`InterruptDelivery::AtExits`] (what kvm recording
    /// without a PMU needs, and what replaying such a trace on another engine needs) returns
    /// an error from engines that cannot restrict delivery that way.
    fn set_interrupt_delivery(&mut self, delivery: InterruptDelivery) -> Result<(), CpuError> {
        match delivery {
            InterruptDelivery::Exact => Ok(()),
            InterruptDelivery::AtExits => Err(CpuError::Unsupported {
                engine: self.name(),
                rip: 0,
                detail: "this engine cannot restrict interrupt delivery to device exits".into(),
            }),
        }
    }
    /// Watches guest-physical byte ranges `(start, len)`: from now on every CPU store that
    /// touches one is reported by [`Cpu::take_watch_hits`] with its exact position, so a
    /// replay can name the instruction that corrupted a variable. An empty list stops
    /// watching. Engines that cannot see individual stores (kvm) return an error.
    fn set_watch(&mut self, ranges: &[(u64, u64)]) -> Result<(), CpuError> {
        if ranges.is_empty() {
            return Ok(());
        }
        Err(CpuError::Unsupported {
            engine: self.name(),
            rip: 0,
            detail: "this engine cannot report individual stores; watch on bt".into(),
        })
    }
    /// [`Cpu::set_watch`] for stores into `writes` and, in addition, loads from `reads`
    /// (a debugger's read and access watchpoints): a load touching a range in `reads` is
    /// reported by [`Cpu::take_watch_hits`] as a hit with [`WatchHit::read`] set. Engines
    /// that cannot see individual loads return an error when `reads` is not empty.
    fn set_watch_access(
        &mut self,
        writes: &[(u64, u64)],
        reads: &[(u64, u64)],
    ) -> Result<(), CpuError> {
        if !reads.is_empty() {
            return Err(CpuError::Unsupported {
                engine: self.name(),
                rip: 0,
                detail: "this engine cannot report individual loads; watch reads on bt".into(),
            });
        }
        self.set_watch(writes)
    }
    /// Stops runs before the instruction at any of these linear addresses (a debugger's
    /// breakpoints, kept by the engine and never written into guest memory): [`Cpu::run`]
    /// then returns [`Exit::InstructionLimit`] below the limit, with RIP at the breakpoint;
    /// callers tell the two apart by RIP. The instruction a breakpoint names runs only once
    /// the caller steps it with the breakpoint removed. An empty list removes them all.
    /// Engines that cannot stop at arbitrary instructions (kvm) return an error.
    fn set_breakpoints(&mut self, linear: &[u64]) -> Result<(), CpuError> {
        if linear.is_empty() {
            return Ok(());
        }
        Err(CpuError::Unsupported {
            engine: self.name(),
            rip: 0,
            detail: "this engine cannot stop at breakpoints of its own; debug on bt".into(),
        })
    }
    /// Whether the last run ended at one of [`Cpu::set_breakpoints`]'s addresses (rather than
    /// at its limit or an exit with RIP there by chance: an interrupt due at that boundary
    /// is taken before the instruction, and so before its breakpoint, as on hardware).
    fn stopped_at_breakpoint(&self) -> bool {
        false
    }
    /// The stores into watched ranges (and loads from ranges watched for reads) since the
    /// last call, in execution order.
    fn take_watch_hits(&mut self) -> Vec<WatchHit> {
        Vec::new()
    }
}

/// One CPU store into a watched range (see [`Cpu::set_watch`]), or a load from one watched
/// for reads ([`Cpu::set_watch_access`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchHit {
    /// Instructions retired before the storing instruction: stopping a replay at this
    /// icount shows the machine just before the store, with RIP at the storing instruction.
    pub icount: u64,
    /// RIP of the storing instruction (for stores made while delivering an interrupt or
    /// exception, the RIP the event interrupted).
    pub rip: u64,
    /// Guest-physical address of the first watched byte written.
    pub address: u64,
    /// The watched bytes before the store.
    pub old: Vec<u8>,
    /// The watched bytes after the store.
    pub new: Vec<u8>,
    /// A load from a range watched for reads ([`Cpu::set_watch_access`]), not a store:
    /// `address` is the first watched byte read, and `old` and `new` both hold the bytes
    /// read.
    #[serde(default)]
    pub read: bool,
}

/// Where an engine delivers a pending external interrupt the guest can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InterruptDelivery {
    /// At the first instruction boundary where the guest can take it, as hardware does.
    Exact,
    /// Only when [`Cpu::run`] is entered after a device exit or HLT, with the guest able to
    /// take it: the delivery point is then a device-exit ordinal on every engine, which is
    /// what recording on kvm without a PMU relies on (exit-synchronous delivery).
    AtExits,
}

impl std::fmt::Display for CpuState {
    /// A register dump in the layout kernel developers know from QEMU's `info registers`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for row in 0..4 {
            let line: Vec<String> = (0..4)
                .map(|c| {
                    let i = row * 4 + c;
                    format!("{:>3}={:016x}", gpr::NAMES[i].to_uppercase(), self.gpr[i])
                })
                .collect();
            writeln!(f, "{}", line.join(" "))?;
        }
        writeln!(
            f,
            "RIP={:016x} RFL={:08x} CPL={} {}",
            self.rip,
            self.rflags,
            self.cpl(),
            mode_name(self)
        )?;
        for (i, s) in self.seg.iter().enumerate() {
            writeln!(
                f,
                "{:<3}={:04x} {:016x} {:08x} {:05x}",
                seg::NAMES[i].to_uppercase(),
                s.selector,
                s.base,
                s.limit,
                s.access_rights()
            )?;
        }
        for (name, s) in [("LDT", &self.ldtr), ("TR", &self.tr)] {
            writeln!(
                f,
                "{name:<3}={:04x} {:016x} {:08x} {:05x}",
                s.selector,
                s.base,
                s.limit,
                s.access_rights()
            )?;
        }
        writeln!(
            f,
            "GDT=     {:016x} {:08x}",
            self.gdtr.base, self.gdtr.limit
        )?;
        writeln!(
            f,
            "IDT=     {:016x} {:08x}",
            self.idtr.base, self.idtr.limit
        )?;
        writeln!(
            f,
            "CR0={:08x} CR2={:016x} CR3={:016x} CR4={:08x} CR8={:x}",
            self.cr0, self.cr2, self.cr3, self.cr4, self.cr8
        )?;
        write!(
            f,
            "EFER={:016x} DR6={:x} DR7={:x}",
            self.efer, self.dr6, self.dr7
        )
    }
}

/// The CPU mode as a word: real, vm86, protected16/32, compat, long.
pub fn mode_name(s: &CpuState) -> &'static str {
    let cs = &s.seg[seg::CS];
    if s.cr0 & 1 == 0 {
        "real"
    } else if s.rflags & (1 << 17) != 0 {
        "vm86"
    } else if s.efer & (1 << 10) != 0 && cs.l {
        "long"
    } else if s.efer & (1 << 10) != 0 {
        "compat"
    } else if cs.db {
        "protected32"
    } else {
        "protected16"
    }
}
