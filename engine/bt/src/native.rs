//! x87, MMX and SSE/SSE2 arithmetic executed on the host's own floating-point unit.
//!
//! Why native execution and not a soft-float library: deja runs on x86-64 hosts only (kvm is
//! its oracle), and the host FPU *is* an x87 with real 80-bit extended precision, precision
//! and rounding control, denormal handling, stack faults, tag and TOP updates, FPREM's
//! partial remainders, the transcendental instructions and SSE's MXCSR rounding, DAZ/FTZ and
//! exception flags. A soft-float (`rustc_apfloat` has the 80-bit format but no precision
//! control, no x87 stack or tag semantics and no transcendental functions) would need all of
//! that rewritten and would still only approximate the hardware. Here each guest instruction
//! is re-encoded once, at translation, for 64-bit mode with its memory operand moved to a
//! host buffer and its general-purpose registers renamed to RAX/RDX, and wrapped in a stub:
//!
//! ```text
//! stmxcsr [rsi+host_mxcsr]; fxrstor64 [rsi]; rax/rdx/rflags from the frame
//! <the guest instruction>
//! rflags/rax/rdx to the frame; fxsave64 [rsi]; fninit; ldmxcsr [rsi+host_mxcsr]; ret
//! ```
//!
//! The guest's whole FP state goes in and comes out through the FXSAVE image, so the host's
//! own state is never mixed in (SSE instructions that name no MMX register move only MXCSR
//! and the XMM registers they name, with the same frame layout). The guest never runs with
//! its exception masks: x87 unmasked exceptions are delayed by the architecture (the host
//! only sets ES, and the stub executes no waiting instruction after the guest's), and before
//! any waiting instruction a pending exception is delivered to the guest as #MF instead of
//! reaching the host. SSE exceptions are
//! precise, so the stub runs with every MXCSR exception masked and the guest's unmasked ones
//! are raised afterwards as #XM (or #UD without CR4.OSXMMEXCPT), leaving the destination
//! unchanged as the hardware does.
//!
//! Determinism: the IEEE-defined operations (everything except FSIN/FCOS/FSINCOS/FPTAN/
//! FPATAN/F2XM1/FYL2X/FYL2XP1 and RCPPS/RCPSS/RSQRTPS/RSQRTSS) give the same bits on every
//! x86 host. The approximations and transcendentals give the host's bits: a trace replays
//! bit for bit on the same CPU model, and may diverge between Intel and AMD hosts.
//!
//! The last-instruction pointers (FIP/FCS, FDP/FDS, FOP) are the guest's, kept here: the
//! host's would name the stub.
//!
//! With CR0.NE clear a pending x87 exception takes the PC's FERR# → IRQ13 / IGNNE# path
//! ([`x87_error`]). Known limits: when an SSE overflow or underflow is
//! unmasked, MXCSR gets the flags of the masked run (plus UE for exact tiny results), which
//! can differ from the hardware in PE; the RCP/RSQRT approximations and the x87
//! transcendentals are the host's (Intel and AMD differ).

use crate::core::crb;
use crate::exec::Ctx;
use crate::features::Features;
use crate::ir::{Ctl, Exc, OpResult, Operand, UOp};
use iced_x86::code_asm::{
    CodeAssembler, dword_ptr, qword_ptr, rax as arax, rcx as arcx, rdx as ardx, rsi as arsi,
};
use iced_x86::{
    CpuidFeature, Encoder, Instruction, InstructionInfoFactory, Mnemonic, OpAccess, OpKind,
    Register,
};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// The frame a stub works on (its address is in RSI during the call).
#[repr(C, align(64))]
struct Frame {
    /// The FXSAVE image: guest state in, guest state out.
    fx: [u8; 512],
    /// The guest register renamed to RAX.
    rax: u64,
    /// The guest register renamed to RDX.
    rdx: u64,
    /// Arithmetic flags in and out.
    rflags: u64,
    /// The host's MXCSR, saved and restored by the stub.
    host_mxcsr: u32,
    /// Guest RCX, in and out, for the string instructions ([`flag::IMPLICIT_ACD`]).
    rcx: u64,
}

const FRAME_MXCSR: i32 = 24;
const FRAME_XMM: i32 = 160;
const FRAME_RAX: i32 = 512;
const FRAME_RDX: i32 = 520;
const FRAME_RFLAGS: i32 = 528;
const FRAME_HOST_MXCSR: i32 = 536;
const FRAME_RCX: i32 = 544;

/// The host buffer standing for the guest memory operand (its address is in RDI).
#[repr(C, align(64))]
struct Buf([u8; 64]);

/// Instruction class (the low bits of [`StubInfo::flags`]).
mod class {
    pub const X87: u8 = 0;
    pub const MMX: u8 = 1;
    pub const SSE: u8 = 2;
}

/// Properties of a native op, decided at translation.
mod flag {
    /// Reads its memory operand.
    pub const MEM_READ: u16 = 1 << 2;
    /// Writes its memory operand.
    pub const MEM_WRITE: u16 = 1 << 3;
    /// The 16-byte memory operand must be 16-byte aligned (legacy SSE).
    pub const ALIGN16: u16 = 1 << 4;
    /// Checks for a pending x87 exception first (#MF).
    pub const WAITING: u16 = 1 << 5;
    /// Writes the arithmetic flags.
    pub const WRITES_FLAGS: u16 = 1 << 6;
    /// An x87 non-control instruction: updates FIP, FOP (and FDP with a memory operand).
    pub const NON_CONTROL: u16 = 1 << 7;
    /// FNINIT: clears the pointers too.
    pub const INIT: u16 = 1 << 8;
    /// FWAIT: #NM only with CR0.MP and CR0.TS.
    pub const FWAIT: u16 = 1 << 10;
    /// #UD without CR4.OSFXSR: SSE/SSE2 instructions, including the conversions between
    /// MMX and XMM registers, but not the MMX-register integer instructions SSE added.
    pub const NEEDS_OSFXSR: u16 = 1 << 11;
    /// An SSE arithmetic result that can be tiny and exact: f32 lanes (else f64).
    pub const TINY_F32: u16 = 1 << 12;
    /// An SSE arithmetic result that can be tiny and exact: f64 lanes.
    pub const TINY_F64: u16 = 1 << 13;
    /// Only the low lane is a result (scalar forms); with CVTPD2PS, the low two.
    pub const TINY_SCALAR: u16 = 1 << 14;
    /// CVTPD2PS: the low two f32 lanes are results.
    pub const TINY_LOW_PAIR: u16 = 1 << 15;
    /// SSE4.2's string instructions: RAX and RDX (the explicit lengths) and RCX (the index
    /// PCMPxSTRI writes) are the guest's own, not renamed operands.
    pub const IMPLICIT_ACD: u16 = 1 << 9;
}

/// What the handler needs about a native op; one leaked, shared instance per distinct
/// instruction form, so [`UOp::target`] can point at it.
#[derive(Debug)]
pub struct StubInfo {
    code: usize,
    flags: u16,
    mem_size: u8,
    fop: u16,
}

struct Arena {
    chunk: usize,
    used: usize,
    forms: BTreeMap<(Vec<u8>, u16, u8, u16), &'static StubInfo>,
}

const CHUNK: usize = 64 * 1024;

static ARENA: Mutex<Arena> = Mutex::new(Arena {
    chunk: 0,
    used: CHUNK,
    forms: BTreeMap::new(),
});

impl Arena {
    /// Copies a stub into executable memory, or returns `None` if the host refuses to map
    /// executable memory.
    fn place(&mut self, bytes: &[u8]) -> Option<usize> {
        if self.used + bytes.len() > CHUNK {
            // SAFETY: an anonymous private mapping; no existing memory is touched.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    CHUNK,
                    libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return None;
            }
            self.chunk = p as usize;
            self.used = 0;
        }
        let at = self.chunk + self.used;
        // SAFETY: `at..at + len` lies inside the mapping made above (checked against CHUNK),
        // which no stub yet occupies; nothing executes it before this function returns.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), at as *mut u8, bytes.len()) };
        self.used += bytes.len().next_multiple_of(16);
        Some(at)
    }
}

fn is_gpr(r: Register) -> bool {
    r.is_gpr8() || r.is_gpr16() || r.is_gpr32() || r.is_gpr64()
}

/// The host register a guest general-purpose operand is renamed to (`slot` 0 = RAX family,
/// 1 = RDX family).
fn renamed(r: Register, slot: usize) -> Register {
    match (r.size(), slot) {
        (2, 0) => Register::AX,
        (4, 0) => Register::EAX,
        (8, 0) => Register::RAX,
        (2, _) => Register::DX,
        (4, _) => Register::EDX,
        _ => Register::RDX,
    }
}

/// Whether the instruction is one this module runs and the guest's CPUID reports: every
/// feature it needs is enumerated and set ([`Features::enumerated`]), and one of them is the
/// x87, MMX or an SSE level (so nothing else, CRC32 or MONITOR say, reaches the host).
fn advertised(insn: &Instruction, features: &Features) -> bool {
    if insn.mnemonic() == Mnemonic::Wait {
        return true;
    }
    features.enumerated(insn)
        && insn.cpuid_features().iter().any(|c| {
            matches!(
                c,
                CpuidFeature::FPU
                    | CpuidFeature::FPU287
                    | CpuidFeature::FPU387
                    | CpuidFeature::MMX
                    | CpuidFeature::SSE
                    | CpuidFeature::SSE2
                    | CpuidFeature::SSE3
                    | CpuidFeature::SSSE3
                    | CpuidFeature::SSE4_1
                    | CpuidFeature::SSE4_2
            )
        })
        && insn.mnemonic() != Mnemonic::Crc32
}

fn is_x87(insn: &Instruction) -> bool {
    // FISTTP is SSE3's, but an x87 store in every other respect.
    matches!(insn.mnemonic(), Mnemonic::Wait | Mnemonic::Fisttp)
        || insn.cpuid_features().iter().any(|c| {
            matches!(
                c,
                CpuidFeature::FPU | CpuidFeature::FPU287 | CpuidFeature::FPU387
            )
        })
}

/// x87 control instructions: they leave FIP/FDP/FOP alone (SDM 8.1.8; FINCSTP, FDECSTP,
/// FFREE and FNOP are not among them, as the host confirms).
fn x87_control(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Fninit
            | Fnclex
            | Fldcw
            | Fnstcw
            | Fnstsw
            | Fnstenv
            | Fldenv
            | Fnsave
            | Frstor
            | Wait
            | Fneni
            | Fndisi
            | Fnsetpm
    )
}

/// x87 instructions that do not check for pending exceptions.
fn x87_non_waiting(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Fninit | Fnclex | Fnstcw | Fnstsw | Fnstenv | Fnsave | Fneni | Fndisi | Fnsetpm
    )
}

/// The 11-bit x87 opcode (FOP): the low 3 bits of the escape byte and the ModR/M byte.
fn x87_fop(insn: &Instruction, bitness: u32) -> u16 {
    let mut e = Encoder::new(bitness);
    if e.encode(insn, insn.ip()).is_err() {
        return 0;
    }
    let b = e.take_buffer();
    b.iter()
        .position(|x| (0xd8..=0xdf).contains(x))
        .and_then(|i| b.get(i + 1).map(|m| (((b[i] & 7) as u16) << 8) | *m as u16))
        .unwrap_or(0)
}

/// Builds the stub for one instruction form, or `None` (the instruction stays unimplemented).
fn make_stub(insn: &Instruction, bitness: u32) -> Option<&'static StubInfo> {
    let mut host = *insn;
    let mut flags = 0u16;
    let mut slot = 0;
    let mut mem_size = 0u8;
    let mut mmx = false;
    let mut mem = false;
    for i in 0..insn.op_count() {
        match insn.op_kind(i) {
            OpKind::Register => {
                let r = insn.op_register(i);
                if is_gpr(r) {
                    if slot > 1 || r.size() == 1 {
                        return None;
                    }
                    host.set_op_register(i, renamed(r, slot));
                    slot += 1;
                } else if r.is_mm() {
                    mmx = true;
                }
            }
            OpKind::Memory => mem = true,
            OpKind::Immediate8 | OpKind::Immediate16 | OpKind::Immediate8_2nd => {}
            _ => return None,
        }
    }
    if mem {
        let size = insn.memory_size().size();
        if size == 0 || size > 16 {
            return None;
        }
        mem_size = size as u8;
        host.set_memory_base(Register::RDI);
        host.set_memory_index(Register::None);
        host.set_memory_index_scale(1);
        host.set_memory_displacement64(0);
        host.set_memory_displ_size(0);
        host.set_segment_prefix(Register::None);
        let mut f = InstructionInfoFactory::new();
        let info = f.info(insn);
        for u in info.used_memory() {
            match u.access() {
                OpAccess::Read | OpAccess::CondRead => flags |= flag::MEM_READ,
                OpAccess::Write | OpAccess::CondWrite => flags |= flag::MEM_WRITE,
                OpAccess::ReadWrite | OpAccess::ReadCondWrite => {
                    flags |= flag::MEM_READ | flag::MEM_WRITE
                }
                _ => {}
            }
        }
        // Legacy-encoded 16-byte operands must be aligned, except for the unaligned moves,
        // LDDQU, and SSE4.2's string instructions (checked against the host).
        let unaligned = matches!(
            insn.mnemonic(),
            Mnemonic::Movups | Mnemonic::Movupd | Mnemonic::Movdqu | Mnemonic::Lddqu
        ) || string_insn(insn.mnemonic());
        if size == 16 && !unaligned {
            flags |= flag::ALIGN16;
        }
    }
    let m = insn.mnemonic();
    let x87 = is_x87(insn);
    let cls = if x87 {
        class::X87
    } else if mmx || m == Mnemonic::Emms {
        class::MMX
    } else {
        class::SSE
    };
    flags |= cls as u16;
    if mmx || m == Mnemonic::Emms {
        flags |= flag::WAITING;
    }
    let xmm = (0..insn.op_count())
        .any(|i| insn.op_kind(i) == OpKind::Register && insn.op_register(i).is_xmm());
    if !x87 && (!mmx || xmm || format!("{m:?}").starts_with("Cvt")) && m != Mnemonic::Emms {
        flags |= flag::NEEDS_OSFXSR;
    }
    let mut fop = 0;
    if x87 {
        if !x87_non_waiting(m) {
            flags |= flag::WAITING;
        }
        if !x87_control(m) {
            flags |= flag::NON_CONTROL;
            fop = x87_fop(insn, bitness);
        }
        if m == Mnemonic::Fninit {
            flags |= flag::INIT;
        }
        if m == Mnemonic::Wait {
            flags |= flag::FWAIT;
        }
    }
    if insn.rflags_modified() != 0 {
        flags |= flag::WRITES_FLAGS;
    }
    flags |= tiny_lanes(m);
    // Registers the instruction uses without naming them: XMM0 (BLENDV*, PCMPxSTRM) and, for
    // the string instructions, RAX/RDX/RCX. Any other implicit general register (none in
    // the SSE levels deja reports) is refused rather than run against the host's.
    let mut implicit_xmm = Vec::new();
    {
        let mut f = InstructionInfoFactory::new();
        let info = f.info(insn);
        // iced reports a 32-bit write in 64-bit mode as one to the whole register.
        let named = |r: Register| {
            (0..insn.op_count()).any(|i| {
                insn.op_kind(i) == OpKind::Register
                    && insn.op_register(i).full_register() == r.full_register()
            }) || (mem
                && [insn.memory_base(), insn.memory_index()]
                    .iter()
                    .any(|m| *m != Register::None && m.full_register() == r.full_register()))
        };
        for u in info.used_registers() {
            let r = u.register();
            if named(r) {
                continue;
            }
            if r.is_xmm() {
                implicit_xmm.push(r);
            } else if is_gpr(r) {
                if !string_insn(m) || slot > 0 {
                    return None;
                }
                flags |= flag::IMPLICIT_ACD;
            }
        }
    }
    let mut enc = Encoder::new(64);
    enc.encode(&host, 0).ok()?;
    let insn_bytes = enc.take_buffer();
    let key = (insn_bytes.clone(), flags, mem_size, fop);
    let mut arena = ARENA.lock().ok()?;
    if let Some(s) = arena.forms.get(&key) {
        return Some(s);
    }
    let bytes = stub_bytes(
        &host,
        &implicit_xmm,
        cls == class::SSE,
        flags & flag::IMPLICIT_ACD != 0,
    )
    .ok()?;
    let code = arena.place(&bytes)?;
    let info: &'static StubInfo = Box::leak(Box::new(StubInfo {
        code,
        flags,
        mem_size,
        fop,
    }));
    arena.forms.insert(key, info);
    Some(info)
}

/// SSE4.2's string compares (PCMPESTRI/M, PCMPISTRI/M, and the REX.W forms).
fn string_insn(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Pcmpestri | Pcmpestri64 | Pcmpestrm | Pcmpestrm64 | Pcmpistri | Pcmpistrm
    )
}

/// Which lanes of an SSE instruction's destination can hold a tiny exact result (the case
/// where an unmasked underflow traps but the masked run raises no flag).
fn tiny_lanes(m: Mnemonic) -> u16 {
    use Mnemonic::*;
    match m {
        Addss | Subss | Mulss | Divss | Cvtsd2ss => flag::TINY_F32 | flag::TINY_SCALAR,
        Addps | Subps | Mulps | Divps | Addsubps | Haddps | Hsubps | Dpps => flag::TINY_F32,
        Cvtpd2ps => flag::TINY_F32 | flag::TINY_LOW_PAIR,
        Addsd | Subsd | Mulsd | Divsd => flag::TINY_F64 | flag::TINY_SCALAR,
        Addpd | Subpd | Mulpd | Divpd | Addsubpd | Haddpd | Hsubpd | Dppd => flag::TINY_F64,
        _ => 0,
    }
}

/// Whether a destination holds a denormal in a result lane.
fn has_denormal_result(flags: u16, v: u128) -> bool {
    if flags & flag::TINY_F32 != 0 {
        let n = if flags & flag::TINY_SCALAR != 0 {
            1
        } else if flags & flag::TINY_LOW_PAIR != 0 {
            2
        } else {
            4
        };
        (0..n).any(|i| {
            let x = (v >> (32 * i)) as u32;
            x & 0x7f80_0000 == 0 && x & 0x007f_ffff != 0
        })
    } else if flags & flag::TINY_F64 != 0 {
        let n = if flags & flag::TINY_SCALAR != 0 { 1 } else { 2 };
        (0..n).any(|i| {
            let x = (v >> (64 * i)) as u64;
            x & 0x7ff0_0000_0000_0000 == 0 && x & 0x000f_ffff_ffff_ffff != 0
        })
    } else {
        false
    }
}

/// The stub around `host`. SSE instructions that touch no MMX register need none of the
/// x87 state: their stub moves only MXCSR and the XMM registers they name or use implicitly
/// (`implicit_xmm`; a third of the cost of FXRSTOR/FXSAVE/FNINIT); everything else goes
/// through the whole FXSAVE image. With `rcx` the stub also moves RCX in and out.
fn stub_bytes(
    host: &Instruction,
    implicit_xmm: &[Register],
    sse_only: bool,
    rcx: bool,
) -> Result<Vec<u8>, iced_x86::IcedError> {
    use iced_x86::code_asm::{
        AsmRegisterXmm, xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11,
        xmm12, xmm13, xmm14, xmm15,
    };
    const XMM: [AsmRegisterXmm; 16] = [
        xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12, xmm13,
        xmm14, xmm15,
    ];
    let mut xmms: Vec<usize> = (0..host.op_count())
        .filter(|&i| host.op_kind(i) == OpKind::Register && host.op_register(i).is_xmm())
        .map(|i| host.op_register(i))
        .chain(implicit_xmm.iter().copied())
        .map(|r| (r as u32 - Register::XMM0 as u32) as usize)
        .collect();
    xmms.sort_unstable();
    xmms.dedup();
    let slot = |r: usize| qword_ptr(arsi + (FRAME_XMM + 16 * r as i32));
    let mut a = CodeAssembler::new(64)?;
    a.stmxcsr(dword_ptr(arsi + FRAME_HOST_MXCSR))?;
    if sse_only {
        a.ldmxcsr(dword_ptr(arsi + FRAME_MXCSR))?;
        for &r in &xmms {
            a.movdqa(XMM[r], slot(r))?;
        }
    } else {
        a.fxrstor64(qword_ptr(arsi))?;
    }
    a.mov(arax, qword_ptr(arsi + FRAME_RAX))?;
    a.mov(ardx, qword_ptr(arsi + FRAME_RDX))?;
    if rcx {
        a.mov(arcx, qword_ptr(arsi + FRAME_RCX))?;
    }
    a.push(qword_ptr(arsi + FRAME_RFLAGS))?;
    a.popfq()?;
    a.add_instruction(*host)?;
    a.pushfq()?;
    a.pop(qword_ptr(arsi + FRAME_RFLAGS))?;
    a.mov(qword_ptr(arsi + FRAME_RAX), arax)?;
    a.mov(qword_ptr(arsi + FRAME_RDX), ardx)?;
    if rcx {
        a.mov(qword_ptr(arsi + FRAME_RCX), arcx)?;
    }
    if sse_only {
        for &r in &xmms {
            a.movdqa(slot(r), XMM[r])?;
        }
        a.stmxcsr(dword_ptr(arsi + FRAME_MXCSR))?;
    } else {
        a.fxsave64(qword_ptr(arsi))?;
        a.fninit()?;
    }
    a.ldmxcsr(dword_ptr(arsi + FRAME_HOST_MXCSR))?;
    a.ret()?;
    a.assemble(0)
}

/// Runs a stub on a frame and a memory buffer.
fn call(info: &StubInfo, frame: &mut Frame, buf: &mut Buf) {
    let f = frame as *mut Frame;
    let b = buf.0.as_mut_ptr();
    // SAFETY: `info.code` is a stub made by `make_stub`: it reads and writes only the frame
    // (RSI) and the 64-byte buffer (RDI, memory operands of at most 16 bytes), clobbers
    // RAX, RDX and the flags, leaves the x87 unit initialized (FNINIT, the ABI's default
    // control word) or untouched (SSE-only stubs) and restores the host MXCSR; XMM
    // registers are declared clobbered. It
    // never runs a waiting x87 instruction with an exception pending and never unmasks an
    // SSE exception, so it cannot trap.
    unsafe {
        std::arch::asm!(
            "call {code}",
            code = in(reg) info.code,
            inout("rsi") f => _,
            inout("rdi") b => _,
            out("rax") _,
            out("rdx") _,
            clobber_abi("sysv64"),
        );
    }
}

/// Chooses the native handler for an x87, MMX or SSE-level instruction, if the guest's CPUID
/// (`features`) reports it and it can be re-encoded; returns whether it did.
pub fn build(insn: &Instruction, bitness: u32, op: &mut UOp, features: &Features) -> bool {
    if !advertised(insn, features) {
        return false;
    }
    let Some(info) = make_stub(insn, bitness) else {
        return false;
    };
    op.target = info as *const StubInfo as u64;
    op.exec = exec;
    true
}

/// Whether an x87 exception is pending (ES, or a flag its mask does not cover).
pub fn x87_pending(fsw: u16, fcw: u16) -> bool {
    fsw & 0x80 != 0 || fsw & !fcw & 0x3f != 0
}

/// #MF.
pub const MF: Exc = Exc {
    vector: 16,
    error: None,
};

/// A waiting x87 or MMX instruction found an unmasked x87 exception pending: `Some` of what
/// happens instead of the instruction, `None` when it runs anyway.
///
/// CR0.NE set: #MF. CR0.NE clear (the PC's MS-DOS compatibility mode, SDM vol. 1 appendix
/// D): the CPU asserts FERR#, which the chipset turns into IRQ13 (8259A slave IR5), and
/// waits at the instruction for an interrupt ([`Ctl::Freeze`]); the IRQ13 handler writes
/// port 0xF0, which asserts IGNNE#, and when the instruction comes back with the error
/// still pending it runs, ignoring it. QEMU's TCG raises IRQ13 the same way but runs the
/// instruction at once (the handler's frame then points past it); under KVM the hardware
/// runs guests with CR0.NE forced on (a VMX fixed bit), so kvm raises #MF whatever the
/// guest's CR0.NE says, and deja's kvm engine cannot model FERR#.
pub fn x87_error(ctx: &mut Ctx) -> Option<OpResult> {
    if ctx.core.cr0 & crb::NE != 0 {
        return Some(Err(MF));
    }
    let pins = &mut ctx.core.x87_pins;
    if pins.ignne {
        return None;
    }
    if !pins.ferr {
        pins.ferr = true;
        ctx.set_irq(deja_machine::machine::FPU_ERROR_IRQ, true);
        ctx.stats.extra.add("bt.x87_ferr", 1);
    }
    Some(Ok(Ctl::Freeze))
}

/// FSW's exception state: the six flags, SF, ES and B.
const FSW_ERROR_STATE: u16 = 0x80ff;

/// FERR# goes away, and with it IGNNE# and the chipset's IRQ13, once no unmasked x87
/// exception is pending (after FNCLEX, FNINIT, FLDCW masking it, FLDENV, FRSTOR, FXRSTOR):
/// called after every instruction that can change FSW or FCW.
pub fn x87_error_sync(ctx: &mut Ctx) {
    let c = &mut *ctx.core;
    if c.x87_pins.ferr && !x87_pending(c.fpu.fsw, c.fpu.fcw) {
        c.x87_pins = Default::default();
        ctx.set_irq(deja_machine::machine::FPU_ERROR_IRQ, false);
    }
}

/// #XM.
pub const XM: Exc = Exc {
    vector: 19,
    error: None,
};

/// The device-not-available and invalid-opcode checks: x87 instructions (#NM with CR0.EM or
/// TS; FWAIT only with TS and MP) or MMX/SSE ones (#UD with EM, or without CR4.OSFXSR when
/// `needs_osfxsr`; then #NM with TS).
pub fn fp_available(ctx: &Ctx, x87: bool, needs_osfxsr: bool, fwait: bool) -> Result<(), Exc> {
    let c = &*ctx.core;
    if fwait {
        if c.cr0 & crb::TS != 0 && c.cr0 & crb::MP != 0 {
            return Err(Exc::NM);
        }
        return Ok(());
    }
    if x87 {
        if c.cr0 & (crb::EM | crb::TS) != 0 {
            return Err(Exc::NM);
        }
        return Ok(());
    }
    if c.cr0 & crb::EM != 0 {
        return Err(Exc::UD);
    }
    if needs_osfxsr && c.cr4 & crb::OSFXSR == 0 {
        return Err(Exc::UD);
    }
    if c.cr0 & crb::TS != 0 {
        return Err(Exc::NM);
    }
    Ok(())
}

fn load_frame(ctx: &Ctx, frame: &mut Frame) {
    let f = &ctx.core.fpu;
    let b = &mut frame.fx;
    b[0..2].copy_from_slice(&f.fcw.to_le_bytes());
    b[2..4].copy_from_slice(&f.fsw.to_le_bytes());
    b[4] = f.ftw;
    for i in 0..8 {
        b[32 + i * 16..48 + i * 16].copy_from_slice(&f.st[i]);
    }
    for i in 0..16 {
        b[160 + i * 16..176 + i * 16].copy_from_slice(&f.xmm[i]);
    }
}

fn mxcsr_of(frame: &Frame) -> u32 {
    u32::from_le_bytes([frame.fx[24], frame.fx[25], frame.fx[26], frame.fx[27]])
}

fn set_mxcsr(frame: &mut Frame, v: u32) {
    frame.fx[24..28].copy_from_slice(&v.to_le_bytes());
}

fn x87_fields(frame: &Frame) -> (u16, u16, u8) {
    let b = &frame.fx;
    (
        u16::from_le_bytes([b[0], b[1]]),
        u16::from_le_bytes([b[2], b[3]]),
        b[4],
    )
}

/// The general-purpose operands, in the order they were renamed (RAX, RDX).
fn gpr_operands(op: &UOp) -> [Option<u8>; 2] {
    let mut out = [None, None];
    let mut n = 0;
    for o in [op.dst, op.src, op.src2] {
        if let Operand::Reg { idx, .. } = o
            && n < 2
        {
            out[n] = Some(idx);
            n += 1;
        }
    }
    out
}

/// The selector-qualified pointer the FP state keeps outside 64-bit mode (offset in the low
/// 32 bits, selector above, as in the 32-bit FXSAVE layout).
fn fp_pointer(ctx: &Ctx, offset: u64, sreg: usize) -> u64 {
    if ctx.core.mode64() {
        offset
    } else {
        (offset & 0xffff_ffff) | (u64::from(ctx.core.seg[sreg].selector) << 32)
    }
}

/// The handler of every native op.
pub fn exec(ctx: &mut Ctx, op: &UOp) -> OpResult {
    // SAFETY: `target` was set by `build` to a `StubInfo` leaked with 'static lifetime (never
    // freed), and handlers are only called with the op they were chosen for.
    let info = unsafe { &*(op.target as *const StubInfo) };
    let cls = (info.flags & 3) as u8;
    fp_available(
        ctx,
        cls == class::X87,
        info.flags & flag::NEEDS_OSFXSR != 0,
        info.flags & flag::FWAIT != 0,
    )?;
    let (fcw, fsw) = (ctx.core.fpu.fcw, ctx.core.fpu.fsw);
    // The exception state of an error IGNNE# made this instruction ignore: the host must
    // not see it (it would fault), and it is still pending afterwards.
    let mut ignored = 0;
    if info.flags & flag::WAITING != 0 && x87_pending(fsw, fcw) {
        if let Some(instead) = x87_error(ctx) {
            return instead;
        }
        ignored = fsw & FSW_ERROR_STATE;
    }
    let mut buf = Buf([0; 64]);
    let mut mem_at = None;
    if let Some(m) = [op.dst, op.src, op.src2].iter().find_map(|o| match o {
        Operand::Mem(m) => Some(*m),
        _ => None,
    }) {
        let off = ctx.ea(&m);
        if info.flags & flag::ALIGN16 != 0 && off & 15 != 0 {
            return Err(Exc::gp(0));
        }
        let write = info.flags & flag::MEM_WRITE != 0;
        let size = info.mem_size as usize;
        let lin = ctx.linear(m.seg, off, size as u64, write)?;
        if info.flags & flag::MEM_READ != 0 {
            let user = ctx.core.cpl() == 3;
            ctx.read_bytes(lin, &mut buf.0[..size], user)?;
        }
        mem_at = Some((lin, off, m.seg));
    }
    let mut frame = Frame {
        fx: [0; 512],
        rax: 0,
        rdx: 0,
        rflags: 0x202 | (ctx.core.flags() & 0x8d5),
        host_mxcsr: 0,
        rcx: 0,
    };
    load_frame(ctx, &mut frame);
    if ignored != 0 {
        let host_fsw = u16::from_le_bytes([frame.fx[2], frame.fx[3]]) & !FSW_ERROR_STATE;
        frame.fx[2..4].copy_from_slice(&host_fsw.to_le_bytes());
    }
    let gprs = gpr_operands(op);
    if let Some(r) = gprs[0] {
        frame.rax = ctx.core.gpr[r as usize];
    }
    if let Some(r) = gprs[1] {
        frame.rdx = ctx.core.gpr[r as usize];
    }
    let implicit = info.flags & flag::IMPLICIT_ACD != 0;
    if implicit {
        frame.rax = ctx.core.gpr[0];
        frame.rcx = ctx.core.gpr[1];
        frame.rdx = ctx.core.gpr[2];
    }
    let guest_mxcsr = ctx.core.fpu.mxcsr & 0xffff;
    // Every SSE exception masked, flags cleared: the new flags are this instruction's.
    set_mxcsr(&mut frame, (guest_mxcsr | 0x1f80) & !0x3f);
    let before = if info.flags & flag::MEM_WRITE != 0 && cls == class::X87 {
        Some((frame.fx, frame.rflags))
    } else {
        None
    };
    call(info, &mut frame, &mut buf);

    // SSE: unmasked exceptions are precise faults that leave the destination alone.
    let mut raised = mxcsr_of(&frame) & 0x3f;
    let unmasked = !(guest_mxcsr >> 7) & 0x3f;
    // Underflow unmasked traps on a tiny result even when it is exact, which the masked run
    // (which flags UE only for tiny and inexact) shows as a denormal result and no flag.
    const UE: u32 = 0x10;
    if unmasked & UE != 0
        && raised & UE == 0
        && let Operand::Xmm(d) = op.dst
    {
        let v = u128::from_le_bytes(
            frame.fx[160 + 16 * d as usize..176 + 16 * d as usize]
                .try_into()
                .unwrap_or([0; 16]),
        );
        if has_denormal_result(info.flags, v) {
            raised |= UE;
        }
    }
    if raised & unmasked != 0 {
        let pre = raised & 0x7; // IE, DE, ZE are detected before the computation.
        let flags = if pre & unmasked != 0 { pre } else { raised };
        ctx.core.fpu.mxcsr = guest_mxcsr | flags;
        return Err(if ctx.core.cr4 & crb::OSXMMEXCPT != 0 {
            XM
        } else {
            Exc::UD
        });
    }

    // An x87 store that raised an unmasked exception may or may not have stored (invalid
    // operation and stack underflow do not): run it again over a different buffer to see.
    let mut store = info.flags & flag::MEM_WRITE != 0;
    if let Some((fx, fl)) = before {
        let (_, new_fsw, _) = x87_fields(&frame);
        if new_fsw & !fcw & 0x3f != 0 {
            let mut again = Frame {
                fx,
                rax: frame.rax,
                rdx: frame.rdx,
                rflags: fl,
                host_mxcsr: 0,
                rcx: frame.rcx,
            };
            let mut buf2 = Buf([0x5a; 64]);
            let mut buf1 = Buf([0xa5; 64]);
            call(info, &mut again, &mut buf2);
            let mut again1 = Frame {
                fx,
                rax: frame.rax,
                rdx: frame.rdx,
                rflags: fl,
                host_mxcsr: 0,
                rcx: frame.rcx,
            };
            call(info, &mut again1, &mut buf1);
            let n = info.mem_size as usize;
            store = buf1.0[..n] == buf2.0[..n];
        }
    }
    if store && let Some((lin, _, _)) = mem_at {
        let user = ctx.core.cpl() == 3;
        let n = info.mem_size as usize;
        ctx.write_bytes(lin, &buf.0[..n], user)?;
    }

    // Commit.
    let (new_fcw, new_fsw, new_ftw) = x87_fields(&frame);
    let f = &mut ctx.core.fpu;
    f.fcw = new_fcw;
    f.fsw = new_fsw | ignored;
    f.ftw = new_ftw;
    for i in 0..8 {
        f.st[i].copy_from_slice(&frame.fx[32 + i * 16..48 + i * 16]);
    }
    for i in 0..16 {
        f.xmm[i].copy_from_slice(&frame.fx[160 + i * 16..176 + i * 16]);
    }
    f.mxcsr = guest_mxcsr | raised;
    if info.flags & flag::INIT != 0 {
        f.fip = 0;
        f.fdp = 0;
        f.fop = 0;
    }
    if info.flags & flag::NON_CONTROL != 0 {
        let rip = op.rip;
        let fip = fp_pointer(ctx, rip, deja_machine::cpu::seg::CS);
        ctx.core.fpu.fip = fip;
        ctx.core.fpu.fop = info.fop;
        if let Some((_, off, sreg)) = mem_at {
            let fdp = fp_pointer(ctx, off, sreg as usize);
            ctx.core.fpu.fdp = fdp;
        }
    }
    if let Some(r) = gprs[0] {
        ctx.core.gpr[r as usize] = frame.rax;
    }
    if let Some(r) = gprs[1] {
        ctx.core.gpr[r as usize] = frame.rdx;
    }
    if implicit {
        ctx.core.gpr[1] = frame.rcx;
    }
    if info.flags & flag::WRITES_FLAGS != 0 {
        ctx.core.set_arith(frame.rflags & 0x8d5);
    }
    x87_error_sync(ctx);
    Ok(Ctl::Next)
}
