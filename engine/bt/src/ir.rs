//! The tier-0 intermediate representation: operand-specialized micro-operations.
//!
//! A translated block is a vector of [`UOp`]s, one per guest instruction. Each carries the
//! handler chosen for its instruction and operand form at translation time, its operands
//! already resolved (register numbers, immediates, addressing forms with absolute RIP-relative
//! displacements), its operand and address sizes, and whether the flags it writes are live.
//!
//! This is also the seam for a later native tier: the IR keeps the iced-x86 `Code` and all
//! resolved operands, so a compiler can consume blocks and be checked against tier 0 (which
//! stays the reference) op by op.

use crate::exec::Ctx;
use iced_x86::Code;

/// Control outcome of one micro-operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ctl {
    /// Fall through to the next micro-op.
    Next,
    /// A taken branch within the same mode: RIP has been set; may be chained.
    Jump,
    /// The instruction changed state the block was translated under (mode, paging, IF) or
    /// must otherwise end the block: RIP has been set; look the next block up afresh.
    End,
    /// The instruction stopped the CPU (HLT): RIP has been set past it.
    Halt,
    /// The instruction is not complete (a REP string iteration that made a device access):
    /// RIP stays at the instruction, which will continue on the next run.
    Restart,
    /// The instruction cannot start: a waiting x87 instruction with an error pending, CR0.NE
    /// clear and IGNNE# inactive. The CPU waits at it (not retired, RIP stays) for an
    /// interrupt, as it waits after HLT; FERR# has raised IRQ13 for one.
    Freeze,
}

/// An exception raised by an instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exc {
    /// Vector number.
    pub vector: u8,
    /// Error code, for vectors that push one.
    pub error: Option<u32>,
}

impl Exc {
    /// #UD.
    pub const UD: Exc = Exc {
        vector: 6,
        error: None,
    };
    /// #DE.
    pub const DE: Exc = Exc {
        vector: 0,
        error: None,
    };
    /// #NM.
    pub const NM: Exc = Exc {
        vector: 7,
        error: None,
    };
    /// #GP with an error code.
    pub fn gp(code: u32) -> Exc {
        Exc {
            vector: 13,
            error: Some(code),
        }
    }
    /// #SS with an error code.
    pub fn ss(code: u32) -> Exc {
        Exc {
            vector: 12,
            error: Some(code),
        }
    }
    /// #NP with an error code.
    pub fn np(code: u32) -> Exc {
        Exc {
            vector: 11,
            error: Some(code),
        }
    }
    /// #TS with an error code.
    pub fn ts(code: u32) -> Exc {
        Exc {
            vector: 10,
            error: Some(code),
        }
    }
}

/// What an op returns.
pub type OpResult = Result<Ctl, Exc>;

/// A micro-op handler.
pub type Handler = fn(&mut Ctx, &UOp) -> OpResult;

/// No register (for memory bases and indices).
pub const NO_REG: u8 = 0xff;
/// The pseudo register number of RIP-relative bases (the displacement is absolute).
pub const RIP_REL: u8 = 0xfe;

/// A memory operand's addressing form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRef {
    /// Segment register index.
    pub seg: u8,
    /// Base register or [`NO_REG`]/[`RIP_REL`].
    pub base: u8,
    /// Index register or [`NO_REG`].
    pub index: u8,
    /// Scale 1, 2, 4, 8.
    pub scale: u8,
    /// Address size in bytes (2, 4, 8).
    pub asize: u8,
    /// Displacement (absolute target for RIP-relative).
    pub disp: u64,
}

/// A resolved operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operand {
    /// Absent.
    None,
    /// A general-purpose register (`hi`: AH, CH, DH, BH).
    Reg {
        /// Register number 0..15.
        idx: u8,
        /// High byte register.
        hi: bool,
    },
    /// An immediate, already sign- or zero-extended to the operand size.
    Imm(u64),
    /// Memory.
    Mem(MemRef),
    /// An XMM register.
    Xmm(u8),
    /// A segment register.
    Sreg(u8),
    /// Some other register (control, debug); the number is the iced register's.
    Other(u16),
}

/// One micro-operation: a guest instruction with its handler and resolved operands.
#[derive(Debug, Clone)]
pub struct UOp {
    /// The handler chosen at translation time.
    pub exec: Handler,
    /// The guest instruction's iced-x86 code (for inspection and a native tier).
    pub code: Code,
    /// Destination (or first) operand.
    pub dst: Operand,
    /// Source (or second) operand.
    pub src: Operand,
    /// Third operand (IMUL r, r/m, imm; SHLD count).
    pub src2: Operand,
    /// Operand size in bytes.
    pub size: u8,
    /// Extra small parameter (condition code, ALU kind, REP kind, ...).
    pub aux: u8,
    /// Whether the flags this instruction writes are read before being overwritten.
    pub flags_live: bool,
    /// Length in bytes.
    pub len: u8,
    /// RIP of the instruction.
    pub rip: u64,
    /// RIP of the next instruction.
    pub next_rip: u64,
    /// Branch target, far pointer, or other immediate data.
    pub target: u64,
}

impl Operand {
    /// Whether this is a memory operand.
    pub fn is_mem(&self) -> bool {
        matches!(self, Operand::Mem(_))
    }
}
