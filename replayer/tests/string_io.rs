//! String I/O (INS/OUTS, with and without REP) across engines: KVM hands deja a repeated
//! string instruction's elements in batches and may re-enter the guest between them, bt
//! exits at every element. The exit-group rule (deja_machine::exit_group) makes both poll
//! and deliver interrupts at the same exit ordinals, so a kvm recording replays on bt and
//! an exit-synchronous bt recording replays on kvm, with the same digests.

mod common;

use common::{CLOCK_PORT, Engine, IN_PORT, LOAD, OUT_PORT, STOP_PORT, TIMER_PORT};
use common::{KickingHost, build, config, kvm_available};
use deja_engine::{EngineKind, RunEnd};
use deja_machine::devices::StopRequest;
use deja_machine::loader::{EntryMode, Image, ImageFormat};
use deja_machine::{ClockMode, LiveHost};
use deja_recorder::{RecordOptions, RecordOutcome, Recorder, SerialCapture};
use deja_replayer::{ReplayOptions, ReplayReport, Verdict, replay};
use deja_traces::Delivery;
use iced_x86::BlockEncoderOptions;
use iced_x86::code_asm::*;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// `mov ax, imm16` placeholder for the handler's offset.
const HANDLER_PLACEHOLDER: u16 = 0x5a5a;
/// A board port nobody decodes inside the board's range: writes are dropped, reads give 0.
const SINK_PORT: u16 = 0x50a;
/// Segment of the string buffers (0x10000..0x1ffff).
const BUFFERS: u16 = 0x1000;
/// Rounds of the whole sequence.
const ROUNDS: i32 = 3;
/// Timer period in microseconds: short enough that interrupts become due during the long
/// string instructions on both engines.
const PERIOD_US: u32 = 150;

/// One string instruction of the guest's sequence.
struct Op {
    /// INS (from the clock: every element is a time read) or OUTS.
    input: bool,
    /// Element size in bytes.
    size: u8,
    /// REP count (`None`: no REP prefix, one element).
    count: Option<u16>,
    /// DI (INS) or SI (OUTS) at the start, in the buffer segment.
    start: u16,
    /// Port for OUTS.
    port: u16,
    /// Run it with DF set (addresses going down).
    down: bool,
    /// Right before it, a plain `in al, dx` from the same port: a device exit directly
    /// followed by a REP string instruction, which joins its exit group.
    lead_in: bool,
}

const fn ins(size: u8, count: u16, start: u16) -> Op {
    Op {
        input: true,
        size,
        count: Some(count),
        start,
        port: CLOCK_PORT,
        down: false,
        lead_in: false,
    }
}

const fn outs(size: u8, count: u16, start: u16, port: u16) -> Op {
    Op {
        input: false,
        size,
        count: Some(count),
        start,
        port,
        down: false,
        lead_in: false,
    }
}

/// Lengths from 1 to several KVM batches (its INS read-ahead stops at the end of the
/// destination page and at 1 KiB), starts just before page boundaries, both directions.
const SEQUENCE: &[Op] = &[
    ins(1, 1, 0x0000),
    ins(2, 3, 0x0100),
    ins(4, 17, 0x0ff8),
    ins(1, 3000, 0x1f00),
    ins(2, 2500, 0x4ff0),
    Op {
        count: None,
        ..ins(1, 1, 0x7000)
    },
    Op {
        count: None,
        ..outs(1, 1, 0x8c00, OUT_PORT)
    },
    outs(1, 700, 0x8e00, OUT_PORT),
    outs(2, 1500, 0x1f00, SINK_PORT),
    outs(4, 33, 0x0ff8, SINK_PORT),
    Op {
        down: true,
        ..ins(1, 100, 0x6080)
    },
    Op {
        count: None,
        ..ins(4, 1, 0x7010)
    },
    Op {
        lead_in: true,
        ..ins(2, 40, 0x7100)
    },
];

/// The guest: a periodic timer whose handler counts ticks, reads the clock and prints '.';
/// [`ROUNDS`] times the [`SEQUENCE`] of string instructions, each followed by a clock read,
/// and a HLT; then the tick count's low nibble as a letter, and stop with 0x10.
fn string_guest() -> Image {
    let mut a = CodeAssembler::new(16).unwrap();
    let mut handler = a.create_label();
    let mut fill = a.create_label();
    let mut round = a.create_label();
    a.cli().unwrap();
    a.xor(ax, ax).unwrap();
    a.mov(ds, ax).unwrap();
    a.mov(ss, ax).unwrap();
    a.mov(sp, 0x7000).unwrap();
    a.mov(word_ptr(0x600), 0).unwrap();
    // The handler's offset, patched in below.
    a.mov(ax, HANDLER_PLACEHOLDER as i32).unwrap();
    a.mov(word_ptr(0x80), ax).unwrap();
    a.mov(word_ptr(0x82), 0).unwrap();
    a.mov(ax, BUFFERS as i32).unwrap();
    a.mov(ds, ax).unwrap();
    a.mov(es, ax).unwrap();
    // A printable pattern for the OUTS to the serial port.
    a.cld().unwrap();
    a.mov(di, 0x8c00).unwrap();
    a.mov(cx, 0x800).unwrap();
    a.set_label(&mut fill).unwrap();
    a.mov(ax, di).unwrap();
    a.and(al, 15).unwrap();
    a.add(al, b'a' as i32).unwrap();
    a.stosb().unwrap();
    a.loop_(fill).unwrap();
    a.mov(dx, TIMER_PORT as i32).unwrap();
    a.mov(eax, PERIOD_US).unwrap();
    a.out(dx, eax).unwrap();
    a.sti().unwrap();
    a.mov(bp, ROUNDS).unwrap();
    a.set_label(&mut round).unwrap();
    for op in SEQUENCE {
        if op.down {
            a.std().unwrap();
        }
        let n = op.count.unwrap_or(1);
        // With DF set the first element is the highest one.
        let first = if op.down {
            op.start + (n - 1) * u16::from(op.size)
        } else {
            op.start
        };
        a.mov(dx, op.port as i32).unwrap();
        a.mov(cx, n as i32).unwrap();
        if op.input {
            a.mov(di, first as i32).unwrap();
        } else {
            a.mov(si, first as i32).unwrap();
        }
        if op.lead_in {
            a.in_(al, dx).unwrap();
        }
        let asm = if op.count.is_some() { a.rep() } else { &mut a };
        match (op.input, op.size) {
            (true, 1) => asm.insb(),
            (true, 2) => asm.insw(),
            (true, _) => asm.insd(),
            (false, 1) => asm.outsb(),
            (false, 2) => asm.outsw(),
            (false, _) => asm.outsd(),
        }
        .unwrap();
        if op.down {
            a.cld().unwrap();
        }
        a.mov(dx, CLOCK_PORT as i32).unwrap();
        a.in_(eax, dx).unwrap();
    }
    a.hlt().unwrap();
    a.dec(bp).unwrap();
    a.jnz(round).unwrap();
    a.cli().unwrap();
    a.mov(dx, TIMER_PORT as i32).unwrap();
    a.xor(eax, eax).unwrap();
    a.out(dx, eax).unwrap();
    // Serial input is not used: read the port once so the trace has an empty poll too.
    a.mov(dx, IN_PORT as i32).unwrap();
    a.in_(ax, dx).unwrap();
    a.xor(ax, ax).unwrap();
    a.mov(ds, ax).unwrap();
    a.mov(ax, word_ptr(0x600)).unwrap();
    a.and(al, 15).unwrap();
    a.add(al, b'A' as i32).unwrap();
    a.mov(dx, OUT_PORT as i32).unwrap();
    a.out(dx, al).unwrap();
    a.mov(dx, STOP_PORT as i32).unwrap();
    a.mov(al, 0x10).unwrap();
    a.out(dx, al).unwrap();
    a.hlt().unwrap();
    a.set_label(&mut handler).unwrap();
    a.push(eax).unwrap();
    a.push(dx).unwrap();
    a.inc(word_ptr(0x600).cs()).unwrap();
    a.mov(dx, CLOCK_PORT as i32).unwrap();
    a.in_(eax, dx).unwrap();
    a.mov(al, b'.' as i32).unwrap();
    a.mov(dx, OUT_PORT as i32).unwrap();
    a.out(dx, al).unwrap();
    a.pop(dx).unwrap();
    a.pop(eax).unwrap();
    a.iret().unwrap();
    let result = a
        .assemble_options(LOAD, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
        .unwrap();
    let handler_ip = result.label_ip(&handler).unwrap() as u16;
    let mut bytes = result.inner.code_buffer;
    let ph = HANDLER_PLACEHOLDER.to_le_bytes();
    let at = bytes
        .windows(3)
        .position(|w| w == [0xb8, ph[0], ph[1]])
        .unwrap();
    bytes[at + 1..at + 3].copy_from_slice(&handler_ip.to_le_bytes());
    Image {
        initrd: None,
        name: "guest:board".into(),
        bytes,
        format: ImageFormat::Raw {
            load_addr: LOAD,
            entry: LOAD,
            mode: EntryMode::Real,
        },
    }
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("deja-string-io-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn kind(e: Engine) -> EngineKind {
    match e {
        Engine::Kvm => EngineKind::Kvm,
        Engine::Bt => EngineKind::Bt,
    }
}

fn record(
    engine: Engine,
    clock: ClockMode,
    image: &Image,
    path: &Path,
    delivery: Option<Delivery>,
) -> RecordOutcome {
    let live = Box::new(LiveHost::new(clock));
    let mut opts = RecordOptions::new(kind(engine), clock);
    opts.digest_interval = 16;
    if let Some(d) = delivery {
        opts.delivery = d;
    }
    opts.run.timeout = Some(std::time::Duration::from_secs(120));
    let serial = Arc::new(Mutex::new(SerialCapture::keeping()));
    let sink = Box::new(std::fs::File::create(path).unwrap());
    let cfg = config();
    Recorder::new(
        image,
        &cfg,
        live,
        sink,
        &path.display().to_string(),
        Box::new(std::io::sink()),
        serial,
        opts,
        |host, out| build(engine, &cfg, image, host, out),
    )
    .unwrap()
    .run()
    .unwrap()
}

fn replay_on(engine: Engine, path: &Path, image: &Image) -> ReplayReport {
    let opts = ReplayOptions {
        engine: kind(engine),
        until: None,
        seek: false,
        timeout: Some(std::time::Duration::from_secs(120)),
        watch: Vec::new(),
        translate: Vec::new(),
    };
    let img = image.clone();
    replay(
        path,
        &opts,
        &move |name| (name == "board").then(|| img.clone()),
        Box::new(std::io::sink()),
        Box::new(move |cfg, image, host, out| build(engine, cfg, image, host, out)),
    )
    .unwrap()
}

/// How many interrupts were delivered right after the last element of a long REP INS from
/// the clock (an interrupt at exit ordinal `p` with time reads at `p-15..=p`): with the
/// virtual clock (1 µs per exit) the timer is always due by the end of the 3000-element one.
fn interrupts_after_rep_ins(path: &Path) -> usize {
    use deja_traces::EventKind;
    let events = deja_replayer::read_events(path).unwrap();
    let reads: std::collections::BTreeSet<u64> = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::TimeRead { .. }))
        .map(|e| e.at.exits)
        .collect();
    events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Interrupt { .. }))
        .filter(|e| e.at.exits >= 16 && (e.at.exits - 15..=e.at.exits).all(|p| reads.contains(&p)))
        .count()
}

/// Checks a recording and replays it on both engines: verified, same final digest.
fn check(rec: &RecordOutcome, path: &Path, image: &Image, engines: &[Engine]) {
    assert_eq!(
        rec.run.end,
        RunEnd::Stopped(StopRequest::DebugExit { value: 0x10 })
    );
    let footer = rec.footer.as_ref().unwrap();
    let elements: u64 = SEQUENCE
        .iter()
        .filter(|o| o.input)
        .map(|o| u64::from(o.count.unwrap_or(1)) + u64::from(o.lead_in))
        .sum();
    // Every INS element from the clock is a logged time read.
    assert!(
        footer.event_counts["time"] >= elements * ROUNDS as u64,
        "{:?}",
        footer.event_counts
    );
    assert!(
        footer.event_counts["interrupt"] >= ROUNDS as u64,
        "{:?}",
        footer.event_counts
    );
    for &engine in engines {
        let r = replay_on(engine, path, image);
        assert!(matches!(r.verdict, Verdict::Verified), "on {engine:?}: {r}");
        assert_eq!(r.final_digest, rec.final_digest, "on {engine:?}");
        assert_eq!(r.events, footer.events_total, "on {engine:?}");
        println!(
            "replayed on {engine:?}: {} events ({:?}), {} digests checked, final digest {}",
            r.events, footer.event_counts, r.digests_checked, r.final_digest
        );
    }
}

#[test]
fn a_kvm_recording_with_string_io_replays_verified_on_bt() {
    if !kvm_available("a_kvm_recording_with_string_io_replays_verified_on_bt") {
        return;
    }
    let image = string_guest();
    for clock in [ClockMode::Virtual, ClockMode::Host] {
        let path = tmp(&format!("kvm-{clock:?}.trace"));
        let rec = record(Engine::Kvm, clock, &image, &path, None);
        let stats = &rec.run.stats;
        let after_rep = interrupts_after_rep_ins(&path);
        println!(
            "kvm recording ({clock:?} clock): {} exits, io_string_elements {}, io_in {}, io_out {}, groups continued {}, completion exits {}, REPs retired {}, interrupts {} ({after_rep} right after a REP INS), final digest {}",
            rec.run.exits,
            stats.get("exit.io_string_elements"),
            stats.get("exit.io_in"),
            stats.get("exit.io_out"),
            stats.get("exit.group_continued"),
            stats.get("exit.completion_exits"),
            stats.get("exit.rep_retired"),
            stats.get("kvm.interrupts_injected"),
            rec.final_digest
        );
        // KVM did batch (and split) the repeated INS, and deja kept the groups open.
        assert!(stats.get("exit.io_string_elements") > 0, "{stats:?}");
        assert!(stats.get("exit.group_continued") > 0, "{stats:?}");
        if clock == ClockMode::Virtual {
            assert!(after_rep >= ROUNDS as usize, "{after_rep}");
        }
        check(&rec, &path, &image, &[Engine::Bt, Engine::Kvm]);
    }
}

#[test]
fn an_exit_synchronous_bt_recording_with_string_io_replays_verified_on_kvm() {
    let image = string_guest();
    let kvm =
        kvm_available("an_exit_synchronous_bt_recording_with_string_io_replays_verified_on_kvm");
    for clock in [ClockMode::Virtual, ClockMode::Host] {
        let path = tmp(&format!("bt-sync-{clock:?}.trace"));
        let rec = record(
            Engine::Bt,
            clock,
            &image,
            &path,
            Some(Delivery::ExitSynchronous),
        );
        let after_rep = interrupts_after_rep_ins(&path);
        println!(
            "bt exit-synchronous recording ({clock:?} clock): {} instructions, {} exits, groups continued {}, interrupts {} ({after_rep} right after a REP INS), final digest {}",
            rec.run.icount,
            rec.run.exits,
            rec.run.stats.get("bt.exit_group_continued"),
            rec.run.stats.get("bt.interrupts"),
            rec.final_digest
        );
        assert!(rec.run.stats.get("bt.exit_group_continued") > 0);
        if clock == ClockMode::Virtual {
            assert!(after_rep >= ROUNDS as usize, "{after_rep}");
        }
        let mut engines = vec![Engine::Bt];
        if kvm {
            engines.push(Engine::Kvm);
        }
        check(&rec, &path, &image, &engines);
    }
}

/// The long-mode `string-io` guest on the deja-pc machine (PIT, PM timer, COM1, POST,
/// unmapped ports, an address-size prefix): recorded on kvm and replayed on bt and kvm, and
/// recorded on bt with exit-synchronous delivery and replayed on kvm and bt.
#[test]
fn the_string_io_guest_replays_across_engines_on_the_pc_machine() {
    let image = deja_guests::find("string-io").unwrap().image().unwrap();
    let cfg = deja_machine::MachineConfig {
        ram_size: 32 << 20,
        ..deja_machine::MachineConfig::default()
    };
    let kvm = kvm_available("the_string_io_guest_replays_across_engines_on_the_pc_machine");
    let mut recordings = vec![(EngineKind::Bt, Some(Delivery::ExitSynchronous))];
    if kvm {
        recordings.insert(0, (EngineKind::Kvm, None));
    }
    for (engine, delivery) in recordings {
        let path = tmp(&format!("pc-{engine}.trace"));
        let mut opts = RecordOptions::new(engine, ClockMode::Host);
        opts.digest_interval = 64;
        opts.run.timeout = Some(std::time::Duration::from_secs(120));
        if let Some(d) = delivery {
            opts.delivery = d;
        }
        let serial = Arc::new(Mutex::new(SerialCapture::keeping()));
        let rec = Recorder::new(
            &image,
            &cfg,
            Box::new(LiveHost::new(ClockMode::Host)),
            Box::new(std::fs::File::create(&path).unwrap()),
            &path.display().to_string(),
            Box::new(std::io::sink()),
            serial.clone(),
            opts,
            |host, out| deja_engine::build_vm(engine, cfg.clone(), host, out, &image),
        )
        .unwrap()
        .run()
        .unwrap();
        let text = String::from_utf8_lossy(serial.lock().unwrap().kept().unwrap()).to_string();
        assert_eq!(
            rec.run.end,
            RunEnd::Stopped(StopRequest::DebugExit { value: 0 }),
            "{text}"
        );
        assert!(text.contains("string-io: PASS"), "{text}");
        let footer = rec.footer.as_ref().unwrap();
        println!(
            "string-io recorded on {engine}: {} exits, events {:?}, final digest {}",
            rec.run.exits, footer.event_counts, rec.final_digest
        );
        let mut engines = vec![EngineKind::Bt];
        if kvm {
            engines.push(EngineKind::Kvm);
        }
        for e in engines {
            let r = replay(
                &path,
                &ReplayOptions {
                    engine: e,
                    until: None,
                    seek: false,
                    timeout: Some(std::time::Duration::from_secs(120)),
                    watch: Vec::new(),
                    translate: Vec::new(),
                },
                &|name| deja_guests::find(name).and_then(|g| g.image().ok()),
                Box::new(std::io::sink()),
                Box::new(move |cfg, image, host, out| {
                    deja_engine::build_vm(e, cfg.clone(), host, out, image)
                        .map_err(|err| err.to_string())
                }),
            )
            .unwrap();
            assert!(
                matches!(r.verdict, Verdict::Verified),
                "recorded on {engine}, replayed on {e}: {r}"
            );
            assert_eq!(r.final_digest, rec.final_digest, "{engine} -> {e}");
            println!(
                "  replayed on {e}: {} events, {} digests checked, final digest {}",
                r.events, r.digests_checked, r.final_digest
            );
        }
    }
}

/// A kick that lands between two elements of a REP INS stops the recording there, inside
/// the instruction's exit group (bt: right after the element it came in; kvm: where its
/// emulator next re-enters the guest), with the instruction not retired, and the trace
/// replays verified to exactly there (issue #14: a long REP string instruction used to hold
/// a kick back until its last element).
#[test]
fn a_kick_inside_a_rep_ins_stops_the_recording_between_two_elements() {
    let image = string_guest();
    let cfg = config();
    let kvm = kvm_available("a_kick_inside_a_rep_ins_stops_the_recording_between_two_elements");
    let mut recordings = vec![
        (Engine::Bt, Some(Delivery::ExitSynchronous)),
        (Engine::Bt, None),
    ];
    if kvm {
        recordings.push((Engine::Kvm, None));
    }
    // The 2nd, the 1000th and the 5000th time read: inside REP INSW (3 elements), REP INSB
    // (3000) and REP INSW (2500) of the first round.
    for (engine, delivery) in recordings {
        for kick_after in [2u32, 1000, 5000] {
            let path = tmp(&format!("kicked-{engine:?}-{kick_after}.trace"));
            let host = Box::new(KickingHost::new(ClockMode::Virtual, kick_after));
            let kicker = host.kicker.clone();
            let kicked_at = host.kicked_at.clone();
            let mut opts = RecordOptions::new(kind(engine), ClockMode::Virtual);
            opts.digest_interval = 16;
            if let Some(d) = delivery {
                opts.delivery = d;
            }
            let rec = Recorder::new(
                &image,
                &cfg,
                host,
                Box::new(std::fs::File::create(&path).unwrap()),
                "kicked.trace",
                Box::new(std::io::sink()),
                Arc::new(Mutex::new(SerialCapture::default())),
                opts,
                |host, out| build(engine, &cfg, &image, host, out),
            )
            .unwrap();
            *kicker.lock().unwrap() = Some(rec.kicker());
            let outcome = rec.run().unwrap();
            let what = format!("{engine:?}, kick after time read {kick_after}");
            assert_eq!(outcome.run.end, RunEnd::Interrupted, "{what}");
            let state = {
                let r = replay_on(Engine::Bt, &path, &image);
                assert!(matches!(r.verdict, Verdict::Verified), "{what}: {r}");
                assert_eq!(r.final_digest, outcome.final_digest, "{what}");
                r
            };
            let kicked_at = kicked_at.lock().unwrap().unwrap();
            if kick_after > 2 {
                // Kicked between two elements of a long REP INS: the recording stopped inside
                // it (bt: right after the element whose time read kicked; the replay's
                // final digest, equal to the recording's, covers RIP still at the REP INS and
                // the count left), not at its last element.
                if engine == Engine::Bt {
                    assert_eq!(outcome.run.exits, kicked_at.exits, "{what}");
                } else {
                    // kvm stops where its emulator next re-enters the guest: at the end of
                    // an INS read-ahead batch (at most 1 KiB), not at the instruction's last
                    // element (exit 3025 and 5528 here, where it stopped before).
                    assert!(
                        (kicked_at.exits..=kicked_at.exits + 1024).contains(&outcome.run.exits),
                        "{what}: kicked at exit {}, stopped at {}",
                        kicked_at.exits,
                        outcome.run.exits
                    );
                }
            }
            println!(
                "{what}: kicked at exit {}, stopped at exit {} (icount {}), replayed on bt: {} events, digest {}",
                kicked_at.exits,
                outcome.run.exits,
                outcome.run.icount,
                state.events,
                state.final_digest
            );
            // kvm replays exit-synchronous traces that end where it can stop: at the end of
            // an exit group (its own recordings, which it stops where its emulator re-enters
            // the guest). It cannot stop right after any element, where bt stops.
            let exit_sync = engine == Engine::Kvm || delivery == Some(Delivery::ExitSynchronous);
            if kvm && exit_sync && (engine == Engine::Kvm || kick_after == 2) {
                let r = replay_on(Engine::Kvm, &path, &image);
                assert!(matches!(r.verdict, Verdict::Verified), "{what} on kvm: {r}");
                assert_eq!(r.final_digest, outcome.final_digest, "{what} on kvm");
            }
        }
    }
}
