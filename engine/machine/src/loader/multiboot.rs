//! Multiboot v1 kernels, loaded as QEMU's `-kernel` loads them (hw/i386/multiboot.c plus
//! its option ROM), so that test kernels written for QEMU boot unmodified.
//!
//! - The header is the first 4-byte aligned `0x1badb002` in the first 8 KiB (QEMU stops
//!   searching 48 bytes before 8 KiB) whose magic + flags + checksum is 0 (mod 2^32).
//!   Flags are taken as QEMU takes them: no required bit is refused; a video-mode request
//!   (bit 2) is ignored (no video information is passed, MBI flag 11 stays clear).
//! - Flag bit 16 (the "a.out kludge") loads the file from `header_addr - load_addr` bytes
//!   before the header to `load_addr`, up to `load_end_addr` (or the end of the file),
//!   zero-fills up to `bss_end_addr`, and enters at `entry_addr`, with QEMU's consistency
//!   checks. Otherwise the file must be an ELF32 i386 executable: each PT_LOAD segment goes
//!   to its `p_paddr`, its bss is zero-filled, and the entry is `e_entry`, translated from
//!   virtual to physical as QEMU's ELF loader does for higher-half kernels (see
//!   `elf_entry`). A 64-bit ELF is refused with QEMU's message.
//! - The multiboot information (MBI) goes where QEMU puts it: the memory map at
//!   [`MMAP_ADDR`] (0x9000), the MBI at [`MBI_ADDR`] (0x9500), unless the kernel loads
//!   there (a kernel at 0x8000, say): then both follow the command line, past the kernel's
//!   end, where QEMU puts what it builds for the kernel, and EBX says where; the command line
//!   (`"IMAGE-NAME CMDLINE"`, as QEMU passes `"kernel-file cmdline"`) and the boot loader
//!   name `"deja"` in the page after the kernel's end. The memory map reports RAM as type
//!   1 and, like SeaBIOS's e820 under QEMU, the EBDA `0x9fc00..0xa0000`, the ACPI tables'
//!   area `0xe0000..0xf0000` and the BIOS area `0xf0000..0x100000` as reserved (type 2);
//!   ROMs are reserved too. `mem_lower` is 639
//!   KiB and `mem_upper` the KiB of RAM from 1 MiB up to the first hole.
//! - Entry: 32-bit protected mode with deja's flat GDT (see [`super::boot`]), EAX =
//!   0x2badb002, EBX = [`MBI_ADDR`], paging and interrupts off, ESP = the stack
//!   [`super::boot::pick_stack`] chooses (the specification leaves it undefined).

use super::boot::{self, GDT_RESERVED, Reserved};
use super::elf::{self, Elf32};
use super::{Image, LoadError, describe_ram, ensure_ram, write, zero};
use crate::cpu::{CpuState, gpr};
use crate::machine::Machine;
use crate::memory::{HIGH_MEMORY_START, MemoryLayout};

/// The header magic a multiboot kernel carries.
pub const HEADER_MAGIC: u32 = 0x1bad_b002;
/// What the loader leaves in EAX.
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// The header must lie in the file's first bytes (QEMU searches offsets below 8192 - 48).
pub const SEARCH_LIMIT: usize = 8192 - 48;
/// Header flag: the a.out kludge address fields are valid.
pub const FLAG_AOUT_KLUDGE: u32 = 1 << 16;
/// Header flag: the kernel asks for a video mode (ignored, as by QEMU).
pub const FLAG_VIDEO_MODE: u32 = 1 << 2;

/// Where the memory map goes (QEMU's `ADDR_E820_MAP`).
pub const MMAP_ADDR: u64 = 0x9000;
/// Where the multiboot information structure goes (QEMU's `ADDR_MBI`).
pub const MBI_ADDR: u64 = 0x9500;
/// Bytes of the MBI deja writes (the 0.6.96 structure, framebuffer fields included).
pub const MBI_SIZE: u64 = 116;
/// One past the MBI area the kernel must not overlap.
pub const MBI_AREA_END: u64 = 0x9600;
/// The memory-map and MBI area.
pub const MBI_RESERVED: Reserved = Reserved {
    what: "the multiboot memory map and information structure",
    start: MMAP_ADDR,
    end: MBI_AREA_END,
};
/// Size of one memory-map entry including its leading `size` field.
pub const MMAP_ENTRY_SIZE: u64 = 24;
/// The boot loader name passed in the MBI.
pub const BOOT_LOADER_NAME: &str = "deja";
/// `mem_lower` in KiB: conventional memory up to the EBDA.
pub const MEM_LOWER_KIB: u32 = 639;
/// Start of the EBDA that the memory map reports reserved (as SeaBIOS does under QEMU).
pub const EBDA_START: u64 = MEM_LOWER_KIB as u64 * 1024;

/// MBI flags deja sets: memory, boot device, command line, modules, memory map, boot
/// loader name (the set QEMU sets).
pub const MBI_FLAGS: u32 = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 9);
/// `boot_device`: no BIOS disk (as QEMU passes).
pub const BOOT_DEVICE: u32 = 0x8000_ffff;

/// Memory-map type of usable RAM.
pub const MMAP_RAM: u32 = 1;
/// Memory-map type of reserved memory.
pub const MMAP_RESERVED: u32 = 2;

/// A multiboot header found in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Its offset in the file.
    pub offset: usize,
    /// Its flags.
    pub flags: u32,
}

/// One memory-map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmapEntry {
    /// First address.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
    /// [`MMAP_RAM`] or [`MMAP_RESERVED`].
    pub kind: u32,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Finds the multiboot header as QEMU does: the first magic with a valid checksum. If
/// magics were found but none had a valid checksum, the error names the first.
pub fn find_header(name: &str, bytes: &[u8]) -> Result<Header, LoadError> {
    let mut first_bad = None;
    let mut offset = 0;
    while offset < SEARCH_LIMIT && offset + 12 <= bytes.len() {
        if u32_at(bytes, offset) == HEADER_MAGIC {
            let flags = u32_at(bytes, offset + 4);
            let checksum = u32_at(bytes, offset + 8);
            let sum = HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum);
            if sum == 0 {
                return Ok(Header { offset, flags });
            }
            first_bad.get_or_insert(LoadError::MultibootChecksum {
                name: name.to_string(),
                offset,
                flags,
                checksum,
                sum,
            });
        }
        offset += 4;
    }
    Err(first_bad.unwrap_or(LoadError::NotMultiboot {
        name: name.to_string(),
        searched: bytes.len().min(SEARCH_LIMIT),
        advice: "it was described as a multiboot kernel (by its sidecar or the command line)"
            .to_string(),
    }))
}

/// The memory map deja reports for `layout` (see the module documentation).
pub fn memory_map(layout: &MemoryLayout) -> Vec<MmapEntry> {
    // Parts of RAM that are not reported as RAM: (start, end, kind or None = omitted).
    use crate::devices::acpi::{ACPI_REGION_END, ACPI_REGION_START};
    const CARVED: [(u64, u64, Option<u32>); 4] = [
        (EBDA_START, 0xa_0000, Some(MMAP_RESERVED)),
        (0xc_0000, ACPI_REGION_START, None),
        // The ACPI tables: an OS must not hand them out as free memory.
        (ACPI_REGION_START, ACPI_REGION_END, Some(MMAP_RESERVED)),
        (ACPI_REGION_END, HIGH_MEMORY_START, Some(MMAP_RESERVED)),
    ];
    let mut out = Vec::new();
    for r in &layout.ranges {
        let mut points = vec![r.start, r.end()];
        for &(s, e, _) in &CARVED {
            points.extend([s, e].into_iter().filter(|&p| r.start < p && p < r.end()));
        }
        points.sort_unstable();
        points.dedup();
        for w in points.windows(2) {
            let kind = CARVED
                .iter()
                .find(|c| c.0 <= w[0] && w[1] <= c.1)
                .map_or(Some(MMAP_RAM), |c| c.2);
            if let Some(kind) = kind {
                out.push(MmapEntry {
                    base: w[0],
                    len: w[1] - w[0],
                    kind,
                });
            }
        }
    }
    out.extend(layout.rom.iter().map(|r| MmapEntry {
        base: r.start,
        len: r.len,
        kind: MMAP_RESERVED,
    }));
    out.sort_by_key(|e| e.base);
    out
}

/// A piece of the kernel: `src` copied to `addr`, then `zero_len` zero bytes.
struct Chunk<'a> {
    what: String,
    addr: u64,
    src: &'a [u8],
    zero_len: u64,
}

impl Chunk<'_> {
    fn end(&self) -> u64 {
        self.addr + self.src.len() as u64 + self.zero_len
    }
}

/// The kernel's pieces and entry point, from the a.out kludge fields.
fn aout_chunks<'a>(image: &'a Image, header: Header) -> Result<(Vec<Chunk<'a>>, u64), LoadError> {
    let bytes = &image.bytes;
    let i = header.offset;
    let bad = |problem: String| LoadError::MultibootHeader {
        name: image.name.clone(),
        offset: i,
        problem,
    };
    if i + 32 > bytes.len() {
        return Err(bad(format!(
            "the a.out kludge (flag bit 16) needs the address fields at offsets {:#x}..{:#x}, \
             but the file ends at {:#x}",
            i + 12,
            i + 32,
            bytes.len()
        )));
    }
    let header_addr = u32_at(bytes, i + 12);
    let load_addr = u32_at(bytes, i + 16);
    let load_end_addr = u32_at(bytes, i + 20);
    let bss_end_addr = u32_at(bytes, i + 24);
    let entry_addr = u32_at(bytes, i + 28);
    if header_addr < load_addr {
        return Err(bad(format!(
            "header_addr {header_addr:#x} is below load_addr {load_addr:#x}"
        )));
    }
    let header_offset_in_text = header_addr - load_addr;
    if header_offset_in_text as usize > i {
        return Err(bad(format!(
            "header_addr {header_addr:#x} - load_addr {load_addr:#x} = \
             {header_offset_in_text:#x} is more than the header's file offset {i:#x}"
        )));
    }
    let text_offset = i - header_offset_in_text as usize;
    let load_size = if load_end_addr != 0 {
        if load_end_addr < load_addr {
            return Err(bad(format!(
                "load_end_addr {load_end_addr:#x} is below load_addr {load_addr:#x}"
            )));
        }
        (load_end_addr - load_addr) as usize
    } else {
        bytes.len() - text_offset
    };
    if u64::from(load_addr) + load_size as u64 > u64::from(u32::MAX) {
        return Err(bad(format!(
            "load_addr {load_addr:#x} + {load_size:#x} bytes does not fit below 4 GiB"
        )));
    }
    if text_offset + load_size > bytes.len() {
        return Err(bad(format!(
            "load_end_addr {load_end_addr:#x} asks for {load_size:#x} bytes from file offset \
             {text_offset:#x}, but the file ends at {:#x}",
            bytes.len()
        )));
    }
    let load_end = u64::from(load_addr) + load_size as u64;
    let kernel_end = if bss_end_addr != 0 {
        if u64::from(bss_end_addr) < load_end {
            return Err(bad(format!(
                "bss_end_addr {bss_end_addr:#x} is below the end of the loaded text \
                 {load_end:#x}"
            )));
        }
        u64::from(bss_end_addr)
    } else {
        load_end
    };
    let chunk = Chunk {
        what: format!(
            "multiboot kernel {} (a.out kludge, load_addr {load_addr:#x})",
            image.name
        ),
        addr: u64::from(load_addr),
        src: &bytes[text_offset..text_offset + load_size],
        zero_len: kernel_end - load_end,
    };
    Ok((vec![chunk], u64::from(entry_addr)))
}

/// The physical entry point of an ELF kernel, as QEMU's ELF loader computes it: `e_entry`,
/// except that when it lies in the file-backed part of an executable segment whose
/// `p_vaddr` differs from its `p_paddr` (a higher-half kernel), it is translated to that
/// segment's physical address (the last such segment wins, as in QEMU's loop).
fn elf_entry(elf: &Elf32) -> u64 {
    let e = u64::from(elf.entry);
    let mut entry = e;
    for s in &elf.segments {
        let vaddr = u64::from(s.vaddr);
        if s.vaddr != s.paddr
            && s.flags & elf::PF_X != 0
            && (vaddr..vaddr + u64::from(s.filesz)).contains(&e)
        {
            entry = e - vaddr + u64::from(s.paddr);
        }
    }
    entry
}

/// The kernel's pieces and entry point, from the ELF program headers.
fn elf_chunks(image: &Image) -> Result<(Vec<Chunk<'_>>, u64), LoadError> {
    if elf::machine(&image.bytes) == Some(elf::EM_X86_64) {
        return Err(LoadError::X86_64Multiboot {
            name: image.name.clone(),
        });
    }
    let parsed = elf::parse_elf32(&image.bytes).map_err(|source| LoadError::Elf {
        name: image.name.clone(),
        source,
    })?;
    let chunks = parsed
        .segments
        .iter()
        .map(|s| Chunk {
            what: format!(
                "ELF program header {} of {} (p_paddr {:#x}, p_memsz {:#x})",
                s.index, image.name, s.paddr, s.memsz
            ),
            addr: u64::from(s.paddr),
            src: &image.bytes[s.offset as usize..][..s.filesz as usize],
            zero_len: u64::from(s.memsz - s.filesz),
        })
        .collect();
    Ok((chunks, elf_entry(&parsed)))
}

/// Loads a multiboot kernel and builds its MBI; see the module documentation.
pub(crate) fn load(machine: &mut Machine, image: &Image) -> Result<CpuState, LoadError> {
    let header = find_header(&image.name, &image.bytes)?;
    let (chunks, entry) = if header.flags & FLAG_AOUT_KLUDGE != 0 {
        aout_chunks(image, header)?
    } else {
        elf_chunks(image)?
    };
    let reserved = [GDT_RESERVED];
    for c in &chunks {
        ensure_ram(&machine.layout, || c.what.clone(), c.addr, c.end())?;
        boot::check_overlap(&c.what, c.addr, c.end(), &reserved, "multiboot")?;
    }
    if !machine.layout.is_ram(entry) {
        return Err(LoadError::EntryNotInRam {
            name: image.name.clone(),
            entry,
            ram: describe_ram(&machine.layout),
        });
    }
    let kernel_end = chunks.iter().map(Chunk::end).max().unwrap_or(0);

    // Command line and boot loader name, in the page after the kernel (as QEMU).
    let cmdline = format!("{} {}", image.name, machine.config.cmdline);
    if let Some(offset) = machine.config.cmdline.bytes().position(|b| b == 0) {
        return Err(LoadError::CmdlineNul { offset });
    }
    let info_addr = kernel_end.next_multiple_of(4096);
    let mut info = Vec::with_capacity(cmdline.len() + BOOT_LOADER_NAME.len() + 2);
    info.extend_from_slice(cmdline.as_bytes());
    info.push(0);
    info.extend_from_slice(BOOT_LOADER_NAME.as_bytes());
    info.push(0);
    let info_end = info_addr + info.len() as u64;
    let info_what = || format!("the multiboot command line of {}", image.name);
    ensure_ram(&machine.layout, info_what, info_addr, info_end)?;
    boot::check_overlap(&info_what(), info_addr, info_end, &reserved, "multiboot")?;

    let mut occupied: Vec<(u64, u64)> = chunks.iter().map(|c| (c.addr, c.end())).collect();
    occupied.push((info_addr, info_end));

    let map = memory_map(&machine.layout);
    let mut mmap = Vec::with_capacity(map.len() * MMAP_ENTRY_SIZE as usize);
    for e in &map {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&e.base.to_le_bytes());
        mmap.extend_from_slice(&e.len.to_le_bytes());
        mmap.extend_from_slice(&e.kind.to_le_bytes());
    }
    debug_assert!(MMAP_ADDR + mmap.len() as u64 <= MBI_ADDR);
    // QEMU's spot for the memory map and MBI, unless the kernel (or its command line) is
    // there: then both follow the command line, past the kernel, where QEMU puts what it
    // builds for a kernel.
    let (mmap_addr, mbi_addr) = if occupied
        .iter()
        .all(|&(start, end)| end <= MMAP_ADDR || MBI_AREA_END <= start)
    {
        (MMAP_ADDR, MBI_ADDR)
    } else {
        let mmap_addr = info_end.next_multiple_of(16);
        let mbi_addr = (mmap_addr + mmap.len() as u64).next_multiple_of(16);
        let what = || format!("the multiboot memory map and MBI of {}", image.name);
        ensure_ram(&machine.layout, what, mmap_addr, mbi_addr + MBI_SIZE)?;
        boot::check_overlap(
            &what(),
            mmap_addr,
            mbi_addr + MBI_SIZE,
            &reserved,
            "multiboot",
        )?;
        (mmap_addr, mbi_addr)
    };
    let mbi_area = Reserved {
        start: mmap_addr,
        end: (mbi_addr + MBI_SIZE).max(if mmap_addr == MMAP_ADDR {
            MBI_AREA_END
        } else {
            0
        }),
        ..MBI_RESERVED
    };
    let stack = boot::pick_stack(
        &machine.layout,
        &image.name,
        &occupied,
        &[GDT_RESERVED, mbi_area],
    )?;
    let mem_upper = machine
        .layout
        .ranges
        .iter()
        .find(|r| r.start <= HIGH_MEMORY_START && HIGH_MEMORY_START < r.end())
        .map_or(0, |r| {
            ((r.end() - HIGH_MEMORY_START) / 1024).min(u64::from(u32::MAX))
        });
    let mut mbi = [0u8; MBI_SIZE as usize];
    let mut put = |off: usize, v: u32| mbi[off..off + 4].copy_from_slice(&v.to_le_bytes());
    put(0, MBI_FLAGS);
    put(4, MEM_LOWER_KIB);
    put(8, mem_upper as u32);
    put(12, BOOT_DEVICE);
    put(16, info_addr as u32);
    put(20, 0); // mods_count
    put(24, info_addr as u32); // mods_addr: where QEMU's (empty) module list starts
    put(44, mmap.len() as u32);
    put(48, mmap_addr as u32);
    put(64, (info_addr + cmdline.len() as u64 + 1) as u32);

    let gdtr = boot::write_gdt(machine, &boot::GDT_PROTECTED)?;
    for c in &chunks {
        write(machine, c.addr, c.src)?;
        zero(machine, c.addr + c.src.len() as u64, c.zero_len)?;
    }
    write(machine, info_addr, &info)?;
    write(machine, mmap_addr, &mmap)?;
    write(machine, mbi_addr, &mbi)?;

    let mut state = boot::protected_state(entry, gdtr, stack);
    state.gpr[gpr::RAX] = u64::from(BOOTLOADER_MAGIC);
    state.gpr[gpr::RBX] = mbi_addr;
    Ok(state)
}
