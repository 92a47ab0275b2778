//! Firmware ROMs, as QEMU's `-bios` maps them: the whole ROM read-only so that it ends at
//! 4 GiB, and its last 128 KiB (the whole ROM if smaller) aliased so that it ends at 1 MiB
//! (`0xe0000..0x100000` for a ROM of 128 KiB or more; QEMU's "isa-bios"). The CPU starts
//! in the RESET state, at the reset vector F000:FFF0 with CS.base = 0xffff0000, i.e. at
//! physical 0xfffffff0 — the ROM's last 16 bytes.
//!
//! The alias is a copy in RAM (`0xc0000..0x100000` is RAM in deja-pc), so unlike on QEMU it
//! is writable; firmware that wants to detect shadowing must not rely on it being read-only.

use super::{Image, LoadError, ensure_ram, write};
use crate::cpu::CpuState;
use crate::machine::Machine;
use crate::memory::{FOUR_GIB, HIGH_MEMORY_START};

/// A ROM's size must be a multiple of this (QEMU's rule for `-bios`).
pub const ROM_SIZE_GRANULE: u64 = 64 << 10;
/// Largest ROM deja maps (it then occupies `0xff000000..0x100000000`, clear of the IOAPIC
/// at 0xfec00000 and the LAPIC at 0xfee00000).
pub const MAX_ROM_SIZE: u64 = 16 << 20;
/// How much of the ROM's end is aliased below 1 MiB.
pub const LOW_ALIAS_MAX: u64 = 128 << 10;

/// Where a ROM of `size` bytes is mapped: it ends at 4 GiB.
pub fn rom_base(size: u64) -> u64 {
    FOUR_GIB - size
}

/// Maps the ROM and its low alias; returns the RESET state.
pub(crate) fn load(machine: &mut Machine, image: &Image) -> Result<CpuState, LoadError> {
    let size = image.bytes.len() as u64;
    if size == 0 || !size.is_multiple_of(ROM_SIZE_GRANULE) || size > MAX_ROM_SIZE {
        return Err(LoadError::RomSize {
            name: image.name.clone(),
            size,
            max: MAX_ROM_SIZE,
        });
    }
    let alias_len = size.min(LOW_ALIAS_MAX);
    let alias_start = HIGH_MEMORY_START - alias_len;
    ensure_ram(
        &machine.layout,
        || format!("the low alias of firmware {}", image.name),
        alias_start,
        HIGH_MEMORY_START,
    )?;
    machine.add_rom(rom_base(size), &image.bytes)?;
    write_alias(machine, image)
}

/// A machine reset: the ROM is still mapped (read-only, unchanged); its low alias, a
/// writable copy in RAM, is written again as at boot. Returns the RESET state.
pub(crate) fn reload(machine: &mut Machine, image: &Image) -> Result<CpuState, LoadError> {
    let size = image.bytes.len() as u64;
    if !machine
        .layout
        .rom
        .iter()
        .any(|r| r.start == rom_base(size) && r.len == size)
    {
        return Err(LoadError::GuestWrite {
            addr: rom_base(size),
            len: size,
            detail: format!("firmware {} is not mapped there to restart", image.name),
        });
    }
    write_alias(machine, image)
}

fn write_alias(machine: &mut Machine, image: &Image) -> Result<CpuState, LoadError> {
    let size = image.bytes.len() as u64;
    let alias_len = size.min(LOW_ALIAS_MAX);
    write(
        machine,
        HIGH_MEMORY_START - alias_len,
        &image.bytes[(size - alias_len) as usize..],
    )?;
    Ok(CpuState::reset())
}
