//! Guests that program the PC platform as an operating system does (issue #6) and check
//! what they see: the local APIC through its xAPIC page and its x2APIC MSRs, the I/O APIC,
//! NMIs, resets.
//!
//! - `apic`: xAPIC page (version, one-shot and periodic timer, relocation of the page
//!   through IA32_APIC_BASE, CR8 masking a self-IPI, NMI self-IPI), the I/O APIC routing
//!   the PIT (pin 2) with the 8259As masked, the same pin as an NMI waking `CLI; HLT`,
//!   then x2APIC mode (ID/version MSRs, one-shot timer, SELF IPI, NMI through the ICR).
//! - `apic-tsc-deadline`: the timer in TSC-deadline mode, armed with a deadline read from
//!   RDTSC, through the x2APIC LVT and through the xAPIC LVT; CPUID advertises it.
//! - `platform`: fw_cfg, ACPI tables, the PM timer against the PIT, the PCI bus.
//! - `reset`: reboots itself four times, through 0xcf9, port 0x92, the i8042 and a triple
//!   fault, counting boots in CMOS NVRAM (which a reset does not clear), then exits 0.
//!
//! Vectors 0x28-0x2f (the 8259A slave's, which stays masked) carry the APIC interrupts, so
//! the runtime's IDT covers them.

use crate::link::{LinkError, SectionAsm};
use crate::rt::{
    BootMessages, EXIT_CHECK_FAILED, EXIT_INCONCLUSIVE, EXIT_PASS, Runtime, long_mode_image,
};
use deja_machine::loader::Image;
use iced_x86::code_asm::*;

/// The local APIC's default MMIO base.
const LAPIC: u64 = 0xfee0_0000;
/// Where `apic` moves the xAPIC page for a while (no device decodes it otherwise).
const LAPIC_MOVED: u64 = 0xfed0_0000;
/// The I/O APIC.
const IOAPIC: u64 = 0xfec0_0000;
/// A page directory for 3 GiB..4 GiB (2 MiB pages over the APICs).
const HIGH_PD: i32 = 0x12_1000;
/// The boot path's PDPT (`rt`).
const PDPT: i32 = 0x2000;
/// Interrupt counters, one qword per vector 0x28..0x30, then NMIs.
const COUNTS: i32 = 0x12_3000;
/// Whether EOIs go through the x2APIC MSR (non-zero) or the xAPIC page.
const X2_FLAG: i32 = 0x12_3100;
/// First APIC vector and the ones each test uses.
const V_BASE: u8 = 0x28;
const V_TIMER: u8 = 0x28;
const V_IPI: u8 = 0x29;
const V_DEADLINE: u8 = 0x2a;
const V_IOAPIC: u8 = 0x2b;
/// PIT channel 0 reload for about 1 kHz.
const PIT_1KHZ: i32 = 1193;
/// The slot of the NMI counter in [`COUNTS`].
const NMI_SLOT: i32 = 8;
/// The CMOS NVRAM byte `reset` counts boots in (outside the RTC registers and QEMU's
/// memory-size bytes).
pub const RESET_COUNTER_CMOS: u8 = 0x5f;

fn count_addr(v: u8) -> i32 {
    COUNTS + 8 * i32::from(v - V_BASE)
}

/// Failure messages collected while emitting checks, emitted at the end.
struct Checks {
    fails: Vec<(CodeLabel, String)>,
    guest: &'static str,
}

impl Checks {
    fn new(guest: &'static str) -> Self {
        Self {
            fails: Vec::new(),
            guest,
        }
    }

    /// A label that prints `what` and exits with [`EXIT_CHECK_FAILED`].
    fn fail(&mut self, s: &mut SectionAsm<'_>, what: &str) -> CodeLabel {
        let l = s.a.create_label();
        self.fails
            .push((l, format!("{}: FAIL: {what}\r\n", self.guest)));
        l
    }

    /// `cmp eax, value; jne fail(what)` (registers and MSR halves are 32 bits).
    fn rax_eq(&mut self, s: &mut SectionAsm<'_>, value: i32, what: &str) -> Result<(), LinkError> {
        let l = self.fail(s, what);
        s.a.cmp(eax, value)?;
        s.a.jne(l)?;
        Ok(())
    }

    /// `cmp qword [addr], value; jne fail(what)`.
    fn mem_eq(
        &mut self,
        s: &mut SectionAsm<'_>,
        addr: i32,
        value: i32,
        what: &str,
    ) -> Result<(), LinkError> {
        let l = self.fail(s, what);
        s.a.mov(eax, addr)?;
        s.a.cmp(qword_ptr(rax), value)?;
        s.a.jne(l)?;
        Ok(())
    }

    fn emit(self, s: &mut SectionAsm<'_>, rt: &mut Runtime) -> Result<(), LinkError> {
        for (mut l, text) in self.fails {
            s.a.set_label(&mut l)?;
            rt.print(s, text.as_bytes())?;
            rt.exit_with(s, EXIT_CHECK_FAILED)?;
        }
        Ok(())
    }
}

/// Maps 0xfec00000..0xff000000 (I/O APIC, moved and default xAPIC pages) uncached.
fn map_apics(s: &mut SectionAsm<'_>) -> Result<(), LinkError> {
    let a = &mut s.a;
    a.mov(edi, HIGH_PD)?;
    a.xor(eax, eax)?;
    a.mov(ecx, 512)?;
    a.rep().stosq()?;
    for entry in [502i32, 503] {
        a.mov(edi, HIGH_PD + entry * 8)?;
        a.mov(
            eax,
            (0xc000_0000u32 + entry as u32 * 0x20_0000) as i32 | 0x9b,
        )?; // P RW PWT PCD PS
        a.mov(dword_ptr(rdi), eax)?;
    }
    a.mov(edi, PDPT + 3 * 8)?;
    a.mov(qword_ptr(rdi), HIGH_PD | 3)?;
    a.mov(rax, cr3)?;
    a.mov(cr3, rax)?;
    // Counters and the EOI flag start at zero.
    a.mov(edi, COUNTS)?;
    a.xor(eax, eax)?;
    a.mov(ecx, 0x21)?;
    a.rep().stosq()?;
    Ok(())
}

/// Waits with `STI; HLT` until the counter at `addr` reaches `n`.
fn wait_for(s: &mut SectionAsm<'_>, addr: i32, n: i32) -> Result<(), LinkError> {
    let a = &mut s.a;
    let mut top = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut top)?;
    a.cli()?;
    a.mov(eax, addr)?;
    a.cmp(qword_ptr(rax), n)?;
    a.jae(done)?;
    a.sti()?;
    a.hlt()?;
    a.jmp(top)?;
    a.set_label(&mut done)?;
    a.sti()?;
    Ok(())
}

/// `wrmsr(msr, value)` with a 32-bit value.
fn wrmsr(s: &mut SectionAsm<'_>, msr: u32, value: u32) -> Result<(), LinkError> {
    s.a.mov(ecx, msr as i32)?;
    s.a.mov(eax, value as i32)?;
    s.a.xor(edx, edx)?;
    s.a.wrmsr()?;
    Ok(())
}

/// `rax = rdmsr(msr)` (EDX:EAX joined).
fn rdmsr(s: &mut SectionAsm<'_>, msr: u32) -> Result<(), LinkError> {
    s.a.mov(ecx, msr as i32)?;
    s.a.rdmsr()?;
    s.a.shl(rdx, 32)?;
    s.a.or(rax, rdx)?;
    Ok(())
}

/// `mov dword [LAPIC + reg], value` (R8 holds the base).
fn xapic_write(s: &mut SectionAsm<'_>, reg: u32, value: u32) -> Result<(), LinkError> {
    s.a.mov(dword_ptr(r8 + reg as i32), value as i32)?;
    Ok(())
}

/// `eax = dword [LAPIC + reg]` (zero-extended into RAX).
fn xapic_read(s: &mut SectionAsm<'_>, reg: u32) -> Result<(), LinkError> {
    s.a.mov(eax, dword_ptr(r8 + reg as i32))?;
    Ok(())
}

/// The APIC vectors' handlers: count, EOI (MSR or page, after [`X2_FLAG`]), return; and
/// the NMI handler (count, no EOI).
fn handlers(s: &mut SectionAsm<'_>, vectors: &[u8]) -> Result<(), LinkError> {
    let mut eoi = s.a.create_label();
    for &v in vectors {
        s.export_here(&format!("apic_vec_{v:02x}"))?;
        let a = &mut s.a;
        a.push(rax)?;
        a.mov(eax, count_addr(v))?;
        a.inc(qword_ptr(rax))?;
        a.call(eoi)?;
        a.pop(rax)?;
        a.iretq()?;
    }
    s.export_here("apic_nmi")?;
    let a = &mut s.a;
    a.push(rax)?;
    a.mov(eax, COUNTS + 8 * NMI_SLOT)?;
    a.inc(qword_ptr(rax))?;
    a.pop(rax)?;
    a.iretq()?;

    let mut mmio = a.create_label();
    a.set_label(&mut eoi)?;
    a.push(rcx)?;
    a.push(rdx)?;
    a.mov(eax, X2_FLAG)?;
    a.cmp(qword_ptr(rax), 0)?;
    a.je(mmio)?;
    a.mov(ecx, 0x80b)?;
    a.xor(eax, eax)?;
    a.xor(edx, edx)?;
    a.wrmsr()?;
    a.pop(rdx)?;
    a.pop(rcx)?;
    a.ret()?;
    a.set_label(&mut mmio)?;
    a.mov(rax, LAPIC)?;
    a.mov(dword_ptr(rax + 0xb0), 0)?;
    a.pop(rdx)?;
    a.pop(rcx)?;
    a.ret()?;
    Ok(())
}

const HANDLERS: &[(u8, &str)] = &[
    (2, "apic_nmi"),
    (0x28, "apic_vec_28"),
    (0x29, "apic_vec_29"),
    (0x2a, "apic_vec_2a"),
    (0x2b, "apic_vec_2b"),
];

/// Timer register offsets in the xAPIC page (x2APIC MSR = 0x800 + offset / 16).
const LVT_TIMER: u32 = 0x320;
const TIMER_INITIAL: u32 = 0x380;
const TIMER_CURRENT: u32 = 0x390;
const TIMER_DIVIDE: u32 = 0x3e0;
const SVR: u32 = 0xf0;
const TPR: u32 = 0x80;
const ICR_LOW: u32 = 0x300;
const IRR_1: u32 = 0x210;
const VERSION: u32 = 0x30;
const LAPIC_VERSION: i32 = 0x0005_0014;
const MSR_APIC_BASE: u32 = 0x1b;
const MSR_TSC_DEADLINE: u32 = 0x6e0;

fn x2(offset: u32) -> u32 {
    0x800 + offset / 16
}

pub(crate) fn build_apic() -> Result<Image, LinkError> {
    long_mode_image("apic", BootMessages::default(), HANDLERS, &|s, rt| {
        let mut c = Checks::new("apic");
        rt.load_idt(s)?;
        rt.init_pic(s, 0xff, 0xff)?;
        map_apics(s)?;
        s.a.mov(r8, LAPIC)?;
        xapic_write(s, SVR, 0x1ff)?;
        xapic_read(s, VERSION)?;
        c.rax_eq(s, LAPIC_VERSION, "xAPIC version register")?;

        // One-shot: divide by 1, 100 us at the 1 GHz bus clock.
        xapic_write(s, TIMER_DIVIDE, 0xb)?;
        xapic_write(s, LVT_TIMER, u32::from(V_TIMER))?;
        xapic_write(s, TIMER_INITIAL, 100_000)?;
        wait_for(s, count_addr(V_TIMER), 1)?;
        xapic_read(s, TIMER_CURRENT)?;
        c.rax_eq(s, 0, "one-shot current count after expiry")?;
        rt.print(s, b"apic: xAPIC one-shot timer fired\r\n")?;

        // Periodic: three more interrupts, then masked.
        xapic_write(s, LVT_TIMER, u32::from(V_TIMER) | 1 << 17)?;
        xapic_write(s, TIMER_INITIAL, 50_000)?;
        wait_for(s, count_addr(V_TIMER), 4)?;
        xapic_write(s, LVT_TIMER, 1 << 16)?;
        xapic_write(s, TIMER_INITIAL, 0)?;
        rt.print(s, b"apic: xAPIC periodic timer fired 3 times\r\n")?;

        // Relocation: the page answers at the new base only, then moves back.
        wrmsr(s, MSR_APIC_BASE, (LAPIC_MOVED as u32) | 0x900)?;
        s.a.mov(r9, LAPIC_MOVED)?;
        s.a.mov(eax, dword_ptr(r9 + VERSION as i32))?;
        c.rax_eq(s, LAPIC_VERSION, "version at the relocated base")?;
        xapic_read(s, VERSION)?;
        c.rax_eq(s, -1, "old base still decoded after relocation")?;
        rdmsr(s, MSR_APIC_BASE)?;
        s.a.mov(rcx, LAPIC_MOVED | 0x900)?;
        s.a.cmp(rax, rcx)?;
        let l = c.fail(s, "IA32_APIC_BASE reads back");
        s.a.jne(l)?;
        wrmsr(s, MSR_APIC_BASE, (LAPIC as u32) | 0x900)?;
        xapic_read(s, VERSION)?;
        c.rax_eq(s, LAPIC_VERSION, "version after moving back")?;
        rt.print(s, b"apic: IA32_APIC_BASE relocation\r\n")?;

        // CR8 masks a self-IPI (class 2 <= TPR class 2) until it is lowered.
        s.a.mov(eax, 2)?;
        s.a.mov(cr8, rax)?;
        xapic_read(s, TPR)?;
        c.rax_eq(s, 0x20, "TPR after MOV CR8, 2")?;
        xapic_write(s, ICR_LOW, 1 << 18 | u32::from(V_IPI))?; // self, fixed
        for _ in 0..4 {
            s.a.nop()?;
        }
        c.mem_eq(s, count_addr(V_IPI), 0, "IPI delivered through TPR")?;
        xapic_read(s, IRR_1)?;
        s.a.and(eax, 1 << (V_IPI - 0x20))?;
        c.rax_eq(s, 1 << (V_IPI - 0x20), "IPI pending in IRR")?;
        s.a.xor(eax, eax)?;
        s.a.mov(cr8, rax)?;
        wait_for(s, count_addr(V_IPI), 1)?;
        s.a.mov(rax, cr8)?;
        c.rax_eq(s, 0, "CR8 after lowering")?;
        rt.print(s, b"apic: CR8 held a self-IPI back, then let it in\r\n")?;

        // NMI self-IPI: vector 2 whatever IF says.
        s.a.cli()?;
        xapic_write(s, ICR_LOW, 1 << 18 | 4 << 8)?;
        s.a.mov(eax, COUNTS + 8 * NMI_SLOT)?;
        let mut nmi_wait = s.a.create_label();
        let mut nmi_done = s.a.create_label();
        s.a.set_label(&mut nmi_wait)?;
        s.a.cmp(qword_ptr(rax), 1)?;
        s.a.jae(nmi_done)?;
        s.a.pause()?;
        s.a.jmp(nmi_wait)?;
        s.a.set_label(&mut nmi_done)?;
        s.a.sti()?;
        rt.print(s, b"apic: NMI self-IPI taken with IF=0\r\n")?;

        // I/O APIC pin 2 (the PIT) -> vector 0x2b, physical destination 0; the 8259As
        // stay masked. PIT channel 0 mode 2 at about 1 kHz.
        s.a.mov(r9, IOAPIC)?;
        s.a.mov(dword_ptr(r9), 0x10 + 2 * 2)?;
        s.a.mov(dword_ptr(r9 + 0x10), i32::from(V_IOAPIC))?;
        s.a.mov(dword_ptr(r9), 0x11 + 2 * 2)?;
        s.a.mov(dword_ptr(r9 + 0x10), 0)?;
        s.a.mov(al, 0x34)?;
        s.a.out(0x43u32, al)?;
        s.a.mov(al, PIT_1KHZ & 0xff)?;
        s.a.out(0x40u32, al)?;
        s.a.mov(al, PIT_1KHZ >> 8)?;
        s.a.out(0x40u32, al)?;
        wait_for(s, count_addr(V_IOAPIC), 2)?;
        s.a.cli()?;
        s.a.mov(dword_ptr(r9), 0x10 + 2 * 2)?;
        s.a.mov(dword_ptr(r9 + 0x10), 1 << 16)?;
        s.a.sti()?;
        rt.print(s, b"apic: PIT interrupts through I/O APIC pin 2\r\n")?;

        // The same pin in NMI delivery mode wakes a CLI; HLT (only an NMI can).
        s.a.cli()?;
        s.a.mov(eax, COUNTS + 8 * NMI_SLOT)?;
        s.a.mov(r10, qword_ptr(rax))?;
        s.a.mov(dword_ptr(r9), 0x10 + 2 * 2)?;
        s.a.mov(dword_ptr(r9 + 0x10), 4 << 8)?;
        s.a.hlt()?;
        s.a.mov(dword_ptr(r9), 0x10 + 2 * 2)?;
        s.a.mov(dword_ptr(r9 + 0x10), 1 << 16)?;
        s.a.mov(eax, COUNTS + 8 * NMI_SLOT)?;
        s.a.cmp(qword_ptr(rax), r10)?;
        let l = c.fail(s, "CLI; HLT woken without the I/O APIC's NMI");
        s.a.jbe(l)?;
        s.a.sti()?;
        rt.print(s, b"apic: I/O APIC NMI entry woke CLI; HLT\r\n")?;

        // x2APIC: enable, then the same registers as MSRs.
        rdmsr(s, MSR_APIC_BASE)?;
        s.a.or(eax, 0x400)?;
        s.a.mov(ecx, MSR_APIC_BASE as i32)?;
        s.a.xor(edx, edx)?;
        s.a.wrmsr()?;
        s.a.mov(eax, X2_FLAG)?;
        s.a.mov(qword_ptr(rax), 1)?;
        xapic_read(s, VERSION)?;
        c.rax_eq(s, -1, "xAPIC page decoded in x2APIC mode")?;
        rdmsr(s, x2(VERSION))?;
        c.rax_eq(s, LAPIC_VERSION, "x2APIC version MSR")?;
        rdmsr(s, 0x802)?;
        c.rax_eq(s, 0, "x2APIC ID MSR")?;
        wrmsr(s, x2(TIMER_DIVIDE), 0xb)?;
        wrmsr(s, x2(LVT_TIMER), u32::from(V_TIMER))?;
        wrmsr(s, x2(TIMER_INITIAL), 100_000)?;
        wait_for(s, count_addr(V_TIMER), 5)?;
        rt.print(s, b"apic: x2APIC one-shot timer fired\r\n")?;
        wrmsr(s, 0x83f, u32::from(V_IPI))?; // SELF IPI
        wait_for(s, count_addr(V_IPI), 2)?;
        s.a.cli()?;
        s.a.mov(eax, COUNTS + 8 * NMI_SLOT)?;
        s.a.mov(r10, qword_ptr(rax))?;
        wrmsr(s, x2(ICR_LOW), 1 << 18 | 4 << 8)?; // NMI to self
        s.a.mov(eax, COUNTS + 8 * NMI_SLOT)?;
        let mut nmi_wait = s.a.create_label();
        let mut nmi_done = s.a.create_label();
        s.a.set_label(&mut nmi_wait)?;
        s.a.cmp(qword_ptr(rax), r10)?;
        s.a.ja(nmi_done)?;
        s.a.pause()?;
        s.a.jmp(nmi_wait)?;
        s.a.set_label(&mut nmi_done)?;
        s.a.sti()?;
        rt.print(s, b"apic: x2APIC SELF IPI and NMI\r\n")?;
        // An x2APIC access to a missing register faults (#GP); reading the MMIO-only
        // ICR high half is one. Not checked here: the runtime's #GP stub would exit.

        rt.print(s, b"apic: PASS\r\n")?;
        rt.exit_with(s, EXIT_PASS)?;
        handlers(s, &[0x28, 0x29, 0x2a, 0x2b])?;
        c.emit(s, rt)
    })
}

pub(crate) fn build_tsc_deadline() -> Result<Image, LinkError> {
    long_mode_image(
        "apic-tsc-deadline",
        BootMessages::default(),
        HANDLERS,
        &|s, rt| {
            let mut c = Checks::new("apic-tsc-deadline");
            rt.load_idt(s)?;
            rt.init_pic(s, 0xff, 0xff)?;
            map_apics(s)?;
            // CPUID.1:ECX.TSC_DEADLINE[24] and x2APIC[21].
            s.a.mov(eax, 1)?;
            s.a.cpuid()?;
            s.a.mov(eax, ecx)?;
            s.a.and(eax, 1 << 24 | 1 << 21)?;
            c.rax_eq(
                s,
                1 << 24 | 1 << 21,
                "CPUID.1:ECX TSC-deadline and x2APIC bits",
            )?;
            s.a.mov(r8, LAPIC)?;
            xapic_write(s, SVR, 0x1ff)?;
            for (round, x2apic) in [(1, false), (2, true)] {
                if x2apic {
                    rdmsr(s, MSR_APIC_BASE)?;
                    s.a.or(eax, 0x400)?;
                    s.a.mov(ecx, MSR_APIC_BASE as i32)?;
                    s.a.xor(edx, edx)?;
                    s.a.wrmsr()?;
                    s.a.mov(eax, X2_FLAG)?;
                    s.a.mov(qword_ptr(rax), 1)?;
                    wrmsr(s, x2(LVT_TIMER), u32::from(V_DEADLINE) | 2 << 17)?;
                } else {
                    xapic_write(s, LVT_TIMER, u32::from(V_DEADLINE) | 2 << 17)?;
                }
                // Deadline = now + 10^6 TSC ticks (1 ms on bt); r12 keeps it.
                let a = &mut s.a;
                a.rdtsc()?;
                a.shl(rdx, 32)?;
                a.or(rax, rdx)?;
                a.add(rax, 1_000_000)?;
                a.mov(r12, rax)?;
                a.mov(rdx, rax)?;
                a.shr(rdx, 32)?;
                a.mov(ecx, MSR_TSC_DEADLINE as i32)?;
                a.wrmsr()?;
                // It reads back while armed; 0 only if it already fired (a host stall).
                rdmsr(s, MSR_TSC_DEADLINE)?;
                let mut read_ok = s.a.create_label();
                s.a.cmp(rax, r12)?;
                s.a.je(read_ok)?;
                let l = c.fail(s, "IA32_TSC_DEADLINE reads back while armed");
                s.a.test(rax, rax)?;
                s.a.jnz(l)?;
                s.a.mov(eax, count_addr(V_DEADLINE))?;
                s.a.cmp(qword_ptr(rax), round)?;
                s.a.jb(l)?;
                s.a.set_label(&mut read_ok)?;
                s.a.nop()?;
                wait_for(s, count_addr(V_DEADLINE), round)?;
                // It fired no earlier than the deadline, and disarmed itself.
                let a = &mut s.a;
                a.rdtsc()?;
                a.shl(rdx, 32)?;
                a.or(rax, rdx)?;
                a.cmp(rax, r12)?;
                let l = c.fail(s, "TSC-deadline interrupt before the deadline");
                s.a.jb(l)?;
                rdmsr(s, MSR_TSC_DEADLINE)?;
                c.rax_eq(s, 0, "IA32_TSC_DEADLINE after it fired")?;
            }
            rt.print(
                s,
                b"apic-tsc-deadline: xAPIC and x2APIC TSC-deadline timer fired\r\n",
            )?;
            rt.print(s, b"apic-tsc-deadline: PASS\r\n")?;
            rt.exit_with(s, EXIT_PASS)?;
            handlers(s, &[0x28, 0x29, 0x2a, 0x2b])?;
            c.emit(s, rt)
        },
    )
}

/// Reads CMOS byte `index` into AL.
fn cmos_read(s: &mut SectionAsm<'_>, index: u8) -> Result<(), LinkError> {
    s.a.mov(al, i32::from(index))?;
    s.a.out(0x70u32, al)?;
    s.a.in_(al, 0x71u32)?;
    Ok(())
}

pub(crate) fn build_reset() -> Result<Image, LinkError> {
    long_mode_image("reset", BootMessages::default(), &[], &|s, rt| {
        // Boot n (n = CMOS counter): 0 -> 0xcf9, 1 -> port 0x92, 2 -> i8042, 3 -> triple
        // fault, 4 -> done.
        cmos_read(s, RESET_COUNTER_CMOS)?;
        let a = &mut s.a;
        a.movzx(ebx, al)?;
        a.lea(eax, ptr(rbx + 1))?;
        a.mov(ecx, eax)?;
        a.mov(al, i32::from(RESET_COUNTER_CMOS))?;
        a.out(0x70u32, al)?;
        a.mov(eax, ecx)?;
        a.out(0x71u32, al)?;
        rt.print(s, b"reset: boot ")?;
        s.a.mov(rax, rbx)?;
        rt.print_dec(s)?;
        rt.print(s, b"\r\n")?;
        let mut labels: Vec<CodeLabel> = (0..4).map(|_| s.a.create_label()).collect();
        for (i, l) in labels.iter().enumerate() {
            s.a.cmp(ebx, i as i32)?;
            s.a.je(*l)?;
        }
        rt.print(
            s,
            b"reset: PASS (rebooted through 0xcf9, 0x92, i8042, triple fault)\r\n",
        )?;
        rt.exit_with(s, EXIT_PASS)?;
        let mut hang = s.a.create_label();
        // 0xcf9: select hard reset (bit 1), then set the reset bit (bit 2).
        s.a.set_label(&mut labels[0])?;
        s.a.mov(dx, 0xcf9)?;
        s.a.mov(al, 0x02)?;
        s.a.out(dx, al)?;
        s.a.mov(al, 0x06)?;
        s.a.out(dx, al)?;
        s.a.jmp(hang)?;
        // Port 0x92: a rising edge of bit 0 (fast reset).
        s.a.set_label(&mut labels[1])?;
        s.a.in_(al, 0x92u32)?;
        s.a.and(al, 0xfe)?;
        s.a.out(0x92u32, al)?;
        s.a.or(al, 1)?;
        s.a.out(0x92u32, al)?;
        s.a.jmp(hang)?;
        // The i8042's pulse-reset command.
        s.a.set_label(&mut labels[2])?;
        s.a.mov(al, 0xfe)?;
        s.a.out(0x64u32, al)?;
        s.a.jmp(hang)?;
        // Triple fault: an empty IDT, then an exception.
        s.a.set_label(&mut labels[3])?;
        let empty = s.sym("empty_idt_ptr");
        s.a.mov(rax, empty)?;
        s.a.lidt(ptr(rax))?;
        s.a.ud2()?;
        s.a.set_label(&mut hang)?;
        rt.print(s, b"reset: FAIL: still running after a reset request\r\n")?;
        rt.exit_with(s, EXIT_CHECK_FAILED)?;
        s.export_here("empty_idt_ptr")?;
        s.a.dw(&[0])?;
        s.a.dq(&[0])?;
        Ok(())
    })
}

/// Scratch memory `platform` reads fw_cfg items and DMA results into.
const BUF: i32 = 0x12_4000;
/// The fw_cfg DMA control structure.
const DMA_DESC: i32 = 0x12_5000;
/// What `platform` stores the RAM size (from fw_cfg) in.
const RAM_SIZE_AT: i32 = 0x12_5100;

/// Reads `n` bytes of fw_cfg item `key` into `at`.
fn fw_read(s: &mut SectionAsm<'_>, key: u16, at: i32, n: i32) -> Result<(), LinkError> {
    let a = &mut s.a;
    a.mov(ax, i32::from(key))?;
    a.mov(dx, 0x510)?;
    a.out(dx, ax)?;
    a.mov(edi, at)?;
    a.mov(ecx, n)?;
    fw_read_bytes(s)
}

/// Reads ECX (non-zero) bytes of the selected fw_cfg item to RDI, one IN at a time (a
/// `rep insb` is one exit for a whole batch under KVM but one per byte under bt, so traces
/// recorded on one would not replay on the other).
fn fw_read_bytes(s: &mut SectionAsm<'_>) -> Result<(), LinkError> {
    let a = &mut s.a;
    let mut top = a.create_label();
    a.mov(dx, 0x511)?;
    a.set_label(&mut top)?;
    a.in_(al, dx)?;
    a.stosb()?;
    a.dec(ecx)?;
    a.jnz(top)?;
    Ok(())
}

/// Sums `len` (ECX, non-zero) bytes at RSI into AL (clobbers RSI, RCX, RDX).
fn checksum(s: &mut SectionAsm<'_>) -> Result<(), LinkError> {
    let a = &mut s.a;
    let mut top = a.create_label();
    a.xor(edx, edx)?;
    a.set_label(&mut top)?;
    a.add(dl, byte_ptr(rsi))?;
    a.inc(rsi)?;
    a.dec(ecx)?;
    a.jnz(top)?;
    a.mov(eax, edx)?;
    a.and(eax, 0xff)?;
    Ok(())
}

/// Reads the PM timer (24 bits) into EAX.
fn pm_timer(s: &mut SectionAsm<'_>) -> Result<(), LinkError> {
    s.a.mov(dx, 0x608)?;
    s.a.in_(eax, dx)?;
    s.a.and(eax, 0xff_ffff)?;
    Ok(())
}

/// Latches and reads PIT channel 2 into EAX (clobbers ECX).
fn pit_ch2(s: &mut SectionAsm<'_>) -> Result<(), LinkError> {
    let a = &mut s.a;
    a.mov(al, 0x80)?;
    a.out(0x43u32, al)?;
    a.in_(al, 0x42u32)?;
    a.movzx(ecx, al)?;
    a.in_(al, 0x42u32)?;
    a.movzx(eax, al)?;
    a.shl(eax, 8)?;
    a.or(eax, ecx)?;
    Ok(())
}

/// PIT ticks `platform` measures the PM timer over (about 34 ms).
pub const PM_MEASURE_PIT_TICKS: i32 = 40_000;
/// The widest PIT interval (0.5 ms) a PM reading may be bracketed by at either end.
pub const PM_BRACKET_PIT_TICKS: i32 = 600;
/// How far the PM timer may be from 3 ticks per PIT tick (3.579545 MHz / 1.193182 MHz =
/// 2.99999), in percent of the expected count: the two brackets may blur it by 3%, and a
/// wrong clock (the PIT's 1.19 MHz, the HPET's 14.3 MHz) is far off.
pub const PM_TOLERANCE_PERCENT: i32 = 3;

/// A PM timer reading bracketed by two PIT channel 2 readings at most
/// [`PM_BRACKET_PIT_TICKS`] apart (retried until they are): EAX = the first PIT reading,
/// EDX = the PM reading (clobbers ECX, R8, R9).
fn pm_bracket(s: &mut SectionAsm<'_>) -> Result<(), LinkError> {
    let mut again = s.a.create_label();
    s.a.set_label(&mut again)?;
    pit_ch2(s)?;
    s.a.mov(r8d, eax)?;
    pm_timer(s)?;
    s.a.mov(r9d, eax)?;
    pit_ch2(s)?;
    s.a.mov(ecx, r8d)?;
    s.a.sub(ecx, eax)?;
    s.a.and(ecx, 0xffff)?;
    s.a.cmp(ecx, PM_BRACKET_PIT_TICKS)?;
    s.a.ja(again)?;
    s.a.mov(eax, r8d)?;
    s.a.mov(edx, r9d)?;
    Ok(())
}

pub(crate) fn build_platform() -> Result<Image, LinkError> {
    long_mode_image("platform", BootMessages::default(), &[], &|s, rt| {
        let mut c = Checks::new("platform");
        rt.load_idt(s)?;
        rt.init_pic(s, 0xff, 0xff)?;

        // fw_cfg through the ports: signature, ID (traditional + DMA), one CPU.
        fw_read(s, 0x00, BUF, 4)?;
        s.a.mov(eax, dword_ptr(BUF as u64))?;
        c.rax_eq(s, i32::from_le_bytes(*b"QEMU"), "fw_cfg signature")?;
        fw_read(s, 0x01, BUF, 4)?;
        s.a.mov(eax, dword_ptr(BUF as u64))?;
        c.rax_eq(s, 3, "fw_cfg ID (traditional and DMA)")?;
        fw_read(s, 0x05, BUF, 2)?;
        s.a.movzx(eax, word_ptr(BUF as u64))?;
        c.rax_eq(s, 1, "fw_cfg CPU count")?;
        fw_read(s, 0x03, RAM_SIZE_AT, 8)?;
        rt.print(s, b"platform: fw_cfg QEMU, DMA, 1 CPU, ram ")?;
        s.a.mov(rax, qword_ptr(RAM_SIZE_AT as u64))?;
        s.a.shr(rax, 20)?;
        rt.print_dec(s)?;
        rt.print(s, b" MiB\r\n")?;
        // The command line: its size counts the NUL, which ends the data.
        fw_read(s, 0x14, BUF, 4)?;
        s.a.mov(ebx, dword_ptr(BUF as u64))?;
        s.a.cmp(ebx, 0x200)?;
        let l = c.fail(s, "fw_cfg command line longer than 511 bytes");
        s.a.ja(l)?;
        s.a.mov(ax, 0x15)?;
        s.a.mov(dx, 0x510)?;
        s.a.out(dx, ax)?;
        s.a.mov(edi, BUF)?;
        s.a.mov(ecx, ebx)?;
        fw_read_bytes(s)?;
        s.a.movzx(eax, byte_ptr(rbx + BUF - 1))?;
        c.rax_eq(s, 0, "fw_cfg command line NUL at its size")?;
        rt.print(s, b"platform: cmdline [")?;
        s.a.mov(esi, BUF)?;
        s.a.call(rt.puts)?;
        rt.print(s, b"]\r\n")?;

        // The file directory: find etc/e820 and its key.
        fw_read(s, 0x19, BUF, 4)?;
        s.a.mov(ebx, dword_ptr(BUF as u64))?;
        s.a.bswap(ebx)?;
        let l = c.fail(s, "fw_cfg file directory empty or too long");
        s.a.test(ebx, ebx)?;
        s.a.jz(l)?;
        s.a.cmp(ebx, 32)?;
        s.a.ja(l)?;
        let mut next = s.a.create_label();
        let missing = c.fail(s, "no etc/e820 in the fw_cfg file directory");
        s.a.set_label(&mut next)?;
        s.a.test(ebx, ebx)?;
        s.a.jz(missing)?;
        s.a.dec(ebx)?;
        s.a.mov(edi, BUF)?;
        s.a.mov(ecx, 64)?;
        fw_read_bytes(s)?;
        s.a.mov(rax, 0x3032_3865_2f63_7465u64)?; // "etc/e820"
        s.a.cmp(qword_ptr((BUF + 8) as u64), rax)?;
        s.a.jne(next)?;
        s.a.cmp(byte_ptr((BUF + 16) as u64), 0)?;
        s.a.jne(next)?;
        // Its key (big-endian) and size.
        s.a.movzx(ebx, word_ptr((BUF + 4) as u64))?;
        s.a.xchg(bl, bh)?;
        s.a.mov(eax, dword_ptr(BUF as u64))?;
        s.a.bswap(eax)?;
        c.rax_eq(s, 20, "etc/e820 size (one entry below 4 GiB)")?;
        // DMA: select etc/e820 and read it into BUF + 0x100.
        s.a.mov(edi, DMA_DESC)?;
        s.a.mov(eax, ebx)?;
        s.a.shl(eax, 16)?;
        s.a.or(eax, 0x0a)?; // SELECT | READ
        s.a.bswap(eax)?;
        s.a.mov(dword_ptr(rdi), eax)?;
        s.a.mov(eax, 20)?;
        s.a.bswap(eax)?;
        s.a.mov(dword_ptr(rdi + 4), eax)?;
        s.a.mov(eax, BUF + 0x100)?;
        s.a.bswap(eax)?;
        s.a.mov(dword_ptr(rdi + 8), 0)?;
        s.a.mov(dword_ptr(rdi + 12), eax)?;
        s.a.xor(eax, eax)?;
        s.a.mov(dx, 0x514)?;
        s.a.out(dx, eax)?;
        s.a.mov(eax, DMA_DESC)?;
        s.a.bswap(eax)?;
        s.a.mov(dx, 0x518)?;
        s.a.out(dx, eax)?;
        s.a.mov(eax, dword_ptr(DMA_DESC as u64))?;
        c.rax_eq(s, 0, "fw_cfg DMA control word after the transfer")?;
        s.a.mov(rax, qword_ptr((BUF + 0x100 + 8) as u64))?;
        s.a.cmp(rax, qword_ptr(RAM_SIZE_AT as u64))?;
        let l = c.fail(s, "etc/e820 (read by DMA) disagrees with the RAM size");
        s.a.jne(l)?;
        s.a.mov(eax, dword_ptr((BUF + 0x100 + 16) as u64))?;
        c.rax_eq(s, 1, "etc/e820 entry type")?;
        rt.print(
            s,
            b"platform: fw_cfg directory has etc/e820; DMA read it\r\n",
        )?;

        // ACPI: scan for the RSDP, then check every table's checksum.
        let mut scan = s.a.create_label();
        let mut rsdp = s.a.create_label();
        let no_rsdp = c.fail(s, "no RSDP in 0xe0000..0x100000");
        s.a.mov(esi, 0xe_0000)?;
        s.a.mov(rbx, 0x2052_5450_2044_5352u64)?; // "RSD PTR "
        s.a.set_label(&mut scan)?;
        s.a.cmp(qword_ptr(rsi), rbx)?;
        s.a.je(rsdp)?;
        s.a.add(esi, 16)?;
        s.a.cmp(esi, 0x10_0000)?;
        s.a.jb(scan)?;
        s.a.jmp(no_rsdp)?;
        s.a.set_label(&mut rsdp)?;
        s.a.mov(r12, rsi)?;
        s.a.mov(ecx, 20)?;
        checksum(s)?;
        c.rax_eq(s, 0, "RSDP checksum")?;
        // RSDT: checksum, then each table it points to.
        s.a.mov(r13d, dword_ptr(r12 + 16))?;
        s.a.mov(rsi, r13)?;
        s.a.mov(ecx, dword_ptr(r13 + 4))?;
        checksum(s)?;
        c.rax_eq(s, 0, "RSDT checksum")?;
        rt.print(s, b"platform: ACPI RSDP and RSDT checksums; tables")?;
        s.a.mov(r14d, dword_ptr(r13 + 4))?;
        s.a.sub(r14d, 36)?;
        s.a.shr(r14d, 2)?; // entries
        s.a.lea(r15, ptr(r13 + 36))?;
        s.a.xor(ebp, ebp)?; // bit 0: FACP seen, bit 1: APIC seen
        let mut each = s.a.create_label();
        let mut tables_done = s.a.create_label();
        let mut not_facp = s.a.create_label();
        let mut not_apic = s.a.create_label();
        s.a.set_label(&mut each)?;
        s.a.test(r14d, r14d)?;
        s.a.jz(tables_done)?;
        s.a.mov(ebx, dword_ptr(r15))?;
        s.a.mov(rsi, rbx)?;
        s.a.mov(ecx, dword_ptr(rbx + 4))?;
        checksum(s)?;
        c.rax_eq(s, 0, "an ACPI table's checksum")?;
        s.a.mov(al, b' ' as i32)?;
        s.a.call(rt.putc)?;
        for i in 0..4 {
            s.a.mov(al, byte_ptr(rbx + i))?;
            s.a.call(rt.putc)?;
        }
        s.a.mov(eax, dword_ptr(rbx))?;
        s.a.cmp(eax, i32::from_le_bytes(*b"FACP"))?;
        s.a.jne(not_facp)?;
        s.a.or(ebp, 1)?;
        s.a.mov(eax, dword_ptr(rbx + 76))?; // PM_TMR_BLK
        c.rax_eq(s, 0x608, "FADT PM timer block")?;
        s.a.set_label(&mut not_facp)?;
        s.a.mov(eax, dword_ptr(rbx))?;
        s.a.cmp(eax, i32::from_le_bytes(*b"APIC"))?;
        s.a.jne(not_apic)?;
        s.a.or(ebp, 2)?;
        s.a.mov(eax, dword_ptr(rbx + 36))?;
        c.rax_eq(s, 0xfee0_0000u32 as i32, "MADT local APIC address")?;
        s.a.set_label(&mut not_apic)?;
        s.a.add(r15, 4)?;
        s.a.dec(r14d)?;
        s.a.jmp(each)?;
        s.a.set_label(&mut tables_done)?;
        rt.print(s, b"\r\n")?;
        s.a.mov(eax, ebp)?;
        c.rax_eq(s, 3, "RSDT lists a FADT and a MADT")?;

        // PM timer: monotonic over 64 reads, then 3 ticks per PIT tick over 25 ms.
        pm_timer(s)?;
        s.a.mov(ebx, eax)?;
        s.a.mov(r14d, 64)?;
        let mut mono = s.a.create_label();
        s.a.set_label(&mut mono)?;
        pm_timer(s)?;
        s.a.mov(ecx, eax)?;
        s.a.sub(ecx, ebx)?;
        s.a.and(ecx, 0xff_ffff)?;
        s.a.cmp(ecx, 0x80_0000)?;
        let l = c.fail(s, "PM timer went backwards");
        s.a.jae(l)?;
        s.a.mov(ebx, eax)?;
        s.a.dec(r14d)?;
        s.a.jnz(mono)?;
        // PIT channel 2 free running (gate on, speaker off, mode 2, count 0).
        let a = &mut s.a;
        a.in_(al, 0x61u32)?;
        a.and(al, 0xfc)?;
        a.or(al, 1)?;
        a.out(0x61u32, al)?;
        a.mov(al, 0xb4)?;
        a.out(0x43u32, al)?;
        a.xor(eax, eax)?;
        a.out(0x42u32, al)?;
        a.out(0x42u32, al)?;
        // Start once the counter is seen counting (as Linux's PIT calibration waits for
        // it): a read right after the count is written may still show the old value.
        pit_ch2(s)?;
        s.a.mov(r12d, eax)?;
        let mut counting = s.a.create_label();
        s.a.set_label(&mut counting)?;
        pit_ch2(s)?;
        s.a.cmp(eax, r12d)?;
        s.a.je(counting)?;
        // Each end of the measurement is a PM reading bracketed by two PIT readings close
        // together (a host stall between them would blur it: then it is taken again).
        s.a.mov(r10d, 8)?; // attempts
        let mut measure = s.a.create_label();
        s.a.set_label(&mut measure)?;
        let mut stalls = s.a.create_label();
        s.a.dec(r10d)?;
        s.a.jz(stalls)?;
        pm_bracket(s)?;
        s.a.mov(r12d, eax)?; // PIT at the start
        s.a.mov(r13d, edx)?; // PM at the start
        s.a.mov(r15d, edx)?; // PM at the last step
        // PIT ticks accumulate step by step. A step longer than the PIT's 55 ms wrap (a
        // vCPU the host did not run) would lose ticks: a step in which the PM timer moved
        // more than 40 ms starts the measurement again. (A PM timer at a wrong rate still
        // moves little per step, so this does not hide one.)
        s.a.xor(ebx, ebx)?;
        let mut spin = s.a.create_label();
        s.a.set_label(&mut spin)?;
        pit_ch2(s)?;
        s.a.mov(ecx, r12d)?;
        s.a.sub(ecx, eax)?;
        s.a.and(ecx, 0xffff)?; // it counts down
        s.a.add(ebx, ecx)?;
        s.a.mov(r12d, eax)?;
        pm_timer(s)?;
        s.a.mov(ecx, eax)?;
        s.a.sub(ecx, r15d)?;
        s.a.and(ecx, 0xff_ffff)?;
        s.a.mov(r15d, eax)?;
        s.a.cmp(ecx, 3 * 48_000)?;
        s.a.ja(measure)?;
        s.a.cmp(ebx, PM_MEASURE_PIT_TICKS)?;
        s.a.jb(spin)?;
        pm_bracket(s)?;
        s.a.mov(ecx, edx)?;
        s.a.sub(ecx, r15d)?;
        s.a.and(ecx, 0xff_ffff)?;
        s.a.cmp(ecx, 3 * 48_000)?;
        s.a.ja(measure)?;
        s.a.mov(ecx, r12d)?;
        s.a.sub(ecx, eax)?;
        s.a.and(ecx, 0xffff)?;
        s.a.add(ebx, ecx)?; // PIT ticks elapsed up to the PM reading
        s.a.mov(eax, edx)?;
        s.a.sub(eax, r13d)?;
        s.a.and(eax, 0xff_ffff)?; // PM ticks elapsed
        s.a.mov(r14d, eax)?;
        // |pm - 3 * pit| <= tolerance
        s.a.imul_3(ecx, ebx, 3)?;
        s.a.sub(eax, ecx)?;
        s.a.mov(ecx, eax)?;
        s.a.neg(ecx)?;
        s.a.cmovs(ecx, eax)?;
        rt.print(s, b"platform: PM timer ")?;
        s.a.mov(eax, r14d)?;
        rt.print_dec(s)?;
        rt.print(s, b" ticks over ")?;
        s.a.mov(eax, ebx)?;
        rt.print_dec(s)?;
        rt.print(s, b" PIT ticks\r\n")?;
        s.a.imul_3(ecx, ecx, 100 / PM_TOLERANCE_PERCENT)?;
        s.a.imul_3(eax, ebx, 3)?;
        s.a.cmp(ecx, eax)?;
        let l = c.fail(s, "PM timer not at 3.579545 MHz against the PIT (3%)");
        s.a.ja(l)?;

        // PCI configuration mechanism #1: bus 0, function 0 of each device.
        s.a.xor(ebx, ebx)?; // device
        s.a.xor(ebp, ebp)?; // devices found
        s.a.xor(r12d, r12d)?; // bit 0: i440FX at 00:00.0, bit 1: PIIX3 at 00:01.0
        let mut dev = s.a.create_label();
        let mut absent = s.a.create_label();
        let mut not_host = s.a.create_label();
        s.a.set_label(&mut dev)?;
        s.a.mov(eax, ebx)?;
        s.a.shl(eax, 11)?;
        s.a.or(eax, 0x8000_0000u32 as i32)?;
        s.a.mov(dx, 0xcf8)?;
        s.a.out(dx, eax)?;
        s.a.mov(dx, 0xcfc)?;
        s.a.in_(eax, dx)?;
        s.a.cmp(eax, -1)?;
        s.a.je(absent)?;
        s.a.inc(ebp)?;
        s.a.cmp(eax, 0x1237_8086)?;
        s.a.jne(not_host)?;
        s.a.test(ebx, ebx)?;
        s.a.jnz(not_host)?;
        s.a.or(r12d, 1)?;
        s.a.set_label(&mut not_host)?;
        s.a.cmp(eax, 0x7000_8086)?;
        s.a.jne(absent)?;
        s.a.cmp(ebx, 1)?;
        s.a.jne(absent)?;
        s.a.or(r12d, 2)?;
        s.a.set_label(&mut absent)?;
        s.a.inc(ebx)?;
        s.a.cmp(ebx, 32)?;
        s.a.jb(dev)?;
        s.a.mov(eax, r12d)?;
        c.rax_eq(
            s,
            3,
            "PCI 00:00.0 i440FX (8086:1237) and 00:01.0 PIIX3 (8086:7000)",
        )?;
        s.a.mov(eax, ebp)?;
        c.rax_eq(s, 2, "PCI devices on bus 0")?;
        rt.print(
            s,
            b"platform: PCI 00:00.0 8086:1237 i440FX, 00:01.0 8086:7000 PIIX3\r\n",
        )?;

        rt.print(s, b"platform: PASS\r\n")?;
        rt.exit_with(s, EXIT_PASS)?;
        s.a.set_label(&mut stalls)?;
        rt.print(
            s,
            b"platform: INCONCLUSIVE: the vCPU was not run for over 40 ms in every attempt \
              to measure the PM timer against the PIT\r\n",
        )?;
        rt.exit_with(s, EXIT_INCONCLUSIVE)?;
        c.emit(s, rt)
    })
}
