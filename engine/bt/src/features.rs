//! The instruction-set features the translator accepts, read from the machine's CPUID table.
//!
//! Why from the table and not from a list of its own: the CPUID table is what the guest is
//! told, and a CPU raises #UD for an instruction whose feature bit it does not report. One
//! source keeps the two from drifting apart (issue #15): a feature becomes usable on bt by
//! setting its bit in [`deja_machine::CpuidTable::deja_default`], and a machine built with a
//! smaller table (an older CPU model, a test) gets #UD for what it leaves out.
//!
//! Each iced-x86 [`CpuidFeature`] that names a CPUID bit deja can report is mapped to that
//! bit ([`location`]); an instruction is accepted only when every such feature it needs is
//! set. Features with no CPUID bit (the 8086..486 base set, PAUSE, multi-byte NOP and the
//! like) are not gated here: whether the translator implements them is its own business.

use deja_machine::Machine;
use deja_machine::cpuid::features as bit;
use iced_x86::{CpuidFeature, Instruction, Mnemonic};

/// Where a feature's bit lives: leaf, subleaf, register (0 = EAX .. 3 = EDX), mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// CPUID function (EAX input).
    pub leaf: u32,
    /// CPUID subleaf (ECX input): 0 but for the XSAVE variants (leaf 0xd, subleaf 1).
    pub subleaf: u32,
    /// Output register, 0 = EAX .. 3 = EDX.
    pub reg: usize,
    /// The feature's bit.
    pub mask: u32,
}

const fn at(leaf: u32, reg: usize, mask: u32) -> Option<Location> {
    Some(Location {
        leaf,
        subleaf: 0,
        reg,
        mask,
    })
}

const fn at_sub(leaf: u32, subleaf: u32, reg: usize, mask: u32) -> Option<Location> {
    Some(Location {
        leaf,
        subleaf,
        reg,
        mask,
    })
}

/// The CPUID bit that enumerates `f`, for the features whose instructions bt can run (or
/// that a guest might try and must then see #UD for); `None` for features enumerated some
/// other way (processor generation, no bit at all).
pub fn location(f: CpuidFeature) -> Option<Location> {
    use CpuidFeature as F;
    const L1: u32 = 1;
    const L7: u32 = 7;
    const E1: u32 = 0x8000_0001;
    const ECX: usize = 2;
    const EDX: usize = 3;
    const EBX: usize = 1;
    const EAX: usize = 0;
    match f {
        F::FPU | F::FPU287 | F::FPU387 => at(L1, EDX, bit::FPU),
        F::TSC => at(L1, EDX, bit::TSC),
        F::MSR => at(L1, EDX, bit::MSR),
        F::CX8 => at(L1, EDX, bit::CX8),
        F::SEP => at(L1, EDX, bit::SEP),
        F::CMOV => at(L1, EDX, bit::CMOV),
        F::CLFSH => at(L1, EDX, bit::CLFSH),
        F::MMX => at(L1, EDX, bit::MMX),
        F::FXSR => at(L1, EDX, bit::FXSR),
        F::SSE => at(L1, EDX, bit::SSE),
        F::SSE2 => at(L1, EDX, bit::SSE2),
        F::SSE3 => at(L1, ECX, bit::SSE3),
        F::PCLMULQDQ => at(L1, ECX, 1 << 1),
        F::MONITOR => at(L1, ECX, 1 << 3),
        F::SSSE3 => at(L1, ECX, bit::SSSE3),
        F::FMA => at(L1, ECX, 1 << 12),
        F::CMPXCHG16B => at(L1, ECX, bit::CX16),
        F::SSE4_1 => at(L1, ECX, bit::SSE4_1),
        F::SSE4_2 => at(L1, ECX, bit::SSE4_2),
        F::MOVBE => at(L1, ECX, bit::MOVBE),
        F::POPCNT => at(L1, ECX, bit::POPCNT),
        F::AES => at(L1, ECX, 1 << 25),
        F::XSAVE => at(L1, ECX, bit::XSAVE),
        F::XSAVEOPT => at_sub(0xd, 1, EAX, bit::XSAVEOPT),
        F::XSAVEC => at_sub(0xd, 1, EAX, bit::XSAVEC),
        F::XSAVES => at_sub(0xd, 1, EAX, bit::XSAVES),
        F::AVX => at(L1, ECX, 1 << 28),
        F::F16C => at(L1, ECX, 1 << 29),
        F::RDRAND => at(L1, ECX, bit::RDRAND),
        F::FSGSBASE => at(L7, EBX, 1),
        F::BMI1 => at(L7, EBX, 1 << 3),
        F::AVX2 => at(L7, EBX, 1 << 5),
        F::BMI2 => at(L7, EBX, 1 << 8),
        F::INVPCID => at(L7, EBX, bit::INVPCID),
        F::RDSEED => at(L7, EBX, 1 << 18),
        F::ADX => at(L7, EBX, 1 << 19),
        F::SMAP => at(L7, EBX, bit::SMAP),
        F::CLFLUSHOPT => at(L7, EBX, bit::CLFLUSHOPT),
        F::CLWB => at(L7, EBX, bit::CLWB),
        F::SHA => at(L7, EBX, 1 << 29),
        F::PKU => at(L7, ECX, 1 << 3),
        F::RDPID => at(L7, ECX, 1 << 22),
        F::LZCNT => at(E1, ECX, bit::ABM),
        F::SSE4A => at(E1, ECX, 1 << 6),
        F::SYSCALL => at(E1, EDX, bit::SYSCALL),
        F::RDTSCP => at(E1, EDX, bit::RDTSCP),
        F::X64 => at(E1, EDX, bit::LM),
        _ => None,
    }
}

/// The features a machine's CPUID table reports, as a set of iced-x86 features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// Bit `f as usize` set when feature `f` is reported (or has no CPUID bit).
    set: [u64; 4],
    /// CPUID.80000001H:ECX.LAHF_LM: LAHF/SAHF in 64-bit mode.
    lahf_lm: bool,
}

impl Features {
    /// The features `cpuid(leaf, subleaf)` reports (a [`Machine::cpuid`] or a table's
    /// `lookup`).
    pub fn from_cpuid(cpuid: impl Fn(u32, u32) -> [u32; 4]) -> Self {
        let mut set = [0u64; 4];
        let mut leaves: Vec<((u32, u32), [u32; 4])> = Vec::with_capacity(4);
        for f in CpuidFeature::values() {
            let on = match location(f) {
                None => true,
                Some(l) => {
                    let key = (l.leaf, l.subleaf);
                    let regs = match leaves.iter().find(|(k, _)| *k == key) {
                        Some((_, r)) => *r,
                        None => {
                            let r = cpuid(l.leaf, l.subleaf);
                            leaves.push((key, r));
                            r
                        }
                    };
                    regs[l.reg] & l.mask != 0
                }
            };
            let i = f as usize;
            if on && i < 256 {
                set[i / 64] |= 1 << (i % 64);
            }
        }
        let lahf_lm = cpuid(0x8000_0001, 0)[2] & bit::LAHF_LM != 0;
        Self { set, lahf_lm }
    }

    /// What the guest of `machine` is told now.
    pub fn of(machine: &Machine) -> Self {
        Self::from_cpuid(|leaf, subleaf| machine.cpuid(leaf, subleaf))
    }

    /// Whether feature `f` is reported (features without a CPUID bit always are).
    pub fn has(&self, f: CpuidFeature) -> bool {
        let i = f as usize;
        i < 256 && self.set[i / 64] & (1 << (i % 64)) != 0
    }

    /// Whether a CPU reporting these features decodes `insn` in `bitness`-bit code rather
    /// than raising #UD: every CPUID-enumerated feature it needs is reported (and LAHF/SAHF
    /// in 64-bit mode need LAHF_LM).
    pub fn accepts(&self, insn: &Instruction, bitness: u32) -> bool {
        if bitness == 64
            && matches!(insn.mnemonic(), Mnemonic::Lahf | Mnemonic::Sahf)
            && !self.lahf_lm
        {
            return false;
        }
        insn.cpuid_features().iter().all(|&f| self.has(f))
    }

    /// Whether every feature `insn` needs has a CPUID bit and is reported: the test for the
    /// instructions run on the host ([`crate::native`]), which must never run anything the
    /// guest was not promised.
    pub fn enumerated(&self, insn: &Instruction) -> bool {
        let f = insn.cpuid_features();
        !f.is_empty() && f.iter().all(|&f| location(f).is_some() && self.has(f))
    }
}

impl Default for Features {
    /// The features of deja's default CPU.
    fn default() -> Self {
        let t = deja_machine::CpuidTable::deja_default();
        Self::from_cpuid(|leaf, subleaf| t.lookup(leaf, subleaf))
    }
}
