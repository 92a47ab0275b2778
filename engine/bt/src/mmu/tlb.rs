//! The plain soft-TLB strategy: a direct-mapped TLB of 4 KiB translations in front of the
//! walker, flushed on CR3 loads and invalidated by INVLPG, as a software CPU does.
//!
//! Each entry caches one 4 KiB linear page (a large page fills one entry per 4 KiB piece
//! used) with the rights the whole walk granted, the guest-physical page, the page size,
//! the global bit and whether the leaf's dirty bit is known to be set. A hit checks the
//! cached rights against the access and the current CR0.WP/EFER.NXE/CR4.SMEP/SMAP with one
//! table lookup and one mask test; anything the entry does not allow (including a write to
//! a page whose dirty bit is not known set) walks again, as hardware re-walks before it
//! faults or sets a dirty bit.

use super::pdpte::PdpteRegisters;
use super::walk::{PageSize, PagingConfig, PagingMode, Translation, set_accessed_dirty, walk};
use super::{Access, AccessKind, CR0_PG, EngineStats, MmuError, PageFault, PagingRegs, counters};
use super::{CR0_WP, CR4_PAE, CR4_SMAP, CR4_SMEP, EFER_NXE, Mmu, MmuEvent, note_ad_stores};
use deja_machine::GuestRam;

/// Number of entries in the soft TLB (a power of two).
pub const TLB_ENTRIES: usize = 1024;

/// The tag of an empty entry: no linear page number has all 64 bits set.
const INVALID: u64 = u64::MAX;

// Rights and state kept in the low 12 bits of an entry's frame word.
/// U/S = 1 at every level.
pub(super) const T_USER: u64 = 1 << 0;
/// U/S = 0 at some level (what SMEP tests for supervisor fetches).
pub(super) const T_SUPERVISOR: u64 = 1 << 1;
/// R/W = 1 at every level.
pub(super) const T_WRITABLE: u64 = 1 << 2;
/// XD clear at every level (or execute-disable not in force when filled).
pub(super) const T_EXECUTABLE: u64 = 1 << 3;
/// The leaf's dirty bit is set in guest memory.
pub(super) const T_DIRTY: u64 = 1 << 4;
/// A global translation (leaf G with CR4.PGE): survives `flush(false)`.
pub(super) const T_GLOBAL: u64 = 1 << 5;
/// log2 of the page size, bits 11:6.
pub(super) const T_SHIFT_POS: u32 = 6;

/// The bits of the frame word an access needs, indexed by [`need_index`].
pub(super) static NEED: [u64; 96] = need_table();

const fn need_table() -> [u64; 96] {
    let mut table = [0u64; 96];
    let mut i = 0;
    while i < 96 {
        let kind = i >> 5;
        let user = (i >> 4) & 1 == 1;
        let smap = (i >> 3) & 1 == 1;
        let wp = (i >> 2) & 1 == 1;
        let nx = (i >> 1) & 1 == 1;
        let smep = i & 1 == 1;
        let exec_bit = if nx { T_EXECUTABLE } else { 0 };
        // SMAP: supervisor data accesses need a supervisor page.
        let smap_bit = if smap { T_SUPERVISOR } else { 0 };
        table[i] = match (kind, user) {
            // Reads: supervisors read anything mapped (not user pages under SMAP); users
            // need a user page.
            (0, false) => smap_bit,
            (0, true) => T_USER,
            // Writes: users need user + writable; supervisors need writable only with WP.
            // Both need the dirty bit known set, or the access must walk to set it.
            (1, false) => (if wp { T_WRITABLE } else { 0 }) | T_DIRTY | smap_bit,
            (1, true) => T_USER | T_WRITABLE | T_DIRTY,
            // Fetches: XD with NXE; SMEP forbids supervisor fetches from user pages.
            (2, false) => exec_bit | if smep { T_SUPERVISOR } else { 0 },
            _ => T_USER | exec_bit,
        };
        i += 1;
    }
    table
}

/// Index into [`NEED`]: access kind, user, CR4.SMAP (as it applies to the access),
/// CR0.WP, execute-disable in force, CR4.SMEP.
#[inline(always)]
pub(super) fn need_index(regs: &PagingRegs, access: Access) -> usize {
    let kind = match access.kind {
        AccessKind::Read => 0,
        AccessKind::Write => 1,
        AccessKind::Execute => 2,
    };
    let wp = ((regs.cr0 & CR0_WP) >> 16) as usize;
    let nx = (((regs.cr4 & CR4_PAE) >> 5) & ((regs.efer & EFER_NXE) >> 11)) as usize;
    let smep = ((regs.cr4 & CR4_SMEP) >> 20) as usize;
    let smap = ((regs.cr4 & CR4_SMAP) >> 21) as usize;
    (kind << 5) | (usize::from(access.user) << 4) | (smap << 3) | (wp << 2) | (nx << 1) | smep
}

/// The slot a linear page number maps to. Folding higher bits in keeps pages that are
/// equal modulo 4 MiB (kernel text at 0xffffffff81000000 and user text at 0x400000) apart.
#[inline(always)]
fn slot(vpn: u64) -> usize {
    ((vpn ^ (vpn >> 10) ^ (vpn >> 20)) as usize) & (TLB_ENTRIES - 1)
}

/// One cached 4 KiB translation.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(16))]
struct Entry {
    /// Linear page number (linear >> 12), or [`INVALID`].
    tag: u64,
    /// Guest-physical 4 KiB page in bits 63:12, `T_*` bits below.
    frame: u64,
}

impl Entry {
    const EMPTY: Entry = Entry {
        tag: INVALID,
        frame: 0,
    };

    fn page_shift(&self) -> u32 {
        ((self.frame >> T_SHIFT_POS) & 0x3f) as u32
    }
}

/// The `tlb` MMU strategy. See the module documentation.
pub struct SoftTlb {
    entries: Box<[Entry; TLB_ENTRIES]>,
    /// Whether an entry for a large page may be present (INVLPG then scans for entries of
    /// that page other than the one for the address itself).
    large_cached: bool,
    pdptes: PdpteRegisters,
    hits: u64,
    misses: u64,
    walks: u64,
    invlpgs: u64,
    flushes: u64,
    guest_faults: u64,
    /// Accessed/dirty stores not yet reported to the engine.
    events: Vec<MmuEvent>,
}

impl Default for SoftTlb {
    fn default() -> Self {
        Self::new()
    }
}

impl SoftTlb {
    /// An empty TLB.
    pub fn new() -> Self {
        Self {
            entries: Box::new([Entry::EMPTY; TLB_ENTRIES]),
            large_cached: false,
            pdptes: PdpteRegisters::default(),
            hits: 0,
            misses: 0,
            walks: 0,
            invlpgs: 0,
            flushes: 0,
            guest_faults: 0,
            events: Vec::new(),
        }
    }

    /// The number of valid entries (for tests and diagnostics).
    pub fn occupancy(&self) -> usize {
        self.entries.iter().filter(|e| e.tag != INVALID).count()
    }

    /// The PAE PDPTE registers to walk with (for strategies that put this TLB in front).
    pub(super) fn pdptes_for_walk(&mut self, mem: &GuestRam, cr3: u64) -> [u64; 4] {
        self.pdptes.for_walk(mem, cr3)
    }

    /// The hit path alone, for strategies that put this TLB in front of their own walk:
    /// the physical address if an entry allows the access (counted as a hit), else `None`
    /// (not counted: the caller counts its own miss).
    #[inline]
    pub(super) fn lookup(&mut self, regs: &PagingRegs, linear: u64, access: Access) -> Option<u64> {
        let vpn = linear >> 12;
        let e = self.entries[slot(vpn)];
        if e.tag == vpn {
            let need = NEED[need_index(regs, access)];
            if e.frame & need == need {
                self.hits += 1;
                return Some((e.frame & !0xfff) | (linear & 0xfff));
            }
        }
        None
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
        let cfg = PagingConfig::from_regs(regs);
        let pdptes = (cfg.mode == PagingMode::Pae).then(|| self.pdptes.for_walk(mem, cfg.cr3));
        self.walks += 1;
        let Ok(w) = walk(mem, &cfg, pdptes.as_ref(), linear, access);
        match w.result {
            Ok(t) => {
                let Ok(ad) = set_accessed_dirty(mem, &w, access.kind);
                note_ad_stores(&ad, &mut self.events);
                self.fill(w.linear, &t, access.kind == AccessKind::Write);
                Ok(t.phys)
            }
            Err(fault) => {
                // A page fault invalidates the TLB entries for the faulting address
                // (SDM 4.10.4.1), so a stale entry cannot outlive the fault it caused.
                self.invalidate(w.linear);
                self.guest_faults += 1;
                Err(fault)
            }
        }
    }

    pub(super) fn fill(&mut self, linear: u64, t: &Translation, wrote: bool) {
        let vpn = linear >> 12;
        let page = t.frame | (linear & (t.size.bytes() - 1) & !0xfff);
        let mut bits = if t.user { T_USER } else { T_SUPERVISOR };
        if t.writable {
            bits |= T_WRITABLE;
        }
        if !t.execute_disable {
            bits |= T_EXECUTABLE;
        }
        if t.dirty || wrote {
            bits |= T_DIRTY;
        }
        if t.global {
            bits |= T_GLOBAL;
        }
        bits |= u64::from(t.size.shift()) << T_SHIFT_POS;
        if t.size != PageSize::Size4K {
            self.large_cached = true;
        }
        self.entries[slot(vpn)] = Entry {
            tag: vpn,
            frame: page | bits,
        };
    }

    /// Drops every entry that translates `linear`, whatever the page size.
    pub(super) fn invalidate(&mut self, linear: u64) {
        // Outside long mode entries are tagged with 32-bit addresses; drop both readings.
        for vpn in [linear >> 12, (linear & 0xffff_ffff) >> 12] {
            let e = &mut self.entries[slot(vpn)];
            if e.tag == vpn {
                *e = Entry::EMPTY;
            }
        }
        if self.large_cached {
            for e in self.entries.iter_mut() {
                if e.tag == INVALID {
                    continue;
                }
                let shift = e.page_shift();
                if shift > 12 {
                    let base = (e.tag << 12) >> shift;
                    if base == linear >> shift || base == (linear & 0xffff_ffff) >> shift {
                        *e = Entry::EMPTY;
                    }
                }
            }
        }
    }
}

impl Mmu for SoftTlb {
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
        // Outside long mode the walk tags entries with the 32-bit linear address, so a
        // wider `linear` simply misses here and is truncated by the slow path.
        let vpn = linear >> 12;
        let e = self.entries[slot(vpn)];
        if e.tag == vpn {
            let need = NEED[need_index(regs, access)];
            if e.frame & need == need {
                self.hits += 1;
                return Ok((e.frame & !0xfff) | (linear & 0xfff));
            }
        }
        self.translate_slow(mem, regs, linear, access)
    }

    fn invlpg(&mut self, linear: u64) {
        self.invlpgs += 1;
        self.invalidate(linear);
    }

    fn flush(&mut self, include_global: bool) {
        self.flushes += 1;
        let mut large = false;
        for e in self.entries.iter_mut() {
            if e.tag == INVALID {
                continue;
            }
            if include_global || e.frame & T_GLOBAL == 0 {
                *e = Entry::EMPTY;
            } else if e.page_shift() > 12 {
                large = true;
            }
        }
        self.large_cached = large;
        self.pdptes.flush();
    }

    fn stats(&self) -> EngineStats {
        let mut s = EngineStats::default();
        s.add(counters::TLB_HIT, self.hits);
        s.add(counters::TLB_MISS, self.misses);
        s.add(counters::WALKS, self.walks);
        s.add(counters::INVLPG, self.invlpgs);
        s.add(counters::TLB_FLUSH, self.flushes);
        s.add(counters::PF_GUEST, self.guest_faults);
        s.add(counters::PDPTE_LOAD, self.pdptes.loads);
        s
    }

    fn load_pdptes(&mut self, mem: &GuestRam, regs: &PagingRegs) -> Result<[u64; 4], MmuError> {
        self.pdptes.load(mem, regs.cr3)
    }

    fn drain_events(&mut self, out: &mut Vec<MmuEvent>) {
        out.append(&mut self.events);
    }
}
