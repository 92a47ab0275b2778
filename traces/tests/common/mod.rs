//! Shared builders for the trace tests.
#![allow(dead_code)]

use deja_traces::*;
use std::collections::BTreeMap;

/// A small deterministic generator (splitmix64), so tests need no extra crates.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

pub fn header() -> Header {
    let mut notes = BTreeMap::new();
    notes.insert("host.virt".to_string(), "test".to_string());
    Header {
        deja_version: DEJA_VERSION.to_string(),
        engine: "bt".into(),
        clock: ClockMode::Virtual,
        delivery: Delivery::InstructionExact,
        machine: MachineInfo {
            ram_size: 64 << 20,
            cmdline: "console=ttyS0".into(),
            cpuid: vec![CpuidEntry {
                function: 0,
                index: 0,
                indexed: false,
                eax: 0xd,
                ebx: 0x756e_6547,
                ecx: 0x6c65_746e,
                edx: 0x4965_6e69,
            }],
            extra: vec![1, 2, 3],
        },
        images: vec![ImageRecord {
            name: "guest:hello".into(),
            size: 512,
            digest: Digest::of(b"image bytes"),
            load: "raw at 0x7c00, real mode".into(),
            load_spec: vec![9, 9],
        }],
        options: RecordingOptions {
            digest_interval: 100,
            checkpoint_interval: 0,
            chaos_seed: Some(42),
        },
        created_unix_secs: 1_700_000_000,
        notes,
        on_reset: ResetPolicy::Reboot,
        guest_cpuid: Some(GuestCpuid {
            source: "a probe guest".into(),
            ring0: vec![CpuidEntry {
                function: 1,
                index: 0,
                indexed: true,
                eax: 0x306a9,
                ebx: 0x10800,
                ecx: 0xf7f8_3203,
                edx: 0x178b_fbff,
            }],
            ring3: Vec::new(),
        }),
        host_cpu: Some(HostCpu {
            vendor: "AuthenticAMD".into(),
            family: 0x19,
            model: 0x11,
            stepping: 1,
            name: "AMD EPYC".into(),
        }),
        digest_scheme: Some(DigestScheme {
            version: 2,
            devices: vec!["pc-irqchip".into(), "pit".into()],
        }),
        firmware_revision: Some(2),
    }
}

/// An event of a pseudo-random kind at `at`.
pub fn event(rng: &mut Rng, at: Position) -> Event {
    let kind = match rng.below(11) {
        0 => EventKind::TimeRead {
            ns: rng.next() >> 20,
        },
        1 => EventKind::BootWallclock {
            secs: 1_700_000_000,
        },
        2 => EventKind::SerialInput {
            byte: if rng.below(2) == 0 {
                None
            } else {
                Some(rng.next() as u8)
            },
        },
        3 => EventKind::Entropy { value: rng.next() },
        4 => EventKind::PollQuantum {
            instructions: 20_000,
        },
        5 => EventKind::Idle {
            deadline_ns: Some(rng.next() >> 30),
            resumed_ns: rng.next() >> 30,
        },
        6 => EventKind::Interrupt {
            vector: 0x20 + rng.below(16) as u8,
        },
        7 => EventKind::StateDigest {
            digest: Digest::of(&rng.next().to_le_bytes()),
        },
        8 => EventKind::SerialOutput {
            bytes: b"hello, world\n"[..rng.below(14) as usize].to_vec(),
        },
        9 => EventKind::Chaos {
            perturbation: "delay-interrupt".into(),
            value: rng.below(100),
        },
        _ => EventKind::End {
            status: Some(3),
            reason: "debug-exit".into(),
        },
    };
    Event::new(at, kind)
}

/// A recording: events, checkpoints and the memory at each checkpoint.
pub struct Recorded {
    pub bytes: Vec<u8>,
    pub events: Vec<Event>,
    /// Memory (as page → contents of non-zero pages) at each checkpoint.
    pub memories: Vec<MemoryImage>,
    pub checkpoint_inputs: Vec<CheckpointInput>,
    pub footer: Footer,
}

pub const RAM_PAGES: usize = 48;

/// Writes a trace with `n_events` events and a checkpoint every `every` events (memory of
/// `RAM_PAGES` pages mutated between checkpoints).
pub fn record(seed: u64, n_events: usize, every: usize, opts: WriterOptions) -> Recorded {
    let mut rng = Rng(seed);
    let mut w = TraceWriter::new(Vec::new(), "test.trace", &header(), opts).unwrap();
    let mut mem = vec![0u8; RAM_PAGES * PAGE_SIZE];
    for (i, b) in mem[..3 * PAGE_SIZE].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let mut tracker = PageTracker::new();
    let mut pos = Position::new(0, 0);
    let mut events = Vec::new();
    let mut memories = Vec::new();
    let mut inputs = Vec::new();
    for i in 0..n_events {
        if i % every == 0 {
            // Mutate memory: dirty some pages, zero one.
            for _ in 0..3 {
                let page = rng.below(RAM_PAGES as u64) as usize;
                let off = page * PAGE_SIZE + rng.below(PAGE_SIZE as u64) as usize;
                mem[off] = mem[off].wrapping_add(1 + rng.below(200) as u8);
            }
            if i > 0 {
                let z = rng.below(RAM_PAGES as u64) as usize;
                mem[z * PAGE_SIZE..(z + 1) * PAGE_SIZE].fill(0);
            }
            let changed = tracker.update(0, &mem);
            let input = CheckpointInput {
                position: pos,
                cpu_state: format!("cpu at {pos}").into_bytes(),
                device_state: vec![i as u8; 40],
                state_digest: Some(Digest::of(&mem)),
                full: i == 0,
            };
            w.checkpoint(
                input.clone(),
                changed.iter().map(|&p| {
                    (
                        p,
                        &mem[p as usize * PAGE_SIZE..(p as usize + 1) * PAGE_SIZE],
                    )
                }),
            )
            .unwrap();
            let mut image = MemoryImage::new();
            for (p, page) in mem.chunks(PAGE_SIZE).enumerate() {
                image.set_page(p as u64, page);
            }
            memories.push(image);
            inputs.push(input);
        }
        pos.exits += rng.below(3);
        pos.icount += rng.below(1000);
        let e = event(&mut rng, pos);
        w.push(&e).unwrap();
        events.push(e);
    }
    let (bytes, footer) = w
        .finish(FinishInfo {
            final_position: Position::new(pos.icount + 10, pos.exits + 1),
            final_state_digest: Some(Digest::of(b"final")),
            serial_output_digest: Some(Digest::of(b"out")),
            serial_output_bytes: 3,
            exit: ExitInfo {
                status: Some(3),
                reason: "debug-exit 0x3".into(),
            },
        })
        .unwrap();
    Recorded {
        bytes,
        events,
        memories,
        checkpoint_inputs: inputs,
        footer,
    }
}

pub fn small_frames() -> WriterOptions {
    WriterOptions {
        frame_bytes: 256,
        frame_events: 64,
        pages_per_frame: 4,
        compression_level: 1,
    }
}

pub fn open(bytes: &[u8]) -> Result<TraceReader<std::io::Cursor<&[u8]>>, ReadError> {
    TraceReader::new(std::io::Cursor::new(bytes), "test.trace")
}
