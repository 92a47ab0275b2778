//! Tiny guests that measure what this host's KVM really does, so `deja info` can report
//! the flavour's limits as *detected* rather than merely *inferred*: how fast ring-0 and
//! ring-3 code run, whether 32-bit and PAE paging run at all, and whether guest ring-3
//! CPUID and RDTSC see deja's CPUID table and TSC.
//!
//! Each probe is a handful of hand-encoded instructions (this crate does not link an
//! assembler) ending in an `OUT`, run under a watchdog.

use crate::KvmCpu;
use crate::host_info::{Basis, Fact};
use deja_machine::cpu::{CpuState, Segment, gpr, seg};
use deja_machine::devices::{Device, DeviceError, DeviceState, InterruptLines, IoCtx, Irqchip};
use deja_machine::vm_memory::{Bytes, GuestAddress};
use deja_machine::{ClockMode, Cpu, CpuError, Exit, Limit, LiveHost, Machine, MachineConfig};
use std::time::{Duration, Instant};

/// Where probe code is loaded.
const CODE: u64 = 0x1000;
/// Where probe page tables go.
const TABLES: u64 = 0x10000;
/// Longest a probe may run before it is kicked.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Ring-0 loop iterations (two instructions each): about 40 ms at 1 µs per instruction.
const RING0_LOOPS: u32 = 20_000;
/// Ring-3 loop iterations: a few ms when the code runs natively.
const RING3_LOOPS: u32 = 20_000_000;

/// No interrupt sources: probes never take interrupts.
struct NoIrqchip;

impl Device for NoIrqchip {
    fn name(&self) -> &'static str {
        "probe-irqchip"
    }
    fn read(&mut self, _ctx: &mut IoCtx, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, _ctx: &mut IoCtx, _addr: u64, _data: &[u8]) {}
    fn save(&self) -> DeviceState {
        DeviceState::DebugExit
    }
    fn restore(&mut self, _state: &DeviceState) -> Result<(), DeviceError> {
        Ok(())
    }
}

impl InterruptLines for NoIrqchip {
    fn set_irq(&mut self, _line: u32, _level: bool) {}
}

impl Irqchip for NoIrqchip {
    fn interrupt_pending(&self) -> bool {
        false
    }
    fn acknowledge(&mut self) -> u8 {
        0xff
    }
}

/// What a probe guest did.
enum Outcome {
    /// It reached its final `OUT`; the state then, and the host time it took.
    Finished(Box<CpuState>, Duration),
    /// It shut down, failed, or did not finish in time.
    Failed(String),
}

/// `mov ecx, loops; 1: dec rcx (or ecx); jnz 1b; out dx, al`.
fn loop_code(loops: u32, rex_w: bool) -> Vec<u8> {
    let mut c = vec![0xb9];
    c.extend_from_slice(&loops.to_le_bytes());
    if rex_w {
        c.push(0x48);
    }
    c.extend_from_slice(&[0xff, 0xc9, 0x75, if rex_w { 0xfb } else { 0xfc }, 0xee]);
    c
}

fn machine() -> Result<Machine, String> {
    let config = MachineConfig {
        ram_size: 4 << 20,
        ..MachineConfig::default()
    };
    let host = Box::new(LiveHost::new(ClockMode::Virtual));
    Machine::new(config, host, Box::new(NoIrqchip)).map_err(|e| e.to_string())
}

/// Runs `code` from `state` until its first device access.
fn run_probe(code: &[u8], make_state: impl FnOnce(&Machine) -> CpuState) -> Outcome {
    run_probe_then(code, make_state, |_| ()).0
}

/// [`run_probe`], then `after` on the machine (to read what the probe wrote).
fn run_probe_then<R>(
    code: &[u8],
    make_state: impl FnOnce(&Machine) -> CpuState,
    after: impl FnOnce(&Machine) -> R,
) -> (Outcome, Option<R>) {
    let mut m = match machine() {
        Ok(m) => m,
        Err(e) => return (Outcome::Failed(e), None),
    };
    let outcome = run_probe_on(&mut m, code, make_state);
    let r = after(&m);
    (outcome, Some(r))
}

fn run_probe_on(
    m: &mut Machine,
    code: &[u8],
    make_state: impl FnOnce(&Machine) -> CpuState,
) -> Outcome {
    let m = &mut *m;
    let mut cpu = match KvmCpu::new(m) {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    if let Err(e) = m.mem.write_slice(code, GuestAddress(CODE)) {
        return Outcome::Failed(e.to_string());
    }
    let state = make_state(m);
    if let Err(e) = cpu.set_state(&state) {
        return Outcome::Failed(e.to_string());
    }
    let kicker = cpu.kicker();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if rx.recv_timeout(PROBE_TIMEOUT).is_err() {
            kicker.kick();
        }
    });
    let started = Instant::now();
    let result = cpu.run(m, Limit::default());
    let elapsed = started.elapsed();
    drop(tx);
    let _ = watchdog.join();
    let finished = |cpu: &mut KvmCpu| match cpu.state() {
        Ok(s) => Outcome::Finished(Box::new(s), elapsed),
        Err(e) => Outcome::Failed(e.to_string()),
    };
    match result {
        Ok(Exit::DeviceAccess) => finished(&mut cpu),
        Ok(Exit::Kicked) => Outcome::Failed(format!("no exit within {PROBE_TIMEOUT:?}")),
        Ok(Exit::Shutdown { reason }) => Outcome::Failed(format!("shutdown: {reason}")),
        Ok(other) => Outcome::Failed(format!("unexpected exit {other:?}")),
        Err(CpuError::Unsupported { detail, .. }) => Outcome::Failed(detail),
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

fn flat_state(cr0: u64, code_seg: Segment, data: Segment) -> CpuState {
    let mut s = CpuState::reset();
    s.cr0 = cr0;
    for (i, sg) in s.seg.iter_mut().enumerate() {
        *sg = if i == seg::CS { code_seg } else { data };
    }
    s.rip = CODE;
    s.gpr[gpr::RSP] = 0x7000;
    s.gpr[gpr::RDX] = 0x80;
    s
}

/// Long mode with the first 4 MiB identity mapped, at privilege level `cpl`.
fn long_mode(m: &Machine, cpl: u8) -> CpuState {
    let user = if cpl == 3 { 4 } else { 0 };
    let mem = &m.mem;
    let _ = mem.write_obj((TABLES + 0x1000) | 3 | user, GuestAddress(TABLES));
    let _ = mem.write_obj((TABLES + 0x2000) | 3 | user, GuestAddress(TABLES + 0x1000));
    for i in 0..2u64 {
        let _ = mem.write_obj(
            (i << 21) | 0x83 | user,
            GuestAddress(TABLES + 0x2000 + i * 8),
        );
    }
    let mut cs = Segment::flat(0x8, true, true);
    let mut ds = Segment::flat(0x10, false, false);
    if cpl == 3 {
        cs.dpl = 3;
        cs.selector = 0x1b;
        ds.dpl = 3;
        ds.selector = 0x23;
    }
    let mut s = flat_state(0x8000_0011, cs, ds);
    s.cr3 = TABLES;
    s.cr4 = 0x20;
    s.efer = 0x500;
    if cpl == 3 {
        s.rflags |= 3 << 12; // IOPL 3: the final OUT reaches deja
    }
    s
}

/// 32-bit protected mode with paging: PSE 4 MiB pages, or PAE 2 MiB pages.
fn paged_32(m: &Machine, pae: bool) -> CpuState {
    let mem = &m.mem;
    let mut s = flat_state(
        0x8000_0011,
        Segment::flat(0x8, true, false),
        Segment::flat(0x10, false, false),
    );
    s.cr3 = TABLES;
    if pae {
        let _ = mem.write_obj((TABLES + 0x1000) | 1, GuestAddress(TABLES));
        let _ = mem.write_obj(0x83u64, GuestAddress(TABLES + 0x1000));
        s.cr4 = 0x20;
    } else {
        let _ = mem.write_obj(0x83u32, GuestAddress(TABLES));
        s.cr4 = 0x10;
    }
    s
}

fn detected(text: String) -> Fact {
    Fact {
        text,
        basis: Basis::Detected,
    }
}

fn per_instruction(elapsed: Duration, instructions: u64) -> String {
    let ns = elapsed.as_nanos() as f64 / instructions as f64;
    if ns >= 1000.0 {
        format!("{:.2} µs", ns / 1000.0)
    } else {
        format!("{ns:.2} ns")
    }
}

/// Where the CPUID probe reads its (function, subleaf) pairs and writes the answers.
const CPUID_INPUTS: u64 = 0x3000;
const CPUID_OUTPUTS: u64 = 0x8000;

/// For each (EAX, ECX) pair at CPUID_INPUTS, CPUID and store EAX..EDX at CPUID_OUTPUTS:
/// `mov esi, in; mov edi, out; mov ebp, n; 1: mov eax, [rsi]; mov ecx, [rsi+4]; cpuid;
/// mov [rdi], eax; mov [rdi+4], ebx; mov [rdi+8], ecx; mov [rdi+12], edx; add rsi, 8;
/// add rdi, 16; dec ebp; jnz 1b; out dx, al`.
fn cpuid_code(n: u32) -> Vec<u8> {
    let mut c = vec![0xbe];
    c.extend_from_slice(&(CPUID_INPUTS as u32).to_le_bytes());
    c.push(0xbf);
    c.extend_from_slice(&(CPUID_OUTPUTS as u32).to_le_bytes());
    c.push(0xbd);
    c.extend_from_slice(&n.to_le_bytes());
    c.extend_from_slice(&[
        0x8b, 0x06, 0x8b, 0x4e, 0x04, 0x0f, 0xa2, 0x89, 0x07, 0x89, 0x5f, 0x04, 0x89, 0x4f, 0x08,
        0x89, 0x57, 0x0c, 0x48, 0x83, 0xc6, 0x08, 0x48, 0x83, 0xc7, 0x10, 0xff, 0xcd, 0x75, 0xe2,
        0xee,
    ]);
    c
}

/// What CPUID answers guest code at privilege level `cpl` (0 or 3, in long mode) on this
/// host's KVM with `table` set, for each of [`CpuidTable::probe_leaves`].
pub fn guest_cpuid(
    table: &deja_machine::CpuidTable,
    cpl: u8,
) -> Result<Vec<deja_machine::cpuid::CpuidEntry>, String> {
    let leaves = table.probe_leaves();
    let mut m = machine()?;
    m.config.cpuid = table.clone();
    let mut inputs = Vec::new();
    for &(f, i) in &leaves {
        inputs.extend_from_slice(&f.to_le_bytes());
        inputs.extend_from_slice(&i.to_le_bytes());
    }
    m.mem
        .write_slice(&inputs, GuestAddress(CPUID_INPUTS))
        .map_err(|e| e.to_string())?;
    match run_probe_on(&mut m, &cpuid_code(leaves.len() as u32), |m| {
        long_mode(m, cpl)
    }) {
        Outcome::Finished(..) => {}
        Outcome::Failed(e) => return Err(e),
    }
    let mut out = vec![0u8; leaves.len() * 16];
    m.mem
        .read_slice(&mut out, GuestAddress(CPUID_OUTPUTS))
        .map_err(|e| e.to_string())?;
    Ok(leaves
        .iter()
        .zip(out.chunks_exact(16))
        .map(|(&(function, index), r)| {
            let w = |k: usize| u32::from_le_bytes([r[k], r[k + 1], r[k + 2], r[k + 3]]);
            deja_machine::cpuid::CpuidEntry {
                function,
                index,
                indexed: true,
                eax: w(0),
                ebx: w(4),
                ecx: w(8),
                edx: w(12),
            }
        })
        .collect())
}

/// Runs every probe and reports what each showed. Takes about 0.1 s on a PVM host.
pub fn probe_guests(cpuid: &deja_machine::CpuidTable) -> Vec<Fact> {
    let mut out = Vec::new();
    for (cpl, loops) in [(0u8, RING0_LOOPS), (3, RING3_LOOPS)] {
        let text = match run_probe(&loop_code(loops, true), |m| long_mode(m, cpl)) {
            Outcome::Finished(_, t) => format!(
                "64-bit ring-{cpl} code runs at {} per instruction ({} instructions in {t:.1?})",
                per_instruction(t, 2 * u64::from(loops)),
                2 * u64::from(loops)
            ),
            Outcome::Failed(e) => format!("64-bit ring-{cpl} code does not run: {e}"),
        };
        out.push(detected(text));
    }
    let real = |_: &Machine| {
        let mut s = flat_state(
            0x6000_0010,
            Segment::real_mode(0, true),
            Segment::real_mode(0, false),
        );
        s.gpr[gpr::RDX] = 0x80;
        s
    };
    // 16-bit code: `mov cx, imm16` is B9 iw, so give it a 16-bit count.
    let mut real_code = vec![0xb9];
    real_code.extend_from_slice(&1000u16.to_le_bytes());
    real_code.extend_from_slice(&[0x49, 0x75, 0xfd, 0xee]);
    out.push(detected(match run_probe(&real_code, real) {
        Outcome::Finished(_, _) => "real-mode code runs".to_string(),
        Outcome::Failed(e) => format!("real-mode code does not run: {e}"),
    }));
    let pm = |_: &Machine| {
        flat_state(
            0x11,
            Segment::flat(0x8, true, false),
            Segment::flat(0x10, false, false),
        )
    };
    out.push(detected(match run_probe(&loop_code(1000, false), pm) {
        Outcome::Finished(_, _) => "32-bit protected mode without paging runs".to_string(),
        Outcome::Failed(e) => format!("32-bit protected mode without paging does not run: {e}"),
    }));
    for (pae, name) in [(false, "32-bit paging (PSE)"), (true, "PAE paging")] {
        out.push(detected(
            match run_probe(&loop_code(1000, false), |m| paged_32(m, pae)) {
                Outcome::Finished(_, _) => format!("{name} runs"),
                Outcome::Failed(e) => format!("{name} does not run: {e}"),
            },
        ));
    }
    // Every leaf of deja's table (and the basic leaves up to 0xd) in ring 0 and ring 3.
    for cpl in [0u8, 3] {
        out.push(detected(match guest_cpuid(cpuid, cpl) {
            Ok(seen) => {
                let diffs = cpuid.differences(&seen);
                if diffs.is_empty() {
                    format!(
                        "guest ring-{cpl} CPUID answers from deja's table ({} leaves probed)",
                        seen.len()
                    )
                } else {
                    let list: Vec<String> = diffs.iter().map(|d| d.to_string()).collect();
                    format!(
                        "guest ring-{cpl} CPUID: the host overrides {} of {} leaves probed: {}",
                        diffs.len(),
                        seen.len(),
                        list.join("; ")
                    )
                }
            }
            Err(e) => format!("guest ring-{cpl} CPUID could not be probed: {e}"),
        }));
    }
    out.push(detected(
        match machine().and_then(|m| KvmCpu::new(&m).map_err(|e| e.to_string())) {
            Ok(cpu) if cpu.tsc_settable() => {
                "the guest TSC can be set (KVM_SET_MSRS IA32_TSC)".into()
            }
            Ok(_) => "the guest TSC cannot be set: KVM accepts a write of IA32_TSC and ignores it \
                  (the guest sees the host's TSC)"
                .into(),
            Err(e) => format!("the guest TSC could not be probed: {e}"),
        },
    ));
    // Ring-3 RDTSC right after the TSC was set to 0: rdtsc; out dx,al.
    let rdtsc_code = [0x0f, 0x31, 0xee];
    out.push(detected(
        match run_probe(&rdtsc_code, |m| {
            let mut s = long_mode(m, 3);
            s.msrs.insert(deja_machine::cpu::msr::IA32_TSC, 0);
            s
        }) {
            Outcome::Finished(s, t) => {
                let tsc = (s.gpr[gpr::RDX] << 32) | (s.gpr[gpr::RAX] & 0xffff_ffff);
                // 10 GHz over the probe's duration plus a second of slack.
                let plausible = 10 * (t.as_nanos() as u64 + 1_000_000_000);
                if tsc < plausible {
                    format!("guest ring-3 RDTSC follows the guest TSC (read {tsc} after setting 0)")
                } else {
                    format!(
                        "guest ring-3 RDTSC is not virtualized: it read {tsc:#x} right after the \
                         guest TSC was set to 0 (host TSC)"
                    )
                }
            }
            Outcome::Failed(e) => format!("guest ring-3 RDTSC could not be probed: {e}"),
        },
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuid_code_loops_back_to_its_first_load() {
        let c = cpuid_code(3);
        assert_eq!(c.len(), 15 + 31);
        // The JNZ's target is the `mov eax, [rsi]` right after the three moves.
        let jnz = c.len() - 3;
        assert_eq!(c[jnz], 0x75);
        assert_eq!(jnz as i64 + 2 + i64::from(c[jnz + 1] as i8), 15);
    }

    #[test]
    fn loop_code_encodes_a_countdown() {
        assert_eq!(
            loop_code(5, true),
            [0xb9, 5, 0, 0, 0, 0x48, 0xff, 0xc9, 0x75, 0xfb, 0xee]
        );
        assert_eq!(
            loop_code(5, false),
            [0xb9, 5, 0, 0, 0, 0xff, 0xc9, 0x75, 0xfc, 0xee]
        );
    }
}
