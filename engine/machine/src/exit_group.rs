//! Exit groups: the engine-independent rule that decides after which device exits the run
//! loop may poll devices and deliver interrupts (see [`Position`](crate::Position)).
//!
//! A repeated string instruction (REP INS/OUTS, or REP MOVS/STOS/... touching device MMIO)
//! makes one device access per element. bt stops after each element; KVM hands deja a batch
//! of elements in one exit (its emulator reads INS data ahead up to the end of the
//! destination page or its 1 KiB buffer, it sends OUTS one element at a time, the split
//! depends on the kernel) and may re-enter the guest between batches, where an injected
//! interrupt would land. No rule phrased in batches can hold on both engines, so the rule is
//! phrased in architectural state instead:
//!
//! **A device exit after which the CPU's next instruction is a REP-prefixed string
//! instruction with a non-zero count (in the count register of its address size) does not
//! end its exit group.** Until the group ends, the engine keeps running the guest itself:
//! the machine is not polled, the run loop's observer is not called and no interrupt, NMI
//! or INIT is taken. The group ends at the next device exit that does not
//! continue it (for a string I/O instruction: the exit of its last element), and there the
//! run loop polls and delivers as after any other exit.
//!
//! Every element still counts as one device exit, so exit ordinals are the same on both
//! engines, and the points where the group ends are states both engines reach: KVM's
//! batches never span two instructions, so the end of an instruction is the end of a batch.
//! The cost: a long REP INS/OUTS delays polls and interrupts until it completes (hardware may
//! take an interrupt between iterations, and does not have to), and a device access directly
//! followed by a REP string instruction (e.g. `out dx, al; rep insw`) joins that
//! instruction's group. A kick (Ctrl-C, a timeout) inside a group still ends
//! the run promptly, between two elements (bt: after any element; kvm: where its emulator
//! re-enters the guest, every 1024 elements or so): the run ends there, nothing is polled or
//! delivered, and the position (instruction count, exit ordinal) names the element, so a
//! replay stops there too (`Limit::stop_at_exits`). A replay asked to stop at an exit
//! ordinal inside a group (`--until exit:K`) still stops at its end.
//!
//! Limits: REP MOVS/STOS/LODS to device MMIO follow the same rule (kvm completes and checks
//! every such exit, which is slow) but no guest tests them yet. A REP INS whose destination
//! faults part-way differs between the engines regardless of this rule: KVM reads a batch
//! from the device before writing it, bt checks the destination before each read.

/// A REP/REPE/REPNE-prefixed string instruction, as [`rep_string`] decodes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepString {
    /// Its length in bytes (prefixes and opcode: string instructions have no operands).
    pub len: u64,
    /// Its address size in bytes, which says how much of RCX is the count.
    pub address_bytes: u8,
}

impl RepString {
    /// Whether elements are left with `rcx` as the count register.
    pub fn has_elements(&self, rcx: u64) -> bool {
        match self.address_bytes {
            2 => rcx & 0xffff != 0,
            4 => rcx & 0xffff_ffff != 0,
            _ => rcx != 0,
        }
    }
}

/// Decodes `code` (up to 15 bytes fetched at CS:RIP; fewer when the fetch stopped at an
/// unmapped page) as a REP/REPE/REPNE string instruction (INS, OUTS, MOVS, CMPS, STOS,
/// LODS, SCAS); `None` for anything else. `default_address_bytes` is the address size the
/// mode gives ([`default_address_bytes`]); an address-size prefix changes it as the CPU does.
pub fn rep_string(code: &[u8], default_address_bytes: u8) -> Option<RepString> {
    let long_mode = default_address_bytes == 8;
    let mut address_bytes = default_address_bytes;
    let mut rep = false;
    for (i, &b) in code.iter().enumerate().take(15) {
        match b {
            0xf2 | 0xf3 => rep = true,
            0x67 => {
                address_bytes = match default_address_bytes {
                    8 => 4,
                    4 => 2,
                    _ => 4,
                }
            }
            0x66 | 0xf0 | 0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 => {}
            // REX: only W matters to a string instruction (its operand size), never the count.
            0x40..=0x4f if long_mode => {}
            op => {
                return (rep && is_string_opcode(op)).then_some(RepString {
                    len: i as u64 + 1,
                    address_bytes,
                });
            }
        }
    }
    None
}

/// Whether `code` (see [`rep_string`]) is a REP string instruction whose count register
/// `rcx` (masked to its address size) is not zero: the rule's test at the end of a device
/// exit.
pub fn rep_string_continues(code: &[u8], default_address_bytes: u8, rcx: u64) -> bool {
    rep_string(code, default_address_bytes).is_some_and(|r| r.has_elements(rcx))
}

/// The address size (in bytes) code runs with by default: 8 in 64-bit mode, 2 in real and
/// virtual-8086 mode, else CS.D's 4 or 2. `lma` is EFER.LMA.
pub fn default_address_bytes(cs: &crate::Segment, cr0: u64, rflags: u64, lma: bool) -> u8 {
    if lma && cs.l {
        8
    } else if cr0 & 1 == 0 || rflags & (1 << 17) != 0 {
        2
    } else if cs.db {
        4
    } else {
        2
    }
}

/// Paging registers for [`fetch_code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PagingRegs {
    /// CR0 (PG decides whether linear addresses are translated).
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4 (PAE, PSE, LA57).
    pub cr4: u64,
    /// EFER (LMA).
    pub efer: u64,
}

/// Reads up to `buf.len()` code bytes at `linear` for [`rep_string_continues`], walking the
/// guest's page tables without the fetch's side effects (no accessed bits are set and no TLB
/// is consulted, so both engines see the same bytes and the guest's memory stays as it was).
/// Stops at a page that is not present or not RAM/ROM; returns how many bytes it read.
pub fn fetch_code(mem: &GuestRam, regs: &PagingRegs, linear: u64, buf: &mut [u8]) -> usize {
    let mut done = 0;
    while done < buf.len() {
        let lin = linear.wrapping_add(done as u64);
        let Some(phys) = translate_linear(mem, regs, lin) else {
            break;
        };
        let in_page = (0x1000 - (lin & 0xfff)) as usize;
        let n = in_page.min(buf.len() - done);
        if mem
            .read_slice(&mut buf[done..done + n], GuestAddress(phys))
            .is_err()
        {
            break;
        }
        done += n;
    }
    done
}

/// The physical address of `linear` under `regs`, or `None` when a table entry on the way is
/// not present or cannot be read. A pure walk: no accessed or dirty bit is set, no access
/// rights are checked (what a debugger asks: where does this address point now).
pub fn translate_linear(mem: &GuestRam, regs: &PagingRegs, linear: u64) -> Option<u64> {
    const PRESENT: u64 = 1;
    const PS: u64 = 1 << 7;
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    if regs.cr0 & (1 << 31) == 0 {
        return Some(linear);
    }
    let read64 = |addr: u64| mem.read_obj::<u64>(GuestAddress(addr)).ok();
    if regs.efer & (1 << 10) != 0 || regs.cr4 & (1 << 5) != 0 {
        // Long mode (4 or 5 levels) or PAE (a 4-entry PDPT, then 2 levels).
        let (mut table, mut shift) = if regs.efer & (1 << 10) != 0 {
            let levels = if regs.cr4 & (1 << 12) != 0 { 5 } else { 4 };
            (regs.cr3 & ADDR, 12 + 9 * levels)
        } else {
            let pdpte = read64((regs.cr3 & 0xffff_ffe0) + ((linear >> 30) & 3) * 8)?;
            if pdpte & PRESENT == 0 {
                return None;
            }
            (pdpte & ADDR, 30)
        };
        loop {
            shift -= 9;
            let entry = read64(table + ((linear >> shift) & 0x1ff) * 8)?;
            if entry & PRESENT == 0 {
                return None;
            }
            let page_mask = (1u64 << shift) - 1;
            if shift == 12 || (entry & PS != 0 && shift <= 30) {
                return Some((entry & ADDR & !page_mask) | (linear & page_mask));
            }
            table = entry & ADDR;
        }
    }
    // 32-bit paging: a page directory of 4-byte entries, 4 MiB pages with CR4.PSE.
    let read32 = |addr: u64| mem.read_obj::<u32>(GuestAddress(addr)).ok().map(u64::from);
    let pde = read32((regs.cr3 & 0xffff_f000) + ((linear >> 22) & 0x3ff) * 4)?;
    if pde & PRESENT == 0 {
        return None;
    }
    if pde & PS != 0 && regs.cr4 & (1 << 4) != 0 {
        let high = ((pde >> 13) & 0xff) << 32;
        return Some(high | (pde & 0xffc0_0000) | (linear & 0x3f_ffff));
    }
    let pte = read32((pde & 0xffff_f000) + ((linear >> 12) & 0x3ff) * 4)?;
    if pte & PRESENT == 0 {
        return None;
    }
    Some((pte & 0xffff_f000) | (linear & 0xfff))
}

/// INS, OUTS, MOVS, CMPS, STOS, LODS, SCAS (byte and word/dword/qword forms).
fn is_string_opcode(op: u8) -> bool {
    matches!(op, 0x6c..=0x6f | 0xa4..=0xa7 | 0xaa..=0xaf)
}

use crate::memory::GuestRam;
use vm_memory::{Bytes, GuestAddress};

#[cfg(test)]
mod tests {
    use super::rep_string_continues;

    #[test]
    fn table() {
        // (code, default address bytes, rcx, continues)
        let cases: &[(&[u8], u8, u64, bool)] = &[
            (&[0xf3, 0x6c], 2, 5, true),                          // rep insb
            (&[0xf3, 0x6c], 2, 0x1_0000, false),                  // CX is 0
            (&[0x67, 0xf3, 0x6c], 2, 0x1_0000, true),             // a32: ECX
            (&[0xf3, 0x66, 0x6d], 2, 1, true),                    // rep insd
            (&[0xf2, 0x6f], 4, 1, true),                          // repne outsd: REP for OUTS
            (&[0x6c], 2, 5, false),                               // insb without REP
            (&[0xf3, 0x90], 2, 5, false),                         // pause
            (&[0xec], 2, 5, false),                               // in al, dx
            (&[0xf3, 0xa4], 4, 0x1_0000_0000, false),             // 32-bit ECX = 0
            (&[0xf3, 0x48, 0xab], 8, 0x1_0000_0000, true),        // rep stosq, RCX
            (&[0xf3, 0x67, 0x48, 0xa5], 8, 0x1_0000_0000, false), // a32 in long mode
            (&[0x2e, 0xf3, 0x6e], 2, 2, true),                    // cs rep outsb
            (&[0xf3, 0xa6], 2, 1, true),                          // repe cmpsb
            (&[0xf3], 2, 1, false),                               // fetch cut short
            (&[], 2, 1, false),
            (&[0xf3, 0x48], 8, 1, false), // REX at the end of a short fetch
            (&[0xf3, 0x40, 0x90], 8, 1, false),
            (&[0x48, 0xf3, 0xa4], 8, 1, true), // inert REX before the REP prefix
            (&[0x48, 0xa4], 2, 1, false),      // dec ax outside long mode
        ];
        assert_eq!(
            super::rep_string(&[0x2e, 0x67, 0xf3, 0x6e, 0x90], 2),
            Some(super::RepString {
                len: 4,
                address_bytes: 4
            })
        );
        for &(code, size, rcx, want) in cases {
            assert_eq!(
                rep_string_continues(code, size, rcx),
                want,
                "{code:02x?} size {size} rcx {rcx:#x}"
            );
        }
    }

    use super::{PagingRegs, fetch_code};
    use crate::memory::GuestRam;
    use vm_memory::{Bytes, GuestAddress};

    fn mem() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    #[test]
    fn fetch_walks_long_mode_tables_across_pages_without_touching_them() {
        let m = mem();
        // PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000: entry 0 a PT at 0x4000, entry 1 a
        // 2 MiB page at 0x20_0000. Linear 0x0ffe..0x1000 lies in PT entries 0 and 1.
        m.write_obj(0x2003u64, GuestAddress(0x1000)).unwrap();
        m.write_obj(0x3003u64, GuestAddress(0x2000)).unwrap();
        m.write_obj(0x4003u64, GuestAddress(0x3000)).unwrap();
        m.write_obj(0x20_0083u64, GuestAddress(0x3008)).unwrap();
        m.write_obj(0x7003u64, GuestAddress(0x4000)).unwrap(); // linear 0x0000 -> 0x7000
        m.write_obj(0x9003u64, GuestAddress(0x4008)).unwrap(); // linear 0x1000 -> 0x9000
        m.write_slice(&[0xf3, 0x48], GuestAddress(0x7ffe)).unwrap();
        m.write_slice(&[0xab], GuestAddress(0x9000)).unwrap();
        m.write_slice(&[0x66, 0xf3, 0x6d], GuestAddress(0x20_0010))
            .unwrap();
        let regs = PagingRegs {
            cr0: 0x8000_0011,
            cr3: 0x1000,
            cr4: 0x20,
            efer: 0x500,
        };
        let before: Vec<u64> = [0x1000u64, 0x2000, 0x3000, 0x4000, 0x4008]
            .iter()
            .map(|&a| m.read_obj::<u64>(GuestAddress(a)).unwrap())
            .collect();
        let mut buf = [0u8; 3];
        assert_eq!(fetch_code(&m, &regs, 0x0ffe, &mut buf), 3);
        assert_eq!(buf, [0xf3, 0x48, 0xab]);
        assert_eq!(fetch_code(&m, &regs, 0x20_0010, &mut buf), 3);
        assert_eq!(buf, [0x66, 0xf3, 0x6d]);
        // PT entry 2 is not present: the fetch stops at the page boundary.
        let mut long = [0u8; 15];
        assert_eq!(fetch_code(&m, &regs, 0x1ffa, &mut long), 6);
        // No accessed bits were set.
        let after: Vec<u64> = [0x1000u64, 0x2000, 0x3000, 0x4000, 0x4008]
            .iter()
            .map(|&a| m.read_obj::<u64>(GuestAddress(a)).unwrap())
            .collect();
        assert_eq!(before, after);
    }

    #[test]
    fn fetch_walks_32_bit_and_unpaged_code() {
        let m = mem();
        // PD at 0x1000: entry 0 a PT at 0x2000, entry 1 a 4 MiB page at 0 (with CR4.PSE).
        m.write_obj(0x2003u32, GuestAddress(0x1000)).unwrap();
        m.write_obj(0x0000_0083u32, GuestAddress(0x1004)).unwrap();
        m.write_obj(0x5003u32, GuestAddress(0x2000 + 3 * 4))
            .unwrap(); // linear 0x3000
        m.write_slice(&[0xf3, 0x6c], GuestAddress(0x5010)).unwrap();
        m.write_slice(&[0xf3, 0x6e], GuestAddress(0x10)).unwrap();
        let mut regs = PagingRegs {
            cr0: 0x8000_0011,
            cr3: 0x1000,
            cr4: 0x10,
            efer: 0,
        };
        let mut buf = [0u8; 2];
        assert_eq!(fetch_code(&m, &regs, 0x3010, &mut buf), 2);
        assert_eq!(buf, [0xf3, 0x6c]);
        assert_eq!(fetch_code(&m, &regs, 0x40_0010, &mut buf), 2);
        assert_eq!(buf, [0xf3, 0x6e]);
        assert_eq!(fetch_code(&m, &regs, 0x4010, &mut buf), 0); // PTE not present
        regs.cr0 = 0x11;
        assert_eq!(fetch_code(&m, &regs, 0x5010, &mut buf), 2);
        assert_eq!(buf, [0xf3, 0x6c]);
        // Beyond RAM: nothing.
        assert_eq!(fetch_code(&m, &regs, 8 << 20, &mut buf), 0);
    }
}
