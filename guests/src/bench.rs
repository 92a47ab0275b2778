//! Benchmark guests: each runs one operation in a loop of a known iteration count and marks
//! the start and the end of the measured loop by writing the bench-marker port, so that a
//! harness can time exactly the loop (boot, setup and exit stay outside the measurement).
//!
//! Protocol: the guest writes [`MARK_START`] and then [`MARK_END`] (one byte each) to
//! [`BENCH_MARKER_PORT`], runs the operation [`Bench::iterations`] times in between, and
//! exits 0 through isa-debug-exit. The deja-pc machine has no device on that port (a write
//! there is an ignored device access), so `deja run guest:bench-NAME` runs the loop and
//! exits normally; the bench harness adds a marker device there that stops the run at each
//! mark. The loop counter lives in R15 and the loop's own `dec r15; jnz` is part of every
//! iteration (about one cycle natively, two instructions under emulation).

use crate::link::LinkError;
use crate::rt::{BootMessages, EXIT_PASS, long_mode_image};
use deja_machine::loader::Image;
use iced_x86::code_asm::*;

/// The port a benchmark guest writes to mark the start and the end of its measured loop.
/// Unused on QEMU's pc and on deja-pc (0xe9 would be Bochs' debug console; 0xe8 is free).
pub const BENCH_MARKER_PORT: u16 = 0xe8;
/// The byte written to [`BENCH_MARKER_PORT`] just before the first iteration.
pub const MARK_START: u8 = 0x01;
/// The byte written to [`BENCH_MARKER_PORT`] just after the last iteration.
pub const MARK_END: u8 = 0x02;
/// Instructions one mark takes (`MOV AL, imm8; OUT imm8, AL`): the end mark's are counted
/// between the marks, and harnesses take them out.
pub const MARK_INSTRUCTIONS: u64 = 2;
/// The port `bench-in` reads and `bench-out` writes: no device claims it, so every access
/// is a device exit that the machine answers with all ones (reads) or drops (writes).
pub const UNUSED_PORT: u16 = 0xec;
/// Where `bench-memory` keeps its buffer (inside the identity-mapped first 2 MiB).
const MEMORY_BUFFER: i32 = 0x10_0000;
/// The size of `bench-memory`'s buffer: 64 KiB, larger than an L1 data cache.
pub const MEMORY_BUFFER_BYTES: u32 = 0x1_0000;

/// The benchmarks: one operation each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Bench {
    /// `IN AL, 0xec` from a port no device claims: a port-I/O exit per operation.
    In,
    /// `OUT 0xec, AL` to a port no device claims.
    Out,
    /// `CPUID` leaf 0: always intercepted by hardware virtualization.
    Cpuid,
    /// A near `CALL` to a function that only `RET`s.
    CallRet,
    /// `DIV` by zero raising #DE, whose handler skips the instruction and `IRETQ`s.
    DivZero,
    /// A dependent chain of integer ALU operations (multiply, add, rotate, xor).
    Integer,
    /// Loads striding through a 64 KiB buffer, one cache line per operation.
    Memory,
    /// A call-heavy computation: three nested calls with arithmetic in each.
    Call,
}

impl Bench {
    /// Every benchmark, in a stable order.
    pub const ALL: [Bench; 8] = [
        Bench::In,
        Bench::Out,
        Bench::Cpuid,
        Bench::CallRet,
        Bench::DivZero,
        Bench::Integer,
        Bench::Memory,
        Bench::Call,
    ];

    /// The benchmark's short name (the guest is `bench-NAME`).
    pub fn name(self) -> &'static str {
        match self {
            Bench::In => "in",
            Bench::Out => "out",
            Bench::Cpuid => "cpuid",
            Bench::CallRet => "call-ret",
            Bench::DivZero => "divzero",
            Bench::Integer => "integer",
            Bench::Memory => "memory",
            Bench::Call => "call",
        }
    }

    /// The benchmark called `name` (without the `bench-` prefix).
    pub fn from_name(name: &str) -> Option<Bench> {
        Bench::ALL.into_iter().find(|b| b.name() == name)
    }

    /// What one operation is.
    pub fn description(self) -> &'static str {
        match self {
            Bench::In => "IN from an unclaimed port (a port-I/O exit per operation)",
            Bench::Out => "OUT to an unclaimed port (a port-I/O exit per operation)",
            Bench::Cpuid => "CPUID leaf 0 (intercepted by hardware virtualization)",
            Bench::CallRet => "a near CALL to a bare RET",
            Bench::DivZero => "DIV by zero: #DE delivered, the handler skips the DIV, IRETQ",
            Bench::Integer => "a dependent chain of IMUL, ADD, ROR, XOR",
            Bench::Memory => "a load striding one cache line through a 64 KiB buffer",
            Bench::Call => "three nested calls with arithmetic in each",
        }
    }

    /// Whether the same loop can run in a host process (no privileged instruction, no
    /// device): the harness then measures a native column.
    pub fn runs_natively(self) -> bool {
        matches!(
            self,
            Bench::CallRet | Bench::Integer | Bench::Memory | Bench::Call
        )
    }

    /// The iteration count the registry's `bench-NAME` guests use.
    pub fn default_iterations(self) -> u32 {
        1000
    }

    /// The guest image running `iterations` operations (at least 1).
    pub fn image(self, iterations: u32) -> Result<Image, LinkError> {
        build(self, iterations.max(1))
    }
}

fn mark(a: &mut CodeAssembler, value: u8) -> Result<(), IcedError> {
    a.mov(al, i32::from(value))?;
    a.out(u32::from(BENCH_MARKER_PORT), al)
}

fn build(bench: Bench, iterations: u32) -> Result<Image, LinkError> {
    let name = format!("bench-{}", bench.name());
    let handlers: &[(u8, &'static str)] = match bench {
        Bench::DivZero => &[(0, "bench_de")],
        _ => &[],
    };
    long_mode_image(&name, BootMessages::default(), handlers, &|s, rt| {
        if bench == Bench::DivZero {
            rt.load_idt(s)?;
        }
        let a = &mut s.a;
        let mut func = a.create_label();
        let mut f2 = a.create_label();
        let mut f3 = a.create_label();
        let mut top = a.create_label();
        // Operands every loop may use: RBX a multiplier, RSI the buffer, RDX an offset.
        a.mov(rbx, 0x5851_f42d_4c95_7f2du64)?;
        a.mov(esi, MEMORY_BUFFER)?;
        a.xor(edx, edx)?;
        a.mov(eax, 1)?;
        a.mov(r15d, iterations)?;
        mark(a, MARK_START)?;
        a.set_label(&mut top)?;
        match bench {
            Bench::In => {
                a.in_(al, u32::from(UNUSED_PORT))?;
            }
            Bench::Out => {
                a.out(u32::from(UNUSED_PORT), al)?;
            }
            Bench::Cpuid => {
                a.xor(eax, eax)?;
                a.cpuid()?;
            }
            Bench::CallRet => {
                a.call(func)?;
            }
            Bench::DivZero => {
                a.xor(ecx, ecx)?;
                a.xor(edx, edx)?;
                a.div(rcx)?; // 3 bytes: 48 f7 f1; the handler skips them
            }
            Bench::Integer => {
                a.imul_2(rax, rbx)?;
                a.add(rax, r15)?;
                a.ror(rax, 13)?;
                a.xor(rax, rbx)?;
            }
            Bench::Memory => {
                a.add(rax, qword_ptr(rsi + rdx))?;
                a.add(edx, 64)?;
                a.and(edx, (MEMORY_BUFFER_BYTES - 1) as i32)?;
            }
            Bench::Call => {
                a.call(func)?;
            }
        }
        a.dec(r15)?;
        a.jnz(top)?;
        mark(a, MARK_END)?;
        rt.exit_with(s, EXIT_PASS)?;

        let a = &mut s.a;
        a.set_label(&mut func)?;
        if bench == Bench::Call {
            a.add(rax, 3)?;
            a.call(f2)?;
            a.imul_2(rax, rbx)?;
            a.ret()?;
            a.set_label(&mut f2)?;
            a.xor(rax, r15)?;
            a.call(f3)?;
            a.ror(rax, 7)?;
            a.ret()?;
            a.set_label(&mut f3)?;
            a.add(rax, rbx)?;
        }
        a.ret()?;
        if bench == Bench::DivZero {
            s.export_here("bench_de")?;
            s.a.add(qword_ptr(rsp), 3)?;
            s.a.iretq()?;
        }
        Ok(())
    })
}

pub(crate) fn build_in() -> Result<Image, LinkError> {
    Bench::In.image(Bench::In.default_iterations())
}
pub(crate) fn build_out() -> Result<Image, LinkError> {
    Bench::Out.image(Bench::Out.default_iterations())
}
pub(crate) fn build_cpuid() -> Result<Image, LinkError> {
    Bench::Cpuid.image(Bench::Cpuid.default_iterations())
}
pub(crate) fn build_call_ret() -> Result<Image, LinkError> {
    Bench::CallRet.image(Bench::CallRet.default_iterations())
}
pub(crate) fn build_divzero() -> Result<Image, LinkError> {
    Bench::DivZero.image(Bench::DivZero.default_iterations())
}
pub(crate) fn build_integer() -> Result<Image, LinkError> {
    Bench::Integer.image(Bench::Integer.default_iterations())
}
pub(crate) fn build_memory() -> Result<Image, LinkError> {
    Bench::Memory.image(Bench::Memory.default_iterations())
}
pub(crate) fn build_call() -> Result<Image, LinkError> {
    Bench::Call.image(Bench::Call.default_iterations())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bench_marks_start_and_end_exactly_once() {
        for b in Bench::ALL {
            let image = b.image(7).unwrap();
            // Scan all byte offsets: the marks are `mov al, imm8; out 0xe8, al`.
            let marks: Vec<u8> = image
                .bytes
                .windows(4)
                .filter(|w| w[0] == 0xb0 && w[2] == 0xe6 && w[3] == BENCH_MARKER_PORT as u8)
                .map(|w| w[1])
                .collect();
            assert_eq!(marks, vec![MARK_START, MARK_END], "{}", b.name());
            assert_eq!(Bench::from_name(b.name()), Some(b));
        }
    }

    #[test]
    fn the_iteration_count_is_in_the_image() {
        let a = Bench::Cpuid.image(0x1234_5678).unwrap();
        assert!(
            a.bytes
                .windows(4)
                .any(|w| w == 0x1234_5678u32.to_le_bytes())
        );
    }
}
