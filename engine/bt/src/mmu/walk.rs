//! The page walker: a pure function from (memory view, paging configuration, linear address,
//! access) to the entries read and the translation or page fault, per SDM vol. 3 ch. 4.

use super::{
    Access, AccessKind, CR0_PG, CR0_WP, CR4_PAE, CR4_PGE, CR4_PSE, CR4_SMAP, CR4_SMEP, EFER_LMA,
    EFER_LME, EFER_NXE, MAXPHYADDR, MmuError, PF_FETCH, PF_PRESENT, PF_RESERVED, PF_USER, PF_WRITE,
    PageFault, PagingRegs,
};
use deja_machine::GuestRam;
use std::convert::Infallible;
use vm_memory::{Bytes, GuestAddress};

/// Entry bit 0: present.
const P: u64 = 1 << 0;
/// Entry bit 1: read/write.
const RW: u64 = 1 << 1;
/// Entry bit 2: user/supervisor.
const US: u64 = 1 << 2;
/// Entry bit 5: accessed.
const A: u64 = 1 << 5;
/// Entry bit 6: dirty (leaf entries).
const D: u64 = 1 << 6;
/// Entry bit 7: page size (maps a large page instead of pointing to a table).
const PS: u64 = 1 << 7;
/// Entry bit 8: global (leaf entries).
const G: u64 = 1 << 8;
/// Entry bit 63: execute-disable (with EFER.NXE; reserved without).
const XD: u64 = 1 << 63;

/// Bits (MAXPHYADDR-1):12: a 4 KiB-aligned physical address.
const ADDR_4K: u64 = ((1 << MAXPHYADDR) - 1) & !0xfff;
/// Bits (MAXPHYADDR-1):21: a 2 MiB-aligned physical address.
const ADDR_2M: u64 = ((1 << MAXPHYADDR) - 1) & !((1 << 21) - 1);
/// Bits (MAXPHYADDR-1):30: a 1 GiB-aligned physical address.
const ADDR_1G: u64 = ((1 << MAXPHYADDR) - 1) & !((1 << 30) - 1);
/// Bits 51:MAXPHYADDR: reserved in every 4-level entry (bits 62:52 are ignored there).
const RSVD_HIGH_4LEVEL: u64 = ((1 << 52) - 1) & !((1 << MAXPHYADDR) - 1);
/// Bits 62:MAXPHYADDR: reserved in every PAE entry.
const RSVD_HIGH_PAE: u64 = ((1 << 63) - 1) & !((1 << MAXPHYADDR) - 1);
/// Bits 20:13 of a 2 MiB leaf (between PAT and the address).
const RSVD_2M_LOW: u64 = ((1 << 21) - 1) & !((1 << 13) - 1);
/// Bits 29:13 of a 1 GiB leaf.
const RSVD_1G_LOW: u64 = ((1 << 30) - 1) & !((1 << 13) - 1);
/// Bit 21 of a 32-bit 4 MiB leaf: bits 21:(M-19) with M = min(MAXPHYADDR, 40) = 40.
const RSVD_4M: u64 = 1 << 21;
/// Reserved bits of a present PAE PDPTE: 2:1, 8:5 and 63:MAXPHYADDR.
const RSVD_PAE_PDPTE: u64 = 0b110 | 0b1_1110_0000 | !((1 << MAXPHYADDR) - 1);

/// A view of guest-physical memory for the walker. The plain MMU reads guest memory
/// directly; a nested (EPT/NPT) walker will implement it by translating each guest-physical
/// address through the second-level tables, failing with its own error (an EPT violation).
pub trait PhysView {
    /// Why an access to the view failed (a second-level fault for a nested view).
    type Error;
    /// Reads a 32-bit paging-structure entry (32-bit paging).
    fn read_u32(&self, gpa: u64) -> Result<u32, Self::Error>;
    /// Reads a 64-bit paging-structure entry (PAE and 4-level paging).
    fn read_u64(&self, gpa: u64) -> Result<u64, Self::Error>;
    /// Sets `bits` in the byte at `gpa` (accessed and dirty flags live in byte 0 of an
    /// entry, so one byte covers both widths and leaves the rest of the entry untouched).
    fn set_bits_u8(&self, gpa: u64, bits: u8) -> Result<(), Self::Error>;
}

/// Guest RAM as the walker sees it: addresses without RAM read as all ones (as the pc
/// machine's unbacked physical space does), which makes a present entry with reserved bits,
/// and writes to them are dropped.
impl PhysView for GuestRam {
    type Error = Infallible;

    #[inline]
    fn read_u32(&self, gpa: u64) -> Result<u32, Infallible> {
        Ok(self.read_obj::<u32>(GuestAddress(gpa)).unwrap_or(u32::MAX))
    }

    #[inline]
    fn read_u64(&self, gpa: u64) -> Result<u64, Infallible> {
        Ok(self.read_obj::<u64>(GuestAddress(gpa)).unwrap_or(u64::MAX))
    }

    fn set_bits_u8(&self, gpa: u64, bits: u8) -> Result<(), Infallible> {
        if let Ok(old) = self.read_obj::<u8>(GuestAddress(gpa)) {
            // Unbacked addresses have nowhere to keep the bit: drop the write as the bus does.
            let _ = self.write_obj::<u8>(old | bits, GuestAddress(gpa));
        }
        Ok(())
    }
}

/// Which paging structures translate linear addresses (SDM 4.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingMode {
    /// CR0.PG = 0: linear = physical.
    Disabled,
    /// CR0.PG = 1, CR4.PAE = 0: two levels of 32-bit entries.
    Bits32,
    /// CR0.PG = 1, CR4.PAE = 1, not long mode: four PDPTE registers, then two levels.
    Pae,
    /// CR0.PG = 1, CR4.PAE = 1, EFER.LME = 1 (long mode): four levels of 64-bit entries.
    FourLevel,
}

/// Everything in the control registers a walk depends on, decoded once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagingConfig {
    /// The paging mode.
    pub mode: PagingMode,
    /// CR3 as loaded.
    pub cr3: u64,
    /// CR4.PSE: 4 MiB pages in 32-bit paging.
    pub pse: bool,
    /// CR4.PGE: the G bit of leaf entries is honoured.
    pub pge: bool,
    /// EFER.NXE: bit 63 is execute-disable rather than reserved (PAE and 4-level only).
    pub nxe: bool,
    /// CR0.WP: supervisor writes honour read-only pages.
    pub wp: bool,
    /// CR4.SMEP: supervisor fetches from user pages fault.
    pub smep: bool,
    /// CR4.SMAP as it applies to this access: supervisor data accesses to user pages fault.
    /// The CPU passes CR4.SMAP clear for explicit supervisor accesses made with EFLAGS.AC
    /// set (see [`super::PagingRegs::cr4`]).
    pub smap: bool,
}

impl PagingConfig {
    /// Decodes the registers. Long mode is taken from EFER.LMA, or from EFER.LME with
    /// CR0.PG and CR4.PAE set (the CPU sets LMA in exactly that case), so a caller that does
    /// not maintain LMA itself still gets 4-level paging.
    pub fn from_regs(regs: &PagingRegs) -> Self {
        let pae = regs.cr4 & CR4_PAE != 0;
        let mode = if regs.cr0 & CR0_PG == 0 {
            PagingMode::Disabled
        } else if !pae {
            PagingMode::Bits32
        } else if regs.efer & (EFER_LMA | EFER_LME) != 0 {
            PagingMode::FourLevel
        } else {
            PagingMode::Pae
        };
        Self {
            mode,
            cr3: regs.cr3,
            pse: regs.cr4 & CR4_PSE != 0,
            pge: regs.cr4 & CR4_PGE != 0,
            nxe: regs.efer & EFER_NXE != 0,
            wp: regs.cr0 & CR0_WP != 0,
            smep: regs.cr4 & CR4_SMEP != 0,
            smap: regs.cr4 & CR4_SMAP != 0,
        }
    }

    /// Whether execute-disable is in force (EFER.NXE under PAE or 4-level paging).
    pub fn nx_active(&self) -> bool {
        self.nxe && matches!(self.mode, PagingMode::Pae | PagingMode::FourLevel)
    }

    /// The linear address as the mode sees it: 32 bits outside long mode, 48 in it (bits
    /// 63:48 of a canonical address carry no information).
    pub fn effective_linear(&self, linear: u64) -> u64 {
        match self.mode {
            PagingMode::Bits32 | PagingMode::Pae => linear & 0xffff_ffff,
            PagingMode::Disabled | PagingMode::FourLevel => linear,
        }
    }

    /// The error-code bits that describe the access itself (W/R, U/S, I/D).
    pub fn access_error_bits(&self, access: Access) -> u32 {
        let mut code = 0;
        if access.kind == AccessKind::Write {
            code |= PF_WRITE;
        }
        if access.user {
            code |= PF_USER;
        }
        if access.kind == AccessKind::Execute && (self.smep || self.nx_active()) {
            code |= PF_FETCH;
        }
        code
    }
}

/// The level of a paging-structure entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Page-map level 4 (4-level paging only).
    Pml4,
    /// Page-directory-pointer table (4-level paging; the PDPTE registers in PAE paging).
    Pdpt,
    /// Page directory.
    Pd,
    /// Page table.
    Pt,
}

/// One paging-structure entry the walk used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalkEntry {
    /// The structure it belongs to.
    pub level: Level,
    /// Its guest-physical address (for a PAE PDPTE register: where it was loaded from).
    pub address: u64,
    /// Its value as read (32-bit entries zero-extended).
    pub value: u64,
    /// A PAE PDPTE taken from the PDPTE registers rather than read from memory during this
    /// walk; it has no accessed bit.
    pub from_register: bool,
}

/// The size of the page a translation maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PageSize {
    /// 4 KiB (a PTE).
    Size4K,
    /// 2 MiB (a PAE or 4-level PDE with PS).
    Size2M,
    /// 4 MiB (a 32-bit PDE with PS and CR4.PSE).
    Size4M,
    /// 1 GiB (a 4-level PDPTE with PS).
    Size1G,
}

impl PageSize {
    /// log2 of the size in bytes.
    pub fn shift(self) -> u32 {
        match self {
            PageSize::Size4K => 12,
            PageSize::Size2M => 21,
            PageSize::Size4M => 22,
            PageSize::Size1G => 30,
        }
    }

    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        1 << self.shift()
    }
}

/// A successful translation and the rights the whole walk grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The guest-physical address of the byte at the linear address.
    pub phys: u64,
    /// Guest-physical base of the page (aligned to `size`).
    pub frame: u64,
    /// The page's size.
    pub size: PageSize,
    /// U/S = 1 at every level: a user-mode address.
    pub user: bool,
    /// R/W = 1 at every level.
    pub writable: bool,
    /// XD = 1 at some level (with NXE; always false otherwise).
    pub execute_disable: bool,
    /// The leaf's G bit, with CR4.PGE set.
    pub global: bool,
    /// The leaf's dirty bit as read (before this access set it).
    pub dirty: bool,
}

/// The result of one walk: the entries read, top level first, and the outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Walk {
    entries: [WalkEntry; 4],
    len: usize,
    /// The linear address as translated (see [`PagingConfig::effective_linear`]).
    pub linear: u64,
    /// The translation, or the page fault the access raises.
    pub result: Result<Translation, PageFault>,
}

impl Walk {
    /// The entries the walk read, top level first; the last one is the leaf on success,
    /// the entry that stopped the walk on a not-present or reserved-bit fault.
    pub fn entries(&self) -> &[WalkEntry] {
        &self.entries[..self.len]
    }

    fn new(linear: u64) -> Self {
        let none = WalkEntry {
            level: Level::Pt,
            address: 0,
            value: 0,
            from_register: false,
        };
        Self {
            entries: [none; 4],
            len: 0,
            linear,
            result: Err(PageFault {
                address: linear,
                error_code: 0,
            }),
        }
    }

    fn push(&mut self, level: Level, address: u64, value: u64, from_register: bool) {
        self.entries[self.len] = WalkEntry {
            level,
            address,
            value,
            from_register,
        };
        self.len += 1;
    }

    fn fault(mut self, error_code: u32) -> Self {
        self.result = Err(PageFault {
            address: self.linear,
            error_code,
        });
        self
    }
}

/// The reserved bits set in a PAE PDPTE (0 when it is not present: those bits are then
/// free for software).
pub fn pae_pdpte_reserved_bits(pdpte: u64) -> u64 {
    if pdpte & P == 0 {
        0
    } else {
        pdpte & RSVD_PAE_PDPTE
    }
}

/// Reads the four PAE PDPTEs through `cr3` (bits 31:5 hold the 32-byte aligned PDPT) and
/// checks their reserved bits, as a MOV to CR3 under PAE paging does.
pub fn read_pae_pdptes(mem: &GuestRam, cr3: u64) -> Result<[u64; 4], MmuError> {
    let base = cr3 & 0xffff_ffe0;
    let mut pdptes = [0u64; 4];
    for (index, slot) in pdptes.iter_mut().enumerate() {
        let address = base + 8 * index as u64;
        let Ok(value) = PhysView::read_u64(mem, address);
        let reserved = pae_pdpte_reserved_bits(value);
        if reserved != 0 {
            return Err(MmuError::ReservedPdpte {
                index,
                address,
                cr3,
                value,
                reserved,
            });
        }
        *slot = value;
    }
    Ok(pdptes)
}

/// Rights gathered across the levels of a walk.
struct Rights {
    user: bool,
    writable: bool,
    execute_disable: bool,
}

impl Rights {
    fn all() -> Self {
        Self {
            user: true,
            writable: true,
            execute_disable: false,
        }
    }

    fn combine(&mut self, entry: u64) {
        self.user &= entry & US != 0;
        self.writable &= entry & RW != 0;
        self.execute_disable |= entry & XD != 0;
    }
}

/// Whether an access with the walk's combined rights is allowed (SDM 4.6.1).
fn allowed(cfg: &PagingConfig, rights: &Rights, access: Access) -> bool {
    let xd = cfg.nx_active() && rights.execute_disable;
    match (access.kind, access.user) {
        (AccessKind::Read, false) => !(cfg.smap && rights.user),
        (AccessKind::Write, false) => (!cfg.wp || rights.writable) && !(cfg.smap && rights.user),
        (AccessKind::Execute, false) => !(xd || cfg.smep && rights.user),
        (AccessKind::Read, true) => rights.user,
        (AccessKind::Write, true) => rights.user && rights.writable,
        (AccessKind::Execute, true) => rights.user && !xd,
    }
}

/// Walks the paging structures for `linear`. Reads entries through `mem` and writes
/// nothing: on success call [`set_accessed_dirty`] to make the access's A/D updates.
///
/// `pdptes` are the PAE PDPTE registers; `None` reads them from the PDPT at CR3 (and a
/// reserved bit in a present one then faults with RSVD). Ignored outside PAE paging.
///
/// Faults: the first not-present entry gives P = 0; the first present entry with a reserved
/// bit gives P = 1 | RSVD; otherwise the combined rights are checked (P = 1). Each also
/// carries W/R, U/S and I/D for the access, and the fault address is the linear address.
pub fn walk<M: PhysView + ?Sized>(
    mem: &M,
    cfg: &PagingConfig,
    pdptes: Option<&[u64; 4]>,
    linear: u64,
    access: Access,
) -> Result<Walk, M::Error> {
    let lin = cfg.effective_linear(linear);
    let mut w = Walk::new(lin);
    let access_bits = cfg.access_error_bits(access);
    let not_present = access_bits;
    let reserved = access_bits | PF_PRESENT | PF_RESERVED;
    let mut rights = Rights::all();

    let (frame, size, leaf) = match cfg.mode {
        PagingMode::Disabled => {
            w.result = Ok(Translation {
                phys: linear,
                frame: linear & !0xfff,
                size: PageSize::Size4K,
                user: true,
                writable: true,
                execute_disable: false,
                global: false,
                dirty: true,
            });
            return Ok(w);
        }
        PagingMode::Bits32 => {
            let pde_addr = (cfg.cr3 & 0xffff_f000) | ((lin >> 20) & 0xffc);
            let pde = u64::from(mem.read_u32(pde_addr)?);
            w.push(Level::Pd, pde_addr, pde, false);
            if pde & P == 0 {
                return Ok(w.fault(not_present));
            }
            rights.combine(pde);
            if pde & PS != 0 && cfg.pse {
                if pde & RSVD_4M != 0 {
                    return Ok(w.fault(reserved));
                }
                // PSE-36: bits 20:13 are physical-address bits 39:32.
                let frame = (pde & 0xffc0_0000) | ((pde >> 13) & 0xff) << 32;
                (frame, PageSize::Size4M, pde)
            } else {
                let pte_addr = (pde & 0xffff_f000) | ((lin >> 10) & 0xffc);
                let pte = u64::from(mem.read_u32(pte_addr)?);
                w.push(Level::Pt, pte_addr, pte, false);
                if pte & P == 0 {
                    return Ok(w.fault(not_present));
                }
                rights.combine(pte);
                (pte & 0xffff_f000, PageSize::Size4K, pte)
            }
        }
        PagingMode::Pae | PagingMode::FourLevel => {
            let four_level = cfg.mode == PagingMode::FourLevel;
            let high_reserved = if four_level {
                RSVD_HIGH_4LEVEL
            } else {
                RSVD_HIGH_PAE
            } | if cfg.nxe { 0 } else { XD };
            let mut table;
            let first;
            if four_level {
                table = cfg.cr3 & ADDR_4K;
                first = Level::Pml4;
            } else {
                let index = ((lin >> 30) & 3) as usize;
                let address = (cfg.cr3 & 0xffff_ffe0) + 8 * index as u64;
                let (pdpte, from_register) = match pdptes {
                    Some(regs) => (regs[index], true),
                    None => (mem.read_u64(address)?, false),
                };
                w.push(Level::Pdpt, address, pdpte, from_register);
                if pdpte & P == 0 {
                    return Ok(w.fault(not_present));
                }
                if pae_pdpte_reserved_bits(pdpte) != 0 {
                    return Ok(w.fault(reserved));
                }
                table = pdpte & ADDR_4K;
                first = Level::Pd;
            }
            let mut level = first;
            loop {
                let shift = match level {
                    Level::Pml4 => 39,
                    Level::Pdpt => 30,
                    Level::Pd => 21,
                    Level::Pt => 12,
                };
                let address = table | (((lin >> shift) & 0x1ff) << 3);
                let entry = mem.read_u64(address)?;
                w.push(level, address, entry, false);
                if entry & P == 0 {
                    return Ok(w.fault(not_present));
                }
                let large = entry & PS != 0;
                let level_reserved = match level {
                    Level::Pml4 => PS,
                    Level::Pdpt if large => RSVD_1G_LOW,
                    Level::Pd if large => RSVD_2M_LOW,
                    _ => 0,
                };
                if entry & (high_reserved | level_reserved) != 0 {
                    return Ok(w.fault(reserved));
                }
                rights.combine(entry);
                match level {
                    Level::Pml4 => level = Level::Pdpt,
                    Level::Pdpt if large => break (entry & ADDR_1G, PageSize::Size1G, entry),
                    Level::Pdpt => level = Level::Pd,
                    Level::Pd if large => break (entry & ADDR_2M, PageSize::Size2M, entry),
                    Level::Pd => level = Level::Pt,
                    Level::Pt => break (entry & ADDR_4K, PageSize::Size4K, entry),
                }
                table = entry & ADDR_4K;
            }
        }
    };

    if !allowed(cfg, &rights, access) {
        return Ok(w.fault(access_bits | PF_PRESENT));
    }
    w.result = Ok(Translation {
        phys: frame | (lin & (size.bytes() - 1)),
        frame,
        size,
        user: rights.user,
        writable: rights.writable,
        execute_disable: cfg.nx_active() && rights.execute_disable,
        global: cfg.pge && leaf & G != 0,
        dirty: leaf & D != 0,
    });
    Ok(w)
}

/// The accessed/dirty updates of one access: at most one per paging level.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdUpdates {
    updates: [(u64, u8); 5],
    len: usize,
}

impl AdUpdates {
    fn push(&mut self, address: u64, bits: u8) {
        if let Some(slot) = self.updates.get_mut(self.len) {
            *slot = (address, bits);
            self.len += 1;
        }
    }

    /// (guest-physical address of the entry's low byte, bits set there), in order.
    pub fn as_slice(&self) -> &[(u64, u8)] {
        &self.updates[..self.len]
    }
}

/// The accessed/dirty updates a successful access makes, in the order the processor makes
/// them: the accessed bit of every entry the walk used, top level first (PAE PDPTEs have
/// none), then the dirty bit of the leaf for a write (SDM 4.8). Bits already set are not
/// rewritten; a faulting walk sets nothing. The engine uses the addresses to notice the
/// MMU's own stores into translated code.
pub fn accessed_dirty_updates(walk: &Walk, kind: AccessKind) -> AdUpdates {
    let mut out = AdUpdates::default();
    if walk.result.is_err() {
        return out;
    }
    let entries = walk.entries();
    let Some((leaf, upper)) = entries.split_last() else {
        return out;
    };
    for e in upper {
        if !e.from_register && e.value & A == 0 {
            out.push(e.address, A as u8);
        }
    }
    let mut bits = 0u64;
    if leaf.value & A == 0 {
        bits |= A;
    }
    if kind == AccessKind::Write && leaf.value & D == 0 {
        bits |= D;
    }
    if bits != 0 {
        out.push(leaf.address, bits as u8);
    }
    out
}

/// Makes the accessed/dirty updates of a successful access ([`accessed_dirty_updates`]) and
/// returns them, so the caller can report the stores.
pub fn set_accessed_dirty<M: PhysView + ?Sized>(
    mem: &M,
    walk: &Walk,
    kind: AccessKind,
) -> Result<AdUpdates, M::Error> {
    let updates = accessed_dirty_updates(walk, kind);
    for &(address, bits) in updates.as_slice() {
        mem.set_bits_u8(address, bits)?;
    }
    Ok(updates)
}
