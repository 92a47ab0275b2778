//! Guest physical memory laid out as QEMU's `pc` machine lays it out.
//!
//! RAM starts at 0. The legacy VGA window `0xa0000..0xc0000` is a hole (it reads as all
//! ones, as an absent VGA card does). `0xc0000..0x100000` (option ROMs and the BIOS area) is
//! RAM, so firmware tables and a `-bios` alias can live there. RAM continues up to the start
//! of the 32-bit PCI hole; what does not fit below 4 GiB is placed at 4 GiB and above.

use thiserror::Error;
use vm_memory::GuestAddress;

/// Guest memory as every engine and device sees it. Each region carries a dirty-page bitmap
/// that every write through `vm_memory` marks (device DMA, loaders, the page walker's
/// accessed/dirty bits, checkpoint restores); engines that write through host pointers mark
/// it themselves ([`crate::Machine::mark_dirty`]). Incremental checkpoints and digests read
/// it instead of scanning all of RAM.
pub type GuestRam = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// Start of the legacy VGA window that is not backed by RAM.
pub const VGA_HOLE_START: u64 = 0xa_0000;
/// End of the legacy VGA window.
pub const VGA_HOLE_END: u64 = 0xc_0000;
/// Start of high memory (1 MiB).
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// Start of the 32-bit PCI hole when RAM does not reach it (QEMU pc, gigabyte aligned).
pub const PCI_HOLE_START: u64 = 0xc000_0000;
/// RAM sizes at or above this leave only `PCI_HOLE_START` bytes below 4 GiB (as QEMU pc).
pub const LOWMEM_SPLIT_THRESHOLD: u64 = 0xe000_0000;
/// 4 GiB: where RAM that does not fit below the PCI hole continues.
pub const FOUR_GIB: u64 = 0x1_0000_0000;
/// Smallest RAM size deja accepts: enough for the low 1 MiB and a little above it.
pub const MIN_RAM: u64 = 2 << 20;
/// Largest RAM size deja accepts.
pub const MAX_RAM: u64 = 1 << 40;
/// The default RAM size, as QEMU's `-m` default rounded up.
pub const DEFAULT_RAM: u64 = 256 << 20;

/// Failures while laying out or allocating guest memory.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// The requested size is outside what deja supports.
    #[error("guest memory size {size:#x} bytes is out of range ({MIN_RAM:#x}..={MAX_RAM:#x})")]
    SizeOutOfRange {
        /// The size asked for.
        size: u64,
    },
    /// The size is not a whole number of 4 KiB pages.
    #[error("guest memory size {size:#x} is not a multiple of 4 KiB")]
    Unaligned {
        /// The size asked for.
        size: u64,
    },
    /// The host refused the mapping.
    #[error("allocating {size:#x} bytes of guest memory failed: {source}")]
    Allocation {
        /// The size asked for.
        size: u64,
        /// What vm-memory reported.
        source: vm_memory::mmap::FromRangesError,
    },
    /// A size string such as `256M` could not be parsed.
    #[error(
        "cannot parse memory size {text:?}: expected a number with an optional K, M, G or T suffix"
    )]
    BadSizeText {
        /// The text given.
        text: String,
    },
}

/// One RAM range of the layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// First guest-physical address of the range.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

impl RamRange {
    /// One past the last address of the range.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// Where RAM goes for a given size: below 1 MiB, up to the PCI hole, above 4 GiB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLayout {
    /// Total RAM in bytes (as `--mem` asked).
    pub ram_size: u64,
    /// The RAM ranges, ascending and disjoint.
    pub ranges: Vec<RamRange>,
    /// RAM bytes below 4 GiB (what CMOS and fw_cfg report as low memory).
    pub below_4g: u64,
    /// RAM bytes at and above 4 GiB.
    pub above_4g: u64,
    /// Read-only memory ranges (firmware ROMs, added by [`crate::Machine::add_rom`]),
    /// ascending and disjoint, never overlapping `ranges`. They are regions of the guest
    /// memory like RAM, but engines must map them read-only: kvm with a `KVM_MEM_READONLY`
    /// slot (guest writes then exit as MMIO and are dropped), bt by ignoring the writes.
    pub rom: Vec<RamRange>,
}

impl MemoryLayout {
    /// Computes the pc layout for `ram_size` bytes of RAM.
    pub fn pc(ram_size: u64) -> Result<Self, MemoryError> {
        if !(MIN_RAM..=MAX_RAM).contains(&ram_size) {
            return Err(MemoryError::SizeOutOfRange { size: ram_size });
        }
        if !ram_size.is_multiple_of(4096) {
            return Err(MemoryError::Unaligned { size: ram_size });
        }
        let below_4g = if ram_size >= LOWMEM_SPLIT_THRESHOLD {
            PCI_HOLE_START
        } else {
            ram_size
        };
        let above_4g = ram_size - below_4g;
        let mut ranges = vec![
            RamRange {
                start: 0,
                len: VGA_HOLE_START,
            },
            RamRange {
                start: VGA_HOLE_END,
                len: below_4g - VGA_HOLE_END,
            },
        ];
        if above_4g > 0 {
            ranges.push(RamRange {
                start: FOUR_GIB,
                len: above_4g,
            });
        }
        Ok(Self {
            ram_size,
            ranges,
            below_4g,
            above_4g,
            rom: Vec::new(),
        })
    }

    /// Whether `addr` is backed by RAM.
    pub fn is_ram(&self, addr: u64) -> bool {
        self.ranges
            .iter()
            .any(|r| (r.start..r.end()).contains(&addr))
    }

    /// Whether `addr` is inside a read-only range (see [`MemoryLayout::rom`]).
    pub fn is_rom(&self, addr: u64) -> bool {
        self.rom.iter().any(|r| (r.start..r.end()).contains(&addr))
    }

    /// Allocates anonymous host memory for every RAM range (ROMs are added later, by
    /// [`crate::Machine::add_rom`]).
    pub fn allocate(&self) -> Result<GuestRam, MemoryError> {
        let ranges: Vec<(GuestAddress, usize)> = self
            .ranges
            .iter()
            .map(|r| (GuestAddress(r.start), r.len as usize))
            .collect();
        GuestRam::from_ranges(&ranges).map_err(|source| MemoryError::Allocation {
            size: self.ram_size,
            source,
        })
    }
}

/// Parses sizes as users write them for `--mem`: `256M`, `1G`, `65536K`, or plain bytes.
pub fn parse_size(text: &str) -> Result<u64, MemoryError> {
    let bad = || MemoryError::BadSizeText {
        text: text.to_string(),
    };
    let t = text.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let value: u64 = digits.parse().map_err(|_| bad())?;
    value.checked_mul(1u64 << shift).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn small_ram_has_the_vga_hole_and_nothing_above_4g() {
        let l = MemoryLayout::pc(256 << 20).unwrap();
        assert_eq!(
            l.ranges,
            vec![
                RamRange {
                    start: 0,
                    len: 0xa0000
                },
                RamRange {
                    start: 0xc0000,
                    len: (256 << 20) - 0xc0000
                },
            ]
        );
        assert!(!l.is_ram(0xb8000));
        assert!(l.is_ram(0xf0000));
        assert_eq!(l.above_4g, 0);
    }

    #[test]
    fn large_ram_splits_around_the_pci_hole() {
        let l = MemoryLayout::pc(4 << 30).unwrap();
        assert_eq!(l.below_4g, 0xc000_0000);
        assert_eq!(l.above_4g, (4 << 30) - 0xc000_0000);
        assert_eq!(l.ranges[2].start, FOUR_GIB);
        assert!(!l.is_ram(0xfee0_0000));
    }

    #[test]
    fn just_below_the_threshold_stays_below_4g() {
        let l = MemoryLayout::pc(LOWMEM_SPLIT_THRESHOLD - 4096).unwrap();
        assert_eq!(l.above_4g, 0);
    }

    #[test]
    fn bad_sizes_are_rejected() {
        assert!(matches!(
            MemoryLayout::pc(1 << 20),
            Err(MemoryError::SizeOutOfRange { .. })
        ));
        assert!(matches!(
            MemoryLayout::pc((8 << 20) + 1),
            Err(MemoryError::Unaligned { .. })
        ));
    }

    #[test]
    fn parse_size_understands_suffixes() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn allocation_matches_layout() {
        let l = MemoryLayout::pc(16 << 20).unwrap();
        let mem = l.allocate().unwrap();
        assert_eq!(mem.num_regions(), 2);
        assert!(mem.address_in_range(GuestAddress(0x9ffff)));
        assert!(!mem.address_in_range(GuestAddress(0xa0000)));
    }
}

/// Guest memory as a device's DMA sees it: the rules of CPU stores apply, so ROM reads
/// back its bytes but a write into it is dropped, and addresses that are neither RAM nor
/// ROM fail. (A device handed the raw [`GuestRam`] would write through ROM.)
#[derive(Clone, Copy)]
pub struct DmaMemory<'a> {
    mem: &'a GuestRam,
    rom: &'a [RamRange],
}

/// A DMA access reached guest-physical addresses that are neither RAM nor ROM.
#[derive(Debug, Error)]
#[error("DMA of {len:#x} bytes at {addr:#x} reaches memory that is neither RAM nor ROM")]
pub struct DmaError {
    /// First guest-physical address of the access.
    pub addr: u64,
    /// Its length in bytes.
    pub len: u64,
}

impl<'a> DmaMemory<'a> {
    /// DMA into `mem`, with `rom` the read-only ranges ([`MemoryLayout::rom`]).
    pub fn new(mem: &'a GuestRam, rom: &'a [RamRange]) -> Self {
        Self { mem, rom }
    }

    /// Reads `buf.len()` bytes at `addr` (RAM or ROM).
    pub fn read(&self, buf: &mut [u8], addr: u64) -> Result<(), DmaError> {
        use vm_memory::Bytes;
        let len = buf.len() as u64;
        let err = || DmaError { addr, len };
        addr.checked_add(len).ok_or_else(err)?;
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| err())
    }

    /// Writes `data` at `addr`: the parts in RAM are written, the parts in ROM dropped.
    pub fn write(&self, data: &[u8], addr: u64) -> Result<(), DmaError> {
        use vm_memory::Bytes;
        let err = || DmaError {
            addr,
            len: data.len() as u64,
        };
        addr.checked_add(data.len() as u64).ok_or_else(err)?;
        let mut done = 0usize;
        while done < data.len() {
            let at = addr + done as u64;
            let rom = self.rom.iter().find(|r| at >= r.start && at < r.end());
            // The run up to the next ROM boundary (into or out of ROM).
            let boundary = match rom {
                Some(r) => r.end(),
                None => self
                    .rom
                    .iter()
                    .filter(|r| r.start > at)
                    .map(|r| r.start)
                    .min()
                    .unwrap_or(u64::MAX),
            };
            let n = (data.len() - done).min(usize::try_from(boundary - at).unwrap_or(usize::MAX));
            if rom.is_none() {
                self.mem
                    .write_slice(&data[done..done + n], GuestAddress(at))
                    .map_err(|_| err())?;
            }
            done += n;
        }
        Ok(())
    }
}
