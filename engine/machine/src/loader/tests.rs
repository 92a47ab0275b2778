//! Tests of every loader and entry mode: the CPU state, and the bytes each loader leaves in
//! guest memory (GDT, page tables, MBI, memory map, ROM), checked by independent decoders.

use super::boot::*;
use super::multiboot::{MBI_ADDR, MMAP_ADDR, MMAP_RAM, MMAP_RESERVED, MmapEntry};
use super::testutil::*;
use super::*;
use crate::cpu::{Segment, gpr, seg};

fn raw(bytes: Vec<u8>, load_addr: u64, entry: u64, mode: EntryMode) -> Image {
    Image::raw("test.bin", bytes, load_addr, entry, mode)
}

fn code(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 1) as u8).collect()
}

/// Checks that every segment cache equals what loading its selector from the GDT in guest
/// memory gives, and that the GDTR covers the selectors.
fn assert_segments_match_gdt(m: &Machine, s: &CpuState) {
    assert_eq!(s.gdtr.base, GDT_ADDR);
    for (i, sg) in s.seg.iter().enumerate() {
        let sel = u64::from(sg.selector);
        assert!(
            sel + 7 <= u64::from(s.gdtr.limit),
            "{} beyond GDTR",
            seg::NAMES[i]
        );
        let d = read_u64(m, GDT_ADDR + sel);
        assert_eq!(*sg, decode_descriptor(sg.selector, d), "{}", seg::NAMES[i]);
    }
}

#[test]
fn real_mode_boot_sector_gets_bios_like_state() {
    let mut m = machine();
    let img = raw(code(512), 0x7c00, 0x7c00, EntryMode::Real);
    let s = load(&mut m, &img).unwrap();
    assert_eq!(read(&m, 0x7c00, 512), img.bytes);
    assert_eq!(s.seg[seg::CS], Segment::real_mode(0, true));
    assert_eq!(s.rip, 0x7c00);
    for i in [seg::DS, seg::ES, seg::FS, seg::GS, seg::SS] {
        assert_eq!(s.seg[i], Segment::real_mode(0, false), "{}", seg::NAMES[i]);
    }
    assert_eq!(s.gpr[gpr::RSP], 0x7c00);
    assert_eq!(s.cr0, CR0_ET);
    assert_eq!(s.rflags, 2);
    assert_eq!(s.msrs, CpuState::reset().msrs);
    // Nothing but the image is written in real mode.
    assert_eq!(read(&m, GDT_ADDR, 64), vec![0; 64]);
}

#[test]
fn real_mode_cs_ip_and_stack_table() {
    // (load_addr, entry, cs, ip, ss, sp)
    let cases: [(u64, u64, u16, u64, u16, u64); 6] = [
        (0x1000, 0x1234, 0, 0x1234, 0, 0x1000),
        (0x10000, 0x10000, 0x1000, 0, 0, 0),
        (0x10000, 0x10105, 0x1010, 5, 0, 0),
        (0x20000, 0x20000, 0x2000, 0, 0x1000, 0),
        (0x500, 0x500, 0, 0x500, 0, 0),
        (0xf0000, 0x100010, 0xffff, 0x20, 0xe000, 0),
    ];
    for (load_addr, entry, cs, ip, ss, sp) in cases {
        let mut m = machine();
        let s = load(&mut m, &raw(code(0x200), load_addr, entry, EntryMode::Real)).unwrap();
        let what = format!("load {load_addr:#x} entry {entry:#x}");
        assert_eq!(s.seg[seg::CS].selector, cs, "{what}");
        assert_eq!(s.seg[seg::CS].base + s.rip, entry, "{what}");
        assert_eq!(s.rip, ip, "{what}");
        assert_eq!(s.seg[seg::DS], Segment::real_mode(cs, false), "{what}");
        assert_eq!(s.seg[seg::SS].selector, ss, "{what}");
        assert_eq!(s.gpr[gpr::RSP], sp, "{what}");
        // The stack's top is at or below the image.
        let top = s.seg[seg::SS].base + if sp == 0 { 0x10000 } else { sp };
        assert!(load_addr < 0x1000 || top <= load_addr, "{what}");
    }
}

#[test]
fn real_mode_entry_beyond_cs_ip_reach_is_refused() {
    let mut m = machine();
    let err = load(&mut m, &raw(code(16), 0x200000, 0x200000, EntryMode::Real)).unwrap_err();
    assert!(matches!(
        err,
        LoadError::RealModeEntryUnreachable { entry: 0x200000 }
    ));
    assert!(err.to_string().contains("--mode protected"));
}

#[test]
fn protected_mode_flat_gdt_and_state() {
    let mut m = machine();
    let img = raw(code(0x300), 0x100000, 0x100010, EntryMode::Protected);
    let s = load(&mut m, &img).unwrap();
    assert_eq!(read(&m, 0x100000, 0x300), img.bytes);
    assert_eq!(s.rip, 0x100010);
    assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE);
    assert_eq!(s.efer, 0);
    assert_eq!(s.seg[seg::CS].selector, 0x08);
    assert!(s.seg[seg::CS].db && !s.seg[seg::CS].l);
    for i in [seg::DS, seg::ES, seg::FS, seg::GS, seg::SS] {
        assert_eq!(s.seg[i].selector, 0x10);
        assert_eq!((s.seg[i].base, s.seg[i].limit), (0, 0xffff_ffff));
    }
    assert_segments_match_gdt(&m, &s);
    assert_eq!(s.gdtr.limit, 5 * 8 - 1);
    // The real-mode return segments at 0x18 and 0x20.
    assert_eq!(
        decode_descriptor(0x18, read_u64(&m, GDT_ADDR + 0x18)),
        Segment {
            selector: 0x18,
            ..Segment::real_mode(0, true)
        }
    );
    assert_eq!(
        decode_descriptor(0x20, read_u64(&m, GDT_ADDR + 0x20)),
        Segment {
            selector: 0x20,
            ..Segment::real_mode(0, false)
        }
    );
    assert_eq!(s.gpr[gpr::RSP], STACK_TOP);
    assert_eq!(s.rflags, 2);
}

#[test]
fn long_mode_identity_maps_4gib_and_enables_paging() {
    let mut m = machine();
    let img = raw(code(0x100), 0x200000, 0x200000, EntryMode::Long);
    let s = load(&mut m, &img).unwrap();
    assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
    assert_ne!(s.cr4 & CR4_PAE, 0);
    assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
    assert_eq!(s.cr3, PML4_ADDR);
    assert!(s.seg[seg::CS].l && !s.seg[seg::CS].db);
    assert_segments_match_gdt(&m, &s);
    assert_eq!(
        decode_descriptor(0x18, read_u64(&m, GDT_ADDR + 0x18)),
        Segment::flat(0x18, true, false)
    );
    for addr in [
        0u64,
        0x7c00,
        0x1f_ffff,
        0x20_0000,
        0x123_4567,
        0xbfff_fff8,
        0xfee0_0000,
        0xffff_fff0,
    ] {
        assert_eq!(walk(&m, s.cr3, addr), Some(addr), "{addr:#x}");
    }
    assert_eq!(walk(&m, s.cr3, 0x1_0000_0000), None);
    assert_eq!(walk(&m, s.cr3, 0xffff_8000_0000_0000), None);
    assert_eq!(s.gpr[gpr::RSP], STACK_TOP);
}

#[test]
fn loader_structures_are_not_overwritten_by_images() {
    // (mode, load_addr, structure named in the error)
    let cases = [
        (EntryMode::Protected, 0x500, "the GDT"),
        (EntryMode::Protected, 0x400, "the GDT"),
        (EntryMode::Long, 0x520, "the GDT"),
        (EntryMode::Long, 0x3000, "the long-mode page tables"),
        (EntryMode::Long, 0x6fff, "the long-mode page tables"),
    ];
    for (mode, addr, what) in cases {
        let mut m = machine();
        let err = load(&mut m, &raw(code(0x200), addr, addr, mode)).unwrap_err();
        match err {
            LoadError::Overlap { other, .. } => assert_eq!(other, what, "{mode:?} {addr:#x}"),
            e => panic!("{mode:?} {addr:#x}: {e}"),
        }
    }
    // Real mode writes no structures, and long mode fits right after the tables.
    let mut m = machine();
    load(&mut m, &raw(code(0x200), 0x500, 0x500, EntryMode::Real)).unwrap();
    load(&mut m, &raw(code(0x200), 0x7000, 0x7000, EntryMode::Long)).unwrap();
}

#[test]
fn stack_moves_out_of_the_image_s_way() {
    // (mode, load_addr, len, expected stack top)
    let cases = [
        (EntryMode::Protected, 0x7400, 0x100, 0x7400), // below the image
        (EntryMode::Protected, 0x2000, 0x6000, 0x2000), // below, above the GDT
        (EntryMode::Protected, 0x1000, 0x7000, 0x8c00), // below would hit the GDT
        (EntryMode::Long, 0x7000, 0x1000, 0x8c00),     // below would hit the page tables
        (EntryMode::Long, 0x8000, 0x100, STACK_TOP),
    ];
    for (mode, addr, len, top) in cases {
        let mut m = machine();
        let s = load(&mut m, &raw(code(len), addr, addr, mode)).unwrap();
        assert_eq!(s.gpr[gpr::RSP], top, "{mode:?} {addr:#x}");
    }
}

#[test]
fn raw_images_must_be_in_ram() {
    let cases: [(u64, usize, u64, &str); 5] = [
        (0x9f000, 0x2000, 0x9f000, "VGA"),
        (0xa0000, 0x10, 0xa0000, "VGA"),
        (0xff0000, 0x20000, 0xff0000, "RAM ends at 0x1000000"),
        (u64::MAX - 4, 0x10, 0x1000, "wraps"),
        (0x100000, 0x10, 0x2000000, "entry point 0x2000000"),
    ];
    for mode in [EntryMode::Real, EntryMode::Protected, EntryMode::Long] {
        for (addr, len, entry, needle) in cases {
            let mut m = machine();
            let err = load(&mut m, &raw(code(len), addr, entry, mode)).unwrap_err();
            assert!(
                err.to_string().contains(needle),
                "{mode:?} {addr:#x}: {err} lacks {needle:?}"
            );
        }
    }
    // An entry outside the image but in RAM is fine.
    let mut m = machine();
    let s = load(
        &mut m,
        &raw(code(16), 0x100000, 0x300000, EntryMode::Protected),
    )
    .unwrap();
    assert_eq!(s.rip, 0x300000);
    assert!(matches!(
        load(
            &mut m,
            &raw(Vec::new(), 0x100000, 0x100000, EntryMode::Long)
        ),
        Err(LoadError::Empty { .. })
    ));
}

fn rom(size: usize) -> Vec<u8> {
    let mut r: Vec<u8> = (0..size).map(|i| (i / 4096) as u8 ^ (i as u8)).collect();
    let n = r.len();
    r[n - 16..n - 11].copy_from_slice(&[0xea, 0x5b, 0xe0, 0x00, 0xf0]); // jmp f000:e05b
    r
}

#[test]
fn reload_after_a_reset_restores_what_load_wrote() {
    // Firmware: the ROM stays mapped; the writable low alias is written again.
    let mut m = machine();
    let image = Image::firmware("bios.bin", rom(64 << 10));
    load(&mut m, &image).unwrap();
    write(&m, 0xf_0000, &[0xcc; 16]).unwrap();
    assert_eq!(reload(&mut m, &image).unwrap(), CpuState::reset());
    assert_eq!(read(&m, 0xf_0000, 16), image.bytes[..16].to_vec());
    assert_eq!(m.layout.rom.len(), 1, "no second mapping");
    // A firmware image that was never mapped cannot restart.
    let mut fresh = machine();
    assert!(reload(&mut fresh, &image).is_err());
    // A raw image is written again, with the same entry state.
    let mut m = machine();
    let image = raw(vec![0x90; 64], 0x10_0000, 0x10_0000, EntryMode::Protected);
    let first = load(&mut m, &image).unwrap();
    write(&m, 0x10_0000, &[0xcc; 64]).unwrap();
    assert_eq!(reload(&mut m, &image).unwrap(), first);
    assert_eq!(read(&m, 0x10_0000, 64), vec![0x90; 64]);
}

#[test]
fn firmware_maps_rom_below_4g_and_aliases_below_1m() {
    for (size, alias) in [(64usize << 10, 64u64 << 10), (256 << 10, 128 << 10)] {
        let mut m = machine();
        let bytes = rom(size);
        let s = load(&mut m, &Image::firmware("bios.bin", bytes.clone())).unwrap();
        assert_eq!(s, CpuState::reset());
        let base = 0x1_0000_0000 - size as u64;
        assert_eq!(
            m.layout.rom,
            vec![crate::memory::RamRange {
                start: base,
                len: size as u64
            }]
        );
        assert!(m.layout.is_rom(0xffff_fff0) && !m.layout.is_rom(base - 1));
        assert_eq!(read(&m, base, size), bytes);
        // The reset vector: CS.base + IP.
        let reset = s.seg[seg::CS].base + s.rip;
        assert_eq!(read(&m, reset, 5), vec![0xea, 0x5b, 0xe0, 0x00, 0xf0]);
        assert_eq!(
            read(&m, 0x10_0000 - alias, alias as usize),
            bytes[size - alias as usize..]
        );
        // Below the alias, RAM is untouched.
        assert_eq!(read(&m, 0x10_0000 - alias - 16, 16), vec![0; 16]);
        // The memory map reports the ROM reserved.
        let map = multiboot::memory_map(&m.layout);
        assert!(map.contains(&MmapEntry {
            base,
            len: size as u64,
            kind: MMAP_RESERVED
        }));
    }
}

#[test]
fn firmware_of_a_bad_size_is_refused() {
    for size in [4096usize, 0x10001, 0x18000, 32 << 20] {
        let mut m = machine();
        let err = load(&mut m, &Image::firmware("bios.bin", vec![0; size])).unwrap_err();
        assert!(
            matches!(err, LoadError::RomSize { size: s, .. } if s == size as u64),
            "{size}"
        );
        assert!(m.layout.rom.is_empty());
    }
}

#[test]
fn add_rom_refuses_ram_and_overlaps() {
    let mut m = machine();
    m.add_rom(0xfff0_0000, &[1; 0x1000]).unwrap();
    for (addr, len) in [
        (0xfff0_0000u64, 0x1000),
        (0x10_0000, 0x1000),
        (0xffff_0000, 0x800),
        (0xfff0_0800, 0x1000),
        (0xffef_f000, 0x2000),
    ] {
        let err = m.add_rom(addr, &vec![0; len]).unwrap_err();
        assert!(
            matches!(err, crate::MachineError::Rom { .. }),
            "{addr:#x}: {err}"
        );
    }
    assert_eq!(m.layout.rom.len(), 1);
}

// ---------------------------------------------------------------- multiboot

const MB_FLAGS: u32 = 0x3; // page-align modules, memory information

/// A multiboot ELF kernel: text (header + code) at 0x100000, data + 8 KiB bss at 0x101000.
fn mb_elf() -> Vec<u8> {
    let mut text = mb_header(MB_FLAGS, &[]);
    text.extend_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]); // cli; hlt; jmp $-1
    text.resize(0x20, 0x90);
    let data = [0x5au8; 0x10];
    let mut body = text.clone();
    body.extend_from_slice(&data);
    elf32(
        0x10_000c,
        &[
            load_ph(0x100, 0x10_0000, 0x20, 0x20),
            load_ph(0x120, 0x10_1000, 0x10, 0x2000),
        ],
        0x100,
        &body,
    )
}

/// An a.out-kludge kernel: 0x40 bytes of padding, the header at file offset 0x40 and
/// address 0x200040, text to 0x200100, bss to 0x202000, entry 0x200080.
fn mb_aout() -> Vec<u8> {
    let mut f = vec![0xccu8; 0x40];
    f.extend_from_slice(&mb_header(
        MB_FLAGS | 1 << 16,
        &[0x20_0040, 0x20_0000, 0x20_0100, 0x20_2000, 0x20_0080],
    ));
    f.resize(0x100, 0xf4);
    f.extend_from_slice(&[0xee; 0x40]); // past load_end_addr: not loaded
    f
}

fn mbi(m: &Machine, off: u64) -> u32 {
    read_u32(m, MBI_ADDR + off)
}

fn mmap(m: &Machine) -> Vec<MmapEntry> {
    mmap_of(m, MBI_ADDR)
}

/// The memory map the MBI at `mbi_addr` points to.
fn mmap_of(m: &Machine, mbi_addr: u64) -> Vec<MmapEntry> {
    let mbi = |off| read_u32(m, mbi_addr + off);
    let (addr, len) = (u64::from(mbi(48)), u64::from(mbi(44)));
    let mut out = Vec::new();
    let mut p = addr;
    while p < addr + len {
        assert_eq!(read_u32(m, p), 20);
        out.push(MmapEntry {
            base: read_u64(m, p + 4),
            len: read_u64(m, p + 12),
            kind: read_u32(m, p + 20),
        });
        p += 24;
    }
    out
}

#[test]
fn multiboot_elf_kernel_is_loaded_and_entered_as_the_spec_says() {
    let mut m = machine_with(32 << 20, "console=ttyS0 debug");
    fill(&m, 0x10_1000, 0x3000, 0xaa);
    let img = Image::multiboot("kernel.elf", mb_elf());
    let s = load(&mut m, &img).unwrap();
    assert_eq!(read(&m, 0x10_0000, 0x20), img.bytes[0x100..0x120]);
    assert_eq!(read(&m, 0x10_1000, 0x10), vec![0x5a; 0x10]);
    assert_eq!(
        read(&m, 0x10_1010, 0x2000 - 0x10),
        vec![0; 0x2000 - 0x10],
        "bss zeroed"
    );
    assert_eq!(s.rip, 0x10_000c);
    assert_eq!(s.gpr[gpr::RAX], 0x2bad_b002);
    assert_eq!(s.gpr[gpr::RBX], MBI_ADDR);
    assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE);
    assert_eq!(s.rflags & (1 << 9 | 1 << 17), 0, "IF and VM clear");
    assert_segments_match_gdt(&m, &s);
    assert!(s.seg[seg::CS].db);

    assert_eq!(mbi(&m, 0), 0x24f);
    assert_eq!(mbi(&m, 4), 639);
    assert_eq!(mbi(&m, 8), (32 << 10) - 1024);
    assert_eq!(mbi(&m, 12), 0x8000_ffff);
    assert_eq!(mbi(&m, 20), 0, "no modules");
    let cmdline = u64::from(mbi(&m, 16));
    assert_eq!(cmdline, 0x10_3000);
    assert_eq!(read_cstr(&m, cmdline), "kernel.elf console=ttyS0 debug");
    assert_eq!(read_cstr(&m, u64::from(mbi(&m, 64))), "deja");
    assert_eq!(u64::from(mbi(&m, 48)), MMAP_ADDR);
    assert_eq!(
        mmap(&m),
        vec![
            MmapEntry {
                base: 0,
                len: 0x9fc00,
                kind: MMAP_RAM
            },
            MmapEntry {
                base: 0x9fc00,
                len: 0x400,
                kind: MMAP_RESERVED
            },
            MmapEntry {
                base: 0xe0000,
                len: 0x10000,
                kind: MMAP_RESERVED
            },
            MmapEntry {
                base: 0xf0000,
                len: 0x10000,
                kind: MMAP_RESERVED
            },
            MmapEntry {
                base: 0x100000,
                len: (32 << 20) - 0x100000,
                kind: MMAP_RAM
            },
        ]
    );
}

#[test]
fn multiboot_memory_map_follows_the_layout_above_4g() {
    let layout = crate::memory::MemoryLayout::pc(4 << 30).unwrap();
    let map = multiboot::memory_map(&layout);
    assert_eq!(
        map.last(),
        Some(&MmapEntry {
            base: 1 << 32,
            len: (4 << 30) - 0xc000_0000,
            kind: MMAP_RAM
        })
    );
    // The ACPI tables' area is reserved, not omitted, so no OS takes it for free RAM.
    assert_eq!(
        map[2],
        MmapEntry {
            base: crate::devices::acpi::ACPI_REGION_START,
            len: 0x1_0000,
            kind: MMAP_RESERVED
        }
    );
    assert_eq!(
        map[4],
        MmapEntry {
            base: 0x100000,
            len: 0xc000_0000 - 0x100000,
            kind: MMAP_RAM
        }
    );
    // Entries are ascending and disjoint.
    for w in map.windows(2) {
        assert!(w[0].base + w[0].len <= w[1].base);
    }
}

#[test]
fn multiboot_higher_half_elf_entry_is_translated_to_physical() {
    let mut m = machine();
    let mut text = mb_header(MB_FLAGS, &[]);
    text.resize(0x40, 0xf4);
    let ph = Ph {
        p_type: 1,
        offset: 0x80,
        vaddr: 0xc010_0000,
        paddr: 0x10_0000,
        filesz: 0x40,
        memsz: 0x40,
    };
    let img = Image::multiboot("hh.elf", elf32(0xc010_0010, &[ph], 0x80, &text));
    let s = load(&mut m, &img).unwrap();
    assert_eq!(s.rip, 0x10_0010);
    assert_eq!(read(&m, 0x10_0000, 0x40), text);
    // QEMU translates only through executable segments (p_flags at 52 + 24).
    let not_exec = patch(img.bytes.clone(), 52 + 24, &6u32.to_le_bytes());
    let err = load(&mut m, &Image::multiboot("hh.elf", not_exec)).unwrap_err();
    assert!(
        matches!(
            err,
            LoadError::EntryNotInRam {
                entry: 0xc010_0010,
                ..
            }
        ),
        "{err}"
    );
    // ... and only through its file-backed part.
    let mut bss = Image::multiboot(
        "hh.elf",
        elf32(0xc010_0050, &[Ph { memsz: 0x100, ..ph }], 0x80, &text),
    );
    assert!(load(&mut m, &bss).is_err());
    bss.bytes = elf32(0xc010_003f, &[Ph { memsz: 0x100, ..ph }], 0x80, &text);
    assert_eq!(load(&mut m, &bss).unwrap().rip, 0x10_003f);
}

#[test]
fn multiboot_kernel_over_0x9000_gets_its_mbi_and_memory_map_past_its_end() {
    // A kernel loaded at 0x8000 (text to 0xa000) covers QEMU's usual MBI spot at 0x9000:
    // the memory map and the MBI go after the command line, past the kernel, as QEMU puts
    // everything it builds after the kernel; the kernel's bytes stay as loaded.
    let aout_fields = 0x40 + 12;
    let mut f = vec![0xccu8; 0x40];
    f.extend_from_slice(&mb_header(
        MB_FLAGS | 1 << 16,
        &[0x8040, 0x8000, 0xa000, 0xb000, 0x8080],
    ));
    f.resize(0x2000, 0xf4);
    assert_eq!(
        u32::from_le_bytes(f[aout_fields..aout_fields + 4].try_into().unwrap()),
        0x8040
    );
    let mut m = machine_with(16 << 20, "x");
    let img = Image::multiboot("low", f.clone());
    let s = load(&mut m, &img).unwrap();
    assert_eq!(read(&m, 0x8000, 0x2000), f, "the kernel is intact");
    assert_eq!(read(&m, 0xa000, 0x1000), vec![0; 0x1000], "bss zeroed");
    let mbi_addr = s.gpr[gpr::RBX];
    assert!(
        mbi_addr >= 0xb000,
        "MBI at {mbi_addr:#x}, inside the kernel"
    );
    let mbi = |off| read_u32(&m, mbi_addr + off);
    assert_eq!(mbi(0), 0x24f);
    let cmdline = u64::from(mbi(16));
    assert_eq!(cmdline, 0xb000, "the page after the kernel, as before");
    assert_eq!(read_cstr(&m, cmdline), "low x");
    assert_eq!(read_cstr(&m, u64::from(mbi(64))), "deja");
    let map_addr = u64::from(mbi(48));
    assert!(map_addr >= 0xb000 && map_addr + u64::from(mbi(44)) <= mbi_addr);
    assert_eq!(mmap_of(&m, mbi_addr), multiboot::memory_map(&m.layout));
    let sp = s.gpr[gpr::RSP];
    assert!(
        !(0x8000..mbi_addr + 116).contains(&(sp - 1)),
        "the stack {sp:#x} clear of kernel and MBI"
    );
}

#[test]
fn multiboot_aout_kludge_loads_text_and_zeroes_bss() {
    let mut m = machine();
    fill(&m, 0x20_0000, 0x3000, 0xaa);
    let img = Image::multiboot("aout.bin", mb_aout());
    let s = load(&mut m, &img).unwrap();
    assert_eq!(read(&m, 0x20_0000, 0x100), img.bytes[..0x100]);
    assert_eq!(read(&m, 0x20_0100, 0x1f00), vec![0; 0x1f00]);
    assert_eq!(read_cstr(&m, 0x20_2000), "aout.bin ");
    assert_eq!(s.rip, 0x20_0080);
    assert_eq!(s.gpr[gpr::RAX], 0x2bad_b002);

    // load_end_addr = 0: load to the end of the file; bss_end_addr = 0: no bss.
    let mut f = mb_header(1 << 16, &[0x30_0000, 0x30_0000, 0, 0, 0x30_0020]);
    f.resize(0x50, 0x90);
    let mut m = machine();
    let s = load(&mut m, &Image::multiboot("k", f.clone())).unwrap();
    assert_eq!(read(&m, 0x30_0000, 0x50), f);
    assert_eq!(read_cstr(&m, 0x30_1000), "k ");
    assert_eq!(s.rip, 0x30_0020);
}

#[test]
fn multiboot_video_mode_request_is_ignored_as_qemu_does() {
    let mut f = mb_header(
        1 << 16 | 1 << 2,
        &[0x30_0000, 0x30_0000, 0, 0, 0x30_0000, 0, 1024, 768, 32],
    );
    f.resize(0x60, 0x90);
    let mut m = machine();
    load(&mut m, &Image::multiboot("vbe", f)).unwrap();
    assert_eq!(mbi(&m, 0) & 1 << 11, 0);
}

#[test]
fn multiboot_refuses_x86_64_elf_with_qemu_s_message() {
    let mut f = mb_elf();
    f[4] = 2;
    f[18] = 62;
    let err = load(&mut machine(), &Image::multiboot("k64", f)).unwrap_err();
    assert!(matches!(err, LoadError::X86_64Multiboot { .. }));
    assert_eq!(
        err.to_string(),
        "k64: Cannot load x86-64 image, give a 32bit one."
    );
}

fn patch(mut f: Vec<u8>, at: usize, bytes: &[u8]) -> Vec<u8> {
    f[at..at + bytes.len()].copy_from_slice(bytes);
    f
}

#[test]
fn malformed_inputs_are_refused_with_precise_messages() {
    let ph0 = 52; // first program header
    let aout_fields = 0x40 + 12; // header_addr of mb_aout()
    let u = |v: u32| v.to_le_bytes();
    let bad_checksum = patch(mb_elf(), 0x108, &u(0x1234));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("missing header", vec![0x90; 4096], "no multiboot header"),
        (
            "bad checksum",
            bad_checksum,
            "offset 0x100 has a bad checksum",
        ),
        (
            "truncated ELF header",
            mb_header(0, &[]),
            "ELF header truncated: the file has 12 bytes",
        ),
        (
            "not ELF",
            {
                let mut f = mb_header(0, &[]);
                f.resize(64, 0);
                f
            },
            "not an ELF file",
        ),
        (
            "bad e_class",
            patch(mb_elf(), 4, &[3]),
            "EI_CLASS (offset 0x4) is 0x3",
        ),
        ("bad endianness", patch(mb_elf(), 5, &[2]), "EI_DATA"),
        (
            "bad e_machine",
            patch(mb_elf(), 18, &[40, 0]),
            "e_machine (offset 0x12) is 0x28",
        ),
        ("bad e_type", patch(mb_elf(), 16, &[3, 0]), "e_type"),
        (
            "bad e_phentsize",
            patch(mb_elf(), 42, &[8, 0]),
            "e_phentsize",
        ),
        (
            "phdrs outside file",
            patch(mb_elf(), 28, &u(0x1_0000)),
            "program header table (e_phoff 0x10000",
        ),
        (
            "too many phdrs",
            patch(mb_elf(), 44, &[0xff, 0xff]),
            "program header table",
        ),
        (
            "segment outside file",
            patch(
                patch(mb_elf(), ph0 + 32 + 16, &u(0x10_0000)),
                ph0 + 32 + 20,
                &u(0x10_0000),
            ),
            "program header 1 (at file offset 0x54): p_offset 0x120 + p_filesz 0x100000",
        ),
        (
            "p_offset + p_filesz overflows 32 bits",
            patch(
                patch(mb_elf(), ph0 + 32 + 4, &u(0xffff_fff0)),
                ph0 + 32 + 16,
                &u(0x20),
            ),
            "p_offset 0xfffffff0 + p_filesz 0x20 = 0x100000010 is past the end of the file",
        ),
        (
            "e_phoff + table overflows 32 bits",
            patch(mb_elf(), 28, &u(0xffff_ffe0)),
            "e_phoff 0xffffffe0",
        ),
        (
            "filesz > memsz",
            patch(mb_elf(), ph0 + 16, &u(0x21)),
            "p_filesz 0x21 is larger than p_memsz 0x20",
        ),
        (
            "segment beyond 4 GiB",
            patch(mb_elf(), ph0 + 32 + 12, &u(0xffff_f000)),
            "beyond 4 GiB",
        ),
        (
            "segment outside RAM",
            patch(mb_elf(), ph0 + 32 + 12, &u(0x0200_0000)),
            "ELF program header 1 of k (p_paddr 0x2000000",
        ),
        (
            "segment in VGA hole",
            patch(mb_elf(), ph0 + 12, &u(0xb8000)),
            "VGA",
        ),
        (
            "segment over the GDT",
            patch(mb_elf(), ph0 + 12, &u(0x520)),
            "overlaps the GDT",
        ),
        (
            "no PT_LOAD",
            patch(patch(mb_elf(), ph0, &u(6)), ph0 + 32, &u(6)),
            "no PT_LOAD",
        ),
        (
            "entry outside RAM",
            patch(mb_elf(), 24, &u(0x0400_0000)),
            "entry point 0x4000000",
        ),
        (
            "a.out truncated",
            {
                let mut f = vec![0; 0x10];
                f.extend(mb_header(1 << 16, &[0x100]));
                f
            },
            "needs the address fields at offsets 0x1c..0x30",
        ),
        (
            "a.out header_addr < load_addr",
            patch(mb_aout(), aout_fields, &u(0x1f_0000)),
            "header_addr 0x1f0000 is below load_addr 0x200000",
        ),
        (
            "a.out header_addr too far",
            patch(mb_aout(), aout_fields, &u(0x20_0080)),
            "is more than the header's file offset 0x40",
        ),
        (
            "a.out load_end < load_addr",
            patch(mb_aout(), aout_fields + 8, &u(0x10_0000)),
            "load_end_addr 0x100000 is below load_addr",
        ),
        (
            "a.out bss_end < load_end",
            patch(mb_aout(), aout_fields + 12, &u(0x20_0080)),
            "bss_end_addr 0x200080 is below the end of the loaded text 0x200100",
        ),
        (
            "a.out load_end past file",
            patch(mb_aout(), aout_fields + 8, &u(0x20_1000)),
            "but the file ends at 0x140",
        ),
        (
            "a.out over 4 GiB",
            patch(
                patch(
                    patch(
                        patch(mb_aout(), aout_fields, &u(0xffff_f040)),
                        aout_fields + 4,
                        &u(0xffff_f000),
                    ),
                    aout_fields + 8,
                    &u(0),
                ),
                aout_fields + 12,
                &u(0),
            ),
            "not entirely in RAM",
        ),
        (
            "a.out on the GDT",
            patch(
                patch(
                    patch(
                        patch(mb_aout(), aout_fields, &u(0x540)),
                        aout_fields + 4,
                        &u(0x500),
                    ),
                    aout_fields + 8,
                    &u(0x600),
                ),
                aout_fields + 12,
                &u(0),
            ),
            "overlaps the GDT",
        ),
    ];
    for (what, bytes, needle) in cases {
        let mut m = machine();
        let err = load(&mut m, &Image::multiboot("k", bytes)).unwrap_err();
        assert!(
            err.to_string().contains(needle),
            "{what}: {err:?}\n  {err}\n  lacks {needle:?}"
        );
    }
    // A NUL in the command line cannot be passed.
    let mut m = machine_with(16 << 20, "a\0b");
    assert!(matches!(
        load(&mut m, &Image::multiboot("k", mb_elf())),
        Err(LoadError::CmdlineNul { offset: 1 })
    ));
}

#[test]
fn multiboot_header_is_found_only_where_qemu_looks() {
    let mut f = vec![0u8; 8192];
    f[8140..8152].copy_from_slice(&mb_header(0, &[]));
    assert!(matches!(multiboot::find_header("k", &f), Ok(h) if h.offset == 8140));
    let mut f = vec![0u8; 8192];
    f[8144..8156].copy_from_slice(&mb_header(0, &[]));
    assert!(matches!(
        multiboot::find_header("k", &f),
        Err(LoadError::NotMultiboot { .. })
    ));
    // Unaligned headers are not headers.
    let mut f = vec![0u8; 64];
    f[6..18].copy_from_slice(&mb_header(0, &[]));
    assert!(multiboot::find_header("k", &f).is_err());
    // A bad magic first, a good one later: the good one wins.
    let mut f = vec![0u8; 64];
    f[0..12].copy_from_slice(&mb_header(0, &[]));
    f[8] ^= 1;
    f[32..44].copy_from_slice(&mb_header(0, &[]));
    assert!(matches!(multiboot::find_header("k", &f), Ok(h) if h.offset == 32));
}

/// xorshift64*: deterministic pseudo-random numbers for the fuzz test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn mutated_and_random_kernels_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let seeds = [mb_elf(), mb_aout()];
    let mut m = machine_with(4 << 20, "x");
    let (mut ok, mut err) = (0, 0);
    for round in 0..3000 {
        let mut f = seeds[round % 2].clone();
        match rng.below(4) {
            // Flip bytes in the headers, where the fields are.
            0 | 1 => {
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(0x180.min(f.len()));
                    f[at] = rng.next() as u8;
                }
            }
            // Overwrite a 32-bit field with an extreme value.
            2 => {
                let at = rng.below(f.len() - 4) & !3;
                let v = [
                    0u32,
                    1,
                    0x7fff_ffff,
                    0x8000_0000,
                    0xffff_ffff,
                    0xffff_f000,
                    0x9000,
                ][rng.below(7)];
                f[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            // Truncate.
            _ => f.truncate(rng.below(f.len())),
        }
        // Keep the multiboot header valid half the time so the ELF/a.out paths run.
        let o = if round % 2 == 0 { 0x100 } else { 0x40 };
        if (round / 2) % 2 == 0 && f.len() >= o + 12 {
            let flags = u32::from_le_bytes(f[o + 4..o + 8].try_into().unwrap());
            let checksum = 0u32.wrapping_sub(0x1bad_b002u32.wrapping_add(flags));
            f[o..o + 4].copy_from_slice(&0x1bad_b002u32.to_le_bytes());
            f[o + 8..o + 12].copy_from_slice(&checksum.to_le_bytes());
        }
        match load(&mut m, &Image::multiboot("fuzz", f)) {
            Ok(_) => ok += 1,
            Err(e) => {
                assert!(!e.to_string().is_empty());
                err += 1;
            }
        }
    }
    // Random bytes with a planted header.
    for _ in 0..500 {
        let len = 12 + rng.below(600);
        let mut f: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let flags = rng.next() as u32;
        f[..12].copy_from_slice(&mb_header(flags, &[]));
        let _ = load(&mut m, &Image::multiboot("rand", f));
    }
    assert!(
        ok > 50 && err > 500,
        "ok {ok} err {err}: the mutations should exercise both"
    );
}

// ---------------------------------------------------------------- files

fn temp_dir(test: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("deja-loader-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn sidecar_round_trips_every_format() {
    let dir = temp_dir("sidecar");
    let images = [
        raw(code(64), 0x7c00, 0x7c00, EntryMode::Real),
        raw(code(64), 0x100000, 0x100004, EntryMode::Long),
        Image::firmware("x", rom(64 << 10)),
        Image::multiboot("x", mb_elf()),
    ];
    for (i, img) in images.iter().enumerate() {
        let path = dir.join(format!("image{i}.bin"));
        let sidecar = img.write_with_sidecar(&path).unwrap();
        assert_eq!(sidecar, dir.join(format!("image{i}.bin.json")));
        let back = Image::from_file(&path).unwrap();
        assert_eq!(back.bytes, img.bytes);
        assert_eq!(back.format, img.format);
        assert_eq!(back.name, path.display().to_string());
    }
    let text = std::fs::read_to_string(dir.join("image1.bin.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["format"], "raw");
    assert_eq!(v["mode"], "long");
    assert_eq!(v["entry"], 0x100004);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn from_file_detects_multiboot_and_explains_unknown_files() {
    let dir = temp_dir("detect");
    let kernel = dir.join("kernel.elf");
    std::fs::write(&kernel, mb_elf()).unwrap();
    assert_eq!(
        Image::from_file(&kernel).unwrap().format,
        ImageFormat::Multiboot
    );

    let blob = dir.join("blob.bin");
    std::fs::write(&blob, [0x90u8; 100]).unwrap();
    let msg = Image::from_file(&blob).unwrap_err().to_string();
    for needle in ["no multiboot header", "--bios", "--raw", "blob.bin.json"] {
        assert!(msg.contains(needle), "{msg} lacks {needle}");
    }

    std::fs::write(
        dir.join("blob.bin.json"),
        r#"{"format":"raw","load_addr":4096}"#,
    )
    .unwrap();
    let err = Image::from_file(&blob).unwrap_err();
    assert!(matches!(err, LoadError::Sidecar { .. }), "{err}");
    assert!(err.to_string().contains("missing field"), "{err}");

    let missing = Image::from_file(&dir.join("nope")).unwrap_err();
    assert!(matches!(missing, LoadError::Io { .. }));
    assert_eq!("long".parse::<EntryMode>().unwrap(), EntryMode::Long);
    assert!("v86".parse::<EntryMode>().is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn files_that_are_not_regular_are_refused_without_reading_them() {
    let dir = temp_dir("special");
    let fifo = dir.join("fifo");
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c_path` is a valid NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let link = dir.join("zero-link");
    std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
    let cases: [(&std::path::Path, &str); 4] = [
        (std::path::Path::new("/dev/zero"), "a character device"),
        (&fifo, "a FIFO"),
        (&link, "a character device"),
        (&dir, "a directory"),
    ];
    for (path, kind) in cases {
        // A FIFO with no writer would block a plain open forever; /dev/zero never ends.
        let err = read_file_bounded(path, MAX_IMAGE_FILE).unwrap_err();
        assert!(
            matches!(&err, LoadError::NotRegularFile { kind: k, .. } if *k == kind),
            "{}: {err}",
            path.display()
        );
        assert!(Image::from_file(path).is_err());
    }
    // An image whose sidecar is a FIFO.
    let image = dir.join("image.bin");
    std::fs::write(&image, mb_elf()).unwrap();
    std::os::unix::fs::symlink(&fifo, dir.join("image.bin.json")).unwrap();
    let err = Image::from_file(&image).unwrap_err();
    assert!(
        matches!(err, LoadError::NotRegularFile { kind: "a FIFO", .. }),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn files_larger_than_the_limit_are_refused_before_reading() {
    let dir = temp_dir("large");
    let big = dir.join("big.bin");
    // Sparse: 5 GiB of size, nothing written.
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(5 << 30).unwrap();
    let err = read_file_bounded(&big, MAX_IMAGE_FILE).unwrap_err();
    assert!(
        matches!(err, LoadError::FileTooLarge { size, max, .. } if size == 5 << 30 && max == MAX_IMAGE_FILE),
        "{err}"
    );
    f.set_len(100).unwrap();
    assert!(matches!(
        read_file_bounded(&big, 99),
        Err(LoadError::FileTooLarge {
            size: 100,
            max: 99,
            ..
        })
    ));
    assert_eq!(read_file_bounded(&big, 100).unwrap().len(), 100);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sidecar_and_empty_image_messages_say_what_is_wrong() {
    let dir = temp_dir("messages");
    // A sidecar that calls a file without a header a multiboot kernel: the error must not
    // claim there is no sidecar.
    let blob = dir.join("blob.bin");
    std::fs::write(&blob, [0x90u8; 100]).unwrap();
    std::fs::write(dir.join("blob.bin.json"), r#"{"format":"multiboot"}"#).unwrap();
    let image = Image::from_file(&blob).unwrap();
    let mut m = machine();
    let msg = load(&mut m, &image).unwrap_err().to_string();
    assert!(msg.contains("no multiboot header"), "{msg}");
    assert!(msg.contains("described as a multiboot kernel"), "{msg}");
    assert!(!msg.contains("no sidecar"), "{msg}");

    // Empty files are empty, with or without a sidecar.
    let empty = dir.join("empty.bin");
    std::fs::write(&empty, []).unwrap();
    let err = Image::from_file(&empty).unwrap_err();
    assert!(matches!(err, LoadError::Empty { .. }), "{err}");
    std::fs::write(dir.join("empty.bin.json"), r#"{"format":"firmware"}"#).unwrap();
    let err = Image::from_file(&empty).unwrap_err();
    assert!(matches!(err, LoadError::Empty { .. }), "{err}");

    // Unknown sidecar fields are refused, not ignored.
    std::fs::write(
        dir.join("blob.bin.json"),
        r#"{"format":"raw","load_addr":4096,"entry":4096,"mode":"real","entyr":8192}"#,
    )
    .unwrap();
    let err = Image::from_file(&blob).unwrap_err();
    assert!(matches!(err, LoadError::Sidecar { .. }), "{err}");
    assert!(err.to_string().contains("entyr"), "{err}");
    std::fs::write(dir.join("blob.bin.json"), r#"{"format":"multiboot","x":1}"#).unwrap();
    assert!(matches!(
        Image::from_file(&blob),
        Err(LoadError::Sidecar { .. })
    ));
    // A field given twice is ambiguous: refused (found by the sidecar fuzz target, which
    // reads sidecars with serde_json directly).
    std::fs::write(
        dir.join("blob.bin.json"),
        r#"{"format":"raw","format":"raw","load_addr":4096,"entry":4096,"mode":"long"}"#,
    )
    .unwrap();
    let err = Image::from_file(&blob).unwrap_err();
    assert!(
        err.to_string().contains("duplicate field `format`"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------- Linux boot protocol

#[test]
fn bzimages_load_as_the_boot_protocol_says() {
    let bytes = deja_testkit::bzimage(&[0xf4]);
    let mut m = machine_with(64 << 20, "console=ttyS0 quiet");
    let mut image = Image::detect("bz", bytes.clone()).unwrap();
    assert_eq!(image.format, ImageFormat::Linux);
    image.initrd = Some(Box::new(Image {
        name: "rd".into(),
        bytes: vec![7; 5000],
        format: ImageFormat::Linux,
        initrd: None,
    }));
    let s = load(&mut m, &image).unwrap();
    use super::linux::{CMDLINE_ADDR, ZERO_PAGE_ADDR};
    assert_eq!(s.rip, 0x100_0000 + 0x200);
    assert_eq!(s.gpr[gpr::RSI], ZERO_PAGE_ADDR);
    assert_eq!(s.seg[seg::CS].selector, 0x10);
    assert!(s.seg[seg::CS].l);
    assert_eq!(s.seg[seg::DS].selector, 0x18);
    assert_eq!(s.rflags & (1 << 9), 0, "interrupts off");
    assert_eq!(read(&m, 0x100_0200, 1), [0xf4]);
    let zp = read(&m, ZERO_PAGE_ADDR, 4096);
    let u32_at = |at: usize| u32::from_le_bytes(zp[at..at + 4].try_into().unwrap());
    // The setup header, copied (the loader then fills in type_of_loader, the initrd and
    // the command line pointer, 0x210..0x22c).
    assert_eq!(zp[0x1f1..0x210], bytes[0x1f1..0x210]);
    assert_eq!(zp[0x22c..0x26c], bytes[0x22c..0x26c]);
    assert_eq!(zp[0x210], 0xff, "type_of_loader");
    assert_eq!(u32_at(0x228) as u64, CMDLINE_ADDR);
    assert_eq!(read_cstr(&m, CMDLINE_ADDR), "console=ttyS0 quiet");
    let (rd_at, rd_len) = (u32_at(0x218) as u64, u32_at(0x21c));
    assert_eq!(rd_len, 5000);
    assert_eq!(rd_at % 4096, 0);
    assert!(rd_at + 5000 <= 64 << 20 && rd_at >= 0x100_0000 + 0x10_0000);
    assert_eq!(read(&m, rd_at, 5000), vec![7; 5000]);
    let map = super::multiboot::memory_map(&m.layout);
    assert_eq!(zp[0x1e8] as usize, map.len());
    for (i, e) in map.iter().enumerate() {
        let at = 0x2d0 + i * 20;
        assert_eq!(
            u64::from_le_bytes(zp[at..at + 8].try_into().unwrap()),
            e.base
        );
        assert_eq!(
            u64::from_le_bytes(zp[at + 8..at + 16].try_into().unwrap()),
            e.len
        );
        let kind = u32_at(at + 16);
        assert_eq!(kind, if e.kind == MMAP_RAM { 1 } else { 2 });
    }
    assert_eq!(
        u64::from_le_bytes(zp[0x70..0x78].try_into().unwrap()),
        crate::devices::acpi::ACPI_REGION_START,
        "acpi_rsdp_addr"
    );
}

#[test]
fn malformed_bzimages_are_refused_with_precise_messages() {
    let good = deja_testkit::bzimage(&[0xf4]);
    let with = |at: usize, v: &[u8]| {
        let mut b = good.clone();
        b[at..at + v.len()].copy_from_slice(v);
        b
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (with(0x206, &[0x0b, 0x02]), "older than 2.12"),
        (with(0x236, &[0, 0]), "XLF_KERNEL_64"),
        (with(0x211, &[0]), "LOADED_HIGH"),
        (with(0x1f1, &[200]), "past the end"),
        (with(0x201, &[0]), "length byte at 0x201"),
        (with(0x230, &[3, 0, 0, 0]), "not a power of two"),
        (good[..0x250].to_vec(), "no boot-protocol setup header"),
    ];
    for (bytes, needle) in cases {
        let image = Image {
            name: "bz".into(),
            bytes,
            format: ImageFormat::Linux,
            initrd: None,
        };
        let mut m = machine_with(64 << 20, "");
        let err = load(&mut m, &image).unwrap_err().to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
    // A command line longer than the kernel takes, and an initrd that does not fit.
    let mut m = machine_with(64 << 20, &"x".repeat(0x800));
    let image = Image::detect("bz", good.clone()).unwrap();
    let err = load(&mut m, &image).unwrap_err().to_string();
    assert!(err.contains("at most 2047"), "{err}");
    let mut m = machine_with(32 << 20, "");
    let mut image = Image::detect("bz", good).unwrap();
    image.initrd = Some(Box::new(Image {
        name: "huge".into(),
        bytes: vec![1; 24 << 20],
        format: ImageFormat::Linux,
        initrd: None,
    }));
    let err = load(&mut m, &image).unwrap_err().to_string();
    assert!(
        err.contains("initrd huge") && err.contains("--mem"),
        "{err}"
    );
}

// ---------------------------------------------------------------- PVH

use super::pvh::{
    MEMMAP_ADDR, MEMMAP_ENTRY_SIZE, MODLIST_ADDR, START_INFO_ADDR, START_INFO_MAGIC, StartInfo,
};
use deja_testkit::{VMLINUX_BSS, VMLINUX_ENTRY};

fn pvh_image(bytes: Vec<u8>, initrd: Option<Vec<u8>>) -> Image {
    Image {
        name: "vmlinux".into(),
        bytes,
        format: ImageFormat::Pvh,
        initrd: initrd.map(|bytes| {
            Box::new(Image {
                name: "rd".into(),
                bytes,
                format: ImageFormat::Pvh,
                initrd: None,
            })
        }),
    }
}

#[test]
fn hvm_start_info_has_xen_s_layout() {
    let info = StartInfo {
        nr_modules: 0x0102_0304,
        modlist_paddr: 0x1111_2222_3333_4444,
        cmdline_paddr: 0x5555_6666_7777_8888,
        rsdp_paddr: 0x9999_aaaa_bbbb_cccc,
        memmap_paddr: 0xdddd_eeee_ffff_0000,
        memmap_entries: 0x0506_0708,
    };
    let b = info.to_bytes();
    assert_eq!(b.len(), 56, "sizeof(struct hvm_start_info), version 1");
    // (offset, width, value) as xen/include/public/arch-x86/hvm/start_info.h has them.
    let fields: [(usize, usize, u64); 10] = [
        (0, 4, 0x336e_c578),
        (4, 4, 1),
        (8, 4, 0),
        (12, 4, 0x0102_0304),
        (16, 8, 0x1111_2222_3333_4444),
        (24, 8, 0x5555_6666_7777_8888),
        (32, 8, 0x9999_aaaa_bbbb_cccc),
        (40, 8, 0xdddd_eeee_ffff_0000),
        (48, 4, 0x0506_0708),
        (52, 4, 0),
    ];
    for (at, width, want) in fields {
        let mut v = [0u8; 8];
        v[..width].copy_from_slice(&b[at..at + width]);
        assert_eq!(u64::from_le_bytes(v), want, "field at {at}");
    }
    let m = pvh::modlist_entry(0x1234_5000, 0x6789);
    assert_eq!(m.len(), 32);
    assert_eq!(
        m[..16],
        [0x1234_5000u64.to_le_bytes(), 0x6789u64.to_le_bytes()].concat()
    );
    assert_eq!(m[16..], [0; 16], "no module command line, reserved zero");
    let e = pvh::memmap_entry(0x10_0000, 0x20_0000, 2);
    assert_eq!(e.len(), 24);
    assert_eq!(
        e[..],
        [
            &0x10_0000u64.to_le_bytes()[..],
            &0x20_0000u64.to_le_bytes(),
            &2u32.to_le_bytes(),
            &[0; 4]
        ]
        .concat()
    );
}

#[test]
fn vmlinux_is_detected_and_entered_as_the_pvh_abi_says() {
    let code = code(300);
    let bytes = deja_testkit::vmlinux(&code);
    let detected = Image::detect("vmlinux", bytes.clone()).unwrap();
    assert_eq!(detected.format, ImageFormat::Pvh);
    let mut m = machine_with(64 << 20, "console=ttyS0 root=/dev/ram0");
    fill(&m, VMLINUX_ENTRY + 300, 64, 0xcc); // bss must come back zeroed
    let image = pvh_image(bytes, Some(vec![0x5a; 10_000]));
    let s = load(&mut m, &image).unwrap();
    // 32-bit protected mode, paging off, flat segments, interrupts off, EBX = start info.
    assert_eq!(s.rip, VMLINUX_ENTRY);
    assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE);
    assert_eq!(s.cr4, 0);
    assert_eq!(s.efer, 0);
    assert_eq!(s.rflags & (1 << 9), 0);
    assert_eq!(s.gpr[gpr::RBX], START_INFO_ADDR);
    assert!(s.seg[seg::CS].db && !s.seg[seg::CS].l, "32-bit code");
    assert_eq!(s.seg[seg::CS].type_ & 0xa, 0xa, "execute/read");
    for sg in &s.seg {
        assert_eq!((sg.base, sg.limit), (0, 0xffff_ffff));
    }
    assert_segments_match_gdt(&m, &s);
    assert_eq!(
        (s.tr.base, s.tr.limit, s.tr.type_),
        (0, 0x67, 0xb),
        "32-bit busy TSS"
    );
    assert_eq!(read(&m, VMLINUX_ENTRY, 300), code);
    assert_eq!(
        read(&m, VMLINUX_ENTRY + 300, VMLINUX_BSS as usize),
        vec![0; 4096]
    );
    // The start info, as the guest reads it.
    assert_eq!(read_u32(&m, START_INFO_ADDR), START_INFO_MAGIC);
    assert_eq!(read_u32(&m, START_INFO_ADDR + 4), 1, "version");
    assert_eq!(read_u32(&m, START_INFO_ADDR + 12), 1, "nr_modules");
    assert_eq!(read_u64(&m, START_INFO_ADDR + 16), MODLIST_ADDR);
    let cmdline = read_u64(&m, START_INFO_ADDR + 24);
    assert_eq!(read_cstr(&m, cmdline), "console=ttyS0 root=/dev/ram0");
    assert_eq!(
        read_u64(&m, START_INFO_ADDR + 32),
        crate::devices::acpi::ACPI_REGION_START,
        "rsdp_paddr"
    );
    let (rd_at, rd_len) = (read_u64(&m, MODLIST_ADDR), read_u64(&m, MODLIST_ADDR + 8));
    assert_eq!(rd_len, 10_000);
    assert_eq!(rd_at % 4096, 0);
    assert!(rd_at >= VMLINUX_ENTRY + 300 + VMLINUX_BSS && rd_at + rd_len <= 64 << 20);
    assert_eq!(read(&m, rd_at, 10_000), vec![0x5a; 10_000]);
    assert_eq!(read_u64(&m, START_INFO_ADDR + 40), MEMMAP_ADDR);
    let map = super::multiboot::memory_map(&m.layout);
    assert_eq!(read_u32(&m, START_INFO_ADDR + 48) as usize, map.len());
    for (i, e) in map.iter().enumerate() {
        let at = MEMMAP_ADDR + (i * MEMMAP_ENTRY_SIZE) as u64;
        assert_eq!(read_u64(&m, at), e.base);
        assert_eq!(read_u64(&m, at + 8), e.len);
        let kind = if e.kind == MMAP_RAM { 1 } else { 2 };
        assert_eq!(read_u32(&m, at + 16), kind);
        assert_eq!(read_u32(&m, at + 20), 0, "reserved");
    }
    // No initrd: no modules, no module list.
    let mut m = machine_with(64 << 20, "");
    load(&mut m, &pvh_image(deja_testkit::vmlinux(&[0xf4]), None)).unwrap();
    assert_eq!(read_u32(&m, START_INFO_ADDR + 12), 0);
    assert_eq!(read_u64(&m, START_INFO_ADDR + 16), 0);
    assert_eq!(read_cstr(&m, read_u64(&m, START_INFO_ADDR + 24)), "");
}

#[test]
fn a_reset_reloads_a_linux_kernel_and_its_initrd() {
    for pvh in [false, true] {
        let mut m = machine_with(64 << 20, "console=ttyS0");
        let mut image = if pvh {
            pvh_image(deja_testkit::vmlinux(&[0xf4; 64]), None)
        } else {
            Image::detect("bz", deja_testkit::bzimage(&[0xf4; 64])).unwrap()
        };
        image.initrd = Some(Box::new(Image {
            name: "rd".into(),
            bytes: vec![0x77; 8192],
            format: image.format.clone(),
            initrd: None,
        }));
        let first = load(&mut m, &image).unwrap();
        let snapshot = |m: &Machine| {
            [
                read(m, 0x1_0000, 0x1000),
                read(m, 0x100_0000, 0x1000),
                read(m, (64 << 20) - 0x2000, 0x2000),
            ]
        };
        let before = snapshot(&m);
        // The guest scribbles over its kernel, its initrd, its boot structures.
        for at in (0..64u64 << 20).step_by(1 << 20).skip(1) {
            fill(&m, at, 0x2000, 0xcc);
        }
        fill(&m, 0x1_0000, 0x1000, 0xcc);
        fill(&m, (64 << 20) - 0x4000, 0x4000, 0xcc);
        assert_eq!(reload(&mut m, &image).unwrap(), first, "pvh {pvh}");
        // The boot structures, the kernel and its bss, and the initrd are back.
        let after = snapshot(&m);
        for (i, what) in ["boot structures", "kernel", "initrd"].iter().enumerate() {
            assert!(after[i] == before[i], "pvh {pvh}: {what} not reloaded");
        }
    }
}

fn gzip(b: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

/// lz4's legacy frame as `lz4 -l` writes it: the magic, then per 8 MiB block its
/// compressed length and an independent LZ4 block.
fn lz4_legacy(b: &[u8]) -> Vec<u8> {
    let mut out = 0x184c_2102u32.to_le_bytes().to_vec();
    for chunk in b.chunks(8 << 20) {
        let block = lz4_flex::block::compress(chunk);
        out.extend_from_slice(&(block.len() as u32).to_le_bytes());
        out.extend_from_slice(&block);
    }
    out
}

fn xz(b: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

#[test]
fn a_bzimage_boots_through_pvh_from_its_compressed_payload() {
    let vmlinux = deja_testkit::vmlinux(&code(500));
    let mut reference = machine_with(64 << 20, "quiet");
    let want = load(&mut reference, &pvh_image(vmlinux.clone(), None)).unwrap();
    let payloads: [(&str, Vec<u8>); 5] = [
        ("gzip", gzip(&vmlinux)),
        ("xz", xz(&vmlinux)),
        ("zstd", zstd::encode_all(&vmlinux[..], 19).unwrap()),
        ("lz4", lz4_legacy(&vmlinux)),
        ("uncompressed", vmlinux.clone()),
    ];
    for (what, payload) in payloads {
        let bz = deja_testkit::bzimage_with_payload(&payload);
        assert_eq!(
            super::payload::Compression::detect(super::payload::payload("bz", &bz).unwrap())
                .map(|c| c.name()),
            Some(what)
        );
        let mut image = Image::detect("bz", bz.clone()).unwrap();
        assert_eq!(
            image.format,
            ImageFormat::Linux,
            "a bzImage boots the boot protocol"
        );
        image.set_kernel_entry(KernelEntry::Pvh, 64 << 20).unwrap();
        assert_eq!(image.format, ImageFormat::Pvh);
        assert_eq!(image.bytes, bz, "the image stays the file (its identity)");
        let mut m = machine_with(64 << 20, "quiet");
        assert_eq!(load(&mut m, &image).unwrap(), want, "{what}");
        for (at, len) in [(0, 0xa_0000), (0x10_0000, 31 << 20)] {
            assert_eq!(read(&m, at, len), read(&reference, at, len), "{what}");
        }
        // And back.
        image
            .set_kernel_entry(KernelEntry::BootProtocol, 64 << 20)
            .unwrap();
        assert_eq!(image.format, ImageFormat::Linux);
    }
}

#[test]
fn lz4_legacy_frames_span_blocks_frames_and_linux_s_size_trailer() {
    use super::payload::vmlinux;
    // 9 MiB: two blocks. Then a second frame (its magic between blocks).
    let big: Vec<u8> = (0..9u32 << 20)
        .map(|i| (i / 4096) as u8 ^ (i as u8 & 3))
        .collect();
    let mut two_frames = lz4_legacy(&big);
    two_frames.extend_from_slice(&lz4_legacy(b"tail")[..]);
    let bz = deja_testkit::bzimage_with_payload(&two_frames);
    let mut want = big;
    want.extend_from_slice(b"tail");
    // bzimage_with_payload appends the 4-byte size after the named payload; name it too.
    let mut with_trailer = bz.clone();
    let len = u32::from_le_bytes(bz[0x24c..0x250].try_into().unwrap()) + 4;
    with_trailer[0x24c..0x250].copy_from_slice(&len.to_le_bytes());
    for b in [bz, with_trailer] {
        assert!(vmlinux("bz", &b, 64 << 20).unwrap() == want);
    }
}

#[test]
fn kernel_entries_that_cannot_be_had_are_refused_with_what_to_do() {
    let max = 64 << 20;
    let mut vml = Image::detect("vml", deja_testkit::vmlinux(&[0xf4])).unwrap();
    let err = vml
        .set_kernel_entry(KernelEntry::BootProtocol, max)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no boot-protocol entry"), "{err}");
    let mut raw = raw(vec![0xf4], 0x7c00, 0x7c00, EntryMode::Real);
    let err = raw
        .set_kernel_entry(KernelEntry::Pvh, max)
        .unwrap_err()
        .to_string();
    assert!(err.contains("goes with a Linux kernel"), "{err}");
    assert_eq!("pvh".parse::<KernelEntry>().unwrap(), KernelEntry::Pvh);
    assert_eq!(
        "boot-protocol".parse::<KernelEntry>().unwrap(),
        KernelEntry::BootProtocol
    );
    assert!("PVH".parse::<KernelEntry>().is_err());

    // Payloads deja cannot take, each named in the message.
    let vmlinux = deja_testkit::vmlinux(&[0xf4]);
    let mut corrupt_xz = xz(&vmlinux);
    let n = corrupt_xz.len();
    corrupt_xz[n / 2] ^= 0xff;
    let mut no_pvh = vmlinux.clone();
    no_pvh[64 + 112 + 8..][..4].copy_from_slice(&17u32.to_le_bytes()); // the note's type
    let mut beyond = deja_testkit::bzimage_with_payload(&gzip(&vmlinux));
    beyond[0x24c..0x250].copy_from_slice(&0x10_0000u32.to_le_bytes());
    let cases: Vec<(Vec<u8>, u64, &str)> = vec![
        (
            deja_testkit::bzimage_with_payload(b"BZh91AY&SY"),
            max,
            "bzip2-compressed",
        ),
        (
            deja_testkit::bzimage_with_payload(b"\x5d\x00\x00\x80\x00"),
            max,
            "lzma-compressed",
        ),
        (
            deja_testkit::bzimage_with_payload(&[0x02, 0x21, 0x4c, 0x18, 0x40, 0, 0, 0, 1]),
            max,
            "past the payload's end",
        ),
        (
            deja_testkit::bzimage_with_payload(&[0x02, 0x21, 0x4c, 0x18, 2, 0, 0, 0, 0xf0, 0]),
            max,
            "decompressing the lz4 payload's block",
        ),
        (
            deja_testkit::bzimage_with_payload(&lz4_legacy(&vec![0u8; 1 << 20])),
            0x1000,
            "lz4 payload decompresses to more than 0x1000",
        ),
        (
            deja_testkit::bzimage_with_payload(b"garbage!"),
            max,
            "magic of no compression",
        ),
        (
            deja_testkit::bzimage_with_payload(&corrupt_xz),
            max,
            "decompressing the xz payload",
        ),
        (
            deja_testkit::bzimage_with_payload(
                &zstd::encode_all(&vec![0u8; 1 << 20][..], 3).unwrap(),
            ),
            0x1000,
            "more than 0x1000 bytes",
        ),
        (
            deja_testkit::bzimage_with_payload(&gzip(&no_pvh)),
            max,
            "no XEN_ELFNOTE_PHYS32_ENTRY",
        ),
        (beyond, max, "is not inside the"),
        (deja_testkit::bzimage(&[0xf4]), max, "payload_length 0x0"),
    ];
    for (bytes, max, needle) in cases {
        let mut image = Image::detect("bz", bytes).unwrap();
        let err = match image.set_kernel_entry(KernelEntry::Pvh, max) {
            Ok(()) => panic!("{needle}: accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(needle), "{needle}: {err}");
        assert_eq!(image.format, ImageFormat::Linux, "unchanged on error");
    }
}

#[test]
fn malformed_vmlinux_files_are_refused_with_precise_messages() {
    let good = deja_testkit::vmlinux(&[0xf4; 16]);
    const PH0: usize = 64;
    const PH1: usize = 64 + 56;
    const NOTE: usize = 64 + 112;
    let with = |at: usize, v: &[u8]| patch(good.clone(), at, v);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (good[..40].to_vec(), "an ELF64 header needs 64"),
        (with(0, b"\x7fELG"), "not an ELF file"),
        (with(4, &[1]), "expected 2 (ELFCLASS64)"),
        (with(5, &[2]), "little endian"),
        (with(16, &[3, 0]), "ET_EXEC"),
        (with(18, &[3, 0]), "EM_X86_64"),
        (with(54, &[32, 0]), "e_phentsize"),
        (with(56, &[0xff, 0]), "extends past the end"),
        (with(32, &u64::MAX.to_le_bytes()), "extends past the end"),
        (
            with(PH0 + 32, &0x1000_0000u64.to_le_bytes()),
            "past the end of the file",
        ),
        (
            with(PH0 + 8, &u64::MAX.to_le_bytes()),
            "past the end of the file",
        ),
        (with(PH0 + 40, &4u64.to_le_bytes()), "larger than p_memsz"),
        (
            with(PH0 + 24, &(u64::MAX - 8).to_le_bytes()),
            "overflows 64 bits",
        ),
        (with(PH0, &[6]), "no PT_LOAD segment"),
        (with(NOTE + 4, &[0xff, 0xff]), "run past the segment's end"),
        (
            with(NOTE, &[0xff, 0xff, 0xff, 0xff]),
            "run past the segment's end",
        ),
        (with(NOTE + 4, &[2]), "2-byte descriptor"),
        (with(NOTE + 20, &[1]), "beyond the 4 GiB"),
        (with(NOTE + 8, &[17]), "no XEN_ELFNOTE_PHYS32_ENTRY"),
        (with(NOTE + 12, b"Xem"), "no XEN_ELFNOTE_PHYS32_ENTRY"),
        (with(PH1, &[0]), "no XEN_ELFNOTE_PHYS32_ENTRY"),
        (
            with(NOTE + 16, &[0x00, 0x20]),
            "in none of the loaded segments",
        ),
        // p_paddr in the start-info page, beyond RAM, in the VGA hole.
        (
            with(PH0 + 24, &0x1_0000u64.to_le_bytes()),
            "overlaps the PVH start info",
        ),
        (
            with(PH0 + 24, &0x1000_0000u64.to_le_bytes()),
            "not entirely in RAM",
        ),
        (with(PH0 + 24, &0xa_0000u64.to_le_bytes()), "VGA window"),
    ];
    for (bytes, needle) in cases {
        let mut m = machine_with(64 << 20, "");
        let err = load(&mut m, &pvh_image(bytes, None))
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
    // Overlapping segments: a program header table at the end of the file with the
    // PT_LOAD twice, then the PT_NOTE.
    let mut two = good.clone();
    let table = [&good[PH0..PH1], &good[PH0..PH1], &good[PH1..PH1 + 56]].concat();
    two[32..40].copy_from_slice(&(good.len() as u64).to_le_bytes());
    two[56..58].copy_from_slice(&3u16.to_le_bytes());
    two.extend_from_slice(&table);
    let mut m = machine_with(64 << 20, "");
    let err = load(&mut m, &pvh_image(two, None)).unwrap_err().to_string();
    assert!(err.contains("overlaps another segment"), "{err}");
    // An initrd that does not fit above the kernel.
    let mut m = machine_with(32 << 20, "");
    let err = load(&mut m, &pvh_image(good.clone(), Some(vec![1; 20 << 20])))
        .unwrap_err()
        .to_string();
    assert!(err.contains("initrd rd") && err.contains("--mem"), "{err}");
    // A 64-bit ELF without a PVH note is not taken for anything else.
    let err = Image::detect("k", with(NOTE + 8, &[17]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("without a PVH entry note"), "{err}");
    // 8-byte aligned notes (p_align 8) are read with 8-byte padding.
    let mut aligned = good;
    aligned[PH1 + 48..PH1 + 56].copy_from_slice(&8u64.to_le_bytes());
    let elf = super::elf::parse_elf64(&aligned).unwrap();
    assert_eq!(elf.notes.len(), 1);
    assert_eq!(
        (
            elf.notes[0].name,
            elf.notes[0].kind,
            elf.notes[0].desc.len()
        ),
        (&b"Xen"[..], 18, 8)
    );
}

#[test]
fn detection_tells_a_vmlinux_from_a_64_bit_multiboot_kernel() {
    // A 64-bit ELF with a multiboot header but no PVH note, malformed or not, is a
    // multiboot kernel, which the loader refuses with QEMU's message.
    let mut mb64 = deja_testkit::vmlinux(&[0xf4; 64]);
    mb64[64 + 112 + 8] = 17; // no PVH note
    let header = mb_header(0x0, &[]);
    mb64.extend_from_slice(&header);
    let malformed = patch(mb64.clone(), 56, &[0xff, 0]); // e_phnum past the file
    for bytes in [mb64, malformed] {
        let image = Image::detect("k", bytes).unwrap();
        assert_eq!(image.format, ImageFormat::Multiboot);
        let err = load(&mut machine(), &image).unwrap_err().to_string();
        assert!(err.contains("Cannot load x86-64 image"), "{err}");
    }
    // Without a multiboot header, a malformed ELF64 says what is wrong with it.
    let bad = patch(deja_testkit::vmlinux(&[0xf4]), 56, &[0xff, 0]);
    let err = Image::detect("k", bad).unwrap_err().to_string();
    assert!(err.contains("program header table"), "{err}");
}
