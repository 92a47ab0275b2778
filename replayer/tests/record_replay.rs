//! Record on one engine, replay on the same or the other, with the test board machine.

mod common;

use common::{Engine, KickingHost, build, config, guest, kvm_available};
use deja_engine::{EngineKind, RunEnd};
use deja_machine::devices::StopRequest;
use deja_machine::loader::Image;
use deja_machine::{ClockMode, LiveHost};
use deja_recorder::{RecordOptions, RecordOutcome, Recorder, SerialCapture};
use deja_replayer::{ReplayOptions, ReplayReport, Until, Verdict, replay};
use deja_traces::{
    CheckpointInput, Event, EventKind, FinishInfo, TraceReader, TraceWriter, WriterOptions,
};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("deja-rr-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn kind(e: Engine) -> EngineKind {
    match e {
        Engine::Kvm => EngineKind::Kvm,
        Engine::Bt => EngineKind::Bt,
    }
}

struct Recorded {
    outcome: RecordOutcome,
    output: Vec<u8>,
}

fn record_with(
    engine: Engine,
    image: &Image,
    path: &Path,
    input: &[u8],
    tweak: impl FnOnce(&mut RecordOptions),
) -> Recorded {
    let (tx, rx) = std::sync::mpsc::channel();
    for &b in input {
        tx.send(b).unwrap();
    }
    drop(tx);
    let live = Box::new(LiveHost::new(ClockMode::Host).with_input(rx));
    let mut opts = RecordOptions::new(kind(engine), ClockMode::Host);
    opts.digest_interval = 16;
    // These guests run a few thousand instructions: a checkpoint at every digest.
    opts.checkpoint_min_instructions = 0;
    tweak(&mut opts);
    let serial = Arc::new(Mutex::new(SerialCapture::keeping()));
    let sink = Box::new(std::fs::File::create(path).unwrap());
    let cfg = config();
    let rec = Recorder::new(
        image,
        &cfg,
        live,
        sink,
        &path.display().to_string(),
        Box::new(std::io::sink()),
        serial.clone(),
        opts,
        |host, out| build(engine, &cfg, image, host, out),
    )
    .unwrap();
    let outcome = rec.run().unwrap();
    let output = serial.lock().unwrap().kept().unwrap().to_vec();
    Recorded { outcome, output }
}

fn record(engine: Engine, image: &Image, path: &Path, input: &[u8]) -> Recorded {
    record_with(engine, image, path, input, |_| {})
}

fn replay_on(
    engine: Engine,
    path: &Path,
    image: &Image,
    until: Option<Until>,
    seek: bool,
) -> ReplayReport {
    try_replay_on(engine, path, image, until, seek).unwrap()
}

fn try_replay_on(
    engine: Engine,
    path: &Path,
    image: &Image,
    until: Option<Until>,
    seek: bool,
) -> Result<ReplayReport, deja_replayer::ReplayError> {
    let opts = ReplayOptions {
        engine: kind(engine),
        until,
        seek,
        timeout: Some(std::time::Duration::from_secs(60)),
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
}

fn assert_verified(r: &ReplayReport) {
    assert!(matches!(r.verdict, Verdict::Verified), "{r}");
}

fn check_round_trip(engine: Engine) {
    let image = guest(12);
    let path = tmp(&format!("round-trip-{engine:?}.trace"));
    let rec = record(engine, &image, &path, b"hi!");
    assert_eq!(
        rec.outcome.run.end,
        RunEnd::Stopped(StopRequest::DebugExit { value: 0x10 })
    );
    assert!(rec.outcome.write_error.is_none());
    let footer = rec.outcome.footer.as_ref().unwrap();
    assert!(
        rec.output.starts_with(b"............"),
        "{:?}",
        String::from_utf8_lossy(&rec.output)
    );
    assert!(rec.output.windows(3).any(|w| w == b"hi!"));
    assert!(
        footer.event_counts["interrupt"] >= 12,
        "{:?}",
        footer.event_counts
    );
    assert!(footer.event_counts["time"] > 10);
    assert!(footer.event_counts["state-digest"] >= 2);
    assert!(!footer.checkpoints.is_empty());
    for _ in 0..2 {
        let r = replay_on(engine, &path, &image, None, false);
        assert_verified(&r);
        assert_eq!(r.final_digest, rec.outcome.final_digest);
        assert_eq!(r.exit_status, Some(0x10));
        assert_eq!(r.events, footer.events_total);
        assert!(r.digests_checked >= 2);
    }
}

#[test]
fn a_kvm_recording_replays_verified_on_kvm() {
    if !kvm_available("a_kvm_recording_replays_verified_on_kvm") {
        return;
    }
    check_round_trip(Engine::Kvm);
}

#[test]
fn a_bt_recording_replays_verified_on_bt() {
    check_round_trip(Engine::Bt);
}

#[test]
fn a_kvm_recording_replays_on_bt_with_the_same_digests() {
    if !kvm_available("a_kvm_recording_replays_on_bt_with_the_same_digests") {
        return;
    }
    let image = guest(8);
    // With a checkpoint at every digest, and with none (the registers are logged with each
    // digest instead): kvm's registers must match bt's wherever the trace holds them.
    for checkpoint_every in [1, 0] {
        let path = tmp(&format!("kvm-to-bt-{checkpoint_every}.trace"));
        let rec = record_with(Engine::Kvm, &image, &path, b"x", |o| {
            o.checkpoint_every = checkpoint_every;
        });
        let footer = rec.outcome.footer.as_ref().unwrap();
        // Digests with a checkpoint carry the whole CPU state; every other digest (all of
        // them without checkpoints, the progress-milestone ones with) logs the registers.
        let count = |k: &str| footer.event_counts.get(k).copied().unwrap_or(0);
        assert_eq!(
            count("registers"),
            count("state-digest") - footer.checkpoints.len() as u64,
            "{:?}",
            footer.event_counts
        );
        assert_eq!(
            footer.checkpoints.is_empty(),
            checkpoint_every == 0,
            "{:?}",
            footer.event_counts
        );
        let r = replay_on(Engine::Bt, &path, &image, None, false);
        assert_verified(&r);
        assert_eq!(r.final_digest, rec.outcome.final_digest);
        assert!(r.icount > 0);
        assert!(r.digests_checked >= 2, "{r}");
    }
}

#[test]
fn an_exit_synchronous_bt_recording_replays_on_kvm() {
    let image = guest(8);
    let path = tmp("bt-sync-to-kvm.trace");
    let rec = record_with(Engine::Bt, &image, &path, b"", |o| {
        o.delivery = deja_traces::Delivery::ExitSynchronous;
    });
    let on_bt = replay_on(Engine::Bt, &path, &image, None, false);
    assert_verified(&on_bt);
    if !kvm_available("an_exit_synchronous_bt_recording_replays_on_kvm") {
        return;
    }
    let r = replay_on(Engine::Kvm, &path, &image, None, false);
    assert_verified(&r);
    assert_eq!(r.final_digest, rec.outcome.final_digest);
}

#[test]
fn chaos_recordings_replay_exactly() {
    let image = guest(10);
    for seed in [1u64, 2, 3] {
        let path = tmp(&format!("chaos-{seed}.trace"));
        let rec = record_with(Engine::Bt, &image, &path, b"", |o| {
            o.chaos_seed = Some(seed);
            o.chaos_max_quantum = 500;
        });
        let footer = rec.outcome.footer.as_ref().unwrap();
        assert!(footer.event_counts["chaos"] > 0);
        let r = replay_on(Engine::Bt, &path, &image, None, false);
        assert_verified(&r);
        assert_eq!(r.icount, rec.outcome.run.icount);
    }
}

/// Rewrites a trace with `edit` applied to its events (checkpoints kept where they were).
fn rewrite(src: &Path, dst: &Path, edit: impl Fn(u64, &mut Event)) {
    rewrite_with(src, dst, edit, |_, _, _| {});
}

/// [`rewrite_with`]'s page editor may also renumber a page.
fn renumber_pages(src: &Path, dst: &Path, renumber: impl Fn(u64, u64) -> u64) {
    rewrite_pages(
        src,
        dst,
        |_, _| {},
        |ordinal, n, _| *n = renumber(ordinal, *n),
    );
}

/// [`rewrite`], also applying `edit_page(checkpoint ordinal, page number, bytes)` to every
/// checkpoint page.
fn rewrite_with(
    src: &Path,
    dst: &Path,
    edit: impl Fn(u64, &mut Event),
    edit_page: impl Fn(u64, u64, &mut [u8]),
) {
    rewrite_pages(src, dst, edit, |ordinal, n, bytes| {
        edit_page(ordinal, *n, bytes)
    });
}

/// [`rewrite_with`], where the page editor may also change the page number.
fn rewrite_pages(
    src: &Path,
    dst: &Path,
    edit: impl Fn(u64, &mut Event),
    edit_page: impl Fn(u64, &mut u64, &mut [u8]),
) {
    let mut r = TraceReader::open(src).unwrap();
    let header = r.header().clone();
    let footer = r.footer().cloned().unwrap();
    let checkpoints = r.checkpoints().to_vec();
    let events: Vec<Event> = r.events().map(|e| e.unwrap()).collect();
    let mut w = TraceWriter::create(dst, &header, WriterOptions::default()).unwrap();
    let mut next_cp = 0;
    for (i, mut e) in events.into_iter().enumerate() {
        while next_cp < checkpoints.len() && checkpoints[next_cp].event_index == i as u64 {
            let mut c = r.read_checkpoint(&checkpoints[next_cp]).unwrap();
            for (n, p) in c.pages.iter_mut() {
                edit_page(c.meta.ordinal, n, &mut p[..]);
            }
            w.checkpoint(
                CheckpointInput {
                    position: c.meta.position,
                    cpu_state: c.meta.cpu_state,
                    device_state: c.meta.device_state,
                    state_digest: c.meta.state_digest,
                    full: c.meta.full,
                },
                c.pages.iter().map(|(n, p)| (*n, &p[..])),
            )
            .unwrap();
            next_cp += 1;
        }
        edit(i as u64, &mut e);
        w.push(&e).unwrap();
    }
    w.finish(FinishInfo {
        final_position: footer.final_position,
        final_state_digest: footer.final_state_digest,
        serial_output_digest: footer.serial_output_digest,
        serial_output_bytes: footer.serial_output_bytes,
        exit: footer.exit,
    })
    .unwrap();
}

#[test]
fn a_tampered_time_answer_is_reported_as_a_divergence_at_its_position() {
    let image = guest(6);
    let path = tmp("tamper-src.trace");
    record(Engine::Bt, &image, &path, b"");
    let events = deja_replayer::read_events(&path).unwrap();
    // The clock read that starts the 300 µs polling loop: the last time read before the
    // second-to-last serial output... simply take the time read in the middle.
    let times: Vec<(usize, &Event)> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e.kind, EventKind::TimeRead { .. }))
        .collect();
    let (index, victim) = times[times.len() / 2];
    let victim_at = victim.at;
    let tampered = tmp("tamper.trace");
    rewrite(&path, &tampered, |i, e| {
        if i == index as u64
            && let EventKind::TimeRead { ns } = &mut e.kind
        {
            *ns += 7_000_000;
        }
    });
    let r = replay_on(Engine::Bt, &tampered, &image, None, false);
    let Verdict::Diverged(d) = &r.verdict else {
        panic!("tampering went unnoticed: {r}");
    };
    assert!(
        victim_at.at_or_before(&d.at),
        "divergence at {} before the tampered event at {victim_at}",
        d.at
    );
    let text = r.to_string();
    assert!(text.contains("replay diverged at icount"), "{text}");
    assert!(
        text.contains("expected:") && text.contains("actual:"),
        "{text}"
    );
    // The untouched copy still verifies.
    assert_verified(&replay_on(Engine::Bt, &path, &image, None, false));
}

/// Numbers read from a trace are checked against the machine it describes, even when every
/// checksum is valid: a page number of 2^52 + 7 must not wrap onto page 7, and a poll
/// quantum of u64::MAX or a clock that runs backwards must not overflow or reach devices.
#[test]
fn crafted_numbers_in_a_trace_with_valid_checksums_are_refused() {
    let image = guest(6);
    let path = tmp("crafted-src.trace");
    record(Engine::Bt, &image, &path, b"");
    let mut r = TraceReader::open(&path).unwrap();
    let cp = r.checkpoints()[0];
    let victim = r.read_checkpoint(&cp).unwrap().pages[0].0;
    drop(r);

    let wrapped = tmp("crafted-page.trace");
    renumber_pages(
        &path,
        &wrapped,
        |_, n| {
            if n == victim { (1 << 52) + n } else { n }
        },
    );
    let mut r = TraceReader::open(&wrapped).unwrap();
    let report = deja_traces::verify(&mut r).unwrap();
    assert!(!report.ok, "trace verify must not say OK: {report}");
    assert!(
        report.to_string().contains("beyond the guest memory"),
        "{report}"
    );
    let err = r.memory_at(&r.checkpoints()[0].clone()).unwrap_err();
    assert!(
        err.to_string()
            .contains("checkpoint page number 0x10000000000"),
        "{err}"
    );
    drop(r);
    // Seeking from that checkpoint fails with the reader's message; nothing is restored.
    let stop = Some(Until::Icount(cp.position.icount + 10));
    let err = try_replay_on(Engine::Bt, &wrapped, &image, stop, true).unwrap_err();
    assert!(err.to_string().contains("beyond the guest memory"), "{err}");

    // A page inside the header's bound but outside this machine's RAM (the VGA hole).
    let hole = tmp("crafted-hole.trace");
    renumber_pages(&path, &hole, |_, n| if n == victim { 0xa0 } else { n });
    let err = try_replay_on(Engine::Bt, &hole, &image, stop, true).unwrap_err();
    assert!(
        err.to_string()
            .contains("page number 0xa0 is not a page of this machine's RAM or ROM"),
        "{err}"
    );

    // A poll quantum of u64::MAX: no overflow, the replay just diverges.
    let events = deja_replayer::read_events(&path).unwrap();
    let quantum = events
        .iter()
        .position(|e| matches!(e.kind, EventKind::PollQuantum { .. }))
        .expect("a bt recording logs poll quanta") as u64;
    let huge = tmp("crafted-quantum.trace");
    rewrite(&path, &huge, |i, e| {
        if i == quantum
            && let EventKind::PollQuantum { instructions } = &mut e.kind
        {
            *instructions = u64::MAX;
        }
    });
    let r = replay_on(Engine::Bt, &huge, &image, None, false);
    assert!(matches!(r.verdict, Verdict::Diverged(_)), "{r}");

    // A time read earlier than the one before.
    let times: Vec<u64> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e.kind, EventKind::TimeRead { ns } if ns > 1000))
        .map(|(i, _)| i as u64)
        .collect();
    let back = tmp("crafted-time.trace");
    let victim_time = times[times.len() / 2];
    rewrite(&path, &back, |i, e| {
        if i == victim_time
            && let EventKind::TimeRead { ns } = &mut e.kind
        {
            *ns = 0;
        }
    });
    let r = replay_on(Engine::Bt, &back, &image, None, false);
    let Verdict::Diverged(d) = &r.verdict else {
        panic!("a clock running backwards went unnoticed: {r}");
    };
    assert!(d.actual.contains("earlier than the one before"), "{r}");
}

#[test]
fn a_divergence_at_logged_registers_shows_the_register_diff() {
    let image = guest(6);
    let path = tmp("regs-src.trace");
    // No checkpoints: every digest carries the registers.
    record_with(Engine::Bt, &image, &path, b"", |o| o.checkpoint_every = 0);
    let events = deja_replayer::read_events(&path).unwrap();
    let (index, at, rax) = events
        .iter()
        .enumerate()
        .find_map(|(i, e)| match &e.kind {
            EventKind::Registers { values } => Some((i as u64, e.at, values[0])),
            _ => None,
        })
        .expect("a digest without a checkpoint logs the registers");
    assert!(
        matches!(
            events[index as usize + 1].kind,
            EventKind::StateDigest { .. }
        ),
        "registers go just before their digest"
    );
    let tampered = tmp("regs.trace");
    rewrite(&path, &tampered, |i, e| {
        if i == index
            && let EventKind::Registers { values } = &mut e.kind
        {
            values[0] ^= 0x40;
        }
    });
    let r = replay_on(Engine::Bt, &tampered, &image, None, false);
    let Verdict::Diverged(d) = &r.verdict else {
        panic!("tampered registers went unnoticed: {r}");
    };
    assert_eq!(d.at, at);
    assert_eq!(d.event_index, index);
    assert_eq!(
        d.register_diff,
        vec![format!("rax: {:#x} -> {rax:#x}", rax ^ 0x40)]
    );
    let text = r.to_string();
    assert!(text.contains("registers (recorded -> replayed)"), "{text}");
    assert_verified(&replay_on(Engine::Bt, &path, &image, None, false));
}

#[test]
fn a_digest_mismatch_at_a_checkpoint_shows_the_memory_diff() {
    let image = guest(6);
    let path = tmp("mem-src.trace");
    record(Engine::Bt, &image, &path, b"");
    let mut r = TraceReader::open(&path).unwrap();
    let cp = r.checkpoints()[0];
    // A page the checkpoint stores (a non-zero one: the full image holds only those).
    let page = r.read_checkpoint(&cp).unwrap().pages.last().unwrap().0;
    drop(r);
    let events = deja_replayer::read_events(&path).unwrap();
    let digest_index = cp.event_index - 1;
    assert!(
        matches!(
            events[digest_index as usize].kind,
            EventKind::StateDigest { .. }
        ) && events[digest_index as usize].at == cp.position
    );
    // Claim a different digest there, and a different byte in the checkpoint's memory at
    // the same place: the divergence report must name that byte, recorded -> replayed.
    let tampered = tmp("mem.trace");
    rewrite_with(
        &path,
        &tampered,
        |i, e| {
            if i == digest_index
                && let EventKind::StateDigest { digest } = &mut e.kind
            {
                digest.0[0] ^= 1;
            }
        },
        |ordinal, n, bytes| {
            if ordinal == 0 && n == page {
                bytes[0x123] ^= 0xff;
            }
        },
    );
    let r = replay_on(Engine::Bt, &tampered, &image, None, false);
    let Verdict::Diverged(d) = &r.verdict else {
        panic!("{r}");
    };
    assert_eq!(d.at, cp.position);
    assert!(d.register_diff.is_empty(), "{r}");
    assert_eq!(d.memory_diff.len(), 1, "{r}");
    let addr = page * 4096 + 0x123;
    assert!(
        d.memory_diff[0].contains(&format!("1 differing bytes in {addr:#x}..{:#x}", addr + 1)),
        "{r}"
    );
    assert!(
        r.to_string().contains("memory (recorded -> replayed)"),
        "{r}"
    );
}

#[test]
fn a_truncated_trace_replays_up_to_what_it_holds() {
    let image = guest(12);
    let path = tmp("truncate-src.trace");
    let rec = record_with(Engine::Bt, &image, &path, b"", |o| {
        o.writer.frame_events = 32;
    });
    let bytes = std::fs::read(&path).unwrap();
    let cut = tmp("truncated.trace");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let r = replay_on(Engine::Bt, &cut, &image, None, false);
    let Verdict::TraceEnded { detail, .. } = &r.verdict else {
        panic!("{r}");
    };
    assert!(
        r.events > 0 && r.events < rec.outcome.events,
        "{} of {}",
        r.events,
        rec.outcome.events
    );
    assert!(!detail.is_empty());
    assert!(r.to_string().contains("trace ends early"), "{r}");
}

#[test]
fn until_stops_at_the_exact_instruction_with_and_without_a_checkpoint() {
    let image = guest(10);
    let path = tmp("until.trace");
    let rec = record(Engine::Bt, &image, &path, b"");
    let target = rec.outcome.run.icount * 3 / 4 + 1;
    let from_start = replay_on(
        Engine::Bt,
        &path,
        &image,
        Some(Until::Icount(target)),
        false,
    );
    let seeked = replay_on(Engine::Bt, &path, &image, Some(Until::Icount(target)), true);
    for r in [&from_start, &seeked] {
        let Verdict::ReachedUntil { at, .. } = &r.verdict else {
            panic!("{r}");
        };
        assert_eq!(at.icount, target);
        assert_eq!(r.icount, target);
    }
    assert!(seeked.started_from.is_some(), "no checkpoint used");
    assert!(from_start.started_from.is_none());
    let (Verdict::ReachedUntil { state: a, .. }, Verdict::ReachedUntil { state: b, .. }) =
        (&from_start.verdict, &seeked.verdict)
    else {
        unreachable!()
    };
    assert_eq!(a.diff(b), Vec::<String>::new());
    assert_eq!(from_start.final_digest, seeked.final_digest);
}

/// A sink that takes `limit` bytes and then reports a full disk.
struct FullDisk {
    file: std::fs::File,
    left: usize,
}

impl std::io::Write for FullDisk {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() > self.left {
            return Err(std::io::Error::from_raw_os_error(libc_enospc()));
        }
        self.left -= buf.len();
        self.file.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

fn libc_enospc() -> i32 {
    28
}

#[test]
fn a_full_disk_keeps_every_whole_frame_and_says_so() {
    let image = guest(20);
    let path = tmp("full.trace");
    let full = tmp("full-disk.trace");
    let rec = record(Engine::Bt, &image, &path, b"");
    let limit = std::fs::metadata(&path).unwrap().len() as usize / 2;
    let live = Box::new(LiveHost::new(ClockMode::Host));
    let mut opts = RecordOptions::new(EngineKind::Bt, ClockMode::Host);
    opts.digest_interval = 16;
    opts.checkpoint_min_instructions = 0;
    opts.writer.frame_events = 64;
    let cfg = config();
    let sink = Box::new(FullDisk {
        file: std::fs::File::create(&full).unwrap(),
        left: limit,
    });
    let outcome = Recorder::new(
        &image,
        &cfg,
        live,
        sink,
        "full-disk.trace",
        Box::new(std::io::sink()),
        Arc::new(Mutex::new(SerialCapture::default())),
        opts,
        |host, out| build(Engine::Bt, &cfg, &image, host, out),
    )
    .unwrap()
    .run()
    .unwrap();
    let err = outcome.write_error.expect("the full disk went unnoticed");
    assert!(err.contains("whole frames"), "{err}");
    assert!(outcome.footer.is_none());
    assert!(outcome.run.icount < rec.outcome.run.icount);
    let r = TraceReader::open(&full).unwrap();
    assert!(
        matches!(r.status(), deja_traces::TraceStatus::Truncated { .. }),
        "{}",
        r.status()
    );
    let replayed = replay_on(Engine::Bt, &full, &image, None, false);
    assert!(
        matches!(replayed.verdict, Verdict::TraceEnded { .. }),
        "{replayed}"
    );
}

#[test]
fn a_recording_stopped_by_an_instruction_limit_replays_to_exactly_there() {
    let image = guest(30);
    let path = tmp("limit.trace");
    let rec = record_with(Engine::Bt, &image, &path, b"", |o| {
        o.run.max_instructions = Some(50_000);
    });
    assert_eq!(rec.outcome.run.end, RunEnd::InstructionLimit);
    assert_eq!(rec.outcome.run.icount, 50_000);
    assert!(rec.outcome.footer.is_some());
    let r = replay_on(Engine::Bt, &path, &image, None, false);
    assert_verified(&r);
    assert_eq!(r.icount, 50_000);
    assert_eq!(r.final_digest, rec.outcome.final_digest);
}

fn check_kicked_recording(engine: Engine) {
    let image = guest(5_000);
    let path = tmp(&format!("kicked-{engine:?}.trace"));
    let live = Box::new(LiveHost::new(ClockMode::Host));
    let mut opts = RecordOptions::new(kind(engine), ClockMode::Host);
    opts.digest_interval = 16;
    let cfg = config();
    let rec = Recorder::new(
        &image,
        &cfg,
        live,
        Box::new(std::fs::File::create(&path).unwrap()),
        "kicked.trace",
        Box::new(std::io::sink()),
        Arc::new(Mutex::new(SerialCapture::default())),
        opts,
        |host, out| build(engine, &cfg, &image, host, out),
    )
    .unwrap();
    let kicker = rec.kicker();
    let t = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(30));
        kicker.kick();
    });
    let outcome = rec.run().unwrap();
    t.join().unwrap();
    assert_eq!(outcome.run.end, RunEnd::Interrupted);
    let footer = outcome
        .footer
        .expect("an interrupted recording is finished");
    assert_eq!(footer.exit.reason, "interrupted");
    let mut engines = vec![engine];
    if engine == Engine::Kvm {
        engines.push(Engine::Bt);
    }
    for e in engines {
        let r = replay_on(e, &path, &image, None, false);
        assert_verified(&r);
        if engine == Engine::Bt {
            assert_eq!(r.final_digest, outcome.final_digest, "{engine:?} -> {e:?}");
        } else {
            // kvm ran on past the last exit until the kick: no reproducible final state.
            assert_eq!(footer.final_state_digest, None);
        }
    }
}

#[test]
fn a_kicked_bt_recording_is_complete_and_replays_to_where_it_stopped() {
    check_kicked_recording(Engine::Bt);
}

/// A kick right after any time answer (at a device exit or at a scheduled poll) leaves a
/// trace whose last events are at the final position: the replay must consume them and stop
/// there with the recorded digest (a CI run once lost this race).
#[test]
fn a_bt_recording_kicked_right_after_a_time_read_replays_to_where_it_stopped() {
    let image = guest(5_000);
    let cfg = config();
    // With a digest every event, the recording takes one between the kicked poll and its
    // end, at the very position where it stops: when that poll was the instruction-count
    // one, the replay, which stops there by its instruction limit, must check it too (it
    // once ended with that digest unread). On the virtual clock every run is the same, so
    // some kick lands after such a poll every time.
    let runs = (1..=24).flat_map(|k| [(k, 16, ClockMode::Host), (k, 1, ClockMode::Virtual)]);
    for (kick_after, digest_interval, clock) in runs {
        let path = tmp(&format!(
            "kicked-after-{kick_after}-{digest_interval}.trace"
        ));
        let host = Box::new(KickingHost::new(clock, kick_after));
        let kicker = host.kicker.clone();
        let mut opts = RecordOptions::new(EngineKind::Bt, clock);
        opts.digest_interval = digest_interval;
        let rec = Recorder::new(
            &image,
            &cfg,
            host,
            Box::new(std::fs::File::create(&path).unwrap()),
            "kicked.trace",
            Box::new(std::io::sink()),
            Arc::new(Mutex::new(SerialCapture::default())),
            opts,
            |host, out| build(Engine::Bt, &cfg, &image, host, out),
        )
        .unwrap();
        *kicker.lock().unwrap() = Some(rec.kicker());
        let outcome = rec.run().unwrap();
        assert_eq!(
            outcome.run.end,
            RunEnd::Interrupted,
            "kick after {kick_after}"
        );
        let r = replay_on(Engine::Bt, &path, &image, None, false);
        assert!(
            matches!(r.verdict, Verdict::Verified),
            "kick after time read {kick_after}, digests every {digest_interval} events: {r}"
        );
        assert_eq!(r.icount, outcome.run.icount, "kick after {kick_after}");
        assert_eq!(
            r.final_digest, outcome.final_digest,
            "kick after {kick_after}"
        );
    }
}

#[test]
fn a_kicked_kvm_recording_is_complete_and_replays_to_where_it_stopped() {
    if !kvm_available("a_kicked_kvm_recording_is_complete_and_replays_to_where_it_stopped") {
        return;
    }
    check_kicked_recording(Engine::Kvm);
}

/// A real-mode board guest that single-steps a loop of 64 clock reads: every device exit,
/// and so every checkpoint, falls between an IN and its single-step trap.
fn single_stepping_guest() -> Image {
    use common::{CLOCK_PORT, LOAD, STOP_PORT};
    use iced_x86::code_asm::*;
    let mut a = CodeAssembler::new(16).unwrap();
    let mut handler = a.create_label();
    let mut main = a.create_label();
    let mut top = a.create_label();
    a.jmp(main).unwrap();
    a.set_label(&mut handler).unwrap();
    a.inc(word_ptr(0x600)).unwrap(); // counts #DB traps
    a.iret().unwrap();
    a.set_label(&mut main).unwrap();
    a.cli().unwrap();
    a.xor(ax, ax).unwrap();
    a.mov(ds, ax).unwrap();
    a.mov(ss, ax).unwrap();
    a.mov(sp, 0x7000).unwrap();
    a.mov(word_ptr(0x600), 0).unwrap();
    a.mov(word_ptr(4), (LOAD + 2) as u32).unwrap(); // IVT[1] = 0000:handler
    a.mov(word_ptr(6), 0).unwrap();
    a.mov(cx, 64).unwrap();
    a.pushf().unwrap();
    a.pop(ax).unwrap();
    a.or(ax, 0x100).unwrap();
    a.push(ax).unwrap();
    a.popf().unwrap(); // TF from here on
    a.set_label(&mut top).unwrap();
    a.mov(dx, CLOCK_PORT as u32).unwrap();
    a.in_(eax, dx).unwrap(); // a logged time read: digests and checkpoints come after these
    a.loop_(top).unwrap();
    a.pushf().unwrap();
    a.pop(ax).unwrap();
    a.and(ax, !0x100).unwrap();
    a.push(ax).unwrap();
    a.popf().unwrap();
    a.mov(dx, STOP_PORT as u32).unwrap();
    a.mov(al, 0x10).unwrap();
    a.out(dx, al).unwrap();
    a.hlt().unwrap();
    let bytes = a.assemble(LOAD).unwrap();
    let handler_at = iced_x86::Decoder::with_ip(16, &bytes, LOAD, 0)
        .iter()
        .nth(1)
        .unwrap()
        .ip();
    assert_eq!(handler_at, LOAD + 2, "the short JMP is two bytes");
    common::board_image(bytes)
}

#[test]
fn a_checkpoint_between_an_instruction_and_its_debug_trap_replays_the_trap() {
    let image = single_stepping_guest();
    let path = tmp("single-step.trace");
    let rec = record_with(Engine::Bt, &image, &path, b"", |o| o.checkpoint_every = 1);
    assert_eq!(
        rec.outcome.run.end,
        RunEnd::Stopped(StopRequest::DebugExit { value: 0x10 })
    );
    // The checkpoints were taken at IN exits, each with the IN's single-step trap due.
    let mut reader = TraceReader::open(&path).unwrap();
    let format = reader.format_version();
    let checkpoints = reader.checkpoints().to_vec();
    assert!(checkpoints.len() >= 2, "{checkpoints:?}");
    let mut with_trap = 0;
    for cp in &checkpoints {
        let meta = reader.read_checkpoint(cp).unwrap().meta;
        let state = deja_recorder::state::decode_cpu_state(&meta.cpu_state, format).unwrap();
        if state.pending_debug.trap == 1 << 14 {
            with_trap += 1;
        }
    }
    assert!(with_trap >= 1, "no checkpoint holds a pending trap");
    // Seeking from such a checkpoint delivers the trap as the run from the start does.
    let target = rec.outcome.run.icount - 3;
    let from_start = replay_on(
        Engine::Bt,
        &path,
        &image,
        Some(Until::Icount(target)),
        false,
    );
    let seeked = replay_on(Engine::Bt, &path, &image, Some(Until::Icount(target)), true);
    assert!(seeked.started_from.is_some(), "no checkpoint used");
    let (Verdict::ReachedUntil { state: a, .. }, Verdict::ReachedUntil { state: b, .. }) =
        (&from_start.verdict, &seeked.verdict)
    else {
        panic!("{from_start}\n{seeked}")
    };
    assert_eq!(a.diff(b), Vec::<String>::new());
    assert_eq!(
        from_start.final_digest, seeked.final_digest,
        "memory (the handler's trap count) differs"
    );
    let full = replay_on(Engine::Bt, &path, &image, None, false);
    assert_verified(&full);
}

/// A device added to the machine after a recording (here a second POST port) changes
/// neither the trace's digests (scheme 2 covers the devices the header lists) nor its
/// checkpoints (the new device keeps its boot state): the trace verifies on the larger
/// machine, from the start and when seeking from a checkpoint. A trace whose digests cover
/// a device the machine lacks is refused before the replay starts.
#[test]
fn a_device_added_after_the_recording_leaves_its_trace_verifiable() {
    use deja_machine::devices::post::PostPort;
    let image = guest(12);
    let path = tmp("added-device.trace");
    let rec = record(Engine::Bt, &image, &path, b"hi");
    let header = TraceReader::open(&path).unwrap().header().clone();
    let scheme = header.digest_scheme.clone().unwrap();
    assert_eq!(scheme.version, 3);
    assert_eq!(scheme.devices, ["test-irqchip", "test-board"]);
    let replay_with_extra = |until: Option<Until>, seek: bool| {
        let opts = ReplayOptions {
            engine: EngineKind::Bt,
            until,
            seek,
            timeout: Some(std::time::Duration::from_secs(60)),
            watch: Vec::new(),
            translate: Vec::new(),
        };
        let img = image.clone();
        replay(
            &path,
            &opts,
            &move |name| (name == "board").then(|| img.clone()),
            Box::new(std::io::sink()),
            Box::new(|cfg, image, host, out| {
                let mut vm = build(Engine::Bt, cfg, image, host, out)?;
                vm.machine
                    .add_device(Box::<PostPort>::default(), &[(0x80, 1)], &[])
                    .map_err(|e| e.to_string())?;
                Ok(vm)
            }),
        )
    };
    let r = replay_with_extra(None, false).unwrap();
    assert_verified(&r);
    assert_eq!(r.final_digest, rec.outcome.final_digest);
    let cp = TraceReader::open(&path).unwrap().checkpoints()[1];
    let r = replay_with_extra(Some(Until::Icount(cp.position.icount + 5)), true).unwrap();
    assert!(matches!(r.verdict, Verdict::ReachedUntil { .. }), "{r}");
    assert_eq!(r.started_from, Some(cp.position), "{r}");

    // Digests over a device this machine does not have cannot be checked: refused first.
    let mut r = TraceReader::open(&path).unwrap();
    let mut header = r.header().clone();
    header
        .digest_scheme
        .as_mut()
        .unwrap()
        .devices
        .push("floppy".into());
    let events: Vec<Event> = r.events().map(|e| e.unwrap()).collect();
    let other = tmp("added-device-floppy.trace");
    let mut w = TraceWriter::create(&other, &header, WriterOptions::default()).unwrap();
    for e in &events {
        w.push(e).unwrap();
    }
    drop(w);
    let err = try_replay_on(Engine::Bt, &other, &image, None, false).unwrap_err();
    assert!(err.to_string().contains("\"floppy\""), "{err}");
}
