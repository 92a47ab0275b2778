//! Tier 1 against tier 0 (issue #12): seeded random blocks — integer instructions of every
//! operand size and form, memory operands that hit, miss, cross pages and fault, stack
//! operations, branches, stores into the running code, ring 3 and ring 0 — run once on the
//! interpreter and once with every block compiled. At every exit the two must agree on the
//! exit, the instruction count, every register and flag (the architecturally undefined ones
//! too: the tier is not part of a trace), and memory.

mod common;

use common::{Rng, load, machine, peek};
use deja_bt::BtCpu;
use deja_bt::jit::Tier;
use deja_machine::cpu::CpuState;
use deja_machine::{Cpu, Exit, Limit, Machine};
use iced_x86::code_asm::*;
use iced_x86::{Decoder, DecoderOptions, Formatter, NasmFormatter};

const CODE: u64 = 0x20_0000;
const DATA: u64 = 0x30_0000;
const TABLES: u64 = 0x10_0000;
/// An address the page tables leave unmapped: accesses there fault.
const UNMAPPED: u64 = 0x4000_0000;
const STACK_TOP: u64 = 0x38_0000;

/// 64-bit mode at `cpl`, the first 4 MiB identity-mapped with user-writable 2 MiB pages.
fn state(m: &Machine, cpl: u8) -> CpuState {
    common::flat_long_mode(m, TABLES, CODE, cpl)
}

// R14 holds the data page, R15 an unmapped address, RSP the stack: generated code never
// writes them (R12 and R13 are free operands).
const R64: [AsmRegister64; 13] = [
    rax, rcx, rdx, rbx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13,
];
const R32: [AsmRegister32; 13] = [
    eax, ecx, edx, ebx, esi, edi, ebp, r8d, r9d, r10d, r11d, r12d, r13d,
];
const R16: [AsmRegister16; 6] = [ax, cx, dx, bx, si, r9w];
const R8: [AsmRegister8; 8] = [al, cl, dl, bl, sil, dil, r8b, r12b];
const HI8: [AsmRegister8; 4] = [ah, ch, dh, bh];
const LEGACY8: [AsmRegister8; 4] = [al, cl, dl, bl];

/// A memory operand: mostly in the data page, sometimes across its end into the next page,
/// sometimes unmapped (a #PF), sometimes RIP-relative into the code (a store there is
/// self-modifying code).
fn mem_at(r: &mut Rng) -> AsmMemoryOperand {
    match r.below(24) {
        0 => r15 + 0,
        1 => r14 + (4090 + r.below(6) as i32),
        2 => r14 + rcx * 2 + 3,
        _ => r14 + (r.below(512) * 4) as i32 + r.below(4) as i32,
    }
}

/// One random instruction.
fn random_insn(a: &mut CodeAssembler, r: &mut Rng) -> Result<(), IcedError> {
    let x = R64[r.below(13) as usize];
    let y = R64[r.below(13) as usize];
    let x32 = R32[r.below(13) as usize];
    let y32 = R32[r.below(13) as usize];
    let x16 = R16[r.below(6) as usize];
    let y16 = R16[r.below(6) as usize];
    let x8 = R8[r.below(8) as usize];
    let y8 = R8[r.below(8) as usize];
    let imm = r.next() as i32;
    let cnt = r.below(70) as u32;
    let m = mem_at(r);
    match r.below(77) {
        0 => a.add(x, y),
        1 => a.sub(x32, y32),
        2 => a.adc(x16, y16),
        3 => a.sbb(x8, y8),
        4 => a.and(x, imm),
        5 => a.or(x32, imm),
        6 => a.xor(x16, imm as i16 as i32),
        7 => a.cmp(x8, imm as i8 as i32),
        8 => a.test(x, y),
        9 => a.test(x8, y8),
        10 => a.add(qword_ptr(m), x),
        11 => a.sub(dword_ptr(m), y32),
        12 => a.and(x16, word_ptr(m)),
        13 => a.or(byte_ptr(m), imm as i8 as i32),
        14 => a.cmp(qword_ptr(m), imm),
        15 => a.mov(qword_ptr(m), x),
        16 => a.mov(x32, dword_ptr(m)),
        17 => a.mov(word_ptr(m), x16),
        18 => a.mov(x8, byte_ptr(m)),
        19 => a.mov(x, imm as i64 * 0x1_0001),
        20 => a.inc(x32),
        21 => a.dec(qword_ptr(m)),
        22 => a.neg(x16),
        23 => a.not(byte_ptr(m)),
        24 => a.shl(x, cnt),
        25 => a.shr(x32, 1),
        26 => a.sar(x16, cl),
        27 => a.rol(x8, cnt),
        28 => a.ror(dword_ptr(m), cl),
        29 => a.rcl(x, 1),
        30 => a.rcr(x32, cnt),
        31 => a.shld(x, y, cnt as i32),
        32 => a.shrd(x32, y32, cl),
        33 => a.imul_2(x, y),
        34 => a.imul_3(x32, dword_ptr(m), imm),
        35 => a.mul(y32),
        36 => a.imul(qword_ptr(m)),
        37 => a.bt(x, cnt),
        38 => a.bts(x32, y32),
        39 => a.btr(qword_ptr(m), cnt),
        40 => a.bsf(x, y),
        41 => a.bsr(x32, dword_ptr(m)),
        42 => a.cmovb(x, y),
        43 => a.cmovle(x32, dword_ptr(m)),
        44 => a.setg(x8),
        45 => a.setp(byte_ptr(m)),
        46 => a.xchg(x, y),
        47 => a.xchg(dword_ptr(m), x32),
        48 => a.xadd(x16, y16),
        49 => a.movzx(x32, y8),
        50 => a.movsx(x, word_ptr(m)),
        51 => a.movsxd(x, y32),
        52 => a.lea(x, qword_ptr(y + x * 4 + imm)),
        53 => a.lea(x32, dword_ptr(y32 + imm)),
        54 => a.bswap(x),
        55 => match r.below(6) {
            0 => a.cbw(),
            1 => a.cwde(),
            2 => a.cdqe(),
            3 => a.cwd(),
            4 => a.cdq(),
            _ => a.cqo(),
        },
        56 => match r.below(3) {
            0 => a.clc(),
            1 => a.stc(),
            _ => a.cmc(),
        },
        57 => a.popcnt(x, y),
        58 => a.push(x),
        59 => a.pop(x),
        60 => a.push(imm),
        61 => a.add(HI8[r.below(4) as usize], LEGACY8[r.below(4) as usize]),
        // A conditional branch over the next instruction (ends the block).
        62 | 63 => {
            let mut skip = a.create_label();
            match r.below(6) {
                0 => a.jne(skip)?,
                1 => a.jb(skip)?,
                2 => a.jle(skip)?,
                3 => a.jo(skip)?,
                4 => a.jp(skip)?,
                _ => a.jg(skip)?,
            }
            a.not(x)?;
            a.set_label(&mut skip)?;
            a.nop()
        }
        // A call to the next instruction, which pops the return address.
        64 => {
            let mut next = a.create_label();
            a.call(next)?;
            a.set_label(&mut next)?;
            a.pop(x)
        }
        // A return to the next instruction.
        65 => {
            let mut next = a.create_label();
            a.lea(rax, qword_ptr(next))?;
            a.push(rax)?;
            a.ret()?;
            a.set_label(&mut next)?;
            a.nop()
        }
        66 => {
            let mut next = a.create_label();
            a.jmp(next)?;
            a.set_label(&mut next)?;
            a.nop()
        }
        // A store into the code just ahead (self-modifying code: the block it hits is
        // dropped, the running one ends after the store).
        67 => {
            let mut ahead = a.create_label();
            a.mov(byte_ptr(ahead), 0x90)?;
            a.nop()?;
            a.set_label(&mut ahead)?;
            a.nop()
        }
        68 => a.adc(byte_ptr(m), y8),
        69 => a.sbb(qword_ptr(m), imm),
        70 => a.out(0xe9, al),
        72 => a.shr(x, cnt),
        73 => a.sar(x32, cnt),
        74 => a.shl(x16, cnt),
        75 => a.shr(x8, cnt),
        76 => a.shr(qword_ptr(m), cnt),
        _ => a.lock().add(qword_ptr(m), x),
    }
}

fn listing(code: &[u8]) -> String {
    let mut f = NasmFormatter::new();
    let mut out = String::new();
    for insn in Decoder::with_ip(64, code, CODE, DecoderOptions::NONE) {
        let mut s = String::new();
        f.format(&insn, &mut s);
        out.push_str(&format!("  {:#x}: {s}\n", insn.ip()));
    }
    out
}

/// What one exit left: the exit, the instruction count, the CPU state, the data pages.
#[derive(Debug, PartialEq)]
struct Stop {
    exit: String,
    icount: u64,
    state: CpuState,
    data: Vec<u8>,
}

/// Runs `code` from `init` on a fresh machine with `tier`, stopping at every exit (and at
/// `stops`, instruction counts inside blocks), until it shuts down, halts or 200 exits pass.
fn run(tier: Tier, code: &[u8], init: &CpuState, data: &[u8], stops: &[u64]) -> (Vec<Stop>, u64) {
    let (mut m, _, _) = machine();
    let _ = state(&m, 3);
    load(&m, CODE, code);
    load(&m, DATA, data);
    let mut cpu = BtCpu::new(&m).unwrap();
    cpu.set_tier(tier);
    cpu.set_state(init).unwrap();
    let mut out = Vec::new();
    let mut stops = stops.iter().copied().peekable();
    for _ in 0..200 {
        let limit = Limit {
            stop_at_icount: stops.peek().copied(),
            ..Limit::default()
        };
        let exit = cpu.run(&mut m, limit).unwrap();
        if exit == Exit::InstructionLimit {
            stops.next();
        }
        out.push(Stop {
            exit: format!("{exit:?}"),
            icount: cpu.icount(),
            state: cpu.state().unwrap(),
            data: peek(&m, DATA, 8192),
        });
        if !matches!(exit, Exit::DeviceAccess | Exit::InstructionLimit) {
            break;
        }
    }
    let tier1 = cpu.raw_stats().jit.instructions;
    assert!(
        cpu.jit_error().is_none(),
        "compile error: {:?}",
        cpu.jit_error()
    );
    (out, tier1)
}

/// One seed: a random program at ring `cpl`; returns the instructions tier 1 ran.
fn seed_case(seed: u64, cpl: u8) -> Result<u64, String> {
    let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut a = CodeAssembler::new(64).unwrap();
    for _ in 0..40 {
        random_insn(&mut a, &mut r).unwrap();
    }
    a.out(0xe9, al).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    let (m, _, _) = machine();
    let mut init = state(&m, cpl);
    for (i, g) in init.gpr.iter_mut().enumerate() {
        *g = match r.below(4) {
            0 => r.next(),
            1 => r.next() & 0xff,
            2 => u64::MAX - r.below(3),
            _ => 0x8000_0000_0000_0000 >> r.below(64),
        };
        if i == 1 {
            *g &= 0x3f; // shift counts and RCX-based addresses stay small
        }
    }
    init.gpr[4] = STACK_TOP - 8 * r.below(64);
    init.gpr[14] = DATA;
    init.gpr[15] = UNMAPPED;
    init.rflags = 2 | (3 << 12) | (r.next() & 0x8d5);
    let data: Vec<u8> = (0..8192).map(|_| r.next() as u8).collect();
    // Stops inside blocks too: a limit that falls inside a compiled block runs it on tier 0.
    let stops: Vec<u64> = (0..3)
        .map(|_| 1 + r.below(60))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let (reference, _) = run(Tier::Interpreter, &code, &init, &data, &stops);
    let (compiled, tier1) = run(Tier::Eager, &code, &init, &data, &stops);
    for (n, (a, b)) in reference.iter().zip(&compiled).enumerate() {
        if a != b {
            let mut diff = String::new();
            if a.exit != b.exit || a.icount != b.icount {
                diff += &format!(
                    "exit {} at {} vs {} at {}\n",
                    a.exit, a.icount, b.exit, b.icount
                );
            }
            for i in 0..16 {
                if a.state.gpr[i] != b.state.gpr[i] {
                    diff += &format!("gpr[{i}] {:#x} vs {:#x}\n", a.state.gpr[i], b.state.gpr[i]);
                }
            }
            if a.state.rflags != b.state.rflags {
                diff += &format!("rflags {:#x} vs {:#x}\n", a.state.rflags, b.state.rflags);
            }
            if a.state.rip != b.state.rip {
                diff += &format!("rip {:#x} vs {:#x}\n", a.state.rip, b.state.rip);
            }
            if a.data != b.data {
                let at = a
                    .data
                    .iter()
                    .zip(&b.data)
                    .position(|(x, y)| x != y)
                    .unwrap();
                diff += &format!("data differs first at +{at:#x}\n");
            }
            if diff.is_empty() {
                diff = format!("{:?}\nvs\n{:?}", a.state, b.state);
            }
            return Err(format!(
                "seed {seed} cpl {cpl}, stop {n} (tier 0 vs tier 1):\n{diff}{}",
                listing(&code)
            ));
        }
    }
    if reference.len() != compiled.len() {
        return Err(format!(
            "seed {seed}: {} stops vs {}",
            reference.len(),
            compiled.len()
        ));
    }
    Ok(tier1)
}

#[test]
fn tier1_matches_tier0_on_random_blocks() {
    let mut failures = Vec::new();
    let mut tier1 = 0;
    let seeds = 600;
    for seed in 0..seeds {
        for cpl in [3, 0] {
            match seed_case(seed, cpl) {
                Ok(n) => tier1 += n,
                Err(e) => failures.push(e),
            }
        }
    }
    let shown: Vec<_> = failures.iter().take(3).collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases differ; first:\n{}",
        failures.len(),
        seeds * 2,
        shown
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(tier1 > seeds * 20, "tier 1 ran only {tier1} instructions");
}
