//! Tests of the three MMU strategies against each other and against a walk made afresh for
//! every access: same translations, faults, error codes, CR2 and guest A/D bits on the same
//! sequences of accesses, CR3 switches, PTE writes, INVLPG and CR4 changes; and the
//! counters each strategy keeps.

use super::*;
use crate::track::{PAGE_TABLE, PageTrack};
use deja_machine::GuestRam;
use vm_memory::{Bytes, GuestAddress};

const MEM_SIZE: usize = 0x40_0000;

fn memory() -> GuestRam {
    GuestRam::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
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
        mem: &GuestRam,
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
        let Ok(_) = set_accessed_dirty(mem, &w, access.kind);
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
fn put(mem: &GuestRam, mode: Mode, address: u64, value: u64) {
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

fn build_space(mem: &GuestRam, mode: Mode, base: u64) -> Space {
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
    mem: GuestRam,
    mmu: Box<dyn Mmu>,
    /// The engine's write-tracking set, as the MMU's events leave it.
    track: PageTrack,
}

impl Machine {
    /// Applies the MMU's pending events as the engine does, then says whether stores to
    /// `phys` are reported to the MMU.
    fn traced(&mut self, phys: u64) -> bool {
        let mut events = Vec::new();
        self.mmu.drain_events(&mut events);
        for e in events {
            match e {
                MmuEvent::Track(page) => {
                    self.track.track(page, PAGE_TABLE);
                }
                MmuEvent::Untrack(page) => self.track.untrack(page, PAGE_TABLE),
                MmuEvent::Stored(_) => {}
            }
        }
        self.track.reasons(phys >> 12) & PAGE_TABLE != 0
    }
}

fn machines(mode: Mode, setup: &dyn Fn(&GuestRam)) -> Vec<Machine> {
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
        v.push(Machine {
            name,
            mem,
            mmu,
            track: PageTrack::new(),
        });
    }
    v
}

/// A guest store of one entry, as the engine makes it: the store, then the MMU told if the
/// page is write-tracked.
fn guest_store(m: &mut Machine, mode: Mode, address: u64, value: u64) {
    let tracked = m.traced(address);
    put(&m.mem, mode, address, value);
    if tracked {
        m.mmu
            .note_guest_write(&m.mem, address, mode.width() as usize);
    }
}

fn snapshot(mem: &GuestRam) -> Vec<u8> {
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
    let setup = |mem: &GuestRam| {
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
            // SMAP as it applies to this access: it comes and goes with EFLAGS.AC, with no
            // flush, so cached rights must be checked against it on every hit.
            let mut access_regs = regs;
            if rng.chance(50) {
                access_regs.cr4 |= CR4_SMAP;
            }
            let results: Vec<_> = ms
                .iter_mut()
                .map(|m| m.mmu.translate(&m.mem, &access_regs, linear, access))
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

/// Two 4-level address spaces; page 0 of each maps a private frame, page 0 of the global
/// region maps a global frame.
fn two_spaces(mem: &GuestRam) -> (Space, Space) {
    let mode = Mode::FourLevel;
    let a = build_space(mem, mode, 0x1_0000);
    let b = build_space(mem, mode, 0x2_0000);
    put(mem, mode, a.pt, FRAMES | P | RW | US);
    put(mem, mode, a.pt + 8, (FRAMES + 0x1000) | P | RW | US);
    put(mem, mode, b.pt, (FRAMES + 0x8000) | P | RW | US);
    put(mem, mode, PT_GLOBAL, (FRAMES + 0x4000) | P | RW | G);
    (a, b)
}

const READ: Access = Access::SUPERVISOR_READ;
const GLOBAL_PAGE: u64 = 1 << 21;

fn stat(mmu: &dyn Mmu, name: &str) -> u64 {
    mmu.stats().get(name)
}

#[test]
fn a_pte_write_on_a_tracked_page_is_traced_under_shadow_only() {
    for strategy in MmuStrategy::ALL {
        let mem = memory();
        let (a, _) = two_spaces(&mem);
        let regs = Mode::FourLevel.regs(a.cr3);
        let mut m = Machine {
            name: strategy.name(),
            mem,
            mmu: strategy.create().unwrap(),
            track: PageTrack::new(),
        };
        assert_eq!(
            m.mmu.translate(&m.mem, &regs, 0x123, READ),
            Ok(FRAMES + 0x123)
        );
        let traced = strategy == MmuStrategy::Shadow;
        assert_eq!(m.traced(a.pt), traced, "{}", m.name);
        assert_eq!(m.traced(a.pt + 0xff8), traced, "{}", m.name);
        assert!(!m.traced(FRAMES), "{}: a data page", m.name);
        // The guest points the PTE at another frame (already accessed) and invalidates it.
        guest_store(
            &mut m,
            Mode::FourLevel,
            a.pt,
            (FRAMES + 0x3000) | P | RW | US | A,
        );
        m.mmu.invlpg(0);
        let misses = stat(&*m.mmu, counters::TLB_MISS);
        assert_eq!(
            m.mmu.translate(&m.mem, &regs, 0x123, READ),
            Ok(FRAMES + 0x3123)
        );
        let s = m.mmu.stats();
        if traced {
            assert_eq!(s.get(counters::MMU_PTE_WRITE), 1);
            assert_eq!(s.get(counters::MMU_PTE_UPDATED), 1);
            // The entry was updated in place and its table is in sync: INVLPG keeps it.
            assert_eq!(s.get(counters::TLB_MISS), misses, "{}", m.name);
        } else {
            assert_eq!(s.get(counters::MMU_PTE_WRITE), 0, "{}", m.name);
            assert_eq!(s.get(counters::TLB_MISS), misses + 1, "{}", m.name);
        }
    }
}

#[test]
fn a_traced_pte_write_updates_the_shadow_in_place_without_a_miss() {
    let mem = memory();
    let (a, _) = two_spaces(&mem);
    let regs = Mode::FourLevel.regs(a.cr3);
    let mut m = Machine {
        name: "shadow",
        mem,
        mmu: Box::new(ShadowMmu::new()),
        track: PageTrack::new(),
    };
    assert_eq!(
        m.mmu.translate(&m.mem, &regs, 0x10, READ),
        Ok(FRAMES + 0x10)
    );
    guest_store(
        &mut m,
        Mode::FourLevel,
        a.pt,
        (FRAMES + 0x5000) | P | US | A,
    );
    let misses = stat(&*m.mmu, counters::TLB_MISS);
    // Already updated before the INVLPG: the shadow follows the guest entry.
    assert_eq!(
        m.mmu.translate(&m.mem, &regs, 0x10, READ),
        Ok(FRAMES + 0x5010)
    );
    assert_eq!(stat(&*m.mmu, counters::TLB_MISS), misses);
    // An entry not yet accessed cannot be installed ahead of the access: it is zapped.
    guest_store(&mut m, Mode::FourLevel, a.pt, (FRAMES + 0x6000) | P | US);
    assert_eq!(stat(&*m.mmu, counters::MMU_SHADOW_ZAPPED), 1);
    assert_eq!(
        m.mmu.translate(&m.mem, &regs, 0x10, READ),
        Ok(FRAMES + 0x6010)
    );
    assert_eq!(stat(&*m.mmu, counters::TLB_MISS), misses + 1);
    // Read-only (CR0.WP set): a supervisor write faults with P|W and CR2 = the address, and
    // the fault drops the shadow entry, so the page is no longer traced.
    assert_eq!(
        m.mmu
            .translate(&m.mem, &regs, 0x10, Access::SUPERVISOR_WRITE),
        Err(PageFault {
            address: 0x10,
            error_code: PF_PRESENT | PF_WRITE
        })
    );
    assert_eq!(stat(&*m.mmu, counters::PF_GUEST), 1);
    assert!(!m.traced(a.pt));
}

#[test]
fn nested_cold_misses_cost_24_references_for_4k_pages_on_4_level() {
    let mem = memory();
    let (a, _) = two_spaces(&mem);
    let mut nested = NestedMmu::new();
    let regs = Mode::FourLevel.regs(a.cr3);
    assert_eq!(nested.translate(&mem, &regs, 0x20, READ), Ok(FRAMES + 0x20));
    assert_eq!(stat(&nested, counters::WALKS), 1);
    assert_eq!(stat(&nested, counters::WALK_REFS), 24);
    assert!(nested.ept_tables() >= 4);
    // A hit walks nothing.
    assert_eq!(nested.translate(&mem, &regs, 0x28, READ), Ok(FRAMES + 0x28));
    assert_eq!(stat(&nested, counters::WALK_REFS), 24);
    assert_eq!(stat(&nested, counters::TLB_HIT), 1);
    // A 2 MiB guest page: three guest levels, 3 * (4 + 1) + 4 = 19.
    assert_eq!(
        nested.translate(&mem, &regs, 2 << 21, READ),
        Ok(large_frame(Mode::FourLevel))
    );
    assert_eq!(stat(&nested, counters::WALK_REFS), 24 + 19);
    // A fault still paid for the levels it read: not present at the PD, after 3 levels.
    assert!(nested.translate(&mem, &regs, 3 << 21, READ).is_err());
    assert_eq!(stat(&nested, counters::WALK_REFS), 24 + 19 + 15);
    // 32-bit paging: two guest levels, 2 * (4 + 1) + 4 = 14.
    let mem32 = memory();
    let s = build_space(&mem32, Mode::Bits32, 0x1_0000);
    put(&mem32, Mode::Bits32, s.pt, FRAMES | P | RW);
    let mut nested = NestedMmu::new();
    let regs = Mode::Bits32.regs(s.cr3);
    assert_eq!(
        nested.translate(&mem32, &regs, 0x30, READ),
        Ok(FRAMES + 0x30)
    );
    assert_eq!(stat(&nested, counters::WALK_REFS), 14);
}

#[test]
fn a_cr3_switch_back_to_a_cached_root_hits_under_shadow_and_misses_under_tlb() {
    for strategy in [MmuStrategy::Shadow, MmuStrategy::Tlb] {
        let mem = memory();
        let (a, b) = two_spaces(&mem);
        let mut mmu = strategy.create().unwrap();
        let ra = Mode::FourLevel.regs(a.cr3);
        let rb = Mode::FourLevel.regs(b.cr3);
        assert_eq!(mmu.translate(&mem, &ra, 0x1, READ), Ok(FRAMES + 1));
        mmu.flush(false);
        assert_eq!(mmu.translate(&mem, &rb, 0x1, READ), Ok(FRAMES + 0x8001));
        mmu.flush(false);
        let before = mmu.stats();
        assert_eq!(mmu.translate(&mem, &ra, 0x1, READ), Ok(FRAMES + 1));
        let after = mmu.stats();
        let misses = after.get(counters::TLB_MISS) - before.get(counters::TLB_MISS);
        assert_eq!(after.get(counters::TLB_FLUSH), 2, "{strategy}");
        if strategy == MmuStrategy::Shadow {
            assert_eq!(misses, 0, "the cached shadow of A answers");
            assert_eq!(after.get(counters::MMU_CACHE_MISS), 2, "A and B, once each");
        } else {
            assert_eq!(misses, 1, "the soft TLB kept nothing of A");
        }
    }
}

#[test]
fn global_pages_survive_cr3_switches_until_a_full_flush() {
    for strategy in MmuStrategy::ALL {
        let mem = memory();
        let (a, b) = two_spaces(&mem);
        let mut mmu = strategy.create().unwrap();
        let ra = Mode::FourLevel.regs(a.cr3);
        let rb = Mode::FourLevel.regs(b.cr3);
        assert_eq!(
            mmu.translate(&mem, &ra, GLOBAL_PAGE, READ),
            Ok(FRAMES + 0x4000)
        );
        mmu.flush(false);
        let misses = stat(&*mmu, counters::TLB_MISS);
        assert_eq!(
            mmu.translate(&mem, &rb, GLOBAL_PAGE, READ),
            Ok(FRAMES + 0x4000)
        );
        assert_eq!(stat(&*mmu, counters::TLB_MISS), misses, "{strategy}");
        // CR4.PGE toggled: global entries go too.
        mmu.flush(true);
        assert_eq!(
            mmu.translate(&mem, &rb, GLOBAL_PAGE, READ),
            Ok(FRAMES + 0x4000)
        );
        assert_eq!(stat(&*mmu, counters::TLB_MISS), misses + 1, "{strategy}");
        // INVLPG drops a global page too; the shadow strategy keeps an entry whose tables
        // are all write-traced (it equals a fresh walk), as KVM's INVLPG keeps in-sync sptes.
        mmu.invlpg(GLOBAL_PAGE);
        assert_eq!(
            mmu.translate(&mem, &rb, GLOBAL_PAGE, READ),
            Ok(FRAMES + 0x4000)
        );
        let dropped = u64::from(strategy != MmuStrategy::Shadow);
        assert_eq!(
            stat(&*mmu, counters::TLB_MISS),
            misses + 1 + dropped,
            "{strategy}"
        );
        assert_eq!(stat(&*mmu, counters::INVLPG), 1, "{strategy}");
    }
}

#[test]
fn repeated_writes_to_an_unused_upper_table_flood_its_shadow() {
    let mem = memory();
    let (a, _) = two_spaces(&mem);
    let regs = Mode::FourLevel.regs(a.cr3);
    let mut m = Machine {
        name: "shadow",
        mem,
        mmu: Box::new(ShadowMmu::new()),
        track: PageTrack::new(),
    };
    assert_eq!(m.mmu.translate(&m.mem, &regs, 0x0, READ), Ok(FRAMES));
    assert!(m.traced(a.pd));
    // Writes to an unrelated entry of the page directory, never walked through.
    for i in 0..FLOOD_WRITES {
        assert!(m.traced(a.pd), "write {i}");
        guest_store(&mut m, Mode::FourLevel, a.pd + 8 * 100, u64::from(i) << 12);
    }
    let s = m.mmu.stats();
    assert_eq!(s.get(counters::MMU_PTE_WRITE), u64::from(FLOOD_WRITES));
    assert_eq!(s.get(counters::MMU_FLOODED), 1);
    assert_eq!(s.get(counters::MMU_SHADOW_ZAPPED), 1);
    assert!(!m.traced(a.pd));
    let misses = s.get(counters::TLB_MISS);
    assert_eq!(m.mmu.translate(&m.mem, &regs, 0x0, READ), Ok(FRAMES));
    assert_eq!(stat(&*m.mmu, counters::TLB_MISS), misses + 1);
    assert!(m.traced(a.pd), "traced again once used again");
}

#[test]
fn a_leaf_table_goes_unsync_and_is_resynchronised_by_a_cr3_load() {
    let mem = memory();
    let (a, _) = two_spaces(&mem);
    let regs = Mode::FourLevel.regs(a.cr3);
    let mut m = Machine {
        name: "shadow",
        mem,
        mmu: Box::new(ShadowMmu::new()),
        track: PageTrack::new(),
    };
    assert_eq!(m.mmu.translate(&m.mem, &regs, 0x0, READ), Ok(FRAMES));
    assert_eq!(
        m.mmu.translate(&m.mem, &regs, 0x1000, READ),
        Ok(FRAMES + 0x1000)
    );
    for i in 0..UNSYNC_WRITES {
        guest_store(&mut m, Mode::FourLevel, a.pt + 8 * 50, u64::from(i) << 12);
    }
    assert_eq!(stat(&*m.mmu, counters::MMU_UNSYNC), 1);
    assert!(!m.traced(a.pt), "unsync pages are not traced");
    // Untraced now: the shadow keeps the old translation, as a TLB may, until INVLPG...
    guest_store(&mut m, Mode::FourLevel, a.pt, (FRAMES + 0x7000) | P | RW);
    guest_store(
        &mut m,
        Mode::FourLevel,
        a.pt + 8,
        (FRAMES + 0x9000) | P | RW,
    );
    assert_eq!(
        stat(&*m.mmu, counters::MMU_PTE_WRITE),
        u64::from(UNSYNC_WRITES)
    );
    assert_eq!(m.mmu.translate(&m.mem, &regs, 0x0, READ), Ok(FRAMES));
    m.mmu.invlpg(0);
    assert_eq!(
        m.mmu.translate(&m.mem, &regs, 0x0, READ),
        Ok(FRAMES + 0x7000)
    );
    assert_eq!(
        m.mmu.translate(&m.mem, &regs, 0x1000, READ),
        Ok(FRAMES + 0x1000)
    );
    // ...or a CR3 load, which resynchronises the whole page.
    m.mmu.flush(false);
    assert_eq!(
        m.mmu.translate(&m.mem, &regs, 0x1000, READ),
        Ok(FRAMES + 0x9000)
    );
    assert!(m.traced(a.pt), "traced again after the resync");
}

#[test]
fn shadow_roots_are_bounded_and_recycled() {
    let mem = memory();
    let mut shadow = ShadowMmu::new();
    let extra = 3;
    for i in 0..(SHADOW_ROOTS + extra) as u64 {
        let s = build_space(&mem, Mode::FourLevel, 0x1_0000 * (i + 1));
        put(&mem, Mode::FourLevel, s.pt, (FRAMES + (i << 12)) | P | RW);
        shadow.flush(false);
        let regs = Mode::FourLevel.regs(s.cr3);
        assert_eq!(
            shadow.translate(&mem, &regs, 0x5, READ),
            Ok(FRAMES + (i << 12) + 5)
        );
    }
    let s = shadow.stats();
    assert_eq!(
        s.get(counters::MMU_CACHE_MISS),
        (SHADOW_ROOTS + extra) as u64
    );
    assert_eq!(s.get(counters::MMU_RECYCLED), extra as u64);
    // The roots plus one pseudo-root of global pages for the role.
    assert_eq!(shadow.roots(), SHADOW_ROOTS + 1);
    // The oldest root was recycled: going back to it misses.
    let first = Mode::FourLevel.regs(0x1_0000);
    shadow.flush(false);
    assert_eq!(shadow.translate(&mem, &first, 0x5, READ), Ok(FRAMES + 5));
    assert_eq!(
        shadow.stats().get(counters::MMU_CACHE_MISS),
        (SHADOW_ROOTS + extra + 1) as u64
    );
}
