//! The engine's internal architectural state: registers, lazily evaluated arithmetic flags,
//! segments with their hidden descriptor caches, control registers, and the conversion to
//! and from the portable [`CpuState`].

use deja_machine::cpu::{
    DescriptorTable, FpuState, PendingDebug, PendingEvents, X87ErrorPins, Xcr0, msr, seg,
};
use deja_machine::{CpuState, Segment};
use std::collections::BTreeMap;

/// RFLAGS bits.
pub mod fl {
    #![allow(missing_docs)]
    pub const CF: u64 = 1 << 0;
    pub const PF: u64 = 1 << 2;
    pub const AF: u64 = 1 << 4;
    pub const ZF: u64 = 1 << 6;
    pub const SF: u64 = 1 << 7;
    pub const TF: u64 = 1 << 8;
    pub const IF: u64 = 1 << 9;
    pub const DF: u64 = 1 << 10;
    pub const OF: u64 = 1 << 11;
    pub const IOPL: u64 = 3 << 12;
    pub const NT: u64 = 1 << 14;
    pub const RF: u64 = 1 << 16;
    pub const VM: u64 = 1 << 17;
    pub const AC: u64 = 1 << 18;
    pub const VIF: u64 = 1 << 19;
    pub const VIP: u64 = 1 << 20;
    pub const ID: u64 = 1 << 21;
    /// The six arithmetic flags lazy evaluation covers.
    pub const ARITH: u64 = CF | PF | AF | ZF | SF | OF;
    /// Bits software can ever change.
    pub const WRITABLE: u64 = ARITH | TF | IF | DF | IOPL | NT | RF | VM | AC | VIF | VIP | ID;
}

/// Control-register bits the engine consults.
pub mod crb {
    #![allow(missing_docs)]
    pub const PE: u64 = 1 << 0;
    pub const MP: u64 = 1 << 1;
    pub const EM: u64 = 1 << 2;
    pub const TS: u64 = 1 << 3;
    pub const ET: u64 = 1 << 4;
    pub const NE: u64 = 1 << 5;
    pub const WP: u64 = 1 << 16;
    pub const AM: u64 = 1 << 18;
    pub const NW: u64 = 1 << 29;
    pub const CD: u64 = 1 << 30;
    pub const PG: u64 = 1 << 31;
    // CR4
    pub const VME: u64 = 1 << 0;
    pub const PVI: u64 = 1 << 1;
    pub const TSD: u64 = 1 << 2;
    pub const DE: u64 = 1 << 3;
    pub const PSE: u64 = 1 << 4;
    pub const PAE: u64 = 1 << 5;
    pub const MCE: u64 = 1 << 6;
    pub const PGE: u64 = 1 << 7;
    pub const PCE: u64 = 1 << 8;
    pub const OSFXSR: u64 = 1 << 9;
    pub const OSXMMEXCPT: u64 = 1 << 10;
    pub const UMIP: u64 = 1 << 11;
    pub const FSGSBASE: u64 = 1 << 16;
    pub const PCIDE: u64 = 1 << 17;
    pub const OSXSAVE: u64 = 1 << 18;
    pub const SMEP: u64 = 1 << 20;
    pub const SMAP: u64 = 1 << 21;
    // EFER
    pub const SCE: u64 = 1 << 0;
    pub const LME: u64 = 1 << 8;
    pub const LMA: u64 = 1 << 10;
    pub const NXE: u64 = 1 << 11;
}

/// Which operation last set the arithmetic flags, so they can be computed when read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FlagOp {
    /// The flags are materialized in `rflags`.
    Done,
    /// `res = a + b`.
    Add,
    /// `res = a + b + 1`.
    AdcCarry,
    /// `res = a - b` (also CMP, NEG as `0 - b`).
    Sub,
    /// `res = a - b - 1`.
    SbbBorrow,
    /// AND/OR/XOR/TEST: CF = OF = AF = 0.
    Logic,
    /// `res = a + 1`; CF kept in `carry`.
    Inc,
    /// `res = a - 1`; CF kept in `carry`.
    Dec,
}

/// The lazily evaluated arithmetic flags.
#[derive(Debug, Clone, Copy)]
pub struct Lazy {
    /// What produced the flags.
    pub op: FlagOp,
    /// Operand size in bytes.
    pub size: u8,
    /// The carry preserved across INC/DEC.
    pub carry: bool,
    /// The (unmasked) result.
    pub res: u64,
    /// First operand.
    pub a: u64,
    /// Second operand.
    pub b: u64,
}

/// Mask of an operand of `size` bytes.
#[inline(always)]
pub fn mask(size: u8) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size as u32 * 8)) - 1
    }
}

/// Sign bit of an operand of `size` bytes.
#[inline(always)]
pub fn msb(size: u8) -> u64 {
    1u64 << (size as u32 * 8 - 1)
}

/// Sign-extends the low `size` bytes of `v`.
#[inline(always)]
pub fn sext(v: u64, size: u8) -> u64 {
    let sh = 64 - size as u32 * 8;
    (((v << sh) as i64) >> sh) as u64
}

impl Lazy {
    fn cf(&self) -> bool {
        let m = mask(self.size);
        let (a, b, r) = (self.a & m, self.b & m, self.res & m);
        match self.op {
            FlagOp::Done => false,
            FlagOp::Add => r < a,
            FlagOp::AdcCarry => r <= a,
            FlagOp::Sub => a < b,
            FlagOp::SbbBorrow => a <= b,
            FlagOp::Logic => false,
            FlagOp::Inc | FlagOp::Dec => self.carry,
        }
    }

    fn of(&self) -> bool {
        let s = msb(self.size);
        let (a, b, r) = (self.a, self.b, self.res);
        match self.op {
            FlagOp::Add | FlagOp::AdcCarry | FlagOp::Inc => (a ^ r) & (b ^ r) & s != 0,
            FlagOp::Sub | FlagOp::SbbBorrow | FlagOp::Dec => (a ^ b) & (a ^ r) & s != 0,
            FlagOp::Logic | FlagOp::Done => false,
        }
    }

    /// All six arithmetic flags as RFLAGS bits.
    pub fn eval(&self) -> u64 {
        let m = mask(self.size);
        let r = self.res & m;
        let mut f = 0;
        if self.cf() {
            f |= fl::CF;
        }
        if (r as u8).count_ones().is_multiple_of(2) {
            f |= fl::PF;
        }
        if self.op != FlagOp::Logic && (self.a ^ self.b ^ self.res) & 0x10 != 0 {
            f |= fl::AF;
        }
        if r == 0 {
            f |= fl::ZF;
        }
        if r & msb(self.size) != 0 {
            f |= fl::SF;
        }
        if self.of() {
            f |= fl::OF;
        }
        f
    }
}

/// The engine's CPU state.
#[derive(Debug, Clone)]
pub struct Core {
    /// RAX..R15.
    pub gpr: [u64; 16],
    /// Instruction pointer.
    pub rip: u64,
    /// RFLAGS; the arithmetic bits are stale while `lazy.op != Done`.
    pub rflags: u64,
    /// Pending flag computation.
    pub lazy: Lazy,
    /// ES, CS, SS, DS, FS, GS.
    pub seg: [Segment; 6],
    /// Task register.
    pub tr: Segment,
    /// LDT register.
    pub ldtr: Segment,
    /// GDTR.
    pub gdtr: DescriptorTable,
    /// IDTR.
    pub idtr: DescriptorTable,
    /// CR0.
    pub cr0: u64,
    /// CR2.
    pub cr2: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// CR8.
    pub cr8: u64,
    /// EFER.
    pub efer: u64,
    /// Other MSRs.
    pub msrs: BTreeMap<u32, u64>,
    /// DR0-3.
    pub dr: [u64; 4],
    /// DR6.
    pub dr6: u64,
    /// DR7.
    pub dr7: u64,
    /// x87/SSE.
    pub fpu: FpuState,
    /// Interrupt shadow, NMI state, HLT.
    pub pending: PendingEvents,
    /// Debug-exception bits (DR6 layout: B0-B3, BS, BT) of a #DB trap due at the next
    /// instruction boundary.
    pub db_pending: u64,
    /// #DB trap bits held back by a MOV SS / POP SS shadow until the next instruction retires.
    pub db_deferred: u64,
    /// DR6 B0-B3 bits of data breakpoints hit by the instruction being executed.
    pub db_hits: u64,
    /// FERR# and IGNNE#, the PC's x87 error signalling while CR0.NE is clear.
    pub x87_pins: X87ErrorPins,
    /// XCR0 (XSETBV/XGETBV; the components XSAVE and XRSTOR manage).
    pub xcr0: u64,
}

/// DR6 and DR7 bits the engine consults.
pub mod dbg {
    #![allow(missing_docs)]
    /// DR6: breakpoint conditions B0-B3.
    pub const B_ALL: u64 = 0xf;
    /// DR6: debug-register access detected (DR7.GD).
    pub const BD: u64 = 1 << 13;
    /// DR6: single step.
    pub const BS: u64 = 1 << 14;
    /// DR6: task switch with the TSS T bit.
    pub const BT: u64 = 1 << 15;
    /// DR7: general detect.
    pub const GD: u64 = 1 << 13;
    /// DR7: the local enables L0-L3 (cleared on task switches).
    pub const LOCAL_ENABLES: u64 = 0x55;
}

impl Core {
    /// Builds the internal state from the portable one.
    pub fn from_state(s: &CpuState) -> Self {
        Self {
            gpr: s.gpr,
            rip: s.rip,
            rflags: (s.rflags & fl::WRITABLE) | 2,
            lazy: Lazy {
                op: FlagOp::Done,
                size: 8,
                carry: false,
                res: 0,
                a: 0,
                b: 0,
            },
            seg: s.seg,
            tr: s.tr,
            ldtr: s.ldtr,
            gdtr: s.gdtr,
            idtr: s.idtr,
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            msrs: s.msrs.clone(),
            dr: s.dr,
            dr6: s.dr6,
            dr7: s.dr7,
            fpu: s.fpu.clone(),
            pending: s.pending,
            db_pending: s.pending_debug.trap,
            db_deferred: s.pending_debug.after_shadow,
            db_hits: 0,
            x87_pins: s.x87_error_pins,
            xcr0: s.xcr0.0,
        }
    }

    /// The portable state.
    pub fn to_state(&self) -> CpuState {
        CpuState {
            gpr: self.gpr,
            rip: self.rip,
            rflags: self.flags(),
            seg: self.seg,
            tr: self.tr,
            ldtr: self.ldtr,
            gdtr: self.gdtr,
            idtr: self.idtr,
            cr0: self.cr0,
            cr2: self.cr2,
            cr3: self.cr3,
            cr4: self.cr4,
            cr8: self.cr8,
            efer: self.efer,
            msrs: self.msrs.clone(),
            dr: self.dr,
            dr6: self.dr6,
            dr7: self.dr7,
            fpu: self.fpu.clone(),
            pending: self.pending,
            pending_debug: PendingDebug {
                trap: self.db_pending,
                after_shadow: self.db_deferred,
            },
            x87_error_pins: self.x87_pins,
            xcr0: Xcr0(self.xcr0),
        }
    }

    /// RFLAGS with the arithmetic flags computed.
    #[inline]
    pub fn flags(&self) -> u64 {
        if self.lazy.op == FlagOp::Done {
            self.rflags
        } else {
            (self.rflags & !fl::ARITH) | self.lazy.eval()
        }
    }

    /// Materializes the lazy flags into `rflags`.
    #[inline]
    pub fn materialize(&mut self) {
        if self.lazy.op != FlagOp::Done {
            self.rflags = self.flags();
            self.lazy.op = FlagOp::Done;
        }
    }

    /// Carry flag.
    #[inline]
    pub fn cf(&self) -> bool {
        if self.lazy.op == FlagOp::Done {
            self.rflags & fl::CF != 0
        } else {
            self.lazy.cf()
        }
    }

    /// Replaces the arithmetic flags (the others stay).
    #[inline]
    pub fn set_arith(&mut self, bits: u64) {
        self.rflags = (self.rflags & !fl::ARITH) | (bits & fl::ARITH);
        self.lazy.op = FlagOp::Done;
    }

    /// Sets up a lazy flag computation.
    #[inline(always)]
    pub fn set_lazy(&mut self, op: FlagOp, size: u8, res: u64, a: u64, b: u64) {
        self.lazy.op = op;
        self.lazy.size = size;
        self.lazy.res = res;
        self.lazy.a = a;
        self.lazy.b = b;
    }

    /// Evaluates condition code `cc` (the low nibble of Jcc/SETcc/CMOVcc opcodes).
    #[inline(always)]
    pub fn cond(&self, cc: u8) -> bool {
        let l = &self.lazy;
        // Fast paths for the common producer/consumer pairs.
        if l.op == FlagOp::Sub {
            let m = mask(l.size);
            let (a, b) = (l.a & m, l.b & m);
            match cc {
                0x2 => return a < b,
                0x3 => return a >= b,
                0x4 => return a == b,
                0x5 => return a != b,
                0x6 => return a <= b,
                0x7 => return a > b,
                0xc => return (sext(a, l.size) as i64) < (sext(b, l.size) as i64),
                0xd => return (sext(a, l.size) as i64) >= (sext(b, l.size) as i64),
                0xe => return (sext(a, l.size) as i64) <= (sext(b, l.size) as i64),
                0xf => return (sext(a, l.size) as i64) > (sext(b, l.size) as i64),
                _ => {}
            }
        } else if l.op == FlagOp::Logic && cc & 0xe != 0xa {
            // AND/OR/XOR/TEST: CF = OF = 0, so every condition but parity is ZF and SF.
            let r = l.res & mask(l.size);
            let z = r == 0;
            let s = r & msb(l.size) != 0;
            let v = match cc >> 1 {
                0 | 1 => false,
                2 | 3 => z,
                4 | 6 => s,
                _ => z || s,
            };
            return v ^ (cc & 1 != 0);
        } else if l.op != FlagOp::Done && (cc == 4 || cc == 5) {
            let z = l.res & mask(l.size) == 0;
            return z == (cc == 4);
        }
        self.cond_from_flags(cc)
    }

    /// [`Core::cond`] from the materialized flags: the general case, out of line so that the
    /// fast paths above stay small where they are inlined (Jcc, SETcc, CMOVcc).
    #[inline(never)]
    fn cond_from_flags(&self, cc: u8) -> bool {
        let f = self.flags();
        let b = |bit: u64| f & bit != 0;
        let r = match cc >> 1 {
            0 => b(fl::OF),
            1 => b(fl::CF),
            2 => b(fl::ZF),
            3 => b(fl::CF) || b(fl::ZF),
            4 => b(fl::SF),
            5 => b(fl::PF),
            6 => b(fl::SF) != b(fl::OF),
            _ => b(fl::ZF) || (b(fl::SF) != b(fl::OF)),
        };
        r ^ (cc & 1 != 0)
    }

    /// Whether the CPU is in long mode (EFER.LMA).
    #[inline]
    pub fn long_mode(&self) -> bool {
        self.efer & crb::LMA != 0
    }

    /// Whether 64-bit code runs (LMA and CS.L).
    #[inline]
    pub fn mode64(&self) -> bool {
        self.long_mode() && self.seg[seg::CS].l
    }

    /// Whether the CPU is in protected mode.
    #[inline]
    pub fn protected(&self) -> bool {
        self.cr0 & crb::PE != 0
    }

    /// Virtual-8086 mode.
    #[inline]
    pub fn vm86(&self) -> bool {
        self.protected() && self.rflags & fl::VM != 0
    }

    /// Current privilege level.
    #[inline]
    pub fn cpl(&self) -> u8 {
        if !self.protected() {
            0
        } else if self.rflags & fl::VM != 0 {
            3
        } else {
            self.seg[seg::CS].dpl
        }
    }

    /// I/O privilege level.
    #[inline]
    pub fn iopl(&self) -> u8 {
        ((self.rflags >> 12) & 3) as u8
    }

    /// Code bitness: 16, 32 or 64.
    #[inline]
    pub fn bitness(&self) -> u32 {
        if self.mode64() {
            64
        } else if self.protected() && !self.vm86() && self.seg[seg::CS].db {
            32
        } else {
            16
        }
    }

    /// Stack address size in bytes.
    #[inline]
    pub fn stack_size(&self) -> u8 {
        if self.mode64() {
            8
        } else if self.protected() && !self.vm86() && self.seg[seg::SS].db {
            4
        } else {
            2
        }
    }

    /// Reads a register of `size` bytes (`hi` selects AH..BH).
    #[inline(always)]
    pub fn reg(&self, idx: u8, hi: bool, size: u8) -> u64 {
        if hi {
            (self.gpr[(idx & 3) as usize] >> 8) & 0xff
        } else {
            self.gpr[(idx & 15) as usize] & mask(size)
        }
    }

    /// Writes a register with x86 semantics (32-bit writes zero-extend).
    #[inline(always)]
    pub fn set_reg(&mut self, idx: u8, hi: bool, size: u8, v: u64) {
        if hi {
            let r = &mut self.gpr[(idx & 3) as usize];
            *r = (*r & !0xff00) | ((v & 0xff) << 8);
            return;
        }
        let r = &mut self.gpr[(idx & 15) as usize];
        match size {
            1 => *r = (*r & !0xff) | (v & 0xff),
            2 => *r = (*r & !0xffff) | (v & 0xffff),
            4 => *r = v & 0xffff_ffff,
            _ => *r = v,
        }
    }

    /// Whether breakpoint `n` (0..3) is enabled in DR7 (locally or globally).
    #[inline]
    pub fn bp_enabled(&self, n: usize) -> bool {
        self.dr7 & (3 << (2 * n)) != 0
    }

    /// Breakpoint `n`'s condition (R/W bits: 0 execute, 1 write, 2 I/O, 3 read/write) and
    /// length in bytes.
    #[inline]
    pub fn bp_kind(&self, n: usize) -> (u8, u64) {
        let rw = ((self.dr7 >> (16 + 4 * n)) & 3) as u8;
        let len = match (self.dr7 >> (18 + 4 * n)) & 3 {
            0 => 1,
            1 => 2,
            2 => 8,
            _ => 4,
        };
        (rw, len)
    }

    /// Whether any enabled data breakpoint (write or read/write) is armed.
    #[inline]
    pub fn data_bps_armed(&self) -> bool {
        (0..4).any(|n| self.bp_enabled(n) && self.bp_kind(n).0 & 1 != 0)
    }

    /// An MSR value.
    pub fn msr(&self, index: u32) -> u64 {
        match index {
            msr::IA32_EFER => self.efer,
            msr::IA32_FS_BASE => self.seg[seg::FS].base,
            msr::IA32_GS_BASE => self.seg[seg::GS].base,
            _ => self.msrs.get(&index).copied().unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast paths of `cond` agree with evaluating the materialized flags, for every
    /// condition code after every lazy producer, at every operand size.
    #[test]
    fn condition_fast_paths_match_the_materialized_flags() {
        let values = [
            0u64,
            1,
            0x7f,
            0x80,
            0xff,
            0x8000,
            0xffff,
            0x8000_0000,
            u64::MAX,
        ];
        let ops = [
            FlagOp::Add,
            FlagOp::AdcCarry,
            FlagOp::Sub,
            FlagOp::SbbBorrow,
            FlagOp::Logic,
            FlagOp::Inc,
            FlagOp::Dec,
        ];
        let mut core = Core::from_state(&CpuState::reset());
        let mut checked = 0;
        for op in ops {
            for size in [1u8, 2, 4, 8] {
                for &a in &values {
                    for &b in &values {
                        let res = match op {
                            FlagOp::Add => a.wrapping_add(b),
                            FlagOp::AdcCarry => a.wrapping_add(b).wrapping_add(1),
                            FlagOp::Sub => a.wrapping_sub(b),
                            FlagOp::SbbBorrow => a.wrapping_sub(b).wrapping_sub(1),
                            FlagOp::Logic => a ^ b,
                            FlagOp::Inc => a.wrapping_add(1),
                            _ => a.wrapping_sub(1),
                        } & mask(size);
                        core.set_lazy(op, size, res, a & mask(size), b & mask(size));
                        core.lazy.carry = b & 1 != 0;
                        for cc in 0..16 {
                            assert_eq!(
                                core.cond(cc),
                                core.cond_from_flags(cc),
                                "{op:?} size {size} a {a:#x} b {b:#x} cc {cc:#x}"
                            );
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 7 * 4 * 81 * 16);
    }
}
