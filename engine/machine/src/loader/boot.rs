//! The fixed low-memory structures deja builds for images it enters in protected or long
//! mode (raw and multiboot), and the CPU states that go with them.
//!
//! Guest-physical layout (all below the boot-sector address 0x7c00, above the real-mode
//! IVT and BIOS data area `0..0x500`, which deja leaves alone):
//!
//! | range             | what                                                      |
//! |-------------------|-----------------------------------------------------------|
//! | `0x0500..0x0528`  | GDT (protected: 5 entries; long: 4 entries)               |
//! | `0x1000..0x2000`  | long mode: PML4 (entry 0 → PDPT)                          |
//! | `0x2000..0x3000`  | long mode: PDPT (entries 0..3 → the four PDs)             |
//! | `0x3000..0x7000`  | long mode: four PDs, 2 MiB pages identity-mapping 0..4 GiB |
//! | `0x7000..0x7c00`  | initial stack, ESP/RSP = `0x7c00`                           |
//!
//! The stack is the only structure an image may overlap: then the stack moves just below
//! the image, or else just above it (see [`pick_stack`]).
//!
//! GDT selectors: `0x08` is the code segment of the entry mode (32-bit in protected mode,
//! 64-bit in long mode), `0x10` flat read/write data. Protected mode adds `0x18` (16-bit
//! code, base 0, limit 0xffff) and `0x20` (16-bit data) so a guest can drop back to real
//! mode; long mode adds `0x18`, a flat 32-bit code segment for compatibility mode. Every
//! descriptor has its accessed bit set, so the hidden descriptor caches in [`CpuState`]
//! equal what reloading the selectors would give.

use super::{LoadError, ensure_ram, write};
use crate::cpu::{CpuState, DescriptorTable, Segment, gpr, seg};
use crate::machine::Machine;
use crate::memory::{FOUR_GIB, MemoryLayout};

/// Guest-physical address of the GDT deja writes.
pub const GDT_ADDR: u64 = 0x500;
/// Bytes reserved for the GDT (room for 8 descriptors).
pub const GDT_AREA_SIZE: u64 = 0x40;
/// Code selector at entry (32-bit in protected mode, 64-bit in long mode).
pub const CODE_SELECTOR: u16 = 0x08;
/// Flat data selector loaded into DS, ES, SS, FS and GS.
pub const DATA_SELECTOR: u16 = 0x10;
/// Protected mode: 16-bit code (base 0, limit 0xffff). Long mode: flat 32-bit code.
pub const AUX_CODE_SELECTOR: u16 = 0x18;
/// Protected mode only: 16-bit data (base 0, limit 0xffff).
pub const DATA16_SELECTOR: u16 = 0x20;

/// Long mode: the PML4 (CR3).
pub const PML4_ADDR: u64 = 0x1000;
/// Long mode: the one PDPT.
pub const PDPT_ADDR: u64 = 0x2000;
/// Long mode: the first of [`PD_COUNT`] consecutive page directories.
pub const PD_ADDR: u64 = 0x3000;
/// Number of page directories: each maps 1 GiB with 2 MiB pages.
pub const PD_COUNT: u64 = 4;
/// One past the last page-table byte.
pub const PAGE_TABLES_END: u64 = PD_ADDR + PD_COUNT * 0x1000;
/// How much the long-mode tables identity-map, from address 0.
pub const IDENTITY_MAP_SIZE: u64 = FOUR_GIB;
/// Flags of every page-table entry: present, writable, user (the guest may run ring-3
/// code on the identity map without building its own tables; SMEP/SMAP are off).
pub const PTE_FLAGS: u64 = 0x7;
/// The page-size bit of a PD entry (a 2 MiB page).
pub const PTE_PS: u64 = 1 << 7;

/// The preferred initial stack pointer (ESP/RSP) in protected and long mode.
pub const STACK_TOP: u64 = 0x7c00;
/// Size of the stack area the loader keeps free below the stack pointer.
pub const STACK_SIZE: u64 = 0xc00;

/// CR0 bits.
pub const CR0_PE: u64 = 1 << 0;
/// CR0.ET (always 1 on modern CPUs).
pub const CR0_ET: u64 = 1 << 4;
/// CR0.PG.
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PAE.
pub const CR4_PAE: u64 = 1 << 5;
/// EFER.LME.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA.
pub const EFER_LMA: u64 = 1 << 10;

/// Encodes a segment descriptor: `limit` is the raw 20-bit field, `access` the access byte
/// (P, DPL, S, type), `flags` the high nibble (G, D/B, L, AVL).
pub const fn descriptor(base: u32, limit: u32, access: u8, flags: u8) -> u64 {
    (limit as u64 & 0xffff)
        | (base as u64 & 0xff_ffff) << 16
        | (access as u64) << 40
        | ((limit as u64 >> 16) & 0xf) << 48
        | ((flags as u64) & 0xf) << 52
        | ((base as u64 >> 24) & 0xff) << 56
}

/// Flat 32-bit code: present, ring 0, execute/read, accessed; G=1, D=1.
pub const CODE32: u64 = descriptor(0, 0xfffff, 0x9b, 0xc);
/// Flat data: present, ring 0, read/write, accessed; G=1, B=1.
pub const DATA32: u64 = descriptor(0, 0xfffff, 0x93, 0xc);
/// 64-bit code: present, ring 0, execute/read, accessed; G=1, L=1, D=0.
pub const CODE64: u64 = descriptor(0, 0xfffff, 0x9b, 0xa);
/// 16-bit code, base 0, limit 0xffff.
pub const CODE16: u64 = descriptor(0, 0xffff, 0x9b, 0);
/// 16-bit data, base 0, limit 0xffff.
pub const DATA16: u64 = descriptor(0, 0xffff, 0x93, 0);

/// The GDT deja writes for protected-mode entry (raw protected and multiboot).
pub const GDT_PROTECTED: [u64; 5] = [0, CODE32, DATA32, CODE16, DATA16];
/// The GDT deja writes for long-mode entry.
pub const GDT_LONG: [u64; 4] = [0, CODE64, DATA32, CODE32];

/// A guest range the loader writes, for overlap checks and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserved {
    /// What it is, for messages ("the GDT").
    pub what: &'static str,
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
}

/// The GDT area.
pub const GDT_RESERVED: Reserved = Reserved {
    what: "the GDT",
    start: GDT_ADDR,
    end: GDT_ADDR + GDT_AREA_SIZE,
};
/// The long-mode page tables.
pub const PAGE_TABLES_RESERVED: Reserved = Reserved {
    what: "the long-mode page tables",
    start: PML4_ADDR,
    end: PAGE_TABLES_END,
};

/// Fails if `[start, end)` overlaps any of `reserved`.
pub(crate) fn check_overlap(
    what: &str,
    start: u64,
    end: u64,
    reserved: &[Reserved],
    format: &'static str,
) -> Result<(), LoadError> {
    for r in reserved {
        if start < r.end && r.start < end {
            return Err(LoadError::Overlap {
                what: what.to_string(),
                start,
                end,
                other: r.what,
                other_start: r.start,
                other_end: r.end,
                format,
            });
        }
    }
    Ok(())
}

/// Chooses the initial 32/64-bit stack pointer: [`STACK_TOP`] when `[STACK_TOP -
/// STACK_SIZE, STACK_TOP)` is RAM and free; else right below the lowest occupied range;
/// else right above the highest. "Free" means outside `occupied` (the image) and
/// `reserved` (the loader's structures).
pub(crate) fn pick_stack(
    layout: &MemoryLayout,
    name: &str,
    occupied: &[(u64, u64)],
    reserved: &[Reserved],
) -> Result<u64, LoadError> {
    let low = occupied.iter().map(|o| o.0).min().unwrap_or(STACK_TOP);
    let high = occupied.iter().map(|o| o.1).max().unwrap_or(STACK_TOP);
    let candidates = [
        Some(STACK_TOP),
        Some(low & !0xf),
        high.checked_add(0xf + STACK_SIZE)
            .map(|t| t & !0xf)
            .filter(|&t| t <= FOUR_GIB),
    ];
    let mut tried = Vec::new();
    for top in candidates.into_iter().flatten() {
        let Some(bottom) = top.checked_sub(STACK_SIZE) else {
            continue;
        };
        tried.push(format!("{bottom:#x}..{top:#x}"));
        let free = ensure_ram(layout, String::new, bottom, top).is_ok()
            && occupied.iter().all(|&(s, e)| e <= bottom || top <= s)
            && reserved.iter().all(|r| r.end <= bottom || top <= r.start);
        if free {
            return Ok(top);
        }
    }
    Err(LoadError::NoRoomForStack {
        name: name.to_string(),
        tried: tried.join(", "),
    })
}

/// Writes `entries` at [`GDT_ADDR`] and returns the GDTR that describes them.
pub(crate) fn write_gdt(machine: &Machine, entries: &[u64]) -> Result<DescriptorTable, LoadError> {
    let bytes: Vec<u8> = entries.iter().flat_map(|d| d.to_le_bytes()).collect();
    write(machine, GDT_ADDR, &bytes)?;
    Ok(DescriptorTable {
        base: GDT_ADDR,
        limit: (bytes.len() - 1) as u16,
    })
}

/// Writes the identity-mapping PML4, PDPT and PDs (2 MiB pages over
/// [`IDENTITY_MAP_SIZE`]); returns CR3.
pub(crate) fn write_identity_page_tables(machine: &Machine) -> Result<u64, LoadError> {
    let mut pml4 = vec![0u8; 4096];
    pml4[..8].copy_from_slice(&(PDPT_ADDR | PTE_FLAGS).to_le_bytes());
    write(machine, PML4_ADDR, &pml4)?;
    let mut pdpt = vec![0u8; 4096];
    for i in 0..PD_COUNT {
        let e = (PD_ADDR + i * 0x1000) | PTE_FLAGS;
        pdpt[i as usize * 8..][..8].copy_from_slice(&e.to_le_bytes());
    }
    write(machine, PDPT_ADDR, &pdpt)?;
    for pd in 0..PD_COUNT {
        let mut table = vec![0u8; 4096];
        for i in 0..512u64 {
            let phys = (pd * 512 + i) << 21;
            let e = phys | PTE_FLAGS | PTE_PS;
            table[i as usize * 8..][..8].copy_from_slice(&e.to_le_bytes());
        }
        write(machine, PD_ADDR + pd * 0x1000, &table)?;
    }
    Ok(PML4_ADDR)
}

/// The state for 32-bit protected-mode entry at `entry` with the GDT [`GDT_PROTECTED`]:
/// CS = 0x08, data segments = 0x10, CR0 = PE|ET (caches enabled, paging off), interrupts
/// off, everything else as after RESET.
pub(crate) fn protected_state(entry: u64, gdtr: DescriptorTable, stack: u64) -> CpuState {
    let mut s = CpuState::reset();
    s.cr0 = CR0_PE | CR0_ET;
    s.gdtr = gdtr;
    for (i, sg) in s.seg.iter_mut().enumerate() {
        *sg = if i == seg::CS {
            Segment::flat(CODE_SELECTOR, true, false)
        } else {
            Segment::flat(DATA_SELECTOR, false, false)
        };
    }
    s.rip = entry;
    s.gpr[gpr::RSP] = stack;
    s
}

/// The state for 64-bit long-mode entry: as [`protected_state`] with CS 64-bit (L=1),
/// CR0.PG, CR4.PAE, EFER.LME|LMA and CR3 = the identity tables.
pub(crate) fn long_state(entry: u64, gdtr: DescriptorTable, cr3: u64, stack: u64) -> CpuState {
    let mut s = protected_state(entry, gdtr, stack);
    s.cr0 |= CR0_PG;
    s.cr3 = cr3;
    s.cr4 |= CR4_PAE;
    s.efer |= EFER_LME | EFER_LMA;
    s.seg[seg::CS] = Segment::flat(CODE_SELECTOR, true, true);
    s
}
