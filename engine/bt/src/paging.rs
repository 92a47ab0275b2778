//! The seam between the engine and the MMU that turns linear into guest-physical addresses.
//!
//! The engine only talks to a [`Translate`] object: the "mmu" module (soft TLB, shadow page
//! tables, nested model) plugs in here through [`MmuAdapter`]; the default is the shadow
//! MMU (issue #7).

use deja_machine::GuestRam;

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
        mem: &GuestRam,
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
    /// Loads the PAE PDPTE registers (MOV to CR3/CR0/CR4 with PAE paging); `false` when a
    /// present PDPTE has reserved bits set (the instruction then raises #GP(0)).
    fn load_pdptes(&mut self, _mem: &GuestRam, _regs: &Regs) -> bool {
        true
    }
    /// A guest store of `len` bytes at `phys` (already in memory) to a page the translator
    /// asked to track ([`crate::mmu::MmuEvent::Track`]).
    fn note_guest_write(&mut self, _mem: &GuestRam, _phys: u64, _len: usize) {}
    /// Moves the translator's pending events to `out` ([`crate::mmu::Mmu::drain_events`]).
    fn drain_events(&mut self, _out: &mut Vec<crate::mmu::MmuEvent>) {}
    /// Forgets everything built from guest memory ([`crate::mmu::Mmu::reset`]).
    fn reset(&mut self) {
        self.flush(true);
    }
}

/// The `mmu` module's strategies behind the engine's seam.
pub struct MmuAdapter(pub Box<dyn crate::mmu::Mmu>);

impl MmuAdapter {
    fn regs(r: &Regs) -> crate::mmu::PagingRegs {
        crate::mmu::PagingRegs {
            cr0: r.cr0,
            cr3: r.cr3,
            cr4: r.cr4,
            efer: r.efer,
        }
    }
}

impl Translate for MmuAdapter {
    fn translate(
        &mut self,
        mem: &GuestRam,
        regs: &Regs,
        linear: u64,
        kind: Kind,
        user: bool,
    ) -> Result<u64, Fault> {
        let kind = match kind {
            Kind::Read => crate::mmu::AccessKind::Read,
            Kind::Write => crate::mmu::AccessKind::Write,
            Kind::Execute => crate::mmu::AccessKind::Execute,
        };
        self.0
            .translate(
                mem,
                &Self::regs(regs),
                linear,
                crate::mmu::Access { kind, user },
            )
            .map_err(|f| Fault {
                address: f.address,
                error_code: f.error_code,
            })
    }
    fn invlpg(&mut self, linear: u64) {
        self.0.invlpg(linear);
    }
    fn flush(&mut self, include_global: bool) {
        self.0.flush(include_global);
    }
    fn stats(&self) -> deja_machine::EngineStats {
        self.0.stats()
    }
    fn load_pdptes(&mut self, mem: &GuestRam, regs: &Regs) -> bool {
        self.0.load_pdptes(mem, &Self::regs(regs)).is_ok()
    }
    fn note_guest_write(&mut self, mem: &GuestRam, phys: u64, len: usize) {
        self.0.note_guest_write(mem, phys, len);
    }
    fn drain_events(&mut self, out: &mut Vec<crate::mmu::MmuEvent>) {
        self.0.drain_events(out);
    }
    fn reset(&mut self) {
        self.0.reset();
    }
}

/// The translator the engine uses by default: shadow page tables
/// ([`crate::mmu::MmuStrategy::DEFAULT`]).
pub fn default_translator() -> Box<dyn Translate> {
    Box::new(MmuAdapter(crate::mmu::MmuStrategy::DEFAULT.build()))
}
