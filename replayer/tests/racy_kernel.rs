//! The main job: the racy kernel's latent race, made to fail by chaos recording on bt, and
//! the failure replayed exactly.

mod common;

use common::{Engine, build_pc};
use deja_engine::{EngineKind, RunEnd, RunOptions};
use deja_machine::devices::StopRequest;
use deja_machine::{ClockMode, LiveHost, MachineConfig};
use deja_recorder::{RecordOptions, Recorder, SerialCapture};
use deja_replayer::{ReplayHooks, ReplayOptions, ReplayReport, Until, Verdict, replay_with};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("deja-racy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn config() -> MachineConfig {
    MachineConfig {
        ram_size: 16 << 20,
        ..MachineConfig::default()
    }
}

fn image() -> deja_machine::loader::Image {
    deja_guests::find("racy-kernel").unwrap().image().unwrap()
}

/// A plain run on bt; returns the exit value and the output.
fn plain_run(clock: ClockMode) -> (u32, String) {
    let out = Arc::new(Mutex::new(SerialCapture::keeping()));
    let tee = deja_recorder::SerialTee::new(Box::new(std::io::sink()), out.clone());
    let mut vm = build_pc(
        Engine::Bt,
        &config(),
        &image(),
        Box::new(LiveHost::new(clock)),
        Box::new(tee),
    )
    .unwrap();
    let o = vm
        .run(RunOptions {
            timeout: Some(std::time::Duration::from_secs(60)),
            max_instructions: None,
        })
        .unwrap();
    let text = String::from_utf8_lossy(out.lock().unwrap().kept().unwrap()).to_string();
    match o.end {
        RunEnd::Stopped(StopRequest::DebugExit { value }) => (value, text),
        other => panic!("racy-kernel did not exit: {other:?}\n{text}"),
    }
}

struct Recording {
    path: PathBuf,
    exit: u32,
    icount: u64,
    output: String,
    digest: deja_traces::Digest,
}

fn record(path: &Path, chaos_seed: Option<u64>) -> Recording {
    let mut opts = RecordOptions::new(EngineKind::Bt, ClockMode::Host);
    opts.chaos_seed = chaos_seed;
    opts.run.timeout = Some(std::time::Duration::from_secs(60));
    let serial = Arc::new(Mutex::new(SerialCapture::keeping()));
    let cfg = config();
    let img = image();
    let outcome = Recorder::new(
        &img,
        &cfg,
        Box::new(LiveHost::new(ClockMode::Host)),
        Box::new(std::fs::File::create(path).unwrap()),
        &path.display().to_string(),
        Box::new(std::io::sink()),
        serial.clone(),
        opts,
        |host, out| build_pc(Engine::Bt, &cfg, &img, host, out),
    )
    .unwrap()
    .run()
    .unwrap();
    let output = String::from_utf8_lossy(serial.lock().unwrap().kept().unwrap()).to_string();
    let RunEnd::Stopped(StopRequest::DebugExit { value }) = outcome.run.end else {
        panic!("racy-kernel did not exit: {:?}\n{output}", outcome.run.end);
    };
    assert!(outcome.footer.is_some());
    Recording {
        path: path.to_path_buf(),
        exit: value,
        icount: outcome.run.icount,
        output,
        digest: outcome.final_digest,
    }
}

fn replay_bt(path: &Path, until: Option<Until>) -> ReplayReport {
    replay_bt_with(path, until, Vec::new(), ReplayHooks::default())
}

fn replay_bt_with(
    path: &Path,
    until: Option<Until>,
    watch: Vec<(u64, u64)>,
    hooks: ReplayHooks<'_>,
) -> ReplayReport {
    let opts = ReplayOptions {
        engine: EngineKind::Bt,
        until,
        seek: true,
        timeout: Some(std::time::Duration::from_secs(60)),
        watch,
        translate: Vec::new(),
    };
    replay_with(
        path,
        &opts,
        &|name| deja_guests::find(name).and_then(|g| g.image().ok()),
        Box::new(std::io::sink()),
        Box::new(|cfg, image, host, out| build_pc(Engine::Bt, cfg, image, host, out)),
        hooks,
    )
    .unwrap()
}

/// Records with chaos until the kernel fails, at most `attempts` times.
fn find_failure(attempts: u64) -> (Recording, u64) {
    for seed in 1..=attempts {
        let rec = record(&tmp(&format!("chaos-{seed}.trace")), Some(seed));
        if rec.exit != 0 {
            return (rec, seed);
        }
        assert!(rec.output.contains("no lost update"), "{}", rec.output);
    }
    panic!("chaos never made racy-kernel fail in {attempts} attempts");
}

#[test]
fn without_chaos_the_race_stays_latent_on_bt() {
    for clock in [ClockMode::Virtual, ClockMode::Host, ClockMode::Host] {
        let (v, text) = plain_run(clock);
        assert_eq!(v, 0, "{clock:?}: {text}");
        assert!(text.contains("no lost update in 400 ticks"), "{text}");
    }
    // Recording without chaos does not perturb anything: still clean, and verified.
    let rec = record(&tmp("no-chaos.trace"), None);
    assert_eq!(rec.exit, 0, "{}", rec.output);
    let r = replay_bt(&rec.path, None);
    assert!(matches!(r.verdict, Verdict::Verified), "{r}");
    assert_eq!(r.final_digest, rec.digest);
}

#[test]
fn chaos_finds_the_race_and_replay_reproduces_the_panic_at_the_same_instruction() {
    let (rec, seed) = find_failure(10);
    assert_eq!(
        rec.exit,
        u32::from(deja_guests::racy_kernel::EXIT_LOST_UPDATE)
    );
    assert!(rec.output.contains("PANIC: lost update"), "{}", rec.output);
    println!("chaos seed {seed}: {}", rec.output.trim_end());
    for _ in 0..3 {
        let r = replay_bt(&rec.path, None);
        assert!(matches!(r.verdict, Verdict::Verified), "{r}");
        assert_eq!(r.exit_status, Some(3));
        assert_eq!(r.icount, rec.icount);
        assert_eq!(r.final_digest, rec.digest);
    }

    // The panic names the counter's address; watching it lists every store.
    let counter = deja_guests::racy_kernel::VARS + deja_guests::racy_kernel::COUNTER as u64;
    assert!(
        rec.output.contains(&format!("counter at {counter:#x}")),
        "{}",
        rec.output
    );
    let syms = deja_guests::racy_kernel::symbols().unwrap();
    let store = syms["racy_store"];
    let tick = syms["tick"];
    let mut heard = Vec::new();
    let mut on_watch = |h: &deja_machine::WatchHit| heard.push(h.clone());
    let watched = replay_bt_with(
        &rec.path,
        None,
        vec![(counter, 8)],
        ReplayHooks {
            on_watch: Some(&mut on_watch),
            progress: None,
        },
    );
    assert!(matches!(watched.verdict, Verdict::Verified), "{watched}");
    assert_eq!(watched.final_digest, rec.digest, "watching changed the run");
    assert_eq!(watched.watch_hits, heard.len() as u64);
    assert!(heard.windows(2).all(|w| w[0].icount < w[1].icount));
    // The last store before the panic is task A's, writing its stale value + 1 over the
    // handlers' increments (two ticks: A -> B and back), so the counter goes backwards; the
    // store before it is a handler's, made inside task A's window.
    let le = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap());
    let last = heard.last().unwrap();
    let before = &heard[heard.len() - 2];
    assert_eq!(last.rip, store, "{last:?}");
    assert_eq!(last.address, counter);
    assert!(le(&last.new) < le(&last.old), "{last:?}");
    assert!(before.rip > tick, "{before:?}");
    assert_eq!(le(&before.new), le(&before.old) + 1, "{before:?}");
    assert_eq!(le(&before.new), le(&last.old), "{before:?}");

    // --until that icount: the state one instruction before the corrupting store, RIP at
    // the store, RAX holding the stale value it is about to write.
    let at = last.icount;
    let r = replay_bt(&rec.path, Some(Until::Icount(at)));
    let Verdict::ReachedUntil { at: pos, state } = &r.verdict else {
        panic!("{r}");
    };
    assert_eq!(pos.icount, at);
    assert_eq!(state.rip, store);
    assert_eq!(state.gpr[0].to_le_bytes().to_vec(), last.new);
    // One more instruction and the store has executed.
    let after = replay_bt(&rec.path, Some(Until::Icount(at + 1)));
    let Verdict::ReachedUntil { state: next, .. } = &after.verdict else {
        panic!("{after}");
    };
    assert!(
        next.rip > store && next.rip < store + 8,
        "after the store at {store:#x} rip is {:#x}",
        next.rip
    );
    println!(
        "corrupting store at icount {at} of {}: rax {:#x}",
        watched.watch_hits, state.gpr[0]
    );
}
