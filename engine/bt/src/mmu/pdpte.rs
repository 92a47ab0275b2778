//! The PAE PDPTE registers as the strategies that cache translations keep them.

use super::{MmuError, PhysView, read_pae_pdptes};
use deja_machine::GuestRam;

#[derive(Clone, Copy, Debug)]
struct Loaded {
    /// The CR3 they were loaded through.
    cr3: u64,
    values: [u64; 4],
    /// Loaded by `Mmu::load_pdptes` (kept across flushes) rather than lazily by a walk
    /// (dropped by every flush, so the next CR3's PDPT is read).
    explicit: bool,
}

/// The four PDPTE registers PAE paging walks from, and how often they were loaded.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct PdpteRegisters {
    loaded: Option<Loaded>,
    /// Loads, explicit or lazy (`mmu.pdpte_load`).
    pub(super) loads: u64,
}

impl PdpteRegisters {
    /// The registers to walk with: the loaded ones for this CR3, else read from the PDPT
    /// now and kept until the next flush.
    pub(super) fn for_walk(&mut self, mem: &GuestRam, cr3: u64) -> [u64; 4] {
        if let Some(p) = &self.loaded
            && p.cr3 == cr3
        {
            return p.values;
        }
        let base = cr3 & 0xffff_ffe0;
        let mut values = [0u64; 4];
        for (i, v) in values.iter_mut().enumerate() {
            let Ok(value) = PhysView::read_u64(mem, base + 8 * i as u64);
            *v = value;
        }
        self.set(cr3, values, false);
        values
    }

    /// An architectural load (MOV to CR3/CR0/CR4 under PAE): fails on reserved bits.
    pub(super) fn load(&mut self, mem: &GuestRam, cr3: u64) -> Result<[u64; 4], MmuError> {
        let values = read_pae_pdptes(mem, cr3)?;
        self.set(cr3, values, true);
        Ok(values)
    }

    /// A TLB flush drops registers that a walk read lazily; loaded ones persist.
    pub(super) fn flush(&mut self) {
        if self.loaded.is_some_and(|p| !p.explicit) {
            self.loaded = None;
        }
    }

    fn set(&mut self, cr3: u64, values: [u64; 4], explicit: bool) {
        self.loads += 1;
        self.loaded = Some(Loaded {
            cr3,
            values,
            explicit,
        });
    }
}
