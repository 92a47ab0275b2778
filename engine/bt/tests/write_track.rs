//! The engine's write-tracking set (`deja_bt::track`): pages holding shadowed guest page
//! tables and pages holding translated code share one set of reasons; a page that gains a
//! reason loses its write fast path; stores dispatch on the reasons (page tables → the
//! MMU, code → block invalidation), and a page can carry both.

mod common;

use common::*;
use deja_bt::BtCpu;
use deja_bt::mmu::MmuStrategy;
use deja_bt::paging::MmuAdapter;
use deja_bt::track::{CODE, PAGE_TABLE};
use deja_machine::{Cpu, Exit, Machine};
use iced_x86::code_asm::*;

const CODE_AT: u64 = 0x20_0000;
/// A 4 KiB page table for linear 0x40_0000..0x60_0000 (page directory entry 2), itself
/// reachable through the identity mapping.
const PT: u64 = 0x30_0000;
/// The data frame PTE 0 of [`PT`] maps.
const FRAME: u64 = 0x50_0000;

/// Long mode with the identity map of [`long_mode_state`], except linear 0x40_0000..0x60_0000
/// goes through the 4 KiB table at `pt` whose entry 0 maps [`FRAME`].
fn paged(m: &Machine, pt: u64, pte_index: u64) -> deja_machine::CpuState {
    let s = long_mode_state(m, CODE_AT);
    let pd = PML4 + 0x2000;
    load(m, pd + 2 * 8, &(pt | 7).to_le_bytes());
    load(m, pt + pte_index * 8, &(FRAME | 7).to_le_bytes());
    s
}

fn cpu_with(m: &Machine, s: &deja_machine::CpuState, strategy: MmuStrategy) -> BtCpu {
    let mut c = BtCpu::new(m).unwrap();
    c.set_mmu(Box::new(MmuAdapter(strategy.create().unwrap())));
    c.set_state(s).unwrap();
    c
}

#[test]
fn a_page_becoming_a_page_table_loses_its_write_fast_path_and_stores_reach_the_mmu() {
    for strategy in MmuStrategy::ALL {
        let (mut m, _, _) = machine();
        let code = asm(64, CODE_AT, |a| {
            a.mov(rdi, PT).unwrap();
            // Stores while the page is plain data: the second uses the write fast path.
            a.mov(qword_ptr(rdi + 0x800), 1).unwrap();
            a.mov(qword_ptr(rdi + 0x800), 2).unwrap();
            // A walk through the page: under shadow it becomes a tracked page table.
            a.mov(rax, qword_ptr(0x40_0000)).unwrap();
            // A store to an unrelated entry of the table must be seen by the MMU.
            a.mov(qword_ptr(rdi + 0x808), 3).unwrap();
            a.hlt().unwrap();
        });
        load(&m, CODE_AT, &code);
        load(&m, FRAME, &0x1234u64.to_le_bytes());
        let s = paged(&m, PT, 0);
        let mut c = cpu_with(&m, &s, strategy);
        assert_eq!(run(&mut c, &mut m, 1000), Exit::Halted, "{strategy}");
        assert_eq!(c.state().unwrap().gpr[0], 0x1234, "{strategy}");
        let stats = c.stats();
        let shadow = strategy == MmuStrategy::Shadow;
        assert_eq!(
            stats.get("mmu.mmu_pte_write"),
            u64::from(shadow),
            "{strategy}: {stats:?}"
        );
        let reasons = c.page_track().reasons(PT >> 12);
        assert_eq!(reasons, if shadow { PAGE_TABLE } else { 0 }, "{strategy}");
        assert_eq!(
            c.page_track().reasons(CODE_AT >> 12),
            CODE,
            "{strategy}: the code page"
        );
    }
}

#[test]
fn an_unsync_page_is_untracked_and_its_stores_no_longer_reach_the_mmu() {
    let (mut m, _, _) = machine();
    let code = asm(64, CODE_AT, |a| {
        let mut top = a.create_label();
        a.mov(rdi, PT).unwrap();
        a.mov(rax, qword_ptr(0x40_0000)).unwrap();
        // Two traced writes to unrelated entries of the leaf table make it go unsync...
        a.mov(qword_ptr(rdi + 0x800), 1).unwrap();
        a.mov(qword_ptr(rdi + 0x808), 2).unwrap();
        // ...after which stores to it are plain stores.
        a.mov(ecx, 10).unwrap();
        a.set_label(&mut top).unwrap();
        a.mov(qword_ptr(rdi + 0x810), rcx).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    });
    load(&m, CODE_AT, &code);
    let s = paged(&m, PT, 0);
    let mut c = cpu_with(&m, &s, MmuStrategy::Shadow);
    assert_eq!(run(&mut c, &mut m, 1000), Exit::Halted);
    let stats = c.stats();
    assert_eq!(stats.get("mmu.mmu_unsync"), 1, "{stats:?}");
    assert_eq!(stats.get("mmu.mmu_pte_write"), 2, "{stats:?}");
    assert_eq!(c.page_track().reasons(PT >> 12), 0);
    assert_eq!(peek(&m, PT + 0x810, 8), 1u64.to_le_bytes());
}

#[test]
fn a_page_holding_code_and_a_page_table_carries_both_reasons() {
    for strategy in MmuStrategy::ALL {
        let (mut m, _, _) = machine();
        // The code page is also the page table (entry 0x100, at offset 0x800, maps linear
        // 0x50_0000). The store patches the immediate of the next instruction of its own
        // block, so the block must end right after it and the new code run.
        let build = |patch: u64| {
            asm(64, CODE_AT, |a| {
                a.mov(rax, qword_ptr(0x50_0000)).unwrap();
                a.mov(rdi, patch).unwrap();
                a.mov(byte_ptr(rdi), 42).unwrap();
                a.mov(ebx, 7).unwrap();
                a.hlt().unwrap();
            })
        };
        let probe = build(0x1_0000_0000);
        let at = probe
            .windows(5)
            .position(|w| w == [0xbb, 7, 0, 0, 0])
            .expect("mov ebx, 7");
        let code = build(CODE_AT + at as u64 + 1);
        assert_eq!(&code[at..at + 5], &[0xbb, 7, 0, 0, 0]);
        load(&m, CODE_AT, &code);
        load(&m, FRAME, &0x55u64.to_le_bytes());
        let s = paged(&m, CODE_AT, 0x100);
        let mut c = cpu_with(&m, &s, strategy);
        assert_eq!(run(&mut c, &mut m, 1000), Exit::Halted, "{strategy}");
        let st = c.state().unwrap();
        assert_eq!((st.gpr[0], st.gpr[3]), (0x55, 42), "{strategy}");
        let stats = c.stats();
        assert!(stats.get("bt.invalidations") >= 1, "{strategy}: {stats:?}");
        let shadow = strategy == MmuStrategy::Shadow;
        assert_eq!(
            stats.get("mmu.mmu_pte_write"),
            u64::from(shadow),
            "{strategy}: {stats:?}"
        );
        let both = if shadow { CODE | PAGE_TABLE } else { CODE };
        assert_eq!(c.page_track().reasons(CODE_AT >> 12), both, "{strategy}");
    }
}

#[test]
fn a_page_whose_last_block_is_invalidated_stops_being_tracked_as_code() {
    let (mut m, _, _) = machine();
    const OTHER: u64 = CODE_AT + 0x1_0000;
    let code = asm(64, CODE_AT, |a| {
        a.mov(rax, OTHER).unwrap();
        a.call(rax).unwrap();
        // Overwrite the other page's code: its only block goes.
        a.mov(rdi, OTHER).unwrap();
        a.mov(dword_ptr(rdi), 0x1090_9090).unwrap();
        a.hlt().unwrap();
    });
    let other = asm(64, OTHER, |a| {
        a.add(ebx, 1).unwrap();
        a.ret().unwrap();
    });
    load(&m, CODE_AT, &code);
    load(&m, OTHER, &other);
    let s = long_mode_state(&m, CODE_AT);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 1000), Exit::Halted);
    assert_eq!(c.state().unwrap().gpr[3], 1);
    assert_eq!(c.page_track().reasons(OTHER >> 12), 0);
    assert_eq!(c.page_track().reasons(CODE_AT >> 12), CODE);
    assert_eq!(c.stats().get("bt.invalidations"), 1);
}

#[test]
fn shadow_is_the_default_strategy() {
    let (mut m, _, _) = machine();
    let code = asm(64, CODE_AT, |a| {
        a.mov(rax, qword_ptr(0x40_0000)).unwrap();
        a.hlt().unwrap();
    });
    load(&m, CODE_AT, &code);
    let s = paged(&m, PT, 0);
    let mut c = cpu(&m, &s);
    assert_eq!(run(&mut c, &mut m, 1000), Exit::Halted);
    assert!(c.stats().get("mmu.pf_fixed") > 0, "{:?}", c.stats());
}
