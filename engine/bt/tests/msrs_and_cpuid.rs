//! Model-specific registers and CPUID answers as the hardware gives them, on bt, and where
//! this host lets it run, the same guest on kvm with the same results: the machine-check
//! MSRs (IA32_MCG_CAP/STATUS/CTL and the MCi banks, no errors pending, SDM vol. 3 ch. 16).

mod common;

use common::*;
use deja_kvm::KvmCpu;
use deja_machine::cpu::CpuState;
use deja_machine::{Cpu, Exit, Limit, Machine};
use iced_x86::code_asm::*;

/// Scratch data the guest records into (clear of the TSS and its I/O bitmap).
const DATA: u64 = 0x6000;

/// One MSR access: an optional WRMSR of a value, then RDMSR (or RDPMC of counter `index`).
#[derive(Debug, Clone, Copy)]
struct MsrOp {
    index: u32,
    write: Option<u64>,
    rdpmc: bool,
}

/// What the guest saw: the value read (0 after a #GP), and the error code of the #GP that
/// RDMSR (RDPMC) and WRMSR raised, if any (an exception without a gate shows up as a #GP
/// with the IDT bit set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    value: u64,
    read_gp: Option<u32>,
    write_gp: Option<u32>,
}

/// The kvm vCPU for `m`, or `None` after a SKIP line (a failure under `DEJA_REQUIRE_KVM=1`)
/// when this host has no usable /dev/kvm.
fn kvm_cpu(m: &Machine, test: &str) -> Option<KvmCpu> {
    match KvmCpu::new(m) {
        Ok(k) => Some(k),
        Err(e) if e.is_unavailable() => {
            deja_testkit::skip_without_kvm(test, &e);
            None
        }
        Err(e) => panic!("kvm: {e}"),
    }
}

fn op(index: u32, write: Option<u64>) -> MsrOp {
    MsrOp {
        index,
        write,
        rdpmc: false,
    }
}

fn rdpmc(index: u32) -> MsrOp {
    MsrOp {
        index,
        write: None,
        rdpmc: true,
    }
}

/// A #GP handler that skips the faulting two-byte instruction (RDMSR, WRMSR, RDPMC),
/// zeroes EAX and EDX and leaves the error code + 1 in EBP.
fn install_gp_skip(m: &Machine) {
    let gp = 0x2800u64;
    load(
        m,
        gp,
        &asm(32, gp, |a| {
            // No IRET: the host's emulator (PVM) cannot run a 32-bit IRETD in ring 0.
            a.pop(ebp).unwrap(); // error code
            a.pop(ebx).unwrap(); // EIP
            a.add(esp, 8).unwrap(); // CS, EFLAGS
            a.add(ebx, 2).unwrap(); // past the instruction
            a.inc(ebp).unwrap();
            a.xor(eax, eax).unwrap();
            a.xor(edx, edx).unwrap();
            a.jmp(ebx).unwrap();
        }),
    );
    let g = (gp & 0xffff) | (0x08u64 << 16) | (0x8eu64 << 40) | ((gp >> 16) << 48);
    load(m, IDT + 13 * 8, &g.to_le_bytes());
}

/// A 32-bit ring-0 guest that runs `ops` with [`install_gp_skip`]'s handler; ends with OUT
/// to [`STOP_PORT`].
fn msr_guest(m: &Machine, ops: &[MsrOp]) -> CpuState {
    install_gp_skip(m);
    let code = asm(32, 0x2000, |a| {
        for (i, o) in ops.iter().enumerate() {
            let at = (DATA + 16 * i as u64) as u32;
            a.mov(ecx, o.index).unwrap();
            a.xor(ebp, ebp).unwrap();
            if let Some(v) = o.write {
                a.mov(eax, v as u32).unwrap();
                a.mov(edx, (v >> 32) as u32).unwrap();
                a.wrmsr().unwrap();
            }
            a.mov(dword_ptr(at + 12), ebp).unwrap();
            a.xor(ebp, ebp).unwrap();
            a.xor(eax, eax).unwrap();
            a.xor(edx, edx).unwrap();
            if o.rdpmc {
                a.rdpmc().unwrap();
            } else {
                a.rdmsr().unwrap();
            }
            a.mov(dword_ptr(at), eax).unwrap();
            a.mov(dword_ptr(at + 4), edx).unwrap();
            a.mov(dword_ptr(at + 8), ebp).unwrap();
        }
        a.mov(dx, STOP_PORT as u32).unwrap();
        a.out(dx, al).unwrap();
    });
    load(m, 0x2000, &code);
    protected_mode_state(m, 0x2000)
}

fn seen(m: &Machine, n: usize) -> Vec<Seen> {
    (0..n)
        .map(|i| {
            let b = peek(m, DATA + 16 * i as u64, 16);
            let w = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
            Seen {
                value: u64::from(w(0)) | u64::from(w(4)) << 32,
                read_gp: w(8).checked_sub(1),
                write_gp: w(12).checked_sub(1),
            }
        })
        .collect()
}

fn run_ops_on(cpu: &mut dyn Cpu, m: &mut Machine, ops: &[MsrOp]) -> Vec<Seen> {
    let s = msr_guest(m, ops);
    cpu.set_state(&s).unwrap();
    for _ in 0..1000 {
        let exit = cpu.run(m, Limit::default()).unwrap();
        if exit == Exit::StopRequested || m.take_stop().is_some() {
            return seen(m, ops.len());
        }
        assert_eq!(exit, Exit::DeviceAccess, "{} stopped: {exit:?}", cpu.name());
    }
    panic!("{}: the guest did not finish", cpu.name());
}

/// The machine-check accesses and what a CPU with deja's MCA (10 banks, IA32_MCG_CTL
/// present, no errors) answers.
fn mca_cases() -> Vec<(MsrOp, Seen)> {
    let ok = |value| Seen {
        value,
        read_gp: None,
        write_gp: None,
    };
    let write_gp = |value| Seen {
        value,
        read_gp: None,
        write_gp: Some(0),
    };
    let gp = Seen {
        value: 0,
        read_gp: Some(0),
        write_gp: Some(0),
    };
    vec![
        (op(0x179, None), ok(0x10a)),          // MCG_CAP: MCG_CTL_P, 10 banks
        (op(0x179, Some(0)), write_gp(0x10a)), // read-only
        (op(0x17a, None), ok(0)),              // MCG_STATUS: no machine check
        (op(0x17b, None), ok(!0)),             // MCG_CTL: all enabled
        (op(0x17b, Some(5)), write_gp(!0)),    // 0 or all 1s only
        (op(0x17b, Some(0)), ok(0)),
        (op(0x17b, Some(!0)), ok(!0)),
        (op(0x400, None), ok(!0)), // MC0_CTL
        (op(0x400, Some(5)), write_gp(!0)),
        (op(0x400, Some(0)), ok(0)),
        (op(0x401, None), ok(0)),          // MC0_STATUS: no error
        (op(0x401, Some(1)), write_gp(0)), // writable with 0 only
        (op(0x401, Some(0)), ok(0)),
        (op(0x402, Some(0x1234)), ok(0x1234)), // MC0_ADDR
        (op(0x403, None), ok(0)),              // MC0_MISC
        (op(0x424, None), ok(!0)),             // MC9_CTL: the last bank
        (op(0x427, None), ok(0)),              // MC9_MISC
        (
            op(0x428, None),
            Seen {
                write_gp: None,
                ..gp
            },
        ), // no bank 10
        (op(0x428, Some(0)), gp),
    ]
}

#[test]
fn machine_check_msrs_read_as_a_cpu_with_no_errors_and_write_as_the_sdm_says() {
    let cases = mca_cases();
    let ops: Vec<MsrOp> = cases.iter().map(|c| c.0).collect();
    let (mut m, _, _) = machine();
    let mut c = cpu(&m, &CpuState::reset());
    let got = run_ops_on(&mut c, &mut m, &ops);
    for (i, (o, want)) in cases.iter().enumerate() {
        assert_eq!(got[i], *want, "bt: {o:x?}");
    }
}

#[test]
fn machine_check_msrs_match_on_kvm() {
    let cases = mca_cases();
    let ops: Vec<MsrOp> = cases.iter().map(|c| c.0).collect();
    let (mut m, _, _) = machine();
    let Some(mut k) = kvm_cpu(&m, "machine-check MSRs on kvm") else {
        return;
    };
    let got = run_ops_on(&mut k, &mut m, &ops);
    for (i, (o, want)) in cases.iter().enumerate() {
        assert_eq!(got[i], *want, "kvm: {o:x?}");
    }
}

#[test]
fn cpuid_reports_mce_and_mca() {
    let t = deja_machine::cpuid::CpuidTable::deja_default();
    assert!(t.has(1, 3, 1 << 7), "CPUID.01H:EDX.MCE");
    assert!(t.has(1, 3, 1 << 14), "CPUID.01H:EDX.MCA");
}

/// RDPMC: deja's CPU has no performance-monitoring counters (CPUID leaf 0xA is beyond its
/// maximum basic leaf), so every counter index is invalid: #GP(0), in ring 0 too.
fn rdpmc_cases() -> Vec<MsrOp> {
    vec![rdpmc(0), rdpmc(1), rdpmc(0x4000_0000), rdpmc(0x8000_0000)]
}

fn assert_rdpmc_faults(got: &[Seen], engine: &str) {
    for (o, g) in rdpmc_cases().iter().zip(got) {
        assert_eq!(
            (g.read_gp, g.value),
            (Some(0), 0),
            "{engine}: RDPMC {:#x}: #GP(0)",
            o.index
        );
    }
}

#[test]
fn rdpmc_of_an_invalid_counter_raises_gp_in_ring_0() {
    let (mut m, _, _) = machine();
    let mut c = cpu(&m, &CpuState::reset());
    let got = run_ops_on(&mut c, &mut m, &rdpmc_cases());
    assert_rdpmc_faults(&got, "bt");
}

#[test]
fn rdpmc_of_an_invalid_counter_raises_gp_in_ring_0_on_kvm() {
    let (mut m, _, _) = machine();
    let Some(mut k) = kvm_cpu(&m, "RDPMC on kvm") else {
        return;
    };
    let got = run_ops_on(&mut k, &mut m, &rdpmc_cases());
    assert_rdpmc_faults(&got, "kvm");
}

/// A deja-pc machine (local APIC, isa-debug-exit at 0xf4) on the virtual clock.
fn pc_machine() -> Machine {
    let config = deja_machine::MachineConfig {
        ram_size: 16 << 20,
        ..deja_machine::MachineConfig::default()
    };
    deja_machine::pc::build_pc(
        config,
        Box::new(deja_machine::LiveHost::new(
            deja_machine::ClockMode::Virtual,
        )),
        Box::new(std::io::sink()),
    )
    .unwrap()
}

/// Where the APIC test moves the local APIC when it enables it again.
const MOVED_APIC_BASE: u32 = 0xfed0_0000;

/// Real mode: CPUID.01H:EDX with the APIC enabled, after IA32_APIC_BASE disables it, and
/// after it enables it again (at [`MOVED_APIC_BASE`]); the state's copy of
/// IA32_APIC_BASE must follow the guest's writes on both engines.
fn apic_cpuid_on(cpu: &mut dyn Cpu, m: &mut Machine) -> [u32; 3] {
    let code = asm(16, 0x1000, |a| {
        for (i, enable) in [None, Some(false), Some(true)].into_iter().enumerate() {
            if let Some(en) = enable {
                a.mov(ecx, 0x1bu32).unwrap();
                a.rdmsr().unwrap();
                if en {
                    // Enabled again at another base.
                    a.and(eax, 0xfff).unwrap();
                    a.or(eax, (MOVED_APIC_BASE | 0x800) as i32).unwrap();
                } else {
                    a.and(eax, !0x800u32 as i32).unwrap();
                }
                a.wrmsr().unwrap();
            }
            a.mov(eax, 1u32).unwrap();
            a.cpuid().unwrap();
            a.mov(dword_ptr((DATA + 4 * i as u64) as u32), edx).unwrap();
        }
        a.out(0xf4, al).unwrap();
    });
    load(m, 0x1000, &code);
    cpu.set_state(&real_mode_state(0x1000)).unwrap();
    for _ in 0..100 {
        cpu.run(m, Limit::default()).unwrap();
        if m.take_stop().is_some() {
            assert_eq!(
                cpu.state().unwrap().msrs[&0x1b],
                u64::from(MOVED_APIC_BASE) | 0x900,
                "{}: IA32_APIC_BASE in the state",
                cpu.name()
            );
            let b = peek(m, DATA, 12);
            let w = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
            return [w(0), w(4), w(8)];
        }
    }
    panic!("{}: the guest did not finish", cpu.name());
}

const CPUID_APIC: u32 = 1 << 9;

#[test]
fn cpuid_apic_bit_follows_the_apic_global_enable() {
    let mut m = pc_machine();
    let mut c = cpu(&m, &CpuState::reset());
    let [on, off, again] = apic_cpuid_on(&mut c, &mut m);
    assert_ne!(on & CPUID_APIC, 0, "APIC enabled at reset");
    assert_eq!(
        off & CPUID_APIC,
        0,
        "IA32_APIC_BASE.EN clear hides the APIC"
    );
    assert_ne!(again & CPUID_APIC, 0, "enabled again");
    assert_eq!(on & !CPUID_APIC, off & !CPUID_APIC, "nothing else changes");
}

#[test]
fn cpuid_apic_bit_follows_the_apic_global_enable_on_kvm() {
    let mut m = pc_machine();
    let Some(mut k) = kvm_cpu(&m, "CPUID APIC bit on kvm") else {
        return;
    };
    let [on, off, again] = apic_cpuid_on(&mut k, &mut m);
    assert_ne!(on & CPUID_APIC, 0, "APIC enabled at reset");
    assert_eq!(
        off & CPUID_APIC,
        0,
        "IA32_APIC_BASE.EN clear hides the APIC"
    );
    assert_ne!(again & CPUID_APIC, 0, "enabled again");
}

/// The MSRs a Linux kernel reads at boot, as deja's CPU answers them on bt: a microcode
/// revision, fast strings on, and IA32_ARCH_CAPABILITIES (enumerated by CPUID.7.EDX[29])
/// with the "not vulnerable" bits, read-only.
#[test]
fn msrs_linux_reads_at_boot_answer_as_a_cpu_that_needs_no_mitigations() {
    let ok = |value| Seen {
        value,
        read_gp: None,
        write_gp: None,
    };
    let cases = [
        (op(0x8b, None), ok(1 << 32)),
        (op(0x8b, Some(0)), ok(1 << 32)),
        (op(0x1a0, None), ok(0x1801)),
        (op(0x1a0, Some(0x1800)), ok(0x1800)),
        (op(0x10a, None), ok(0x0d10_e179)),
        (
            op(0x10a, Some(0)),
            Seen {
                value: 0x0d10_e179,
                read_gp: None,
                write_gp: Some(0),
            },
        ),
    ];
    let ops: Vec<MsrOp> = cases.iter().map(|c| c.0).collect();
    let (mut m, _, _) = machine();
    let mut c = cpu(&m, &CpuState::reset());
    let got = run_ops_on(&mut c, &mut m, &ops);
    for (i, (o, want)) in cases.iter().enumerate() {
        assert_eq!(got[i], *want, "bt: {o:x?}");
    }
    let table = deja_machine::CpuidTable::deja_default();
    assert!(table.has(7, 3, deja_machine::cpuid::features::ARCH_CAPABILITIES));
}
