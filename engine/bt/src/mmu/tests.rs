//! Tests of the walker and the soft TLB against a small reference model of SDM vol. 3
//! ch. 4 written here from the manual's rules (it decides from the per-level flags the test
//! chose, not from memory), over page tables built in a small guest memory.

use super::*;
use deja_machine::GuestRam;
use vm_memory::{Bytes, GuestAddress};

const MEM_SIZE: usize = 0x10_0000;

fn memory() -> GuestRam {
    GuestRam::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// xorshift64*: deterministic cases without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[(self.next() % items.len() as u64) as usize]
    }
}

/// The page-table shapes: paging mode and the size of the leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Bits32Page4K,
    Bits32Page4M,
    PaePage4K,
    PaePage2M,
    FourLevelPage4K,
    FourLevelPage2M,
    FourLevelPage1G,
}

const SHAPES: [Shape; 7] = [
    Shape::Bits32Page4K,
    Shape::Bits32Page4M,
    Shape::PaePage4K,
    Shape::PaePage2M,
    Shape::FourLevelPage4K,
    Shape::FourLevelPage2M,
    Shape::FourLevelPage1G,
];

impl Shape {
    fn wide_entries(self) -> bool {
        !matches!(self, Shape::Bits32Page4K | Shape::Bits32Page4M)
    }
    fn four_level(self) -> bool {
        matches!(
            self,
            Shape::FourLevelPage4K | Shape::FourLevelPage2M | Shape::FourLevelPage1G
        )
    }
    fn pae(self) -> bool {
        matches!(self, Shape::PaePage4K | Shape::PaePage2M)
    }
    fn page_bytes(self) -> u64 {
        match self {
            Shape::Bits32Page4K | Shape::PaePage4K | Shape::FourLevelPage4K => 4 << 10,
            Shape::PaePage2M | Shape::FourLevelPage2M => 2 << 20,
            Shape::Bits32Page4M => 4 << 20,
            Shape::FourLevelPage1G => 1 << 30,
        }
    }
    /// The levels walked, top first, with the linear-address bits that index each.
    fn levels(self) -> Vec<(&'static str, u32, u64)> {
        match self {
            Shape::Bits32Page4K => vec![("pde", 22, 0x3ff), ("pte", 12, 0x3ff)],
            Shape::Bits32Page4M => vec![("pde4m", 22, 0x3ff)],
            Shape::PaePage4K => vec![("pdpte", 30, 3), ("pde", 21, 0x1ff), ("pte", 12, 0x1ff)],
            Shape::PaePage2M => vec![("pdpte", 30, 3), ("pde2m", 21, 0x1ff)],
            Shape::FourLevelPage4K => vec![
                ("pml4e", 39, 0x1ff),
                ("pdpte", 30, 0x1ff),
                ("pde", 21, 0x1ff),
                ("pte", 12, 0x1ff),
            ],
            Shape::FourLevelPage2M => vec![
                ("pml4e", 39, 0x1ff),
                ("pdpte", 30, 0x1ff),
                ("pde2m", 21, 0x1ff),
            ],
            Shape::FourLevelPage1G => vec![("pml4e", 39, 0x1ff), ("pdpte1g", 30, 0x1ff)],
        }
    }
    /// Bits the SDM's entry formats (tables 4-4..4-6, 4-7..4-11, 4-14..4-19) call reserved
    /// for a present entry at this level, with MAXPHYADDR = 40.
    fn reserved_bits(self, level: &str) -> Vec<u32> {
        match (self.pae(), self.four_level(), level) {
            (_, _, "pde4m") => vec![21],
            (true, _, "pdpte") => vec![1, 2, 5, 6, 7, 8, 40, 50, 62, 63],
            (true, _, "pde2m") => vec![13, 16, 20, 40, 47, 62],
            (true, _, _) => vec![40, 47, 55, 62],
            (_, true, "pml4e") => vec![7, 40, 45, 51],
            (_, true, "pdpte1g") => vec![13, 21, 29, 40, 51],
            (_, true, "pde2m") => vec![13, 17, 20, 40, 51],
            (_, true, _) => vec![40, 46, 51],
            _ => vec![],
        }
    }
    /// Bits that must change nothing (ignored, available, PAT, D/G of non-leaf entries).
    fn ignored_bits(self, level: &str, pse: bool) -> Vec<u32> {
        let mut bits = vec![9, 10, 11];
        match level {
            "pde" if !self.wide_entries() => {
                bits.extend([6, 8]);
                if !pse {
                    // Without CR4.PSE the PS bit of a 32-bit PDE is ignored.
                    bits.push(7);
                }
            }
            "pte" => bits.push(7),
            "pde4m" | "pde2m" | "pdpte1g" => bits.push(12),
            "pdpte" if self.pae() => bits.extend([3, 4]),
            _ => bits.extend([6, 8]),
        }
        if self.four_level() {
            bits.extend([52, 55, 58, 62]);
        }
        bits
    }
}

#[derive(Clone, Debug)]
struct LevelSpec {
    name: &'static str,
    present: bool,
    writable: bool,
    user: bool,
    execute_disable: bool,
    accessed: bool,
    dirty: bool,
    global: bool,
    reserved_bit: Option<u32>,
    ignored: u64,
}

#[derive(Clone, Debug)]
struct Case {
    shape: Shape,
    pse: bool,
    wp: bool,
    nxe: bool,
    smep: bool,
    /// CR4.SMAP as it applies to the access (the CPU clears it for explicit supervisor
    /// accesses with EFLAGS.AC set).
    smap: bool,
    pge: bool,
    access: Access,
    linear: u64,
    frame: u64,
    levels: Vec<LevelSpec>,
}

/// Where each level's table lives, and CR3 (PAE: a 32-byte aligned PDPT inside a page).
const TABLES: [u64; 4] = [0x10_000, 0x20_000, 0x30_000, 0x40_000];

impl Case {
    fn regs(&self) -> PagingRegs {
        let mut cr4 = 0;
        if self.shape.wide_entries() {
            cr4 |= CR4_PAE;
        }
        if self.pse {
            cr4 |= CR4_PSE;
        }
        if self.pge {
            cr4 |= CR4_PGE;
        }
        if self.smep {
            cr4 |= CR4_SMEP;
        }
        if self.smap {
            cr4 |= CR4_SMAP;
        }
        let mut efer = 0;
        if self.shape.four_level() {
            efer |= EFER_LME | EFER_LMA;
        }
        if self.nxe {
            efer |= EFER_NXE;
        }
        let cr3 = if self.shape.pae() {
            TABLES[0] + 0x5a0
        } else {
            TABLES[0]
        };
        PagingRegs {
            cr0: CR0_PG | 1 | if self.wp { CR0_WP } else { 0 },
            cr3,
            cr4,
            efer,
        }
    }

    /// (address, value, width in bytes) of each level's entry.
    fn entries(&self) -> Vec<(u64, u64, usize)> {
        let regs = self.regs();
        let wide = self.shape.wide_entries();
        let width = if wide { 8 } else { 4 };
        let shape_levels = self.shape.levels();
        let mut out = Vec::new();
        for (i, spec) in self.levels.iter().enumerate() {
            let (_, shift, mask) = shape_levels[i];
            let table = if i == 0 { regs.cr3 } else { TABLES[i] };
            let address = table + ((self.linear >> shift) & mask) * width as u64;
            let last = i + 1 == self.levels.len();
            let pae_pdpte = self.shape.pae() && i == 0;
            let mut value = u64::from(spec.present);
            if !pae_pdpte {
                value |= u64::from(spec.writable) << 1
                    | u64::from(spec.user) << 2
                    | u64::from(spec.accessed) << 5;
                if spec.execute_disable && wide {
                    value |= 1 << 63;
                }
            }
            value |= spec.ignored;
            if last {
                value |= u64::from(spec.dirty) << 6 | u64::from(spec.global) << 8;
                match self.shape {
                    Shape::Bits32Page4M => {
                        value |=
                            1 << 7 | (self.frame & 0xffc0_0000) | ((self.frame >> 32) & 0xff) << 13;
                    }
                    Shape::PaePage2M | Shape::FourLevelPage2M | Shape::FourLevelPage1G => {
                        value |= 1 << 7 | self.frame;
                    }
                    _ => value |= self.frame,
                }
            } else {
                value |= TABLES[i + 1];
            }
            if let Some(bit) = spec.reserved_bit {
                value |= 1 << bit;
            }
            out.push((address, value, width));
        }
        out
    }

    fn write(&self, mem: &GuestRam) {
        for (address, value, width) in self.entries() {
            write_entry(mem, address, value, width);
        }
    }

    fn clear(&self, mem: &GuestRam) {
        for (address, _, width) in self.entries() {
            write_entry(mem, address, 0, width);
        }
    }
}

fn write_entry(mem: &GuestRam, address: u64, value: u64, width: usize) {
    if width == 4 {
        mem.write_obj(value as u32, GuestAddress(address)).unwrap();
    } else {
        mem.write_obj(value, GuestAddress(address)).unwrap();
    }
}

fn read_entry(mem: &GuestRam, address: u64, width: usize) -> u64 {
    if width == 4 {
        u64::from(mem.read_obj::<u32>(GuestAddress(address)).unwrap())
    } else {
        mem.read_obj::<u64>(GuestAddress(address)).unwrap()
    }
}

/// The reference model: SDM 4.6 (access rights), 4.7 (error codes) and the entry formats,
/// decided from the flags the case chose. Ok(physical address) or Err(error code).
fn reference(case: &Case) -> Result<u64, u32> {
    let write = case.access.kind == AccessKind::Write;
    let fetch = case.access.kind == AccessKind::Execute;
    // Execute-disable exists only with 64-bit entries and EFER.NXE.
    let nx_enabled = case.shape.wide_entries() && case.nxe;
    let mut code = 0;
    if write {
        code |= 2;
    }
    if case.access.user {
        code |= 4;
    }
    if fetch && (case.smep || nx_enabled) {
        code |= 16;
    }
    for spec in &case.levels {
        if !spec.present {
            return Err(code);
        }
        // Bit 63 is reserved in 64-bit entries when NXE is off.
        let xd_reserved = case.shape.wide_entries() && !case.nxe && spec.execute_disable;
        if spec.reserved_bit.is_some() || xd_reserved {
            return Err(code | 1 | 8);
        }
    }
    // PAE PDPTEs carry no rights.
    let rights: Vec<&LevelSpec> = case
        .levels
        .iter()
        .skip(usize::from(case.shape.pae()))
        .collect();
    let user_mode_address = rights.iter().all(|l| l.user);
    let read_only = rights.iter().any(|l| !l.writable);
    let no_execute = nx_enabled && rights.iter().any(|l| l.execute_disable);
    let forbidden = if case.access.user {
        // User accesses: only user-mode addresses; writes need R/W everywhere (whatever
        // CR0.WP); fetches need XD clear everywhere.
        !user_mode_address || (write && read_only) || (fetch && no_execute)
    } else {
        // Supervisor accesses: reads anything; writes respect R/W only with CR0.WP;
        // fetches respect XD, and with SMEP never from user-mode addresses; with SMAP data
        // accesses never reach user-mode addresses.
        (write && case.wp && read_only)
            || (fetch && no_execute)
            || (fetch && case.smep && user_mode_address)
            || (!fetch && case.smap && user_mode_address)
    };
    if forbidden {
        return Err(code | 1);
    }
    let linear = if case.shape.four_level() {
        case.linear
    } else {
        case.linear & 0xffff_ffff
    };
    Ok(case.frame + (linear & (case.shape.page_bytes() - 1)))
}

fn random_case(rng: &mut Rng, shape: Shape) -> Case {
    let kind = rng.pick(&[AccessKind::Read, AccessKind::Write, AccessKind::Execute]);
    let access = Access {
        kind,
        user: rng.chance(50),
    };
    let pse = shape == Shape::Bits32Page4M || rng.chance(50);
    let linear = if shape.four_level() {
        // Canonical: sign-extend bit 47.
        let l = rng.next() & 0xffff_ffff_ffff;
        if l & (1 << 47) != 0 {
            l | 0xffff_0000_0000_0000
        } else {
            l
        }
    } else if rng.chance(10) {
        // Upper half set: 32-bit modes must ignore it.
        rng.next()
    } else {
        rng.next() & 0xffff_ffff
    };
    let frame_bits = match shape {
        Shape::Bits32Page4K => 0xffff_f000,
        _ => ((1u64 << 40) - 1) & !(shape.page_bytes() - 1),
    };
    let frame = rng.next() & frame_bits;
    let names = shape.levels();
    // 32-bit 4 KiB mappings have no reserved bits at all.
    let with_reserved: Vec<usize> = (0..names.len())
        .filter(|&i| !shape.reserved_bits(names[i].0).is_empty())
        .collect();
    let reserved_at =
        (!with_reserved.is_empty() && rng.chance(12)).then(|| rng.pick(&with_reserved));
    let mut levels = Vec::new();
    for (i, (name, _, _)) in names.iter().enumerate() {
        let mut ignored = 0;
        if rng.chance(30) {
            ignored |= 1 << rng.pick(&shape.ignored_bits(name, pse));
        }
        let reserved_bit = (reserved_at == Some(i)).then(|| rng.pick(&shape.reserved_bits(name)));
        levels.push(LevelSpec {
            name,
            present: rng.chance(94),
            writable: rng.chance(70),
            user: rng.chance(70),
            execute_disable: !(shape.pae() && i == 0) && rng.chance(20),
            accessed: rng.chance(50),
            dirty: rng.chance(50),
            global: rng.chance(50),
            reserved_bit,
            ignored,
        });
    }
    Case {
        shape,
        pse,
        wp: rng.chance(50),
        nxe: rng.chance(70),
        smep: rng.chance(50),
        smap: rng.chance(50),
        pge: rng.chance(50),
        access,
        linear,
        frame,
        levels,
    }
}

/// Runs one case through a fresh soft TLB and checks the result, the error code, the fault
/// address, the entries' A/D bits afterwards, and the entries the pure walker reports.
fn check_case(mem: &GuestRam, case: &Case) {
    case.write(mem);
    let regs = case.regs();
    let expected = reference(case);
    let before = case.entries();

    // The pure walker first: it must not write, and must report the entries it read.
    let cfg = PagingConfig::from_regs(&regs);
    let Ok(w) = walk(mem, &cfg, None, case.linear, case.access);
    let walked = match expected {
        Ok(_) => before.len(),
        Err(_) => {
            // Up to and including the entry that stopped the walk, or all on a rights fault.
            case.levels
                .iter()
                .position(|l| {
                    !l.present
                        || l.reserved_bit.is_some()
                        || (case.shape.wide_entries() && !case.nxe && l.execute_disable)
                })
                .map_or(before.len(), |i| i + 1)
        }
    };
    let addresses: Vec<u64> = w.entries().iter().map(|e| e.address).collect();
    let expected_addresses: Vec<u64> = before[..walked].iter().map(|e| e.0).collect();
    assert_eq!(addresses, expected_addresses, "walk entries for {case:#x?}");
    for (address, value, width) in &before {
        assert_eq!(read_entry(mem, *address, *width), *value, "walk wrote");
    }

    let mut tlb = SoftTlb::new();
    let got = tlb.translate(mem, &regs, case.linear, case.access);
    let fault_address = if case.shape.four_level() {
        case.linear
    } else {
        case.linear & 0xffff_ffff
    };
    match (expected, got) {
        (Ok(phys), Ok(got)) => assert_eq!(got, phys, "translation of {case:#x?}"),
        (Err(code), Err(pf)) => {
            assert_eq!(
                pf.error_code, code,
                "error code {:#x} expected {code:#x} for {case:#x?}",
                pf.error_code
            );
            assert_eq!(pf.address, fault_address, "fault address");
        }
        (e, g) => panic!("expected {e:x?}, got {g:x?} for {case:#x?}"),
    }

    // Accessed on every entry used (PAE PDPTEs have none), dirty on the leaf for a write;
    // nothing at all on a fault; no other bit touched.
    for (i, (address, value, width)) in before.iter().enumerate() {
        let mut want = *value;
        if expected.is_ok() && !(case.shape.pae() && i == 0) {
            want |= 1 << 5;
            if i + 1 == before.len() && case.access.kind == AccessKind::Write {
                want |= 1 << 6;
            }
        }
        assert_eq!(
            read_entry(mem, *address, *width),
            want,
            "entry {} after the access for {case:#x?}",
            case.levels[i].name
        );
    }

    // A successful translation is now cached: the same access hits and agrees.
    if let Ok(phys) = expected {
        // (Entries are tagged with the address the mode sees: 32 bits outside long mode.)
        let again = tlb.translate(mem, &regs, fault_address, case.access);
        assert_eq!(again, Ok(phys));
        assert_eq!(tlb.stats().get(counters::TLB_HIT), 1, "{case:#x?}");
        assert_eq!(tlb.stats().get(counters::WALKS), 1);
    } else {
        assert_eq!(tlb.stats().get(counters::PF_GUEST), 1);
        assert_eq!(tlb.occupancy(), 0);
    }
    case.clear(mem);
}

#[test]
fn random_walks_match_the_reference_model_in_every_mode() {
    let mem = memory();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for shape in SHAPES {
        let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
        for _ in 0..4000 {
            let case = random_case(&mut rng, shape);
            let key = match reference(&case) {
                Ok(_) => "ok".to_string(),
                Err(code) => format!("{code:#x}"),
            };
            *outcomes.entry(key).or_default() += 1;
            check_case(&mem, &case);
        }
        // The cases must reach every kind of outcome, or the test proves little.
        assert!(
            outcomes.get("ok").copied().unwrap_or(0) > 300,
            "{shape:?}: {outcomes:?}"
        );
        let rsvd = outcomes
            .iter()
            .filter(|(k, _)| {
                u32::from_str_radix(k.trim_start_matches("0x"), 16).is_ok_and(|c| c & 8 != 0)
            })
            .count();
        if shape.wide_entries() || shape == Shape::Bits32Page4M {
            assert!(rsvd > 0, "{shape:?} never hit a reserved bit: {outcomes:?}");
        }
        assert!(outcomes.len() >= 10, "{shape:?}: {outcomes:?}");
    }
}

/// Named cases from the SDM's rules, with the expected outcome written by hand. They check
/// the reference model as much as the implementation.
#[test]
fn sdm_rules_by_name() {
    struct Row {
        name: &'static str,
        shape: Shape,
        /// (writable, user, execute_disable) of every level.
        rights: (bool, bool, bool),
        leaf_rights: (bool, bool, bool),
        access: (AccessKind, bool),
        wp: bool,
        nxe: bool,
        smep: bool,
        /// Ok(()) or the error code.
        expect: Result<(), u32>,
    }
    use AccessKind::{Execute as X, Read as R, Write as W};
    let rows = [
        Row {
            name: "supervisor write to read-only page, WP=0: allowed",
            shape: Shape::FourLevelPage4K,
            rights: (true, false, false),
            leaf_rights: (false, false, false),
            access: (W, false),
            wp: false,
            nxe: false,
            smep: false,
            expect: Ok(()),
        },
        Row {
            name: "supervisor write to read-only page, WP=1: #PF P|W",
            shape: Shape::FourLevelPage4K,
            rights: (true, false, false),
            leaf_rights: (false, false, false),
            access: (W, false),
            wp: true,
            nxe: false,
            smep: false,
            expect: Err(0b11),
        },
        Row {
            name: "user write to read-only upper level, WP=0: #PF P|W|U",
            shape: Shape::PaePage4K,
            rights: (false, true, false),
            leaf_rights: (true, true, false),
            access: (W, true),
            wp: false,
            nxe: false,
            smep: false,
            expect: Err(0b111),
        },
        Row {
            name: "user read of supervisor page: #PF P|U",
            shape: Shape::Bits32Page4K,
            rights: (true, true, false),
            leaf_rights: (true, false, false),
            access: (R, true),
            wp: false,
            nxe: false,
            smep: false,
            expect: Err(0b101),
        },
        Row {
            name: "fetch from XD page with NXE: #PF P|I/D",
            shape: Shape::FourLevelPage2M,
            rights: (true, false, false),
            leaf_rights: (true, false, true),
            access: (X, false),
            wp: true,
            nxe: true,
            smep: false,
            expect: Err(0b1_0001),
        },
        Row {
            name: "XD set with NXE clear: reserved, #PF P|RSVD, no I/D without SMEP",
            shape: Shape::FourLevelPage4K,
            rights: (true, false, false),
            leaf_rights: (true, false, true),
            access: (X, false),
            wp: true,
            nxe: false,
            smep: false,
            expect: Err(0b1001),
        },
        Row {
            name: "supervisor fetch from user page with SMEP: #PF P|I/D",
            shape: Shape::Bits32Page4M,
            rights: (true, true, false),
            leaf_rights: (true, true, false),
            access: (X, false),
            wp: false,
            nxe: false,
            smep: true,
            expect: Err(0b1_0001),
        },
        Row {
            name: "supervisor fetch from user page without SMEP: allowed",
            shape: Shape::Bits32Page4M,
            rights: (true, true, false),
            leaf_rights: (true, true, false),
            access: (X, false),
            wp: false,
            nxe: true,
            smep: false,
            expect: Ok(()),
        },
        Row {
            name: "user fetch from user page, NXE on 32-bit paging (no XD there): allowed",
            shape: Shape::Bits32Page4K,
            rights: (true, true, false),
            leaf_rights: (true, true, false),
            access: (X, true),
            wp: false,
            nxe: true,
            smep: false,
            expect: Ok(()),
        },
        Row {
            name: "user fetch of supervisor page, NXE: #PF P|U|I/D",
            shape: Shape::FourLevelPage1G,
            rights: (true, true, false),
            leaf_rights: (true, false, false),
            access: (X, true),
            wp: false,
            nxe: true,
            smep: false,
            expect: Err(0b1_0101),
        },
        Row {
            name: "supervisor read of user page with SMEP (no SMAP): allowed",
            shape: Shape::PaePage2M,
            rights: (true, true, false),
            leaf_rights: (true, true, false),
            access: (R, false),
            wp: true,
            nxe: true,
            smep: true,
            expect: Ok(()),
        },
    ];
    let mem = memory();
    for row in rows {
        let names = row.shape.levels();
        let n = names.len();
        let levels = names
            .iter()
            .enumerate()
            .map(|(i, (name, _, _))| {
                let (writable, user, execute_disable) = if i + 1 == n {
                    row.leaf_rights
                } else {
                    row.rights
                };
                LevelSpec {
                    name,
                    present: true,
                    writable,
                    user,
                    execute_disable: execute_disable && !(row.shape.pae() && i == 0),
                    accessed: false,
                    dirty: false,
                    global: false,
                    reserved_bit: None,
                    ignored: 0,
                }
            })
            .collect();
        let case = Case {
            shape: row.shape,
            pse: true,
            wp: row.wp,
            nxe: row.nxe,
            smep: row.smep,
            smap: false,
            pge: false,
            access: Access {
                kind: row.access.0,
                user: row.access.1,
            },
            linear: 0x4567_8abc,
            frame: 0,
            levels,
        };
        assert_eq!(
            reference(&case).map(|_| ()),
            row.expect,
            "reference model: {}",
            row.name
        );
        check_case(&mem, &case);
    }
}

/// SMAP (SDM 4.6.1) by name, through the walker's reference model, the soft TLB and every
/// MMU strategy: each row is translated first with SMAP lifted (EFLAGS.AC = 1 on an explicit
/// access, so the strategy caches the translation) and then with SMAP in force, which must
/// fault from the cached entry exactly as from a walk.
#[test]
fn smap_rules_by_name_in_every_strategy() {
    use AccessKind::{Execute as X, Read as R, Write as W};
    // (name, shape, (writable, user) of the upper levels, of the leaf, access (kind,
    // user), CR0.WP, CR4.SMEP, the result with SMAP in force: Ok or the error code)
    type Row = (
        &'static str,
        Shape,
        (bool, bool),
        (bool, bool),
        (AccessKind, bool),
        bool,
        bool,
        Result<(), u32>,
    );
    let rows: [Row; 12] = [
        (
            "supervisor read of a user page: #PF P",
            Shape::FourLevelPage4K,
            (true, true),
            (true, true),
            (R, false),
            true,
            false,
            Err(0b1),
        ),
        (
            "supervisor write to a user page: #PF P|W",
            Shape::FourLevelPage4K,
            (true, true),
            (true, true),
            (W, false),
            true,
            false,
            Err(0b11),
        ),
        (
            "supervisor write to a user page, WP=0: #PF P|W",
            Shape::FourLevelPage2M,
            (true, true),
            (true, true),
            (W, false),
            false,
            false,
            Err(0b11),
        ),
        (
            "supervisor write to a read-only user page, WP=1: #PF P|W",
            Shape::PaePage2M,
            (true, true),
            (false, true),
            (W, false),
            true,
            false,
            Err(0b11),
        ),
        (
            "supervisor read of a supervisor page: allowed",
            Shape::FourLevelPage4K,
            (true, true),
            (true, false),
            (R, false),
            true,
            false,
            Ok(()),
        ),
        (
            "supervisor read, user leaf under a supervisor level (not a user-mode address): allowed",
            Shape::FourLevelPage1G,
            (true, false),
            (true, true),
            (R, false),
            true,
            false,
            Ok(()),
        ),
        (
            "supervisor fetch from a user page without SMEP: allowed",
            Shape::FourLevelPage4K,
            (true, true),
            (true, true),
            (X, false),
            true,
            false,
            Ok(()),
        ),
        (
            "supervisor fetch from a user page with SMEP: #PF P|I/D",
            Shape::FourLevelPage4K,
            (true, true),
            (true, true),
            (X, false),
            true,
            true,
            Err(0b1_0001),
        ),
        (
            "user read of a user page: allowed",
            Shape::FourLevelPage4K,
            (true, true),
            (true, true),
            (R, true),
            true,
            false,
            Ok(()),
        ),
        (
            "user write to a supervisor page: #PF P|W|U",
            Shape::FourLevelPage4K,
            (true, true),
            (true, false),
            (W, true),
            true,
            false,
            Err(0b111),
        ),
        (
            "32-bit paging, supervisor read of a user page: #PF P",
            Shape::Bits32Page4K,
            (true, true),
            (true, true),
            (R, false),
            true,
            false,
            Err(0b1),
        ),
        (
            "32-bit 4 MiB page, supervisor write to a user page: #PF P|W",
            Shape::Bits32Page4M,
            (true, true),
            (true, true),
            (W, false),
            true,
            false,
            Err(0b11),
        ),
    ];
    let mem = memory();
    for (name, shape, upper, leaf, (kind, user), wp, smep, expect) in rows {
        let names = shape.levels();
        let n = names.len();
        let levels = names
            .iter()
            .enumerate()
            .map(|(i, (level, _, _))| {
                let (writable, user) = if i + 1 == n { leaf } else { upper };
                LevelSpec {
                    name: level,
                    present: true,
                    writable,
                    user,
                    execute_disable: false,
                    accessed: false,
                    dirty: false,
                    global: false,
                    reserved_bit: None,
                    ignored: 0,
                }
            })
            .collect();
        let case = Case {
            shape,
            pse: true,
            wp,
            nxe: true,
            smep,
            smap: true,
            pge: false,
            access: Access { kind, user },
            linear: 0x4567_8abc,
            frame: 0x4000_0000,
            levels,
        };
        assert_eq!(
            reference(&case).map(|_| ()),
            expect,
            "reference model: {name}"
        );
        check_case(&mem, &case);
        let lifted = Case {
            smap: false,
            ..case.clone()
        };
        let lifted_result = reference(&lifted);
        for strategy in MmuStrategy::ALL {
            case.write(&mem);
            let mut mmu = strategy.build();
            let got = mmu.translate(&mem, &lifted.regs(), case.linear, case.access);
            assert_eq!(
                got.map_err(|f| f.error_code),
                lifted_result,
                "{strategy}: {name}, SMAP lifted"
            );
            let got = mmu.translate(&mem, &case.regs(), case.linear, case.access);
            assert_eq!(
                got.map(|_| ()).map_err(|f| f.error_code),
                expect,
                "{strategy}: {name}, SMAP in force after a cached translation"
            );
            if let Err(code) = expect {
                let f = mmu
                    .translate(&mem, &case.regs(), case.linear, case.access)
                    .unwrap_err();
                assert_eq!(
                    (f.address, f.error_code),
                    (case.linear, code),
                    "{strategy}: {name}"
                );
            }
        }
    }
}

// ---- Soft-TLB behaviour ------------------------------------------------------------------

/// A 4-level mapping of one page, built by hand.
struct Mapping {
    regs: PagingRegs,
    pte: u64,
}

const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const PT: u64 = 0x4000;
const FLAGS: u64 = 0b111; // P | RW | US

fn four_level_regs() -> PagingRegs {
    PagingRegs {
        cr0: CR0_PG | CR0_WP | 1,
        cr3: PML4,
        cr4: CR4_PAE | CR4_PGE,
        efer: EFER_LME | EFER_LMA | EFER_NXE,
    }
}

/// Maps linear `0x40_0000 + index * 4K` to `frame` with `leaf_flags` in 4-level paging.
fn map_4k(mem: &GuestRam, index: u64, frame: u64, leaf_flags: u64) -> Mapping {
    mem.write_obj(PDPT | FLAGS, GuestAddress(PML4)).unwrap();
    mem.write_obj(PD | FLAGS, GuestAddress(PDPT)).unwrap();
    mem.write_obj(PT | FLAGS, GuestAddress(PD + 2 * 8)).unwrap();
    let pte = PT + index * 8;
    mem.write_obj(frame | leaf_flags, GuestAddress(pte))
        .unwrap();
    Mapping {
        regs: four_level_regs(),
        pte,
    }
}

fn linear_of(index: u64) -> u64 {
    0x40_0000 + index * 0x1000
}

const READ: Access = Access::SUPERVISOR_READ;
const WRITE: Access = Access::SUPERVISOR_WRITE;

#[test]
fn stale_entries_are_used_until_invlpg() {
    let mem = memory();
    let m = map_4k(&mem, 5, 0xa_b000, FLAGS);
    let mut tlb = soft_tlb();
    let lin = linear_of(5) + 0x123;
    assert_eq!(tlb.translate(&mem, &m.regs, lin, READ), Ok(0xa_b123));
    // The guest remaps and even unmaps the page without INVLPG: the CPU may (and ours
    // does) keep using the cached translation.
    mem.write_obj(0xc_d000u64 | FLAGS, GuestAddress(m.pte))
        .unwrap();
    assert_eq!(tlb.translate(&mem, &m.regs, lin, READ), Ok(0xa_b123));
    mem.write_obj(0u64, GuestAddress(m.pte)).unwrap();
    assert_eq!(tlb.translate(&mem, &m.regs, lin, READ), Ok(0xa_b123));
    tlb.invlpg(lin);
    assert_eq!(
        tlb.translate(&mem, &m.regs, lin, READ),
        Err(PageFault {
            address: lin,
            error_code: 0
        })
    );
    mem.write_obj(0xc_d000u64 | FLAGS, GuestAddress(m.pte))
        .unwrap();
    assert_eq!(tlb.translate(&mem, &m.regs, lin, READ), Ok(0xc_d123));
    let s = tlb.stats();
    assert_eq!(s.get(counters::INVLPG), 1);
    assert_eq!(s.get(counters::TLB_HIT), 2);
    assert_eq!(s.get(counters::WALKS), 3);
    assert_eq!(s.get(counters::PF_GUEST), 1);
}

#[test]
fn flush_keeps_only_global_pages_and_full_flush_drops_them() {
    let mem = memory();
    let g = 1 << 8;
    let m = map_4k(&mem, 1, 0x11_000, FLAGS | g);
    map_4k(&mem, 2, 0x22_000, FLAGS);
    let mut tlb = soft_tlb();
    assert_eq!(
        tlb.translate(&mem, &m.regs, linear_of(1), READ),
        Ok(0x11_000)
    );
    assert_eq!(
        tlb.translate(&mem, &m.regs, linear_of(2), READ),
        Ok(0x22_000)
    );
    // Retarget both: only cached translations can still answer the old frames.
    mem.write_obj(0x33_000u64 | FLAGS | g, GuestAddress(PT + 8))
        .unwrap();
    mem.write_obj(0x44_000u64 | FLAGS, GuestAddress(PT + 16))
        .unwrap();
    tlb.flush(false);
    assert_eq!(
        tlb.translate(&mem, &m.regs, linear_of(1), READ),
        Ok(0x11_000)
    );
    assert_eq!(
        tlb.translate(&mem, &m.regs, linear_of(2), READ),
        Ok(0x44_000)
    );
    tlb.flush(true);
    assert_eq!(
        tlb.translate(&mem, &m.regs, linear_of(1), READ),
        Ok(0x33_000)
    );
    assert_eq!(tlb.stats().get(counters::TLB_FLUSH), 2);

    // The G bit without CR4.PGE does not make a page global.
    let mut no_pge = m.regs;
    no_pge.cr4 &= !CR4_PGE;
    let mut tlb = soft_tlb();
    assert_eq!(
        tlb.translate(&mem, &no_pge, linear_of(1), READ),
        Ok(0x33_000)
    );
    mem.write_obj(0x55_000u64 | FLAGS | g, GuestAddress(PT + 8))
        .unwrap();
    tlb.flush(false);
    assert_eq!(
        tlb.translate(&mem, &no_pge, linear_of(1), READ),
        Ok(0x55_000)
    );
}

#[test]
fn invlpg_drops_global_entries_too() {
    let mem = memory();
    let m = map_4k(&mem, 3, 0x11_000, FLAGS | 1 << 8);
    let mut tlb = soft_tlb();
    assert_eq!(
        tlb.translate(&mem, &m.regs, linear_of(3), READ),
        Ok(0x11_000)
    );
    mem.write_obj(0x22_000u64 | FLAGS, GuestAddress(m.pte))
        .unwrap();
    tlb.invlpg(linear_of(3) + 0xfff);
    assert_eq!(
        tlb.translate(&mem, &m.regs, linear_of(3), READ),
        Ok(0x22_000)
    );
}

#[test]
fn a_write_after_a_read_walks_again_to_set_the_dirty_bit() {
    let mem = memory();
    let m = map_4k(&mem, 7, 0x77_000, FLAGS);
    let mut tlb = soft_tlb();
    let lin = linear_of(7);
    assert_eq!(tlb.translate(&mem, &m.regs, lin, READ), Ok(0x77_000));
    let pte = |mem: &GuestRam| mem.read_obj::<u64>(GuestAddress(m.pte)).unwrap();
    assert_eq!(pte(&mem) & 0x60, 0x20, "a read sets A only");
    assert_eq!(tlb.translate(&mem, &m.regs, lin, READ), Ok(0x77_000));
    assert_eq!(tlb.stats().get(counters::WALKS), 1);
    assert_eq!(tlb.translate(&mem, &m.regs, lin, WRITE), Ok(0x77_000));
    assert_eq!(tlb.stats().get(counters::WALKS), 2, "the write re-walked");
    assert_eq!(pte(&mem) & 0x60, 0x60, "and set D");
    // Now the dirty bit is known: writes hit. Clearing D in memory without INVLPG is not
    // noticed (as on hardware).
    mem.write_obj(pte(&mem) & !0x40, GuestAddress(m.pte))
        .unwrap();
    assert_eq!(tlb.translate(&mem, &m.regs, lin, WRITE), Ok(0x77_000));
    assert_eq!(tlb.stats().get(counters::WALKS), 2);
    assert_eq!(pte(&mem) & 0x40, 0);
    // After INVLPG the write walks and sets D again.
    tlb.invlpg(lin);
    assert_eq!(tlb.translate(&mem, &m.regs, lin, WRITE), Ok(0x77_000));
    assert_eq!(pte(&mem) & 0x40, 0x40);
}

#[test]
fn rights_not_cached_walk_again_and_a_fault_drops_the_entry() {
    let mem = memory();
    // Supervisor-only, read-only page.
    let m = map_4k(&mem, 9, 0x99_000, 0b001);
    let mut tlb = soft_tlb();
    let lin = linear_of(9);
    assert_eq!(tlb.translate(&mem, &m.regs, lin, READ), Ok(0x99_000));
    let user_read = Access {
        kind: AccessKind::Read,
        user: true,
    };
    assert_eq!(
        tlb.translate(&mem, &m.regs, lin, user_read),
        Err(PageFault {
            address: lin,
            error_code: PF_PRESENT | PF_USER
        })
    );
    assert_eq!(
        tlb.translate(&mem, &m.regs, lin, WRITE),
        Err(PageFault {
            address: lin,
            error_code: PF_PRESENT | PF_WRITE
        })
    );
    // The guest fixes the PTE (as a page-fault handler would) and retries without INVLPG:
    // the fault dropped the stale entry, so the retry sees the new rights.
    mem.write_obj(0x99_000u64 | FLAGS, GuestAddress(m.pte))
        .unwrap();
    assert_eq!(tlb.translate(&mem, &m.regs, lin, user_read), Ok(0x99_000));
    assert_eq!(tlb.stats().get(counters::PF_GUEST), 2);
}

#[test]
fn invlpg_inside_a_large_page_drops_every_piece_of_it() {
    let mem = memory();
    mem.write_obj(PDPT | FLAGS, GuestAddress(PML4)).unwrap();
    mem.write_obj(PD | FLAGS, GuestAddress(PDPT)).unwrap();
    // 2 MiB page at linear 0x20_0000 -> physical 0x4000_0000.
    mem.write_obj(0x4000_0000u64 | FLAGS | 1 << 7, GuestAddress(PD + 8))
        .unwrap();
    let regs = four_level_regs();
    let mut tlb = soft_tlb();
    for offset in [0x1000, 0x5_0000, 0x1f_f000] {
        assert_eq!(
            tlb.translate(&mem, &regs, 0x20_0000 + offset, READ),
            Ok(0x4000_0000 + offset)
        );
    }
    mem.write_obj(0x6000_0000u64 | FLAGS | 1 << 7, GuestAddress(PD + 8))
        .unwrap();
    tlb.invlpg(0x20_0000 + 0x10_0000);
    for offset in [0x1000, 0x5_0000, 0x1f_f000] {
        assert_eq!(
            tlb.translate(&mem, &regs, 0x20_0000 + offset, READ),
            Ok(0x6000_0000 + offset)
        );
    }
    assert_eq!(tlb.stats().get(counters::WALKS), 6);
}

#[test]
fn paging_off_is_the_identity_and_32_bit_faults_report_32_bit_addresses() {
    let mem = memory();
    let mut tlb = soft_tlb();
    let off = PagingRegs::default();
    assert_eq!(
        tlb.translate(&mem, &off, 0x1234_5678_9abc, WRITE),
        Ok(0x1234_5678_9abc)
    );
    let regs = PagingRegs {
        cr0: CR0_PG | 1,
        cr3: 0x1000,
        cr4: 0,
        efer: 0,
    };
    let pf = tlb
        .translate(&mem, &regs, 0x1_8000_0000 | 0x123, READ)
        .unwrap_err();
    assert_eq!(pf.address, 0x8000_0123);
    assert_eq!(tlb.stats().get(counters::TLB_HIT), 0);
}

#[test]
fn paging_structures_outside_ram_read_as_all_ones() {
    let mem = memory();
    // CR3 points above RAM: the PML4E reads as all ones, present with reserved bits.
    let regs = PagingRegs {
        cr3: 0x8000_0000,
        ..four_level_regs()
    };
    let mut tlb = soft_tlb();
    let pf = tlb.translate(&mem, &regs, 0x1000, READ).unwrap_err();
    assert_eq!(pf.error_code, PF_PRESENT | PF_RESERVED);
}

fn pae_regs(cr3: u64) -> PagingRegs {
    PagingRegs {
        cr0: CR0_PG | 1,
        cr3,
        cr4: CR4_PAE,
        efer: 0,
    }
}

#[test]
fn pae_pdptes_are_registers_loaded_at_cr3_load() {
    let mem = memory();
    let cr3 = 0x1fe0;
    // PDPTE 1 (linear 0x4000_0000..) -> PD at 0x3000 -> PT at 0x4000 -> frame 0x5000.
    mem.write_obj(PD | 1, GuestAddress(cr3 + 8)).unwrap();
    mem.write_obj(PT | FLAGS, GuestAddress(PD)).unwrap();
    mem.write_obj(0x5000u64 | FLAGS, GuestAddress(PT)).unwrap();
    let regs = pae_regs(cr3);
    let mut tlb = soft_tlb();
    let loaded = tlb.load_pdptes(&mem, &regs).unwrap();
    assert_eq!(loaded, [0, PD | 1, 0, 0]);
    // Rewriting the PDPT in memory changes nothing until the next load.
    mem.write_obj(0u64, GuestAddress(cr3 + 8)).unwrap();
    tlb.flush(false);
    assert_eq!(tlb.translate(&mem, &regs, 0x4000_0010, READ), Ok(0x5010));
    // A PDPTE register's A bit does not exist: the PDPT in memory is untouched.
    assert_eq!(mem.read_obj::<u64>(GuestAddress(cr3 + 8)).unwrap(), 0);
    tlb.load_pdptes(&mem, &regs).unwrap();
    tlb.flush(false);
    assert_eq!(
        tlb.translate(&mem, &regs, 0x4000_0010, READ),
        Err(PageFault {
            address: 0x4000_0010,
            error_code: 0
        })
    );
    // A reserved bit in a present PDPTE makes the load fail (#GP for the CPU); an absent
    // PDPTE's other bits are free.
    mem.write_obj(PD | 1 | 1 << 5, GuestAddress(cr3 + 16))
        .unwrap();
    mem.write_obj(0xffff_fff0u64, GuestAddress(cr3 + 24))
        .unwrap();
    let err = tlb.load_pdptes(&mem, &regs).unwrap_err();
    assert_eq!(
        err,
        MmuError::ReservedPdpte {
            index: 2,
            address: cr3 + 16,
            cr3,
            value: PD | 1 | 1 << 5,
            reserved: 1 << 5
        }
    );
    assert!(err.to_string().contains("#GP"));
    // Without explicit loads, translate loads them lazily after every flush.
    let mut lazy = soft_tlb();
    mem.write_obj(PD | 1, GuestAddress(cr3 + 8)).unwrap();
    assert_eq!(lazy.translate(&mem, &regs, 0x4000_0010, READ), Ok(0x5010));
    mem.write_obj(0u64, GuestAddress(cr3 + 8)).unwrap();
    lazy.flush(false);
    assert_eq!(
        lazy.translate(&mem, &regs, 0x4000_0010, READ)
            .unwrap_err()
            .error_code,
        0
    );
    assert_eq!(lazy.stats().get(counters::PDPTE_LOAD), 2);
}

#[test]
fn stats_name_every_counter() {
    let tlb = soft_tlb();
    let names: Vec<String> = tlb.stats().counters.keys().cloned().collect();
    for name in [
        counters::TLB_HIT,
        counters::TLB_MISS,
        counters::WALKS,
        counters::INVLPG,
        counters::TLB_FLUSH,
        counters::PF_GUEST,
        counters::PDPTE_LOAD,
    ] {
        assert!(names.iter().any(|n| n == name), "{name} missing");
        assert!(name.starts_with("mmu."));
    }
}

#[test]
fn a_page_fault_invalidates_the_cached_translation_of_its_address() {
    let mem = memory();
    // Read-only page: a read caches it.
    let m = map_4k(&mem, 4, 0xa_a000, 0b101);
    let mut tlb = soft_tlb();
    let lin = linear_of(4);
    assert_eq!(tlb.translate(&mem, &m.regs, lin, READ), Ok(0xa_a000));
    // Retarget without INVLPG; a write still faults (the new PTE is read-only too), and
    // the fault drops the stale entry (SDM 4.10.4.1), so the next read sees the new frame.
    mem.write_obj(0xb_b000u64 | 0b101, GuestAddress(m.pte))
        .unwrap();
    assert_eq!(
        tlb.translate(&mem, &m.regs, lin, WRITE)
            .unwrap_err()
            .error_code,
        PF_PRESENT | PF_WRITE
    );
    assert_eq!(tlb.translate(&mem, &m.regs, lin, READ), Ok(0xb_b000));
}

/// Every combination of P, R/W, U/S and XD on the leaf and (uniformly) on the upper levels,
/// × access kind × user/supervisor × CR0.WP × EFER.NXE × CR4.SMEP × CR4.PGE with G ×
/// CR4.SMAP, in every shape, against the reference model.
#[test]
fn exhaustive_rights_combinations_match_the_reference_model() {
    let mem = memory();
    let mut checked = 0;
    for shape in SHAPES {
        let names = shape.levels();
        for flags in 0u32..1 << 15 {
            let bit = |i: u32| flags & (1 << i) != 0;
            let leaf = (bit(0), bit(1), bit(2), bit(3));
            let upper = (bit(4), bit(5), bit(6));
            let kind = match (flags >> 7) % 4 {
                0 => AccessKind::Read,
                1 => AccessKind::Write,
                2 => AccessKind::Execute,
                _ => continue,
            };
            let levels = names
                .iter()
                .enumerate()
                .map(|(i, (name, _, _))| {
                    let last = i + 1 == names.len();
                    let pdpte_register = shape.pae() && i == 0;
                    let (present, writable, user, xd) = if last {
                        leaf
                    } else {
                        (true, upper.0, upper.1, upper.2)
                    };
                    LevelSpec {
                        name,
                        present,
                        writable,
                        user,
                        execute_disable: xd && !pdpte_register,
                        accessed: false,
                        dirty: false,
                        global: last,
                        reserved_bit: None,
                        ignored: 0,
                    }
                })
                .collect();
            let case = Case {
                shape,
                pse: true,
                wp: bit(9),
                nxe: bit(10),
                smep: bit(11),
                smap: bit(14),
                pge: bit(12),
                access: Access {
                    kind,
                    user: bit(13),
                },
                linear: 0x7654_3210,
                frame: shape.page_bytes() * 3,
                levels,
            };
            check_case(&mem, &case);
            checked += 1;
        }
    }
    assert_eq!(checked, 7 * 3 * (1 << 13));
}

#[test]
fn strategies_parse_by_name_and_all_exist() {
    for s in MmuStrategy::ALL {
        assert_eq!(s.name().parse::<MmuStrategy>(), Ok(s));
        assert_eq!(s.to_string(), s.name());
    }
    let err = "ept".parse::<MmuStrategy>().unwrap_err();
    assert!(err.to_string().contains("\"ept\""), "{err}");
    for s in MmuStrategy::ALL {
        assert!(s.create().is_ok(), "{s}");
    }
}

#[test]
fn paging_regs_come_from_the_cpu_state() {
    let mut state = deja_machine::CpuState::reset();
    state.cr0 |= CR0_PG;
    state.cr3 = 0x1000;
    state.cr4 = CR4_PAE;
    state.efer = EFER_LME | EFER_LMA;
    let regs = PagingRegs::from_state(&state);
    assert_eq!(PagingConfig::from_regs(&regs).mode, PagingMode::FourLevel);
    assert_eq!(regs.cr3, 0x1000);
}
