//! Tier-1 code generation: one host function per block, built with iced-x86's assembler.
//!
//! Guest state stays where tier 0 keeps it (the `Core`'s register file and RFLAGS, reached
//! through pointers in the [`Frame`]); each guest instruction becomes straight-line host code
//! with no dispatch. Most integer instructions are *renamed*, not reimplemented: the guest
//! instruction itself is re-encoded for the host with its registers renamed to host scratch
//! registers (loaded from and stored back to the register file) and its memory operand
//! replaced by a scratch register holding the value, which the code loads and stores through
//! an inline probe of tier 0's soft TLB. The host computes result and flags exactly as the
//! guest CPU would (kvm on this host is the oracle tier 0 is checked against); flags are
//! captured (PUSHFQ) only where tier 0's dead-flag analysis says they are live, and a flag
//! producer followed by the block's closing Jcc branches on the host flags directly.
//!
//! Everything else — and every probe that misses (TLB miss, page crossing, MMIO, a store to a
//! tracked page) — calls back into tier 0 for that one instruction ([`super::jit_op`]) with
//! the instruction position set, so faults, device accesses, self-modifying code and
//! write tracking behave exactly as on tier 0; only hits, which tier 0 would also serve from
//! its TLB without side effects, run inline.

use super::{
    EXIT_JUMP, EXIT_NEXT, FALLBACK_NOT_COMPILED, FALLBACK_TLB_MISS, FRAME_BLOCK,
    FRAME_CHAIN_RETIRED, FRAME_CHAINS, FRAME_CURRENT, FRAME_CURRENT_HIT, FRAME_EPOCH,
    FRAME_FS_BASE, FRAME_GENERATIONS, FRAME_GS_BASE, FRAME_KICK, FRAME_LIMIT, FRAME_LOOKUP,
    FRAME_OPS, FRAME_OUT_RIP, LINK_ENTRY, LINK_GENERATION, LINK_LEN, LINK_RIP, LINK_SLOT,
    LOOKUP_BYTES, LOOKUP_CS_BASE, LOOKUP_ENTRY, LOOKUP_EPOCH, LOOKUP_GENERATION, LOOKUP_LEN,
    LOOKUP_MASK, LOOKUP_MODE, LOOKUP_RIP, LOOKUP_SLOT,
};
use crate::features::Features;
use crate::ir::{MemRef, NO_REG, Operand, RIP_REL, UOp};
use deja_machine::cpu::seg;
use iced_x86::code_asm::{
    AsmRegister64, CodeAssembler, CodeLabel, byte_ptr, dword_ptr, eax, ebp, ecx, edx, esi,
    qword_ptr, r8, r9, r10, r10d, r11, r11b, r11d, r11w, r12, r13, r14, r15, rax, rbp, rbx, rcx,
    rdi, rdx, rsi, rsp, word_ptr,
};
use iced_x86::{
    Encoder, IcedError, Instruction, InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register,
    RflagsBits,
};

/// The six arithmetic flags, in RFLAGS bit positions.
const ARITH: i32 = 0x8d5;
/// RFLAGS.AF.
const AF: i32 = 0x10;
/// The same six flags in iced's flag bits.
const ICED_ARITH: u32 = RflagsBits::OF
    | RflagsBits::SF
    | RflagsBits::ZF
    | RflagsBits::AF
    | RflagsBits::CF
    | RflagsBits::PF;

/// What compiling a block produced.
pub(crate) struct Compiled {
    /// Position-independent machine code: `extern "sysv64" fn(*mut Frame) -> u64`.
    pub bytes: Vec<u8>,
    /// Instructions compiled to inline host code.
    pub native: u32,
    /// Instructions that call back into tier 0 every time.
    pub fallback: u32,
    /// Offset of the entry other compiled blocks chain to (past the prologue).
    pub chain_offset: usize,
}

/// Where a block lives, for the code that chains into it and out of it.
pub(crate) struct Place {
    /// Its mode bits and CS base (a RET keeps both: its target's block must have them).
    pub mode: u32,
    /// See [`Place::mode`].
    pub cs_base: u64,
    /// The block's address (stable: blocks are boxed).
    pub block: u64,
    /// Its slot in the block cache.
    pub slot: u32,
    /// Its ops' address.
    pub ops: u64,
    /// Its two successor links' addresses (taken branch, fall-through).
    pub links: [u64; 2],
}

/// Why a block cannot be compiled at all.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// The block's bytes no longer decode to its micro-ops.
    #[error("block at {rip:#x}: its bytes decode differently from its micro-ops")]
    Mismatch {
        /// The block's first RIP.
        rip: u64,
    },
    /// The host gave no executable memory.
    #[error("no executable memory for tier-1 code (the host refused an executable mapping)")]
    NoExecutableMemory,
    /// The assembler refused the code.
    #[error("block at {rip:#x}: assembling tier-1 code failed: {source}")]
    Assemble {
        /// The block's first RIP.
        rip: u64,
        /// iced-x86's message.
        source: IcedError,
    },
}

/// Host registers guest registers are renamed to: RAX, RCX and RDX keep their identity (so
/// implicit operands, MUL's RDX:RAX and shifts by CL, need no renaming), the others take the
/// next free of these.
const POOL: [Register; 4] = [Register::RSI, Register::RDI, Register::R8, Register::R9];

/// The `size`-byte form of the 64-bit register `r64`.
fn sized(r64: Register, size: u32) -> Register {
    let n = r64.number();
    let at = match size {
        8 => Register::RAX as usize + n,
        4 => Register::EAX as usize + n,
        2 => Register::AX as usize + n,
        _ if n < 4 => Register::AL as usize + n,
        _ if n < 8 => Register::SPL as usize + n - 4,
        _ => Register::R8L as usize + n - 8,
    };
    Register::try_from(at).unwrap_or(Register::None)
}

fn asm64(r: Register) -> AsmRegister64 {
    match r {
        Register::RAX => rax,
        Register::RCX => rcx,
        Register::RDX => rdx,
        Register::RSI => rsi,
        Register::RDI => rdi,
        Register::R8 => r8,
        Register::R9 => r9,
        _ => r11,
    }
}

/// The guest register file slot of register `idx`.
fn slot(idx: usize) -> i32 {
    (idx * 8) as i32
}

/// How captured host flags are brought to tier 0's values where the architecture leaves
/// them undefined (a trace must not depend on the tier, nor on the host CPU's choices).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlagFix {
    /// Every captured flag is defined.
    None,
    /// AF is undefined (logic instructions; shifts): tier 0 clears it.
    ClearAf,
    /// SHL/SAL by a nonzero immediate: AF clear, OF = SF ^ CF (tier 0's rule for any count).
    Shl,
    /// SAR by a nonzero immediate: AF and OF clear.
    Sar,
    /// SHR by an immediate above 1: AF clear, OF = the top bit of the original operand,
    /// saved in R11 (bit number given).
    ShrSaved(u32),
}

impl FlagFix {
    /// Whether the fix changes OF (then a Jcc reading OF cannot branch on the host flags).
    fn touches_of(self) -> bool {
        matches!(self, FlagFix::Shl | FlagFix::Sar | FlagFix::ShrSaved(_))
    }
}

/// Offsets of the fields of a record that names a successor block ([`Emitter::chain`]).
struct Successor {
    slot: i32,
    generation: i32,
    entry: i32,
    len: i32,
}

/// How a generic (renamed) instruction is to be run.
struct Renamed {
    /// The host instruction.
    host: Instruction,
    /// (guest register, host register) pairs to load before it.
    loads: Vec<(usize, Register)>,
    /// (guest register, host register) pairs to store after it.
    stores: Vec<(usize, Register)>,
    /// The memory operand: its form, size, and whether it is read and written.
    mem: Option<(MemRef, u32, bool, bool)>,
    /// Load the guest's arithmetic flags into the host's first.
    load_flags: bool,
    /// Capture the host's arithmetic flags into the guest's after.
    capture_flags: bool,
    /// How the captured flags are fixed up.
    fix: FlagFix,
    /// Copy this host register to R11 before the instruction ([`FlagFix::ShrSaved`]).
    save: Option<Register>,
}

/// Instructions whose semantics are entirely in their operands and flags, with no fault
/// the host could take on register operands: these run renamed on the host.
fn renameable(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Mov | Movzx
            | Movsx
            | Movsxd
            | Add
            | Or
            | Adc
            | Sbb
            | And
            | Sub
            | Xor
            | Cmp
            | Test
            | Inc
            | Dec
            | Neg
            | Not
            | Shl
            | Sal
            | Shr
            | Sar
            | Rol
            | Ror
            | Rcl
            | Rcr
            | Shld
            | Shrd
            | Imul
            | Mul
            | Bt
            | Bts
            | Btr
            | Btc
            | Xchg
            | Xadd
            | Bswap
            | Cbw
            | Cwde
            | Cdqe
            | Cwd
            | Cdq
            | Cqo
            | Clc
            | Stc
            | Cmc
            | Popcnt
            | Cmovo
            | Cmovno
            | Cmovb
            | Cmovae
            | Cmove
            | Cmovne
            | Cmovbe
            | Cmova
            | Cmovs
            | Cmovns
            | Cmovp
            | Cmovnp
            | Cmovl
            | Cmovge
            | Cmovle
            | Cmovg
            | Seto
            | Setno
            | Setb
            | Setae
            | Sete
            | Setne
            | Setbe
            | Seta
            | Sets
            | Setns
            | Setp
            | Setnp
            | Setl
            | Setge
            | Setle
            | Setg
    )
}

fn shift_family(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Shl | Sal | Shr | Sar | Rol | Ror | Rcl | Rcr | Shld | Shrd
    )
}

fn writes(a: OpAccess) -> bool {
    matches!(
        a,
        OpAccess::Write | OpAccess::ReadWrite | OpAccess::CondWrite | OpAccess::ReadCondWrite
    )
}

fn reads(a: OpAccess) -> bool {
    matches!(
        a,
        OpAccess::Read | OpAccess::ReadWrite | OpAccess::CondRead | OpAccess::ReadCondWrite
    )
}

/// The compiler of one block.
struct Emitter<'a> {
    a: CodeAssembler,
    epilogue: CodeLabel,
    info: InstructionInfoFactory,
    features: &'a Features,
    mode64: bool,
    /// Tag bits of the soft TLB entries this block's accesses use (valid, user).
    tag_bits: i32,
    native: u32,
    fallback: u32,
    /// The previous instruction left its flags on the host stack and in the host's RFLAGS,
    /// for the closing Jcc to branch on before they are merged (with this mask).
    pending_merge: Option<FlagFix>,
    helper: u64,
    /// The last op's branch target (which link an exit follows, as the run loop decides).
    last_target: u64,
    links: [u64; 2],
    mode: u32,
    cs_base: u64,
}

/// Compiles `ops` (with their decoded `insns`) into one host function.
pub(crate) fn compile(
    ops: &[UOp],
    insns: &[Instruction],
    features: &Features,
    mode64: bool,
    user: bool,
    helper: u64,
    place: &Place,
) -> Result<Compiled, CompileError> {
    let rip = ops.first().map_or(0, |o| o.rip);
    let asm_err = |source| CompileError::Assemble { rip, source };
    if ops.len() != insns.len()
        || ops
            .iter()
            .zip(insns)
            .any(|(o, i)| o.rip != i.ip() || o.code != i.code())
    {
        return Err(CompileError::Mismatch { rip });
    }
    let mut a = CodeAssembler::new(64).map_err(asm_err)?;
    let epilogue = a.create_label();
    let mut e = Emitter {
        a,
        epilogue,
        info: InstructionInfoFactory::new(),
        features,
        mode64,
        tag_bits: 1 | (i32::from(user) << 1),
        native: 0,
        fallback: 0,
        pending_merge: None,
        helper,
        last_target: ops.last().map_or(0, |o| o.target),
        links: place.links,
        mode: place.mode,
        cs_base: place.cs_base,
    };
    let mut chained = e.a.create_label();
    e.prologue().map_err(asm_err)?;
    e.a.set_label(&mut chained).map_err(asm_err)?;
    e.enter(place).map_err(asm_err)?;
    for (i, (op, insn)) in ops.iter().zip(insns).enumerate() {
        // The condition of a closing Jcc right after this instruction.
        let fuse = (i + 2 == ops.len() && is_jcc(&insns[i + 1])).then(|| ops[i + 1].aux & 0xf);
        e.op(i, op, insn, fuse).map_err(asm_err)?;
    }
    // Every op fell through.
    let next = ops.last().map_or(0, |o| o.next_rip);
    e.exit_to(EXIT_NEXT, ops.len(), next).map_err(asm_err)?;
    e.epilogue().map_err(asm_err)?;
    let assembled =
        e.a.assemble_options(
            0,
            iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )
        .map_err(asm_err)?;
    let chain_offset = assembled.label_ip(&chained).map_err(asm_err)? as usize;
    Ok(Compiled {
        bytes: assembled.inner.code_buffer,
        native: e.native,
        fallback: e.fallback,
        chain_offset,
    })
}

/// Loads the guest's arithmetic flags into the host's RFLAGS (only those: the host keeps its
/// TF, DF, AC and the rest).
fn load_guest_flags(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.push(qword_ptr(r13))?;
    a.and(qword_ptr(rsp), ARITH)?;
    a.popfq()
}

/// Whether condition code `cc` reads OF (O, NO, L, GE, LE, G).
fn reads_of(cc: u8) -> bool {
    matches!(cc, 0 | 1 | 0xc..=0xf)
}

fn is_jcc(insn: &Instruction) -> bool {
    insn.is_jcc_short_or_near()
}

impl Emitter<'_> {
    fn prologue(&mut self) -> Result<(), IcedError> {
        let a = &mut self.a;
        for r in [rbx, rbp, r12, r13, r14, r15] {
            a.push(r)?;
        }
        // Six pushes and the return address: 8 more keep calls 16-byte aligned.
        a.sub(rsp, 8)?;
        a.mov(r12, rdi)?;
        a.mov(rbx, qword_ptr(r12 + super::FRAME_GPR))?;
        a.mov(r13, qword_ptr(r12 + super::FRAME_RFLAGS))?;
        a.mov(r14, qword_ptr(r12 + super::FRAME_READ_TLB))?;
        a.mov(r15, qword_ptr(r12 + super::FRAME_WRITE_TLB))?;
        // RBP: instructions retired by the blocks before this one in a chain.
        a.xor(ebp, ebp)
    }

    /// The chained entry: this block becomes the frame's (and the cache's) current one.
    fn enter(&mut self, place: &Place) -> Result<(), IcedError> {
        let a = &mut self.a;
        a.mov(rax, place.block)?;
        a.mov(qword_ptr(r12 + FRAME_BLOCK), rax)?;
        a.mov(rax, place.ops)?;
        a.mov(qword_ptr(r12 + FRAME_OPS), rax)?;
        a.mov(qword_ptr(r12 + FRAME_CHAIN_RETIRED), rbp)?;
        a.mov(rax, qword_ptr(r12 + FRAME_CURRENT))?;
        a.mov(dword_ptr(rax), place.slot)?;
        a.mov(rax, qword_ptr(r12 + FRAME_CURRENT_HIT))?;
        a.mov(byte_ptr(rax), 0)
    }

    /// With RCX pointing at a record naming a successor block (a link or a lookup-cache
    /// entry: `succ` gives its fields' offsets), jumps into the successor's compiled code if
    /// it is still the block the record was made for (its slot's generation), is compiled,
    /// no kick is pending and it fits the chain's instruction budget after `retired` more
    /// instructions; otherwise goes to `plain`.
    fn chain(
        &mut self,
        succ: Successor,
        retired: usize,
        plain: CodeLabel,
    ) -> Result<(), IcedError> {
        let a = &mut self.a;
        a.mov(rdx, qword_ptr(rcx + succ.entry))?;
        a.test(rdx, rdx)?;
        a.jz(plain)?;
        a.mov(esi, dword_ptr(rcx + succ.slot))?;
        a.mov(rdi, qword_ptr(r12 + FRAME_GENERATIONS))?;
        a.mov(eax, dword_ptr(rdi + rsi * 4))?;
        a.cmp(eax, dword_ptr(rcx + succ.generation))?;
        a.jne(plain)?;
        a.mov(rax, qword_ptr(r12 + FRAME_KICK))?;
        a.cmp(byte_ptr(rax), 0)?;
        a.jne(plain)?;
        a.mov(rax, qword_ptr(rcx + succ.len))?;
        a.lea(rax, qword_ptr(rax + rbp + retired as i32))?;
        a.cmp(rax, qword_ptr(r12 + FRAME_LIMIT))?;
        a.ja(plain)?;
        a.add(rbp, retired as i32)?;
        a.inc(qword_ptr(r12 + FRAME_CHAINS))?;
        a.jmp(rdx)
    }

    /// Leaves to `rip` (known here) after `retired` instructions of this block: straight into
    /// the successor's compiled code when the link the run loop made for this exit still holds
    /// and the frame allows (no kick pending, the successor fits the instruction budget);
    /// otherwise back to the run loop as [`Emitter::exit`] does (a taken branch with RIP).
    fn exit_to(&mut self, kind: u64, retired: usize, rip: u64) -> Result<(), IcedError> {
        let mut plain = self.a.create_label();
        let link = self.links[usize::from(self.last_target != rip)];
        let a = &mut self.a;
        a.mov(rcx, link)?;
        a.mov(rax, rip)?;
        a.cmp(qword_ptr(rcx + LINK_RIP), rax)?;
        a.jne(plain)?;
        self.chain(
            Successor {
                slot: LINK_SLOT,
                generation: LINK_GENERATION,
                entry: LINK_ENTRY,
                len: LINK_LEN,
            },
            retired,
            plain,
        )?;
        let a = &mut self.a;
        a.set_label(&mut plain)?;
        if kind == EXIT_JUMP {
            a.mov(rax, rip)?;
            a.mov(qword_ptr(r12 + FRAME_OUT_RIP), rax)?;
        }
        self.exit(kind, retired)
    }

    fn epilogue(&mut self) -> Result<(), IcedError> {
        let a = &mut self.a;
        a.set_label(&mut self.epilogue)?;
        a.add(rsp, 8)?;
        for r in [r15, r14, r13, r12, rbp, rbx] {
            a.pop(r)?;
        }
        a.ret()
    }

    /// Returns `kind` with `retired` instructions of this block (and those of the blocks
    /// before it in the chain).
    fn exit(&mut self, kind: u64, retired: usize) -> Result<(), IcedError> {
        self.a.mov(rax, kind << 32 | retired as u64)?;
        self.a.add(rax, rbp)?;
        self.a.jmp(self.epilogue)
    }

    /// Leaves by a taken branch to the address in RAX (a RET's): straight into the compiled
    /// block there when the block cache's lookup cache names one for this mode, as the run
    /// loop's lookup would find it, and the frame allows (as [`Emitter::exit_to`]);
    /// otherwise back to the run loop.
    fn exit_jump(&mut self, retired: usize) -> Result<(), IcedError> {
        let mut plain = self.a.create_label();
        let a = &mut self.a;
        a.mov(qword_ptr(r12 + FRAME_OUT_RIP), rax)?;
        a.mov(rcx, rax)?;
        a.shr(rcx, 12)?;
        a.xor(rcx, rax)?;
        a.and(ecx, LOOKUP_MASK)?;
        a.imul_3(ecx, ecx, LOOKUP_BYTES)?;
        a.add(rcx, qword_ptr(r12 + FRAME_LOOKUP))?;
        a.cmp(qword_ptr(rcx + LOOKUP_RIP), rax)?;
        a.jne(plain)?;
        a.mov(rdx, self.cs_base)?;
        a.cmp(qword_ptr(rcx + LOOKUP_CS_BASE), rdx)?;
        a.jne(plain)?;
        a.cmp(dword_ptr(rcx + LOOKUP_MODE), self.mode as i32)?;
        a.jne(plain)?;
        a.mov(rdx, qword_ptr(r12 + FRAME_EPOCH))?;
        a.mov(rdx, qword_ptr(rdx))?;
        a.cmp(qword_ptr(rcx + LOOKUP_EPOCH), rdx)?;
        a.jne(plain)?;
        self.chain(
            Successor {
                slot: LOOKUP_SLOT,
                generation: LOOKUP_GENERATION,
                entry: LOOKUP_ENTRY,
                len: LOOKUP_LEN,
            },
            retired,
            plain,
        )?;
        let a = &mut self.a;
        a.set_label(&mut plain)?;
        self.exit(EXIT_JUMP, retired)
    }

    /// Runs op `i` on tier 0 through the helper; leaves the block when the helper says so.
    fn fallback_call(&mut self, i: usize, reason: u64) -> Result<(), IcedError> {
        let a = &mut self.a;
        a.mov(rdi, r12)?;
        a.mov(rsi, i as u64 | reason << 32)?;
        a.mov(rax, self.helper)?;
        a.call(rax)?;
        a.test(rax, rax)?;
        a.jnz(self.epilogue)
    }

    fn op(
        &mut self,
        i: usize,
        op: &UOp,
        insn: &Instruction,
        fuse_jcc: Option<u8>,
    ) -> Result<(), IcedError> {
        let pending = std::mem::take(&mut self.pending_merge);
        if let Some(r) = self.plan_renamed(op, insn) {
            self.native += 1;
            return self.renamed(i, &r, fuse_jcc);
        }
        let done = match insn.mnemonic() {
            Mnemonic::Nop | Mnemonic::Pause | Mnemonic::Endbr64 | Mnemonic::Endbr32
                if self.features.accepts(insn, 64) =>
            {
                true
            }
            _ if is_jcc(insn) => {
                self.jcc(i, op, pending)?;
                true
            }
            Mnemonic::Jmp if matches!(insn.op0_kind(), OpKind::NearBranch64) => {
                self.exit_to(EXIT_JUMP, i + 1, op.target)?;
                true
            }
            Mnemonic::Lea if self.mode64 && matches!(op.dst, Operand::Reg { hi: false, .. }) => {
                self.lea(op)?;
                true
            }
            Mnemonic::Push | Mnemonic::Pop | Mnemonic::Call | Mnemonic::Ret
                if self.mode64 && op.size == 8 =>
            {
                self.stack_op(i, op, insn)?
            }
            _ => false,
        };
        if done {
            self.native += 1;
            return Ok(());
        }
        self.fallback += 1;
        self.fallback_call(i, FALLBACK_NOT_COMPILED)
    }

    /// Decides whether `insn` can run renamed, and how.
    fn plan_renamed(&mut self, op: &UOp, insn: &Instruction) -> Option<Renamed> {
        let m = insn.mnemonic();
        if !renameable(m)
            || !self
                .features
                .accepts(insn, if self.mode64 { 64 } else { 32 })
        {
            return None;
        }
        // AH..BH, segment and control registers stay on tier 0.
        for o in [op.dst, op.src, op.src2] {
            match o {
                Operand::Reg { hi: false, .. } | Operand::Imm(_) | Operand::None => {}
                Operand::Mem(_) if self.mode64 => {}
                _ => return None,
            }
        }
        let mut mem = None;
        let mut explicit = Vec::new();
        for n in 0..insn.op_count() {
            match insn.op_kind(n) {
                OpKind::Register => {
                    let r = insn.op_register(n);
                    if !r.is_gpr()
                        || matches!(r, Register::AH | Register::CH | Register::DH | Register::BH)
                    {
                        return None;
                    }
                    explicit.push(r.full_register());
                }
                OpKind::Memory => {
                    let Operand::Mem(mr) =
                        [op.dst, op.src, op.src2].into_iter().find(|o| o.is_mem())?
                    else {
                        return None;
                    };
                    let size = insn.memory_size().size() as u32;
                    if !matches!(size, 1 | 2 | 4 | 8)
                        || matches!(
                            m,
                            Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc
                        )
                    {
                        // BT* with a register offset address a bit string beyond the operand.
                        return None;
                    }
                    mem = Some((mr, size, n));
                }
                OpKind::Immediate8
                | OpKind::Immediate16
                | OpKind::Immediate32
                | OpKind::Immediate64
                | OpKind::Immediate8to16
                | OpKind::Immediate8to32
                | OpKind::Immediate8to64
                | OpKind::Immediate32to64 => {}
                _ => return None,
            }
        }
        if m == Mnemonic::Bswap && insn.op_register(0).size() == 2 {
            return None;
        }
        let info = self.info.info(insn);
        let mem_regs: Vec<Register> = mem
            .map(|(mr, _, _)| {
                [mr.base, mr.index]
                    .into_iter()
                    .filter(|&r| r != NO_REG && r != RIP_REL)
                    .filter_map(|r| Register::try_from(Register::RAX as usize + r as usize).ok())
                    .collect()
            })
            .unwrap_or_default();
        let mut mem_read = false;
        let mut mem_write = false;
        for u in info.used_memory() {
            mem_read |= reads(u.access());
            mem_write |= writes(u.access());
        }
        if mem.is_some() && info.used_memory().len() != 1 {
            return None;
        }
        // Guest registers used as data, with whether each is written.
        let mut data: Vec<(usize, bool)> = Vec::new();
        for u in info.used_registers() {
            let r = u.register();
            if !r.is_gpr() {
                continue;
            }
            let full = r.full_register();
            let is_explicit = explicit.contains(&full);
            let w = writes(u.access());
            if !is_explicit && !w && mem_regs.contains(&full) {
                continue; // only an address register
            }
            let g = full.number();
            if !is_explicit && g > 2 {
                return None; // an implicit register other than RAX, RCX, RDX
            }
            match data.iter_mut().find(|(x, _)| *x == g) {
                Some(d) => d.1 |= w,
                None => data.push((g, w)),
            }
        }
        // Explicit registers the info lists only through their operand.
        for r in &explicit {
            let g = r.number();
            if !data.iter().any(|(x, _)| *x == g) {
                data.push((g, false));
            }
        }
        let mut pool = POOL.iter();
        let mut map: Vec<(usize, Register)> = Vec::new();
        for &(g, _) in &data {
            let host = match g {
                0 => Register::RAX,
                1 => Register::RCX,
                2 => Register::RDX,
                _ => *pool.next()?,
            };
            map.push((g, host));
        }
        let host_of = |r: Register| -> Option<Register> {
            let g = r.full_register().number();
            let h = map.iter().find(|(x, _)| *x == g)?.1;
            Some(sized(h, r.size() as u32))
        };
        let mut host = *insn;
        for n in 0..insn.op_count() {
            match insn.op_kind(n) {
                OpKind::Register => host.set_op_register(n, host_of(insn.op_register(n))?),
                OpKind::Memory => {
                    let size = mem.map(|(_, s, _)| s)?;
                    host.set_op_kind(n, OpKind::Register);
                    host.set_op_register(n, sized(Register::R11, size));
                }
                _ => {}
            }
        }
        host.set_segment_prefix(Register::None);
        host.set_memory_base(Register::None);
        host.set_memory_index(Register::None);
        host.set_has_lock_prefix(false);
        host.set_has_xacquire_prefix(false);
        host.set_has_xrelease_prefix(false);
        if Encoder::new(64).encode(&host, 0).is_err() {
            return None;
        }
        let read = insn.rflags_read() & ICED_ARITH;
        let modified = insn.rflags_modified() & ICED_ARITH;
        let capture = modified != 0 && op.flags_live;
        let undefined = insn.rflags_undefined() & ICED_ARITH;
        let logic = matches!(
            m,
            Mnemonic::And | Mnemonic::Or | Mnemonic::Xor | Mnemonic::Test
        );
        // A shift by an immediate: its masked count and operand bits.
        let imm_count = (matches!(
            m,
            Mnemonic::Shl | Mnemonic::Sal | Mnemonic::Shr | Mnemonic::Sar
        ) && insn.op_count() == 2
            && insn.op1_kind() == OpKind::Immediate8)
            .then(|| {
                let bits = 8 * if insn.op0_kind() == OpKind::Register {
                    insn.op0_register().size()
                } else {
                    insn.memory_size().size()
                } as u32;
                let mask = if bits == 64 { 0x3f } else { 0x1f };
                (u32::from(insn.immediate8()) & mask, bits)
            });
        let mut save = None;
        let fix = match (capture, imm_count) {
            (false, _) => FlagFix::None,
            (true, _) if undefined == 0 => FlagFix::None,
            (true, _) if logic && undefined == RflagsBits::AF => FlagFix::ClearAf,
            // A zero count changes no flag: the guest's, loaded first, are what comes out.
            (true, Some((0, _))) => FlagFix::None,
            (true, Some(_)) if matches!(m, Mnemonic::Shl | Mnemonic::Sal) => FlagFix::Shl,
            (true, Some(_)) if m == Mnemonic::Sar => FlagFix::Sar,
            (true, Some((1, _))) => FlagFix::ClearAf,
            (true, Some((_, bits))) if insn.op0_kind() == OpKind::Register => {
                let g = insn.op0_register().full_register().number();
                save = Some(map.iter().find(|(x, _)| *x == g)?.1);
                FlagFix::ShrSaved(bits - 1)
            }
            // Live flags the architecture leaves undefined, with no rule here for tier 0's
            // choice: tier 0 runs it (a trace must not depend on the tier).
            _ => return None,
        };
        let load_flags = read != 0 || (capture && (modified != ICED_ARITH || shift_family(m)));
        Some(Renamed {
            host,
            loads: map.clone(),
            stores: map
                .iter()
                .filter(|(g, _)| data.iter().any(|(x, w)| x == g && *w))
                .copied()
                .collect(),
            mem: mem.map(|(mr, size, _)| (mr, size, mem_read, mem_write)),
            load_flags,
            capture_flags: capture,
            fix,
            save,
        })
    }

    /// Computes a memory operand's linear address (64-bit mode) into R10.
    fn linear(&mut self, m: &MemRef) -> Result<(), IcedError> {
        let a = &mut self.a;
        if m.base == RIP_REL || m.base == NO_REG {
            a.mov(r10, if m.base == RIP_REL { m.disp } else { 0 })?;
        } else {
            a.mov(r10, qword_ptr(rbx + slot(m.base as usize)))?;
        }
        if m.index != NO_REG {
            a.mov(rax, qword_ptr(rbx + slot(m.index as usize)))?;
            let s = m.scale as u32;
            a.lea(r10, qword_ptr(r10 + rax * s))?;
        }
        if m.base != RIP_REL && m.disp != 0 {
            match i32::try_from(m.disp as i64) {
                Ok(d) => a.lea(r10, qword_ptr(r10 + d))?,
                Err(_) => {
                    a.mov(rax, m.disp)?;
                    a.add(r10, rax)?;
                }
            }
        }
        if m.asize == 4 {
            a.mov(r10d, r10d)?;
        }
        match m.seg as usize {
            seg::FS => a.add(r10, qword_ptr(r12 + FRAME_FS_BASE))?,
            seg::GS => a.add(r10, qword_ptr(r12 + FRAME_GS_BASE))?,
            _ => {}
        }
        Ok(())
    }

    /// Probes tier 0's read (`write == false`) or write TLB for `size` bytes at the linear
    /// address in R10: on a hit the host address is in RDX (R10 is kept), otherwise jumps to
    /// `miss`. Clobbers RAX.
    fn probe(&mut self, size: u32, write: bool, miss: CodeLabel) -> Result<(), IcedError> {
        let a = &mut self.a;
        a.mov(rax, r10)?;
        a.shr(rax, 12)?;
        a.mov(rdx, r10)?;
        a.shr(rdx, 22)?;
        a.xor(eax, edx)?;
        a.and(eax, super::TLB_MASK)?;
        a.shl(eax, 4)?;
        a.add(rax, if write { r15 } else { r14 })?;
        a.mov(rdx, r10)?;
        a.and(rdx, -4096)?;
        a.or(rdx, self.tag_bits)?;
        a.cmp(rdx, qword_ptr(rax))?;
        a.jne(miss)?;
        a.mov(edx, r10d)?;
        a.and(edx, 0xfff)?;
        a.cmp(edx, 4096 - size as i32)?;
        a.ja(miss)?;
        a.add(rdx, qword_ptr(rax + 8))
    }

    fn renamed(&mut self, i: usize, r: &Renamed, fuse_jcc: Option<u8>) -> Result<(), IcedError> {
        // Labels only where a probe jumps to them (iced wants every label placed, once).
        let mut labels = r
            .mem
            .map(|_| (self.a.create_label(), self.a.create_label()));
        if let (Some((mr, size, read, write)), Some((miss, _))) = (r.mem, labels) {
            self.linear(&mr)?;
            if read && write {
                // Tier 0 reads, then writes: both its TLBs must hit (a hit has no side
                // effect; anything else runs the instruction on tier 0).
                self.probe(size, false, miss)?;
                self.probe(size, true, miss)?;
            } else {
                self.probe(size, write, miss)?;
            }
            let a = &mut self.a;
            a.mov(r10, rdx)?;
            if read {
                match size {
                    1 => a.movzx(r11d, byte_ptr(r10))?,
                    2 => a.movzx(r11d, word_ptr(r10))?,
                    4 => a.mov(r11d, dword_ptr(r10))?,
                    _ => a.mov(r11, qword_ptr(r10))?,
                }
            }
        }
        let a = &mut self.a;
        for &(g, h) in &r.loads {
            a.mov(asm64(h), qword_ptr(rbx + slot(g)))?;
        }
        if let Some(h) = r.save {
            a.mov(r11, asm64(h))?;
        }
        if r.load_flags {
            load_guest_flags(a)?;
        }
        a.add_instruction(r.host)?;
        if r.capture_flags {
            a.pushfq()?;
        }
        if let Some((_, size, _, true)) = r.mem {
            match size {
                1 => a.mov(byte_ptr(r10), r11b)?,
                2 => a.mov(word_ptr(r10), r11w)?,
                4 => a.mov(dword_ptr(r10), r11d)?,
                _ => a.mov(qword_ptr(r10), r11)?,
            }
        }
        for &(g, h) in &r.stores {
            a.mov(qword_ptr(rbx + slot(g)), asm64(h))?;
        }
        if r.capture_flags {
            if let Some(cc) = fuse_jcc
                && r.mem.is_none()
                && !(r.fix.touches_of() && reads_of(cc))
            {
                // The closing Jcc branches on the host flags, then merges on each path.
                self.pending_merge = Some(r.fix);
                return Ok(());
            }
            self.merge_flags(r.fix)?;
        }
        if let Some((miss, done)) = labels.as_mut() {
            self.a.jmp(*done)?;
            self.a.set_label(miss)?;
            self.fallback_call(i, FALLBACK_TLB_MISS)?;
            self.a.set_label(done)?;
        }
        Ok(())
    }

    /// Pops the flags a renamed instruction left on the host stack into the guest's RFLAGS.
    fn merge_flags(&mut self, fix: FlagFix) -> Result<(), IcedError> {
        const OF: i32 = 0x800;
        let a = &mut self.a;
        a.pop(rax)?;
        match fix {
            FlagFix::None => a.and(eax, ARITH)?,
            FlagFix::ClearAf => a.and(eax, ARITH & !AF)?,
            FlagFix::Sar => a.and(eax, ARITH & !AF & !OF)?,
            FlagFix::Shl => {
                // OF = SF ^ CF: SF (bit 7) down to bit 0, XOR, up to bit 11.
                a.and(eax, ARITH & !AF & !OF)?;
                a.mov(edx, eax)?;
                a.shr(edx, 7)?;
                a.xor(edx, eax)?;
                a.and(edx, 1)?;
                a.shl(edx, 11)?;
                a.or(eax, edx)?;
            }
            FlagFix::ShrSaved(top) => {
                a.and(eax, ARITH & !AF & !OF)?;
                a.mov(rdx, r11)?;
                a.shr(rdx, top)?;
                a.and(edx, 1)?;
                a.shl(edx, 11)?;
                a.or(eax, edx)?;
            }
        }
        a.and(qword_ptr(r13), !ARITH)?;
        a.or(qword_ptr(r13), rax)
    }

    /// The block's closing Jcc.
    fn jcc(&mut self, i: usize, op: &UOp, pending: Option<FlagFix>) -> Result<(), IcedError> {
        let mut taken = self.a.create_label();
        if pending.is_none() {
            let a = &mut self.a;
            load_guest_flags(a)?;
        }
        let a = &mut self.a;
        match op.aux & 0xf {
            0x0 => a.jo(taken)?,
            0x1 => a.jno(taken)?,
            0x2 => a.jb(taken)?,
            0x3 => a.jae(taken)?,
            0x4 => a.je(taken)?,
            0x5 => a.jne(taken)?,
            0x6 => a.jbe(taken)?,
            0x7 => a.ja(taken)?,
            0x8 => a.js(taken)?,
            0x9 => a.jns(taken)?,
            0xa => a.jp(taken)?,
            0xb => a.jnp(taken)?,
            0xc => a.jl(taken)?,
            0xd => a.jge(taken)?,
            0xe => a.jle(taken)?,
            _ => a.jg(taken)?,
        }
        if let Some(fix) = pending {
            self.merge_flags(fix)?;
        }
        self.exit_to(EXIT_NEXT, i + 1, op.next_rip)?;
        self.a.set_label(&mut taken)?;
        if let Some(fix) = pending {
            self.merge_flags(fix)?;
        }
        self.exit_to(EXIT_JUMP, i + 1, op.target)
    }

    /// LEA: the effective address (no segment base), truncated to the operand size.
    fn lea(&mut self, op: &UOp) -> Result<(), IcedError> {
        let (Operand::Reg { idx, .. }, Operand::Mem(mut m)) = (op.dst, op.src) else {
            return Ok(());
        };
        m.seg = seg::DS as u8;
        self.linear(&m)?;
        let a = &mut self.a;
        let at = qword_ptr(rbx + slot(idx as usize));
        match op.size {
            8 => a.mov(at, r10)?,
            4 => {
                a.mov(r10d, r10d)?;
                a.mov(at, r10)?;
            }
            _ => a.mov(word_ptr(rbx + slot(idx as usize)), iced_x86::code_asm::r10w)?,
        }
        Ok(())
    }

    /// PUSH/POP of a 64-bit register or immediate, near CALL and RET in 64-bit mode, through
    /// the TLB (a miss runs the instruction on tier 0). Returns whether it was compiled.
    fn stack_op(&mut self, i: usize, op: &UOp, insn: &Instruction) -> Result<bool, IcedError> {
        let m = insn.mnemonic();
        let reg = |o: Operand| match o {
            Operand::Reg { idx, hi: false } => Some(idx as usize),
            _ => None,
        };
        let pushed = match (m, op.dst) {
            (Mnemonic::Push, Operand::Reg { hi: false, .. } | Operand::Imm(_)) => true,
            (Mnemonic::Call, _) if insn.op0_kind() == OpKind::NearBranch64 => true,
            (Mnemonic::Pop, Operand::Reg { hi: false, .. }) => false,
            (Mnemonic::Ret, _) => false,
            _ => return Ok(false),
        };
        let mut miss = self.a.create_label();
        let mut done = self.a.create_label();
        let sp = qword_ptr(rbx + slot(4));
        if pushed {
            let a = &mut self.a;
            a.mov(r10, sp)?;
            a.sub(r10, 8)?;
            self.probe(8, true, miss)?;
            let a = &mut self.a;
            match (m, op.dst) {
                (Mnemonic::Push, Operand::Imm(v)) => a.mov(rax, v)?,
                (Mnemonic::Push, o) => a.mov(rax, qword_ptr(rbx + slot(reg(o).unwrap_or(0))))?,
                _ => a.mov(rax, op.next_rip)?,
            }
            a.mov(qword_ptr(rdx), rax)?;
            a.mov(sp, r10)?;
            if m == Mnemonic::Call {
                self.exit_to(EXIT_JUMP, i + 1, op.target)?;
            }
        } else {
            let a = &mut self.a;
            a.mov(r10, sp)?;
            self.probe(8, false, miss)?;
            let a = &mut self.a;
            a.mov(rax, qword_ptr(rdx))?;
            if m == Mnemonic::Ret {
                // A non-canonical return address is tier 0's #GP.
                a.mov(rdx, rax)?;
                a.shl(rdx, 16)?;
                a.sar(rdx, 16)?;
                a.cmp(rdx, rax)?;
                a.jne(miss)?;
                a.add(r10, 8 + op.target as i32)?;
                a.mov(sp, r10)?;
                self.exit_jump(i + 1)?;
            } else {
                a.add(r10, 8)?;
                a.mov(sp, r10)?;
                a.mov(qword_ptr(rbx + slot(reg(op.dst).unwrap_or(0))), rax)?;
            }
        }
        let a = &mut self.a;
        a.jmp(done)?;
        a.set_label(&mut miss)?;
        self.fallback_call(i, FALLBACK_TLB_MISS)?;
        self.a.set_label(&mut done)?;
        Ok(true)
    }
}
