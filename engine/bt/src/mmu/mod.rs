//! The bt engine's MMU: guest paging as the Intel SDM vol. 3 chapter 4 describes it.
//!
//! Two layers, so that the MMU strategies of issue #7 (shadow page tables, a nested
//! EPT/NPT-style two-dimensional walk, and this plain soft TLB) can share the part that is
//! pure architecture:
//!
//! - [`walk`] is the page walker: a pure function over a view of guest-physical memory
//!   ([`PhysView`]) that returns every paging-structure entry it read (address and value),
//!   the translation or the page fault. It writes nothing; [`set_accessed_dirty`] applies the
//!   accessed/dirty updates a successful access makes, in the order the hardware makes them.
//! - [`Mmu`] is a strategy: it owns whatever caching it does (here a soft TLB,
//!   [`soft_tlb`]) and counts its events under `mmu.*` names that follow KVM's.
//!
//! How the CPU drives it: [`Mmu::translate`] for every linear access (one call per page an
//! access touches; a fault goes to the guest as #PF with CR2 = `address`); INVLPG →
//! [`Mmu::invlpg`]; MOV to CR3 → [`Mmu::flush`]`(false)`; a change of CR0.PG/WP or
//! CR4.PGE/PAE/PSE/SMEP/SMAP → [`Mmu::flush`]`(true)`; under PAE paging also
//! [`Mmu::load_pdptes`] at those points, raising #GP(0) (and not loading the register) on
//! [`MmuError::ReservedPdpte`]. [`PagingRegs::from_state`] builds the registers from a
//! [`CpuState`].
//!
//! Modes: paging off, 32-bit paging (with CR4.PSE 4 MiB pages and PSE-36), PAE paging (with
//! the four PDPTE registers, see [`Mmu::load_pdptes`]) and 4-level paging (4 KiB, 2 MiB and
//! 1 GiB pages). MAXPHYADDR is [`MAXPHYADDR`] (40, as deja's CPUID leaf 0x8000_0008 says);
//! SMAP (CR4.SMAP with EFLAGS.AC, see [`PagingRegs::cr4`]) is checked by the walker and by
//! every strategy's cached rights. PKE, PCID and 5-level paging are not claimed by deja's
//! CPUID and not modelled.

mod nested;
mod pdpte;
mod shadow;
mod tlb;
mod walk;

#[cfg(test)]
mod strategy_tests;
#[cfg(test)]
mod tests;

pub use nested::NestedMmu;
pub use shadow::{FLOOD_WRITES, SHADOW_ROOTS, ShadowMmu, UNSYNC_WRITES};
pub use tlb::{SoftTlb, TLB_ENTRIES};
pub use walk::{
    AdUpdates, Level, PageSize, PagingConfig, PagingMode, PhysView, Translation, Walk, WalkEntry,
    accessed_dirty_updates, pae_pdpte_reserved_bits, read_pae_pdptes, set_accessed_dirty, walk,
};

use deja_machine::GuestRam;
use deja_machine::{CpuState, EngineStats};
use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// The physical-address width deja's CPUID reports (leaf 0x8000_0008, EAX bits 7:0). Entry bits
/// from here up to bit 51 are reserved and fault with RSVD.
pub const MAXPHYADDR: u32 = 40;

/// The control registers and MSR that decide how linear addresses translate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PagingRegs {
    /// CR0 (PG bit 31, WP bit 16).
    pub cr0: u64,
    /// CR3: the root of the paging structures.
    pub cr3: u64,
    /// CR4 (PSE bit 4, PAE bit 5, PGE bit 7, SMEP bit 20, SMAP bit 21). SMAP is the bit as
    /// it applies to the access being translated: the CPU clears it for an explicit
    /// supervisor-mode access made with EFLAGS.AC = 1, which SMAP lets through, and leaves
    /// CR4's value for every other access (implicit supervisor accesses to descriptor
    /// tables, the IDT and the TSS are checked whatever AC says).
    pub cr4: u64,
    /// IA32_EFER (LME bit 8, LMA bit 10, NXE bit 11).
    pub efer: u64,
}

impl PagingRegs {
    /// The paging registers of an architectural CPU state.
    pub fn from_state(state: &CpuState) -> Self {
        Self {
            cr0: state.cr0,
            cr3: state.cr3,
            cr4: state.cr4,
            efer: state.efer,
        }
    }
}

/// What an access does with the bytes, which decides the rights it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessKind {
    /// A data read.
    Read,
    /// A data write (including the write half of a read-modify-write).
    Write,
    /// An instruction fetch.
    Execute,
}

/// One access to be translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// Read, write or fetch.
    pub kind: AccessKind,
    /// A user-mode (CPL 3) access. Implicit supervisor accesses made at CPL 3 (descriptor
    /// tables, the TSS, the interrupt stack frame setup) pass `false`, as the SDM treats them
    /// as supervisor-mode accesses.
    pub user: bool,
}

impl Access {
    /// A supervisor data read.
    pub const SUPERVISOR_READ: Access = Access {
        kind: AccessKind::Read,
        user: false,
    };
    /// A supervisor data write.
    pub const SUPERVISOR_WRITE: Access = Access {
        kind: AccessKind::Write,
        user: false,
    };
    /// A supervisor instruction fetch.
    pub const SUPERVISOR_FETCH: Access = Access {
        kind: AccessKind::Execute,
        user: false,
    };
}

/// A page fault (#PF, vector 14) to deliver to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageFault {
    /// The faulting linear address: what the CPU loads into CR2.
    pub address: u64,
    /// The error code pushed with the exception (see the `PF_*` constants).
    pub error_code: u32,
}

/// Error-code bit 0: the fault was a protection violation (or a reserved bit), not a
/// not-present entry.
pub const PF_PRESENT: u32 = 1 << 0;
/// Error-code bit 1: the access was a write.
pub const PF_WRITE: u32 = 1 << 1;
/// Error-code bit 2: the access was a user-mode access.
pub const PF_USER: u32 = 1 << 2;
/// Error-code bit 3: a reserved bit was set in some paging-structure entry.
pub const PF_RESERVED: u32 = 1 << 3;
/// Error-code bit 4: the access was an instruction fetch (reported only with CR4.SMEP, or
/// with EFER.NXE under PAE or 4-level paging).
pub const PF_FETCH: u32 = 1 << 4;

/// CR0.WP: supervisor writes honour read-only pages.
pub const CR0_WP: u64 = 1 << 16;
/// CR0.PG: paging enabled.
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PSE: 4 MiB pages under 32-bit paging.
pub const CR4_PSE: u64 = 1 << 4;
/// CR4.PAE: PAE or 4-level paging.
pub const CR4_PAE: u64 = 1 << 5;
/// CR4.PGE: global pages.
pub const CR4_PGE: u64 = 1 << 7;
/// CR4.SMEP: supervisor fetches from user pages fault.
pub const CR4_SMEP: u64 = 1 << 20;
/// CR4.SMAP: supervisor data accesses to user pages fault (unless EFLAGS.AC allows an
/// explicit one: see [`PagingRegs::cr4`]).
pub const CR4_SMAP: u64 = 1 << 21;
/// EFER.LME: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA: long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// EFER.NXE: the XD bit (63) is honoured instead of reserved.
pub const EFER_NXE: u64 = 1 << 11;

/// Names of the counters MMU strategies keep (KVM's names, under `mmu.`).
pub mod counters {
    /// Translations answered from the soft TLB.
    pub const TLB_HIT: &str = "mmu.tlb_hit";
    /// Translations the soft TLB could not answer (absent entry, or one whose cached rights
    /// do not allow the access, or a write to a page whose dirty bit is not yet set).
    pub const TLB_MISS: &str = "mmu.tlb_miss";
    /// Page walks through guest memory.
    pub const WALKS: &str = "mmu.walks";
    /// INVLPG (single-address invalidations).
    pub const INVLPG: &str = "mmu.invlpg";
    /// Whole-TLB flushes (CR3 loads, paging-mode changes).
    pub const TLB_FLUSH: &str = "mmu.tlb_flush";
    /// Page faults reflected to the guest.
    pub const PF_GUEST: &str = "mmu.pf_guest";
    /// Loads of the four PAE PDPTE registers.
    pub const PDPTE_LOAD: &str = "mmu.pdpte_load";
    /// Hidden faults fixed by installing a shadow entry (shadow).
    pub const PF_FIXED: &str = "mmu.pf_fixed";
    /// Guest stores to a write-traced page-table page (shadow).
    pub const MMU_PTE_WRITE: &str = "mmu.mmu_pte_write";
    /// Shadow entries updated in place after a traced guest PTE write (shadow).
    pub const MMU_PTE_UPDATED: &str = "mmu.mmu_pte_updated";
    /// Page-table pages whose shadows were dropped because the guest kept writing them
    /// without using them (shadow).
    pub const MMU_FLOODED: &str = "mmu.mmu_flooded";
    /// Shadow entries dropped by write tracing, flooding or resynchronisation (shadow).
    pub const MMU_SHADOW_ZAPPED: &str = "mmu.mmu_shadow_zapped";
    /// Shadow roots evicted from the bounded root cache to make room (shadow).
    pub const MMU_RECYCLED: &str = "mmu.mmu_recycled";
    /// CR3 (and role) combinations with no cached shadow root (shadow).
    pub const MMU_CACHE_MISS: &str = "mmu.mmu_cache_miss";
    /// Leaf page-table pages let go out of sync (no longer traced until the next INVLPG,
    /// CR3 load or CR4 change) (shadow).
    pub const MMU_UNSYNC: &str = "mmu.mmu_unsync";
    /// Memory references made by two-dimensional walks, EPT and guest entries (nested).
    pub const WALK_REFS: &str = "mmu.walk_refs";
}

/// The MMU strategies deja compares (`--mmu shadow|nested|tlb`, issue #7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MmuStrategy {
    /// Shadow page tables kept coherent by write-tracing the guest's page tables.
    Shadow,
    /// The EPT/NPT model: a two-dimensional walk on every TLB miss.
    Nested,
    /// A plain soft TLB flushed on CR3 loads and INVLPG ([`soft_tlb`]).
    Tlb,
}

impl MmuStrategy {
    /// Every strategy, in the order reports list them.
    pub const ALL: [MmuStrategy; 3] = [MmuStrategy::Shadow, MmuStrategy::Nested, MmuStrategy::Tlb];

    /// The strategy bt uses when none is chosen: shadow page tables, as the classic software
    /// VMMs (and KVM without EPT/NPT) do.
    pub const DEFAULT: MmuStrategy = MmuStrategy::Shadow;

    /// The name `--mmu` takes.
    pub fn name(self) -> &'static str {
        match self {
            MmuStrategy::Shadow => "shadow",
            MmuStrategy::Nested => "nested",
            MmuStrategy::Tlb => "tlb",
        }
    }

    /// A fresh MMU of this strategy (every strategy exists; the `Result` is kept so callers
    /// need not change when a strategy needs configuration that can be wrong).
    pub fn create(self) -> Result<Box<dyn Mmu>, MmuError> {
        Ok(self.build())
    }

    /// A fresh MMU of this strategy.
    pub fn build(self) -> Box<dyn Mmu> {
        match self {
            MmuStrategy::Tlb => soft_tlb(),
            MmuStrategy::Shadow => Box::new(ShadowMmu::new()),
            MmuStrategy::Nested => Box::new(NestedMmu::new()),
        }
    }
}

impl fmt::Display for MmuStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for MmuStrategy {
    type Err = MmuError;

    fn from_str(text: &str) -> Result<Self, MmuError> {
        MmuStrategy::ALL
            .into_iter()
            .find(|s| s.name() == text)
            .ok_or_else(|| MmuError::UnknownStrategy {
                text: text.to_string(),
            })
    }
}

/// Failures an MMU reports to the CPU (not page faults: those go to the guest).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MmuError {
    /// A present PAE PDPTE has a reserved bit set: the load of CR3 (or of CR0/CR4 that
    /// entered PAE paging) must raise #GP(0) and not take effect.
    #[error(
        "PAE PDPTE {index} at guest-physical {address:#x} (CR3 {cr3:#x}) is {value:#018x}: reserved bits {reserved:#x} are set, so the load raises #GP(0)"
    )]
    ReservedPdpte {
        /// Which of the four PDPTEs (bits 31:30 of the linear address).
        index: usize,
        /// Its guest-physical address.
        address: u64,
        /// The CR3 it was loaded through.
        cr3: u64,
        /// The entry as read.
        value: u64,
        /// The reserved bits that are set.
        reserved: u64,
    },
    /// `--mmu` named no strategy deja knows.
    #[error("unknown MMU strategy {text:?}: expected shadow, nested or tlb")]
    UnknownStrategy {
        /// What was given.
        text: String,
    },
}

/// An MMU strategy: translates linear addresses for the bt engine and keeps whatever caches
/// it keeps coherent with the guest's TLB-management instructions.
pub trait Mmu: Send {
    /// Linear to guest-physical; with CR0.PG clear returns `linear` unchanged. Sets A/D bits
    /// as hardware does.
    ///
    /// Outside long mode linear addresses are 32 bits wide: the upper half of `linear` is
    /// ignored and a fault reports the 32-bit address. In 4-level paging `linear` must be
    /// canonical (the #GP for a non-canonical address is the CPU's job); bits 63:48 are
    /// ignored here.
    fn translate(
        &mut self,
        mem: &GuestRam,
        regs: &PagingRegs,
        linear: u64,
        access: Access,
    ) -> Result<u64, PageFault>;

    /// INVLPG: drops every cached translation for the page holding `linear`, whatever its
    /// size and even if global.
    fn invlpg(&mut self, linear: u64);

    /// CR3 load: flush(false) keeps global pages; CR4.PGE/PAE/PSE/SMEP or CR0.PG/WP changes:
    /// flush(true).
    fn flush(&mut self, include_global: bool);

    /// The strategy's counters, named `mmu.*` (see [`counters`]).
    fn stats(&self) -> EngineStats;

    /// Loads the four PAE PDPTE registers from the PDPT `regs.cr3` points to, as the CPU does
    /// when PAE paging is (or becomes) active on a MOV to CR3, a MOV to CR0/CR4 that changes
    /// PG, PAE, PGE, PSE or SMEP, or a task switch (SDM 4.4.1). A present PDPTE with a
    /// reserved bit set makes the instruction raise #GP(0); the registers then keep their old
    /// values. Call it before or after the matching [`Mmu::flush`], in either order.
    ///
    /// If the CPU never calls it, [`Mmu::translate`] loads the PDPTEs itself at the first PAE
    /// translation after a flush (a reserved bit found that late becomes a #PF with RSVD),
    /// which differs from hardware only when the guest rewrites its PDPT between the CR3
    /// load and its first memory access.
    fn load_pdptes(&mut self, mem: &GuestRam, regs: &PagingRegs) -> Result<[u64; 4], MmuError> {
        read_pae_pdptes(mem, regs.cr3)
    }

    /// The guest stored `len` bytes at guest-physical `phys`, in a page this strategy asked
    /// to be tracked ([`MmuEvent::Track`]); called after the store is in memory. The shadow
    /// strategy updates or drops the shadow entries built from what changed.
    fn note_guest_write(&mut self, mem: &GuestRam, phys: u64, len: usize) {
        let _ = (mem, phys, len);
    }

    /// Moves what the strategy has to tell the engine since the last call (pages to start or
    /// stop write-tracking, its own stores to guest memory) to `out`, in order. The engine
    /// calls it after every other call that may produce events, before the next guest store.
    fn drain_events(&mut self, out: &mut Vec<MmuEvent>) {
        let _ = out;
    }

    /// Forgets every cached translation and every shadow, global ones included, and stops
    /// tracking every page: guest memory may have been rewritten behind the engine (a state
    /// or snapshot load), so nothing built from it can be trusted.
    fn reset(&mut self) {
        self.flush(true);
    }
}

/// What an MMU strategy tells the engine besides translations ([`Mmu::drain_events`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmuEvent {
    /// Report guest stores to this guest-physical page number through
    /// [`Mmu::note_guest_write`] (a shadow entry now depends on a guest entry in it).
    Track(u64),
    /// Stop reporting stores to this page (its last dependent shadow entry went, or it went
    /// out of sync, or it flooded).
    Untrack(u64),
    /// The MMU stored to guest-physical memory at this address itself (an accessed/dirty
    /// bit update of a paging entry): translated code there must be invalidated. Page-table
    /// tracking ignores these, as KVM's does for the walker's own A/D updates.
    Stored(u64),
}

/// Queues an [`MmuEvent::Stored`] for each accessed/dirty update of a walk.
pub(crate) fn note_ad_stores(updates: &AdUpdates, events: &mut Vec<MmuEvent>) {
    events.extend(updates.as_slice().iter().map(|&(a, _)| MmuEvent::Stored(a)));
}

/// The plain soft-TLB strategy (`--mmu tlb`): a direct-mapped TLB in front of the walker.
pub fn soft_tlb() -> Box<dyn Mmu> {
    Box::new(SoftTlb::new())
}
