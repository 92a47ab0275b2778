//! QEMU's isa-debug-exit: a write of `v` ends the run with status `(v << 1) | 1`. Guests
//! that check themselves report through it.

use super::{Device, DeviceError, DeviceState, IoCtx, StopRequest};

/// The debug-exit port device (QEMU's default: port 0xf4, 1 byte wide... or 4 with iosize).
#[derive(Debug, Default)]
pub struct DebugExit;

impl Device for DebugExit {
    fn name(&self) -> &'static str {
        "debug-exit"
    }

    fn read(&mut self, _ctx: &mut IoCtx, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, ctx: &mut IoCtx, _addr: u64, data: &[u8]) {
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        *ctx.stop = Some(StopRequest::DebugExit {
            value: u32::from_le_bytes(bytes),
        });
    }

    fn save(&self) -> DeviceState {
        DeviceState::DebugExit
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        match state {
            DeviceState::DebugExit => Ok(()),
            other => Err(DeviceError::WrongState {
                device: "debug-exit",
                found: other.kind(),
            }),
        }
    }
}
