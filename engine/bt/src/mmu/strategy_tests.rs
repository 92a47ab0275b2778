//! Tests of the three MMU strategies against each other and against a walk made afresh for
//! every access: same translations, faults, error codes, CR2 and guest A/D bits on the same
//! sequences of accesses, CR3 switches, PTE writes, INVLPG and CR4 changes; and the
//! counters each strategy keeps.

use super::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 0x40_0000;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// xorshift64*: deterministic sequences without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The reference: no cache at all, a walk (and its A/D updates) for every access.
struct FreshWalk;

impl Mmu for FreshWalk {
    fn translate(
        &mut self,
        mem: &GuestMemoryMmap,
        regs: &PagingRegs,
        linear: u64,
        access: Access,
    ) -> Result<u64, PageFault> {
        let cfg = PagingConfig::from_regs(regs);
        if cfg.mode == PagingMode::Disabled {
            return Ok(linear);
        }
        let pdptes = (cfg.mode == PagingMode::Pae).then(|| read_pae_pdptes(mem, cfg.cr3).unwrap());
        let Ok(w) = walk(mem, &cfg, pdptes.as_ref(), linear, access);
        let Ok(()) = set_accessed_dirty(mem, &w, access.kind);
        w.result.map(|t| t.phys)
    }
    fn invlpg(&mut self, _linear: u64) {}
    fn flush(&mut self, _include_global: bool) {}
    fn stats(&self) -> EngineStats {
        EngineStats::default()
    }
}

const P: u64 = 1;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const G: u64 = 1 << 8;
const XD: u64 = 1 << 63;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Bits32,
    Pae,
    FourLevel,
}

impl Mode {
    fn width(self) -> u64 {
        if self == Mode::Bits32 { 4 } else { 8 }
    }
    /// Shift of the page-directory index.
    fn pd_shift(self) -> u32 {
        if self == Mode::Bits32 { 22 } else { 21 }
    }
    fn regs(self, cr3: u64) -> PagingRegs {
        match self {
            Mode::Bits32 => PagingRegs {
                cr0: CR0_PG | CR0_WP | 1,
                cr3,
                cr4: CR4_PSE | CR4_PGE,
                efer: 0,
            },
            Mode::Pae => PagingRegs {
                cr0: CR0_PG | CR0_WP | 1,
                cr3,
                cr4: CR4_PAE | CR4_PGE,
                efer: EFER_NXE,
            },
            Mode::FourLevel => PagingRegs {
                cr0: CR0_PG | CR0_WP | 1,
                cr3,
                cr4: CR4_PAE | CR4_PGE,
                efer: EFER_LME | EFER_LMA | EFER_NXE,
            },
        }
    }
}

/// Writes a paging-structure entry of `mode`'s width.
fn put(mem: &GuestMemoryMmap, mode: Mode, address: u64, value: u64) {
    if mode == Mode::Bits32 {
        mem.write_obj(value as u32, GuestAddress(address)).unwrap();
    } else {
        mem.write_obj(value, GuestAddress(address)).unwrap();
    }
}

/// One address space: root → (PAE: PDPT → ) page directory; PD entry 0 → a private page
/// table, entry 1 → the page table of global pages shared by every address space, entry 2
/// a private large page.
struct Space {
    cr3: u64,
    pd: u64,
    pt: u64,
}

/// Where the test's paging structures live.
const PT_GLOBAL: u64 = 0x1000;
const FRAMES: u64 = 0x10_0000;

fn build_space(mem: &GuestMemoryMmap, mode: Mode, base: u64) -> Space {
    let (cr3, pd) = match mode {
        Mode::Bits32 => (base, base),
        Mode::Pae => {
            put(mem, mode, base, (base + 0x1000) | P);
            (base, base + 0x1000)
        }
        Mode::FourLevel => {
            // Upper entries start accessed: global pages are reached without a walk in
            // another space, which would otherwise leave its upper entries unaccessed where
            // a fresh walk sets them (both are architectural).
            put(mem, mode, base, (base + 0x1000) | P | RW | US | A);
            put(mem, mode, base + 0x1000, (base + 0x2000) | P | RW | US | A);
            (base, base + 0x2000)
        }
    };
    let pt = base + 0x3000;
    put(mem, mode, pd, pt | P | RW | US);
    // Accessed already: a global translation cached through one space is used in another
    // without a walk, so this entry of the other space would otherwise stay unaccessed.
    put(mem, mode, pd + mode.width(), PT_GLOBAL | P | RW | A);
    put(
        mem,
        mode,
        pd + 2 * mode.width(),
        large_frame(mode) | PS | P | RW | US,
    );
    Space { cr3, pd, pt }
}

/// A frame aligned for the mode's large pages (4 MiB in 32-bit paging, else 2 MiB).
fn large_frame(mode: Mode) -> u64 {
    1 << mode.pd_shift()
}

fn leaf_flags(rng: &mut Rng, mode: Mode, global: bool) -> u64 {
    let mut f = 0;
    for (bit, pct) in [(P, 92), (RW, 70), (US, 70), (A, 40), (D, 30)] {
        if rng.chance(pct) {
            f |= bit;
        }
    }
    if global && rng.chance(80) {
        f |= G;
    }
    if mode != Mode::Bits32 && rng.chance(20) {
        f |= XD;
    }
    if rng.chance(3) {
        // A reserved bit: bit 51 in wide entries (above MAXPHYADDR), bit 21 of a PSE PDE
        // is not reachable from a 4K PTE in 32-bit paging, so use a wide-only bit.
        if mode != Mode::Bits32 {
            f |= 1 << 51;
        }
    }
    f
}

struct Machine {
    name: &'static str,
    mem: GuestMemoryMmap,
    mmu: Box<dyn Mmu>,
}

fn machines(mode: Mode, setup: &dyn Fn(&GuestMemoryMmap)) -> Vec<Machine> {
    let mut v = Vec::new();
    for (name, mmu) in [
        ("fresh", Box::new(FreshWalk) as Box<dyn Mmu>),
        ("tlb", MmuStrategy::Tlb.create().unwrap()),
        ("shadow", MmuStrategy::Shadow.create().unwrap()),
        ("nested", MmuStrategy::Nested.create().unwrap()),
    ] {
        let mem = memory();
        setup(&mem);
        let _ = mode;
        v.push(Machine { name, mem, mmu });
    }
    v
}

/// A guest store of one entry, as the engine makes it: the store, then the MMU told if the
/// page is write-tracked.
fn guest_store(m: &mut Machine, mode: Mode, address: u64, value: u64) {
    let tracked = m.mmu.is_write_tracked(address);
    put(&m.mem, mode, address, value);
    if tracked {
        m.mmu
            .note_guest_write(&m.mem, address, mode.width() as usize);
    }
}

fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut v = vec![0u8; FRAMES as usize];
    mem.read_slice(&mut v, GuestAddress(0)).unwrap();
    v
}

fn run_random_sequence(mode: Mode, seed: u64, steps: usize) -> Vec<EngineStats> {
    let mut rng = Rng(seed);
    let spaces_at = [0x1_0000u64, 0x2_0000, 0x3_0000];
    let mut init = Vec::new();
    {
        let mem = memory();
        for &b in &spaces_at {
            build_space(&mem, mode, b);
        }
        for i in 0..8 {
            init.push((
                PT_GLOBAL + i * mode.width(),
                (FRAMES + (i << 12)) | P | RW | A | G,
            ));
        }
        for &b in &spaces_at {
            let pt = b + 0x3000;
            for i in 0..16 {
                let frame = FRAMES + ((rng.below(200)) << 12);
                init.push((
                    pt + i * mode.width(),
                    frame | leaf_flags(&mut rng, mode, false),
                ));
            }
        }
    }
    let setup = |mem: &GuestMemoryMmap| {
        for &b in &spaces_at {
            build_space(mem, mode, b);
        }
        for &(a, v) in &init {
            put(mem, mode, a, v);
        }
    };
    let mut ms = machines(mode, &setup);
    let spaces: Vec<Space> = spaces_at
        .iter()
        .map(|&b| build_space(&memory(), mode, b))
        .collect();
    let mut current = 0usize;
    let mut regs = mode.regs(spaces[0].cr3);
    let pd_span = 1u64 << mode.pd_shift();
    for step in 0..steps {
        let what = rng.below(100);
        if what < 75 {
            // An access: private pages, global pages, the large page, or unmapped space.
            let region = rng.below(4);
            let page = if rng.chance(80) {
                rng.below(5)
            } else {
                rng.below(18)
            };
            let linear = region * pd_span + (page << 12) + rng.below(0x1000);
            let kind =
                [AccessKind::Read, AccessKind::Write, AccessKind::Execute][rng.below(3) as usize];
            let access = Access {
                kind,
                user: rng.chance(40),
            };
            let results: Vec<_> = ms
                .iter_mut()
                .map(|m| m.mmu.translate(&m.mem, &regs, linear, access))
                .collect();
            for (m, r) in ms.iter().zip(&results) {
                assert_eq!(
                    *r, results[0],
                    "{mode:?} seed {seed} step {step}: {} translated {linear:#x} {access:?} differently from a fresh walk",
                    m.name
                );
            }
        } else if what < 88 {
            // A guest PTE write, followed by what the architecture requires.
            let target = rng.below(10);
            let flags_global = target == 0;
            let (address, value, linear) = if target == 0 {
                let i = rng.below(8);
                let frame = FRAMES + (rng.below(200) << 12);
                (
                    PT_GLOBAL + i * mode.width(),
                    frame | leaf_flags(&mut rng, mode, true) & !US,
                    pd_span + (i << 12),
                )
            } else if target == 1 {
                // The private page-table pointer (an upper-level entry).
                let flags = leaf_flags(&mut rng, mode, false) & !(G | D | 1 << 51) | P;
                (spaces[current].pd, spaces[current].pt | flags, u64::MAX)
            } else if target == 2 {
                let flags = leaf_flags(&mut rng, mode, false) & !G;
                (
                    spaces[current].pd + 2 * mode.width(),
                    (large_frame(mode) * (1 + rng.below(2))) | PS | flags,
                    2 * pd_span,
                )
            } else {
                // A private PTE of this or another address space.
                let s = rng.below(3) as usize;
                let i = rng.below(16);
                let frame = FRAMES + (rng.below(200) << 12);
                let linear = if s == current { i << 12 } else { u64::MAX - 1 };
                (
                    spaces[s].pt + i * mode.width(),
                    frame | leaf_flags(&mut rng, mode, false),
                    linear,
                )
            };
            let _ = flags_global;
            for m in ms.iter_mut() {
                guest_store(m, mode, address, value);
                match linear {
                    u64::MAX => m.mmu.flush(true),
                    l if l == u64::MAX - 1 => {}
                    l => m.mmu.invlpg(l),
                }
            }
        } else if what < 95 {
            // A CR3 load.
            current = rng.below(3) as usize;
            regs.cr3 = spaces[current].cr3;
            for m in ms.iter_mut() {
                m.mmu.flush(false);
                if mode == Mode::Pae {
                    m.mmu.load_pdptes(&m.mem, &regs).unwrap();
                }
            }
        } else if what < 98 {
            // CR4.PGE, CR4.SMEP or CR0.WP toggled.
            match rng.below(3) {
                0 => regs.cr4 ^= CR4_PGE,
                1 => regs.cr4 ^= CR4_SMEP,
                _ => regs.cr0 ^= CR0_WP,
            }
            for m in ms.iter_mut() {
                m.mmu.flush(true);
            }
        } else {
            let linear = rng.below(4) * pd_span + (rng.below(18) << 12);
            for m in ms.iter_mut() {
                m.mmu.invlpg(linear);
            }
        }
        let reference = snapshot(&ms[0].mem);
        for m in &ms[1..] {
            assert!(
                snapshot(&m.mem) == reference,
                "{mode:?} seed {seed} step {step}: {} left different A/D bits in the guest tables",
                m.name
            );
        }
    }
    ms.iter().map(|m| m.mmu.stats()).collect()
}

#[test]
fn random_sequences_agree_across_strategies_and_with_a_fresh_walk() {
    for mode in [Mode::Bits32, Mode::Pae, Mode::FourLevel] {
        for seed in 1..=6u64 {
            let stats = run_random_sequence(mode, seed.wrapping_mul(0x9e37_79b9_7f4a_7c15), 600);
            let shadow = &stats[2];
            // The sequences must have exercised the machinery, not just agreed trivially.
            assert!(
                shadow.get(counters::TLB_HIT) > 0,
                "{mode:?} {seed}: {shadow:?}"
            );
            assert!(
                shadow.get(counters::PF_FIXED) > 0,
                "{mode:?} {seed}: {shadow:?}"
            );
            assert!(
                shadow.get(counters::PF_GUEST) > 0,
                "{mode:?} {seed}: {shadow:?}"
            );
            assert!(
                shadow.get(counters::MMU_PTE_WRITE) > 0,
                "{mode:?} {seed}: {shadow:?}"
            );
            assert_eq!(stats[3].get(counters::MMU_PTE_WRITE), 0);
            assert!(stats[3].get(counters::WALK_REFS) > stats[3].get(counters::WALKS));
        }
    }
}
