//! Short runs get state digests long before the footer (progress milestones), and a replay
//! checks every one of them.

use deja_engine::{EngineKind, build_vm};
use deja_machine::{ClockMode, LiveHost, MachineConfig};
use deja_recorder::{
    DEFAULT_DIGEST_INTERVAL, FIRST_EXIT_MILESTONE, RecordOptions, Recorder, SerialCapture,
};
use deja_replayer::{ReplayOptions, Verdict, read_events, replay};
use deja_traces::EventKind;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("deja-short-runs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn config() -> MachineConfig {
    MachineConfig {
        ram_size: 32 << 20,
        ..MachineConfig::default()
    }
}

/// Records `guest` on bt with the default options (digests every 1024 events); returns
/// the events logged.
fn record_default(guest: &str, clock: ClockMode, path: &Path) -> u64 {
    let image = deja_guests::find(guest).unwrap().image().unwrap();
    let mut opts = RecordOptions::new(EngineKind::Bt, clock);
    opts.run.timeout = Some(Duration::from_secs(120));
    assert_eq!(opts.digest_interval, DEFAULT_DIGEST_INTERVAL);
    let outcome = Recorder::new(
        &image,
        &config(),
        Box::new(LiveHost::new(clock)),
        Box::new(std::fs::File::create(path).unwrap()),
        &path.display().to_string(),
        Box::new(std::io::sink()),
        Arc::new(Mutex::new(SerialCapture::default())),
        opts,
        |host, out| build_vm(EngineKind::Bt, config(), host, out, &image),
    )
    .unwrap()
    .run()
    .unwrap();
    outcome.events
}

#[test]
fn a_short_run_has_digests_from_its_first_exits_and_replay_checks_them_all() {
    let path = tmp("hello.trace");
    let events = record_default("hello", ClockMode::Host, &path);
    assert!(
        events < DEFAULT_DIGEST_INTERVAL,
        "hello is meant to be a short run: {events} events"
    );
    let events = read_events(&path).unwrap();
    let digests: Vec<_> = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::StateDigest { .. }))
        .collect();
    let end = events
        .iter()
        .find(|e| matches!(e.kind, EventKind::End { .. }))
        .expect("an end event");
    // The guest makes about 100 exits: milestones at 16, 32 and 64 exits.
    assert!(
        digests.len() >= 3,
        "{} digests in a run of {} exits",
        digests.len(),
        end.at.exits
    );
    let first = digests[0].at;
    assert!(
        first.exits >= FIRST_EXIT_MILESTONE && first.exits < 2 * FIRST_EXIT_MILESTONE,
        "first digest at {first}"
    );
    assert!(digests.iter().all(|d| d.at.exits < end.at.exits));
    // Each digest without a checkpoint carries the registers, for a register diff.
    let registers = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Registers { .. }))
        .count();
    assert_eq!(registers, digests.len());

    let report = replay(
        &path,
        &ReplayOptions::new(EngineKind::Bt),
        &|name| deja_guests::find(name).and_then(|g| g.image().ok()),
        Box::new(std::io::sink()),
        Box::new(|cfg, image, host, out| {
            build_vm(EngineKind::Bt, cfg.clone(), host, out, image).map_err(|e| e.to_string())
        }),
    )
    .unwrap();
    assert!(matches!(report.verdict, Verdict::Verified), "{report}");
    assert_eq!(report.digests_checked, digests.len() as u64);
}

/// Drains a player: every event, then why the trace ended.
fn drain(mut p: deja_replayer::Player) -> (Vec<deja_traces::Event>, Option<String>) {
    let mut out = Vec::new();
    while let Some(e) = p.peek().cloned() {
        out.push(e);
        p.consume();
    }
    (out, p.trace_end())
}

#[test]
fn a_short_trace_decoded_before_the_run_plays_exactly_as_the_reader_thread_streams_it() {
    use deja_replayer::{PRELOAD_MAX_EVENTS, Player};
    use deja_traces::TraceReader;
    // On the virtual clock: the same 1076 events every time, a checkpoint at event 1024.
    let path = tmp("timer.trace");
    record_default("timer", ClockMode::Virtual, &path);
    let mut reader = TraceReader::open(&path).unwrap();
    let total = reader.footer().unwrap().events_total;
    assert!(total <= PRELOAD_MAX_EVENTS);
    let streamed = drain(Player::new(path.clone(), None, false));
    let preloaded = drain(Player::preloaded(&mut reader, None, false));
    assert_eq!(streamed.0.len() as u64, total);
    assert_eq!(preloaded, streamed);

    // From a checkpoint, as --until seeks.
    let cp = *reader.checkpoints().first().expect("a checkpoint");
    let streamed = drain(Player::new(path.clone(), Some(cp), false));
    let preloaded = drain(Player::preloaded(&mut reader, Some(cp), false));
    assert_eq!(streamed.0.len() as u64, total - cp.event_index);
    assert_eq!(preloaded, streamed);

    // A trace cut short inside its frames: both end after the last whole frame, and say so.
    let bytes = std::fs::read(&path).unwrap();
    let cut = tmp("timer-cut.trace");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let mut reader = TraceReader::open(&cut).unwrap();
    assert!(reader.footer().is_none());
    let streamed = drain(Player::new(cut.clone(), None, false));
    let preloaded = drain(Player::preloaded(&mut reader, None, false));
    assert!(streamed.1.is_some());
    assert_eq!(preloaded, streamed);
}
