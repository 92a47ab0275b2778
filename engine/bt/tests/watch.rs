//! Watched ranges (`Cpu::set_watch`): every store touching them is reported with the exact
//! icount and RIP of the storing instruction and the bytes before and after, whether or not
//! the value changed, and watching never changes what the guest does.

mod common;

use common::*;
use deja_machine::{Cpu, CpuState, WatchHit};
use iced_x86::code_asm::*;

const CODE: u64 = 0x20_0000;
const VAR: u64 = 0x30_0000;

/// A guest whose stores touch, straddle and miss an 8-byte variable at [`VAR`]; returns
/// the guest and the RIP of every instruction in order.
fn guest(m: &deja_machine::Machine) -> (CpuState, Vec<u64>) {
    let code = asm(64, CODE, |a| {
        a.mov(rax, 0x1122_3344_5566_7788u64).unwrap(); // 0
        a.mov(qword_ptr(VAR), rax).unwrap(); // 1: the whole variable
        a.mov(qword_ptr(VAR), rax).unwrap(); // 2: the same value again (unchanged)
        a.mov(byte_ptr(VAR + 7), 0x55).unwrap(); // 3: its last byte
        a.mov(qword_ptr(VAR + 8), rax).unwrap(); // 4: just past it: not reported
        a.mov(dword_ptr(VAR - 2), 0x0102_0304).unwrap(); // 5: straddles its start
        a.mov(rsp, VAR + 8).unwrap(); // 6
        a.push(rsp).unwrap(); // 7: a push into it
        a.inc(qword_ptr(VAR)).unwrap(); // 8: read-modify-write
        a.hlt().unwrap(); // 9
    });
    load(m, CODE, &code);
    let mut rips = Vec::new();
    let mut d = iced_x86::Decoder::with_ip(64, &code, CODE, 0);
    while d.can_decode() {
        rips.push(d.decode().ip());
    }
    (long_mode_state(m, CODE), rips)
}

fn hit(icount: u64, rip: u64, address: u64, old: &[u8], new: &[u8]) -> WatchHit {
    WatchHit {
        icount,
        rip,
        address,
        old: old.to_vec(),
        new: new.to_vec(),
        read: false,
    }
}

#[test]
fn every_store_into_a_watched_range_is_reported_exactly_and_changes_nothing() {
    let (mut m, _, _) = machine();
    let (state, rips) = guest(&m);
    let mut cpu = cpu(&m, &state);
    cpu.set_watch(&[(VAR, 8)]).unwrap();
    run(&mut cpu, &mut m, 1000);
    let hits = cpu.take_watch_hits();
    let v = 0x1122_3344_5566_7788u64.to_le_bytes();
    let mut after3 = v;
    after3[7] = 0x55;
    let mut after5 = after3;
    after5[..2].copy_from_slice(&[0x02, 0x01]);
    let pushed = (VAR + 8).to_le_bytes();
    let incremented = (u64::from_le_bytes(pushed) + 1).to_le_bytes();
    let expected = vec![
        hit(1, rips[1], VAR, &[0; 8], &v),
        hit(2, rips[2], VAR, &v, &v),
        hit(3, rips[3], VAR + 7, &[0x11], &[0x55]),
        hit(5, rips[5], VAR, &after3[..2], &[0x02, 0x01]),
        hit(7, rips[7], VAR, &after5, &pushed),
        hit(8, rips[8], VAR, &pushed, &incremented),
    ];
    assert_eq!(hits, expected);
    assert!(cpu.take_watch_hits().is_empty(), "hits are taken once");

    // The same guest unwatched ends in the same state and memory.
    let (mut m2, _, _) = machine();
    let (state2, _) = guest(&m2);
    let mut plain = common::cpu(&m2, &state2);
    run(&mut plain, &mut m2, 1000);
    assert_eq!(plain.state().unwrap(), cpu.state().unwrap());
    assert_eq!(peek(&m2, VAR - 8, 24), peek(&m, VAR - 8, 24));
    assert_eq!(plain.icount(), cpu.icount());
    assert!(plain.take_watch_hits().is_empty());
}

#[test]
fn clearing_the_watch_stops_reporting() {
    let (mut m, _, _) = machine();
    let (state, _) = guest(&m);
    let mut cpu = cpu(&m, &state);
    cpu.set_watch(&[(VAR, 8)]).unwrap();
    cpu.set_watch(&[]).unwrap();
    run(&mut cpu, &mut m, 1000);
    assert!(cpu.take_watch_hits().is_empty());
}

/// A guest that loads from, stores to and misses the variable at [`VAR`], which holds
/// 0x1122334455667788 when it starts; returns the guest and the RIP of every instruction.
fn reader(m: &deja_machine::Machine) -> (CpuState, Vec<u64>) {
    let code = asm(64, CODE, |a| {
        a.mov(rbx, qword_ptr(VAR)).unwrap(); // 0: loads the whole variable
        a.mov(al, byte_ptr(VAR + 7)).unwrap(); // 1: its last byte
        a.mov(rcx, qword_ptr(VAR + 8)).unwrap(); // 2: just past it: not reported
        a.add(edx, dword_ptr(VAR - 2)).unwrap(); // 3: straddles its start
        a.mov(qword_ptr(VAR), rcx).unwrap(); // 4: a store only
        a.inc(qword_ptr(VAR)).unwrap(); // 5: read-modify-write: a load, then a store
        a.mov(rbx, qword_ptr(VAR)).unwrap(); // 6: the same page again, loaded once more
        a.hlt().unwrap(); // 7
    });
    load(m, CODE, &code);
    load(m, VAR, &0x1122_3344_5566_7788u64.to_le_bytes());
    let mut rips = Vec::new();
    let mut d = iced_x86::Decoder::with_ip(64, &code, CODE, 0);
    while d.can_decode() {
        rips.push(d.decode().ip());
    }
    (long_mode_state(m, CODE), rips)
}

fn read_hit(icount: u64, rip: u64, address: u64, bytes: &[u8]) -> WatchHit {
    WatchHit {
        read: true,
        ..hit(icount, rip, address, bytes, bytes)
    }
}

#[test]
fn loads_from_a_range_watched_for_reads_are_reported_and_change_nothing() {
    let v = 0x1122_3344_5566_7788u64.to_le_bytes();
    let one = 1u64.to_le_bytes();
    // Reads only: every load touching the variable, none of the stores.
    let (mut m, _, _) = machine();
    let (state, rips) = reader(&m);
    let mut cpu = cpu(&m, &state);
    cpu.set_watch_access(&[], &[(VAR, 8)]).unwrap();
    run(&mut cpu, &mut m, 1000);
    let reads = vec![
        read_hit(0, rips[0], VAR, &v),
        read_hit(1, rips[1], VAR + 7, &v[7..]),
        read_hit(3, rips[3], VAR, &v[..2]),
        read_hit(5, rips[5], VAR, &[0; 8]),
        read_hit(6, rips[6], VAR, &one),
    ];
    assert_eq!(cpu.take_watch_hits(), reads);
    // Loads and stores (an access watchpoint): both, in execution order.
    let (mut m2, _, _) = machine();
    let (state2, _) = reader(&m2);
    let mut both = common::cpu(&m2, &state2);
    both.set_watch_access(&[(VAR, 8)], &[(VAR, 8)]).unwrap();
    run(&mut both, &mut m2, 1000);
    let mut expected = reads[..3].to_vec();
    expected.push(hit(4, rips[4], VAR, &v, &[0; 8]));
    expected.push(reads[3].clone());
    expected.push(hit(5, rips[5], VAR, &[0; 8], &one));
    expected.push(reads[4].clone());
    assert_eq!(both.take_watch_hits(), expected);
    // Watching changed nothing the guest did.
    let (mut m3, _, _) = machine();
    let (state3, _) = reader(&m3);
    let mut plain = common::cpu(&m3, &state3);
    run(&mut plain, &mut m3, 1000);
    assert_eq!(plain.state().unwrap(), cpu.state().unwrap());
    assert_eq!(plain.state().unwrap(), both.state().unwrap());
    assert_eq!(plain.icount(), cpu.icount());
    assert_eq!(peek(&m3, VAR, 8), one);
    assert_eq!(peek(&m, VAR, 8), one);
}
