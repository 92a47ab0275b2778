//! A bt recording kicked (Ctrl-C, a timeout) between two elements of a long REP string
//! instruction over RAM stops promptly, but no position names how far the instruction got:
//! the trace claims no final state there, and its replay verifies everything it holds
//! instead of reporting a divergence at the end.

use deja_engine::{EngineKind, RunEnd, build_vm};
use deja_machine::loader::{EntryMode, Image};
use deja_machine::{ClockMode, LiveHost, MachineConfig};
use deja_recorder::{RecordOptions, Recorder, SerialCapture};
use deja_replayer::{ReplayOptions, Verdict, replay};
use iced_x86::code_asm::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Long mode at 0x10000: copy 6 MiB of RAM with REP MOVSB, forever.
fn copier() -> Image {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    a.cld().unwrap();
    a.set_label(&mut top).unwrap();
    a.mov(rsi, 0x10_0000u64).unwrap();
    a.mov(rdi, 0x80_0000u64).unwrap();
    a.mov(rcx, 0x60_0000u64).unwrap();
    a.rep().movsb().unwrap();
    a.jmp(top).unwrap();
    let bytes = a.assemble(0x1_0000).unwrap();
    Image::raw("guest:copier", bytes, 0x1_0000, 0x1_0000, EntryMode::Long)
}

#[test]
fn a_kick_inside_a_rep_over_ram_leaves_a_trace_that_replays_verified() {
    let image = copier();
    let config = MachineConfig {
        ram_size: 32 << 20,
        ..MachineConfig::default()
    };
    let path = std::env::temp_dir().join(format!("deja-rep-kick-{}.trace", std::process::id()));
    let mut inside = 0;
    for attempt in 0..4 {
        let rec = Recorder::new(
            &image,
            &config,
            Box::new(LiveHost::new(ClockMode::Virtual)),
            Box::new(std::fs::File::create(&path).unwrap()),
            "rep-kick.trace",
            Box::new(std::io::sink()),
            Arc::new(Mutex::new(SerialCapture::default())),
            RecordOptions::new(EngineKind::Bt, ClockMode::Virtual),
            |host, out| build_vm(EngineKind::Bt, config.clone(), host, out, &image),
        )
        .unwrap();
        let kicker = rec.kicker();
        let kick = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150 + 37 * attempt));
            kicker.kick();
        });
        let outcome = rec.run().unwrap();
        kick.join().unwrap();
        assert_eq!(outcome.run.end, RunEnd::Interrupted);
        let footer = outcome.footer.as_ref().unwrap();
        // The copy dominates the run: the kick almost always lands inside it.
        if footer.final_state_digest.is_none() {
            inside += 1;
        }
        let img = image.clone();
        let r = replay(
            &path,
            &ReplayOptions {
                engine: EngineKind::Bt,
                until: None,
                seek: false,
                timeout: Some(Duration::from_secs(60)),
                watch: Vec::new(),
                translate: Vec::new(),
            },
            &move |_| Some(img.clone()),
            Box::new(std::io::sink()),
            Box::new(|cfg, image, host, out| {
                build_vm(EngineKind::Bt, cfg.clone(), host, out, image).map_err(|e| e.to_string())
            }),
        )
        .unwrap();
        assert!(
            matches!(r.verdict, Verdict::Verified),
            "attempt {attempt}: {r}"
        );
        assert_eq!(r.icount, outcome.run.icount);
        if let Some(d) = footer.final_state_digest {
            assert_eq!(r.final_digest, d);
        }
    }
    assert!(inside > 0, "no kick landed inside the copy in 4 attempts");
    let _ = std::fs::remove_file(&path);
}
