//! Linux's x86 boot protocol, 64-bit entry (Documentation/arch/x86/boot.rst): a bzImage's
//! protected-mode kernel at its preferred address, the zero page (`struct boot_params`)
//! with the setup header copied in, an e820 memory map from deja's layout, the command line
//! and an initrd at the top of low RAM; the CPU in long mode with the first 4 GiB identity
//! mapped, `__BOOT_CS` = 0x10 and `__BOOT_DS` = 0x18 flat, interrupts off, RSI at the zero
//! page, RIP at the kernel's 64-bit entry (load address + 0x200).

use super::boot::{self, CODE64, DATA32, Reserved};
use super::multiboot::{MMAP_RAM, memory_map};
use super::{Image, LoadError, ensure_ram, write, zero};
use crate::cpu::{CpuState, Segment, gpr, seg};
use crate::devices::acpi::ACPI_REGION_START;
use crate::machine::Machine;

/// Where the setup header starts in a bzImage and in the zero page.
pub const SETUP_HEADER: usize = 0x1f1;
/// The zero page (`struct boot_params`, 4 KiB).
pub const ZERO_PAGE_ADDR: u64 = 0x1_0000;
/// The kernel command line (up to the header's `cmdline_size` plus its NUL).
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Room for the command line.
pub const CMDLINE_MAX: u64 = 0x1_0000;
/// Oldest boot protocol with the 64-bit entry, `xloadflags` and `init_size` (2.12).
pub const MIN_PROTOCOL: u16 = 0x020c;
/// `xloadflags` bit: the kernel has the 64-bit entry at load address + 0x200.
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// `loadflags` bit: the protected-mode kernel is loaded high (at 1 MiB or above).
pub const LOADED_HIGH: u8 = 1 << 0;
/// `type_of_loader`: a boot loader without an assigned ID.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;
/// Most e820 entries the zero page holds.
pub const E820_MAX: usize = 128;

/// The Linux GDT: null, null, `__BOOT_CS` (64-bit code), `__BOOT_DS` (flat data).
const GDT_LINUX: [u64; 4] = [0, 0, CODE64, DATA32];
const BOOT_CS: u16 = 0x10;
const BOOT_DS: u16 = 0x18;

// Offsets in the zero page (`struct boot_params`).
const BP_ACPI_RSDP_ADDR: usize = 0x070;
const BP_EXT_RAMDISK_IMAGE: usize = 0x0c0;
const BP_EXT_RAMDISK_SIZE: usize = 0x0c4;
const BP_EXT_CMD_LINE_PTR: usize = 0x0c8;
const BP_E820_ENTRIES: usize = 0x1e8;
const BP_E820_TABLE: usize = 0x2d0;
// Offsets of setup header fields (in the file and in the zero page alike).
const HDR_SETUP_SECTS: usize = 0x1f1;
const HDR_BOOT_FLAG: usize = 0x1fe;
const HDR_JUMP_END: usize = 0x201;
const HDR_MAGIC: usize = 0x202;
const HDR_VERSION: usize = 0x206;
const HDR_TYPE_OF_LOADER: usize = 0x210;
const HDR_LOADFLAGS: usize = 0x211;
const HDR_RAMDISK_IMAGE: usize = 0x218;
const HDR_RAMDISK_SIZE: usize = 0x21c;
const HDR_CMD_LINE_PTR: usize = 0x228;
const HDR_INITRD_ADDR_MAX: usize = 0x22c;
const HDR_KERNEL_ALIGNMENT: usize = 0x230;
const HDR_RELOCATABLE: usize = 0x234;
const HDR_XLOADFLAGS: usize = 0x236;
const HDR_CMDLINE_SIZE: usize = 0x238;
const HDR_PAYLOAD_OFFSET: usize = 0x248;
const HDR_PAYLOAD_LENGTH: usize = 0x24c;
const HDR_PREF_ADDRESS: usize = 0x258;
const HDR_INIT_SIZE: usize = 0x260;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

/// What the setup header of a bzImage says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetupHeader {
    /// Boot protocol version (0x020f is 2.15).
    pub version: u16,
    /// Offset of the protected-mode kernel in the file.
    pub kernel_offset: usize,
    /// Where the kernel prefers to be loaded.
    pub pref_address: u64,
    /// Its alignment when relocated.
    pub kernel_alignment: u64,
    /// Whether it may be loaded elsewhere than `pref_address`.
    pub relocatable: bool,
    /// Bytes from the load address the kernel needs while it decompresses and runs.
    pub init_size: u64,
    /// Highest address the initrd may end at.
    pub initrd_addr_max: u64,
    /// Longest command line, without its NUL.
    pub cmdline_size: u64,
    /// Where the setup header ends in the file (its length is in the header).
    pub header_end: usize,
    /// Where the compressed vmlinux starts, from `kernel_offset` (see [`super::payload`]).
    pub payload_offset: u32,
    /// Its length.
    pub payload_length: u32,
}

/// Whether `bytes` look like a bzImage (boot flag and "HdrS"): then a loader that does
/// not speak the boot protocol must not take it for something else.
pub fn is_bzimage(bytes: &[u8]) -> bool {
    bytes.len() > HDR_MAGIC + 4
        && u16_at(bytes, HDR_BOOT_FLAG) == 0xaa55
        && &bytes[HDR_MAGIC..HDR_MAGIC + 4] == b"HdrS"
}

/// Parses and checks the setup header of bzImage `name`.
pub fn parse_header(name: &str, bytes: &[u8]) -> Result<SetupHeader, LoadError> {
    let bad = |problem: String| LoadError::BzImage {
        name: name.to_string(),
        problem,
    };
    if !is_bzimage(bytes) || bytes.len() < HDR_INIT_SIZE + 4 {
        return Err(bad(
            "no boot-protocol setup header (boot flag 0xaa55 at 0x1fe and \"HdrS\" at 0x202)"
                .into(),
        ));
    }
    let version = u16_at(bytes, HDR_VERSION);
    if version < MIN_PROTOCOL {
        return Err(bad(format!(
            "boot protocol {}.{:02} is older than 2.12, the first with the 64-bit entry",
            version >> 8,
            version & 0xff
        )));
    }
    let xloadflags = u16_at(bytes, HDR_XLOADFLAGS);
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(bad(format!(
            "xloadflags {xloadflags:#x} lack XLF_KERNEL_64: the kernel has no 64-bit entry \
             (a 32-bit kernel)"
        )));
    }
    if bytes[HDR_LOADFLAGS] & LOADED_HIGH == 0 {
        return Err(bad(
            "loadflags lack LOADED_HIGH (a zImage, not a bzImage)".into()
        ));
    }
    let setup_sects = match bytes[HDR_SETUP_SECTS] {
        0 => 4,
        n => usize::from(n),
    };
    let kernel_offset = (setup_sects + 1) * 512;
    if kernel_offset >= bytes.len() {
        return Err(bad(format!(
            "setup_sects {setup_sects} puts the kernel at {kernel_offset:#x}, past the end of \
             the {}-byte file",
            bytes.len()
        )));
    }
    let header_end = HDR_JUMP_END + 1 + usize::from(bytes[HDR_JUMP_END]);
    if header_end > kernel_offset || header_end < HDR_INIT_SIZE + 4 {
        return Err(bad(format!(
            "the setup header's length byte at 0x201 puts its end at {header_end:#x}"
        )));
    }
    let kernel_alignment = u64::from(u32_at(bytes, HDR_KERNEL_ALIGNMENT));
    if !kernel_alignment.is_power_of_two() {
        return Err(bad(format!(
            "kernel_alignment {kernel_alignment:#x} is not a power of two"
        )));
    }
    Ok(SetupHeader {
        version,
        kernel_offset,
        pref_address: u64_at(bytes, HDR_PREF_ADDRESS),
        kernel_alignment,
        relocatable: bytes[HDR_RELOCATABLE] != 0,
        init_size: u64::from(u32_at(bytes, HDR_INIT_SIZE)),
        initrd_addr_max: u64::from(u32_at(bytes, HDR_INITRD_ADDR_MAX)),
        cmdline_size: u64::from(u32_at(bytes, HDR_CMDLINE_SIZE)),
        header_end,
        payload_offset: u32_at(bytes, HDR_PAYLOAD_OFFSET),
        payload_length: u32_at(bytes, HDR_PAYLOAD_LENGTH),
    })
}

/// Loads bzImage `image` with `initrd` (if any) and the machine's command line; returns
/// the 64-bit entry state.
pub(crate) fn load(
    machine: &mut Machine,
    image: &Image,
    initrd: Option<&Image>,
) -> Result<CpuState, LoadError> {
    let name = &image.name;
    let h = parse_header(name, &image.bytes)?;
    let kernel = &image.bytes[h.kernel_offset..];
    // The kernel needs init_size bytes from its load address (it decompresses in place).
    let need = h.init_size.max(kernel.len() as u64);
    let layout = &machine.layout;
    let fits = |at: u64| ensure_ram(layout, String::new, at, at.saturating_add(need)).is_ok();
    let load_addr = if fits(h.pref_address) {
        h.pref_address
    } else if h.relocatable && fits(0x10_0000u64.next_multiple_of(h.kernel_alignment)) {
        0x10_0000u64.next_multiple_of(h.kernel_alignment)
    } else {
        ensure_ram(
            layout,
            || format!("kernel {name} (init_size {:#x})", h.init_size),
            h.pref_address,
            h.pref_address.saturating_add(need),
        )?;
        h.pref_address
    };
    let kernel_range = (load_addr, load_addr + need);
    let reserved = [
        boot::GDT_RESERVED,
        boot::PAGE_TABLES_RESERVED,
        Reserved {
            what: "the zero page",
            start: ZERO_PAGE_ADDR,
            end: ZERO_PAGE_ADDR + 0x1000,
        },
        Reserved {
            what: "the command line",
            start: CMDLINE_ADDR,
            end: CMDLINE_ADDR + CMDLINE_MAX,
        },
    ];
    boot::check_overlap(
        &format!("kernel {name}"),
        kernel_range.0,
        kernel_range.1,
        &reserved,
        "Linux boot protocol",
    )?;

    let cmdline = machine.config.cmdline.as_bytes();
    if let Some(offset) = cmdline.iter().position(|&b| b == 0) {
        return Err(LoadError::CmdlineNul { offset });
    }
    if cmdline.len() as u64 > h.cmdline_size.min(CMDLINE_MAX - 1) {
        return Err(LoadError::BzImage {
            name: name.clone(),
            problem: format!(
                "the command line is {} bytes; this kernel takes at most {}",
                cmdline.len(),
                h.cmdline_size
            ),
        });
    }

    // The initrd at the top of RAM below 4 GiB and below initrd_addr_max, page aligned.
    let initrd_at = match initrd {
        None => None,
        Some(rd) => {
            let len = rd.bytes.len() as u64;
            let top = layout
                .ranges
                .iter()
                .filter(|r| r.start < boot::IDENTITY_MAP_SIZE)
                .map(|r| r.end().min(h.initrd_addr_max.saturating_add(1)))
                .max()
                .unwrap_or(0);
            let at = top.saturating_sub(len) & !0xfff;
            let overlaps_kernel = at < kernel_range.1 && kernel_range.0 < at + len;
            if len == 0 || at < kernel_range.1 || overlaps_kernel {
                return Err(LoadError::NotInRam {
                    what: format!("initrd {} ({len:#x} bytes)", rd.name),
                    start: at,
                    end: at + len,
                    ram: super::describe_ram(layout),
                    hint: format!(
                        "it must fit between the kernel's end at {:#x} and {top:#x}; give the \
                         guest more memory (--mem)",
                        kernel_range.1
                    ),
                });
            }
            ensure_ram(layout, || format!("initrd {}", rd.name), at, at + len)?;
            Some((at, len))
        }
    };

    // The zero page: the setup header as the file has it, then what the loader fills in.
    let mut zp = vec![0u8; 0x1000];
    zp[SETUP_HEADER..h.header_end].copy_from_slice(&image.bytes[SETUP_HEADER..h.header_end]);
    zp[HDR_TYPE_OF_LOADER] = LOADER_TYPE_UNDEFINED;
    zp[HDR_CMD_LINE_PTR..][..4].copy_from_slice(&(CMDLINE_ADDR as u32).to_le_bytes());
    zp[BP_EXT_CMD_LINE_PTR..][..4].copy_from_slice(&((CMDLINE_ADDR >> 32) as u32).to_le_bytes());
    if let Some((at, len)) = initrd_at {
        zp[HDR_RAMDISK_IMAGE..][..4].copy_from_slice(&(at as u32).to_le_bytes());
        zp[HDR_RAMDISK_SIZE..][..4].copy_from_slice(&(len as u32).to_le_bytes());
        zp[BP_EXT_RAMDISK_IMAGE..][..4].copy_from_slice(&((at >> 32) as u32).to_le_bytes());
        zp[BP_EXT_RAMDISK_SIZE..][..4].copy_from_slice(&((len >> 32) as u32).to_le_bytes());
    }
    // The RSDP deja's ACPI tables start with (protocol 2.14+; older kernels scan for it).
    zp[BP_ACPI_RSDP_ADDR..][..8].copy_from_slice(&ACPI_REGION_START.to_le_bytes());
    let map = memory_map(layout);
    if map.len() > E820_MAX {
        return Err(LoadError::BzImage {
            name: name.clone(),
            problem: format!(
                "the memory map has {} entries; the zero page holds {E820_MAX}",
                map.len()
            ),
        });
    }
    zp[BP_E820_ENTRIES] = map.len() as u8;
    for (i, e) in map.iter().enumerate() {
        let at = BP_E820_TABLE + i * 20;
        let kind = if e.kind == MMAP_RAM {
            E820_RAM
        } else {
            E820_RESERVED
        };
        zp[at..][..8].copy_from_slice(&e.base.to_le_bytes());
        zp[at + 8..][..8].copy_from_slice(&e.len.to_le_bytes());
        zp[at + 16..][..4].copy_from_slice(&kind.to_le_bytes());
    }

    let mut line = cmdline.to_vec();
    line.push(0);
    write(machine, ZERO_PAGE_ADDR, &zp)?;
    write(machine, CMDLINE_ADDR, &line)?;
    // The part of init_size past the file is the kernel's own (bss, decompression room):
    // zero it, so a reboot into the same image starts as the first boot did.
    write(machine, load_addr, kernel)?;
    zero(
        machine,
        load_addr + kernel.len() as u64,
        need - kernel.len() as u64,
    )?;
    if let (Some((at, _)), Some(rd)) = (initrd_at, initrd) {
        write(machine, at, &rd.bytes)?;
    }
    let gdtr = boot::write_gdt(machine, &GDT_LINUX)?;
    let cr3 = boot::write_identity_page_tables(machine)?;
    let stack = boot::pick_stack(&machine.layout, name, &[kernel_range], &reserved)?;
    let mut s = boot::long_state(load_addr + 0x200, gdtr, cr3, stack);
    for (i, sg) in s.seg.iter_mut().enumerate() {
        *sg = if i == seg::CS {
            Segment::flat(BOOT_CS, true, true)
        } else {
            Segment::flat(BOOT_DS, false, false)
        };
    }
    s.gpr[gpr::RSI] = ZERO_PAGE_ADDR;
    Ok(s)
}
