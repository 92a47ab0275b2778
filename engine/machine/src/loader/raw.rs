//! Raw images: bytes copied to an address and entered in real, protected or long mode.
//!
//! Real mode: CS:IP with CS.base + IP = entry — CS = 0 and IP = entry below 64 KiB;
//! CS = entry >> 4 and IP = entry & 0xf up to 1 MiB; CS = 0xffff above (the HMA, A20 on).
//! DS, ES, FS and GS equal CS. The stack sits right below the image: SS:SP addresses the
//! 64 KiB ending at the image's first byte (rounded down to 16), so SS = 0 and SP =
//! load_addr for an image in the first 64 KiB (a boot sector at 0x7c00 gets SS:SP =
//! 0:7c00, as a BIOS leaves it). With less than 4 KiB below the image, SS:SP = 0:0 (the
//! first push lands at 0xfffe) and the guest must set its own stack. CR0 = ET (caches on,
//! as firmware leaves it), everything else as after RESET. No memory besides the image is
//! written.
//!
//! Protected and long mode: see [`super::boot`] for the GDT, page tables and stack.

use super::boot::{self, GDT_RESERVED, PAGE_TABLES_RESERVED, Reserved};
use super::{EntryMode, Image, LoadError, describe_ram, ensure_ram, write};
use crate::cpu::{CpuState, Segment, gpr, seg};
use crate::machine::Machine;

/// Highest real-mode entry point: CS = 0xffff, IP = 0xffff (A20 enabled).
pub const MAX_REAL_MODE_ENTRY: u64 = 0xffff0 + 0xffff;

/// Loads a raw image; see the module documentation for the state it starts in.
pub(crate) fn load(
    machine: &mut Machine,
    image: &Image,
    load_addr: u64,
    entry: u64,
    mode: EntryMode,
) -> Result<CpuState, LoadError> {
    let what = || format!("image {}", image.name);
    let len = image.bytes.len() as u64;
    let end = load_addr
        .checked_add(len)
        .ok_or_else(|| LoadError::NotInRam {
            what: what(),
            start: load_addr,
            end: u64::MAX,
            ram: describe_ram(&machine.layout),
            hint: "the range wraps past the end of the address space".into(),
        })?;
    ensure_ram(&machine.layout, what, load_addr, end)?;
    if !machine.layout.is_ram(entry) {
        return Err(LoadError::EntryNotInRam {
            name: image.name.clone(),
            entry,
            ram: describe_ram(&machine.layout),
        });
    }
    let (reserved, format): (&[Reserved], &'static str) = match mode {
        EntryMode::Real => (&[], "raw real-mode"),
        EntryMode::Protected => (&[GDT_RESERVED], "raw protected-mode"),
        EntryMode::Long => (&[GDT_RESERVED, PAGE_TABLES_RESERVED], "raw long-mode"),
    };
    boot::check_overlap(&what(), load_addr, end, reserved, format)?;
    let state = match mode {
        EntryMode::Real => real_state(load_addr, entry)?,
        EntryMode::Protected => {
            let stack =
                boot::pick_stack(&machine.layout, &image.name, &[(load_addr, end)], reserved)?;
            let gdtr = boot::write_gdt(machine, &boot::GDT_PROTECTED)?;
            boot::protected_state(entry, gdtr, stack)
        }
        EntryMode::Long => {
            let stack =
                boot::pick_stack(&machine.layout, &image.name, &[(load_addr, end)], reserved)?;
            let gdtr = boot::write_gdt(machine, &boot::GDT_LONG)?;
            let cr3 = boot::write_identity_page_tables(machine)?;
            boot::long_state(entry, gdtr, cr3, stack)
        }
    };
    write(machine, load_addr, &image.bytes)?;
    Ok(state)
}

/// CS:IP, data segments and SS:SP for real-mode entry (see the module documentation).
fn real_state(load_addr: u64, entry: u64) -> Result<CpuState, LoadError> {
    let cs: u16 = if entry < 0x1_0000 {
        0
    } else if entry < 0x10_0000 {
        (entry >> 4) as u16
    } else if entry <= MAX_REAL_MODE_ENTRY {
        0xffff
    } else {
        return Err(LoadError::RealModeEntryUnreachable { entry });
    };
    let mut s = CpuState::reset();
    s.cr0 = boot::CR0_ET;
    for (i, sg) in s.seg.iter_mut().enumerate() {
        *sg = Segment::real_mode(cs, i == seg::CS);
    }
    s.rip = entry - (u64::from(cs) << 4);
    let top = (load_addr & !0xf).min(0x10_fff0);
    let (ss, sp) = if top < 0x1000 {
        (0, 0)
    } else if top <= 0x1_0000 {
        (0, top as u16)
    } else {
        (((top - 0x1_0000) >> 4) as u16, 0)
    };
    s.seg[seg::SS] = Segment::real_mode(ss, false);
    s.gpr[gpr::RSP] = u64::from(sp);
    Ok(s)
}
