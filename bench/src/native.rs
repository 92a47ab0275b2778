//! The native column: the loops of the benchmarks that need no privilege, run in the
//! harness process with the same instructions the guests execute (inline assembly, so the
//! compiler can neither drop nor reshape them).

use deja_guests::bench::{Bench, MEMORY_BUFFER_BYTES};
use std::time::{Duration, Instant};

/// Runs `bench`'s loop `iterations` times natively and returns the elapsed host time, or
/// `None` for a benchmark that cannot run in a host process.
pub fn run(bench: Bench, iterations: u32) -> Option<Duration> {
    let n = u64::from(iterations.max(1));
    let started;
    match bench {
        Bench::CallRet => {
            started = Instant::now();
            // SAFETY: the code only calls a local label that returns at once; it uses the
            // stack below RSP for the return address, which asm! allows without `nostack`.
            unsafe {
                std::arch::asm!(
                    "2:",
                    "call 3f",
                    "dec {n}",
                    "jnz 2b",
                    "jmp 4f",
                    "3:",
                    "ret",
                    "4:",
                    n = inout(reg) n => _,
                );
            }
        }
        Bench::Integer => {
            started = Instant::now();
            // SAFETY: register arithmetic only.
            unsafe {
                std::arch::asm!(
                    "2:",
                    "imul rax, {k}",
                    "add rax, {n}",
                    "ror rax, 13",
                    "xor rax, {k}",
                    "dec {n}",
                    "jnz 2b",
                    n = inout(reg) n => _,
                    inout("rax") 1u64 => _,
                    k = in(reg) 0x5851_f42d_4c95_7f2du64,
                    options(nostack),
                );
            }
        }
        Bench::Memory => {
            let buffer = vec![1u64; MEMORY_BUFFER_BYTES as usize / 8];
            let base = buffer.as_ptr();
            started = Instant::now();
            // SAFETY: RDX stays below MEMORY_BUFFER_BYTES (masked), so every load is inside
            // `buffer`, which outlives the block.
            unsafe {
                std::arch::asm!(
                    "2:",
                    "add rax, [rsi + rdx]",
                    "add edx, 64",
                    "and edx, {mask}",
                    "dec {n}",
                    "jnz 2b",
                    n = inout(reg) n => _,
                    mask = const MEMORY_BUFFER_BYTES - 1,
                    inout("rax") 0u64 => _,
                    inout("rdx") 0u64 => _,
                    in("rsi") base,
                    options(nostack, readonly),
                );
            }
            drop(buffer);
        }
        Bench::Call => {
            started = Instant::now();
            // SAFETY: register arithmetic and calls to local labels that return.
            unsafe {
                std::arch::asm!(
                    "2:",
                    "call 3f",
                    "dec r15",
                    "jnz 2b",
                    "jmp 6f",
                    "3:",
                    "add rax, 3",
                    "call 4f",
                    "imul rax, {k}",
                    "ret",
                    "4:",
                    "xor rax, r15",
                    "call 5f",
                    "ror rax, 7",
                    "ret",
                    "5:",
                    "add rax, {k}",
                    "ret",
                    "6:",
                    inout("r15") n => _,
                    inout("rax") 1u64 => _,
                    k = in(reg) 0x5851_f42d_4c95_7f2du64,
                );
            }
        }
        _ => return None,
    }
    Some(started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_loops_run_for_exactly_the_benchmarks_that_can() {
        for b in Bench::ALL {
            assert_eq!(run(b, 1000).is_some(), b.runs_natively(), "{}", b.name());
        }
    }

    #[test]
    fn more_iterations_take_longer() {
        let short = (0..5)
            .map(|_| run(Bench::Call, 1000).unwrap())
            .min()
            .unwrap();
        let long = (0..5)
            .map(|_| run(Bench::Call, 1_000_000).unwrap())
            .min()
            .unwrap();
        assert!(long > short * 10, "{short:?} vs {long:?}");
    }
}
