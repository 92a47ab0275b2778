//! The CPUID table deja presents: one table, set explicitly on kvm and answered by bt, so a
//! guest sees the same CPU on both engines (and a trace records it).

use serde::{Deserialize, Serialize};

/// One CPUID leaf (and subleaf) with its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// EAX input.
    pub function: u32,
    /// ECX input; only compared when `indexed` is set.
    pub index: u32,
    /// Whether the leaf has subleaves selected by ECX.
    pub indexed: bool,
    /// EAX output.
    pub eax: u32,
    /// EBX output.
    pub ebx: u32,
    /// ECX output.
    pub ecx: u32,
    /// EDX output.
    pub edx: u32,
}

/// Feature bits deja claims, by leaf and register, for engines to consult.
pub mod features {
    #![allow(missing_docs)]
    // Leaf 1 EDX.
    pub const FPU: u32 = 1 << 0;
    pub const VME: u32 = 1 << 1;
    pub const DE: u32 = 1 << 2;
    pub const PSE: u32 = 1 << 3;
    pub const TSC: u32 = 1 << 4;
    pub const MSR: u32 = 1 << 5;
    pub const PAE: u32 = 1 << 6;
    pub const MCE: u32 = 1 << 7;
    pub const CX8: u32 = 1 << 8;
    pub const APIC: u32 = 1 << 9;
    pub const SEP: u32 = 1 << 11;
    pub const PGE: u32 = 1 << 13;
    pub const MCA: u32 = 1 << 14;
    pub const CMOV: u32 = 1 << 15;
    pub const PAT: u32 = 1 << 16;
    pub const PSE36: u32 = 1 << 17;
    pub const CLFSH: u32 = 1 << 19;
    pub const MMX: u32 = 1 << 23;
    pub const FXSR: u32 = 1 << 24;
    pub const SSE: u32 = 1 << 25;
    pub const SSE2: u32 = 1 << 26;
    // Leaf 1 ECX.
    pub const SSE3: u32 = 1 << 0;
    pub const PCID: u32 = 1 << 17;
    pub const SSSE3: u32 = 1 << 9;
    pub const CX16: u32 = 1 << 13;
    pub const SSE4_1: u32 = 1 << 19;
    pub const SSE4_2: u32 = 1 << 20;
    pub const X2APIC: u32 = 1 << 21;
    pub const MOVBE: u32 = 1 << 22;
    pub const POPCNT: u32 = 1 << 23;
    pub const TSC_DEADLINE: u32 = 1 << 24;
    pub const XSAVE: u32 = 1 << 26;
    /// Not in the table: the CPU reports CR4.OSXSAVE here.
    pub const OSXSAVE: u32 = 1 << 27;
    pub const RDRAND: u32 = 1 << 30;
    pub const HYPERVISOR: u32 = 1 << 31;
    // Leaf 7 EBX.
    pub const FSGSBASE: u32 = 1 << 0;
    pub const BMI1: u32 = 1 << 3;
    pub const SMEP: u32 = 1 << 7;
    pub const INVPCID: u32 = 1 << 10;
    pub const SMAP: u32 = 1 << 20;
    pub const CLFLUSHOPT: u32 = 1 << 23;
    pub const CLWB: u32 = 1 << 24;
    // Leaf 7 ECX.
    pub const UMIP: u32 = 1 << 2;
    pub const PKU: u32 = 1 << 3;
    pub const LA57: u32 = 1 << 16;
    // Leaf 0xD, subleaf 1, EAX.
    pub const XSAVEOPT: u32 = 1 << 0;
    pub const XSAVEC: u32 = 1 << 1;
    pub const XGETBV_ECX1: u32 = 1 << 2;
    pub const XSAVES: u32 = 1 << 3;
    // Leaf 7 EDX.
    pub const ARCH_CAPABILITIES: u32 = 1 << 29;
    // Leaf 0x8000_0001 ECX.
    pub const LAHF_LM: u32 = 1 << 0;
    pub const ABM: u32 = 1 << 5;
    // Leaf 0x8000_0001 EDX.
    pub const SYSCALL: u32 = 1 << 11;
    pub const NX: u32 = 1 << 20;
    pub const PAGE1GB: u32 = 1 << 26;
    pub const RDTSCP: u32 = 1 << 27;
    pub const LM: u32 = 1 << 29;
}

/// One leaf whose answer a guest saw differs from the table's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuidDifference {
    /// EAX input.
    pub function: u32,
    /// ECX input.
    pub index: u32,
    /// EAX..EDX as the table answers.
    pub table: [u32; 4],
    /// EAX..EDX as the guest saw them.
    pub seen: [u32; 4],
}

impl std::fmt::Display for CpuidDifference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "leaf {:#x}.{}:", self.function, self.index)?;
        for (i, name) in ["eax", "ebx", "ecx", "edx"].iter().enumerate() {
            if self.table[i] != self.seen[i] {
                write!(
                    f,
                    " {name} {:08x} (table {:08x})",
                    self.seen[i], self.table[i]
                )?;
            }
        }
        Ok(())
    }
}

/// The whole table.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CpuidTable {
    /// Entries; lookups take the first match.
    pub entries: Vec<CpuidEntry>,
}

fn regs_of(text: &[u8; 12]) -> [u32; 3] {
    let w = |i: usize| u32::from_le_bytes([text[i], text[i + 1], text[i + 2], text[i + 3]]);
    [w(0), w(4), w(8)]
}

impl CpuidTable {
    /// deja's CPU: a GenuineIntel family-6 part with what the bt engine implements.
    pub fn deja_default() -> Self {
        use features::*;
        let leaf = |function, eax, ebx, ecx, edx| CpuidEntry {
            function,
            index: 0,
            indexed: false,
            eax,
            ebx,
            ecx,
            edx,
        };
        let vendor = regs_of(b"GenuineIntel");
        let hv = regs_of(b"DejaVMDejaVM");
        let mut entries = vec![
            // Max basic leaf 0xd; vendor in EBX, EDX, ECX order.
            leaf(0, 0xd, vendor[0], vendor[2], vendor[1]),
            leaf(
                1,
                0x0003_06a9,
                // CLFLUSH line 8 qwords, 1 logical processor, APIC ID 0.
                0x0001_0800,
                // X2APIC and TSC_DEADLINE are deja's local APIC's (bt answers their MSRs;
                // kvm forwards them and clears both bits on hosts that cannot). The TSC
                // the deadline compares with is each engine's RDTSC: guest nanoseconds
                // (1 GHz) on bt, the host TSC at KVM's TSC frequency on kvm. SSE3 to SSE4.2,
                // POPCNT, CX16 (and LAHF_LM below) make the x86-64-v2 level. XSAVE manages
                // the x87 and SSE components (leaf 0xd); OSXSAVE is the CPU's to report.
                SSE3 | SSSE3
                    | SSE4_1
                    | SSE4_2
                    | CX16
                    | X2APIC
                    | MOVBE
                    | POPCNT
                    | TSC_DEADLINE
                    | XSAVE
                    | RDRAND
                    | HYPERVISOR,
                FPU | DE
                    | PSE
                    | TSC
                    | MSR
                    | PAE
                    | MCE
                    | CX8
                    | APIC
                    | SEP
                    | PGE
                    | MCA
                    | CMOV
                    | PAT
                    | PSE36
                    | CLFSH
                    | MMX
                    | FXSR
                    | SSE
                    | SSE2,
            ),
            CpuidEntry {
                indexed: true,
                // IA32_ARCH_CAPABILITIES says what deja's CPU is not vulnerable to, so a
                // kernel does not turn on mitigations a translator does not need.
                ..leaf(
                    7,
                    0,
                    SMEP | SMAP | CLFLUSHOPT | CLWB,
                    UMIP,
                    ARCH_CAPABILITIES,
                )
            },
            // XSAVE: components x87 and SSE (XCR0 may set bits 1:0), 576 bytes (the
            // 512-byte legacy region and the 64-byte header) for what XCR0 enables and for
            // all of them; subleaf 1: XSAVEOPT only (no XSAVEC, XGETBV with ECX = 1, XSAVES).
            CpuidEntry {
                indexed: true,
                ..leaf(0xd, 0x3, 576, 576, 0)
            },
            CpuidEntry {
                index: 1,
                indexed: true,
                ..leaf(0xd, XSAVEOPT, 0, 0, 0)
            },
            leaf(0x4000_0000, 0x4000_0000, hv[0], hv[1], hv[2]),
            leaf(0x8000_0000, 0x8000_0008, 0, 0, 0),
            leaf(
                0x8000_0001,
                0,
                0,
                LAHF_LM | ABM,
                SYSCALL | NX | PAGE1GB | RDTSCP | LM,
            ),
            leaf(0x8000_0007, 0, 0, 0, 1 << 8),
            // 40 physical address bits, 48 linear.
            leaf(0x8000_0008, 0x3028, 0, 0, 0),
        ];
        let brand = *b"deja virtual x86 CPU (bt and kvm)\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
        for (i, chunk) in brand.chunks(16).enumerate() {
            let w =
                |j: usize| u32::from_le_bytes([chunk[j], chunk[j + 1], chunk[j + 2], chunk[j + 3]]);
            entries.push(leaf(0x8000_0002 + i as u32, w(0), w(4), w(8), w(12)));
        }
        entries.sort_by_key(|e| (e.function, e.index));
        Self { entries }
    }

    fn find(&self, function: u32, index: u32) -> Option<&CpuidEntry> {
        self.entries
            .iter()
            .find(|e| e.function == function && (!e.indexed || e.index == index))
    }

    /// Answers CPUID as an Intel CPU does: leaves above the maximum of their range return
    /// the highest basic leaf; absent leaves inside the range return zeros.
    pub fn lookup(&self, function: u32, index: u32) -> [u32; 4] {
        let max_of = |base: u32| self.find(base, 0).map(|e| e.eax).unwrap_or(0);
        let in_range = match function {
            0x8000_0000.. => function <= max_of(0x8000_0000),
            0x4000_0000.. => function <= max_of(0x4000_0000),
            _ => function <= max_of(0),
        };
        let function = if in_range { function } else { max_of(0) };
        self.find(function, index)
            .map(|e| [e.eax, e.ebx, e.ecx, e.edx])
            .unwrap_or([0; 4])
    }

    /// The leaves (function, subleaf) a probe of the guest-visible CPUID asks: every entry
    /// of the table, and the basic leaves up to 0xd (XSAVE, subleaves 0 and 1), which hosts
    /// answer themselves on some hypervisors although this table stops below them.
    pub fn probe_leaves(&self) -> Vec<(u32, u32)> {
        let mut leaves: Vec<(u32, u32)> =
            self.entries.iter().map(|e| (e.function, e.index)).collect();
        leaves.extend((1..=0xd).map(|f| (f, 0)));
        leaves.push((0xd, 1));
        leaves.sort_unstable();
        leaves.dedup();
        leaves
    }

    /// Where answers a guest saw (`seen`, one entry per leaf asked) differ from this
    /// table's.
    pub fn differences(&self, seen: &[CpuidEntry]) -> Vec<CpuidDifference> {
        seen.iter()
            .filter_map(|e| {
                let table = self.lookup(e.function, e.index);
                let seen = [e.eax, e.ebx, e.ecx, e.edx];
                (table != seen).then_some(CpuidDifference {
                    function: e.function,
                    index: e.index,
                    table,
                    seen,
                })
            })
            .collect()
    }

    /// Whether a feature bit is set in a leaf's register (0 = EAX .. 3 = EDX).
    pub fn has(&self, function: u32, register: usize, bit: u32) -> bool {
        self.lookup(function, 0)[register] & bit != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_and_long_mode_are_reported() {
        let t = CpuidTable::deja_default();
        let [max, b, c, d] = t.lookup(0, 0);
        assert_eq!(max, 0xd);
        let mut v = Vec::new();
        for r in [b, d, c] {
            v.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&v, b"GenuineIntel");
        assert!(t.has(0x8000_0001, 3, features::LM));
        assert!(t.has(1, 3, features::SSE2));
    }

    #[test]
    fn out_of_range_leaves_follow_intel_rules() {
        let t = CpuidTable::deja_default();
        assert_eq!(t.lookup(0x50, 0), t.lookup(0xd, 0));
        assert_eq!(t.lookup(0x8000_0009, 0), t.lookup(0xd, 0));
        assert_eq!(t.lookup(5, 0), [0; 4]);
        assert_eq!(t.lookup(7, 1), [0; 4]);
    }

    #[test]
    fn brand_string_reads_back() {
        let t = CpuidTable::deja_default();
        let mut s = Vec::new();
        for f in 0x8000_0002..=0x8000_0004u32 {
            for r in t.lookup(f, 0) {
                s.extend_from_slice(&r.to_le_bytes());
            }
        }
        assert!(s.starts_with(b"deja virtual x86 CPU"));
    }
}
