//! The seam between the engine and the MMU that turns linear into guest-physical addresses.
//!
//! The engine only talks to a [`Translate`] object: the "mmu" module (soft TLB, shadow page
//! tables, nested model) plugs in here. Until a paging-capable MMU is installed, the
//! [`Unpaged`] translator serves guests that never enable paging and raises a page fault
//! (recorded as such) if a guest does.

use vm_memory::GuestMemoryMmap;

/// What a translation is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// An instruction fetch.
    Execute,
}

/// The paging-relevant control registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Regs {
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
}

/// A failed translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The faulting linear address (for CR2).
    pub address: u64,
    /// The page-fault error code.
    pub error_code: u32,
}

/// Linear-to-physical translation with the hardware's checks and A/D updates.
pub trait Translate: Send {
    /// Translates `linear`; `user` is a CPL-3 access (not an implicit supervisor access).
    fn translate(
        &mut self,
        mem: &GuestMemoryMmap,
        regs: &Regs,
        linear: u64,
        kind: Kind,
        user: bool,
    ) -> Result<u64, Fault>;
    /// INVLPG.
    fn invlpg(&mut self, linear: u64);
    /// A CR3 load (`include_global` false) or a paging-mode change (true).
    fn flush(&mut self, include_global: bool);
    /// Counters, named `mmu.*`.
    fn stats(&self) -> deja_machine::EngineStats;
}

/// A translator for guests that never enable paging.
#[derive(Debug, Default)]
pub struct Unpaged;

impl Translate for Unpaged {
    fn translate(
        &mut self,
        _mem: &GuestMemoryMmap,
        regs: &Regs,
        linear: u64,
        kind: Kind,
        user: bool,
    ) -> Result<u64, Fault> {
        if regs.cr0 & (1 << 31) == 0 {
            return Ok(linear);
        }
        // No paging-capable MMU installed: every page is "not present".
        let mut error_code = 0;
        if kind == Kind::Write {
            error_code |= 2;
        }
        if user {
            error_code |= 4;
        }
        if kind == Kind::Execute {
            error_code |= 16;
        }
        Err(Fault {
            address: linear,
            error_code,
        })
    }
    fn invlpg(&mut self, _linear: u64) {}
    fn flush(&mut self, _include_global: bool) {}
    fn stats(&self) -> deja_machine::EngineStats {
        deja_machine::EngineStats::default()
    }
}

/// The translator the engine uses by default.
pub fn default_translator() -> Box<dyn Translate> {
    Box::new(Unpaged)
}
