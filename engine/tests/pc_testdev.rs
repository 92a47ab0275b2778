//! The `pc-testdev` guest on a machine built with the optional pc-testdev (`--device
//! pc-testdev`), on bt and on kvm: QEMU's test device answers as QEMU-targeted test kernels
//! expect, through port I/O, MMIO exits of every width and an interrupt line. Without the
//! device the guest checks nothing and says so.

mod common;

use common::{SharedBuffer, kvm_usable};
use deja_engine::{BuildError, EngineKind, RunEnd, RunOptions, build_vm};
use deja_machine::devices::StopRequest;
use deja_machine::{ClockMode, LiveHost, MachineConfig, OptionalDevice};
use std::time::Duration;

/// Runs the guest on `engine` with `devices`; the serial output, or `None` (after a SKIP
/// line) when the engine cannot be used here.
fn run(test: &str, engine: EngineKind, devices: Vec<OptionalDevice>) -> Option<String> {
    if engine == EngineKind::Kvm && !kvm_usable(test) {
        return None;
    }
    let image = deja_guests::image_of("pc-testdev").unwrap();
    let serial = SharedBuffer::default();
    let config = MachineConfig {
        ram_size: 16 << 20,
        devices,
        ..MachineConfig::default()
    };
    let host = LiveHost::new(ClockMode::Virtual);
    let mut vm = match build_vm(
        engine,
        config,
        Box::new(host),
        Box::new(serial.clone()),
        &image,
    ) {
        Ok(vm) => vm,
        Err(BuildError::EngineUnavailable { engine, reason }) => {
            deja_testkit::skip_without_kvm(test, format!("engine {engine}: {reason}"));
            return None;
        }
        Err(e) => panic!("{test}: building the vm on {engine}: {e}"),
    };
    let outcome = vm
        .run(RunOptions {
            timeout: Some(Duration::from_secs(60)),
            max_instructions: None,
        })
        .unwrap_or_else(|e| panic!("{test}: {e}; serial:\n{}", serial.text()));
    let text = serial.text();
    assert_eq!(
        outcome.end,
        RunEnd::Stopped(StopRequest::DebugExit { value: 0 }),
        "{test}: serial output was:\n{text}"
    );
    Some(text)
}

#[test]
fn pc_testdev_guest_passes_on_bt() {
    let text = run(
        "pc_testdev_guest_passes_on_bt",
        EngineKind::Bt,
        vec![OptionalDevice::PcTestdev],
    )
    .unwrap();
    assert!(text.contains(deja_guests::testdev::PASS_LINE), "{text}");
}

#[test]
fn pc_testdev_guest_passes_on_kvm() {
    let test = "pc_testdev_guest_passes_on_kvm";
    if let Some(text) = run(test, EngineKind::Kvm, vec![OptionalDevice::PcTestdev]) {
        assert!(text.contains(deja_guests::testdev::PASS_LINE), "{text}");
    }
}

#[test]
fn without_the_device_the_guest_checks_nothing() {
    let text = run(
        "without_the_device_the_guest_checks_nothing",
        EngineKind::Bt,
        Vec::new(),
    )
    .unwrap();
    assert!(text.contains(deja_guests::testdev::ABSENT_LINE), "{text}");
    assert!(!text.contains(deja_guests::testdev::PASS_LINE), "{text}");
}
