//! Hardware task switches, the debug facilities (TF single-step, DR0-DR3 breakpoints, RF,
//! general detect, ICEBP, the MOV SS shadow) and #AC, on bt.

mod common;

use common::*;
use deja_machine::cpu::{CpuState, seg};
use deja_machine::vm_memory::Bytes;
use deja_machine::{Cpu, Exit, Machine};
use iced_x86::code_asm::*;

/// Second TSS (the target of task switches).
const TSS2: u64 = 0x4000;
/// Its selector: after the 16-byte TSS slot at 0x38.
const SEL_TSS2: u16 = 0x48;
/// A task gate to TSS2 in the GDT.
const SEL_TASK_GATE: u16 = 0x50;
/// Scratch data the handlers record into.
const DATA: u64 = 0x5000;

fn u32_at(m: &Machine, addr: u64) -> u32 {
    u32::from_le_bytes(peek(m, addr, 4).try_into().unwrap())
}

fn tss_descriptor(base: u64, limit: u64, type_: u64) -> u64 {
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (type_ << 40)
        | (1 << 47)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56)
}

fn gate32_at(target: u64) -> [u8; 8] {
    let g = (target & 0xffff) | (0x08u64 << 16) | (0x8eu64 << 40) | ((target >> 16) << 48);
    g.to_le_bytes()
}

fn task_gate(tss: u16, dpl: u64) -> [u8; 8] {
    ((tss as u64) << 16 | (0x85 | dpl << 5) << 40).to_le_bytes()
}

/// A 32-bit TSS image that starts at `eip` in the flat ring-0 segments with stack `esp`.
fn tss32(entry: u32, stack: u32, acc: u32) -> Vec<u8> {
    let mut t = vec![0u8; 0x68];
    let put =
        |t: &mut Vec<u8>, off: usize, v: u32| t[off..off + 4].copy_from_slice(&v.to_le_bytes());
    put(&mut t, 0x20, entry);
    put(&mut t, 0x24, 0x2);
    put(&mut t, 0x28, acc);
    put(&mut t, 0x38, stack);
    for (i, s) in [0x10u32, 0x08, 0x10, 0x10, 0x10, 0x10].iter().enumerate() {
        put(&mut t, 0x48 + 4 * i, *s);
    }
    put(&mut t, 0x66 - 2, 0x68 << 16);
    t
}

/// Protected mode with TSS2 and a task gate in the GDT.
fn task_machine(start: u64, code: &[u8]) -> (Machine, CpuState) {
    let (m, _, _) = machine();
    load(&m, start, code);
    let mut s = protected_mode_state(&m, start);
    let descs = [
        tss_descriptor(TSS2, 0x67, 9),
        u64::from_le_bytes(task_gate(SEL_TSS2, 0)),
    ];
    let bytes: Vec<u8> = descs.iter().flat_map(|d| d.to_le_bytes()).collect();
    load(&m, GDT + SEL_TSS2 as u64, &bytes);
    s.gdtr.limit = 0x57;
    // The running task's TSS is busy, as LTR left it.
    load(&m, GDT + 0x38 + 5, &[0x8b]);
    (m, s)
}

fn gdt_type(m: &Machine, sel: u16) -> u8 {
    peek(m, GDT + sel as u64 + 5, 1)[0] & 0xf
}

#[test]
fn far_jmp_to_a_tss_saves_the_old_task_and_loads_the_new_one() {
    let code = asm(32, 0x2000, |a| {
        a.mov(eax, 0xaaaa).unwrap();
        a.mov(ebx, 0xbbbb).unwrap();
        a.jmp_far(SEL_TSS2, 0).unwrap();
    });
    let (mut m, s) = task_machine(0x2000, &code);
    load(&m, TSS2, &tss32(0x2100, 0x9000, 0x1234));
    load(&m, 0x2100, &asm(32, 0x2100, |a| a.hlt().unwrap()));
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 100), Exit::Halted);
    let st = c.state().unwrap();
    assert_eq!(st.tr.selector, SEL_TSS2);
    assert_eq!(st.gpr[0], 0x1234, "EAX from the new TSS");
    assert_eq!(st.gpr[4], 0x9000);
    assert_eq!(st.rip, 0x2101);
    assert_ne!(st.cr0 & 8, 0, "CR0.TS is set by a task switch");
    assert_eq!(st.rflags & (1 << 14), 0, "JMP does not nest");
    // The old task's state went into its TSS, EIP after the JMP.
    assert_eq!(u32_at(&m, TSS + 0x20), 0x2000 + 10 + 7);
    assert_eq!(u32_at(&m, TSS + 0x28), 0xaaaa);
    assert_eq!(u32_at(&m, TSS + 0x34), 0xbbbb);
    assert_eq!(u32_at(&m, TSS + 0x4c) & 0xffff, 0x08, "CS saved");
    assert_eq!(gdt_type(&m, 0x38), 9, "the old task is no longer busy");
    assert_eq!(gdt_type(&m, SEL_TSS2), 0xb, "the new task is busy");
    assert_eq!(u32_at(&m, TSS2) & 0xffff, 0, "no back link for JMP");
}

#[test]
fn a_16_bit_tss_saves_and_loads_16_bit_state() {
    let code = asm(32, 0x2000, |a| {
        a.mov(eax, 0x1234_5678).unwrap();
        a.jmp_far(SEL_TSS2, 0).unwrap();
    });
    let (mut m, s) = task_machine(0x2000, &code);
    load(
        &m,
        GDT + SEL_TSS2 as u64,
        &tss_descriptor(TSS2, 0x2b, 1).to_le_bytes(),
    );
    // The running task's TSS is a 16-bit one too.
    load(&m, GDT + 0x38, &tss_descriptor(TSS, 0x2b, 3).to_le_bytes());
    let mut s = s;
    s.tr.type_ = 3;
    s.tr.limit = 0x2b;
    let mut t = vec![0u8; 0x2c];
    let put =
        |t: &mut Vec<u8>, off: usize, v: u16| t[off..off + 2].copy_from_slice(&v.to_le_bytes());
    put(&mut t, 0x0e, 0x2100); // IP
    put(&mut t, 0x10, 0x0002); // FLAGS
    put(&mut t, 0x12, 0xbeef); // AX
    put(&mut t, 0x1a, 0x9000); // SP
    for (i, sel) in [0x10u16, 0x08, 0x10, 0x10].iter().enumerate() {
        put(&mut t, 0x22 + 2 * i, *sel);
    }
    load(&m, TSS2, &t);
    load(&m, 0x2100, &asm(32, 0x2100, |a| a.hlt().unwrap()));
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 100), Exit::Halted);
    let st = c.state().unwrap();
    assert_eq!((st.gpr[0], st.gpr[4], st.rip), (0xbeef, 0x9000, 0x2101));
    assert_eq!(st.tr.selector, SEL_TSS2);
    let word = |a: u64| u16::from_le_bytes(peek(&m, a, 2).try_into().unwrap());
    assert_eq!(word(TSS + 0x12), 0x5678, "AX saved as 16 bits");
    assert_eq!(word(TSS + 0x0e), 0x2000 + 5 + 7, "IP after the JMP");
    assert_eq!(word(TSS + 0x24), 0x08, "CS saved");
    assert_eq!(gdt_type(&m, 0x38), 1);
    assert_eq!(gdt_type(&m, SEL_TSS2), 3);
}

#[test]
fn call_through_a_task_gate_nests_and_iret_returns() {
    let code = asm(32, 0x2000, |a| {
        a.mov(esi, 0x5151).unwrap();
        a.call_far(SEL_TASK_GATE, 0).unwrap();
        a.mov(edi, 0x7777).unwrap();
        a.hlt().unwrap();
    });
    let (mut m, s) = task_machine(0x2000, &code);
    load(&m, TSS2, &tss32(0x2100, 0x9000, 0));
    load(
        &m,
        0x2100,
        &asm(32, 0x2100, |a| {
            a.pushfd().unwrap();
            a.pop(dword_ptr(DATA as u32)).unwrap(); // EFLAGS with NT
            a.mov(ecx, dword_ptr(TSS2 as u32)).unwrap(); // back link
            a.mov(dword_ptr((DATA + 4) as u32), ecx).unwrap();
            a.mov(esi, 0x9999).unwrap();
            a.iretd().unwrap();
        }),
    );
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 100), Exit::Halted);
    let st = c.state().unwrap();
    assert_ne!(
        u32_at(&m, DATA) & (1 << 14),
        0,
        "the nested task runs with NT"
    );
    assert_eq!(u32_at(&m, DATA + 4), 0x38, "back link to the caller's TSS");
    assert_eq!(st.gpr[6], 0x5151, "the caller's ESI came back from its TSS");
    assert_eq!(st.gpr[7], 0x7777, "execution resumed after the CALL");
    assert_eq!(st.tr.selector, 0x38);
    assert_eq!(st.rflags & (1 << 14), 0);
    assert_eq!(
        gdt_type(&m, SEL_TSS2),
        9,
        "IRET left the nested task available"
    );
    assert_eq!(
        u32_at(&m, TSS2 + 0x40),
        0x9999,
        "the nested task's ESI was saved"
    );
}

#[test]
fn exceptions_through_a_task_gate_push_their_error_code_on_the_new_stack() {
    let code = asm(32, 0x2000, |a| {
        a.mov(ax, 0x63).unwrap();
        a.mov(ds, ax).unwrap(); // #GP(0x60): beyond the GDT limit
        a.hlt().unwrap();
    });
    let (mut m, s) = task_machine(0x2000, &code);
    load(&m, IDT + 13 * 8, &task_gate(SEL_TSS2, 0));
    load(&m, TSS2, &tss32(0x2100, 0x9000, 0));
    load(
        &m,
        0x2100,
        &asm(32, 0x2100, |a| {
            a.pop(ebx).unwrap();
            a.mov(ecx, esp).unwrap();
            a.hlt().unwrap();
        }),
    );
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 100), Exit::Halted);
    let st = c.state().unwrap();
    assert_eq!(
        st.gpr[3], 0x60,
        "#GP error code on the handler task's stack"
    );
    assert_eq!(st.gpr[1], 0x9000);
    assert_eq!(
        u32_at(&m, TSS + 0x20),
        0x2004,
        "the faulting instruction is saved"
    );
    assert_eq!(st.tr.selector, SEL_TSS2);
}

#[test]
fn task_switch_faults_carry_the_right_vector_and_selector() {
    struct Case {
        name: &'static str,
        prepare: fn(&Machine, &mut CpuState),
        vector: u8,
        error: u32,
    }
    let cases = [
        Case {
            name: "busy TSS",
            prepare: |m, _| load(m, GDT + SEL_TSS2 as u64 + 5, &[0x8b]),
            vector: 13,
            error: SEL_TSS2 as u32,
        },
        Case {
            name: "TSS not present",
            prepare: |m, _| load(m, GDT + SEL_TSS2 as u64 + 5, &[0x09]),
            vector: 11,
            error: SEL_TSS2 as u32,
        },
        Case {
            name: "TSS limit below 0x67",
            prepare: |m, _| load(m, GDT + SEL_TSS2 as u64, &[0x60]),
            vector: 10,
            error: SEL_TSS2 as u32,
        },
        Case {
            name: "bad CS in the new task",
            prepare: |m, _| load(m, TSS2 + 0x4c, &0x10u16.to_le_bytes()),
            vector: 10,
            error: 0x10,
        },
        Case {
            name: "bad LDT in the new task",
            prepare: |m, _| load(m, TSS2 + 0x60, &0x08u16.to_le_bytes()),
            vector: 10,
            error: 0x08,
        },
        Case {
            name: "SS not present in the new task",
            prepare: |m, s| {
                // Descriptor 0x58: a not-present writable data segment.
                load(m, GDT + 0x58, &0x00cf_1300_0000_ffffu64.to_le_bytes());
                s.gdtr.limit = 0x5f;
                load(m, TSS2 + 0x50, &0x58u16.to_le_bytes());
            },
            vector: 12,
            error: 0x58,
        },
    ];
    for case in cases {
        let code = asm(32, 0x2000, |a| {
            a.jmp_far(SEL_TSS2, 0).unwrap();
        });
        let (mut m, mut s) = task_machine(0x2000, &code);
        load(&m, TSS2, &tss32(0x2100, 0x9000, 0));
        load(&m, 0x2100, &asm(32, 0x2100, |a| a.hlt().unwrap()));
        let handler = 0x2800u64;
        load(
            &m,
            handler,
            &asm(32, handler, |a| {
                a.pop(ebx).unwrap();
                a.hlt().unwrap();
            }),
        );
        for v in [10u64, 11, 12, 13] {
            load(&m, IDT + v * 8, &gate32_at(handler + 0x10 * (v - 10)));
            let h = handler + 0x10 * (v - 10);
            load(
                &m,
                h,
                &asm(32, h, |a| {
                    a.pop(ebx).unwrap();
                    a.mov(ecx, v as u32).unwrap();
                    a.hlt().unwrap();
                }),
            );
        }
        (case.prepare)(&m, &mut s);
        let mut c = cpu(&m, &s);
        assert_eq!(run(&mut c, &mut m, 100), Exit::Halted, "{}", case.name);
        let st = c.state().unwrap();
        assert_eq!(
            (st.gpr[1] as u8, st.gpr[3] as u32),
            (case.vector, case.error),
            "{}",
            case.name
        );
    }
}

#[test]
fn long_mode_has_no_task_switches() {
    let (mut m, _, _) = machine();
    let h = 0x20_1000u64;
    load(
        &m,
        h,
        &asm(64, h, |a| {
            a.pop(rbx).unwrap();
            a.hlt().unwrap();
        }),
    );
    let lo = (h & 0xffff) | (0x18u64 << 16) | (0x8eu64 << 40) | ((h >> 16) & 0xffff) << 48;
    load(&m, IDT + 13 * 16, &lo.to_le_bytes());
    let code = asm(64, 0x20_0000, |a| {
        a.jmp(fword_ptr(0x20_0100)).unwrap();
    });
    load(&m, 0x20_0000, &code);
    // An m16:32 far pointer whose selector is the TSS descriptor.
    let mut ptr = 0u32.to_le_bytes().to_vec();
    ptr.extend_from_slice(&0x38u16.to_le_bytes());
    load(&m, 0x20_0100, &ptr);
    let s = long_mode_state(&m, 0x20_0000);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 100), Exit::Halted);
    assert_eq!(c.state().unwrap().gpr[3], 0x38, "#GP(TSS selector)");
}

/// Protected mode with a #DB handler at 0x2800 that counts hits at DATA, records each
/// pushed EIP at DATA+0x10.., DR6 at DATA+4, and returns with RF set in the image.
fn debug_machine(code: &[u8]) -> (Machine, CpuState) {
    let (m, _, _) = machine();
    load(&m, 0x2000, code);
    let h = 0x2800u64;
    load(
        &m,
        h,
        &asm(32, h, |a| {
            a.push(eax).unwrap();
            a.push(ecx).unwrap();
            a.mov(eax, dword_ptr(DATA as u32)).unwrap();
            a.mov(ecx, dword_ptr(esp + 8)).unwrap();
            a.mov(dword_ptr(eax * 4 + (DATA + 0x10) as u32), ecx)
                .unwrap();
            a.inc(dword_ptr(DATA as u32)).unwrap();
            a.mov(eax, dr6).unwrap();
            a.mov(dword_ptr((DATA + 4) as u32), eax).unwrap();
            a.xor(eax, eax).unwrap();
            a.mov(dr6, eax).unwrap();
            a.or(dword_ptr(esp + 16), 0x1_0000).unwrap(); // RF
            a.pop(ecx).unwrap();
            a.pop(eax).unwrap();
            a.iretd().unwrap();
        }),
    );
    load(&m, IDT + 8, &gate32_at(h));
    let s = protected_mode_state(&m, 0x2000);
    (m, s)
}

fn eips(m: &Machine) -> Vec<u32> {
    let n = u32_at(m, DATA);
    (0..n)
        .map(|i| u32_at(m, DATA + 0x10 + 4 * i as u64))
        .collect()
}

#[test]
fn single_step_traps_after_each_instruction_tf_was_set_for() {
    let mut at = Vec::new();
    let code = asm(32, 0x2000, |a| {
        a.pushfd().unwrap();
        a.or(dword_ptr(esp), 0x100).unwrap();
        a.popfd().unwrap(); // sets TF: no trap after it
        a.nop().unwrap();
        a.mov(ax, ss).unwrap();
        a.mov(ss, ax).unwrap(); // the shadow holds the trap to after the next one
        a.nop().unwrap();
        a.pushfd().unwrap();
        a.and(dword_ptr(esp), !0x100).unwrap();
        a.popfd().unwrap(); // clears TF: still traps after it
        a.nop().unwrap();
        a.hlt().unwrap();
    });
    // Addresses of the instructions after which traps are due.
    let mut d = iced_x86::Decoder::with_ip(32, &code, 0x2000, iced_x86::DecoderOptions::NONE);
    let insns: Vec<_> = d.iter().collect();
    for (i, insn) in insns.iter().enumerate() {
        // After the first POPF (index 2) every instruction traps, except MOV SS (index 5),
        // until the second POPF (index 9) included.
        if (3..=9).contains(&i) && i != 5 {
            at.push(insn.next_ip32());
        }
    }
    let (mut m, s) = debug_machine(&code);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 200), Exit::Halted);
    assert_eq!(eips(&m), at);
    assert_eq!(u32_at(&m, DATA + 4) & 0x4000, 0x4000, "DR6.BS");
    assert_eq!(c.stats().get("bt.exceptions.1"), at.len() as u64);
}

#[test]
fn single_stepping_a_rep_string_instruction_traps_after_each_iteration() {
    // Under TF a REP string instruction runs one iteration per trap, with EIP left at the
    // instruction while iterations remain; a count of 0 and a REPE that stops early trap
    // once, after the instruction.
    let code = asm(32, 0x2000, |a| {
        a.pushfd().unwrap();
        a.or(dword_ptr(esp), 0x100).unwrap();
        a.popfd().unwrap(); // sets TF: no trap after it
        a.mov(edi, 0x6000).unwrap();
        a.mov(ecx, 3).unwrap();
        a.mov(al, 0x5a).unwrap();
        a.rep().stosb().unwrap(); // index 6: three iterations
        a.xor(ecx, ecx).unwrap();
        a.rep().stosb().unwrap(); // index 8: none
        a.mov(ecx, 4).unwrap();
        a.mov(esi, 0x6000).unwrap();
        a.mov(edi, 0x6100).unwrap();
        a.repe().cmpsb().unwrap(); // index 12: 0x5a != 0 ends it after one
        a.pushfd().unwrap();
        a.and(dword_ptr(esp), !0x100).unwrap();
        a.popfd().unwrap(); // clears TF: still traps after it
        a.hlt().unwrap();
    });
    let mut d = iced_x86::Decoder::with_ip(32, &code, 0x2000, iced_x86::DecoderOptions::NONE);
    let insns: Vec<_> = d.iter().collect();
    let mut at = Vec::new();
    for (i, insn) in insns.iter().enumerate().take(16).skip(3) {
        if i == 6 {
            at.extend([insn.ip32(), insn.ip32()]);
        }
        at.push(insn.next_ip32());
    }
    let (mut m, s) = debug_machine(&code);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 300), Exit::Halted);
    assert_eq!(eips(&m), at);
    assert_eq!(u32_at(&m, 0x6000) & 0xff_ffff, 0x5a_5a5a);
    assert_eq!(u32_at(&m, 0x6003) & 0xff, 0, "three iterations, not four");
    let st = c.state().unwrap();
    assert_eq!(st.gpr[1], 3, "REPE CMPSB stopped after one iteration");
    assert_eq!(c.stats().get("bt.exceptions.1"), at.len() as u64);
}

#[test]
fn instruction_breakpoints_fault_once_per_execution_thanks_to_rf() {
    let code = asm(32, 0x2000, |a| {
        let mut top = a.create_label();
        a.mov(eax, 0x2100).unwrap();
        a.mov(dr0, eax).unwrap();
        a.mov(eax, 0x1).unwrap(); // L0, execute, length 1
        a.mov(dr7, eax).unwrap();
        a.mov(ecx, 3).unwrap();
        a.set_label(&mut top).unwrap();
        a.call(0x2100u64).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    });
    let (mut m, s) = debug_machine(&code);
    load(
        &m,
        0x2100,
        &asm(32, 0x2100, |a| {
            a.inc(esi).unwrap();
            a.ret().unwrap();
        }),
    );
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 200), Exit::Halted);
    assert_eq!(
        eips(&m),
        vec![0x2100; 3],
        "a fault at the breakpoint each time"
    );
    assert_eq!(
        c.state().unwrap().gpr[6],
        3,
        "the instruction ran once each time"
    );
    assert_eq!(u32_at(&m, DATA + 4) & 0xf, 1, "DR6.B0");
}

#[test]
fn data_breakpoints_trap_after_matching_accesses() {
    let mut after = Vec::new();
    let code = asm(32, 0x2000, |a| {
        a.mov(eax, 0x6000).unwrap();
        a.mov(dr1, eax).unwrap();
        a.mov(eax, 0x6010).unwrap();
        a.mov(dr2, eax).unwrap();
        // DR1: write, 4 bytes (L1, RW1 = 01, LEN1 = 11); DR2: read/write, 2 bytes
        // (L2, RW2 = 11, LEN2 = 01).
        a.mov(
            eax,
            (1u32 << 2) | (1 << 4) | (0b1101 << 20) | (0b0111 << 24),
        )
        .unwrap();
        a.mov(dr7, eax).unwrap();
        a.mov(ebx, dword_ptr(0x6000)).unwrap(); // read of a write breakpoint: nothing
        a.mov(word_ptr(0x6002), bx).unwrap(); // overlaps DR1's dword
        a.mov(byte_ptr(0x6004), bl).unwrap(); // just past it: nothing
        a.mov(edx, dword_ptr(0x600e)).unwrap(); // overlaps DR2's word: read hit
        a.nop().unwrap();
        a.hlt().unwrap();
    });
    let mut d = iced_x86::Decoder::with_ip(32, &code, 0x2000, iced_x86::DecoderOptions::NONE);
    let insns: Vec<_> = d.iter().collect();
    after.push(insns[7].next_ip32());
    after.push(insns[9].next_ip32());
    let (mut m, s) = debug_machine(&code);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 200), Exit::Halted);
    assert_eq!(eips(&m), after);
    assert_eq!(u32_at(&m, DATA + 4) & 0xf, 4, "DR6.B2 for the last hit");
}

#[test]
fn a_data_breakpoint_in_a_rep_string_traps_after_the_iteration_that_hit_it() {
    // REP STOSD over 0x6000..0x6010 with a write breakpoint on 0x6008: the third iteration
    // hits, the trap comes with EIP at the REP STOSD (ECX = 1 left), and the resumed
    // instruction finishes without another trap.
    let code = asm(32, 0x2000, |a| {
        a.mov(eax, 0x6008).unwrap();
        a.mov(dr1, eax).unwrap();
        a.mov(eax, (1u32 << 2) | (0b1101 << 20)).unwrap(); // L1, write, 4 bytes
        a.mov(dr7, eax).unwrap();
        a.mov(edi, 0x6000).unwrap();
        a.mov(ecx, 4).unwrap();
        a.mov(eax, 0x1234_5678).unwrap();
        a.rep().stosd().unwrap();
        a.nop().unwrap();
        a.hlt().unwrap();
    });
    let mut d = iced_x86::Decoder::with_ip(32, &code, 0x2000, iced_x86::DecoderOptions::NONE);
    let insns: Vec<_> = d.iter().collect();
    let (mut m, s) = debug_machine(&code);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 200), Exit::Halted);
    assert_eq!(eips(&m), vec![insns[7].ip32()]);
    assert_eq!(u32_at(&m, DATA + 4) & 0xf, 2, "DR6.B1");
    let st = c.state().unwrap();
    assert_eq!(st.gpr[1], 0, "the resumed REP STOSD finished");
    assert_eq!(st.gpr[7], 0x6010);
    assert_eq!(u32_at(&m, 0x600c), 0x1234_5678);
}

#[test]
fn general_detect_faults_on_debug_register_access_and_icebp_traps() {
    let mut d_at = Vec::new();
    let code = asm(32, 0x2000, |a| {
        a.mov(eax, 0x2000).unwrap(); // GD
        a.mov(dr7, eax).unwrap();
        a.mov(ebx, dr0).unwrap(); // #DB fault here; GD is clear afterwards
        a.int1().unwrap(); // ICEBP: a #DB trap
        a.hlt().unwrap();
    });
    let mut d = iced_x86::Decoder::with_ip(32, &code, 0x2000, iced_x86::DecoderOptions::NONE);
    let insns: Vec<_> = d.iter().collect();
    d_at.push(insns[2].ip32());
    d_at.push(insns[3].next_ip32());
    let (mut m, s) = debug_machine(&code);
    // The handler clears DR6; record DR6 before that for the first event separately.
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 200), Exit::Halted);
    assert_eq!(eips(&m), d_at);
    let st = c.state().unwrap();
    assert_eq!(st.dr7 & 0x2000, 0, "delivery cleared GD");
    assert_eq!(
        u32_at(&m, DATA + 4) & 0xe00f,
        0,
        "ICEBP sets no DR6 condition bits (the handler had cleared BD)"
    );
}

#[test]
fn misaligned_ring3_accesses_raise_ac_only_with_cr0_am_and_eflags_ac() {
    for (am, ac, expect_ac) in [
        (true, true, true),
        (true, false, false),
        (false, true, false),
    ] {
        let (mut m, _, _) = machine();
        let h17 = 0x20_1000u64;
        load(
            &m,
            h17,
            &asm(64, h17, |a| {
                a.pop(r9).unwrap();
                a.mov(r10, 17u64).unwrap();
                a.hlt().unwrap();
            }),
        );
        let h13 = 0x20_1100u64;
        load(
            &m,
            h13,
            &asm(64, h13, |a| {
                a.hlt().unwrap();
            }),
        );
        for (v, h) in [(17u64, h17), (13, h13)] {
            let lo = (h & 0xffff) | (0x18u64 << 16) | (0x8eu64 << 40) | ((h >> 16) & 0xffff) << 48;
            load(&m, IDT + v * 16, &lo.to_le_bytes());
        }
        let user = 0x20_2000u64;
        load(
            &m,
            user,
            &asm(64, user, |a| {
                a.mov(eax, dword_ptr(0x30_0001)).unwrap();
                a.mov(r11, 0x11u64).unwrap();
                a.cli().unwrap(); // #GP back to ring 0: the end
            }),
        );
        let flags = 0x202u32 | if ac { 1 << 18 } else { 0 };
        let code = asm(64, 0x20_0000, |a| {
            a.mov(ebx, 0x1234_5678).unwrap();
            a.mov(dword_ptr(0x30_0000), ebx).unwrap(); // misaligned at CPL 0: fine
            a.mov(dword_ptr(0x30_0001), ebx).unwrap();
            a.push(0x2b).unwrap();
            a.push(0x9000).unwrap();
            a.push(flags as i32).unwrap();
            a.push(0x33).unwrap();
            a.mov(rax, user).unwrap();
            a.push(rax).unwrap();
            a.iretq().unwrap();
        });
        load(&m, 0x20_0000, &code);
        let mut s = long_mode_state(&m, 0x20_0000);
        if am {
            s.cr0 |= 1 << 18;
        }
        load(&m, TSS + 4, &0xa000u64.to_le_bytes());
        let mut c = cpu(&m, &s);
        assert_eq!(run(&mut c, &mut m, 200), Exit::Halted);
        let st = c.state().unwrap();
        let case = format!("AM {am} AC {ac}");
        if expect_ac {
            assert_eq!((st.gpr[10], st.gpr[9]), (17, 0), "#AC(0): {case}");
            assert_eq!(st.gpr[11], 0, "{case}");
        } else {
            assert_eq!(st.gpr[10], 0, "{case}");
            assert_eq!(st.gpr[11], 0x11, "{case}");
            assert_eq!(st.gpr[0] as u32, 0x1234_5678, "{case}");
        }
        let _ = st.seg[seg::CS];
    }
}

#[test]
fn faults_push_eflags_with_rf_and_traps_do_not() {
    let (mut m, _, _) = machine();
    let h = 0x2800u64;
    load(
        &m,
        h,
        &asm(32, h, |a| {
            a.mov(ebx, dword_ptr(esp + 12)).unwrap(); // EFLAGS (after the error code)
            a.hlt().unwrap();
        }),
    );
    load(&m, IDT + 13 * 8, &gate32_at(h));
    let code = asm(32, 0x2000, |a| {
        a.mov(ax, 0x63).unwrap();
        a.mov(ds, ax).unwrap();
    });
    load(&m, 0x2000, &code);
    let s = protected_mode_state(&m, 0x2000);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 100), Exit::Halted);
    assert_ne!(
        c.state().unwrap().gpr[3] & 0x1_0000,
        0,
        "RF in a fault's image"
    );
    let _ = m
        .mem
        .read_obj::<u8>(deja_machine::vm_memory::GuestAddress(0));
}

/// What the I/O breakpoint test's access is.
#[derive(Clone, Copy, Debug)]
enum PortAccess {
    InAlImm(u8),
    OutDxAx,
    InEaxDx,
    Outsb,
    Insw,
    RepOutsb(u32),
    RepInsw(u32),
}

#[test]
fn io_breakpoints_trap_after_in_out_ins_outs_that_touch_their_port_range() {
    const DE: u64 = 1 << 3;
    // (cr4, DR0 port, DR7 LEN bits, DX, access, traps expected)
    let cases: &[(u64, u64, u32, u16, PortAccess, usize)] = &[
        (DE, 0xe0, 0b00, 0, PortAccess::InAlImm(0xe0), 1),
        (DE, 0xe0, 0b00, 0, PortAccess::InAlImm(0xe1), 0),
        (DE, 0x3e0, 0b01, 0x3e0, PortAccess::OutDxAx, 1),
        // A word access starting one below the breakpoint's byte reaches it.
        (DE, 0x3e1, 0b00, 0x3e0, PortAccess::OutDxAx, 1),
        // A dword breakpoint at 0x3e6 covers 0x3e4-0x3e7 (DR0 aligned down).
        (DE, 0x3e6, 0b11, 0x3e4, PortAccess::InEaxDx, 1),
        (DE, 0x3e4, 0b11, 0x3e8, PortAccess::InEaxDx, 0),
        (DE, 0x3e2, 0b00, 0x3e2, PortAccess::Outsb, 1),
        (DE, 0x3e3, 0b00, 0x3e2, PortAccess::Insw, 1),
        // A REP string traps after its first iteration with RIP at the instruction, which
        // resumes (and traps after its first iteration again) until the count runs out; the
        // last trap has RIP past it. With ECX = 0 there is no access.
        (DE, 0x3e2, 0b00, 0x3e2, PortAccess::RepOutsb(3), 3),
        (DE, 0x3e2, 0b00, 0x3e2, PortAccess::RepOutsb(1), 1),
        (DE, 0x3e2, 0b00, 0x3e2, PortAccess::RepOutsb(0), 0),
        (DE, 0x3e2, 0b01, 0x3e2, PortAccess::RepInsw(2), 2),
        (DE, 0x3e8, 0b01, 0x3e2, PortAccess::RepInsw(2), 0),
        // Without CR4.DE, R/W = 10 is undefined; deja never matches it.
        (0, 0x3e0, 0b00, 0x3e0, PortAccess::OutDxAx, 0),
    ];
    for &(cr4_bits, port, len, dx_value, access, traps) in cases {
        let code = asm(32, 0x2000, |a| {
            a.mov(edx, dx_value as u32).unwrap();
            a.mov(esi, (DATA + 0x100) as u32).unwrap();
            a.mov(edi, (DATA + 0x200) as u32).unwrap();
            match access {
                PortAccess::InAlImm(p) => a.in_(al, p as u32).unwrap(),
                PortAccess::OutDxAx => a.out(dx, ax).unwrap(),
                PortAccess::InEaxDx => a.in_(eax, dx).unwrap(),
                PortAccess::Outsb => a.outsb().unwrap(),
                PortAccess::Insw => a.insw().unwrap(),
                PortAccess::RepOutsb(n) => {
                    a.mov(ecx, n).unwrap();
                    a.rep().outsb().unwrap();
                }
                PortAccess::RepInsw(n) => {
                    a.mov(ecx, n).unwrap();
                    a.rep().insw().unwrap();
                }
            }
            a.nop().unwrap();
            a.hlt().unwrap();
        });
        let mut d = iced_x86::Decoder::with_ip(32, &code, 0x2000, iced_x86::DecoderOptions::NONE);
        let insns: Vec<_> = d.iter().collect();
        let io = insns
            .iter()
            .position(|i| i.mnemonic() == iced_x86::Mnemonic::Nop)
            .unwrap()
            - 1;
        let (mut m, mut s) = debug_machine(&code);
        s.cr4 |= cr4_bits;
        s.dr[0] = port;
        // L0, R/W0 = 10 (I/O), LEN0.
        s.dr7 = 0x401 | (0b10 << 16) | ((len as u64) << 18);
        let mut c = cpu(&m, &s);
        let what =
            format!("cr4 {cr4_bits:#x} DR0 {port:#x} len {len:#b} DX {dx_value:#x} {access:?}");
        assert_eq!(run(&mut c, &mut m, 200), Exit::Halted, "{what}");
        let mut expected = vec![insns[io].ip32(); traps.saturating_sub(1)];
        if traps > 0 {
            expected.push(insns[io].next_ip32());
        }
        assert_eq!(eips(&m), expected, "{what}");
        if traps > 0 {
            assert_eq!(u32_at(&m, DATA + 4) & 0xf, 1, "DR6.B0: {what}");
        }
    }
}

#[test]
fn mov_dr4_dr5_alias_dr6_dr7_without_cr4_de_and_raise_ud_with_it() {
    for (cr4_bits, expect_ud) in [(0u64, false), (1 << 3, true)] {
        let code = asm(32, 0x2000, |a| {
            a.mov(eax, 0x1).unwrap();
            a.mov(dr5, eax).unwrap();
            a.mov(ebx, dr4).unwrap();
            a.hlt().unwrap();
        });
        let (mut m, mut s) = debug_machine(&code);
        // #UD (vector 6) goes to a handler that halts.
        let h = 0x2c00u64;
        load(&m, h, &asm(32, h, |a| a.hlt().unwrap()));
        load(&m, IDT + 6 * 8, &gate32_at(h));
        s.cr4 |= cr4_bits;
        let mut c = cpu(&m, &s);
        assert_eq!(run(&mut c, &mut m, 200), Exit::Halted);
        let st = c.state().unwrap();
        assert_eq!(
            c.stats().get("bt.exceptions.6"),
            u64::from(expect_ud),
            "cr4 {cr4_bits:#x}"
        );
        if !expect_ud {
            assert_eq!(st.dr7 & 0xff, 1, "MOV DR5 wrote DR7");
            assert_eq!(
                st.gpr[6 - 3] as u32 & 0xffff_0ff0,
                0xffff_0ff0,
                "MOV from DR4 read DR6"
            );
        }
    }
}

/// A single-stepped guest whose traps include one held back by a MOV SS shadow (with a data
/// breakpoint hit by the SS load) and one after an OUT that exits to the machine.
fn single_step_guest() -> Vec<u8> {
    asm(32, 0x2000, |a| {
        a.mov(eax, (DATA + 0x400) as u32).unwrap();
        a.mov(dr0, eax).unwrap();
        a.mov(eax, 0x1 | (0b1111 << 16)).unwrap(); // L0, read/write, 4 bytes
        a.mov(dr7, eax).unwrap();
        a.mov(ax, ss).unwrap();
        a.mov(word_ptr((DATA + 0x400) as u32), ax).unwrap(); // B0 hit
        a.pushfd().unwrap();
        a.or(dword_ptr(esp), 0x100).unwrap();
        a.popfd().unwrap(); // sets TF: no trap after it
        a.nop().unwrap();
        a.mov(ss, word_ptr((DATA + 0x400) as u32)).unwrap(); // BS + B0, held back
        a.nop().unwrap();
        a.mov(dx, 0x80).unwrap();
        a.out(dx, al).unwrap();
        a.nop().unwrap();
        a.pushfd().unwrap();
        a.and(dword_ptr(esp), !0x100).unwrap();
        a.popfd().unwrap();
        a.hlt().unwrap();
    })
}

#[test]
fn a_pending_debug_trap_survives_a_state_transfer_at_every_instruction_boundary() {
    let code = single_step_guest();
    let (mut m, s) = debug_machine(&code);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 500), Exit::Halted);
    let straight = (eips(&m), c.state().unwrap());
    assert_eq!(straight.0.len(), 9, "{:x?}", straight.0);

    // The same run, moved to a fresh engine through CpuState after every instruction: each
    // stop falls between an instruction and its trap.
    let (mut m, s) = debug_machine(&code);
    let mut c = cpu(&m, &s);
    let mut seen = PendingDebugSeen::default();
    for icount in 1..500 {
        let exit = c
            .run(
                &mut m,
                deja_machine::Limit {
                    stop_at_icount: Some(icount),
                    ..Default::default()
                },
            )
            .unwrap();
        let st = c.state().unwrap();
        seen.trap |= st.pending_debug.trap;
        seen.after_shadow |= st.pending_debug.after_shadow;
        if exit == Exit::Halted {
            break;
        }
        c = cpu(&m, &st);
        c.set_icount(icount);
    }
    assert_eq!(seen.trap & 0x4001, 0x4001, "BS and B0 traps were pending");
    assert_eq!(seen.after_shadow, 0x4001, "the MOV SS shadow held BS + B0");
    let split = (eips(&m), c.state().unwrap());
    assert_eq!(split.0, straight.0, "trap EIPs");
    assert!(split.1 == straight.1, "{:#?}", straight.1.diff(&split.1));
}

#[derive(Default)]
struct PendingDebugSeen {
    trap: u64,
    after_shadow: u64,
}

#[test]
fn a_single_step_trap_due_after_an_exit_is_in_the_state() {
    // As engine/kvm/tests/guests.rs checks on kvm: TF set, OUT exits, then HLT does; the
    // state at each exit holds the exiting instruction's single-step trap, not delivered.
    let code = asm(32, 0x2000, |a| {
        a.out(dx, al).unwrap();
        a.hlt().unwrap();
    });
    let (mut m, mut s) = debug_machine(&code);
    s.gpr[2] = 0x80;
    s.rflags |= 0x100;
    let mut c = cpu(&m, &s);
    assert_eq!(
        c.run(&mut m, deja_machine::Limit::default()).unwrap(),
        Exit::DeviceAccess
    );
    let after_out = c.state().unwrap();
    assert_eq!(
        (after_out.rip, after_out.pending_debug.trap),
        (0x2001, 0x4000)
    );
    assert_eq!(
        c.run(&mut m, deja_machine::Limit::default()).unwrap(),
        Exit::Halted,
        "the trap is delivered, its handler halts"
    );
    assert_eq!(eips(&m), vec![0x2001]);
}

/// Runs `insn` (raw bytes, its memory operand at [RDI]) in 64-bit ring 3 with CR0.AM set and
/// EFLAGS.AC as `ac` says, RDI = a 64-byte aligned buffer + `offset`; returns the vector of
/// the fault it raised, or `None` when it completed.
fn ring3_fault_of(insn: &[u8], offset: u64, ac: bool) -> Option<u64> {
    let (mut m, _, _) = machine();
    // Both handlers record their vector in R10 and halt.
    for (vector, handler) in [(17u64, 0x20_1000u64), (13, 0x20_1100)] {
        load(
            &m,
            handler,
            &asm(64, handler, |a| {
                a.mov(r10, vector).unwrap();
                a.hlt().unwrap();
            }),
        );
        let lo = (handler & 0xffff)
            | (0x18u64 << 16)
            | (0x8eu64 << 40)
            | ((handler >> 16) & 0xffff) << 48;
        load(&m, IDT + vector * 16, &lo.to_le_bytes());
    }
    let user = 0x20_2000u64;
    let mut code = insn.to_vec();
    // Completed: R11 = 0x11, then HLT raises #GP back in ring 0.
    code.extend(asm(64, user + insn.len() as u64, |a| {
        a.mov(r11, 0x11u64).unwrap();
        a.hlt().unwrap();
    }));
    load(&m, user, &code);
    let mut s = long_mode_state(&m, user);
    s.cr0 |= 1 << 18; // AM
    s.cr4 |= 1 << 9; // OSFXSR
    for (i, sg) in s.seg.iter_mut().enumerate() {
        sg.dpl = 3;
        sg.selector = if i == seg::CS { 0x33 } else { 0x2b };
    }
    s.rflags = 0x202 | if ac { 1 << 18 } else { 0 };
    s.gpr[7] = 0x30_0040 + offset;
    s.gpr[4] = 0x9000;
    load(&m, TSS + 4, &0xa000u64.to_le_bytes());
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 200), Exit::Halted);
    let st = c.state().unwrap();
    match (st.gpr[11], st.gpr[10]) {
        (0x11, 13) => None,
        (0, v) => Some(v),
        other => panic!("{insn:02x?} at +{offset}: unexpected end {other:x?}"),
    }
}

#[test]
fn x87_save_areas_and_fxsave_are_alignment_checked_as_the_sdm_table_and_the_host_say() {
    const AC: Option<u64> = Some(17);
    const GP: Option<u64> = Some(13);
    let fnstenv32: &[u8] = &[0xd9, 0x37];
    let fnstenv16: &[u8] = &[0x66, 0xd9, 0x37];
    let fldenv32: &[u8] = &[0xd9, 0x27];
    let fnsave32: &[u8] = &[0xdd, 0x37];
    let fnsave16: &[u8] = &[0x66, 0xdd, 0x37];
    let frstor32: &[u8] = &[0xdd, 0x27];
    let frstor16: &[u8] = &[0x66, 0xdd, 0x27];
    let fxsave: &[u8] = &[0x0f, 0xae, 0x07];
    let fxsave64: &[u8] = &[0x48, 0x0f, 0xae, 0x07];
    let fxrstor: &[u8] = &[0x0f, 0xae, 0x0f];
    let fnstcw: &[u8] = &[0xd9, 0x3f];
    let fld_m80: &[u8] = &[0xdb, 0x2f];
    // (instruction, name, [outcome at offsets 0, 1, 2, 4, 6, 8, 12]). The x87 areas need
    // the operand size's alignment (SDM vol. 3 table 6-7), whatever their length; FXSAVE
    // and FXRSTOR fault #AC below 4-byte alignment and #GP above it (implementation
    // specific; what the host CPU does natively in ring 3, measured with a user program
    // running each of these rows: deja follows the kvm engine's ring 3 here). A rule by
    // operand length (8 for anything of 8 bytes or more) gets every area row wrong at some
    // offset; FNSTCW and FLD m80 are the length rule's controls.
    const OFFSETS: [u64; 7] = [0, 1, 2, 4, 6, 8, 12];
    type Row<'a> = (&'a [u8], &'a str, [Option<u64>; 7]);
    let rows: [Row; 12] = [
        (
            fnstenv32,
            "fnstenv (32-bit)",
            [None, AC, AC, None, AC, None, None],
        ),
        (
            fnstenv16,
            "fnstenv (16-bit)",
            [None, AC, None, None, None, None, None],
        ),
        (
            fldenv32,
            "fldenv (32-bit)",
            [None, AC, AC, None, AC, None, None],
        ),
        (
            fnsave32,
            "fnsave (32-bit)",
            [None, AC, AC, None, AC, None, None],
        ),
        (
            fnsave16,
            "fnsave (16-bit)",
            [None, AC, None, None, None, None, None],
        ),
        (
            frstor32,
            "frstor (32-bit)",
            [None, AC, AC, None, AC, None, None],
        ),
        (
            frstor16,
            "frstor (16-bit)",
            [None, AC, None, None, None, None, None],
        ),
        (fxsave, "fxsave", [None, AC, AC, GP, AC, GP, GP]),
        (fxsave64, "fxsave64", [None, AC, AC, GP, AC, GP, GP]),
        (fxrstor, "fxrstor", [None, AC, AC, GP, AC, GP, GP]),
        (
            fnstcw,
            "fnstcw (a word)",
            [None, AC, None, None, None, None, None],
        ),
        (fld_m80, "fld m80 (8)", [None, AC, AC, AC, AC, None, AC]),
    ];
    for (insn, name, outcomes) in rows {
        for (offset, want) in OFFSETS.into_iter().zip(outcomes) {
            assert_eq!(
                ring3_fault_of(insn, offset, true),
                want,
                "{name} at +{offset} with EFLAGS.AC"
            );
        }
    }
    // Without EFLAGS.AC nothing is alignment checked; FXSAVE's 16-byte rule stays.
    for (insn, name, want) in [
        (fnsave32, "fnsave", None),
        (fnstenv16, "fnstenv16", None),
        (fxsave, "fxsave", GP),
    ] {
        assert_eq!(
            ring3_fault_of(insn, 2, false),
            want,
            "{name} at +2 without AC"
        );
    }
}
