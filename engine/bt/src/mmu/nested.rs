//! The `nested` strategy: the EPT/NPT model. The strategy owns a real second-level table
//! (4-level EPT format, 4 KiB leaves) that maps guest-physical RAM to "host-physical"
//! memory (an identity map here, as deja's guest RAM is one host mapping), and every TLB
//! miss is a two-dimensional walk: each guest paging-structure reference, starting with the
//! guest CR3, is itself translated through the second-level table before it is read, and
//! the final guest-physical address is translated once more. With 4-level guest paging and
//! a 4 KiB guest page that is (4 + 1) × 4 + 4 = 24 memory references, counted in
//! `mmu.walk_refs` (no paging-structure caches are modelled, so every miss is cold).
//!
//! Nothing is write-traced: the guest edits its tables freely and only the TLB (the same
//! soft TLB as the `tlb` strategy, holding combined linear → host-physical translations)
//! needs INVLPG and CR3 loads, exactly as on hardware with EPT.
//!
//! Guest-physical addresses the second-level table does not map (outside RAM: MMIO) are an
//! EPT violation on hardware, which KVM resolves by emulating the access; here a paging
//! structure there reads as all ones (as the bus does) and a data page there translates to
//! its guest-physical address, so the results equal the other strategies'.

use super::tlb::SoftTlb;
use super::walk::{PagingConfig, PagingMode, PhysView, set_accessed_dirty, walk};
use super::{
    Access, AccessKind, CR0_PG, EngineStats, Mmu, MmuError, MmuEvent, PageFault, PagingRegs,
    counters, note_ad_stores,
};
use deja_machine::GuestRam;
use std::cell::Cell;
use std::convert::Infallible;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// EPT entry bits 2:0: read, write, execute allowed.
const EPT_RWX: u64 = 0b111;
/// EPT leaf memory type write-back (6) in bits 5:3.
const EPT_MEMTYPE_WB: u64 = 6 << 3;
/// Bits 51:12 of an EPT entry: the next table or the page.
const EPT_ADDR: u64 = 0x000f_ffff_ffff_f000;

/// The second-level (EPT) table: 4 levels of 512-entry tables kept in host memory owned by
/// the strategy. A table's "host-physical" address is its index × 4 KiB in that store.
struct Ept {
    tables: Vec<Box<[u64; 512]>>,
}

impl Ept {
    /// An EPT identity-mapping every 4 KiB page of guest RAM.
    fn identity(mem: &GuestRam) -> Self {
        let mut ept = Ept {
            tables: vec![Box::new([0u64; 512])],
        };
        for region in mem.iter() {
            let start = region.start_addr().0 & !0xfff;
            let end = region.start_addr().0 + region.len();
            let mut gpa = start;
            while gpa < end {
                ept.map(gpa, gpa);
                gpa += 0x1000;
            }
        }
        ept
    }

    fn map(&mut self, gpa: u64, hpa: u64) {
        let mut table = 0usize;
        for shift in [39u32, 30, 21] {
            let index = ((gpa >> shift) & 0x1ff) as usize;
            let entry = self.tables[table][index];
            table = if entry & EPT_RWX == 0 {
                let next = self.tables.len();
                self.tables.push(Box::new([0u64; 512]));
                self.tables[table][index] = ((next as u64) << 12) | EPT_RWX;
                next
            } else {
                ((entry & EPT_ADDR) >> 12) as usize
            };
        }
        self.tables[table][((gpa >> 12) & 0x1ff) as usize] =
            (hpa & EPT_ADDR) | EPT_MEMTYPE_WB | EPT_RWX;
    }

    /// Guest-physical → host-physical, counting one reference per EPT entry read; `None`
    /// is an EPT violation (not mapped).
    fn translate(&self, gpa: u64, refs: &Cell<u64>) -> Option<u64> {
        let mut table = 0usize;
        for shift in [39u32, 30, 21, 12] {
            refs.set(refs.get() + 1);
            let entry = self.tables[table][((gpa >> shift) & 0x1ff) as usize];
            if entry & EPT_RWX == 0 {
                return None;
            }
            if shift == 12 {
                return Some((entry & EPT_ADDR) | (gpa & 0xfff));
            }
            table = ((entry & EPT_ADDR) >> 12) as usize;
        }
        None
    }
}

/// Guest-physical memory as the nested walker sees it: every reference goes through the EPT.
struct NestedView<'a> {
    mem: &'a GuestRam,
    ept: &'a Ept,
    /// Memory references of the current two-dimensional walk (EPT entries and guest entries).
    refs: Cell<u64>,
    /// References made for A/D updates, which are not part of the walk's count.
    uncounted: Cell<u64>,
}

impl PhysView for NestedView<'_> {
    type Error = Infallible;

    fn read_u32(&self, gpa: u64) -> Result<u32, Infallible> {
        let Some(hpa) = self.ept.translate(gpa, &self.refs) else {
            return Ok(u32::MAX);
        };
        self.refs.set(self.refs.get() + 1);
        PhysView::read_u32(self.mem, hpa)
    }

    fn read_u64(&self, gpa: u64) -> Result<u64, Infallible> {
        let Some(hpa) = self.ept.translate(gpa, &self.refs) else {
            return Ok(u64::MAX);
        };
        self.refs.set(self.refs.get() + 1);
        PhysView::read_u64(self.mem, hpa)
    }

    fn set_bits_u8(&self, gpa: u64, bits: u8) -> Result<(), Infallible> {
        if let Some(hpa) = self.ept.translate(gpa, &self.uncounted) {
            PhysView::set_bits_u8(self.mem, hpa, bits)?;
        }
        Ok(())
    }
}

/// The `nested` MMU strategy. See the module documentation.
pub struct NestedMmu {
    tlb: SoftTlb,
    /// Built at the first translation (the strategy is created before it sees memory) and
    /// rebuilt if the RAM layout changes.
    ept: Option<(u64, Ept)>,
    misses: u64,
    walks: u64,
    walk_refs: u64,
    guest_faults: u64,
    /// Accessed/dirty stores not yet reported to the engine.
    events: Vec<MmuEvent>,
}

impl Default for NestedMmu {
    fn default() -> Self {
        Self::new()
    }
}

/// A fingerprint of the RAM layout the EPT was built for.
fn layout(mem: &GuestRam) -> u64 {
    mem.iter().fold(0u64, |h, r| {
        h.rotate_left(17) ^ r.start_addr().0.wrapping_mul(31) ^ r.len()
    })
}

impl NestedMmu {
    /// An empty TLB over a second-level table not built yet.
    pub fn new() -> Self {
        Self {
            tlb: SoftTlb::new(),
            ept: None,
            misses: 0,
            walks: 0,
            walk_refs: 0,
            guest_faults: 0,
            events: Vec::new(),
        }
    }

    /// The number of EPT tables (4 KiB each) the second-level map uses.
    pub fn ept_tables(&self) -> usize {
        self.ept.as_ref().map_or(0, |(_, e)| e.tables.len())
    }

    #[inline(never)]
    fn translate_slow(
        &mut self,
        mem: &GuestRam,
        regs: &PagingRegs,
        linear: u64,
        access: Access,
    ) -> Result<u64, PageFault> {
        self.misses += 1;
        let fingerprint = layout(mem);
        if self.ept.as_ref().is_none_or(|(f, _)| *f != fingerprint) {
            self.ept = Some((fingerprint, Ept::identity(mem)));
        }
        let cfg = PagingConfig::from_regs(regs);
        let pdptes = (cfg.mode == PagingMode::Pae).then(|| self.tlb.pdptes_for_walk(mem, cfg.cr3));
        let Some((_, ept)) = self.ept.as_ref() else {
            unreachable!("built above")
        };
        let view = NestedView {
            mem,
            ept,
            refs: Cell::new(0),
            uncounted: Cell::new(0),
        };
        self.walks += 1;
        let Ok(w) = walk(&view, &cfg, pdptes.as_ref(), linear, access);
        let result = match w.result {
            Ok(t) => {
                // The second dimension of the last step: the guest-physical page itself.
                let phys = ept.translate(t.phys, &view.refs).unwrap_or(t.phys);
                let Ok(ad) = set_accessed_dirty(&view, &w, access.kind);
                note_ad_stores(&ad, &mut self.events);
                self.tlb
                    .fill(w.linear, &t, access.kind == AccessKind::Write);
                Ok(phys)
            }
            Err(fault) => {
                self.tlb.invalidate(w.linear);
                self.guest_faults += 1;
                Err(fault)
            }
        };
        self.walk_refs += view.refs.get();
        result
    }
}

impl Mmu for NestedMmu {
    #[inline]
    fn translate(
        &mut self,
        mem: &GuestRam,
        regs: &PagingRegs,
        linear: u64,
        access: Access,
    ) -> Result<u64, PageFault> {
        if regs.cr0 & CR0_PG == 0 {
            return Ok(linear);
        }
        if let Some(phys) = self.tlb.lookup(regs, linear, access) {
            return Ok(phys);
        }
        self.translate_slow(mem, regs, linear, access)
    }

    fn invlpg(&mut self, linear: u64) {
        self.tlb.invlpg(linear);
    }

    fn flush(&mut self, include_global: bool) {
        self.tlb.flush(include_global);
    }

    fn stats(&self) -> EngineStats {
        let mut s = self.tlb.stats();
        s.counters
            .insert(counters::TLB_MISS.to_string(), self.misses);
        s.counters.insert(counters::WALKS.to_string(), self.walks);
        s.counters
            .insert(counters::PF_GUEST.to_string(), self.guest_faults);
        s.add(counters::WALK_REFS, self.walk_refs);
        s
    }

    fn load_pdptes(&mut self, mem: &GuestRam, regs: &PagingRegs) -> Result<[u64; 4], MmuError> {
        self.tlb.load_pdptes(mem, regs)
    }

    fn drain_events(&mut self, out: &mut Vec<MmuEvent>) {
        out.append(&mut self.events);
    }
}
