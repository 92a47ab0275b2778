//! deja's register file as gdb sees it: one fixed 64-bit layout in every CPU mode.
//!
//! gdb picks a register layout once, from the target description, and refuses a `g` packet
//! of another size ("g packet too long"); a stub that switched between i386 and x86-64
//! layouts as the guest moves from real to long mode would lose gdb at the switch. This
//! description is gdb's own `i386:x86-64` core and SSE features plus the segment-base
//! feature gdb knows (`fs_base`, `gs_base`) and a deja feature with the system registers a
//! kernel developer reads (`k_gs_base`, control registers, EFER, the other segment bases).

use deja_machine::CpuState;
use deja_machine::cpu::{gpr, msr, seg};
use gdbstub::arch::{Arch, Registers};

/// The architecture gdbstub serves: x86-64 with deja's description.
pub enum DejaX86 {}

impl Arch for DejaX86 {
    type Usize = u64;
    type Registers = DejaRegs;
    type BreakpointKind = usize;
    type RegId = ();

    fn target_description_xml() -> Option<&'static str> {
        Some(TARGET_XML)
    }
}

/// CpuState's GPR indices in gdb's order (rax rbx rcx rdx rsi rdi rbp rsp r8..r15).
const GDB_GPR_ORDER: [usize; 16] = [
    gpr::RAX,
    gpr::RBX,
    gpr::RCX,
    gpr::RDX,
    gpr::RSI,
    gpr::RDI,
    gpr::RBP,
    gpr::RSP,
    8,
    9,
    10,
    11,
    12,
    13,
    14,
    15,
];

/// The segment registers in gdb's order (cs ss ds es fs gs).
const GDB_SEG_ORDER: [usize; 6] = [seg::CS, seg::SS, seg::DS, seg::ES, seg::FS, seg::GS];

/// System registers of the deja feature, in its order.
pub const SYSTEM_REGS: [&str; 11] = [
    "k_gs_base",
    "cr0",
    "cr2",
    "cr3",
    "cr4",
    "cr8",
    "efer",
    "es_base",
    "cs_base",
    "ss_base",
    "ds_base",
];

/// The registers of one stop, in the description's order.
#[derive(Debug, Clone, PartialEq)]
pub struct DejaRegs {
    /// rax rbx rcx rdx rsi rdi rbp rsp r8..r15.
    pub gpr: [u64; 16],
    /// RIP.
    pub rip: u64,
    /// EFLAGS (gdb's register is 32 bits).
    pub eflags: u32,
    /// cs ss ds es fs gs selectors.
    pub seg: [u32; 6],
    /// ST(0)..ST(7), 80 bits each.
    pub st: [[u8; 10]; 8],
    /// fctrl fstat ftag fiseg fioff foseg fooff fop.
    pub fpu: [u32; 8],
    /// XMM0..XMM15.
    pub xmm: [[u8; 16]; 16],
    /// MXCSR.
    pub mxcsr: u32,
    /// FS and GS bases.
    pub fs_base: u64,
    /// GS base.
    pub gs_base: u64,
    /// [`SYSTEM_REGS`].
    pub system: [u64; 11],
}

impl Default for DejaRegs {
    fn default() -> Self {
        Self::from_state(&CpuState::default())
    }
}

/// The full x87 tag word from FXSAVE's abridged one: an empty register is 11, any other
/// is reported valid (00), as gdb only tells empty from not.
fn full_tag_word(abridged: u8) -> u32 {
    (0..8).fold(0, |t, i| {
        if abridged & (1 << i) == 0 {
            t | 3 << (2 * i)
        } else {
            t
        }
    })
}

impl DejaRegs {
    /// The registers of `s`.
    pub fn from_state(s: &CpuState) -> Self {
        let mut st = [[0u8; 10]; 8];
        for (d, r) in st.iter_mut().zip(&s.fpu.st) {
            d.copy_from_slice(&r[..10]);
        }
        Self {
            gpr: GDB_GPR_ORDER.map(|i| s.gpr[i]),
            rip: s.rip,
            eflags: s.rflags as u32,
            seg: GDB_SEG_ORDER.map(|i| u32::from(s.seg[i].selector)),
            st,
            fpu: [
                u32::from(s.fpu.fcw),
                u32::from(s.fpu.fsw),
                full_tag_word(s.fpu.ftw),
                0,
                s.fpu.fip as u32,
                0,
                s.fpu.fdp as u32,
                u32::from(s.fpu.fop),
            ],
            xmm: s.fpu.xmm,
            mxcsr: s.fpu.mxcsr,
            fs_base: s.seg[seg::FS].base,
            gs_base: s.seg[seg::GS].base,
            system: [
                s.msr(msr::IA32_KERNEL_GS_BASE),
                s.cr0,
                s.cr2,
                s.cr3,
                s.cr4,
                s.cr8,
                s.efer,
                s.seg[seg::ES].base,
                s.seg[seg::CS].base,
                s.seg[seg::SS].base,
                s.seg[seg::DS].base,
            ],
        }
    }

    /// The `g` packet's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(G_PACKET_BYTES);
        for r in self.gpr {
            b.extend_from_slice(&r.to_le_bytes());
        }
        b.extend_from_slice(&self.rip.to_le_bytes());
        b.extend_from_slice(&self.eflags.to_le_bytes());
        for r in self.seg {
            b.extend_from_slice(&r.to_le_bytes());
        }
        for r in &self.st {
            b.extend_from_slice(r);
        }
        for r in self.fpu {
            b.extend_from_slice(&r.to_le_bytes());
        }
        for r in &self.xmm {
            b.extend_from_slice(r);
        }
        b.extend_from_slice(&self.mxcsr.to_le_bytes());
        b.extend_from_slice(&self.fs_base.to_le_bytes());
        b.extend_from_slice(&self.gs_base.to_le_bytes());
        for r in self.system {
            b.extend_from_slice(&r.to_le_bytes());
        }
        b
    }
}

/// Bytes in a `g` packet: 16 GPRs, RIP, EFLAGS, 6 selectors, 8 x87 registers, 8 x87
/// control registers, 16 XMM registers, MXCSR, FS/GS bases, 11 system registers.
pub const G_PACKET_BYTES: usize =
    16 * 8 + 8 + 4 + 6 * 4 + 8 * 10 + 8 * 4 + 16 * 16 + 4 + 16 + 11 * 8;

impl Registers for DejaRegs {
    type ProgramCounter = u64;

    fn pc(&self) -> u64 {
        self.rip
    }

    fn gdb_serialize(&self, mut write_byte: impl FnMut(Option<u8>)) {
        for b in self.bytes() {
            write_byte(Some(b));
        }
    }

    fn gdb_deserialize(&mut self, _bytes: &[u8]) -> Result<(), ()> {
        // Whatever gdb sends, the target refuses to write it (a replay cannot change
        // state); an error here would end the whole session instead.
        Ok(())
    }
}

/// The target description: gdb's i386:x86-64 core and SSE features, its segment-base
/// feature, and deja's system registers.
pub const TARGET_XML: &str = r#"<?xml version="1.0"?>
<!DOCTYPE target SYSTEM "gdb-target.dtd">
<target version="1.0">
<architecture>i386:x86-64</architecture>
<feature name="org.gnu.gdb.i386.core">
  <flags id="i386_eflags" size="4">
    <field name="CF" start="0" end="0"/>
    <field name="" start="1" end="1"/>
    <field name="PF" start="2" end="2"/>
    <field name="AF" start="4" end="4"/>
    <field name="ZF" start="6" end="6"/>
    <field name="SF" start="7" end="7"/>
    <field name="TF" start="8" end="8"/>
    <field name="IF" start="9" end="9"/>
    <field name="DF" start="10" end="10"/>
    <field name="OF" start="11" end="11"/>
    <field name="NT" start="14" end="14"/>
    <field name="RF" start="16" end="16"/>
    <field name="VM" start="17" end="17"/>
    <field name="AC" start="18" end="18"/>
    <field name="VIF" start="19" end="19"/>
    <field name="VIP" start="20" end="20"/>
    <field name="ID" start="21" end="21"/>
  </flags>
  <reg name="rax" bitsize="64" type="int64"/>
  <reg name="rbx" bitsize="64" type="int64"/>
  <reg name="rcx" bitsize="64" type="int64"/>
  <reg name="rdx" bitsize="64" type="int64"/>
  <reg name="rsi" bitsize="64" type="int64"/>
  <reg name="rdi" bitsize="64" type="int64"/>
  <reg name="rbp" bitsize="64" type="data_ptr"/>
  <reg name="rsp" bitsize="64" type="data_ptr"/>
  <reg name="r8" bitsize="64" type="int64"/>
  <reg name="r9" bitsize="64" type="int64"/>
  <reg name="r10" bitsize="64" type="int64"/>
  <reg name="r11" bitsize="64" type="int64"/>
  <reg name="r12" bitsize="64" type="int64"/>
  <reg name="r13" bitsize="64" type="int64"/>
  <reg name="r14" bitsize="64" type="int64"/>
  <reg name="r15" bitsize="64" type="int64"/>
  <reg name="rip" bitsize="64" type="code_ptr"/>
  <reg name="eflags" bitsize="32" type="i386_eflags"/>
  <reg name="cs" bitsize="32" type="int32"/>
  <reg name="ss" bitsize="32" type="int32"/>
  <reg name="ds" bitsize="32" type="int32"/>
  <reg name="es" bitsize="32" type="int32"/>
  <reg name="fs" bitsize="32" type="int32"/>
  <reg name="gs" bitsize="32" type="int32"/>
  <reg name="st0" bitsize="80" type="i387_ext"/>
  <reg name="st1" bitsize="80" type="i387_ext"/>
  <reg name="st2" bitsize="80" type="i387_ext"/>
  <reg name="st3" bitsize="80" type="i387_ext"/>
  <reg name="st4" bitsize="80" type="i387_ext"/>
  <reg name="st5" bitsize="80" type="i387_ext"/>
  <reg name="st6" bitsize="80" type="i387_ext"/>
  <reg name="st7" bitsize="80" type="i387_ext"/>
  <reg name="fctrl" bitsize="32" type="int" group="float"/>
  <reg name="fstat" bitsize="32" type="int" group="float"/>
  <reg name="ftag" bitsize="32" type="int" group="float"/>
  <reg name="fiseg" bitsize="32" type="int" group="float"/>
  <reg name="fioff" bitsize="32" type="int" group="float"/>
  <reg name="foseg" bitsize="32" type="int" group="float"/>
  <reg name="fooff" bitsize="32" type="int" group="float"/>
  <reg name="fop" bitsize="32" type="int" group="float"/>
</feature>
<feature name="org.gnu.gdb.i386.sse">
  <vector id="v4f" type="ieee_single" count="4"/>
  <vector id="v2d" type="ieee_double" count="2"/>
  <vector id="v16i8" type="int8" count="16"/>
  <vector id="v8i16" type="int16" count="8"/>
  <vector id="v4i32" type="int32" count="4"/>
  <vector id="v2i64" type="int64" count="2"/>
  <union id="vec128">
    <field name="v4_float" type="v4f"/>
    <field name="v2_double" type="v2d"/>
    <field name="v16_int8" type="v16i8"/>
    <field name="v8_int16" type="v8i16"/>
    <field name="v4_int32" type="v4i32"/>
    <field name="v2_int64" type="v2i64"/>
    <field name="uint128" type="uint128"/>
  </union>
  <flags id="i386_mxcsr" size="4">
    <field name="IE" start="0" end="0"/>
    <field name="DE" start="1" end="1"/>
    <field name="ZE" start="2" end="2"/>
    <field name="OE" start="3" end="3"/>
    <field name="UE" start="4" end="4"/>
    <field name="PE" start="5" end="5"/>
    <field name="DAZ" start="6" end="6"/>
    <field name="IM" start="7" end="7"/>
    <field name="DM" start="8" end="8"/>
    <field name="ZM" start="9" end="9"/>
    <field name="OM" start="10" end="10"/>
    <field name="UM" start="11" end="11"/>
    <field name="PM" start="12" end="12"/>
    <field name="FZ" start="15" end="15"/>
  </flags>
  <reg name="xmm0" bitsize="128" type="vec128"/>
  <reg name="xmm1" bitsize="128" type="vec128"/>
  <reg name="xmm2" bitsize="128" type="vec128"/>
  <reg name="xmm3" bitsize="128" type="vec128"/>
  <reg name="xmm4" bitsize="128" type="vec128"/>
  <reg name="xmm5" bitsize="128" type="vec128"/>
  <reg name="xmm6" bitsize="128" type="vec128"/>
  <reg name="xmm7" bitsize="128" type="vec128"/>
  <reg name="xmm8" bitsize="128" type="vec128"/>
  <reg name="xmm9" bitsize="128" type="vec128"/>
  <reg name="xmm10" bitsize="128" type="vec128"/>
  <reg name="xmm11" bitsize="128" type="vec128"/>
  <reg name="xmm12" bitsize="128" type="vec128"/>
  <reg name="xmm13" bitsize="128" type="vec128"/>
  <reg name="xmm14" bitsize="128" type="vec128"/>
  <reg name="xmm15" bitsize="128" type="vec128"/>
  <reg name="mxcsr" bitsize="32" type="i386_mxcsr" group="vector"/>
</feature>
<feature name="org.gnu.gdb.i386.segments">
  <reg name="fs_base" bitsize="64" type="int"/>
  <reg name="gs_base" bitsize="64" type="int"/>
</feature>
<feature name="org.deja.x86.system">
  <reg name="k_gs_base" bitsize="64" type="int" group="system"/>
  <reg name="cr0" bitsize="64" type="int" group="system"/>
  <reg name="cr2" bitsize="64" type="int" group="system"/>
  <reg name="cr3" bitsize="64" type="int" group="system"/>
  <reg name="cr4" bitsize="64" type="int" group="system"/>
  <reg name="cr8" bitsize="64" type="int" group="system"/>
  <reg name="efer" bitsize="64" type="int" group="system"/>
  <reg name="es_base" bitsize="64" type="int" group="system"/>
  <reg name="cs_base" bitsize="64" type="int" group="system"/>
  <reg name="ss_base" bitsize="64" type="int" group="system"/>
  <reg name="ds_base" bitsize="64" type="int" group="system"/>
</feature>
</target>
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_g_packet_has_one_size_in_every_mode() {
        let real = CpuState::reset();
        let mut long = CpuState::reset();
        long.efer = 0x500;
        long.cr0 = 0x8000_0011;
        long.seg[seg::CS].l = true;
        long.rip = 0xffff_ffff_8100_0000;
        for s in [&real, &long] {
            assert_eq!(DejaRegs::from_state(s).bytes().len(), G_PACKET_BYTES);
        }
        assert_eq!(
            DejaRegs::from_state(&long).bytes()[128..136],
            0xffff_ffff_8100_0000u64.to_le_bytes()
        );
    }

    #[test]
    fn the_description_lists_every_register_of_the_packet() {
        let bits: usize = TARGET_XML
            .lines()
            .filter_map(|l| l.trim().strip_prefix("<reg "))
            .map(|l| {
                let b = l.split("bitsize=\"").nth(1).unwrap();
                b[..b.find('"').unwrap()].parse::<usize>().unwrap()
            })
            .sum();
        assert_eq!(bits / 8, G_PACKET_BYTES);
        for r in SYSTEM_REGS {
            assert!(TARGET_XML.contains(&format!("<reg name=\"{r}\"")), "{r}");
        }
    }

    #[test]
    fn abridged_tags_expand_to_empty_or_valid() {
        assert_eq!(full_tag_word(0), 0xffff);
        assert_eq!(full_tag_word(0xff), 0);
        assert_eq!(full_tag_word(1), 0xfffc);
    }
}
