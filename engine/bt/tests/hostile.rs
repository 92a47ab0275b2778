//! Hostile guests (issue #14): instructions that would run for minutes must still stop
//! promptly when the engine is kicked (a timeout, Ctrl-C), at an iteration boundary with
//! architecturally correct state.

mod common;

use common::*;
use deja_bt::BtCpu;
use deja_machine::{Cpu, Exit, Limit};
use iced_x86::code_asm::*;
use std::sync::mpsc;
use std::time::Duration;

/// Runs `code` (32-bit protected mode at 0x2000) on bt, kicks it after `after`, and returns
/// the exit, the final state and icount; panics if the run does not come back within a
/// minute (before the fix, a REP string instruction whose elements are device exits held the
/// kick back until its last element: billions of them).
fn kicked_run(code: Vec<u8>, after: Duration) -> (Exit, deja_machine::CpuState, u64, u64) {
    let (tx, rx) = mpsc::channel();
    let (ktx, krx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut m, _log, _lines) = machine();
        let s = protected_mode_state(&m, 0x2000);
        load(&m, 0x2000, &code);
        let mut c = cpu(&m, &s);
        ktx.send(c.kicker()).unwrap();
        let exit = c.run(&mut m, Limit::default()).unwrap();
        let _ = tx.send((exit, c.state().unwrap(), c.icount(), m.position().exits));
    });
    let kicker = krx.recv().unwrap();
    std::thread::sleep(after);
    kicker.kick();
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the kicked run did not stop within a minute")
}

/// The address of the REP-prefixed instruction in `code` (at 0x2000) and how many
/// instructions come before it.
fn rep_at(code: &[u8]) -> (u64, u64) {
    let d = iced_x86::Decoder::with_ip(32, code, 0x2000, iced_x86::DecoderOptions::NONE);
    let insns: Vec<_> = d.into_iter().collect();
    let i = insns.iter().position(|i| i.has_rep_prefix()).unwrap();
    (insns[i].ip(), i as u64)
}

#[test]
fn a_kick_stops_a_rep_movsb_of_4g_elements_between_two_iterations() {
    // ECX = 0xffffffff from RAM into RAM, then on past the end of the 16 MiB of RAM, where
    // every element is an (unmapped) device access and the instruction one exit group.
    let code = asm(32, 0x2000, |a| {
        a.cld().unwrap();
        a.mov(esi, 0x10_0000).unwrap();
        a.mov(edi, 0x80_0000).unwrap();
        a.mov(ecx, 0xffff_ffffu32).unwrap();
        a.rep().movsb().unwrap();
        a.hlt().unwrap();
    });
    let (rep_ip, before) = rep_at(&code);
    for after in [Duration::from_millis(20), Duration::from_millis(1500)] {
        let (exit, st, icount, exits) = kicked_run(code.clone(), after);
        assert_eq!(exit, Exit::Kicked, "kicked after {after:?}");
        // Not retired: RIP at the REP MOVSB, the instructions before it counted.
        assert_eq!(st.rip, rep_ip, "kicked after {after:?}");
        assert_eq!(icount, before, "kicked after {after:?}");
        let done = 0xffff_ffffu64 - st.gpr[1];
        assert!(
            done > 0 && done < 0xffff_ffff / 2,
            "kicked after {after:?}: {done} elements done"
        );
        assert_eq!(st.gpr[6], 0x10_0000 + done, "ESI after {done} elements");
        assert_eq!(st.gpr[7], 0x80_0000 + done, "EDI after {done} elements");
        if after > Duration::from_secs(1) {
            assert!(exits > 0, "past the end of RAM: device exits");
        }
    }
}

#[test]
fn a_kick_stops_a_long_rep_outsb_between_two_elements() {
    let code = asm(32, 0x2000, |a| {
        a.cld().unwrap();
        a.mov(dx, TEST_PORT as u32).unwrap();
        a.mov(esi, 0x10_0000).unwrap();
        a.mov(ecx, 0x4000_0000u32).unwrap();
        a.rep().outsb().unwrap();
        a.hlt().unwrap();
    });
    let (rep_ip, before) = rep_at(&code);
    let (exit, st, icount, exits) = kicked_run(code, Duration::from_millis(300));
    assert_eq!(exit, Exit::Kicked);
    assert_eq!(st.rip, rep_ip, "RIP still at the REP OUTSB");
    assert_eq!(icount, before);
    let done = 0x4000_0000u64 - st.gpr[1];
    assert!(done > 0 && done < 0x4000_0000, "{done} elements done");
    assert_eq!(exits, done, "one device exit per element");
    assert_eq!(st.gpr[6], 0x10_0000 + done);
}

/// Where the test ROM goes: the top 64 KiB below 4 GiB, as a `--bios` image is mapped.
const ROM_AT: u64 = 0xffff_0000;
/// Where the ROM guest stores what it read.
const OUT: u64 = 0x6000;

/// A 64 KiB ROM whose bytes all differ from their neighbours (no 0xff runs).
fn rom_bytes() -> Vec<u8> {
    (0..0x1_0000u32)
        .map(|i| (i.wrapping_mul(0x9e37_79b9) >> 24) as u8 ^ 0x5a)
        .collect()
}

#[test]
fn data_reads_of_the_firmware_rom_at_4g_return_its_bytes_under_every_mmu() {
    // Long mode with 0xc000_0000..0x1_0000_0000 identity-mapped too (2 MiB pages): the
    // guest reads the reset vector's 16 bytes and other ROM bytes as data (8-, 4-, 2- and
    // 1-byte loads, a REP MOVSB), tries to overwrite one, and reads it back.
    let code = asm(64, 0x2000, |a| {
        a.mov(rax, 0xffff_fff0u64).unwrap();
        a.mov(rbx, qword_ptr(rax)).unwrap();
        a.mov(qword_ptr(OUT), rbx).unwrap();
        a.mov(rbx, qword_ptr(rax + 8)).unwrap();
        a.mov(qword_ptr(OUT + 8), rbx).unwrap();
        a.mov(rax, ROM_AT + 0x1234).unwrap();
        a.mov(ebx, dword_ptr(rax)).unwrap();
        a.mov(dword_ptr(OUT + 0x10), ebx).unwrap();
        a.mov(bx, word_ptr(rax + 0x10)).unwrap();
        a.mov(word_ptr(OUT + 0x14), bx).unwrap();
        a.mov(bl, byte_ptr(rax + 0x20)).unwrap();
        a.mov(byte_ptr(OUT + 0x16), bl).unwrap();
        a.mov(rsi, ROM_AT + 0x8000).unwrap();
        a.mov(edi, (OUT + 0x20) as u32).unwrap();
        a.mov(ecx, 0x100u32).unwrap();
        a.rep().movsb().unwrap();
        // A store to ROM is dropped.
        a.mov(byte_ptr(rax), 0).unwrap();
        a.mov(bl, byte_ptr(rax)).unwrap();
        a.mov(byte_ptr(OUT + 0x17), bl).unwrap();
        a.hlt().unwrap();
    });
    let rom = rom_bytes();
    let mut expected = Vec::new();
    expected.extend_from_slice(&rom[0xfff0..0x1_0000]);
    expected.extend_from_slice(&rom[0x1234..0x1238]);
    expected.extend_from_slice(&rom[0x1244..0x1246]);
    expected.push(rom[0x1254]);
    expected.push(rom[0x1234]);
    expected.extend_from_slice(&[0; 8]);
    expected.extend_from_slice(&rom[0x8000..0x8100]);
    for strategy in deja_bt::mmu::MmuStrategy::ALL {
        let (mut m, _log, _lines) = machine();
        m.add_rom(ROM_AT, &rom).unwrap();
        let s = long_mode_state(&m, 0x2000);
        let pdpt = PML4 + 0x1000;
        let pd_high = PML4 + 0x3000;
        load(&m, pdpt + 3 * 8, &(pd_high | 7).to_le_bytes());
        let pdes: Vec<u8> = (0..512u64)
            .flat_map(|i| ((0xc000_0000 + (i << 21)) | 0x87).to_le_bytes())
            .collect();
        load(&m, pd_high, &pdes);
        load(&m, 0x2000, &code);
        let mut c = BtCpu::new(&m).unwrap();
        c.set_mmu(Box::new(deja_bt::paging::MmuAdapter(
            strategy.create().unwrap(),
        )));
        c.set_state(&s).unwrap();
        assert_eq!(run(&mut c, &mut m, 1000), Exit::Halted, "{strategy}");
        assert_eq!(
            peek(&m, OUT, expected.len()),
            expected,
            "{strategy}: ROM bytes as read (reset vector, loads, REP MOVSB, after a store)"
        );
        assert_eq!(m.stats().get("io.unmapped_mmio"), 0, "{strategy}");
    }
}

/// A non-canonical address (bit 47 clear, bits 63:48 not all equal to it).
const NON_CANONICAL: u64 = 0x0000_8000_0000_1000;
/// Where the #GP handler of [`branch_fault`] records the frame.
const FRAME_OUT: u64 = 0x7000;
/// The #GP handler.
const GP_HANDLER: u64 = 0x4800;
/// The branch's memory operands (far pointers, IRETQ/RETFQ frames are built on the stack).
const POINTER: u64 = 0x6800;

/// Runs `body` (ring 0, 64-bit, RSP = 0x8000) whose instruction at the label it returns
/// must raise #GP(0); returns (error code, saved RIP, saved CS, saved RSP, the label's RIP).
fn branch_fault(
    body: impl FnOnce(&mut CodeAssembler) -> CodeLabel,
) -> Result<(u64, u64, u64, u64, u64), Exit> {
    let mut a = CodeAssembler::new(64).unwrap();
    let branch = body(&mut a);
    a.hlt().unwrap();
    let result = a
        .assemble_options(
            0x2000,
            iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )
        .unwrap();
    let branch_ip = result.label_ip(&branch).unwrap();
    let code = result.inner.code_buffer;
    let handler = asm(64, GP_HANDLER, |a| {
        // Error code, RIP, CS and (past RFLAGS) RSP of the frame.
        for (i, at) in [0, 8, 16, 32].into_iter().enumerate() {
            a.mov(rax, qword_ptr(rsp + at)).unwrap();
            a.mov(qword_ptr(FRAME_OUT + 8 * i as u64), rax).unwrap();
        }
        a.hlt().unwrap();
    });
    let (mut m, _log, _lines) = machine();
    let mut s = long_mode_state(&m, 0x2000);
    s.gpr[4] = 0x8000;
    load(&m, 0x2000, &code);
    load(&m, GP_HANDLER, &handler);
    load(&m, IDT + 13 * 16, &gate64(GP_HANDLER, 0x18, 0));
    let mut c = cpu(&m, &s);
    let exit = run(&mut c, &mut m, 1000);
    if exit != Exit::Halted {
        return Err(exit);
    }
    let f: Vec<u64> = (0..4)
        .map(|i| u64::from_le_bytes(peek(&m, FRAME_OUT + 8 * i, 8).try_into().unwrap()))
        .collect();
    Ok((f[0], f[1], f[2], f[3], branch_ip))
}

#[test]
fn branches_to_non_canonical_targets_fault_at_the_branch_with_state_unchanged() {
    // SDM: JMP/CALL far, RET far, IRET (64-bit mode), near JMP/CALL/RET and SYSRET/SYSEXIT
    // raise #GP(0) when the target RIP is non-canonical, before changing any state: the
    // frame holds the branch's own RIP, CS 0x18 and the RSP it started with.
    type Case = (&'static str, fn(&mut CodeAssembler) -> CodeLabel);
    let cases: &[Case] = &[
        ("jmp far m16:64", |a| {
            let mut l = a.create_label();
            a.mov(rax, NON_CANONICAL).unwrap();
            a.mov(qword_ptr(POINTER), rax).unwrap();
            a.mov(word_ptr(POINTER + 8), 0x18).unwrap();
            a.set_label(&mut l).unwrap();
            a.jmp(tword_ptr(POINTER)).unwrap();
            l
        }),
        ("call far m16:64", |a| {
            let mut l = a.create_label();
            a.mov(rax, NON_CANONICAL).unwrap();
            a.mov(qword_ptr(POINTER), rax).unwrap();
            a.mov(word_ptr(POINTER + 8), 0x18).unwrap();
            a.set_label(&mut l).unwrap();
            a.call(tword_ptr(POINTER)).unwrap();
            l
        }),
        ("iretq", |a| {
            let mut l = a.create_label();
            a.mov(rax, rsp).unwrap();
            a.push(0x10).unwrap();
            a.push(rax).unwrap();
            a.pushfq().unwrap();
            a.push(0x18).unwrap();
            a.mov(rax, NON_CANONICAL).unwrap();
            a.push(rax).unwrap();
            a.set_label(&mut l).unwrap();
            a.iretq().unwrap();
            l
        }),
        ("retfq", |a| {
            let mut l = a.create_label();
            a.push(0x18).unwrap();
            a.mov(rax, NON_CANONICAL).unwrap();
            a.push(rax).unwrap();
            a.set_label(&mut l).unwrap();
            a.db(&[0x48, 0xcb]).unwrap(); // REX.W RETF
            l
        }),
        ("jmp rax", |a| {
            let mut l = a.create_label();
            a.mov(rax, NON_CANONICAL).unwrap();
            a.set_label(&mut l).unwrap();
            a.jmp(rax).unwrap();
            l
        }),
        ("call rax", |a| {
            let mut l = a.create_label();
            a.mov(rax, NON_CANONICAL).unwrap();
            a.set_label(&mut l).unwrap();
            a.call(rax).unwrap();
            l
        }),
        ("ret", |a| {
            let mut l = a.create_label();
            a.mov(rax, NON_CANONICAL).unwrap();
            a.push(rax).unwrap();
            a.set_label(&mut l).unwrap();
            a.ret().unwrap();
            l
        }),
        ("sysret (rcx)", |a| {
            let mut l = a.create_label();
            a.mov(ecx, 0xc000_0080u32).unwrap(); // EFER.SCE
            a.rdmsr().unwrap();
            a.or(eax, 1).unwrap();
            a.wrmsr().unwrap();
            a.mov(rcx, NON_CANONICAL).unwrap();
            a.set_label(&mut l).unwrap();
            a.sysretq().unwrap();
            l
        }),
        ("sysexit (rdx)", |a| {
            let mut l = a.create_label();
            a.mov(ecx, 0x174u32).unwrap(); // IA32_SYSENTER_CS
            a.mov(eax, 0x08u32).unwrap();
            a.xor(edx, edx).unwrap();
            a.wrmsr().unwrap();
            a.mov(rdx, NON_CANONICAL).unwrap();
            a.mov(rcx, 0x8000u64).unwrap();
            a.set_label(&mut l).unwrap();
            a.sysexitq().unwrap();
            l
        }),
    ];
    let mut failures = Vec::new();
    for (name, body) in cases {
        // The RSP the branch starts with: what the body pushed below 0x8000.
        let (error, f_rip, f_cs, f_rsp, at) = match branch_fault(*body) {
            Ok(frame) => frame,
            Err(exit) => {
                failures.push(format!("{name}: the #GP handler never ran: {exit:?}"));
                continue;
            }
        };
        let pushed = match *name {
            "iretq" => 40,
            "retfq" => 16,
            "ret" => 8,
            _ => 0,
        };
        let want = (0, at, 0x18, 0x8000 - pushed);
        if (error, f_rip, f_cs, f_rsp) != want {
            failures.push(format!(
                "{name}: frame (error, rip, cs, rsp) = ({error:#x}, {f_rip:#x}, {f_cs:#x}, {f_rsp:#x}), \
                 expected {want:#x?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
