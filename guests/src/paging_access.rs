//! `paging-access`: the access rules of x86 paging, checked case by case against a reference
//! model that runs inside the guest.
//!
//! For one linear address `T` the guest builds page-table entries from their bits, then for
//! every CPU state (CR0.WP, EFER.NXE, CR4.SMEP) and every access (read, write, fetch; from
//! ring 0 and from ring 3) it runs the access and compares what happened — fault or not, the
//! #PF error code (P, W/R, U/S, RSVD, I/D), CR2, the value read, and the accessed and dirty
//! bits left in every entry — with what its own model computed from the same bits and state.
//! The model is guest code written from the SDM's rules (Vol. 3A §4.6-4.8), independent of
//! deja's page walkers; nothing in the image was computed by them.
//!
//! Three variants: 32-bit paging (CR4.PSE; 4 MiB pages at the PDE), PAE paging (2 MiB pages,
//! NX) and 4-level paging (2 MiB pages, NX, and the PML4E and PDPTE as further levels).
//!
//! Which entries are enumerated: an entry's kinds are "not present" (P=0 with every other
//! tested bit set, which the walk must ignore), "reserved" (P=1 with a reserved bit set) and
//! "present", and for a present entry every combination of the bits that level has: W, U, A
//! and NX everywhere (NX from PAE on), plus D and G where the entry can map a page (the PTE,
//! a PDE with PS). The groups:
//! - 4 KiB pages: every PDE kind × every PTE kind (when the PDE ends the walk the PTE is
//!   irrelevant and only one PTE kind runs);
//! - large pages: every PDE kind with PS=1 (the PTE below is not present and must be ignored);
//! - 4-level only: every PML4E kind × every PDPTE kind, over a present PDE and PTE
//!   (in PAE paging the PDPTEs stay fixed and present: they are loaded by MOV CR3, carry no
//!   access rights, and a reserved bit in them is a #GP at the load, not a #PF);
//!
//! each × 6 accesses × 8 CPU states (fewer when CPUID lacks NX or SMEP; the guest says so).
//! [`Coverage::Reduced`] (for hosts that emulate ring-0 code, such as PVM under kvm, where
//! the full 4-level run takes about 40 s) runs two states (all off, all on), does not vary D
//! and G, and varies the PML4E but not the PDPTE.
//!
//! The one implementation freedom the model tolerates: when an access faults, entries above
//! the level where the walk stopped (the leaf, for a protection fault) may or may not have
//! had their accessed bit set — the SDM lets a processor set A in the entries it used before
//! it found the fault (§4.8). The faulting entry itself and everything below it must keep
//! their A and D bits; a fault never sets D. (bt and this host's kvm never use the freedom in
//! these cases; QEMU 7.2's TCG does, setting A in the PML4E and PDPTE when the PDE has a
//! reserved bit.)
//!
//! Cross-checked outside deja: under `qemu-system-x86_64 -accel tcg -cpu max` (QEMU 7.2) the
//! images disagree with the model in one respect only — TCG reports reserved-bit faults with
//! error code bit 0 (P) clear, where the SDM says RSVD implies P ("bit 3 of the error code can
//! be set only if bit 0 is also set", Vol. 3A §4.7) and bt and kvm set it; with that one
//! difference allowed every case of all three variants agreed.
//!
//! On a mismatch the guest prints the case (state, access, every entry before and after,
//! expected and actual outcome) on COM1 and exits 1; it exits 0 after the last case.

use crate::link::{Emit, LinkError, Section, SectionAsm, link};
use crate::rt::{
    COM1, COM1_LSR, DEBUG_EXIT, EXIT_CHECK_FAILED, EXIT_PASS, EXIT_UNEXPECTED_VECTOR, LOAD_ADDR,
    SEL_CODE32, SEL_CODE64, SEL_DATA, real_mode,
};
use deja_machine::loader::{EntryMode, Image, ImageFormat};
use iced_x86::code_asm::*;

/// The paging mode a variant runs its cases in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagingMode {
    /// 32-bit paging (CR4.PAE=0) with CR4.PSE: 4-byte entries, 4 MiB pages, no NX.
    Bits32,
    /// PAE paging: 8-byte entries, four PDPTEs loaded with CR3, 2 MiB pages, NX.
    Pae,
    /// 4-level paging in long mode: PML4E, PDPTE, PDE, PTE.
    FourLevel,
}

/// How many cases a variant runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coverage {
    /// Every case the module documentation lists.
    Full,
    /// Two CPU states, no D/G variation, only the PML4E of the upper levels: for hosts that
    /// emulate ring-0 code slowly.
    Reduced,
}

impl PagingMode {
    /// The three modes.
    pub const ALL: [PagingMode; 3] = [PagingMode::Bits32, PagingMode::Pae, PagingMode::FourLevel];

    /// The suffix of the guest's name.
    pub fn name(self) -> &'static str {
        match self {
            PagingMode::Bits32 => "32",
            PagingMode::Pae => "pae",
            PagingMode::FourLevel => "4level",
        }
    }

    /// 8-byte entries with NX (bit 63) and a reserved bit at 51.
    fn wide(self) -> bool {
        self != PagingMode::Bits32
    }

    fn bits64(self) -> bool {
        self == PagingMode::FourLevel
    }

    fn entry_size(self) -> u32 {
        if self.wide() { 8 } else { 4 }
    }

    /// The levels the model walks, top first.
    fn levels(self) -> Vec<Level> {
        let e = self.entry_size();
        let pde = |at| Level {
            name: "PDE",
            entry: at,
            next: PT_TEST,
            is_pde: true,
        };
        let pte = Level {
            name: "PTE",
            entry: PT_TEST + 5 * e,
            next: SMALL_FRAME,
            is_pde: false,
        };
        match self {
            PagingMode::Bits32 => vec![pde(TOP + 256 * 4), pte],
            PagingMode::Pae => vec![pde(PD_TEST), pte],
            PagingMode::FourLevel => vec![
                Level {
                    name: "PML4E",
                    entry: TOP + 8,
                    next: PDPT_TEST,
                    is_pde: false,
                },
                Level {
                    name: "PDPTE",
                    entry: PDPT_TEST + 8,
                    next: PD_TEST,
                    is_pde: false,
                },
                pde(PD_TEST),
                pte,
            ],
        }
    }

    /// The tested linear address: PT index 5, byte 0x123 of its page; in 4-level paging
    /// under PML4[1] and PDPT[1], away from everything else.
    fn target(self) -> u64 {
        match self {
            PagingMode::FourLevel => 0x80_4000_0000 + u64::from(TARGET_OFFSET),
            _ => 0x4000_0000 + u64::from(TARGET_OFFSET),
        }
    }
}

/// The guest's registry name for a variant.
pub fn guest_name(mode: PagingMode, coverage: Coverage) -> String {
    match coverage {
        Coverage::Full => format!("paging-access-{}", mode.name()),
        Coverage::Reduced => format!("paging-access-{}-quick", mode.name()),
    }
}

/// Physical layout (all below 2 MiB, identity mapped with 4 KiB pages, supervisor only
/// except the user code and user stack pages).
const TABLES: u32 = 0x10_0000;
/// The root: the PD (32-bit), the PDPT (PAE) or the PML4 (4-level).
const TOP: u32 = TABLES;
const PDPT_LOW: u32 = TABLES + 0x1000;
const PD_LOW: u32 = TABLES + 0x2000;
const PT_LOW: u32 = TABLES + 0x3000;
const PDPT_TEST: u32 = TABLES + 0x4000;
const PD_TEST: u32 = TABLES + 0x5000;
const PT_TEST: u32 = TABLES + 0x6000;
const VARS: u32 = TABLES + 0x7000;
const TABLE_PAGES: u32 = 8;
/// Large pages map physical 0, so `T` lands on `TARGET_OFFSET`; 4 KiB pages map this frame.
const SMALL_FRAME: u32 = 0x6000;
/// `T`'s offset in a large page (PT index 5, byte 0x123).
const TARGET_OFFSET: u32 = 0x5123;
/// What the two target locations hold: a RET (for fetches) and a byte telling them apart.
const LARGE_VALUE: u32 = 0x55c3;
const SMALL_VALUE: u32 = 0x66c3;
const KSTACK_TOP: u32 = 0x9_0000;
/// Where ring-3 → ring-0 transitions land (TSS.ESP0/RSP0); the handlers leave it at once.
const INT_STACK_TOP: u32 = 0x8_8000;
/// One user-accessible page of stack.
const USER_STACK: u32 = 0x7_0000;

/// The selectors of the guest's own GDT (the first four are the boot path's).
const SEL_USER_CODE32: u16 = 0x20 | 3;
const SEL_USER_DATA: u16 = 0x28 | 3;
const SEL_USER_CODE64: u16 = 0x30 | 3;
const SEL_TSS: u16 = 0x38;
/// Ring-3 code hands control back after an access with UD2: the #UD handler takes it as
/// the end of the access. (Not INT n or SYSCALL: on PVM hosts INT n from guest ring 3
/// raises #UD, and the code after SYSCALL is fetched as if by ring 3, which a supervisor
/// page refuses; exceptions are delivered as on hardware.)
const RETURN_VECTOR: u8 = 6;
const VECTORS: u8 = 0x20;

/// Entry bits.
const P: u32 = 1;
const W: u32 = 2;
const U: u32 = 4;
const A: u32 = 0x20;
const D: u32 = 0x40;
const PS: u32 = 0x80;
const G: u32 = 0x100;
/// In the high dword of a wide entry.
const NX_HI: u32 = 1 << 31;
/// Bit 51 (high dword bit 19): above MAXPHYADDR unless the CPU has 52 address bits.
const RSVD51_HI: u32 = 1 << 19;
/// Bit 21 of a 4 MiB PDE (32-bit paging): always reserved (physical address bits 39:32 go
/// to 20:13, and a CPU has at most 40 there).
const RSVD21: u32 = 1 << 21;

/// CPU state bits of the `STATE` variable.
const ST_WP: u32 = 1;
const ST_NXE: u32 = 2;
const ST_SMEP: u32 = 4;

/// The guest's variables (offsets from `VARS`, which EBP holds throughout).
mod var {
    pub const STATE: i32 = 0x00;
    pub const ACCESS: i32 = 0x04;
    pub const KSP: i32 = 0x08;
    pub const FAULTED: i32 = 0x0c;
    pub const ERR: i32 = 0x10;
    pub const CR2_LO: i32 = 0x14;
    pub const CR2_HI: i32 = 0x18;
    pub const RESULT: i32 = 0x1c;
    pub const EXP_FAULT: i32 = 0x20;
    pub const EXP_ERR: i32 = 0x24;
    pub const IN_CASE: i32 = 0x28;
    pub const CASES: i32 = 0x2c;
    pub const HAS_SMEP: i32 = 0x30;
    pub const HAS_NX: i32 = 0x34;
    pub const RSVD51: i32 = 0x38;
    pub const LEAF: i32 = 0x3c;
    pub const KIND: i32 = 0x40;
    pub const E_LO: i32 = 0x50;
    pub const E_HI: i32 = 0x60;
    pub const MUST: i32 = 0x70;
    pub const MAY: i32 = 0x80;
    pub const AFTER_LO: i32 = 0x90;
    pub const AFTER_HI: i32 = 0xa0;
    pub const FAULT_KIND: i32 = 0xb0;
    pub const STOP: i32 = 0xb4;
    pub const EXP_VALUE: i32 = 0xb8;
    pub const ACC_KIND: i32 = 0xbc;
    pub const ACC_USER: i32 = 0xc0;
    pub const SCRATCH: i32 = 0xc4;
}

/// Model outcomes (`FAULT_KIND`).
const FK_NONE: i32 = 0;
const FK_NOT_PRESENT: i32 = 1;
const FK_RESERVED: i32 = 2;
const FK_PROTECTION: i32 = 3;

/// One level of the walk.
#[derive(Clone, Copy)]
struct Level {
    name: &'static str,
    /// Physical (= identity) address of the tested entry.
    entry: u32,
    /// What the entry points at when it does not map a page.
    next: u32,
    is_pde: bool,
}

/// A bit an entry kind may carry.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Feature {
    W,
    U,
    A,
    Nx,
    D,
    G,
}

impl Feature {
    /// (in the high dword, mask)
    fn mask(self) -> (bool, u32) {
        match self {
            Feature::W => (false, W),
            Feature::U => (false, U),
            Feature::A => (false, A),
            Feature::D => (false, D),
            Feature::G => (false, G),
            Feature::Nx => (true, NX_HI),
        }
    }
}

/// Kind numbers: 0 not present, 1 reserved, 2 + v present with the features of v's bits.
const KIND_NOT_PRESENT: u32 = 0;
const KIND_RESERVED: u32 = 1;
/// Present with W and U (features are listed W first, U second): the kind fixed levels use
/// and the one lower levels keep while an upper level ends the walk.
const KIND_PERMISSIVE: u32 = 2 + 3;

/// How a level varies in a group.
#[derive(Clone)]
struct LevelSpec {
    level: Level,
    /// A PDE that maps a large page (PS=1).
    large: bool,
    features: Vec<Feature>,
    /// `None`: every kind; `Some(k)`: only kind `k`.
    fixed: Option<u32>,
    /// The entry has a reserved bit to test (and so a reserved kind).
    reserved: Option<(bool, u32)>,
}

impl LevelSpec {
    fn kinds(&self) -> u32 {
        2 + (1 << self.features.len())
    }
}

/// The groups of a variant (see the module documentation).
fn groups(mode: PagingMode, coverage: Coverage) -> Vec<Vec<LevelSpec>> {
    let levels = mode.levels();
    let full = coverage == Coverage::Full;
    let features = |leaf: bool| {
        let mut f = vec![Feature::W, Feature::U, Feature::A];
        if mode.wide() {
            f.push(Feature::Nx);
        }
        if leaf && full {
            f.extend([Feature::D, Feature::G]);
        }
        f
    };
    let reserved = |large: bool, is_pde: bool| {
        if mode.wide() {
            Some((true, RSVD51_HI))
        } else if large && is_pde {
            Some((false, RSVD21))
        } else {
            None
        }
    };
    let spec = |l: Level, large: bool, fixed: Option<u32>| {
        let leaf = !l.is_pde && l.next == SMALL_FRAME || (l.is_pde && large);
        LevelSpec {
            level: l,
            large,
            features: features(leaf),
            fixed,
            reserved: reserved(large, l.is_pde),
        }
    };
    let n = levels.len();
    let upper_fixed = |large: bool, pte_fixed: Option<u32>, pde_fixed: Option<u32>| {
        levels
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                if i < n - 2 {
                    spec(l, false, Some(KIND_PERMISSIVE))
                } else if i == n - 2 {
                    spec(l, large, pde_fixed)
                } else {
                    spec(l, false, pte_fixed)
                }
            })
            .collect::<Vec<_>>()
    };
    let mut out = vec![
        upper_fixed(false, None, None),
        upper_fixed(true, Some(KIND_NOT_PRESENT), None),
    ];
    if mode == PagingMode::FourLevel {
        let mut g = upper_fixed(false, Some(KIND_PERMISSIVE), Some(KIND_PERMISSIVE));
        // Reduced: the PML4E alone (the PDPTE follows the same rules one level down).
        let varied_upper = if full { 2 } else { 1 };
        for s in &mut g[..varied_upper] {
            s.fixed = None;
        }
        out.push(g);
    }
    out
}

/// Cases a variant runs in each CPU state (what the guest counts, for tests and docs).
pub fn cases_per_state(mode: PagingMode, coverage: Coverage) -> u64 {
    let mut total = 0;
    for g in groups(mode, coverage) {
        // Walk every kind tuple with the guest's skip rules.
        let varied: Vec<usize> = (0..g.len()).filter(|&i| g[i].fixed.is_none()).collect();
        let mut kinds: Vec<u32> = g.iter().map(|s| s.fixed.unwrap_or(0)).collect();
        loop {
            if !skipped(&g, &kinds) {
                total += 6;
            }
            let mut carry = true;
            for &i in varied.iter().rev() {
                kinds[i] += 1;
                if kinds[i] < g[i].kinds() {
                    carry = false;
                    break;
                }
                kinds[i] = 0;
            }
            if carry {
                break;
            }
        }
    }
    total
}

/// The guest's skip rules, for counting.
fn skipped(g: &[LevelSpec], kinds: &[u32]) -> bool {
    for (i, s) in g.iter().enumerate() {
        if s.fixed.is_some() {
            continue;
        }
        if s.reserved.is_none() && kinds[i] == KIND_RESERVED {
            return true;
        }
        if kinds[i] < 2 {
            for (j, t) in g.iter().enumerate().skip(i + 1) {
                if t.fixed.is_none() && kinds[j] != KIND_PERMISSIVE {
                    return true;
                }
            }
        }
    }
    false
}

/// The CPU states a coverage runs.
fn states(coverage: Coverage) -> Vec<u32> {
    match coverage {
        Coverage::Full => (0..8).collect(),
        Coverage::Reduced => vec![0, ST_WP | ST_NXE | ST_SMEP],
    }
}

/// Builds the variant's image.
pub fn image(mode: PagingMode, coverage: Coverage) -> Result<Image, LinkError> {
    let name = guest_name(mode, coverage);
    let real: &Emit<'_> = &|s| real_mode(s, None);
    let prot: &Emit<'_> = &|s| {
        setup32(s, mode)?;
        if !mode.bits64() {
            harness(s, mode, coverage, &name)?;
        }
        Ok(())
    };
    let long: &Emit<'_> = &|s| {
        if mode.bits64() {
            s.export_here("pa_long64")?;
            let a = &mut s.a;
            a.mov(ax, i32::from(SEL_DATA))?;
            a.mov(ds, ax)?;
            a.mov(es, ax)?;
            a.mov(ss, ax)?;
            a.mov(esp, KSTACK_TOP as i32)?;
            harness(s, mode, coverage, &name)?;
        }
        Ok(())
    };
    let data: &Emit<'_> = &|s| tables(s, mode);
    let user: &Emit<'_> = &|s| user_code(s, mode);
    let bits = if mode.bits64() { 64 } else { 32 };
    let linked = link(
        LOAD_ADDR,
        &[
            Section {
                name: "real16",
                bitness: 16,
                align: 1,
                limit: Some(0x1_0000),
                emit: real,
            },
            Section {
                name: "prot32",
                bitness: 32,
                align: 16,
                limit: Some(0x8_0000),
                emit: prot,
            },
            Section {
                name: "long64",
                bitness: 64,
                align: 16,
                limit: Some(0x8_0000),
                emit: long,
            },
            Section {
                name: "data",
                bitness: bits,
                align: 16,
                limit: Some(0x8_0000),
                emit: data,
            },
            Section {
                name: "user",
                bitness: bits,
                align: 0x1000,
                limit: Some(0x8_0000),
                emit: user,
            },
        ],
    )?;
    Ok(Image {
        initrd: None,
        name: format!("guest:{name}"),
        bytes: linked.bytes,
        format: ImageFormat::Raw {
            load_addr: LOAD_ADDR,
            entry: LOAD_ADDR,
            mode: EntryMode::Real,
        },
    })
}

/// 32-bit protected mode, paging off: flat segments, the guest's GDT, the page tables, the
/// target bytes; then paging on (and for 4-level, long mode and a jump to 64-bit code).
fn setup32(s: &mut SectionAsm<'_>, mode: PagingMode) -> Result<(), LinkError> {
    s.export_here("prot32")?;
    let gdt_ptr = s.sym("pa_gdt_ptr");
    let user_page = s.sym32("user_read") >> 12;
    let long64 = if mode.bits64() {
        s.sym32("pa_long64")
    } else {
        0
    };
    let esz = mode.entry_size() as i32;
    let a = &mut s.a;
    a.mov(ax, i32::from(SEL_DATA))?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(fs, ax)?;
    a.mov(gs, ax)?;
    a.mov(esp, KSTACK_TOP as i32)?;
    a.mov(eax, gdt_ptr as i32)?;
    a.lgdt(ptr(eax))?;
    a.mov(edi, TABLES as i32)?;
    a.xor(eax, eax)?;
    a.mov(ecx, (TABLE_PAGES * 1024) as i32)?;
    a.rep().stosd()?;
    for (at, value) in [
        (TARGET_OFFSET, LARGE_VALUE),
        (SMALL_FRAME | 0x123, SMALL_VALUE),
    ] {
        a.mov(edi, at as i32)?;
        a.mov(word_ptr(edi), value as i32)?;
    }
    // Identity map 0..2 MiB with supervisor 4 KiB pages; the user page and stack get U.
    let mut fill = a.create_label();
    a.mov(edi, PT_LOW as i32)?;
    a.xor(ecx, ecx)?;
    a.set_label(&mut fill)?;
    a.mov(eax, ecx)?;
    a.shl(eax, 12)?;
    a.or(eax, (P | W) as i32)?;
    a.mov(dword_ptr(edi + ecx * esz), eax)?;
    a.inc(ecx)?;
    a.cmp(ecx, 512)?;
    a.jb(fill)?;
    for page in [user_page, USER_STACK >> 12] {
        a.or(dword_ptr(edi + (page as i32) * esz), U as i32)?;
    }
    let put = |a: &mut CodeAssembler, at: u32, value: u32| -> Result<(), IcedError> {
        a.mov(edi, at as i32)?;
        a.mov(dword_ptr(edi), value as i32)
    };
    match mode {
        PagingMode::Bits32 => {
            put(a, TOP, PT_LOW | P | W | U)?;
            a.mov(eax, cr4)?;
            a.or(eax, 0x10 | 0x80)?; // PSE, PGE
            a.mov(cr4, eax)?;
        }
        PagingMode::Pae => {
            put(a, TOP, PD_LOW | P)?;
            put(a, TOP + 8, PD_TEST | P)?;
            put(a, PD_LOW, PT_LOW | P | W | U)?;
            a.mov(eax, cr4)?;
            a.or(eax, 0x20 | 0x80)?; // PAE, PGE
            a.mov(cr4, eax)?;
        }
        PagingMode::FourLevel => {
            put(a, TOP, PDPT_LOW | P | W | U)?;
            put(a, PDPT_LOW, PD_LOW | P | W | U)?;
            put(a, PD_LOW, PT_LOW | P | W | U)?;
            a.mov(eax, cr4)?;
            a.or(eax, 0x20 | 0x80)?; // PAE, PGE
            a.mov(cr4, eax)?;
            a.mov(ecx, 0xc000_0080u32 as i32)?; // EFER.LME
            a.rdmsr()?;
            a.or(eax, 0x100)?;
            a.wrmsr()?;
        }
    }
    a.mov(eax, TOP as i32)?;
    a.mov(cr3, eax)?;
    a.mov(eax, cr0)?;
    a.or(eax, 0x8000_0000u32 as i32)?;
    a.mov(cr0, eax)?;
    if mode.bits64() {
        a.jmp_far(SEL_CODE64, long64)?;
    }
    Ok(())
}

/// GDT, IDT and TSS.
fn tables(s: &mut SectionAsm<'_>, mode: PagingMode) -> Result<(), LinkError> {
    let tss = s.sym("pa_tss");
    let mut gdt = vec![
        0,
        0x00cf_9a00_0000_ffff, // 0x08: 32-bit code
        0x00cf_9200_0000_ffff, // 0x10: data
        0x00af_9a00_0000_ffff, // 0x18: 64-bit code
        0x00cf_fa00_0000_ffff, // 0x20: 32-bit user code
        0x00cf_f200_0000_ffff, // 0x28: user data
        0x00af_fa00_0000_ffff, // 0x30: 64-bit user code
    ];
    // 0x38: available TSS (type 9: 32-bit, or 64-bit in long mode), limit 0x67.
    gdt.push(0x67 | (tss & 0xff_ffff) << 16 | 0x89u64 << 40 | ((tss >> 24) & 0xff) << 56);
    gdt.push(tss >> 32);
    s.export_here("pa_gdt")?;
    s.a.dq(&gdt)?;
    let gdt_addr = s.sym("pa_gdt");
    s.export_here("pa_gdt_ptr")?;
    s.a.dw(&[(gdt.len() * 8 - 1) as u16])?;
    s.a.dq(&[gdt_addr])?;

    let mut idt = Vec::new();
    let code = if mode.bits64() {
        SEL_CODE64
    } else {
        SEL_CODE32
    };
    for v in 0..VECTORS {
        let target = s.sym(&format!("pa_vec_{v:02x}"));
        let flags: u64 = 0x8e00; // present, DPL 0, interrupt gate
        idt.push(
            (target & 0xffff)
                | u64::from(code) << 16
                | flags << 32
                | ((target >> 16) & 0xffff) << 48,
        );
        if mode.bits64() {
            idt.push(target >> 32);
        }
    }
    s.export_here("pa_idt")?;
    s.a.dq(&idt)?;
    let idt_addr = s.sym("pa_idt");
    s.export_here("pa_idt_ptr")?;
    s.a.dw(&[(idt.len() * 8 - 1) as u16])?;
    s.a.dq(&[idt_addr])?;

    // TSS: ESP0 (RSP0's low half in 64-bit mode) at offset 4; SS0 at 8 in a 32-bit TSS
    // (in a 64-bit one that is RSP0's high half, which stays 0).
    let mut tss_bytes = [0u8; 0x68];
    tss_bytes[4..8].copy_from_slice(&INT_STACK_TOP.to_le_bytes());
    if !mode.bits64() {
        tss_bytes[8..10].copy_from_slice(&SEL_DATA.to_le_bytes());
    }
    tss_bytes[0x66..0x68].copy_from_slice(&0x68u16.to_le_bytes()); // no I/O bitmap
    s.export_here("pa_tss")?;
    s.a.db(&tss_bytes)?;
    Ok(())
}

/// The ring-3 side: one entry per access kind, each doing the access at `T` (in EDI/RDI)
/// and handing control back with UD2, the value read in EAX.
fn user_code(s: &mut SectionAsm<'_>, mode: PagingMode) -> Result<(), LinkError> {
    let b64 = mode.bits64();
    for (name, kind) in [("user_read", 0), ("user_write", 1), ("user_fetch", 2)] {
        s.export_here(name)?;
        let a = &mut s.a;
        if !b64 {
            a.mov(cx, i32::from(SEL_USER_DATA))?;
            a.mov(ds, cx)?;
            a.mov(es, cx)?;
        }
        access(a, b64, kind)?;
        a.ud2()?;
    }
    Ok(())
}

/// The access itself at `T` (EDI/RDI): read a word into EAX, write the RET byte back, or
/// call the RET.
fn access(a: &mut CodeAssembler, b64: bool, kind: u32) -> Result<(), IcedError> {
    match (kind, b64) {
        (0, false) => a.movzx(eax, word_ptr(edi)),
        (0, true) => a.movzx(eax, word_ptr(rdi)),
        (1, false) => a.mov(byte_ptr(edi), 0xc3),
        (1, true) => a.mov(byte_ptr(rdi), 0xc3),
        (_, false) => a.call(edi),
        (_, true) => a.call(rdi),
    }
}

/// Reads a control register into EAX (RAX).
fn read_cr(a: &mut CodeAssembler, b64: bool, cr: AsmRegisterCr) -> Result<(), IcedError> {
    if b64 { a.mov(rax, cr) } else { a.mov(eax, cr) }
}

/// Writes EAX (RAX) to a control register.
fn write_cr(a: &mut CodeAssembler, b64: bool, cr: AsmRegisterCr) -> Result<(), IcedError> {
    if b64 { a.mov(cr, rax) } else { a.mov(cr, eax) }
}

/// Loads `T` into EDI (RDI).
fn load_target(a: &mut CodeAssembler, mode: PagingMode) -> Result<(), IcedError> {
    if mode.bits64() {
        a.mov(rdi, mode.target())
    } else {
        a.mov(edi, mode.target() as i32)
    }
}

fn v(off: i32) -> AsmMemoryOperand {
    dword_ptr(ebp + off)
}

/// Routines and strings of the harness.
struct Harness {
    putc: CodeLabel,
    puts: CodeLabel,
    put_hex: CodeLabel,
    /// Where the strings end up (the previous link pass's address of `pa_strings`): 32-bit
    /// code cannot address a label RIP-relative, so strings are addressed absolutely.
    strings_base: u64,
    strings: Vec<u8>,
}

impl Harness {
    /// Prints `text` (clobbers EAX, ECX, EDX, ESI).
    fn print(&mut self, a: &mut CodeAssembler, text: &str) -> Result<(), IcedError> {
        let at = self.strings_base + self.strings.len() as u64;
        self.strings.extend_from_slice(text.as_bytes());
        self.strings.push(0);
        a.mov(esi, at as i32)?;
        a.call(self.puts)
    }

    /// Prints the variable at `off` as 8 hex digits.
    fn print_var(&mut self, a: &mut CodeAssembler, off: i32) -> Result<(), IcedError> {
        a.mov(ebx, v(off))?;
        a.call(self.put_hex)
    }
}

/// The harness: CPUID, the state loop over the groups, the case runner, the model, the
/// handlers, and reporting.
fn harness(
    s: &mut SectionAsm<'_>,
    mode: PagingMode,
    coverage: Coverage,
    name: &str,
) -> Result<(), LinkError> {
    let b64 = mode.bits64();
    let idt_ptr = s.sym("pa_idt_ptr");
    let user_entries = [s.sym("user_read"), s.sym("user_write"), s.sym("user_fetch")];
    let levels = mode.levels();
    let nlev = levels.len();
    let groups = groups(mode, coverage);

    let mut h = Harness {
        putc: s.a.create_label(),
        puts: s.a.create_label(),
        put_hex: s.a.create_label(),
        strings_base: s.sym("pa_strings"),
        strings: Vec::new(),
    };
    let mut run_case = s.a.create_label();
    let mut run_accesses = s.a.create_label();
    let mut model = s.a.create_label();
    let mut after_access = s.a.create_label();
    let mut fail = s.a.create_label();
    let mut unexpected = s.a.create_label();

    let a = &mut s.a;
    a.mov(ebp, VARS as i32)?;
    a.mov(eax, idt_ptr as i32)?;
    if b64 {
        a.lidt(ptr(rax))?;
    } else {
        a.lidt(ptr(eax))?;
    }
    a.mov(ax, i32::from(SEL_TSS))?;
    a.ltr(ax)?;

    // What the CPU has: SMEP (CPUID 7.EBX[7]), NX (0x8000_0001.EDX[20]), and whether bit 51
    // is above MAXPHYADDR (0x8000_0008.EAX[7:0]).
    let mut no_leaf7 = a.create_label();
    let mut no_ext = a.create_label();
    let mut cpuid_done = a.create_label();
    a.xor(eax, eax)?;
    a.cpuid()?;
    a.cmp(eax, 7)?;
    a.jb(no_leaf7)?;
    a.mov(eax, 7)?;
    a.xor(ecx, ecx)?;
    a.cpuid()?;
    a.shr(ebx, 7)?;
    a.and(ebx, 1)?;
    a.mov(v(var::HAS_SMEP), ebx)?;
    a.set_label(&mut no_leaf7)?;
    a.mov(eax, 0x8000_0000u32 as i32)?;
    a.cpuid()?;
    a.cmp(eax, 0x8000_0008u32 as i32)?;
    a.jb(no_ext)?;
    a.mov(eax, 0x8000_0001u32 as i32)?;
    a.cpuid()?;
    a.shr(edx, 20)?;
    a.and(edx, 1)?;
    a.mov(v(var::HAS_NX), edx)?;
    a.mov(eax, 0x8000_0008u32 as i32)?;
    a.cpuid()?;
    a.and(eax, 0xff)?;
    a.xor(ecx, ecx)?;
    a.cmp(eax, 51)?;
    a.setbe(cl)?;
    a.mov(v(var::RSVD51), ecx)?;
    a.jmp(cpuid_done)?;
    a.set_label(&mut no_ext)?;
    a.mov(v(var::RSVD51), 1)?;
    a.set_label(&mut cpuid_done)?;
    for (flag, what) in [
        (var::HAS_NX, "EFER.NXE: CPUID reports no NX"),
        (var::HAS_SMEP, "CR4.SMEP: CPUID reports no SMEP"),
    ] {
        let mut has = a.create_label();
        a.cmp(v(flag), 0)?;
        a.jne(has)?;
        h.print(
            a,
            &format!("{name}: states with {what}; they are skipped\r\n"),
        )?;
        a.set_label(&mut has)?;
    }

    // The state loop.
    let mut state_top = a.create_label();
    let mut state_next = a.create_label();
    a.mov(v(var::STATE), 0)?;
    a.set_label(&mut state_top)?;
    let wanted = states(coverage);
    if wanted.len() < 8 {
        let mut ok = a.create_label();
        for st in &wanted {
            a.cmp(v(var::STATE), *st as i32)?;
            a.je(ok)?;
        }
        a.jmp(state_next)?;
        a.set_label(&mut ok)?;
    }
    for (bit, flag) in [(ST_NXE, var::HAS_NX), (ST_SMEP, var::HAS_SMEP)] {
        let mut ok = a.create_label();
        a.test(v(var::STATE), bit as i32)?;
        a.jz(ok)?;
        a.cmp(v(flag), 0)?;
        a.je(state_next)?;
        a.set_label(&mut ok)?;
    }
    // Apply: CR0.WP, EFER.NXE, CR4.SMEP.
    let set_bit = |a: &mut CodeAssembler, st: u32, mask: u32| -> Result<(), IcedError> {
        let mut off = a.create_label();
        a.and(eax, !mask as i32)?;
        a.test(v(var::STATE), st as i32)?;
        a.jz(off)?;
        a.or(eax, mask as i32)?;
        a.set_label(&mut off)
    };
    read_cr(a, b64, cr0)?;
    set_bit(a, ST_WP, 1 << 16)?;
    write_cr(a, b64, cr0)?;
    let mut no_nx = a.create_label();
    a.cmp(v(var::HAS_NX), 0)?;
    a.je(no_nx)?;
    a.mov(ecx, 0xc000_0080u32 as i32)?;
    a.rdmsr()?;
    set_bit(a, ST_NXE, 0x800)?;
    a.wrmsr()?;
    a.set_label(&mut no_nx)?;
    let mut no_smep = a.create_label();
    a.cmp(v(var::HAS_SMEP), 0)?;
    a.je(no_smep)?;
    read_cr(a, b64, cr4)?;
    set_bit(a, ST_SMEP, 1 << 20)?;
    write_cr(a, b64, cr4)?;
    a.set_label(&mut no_smep)?;

    for g in &groups {
        emit_group(a, g, run_accesses)?;
    }
    a.set_label(&mut state_next)?;
    a.inc(v(var::STATE))?;
    a.cmp(v(var::STATE), 8)?;
    a.jb(state_top)?;

    h.print(a, &format!("{name}: "))?;
    a.mov(eax, v(var::CASES))?;
    a.mov(v(var::SCRATCH), eax)?;
    h.print_var(a, var::SCRATCH)?;
    h.print(a, " (hex) cases passed\r\n")?;
    exit(a, EXIT_PASS)?;

    // run_accesses: the six accesses for the decoded entries.
    a.set_label(&mut run_accesses)?;
    let mut acc_top = a.create_label();
    let mut sup = a.create_label();
    a.mov(v(var::ACCESS), 0)?;
    a.set_label(&mut acc_top)?;
    a.mov(eax, v(var::ACCESS))?;
    a.xor(ecx, ecx)?;
    a.cmp(eax, 3)?;
    a.jb(sup)?;
    a.sub(eax, 3)?;
    a.inc(ecx)?;
    a.set_label(&mut sup)?;
    a.mov(v(var::ACC_KIND), eax)?;
    a.mov(v(var::ACC_USER), ecx)?;
    a.call(run_case)?;
    a.inc(v(var::ACCESS))?;
    a.cmp(v(var::ACCESS), 6)?;
    a.jb(acc_top)?;
    a.ret()?;

    // run_case: install the entries, flush T, model, access, compare.
    a.set_label(&mut run_case)?;
    for (i, l) in levels.iter().enumerate() {
        a.mov(edx, l.entry as i32)?;
        a.mov(eax, v(var::E_LO + 4 * i as i32))?;
        a.mov(dword_ptr(edx), eax)?;
        if mode.wide() {
            a.mov(eax, v(var::E_HI + 4 * i as i32))?;
            a.mov(dword_ptr(edx + 4), eax)?;
        }
    }
    load_target(a, mode)?;
    if b64 {
        a.invlpg(byte_ptr(rdi))?;
    } else {
        a.invlpg(byte_ptr(edi))?;
    }
    a.call(model)?;
    // The access.
    let mut user = a.create_label();
    let mut s_write = a.create_label();
    let mut s_fetch = a.create_label();
    let mut s_done = a.create_label();
    a.mov(v(var::FAULTED), 0)?;
    a.mov(v(var::RESULT), 0)?;
    a.mov(v(var::IN_CASE), 1)?;
    a.mov(v(var::KSP), esp)?;
    load_target(a, mode)?;
    a.cmp(v(var::ACC_USER), 0)?;
    a.jne(user)?;
    a.cmp(v(var::ACC_KIND), 1)?;
    a.je(s_write)?;
    a.ja(s_fetch)?;
    access(a, b64, 0)?;
    a.jmp(s_done)?;
    a.set_label(&mut s_write)?;
    access(a, b64, 1)?;
    a.jmp(s_done)?;
    a.set_label(&mut s_fetch)?;
    access(a, b64, 2)?;
    a.set_label(&mut s_done)?;
    a.mov(v(var::RESULT), eax)?;
    a.jmp(after_access)?;
    a.set_label(&mut user)?;
    let mut u_write = a.create_label();
    let mut u_go = a.create_label();
    a.mov(eax, user_entries[2] as i32)?;
    a.cmp(v(var::ACC_KIND), 1)?;
    a.ja(u_go)?;
    a.je(u_write)?;
    a.mov(eax, user_entries[0] as i32)?;
    a.jmp(u_go)?;
    a.set_label(&mut u_write)?;
    a.mov(eax, user_entries[1] as i32)?;
    a.set_label(&mut u_go)?;
    let user_cs = if b64 {
        SEL_USER_CODE64
    } else {
        SEL_USER_CODE32
    };
    if b64 {
        a.push(i32::from(SEL_USER_DATA))?;
        a.push((USER_STACK + 0x1000) as i32)?;
        a.push(2)?; // RFLAGS: IF=0, IOPL 0
        a.push(i32::from(user_cs))?;
        a.push(rax)?;
        a.iretq()?;
    } else {
        a.push(i32::from(SEL_USER_DATA))?;
        a.push((USER_STACK + 0x1000) as i32)?;
        a.push(2)?;
        a.push(i32::from(user_cs))?;
        a.push(eax)?;
        a.iretd()?;
    }
    a.set_label(&mut after_access)?;
    a.mov(v(var::IN_CASE), 0)?;
    // Read the entries back and compare.
    for (i, l) in levels.iter().enumerate() {
        a.mov(edx, l.entry as i32)?;
        a.mov(eax, dword_ptr(edx))?;
        a.mov(v(var::AFTER_LO + 4 * i as i32), eax)?;
        if mode.wide() {
            a.mov(eax, dword_ptr(edx + 4))?;
            a.mov(v(var::AFTER_HI + 4 * i as i32), eax)?;
        }
    }
    let mut no_fault = a.create_label();
    let mut outcome_ok = a.create_label();
    a.mov(eax, v(var::FAULTED))?;
    a.cmp(eax, v(var::EXP_FAULT))?;
    a.jne(fail)?;
    a.test(eax, eax)?;
    a.jz(no_fault)?;
    a.mov(eax, v(var::ERR))?;
    a.cmp(eax, v(var::EXP_ERR))?;
    a.jne(fail)?;
    let t = mode.target();
    a.cmp(v(var::CR2_LO), t as u32 as i32)?;
    a.jne(fail)?;
    a.cmp(v(var::CR2_HI), (t >> 32) as i32)?;
    a.jne(fail)?;
    a.jmp(outcome_ok)?;
    a.set_label(&mut no_fault)?;
    a.cmp(v(var::ACC_KIND), 0)?;
    a.jne(outcome_ok)?;
    a.mov(eax, v(var::RESULT))?;
    a.cmp(eax, v(var::EXP_VALUE))?;
    a.jne(fail)?;
    a.set_label(&mut outcome_ok)?;
    for i in 0..nlev as i32 {
        let mut ok = a.create_label();
        a.mov(eax, v(var::E_LO + 4 * i))?;
        a.or(eax, v(var::MUST + 4 * i))?;
        a.cmp(v(var::AFTER_LO + 4 * i), eax)?;
        a.je(ok)?;
        a.or(eax, v(var::MAY + 4 * i))?;
        a.cmp(v(var::AFTER_LO + 4 * i), eax)?;
        a.jne(fail)?;
        a.set_label(&mut ok)?;
        if mode.wide() {
            a.mov(eax, v(var::E_HI + 4 * i))?;
            a.cmp(v(var::AFTER_HI + 4 * i), eax)?;
            a.jne(fail)?;
        }
    }
    a.inc(v(var::CASES))?;
    a.ret()?;

    emit_model(a, mode, &levels, &mut model)?;

    // #PF: record error code and CR2, back to the case.
    let mut pf_unexpected = a.create_label();
    s.export_here("pa_vec_0e")?;
    let a = &mut s.a;
    a.mov(ebp, VARS as i32)?;
    a.cmp(v(var::IN_CASE), 0)?;
    a.je(pf_unexpected)?;
    if b64 {
        a.mov(rax, qword_ptr(rsp))?;
    } else {
        a.mov(eax, dword_ptr(esp))?;
    }
    a.mov(v(var::ERR), eax)?;
    read_cr(a, b64, cr2)?;
    a.mov(v(var::CR2_LO), eax)?;
    if b64 {
        a.shr(rax, 32)?;
    } else {
        a.xor(eax, eax)?;
    }
    a.mov(v(var::CR2_HI), eax)?;
    a.mov(v(var::FAULTED), 1)?;
    a.mov(esp, v(var::KSP))?;
    a.jmp(after_access)?;
    a.set_label(&mut pf_unexpected)?;
    a.mov(ebx, 14)?;
    a.jmp(unexpected)?;

    // #UD from ring 3 during a case: the access is done; EAX holds what it read.
    s.export_here(&format!("pa_vec_{RETURN_VECTOR:02x}"))?;
    let a = &mut s.a;
    let mut ret_unexpected = a.create_label();
    a.mov(ebp, VARS as i32)?;
    a.cmp(v(var::IN_CASE), 0)?;
    a.je(ret_unexpected)?;
    a.test(byte_ptr(esp + if b64 { 8 } else { 4 }), 3)?; // the CS pushed: from ring 3?
    a.jz(ret_unexpected)?;
    a.mov(v(var::RESULT), eax)?;
    a.mov(esp, v(var::KSP))?;
    a.jmp(after_access)?;
    a.set_label(&mut ret_unexpected)?;
    a.mov(ebx, i32::from(RETURN_VECTOR))?;
    a.jmp(unexpected)?;

    for vec in 0..VECTORS {
        if vec == 14 || vec == RETURN_VECTOR {
            continue;
        }
        s.export_here(&format!("pa_vec_{vec:02x}"))?;
        s.a.mov(ebx, i32::from(vec))?;
        s.a.jmp(unexpected)?;
    }

    let a = &mut s.a;
    // unexpected: vector in EBX; the word on top of the stack (error code or EIP) and the
    // next one, CR2, then the case.
    a.set_label(&mut unexpected)?;
    a.mov(ebp, VARS as i32)?;
    a.mov(v(var::SCRATCH), ebx)?;
    a.mov(eax, dword_ptr(esp))?;
    a.mov(v(var::ERR), eax)?;
    a.mov(eax, dword_ptr(esp + if b64 { 8 } else { 4 }))?;
    a.mov(v(var::RESULT), eax)?;
    read_cr(a, b64, cr2)?;
    a.mov(v(var::CR2_LO), eax)?;
    a.mov(esp, KSTACK_TOP as i32)?;
    h.print(a, &format!("\r\n{name}: unexpected vector "))?;
    h.print_var(a, var::SCRATCH)?;
    h.print(a, ", stack top ")?;
    h.print_var(a, var::ERR)?;
    a.mov(v(var::ERR), 0)?;
    h.print(a, " ")?;
    h.print_var(a, var::RESULT)?;
    h.print(a, ", cr2 ")?;
    h.print_var(a, var::CR2_LO)?;
    h.print(a, "\r\n")?;
    print_case(a, &mut h, &levels, name)?;
    exit(a, EXIT_UNEXPECTED_VECTOR)?;

    a.set_label(&mut fail)?;
    a.mov(esp, KSTACK_TOP as i32)?;
    h.print(a, &format!("\r\n{name}: FAIL\r\n"))?;
    print_case(a, &mut h, &levels, name)?;
    exit(a, EXIT_CHECK_FAILED)?;

    emit_io(a, &mut h)?;
    s.export_here("pa_strings")?;
    s.a.db(&h.strings)?;
    Ok(())
}

/// Exit through isa-debug-exit.
fn exit(a: &mut CodeAssembler, status: u8) -> Result<(), IcedError> {
    let mut halt = a.create_label();
    a.mov(al, i32::from(status))?;
    a.out(DEBUG_EXIT, al)?;
    a.set_label(&mut halt)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(halt)
}

/// Prints the current case.
fn print_case(
    a: &mut CodeAssembler,
    h: &mut Harness,
    levels: &[Level],
    name: &str,
) -> Result<(), IcedError> {
    h.print(a, &format!("{name}: state "))?;
    h.print_var(a, var::STATE)?;
    h.print(a, " (1 CR0.WP, 2 EFER.NXE, 4 CR4.SMEP), access ")?;
    h.print_var(a, var::ACCESS)?;
    h.print(a, " (0 read, 1 write, 2 fetch; +3 from ring 3)\r\n")?;
    for (i, l) in levels.iter().enumerate() {
        let i = i as i32;
        h.print(a, &format!("  {:<5} before ", l.name))?;
        h.print_var(a, var::E_HI + 4 * i)?;
        h.print_var(a, var::E_LO + 4 * i)?;
        h.print(a, " after ")?;
        h.print_var(a, var::AFTER_HI + 4 * i)?;
        h.print_var(a, var::AFTER_LO + 4 * i)?;
        h.print(a, " model: must set ")?;
        h.print_var(a, var::MUST + 4 * i)?;
        h.print(a, " may set ")?;
        h.print_var(a, var::MAY + 4 * i)?;
        h.print(a, "\r\n")?;
    }
    h.print(a, "  expected: fault ")?;
    h.print_var(a, var::EXP_FAULT)?;
    h.print(a, " error code ")?;
    h.print_var(a, var::EXP_ERR)?;
    h.print(a, " value read ")?;
    h.print_var(a, var::EXP_VALUE)?;
    h.print(a, "\r\n  actual:   fault ")?;
    h.print_var(a, var::FAULTED)?;
    h.print(a, " error code ")?;
    h.print_var(a, var::ERR)?;
    h.print(a, " value read ")?;
    h.print_var(a, var::RESULT)?;
    h.print(a, " cr2 ")?;
    h.print_var(a, var::CR2_HI)?;
    h.print_var(a, var::CR2_LO)?;
    h.print(a, "\r\n")
}

/// COM1 output: putc (CL), puts (ESI), put_hex (EBX, 8 digits).
fn emit_io(a: &mut CodeAssembler, h: &mut Harness) -> Result<(), IcedError> {
    let mut wait = a.create_label();
    a.set_label(&mut h.putc)?;
    a.mov(dx, i32::from(COM1_LSR))?;
    a.set_label(&mut wait)?;
    a.in_(al, dx)?;
    a.test(al, 0x20)?;
    a.jz(wait)?;
    a.mov(al, cl)?;
    a.mov(dx, i32::from(COM1))?;
    a.out(dx, al)?;
    a.ret()?;

    let mut done = a.create_label();
    a.set_label(&mut h.puts)?;
    a.mov(cl, byte_ptr(esi))?;
    a.test(cl, cl)?;
    a.jz(done)?;
    a.call(h.putc)?;
    a.inc(esi)?;
    a.jmp(h.puts)?;
    a.set_label(&mut done)?;
    a.ret()?;

    let mut digit = a.create_label();
    let mut decimal = a.create_label();
    a.set_label(&mut h.put_hex)?;
    a.mov(edi, 8)?;
    a.set_label(&mut digit)?;
    a.rol(ebx, 4)?;
    a.mov(cl, bl)?;
    a.and(cl, 15)?;
    a.add(cl, i32::from(b'0'))?;
    a.cmp(cl, i32::from(b'9'))?;
    a.jbe(decimal)?;
    a.add(cl, 7)?;
    a.set_label(&mut decimal)?;
    a.call(h.putc)?;
    a.dec(edi)?;
    a.jnz(digit)?;
    a.ret()
}

/// One group: the kind loops, the skip rules, the decoding of kinds into entries, and a call
/// to `run_accesses` per case.
fn emit_group(
    a: &mut CodeAssembler,
    g: &[LevelSpec],
    run_accesses: CodeLabel,
) -> Result<(), IcedError> {
    let kind = |i: usize| v(var::KIND + 4 * i as i32);
    let mut body = a.create_label();
    let mut next = a.create_label();
    for (i, s) in g.iter().enumerate() {
        a.mov(kind(i), s.fixed.unwrap_or(0) as i32)?;
    }
    a.set_label(&mut body)?;
    for (i, s) in g.iter().enumerate() {
        if s.fixed.is_some() {
            continue;
        }
        if s.reserved.is_none() {
            a.cmp(kind(i), KIND_RESERVED as i32)?;
            a.je(next)?;
        }
        let lower: Vec<usize> = (i + 1..g.len()).filter(|&j| g[j].fixed.is_none()).collect();
        if !lower.is_empty() {
            let mut walks_on = a.create_label();
            a.cmp(kind(i), 2)?;
            a.jae(walks_on)?;
            for j in lower {
                a.cmp(kind(j), KIND_PERMISSIVE as i32)?;
                a.jne(next)?;
            }
            a.set_label(&mut walks_on)?;
        }
    }
    for (i, s) in g.iter().enumerate() {
        emit_decode(a, i, s)?;
    }
    a.call(run_accesses)?;
    a.set_label(&mut next)?;
    let varied: Vec<usize> = (0..g.len()).filter(|&i| g[i].fixed.is_none()).collect();
    for &i in varied.iter().rev() {
        a.inc(kind(i))?;
        a.cmp(kind(i), g[i].kinds() as i32)?;
        a.jb(body)?;
        a.mov(kind(i), 0)?;
    }
    Ok(())
}

/// Builds level `i`'s entry (E_LO/E_HI) from its kind.
fn emit_decode(a: &mut CodeAssembler, i: usize, s: &LevelSpec) -> Result<(), IcedError> {
    let i32i = i as i32;
    let base = if s.large {
        PS // frame 0
    } else {
        s.level.next
    };
    let mut all_lo = 0;
    let mut all_hi = 0;
    for f in &s.features {
        match f.mask() {
            (false, m) => all_lo |= m,
            (true, m) => all_hi |= m,
        }
    }
    let (rsvd_lo, rsvd_hi) = match s.reserved {
        Some((false, m)) => (m, 0),
        Some((true, m)) => (0, m),
        None => (0, 0),
    };
    let mut present = a.create_label();
    let mut reserved = a.create_label();
    let mut done = a.create_label();
    let store = |a: &mut CodeAssembler| -> Result<(), IcedError> {
        a.mov(v(var::E_LO + 4 * i32i), eax)?;
        a.mov(v(var::E_HI + 4 * i32i), edx)
    };
    a.mov(ecx, v(var::KIND + 4 * i32i))?;
    a.cmp(ecx, KIND_RESERVED as i32)?;
    a.je(reserved)?;
    a.ja(present)?;
    // Not present: everything else set.
    a.mov(eax, (base | all_lo | rsvd_lo) as i32)?;
    a.mov(edx, (all_hi | rsvd_hi) as i32)?;
    store(a)?;
    a.jmp(done)?;
    a.set_label(&mut reserved)?;
    a.mov(eax, (base | P | W | U | rsvd_lo) as i32)?;
    a.mov(edx, rsvd_hi as i32)?;
    store(a)?;
    a.jmp(done)?;
    a.set_label(&mut present)?;
    a.sub(ecx, 2)?;
    a.mov(eax, (base | P) as i32)?;
    a.xor(edx, edx)?;
    for (bit, f) in s.features.iter().enumerate() {
        let mut off = a.create_label();
        a.test(ecx, 1 << bit)?;
        a.jz(off)?;
        match f.mask() {
            (false, m) => a.or(eax, m as i32)?,
            (true, m) => a.or(edx, m as i32)?,
        }
        a.set_label(&mut off)?;
    }
    store(a)?;
    a.set_label(&mut done)
}

/// The reference model (SDM Vol. 3A §4.6-4.8): from the entries, the CPU state and the
/// access, the expected fault, error code, value, and A/D bits.
fn emit_model(
    a: &mut CodeAssembler,
    mode: PagingMode,
    levels: &[Level],
    model: &mut CodeLabel,
) -> Result<(), IcedError> {
    let n = levels.len() as i32;
    let mut walk_fault = a.create_label();
    let mut rights = a.create_label();
    a.set_label(model)?;
    for i in 0..n {
        a.mov(v(var::MUST + 4 * i), 0)?;
        a.mov(v(var::MAY + 4 * i), 0)?;
    }
    a.mov(v(var::FAULT_KIND), FK_NONE)?;
    // EBX: bit 0 every level writable, bit 1 every level user, bit 2 some level NX (with
    // EFER.NXE).
    a.mov(ebx, 3)?;
    let mut np_labels = Vec::new();
    let mut rsvd_labels = Vec::new();
    for (i, l) in levels.iter().enumerate() {
        let i32i = i as i32;
        let np = a.create_label();
        let rsvd = a.create_label();
        a.mov(eax, v(var::E_LO + 4 * i32i))?;
        a.mov(edx, v(var::E_HI + 4 * i32i))?;
        a.test(eax, P as i32)?;
        a.jz(np)?;
        if mode.wide() {
            // NX is reserved while EFER.NXE=0; bit 51 is reserved below 52 address bits.
            let mut nx_ok = a.create_label();
            let mut b51_ok = a.create_label();
            a.test(edx, NX_HI as i32)?;
            a.jz(nx_ok)?;
            a.test(v(var::STATE), ST_NXE as i32)?;
            a.jz(rsvd)?;
            a.set_label(&mut nx_ok)?;
            a.test(edx, RSVD51_HI as i32)?;
            a.jz(b51_ok)?;
            a.cmp(v(var::RSVD51), 0)?;
            a.jne(rsvd)?;
            a.set_label(&mut b51_ok)?;
        } else if l.is_pde {
            // 4 MiB PDE: bit 21 is reserved.
            let mut ok = a.create_label();
            a.test(eax, PS as i32)?;
            a.jz(ok)?;
            a.test(eax, RSVD21 as i32)?;
            a.jnz(rsvd)?;
            a.set_label(&mut ok)?;
        }
        let mut w_ok = a.create_label();
        let mut u_ok = a.create_label();
        a.test(eax, W as i32)?;
        a.jnz(w_ok)?;
        a.and(ebx, !1)?;
        a.set_label(&mut w_ok)?;
        a.test(eax, U as i32)?;
        a.jnz(u_ok)?;
        a.and(ebx, !2)?;
        a.set_label(&mut u_ok)?;
        if mode.wide() {
            let mut nx_off = a.create_label();
            a.test(edx, NX_HI as i32)?;
            a.jz(nx_off)?;
            a.test(v(var::STATE), ST_NXE as i32)?;
            a.jz(nx_off)?;
            a.or(ebx, 4)?;
            a.set_label(&mut nx_off)?;
        }
        if l.is_pde {
            let mut not_leaf = a.create_label();
            a.test(eax, PS as i32)?;
            a.jz(not_leaf)?;
            a.mov(v(var::LEAF), i32i)?;
            a.jmp(rights)?;
            a.set_label(&mut not_leaf)?;
        }
        if i + 1 == levels.len() {
            a.mov(v(var::LEAF), i32i)?;
            a.jmp(rights)?;
        }
        np_labels.push((np, i32i));
        rsvd_labels.push((rsvd, i32i));
    }
    for (mut l, i) in np_labels {
        a.set_label(&mut l)?;
        a.mov(v(var::FAULT_KIND), FK_NOT_PRESENT)?;
        a.mov(v(var::STOP), i)?;
        a.jmp(walk_fault)?;
    }
    for (mut l, i) in rsvd_labels {
        a.set_label(&mut l)?;
        a.mov(v(var::FAULT_KIND), FK_RESERVED)?;
        a.mov(v(var::STOP), i)?;
        a.jmp(walk_fault)?;
    }

    // Access rights of the translation (no SMAP: supervisor reads are always allowed).
    let mut prot = a.create_label();
    let mut supervisor = a.create_label();
    a.set_label(&mut rights)?;
    a.mov(ecx, v(var::ACC_KIND))?;
    a.cmp(v(var::ACC_USER), 0)?;
    a.je(supervisor)?;
    {
        let mut not_write = a.create_label();
        let mut not_fetch = a.create_label();
        a.test(ebx, 2)?;
        a.jz(prot)?;
        a.cmp(ecx, 1)?;
        a.jne(not_write)?;
        a.test(ebx, 1)?;
        a.jz(prot)?;
        a.set_label(&mut not_write)?;
        a.cmp(ecx, 2)?;
        a.jne(not_fetch)?;
        a.test(ebx, 4)?;
        a.jnz(prot)?;
        a.set_label(&mut not_fetch)?;
        a.jmp(walk_fault)?;
    }
    a.set_label(&mut supervisor)?;
    {
        let mut not_write = a.create_label();
        let mut not_fetch = a.create_label();
        a.cmp(ecx, 1)?;
        a.jne(not_write)?;
        a.test(v(var::STATE), ST_WP as i32)?;
        a.jz(not_write)?;
        a.test(ebx, 1)?;
        a.jz(prot)?;
        a.set_label(&mut not_write)?;
        a.cmp(ecx, 2)?;
        a.jne(not_fetch)?;
        a.test(ebx, 4)?;
        a.jnz(prot)?;
        a.test(v(var::STATE), ST_SMEP as i32)?;
        a.jz(not_fetch)?;
        a.test(ebx, 2)?;
        a.jnz(prot)?;
        a.set_label(&mut not_fetch)?;
        a.jmp(walk_fault)?;
    }
    a.set_label(&mut prot)?;
    a.mov(v(var::FAULT_KIND), FK_PROTECTION)?;
    a.set_label(&mut walk_fault)?;

    // Error code: P unless not present; W/R; U/S; RSVD; I/D for fetches when SMEP or (PAE
    // paging and NXE).
    let mut e_p = a.create_label();
    let mut e_w = a.create_label();
    let mut e_u = a.create_label();
    let mut e_r = a.create_label();
    let mut e_id = a.create_label();
    a.xor(eax, eax)?;
    a.cmp(v(var::FAULT_KIND), FK_NOT_PRESENT)?;
    a.je(e_p)?;
    a.or(eax, 1)?;
    a.set_label(&mut e_p)?;
    a.cmp(v(var::ACC_KIND), 1)?;
    a.jne(e_w)?;
    a.or(eax, 2)?;
    a.set_label(&mut e_w)?;
    a.cmp(v(var::ACC_USER), 0)?;
    a.je(e_u)?;
    a.or(eax, 4)?;
    a.set_label(&mut e_u)?;
    a.cmp(v(var::FAULT_KIND), FK_RESERVED)?;
    a.jne(e_r)?;
    a.or(eax, 8)?;
    a.set_label(&mut e_r)?;
    a.cmp(v(var::ACC_KIND), 2)?;
    a.jne(e_id)?;
    let mut id_set = a.create_label();
    a.test(v(var::STATE), ST_SMEP as i32)?;
    a.jnz(id_set)?;
    if mode.wide() {
        a.test(v(var::STATE), ST_NXE as i32)?;
        a.jnz(id_set)?;
    }
    a.jmp(e_id)?;
    a.set_label(&mut id_set)?;
    a.or(eax, 0x10)?;
    a.set_label(&mut e_id)?;
    a.mov(v(var::EXP_ERR), eax)?;
    a.xor(eax, eax)?;
    a.cmp(v(var::FAULT_KIND), FK_NONE)?;
    a.setne(al)?;
    a.mov(v(var::EXP_FAULT), eax)?;

    // The value a read sees: the large page's or the small page's target word.
    let mut small = a.create_label();
    let mut value_done = a.create_label();
    a.mov(eax, v(var::LEAF))?;
    a.cmp(eax, n - 1)?;
    a.je(small)?;
    a.mov(v(var::EXP_VALUE), LARGE_VALUE as i32)?;
    a.jmp(value_done)?;
    a.set_label(&mut small)?;
    a.mov(v(var::EXP_VALUE), SMALL_VALUE as i32)?;
    a.set_label(&mut value_done)?;

    // Accessed and dirty bits. Success: A in every level down to the leaf, D in the leaf
    // for a write. A walk fault at level k: levels above k may get A. A protection fault:
    // levels above the leaf may get A. Nothing else changes.
    let mut not_success = a.create_label();
    let mut ad_done = a.create_label();
    let mut prot_fault = a.create_label();
    a.cmp(v(var::FAULT_KIND), FK_NONE)?;
    a.jne(not_success)?;
    a.mov(ecx, v(var::LEAF))?;
    for i in 0..n {
        let mut skip = a.create_label();
        a.cmp(ecx, i)?;
        a.jb(skip)?;
        a.or(v(var::MUST + 4 * i), A as i32)?;
        a.set_label(&mut skip)?;
    }
    a.cmp(v(var::ACC_KIND), 1)?;
    a.jne(ad_done)?;
    a.or(dword_ptr(ebp + ecx * 4 + var::MUST), D as i32)?;
    a.jmp(ad_done)?;
    a.set_label(&mut not_success)?;
    a.mov(ecx, v(var::STOP))?;
    a.cmp(v(var::FAULT_KIND), FK_PROTECTION)?;
    a.jne(prot_fault)?;
    a.mov(ecx, v(var::LEAF))?;
    a.set_label(&mut prot_fault)?;
    for i in 0..n {
        let mut skip = a.create_label();
        a.cmp(ecx, i)?;
        a.jbe(skip)?;
        a.or(v(var::MAY + 4 * i), A as i32)?;
        a.set_label(&mut skip)?;
    }
    a.ret()?;
    a.set_label(&mut ad_done)?;
    a.ret()
}

pub(crate) fn build_32() -> Result<Image, LinkError> {
    image(PagingMode::Bits32, Coverage::Full)
}
pub(crate) fn build_pae() -> Result<Image, LinkError> {
    image(PagingMode::Pae, Coverage::Full)
}
pub(crate) fn build_4level() -> Result<Image, LinkError> {
    image(PagingMode::FourLevel, Coverage::Full)
}
pub(crate) fn build_4level_quick() -> Result<Image, LinkError> {
    image(PagingMode::FourLevel, Coverage::Reduced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_counts_stay_small_enough_for_a_test_run() {
        for mode in PagingMode::ALL {
            let full = cases_per_state(mode, Coverage::Full);
            let quick = cases_per_state(mode, Coverage::Reduced);
            assert!(quick < full, "{mode:?}");
            assert!(full * 8 < 100_000, "{mode:?}: {full}");
        }
        // 4-level: (16 present PDE kinds x 66 PTE kinds + 2) + 66 large + (16 x 18 + 2)
        // upper, six accesses each.
        assert_eq!(
            cases_per_state(PagingMode::FourLevel, Coverage::Full),
            6 * (16 * 66 + 2 + 66 + 16 * 18 + 2)
        );
    }

    #[test]
    fn the_tested_address_uses_its_own_entries_at_every_level() {
        for mode in PagingMode::ALL {
            let t = mode.target();
            match mode {
                PagingMode::Bits32 => assert_eq!((t >> 22, (t >> 12) & 1023), (256, 5)),
                PagingMode::Pae => {
                    assert_eq!((t >> 30, (t >> 21) & 511, (t >> 12) & 511), (1, 0, 5))
                }
                PagingMode::FourLevel => assert_eq!(
                    (t >> 39, (t >> 30) & 511, (t >> 21) & 511, (t >> 12) & 511),
                    (1, 1, 0, 5)
                ),
            }
            assert_eq!(t & 0x1f_ffff, u64::from(TARGET_OFFSET));
        }
    }
}
