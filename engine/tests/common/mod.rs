//! What the engine integration tests share: serial capture, the visible /dev/kvm check and
//! booting a built-in guest through [`deja_engine::build_vm`].

#![allow(dead_code)]

use deja_engine::{BuildError, EngineKind, Vm, build_vm};
use deja_machine::{LiveHost, MachineConfig};
use std::io::Write;
use std::sync::{Arc, Mutex};

/// Serial output captured for the test to read while the guest owns the writer.
#[derive(Clone, Default)]
pub struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

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

impl SharedBuffer {
    /// Everything written so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("serial buffer lock")).into_owned()
    }
}

/// Whether this host can run the kvm engine; says why not, visibly, when it cannot (and
/// fails under `DEJA_REQUIRE_KVM=1`).
pub fn kvm_usable(test: &str) -> bool {
    deja_testkit::kvm_or_skip(test)
}

/// Builds built-in guest `name` on `engine` with 16 MiB of RAM, `host` and a serial capture.
/// `None` (after a SKIP line) when the engine cannot be used on this host.
pub fn guest_vm(
    test: &str,
    engine: EngineKind,
    name: &str,
    host: LiveHost,
) -> Option<(Vm, SharedBuffer)> {
    if engine == EngineKind::Kvm && !kvm_usable(test) {
        return None;
    }
    let image = deja_guests::find(name)
        .unwrap_or_else(|| panic!("no built-in guest {name:?}"))
        .image()
        .unwrap_or_else(|e| panic!("{e}"));
    let serial = SharedBuffer::default();
    let config = MachineConfig {
        ram_size: 16 << 20,
        ..MachineConfig::default()
    };
    match build_vm(
        engine,
        config,
        Box::new(host),
        Box::new(serial.clone()),
        &image,
    ) {
        Ok(vm) => Some((vm, serial)),
        Err(BuildError::EngineUnavailable { engine, reason }) => {
            deja_testkit::skip_without_kvm(test, format!("engine {engine}: {reason}"));
            None
        }
        Err(e) => panic!("{test}: building the vm for {name} on {engine}: {e}"),
    }
}
