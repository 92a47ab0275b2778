//! The seam between the engine and the MMU that turns linear into guest-physical addresses.
//!
//! The engine only talks to a [`Translate`] object: the "mmu" module (soft TLB, shadow page
//! tables, nested model) plugs in here. Until those are installed, the engine uses
//! [`Walker`], a plain page walker without a TLB.

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

/// A plain page walker without a TLB: 32-bit, PAE and 4-level paging with 4K/2M/4M/1G
/// pages, U/S, R/W with CR0.WP, NX, SMEP, and A/D updates. The engine's interim MMU until
/// the `mmu` module's strategies are installed through [`crate::BtCpu::set_mmu`].
#[derive(Debug, Default)]
pub struct Walker;

fn read_pte(mem: &GuestMemoryMmap, addr: u64, wide: bool) -> Option<u64> {
    use vm_memory::{Bytes, GuestAddress};
    if wide {
        mem.read_obj::<u64>(GuestAddress(addr)).ok()
    } else {
        mem.read_obj::<u32>(GuestAddress(addr)).ok().map(u64::from)
    }
}

fn write_pte(mem: &GuestMemoryMmap, addr: u64, v: u64, wide: bool) {
    use vm_memory::{Bytes, GuestAddress};
    // A/D updates to tables outside RAM are dropped, as writes to nothing are.
    let _ = if wide {
        mem.write_obj::<u64>(v, GuestAddress(addr))
    } else {
        mem.write_obj::<u32>(v as u32, GuestAddress(addr))
    };
}

impl Translate for Walker {
    fn translate(
        &mut self,
        mem: &GuestMemoryMmap,
        regs: &Regs,
        linear: u64,
        kind: Kind,
        user: bool,
    ) -> Result<u64, Fault> {
        if regs.cr0 & (1 << 31) == 0 {
            return Ok(linear);
        }
        let pae = regs.cr4 & (1 << 5) != 0;
        let long = regs.efer & (1 << 10) != 0;
        let nxe = regs.efer & (1 << 11) != 0;
        let wp = regs.cr0 & (1 << 16) != 0;
        let pse = regs.cr4 & (1 << 4) != 0;
        let smep = regs.cr4 & (1 << 20) != 0;
        let write = kind == Kind::Write;
        let exec = kind == Kind::Execute;
        let fault = |present: bool, rsvd: bool| {
            let mut e = present as u32;
            if write {
                e |= 2;
            }
            if user {
                e |= 4;
            }
            if rsvd {
                e |= 8;
            }
            if exec && (nxe || smep) {
                e |= 16;
            }
            Fault {
                address: linear,
                error_code: e,
            }
        };
        // (table address, index shift, index bits) per level.
        let (levels, wide, mut table): (&[(u32, u32)], bool, u64) = if long {
            (
                &[(39, 9), (30, 9), (21, 9), (12, 9)],
                true,
                regs.cr3 & 0x000f_ffff_ffff_f000,
            )
        } else if pae {
            (&[(30, 2), (21, 9), (12, 9)], true, regs.cr3 & 0xffff_ffe0)
        } else {
            (&[(22, 10), (12, 10)], false, regs.cr3 & 0xffff_f000)
        };
        let addr_mask = 0x000f_ffff_ffff_f000u64;
        let mut user_ok = true;
        let mut write_ok = true;
        let mut nx = false;
        let mut entries = [(0u64, 0u64); 4];
        let mut n_entries = 0;
        for (depth, &(shift, bits)) in levels.iter().enumerate() {
            let idx = (linear >> shift) & ((1 << bits) - 1);
            let esz = if wide { 8 } else { 4 };
            let ea = table + idx * esz;
            let pte = read_pte(mem, ea, wide).ok_or_else(|| fault(false, false))?;
            if pte & 1 == 0 {
                return Err(fault(false, false));
            }
            let pdpte_legacy = pae && !long && depth == 0;
            if nxe && wide && pte >> 63 != 0 {
                nx = true;
            }
            if wide && !nxe && pte >> 63 != 0 {
                return Err(fault(true, true));
            }
            if !pdpte_legacy {
                user_ok &= pte & 4 != 0;
                write_ok &= pte & 2 != 0;
            }
            entries[n_entries] = (ea, pte);
            n_entries += 1;
            let last = depth == levels.len() - 1;
            let large = !pdpte_legacy
                && !last
                && pte & 0x80 != 0
                && (shift == 21 || shift == 30 || (shift == 22 && pse));
            if last || large {
                let page_mask = (1u64 << shift) - 1;
                let base = if !wide && large {
                    // 4 MiB page with PSE-36 bits.
                    (pte & 0xffc0_0000) | ((pte >> 13) & 0xff) << 32
                } else {
                    pte & addr_mask & !page_mask
                };
                if user && !user_ok {
                    return Err(fault(true, false));
                }
                if write && !write_ok && (user || wp) {
                    return Err(fault(true, false));
                }
                if exec && nx {
                    return Err(fault(true, false));
                }
                if exec && !user && smep && user_ok {
                    return Err(fault(true, false));
                }
                for (i, &(ea, pte)) in entries[..n_entries].iter().enumerate() {
                    if pae && !long && i == 0 {
                        continue;
                    }
                    let leaf = i == n_entries - 1;
                    let mut n = pte | 0x20;
                    if leaf && write {
                        n |= 0x40;
                    }
                    if n != pte {
                        write_pte(mem, ea, n, wide);
                    }
                }
                return Ok(base | (linear & page_mask));
            }
            table = pte & addr_mask;
            if !wide {
                table &= 0xffff_f000;
            }
        }
        Err(fault(false, false))
    }
    fn invlpg(&mut self, _linear: u64) {}
    fn flush(&mut self, _include_global: bool) {}
    fn stats(&self) -> deja_machine::EngineStats {
        deja_machine::EngineStats::default()
    }
}

/// The translator the engine uses by default.
pub fn default_translator() -> Box<dyn Translate> {
    Box::new(Walker)
}
