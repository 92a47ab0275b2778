//! Translation of decoded guest instructions into micro-ops: the handler is chosen by
//! instruction and operand form, operands are resolved, and a backward pass over the block
//! marks the flags each instruction writes as live or dead (from iced-x86's flag info).

use crate::features::Features;
use crate::ir::{MemRef, NO_REG, Operand, RIP_REL, UOp};
use crate::ops::{self, alu, shift, string};
use crate::sse;
use crate::system;
use iced_x86::{Code, Instruction, Mnemonic, OpKind, Register, RflagsBits};

/// Converts a general-purpose register.
fn gpr(r: Register) -> Operand {
    let hi = matches!(r, Register::AH | Register::CH | Register::DH | Register::BH);
    if hi {
        return Operand::Reg {
            idx: (r as u32 - Register::AH as u32) as u8,
            hi: true,
        };
    }
    let full = r.full_register();
    Operand::Reg {
        idx: (full as u32 - Register::RAX as u32) as u8,
        hi: false,
    }
}

fn reg_operand(r: Register) -> Operand {
    if r.is_gpr() {
        gpr(r)
    } else if r.is_xmm() {
        Operand::Xmm((r as u32 - Register::XMM0 as u32) as u8)
    } else if r.is_segment_register() {
        Operand::Sreg((r as u32 - Register::ES as u32) as u8)
    } else {
        Operand::Other(r as u16)
    }
}

fn reg_num(r: Register) -> u8 {
    if r == Register::None {
        NO_REG
    } else if r == Register::RIP || r == Register::EIP {
        RIP_REL
    } else {
        (r.full_register() as u32 - Register::RAX as u32) as u8
    }
}

/// The memory operand of an instruction.
pub fn mem_ref(insn: &Instruction, bitness: u32) -> MemRef {
    let base = insn.memory_base();
    let index = insn.memory_index();
    let asize = if base != Register::None && base != Register::RIP && base != Register::EIP {
        base.size() as u8
    } else if index != Register::None {
        index.size() as u8
    } else if base == Register::EIP {
        4
    } else if bitness == 64 {
        8
    } else if insn.memory_displ_size() == 2 || (bitness == 16 && insn.memory_displ_size() == 0) {
        2
    } else {
        4
    };
    let mut disp = insn.memory_displacement64();
    if base == Register::EIP {
        disp &= 0xffff_ffff;
    }
    MemRef {
        seg: (insn.memory_segment() as u32 - Register::ES as u32) as u8,
        base: reg_num(base),
        index: reg_num(index),
        scale: insn.memory_index_scale() as u8,
        asize,
        disp,
    }
}

/// Converts operand `i`.
pub fn operand(insn: &Instruction, i: u32, bitness: u32) -> Operand {
    if i >= insn.op_count() {
        return Operand::None;
    }
    match insn.op_kind(i) {
        OpKind::Register => reg_operand(insn.op_register(i)),
        OpKind::Memory => Operand::Mem(mem_ref(insn, bitness)),
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
            Operand::Imm(insn.near_branch_target())
        }
        OpKind::Immediate8
        | OpKind::Immediate8_2nd
        | OpKind::Immediate16
        | OpKind::Immediate32
        | OpKind::Immediate64
        | OpKind::Immediate8to16
        | OpKind::Immediate8to32
        | OpKind::Immediate8to64
        | OpKind::Immediate32to64 => Operand::Imm(insn.immediate(i)),
        _ => Operand::None,
    }
}

/// Size in bytes of operand `i` (register or memory).
fn op_size(insn: &Instruction, i: u32) -> u8 {
    if i >= insn.op_count() {
        return 0;
    }
    match insn.op_kind(i) {
        OpKind::Register => insn.op_register(i).size() as u8,
        OpKind::Memory => insn.memory_size().size() as u8,
        _ => 0,
    }
}

fn name_size(code: Code) -> u8 {
    let n = format!("{code:?}");
    let stem = n.split('_').next().unwrap_or("");
    if n.contains("1616") || stem.ends_with('w') {
        2
    } else if n.contains("1664") || stem.ends_with('q') {
        8
    } else {
        4
    }
}

/// Builds the micro-op of one instruction for a CPU reporting `features`. Unsupported
/// instructions, and those needing a feature the CPUID table does not report, get the handler
/// that raises #UD and counts them.
pub fn build(insn: &Instruction, bitness: u32, features: &Features) -> UOp {
    let mut op = UOp {
        exec: system::unimplemented,
        code: insn.code(),
        dst: operand(insn, 0, bitness),
        src: operand(insn, 1, bitness),
        src2: operand(insn, 2, bitness),
        size: op_size(insn, 0),
        aux: 0,
        flags_live: true,
        len: insn.len() as u8,
        rip: insn.ip(),
        next_rip: insn.next_ip(),
        target: 0,
    };
    let m = insn.mnemonic();
    let code = insn.code();
    if insn.is_invalid() {
        op.exec = system::ud;
        return op;
    }
    if !features.accepts(insn, bitness) && !falls_back(m) {
        return op;
    }
    let alu_kind = match m {
        Mnemonic::Add => Some(alu::ADD),
        Mnemonic::Or => Some(alu::OR),
        Mnemonic::Adc => Some(alu::ADC),
        Mnemonic::Sbb => Some(alu::SBB),
        Mnemonic::And => Some(alu::AND),
        Mnemonic::Sub => Some(alu::SUB),
        Mnemonic::Xor => Some(alu::XOR),
        Mnemonic::Cmp => Some(alu::CMP),
        Mnemonic::Test => Some(alu::TEST),
        _ => None,
    };
    if let Some(k) = alu_kind {
        op.aux = k;
        if let Operand::Imm(v) = op.src {
            op.src = Operand::Imm(v & crate::core::mask(op.size));
        }
        let si = ops::size_index(op.size);
        op.exec = match (op.dst, op.src, si) {
            (Operand::Reg { hi: false, .. }, Operand::Reg { hi: false, .. }, Some(i)) => {
                ops::ALU_RR[k as usize][i]
            }
            (Operand::Reg { hi: false, .. }, Operand::Imm(_), Some(i)) => {
                ops::ALU_RI[k as usize][i]
            }
            _ => ops::alu_any,
        };
        return op;
    }
    let stack_size = |insn: &Instruction| insn.stack_pointer_increment().unsigned_abs() as u8;
    match m {
        Mnemonic::Mov => {
            if matches!(op.dst, Operand::Sreg(_)) {
                op.size = op_size(insn, 1).max(2);
                op.exec = system::mov_sreg;
            } else if matches!(op.src, Operand::Sreg(_)) {
                op.exec = system::mov_from_sreg;
            } else if let Operand::Other(r) = op.dst {
                set_crdr(&mut op, r, 1);
                op.size = op_size(insn, 1);
            } else if let Operand::Other(r) = op.src {
                set_crdr(&mut op, r, 0);
            } else {
                if let Operand::Imm(v) = op.src {
                    op.src = Operand::Imm(v & crate::core::mask(op.size));
                }
                op.exec = match (op.dst, op.src) {
                    (Operand::Reg { .. }, Operand::Reg { .. }) => ops::mov_rr,
                    (Operand::Reg { .. }, Operand::Imm(_)) => ops::mov_ri,
                    (Operand::Reg { .. }, Operand::Mem(_)) => ops::mov_load,
                    (Operand::Mem(_), _) => ops::mov_store,
                    _ => ops::mov,
                };
            }
        }
        Mnemonic::Movzx => {
            op.aux = op_size(insn, 1);
            op.exec = ops::movzx;
        }
        Mnemonic::Movsx | Mnemonic::Movsxd => {
            op.aux = op_size(insn, 1);
            op.exec = if op.aux == op.size {
                ops::mov
            } else {
                ops::movsx
            };
        }
        Mnemonic::Lea => op.exec = ops::lea,
        Mnemonic::Xchg => op.exec = ops::xchg,
        Mnemonic::Nop
        | Mnemonic::Pause
        | Mnemonic::Lfence
        | Mnemonic::Sfence
        | Mnemonic::Mfence
        | Mnemonic::Prefetchnta
        | Mnemonic::Prefetcht0
        | Mnemonic::Prefetcht1
        | Mnemonic::Prefetcht2
        | Mnemonic::Prefetchw
        | Mnemonic::Endbr64
        | Mnemonic::Endbr32 => op.exec = ops::nop,
        Mnemonic::Inc | Mnemonic::Dec => {
            op.aux = (m == Mnemonic::Dec) as u8;
            op.exec = match (op.dst, ops::size_index(op.size)) {
                (Operand::Reg { hi: false, .. }, Some(i)) => ops::INCDEC_R[op.aux as usize][i],
                _ => ops::incdec,
            };
        }
        Mnemonic::Neg => op.exec = ops::neg,
        Mnemonic::Not => op.exec = ops::not,
        Mnemonic::Rol
        | Mnemonic::Ror
        | Mnemonic::Rcl
        | Mnemonic::Rcr
        | Mnemonic::Shl
        | Mnemonic::Sal
        | Mnemonic::Shr
        | Mnemonic::Sar => {
            op.aux = match m {
                Mnemonic::Rol => shift::ROL,
                Mnemonic::Ror => shift::ROR,
                Mnemonic::Rcl => shift::RCL,
                Mnemonic::Rcr => shift::RCR,
                Mnemonic::Shl => shift::SHL,
                Mnemonic::Sal => shift::SAL,
                Mnemonic::Shr => shift::SHR,
                _ => shift::SAR,
            };
            if op.src == Operand::None {
                op.src = Operand::Imm(1);
            }
            op.exec = match (op.dst, op.src, ops::size_index(op.size)) {
                (Operand::Reg { hi: false, .. }, Operand::Imm(c), Some(i))
                    if shift_imm_count(op.size, c) != 0
                        && op.aux != shift::RCL
                        && op.aux != shift::RCR =>
                {
                    ops::SHIFT_RI[op.aux as usize][i]
                }
                _ => ops::shift_op,
            };
        }
        Mnemonic::Shld | Mnemonic::Shrd => {
            op.aux = (m == Mnemonic::Shrd) as u8;
            op.exec = ops::shxd;
        }
        Mnemonic::Mul | Mnemonic::Div => {
            op.aux = 0;
            op.exec = if m == Mnemonic::Mul {
                ops::mul1
            } else {
                ops::div
            };
        }
        Mnemonic::Idiv => {
            op.aux = 1;
            op.exec = ops::div;
        }
        Mnemonic::Imul => match insn.op_count() {
            1 => {
                op.aux = 1;
                op.exec = ops::mul1;
            }
            n => {
                if n == 2 {
                    op.src2 = op.dst;
                }
                op.exec = match (op.dst, op.src, op.src2, ops::size_index(op.size)) {
                    (
                        Operand::Reg { hi: false, .. },
                        Operand::Reg { hi: false, .. },
                        Operand::Reg { hi: false, .. } | Operand::Imm(_),
                        Some(i),
                    ) => ops::IMUL_R[i],
                    _ => ops::imul,
                };
            }
        },
        Mnemonic::Push => {
            op.size = stack_size(insn);
            if matches!(op.dst, Operand::Sreg(_)) {
                op.exec = system::push_sreg;
            } else {
                if let Operand::Imm(v) = op.dst {
                    op.dst = Operand::Imm(v & crate::core::mask(op.size));
                }
                op.exec = ops::push;
            }
        }
        Mnemonic::Pop => {
            op.size = stack_size(insn);
            if matches!(op.dst, Operand::Sreg(_)) {
                op.aux = 1;
                op.exec = system::mov_sreg;
            } else {
                op.exec = ops::pop;
            }
        }
        Mnemonic::Pusha | Mnemonic::Pushad => {
            op.size = stack_size(insn) / 8;
            op.exec = ops::pusha;
        }
        Mnemonic::Popa | Mnemonic::Popad => {
            op.size = stack_size(insn) / 8;
            op.exec = ops::popa;
        }
        Mnemonic::Pushf | Mnemonic::Pushfd | Mnemonic::Pushfq => {
            op.size = stack_size(insn);
            op.exec = system::pushf;
        }
        Mnemonic::Popf | Mnemonic::Popfd | Mnemonic::Popfq => {
            op.size = stack_size(insn);
            op.exec = system::popf;
        }
        Mnemonic::Enter => {
            op.size = name_size(code);
            op.target = insn.immediate16() as u64;
            op.aux = insn.immediate8_2nd();
            op.exec = ops::enter;
        }
        Mnemonic::Leave => {
            op.size = name_size(code);
            op.exec = ops::leave;
        }
        Mnemonic::Jmp => match insn.op_kind(0) {
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                op.target = insn.near_branch_target();
                op.exec = ops::jmp;
            }
            OpKind::FarBranch16 | OpKind::FarBranch32 => {
                set_far_branch_target(insn, &mut op);
                op.exec = system::far_transfer;
            }
            _ => {
                if matches!(code, Code::Jmp_m1616 | Code::Jmp_m1632 | Code::Jmp_m1664) {
                    op.size = name_size(code);
                    op.src = op.dst;
                    op.exec = system::far_transfer;
                } else {
                    op.exec = ops::jmp_ind;
                }
            }
        },
        Mnemonic::Call => match insn.op_kind(0) {
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                op.target = insn.near_branch_target();
                op.size = stack_size(insn);
                op.exec = ops::call;
            }
            OpKind::FarBranch16 | OpKind::FarBranch32 => {
                set_far_branch_target(insn, &mut op);
                op.aux = 1;
                op.exec = system::far_transfer;
            }
            _ => {
                if matches!(code, Code::Call_m1616 | Code::Call_m1632 | Code::Call_m1664) {
                    op.size = name_size(code);
                    op.src = op.dst;
                    op.aux = 1;
                    op.exec = system::far_transfer;
                } else {
                    op.exec = ops::call_ind;
                }
            }
        },
        Mnemonic::Ret => {
            let imm = if insn.op_count() > 0 {
                insn.immediate16() as u64
            } else {
                0
            };
            op.size = (stack_size(insn) as u64 - imm) as u8;
            op.target = imm;
            op.exec = ops::ret;
        }
        Mnemonic::Retf => {
            let imm = if insn.op_count() > 0 {
                insn.immediate16() as u64
            } else {
                0
            };
            op.size = name_size(code);
            op.target = imm;
            op.exec = system::far_ret;
        }
        Mnemonic::Iret | Mnemonic::Iretd | Mnemonic::Iretq => {
            op.size = match code {
                Code::Iretw => 2,
                Code::Iretd => 4,
                _ => 8,
            };
            op.exec = system::iret;
        }
        Mnemonic::Jo
        | Mnemonic::Jno
        | Mnemonic::Jb
        | Mnemonic::Jae
        | Mnemonic::Je
        | Mnemonic::Jne
        | Mnemonic::Jbe
        | Mnemonic::Ja
        | Mnemonic::Js
        | Mnemonic::Jns
        | Mnemonic::Jp
        | Mnemonic::Jnp
        | Mnemonic::Jl
        | Mnemonic::Jge
        | Mnemonic::Jle
        | Mnemonic::Jg => {
            op.aux = insn.condition_code() as u8 - 1;
            op.target = insn.near_branch_target();
            op.exec = ops::jcc;
        }
        Mnemonic::Loop
        | Mnemonic::Loope
        | Mnemonic::Loopne
        | Mnemonic::Jcxz
        | Mnemonic::Jecxz
        | Mnemonic::Jrcxz => {
            op.target = insn.near_branch_target();
            op.src = Operand::Imm(match m {
                Mnemonic::Loop => 0,
                Mnemonic::Loope => 1,
                Mnemonic::Loopne => 2,
                _ => 3,
            });
            // The counter is CX, ECX or RCX by address size (a 0x67 prefix changes it):
            // the JCXZ mnemonics name it, the LOOP forms end with it.
            let name = format!("{code:?}");
            op.aux = match m {
                Mnemonic::Jcxz => 2,
                Mnemonic::Jecxz => 4,
                Mnemonic::Jrcxz => 8,
                _ if name.ends_with("_CX") => 2,
                _ if name.ends_with("_ECX") => 4,
                _ => 8,
            };
            op.exec = ops::loop_op;
        }
        Mnemonic::Seto
        | Mnemonic::Setno
        | Mnemonic::Setb
        | Mnemonic::Setae
        | Mnemonic::Sete
        | Mnemonic::Setne
        | Mnemonic::Setbe
        | Mnemonic::Seta
        | Mnemonic::Sets
        | Mnemonic::Setns
        | Mnemonic::Setp
        | Mnemonic::Setnp
        | Mnemonic::Setl
        | Mnemonic::Setge
        | Mnemonic::Setle
        | Mnemonic::Setg => {
            op.aux = insn.condition_code() as u8 - 1;
            op.exec = ops::setcc;
        }
        Mnemonic::Cmovo
        | Mnemonic::Cmovno
        | Mnemonic::Cmovb
        | Mnemonic::Cmovae
        | Mnemonic::Cmove
        | Mnemonic::Cmovne
        | Mnemonic::Cmovbe
        | Mnemonic::Cmova
        | Mnemonic::Cmovs
        | Mnemonic::Cmovns
        | Mnemonic::Cmovp
        | Mnemonic::Cmovnp
        | Mnemonic::Cmovl
        | Mnemonic::Cmovge
        | Mnemonic::Cmovle
        | Mnemonic::Cmovg => {
            op.aux = insn.condition_code() as u8 - 1;
            op.exec = ops::cmov;
        }
        Mnemonic::Cbw | Mnemonic::Cwde | Mnemonic::Cdqe => {
            op.size = match m {
                Mnemonic::Cbw => 2,
                Mnemonic::Cwde => 4,
                _ => 8,
            };
            op.exec = ops::cbw;
        }
        Mnemonic::Cwd | Mnemonic::Cdq | Mnemonic::Cqo => {
            op.size = match m {
                Mnemonic::Cwd => 2,
                Mnemonic::Cdq => 4,
                _ => 8,
            };
            op.exec = ops::cwd;
        }
        Mnemonic::Bswap => op.exec = ops::bswap,
        Mnemonic::Movbe => op.exec = ops::movbe,
        Mnemonic::Xadd => op.exec = ops::xadd,
        Mnemonic::Cmpxchg => op.exec = ops::cmpxchg,
        Mnemonic::Cmpxchg8b | Mnemonic::Cmpxchg16b => {
            op.size = if m == Mnemonic::Cmpxchg8b { 8 } else { 16 };
            op.exec = ops::cmpxchg_wide;
        }
        Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc => {
            op.aux = match m {
                Mnemonic::Bt => 0,
                Mnemonic::Bts => 1,
                Mnemonic::Btr => 2,
                _ => 3,
            };
            if let Operand::Imm(v) = op.src {
                op.src = Operand::Imm(v & 0xff);
            }
            op.exec = ops::bt;
        }
        Mnemonic::Bsf | Mnemonic::Bsr | Mnemonic::Tzcnt | Mnemonic::Lzcnt | Mnemonic::Popcnt => {
            op.aux = match m {
                Mnemonic::Bsf => 0,
                Mnemonic::Bsr => 1,
                // Without BMI1 (LZCNT) the F3-prefixed encoding is BSF (BSR).
                Mnemonic::Tzcnt if features.has(iced_x86::CpuidFeature::BMI1) => 2,
                Mnemonic::Tzcnt => 0,
                Mnemonic::Lzcnt if features.has(iced_x86::CpuidFeature::LZCNT) => 3,
                Mnemonic::Lzcnt => 1,
                _ => 4,
            };
            op.exec = ops::bitscan;
        }
        Mnemonic::Clc | Mnemonic::Stc | Mnemonic::Cmc | Mnemonic::Cld | Mnemonic::Std => {
            op.aux = match m {
                Mnemonic::Clc => 0,
                Mnemonic::Stc => 1,
                Mnemonic::Cmc => 2,
                Mnemonic::Cld => 3,
                _ => 4,
            };
            op.exec = ops::flagop;
        }
        Mnemonic::Clflush | Mnemonic::Clflushopt | Mnemonic::Clwb => op.exec = ops::cache_line,
        Mnemonic::Crc32 => {
            op.aux = op_size(insn, 1);
            op.exec = ops::crc32;
        }
        Mnemonic::Lahf => op.exec = ops::lahf,
        Mnemonic::Sahf => op.exec = ops::sahf,
        Mnemonic::Daa | Mnemonic::Das | Mnemonic::Aaa | Mnemonic::Aas => {
            op.aux = match m {
                Mnemonic::Daa => 0,
                Mnemonic::Das => 1,
                Mnemonic::Aaa => 2,
                _ => 3,
            };
            op.exec = ops::bcd_adjust;
        }
        Mnemonic::Aam | Mnemonic::Aad => {
            op.aux = (m == Mnemonic::Aad) as u8;
            op.target = insn.immediate8() as u64;
            op.exec = ops::aam_aad;
        }
        Mnemonic::Movsb
        | Mnemonic::Movsw
        | Mnemonic::Movsd
        | Mnemonic::Movsq
        | Mnemonic::Stosb
        | Mnemonic::Stosw
        | Mnemonic::Stosd
        | Mnemonic::Stosq
        | Mnemonic::Lodsb
        | Mnemonic::Lodsw
        | Mnemonic::Lodsd
        | Mnemonic::Lodsq
        | Mnemonic::Cmpsb
        | Mnemonic::Cmpsw
        | Mnemonic::Cmpsd
        | Mnemonic::Cmpsq
        | Mnemonic::Scasb
        | Mnemonic::Scasw
        | Mnemonic::Scasd
        | Mnemonic::Scasq
        | Mnemonic::Insb
        | Mnemonic::Insw
        | Mnemonic::Insd
        | Mnemonic::Outsb
        | Mnemonic::Outsw
        | Mnemonic::Outsd
            if insn.is_string_instruction() =>
        {
            build_string(insn, &mut op);
        }
        Mnemonic::In => {
            op.size = op_size(insn, 0);
            op.exec = system::op_in;
        }
        Mnemonic::Out => {
            op.size = op_size(insn, 1);
            op.exec = system::op_out;
        }
        Mnemonic::Hlt => op.exec = system::hlt,
        Mnemonic::Bound => op.exec = system::bound,
        Mnemonic::Cli => {
            op.aux = 0;
            op.exec = system::cli_sti;
        }
        Mnemonic::Sti => {
            op.aux = 1;
            op.exec = system::cli_sti;
        }
        Mnemonic::Int | Mnemonic::Int3 | Mnemonic::Into | Mnemonic::Int1 => {
            op.target = match m {
                Mnemonic::Int => insn.immediate8() as u64,
                Mnemonic::Int3 => 3,
                Mnemonic::Int1 => 1,
                _ => 4,
            };
            op.aux = match m {
                Mnemonic::Into => 1,
                Mnemonic::Int3 | Mnemonic::Int1 => 2,
                _ => 0,
            };
            op.exec = system::int_n;
        }
        Mnemonic::Lgdt | Mnemonic::Lidt | Mnemonic::Sgdt | Mnemonic::Sidt => {
            op.aux = match m {
                Mnemonic::Lgdt => 0,
                Mnemonic::Lidt => 1,
                Mnemonic::Sgdt => 2,
                _ => 3,
            };
            op.size = if matches!(code, Code::Lgdt_m1632_16 | Code::Lidt_m1632_16) {
                2
            } else {
                4
            };
            op.exec = system::desc_table;
        }
        Mnemonic::Lldt | Mnemonic::Ltr | Mnemonic::Sldt | Mnemonic::Str => {
            op.aux = match m {
                Mnemonic::Lldt => 0,
                Mnemonic::Ltr => 1,
                Mnemonic::Sldt => 2,
                _ => 3,
            };
            op.exec = system::ldt_tr;
        }
        Mnemonic::Lar | Mnemonic::Lsl | Mnemonic::Verr | Mnemonic::Verw | Mnemonic::Arpl => {
            op.aux = match m {
                Mnemonic::Lar => system::selector_query::LAR,
                Mnemonic::Lsl => system::selector_query::LSL,
                Mnemonic::Verr => system::selector_query::VERR,
                Mnemonic::Verw => system::selector_query::VERW,
                _ => system::selector_query::ARPL,
            };
            op.exec = system::selector_query;
        }
        Mnemonic::Invlpg => op.exec = system::invlpg,
        Mnemonic::Stac | Mnemonic::Clac => {
            op.aux = (m == Mnemonic::Stac) as u8;
            op.exec = system::stac_clac;
        }
        Mnemonic::Cpuid => op.exec = system::cpuid,
        Mnemonic::Rdtsc | Mnemonic::Rdtscp => {
            op.aux = (m == Mnemonic::Rdtscp) as u8;
            op.exec = system::rdtsc;
        }
        Mnemonic::Rdpmc => op.exec = system::rdpmc,
        Mnemonic::Rdrand | Mnemonic::Rdseed => op.exec = system::rdrand,
        Mnemonic::Rdmsr | Mnemonic::Wrmsr => {
            op.aux = (m == Mnemonic::Wrmsr) as u8;
            op.exec = system::msr_op;
        }
        Mnemonic::Swapgs => op.exec = system::swapgs,
        Mnemonic::Syscall => op.exec = system::syscall,
        Mnemonic::Sysret | Mnemonic::Sysretq => {
            op.size = if code == Code::Sysretq { 8 } else { 4 };
            op.exec = system::sysret;
        }
        Mnemonic::Sysenter => op.exec = system::sysenter,
        Mnemonic::Sysexit | Mnemonic::Sysexitq => {
            op.size = if code == Code::Sysexitq { 8 } else { 4 };
            op.exec = system::sysexit;
        }
        Mnemonic::Clts => op.exec = system::clts,
        Mnemonic::Lmsw | Mnemonic::Smsw => {
            op.aux = (m == Mnemonic::Smsw) as u8;
            op.exec = system::msw;
        }
        Mnemonic::Wbinvd | Mnemonic::Invd => op.exec = system::priv_nop,
        Mnemonic::Lds | Mnemonic::Les | Mnemonic::Lfs | Mnemonic::Lgs | Mnemonic::Lss => {
            op.aux = match m {
                Mnemonic::Les => 0,
                Mnemonic::Lss => 2,
                Mnemonic::Lds => 3,
                Mnemonic::Lfs => 4,
                _ => 5,
            };
            op.exec = system::load_far_pointer;
        }
        Mnemonic::Ud2 | Mnemonic::Ud0 | Mnemonic::Ud1 => op.exec = system::ud,
        _ => {
            sse::build(insn, bitness, &mut op, features);
        }
    }
    op
}

/// Encodings a CPU without their feature runs as an older instruction rather than raising
/// #UD: TZCNT (BMI1) and LZCNT (ABM) are REP-prefixed BSF and BSR there, and bt runs them
/// so when the table lacks the feature.
fn falls_back(m: Mnemonic) -> bool {
    matches!(m, Mnemonic::Tzcnt | Mnemonic::Lzcnt)
}

fn set_crdr(op: &mut UOp, r: u16, write: u8) {
    // SAFETY-free conversion: the iced register number back to the enum by range checks.
    let cr0 = Register::CR0 as u16;
    let dr0 = Register::DR0 as u16;
    op.aux = write;
    if (cr0..cr0 + 16).contains(&r) {
        op.target = (r - cr0) as u64;
        op.exec = system::mov_cr;
    } else if (dr0..dr0 + 16).contains(&r) {
        op.target = (r - dr0) as u64;
        op.exec = system::mov_dr;
    }
}

fn build_string(insn: &Instruction, op: &mut UOp) {
    let m = insn.mnemonic();
    let (kind, size) = match m {
        Mnemonic::Movsb => (string::MOVS, 1),
        Mnemonic::Movsw => (string::MOVS, 2),
        Mnemonic::Movsd => (string::MOVS, 4),
        Mnemonic::Movsq => (string::MOVS, 8),
        Mnemonic::Stosb => (string::STOS, 1),
        Mnemonic::Stosw => (string::STOS, 2),
        Mnemonic::Stosd => (string::STOS, 4),
        Mnemonic::Stosq => (string::STOS, 8),
        Mnemonic::Lodsb => (string::LODS, 1),
        Mnemonic::Lodsw => (string::LODS, 2),
        Mnemonic::Lodsd => (string::LODS, 4),
        Mnemonic::Lodsq => (string::LODS, 8),
        Mnemonic::Cmpsb => (string::CMPS, 1),
        Mnemonic::Cmpsw => (string::CMPS, 2),
        Mnemonic::Cmpsd => (string::CMPS, 4),
        Mnemonic::Cmpsq => (string::CMPS, 8),
        Mnemonic::Scasb => (string::SCAS, 1),
        Mnemonic::Scasw => (string::SCAS, 2),
        Mnemonic::Scasd => (string::SCAS, 4),
        Mnemonic::Scasq => (string::SCAS, 8),
        Mnemonic::Insb => (string::INS, 1),
        Mnemonic::Insw => (string::INS, 2),
        Mnemonic::Insd => (string::INS, 4),
        Mnemonic::Outsb => (string::OUTS, 1),
        Mnemonic::Outsw => (string::OUTS, 2),
        _ => (string::OUTS, 4),
    };
    let mut asize = 8;
    let mut sseg = 3u8;
    for i in 0..insn.op_count() {
        match insn.op_kind(i) {
            OpKind::MemorySegSI | OpKind::MemoryESDI | OpKind::MemorySegDI => asize = 2,
            OpKind::MemorySegESI | OpKind::MemoryESEDI | OpKind::MemorySegEDI => asize = 4,
            OpKind::MemorySegRSI | OpKind::MemoryESRDI | OpKind::MemorySegRDI => asize = 8,
            _ => {}
        }
        if matches!(
            insn.op_kind(i),
            OpKind::MemorySegSI | OpKind::MemorySegESI | OpKind::MemorySegRSI
        ) {
            sseg = (insn.memory_segment() as u32 - Register::ES as u32) as u8;
        }
    }
    let rep = if insn.has_repne_prefix() && matches!(kind, string::CMPS | string::SCAS) {
        string::REPNE
    } else if insn.has_rep_prefix() || insn.has_repe_prefix() || insn.has_repne_prefix() {
        string::REP
    } else {
        0
    };
    op.aux = kind | rep;
    op.size = size;
    op.target = asize;
    op.src = Operand::Sreg(sseg);
    op.dst = Operand::None;
    op.src2 = Operand::None;
    op.exec = ops::string_op;
}

/// The count a shift by immediate `count` of a `size`-byte operand actually uses (counts
/// are masked to 5 bits, 6 for 64-bit operands; a masked count of 0 leaves the flags alone).
fn shift_imm_count(size: u8, count: u64) -> u64 {
    count & if size == 8 { 0x3f } else { 0x1f }
}

/// Whether an instruction can fault or otherwise make the flags observable mid-block (so
/// the flags before it must be exact): anything but register-only ALU, multiplies, shifts
/// and rotates by a nonzero immediate count, moves and branches. (A shift whose masked count
/// is 0 passes the flags through, which the written/read analysis cannot express; RCL/RCR
/// read CF, which iced's flags-read information says.)
fn may_observe(op: &UOp, insn: &Instruction) -> bool {
    use Mnemonic as M;
    let mem = op.dst.is_mem() || op.src.is_mem() || op.src2.is_mem();
    let shift_by_imm = matches!(
        insn.mnemonic(),
        M::Rol | M::Ror | M::Rcl | M::Rcr | M::Shl | M::Sal | M::Shr | M::Sar
    ) && matches!(op.src, Operand::Imm(c) if shift_imm_count(op.size, c) != 0);
    let cheap = shift_by_imm
        || matches!(
            insn.mnemonic(),
            M::Add
                | M::Or
                | M::Adc
                | M::Sbb
                | M::And
                | M::Sub
                | M::Xor
                | M::Cmp
                | M::Test
                | M::Mov
                | M::Movzx
                | M::Movsx
                | M::Movsxd
                | M::Lea
                | M::Inc
                | M::Dec
                | M::Neg
                | M::Not
                | M::Nop
                | M::Jmp
                | M::Jo
                | M::Jno
                | M::Jb
                | M::Jae
                | M::Je
                | M::Jne
                | M::Jbe
                | M::Ja
                | M::Js
                | M::Jns
                | M::Jp
                | M::Jnp
                | M::Jl
                | M::Jge
                | M::Jle
                | M::Jg
                | M::Imul
                | M::Mul
        ) && !matches!(op.dst, Operand::Sreg(_) | Operand::Other(_))
            && !matches!(op.src, Operand::Sreg(_) | Operand::Other(_));
    mem || !cheap
}

/// Dead-flag elimination: marks each op whose written arithmetic flags are all overwritten
/// before being read (within the block, with every possibly faulting op reading all flags,
/// and all flags live at the block's end).
pub fn eliminate_dead_flags(ops: &mut [UOp], insns: &[Instruction]) {
    const ARITH: u32 = RflagsBits::OF
        | RflagsBits::SF
        | RflagsBits::ZF
        | RflagsBits::AF
        | RflagsBits::CF
        | RflagsBits::PF;
    let mut live = ARITH;
    for (op, insn) in ops.iter_mut().zip(insns).rev() {
        let written = insn.rflags_modified() & ARITH;
        let read = insn.rflags_read() & ARITH;
        op.flags_live = written & live != 0 || written == 0;
        if may_observe(op, insn) {
            live = ARITH;
        } else {
            live = (live & !written) | read;
        }
    }
}

/// Direct far JMP/CALL: operand size, offset and selector from the instruction.
fn set_far_branch_target(insn: &Instruction, op: &mut UOp) {
    if insn.op_kind(0) == OpKind::FarBranch16 {
        op.size = 2;
        op.target = u64::from(insn.far_branch16());
    } else {
        op.size = 4;
        op.target = u64::from(insn.far_branch32());
    }
    op.src2 = Operand::Imm(u64::from(insn.far_branch_selector()));
    op.src = Operand::None;
}
