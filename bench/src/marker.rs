//! The bench-marker device: a write to the marker port stops the run so that the harness can
//! read its clocks and counters between two guest instructions.

use deja_machine::devices::{Device, DeviceError, DeviceState, IoCtx, StopRequest};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// The debug-exit value the marker stops with: well above the byte isa-debug-exit
/// carries, so it cannot be mistaken for a guest's exit status. The low byte is the mark.
pub const MARK_STOP_BASE: u32 = 0xbe_c400;

/// A write-only port device: a write of byte `m` stops the run with
/// `StopRequest::DebugExit { value: MARK_STOP_BASE | m }` and records `m` where the harness
/// can see that the stop came from the marker (and not from the guest's own debug exit).
/// Reads return all ones, as an unclaimed port would; it has no state to save.
#[derive(Debug, Default)]
pub struct BenchMarker {
    last: Arc<AtomicU32>,
}

impl BenchMarker {
    /// The device and the handle through which the harness takes marks.
    pub fn new() -> (Self, MarkHandle) {
        let last = Arc::new(AtomicU32::new(0));
        (Self { last: last.clone() }, MarkHandle { last })
    }
}

/// The harness's side of a [`BenchMarker`].
#[derive(Debug, Clone)]
pub struct MarkHandle {
    last: Arc<AtomicU32>,
}

impl MarkHandle {
    /// The mark (plus 0x100, so that mark 0 is visible) written since the last call, if any.
    pub fn take(&self) -> Option<u8> {
        match self.last.swap(0, Ordering::SeqCst) {
            0 => None,
            v => Some((v & 0xff) as u8),
        }
    }
}

impl Device for BenchMarker {
    fn name(&self) -> &'static str {
        "bench-marker"
    }

    fn read(&mut self, _ctx: &mut IoCtx, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, ctx: &mut IoCtx, _addr: u64, data: &[u8]) {
        let mark = data.first().copied().unwrap_or(0);
        self.last.store(0x100 | u32::from(mark), Ordering::SeqCst);
        *ctx.stop = Some(StopRequest::DebugExit {
            value: MARK_STOP_BASE | u32::from(mark),
        });
    }

    fn save(&self) -> DeviceState {
        // Stateless, like isa-debug-exit: the harness never snapshots a benchmark run.
        DeviceState::DebugExit
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        match state {
            DeviceState::DebugExit => Ok(()),
            other => Err(DeviceError::WrongState {
                device: "bench-marker",
                found: other.kind(),
            }),
        }
    }
}
