//! The built-in guests recorded and replayed on the full deja-pc machine through
//! `deja_engine::build_vm`, on each engine and across engines.

use deja_engine::{EngineKind, RunEnd, build_vm};
use deja_machine::devices::StopRequest;
use deja_machine::{ClockMode, LiveHost, MachineConfig};
use deja_recorder::{RecordOptions, RecordOutcome, Recorder, SerialCapture};
use deja_replayer::{ReplayOptions, ReplayReport, Verdict, replay};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("deja-guests-rr-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn config() -> MachineConfig {
    MachineConfig {
        ram_size: 32 << 20,
        ..MachineConfig::default()
    }
}

fn kvm_usable(test: &str) -> bool {
    match build_vm(
        EngineKind::Kvm,
        config(),
        Box::new(LiveHost::new(ClockMode::Virtual)),
        Box::new(std::io::sink()),
        &deja_guests::find("hello").unwrap().image().unwrap(),
    ) {
        Ok(_) => true,
        Err(deja_engine::BuildError::EngineUnavailable { reason, .. }) => {
            deja_testkit::skip_without_kvm(test, &reason);
            false
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

fn record(
    engine: EngineKind,
    guest: &str,
    clock: ClockMode,
    input: &[u8],
    path: &Path,
) -> (RecordOutcome, String) {
    let image = deja_guests::find(guest).unwrap().image().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    for &b in input {
        tx.send(b).unwrap();
    }
    drop(tx);
    let mut opts = RecordOptions::new(engine, clock);
    opts.digest_interval = 256;
    opts.run.timeout = Some(Duration::from_secs(120));
    let serial = Arc::new(Mutex::new(SerialCapture::keeping()));
    let outcome = Recorder::new(
        &image,
        &config(),
        Box::new(LiveHost::new(clock).with_input(rx)),
        Box::new(std::fs::File::create(path).unwrap()),
        &path.display().to_string(),
        Box::new(std::io::sink()),
        serial.clone(),
        opts,
        |host, out| build_vm(engine, config(), host, out, &image),
    )
    .unwrap()
    .run()
    .unwrap();
    let text = String::from_utf8_lossy(serial.lock().unwrap().kept().unwrap()).to_string();
    (outcome, text)
}

fn replay_on(engine: EngineKind, path: &Path) -> ReplayReport {
    replay(
        path,
        &ReplayOptions {
            engine,
            until: None,
            seek: false,
            timeout: Some(Duration::from_secs(120)),
            watch: Vec::new(),
            translate: Vec::new(),
        },
        &|name| deja_guests::find(name).and_then(|g| g.image().ok()),
        Box::new(std::io::sink()),
        Box::new(move |cfg, image, host, out| {
            build_vm(engine, cfg.clone(), host, out, image).map_err(|e| e.to_string())
        }),
    )
    .unwrap()
}

/// Records `guest` and replays it on each of `rep_engines`. Guests whose verdict depends on
/// host timing (timer on the host clock, under a loaded test machine) may exit non-zero;
/// replay must then reproduce that same exit.
fn round_trip(
    rec_engine: EngineKind,
    rep_engines: &[EngineKind],
    guest: &str,
    clock: ClockMode,
    input: &[u8],
) -> String {
    let path = tmp(&format!("{guest}-{rec_engine}-{clock:?}.trace"));
    let (outcome, text) = record(rec_engine, guest, clock, input, &path);
    let RunEnd::Stopped(StopRequest::DebugExit { value }) = outcome.run.end else {
        panic!(
            "{guest} on {rec_engine} did not exit: {:?}: {text}",
            outcome.run.end
        );
    };
    if guest != "timer" {
        assert_eq!(value, 0, "{guest} on {rec_engine}: {text}");
    }
    for &e in rep_engines {
        let r = replay_on(e, &path);
        assert!(
            matches!(r.verdict, Verdict::Verified),
            "{guest} recorded on {rec_engine}, replayed on {e}: {r}"
        );
        assert_eq!(
            r.final_digest, outcome.final_digest,
            "{guest} {rec_engine} -> {e}"
        );
        assert_eq!(r.exit_status, Some(value as i32));
    }
    text
}

#[test]
fn guests_recorded_on_bt_replay_on_bt() {
    round_trip(
        EngineKind::Bt,
        &[EngineKind::Bt],
        "hello",
        ClockMode::Host,
        b"",
    );
    let text = round_trip(
        EngineKind::Bt,
        &[EngineKind::Bt],
        "echo",
        ClockMode::Host,
        b"scripted\x04",
    );
    assert!(text.contains("scripted"), "{text}");
    round_trip(
        EngineKind::Bt,
        &[EngineKind::Bt],
        "timer",
        ClockMode::Host,
        b"",
    );
}

#[test]
fn guests_recorded_on_kvm_replay_on_kvm_and_on_bt() {
    if !kvm_usable("guests_recorded_on_kvm_replay_on_kvm_and_on_bt") {
        return;
    }
    let both = [EngineKind::Kvm, EngineKind::Bt];
    round_trip(EngineKind::Kvm, &both, "hello", ClockMode::Host, b"");
    let text = round_trip(
        EngineKind::Kvm,
        &both,
        "echo",
        ClockMode::Host,
        b"from kvm\x04",
    );
    assert!(text.contains("from kvm"), "{text}");
    round_trip(EngineKind::Kvm, &both, "timer", ClockMode::Host, b"");
}
