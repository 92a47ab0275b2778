//! Guest instructions per second on an integer loop, a memory-heavy loop and a
//! call/ret-heavy loop, and translation cost per block.

#![allow(missing_docs)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use deja_bt::BtCpu;
use deja_machine::cpu::{CpuState, Segment, seg};
use deja_machine::devices::{Device, DeviceError, DeviceState, InterruptLines, IoCtx, Irqchip};
use deja_machine::vm_memory::{Bytes, GuestAddress};
use deja_machine::{ClockMode, Cpu, Exit, Limit, LiveHost, Machine, MachineConfig};
use iced_x86::code_asm::*;
use std::time::Duration;

struct NoIrq;
impl Device for NoIrq {
    fn name(&self) -> &'static str {
        "none"
    }
    fn read(&mut self, _: &mut IoCtx, _: u64, _: &mut [u8]) {}
    fn write(&mut self, _: &mut IoCtx, _: u64, _: &[u8]) {}
    fn save(&self) -> DeviceState {
        DeviceState::DebugExit
    }
    fn restore(&mut self, _: &DeviceState) -> Result<(), DeviceError> {
        Ok(())
    }
}
impl InterruptLines for NoIrq {
    fn set_irq(&mut self, _: u32, _: bool) {}
}
impl Irqchip for NoIrq {
    fn interrupt_pending(&self) -> bool {
        false
    }
    fn acknowledge(&mut self) -> u8 {
        0xff
    }
}

const CODE: u64 = 0x20_0000;
const PML4: u64 = 0x10000;

fn machine() -> Machine {
    let config = MachineConfig {
        ram_size: 32 << 20,
        ..MachineConfig::default()
    };
    Machine::new(
        config,
        Box::new(LiveHost::new(ClockMode::Virtual)),
        Box::new(NoIrq),
    )
    .unwrap()
}

fn long_mode(m: &Machine) -> CpuState {
    let pdpt = PML4 + 0x1000;
    let pd = PML4 + 0x2000;
    m.mem
        .write_slice(&(pdpt | 7).to_le_bytes(), GuestAddress(PML4))
        .unwrap();
    m.mem
        .write_slice(&(pd | 7).to_le_bytes(), GuestAddress(pdpt))
        .unwrap();
    for i in 0..512u64 {
        m.mem
            .write_slice(&((i << 21) | 0x87).to_le_bytes(), GuestAddress(pd + i * 8))
            .unwrap();
    }
    let mut s = CpuState::reset();
    s.cr0 = 0x8000_0011;
    s.cr3 = PML4;
    s.cr4 = 0x220;
    s.efer = 0x500;
    for (i, sg) in s.seg.iter_mut().enumerate() {
        *sg = if i == seg::CS {
            Segment::flat(0x18, true, true)
        } else {
            Segment::flat(0x10, false, false)
        };
    }
    s.rip = CODE;
    s.gpr[4] = 0x8_0000;
    s
}

fn asm(f: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a);
    a.assemble(CODE).unwrap()
}

/// CPU time of this thread: the machine the benches run on is shared by many processes, so
/// wall-clock time would mostly measure the others.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs the guest to its HLT on a fresh CPU (translation included) and returns the thread
/// CPU time it took and the instructions retired.
fn run_guest(m: &mut Machine, s: &CpuState) -> (Duration, u64) {
    let mut cpu = BtCpu::new(m).unwrap();
    cpu.set_state(s).unwrap();
    let t = thread_cpu_time();
    let exit = cpu.run(m, Limit::default()).unwrap();
    assert_eq!(exit, Exit::Halted);
    (thread_cpu_time() - t, cpu.icount())
}

fn bench_loop(c: &mut Criterion, name: &str, iters: u64, code: Vec<u8>) {
    let mut m = machine();
    m.mem.write_slice(&code, GuestAddress(CODE)).unwrap();
    let s = long_mode(&m);
    let (_, n) = run_guest(&mut m, &s);
    let mut g = c.benchmark_group("bt");
    g.throughput(Throughput::Elements(n));
    g.bench_function(name, |b| {
        b.iter_custom(|reps| {
            let mut total = Duration::ZERO;
            for _ in 0..reps {
                total += run_guest(&mut m, &s).0;
            }
            total
        })
    });
    g.finish();
    let _ = iters;
}

fn integer_loop(c: &mut Criterion) {
    let n = 2_000_000u32;
    let code = asm(|a| {
        let mut top = a.create_label();
        a.mov(ecx, n).unwrap();
        a.set_label(&mut top).unwrap();
        a.add(eax, ecx).unwrap();
        a.xor(ebx, eax).unwrap();
        a.lea(edx, dword_ptr(rdx + rbx * 2 + 3)).unwrap();
        a.sub(esi, 7).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    });
    bench_loop(c, "integer_loop", n as u64, code);
}

/// The loop body of `deja bench`'s integer benchmark (guests/src/bench.rs): a dependent
/// IMUL, ADD, ROR, XOR chain, so the two measurements can be compared instruction for
/// instruction (the loop above uses cheaper ALU ops only).
fn integer_mix_loop(c: &mut Criterion) {
    let n = 1_000_000u32;
    let code = asm(|a| {
        let mut top = a.create_label();
        a.mov(rbx, 0x5851_f42d_4c95_7f2du64).unwrap();
        a.mov(eax, 1).unwrap();
        a.mov(r15d, n).unwrap();
        a.set_label(&mut top).unwrap();
        a.imul_2(rax, rbx).unwrap();
        a.add(rax, r15).unwrap();
        a.ror(rax, 13).unwrap();
        a.xor(rax, rbx).unwrap();
        a.dec(r15).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    });
    bench_loop(c, "integer_mix_loop", n as u64, code);
}

/// x87 and SSE arithmetic (host-FPU round trips in `native`) next to a software SSE
/// integer op and the loop's integer ops: the cost of one native FP instruction.
fn fp_loop(c: &mut Criterion) {
    let n = 200_000u32;
    let code = asm(|a| {
        let mut top = a.create_label();
        a.fld1().unwrap();
        a.fld1().unwrap();
        a.mov(ecx, n).unwrap();
        a.set_label(&mut top).unwrap();
        a.addsd(xmm0, xmm1).unwrap();
        a.mulsd(xmm2, xmm1).unwrap();
        a.fadd_2(st0, st1).unwrap();
        a.paddd(xmm3, xmm4).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    });
    bench_loop(c, "fp_loop", n as u64, code);
}

fn memory_loop(c: &mut Criterion) {
    let n = 500_000u32;
    let code = asm(|a| {
        let mut top = a.create_label();
        a.mov(rsi, 0x40_0000u64).unwrap();
        a.mov(rdi, 0x60_0000u64).unwrap();
        a.mov(ecx, n).unwrap();
        a.set_label(&mut top).unwrap();
        a.mov(eax, ecx).unwrap();
        a.and(eax, 0xfff).unwrap();
        a.mov(rdx, qword_ptr(rsi + rax * 8)).unwrap();
        a.add(qword_ptr(rdi + rax * 8), rdx).unwrap();
        a.mov(dword_ptr(rsi + rax * 4), ecx).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    });
    bench_loop(c, "memory_loop", n as u64, code);
}

fn call_loop(c: &mut Criterion) {
    let n = 500_000u32;
    let code = asm(|a| {
        let mut top = a.create_label();
        let mut f = a.create_label();
        let mut g = a.create_label();
        a.mov(ecx, n).unwrap();
        a.set_label(&mut top).unwrap();
        a.call(f).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
        a.set_label(&mut f).unwrap();
        a.push(rbx).unwrap();
        a.call(g).unwrap();
        a.pop(rbx).unwrap();
        a.ret().unwrap();
        a.set_label(&mut g).unwrap();
        a.add(eax, 1).unwrap();
        a.ret().unwrap();
    });
    bench_loop(c, "call_ret_loop", n as u64, code);
}

fn translation(c: &mut Criterion) {
    // 2000 distinct blocks of 8 instructions, each run once.
    let blocks = 2000u64;
    let code = asm(|a| {
        for i in 0..blocks {
            let mut next = a.create_label();
            a.add(eax, i as u32).unwrap();
            a.mov(ebx, eax).unwrap();
            a.shl(ebx, 3).unwrap();
            a.xor(ecx, ebx).unwrap();
            a.mov(qword_ptr(0x40_0000u64 + i * 8), rcx).unwrap();
            a.lea(edx, dword_ptr(rcx + rbx)).unwrap();
            a.sub(edx, 5).unwrap();
            a.jmp(next).unwrap();
            a.set_label(&mut next).unwrap();
        }
        a.hlt().unwrap();
    });
    let mut m = machine();
    m.mem.write_slice(&code, GuestAddress(CODE)).unwrap();
    let s = long_mode(&m);
    let mut g = c.benchmark_group("bt");
    g.throughput(Throughput::Elements(blocks));
    g.bench_function("translate_block", |b| {
        b.iter_custom(|reps| {
            let mut total = Duration::ZERO;
            for _ in 0..reps {
                total += run_guest(&mut m, &s).0;
            }
            total
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    targets = integer_loop, integer_mix_loop, memory_loop, call_loop, fp_loop, translation
}
criterion_main!(benches);
