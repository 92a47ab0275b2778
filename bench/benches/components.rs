//! criterion benchmarks of the harness's components: assembling a benchmark guest, one
//! whole short measurement on bt (boot, marks, loop, exit), and summarizing repeats.

use criterion::{Criterion, criterion_group, criterion_main};
use deja_bench::Summary;
use deja_bench::runner::{self, BenchConfig, Column, Job};
use deja_engine::EngineKind;
use deja_guests::bench::Bench;
use std::hint::black_box;

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

criterion_group!(benches, components);
criterion_main!(benches);
