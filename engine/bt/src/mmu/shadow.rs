//! The `shadow` strategy: shadow page tables kept coherent by write-tracing the guest's
//! page tables, as KVM's shadow MMU does without EPT/NPT.
//!
//! A shadow is kept per guest address space, keyed by the guest root (CR3) and the role:
//! the bits that change what a guest entry means (paging mode, CR0.WP, CR4.PSE/PGE/SMEP,
//! execute-disable in force). KVM also splits roles by user/supervisor because one spte
//! holds one view; here each shadow entry keeps the guest's U/S, R/W and XD rights and every
//! hit checks them against the access, so one shadow serves both privilege levels. Shadows
//! live in a bounded root cache ([`SHADOW_ROOTS`]) and survive CR3 switches: switching back
//! to a cached root reuses it (no `mmu_cache_miss`); a new root past the bound recycles the
//! least recently used one (`mmu_recycled`). Global translations (leaf G with CR4.PGE) go
//! to one shadow per role shared by every root, so they survive CR3 loads and are dropped
//! by a full flush (CR4.PGE toggling, paging-mode changes), as on hardware. INVLPG drops
//! the entries of its address that were built from an out-of-sync table and keeps the
//! others, which write tracing has kept equal to a fresh walk (as KVM's INVLPG only
//! resynchronises unsync sptes).
//!
//! A TLB miss is a hidden fault: the walker reads the guest tables, the accessed/dirty bits
//! are set exactly as hardware sets them, and a shadow entry is installed (`pf_fixed`); a
//! fault of the guest's own is reflected with its error code and CR2 (`pf_guest`). A read
//! installs an entry that does not allow writes until the guest's dirty bit is set, so the
//! first write faults again and sets it (as KVM write-protects clean pages).
//!
//! Coherence by write tracing: every guest page-table page a shadow entry was built from is
//! tracked (guest-physical page → the shadow entries depending on it). When the first shadow
//! entry depends on a page the strategy asks the engine to track it
//! ([`MmuEvent::Track`]); when the last one goes, the page goes out of sync or floods, it
//! asks to stop ([`MmuEvent::Untrack`]). The engine keeps one set of reasons per
//! guest-physical page (`crate::track`: page tables and translated code share it), keeps
//! tracked pages out of its write fast path, and reports every guest store to a page
//! tracked as a page table through [`Mmu::note_guest_write`] (`mmu_pte_write`). A store to
//! an entry a shadow entry was built from updates that entry in place when the new guest
//! entry is a present, accessed leaf (`mmu_pte_updated`, as KVM's prefetching
//! `mmu_pte_write_new_pte`), and otherwise drops it (`mmu_shadow_zapped`). A page holding
//! only leaf entries that is written [`UNSYNC_WRITES`] times goes out of sync (`mmu_unsync`,
//! KVM's unsync pages): it is no longer traced, and its shadow entries may be stale, as TLB
//! entries may, until the next INVLPG of their address, CR3 load or paging-mode change,
//! where every unsync page's entries are dropped (resynchronised by walking again on the
//! next miss). A page holding upper-level entries written [`FLOOD_WRITES`] times without a
//! miss walking through it in between is a page the guest is reusing for something else
//! (flooding): every shadow entry depending on it is dropped and it is no longer traced
//! (`mmu_flooded`).
//!
//! # Where this differs from KVM's shadow MMU
//!
//! - Shadow entries are kept per 4 KiB linear page in a map, not as a tree of shadow page
//!   tables: there are no shadow page-table pages, so "zapping a shadow page" here is
//!   dropping the entries built from a guest table, and `mmu_shadow_zapped` counts entries,
//!   not shadow pages. Large guest pages are shadowed as the 4 KiB pieces touched.
//! - One shadow serves user and supervisor accesses (the rights are checked on each hit);
//!   KVM splits roles by access and by CR0.WP/CR4 bits for its hardware sptes.
//! - The in-place update (`mmu_pte_updated`) re-walks the guest tables from guest memory
//!   after the store rather than decoding the written bytes, and only updates an entry whose
//!   walk still goes through the same guest entries.
//! - A leaf table goes unsync after [`UNSYNC_WRITES`] traced writes; KVM lets a leaf shadow
//!   page go unsync when the guest faults to map that page table writable
//!   (`mmu_try_to_unsync_pages`), without first emulating writes to it. Flood detection
//!   follows KVM's (`detect_write_flooding`: [`FLOOD_WRITES`] = 3 writes with no use of the
//!   shadow in between) but applies only to pages holding upper-level entries, since leaf
//!   pages go unsync first; KVM also zaps on misaligned writes, which are not detected here.
//! - The accessed/dirty updates the walker makes itself are not traced (as in KVM), but they
//!   are reported as stores so translated code in the same page is invalidated.

use super::pdpte::PdpteRegisters;
use super::tlb::{NEED, T_DIRTY, T_EXECUTABLE, T_GLOBAL, T_SHIFT_POS, T_SUPERVISOR, T_USER};
use super::tlb::{T_WRITABLE, need_index};
use super::walk::walk as guest_walk;
use super::walk::{PagingConfig, PagingMode, Translation, Walk, set_accessed_dirty};
use super::{
    Access, AccessKind, CR0_PG, EngineStats, Mmu, MmuError, MmuEvent, PageFault, PagingRegs,
    counters, note_ad_stores,
};
use deja_machine::GuestRam;
use std::collections::{BTreeMap, BTreeSet};

/// Shadow roots (guest CR3 × role) kept at once; the least recently used one is recycled.
pub const SHADOW_ROOTS: usize = 8;
/// Writes to a page of upper-level entries, with no walk through it in between, after which
/// its shadows are dropped (KVM's flood threshold).
pub const FLOOD_WRITES: u32 = 3;
/// Traced writes to a page of leaf entries after which it goes out of sync.
pub const UNSYNC_WRITES: u32 = 2;

/// The pseudo-root under which a role's global translations are kept.
const GLOBAL_ROOT: u64 = u64::MAX;

/// The role bits of a configuration.
fn role(cfg: &PagingConfig) -> u8 {
    let mode = match cfg.mode {
        PagingMode::Disabled => 0,
        PagingMode::Bits32 => 1,
        PagingMode::Pae => 2,
        PagingMode::FourLevel => 3,
    };
    mode | u8::from(cfg.pse) << 2
        | u8::from(cfg.pge) << 3
        | u8::from(cfg.nx_active()) << 4
        | u8::from(cfg.wp) << 5
        | u8::from(cfg.smep) << 6
}

/// One shadow entry: a 4 KiB piece of a guest translation.
#[derive(Clone, Debug)]
struct ShadowEntry {
    /// Guest-physical 4 KiB page in bits 63:12, the soft TLB's `T_*` rights below.
    frame: u64,
    /// Guest-physical addresses of the guest entries the walk read (not PDPTE registers).
    refs: Vec<u64>,
}

/// A shadow root: the shadow of one guest address space (or a role's global pages).
struct Shadow {
    cfg: PagingConfig,
    /// The PAE PDPTE registers its entries were built with.
    pdptes: Option<[u64; 4]>,
    entries: BTreeMap<u64, ShadowEntry>,
    last_use: u64,
}

/// What is known about one traced guest page-table page.
#[derive(Default)]
struct Tracked {
    /// Shadow entries built from an entry in this page: (shadow id, linear page number).
    deps: BTreeSet<(u32, u64)>,
    /// Traced writes since a walk last went through the page.
    writes: u32,
    /// Some shadow entry used an upper-level (non-leaf) entry of this page.
    upper: bool,
    /// Out of sync: not traced until the next resynchronisation.
    unsync: bool,
}

/// The `shadow` MMU strategy. See the module documentation.
#[derive(Default)]
pub struct ShadowMmu {
    shadows: BTreeMap<u32, Shadow>,
    by_key: BTreeMap<(u64, u8), u32>,
    next_id: u32,
    /// The shadow of the running address space and its key.
    current: Option<((u64, u8), u32)>,
    tracked: BTreeMap<u64, Tracked>,
    unsync_pages: BTreeSet<u64>,
    /// The guest-physical addresses of the pages the engine was told to track.
    traced: BTreeSet<u64>,
    /// Track/untrack requests and own stores not yet reported to the engine.
    events: Vec<MmuEvent>,
    pdptes: PdpteRegisters,
    clock: u64,
    hits: u64,
    misses: u64,
    pf_fixed: u64,
    pf_guest: u64,
    pte_write: u64,
    pte_updated: u64,
    flooded: u64,
    zapped: u64,
    recycled: u64,
    cache_miss: u64,
    unsync: u64,
    flushes: u64,
    invlpgs: u64,
}

impl ShadowMmu {
    /// No shadows yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of shadow roots held, global pseudo-roots included (for tests).
    pub fn roots(&self) -> usize {
        self.shadows.len()
    }

    /// The number of shadow entries held (for tests and diagnostics).
    pub fn shadow_entries(&self) -> usize {
        self.shadows.values().map(|s| s.entries.len()).sum()
    }

    /// Whether stores to the page holding guest-physical `phys` are traced (for tests and
    /// diagnostics: the engine learns the same through [`MmuEvent::Track`]).
    pub fn is_traced(&self, phys: u64) -> bool {
        self.traced.contains(&(phys & !0xfff))
    }

    /// Tells the engine to start or stop tracking `page` if whether it should be traced
    /// (some shadow entry depends on it and it is in sync) changed.
    fn retrace(&mut self, page: u64) {
        let wanted = self
            .tracked
            .get(&page)
            .is_some_and(|t| !t.unsync && !t.deps.is_empty());
        if wanted == self.traced.contains(&page) {
            return;
        }
        if wanted {
            self.traced.insert(page);
            self.events.push(MmuEvent::Track(page >> 12));
        } else {
            self.traced.remove(&page);
            self.events.push(MmuEvent::Untrack(page >> 12));
        }
    }

    /// The shadow for `key`, created (and something recycled) if needed.
    fn shadow_for(&mut self, key: (u64, u8), cfg: &PagingConfig) -> u32 {
        if let Some(&id) = self.by_key.get(&key) {
            return id;
        }
        if key.0 != GLOBAL_ROOT {
            self.cache_miss += 1;
            let roots: Vec<(u64, u32)> = self
                .shadows
                .iter()
                .filter(|(_, s)| s.cfg.cr3 != GLOBAL_ROOT)
                .map(|(id, s)| (s.last_use, *id))
                .collect();
            let victim = roots
                .iter()
                .filter(|(_, id)| self.current.is_none_or(|(_, c)| c != *id))
                .min()
                .map(|&(_, id)| id);
            if roots.len() >= SHADOW_ROOTS
                && let Some(victim) = victim
            {
                self.drop_shadow(victim);
                self.recycled += 1;
            }
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let mut cfg = *cfg;
        cfg.cr3 = key.0;
        self.shadows.insert(
            id,
            Shadow {
                cfg,
                pdptes: None,
                entries: BTreeMap::new(),
                last_use: self.clock,
            },
        );
        self.by_key.insert(key, id);
        id
    }

    fn drop_shadow(&mut self, id: u32) {
        let vpns: Vec<u64> = self.shadows[&id].entries.keys().copied().collect();
        for vpn in vpns {
            self.remove_entry(id, vpn);
        }
        if let Some(s) = self.shadows.remove(&id) {
            let key = if s.cfg.cr3 == GLOBAL_ROOT {
                (GLOBAL_ROOT, role(&s.cfg))
            } else {
                (s.cfg.cr3, role(&s.cfg))
            };
            self.by_key.remove(&key);
        }
        if self.current.is_some_and(|(_, c)| c == id) {
            self.current = None;
        }
    }

    /// Removes one shadow entry and its dependencies; whether it existed.
    fn remove_entry(&mut self, id: u32, vpn: u64) -> bool {
        let Some(entry) = self
            .shadows
            .get_mut(&id)
            .and_then(|s| s.entries.remove(&vpn))
        else {
            return false;
        };
        for r in entry.refs {
            let page = r & !0xfff;
            if let Some(t) = self.tracked.get_mut(&page) {
                t.deps.remove(&(id, vpn));
                if t.deps.is_empty() {
                    self.tracked.remove(&page);
                    self.unsync_pages.remove(&page);
                }
            }
            self.retrace(page);
        }
        true
    }

    /// The entries of shadow `id` translating `linear`, whatever their page size.
    fn entries_translating(&self, id: u32, linear: u64) -> Vec<u64> {
        let mut found = Vec::new();
        if let Some(s) = self.shadows.get(&id) {
            for shift in [12u32, 21, 22, 30] {
                let first = (linear >> shift) << (shift - 12);
                for (vpn, e) in s.entries.range(first..first + (1 << (shift - 12))) {
                    if ((e.frame >> T_SHIFT_POS) & 0x3f) as u32 == shift {
                        found.push(*vpn);
                    }
                }
            }
        }
        found
    }

    /// Drops every entry of shadow `id` translating `linear`, whatever its page size.
    fn remove_linear(&mut self, id: u32, linear: u64) {
        for vpn in self.entries_translating(id, linear) {
            self.remove_entry(id, vpn);
        }
    }

    /// INVLPG for shadow `id`: drops the entries translating `linear` that were built from
    /// an out-of-sync table. Entries whose tables are all traced are kept, as KVM's
    /// `kvm_mmu_invalidate_addr` keeps in-sync sptes: write tracing has kept them equal to
    /// what a fresh walk would build (every traced change to an entry they use updated or
    /// dropped them, and they only exist while the guest's accessed bits are set), so
    /// keeping them is indistinguishable from the walk the hardware would make.
    fn invalidate_linear(&mut self, id: u32, linear: u64) {
        for vpn in self.entries_translating(id, linear) {
            let stale = self
                .shadows
                .get(&id)
                .and_then(|s| s.entries.get(&vpn))
                .is_some_and(|e| e.refs.iter().any(|r| !self.traced.contains(&(r & !0xfff))));
            if stale {
                self.remove_entry(id, vpn);
            }
        }
    }

    /// Drops the entries of every out-of-sync page: the next miss walks the guest tables as
    /// they are now (INVLPG, CR3 loads and paging changes are the guest's promise that its
    /// tables are consistent).
    fn resync(&mut self) {
        let pages: Vec<u64> = std::mem::take(&mut self.unsync_pages).into_iter().collect();
        for page in pages {
            let deps: Vec<(u32, u64)> = self
                .tracked
                .get(&page)
                .map(|t| t.deps.iter().copied().collect())
                .unwrap_or_default();
            for (id, vpn) in deps {
                if self.remove_entry(id, vpn) {
                    self.zapped += 1;
                }
            }
            self.tracked.remove(&page);
            self.retrace(page);
        }
    }

    /// The rights word of a translation, as the soft TLB encodes it.
    fn frame_of(linear: u64, t: &Translation, wrote: bool) -> u64 {
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
        page | bits | u64::from(t.size.shift()) << T_SHIFT_POS
    }

    fn install(&mut self, id: u32, vpn: u64, frame: u64, w: &Walk) {
        let entries = w.entries();
        let mut refs = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            if e.from_register {
                continue;
            }
            refs.push(e.address);
            let page = e.address & !0xfff;
            let t = self.tracked.entry(page).or_default();
            t.deps.insert((id, vpn));
            t.writes = 0;
            t.upper |= i + 1 < entries.len();
            self.retrace(page);
        }
        if let Some(s) = self.shadows.get_mut(&id) {
            s.entries.insert(vpn, ShadowEntry { frame, refs });
        }
    }

    /// Enters the address space `key`: a switch resynchronises out-of-sync pages, as the
    /// CR3 load that made it did.
    fn enter(&mut self, mem: &GuestRam, cfg: &PagingConfig) -> (u32, u32) {
        let role = role(cfg);
        let key = (cfg.cr3, role);
        self.clock += 1;
        let id = match self.current {
            Some((k, id)) if k == key => id,
            _ => {
                self.resync();
                let id = self.shadow_for(key, cfg);
                self.current = Some((key, id));
                id
            }
        };
        let global = self.shadow_for((GLOBAL_ROOT, role), cfg);
        if cfg.mode == PagingMode::Pae {
            let pdptes = self.pdptes.for_walk(mem, cfg.cr3);
            for sid in [id, global] {
                let stale = self.shadows[&sid].pdptes.is_some_and(|p| p != pdptes);
                if stale {
                    let vpns: Vec<u64> = self.shadows[&sid].entries.keys().copied().collect();
                    for vpn in vpns {
                        self.remove_entry(sid, vpn);
                    }
                }
                if let Some(s) = self.shadows.get_mut(&sid) {
                    s.pdptes = Some(pdptes);
                }
            }
        }
        for sid in [id, global] {
            if let Some(s) = self.shadows.get_mut(&sid) {
                s.last_use = self.clock;
            }
        }
        (id, global)
    }

    /// A traced write reached the guest entry at `address` that shadow entry (id, vpn) was
    /// built from: update the shadow entry from the new guest entry, or drop it.
    fn pte_changed(&mut self, mem: &GuestRam, id: u32, vpn: u64, leaf: bool) {
        let Some(s) = self.shadows.get(&id) else {
            return;
        };
        let Some(old) = s.entries.get(&vpn) else {
            return;
        };
        if leaf {
            let linear = vpn << 12;
            let Ok(w) = guest_walk(
                mem,
                &s.cfg,
                s.pdptes.as_ref(),
                linear,
                Access::SUPERVISOR_READ,
            );
            let refs: Vec<u64> = w
                .entries()
                .iter()
                .filter(|e| !e.from_register)
                .map(|e| e.address)
                .collect();
            let accessed = w
                .entries()
                .iter()
                .all(|e| e.from_register || e.value & 0x20 != 0);
            if let Ok(t) = w.result
                && accessed
                && refs == old.refs
                && (t.global && s.cfg.pge) == (s.cfg.cr3 == GLOBAL_ROOT)
            {
                let frame = Self::frame_of(linear, &t, false);
                if let Some(e) = self
                    .shadows
                    .get_mut(&id)
                    .and_then(|s| s.entries.get_mut(&vpn))
                {
                    e.frame = frame;
                }
                self.pte_updated += 1;
                return;
            }
        }
        if self.remove_entry(id, vpn) {
            self.zapped += 1;
        }
    }

    #[inline(never)]
    fn translate_slow(
        &mut self,
        mem: &GuestRam,
        cfg: &PagingConfig,
        ids: (u32, u32),
        linear: u64,
        access: Access,
    ) -> Result<u64, PageFault> {
        self.misses += 1;
        let pdptes = self.shadows[&ids.0].pdptes;
        let Ok(w) = guest_walk(mem, cfg, pdptes.as_ref(), linear, access);
        match w.result {
            Ok(t) => {
                let Ok(ad) = set_accessed_dirty(mem, &w, access.kind);
                note_ad_stores(&ad, &mut self.events);
                let vpn = w.linear >> 12;
                self.remove_entry(ids.0, vpn);
                self.remove_entry(ids.1, vpn);
                let frame = Self::frame_of(w.linear, &t, access.kind == AccessKind::Write);
                let target = if frame & T_GLOBAL != 0 { ids.1 } else { ids.0 };
                self.install(target, vpn, frame, &w);
                self.pf_fixed += 1;
                Ok(t.phys)
            }
            Err(fault) => {
                // A page fault invalidates the cached translations of its address.
                self.remove_linear(ids.0, w.linear);
                self.remove_linear(ids.1, w.linear);
                self.pf_guest += 1;
                Err(fault)
            }
        }
    }
}

impl Mmu for ShadowMmu {
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
        let cfg = PagingConfig::from_regs(regs);
        let ids = self.enter(mem, &cfg);
        let linear = cfg.effective_linear(linear);
        let vpn = linear >> 12;
        let need = NEED[need_index(regs, access)];
        for id in [ids.1, ids.0] {
            if let Some(e) = self.shadows[&id].entries.get(&vpn)
                && e.frame & need == need
            {
                self.hits += 1;
                return Ok((e.frame & !0xfff) | (linear & 0xfff));
            }
        }
        self.translate_slow(mem, &cfg, ids, linear, access)
    }

    fn invlpg(&mut self, linear: u64) {
        self.invlpgs += 1;
        let ids: Vec<u32> = self.shadows.keys().copied().collect();
        for id in ids {
            self.invalidate_linear(id, linear);
            if linear > 0xffff_ffff {
                self.invalidate_linear(id, linear & 0xffff_ffff);
            }
        }
    }

    fn flush(&mut self, include_global: bool) {
        self.flushes += 1;
        self.resync();
        if include_global {
            let globals: Vec<u32> = self
                .shadows
                .iter()
                .filter(|(_, s)| s.cfg.cr3 == GLOBAL_ROOT)
                .map(|(id, _)| *id)
                .collect();
            for id in globals {
                self.drop_shadow(id);
            }
        }
        self.pdptes.flush();
    }

    fn stats(&self) -> EngineStats {
        let mut s = EngineStats::default();
        s.add(counters::TLB_HIT, self.hits);
        s.add(counters::TLB_MISS, self.misses);
        s.add(counters::WALKS, self.misses);
        s.add(counters::PF_FIXED, self.pf_fixed);
        s.add(counters::PF_GUEST, self.pf_guest);
        s.add(counters::MMU_PTE_WRITE, self.pte_write);
        s.add(counters::MMU_PTE_UPDATED, self.pte_updated);
        s.add(counters::MMU_FLOODED, self.flooded);
        s.add(counters::MMU_SHADOW_ZAPPED, self.zapped);
        s.add(counters::MMU_RECYCLED, self.recycled);
        s.add(counters::MMU_CACHE_MISS, self.cache_miss);
        s.add(counters::MMU_UNSYNC, self.unsync);
        s.add(counters::TLB_FLUSH, self.flushes);
        s.add(counters::INVLPG, self.invlpgs);
        s.add(counters::PDPTE_LOAD, self.pdptes.loads);
        s
    }

    fn load_pdptes(&mut self, mem: &GuestRam, regs: &PagingRegs) -> Result<[u64; 4], MmuError> {
        self.pdptes.load(mem, regs.cr3)
    }

    fn drain_events(&mut self, out: &mut Vec<MmuEvent>) {
        out.append(&mut self.events);
    }

    fn reset(&mut self) {
        self.flushes += 1;
        let ids: Vec<u32> = self.shadows.keys().copied().collect();
        for id in ids {
            self.zapped += self.shadows.get(&id).map_or(0, |s| s.entries.len() as u64);
            self.drop_shadow(id);
        }
        self.unsync_pages.clear();
        let pages: Vec<u64> = std::mem::take(&mut self.tracked).into_keys().collect();
        for page in pages {
            self.retrace(page);
        }
        self.pdptes.flush();
    }

    fn note_guest_write(&mut self, mem: &GuestRam, phys: u64, len: usize) {
        let end = phys.saturating_add(len.max(1) as u64);
        let mut page = phys & !0xfff;
        while page < end {
            self.write_to_page(mem, page, phys.max(page), end.min(page + 0x1000));
            page += 0x1000;
        }
    }
}

impl ShadowMmu {
    /// A traced store covering [start, end) of the page-table page `page`.
    fn write_to_page(&mut self, mem: &GuestRam, page: u64, start: u64, end: u64) {
        let Some(t) = self.tracked.get_mut(&page) else {
            return;
        };
        if t.unsync {
            return;
        }
        self.pte_write += 1;
        t.writes += 1;
        let upper = t.upper;
        if upper && t.writes >= FLOOD_WRITES {
            let deps: Vec<(u32, u64)> = t.deps.iter().copied().collect();
            for (id, vpn) in deps {
                if self.remove_entry(id, vpn) {
                    self.zapped += 1;
                }
            }
            self.tracked.remove(&page);
            self.retrace(page);
            self.flooded += 1;
            return;
        }
        let mut affected = Vec::new();
        for &(id, vpn) in &t.deps {
            let Some(s) = self.shadows.get(&id) else {
                continue;
            };
            let width = if s.cfg.mode == PagingMode::Bits32 {
                4
            } else {
                8
            };
            if let Some(e) = s.entries.get(&vpn) {
                let hit = e.refs.iter().position(|&r| r < end && start < r + width);
                if let Some(i) = hit {
                    affected.push((id, vpn, i + 1 == e.refs.len()));
                }
            }
        }
        for (id, vpn, leaf) in affected {
            self.pte_changed(mem, id, vpn, leaf);
        }
        if !upper
            && let Some(t) = self.tracked.get_mut(&page)
            && t.writes >= UNSYNC_WRITES
        {
            t.unsync = true;
            self.unsync_pages.insert(page);
            self.unsync += 1;
            self.retrace(page);
        }
    }
}
