//! Faults raised while delivering INT n, INT3, INTO and INT1 (ICEBP) on bt: the instruction
//! did not complete, so the fault is reported with the address of the INT instruction itself
//! (SDM vol. 3 6.5, and the INT n pseudocode), and a handler that removes the cause and
//! returns runs the INT again. Real mode (IVT limit), protected mode (gate not present, gate
//! beyond the IDT limit), virtual-8086 mode (#GP from the gate checks) and long mode (#PF
//! pushing the frame).

mod common;

use common::*;
use deja_machine::{Cpu, Exit, Machine};
use iced_x86::code_asm::*;

/// Scratch data the handlers record into (clear of the TSS and its I/O bitmap).
const DATA: u64 = 0x6000;

fn u32_at(m: &Machine, addr: u64) -> u32 {
    u32::from_le_bytes(peek(m, addr, 4).try_into().unwrap())
}

fn u64_at(m: &Machine, addr: u64) -> u64 {
    u64::from_le_bytes(peek(m, addr, 8).try_into().unwrap())
}

/// A 32-bit interrupt gate to `sel:target`.
fn gate32(target: u64, sel: u16, dpl: u8, present: bool) -> [u8; 8] {
    let access = 0x0e | (u64::from(dpl) << 5) | if present { 0x80 } else { 0 };
    let g = (target & 0xffff) | (u64::from(sel) << 16) | (access << 40) | ((target >> 16) << 48);
    g.to_le_bytes()
}

/// Address of the instruction at `index` in `code` (assembled at `ip`).
fn insn_ip(bitness: u32, code: &[u8], ip: u64, index: usize) -> u64 {
    let mut d = iced_x86::Decoder::with_ip(bitness, code, ip, iced_x86::DecoderOptions::NONE);
    d.iter().nth(index).unwrap().ip()
}

/// Protected mode: the gate of `vector` is not present. The #NP handler records the pushed
/// EIP and error code, marks the gate present and returns: the INT must run again and reach
/// its handler, and the code after it runs once.
fn not_present_gate_then_rerun(vector: u8, ext: u32, emit: impl FnOnce(&mut CodeAssembler)) {
    let (mut m, _, _) = machine();
    let code = asm(32, 0x2000, |a| {
        a.mov(al, 0x7f).unwrap();
        a.add(al, 1).unwrap(); // OF = 1 for INTO
        emit(a);
        a.mov(esi, 0x600d).unwrap();
        a.hlt().unwrap();
    });
    load(&m, 0x2000, &code);
    let np = 0x2800u64;
    let gate_access = IDT + u64::from(vector) * 8 + 5;
    load(
        &m,
        np,
        &asm(32, np, |a| {
            a.pop(eax).unwrap();
            a.mov(dword_ptr((DATA + 4) as u32), eax).unwrap();
            a.mov(eax, dword_ptr(esp)).unwrap();
            a.mov(dword_ptr(DATA as u32), eax).unwrap();
            a.or(byte_ptr(gate_access as u32), 0x80).unwrap();
            a.inc(dword_ptr((DATA + 8) as u32)).unwrap();
            a.iretd().unwrap();
        }),
    );
    let h = 0x2a00u64;
    load(
        &m,
        h,
        &asm(32, h, |a| {
            a.inc(dword_ptr((DATA + 12) as u32)).unwrap();
            a.iretd().unwrap();
        }),
    );
    load(&m, IDT + 11 * 8, &gate32(np, 0x08, 0, true));
    load(&m, IDT + u64::from(vector) * 8, &gate32(h, 0x08, 3, false));
    let s = protected_mode_state(&m, 0x2000);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 200), Exit::Halted);
    let at = insn_ip(32, &code, 0x2000, 2);
    assert_eq!(
        u32_at(&m, DATA) as u64,
        at,
        "vector {vector:#x}: #NP reports the INT's own address"
    );
    assert_eq!(
        u32_at(&m, DATA + 4),
        u32::from(vector) * 8 + 2 + ext,
        "vector {vector:#x}: #NP error code (IDT bit, EXT)"
    );
    assert_eq!(u32_at(&m, DATA + 8), 1, "one #NP");
    assert_eq!(
        u32_at(&m, DATA + 12),
        1,
        "vector {vector:#x}: the INT ran again and reached its handler once"
    );
    assert_eq!(c.state().unwrap().gpr[6], 0x600d);
}

#[test]
fn np_delivering_int_n_reports_the_int_and_reruns_it() {
    not_present_gate_then_rerun(0x40, 0, |a| a.int(0x40).unwrap());
}

#[test]
fn np_delivering_int3_reports_the_int3_and_reruns_it() {
    not_present_gate_then_rerun(3, 0, |a| a.int3().unwrap());
}

#[test]
fn np_delivering_into_reports_the_into_and_reruns_it() {
    not_present_gate_then_rerun(4, 0, |a| a.into().unwrap());
}

#[test]
fn np_delivering_icebp_reports_the_icebp_and_reruns_it() {
    // INT1 is delivered as a hardware event: EXT is set in the error code.
    not_present_gate_then_rerun(1, 1, |a| a.int1().unwrap());
}

#[test]
fn gp_for_a_gate_beyond_the_idt_limit_reports_the_int_and_reruns_it() {
    let (mut m, _, _) = machine();
    let code = asm(32, 0x2000, |a| {
        a.nop().unwrap();
        a.int(0x40).unwrap();
        a.mov(esi, 0x600d).unwrap();
        a.hlt().unwrap();
    });
    load(&m, 0x2000, &code);
    let gp = 0x2800u64;
    load(
        &m,
        gp,
        &asm(32, gp, |a| {
            a.pop(eax).unwrap();
            a.mov(dword_ptr((DATA + 4) as u32), eax).unwrap();
            a.mov(eax, dword_ptr(esp)).unwrap();
            a.mov(dword_ptr(DATA as u32), eax).unwrap();
            a.lidt(ptr((DATA + 0x20) as u32)).unwrap();
            a.inc(dword_ptr((DATA + 8) as u32)).unwrap();
            a.iretd().unwrap();
        }),
    );
    let h = 0x2a00u64;
    load(
        &m,
        h,
        &asm(32, h, |a| {
            a.inc(dword_ptr((DATA + 12) as u32)).unwrap();
            a.iretd().unwrap();
        }),
    );
    load(&m, IDT + 13 * 8, &gate32(gp, 0x08, 0, true));
    load(&m, IDT + 0x40 * 8, &gate32(h, 0x08, 3, true));
    // The full IDT, for the #GP handler to load.
    let mut idtr = 0x7ffu16.to_le_bytes().to_vec();
    idtr.extend_from_slice(&(IDT as u32).to_le_bytes());
    load(&m, DATA + 0x20, &idtr);
    let mut s = protected_mode_state(&m, 0x2000);
    s.idtr.limit = 0x1ff; // vectors 0..0x3f
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 200), Exit::Halted);
    assert_eq!(u32_at(&m, DATA) as u64, insn_ip(32, &code, 0x2000, 1));
    assert_eq!(u32_at(&m, DATA + 4), 0x40 * 8 + 2);
    assert_eq!(u32_at(&m, DATA + 8), 1);
    assert_eq!(u32_at(&m, DATA + 12), 1, "the INT ran again");
    assert_eq!(c.state().unwrap().gpr[6], 0x600d);
}

#[test]
fn gp_for_a_gate_dpl_below_cpl_reports_the_int_in_ring_3() {
    // INT 0x40 from ring 3 through a DPL 0 gate: #GP(0x40*8+2) at the INT.
    let (mut m, _, _) = machine();
    let user = asm(32, 0x2400, |a| {
        a.nop().unwrap();
        a.int(0x40).unwrap();
        a.hlt().unwrap();
    });
    load(&m, 0x2400, &user);
    let code = asm(32, 0x2000, |a| {
        a.push(0x2b).unwrap(); // SS
        a.push(0x7800).unwrap(); // ESP
        a.push(0x2).unwrap(); // EFLAGS
        a.push(0x23).unwrap(); // CS
        a.push(0x2400).unwrap(); // EIP
        a.iretd().unwrap();
    });
    load(&m, 0x2000, &code);
    let gp = 0x2800u64;
    load(
        &m,
        gp,
        &asm(32, gp, |a| {
            a.mov(ax, 0x10).unwrap(); // returning to ring 3 nulled DS
            a.mov(ds, ax).unwrap();
            a.pop(eax).unwrap();
            a.mov(dword_ptr((DATA + 4) as u32), eax).unwrap();
            a.mov(eax, dword_ptr(esp)).unwrap();
            a.mov(dword_ptr(DATA as u32), eax).unwrap();
            a.hlt().unwrap();
        }),
    );
    load(&m, IDT + 13 * 8, &gate32(gp, 0x08, 0, true));
    load(&m, IDT + 0x40 * 8, &gate32(0x2a00, 0x08, 0, true));
    load(&m, TSS + 4, &0xa000u32.to_le_bytes());
    load(&m, TSS + 8, &0x10u32.to_le_bytes());
    let s = protected_mode_state(&m, 0x2000);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 200), Exit::Halted);
    assert_eq!(u32_at(&m, DATA) as u64, insn_ip(32, &user, 0x2400, 1));
    assert_eq!(u32_at(&m, DATA + 4), 0x40 * 8 + 2);
}

#[test]
fn real_mode_int_beyond_the_ivt_limit_reports_the_int_and_reruns_it() {
    let (mut m, _, _) = machine();
    let code = asm(16, 0x1000, |a| {
        a.nop().unwrap();
        a.int(0x20).unwrap();
        a.mov(si, 0x600d).unwrap();
        a.hlt().unwrap();
    });
    load(&m, 0x1000, &code);
    let gp = 0x1800u64;
    load(
        &m,
        gp,
        &asm(16, gp, |a| {
            a.mov(bp, sp).unwrap();
            a.mov(ax, word_ptr(bp)).unwrap();
            a.mov(word_ptr(DATA as u32), ax).unwrap();
            a.lidt(ptr((DATA + 0x20) as u32)).unwrap();
            a.inc(word_ptr((DATA + 8) as u32)).unwrap();
            a.iret().unwrap();
        }),
    );
    let h = 0x1a00u64;
    load(
        &m,
        h,
        &asm(16, h, |a| {
            a.inc(word_ptr((DATA + 12) as u32)).unwrap();
            a.iret().unwrap();
        }),
    );
    load(&m, 13 * 4, &(gp as u32).to_le_bytes());
    load(&m, 0x20 * 4, &(h as u32).to_le_bytes());
    let mut idtr = 0x3ffu16.to_le_bytes().to_vec();
    idtr.extend_from_slice(&0u32.to_le_bytes());
    load(&m, DATA + 0x20, &idtr);
    let mut s = real_mode_state(0x1000);
    s.idtr.limit = 0x37; // vectors 0..13
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 200), Exit::Halted);
    let st = c.state().unwrap();
    assert_eq!(
        u64::from(u16::from_le_bytes(peek(&m, DATA, 2).try_into().unwrap())),
        insn_ip(16, &code, 0x1000, 1),
        "#GP reports the INT's own IP"
    );
    assert_eq!(peek(&m, DATA + 8, 2), [1, 0], "one #GP");
    assert_eq!(peek(&m, DATA + 12, 2), [1, 0], "the INT ran again");
    assert_eq!(st.gpr[6] & 0xffff, 0x600d);
    assert_eq!(st.gpr[4], 0x7000, "the stack is balanced");
}

/// Virtual-8086 mode at 0100:0000 running `v86` with IOPL 0, entered by IRETD from ring 0.
/// The #GP handler records the pushed EIP and error code, then halts.
fn v86_gp(v86: &[u8], gates: &[(u8, [u8; 8])]) -> (u32, u32) {
    let (mut m, _, _) = machine();
    load(&m, TSS + 4, &0xa000u32.to_le_bytes());
    load(&m, TSS + 8, &0x10u32.to_le_bytes());
    let gp = 0x2800u64;
    load(
        &m,
        gp,
        &asm(32, gp, |a| {
            a.mov(ax, 0x10).unwrap(); // leaving virtual-8086 mode nulled DS
            a.mov(ds, ax).unwrap();
            a.mov(eax, dword_ptr(esp)).unwrap();
            a.mov(dword_ptr((DATA + 4) as u32), eax).unwrap();
            a.mov(eax, dword_ptr(esp + 4)).unwrap();
            a.mov(dword_ptr(DATA as u32), eax).unwrap();
            a.hlt().unwrap();
        }),
    );
    load(&m, IDT + 13 * 8, &gate32(gp, 0x08, 0, true));
    for (v, g) in gates {
        load(&m, IDT + u64::from(*v) * 8, g);
    }
    load(&m, 0x1000, v86);
    load(
        &m,
        0x2000,
        &asm(32, 0x2000, |a| {
            // GS, FS, DS, ES, SS, ESP, EFLAGS (VM, IOPL 0), CS, EIP
            for v in [0u32, 0, 0, 0, 0, 0x7000, 0x0002_0002, 0x100, 0] {
                a.push(v as i32).unwrap();
            }
            a.iretd().unwrap();
        }),
    );
    let s = protected_mode_state(&m, 0x2000);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 200), Exit::Halted);
    (u32_at(&m, DATA), u32_at(&m, DATA + 4))
}

#[test]
fn v86_int3_through_a_dpl_0_gate_faults_at_the_int3() {
    // INT3 is not IOPL-sensitive in virtual-8086 mode: it goes to the IDT, where the gate's
    // DPL 0 < CPL 3 raises #GP(3*8+2) during delivery.
    let code = asm(16, 0, |a| {
        a.nop().unwrap();
        a.int3().unwrap();
        a.hlt().unwrap();
    });
    let (eip, err) = v86_gp(&code, &[(3, gate32(0x2a00, 0x08, 0, true))]);
    assert_eq!(eip, 1, "#GP reports the INT3's own IP");
    assert_eq!(err, 3 * 8 + 2);
}

#[test]
fn v86_into_to_a_ring_3_handler_faults_at_the_into() {
    // A gate to a non-ring-0 code segment from virtual-8086 mode: #GP(selector).
    let code = asm(16, 0, |a| {
        a.mov(al, 0x7f).unwrap();
        a.add(al, 1).unwrap();
        a.into().unwrap();
        a.hlt().unwrap();
    });
    let (eip, err) = v86_gp(&code, &[(4, gate32(0x2a00, 0x20, 3, true))]);
    assert_eq!(eip as u64, insn_ip(16, &code, 0, 2), "#GP at the INTO");
    assert_eq!(err, 0x20);
}

#[test]
fn v86_int_n_with_iopl_below_3_faults_at_the_int() {
    let code = asm(16, 0, |a| {
        a.nop().unwrap();
        a.int(0x21).unwrap();
        a.hlt().unwrap();
    });
    let (eip, err) = v86_gp(&code, &[(0x21, gate32(0x2a00, 0x08, 3, true))]);
    assert_eq!(eip, 1);
    assert_eq!(err, 0);
}

#[test]
fn long_mode_pf_pushing_the_int_frame_reports_the_int_and_reruns_it() {
    // RSP points into a 2 MiB page that is not present; #PF has its own IST stack. The
    // handler maps the page and returns: the INT runs again and reaches its handler.
    let (mut m, _, _) = machine();
    let start = 0x20_0000u64;
    let code = asm(64, start, |a| {
        a.mov(rsp, 0x50_0000u64).unwrap();
        a.int(0x80).unwrap();
        a.mov(esi, 0x600d).unwrap();
        a.hlt().unwrap();
    });
    load(&m, start, &code);
    let pf = start + 0x1000;
    let pde2 = PML4 + 0x2000 + 2 * 8;
    load(
        &m,
        pf,
        &asm(64, pf, |a| {
            a.pop(rax).unwrap();
            a.mov(dword_ptr((DATA + 4) as u32), eax).unwrap();
            a.mov(rax, qword_ptr(rsp)).unwrap();
            a.mov(qword_ptr((DATA + 0x10) as u32), rax).unwrap();
            a.mov(rax, cr2).unwrap();
            a.mov(qword_ptr((DATA + 0x18) as u32), rax).unwrap();
            a.mov(rcx, (2u64 << 21) | 0x87).unwrap();
            a.mov(qword_ptr(pde2 as u32), rcx).unwrap();
            a.invlpg(ptr(rax)).unwrap();
            a.inc(dword_ptr((DATA + 8) as u32)).unwrap();
            a.iretq().unwrap();
        }),
    );
    let h = start + 0x1800;
    load(
        &m,
        h,
        &asm(64, h, |a| {
            a.inc(dword_ptr((DATA + 12) as u32)).unwrap();
            a.iretq().unwrap();
        }),
    );
    let s = long_mode_state(&m, start);
    load(&m, pde2, &0u64.to_le_bytes());
    load(&m, IDT + 14 * 16, &gate64(pf, 0x18, 1));
    load(&m, IDT + 0x80 * 16, &gate64(h, 0x18, 0));
    load(&m, TSS + 0x24, &0x9000u64.to_le_bytes()); // IST1
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 200), Exit::Halted);
    assert_eq!(
        u64_at(&m, DATA + 0x10),
        insn_ip(64, &code, start, 1),
        "#PF reports the INT's own RIP"
    );
    assert_eq!(
        u32_at(&m, DATA + 4),
        2,
        "a supervisor write to a page not present"
    );
    assert_eq!(
        u64_at(&m, DATA + 0x18),
        0x50_0000 - 8,
        "CR2: the first push"
    );
    assert_eq!(u32_at(&m, DATA + 8), 1, "one #PF");
    assert_eq!(u32_at(&m, DATA + 12), 1, "the INT ran again");
    let st = c.state().unwrap();
    assert_eq!(st.gpr[6], 0x600d);
    assert_eq!(st.gpr[4], 0x50_0000, "the stack is balanced");
}
