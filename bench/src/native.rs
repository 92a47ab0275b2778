//! The native column: the loops of the benchmarks that need no privilege, run in the
//! harness process with the same instructions the guests execute (inline assembly, so the
//! compiler can neither drop nor reshape them).

use deja_guests::bench::{Bench, MEMORY_BUFFER_BYTES};
use std::time::{Duration, Instant};

/// The multiplier the compute loops use (the guests keep it in RBX).
const K: u64 = 0x5851_f42d_4c95_7f2d;

/// Runs `bench`'s loop `iterations` times natively and returns the elapsed host time, or
/// `None` for a benchmark that cannot run in a host process.
pub fn run(bench: Bench, iterations: u32) -> Option<Duration> {
    run_with_result(bench, iterations).map(|(elapsed, _)| elapsed)
}

/// [`run`], plus the loop's final RAX (0 for `call-ret`, which computes nothing), so that
/// tests can check the loop ran exactly as often as asked.
pub fn run_with_result(bench: Bench, iterations: u32) -> Option<(Duration, u64)> {
    let n = u64::from(iterations.max(1));
    let started;
    let mut rax = 0u64;
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
                    inout("rax") 1u64 => rax,
                    k = in(reg) K,
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
                    inout("rax") 0u64 => rax,
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
                    inout("rax") 1u64 => rax,
                    k = in(reg) K,
                );
            }
        }
        _ => return None,
    }
    Some((started.elapsed(), rax))
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

    /// What the loops compute, in Rust: the counter runs from `n` down to 1.
    fn model(bench: Bench, n: u64) -> u64 {
        let mut rax = match bench {
            Bench::Integer | Bench::Call => 1u64,
            _ => 0,
        };
        for counter in (1..=n).rev() {
            match bench {
                Bench::Integer => {
                    rax = rax.wrapping_mul(K).wrapping_add(counter).rotate_right(13) ^ K;
                }
                // Every buffer word is 1.
                Bench::Memory => rax += 1,
                Bench::Call => {
                    rax = rax.wrapping_add(3);
                    rax ^= counter;
                    rax = rax.wrapping_add(K);
                    rax = rax.rotate_right(7);
                    rax = rax.wrapping_mul(K);
                }
                _ => {}
            }
        }
        rax
    }

    #[test]
    fn native_loops_run_exactly_the_iterations_asked_for() {
        for bench in [Bench::Integer, Bench::Memory, Bench::Call, Bench::CallRet] {
            for n in [1u32, 7, 1000] {
                let (_, rax) = run_with_result(bench, n).unwrap();
                assert_eq!(rax, model(bench, u64::from(n)), "{} x {n}", bench.name());
            }
        }
    }
}
