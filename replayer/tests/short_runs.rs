//! Short runs get state digests long before the footer (progress milestones), and a replay
//! checks every one of them.

use deja_engine::{EngineKind, build_vm};
use deja_machine::{ClockMode, LiveHost, MachineConfig};
use deja_recorder::{
    DEFAULT_DIGEST_INTERVAL, FIRST_EXIT_MILESTONE, RecordOptions, Recorder, SerialCapture,
};
use deja_replayer::{ReplayOptions, Verdict, read_events, replay};
use deja_traces::{EventKind, Footer};
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

/// Records `guest` on bt with the default options but `digest_interval` (the default is
/// [`DEFAULT_DIGEST_INTERVAL`]); returns the trace's footer.
fn record(guest: &str, clock: ClockMode, digest_interval: u64, path: &Path) -> Footer {
    let image = deja_guests::find(guest).unwrap().image().unwrap();
    let mut opts = RecordOptions::new(EngineKind::Bt, clock);
    opts.run.timeout = Some(Duration::from_secs(120));
    opts.digest_interval = digest_interval;
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
    outcome.footer.expect("a finished trace")
}

#[test]
fn a_short_run_has_digests_from_its_first_exits_and_replay_checks_them_all() {
    let path = tmp("hello.trace");
    let footer = record("hello", ClockMode::Host, DEFAULT_DIGEST_INTERVAL, &path);
    assert!(
        footer.events_total < DEFAULT_DIGEST_INTERVAL,
        "hello is meant to be a short run: {} events",
        footer.events_total
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
    // On the virtual clock: the same events every time, a checkpoint every 64 events.
    let path = tmp("timer.trace");
    record("timer", ClockMode::Virtual, 64, &path);
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

/// Device polls ask the clock only whether the earliest deadline has passed, and only the
/// answers that reached it are logged. hello runs with the PIT counting from power-on (an
/// IRQ 0 edge every 54.9 ms) and never reaches its first edge: its trace holds no time read
/// (98 before, one per poll). timer's polls while it prints find the next tick not due.
#[test]
fn polls_that_find_no_deadline_due_log_nothing_and_replay_verified() {
    let path = tmp("hello-polls.trace");
    let footer = record("hello", ClockMode::Host, DEFAULT_DIGEST_INTERVAL, &path);
    let count = |f: &Footer, k: &str| f.event_counts.get(k).copied().unwrap_or(0);
    assert_eq!(count(&footer, "time"), 0, "{:?}", footer.event_counts);

    for clock in [ClockMode::Virtual, ClockMode::Host] {
        let path = tmp(&format!("timer-polls-{clock:?}.trace"));
        let footer = record("timer", clock, DEFAULT_DIGEST_INTERVAL, &path);
        let (time, interrupts) = (count(&footer, "time"), count(&footer, "interrupt"));
        // A read at each of the 51 ticks' polls, the guest's own PIT accesses, and polls
        // after idling: far fewer than the ~740 polls of the run.
        assert!(
            interrupts >= 50 && time < 300,
            "{clock:?}: {:?} over {} exits",
            footer.event_counts,
            footer.final_position.exits
        );
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
        assert!(
            matches!(report.verdict, Verdict::Verified),
            "{clock:?}: {report}"
        );
    }
}
