//! SMBIOS 2.8 (DMI) tables, where QEMU's firmware (SeaBIOS) leaves small ones: the 31-byte
//! entry point (`_SM_`, with the legacy `_DMI_` entry inside it) on a 16-byte boundary of
//! the F-segment, which operating systems scan (0xf0000..0x100000), and the structure table
//! right after it.
//!
//! The structures describe deja-pc: BIOS (type 0), system (1, manufacturer "deja"), chassis
//! (3), the one processor (4, its ID and brand from the machine's CPUID table), the memory
//! array, device and mapped ranges (16, 17, 19, from the memory layout), boot status (32)
//! and the end marker (127). Linux prints the system and BIOS strings at boot
//! (`DMI: deja deja-pc, BIOS ...`). Everything here is a function of the table revision, the
//! layout and the CPUID table, all of which a trace records, so a replay writes the same
//! bytes.

use crate::cpuid::CpuidTable;
use crate::memory::{FOUR_GIB, GuestRam, MemoryLayout};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

/// Where the entry point goes: the F-segment's first 16-byte boundary.
pub const ENTRY_ADDR: u64 = 0xf_0000;
/// End of the F-segment (the structure table must end below it).
pub const FSEG_END: u64 = 0x10_0000;
/// The entry point's length (SMBIOS 2.1 and later).
pub const ENTRY_LEN: usize = 0x1f;
/// Where the structure table starts: after the entry point, 16-byte aligned.
pub const TABLE_ADDR: u64 = ENTRY_ADDR + 0x20;
/// SMBIOS version 2.8, as SeaBIOS writes it for QEMU.
const VERSION: (u8, u8) = (2, 8);
/// The BIOS's release date in the type 0 structure (mm/dd/yyyy), fixed per table revision.
const RELEASE_DATE: &str = "12/08/2026";

/// The strings identifying the system, as DMI reports them.
pub const MANUFACTURER: &str = "deja";
/// The product name of the system (type 1).
pub const PRODUCT: &str = "deja-pc";

/// Failures building or writing the tables.
#[derive(Debug, Error)]
pub enum SmbiosError {
    /// The F-segment is not RAM in this layout.
    #[error("SMBIOS area {start:#x}..{end:#x} is not RAM in this memory layout")]
    NotRam {
        /// Start of the area.
        start: u64,
        /// End of the area.
        end: u64,
    },
    /// The tables do not fit the F-segment.
    #[error(
        "SMBIOS tables need {needed:#x} bytes from {start:#x}; the F-segment holds {available:#x}"
    )]
    TooLarge {
        /// Where they start.
        start: u64,
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// Guest memory refused the write.
    #[error("writing {len:#x} bytes of SMBIOS tables at {addr:#x} failed: {source}")]
    Write {
        /// Where.
        addr: u64,
        /// How much.
        len: usize,
        /// What vm-memory reported.
        source: vm_memory::GuestMemoryError,
    },
}

/// The encoded tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmbiosTables {
    /// The entry point, for [`ENTRY_ADDR`].
    pub entry: [u8; ENTRY_LEN],
    /// The structure table, for [`TABLE_ADDR`].
    pub table: Vec<u8>,
}

/// Where the tables went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmbiosLayout {
    /// The entry point.
    pub entry: u64,
    /// The structure table.
    pub table: u64,
    /// One past the last byte written.
    pub end: u64,
}

/// One structure: its formatted area (type, length and handle are added) and its strings,
/// which the formatted area refers to by 1-based number (0: no string).
fn structure(ty: u8, handle: u16, formatted: &[u8], strings: &[&str]) -> Vec<u8> {
    let mut out = vec![ty, (4 + formatted.len()) as u8];
    out.extend_from_slice(&handle.to_le_bytes());
    out.extend_from_slice(formatted);
    for s in strings {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }
    if strings.is_empty() {
        out.push(0);
    }
    out.push(0);
    out
}

/// Text from CPUID registers (little-endian bytes, in order) up to the first NUL, printable
/// ASCII only and trimmed: SMBIOS strings cannot hold a NUL, and empty ones are left out.
fn cpuid_text(regs: &[u32]) -> String {
    let bytes: Vec<u8> = regs.iter().flat_map(|r| r.to_le_bytes()).collect();
    bytes
        .iter()
        .take_while(|&&b| b != 0)
        .filter(|b| b.is_ascii_graphic() || **b == b' ')
        .map(|&b| b as char)
        .collect::<String>()
        .trim()
        .to_string()
}

/// A string's number among `strings` once non-empty ones are kept: pushes `text` and
/// returns its 1-based number, or 0 for an empty one.
fn add(strings: &mut Vec<String>, text: &str) -> u8 {
    if text.is_empty() {
        return 0;
    }
    strings.push(text.to_string());
    strings.len() as u8
}

/// Handles: the structure type in the high byte, an index in the low one (as QEMU's).
fn handle(ty: u8, index: u8) -> u16 {
    u16::from(ty) << 8 | u16::from(index)
}

/// Error information handle "not provided".
const NO_ERROR_INFO: u16 = 0xfffe;
/// Cache handle "no cache information".
const NO_CACHE: u16 = 0xffff;

fn bios(revision: u32) -> Vec<u8> {
    let mut f = vec![0u8; 0x18 - 4];
    f[0] = 1; // vendor
    f[1] = 2; // BIOS version
    f[2..4].copy_from_slice(&0xe800u16.to_le_bytes()); // starting segment, as SeaBIOS
    f[4] = 3; // release date
    f[5] = 0; // ROM size: 64 KiB
    f[6..14].copy_from_slice(&(1u64 << 3).to_le_bytes()); // characteristics not supported
    f[14] = 0;
    f[15] = 1 << 4; // extension byte 2: a virtual machine
    f[16] = revision as u8; // system BIOS major release: the table revision
    f[17] = 0;
    f[18] = 0xff; // no embedded controller firmware
    f[19] = 0xff;
    let version = format!("rev {revision}");
    structure(0, handle(0, 0), &f, &[MANUFACTURER, &version, RELEASE_DATE])
}

fn system(revision: u32) -> Vec<u8> {
    let mut f = vec![0u8; 0x1b - 4];
    f[0] = 1; // manufacturer
    f[1] = 2; // product name
    f[2] = 3; // version
    f[3] = 0; // no serial number
    // f[4..20]: UUID all zeros ("not present"): a run has no identity beyond its trace.
    f[20] = 0x06; // wake-up type: power switch
    f[21] = 0; // no SKU
    f[22] = 4; // family
    let version = format!("rev {revision}");
    structure(
        1,
        handle(1, 0),
        &f,
        &[MANUFACTURER, PRODUCT, &version, MANUFACTURER],
    )
}

fn chassis() -> Vec<u8> {
    let mut f = vec![0u8; 0x16 - 4];
    f[0] = 1; // manufacturer
    f[1] = 0x01; // type: other
    f[5] = 0x03; // boot-up state: safe
    f[6] = 0x03; // power supply state: safe
    f[7] = 0x03; // thermal state: safe
    f[8] = 0x02; // security status: unknown
    structure(3, handle(3, 0), &f, &[MANUFACTURER])
}

fn processor(cpuid: &CpuidTable) -> Vec<u8> {
    let mut strings = Vec::new();
    let socket = add(&mut strings, "CPU 0");
    let l0 = cpuid.lookup(0, 0);
    let vendor = add(&mut strings, &cpuid_text(&[l0[1], l0[3], l0[2]]));
    let brand_leaves: Vec<u32> = (0x8000_0002..=0x8000_0004u32)
        .flat_map(|f| cpuid.lookup(f, 0))
        .collect();
    let has_brand = cpuid.lookup(0x8000_0000, 0)[0] >= 0x8000_0004;
    let version = if has_brand {
        add(&mut strings, &cpuid_text(&brand_leaves))
    } else {
        0
    };
    let l1 = cpuid.lookup(1, 0);
    let long_mode = cpuid.lookup(0x8000_0001, 0)[3] & (1 << 29) != 0;
    let mut f = vec![0u8; 0x2a - 4];
    f[0] = socket;
    f[1] = 0x03; // central processor
    f[2] = 0x01; // family: other (see family 2)
    f[3] = vendor;
    f[4..8].copy_from_slice(&l1[0].to_le_bytes()); // CPUID 1 EAX: the signature
    f[8..12].copy_from_slice(&l1[3].to_le_bytes()); // CPUID 1 EDX: the feature flags
    f[12] = version;
    f[13] = 0; // voltage: unknown
    // External clock, maximum and current speed: 0, unknown (deja's clock is not a CPU's).
    f[20] = 0x41; // socket populated, CPU enabled
    f[21] = 0x01; // upgrade: other
    for at in [22, 24, 26] {
        f[at..at + 2].copy_from_slice(&NO_CACHE.to_le_bytes());
    }
    f[31] = 1; // cores
    f[32] = 1; // cores enabled
    f[33] = 1; // threads
    let characteristics: u16 = if long_mode { 1 << 2 } else { 1 << 1 };
    f[34..36].copy_from_slice(&characteristics.to_le_bytes());
    f[36..38].copy_from_slice(&1u16.to_le_bytes()); // family 2: other
    let strs: Vec<&str> = strings.iter().map(String::as_str).collect();
    structure(4, handle(4, 0), &f, &strs)
}

fn memory_array(ram: u64) -> Vec<u8> {
    let kib = ram >> 10;
    let mut f = vec![0u8; 0x17 - 4];
    f[0] = 0x01; // location: other
    f[1] = 0x03; // use: system memory
    f[2] = 0x03; // error correction: none
    if kib < 0x8000_0000 {
        f[3..7].copy_from_slice(&(kib as u32).to_le_bytes());
    } else {
        f[3..7].copy_from_slice(&0x8000_0000u32.to_le_bytes());
        f[11..19].copy_from_slice(&ram.to_le_bytes());
    }
    f[7..9].copy_from_slice(&NO_ERROR_INFO.to_le_bytes());
    f[9..11].copy_from_slice(&1u16.to_le_bytes()); // one device
    structure(16, handle(16, 0), &f, &[])
}

fn memory_device(ram: u64) -> Vec<u8> {
    let mut f = vec![0u8; 0x28 - 4];
    f[0..2].copy_from_slice(&handle(16, 0).to_le_bytes());
    f[2..4].copy_from_slice(&NO_ERROR_INFO.to_le_bytes());
    f[4..6].copy_from_slice(&64u16.to_le_bytes()); // total width
    f[6..8].copy_from_slice(&64u16.to_le_bytes()); // data width
    let mib = ram >> 20;
    let size: u16 = if !ram.is_multiple_of(1 << 20) && ram >> 10 < 0x8000 {
        0x8000 | (ram >> 10) as u16 // in KiB
    } else if mib < 0x7fff {
        mib as u16
    } else {
        f[24..28].copy_from_slice(&(mib.min(u64::from(u32::MAX >> 1)) as u32).to_le_bytes());
        0x7fff // see the extended size
    };
    f[8..10].copy_from_slice(&size.to_le_bytes());
    f[10] = 0x01; // form factor: other
    f[12] = 1; // device locator
    f[14] = 0x07; // memory type: RAM
    f[15..17].copy_from_slice(&0x0002u16.to_le_bytes()); // type detail: other
    f[19] = 2; // manufacturer
    structure(17, handle(17, 0), &f, &["RAM", MANUFACTURER])
}

/// A mapped address range `start..end` (bytes), by KiB when it fits, else in the extended
/// fields.
fn mapped_range(index: u8, start: u64, end: u64) -> Vec<u8> {
    let mut f = vec![0u8; 0x1f - 4];
    let (start_kib, last_kib) = (start >> 10, (end >> 10).saturating_sub(1));
    if last_kib < 0xffff_ffff {
        f[0..4].copy_from_slice(&(start_kib as u32).to_le_bytes());
        f[4..8].copy_from_slice(&(last_kib as u32).to_le_bytes());
    } else {
        f[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        f[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        f[11..19].copy_from_slice(&start.to_le_bytes());
        f[19..27].copy_from_slice(&end.saturating_sub(1).to_le_bytes());
    }
    f[8..10].copy_from_slice(&handle(16, 0).to_le_bytes());
    f[10] = 1; // partition width
    structure(19, handle(19, index), &f, &[])
}

fn boot_information() -> Vec<u8> {
    // Six reserved bytes, then the status: no errors detected.
    structure(32, handle(32, 0), &[0; 7], &[])
}

/// The tables of table revision `revision` for a machine with `layout` and `cpuid`.
pub fn smbios_tables(
    revision: u32,
    layout: &MemoryLayout,
    cpuid: &CpuidTable,
) -> Result<SmbiosTables, SmbiosError> {
    let mut structures = vec![
        bios(revision),
        system(revision),
        chassis(),
        processor(cpuid),
        memory_array(layout.ram_size),
        memory_device(layout.ram_size),
        mapped_range(0, 0, layout.below_4g),
    ];
    if layout.above_4g > 0 {
        structures.push(mapped_range(1, FOUR_GIB, FOUR_GIB + layout.above_4g));
    }
    structures.push(boot_information());
    structures.push(structure(127, handle(127, 0), &[], &[]));
    let table = structures.concat();
    let available = FSEG_END - TABLE_ADDR;
    let table_len = u16::try_from(table.len())
        .ok()
        .filter(|&l| u64::from(l) <= available)
        .ok_or(SmbiosError::TooLarge {
            start: TABLE_ADDR,
            needed: table.len() as u64,
            available,
        })?;
    let max_size = structures.iter().map(Vec::len).max().unwrap_or(0) as u16;

    let mut e = [0u8; ENTRY_LEN];
    e[0..4].copy_from_slice(b"_SM_");
    e[5] = ENTRY_LEN as u8;
    e[6] = VERSION.0;
    e[7] = VERSION.1;
    e[8..10].copy_from_slice(&max_size.to_le_bytes());
    e[10] = 0; // entry point revision: 2.1
    e[16..21].copy_from_slice(b"_DMI_");
    e[22..24].copy_from_slice(&table_len.to_le_bytes());
    e[24..28].copy_from_slice(&(TABLE_ADDR as u32).to_le_bytes());
    e[28..30].copy_from_slice(&(structures.len() as u16).to_le_bytes());
    e[30] = VERSION.0 << 4 | VERSION.1; // BCD revision
    e[21] = checksum(&e[16..]);
    e[4] = checksum(&e);
    Ok(SmbiosTables { entry: e, table })
}

/// The byte that makes `bytes` sum to zero (with itself at zero).
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)))
}

/// Writes [`smbios_tables`] into the F-segment.
pub fn install_smbios(
    mem: &GuestRam,
    layout: &MemoryLayout,
    revision: u32,
    cpuid: &CpuidTable,
) -> Result<SmbiosLayout, SmbiosError> {
    if !layout.is_ram(ENTRY_ADDR) || !layout.is_ram(FSEG_END - 1) {
        return Err(SmbiosError::NotRam {
            start: ENTRY_ADDR,
            end: FSEG_END,
        });
    }
    let t = smbios_tables(revision, layout, cpuid)?;
    for (addr, bytes) in [(ENTRY_ADDR, &t.entry[..]), (TABLE_ADDR, &t.table[..])] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| SmbiosError::Write {
                addr,
                len: bytes.len(),
                source,
            })?;
    }
    Ok(SmbiosLayout {
        entry: ENTRY_ADDR,
        table: TABLE_ADDR,
        end: TABLE_ADDR + t.table.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    /// One parsed structure: type, handle, formatted area (header included), strings.
    #[derive(Debug)]
    struct Parsed {
        ty: u8,
        handle: u16,
        formatted: Vec<u8>,
        strings: Vec<String>,
    }

    impl Parsed {
        /// The string a formatted-area byte refers to ("" for 0).
        fn string(&self, at: usize) -> &str {
            match self.formatted[at] {
                0 => "",
                n => &self.strings[usize::from(n) - 1],
            }
        }
    }

    /// Walks a structure table as an OS does: formatted area by its length, then strings up
    /// to a double NUL.
    fn parse(table: &[u8]) -> Vec<Parsed> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < table.len() {
            let len = usize::from(table[at + 1]);
            assert!(len >= 4, "structure at {at} of length {len}");
            let formatted = table[at..at + len].to_vec();
            let mut s = at + len;
            let mut strings = Vec::new();
            if table[s] == 0 {
                assert_eq!(table[s + 1], 0, "no strings: two NULs");
                s += 2;
            } else {
                while table[s] != 0 {
                    let end = s + table[s..].iter().position(|&b| b == 0).unwrap();
                    strings.push(String::from_utf8(table[s..end].to_vec()).unwrap());
                    s = end + 1;
                }
                s += 1;
            }
            out.push(Parsed {
                ty: formatted[0],
                handle: u16_at(&formatted, 2),
                formatted,
                strings,
            });
            at = s;
        }
        assert_eq!(at, table.len(), "the table ends with its last structure");
        out
    }

    fn tables(ram: u64) -> (SmbiosTables, Vec<Parsed>) {
        let layout = MemoryLayout::pc(ram).unwrap();
        let t = smbios_tables(2, &layout, &CpuidTable::deja_default()).unwrap();
        let parsed = parse(&t.table);
        (t, parsed)
    }

    #[test]
    fn entry_point_checksums_and_fields_describe_the_table() {
        let (t, parsed) = tables(512 << 20);
        let e = &t.entry;
        assert_eq!(&e[0..4], b"_SM_");
        assert_eq!(sum(&e[..usize::from(e[5])]), 0, "entry point checksum");
        assert_eq!(e[5], 0x1f);
        assert_eq!((e[6], e[7]), (2, 8));
        assert_eq!(&e[16..21], b"_DMI_");
        assert_eq!(sum(&e[16..31]), 0, "intermediate checksum");
        assert_eq!(usize::from(u16_at(e, 22)), t.table.len());
        assert_eq!(u64::from(u32_at(e, 24)), TABLE_ADDR);
        assert_eq!(usize::from(u16_at(e, 28)), parsed.len());
        assert_eq!(e[30], 0x28);
        // The largest structure, strings included.
        let mut sizes = Vec::new();
        let mut at = 0;
        for p in &parsed {
            let len = p.formatted.len()
                + p.strings.iter().map(|s| s.len() + 1).sum::<usize>()
                + if p.strings.is_empty() { 2 } else { 1 };
            sizes.push(len);
            at += len;
        }
        assert_eq!(at, t.table.len());
        assert_eq!(usize::from(u16_at(e, 8)), sizes.into_iter().max().unwrap());
        assert!(TABLE_ADDR + t.table.len() as u64 <= FSEG_END);
        assert_eq!(ENTRY_ADDR % 16, 0);
    }

    #[test]
    fn structures_have_their_types_lengths_handles_and_strings() {
        let (_, parsed) = tables(512 << 20);
        let types: Vec<(u8, usize)> = parsed.iter().map(|p| (p.ty, p.formatted.len())).collect();
        assert_eq!(
            types,
            [
                (0, 0x18),
                (1, 0x1b),
                (3, 0x16),
                (4, 0x2a),
                (16, 0x17),
                (17, 0x28),
                (19, 0x1f),
                (32, 0x0b),
                (127, 4)
            ]
        );
        let mut handles: Vec<u16> = parsed.iter().map(|p| p.handle).collect();
        handles.sort_unstable();
        handles.dedup();
        assert_eq!(handles.len(), parsed.len(), "handles are unique");
        let bios = &parsed[0];
        assert_eq!(
            (bios.string(4), bios.string(5), bios.string(8)),
            ("deja", "rev 2", RELEASE_DATE)
        );
        assert_eq!(bios.formatted[0x14], 2, "BIOS major release: the revision");
        let sys = &parsed[1];
        assert_eq!((sys.string(4), sys.string(5)), ("deja", "deja-pc"));
        assert_eq!(sys.string(7), "", "no serial number");
        let cpu = &parsed[3];
        assert_eq!(cpu.string(4), "CPU 0");
        assert_eq!(cpu.string(7), "GenuineIntel");
        assert_eq!(cpu.string(0x10), "deja virtual x86 CPU (bt and kvm)");
        let l1 = CpuidTable::deja_default().lookup(1, 0);
        assert_eq!(
            u32_at(&cpu.formatted, 8),
            l1[0],
            "processor ID: CPUID 1 EAX"
        );
        assert_eq!(
            u32_at(&cpu.formatted, 12),
            l1[3],
            "processor ID: CPUID 1 EDX"
        );
        assert_eq!(cpu.formatted[0x18], 0x41);
        assert_eq!(u16_at(&cpu.formatted, 0x26), 1 << 2, "64-bit capable");
        // Memory: 512 MiB in one device of one array, one range below 4 GiB.
        assert_eq!(u32_at(&parsed[4].formatted, 7), 512 << 10);
        assert_eq!(u16_at(&parsed[5].formatted, 4), parsed[4].handle);
        assert_eq!(u16_at(&parsed[5].formatted, 0x0c), 512);
        assert_eq!(parsed[5].string(0x10), "RAM");
        assert_eq!(u32_at(&parsed[6].formatted, 4), 0);
        assert_eq!(u32_at(&parsed[6].formatted, 8), (512 << 10) - 1);
        assert_eq!(u16_at(&parsed[6].formatted, 0x0c), parsed[4].handle);
        assert_eq!(parsed[7].formatted[0x0a], 0, "boot: no errors");
    }

    #[test]
    fn memory_above_4g_gets_its_own_range_and_large_sizes_the_extended_fields() {
        let (_, parsed) = tables(40 << 30);
        let ranges: Vec<(u32, u32)> = parsed
            .iter()
            .filter(|p| p.ty == 19)
            .map(|p| (u32_at(&p.formatted, 4), u32_at(&p.formatted, 8)))
            .collect();
        assert_eq!(
            ranges,
            [
                (0, (0xc000_0000u64 >> 10) as u32 - 1),
                (
                    (FOUR_GIB >> 10) as u32,
                    ((FOUR_GIB + (40 << 30) - 0xc000_0000) >> 10) as u32 - 1
                )
            ]
        );
        let dev = parsed.iter().find(|p| p.ty == 17).unwrap();
        assert_eq!(
            u16_at(&dev.formatted, 0x0c),
            0x7fff,
            "size in the extended field"
        );
        assert_eq!(u32_at(&dev.formatted, 0x1c), 40 << 10);
        // A size that is not whole MiB is given in KiB.
        let (_, parsed) = tables((3 << 20) + 4096);
        let dev = parsed.iter().find(|p| p.ty == 17).unwrap();
        assert_eq!(u16_at(&dev.formatted, 0x0c), 0x8000 | ((3 << 10) + 4));
        // Extended addresses past 4 TiB of KiB.
        let r = mapped_range(0, 1 << 42, (1 << 42) + (1 << 30));
        let p = &parse(&r)[0];
        assert_eq!(u32_at(&p.formatted, 4), u32::MAX);
        assert_eq!(
            u64::from_le_bytes(p.formatted[0x0f..0x17].try_into().unwrap()),
            1 << 42
        );
        assert_eq!(
            u64::from_le_bytes(p.formatted[0x17..0x1f].try_into().unwrap()),
            (1 << 42) + (1 << 30) - 1
        );
    }

    #[test]
    fn cpuid_text_keeps_printable_ascii_up_to_the_first_nul() {
        let regs = [
            u32::from_le_bytes(*b" ab\x01"),
            u32::from_le_bytes(*b"c \0z"),
        ];
        assert_eq!(cpuid_text(&regs), "abc");
        // A table without a brand string gives a processor without a version string.
        let mut table = CpuidTable::deja_default();
        table.entries.retain(|e| e.function < 0x8000_0002);
        for e in &mut table.entries {
            if e.function == 0x8000_0000 {
                e.eax = 0x8000_0001;
            }
        }
        let layout = MemoryLayout::pc(16 << 20).unwrap();
        let t = smbios_tables(2, &layout, &table).unwrap();
        let cpu = parse(&t.table).into_iter().find(|p| p.ty == 4).unwrap();
        assert_eq!(cpu.string(0x10), "");
        assert_eq!(cpu.strings, ["CPU 0", "GenuineIntel"]);
    }

    #[test]
    fn install_writes_both_parts_and_refuses_a_layout_without_the_f_segment() {
        let layout = MemoryLayout::pc(16 << 20).unwrap();
        let mem = layout.allocate().unwrap();
        let cpuid = CpuidTable::deja_default();
        let l = install_smbios(&mem, &layout, 2, &cpuid).unwrap();
        let t = smbios_tables(2, &layout, &cpuid).unwrap();
        let mut got = vec![0u8; (l.end - l.entry) as usize];
        mem.read_slice(&mut got, GuestAddress(l.entry)).unwrap();
        assert_eq!(&got[..ENTRY_LEN], &t.entry[..]);
        assert_eq!(&got[(TABLE_ADDR - ENTRY_ADDR) as usize..], &t.table[..]);
        let mut no_fseg = layout.clone();
        no_fseg.ranges.retain(|r| r.start == 0);
        assert!(matches!(
            install_smbios(&mem, &no_fseg, 2, &cpuid),
            Err(SmbiosError::NotRam { .. })
        ));
    }
}
