//! PVH boot (Xen's `docs/misc/pvh.pandoc`, the entry Linux has under `CONFIG_PVH`, as
//! QEMU's and Firecracker's `-kernel vmlinux` use it): an uncompressed ELF64 kernel's
//! PT_LOAD segments at their physical addresses, entered at the 32-bit address of its
//! `XEN_ELFNOTE_PHYS32_ENTRY` note in protected mode with paging off, flat segments, TR a
//! 32-bit TSS of limit 0x67, interrupts off and EBX at an `hvm_start_info` (version 1) that
//! gives the command line, the initrd as the first module, the memory map (e820 types) and
//! the ACPI RSDP. A bzImage is booted the same way through the vmlinux in its payload
//! ([`super::payload`]): the decompressor, most of an early boot's instructions, never runs.
//!
//! Guest-physical layout besides the kernel: the GDT of [`super::boot`], the start info at
//! [`START_INFO_ADDR`] with the module list and memory map after it in the same page, the
//! command line at [`super::linux::CMDLINE_ADDR`], the initrd page-aligned at the top of
//! RAM below 4 GiB.

use super::boot::{self, Reserved};
use super::linux::{CMDLINE_ADDR, CMDLINE_MAX, E820_MAX, E820_RAM, E820_RESERVED, is_bzimage};
use super::multiboot::{MMAP_RAM, memory_map};
use super::{Image, LoadError, describe_ram, elf, ensure_ram, payload, write, zero};
use crate::cpu::{CpuState, gpr};
use crate::devices::acpi::ACPI_REGION_START;
use crate::machine::Machine;
use crate::memory::FOUR_GIB;
use std::borrow::Cow;

/// Owner of the notes that describe a kernel to a Xen-style loader.
pub const XEN_NOTE_OWNER: &[u8] = b"Xen";
/// The note type whose descriptor is the 32-bit physical PVH entry point.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// `hvm_start_info.magic`.
pub const START_INFO_MAGIC: u32 = 0x336e_c578;
/// The `hvm_start_info` version deja writes (1: with the memory map).
pub const START_INFO_VERSION: u32 = 1;
/// Size of `struct hvm_start_info` (version 1).
pub const START_INFO_SIZE: usize = 56;
/// Size of `struct hvm_modlist_entry`.
pub const MODLIST_ENTRY_SIZE: usize = 32;
/// Size of `struct hvm_memmap_table_entry`.
pub const MEMMAP_ENTRY_SIZE: usize = 24;
/// Where the start info is (EBX at entry): the page the boot protocol's zero page uses.
pub const START_INFO_ADDR: u64 = 0x1_0000;
/// The module list (one entry: the initrd), after the start info.
pub const MODLIST_ADDR: u64 = START_INFO_ADDR + 0x40;
/// The memory map, after the module list.
pub const MEMMAP_ADDR: u64 = MODLIST_ADDR + MODLIST_ENTRY_SIZE as u64;
/// The start-info page: start info, module list and memory map.
pub const START_INFO_RESERVED: Reserved = Reserved {
    what: "the PVH start info",
    start: START_INFO_ADDR,
    end: START_INFO_ADDR + 0x1000,
};
/// The command line.
const CMDLINE_RESERVED: Reserved = Reserved {
    what: "the command line",
    start: CMDLINE_ADDR,
    end: CMDLINE_ADDR + CMDLINE_MAX,
};

/// What the loader needs of a PVH kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PvhKernel {
    /// The physical entry point of the `XEN_ELFNOTE_PHYS32_ENTRY` note.
    pub entry: u32,
    /// The PT_LOAD segments, loaded at their physical addresses.
    pub segments: Vec<elf::Segment64>,
}

/// The PVH entry point of ELF64 `elf`, if it has a `XEN_ELFNOTE_PHYS32_ENTRY` note. The
/// descriptor is 4 or 8 bytes (Linux writes a pointer-sized one) and must name an address
/// below 4 GiB, where 32-bit code can run.
pub fn entry_note(name: &str, elf: &elf::Elf64<'_>) -> Result<Option<u32>, LoadError> {
    let Some(note) = elf
        .notes
        .iter()
        .find(|n| n.name == XEN_NOTE_OWNER && n.kind == XEN_ELFNOTE_PHYS32_ENTRY)
    else {
        return Ok(None);
    };
    let bad = |problem: String| LoadError::Pvh {
        name: name.to_string(),
        problem,
    };
    let value = match note.desc.len() {
        4 => u64::from(u32::from_le_bytes(note.desc.try_into().unwrap_or_default())),
        8 => u64::from_le_bytes(note.desc.try_into().unwrap_or_default()),
        n => {
            return Err(bad(format!(
                "the XEN_ELFNOTE_PHYS32_ENTRY note at file offset {:#x} has a {n}-byte \
                 descriptor; expected 4 or 8",
                note.at
            )));
        }
    };
    u32::try_from(value).map(Some).map_err(|_| {
        bad(format!(
            "the XEN_ELFNOTE_PHYS32_ENTRY note at file offset {:#x} gives entry {value:#x}, \
             beyond the 4 GiB a 32-bit entry can reach",
            note.at
        ))
    })
}

/// Parses ELF64 kernel `name` and finds its PVH entry; a kernel without one is refused
/// with what to do instead.
pub fn parse(name: &str, bytes: &[u8]) -> Result<PvhKernel, LoadError> {
    let elf = elf::parse_elf64(bytes).map_err(|source| LoadError::Elf {
        name: name.to_string(),
        source,
    })?;
    let entry = entry_note(name, &elf)?.ok_or_else(|| LoadError::Pvh {
        name: name.to_string(),
        problem: "no XEN_ELFNOTE_PHYS32_ENTRY note (type 18, owner \"Xen\"): the kernel has \
                  no PVH entry (Linux needs CONFIG_PVH=y); boot its bzImage with \
                  --kernel-entry boot-protocol"
            .into(),
    })?;
    Ok(PvhKernel {
        entry,
        segments: elf.segments,
    })
}

/// The vmlinux a PVH image boots: the image itself, or a bzImage's decompressed payload
/// (at most `max` bytes).
pub fn vmlinux<'a>(name: &str, bytes: &'a [u8], max: u64) -> Result<Cow<'a, [u8]>, LoadError> {
    if is_bzimage(bytes) {
        Ok(Cow::Owned(payload::vmlinux(name, bytes, max)?))
    } else {
        Ok(Cow::Borrowed(bytes))
    }
}

/// `struct hvm_start_info` (version 1), as the guest reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StartInfo {
    /// Number of entries in the module list.
    pub nr_modules: u32,
    /// Physical address of the module list.
    pub modlist_paddr: u64,
    /// Physical address of the NUL-terminated command line.
    pub cmdline_paddr: u64,
    /// Physical address of the ACPI RSDP.
    pub rsdp_paddr: u64,
    /// Physical address of the memory map.
    pub memmap_paddr: u64,
    /// Number of entries in the memory map.
    pub memmap_entries: u32,
}

impl StartInfo {
    /// The structure's bytes: magic, version, flags (0), then the fields at the offsets
    /// Xen's `public/arch-x86/hvm/start_info.h` gives them, the reserved word zero.
    pub fn to_bytes(&self) -> [u8; START_INFO_SIZE] {
        let mut b = [0u8; START_INFO_SIZE];
        b[0..4].copy_from_slice(&START_INFO_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&START_INFO_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.nr_modules.to_le_bytes());
        b[16..24].copy_from_slice(&self.modlist_paddr.to_le_bytes());
        b[24..32].copy_from_slice(&self.cmdline_paddr.to_le_bytes());
        b[32..40].copy_from_slice(&self.rsdp_paddr.to_le_bytes());
        b[40..48].copy_from_slice(&self.memmap_paddr.to_le_bytes());
        b[48..52].copy_from_slice(&self.memmap_entries.to_le_bytes());
        b
    }
}

/// One `struct hvm_modlist_entry`: a module at `paddr` of `size` bytes, no command line.
pub fn modlist_entry(paddr: u64, size: u64) -> [u8; MODLIST_ENTRY_SIZE] {
    let mut b = [0u8; MODLIST_ENTRY_SIZE];
    b[0..8].copy_from_slice(&paddr.to_le_bytes());
    b[8..16].copy_from_slice(&size.to_le_bytes());
    b
}

/// One `struct hvm_memmap_table_entry` (`kind` an e820 type: 1 RAM, 2 reserved).
pub fn memmap_entry(addr: u64, size: u64, kind: u32) -> [u8; MEMMAP_ENTRY_SIZE] {
    let mut b = [0u8; MEMMAP_ENTRY_SIZE];
    b[0..8].copy_from_slice(&addr.to_le_bytes());
    b[8..16].copy_from_slice(&size.to_le_bytes());
    b[16..20].copy_from_slice(&kind.to_le_bytes());
    b
}

/// Loads PVH kernel `image` (a vmlinux, or a bzImage through its payload) with `initrd`
/// (if any) and the machine's command line; returns the PVH entry state.
pub(crate) fn load(
    machine: &mut Machine,
    image: &Image,
    initrd: Option<&Image>,
) -> Result<CpuState, LoadError> {
    let name = &image.name;
    let layout = &machine.layout;
    let ram_top = layout.ranges.last().map_or(0, |r| r.end());
    let vmlinux = vmlinux(name, &image.bytes, ram_top)?;
    let kernel = parse(name, &vmlinux)?;
    let reserved = [boot::GDT_RESERVED, START_INFO_RESERVED, CMDLINE_RESERVED];
    let mut occupied = Vec::new();
    for s in &kernel.segments {
        let what = || {
            format!(
                "kernel {name} segment {} (p_paddr {:#x}, p_memsz {:#x})",
                s.index, s.paddr, s.memsz
            )
        };
        ensure_ram(layout, what, s.paddr, s.paddr_end())?;
        boot::check_overlap(&what(), s.paddr, s.paddr_end(), &reserved, "PVH")?;
        if let Some(&(a, b)) = occupied
            .iter()
            .find(|&&(a, b)| s.paddr < b && a < s.paddr_end())
        {
            return Err(LoadError::Pvh {
                name: name.clone(),
                problem: format!(
                    "segment {} at {:#x}..{:#x} overlaps another segment at {a:#x}..{b:#x}",
                    s.index,
                    s.paddr,
                    s.paddr_end()
                ),
            });
        }
        occupied.push((s.paddr, s.paddr_end()));
    }
    let entry = u64::from(kernel.entry);
    if !occupied.iter().any(|&(a, b)| a <= entry && entry < b) {
        return Err(LoadError::Pvh {
            name: name.clone(),
            problem: format!(
                "the PVH entry point {entry:#x} is in none of the loaded segments ({})",
                occupied
                    .iter()
                    .map(|(a, b)| format!("{a:#x}..{b:#x}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    let kernel_end = occupied.iter().map(|o| o.1).max().unwrap_or(0);

    let cmdline = machine.config.cmdline.as_bytes();
    if let Some(offset) = cmdline.iter().position(|&b| b == 0) {
        return Err(LoadError::CmdlineNul { offset });
    }
    if cmdline.len() as u64 > CMDLINE_MAX - 1 {
        return Err(LoadError::Pvh {
            name: name.clone(),
            problem: format!(
                "the command line is {} bytes; deja passes at most {}",
                cmdline.len(),
                CMDLINE_MAX - 1
            ),
        });
    }

    // The initrd at the top of RAM below 4 GiB, page aligned, above the kernel.
    let initrd_at = match initrd {
        None => None,
        Some(rd) => {
            let len = rd.bytes.len() as u64;
            let top = layout
                .ranges
                .iter()
                .filter(|r| r.start < FOUR_GIB)
                .map(|r| r.end().min(FOUR_GIB))
                .max()
                .unwrap_or(0);
            let at = top.saturating_sub(len) & !0xfff;
            if len == 0 || at < kernel_end.max(CMDLINE_RESERVED.end) {
                return Err(LoadError::NotInRam {
                    what: format!("initrd {} ({len:#x} bytes)", rd.name),
                    start: at,
                    end: at + len,
                    ram: describe_ram(layout),
                    hint: format!(
                        "it must fit between the kernel's end at {kernel_end:#x} and {top:#x}; \
                         give the guest more memory (--mem)"
                    ),
                });
            }
            ensure_ram(layout, || format!("initrd {}", rd.name), at, at + len)?;
            occupied.push((at, at + len));
            Some((at, len))
        }
    };

    let map = memory_map(layout);
    if map.len() > E820_MAX {
        return Err(LoadError::Pvh {
            name: name.clone(),
            problem: format!(
                "the memory map has {} entries; Linux takes at most {E820_MAX}",
                map.len()
            ),
        });
    }
    let info = StartInfo {
        nr_modules: u32::from(initrd_at.is_some()),
        modlist_paddr: if initrd_at.is_some() { MODLIST_ADDR } else { 0 },
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: ACPI_REGION_START,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
    };
    let mut page = vec![0u8; 0x1000];
    page[..START_INFO_SIZE].copy_from_slice(&info.to_bytes());
    if let Some((at, len)) = initrd_at {
        let off = (MODLIST_ADDR - START_INFO_ADDR) as usize;
        page[off..off + MODLIST_ENTRY_SIZE].copy_from_slice(&modlist_entry(at, len));
    }
    for (i, e) in map.iter().enumerate() {
        let kind = if e.kind == MMAP_RAM {
            E820_RAM
        } else {
            E820_RESERVED
        };
        let off = (MEMMAP_ADDR - START_INFO_ADDR) as usize + i * MEMMAP_ENTRY_SIZE;
        page[off..off + MEMMAP_ENTRY_SIZE].copy_from_slice(&memmap_entry(e.base, e.len, kind));
    }
    let stack = boot::pick_stack(layout, name, &occupied, &reserved)?;

    let mut line = cmdline.to_vec();
    line.push(0);
    write(machine, START_INFO_ADDR, &page)?;
    write(machine, CMDLINE_ADDR, &line)?;
    // Every segment's bss is zeroed, so a reboot into the same image starts as the first
    // boot did.
    for s in &kernel.segments {
        write(machine, s.paddr, s.file_bytes(&vmlinux))?;
        zero(machine, s.paddr + s.filesz, s.memsz - s.filesz)?;
    }
    if let (Some((at, _)), Some(rd)) = (initrd_at, initrd) {
        write(machine, at, &rd.bytes)?;
    }
    let gdtr = boot::write_gdt(machine, &boot::GDT_PROTECTED)?;
    let mut s = boot::protected_state(entry, gdtr, stack);
    s.tr.limit = 0x67;
    s.gpr[gpr::RBX] = START_INFO_ADDR;
    Ok(s)
}
