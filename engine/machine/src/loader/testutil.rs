//! Helpers for the loader tests: a bare machine, guest-memory readers, a descriptor
//! decoder, a page-table walker, and builders for small ELF and multiboot files.

use crate::cpu::Segment;
use crate::devices::{Device, DeviceError, DeviceState, InterruptLines, IoCtx, Irqchip};
use crate::host::{ClockMode, LiveHost};
use crate::machine::{Machine, MachineConfig};
use vm_memory::{Bytes, GuestAddress};

/// An interrupt controller with no lines, for machines that only hold memory.
struct NoIrqchip;

impl Device for NoIrqchip {
    fn name(&self) -> &'static str {
        "no-irqchip"
    }
    fn read(&mut self, _ctx: &mut IoCtx, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, _ctx: &mut IoCtx, _addr: u64, _data: &[u8]) {}
    fn save(&self) -> DeviceState {
        DeviceState::DebugExit
    }
    fn restore(&mut self, _state: &DeviceState) -> Result<(), DeviceError> {
        Ok(())
    }
}

impl InterruptLines for NoIrqchip {
    fn set_irq(&mut self, _line: u32, _level: bool) {}
}

impl Irqchip for NoIrqchip {
    fn interrupt_pending(&self) -> bool {
        false
    }
    fn acknowledge(&mut self) -> u8 {
        0xff
    }
}

/// A machine with `ram` bytes and the given command line.
pub fn machine_with(ram: u64, cmdline: &str) -> Machine {
    let config = MachineConfig {
        ram_size: ram,
        cmdline: cmdline.to_string(),
        ..MachineConfig::default()
    };
    Machine::new(
        config,
        Box::new(LiveHost::new(ClockMode::Virtual)),
        Box::new(NoIrqchip),
    )
    .unwrap()
}

/// A 16 MiB machine.
pub fn machine() -> Machine {
    machine_with(16 << 20, "")
}

/// Reads `len` guest bytes.
pub fn read(m: &Machine, addr: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0; len];
    m.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
    b
}

/// Reads a little-endian u32.
pub fn read_u32(m: &Machine, addr: u64) -> u32 {
    u32::from_le_bytes(read(m, addr, 4).try_into().unwrap())
}

/// Reads a little-endian u64.
pub fn read_u64(m: &Machine, addr: u64) -> u64 {
    u64::from_le_bytes(read(m, addr, 8).try_into().unwrap())
}

/// Reads a NUL-terminated string (at most 4 KiB).
pub fn read_cstr(m: &Machine, addr: u64) -> String {
    let b = read(m, addr, 4096);
    let n = b.iter().position(|&c| c == 0).unwrap();
    String::from_utf8(b[..n].to_vec()).unwrap()
}

/// Fills `[addr, addr + len)` with `byte` (to see what the loader zeroes).
pub fn fill(m: &Machine, addr: u64, len: usize, byte: u8) {
    m.mem
        .write_slice(&vec![byte; len], GuestAddress(addr))
        .unwrap();
}

/// The hidden descriptor cache a CPU loads for `selector` from the 8-byte descriptor `d`,
/// decoded independently of the loader's encoder.
pub fn decode_descriptor(selector: u16, d: u64) -> Segment {
    let raw_limit = ((d & 0xffff) | ((d >> 32) & 0xf_0000)) as u32;
    let g = d >> 55 & 1 == 1;
    Segment {
        selector,
        base: ((d >> 16) & 0xff_ffff) | ((d >> 56) & 0xff) << 24,
        limit: if g {
            raw_limit << 12 | 0xfff
        } else {
            raw_limit
        },
        type_: ((d >> 40) & 0xf) as u8,
        s: d >> 44 & 1 == 1,
        dpl: ((d >> 45) & 3) as u8,
        present: d >> 47 & 1 == 1,
        avl: d >> 52 & 1 == 1,
        l: d >> 53 & 1 == 1,
        db: d >> 54 & 1 == 1,
        g,
        unusable: false,
    }
}

/// Translates `linear` through 4-level page tables at `cr3` as the MMU does (present bits
/// and large pages honoured); `None` if not mapped.
pub fn walk(m: &Machine, cr3: u64, linear: u64) -> Option<u64> {
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    let mut table = cr3 & ADDR;
    for level in (0..4).rev() {
        let index = (linear >> (12 + 9 * level)) & 0x1ff;
        let e = read_u64(m, table + index * 8);
        if e & 1 == 0 {
            return None;
        }
        if level > 0 && level < 3 && e & 0x80 != 0 {
            let size = 1u64 << (12 + 9 * level);
            return Some((e & ADDR & !(size - 1)) | (linear & (size - 1)));
        }
        table = e & ADDR;
    }
    Some(table | (linear & 0xfff))
}

/// A multiboot header: magic, flags, checksum, then `extra` 32-bit fields.
pub fn mb_header(flags: u32, extra: &[u32]) -> Vec<u8> {
    let mut v = Vec::new();
    for w in [
        0x1bad_b002u32,
        flags,
        0u32.wrapping_sub(0x1bad_b002u32.wrapping_add(flags)),
    ]
    .iter()
    .chain(extra)
    {
        v.extend_from_slice(&w.to_le_bytes());
    }
    v
}

/// A program header for [`elf32`].
#[derive(Clone, Copy)]
pub struct Ph {
    pub p_type: u32,
    pub offset: u32,
    pub vaddr: u32,
    pub paddr: u32,
    pub filesz: u32,
    pub memsz: u32,
}

/// A load segment at `paddr` (= vaddr) whose file bytes start at `offset`.
pub fn load_ph(offset: u32, paddr: u32, filesz: u32, memsz: u32) -> Ph {
    Ph {
        p_type: 1,
        offset,
        vaddr: paddr,
        paddr,
        filesz,
        memsz,
    }
}

/// An ELF32 i386 executable: header, program headers right after it (offset 52), then
/// `body` placed at file offset `body_offset` (which must be past the headers).
pub fn elf32(entry: u32, phs: &[Ph], body_offset: usize, body: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 52];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 1; // ELFCLASS32
    f[5] = 1; // little endian
    f[6] = 1; // EV_CURRENT
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&3u16.to_le_bytes()); // EM_386
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..28].copy_from_slice(&entry.to_le_bytes());
    f[28..32].copy_from_slice(&52u32.to_le_bytes()); // e_phoff
    f[40..42].copy_from_slice(&52u16.to_le_bytes()); // e_ehsize
    f[42..44].copy_from_slice(&32u16.to_le_bytes()); // e_phentsize
    f[44..46].copy_from_slice(&(phs.len() as u16).to_le_bytes());
    for p in phs {
        for w in [
            p.p_type, p.offset, p.vaddr, p.paddr, p.filesz, p.memsz, 7, 0x1000,
        ] {
            f.extend_from_slice(&w.to_le_bytes());
        }
    }
    assert!(f.len() <= body_offset);
    f.resize(body_offset, 0);
    f.extend_from_slice(body);
    f
}
