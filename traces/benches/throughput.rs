//! Trace write and read throughput: events (the recording hot path) and checkpoints.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use deja_traces::*;
use std::hint::black_box;
use std::io::Cursor;
use std::time::Duration;

const EVENTS: u64 = 100_000;
const MEMORY_PAGES: usize = 4096; // 16 MiB

fn header() -> Header {
    Header {
        deja_version: DEJA_VERSION.into(),
        engine: "bt".into(),
        clock: ClockMode::Host,
        delivery: Delivery::InstructionExact,
        machine: MachineInfo::default(),
        images: vec![],
        options: RecordingOptions::default(),
        created_unix_secs: 0,
        notes: Default::default(),
        on_reset: ResetPolicy::Stop,
        guest_cpuid: None,
        host_cpu: None,
        digest_scheme: None,
        firmware_revision: None,
    }
}

/// A plausible event mix: mostly time reads and poll answers, some interrupts and input.
fn events() -> Vec<Event> {
    let mut x = 0x1234_5678_u64;
    let mut pos = Position::default();
    let mut t = 0u64;
    (0..EVENTS)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            pos.icount += 50 + x % 3000;
            pos.exits += 1 + x % 3;
            t += 1000 + x % 50_000;
            let kind = match i % 10 {
                0..=5 => EventKind::TimeRead { ns: t },
                6 => EventKind::Interrupt { vector: 0x20 },
                7 => EventKind::SerialInput { byte: None },
                8 => EventKind::Entropy { value: x },
                _ => EventKind::PollQuantum {
                    instructions: 20_000,
                },
            };
            Event::new(pos, kind)
        })
        .collect()
}

fn write_events(evs: &[Event]) -> Vec<u8> {
    let mut w = TraceWriter::new(Vec::new(), "bench", &header(), WriterOptions::default()).unwrap();
    for e in evs {
        w.push(e).unwrap();
    }
    let final_position = evs.last().unwrap().at;
    w.finish(FinishInfo {
        final_position,
        ..Default::default()
    })
    .unwrap()
    .0
}

/// Guest-like memory: a third of the pages hold text-like data, the rest are zero.
fn memory() -> Vec<u8> {
    let mut m = vec![0u8; MEMORY_PAGES * PAGE_SIZE];
    for (i, b) in m.iter_mut().enumerate() {
        if (i / PAGE_SIZE).is_multiple_of(3) {
            *b = (i.wrapping_mul(2654435761) >> 13) as u8 & 0x3f | 0x40;
        }
    }
    m
}

fn write_checkpoint(mem: &[u8]) -> Vec<u8> {
    let mut w = TraceWriter::new(Vec::new(), "bench", &header(), WriterOptions::default()).unwrap();
    let mut tracker = PageTracker::new();
    let changed = tracker.update(0, mem);
    let input = CheckpointInput {
        position: Position::default(),
        cpu_state: vec![0; 4096],
        device_state: vec![0; 1024],
        state_digest: None,
        full: true,
    };
    w.checkpoint(
        input,
        changed
            .iter()
            .map(|&p| (p, &mem[p as usize * PAGE_SIZE..][..PAGE_SIZE])),
    )
    .unwrap();
    w.finish(FinishInfo::default()).unwrap().0
}

fn bench(c: &mut Criterion) {
    let evs = events();
    let bytes = write_events(&evs);
    eprintln!(
        "events: {EVENTS} events -> {} bytes ({:.2} bytes/event)",
        bytes.len(),
        bytes.len() as f64 / EVENTS as f64
    );
    let mut g = c.benchmark_group("events");
    g.throughput(Throughput::Elements(EVENTS));
    g.bench_function("write", |b| b.iter(|| black_box(write_events(&evs))));
    g.bench_function("read", |b| {
        b.iter(|| {
            let mut r = TraceReader::new(Cursor::new(&bytes[..]), "bench").unwrap();
            black_box(r.events().filter(Result::is_ok).count())
        })
    });
    g.finish();

    let mem = memory();
    let cp_bytes = write_checkpoint(&mem);
    eprintln!(
        "checkpoint: {} MiB memory ({} non-zero pages) -> {} bytes",
        mem.len() >> 20,
        MEMORY_PAGES.div_ceil(3),
        cp_bytes.len()
    );
    let mut g = c.benchmark_group("checkpoint");
    g.throughput(Throughput::Bytes(mem.len() as u64));
    g.bench_function("write_16MiB", |b| {
        b.iter(|| black_box(write_checkpoint(&mem)))
    });
    g.bench_function("memory_at_16MiB", |b| {
        b.iter(|| {
            let mut r = TraceReader::new(Cursor::new(&cp_bytes[..]), "bench").unwrap();
            let cp = r.checkpoints()[0];
            black_box(r.memory_at(&cp).unwrap().len())
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
