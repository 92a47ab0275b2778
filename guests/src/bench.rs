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
/// The boot path's page directory (`rt`: PML4 at 0x1000, PDPT at 0x2000, PD at 0x3000).
pub(crate) const PML4: i32 = 0x1000;
/// A page table the paging benchmarks hook into PD[1] (virtual 2 MiB..4 MiB).
pub(crate) const BENCH_PT: i32 = 0x12_0000;
/// The frames `bench-ptemod` alternates its PTE between.
pub(crate) const PTE_FRAME: i32 = 0x13_0000;
/// The virtual page `bench-ptemod` loads through (PT[0]) and `bench-pgfault` maps lazily.
pub(crate) const PTE_VIRT: i32 = 0x20_0000;
/// GDT selectors of `bench-syscall`: STAR's SYSCALL base (kernel CS, SS = +8) and SYSRET
/// base (user SS = +8, user 64-bit CS = +16).
const SYSCALL_CS: u32 = 0x18;
const SYSRET_BASE: u32 = 0x28;
/// The local APIC's MMIO base (mapped by `bench-hlt-wake` with a 2 MiB uncached page).
const LAPIC_BASE: u64 = 0xfee0_0000;
/// The vector of `bench-hlt-wake`'s LAPIC timer interrupt (inside the IDT the runtime builds).
const TIMER_VECTOR: u8 = 0x2f;
/// `bench-hlt-wake`'s one-shot period in LAPIC timer ticks, with the divider at 1 (one tick
/// per bus-clock nanosecond on deja-pc and QEMU): 2 µs, longer than the virtual time a
/// device exit is worth (1 µs), so that under deja's virtual clock the timer is always still
/// armed when the HLT executes and the halt really waits for it. deja's virtual clock skips
/// the idle time; QEMU and real hardware wait it out, so their numbers include it.
pub const HLT_WAKE_TIMER_TICKS: u32 = 2_000;
/// A page directory for 3 GiB..4 GiB, where the local APIC lives.
const HIGH_PD: i32 = 0x12_1000;
/// The top of the benchmarks' stack, on pages of its own: the boot path's stack ends at
/// the image's first byte, on the same 4 KiB page as its code, and a translator that
/// tracks code writes per page (QEMU's TCG) would then take every CALL's or exception's
/// stack write as a possible code modification and make `call-ret` 100 times slower.
pub(crate) const BENCH_STACK_TOP: i32 = 0x9_0000;
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
    /// Changing a live 4 KiB PTE (toggling its frame), `INVLPG`, and a load through it.
    PteMod,
    /// A load from a not-present page: #PF delivered, the handler skips the load, `IRETQ`.
    PgFault,
    /// `SYSCALL` from ring 3 to a ring-0 handler that only `SYSRETQ`s.
    Syscall,
    /// `MOV CR8, RAX` (the task priority register) with 0.
    Cr8Write,
    /// Self-modifying code: a store into the immediate of the next instruction, which then
    /// runs (a binary translator must notice and retranslate).
    Smc,
    /// The local APIC timer armed in one-shot mode with interrupts off, then `STI; HLT`: the
    /// halt is woken by the timer's interrupt, whose handler writes EOI and `IRETQ`s.
    HltWake,
    /// fork + wait: copy the parent's page tables into a child address space with every
    /// writable page made copy-on-write in both, switch to the child, take a copy-on-write
    /// fault, exit back to the parent, free the child, take the parent's reuse fault.
    ForkWait,
    /// `MOV CR3` round-robin between four address spaces, touching a private page in each.
    Cr3Switch,
    /// A load from each of 4096 distinct 4 KiB pages in turn: more than a TLB holds.
    TlbMiss,
}

impl Bench {
    /// Every benchmark, in a stable order.
    pub const ALL: [Bench; 17] = [
        Bench::In,
        Bench::Out,
        Bench::Cpuid,
        Bench::CallRet,
        Bench::DivZero,
        Bench::Integer,
        Bench::Memory,
        Bench::Call,
        Bench::PteMod,
        Bench::PgFault,
        Bench::Syscall,
        Bench::Cr8Write,
        Bench::Smc,
        Bench::HltWake,
        Bench::ForkWait,
        Bench::Cr3Switch,
        Bench::TlbMiss,
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
            Bench::PteMod => "ptemod",
            Bench::PgFault => "pgfault",
            Bench::Syscall => "syscall",
            Bench::Cr8Write => "cr8wr",
            Bench::Smc => "smc",
            Bench::HltWake => "hlt-wake",
            Bench::ForkWait => "forkwait",
            Bench::Cr3Switch => "cr3switch",
            Bench::TlbMiss => "tlbmiss",
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
            Bench::PteMod => "rewrite a live 4 KiB PTE, INVLPG, load through it",
            Bench::PgFault => {
                "a load from an unmapped page: #PF, the handler maps the page, IRETQ re-runs \
                 the load; then the PTE is cleared and INVLPG'd for the next one"
            }
            Bench::Syscall => "SYSCALL from ring 3, SYSRETQ from ring 0",
            Bench::Cr8Write => "MOV CR8, RAX (TPR write) with 0",
            Bench::Smc => "store into the next instruction's immediate, then execute it",
            Bench::HltWake => {
                "arm the LAPIC timer (one-shot, 2 µs), STI; HLT woken by it, EOI, IRETQ"
            }
            Bench::ForkWait => {
                "fork (copy tables, write-protect both), CR3 to the child, copy-on-write \
                 fault, CR3 back, free the child, the parent's reuse fault"
            }
            Bench::Cr3Switch => "MOV CR3 to the next of four address spaces, load a private page",
            Bench::TlbMiss => "a load from the next of 4096 distinct pages, round-robin",
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
        match self {
            // Two rounds over the 4096 pages.
            Bench::TlbMiss => 2 * crate::bench_paging::TLBMISS_PAGES,
            _ => 1000,
        }
    }

    /// The guest image running `iterations` operations (at least 1).
    pub fn image(self, iterations: u32) -> Result<Image, LinkError> {
        build(self, iterations.max(1))
    }
}

pub(crate) fn mark(a: &mut CodeAssembler, value: u8) -> Result<(), IcedError> {
    a.mov(al, i32::from(value))?;
    a.out(u32::from(BENCH_MARKER_PORT), al)
}

fn build(bench: Bench, iterations: u32) -> Result<Image, LinkError> {
    if matches!(
        bench,
        Bench::PgFault | Bench::ForkWait | Bench::Cr3Switch | Bench::TlbMiss
    ) {
        return crate::bench_paging::build(bench, iterations);
    }
    let name = format!("bench-{}", bench.name());
    let handlers: &[(u8, &'static str)] = match bench {
        Bench::DivZero => &[(0, "bench_skip")],
        Bench::HltWake => &[(TIMER_VECTOR, "bench_timer")],
        _ => &[],
    };
    long_mode_image(&name, BootMessages::default(), handlers, &|s, rt| {
        s.a.mov(esp, BENCH_STACK_TOP)?;
        if matches!(bench, Bench::DivZero | Bench::HltWake) {
            rt.load_idt(s)?;
        }
        if bench == Bench::HltWake {
            // Only the LAPIC timer may wake the halt: the 8259As (and the PIT behind them)
            // stay masked.
            rt.init_pic(s, 0xff, 0xff)?;
            // PDPT[3] -> HIGH_PD, whose entry 503 maps the local APIC's 2 MiB (PCD, PWT).
            let a = &mut s.a;
            a.mov(edi, HIGH_PD)?;
            a.xor(eax, eax)?;
            a.mov(ecx, 512)?;
            a.rep().stosq()?;
            a.mov(edi, HIGH_PD + 503 * 8)?;
            a.mov(eax, 0xfee0_009bu32 as i32)?; // P, RW, PWT, PCD, PS
            a.mov(qword_ptr(rdi), rax)?;
            a.mov(edi, PML4 + 0x1000 + 3 * 8)?;
            a.mov(qword_ptr(rdi), HIGH_PD | 3)?;
            a.mov(rax, cr3)?;
            a.mov(cr3, rax)?;
            a.mov(r8, LAPIC_BASE)?;
            a.mov(dword_ptr(r8 + 0xf0), 0x1ff)?; // SVR: software enabled
            a.mov(dword_ptr(r8 + 0x3e0), 0xb)?; // timer divide configuration: by 1
            a.mov(dword_ptr(r8 + 0x320), i32::from(TIMER_VECTOR))?; // LVT timer: one-shot
        }
        if bench == Bench::PteMod {
            // PD[1] -> a zeroed page table whose PT[0] maps PTE_VIRT to PTE_FRAME.
            let a = &mut s.a;
            a.mov(edi, BENCH_PT)?;
            a.xor(eax, eax)?;
            a.mov(ecx, 512)?;
            a.rep().stosq()?;
            a.mov(edi, BENCH_PT)?;
            a.mov(qword_ptr(rdi), PTE_FRAME | 3)?;
            a.mov(edi, PML4 + 0x2000 + 8)?;
            a.mov(qword_ptr(rdi), BENCH_PT | 3)?;
            a.mov(rax, cr3)?;
            a.mov(cr3, rax)?;
            a.mov(r8d, BENCH_PT)?;
            a.mov(r9d, PTE_VIRT)?;
            // Warm-up: one load through the PTE before the marks, so every measured
            // iteration is the steady state (under shadow the table is already shadowed and
            // write-traced, so even the first measured PTE write is a traced one).
            a.mov(rax, qword_ptr(r9))?;
        }
        if bench == Bench::Syscall {
            enter_ring3_with_syscall(s)?;
        }
        let a = &mut s.a;
        let mut func = a.create_label();
        let mut f2 = a.create_label();
        let mut f3 = a.create_label();
        let mut top = a.create_label();
        let mut patched = a.create_label();
        if bench == Bench::Smc {
            a.lea(rdi, ptr(patched))?;
        }
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
            Bench::PteMod => {
                a.xor(qword_ptr(r8), 0x1000)?;
                a.invlpg(byte_ptr(r9))?;
                a.mov(rax, qword_ptr(r9))?;
            }
            // Built by `bench_paging`, which `build` hands them to before this point.
            Bench::PgFault | Bench::ForkWait | Bench::Cr3Switch | Bench::TlbMiss => {}
            Bench::Syscall => {
                a.syscall()?;
            }
            Bench::Cr8Write => {
                a.xor(eax, eax)?;
                a.mov(cr8, rax)?;
            }
            Bench::HltWake => {
                a.cli()?;
                // Initial count: arms the one-shot timer.
                a.mov(dword_ptr(r8 + 0x380), HLT_WAKE_TIMER_TICKS as i32)?;
                a.sti()?;
                a.hlt()?;
            }
            Bench::Smc => {
                a.inc(byte_ptr(rdi + 1))?; // the imm8 of the MOV below
                a.set_label(&mut patched)?;
                a.mov(cl, 0)?; // b1 ib: rewritten every iteration
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
            s.export_here("bench_skip")?;
            s.a.add(qword_ptr(rsp), 3)?;
            s.a.iretq()?;
        }
        if bench == Bench::HltWake {
            s.export_here("bench_timer")?;
            s.a.mov(dword_ptr(r8 + 0xb0), 0)?; // EOI
            s.a.iretq()?;
        }
        if bench == Bench::Syscall {
            s.export_here("bench_sysret")?;
            s.a.sysretq()?;
            s.export_here("bench_gdt")?;
            s.a.dq(&[
                0,
                0x00cf_9a00_0000_ffff, // 0x08: 32-bit code
                0x00cf_9200_0000_ffff, // 0x10: data
                0x00af_9a00_0000_ffff, // 0x18: 64-bit code (SYSCALL CS)
                0x00cf_9200_0000_ffff, // 0x20: data (SYSCALL SS)
                0x00cf_fa00_0000_ffff, // 0x28: 32-bit user code (SYSRET base)
                0x00cf_f200_0000_ffff, // 0x30: user data (SYSRET SS)
                0x00af_fa00_0000_ffff, // 0x38: 64-bit user code (SYSRET CS)
            ])?;
            let gdt = s.sym("bench_gdt");
            s.export_here("bench_gdt_ptr")?;
            s.a.dw(&[8 * 8 - 1])?;
            s.a.dq(&[gdt])?;
        }
        Ok(())
    })
}

/// Loads a GDT with user segments, makes the identity map user-accessible, enables SYSCALL
/// (EFER.SCE, STAR, LSTAR, FMASK) and `IRETQ`s to the code that follows in ring 3 with IOPL 3
/// (so that the marks and the exit can still write their ports).
fn enter_ring3_with_syscall(s: &mut crate::link::SectionAsm<'_>) -> Result<(), LinkError> {
    let gdt_ptr = s.sym("bench_gdt_ptr");
    let handler = s.sym("bench_sysret");
    let a = &mut s.a;
    a.mov(rax, gdt_ptr)?;
    a.lgdt(ptr(rax))?;
    for table in [PML4, PML4 + 0x1000, PML4 + 0x2000] {
        a.mov(edi, table)?;
        a.or(dword_ptr(rdi), 4)?; // U/S
    }
    a.mov(rax, cr3)?;
    a.mov(cr3, rax)?;
    a.mov(ecx, 0xc000_0080u32)?; // EFER.SCE
    a.rdmsr()?;
    a.or(eax, 1)?;
    a.wrmsr()?;
    a.mov(ecx, 0xc000_0081u32)?; // STAR
    a.xor(eax, eax)?;
    a.mov(edx, ((SYSRET_BASE << 16) | SYSCALL_CS) as i32)?;
    a.wrmsr()?;
    a.mov(ecx, 0xc000_0082u32)?; // LSTAR
    a.mov(rax, handler)?;
    a.mov(rdx, rax)?;
    a.shr(rdx, 32)?;
    a.wrmsr()?;
    a.mov(ecx, 0xc000_0084u32)?; // FMASK: keep every flag
    a.xor(eax, eax)?;
    a.xor(edx, edx)?;
    a.wrmsr()?;
    let mut user = a.create_label();
    a.mov(rax, rsp)?;
    a.push(((SYSRET_BASE + 8) | 3) as i32)?; // SS
    a.push(rax)?; // RSP
    a.push(0x3002)?; // RFLAGS: IOPL 3, reserved bit 1
    a.push(((SYSRET_BASE + 16) | 3) as i32)?; // CS
    a.lea(rax, ptr(user))?;
    a.push(rax)?;
    a.iretq()?;
    a.set_label(&mut user)?;
    Ok(())
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
pub(crate) fn build_ptemod() -> Result<Image, LinkError> {
    Bench::PteMod.image(Bench::PteMod.default_iterations())
}
pub(crate) fn build_pgfault() -> Result<Image, LinkError> {
    Bench::PgFault.image(Bench::PgFault.default_iterations())
}
pub(crate) fn build_syscall() -> Result<Image, LinkError> {
    Bench::Syscall.image(Bench::Syscall.default_iterations())
}
pub(crate) fn build_cr8wr() -> Result<Image, LinkError> {
    Bench::Cr8Write.image(Bench::Cr8Write.default_iterations())
}
pub(crate) fn build_smc() -> Result<Image, LinkError> {
    Bench::Smc.image(Bench::Smc.default_iterations())
}
pub(crate) fn build_hlt_wake() -> Result<Image, LinkError> {
    Bench::HltWake.image(Bench::HltWake.default_iterations())
}
pub(crate) fn build_forkwait() -> Result<Image, LinkError> {
    Bench::ForkWait.image(Bench::ForkWait.default_iterations())
}
pub(crate) fn build_cr3switch() -> Result<Image, LinkError> {
    Bench::Cr3Switch.image(Bench::Cr3Switch.default_iterations())
}
pub(crate) fn build_tlbmiss() -> Result<Image, LinkError> {
    Bench::TlbMiss.image(Bench::TlbMiss.default_iterations())
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
