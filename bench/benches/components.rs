//! criterion benchmarks of the components the harness's numbers rest on: bt's decode +
//! translate throughput and block lookup (the other component benches live with their
//! crates: page walks in `engine/bt/benches/mmu.rs`, trace write and read in
//! `traces/benches/throughput.rs`, guest loops and whole-block translation in
//! `engine/bt/benches/bt.rs`), plus the harness's own parts: assembling a benchmark guest,
//! one whole short measurement on bt (boot, marks, loop, exit), summarizing repeats.

#![allow(missing_docs)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use deja_bench::Summary;
use deja_bench::runner::{self, BenchConfig, Column, Job};
use deja_bt::cache::{Block, BlockCache, Key};
use deja_engine::EngineKind;
use deja_guests::bench::Bench;
use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction};
use std::hint::black_box;

/// The code bt translates in [`decode_translate`]: every benchmark guest's image (real,
/// protected and long mode boot paths, then 64-bit loops and handlers), decoded as 64-bit
/// code, which is what most of it is. Some boot bytes decode to other instructions in
/// 64-bit mode; they are still instructions bt must translate.
fn guest_code() -> Vec<u8> {
    Bench::ALL
        .iter()
        .flat_map(|b| b.image(1000).unwrap().bytes)
        .collect()
}

/// Decodes `code` and translates it into micro-ops block by block (a block ends at a
/// branch), with dead-flag elimination, as bt's translator does; returns the micro-ops made.
fn translate_all(code: &[u8]) -> usize {
    let mut decoder = Decoder::with_ip(64, code, 0x10_0000, DecoderOptions::NONE);
    let mut insns: Vec<Instruction> = Vec::with_capacity(64);
    let mut ops = Vec::with_capacity(64);
    let mut made = 0;
    let features = deja_bt::features::Features::default();
    while decoder.can_decode() {
        let insn = decoder.decode();
        ops.push(deja_bt::translate::build(&insn, 64, &features));
        insns.push(insn);
        if insn.flow_control() != FlowControl::Next || insns.len() == 64 {
            deja_bt::translate::eliminate_dead_flags(&mut ops, &insns);
            made += ops.len();
            black_box(&ops);
            ops.clear();
            insns.clear();
        }
    }
    made + ops.len()
}

fn decode_translate(c: &mut Criterion) {
    let code = guest_code();
    let mut g = c.benchmark_group("bt");
    g.throughput(Throughput::Bytes(code.len() as u64));
    g.bench_function("decode_translate_guest_code", |b| {
        b.iter(|| translate_all(black_box(&code)))
    });
    g.finish();
}

/// A cache of `n` blocks of 16 bytes each, 256 per 4 KiB page, under one mode.
fn block_cache(n: u64) -> (BlockCache, Vec<Key>) {
    let mut cache = BlockCache::default();
    let keys: Vec<Key> = (0..n)
        .map(|i| Key {
            rip: 0x40_0000 + i * 16,
            cs_base: 0,
            phys: 0x40_0000 + i * 16,
            mode: 0x15,
        })
        .collect();
    for &key in &keys {
        let slot = cache.insert(Block {
            key,
            ops: Vec::new(),
            extents: [(key.phys, key.phys + 16), (0, 0)],
            bytes: vec![0x90; 16],
            links: Default::default(),
            jit: Default::default(),
        });
        cache.remember(slot);
    }
    (cache, keys)
}

fn block_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("bt");
    g.throughput(Throughput::Elements(1));
    // 1024 blocks: all fit the 4096-entry direct-mapped lookup cache.
    let (cache, keys) = block_cache(1024);
    let mut i = 0usize;
    g.bench_function("block_lookup_fast_hit", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            let k = &keys[i];
            cache.fast_lookup(black_box(k.rip), k.cs_base, k.mode)
        })
    });
    // 65536 blocks: the full (hashed) lookup by key, as after a fast-lookup miss.
    let (cache, keys) = block_cache(65536);
    let mut i = 0usize;
    g.bench_function("block_lookup_map_65536", |b| {
        b.iter(|| {
            i = (i + 7919) & 65535;
            cache.lookup(black_box(&keys[i]))
        })
    });
    g.finish();
}

fn components(c: &mut Criterion) {
    c.bench_function("assemble bench-call guest", |b| {
        b.iter(|| Bench::Call.image(black_box(1000)).unwrap())
    });
    let config = BenchConfig {
        columns: vec![Column::Engine(EngineKind::Bt)],
        repeat: 1,
        iterations: Some(100),
        ..BenchConfig::default()
    };
    let job = Job {
        bench: Bench::In,
        column: Column::Engine(EngineKind::Bt),
        mmu: "tlb".into(),
    };
    c.bench_function("measure bench-in x100 on bt (boot to exit)", |b| {
        b.iter(|| runner::run_job(black_box(&job), &config))
    });
    let values: Vec<f64> = (0..101).map(|i| f64::from(i * 7919 % 101)).collect();
    c.bench_function("summarize 101 repeats", |b| {
        b.iter(|| Summary::of(black_box(&values)))
    });
}

criterion_group!(benches, decode_translate, block_lookup, components);
criterion_main!(benches);
